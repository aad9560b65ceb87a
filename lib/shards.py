"""
Tar shards: pre-training data streamed from files that no rank holds in memory, and the converter that writes
them. A data folder (--data_dir) may hold, next to or instead of lib/formats.py's JSONL files (a kind found in both
streams from its shards):

    pairs/00000.tar ...  image-text pairs in the webdataset / img2dataset layout: per sample KEY.jpg (or .png,
                         .jpeg, .webp, .bmp) and KEY.txt (the caption) or KEY.json ({"caption": "..." or [...]})
    images/00000.tar ... image-only data for MIM: KEY.jpg per sample
    text/00000.txt ...   a text corpus split into files, one document per line (UTF-8; blank lines skipped)
    FOLDER/index.json    {"kind", "samples", "digest", "files": [{"name", "samples", "bytes"}]}: how many samples
                         each file holds, so every rank knows the whole layout without reading a shard
Region captions and the held-out pairs stay JSONL (lib/formats.py). A tar member's KEY is its name up to the first dot
of its last path part; consecutive members with one KEY are one sample (as webdataset groups them). A member
whose extension came before in its sample (KEY.jpg KEY.txt KEY.jpg KEY.txt: a tar written twice) is skipped: the
sample keeps its first member of each extension and is counted once as a "duplicate key".

    python -m lib.shards pack --data_dir data/toy --out data/toy_shards [--shard_size 1000] [--image_root DIR]
    python -m lib.shards index --data_dir DIR         # write the index.json files of shards made elsewhere (img2dataset)
    python -m pytest tests/test_shards.py tests/test_hostile_shards.py -q   # the tests (CPU, about 25 s)
    python tools/bench_stream.py                  # peak memory of a rank streaming 10k and 100k pairs

An index is verified before any work, never trusted (_read_index): it lists every file of its folder once, each
with "samples" and "bytes" ints >= 0 (no floats, no booleans), its file has that many bytes and can hold that
many samples (512 bytes a tar sample, 2 a text line), and its "digest" (which `index` writes) matches, so an
index edited by hand is refused; one without a digest is read when the rest holds. Anything else stops the run
in one line that names the index.json, the problem and the `python -m lib.shards index --data_dir DIR` that
rewrites it. `pack` reads only image files under --data_dir (and --image_root, when given), links resolved: a
record naming a file elsewhere (/etc/passwd, "../x.png", a link leading out) is an "image outside the data
folder", one naming a file that does not decode an "unreadable image"; each is named, counted and left out.

How a ShardStream reads (one per kind and rank):
  - Epoch e orders the files by a permutation keyed (seed, stream, e), the same on every rank, and cuts their
    N samples, end to end, into S = world_size x workers equal ranges of m = N // S (workers = max(1, num_workers)).
    Slot rank x workers + w reads one range; a range may begin and end inside a file (skipping tar members reads
    their headers only). Each slot yields exactly k = m // batch_size batches an epoch, so every rank yields
    workers x k: no rank reaches an epoch's end before another, and no rank waits in a collective for a rank
    that has run out. Each epoch leaves out fewer than S x (batch_size + 1) samples, a different tail each epoch.
  - Within its range a slot shuffles through a buffer of `buffer` samples (BufferShuffle), keyed (seed, stream, e,
    slot). Each sample's randomness (crop, masks, ITM draws) is data.py's np.random.default_rng([seed, stream, e,
    ordinal]), ordinal = the sample's place in the index's file order: a JSONL folder and its packed shards give
    the same sample for the same ordinal (tests/test_shards.py; pack leaves out a record whose image it refuses,
    which data.py keeps and replaces when drawn, so the ordinals after it shift by one).
  - A bad member (an image that does not decode, a missing or empty caption, text that is not UTF-8) is named
    as shard.tar:member, skipped and counted through formats.BadInput; its place in the batch goes to the next
    good sample of the slot (as data.py replaces an unreadable image), so batches stay full and equal in number.
    The batch carries its problems to the main process, which counts each (kind, where) once: a bad member
    drawn every epoch, in any DataLoader worker, counts one (BadInput.once; BadInput.state_dict holds the
    records for a checkpoint).
  - The position is the number of batches the stream has handed out, the same on every rank, so rank 0's
    {"batches": n, "slots": S} in the checkpoint serves every rank. A resume replays the buffer's order on
    integers, reads back only the samples the buffer held at that point, and continues exactly; it needs the
    same S (world size and num_workers), else it warns that the samples differ.
  - A rank holds the index (three numbers per file) and each worker one buffer of samples: its memory does not
    grow with the data (docs/TRAINING.md, "Streaming tar shards", has the measured figures).
"""
import argparse
import codecs
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import tarfile
from collections import Counter, deque

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

import data
from lib import formats, runtime, streams, toyworld

FOLDERS = {"pair": "pairs", "image": "images", "text": "text"}  # kind -> its folder in a data folder
SUFFIX = {"pair": ".tar", "image": ".tar", "text": ".txt"}       # kind -> the files of that folder
INDEX = "index.json"
IMAGE_EXTS = tuple(e[1:] for e in formats.IMAGE_EXTS)           # member extensions, without the dot
HEAD = 2000  # samples ShardStream.dataset holds: flava.fit_image_tokenizer fits its codebook on up to 2000 images

