"""Hugging Face FLAVA -> flava.FLAVA (lib/pretrained.py, python -m lib.pretrained convert-flava): a small random
transformers.FlavaForPreTraining (a test-only oracle; skipped without it) is saved with save_pretrained, converted
into an export folder, read back as finetune.py reads it, and every stage must agree within 1e-5 in fp32: text,
image (masked and not), fusion, GC features and logit scale, ITM logits, the MLM, MIM and MMM heads. The BERT
WordPiece tokenizer.json it ships with is accepted by its special tokens' names, and finetune.py runs from it, as
train.py --init does once an image tokenizer replaces the export's codebook of zeros."""
import math
import os
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: E402

import finetune  # noqa: E402
import flava  # noqa: E402
from lib import pretrained, tokenizer, toyworld  # noqa: E402

TOL = 1e-5
# sizes no other test uses: width 24, 3 heads, MLP ratio 2, 2 + 1 + 2 layers, a 3 x 3 grid, 20 position rows;
# the LayerNorm eps is neither of flava.py's defaults, so an eps not read from the config shows
D, HEADS, MLP, POS, EPS, CODES, PROJ = 24, 3, 48, 20, 1e-3, 40, 16
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]   # BERT's order: [PAD] = 0
VOCAB = SPECIALS + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase] + ["red", "circle"]


def wordpiece_json(vocab=VOCAB):
    """A BERT-style WordPiece tokenizer.json (lowercasing normaliser, BERT pre-tokenizer, special tokens marked
    special) over `vocab`."""
    hf = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens([t for t in SPECIALS if t in vocab])   # marked special, as in BERT's file
    return hf.to_str()


