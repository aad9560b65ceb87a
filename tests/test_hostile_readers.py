"""Hostile records: valid-looking input that no reader may die on or stall on. JSON nested 100,000 deep, an int of
5,000 digits and a box of 400 digits are malformed records, named and skipped, in a .jsonl line, a .json file and
a tar member alike; a declared image size or box that would not stay finite and positive once scaled is refused;
a 1 MB line without spaces is cut (formats.MAX_TEXT_CHARS) before any tokenizer sees it, so tokenizer training
takes seconds; 16-bit and float images keep their picture; `lib/formats.py check --images` decodes every image.
Run: python -m pytest tests/test_hostile_readers.py -q   (CPU, about 10 s)"""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lib import formats
from lib import shards
from lib import tokenizer
from test_bad_input import quiet, said, write_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP = "[" * 100_000                                  # RecursionError in json.loads
LONG_INT = "1" * 5000                                 # ValueError: more digits than Python converts
BIG = 10 ** 400                                       # parses; OverflowError in any float arithmetic
NESTED = {"image": "img/0.png", "caption": "a deep one", "extra": json.loads("[" * 40 + "]" * 40)}


def blob(n=1_000_000):
    """n characters of CJK without a space: one 'word' of n letters, the worst case for BPE training."""
    return "".join(map(chr, np.random.default_rng(0).integers(0x4E00, 0x4E00 + 2000, n)))


def image(path, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 60, 30)).save(path)


# ---------------------------------------------------------------------------------------------------------
# one guarded JSON parse: .jsonl lines, .json files, tar members


def test_no_json_line_file_or_member_raises(tmp_path):
    image(tmp_path / "img" / "0.png")
    p = tmp_path / "pairs.jsonl"
    ok = {"image": "img/0.png", "caption": "a red square"}
    write_lines(p, [ok, DEEP, '{"image": "img/0.png", "caption": "x", "n": ' + LONG_INT + "}",
                    NESTED, "[" * 900 + "]" * 900, dict(ok, caption="a last red square")])
    bad = quiet()
    assert [(x["caption"], x["where"]) for x in formats.parse_pairs(str(p), bad)] == [
        ("a red square", f"{p}:1"), ("a last red square", f"{p}:6")]
    assert bad.counts() == {"malformed JSON": 4}
    for line in (f"{p}:2: malformed JSON (nested deeper than 32 levels) - skipped",
                 f"{p}:3: malformed JSON (Exceeds the limit (4300 digits) for integer string conversion",
                 f"{p}:4: malformed JSON (nested deeper than 32 levels)",
                 f"{p}:5: malformed JSON (nested deeper than 32 levels)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: malformed JSON"):
        formats.parse_pairs(str(p), formats.BadInput(strict=True))
    # a .json file: the file is skipped, as for any JSON error
    for i, text in enumerate((DEEP, "[" + LONG_INT + "]", json.dumps([NESTED]))):
        j = tmp_path / f"d{i}" / "pairs.json"
        j.parent.mkdir()
        j.write_text(text)
        bad = quiet()
        assert formats.parse_pairs(str(j), bad) == [] and bad.counts() == {"malformed JSON": 1}
        assert said(bad).startswith(f"{j}: malformed JSON (") and said(bad).endswith(" - file skipped")
    # a tar member KEY.json, decoded while training
    for text in (DEEP, '{"caption": ' + LONG_INT + "}", json.dumps(NESTED)):
        problems = shards._Problems()
        assert shards._captions("s.tar", "k", [("k.json", text.encode())], problems) == []
        assert [(k, w) for k, w, _ in problems] == [("malformed JSON", "s.tar:k.json")]
    assert shards._captions("s.tar", "k", [("k.json", b'{"caption": "fine"}')], shards._Problems()) == ["fine"]


# ---------------------------------------------------------------------------------------------------------
# numbers: finite, in range, and still finite and positive once scaled


def test_number_is_what_a_float_holds():
    assert [formats._number(v) for v in (0, -3, 2.5, 1e308, BIG, -BIG, float("nan"), float("inf"), True, "1")] \
        == [True, True, True, True, False, False, False, False, False, False]


