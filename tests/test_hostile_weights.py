"""Hostile weight files: a safetensors header that breaks the format, a torch file that is no checkpoint, an
export or Hugging Face config.json of the wrong types, an export that reads files outside its folder or whose
tensors are not its model, a garbage tokenizer.json. Each is refused before any work with one line naming the
file and the reason (a SystemExit, never a traceback), while the good files still load bit for bit.
Run: python -m pytest tests/test_hostile_weights.py -q   (CPU, a few seconds)"""
import datetime
import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict

import pytest
import torch

import finetune
from lib import runlog
from lib import pretrained
from lib import tokenizer
import train
from conftest import tiny_config
from model import XFM

WORDS = ["a red circle left of a blue square", "a small green cross", "two shapes: a purple diamond and a circle"]


def refused(fn, *parts):
    """fn() stops the run with ONE line `error: ...` that holds every one of parts; -> the line."""
    with pytest.raises(SystemExit) as e:
        fn()
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    for p in parts:
        assert p in line, (p, line)
    return line


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run folder (tokenizer.json, ckpt.pt of a small X-FM) and its export folder (pretrained.export)."""
    run = str(tmp_path_factory.mktemp("run"))
    tok = tokenizer.Tokenizer.train(WORDS, 300, os.path.join(run, "tokenizer.json"))
    cfg = tiny_config(width=32, heads=2, embed_dim=16, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    torch.manual_seed(0)
    state = XFM(cfg).state_dict()
    runlog.atomic_save({"model": state, "model_config": asdict(cfg), "train_config": {}, "step": 3},
                      os.path.join(run, "ckpt.pt"))
    export = os.path.join(run, "export")
    pretrained.export(export, run, state, asdict(cfg), {}, 3)
    return {"run": run, "export": export, "state": state, "cfg": cfg}


def copy_export(world, tmp_path, **config):
    """A copy of the good export with config.json's keys replaced by config (None deletes a key)."""
    folder = str(tmp_path / "export")
    shutil.copytree(world["export"], folder)
    path = os.path.join(folder, "config.json")
    c = json.load(open(path))
    for k, v in config.items():
        if v is None:
            c.pop(k)
        else:
            c[k] = v
    json.dump(c, open(path, "w"))
    return folder


def test_good_export_checkpoint_and_tokenizer_load_bit_exactly(world):
    ckpt = runlog.load_checkpoint(world["run"], "cpu")
    got = pretrained.read_export(world["export"])
    assert sorted(got["model"]) == sorted(ckpt["model"]) == sorted(world["state"])
    for k, t in world["state"].items():
        assert same_bytes(got["model"][k], t) and same_bytes(ckpt["model"][k], t), k
    assert got["tokenizer"] == os.path.join(world["export"], "tokenizer.json") and got["step"] == 3
    tok = tokenizer.Tokenizer.load(os.path.join(world["run"], "tokenizer.json")).to_json()
    cfg, _ = finetune.parse_args(["--task=textcls", f"--init={world['export']}"])
    assert finetune.load_init(cfg, False, 0, 1, torch.device("cpu")).tok.to_json() == tok


