"""
Fine-tuning and evaluation of a pre-trained X-FM on every kind of downstream task, the way the paper does
(docs/METHOD.md §7). Fine-tuning removes the stop-gradient: the fusion encoder reads the language encoder's states
with their graph (`losses.fusion_input(t, stop_grad=False)`), so each task trains every encoder it uses.

    task       model                                                         loss            metric
    textcls    language encoder alone; build_mlp(D, C) on <s>                CE (MSE if C=1) accuracy|f1|mcc|pearson
    imgcls     vision encoder; build_mlp(D, C) on v[:, 0] (full fine-tuning), CE              accuracy
               or --probe linear: one nn.Linear on v[:, 0] of the frozen encoder, computed under no_grad
    vqa        fusion [CLS] of (question, image); build_mlp(D, #answers)     CE | soft BCE   VQA score
    nlvr       statement fused with each of 2 images; [CLS; CLS] -> build_mlp(2D, 2)          CE      accuracy
    retrieval  ITC (same image = positive) + ITM (hard negatives); ITC ranking, ITM re-ranking R@1/5/10
    grounding  the pre-trained bbox_head on the fusion [CLS] of (phrase, full image) L1 + GIoU acc@IoU>=0.5

Every task runs on the toy world (data/toy/downstream; `python -m lib.toyworld --out data/toy`) with no other
arguments. After `python train.py`:
    python finetune.py --task vqa --init runs/default/ckpt.pt            # -> runs/default/finetune/vqa/
    python finetune.py --task imgcls --probe linear --init runs/default/ckpt.pt
    python finetune.py --task retrieval --epochs 0 --init runs/default/ckpt.pt     # zero-shot retrieval
    python finetune.py --task all --init runs/default/ckpt.pt            # the toy suite -> finetune/benchmark.md
    python finetune.py --task vqa --eval_only --init runs/default/finetune/vqa/ckpt.pt
    python finetune.py --task vqa --init runs/default_export            # train.py --export / tools/export.py
    python finetune.py --task textcls --init_text roberta-base/ --out_dir runs/roberta    # from public encoders
    python finetune.py --task attention --init runs/default/ckpt.pt --image IMG --caption "a red circle"
    torchrun --standalone --nproc_per_node=2 finetune.py --task nlvr --init runs/default/ckpt.pt
    python finetune.py --help                                            # every key with its default

A task folder gets metrics.json (eval.json with --eval_only), ckpt.pt (written atomically) and tokenizer.json, so
it is itself a valid --init; retrieval adds retrieval_examples.png, vqa adds vqa_results.json (the official
evaluation server's [{"question_id", "answer"}]), attention writes attention.png. An
--image_size other than the pre-training one interpolates the relative position bias tables.

Before any training both splits are checked: every image a task file names is decoded once (a record with one
that does not decode is skipped and counted, "unreadable image"), and every label is checked against the task's
classes (a "bad label" is skipped and counted: formats.label_problem, formats.label_vocab; docs/FINETUNING.md,
"Checked before training"). --strict makes each an error. lib/formats.py ("Task files") reads the task files and
holds the rules each task's records must meet.

A FLAVA checkpoint (train.py --recipe=flava) works for every task: the model comes from the checkpoint's config
(flava.build_model); its [CLS] is CLS_M, its features the final-LN CLS tokens (text_cls / image_cls), its ITC
embeddings the GC ones, and grounding gets a fresh box head (FLAVA pre-trains none).
"""
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from lib import runlog
from lib import cli
import data
from lib import tokenizer
from lib import formats
from lib.formats import (answer_votes, grounding_problem, image_paths, image_problem, label_index, label_value,
                         labeled_splits, first_pair, nlvr_problem, read_task_file, task_file, text_fields,
                         text_problem, usable, vqa_problem, write_test_pairs, write_vqa_results)
import flava
import losses
from lib import pretrained
from lib import retrieval
from lib.retrieval import accuracy, f1_score, matthews, pearson, vqa_score
from lib import pictures
from lib import toyworld
from lib import transforms
import train
from lib import runtime
from model import build_mlp

# ---------------------------------------------------------------------------------------------------------
# Config, and Env: what every task reads besides it


