"""Learning itself, guarded as a whole. A short CPU run of the toy world (`python train.py --max_steps=150`, about a
minute, and the same for `--recipe=flava`) must land inside the committed reference bands
(reference/{xfm,flava}_toy_short.json, rewritten by `python tools/curves.py make --which xfm_toy_short`), and X-FM's
zero-shot retrieval must beat chance by a wide margin.

What the bands cannot show: after 150 toy steps the bands of itm, itm_region, bbox_l1 and bbox_giou (and FLAVA's
gc and, at all but one step, itm) contain their chance levels, so a broken ITM, box or GC loss stays inside them.
Each objective's own check is test_overfit.py (overfit one batch); the rules of each loss are pinned by
test_losses.py, test_model.py and test_flava.py; tools/mutate.py lists the planted bugs each test catches."""
import dataclasses
import json
import math
import os

import pytest

import curves
from lib import tokenizer
from lib import runtime
import train
from lib import toyworld
from model import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, seed=0, progress=False)                              # the default toy world, as train.py builds it
    return d


@pytest.mark.parametrize("name", ["xfm_toy_short", "flava_toy_short"])
def test_short_run_lands_inside_the_reference_bands(toy, tmp_path, name):
    ref = json.load(open(os.path.join(ROOT, "reference", f"{name}.json")))
    out = str(tmp_path / "run")
    train.main([*curves.REFERENCES[name]["args"], f"--data_dir={toy}", f"--out_dir={out}"])
    records, final, config = curves.read_run(out)
    assert all(config["train"][k] == v for k, v in ref["config"].items()), "the test no longer runs the reference command"
    # the chance levels the health check computes for a run are the committed ones (region ITC: ln of the
    # filled caption slots per batch, not of every slot)
    assert curves.chance_levels(out) == pytest.approx(ref["chance"], rel=0.01)
    rows = curves.diagnose(records, ref["chance"], ref)
    bad = [f"{n}: {verdict}" for n, _, _, _, verdict, ok in rows if not ok]
    assert not bad, "learning left the reference bands:\n" + "\n".join(bad)
    r = final["retrieval"]
    assert r["t2i_r10"] >= 0.6 * min(ref["retrieval"]["t2i_r10"]), (r["t2i_r10"], ref["retrieval"]["t2i_r10"])
    if name.startswith("xfm"):
        # the reference runs reach ~5x chance at R@10 after 150 steps (R@1 is still noisy there, and ITM
        # re-ranking only starts to help later).
        # (FLAVA's contrastive loss sits at chance for its first ~250 toy steps: its retrieval is not checked
        # here, and test_overfit.py checks GC on one batch.)
        chance_r10 = 10 * r["t2i_chance_r1"]
        assert r["t2i_r10"] >= 3 * chance_r10, (r["t2i_r10"], chance_r10)


def test_region_chance_is_ln_of_the_filled_caption_slots(toy, tmp_path):
    """The health check's region ITC chance level, computed from a run folder's config, tokenizer and data, is the
    committed one: ln of the FILLED caption slots per batch (an empty slot is no candidate), not of every slot."""
    cfg, _ = train.parse_args([*curves.REFERENCES["xfm_toy_short"]["args"], f"--data_dir={toy}"])
    run = tmp_path / "run"
    tokenizer.get_tokenizer(toy, str(run), cfg.vocab_size)
    (run / "metrics.jsonl").write_text("")
    config = {"train": dataclasses.asdict(cfg), "world_size": 1, "per_rank_batch": runtime.batch_plan(cfg, 1)[2],
              "model": dataclasses.asdict(make_config(cfg.config))}
    (run / "config.json").write_text(json.dumps(config))
    ref = json.load(open(os.path.join(ROOT, "reference", "xfm_toy_short.json")))
    assert curves.chance_levels(str(run))["itc_region"] == pytest.approx(ref["chance"]["itc_region"], rel=0.01)


# ---------------------------------------------------------------------------------------------------------
# The health check's verdicts on synthetic curves


def _records(**curves_by_name):
    n = len(next(iter(curves_by_name.values())))
    return [{"step": 10 * (i + 1), **{f"loss/{k}" if k != "mim_target_std" else k: v[i] for k, v in curves_by_name.items()}}
            for i in range(n)]


