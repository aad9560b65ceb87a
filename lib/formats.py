"""
The files of a data folder: where each kind of data is found, how each file is read, and what happens to bad
input. data.py turns the records into batches; train.py and finetune.py report through BadInput.

    python -m lib.formats check --data_dir data/toy [--strict]     # parse a folder, print record and bad-input counts
    python -m lib.formats check --data_dir ann/ --image_root /data/coco/images     # paths relative to a dataset root
    python -m lib.formats check --data_dir DIR --images [--workers 8]  # also decode every image the files name

A data folder holds any subset of these files. Image paths are relative to the file that names them, or to
--image_root when one is given (train.py and finetune.py have it too: ALBEF's JSONs name images relative to the
dataset's root); absolute paths stay as they are.
    pairs.jsonl    image-text pairs; "caption" may be a list (one pair per caption). Or pairs.json, a JSON list
                   (ALBEF's pre-training JSONs), or Karpathy's {"images": [...]} (its train and restval images).
        {"image": "img/pair_00000.png", "caption": "a large red circle to the left of a blue square"}
        {"image": "img/pair_00001.png", "caption": ["a green cross", "there is one shape: a green cross"]}
    regions.jsonl  boxed phrases, box = [x, y, w, h] in pixels, optional whole-image "caption"; or regions.json
        {"image": "img/region_00000.png", "caption": "a red circle above a blue square", "regions":
         [{"box": [20, 4, 12, 12], "caption": "a red circle"}, {"box": [18, 30, 21, 21], "caption": "a blue square"}]}
                   X-VLM's region records (COCO and Visual Genome) are read as they are: "elems" for "regions",
                   "bb" (also [x, y, w, h] in pixels) for "box", and a region's "attributes" (a string or a list)
                   prefix its phrase, one attribute per caption as X-VLM draws them ("white" + "fence"). Boxes
                   are measured in image_w x image_h when the record says so, and scaled to the image file's size.
        {"image": "vg/1.jpg", "image_w": 800, "image_h": 600, "caption": "a white fence by a road", "elems":
         [{"bb": [10, 300, 200, 90], "caption": "fence", "attributes": ["white", "wooden"]}]}
    text.txt       a text corpus, one document per line (or text.jsonl with {"text": "..."} per line)
        a small purple diamond at the bottom left
        there are two shapes: a red circle and a blue square. the red circle is left of the blue square.
    images.jsonl   image-only data (MIM). Or a folder images/ searched recursively; images.jsonl wins if both exist.
        {"image": "unlabeled/00000.png"}
        {"image": "unlabeled/00001.png"}
    pairs_test.jsonl  held-out pairs for retrieval evaluation, same format as pairs.jsonl. Or pairs_test.json:
                   a JSON list (ALBEF's coco_test.json: {"image", "caption": [...]}) or a Karpathy file. Or
                   Karpathy's dataset_coco.json / dataset_flickr30k.json itself: its "test" images, each with
                   its sentences ({"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}).
    pairs/, images/, text/  tar shards (and text files) streamed by lib/shards.py, which describes them.
Files are UTF-8. A line or record that is not is bad input (named, skipped and counted, like a malformed one);
a file in another encoding stops the run with one error that gives the iconv command converting it. An
--image_root that is not a folder stops the run with one error.

Per-record limits (docs/TRAINING.md, "Per-record limits"): no line or record, however built, kills a reader or
stalls it. Every JSON text goes through parse_json: a syntax error, arrays or objects nested deeper than
JSON_DEPTH (32) levels and an int of more than 4,300 digits are all "malformed JSON". A number is one a float
holds (_number: an int of 400 digits is none). A declared image_w, image_h is 1 to MAX_SIDE (65,535) pixels
("malformed record" otherwise), and a box that keeps no area once scaled to the image file's size is a "bad box"
(the record's other regions stay). A text line, document, caption or attribute is cut to its first
MAX_TEXT_CHARS (10,000) characters (not counted: the record stays; check prints how many reach the limit), as is
every text the tokenizer trains on or encodes. load_image scales 16-bit and float images to 8 bits. check
--images decodes each image the files name in full, in --workers processes, and reports each that fails
("unreadable image"), so a data set can be cleaned before a run.

finetune.py's task files (section "Task files"): read_task_file reads a task's JSONL, JSON list, Karpathy JSON,
GLUE .tsv or ImageFolder; each task's records must meet the rules there (fields and their types: text_problem,
vqa_problem, nlvr_problem, grounding_problem; labels and classes: label_problem, label_vocab, labeled_splits),
and a record that does not is reported to BadInput with its kind (docs/FINETUNING.md, "Checked before training").
"""
import argparse
import codecs
import csv
import json
import math
import os
import shlex
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SOURCES = {  # kind -> file names looked for in a data folder, first found wins
    "pair": ("pairs.jsonl", "pairs.json"),
    "region": ("regions.jsonl", "regions.json"),
    "text": ("text.txt", "text.jsonl"),
    "image": ("images.jsonl", "images"),
    "pair_test": ("pairs_test.jsonl", "pairs_test.json", "dataset_coco.json", "dataset_flickr30k.json"),
}
# Per-record limits: what one line or record can cost a reader, however it is built (docs/TRAINING.md)
JSON_DEPTH = 32          # arrays and objects nested deeper are malformed JSON (X-VLM's and Karpathy's records need 6)
MAX_SIDE = 65_535        # pixels: the largest image_w, image_h a record may declare (JPEG's largest side)
MAX_TEXT_CHARS = 10_000  # a text line, document or caption is cut to its first MAX_TEXT_CHARS characters