@dataclass
class FinetuneConfig:
    task: str = ""                  # textcls | imgcls | vqa | nlvr | retrieval | grounding | all | attention
    init: str = ""                  # pre-trained run folder, ckpt.pt or export folder (train.py), or a fine-tuned ckpt.pt
    eval_only: bool = False         # evaluate --init as it is (fine-tuned; or zero-shot retrieval / grounding)
    init_text: str = ""             # instead of --init: a Hugging Face RoBERTa folder (lib/pretrained.py) ...
    init_vision: str = ""           # ... and/or a BEiT-v2 checkpoint; the rest of the model is freshly initialised
    preset: str = "base"            # with --init_text/--init_vision: model preset for what they do not say (fusion depth)
    # data
    data_dir: str = "data/toy"      # task files default to DATA_DIR/downstream/TASK_{train,test}.jsonl
    train_file: str = ""            # .jsonl | .json list | Karpathy dataset_*.json | .tsv | ImageFolder directory
    test_file: str = ""             # the evaluation split, in the same formats
    image_root: str = ""            # image paths are relative to this folder (default: the file's folder)
    strict: bool = False            # any bad record in a task file is an error instead of being skipped and counted
    out_dir: str = ""               # default: INIT_RUN/finetune; each task writes OUT_DIR/NAME/
    tokenizer: str = ""             # default: tokenizer.json next to --init
    text_norm: bool = False         # the official X-FM normalisation of captions and questions (lib/tokenizer.py);
                                    # off: as the tokenizer says (docs/METHOD.md §10.1)
    image_size: int = 0             # 0 = the pre-training size; another size interpolates the rel-pos tables
    text_len: int = 0               # 0 = the model's max_text_len
    # optimisation (0 or -1 = the task's default from TASK_DEFAULTS)
    epochs: int = -1                # passes over the training split; 0 = evaluate without training
    batch_size: int = 0             # global batch, split over the ranks
    lr: float = 0.0                 # peak learning rate of AdamW
    lr_mult: float = 2.0            # the new head trains at lr x lr_mult (official lr_mult on new parameters)
    weight_decay: float = 0.01      # AdamW weight decay (not on biases and norms)
    warmup: float = 0.1             # linear warmup over this fraction of the steps, then linear decay to 0
    grad_clip: float = 1.0          # clip the global gradient norm of each step to this
    # task options
    probe: str = "full"             # imgcls: full (fine-tune the encoder) | linear (nn.Linear on frozen features)
    metric: str = ""                # textcls: accuracy | f1 | mcc | pearson ("" = accuracy, pearson if regression)
    num_labels: int = 0             # textcls, imgcls: C classes 0..C-1; 0 = from the training labels; 1 = regression
    text_fields: str = ""           # textcls: sentence field(s), comma-separated names or TSV column numbers
    label_field: str = ""           # textcls: "" = the first of label, score, gold_label, Quality
    k_test: int = 16                # retrieval: ITM re-ranks the ITC top k (official k_test 256)
    image: str = ""                 # attention: the image (default: the first retrieval test image)
    caption: str = ""               # attention: the caption (default: that image's first caption)
    # runtime
    device: str = "auto"            # auto (cuda > mps > cpu) | cpu | cuda | mps
    amp: str = "auto"               # auto | bf16 | fp16 | fp32 (runtime.amp_setup)
    seed: int = 0                   # head init and data order
    num_workers: int = 0            # DataLoader workers per rank
    eval_batch_size: int = 64       # examples per forward in evaluation


TASKS = ("textcls", "imgcls", "vqa", "nlvr", "retrieval", "grounding")
# per run name, tuned for the toy world and the tiny model (2 CPU cores); the command line always wins
TASK_DEFAULTS = {
    "textcls": dict(epochs=10, batch_size=32, lr=5e-4),
    "imgcls": dict(epochs=20, batch_size=32, lr=1e-3),
    "imgcls_linear": dict(epochs=20, batch_size=64, lr=1e-2, weight_decay=0.0, lr_mult=1.0),
    "vqa": dict(epochs=8, batch_size=32, lr=3e-4),
    "nlvr": dict(epochs=8, batch_size=32, lr=3e-4),
    "retrieval": dict(epochs=3, batch_size=32, lr=1e-4),
    "retrieval_zeroshot": dict(epochs=0),
    "grounding": dict(epochs=20, batch_size=16, lr=5e-4),
    "attention": dict(epochs=0),
}
# the toy benchmark of `--task all`, one table row each: (run name, extra arguments)
SUITE = (("textcls", []), ("imgcls", []), ("imgcls_linear", ["--probe", "linear"]), ("vqa", []), ("nlvr", []),
         ("retrieval_zeroshot", ["--epochs", "0"]), ("retrieval", []), ("grounding", []))


# the keys with a fixed set of values (checked when the command line is read, before any work)
CHOICES = {"task": (*TASKS, "all", "attention"), "preset": train.CHOICES["config"], "probe": ("full", "linear"),
           "metric": ("", "accuracy", "f1", "mcc", "pearson"), "device": train.CHOICES["device"],
           "amp": train.CHOICES["amp"]}


def parse_args(argv):
    """`--key=value` or `--key value` overrides of FinetuneConfig (cli.parse_overrides)."""
    return cli.parse_overrides(argv, FinetuneConfig, __doc__.strip().split("\n\n")[2], CHOICES)


def run_name(cfg, finetuned):
    """The task's folder and TASK_DEFAULTS key; imgcls_linear and retrieval_zeroshot are variants."""
    if cfg.task == "imgcls" and cfg.probe == "linear":
        return "imgcls_linear"
    if cfg.task == "retrieval" and (cfg.epochs == 0 or (cfg.eval_only and not finetuned)):
        return "retrieval_zeroshot"
    return cfg.task


@dataclass
class Env:
    """What every task reads besides its FinetuneConfig (load_init makes it once per run)."""
    ckpt: dict                  # --init's checkpoint (train.py's, or this script's with "task" and "meta"), or
                                # the one pretrained.from_pretrained_encoders makes
    tok: tokenizer.Tokenizer         # its tokenizer, the same on every rank
    run_dir: str                # --init's folder (public encoders: --out_dir or runs/from_pretrained); a
                                # pre-trained checkpoint's tasks write to RUN_DIR/finetune/NAME by default
    mcfg: Any                   # the checkpoint's model config (model.XFMConfig or flava.FLAVAConfig)
    ddp: bool                   # under torchrun: DistributedDataParallel and collectives
    rank: int                   # this process's rank; each evaluates its share, rank 0 saves and prints
    world: int                  # the number of ranks (each takes batch_size / world examples a step)
    device: torch.device
    autocast: Callable          # runtime.amp_setup's autocast context factory (a null context in fp32)
    scaler: Any                 # the GradScaler under fp16, else None
    bad: formats.BadInput          # the current task's skipped records (run_task gives each task its own)

    @property
    def finetuned(self):
        """Whether ckpt was fine-tuned by this script (it names its task) rather than pre-trained."""
        return "task" in self.ckpt

    @property
    def meta(self):
        """A fine-tuned checkpoint's task data (class list, answer list), else None."""
        return self.ckpt.get("meta") if self.finetuned else None

    @property
    def master(self):
        return self.rank == 0

    def print0(self, *args):
        if self.master:
            print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------------