def test_health_check_flags_chance_divergence_leaks_and_collapse():
    chance = {"itc": math.log(16), "mlm": math.log(400), "itm": 0.637}
    rows = {r[0]: r for r in curves.diagnose(_records(
        itc=[2.8, 2.78, 2.77, 2.77],               # never leaves ln 16: stuck at chance
        mlm=[6.0, 0.5, 0.05, 0.01],                # far below anything honest: a leak
        itm=[0.64, 0.3, 0.2, 0.9],                 # fell, then rose far above its best
        mim=[0.7, 0.2, 0.3, 0.35],                 # MIM rising again is fine (moving target)
        mim_target_std=[0.5, 0.3, 0.05, 0.01],     # ... but its target losing all variance is not
    ), chance)}
    assert not rows["itc"][-1] and "chance" in rows["itc"][4]
    assert not rows["mlm"][-1] and "low" in rows["mlm"][4]
    assert not rows["itm"][-1] and "diverging" in rows["itm"][4]
    assert rows["mim"][-1]
    assert not rows["mim_target_std"][-1] and "collapsed" in rows["mim_target_std"][4]
    healthy = curves.diagnose(_records(itc=[2.8, 2.0, 1.5], mlm=[6.0, 4.0, 3.0], mim_target_std=[0.5, 0.6, 0.7]), chance)
    assert all(r[-1] for r in healthy)
    nan = curves.diagnose(_records(itc=[2.8, float("nan")]), chance)
    assert not nan[0][-1] and "non-finite" in nan[0][4]


def test_health_check_uses_reference_bands():
    ref = {"steps": [10, 20], "band": {"itc": [[2.0, 1.0], [3.0, 2.0]]}}
    ok = curves.diagnose(_records(itc=[2.5, 1.5]), {}, ref)[0]
    slow = curves.diagnose(_records(itc=[2.5, 2.5]), {}, ref)[0]
    leak = curves.diagnose(_records(itc=[2.5, 0.5]), {}, ref)[0]
    assert ok[-1] and not slow[-1] and "above" in slow[4] and not leak[-1] and "below" in leak[4]


def test_health_check_calls_bad_only_a_lasting_excursion():
    """Out of the band at one step and back in: reported, not BAD (healthy seeds do it). Out on the same side at
    two reference steps in a row, or at the last one: BAD."""
    ref = {"steps": [10, 20, 30, 40], "band": {"itc": [[2.0, 1.5, 1.0, 0.5], [3.0, 2.5, 2.0, 1.5]]}}
    def verdict(*itc):
        return curves.diagnose(_records(itc=list(itc)), {}, ref)[0]
    once = verdict(1.9, 2.0, 1.5, 1.0)                        # below at step 10 only
    assert once[-1] and "at step 10 alone" in once[4]
    twice = verdict(2.5, 1.4, 0.9, 1.0)                       # below at steps 20 and 30
    assert not twice[-1] and "below the reference band from step 20" in twice[4]
    last = verdict(2.5, 2.0, 1.5, 1.6)                        # above at the last step
    assert not last[-1] and "above the reference band from step 40" in last[4]
    both_sides = verdict(3.1, 1.4, 1.5, 1.0)                  # above at 10, below at 20: two single excursions
    assert both_sides[-1]
    assert verdict(2.5, 2.0, 1.5, 1.0)[4] == "inside the reference band"


def test_constant_box_chance_level():
    import numpy as np
    boxes = np.array([[0.25, 0.5, 0.2, 0.2], [0.75, 0.5, 0.2, 0.2]], dtype=np.float32)
    got = curves._constant_box_losses(boxes)
    # the mean box (0.5, 0.5, 0.2, 0.2) is 0.25 away in cx from each: L1 = 0.25; disjoint boxes 0.05 apart:
    # GIoU = 0 - (C - U) / C with C = 0.45 x 0.2, U = 0.08  ->  1 - GIoU = 1 + 0.01 / 0.09
    assert got["bbox_l1"] == pytest.approx(0.25)
    assert got["bbox_giou"] == pytest.approx(1 + 0.01 / 0.09, rel=1e-5)


def test_make_reuses_only_a_finished_run_of_the_same_command_and_seed(tmp_path):
    """`curves.py make --reuse` may read a run instead of training it only when the run is finished and its
    command (every config key a reference matches on, and the seed) is the reference's."""
    def fake_run(name, argv, final=True):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"train": dataclasses.asdict(train.parse_args(argv)[0])}))
        lines = [{"step": 25, "loss/itc": 2.7}] + ([{"final": True, "retrieval": {}}] if final else [])
        (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
        return str(run)
    want = ["--max_steps=150", "--seed=3"]
    assert curves.finished_run(fake_run("same", want), want)
    assert not curves.finished_run(fake_run("unfinished", want, final=False), want)
    assert not curves.finished_run(fake_run("other_seed", ["--max_steps=150", "--seed=4"]), want)
    assert not curves.finished_run(fake_run("other_command", ["--max_steps=150", "--seed=3", "--stop_grad=false"]), want)
    assert not curves.finished_run(str(tmp_path / "absent"), want)
