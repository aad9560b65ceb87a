"""walkthrough.py: its printout equals the stored one (tests/walkthrough_expected.txt), and the facts it shows hold:
the stop-gradient cuts ITM, IMLM and BBP off the language encoder, the MIM target is the detached output of
the same vision encoder on the unmasked image, and one step of the vision-language losses alone moves that target
(and not a pixel target). When the method or the printout changes on purpose, regenerate the stored printout and
read the diff before committing it:

    python walkthrough.py > tests/walkthrough_expected.txt && git diff tests/walkthrough_expected.txt
"""
import contextlib
import io
import math
import os
import re

import pytest
import torch

import walkthrough

EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "walkthrough_expected.txt")
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]\d+)?|[-+]?\d+(?:\.\d+)?e[-+]\d+|\d+")
REGENERATE = "python walkthrough.py > tests/walkthrough_expected.txt && git diff tests/walkthrough_expected.txt"


@pytest.fixture(scope="module")
def run():
    """walkthrough.main() once for the whole file: (its printout, the facts it returns)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        facts = walkthrough.main()
    return out.getvalue(), facts


def same_line(got, want):
    """Equal text; integers (shapes, counts) exactly; other numbers within 2 % (CPU kernels round differently
    from machine to machine); an exact 0 (no gradient) only by an exact 0."""
    if NUMBER.sub("#", got) != NUMBER.sub("#", want):
        return False
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)):
        if re.fullmatch(r"\d+", b) or re.fullmatch(r"\d+", a):
            if a != b:
                return False
        elif not math.isclose(float(a), float(b), rel_tol=0.02, abs_tol=0.0):
            return False
    return True


def test_stop_gradient_cuts_itm_imlm_bbp_off_the_language_encoder(run):
    on, off = run[1]["on"], run[1]["off"]
    for name in walkthrough.VL_LOSSES:
        assert on[name]["language"] == 0.0, f"{name} reaches the language encoder through the stop-gradient"
        assert off[name]["language"] > 0.0, f"{name} does not reach the language encoder without the stop-gradient"
        assert on[name]["fusion"] > 0.0 and on[name]["vision"] > 0.0, name
    for table in (on, off):
        assert table["mlm"]["language"] > 0 and table["itc"]["language"] > 0
        for name in ("mim", "mim_image"):
            assert table[name]["language"] == table[name]["fusion"] == 0.0 < table[name]["vision"], (
                f"{name} must reach the vision encoder and nothing else")


def test_mim_target_is_the_detached_unmasked_output_of_the_same_encoder(run):
    checks = run[1]["mim"]
    assert len(checks) == 7
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"MIM target checks failed: {failed}"


def test_a_vl_only_step_moves_the_vl_target_and_not_the_pixel_target(run):
    change = run[1]["guided"]["change"]
    assert change["vl"] > 0.01, f"one step of ITC + ITM + IMLM moved the MIM target by {change['vl']:.2e} only"
    assert change["pixel"] == 0.0, "a pixel target depends on no parameter: no step can move it"


def test_the_measured_target_is_the_unmasked_output_of_the_untouched_encoder(run):
    """Section 12's 'before' is losses.py's MIM target of the image batch: E_v(unmasked image) of the model the
    earlier sections used (untouched by the step, which runs on a copy), not the masked view."""
    before = run[1]["guided"]["vl"][0]
    b = run[1]["batch"]["image"]
    with torch.no_grad(), walkthrough.one_thread():
        model = walkthrough.tiny_model()
        fresh, masked = model.encode_image(b["image"]), model.encode_image(b["image"], b["mim_mask"])
    assert torch.allclose(before, fresh, atol=1e-5), "section 12's target is not E_v(unmasked image)"
    assert not torch.allclose(before, masked, atol=1e-3)  # the check above can tell the two views apart


def test_the_move_comes_from_the_vl_losses_alone(run):
    """The same step on an X-FM without MIM (mim_target=off: same initial weights, no MIM loss anywhere) ends at
    the same target: no MIM gradient took part in section 12's step."""
    guided = run[1]["guided"]
    with walkthrough.one_thread():
        no_mim = walkthrough.vl_guided_target(walkthrough.tiny_model(mim_target="off"), run[1]["batch"])
    assert torch.equal(no_mim["vl"][0], guided["vl"][0])
    moved = (guided["vl"][1] - guided["vl"][0]).norm()
    assert (no_mim["vl"][1] - guided["vl"][1]).norm() < 1e-3 * moved, "a MIM gradient took part in the step"


def test_printout_equals_the_stored_one(run):
    got, want = run[0].splitlines(), open(EXPECTED).read().splitlines()
    for i, (g, w) in enumerate(zip(got, want), 1):
        assert same_line(g, w), (f"walkthrough.py's line {i} differs from tests/walkthrough_expected.txt\n"
                                 f"  got:      {g}\n  expected: {w}\n"
                                 f"If the method changed on purpose, regenerate it: {REGENERATE}")
    assert len(got) == len(want), (f"walkthrough.py printed {len(got)} lines, tests/walkthrough_expected.txt has "
                                   f"{len(want)}; if that is on purpose, regenerate it: {REGENERATE}")


def test_method_doc_quotes_the_stored_printout():
    """docs/METHOD.md §3 quotes the printout's gradient table, MIM check and moving MIM target: the quote is the
    stored printout's."""
    want = open(EXPECTED).read()
    quote = want[want.index("10. gradient norm"):]
    doc = open(os.path.join(os.path.dirname(EXPECTED), os.pardir, "docs", "METHOD.md")).read()
    assert quote in doc, ("docs/METHOD.md §3 no longer quotes sections 10 to 12 of tests/walkthrough_expected.txt: "
                          "paste them there again")