@pytest.fixture(scope="module")
def hf_model():
    """A random FlavaForPreTraining: every parameter perturbed, so a swapped or dropped tensor shows."""
    enc = dict(hidden_size=D, num_attention_heads=HEADS, intermediate_size=MLP, layer_norm_eps=EPS)
    cfg = transformers.FlavaConfig(
        text_config=dict(enc, vocab_size=len(VOCAB), num_hidden_layers=2, max_position_embeddings=POS),
        image_config=dict(enc, num_hidden_layers=1, image_size=24, patch_size=8, vocab_size=CODES),
        multimodal_config=dict(enc, num_hidden_layers=2), hidden_size=D, projection_dim=PROJ, init_codebook=False)
    torch.manual_seed(0)
    model = transformers.FlavaForPreTraining(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """The Hugging Face folder (save_pretrained + the WordPiece tokenizer.json), `convert-flava` with 16 of the
    20 position rows, and the export read back into a flava.FLAVA as finetune.py --init reads it."""
    hf_dir, out = str(tmp_path_factory.mktemp("hf_flava")), str(tmp_path_factory.mktemp("export") / "flava")
    hf_model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write(wordpiece_json())
    pretrained.main(["convert-flava", hf_dir, "--out", out, "--max_text_len", "16"])
    ckpt = pretrained.read_export(out)
    model = flava.build_model(flava.config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return {"hf_dir": hf_dir, "out": out, "model": model.eval(), "ckpt": ckpt}


def inputs(seed=0, B=3, T=10):
    """Token ids with padding in the last row, masked copies, images and a block of masked patches."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3                                           # [CLS] ... [SEP]
    att = torch.ones(B, T, dtype=torch.long)
    ids[-1, 6:], att[-1, 6:] = 0, 0                                        # [PAD]
    ids[-1, 5] = 3
    ids_m = ids.masked_fill((torch.rand(B, T, generator=g) < 0.3) & att.bool(), 4)
    images = torch.randn(B, 3, 24, 24, generator=g)
    mim = torch.zeros(B, 9, dtype=torch.bool)
    mim[:, [0, 1, 3, 4]] = True
    return ids, ids_m, att, images, mim


def close(a, b):
    return a.shape == b.shape and (a - b).abs().max().item() < TOL


@torch.no_grad()
def test_every_stage_agrees_with_transformers(hf_model, converted):
    m = converted["model"]
    ids, ids_m, att, images, mim = inputs()
    P = m.cfg.num_patches
    out = hf_model(input_ids=ids, input_ids_masked=ids_m, attention_mask=att, pixel_values=images,
                   bool_masked_pos=mim, return_loss=False)
    # the unimodal encoders: states before the final LayerNorm (what the fusion reads) and after it
    t, v = m.encode_text(ids, att), m.encode_image(images)
    assert close(t, out.text_output.hidden_states[-1]) and close(m.text.norm(t), out.text_embeddings)
    assert close(v, out.image_output.hidden_states[-1]) and close(m.vision.norm(v), out.image_embeddings)
    t_m, v_m = m.encode_text(ids_m, att), m.encode_image(images, mim)
    assert close(m.vision.norm(v_m), out.image_masked_embeddings)
    # fusion of the masked pair, its ITM logits and both MMM heads
    h = m.fuse(t_m, att, v_m)
    assert close(h, out.multimodal_masked_embeddings)
    assert close(m.itm_head(h[:, 0]), out.itm_logits)
    assert close(m.mmm_image_head(h[:, 2:2 + P]), out.mmm_image_logits)
    assert close(m.mmm_text_head(h[:, 2 + P:]), out.mmm_text_logits)
    # GC: the features, the logit scale, the logits
    f_t, f_v = m.itc_features(t, v)
    assert m.logit_scale.item() == hf_model.flava.logit_scale.item()
    assert close(f_v @ f_t.t() / m.temp, out.contrastive_logits_per_image)
    # MLM on text alone, MIM on images alone (Hugging Face computes them when only one modality is given)
    mlm = hf_model(input_ids_masked=ids_m, attention_mask=att, return_loss=False).mlm_logits
    assert close(m.mlm_head(m.text.norm(t_m)), mlm)
    mim_logits = hf_model(pixel_values=images, bool_masked_pos=mim, return_loss=False).mim_logits
    assert close(m.mim_head(m.vision.norm(v_m)), mim_logits)


def test_the_export_holds_the_config_and_reports_the_unused(converted):
    cfg = converted["model"].cfg
    assert (cfg.vocab_size, cfg.pad_id, cfg.max_text_len, cfg.width, cfg.heads, cfg.mlp_ratio) == \
        (len(VOCAB), 0, 16, D, HEADS, MLP // D)
    assert (cfg.text_layers, cfg.vision_layers, cfg.fusion_layers, cfg.codebook_size, cfg.embed_dim) == \
        (2, 1, 2, CODES, PROJ)
    assert cfg.ln_eps == cfg.head_ln_eps == EPS
    rep = pretrained.load_flava(flava.FLAVA(cfg), converted["hf_dir"])
    assert not rep.missing and not rep.unexpected
    poolers = [f"{p}_model.pooler.dense.{w}" for p in ("text", "image", "multimodal") for w in ("weight", "bias")]
    assert sorted(rep.skipped) == sorted(poolers + ["text_model.embeddings.token_type_embeddings.weight"])


def test_a_tensor_with_no_place_is_refused_in_one_line(converted, tmp_path):
    state = pretrained.read_safetensors(os.path.join(converted["hf_dir"], "model.safetensors"))
    for name, edit in (("extra", lambda s: {**s, "flava.text_model.adapter.weight": torch.zeros(2)}),
                       ("no_key", lambda s: {k: v for k, v in s.items() if ".0.attention.attention.key." not in k})):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "tokenizer.json"):
            (folder / f).write_bytes(open(os.path.join(converted["hf_dir"], f), "rb").read())
        pretrained.write_safetensors(edit(state), str(folder / "model.safetensors"))
        with pytest.raises(SystemExit) as e:
            pretrained.convert_flava(str(folder), str(tmp_path / f"{name}_out"))
        msg = str(e.value)
        assert msg.startswith(f"error: {folder}") and "\n" not in msg
        assert ("adapter.weight has no place" if name == "extra" else "attention.attention.key") in msg
        assert not (tmp_path / f"{name}_out").exists()


def test_the_wordpiece_tokenizer_is_read_by_its_special_tokens_names(tmp_path):
    tok = tokenizer.Tokenizer.from_json(wordpiece_json())
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (2, 0, 3, 1, 4)
    ids = tok.encode("A red Circle", 16)
    assert ids == [2, VOCAB.index("a"), VOCAB.index("red"), VOCAB.index("circle"), 3]
    assert tok.decode(ids) == "a red circle"
    path = tmp_path / "no_mask.json"
    path.write_text(wordpiece_json([t for t in VOCAB if t != "[MASK]"]))
    with pytest.raises(SystemExit) as e:
        tokenizer.Tokenizer.load(str(path))
    assert str(e.value) == (f"error: {path}: tokenizer lacks special tokens ['<s>', '<pad>', '</s>', '<unk>', "
                            f"'<mask>'] (RoBERTa's names) or ['[MASK]'] (BERT's)")


def test_finetune_runs_from_the_converted_folder(converted, tmp_path):
    """Zero-shot retrieval straight from the export, then one epoch of VQA fine-tuning from it."""
    toy = str(tmp_path / "toy")
    toyworld.make_toy(toy, n_pairs=16, n_regions=8, n_text=16, n_images=8, n_test=8, n_down=8, progress=False)
    common = ["--init", converted["out"], "--data_dir", toy, "--batch_size=8", "--eval_batch_size=8", "--k_test=4"]
    zero = finetune.main(["--task", "retrieval", "--epochs=0", "--out_dir", str(tmp_path / "ret"), *common])
    vqa = finetune.main(["--task", "vqa", "--epochs=1", "--out_dir", str(tmp_path / "vqa"), *common])
    assert 0 <= zero["value"] <= 100 and all(math.isfinite(x) for x in vqa["train_loss"])


def test_a_flava_model_folder_converts_with_the_heads_at_their_init(hf_model, converted, tmp_path):
    """FlavaModel (no pre-training heads): the encoders load, only the heads are missing."""
    folder = str(tmp_path / "flava_model")
    hf_model.flava.save_pretrained(folder)
    (tmp_path / "flava_model" / "tokenizer.json").write_bytes(
        open(os.path.join(converted["hf_dir"], "tokenizer.json"), "rb").read())
    rep = pretrained.convert_flava(folder, str(tmp_path / "out"), max_text_len=16)
    assert rep.missing and all(k.startswith(pretrained.FLAVA_PRETRAINING_ONLY) for k in rep.missing)
    state = pretrained.read_export(str(tmp_path / "out"))["model"]
    ours = converted["model"].state_dict()
    assert all(torch.equal(state[k], ours[k]) for k in ours if not k.startswith(pretrained.FLAVA_PRETRAINING_ONLY))


def test_train_starts_from_the_converted_folder_with_an_image_tokenizer(converted, tmp_path):
    """train.py --init=EXPORT: convert-flava without --codebook leaves a codebook of zeros, which is refused in
    one line; with --image_tokenizer=FILE.pt the run starts from every other tensor of the export (--lr=0) and
    that file's codebook."""
    import train
    toy, run, book = str(tmp_path / "toy"), str(tmp_path / "run"), str(tmp_path / "book.pt")
    toyworld.make_toy(toy, n_pairs=16, n_regions=8, n_text=16, n_images=8, n_test=8, n_down=8, progress=False)
    args = [f"--data_dir={toy}", f"--out_dir={run}", f"--init={converted['out']}", "--lr=0", "--max_steps=1",
            "--batch_size=8", "--caption_len=16", "--text_len=16", "--eval_k=4"]
    with pytest.raises(SystemExit, match="its image tokenizer is all zeros .*--image_tokenizer="):
        train.main(args)
    codebook = torch.randn(CODES, 3 * 8 * 8, generator=torch.Generator().manual_seed(4))
    torch.save({"codebook": codebook}, book)
    train.main([*args, f"--image_tokenizer={book}"])
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["image_tokenizer.codebook"], codebook)
    state = converted["ckpt"]["model"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items() if not k.startswith("image_tokenizer."))