def test_sizes_and_boxes_that_would_not_stay_finite_are_refused(tmp_path):
    image(tmp_path / "img" / "0.png")                  # 40 x 30
    p = tmp_path / "regions.jsonl"
    good = {"box": [2, 2, 10, 10], "caption": "a red patch"}
    rec = {"image": "img/0.png", "caption": "a picture"}
    write_lines(p, [dict(rec, regions=[good]),                                          # 1 ok
                    dict(rec, image_w=5e-324, image_h=30, regions=[good]),              # 2 W / iw = inf
                    dict(rec, image_w=40, image_h=BIG, regions=[good]),                 # 3 400 digits
                    dict(rec, image_w=100_000, image_h=30, regions=[good]),             # 4 above MAX_SIDE
                    dict(rec, image_w=0.5, image_h=30, regions=[good]),                 # 5 below one pixel
                    dict(rec, regions=[{"box": [2, 2, BIG, 10], "caption": "huge"},     # 6 region 0: 400 digits
                                       {"box": [-1, 2, 0.5, 10], "caption": "slack"},   # 6 region 1: no area left
                                       good]),                                          # 6 region 2: stays
                    dict(rec, image_w=80, image_h=60, regions=[                         # 7 scaled by 1/2
                        {"box": [4, 4, 5e-324, 10], "caption": "underflow"}, good])])
    bad = quiet()
    out = formats.parse_regions(str(p), bad)
    assert [r["where"] for r in out] == [f"{p}:1", f"{p}:6", f"{p}:7"]
    assert [[g["box"] for g in r["regions"]] for r in out] == [[[2, 2, 10, 10]], [[2, 2, 10, 10]], [[1, 1, 5, 5]]]
    assert bad.counts() == {"malformed record": 4, "bad box": 3}
    for line in (f"{p}:2: malformed record (image_w, image_h [5e-324, 30] are not a size)",
                 f"{p}:3: malformed record (image_w, image_h [40, 1000", f"{p}:4: malformed record",
                 f"{p}:5: malformed record (image_w, image_h [0.5, 30] are not a size)",
                 f"{p}:6 region 0: bad box (box [2, 2, 1000", "... is not [x, y, w, h] of 4 finite numbers)",
                 f"{p}:6 region 1: bad box (box [-1, 2, 0.5, 10] has no area left in the 40x30 image file)",
                 f"{p}:7 region 0: bad box (box [4, 4, 5e-324, 10] has no area left in the 40x30 image file)"):
        assert line in said(bad), line
    with pytest.raises(ValueError, match=r"regions\.jsonl:2: malformed record"):
        formats.parse_regions(str(p), formats.BadInput(strict=True))


# ---------------------------------------------------------------------------------------------------------
# bounded cost per record: long texts are cut before the tokenizer


def test_every_reader_cuts_a_long_text_and_keeps_the_others(tmp_path):
    long, cut = blob(), blob()[:formats.MAX_TEXT_CHARS]
    image(tmp_path / "img" / "0.png")
    (tmp_path / "text.txt").write_text(f"a red circle\n  {long}  \na blue square\n")
    assert formats.parse_texts(str(tmp_path / "text.txt"), quiet()) == ["a red circle", cut, "a blue square"]
    write_lines(tmp_path / "text.jsonl", [{"text": long}, {"text": " a green cross "}])
    assert formats.parse_texts(str(tmp_path / "text.jsonl"), quiet()) == [cut, "a green cross"]
    write_lines(tmp_path / "pairs.jsonl", [{"image": "img/0.png", "caption": ["a red square", long]}])
    bad = quiet()
    assert [x["caption"] for x in formats.parse_pairs(str(tmp_path / "pairs.jsonl"), bad)] == ["a red square", cut]
    write_lines(tmp_path / "regions.jsonl", [{"image": "img/0.png", "caption": long, "regions": [
        {"box": [2, 2, 10, 10], "caption": [long, "a patch"]}]}])
    (r,) = formats.parse_regions(str(tmp_path / "regions.jsonl"), bad)
    assert r["captions"] == [cut] and r["regions"][0]["captions"] == [cut, "a patch"]
    assert bad.counts() == {}                          # a cut is no skip
    # tar members: a text line, a KEY.txt caption, a KEY.json caption
    assert shards.decode("text", "t.txt", 1, f" {long}\n".encode())[0] == cut
    assert shards.decode("text", "t.txt", 2, b"a short line\n")[0] == "a short line"
    for member, raw in (("k.txt", long.encode()), ("k.json", json.dumps({"caption": [long, "ok"]}).encode())):
        assert shards._captions("s.tar", "k", [(member, raw)], shards._Problems()) in ([cut], [cut, "ok"])


