"""
X-FM pre-training: the main job. Reads top to bottom: config -> distributed setup -> data ->
model -> DDP or FSDP -> (compile) -> optimizer -> (resume) -> loop -> evaluation -> teardown.

    python train.py                                   # toy world, tiny model, CPU, a few minutes
    python train.py --help                            # every config key with its default
    python train.py --data_dir=my_data --config=small --max_steps=20000 --batch_size=256
    torchrun --standalone --nproc_per_node=8 train.py --config=base --data_dir=...     # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

With no arguments it builds the toy world in data/toy if it is missing, trains the tiny X-FM,
evaluates zero-shot image-text retrieval on the held-out toy pairs (ITC ranking, then ITM
re-ranking of the top k) and writes runs/default/{config.json, metrics.jsonl, ckpt.pt,
loss_curves.png, tokenizer.json}.

One step follows the official schedule (docs/METHOD.md §5.2), three optimizer updates in order
(XFM_UPDATES, next to the loop):
    1. text: MLM
    2. regions + images: ITC/ITM/IMLM/BBP + MIM
    3. pairs: ITC/ITM/IMLM/MIM
or, with --schedule=summed, one update over the sum of every loss. With --recipe=flava (flava.py)
a step is three updates too, each on ONE data kind drawn with --flava_ratios (flava.step_updates).
"""
import os
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import flava
from lib import cli
from lib import pretrained
from lib import runlog
from lib import runtime
from lib import shards
from lib import fast_losses
from losses import xfm_losses
from model import XFM, make_config