# -----------------------------------------------------------------------------
# Bad input: never kills a long run, never lost silently


class StrictError(ValueError):
    """A bad record under --strict: the run stops with it (train.py, finetune.py and check print its one line)."""


def strict_exit(e):
    """The one-line SystemExit for a StrictError (raised in a DataLoader worker, its message is the worker's
    traceback: the line is its last)."""
    line = str(e).strip().splitlines()[-1].removeprefix(f"{__name__}.StrictError: ")
    return SystemExit(f"error: {line} (--strict: every bad record stops the run)")


class BadInput:
    """One per run. report() prints (the first `max_print` per kind) and counts a problem; strict raises.
    Kinds: malformed JSON, not UTF-8, malformed record, missing image, empty caption, empty text, bad box, no
    regions (found while parsing, so the record or region is skipped) and unreadable image (found while decoding:
    the dataset substitutes the next sample). Tar shards (lib/shards.py) add missing caption, duplicate key (a sample
    holding a member twice) and unreadable shard (a shard file cut short: each sample lost).
    A problem found while decoding comes again each time its record is drawn (every epoch), maybe in a DataLoader
    worker (whose copy of the counts is lost): found() makes it one (kind, where, message, action) that the batch
    carries to the main process, whose once() reports and counts each (kind, where) one time only, across epochs
    and workers. state_dict() holds those records, so a resumed run counts none of them again."""

    def __init__(self, strict=False, verbose=True, max_print=10):
        self.strict, self.verbose, self.max_print = strict, verbose, max_print
        self._counts, self._seen = Counter(), Counter()
        self._records = set()  # the (kind, where) that once() has counted
        self.messages = []  # the printed lines, kept for tests and logs

    def report(self, kind, where, msg, action="skipped"):
        line = f"{where}: {kind} ({msg})"
        if self.strict:
            raise StrictError(line)
        self._counts[kind] += 1
        self._seen[kind] += 1
        if self._seen[kind] <= self.max_print:
            self._say(f"{line} - {action}")
        elif self._seen[kind] == self.max_print + 1:
            self._say(f"more '{kind}' problems: counted, not printed")

    def found(self, kind, where, msg, action):
        """A problem found while decoding a record -> (kind, where, msg, action) for its batch to carry to once();
        under strict it raises here."""
        if self.strict:
            raise StrictError(f"{where}: {kind} ({msg})")
        return kind, where, msg, action

    def once(self, kind, where, msg, action="skipped"):
        """report(), the first time (kind, where) comes: a record drawn again is counted once."""
        if (kind, where) not in self._records:
            self._records.add((kind, where))
            self.report(kind, where, msg, action)

    def _say(self, line):
        self.messages.append(line)
        if self.verbose:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def add(self, kind, n=1):
        # n problems counted elsewhere (train.py's resume adds a checkpoint's counts())
        if n:
            self._counts[kind] += int(n)

    def state_dict(self):
        """For a checkpoint: the records once() counted (what the files' parsing finds is found again when a
        resumed run parses them)."""
        return {"records": sorted(self._records)}

    def load_state_dict(self, state):
        """A checkpoint's state_dict(): its records join this run's, each counted once. A plain {kind: n} (the
        counts() of a checkpoint without records) raises each kind's count to n."""
        if "records" not in state:
            for kind, n in state.items():
                self._counts[kind] = max(self._counts[kind], int(n))
            return
        for kind, where in state["records"]:
            if (kind, where) not in self._records:
                self._records.add((kind, where))
                self._counts[kind] += 1

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
            # (an images/ folder holding .tar files is a shard folder: lib/shards.py streams it)
            if (os.path.isdir(path) and not any(n.endswith(".tar") for n in os.listdir(path)) if name == "images"
                    else os.path.isfile(path)):
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


def parse_json(text):
    """JSON text -> (value, None), or (None, why) when it is no JSON a record can be: a syntax error, arrays and
    objects nested deeper than JSON_DEPTH, an int of more digits than Python converts. Every error that parsing a
    line, a file or a tar member can raise is caught here (and _number keeps the numbers safe to compute with)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, str(e)
    except ValueError as e:  # an int of more digits than Python converts (sys.get_int_max_str_digits)
        return None, str(e).split(";")[0]
    except RecursionError:  # json's own limit, near sys.getrecursionlimit() levels
        return None, f"nested deeper than {JSON_DEPTH} levels"
    level = [value]  # the arrays and objects at one depth, from the top one down
    for _ in range(JSON_DEPTH):
        level = [x for v in level if isinstance(v, (list, dict))
                 for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (list, dict))]
    if level:  # deeper values would overflow the stack of every function that walks a record
        return None, f"nested deeper than {JSON_DEPTH} levels"
    return value, None


def load_json(path, bad):
    """A whole .json file -> its value, or None when it is not JSON (reported; the file is skipped). Bytes that
    are not UTF-8 become lone surrogates (surrogateescape), so that read_records can skip just the records that
    hold them; a file that is not JSON because it is in another encoding raises encoding_error."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8-sig", "surrogateescape")
    value, why = parse_json(text)
    if why is None:
        return value
    start = text[:1 << 16]
    if _bad_string(start) is not None or "\x00" in start:  # not even its start is UTF-8 text
        raise encoding_error(path, raw[:1 << 16], f"it is no JSON when read as UTF-8 ({why})")
    bad.report("malformed JSON", path, why, action="file skipped")
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


