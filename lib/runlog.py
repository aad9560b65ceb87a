"""
A training run's folder and what it reports (train.py): Meter turns the losses of the updates since the last log
into one metrics.jsonl record (averaged over the ranks), and print_summary prints the end-of-run summary: the
losses from the first log to the last, zero-shot retrieval, bad input skipped. The run folder's rules (docs/
TRAINING.md "The run folder"): a fresh run never writes into a folder that holds a run (claim_fresh), one process
at a time writes a folder (RunLock), and a resumed run cuts a torn last record off its log (repair_metrics).
write_benchmark writes the toy benchmark of finetune.py --task all (benchmark.md, benchmark.json).
"""
import json
import os
import re
import socket
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist

from lib import runtime


class Meter:
    """Loss and metric sums since the last log: each name is averaged over the updates it ran in."""

    def __init__(self):
        self.sums, self.counts, self.steps, self.samples, self.t0 = {}, {}, 0, 0, time.time()

    def add(self, logs):
        for name, val in logs.items():
            self.sums[name] = self.sums.get(name, 0.0) + val
            self.counts[name] = self.counts.get(name, 0) + 1

    def record(self, step, lr, model, world, ddp):
        """The metrics.jsonl record of the steps since the last one, averaged over the ranks."""
        names = sorted(self.sums)
        vals = torch.stack([self.sums[n] / self.counts[n] for n in names])
        if ddp:
            dist.all_reduce(vals, op=dist.ReduceOp.AVG)
        dt = time.time() - self.t0
        rec = {"step": step, "lr": lr, "s_per_step": dt / max(self.steps, 1), "samples_per_s": self.samples * world / dt,
               "temp": runtime.full_tensor(model.temp).item()}  # (FSDP: the temperature's slices, gathered)
        for n, v in zip(names, vals.tolist()):
            rec[("loss/" if n not in ("grad_norm", "mim_target_std") else "") + n] = v
        rec["loss/total"] = sum(v for k, v in rec.items() if k.startswith("loss/"))
        return rec


def print_summary(history, final, cfg, bad):
    print(f"\ndone: {final['step']} steps in {final['wall_s']:.0f} s, peak memory {final['peak_mem_mb']:.0f} MB, "
          f"run folder {cfg.out_dir}")
    if history:
        first, last = history[0], history[-1]
        print("loss        first log -> last log")
        for k in sorted(k for k in last if k.startswith("loss/") and k in first):
            print(f"  {k[5:]:<11} {first[k]:7.3f} -> {last[k]:7.3f}")
    if "retrieval" in final:
        r = final["retrieval"]
        print(f"zero-shot retrieval on {r['n_images']} held-out images / {r['n_texts']} captions "
              f"(ITC top-{cfg.eval_k} re-ranked by ITM):")
        for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
            print(f"  {name} R@1 {r[d + '_r1']:.1f}  R@5 {r[d + '_r5']:.1f}  R@10 {r[d + '_r10']:.1f}   "
                  f"(ITC alone R@1 {r[d + '_itc_r1']:.1f}; chance R@1 {r[d + '_chance_r1']:.1f})")
    if bad.counts():
        print("bad input skipped: " + bad.summary())


def write_benchmark(out, rows, init, ckpt):
    """finetune.py --task all: the toy suite as OUT/benchmark.md (a Markdown table, printed too) and
    OUT/benchmark.json, one row per (run name, its report, its command); ckpt is the pre-trained checkpoint
    `init`, whose model and steps the table's first line names."""
    tc = ckpt.get("train_config") or {}
    lines = [f"Toy benchmark of `{init}` (model {tc.get('config', '?')}, pre-trained "
             f"{ckpt.get('step', '?')} steps); results in %, time = fine-tuning + evaluation.", "",
             "| task | metric | result | time (s) | command |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['metric']} | {r['summary']} | {r['wall_s']:.0f} | `{c}` |" for n, r, c in rows]
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump([dict(r, name=n, command=c) for n, r, c in rows], f, indent=1)
    print("\n" + "\n".join(lines) + f"\n\nwritten to {out}/benchmark.md")


