"""Section 3 of tools/bench.py: our language and vision encoders against the same architecture built from
Hugging Face transformers (RobertaModel, BeitModel), forward + backward on the same input. bench.py imports it
(with the repository root on sys.path) and writes the table. Run alone, it prints that table only:

    python tools/bench_hf.py --configs tiny,small --iters 20      # bench.py's batch and text length per preset
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from lib import runtime  # noqa: E402
from bench_meters import DEFAULT_BATCH, TEXT_LEN, build, fmt, md_table, sync  # noqa: E402
from model import TextEncoder, VisionEncoder  # noqa: E402


def hf_twins(cfg):
    """RobertaModel and BeitModel with our language / vision encoder's architecture (as tests/test_pretrained.py
    builds them): same sizes, RoBERTa positions after the pad id, BEiT with a relative position bias per layer,
    layer scale, mean pooling, no absolute positions; the same dropout and drop path; SDPA attention."""
    import transformers
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.width,
        max_position_embeddings=cfg.max_text_len + cfg.pad_id + 1, type_vocab_size=1, pad_token_id=cfg.pad_id,
        layer_norm_eps=1e-5, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa"), add_pooling_layer=False)
    beit = transformers.BeitModel(transformers.BeitConfig(
        hidden_size=cfg.width, num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_ratio * cfg.width, image_size=cfg.image_size, patch_size=cfg.patch_size,
        use_mask_token=True, use_absolute_position_embeddings=False, use_relative_position_bias=True,
        use_shared_relative_position_bias=False, layer_scale_init_value=cfg.layer_scale, use_mean_pooling=True,
        layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=cfg.drop_path, attn_implementation="sdpa"), add_pooling_layer=True)
    return roberta, beit


def bench_hf(cfg, preset, device, B, T, dtype, iters, warmup):
    """Forward + backward ms of our encoders and their HF twins on the same input (B texts of T tokens, B
    images), interleaved (ours, HF, ours, ...) so that clock drift hits both alike. -> rows (language, vision)."""
    roberta, beit = hf_twins(cfg)
    ours_t, ours_v = TextEncoder(cfg), VisionEncoder(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    att = torch.ones_like(ids)
    for b in range(B):  # padded rows, as a text batch has them: row b keeps between half and all of T
        n = T - (b * T // (2 * B))
        ids[b, n:], att[b, n:] = cfg.pad_id, 0
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids, att, images = ids.to(device), att.to(device), images.to(device)
    autocast = runtime.amp_setup(dtype, device)[0]
    # each output reduced to one scalar to backpropagate: ours returns [mean of LN(patches), LN(patches)], HF's
    # BEiT the blocks' output and its pooler (LN of the mean): the same blocks and one LayerNorm each
    runs = [("language", f"{B} x {T} tokens", ours_t, lambda: ours_t(ids, att).float().mean(),
             roberta, lambda: roberta(input_ids=ids, attention_mask=att).last_hidden_state.float().mean()),
            ("vision", f"{B} images {cfg.image_size}px", ours_v, lambda: ours_v(images).float().mean(),
             beit, lambda: sum(o.float().mean() for o in beit(pixel_values=images).to_tuple()[:2]))]
    rows = []
    for part, inp, ours_m, ours_fn, hf_m, hf_fn in runs:
        ours_m.to(device).train()
        hf_m.to(device).train()
        times = {"ours": [], "hf": []}
        for i in range(warmup + iters):
            for who, fn in (("ours", ours_fn), ("hf", hf_fn)):
                sync(device)
                t0 = time.perf_counter()
                with autocast():
                    loss = fn()
                loss.backward()
                sync(device)
                if i >= warmup:
                    times[who].append(time.perf_counter() - t0)
        ours_ms, hf_ms = (sum(times[w]) / iters * 1e3 for w in ("ours", "hf"))
        rows.append(dict(config=preset, part=part, input=inp, dtype=dtype, ours_ms=ours_ms, hf_ms=hf_ms,
                         ratio=ours_ms / hf_ms, hf_attn=hf_m.config._attn_implementation))
        ours_m.cpu()
        hf_m.cpu()
    return rows


def hf_table(rows):
    headers = ["config", "encoder", "input", "dtype", "ours fwd+bwd ms", "HF fwd+bwd ms", "ours / HF", "HF attention"]
    return md_table(headers, [[r["config"], r["part"], r["input"], r["dtype"], fmt(r["ours_ms"]), fmt(r["hf_ms"]),
                               f"{r['ratio']:.2f}", r["hf_attn"]] for r in rows])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small", help="model presets, comma-separated")
    p.add_argument("--attn_impl", default=None, help="our attention path (default: XFMConfig's)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = runtime.amp_setup("auto", device)[2]
    over = {"attn_impl": args.attn_impl} if args.attn_impl else {}
    rows = [r for c in args.configs.split(",") for r in bench_hf(
        build("xfm", c, **over)[0], c, device, DEFAULT_BATCH[device.type][c], TEXT_LEN[c], dtype,
        args.iters, args.warmup)]
    print(hf_table(rows))