def read_records(path, bad, split=None):
    """Yield (where, record) for each JSON object in a .jsonl file (one per line) or a .json list. With `split`
    ("train" or "test"), a Karpathy dataset_*.json gives that split's images as {"image", "caption"} records
    (karpathy_records). A record that is not UTF-8 is reported and skipped; a .json list that is mostly not UTF-8
    raises encoding_error."""
    if path.endswith(".json"):  # a .json file is parsed whole (ALBEF / X-VLM style), so one error loses the file
        items = load_json(path, bad)
        if items is None:
            return
        if split and isinstance(items, dict) and "images" in items:  # Karpathy's {"images": [...], "dataset"}
            for rec in karpathy_records(path, items, split, bad):
                yield rec.pop("where"), rec
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
        value, why = parse_json(line)
        if why is None:
            yield where, value
        else:
            bad.report("malformed JSON", where, why)


def karpathy_records(path, obj, split, bad):
    """Karpathy's dataset_*.json: images[{filepath, filename, split, sentences: [{raw}]}] -> one record per image
    of the split ("train" takes "restval" too), its sentences the caption list."""
    keep, recs = ("train", "restval") if split == "train" else ("test",), []
    images = obj["images"] if isinstance(obj["images"], list) else []
    check_encoding(path, images)
    for i, im in enumerate(images):
        where = f"{path}[images][{i}]"
        if not isinstance(im, dict) or im.get("split") not in keep:
            continue  # another split's image (or no image at all: Karpathy files hold only objects)
        problem = not_utf8(im)
        sents = im.get("sentences")
        if problem:
            bad.report("not UTF-8", where, problem)
        elif not (isinstance(im.get("filename"), str) and isinstance(im.get("filepath", ""), str) and
                  isinstance(sents, list) and all(isinstance(s, dict) for s in sents)):
            bad.report("malformed record", where, "expected filename, filepath and a list of sentences {raw}")
        else:
            recs.append({"image": os.path.join(im.get("filepath", ""), im["filename"]),
                         "caption": [s.get("raw") for s in sents], "where": where})
    return recs


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
            out.append(cut(c))
    return out


def cut(text):
    """A text (a line, document, caption or attribute) stripped and cut to its first MAX_TEXT_CHARS characters:
    tokenizer training on one long word (a base64 blob, a paragraph without spaces) takes time that grows faster
    than its length. No model reads more than 512 tokens of a text (max_text_len), and 10,000 characters hold
    more unless their tokens average 20 characters."""
    return text.strip()[:MAX_TEXT_CHARS]


def image_base(path, image_root=""):
    """The folder that the image paths of the file (or ImageFolder) `path` are relative to: image_root when one
    is given (ALBEF's JSONs hold paths relative to the dataset's root, e.g. COCO's images/), else the file's own
    folder. An image_root that is not a folder stops the run with one error."""
    if image_root and not os.path.isdir(image_root):
        raise SystemExit(f"error: image_root {image_root!r} is not a folder (the image paths of {path} are "
                         f"relative to it)")
    return image_root or (path if os.path.isdir(path) else os.path.dirname(path))


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


