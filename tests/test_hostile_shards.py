"""Hostile shard input: an index.json that lies is refused at start-up with one line that names it, the problem and
the command that rewrites it; a tar sample holding its members twice is named and counted once, its first member
of each extension kept; a bad record counts once however often it is drawn (epochs, DataLoader workers, a resume);
and `lib/shards.py pack` reads only image files under the data folder (or --image_root), whatever a record names.
Run: python -m pytest tests/test_hostile_shards.py -q   (CPU, about 10 s)"""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

import data as D
from lib import formats
from lib import shards
from lib import streams
from lib import tokenizer

DC = D.DataConfig(image_size=16, patch_size=8, text_len=16, caption_len=16, seed=0, crop_scale=(1.0, 1.0))
CAPTIONS = ["a red circle", "a blue square", "a green cross", "a yellow diamond", "a dark image", "a black image"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer.Tokenizer.train(CAPTIONS * 4, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


# png() and write_tar() are tests/test_shards.py's: importing that module would import train.py (a second a bug)
def png(colour):
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    return out.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, raw in members:
            shards._add(tf, name, raw)


def quiet(strict=False):
    return formats.BadInput(strict=strict, verbose=False)


def stream(root, kind, tok, bad, batch=4, workers=0):
    """A stream over root/pairs (or images/, text/) that reads in file order (a shuffle buffer of 1)."""
    return shards.ShardStream(kind, os.path.join(root, shards.FOLDERS[kind]), tok, DC, batch, rank=0, world_size=1,
                              num_workers=workers, bad=bad, buffer=1)


# ----------------------------------------------------------------------------- index.json: verified, not trusted

def pair_folder(root, n=(3, 2)):
    """root/pairs: 00000.tar, 00001.tar ... holding n[0], n[1] ... pairs, and the index.json lib/shards.py writes."""
    folder = root / "pairs"
    folder.mkdir(parents=True)
    g = 0
    for f, count in enumerate(n):
        members = []
        for _ in range(count):
            members += [(f"{g:06d}.png", png((30 * g, 0, 0))), (f"{g:06d}.txt", CAPTIONS[g % 6].encode())]
            g += 1
        write_tar(folder / f"{f:05d}.tar", members)
    shards.write_index(str(folder), "pair", progress=False)
    return folder


def edit_index(folder, edit):
    """Rewrite folder/index.json as edit(the parsed index) gives it (an edit returning a str writes that text)."""
    with open(folder / "index.json") as f:
        index = edit(json.load(f))
    (folder / "index.json").write_text(index if isinstance(index, str) else json.dumps(index))


def on_file(i, field, value):
    def edit(index):
        index["files"][i][field] = value
        return index
    return edit


def without_digest(edit):
    def both(index):
        index = edit(index)
        index.pop("digest", None)
        return index
    return both


HOSTILE = {  # an edit of a good index -> what the one-line refusal says
    "negative-everywhere": (without_digest(lambda x: {**x, "files": [{**f, "samples": -1} for f in x["files"]]}),
                            "files[0] has 'samples' -1, not an int >= 0"),
    "negative-once": (without_digest(on_file(1, "samples", -2)), "files[1] has 'samples' -2, not an int >= 0"),
    "float": (without_digest(on_file(0, "samples", 31.9)), "files[0] has 'samples' 31.9, not an int >= 0"),
    "bool": (without_digest(on_file(0, "samples", True)), "files[0] has 'samples' true, not an int >= 0"),
    "null": (without_digest(on_file(0, "samples", None)), "files[0] has 'samples' null, not an int >= 0"),
    "no-sizes": (without_digest(lambda x: {**x, "files": [{"name": f["name"], "samples": f["samples"]}
                                                           for f in x["files"]]}), "files[0] has no 'bytes'"),
    "billion": (without_digest(on_file(0, "samples", 10 ** 9)),
                  "00000.tar is listed with 1000000000 samples, more than its 10240 bytes can hold (20)"),
    "listed-twice": (without_digest(lambda x: {**x, "files": x["files"] + x["files"][:1]}),
                     "00000.tar is listed 2 times"),
    "file-missing": (without_digest(lambda x: {**x, "files": x["files"] + [{**x["files"][0], "name": "9.tar"}]}),
                       "9.tar is listed but not in"),
    "under-count": (on_file(0, "samples", 2), "its digest does not match its files list"),
    "not-json": (lambda x: '{"files": [', "not JSON (Expecting value"),
    "nested": (lambda x: "[" * 100_000, "not JSON (nested deeper than"),
    "not-an-index": (lambda x: [x], 'not a shard index {"files"'),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_an_index_that_lies_is_one_line_naming_it_and_the_command(tmp_path, tok, case):
    """Each lie is refused before any work, in one line that names index.json, says what is wrong and gives the
    command that rewrites it; running that command makes the folder stream again."""
    folder = pair_folder(tmp_path / "d")
    edit, problem = HOSTILE[case]
    edit_index(folder, edit)
    with pytest.raises(SystemExit) as e:
        stream(str(tmp_path / "d"), "pair", tok, quiet())
    msg = str(e.value)
    assert msg.startswith(f"error: {folder}/index.json: {problem}") and "\n" not in msg, msg
    assert msg.endswith(f"; rewrite it with: python -m lib.shards index --data_dir {tmp_path / 'd'}")
    shards.main(["index", "--data_dir", str(tmp_path / "d")])
    assert stream(str(tmp_path / "d"), "pair", tok, quiet()).reader.index.total == 5


def test_an_index_without_a_digest_is_checked_and_read_and_text_counts_are_bounded(tmp_path, tok):
    """An index with no digest is read when every other check passes. A text file of n bytes holds at most
    (n + 1) // 2 lines."""
    folder = pair_folder(tmp_path / "d")
    edit_index(folder, without_digest(lambda x: x))
    st = stream(str(tmp_path / "d"), "pair", tok, quiet())
    assert st.reader.index.names == ["00000.tar", "00001.tar"] and st.reader.index.counts.tolist() == [3, 2]
    text = tmp_path / "d" / "text"
    text.mkdir()
    (text / "00000.txt").write_bytes(b"a\nb\nc")                               # 5 bytes: 3 lines at most
    shards.write_index(str(text), "text", progress=False)
    for n, ok in ((3, True), (4, False)):
        edit_index(text, without_digest(on_file(0, "samples", n)))
        if ok:
            assert shards.Index(str(text), "text").total == 3
        else:
            with pytest.raises(SystemExit, match="listed with 4 samples, more than its 5 bytes can hold \\(3\\)"):
                shards.Index(str(text), "text")


# ----------------------------------------------------------------------------- duplicate keys

def test_a_duplicate_key_is_named_counted_once_and_the_first_members_kept(tmp_path, tok):
    """Sample 1 holds its image and caption twice (a tar written twice): it is one sample, trained on with its
    first image and first caption, named and counted once as "duplicate key" over two epochs; the samples around
    it are intact. The tokenizer corpus takes the first caption too. Under --strict it is an error."""
    folder = tmp_path / "d" / "pairs"
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", [
        ("000000.png", png((200, 0, 0))), ("000000.txt", b"a red circle"),
        ("000001.png", png((0, 0, 200))), ("000001.txt", b"a blue square"),
        ("000001.png", png((0, 200, 0))), ("000001.txt", b"a green cross"),
        ("000002.png", png((9, 9, 9))), ("000002.txt", b"a dark image"),
        ("000003.png", png((0, 0, 0))), ("000003.txt", b"a black image")])
    shards.main(["index", "--data_dir", str(tmp_path / "d")])
    bad = quiet()
    st = stream(str(tmp_path / "d"), "pair", tok, bad)
    batches = [next(st) for _ in range(2)]                                    # two epochs of one batch
    assert st.last["epoch"] == 1 and sorted(st.last["ordinal"].tolist()) == [0, 1, 2, 3]
    for b in batches:
        assert sorted(tok.decode(r) for r in b["ids"]) == sorted(["a red circle", "a blue square", "a dark image",
                                                                  "a black image"])
        blue = [tok.decode(r) for r in b["ids"]].index("a blue square")
        assert b["image"][blue, 2].mean() > b["image"][blue, 1].mean()      # the first image: blue, not green
    assert bad.counts() == {"duplicate key": 1}
    assert bad.messages[0].startswith(f"{folder}/00000.tar:000001: duplicate key (2 members again (000001.png, "
                                      f"000001.txt): the first of each extension is kept)")
    assert sorted(shards.corpus_texts(str(tmp_path / "d"))) == sorted(["a red circle", "a blue square",
                                                                       "a dark image", "a black image"])
    with pytest.raises(ValueError, match="00000.tar:000001: duplicate key"):
        next(stream(str(tmp_path / "d"), "pair", tok, quiet(strict=True)))


# ----------------------------------------------------------------------------- one count per bad record

def broken_pairs(root):
    """root/pairs.jsonl: 8 pairs, items 2 and 5 naming images that do not decode, and one malformed line."""
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(8):
        name = f"img/{i}.png"
        if i in (2, 5):
            (root / name).write_bytes(b"not a png")
        else:
            (root / name).write_bytes(png((30 * i, 0, 0)))
        lines.append(json.dumps({"image": name, "caption": CAPTIONS[i % 6]}))
    (root / "pairs.jsonl").write_text("\n".join(lines + ["{oops"]) + "\n")
    return formats.find_sources(str(root))["pair"]


def jsonl_stream(path, tok, bad, workers=0):
    ds = D.PairDataset(formats.parse_pairs(path, bad), tok, DC, bad)
    return streams.Stream("pair", ds, 4, seed=0, rank=0, world_size=1, num_workers=workers, bad=bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_counts_once_across_epochs_workers_and_a_resume(tmp_path, tok, workers):
    """Two images that do not decode, drawn in each of 3 epochs (by 2 DataLoader workers, or none): 2 counts,
    each printed once. A run resumed from state_dict() (which parses its files again) counts neither again,
    nor the malformed line; an older checkpoint's plain counts are not added to what parsing found again."""
    path, bad = broken_pairs(tmp_path), quiet()
    st = jsonl_stream(path, tok, bad, workers)
    for _ in range(3 * st.len_per_epoch):
        next(st)
    assert bad.counts() == {"unreadable image": 2, "malformed JSON": 1}
    assert sorted(m.split(": ")[0] for m in bad.messages if ": unreadable image (" in m) == [f"{path}:3", f"{path}:6"]
    again = quiet()
    resumed = jsonl_stream(path, tok, again, workers)
    again.load_state_dict(bad.state_dict())
    assert again.counts() == {"unreadable image": 2, "malformed JSON": 1}
    resumed.load_state_dict(st.state_dict())
    for _ in range(2 * st.len_per_epoch):
        next(resumed)
    assert again.counts() == {"unreadable image": 2, "malformed JSON": 1}
    older = quiet()
    formats.parse_pairs(path, older)
    older.load_state_dict(bad.counts())
    assert older.counts() == {"unreadable image": 2, "malformed JSON": 1}


def test_a_bad_shard_member_counts_once_over_epochs_in_a_worker(tmp_path, tok):
    """Two members that do not decode, read in each of 3 epochs by a DataLoader worker: 2 counts."""
    folder = tmp_path / "d" / "pairs"
    folder.mkdir(parents=True)
    members = []
    for g in range(6):
        members += [(f"{g:06d}.png", b"not a png" if g in (1, 4) else png((40 * g, 0, 0))),
                    (f"{g:06d}.txt", CAPTIONS[g].encode())]
    write_tar(folder / "00000.tar", members)
    shards.write_index(str(folder), "pair", progress=False)
    bad = quiet()
    st = stream(str(tmp_path / "d"), "pair", tok, bad, batch=2, workers=1)
    for _ in range(3 * st.len_per_epoch):
        next(st)
    assert st.epoch == 3 and bad.counts() == {"unreadable image": 2}


# ----------------------------------------------------------------------------- pack reads image files under its root

def test_pack_reads_only_image_files_under_the_data_folder(tmp_path, capsys):
    """Records naming a file outside the data folder (an absolute path, "..", a link leading out, /proc, an
    image too) or a file that is not an image are named, counted and left out of the shards and of the copied
    regions; the good records are all packed, byte for byte. With --image_root the images are read under it."""
    secret = b"SECRET=hunter2\n"
    (tmp_path / "secret.txt").write_bytes(secret)
    (tmp_path / "outside.png").write_bytes(png((1, 2, 3)))
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    good = [png((50 * i, 0, 0)) for i in range(3)]
    for i, raw in enumerate(good):
        (d / "img" / f"{i}.png").write_bytes(raw)
    (d / "img" / "notes.png").write_bytes(b"not an image")
    os.symlink(tmp_path / "secret.txt", d / "img" / "link.png")
    os.symlink(d / "img" / "0.png", d / "img" / "inside.png")                   # a link that stays inside: fine
    proc = ["/proc/self/environ"] if os.path.isfile("/proc/self/environ") else []
    names = ["img/0.png", str(tmp_path / "secret.txt"), "img/1.png", "../outside.png", "img/link.png",
             "img/notes.png", "img/2.png", "img/inside.png", *proc]
    (d / "pairs.jsonl").write_text("".join(json.dumps({"image": n, "caption": f"caption {i}"}) + "\n"
                                           for i, n in enumerate(names)))
    region = {"regions": [{"box": [0, 0, 4, 4], "caption": "a corner"}]}
    (d / "regions.jsonl").write_text("".join(json.dumps({"image": n, **region}) + "\n"
                                             for n in ("img/0.png", "../outside.png", "img/link.png")))
    assert shards.pack(str(d), str(tmp_path / "out"), progress=False) == {"pair": 4, "region": 1}
    out, err = capsys.readouterr()
    assert out.endswith(f"| bad input: {3 + len(proc) + 2} image outside the data folder, 1 unreadable image\n")
    for where in [f"{d}/pairs.jsonl:{i}" for i in (2, 4, 5, 9 if proc else 4)] + [f"{d}/regions.jsonl:{i}"
                                                                                 for i in (2, 3)]:
        assert f"warning: {where}: image outside the data folder (" in err, where
    assert f"warning: {d}/pairs.jsonl:6: unreadable image (" in err
    with tarfile.open(tmp_path / "out" / "pairs" / "00000.tar") as tf:
        packed = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert [packed.get(f"{i:09d}.txt", b"").decode() for i in range(5)] == [
        "caption 0", "caption 2", "caption 6", "caption 7", ""]
    assert [packed[f"{i:09d}.png"] for i in range(4)] == [good[0], good[1], good[2], good[0]]
    assert not any(secret in raw or b"PATH=" in raw for raw in packed.values())
    assert [json.loads(line)["image"] for line in open(tmp_path / "out" / "regions.jsonl")] == ["img/0.png"]
    assert os.listdir(tmp_path / "out" / "img") == ["0.png"]
    root = tmp_path / "root"                                   # --image_root: read under it and the data folder
    os.rename(d / "img", root)
    (d / "regions.jsonl").unlink()
    (d / "pairs.jsonl").write_text(json.dumps({"image": "0.png", "caption": "caption 0"}) + "\n" +
                                   json.dumps({"image": "../secret.txt", "caption": "caption 1"}) + "\n")
    (d / "images").mkdir()
    (d / "images" / "3.png").write_bytes(png((0, 0, 9)))
    shards.main(["pack", "--data_dir", str(d), "--out", str(tmp_path / "out2"), "--image_root", str(root)])
    out, err = capsys.readouterr()
    assert out.endswith("1 pair, 1 image | bad input: 1 image outside the data folder\n")
    assert f"{d}/pairs.jsonl:2: image outside the data folder (" in err
