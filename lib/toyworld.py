"""
The toy world: a synthetic world of coloured shapes that feeds every pre-training stream of data.py (pairs,
region captions with boxes, text, images) and every downstream task of finetune.py (VQA, NLVR, image and text
classification, retrieval, grounding). It is a teaching and smoke-test device: small, fast, deterministic, and
learnable in minutes on a CPU. train.py and finetune.py build it in data/toy when that folder is missing.

    python -m lib.toyworld --out data/toy [--seed 0] [--size 64]      # ~5 s, ~40 MB in ~10k files

The same arguments give byte-identical files. README.txt in the folder describes every file it holds.
"""
import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

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


def with_article(phrase):
    """The phrase with its article: a red circle, an orange circle."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(o, rng, p_size=0.7):
    """Noun phrase: "a large red circle" (the size word is dropped with probability 1 - p_size)."""
    size = f"{o['size']} " if rng.random() < p_size else ""
    return with_article(f"{size}{o['colour']} {o['shape']}")


def _caption(objs, S, rng, full=False):
    """One whole-image caption. full=True: a complete description (sizes, all shapes, relation or place)."""
    p = 1.0 if full else 0.7
    o = [objs[i] for i in rng.permutation(len(objs))]
    t = 0 if full else int(rng.integers(4))
    rel = lambda a, b: REL_WORDS[_rel(a, b)][rng.integers(2)]  # noqa: E731
    if len(o) == 1:
        A = noun_phrase(o[0], rng, p_size=p)
        return [f"{A} {_where(o[0], S)}", A, f"there is one shape: {A}", f"{A} on a plain background"][t]
    if len(o) == 2:
        A, B = noun_phrase(o[0], rng, p_size=p), noun_phrase(o[1], rng, p_size=p)
        return [f"{A} {rel(o[0], o[1])} {B}", f"{A} is {rel(o[0], o[1])} {B}",
                f"there are two shapes: {A} and {B}", f"{A} and {B}"][t]
    A, B, C = (noun_phrase(x, rng, p_size=p) for x in o)
    if t == 0:  # the complete form: all three shapes and two relations
        return f"{A} {rel(o[0], o[1])} {B}, and {C} {rel(o[2], o[0])} the {o[0]['colour']} {o[0]['shape']}"
    if t == 1:
        return f"{A} is {rel(o[0], o[1])} {B}, and {C} {_where(o[2], S)}"
    return f"there are three shapes: {A}, {B} and {C}" if t == 2 else f"three shapes: {A}, {B} and {C}"


def two_captions(objs, S, rng, full=False):
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
                return f"is there {with_article(o['colour'] + ' ' + o['shape'])}?", "yes"
            c, s = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            if all((x["colour"], x["shape"]) != (c, s) for x in objs):
                return f"is there {with_article(c + ' ' + s)}?", "no"


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
            sent, label = f"both images contain {with_article(c)} shape", has(left, "colour", c) and has(right, "colour", c)
        elif t == 1:
            sent, label = f"both images contain a {s}", has(left, "shape", s) and has(right, "shape", s)
        elif t == 2:
            sent, label = f"there is a {s} in exactly one image", has(left, "shape", s) != has(right, "shape", s)
        elif t == 3:
            side, objs = ("left", left) if rng.random() < 0.5 else ("right", right)
            sent = f"the {side} image contains {with_article(c + ' ' + s)}"
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
    phrases = [noun_phrase(o, rng) for o in objs]
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
    return {"text": f"{premise}. {claim} {with_article(c + ' ' + s)}.", "label": label,
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


# the parts of the world, each with its own generator np.random.default_rng([seed, index in PARTS])
PARTS = ("test", "pair", "region", "image", "text", "vqa", "nlvr", "imgcls", "textcls", "grounding")


def make_toy(out_dir, seed=0, size=64, n_pairs=4000, n_regions=1500, n_text=3000, n_images=2000, n_test=200,
             n_down=1000, progress=True):
    """Write the toy world to out_dir; the same arguments give byte-identical files."""
    _clear(out_dir)
    # one generator per part: changing one part's size leaves the others (and the test set) unchanged
    part = {name: np.random.default_rng([seed, i]) for i, name in enumerate(PARTS)}
    n_draw = n_test + n_pairs + n_regions + n_images + 2 * (n_down + n_test)
    bar = tqdm(total=n_draw, desc="toy world", disable=not progress, unit="img")
    canvas = _Canvas(out_dir, size, bar)
    # held-out retrieval pairs first; their scene signatures are excluded from all pre-training scenes
    test, held = _test_pairs(canvas, part["test"], n_test)
    files = {"pairs_test.jsonl": test,
             "pairs.jsonl": _pairs(canvas, part["pair"], n_pairs, held),
             "regions.jsonl": _regions(canvas, part["region"], n_regions, held),
             "images.jsonl": _images(canvas, part["image"], n_images, held)}
    lines = _texts(part["text"], size, n_text, held)
    files.update(_downstream(canvas, part, n_down, n_test, files["pairs.jsonl"], test))
    bar.close()
    params = {"seed": seed, "size": size, "n_pairs": n_pairs, "n_regions": n_regions, "n_text": n_text,
              "n_images": n_images, "n_test": n_test, "n_down": n_down, "shapes": list(SHAPES),
              "colours": list(COLOURS), "sizes": list(SIZES), "vqa_answers": VQA_ANSWERS,
              "imgcls_classes": list(SHAPES), "textcls_classes": ["inconsistent", "consistent"]}
    _write(out_dir, files, lines, params)


def _clear(out_dir):
    """Make out_dir ready for a toy world: an old toy world there is removed (so no stale file survives), any
    other non-empty folder is refused; the image folders are created."""
    if os.path.isfile(os.path.join(out_dir, "toy.json")):
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


class _Canvas:
    """Draws scenes of side S into PNG files under a folder, counting them on the progress bar."""

    def __init__(self, out_dir, S, bar):
        self.out_dir, self.S, self.bar = out_dir, S, bar

    def save(self, objs, rng, rel, root=None):
        """Draw objs (with rng) to root/rel (root: out_dir by default) -> rel, relative to root, which is
        where the jsonl naming it lives."""
        # Pillow writes no timestamp: the same scene gives the same bytes
        _draw(objs, self.S, rng).save(os.path.join(root or self.out_dir, rel), format="PNG")
        self.bar.update()
        return rel


def _fresh(rng, S, held, n=None):
    """A scene (_layout) whose signature is none of the held-out test scenes'."""
    while True:
        objs = _layout(rng, S, n)
        if _signature(objs, S) not in held:
            return objs


