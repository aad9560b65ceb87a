"""Tests for data.py: toy world, bad input, tokenizer, masking, transforms, sharding, resume, batch formats.
Run: python -m pytest tests/test_data.py -q   (CPU, a few seconds)"""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import flava  # noqa: E402
from lib import tokenizer  # noqa: E402
from lib import formats  # noqa: E402
from lib import toyworld  # noqa: E402
from lib import retrieval  # noqa: E402
from lib import streams as stream_lib  # noqa: E402
from lib import transforms  # noqa: E402
from lib import runtime  # noqa: E402

SMALL = dict(size=32, n_pairs=24, n_regions=12, n_text=30, n_images=12, n_test=10, n_down=8, progress=False)
DC = dict(image_size=32, patch_size=8, text_len=32, caption_len=16, seed=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, seed=0, **SMALL)
    return d


@pytest.fixture(scope="module")
def tok(toy, tmp_path_factory):
    return tokenizer.get_tokenizer(toy, str(tmp_path_factory.mktemp("run")), vocab_size=400)


def read_tree(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def streams(toy, tok, bs=4, num_workers=0, rank=0, world_size=1, **kw):
    dc = D.DataConfig(**{**DC, "hflip": True, "crop_scale": (0.5, 1.0), **kw})
    return stream_lib.build_streams(toy, tok, dc, {k: bs for k in D.KINDS}, formats.BadInput(verbose=False), rank, world_size,
                           num_workers)


# ----------------------------------------------------------------------------- toy world

def test_toy_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    toyworld.make_toy(a, seed=0, **SMALL)
    toyworld.make_toy(b, seed=0, **SMALL)
    toyworld.make_toy(c, seed=1, **SMALL)
    ta, tb, tc = read_tree(a), read_tree(b), read_tree(c)
    assert ta == tb and len(ta) > 50
    assert set(ta) == set(tc) and ta != tc
    assert ta["img/pair_00000.png"] != tc["img/pair_00000.png"]
    toyworld.make_toy(a, seed=0, **SMALL)  # regenerating over an old toy world gives the same files
    assert read_tree(a) == ta
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(ValueError):  # never writes into a folder that is not a toy world
        toyworld.make_toy(str(tmp_path / "other"), **SMALL)


def test_toy_contents(toy):
    src = formats.find_sources(toy)
    assert set(src) == {"text", "image", "pair", "region", "pair_test"}
    assert src["image"].endswith("images.jsonl")  # image-only data is separate from the pair images
    bad = formats.BadInput(verbose=False)
    pairs, regions = formats.parse_pairs(src["pair"], bad), formats.parse_regions(src["region"], bad)
    assert len({p["image"] for p in pairs}) == 24 and len(pairs) >= 40
    assert len(regions) == 12 and len(formats.parse_texts(src["text"], bad)) == 30
    assert len(formats.parse_images(src["image"], bad)) == 12
    assert len({p["image"] for p in formats.parse_pairs(src["pair_test"], bad)}) == 10
    assert bad.counts() == {}
    for r in regions:  # one box per shape, inside the image
        for g in r["regions"]:
            x, y, w, h = g["box"]
            assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32
    meta = json.load(open(os.path.join(toy, "toy.json")))
    down = os.path.join(toy, "downstream")
    for task, n_train in (("vqa", None), ("nlvr", 8), ("imgcls", 8), ("textcls", 16)):
        recs = [json.loads(line) for line in open(os.path.join(down, f"{task}_train.jsonl"))]
        assert n_train is None or len(recs) == n_train
        for r in recs:
            for p in r.get("images", [r["image"]] if "image" in r else []):
                assert os.path.isfile(os.path.join(down, p))
            if task == "vqa":
                assert r["answer"] in meta["vqa_answers"]
            if task == "nlvr":
                assert isinstance(r["label"], bool)
    retr = formats.parse_pairs(os.path.join(down, "retrieval_test.jsonl"), bad)
    assert len(retr) > 0 and bad.counts() == {}
    assert os.path.isfile(os.path.join(toy, "README.txt"))


# ----------------------------------------------------------------------------- bad input

def bad_folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (200, 10 * i, 10)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"this is not a png")
    lines = [json.dumps({"image": "img/0.png", "caption": "a red square"}),            # 1 ok
             '{"image": "img/1.png", "caption": "oops"',                                # 2 malformed JSON
             json.dumps({"image": "img/1.png", "caption": "  "}),                       # 3 empty caption
             json.dumps({"image": "img/missing.png", "caption": "a ghost"}),            # 4 missing image
             json.dumps({"image": "img/broken.png", "caption": "a broken image"}),      # 5 unreadable at load time
             json.dumps({"image": "img/2.png", "caption": ["a red square", ""]}),       # 6 one empty caption of two
             json.dumps({"image": "img/3.png", "caption": "a dark red square"})]        # 7 ok
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    regions = [{"image": "img/0.png", "caption": "a red image",
                "regions": [{"box": [0, 0, 10, 10], "caption": "a corner"},
                            {"box": [30, 0, 10, 10], "caption": "half outside"}]},    # 1: region 1 outside 32 px
               {"image": "img/1.png", "regions": [{"box": [0, 0, 0, 5], "caption": "flat"}]}]  # 2: w=0, none left
    (tmp_path / "regions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in regions))
    return tmp_path


def test_bad_input_parse_time(tmp_path):
    d = bad_folder(tmp_path)
    bad = formats.BadInput(verbose=False)
    pairs = formats.parse_pairs(str(d / "pairs.jsonl"), bad)
    assert [p["caption"] for p in pairs] == ["a red square", "a broken image", "a red square", "a dark red square"]
    assert bad.counts() == {"malformed JSON": 1, "empty caption": 2, "missing image": 1}
    msgs = "\n".join(bad.messages)
    assert "pairs.jsonl:2: malformed JSON (" in msgs and "- skipped" in msgs
    assert "pairs.jsonl:3: empty caption" in msgs and "pairs.jsonl:6: empty caption" in msgs
    assert "pairs.jsonl:4: missing image (no such file img/missing.png)" in msgs
    regions = formats.parse_regions(str(d / "regions.jsonl"), bad)
    assert len(regions) == 1 and len(regions[0]["regions"]) == 1  # the bad box dropped, record kept
    assert bad.counts()["bad box"] == 2 and bad.counts()["no regions"] == 1
    msgs = "\n".join(bad.messages)
    assert "regions.jsonl:1 region 1: bad box" in msgs and "outside the 32x32 image" in msgs
    assert "regions.jsonl:2 region 0: bad box" in msgs and "w or h <= 0" in msgs
    assert "malformed JSON" in bad.summary()


def test_bad_input_strict(tmp_path):
    d = bad_folder(tmp_path)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: malformed JSON"):
        formats.parse_pairs(str(d / "pairs.jsonl"), formats.BadInput(strict=True))
    with pytest.raises(ValueError, match=r"regions\.jsonl:1 region 1: bad box"):
        formats.parse_regions(str(d / "regions.jsonl"), formats.BadInput(strict=True))
    (d / "ok.jsonl").write_text(json.dumps({"image": "img/broken.png", "caption": "x"}) + "\n")
    strict = formats.BadInput(strict=True)
    ds = D.PairDataset(formats.parse_pairs(str(d / "ok.jsonl"), strict), None, D.DataConfig(32, 8, 16, 16, 0, False, (1, 1)), strict)
    with pytest.raises(ValueError, match=r"ok\.jsonl:1: unreadable image"):
        ds[(0, 0)]


def test_unreadable_image_is_replaced_and_counted(tmp_path, tok):
    d = bad_folder(tmp_path)
    bad = formats.BadInput(verbose=False)
    pairs = formats.parse_pairs(str(d / "pairs.jsonl"), bad)
    ds = D.PairDataset(pairs, tok, D.DataConfig(32, 8, 16, 16, 0, False, (1, 1)), bad)
    s = ds[(1, 0)]  # item 1 is broken.png: the next item (img/2.png) stands in, its problem carried along
    assert [p[:2] for p in s["bad"]] == [("unreadable image", f"{d}/pairs.jsonl:5")] and s["img_id"] == ds.img_ids[2]
    assert tok.decode(s["ids"]) == "a red square"
    assert "unreadable image" not in bad.counts()  # counted by the main process, through the batch
    st = stream_lib.Stream("pair", ds, 4, seed=0, rank=0, world_size=1, num_workers=0, bad=bad)
    batch = next(st)  # one batch = the whole epoch, so it holds the broken item once
    assert "bad" not in batch and bad.counts()["unreadable image"] == 1
    assert any("pairs.jsonl:5: unreadable image" in m and "broken.png" in m for m in bad.messages)
    ret = retrieval.load_retrieval_set(str(d / "pairs.jsonl"), tok, 32, 16, bad)  # eval drops it instead
    assert len(ret["image"]) == 3 and ret["image"][0].shape == (3, 32, 32) and ret["ids"].shape[0] == 3


def test_bad_input_print_limit(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("{oops\n" * 15)
    bad = formats.BadInput(verbose=False)
    assert formats.parse_pairs(str(tmp_path / "pairs.jsonl"), bad) == []
    assert bad.counts() == {"malformed JSON": 15}
    assert len(bad.messages) == 11 and "counted, not printed" in bad.messages[-1]
    assert "pairs.jsonl:10:" in bad.messages[9]
    bad.add("unreadable image", 3)
    assert bad.counts()["unreadable image"] == 3 and "3 unreadable image" in bad.summary()


# ----------------------------------------------------------------------------- tokenizer

SENTS = ["a red circle left of a blue square", "there are two shapes: a green cross and a yellow triangle",
         "a small purple diamond at the top", "an orange circle above a red square"]


def test_tokenizer_train_roundtrip(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tok = tokenizer.Tokenizer.train(SENTS * 3, 300, path)
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4} and tok.vocab_size > 256
    for s in SENTS:
        ids = tok.encode(s, 64)
        assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids) == s
    short = tok.encode(SENTS[1], 5)
    assert len(short) == 5 and short[-1] == tok.sep_id and short[:4] == tok.encode(SENTS[1], 64)[:4]
    again = tokenizer.Tokenizer.load(path)
    assert again.encode(SENTS[0], 64) == tok.encode(SENTS[0], 64)


def test_tokenizer_looks_up_specials_and_ignores_post_processor(tmp_path):
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, processors, trainers
    hf = HF(models.BPE())  # RoBERTa-like: <mask> comes last in the vocabulary, a post-processor adds specials
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(SENTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(["<mask>"])
    plain = tokenizer.Tokenizer(HF.from_str(hf.to_str())).encode(SENTS[0], 64)
    hf.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    hf.enable_truncation(4)
    path = str(tmp_path / "rob.json")
    hf.save(path)
    tok = tokenizer.Tokenizer.load(path)
    assert tok.mask_id == hf.token_to_id("<mask>") == tok.vocab_size - 1 and tok.mask_id != 4
    assert tok.encode(SENTS[0], 64) == plain and len(plain) > 4  # no double <s>, no truncation to 4


def test_get_tokenizer_trains_never_reuses_a_file_it_finds_and_loads_a_given_one(toy, tmp_path):
    run = str(tmp_path / "run")
    t1 = tokenizer.get_tokenizer(toy, run, 300)
    assert os.path.isfile(os.path.join(run, "tokenizer.json"))
    small = tokenizer.Tokenizer.train(["a red circle"], 300, str(tmp_path / "other.json"))  # another run's tokenizer
    small.save(os.path.join(run, "tokenizer.json"))
    t2 = tokenizer.get_tokenizer(toy, run, 300)  # trained on the folder again, the stray file replaced
    assert t2.vocab_size == t1.vocab_size != small.vocab_size
    assert tokenizer.Tokenizer.load(os.path.join(run, "tokenizer.json")).vocab_size == t1.vocab_size
    t3 = tokenizer.get_tokenizer(toy, str(tmp_path / "elsewhere"), 300, tokenizer_path=os.path.join(run, "tokenizer.json"))
    assert t3.encode("a red circle", 16) == t1.encode("a red circle", 16)


def test_get_tokenizer_refuses_a_folder_without_texts(tmp_path):
    """A BPE trained on no text is bytes only: refused, and nothing is saved for a later run to reuse."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no texts in"):
        tokenizer.get_tokenizer(str(tmp_path / "data"), str(tmp_path / "run"), 300)
    assert not os.path.exists(tmp_path / "run" / "tokenizer.json")


def test_the_toy_world_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """build_if_missing writes into a private folder and renames it into place: while it builds, data/toy does
    not exist, so a second run never reads a half-built world; when another run's copy lands first, it is kept."""
    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_make_toy(out_dir, seed=0):
        seen.append(os.path.isdir(toyworld.DEFAULT_DIR))     # is the half-built world visible under the real name?
        os.makedirs(out_dir)
        open(os.path.join(out_dir, "pairs.jsonl"), "w").write("mine\n")
    monkeypatch.setattr(toyworld, "make_toy", fake_make_toy)
    toyworld.build_if_missing(toyworld.DEFAULT_DIR)
    assert seen == [False] and open(os.path.join(toyworld.DEFAULT_DIR, "pairs.jsonl")).read() == "mine\n"
    assert os.listdir(os.path.dirname(toyworld.DEFAULT_DIR)) == [os.path.basename(toyworld.DEFAULT_DIR)]

    def racing_make_toy(out_dir, seed=0):                   # another run finishes first, mid-build
        fake_make_toy(out_dir)
        os.makedirs(toyworld.DEFAULT_DIR)
        open(os.path.join(toyworld.DEFAULT_DIR, "pairs.jsonl"), "w").write("theirs\n")
    monkeypatch.setattr(toyworld, "make_toy", racing_make_toy)
    import shutil
    shutil.rmtree(toyworld.DEFAULT_DIR)
    toyworld.build_if_missing(toyworld.DEFAULT_DIR)
    assert open(os.path.join(toyworld.DEFAULT_DIR, "pairs.jsonl")).read() == "theirs\n"
    assert os.listdir(os.path.dirname(toyworld.DEFAULT_DIR)) == [os.path.basename(toyworld.DEFAULT_DIR)]

# ----------------------------------------------------------------------------- masking

def seq(tok, n, n_pad, rng):
    body = rng.integers(5, tok.vocab_size, size=n).tolist()
    return [tok.cls_id] + body + [tok.sep_id] + [tok.pad_id] * n_pad


def test_mask_text_specials_and_caps(tok):
    rng = np.random.default_rng(0)
    for n, prob, cap, want in ((100, 0.15, 20, 15), (200, 0.15, 20, 20), (40, 0.5, 15, 15), (10, 0.5, 15, 5),
                               (3, 0.15, 20, 1)):
        for _ in range(20):
            ids = seq(tok, n, 7, rng)
            m, lab = D.mask_text(ids, tok, prob, cap, rng)
            chosen = [i for i, v in enumerate(lab) if v != -100]
            assert len(m) == len(ids) and len(chosen) == want
            assert all(lab[i] == ids[i] for i in chosen)
            assert all(1 <= i <= n for i in chosen)  # never <s>, </s> or padding
            assert all(m[i] == ids[i] for i in range(len(ids)) if i not in chosen)
    m, lab = D.mask_text([tok.cls_id, tok.sep_id, tok.pad_id], tok, 0.5, 15, rng)
    assert m == [tok.cls_id, tok.sep_id, tok.pad_id] and lab == [-100] * 3
    a = D.mask_text(ids, tok, 0.15, 20, np.random.default_rng(5))
    assert a == D.mask_text(ids, tok, 0.15, 20, np.random.default_rng(5))


def test_mask_text_80_10_10_and_spans(tok):
    rng = np.random.default_rng(1)
    n_mask = n_rand = n_same = adjacent = total = 0
    for _ in range(2000):
        ids = seq(tok, 100, 0, rng)
        m, lab = D.mask_text(ids, tok, 0.15, 20, rng)
        chosen = [i for i, v in enumerate(lab) if v != -100]
        total += len(chosen)
        n_mask += sum(m[i] == tok.mask_id for i in chosen)
        n_same += sum(m[i] == ids[i] for i in chosen)
        n_rand += sum(m[i] not in (ids[i], tok.mask_id) and m[i] not in tok.special_ids for i in chosen)
        adjacent += sum(i + 1 in chosen for i in chosen)
    assert abs(n_mask / total - 0.8) < 0.02 and abs(n_rand / total - 0.1) < 0.015 and abs(n_same / total - 0.1) < 0.015
    assert n_mask + n_rand + n_same == total  # a random replacement is never a special token
    # skipgram spans make neighbours far more common than independent picks would (15/100 * 15 per seq)
    assert adjacent / 2000 > 1.3 * 15 * 0.15


def test_mask_text_never_masks_more_than_the_loss_has_slots(tok):
    """A row of <s> ... </s> never holds more masked positions than mlm_slots(its length), the slots
    losses.mlm_loss gives it; ids whose count would pass the bound (no </s> closing them) are refused."""
    rng = np.random.default_rng(0)
    for n in range(40):
        for prob, cap in ((0.15, 20), (0.5, 15), (0.15, 10 ** 6)):
            for skipgram in (0.0, 0.2, 1.0):  # 1.0: every start opens a span, the likeliest to overshoot
                ids = seq(tok, n, 0, rng)
                _, lab = D.mask_text(ids, tok, prob, cap, rng, skipgram_prob=skipgram)
                assert sum(v != -100 for v in lab) <= D.mlm_slots(len(ids), prob, cap)
    ids = seq(tok, 3, 0, rng)[:-1]  # <s> a b c: 3 candidates, round(1.5) = 2 masks, mlm_slots(4) = 1
    with pytest.raises(ValueError, match="mlm_slots"):
        D.mask_text(ids, tok, 0.5, 15, rng)


def test_block_mask_exact_and_fresh():
    assert D.mim_counts(14) == (75, 16) and D.mim_counts(8) == (24, 5) and D.mim_counts(4) == (6, 2)
    rng = np.random.default_rng(0)
    for grid in (4, 8, 14):
        masks = [D.block_mask(grid, *D.mim_counts(grid), rng) for _ in range(200)]
        assert all(m.dtype == bool and m.shape == (grid * grid,) for m in masks)
        assert all(m.sum() == D.mim_counts(grid)[0] for m in masks)
        # a fresh mask per call (a 4x4 grid has few block layouts, so repeats are expected there)
        assert len({m.tobytes() for m in masks}) > (60 if grid == 4 else 190)
    # block-wise, not scattered: a masked patch has ~3.3 masked 4-neighbours here, ~1.4 in a random mask
    nb = []
    for m in masks:
        g = np.pad(m.reshape(14, 14), 1).astype(int)
        nb.append(((g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]) * m.reshape(14, 14)).sum() / m.sum())
    assert np.mean(nb) > 2.2


# ----------------------------------------------------------------------------- transforms

def test_crop_boxes_hand_case():
    out = D.crop_boxes([[20, 30, 10, 20], [0, 0, 15, 15], [5, 25, 10, 10]], (10, 20, 60, 70))
    assert np.allclose(out[0], (0.3, 0.4, 0.2, 0.4))  # (20-10+5)/50, (30-20+10)/50, 10/50, 20/50
    assert out[1] is None  # it ends at y=15, above the crop
    assert np.allclose(out[2], (0.05, 0.2, 0.1, 0.2))  # half inside: clipped to x 10..15


def test_region_crop_keeps_and_maps_box():
    img = Image.new("RGB", (64, 48), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([20, 10, 31, 17], fill=(255, 255, 255))  # box [20, 10, 12, 8]
    box = [20, 10, 12, 8]
    for seed in range(30):
        x, (b,) = D.region_crop(img, [box], 64, np.random.default_rng(seed))
        assert x.shape == (3, 64, 64) and b is not None
        cx, cy, w, h = b
        assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
        white = (x[0] * transforms.CLIP_STD[0] + transforms.CLIP_MEAN[0]) > 0.5  # (64, 64)
        ys, xs = torch.nonzero(white, as_tuple=True)
        # the white pixels fill the returned box (to within a pixel of bicubic blur)
        assert abs((xs.min().item() - (cx - w / 2) * 64)) <= 1.5 and abs(xs.max().item() + 1 - (cx + w / 2) * 64) <= 1.5
        assert abs((ys.min().item() - (cy - h / 2) * 64)) <= 1.5 and abs(ys.max().item() + 1 - (cy + h / 2) * 64) <= 1.5
    _, out = D.region_crop(img, [box], 32, np.random.default_rng(0), min_scale=1.0)  # no crop
    assert np.allclose(out[0], (26 / 64, 14 / 48, 12 / 64, 8 / 48))
    for seed in range(20):  # the crop covers >= 80 % of the image, so the box fills at most 1/0.8 of its share
        _, (b,) = D.region_crop(img, [box], 32, np.random.default_rng(seed), min_scale=0.8)
        assert b[2] * b[3] <= (12 * 8) / (0.8 * 64 * 48) + 1e-6
    dropped = [D.region_crop(img, [box, [0, 40, 8, 8]], 32, np.random.default_rng(s), n_keep=1)[1][1]
               for s in range(30)]  # only the first box must survive; the second may fall out
    assert any(d is None for d in dropped) and all(0 <= v <= 1 for d in dropped if d for v in d)


def test_box_patch_mask():
    idx = lambda m: sorted(np.flatnonzero(m).tolist())  # noqa: E731
    assert D.box_patch_mask((0.5, 0.5, 1, 1), 4).all()
    assert idx(D.box_patch_mask((0.125, 0.125, 0.25, 0.25), 4)) == [0]
    assert idx(D.box_patch_mask((0.375, 0.625, 0.25, 0.25), 4)) == [9]  # exactly cell (row 2, col 1)
    assert idx(D.box_patch_mask((0.5, 0.5, 0.1, 0.1), 4)) == [5, 6, 9, 10]
    assert idx(D.box_patch_mask((0.9, 0.1, 0.0, 0.0), 4)) == [3]  # degenerate: the cell under the centre


def test_random_resized_crop_and_eval_transform():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    ImageDraw.Draw(img).rectangle([0, 0, 9, 29], fill=(0, 0, 255))  # blue left edge
    x = transforms.random_resized_crop(img, 16, np.random.default_rng(0), scale=(1, 1), hflip=False)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, transforms.eval_transform(img, 16))  # scale (1, 1) and no flip: the plain resize
    assert x[2, 8, 0] > x[2, 8, 15]  # blue stays on the left
    flips = [transforms.random_resized_crop(img, 16, np.random.default_rng(s), scale=(1, 1))[2, 8, 0] < 0 for s in range(40)]
    assert 5 < sum(flips) < 35  # with hflip the blue edge moves right about half the time
    red = torch.tensor(float((1 - transforms.CLIP_MEAN[0]) / transforms.CLIP_STD[0]))  # float32 under NumPy 1.26 and 2.x
    assert torch.allclose(transforms.eval_transform(Image.new("RGB", (8, 8), (255, 0, 0)), 4)[0], red)


def test_a_jpeg_decodes_at_the_resolution_its_crops_need(tmp_path, monkeypatch):
    """A pair or image JPEG decodes at a reduced DCT scale (Image.draft) only as far as every random resized crop
    it can draw keeps `size` pixels on its shorter side (transforms.crop_draft); the crop is then close to that of
    the full decode. Other formats decode in full, and the datasets pass the draft."""
    yy, xx = np.mgrid[0:512, 0:384]                                        # a smooth 384 x 512 picture
    a = np.stack([xx / 384 * 255, yy / 512 * 255, ((xx - 192) ** 2 + (yy - 256) ** 2 < 100 ** 2) * 255], -1)
    for ext in ("jpg", "png"):
        Image.fromarray(a.astype(np.uint8)).save(tmp_path / f"a.{ext}", quality=95)
    jpg = str(tmp_path / "a.jpg")
    # 32 px from crops of at least 0.8 of the area: 1/8 scale; 224 px from 0.2 of it: the full image
    for size, scale, decoded in [(32, (0.8, 1.0), (48, 64)), (224, (0.2, 1.0), (384, 512)), (32, (1, 1), (48, 64))]:
        im = formats.load_image(jpg, transforms.crop_draft(size, scale))
        W, H = im.size                                                     # drafted: the smallest crop keeps size
        assert im.size == decoded and (im.size == (384, 512) or min(math.sqrt(scale[0] * W * H * 0.75), W, H) >= size)
    assert formats.load_image(str(tmp_path / "a.png"), transforms.crop_draft(32, (0.8, 1.0))).size == (384, 512)
    crop = lambda im: transforms.random_resized_crop(im, 32, np.random.default_rng(1), scale=(1, 1), hflip=False)
    full, drafted = crop(formats.load_image(jpg)), crop(formats.load_image(jpg, transforms.crop_draft(32, (1, 1))))
    assert (full - drafted).abs().mean() < 0.05                             # about 3 grey levels of 255
    drafts = []
    monkeypatch.setattr(formats, "load_image", lambda path, draft=None: drafts.append(draft) or Image.open(path))
    dc = D.DataConfig(**{**DC, "crop_scale": (0.8, 1.0)})
    D.ImageDataset([{"image": jpg, "where": "a:1"}], dc, formats.BadInput(verbose=False))[0, 0]
    assert drafts[0] is not None and drafts[0](384, 512) == (36, 48)


def test_uint8_images_normalised_on_the_device_equal_to_tensor(toy, tok):
    """Every value of every channel: transforms.normalize (a table lookup, on the device) gives to_tensor's float32
    bit for bit; and a stream of uint8 images (DataConfig.uint8_images, CUDA runs) gives, once through
    runtime.to_device, exactly the float batch, a quarter of the bytes before."""
    every = np.stack([np.roll(np.arange(256), c) for c in range(3)], -1).astype(np.uint8)  # (256, 3)
    img = Image.fromarray(every[:, None, :])                      # 256 x 1 pixels: each channel takes every value
    assert torch.equal(transforms.normalize(transforms.to_uint8(img)), transforms.to_tensor(img))
    floats, raw = (streams(toy, tok, uint8_images=u) for u in (False, True))
    for kind in ("image", "pair", "region"):
        a, b = next(floats[kind]), next(raw[kind])
        assert b["image"].dtype == torch.uint8 and a["image"].dtype == torch.float32
        b = runtime.to_device(b, torch.device("cpu"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), kind
    # FLAVA's k-means image tokenizer reads the pair dataset's images itself: the same codebook from either
    books = []
    for found in (floats, raw):
        model = flava.FLAVA(flava.make_flava_config("tiny", vocab_size=64, image_size=32, codebook_size=16))
        flava.fit_image_tokenizer(model, found["pair"].dataset, n_images=8)
        books.append(model.image_tokenizer.codebook)
    assert torch.equal(*books)


# ----------------------------------------------------------------------------- sampler and streams

def test_sharding_disjoint_equal_and_reshuffled():
    n, B, W, seed = 23, 4, 2, 3
    samplers = [stream_lib.ShardedBatchSampler(n, B, seed, r, W) for r in range(W)]
    assert samplers[0].batches_per_epoch == 2
    per_rank = [[i for b in s.epoch_batches(0) for i, e in b] for s in samplers]
    assert all(len(p) == 8 for p in per_rank) and not set(per_rank[0]) & set(per_rank[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000)).tolist()
    assert set(per_rank[0]) | set(per_rank[1]) == set(perm[:16])
    e1 = [i for b in samplers[0].epoch_batches(1) for i, e in b]
    assert e1 != per_rank[0]
    it = iter(samplers[0])  # infinite: epoch 0's two batches, then epoch 1's
    got = [next(it) for _ in range(4)]
    assert [e for b in got for _, e in b] == [0] * 8 + [1] * 8 and all(len(b) == B for b in got)
    assert [i for b in got[2:] for i, _ in b] == e1
    with pytest.raises(ValueError, match="fewer than world_size"):
        stream_lib.ShardedBatchSampler(7, 4, 0, 0, 2)


def test_stream_resume_is_exact(toy, tok):
    a = streams(toy, tok)
    assert set(a) == set(D.KINDS)
    for kind, st in a.items():
        first = [next(st) for _ in range(5)]  # crosses an epoch boundary for the image and region streams
        assert st.state_dict() == {"batches": 5}
        b = streams(toy, tok)[kind]
        b.load_state_dict({"batches": 2})
        again = [next(b) for _ in range(3)]
        for x, y in zip(first[2:], again):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        assert not torch.equal(first[0][next(iter(first[0]))], first[1][next(iter(first[1]))])
    assert a["image"].len_per_epoch == 3 and a["image"].epoch == 1


def test_workers_do_not_change_batches(toy, tok):
    for kind in ("pair", "region"):
        one = streams(toy, tok)[kind]
        two = streams(toy, tok, num_workers=2)[kind]
        for _ in range(2):
            x, y = next(one), next(two)
            assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)


def test_batch_formats(toy, tok):
    st = streams(toy, tok, bs=4)
    P = 16
    t = next(st["text"])
    assert set(t) == {"ids", "att", "labels", "mlm_slots"}
    assert all(t[k].dtype == torch.long and t[k].shape == t["ids"].shape for k in ("ids", "att", "labels"))
    assert t["mlm_slots"] == D.mlm_slots(t["ids"].shape[1], 0.15, 20)
    assert (t["labels"][t["att"] == 0] == -100).all() and (t["labels"][:, 0] == -100).all()
    assert (t["ids"][t["att"] == 0] == tok.pad_id).all() and ((t["labels"] != -100).sum(1) >= 1).all()
    n_real = t["att"].sum(1) - 2  # MLM on text: 15 % of the tokens between <s> and </s>, at most 20
    assert torch.equal((t["labels"] != -100).sum(1), torch.clamp(torch.round(n_real * 0.15), 1, 20).long())

    im = next(st["image"])
    assert set(im) == {"image", "mim_mask", "mim_count"} and im["mim_count"] == 6
    assert im["image"].shape == (4, 3, 32, 32) and im["image"].dtype == torch.float32
    assert im["mim_mask"].shape == (4, P) and im["mim_mask"].dtype == torch.bool
    assert (im["mim_mask"].sum(1) == 6).all()

    p = next(st["pair"])
    assert set(p) == {"image", "mim_mask", "mim_count", "ids", "att", "mlm_ids", "mlm_labels", "img_id", "itm_label",
                      "mlm_slots"}
    assert (p["itm_label"] == 1).all()                                      # X-FM swaps no captions
    assert p["image"].shape == (4, 3, 32, 32) and p["mim_mask"].shape == (4, P)
    assert p["img_id"].shape == (4,) and p["img_id"].dtype == torch.long
    for k in ("ids", "att", "mlm_ids", "mlm_labels"):
        assert p[k].dtype == torch.long and p[k].shape == p["ids"].shape
    masked = p["mlm_labels"] != -100
    assert (p["mlm_labels"][masked] == p["ids"][masked]).all() and (p["att"][masked] == 1).all()
    assert torch.equal(p["mlm_ids"][~masked], p["ids"][~masked])
    n_real = (p["att"].sum(1) - 2)  # IMLM: half the caption's tokens, at most 15
    assert torch.equal(masked.sum(1), torch.clamp(torch.round(n_real * 0.5), 1, 15).long())
    assert (masked.sum(1) <= p["mlm_slots"]).all() and p["mlm_slots"] == D.mlm_slots(p["ids"].shape[1], 0.5, 15)

    r = next(st["region"])
    keys = {"image", "img_index", "ids", "att", "mlm_ids", "mlm_labels", "box", "is_region", "patch_mask", "img_id",
            "filled", "mlm_slots"}
    assert set(r) == keys and r["image"].shape == (4, 3, 32, 32)
    N, slots = r["img_index"].shape[0], st["region"].dataset.slots
    assert slots == 4  # the toy records hold 1-3 regions, + the whole-image caption
    assert N == 4 * slots and torch.equal(r["img_index"], torch.arange(4).repeat_interleave(slots))
    # the empty slots: an empty caption, nothing masked, no region, every patch, and the image's id
    filled = r["filled"]
    assert filled.dtype == torch.bool and 4 < filled.sum() < N
    assert (r["att"][~filled].sum(1) == 2).all() and (r["mlm_labels"][~filled] == -100).all()
    assert not r["is_region"][~filled].any() and r["patch_mask"][~filled].all()
    r = {k: v[filled] if torch.is_tensor(v) and v.shape[:1] == (N,) else v for k, v in r.items()}  # the filled slots
    N = r["img_index"].shape[0]
    for k in ("ids", "att", "mlm_ids", "mlm_labels"):
        assert r[k].shape[0] == N and r[k].dtype == torch.long
    assert r["box"].shape == (N, 4) and r["box"].dtype == torch.float32 and ((r["box"] >= 0) & (r["box"] <= 1)).all()
    assert r["is_region"].dtype == torch.bool
    n_real = r["att"].sum(1) - 2  # IMLM on region captions too: half the caption's tokens, at most 15
    assert torch.equal((r["mlm_labels"] != -100).sum(1), torch.clamp(torch.round(n_real * 0.5), 1, 15).long())
    assert r["patch_mask"].shape == (N, P) and r["patch_mask"].dtype == torch.bool
    whole = ~r["is_region"]
    assert whole.sum() == 4  # every toy record has a whole-image caption
    assert r["patch_mask"][whole].all() and torch.allclose(r["box"][whole], torch.tensor([0.5, 0.5, 1, 1]))
    assert r["img_id"].shape == (N,) and all(
        len(set(r["img_id"][r["img_index"] == b].tolist())) == 1 for b in range(4))


def test_load_retrieval_set(toy, tok):
    ret = retrieval.load_retrieval_set(os.path.join(toy, "pairs_test.jsonl"), tok, 32, 16, formats.BadInput(verbose=False))
    Ni, Nt = len(ret["image"]), ret["ids"].shape[0]                    # the images are decoded when asked for
    assert Ni == 10 and ret["image"][Ni - 1].shape == (3, 32, 32)
    assert Ni < Nt <= 2 * Ni and ret["att"].shape == ret["ids"].shape
    assert ret["txt2img"].shape == (Nt,) and len(ret["img2txt"]) == Ni
    for i, txts in enumerate(ret["img2txt"]):
        assert txts and all(ret["txt2img"][t] == i for t in txts)


def test_cli(toy, capsys):
    with pytest.raises(SystemExit) as e:
        formats.main(["--help"])
    assert e.value.code == 0 and "check" in capsys.readouterr().out
    formats.main(["check", "--data_dir", toy])
    out = capsys.readouterr().out
    assert "24 images" in out and "bad input: none" in out