def _number(v):
    """A finite JSON number that a float can hold (true and false are no numbers): an int of 400 digits is
    none, so float arithmetic on a record's numbers never overflows (NaN and infinity compare false)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max


def box_problem(box, W, H):
    """Why a box [x, y, w, h] in pixels of a W x H image cannot be used, or None: not 4 finite numbers, w or
    h <= 0, or outside the image by more than 1 px (rounding slack)."""
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        return f"box {_short(repr(box))} is not [x, y, w, h] of 4 finite numbers"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"box {box} has w or h <= 0"
    if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1:
        return f"box {box} is outside the {W}x{H} image"
    return None


def parse_pairs(path, bad, image_root="", split="train"):
    """-> list of {"image", "caption", "where"}: one item per caption. A Karpathy dataset_*.json gives the images
    of `split` ("train": its train and restval images; "test": its test images)."""
    base, out = image_base(path, image_root), []
    for where, rec in read_records(path, bad, split):
        caps = captions_of(rec, where, bad)
        img = _image_path(rec, base, where, bad) if caps else None
        out += [{"image": img, "caption": c, "where": where} for c in caps if img]
    return out


def parse_test_pairs(path, bad, image_root=""):
    """The held-out pairs: parse_pairs of the test split (a Karpathy file's "test" images)."""
    return parse_pairs(path, bad, image_root, split="test")


def parse_regions(path, bad, image_root=""):
    """-> list of {"image", "size", "captions", "regions": [{"box", "captions"}], "where"}; bad boxes dropped.
    Reads X-VLM's records too: "elems" for "regions", "bb" for "box", "attributes" and the declared image_w/h."""
    base, out = image_base(path, image_root), []
    for where, rec in read_records(path, bad):
        key = "regions" if "regions" in rec or "elems" not in rec else "elems"  # X-VLM calls its regions elems
        if not isinstance(rec.get(key, []), list):  # a string or an object would be read item by item
            bad.report("malformed record", where, f"{key} is {type_of(rec[key])}, not a list")
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
        # X-VLM's image_w, image_h: the size its boxes are measured in, 1 to MAX_SIDE pixels. A resized copy of
        # the image gets its boxes scaled to the copy's size (the file's own size, W x H, is what the crops use)
        iw, ih = rec.get("image_w", W), rec.get("image_h", H)
        if not all(_number(v) and 1 <= v <= MAX_SIDE for k, v in (("image_w", iw), ("image_h", ih)) if k in rec):
            bad.report("malformed record", where, f"image_w, image_h {_short(repr([iw, ih]))} are not a size")
            continue
        sx, sy = W / iw, H / ih
        caps = captions_of(rec, where, bad) if "caption" in rec else []
        regions = []
        for j, r in enumerate(rec.get(key) or []):
            rw = f"{where} region {j}"
            if not isinstance(r, dict):
                bad.report("malformed record", rw, f"region is {type_of(r)}, not an object")
                continue
            box = r.get("box", r.get("bb"))  # X-VLM's "bb" is [x, y, w, h] in pixels too
            problem = box_problem(box, iw, ih)
            if problem:
                bad.report("bad box", rw, problem)
                continue
            x, y, w, h = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)  # clip the slack away
            if not (x1 > x0 and y1 > y0):  # all of it in the slack, or a width too small to survive the scaling
                bad.report("bad box", rw, f"box {box} has no area left in the {W}x{H} image file")
                continue
            rcaps = captions_of(r, rw, bad)
            attrs = attributes_of(r, rw, bad) if "attributes" in r else []
            rcaps = [f"{a} {c}" for a in attrs for c in rcaps] if attrs else rcaps
            if rcaps:
                regions.append({"box": [x0, y0, x1 - x0, y1 - y0], "captions": rcaps})
        if not regions:  # the region stream exists for its boxes: a record without one is skipped
            bad.report("no regions", where, "no valid region left in the record")
            continue
        out.append({"image": img, "size": (W, H), "captions": caps, "regions": regions, "where": where})
    return out


def attributes_of(r, where, bad):
    """X-VLM's region "attributes" (Visual Genome's "white", "wooden"; a string or a list) -> the non-empty ones,
    stripped; one that is not a string is reported ("malformed record") and dropped. X-VLM prefixes one attribute,
    drawn at random, to the region's phrase ("white" + "fence" -> "white fence"); parse_regions lists every
    attribute x caption pair as one caption of the region, so the dataset's uniform draw among a region's
    captions draws the attribute and the caption independently, as X-VLM does."""
    value, out = r["attributes"], []
    for j, a in enumerate(value if isinstance(value, list) else [value]):
        if not isinstance(a, str):
            name = f"attributes[{j}]" if isinstance(value, list) else "attributes"
            bad.report("malformed record", where, f"{name} is {type_of(a)}, not a string")
        elif a.strip():
            out.append(cut(a))
    return out


def parse_texts(path, bad, image_root=""):
    """-> list of documents from text.txt (one per line) or text.jsonl ({"text": ...}). (No images: image_root
    is not used.)"""
    if path.endswith(".txt"):
        return [cut(line) for _, line in read_lines(path, bad) if line.strip()]
    out = []
    for where, rec in read_records(path, bad):
        t = rec.get("text")
        if "text" not in rec or not isinstance(t, str):
            bad.report("malformed record", where, "no 'text' field" if "text" not in rec else
                       f"text is {type_of(t)}, not a string")
        elif not t.strip():
            bad.report("empty text", where, "text is empty")
        else:
            out.append(cut(t))
    return out


def parse_images(path, bad, image_root=""):
    """-> list of {"image", "where"} from images.jsonl or every image file under an images/ folder."""
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()  # a fixed walk order keeps the dataset order (and so the run) reproducible
            files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
        return [{"image": p, "where": p} for p in files]
    base, out = image_base(path, image_root), []
    for where, rec in read_records(path, bad):
        img = _image_path(rec, base, where, bad)
        if img:
            out.append({"image": img, "where": where})
    return out


# kind -> parser(path, bad, image_root=""); image_root: the folder the image paths are relative to (image_base)
PARSERS = {"pair": parse_pairs, "pair_test": parse_test_pairs, "region": parse_regions,
           "text": parse_texts, "image": parse_images}


