"""
What a training run reports (train.py): Meter turns the losses of the updates since the last log into one
metrics.jsonl record (averaged over the ranks), and print_summary prints the end-of-run summary: the losses from
the first log to the last, zero-shot retrieval, bad input skipped.
"""
import time

import torch
import torch.distributed as dist

import runtime


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
