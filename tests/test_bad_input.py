"""Bad input, reader by reader: every text-bearing reader (data.py's text, pairs, regions, image lists and the
retrieval set; finetune.py's task files and per-task records) names each bad line or record with file:line,
skips it, counts it in formats.BadInput and refuses it under strict, while every good record still arrives. Text
that is not UTF-8 is one more kind of bad input; a whole file in another encoding is one error with the fix.
Run: python -m pytest tests/test_bad_input.py -q   (CPU, about half a minute)"""
import json
import os
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
from PIL import Image

from lib import tokenizer
from lib import formats
import finetune
import train
from lib import toyworld
from lib import retrieval

LATIN1 = "café au lait".encode("latin-1")  # b"caf\xe9 au lait": not UTF-8


def images(d, n=3, size=32):
    (d / "img").mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 100, 200)).save(d / "img" / f"{i}.png")


def write_lines(path, lines):
    """Lines given as str (written as UTF-8), bytes (written as they are) or dicts (JSON)."""
    with open(path, "wb") as f:
        for x in lines:
            x = json.dumps(x) if isinstance(x, (dict, list)) else x
            f.write((x.encode() if isinstance(x, str) else x) + b"\n")


def jsonl_bytes(record, field, raw):
    """A JSON line whose `field` holds the raw bytes `raw` (which json.dumps could not write)."""
    return json.dumps(dict(record, **{field: "@@"})).encode().replace(b"@@", raw)


def quiet():
    return formats.BadInput(verbose=False)


def said(bad):
    return "\n".join(bad.messages)


# ---------------------------------------------------------------------------------------------------------
# data.py readers


def test_text_txt(tmp_path):
    p = tmp_path / "text.txt"
    write_lines(p, [b"\xef\xbb\xbfa red circle",         # 1 ok, after a UTF-8 byte order mark
                    LATIN1,                              # 2 Latin-1
                    "",                                  # 3 blank: allowed
                    b"a \x93quoted\x94 square",          # 4 Windows-1252 quotes
                    "a blue square",                     # 5 ok
                    "a caf\u00e9 in UTF-8"])             # 6 ok
    bad = quiet()
    assert formats.parse_texts(str(p), bad) == ["a red circle", "a blue square", "a caf\u00e9 in UTF-8"]
    assert bad.counts() == {"not UTF-8": 2}
    assert f"{p}:2: not UTF-8 (byte 0xe9 at column 4: 'caf\\xe9 au lait') - skipped" in said(bad)
    assert f"{p}:4: not UTF-8 (byte 0x93 at column 3" in said(bad)
    with pytest.raises(ValueError, match=r"text\.txt:2: not UTF-8"):
        formats.parse_texts(str(p), formats.BadInput(strict=True))


def test_text_jsonl(tmp_path):
    p = tmp_path / "text.jsonl"
    write_lines(p, [{"text": "a red circle"},                       # 1 ok
                    jsonl_bytes({}, "text", LATIN1),                # 2 not UTF-8
                    {"text": 42},                                   # 3 not a string
                    {"text": "  "},                                 # 4 empty
                    {"words": "a circle"},                          # 5 no text field
                    '{"text": "unclosed',                           # 6 malformed JSON
                    '["a", "list"]',                                # 7 not an object
                    '{"text": "a broken \\ud800 escape"}',          # 8 a lone surrogate: no tokenizer takes it
                    {"text": "a blue square"}])                     # 9 ok
    bad = quiet()
    assert formats.parse_texts(str(p), bad) == ["a red circle", "a blue square"]
    assert bad.counts() == {"not UTF-8": 2, "malformed record": 3, "empty text": 1, "malformed JSON": 1}
    for line in (f"{p}:2: not UTF-8 (byte 0xe9", f"{p}:3: malformed record (text is an int, not a string)",
                 f"{p}:4: empty text (text is empty)", f"{p}:5: malformed record (no 'text' field)",
                 f"{p}:6: malformed JSON", f"{p}:7: malformed record (expected a JSON object, got a list)",
                 f"{p}:8: not UTF-8 (a broken \\u escape"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"text\.jsonl:2: not UTF-8"):
        formats.parse_texts(str(p), formats.BadInput(strict=True))