def load_image(path, draft=None):
    """PIL RGB image, fully decoded (so a truncated file fails here, not later). A 16-bit or float image is
    scaled to 8 bits first (_to_8bit): convert("RGB") alone clips it, 16-bit data to almost white, float to black.
    draft(W, H) -> (w, h): the size a JPEG of W x H pixels is needed at (transforms.crop_draft); Pillow then
    decodes it at 1/2, 1/4 or 1/8 scale where both sides stay at least (w, h) (Image.draft: the JPEG decoder
    skips the fine DCT detail, a fraction of a full decode's work). Other formats decode in full."""
    with Image.open(path) as im:
        if draft is not None and im.format == "JPEG":
            im.draft(None, draft(*im.size))
        if im.mode in ("I", "F") or im.mode.startswith("I;16"):
            return _to_8bit(im).convert("RGB")
        return im.convert("RGB")


def _to_8bit(im):
    """A grey image of mode I;16 (16-bit PNG, TIFF), I (32-bit int) or F (float TIFF) -> mode L. Values in the
    16-bit range 0..65535 (16-bit files, and PNGs that PIL opens as I) are divided by 257, so a 16-bit picture
    gives its 8-bit version; any others (float, negative or wider ints) are stretched from their own min..max
    to 0..255, NaN taken as the min and infinities as the ends."""
    a = np.asarray(im)
    if im.mode != "F" and a.min() >= 0 and a.max() <= 65535:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535  # v / 257, rounded
    else:
        finite = a[np.isfinite(a)].astype(np.float64)
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
        a = np.rint((a - lo) * (255 / (hi - lo) if hi > lo else 0))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


# -----------------------------------------------------------------------------
# Task files (finetune.py): JSONL / JSON lists (read_records), Karpathy JSON (karpathy_records), GLUE TSV,
# ImageFolder; the rules each task's records must meet (fields, types, labels), each a (kind, message) for BadInput


def read_task_file(path, split, cfg, bad):
    """-> list of record dicts, each with "where" (file:line, file[index] or the image's path) and its image
    paths ("image", or "images" a list) made absolute against --image_root or the file's folder. A record that is
    not UTF-8, whose image field is not a path, or whose image is missing is reported to `bad` and skipped."""
    if not os.path.exists(path):
        hint = " (an old toy world? rebuild it: python -m lib.toyworld --out data/toy)" if "downstream" in path else ""
        raise SystemExit(f"error: no {split} file {path}{hint}")
    root = image_base(path, cfg.image_root)
    if os.path.isdir(path):
        recs = _image_folder(path, bad)
    elif path.endswith(".tsv"):
        recs = _glue_tsv(path, cfg, bad)
    else:  # .jsonl, a .json list of records (ALBEF / X-VLM style) or Karpathy's dataset_*.json (the split's images)
        recs = [dict(r, where=w) for w, r in read_records(path, bad, split)]
    out = []
    for r in recs:
        key = "images" if "images" in r else "image" if "image" in r else None
        if key:
            problem = _paths_problem(key, r[key])
            if problem:
                bad.report("malformed record", r["where"], problem)
                continue
            paths = [os.path.abspath(os.path.join(root, p)) for p in (r[key] if key == "images" else [r[key]])]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                bad.report("missing image", r["where"], f"no such file {missing[0]}")
                continue
            r = dict(r, **{key: paths if key == "images" else paths[0]})
        out.append(r)
    if not out:
        raise SystemExit(f"error: no usable record in {path}")
    return out


def _paths_problem(key, value):
    """Why an "image" field is not a path or an "images" field not a list of paths, or None."""
    if key == "image":
        return None if isinstance(value, str) and value else f"image is {type_of(value)}, not a path"
    if not isinstance(value, list) or not value:
        return f"images is {type_of(value)}, not a list of paths"
    bad = [j for j, p in enumerate(value) if not (isinstance(p, str) and p)]
    return f"images[{bad[0]}] is {type_of(value[bad[0]])}, not a path" if bad else None


def _image_folder(path, bad):
    """ImageFolder: one sub-folder per class, named after it -> {"image", "label", "where"}. A class folder whose
    name is not UTF-8 is reported and its images skipped (the name would become a label no one can print)."""
    recs = []
    for c in sorted(os.listdir(path)):
        folder = os.path.join(path, c)
        if not os.path.isdir(folder):
            continue
        problem = not_utf8(c)
        if problem:
            bad.report("not UTF-8", path, f"a class folder's name: {problem}", action="its images skipped")
            continue
        recs += [{"image": os.path.join(c, n), "label": c, "where": os.path.join(folder, n)}
                 for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTS)]
    return recs


