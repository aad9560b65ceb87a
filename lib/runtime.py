"""
Where a process runs: its rank and device (under torchrun or alone), the "rank 0 prepares, every rank uses it"
step, each rank's share of an evaluation and the gather of the shares, the autocast precision, moving a batch to
the device, the random generators' state, FSDP2 sharding and its full checkpoints, and the checkpoint files
--keep_last keeps. train.py, finetune.py, lib/retrieval.py and the tools share it.
"""
import functools
import os
import random
import re
import shutil
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lib import transforms
from model import Attention, VisionEncoder


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


# Rank 0's preparation (a BPE tokenizer over a large corpus, FLAVA's k-means codebook) may outlast NCCL's watchdog
# (10 minutes by default): the other ranks wait for it in a gloo group of its own, whose timeout is this.
PREP_TIMEOUT = timedelta(hours=24)
_prep = None  # (the default group it was made in, the preparation group)


def prep_group():
    """The gloo group (every rank, timeout PREP_TIMEOUT) that rank0_shares broadcasts in. Made at its first use
    (every rank calls rank0_shares in the same order) and again after a new default group."""
    global _prep
    if _prep is None or _prep[0] is not dist.group.WORLD:
        _prep = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=PREP_TIMEOUT))
    return _prep[1]


def rank0_shares(fn, ddp, rank):
    """fn() on rank 0 alone, its result given to every rank: a "rank 0 prepares, the others use it" step decides
    once and shares the decision (or the object itself), so no rank re-decides it from its own file system
    (rank 0 may be creating the very folder the others would look for) and several nodes need no shared file
    system. When fn fails on rank 0, every rank stops (rank 0 with the error), so none waits for a broadcast
    that never comes. The others wait in prep_group(), so a long fn is no NCCL timeout."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:  # SystemExit included: every rank must stop with it
            error = e
    if ddp:
        box = [result, error is not None]
        dist.broadcast_object_list(box, src=0, group=prep_group())
        result, failed = box
        if failed and rank != 0:
            raise SystemExit(1)  # rank 0 prints the error once
    if error is not None:
        raise error
    return result


def share(n, rank, world, unit=1):
    """This rank's contiguous share of n items for an evaluation split over the ranks -> range(start, stop).
    The items go in whole units of `unit` (an evaluation's batch), ceil(#units / world) units to a rank, in rank
    order: each batch holds the same items as in one process, so the results are the same, and only the last
    ranks' shares are shorter (or empty, for fewer units than ranks)."""
    units = -(-n // unit)                                                  # ceil(n / unit)
    per = -(-units // world) * unit                                        # items per share: ceil(units / world) units
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def gather_shares(x, n, rank, world, unit=1):
    """Every rank's rows of share(n, ., world, unit), gathered in rank order on every rank: x (len(share), ...)
    -> (n, ...), on x's device (None for an empty share). all_gather needs one shape on every rank, so each share
    is padded to the longest with zeros and the padding dropped again. The identity for one process."""
    if world == 1:
        return x
    sizes = [len(share(n, r, world, unit)) for r in range(world)]
    # NCCL gathers GPU tensors (this rank's device), gloo CPU ones
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if 0 in sizes:  # an empty share has no rows to take the shape from: rank 0's share is never empty (n > 0)
        box = [(tuple(x.shape[1:]), x.dtype) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        x = x if x is not None else torch.empty(0, *box[0][0], dtype=box[0][1], device=comm)
    assert len(x) == sizes[rank], f"rank {rank} gives {len(x)} rows for its share of {sizes[rank]}"
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=comm)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)  # (n, ...) in rank order, padding dropped


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def amp_setup(amp, device, sharded=False):
    """(autocast context factory, GradScaler or None, dtype name). CPU autocast is bf16 only. fp16 is refused with
    FSDP (sharded): GradScaler's inf/nan check would see only this rank's slices of the gradients, so the ranks
    could disagree about skipping a step."""
    if amp == "auto":  # check CUDA before probing bf16 support: probing without a driver crashes
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if amp == "fp32":
        return nullcontext, None, amp
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("error: --amp=fp16 needs CUDA (use bf16 or fp32 on the CPU)")
    if amp == "fp16" and sharded:
        raise SystemExit("error: --amp=fp16 is not supported with --fsdp (use --amp=bf16)")
    if amp not in ("bf16", "fp16"):
        raise SystemExit(f"error: --amp must be auto, bf16, fp16 or fp32, not {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None  # bf16 needs no loss scaling
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, amp


def fast_path_on(cfg, device):
    """train.py --losses: auto is the fast path (lib/fast_losses.py) where it pays (a GPU, a compiled step), the
    reference (losses.py) elsewhere."""
    return cfg.losses == "fast" or (cfg.losses == "auto" and (device.type == "cuda" or cfg.compile))


def num_workers(cfg, device):
    """train.py's DataLoader workers per rank: --num_workers, or with -1 four on CUDA (JPEG decoding and crops
    beside the GPU's step) and none elsewhere (the CPU's cores train)."""
    return cfg.num_workers if cfg.num_workers >= 0 else 4 if device.type == "cuda" else 0


def to_device(batch, device):
    """A batch on the device; uint8 images (data.DataConfig.uint8_images) normalised there
    (transforms.normalize: to_tensor's values)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if torch.is_tensor(out.get("image")) and out["image"].dtype == torch.uint8:
        out["image"] = transforms.normalize(out["image"])
    return out


# ---------------------------------------------------------------------------------------------------------
# The batches of an update over the ranks (train.py): the global batch split into micro-batches, the
# micro-batches fetched one at a time, and every rank's agreement on skipping a non-finite update


def batch_plan(cfg, world):
    """Global batch per stream -> (per-rank micro batch, accumulation steps, {stream: per-rank
    batch}), exact: batch_size = micro x accum x world, and the text and region batches split over
    the same accum x world."""
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1:
        raise SystemExit(f"error: batch_size {cfg.batch_size} is smaller than the world size "
                         f"{world}")
    accum = cfg.batch_size // (micro * world)
    text_global = cfg.text_batch_size or cfg.batch_size
    region_global = cfg.region_batch_size or max(cfg.batch_size // 2, accum * world)
    split = accum * world
    exact = accum >= 1 and accum * micro * world == cfg.batch_size
    if not exact or text_global % split or region_global % split:
        raise SystemExit(f"error: batch_size {cfg.batch_size} (text {text_global}, region "
                         f"{region_global}) must be a multiple of micro_batch_size {micro} x "
                         f"world_size {world}")
    per_rank = {"pair": micro, "region": region_global // split, "image": micro,
                "text": text_global // split}
    if accum > 1 and cfg.compile and cfg.compile_mode == "reduce-overhead":
        # a replay overwrites the graph's outputs, the last micro-batch's gradients among them
        raise SystemExit(f"error: --compile_mode=reduce-overhead (CUDA graphs) takes no gradient accumulation "
                         f"(batch_size {cfg.batch_size} = micro {micro} x accum {accum} x world {world}): "
                         f"use --compile_mode=default, or a micro_batch_size of the whole per-rank batch")
    return micro, accum, per_rank


def next_batches(streams, kinds, accum, device, meter):
    """An update's `accum` micro-batches {kind: batch}, each fetched when forward_backward reaches
    it (so only one is on the device at a time); the samples are counted for the log."""
    for _ in range(accum):
        batch = {k: next(streams[k]) for k in kinds}  # (a stream counts unreadable images in `bad`)
        # counted on the host copy: images, texts, or a region batch's filled caption slots
        meter.samples += sum(len(b["image"]) if k == "image" else int(b["filled"].sum())
                             if "filled" in b else len(b["ids"]) for k, b in batch.items())
        yield {k: to_device(b, device) for k, b in batch.items()}


class NonFinite:
    """A non-finite loss on any rank skips the update on all of them (every rank agrees), and
    `max_bad` skipped updates in a row stop the run. Two ways to the same decisions:
    - on the host (the reference path): skip() reads the update's flag (.item(), the host waits for
      the device) and the caller skips the update at once;
    - on the device (on_device: fused AdamW, no GradScaler, no FSDP; the fast path): skip() hands
      the flag to fused AdamW as its found_inf, whose kernel then leaves the parameters and their
      moments as they are; the counts stay on the device until the host reads them (too_many: at
      log steps).
    """

    def __init__(self, optimizer, scaler, cfg, ddp, device):
        self.on_device = optimizer.defaults["fused"] and scaler is None and not (ddp and cfg.fsdp)
        self.ddp, self.max_bad = ddp, cfg.max_bad_steps
        # skipped updates (all, and since the last read), the current and the longest run in a row
        self.total, self.recent, self.streak, self.longest = (torch.zeros((), device=device)
                                                              for _ in range(4))

    def skip(self, loss, optimizer):
        """-> True when the caller must skip this update (on the host), False otherwise."""
        flag = (~torch.isfinite(loss.detach())).float()
        if self.ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.total += flag
        self.recent += flag
        self.streak = (self.streak + flag) * flag                  # 0 again after a good update
        self.longest = torch.maximum(self.longest, self.streak)
        if self.on_device:
            optimizer.found_inf = flag                               # fused AdamW: no update where 1
            return False
        return flag.item() > 0

    def too_many(self, step, log_step, say):
        """At the end of a step: True when max_bad skipped updates came in a row. The host reads the
        counts after every step on the host, at log steps on the device (saying how many it skipped:
        the host said each as it skipped it)."""
        if self.on_device and not log_step:
            return False
        recent, longest = int(self.recent.item()), int(self.longest.item())
        self.recent.zero_()
        self.longest.copy_(self.streak)                              # a run may go on
        if recent and self.on_device:
            say(f"warning: {recent} non-finite updates skipped by step {step}")
        return longest >= self.max_bad


def optimizer_step(optimizer, scaler, params, clip):
    """Clip and step (train.py, finetune.py and tools/bench.py share it). With fp16's GradScaler the
    gradients are unscaled first, so the clipping sees the true gradients. -> the gradient norm
    before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(optimizer)                                 # skips the step on inf/nan gradients
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # FSDP: clip_grad_norm_ gives a DTensor, the global norm of all slices
    return full_tensor(grad_norm)


# ---------------------------------------------------------------------------------------------------------
# Random state


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


def rng_states():
    """Every rank's rng_state(), in rank order (all of them on every rank): a checkpoint keeps each rank's own."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def encoder_blocks(model):
    """The transformer blocks of the model's encoders, of either recipe (model.Block, flava.ViTBlock): every encoder
    keeps its blocks in a ModuleList `blocks`."""
    return [b for m in model.modules() if isinstance(getattr(m, "blocks", None), torch.nn.ModuleList) for b in m.blocks]


def checkpoint_blocks(model):
    """Activation checkpointing (train.py --grad_ckpt): each Transformer block (encoder_blocks) of the model keeps only
    its input in the forward pass and recomputes its activations in the backward pass, so activation memory grows
    with the number of blocks' inputs instead of with every intermediate tensor, for about one more forward of
    compute. Non-reentrant checkpointing restores the random state for the recomputation, so dropout and drop path
    replay exactly and losses and gradients equal the plain run (tests/test_train.py). Outside autograd (no_grad,
    evaluation) a block simply runs."""
    for block in encoder_blocks(model):
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return model



def choose_attention(model, device):
    """attn_impl "auto" made concrete for each attention layer of a built model (X-FM or FLAVA) on `device`:
    SDPA (model.Attention.sdpa) wherever it runs a fused kernel, the written-out softmax where it would not.
    On a GPU that is SDPA everywhere. On a CPU, SDPA's fused kernel (_scaled_dot_product_flash_attention_for_cpu)
    takes neither dropout nor a mask that needs a gradient: SDPA then falls back to its math path, the written-out
    computation in more ops (docs/PERFORMANCE.md). So on a CPU an attention layer with dropout (X-FM's language
    and fusion encoders) or a learned mask (a BEiT block's relative position bias) runs written out, the rest
    (FLAVA's blocks: no dropout, padding masks only) SDPA. attn_impl sdpa or explicit: the model as it is."""
    if model.cfg.attn_impl != "auto":
        return model
    for block in encoder_blocks(model):
        learned_mask = getattr(block, "rel_pos", None) is not None
        for attn in [m for m in block.modules() if isinstance(m, Attention)]:
            attn.sdpa = device.type != "cpu" or not (attn.attn_drop > 0 or learned_mask)
    return model


def stacked_biases(rel_pos):
    """The biases of L blocks' model.RelativePositionBias modules in one gather from a stack of their tables:
    (L, nh, N, N), each the same as that module's own forward(); each table's gradient comes back through the
    stack."""
    tables = torch.stack([m.table for m in rel_pos])                       # (L, (2g-1)^2 + 3, nh)
    return tables[:, rel_pos[0].index].permute(0, 3, 1, 2).contiguous()    # (L, nh, N, N)


def stack_position_biases(model):
    """A fast path for each BEiT vision encoder of the model (model.VisionEncoder): every block's relative position
    bias in one gather per encoder pass (stacked_biases: a few ops, not a gather, a copy and a zeros + index_put
    backward per block, plus a copy of each table's gradient), handed to each block as its mask, which takes the
    place of the bias the block would gather itself. The same values and gradients (tests/test_fastpaths.py). A
    forward pre-hook on the encoder gathers, one on each block hands its bias down (an argument of the block's
    forward, so --grad_ckpt keeps it as an input). Not under FSDP (train.wrap): there a block's table is whole
    only inside that block's forward."""
    def gather(encoder, args, biases):
        biases.update(enumerate(stacked_biases([b.rel_pos for b in encoder.blocks])))  # {i: (nh, N, N)}

    def hand_down(block, args, kwargs, i, biases):
        return (args[0], biases.pop(i, None)), kwargs                      # (x, block i's bias)

    for encoder in [m for m in model.modules() if isinstance(m, VisionEncoder)]:
        biases = {}
        encoder.register_forward_pre_hook(functools.partial(gather, biases=biases))
        for i, block in enumerate(encoder.blocks):
            block.register_forward_pre_hook(functools.partial(hand_down, i=i, biases=biases), with_kwargs=True)
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"  # torch.compile's code generator
# compiled graphs one block code may keep (torch's default: 8): one per block kind and call signature of a step
# (batch shape, grad mode, whether the input needs a gradient, train or eval), never one per layer
BLOCK_GRAPHS_LIMIT = 64


def compiled(fn, mode="default"):
    """torch.compile of fn (a module or a function) with fixed shapes, in `mode` (COMPILE_MODES; an Inductor option:
    the tests' backend "aot_eager" traces the same graphs and generates no code)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    if COMPILE_BACKEND != "inductor":
        return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)
    return torch.compile(fn, mode=mode, dynamic=False)


def compile_blocks(model, mode="default"):
    """Regional compilation (train.py --compile): the forward of each Transformer block (encoder_blocks) compiled,
    the rest of the step (embeddings, heads, the loss code) eager. TorchDynamo keeps its compiled graphs on the code
    object of the forward, which every block of a class shares, with guards on what the code reads: so each kind
    of block (X-FM: text, vision and fusion blocks; FLAVA: each encoder's input shape) compiles once and every
    layer of that kind reuses the graph, and the compile time does not grow with depth. What differs between
    layers of one kind must be a tensor, a graph input: a block's drop-path rate is given to it as the buffer
    drop_rate, which its compiled forward reads (a float would be a constant guarded per layer). The order is torchtitan's: activation checkpointing first
    (checkpoint_blocks: the compiled graph holds the checkpoint, so the recomputation is compiled too), then this,
    then DDP or FSDP (distribute), whose hooks run around the compiled forward, not inside it. With --compile the
    batch shapes are fixed (data.DataConfig.static), so after the first step no block compiles again."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPHS_LIMIT)
    blocks = encoder_blocks(model)
    dropping = [b for b in blocks if getattr(b, "pre_norm", False)]      # (model.Block: drop path's rate, a float)
    for block in dropping if any(b.drop_path > 0 for b in dropping) else ():  # all of them: one graph, rate 0 too
        block.register_buffer("drop_rate", torch.tensor(float(block.drop_path), device=block.gamma_1.device),
                              persistent=False)
    for block in blocks:
        block.forward = compiled(block.forward, mode)   # (after checkpoint_blocks: the checkpointed forward)
    return model


def compile_step(module, mode="default"):
    """torch.compile of a module whose forward computes every loss of a training step as one graph: the encoders,
    the heads and the loss code (and AOTAutograd compiles its backward), for tools/bench.py's and
    tools/gpu_check.py's whole-step rows, beside the regional compilation of train.py --compile (compile_blocks).
    The loss code is written with fixed shapes and no host syncs (docs/ENGINEERING.md), so with fixed batch shapes
    (data.DataConfig.static) the graph has no breaks and compiles once. mode "reduce-overhead" also records the
    step as a CUDA graph (CUDA only): one launch replays the whole graph."""
    return compiled(module, mode)


# ---------------------------------------------------------------------------------------------------------
# FSDP2 (train.py --fsdp): each rank keeps 1/world of every parameter, gradient and optimizer state


def shard(loss_model, model, param_dtype=None):
    """Fully shard the model with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), in place of DDP.

    Each rank keeps a 1/world slice (dim 0) of every parameter as a DTensor, and the optimizer built afterwards
    keeps only the state of that slice. fully_shard(module) makes one group of the module's parameters that no
    inner call took: before the module's forward the group's slices are all-gathered into full parameters,
    after it they are freed again, and after its backward its gradients are reduce-scattered (summed over the
    ranks, each keeping its slice), then averaged. One group per transformer block (encoder_blocks, the unit every
    encoder of both recipes is built from) means only about one block is ever whole in memory; the root group,
    on the LossModel, holds the rest (embeddings, heads, the temperature). The root must be the LossModel, not
    the model: the losses call model.encode_text() & co., which never run the model's own forward hooks.

    fully_shard refuses 0-dim parameters (it shards dim 0), such as X-FM's temperature and FLAVA's logit scale:
    each becomes a 1-element vector first (x / temp and exp(-logit_scale) broadcast the same), and
    full_state_dicts / load_full_state turn it back, so checkpoints keep the shapes of a DDP run's.
    param_dtype (bf16 autocast: torch.bfloat16): the parameters are all-gathered and computed with in that dtype,
    the gradients reduce-scattered in fp32, and the slices AdamW steps stay fp32 (MixedPrecisionPolicy)."""
    scalars = [name for name, p in model.named_parameters() if p.ndim == 0]
    for name in scalars:
        owner, _, attr = name.rpartition(".")
        p = model.get_parameter(name)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(p.detach().reshape(1), p.requires_grad))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in encoder_blocks(model):
        fully_shard(block, mp_policy=policy)  # inner groups first: each takes the parameters no inner call took
    fully_shard(loss_model, mp_policy=policy)  # the root: what is left; kept whole until backward
    model.fsdp_scalars = scalars             # (for the checkpoint helpers below)
    return loss_model


def wrap(loss_model, model, cfg, ddp, device, find_unused):
    """The loss module as train.py's loop calls it, in torchtitan's order: with --grad_ckpt each block recomputes
    its activations in the backward (checkpoint_blocks); with --compile each block's forward compiled, once per
    kind of block (compile_blocks: --compile pads texts to fixed lengths, so no block compiles again after the
    first step); every block's position bias in one gather (stack_position_biases; not under FSDP, where a block's
    table is whole only inside its forward); then DDP or FSDP (distribute)."""
    if cfg.grad_ckpt:
        checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model, cfg.compile_mode)
    if not (ddp and cfg.fsdp):
        stack_position_biases(model)
    sharded = cfg.fsdp and ddp
    param_dtype = torch.bfloat16 if sharded and amp_setup(cfg.amp, device, sharded)[2] == "bf16" else None
    return distribute(loss_model, model, ddp, cfg.fsdp, device, find_unused, param_dtype)


class PerUpdateDDP(torch.nn.Module):
    """Data parallelism that reduces, in each update, only the gradients that update made: one DDP per kind of
    update (the data kinds of its batch), each over the parameters that kind reaches, so no DDP looks for unused
    parameters (which costs a graph traversal and a host read of the used-parameter map in every backward, and
    an all-reduce of zeros for every parameter the update never reached). A kind's first update runs on the module
    itself: hooks on the parameters record which ones its backward reaches, and at the end of that backward (of its
    last micro-batch) those gradients are averaged over the ranks at once (reduce_reached); its next update builds
    that kind's DDP over them. Every rank runs the same kinds in the same order, and the sets are made equal across
    ranks. Only for graphs that are the same from batch to batch: the fast path's.
    -> the losses of loss_model(batch), as DDP(loss_model) gives them."""

    def __init__(self, loss_model, device):
        super().__init__()
        self.module, self.device = loss_model, device
        self.lean, self.reached, self.sync = {}, {}, True
        self.kinds, self.recording, self.queued = None, None, False     # (a kind's first update, under way)
        self.names = [n for n, p in loss_model.named_parameters() if p.requires_grad]
        for t in [*loss_model.parameters(), *loss_model.buffers()]:   # rank 0's weights on every rank, as DDP does
            dist.broadcast(t.data, src=0)
        for name, p in loss_model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, name=name: self.record(name))

    def agreed(self, reached):
        """The names any rank's backward reached (every rank calls it)."""
        used = torch.tensor([n in reached for n in self.names], dtype=torch.float32, device=self.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        return {n for n, u in zip(self.names, used.tolist()) if u}

    def record(self, name):
        if self.recording is None:
            return
        self.recording.add(name)
        if self.sync and not self.queued:  # the last micro-batch's backward: reduce when it ends
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce_reached)

    def reduce_reached(self):
        """End of a kind's first update: its gradients averaged over the ranks, in one all-reduce."""
        reached = self.reached[self.kinds] = self.agreed(self.recording)
        self.recording = None
        params = [p for n, p in self.module.named_parameters() if n in reached]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    def forward(self, batch):
        kinds = tuple(sorted(batch))
        if kinds not in self.lean and kinds in self.reached:  # its second update: its own DDP, built once
            ignore = [n for n in self.names if n not in self.reached[kinds]]
            self.module._ddp_params_and_buffers_to_ignore = ignore
            try:  # (DDP copies no buffer after the wrap: none changes in training)
                self.lean[kinds] = torch.nn.parallel.DistributedDataParallel(
                    self.module, broadcast_buffers=False,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None)
            finally:
                del self.module._ddp_params_and_buffers_to_ignore
        if kinds in self.lean:
            self.recording = None
            self.lean[kinds].require_backward_grad_sync = self.sync    # (no_sync: a micro-step before the last)
            return self.lean[kinds](batch)
        if self.recording is None or self.kinds != kinds:  # its first update's first micro-batch
            self.kinds, self.recording = kinds, set()
        self.queued = False
        return self.module(batch)

    @contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


def distribute(loss_model, model, ddp, fsdp, device, find_unused, param_dtype=None):
    """The loss module as every rank runs it under torchrun: sharded by FSDP2 with --fsdp (shard: every block, then
    the loss module, the root that runs every loss), else in DDP, which looks for parameters an update leaves
    unused when find_unused; without torchrun the module itself. FSDP under bf16 autocast (param_dtype) gathers
    bf16 parameters and reduces fp32 gradients (shard). DDP copies rank 0's buffers to every rank once,
    when it wraps: no buffer changes in training (position indices, drop-path rates, FLAVA's codebook, fitted or
    loaded before the wrap), so no forward broadcasts them again."""
    if ddp and fsdp:
        return shard(loss_model, model, param_dtype)
    if ddp and find_unused and getattr(loss_model, "fast", False):  # graphs that stay the same: no unused search
        return PerUpdateDDP(loss_model, device)
    if ddp:
        return torch.nn.parallel.DistributedDataParallel(loss_model, find_unused_parameters=find_unused,
                                                         broadcast_buffers=False,
                                                         device_ids=[device.index] if device.type == "cuda" else None)
    return loss_model


def is_sharded(model):
    return hasattr(model, "fsdp_scalars")


def full_tensor(x):
    """A DTensor (a sharded parameter, or the gradient norm clip_grad_norm_ computes over sharded gradients, already
    the global norm of every rank's slices) as one plain tensor, the same on every rank; any other tensor as it is."""
    return x.full_tensor() if isinstance(x, DTensor) else x


@contextmanager
def no_sync(loss_model):
    """Gradient accumulation without communication on the micro-steps before the last (train.forward_backward).
    DDP has no_sync(); FSDP2 keeps the micro-steps' full (unsharded) gradients on each rank while the flag is off
    and reduce-scatters their sum in the backward of the last micro-step, which must run with the flag on."""
    if not hasattr(loss_model, "set_requires_gradient_sync"):
        with loss_model.no_sync():
            yield
        return
    loss_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        loss_model.set_requires_gradient_sync(True)


def _state_options():
    # full_state_dict: whole tensors, not each rank's slices; cpu_offload: gathered one tensor at a time to rank 0's
    # CPU memory (the other ranks get an empty dict), so no GPU ever holds the whole model at once
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model, optimizer):
    """The name of each parameter of the optimizer, in the order of a plain optimizer state dict's integer keys."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(model, optimizer=None):
    """(model state dict, optimizer state dict or None) as a plain model's and optimizer's: whole tensors, integer
    optimizer keys, 0-dim parameters 0-dim. Sharded (FSDP): a collective that every rank must call; only rank 0
    gets the dicts (the others get empty ones). torch.distributed.checkpoint keys the optimizer's state by
    parameter name; a plain optimizer numbers the parameters in the order of its param groups."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    model_state = get_model_state_dict(model, options=_state_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options()) if optimizer else None
    if not model_state:  # not rank 0
        return {}, {}
    for name in model.fsdp_scalars:                                        # (1,) -> () as in the unsharded model
        model_state[name] = model_state[name].reshape(())
    if optimizer is None:
        return model_state, None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state = {index[n]: {k: v.reshape(()) if n in model.fsdp_scalars and k != "step" else v for k, v in s.items()}
             for n, s in optim_state["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def load_full_state(model, optimizer, model_state, optim_state):
    """Load full_state_dicts' plain dicts (a checkpoint of a sharded or an unsharded run): each rank keeps its own
    slice of every tensor. Every rank calls it with the whole dicts."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    vector = lambda n, k, v: v.reshape(1) if n in model.fsdp_scalars and k != "step" else v  # () -> (1,)  # noqa: E731
    set_model_state_dict(model, {k: vector(k, "", v) for k, v in model_state.items()}, options=_state_options())
    names = _param_names(model, optimizer)
    state = {names[int(i)]: {k: vector(names[int(i)], k, v) for k, v in s.items()} for i, s in optim_state["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_state_options())


def unsharded(model, build):
    """The model as one plain module on every rank, for the end-of-run evaluation: lib/retrieval.py splits the work
    over the ranks with collectives of its own, and a sharded model's forward would all-gather each block's
    parameters in whatever order each rank's share calls them. A fresh build() loaded with the full state (each
    DTensor all-gathered, the same on every rank, which must all call it). An unsharded model is returned as it is."""
    if not is_sharded(model):
        return model
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    for name in model.fsdp_scalars:                                        # (1,) -> () as in the unsharded model
        state[name] = state[name].reshape(())
    plain = build()
    plain.load_state_dict(state)
    return plain


# ---------------------------------------------------------------------------------------------------------
# The checkpoint files of a run (train.py --keep_last)


def keep_checkpoints(path, step, keep_last):
    """Rank 0, once the checkpoint of `step` is complete at path (RUN/ckpt.pt): with keep_last = N > 0 it also gets
    the name RUN/ckpt_STEP.pt (a hard link: a second name for the same file, no copy), and every numbered
    checkpoint but the N of the highest steps is deleted. ckpt.pt is always the newest (what --resume=RUN and
    finetune.py --init RUN read); a kept one resumes by its name (--resume=RUN/ckpt_000500.pt). A name appears or
    goes in one step (os.replace, os.remove) and the oldest goes only after the newest is complete, so a crash at
    any point leaves every kept checkpoint whole. keep_last = 0: ckpt.pt alone."""
    if keep_last == 0:
        return
    run_dir = os.path.dirname(path) or "."
    named = os.path.join(run_dir, f"ckpt_{step:06d}.pt")
    if os.path.lexists(named + ".tmp"):  # left by a crash; it may be a name of a kept checkpoint: never write into it
        os.remove(named + ".tmp")
    try:
        os.link(path, named + ".tmp")
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(path, named + ".tmp")
    os.replace(named + ".tmp", named)  # (the same step saved again, e.g. after a resume, replaces it)
    steps = sorted(int(m[1]) for name in os.listdir(run_dir) if (m := re.fullmatch(r"ckpt_(\d+)\.pt", name)))
    for old in steps[:-keep_last]:
        os.remove(os.path.join(run_dir, f"ckpt_{old:06d}.pt"))
