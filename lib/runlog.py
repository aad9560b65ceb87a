"""
A training run's folder and what it reports (train.py): Meter turns the losses of the updates since the last log
into one metrics.jsonl record (averaged over the ranks), and print_summary prints the end-of-run summary: the
losses from the first log to the last, zero-shot retrieval, bad input skipped. The run folder's rules (docs/
TRAINING.md "The run folder"): a fresh run never writes into a folder that holds a run (claim_fresh), one process
at a time writes a folder (RunLock), and a resumed run cuts a torn last record off its log (repair_metrics).
write_benchmark writes the toy benchmark of finetune.py --task all (benchmark.md, benchmark.json).

The rest of train.py's run-folder work: checkpoints (save_checkpoint, written atomically; load_checkpoint), a
resume (check_resume: the run's own config; claim_run_folder; run_tokenizer), the run's tokenizer on every rank
(shared_tokenizer), and the held-out pairs read before step 1 (load_held_out) and evaluated at the end (finish).
"""
import json
import os
import re
import resource
import socket
import sys
import time
from dataclasses import asdict, fields

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist

from lib import formats, pictures, pretrained, retrieval, runtime, tokenizer


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and resuming a run (train.py)


def save_checkpoint(path, model, optimizer, scaler, step, cfg, model_cfg, streams, extra, master):
    """Every rank calls it (FSDP gathers the whole tensors from every rank's slices; each rank gives its random
    state); rank 0 writes. Atomic: write path.tmp, then rename, so a crash never leaves a half-written checkpoint.
    The model is the raw one (no DDP `module.` or compile `_orig_mod.` prefix), in the same format under FSDP."""
    model_state, optimizer_state = runtime.full_state_dicts(model, optimizer)
    rngs = runtime.rng_states()                     # hard negatives, dropout and drop path draw from each rank's own
    if not master:
        return
    ckpt = {"model": model_state, "optimizer": optimizer_state,
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "rng": rngs, "data": {k: s.state_dict() for k, s in streams.items()},
            "train_config": asdict(cfg), "model_config": asdict(model_cfg), **extra}
    atomic_save(ckpt, path)
    runtime.keep_checkpoints(path, step, cfg.keep_last)  # --keep_last: RUN/ckpt_STEP.pt, the oldest deleted


def restore(ckpt, model, optimizer, streams, bad):
    """A resumed run's state from its checkpoint: model and optimizer (FSDP: each rank keeps its slices), each
    stream's place, and the bad records found before (each still counted once). -> the step to start from."""
    runtime.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    for k, s in streams.items():
        if k in ckpt["data"]:
            s.load_state_dict(ckpt["data"][k])
    bad.load_state_dict(ckpt.get("bad_input", {}))
    return ckpt["step"]


def write_config(cfg, model_cfg, world, amp, device, accum, per_rank, sources):
    """RUN/config.json: the run's train and model configs and what it ran on (rank 0)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({"train": asdict(cfg), "model": asdict(model_cfg), "world_size": world, "amp": amp,
                   "device": name, "accum_steps": accum, "per_rank_batch": per_rank, "data": sources}, f, indent=2)


def append_record(out_dir, record):
    """One record (Meter.record) appended to RUN/metrics.jsonl (rank 0)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def atomic_save(obj, path):
    """torch.save to path.tmp, then rename: a crash never leaves a half-written file (finetune.py uses it too)."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device):
    """A checkpoint of train.py or finetune.py (the file, or a run folder for its ckpt.pt) -> its
    dict, the model's keys without a DDP `module.` or compile `_orig_mod.` prefix. Read with
    torch.load(weights_only=True) (pretrained.read_torch). A file that is no such checkpoint stops the
    run with one line naming it: not a torch file, a pickle of other globals, no "model" state dict, a
    model_config or step of the wrong type, or tensors that are not the model its model_config
    describes (pretrained.check_state; of a fine-tuned checkpoint, its `xfm.` part)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    ckpt = pretrained.read_torch(path, device)                            # tensors and plain types only
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not all(isinstance(k, str) for k in model):
        what = formats.type_of(ckpt) if not isinstance(ckpt, dict) else 'no state dict under "model"'
        raise SystemExit(f"error: {path}: not a checkpoint of train.py or finetune.py (it holds {what})")
    if "step" in ckpt:
        pretrained.config_int(ckpt, "step", path, least=0)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.items()}
    part = state if "task" not in ckpt else {k[4:]: v for k, v in state.items() if k.startswith("xfm.")}
    pretrained.check_state(part, pretrained.model_of(ckpt.get("model_config"), path), path)
    ckpt["model"] = state
    return ckpt


