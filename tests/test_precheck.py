"""What can fail after training is checked before it: train.py reads its held-out pairs and decodes every image
of them before step 1 (retrieval.check_images: a truncated JPEG passes PIL's verify but not a decode), and a set
left empty refuses the run; finetune.py decodes every image of its task files the same way, and checks each
classification label against the classes (declared by --num_labels or inferred: one outlier cannot make 10^8
classes, one 1.5 among integers cannot turn classification into regression). Bad input is named, skipped and
counted (formats.BadInput), the good records all arrive, and --strict refuses.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_precheck.py -q   (CPU, a few seconds)"""
import json
import os
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import finetune
from lib import runlog
from lib import formats
from lib import retrieval
from lib import toyworld
from lib import transforms
import train
from test_bad_input import FAST, ft_cfg, images, quiet, said, tok, write_lines  # noqa: F401  (tok: a fixture)


def bad_images(d):
    """Three files under d/img that fail a full decode: a JPEG cut in half (PIL's verify lets it pass), an empty
    file and a text file named .png. -> their names relative to d."""
    (d / "img").mkdir(exist_ok=True)
    Image.effect_noise((48, 48), 60).convert("RGB").save(d / "img" / "whole.jpg", quality=90)
    whole = (d / "img" / "whole.jpg").read_bytes()
    (d / "img" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    with Image.open(d / "img" / "cut.jpg") as im:
        im.verify()  # passes: verify does not decode JPEG data
    (d / "img" / "empty.png").write_bytes(b"")
    (d / "img" / "text.png").write_text("not an image\n")
    return ["img/cut.jpg", "img/empty.png", "img/text.png"]


# ---------------------------------------------------------------------------------------------------------
# The held-out pairs (retrieval.load_retrieval_set): every image decoded, a set left empty refused


def test_held_out_images_are_decoded_and_the_bad_ones_skipped_and_counted(tmp_path, tok):
    images(tmp_path)
    cut, empty, text = bad_images(tmp_path)
    p = tmp_path / "pairs_test.jsonl"
    write_lines(p, [{"image": "img/0.png", "caption": "a red square"},                # 1
                    {"image": cut, "caption": "half a picture"},                       # 2 truncated JPEG
                    {"image": "img/1.png", "caption": ["a green square", "green"]},    # 3
                    {"image": empty, "caption": "nothing"},                            # 4 0 bytes
                    {"image": text, "caption": "words"},                               # 5 not an image
                    {"image": cut, "caption": "the same cut file again"},              # 6 dropped with line 2
                    {"image": "img/2.png", "caption": "a blue square"}])               # 7
    bad = quiet()
    rs = retrieval.load_retrieval_set(str(p), tok, 32, 16, bad)
    assert rs["image"].paths == [str(tmp_path / "img" / f"{i}.png") for i in range(3)]  # paths, no pixels kept
    assert rs["txt2img"].tolist() == [0, 1, 1, 2] and rs["img2txt"] == [[0], [1, 2], [3]]
    assert [tok.decode(ids) for ids in rs["ids"].tolist()] == ["a red square", "a green square", "green",
                                                                 "a blue square"]
    assert bad.counts() == {"unreadable image": 3}
    for line, name in ((2, cut), (4, empty), (5, text)):
        assert f"{p}:{line}: unreadable image ({tmp_path / name}: " in said(bad), line
    assert "image file is truncated" in said(bad)
    with pytest.raises(ValueError, match=r"pairs_test\.jsonl:2: unreadable image"):
        retrieval.load_retrieval_set(str(p), tok, 32, 16, formats.BadInput(strict=True))


def test_a_held_out_set_with_nothing_left_is_refused_in_one_line(tmp_path, tok):
    cut, empty, text = bad_images(tmp_path)
    p = tmp_path / "pairs_test.jsonl"
    for lines in ([], [{"image": name, "caption": "a bad picture"} for name in (cut, empty, text)]):
        write_lines(p, lines)
        with pytest.raises(SystemExit) as e:
            retrieval.load_retrieval_set(str(p), tok, 32, 16, quiet())
        assert str(e.value).startswith(f"error: {p}: no image-text pair") and "\n" not in str(e.value)


def test_check_images_keeps_verdicts_in_order_and_shows_a_bar_for_a_large_set(tmp_path, monkeypatch, capsys):
    images(tmp_path)
    cut, _, _ = bad_images(tmp_path)
    paths = [str(tmp_path / "img" / n) for n in ("0.png", cut[4:], "1.png", "0.png")]
    monkeypatch.setattr(retrieval, "PROGRESS_MIN", 2)
    verdicts = retrieval.check_images(paths, "checking")
    assert list(verdicts) == paths[:3] and verdicts[paths[0]] is None and verdicts[paths[2]] is None
    assert "truncated" in verdicts[paths[1]] and "checking" in capsys.readouterr().err
    retrieval.check_images(paths, "checking", show=False)
    assert "checking" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# train.py: the held-out set is checked before step 1; the final record is always written


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    toyworld.make_toy(str(d), seed=0, size=32, n_pairs=32, n_regions=16, n_text=32, n_images=16, n_test=8, n_down=4,
                      progress=False)
    return d


def test_train_checks_the_held_out_set_before_step_1(world, tmp_path, monkeypatch, capsys):
    d = tmp_path / "data"
    shutil.copytree(world, d)
    cut, empty, _ = bad_images(d)
    with open(d / "pairs_test.jsonl", "a") as f:  # lines 9 and 10
        f.writelines(json.dumps({"image": name, "caption": "a red circle"}) + "\n" for name in (cut, empty))
    warned, fb = [], train.forward_backward
    monkeypatch.setattr(train, "forward_backward", lambda *a: warned.append(capsys.readouterr().err) or fb(*a))
    out = tmp_path / "run"
    train.main([f"--data_dir={d}", f"--out_dir={out}", *FAST, "--max_steps=2", "--stop_at=1"])
    assert f"{d / 'pairs_test.jsonl'}:9: unreadable image" in warned[0]  # said before the first update
    assert f"{d / 'pairs_test.jsonl'}:10: unreadable image" in warned[0]
    assert runlog.load_checkpoint(str(out), "cpu")["bad_input"] == {"records": []}  # the held-out set is not saved ...
    train.main([f"--resume={out}", "--stop_at=0"])                      # ... for a resume reads the set again
    finals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("final")]
    assert [r["step"] for r in finals] == [1, 2]
    n_texts = sum(len(json.loads(line)["caption"]) for line in open(world / "pairs_test.jsonl"))
    for r in finals:  # both evaluated on the 8 good images; the 2 bad ones counted once per record
        assert (r["retrieval"]["n_images"], r["retrieval"]["n_texts"]) == (8, n_texts)
        assert r["bad_input"] == {"unreadable image": 2}

    write_lines(d / "pairs_test.jsonl", [{"image": name, "caption": "a red circle"} for name in (cut, empty)])
    warned.clear()
    with pytest.raises(SystemExit, match=r"^error: .*pairs_test\.jsonl: no image-text pair") as e:
        train.main([f"--data_dir={d}", f"--out_dir={tmp_path / 'refused'}", *FAST])
    assert "\n" not in str(e.value) and not warned and not os.path.exists(tmp_path / "refused" / "ckpt.pt")


