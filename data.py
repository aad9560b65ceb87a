"""
Data for xfm: the four pre-training streams of X-FM (text, image, image-text pairs, region-text),
the two masking generators (text MLM and BEiT block-wise MIM), a BPE tokenizer wrapper, a sharded
resumable sampler, and a generator for a synthetic "toy world" of coloured shapes that feeds every
stream and the downstream tasks (XFM.md sections 2, 3.1, 3.2, 3.5, 11).

Run:
    python data.py toy --out data/toy [--seed 0] [--size 64]   # write the toy world (~10 s, ~7 MB in ~10k files)
    python data.py check --data_dir data/toy [--strict]        # parse a folder, print record and bad-input counts
    python -m pytest tests/test_data.py -q

A data folder holds any subset of these files (image paths are relative to the file that names them):
    pairs.jsonl    image-text pairs; "caption" may be a list (one pair per caption). Or pairs.json, a JSON list.
        {"image": "img/pair_00000.png", "caption": "a large red circle to the left of a blue square"}
        {"image": "img/pair_00001.png", "caption": ["a green cross", "there is one shape: a green cross"]}
    regions.jsonl  boxed phrases, box = [x, y, w, h] in pixels, optional whole-image "caption"; or regions.json
        {"image": "img/region_00000.png", "caption": "a red circle above a blue square", "regions":
         [{"box": [20, 4, 12, 12], "caption": "a red circle"}, {"box": [18, 30, 21, 21], "caption": "a blue square"}]}
    text.txt       a text corpus, one document per line (or text.jsonl with {"text": "..."} per line)
        a small purple diamond at the bottom left
        there are two shapes: a red circle and a blue square. the red circle is left of the blue square.
    images.jsonl   image-only data (MIM). Or a folder images/ searched recursively; images.jsonl wins if both exist.
        {"image": "unlabeled/00000.png"}
        {"image": "unlabeled/00001.png"}
    pairs_test.jsonl  held-out pairs for retrieval evaluation, same format as pairs.jsonl.
Files are UTF-8. A line or record that is not is bad input (named, skipped and counted, like a malformed one);
a file in another encoding stops the run with one error that gives the iconv command converting it.

Batches (all tensors; T = longest sequence in the batch, P = (image_size // patch_size) ** 2):
    text:   ids (B,T) masked ids, att (B,T), labels (B,T) with -100 where not masked       MLM p=0.15, <= 20 masks
    image:  image (B,3,S,S), mim_mask (B,P) bool, n_bad
    pair:   image, mim_mask, ids/att (unmasked caption), mlm_ids/mlm_labels (p=0.5, <= 15), img_id (B,), n_bad
    region: image (B_img,3,S,S) and, per caption (N in all): img_index, ids, att, mlm_ids, mlm_labels,
            box (N,4) normalised cx,cy,w,h, is_region, patch_mask (N,P), img_id; n_bad. No MIM on regions.
Every sample draws its randomness from np.random.default_rng([seed, stream, epoch, index]), so batches do not
depend on the number of DataLoader workers and a resumed run continues the exact same sequence.

Augmentation: random resized crop (scale `crop_scale`) + optional horizontal flip + bicubic resize + CLIP
normalisation; no RandAugment (our choice). The toy world's captions name positions and left/right relations,
so for it pass hflip=False (a flip would make "left of" false) and a mild crop_scale such as (0.8, 1.0), or
(1.0, 1.0) for no crop at all: a crop moves shapes, so "at the top" can become false. crop_scale[0] is also the
smallest area (fraction of the image) of the box-preserving crop of the region stream.
"""

import argparse
import codecs
import json
import math
import os
import shlex
import shutil
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# DataLoader workers fork after the tokenizer may have used its Rust thread pool; keep it single-threaded
# so the fork is safe and the library does not print a warning per worker.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
KINDS = ("text", "image", "pair", "region")  # the four streams; the index also salts each stream's rng
SOURCES = {  # kind -> file names looked for in a data folder, first found wins
    "pair": ("pairs.jsonl", "pairs.json"),
    "region": ("regions.jsonl", "regions.json"),
    "text": ("text.txt", "text.jsonl"),
    "image": ("images.jsonl", "images"),
    "pair_test": ("pairs_test.jsonl", "pairs_test.json"),
}

# -----------------------------------------------------------------------------
# Bad input: never kills a long run, never lost silently


class BadInput:
    """One per run. report() prints (the first `max_print` per kind) and counts a problem; strict raises.
    Kinds: malformed JSON, not UTF-8, malformed record, missing image, empty caption, empty text, bad box, no
    regions (found while parsing, so the record or region is skipped) and unreadable image (found while decoding:
    the dataset substitutes the next sample and the batch's n_bad carries the count to the main process)."""

    def __init__(self, strict=False, verbose=True, max_print=10):
        self.strict, self.verbose, self.max_print = strict, verbose, max_print
        self._counts, self._seen = Counter(), Counter()
        self.messages = []  # the printed lines, kept for tests and logs

    def report(self, kind, where, msg, action="skipped", count=True):
        line = f"{where}: {kind} ({msg})"
        if self.strict:
            raise ValueError(line)
        if count:
            self._counts[kind] += 1
        self._seen[kind] += 1
        if self._seen[kind] <= self.max_print:
            self._say(f"{line} - {action}")
        elif self._seen[kind] == self.max_print + 1:
            self._say(f"more '{kind}' problems: counted, not printed")

    def _say(self, line):
        self.messages.append(line)
        if self.verbose:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def add(self, kind, n=1):
        # problems found inside DataLoader workers: printed there, counted here (worker copies are lost)
        if n:
            self._counts[kind] += int(n)

    def counts(self):
        return dict(self._counts)

    def summary(self):
        if not self._counts:
            return "bad input: none"
        return "bad input: " + ", ".join(f"{n} {k}" for k, n in sorted(self._counts.items()))


# -----------------------------------------------------------------------------
# Reading a data folder


def find_sources(data_dir):
    """{kind: path} for the kinds present in data_dir (text, image, pair, region, and pair_test)."""
    found = {}
    for kind, names in SOURCES.items():
        for name in names:
            path = os.path.join(data_dir, name)
            if (os.path.isdir(path) if name == "images" else os.path.isfile(path)):
                found[kind] = path
                break
    return found


# Text that is not UTF-8 is bad input like any other: the line or record is named, skipped and counted. A whole
# file in another encoding is different: when its first PROBE_LINES lines (or records) all fail, or more than half
# of all of them, the run stops with one error that names the file and the command that converts it.
PROBE_LINES = 10


def type_of(value):
    """The JSON type of a value, for messages: "an int", "a list", "null", ..."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _short(text, n=60):
    return text if len(text) <= n else text[:n] + "..."


def _decode(raw):
    """The bytes of one line -> (text, None), or (None, what is wrong) when they are not UTF-8 text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}: {_excerpt(raw, e.start)}"
    if "\x00" in text:  # valid UTF-8, but text never holds NUL: UTF-16 read as bytes
        return None, f"NUL bytes (UTF-16?): {_excerpt(raw, raw.index(0))}"
    return text, None


def _excerpt(raw, at):
    """Bytes around position `at`, quoted; bytes that are not UTF-8 (and NUL) show as \\xNN."""
    shown = raw[max(0, at - 20):at + 20].decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    return f"'{shown.strip()}'"


def encoding_error(path, sample, why):
    """The SystemExit for a whole file in another encoding: what was seen, the likely encoding (guessed from
    `sample`, some of the file's failing bytes) and the command that converts the file."""
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in sample:
        name, code = "UTF-16", "utf-16"
    elif any(0x80 <= c <= 0x9f for c in sample):  # Windows-1252 puts curly quotes and dashes here, Latin-1 nothing
        name, code = "Windows-1252", "cp1252"
    else:
        name, code = "Latin-1", "latin1"
    q = shlex.quote(path)
    return SystemExit(f"error: {path} is not UTF-8: {why}.\nIt is likely {name}; convert it and run again:\n"
                      f"    iconv -f {code} -t utf-8 {q} > {q}.utf8 && mv {q}.utf8 {q}")


