"""
Performance benchmark of a pre-training step (nanoGPT's bench.py in spirit): how fast one step of each recipe
runs on this machine, where the time goes, how the speed knobs compare, how our encoders compare with the same
architecture in Hugging Face transformers, and whether data loading keeps up.

    python tools/bench.py                                  # CPU: tiny + small, a few minutes on 2 cores
    python tools/bench.py --configs tiny,small,base        # GPU (the default there): every preset, about 8 min on an H100
    python tools/bench.py --configs tiny --skip_hf --skip_data --iters 3   # a quick look
    python tools/bench.py --help

Sections of the report (one Markdown table each; also in JSON), written to --out (runs/bench/bench.md):
  1. Training step, for each model preset (--configs) and recipe (--recipes: xfm, and flava once flava.py
     exists): one full step on a fixed synthetic batch holding every data kind (X-FM: text, image, pair and
     region; FLAVA: text, image and pair) = the forward of all losses (losses.xfm_losses / flava.flava_losses),
     backward of their sum, gradient clipping and an AdamW step (fused on CUDA, as train.py), i.e. the work of
     train.py's `--schedule=summed` step. The batch is made once and stays on the device (no loading, no
     host-to-device copy: section 4 measures those). Columns:
       samples/s   pairs + region captions + images + texts per second (what train.py logs as samples_per_s)
       tokens/s    input tokens per second: every text position (padded length) plus every image patch of the
                   batch, each input counted ONCE however many encoder passes it goes through
       fwd/bwd/opt milliseconds of the forward (all losses), the backward and the optimizer (clip + AdamW)
       peak mem    CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory during
                   the run (Linux VmHWM, reset before each run; ru_maxrss where that is not possible)
       FLOPs/step  analytic matmul FLOPs (`flops_per_step`, X-FM) and as counted by torch.utils.flop_counter
                   on one real step (both recipes); MFU = FLOPs/step / step time / the device's peak FLOP/s
                   for the step's dtype (PEAK_FLOPS; CUDA only: a CPU has no meaningful table entry)
       aten ops    ops that one forward + backward dispatches and that may launch a kernel (DispatchCounter;
                   views and allocations excluded, the fused optimizer left out), host syncs among them (ops
                   that make a CUDA host wait: .item(), `if tensor`, nonzero, boolean-mask indexing) with their
                   source lines, and µs/op = step time / ops. An eager step pays a host cost per op; when µs/op
                   is about that cost (tens of µs) the GPU waits on the host and MFU says little about the GPU;
                   and how many of the forward's ops run inside the three encoders (what compile covers)
  2. Speed knobs, one at a time from the baseline (sdpa attention, bf16 autocast on a bf16 GPU else fp32,
     no compile): attention explicit vs sdpa (XFMConfig.attn_impl), every dtype of --dtypes (fp16 with a
     GradScaler, as train.py; fp16 is skipped on the CPU, whose autocast is bf16 only), and torch.compile of the
     three encoders the way train.py does it (`.compile()`, PyTorch's default dynamic=None); a compile that
     fails is noted in the report, not fatal. Compiling takes minutes, so by default it is timed on CUDA
     for the largest config's first recipe only (--compile: every run, also on the CPU; --no-compile: none).
  3. Ours vs Hugging Face: our language and vision encoders against RobertaModel and BeitModel configured
     with the same width, depth, heads, MLP, vocabulary, image and patch size, a relative position bias per
     layer, layer scale and mean pooling: forward + backward on the same input, ratio ours / HF (< 1: ours
     faster). Skipped when transformers is not installed.
  4. Data loading: train.py's streams at the default TrainConfig (the toy world, built if missing; per-rank
     batches pair 16, region 8 images, image 16, text 16): images/s and texts/s (decode + augment + collate)
     with num_workers 0 (the default) and 2, against what the measured tiny X-FM step consumes. On CUDA also
     the host-to-device copy of one step's batches from pageable vs pinned memory.

Timing: warm-up iterations (--warmup; compile happens there) are excluded; CUDA phases are timed with CUDA
events, and the wall clock is read after torch.cuda.synchronize().
"""
import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import traceback
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import formats
import losses  # noqa: E402
import toyworld  # noqa: E402
import train  # noqa: E402
from model import XFM, TextEncoder, VisionEncoder, make_config  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Settings per preset and device

# per-stream batch (pairs, images, texts; the region stream gets B // 2 images with 3 captions each, about what
# the toy world gives): on the CPU the train.py default, on a GPU large enough to keep it busy
DEFAULT_BATCH = {"cpu": {"tiny": 16, "small": 16, "base": 2}, "cuda": {"tiny": 128, "small": 64, "base": 32}}
CAPTION_LEN = 30                                     # train.py --caption_len (official: 30)
TEXT_LEN = {"tiny": 64, "small": 64, "base": 128}    # train.py --text_len; base: the official 128
VOCAB = {"tiny": 2000, "small": 2000}                # the toy BPE (train.py --vocab_size); base keeps RoBERTa's 50265
CAPTIONS_PER_REGION_IMAGE = 3

# Peak dense FLOP/s by device-name substring (first match wins, so the specific names come first):
# (half precision = bf16/fp16 tensor cores, fp32 without TF32). From the vendors' datasheets, without sparsity.
# fp32 is the plain FP32 rate because train.py leaves TF32 off (PyTorch's default for matmuls).
PEAK_FLOPS = [
    ("H100 NVL", 835e12, 60e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),        # SXM (HBM3)
    ("H200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 125e12, 31.2e12),      # the A10's datasheet figures; none are published for the A10G itself
    ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),  # bf16 with fp32 accumulate
    ("RTX 3090", 71e12, 35.6e12),
    ("A6000", 155e12, 38.7e12),
    ("V100", 125e12, 15.7e12),      # fp16 only (no bf16)
    ("T4", 65e12, 8.1e12),          # fp16 only (no bf16)
]


def peak_flops(device_name, dtype):
    """Peak FLOP/s of a GPU for a step in `dtype` (fp32 | bf16 | fp16), or None when the name is unknown."""
    for key, half, fp32 in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return fp32 if dtype == "fp32" else half
    return None