def test_an_evaluation_that_fails_at_the_end_still_writes_the_final_record(tmp_path, monkeypatch):
    def truncated(*args):  # an image file that changed during the run
        raise OSError("image file is truncated (7 bytes not processed)")

    monkeypatch.setattr(retrieval, "evaluate_retrieval", truncated)
    cfg, held_bad = train.TrainConfig(out_dir=str(tmp_path)), quiet()
    held_bad.report("unreadable image", "pairs_test.jsonl:3", "img/x.jpg: cannot identify image file")
    final = {"final": True, "step": 1, "wall_s": 1.0, "skipped_updates": 0}
    args = (None, {"image": [], "ids": []}, held_bad, [], final, quiet(), torch.device("cpu"), nullcontext, 0)
    runlog.finish(cfg, *args, 1)
    rec = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert rec["retrieval_error"] == "OSError: image file is truncated (7 bytes not processed)"
    assert rec["bad_input"] == {"unreadable image": 1} and "retrieval" not in rec
    with pytest.raises(OSError):  # under torchrun every rank stops (no rank left waiting in a gather)
        runlog.finish(cfg, *args, 2)


# ---------------------------------------------------------------------------------------------------------
# finetune.py: every image of the task files decoded at start-up


def run(task, d, tok, monkeypatch, train_recs, test_recs, strict=False, **kw):
    """finetune's `task` on these records (task files and images in d) up to the model, with build_model and fit
    stubbed out -> (what fit got: train_set, meta; the task's BadInput)."""
    for split, recs in (("train", train_recs), ("test", test_recs)):
        write_lines(d / f"{task}_{split}.jsonl", recs)
    cfg = ft_cfg(task=task, epochs=1, image_size=32, text_len=16, train_file=str(d / f"{task}_train.jsonl"),
                 test_file=str(d / f"{task}_test.jsonl"), image_root=str(d), **kw)
    env = SimpleNamespace(master=True, meta=None, tok=tok, mcfg=SimpleNamespace(width=8, recipe="xfm"),
                          bad=formats.BadInput(strict=strict, verbose=False))
    got = {}
    monkeypatch.setattr(finetune, "build_model", lambda *a, **k: None)
    monkeypatch.setattr(finetune, "fit", lambda cfg, env, model, train_set, evaluate, out, meta:
                        got.update(train_set=train_set, meta=meta))
    (d / "out").mkdir(exist_ok=True)
    finetune.RUNNERS[task](cfg, env, str(d / "out"))
    return got, env.bad