def read_lines(path, bad):
    """Yield (where, line) for each non-blank line of a UTF-8 text file, where = "path:N". A line that is not
    UTF-8 is reported ("not UTF-8") and skipped; a file in another encoding raises encoding_error."""
    held, good, n, n_bad, sample, first = [], False, 0, 0, b"", None
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if i == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # Windows editors start UTF-8 files with a byte order mark
            if not raw.strip():
                continue  # blank lines are allowed
            n += 1
            text, problem = _decode(raw)
            if problem is None:
                for where, msg in held:
                    bad.report("not UTF-8", where, msg)
                held, good = [], True
                yield f"{path}:{i}", text
                continue
            n_bad += 1
            sample += raw if n_bad <= PROBE_LINES else b""
            first = first or f"line {i}: {problem}"
            if good:
                bad.report("not UTF-8", f"{path}:{i}", problem)
            else:  # held back until a good line comes: if none does, the file is in another encoding
                held.append((f"{path}:{i}", problem))
                if len(held) == PROBE_LINES:
                    raise encoding_error(path, sample, f"its first {PROBE_LINES} lines fail to decode ({first})")
    if n_bad * 2 > n:
        raise encoding_error(path, sample, f"{n_bad} of its {n} lines fail to decode ({first})")


def load_json(path, bad):
    """A whole .json file -> its value, or None when it is not JSON (reported; the file is skipped). Bytes that
    are not UTF-8 become lone surrogates (surrogateescape), so that read_records can skip just the records that
    hold them; a file that is not JSON because it is in another encoding raises encoding_error."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8-sig", "surrogateescape")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        start = text[:1 << 16]
        if _bad_string(start) is not None or "\x00" in start:  # not even its start is UTF-8 text
            raise encoding_error(path, raw[:1 << 16], f"it is no JSON when read as UTF-8 ({e})") from None
        bad.report("malformed JSON", path, str(e), action="file skipped")
        return None


def _bad_string(value):
    """The first string in a JSON value (keys included) that cannot be UTF-8 text, or None. It holds lone
    surrogates: bytes that were not UTF-8 (load_json) or a broken \\u escape; no tokenizer takes it."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
            return None
        except UnicodeEncodeError:
            return value
    if isinstance(value, dict):
        value = [x for item in value.items() for x in item]
    for x in value if isinstance(value, list) else ():
        s = _bad_string(x)
        if s is not None:
            return s
    return None


def not_utf8(value):
    """What makes a parsed JSON value (a record, a field, a name) not UTF-8 text, or None."""
    s = _bad_string(value)
    return None if s is None else _string_problem(s)[1]


def _string_problem(s):
    """-> (the bytes that were not UTF-8, b"" for a broken \\u escape; the message) for a _bad_string."""
    k = next(i for i, c in enumerate(s) if "\ud800" <= c <= "\udfff")
    part = s[max(0, k - 20):k + 20]
    if "\udc80" <= s[k] <= "\udcff":  # surrogateescape keeps byte b as chr(0xdc00 + b)
        try:
            raw = part.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a broken \\u escape close by as well
            raw = bytes([ord(s[k]) - 0xdc00])
        return raw, f"byte 0x{ord(s[k]) - 0xdc00:02x}: '{raw.decode('utf-8', 'backslashreplace')}'"
    return b"", f"a broken \\u escape: '{part.encode('utf-8', 'backslashreplace').decode()}'"


def read_records(path, bad):
    """Yield (where, record) for each JSON object in a .jsonl file (one per line) or a .json list. A record that
    is not UTF-8 is reported and skipped; a .json list that is mostly not UTF-8 raises encoding_error."""
    if path.endswith(".json"):  # a .json file is parsed whole (ALBEF / X-VLM style), so one error loses the file
        items = load_json(path, bad)
        if items is None:
            return
        if not isinstance(items, list):
            bad.report("malformed JSON", path, f"expected a JSON list of records, got {type_of(items)}",
                       action="file skipped")
            return
        check_encoding(path, items)
        numbered = ((f"{path}[{i}]", rec) for i, rec in enumerate(items))
    else:
        numbered = _jsonl_lines(path, bad)
    for where, rec in numbered:
        problem = not_utf8(rec)
        if problem:
            bad.report("not UTF-8", where, problem)
        elif isinstance(rec, dict):
            yield where, rec
        else:
            bad.report("malformed record", where, f"expected a JSON object, got {type_of(rec)}")


def check_encoding(path, items):
    """Raise encoding_error when more than half of a .json list's records hold bytes that are not UTF-8."""
    flagged = [(i, _string_problem(s)) for i, s in enumerate(map(_bad_string, items)) if s is not None]
    flagged = [(i, raw, problem) for i, (raw, problem) in flagged if raw]  # bytes, not broken \u escapes
    if len(flagged) * 2 > len(items):
        i, _, problem = flagged[0]
        sample = b"".join(raw[:200] for _, raw, _ in flagged[:PROBE_LINES])
        why = f"{len(flagged)} of its {len(items)} records fail to decode ([{i}]: {problem})"
        raise encoding_error(path, sample, why)


def _jsonl_lines(path, bad):
    for where, line in read_lines(path, bad):
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            bad.report("malformed JSON", where, str(e))


def captions_of(rec, where, bad, key="caption"):
    """rec[key], a caption or a list of captions -> the non-empty ones, stripped. Each bad one is reported: a
    missing field or a caption that is not a string ("malformed record"), an empty one ("empty caption")."""
    if key not in rec:
        bad.report("malformed record", where, f"no '{key}' field")
        return []
    value, out = rec[key], []
    if value == []:
        bad.report("empty caption", where, f"{key} is an empty list")
    for j, c in enumerate(value if isinstance(value, list) else [value]):
        name = f"{key}[{j}]" if isinstance(value, list) else key
        if not isinstance(c, str):
            bad.report("malformed record", where, f"{name} is {type_of(c)}, not a string")
        elif not c.strip():
            bad.report("empty caption", where, f"{name} is empty")
        else:
            out.append(c.strip())
    return out


def _image_path(rec, base, where, bad):
    """Resolve rec["image"] relative to `base`; report and return None if the field or the file is missing."""
    rel = rec.get("image")
    if not isinstance(rel, str) or not rel:
        why = "no 'image' field" if "image" not in rec else \
            "image is empty" if rel == "" else f"image is {type_of(rel)}, not a string"
        bad.report("malformed record", where, why)
        return None
    path = os.path.normpath(os.path.join(base, rel))
    if not os.path.isfile(path):
        bad.report("missing image", where, f"no such file {rel}")
        return None
    return path


def box_problem(box, W, H):
    """Why a box [x, y, w, h] in pixels of a W x H image cannot be used, or None: not 4 finite numbers, w or
    h <= 0, or outside the image by more than 1 px (rounding slack)."""
    if not (isinstance(box, list) and len(box) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return f"box {_short(repr(box))} is not [x, y, w, h] of 4 finite numbers"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"box {box} has w or h <= 0"
    if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1:
        return f"box {box} is outside the {W}x{H} image"
    return None


def parse_pairs(path, bad):
    """-> list of {"image", "caption", "where"}: one item per caption."""
    base, out = os.path.dirname(path), []  # image paths are relative to the file's folder
    for where, rec in read_records(path, bad):
        caps = captions_of(rec, where, bad)
        img = _image_path(rec, base, where, bad) if caps else None
        out += [{"image": img, "caption": c, "where": where} for c in caps if img]
    return out


def parse_regions(path, bad):
    """-> list of {"image", "size", "captions", "regions": [{"box", "captions"}], "where"}; bad boxes dropped."""
    base, out = os.path.dirname(path), []
    for where, rec in read_records(path, bad):
        if not isinstance(rec.get("regions", []), list):  # a string or an object would be read item by item
            bad.report("malformed record", where, f"regions is {type_of(rec['regions'])}, not a list")
            continue
        img = _image_path(rec, base, where, bad)
        if img is None:
            continue
        try:  # boxes are checked against the image size; opening reads only the header
            with Image.open(img) as im:
                W, H = im.size
        except Exception as e:
            bad.report("unreadable image", where, f"{img}: {e}")
            continue
        caps = captions_of(rec, where, bad) if "caption" in rec else []
        regions = []
        for j, r in enumerate(rec.get("regions") or []):
            rw = f"{where} region {j}"
            if not isinstance(r, dict):
                bad.report("malformed record", rw, f"region is {type_of(r)}, not an object")
                continue
            problem = box_problem(r.get("box"), W, H)
            if problem:
                bad.report("bad box", rw, problem)
                continue
            x, y, w, h = map(float, r["box"])
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)  # clip the slack away
            rcaps = captions_of(r, rw, bad)
            if rcaps:
                regions.append({"box": [x0, y0, x1 - x0, y1 - y0], "captions": rcaps})
        if not regions:  # the region stream exists for its boxes: a record without one is skipped
            bad.report("no regions", where, "no valid region left in the record")
            continue
        out.append({"image": img, "size": (W, H), "captions": caps, "regions": regions, "where": where})
    return out