# A task's report (its metrics, in %: lib/retrieval.py, "Metrics of the other tasks")


def report(metric, value, summary=None, key=None, **metrics):
    """What each task's evaluation returns: the headline metric, its value (stored under `key`, default the
    metric's name), the text for the table, and every other metric."""
    return {"metric": metric, "value": value, "summary": summary or f"{value:.1f}",
            "metrics": {key or metric: value, **metrics}}


# ---------------------------------------------------------------------------------------------------------
# Task data: both splits read and checked (lib/formats.py, "Task files"), each record -> a sample


def splits(cfg, env, need_train=True):
    """(train records, test records, the task's BadInput), read by read_task_file. Every image the records name
    is decoded once here, before any training (retrieval.check_images, in parallel): a record with an image that
    does not decode is reported ("unreadable image") and skipped (usable)."""
    bad = env.bad
    tr = read_task_file(task_file(cfg, "train"), "train", cfg, bad) if need_train else []
    te = read_task_file(task_file(cfg, "test"), "test", cfg, bad)
    verdicts = retrieval.check_images([p for r in tr + te for p in image_paths(r)], f"{cfg.task}: checking images",
                                      env.master)

    def unreadable(r):
        path = next((p for p in image_paths(r) if verdicts[p]), None)
        return None if path is None else ("unreadable image", f"{path}: {verdicts[path]}")
    return usable(tr, unreadable, bad, "train"), usable(te, unreadable, bad, "test"), bad


class Examples(Dataset):
    """records -> make(record) -> sample dict. `collate` pads "ids" (and adds "att"), stacks tensors and keeps
    anything else as a list."""

    def __init__(self, records, make, pad_id):
        self.records, self.make, self.pad_id = records, make, pad_id

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.make(self.records[i])

    def collate(self, samples):
        out = {}
        for key in samples[0]:
            vals = [s[key] for s in samples]
            if key == "ids":
                out["ids"] = data.pad_seqs(vals, self.pad_id)              # (B, T)
                out["att"] = data.padding_mask(vals, out["ids"].shape[1])     # (B, T)
            else:
                out[key] = torch.stack(vals) if torch.is_tensor(vals[0]) else vals
        return out


def tokens(tok, a, b, max_len, document=False):
    """RoBERTa input: <s> a </s>, or <s> a </s></s> b </s> for a pair; cut to max_len with </s> kept last.
    document: text classification's sentences, never normalised (tokenizer.encode)."""
    ids = tok.encode(a, max_len, document)
    if b is not None:
        ids = ids + [tok.sep_id] + tok.encode(b, max_len, document)[1:]
    return ids if len(ids) <= max_len else ids[: max_len - 1] + [tok.sep_id]


# ---------------------------------------------------------------------------------------------------------
# Model: X-FM + a task head; a pre-trained checkpoint loads with exactly the expected keys missing


class TaskModel(nn.Module):
    """X-FM and a task head (or None). forward(batch) -> (loss, parts) is the task loss, like train.LossModel,
    so DDP wraps this module and sees every parameter the loss uses. frozen: the linear probe's encoder stays
    in eval mode (no drop path) while the head trains."""

    def __init__(self, xfm, head, loss_fn, frozen=False):
        super().__init__()
        self.xfm, self.head, self.loss_fn, self.frozen = xfm, head, loss_fn, frozen

    def forward(self, batch):
        return self.loss_fn(self, batch)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.xfm.eval()
        return self


def build_model(cfg, env, head, loss_fn, frozen=False):
    """TaskModel with env.ckpt's weights. A pre-trained checkpoint must load with exactly the new head's keys
    missing and nothing unexpected (MAE style); a checkpoint fine-tuned for this task with nothing missing."""
    mcfg = replace(flava.config_from_dict(env.ckpt["model_config"]), image_size=cfg.image_size)
    # X-FM or FLAVA, as the checkpoint says; attn_impl auto made concrete for the device
    xfm = runtime.choose_attention(flava.build_model(mcfg), env.device)
    runtime.stack_position_biases(xfm)                                  # a fast path, the same numbers
    model = TaskModel(xfm, head, loss_fn, frozen)
    state = env.ckpt["model"] if env.finetuned else {"xfm." + k: v for k, v in env.ckpt["model"].items()}
    if head is None:  # attention maps from a fine-tuned model: its head is not needed
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for k in [k for k in state if k.endswith("rel_pos.table")]:  # another image size: interpolate every table
        state[k] = pretrained.resize_rel_pos(state[k], env.mcfg.grid, mcfg.grid)
    for k in [k for k in state if k.endswith("vision.pos_embed")]:  # FLAVA's absolute image positions
        state[k] = flava.resize_pos_embed(state[k], mcfg.grid)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = set() if env.finetuned else {k for k in model.state_dict() if k.startswith("head.")}
    env.print0(f"loaded {cfg.init}: missing keys {sorted(missing) or 'none'}, "
               f"unexpected {sorted(unexpected) or 'none'}")
    assert set(missing) == expected and not unexpected, \
        f"unexpected checkpoint keys: missing {sorted(set(missing) ^ expected)}, unexpected {sorted(unexpected)}"
    return model.to(env.device)  # what the task trains: every parameter its loss reaches (freeze_unused)


def fused_cls(m, b):
    """The fusion [CLS] of (text, image), with NO stop-gradient (fine-tuning, docs/METHOD.md §7.1) -> (B, D)."""
    t = m.xfm.encode_text(b["ids"], b["att"])                              # (B, T, D)
    v = m.xfm.encode_image(b["image"])                                     # (B, 1+P, D)
    return m.xfm.fuse(losses.fusion_input(t, stop_grad=False), b["att"], v)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# The loop: AdamW, warmup + linear decay, clipping, AMP, DDP; evaluation split over the ranks, an atomic
