"""Tests for lib/shards.py: tar shards streamed per rank. The converter keeps data.py's samples (same ordinal, same
caption, image, crop and masks); every rank yields the same number of batches an epoch; a stream resumed
mid-epoch continues exactly (with and without DataLoader workers); bad members are named, skipped and counted;
bad input and flags stop with one clear error before any work; and train.py in 2 gloo processes trains from
shards and resumes mid-epoch to the uninterrupted run's losses and parameters.
Run: python -m pytest tests/test_shards.py -q   (CPU, about 20 s)"""
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data as D
from lib import runlog
from lib import formats
from lib import runtime
from lib import shards
from lib import tokenizer
from lib import toyworld
import train
from conftest import gloo_group, rendezvous

SMALL = dict(size=32, n_pairs=24, n_regions=12, n_text=30, n_images=12, n_test=6, n_down=4, progress=False)
DC = dict(image_size=32, patch_size=8, text_len=32, caption_len=16, seed=0, crop_scale=(0.5, 1.0), hflip=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small JSONL toy world and its shards (7 samples a shard: the last shard of each kind is shorter)."""
    root = tmp_path_factory.mktemp("shards")
    toyworld.make_toy(str(root / "toy"), seed=0, **SMALL)
    shards.pack(str(root / "toy"), str(root / "packed"), shard_size=7, progress=False, verbose=False)
    tok = tokenizer.get_tokenizer(str(root / "toy"), str(root / "run"), vocab_size=300)
    return str(root / "toy"), str(root / "packed"), tok


def stream(folder, kind, tok, batch=4, rank=0, world=1, workers=0, buffer=5, bad=None, **dc):
    return shards.ShardStream(kind, os.path.join(folder, shards.FOLDERS[kind]), tok, D.DataConfig(**{**DC, **dc}),
                              batch, rank=rank, world_size=world, num_workers=workers, buffer=buffer,
                              bad=bad or formats.BadInput(verbose=False))


def same_batch(x, y, skip=()):
    assert x.keys() == y.keys()
    for k in x:
        if k not in skip:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


# ----------------------------------------------------------------------------- the converter keeps the samples

def test_packed_shards_give_the_jsonl_samples(toy, tmp_path):
    """Ordinal g of the shards is data.py's index g: the same caption and image, and (keyed (seed, stream, epoch,
    g)) the same crop, masks and masked caption, in epoch 0 and epoch 1. The tokenizer corpus is the same, the
    regions and held-out pairs come along, and packing again gives the same bytes."""
    jsonl, packed, tok = toy
    src, bad = formats.find_sources(jsonl), formats.BadInput(verbose=False)
    dc = D.DataConfig(**DC)
    plain = {"pair": D.PairDataset(formats.parse_pairs(src["pair"], bad), tok, dc, bad),
             "image": D.ImageDataset(formats.parse_images(src["image"], bad), dc, bad),
             "text": D.TextDataset(formats.parse_texts(src["text"], bad), tok, dc, bad)}
    for kind, ds in plain.items():
        st = stream(packed, kind, tok)
        assert st.reader.index.total == len(ds)
        seen = {0: [], 1: []}
        for _ in range(st.len_per_epoch + 2):                      # all of epoch 0, and into epoch 1
            batch = next(st)
            g, epoch = st.last["ordinal"].tolist(), st.last["epoch"]
            seen[epoch] += g
            want = ds.collate([ds[(i, epoch)] for i in g])
            assert want.pop("bad", []) == []                      # (the stream counts a batch's bad input)
            same_batch(batch, want, skip=("img_id",))             # img_id: an id within the batch, see below
            if "img_id" in batch:                                 # the same image <=> the same id
                assert torch.equal(batch["img_id"][:, None] == batch["img_id"][None],
                                   want["img_id"][:, None] == want["img_id"][None])
        assert len(set(seen[0])) == len(seen[0]) == st.reader.k * st.reader.batch_size and set(seen[0]) <= set(range(len(ds)))
        assert len(seen[1]) == 2 * st.reader.batch_size
    head = stream(packed, "pair", tok).dataset                    # map-style: FLAVA fits its image tokenizer on it
    assert len(head) == len(plain["pair"])
    for i in (0, 17, len(head) - 1):
        same_batch(head[(i, 0)], plain["pair"][(i, 0)], skip=("img_id",))
    # what else the folder holds
    got = formats.find_sources(packed)
    assert set(got) == {"region", "pair_test"}                     # images/ holds tars: a shard folder, not images
    assert set(shards.find_shards(packed)) == {"pair", "image", "text"}
    assert len(formats.parse_regions(got["region"], bad)) == len(formats.parse_regions(src["region"], bad))
    assert len(formats.parse_pairs(got["pair_test"], bad)) == len(formats.parse_pairs(src["pair_test"], bad))
    assert bad.counts() == {}
    assert Counter(tokenizer.corpus_texts(packed)) == Counter(tokenizer.corpus_texts(jsonl))
    shards.pack(jsonl, str(tmp_path / "again"), shard_size=7, progress=False, verbose=False)
    for name in sorted(os.listdir(os.path.join(packed, "pairs"))):
        with open(os.path.join(packed, "pairs", name), "rb") as a, open(tmp_path / "again" / "pairs" / name, "rb") as b:
            assert a.read() == b.read(), name


# ----------------------------------------------------------------------------- equal batches, exact resume

def test_every_rank_yields_the_same_batches_each_epoch(toy):
    """30 texts in shards of 7, 7, 7, 7, 2 over 4 ranks (batch 2): every rank yields k = 30 // 4 // 2 = 3 batches
    an epoch, of disjoint samples; the next epoch cuts the files differently."""
    _, packed, tok = toy
    world, per_rank = 4, {}
    for rank in range(world):
        st = stream(packed, "text", tok, batch=2, rank=rank, world=world)
        batches = [(next(st), st.last) for _ in range(6)]
        per_rank[rank] = {e: [g for _, last in batches if last["epoch"] == e for g in last["ordinal"].tolist()]
                          for e in (0, 1)}
        assert st.len_per_epoch == 3 and [last["epoch"] for _, last in batches] == [0, 0, 0, 1, 1, 1]
    for e in (0, 1):
        every = [g for r in range(world) for g in per_rank[r][e]]
        assert all(len(per_rank[r][e]) == 6 for r in range(world)) and len(set(every)) == 24 <= 30
    assert per_rank[0][0] != per_rank[0][1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_exactly_mid_epoch(toy, workers, capsys):
    """Batches 5.. of a stream restarted at 5 (a shuffle buffer of 5 out of 24 samples a slot: the buffer is
    rebuilt) equal the uninterrupted stream's, through the end of the epoch and into the next; with 2 workers,
    batch 5 comes from the second worker's slot. A resume over another number of ranges warns."""
    _, packed, tok = toy
    a = stream(packed, "pair", tok, workers=workers, world=1 if workers else 2, rank=0 if workers else 1)
    first = [next(a) for _ in range(a.len_per_epoch + 2)]
    assert a.state_dict() == {"batches": len(first), "slots": 2} and a.epoch == 1
    b = stream(packed, "pair", tok, workers=workers, world=1 if workers else 2, rank=0 if workers else 1)
    b.load_state_dict({"batches": 5, "slots": 2})
    for x in first[5:]:
        same_batch(x, next(b))
    stream(packed, "pair", tok, bad=formats.BadInput()).load_state_dict({"batches": 5, "slots": 2})
    assert "read in 2 ranges (world size x workers), now in 1" in capsys.readouterr().err


