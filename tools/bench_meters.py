"""The instruments of tools/bench.py: clocks and peak memory; what one training step costs in arithmetic
(flops_per_step, the analytic matmul FLOPs of an X-FM step, equal to torch's own FLOP counter, and the peak FLOP/s
per GPU for MFU) and in host work (DispatchCounter: the aten ops a step dispatches and the host syncs among them).
tests/test_bench.py checks both counts."""
import gc
import os
import resource
import time
import traceback

import torch

import flava
from lib import fast_losses
from lib.opcount import DispatchCounter
from model import make_config


# ---------------------------------------------------------------------------------------------------------
# Clocks and memory


def stamp(device):
    """A timestamp of a phase boundary: a recorded CUDA event on a GPU (no sync inside the step), the wall clock
    on the CPU (where every op is synchronous)."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def ms_between(a, b):
    return (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
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
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))  # kB -> MB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------
# FLOPs: analytic (X-FM), counted by torch (any model), and the peak of the device

# Peak dense FLOP/s by device-name substring (first match wins, so the specific names come first):
# (half precision = bf16/fp16 tensor cores, fp32 without TF32). From the vendors' datasheets, without sparsity.
# fp32 is the plain FP32 rate because train.py leaves TF32 off (PyTorch's default for matmuls).
PEAK_FLOPS = [
    ("H100 NVL", 835e12, 60e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),        # SXM (HBM3)
    ("H200 NVL", 835e12, 60e12),
    ("H200", 989e12, 67e12),        # SXM ("NVIDIA H200"), and GH200
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


def add_mfu(row, device_name):
    """row + tflops_per_s and mfu (None off CUDA: device_name None) from its analytic or else its counted FLOPs."""
    flops = row.get("flops_analytic") or row.get("flops_counted")
    peak = peak_flops(device_name, row["dtype"]) if device_name else None
    row["tflops_per_s"] = flops / (row["step_ms"] / 1e3) / 1e12 if flops else None
    row["mfu"] = row["tflops_per_s"] * 1e12 / peak if flops and peak else None
    return row


def batch_shape(batch):
    """What flops_per_step needs to know about a batch: rows, lengths and the rows an MLM head runs on per kind
    (M = rows x mlm_slots: the fast mlm_loss gives every row mlm_slots slots, or every position without the key)."""
    shape = {}
    slots = lambda b: b["ids"].shape[0] * b.get("mlm_slots", b["ids"].shape[1])  # noqa: E731
    if "text" in batch:
        b = batch["text"]
        shape["text"] = dict(B=b["ids"].shape[0], T=b["ids"].shape[1], M=slots(b))
    if "image" in batch:
        shape["image"] = dict(B=batch["image"]["image"].shape[0])
    for kind in ("pair", "region"):
        if kind in batch:
            b = batch[kind]
            shape[kind] = dict(B=b["image"].shape[0], N=b["ids"].shape[0], T=b["ids"].shape[1],
                               M=slots(b),
                               # ITM rows: positives + one negative image per text + one negative text per image,
                               # every row computed (fixed shapes; a row without a negative weighs 0)
                               itm=b["ids"].shape[0] * 3)
    return shape


def flops_per_step(cfg, shape, stop_grad=True):
    """Matmul FLOPs of one X-FM training step (forward + backward) of losses.xfm_losses on a batch of `shape`
    (batch_shape's dict), for any subset of the four kinds, with the passes that losses.py really runs:

      text    language encoder + MLM head on the masked positions only
      pair    vision encoder (with grad) -- language encoder on the caption -- ITC -- language encoder on the
              masked caption (no grad under the stop-gradient) -- one fusion call on the positives + 2 sets of
              hard negatives (ITM, reusing the encoders' outputs) and the masked captions (IMLM, head on the
              masked positions), whose cross-attention projects the keys and values of each image token once
              (fast_losses.fuse_groups) -- vision encoder on the masked view (MIM; its target is the unmasked
              pass above)
      region  the same on the region view (one vision pass per image, captions per region; the keys and
              values of each image's tokens and of each caption's slot 0), with the box head's rows in the
              fusion call; no MIM
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

    def block(B, T, grad, dgrad_in=True, kv_len=0, kv_tokens=0):        # one layer: self-attn [+ cross] + MLP
        n = B * T
        f = mm(n, D, 3 * D, grad, dgrad_in) + attention(B, T, T, grad) + mm(n, D, D, grad)  # qkv, attn, proj
        if kv_len:                                                      # cross-attention to the image
            f += mm(n, D, D, grad) + mm(kv_tokens, D, 2 * D, grad) + attention(B, T, kv_len, grad) + mm(n, D, D, grad)
        return f + mm(n, D, Hd, grad) + mm(n, Hd, D, grad)              # MLP

    def text(B, T, grad=True):
        return sum(block(B, T, grad) for _ in range(cfg.text_layers))

    def vision(B, grad=True):
        patch = mm(B * P, 3 * cfg.patch_size ** 2, D, grad, dgrad=False)  # the conv as a matmul; images need no grad
        return patch + sum(block(B, S, grad) for _ in range(cfg.vision_layers))

    def fusion(B, T, kv_tokens):                                        # the text input is detached under stop_grad
        return sum(block(B, T, True, dgrad_in=(i > 0 or not stop_grad), kv_len=S, kv_tokens=kv_tokens)
                   for i in range(cfg.fusion_layers))

    def mlm_head(M):                                                    # dense + decoder on the M slots
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
        total += mlp_head(s["itm"], 2) + text(N, T, grad=not stop_grad) + mlm_head(s["M"])  # ITM, IMLM
        if kind == "pair":                                              # one fusion call: ITM + IMLM rows
            total += fusion(s["itm"] + N, T, kv_tokens=s["B"] * S) + mim(s["B"])
        else:                                                           # ... + box rows; + each caption's slot 0
            total += fusion(s["itm"] + 2 * N, T, kv_tokens=s["B"] * S + N) + mlp_head(N, 4)
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


# ---------------------------------------------------------------------------------------------------------
# Host work: aten ops and host syncs


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
# Compiled steps: what TorchDynamo did


def _break_reason(text):
    """A graph break's reason, short: its first line, plus the user source line Dynamo names, if any."""
    lines = [line.strip() for line in text.strip().splitlines()]
    where = next((line for line in lines if line.startswith("# File ")), "")
    if where:  # '# File "/x/losses.py", line 259, in bbox_loss, code: ...' -> 'losses.py:259 in bbox_loss'
        path, _, rest = where[len("# File "):].partition(", line ")
        where = f" at {os.path.basename(path.strip(chr(34)))}:{rest.split(', code')[0].replace(', in', ' in')}"
    return (lines[0] if lines else "?") + where


def dynamo_summary(frames_first_step=None):
    """What TorchDynamo did since its counters were last cleared (torch._dynamo.utils.counters and
    graph_break_reasons): graph breaks (the total, and the reasons with the user source line where each graph
    ended, most frequent first), the graphs compiled, the frames compiled, and of those the ones compiled after
    the first step, given `frames_first_step` (the frame count after it): on a fixed batch each is a recompile."""
    utils = torch._dynamo.utils
    reasons = {}
    for r in getattr(utils, "graph_break_reasons", []):
        frame = r.user_stack[-1] if r.user_stack else None
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
        short = (r.reason.strip().splitlines() or ["?"])[0][:80] + where
        reasons[short] = reasons.get(short, 0) + 1
    if not reasons:  # (older or newer torch without graph_break_reasons) the counter's messages
        for text, n in utils.counters["graph_break"].items():
            reasons[_break_reason(text)] = reasons.get(_break_reason(text), 0) + n
    frames = utils.counters["frames"]["total"]
    # Dynamo's own clock of its frame compiles (tracing, AOTAutograd, the backend), which a first step's
    # wall time also holds alongside its first eager work (allocations, page faults)
    clock = sum(getattr(utils, "compilation_time_metrics", {}).get("_compile.compile_inner", []))
    return dict(graph_breaks=sum(utils.counters["graph_break"].values()), compile_clock_s=clock,
                break_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
                graphs=utils.counters["stats"]["unique_graphs"], frames=frames,
                recompiles=None if frames_first_step is None else frames - frames_first_step)


def clear_dynamo_counters():
    torch._dynamo.utils.counters.clear()
    getattr(torch._dynamo.utils, "graph_break_reasons", []).clear()
    getattr(torch._dynamo.utils, "compilation_time_metrics", {}).clear()


# ---------------------------------------------------------------------------------------------------------
# Settings per preset and device, and the models they build

# per-stream batch (pairs, images, texts; the region stream gets B // 2 images with 3 captions each, about what
# the toy world gives): on the CPU the train.py default, on a GPU large enough to keep it busy
DEFAULT_BATCH = {"cpu": {"tiny": 16, "small": 16, "base": 2}, "cuda": {"tiny": 128, "small": 64, "base": 32}}
CAPTION_LEN = 30                                     # train.py --caption_len (official: 30)
TEXT_LEN = {"tiny": 64, "small": 64, "base": 128}    # train.py --text_len; base: the official 128
VOCAB = {"tiny": 2000, "small": 2000}                # the toy BPE (train.py --vocab_size); base keeps RoBERTa's 50265
CAPTIONS_PER_REGION_IMAGE = 3


def region_images(B):
    """Images of the synthetic region batch: B // 2, at least 2 so that every caption has a negative."""
    return max(2, B // 2)


RECIPES = {"xfm": (make_config, fast_losses.xfm_losses),
           "flava": (flava.make_flava_config, lambda model, batch: flava.flava_losses(model, batch, fast=True))}


def build(recipe, preset, **over):
    """(model config, model, loss function) of a recipe at a preset."""
    if preset in VOCAB:
        over.setdefault("vocab_size", VOCAB[preset])
    over.setdefault("max_text_len", max(CAPTION_LEN, TEXT_LEN[preset]))
    make, loss_fn = RECIPES[recipe]
    cfg = make(preset, **over)
    return cfg, flava.build_model(cfg), loss_fn


# ---------------------------------------------------------------------------------------------------------
# Report tables


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


def pct(v):
    return f"{100 * v:.1f} %" if v is not None else "n/a"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