def bad_pairs(d):
    images(d)
    ok = {"image": "img/0.png"}
    write_lines(d / "pairs.jsonl", [
        dict(ok, caption="a red square"),                           # 1 ok
        jsonl_bytes(ok, "caption", LATIN1),                         # 2 not UTF-8
        dict(ok, caption=42),                                       # 3 not a string
        dict(ok, caption=""),                                       # 4 empty
        dict(ok),                                                   # 5 no caption
        {"image": 7, "caption": "a number for a path"},             # 6 image not a string
        {"image": "img/missing.png", "caption": "a ghost"},         # 7 missing image
        '{"image": "img/0.png", "caption": ',                       # 8 malformed JSON
        '"just a string"',                                          # 9 not an object
        {"image": "img/1.png", "caption": ["a green square", None, "another green square"]},  # 10 one of 3 bad
        dict(ok, caption=[]),                                       # 11 an empty list
        {"image": "img/2.png", "caption": "a blue square"}])        # 12 ok
    return d / "pairs.jsonl"


def test_pairs_jsonl(tmp_path):
    p = bad_pairs(tmp_path)
    bad = quiet()
    pairs = formats.parse_pairs(str(p), bad)
    assert [(x["caption"], x["where"]) for x in pairs] == [
        ("a red square", f"{p}:1"), ("a green square", f"{p}:10"), ("another green square", f"{p}:10"),
        ("a blue square", f"{p}:12")]
    assert bad.counts() == {"not UTF-8": 1, "malformed record": 5, "empty caption": 2, "missing image": 1,
                            "malformed JSON": 1}
    for line in (f"{p}:2: not UTF-8 (byte 0xe9", f"{p}:3: malformed record (caption is an int, not a string)",
                 f"{p}:4: empty caption (caption is empty)", f"{p}:5: malformed record (no 'caption' field)",
                 f"{p}:6: malformed record (image is an int, not a string)", f"{p}:7: missing image",
                 f"{p}:8: malformed JSON", f"{p}:9: malformed record (expected a JSON object, got a string)",
                 f"{p}:10: malformed record (caption[1] is null, not a string)",
                 f"{p}:11: empty caption (caption is an empty list)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: not UTF-8"):
        formats.parse_pairs(str(p), formats.BadInput(strict=True))


