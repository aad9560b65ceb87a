"""Loading real pre-trained encoders (lib/pretrained.py): small random RoBERTa and BEiT models built with Hugging Face
transformers (a test-only dependency; skipped without it) are saved, loaded into our encoders, and every layer's
hidden states must agree within 1e-5 in fp32: with padding, with masked patches, at a second image size, from
safetensors, .bin and the official BEiT .pth layout (per-block and shared tables)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
load_file = pytest.importorskip("safetensors.torch").load_file  # installed with transformers

from lib import runlog  # noqa: E402
from lib import pretrained  # noqa: E402
from conftest import tiny_config  # noqa: E402
from model import XFM  # noqa: E402
from lib.pretrained import resize_rel_pos  # noqa: E402
from lib import toyworld

TOL = 1e-5
D, HEADS, LAYERS, VOCAB = 32, 4, 2, 100


def randomize(model, seed):
    """Perturb every parameter, so that a swapped or dropped tensor cannot go unnoticed (HF inits many to 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_folder(model, folder, form="safetensors"):
    """A Hugging Face folder: config.json + model.safetensors, or + pytorch_model.bin (the same tensors through
    torch.save). save_pretrained writes the hub's key layout (transformers 5 renames some modules in memory only)."""
    model.save_pretrained(folder, safe_serialization=True)
    st = os.path.join(folder, "model.safetensors")
    if form == "bin":
        sd = load_file(st)
        os.remove(st)
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    return folder


def disk_state(model, folder):
    """The model's tensors as save_pretrained writes them (the hub layout), read with the safetensors package."""
    return load_file(os.path.join(save_folder(model, folder), "model.safetensors"))


def block_outputs(blocks, run):
    """Run `run()` and collect each block's output (forward hooks)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in blocks]
    try:
        res = run()
    finally:
        for h in hooks:
            h.remove()
    return res, outs


def close(a, b):
    return (a - b).abs().max().item() < TOL


# ---------------------------------------------------------------------------------------------------------
# RoBERTa


def make_roberta(vocab=VOCAB):
    cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     intermediate_size=4 * D, max_position_embeddings=40, type_vocab_size=1,
                                     pad_token_id=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return randomize(transformers.RobertaForMaskedLM(cfg), 1)


@pytest.fixture(scope="module")
def roberta():
    return make_roberta()


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_roberta_parity_with_padding(roberta, tmp_path, form):
    folder = save_folder(roberta, str(tmp_path / "roberta"), form)
    over = pretrained.config_overrides(folder)
    assert over == dict(width=D, heads=HEADS, text_layers=LAYERS, vocab_size=VOCAB, pad_id=1, max_text_len=38)
    model = XFM(tiny_config(**over)).eval()
    rep = pretrained.load_text(model, folder)
    assert not rep.missing and not rep.unexpected, str(rep)
    assert "embeddings.token_type_embeddings.weight" in rep.skipped

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    ids[:, 0] = 0
    att = torch.ones_like(ids)
    for b, n in enumerate([12, 7, 4]):  # padded rows
        ids[b, n - 1], ids[b, n:], att[b, n:] = 2, 1, 0
    with torch.no_grad():
        hf = roberta(input_ids=ids, attention_mask=att, output_hidden_states=True)
        t, outs = block_outputs(model.text.blocks, lambda: model.text(ids, att))
        logits = model.text_mlm(t)
    real = att.bool()
    assert len(outs) == LAYERS and len(hf.hidden_states) == LAYERS + 1
    for i, o in enumerate(outs):
        assert close(o[real], hf.hidden_states[i + 1][real]), f"layer {i}"
    assert close(logits[real], hf.logits[real])


# ---------------------------------------------------------------------------------------------------------
# BEiT


def beit_config(image_size=32, shared=False):
    return transformers.BeitConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   intermediate_size=4 * D, image_size=image_size, patch_size=8, use_mask_token=True,
                                   use_absolute_position_embeddings=False, use_relative_position_bias=not shared,
                                   use_shared_relative_position_bias=shared, layer_scale_init_value=0.1,
                                   use_mean_pooling=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def beit():
    torch.manual_seed(0)
    return randomize(transformers.BeitModel(beit_config(), add_pooling_layer=True), 2)


def hf_to_official(sd, shared=False):
    """Rename a Hugging Face BeitModel state dict into the official BEiT(-v2) .pth layout, by hand (independent of
    lib/pretrained.py's maps). shared: one `rel_pos_bias` table (block 0's) instead of one per block."""
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "fc_norm.weight": sd["pooler.layernorm.weight"], "fc_norm.bias": sd["pooler.layernorm.bias"],
           "lm_head.weight": torch.randn(8, D), "lm_head.bias": torch.randn(8)}  # BEiT's MIM head: skipped
    for i in range(LAYERS):
        h, a, o = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention.attention.", f"blocks.{i}."
        out[o + "attn.qkv.weight"] = torch.cat([sd[a + "query.weight"], sd[a + "key.weight"], sd[a + "value.weight"]])
        out[o + "attn.q_bias"], out[o + "attn.v_bias"] = sd[a + "query.bias"], sd[a + "value.bias"]
        out[o + "attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)  # a buffer: ignored
        if not shared:
            out[o + "attn.relative_position_bias_table"] = sd[a + "relative_position_bias.relative_position_bias_table"]
        out[o + "gamma_1"], out[o + "gamma_2"] = sd[h + "lambda_1"], sd[h + "lambda_2"]
        for p in ("weight", "bias"):
            out[o + f"norm1.{p}"] = sd[h + f"layernorm_before.{p}"]
            out[o + f"norm2.{p}"] = sd[h + f"layernorm_after.{p}"]
            out[o + f"attn.proj.{p}"] = sd[h + f"attention.output.dense.{p}"]
            out[o + f"mlp.fc1.{p}"] = sd[h + f"intermediate.dense.{p}"]
            out[o + f"mlp.fc2.{p}"] = sd[h + f"output.dense.{p}"]
    if shared:
        out["rel_pos_bias.relative_position_bias_table"] = \
            sd["encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"]
    return out


def share_tables(beit_model):
    """Make every block's table equal to the first block's (what one shared table computes)."""
    tables = [p for n, p in beit_model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == LAYERS
    with torch.no_grad():
        for t in tables[1:]:
            t.copy_(tables[0])


def check_beit(model, hf_model, image_size, seed=0):
    """Every block's output, with and without masked patches, and the X-FM output (fc_norm, mean) vs HF."""
    g = torch.Generator().manual_seed(seed)
    P = (image_size // 8) ** 2
    x = torch.randn(2, 3, image_size, image_size, generator=g)
    for mask in (None, torch.rand(2, P, generator=g) < 0.4):
        with torch.no_grad():
            hf = hf_model(pixel_values=x, bool_masked_pos=mask, output_hidden_states=True)
            v, outs = block_outputs(model.vision.blocks, lambda: model.vision(x, mask))
        for i, o in enumerate(outs):
            assert close(o, hf.hidden_states[i + 1]), f"block {i}, mask {mask is not None}"
        ln = hf_model.pooler.layernorm
        patches = ln(hf.last_hidden_state[:, 1:])                          # fc_norm = the pooler's LayerNorm
        assert close(v[:, 1:], patches) and close(v[:, 0], patches.mean(1))


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_beit_hf_folder_parity_with_masks(beit, tmp_path, form):
    folder = save_folder(beit, str(tmp_path / "beit"), form)
    over = pretrained.config_overrides(vision_path=folder)
    assert over == dict(width=D, heads=HEADS, vision_layers=LAYERS, image_size=32, patch_size=8)
    model = XFM(tiny_config(**over)).eval()
    rep = pretrained.load_vision(model, folder)
    assert not rep.missing and not rep.unexpected, str(rep)
    check_beit(model, beit, 32)


@pytest.mark.parametrize("shared", [False, True])
def test_beit_official_pth_parity(beit, tmp_path, shared):
    hf_model = beit
    if shared:
        hf_model = randomize(transformers.BeitModel(beit_config(), add_pooling_layer=True), 2)
        share_tables(hf_model)
    path = str(tmp_path / "beitv2.pth")
    torch.save({"model": hf_to_official(disk_state(hf_model, str(tmp_path / "hf")), shared)}, path)  # wrapped, as the official files
    over = pretrained.vision_config(path)  # no config.json: read off the tensor shapes
    assert over == dict(width=D, heads=HEADS, vision_layers=LAYERS, image_size=32, patch_size=8)
    model = XFM(tiny_config(**over)).eval()
    rep = pretrained.load_vision(model, path)
    assert not rep.missing and not rep.unexpected, str(rep)
    assert "lm_head.weight" in rep.skipped and "blocks.0.attn.relative_position_index" in rep.skipped
    if shared:
        assert "rel_pos_bias.relative_position_bias_table" in rep.skipped
    check_beit(model, hf_model, 32)


def test_beit_second_image_size(beit, tmp_path):
    """Our encoder at 48 px (grid 6) loaded from the 32 px (grid 4) checkpoint equals an HF BEiT built natively at
    48 px whose tables were set to the same resized tables: this checks the loading path at a new size (the
    resize itself is pretrained.resize_rel_pos, bicubic; the official code uses a geometric scipy interpolation)."""
    folder = save_folder(beit, str(tmp_path / "beit"), "safetensors")
    path = str(tmp_path / "beitv2.pth")
    torch.save({"model": hf_to_official(disk_state(beit, str(tmp_path / "hf")))}, path)
    big = transformers.BeitModel(beit_config(image_size=48), add_pooling_layer=True).eval()
    sd = beit.state_dict()
    for k, t in sd.items():
        if k.endswith("relative_position_bias_table"):
            sd[k] = resize_rel_pos(t, 4, 6)
    missing, unexpected = big.load_state_dict(sd, strict=False)
    assert not unexpected and all("relative_position_index" in k for k in missing)
    for src in (folder, path):
        model = XFM(tiny_config(**{**pretrained.config_overrides(vision_path=src), "image_size": 48})).eval()
        rep = pretrained.load_vision(model, src)
        assert not rep.missing and not rep.unexpected, str(rep)
        check_beit(model, big, 48)


# ---------------------------------------------------------------------------------------------------------
# Refusals and reports; the file reader; train.py


def test_shape_mismatch_is_refused_with_the_key(roberta, beit, tmp_path):
    folder = save_folder(roberta, str(tmp_path / "roberta"), "safetensors")
    model = XFM(tiny_config(**{**pretrained.config_overrides(folder), "width": 64}))
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight has shape \(100, 32\).*text\.word_embed\.weight is \(100, 64\)"):
        pretrained.load_text(model, folder)
    path = str(tmp_path / "beitv2.pth")
    torch.save({"model": hf_to_official(disk_state(beit, str(tmp_path / "hf")))}, path)
    model = XFM(tiny_config(width=D, heads=HEADS, vision_layers=LAYERS, patch_size=4))  # wrong patch size
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight.*vision\.patch_embed\.weight"):
        pretrained.load_vision(model, path)
    with pytest.raises(ValueError, match="width 32 but the vision checkpoint 48"):
        bad = str(tmp_path / "beit48")
        save_folder(transformers.BeitModel(transformers.BeitConfig(**{**beit_config().to_dict(), "hidden_size": 48,
                                                                       "intermediate_size": 192})), bad, "bin")
        pretrained.config_overrides(folder, bad)


def test_missing_and_unexpected_keys_are_reported(roberta, tmp_path):
    folder = save_folder(roberta, str(tmp_path / "roberta"), "bin")
    path = os.path.join(folder, "pytorch_model.bin")
    sd = torch.load(path, weights_only=True)
    del sd["roberta.encoder.layer.1.attention.self.key.bias"]
    sd["roberta.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    torch.save(sd, path)
    model = XFM(tiny_config(**pretrained.config_overrides(folder)))
    before = model.text.blocks[1].attn.qkv.bias.clone()
    rep = pretrained.load_text(model, folder)
    assert rep.missing == {"text.blocks.1.attn.qkv.bias": "encoder.layer.1.attention.self.key.bias"}
    assert rep.unexpected == ["encoder.layer.0.adapter.weight"]
    assert torch.equal(model.text.blocks[1].attn.qkv.bias, before)  # left at its init
    assert "missing text.blocks.1.attn.qkv.bias" in str(rep) and "unexpected encoder.layer.0.adapter" in str(rep)


def test_safetensors_reader_matches_the_reference(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(7), "empty": torch.zeros(0, 3)}
    path = str(tmp_path / "x.safetensors")
    st.save_file(tensors, path, metadata={"format": "pt"})
    got = pretrained.read_safetensors(path)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_train_main_starts_from_pretrained_encoders(beit, tmp_path):
    from lib import tokenizer
    import train
    toy = str(tmp_path / "toy")
    toyworld.make_toy(toy, seed=0, n_pairs=16, n_regions=8, n_text=16, n_images=8, n_test=8, n_down=4, progress=False)
    roberta = make_roberta(vocab=300)  # a byte-level BPE has at least 256 + 5 tokens
    text = save_folder(roberta, str(tmp_path / "roberta"), "safetensors")
    vision = str(tmp_path / "beitv2.pth")
    torch.save({"model": hf_to_official(disk_state(beit, str(tmp_path / "hf")))}, vision)
    # a tokenizer whose vocabulary fits the RoBERTa's 300 embeddings, saved as the folder's tokenizer.json
    tok = tokenizer.Tokenizer.train(tokenizer.corpus_texts(toy), 300, os.path.join(text, "tokenizer.json"))
    assert tok.vocab_size <= 300
    out = str(tmp_path / "run")
    train.main([f"--data_dir={toy}", f"--out_dir={out}", f"--init_text={text}", f"--init_vision={vision}",
                "--max_steps=1", "--lr=0", "--batch_size=4", "--eval_k=2", "--caption_len=24", "--text_len=32"])
    mcfg = json.load(open(os.path.join(out, "config.json")))["model"]
    assert (mcfg["width"], mcfg["heads"], mcfg["text_layers"], mcfg["vision_layers"], mcfg["vocab_size"]) == \
        (D, HEADS, LAYERS, LAYERS, 300)
    ckpt = runlog.load_checkpoint(out, "cpu")["model"]
    gamma = [p for n, p in beit.named_parameters() if n.endswith("lambda_2")][1]
    assert torch.equal(ckpt["vision.blocks.1.gamma_2"], gamma.detach())
    assert torch.equal(ckpt["text.word_embed.weight"], roberta.roberta.embeddings.word_embeddings.weight.detach())
    # finetune.py without --init: the same encoders, a fresh fusion encoder, straight into a task
    import finetune
    res = finetune.main(["--task=textcls", f"--init_text={text}", f"--init_vision={vision}", "--preset=tiny",
                         f"--data_dir={toy}", f"--out_dir={tmp_path / 'ft'}", "--epochs=1", "--batch_size=4", "--text_len=32"])
    assert os.path.isfile(os.path.join(tmp_path, "ft", "textcls", "metrics.json")) and "summary" in res