def _test_pairs(canvas, rng, n):
    """The held-out retrieval pairs: n scenes of distinct signatures, each with 1-2 complete captions.
    -> (records {"image", "caption"}, the set of their signatures)."""
    S, held, test = canvas.S, set(), []
    while len(test) < n:
        objs = _layout(rng, S)
        if _signature(objs, S) not in held:
            held.add(_signature(objs, S))
            caps = two_captions(objs, S, rng, full=True)[: 1 + int(rng.random() < 0.5)]
            test.append({"image": canvas.save(objs, rng, f"img/test_{len(test):05d}.png"), "caption": caps})
    return test, held


def _pairs(canvas, rng, n, held):
    """n image-text pairs {"image", "caption": 2 different captions (rarely 1)}."""
    pairs = []
    for i in range(n):
        objs = _fresh(rng, canvas.S, held)
        pairs.append({"image": canvas.save(objs, rng, f"img/pair_{i:05d}.png"),
                      "caption": two_captions(objs, canvas.S, rng)})
    return pairs


def _regions(canvas, rng, n, held):
    """n region records {"image", "caption", "regions": [{"box": [x, y, w, h], "caption"}]}: a phrase per
    shape, sometimes with its place ("a small blue square at the bottom"), and a whole-image caption."""
    S, regions = canvas.S, []
    for i in range(n):
        objs = _fresh(rng, S, held)
        regs = [{"box": o["box"],
                 "caption": noun_phrase(o, rng, 0.8) + (f" {_where(o, S)}" if rng.random() < 0.3 else "")}
                for o in objs]
        regions.append({"image": canvas.save(objs, rng, f"img/region_{i:05d}.png"),
                        "caption": _caption(objs, S, rng), "regions": regs})
    return regions


def _images(canvas, rng, n, held):
    """n images without text, in unlabeled/: records {"image"}."""
    return [{"image": canvas.save(_fresh(rng, canvas.S, held), rng, f"unlabeled/{i:05d}.png")} for i in range(n)]


def _texts(rng, S, n, held):
    """n lines of text only: half single captions, half multi-sentence documents."""
    return [(_caption(o, S, rng) if rng.random() < 0.5 else _document(o, S, rng)) for o in
            (_fresh(rng, S, held) for _ in range(n))]


def _downstream(canvas, part, n_down, n_test, pairs, test):
    """The downstream splits -> {path under out_dir: records}; their image paths are relative to downstream/.
    Each split draws one pool of scenes that serves VQA (2 questions each), NLVR (pairs of pool images) and
    grounding; image classification draws its own one-shape images."""
    files, down = {}, os.path.join(canvas.out_dir, "downstream")
    for split, n in (("train", n_down), ("test", n_test)):
        vqa, pool = _vqa_split(canvas, part["vqa"], split, n, down)
        files[f"downstream/vqa_{split}.jsonl"] = vqa
        files[f"downstream/nlvr_{split}.jsonl"] = _nlvr_split(part["nlvr"], pool)
        files[f"downstream/imgcls_{split}.jsonl"] = _imgcls_split(canvas, part["imgcls"], split, n, down)
        files[f"downstream/textcls_{split}.jsonl"] = [_textcls(part["textcls"], canvas.S) for _ in range(2 * n)]
        files[f"downstream/grounding_{split}.jsonl"] = _grounding_split(part["grounding"], canvas.S, pool)
    # retrieval fine-tuning reuses pre-training pairs (as COCO does); its test set is pairs_test
    files["downstream/retrieval_train.jsonl"] = [dict(r, image="../" + r["image"]) for r in pairs[:n_down]]
    files["downstream/retrieval_test.jsonl"] = [dict(r, image="../" + r["image"]) for r in test]
    return files