def test_pairs_json_list_skips_the_records_that_are_not_utf8(tmp_path):
    images(tmp_path)
    p = tmp_path / "pairs.json"
    good = [{"image": "img/0.png", "caption": "a red square"}, {"image": "img/1.png", "caption": "a green one"}]
    p.write_bytes(json.dumps([good[0], {"image": "img/1.png", "caption": "@@"}, good[1]]).encode()
                  .replace(b"@@", LATIN1))
    bad = quiet()
    assert [x["caption"] for x in formats.parse_pairs(str(p), bad)] == ["a red square", "a green one"]
    assert bad.counts() == {"not UTF-8": 1} and f"{p}[1]: not UTF-8 (byte 0xe9: 'caf\\xe9 au lait')" in said(bad)
    with pytest.raises(ValueError, match=r"pairs\.json\[1\]: not UTF-8"):
        formats.parse_pairs(str(p), formats.BadInput(strict=True))
    # a .json list that is mostly not UTF-8 is a file in another encoding: one error, with the fix
    p.write_bytes(json.dumps([{"image": "img/0.png", "caption": "café"}] * 3, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(SystemExit, match=r"pairs\.json is not UTF-8: 3 of its 3 records fail to decode.*\n"
                                         r".*Latin-1.*\n *iconv -f latin1 -t utf-8"):
        formats.parse_pairs(str(p), quiet())
    # not JSON at all once read as UTF-8 (UTF-16): the same one error, not "malformed JSON"
    p.write_bytes(json.dumps(good).encode("utf-16"))
    with pytest.raises(SystemExit, match=r"pairs\.json is not UTF-8: it is no JSON.*\n.*UTF-16"):
        formats.parse_pairs(str(p), quiet())


def test_regions_jsonl(tmp_path):
    images(tmp_path)
    p = tmp_path / "regions.jsonl"
    box = {"box": [2, 2, 10, 10], "caption": "a corner"}
    region_latin1 = json.dumps({"image": "img/0.png", "regions": [box, {"box": [4, 4, 8, 8], "caption": "@@"}]})
    write_lines(p, [
        {"image": "img/0.png", "caption": "an image", "regions": [box]},               # 1 ok
        region_latin1.encode().replace(b"@@", LATIN1),                                  # 2 a region caption in Latin-1
        {"image": "img/0.png", "regions": [box, {"box": [1, 1, -4, 5], "caption": "negative"},   # 3 two bad boxes
                                           {"box": [0, 0, 0, 0], "caption": "zero"}]},
        '{"image": "img/1.png", "regions": [{"box": [1, 2, NaN, 4], "caption": "nan"}]}',  # 4 NaN box, none left
        {"image": "img/1.png", "regions": "a string, read letter by letter"},           # 5 regions not a list
        {"image": "img/1.png", "regions": ["a string", dict(box, caption=3)]},          # 6 bad region, bad caption
        {"image": "img/2.png", "caption": 5, "regions": [box]},                         # 7 caption an int: record kept
        [1, 2, 3]])                                                                     # 8 not an object
    bad = quiet()
    recs = formats.parse_regions(str(p), bad)
    assert [(r["where"], len(r["regions"]), r["captions"]) for r in recs] == [
        (f"{p}:1", 1, ["an image"]), (f"{p}:3", 1, []), (f"{p}:7", 1, [])]
    assert bad.counts() == {"not UTF-8": 1, "bad box": 3, "no regions": 2, "malformed record": 5}
    for line in (f"{p}:2: not UTF-8 (byte 0xe9", f"{p}:3 region 1: bad box (box [1, 1, -4, 5] has w or h <= 0)",
                 f"{p}:3 region 2: bad box", f"{p}:4 region 0: bad box (box [1, 2, nan, 4] is not [x, y, w, h]",
                 f"{p}:4: no regions", f"{p}:5: malformed record (regions is a string, not a list)",
                 f"{p}:6 region 0: malformed record (region is a string, not an object)",
                 f"{p}:6 region 1: malformed record (caption is an int, not a string)",
                 f"{p}:7: malformed record (caption is an int, not a string)",
                 f"{p}:8: malformed record (expected a JSON object, got a list)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"regions\.jsonl:2: not UTF-8"):
        formats.parse_regions(str(p), formats.BadInput(strict=True))


def test_images_jsonl(tmp_path):
    images(tmp_path)
    p = tmp_path / "images.jsonl"
    write_lines(p, [{"image": "img/0.png"}, b'{"image": "img/' + LATIN1 + b'.png"}', {"image": "img/none.png"},
                    {"image": ["img/1.png"]}, {}, {"image": "img/2.png"}])
    bad = quiet()
    assert [x["where"] for x in formats.parse_images(str(p), bad)] == [f"{p}:1", f"{p}:6"]
    assert bad.counts() == {"not UTF-8": 1, "missing image": 1, "malformed record": 2}
    for line in (f"{p}:2: not UTF-8", f"{p}:3: missing image", f"{p}:4: malformed record (image is a list, not",
                 f"{p}:5: malformed record (no 'image' field)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"images\.jsonl:2: not UTF-8"):
        formats.parse_images(str(p), formats.BadInput(strict=True))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["a red square", "a green square", "a blue square", "what colour is the shape", "net mesh"] * 4
    return tokenizer.Tokenizer.train(texts, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_retrieval_set(tmp_path, tok):
    p = bad_pairs(tmp_path)
    bad = quiet()
    rs = retrieval.load_retrieval_set(str(p), tok, 32, 16, bad)
    assert len(rs["image"]) == 3 and rs["ids"].shape[0] == 4 and rs["img2txt"] == [[0], [1, 2], [3]]
    assert bad.counts()["not UTF-8"] == 1 and f"{p}:2: not UTF-8" in said(bad)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: not UTF-8"):
        retrieval.load_retrieval_set(str(p), tok, 32, 16, formats.BadInput(strict=True))


@pytest.mark.parametrize("encoding, line, named, command", [
    ("latin-1", "un caf\u00e9 num\u00e9ro", "Latin-1", "iconv -f latin1 -t utf-8"),
    ("cp1252", "\u201cun caf\u00e9\u201d", "Windows-1252", "iconv -f cp1252 -t utf-8"),  # curly quotes: 0x93 0x94
    ("utf-16", "a plain line", "UTF-16", "iconv -f utf-16 -t utf-8")])
def test_a_file_in_another_encoding_is_one_error_with_the_fix(tmp_path, encoding, line, named, command):
    p = tmp_path / "text.txt"
    p.write_bytes("".join(f"{line} {i}\n" for i in range(1000)).encode(encoding))
    bad = quiet()
    with pytest.raises(SystemExit) as e:
        formats.parse_texts(str(p), bad)
    msg = str(e.value)
    assert msg.startswith(f"error: {p} is not UTF-8: its first 10 lines fail to decode (line 1: ")
    assert f"It is likely {named}" in msg and f"{command} {p} > {p}.utf8 && mv {p}.utf8 {p}" in msg
    assert bad.messages == [] and bad.counts() == {}  # one error, not a warning per line
    # a file that only later turns out mostly undecodable: the warnings so far, then the same error
    p.write_bytes(b"a red square\n" + b"".join(LATIN1 + b" %d\n" % i for i in range(30)))
    with pytest.raises(SystemExit, match=r"30 of its 31 lines fail to decode \(line 2: byte 0xe9"):
        formats.parse_texts(str(p), bad)
    assert len(bad.messages) == 11 and "counted, not printed" in bad.messages[-1]


def test_check_command_reports_each_kind(tmp_path, capsys):
    bad_pairs(tmp_path)
    write_lines(tmp_path / "text.txt", ["a red square", LATIN1])
    bad = formats.check(str(tmp_path))
    out = capsys.readouterr().out
    assert "bad input: 1 empty caption" not in out and bad.counts()["not UTF-8"] == 2
    assert "2 empty caption, 1 malformed JSON, 5 malformed record, 1 missing image, 2 not UTF-8" in out


# ---------------------------------------------------------------------------------------------------------
# finetune.py: the task files (formats.read_task_file) and each task's records


def ft_cfg(**kw):
    cfg, _ = finetune.parse_args([])
    return replace(cfg, **kw)


def test_finetune_jsonl_tsv_karpathy_and_imagefolder(tmp_path):
    images(tmp_path)
    bad = quiet()
    # JSONL: the shared reader, plus image fields that are not paths
    p = tmp_path / "vqa.jsonl"
    write_lines(p, [{"image": "img/0.png", "question": "q", "answer": "a"}, jsonl_bytes({"image": "img/0.png"},
                    "question", LATIN1), {"image": 3, "question": "q"}, {"images": "img/0.png img/1.png"},
                    {"images": ["img/0.png", None]}, {"images": ["img/0.png", "img/1.png"]}])
    recs = formats.read_task_file(str(p), "train", ft_cfg(), bad)
    assert [r["where"] for r in recs] == [f"{p}:1", f"{p}:6"] and recs[1]["images"][1].endswith("1.png")
    assert bad.counts() == {"not UTF-8": 1, "malformed record": 3}
    for line in (f"{p}:2: not UTF-8 (byte 0xe9", f"{p}:3: malformed record (image is an int, not a path)",
                 f"{p}:4: malformed record (images is a string, not a list of paths)",
                 f"{p}:5: malformed record (images[1] is null, not a path)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"vqa\.jsonl:2: not UTF-8"):
        formats.read_task_file(str(p), "train", ft_cfg(), formats.BadInput(strict=True))

    # GLUE TSV: a row in Latin-1, a row with a column missing
    t = tmp_path / "train.tsv"
    write_lines(t, ["sentence\tlabel", "a fine sentence\t1", LATIN1 + b"\t0", "a lost label", "another one\t0"])
    bad = quiet()
    assert [(r["sentence"], r["where"]) for r in formats.read_task_file(str(t), "train", ft_cfg(), bad)] == [
        ("a fine sentence", f"{t}:2"), ("another one", f"{t}:5")]
    assert bad.counts() == {"not UTF-8": 1, "malformed record": 1}
    assert f"{t}:3: not UTF-8" in said(bad) and f"{t}:4: malformed record (1 columns, the header has 2)" in said(bad)
    write_lines(t, [b"sentence\tlab" + LATIN1, "a sentence\t1", "another\t0"])  # the header lost: no row readable
    with pytest.raises(SystemExit, match=r"train\.tsv: the header row is not UTF-8"):
        formats.read_task_file(str(t), "train", ft_cfg(), quiet())
    with pytest.raises(ValueError, match=r"train\.tsv:3: not UTF-8"):
        write_lines(t, ["sentence\tlabel", "a fine sentence\t1", LATIN1 + b"\t0"])
        formats.read_task_file(str(t), "train", ft_cfg(), formats.BadInput(strict=True))

    # Karpathy JSON: an image whose sentence is in Latin-1, one malformed, one of another split
    k = tmp_path / "dataset_coco.json"
    ims = [{"filepath": "img", "filename": f"{i}.png", "split": "test", "sentences": [{"raw": f"caption {i}"}]}
           for i in range(3)]
    ims[1]["sentences"][0]["raw"] = "@@"
    ims.append({"filename": "0.png", "split": "test"})
    ims.append({"filepath": "img", "filename": "2.png", "split": "train", "sentences": [{"raw": "@@"}]})
    k.write_bytes(json.dumps({"images": ims}).encode().replace(b"@@", LATIN1))
    bad = quiet()
    recs = formats.read_task_file(str(k), "test", ft_cfg(), bad)
    assert [r["caption"] for r in recs] == [["caption 0"], ["caption 2"]]
    assert bad.counts() == {"not UTF-8": 1, "malformed record": 1}
    assert f"{k}[images][1]: not UTF-8 (byte 0xe9" in said(bad) and f"{k}[images][3]: malformed record" in said(bad)
    with pytest.raises(ValueError, match=r"dataset_coco\.json\[images\]\[1\]: not UTF-8"):
        formats.read_task_file(str(k), "test", ft_cfg(), formats.BadInput(strict=True))

    # ImageFolder: a class folder whose name is not UTF-8
    f = tmp_path / "folder"
    for name in (b"circle", b"caf\xe9", b"square"):
        os.makedirs(os.path.join(os.fsencode(f), name))
        shutil.copy(tmp_path / "img" / "0.png", os.path.join(os.fsencode(f), name, b"0.png"))
    bad = quiet()
    assert [r["label"] for r in formats.read_task_file(str(f), "train", ft_cfg(), bad)] == ["circle", "square"]
    assert bad.counts() == {"not UTF-8": 1} and f"{f}: not UTF-8 (a class folder's name: byte 0xe9" in said(bad)
    with pytest.raises(ValueError, match=r"folder: not UTF-8"):
        formats.read_task_file(str(f), "train", ft_cfg(), formats.BadInput(strict=True))


def run_records(task, tmp_path, tok, monkeypatch, train_recs, test_recs, strict=False):
    """Run finetune's `task` on these records up to the model: -> (training records, BadInput, what fit got).
    build_model and fit are stubbed out, so no checkpoint is needed."""
    images(tmp_path)
    for split, recs in (("train", train_recs), ("test", test_recs)):
        write_lines(tmp_path / f"{task}_{split}.jsonl", recs)
    cfg = ft_cfg(task=task, epochs=1, image_size=32, text_len=16, train_file=str(tmp_path / f"{task}_train.jsonl"),
                 test_file=str(tmp_path / f"{task}_test.jsonl"), image_root=str(tmp_path))
    env = SimpleNamespace(master=True, meta=None, tok=tok, mcfg=SimpleNamespace(width=8, recipe="xfm"),
                          bad=formats.BadInput(strict=strict, verbose=False))
    got = {}
    splits = finetune.splits
    monkeypatch.setattr(finetune, "splits", lambda *a, **k: (lambda s: got.update(bad=s[2]) or s)(splits(*a, **k)))
    monkeypatch.setattr(finetune, "build_model", lambda *a, **k: None)
    monkeypatch.setattr(finetune, "fit", lambda cfg, env, model, train_set, evaluate, out, meta:
                        got.update(train_set=train_set, meta=meta))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    finetune.RUNNERS[task](cfg, env, str(out))
    return got["train_set"], got["bad"], got


def test_vqa_answer_lists_are_votes_and_unknown_shapes_are_counted_skips(tmp_path, tok, monkeypatch):
    q = {"image": "img/0.png", "question": "what is it?"}
    train_recs = [dict(q, answer=["net", "net", "mesh"]),                                # 1 ALBEF: votes
                  dict(q, answer="net"),                                                 # 2 one answer
                  dict(q, answers=[{"answer": "net", "answer_id": 1}, {"answer": "mesh", "answer_id": 2}]),  # 3 VQAv2
                  dict(q, answers=["mesh", "mesh"]),                                     # 4 answers: a list
                  dict(q, answer=3),                                                     # 5 not a string
                  dict(q, answer=["net", 4]),                                            # 6 a number among votes
                  dict(q, answer={"text": "net"}),                                       # 7 an object
                  dict(q, answer=[]),                                                    # 8 no vote
                  {"image": "img/0.png", "answer": "net"},                               # 9 no question
                  dict(q),                                                               # 10 no answer
                  {"question": "where?", "answer": "net"},                               # 11 no image
                  dict(q, question="", answer="net")]                                    # 12 empty question
    ds, bad, got = run_records("vqa", tmp_path, tok, monkeypatch, train_recs, [dict(q, answer="net")])
    assert sorted(got["meta"]["answers"]) == ["mesh", "net"]  # never a class named "['net', 'net', 'mesh']"
    assert [r["where"].rsplit(":", 1)[1] for r in ds.records] == ["1", "2", "3", "4"]
    net, mesh = got["meta"]["answers"].index("net"), got["meta"]["answers"].index("mesh")
    t = ds[0]["target"]
    assert t[net] == pytest.approx(2 / 3) and t[mesh] == pytest.approx(1 / 3)  # VQA score min(1, votes / 3)
    assert bad.counts() == {"malformed record": 7, "empty text": 1}
    p = tmp_path / "vqa_train.jsonl"
    for line in (f"{p}:5: malformed record (answer is an int, not a string (or a list of strings))",
                 f"{p}:6: malformed record (answer[1] is an int, not a string",
                 f"{p}:7: malformed record (answer is an object, not a string", f"{p}:8: malformed record (answer is an empty list)",
                 f"{p}:9: malformed record (no 'question' field)", f"{p}:10: malformed record (no 'answer' or 'answers' field)",
                 f"{p}:11: malformed record (no 'image' field)", f"{p}:12: empty text (question is empty)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"vqa_train\.jsonl:5: malformed record"):
        run_records("vqa", tmp_path, tok, monkeypatch, train_recs, [dict(q, answer="net")], strict=True)


def test_textcls_labels_of_the_wrong_kind_and_missing_fields_are_counted_skips(tmp_path, tok, monkeypatch):
    train_recs = [{"text": "a red square", "label": 1}, {"text": "a blue square", "label": "0"},
                  {"text": "typo", "label": "positive"},    # 3 a name among numbers: not a new class
                  {"text": "no label"},                     # 4
                  {"text": "null label", "label": None},    # 5
                  {"text": 5, "label": 1},                  # 6 the text is a number
                  {"text": "list label", "label": [1]},     # 7
                  {"text": "a green square", "label": True}]
    ds, bad, got = run_records("textcls", tmp_path, tok, monkeypatch, train_recs, train_recs[:2])
    assert got["meta"]["labels"] == [0, 1] and [ds[i]["label"].item() for i in range(len(ds))] == [1, 0, 1]
    assert bad.counts() == {"malformed record": 5}
    p = tmp_path / "textcls_train.jsonl"
    for line in (f"{p}:3: malformed record (label 'positive' is not a number, unlike most labels",
                 f"{p}:4: malformed record (no 'label' field)", f"{p}:5: malformed record (label is null, not a label)",
                 f"{p}:6: malformed record (text is an int, not a string)",
                 f"{p}:7: malformed record (label is a list, not a label)"):
        assert line in said(bad), line
    # class names: a number among them is the odd one out
    names = [{"text": "x", "label": "neutral"}, {"text": "y", "label": "entailment"}, {"text": "z", "label": 2}]
    ds, bad, got = run_records("textcls", tmp_path, tok, monkeypatch, names, names[:1])
    assert got["meta"]["labels"] == ["entailment", "neutral"] and "label 2 is a number, unlike" in said(bad)


def test_nlvr_grounding_imgcls_and_retrieval_records(tmp_path, tok, monkeypatch):
    two = ["img/0.png", "img/1.png"]
    nlvr = [{"images": two, "sentence": "s", "label": "True"}, {"images": two, "sentence": "s", "label": False},
            {"images": two, "sentence": "s", "label": "maybe"}, {"images": two[:1], "sentence": "s", "label": 1},
            {"images": two, "label": 1}, {"images": two, "sentence": "s", "label": 2}]
    ds, bad, _ = run_records("nlvr", tmp_path, tok, monkeypatch, nlvr, nlvr[:1])
    assert [ds[i]["label"].item() for i in range(len(ds))] == [1, 0] and bad.counts() == {"malformed record": 4}
    for line in (":3: malformed record (label 'maybe' is not true/false or 1/0)",
                 ":4: malformed record (needs 'images': [left, right])", ":5: malformed record (no 'sentence' field)",
                 ":6: malformed record (label 2 is not true/false"):
        assert line in said(bad), line

    g = {"image": "img/0.png", "phrase": "the red square"}
    grounding = [dict(g, box=[2, 2, 10, 10]), {"image": "img/0.png", "text": "a box", "bbox": [0, 0, 5, 5]},
                 dict(g, box=[2, 2, 0, 10]), dict(g, box=[2, 2, 40, 10]), dict(g, box=[1, 2, 3]),
                 dict(g, box=[1, float("nan"), 3, 3]), {"image": "img/0.png", "box": [2, 2, 10, 10]}, dict(g)]
    ds, bad, _ = run_records("grounding", tmp_path, tok, monkeypatch, grounding, grounding[:1])
    assert len(ds) == 2 and ds[1]["box"].tolist() == pytest.approx([2.5 / 32, 2.5 / 32, 5 / 32, 5 / 32])
    assert bad.counts() == {"bad box": 4, "malformed record": 2}
    for line in (":3: bad box (box [2, 2, 0, 10] has w or h <= 0)", ":4: bad box (box [2, 2, 40, 10] is outside the 32x32",
                 ":5: bad box (box [1, 2, 3] is not [x, y, w, h]", ":6: bad box (box [1, nan, 3, 3] is not",
                 ":7: malformed record (no 'text' field)", ":8: malformed record (no 'box' or 'bbox' field)"):
        assert line in said(bad), line

    imgcls = [{"image": "img/0.png", "label": 0}, {"image": "img/1.png", "label": 1},
              {"image": "img/2.png", "label": "square"}, {"image": "img/2.png"}, {"label": 1}]
    ds, bad, got = run_records("imgcls", tmp_path, tok, monkeypatch, imgcls, imgcls[:1])
    assert got["meta"]["labels"] == [0, 1] and len(ds) == 2 and bad.counts() == {"malformed record": 3}

    r = {"image": "img/0.png"}
    retrieval = [dict(r, caption="a red square"), dict(r, caption=["a red one", 7, ""]), dict(r, caption=42),
                 {"caption": "no image"}, dict(r)]
    ds, bad, _ = run_records("retrieval", tmp_path, tok, monkeypatch, retrieval, retrieval[:2])
    assert len(ds) == 2 and bad.counts() == {"malformed record": 5, "empty caption": 2}  # 1 + 1 in the test split
    for line in (":2: malformed record (caption[1] is an int, not a string)", ":2: empty caption (caption[2] is empty)",
                 ":3: malformed record (caption is an int, not a string)", ":4: malformed record (no 'image' field)",
                 ":5: malformed record (no 'caption' field)"):
        assert line in said(bad), line


# ---------------------------------------------------------------------------------------------------------
# End to end: train.py on a folder with a Latin-1 line in each of text.txt, pairs.jsonl and regions.jsonl

FAST = ["--max_steps=1", "--batch_size=8", "--log_every=1", "--warmup_steps=1", "--vocab_size=300", "--eval_k=4",
        "--caption_len=24", "--text_len=32"]


@pytest.fixture(scope="module")
def latin1_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("latin1")
    toyworld.make_toy(str(d), seed=0, size=32, n_pairs=32, n_regions=16, n_text=32, n_images=16, n_test=8, n_down=4,
                  progress=False)
    with open(d / "text.txt", "ab") as f:
        f.write(LATIN1 + b"\n")
    with open(d / "pairs.jsonl", "ab") as f:
        f.write(jsonl_bytes({"image": "img/pair_00000.png"}, "caption", LATIN1) + b"\n")
    with open(d / "regions.jsonl", "ab") as f:
        region = json.dumps({"image": "img/region_00000.png", "regions": [{"box": [1, 1, 8, 8], "caption": "@@"}]})
        f.write(region.encode().replace(b"@@", LATIN1) + b"\n")
    return d


def test_train_skips_and_counts_text_that_is_not_utf8(latin1_folder, tmp_path, capsys):
    d, out = latin1_folder, tmp_path / "run"
    res = train.main([f"--data_dir={d}", f"--out_dir={out}", *FAST])
    assert res["final"]["step"] == 1
    final = [json.loads(l) for l in open(out / "metrics.jsonl") if json.loads(l).get("final")][0]
    assert final["bad_input"] == {"not UTF-8": 3}
    err = capsys.readouterr()
    for name, line in (("text.txt", 33), ("pairs.jsonl", 33), ("regions.jsonl", 17)):
        assert f"warning: {d / name}:{line}: not UTF-8 (byte 0xe9" in err.err, name
    assert "bad input skipped: bad input: 3 not UTF-8" in err.out
    with pytest.raises(SystemExit, match=r"pairs\.jsonl:33: not UTF-8"):  # the first file parsed, in one line
        train.main([f"--data_dir={d}", f"--out_dir={tmp_path / 'strict'}", *FAST, "--strict=true"])


def test_train_stops_at_start_on_a_file_in_another_encoding(latin1_folder, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(latin1_folder, d)
    lines = (d / "text.txt").read_bytes().splitlines()[:-1]  # the toy corpus, without its Latin-1 line
    (d / "text.txt").write_bytes(b"".join(b"caf\xe9: " + line + b"\n" for line in lines))  # every line Latin-1
    with pytest.raises(SystemExit, match=r"text\.txt is not UTF-8: its first 10 lines fail.*\n.*Latin-1.*\n"
                                         r" *iconv -f latin1 -t utf-8 "):
        train.main([f"--data_dir={d}", f"--out_dir={tmp_path / 'run'}", *FAST])