def _glue_tsv(path, cfg, bad):
    """GLUE .tsv -> records keyed by the header row, or by column number ("0", "1", ...) when --text_fields are
    numbers (CoLA has no header). A row whose number of columns differs from the header's is skipped."""
    numbered = cfg.text_fields.split(",")[0].strip().isdigit()
    header, recs, skipped = None, [], bad.counts().get("not UTF-8", 0)
    for where, line in read_lines(path, bad):
        row = next(csv.reader([line.rstrip("\r\n")], delimiter="\t", quoting=csv.QUOTE_NONE))
        if numbered:
            recs.append(dict({str(j): v for j, v in enumerate(row)}, where=where))
        elif header is None:
            if bad.counts().get("not UTF-8", 0) != skipped:  # the header itself was skipped: no row can be read
                raise SystemExit(f"error: {path}: the header row is not UTF-8 (see the warning above)")
            header = row
        elif len(row) != len(header):
            bad.report("malformed record", where, f"{len(row)} columns, the header has {len(header)}")
        else:
            recs.append(dict(zip(header, row), where=where))
    return recs


def task_file(cfg, split):
    """--train_file or --test_file; by default DATA_DIR/downstream/TASK_{train,test}.jsonl."""
    given = cfg.train_file if split == "train" else cfg.test_file
    return given or os.path.join(cfg.data_dir, "downstream", f"{cfg.task}_{split}.jsonl")


def image_paths(r):
    """The image files a task record names ("images", or "image"; read_task_file made them absolute)."""
    return r["images"] if "images" in r else [r["image"]] if "image" in r else []


def usable(records, problem, bad, split):
    """The records for which problem(record) is None. Each other one is reported to `bad` with the
    (kind, message) that problem returns, and skipped; a split left without records is an error."""
    out = []
    for r in records:
        p = problem(r)
        if p is None:
            out.append(r)
        else:
            bad.report(p[0], r["where"], p[1])
    if records and not out:
        raise SystemExit(f"error: no usable {split} record: each was skipped as bad input (see the warnings)")
    return out


def image_problem(r):
    """(kind, message) when a record names no image, else None (read_task_file checks the paths it names)."""
    return None if "image" in r else ("malformed record", "no 'image' field")


def text_problem(r, key):
    """(kind, message) when r[key] is not a non-empty string, else None."""
    if key not in r:
        return "malformed record", f"no '{key}' field"
    if not isinstance(r[key], str):
        return "malformed record", f"{key} is {type_of(r[key])}, not a string"
    return ("empty text", f"{key} is empty") if not r[key].strip() else None


def label_problem(r, key, numeric, labels=None):
    """(kind, message) when r[key] is no label of the split's kind (numbers, or class names when `numeric` is
    False), else None: one "abc" among integer labels is a typo, not a new class. Given the task's class list
    (label_vocab), a number is checked against it too ("bad label"): a class index is an integer in 0..C-1, so
    1.5, -5, 100000000 and 1e308 are skipped; a regression target (labels []) is any finite number."""
    if key not in r:
        return "malformed record", f"no '{key}' field"
    v = r[key]
    if v is None or isinstance(v, (list, dict)):
        return "malformed record", f"{key} is {type_of(v)}, not a label"
    if not str(v).strip():
        return "malformed record", f"{key} is empty"
    x = label_value(v)
    if isinstance(x, str) == numeric:
        return "malformed record", f"{key} {v!r} is {'not a number' if numeric else 'a number'}, " \
                                   f"unlike most labels of the training split"
    if labels is None or isinstance(x, str):
        return None
    if not labels:
        return None if math.isfinite(x) else ("bad label", f"{key} {v!r} is not a finite number")
    if not integral(x):
        return "bad label", f"{key} {v!r} is not a class index (an integer; --num_labels=1 regresses)"
    if not 0 <= x < len(labels):
        return "bad label", f"{key} {v!r} is outside the classes 0..{len(labels) - 1} (--num_labels sets them)"
    return None


def numeric_labels(records, key, labels=None):
    """Whether a task's labels are numbers (class indices, scores) or class names: the kind of the saved class
    list (a fine-tuned checkpoint) or of most training labels."""
    if labels is not None:
        return all(isinstance(c, int) for c in labels)  # [] = regression: numbers
    names = sum(isinstance(label_value(r[key]), str) for r in records if key in r)
    return 2 * names <= len(records)


def answer_votes(r):
    """A VQA record's answers -> (list of answers, lower-cased, one per annotator; None) or (None, what is wrong).
    "answers": a list of strings, or VQAv2's list of {"answer", ...}; "answer": a string, or ALBEF's list of
    strings (the annotators' votes)."""
    key = "answers" if "answers" in r else "answer" if "answer" in r else None
    if key is None:
        return None, "no 'answer' or 'answers' field"
    v = r[key]
    votes = []
    for j, a in enumerate(v if isinstance(v, list) else [v]):
        a = a["answer"] if isinstance(a, dict) and "answer" in a else a  # VQAv2: {"answer", "answer_confidence"}
        name = f"{key}[{j}]" if isinstance(v, list) else key
        if not isinstance(a, str):
            return None, f"{name} is {type_of(a)}, not a string (or a list of strings)"
        if not a.strip():
            return None, f"{name} is empty"
        votes.append(a.strip().lower())
    return (votes, None) if votes else (None, f"{key} is an empty list")


