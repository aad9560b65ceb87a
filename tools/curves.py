"""
Expected learning, written down: reference curves for the toy run, chance levels, and a health check.

    python tools/curves.py make                  # re-run the reference runs and rewrite reference/*.json, *.png
    python tools/curves.py make --which xfm_toy_short   # only one reference (the CI learning test compares against the short ones)
    python tools/curves.py make --which xfm_toy --runs_dir runs/key --reuse   # read finished runs instead of re-running them
    python tools/curves.py check runs/default    # health check of a run folder: which objective looks wrong, and why

A reference file (reference/NAME.json) holds, for one train.py command: each objective's loss at a handful of
steps (the mean over the log window ending there) averaged over its seeds, a band around it, each objective's
chance level, and the final zero-shot retrieval figures. tests/test_learning.py runs the short commands and fails
when a loss stays out of its band or retrieval falls towards chance. The short bands of ITM, box L1/GIoU and FLAVA's GC
contain their chance levels, so a broken ITM, box or GC loss stays inside them: tests/test_overfit.py checks
each objective on one batch instead, and tools/mutate.py lists the planted bugs each test catches.

Chance levels (what a model that learned nothing scores):
    MLM, IMLM    ln V                 uniform over the vocabulary
    ITC          ln N                 N = pairs (or region captions) per batch, i.e. the number of candidates
    ITM          H(1/3) = 0.637       the best constant guess for 1 positive : 2 negatives (ln 2 = 0.693 at random)
    box L1/GIoU  measured             the best constant box (the mean box of the data) on real batches
    MIM          none                 its target moves; judged by its band and by the target's feature std
  FLAVA (--recipe=flava):
    MLM, MMM-text    ln V             GC    ln N
    MIM, MMM-image   ln K             K = the image tokenizer's codebook size; its targets are fixed
    ITM              H(0.1) = 0.325   the best constant guess when 10 % of the pairs are swapped
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
from lib import tokenizer  # noqa: E402
from lib import formats
from lib import streams  # noqa: E402
import train  # noqa: E402
from lib import pictures  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> train.py arguments (on top of the defaults), the steps recorded and the seeds. The full-length
# references hold five seeds: a student's healthy run of any seed should land inside them, and a band made from
# two seeds is narrower than the spread of healthy seeds. The short ones, which tests/test_learning.py runs in CI
# with seed 0, hold two.
REFERENCES = {
    "xfm_toy": {"args": [], "steps": [25, 50, 100, 200, 300, 400, 500, 600], "seeds": (0, 1, 2, 3, 4)},
    "xfm_toy_short": {"args": ["--max_steps=150"], "steps": [25, 50, 75, 100, 125, 150], "seeds": (0, 1)},
    "flava_toy": {"args": ["--recipe=flava"], "steps": [25, 50, 100, 200, 300, 400, 500, 600], "seeds": (0, 1, 2, 3, 4)},
    "flava_toy_short": {"args": ["--recipe=flava", "--max_steps=150"], "steps": [25, 50, 75, 100, 125, 150],
                        "seeds": (0, 1)},
}
# the config keys that must match for a run to be compared with a reference's bands
MATCH_KEYS = ("config", "recipe", "max_steps", "batch_size", "text_batch_size", "region_batch_size",
              "micro_batch_size", "schedule", "lr", "warmup_steps", "stop_grad", "mim_target", "log_every")
REL_BAND, ABS_BAND, SPREAD_BAND = 0.12, 0.04, 3.0  # half-width = max(12 % of ref, 0.04, 3 x half the seed spread)


# ---------------------------------------------------------------------------------------------------------
# Reading runs and computing chance levels


def read_run(run_dir):
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    return [l for l in lines if not l.get("final")], next((l for l in lines if l.get("final")), None), config


def chance_levels(run_dir, n_batches=20):
    """Chance level of every objective for the run in run_dir, from its config, tokenizer and data."""
    _, _, config = read_run(run_dir)
    t, world = config["train"], config["world_size"]
    tok = tokenizer.Tokenizer.load(os.path.join(run_dir, "tokenizer.json"))
    ln_v = math.log(tok.vocab_size)
    if t.get("recipe") == "flava":
        p, ln_k = config["model"]["itm_neg_prob"], math.log(config["model"]["codebook_size"])
        return {"mlm": ln_v, "mmm_text": ln_v, "mim": ln_k, "mmm_image": ln_k,
                "itm": -(p * math.log(p) + (1 - p) * math.log(1 - p)),
                "gc": math.log(config["per_rank_batch"]["pair"] * world)}
    itm = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    chance = {"mlm": ln_v, "imlm": ln_v, "imlm_region": ln_v, "itm": itm, "itm_region": itm,
              "itc": math.log(config["per_rank_batch"]["pair"] * world)}
    sources = formats.find_sources(t["data_dir"])
    if "region" in sources:  # the region stream's caption count varies, and so does the best constant box
        bad = formats.BadInput(verbose=False)
        m = config["model"]
        dc = data.DataConfig(m["image_size"], m["patch_size"], t["text_len"], t["caption_len"], t["seed"], t["hflip"],
                             (t["crop_min_scale"], 1.0), image_root=t.get("image_root", ""))
        stream = streams.build_streams(t["data_dir"], tok, dc, {"region": config["per_rank_batch"]["region"]}, bad)["region"]
        batches = [next(stream) for _ in range(n_batches)]
        # the candidates are the filled caption slots (b["filled"]), not every slot of the fixed-size batch
        chance["itc_region"] = float(np.mean([math.log(int(b["filled"].sum()) * world) for b in batches]))
        boxes = np.concatenate([b["box"][b["is_region"]].numpy() for b in batches])
        chance.update(_constant_box_losses(boxes))
    return chance


def _constant_box_losses(boxes):
    """L1 and 1 - GIoU of predicting the mean box for every region (boxes (N, 4) cx, cy, w, h)."""
    import torch
    from losses import bbox_loss
    target = torch.tensor(boxes)
    pred = target.mean(0, keepdim=True).expand_as(target)
    l1, giou = bbox_loss(pred, target, torch.ones(len(target), dtype=torch.bool))
    return {"bbox_l1": float(l1), "bbox_giou": float(giou)}


def losses_at(records, steps):
    """{objective: [loss at each step]} from metrics records (None where a step was not logged)."""
    by_step = {r["step"]: r for r in records}
    names = sorted({k[5:] for r in records for k in r if k.startswith("loss/") and k != "loss/total"})
    return {n: [by_step.get(s, {}).get(f"loss/{n}") for s in steps] for n in names}


# ---------------------------------------------------------------------------------------------------------
# Making a reference


def finished_run(run, argv):
    """True when RUN holds a finished run (its final record written) of exactly the command ARGV."""
    if not os.path.exists(os.path.join(run, "metrics.jsonl")):
        return False
    _, final, config = read_run(run)
    want = dataclasses.asdict(train.parse_args(argv)[0])
    return final is not None and all(config["train"].get(k) == want[k] for k in (*MATCH_KEYS, "seed"))


def make_reference(name, out_dir="reference", runs_dir="runs/reference", reuse=False):
    """Run (or with REUSE read, when finished) RUNS_DIR/NAME_seedS for each seed, then write the reference."""
    spec = REFERENCES[name]
    runs = []
    for seed in spec["seeds"]:
        run = os.path.join(runs_dir, f"{name}_seed{seed}")
        argv = [*spec["args"], f"--seed={seed}", f"--out_dir={run}"]
        if reuse and finished_run(run, argv):
            print(f"reusing the finished run {run}")
        else:  # (an earlier run in RUN, unfinished or of another command, is replaced)
            train.main([*argv, "--overwrite"])
        runs.append(run)
    steps = spec["steps"]
    per_seed = [losses_at(read_run(r)[0], steps) for r in runs]
    finals = [read_run(r)[1]["retrieval"] for r in runs]
    ref, band = {}, {}
    for obj in per_seed[0]:
        vals = np.array([p[obj] for p in per_seed], dtype=float)        # (seeds, steps)
        mean, spread = vals.mean(0), (vals.max(0) - vals.min(0)) / 2
        half = np.maximum.reduce([REL_BAND * np.abs(mean), np.full_like(mean, ABS_BAND), SPREAD_BAND * spread])
        ref[obj] = [round(float(v), 4) for v in mean]
        lo = np.maximum(mean - half, 0.0)                               # every loss here is >= 0
        band[obj] = [[round(float(v), 4) for v in lo], [round(float(v), 4) for v in mean + half]]
    config = read_run(runs[0])[2]
    std_per_seed = [[{r["step"]: r.get("mim_target_std") for r in read_run(x)[0]}[s] for s in steps] for x in runs]
    reference = {
        "name": name,
        "command": " ".join(["python train.py", *spec["args"]]),
        "seeds": list(spec["seeds"]),
        "config": {k: config["train"][k] for k in MATCH_KEYS},
        "steps": steps,
        "loss": ref,
        "band": band,
        "chance": {k: round(v, 4) for k, v in chance_levels(runs[0]).items()},
        "mim_target_std": [None if None in v else round(float(np.mean(v)), 4) for v in zip(*std_per_seed)],
        "retrieval": {k: [round(f[k], 2) for f in finals] for k in finals[0] if not k.startswith("n_")},
        "note": "loss = mean over seeds of the log-window mean ending at each step; band = the range a healthy "
                "run of the same command lands in; chance = what a model that learned nothing scores.",
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(reference, f, indent=1)
    plot_reference(reference, read_run(runs[0])[0], os.path.join(out_dir, f"{name}.png"))
    print(f"wrote {out_dir}/{name}.json and {out_dir}/{name}.png")
    return reference


def plot_reference(reference, records, path):
    steps = reference["steps"]
    bands = {k: (steps, lo, hi) for k, (lo, hi) in reference["band"].items()}
    records = [{k: v for k, v in r.items() if k != "loss/total"} for r in records]
    pictures.plot_curves(records, path, chance=reference["chance"], bands=bands)


# ---------------------------------------------------------------------------------------------------------
# The health check


def _band_verdict(by_step, steps, lo, hi):
    """(verdict, ok) of one objective against its band. A bug keeps a loss out of its band: BAD when it is out on
    the same side at two reference steps in a row, or at the last one. A healthy seed can leave the band at one
    step and come back (seed 5 of the default run, not among the seeds the band was made from, does so for MIM at
    step 25 and ITM at step 500): that is reported, not called BAD."""
    sides = []                                                         # [(step, value, bound, side)] logged steps
    for s, l, h in zip(steps, lo, hi):
        v = by_step.get(s)
        if v is not None:
            sides.append((s, v, h if v > h else l, "above" if v > h else "below" if v < l else None))
    out = [(i, x) for i, x in enumerate(sides) if x[3]]
    for i, (s, v, b, side) in out:
        if (i + 1 < len(sides) and sides[i + 1][3] == side) or i == len(sides) - 1:
            sign = ">" if side == "above" else "<"
            why = ("learning too slowly" if side == "above" else "suspiciously easy (a label leaking into the "
                   "input, or an easier task than the reference's?)")
            return f"{side} the reference band from step {s} ({v:.3f} {sign} {b:.3f}): {why}", False
    if out:
        s, v, b, side = out[0][1]
        return f"inside the reference band, but {side} it at step {s} alone ({v:.3f}; bound {b:.3f})", True
    return "inside the reference band", True


def diagnose(records, chance, reference=None):
    """[(objective, start, end, chance, verdict, ok)] for a run's metrics records.

    With a matching reference every logged reference step is checked against its band (_band_verdict). Without
    one, each objective is judged against its chance level: stuck at chance, diverging (rising well above its
    best), non-finite; MIM is judged by its target's feature std, since its loss legitimately rises while its
    target moves."""
    rows = []
    names = sorted({k[5:] for r in records for k in r if k.startswith("loss/") and k != "loss/total"})
    for n in names:
        vals = [(r["step"], r[f"loss/{n}"]) for r in records if f"loss/{n}" in r]
        start, end = vals[0][1], vals[-1][1]
        c = chance.get(n)
        verdict, ok = "learning", True
        if not all(math.isfinite(v) for _, v in vals):
            verdict, ok = "diverged: non-finite loss", False
        elif reference is not None and n in reference["band"]:
            verdict, ok = _band_verdict(dict(vals), reference["steps"], *reference["band"][n])
        elif n.startswith("mim") and c is None:  # X-FM's MIM: a moving target, no chance level
            verdict = "judged by the target std below"
        elif end > 1.5 * min(v for _, v in vals) and end > 0.9 * start:
            verdict, ok = "diverging: rose well above its best", False
        elif c is not None and end > 0.97 * c:
            verdict, ok = f"stuck at chance ({c:.3f})", False
        elif c is not None and n in ("mlm", "imlm", "imlm_region", "mmm_text") and end < 0.02 * c:
            verdict, ok = "suspiciously low: are the masked tokens visible to the model?", False
        rows.append((n, start, end, c, verdict, ok))
    stds = [r["mim_target_std"] for r in records if "mim_target_std" in r]
    if stds:
        if stds[-1] < 0.2 * max(stds) or stds[-1] < 1e-3:
            rows.append(("mim_target_std", stds[0], stds[-1], None, "collapsed: the MIM target lost its variance", False))
        else:
            rows.append(("mim_target_std", stds[0], stds[-1], None, "no collapse", True))
    return rows


def check(run_dir, reference_path=None):
    """Print the health check of a run folder; returns True when every objective looks healthy."""
    records, final, config = read_run(run_dir)
    reference = None
    ref_dir = os.path.join(ROOT, "reference")                             # wherever it is run from
    candidates = [reference_path] if reference_path else [os.path.join(ref_dir, f"{n}.json") for n in REFERENCES]
    for path in candidates:
        if path and os.path.exists(path):
            ref = json.load(open(path))
            if all(config["train"].get(k) == v for k, v in ref["config"].items()):
                reference = ref
                break
    chance = reference["chance"] if reference else chance_levels(run_dir)
    print(f"health check of {run_dir}: " + (f"compared with the reference bands of {reference['name']} "
          f"({reference['command']})" if reference else "no reference with this config; compared with chance levels"))
    rows = diagnose(records, chance, reference)
    print(f"  {'objective':<15} {'first':>7} {'last':>7} {'chance':>7}  verdict")
    for n, start, end, c, verdict, ok in rows:
        print(f"  {n:<15} {start:7.3f} {end:7.3f} {'' if c is None else f'{c:7.3f}':>7}  {'ok ' if ok else 'BAD'} {verdict}")
    healthy = all(ok for *_, ok in rows)
    if final and "retrieval" in final:
        r = final["retrieval"]
        good = r["t2i_r1"] >= 3 * r["t2i_chance_r1"]
        healthy &= good
        print(f"  retrieval: text->image R@1 {r['t2i_r1']:.1f} vs chance {r['t2i_chance_r1']:.1f}: "
              f"{'ok' if good else 'BAD: less than 3x chance'}")
    print("verdict: " + ("healthy" if healthy else "something is wrong (see BAD above)"))
    return healthy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="re-run the reference runs and rewrite reference/*.json and *.png")
    m.add_argument("--which", choices=[*REFERENCES, "all"], default="all")
    m.add_argument("--runs_dir", default="runs/reference", help="where the runs go: RUNS_DIR/NAME_seedS")
    m.add_argument("--reuse", action="store_true", help="read a finished run of the same command and seed "
                   "instead of training it again")
    c = sub.add_parser("check", help="health check of a run folder")
    c.add_argument("run_dir")
    c.add_argument("--reference", default=None, help="a reference JSON (default: the one whose config matches)")
    args = p.parse_args(argv)
    if args.cmd == "make":
        for name in (REFERENCES if args.which == "all" else [args.which]):
            make_reference(name, runs_dir=args.runs_dir, reuse=args.reuse)
        return 0
    return 0 if check(args.run_dir, args.reference) else 1


if __name__ == "__main__":
    sys.exit(main())