def lines_of(train_set):
    return [int(r["where"].rsplit(":", 1)[1]) for r in train_set.records]


def test_every_task_decodes_its_images_at_start_up(tmp_path, tok, monkeypatch):
    images(tmp_path)
    names = bad_images(tmp_path)
    good, two = "img/0.png", ["img/0.png", "img/1.png"]
    tasks = {  # task -> a record maker (image name -> record); the bad images are lines 2-4 of each file
        "imgcls": lambda im: {"image": im, "label": 1},
        "vqa": lambda im: {"image": im, "question": "what is it?", "answer": "a square"},
        "nlvr": lambda im: {"images": [good, im], "sentence": "two squares", "label": True},  # the right one bad
        "retrieval": lambda im: {"image": im, "caption": "a red square"},
        "grounding": lambda im: {"image": im, "phrase": "the square", "box": [2, 2, 10, 10]}}
    for task, rec in tasks.items():
        train_recs = [rec(good), *map(rec, names), rec("img/1.png")]
        if task == "imgcls":
            train_recs[0]["label"] = 0
        got, bad = run(task, tmp_path, tok, monkeypatch, train_recs, [rec(two[1]), rec(names[0])])
        assert bad.counts() == {"unreadable image": 4}, task  # 3 in the train split, 1 in the test split
        kept = [r["image"] if "image" in r else r["images"][1] for r in got["train_set"].records]
        assert kept == [str(tmp_path / "img" / f"{i}.png") for i in (0, 1)], task
        for line, name in zip((2, 3, 4), names):
            assert f"{tmp_path / f'{task}_train.jsonl'}:{line}: unreadable image ({tmp_path / name}: " in said(bad)
        assert f"{task}_test.jsonl:2: unreadable image" in said(bad), task
        torch.testing.assert_close(got["train_set"][0]["image"][-1] if task == "nlvr" else
                                   got["train_set"][0]["image"], transforms.task_image(str(tmp_path / good), 32))
    with pytest.raises(ValueError, match=r"vqa_train\.jsonl:2: unreadable image"):
        run("vqa", tmp_path, tok, monkeypatch, [tasks["vqa"](n) for n in (good, *names)], [tasks["vqa"](good)],
            strict=True)
    with pytest.raises(SystemExit, match=r"^error: no usable test record"):  # every test image bad
        run("vqa", tmp_path, tok, monkeypatch, [tasks["vqa"](good)], [tasks["vqa"](n) for n in names])


def test_image_folder_images_are_decoded_at_start_up(tmp_path, tok):
    images(tmp_path)
    names = bad_images(tmp_path)
    folder = tmp_path / "folder"
    for c in ("circle", "square"):
        (folder / c).mkdir(parents=True)
        shutil.copy(tmp_path / "img" / "0.png", folder / c / "a.png")
    for name in names:  # every bad file in the circle class
        shutil.copy(tmp_path / name, folder / "circle" / f"b_{os.path.basename(name)}")
    cfg = ft_cfg(task="imgcls", train_file=str(folder), test_file=str(folder))
    env = SimpleNamespace(master=False, bad=quiet())
    tr, te, bad = finetune.splits(cfg, env)
    assert [(r["label"], os.path.basename(r["image"])) for r in tr] == [("circle", "a.png"), ("square", "a.png")]
    assert len(te) == 2 and bad.counts() == {"unreadable image": 6}
    assert f"{folder / 'circle' / 'b_cut.jpg'}: unreadable image" in said(bad)


# ---------------------------------------------------------------------------------------------------------
# finetune.py: labels checked per task against the classes


def texts(labels):
    return [{"text": f"sentence {i}", "label": v} for i, v in enumerate(labels)]