# -------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    # model and recipe
    config: str = "tiny"            # model preset: tiny | small | base (model.py PRESETS)
    recipe: str = "xfm"             # pre-training recipe: xfm | flava (flava.py; FLAVA's wd 0.1 and
                                    # beta2 0.999)
    stop_grad: bool = True          # X-FM idea 1: detach the language encoder's output before the
                                    # fusion encoder
    mim_target: str = "vl"          # X-FM idea 2: vl (same encoder, unmasked view) | pixel
                                    # (MAE-style) | off
    flava_ratios: str = "0.70,0.15,0.15"  # FLAVA: probability of pair, image, text data for each
                                    # update
    codebook_size: int = 256        # FLAVA: image-token vocabulary of the k-means tokenizer (the
                                    # dVAE's: 8192)
    image_tokenizer: str = ""       # FLAVA: a saved RUN/image_tokenizer.pt to reuse; a folder: the
                                    # DALL-E codebook (flava-image-codebook); empty = fit k-means
    attn_impl: str = "auto"         # auto (SDPA where fused, else written out) | sdpa | explicit
                                    # (written out, for teaching)
    init_text: str = ""             # Hugging Face RoBERTa folder: language encoder + MLM head
                                    # (lib/pretrained.py)
    init_vision: str = ""           # BEiT-v2 checkpoint (official .pth or Hugging Face folder):
                                    # vision encoder
    init: str = ""                  # an export folder (--export, convert-xfm, convert-flava): a fresh
                                    # run (step 0) from its whole model; its recipe, model config and
                                    # tokenizer are the run's (lib/pretrained.py, init_run)
    # data
    data_dir: str = "data/toy"      # folder with pairs/regions/text/images (lib/formats.py); the
                                    # toy world is built here if missing
    image_root: str = ""            # image paths are relative to this folder (ALBEF's JSONs);
                                    # empty: each file's folder
    out_dir: str = "runs/default"   # run folder: config, metrics, checkpoint, curves, tokenizer; a
                                    # folder that holds a run is refused (--resume it, or
                                    # --overwrite it)
    tokenizer: str = ""             # path to a tokenizer.json (e.g. RoBERTa's); empty: train a BPE
                                    # on the data (with --init_text: that folder's tokenizer.json if
                                    # it has one)
    vocab_size: int = 2000          # BPE size when training a tokenizer
    text_norm: bool = False         # official X-FM caption normalisation (lib/tokenizer.py), kept
                                    # by the tokenizer; off: a --tokenizer file keeps its own
    caption_len: int = 30           # max caption tokens (pairs, regions)
    text_len: int = 64              # max tokens of a text-only document
    crop_min_scale: float = 0.8     # random resized crop scale lower bound (official: 0.2; the toy
                                    # captions name positions)
    hflip: bool = False             # horizontal flip (off: captions say "left of"/"right of")
    num_workers: int = -1           # DataLoader workers per rank; -1: 4 on CUDA, 0 elsewhere
    shuffle_buffer: int = 1000      # tar shards (lib/shards.py): the samples each worker shuffles
                                    # among
    strict: bool = False            # any bad input record is an error instead of being skipped and
                                    # counted
    # optimisation
    max_steps: int = 600            # steps (each = three optimizer updates, or one with
                                    # schedule=summed)
    stop_at: int = 0                # stop (as if interrupted) after this step, keeping the schedule
                                    # of max_steps; 0 = off
    batch_size: int = 16            # global batch of the pair and image streams
    text_batch_size: int = 0        # global text-only batch; 0 = batch_size
    region_batch_size: int = 0      # global region batch in images (~3 captions each on the toy
                                    # world); 0 = batch_size / 2
    micro_batch_size: int = 0       # per-rank micro batch; 0 = batch_size / world_size (no
                                    # accumulation)
    schedule: str = "three"         # three (official: text | regions+images | pairs) | summed (one
                                    # update)
    lr: float = 1e-3                # peak lr (official 1e-4 from pre-trained encoders; from scratch
                                    # ~5e-4..1e-3)
    lr_mult: float = 2.0            # lr multiplier for the new heads and the temperature (official
                                    # lr_mult)
    warmup_steps: int = 30          # linear warmup, then linear decay to 0 at max_steps
    weight_decay: float = 0.01      # AdamW weight decay (not on biases, norms, tokens, the
                                    # temperature)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # AdamW beta2 (FLAVA: 0.999)
    grad_clip: float = 1.0          # clip the global gradient norm of each update to this
    max_bad_steps: int = 5          # this many non-finite updates in a row stop the run (with a
                                    # checkpoint) at the step's end (fast path: the next log step)
    # runtime
    device: str = "auto"            # auto (cuda > mps > cpu) | cpu | cuda | mps
    amp: str = "auto"               # auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp16 (CUDA, with
                                    # GradScaler) | fp32
    losses: str = "auto"            # auto (fast on CUDA and with --compile, else reference) |
                                    # reference (losses.py) | fast (lib/fast_losses.py: the same
                                    # losses and gradients, fixed shapes, no host sync)
    compile: bool = False           # torch.compile each kind of block once, for every layer of it
                                    # (runtime.compile_blocks); texts padded to fixed lengths
    compile_mode: str = "default"   # with --compile: default | reduce-overhead (CUDA graphs; no
                                    # gradient accumulation) | max-autotune-no-cudagraphs
    grad_ckpt: bool = False         # activation checkpointing per block: less memory for about one
                                    # more forward
    fsdp: bool = False              # under torchrun: shard parameters, gradients and AdamW state
                                    # over the ranks (PyTorch's FSDP2, runtime.shard) instead of
                                    # DDP; without torchrun: no effect
    seed: int = 0                   # model init, data order, masks, hard negatives (per rank: seed
                                    # * 1000 + rank)
    log_every: int = 25             # steps between metrics.jsonl records (losses averaged over the
                                    # ranks)
    ckpt_every: int = 500           # steps between checkpoints (RUN/ckpt.pt, written atomically;
                                    # also at the end)
    keep_last: int = 0              # N > 0: also keep the N newest checkpoints as RUN/ckpt_STEP.pt;
                                    # 0 = ckpt.pt alone
    export: str = ""                # a folder for the final weights: config.json,
                                    # model.safetensors, tokenizer.json
    resume: str = ""                # a run folder or ckpt.pt to continue from: its model, recipe,
                                    # tokenizer and data settings stay; only the RESUME_MAY_CHANGE
                                    # keys may be given anew
    overwrite: bool = False         # a fresh run into a folder that holds a run deletes that run's
                                    # files first
    eval_k: int = 16                # retrieval: ITM re-ranks the top k ITC candidates (official
                                    # k_test 256)
    eval_batch_size: int = 64       # retrieval evaluation: images, captions or ITM (query,
                                    # candidate) pairs per forward



# the keys with a fixed set of values (checked when the command line is read, before any work)
CHOICES = {"config": ("tiny", "small", "base"), "recipe": ("xfm", "flava"),
           "mim_target": ("vl", "pixel", "off"), "attn_impl": ("auto", "sdpa", "explicit"),
           "schedule": ("three", "summed"), "losses": ("auto", "reference", "fast"),
           "device": ("auto", "cpu", "cuda", "mps"),
           "amp": ("auto", "bf16", "fp16", "fp32"), "compile_mode": runtime.COMPILE_MODES}