def test_init_reads_the_tokenizer_the_export_names(world, tmp_path):
    folder = copy_export(world, tmp_path, tokenizer="vocab/tok.json")
    os.makedirs(os.path.join(folder, "vocab"))
    os.replace(os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab", "tok.json"))
    cfg, _ = finetune.parse_args(["--task=textcls", f"--init={folder}"])
    env = finetune.load_init(cfg, False, 0, 1, torch.device("cpu"))
    assert env.tok.to_json() == tokenizer.Tokenizer.load(os.path.join(world["run"], "tokenizer.json")).to_json()


# ---------------------------------------------------------------------------------------------------------
# safetensors headers


def st_bytes(header, data=b"", length=None):
    """[8-byte header length][header][data]; header a dict (JSON) or raw bytes; length overrides the length."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(head) if length is None else length).to_bytes(8, "little") + head + data


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32x4 = torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes()        # 16 bytes
BAD_SAFETENSORS = {  # case -> (file bytes, what the one line says)
    "shorter_than_8_bytes": (b"\x10\x00", "2 bytes, fewer than the 8"),
    "header_length_huge": (st_bytes({}, length=2 ** 63), "a header length of 9223372036854775808 bytes, but only"),
    "header_length_past_the_end": (st_bytes({"w": t("F32", [1], 0, 4)}, b"\0" * 4, length=1000),
                                   "a header length of 1000 bytes, but only 65 bytes follow it"),
    "header_not_json": (st_bytes(b"{nope"), "the header is not a JSON object"),
    "header_not_utf8": (st_bytes(b'{"w\xff": 1}'), "the header is not a JSON object"),
    "header_nested_too_deep": (st_bytes(b"[" * 100000), "the header is not a JSON object"),
    "header_a_list": (st_bytes([1, 2]), "the header is a list, not an object"),
    "name_twice": (st_bytes(b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                            b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"), "twice"),
    "metadata_not_strings": (st_bytes({"__metadata__": {"step": 3}}), "__metadata__ is not a map of strings"),
    "entry_not_an_object": (st_bytes({"w": 3}), "tensor 'w' is not an object"),
    "unknown_dtype": (st_bytes({"w": t("Q4", [1], 0, 1)}, b"\0"), "unknown dtype 'Q4'"),
    "shape_of_strings": (st_bytes({"w": t("U8", ["1"], 0, 1)}, b"\0"), "not a list of ints >= 0"),
    "shape_negative": (st_bytes({"w": t("U8", [-1], 0, 1)}, b"\0"), "not a list of ints >= 0"),
    "offsets_reversed": (st_bytes({"w": t("U8", [1], 1, 0)}, b"\0"), "with 0 <= begin <= end"),
    "offsets_one_number": (st_bytes({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"\0"),
                           "with 0 <= begin <= end"),
    "bytes_not_shape_times_dtype": (st_bytes({"w": t("F32", [2], 0, 4)}, b"\0" * 4),
                                    "spans 4 bytes, but F32 of shape [2] takes 8"),
    "f32_bytes_labelled_i64": (st_bytes({"w": t("I64", [4], 0, 16)}, F32x4), "I64 of shape [4] takes 32"),
    "overlap": (st_bytes({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, F32x4[:12]), "an overlap"),
    "gap": (st_bytes({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, F32x4[:12]), "a gap"),
    "not_from_byte_0": (st_bytes({"a": t("F32", [1], 4, 8)}, F32x4[:8]), "not at the start of the data"),
    "bytes_after_the_last": (st_bytes({"a": t("F32", [1], 0, 4)}, F32x4[:8]), "cover 4 bytes of a data section of 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_bad_safetensors_is_refused_by_name(tmp_path, case):
    raw, reason = BAD_SAFETENSORS[case]
    path = str(tmp_path / "model.safetensors")
    open(path, "wb").write(raw)
    refused(lambda: pretrained.read_safetensors(path), f"error: {path}: not a valid safetensors file (", reason)


def test_a_header_over_the_limit_is_refused_unread(tmp_path, monkeypatch):
    """The cap on the header length (100 MB, the safetensors package's) holds for a file long enough to hold it."""
    path = str(tmp_path / "x.safetensors")
    open(path, "wb").write(st_bytes({"w": t("F32", [4], 0, 16)}, F32x4))
    assert torch.equal(pretrained.read_safetensors(path)["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    monkeypatch.setattr(pretrained, "ST_MAX_HEADER", 16)
    refused(lambda: pretrained.read_safetensors(path), "bytes, over the limit of 16")


def test_a_good_header_with_metadata_and_empty_tensors_reads(tmp_path):
    path = str(tmp_path / "x.safetensors")
    header = {"__metadata__": {"format": "pt"}, "e": t("F32", [0, 3], 0, 0), "w": t("F32", [2, 2], 0, 16)}
    open(path, "wb").write(st_bytes(header, F32x4))
    got = pretrained.read_safetensors(path)
    assert got["e"].shape == (0, 3) and torch.equal(got["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


# ---------------------------------------------------------------------------------------------------------
# Export folders


def test_export_weights_and_tokenizer_stay_inside_the_folder(world, tmp_path):
    """Both entries name files inside the export folder: an absolute path or a `..` (to a good file of another
    folder) is refused by name, as is an entry of the wrong type or naming no file."""
    other = os.path.join(world["run"], "export", "model.safetensors")
    cases = {"abs_weights": ({"weights": other}, "weights"),
             "dotdot_weights": ({"weights": "../export/model.safetensors"}, "weights"),
             "abs_tokenizer": ({"tokenizer": os.path.join(world["run"], "tokenizer.json")}, "tokenizer"),
             "dotdot_tokenizer": ({"tokenizer": "sub/../../run/tokenizer.json"}, "tokenizer")}
    for i, (case, (change, key)) in enumerate(cases.items()):
        folder = copy_export(world, tmp_path / str(i), **change)
        refused(lambda: pretrained.read_export(folder), f"{folder}/config.json: {key}", "not a name inside")
    folder = copy_export(world, tmp_path / "int", weights=3)
    refused(lambda: pretrained.read_export(folder), "config.json: weights is an int")
    folder = copy_export(world, tmp_path / "none", weights="weights.safetensors")
    refused(lambda: pretrained.read_export(folder), "weights 'weights.safetensors' is no file in the export folder")


def rewrite_header(path, change):
    """Rewrite a safetensors file's header with change(header) (the data left as it is)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    open(path, "wb").write(st_bytes(header, raw[8 + n:]))


def test_export_tensors_must_be_the_model_of_its_config(world, tmp_path):
    """F32 bytes labelled I32 (same size, so the header is valid), a tensor missing, a tensor of another shape:
    each refused naming the weights file and the key."""
    key = "text.word_embed.weight"
    folder = copy_export(world, tmp_path / "i32")
    weights = os.path.join(folder, "model.safetensors")
    rewrite_header(weights, lambda h: h[key].update(dtype="I32"))
    refused(lambda: pretrained.read_export(folder), f"{weights}: {key} is torch.int32", "model's is torch.float32")
    folder = copy_export(world, tmp_path / "missing")
    weights = os.path.join(folder, "model.safetensors")
    pretrained.write_safetensors({k: v for k, v in world["state"].items() if k != key}, weights)
    refused(lambda: pretrained.read_export(folder), f"{weights}: not the model", f"no {key}")
    folder = copy_export(world, tmp_path / "shape")
    weights = os.path.join(folder, "model.safetensors")
    pretrained.write_safetensors({**world["state"], key: world["state"][key][:-1]}, weights)
    refused(lambda: pretrained.read_export(folder), f"{weights}: {key} is torch.float32", "model's is torch.float32")


BAD_EXPORT_CONFIG = {  # case -> (model_config changes or a whole config.json, what the one line says)
    "width_a_string": ({"width": "32"}, "model_config.width is a string ('32'), not an int >= 1"),
    "zero_heads": ({"heads": 0}, "model_config.heads is an int (0), not an int >= 1"),
    "heads_not_dividing": ({"heads": 3}, "model_config describes no model"),
    "dropout_a_string": ({"dropout": "0.1"}, "model_config.dropout is a string ('0.1'), not a number"),
    "unknown_key": ({"depth": 2}, "model_config has the unknown key 'depth'"),
    "model_config_missing": (None, "model_config is null, not an object"),
    "step_a_string": ({"step": "3"}, "step is a string ('3')"),
    "train_config_a_list": ({"train_config": []}, "train_config is a list, not an object"),
    "not_json": (b"{format: xfm-export", "not valid JSON"),
    "a_list": (b"[]", "holds a list, not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORT_CONFIG))
def test_export_config_of_wrong_types_is_refused_by_key(world, tmp_path, case):
    change, reason = BAD_EXPORT_CONFIG[case]
    folder = copy_export(world, tmp_path)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    if isinstance(change, bytes):
        open(path, "wb").write(change)
    elif change is None:
        json.dump({k: v for k, v in config.items() if k != "model_config"}, open(path, "w"))
    elif set(change) <= {"step", "train_config"}:
        json.dump({**config, **change}, open(path, "w"))
    else:
        json.dump({**config, "model_config": {**config["model_config"], **change}}, open(path, "w"))
    refused(lambda: pretrained.read_export(folder), f"error: {path}: ", reason)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face config.json (--init_text, --init_vision)


ROBERTA = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
           "max_position_embeddings": 40, "pad_token_id": 1, "intermediate_size": 128}
BEIT = {"model_type": "beit", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
        "image_size": 32, "patch_size": 8, "intermediate_size": 128, "use_relative_position_bias": True}


def test_hf_config_of_wrong_types_is_refused_by_key(tmp_path):
    """Every size config.json gives is an int: a string, a missing key, zero heads or a null are refused with the
    file and the key (no KeyError, TypeError or ZeroDivisionError); a good config still gives the sizes."""
    folder = tmp_path / "hf"
    folder.mkdir()
    path = str(folder / "config.json")
    json.dump(ROBERTA, open(path, "w"))
    assert pretrained.text_config(str(folder))["max_text_len"] == 38
    for change, reason in (({"hidden_size": "32"}, "hidden_size is a string ('32'), not an int >= 1"),
                           ({"num_attention_heads": 0}, "num_attention_heads is an int (0), not an int >= 1"),
                           ({"vocab_size": None}, "vocab_size is null"),
                           ({"pad_token_id": True}, "pad_token_id is a boolean"),
                           ({"max_position_embeddings": 2}, "max_position_embeddings is an int (2), not an int >= 3"),
                           ({"num_hidden_layers": ...}, "no 'num_hidden_layers'")):
        json.dump({k: v for k, v in {**ROBERTA, **change}.items() if v is not ...}, open(path, "w"))
        refused(lambda: pretrained.text_config(str(folder)), f"error: {path}: {reason}")
    json.dump(BEIT, open(path, "w"))
    assert pretrained.vision_config(str(folder))["image_size"] == 32
    for change, reason in (({"image_size": "32"}, "image_size is a string"), ({"image_size": [0, 0]}, "image_size is "
                           "an int (0)"), ({"patch_size": 1.5}, "patch_size is a float")):
        json.dump({**BEIT, **change}, open(path, "w"))
        refused(lambda: pretrained.vision_config(str(folder)), f"error: {path}: {reason}")
    open(path, "w").write('{"hidden_size": 32,')
    refused(lambda: pretrained.text_config(str(folder)), f"error: {path}: not valid JSON")


def test_official_beit_file_of_wrong_shapes_is_refused_by_name(tmp_path):
    """An official BEiT .pth has no config: its sizes come off the tensor shapes, which must be those of a BEiT
    (a table of (2g-1)^2 + 3 rows per head, a 4-D patch embedding, an MLP 4 x the width). Refused naming the
    file (a ValueError; pretrained.model_config makes it the one line) rather than sized wrongly."""
    good = {"patch_embed.proj.weight": torch.zeros(32, 3, 8, 8), "blocks.0.mlp.fc1.weight": torch.zeros(128, 32),
            "rel_pos_bias.relative_position_bias_table": torch.zeros(52, 4), "blocks.1.norm1.weight": torch.ones(32)}
    path = str(tmp_path / "beit.pth")
    torch.save({"model": good}, path)
    assert pretrained.vision_config(path) == dict(width=32, heads=4, vision_layers=2, image_size=32, patch_size=8)
    for change, reason in (({"rel_pos_bias.relative_position_bias_table": torch.zeros(50, 4)}, "not ((2g-1)^2 + 3"),
                           ({"rel_pos_bias.relative_position_bias_table": torch.zeros(52, 0)}, "not ((2g-1)^2 + 3"),
                           ({"patch_embed.proj.weight": torch.zeros(32, 3, 8)}, "not (width, 3, p, p)"),
                           ({"blocks.0.mlp.fc1.weight": torch.zeros(64, 32)}, "not 4 x the width")):
        torch.save({"model": {**good, **change}}, path)
        with pytest.raises(ValueError, match=f"^{path}: .*{re.escape(reason)}"):
            pretrained.vision_config(path)


def test_a_pretrained_tensor_of_another_kind_is_refused():
    """Integers where the model holds floats (F32 bytes labelled I32) are no weights: refused with the key."""
    model = XFM(tiny_config(width=32, heads=2, embed_dim=16))
    ints = model.text.word_embed.weight.detach().view(torch.int32)
    with pytest.raises(ValueError, match=r"w is torch\.int32, but the model's text\.word_embed\.weight is "
                                         r"torch\.float32"):
        pretrained.apply_map(model, {"w": ints}, {"text.word_embed.weight": "w"}, {}, "x")


# ---------------------------------------------------------------------------------------------------------
# Torch files that are no checkpoint (train.py --resume, finetune.py --init, --init_vision)


def torch_bytes(obj, path):
    torch.save(obj, path)
    return open(path, "rb").read()


@pytest.fixture
def bad_torch_files(world, tmp_path):
    """case -> (path of a bad file, what the one line says)."""
    good = open(os.path.join(world["run"], "ckpt.pt"), "rb").read()
    ckpt = torch.load(os.path.join(world["run"], "ckpt.pt"), weights_only=True)
    zip_path = str(tmp_path / "zip.pt")
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("notes/a.txt", "hello")
    files = {"text_file": (b"this is a text file\n", "not a torch checkpoint (torch.load: "),
             "empty_file": (b"", "not a torch checkpoint (torch.load: EOFError)"),
             "cut_short": (good[:len(good) // 2], "not a torch checkpoint (torch.load: "),
             "other_global": (torch_bytes({"model": {}, "when": datetime.date(2024, 1, 1)}, tmp_path / "g.pt"),
                              "GLOBAL datetime.date"),
             "a_list": (torch_bytes([torch.zeros(1)], tmp_path / "l.pt"), "holds a list"),
             "no_model": (torch_bytes({"state_dict": ckpt["model"]}, tmp_path / "n.pt"), 'no state dict under "model"'),
             "model_a_tensor": (torch_bytes({"model": torch.zeros(1)}, tmp_path / "t.pt"), 'under "model"'),
             "step_a_string": (torch_bytes({**ckpt, "step": "3"}, tmp_path / "s.pt"), "step is a string"),
             "model_config_a_string": (torch_bytes({**ckpt, "model_config": "tiny"}, tmp_path / "c.pt"),
                                       "model_config is a string, not an object"),
             "tensor_missing": (torch_bytes({**ckpt, "model": {k: v for k, v in ckpt["model"].items()
                                                              if k != "temp"}}, tmp_path / "m.pt"), "no temp")}
    out = {"zip_of_other_files": (zip_path, "not a torch checkpoint (torch.load: RuntimeError")}
    for case, (raw, reason) in files.items():
        path = str(tmp_path / f"{case}.pt")
        open(path, "wb").write(raw)
        out[case] = (path, reason)
    return out


def test_not_a_checkpoint_is_refused_by_name(bad_torch_files):
    for case, (path, reason) in bad_torch_files.items():
        refused(lambda: runlog.load_checkpoint(path, "cpu"), f"error: {path}: ", reason)
    for case in ("text_file", "zip_of_other_files", "other_global", "a_list"):   # --init_vision's .pth reader
        path, reason = bad_torch_files[case]
        refused(lambda: pretrained.read_state_dict(path), f"error: {path}: ", reason)


def test_resume_and_init_refuse_bad_files_before_any_work(world, bad_torch_files, tmp_path):
    """The command lines: train.py --resume and finetune.py --init stop with the one line, writing nothing."""
    path, reason = bad_torch_files["text_file"]
    out = tmp_path / "out"
    refused(lambda: train.main([f"--resume={path}", f"--out_dir={out}"]), path, reason)
    path, reason = bad_torch_files["no_model"]
    refused(lambda: finetune.main(["--task=textcls", f"--init={path}", f"--out_dir={out}"]), path, reason)
    folder = copy_export(world, tmp_path / "tok")
    open(os.path.join(folder, "tokenizer.json"), "w").write('{"model": {"type": "BPE", "vocab": 3}}')
    refused(lambda: finetune.main(["--task=textcls", f"--init={folder}", f"--out_dir={out}"]),
            f"error: {folder}/tokenizer.json: not a tokenizer.json of the tokenizers library")
    assert not out.exists()


def test_garbage_tokenizer_is_refused_by_name(world, tmp_path):
    good = open(os.path.join(world["run"], "tokenizer.json"), encoding="utf-8").read()
    specials = json.loads(good)
    specials["added_tokens"] = [a for a in specials["added_tokens"] if a["content"] != "<mask>"]
    del specials["model"]["vocab"]["<mask>"]
    for name, raw, reason in (("garbage", b"\x00\x01garbage", "not a tokenizer.json of the tokenizers library"),
                              ("latin1", good.encode().replace(b'"1.0"', b'"1.0\xe9"', 1), "cannot be read as UTF-8"),
                              ("list", b"[1, 2]", "not a tokenizer.json of the tokenizers library"),
                              ("no_mask", json.dumps(specials).encode(), "lacks special tokens ['<mask>']")):
        path = str(tmp_path / f"{name}.json")
        open(path, "wb").write(raw)
        refused(lambda: tokenizer.Tokenizer.load(path), f"error: {path}: ", reason)
    refused(lambda: tokenizer.Tokenizer.load(str(tmp_path / "none.json")), "no tokenizer at")