def text_fields(rec, text_fields="", label_field=""):
    """textcls: the names of the text fields (one, or two for a pair) and of the label field of a training record
    -> (names, label key): --text_fields, else the first GLUE-style pair or single field that rec has; --label_field,
    else the first of label, score, gold_label, Quality. Neither found stops the run with one line."""
    guesses = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
               ("#1 String", "#2 String"), ("premise", "hypothesis"), ("sentence", None), ("text", None))
    names = [s.strip() for s in text_fields.split(",")] if text_fields else \
        next(([n for n in g if n] for g in guesses if all(n is None or n in rec for n in g)), None)
    label_key = label_field or next((k for k in ("label", "score", "gold_label", "Quality") if k in rec), None)
    if not names or label_key is None:
        raise SystemExit(f"error: which of {sorted(rec)} hold the text and the label? (--text_fields, --label_field)")
    return names, label_key


def vqa_problem(r, need_answer=True):
    """vqa: (kind, message) when a record has no image, no question or no well-formed answers (answer_votes),
    else None. A test question (need_answer False) may have no answer field: it is predicted, not scored."""
    why = answer_votes(r)[1] if need_answer or "answer" in r or "answers" in r else None
    return image_problem(r) or text_problem(r, "question") or (("malformed record", why) if why else None)


def nlvr_problem(r):
    """nlvr: (kind, message) unless a record has two images, a true/false label and a sentence, else None."""
    if not isinstance(r.get("images"), list) or len(r["images"]) != 2:
        return "malformed record", "needs 'images': [left, right]"
    if "label" not in r:
        return "malformed record", "no 'label' field"
    if label_value(r["label"]) not in (0, 1):
        return "malformed record", f"label {r['label']!r} is not true/false or 1/0"
    return text_problem(r, "sentence")


def grounding_problem(r):
    """grounding: (kind, message) unless a record has an image, a phrase ("phrase" or "text") and a box ("box" or
    "bbox", [x, y, w, h] in pixels) with some area inside the image (box_problem), else None."""
    phrase = "phrase" if "phrase" in r else "text"
    box = "box" if "box" in r else "bbox"
    p = image_problem(r) or text_problem(r, phrase)
    if p or box not in r:
        return p or ("malformed record", "no 'box' or 'bbox' field")
    try:  # the box is checked against the image size; opening reads only the header
        with Image.open(r["image"]) as im:
            W, H = im.size
    except Exception as e:
        return "unreadable image", f"{r['image']}: {e}"
    why = box_problem(r[box], W, H)
    return ("bad box", why) if why else None


def write_vqa_results(path, records, predicted):
    """The results file of the official VQA evaluation server: a JSON list [{"question_id", "answer"}], one item
    per test question in order, predicted[i] answering records[i]. question_id is the record's own (VQAv2's and
    ALBEF's "question_id"); a record without one gets its file:line ("where")."""
    rows = [{"question_id": r.get("question_id", r["where"]), "answer": a} for r, a in zip(records, predicted)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f)