def parse_texts(path, bad):
    """-> list of documents from text.txt (one per line) or text.jsonl ({"text": ...})."""
    if path.endswith(".txt"):
        return [line.strip() for _, line in read_lines(path, bad) if line.strip()]
    out = []
    for where, rec in read_records(path, bad):
        t = rec.get("text")
        if "text" not in rec or not isinstance(t, str):
            bad.report("malformed record", where, "no 'text' field" if "text" not in rec else
                       f"text is {type_of(t)}, not a string")
        elif not t.strip():
            bad.report("empty text", where, "text is empty")
        else:
            out.append(t.strip())
    return out


def parse_images(path, bad):
    """-> list of {"image", "where"} from images.jsonl or every image file under an images/ folder."""
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()  # a fixed walk order keeps the dataset order (and so the run) reproducible
            files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
        return [{"image": p, "where": p} for p in files]
    base, out = os.path.dirname(path), []
    for where, rec in read_records(path, bad):
        img = _image_path(rec, base, where, bad)
        if img:
            out.append({"image": img, "where": where})
    return out


PARSERS = {"pair": parse_pairs, "pair_test": parse_pairs, "region": parse_regions,
           "text": parse_texts, "image": parse_images}


def load_image(path):
    """PIL RGB image, fully decoded (so a truncated file fails here, not later)."""
    with Image.open(path) as im:
        return im.convert("RGB")


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE, RoBERTa's special tokens


class Tokenizer:
    """A thin wrapper over a `tokenizers` tokenizer.json. Special ids are looked up by string, never assumed."""

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa order: a trained vocab gets ids 0..4

    def __init__(self, hf):
        # we add <s> ... </s> ourselves, so a trained tokenizer and RoBERTa's behave the same
        hf.no_truncation()
        hf.no_padding()
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in self.SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id = (ids[t] for t in self.SPECIALS)
        self.special_ids = set(ids.values())
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts, vocab_size, path):
        """Byte-level BPE (as RoBERTa's) trained on texts, saved to path. A small corpus such as the toy world
        runs out of merges early, so the resulting `vocab_size` can be below the one asked for."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        tok = cls(hf)
        tok.save(path)
        return tok

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.hf.save(path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a tokenizer.json

    @classmethod
    def load(cls, path):
        return cls(HFTokenizer.from_file(path))

    def to_json(self):  # the whole tokenizer as one string: what rank 0 sends the other ranks
        return self.hf.to_str()

    @classmethod
    def from_json(cls, text):
        return cls(HFTokenizer.from_str(text))

    def encode(self, text, max_len):
        """<s> tokens </s>, truncated to max_len with </s> kept last."""
        body = self.hf.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [self.cls_id] + body + [self.sep_id]

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def random_token(self, rng):
        while True:  # specials are few, so this rarely loops
            t = int(rng.integers(self.vocab_size))
            if t not in self.special_ids:
                return t


def corpus_texts(data_dir):
    """Every caption, region phrase and text document of a folder (not the test pairs): the tokenizer corpus."""
    src, quiet = find_sources(data_dir), BadInput(verbose=False)
    texts = [r["caption"] for r in parse_pairs(src["pair"], quiet)] if "pair" in src else []
    for rec in parse_regions(src["region"], quiet) if "region" in src else []:
        texts += rec["captions"] + [c for r in rec["regions"] for c in r["captions"]]
    return texts + (parse_texts(src["text"], quiet) if "text" in src else [])


def get_tokenizer(data_dir, run_dir, vocab_size, tokenizer_path=None):
    """Load tokenizer_path, else run_dir/tokenizer.json, else train one on the folder and save it there.
    Under DDP rank 0 calls it and sends the others its JSON (train.rank0_shares), so they need no shared folder."""
    if tokenizer_path:
        return Tokenizer.load(tokenizer_path)
    path = os.path.join(run_dir, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.load(path)
    return Tokenizer.train(corpus_texts(data_dir), vocab_size, path)


# -----------------------------------------------------------------------------
# Masking: text MLM (XFM.md 3.1, 3.5) and BEiT block-wise MIM (3.2)


def mask_text(ids, tok, prob, max_masks, rng, skipgram_prob=0.2, max_span=3):
    """MLM corruption. -> (masked ids, labels) with labels = original id where chosen, -100 elsewhere."""
    ids, labels = list(ids), [-100] * len(ids)
    cand = [i for i, t in enumerate(ids) if i > 0 and t not in tok.special_ids]  # never <s>, </s>, <pad>
    if not cand:
        return ids, labels
    n = min(max_masks, max(1, round(len(cand) * prob)))
    cand_set, chosen = set(cand), set()
    while len(chosen) < n:
        free = [i for i in cand if i not in chosen]  # start at an unchosen position, so each round progresses
        start = free[rng.integers(len(free))]
        span = int(rng.integers(2, max_span + 1)) if rng.random() < skipgram_prob else 1  # "skipgram": 2-3 tokens
        for p in range(start, start + span):
            if len(chosen) < n and p in cand_set:
                chosen.add(p)
    for p in sorted(chosen):
        labels[p] = ids[p]
        r = rng.random()
        if r < 0.8:  # 80 % <mask>, 10 % a random token, 10 % unchanged (BERT)
            ids[p] = tok.mask_id
        elif r < 0.9:
            ids[p] = tok.random_token(rng)
    return ids, labels


def mim_counts(grid):
    """(num_masking, min_patches) scaled from BEiT's 75 and 16 of 196: (75, 16) @14, (24, 5) @8, (6, 2) @4."""
    return round(grid * grid * 75 / 196), max(2, round(grid * grid * 16 / 196))


def block_mask(grid, num_masking, min_patches, rng, min_aspect=0.3):
    """BEiT block-wise mask over a grid x grid patch grid -> bool (grid*grid,) with exactly num_masking True."""
    mask = np.zeros((grid, grid), dtype=bool)
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        left, delta = num_masking - count, 0
        for _ in range(10):  # up to 10 attempts to place one more rectangle
            # BEiT draws the area between min_patches and what is left, in whichever order they come
            area = rng.uniform(min(min_patches, left), max(min_patches, left))
            ar = math.exp(rng.uniform(*log_ar))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 1 <= w < grid and 1 <= h < grid:
                top, lft = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
                new = h * w - int(mask[top:top + h, lft:lft + w].sum())
                if 0 < new <= left:  # must add something and must not overshoot
                    mask[top:top + h, lft:lft + w] = True
                    delta = new
                    break
        if delta == 0:
            break  # no rectangle fits any more
        count += delta
    # blocks can fall short of the target (rarely overshoot): fix the count with random single patches
    flat = mask.reshape(-1)
    diff = num_masking - int(flat.sum())
    if diff > 0:
        flat[rng.choice(np.flatnonzero(~flat), diff, replace=False)] = True
    elif diff < 0:
        flat[rng.choice(np.flatnonzero(flat), -diff, replace=False)] = False
    return flat


# -----------------------------------------------------------------------------
# Image transforms (Pillow + numpy; no torchvision)