# -----------------------------------------------------------------------------
# The index of a shard folder, and reading the samples of one file


def find_shards(data_dir):
    """{kind: folder} for each shard folder in data_dir: pairs/ or images/ holding .tar files, text/ holding .txt."""
    found = {}
    for kind, name in FOLDERS.items():
        folder = os.path.join(data_dir, name)
        if os.path.isdir(folder) and any(n.endswith(SUFFIX[kind]) for n in os.listdir(folder)):
            found[kind] = folder
    return found


def _key(name):
    """A tar member's sample key and extension: "a/000012.seg.png" -> ("a/000012", "seg.png")."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (head + "/" if head else "") + stem, ext.lower()


class Index:
    """The files of one shard folder and how many samples each holds: its index.json, verified before any work
    (_read_index)."""

    def __init__(self, folder, kind):
        self.folder, self.kind = folder, kind
        self.names, counts = _read_index(folder, kind)
        self.counts = np.array(counts, dtype=np.int64)                             # (F,) samples per file
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])          # (F,) each file's first ordinal
        self.total = int(self.counts.sum())

    def read_range(self, order, lo, hi, want=lambda rel: True, members=None):
        """The samples at positions lo..hi-1 of the files taken in `order` and laid end to end, in that order:
        yields (rel, ordinal, path, key, payload, problem) with rel = position - lo. payload: a tar sample's
        [(member name, bytes)] (only the members whose extension `members` allows, all when None) or a text
        line's bytes; None where want(rel) is false (not read: a tar member is skipped by seeking past it) or
        where the sample is lost (problem = ("unreadable shard", why): the file is cut short or corrupt)."""
        pos = 0
        for f in order:
            n = int(self.counts[f])
            a, b = max(lo - pos, 0), min(hi - pos, n)                       # this file's part of the range
            if a < b:
                path, base = os.path.join(self.folder, self.names[f]), pos - lo
                read = _read_text if self.kind == "text" else _read_tar
                for off, key, payload, problem in read(path, a, b, lambda o: want(base + o), members):
                    yield base + off, int(self.starts[f]) + off, path, key, payload, problem
            pos += n
            if pos >= hi:
                break


def _most(kind, size):
    """The most samples a `kind` file of `size` bytes can hold: a tar sample takes at least one member's 512-byte
    header, a text line a character and its line break (the last line may lack its break)."""
    return (size + 1) // 2 if kind == "text" else size // 512


def _digest(files):
    """index.json's digest of its [{"name", "samples", "bytes"}]: an index edited by hand no longer matches it."""
    rows = json.dumps([[f["name"], f["samples"], f["bytes"]] for f in files])
    return hashlib.blake2b(rows.encode(), digest_size=16).hexdigest()


