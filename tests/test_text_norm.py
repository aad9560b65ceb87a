"""Tests for the official X-FM text normalisation (lib/tokenizer.normalize_text, docs/METHOD.md §10.1): its rules
on hand-written strings, off by default, applied alike to captions, questions and retrieval queries (never to
documents) by the tokenizer that carries it, and kept through tokenizer.json, checkpoints and resumes.
Run: python -m pytest tests/test_text_norm.py -q   (CPU, a few seconds)"""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402
from lib import formats, retrieval, runlog, tokenizer  # noqa: E402
from lib.tokenizer import normalize_text  # noqa: E402

SENTS = ["A Red-Circle left of a blue square.", "there are two shapes: a green cross and a yellow triangle",
         "Is the small purple diamond at the top?", "an orange circle/above a red square (big)"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tokenizer trained as every fresh run trains one: normalisation off."""
    return tokenizer.Tokenizer.train(SENTS * 3, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def normed(plain):
    """The same vocabulary with the normalisation on."""
    return tokenizer.Tokenizer.from_json(plain.to_json(), text_norm=True)


# ---------------------------------------------------------------------------------------------------------
# The rules, one at a time


def test_lowercases():
    assert normalize_text("A RED Circle ÄÖ") == "a red circle äö"


@pytest.mark.parametrize("char", list(",.'!?\"()*#:;~") + ["-", "/"])
def test_each_punctuation_mark_becomes_a_space(char):
    assert normalize_text(f"red{char}circle") == "red circle"
    assert normalize_text(f"red {char}{char} circle{char}") == "red circle"


def test_other_characters_stay():
    assert normalize_text("a&b <person> x_y+z=2 50% [c] @d") == "a&b <person> x_y+z=2 50% [c] @d"


def test_whitespace_is_collapsed_and_stripped():
    assert normalize_text("  a \t red\n\ncircle   ") == "a red circle"
    assert normalize_text(" ... ") == "" and normalize_text("") == ""


def test_cut_to_thirty_words():
    words = [f"w{i}" for i in range(40)]
    assert tokenizer.MAX_WORDS == 30
    assert normalize_text(" ".join(words)) == " ".join(words[:30])
    assert normalize_text(" ".join(words[:30])) == " ".join(words[:30])              # 30 words: all kept
    assert normalize_text("-".join(words)) == " ".join(words[:30])                   # counted after the marks
    assert normalize_text(" ".join(words), max_words=None) == " ".join(words)


# ---------------------------------------------------------------------------------------------------------
# A property of the tokenizer: off by default, applied by every caller of encode, kept in tokenizer.json


def test_off_by_default_a_fresh_tokenizer_encodes_as_the_library_does(plain, tmp_path):
    raw = plain.hf.encode("A Red-Circle.", add_special_tokens=False).ids
    assert not plain.text_norm and plain.encode("A Red-Circle.", 30) == [plain.cls_id, *raw, plain.sep_id]
    assert plain.encode("A Red-Circle.", 30) != plain.encode("a red circle", 30)
    assert json.loads(plain.to_json())["version"]                          # the library's own JSON, no wrapper
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("\n".join(SENTS) + "\n")
    fresh = tokenizer.get_tokenizer(str(data), str(tmp_path / "run"), 300)
    assert not fresh.text_norm and not tokenizer.Tokenizer.load(str(tmp_path / "run" / "tokenizer.json")).text_norm
    assert not train.TrainConfig().text_norm and not finetune.FinetuneConfig().text_norm


def test_on_a_caption_a_question_and_a_retrieval_query_are_normalised_alike(plain, normed, tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    text = "A Red-Circle, LEFT of the (blue) square?!"
    want = plain.encode(normalize_text(text), 30)
    assert want == normed.encode(text, 30) != plain.encode(text, 30)
    dc = D.DataConfig(image_size=16, patch_size=8, caption_len=30, crop_scale=(1.0, 1.0), hflip=False)
    caption = D.PairDataset([{"image": str(img), "caption": text}], normed, dc, formats.BadInput(verbose=False))
    assert caption[(0, 0)]["ids"] == want
    region = D.RegionDataset([{"image": str(img), "size": (16, 16), "captions": [text],
                               "regions": [{"box": [0, 0, 8, 8], "captions": [text]}]}],
                             normed, dc, formats.BadInput(verbose=False))
    assert [s["ids"] for s in region[(0, 0)]["texts"]] == [want, want]
    assert finetune.tokens(normed, text, None, 30) == want                                 # a VQA question
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": str(img), "caption": text}) + "\n")
    rs = retrieval.load_retrieval_set(str(tmp_path / "test.jsonl"), normed, 16, 30, formats.BadInput(verbose=False))
    assert rs["ids"][0, :len(want)].tolist() == want                                       # a retrieval query


def test_documents_are_never_normalised(plain, normed):
    text = "A Red-Circle, LEFT of the (blue) square?!"
    raw = plain.encode(text, 64)
    assert normed.encode(text, 64, document=True) == raw
    assert finetune.tokens(normed, text, text, 64, document=True) == finetune.tokens(plain, text, text, 64)
    dc = D.DataConfig(image_size=16, patch_size=8, text_len=64)
    doc = D.TextDataset([text], normed, dc, formats.BadInput(verbose=False))[(0, 0)]
    assert [t if y == -100 else y for t, y in zip(doc["ids"], doc["labels"])] == raw  # unmasked: the raw text


def test_it_survives_save_and_load_of_tokenizer_json(plain, normed, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    normed.save(path)
    again = tokenizer.Tokenizer.load(path)
    assert again.text_norm and again.encode(SENTS[0], 30) == normed.encode(SENTS[0], 30)
    assert tokenizer.Tokenizer.from_json(normed.to_json()).text_norm                 # what ranks and checkpoints get
    assert not tokenizer.Tokenizer.load(path, text_norm=False).text_norm             # an explicit choice wins
    plain.save(str(tmp_path / "plain.json"))
    official = tokenizer.for_official_weights(str(tmp_path / "plain.json"))          # the converter's one call
    assert official.text_norm and official.encode(SENTS[0], 30) == normed.encode(SENTS[0], 30)
    run = tmp_path / "run"
    loaded = tokenizer.get_tokenizer("", str(run), 300, str(tmp_path / "plain.json"), text_norm=True)
    assert loaded.text_norm                                                          # --tokenizer with --text_norm
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("\n".join(SENTS) + "\n")
    fresh = tokenizer.get_tokenizer(str(data), str(run), 1000, text_norm=True)     # every merge: "ĠRed" if raw
    assert fresh.text_norm and tokenizer.Tokenizer.load(str(run / "tokenizer.json")).text_norm
    assert "Ġred" in fresh.hf.get_vocab() and "ĠRed" not in fresh.hf.get_vocab()  # it learnt the normalised texts
    bad = json.loads(normed.to_json())
    bad["text_norm"] = "other"
    with pytest.raises(SystemExit, match="text_norm wrapper needs"):
        tokenizer.Tokenizer.from_json(json.dumps(bad), "bad.json")


def test_a_resume_keeps_the_runs_normalisation(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    ckpt = {"train_config": vars(train.TrainConfig()), "model_config": {"max_text_len": 64}, "step": 2}
    with pytest.raises(SystemExit, match=r"--text_norm=True \(the run has text_norm=False\)"):
        runlog.check_resume(run, ckpt, {"resume": run, "text_norm": True}, train.TrainConfig,
                            train.RESUME_MAY_CHANGE)


def test_train_py_text_norm_reaches_the_runs_tokenizer(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("\n".join(SENTS) + "\n")
    for on in (False, True):
        cfg = train.TrainConfig(data_dir=str(data), out_dir=str(tmp_path / f"run{on}"), vocab_size=300, text_norm=on)
        tok = runlog.shared_tokenizer(cfg, None, False, 0)
        assert tok.text_norm == on == tokenizer.Tokenizer.load(os.path.join(cfg.out_dir, "tokenizer.json")).text_norm