def to_tensor(img):
    """PIL RGB (H, W) -> CLIP-normalised float tensor (3, H, W)."""
    x = (np.asarray(img, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def random_resized_crop(img, size, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=True):
    """torchvision's RandomResizedCrop (bicubic) + optional horizontal flip (p 0.5) + normalise -> (3, size, size).
    scale=(1, 1) means no crop at all."""
    W, H = img.size
    box = (0, 0, W, H) if scale[0] >= 1 else None
    for _ in range(10 if box is None else 0):
        area = W * H * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < w <= W and 0 < h <= H:
            x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    if box is None:  # fallback as in torchvision: the largest central crop with an allowed aspect ratio
        if W / H < ratio[0]:
            w, h = W, int(round(W / ratio[0]))
        elif W / H > ratio[1]:
            w, h = int(round(H * ratio[1])), H
        else:
            w, h = W, H
        box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)  # crop and resize in one call
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def eval_transform(img, size):
    """Plain bicubic resize to size x size + normalise -> (3, size, size)."""
    return to_tensor(img.resize((size, size), Image.Resampling.BICUBIC))


def crop_boxes(boxes_xywh, crop, min_in=0.5):
    """Pixel boxes (x, y, w, h) -> normalised (cx, cy, w, h) inside crop = (x0, y0, x1, y1), clipped to it;
    None for a box with less than min_in of its area left inside the crop."""
    x0, y0, x1, y1 = crop
    cw, ch = x1 - x0, y1 - y0
    out = []
    for bx, by, bw, bh in boxes_xywh:
        # clip to the crop, then shift into its frame
        l, t, r, b = max(bx, x0) - x0, max(by, y0) - y0, min(bx + bw, x1) - x0, min(by + bh, y1) - y0
        if r <= l or b <= t or (r - l) * (b - t) < min_in * bw * bh:
            out.append(None)
            continue
        # the crop is resized to a square, so normalising by its own width and height maps it exactly
        out.append(((l + r) / 2 / cw, (t + b) / 2 / ch, (r - l) / cw, (b - t) / ch))
    return out


def region_crop(img, boxes_xywh, size, rng, n_keep=None, min_scale=0.0):
    """X-VLM style box-preserving crop. The crop contains the first n_keep boxes (default all) fully; its
    edges are drawn uniformly between those boxes and the image border (redrawn up to 10 times until it covers
    at least min_scale of the image; min_scale >= 1: no crop); then it is resized to size x size.
    -> (tensor (3, size, size), list of normalised (cx, cy, w, h), None where a box was dropped)."""
    W, H = img.size
    keep = boxes_xywh[: len(boxes_xywh) if n_keep is None else n_keep]
    crop = (0, 0, W, H)  # also the fallback when no drawn crop is large enough
    for _ in range(10 if keep and min_scale < 1 else 0):
        ux0 = int(math.floor(min(b[0] for b in keep)))  # the union of the kept boxes, in whole pixels
        uy0 = int(math.floor(min(b[1] for b in keep)))
        ux1 = int(math.ceil(max(b[0] + b[2] for b in keep)))
        uy1 = int(math.ceil(max(b[1] + b[3] for b in keep)))
        c = (int(rng.integers(0, ux0 + 1)), int(rng.integers(0, uy0 + 1)),
             int(rng.integers(ux1, W + 1)), int(rng.integers(uy1, H + 1)))
        if (c[2] - c[0]) * (c[3] - c[1]) >= min_scale * W * H:
            crop = c
            break
    x = to_tensor(img.resize((size, size), Image.Resampling.BICUBIC, box=crop))
    return x, crop_boxes(boxes_xywh, crop)


def box_patch_mask(box_cxcywh, grid):
    """bool (grid*grid,): the patches whose cells overlap a normalised (cx, cy, w, h) box; never empty."""
    cx, cy, w, h = box_cxcywh
    lo = np.arange(grid) / grid  # left/top edge of each cell
    eps = 1e-6  # a box edge lying exactly on a cell border does not touch the next cell
    cols = (lo < cx + w / 2 - eps) & (lo + 1 / grid > cx - w / 2 + eps)
    rows = (lo < cy + h / 2 - eps) & (lo + 1 / grid > cy - h / 2 + eps)
    m = rows[:, None] & cols[None, :]  # (grid, grid), row-major like the patch sequence
    if not m.any():  # a degenerate box still gets the cell under its centre
        m[min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)] = True
    return m.reshape(-1)


# -----------------------------------------------------------------------------
# Datasets: items are keyed by (index, epoch) from the sampler; collate builds the batch dicts