# checkpoint on rank 0


@torch.no_grad()
def predict(cfg, env, model, dataset, fn, target=None):
    """fn(model, batch) over a dataset in order, in eval mode -> outputs on the CPU (and the batches' `target`), the
    same on every rank. Under torchrun each rank runs its share of the batches (runtime.share: whole batches,
    each the one a single process would run) and the shares are gathered in order, so every rank must call it."""
    model.eval()
    bs, n = cfg.eval_batch_size, len(dataset)
    loader = DataLoader(Subset(dataset, runtime.share(n, env.rank, env.world, bs)), bs, collate_fn=dataset.collate,
                        num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda")
    outs, gold = [], []
    for batch in tqdm(loader, desc=f"{cfg.task} eval", disable=not env.master, leave=False):
        with env.autocast():
            outs.append(fn(model, runtime.to_device(batch, env.device)).float())
        gold += [batch[target].to(env.device)] if target else []

    def gather(xs):  # (an empty share gives None; the gather takes the shape from rank 0's)
        return runtime.gather_shares(torch.cat(xs) if xs else None, n, env.rank, env.world, bs).cpu()
    return (gather(outs), gather(gold)) if target else gather(outs)


def freeze_unused(model, train_set, n, device):
    """Freeze every trainable parameter that the task's loss does not reach, found by one backward pass over the
    first n training examples (eval mode, fp32: no randomness is drawn). A task then trains exactly the
    parameters it uses, and DDP, which expects a gradient for every parameter that requires one, needs no
    find_unused_parameters. (FLAVA's fused tasks read the encoders' states before their final LayerNorm, so
    text.norm and vision.norm get none.) -> the names frozen."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    batch = train_set.collate([train_set[i] for i in range(min(n, len(train_set)))])
    model.eval()
    loss, _ = model(runtime.to_device(batch, device))
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    model.train()
    unused = [name for name, g in zip(params, grads) if g is None]
    for name in unused:
        params[name].requires_grad = False
    return unused


def fit(cfg, env, model, train_set, evaluate, out, meta):
    """Fine-tune for cfg.epochs (none with --eval_only or epochs 0), then evaluate with the raw model, split over
    the ranks, and save the fine-tuned checkpoint (rank 0). -> the evaluation's report plus the loss history."""
    history, steps = [], 0
    if cfg.epochs > 0 and not cfg.eval_only:
        if cfg.batch_size % env.world:
            raise SystemExit(f"error: batch_size {cfg.batch_size} is not a multiple of the world size {env.world}")
        sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True) if env.ddp else \
            RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed))
        # drop_last: every rank runs the same number of full steps (a short last batch could deadlock DDP)
        loader = DataLoader(train_set, cfg.batch_size // env.world, sampler=sampler, drop_last=True,
                            collate_fn=train_set.collate, num_workers=cfg.num_workers,
                            pin_memory=env.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
        if len(loader) == 0:
            raise SystemExit(f"error: {len(train_set)} training examples, fewer than batch_size {cfg.batch_size}")
        steps = cfg.epochs * len(loader)
        unused = freeze_unused(model, train_set, cfg.batch_size // env.world, env.device)
        if unused:
            env.print0(f"{cfg.task}: {len(unused)} parameter tensors get no gradient from its loss and stay frozen: "
                       + ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else ""))
        # no decay on biases and norms (train.param_groups); the new head at lr x lr_mult
        groups = train.param_groups(model.xfm, cfg.weight_decay, 1.0)
        if model.head is not None:
            groups += [dict(g, lr_scale=cfg.lr_mult) for g in train.param_groups(model.head, cfg.weight_decay, 1.0)]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=env.device.type == "cuda")
        warmup_steps = int(cfg.warmup * steps)
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.ddp else model
        params, step = [p for p in model.parameters() if p.requires_grad], 0
        for epoch in range(cfg.epochs):
            if env.ddp:
                sampler.set_epoch(epoch)  # a new shuffle each epoch
            model.train()
            total = torch.zeros((), device=env.device)
            for batch in tqdm(loader, desc=f"{cfg.task} {epoch + 1}/{cfg.epochs}", disable=not env.master, leave=False):
                lr = train.get_lr(step, cfg.lr, warmup_steps, steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                with env.autocast():
                    loss, _ = wrapped(runtime.to_device(batch, env.device))
                (env.scaler.scale(loss) if env.scaler else loss).backward()
                runtime.optimizer_step(optimizer, env.scaler, params, cfg.grad_clip)
                model.xfm.clamp_temp()                                     # ITC temperature in [0.001, 0.5]
                total += loss.detach().float()                             # no .item(): no sync per step
                step += 1
            mean = total / len(loader)
            if env.ddp:  # averaged over the ranks, so every rank takes the same decision below
                dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            if not math.isfinite(mean.item()):
                raise SystemExit(f"error: non-finite {cfg.task} loss in epoch {epoch + 1} (lower --lr, or --amp=fp32)")
            history.append(mean.item())
            env.print0(f"{cfg.task} epoch {epoch + 1}/{cfg.epochs}: loss {mean.item():.4f}")
    # every rank, on the raw model: each evaluates its share (predict, retrieval.scores) and gets every figure
    result = dict(evaluate(model), train_loss=history, epochs=len(history), steps=steps)
    if env.master:
        if history:  # written atomically: a crash never leaves half a checkpoint
            ckpt = {"model": model.state_dict(), "model_config": asdict(model.xfm.cfg), "task": cfg.task, "meta": meta,
                    "finetune_config": asdict(cfg), "pretrain_config": env.ckpt.get("train_config"), "result": result}
            runlog.atomic_save(ckpt, os.path.join(out, "ckpt.pt"))
    if env.ddp:
        dist.barrier()
    return result


# ---------------------------------------------------------------------------------------------------------
# The tasks, one function each: data -> head and loss -> model -> evaluation -> fit


def run_textcls(cfg, env, out):
    """GLUE style, single sentences or pairs: the language encoder alone (no fusion), a head on <s>."""
    tr, te, bad = splits(cfg, env)
    names, label_key = text_fields(tr[0], cfg.text_fields, cfg.label_field)
    texts = lambda r: next((p for p in (text_problem(r, n) for n in names) if p), None)  # noqa: E731
    tr, te, labels = labeled_splits(tr, te, label_key, texts, bad, env.meta["labels"] if env.meta else None,
                                    cfg.num_labels, source=task_file(cfg, "train"))
    C = len(labels) or 1                                                   # one output = regression

    def make(r):
        ids = tokens(env.tok, r[names[0]], r[names[1]] if len(names) > 1 else None, cfg.text_len, document=True)
        y = label_index(label_value(r[label_key]), labels)
        return {"ids": ids, "label": torch.tensor(y, dtype=torch.float32 if C == 1 else torch.long)}

    def logits(m, b):  # the language encoder's <s>: no image, no fusion encoder
        return m.head(m.xfm.text_cls(m.xfm.encode_text(b["ids"], b["att"])))  # (B, C)

    def loss_fn(m, b):
        z = logits(m, b).float()
        return (F.mse_loss(z.squeeze(-1), b["label"]) if C == 1 else F.cross_entropy(z, b["label"])), {}

    model = build_model(cfg, env, build_mlp(env.mcfg.width, C), loss_fn)
    test_set = Examples(te, make, env.tok.pad_id)

    def evaluate(m):
        z, y = predict(cfg, env, m, test_set, logits, target="label")      # (N, C), (N,)
        if C == 1:
            metrics = {"pearson": pearson(z.squeeze(-1), y)}
        else:
            pred = z.argmax(-1)
            metrics = {"accuracy": accuracy(pred, y), "mcc": matthews(pred, y.clamp(min=0), C)}
            metrics.update({"f1": f1_score(pred, y)} if C == 2 else {})
        name = cfg.metric or ("pearson" if C == 1 else "accuracy")
        if name not in metrics:
            raise SystemExit(f"error: --metric={name} is not available for this task (have {sorted(metrics)})")
        return report(name, metrics[name], **metrics)

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {"labels": labels})


