"""What each rank holds for training, with DDP and with train.py --fsdp (runtime.shard): the bytes of the parameters,
their gradients and the AdamW state (exp_avg, exp_avg_sq, step) on this rank, after one optimizer step. Activations
are not counted (they depend on the batch and are the same either way). Run it with the world size to measure:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 tools/shard_memory.py --config=small
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 tools/shard_memory.py --config=small --recipe=flava

The model is built as train.py builds it (flava.build_model, train.LossModel, train.param_groups); the gradients are
zeros, since only their size matters here. docs/TRAINING.md quotes the output."""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import flava  # noqa: E402
from lib import runtime  # noqa: E402
import train  # noqa: E402
from model import make_config  # noqa: E402


def local_bytes(t):
    """The bytes this rank stores for t: its own slice of a DTensor, or the whole of a plain tensor."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(cfg, mode, device):
    """{what: MB on this rank} for one training set-up: mode 'ddp' (every rank a whole copy) or 'fsdp'."""
    torch.manual_seed(0)
    model = flava.build_model(cfg).to(device)
    loss_model = train.LossModel(model, True, "flava" if isinstance(cfg, flava.FLAVAConfig) else "xfm", fast=True)
    if mode == "fsdp":
        runtime.shard(loss_model, model)
    else:
        torch.nn.parallel.DistributedDataParallel(loss_model)          # (DDP keeps the parameters as they are)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.01, 2.0), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                                   # a DTensor slice under FSDP
    optimizer.step()                                                   # creates the AdamW state
    mb = lambda ts: sum(local_bytes(t) for t in ts) / 2 ** 20          # noqa: E731
    return {"parameters": mb(model.parameters()), "gradients": mb(p.grad for p in model.parameters()),
            "AdamW state": mb(v for s in optimizer.state.values() for v in s.values())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--config", default="small", choices=("tiny", "small", "base"))
    ap.add_argument("--recipe", default="xfm", choices=("xfm", "flava"))
    args = ap.parse_args()
    ddp, rank, _, world, device = runtime.setup_distributed("auto")
    if not ddp:
        raise SystemExit("error: run it under torchrun (see the top of this file): sharding needs several ranks")
    try:
        cfg = (make_config if args.recipe == "xfm" else flava.make_flava_config)(args.config)
        rows = {mode: measure(cfg, mode, device) for mode in ("ddp", "fsdp")}
        every = [None] * world
        dist.all_gather_object(every, rows)
        if rank == 0:
            n = sum(p.numel() for p in flava.build_model(cfg).parameters())
            print(f"{args.recipe} {args.config}: {n / 1e6:.2f}M parameters, {world} ranks; MB held by each rank")
            print(f"{'rank':<5} {'mode':<5} {'parameters':>11} {'gradients':>10} {'AdamW state':>12} {'total':>8}")
            for r, rows_r in enumerate(every):
                for mode, m in rows_r.items():
                    print(f"{r:<5} {mode:<5} {m['parameters']:>11.1f} {m['gradients']:>10.1f} "
                          f"{m['AdamW state']:>12.1f} {sum(m.values()):>8.1f}")
    finally:
        runtime.teardown()


if __name__ == "__main__":
    main()