# ---------------------------------------------------------------------------------------------------------
# The run folder: which files make a run, the lock that keeps a second process out, and the log after a crash

RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "tokenizer.json", "loss_curves.png", "image_tokenizer.pt")
LOCK_FILE = ".lock"


def run_files(out_dir):
    """The files of a run in out_dir (RUN_FILES and the checkpoints --keep_last names ckpt_STEP.pt), sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or re.fullmatch(r"ckpt_\d+\.pt", n))


def claim_fresh(out_dir, overwrite):
    """A fresh run (no --resume) starts only in a folder that holds no run: refused with one line naming the ways
    on, or, with --overwrite, the old run's files (run_files) are deleted first. Other files are left alone."""
    found = run_files(out_dir)
    if found and not overwrite:
        raise SystemExit(f"error: {out_dir} holds a run ({', '.join(found)}); continue it with --resume={out_dir}, "
                         f"start a new one with --out_dir=NEW, or replace it with --overwrite")
    for name in found:
        os.remove(os.path.join(out_dir, name))
    if found:
        print(f"--overwrite: deleted the previous run's {', '.join(found)} in {out_dir}", flush=True)


def _holder():
    """Who holds a lock: this process's id, its host and when it took the lock (what a refusal names)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLock:
    """RUN/.lock, held for the whole run by the process that writes the folder (rank 0): a second train.py into the
    same folder is refused with the holder's process id and host. The lock is the kernel's (fcntl.flock), so it
    ends with its process however that ends (a kill -9 included); a .lock file whose lock nobody holds is what a
    dead process left, and it is named and taken over. A run that ends normally removes the file."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.path, self.file = os.path.join(out_dir, LOCK_FILE), None
        if fcntl is None:  # (no fcntl: Windows) the folder is not locked
            return
        while self.file is None:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = self._read(f)
                f.close()
                raise SystemExit(f"error: {out_dir} is in use by process {held.get('pid', '?')} on "
                                 f"{held.get('host', '?')} since {held.get('since', '?')} ({self.path}); wait for it "
                                 f"to end, or use another --out_dir") from None
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed the file between our open and our lock: take the new one
                f.close()
                continue
            old = self._read(f)
            if old:
                print(f"note: {self.path} was left by process {old.get('pid', '?')} on {old.get('host', '?')}, "
                      f"which ended without releasing it (killed or crashed); taking it over", flush=True)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(_holder()) + "\n")
            f.flush()
            self.file = f

    @staticmethod
    def _read(f):
        f.seek(0)
        try:
            held = json.loads(f.read() or "{}")
        except ValueError:
            held = {"pid": "?"}
        return held if isinstance(held, dict) else {"pid": "?"}

    def release(self):
        if self.file is not None:
            os.remove(self.path)  # removed while still locked: a waiting opener then finds the path gone
            self.file.close()
            self.file = None


def repair_metrics(path):
    """A process killed while appending to metrics.jsonl leaves a torn last line (no newline): a resumed run would
    glue its next record onto it. The torn part is cut off (and said); complete records are kept as they are."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        raw = f.read()
        if not raw or raw.endswith(b"\n"):
            return
        keep = raw.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"note: {path}: cut a torn last record ({len(raw) - keep} bytes, written when the run was stopped)",
          flush=True)


def copy_log(src, dst, step):
    """A run resumed into a new folder starts its metrics.jsonl with the old run's log records up to the checkpoint's
    step (complete lines only; no final record: the resumed run writes its own)."""
    if not os.path.exists(src):
        return
    kept = []
    for line in open(src, encoding="utf-8"):
        try:
            rec = json.loads(line)
        except ValueError:  # a torn last line
            continue
        if isinstance(rec, dict) and not rec.get("final") and rec.get("step", step + 1) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(kept)
