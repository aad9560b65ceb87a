"""
X-FM pre-training: the main job. Reads top to bottom: config -> distributed setup -> data -> model ->
DDP or FSDP -> (compile) -> optimizer -> (resume) -> loop -> evaluation -> teardown.

    python train.py                                   # toy world, tiny model, CPU, a few minutes
    python train.py --help                            # every config key with its default
    python train.py --data_dir=my_data --config=small --max_steps=20000 --batch_size=256
    torchrun --standalone --nproc_per_node=8 train.py --config=base --data_dir=...     # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

With no arguments it builds the toy world in data/toy if it is missing, trains the tiny X-FM, evaluates
zero-shot image-text retrieval on the held-out toy pairs (ITC ranking, then ITM re-ranking of the top k) and
writes runs/default/{config.json, metrics.jsonl, ckpt.pt, loss_curves.png, tokenizer.json}.

One step follows the official schedule (docs/METHOD.md §5.2), three optimizer updates in order:
    1. text: MLM            2. regions + images: ITC/ITM/IMLM/BBP + MIM            3. pairs: ITC/ITM/IMLM/MIM
or, with --schedule=summed, one update over the sum of every loss.
With --recipe=flava (flava.py) a step is three updates too, each on ONE data kind drawn with --flava_ratios.
"""
import json
import os
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from lib import cli
import data
from lib import tokenizer
from lib import formats
import flava
from lib import pretrained
from lib import retrieval
from lib import runlog
from lib import runtime
from lib import shards
from lib import toyworld
from losses import xfm_losses
from model import make_config

# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    # model and recipe
    config: str = "tiny"            # model preset: tiny | small | base (model.py PRESETS)
    recipe: str = "xfm"             # pre-training recipe: xfm | flava (flava.py; FLAVA's wd 0.1 and beta2 0.999)
    stop_grad: bool = True          # X-FM idea 1: detach the language encoder's output before the fusion encoder
    mim_target: str = "vl"          # X-FM idea 2: vl (same encoder, unmasked view) | pixel (MAE-style) | off
    flava_ratios: str = "0.70,0.15,0.15"  # FLAVA: probability of pair, image, text data for each update
    codebook_size: int = 256        # FLAVA: image-token vocabulary of the k-means tokenizer (the dVAE's: 8192)
    image_tokenizer: str = ""       # FLAVA: a saved RUN/image_tokenizer.pt to reuse; empty = fit one on the data
    attn_impl: str = "auto"         # auto (SDPA where fused, else written out) | sdpa | explicit (written out, for teaching)
    init_text: str = ""             # Hugging Face RoBERTa folder: language encoder + MLM head (lib/pretrained.py)
    init_vision: str = ""           # BEiT-v2 checkpoint (official .pth or Hugging Face folder): vision encoder
    # data
    data_dir: str = "data/toy"      # folder with pairs/regions/text/images (lib/formats.py); the toy world is built here if missing
    image_root: str = ""            # image paths are relative to this folder (ALBEF's JSONs); empty: each file's folder
    out_dir: str = "runs/default"   # run folder: config, metrics, checkpoint, curves, tokenizer; a folder that
                                    # holds a run is refused (--resume it, or --overwrite it)
    tokenizer: str = ""             # path to a tokenizer.json (e.g. RoBERTa's); empty: train a BPE on the data
                                    # (with --init_text: that folder's tokenizer.json if it has one)
    vocab_size: int = 2000          # BPE size when training a tokenizer
    caption_len: int = 30           # max caption tokens (pairs, regions)
    text_len: int = 64              # max tokens of a text-only document
    crop_min_scale: float = 0.8     # random resized crop scale lower bound (official: 0.2; the toy captions name positions)
    hflip: bool = False             # horizontal flip (off: captions say "left of"/"right of")
    num_workers: int = 0            # DataLoader workers per rank
    shuffle_buffer: int = 1000      # tar shards (lib/shards.py): the samples each worker shuffles among
    strict: bool = False            # any bad input record is an error instead of being skipped and counted
    # optimisation
    max_steps: int = 600            # steps (each = three optimizer updates, or one with schedule=summed)
    stop_at: int = 0                # stop (as if interrupted) after this step, keeping the schedule of max_steps; 0 = off
    batch_size: int = 16            # global batch of the pair and image streams
    text_batch_size: int = 0        # global text-only batch; 0 = batch_size
    region_batch_size: int = 0      # global region batch in images (~3 captions each on the toy world); 0 = batch_size / 2
    micro_batch_size: int = 0       # per-rank micro batch; 0 = batch_size / world_size (no accumulation)
    schedule: str = "three"         # three (official: text | regions+images | pairs) | summed (one update)
    lr: float = 1e-3                # peak lr (official 1e-4 from pre-trained encoders; from scratch ~5e-4..1e-3)
    lr_mult: float = 2.0            # lr multiplier for the new heads and the temperature (official lr_mult)
    warmup_steps: int = 30          # linear warmup, then linear decay to 0 at max_steps
    weight_decay: float = 0.01      # AdamW weight decay (not on biases, norms, tokens, the temperature)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # AdamW beta2 (FLAVA: 0.999)
    grad_clip: float = 1.0          # clip the global gradient norm of each update to this
    max_bad_steps: int = 5          # this many non-finite updates in a row stop the run (with a checkpoint)
    # runtime
    device: str = "auto"            # auto (cuda > mps > cpu) | cpu | cuda | mps
    amp: str = "auto"               # auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp16 (CUDA, with GradScaler) | fp32
    compile: bool = False           # torch.compile the whole step's losses as one graph; texts padded to fixed lengths
    compile_mode: str = "default"   # with --compile: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    grad_ckpt: bool = False         # activation checkpointing per block: less memory for about one more forward
    fsdp: bool = False              # under torchrun: shard parameters, gradients and AdamW state over the ranks
                                    # (PyTorch's FSDP2, runtime.shard) instead of DDP; without torchrun: no effect
    seed: int = 0                   # model init, data order, masks, hard negatives (per rank: seed * 1000 + rank)
    log_every: int = 25             # steps between metrics.jsonl records (losses averaged over the ranks)
    ckpt_every: int = 500           # steps between checkpoints (RUN/ckpt.pt, written atomically; also at the end)
    keep_last: int = 0              # N > 0: also keep the N newest checkpoints as RUN/ckpt_STEP.pt; 0 = ckpt.pt alone
    export: str = ""                # a folder for the final weights: config.json, model.safetensors, tokenizer.json
    resume: str = ""                # a run folder or ckpt.pt to continue from: its model, recipe, tokenizer and
                                    # data settings stay; only the RESUME_MAY_CHANGE keys may be given anew
    overwrite: bool = False         # a fresh run into a folder that holds a run deletes that run's files first
    eval_k: int = 16                # retrieval: ITM re-ranks the top k ITC candidates (official k_test 256)
    eval_batch_size: int = 64       # retrieval evaluation: images, captions or ITM (query, candidate) pairs per forward


# the keys with a fixed set of values (checked when the command line is read, before any work)
CHOICES = {"config": ("tiny", "small", "base"), "recipe": ("xfm", "flava"), "mim_target": ("vl", "pixel", "off"),
           "attn_impl": ("auto", "sdpa", "explicit"), "schedule": ("three", "summed"), "device": ("auto", "cpu", "cuda", "mps"),
           "amp": ("auto", "bf16", "fp16", "fp32"), "compile_mode": runtime.COMPILE_MODES}


# the keys a resumed run may set anew; every other key is the run's own (the checkpoint's train_config), and a
# value that contradicts it is refused before anything is written (check_resume)
RESUME_MAY_CHANGE = ("resume", "out_dir", "overwrite", "data_dir", "image_root", "max_steps", "stop_at", "lr",
                     "warmup_steps", "grad_clip", "max_bad_steps", "micro_batch_size", "text_len", "caption_len",
                     "num_workers", "shuffle_buffer", "strict", "device", "amp", "compile", "compile_mode",
                     "grad_ckpt", "fsdp", "attn_impl", "log_every", "ckpt_every", "keep_last", "export", "eval_k",
                     "eval_batch_size")


def parse_args(argv):
    resume = textwrap.fill("With --resume=RUN the run keeps its own config; only these keys may be given anew: "
                           + ", ".join(k for k in RESUME_MAY_CHANGE if k != "resume") + ".", 110)
    intro = __doc__.strip().split("\n\n")[1] + "\n\n" + resume
    return cli.parse_overrides(argv, TrainConfig, intro, CHOICES)