def run_imgcls(cfg, env, out):
    """Image classification on v[:, 0]: full fine-tuning with a build_mlp head, or (--probe linear) a TRUE linear
    probe: one nn.Linear on the frozen encoder's features, computed under no_grad. The official "linear
    evaluation" is a 5-layer MLP on frozen features (docs/METHOD.md §7.2, §10)."""
    if cfg.probe not in ("full", "linear"):
        raise SystemExit(f"error: --probe must be full or linear, not {cfg.probe!r}")
    if cfg.num_labels == 1:
        raise SystemExit("error: --num_labels=1 makes textcls a regression; imgcls classifies (2 classes or more)")
    tr, te, bad = splits(cfg, env)
    tr, te, labels = labeled_splits(tr, te, "label", image_problem, bad, env.meta["labels"] if env.meta else None,
                                    cfg.num_labels, regression=False, source=task_file(cfg, "train"))
    linear, D = cfg.probe == "linear", env.mcfg.width

    def make(r):
        y = label_index(label_value(r["label"]), labels)
        return {"image": transforms.task_image(r["image"], cfg.image_size), "label": torch.tensor(y)}

    def logits(m, b):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not linear):  # the probe's features: no graph
            feat = m.xfm.image_cls(m.xfm.encode_image(b["image"]))        # (B, D): X-FM's mean-pooled patches, FLAVA's CLS_I
        return m.head(feat)                                                # (B, C)

    def loss_fn(m, b):
        return F.cross_entropy(logits(m, b).float(), b["label"]), {}

    head = nn.Linear(D, len(labels)) if linear else build_mlp(D, len(labels))
    model = build_model(cfg, env, head, loss_fn, frozen=linear)
    test_set = Examples(te, make, env.tok.pad_id)

    def evaluate(m):
        z, y = predict(cfg, env, m, test_set, logits, target="label")
        return report("accuracy", accuracy(z.argmax(-1), y))

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {"labels": labels})