def test_buffer_shuffle_depends_on_its_key_only():
    """The buffer's order is a permutation fixed by (n, size, rng); each position leaves the buffer at most
    size - 1 places before... it is read (a bounded buffer), and it does shuffle."""
    def order(seed, n=50, size=8):
        sh = shards.BufferShuffle(n, size, np.random.default_rng(seed))
        return [sh.pop() for _ in range(n)]
    a = order(0)
    assert sorted(a) == list(range(50)) and a == order(0) and a != order(1) and a != sorted(a)
    assert all(pos < out_at + 8 for out_at, pos in enumerate(a))  # handed out only once read: a buffer of 8


# ----------------------------------------------------------------------------- bad members

def png(colour):
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    return out.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, raw in members:
            shards._add(tf, name, raw)


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_members_are_named_skipped_and_counted(tmp_path, toy, workers):
    """A corrupt image, a missing caption, a caption that is not UTF-8 and a JSON record without a caption are
    each named as shard.tar:member, counted once (also when found in a worker) and never trained on: the next good
    sample takes the place, with the bad sample's ordinal; the batches stay full."""
    _, _, tok = toy
    folder = tmp_path / "d" / "pairs"
    folder.mkdir(parents=True)
    good = {i: png((40 * i, 0, 0)) for i in range(8)}
    write_tar(folder / "00000.tar", [
        ("000000.png", good[0]), ("000000.txt", b"a red circle"),
        ("000001.png", b"\x89PNG not an image"), ("000001.txt", b"a broken image"),
        ("000002.png", good[2]), ("000002.txt", b"a blue square"),
        ("000003.png", good[3]),                                                 # no caption
        ("000004.png", good[4]), ("000004.txt", b"caf\xe9 latin-1"),
        ("000005.png", good[5]), ("000005.json", b'{"url": "http://x"}'),         # no caption field
        ("000006.png", good[6]), ("000006.json", json.dumps({"caption": ["a green cross", "one shape"]}).encode()),
        ("000007.png", good[7]), ("000007.txt", b"a yellow diamond")])
    shards.write_index(str(folder), "pair", progress=False)
    bad = formats.BadInput(verbose=False)
    st = stream(str(tmp_path / "d"), "pair", tok, batch=4, workers=workers, buffer=1, bad=bad)  # buffer 1: file order
    b1, b2 = next(st), next(st)
    assert st.last["ordinal"].tolist() == [4, 5, 6, 7]
    assert bad.counts() == {"unreadable image": 1, "missing caption": 1, "not UTF-8": 1, "malformed record": 1}
    if workers == 0:  # (a worker prints its own lines)
        where = [m.split(": ")[0] for m in bad.messages]
        assert where == [f"{folder}/00000.tar:{n}" for n in ("000001.png", "000003", "000004.txt", "000005.json")]
    assert [tok.decode(r) for b in (b1, b2) for r in b["ids"]] == [
        "a red circle", "a blue square", "a blue square", "a green cross",        # 1 -> 2, 3 -> 6 (4, 5 are bad)
        "a green cross", "a green cross", "a green cross", "a yellow diamond"]
    img = torch.cat([b1["img_id"], b2["img_id"] + 100])
    assert img[1] == img[2] and img[4] == img[5] == img[6] != img[7] and b1["img_id"][3] != b1["img_id"][2]
    # text lines too: one not UTF-8 is named file.txt:LINE and counted
    text = tmp_path / "d" / "text"
    text.mkdir()
    (text / "00000.txt").write_bytes(b"one\ntwo\n\ncaf\xe9 three\nfour\n")
    shards.write_index(str(text), "text", progress=False)
    bad = formats.BadInput(verbose=False)
    next(stream(str(tmp_path / "d"), "text", tok, batch=4, workers=workers, buffer=1, bad=bad))
    assert bad.counts() == {"not UTF-8": 1}
    assert workers or bad.messages[0].startswith(f"{text}/00000.txt:4: not UTF-8")


