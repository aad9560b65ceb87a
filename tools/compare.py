"""
X-FM against its ablations and FLAVA on the same data and budget: pre-train each recipe with the same model size,
batch sizes, step count and optimizer updates, then run the whole `finetune.py --task all` suite on each, for
several seeds; write a Markdown table with the mean and spread per task and per domain.

    python tools/compare.py                          # 5 recipes x 2 seeds on the toy world (CPU: ~75 min; see --jobs)
    python tools/compare.py --seeds 0,1,2 --jobs 4   # more seeds, 4 runs at a time (a GPU, or a many-core CPU)
    python tools/compare.py --table                  # only rebuild the table from the runs already in --out_dir
    python tools/compare.py --recipes xfm,flava,flava_2x   # add FLAVA with twice the steps (about X-FM's compute)

The budget is the same `train.py` defaults for every recipe (tiny model, 600 steps of three optimizer updates
each, 16 samples per data stream in a batch): every recipe makes the same number of updates on batches of the same
size. That is equal updates, not equal FLOPs: an X-FM step runs every data kind (its second update holds a region
batch and an image batch; its fusion encoder runs four times on a pair batch), a FLAVA update one kind, and a
FLAVA step costs about half an X-FM step (bench.py counts both). The table gives each recipe's measured
pre-training wall time, and `flava_2x` (1200 steps) gives FLAVA about X-FM's compute.

Every run lives in OUT/NAME_seedS (train.py's run folder, with finetune/benchmark.json inside); a run that
already has its benchmark is not repeated, so an interrupted comparison continues where it stopped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib import toyworld  # noqa: E402

RECIPES = {  # id (also the run folder's prefix) -> (column title, train.py arguments)
    "xfm": ("X-FM", []),
    "xfm_nosg": ("X-FM, no stop-grad", ["--stop_grad=false"]),
    "xfm_pixel": ("X-FM, pixel MIM", ["--mim_target=pixel"]),
    "xfm_nomim": ("X-FM, no MIM", ["--mim_target=off"]),
    "flava": ("FLAVA", ["--recipe=flava"]),
    # a FLAVA step costs about half an X-FM step (bench.py; measured wall times below): twice the steps is
    # about X-FM's compute
    "flava_2x": ("FLAVA, 1200 steps", ["--recipe=flava", "--max_steps=1200"]),
}
# task (finetune.py's SUITE names) -> (domain, label); retrieval reports the mean of t2i and i2t R@1
TASKS = {
    "textcls": ("language", "text classification acc"),
    "imgcls": ("vision", "image classification acc"),
    "imgcls_linear": ("vision", "linear probe acc"),
    "vqa": ("vision-language", "VQA acc"),
    "nlvr": ("vision-language", "NLVR2 acc"),
    "retrieval_zeroshot": ("vision-language", "zero-shot retrieval R@1"),
    "retrieval": ("vision-language", "fine-tuned retrieval R@1"),
    "grounding": ("vision-language", "grounding acc@0.5"),
}
DOMAINS = ("language", "vision", "vision-language")


def run_one(name, seed, args):
    """Pre-train and fine-tune one (recipe, seed) in a subprocess; -> its run folder. Skips what is done."""
    run = os.path.join(args.out_dir, f"{name}_seed{seed}")
    bench = os.path.join(run, "finetune", "benchmark.json")
    if os.path.exists(bench):
        return run
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = open(os.path.join(args.out_dir, f"{name}_seed{seed}.log"), "w")
    extra = args.train_args.split() if args.train_args else []
    # (an unfinished run of an earlier call is replaced: --overwrite)
    cmds = [[sys.executable, os.path.join(ROOT, "train.py"), *RECIPES[name][1], f"--seed={seed}", f"--out_dir={run}",
             "--overwrite", *extra]]
    cmds.append([sys.executable, os.path.join(ROOT, "finetune.py"), "--task", "all", "--init", os.path.join(run, "ckpt.pt"),
                 f"--seed={seed}"])
    for cmd in cmds:
        if cmd[1].endswith("train.py") and os.path.exists(os.path.join(run, "ckpt.pt")) and _finished(run):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"error: {' '.join(cmd[1:])} failed; see {log.name}")
    return run


def _finished(run):
    path = os.path.join(run, "metrics.jsonl")
    return os.path.exists(path) and any('"final"' in line for line in open(path))


def results(run):
    """{task: value in %} of one run, plus its pre-training and fine-tuning wall times in seconds."""
    rows = json.load(open(os.path.join(run, "finetune", "benchmark.json")))
    out = {r["name"]: r["value"] for r in rows if r["name"] in TASKS}
    final = next(json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"final"' in line)
    out["pretrain_s"] = final["wall_s"]
    out["device"] = json.load(open(os.path.join(run, "config.json"))).get("device", "?")
    out["finetune_s"] = sum(r["wall_s"] for r in rows)
    return out


def mean_spread(xs):
    """Mean and half the range (with 2 seeds: the distance of each seed from the mean)."""
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2


def table(args, seeds):
    found = {}
    for name in RECIPES:
        runs = [os.path.join(args.out_dir, f"{name}_seed{s}") for s in seeds]
        done = [r for r in runs if os.path.exists(os.path.join(r, "finetune", "benchmark.json"))]
        if done:
            found[name] = [results(r) for r in done]
    if not found:
        raise SystemExit(f"error: no finished runs in {args.out_dir}")
    names = list(found)
    device = ", ".join(sorted({r["device"] for runs in found.values() for r in runs}))
    lines = [f"Toy-world comparison (tiny model, `train.py` defaults: 600 steps x 3 updates, batch 16, unless named), "
             f"then `finetune.py --task all`; mean ± half-range over seeds {','.join(map(str, seeds))} "
             f"(runs finished: {', '.join(f'{n} {len(v)}' for n, v in found.items())}). Device: {device}. "
             f"Results in %.", "",
             "| task | domain | " + " | ".join(RECIPES[n][0] for n in names) + " |", "|---|---|" + "---|" * len(names)]
    fmt = lambda xs: "{:.1f} ± {:.1f}".format(*mean_spread(xs))  # noqa: E731
    for task, (domain, label) in TASKS.items():
        cells = [fmt([r[task] for r in found[n]]) for n in names]
        lines.append(f"| {label} | {domain} | " + " | ".join(cells) + " |")
    for domain in DOMAINS:  # per seed: the mean of the domain's tasks; then mean ± half-range over seeds
        tasks = [t for t, (d, _) in TASKS.items() if d == domain]
        cells = [fmt([statistics.fmean(r[t] for t in tasks) for r in found[n]]) for n in names]
        lines.append(f"| **{domain} average** | | " + " | ".join(f"**{c}**" for c in cells) + " |")
    cells = [fmt([statistics.fmean(statistics.fmean(r[t] for t, (d, _) in TASKS.items() if d == dom)
                                   for dom in DOMAINS) for r in found[n]]) for n in names]
    lines.append("| **macro average** (of the 3 domains) | | " + " | ".join(f"**{c}**" for c in cells) + " |")
    for key, label in (("pretrain_s", "pre-training wall time (s)"), ("finetune_s", "fine-tuning suite wall time (s)")):
        lines.append(f"| {label} | | " + " | ".join("{:.0f}".format(statistics.fmean(r[key] for r in found[n]))
                                                 for n in names) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out_dir, "comparison.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "comparison.json"), "w") as f:
        json.dump({"seeds": seeds, "device": device, "runs": found}, f, indent=1)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--recipes", default="xfm,xfm_nosg,xfm_pixel,xfm_nomim,flava",
                   help="comma-separated subset of: " + ", ".join(f"{k} ({t})" for k, (t, _) in RECIPES.items()))
    p.add_argument("--out_dir", default="runs/compare")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each is its own process)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per run (0: torch's default)")
    p.add_argument("--train_args", default="", help="extra train.py arguments for every recipe, e.g. '--max_steps=150'")
    p.add_argument("--table", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [r.strip() for r in args.recipes.split(",")]
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise SystemExit(f"error: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    for name in list(RECIPES):
        if name not in chosen:
            del RECIPES[name]
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    if not args.table:
        toyworld.build_if_missing("data/toy")  # once, before several runs race to build it
        jobs = [(name, seed) for seed in seeds for name in RECIPES]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: run_one(*job, args), jobs))
    md = table(args, seeds)
    print("\n" + md + f"\nwritten to {args.out_dir}/comparison.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