def resumed_run_dir(resume):
    """The run folder of --resume (a run folder, or a checkpoint file in one)."""
    return resume if os.path.isdir(resume) else os.path.dirname(resume) or "."


def check_resume(resume, ckpt, given, config_cls, may_change):
    """The config of a resumed run: the checkpoint's train_config (a config_cls, train.TrainConfig), with the
    may_change keys (train.RESUME_MAY_CHANGE) the command line gives. Refused before anything is written, with
    one line: a key given with another value than the run's own, a text length beyond the model's position
    table, or a checkpoint whose train_config config_cls does not know. The out_dir defaults to the resumed
    run's folder; --stop_at and --overwrite belong to one command and are not carried over."""
    saved, known = ckpt.get("train_config"), {f.name for f in fields(config_cls)}
    name = os.path.join(resume, "ckpt.pt") if os.path.isdir(resume) else resume
    if not isinstance(saved, dict) or "task" in ckpt:
        raise SystemExit(f"error: {name}: not a checkpoint of train.py (no train_config; a fine-tuned one?): "
                         f"nothing to resume")
    unknown = sorted(set(saved) - known)
    if unknown:
        raise SystemExit(f"error: {name}: its train_config has keys this train.py does not know "
                         f"({', '.join(unknown)}): a checkpoint of another version of the code")
    clash = [f"--{k}={v} (the run has {k}={saved[k]})" for k, v in given.items()
             if k not in may_change and k in saved and v != saved[k]]
    if clash:
        raise SystemExit(f"error: {'; '.join(clash)}: a resumed run keeps its model, recipe, tokenizer, data and "
                         f"optimizer settings ({name}); start a new run with --out_dir=NEW to change them "
                         f"(train.py --help lists the keys a resume may change)")
    own = {"out_dir": resumed_run_dir(resume), "stop_at": 0, "overwrite": False}  # this command's, not the run's
    cfg = config_cls(**{**saved, **own, **given})
    longest = max(cfg.text_len, cfg.caption_len)
    if longest > ckpt["model_config"]["max_text_len"]:
        raise SystemExit(f"error: --text_len/--caption_len {longest} is beyond the model's position table of "
                         f"{ckpt['model_config']['max_text_len']} tokens ({name})")
    if cfg.overwrite and os.path.abspath(cfg.out_dir) == os.path.abspath(resumed_run_dir(resume)):
        raise SystemExit(f"error: --overwrite would delete the run that --resume={resume} continues")
    return cfg


def claim_run_folder(cfg, ckpt):
    """Rank 0, before anything is written -> the folder's lock (RunLock), held until the run ends. Nothing
    of another run is lost: a fresh run needs a folder without a run (or --overwrite: claim_fresh); a run
    resumed in its own folder has a torn last log record cut off; one resumed into a new folder needs that folder
    free too, and starts its log with the old run's records up to the checkpoint."""
    lock = RunLock(cfg.out_dir)
    try:
        metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
        if ckpt is not None and os.path.samefile(cfg.out_dir, resumed_run_dir(cfg.resume)):
            repair_metrics(metrics)
        else:
            claim_fresh(cfg.out_dir, cfg.overwrite)
            if ckpt is not None:
                copy_log(os.path.join(resumed_run_dir(cfg.resume), "metrics.jsonl"), metrics, ckpt["step"])
    except BaseException:
        lock.release()
        raise
    return lock


