"""
A class's results, pooled: read many run folders (one per student, or one per seed) and print, per quantity, the
number of runs n, the mean, the sample standard deviation (n - 1 in the denominator), the minimum and the maximum.

    python tools/class_results.py class/*/ex01_default                 # every student's exercise-1 run
    python tools/class_results.py class/ --group 'ex01_*' --group 'ex02_*' --only 'loss/mlm$|t2i_r1|ft/textcls'
    python tools/class_results.py /tmp/keyruns --by '_s[0-9]+$'        # seeds of one command pooled: ex01_s0..s4 -> ex01
    python tools/class_results.py runs/ex07_b8 runs/ex07_b16 --series first,last,max --only 'itc|temp'
    python tools/class_results.py class/*/ex01_default --series last,step50,step150 --only 'temp|itm$|mim$'
    python tools/class_results.py class/ --group 'ex02_*' --json       # the same numbers as JSON

What one run contributes (a quantity a run lacks is left out of n):
    RUN/metrics.jsonl, last log record    every number in it, under its own name: loss/itc, temp, grad_norm, ...
                       --series first,min,max   the same series' first value (loss/itc@first), smallest, largest
                       --series step50          the value logged at step 50 (temp@step50), where the run logged it
    RUN/metrics.jsonl, final record       retrieval/t2i_r1, retrieval/t2i_itc_r1, ... and wall_s
    RUN/**/metrics.json (finetune.py)     ft/TASK/KEY for every number of the report and of its "metrics":
                                          ft/textcls/accuracy, ft/retrieval/t2i_r1, ft/retrieval/wall_s
                                          (TASK: the folder path, without a leading finetune/)

A path is a run folder when it holds metrics.jsonl or config.json, or a folder with a metrics.json
(finetune.py --out_dir DIR writes DIR/TASK/metrics.json); any other folder is searched for run folders below it.

Groups: with --group GLOB (repeatable) a run joins the first pattern its folder name matches (runs that match
none are left out); with --by REGEX the group is the folder name with REGEX removed; otherwise one group, all.
"""
import argparse
import fnmatch
import glob
import json
import math
import os
import re
import sys

SERIES = ("first", "last", "min", "max")


def _numbers(d, prefix=""):
    """{name: float} of every int/float in a (nested) dict; bools and the config are left out."""
    out = {}
    for k, v in d.items():
        if k in ("config", "bad_input", "final"):
            continue
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def is_run(path):
    if os.path.isfile(os.path.join(path, "metrics.jsonl")) or os.path.isfile(os.path.join(path, "config.json")):
        return True
    return any(os.path.isfile(os.path.join(path, c, "metrics.json")) for c in _subdirs(path))


def _subdirs(path):
    try:
        return sorted(c for c in os.listdir(path) if os.path.isdir(os.path.join(path, c)))
    except OSError:
        return []


def find_runs(paths):
    """Run folders under the given paths (a path with * ? [ is expanded here too), in order, without repeats."""
    out = []
    for p in paths:
        for q in (sorted(glob.glob(p)) if glob.has_magic(p) else [p]):
            if not os.path.isdir(q):
                continue
            found = [q] if is_run(q) else find_runs([os.path.join(q, c) for c in _subdirs(q)])
            out += [r for r in found if r not in out]
    return out


def read_run(run_dir, series=("last",)):
    """{quantity: value} of one run folder (see the module docstring)."""
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        logs = [r for r in records if not r.get("final")]
        final = next((r for r in reversed(records) if r.get("final")), None)
        if logs:
            rows = [_numbers(r) for r in logs]
            for name in rows[-1]:
                values = [r[name] for r in rows if name in r]
                picked = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
                picked.update({f"step{int(r['step'])}": r[name] for r in rows if name in r and "step" in r})
                for s in series:
                    if s in picked:
                        out[name if s == "last" else f"{name}@{s}"] = picked[s]
        if final:
            out.update(_numbers({"retrieval": final.get("retrieval", {})}))
            if "wall_s" in final:
                out["wall_s"] = float(final["wall_s"])
    for root, _, files in os.walk(run_dir):
        if "metrics.json" in files and root != run_dir:
            task = os.path.relpath(root, run_dir).replace(os.sep, "/")
            task = task[len("finetune/"):] if task.startswith("finetune/") else task
            report = json.load(open(os.path.join(root, "metrics.json"), encoding="utf-8"))
            if isinstance(report.get("metrics"), dict):  # finetune.report: {"value", "metrics": {name: value}, ...}
                report = {**{k: v for k, v in report.items() if k != "metrics"}, **report["metrics"]}
            out.update({f"ft/{task}/{k}": v for k, v in _numbers(report).items()})
    return out


def group_of(name, globs=(), by=None):
    """The group a run folder's name joins, or None (left out)."""
    if globs:
        return next((g for g in globs if fnmatch.fnmatch(name, g)), None)
    if by:
        return re.sub(by, "", name)
    return "all"


def stats(values):
    """{n, mean, std, min, max}; std is the sample standard deviation (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def pool(run_dirs, globs=(), by=None, only=None, series=("last",)):
    """{group: {quantity: stats}} (groups and quantities sorted by name), and {group: [run folders]}."""
    values, members = {}, {}
    for run in run_dirs:
        g = group_of(os.path.basename(os.path.normpath(run)), globs, by)
        if g is None:
            continue
        members.setdefault(g, []).append(run)
        for q, v in read_run(run, series).items():
            if only is None or re.search(only, q):
                values.setdefault(g, {}).setdefault(q, []).append(v)
    table = {g: {q: stats(vs) for q, vs in sorted(values.get(g, {}).items())} for g in sorted(members)}
    return table, members


def _fmt(x):
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def format_table(table, members):
    lines = []
    for g, rows in table.items():
        lines.append(f"== {g}: {len(members[g])} run(s)")
        width = max([len(q) for q in rows] + [8])
        lines.append(f"{'quantity':<{width}}  {'n':>3}  {'mean':>9}  {'std':>9}  {'min':>9}  {'max':>9}")
        for q, s in rows.items():
            lines.append(f"{q:<{width}}  {s['n']:>3}  " + "  ".join(f"{_fmt(s[k]):>9}" for k in ("mean", "std", "min", "max")))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run folders, or folders that hold run folders (globs allowed)")
    ap.add_argument("--group", action="append", default=[], metavar="GLOB",
                    help="a group per pattern on the run folder's name, e.g. 'ex02_*' (repeatable)")
    ap.add_argument("--by", metavar="REGEX", help="group = the folder name with REGEX removed, e.g. '_s[0-9]+$'")
    ap.add_argument("--only", metavar="REGEX", help="only the quantities whose name REGEX finds")
    ap.add_argument("--series", default="last",
                    help=f"values of each logged series, from {','.join(SERIES)} and stepN (the value logged at step N)")
    ap.add_argument("--json", action="store_true", help="print {group: {quantity: {n, mean, std, min, max}}}")
    args = ap.parse_args(argv)
    if args.group and args.by:
        ap.error("--group and --by are two ways to group: give one")
    series = tuple(s.strip() for s in args.series.split(",") if s.strip())
    if not series or any(s not in SERIES and not re.fullmatch(r"step[0-9]+", s) for s in series):
        ap.error(f"--series takes a comma-separated list from {SERIES} and stepN")
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no run folder under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    table, members = pool(runs, args.group, args.by, args.only, series)
    print(json.dumps(table, indent=1) if args.json else format_table(table, members))
    return 0


if __name__ == "__main__":
    sys.exit(main())
