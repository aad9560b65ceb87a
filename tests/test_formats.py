"""The data formats ALBEF and X-VLM ship, each read from a small fixture written here (a few records, tiny PNGs):
X-VLM's region records (elems, bb, attributes, image_w/h), --image_root for image paths relative to a dataset's
root, Karpathy's dataset_coco.json and ALBEF's test JSON as the held-out pairs of train.py's retrieval
evaluation, and the results file of the official VQA evaluation server. Bad variants are counted, never fatal.
Run: python -m pytest tests/test_formats.py -q   (CPU, a few seconds)"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import finetune
from lib import formats
from lib import retrieval
from lib import tokenizer
import train


def png(path, size=(40, 30), colour=(200, 40, 40)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def quiet():
    return formats.BadInput(verbose=False)


def said(bad):
    return "\n".join(bad.messages)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["a red square", "a white fence", "a brown dog", "caption of an image", "what colour is it"] * 4
    return tokenizer.Tokenizer.train(texts, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------
# X-VLM's region records


def test_xvlm_region_records_with_bb_attributes_and_declared_size(tmp_path):
    """X-VLM: {"image", "image_w", "image_h", "caption"?, "elems": [{"bb": [x, y, w, h], "caption", "attributes"?}]};
    each attribute prefixes the phrase (every attribute x caption pair is one caption of the region)."""
    for name in ("0", "1", "2"):
        png(str(tmp_path / "img" / f"{name}.png"))                          # 40 x 30, as the records declare
    png(str(tmp_path / "img" / "half.png"), size=(20, 15))                  # a resized copy: boxes scale by 1/2
    size = {"image_w": 40, "image_h": 30}
    recs = [
        dict(size, image="img/0.png", caption="a street", elems=[                                          # [0]
            {"bb": [4, 6, 10, 8], "caption": "fence", "attributes": ["white", "wooden"]},
            {"bb": [20, 2, 12, 20], "caption": ["a dog", "the dog"], "attributes": "brown"},
            {"bb": [1, 1, 5, 5], "caption": "sky"}]),
        dict(size, image="img/half.png", elems=[{"bb": [4, 6, 10, 8], "caption": "fence"}]),               # [1]
        dict(size, image="img/1.png", elems=[                                                              # [2]
            {"bb": [30, 2, 20, 5], "caption": "outside"},                      # x + w = 50 > 40: bad box
            {"caption": "no box"},                                             # no bb: bad box
            {"bb": [1, 1, 4, 4], "caption": "cat", "attributes": ["black", 7, " "]},   # 7 dropped, " " ignored
            {"bb": [1, 1, 4, 4], "caption": ""}]),                             # empty caption: region dropped
        {"image": "img/1.png", "elems": "fence"},                                                          # [3]
        {"image": "img/1.png", "image_w": "40", "image_h": 30, "elems": [{"bb": [1, 1, 4, 4], "caption": "x"}]},  # [4]
        {"image": "img/2.png", "elems": [{"bb": [0, 0, 0, 5], "caption": "flat"}]}]                         # [5]
    p = tmp_path / "regions.json"
    p.write_text(json.dumps(recs))
    bad = quiet()
    got = formats.parse_regions(str(p), bad)
    assert [(r["where"], r["captions"]) for r in got] == [(f"{p}[0]", ["a street"]), (f"{p}[1]", []), (f"{p}[2]", [])]
    assert [(g["box"], g["captions"]) for g in got[0]["regions"]] == [
        ([4, 6, 10, 8], ["white fence", "wooden fence"]),
        ([20, 2, 12, 20], ["brown a dog", "brown the dog"]),
        ([1, 1, 5, 5], ["sky"])]
    assert got[1]["size"] == (20, 15) and got[1]["regions"][0]["box"] == [2, 3, 5, 4]
    assert got[2]["regions"] == [{"box": [1, 1, 4, 4], "captions": ["black cat"]}]
    assert bad.counts() == {"bad box": 3, "malformed record": 3, "empty caption": 1, "no regions": 1}
    for line in (f"{p}[2] region 0: bad box (box [30, 2, 20, 5] is outside the 40x30 image)",
                 f"{p}[2] region 1: bad box (box None is not [x, y, w, h]",
                 f"{p}[2] region 2: malformed record (attributes[1] is an int, not a string)",
                 f"{p}[2] region 3: empty caption (caption is empty)",
                 f"{p}[3]: malformed record (elems is a string, not a list)",
                 f"{p}[4]: malformed record (image_w, image_h ['40', 30] are not a size)",
                 f"{p}[5] region 0: bad box (box [0, 0, 0, 5] has w or h <= 0)", f"{p}[5]: no regions"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"regions\.json\[2\] region 0: bad box"):
        formats.parse_regions(str(p), formats.BadInput(strict=True))


# ---------------------------------------------------------------------------------------------------------
# --image_root: image paths relative to a dataset's root, not to the file


def albef_folders(tmp_path):
    """A dataset root (COCO-like: train2014/, val2014/) and an annotation folder whose JSONs name images
    relative to that root, as ALBEF's and X-VLM's do; the held-out pairs are Karpathy's dataset_coco.json."""
    root, ann = tmp_path / "coco", tmp_path / "ann"
    for i in range(4):
        png(str(root / "train2014" / f"t{i}.png"), colour=(60 * i, 100, 200))
        png(str(root / "val2014" / f"v{i}.png"), colour=(100, 60 * i, 200))
    ann.mkdir()
    pairs = [{"image": f"train2014/t{i}.png", "caption": f"caption of image {i}"} for i in range(4)]
    (ann / "pairs.json").write_text(json.dumps(pairs))                     # ALBEF's pre-training JSON
    regions = [{"image": f"train2014/t{i}.png", "image_w": 40, "image_h": 30, "caption": "a street",
                "elems": [{"bb": [2, 2, 20, 20], "caption": "fence", "attributes": ["white"]}]} for i in range(4)]
    (ann / "regions.json").write_text(json.dumps(regions))                 # X-VLM's region JSON
    (ann / "text.txt").write_text("a brown dog\na white fence\n" * 4)
    images = [{"filepath": "val2014", "filename": f"v{i}.png", "split": split, "sentences": [
        {"raw": f"a val image {i}"}, {"raw": f"another caption {i}"}]} for i, split in
        enumerate(("test", "train", "test", "restval"))]
    images.append({"filepath": "train2014", "filename": "t0.png", "split": "val", "sentences": [{"raw": "val"}]})
    (ann / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root, ann


def test_image_root_resolves_every_file_of_a_folder_and_a_missing_root_is_one_error(tmp_path, capsys):
    root, ann = albef_folders(tmp_path)
    (ann / "images.jsonl").write_text(json.dumps({"image": "val2014/v0.png"}) + "\n")
    assert formats.check(str(ann), image_root=str(root)).counts() == {}
    out = capsys.readouterr().out
    for line in ("pair       ", ": 4 captions, 4 images", "region     ", ": 4 images, 4 regions",
                 "image      ", ": 1 records", "pair_test  ", "dataset_coco.json: 4 captions, 2 images"):
        assert line in out, line
    pairs = formats.parse_pairs(str(ann / "pairs.json"), quiet(), str(root))
    assert pairs[0]["image"] == os.path.join(str(root), "train2014", "t0.png")
    corpus = tokenizer.corpus_texts(str(ann), str(root))                    # the tokenizer reads them there too
    assert "caption of image 0" in corpus and "white fence" in corpus
    # without the root each record's image is missing: named, skipped and counted, never fatal
    bad = formats.check(str(ann))
    assert bad.counts() == {"missing image": 4 + 4 + 1 + 2}
    assert f"{ann / 'pairs.json'}[0]: missing image (no such file train2014/t0.png)" in said(bad)
    # a root that does not exist: one error that names it, from formats, train.py and finetune.py alike
    gone = str(tmp_path / "no_such_root")
    with pytest.raises(SystemExit, match=r"error: image_root '.*no_such_root' is not a folder \(the image paths of "):
        formats.parse_pairs(str(ann / "pairs.json"), quiet(), gone)
    with pytest.raises(SystemExit, match=r"image_root '.*no_such_root' is not a folder"):
        formats.main(["check", "--data_dir", str(ann), "--image_root", gone])
    cfg, _ = finetune.parse_args([f"--image_root={gone}"])
    with pytest.raises(SystemExit, match=r"image_root '.*no_such_root' is not a folder"):
        formats.read_task_file(str(ann / "pairs.json"), "train", cfg, quiet())


# ---------------------------------------------------------------------------------------------------------
# The held-out pairs of train.py's retrieval evaluation: Karpathy's test split, ALBEF's test JSON


def test_karpathy_test_split_and_albef_test_json_are_the_held_out_pairs(tmp_path, tok):
    root, ann = albef_folders(tmp_path)
    karpathy = formats.find_sources(str(ann))["pair_test"]
    assert karpathy == str(ann / "dataset_coco.json")
    bad = quiet()
    rs = retrieval.load_retrieval_set(karpathy, tok, 32, 16, bad, str(root))
    # the test split only (images 0 and 2), every sentence of each: never train, restval or val
    assert len(rs["image"]) == 2 and rs["ids"].shape[0] == 4 and rs["img2txt"] == [[0, 1], [2, 3]]
    assert bad.counts() == {}
    test = formats.parse_test_pairs(karpathy, quiet(), str(root))
    assert [(t["image"][-6:], t["caption"]) for t in test] == [
        ("v0.png", "a val image 0"), ("v0.png", "another caption 0"), ("v2.png", "a val image 2"),
        ("v2.png", "another caption 2")]
    # as a pre-training pairs file the same file gives its train and restval images
    assert [t["image"][-6:] for t in formats.parse_pairs(karpathy, quiet(), str(root))] == ["v1.png"] * 2 + ["v3.png"] * 2
    # ALBEF's coco_test.json: a JSON list, each image with its list of captions; a bad caption is counted
    albef = [{"image": "val2014/v0.png", "caption": ["a val image 0", "another caption 0"]},
             {"image": "val2014/v2.png", "caption": ["a val image 2", 5]}]
    (ann / "pairs_test.json").write_text(json.dumps(albef))
    assert formats.find_sources(str(ann))["pair_test"] == str(ann / "pairs_test.json")     # the project's name wins
    bad = quiet()
    rs = retrieval.load_retrieval_set(str(ann / "pairs_test.json"), tok, 32, 16, bad, str(root))
    assert len(rs["image"]) == 2 and rs["img2txt"] == [[0, 1], [2]]
    assert bad.counts() == {"malformed record": 1} and "[1]: malformed record (caption[1] is an int" in said(bad)


def test_train_reads_albef_and_xvlm_files_under_an_image_root(tmp_path):
    """train.py end to end on ALBEF's pairs JSON, X-VLM's regions JSON and Karpathy's test split, all relative to
    --image_root: every stream trains and the retrieval evaluation ranks the 2 test images and their 4 captions."""
    root, ann = albef_folders(tmp_path)
    res = train.main([f"--data_dir={ann}", f"--image_root={root}", f"--out_dir={tmp_path / 'run'}", "--max_steps=1",
                      "--batch_size=4", "--vocab_size=300", "--eval_k=2", "--caption_len=16", "--text_len=16"])
    final = res["final"]
    assert final["bad_input"] == {} and (final["retrieval"]["n_images"], final["retrieval"]["n_texts"]) == (2, 4)
    assert {"loss/mlm", "loss/itc_region", "loss/bbox_l1", "loss/itc"} <= set(res["history"][-1])


# ---------------------------------------------------------------------------------------------------------
# VQA: the results file of the official evaluation server


def test_vqa_results_file_pairs_each_question_id_with_its_answer(tmp_path, tok, monkeypatch):
    png(str(tmp_path / "img" / "0.png"))
    q = {"image": "img/0.png"}
    train_recs = [dict(q, question="what is it?", answer=a) for a in ("net", "net", "net", "mesh", "mesh", "cube")]
    test_recs = [dict(q, question_id=30, question="is it a cube?", answer=["cube", "cube", "net"]),
                 dict(q, question_id=10, question="is it a net?", answer="net"),
                 dict(q, question_id=20, question="is it a mesh?"),            # VQAv2 test-dev: no answer field
                 dict(q, question="is it a mesh?", answer="net"),             # no question_id: its file:line
                 dict(q, question_id=40, question="is it a cube?", answer=3)]  # a bad answer: skipped, counted
    for split, recs in (("train", train_recs), ("test", test_recs)):
        (tmp_path / f"vqa_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg, _ = finetune.parse_args(["--task=vqa", f"--train_file={tmp_path / 'vqa_train.jsonl'}",
                                  f"--test_file={tmp_path / 'vqa_test.jsonl'}"])
    env = SimpleNamespace(master=True, meta=None, tok=tok, mcfg=SimpleNamespace(width=8), bad=quiet())
    answers = ["net", "mesh", "cube"]                                       # the training answers, most frequent first
    said_by_question = {"cube": 2, "net": 0, "mesh": 1}                     # the "model" answers what it is asked
    picks = lambda recs: torch.eye(3)[[said_by_question[r["question"].split()[-1][:-1]] for r in recs]]  # noqa: E731
    monkeypatch.setattr(finetune, "build_model", lambda *a, **k: None)
    monkeypatch.setattr(finetune, "predict", lambda cfg, env, m, ds, fn: picks(ds.records))
    monkeypatch.setattr(finetune, "fit", lambda cfg, env, model, train_set, evaluate, out, meta:
                        dict(evaluate(model), meta=meta))
    res = finetune.run_vqa(cfg, env, str(tmp_path))
    assert res["meta"]["answers"] == answers
    rows = json.load(open(tmp_path / "vqa_results.json"))
    assert rows == [{"question_id": 30, "answer": "cube"}, {"question_id": 10, "answer": "net"},
                    {"question_id": 20, "answer": "mesh"},
                    {"question_id": f"{tmp_path / 'vqa_test.jsonl'}:4", "answer": "mesh"}]
    # scored over the questions with answers only: 2/3 (two of three votes), 1, 0 (said mesh, the answer is net)
    assert res["metric"] == "vqa_score" and res["value"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert res["metrics"]["n_scored"] == 3 and env.bad.counts() == {"malformed record": 1}
    # a test split without any answer (test-dev): the results file, and no score
    (tmp_path / "vqa_test.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n"
                                                     for r in test_recs))
    res = finetune.run_vqa(cfg, env, str(tmp_path))
    assert res["metric"] == "predictions" and res["value"] == 5 and "none scored" in res["summary"]
    assert [r["question_id"] for r in json.load(open(tmp_path / "vqa_results.json"))][:3] == [30, 10, 20]