def _read_index(folder, kind):
    """(names, samples per file) from folder/index.json, verified: a JSON object whose "files" lists every
    file of the folder once, each with "samples" and "bytes" ints >= 0 (no bools, no floats); each file has its
    indexed size and can hold its samples (_most); "digest", when there (lib/shards.py writes it), matches. An
    index without a digest passes the other checks. Anything else stops the run with one line that names
    index.json and the problem and gives the command that rewrites it."""
    path, on_disk = os.path.join(folder, INDEX), sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX[kind]))
    redo = f"python -m lib.shards index --data_dir {shlex.quote(os.path.dirname(folder) or '.')}"
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: missing ({len(on_disk)} {SUFFIX[kind]} files in {folder}); write it "
                         f"with: {redo}")

    def refuse(problem):
        return SystemExit(f"error: {path}: {problem}; rewrite it with: {redo}")
    try:
        with open(path, encoding="utf-8") as f:
            index, why = formats.parse_json(f.read())
    except ValueError as e:  # not UTF-8
        index, why = None, f"{type(e).__name__}: {e}"
    if why is not None:
        raise refuse(f"not JSON ({why})")
    files = index.get("files") if isinstance(index, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise refuse('not a shard index {"files": [{"name", "samples", "bytes"}, ...]}')
    for i, f in enumerate(files):
        for field in ("name", "samples", "bytes"):
            v = f.get(field)
            ok = isinstance(v, str) if field == "name" else isinstance(v, int) and not isinstance(v, bool) and v >= 0
            if not ok:
                got = f"{field!r} {formats._short(json.dumps(v))}" if field in f else f"no {field!r}"
                raise refuse(f"files[{i}] has {got}, not {'a file name' if field == 'name' else 'an int >= 0'}")
    names = [f["name"] for f in files]
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise refuse(f"{twice[0]} is listed {names.count(twice[0])} times")
    for what, which in (("is listed but not in", set(names) - set(on_disk)),
                        ("is in the folder but not listed in", set(on_disk) - set(names))):
        if which:
            raise refuse(f"{sorted(which)[0]} {what} {folder} ({len(which)} files in all)")
    for f in files:
        size = os.path.getsize(os.path.join(folder, f["name"]))
        if size != f["bytes"]:
            raise refuse(f"{f['name']} has {size} bytes, indexed with {f['bytes']}: it changed since")
        if f["samples"] > _most(kind, size):
            raise refuse(f"{f['name']} is listed with {f['samples']} samples, more than its {size} bytes can hold "
                         f"({_most(kind, size)})")
    if "digest" in index and index["digest"] != _digest(files):
        raise refuse("its digest does not match its files list: it was edited after lib/shards.py wrote it")
    return names, [f["samples"] for f in files]


def _read_tar(path, a, b, want, members):
    """Samples a..b-1 of a tar file: yields (offset, key, payload, problem) as Index.read_range describes."""
    off, key, infos, error = 0, None, [], None
    try:
        with tarfile.open(path, "r:") as tf:
            while off < b:
                info = tf.next()
                tf.members = []  # the TarFile keeps every header it reads; a shard's headers are not needed again
                if info is not None and not info.isfile():
                    continue
                k = None if info is None else _key(info.name)[0]
                if infos and k != key:                                 # a sample ends where the next key begins
                    if off >= a:
                        payload = None
                        if want(off):
                            payload = [(i.name, tf.extractfile(i).read()) for i in infos
                                       if members is None or _key(i.name)[1] in members]
                        yield off, key, payload, None
                    off, infos = off + 1, []
                if info is None:
                    break
                key = k
                infos.append(info)
    except (tarfile.TarError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    if off < b:  # every sample the index promised and the file did not give is lost, and counted
        why = error or f"the file ends after {off} samples"
        for o in range(max(off, a), b):
            yield o, f"#{o}", None, ("unreadable shard", why)


def _lines(fh):
    """(line number, bytes) of each non-blank line of a file opened in binary (a UTF-8 byte order mark dropped)."""
    for i, raw in enumerate(fh, 1):
        if i == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if raw.strip():
            yield i, raw


def _read_text(path, a, b, want, members=None):
    """Lines a..b-1 (non-blank lines only) of a text file: yields (offset, line number, bytes or None, problem)."""
    off = 0
    with open(path, "rb") as fh:
        for i, raw in _lines(fh):
            if off >= b:
                break
            if off >= a:
                yield off, i, raw if want(off) else None, None
            off += 1
    for o in range(max(off, a), b):
        yield o, f"#{o}", None, ("unreadable shard", f"the file ends after {off} lines")


class BufferShuffle:
    """The order in which a shuffle buffer of `size` hands out positions 0..n-1 that are read in order: pop() gives
    a random position from the buffer, whose place the next position to read takes. The order depends on n, size
    and rng only, never on what is read, so a resume replays it on integers."""

    def __init__(self, n, size, rng):
        self.n, self.rng = n, rng
        self.buf = list(range(min(size, n)))  # the positions in the buffer
        self.read = len(self.buf)             # positions 0..read-1 have been read

    def pop(self):
        i = int(self.rng.integers(len(self.buf)))
        out = self.buf[i]
        if self.read < self.n:
            self.buf[i], self.read = self.read, self.read + 1
        else:  # nothing left to read: the buffer drains
            self.buf[i] = self.buf[-1]
            self.buf.pop()
        return out


# -----------------------------------------------------------------------------
# Samples: decoding, bad members, data.py's transforms keyed by the ordinal


class _Problems(list):
    """Takes what formats' readers report (BadInput.report's signature), to be reported at the sample's turn."""

    def report(self, kind, where, msg, action="skipped"):
        self.append((kind, where, msg))


class _Tally:
    """The problems of the samples a slot decodes, maybe in a DataLoader worker (whose copy of the run's BadInput
    is lost): each travels to the main process with its batch, whose BadInput counts each record once."""

    def __init__(self, bad):
        self.bad, self.problems = bad, []

    def report(self, kind, where, msg, replaced=True):
        action = "sample skipped; the next good one takes its place" if replaced else "skipped"
        self.problems.append(self.bad.found(kind, where, msg, action))  # (strict: raises here)

    def take(self):
        problems, self.problems = self.problems, []
        return problems


def _image(path, key, payload, problems):
    """The first image member of a sample -> (PIL image, image id: a digest of its bytes) or None (reported)."""
    name, raw = next(((n, b) for n, b in payload if _key(n)[1] in IMAGE_EXTS), (None, None))
    if name is None:
        problems.report("missing image", f"{path}:{key}", f"no .{'/.'.join(IMAGE_EXTS)} member")
        return None
    try:
        return formats.load_image(io.BytesIO(raw)), hashlib.blake2b(raw, digest_size=8).hexdigest()
    except Exception as e:
        problems.report("unreadable image", f"{path}:{name}", f"{type(e).__name__}: {e}")
        return None


def _captions(path, key, payload, problems):
    """The sample's captions: KEY.txt, else KEY.json's "caption" (a string or a list) -> list (empty: reported)."""
    texts = {_key(n)[1]: (n, b) for n, b in payload}
    name, raw = texts.get("txt") or texts.get("json") or (None, None)
    if name is None:
        problems.report("missing caption", f"{path}:{key}", "no .txt or .json member")
        return []
    text, problem = formats._decode(raw)
    if problem:
        problems.report("not UTF-8", f"{path}:{name}", problem)
        return []
    if name.endswith(".txt"):
        if not text.strip():
            problems.report("empty caption", f"{path}:{name}", "the caption is empty")
        return [formats.cut(text)] if text.strip() else []
    rec, why = formats.parse_json(text)
    if why is not None:
        problems.report("malformed JSON", f"{path}:{name}", why)
        return []
    if not isinstance(rec, dict):
        problems.report("malformed record", f"{path}:{name}", f"expected a JSON object, got {formats.type_of(rec)}")
        return []
    return formats.captions_of(rec, f"{path}:{name}", problems)


def _first_of_each(path, key, payload, problems):
    """A tar sample's members, the first of each extension: a member whose extension came before in the sample
    (KEY.jpg, KEY.txt, KEY.jpg, KEY.txt: a tar written twice, say) is skipped, and the sample reported once as a
    "duplicate key". The sample itself stays, with its first image and first caption."""
    seen, first, again = set(), [], []
    for name, raw in payload:
        ext = _key(name)[1]
        (again if ext in seen else first).append((name, raw))
        seen.add(ext)
    if again:
        names = formats._short(", ".join(n for n, _ in again))
        problems.report("duplicate key", f"{path}:{key}", f"{len(again)} members again ({names}): the first of each "
                        "extension is kept")
    return first


def decode(kind, path, key, payload):
    """One sample's payload -> (sample or None, problems). A pair: (image, captions, image id); an image: (image,
    image id); a text: the stripped line. Problems: [(kind, where, message)]; a None sample is a bad member."""
    problems = _Problems()
    if kind == "text":
        text, problem = formats._decode(payload)
        return (formats.cut(text), problems) if problem is None else (None, [("not UTF-8", f"{path}:{key}", problem)])
    payload = _first_of_each(path, key, payload, problems)
    caps = _captions(path, key, payload, problems) if kind == "pair" else [None]
    img = _image(path, key, payload, problems) if caps else None
    if img is None:
        return None, problems
    return ((img[0], caps, img[1]) if kind == "pair" else img), problems


def _chosen(kind, sample, epoch, g):
    """A pair with several captions trains on caption (epoch + ordinal) mod n: one an epoch, each in turn."""
    return (sample[0], sample[1][(epoch + g) % len(sample[1])], sample[2]) if kind == "pair" else sample


class _FromShards:
    """Turns a data.py dataset into one over a list of samples read from shards: item i's generator is keyed by
    its ordinal (not by i) and its image is the one decoded from the shard, so a sample gets the crop, masks and
    ITM draw the JSONL stream gives the same ordinal. Holds one batch (or ShardStream.dataset's head)."""

    def rng(self, epoch, index):
        return np.random.default_rng([self.dc.seed, self.salt, epoch, self.ordinals[index]])

    def load(self, index, draft=None):
        img = self.images[index]  # a decoded image, or the bytes of one (ShardStream.dataset: decoded when used)
        return index, (formats.load_image(io.BytesIO(img), draft) if isinstance(img, bytes) else img), []


class _Pairs(_FromShards, data.PairDataset):
    pass


class _Images(_FromShards, data.ImageDataset):
    pass


class _Texts(_FromShards, data.TextDataset):
    pass


def _dataset(kind, samples, ordinals, tok, dc, bad):
    """data.py's dataset over decoded samples (_chosen's). The image id (a digest of the image's bytes) makes equal
    images one id in the batch, so neither is drawn as the other's hard negative. FLAVA's swapped captions
    come from the same batch."""
    if kind == "text":
        ds = _Texts(samples, tok, dc, bad)
    elif kind == "image":
        ds = _Images([{"image": d} for _, d in samples], dc, bad)
    else:
        ds = _Pairs([{"image": d, "caption": caption} for _, caption, d in samples], tok, dc, bad)
    ds.ordinals, ds.images = ordinals, [None if kind == "text" else s[0] for s in samples]
    return ds


# -----------------------------------------------------------------------------
# The stream of one kind on one rank


class ShardStream:
    """An infinite iterator of batch dicts for one kind, read from its shard folder (streams.Stream's interface:
    state_dict() / load_state_dict() resume it exactly). `last` holds the epoch and the ordinals of the last batch;
    `reader` (a SlotReader) is what the DataLoader's workers run."""

    def __init__(self, kind, folder, tok, dc, batch_size, *, rank, world_size, num_workers, bad, buffer=1000,
                 pin_memory=False):
        self.reader = SlotReader(kind, folder, tok, dc, batch_size, rank, world_size, num_workers, bad, buffer)
        self.kind, self.bad, self.num_workers, self.pin_memory = kind, bad, num_workers, pin_memory
        self.len_per_epoch = self.reader.workers * self.reader.k  # the same on every rank
        self.batches, self._it, self.last = 0, None, None

    @property
    def epoch(self):
        return self.batches // self.len_per_epoch

    @property
    def dataset(self):
        return self.reader.head()

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:  # (re)start right after the last batch handed out
            # its own generator: creating the iterator must not draw from the global torch RNG (see streams.Stream)
            loader = DataLoader(_Batches(self.reader, self.batches), batch_size=None, num_workers=self.num_workers,
                                pin_memory=self.pin_memory,
                                generator=torch.Generator().manual_seed(self.reader.dc.seed))
            self._it = iter(loader)
        batch = next(self._it)
        self.batches += 1
        for problem in batch.pop("bad"):   # bad members found where the batch was made: each record counted once
            self.bad.once(*problem)
        self.last = {"epoch": batch.pop("epoch"), "ordinal": batch.pop("ordinal")}
        return batch

    def state_dict(self):
        return {"batches": self.batches, "slots": self.reader.slots}

    def load_state_dict(self, state):
        self.batches, self._it = int(state["batches"]), None
        if state.get("slots", self.reader.slots) != self.reader.slots and self.bad.verbose:
            print(f"warning: the {self.kind} stream was read in {state['slots']} ranges (world size x workers), now "
                  f"in {self.reader.slots}: it goes on after {self.batches} batches, but not with the samples the "
                  f"first run would have read next", file=sys.stderr)


class SlotReader:
    """What the slots of one rank's stream read: the index, the split into slots, and each slot's batches (in a
    DataLoader worker, or in the main process with num_workers=0). It holds no loader: a worker's copy of it
    never refers back to the loader that runs it (a cycle would delay the workers' shut-down)."""

    def __init__(self, kind, folder, tok, dc, batch_size, rank, world_size, num_workers, bad, buffer):
        self.kind, self.index, self.tok, self.dc, self.bad = kind, Index(folder, kind), tok, dc, bad
        self.salt, self.batch_size, self.buffer, self.rank = data.KINDS.index(kind), batch_size, buffer, rank
        self.workers = max(1, num_workers)
        self.slots = world_size * self.workers
        self.m = self.index.total // self.slots             # samples in each slot's range: equal for every slot
        self.k = self.m // batch_size                        # batches each slot yields an epoch
        if self.k == 0:
            raise SystemExit(f"error: {folder} has {self.index.total} samples, fewer than world_size x workers x "
                             f"batch_size = {world_size} x {self.workers} x {batch_size}; lower the batch size or "
                             f"--num_workers, or add data")
        if buffer < 1:
            raise SystemExit(f"error: the shuffle buffer must hold at least 1 sample (got {buffer})")

    # ---- what a slot does (in a DataLoader worker, or in the main process with num_workers=0)

    def slot_batches(self, slot, done):
        """Slot `slot`'s batches forever, after the `done` it has already handed out."""
        epoch, b = divmod(done, self.k)
        while True:
            yield from self._epoch_batches(epoch, slot, b)
            epoch, b = epoch + 1, 0

    def _epoch_batches(self, epoch, slot, b):
        """Batches b..k-1 of the slot's range in epoch `epoch`."""
        B, tally = self.batch_size, _Tally(self.bad)
        order = np.random.default_rng([self.dc.seed, self.salt, epoch, 0, 1]).permutation(len(self.index.names))
        samples = self._good(self._shuffled(epoch, slot, order, b * B), epoch, tally)
        for _ in range(b, self.k):
            chunk = [next(samples) for _ in range(B)]
            ordinals = [g for g, _ in chunk]
            ds = _dataset(self.kind, [s for _, s in chunk], ordinals, self.tok, self.dc, self.bad)
            batch = ds.collate([ds[(i, epoch)] for i in range(B)])
            batch.update(bad=tally.take(), epoch=epoch, ordinal=torch.tensor(ordinals))
            yield batch
        samples.close()

    def _shuffled(self, epoch, slot, order, start):
        """The slot's range through its shuffle buffer, from output place `start` on: yields (ordinal, path, key,
        payload, problem). After the range's m samples it reads the range once more in file order: those only
        stand in for bad samples at the end of the range (_good); past them no sample of the range is readable."""
        m, lo = self.m, slot * self.m
        sh = BufferShuffle(m, self.buffer, np.random.default_rng([self.dc.seed, self.salt, epoch, slot, 2]))
        for _ in range(start):  # replay the order up to `start` on integers: which positions the buffer holds then
            sh.pop()
        r0, keep = sh.read, set(sh.buf)
        want = lambda rel: rel >= r0 or rel in keep  # noqa: E731  (a resume reads only what is still to come)
        raw, held, read = self.index.read_range(order, lo, lo + m, want), {}, 0
        for _ in range(start, m):
            while read < sh.read:  # read on until the buffer holds every position it may hand out
                rel, *item = next(raw)
                if want(rel):
                    held[rel] = item
                read += 1
            yield held.pop(sh.pop())
        yield from (item for _, *item in self.index.read_range(order, lo, lo + m))
        raise RuntimeError(f"no readable sample in the {m} samples of slot {slot}'s range in {self.index.folder}, "
                           f"epoch {epoch} (see the warnings above)")

    def _good(self, items, epoch, tally):
        """(ordinal, path, key, payload, problem) -> (ordinal, sample). A bad sample's problems are reported at
        its turn and the next good sample takes its place, keeping the bad sample's ordinal (its randomness)."""
        ahead = deque()  # samples decoded past the current turn: some bad ones, then one good one

        def pull():
            g, path, key, payload, problem = next(items)
            sample, problems = (None, [(problem[0], f"{path}:{key}", problem[1])]) if problem else \
                decode(self.kind, path, key, payload)
            return g, sample if sample is None else _chosen(self.kind, sample, epoch, g), problems

        while True:
            g, sample, problems = ahead.popleft() if ahead else pull()
            for p in problems:  # (a problem of a good sample: one of its captions is empty, say)
                tally.report(*p, replaced=sample is None)
            if sample is None:
                if not ahead:  # read on to the next good sample
                    ahead.append(pull())
                    while ahead[-1][1] is None:
                        ahead.append(pull())
                sample = ahead[-1][1]
            yield g, sample

    # ---- the first samples, map-style (FLAVA fits its image tokenizer on them)

    def head(self):
        """The first HEAD good samples in the index's file order as a data.py dataset (items (index, epoch) as
        data.py's; images decoded when used). flava.fit_image_tokenizer reads images from it."""
        samples, ordinals = [], []
        for _, g, path, key, payload, problem in self.index.read_range(range(len(self.index.names)), 0,
                                                                        self.index.total):
            sample = None if problem else decode(self.kind, path, key, payload)[0]
            if sample is not None:
                sample = _chosen(self.kind, sample, 0, g)
                raw = next((b for n, b in payload if _key(n)[1] in IMAGE_EXTS), None) if self.kind != "text" else None
                samples.append(sample if raw is None else (raw, *sample[1:]))
                ordinals.append(g)
            if len(samples) == HEAD:
                break
        return _dataset(self.kind, samples, ordinals, self.tok, self.dc, formats.BadInput(verbose=False))


class _Batches(IterableDataset):
    """One rank's batches as the DataLoader's workers make them. The loader asks its workers in turn, from
    worker 0, and the stream's batch u comes from slot-in-rank u mod workers: after `start` batches, worker w
    plays slot-in-rank (start + w) mod workers, which had handed out the batches before `start` that were its."""

    def __init__(self, reader, start):
        self.reader, self.start = reader, start

    def __iter__(self):
        st, info = self.reader, get_worker_info()
        W = st.workers
        j = ((info.id if info else 0) + self.start) % W
        done = (self.start - j + W - 1) // W                 # the u < start with u mod W == j
        return st.slot_batches(st.rank * W + j, done)


def build_streams(data_dir, tok, dc, batch_size, bad, rank=0, world_size=1, num_workers=0, pin_memory=False,
                  buffer=1000):
    """streams.build_streams for the JSONL kinds of data_dir, and a ShardStream for each kind with a shard folder
    (pairs/, images/, text/; a shard folder wins over the kind's JSONL file)."""
    found = {k: f for k, f in find_shards(data_dir).items() if k in batch_size}
    out = streams.build_streams(data_dir, tok, dc, batch_size, bad, rank, world_size, num_workers, pin_memory,
                                skip=tuple(found))
    jsonl = formats.find_sources(data_dir)
    for kind, folder in found.items():
        if kind in jsonl and bad.verbose:
            print(f"note: {kind} data in both {folder}/ and {jsonl[kind]}: streaming {folder}/", file=sys.stderr)
        out[kind] = ShardStream(kind, folder, tok, dc, batch_size[kind], rank=rank, world_size=world_size,
                                num_workers=num_workers, bad=bad, buffer=buffer, pin_memory=pin_memory)
    return {k: out[k] for k in data.KINDS if k in out}


def prepare_data_dir(data_dir, ddp, rank):
    """train.py's data folder: rank 0 builds the toy world when data_dir is the default folder and missing
    (toyworld.build_if_missing); then every rank needs the folder on its own node."""
    runtime.rank0_shares(lambda: toyworld.build_if_missing(data_dir), ddp, rank)
    if not os.path.isdir(data_dir):  # another node, without rank 0's file system
        raise SystemExit(f"error: data_dir {data_dir!r} does not exist on rank {rank}'s node (copy it there)")


def find_data(data_dir):
    """{kind: path} of what a data folder holds: lib/formats.py's files (pair_test too), then the shard folders."""
    return {**formats.find_sources(data_dir), **find_shards(data_dir)}


def run_streams(cfg, tok, model_cfg, per_rank, bad, rank, world, device):
    """train.py's streams (build_streams): the run's data settings (cfg: train.TrainConfig) and the model's image
    and patch sizes as one data.DataConfig; per_rank: {kind: samples a batch}. On CUDA the batches are pinned and
    their images uint8, normalised on the GPU (runtime.to_device). No data at all stops the run."""
    cuda = device.type == "cuda"
    dc = data.DataConfig(model_cfg.image_size, model_cfg.patch_size, cfg.text_len, cfg.caption_len, cfg.seed,
                         cfg.hflip, (cfg.crop_min_scale, 1.0), caption_mask=cfg.recipe, image_root=cfg.image_root,
                         itm_neg_prob=getattr(model_cfg, "itm_neg_prob", 0.0), static=cfg.compile,
                         uint8_images=cuda)
    found = build_streams(cfg.data_dir, tok, dc, per_rank, bad, rank, world, runtime.num_workers(cfg, device),
                          pin_memory=cuda, buffer=cfg.shuffle_buffer)
    if not found:
        raise SystemExit(f"error: no training data found in {cfg.data_dir} (formats: lib/formats.py, lib/shards.py)")
    return found


def corpus_texts(data_dir):
    """Every caption of the pair shards and every line of the text files (tokenizer.corpus_texts adds them)."""
    quiet = _Problems()
    for kind, folder in find_shards(data_dir).items():
        if kind == "image":
            continue
        index = Index(folder, kind)
        for _, _, path, key, payload, problem in index.read_range(range(len(index.names)), 0, index.total,
                                                                   members=("txt", "json")):
            if problem is None and kind == "text":
                text, _ = formats._decode(payload)
                yield from [text.strip()] if text else []
            elif problem is None:
                yield from _captions(path, key, _first_of_each(path, key, payload, quiet), quiet)


# -----------------------------------------------------------------------------
# Writing shards: pack (a JSONL folder -> shards) and index (count the samples of shards made elsewhere)


def _count(path, kind):
    """The samples of one shard file, grouped as the stream reads them. A tar that cannot be read, or a text file
    in another encoding (formats.read_lines), stops with an error naming the file."""
    if kind == "text":
        for _ in formats.read_lines(path, formats.BadInput(verbose=False)):
            pass  # (raises for a file in another encoding; a single bad line is counted when it is streamed)
        with open(path, "rb") as fh:
            return sum(1 for _ in _lines(fh))
    n, key = 0, None
    try:
        with tarfile.open(path, "r:") as tf:
            for info in iter(tf.next, None):
                tf.members = []  # (see _read_tar)
                if info.isfile() and _key(info.name)[0] != key:
                    n, key = n + 1, _key(info.name)[0]
    except (tarfile.TarError, OSError) as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: {e}); remove it or fetch it again")
    return n


def write_index(folder, kind, progress=True):
    """Count the samples of every file in a shard folder and write its index.json (with each file's size and
    the digest _read_index verifies). -> the total."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX[kind]))
    files = [{"name": n, "samples": _count(os.path.join(folder, n), kind),
              "bytes": os.path.getsize(os.path.join(folder, n))}
             for n in tqdm(names, desc=f"index {folder}", disable=not progress, unit="file")]
    total = sum(f["samples"] for f in files)
    with open(os.path.join(folder, INDEX + ".tmp"), "w", encoding="utf-8") as f:  # one line per file
        f.write(f'{{"kind": "{kind}", "samples": {total}, "digest": "{_digest(files)}", "files": [\n')
        f.write(",\n".join(json.dumps(x) for x in files) + "\n]}\n")
    os.replace(os.path.join(folder, INDEX + ".tmp"), os.path.join(folder, INDEX))
    return total


def _add(tf, name, raw):
    """A member with fixed metadata (no time, owner or mode of the source), so equal input packs to equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(raw), 0o644, 0
    tf.addfile(info, io.BytesIO(raw))


def _root_of(real, roots):
    """The folder of `roots` that holds the path `real` (links resolved), or None."""
    return next((r for r in roots if os.path.commonpath([real, r]) == r), None)


def _image_file(path, roots):
    """-> (the file `path` leads to, links resolved; its problem or None). pack reads image files under `roots`
    only (the data folder, and --image_root): a file elsewhere (an absolute path, "..", a link leading out:
    /etc/passwd, /proc/self/environ) is an "image outside the data folder", one that does not decode an
    "unreadable image"."""
    real = os.path.realpath(path)
    if _root_of(real, roots) is None:
        return real, ("image outside the data folder", f"{path} is {real}, outside {' and '.join(roots)}")
    try:
        formats.load_image(real)
    except Exception as e:
        return real, ("unreadable image", f"{path}: {type(e).__name__}: {e}")
    return real, None


def _images_under(items, roots, bad, progress):
    """The items (formats' {"image", "where", ...}) whose image _image_file allows, each with "file", the path
    to read; every other record is reported once and left out."""
    verdicts, out = {}, []
    for it in tqdm(items, desc="check images", disable=not progress, unit="sample"):
        if it["image"] not in verdicts:  # (the captions of one record share its image)
            verdicts[it["image"]] = _image_file(it["image"], roots)
        real, problem = verdicts[it["image"]]
        if problem:
            bad.once(problem[0], it["where"], problem[1], "left out")
        else:
            out.append({**it, "file": real})
    return out


def _write_shards(folder, kind, items, shard_size, progress):
    """items -> folder/00000.tar ... (pair: {"image", "file", "caption"}; image: {"image", "file"}; the bytes of
    "file", named by the extension of "image") or folder/00000.txt ... (text: one document per line),
    shard_size samples a file; sample i is KEY {i:09d}."""
    os.makedirs(folder)
    bar = tqdm(total=len(items), desc=f"pack {os.path.basename(folder)}", disable=not progress, unit="sample")
    for s in range(0, len(items), shard_size):
        path = os.path.join(folder, f"{s // shard_size:05d}{SUFFIX[kind]}")
        if kind == "text":  # a document holds no line break (text.jsonl's may): it becomes a space
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(" ".join(t.splitlines()) + "\n" for t in items[s:s + shard_size])
        else:
            with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
                for i, item in enumerate(items[s:s + shard_size], s):
                    with open(item["file"], "rb") as f:
                        _add(tf, f"{i:09d}{os.path.splitext(item['image'])[1].lower()}", f.read())
                    if kind == "pair":
                        _add(tf, f"{i:09d}.txt", item["caption"].encode("utf-8"))
        bar.update(len(items[s:s + shard_size]))
    bar.close()
    return write_index(folder, kind, progress=False)


def _copy_jsonl(src, out, name, roots, image_root, bad):
    """A JSONL file of records naming images (regions, held-out pairs) -> out/name, each image copied to its path
    relative to the folder of `roots` that holds it, which the record then names. A record whose image _image_file refuses is reported and
    left out; one that names no image file stays as it is (training reports it)."""
    base, lines = formats.image_base(src, image_root), []
    for where, rec in formats.read_records(src, bad):
        rel = rec.get("image")
        if isinstance(rel, str) and os.path.isfile(os.path.join(base, rel)):
            real, problem = _image_file(os.path.join(base, rel), roots)
            if problem:
                bad.once(problem[0], where, problem[1], "left out")
                continue
            dst = os.path.relpath(real, _root_of(real, roots))
            os.makedirs(os.path.dirname(os.path.join(out, dst)) or out, exist_ok=True)
            shutil.copyfile(real, os.path.join(out, dst))
            rec = {**rec, "image": dst}
        lines.append(json.dumps(rec) + "\n")
    with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)