# the keys a resumed run may set anew; every other key is the run's own (the checkpoint's
# train_config), and a value that contradicts it is refused before anything is written
# (runlog.check_resume)
RESUME_MAY_CHANGE = ("resume", "out_dir", "overwrite", "data_dir", "image_root", "max_steps",
                     "stop_at", "lr", "warmup_steps", "grad_clip", "max_bad_steps",
                     "micro_batch_size", "text_len", "caption_len", "num_workers", "shuffle_buffer",
                     "strict", "device", "amp", "compile", "compile_mode", "grad_ckpt", "fsdp",
                     "attn_impl", "losses", "log_every", "ckpt_every", "keep_last", "export",
                     "eval_k", "eval_batch_size")


def parse_args(argv):
    keys = ", ".join(k for k in RESUME_MAY_CHANGE if k != "resume")
    resume = textwrap.fill("With --resume=RUN the run keeps its own config; only these keys may be "
                           f"given anew: {keys}.", 110)
    intro = __doc__.strip().split("\n\n")[1] + "\n\n" + resume
    return cli.parse_overrides(argv, TrainConfig, intro, CHOICES)


# -------------------------------------------------------------------------------------------------
# Optimizer, schedule, one update (its micro-batches and its clipped step: lib/runtime.py)


def param_groups(model, weight_decay, lr_mult):
    """AdamW groups: no decay on biases, norms, layer-scale gammas, the temperature and the CLS/mask
    tokens (FLAVA: also its image positions); lr x lr_mult for the new heads and the temperature
    (model.NEW_PARAMS, docs/METHOD.md §6.1). Asserts the groups partition the params."""
    groups = {}
    no_decay_names = getattr(model, "NO_DECAY", ("cls_token", "mask_token"))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(no_decay_names)
        new = name.split(".")[0] in getattr(model, "NEW_PARAMS", ())
        key = (no_decay, new)
        groups.setdefault(key, {"params": [], "names": [],
                                "weight_decay": 0.0 if no_decay else weight_decay,
                                "lr_scale": lr_mult if new else 1.0})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    named = [n for g in groups.values() for n in g["names"]]
    assert len(named) == len(set(named)) == len([p for p in model.parameters() if p.requires_grad])
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def get_lr(step, lr, warmup_steps, max_steps):
    """Linear warmup over warmup_steps, then linear decay to 0 at max_steps (docs/METHOD.md
    §6.1)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def forward_backward(loss_model, micro_batches, accum, ddp, autocast, scaler):
    """Forward and backward over one update's `accum` micro-batches; gradients accumulate in .grad.

    Each micro-batch's loss is divided by accum, so the summed gradients are the MEAN over the
    global batch. Under DDP the gradients are all-reduced (FSDP: reduce-scattered) only on the last
    micro-step: no_sync() must cover the forward as well as the backward. Returns (the update's
    total loss, detached; {name: loss / accum}).
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


# -------------------------------------------------------------------------------------------------
# The two recipes: X-FM here and in model.py / losses.py, FLAVA in flava.py; --recipe picks


MODELS = {"xfm": XFM, "flava": flava.FLAVA}  # the model of each recipe, built from its config


class LossModel(nn.Module):
    """What DDP wraps: its forward runs the whole loss computation, so DDP's reducer sees every
    parameter the step uses (calling model methods outside a DDP forward would silently skip the
    gradient sync). -> ({name: scalar loss}, {name: logged statistic}); an update's loss is their
    sum."""

    def __init__(self, model, stop_grad, recipe="xfm", fast=False):
        super().__init__()
        self.model, self.stop_grad, self.recipe, self.fast = model, stop_grad, recipe, fast

    def forward(self, batch):
        stats = {}
        if self.recipe == "flava":
            return flava.flava_losses(self.model, batch, stats=stats, fast=self.fast), stats
        # the reference (losses.py) or the fast path (lib/fast_losses.py): equal losses, gradients
        step_losses = fast_losses.xfm_losses if self.fast else xfm_losses
        return step_losses(self.model, batch, stop_grad=self.stop_grad, stats=stats), stats