# ---------------------------------------------------------------------------------------------------------
# Distributed setup, logging, optimizer, schedule


def param_groups(model, weight_decay, lr_mult):
    """AdamW groups: no decay on biases, norms, layer-scale gammas, the temperature and the CLS/mask tokens
    (FLAVA: also its image positions); lr x lr_mult for the new heads and the temperature (model.NEW_PARAMS,
    docs/METHOD.md §6.1). Asserts the groups partition the params."""
    groups = {}
    no_decay_names = getattr(model, "NO_DECAY", ("cls_token", "mask_token"))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(no_decay_names)
        new = name.split(".")[0] in getattr(model, "NEW_PARAMS", ())
        key = (no_decay, new)
        groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                "lr_scale": lr_mult if new else 1.0})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    named = [n for g in groups.values() for n in g["names"]]
    assert len(named) == len(set(named)) == len([p for p in model.parameters() if p.requires_grad])
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def batch_plan(cfg, world):
    """Global batch per stream -> (per-rank micro batch, accumulation steps, {stream: per-rank batch}), exact:
    batch_size = micro x accum x world, and the text and region batches split over the same accum x world."""
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1:
        raise SystemExit(f"error: batch_size {cfg.batch_size} is smaller than the world size {world}")
    accum = cfg.batch_size // (micro * world)
    text_global = cfg.text_batch_size or cfg.batch_size
    region_global = cfg.region_batch_size or max(cfg.batch_size // 2, accum * world)
    if accum < 1 or accum * micro * world != cfg.batch_size or text_global % (accum * world) or region_global % (accum * world):
        raise SystemExit(f"error: batch_size {cfg.batch_size} (text {text_global}, region {region_global}) must be "
                         f"a multiple of micro_batch_size {micro} x world_size {world}")
    per_rank = {"pair": micro, "region": region_global // (accum * world), "image": micro,
                "text": text_global // (accum * world)}
    return micro, accum, per_rank


def get_lr(step, lr, warmup_steps, max_steps):
    """Linear warmup over warmup_steps, then linear decay to 0 at max_steps (docs/METHOD.md §6.1)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def forward_backward(loss_model, micro_batches, accum, ddp, autocast, scaler):
    """Forward and backward over one update's `accum` micro-batches; gradients accumulate in .grad.

    Each micro-batch's loss is divided by accum, so the summed gradients are the MEAN over the global batch.
    Under DDP the gradients are all-reduced (FSDP: reduce-scattered) only on the last micro-step: no_sync() must
    cover the forward as well as the backward. Returns (the update's total loss, detached; {name: loss / accum}).
    """
    total, logs = 0.0, {}
    for i, batch in enumerate(micro_batches):
        sync = not ddp or i == accum - 1
        with (nullcontext() if sync else runtime.no_sync(loss_model)):
            with autocast():
                losses, stats = loss_model(batch)
            loss = sum(losses.values()) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        total = total + loss.detach()
        for name, val in {**losses, **stats}.items():
            logs[name] = logs.get(name, 0.0) + val.detach().float() / accum
    return total, logs


def optimizer_step(optimizer, scaler, params, clip):
    """Clip and step (train.py, finetune.py and tools/bench.py share it). With fp16's GradScaler the gradients are
    unscaled first, so the clipping sees the true gradients. -> the gradient norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(optimizer)                                             # skips the step on inf/nan gradients
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return runtime.full_tensor(grad_norm)  # FSDP: clip_grad_norm_ gives a DTensor, the global norm of all slices


# ---------------------------------------------------------------------------------------------------------
# The recipes, in one table: what X-FM and FLAVA do differently (FLAVA's own parts live in flava.py)


@dataclass(frozen=True)
class Recipe:
    model_config: Callable  # (cfg, tok) -> the model's config; flava.build_model builds either model from it
    losses: Callable        # (model, batch, stop_grad, stats) -> {name: scalar loss}; the update's loss is their sum
    kinds: Callable         # cfg -> the data kinds (streams) the recipe trains on
    update_plan: Callable   # (cfg, streams) -> plan; plan(step) -> the data kinds of each optimizer update
    prepare: Callable       # (cfg, model, streams, share, save, progress) -> None: set-up before the first step
    defaults: dict          # config values where the command line says nothing
    refused: tuple          # keys of the other recipe, refused rather than silently ignored
    describe: Callable      # cfg -> one line for the log


def xfm_update_plan(cfg, streams):
    """X-FM's step (docs/METHOD.md §5.2): three optimizer updates in order, text | regions + images | pairs, or
    one summed update with --schedule=summed. A data kind the folder lacks is left out."""
    updates = [["text"], ["region", "image"], ["pair"]] if cfg.schedule == "three" else [["text", "region", "image", "pair"]]
    updates = [[k for k in u if k in streams] for u in updates]
    updates = [u for u in updates if u]
    return lambda step: updates


RECIPES = {
    "xfm": Recipe(
        model_config=lambda cfg, tok: make_config(cfg.config, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                                  mim_target=cfg.mim_target, attn_impl=cfg.attn_impl,
                                                  max_text_len=max(cfg.caption_len, cfg.text_len)),
        losses=lambda model, batch, stop_grad, stats: xfm_losses(model, batch, stop_grad=stop_grad, stats=stats),
        kinds=lambda cfg: ("text", "pair", "region") + (("image",) if cfg.mim_target != "off" else ()),  # images feed MIM only
        update_plan=xfm_update_plan, prepare=lambda *args: None, defaults={}, refused=(),
        describe=lambda cfg: f"X-FM {cfg.config} | stop_grad {cfg.stop_grad} | mim_target {cfg.mim_target} | "
                             f"schedule {cfg.schedule}"),
    "flava": Recipe(
        model_config=flava.run_config,
        losses=lambda model, batch, stop_grad, stats: flava.flava_losses(model, batch, stats=stats),
        kinds=lambda cfg: ("text", "pair", "image"),  # no region objective; pairs masked 15 %, BERT style
        update_plan=flava.update_plan, prepare=flava.prepare_run, defaults=flava.RUN_DEFAULTS,
        refused=flava.XFM_ONLY_KEYS, describe=lambda cfg: f"FLAVA {cfg.config} | data kinds per update {cfg.flava_ratios}"),
}


class LossModel(nn.Module):
    """What DDP wraps: its forward runs the whole loss computation, so DDP's reducer sees every parameter the
    step uses (calling model methods outside a DDP forward would silently skip the gradient sync)."""

    def __init__(self, model, stop_grad, recipe="xfm"):
        super().__init__()
        self.model, self.stop_grad, self.losses = model, stop_grad, RECIPES[recipe].losses

    def forward(self, batch):
        stats = {}
        return self.losses(self.model, batch, self.stop_grad, stats), stats


# ---------------------------------------------------------------------------------------------------------
# Setting up a run: data, tokenizer, model, optimizer, resume. Rank 0 prepares what every rank needs.


def setup_data(cfg, ckpt, recipe, per_rank, rank, world, ddp, device, bad):
    """-> (tokenizer, model config, {kind: data.Stream, or shards.ShardStream for tar shards}). Rank 0 builds the
    toy world if the default folder is missing and trains (or loads) the tokenizer; every rank gets the tokenizer's
    JSON, so no rank re-decides from its own disk and the nodes need no shared folder for it."""
    runtime.rank0_shares(lambda: toyworld.build_if_missing(cfg.data_dir), ddp, rank)
    if not os.path.isdir(cfg.data_dir):  # another node, without rank 0's file system
        raise SystemExit(f"error: data_dir {cfg.data_dir!r} does not exist on rank {rank}'s node (copy it there)")
    if cfg.init_text and not cfg.tokenizer and ckpt is None:  # the pre-trained encoder's own vocabulary
        hf_tok = pretrained.tokenizer_path(cfg.init_text)
        if os.path.isfile(hf_tok):
            cfg.tokenizer = hf_tok

    def prepare_tokenizer():  # saved in the run folder too, so the folder is a complete --init for finetune.py
        if ckpt is not None:
            tok = runlog.run_tokenizer(ckpt, cfg.resume)
        else:
            tok = tokenizer.get_tokenizer(cfg.data_dir, cfg.out_dir, cfg.vocab_size, cfg.tokenizer or None,
                                          cfg.image_root)
        tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
        return tok.to_json()
    tok = tokenizer.Tokenizer.from_json(runtime.rank0_shares(prepare_tokenizer, ddp, rank))
    if ckpt is not None:  # a resumed run's own config; else the recipe's preset, with what --init_text/vision say
        model_cfg = replace(flava.config_from_dict(ckpt["model_config"]), attn_impl=cfg.attn_impl)
    else:
        model_cfg = recipe.model_config(cfg, tok)
        if cfg.init_text or cfg.init_vision:
            model_cfg = pretrained.model_config(cfg, model_cfg, tok)
    dc = data.DataConfig(model_cfg.image_size, model_cfg.patch_size, cfg.text_len, cfg.caption_len, cfg.seed, cfg.hflip,
                         (cfg.crop_min_scale, 1.0), caption_mask=cfg.recipe, image_root=cfg.image_root,
                         itm_neg_prob=getattr(model_cfg, "itm_neg_prob", 0.0), static=cfg.compile)
    streams = shards.build_streams(cfg.data_dir, tok, dc, per_rank, bad, rank, world, cfg.num_workers,
                                   pin_memory=device.type == "cuda", buffer=cfg.shuffle_buffer)
    if not streams:
        raise SystemExit(f"error: no training data found in {cfg.data_dir} (formats: lib/formats.py, lib/shards.py)")
    return tok, model_cfg, streams


def setup_model(cfg, ckpt, recipe, model_cfg, streams, rank, ddp, device, bad):
    """-> (model, the module the loop calls, optimizer, the step to start from). The model (X-FM or FLAVA, as
    model_cfg says), the recipe's set-up (FLAVA: its image tokenizer) and the pre-trained encoders; a resume
    restores model, optimizer and streams instead."""
    model = flava.build_model(model_cfg)
    if ckpt is None:
        recipe.prepare(cfg, model, streams, lambda fn: runtime.rank0_shares(fn, ddp, rank), runlog.atomic_save,
                       lambda x: tqdm(x, desc="image tokenizer", leave=False, disable=rank != 0))
        for path, load in ((cfg.init_text, pretrained.load_text), (cfg.init_vision, pretrained.load_vision)):
            report = load(model, path) if path else None
            if report and rank == 0:
                print(report, flush=True)
    model = model.to(device)
    loss_model = wrap(model, cfg, streams, ddp, device)
    # built after the wrap: FSDP replaces every parameter by its shard, and AdamW must hold (and keep state for) those
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr_mult), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device.type == "cuda")
    if ckpt is None:
        return model, loss_model, optimizer, 0
    runtime.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])  # FSDP: each rank keeps its slices
    for k, s in streams.items():
        if k in ckpt["data"]:
            s.load_state_dict(ckpt["data"][k])
    bad.load_state_dict(ckpt.get("bad_input", {}))  # the bad records found before: each still counted once
    return model, loss_model, optimizer, ckpt["step"]