def run_vqa(cfg, env, out):
    """VQA as classification over the training split's answers, on the fusion [CLS]; VQA-score soft targets
    with BCE when a question has several answers. (The paper generates the answer with a decoder and ranks a
    fixed answer list, docs/METHOD.md §7.2.) The evaluation writes OUT/vqa_results.json (write_vqa_results); a
    test question without an answer field (VQAv2 test-dev) is predicted for that file and not scored."""
    tr, te, bad = splits(cfg, env)
    tr, te = usable(tr, vqa_problem, bad, "train"), usable(te, lambda r: vqa_problem(r, need_answer=False), bad, "test")
    given = lambda r: answer_votes(r)[0] or []  # noqa: E731  (a test question without answers: [])
    counts = Counter(a for r in tr for a in given(r))
    answers = env.meta["answers"] if env.meta else sorted(counts, key=lambda a: (-counts[a], a))  # most frequent first
    index, soft = {a: i for i, a in enumerate(answers)}, any(len(given(r)) > 1 for r in tr)

    def make(r):
        target = torch.zeros(len(answers))                                 # (A,) min(1, count / 3), or one-hot
        for a, c in Counter(given(r)).items():
            if a in index:
                target[index[a]] = min(1.0, c / 3) if soft else 1.0
        return {"image": transforms.task_image(r["image"], cfg.image_size),
                "ids": tokens(env.tok, r["question"], None, cfg.text_len), "target": target}

    def logits(m, b):
        return m.head(fused_cls(m, b))                                     # (B, A)

    def loss_fn(m, b):
        z = logits(m, b).float()
        if soft:  # BCE summed over the answers, averaged over the questions (the usual VQA classifier loss)
            return F.binary_cross_entropy_with_logits(z, b["target"], reduction="sum") / len(z), {}
        return F.cross_entropy(z, b["target"]), {}                         # a one-hot target: plain CE

    model = build_model(cfg, env, build_mlp(env.mcfg.width, len(answers)), loss_fn)
    test_set = Examples(te, make, env.tok.pad_id)

    def evaluate(m):
        pred = [answers[p] for p in predict(cfg, env, m, test_set, logits).argmax(-1).tolist()]  # in te's order
        write_vqa_results(os.path.join(out, "vqa_results.json"), te, pred)
        scored = [(a, given(r)) for a, r in zip(pred, te) if given(r)]  # the questions with answers
        if not scored:
            return report("predictions", len(te), f"{len(te)} answers in vqa_results.json, none scored "
                          "(the test split has no answers)")
        score = 100 * sum(vqa_score(a, votes) for a, votes in scored) / len(scored)
        return report("vqa_score" if any(len(votes) > 1 for _, votes in scored) else "accuracy", score,
                      n_answers=len(answers), n_scored=len(scored))

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {"answers": answers})


def run_nlvr(cfg, env, out):
    """NLVR2: the statement fused with each image by the same fusion encoder; the two [CLS] concatenated."""
    tr, te, bad = splits(cfg, env)
    tr, te = usable(tr, nlvr_problem, bad, "train"), usable(te, nlvr_problem, bad, "test")

    def make(r):
        return {"image": torch.stack([transforms.task_image(p, cfg.image_size) for p in r["images"]]),  # (2, 3, S, S)
                "ids": tokens(env.tok, r["sentence"], None, cfg.text_len),
                "label": torch.tensor(int(label_value(r["label"])))}

    def logits(m, b):
        v = m.xfm.encode_image(b["image"].flatten(0, 1))                   # (2B, 1+P, D): left, right, left, ...
        t = losses.fusion_input(m.xfm.encode_text(b["ids"], b["att"]), stop_grad=False)  # (B, T, D), no detach
        h = [m.xfm.fuse(t, b["att"], v[k::2])[:, 0] for k in (0, 1)]       # [CLS] with each image: 2 x (B, D)
        return m.head(torch.cat(h, dim=-1))                                # (B, 2D) -> (B, 2)

    def loss_fn(m, b):
        return F.cross_entropy(logits(m, b).float(), b["label"]), {}

    model = build_model(cfg, env, build_mlp(2 * env.mcfg.width, 2), loss_fn)
    test_set = Examples(te, make, env.tok.pad_id)

    def evaluate(m):
        z, y = predict(cfg, env, m, test_set, logits, target="label")
        return report("accuracy", accuracy(z.argmax(-1), y))

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {})


def run_retrieval(cfg, env, out):
    """Image-text retrieval: fine-tuning with ITC (pairs sharing an image are positives) + ITM (hard negatives),
    no detach; evaluation by ITC ranking and ITM re-ranking of the top k (retrieval.evaluate_retrieval), also
    zero-shot (epochs 0). Reads the project's JSONL, ALBEF / X-VLM JSON lists and Karpathy's dataset_*.json."""
    train_now = cfg.epochs > 0 and not cfg.eval_only
    tr_recs, te, bad = splits(cfg, env, need_train=train_now)
    tr_recs, te = usable(tr_recs, image_problem, bad, "train"), usable(te, image_problem, bad, "test")
    # each record's captions as a list (the field holds one or a list); a bad caption is reported and dropped
    tr_recs = [dict(r, caption=c) for r in tr_recs if (c := formats.captions_of(r, r["where"], bad))]
    te = [dict(r, caption=c) for r in te if (c := formats.captions_of(r, r["where"], bad))]
    if not te:
        raise SystemExit("error: no usable test record: each was skipped as bad input (see the warnings)")
    test_path = os.path.join(out, "retrieval_test.jsonl")  # the checked test records, for retrieval.load_retrieval_set
    if env.master:
        write_test_pairs(test_path, te)
    tr, img_ids = [], {}
    for r in tr_recs:  # one example per caption; the same image file -> the same id
        for c in r["caption"]:
            tr.append({"image": r["image"], "caption": c, "img_id": img_ids.setdefault(r["image"], len(img_ids))})

    def make(r):
        return {"image": transforms.task_image(r["image"], cfg.image_size),
                "ids": tokens(env.tok, r["caption"], None, cfg.text_len), "img_id": torch.tensor(r["img_id"])}

    def loss_fn(m, b):
        x = m.xfm
        x.clamp_temp()
        v, t = x.encode_image(b["image"]), x.encode_text(b["ids"], b["att"])  # (B, 1+P, D), (B, T, D)
        f_t, f_v = x.itc_features(t, v)                                    # (B, E) each
        itc = losses.itc_loss(f_v, f_t, x.temp, ids=b["img_id"])
        # the fusion encoder reads t WITH its graph: fine-tuning has no stop-gradient
        t_f = losses.fusion_input(t, stop_grad=False)
        itm = losses.itm_loss(x, t_f, b["att"], v, None, f_v, f_t, x.temp, b["img_id"])
        return itc + itm, {"itc": itc, "itm": itm}

    model = build_model(cfg, env, None, loss_fn)                          # the pre-trained ITC and ITM heads

    def evaluate(m):  # every rank: rank 0 reads the set, each rank scores its share (lib/retrieval.py)
        rs = runtime.rank0_shares(lambda: retrieval.load_retrieval_set(test_path, env.tok, cfg.image_size,
                                                                       cfg.text_len, bad), env.ddp, env.rank)
        sc = retrieval.scores(m.xfm, rs, env.device, cfg.k_test, cfg.eval_batch_size, env.autocast, env.rank,
                              env.world, cfg.num_workers)
        r = retrieval.recalls(sc, rs)
        if env.master:
            pictures.retrieval_sheet(rs, sc["t2i"], env.tok, cfg.k_test, os.path.join(out, "retrieval_examples.png"))
        summary = ", ".join(f"{d} " + "/".join(f"{r[f'{d}_r{n}']:.1f}" for n in (1, 5, 10)) for d in ("t2i", "i2t"))
        return report("R@1/5/10", (r["t2i_r1"] + r["i2t_r1"]) / 2, summary, key="mean_r1", **r)

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {})