def pack(data_dir, out, shard_size=1000, progress=True, verbose=True, image_root=""):
    """Write the JSONL data folder data_dir (lib/formats.py) as shards in out: pairs (one sample per caption, as
    data.py reads them), images and text in the order data.py reads them, so ordinal i is data.py's index i
    (while every image decodes); regions and held-out pairs are copied with their images. Bad records are
    reported and left out, as a training run would; so is a record whose image is not an image file under
    data_dir or image_root (when given: the folder the image paths are relative to). -> {kind: samples}."""
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: --data_dir {data_dir} is not a folder")
    if shard_size < 1:
        raise SystemExit(f"error: --shard_size must be at least 1 (got {shard_size})")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f"error: --out {out} exists and is not an empty folder; choose a new one")
    src = formats.find_sources(data_dir)
    if not set(src) & {"pair", "image", "text"}:
        raise SystemExit(f"error: {data_dir} holds no pairs, images or text (see lib/formats.py for the file names)")
    if image_root and not os.path.isdir(image_root):
        raise SystemExit(f"error: --image_root {image_root} is not a folder")
    bad, counts = formats.BadInput(verbose=verbose), {}
    roots = tuple(os.path.realpath(d) for d in (data_dir, image_root) if d)
    os.makedirs(out, exist_ok=True)
    for kind in ("pair", "image", "text"):
        if kind in src:
            items = formats.PARSERS[kind](src[kind], bad, image_root)
            if kind != "text":
                items = _images_under(items, roots, bad, progress)
            counts[kind] = _write_shards(os.path.join(out, FOLDERS[kind]), kind, items, shard_size, progress)
    for kind, name in (("region", "regions.jsonl"), ("pair_test", "pairs_test.jsonl")):
        if kind in src:
            counts[kind] = _copy_jsonl(src[kind], out, name, roots, image_root, bad)
    if verbose:
        print(f"{out}: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + f" | {bad.summary()}")
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lib.shards", description="Tar shards for streamed pre-training data (the layout: lib/shards.py's "
                                "docstring; docs/TRAINING.md, 'Streaming tar shards').")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("pack", help="write a JSONL data folder (lib/formats.py) as tar shards")
    c.add_argument("--data_dir", required=True, help="the JSONL data folder to read (pairs, images, text, regions)")
    c.add_argument("--out", required=True, help="a new (or empty) folder to write the shards to")
    c.add_argument("--shard_size", type=int, default=1000, help="samples per tar file or text file (default 1000)")
    c.add_argument("--image_root", default="", help="the folder the image paths are relative to (default: each "
                   "file's own folder); pack reads image files under it and --data_dir only")
    c = sub.add_parser("index", help="count the samples of the shards in a data folder and write each index.json "
                       "(for shards written by another tool, e.g. img2dataset)")
    c.add_argument("--data_dir", required=True, help="the folder holding pairs/, images/ or text/")
    a = p.parse_args(argv)
    if a.cmd == "pack":
        return pack(a.data_dir, a.out, a.shard_size, image_root=a.image_root)
    found = find_shards(a.data_dir) if os.path.isdir(a.data_dir) else {}
    if not found:
        raise SystemExit(f"error: {a.data_dir} holds no shard folder (pairs/*.tar, images/*.tar or text/*.txt)")
    for kind, folder in found.items():
        print(f"{kind:6s} {folder}: {write_index(folder, kind)} samples")


if __name__ == "__main__":  # python -m lib.shards: run the one copy that the other modules import
    from lib.shards import main
    main()