def wrap(model, cfg, streams, ddp, device):
    """The module the loop calls: LossModel, in DDP under torchrun, sharded by FSDP2 with --fsdp. With --compile the
    whole of it is compiled, every loss of a micro-batch as one graph (runtime.compile_step): the loss code has fixed
    shapes and no host syncs, and --compile pads texts to fixed lengths, so the graph compiles once, never breaks."""
    model = runtime.checkpoint_blocks(model) if cfg.grad_ckpt else model   # --grad_ckpt: recompute in backward
    loss_model = LossModel(model, cfg.stop_grad, cfg.recipe)
    if ddp and cfg.fsdp:  # FSDP2 on every block, then on the LossModel: the root that runs every loss (runtime.shard)
        loss_model = runtime.shard(loss_model, model)
    elif ddp:
        # each of the three updates touches a different subset of the parameters (the text update never runs the
        # vision encoder), so DDP looks for unused parameters, except under the summed schedule over every kind
        all_used = cfg.recipe == "xfm" and cfg.schedule == "summed" and set(streams) == set(data.KINDS)
        loss_model = nn.parallel.DistributedDataParallel(loss_model, find_unused_parameters=not all_used,
                                                         device_ids=[device.index] if device.type == "cuda" else None)
    return runtime.compile_step(loss_model, cfg.compile_mode) if cfg.compile else loss_model