# ----------------------------------------------------------------------------- clear errors before any work

def test_bad_folders_and_flags_stop_with_one_clear_error(toy, tmp_path, capsys):
    jsonl, packed, tok = toy
    d = tmp_path / "d"
    (d / "pairs").mkdir(parents=True)
    write_tar(d / "pairs" / "00000.tar", [("0.png", png((0, 0, 0))), ("0.txt", b"a black image")] * 1 +
              [("1.png", png((9, 9, 9))), ("1.txt", b"a dark image")])
    with pytest.raises(SystemExit, match="index.json: missing .*; write it with: python -m lib.shards index --data_dir"):
        stream(str(d), "pair", tok)
    shards.main(["index", "--data_dir", str(d)])
    assert "pair   " in capsys.readouterr().out and stream(str(d), "pair", tok, batch=2).reader.index.total == 2
    with pytest.raises(SystemExit, match="fewer than world_size x workers x batch_size = 2 x 1 x 2"):
        stream(str(d), "pair", tok, batch=2, world=2)
    write_tar(d / "pairs" / "00001.tar", [("2.png", png((1, 1, 1)))])
    with pytest.raises(SystemExit, match="index.json: 00001.tar is in the folder but not listed in"):
        stream(str(d), "pair", tok)
    os.remove(d / "pairs" / "00001.tar")
    with open(d / "pairs" / "00000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(SystemExit, match="index.json: 00000.tar has 10752 bytes, indexed with 10240"):
        stream(str(d), "pair", tok)
    with pytest.raises(SystemExit, match="is not an empty folder"):
        shards.main(["pack", "--data_dir", jsonl, "--out", packed])
    with pytest.raises(SystemExit, match="--shard_size must be at least 1"):
        shards.main(["pack", "--data_dir", jsonl, "--out", str(tmp_path / "new"), "--shard_size", "0"])
    with pytest.raises(SystemExit, match="holds no pairs, images or text"):
        shards.main(["pack", "--data_dir", str(tmp_path), "--out", str(tmp_path / "new")])
    with pytest.raises(SystemExit, match="holds no shard folder"):
        shards.main(["index", "--data_dir", jsonl])
    assert not os.path.exists(tmp_path / "new")
    for cmd in ("pack", "index"):
        with pytest.raises(SystemExit):
            shards.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--data_dir" in out and (cmd == "index" or "--shard_size" in out and "--out" in out)


# ----------------------------------------------------------------------------- train.py, 2 gloo processes

STEPS = ["--max_steps=4", "--log_every=1", "--warmup_steps=1", "--batch_size=8", "--text_batch_size=8",
         "--eval_k=4", "--caption_len=24", "--text_len=32", "--shuffle_buffer=4"]


def _train_worker(rank, meet, folder, tok, root):
    with gloo_group(rank, 2, meet, timeout_s=60):
        # train.main as under `torchrun --nproc_per_node=2`, in the group the test made
        runtime.setup_distributed = lambda name: (True, rank, rank, 2, torch.device("cpu"))
        runtime.teardown = lambda: None
        args = [f"--data_dir={folder}", f"--tokenizer={tok}", *STEPS]
        train.main([*args, f"--out_dir={root}/straight"])
        train.main([*args, f"--out_dir={root}/stopped", "--stop_at=2"])
        train.main([f"--resume={root}/stopped", "--stop_at=0"])


def test_train_from_shards_in_two_processes_resumes_exactly_mid_epoch(tmp_path):
    """Pairs (48 a epoch: 6 batches a rank), images (24: 3) and text (20: 2) from shards, regions from JSONL. A
    run stopped after step 2 (mid-epoch for pairs and images, at the end of the text's epoch) and resumed gives
    the uninterrupted run's losses at every step and its final parameters; no rank waits for another (the group's
    60 s timeout turns a hang into a failure)."""
    toy, folder = str(tmp_path / "toy"), str(tmp_path / "shards")
    toyworld.make_toy(toy, seed=0, size=32, n_pairs=24, n_regions=8, n_text=20, n_images=24, n_test=1, n_down=2,
                      progress=False)
    shards.pack(toy, folder, shard_size=5, progress=False, verbose=False)
    os.remove(os.path.join(folder, "pairs_test.jsonl"))                       # no retrieval evaluation: faster
    tok = os.path.join(str(tmp_path), "tokenizer.json")
    tokenizer.get_tokenizer(folder, str(tmp_path), 300)                       # trained on the shards' texts
    root = str(tmp_path / "runs")
    mp.spawn(_train_worker, args=(rendezvous(), folder, tok, root), nprocs=2, join=True)
    logs = {}
    for run in ("straight", "stopped"):
        lines = [json.loads(line) for line in open(os.path.join(root, run, "metrics.jsonl"))]
        logs[run] = [r for r in lines if not r.get("final")]
    assert [r["step"] for r in logs["straight"]] == [r["step"] for r in logs["stopped"]] == [1, 2, 3, 4]
    for a, b in zip(logs["straight"], logs["stopped"]):
        keys = {k for k in a if k.startswith("loss/") or k in ("grad_norm", "temp")}
        assert {"loss/itc", "loss/mlm", "loss/mim_image", "loss/itc_region"} <= keys
        for k in keys:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    ma, mb = (runlog.load_checkpoint(os.path.join(root, run), "cpu") for run in ("straight", "stopped"))
    assert ma["data"] == mb["data"] == {"region": {"batches": 4}, **{k: {"batches": 4, "slots": 2} for k in
                                                                     ("text", "image", "pair")}}
    for k in ma["model"]:
        assert torch.allclose(ma["model"][k], mb["model"][k], rtol=0, atol=1e-6), k
    config = json.load(open(os.path.join(root, "straight", "config.json")))
    assert config["data"]["pair"].endswith("pairs") and config["data"]["region"].endswith("regions.jsonl")