def run_grounding(cfg, env, out):
    """RefCOCO style: the pre-trained box head (+ sigmoid) on the fusion [CLS] of (phrase, full image), trained
    with L1 + GIoU (losses.bbox_loss); a prediction is right when its IoU with the box is >= 0.5."""
    tr, te, bad = splits(cfg, env)
    tr, te = usable(tr, grounding_problem, bad, "train"), usable(te, grounding_problem, bad, "test")

    def make(r):
        img = formats.load_image(r["image"])
        (W, H), (x, y, w, h) = img.size, r.get("box", r.get("bbox"))      # pixels -> normalised cx, cy, w, h
        return {"image": transforms.eval_transform(img, cfg.image_size),
                "ids": tokens(env.tok, r.get("phrase", r.get("text")), None, cfg.text_len),
                "box": torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], dtype=torch.float32)}

    def boxes(m, b):
        box_head = m.head if m.head is not None else m.xfm.bbox_head
        return box_head(fused_cls(m, b)).sigmoid()                         # (B, 4) cx, cy, w, h in [0, 1]

    def loss_fn(m, b):
        every = torch.ones(len(b["box"]), dtype=torch.bool, device=b["box"].device)  # every phrase names a region
        l1, giou = losses.bbox_loss(boxes(m, b).float(), b["box"], every)
        return l1 + giou, {"l1": l1, "giou": giou}

    # X-FM's box head was pre-trained (BBP); FLAVA has none, so it gets a fresh one as the task head
    head = build_mlp(env.mcfg.width, 4) if getattr(env.mcfg, "recipe", "xfm") == "flava" else None
    model = build_model(cfg, env, head, loss_fn)
    test_set = Examples(te, make, env.tok.pad_id)

    def evaluate(m):
        pred, gold = predict(cfg, env, m, test_set, boxes, target="box")  # (N, 4) each
        iou, _ = losses.box_iou(losses.box_xyxy(pred), losses.box_xyxy(gold))  # (N,) each box of positive area
        acc, miou = float((iou >= 0.5).float().mean()) * 100, float(iou.mean()) * 100
        return report("acc@IoU0.5", acc, f"{acc:.1f} (mean IoU {miou:.1f})", mean_iou=miou)

    return fit(cfg, env, model, Examples(tr, make, env.tok.pad_id), evaluate, out, {})


# ---------------------------------------------------------------------------------------------------------
# The attention picture (drawn by lib/pictures.py)


def run_attention(cfg, env, out):
    """Cross-attention heatmaps for one (image, caption): --image and --caption, or the first toy test pair."""
    if not cfg.image:
        image, caption = first_pair(os.path.join(cfg.data_dir, "downstream", "retrieval_test.jsonl"), cfg)
        cfg = replace(cfg, image=image, caption=cfg.caption or caption)
    if not cfg.caption:
        raise SystemExit("error: --task attention needs --caption as well as --image")
    xfm = build_model(cfg, env, None, None).xfm
    path = os.path.join(out, "attention.png")
    layers, words = pictures.attention_picture(xfm, env.tok, cfg.caption, cfg.image, cfg.image_size, cfg.text_len,
                                               env.device, path)
    env.print0(f"wrote {path}: {layers} layers x {words} tokens for {cfg.image}, {cfg.caption!r}")
    return dict(report("picture", 0.0, path), train_loss=[], epochs=0, steps=0)


# ---------------------------------------------------------------------------------------------------------
# Main: one task, or the whole toy suite as a Markdown table


RUNNERS = {"textcls": run_textcls, "imgcls": run_imgcls, "vqa": run_vqa, "nlvr": run_nlvr,
           "retrieval": run_retrieval, "grounding": run_grounding, "attention": run_attention}