# ---------------------------------------------------------------------------------------------------------
# Pieces of the loop: the batches of an update, a non-finite update (the log and the end of the run: lib/runlog.py)


def next_batches(streams, kinds, accum, device, meter):
    """An update's `accum` micro-batches {kind: batch}, each fetched when forward_backward reaches it (so only one
    is on the device at a time); the samples are counted for the log."""
    for _ in range(accum):
        batch = {k: next(streams[k]) for k in kinds}  # (a stream counts unreadable images in `bad`)
        # counted on the host copy: images, texts, or a region batch's filled caption slots
        meter.samples += sum(len(b["image"]) if k == "image" else int(b["valid"].sum()) if "valid" in b
                             else len(b["ids"]) for k, b in batch.items())
        yield {k: runtime.to_device(b, device) for k, b in batch.items()}


def nonfinite_everywhere(loss, ddp):
    """Every rank must agree whether to step: a non-finite loss on any rank skips the update on all of them."""
    flag = (~torch.isfinite(loss)).float()
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


# ---------------------------------------------------------------------------------------------------------
# Main and the training loop


def main(argv=None):
    cfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    ddp, rank, _, world, device = runtime.setup_distributed(cfg.device)
    held = []  # the run folder's lock (rank 0: claim_run_folder), released however the run ends
    try:
        ckpt = runlog.load_checkpoint(cfg.resume, "cpu") if cfg.resume else None
        if ckpt is not None:  # continue a run: its own config, with what the command line may change (check_resume)
            cfg = runlog.check_resume(cfg.resume, ckpt, given, TrainConfig, RESUME_MAY_CHANGE)
        recipe = RECIPES[cfg.recipe]
        refused = [k for k in recipe.refused if k in given]
        if refused:
            other = next(name for name in RECIPES if name != cfg.recipe)
            raise SystemExit(f"error: --{refused[0]} belongs to the {other} recipe; {cfg.recipe} has no such option")
        if ckpt is None:  # the recipe's defaults where the command line says nothing
            cfg = replace(cfg, **{k: v for k, v in recipe.defaults.items() if k not in given})
        return train(cfg, ckpt, ddp, rank, world, device, held)
    except formats.StrictError as e:
        raise formats.strict_exit(e) from None
    finally:
        for lock in held:
            lock.release()
        runtime.teardown()