def pad_seqs(seqs, value):
    """list of lists -> (B, T) long tensor padded with value, T = the longest."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def attention(seqs, T):
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        att[i, : len(s)] = 1
    return att


class _Base(Dataset):
    """Shared plumbing: per-sample rng and image loading with a deterministic fallback."""

    def __init__(self, items, kind, seed, bad):
        self.items, self.salt, self.seed, self.bad = items, KINDS.index(kind), seed, bad

    def __len__(self):
        return len(self.items)

    def rng(self, epoch, index):
        # the sample's own generator: independent of worker count and of what ran before (exact resume)
        return np.random.default_rng([self.seed, self.salt, epoch, index])

    def load(self, index):
        """-> (j, PIL image, n_bad): item j is index or, if its image cannot be decoded, the next readable one."""
        n = len(self.items)
        for k in range(n):
            j = (index + k) % n
            item = self.items[j]
            try:
                return j, load_image(item["image"]), k
            except Exception as e:
                # printed here (maybe in a worker); counted in the main process through the batch's n_bad
                self.bad.report("unreadable image", item["where"], f"{item['image']}: {e}",
                                action="replaced by the next sample", count=False)
        raise RuntimeError("no readable image in the whole dataset")


class TextDataset(_Base):
    def __init__(self, texts, tok, text_len, seed, bad):
        super().__init__(texts, "text", seed, bad)
        self.tok, self.text_len = tok, text_len

    def __getitem__(self, key):
        index, epoch = key
        ids = self.tok.encode(self.items[index], self.text_len)
        masked, labels = mask_text(ids, self.tok, 0.15, 20, self.rng(epoch, index))
        return {"ids": masked, "labels": labels}

    def collate(self, samples):
        ids = pad_seqs([s["ids"] for s in samples], self.tok.pad_id)  # (B, T)
        return {"ids": ids, "att": attention([s["ids"] for s in samples], ids.shape[1]),
                "labels": pad_seqs([s["labels"] for s in samples], -100)}


class ImageDataset(_Base):
    def __init__(self, items, image_size, grid, seed, bad, hflip, crop_scale, kind="image"):
        super().__init__(items, kind, seed, bad)
        self.size, self.grid, self.hflip, self.crop_scale = image_size, grid, hflip, crop_scale

    def image_and_mask(self, key):
        index, epoch = key
        rng = self.rng(epoch, index)
        j, img, n_bad = self.load(index)
        x = random_resized_crop(img, self.size, rng, scale=self.crop_scale, hflip=self.hflip)
        # the masked and unmasked MIM views are this same tensor; only the mask differs (XFM.md 2)
        m = block_mask(self.grid, *mim_counts(self.grid), rng)
        return j, x, torch.from_numpy(m), n_bad, rng

    def __getitem__(self, key):
        _, x, m, n_bad, _ = self.image_and_mask(key)
        return {"image": x, "mim_mask": m, "bad": n_bad}

    def collate(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
                "mim_mask": torch.stack([s["mim_mask"] for s in samples]),  # (B, P)
                "n_bad": sum(s["bad"] for s in samples)}


def _image_ids(items):
    """Same image file -> same integer id (so a duplicate is never used as a hard negative)."""
    ids = {}
    return [ids.setdefault(it["image"], len(ids)) for it in items]


# How captions are masked: X-FM's IMLM masks half of each caption (at most 15 tokens, with "skipgram" spans);
# FLAVA's MMM masks 15 % of the tokens, BERT style (FLAVA.md §2.6). (prob, max_masks, skipgram_prob)
CAPTION_MASKING = {"xfm": (0.5, 15, 0.2), "flava": (0.15, 10 ** 6, 0.0)}


class PairDataset(ImageDataset):
    """Image-text pairs. itm_neg_prob > 0 (FLAVA): with that probability the caption is replaced by the caption
    of a random pair with another image, and itm_label says 0 (1 = the caption matches the image)."""

    def __init__(self, pairs, tok, image_size, grid, caption_len, seed, bad, hflip, crop_scale, caption_mask="xfm",
                 itm_neg_prob=0.0):
        super().__init__(pairs, image_size, grid, seed, bad, hflip, crop_scale, kind="pair")
        self.tok, self.caption_len, self.img_ids = tok, caption_len, _image_ids(pairs)
        self.prob, self.max_masks, self.skipgram = CAPTION_MASKING[caption_mask]
        self.itm_neg_prob = itm_neg_prob

    def __getitem__(self, key):
        j, x, m, n_bad, rng = self.image_and_mask(key)
        caption, match = self.items[j]["caption"], 1                      # j: the caption goes with the image
        if self.itm_neg_prob and rng.random() < self.itm_neg_prob:
            for _ in range(10):  # a random pair showing another image (10 tries: duplicates are rare)
                k = int(rng.integers(len(self.items)))
                if self.img_ids[k] != self.img_ids[j]:
                    caption, match = self.items[k]["caption"], 0
                    break
        ids = self.tok.encode(caption, self.caption_len)
        mlm_ids, mlm_labels = mask_text(ids, self.tok, self.prob, self.max_masks, rng, skipgram_prob=self.skipgram)
        return {"image": x, "mim_mask": m, "ids": ids, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels,
                "img_id": self.img_ids[j], "itm_label": match, "bad": n_bad}

    def collate(self, samples):
        batch = super().collate(samples)
        ids = pad_seqs([s["ids"] for s in samples], self.tok.pad_id)  # (B, T)
        batch.update(ids=ids, att=attention([s["ids"] for s in samples], ids.shape[1]),
                     mlm_ids=pad_seqs([s["mlm_ids"] for s in samples], self.tok.pad_id),
                     mlm_labels=pad_seqs([s["mlm_labels"] for s in samples], -100),
                     img_id=torch.tensor([s["img_id"] for s in samples], dtype=torch.long),
                     itm_label=torch.tensor([s["itm_label"] for s in samples], dtype=torch.long))
        return batch


class RegionDataset(_Base):
    """One item = one image with up to max_regions sampled region captions, plus its whole-image caption."""

    def __init__(self, records, tok, image_size, grid, caption_len, seed, bad, max_regions=5, min_scale=0.0):
        super().__init__(records, "region", seed, bad)
        self.tok, self.size, self.grid, self.caption_len = tok, image_size, grid, caption_len
        self.max_regions, self.min_scale, self.img_ids = max_regions, min_scale, _image_ids(records)

    def __getitem__(self, key):
        index, epoch = key
        rng = self.rng(epoch, index)
        j, img, n_bad = self.load(index)
        rec = self.items[j]
        regs = rec["regions"]
        pick = rng.choice(len(regs), min(self.max_regions, len(regs)), replace=False)
        # the crop keeps every sampled box whole, so no region is lost (no hflip: it would swap left/right words)
        x, boxes = region_crop(img, [regs[i]["box"] for i in pick], self.size, rng, min_scale=self.min_scale)
        texts = []
        for i, box in zip(pick, boxes):
            if box is None:  # cannot happen while the crop keeps every sampled box; kept as a guard
                continue
            caps = regs[i]["captions"]
            texts.append((caps[rng.integers(len(caps))], box, True, box_patch_mask(box, self.grid)))
        if rec["captions"]:  # the whole-image caption: box = the whole image, every patch visible
            caps = rec["captions"]
            texts.append((caps[rng.integers(len(caps))], (0.5, 0.5, 1.0, 1.0), False,
                          np.ones(self.grid * self.grid, dtype=bool)))
        out = []
        for cap, box, is_region, pmask in texts:
            ids = self.tok.encode(cap, self.caption_len)
            mlm_ids, mlm_labels = mask_text(ids, self.tok, 0.5, 15, rng)
            out.append({"ids": ids, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels, "box": box,
                        "is_region": is_region, "patch_mask": pmask})
        return {"image": x, "texts": out, "img_id": self.img_ids[j], "bad": n_bad}

    def collate(self, samples):
        # flatten B_img images into N captions; img_index says which image each caption belongs to
        texts = [t for s in samples for t in s["texts"]]
        img_index = [b for b, s in enumerate(samples) for _ in s["texts"]]
        ids = pad_seqs([t["ids"] for t in texts], self.tok.pad_id)  # (N, T)
        return {"image": torch.stack([s["image"] for s in samples]),  # (B_img, 3, S, S)
                "img_index": torch.tensor(img_index, dtype=torch.long),  # (N,)
                "ids": ids, "att": attention([t["ids"] for t in texts], ids.shape[1]),
                "mlm_ids": pad_seqs([t["mlm_ids"] for t in texts], self.tok.pad_id),
                "mlm_labels": pad_seqs([t["mlm_labels"] for t in texts], -100),
                "box": torch.tensor([t["box"] for t in texts], dtype=torch.float32),  # (N, 4) cx, cy, w, h
                "is_region": torch.tensor([t["is_region"] for t in texts], dtype=torch.bool),
                "patch_mask": torch.from_numpy(np.stack([t["patch_mask"] for t in texts])),  # (N, P)
                "img_id": torch.tensor([samples[b]["img_id"] for b in img_index], dtype=torch.long),
                "n_bad": sum(s["bad"] for s in samples)}


# -----------------------------------------------------------------------------
# Sharded, resumable streams


class ShardedBatchSampler:
    """Infinite batches of (index, epoch) for one rank. Epoch e permutes the data with seed*1000+e (the same
    on every rank), drops the tail so that every rank gets the same number of full batches, and gives rank r
    the disjoint slice perm[r::world_size]. `start` = the number of batches to skip (resume)."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1, name="data"):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.batches_per_epoch = n // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"stream '{name}' has {n} samples, fewer than world_size * batch_size = "
                             f"{world_size} * {batch_size}; lower the batch size or add data")
        self.start = 0

    def epoch_batches(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        keep = self.batches_per_epoch * self.world_size * self.batch_size  # drop_last, on all ranks alike
        mine = torch.randperm(self.n, generator=g)[:keep][self.rank::self.world_size].tolist()
        B = self.batch_size
        return [[(i, epoch) for i in mine[b * B:(b + 1) * B]] for b in range(self.batches_per_epoch)]

    def __iter__(self):
        k, cached = self.start, (None, None)
        while True:
            epoch, b = divmod(k, self.batches_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.epoch_batches(epoch))
            yield cached[1][b]
            k += 1


class Stream:
    """An infinite iterator of batch dicts for one kind. state_dict() / load_state_dict() resume it exactly."""

    def __init__(self, kind, dataset, batch_size, *, seed, rank, world_size, num_workers, bad, pin_memory=False):
        self.kind, self.dataset, self.bad = kind, dataset, bad
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size, name=kind)
        # whole batches go to the workers, so workers read disjoint batches and keep their order
        # its own generator: creating the loader's iterator must not draw from the global torch RNG, or a
        # resumed run (which creates it at another point) would diverge from the uninterrupted one
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=dataset.collate,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 # page-locked batches make train.to_device's non_blocking copy truly asynchronous
                                 pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed * 1000 + rank))
        self.len_per_epoch = self.sampler.batches_per_epoch
        self.batches, self._it = 0, None

    @property
    def epoch(self):
        return self.batches // self.len_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:  # (re)start the sampler right after the last batch handed out
            self.sampler.start = self.batches
            self._it = iter(self.loader)
        batch = next(self._it)
        self.batches += 1
        self.bad.add("unreadable image", batch.get("n_bad", 0))  # problems seen in workers, counted here
        return batch

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches, self._it = int(state["batches"]), None