def run_tokenizer(ckpt, resume):
    """A resumed run's own tokenizer: the checkpoint's copy (a checkpoint without one: its run folder's file)."""
    if "tokenizer" in ckpt:
        return tokenizer.Tokenizer.from_json(ckpt["tokenizer"])
    path = os.path.join(resumed_run_dir(resume), "tokenizer.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: the checkpoint {resume} holds no tokenizer and {path} does not exist")
    return tokenizer.Tokenizer.load(path)


def shared_tokenizer(cfg, ckpt, ddp, rank):
    """The run's tokenizer on every rank: rank 0 takes a resumed run's own (run_tokenizer) or trains (or loads) one
    (tokenizer.get_tokenizer) and saves it in the run folder too, so the folder is a complete --init for
    finetune.py; every rank gets its JSON, so no rank re-decides from its own disk and the nodes need no shared
    folder for it."""
    def prepare():
        if ckpt is not None:
            tok = run_tokenizer(ckpt, cfg.resume)
        else:
            tok = tokenizer.get_tokenizer(cfg.data_dir, cfg.out_dir, cfg.vocab_size, cfg.tokenizer or None,
                                          cfg.image_root, cfg.text_norm)
        tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
        return tok.to_json()
    return tokenizer.Tokenizer.from_json(runtime.rank0_shares(prepare, ddp, rank))


# ---------------------------------------------------------------------------------------------------------
# The held-out pairs: read before step 1, evaluated at the end (train.py)


def bad_input(cfg, rank):
    """A count of skipped input records (formats.BadInput; rank 0 prints them, --strict stops at the first): the
    run's own, kept in each checkpoint, and the held-out pairs' (load_held_out), added to it at the end (finish)."""
    return formats.BadInput(strict=cfg.strict, verbose=rank == 0)


def load_held_out(cfg, sources, tok, image_size, ddp, rank):
    """-> (the held-out pairs: sources["pair_test"], or None without one; held_bad). Each image is decoded before
    step 1: a bad one is skipped now and counted in held_bad, a count of its own that no checkpoint keeps, so a
    resume, which reads the set again, counts it once. A set left empty stops the run here. Rank 0 reads, every
    rank gets it."""
    held_bad = bad_input(cfg, rank)
    return runtime.rank0_shares(lambda: retrieval.load_retrieval_set(
        sources["pair_test"], tok, image_size, cfg.caption_len, held_bad, cfg.image_root),
        ddp, rank) if "pair_test" in sources else None, held_bad


def finish(cfg, model, held_out, held_bad, history, final, bad, device, autocast, rank, world):
    """Every rank, on the raw model: zero-shot retrieval on the held-out pairs (held_out: read and checked before
    step 1, or None), split over the ranks (each rank encodes and re-ranks its share, lib/retrieval.py); then, on rank
    0, the final metrics record, the loss-curve picture and the summary. held_bad: what the start-up read of the
    held-out pairs skipped, added to the run's count here. An image that no longer decodes at the end (its file
    changed during the run) costs a single process its evaluation, not the record: the record says why
    (retrieval_error); under torchrun the error stops every rank."""
    metrics_path, master = os.path.join(cfg.out_dir, "metrics.jsonl"), rank == 0
    for kind, n in held_bad.counts().items():
        bad.add(kind, n)
    final["bad_input"] = bad.counts()
    if held_out is not None:
        try:
            final["retrieval"] = retrieval.evaluate_retrieval(model, held_out, device, cfg.eval_k, cfg.eval_batch_size,
                                                              autocast, rank, world,
                                                              runtime.num_workers(cfg, device))
            final["retrieval"]["n_images"], final["retrieval"]["n_texts"] = len(held_out["image"]), len(held_out["ids"])
        except OSError as e:  # one rank alone would leave the others waiting in the gather
            if world > 1:
                raise
            final["retrieval_error"] = f"{type(e).__name__}: {e}"
            print(f"warning: no retrieval evaluation: {final['retrieval_error']}", file=sys.stderr, flush=True)
    final["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        final["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(final) + "\n")
        records = [json.loads(line) for line in open(metrics_path) if '"final"' not in line]
        pictures.plot_curves(records, os.path.join(cfg.out_dir, "loss_curves.png"))
        print_summary(history, final, cfg, bad)
