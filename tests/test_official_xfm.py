"""Official X-FM checkpoints (lib/pretrained.py, convert_xfm): a tiny model.XFM is written out under the official
names and shapes (XFMBase's state dict: text_encoder / fusion_encoder as RobertaForMaskedLM, vision_encoder as
BEiT-v2, the heads; the inverse of XFM_OFFICIAL_MAP written out below, with the tensors the official model has
and this one does not), saved as {"model": state dict, "config": {...}}, converted to an export folder and read
back: every tensor placed, every output equal within 1e-6, every unused official tensor listed; a tensor with no
place and a file holding anything but plain data are refused. finetune.py --init and train.py --init start from the
export."""
import json
import os

import pytest
import torch

import flava
from conftest import tiny_config
from lib import pretrained
from model import XFM

TOL = 1e-6
CFG = dict(vocab_size=40, width=32, heads=4, text_layers=2, vision_layers=2, fusion_layers=2, image_size=16,
           patch_size=4, embed_dim=16, max_text_len=12)
RUN_CONFIG = {"image_res": 16, "patch_size": 4, "embed_dim": 16, "text_num_hidden_layers": 2,
              "fusion_num_hidden_layers": 2, "fusion_fusion_start_at": 0, "text_encoder": "data/roberta-base",
              "temp": 0.07, "use_beit_v2": True, "train_file": ["a.tsv"], "images": {"batch_size": 96}}


# RoBERTa's position table and token-type row in the official file; the model's positions are their sum (the fold)
_G = torch.Generator().manual_seed(3)
POSITIONS, TOKEN_TYPE = 0.1 * torch.randn(14, 32, generator=_G), 0.1 * torch.randn(1, 32, generator=_G)


class NotPlainData:
    """A class instance in a checkpoint: torch.load(weights_only=True) must refuse to rebuild it."""


@pytest.fixture(scope="module")
def original():
    """The tiny model whose weights the official file holds, every parameter perturbed (a swapped or dropped
    tensor cannot go unnoticed: no LayerNorm left at ones, no bias at zero)."""
    torch.manual_seed(0)
    model = XFM(tiny_config(**CFG))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.text.pos_embed.weight.copy_(POSITIONS + TOKEN_TYPE[0])
    return model.eval()


def linear(out, ours, theirs, s):
    out[f"{theirs}.weight"], out[f"{theirs}.bias"] = s[f"{ours}.weight"], s[f"{ours}.bias"]