def build_streams(data_dir, tok, *, image_size, patch_size, batch_size, text_len, caption_len, seed, rank,
                  world_size, num_workers, bad, hflip, crop_scale, max_regions=5, caption_mask="xfm", itm_neg_prob=0.0,
                  pin_memory=False):
    """{kind: Stream} for every kind present in data_dir and named in batch_size (a dict kind -> per-rank batch;
    for "region" it counts images). crop_scale[0] also bounds the region crop's area from below;
    crop_scale=(1, 1) turns every crop off, the region crop included."""
    assert image_size % patch_size == 0, "image_size must be a multiple of patch_size"
    grid = image_size // patch_size
    streams = {}
    # caption_mask: a CAPTION_MASKING key (xfm | flava); itm_neg_prob: FLAVA's swapped captions (PairDataset)
    for kind, path in find_sources(data_dir).items():
        if kind not in KINDS:
            continue
        if kind not in batch_size:
            if bad.verbose:
                print(f"note: {path} found, but no batch size for '{kind}': stream not used", file=sys.stderr)
            continue
        items = PARSERS[kind](path, bad)
        if kind == "text":
            ds = TextDataset(items, tok, text_len, seed, bad)
        elif kind == "image":
            ds = ImageDataset(items, image_size, grid, seed, bad, hflip, crop_scale)
        elif kind == "pair":
            ds = PairDataset(items, tok, image_size, grid, caption_len, seed, bad, hflip, crop_scale, caption_mask,
                             itm_neg_prob)
        else:
            ds = RegionDataset(items, tok, image_size, grid, caption_len, seed, bad, max_regions,
                               min_scale=crop_scale[0])
        streams[kind] = Stream(kind, ds, batch_size[kind], seed=seed, rank=rank, world_size=world_size,
                               num_workers=num_workers, bad=bad, pin_memory=pin_memory)
    return {k: streams[k] for k in KINDS if k in streams}


def load_retrieval_set(path, tok, image_size, caption_len, bad):
    """Held-out pairs with images deduplicated, for retrieval: image (Ni,3,S,S), ids/att (Nt,T),
    txt2img (Nt,) and img2txt (Ni lists of text indices). Unreadable images are reported and dropped."""
    index, images, seqs, txt2img, img2txt = {}, [], [], [], []
    for item in parse_pairs(path, bad):
        p = item["image"]
        if p not in index:
            try:
                images.append(eval_transform(load_image(p), image_size))
                index[p] = len(images) - 1
                img2txt.append([])
            except Exception as e:
                bad.report("unreadable image", item["where"], f"{p}: {e}", action="dropped with its captions")
                index[p] = None
        if index[p] is not None:
            img2txt[index[p]].append(len(seqs))
            txt2img.append(index[p])
            seqs.append(tok.encode(item["caption"], caption_len))
    if not images:
        raise ValueError(f"{path}: no readable image-text pair for retrieval")
    ids = pad_seqs(seqs, tok.pad_id)
    return {"image": torch.stack(images), "ids": ids, "att": attention(seqs, ids.shape[1]),
            "txt2img": torch.tensor(txt2img, dtype=torch.long), "img2txt": img2txt}


# -----------------------------------------------------------------------------
# The toy world: coloured shapes with captions, boxes, questions and labels

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215),
           "yellow": (230, 200, 30), "purple": (135, 60, 175), "orange": (240, 130, 25)}
SIZES = {"small": 0.19, "large": 0.33}  # side length as a fraction of the image
REL_WORDS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
             "above": ("above", "over"), "below": ("below", "under")}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three")
VQA_ANSWERS = list(COLOURS) + list(SHAPES) + list(NUMBERS[1:]) + list(REL_WORDS) + ["yes", "no"]


def _centre(o):
    x, y, s, _ = o["box"]
    return x + s / 2, y + s / 2