def train(cfg, ckpt, ddp, rank, world, device, held):
    t_start, master, recipe = time.time(), rank == 0, RECIPES[cfg.recipe]
    print0 = lambda *a: print(*a, flush=True) if master else None      # noqa: E731
    autocast, scaler, amp = runtime.amp_setup(cfg.amp, device, cfg.fsdp and ddp)  # (a bad --amp fails before any work)
    micro, accum, per_rank = batch_plan(cfg, world)                      # (bad sizes fail before any work)
    if cfg.keep_last < 0:
        raise SystemExit(f"error: --keep_last is a number of checkpoints to keep (0: ckpt.pt alone), not {cfg.keep_last}")
    if cfg.export:                                                       # (a run folder would lose its config.json)
        pretrained.check_export_dir(cfg.export, cfg.out_dir)
    per_rank = {k: n for k, n in per_rank.items() if k in recipe.kinds(cfg)}  # the recipe's data kinds
    runtime.rank0_shares(lambda: held.append(runlog.claim_run_folder(cfg, ckpt)), ddp, rank)  # (nothing written before)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same model init on every rank (DDP also broadcasts rank 0's weights)
    bad = formats.BadInput(strict=cfg.strict, verbose=master)
    tok, model_cfg, streams = setup_data(cfg, ckpt, recipe, per_rank, rank, world, ddp, device, bad)
    sources = {**formats.find_sources(cfg.data_dir), **shards.find_shards(cfg.data_dir)}  # files, shard folders
    # the held-out pairs, each image decoded, before step 1: a bad one is skipped now, a set left empty stops the
    # run here. Counted apart (a resume reads them again) and added to the run's count by finish
    held_bad = formats.BadInput(strict=cfg.strict, verbose=master)
    held_out = runtime.rank0_shares(lambda: retrieval.load_retrieval_set(
        sources["pair_test"], tok, model_cfg.image_size, cfg.caption_len, held_bad, cfg.image_root),
        ddp, rank) if "pair_test" in sources else None
    plan = recipe.update_plan(cfg, streams)
    model, loss_model, optimizer, start_step = setup_model(cfg, ckpt, recipe, model_cfg, streams, rank, ddp, device,
                                                           bad)
    if ckpt is not None:
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        print0(f"resumed from {cfg.resume} at step {start_step}")
    # the per-rank RNG (hard negatives, dropout) is seeded after the shared init; a resume restores it exactly
    torch.manual_seed(cfg.seed * 1000 + rank)
    if ckpt is not None:
        runtime.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])       # this rank's own random state
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            json.dump({"train": asdict(cfg), "model": asdict(model_cfg), "world_size": world, "amp": amp,
                       "device": device_name, "accum_steps": accum, "per_rank_batch": per_rank, "data": sources},
                      f, indent=2)
    print0(f"{recipe.describe(cfg)}: {model.num_params() / 1e6:.2f}M parameters | device {device} x{world} | amp {amp}"
           f" | streams {sorted(streams)} | per-rank batch {per_rank} x{accum} accum")

    # ---- the loop: each step is the recipe's optimizer updates, each over `accum` micro-batches ------------
    metrics_path, ckpt_path = os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "ckpt.pt")
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    meter, history, bad_streak, skipped = runlog.Meter(), [], 0, 0
    save = lambda step: runlog.save_checkpoint(ckpt_path, model, optimizer, scaler, step, cfg, model_cfg,  # noqa: E731
                                        streams, {"bad_input": bad.state_dict(), "tokenizer": tok.to_json()},
                                        master)                                           # (every rank calls it)
    pbar = tqdm(total=end_step, initial=start_step, disable=not master, desc="train", dynamic_ncols=True)
    for step in range(start_step, end_step):
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        for kinds in plan(step):
            micro_batches = next_batches(streams, kinds, accum, device, meter)
            update_loss, logs = forward_backward(loss_model, micro_batches, accum, ddp, autocast, scaler)
            meter.add(logs)
            if nonfinite_everywhere(update_loss, ddp):
                optimizer.zero_grad(set_to_none=True)
                bad_streak, skipped = bad_streak + 1, skipped + 1
                print0(f"warning: non-finite loss at step {step} ({'+'.join(kinds)}): update skipped")
                if bad_streak >= cfg.max_bad_steps:
                    save(step)
                    raise SystemExit(f"error: {bad_streak} non-finite updates in a row at step {step}; stopped. "
                                     f"The last good state is in {ckpt_path} (lower --lr, or try --amp=fp32).")
                continue
            bad_streak = 0
            grad_norm = optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)
            meter.add({"grad_norm": grad_norm.detach().float()})
            model.clamp_temp()
        meter.steps += 1
        pbar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end_step:
            history.append(meter.record(done, lr, model, world, ddp))
            meter = runlog.Meter()
            if master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
                pbar.set_postfix_str(" ".join(f"{n}={history[-1]['loss/' + n]:.2f}"
                                              for n in ("itc", "gc", "itm", "mlm", "mim") if "loss/" + n in history[-1]))
        if done % cfg.ckpt_every == 0 or done == end_step:
            save(done)
        if ddp and done % cfg.ckpt_every == 0:
            dist.barrier()
    pbar.close()

    final = {"final": True, "step": end_step, "wall_s": time.time() - t_start, "skipped_updates": skipped,
             "bad_input": bad.counts()}
    model = runtime.unsharded(model, lambda: flava.build_model(model_cfg).to(device))  # FSDP: a plain copy per rank
    if master and cfg.export:  # the final weights alone, a folder finetune.py --init reads (pretrained.export)
        pretrained.export(cfg.export, cfg.out_dir, model.state_dict(), asdict(model_cfg), asdict(cfg), end_step)
    runlog.finish(cfg, model, held_out, held_bad, history, final, bad, device, autocast, rank, world)
    if ddp:
        dist.barrier()
    return {"history": history, "final": final}


if __name__ == "__main__":
    main()