def to_official(model, roberta=True, heads=True):
    """model's weights under the official names -> (state dict, the official tensors it cannot use). roberta:
    the text and fusion encoders under `roberta.` (a pre-training file; a fine-tuned one has bare encoders);
    heads: the two MLM heads (a fine-tuned file has none)."""
    s, cfg, out = model.state_dict(), model.cfg, {}
    D, g = cfg.width, torch.Generator().manual_seed(2)
    T, F = ("text_encoder.roberta.", "fusion_encoder.roberta.") if roberta else ("text_encoder.", "fusion_encoder.")
    out[T + "embeddings.word_embeddings.weight"] = s["text.word_embed.weight"]
    out[T + "embeddings.position_embeddings.weight"] = POSITIONS      # + TOKEN_TYPE[0] = the model's positions
    out[T + "embeddings.token_type_embeddings.weight"] = TOKEN_TYPE
    linear(out, "text.norm", T + "embeddings.LayerNorm", s)
    for enc, ours, n in ((T, "text", cfg.text_layers), (F, "fusion", cfg.fusion_layers)):
        for i in range(n):
            o, h = f"{ours}.blocks.{i}", f"{enc}encoder.layer.{i}"
            for p in ("weight", "bias"):
                q, k, v = s[f"{o}.attn.qkv.{p}"].chunk(3)
                out |= {f"{h}.attention.self.query.{p}": q, f"{h}.attention.self.key.{p}": k,
                        f"{h}.attention.self.value.{p}": v}
            linear(out, f"{o}.attn.proj", f"{h}.attention.output.dense", s)
            linear(out, f"{o}.norm1", f"{h}.attention.output.LayerNorm", s)
            linear(out, f"{o}.mlp.fc1", f"{h}.intermediate.dense", s)
            linear(out, f"{o}.mlp.fc2", f"{h}.output.dense", s)
            linear(out, f"{o}.norm2", f"{h}.output.LayerNorm", s)
            if ours == "fusion":
                linear(out, f"{o}.cross_attn.q", f"{h}.crossattention.self.query", s)
                for p in ("weight", "bias"):
                    k, v = s[f"{o}.cross_attn.kv.{p}"].chunk(2)
                    out |= {f"{h}.crossattention.self.key.{p}": k, f"{h}.crossattention.self.value.{p}": v}
                linear(out, f"{o}.cross_attn.proj", f"{h}.crossattention.output.dense", s)
                linear(out, f"{o}.norm_cross", f"{h}.crossattention.output.LayerNorm", s)
    V = "vision_encoder."
    linear(out, "vision.patch_embed", V + "patch_embed.proj", s)
    linear(out, "vision.fc_norm", V + "fc_norm", s)
    out |= {V + "cls_token": s["vision.cls_token"], V + "mask_token": s["vision.mask_token"]}
    unused = {}
    for i in range(cfg.vision_layers):
        o, h = f"vision.blocks.{i}", f"{V}blocks.{i}"
        for x in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            linear(out, f"{o}.{x}", f"{h}.{x}", s)
        out |= {f"{h}.attn.qkv.weight": s[f"{o}.attn.qkv.weight"], f"{h}.attn.q_bias": s[f"{o}.attn.q_bias"],
                f"{h}.attn.v_bias": s[f"{o}.attn.v_bias"], f"{h}.gamma_1": s[f"{o}.gamma_1"],
                f"{h}.gamma_2": s[f"{o}.gamma_2"], f"{h}.attn.relative_position_bias_table": s[f"{o}.rel_pos.table"]}
        unused[f"{h}.attn.relative_position_index"] = torch.zeros(cfg.num_patches + 1, cfg.num_patches + 1).long()
    for x in ("text_proj", "vision_proj", *(f"{h}.{j}" for h in ("itm_head", "bbox_head") for j in (0, 1, 3))):
        linear(out, x, x, s)
    out["temp"] = s["temp"]
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if heads:
        for enc, ours in (("text_encoder.", "text_mlm"), ("fusion_encoder.", "fusion_mlm")):
            linear(out, f"{ours}.dense", f"{enc}lm_head.dense", s)
            linear(out, f"{ours}.norm", f"{enc}lm_head.layer_norm", s)
            out[f"{enc}lm_head.bias"] = s[f"{ours}.bias"]
            out[f"{enc}lm_head.decoder.weight"] = s[f"{ours}.decoder.weight"]  # text: the word embeddings
            unused[f"{enc}lm_head.decoder.bias"] = s[f"{ours}.bias"]
            for x, shape in (("dense.weight", (D, D)), ("dense.bias", (D,)), ("layer_norm.weight", (D,)),
                             ("layer_norm.bias", (D,)), ("decoder.weight", (cfg.vocab_size, D)),
                             ("decoder.bias", (cfg.vocab_size,)), ("bias", (cfg.vocab_size,))):
                unused[f"{enc}lm_cap_head.{x}"] = rand(*shape)
    rows = cfg.max_text_len + cfg.pad_id + 1
    unused |= {T + "embeddings.position_ids": torch.arange(rows)[None],
               F + "embeddings.word_embeddings.weight": rand(cfg.vocab_size, D),
               F + "embeddings.position_embeddings.weight": rand(rows, D),
               F + "embeddings.token_type_embeddings.weight": rand(1, D),
               F + "embeddings.LayerNorm.weight": rand(D), F + "embeddings.LayerNorm.bias": rand(D),
               F + "embeddings.position_ids": torch.arange(rows)[None]}
    return out | unused, unused


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A RoBERTa-like folder: config.json with the text sizes, tokenizer.json with RoBERTa's special tokens."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("roberta")
    words = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "a", "red", "blue", "circle", "square", "left", "of"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(d / "tokenizer.json"))
    json.dump({"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 12, "intermediate_size": 128,
               "vocab_size": 40, "pad_token_id": 1, "max_position_embeddings": 14, "hidden_act": "gelu",
               "type_vocab_size": 1, "layer_norm_eps": 1e-5}, open(d / "config.json", "w"))
    return str(d)


@pytest.fixture(scope="module")
def converted(original, text_dir, tmp_path_factory):
    """The official file of `original`, converted through the command line -> (export folder, the official
    state dict, its unused tensors, what the command printed)."""
    d = tmp_path_factory.mktemp("official")
    sd, unused = to_official(original)
    torch.save({"model": sd, "config": RUN_CONFIG, "epoch": 39}, str(d / "checkpoint_39.pth"))
    out = str(d / "export")
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pretrained.main(["convert-xfm", str(d / "checkpoint_39.pth"), "--out", out, "--text_config", text_dir])
    return out, sd, unused, printed.getvalue()