def _vqa_split(canvas, rng, split, n, down):
    """n scenes drawn into down/img/ with up to 2 questions each -> (records {"image", "question", "answer"},
    the pool [(image path, objs)])."""
    recs, pool = [], []
    for i in range(n):
        objs = _layout(rng, canvas.S)
        pool.append((canvas.save(objs, rng, f"img/{split}_{i:05d}.png", down), objs))
        qas = dict(_vqa(objs, rng) for _ in range(2))  # dict: a repeated question is kept once
        recs += [{"image": pool[-1][0], "question": q, "answer": a} for q, a in qas.items()]
    return recs, pool


def _nlvr_split(rng, pool):
    """One statement per pool image about it and another pool image: {"images", "sentence", "label"}."""
    n, recs = len(pool), []
    for i in range(n):
        j = (i + 1 + int(rng.integers(n - 1))) % n if n > 1 else i  # any other pool image
        sent, label = _nlvr(pool[i][1], pool[j][1], rng)
        recs.append({"images": [pool[i][0], pool[j][0]], "sentence": sent, "label": label})
    return recs


def _imgcls_split(canvas, rng, split, n, down):
    """n one-shape images in down/img/; the label is its shape: {"image", "label", "label_name"}."""
    recs = []
    for i in range(n):
        objs = _layout(rng, canvas.S, n=1)
        img = canvas.save(objs, rng, f"img/cls_{split}_{i:05d}.png", down)
        recs.append({"image": img, "label": SHAPES.index(objs[0]["shape"]), "label_name": objs[0]["shape"]})
    return recs


def _grounding_split(rng, S, pool):
    """One referring phrase per pool image (no new images are drawn): {"image", "phrase", "box"}."""
    recs = []
    for img, objs in pool:
        o = objs[rng.integers(len(objs))]
        recs.append({"image": img, "phrase": _refer(o, S, rng), "box": o["box"]})
    return recs


def _write(out_dir, files, lines, params):
    """Write the jsonl files, text.txt, toy.json (params) and README.txt into out_dir."""
    for rel, records in files.items():
        _write_jsonl(os.path.join(out_dir, rel), records)
    with open(os.path.join(out_dir, "text.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    with open(os.path.join(out_dir, "toy.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(params, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "README.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(TOY_README.format(**params))


TOY_README = """xfm toy world (written by `python -m lib.toyworld`, seed {seed}; parameters in toy.json)

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


DEFAULT_DIR = "data/toy"  # train.py's and finetune.py's default --data_dir


def build_if_missing(data_dir):
    """The one place that builds the toy world without being asked: when data_dir is the default folder and does
    not exist yet. Any other missing folder is an error (a typo must not train on toy data)."""
    if not os.path.isdir(data_dir) and os.path.normpath(data_dir) == os.path.normpath(DEFAULT_DIR):
        # built in a private folder, then renamed into place in one step: a second run started meanwhile never
        # sees a half-built world (it builds its own copy, byte-identical, and keeps whichever landed first)
        print(f"building the toy world in {data_dir} ...", flush=True)
        tmp = f"{os.path.normpath(data_dir)}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_toy(tmp, seed=0)
        try:
            os.rename(tmp, data_dir)
        except OSError:  # another run's copy landed first
            if not os.path.isdir(data_dir):
                raise
            shutil.rmtree(tmp)
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: data_dir {data_dir!r} does not exist")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lib.toyworld", description="Write the toy world of coloured shapes: the four pre-training "
                                "streams, the held-out retrieval pairs and the downstream task splits.")
    p.add_argument("--out", required=True, help="output folder (created; an old toy world there is replaced)")
    p.add_argument("--seed", type=int, default=0, help="every random choice of the world follows from it")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    for name, default, what in (("n_pairs", 4000, "image-text pairs"), ("n_regions", 1500, "images with boxes"),
                                ("n_text", 3000, "text-only lines"), ("n_images", 2000, "images without text"),
                                ("n_test", 200, "held-out pairs and test examples per task"),
                                ("n_down", 1000, "training examples per downstream task")):
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    a = p.parse_args(argv)
    make_toy(a.out, a.seed, a.size, a.n_pairs, a.n_regions, a.n_text, a.n_images, a.n_test, a.n_down)
    print(f"wrote the toy world to {a.out}")


if __name__ == "__main__":  # python -m lib.toyworld: run the one copy that the other modules import
    from lib.toyworld import main
    main()
