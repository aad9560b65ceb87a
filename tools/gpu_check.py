"""
One-command GPU check: how fast the base models train on this GPU (eager, compiled, CUDA graphs), how large a
batch fits, and whether the default toy run trains here as it does on a CPU. One report, rewritten after every
measurement, so a run cut short still leaves one.

    python tools/gpu_check.py                       # one H100/H200: at most 8 minutes
    python tools/gpu_check.py --out $OUT --budget_s 400
    OMP_NUM_THREADS=2 python tools/gpu_check.py --device cpu --configs tiny --batch 4 --compile_backend aot_eager \\
        --iters 2 --warmup 1 --max_batch_search off --toy_steps 10       # a dry run on a CPU: 3-6 minutes

What it measures, most important first:
  1. The device: name, memory, torch, CUDA, driver (nvidia-smi), and a measured bf16 matmul rate (--matmul_n
     cubed) beside the peak of bench_meters.PEAK_FLOPS that MFU divides by.
  2. For each preset (--configs) and recipe (--recipes), at --batch per stream, with bf16 autocast: one full
     training step on a fixed synthetic batch of every data kind (tools/bench.py's bench_step: the forward of
     every loss, backward of their sum, clipping, fused AdamW) in each mode of --modes:
       eager    no compile; also the aten ops one step dispatches, µs per op and the host syncs with their
                source lines (lib/opcount.DispatchCounter)
       step     the step's loss module (train.LossModel) compiled with runtime.compile_step, mode "default"
       graphs   the same in mode "reduce-overhead": the step replayed as CUDA graphs
     Columns: median step ms, samples/s, peak memory (torch.cuda.max_memory_allocated), TFLOP/s and MFU (FLOPs
     per step, analytic for X-FM and counted by torch for FLAVA, / step time / the table's peak), the warm-up
     (for the compiled modes: the compile), and for the compiled modes TorchDynamo's counters: graph breaks
     (with their reasons), graphs, and recompiles (frames compiled after the first step of a fixed batch).
  3. The toy run: `python train.py --device cuda --out_dir ...` (the default tiny X-FM on the toy world, which
     train.py builds if missing) end to end, with its zero-shot text-to-image R@1 (from its metrics.jsonl).
     1-2 minutes on a GPU, so it comes after the rows at --batch (--toy_first: before them).
  4. The largest batch per stream that fits (eager: doubling from --batch until out of memory, then bisecting
     twice), timed in every mode.
Each measurement runs in its own process (--isolate; its log in --out/logs/) under a time limit (--row_limit_s),
so a crash, a broken CUDA context or a hung compile costs that row alone; it starts only if the --budget_s
deadline leaves it time (else it is marked skipped); one that fails is recorded with its error and the rest
still run; at --hard_limit_s, or on SIGTERM, the report is written and the process ends. Writes
--out/gpu_check.md and gpu_check.json (and the toy run's metrics.jsonl and config.json under toy/); the Markdown
is printed at the end. docs/PERFORMANCE.md takes its GPU figures from this report.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench  # noqa: E402
from bench_meters import free, peak_flops  # noqa: E402

MODES = {"eager": "off", "blocks": "blocks", "step": "step", "graphs": "graphs"}  # our mode -> bench_step's compile=
LOOP_MODES = ("eager", "blocks")   # train.py's loop: eager, or --compile (each kind of block compiled once)
# seconds a measurement needs at least (base on an H100), so that none starts when the deadline is nearer
NEEDS_S = {"eager": 20, "blocks": 40, "step": 60, "graphs": 60, "loop": 60, "toy": 60, "search": 40}


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def short(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ---------------------------------------------------------------------------------------------------------
# The report: every requested row from the start (pending), filled in as the measurements finish


class Report:
    def __init__(self, out_dir, command, budget_s):
        self.out_dir, self.t0, self.budget_s, self.lock = out_dir, time.time(), budget_s, threading.Lock()
        self.child = None                                   # the toy run's process while it runs
        self.data = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "state": "running",
                     "device": {}, "rows": [], "search": [], "toy": None, "notes": []}
        os.makedirs(out_dir, exist_ok=True)

    def elapsed(self):
        return time.time() - self.t0

    def left(self):
        return self.budget_s - self.elapsed()

    def log(self, text):
        print(f"[{time.strftime('%H:%M:%S')} {self.elapsed():6.1f} s] {text}", flush=True)

    def note(self, text):
        self.data["notes"].append(text)
        self.log("note: " + text)

    def write(self):
        with self.lock:
            self.data["elapsed_s"] = self.elapsed()
            with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            with open(os.path.join(self.out_dir, "gpu_check.md"), "w") as f:
                f.write(self.markdown() + "\n")

    def markdown(self):
        d, dev = self.data, self.data["device"]
        lines = ["# GPU check (tools/gpu_check.py)", "", f"- command: `{d['command']}`",
                 f"- started {d['started']}; {d['elapsed_s']:.0f} s elapsed of the {self.budget_s:.0f} s budget; "
                 f"state: {d['state']}"]
        if dev:
            lines.append(f"- device: {dev.get('name')} ({dev.get('device')}), {fmt(dev.get('memory_gb'))} GB, "
                         f"{dev.get('sms', 'n/a')} SMs, capability {dev.get('capability', 'n/a')}; driver "
                         f"{dev.get('driver', 'n/a')}; torch {dev.get('torch')}, CUDA {dev.get('cuda')}, Python "
                         f"{dev.get('python')}, {dev.get('cpus')} CPUs")
            if "matmul_tflops" in dev:
                peak = dev.get("peak_tflops")
                lines.append(f"- bf16 matmul {dev['matmul_n']}^3: {dev['matmul_tflops']:.1f} TFLOP/s measured; "
                             f"table peak (MFU's denominator) " + (f"{peak:.0f} TFLOP/s, measured = "
                                                                   f"{100 * dev['matmul_tflops'] / peak:.0f} % of it"
                                                                   if peak else "n/a (device not in PEAK_FLOPS)"))
            elif "matmul_error" in dev:
                lines.append(f"- bf16 matmul: {dev['matmul_error']}")
        lines += ["", "## Training step", "", step_table(d["rows"]), "",
                  "step ms: median of the timed steps; samples = pairs + region captions + images + texts; MFU = "
                  "FLOPs per step (analytic for X-FM, torch's counter for FLAVA; 'scaled': counted at another batch "
                  "and scaled by the batch) / step ms / the table peak; warm-up s: the untimed first steps (compile "
                  "included); aten ops and host syncs: one eager forward + backward (optimizer left out); "
                  "recompiles: frames compiled after the first step (n/a with one step)."]
        syncs = [f"- {r['config']} {r['recipe']} batch {r['batch']}: " +
                 ", ".join(f"{k} x{n}" for k, n in sorted(r["sync_sites"].items(), key=lambda kv: -kv[1]))
                 for r in d["rows"] if r.get("sync_sites")]
        if syncs:
            lines += ["", "Host syncs by source line (eager):", ""] + syncs
        loops = [r for r in d["rows"] if r["mode"].startswith("loop") and r.get("profile")]
        if loops:
            lines += ["", "train.py's step (loop rows: `" + loops[0].get("argv", "") + "`, under a 1-rank torchrun "
                      "group): host syncs in one step (CUDA: torch.cuda.set_sync_debug_mode's warnings), GPU busy "
                      "share and top kernels over 3 profiled steps:", ""]
            lines += [f"- {r['config']} {r['recipe']} {r['mode']}: syncs {r.get('syncs')}, GPU busy "
                      + (f"{100 * r['profile']['busy_share']:.0f} %" if r["profile"].get("busy_share") is not None
                         else "n/a") + "; top: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in r["profile"]["top"])
                      for r in loops]
        breaks = [f"- {r['config']} {r['recipe']} {r['mode']} batch {r['batch']}: " +
                  "; ".join(f"{k} x{n}" for k, n in list(r["dynamo"]["break_reasons"].items())[:8])
                  for r in d["rows"] if r.get("dynamo", {}).get("break_reasons")]
        if breaks:
            lines += ["", "Graph breaks by reason (compiled modes, most frequent first):", ""] + breaks
        if d["search"]:
            lines += ["", "## Largest batch per stream (eager, bf16)", ""]
            lines += [f"- {s['config']} {s['recipe']}: " + ", ".join(f"{b} {'fits' if ok else 'out of memory'}"
                                                                     for b, ok in s["tried"])
                      + f" -> largest that fits: {s.get('largest', 'n/a')}"
                      + (f" ({s['note']})" if s.get("note") else "") for s in d["search"]]
        if d["toy"]:
            t = d["toy"]
            lines += ["", "## Toy run (train.py defaults: tiny X-FM, toy world)", "", f"`{t['command']}`", "",
                      md_table(["status", "wall s", "steps", "s/step (last log)", "text->image R@1 %",
                                "image->text R@1 %", "chance R@1 %"],
                               [[t["status"], fmt(t.get("wall_s")), t.get("steps", "n/a"), fmt(t.get("s_per_step"), 3),
                                 fmt(t.get("t2i_r1")), fmt(t.get("i2t_r1")), fmt(t.get("chance_r1"))]])]
            if t["status"] != "ok" and t.get("tail"):
                lines += ["", "Last lines of its output:", "", "```", t["tail"], "```"]
        if d["notes"]:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in d["notes"]]
        return "\n".join(lines)


def fmt(v, digits=1):
    return "n/a" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def md_table(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def step_table(rows):
    headers = ["config", "recipe", "batch", "mode", "status", "step ms", "samples/s", "peak mem GB", "TFLOP/s", "MFU",
               "warm-up s", "aten ops", "µs/op", "host syncs", "graph breaks", "graphs", "recompiles"]
    out = []
    for r in rows:
        dyn = r.get("dynamo", {})
        mfu = f"{100 * r['mfu']:.1f} %" + (" (scaled)" if r.get("flops_scaled") else "") if r.get("mfu") else "n/a"
        out.append([r["config"], r["recipe"], r["batch"], r["mode"], r["status"], fmt(r.get("step_ms_median")),
                    fmt(r.get("samples_per_s_median")),
                    fmt(r["peak_mem_mb"] / 1024, 2) if r.get("peak_mem_mb") is not None else "n/a",
                    fmt(r.get("tflops_per_s_median")), mfu, fmt(r.get("warmup_s")), fmt(r.get("ops")),
                    fmt(r.get("us_per_op_median")), fmt(r.get("syncs")), fmt(dyn.get("graph_breaks")),
                    fmt(dyn.get("graphs")), fmt(dyn.get("recompiles"))])
    return md_table(headers, out)


# ---------------------------------------------------------------------------------------------------------
# The measurements


def device_info(device, matmul_n, reps=10):
    """Name, memory, versions, driver and a measured bf16 matmul rate (n x n @ n x n, `reps` timed after 2)."""
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), memory_gb=p.total_memory / 2 ** 30,
                    sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    peak_tflops=(peak_flops(torch.cuda.get_device_name(device), "bf16") or 0) / 1e12 or None)
        if shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                                    "--format=csv,noheader", "-i", str(device.index or 0)],
                                   capture_output=True, text=True, timeout=20)
                info["driver"], info["power_limit"], info["max_sm_clock"] = \
                    ([s.strip() for s in q.stdout.strip().split(",")] + ["n/a"] * 3)[:3]
            except Exception as e:  # noqa: BLE001  (a report line, not a failure)
                info["driver"] = f"nvidia-smi failed: {short(e)}"
        else:
            info["driver"] = "nvidia-smi not found"
    else:
        info.update(name=platform.processor() or platform.machine(), memory_gb=None)
    try:
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        times = []
        for i in range(2 + reps):
            bench.sync(device)
            t = time.perf_counter()
            a @ b
            bench.sync(device)
            times.append(time.perf_counter() - t)
        info["matmul_n"] = matmul_n
        info["matmul_tflops"] = 2 * matmul_n ** 3 / statistics.median(times[2:]) / 1e12
        del a, b
    except Exception as e:  # noqa: BLE001
        info["matmul_error"] = short(e)
    free(device)
    return info


def step_row(config, recipe, mode, batch):
    return {"config": config, "recipe": recipe, "mode": mode, "batch": batch, "status": "pending"}


def run_spec(spec):
    """One measurement, in this process: spec["kind"] "step" (bench_step's row in spec["mode"]) or "probe"
    (whether one eager step at spec["batch"] fits in memory). -> {"status": "ok", "row": ...} or the failure
    ({"status": "out of memory" | "failed: ...", "traceback": ...}); the compiled graphs and the memory are
    freed either way."""
    device = torch.device(spec["device"])
    probe = spec["kind"] == "probe"
    try:
        row = bench.bench_step(spec["recipe"], spec["config"], device, spec["batch"], spec["dtype"], "sdpa",
                               "off" if probe else MODES[spec["mode"]], 1 if probe else spec["iters"],
                               1 if probe else spec["warmup"], count=spec.get("count", False),
                               backend=spec["backend"])
        result = {"status": "ok", "row": {"fits": True} if probe else row}
    except Exception as e:  # noqa: BLE001  (recorded; the other measurements still run)
        result = {"status": "ok", "row": {"fits": False}} if probe and is_oom(e) else \
            {"status": "out of memory" if is_oom(e) else f"failed: {short(e)}",
             "traceback": traceback.format_exc()[-4000:]}
    torch._dynamo.reset()  # (after the except block, so the traceback's frames and their tensors are gone)
    free(device)
    return result


class LoopMeter:
    """Stands in for train.py's progress bar in run_loop: its update(1) ends a step. After `warmup` steps: one step
    under the sync check (CUDA: torch.cuda.set_sync_debug_mode "warn", its warnings counted; a CPU: the ops that
    would make a GPU host wait, lib/opcount.DispatchCounter), then `profiled` steps under torch.profiler, then
    `iters` timed steps (the device synchronised at each step's end)."""

    def __init__(self, device, warmup, profiled, iters):
        self.device, self.warmup, self.profiled, self.iters = device, warmup, profiled, iters
        self.step, self.marks, self.syncs, self.sync_sites, self.profile = 0, [], None, {}, None

    def __call__(self, *args, **kwargs):  # tqdm(total=..., ...) -> the bar
        return self

    def update(self, n):
        import warnings
        self.step += 1
        if self.step == self.warmup:  # the sync check's step starts
            if self.device.type == "cuda":
                self.caught = warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            else:
                from lib.opcount import DispatchCounter
                self.counter = DispatchCounter().__enter__()
        elif self.step == self.warmup + 1:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                self.caught.__exit__(None, None, None)
                self.syncs = sum("synchronizing" in str(w.message) for w in self.records)
            else:
                self.counter.__exit__(None, None, None)
                self.syncs, self.sync_sites = self.counter.syncs, self.counter.sync_sites
            activities = [torch.profiler.ProfilerActivity.CPU] + \
                ([torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.t_profile = time.perf_counter()
        elif self.step == self.warmup + 1 + self.profiled:
            bench.sync(self.device)
            wall = time.perf_counter() - self.t_profile
            self.profiler.__exit__(None, None, None)
            self.profile = profile_summary(self.profiler, wall, self.device)
            self.marks.append(time.perf_counter())
        elif self.step > self.warmup + 1 + self.profiled:
            bench.sync(self.device)
            self.marks.append(time.perf_counter())

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def profile_summary(profiler, wall_s, device, top=5):
    """GPU busy share (kernel time / wall time of the profiled steps) and the top kernels (CPU: the top ops)."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: -getattr(e, key))
    busy = sum(getattr(e, key) for e in events) / 1e6 / wall_s if device.type == "cuda" else None
    return {"busy_share": busy, "wall_s": wall_s,
            "top": [(e.key[:60], getattr(e, key) / 1e3) for e in events[:top]]}


def run_loop(spec):
    """train.py itself, in this process, as under `torchrun --nproc_per_node=1` (a 1-rank group: DDP wraps the
    model as on a node): spec["config"] and spec["recipe"] on the toy world at spec["batch"] per stream, the fast
    path, --compile in mode "blocks"; the real step (the recipe's updates, the non-finite check, clipping, fused
    AdamW, DDP), timed as LoopMeter says. -> {"status": "ok", "row": ...} or the failure."""
    import socket
    import train
    from lib import opcount, runtime
    device = torch.device(spec["device"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    meter = LoopMeter(device, spec["warmup"], spec.get("profiled", 3), spec["iters"])
    steps = spec["warmup"] + 1 + meter.profiled + spec["iters"]
    fetch = runtime.next_batches
    runtime.next_batches = lambda *a: opcount.uncounted(fetch(*a))   # (the data fetch is not sync-checked)
    train.tqdm = meter
    out_dir = tempfile.mkdtemp(prefix="gpu_check_loop_")
    argv = ["--config", spec["config"], "--recipe", spec["recipe"], "--device", device.type, "--out_dir", out_dir,
            "--batch_size", str(spec["batch"]), "--max_steps", str(steps), "--log_every", str(steps),
            "--ckpt_every", str(steps), "--losses", "fast", "--num_workers", str(spec.get("workers", 4)),
            "--compile", str(spec["mode"] == "blocks").lower()]
    argv += ["--data_dir", spec["data_dir"]] if spec.get("data_dir") else []   # (default: the toy world)
    argv += spec.get("extra", [])
    try:
        train.main(argv)
        records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
        log = [r for r in records if not r.get("final")][-1]
        gaps = [b - a for a, b in zip(meter.marks, meter.marks[1:])]
        ms = statistics.median(gaps) * 1e3
        row = {"step_ms_median": ms, "samples_per_step": log["samples_per_s"] * log["s_per_step"],
               "syncs": meter.syncs, "sync_sites": meter.sync_sites, "profile": meter.profile, "warmup_s": None, "argv": " ".join(argv),
               "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}
        result = {"status": "ok", "row": row}
    except BaseException as e:  # noqa: BLE001  (SystemExit included: train.py's refusals)
        result = {"status": "out of memory" if is_oom(e) else f"failed: {short(e)}",
                  "traceback": traceback.format_exc()[-4000:]}
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def run(spec, args, report, limit_s):
    """run_spec(spec) in a child process (--isolate on: a crash, a hung compile or a broken CUDA context ends
    there, and a time limit can stop it; its output goes to --out/logs/) or in this one."""
    if not args.isolate:
        return run_loop(spec) if spec["kind"] == "loop" else run_spec(spec)
    os.makedirs(os.path.join(report.out_dir, "logs"), exist_ok=True)
    name = "_".join(str(spec[k]) for k in ("kind", "config", "recipe", "mode", "batch") if k in spec)
    log_path, result_path = (os.path.join(report.out_dir, "logs", name + ext) for ext in (".log", ".result.json"))
    if os.path.exists(result_path):
        os.remove(result_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--out",
                                 result_path], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        report.child, timed_out = proc, False
        try:
            proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            timed_out = True
        report.child = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        os.remove(result_path)
        return result
    tail = "".join(open(log_path, errors="replace").readlines()[-15:])
    why = f"stopped at its {limit_s:.0f} s limit" if timed_out else f"failed: exit code {proc.returncode}" + \
        (" (killed: out of host memory?)" if proc.returncode == -9 else "")
    return {"status": why, "traceback": tail}


def start_row(row, need_s, args, report):
    """-> (the row's name, its time limit), the row marked running; or (name, None), the row skipped when the
    deadline leaves it less than need_s."""
    name = f"{row['config']} {row['recipe']} batch {row['batch']} {row['mode']}"
    if report.left() < need_s:
        row["status"] = f"skipped: {report.left():.0f} s left of the budget"
        report.log(f"{name}: {row['status']}")
        return name, None
    limit = min(args.row_limit_s, report.left())
    report.log(f"{name} (limit {limit:.0f} s) ...")
    row["status"] = "running"
    report.write()
    return name, limit


def measure_loop(row, device, args, report, flops_from=None):
    """Fill `row` (mode "loop eager" or "loop blocks") with run_loop's figures: train.py's real step."""
    mode = row["mode"]
    name, limit = start_row(row, NEEDS_S["loop"], args, report)
    if limit is None:
        return row
    spec = dict(kind="loop", device=str(device), recipe=row["recipe"], config=row["config"], batch=row["batch"],
                mode=mode.split()[1], iters=args.iters, warmup=max(args.warmup, 3), workers=args.loop_workers)
    result = run(spec, args, report, limit)
    if result["status"] != "ok":
        row.update(status=result["status"], traceback=result.get("traceback"))
    else:
        r = result["row"]
        row.update(r, mode=mode, status="ok")
        ms = r["step_ms_median"]
        row["samples_per_s_median"] = r["samples_per_step"] / ms * 1e3
        flops = flops_from and flops_from["flops"] * row["batch"] / flops_from["batch"]
        row["tflops_per_s_median"] = flops / ms / 1e9 if flops else None
        peak = peak_flops(report.data["device"].get("name", ""), args.dtype) if device.type == "cuda" else None
        row["mfu"] = row["tflops_per_s_median"] * 1e12 / peak if flops and peak else None
        busy = (r.get("profile") or {}).get("busy_share")
        report.log(f"{name}: {ms:.1f} ms/step, {row['samples_per_s_median']:.0f} samples/s, host syncs {r['syncs']}"
                   + (f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") else "")
                   + (f", GPU busy {100 * busy:.0f} %" if busy is not None else ""))
    report.write()
    return row


def measure_step(row, device, args, report, flops_from=None):
    """Fill `row` with bench_step's figures in its mode; a failure (out of memory, a compile error, the time
    limit) is written in the row's status and the run goes on."""
    mode = row["mode"]
    name, limit = start_row(row, NEEDS_S[mode], args, report)
    if limit is None:
        return row
    spec = dict(kind="step", device=str(device), recipe=row["recipe"], config=row["config"], batch=row["batch"],
                mode=mode, dtype=args.dtype, iters=args.iters, backend=args.compile_backend,
                warmup=args.warmup if mode == "eager" else max(args.warmup, 3),  # compile, (re)compile/record, replay
                count=mode == "eager" and row["recipe"] == "flava")  # (X-FM's FLOPs are analytic)
    result = run(spec, args, report, limit)
    if result["status"] != "ok":
        row.update(status=result["status"], traceback=result.get("traceback"))
        report.log(f"{name}: {row['status']}")
        report.write()
        return row
    try:  # (a row that cannot be summarised is a failure of this row only)
        r = result["row"]
        row.update(r, mode=mode, status="ok")
        flops = r.get("flops_analytic") or r.get("flops_counted")
        if not flops and flops_from:  # the same step's count at this batch, or at another batch scaled
            flops = flops_from["flops"] * row["batch"] / flops_from["batch"]
            row["flops_scaled"] = flops_from["batch"] != row["batch"]
        ms = r["step_ms_median"]
        row["samples_per_s_median"] = r["samples_per_step"] / ms * 1e3
        row["tflops_per_s_median"] = flops / ms / 1e9 if flops else None
        peak = peak_flops(report.data["device"].get("name", ""), args.dtype) if device.type == "cuda" else None
        row["mfu"] = row["tflops_per_s_median"] * 1e12 / peak if flops and peak else None
        if r.get("ops"):
            row["us_per_op_median"] = ms * 1e3 / r["ops"]
        report.log(f"{name}: {ms:.1f} ms/step, {row['samples_per_s_median']:.0f} samples/s, peak "
                   f"{r['peak_mem_mb'] / 1024:.2f} GB, warm-up {r['warmup_s']:.1f} s"
                   + (f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") else "")
                   + (f", graph breaks {r['dynamo']['graph_breaks']}, recompiles {r['dynamo']['recompiles']}"
                      if "dynamo" in r else ""))
    except Exception as e:  # noqa: BLE001
        row.update(status=f"failed: summary: {short(e)}", traceback=traceback.format_exc()[-4000:])
        report.log(f"{name}: {row['status']}")
    report.write()
    return row


def find_max_batch(fits, start, known_fits=False, doublings=4, bisections=2, multiple=8, time_left=lambda: 1e9,
                   tried=None):
    """The largest batch for which fits(B) is True (False: out of memory): double from `start` until one does not
    fit (at most `doublings` times), then bisect between the last that fit and the first that did not,
    `bisections` times, on multiples of `multiple`. Stops early when time_left() reaches 0. -> (largest or None,
    `tried`: the list, appended to as it goes, of (B, fits) in the order tried)."""
    tried = [] if tried is None else tried

    def probe(B):
        ok = bool(fits(B))
        tried.append((B, ok))
        return ok

    lo, hi = (start, None) if known_fits or probe(start) else (None, start)
    while lo is None and hi > 1 and time_left() > 0:        # even the start does not fit: halve
        B = hi // 2
        lo, hi = (B, hi) if probe(B) else (None, B)
    for _ in range(doublings if lo is not None else 0):
        if hi is not None or time_left() <= 0:
            break
        if probe(2 * lo):
            lo = 2 * lo
        else:
            hi = 2 * lo
    for _ in range(bisections if lo is not None and hi is not None else 0):
        mid = (lo + hi) // 2 // multiple * multiple if hi - lo > 2 * multiple else (lo + hi) // 2
        if mid <= lo or time_left() <= 0:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


def fits_on_device(recipe, config, device, args, report=None):
    """fits(B) for find_max_batch: whether one eager step (after one warm-up step) at batch B fits in memory; a
    failure other than out-of-memory raises."""
    def fits(B):
        spec = dict(kind="probe", device=str(device), recipe=recipe, config=config, batch=B, dtype=args.dtype,
                    backend=args.compile_backend)
        result = run(spec, args, report, min(args.row_limit_s, report.left()) if report else args.row_limit_s)
        if result["status"] != "ok":
            raise RuntimeError(f"batch {B}: {result['status']}")
        if report:
            report.log(f"  batch {B}: {'fits' if result['row']['fits'] else 'out of memory'}")
        return result["row"]["fits"]
    return fits


def toy_run(args, report, device):
    """`python train.py --device ... --out_dir <tmp>` end to end, in a child process with a time limit; its
    zero-shot retrieval R@1 from the final record of its metrics.jsonl (also copied to --out/toy/)."""
    run_dir = tempfile.mkdtemp(prefix="gpu_check_toy_")
    cmd = [sys.executable, "train.py", "--device", device.type, "--out_dir", run_dir]
    cmd += ["--max_steps", str(args.toy_steps)] if args.toy_steps else []
    toy = {"command": " ".join(["python"] + cmd[1:]), "status": "running"}
    report.data["toy"] = toy
    limit = min(args.toy_timeout_s, report.left() - 5)
    if limit < NEEDS_S["toy"] / 2:
        toy["status"] = f"skipped: {report.left():.0f} s left of the budget"
        report.log(f"toy run: {toy['status']}")
        return toy
    report.log(f"toy run (limit {limit:.0f} s): {toy['command']}")
    report.write()
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report.child = proc
    try:
        output, _ = proc.communicate(timeout=limit)
        toy["status"] = "ok" if proc.returncode == 0 else f"failed: exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        toy["status"] = f"stopped at its {limit:.0f} s limit"
    report.child = None
    toy["wall_s"] = time.time() - t
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    toy["tail"] = "\n".join(lines[-15:])
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        records = [json.loads(line) for line in open(metrics)]
        final = next((r for r in records if r.get("final")), {})
        logs = [r for r in records if not r.get("final")]
        ret = final.get("retrieval", {})
        toy.update(steps=final.get("step"), train_wall_s=final.get("wall_s"), t2i_r1=ret.get("t2i_r1"),
                   i2t_r1=ret.get("i2t_r1"), t2i_itc_r1=ret.get("t2i_itc_r1"), chance_r1=ret.get("t2i_chance_r1"),
                   s_per_step=logs[-1]["s_per_step"] if logs else None, final=final)
        os.makedirs(os.path.join(report.out_dir, "toy"), exist_ok=True)
        for name in ("metrics.jsonl", "config.json"):
            if os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy(os.path.join(run_dir, name), os.path.join(report.out_dir, "toy", name))
    shutil.rmtree(run_dir, ignore_errors=True)
    report.log(f"toy run: {toy['status']} in {toy['wall_s']:.0f} s, text->image R@1 {fmt(toy.get('t2i_r1'))}")
    return toy


def stopper(report, exit=os._exit):
    """stop(why): the running measurement and the toy run are marked, the child process ended, the report written
    and printed, and this process ends (os._exit: whatever the main thread is doing, a compile included)."""
    def stop(why):
        for row in report.data["rows"]:
            if row["status"] == "running":
                row["status"] = why
        if report.data["toy"] and report.data["toy"]["status"] == "running":
            report.data["toy"]["status"] = why
        if report.child is not None:
            try:
                os.killpg(report.child.pid, 9)
            except OSError:
                pass  # (it ended on its own meanwhile)
        report.data["state"] = why
        report.write()
        print("\n" + report.markdown(), flush=True)
        exit(3)
    return stop


def start_watchdog(report, hard_limit_s, exit=os._exit):
    """At the hard limit, and on SIGTERM (a caller's time limit), stop: the report is written, the process ends."""
    stop = stopper(report, exit)
    timer = threading.Timer(hard_limit_s, stop, args=(f"stopped at the hard limit ({hard_limit_s:.0f} s)",))
    timer.daemon = True
    timer.start()
    timer.sigterm = None
    if threading.current_thread() is threading.main_thread():
        timer.sigterm = signal.signal(signal.SIGTERM, lambda *_: stop("stopped by SIGTERM"))  # (the previous one)
    return timer


def stop_watchdog(timer):
    timer.cancel()
    if timer.sigterm is not None:
        signal.signal(signal.SIGTERM, timer.sigterm)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    onoff = lambda s: {"on": True, "off": False}[s]  # noqa: E731
    p.add_argument("--out", default="runs/gpu_check", help="folder of gpu_check.md and gpu_check.json")
    p.add_argument("--budget_s", type=float, default=450, help="no measurement starts that this deadline (seconds "
                                                               "from the start) leaves too little time for")
    p.add_argument("--hard_limit_s", type=float, default=0, help="write the report and end here, whatever is "
                                                                 "running (0: budget_s + 30)")
    p.add_argument("--device", default="cuda", help="cuda | cpu (a dry run)")
    p.add_argument("--configs", default="base", help="model presets, comma-separated")
    p.add_argument("--recipes", default="xfm,flava", help="xfm and/or flava")
    p.add_argument("--batch", type=int, default=32, help="per-stream batch of the main rows")
    p.add_argument("--modes", default="eager,blocks", help="bench's step (one summed update on a synthetic batch): "
                                                         "eager, blocks (each kind of block compiled once, as "
                                                         "train.py --compile), step (the whole step compiled), "
                                                         "graphs (step as CUDA graphs)")
    p.add_argument("--loop", default="eager,blocks", help="train.py's own step on the toy world (its updates, the "
                                                        "loop, a 1-rank DDP), eager and/or blocks (--compile); "
                                                        "off: none")
    p.add_argument("--loop_workers", type=int, default=4, help="DataLoader workers of the loop rows")
    p.add_argument("--dtype", default="bf16", help="autocast dtype: bf16 | fp16 | fp32")
    p.add_argument("--iters", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3 in a compiled mode)")
    p.add_argument("--compile_backend", default="inductor", help="inductor (through runtime.compile_step) | "
                                                                 "aot_eager | eager (tracing alone, for a CPU)")
    p.add_argument("--max_batch_search", type=onoff, default=True, metavar="on|off",
                   help="find the largest batch that fits and time it in every mode")
    p.add_argument("--skip_toy", action="store_true", help="no toy run")
    p.add_argument("--toy_first", action="store_true", help="the toy run before the step rows (default: after the "
                                                               "rows at --batch, before the largest batch)")
    p.add_argument("--toy_steps", type=int, default=0, help="--max_steps of the toy run (0: train.py's default)")
    p.add_argument("--toy_timeout_s", type=float, default=240, help="the toy run's own time limit")
    p.add_argument("--isolate", type=onoff, default=True, metavar="on|off",
                   help="each measurement in its own process (a crash or a hung compile ends there; logs in "
                        "--out/logs/); off: all in this one")
    p.add_argument("--row_limit_s", type=float, default=240, help="time limit of one measurement (with --isolate)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # a measurement's spec (JSON): run it, write
    # its result to --out, exit (what --isolate starts)
    p.add_argument("--matmul_n", type=int, default=0, help="size of the matmul rate check (0: 8192 on CUDA, "
                                                           "1024 on a CPU)")
    args = p.parse_args(argv)
    for m in args.modes.split(","):
        if m not in MODES:
            p.error(f"unknown mode {m!r} (eager, blocks, step, graphs)")
    for m in args.loop.split(",") if args.loop != "off" else ():
        if m not in LOOP_MODES:
            p.error(f"unknown loop mode {m!r} (eager, blocks, or off)")
    for r in args.recipes.split(","):
        if r not in bench.RECIPES:
            p.error(f"unknown recipe {r!r} (xfm, flava)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:  # a child process of --isolate: one measurement, its result as JSON
        spec = json.loads(args.worker)
        result = run_loop(spec) if spec["kind"] == "loop" else run_spec(spec)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, default=str)
        os.replace(args.out + ".tmp", args.out)
        return result
    device = torch.device(args.device)
    configs, recipes, modes = args.configs.split(","), args.recipes.split(","), args.modes.split(",")
    report = Report(args.out, "python tools/gpu_check.py" + "".join(" " + a for a in argv), args.budget_s)
    rows = report.data["rows"]
    rows += [step_row(c, r, m, args.batch) for c in configs for r in recipes for m in modes]
    rows += [step_row(c, r, "loop " + m, args.batch) for c in configs for r in recipes
             for m in (args.loop.split(",") if args.loop != "off" else ())]
    if args.max_batch_search:
        rows += [step_row(c, r, m, "largest") for c in configs for r in recipes for m in modes]
    watchdog = start_watchdog(report, args.hard_limit_s or args.budget_s + 30)
    try:
        check(args, report, device, configs, recipes, modes)
        report.data["state"] = "finished"
    except BaseException as e:  # a bug of this script, or Ctrl-C: the report says so, with what was measured
        report.data["state"] = f"crashed: {short(e)}"
        report.data["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        stop_watchdog(watchdog)
        report.write()
        print("\n" + report.markdown(), flush=True)
        print(f"\nwrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json", flush=True)
    return report.data


def check(args, report, device, configs, recipes, modes):
    """The measurements, most important first (see the module docstring), each written to the report."""
    rows = report.data["rows"]
    report.log(f"gpu_check: {len(rows)} step rows, toy run {'off' if args.skip_toy else 'on'}, budget "
               f"{args.budget_s:.0f} s; writing {args.out}/gpu_check.md")

    # ---- 1: the device ------------------------------------------------------------------------------------
    try:
        report.data["device"] = device_info(device, args.matmul_n or (8192 if device.type == "cuda" else 1024))
    except Exception as e:  # noqa: BLE001
        report.data["device"] = {"device": str(device), "name": "?", "error": short(e)}
        report.note(f"device information failed: {short(e)}")
    dev = report.data["device"]
    report.log(f"device: {dev.get('name')}, torch {dev.get('torch')}, CUDA {dev.get('cuda')}, driver "
               f"{dev.get('driver', 'n/a')}, bf16 matmul {fmt(dev.get('matmul_tflops'))} TFLOP/s (table peak "
               f"{fmt(dev.get('peak_tflops'), 0)})")
    if device.type == "cuda" and not dev.get("peak_tflops"):
        report.note(f"{dev.get('name')} is not in bench_meters.PEAK_FLOPS: no MFU")
    report.write()

    # ---- 3: the toy run (1-2 minutes on a GPU: after the rows at --batch, before the search, which matters
    # less; --toy_first: before the rows) -------------------------------------------------------------------
    def toy():
        try:
            free(device)
            report.data["toy"] = toy_run(args, report, device)
        except Exception as e:  # noqa: BLE001
            report.data["toy"] = {**(report.data["toy"] or {"command": "train.py"}), "status": f"failed: {short(e)}"}
            report.log(f"toy run: failed: {short(e)}")
        report.write()

    if args.toy_first and not args.skip_toy:
        toy()

    # ---- 2: the step at --batch, every preset, recipe and mode ---------------------------------------------
    counted = {}  # (config, recipe, batch) -> FLOPs per step, for the rows that do not count them
    for row in [r for r in rows if r["batch"] == args.batch and not r["mode"].startswith("loop")]:
        key = (row["config"], row["recipe"], row["batch"])
        measure_step(row, device, args, report, flops_from=counted.get(key))
        flops = row.get("flops_analytic") or row.get("flops_counted")
        if row["status"] == "ok" and flops and key not in counted:
            counted[key] = {"flops": flops, "batch": row["batch"]}

    # ---- 2b: train.py's own step (the recipe's updates, the loop, DDP), with the same FLOPs per step ---------
    for row in [r for r in rows if r["mode"].startswith("loop")]:
        measure_loop(row, device, args, report, flops_from=counted.get((row["config"], row["recipe"], row["batch"])))

    if not args.toy_first and not args.skip_toy:
        toy()

    # ---- 4: the largest batch, then every mode at it -------------------------------------------------------
    for config in configs if args.max_batch_search else ():
        for recipe in recipes:
            search = {"config": config, "recipe": recipe, "tried": []}
            report.data["search"].append(search)
            largest = None
            if report.left() < NEEDS_S["search"]:
                search["note"] = f"skipped: {report.left():.0f} s left of the budget"
            else:
                report.log(f"largest batch: {config} {recipe} from {args.batch} ...")
                base_ok = any(r["status"] == "ok" for r in rows if (r["config"], r["recipe"], r["batch"], r["mode"])
                              == (config, recipe, args.batch, "eager"))
                try:
                    largest, _ = find_max_batch(fits_on_device(recipe, config, device, args, report), args.batch,
                                                known_fits=base_ok, tried=search["tried"],
                                                time_left=lambda: report.left() - NEEDS_S["search"])
                    search["largest"] = largest
                    if search["tried"] and all(ok for _, ok in search["tried"]):
                        search["note"] = "every batch tried fits: the largest is larger still"
                except Exception as e:  # noqa: BLE001
                    search["note"] = f"failed: {short(e)}"
                report.log(f"largest batch: {config} {recipe}: {search}")
            for row in [r for r in rows if (r["config"], r["recipe"], r["batch"]) == (config, recipe, "largest")]:
                if largest is None or largest == args.batch:
                    row["status"] = "skipped: " + (f"the largest batch is --batch ({largest})" if largest else
                                                   "no largest batch (" + search.get("note", "none fits") + ")")
                    continue
                row["batch"] = largest
                flops_from = counted.get((config, recipe, largest)) or counted.get((config, recipe, args.batch))
                measure_step(row, device, args, report, flops_from=flops_from)
            report.write()


if __name__ == "__main__":
    main()