def load(folder):
    ckpt = pretrained.read_export(folder)
    model = flava.build_model(flava.config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])                                  # strict: every key, every shape
    return model.eval(), ckpt


def outputs(model, seed=0):
    """Every stage of the model on one small batch: text states (with padding), vision with and without a MIM
    mask, fusion with and without a region key mask, ITC features, ITM logits, box, both MLM heads, temp."""
    g, cfg = torch.Generator().manual_seed(seed), model.cfg
    ids = torch.randint(5, 12, (3, 7), generator=g)
    ids[:, 0], ids[1, 5:], ids[2, 3:] = 0, cfg.pad_id, cfg.pad_id
    att = (ids != cfg.pad_id).long()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    mim = torch.rand(3, cfg.num_patches, generator=g) < 0.4
    region = torch.rand(3, cfg.num_patches + 1, generator=g) < 0.5
    region[:, 0] = True
    with torch.no_grad():
        t, v = model.encode_text(ids, att), model.encode_image(images)
        f, f_r = model.fuse(t, att, v), model.fuse(t, att, v, region)
        f_t, f_v = model.itc_features(t, v)
        return {"text": t, "vision": v, "vision_masked": model.encode_image(images, mim), "fusion": f,
                "fusion_region": f_r, "itc_text": f_t, "itc_vision": f_v, "itm": model.itm_head(f[:, 0]),
                "box": model.bbox_head(f[:, 0]).sigmoid(), "text_mlm": model.text_mlm(t),
                "fusion_mlm": model.fusion_mlm(f), "temp": model.temp}


def test_every_official_tensor_is_placed_or_listed_and_the_outputs_are_equal(original, converted):
    """The export holds the original's tensors, every official tensor not used is printed with its reason, and
    every output equals the original's within 1e-6."""
    folder, sd, unused, printed = converted
    model, ckpt = load(folder)
    assert all(ckpt["model_config"][k] == getattr(original.cfg, k) for k in (*CFG, "pad_id"))
    assert ckpt["train_config"]["official_config"] == RUN_CONFIG and ckpt["step"] == 0
    ours, theirs = original.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all((ours[k] - theirs[k]).abs().max() <= TOL for k in ours), \
        [k for k in ours if (ours[k] - theirs[k]).abs().max() > TOL]
    listed = {line.split()[1].rstrip(":") for line in printed.splitlines() if line.startswith("  unused ")}
    folded = {"text_encoder.roberta.embeddings.token_type_embeddings.weight", "text_encoder.lm_head.decoder.weight"}
    assert listed == set(unused) | folded and "missing" not in printed and "unexpected" not in printed
    a, b = outputs(original), outputs(model)
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if (a[k] - b[k]).abs().max() > TOL}
    assert not bad, bad


def test_the_export_reads_text_as_the_official_weights_were_trained(converted):
    """The exported tokenizer.json has the official text normalisation on (lib/tokenizer.normalize_text): a
    caption reaches the model lowercased, its marks gone, as in the official pre-training and fine-tuning."""
    from lib.tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(converted[0], "tokenizer.json"))
    assert tok.text_norm
    assert tok.encode("A Red-Circle, left!", 32) == tok.encode("a red circle left", 32)


def test_a_fine_tuned_layout_keeps_the_heads_it_lacks_at_init(original, text_dir, tmp_path):
    """A bare state dict with bare encoders (no `roberta.`) and no MLM heads, as the official fine-tuning code
    saves it: the encoders and the other heads are placed, the MLM heads are reported missing (left at init)."""
    sd, _ = to_official(original, roberta=False, heads=False)
    torch.save(sd, str(tmp_path / "retrieval.pth"))
    rep = pretrained.convert_xfm(str(tmp_path / "retrieval.pth"), str(tmp_path / "export"), text_dir)
    assert {k.split(".")[0] for k in rep.missing} == {"text_mlm", "fusion_mlm"} and not rep.unexpected
    model, _ = load(str(tmp_path / "export"))
    a, b = outputs(original), outputs(model)
    assert all((a[k] - b[k]).abs().max() <= TOL for k in ("text", "vision", "fusion_region", "itm", "box"))


def refused(tmp_path, obj, *expected, text_dir=""):
    path, out = str(tmp_path / "ckpt.pth"), str(tmp_path / "export")
    torch.save(obj, path)
    with pytest.raises(SystemExit) as e:
        pretrained.convert_xfm(path, out, text_dir, tokenizer=os.path.join(text_dir, "tokenizer.json"))
    msg = str(e.value)
    assert msg.startswith(f"error: {path}") and "\n" not in msg and all(x in msg for x in expected), msg
    assert not os.path.exists(out)                                         # nothing written