def _rel(a, b):
    """Where a is relative to b, along the axis on which their centres differ most."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _pos(o, S):
    """Coarse position on a 3x3 grid: "top left", "top", ..., "center"."""
    cx, cy = _centre(o)
    v = "top" if cy < S / 3 else "bottom" if cy > 2 * S / 3 else ""
    h = "left" if cx < S / 3 else "right" if cx > 2 * S / 3 else ""
    return f"{v} {h}".strip() or "center"


def _where(o, S):
    p = _pos(o, S)
    return "in the center" if p == "center" else f"at the {p}"


def _layout(rng, S, n=None):
    """A scene: 1-3 shapes with distinct (colour, shape), not overlapping, with unambiguous relations."""
    while True:
        k, objs = int(rng.integers(1, 4)) if n is None else n, []
        for _ in range(k):
            while True:
                shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
                if all((o["shape"], o["colour"]) != (shape, colour) for o in objs):
                    break  # each (colour, shape) once, so "the red circle" names one object
            size = "small" if rng.random() < 0.5 else "large"
            s = int(round(SIZES[size] * S))
            for _ in range(30):
                x, y = int(rng.integers(1, S - s)), int(rng.integers(1, S - s))
                o = {"shape": shape, "colour": colour, "size": size, "box": [x, y, s, s]}
                if all(_apart(o, p) for p in objs):
                    objs.append(o)
                    break
        if len(objs) == k:
            return objs


def _apart(a, b, gap=2):
    (ax, ay, s, _), (bx, by, t, _) = a["box"], b["box"]
    overlap = ax < bx + t + gap and bx < ax + s + gap and ay < by + t + gap and by < ay + s + gap
    dx, dy = [abs(u - v) for u, v in zip(_centre(a), _centre(b))]
    return not overlap and max(dx, dy) >= 1.5 * min(dx, dy)  # one axis clearly dominates: "left of" or "above"


def _signature(objs, S):
    return tuple(sorted((o["size"], o["colour"], o["shape"], _pos(o, S)) for o in objs))


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase  # "an orange circle"


def _np(o, rng, p_size=0.7):
    """Noun phrase: "a large red circle" (the size word is dropped with probability 1 - p_size)."""
    size = f"{o['size']} " if rng.random() < p_size else ""
    return _a(f"{size}{o['colour']} {o['shape']}")


def _caption(objs, S, rng, full=False):
    """One whole-image caption. full=True: a complete description (sizes, all shapes, relation or place)."""
    p = 1.0 if full else 0.7
    o = [objs[i] for i in rng.permutation(len(objs))]
    t = 0 if full else int(rng.integers(4))
    rel = lambda a, b: REL_WORDS[_rel(a, b)][rng.integers(2)]  # noqa: E731
    if len(o) == 1:
        A = _np(o[0], rng, p_size=p)
        return [f"{A} {_where(o[0], S)}", A, f"there is one shape: {A}", f"{A} on a plain background"][t]
    if len(o) == 2:
        A, B = _np(o[0], rng, p_size=p), _np(o[1], rng, p_size=p)
        return [f"{A} {rel(o[0], o[1])} {B}", f"{A} is {rel(o[0], o[1])} {B}",
                f"there are two shapes: {A} and {B}", f"{A} and {B}"][t]
    A, B, C = (_np(x, rng, p_size=p) for x in o)
    if t == 0:  # the complete form: all three shapes and two relations
        return f"{A} {rel(o[0], o[1])} {B}, and {C} {rel(o[2], o[0])} the {o[0]['colour']} {o[0]['shape']}"
    if t == 1:
        return f"{A} is {rel(o[0], o[1])} {B}, and {C} {_where(o[2], S)}"
    return f"there are three shapes: {A}, {B} and {C}" if t == 2 else f"three shapes: {A}, {B} and {C}"


def _captions2(objs, S, rng, full=False):
    """Two different captions of one scene (when the grammar allows)."""
    a = _caption(objs, S, rng, full)
    for _ in range(5):
        b = _caption(objs, S, rng, full)
        if b != a:
            break
    return [a, b] if b != a else [a]


def _document(objs, S, rng):
    """A multi-sentence text-only document about one scene."""
    sents = [_caption(objs, S, rng) for _ in range(int(rng.integers(2, 4)))]
    sents += [f"the {o['colour']} {o['shape']} is {o['size']}" for o in objs if rng.random() < 0.5]
    return ". ".join(dict.fromkeys(sents)) + "."  # dict.fromkeys: drop repeats, keep order


def _draw(objs, S, rng):
    """Render a scene: a plain, slightly tinted background with a faint gradient, flat-coloured shapes."""
    bg = np.array([228, 228, 222]) + rng.integers(-12, 13, size=3)
    grad = np.linspace(-6, 6, S)[:, None, None] * (1 if rng.random() < 0.5 else -1)  # (S, 1, 1)
    arr = np.clip(bg[None, None, :] + grad, 0, 255).astype(np.uint8)  # (S, 1, 3)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(arr, (S, S, 3))))
    d = ImageDraw.Draw(img)
    for o in objs:
        col = tuple(int(v) for v in np.clip(np.array(COLOURS[o["colour"]]) + rng.integers(-15, 16, 3), 0, 255))
        x, y, s, _ = o["box"]
        x1, y1, t = x + s - 1, y + s - 1, s // 3
        if o["shape"] == "circle":
            d.ellipse([x, y, x1, y1], fill=col)
        elif o["shape"] == "square":
            d.rectangle([x, y, x1, y1], fill=col)
        elif o["shape"] == "triangle":
            d.polygon([(x + s / 2, y), (x1, y1), (x, y1)], fill=col)
        elif o["shape"] == "cross":
            d.rectangle([x, y + t, x1, y1 - t], fill=col)
            d.rectangle([x + t, y, x1 - t, y1], fill=col)
        else:  # diamond
            d.polygon([(x + s / 2, y), (x1, y + s / 2), (x + s / 2, y1), (x, y + s / 2)], fill=col)
    return img


def _vqa(objs, rng):
    """One (question, answer) about a scene; types: colour, shape, count, relation, yes/no relation, existence."""
    while True:
        kind, o = int(rng.integers(6)), objs[rng.integers(len(objs))]
        others = [x for x in objs if x is not o]
        if kind == 0 and sum(x["shape"] == o["shape"] for x in objs) == 1:
            return f"what colour is the {o['shape']}?", o["colour"]
        if kind == 1 and sum(x["colour"] == o["colour"] for x in objs) == 1:
            return f"what shape is the {o['colour']} object?", o["shape"]
        if kind == 2:
            return "how many shapes are there?", NUMBERS[len(objs)]
        if kind in (3, 4) and others:
            b = others[rng.integers(len(others))]
            A, B, r = f"the {o['colour']} {o['shape']}", f"the {b['colour']} {b['shape']}", _rel(o, b)
            if kind == 3:
                return f"where is {A} relative to {B}?", r
            yes = rng.random() < 0.5  # ask the true relation or its opposite, never a merely "weaker" one
            return f"is {A} {REL_WORDS[r if yes else OPPOSITE[r]][0]} {B}?", "yes" if yes else "no"
        if kind == 5:
            if rng.random() < 0.5:
                return f"is there {_a(o['colour'] + ' ' + o['shape'])}?", "yes"
            c, s = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            if all((x["colour"], x["shape"]) != (c, s) for x in objs):
                return f"is there {_a(c + ' ' + s)}?", "no"


def _nlvr(left, right, rng):
    """A statement about two scenes, balanced to be true half of the time. -> (sentence, label)."""
    want = rng.random() < 0.5
    for _ in range(50):
        t = int(rng.integers(6))
        seen = left + right  # attributes drawn mostly from the scenes, so both answers occur
        o = seen[rng.integers(len(seen))] if rng.random() < 0.7 else \
            {"colour": list(COLOURS)[rng.integers(6)], "shape": SHAPES[rng.integers(len(SHAPES))]}
        has = lambda objs, key, v: any(x[key] == v for x in objs)  # noqa: E731
        c, s = o["colour"], o["shape"]
        if t == 0:
            sent, label = f"both images contain {_a(c)} shape", has(left, "colour", c) and has(right, "colour", c)
        elif t == 1:
            sent, label = f"both images contain a {s}", has(left, "shape", s) and has(right, "shape", s)
        elif t == 2:
            sent, label = f"there is a {s} in exactly one image", has(left, "shape", s) != has(right, "shape", s)
        elif t == 3:
            side, objs = ("left", left) if rng.random() < 0.5 else ("right", right)
            sent = f"the {side} image contains {_a(c + ' ' + s)}"
            label = any((x["colour"], x["shape"]) == (c, s) for x in objs)
        elif t == 4:
            sent, label = "the left image has more shapes than the right image", len(left) > len(right)
        else:
            sent, label = "the two images have the same number of shapes", len(left) == len(right)
        if label == want:
            break
    return sent, bool(label)


def _textcls(rng, S):
    """Premise listing a scene + a claim; label 1 if the claimed object is in the list (learnable from text)."""
    objs = _layout(rng, S, n=int(rng.integers(2, 4)))
    phrases = [_np(o, rng) for o in objs]
    premise = f"there are {NUMBERS[len(objs)]} shapes: " + ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
    o = objs[rng.integers(len(objs))]
    c, s = o["colour"], o["shape"]
    label = int(rng.random() < 0.5)
    while not label and any((x["colour"], x["shape"]) == (c, s) for x in objs):
        # a hard negative: keep the colour or the shape of a listed object, change the other
        if rng.random() < 0.5:
            c = list(COLOURS)[rng.integers(len(COLOURS))]
        else:
            s = SHAPES[rng.integers(len(SHAPES))]
    claim = ["so there is", "so the scene has", "therefore we see"][rng.integers(3)]
    return {"text": f"{premise}. {claim} {_a(c + ' ' + s)}.", "label": label,
            "label_name": ["inconsistent", "consistent"][label]}


def _refer(o, S, rng):
    """A RefCOCO-style referring phrase for one shape of a scene: colour + shape (unique within a scene),
    sometimes with its size or its place: "the red circle", "the large blue square at the top left"."""
    size = f"{o['size']} " if rng.random() < 0.3 else ""
    place = f" {_where(o, S)}" if rng.random() < 0.3 else ""
    return f"the {size}{o['colour']} {o['shape']}{place}"


TOY_FILES = ("img", "unlabeled", "downstream", "pairs.jsonl", "pairs_test.jsonl", "regions.jsonl", "text.txt",
             "images.jsonl", "README.txt", "toy.json")


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def make_toy(out_dir, seed=0, size=64, n_pairs=4000, n_regions=1500, n_text=3000, n_images=2000, n_test=200,
             n_down=1000, progress=True):
    """Write the toy world to out_dir; the same arguments give byte-identical files."""
    if os.path.isfile(os.path.join(out_dir, "toy.json")):  # an old toy world: remove it so no stale file survives
        for name in TOY_FILES:
            p = os.path.join(out_dir, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty and holds no toy world; refusing to write into it")
    for sub in ("img", "unlabeled", "downstream/img"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    S = size
    # one generator per part: changing one part's size leaves the others (and the test set) unchanged
    part = {name: np.random.default_rng([seed, i]) for i, name in enumerate(
        ("test", "pair", "region", "image", "text", "vqa", "nlvr", "imgcls", "textcls", "grounding"))}
    n_draw = n_test + n_pairs + n_regions + n_images + 2 * (n_down + n_test)
    bar = tqdm(total=n_draw, desc="toy world", disable=not progress, unit="img")

    def save(objs, rng, rel, root=out_dir):
        _draw(objs, S, rng).save(os.path.join(root, rel), format="PNG")  # Pillow writes no timestamp
        bar.update()
        return rel  # relative to root, which is where the jsonl naming it lives

    # held-out retrieval pairs first; their scene signatures are excluded from all pre-training scenes
    rng, held, test = part["test"], set(), []
    while len(test) < n_test:
        objs = _layout(rng, S)
        if _signature(objs, S) not in held:
            held.add(_signature(objs, S))
            caps = _captions2(objs, S, rng, full=True)[: 1 + int(rng.random() < 0.5)]
            test.append({"image": save(objs, rng, f"img/test_{len(test):05d}.png"), "caption": caps})
    _write_jsonl(os.path.join(out_dir, "pairs_test.jsonl"), test)

    def fresh(rng, n=None):
        while True:
            objs = _layout(rng, S, n)
            if _signature(objs, S) not in held:
                return objs

    rng = part["pair"]
    pairs = []
    for i in range(n_pairs):
        objs = fresh(rng)
        pairs.append({"image": save(objs, rng, f"img/pair_{i:05d}.png"), "caption": _captions2(objs, S, rng)})
    _write_jsonl(os.path.join(out_dir, "pairs.jsonl"), pairs)

    rng, regions = part["region"], []
    for i in range(n_regions):
        objs = fresh(rng)
        # one phrase per shape, sometimes with its place: "a small blue square at the bottom"
        regs = [{"box": o["box"], "caption": _np(o, rng, 0.8) + (f" {_where(o, S)}" if rng.random() < 0.3 else "")}
                for o in objs]
        regions.append({"image": save(objs, rng, f"img/region_{i:05d}.png"), "caption": _caption(objs, S, rng),
                        "regions": regs})
    _write_jsonl(os.path.join(out_dir, "regions.jsonl"), regions)

    rng = part["image"]
    _write_jsonl(os.path.join(out_dir, "images.jsonl"),
                 [{"image": save(fresh(rng), rng, f"unlabeled/{i:05d}.png")} for i in range(n_images)])

    rng = part["text"]  # half single captions, half multi-sentence documents
    lines = [(_caption(o, S, rng) if rng.random() < 0.5 else _document(o, S, rng)) for o in
             (fresh(rng) for _ in range(n_text))]
    with open(os.path.join(out_dir, "text.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)

    # downstream splits; their image paths are relative to downstream/
    down = os.path.join(out_dir, "downstream")
    for split, n in (("train", n_down), ("test", n_test)):
        # one pool of scenes per split serves VQA (2 questions each) and NLVR (pairs of pool images)
        rng, recs, pool = part["vqa"], [], []
        for i in range(n):
            objs = _layout(rng, S)
            pool.append((save(objs, rng, f"img/{split}_{i:05d}.png", down), objs))
            qas = dict(_vqa(objs, rng) for _ in range(2))  # dict: a repeated question is kept once
            recs += [{"image": pool[-1][0], "question": q, "answer": a} for q, a in qas.items()]
        _write_jsonl(os.path.join(down, f"vqa_{split}.jsonl"), recs)

        rng, recs = part["nlvr"], []
        for i in range(n):
            j = (i + 1 + int(rng.integers(n - 1))) % n if n > 1 else i  # any other pool image
            sent, label = _nlvr(pool[i][1], pool[j][1], rng)
            recs.append({"images": [pool[i][0], pool[j][0]], "sentence": sent, "label": label})
        _write_jsonl(os.path.join(down, f"nlvr_{split}.jsonl"), recs)

        rng, recs = part["imgcls"], []
        for i in range(n):  # one shape per image; the label is its shape
            objs = _layout(rng, S, n=1)
            img = save(objs, rng, f"img/cls_{split}_{i:05d}.png", down)
            recs.append({"image": img, "label": SHAPES.index(objs[0]["shape"]), "label_name": objs[0]["shape"]})
        _write_jsonl(os.path.join(down, f"imgcls_{split}.jsonl"), recs)

        _write_jsonl(os.path.join(down, f"textcls_{split}.jsonl"), [_textcls(part["textcls"], S) for _ in range(2 * n)])

        rng, recs = part["grounding"], []
        for img, objs in pool:  # one referring phrase per VQA-pool image (no new images are drawn)
            o = objs[rng.integers(len(objs))]
            recs.append({"image": img, "phrase": _refer(o, S, rng), "box": o["box"]})
        _write_jsonl(os.path.join(down, f"grounding_{split}.jsonl"), recs)
    # retrieval fine-tuning reuses pre-training pairs (as COCO does); its test set is pairs_test
    _write_jsonl(os.path.join(down, "retrieval_train.jsonl"),
                 [dict(r, image="../" + r["image"]) for r in pairs[:n_down]])
    _write_jsonl(os.path.join(down, "retrieval_test.jsonl"), [dict(r, image="../" + r["image"]) for r in test])
    bar.close()

    params = {"seed": seed, "size": size, "n_pairs": n_pairs, "n_regions": n_regions, "n_text": n_text,
              "n_images": n_images, "n_test": n_test, "n_down": n_down, "shapes": list(SHAPES),
              "colours": list(COLOURS), "sizes": list(SIZES), "vqa_answers": VQA_ANSWERS,
              "imgcls_classes": list(SHAPES), "textcls_classes": ["inconsistent", "consistent"]}
    with open(os.path.join(out_dir, "toy.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(params, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "README.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(TOY_README.format(**params))


TOY_README = """xfm toy world (written by `python data.py toy`, seed {seed}; parameters in toy.json)