def load_init(cfg, ddp, rank, world, device):
    """What every task needs (an Env): the --init checkpoint and its kind (pre-trained by train.py or fine-tuned
    here), its tokenizer, the (distributed) device, autocast and the GradScaler. A file that is not what it should
    be stops the run with one line naming it, before any work (pretrained.read_export, runlog.load_checkpoint,
    tokenizer.Tokenizer.load)."""
    if cfg.init:  # an export folder (train.py --export, tools/export.py) or a checkpoint, read the same way
        ckpt = pretrained.read_export(cfg.init) if pretrained.is_export(cfg.init) else runlog.load_checkpoint(cfg.init, "cpu")
        run_dir = cfg.init if os.path.isdir(cfg.init) else os.path.dirname(cfg.init) or "."
        tok_path = cfg.tokenizer or (ckpt["tokenizer"] if pretrained.is_export(cfg.init)   # the export's own
                                     else os.path.join(run_dir, "tokenizer.json"))
    else:  # public encoders: the text folder's tokenizer, a checkpoint made on the spot
        run_dir = cfg.out_dir or "runs/from_pretrained"
        tok_path = cfg.tokenizer or (pretrained.tokenizer_path(cfg.init_text) if cfg.init_text else "")

    def read_tokenizer():  # rank 0 reads it; every rank gets its JSON (no shared folder needed for it)
        if not os.path.isfile(tok_path):
            raise SystemExit(f"error: no tokenizer at {tok_path!r} (use --tokenizer)")
        return tokenizer.Tokenizer.load(tok_path, cfg.text_norm or None).to_json()
    tok = tokenizer.Tokenizer.from_json(runtime.rank0_shares(read_tokenizer, ddp, rank))
    if not cfg.init:
        ckpt = pretrained.from_pretrained_encoders(cfg, tok, rank == 0)
    autocast, scaler, _ = runtime.amp_setup(cfg.amp, device)
    return Env(ckpt=ckpt, tok=tok, run_dir=run_dir, mcfg=flava.config_from_dict(ckpt["model_config"]), ddp=ddp,
               rank=rank, world=world, device=device, autocast=autocast, scaler=scaler,
               bad=formats.BadInput(strict=cfg.strict, verbose=rank == 0))


def run_task(cfg, given, env):
    """One task with its defaults filled in -> its report; writes NAME/metrics.json (eval.json if --eval_only)."""
    if env.finetuned and env.ckpt["task"] != cfg.task and cfg.task != "attention":
        raise SystemExit(f"error: {cfg.init} was fine-tuned for {env.ckpt['task']!r}, not {cfg.task!r}")
    name = run_name(cfg, env.finetuned)
    if cfg.eval_only and not env.finetuned and name not in ("retrieval_zeroshot", "grounding", "attention"):
        raise SystemExit(f"error: --eval_only with a pre-trained checkpoint works for retrieval and grounding "
                         f"(zero-shot); {cfg.task} needs a checkpoint fine-tuned by this script")
    cfg = replace(cfg, **{k: v for k, v in TASK_DEFAULTS[name].items() if k not in given})
    cfg = replace(cfg, image_size=cfg.image_size or env.mcfg.image_size, text_len=cfg.text_len or env.mcfg.max_text_len)
    # a fine-tuned checkpoint is evaluated in its own folder; a pre-trained one fine-tunes into RUN/finetune/NAME
    out = env.run_dir if env.finetuned and not cfg.out_dir else \
        os.path.join(cfg.out_dir or os.path.join(env.run_dir, "finetune"), name)
    if env.master:
        os.makedirs(out, exist_ok=True)
        env.tok.save(os.path.join(out, "tokenizer.json"))                  # so the folder is itself an --init
    if env.ddp:
        dist.barrier()
    torch.manual_seed(cfg.seed)  # the same head init on every rank
    t0 = time.time()
    env.bad = formats.BadInput(strict=cfg.strict, verbose=env.master)        # the task's skipped records, counted
    result = RUNNERS[cfg.task](cfg, env, out)
    if env.master:
        result.update(task=cfg.task, name=name, init=cfg.init, wall_s=time.time() - t0, config=asdict(cfg),
                      bad_input=env.bad.counts())
        if env.bad.counts():
            env.print0(f"{name}: bad input skipped: {env.bad.summary()}")
        with open(os.path.join(out, "eval.json" if cfg.eval_only else "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        env.print0(f"{name}: {result['metric']} {result['summary']} ({result['wall_s']:.0f} s) -> {out}")
    return result


def run_all(cfg, given, env):
    """The toy suite for one pre-trained checkpoint: every SUITE row, then OUT/benchmark.md and .json."""
    rows = []
    for name, extra in SUITE:
        task = name.split("_")[0]
        # the command line's keys go to every task, except those the row sets itself (--epochs 0 for zero-shot)
        passed = [f"--{k}={v}" for k, v in given.items() if k not in ("task", "init") and f"--{k}" not in extra]
        sub, sub_given = parse_args([f"--task={task}", f"--init={cfg.init}", *passed, *extra])
        res = run_task(sub, sub_given, env)
        rows.append((name, res, " ".join(["python finetune.py --task", task, "--init", cfg.init, *passed, *extra])))
    run_task(replace(cfg, task="attention"), {"task": "attention"}, env)  # the pre-trained model's attention maps
    out = cfg.out_dir or os.path.join(env.run_dir, "finetune")
    if env.master:
        runlog.write_benchmark(out, rows, cfg.init, env.ckpt)
    return rows


@cli.strict_stops
def main(argv=None):
    cfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    if not cfg.task:
        raise SystemExit(f"error: --task is required, one of {', '.join(CHOICES['task'])} (see --help)")
    if not cfg.init and not (cfg.init_text or cfg.init_vision):
        raise SystemExit("error: --init RUN/ckpt.pt is required (a checkpoint from train.py), "
                         "or --init_text / --init_vision (public encoders)")
    if cfg.init and (cfg.init_text or cfg.init_vision):
        raise SystemExit("error: --init already holds both encoders; --init_text / --init_vision go without it")
    if cfg.num_labels < 0:
        raise SystemExit(f"error: --num_labels is a number of classes (1: regression), not {cfg.num_labels}")
    if cfg.task == "all" and cfg.eval_only:
        raise SystemExit("error: --task all fine-tunes every task; --eval_only takes a single task")
    ddp, rank, _, world, device = runtime.setup_distributed(cfg.device)
    try:
        env = load_init(cfg, ddp, rank, world, device)

        runtime.rank0_shares(lambda: toyworld.build_if_missing(cfg.data_dir), ddp, rank)  # as train.py does
        return run_all(cfg, given, env) if cfg.task == "all" else run_task(cfg, given, env)
    finally:
        runtime.teardown()


if __name__ == "__main__":
    main()
