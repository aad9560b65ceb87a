"""
Where a process runs: its rank and device (under torchrun or alone), the "rank 0 prepares, every rank uses it"
step, the autocast precision, moving a batch to the device and the random generators' state. train.py, finetune.py
and the tools share it.
"""
import functools
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from model import Block


def setup_distributed(device_name):
    """(ddp, rank, local_rank, world_size, device). Under torchrun (RANK in the env) the device comes from
    LOCAL_RANK and is set *before* init_process_group; NCCL on CUDA, gloo on CPU."""
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda, but torch sees no CUDA device (use --device=auto or cpu)")
    if device_name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps, but torch sees no MPS device (use --device=auto or cpu)")
    if "RANK" in os.environ:
        if device_name == "mps":
            raise SystemExit("error: --device=mps has no distributed backend here; run it without torchrun")
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return True, rank, local_rank, world, device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return False, 0, 0, 1, torch.device(device_name)


def rank0_shares(fn, ddp, rank):
    """fn() on rank 0 alone, its result given to every rank: a "rank 0 prepares, the others use it" step decides
    once and shares the decision (or the object itself), so no rank re-decides it from its own file system
    (rank 0 may be creating the very folder the others would look for) and several nodes need no shared file
    system. When fn fails on rank 0, every rank stops (rank 0 with the error), so none waits for a broadcast
    that never comes."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:  # SystemExit included: every rank must stop with it
            error = e
    if ddp:
        box = [result, error is not None]
        dist.broadcast_object_list(box, src=0)
        result, failed = box
        if failed and rank != 0:
            raise SystemExit(1)  # rank 0 prints the error once
    if error is not None:
        raise error
    return result


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def amp_setup(amp, device):
    """(autocast context factory, GradScaler or None, dtype name). CPU autocast is bf16 only."""
    if amp == "auto":  # check CUDA before probing bf16 support: probing without a driver crashes
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if amp == "fp32":
        return nullcontext, None, amp
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("error: --amp=fp16 needs CUDA (use bf16 or fp32 on the CPU)")
    if amp not in ("bf16", "fp16"):
        raise SystemExit(f"error: --amp must be auto, bf16, fp16 or fp32, not {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None  # bf16 needs no loss scaling
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, amp


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def rng_state():
    """Every random generator's state, in types the safe loader reads (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_blocks(model):
    """Activation checkpointing (train.py --grad_ckpt): each Transformer block (model.Block) of the model keeps only
    its input in the forward pass and recomputes its activations in the backward pass, so activation memory grows
    with the number of blocks' inputs instead of with every intermediate tensor, for about one more forward of
    compute. Non-reentrant checkpointing restores the random state for the recomputation, so dropout and drop path
    replay exactly and losses and gradients equal the plain run (tests/test_train.py). Outside autograd (no_grad,
    evaluation) a block simply runs."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return model



COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_step(module, mode="default"):
    """torch.compile of a module whose forward computes every loss of a training step (train.py --compile): the
    encoders, the heads and the loss code become one graph (and AOTAutograd compiles its backward), so an eager
    step's thousands of small kernel launches become a few fused ones. The loss code is written with fixed shapes
    and no host syncs (docs/METHOD.md §10), so with the fixed batch shapes of --compile (data.DataConfig.static) the
    graph has no breaks and compiles once. mode "reduce-overhead" also records the step as a CUDA graph (CUDA only):
    one launch replays the whole graph."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    return torch.compile(module, mode=mode, dynamic=False)