def model_config(cfg, tok, ckpt=None, init=None):
    """A resumed run's own model config (the checkpoint's: flava.config_from_dict reads either
    recipe's); with --init the export's (pretrained.init_model_config); else the recipe's preset
    sized for the tokenizer and the texts (FLAVA: flava.run_config), with the sizes of --init_text /
    --init_vision (pretrained.model_config)."""
    if ckpt is not None:
        return replace(flava.config_from_dict(ckpt["model_config"]), attn_impl=cfg.attn_impl)
    if init is not None:
        return pretrained.init_model_config(cfg, init)
    if cfg.recipe == "flava":
        model_cfg = flava.run_config(cfg, tok)
    else:
        model_cfg = make_config(cfg.config, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                mim_target=cfg.mim_target, attn_impl=cfg.attn_impl,
                                max_text_len=max(cfg.caption_len, cfg.text_len))
    if cfg.init_text or cfg.init_vision:
        model_cfg = pretrained.model_config(cfg, model_cfg, tok)
    return model_cfg


def data_kinds(cfg):
    """The data kinds (streams) a run trains on. X-FM: images feed MIM only; FLAVA: no regions."""
    if cfg.recipe == "flava":
        return flava.DATA_KINDS
    return ("text", "pair", "region") + (("image",) if cfg.mim_target != "off" else ())


# -------------------------------------------------------------------------------------------------
# Setting up a run: data, tokenizer, model, optimizer, resume. Rank 0 prepares what every rank
# needs.


@dataclass
class Context:
    """What a run's set-up needs besides its config: the checkpoint it resumes (or None), this
    process's place (runtime.setup_distributed), the run's count of skipped input records and the
    export a fresh run starts from (--init, or None)."""
    ckpt: dict | None
    ddp: bool
    rank: int
    world: int
    device: torch.device
    bad: object                # the run's skipped input records (runlog.bad_input)
    init: dict | None = None  # --init's export (pretrained.init_run), on a fresh run


def setup_data(cfg, ctx, per_rank):
    """-> (tokenizer, model config, {kind: streams.Stream, or shards.ShardStream for tar shards}).
    Rank 0 builds the toy world if the default folder is missing (shards.prepare_data_dir) and
    trains (or loads) the tokenizer; every rank gets it (runlog.shared_tokenizer)."""
    shards.prepare_data_dir(cfg.data_dir, ctx.ddp, ctx.rank)
    if ctx.ckpt is None and cfg.init_text and not cfg.tokenizer:  # the pre-trained encoder's own
        cfg.tokenizer = pretrained.own_tokenizer(cfg.init_text)
    tok = runlog.shared_tokenizer(cfg, ctx.ckpt, ctx.ddp, ctx.rank)
    model_cfg = model_config(cfg, tok, ctx.ckpt, ctx.init)
    streams = shards.run_streams(cfg, tok, model_cfg, per_rank, ctx.bad, ctx.rank, ctx.world,
                                 ctx.device)
    return tok, model_cfg, streams


def setup_model(cfg, ctx, model_cfg, streams):
    """-> (model, the module the loop calls, optimizer, the step to start from). The recipe's model,
    its set-up (FLAVA: its image tokenizer) and the pre-trained encoders, or the --init export's
    weights; a resume restores model, optimizer and streams instead."""
    # attn_impl auto made concrete for the device
    model = runtime.choose_attention(MODELS[cfg.recipe](model_cfg), ctx.device)
    if ctx.ckpt is None:
        if ctx.init is not None:  # --init: every tensor of the export (FLAVA: its image tokenizer too)
            pretrained.load_init(model, ctx.init, cfg.image_tokenizer)
        # FLAVA's frozen image tokenizer: made on rank 0, shared with all (an export's is kept unless
        # --image_tokenizer replaces it)
        if cfg.recipe == "flava" and (ctx.init is None or cfg.image_tokenizer):
            flava.prepare_run(cfg, model, streams, ctx.ddp, ctx.rank, runlog.atomic_save)
        pretrained.load_encoders(model, cfg.init_text, cfg.init_vision, verbose=ctx.rank == 0)
    model = model.to(ctx.device)
    # each of the three updates touches a different subset of the parameters (the text update never
    # runs the vision encoder), so DDP looks for unused parameters, except under the summed schedule
    # over every kind
    every_kind = set(streams) == set(sum(XFM_UPDATES, ()))
    all_used = cfg.recipe == "xfm" and cfg.schedule == "summed" and every_kind
    fast = runtime.fast_path_on(cfg, ctx.device)
    loss_model = LossModel(model, cfg.stop_grad, cfg.recipe, fast)
    # --grad_ckpt, stacked position biases, DDP or FSDP, --compile
    loss_model = runtime.wrap(loss_model, model, cfg, ctx.ddp, ctx.device, find_unused=not all_used)
    # built after the wrap: FSDP replaces every parameter by its shard, and AdamW must hold (and
    # keep state for) those; fused on CUDA and with the fast path (a skip without host sync)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr_mult), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=ctx.device.type == "cuda" or fast)
    start = 0 if ctx.ckpt is None else runlog.restore(ctx.ckpt, model, optimizer, streams, ctx.bad)
    return model, loss_model, optimizer, start