# ---------------------------------------------------------------------------------------------------------
# Synthetic batches with the keys and shapes data.py produces (all text positions real: no padding)


def _texts(g, n, T, vocab, prob, max_masks):
    """n texts of T tokens <s> w w ... </s>, and the masked copy with labels (-100 where not masked)."""
    ids = torch.randint(5, vocab, (n, T), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    att = torch.ones(n, T, dtype=torch.long)
    k = min(max_masks, max(1, round((T - 2) * prob)))                   # data.mask_text's count
    pos = torch.rand(n, T - 2, generator=g).argsort(dim=1)[:, :k] + 1   # (n, k) masked positions, never <s> </s>
    labels = torch.full_like(ids, -100).scatter(1, pos, ids.gather(1, pos))
    mlm_ids = ids.scatter(1, pos, 4)                                    # 4 = <mask>
    return ids, att, mlm_ids, labels


def _mim_masks(g, n, grid):
    k = data.mim_counts(grid)[0]                                        # BEiT's 75/196 share of the patches
    order = torch.rand(n, grid * grid, generator=g).argsort(dim=1)
    return torch.zeros(n, grid * grid, dtype=torch.bool).scatter(1, order[:, :k], True)  # (n, P)


def synthetic_batch(cfg, B, text_len, recipe="xfm", seed=0):
    """{"text", "image", "pair"[, "region"]}: B texts of text_len, B images, B pairs with CAPTION_LEN captions
    and (X-FM) B // 2 region images with 3 captions each (2 boxed regions + the whole image)."""
    g = torch.Generator().manual_seed(seed)
    S, V, grid = cfg.image_size, cfg.vocab_size, cfg.image_size // cfg.patch_size
    # caption masking of the recipe: X-FM's IMLM masks half (<= 15), FLAVA's MMM 15 % (data.CAPTION_MASKING)
    cap_prob, cap_max = (0.5, 15) if recipe == "xfm" else (0.15, 10 ** 6)
    ids, att, mlm_ids, labels = _texts(g, B, text_len, V, 0.15, 20)
    batch = {"text": {"ids": mlm_ids, "att": att, "labels": labels},
             "image": {"image": torch.randn(B, 3, S, S, generator=g), "mim_mask": _mim_masks(g, B, grid)}}
    ids, att, mlm_ids, labels = _texts(g, B, CAPTION_LEN, V, cap_prob, cap_max)
    batch["pair"] = {"image": torch.randn(B, 3, S, S, generator=g), "mim_mask": _mim_masks(g, B, grid),
                     "ids": ids, "att": att, "mlm_ids": mlm_ids, "mlm_labels": labels, "img_id": torch.arange(B)}
    if recipe == "xfm":
        n_img = max(2, B // 2)                                          # >= 2 images: every caption has a negative
        N = CAPTIONS_PER_REGION_IMAGE * n_img
        ids, att, mlm_ids, labels = _texts(g, N, CAPTION_LEN, V, 0.5, 15)
        img_index = torch.arange(n_img).repeat_interleave(CAPTIONS_PER_REGION_IMAGE)   # (N,)
        is_region = (torch.arange(N) % CAPTIONS_PER_REGION_IMAGE) != CAPTIONS_PER_REGION_IMAGE - 1
        box = torch.cat([0.3 + 0.4 * torch.rand(N, 2, generator=g), 0.2 + 0.3 * torch.rand(N, 2, generator=g)], 1)
        box[~is_region] = torch.tensor([0.5, 0.5, 1.0, 1.0])            # the whole-image caption
        patch_mask = torch.rand(N, grid * grid, generator=g) < 0.3
        patch_mask[:, 0] = True
        patch_mask[~is_region] = True
        batch["region"] = {"image": torch.randn(n_img, 3, S, S, generator=g), "img_index": img_index, "ids": ids,
                           "att": att, "mlm_ids": mlm_ids, "mlm_labels": labels, "box": box, "is_region": is_region,
                           "patch_mask": patch_mask, "img_id": img_index.clone()}
    return batch


def batch_counts(batch, cfg):
    """(samples, tokens, images, texts) of one batch; see the module docstring for the definitions."""
    P = cfg.num_patches
    samples = tokens = images = texts = 0
    for b in batch.values():
        if "image" in b:
            images += len(b["image"])
            tokens += len(b["image"]) * P
        if "ids" in b:
            texts += len(b["ids"])
            tokens += b["ids"].numel()
        samples += len(b["ids"]) if "ids" in b else len(b["image"])
    return samples, tokens, images, texts


def to_device(batches, device):
    """{kind: {key: tensor or int}} -> the same on `device` (non_blocking: asynchronous from pinned memory)."""
    return {k: {n: t.to(device, non_blocking=True) if torch.is_tensor(t) else t for n, t in b.items()}
            for k, b in batches.items()}


# ---------------------------------------------------------------------------------------------------------
# Analytic FLOPs of an X-FM step


def batch_shape(batch):
    """What flops_per_step needs to know about a batch: rows, lengths and masked-token counts per kind."""
    shape = {}
    if "text" in batch:
        b = batch["text"]
        shape["text"] = dict(B=b["ids"].shape[0], T=b["ids"].shape[1], M=int((b["labels"] != -100).sum()))
    if "image" in batch:
        shape["image"] = dict(B=batch["image"]["image"].shape[0])
    for kind in ("pair", "region"):
        if kind in batch:
            b = batch[kind]
            shape[kind] = dict(B=b["image"].shape[0], N=b["ids"].shape[0], T=b["ids"].shape[1],
                               M=int((b["mlm_labels"] != -100).sum()),
                               # ITM rows: positives + one negative image per text + one negative text per
                               # image, for every row whose image id is not the only one in the batch
                               itm=b["ids"].shape[0] * (3 if len(set(b["img_id"].tolist())) > 1 else 1))
    return shape


def flops_per_step(cfg, shape, stop_grad=True):
    """Matmul FLOPs of one X-FM training step (forward + backward) of losses.xfm_losses on a batch of `shape`
    (batch_shape's dict), for any subset of the four kinds, with the passes that losses.py really runs:

      text    language encoder + MLM head on the masked positions only
      pair    vision encoder (with grad) -- language encoder on the caption -- ITC -- fusion encoder on the
              positives + 2 sets of hard negatives (ITM, reusing the encoders' outputs) -- language encoder on
              the masked caption (no grad under the stop-gradient) -- fusion encoder + head on the masked
              positions (IMLM) -- vision encoder on the masked view (MIM; its target is the unmasked pass above)
      region  the same on the region view (one vision pass per image, captions per region) + the fusion
              encoder once more for the box head; no MIM
      image   vision encoder without grad (the MIM target) + vision encoder on the masked view

    Rule (the 6 * params * tokens convention, made exact per matmul): an (n x k) @ (k x m) product costs
    2nkm FLOPs forward; its backward costs 2nkm for the weight gradient plus 2nkm for the input gradient when
    the input carries a gradient (so 6nkm in all, or 4nkm for the patch embedding of the images and the fusion
    encoder's first projection of the detached text); a pass without grad costs the forward only. Attention
    counts its two matmuls, q k^T and att v: 2 * 2 * n_q * n_k * D forward per sample and twice that backward.
    Softmax, LayerNorm, GELU, embedding look-ups and elementwise loss terms are not counted (a few % at most).
    """
    D, Hd, E, V, P = cfg.width, cfg.mlp_ratio * cfg.width, cfg.embed_dim, cfg.vocab_size, cfg.num_patches
    S = 1 + P                                                           # image tokens: slot 0 + patches

    def mm(n, k, m, grad=True, dgrad=True):                             # one (n x k) @ (k x m) product
        return 2 * n * k * m * ((2 + dgrad) if grad else 1)

    def attention(B, nq, nk, grad=True):                                # q k^T and att v over the heads
        return B * 2 * (2 * nq * nk * D) * (3 if grad else 1)

    def block(B, T, grad, dgrad_in=True, kv_len=0):                     # one layer: self-attn [+ cross] + MLP
        n = B * T
        f = mm(n, D, 3 * D, grad, dgrad_in) + attention(B, T, T, grad) + mm(n, D, D, grad)  # qkv, attn, proj
        if kv_len:                                                      # cross-attention to the image
            f += mm(n, D, D, grad) + mm(B * kv_len, D, 2 * D, grad) + attention(B, T, kv_len, grad) + mm(n, D, D, grad)
        return f + mm(n, D, Hd, grad) + mm(n, Hd, D, grad)              # MLP

    def text(B, T, grad=True):
        return sum(block(B, T, grad) for _ in range(cfg.text_layers))

    def vision(B, grad=True):
        patch = mm(B * P, 3 * cfg.patch_size ** 2, D, grad, dgrad=False)  # the conv as a matmul; images need no grad
        return patch + sum(block(B, S, grad) for _ in range(cfg.vision_layers))

    def fusion(B, T):                                                   # the text input is detached under stop_grad
        return sum(block(B, T, True, dgrad_in=(i > 0 or not stop_grad), kv_len=S) for i in range(cfg.fusion_layers))

    def mlm_head(M):                                                    # dense + decoder on the M masked rows
        return mm(M, D, D) + mm(M, D, V)

    def mlp_head(n, out):                                               # build_mlp: Linear(D, 2D), Linear(2D, out)
        return mm(n, D, 2 * D) + mm(n, 2 * D, out)

    def itc(N):                                                         # projections, 2 similarity matrices, negatives
        return 2 * mm(N, D, E) + 2 * mm(N, E, N) + mm(N, E, N, grad=False)

    def mim(B):                                                         # the masked view (the target pass is elsewhere)
        if cfg.mim_target == "pixel":
            return vision(B) + mm(B * P, D, 3 * cfg.patch_size ** 2)
        return vision(B) if cfg.mim_target == "vl" else 0

    total = 0
    if "text" in shape:
        s = shape["text"]
        total += text(s["B"], s["T"]) + mlm_head(s["M"])
    for kind in ("pair", "region"):
        if kind not in shape:
            continue
        s = shape[kind]
        N, T = s["N"], s["T"]
        total += vision(s["B"]) + text(N, T) + itc(N)
        total += fusion(s["itm"], T) + mlp_head(s["itm"], 2)            # ITM
        total += text(N, T, grad=not stop_grad) + fusion(N, T) + mlm_head(s["M"])  # IMLM
        if kind == "pair":
            total += mim(s["B"])
        else:
            total += fusion(N, T) + mlp_head(N, 4)                      # box prediction on the full image
    if "image" in shape and cfg.mim_target != "off":
        B = shape["image"]["B"]
        total += mim(B) + (vision(B, grad=False) if cfg.mim_target == "vl" else 0)
    return total


def counted_flops(model, loss_fn, batch):
    """FLOPs of one forward + backward as torch.utils.flop_counter counts them (matmuls, convolutions and the
    attention kernels it knows; CPU SDPA is not among them, so count on a model with explicit attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        sum(loss_fn(model, batch).values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# Ops that make the host wait for the GPU on CUDA: a tensor read as a Python number or bool (.item(), `if t.any()`)
# and ops whose output size depends on the data (nonzero, boolean-mask indexing, masked_select).
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}
NO_KERNEL_OPS = {"_unsafe_view", "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided"}


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops that one region of code dispatches: `ops`, those that may launch a kernel (views and
    bare allocations excluded), and `syncs`, those that block the host until the GPU catches up (HOST_SYNC_OPS
    and indexing with a boolean mask), with the source line of each sync in `sync_sites` (file:line -> count).

    Why count: an eager step pays a roughly fixed host cost per op (Python, dispatcher, kernel launch). When
    step time / ops is about that cost, the host is the bottleneck and the GPU waits, whatever its speed."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.sync_sites = 0, 0, {}
        self.depth, self.encoder_ops = 0, 0          # count_dispatch's hooks: ops inside an encoder's forward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL_OPS:
            self.ops += 1
            self.encoder_ops += self.depth > 0
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        bool_mask = any(torch.is_tensor(t) and t.dtype == torch.bool for t in indices)
        if name in HOST_SYNC_OPS or bool_mask:
            self.syncs += 1
            # the innermost caller outside torch; bench.py itself there means the autograd engine's backward
            frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                         if f"{os.sep}torch{os.sep}" not in f.filename)
            in_bench = os.path.abspath(frame.filename) == os.path.abspath(__file__)
            site = "backward" if in_bench else f"{os.path.basename(frame.filename)}:{frame.lineno}"
            self.sync_sites[site] = self.sync_sites.get(site, 0) + 1
        return func(*args, **(kwargs or {}))


def count_dispatch(model, loss_fn, batch, autocast):
    """One forward (under the step's autocast) and backward of every loss, counted by a DispatchCounter. The
    optimizer is left out: on CUDA it is one fused AdamW, a handful of kernels and no sync. Also sets
    counter.forward_ops and counter.encoder_ops: the forward's ops, and those inside the three encoders (what
    compiling the encoders, as train.py --compile does, takes out of eager mode)."""
    counter = DispatchCounter()
    enter = lambda *_: setattr(counter, "depth", counter.depth + 1)
    leave = lambda *_: setattr(counter, "depth", counter.depth - 1)
    encoders = [getattr(model, n) for n in ("text", "vision", "fusion") if hasattr(model, n)]
    hooks = [h for m in encoders for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with counter:
        with autocast():
            out = loss_fn(model, batch)
        counter.forward_ops = counter.ops
        sum(out.values()).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return counter


# ---------------------------------------------------------------------------------------------------------
# The recipes


def import_flava():
    """flava.py's module, or the reason it cannot be used."""
    try:
        import flava
        for name in ("make_flava_config", "FLAVA", "flava_losses"):
            getattr(flava, name)
        return flava, None
    except Exception as e:  # missing file, an import error inside it, or a different interface
        return None, f"{type(e).__name__}: {e}"


def build(recipe, preset, **over):
    """(model config, model, loss function(model, batch) -> {name: loss}) of a recipe at a preset."""
    if preset in VOCAB:
        over.setdefault("vocab_size", VOCAB[preset])
    over.setdefault("max_text_len", max(CAPTION_LEN, TEXT_LEN[preset]))
    if recipe == "xfm":
        cfg = make_config(preset, **over)
        return cfg, XFM(cfg), losses.xfm_losses
    flava, _ = import_flava()
    cfg = flava.make_flava_config(preset, **over)
    return cfg, flava.FLAVA(cfg), flava.flava_losses


def batch_size_for(preset, device, args):
    return args.batch_size or DEFAULT_BATCH[device.type][preset]


# ---------------------------------------------------------------------------------------------------------
# Timing helpers


class PhaseTimer:
    """Timestamps of the step's phase boundaries: CUDA events on a GPU (no sync inside the step), the wall clock
    on the CPU (where every op is synchronous). elapsed() -> ms between consecutive marks of each iteration."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def elapsed(self, a, b):
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then peak_memory_mb falls back to ru_maxrss, the high-water mark of the whole process


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024                    # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast_for(dtype, device):
    """(context factory, GradScaler or None), as train.amp_setup: fp16 needs loss scaling, bf16 does not."""
    if dtype == "fp32":
        return nullcontext, None
    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dt)), scaler


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# 1 + 2: the training step


def bench_step(recipe, preset, device, B, dtype="fp32", attn="sdpa", compile="off", iters=5, warmup=2,
               count=False):
    """Time `iters` full training steps (after `warmup`) on one fixed synthetic batch; returns a row dict.
    compile: "off" or "on" (the encoders compiled as train.py does)."""
    torch.manual_seed(0)
    reset_peak_memory(device)
    cfg, model, loss_fn = build(recipe, preset, attn_impl=attn)
    model = model.to(device).train()
    batch = to_device(synthetic_batch(cfg, B, TEXT_LEN[preset], recipe), device)
    # one AdamW over every parameter (train.py's groups differ only in decay and lr, not in cost); fused on CUDA
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    autocast, scaler = autocast_for(dtype, device)
    if compile != "off":  # what train.py does: the encoders, not the loss code (data-dependent shapes there)
        for name in ("text", "vision", "fusion"):
            if hasattr(model, name):
                getattr(model, name).compile()

    timer = PhaseTimer(device)
    t_warm = time.perf_counter()
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            warmup_s, t0 = time.perf_counter() - t_warm, time.perf_counter()
            timer.marks = []
        timer.mark()
        with autocast():
            out = loss_fn(model, batch)
        loss = sum(out.values())
        timer.mark()
        (scaler.scale(loss) if scaler else loss).backward()
        timer.mark()
        train.optimizer_step(optimizer, scaler, model.parameters(), 1.0)   # clip + AdamW, as train.py
        timer.mark()
    sync(device)
    wall = time.perf_counter() - t0
    m = timer.marks                                                     # 4 marks per timed iteration
    phase = [sum(timer.elapsed(m[4 * i + j], m[4 * i + j + 1]) for i in range(iters)) / iters for j in range(3)]
    samples, tokens, images, texts = batch_counts(batch, cfg)
    row = dict(config=preset, recipe=recipe, dtype=dtype, attn=attn,
               compile=compile, batch=B,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, step_ms=wall / iters * 1e3,
               fwd_ms=phase[0], bwd_ms=phase[1], opt_ms=phase[2], samples_per_s=samples * iters / wall,
               tokens_per_s=tokens * iters / wall, images_per_step=images, texts_per_step=texts,
               samples_per_step=samples, peak_mem_mb=peak_memory_mb(device), warmup_s=warmup_s,
               loss=float(loss.detach()))
    if recipe == "xfm":
        row["flops_analytic"] = flops_per_step(cfg, batch_shape(batch))
    if compile == "off":  # a compiled step runs fused kernels, not the aten ops counted here
        counter = count_dispatch(model, loss_fn, batch, autocast)
        row.update(ops=counter.ops, syncs=counter.syncs, sync_sites=counter.sync_sites,
                   us_per_op=row["step_ms"] * 1e3 / counter.ops, forward_ops=counter.forward_ops,
                   encoder_forward_ops=counter.encoder_ops)
    del model, optimizer, out, loss
    if compile != "off":
        torch._dynamo.reset()                                           # drop the compiled graphs before the next run
    free(device)
    if count:  # the same step counted by torch's FLOP counter, on a twin with explicit attention (see counted_flops)
        torch.manual_seed(0)
        cfg, model, loss_fn = build(recipe, preset, attn_impl="explicit")
        row["flops_counted"] = counted_flops(model.to(device).train(), loss_fn, batch)
        del model
        free(device)
    return row


def bench_step_or_note(recipe, preset, device, B, dtype, attn, compile, iters, warmup, count, notes):
    """bench_step; a compiled run that fails is a finding, not the end of the benchmark: the failure goes to
    `notes` and None is returned."""
    try:
        return bench_step(recipe, preset, device, B, dtype, attn, compile, iters,
                          warmup if compile == "off" else max(warmup, 3), count)
    except Exception as e:
        if compile == "off":
            raise
        torch._dynamo.reset()
        free(device)
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        notes.append(f"{preset} {recipe}: torch.compile of the encoders failed ({why}); no compiled row.")
        return None


def add_mfu(row, device_name):
    flops = row.get("flops_analytic") or row.get("flops_counted")
    peak = peak_flops(device_name, row["dtype"]) if device_name else None
    row["tflops_per_s"] = flops / (row["step_ms"] / 1e3) / 1e12 if flops else None
    row["mfu"] = row["tflops_per_s"] * 1e12 / peak if flops and peak else None
    return row


# ---------------------------------------------------------------------------------------------------------
# 3: ours vs Hugging Face transformers


def hf_twins(cfg):
    """RobertaModel and BeitModel with our language / vision encoder's architecture (as tests/test_pretrained.py
    builds them): same sizes, RoBERTa positions after the pad id, BEiT with a relative position bias per layer,
    layer scale, mean pooling, no absolute positions; the same dropout and drop path; SDPA attention."""
    import transformers
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.width,
        max_position_embeddings=cfg.max_text_len + cfg.pad_id + 1, type_vocab_size=1, pad_token_id=cfg.pad_id,
        layer_norm_eps=1e-5, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa"), add_pooling_layer=False)
    beit = transformers.BeitModel(transformers.BeitConfig(
        hidden_size=cfg.width, num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_ratio * cfg.width, image_size=cfg.image_size, patch_size=cfg.patch_size,
        use_mask_token=True, use_absolute_position_embeddings=False, use_relative_position_bias=True,
        use_shared_relative_position_bias=False, layer_scale_init_value=cfg.layer_scale, use_mean_pooling=True,
        layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=cfg.drop_path, attn_implementation="sdpa"), add_pooling_layer=True)
    return roberta, beit


def bench_hf(preset, device, B, dtype, iters, warmup):
    """Forward + backward ms of our encoders and their HF twins on the same input, interleaved (ours, HF,
    ours, ...) so that clock drift hits both alike. Returns two rows (language, vision)."""
    cfg = build("xfm", preset)[0]
    roberta, beit = hf_twins(cfg)
    ours_t, ours_v = TextEncoder(cfg), VisionEncoder(cfg)
    g = torch.Generator().manual_seed(0)
    T = TEXT_LEN[preset]
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    att = torch.ones_like(ids)
    for b in range(B):  # padded rows, as a text batch has them: row b keeps between half and all of T
        n = T - (b * T // (2 * B))
        ids[b, n:], att[b, n:] = cfg.pad_id, 0
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids, att, images = ids.to(device), att.to(device), images.to(device)
    autocast, _ = autocast_for(dtype, device)
    # each output reduced to one scalar to backpropagate: ours returns [mean of LN(patches), LN(patches)], HF's
    # BEiT the blocks' output and its pooler (LN of the mean): the same blocks and one LayerNorm each
    def ours_text():
        return ours_t(ids, att).float().mean()

    def hf_text():
        return roberta(input_ids=ids, attention_mask=att).last_hidden_state.float().mean()

    def ours_vision():
        return ours_v(images).float().mean()

    def hf_vision():
        o = beit(pixel_values=images)
        return o.last_hidden_state.float().mean() + o.pooler_output.float().mean()

    runs = [("language", f"{B} x {T} tokens", ours_t, ours_text, roberta, hf_text),
            ("vision", f"{B} images {cfg.image_size}px", ours_v, ours_vision, beit, hf_vision)]
    rows = []
    for part, inp, ours_m, ours_fn, hf_m, hf_fn in runs:
        ours_m.to(device).train()
        hf_m.to(device).train()
        times = {"ours": [], "hf": []}
        for i in range(warmup + iters):
            for who, fn in (("ours", ours_fn), ("hf", hf_fn)):
                sync(device)
                t0 = time.perf_counter()
                with autocast():
                    loss = fn()
                loss.backward()
                sync(device)
                if i >= warmup:
                    times[who].append(time.perf_counter() - t0)
        ours_ms, hf_ms = (sum(times[w]) / iters * 1e3 for w in ("ours", "hf"))
        rows.append(dict(config=preset, part=part, input=inp, dtype=dtype, ours_ms=ours_ms, hf_ms=hf_ms,
                         ratio=ours_ms / hf_ms, hf_attn=hf_m.config._attn_implementation))
        ours_m.cpu()
        hf_m.cpu()
    free(device)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 4: data loading


def bench_data(device, out_dir, n_batches, step_s, eats):
    """Loader throughput of each train.py stream at the default TrainConfig, with 0 and 2 workers, against a
    training step of step_s seconds that eats {kind: (images, texts)} per step (None: no comparison)."""
    import train  # the defaults live in TrainConfig
    tc = train.TrainConfig()
    if not os.path.isdir(tc.data_dir):
        print(f"building the toy world in {tc.data_dir} ...")
        toyworld.make_toy(tc.data_dir, seed=0)
    tok = data.get_tokenizer(tc.data_dir, out_dir, tc.vocab_size, tc.tokenizer or None)
    mcfg = make_config(tc.config)
    # train.py's per-rank batches for one process and no accumulation
    per_rank = {"pair": tc.batch_size, "region": tc.region_batch_size or max(tc.batch_size // 2, 1),
                "image": tc.batch_size, "text": tc.text_batch_size or tc.batch_size}
    rows, one_batch = [], {}
    for workers in (0, 2):
        for kind in data.KINDS:
            # one stream at a time (batch_size names only this kind), so idle workers of others do not compete
            streams = data.build_streams(tc.data_dir, tok, image_size=mcfg.image_size, patch_size=mcfg.patch_size,
                                         batch_size={kind: per_rank[kind]}, text_len=tc.text_len,
                                         caption_len=tc.caption_len, seed=tc.seed, rank=0, world_size=1,
                                         num_workers=workers, bad=formats.BadInput(verbose=False), hflip=tc.hflip,
                                         crop_scale=(tc.crop_min_scale, 1.0))
            if kind not in streams:
                continue
            stream = streams.pop(kind)
            for _ in range(2 + workers):                                 # start-up (worker spawn) excluded
                one_batch[kind] = next(stream)
            images = texts = 0
            t0 = time.perf_counter()
            for _ in range(n_batches):
                b = next(stream)
                images += len(b["image"]) if "image" in b else 0
                texts += len(b["ids"]) if "ids" in b else 0
            dt = time.perf_counter() - t0
            del stream, streams                                         # shuts the workers down
            gc.collect()
            row = dict(stream=kind, workers=workers, batch=per_rank[kind], batches=n_batches,
                       ms_per_batch=dt / n_batches * 1e3, images_per_s=images / dt, texts_per_s=texts / dt,
                       step_images_per_s=None, step_texts_per_s=None, load_ms_per_step=None, headroom=None)
            if eats:
                n_img, n_txt = eats[kind]
                row.update(step_images_per_s=n_img / step_s, step_texts_per_s=n_txt / step_s)
                # the time this stream needs to load what one step eats, and how many times faster than the
                # step it delivers (headroom < 1: this stream alone cannot keep up)
                row["load_ms_per_step"] = (n_img / row["images_per_s"] if n_img else n_txt / row["texts_per_s"]) * 1e3
                row["headroom"] = step_s * 1e3 / row["load_ms_per_step"]
            rows.append(row)
    copy_rows = bench_copy(one_batch, device) if device.type == "cuda" else []
    return rows, copy_rows, per_rank


def bench_copy(batches, device, reps=20):
    """Host-to-device copy of one step's batches (every stream): pageable vs pinned memory, non_blocking."""
    pinned = {k: {n: t.pin_memory() if torch.is_tensor(t) else t for n, t in b.items()} for k, b in batches.items()}
    nbytes = sum(t.numel() * t.element_size() for b in batches.values() for t in b.values() if torch.is_tensor(t))
    rows = []
    for name, src in (("pageable", batches), ("pinned", pinned)):
        for _ in range(3):
            to_device(src, device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            to_device(src, device)
        sync(device)
        dt = (time.perf_counter() - t0) / reps
        rows.append(dict(memory=name, mb=nbytes / 2 ** 20, ms=dt * 1e3, gb_per_s=nbytes / dt / 1e9))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "on" if v else "off"
    if v == 0:
        return "-"
    if isinstance(v, float):
        return f"{v:.2g}" if abs(v) < 10 ** -digits else f"{v:,.{digits}f}"
    return str(v)


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def step_table(rows):
    headers = ["config", "recipe", "params", "batch (pair/region img/image/text)", "step ms", "fwd ms", "bwd ms",
               "opt ms", "samples/s", "tokens/s", "peak mem MB", "GFLOP/step analytic", "GFLOP/step counted",
               "TFLOP/s", "MFU", "aten ops (fwd+bwd)", "host syncs", "µs/op", "fwd ops in encoders"]
    out = []
    for r in rows:
        B = r["batch"]
        region = f"{max(2, B // 2)}x{CAPTIONS_PER_REGION_IMAGE}" if r["recipe"] == "xfm" else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        if r.get("mfu") is not None and r["recipe"] != "xfm":
            mfu += " (counted)"
        out.append([r["config"], r["recipe"], f"{r['params_m']:.1f}M", f"{B}/{region}/{B}/{B}", fmt(r["step_ms"]),
                    fmt(r["fwd_ms"]), fmt(r["bwd_ms"]), fmt(r["opt_ms"]), fmt(r["samples_per_s"]),
                    fmt(r["tokens_per_s"], 0), fmt(r["peak_mem_mb"], 0),
                    fmt(r["flops_analytic"] / 1e9 if r.get("flops_analytic") else None),
                    fmt(r["flops_counted"] / 1e9 if r.get("flops_counted") else None),
                    fmt(r.get("tflops_per_s"), 2), mfu, fmt(r.get("ops")), fmt(r.get("syncs")),
                    fmt(r.get("us_per_op")),
                    f"{r['encoder_forward_ops']} / {r['forward_ops']}" if r.get("ops") else "n/a"])
    return md_table(headers, out)


def sync_sites_text(rows):
    """One line per baseline run: where its host syncs come from (file:line x count)."""
    lines = []
    for r in rows:
        sites = sorted(r.get("sync_sites", {}).items(), key=lambda kv: -kv[1])
        if sites:
            lines.append(f"- {r['config']} {r['recipe']}: " + ", ".join(f"{k} x{n}" for k, n in sites))
    return "\n".join(lines)


def variant_table(rows, baselines):
    headers = ["config", "recipe", "attn", "dtype", "compile", "step ms", "vs baseline", "fwd ms", "bwd ms",
               "samples/s", "peak mem MB", "MFU", "warm-up s", "loss"]
    out = []
    for r in rows:
        base = baselines[(r["config"], r["recipe"])]
        name = lambda k, v: f"**{v}**" if r[k] != base[k] else str(v)  # bold: the knob this row changes
        out.append([r["config"], r["recipe"], name("attn", r["attn"]), name("dtype", r["dtype"]),
                    name("compile", r["compile"]), fmt(r["step_ms"]), f"{base['step_ms'] / r['step_ms']:.2f}x",
                    fmt(r["fwd_ms"]), fmt(r["bwd_ms"]), fmt(r["samples_per_s"]), fmt(r["peak_mem_mb"], 0),
                    f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a", fmt(r["warmup_s"]),
                    f"{r['loss']:.4f}"])
    return md_table(headers, out)


def hf_table(rows):
    headers = ["config", "encoder", "input", "dtype", "ours fwd+bwd ms", "HF fwd+bwd ms", "ours / HF", "HF attention"]
    return md_table(headers, [[r["config"], r["part"], r["input"], r["dtype"], fmt(r["ours_ms"]), fmt(r["hf_ms"]),
                               f"{r['ratio']:.2f}", r["hf_attn"]] for r in rows])


def data_table(rows):
    headers = ["stream", "workers", "batch", "ms/batch", "images/s", "texts/s", "step eats images/s",
               "step eats texts/s", "load ms per step", "loader / step"]
    return md_table(headers, [[r["stream"], r["workers"], r["batch"], fmt(r["ms_per_batch"]), fmt(r["images_per_s"], 0),
                               fmt(r["texts_per_s"], 0), fmt(r["step_images_per_s"], 0), fmt(r["step_texts_per_s"], 0),
                               fmt(r["load_ms_per_step"]), f"{r['headroom']:.1f}x" if r["headroom"] else "n/a"]
                              for r in rows])


def data_summary(rows, tiny):
    """Is loading the bottleneck? With 0 workers the stream loads add to the step; with workers they overlap it."""
    load0 = sum(r["load_ms_per_step"] for r in rows if r["workers"] == 0)
    worst2 = min(r["headroom"] for r in rows if r["workers"] == 2)
    return (f"The tiny X-FM step (batch {tiny['batch']}, {tiny['step_ms']:.0f} ms of compute on this device) eats the "
            "rates in the 'eats' columns. With num_workers=0 (the default) the main process loads the four streams "
            f"one after the other, between steps: {load0:.0f} ms of loading per step, so a training step takes about "
            f"{tiny['step_ms'] + load0:.0f} ms and loading is {100 * load0 / (tiny['step_ms'] + load0):.0f} % of it. "
            "With workers each stream loads in its own processes while the model computes; loading then limits the "
            f"step only where 'loader / step' is below 1x (slowest stream with 2 workers: {worst2:.1f}x), and only "
            "if the machine has cores to spare for the 2 x 4 worker processes.")


def copy_table(rows):
    return md_table(["host memory", "MB per step", "copy ms", "GB/s"],
                    [[r["memory"], fmt(r["mb"], 2), fmt(r["ms"], 3), fmt(r["gb_per_s"], 2)] for r in rows])


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help="model presets, comma-separated (default: tiny,small on the CPU, "
                                                   "tiny,small,base on CUDA)")
    p.add_argument("--recipes", default="xfm,flava", help="xfm and/or flava (flava needs flava.py)")
    p.add_argument("--batch_size", type=int, default=0, help="per-stream batch for every preset (0: per-preset "
                                                             f"default, {DEFAULT_BATCH})")
    p.add_argument("--iters", type=int, default=None, help="timed steps per run (default: 5 on the CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on the CPU, 3 on CUDA; "
                                                             "at least 3 for a compiled run)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--dtypes", default=None, help="dtypes to compare (default: fp32,bf16 on the CPU, "
                                                  "fp32,bf16,fp16 on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the encoders for every config and recipe (default: on CUDA "
                        "for the largest config's first recipe only, since compiling takes 1-3 minutes per model; "
                        "off on the CPU)")
    p.add_argument("--skip_hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--skip_data", action="store_true", help="skip the data loading measurement")
    p.add_argument("--data_batches", type=int, default=20, help="timed batches per stream and worker count")
    p.add_argument("--out", default="runs/bench/bench.md", help="the Markdown report; the JSON goes beside it")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_cuda = device.type == "cuda"
    configs = (args.configs or ("tiny,small,base" if on_cuda else "tiny,small")).split(",")
    recipes = args.recipes.split(",")
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if on_cuda else "fp32,bf16")).split(",")
    iters = args.iters or (10 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 2)
    # (preset, recipe) runs also timed compiled: --compile all; by default on CUDA the largest preset's first
    # recipe (compiling costs 1-3 minutes per model), none on the CPU
    compiled = [(c, r) for c in configs for r in recipes] if args.compile else \
        [(configs[-1], recipes[0])] if args.compile is None and on_cuda and recipes else []
    device_name = torch.cuda.get_device_name(device) if on_cuda else (platform.processor() or platform.machine())
    out_dir = os.path.dirname(args.out) or "."
    os.makedirs(out_dir, exist_ok=True)
    notes, report = [], []

    def say(text):
        print(text, flush=True)
        report.append(text)

    bf16_ok = not on_cuda or torch.cuda.is_bf16_supported()
    base_dtype = "bf16" if on_cuda and bf16_ok else "fp32"              # train.py's --amp=auto
    for d in list(dtypes):
        if d not in ("fp32", "bf16", "fp16"):
            raise SystemExit(f"error: unknown dtype {d!r} (fp32, bf16, fp16)")
        if d == "fp16" and not on_cuda:
            notes.append("fp16 skipped: CPU autocast is bf16 only (train.py refuses --amp=fp16 on the CPU).")
            dtypes.remove(d)
        elif d == "bf16" and not bf16_ok:
            notes.append("bf16 skipped: this GPU does not support it.")
            dtypes.remove(d)
    for r in recipes:
        if r not in ("xfm", "flava"):
            raise SystemExit(f"error: unknown recipe {r!r} (xfm, flava)")
    if "flava" in recipes:
        _, why = import_flava()
        if why:
            notes.append(f"flava recipe skipped: flava.py is not usable ({why}).")
            print(f"note: skipping the flava recipe: flava.py is not usable ({why})", flush=True)
            recipes.remove("flava")
    if not compiled:
        notes.append("torch.compile not timed (--no-compile, or the CPU default: pass --compile).")

    header = ["# bench.py", "",
              f"- command: `python tools/bench.py{' ' + ' '.join(argv) if argv else ''}`",
              f"- device: {device} ({device_name}), torch {torch.__version__}, Python {platform.python_version()}, "
              f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} at the start, process "
              f"memory {peak_memory_mb(torch.device('cpu')):.0f} MB before the first run",
              f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {iters} timed steps after {warmup} warm-up steps per run",
              f"- baseline: sdpa attention, {base_dtype}, no compile; per-stream batch {', '.join(f'{c} {batch_size_for(c, device, args)}' for c in configs)}; "
              f"captions {CAPTION_LEN} tokens, texts {', '.join(f'{c} {TEXT_LEN[c]}' for c in configs)} tokens"]
    say("\n".join(header))
    results = {"header": {"command": "python tools/bench.py " + " ".join(argv), "device": str(device),
                          "device_name": device_name, "torch": torch.__version__, "iters": iters, "warmup": warmup}}

    # ---- 1 + 2: training step and its knobs ----------------------------------------------------------------
    variants = [("sdpa", base_dtype, "off")]                            # (attention, dtype, compile)
    variants += [("sdpa", d, "off") for d in dtypes if d != base_dtype]
    variants += [("explicit", base_dtype, "off")]
    step_rows, baselines = [], {}
    for preset in configs:
        B = batch_size_for(preset, device, args)
        for recipe in recipes:
            compile_variant = [("sdpa", base_dtype, "on")] if (preset, recipe) in compiled else []
            for attn, dtype, comp in variants + compile_variant:
                is_base = (attn, dtype, comp) == variants[0]
                print(f"  step: {preset} {recipe} attn={attn} {dtype} compile={comp} batch={B} ...", flush=True)
                row = bench_step_or_note(recipe, preset, device, B, dtype, attn, comp, iters, warmup,
                                             is_base, notes)
                if row is None:
                    continue
                if not is_base:  # the same batch, so the same FLOPs as the baseline counted
                    row.setdefault("flops_counted", baselines[(preset, recipe)].get("flops_counted"))
                add_mfu(row, device_name if on_cuda else None)
                print(f"    -> {row['step_ms']:.1f} ms/step, {row['samples_per_s']:.0f} samples/s, peak "
                      f"{row['peak_mem_mb']:.0f} MB, warm-up {row['warmup_s']:.1f} s"
                      + (f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") else ""), flush=True)
                step_rows.append(row)
                if is_base:
                    baselines[(preset, recipe)] = row
    results["step"] = step_rows
    say("\n## 1. Training step (baseline)\n")
    say(step_table(list(baselines.values())))
    say("\nsamples = pairs + region captions + images + texts; tokens = text positions + image patches, each input "
        "once; MFU from the analytic count (X-FM) or torch's FLOP counter (FLAVA, marked), CUDA only. aten ops: "
        "the ops one forward + backward dispatches that may launch a kernel (views excluded; optimizer left out); "
        "host syncs: those that make the host wait for the GPU on CUDA; µs/op = step time / aten ops: near the "
        "eager per-op host cost (tens of µs), the step is bound by the host, not by the device; fwd ops in "
        "encoders: of the forward's ops, those inside the three encoders (what compiling them takes out of eager).")
    sites = sync_sites_text(list(baselines.values()))
    if sites:
        say("\nHost syncs by source line (CUDA waits there; the CPU does the same work without waiting):\n\n" + sites)
    say("\n## 2. Speed knobs, one at a time (bold: what differs from the baseline; vs baseline > 1: faster)\n")
    say(variant_table(step_rows, baselines))

    # ---- 3: ours vs HF -------------------------------------------------------------------------------------
    if not args.skip_hf:
        if importlib.util.find_spec("transformers") is None:
            notes.append("Hugging Face comparison skipped: transformers is not installed "
                         "(pip install -r requirements-test.txt).")
        else:
            hf_rows = []
            for preset in configs:
                print(f"  hf: {preset} ...", flush=True)
                hf_rows += bench_hf(preset, device, batch_size_for(preset, device, args), base_dtype, iters, warmup)
            results["hf"] = hf_rows
            say(f"\n## 3. Our encoders vs Hugging Face transformers (forward + backward, train mode, {base_dtype})\n")
            say(hf_table(hf_rows))

    # ---- 4: data loading -----------------------------------------------------------------------------------
    if not args.skip_data:
        tiny = baselines.get(("tiny", "xfm"))
        eats = None
        if tiny:  # (images, texts) that one measured tiny step eats from each stream (synthetic_batch's sizes)
            B = tiny["batch"]
            n_img = max(2, B // 2)
            eats = {"pair": (B, B), "region": (n_img, n_img * CAPTIONS_PER_REGION_IMAGE), "image": (B, 0),
                    "text": (0, B)}
        else:
            notes.append("data loading: no tiny X-FM step in this run, so no consumption rate to compare with.")
        print("  data loading ...", flush=True)
        try:
            rows, copy_rows, per_rank = bench_data(device, out_dir, args.data_batches,
                                                   tiny["step_ms"] / 1e3 if tiny else None, eats)
        except ImportError as e:  # train.py itself fails to import (e.g. a module it needs is missing)
            notes.append(f"data loading skipped: train.py does not import ({e}).")
        else:
            results["data"], results["copy"] = rows, copy_rows
            say(f"\n## 4. Data loading (train.py streams at the TrainConfig defaults, per-rank batch {per_rank}, "
                f"{args.data_batches} batches each)\n")
            say(data_table(rows))
            if tiny:
                say("\n" + data_summary(rows, tiny))
            if copy_rows:
                say("\nHost-to-device copy of one batch of every stream (non_blocking=True):\n")
                say(copy_table(copy_rows))

    if notes:
        say("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    wall = time.time() - t_start
    # another busy process on the machine shows up here (on a CPU, two jobs' thread pools slow each other badly)
    say(f"\nwall time: {wall:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    results["notes"], results["wall_s"] = notes, wall
    with open(args.out, "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.json")
    return results


if __name__ == "__main__":
    main()