def test_tokenizer_trains_on_a_megabyte_line_without_spaces_in_seconds(tmp_path):
    """BPE training on one 1 MB word takes minutes (300 KB: 31 s); cut, it takes a fraction of a second."""
    code = ("import sys, time; import numpy as np; sys.path.insert(0, '.'); from lib import tokenizer; "
            "blob = ''.join(map(chr, np.random.default_rng(0).integers(0x4E00, 0x4E00 + 2000, 1_000_000))); "
            "texts = ['a red circle left of a blue square'] * 50 + [blob]; t = time.time(); "
            f"tokenizer.Tokenizer.train(texts, 300, {str(tmp_path / 'tok.json')!r}); print(time.time() - t)")
    t = time.time()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=10,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    assert time.time() - t < 10 and float(run.stdout.split()[0]) < 5
    tok = tokenizer.Tokenizer.load(str(tmp_path / "tok.json"))
    assert tok.decode(tok.encode("a red circle left of a blue square", 64)) == "a red circle left of a blue square"


def test_encode_hands_the_library_at_most_the_limit(tmp_path):
    tok = tokenizer.Tokenizer.train(["a red circle", "a blue square"] * 20, 300, str(tmp_path / "tok.json"))
    seen, hf = [], tok.hf

    class Spy:
        def encode(self, text, **kw):
            seen.append(len(text))
            return hf.encode(text, **kw)
    tok.hf = Spy()
    assert len(tok.encode(blob(), 16)) == 16 and tok.encode("a red circle", 16)[-1] == tok.sep_id
    assert seen == [formats.MAX_TEXT_CHARS, len("a red circle")]


# ---------------------------------------------------------------------------------------------------------
# 16-bit and float images keep their picture


def test_16_bit_and_float_images_are_scaled_to_8_bits(tmp_path):
    g8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))                          # a gradient, 0..255
    noise = np.random.default_rng(0).integers(0, 257, g8.shape)                   # the bits 8-bit drops
    g16 = np.minimum(g8.astype(np.uint32) * 257 + noise, 65535).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).convert("I").save(tmp_path / "g32.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "g32.tif").mode == "I"
    for name in ("g16.png", "g32.tif"):
        rgb = np.asarray(formats.load_image(str(tmp_path / name)), dtype=np.int64)
        assert rgb.shape == (4, 256, 3) and np.abs(rgb - g8[..., None]).max() <= 1, name
    f = (g8.astype(np.float32) / 255 - 0.5) * 1e-3                                # tiny floats: convert() gives 0
    f[0, 0] = np.nan
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    rgb = np.asarray(formats.load_image(str(tmp_path / "f.tif")), dtype=np.int64)
    assert np.abs(rgb[1:, :, 0] - g8[1:]).max() <= 1 and rgb[0, 0, 0] == 0       # min..max -> 0..255; NaN: min


# ---------------------------------------------------------------------------------------------------------
# lib/formats.py check: the same parsers, and --images decodes every image


def test_check_reports_each_and_images_decodes_every_image(tmp_path, capsys):
    d = tmp_path / "data"
    image(d / "img" / "good.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noise).save(jpeg, "JPEG", quality=90)
    (d / "img" / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    (d / "img" / "empty.png").write_bytes(b"")
    write_lines(d / "pairs.jsonl", [{"image": f"img/{n}", "caption": "a picture"} for n in
                                    ("good.png", "cut.jpg", "empty.png", "good.png")] + [DEEP])
    write_lines(d / "regions.jsonl", [{"image": "img/good.png", "image_w": 5e-324, "image_h": 30,
                                       "regions": [{"box": [1, 1, 5, 5], "caption": "a patch"}]}])
    (d / "text.txt").write_text(f"a short line\n{blob()}\n")
    assert formats.check(str(d)).counts() == {"malformed JSON": 1, "malformed record": 1}
    out = capsys.readouterr().out
    assert "text" in out and ": 2 records (texts at the 10000-character limit, longer ones cut: 1)" in out
    formats.main(["check", "--data_dir", str(d), "--images", "--workers", "2"])
    out, err = capsys.readouterr()
    assert "bad input: 1 malformed JSON, 1 malformed record, 2 unreadable image" in out
    assert f"{d / 'pairs.jsonl'}:2: unreadable image ({d / 'img' / 'cut.jpg'}: OSError: " in err
    assert f"{d / 'pairs.jsonl'}:3: unreadable image ({d / 'img' / 'empty.png'}: UnidentifiedImageError" in err
    assert "good.png" not in err and "decode images" in err