# -------------------------------------------------------------------------------------------------
# Main and the training loop


@cli.strict_stops
def main(argv=None):
    cfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    ddp, rank, _, world, device = runtime.setup_distributed(cfg.device)
    # the run folder's lock (rank 0: runlog.claim_run_folder), released however the run ends
    held = []
    try:
        ckpt = runlog.load_checkpoint(cfg.resume, "cpu") if cfg.resume else None
        # continue a run: its own config, with what the command line may change
        if ckpt is not None:
            cfg = runlog.check_resume(cfg.resume, ckpt, given, TrainConfig, RESUME_MAY_CHANGE)
        # a fresh run from an export: its recipe, model config and tokenizer (None: no --init)
        cfg, init = pretrained.init_run(cfg, given) if cfg.init and ckpt is None else (cfg, None)
        # FLAVA: no X-FM keys; a fresh run takes FLAVA's AdamW where none is given
        if cfg.recipe == "flava":
            cfg = flava.run_settings(cfg, given, fresh=ckpt is None)
        return train(cfg, ckpt, ddp, rank, world, device, held, init)
    finally:
        for lock in held:
            lock.release()
        runtime.teardown()


# One X-FM step: three optimizer updates in this order, each on these data kinds (METHOD.md §5.2)
XFM_UPDATES = [("text",), ("region", "image"), ("pair",)]


def xfm_updates(cfg, streams):
    """XFM_UPDATES, or one update over every kind with --schedule=summed; a kind the data lacks is
    left out."""
    updates = XFM_UPDATES if cfg.schedule == "three" else [sum(XFM_UPDATES, ())]
    return [u for u in ([k for k in u if k in streams] for u in updates) if u]