def write_test_pairs(path, records):
    """Checked retrieval records (absolute image paths, "caption" a list) as a pairs_test.jsonl file, the format
    parse_test_pairs reads: {"image", "caption"} per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in records)


def first_pair(path, cfg):
    """The image and first caption of a retrieval task file's first usable record ("" if it has no caption),
    read quietly (a bad record is skipped without a warning) -> (image path, caption)."""
    quiet = BadInput(verbose=False)
    first = read_task_file(path, "test", cfg, quiet)[0]
    caps = captions_of(first, first["where"], quiet) or [""]
    return first["image"], caps[0]


def label_value(v):
    """A label as an int (ints, bools, "true"/"false", "3"), a float ("3.8": a score to regress) or a class name."""
    s = str(v).strip()
    if s.lower() in ("true", "false"):
        return int(s.lower() == "true")
    for typ in (int, float):
        try:
            return typ(s)
        except ValueError:
            pass
    return s


def integral(x):
    """Whether a number (label_value) is a whole one: 3, 3.0 and 1e308 are; 3.5, inf and nan are not."""
    return isinstance(x, int) or isinstance(x, float) and x.is_integer()


def label_vocab(values, num_labels=0, regression=True, source="the training split"):
    """The class list of a training split's labels (label_value'd, all of the split's kind). Class names: the
    sorted names. Numbers: [] = regression (if the task allows it) with --num_labels=1, or without --num_labels
    when most labels have a fraction (STS-B's 3.8), so one 1.5 among integers is a bad label, not a switch to
    regression; else the class indices range(C), C = --num_labels or class_count(values). Integer labels that
    form no class range stop the run (`source`: the file, for the message)."""
    if not all(isinstance(v, (int, float)) for v in values):
        return sorted({str(v) for v in values})
    fractions = sum(not integral(v) for v in values)
    if regression and (num_labels == 1 or not num_labels and 2 * fractions > len(values)):
        return []
    C = num_labels or class_count(values)
    if not C:
        ints = sorted({int(v) for v in values if integral(v)})
        shown = ", ".join(map(str, ints[:5])) + (", ..." if len(ints) > 5 else "") or "none"
        raise SystemExit(f"error: {source}: no range of class indices 0..C-1 is half in use by its integer labels "
                         f"({shown}); declare C with --num_labels")
    return list(range(C))


def class_count(values):
    """C of the class indices 0..C-1 that integer training labels imply: the largest C such that at least half
    of 0, ..., C-1 occur among them (0 if none). One outlier cannot inflate it: 0, 1, 2 and 100000000 give C = 3,
    and 100000000 is a bad label (C is at most twice the number of distinct labels)."""
    seen = sorted({int(v) for v in values if integral(v) and v >= 0})
    return max((c + 1 for j, c in enumerate(seen, 1) if c + 1 <= 2 * j), default=0)


def labeled_splits(tr, te, key, fields_problem, bad, saved=None, num_labels=0, regression=True,
                   source="the training split"):
    """The records of a classification task's two splits (label field `key`) that pass fields_problem (the
    other fields) and label_problem, and its class list -> (train, test, labels). The classes are `saved` (a
    fine-tuned checkpoint's) or label_vocab of the training labels of the split's kind (numeric_labels); then
    every label is checked against them too (a bad label is skipped)."""
    numeric = numeric_labels(tr, key, saved)

    def problem(r, labels=None):
        return fields_problem(r) or label_problem(r, key, numeric, labels)

    tr = usable(tr, problem, bad, "train")  # the classes come from the labels of the split's kind
    labels = saved if saved is not None else \
        label_vocab([label_value(r[key]) for r in tr], num_labels, regression, source)
    checked = lambda r: problem(r, labels)  # noqa: E731  (and the label against the classes)
    return usable(tr, checked, bad, "train"), usable(te, checked, bad, "test"), labels


def label_index(v, labels):
    """A label's class index (-1 if never seen in training: always wrong), or the value itself for regression."""
    if not labels:
        return float(v)
    v = int(v) if isinstance(v, (int, float)) else str(v)
    return labels.index(v) if v in labels else -1


# -----------------------------------------------------------------------------
# Command line


def check(data_dir, strict=False, image_root="", images=False, workers=None):
    """Parse every source of a folder; print the records per kind, the texts cut to MAX_TEXT_CHARS and the
    bad-input counts. With `images`, also decode every image the files name (check_images)."""
    bad, named = BadInput(strict=strict), {}  # named: image path -> the first record that names it
    for kind, path in find_sources(data_dir).items():
        items = PARSERS[kind](path, bad, image_root)
        what, texts = "records", items if kind == "text" else []
        if kind in ("pair", "pair_test"):
            what, texts = f"captions, {len({it['image'] for it in items})} images", [it["caption"] for it in items]
        elif kind == "region":
            what = f"images, {sum(len(r['regions']) for r in items)} regions"
            texts = [c for r in items for c in r["captions"] + [c for g in r["regions"] for c in g["captions"]]]
        n_cut = sum(len(t) >= MAX_TEXT_CHARS for t in texts)
        if n_cut:
            what += f" (texts at the {MAX_TEXT_CHARS}-character limit, longer ones cut: {n_cut})"
        print(f"{kind:10s} {path}: {len(items)} {what}")
        for it in items if kind != "text" else []:
            named.setdefault(it["image"], it["where"])
    if images:
        check_images(named, bad, workers)
    print(bad.summary())
    return bad


def _decode_problem(path):
    """None when load_image decodes the file, else what is wrong with it (run in check_images' workers)."""
    try:
        load_image(path)
        return None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        return f"{type(e).__name__}: {e}"


def check_images(named, bad, workers=None):
    """Decode each image of {path: where} fully (load_image, as training does) in a pool of `workers` processes
    (default: one per CPU); report each that fails as "unreadable image", named by the first record naming it."""
    paths = sorted(named)
    if not paths:
        return
    workers = min(workers or os.cpu_count() or 1, len(paths))
    pool = ProcessPoolExecutor(workers)
    try:  # (strict stops at the first failure: the images not yet decoded are cancelled)
        problems = pool.map(_decode_problem, paths, chunksize=max(1, min(64, len(paths) // (4 * workers))))
        for path, why in zip(paths, tqdm(problems, total=len(paths), desc="decode images", unit="image")):
            if why is not None:
                bad.report("unreadable image", named[path], f"{path}: {why}", action="a run skips it")
    finally:
        pool.shutdown(cancel_futures=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lib.formats", description="Parse a data folder and print its record and bad-input counts "
                                "(the toy world is written by lib/toyworld.py).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="parse a data folder; print counts of records and of bad input")
    c.add_argument("--data_dir", required=True)
    c.add_argument("--strict", action="store_true", help="stop at the first problem")
    c.add_argument("--image_root", default="", help="the folder the image paths are relative to (default: "
                   "each file's own folder)")
    c.add_argument("--images", action="store_true", help="also decode every image the files name, in full, and "
                   "report each that does not decode (unreadable image)")
    c.add_argument("--workers", type=int, default=None, help="processes decoding images (default: os.cpu_count())")
    a = p.parse_args(argv)
    try:
        check(a.data_dir, a.strict, a.image_root, a.images, a.workers)
    except StrictError as e:
        raise strict_exit(e) from None


if __name__ == "__main__":  # python -m lib.formats: run the one copy that the other modules import
    from lib.formats import main
    main()