def test_a_tensor_with_no_place_is_refused(original, text_dir, tmp_path):
    """fusion_proj (an official model whose text and vision widths differ) has no place here: refused by name."""
    sd, _ = to_official(original)
    sd["fusion_proj.weight"] = torch.randn(32, 32)
    refused(tmp_path, {"model": sd, "config": RUN_CONFIG}, "with no place", "fusion_proj.weight", text_dir=text_dir)


def test_an_encoder_tensor_the_file_lacks_is_refused(original, text_dir, tmp_path):
    sd, _ = to_official(original)
    del sd["fusion_encoder.roberta.encoder.layer.1.crossattention.self.value.bias"]
    refused(tmp_path, {"model": sd}, "crossattention.self.value.bias", "not a whole X-FM model", text_dir=text_dir)


def test_a_config_that_contradicts_the_tensors_is_refused(original, text_dir, tmp_path):
    sd, _ = to_official(original)
    refused(tmp_path, {"model": sd, "config": {**RUN_CONFIG, "fusion_num_hidden_layers": 6}},
            "fusion_num_hidden_layers 6, its tensors 2", text_dir=text_dir)


def test_anything_but_plain_data_is_refused_unrun(original, text_dir, tmp_path):
    """A class instance is never rebuilt (torch.load with weights_only=True refuses it); the few other things
    that reader rebuilds (torch.Size here) are refused naming where they are."""
    sd, _ = to_official(original)
    refused(tmp_path, {"model": sd, "config": NotPlainData()}, "not a checkpoint of tensors and plain data",
            "NotPlainData", text_dir=text_dir)
    refused(tmp_path, {"model": sd, "config": {"image_res": torch.Size([16])}}, "['config']['image_res']",
            "Size", text_dir=text_dir)


def test_finetune_runs_from_a_converted_official_file(tmp_path):
    """The round trip: an official file (a tiny model on the toy world's tokenizer) -> convert-xfm -> finetune.py
    --init EXPORT, one epoch of textcls and zero-shot retrieval."""
    import finetune
    from lib import toyworld
    from lib.tokenizer import Tokenizer
    toy = str(tmp_path / "toy")
    toyworld.make_toy(toy, n_pairs=64, n_regions=32, n_text=64, n_images=32, n_test=16, n_down=16, progress=False)
    texts = [json.loads(line)["text"] for line in open(os.path.join(toy, "downstream", "textcls_train.jsonl"))]
    tok = Tokenizer.train(texts, 300, str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    sd, _ = to_official(XFM(tiny_config(**{**CFG, "vocab_size": tok.vocab_size})))
    torch.save({"model": sd, "config": RUN_CONFIG}, str(tmp_path / "official.pth"))
    export = str(tmp_path / "export")
    pretrained.convert_xfm(str(tmp_path / "official.pth"), export, tokenizer=str(tmp_path / "tokenizer.json"))
    common = ["--init", export, "--data_dir", toy, "--batch_size=8", "--eval_batch_size=16"]
    cls = finetune.main(["--task", "textcls", "--out_dir", str(tmp_path / "ft"), "--epochs=1", *common])
    ret = finetune.main(["--task", "retrieval", "--out_dir", str(tmp_path / "ft"), "--epochs=0", "--k_test=4", *common])
    assert cls["task"] == "textcls" and ret["task"] == "retrieval" and 0 <= cls["value"] <= 100


def test_train_starts_from_a_converted_official_file(converted, tmp_path):
    """train.py --init=EXPORT: a fresh pre-training run on the converted model and its tokenizer (the official
    text normalisation on), every tensor as converted before the first update (--lr=0)."""
    import train
    from lib import toyworld
    out, run, toy = converted[0], str(tmp_path / "run"), str(tmp_path / "toy")
    toyworld.make_toy(toy, n_pairs=16, n_regions=8, n_text=16, n_images=8, n_test=8, n_down=8, progress=False)
    train.main([f"--data_dir={toy}", f"--out_dir={run}", f"--init={out}", "--lr=0", "--max_steps=1", "--batch_size=8",
                "--caption_len=12", "--text_len=12", "--eval_k=4"])
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    state = pretrained.read_export(out)["model"]
    assert ckpt["step"] == 1 and all(torch.equal(ckpt["model"][k], v) for k, v in state.items())
    assert json.loads(open(os.path.join(run, "tokenizer.json")).read())["text_norm"] == "xfm"