def train(cfg, ckpt, ddp, rank, world, device, held, init=None):
    t_start, master = time.time(), rank == 0
    print0 = lambda *a: print(*a, flush=True) if master else None      # noqa: E731
    # bad sizes, --amp, --keep_last and --export fail before any work
    autocast, scaler, amp = runtime.amp_setup(cfg.amp, device, cfg.fsdp and ddp)
    micro, accum, per_rank = runtime.batch_plan(cfg, world)
    if cfg.keep_last < 0:
        raise SystemExit(f"error: --keep_last is a number of checkpoints to keep (0: ckpt.pt "
                         f"alone), not {cfg.keep_last}")
    if cfg.export:                                       # (a run folder would lose its config.json)
        pretrained.check_export_dir(cfg.export, cfg.out_dir)
    per_rank = {k: n for k, n in per_rank.items() if k in data_kinds(cfg)}
    # rank 0 claims the run folder (nothing is written before)
    runtime.rank0_shares(lambda: held.append(runlog.claim_run_folder(cfg, ckpt)), ddp, rank)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # the same model init on every rank (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    bad = runlog.bad_input(cfg, rank)
    ctx = Context(ckpt, ddp, rank, world, device, bad, init)
    tok, model_cfg, streams = setup_data(cfg, ctx, per_rank)
    sources = shards.find_data(cfg.data_dir)                        # files and shard folders
    # the held-out pairs, read and checked before step 1; their skipped records are counted apart (a
    # resume reads them again) and added to the run's count at the end (runlog.finish)
    held_out, held_bad = runlog.load_held_out(cfg, sources, tok, model_cfg.image_size, ddp, rank)
    # FLAVA's --flava_ratios (bad ones fail here, before the model is built)
    ratios = flava.run_ratios(cfg, streams) if cfg.recipe == "flava" else None
    model, loss_model, optimizer, start_step = setup_model(cfg, ctx, model_cfg, streams)
    if ckpt is not None:
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        print0(f"resumed from {cfg.resume} at step {start_step}")
    if init is not None:
        print0(f"started from the export {cfg.init} (its step {init['step']}): its model and "
               f"tokenizer, a new optimizer, step 0")
    # the per-rank RNG (hard negatives, dropout) is seeded after the shared init; a resume restores
    # this rank's own random state
    torch.manual_seed(cfg.seed * 1000 + rank)
    if ckpt is not None:
        runtime.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        ckpt.clear()  # restored: the loop needs none of its tensors (base: GBs on every rank)
    if master:
        runlog.write_config(cfg, model_cfg, world, amp, device, accum, per_rank, sources)
    recipe = (f"FLAVA {cfg.config} | data kinds per update {cfg.flava_ratios}"
              if cfg.recipe == "flava" else f"X-FM {cfg.config} | stop_grad {cfg.stop_grad} | "
              f"mim_target {cfg.mim_target} | schedule {cfg.schedule}")
    print0(f"{recipe}: {model.num_params() / 1e6:.2f}M parameters | device {device} "
           f"x{world} | amp {amp} | streams {sorted(streams)} | per-rank batch {per_rank} "
           f"x{accum} accum")

    # ---- the loop: each step is the recipe's optimizer updates, each over `accum` micro-batches
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    meter, history = runlog.Meter(), []
    # non-finite losses: updates skipped, the run stopped after max_bad_steps in a row
    guard = runtime.NonFinite(optimizer, scaler, cfg, ddp, device)

    def save(step):  # every rank calls it (runlog.save_checkpoint)
        extra = {"bad_input": bad.state_dict(), "tokenizer": tok.to_json()}
        runlog.save_checkpoint(ckpt_path, model, optimizer, scaler, step, cfg, model_cfg, streams,
                               extra, master)

    pbar = tqdm(total=end_step, initial=start_step, disable=not master, desc="train",
                dynamic_ncols=True)
    for step in range(start_step, end_step):
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if ratios:                                       # FLAVA: one drawn data kind per update
            updates = flava.step_updates(ratios, cfg.seed, step)
        else:                                            # X-FM: XFM_UPDATES
            updates = xfm_updates(cfg, streams)
        for kinds in updates:
            micro_batches = runtime.next_batches(streams, kinds, accum, device, meter)
            update_loss, logs = forward_backward(loss_model, micro_batches, accum, ddp, autocast,
                                                 scaler)
            meter.add(logs)
            if guard.skip(update_loss, optimizer):      # (on the host) skipped here
                optimizer.zero_grad(set_to_none=True)
                print0(f"warning: non-finite loss at step {step} ({'+'.join(kinds)}): update "
                       f"skipped")
                continue
            grad_norm = runtime.optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)
            meter.add({"grad_norm": grad_norm.detach().float()})
            model.clamp_temp()
        meter.steps += 1
        pbar.update(1)
        done = step + 1
        if guard.too_many(done, done % cfg.log_every == 0 or done == end_step, print0):
            save(done)
            raise SystemExit(f"error: {cfg.max_bad_steps} non-finite updates in a row by step "
                             f"{done}; stopped. The last good state is in {ckpt_path} (lower --lr, "
                             f"or try --amp=fp32).")
        if done % cfg.log_every == 0 or done == end_step:
            history.append(meter.record(done, lr, model, world, ddp))
            meter = runlog.Meter()
            if master:
                runlog.append_record(cfg.out_dir, history[-1])
                last = history[-1]
                shown = [n for n in ("itc", "gc", "itm", "mlm", "mim") if "loss/" + n in last]
                pbar.set_postfix_str(" ".join(f"{n}={last['loss/' + n]:.2f}" for n in shown))
        if done % cfg.ckpt_every == 0 or done == end_step:
            save(done)
        if ddp and done % cfg.ckpt_every == 0:
            dist.barrier()
    pbar.close()

    final = {"final": True, "step": end_step, "wall_s": time.time() - t_start,
             "skipped_updates": int(guard.total.item()), "bad_input": bad.counts()}
    # FSDP: a plain copy per rank
    def build():
        return runtime.choose_attention(MODELS[cfg.recipe](model_cfg), device).to(device)
    model = runtime.unsharded(model, build)
    if master and cfg.export:  # the final weights alone, a folder finetune.py --init reads
        pretrained.export(cfg.export, cfg.out_dir, model.state_dict(), asdict(model_cfg),
                          asdict(cfg), end_step)
    # the held-out evaluation, the final record, the loss curves, the summary
    runlog.finish(cfg, model, held_out, held_bad, history, final, bad, device, autocast, rank,
                  world)
    if ddp:
        dist.barrier()
    return {"history": history, "final": final}


if __name__ == "__main__":
    main()