Scenes of 1-3 non-overlapping shapes ({shapes}) in {colours}, sizes small/large,
on a plain background, {size}x{size} px. Within a scene each (colour, shape) occurs once. Captions name
attributes, places ("at the top left") and relations (left/right/above/below, from the shapes' centres).
Do not flip or crop these images in training: a flip makes "left of" false, a crop moves "at the top".

pairs.jsonl       {n_pairs} images in img/, 2 different captions each (rarely 1)
regions.jsonl     {n_regions} images with a box [x, y, w, h] (pixels) and a phrase per shape, and a whole-image caption
text.txt          {n_text} lines of text only: single captions and multi-sentence documents
images.jsonl      {n_images} images without text, in unlabeled/
pairs_test.jsonl  {n_test} held-out images with 1-2 complete captions; their scenes (shapes, colours, sizes and
                  coarse places) never occur in the pre-training files; many share a colour or a shape
downstream/       (image paths relative to downstream/; random scenes, test scenes not excluded from train)
  vqa_{{train,test}}.jsonl      {{"image", "question", "answer"}}: colour, shape, count, relation, yes/no questions;
                              2 per image, answers in toy.json "vqa_answers"
  nlvr_{{train,test}}.jsonl     {{"images": [left, right], "sentence", "label": true/false}}, balanced labels;
                              the images are those of the VQA split
  imgcls_{{train,test}}.jsonl   {{"image", "label", "label_name"}}: the shape in a one-shape image (index in shapes)
  textcls_{{train,test}}.jsonl  {{"text", "label", "label_name"}}: 1 if the claimed object is in the listed scene
  grounding_{{train,test}}.jsonl {{"image", "phrase", "box": [x, y, w, h]}} (pixels): a RefCOCO-style phrase naming
                              one shape of a VQA-split image, and that shape's box
  retrieval_train.jsonl       the first {n_down} pre-training pairs; retrieval_test.jsonl = pairs_test
Train splits have {n_down} images or pairs (textcls: 2 x {n_down} texts), test splits {n_test} (textcls: 2 x {n_test}).
"""


# -----------------------------------------------------------------------------
# Command line


def check(data_dir, strict=False):
    """Parse every source of a folder; print the records per kind and the bad-input counts."""
    bad = BadInput(strict=strict)
    for kind, path in find_sources(data_dir).items():
        items = PARSERS[kind](path, bad)
        extra = ""
        if kind in ("pair", "pair_test"):
            extra = f" captions, {len({it['image'] for it in items})} images"
        elif kind == "region":
            extra = f" images, {sum(len(r['regions']) for r in items)} regions"
        print(f"{kind:10s} {path}: {len(items)}{extra or ' records'}")
    print(bad.summary())
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description="xfm data tools. Subcommands: `toy` writes the synthetic toy world; "
                                "`check` parses a data folder and prints record and bad-input counts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", help="write the toy world of coloured shapes (all four streams + downstream splits)")
    t.add_argument("--out", required=True, help="output folder (created; an old toy world there is replaced)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", type=int, default=64, help="image side in pixels")
    for name, default in (("n_pairs", 4000), ("n_regions", 1500), ("n_text", 3000), ("n_images", 2000),
                          ("n_test", 200), ("n_down", 1000)):
        t.add_argument(f"--{name}", type=int, default=default)
    c = sub.add_parser("check", help="parse a data folder; print counts of records and of bad input")
    c.add_argument("--data_dir", required=True)
    c.add_argument("--strict", action="store_true", help="stop at the first problem")
    a = p.parse_args(argv)
    if a.cmd == "toy":
        make_toy(a.out, a.seed, a.size, a.n_pairs, a.n_regions, a.n_text, a.n_images, a.n_test, a.n_down)
        print(f"wrote the toy world to {a.out}")
    else:
        check(a.data_dir, a.strict)


if __name__ == "__main__":
    main()