def test_classification_labels_outside_the_classes_are_counted_skips(tmp_path, tok, monkeypatch):
    images(tmp_path)
    outliers = [100000000, -5, 1e308, 1.5, float("nan"), "1e308"]       # lines 7-12
    train_recs = texts([0, 1, 2, 1, 0, 2, *outliers, 1])
    got, bad = run("textcls", tmp_path, tok, monkeypatch, train_recs, texts([2, 7, 0, -1]))
    assert got["meta"]["labels"] == [0, 1, 2]                            # neither 10^8 classes nor a regression
    assert lines_of(got["train_set"]) == [1, 2, 3, 4, 5, 6, 13]
    assert [s["label"].item() for s in got["train_set"]] == [0, 1, 2, 1, 0, 2, 1]
    assert bad.counts() == {"bad label": 8}                              # 6 in the train split, 2 in the test split
    p = tmp_path / "textcls_train.jsonl"
    for line in (f"{p}:7: bad label (label 100000000 is outside the classes 0..2", f"{p}:8: bad label (label -5 is",
                 f"{p}:9: bad label (label 1e+308 is outside", f"{p}:10: bad label (label 1.5 is not a class index",
                 f"{p}:11: bad label (label nan is not a class index", f"{p}:12: bad label (label '1e308' is outside",
                 "textcls_test.jsonl:2: bad label (label 7 is outside", "textcls_test.jsonl:4: bad label (label -1"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"textcls_train\.jsonl:7: bad label"):
        run("textcls", tmp_path, tok, monkeypatch, train_recs, texts([0]), strict=True)

    imgs = [{"image": "img/0.png", "label": v} for v in [0, 1, 2, 3, *outliers]]  # imgcls: the same rules
    got, bad = run("imgcls", tmp_path, tok, monkeypatch, imgs, imgs[:1])
    assert got["meta"]["labels"] == [0, 1, 2, 3] and lines_of(got["train_set"]) == [1, 2, 3, 4]
    assert bad.counts() == {"bad label": 6}

    # declared: --num_labels=5 makes 0..4 the classes, so 4 is one (never seen) and 5 is not
    got, bad = run("textcls", tmp_path, tok, monkeypatch, texts([0, 1, 4, 5]), texts([3]), num_labels=5)
    assert got["meta"]["labels"] == [0, 1, 2, 3, 4] and lines_of(got["train_set"]) == [1, 2, 3]
    assert bad.counts() == {"bad label": 1} and "label 5 is outside the classes 0..4" in said(bad)


def test_regression_only_when_declared_or_when_most_labels_have_a_fraction(tmp_path, tok, monkeypatch):
    scores = [3.8, 0.4, 5.0, 2.6, 4, float("inf"), 1.2]                 # STS-B style; 5.0 and 4 are scores too
    got, bad = run("textcls", tmp_path, tok, monkeypatch, texts(scores), texts([2.2]))
    assert got["meta"]["labels"] == [] and lines_of(got["train_set"]) == [1, 2, 3, 4, 5, 7]
    assert [s["label"].item() for s in got["train_set"]] == pytest.approx([3.8, 0.4, 5.0, 2.6, 4.0, 1.2])
    assert bad.counts() == {"bad label": 1} and "label inf is not a finite number" in said(bad)
    got, bad = run("textcls", tmp_path, tok, monkeypatch, texts([0, 1, 2, 1]), texts([2]), num_labels=1)
    assert got["meta"]["labels"] == [] and got["train_set"][2]["label"].dtype == torch.float32
    with pytest.raises(SystemExit, match="imgcls classifies"):
        run("imgcls", tmp_path, tok, monkeypatch, [{"image": "img/0.png", "label": 0}], [], num_labels=1)


def test_the_inferred_class_range_holds_at_least_half_of_its_indices(tmp_path):
    assert formats.label_vocab([0, 1, 2, 1000]) == [0, 1, 2]           # one outlier is no class 1000
    assert formats.label_vocab([1, 2, 3, 4, 5]) == list(range(6))      # 1-based labels: 0 is a class never seen
    assert formats.label_vocab([0, 5, 6, 7, 8, 9]) == list(range(10))  # a gap: 6 of the 10 indices in use
    assert formats.label_vocab([0, 1, 1.5, 1]) == [0, 1]               # one 1.5: still classification
    assert formats.label_vocab([0.5, 1.5, 1], regression=False) == [0, 1]  # imgcls never regresses
    with pytest.raises(SystemExit) as e:
        formats.label_vocab([7, 7, 9], source="train.jsonl")
    assert str(e.value) == ("error: train.jsonl: no range of class indices 0..C-1 is half in use by its integer "
                            "labels (7, 9); declare C with --num_labels")
    with pytest.raises(SystemExit, match="--num_labels is a number of classes"):
        finetune.main(["--task", "textcls", "--init", "x", "--num_labels=-2"])
