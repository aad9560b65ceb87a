"""
Performance benchmark of a pre-training step (nanoGPT's bench.py in spirit): how fast one step of each recipe
runs on this machine, where the time goes, how the speed knobs compare, how our encoders compare with the same
architecture in Hugging Face transformers, and whether data loading keeps up.

    python tools/bench.py                                  # CPU: tiny + small, a few minutes on 2 cores
    python tools/bench.py --configs tiny,small,base        # GPU (the default there): every preset, about 8 min on an H100
    python tools/bench.py --configs tiny --skip_hf --skip_data --iters 3   # a quick look
    python tools/bench.py --help

Sections of the report (one Markdown table each; also in JSON), written to --out (runs/bench/bench.md):
  1. Training step, for each model preset (--configs) and recipe (--recipes: xfm and flava): one full step on
     a fixed synthetic batch holding every data kind (X-FM: text, image, pair and region; FLAVA: text, image and
     pair) = the forward of all losses (losses.xfm_losses / flava.flava_losses), backward of their sum,
     gradient clipping and an AdamW step (fused on CUDA, as train.py), i.e. the work of train.py's
     `--schedule=summed` step. The batch is made once and stays on the device (no loading, no
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
     GradScaler, as train.py; fp16 is skipped on the CPU, whose autocast is bf16 only), and torch.compile the
     way train.py --compile does it (each kind of block compiled once: runtime.compile_blocks; bench_step's
     compile="step" compiles the whole step instead); a compile that fails is noted in the report, not fatal.
     Compiling takes minutes, so by default it is timed on CUDA
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
events, and the wall clock is read after torch.cuda.synchronize(). "step ms" is the mean over the timed steps
(the JSON rows also hold the median, step_ms_median).

This file makes the synthetic batch, times the step and writes the report. Its step timer, bench_step, is shared
with tools/gpu_check.py, which also has it replay the compiled step as CUDA graphs (compile="graphs"). The instruments (clocks, memory, FLOPs,
aten ops, TorchDynamo's counters) are in tools/bench_meters.py, section 3 in tools/bench_hf.py and section 4 in
tools/bench_data.py.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
from lib import runtime  # noqa: E402
import train  # noqa: E402
from bench_data import bench_data, jpeg_decode  # noqa: E402  (section 4; --jpeg)
from bench_hf import bench_hf, hf_table  # noqa: E402  (section 3)
from bench_meters import (add_mfu, batch_shape, clear_dynamo_counters, count_dispatch, counted_flops,  # noqa: E402
                          dynamo_summary, flops_per_step, free, ms_between, peak_memory_mb, reset_peak_memory,
                          stamp, sync)
from bench_meters import (CAPTION_LEN, CAPTIONS_PER_REGION_IMAGE, DEFAULT_BATCH, RECIPES, TEXT_LEN,  # noqa: E402
                          build, fmt, md_table, pct, region_images)


# ---------------------------------------------------------------------------------------------------------
# Synthetic batches with the keys and shapes data.py produces (all text positions real: no padding)


def _texts(g, n, T, vocab, prob, max_predictions):
    """n texts of T tokens <s> w w ... </s>: {ids, att, mlm_ids (the masked copy), mlm_labels (-100 where not
    masked), mlm_slots (the bound data.py gives, reached by every row here)}."""
    ids = torch.randint(5, vocab, (n, T), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    k = data.mlm_slots(T, prob, max_predictions)                             # data.mask_text's count
    pos = torch.rand(n, T - 2, generator=g).argsort(dim=1)[:, :k] + 1   # (n, k) masked positions, never <s> </s>
    return {"ids": ids, "att": torch.ones(n, T, dtype=torch.long), "mlm_ids": ids.scatter(1, pos, 4),  # 4 = <mask>
            "mlm_labels": torch.full_like(ids, -100).scatter(1, pos, ids.gather(1, pos)), "mlm_slots": k}


def _mim_masks(g, n, grid):
    k = data.mim_counts(grid)[0]                                        # BEiT's 75/196 share of the patches
    order = torch.rand(n, grid * grid, generator=g).argsort(dim=1)
    return torch.zeros(n, grid * grid, dtype=torch.bool).scatter(1, order[:, :k], True)  # (n, P)


def synthetic_batch(cfg, B, text_len, recipe="xfm", seed=0):
    """{"text", "image", "pair"[, "region"]}: B texts of text_len, B images, B pairs with CAPTION_LEN captions
    and (X-FM) region_images(B) region images with 3 captions each (2 boxed regions + the whole image)."""
    g = torch.Generator().manual_seed(seed)
    S, V, grid = cfg.image_size, cfg.vocab_size, cfg.image_size // cfg.patch_size
    images = lambda n: torch.randn(n, 3, S, S, generator=g)
    t = _texts(g, B, text_len, V, 0.15, 20)
    mim_count = data.mim_counts(grid)[0]                                 # the masked patches of every image
    batch = {"text": {"ids": t["mlm_ids"], "att": t["att"], "labels": t["mlm_labels"], "mlm_slots": t["mlm_slots"]},
             "image": {"image": images(B), "mim_mask": _mim_masks(g, B, grid), "mim_count": mim_count}}
    # caption masking of the recipe: X-FM's IMLM masks half (<= 15), FLAVA's MMM 15 % (data.CAPTION_MASKING)
    cap_prob, cap_max, _ = data.CAPTION_MASKING[recipe]
    batch["pair"] = {**_texts(g, B, CAPTION_LEN, V, cap_prob, cap_max), "image": images(B),
                     "mim_mask": _mim_masks(g, B, grid), "mim_count": mim_count, "img_id": torch.arange(B)}
    if recipe == "xfm":
        n_img = region_images(B)
        N = CAPTIONS_PER_REGION_IMAGE * n_img
        captions = _texts(g, N, CAPTION_LEN, V, cap_prob, cap_max)
        img_index = torch.arange(n_img).repeat_interleave(CAPTIONS_PER_REGION_IMAGE)   # (N,)
        is_region = (torch.arange(N) % CAPTIONS_PER_REGION_IMAGE) != CAPTIONS_PER_REGION_IMAGE - 1
        box = torch.cat([0.3 + 0.4 * torch.rand(N, 2, generator=g), 0.2 + 0.3 * torch.rand(N, 2, generator=g)], 1)
        box[~is_region] = torch.tensor([0.5, 0.5, 1.0, 1.0])            # the whole-image caption
        patch_mask = torch.rand(N, grid * grid, generator=g) < 0.3
        patch_mask[:, 0] = True
        patch_mask[~is_region] = True
        batch["region"] = {**captions, "image": images(n_img), "img_index": img_index, "box": box,
                           "is_region": is_region, "patch_mask": patch_mask, "img_id": img_index.clone()}
    return batch


def batch_counts(batch, cfg):
    """{kind: (images, texts, tokens)} of one batch; see the module docstring for the definitions."""
    counts = {}
    for kind, b in batch.items():
        images, texts = len(b.get("image", ())), len(b.get("ids", ()))
        counts[kind] = (images, texts, images * cfg.num_patches + (b["ids"].numel() if texts else 0))
    return counts


# ---------------------------------------------------------------------------------------------------------
# The recipes

# recipe -> (config of a preset, loss function(model, batch) -> {name: loss}); flava.build_model builds either
# the fast path of each recipe's losses (lib/fast_losses.py): what a GPU step runs
# ---------------------------------------------------------------------------------------------------------
# 1 + 2: the training step

# bench_step's compile: none, each kind of block (train.py --compile), the whole step, the whole step + CUDA graphs
COMPILE_CHOICES = ("off", "blocks", "step", "graphs")


def bench_step(recipe, preset, device, B, dtype="fp32", attn="sdpa", compile="off", iters=5, warmup=2,
               count=False, backend="inductor"):
    """Time `iters` full training steps (after `warmup`) on one fixed synthetic batch; returns a row dict.
    compile: "off"; "blocks" (what train.py --compile does: each kind of Transformer block compiled once,
    runtime.compile_blocks, the loss code eager); "step" (the whole step's loss module, train.LossModel, compiled
    as one graph with runtime.compile_step) or "graphs" (the same in mode "reduce-overhead": CUDA graphs).
    backend: torch.compile's backend ("inductor"; "eager" or "aot_eager" test the tracing alone, e.g. on a CPU).
    A compiled run adds compile_s (the first step's time less a compiled step's median), compile_clock_s (the time
    TorchDynamo's own clock gives its frame compiles: no first-step allocations in it), graph_breaks, graphs
    (TorchDynamo's graphs compiled) and recompiles (frames compiled after the first step), and every TorchDynamo
    counter under "dynamo". count:
    also count the step's FLOPs with torch's counter (the same batch gives the same count, so once per preset and
    recipe is enough). Timed to the median step too: step_ms is the mean (wall clock), step_ms_median the
    median of the per-step intervals."""
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {compile!r}")
    torch.manual_seed(0)
    reset_peak_memory(device)
    cfg, model, loss_fn = build(recipe, preset, attn_impl=attn)
    model = model.to(device).train()
    batch = {k: runtime.to_device(b, device) for k, b in synthetic_batch(cfg, B, TEXT_LEN[preset], recipe).items()}
    # one AdamW over every parameter (train.py's groups differ only in decay and lr, not in cost); fused on CUDA
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    autocast, scaler, _ = runtime.amp_setup(dtype, device)                # fp16 with a GradScaler, as train.py
    step_losses = lambda: loss_fn(model, batch)                         # noqa: E731  {name: loss} of the step
    loss_model = compiled = None
    if compile in ("step", "graphs"):  # the whole forward of every loss as one module (its backward follows)
        loss_model = train.LossModel(model, stop_grad=True, recipe=recipe, fast=True)
        mode = "default" if compile == "step" else "reduce-overhead"
        compiled = runtime.compile_step(loss_model, mode) if backend == "inductor" else \
            torch.compile(loss_model, backend=backend, dynamic=False)   # (mode is an Inductor option)
        step_losses = lambda: compiled(batch)[0]                        # noqa: E731  (losses, stats) -> losses
        clear_dynamo_counters()
    if compile == "blocks":
        loss_model, inductor = train.LossModel(model, stop_grad=True, recipe=recipe, fast=True), runtime.COMPILE_BACKEND
        runtime.COMPILE_BACKEND = backend                               # (read when each block is compiled)
        try:
            runtime.compile_blocks(model)
        finally:
            runtime.COMPILE_BACKEND = inductor
        step_losses = lambda: loss_model(batch)[0]                      # noqa: E731  (losses, stats) -> losses
        clear_dynamo_counters()
    frames_first_step = None

    marks, t_warm = [], time.perf_counter()
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            warmup_s, t0, marks = time.perf_counter() - t_warm, time.perf_counter(), []
        if i == 1 and compile != "off":  # compiling after the first step: a recompile
            frames_first_step = torch._dynamo.utils.counters["frames"]["total"]
            first_step_s = time.perf_counter() - t_warm
        if compile == "graphs":  # a new step: the previous replay's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        marks.append(stamp(device))
        with autocast():
            out = step_losses()
        loss = sum(out.values())
        marks.append(stamp(device))
        (scaler.scale(loss) if scaler else loss).backward()
        marks.append(stamp(device))
        runtime.optimizer_step(optimizer, scaler, model.parameters(), 1.0)   # clip + AdamW, as train.py
        marks.append(stamp(device))
    sync(device)
    wall = time.perf_counter() - t0
    # 4 marks per timed iteration -> mean ms of the forward, the backward and the optimizer
    fwd, bwd, opt = (sum(ms_between(marks[4 * i + j], marks[4 * i + j + 1]) for i in range(iters)) / iters
                     for j in range(3))
    step_ms_median = statistics.median(ms_between(marks[4 * i], marks[4 * i + 3]) for i in range(iters))
    counts = batch_counts(batch, cfg)
    images, texts, tokens = (sum(c[j] for c in counts.values()) for j in range(3))
    samples = sum(t or i for i, t, _ in counts.values())                # texts of a kind with text, else images
    row = dict(config=preset, recipe=recipe, dtype=dtype, attn=attn, compile=compile, batch=B,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, step_ms=wall / iters * 1e3,
               step_ms_median=step_ms_median,
               fwd_ms=fwd, bwd_ms=bwd, opt_ms=opt, samples_per_s=samples * iters / wall,
               tokens_per_s=tokens * iters / wall, images_per_step=images, texts_per_step=texts,
               samples_per_step=samples, peak_mem_mb=peak_memory_mb(device), warmup_s=warmup_s,
               loss=float(loss.detach()), eats={k: c[:2] for k, c in counts.items()})
    if recipe == "xfm":
        row["flops_analytic"] = flops_per_step(cfg, batch_shape(batch))
    if compile != "off":
        row["dynamo"] = dynamo_summary(frames_first_step)
        row.update(compile_s=max(0.0, first_step_s - step_ms_median / 1e3), compile_clock_s=row["dynamo"]["compile_clock_s"],
                   **{k: row["dynamo"][k] for k in ("graph_breaks", "graphs", "recompiles")})
    if compile == "off":  # a compiled step runs fused kernels, not the aten ops counted here
        counter = count_dispatch(model, loss_fn, batch, autocast)
        row.update(ops=counter.ops, syncs=counter.syncs, sync_sites=counter.sync_sites,
                   us_per_op=row["step_ms"] * 1e3 / counter.ops, forward_ops=counter.forward_ops,
                   encoder_forward_ops=counter.encoder_ops)
    del model, optimizer, out, loss, step_losses
    loss_model = compiled = None                                        # (they hold the model too)
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


# ---------------------------------------------------------------------------------------------------------
# Report


def step_table(rows):
    headers = ["config", "recipe", "params", "batch (pair/region img/image/text)", "step ms", "fwd ms", "bwd ms",
               "opt ms", "samples/s", "tokens/s", "peak mem MB", "GFLOP/step analytic", "GFLOP/step counted",
               "TFLOP/s", "MFU", "aten ops (fwd+bwd)", "host syncs", "µs/op", "fwd ops in encoders"]
    out = []
    for r in rows:
        B = r["batch"]
        region = f"{region_images(B)}x{CAPTIONS_PER_REGION_IMAGE}" if r["recipe"] == "xfm" else "-"
        counted = r.get("mfu") is not None and r["recipe"] != "xfm"
        giga = lambda key: fmt(r[key] / 1e9 if r.get(key) else None)
        out.append([r["config"], r["recipe"], f"{r['params_m']:.1f}M", f"{B}/{region}/{B}/{B}", fmt(r["step_ms"]),
                    fmt(r["fwd_ms"]), fmt(r["bwd_ms"]), fmt(r["opt_ms"]), fmt(r["samples_per_s"]),
                    fmt(r["tokens_per_s"], 0), fmt(r["peak_mem_mb"], 0), giga("flops_analytic"),
                    giga("flops_counted"), fmt(r.get("tflops_per_s"), 2), pct(r.get("mfu")) + " (counted)" * counted,
                    fmt(r.get("ops")), fmt(r.get("syncs")), fmt(r.get("us_per_op")),
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
        knob = lambda k: f"**{r[k]}**" if r[k] != base[k] else str(r[k])  # bold: the knob this row changes
        out.append([r["config"], r["recipe"], knob("attn"), knob("dtype"), knob("compile"), fmt(r["step_ms"]),
                    f"{base['step_ms'] / r['step_ms']:.2f}x", fmt(r["fwd_ms"]), fmt(r["bwd_ms"]),
                    fmt(r["samples_per_s"]), fmt(r["peak_mem_mb"], 0), pct(r.get("mfu")), fmt(r["warmup_s"]),
                    f"{r['loss']:.4f}"])
    return md_table(headers, out)


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
    p.add_argument("--recipes", default="xfm,flava", help="xfm and/or flava")
    p.add_argument("--batch_size", type=int, default=0, help="per-stream batch for every preset (0: per-preset "
                                                             f"default, {DEFAULT_BATCH})")
    p.add_argument("--iters", type=int, default=None, help="timed steps per run (default: 5 on the CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on the CPU, 3 on CUDA; "
                                                             "at least 3 for a compiled run)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--dtypes", default=None, help="dtypes to compare (default: fp32,bf16,fp16 on CUDA; fp32 "
                                                  "on a CPU, and bf16 too where it has bf16 units)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled step (train.py --compile) for every config and recipe (default: on CUDA "
                        "for the largest config's first recipe only, since compiling takes 1-3 minutes per model; "
                        "off on the CPU)")
    p.add_argument("--skip_hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--skip_data", action="store_true", help="skip the data loading measurement")
    p.add_argument("--data_batches", type=int, default=20, help="timed batches per stream and worker count")
    p.add_argument("--out", default="runs/bench/bench.md", help="the Markdown report; the JSON goes beside it")
    p.add_argument("--jpeg", action="store_true", help="only time a JPEG's decode + crop, in full and at the draft "
                   "scale the crop allows (transforms.crop_draft; 224 px, --crop_min_scale 0.8), and exit")
    return p.parse_args(argv)


def cpu_has_bf16():
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it a bf16 step is emulated, many
    times slower than fp32 (a tiny step took seconds on an AVX2-only CPU), so bench times bf16 on the CPU only
    when it has the units or when --dtypes asks for it."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.jpeg:
        print("| JPEG | KiB | decode + crop, full (ms) | at the draft scale (ms) | decoded at |\n|---|---|---|---|---|")
        for r in jpeg_decode():
            print(f"| {r['image']} | {r['kib']} | {r['full_ms']:.1f} | {r['draft_ms']:.1f} | {r['draft_decoded']} |")
        return
    t_start = time.time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_cuda = device.type == "cuda"
    configs = (args.configs or ("tiny,small,base" if on_cuda else "tiny,small")).split(",")
    recipes = args.recipes.split(",")
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if on_cuda else "fp32,bf16" if cpu_has_bf16() else "fp32")).split(",")
    iters = args.iters or (10 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 2)
    # (preset, recipe) runs also timed compiled: --compile all; by default on CUDA the largest preset's first
    # recipe (compiling costs 1-3 minutes per model), none on the CPU
    compiled = [(c, r) for c in configs for r in recipes] if args.compile else \
        [(configs[-1], recipes[0])] if args.compile is None and on_cuda and recipes else []
    batch_size = {c: args.batch_size or DEFAULT_BATCH[device.type][c] for c in configs}  # per stream
    device_name = torch.cuda.get_device_name(device) if on_cuda else (platform.processor() or platform.machine())
    out_dir = os.path.dirname(args.out) or "."
    os.makedirs(out_dir, exist_ok=True)
    notes, report = [], []

    def say(text):
        print(text, flush=True)
        report.append(text)

    base_dtype = runtime.amp_setup("auto", device)[2]                    # train.py's --amp=auto: bf16 on a bf16 GPU
    skipped = {"fp16": None if on_cuda else "CPU autocast is bf16 only (train.py refuses --amp=fp16 on the CPU)",
               "bf16": None if base_dtype == "bf16" or not on_cuda else "this GPU does not support it", "fp32": None}
    for d in dtypes:
        if d not in skipped:
            raise SystemExit(f"error: unknown dtype {d!r} (fp32, bf16, fp16)")
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"error: unknown recipe {r!r} (xfm, flava)")
    notes += [f"{d} skipped: {skipped[d]}." for d in dtypes if skipped[d]]
    dtypes = [d for d in dtypes if not skipped[d]]
    if not compiled:
        notes.append("torch.compile not timed (--no-compile, or the CPU default: pass --compile).")

    header = ["# bench.py", "",
              f"- command: `python tools/bench.py{' ' + ' '.join(argv) if argv else ''}`",
              f"- device: {device} ({device_name}), torch {torch.__version__}, Python {platform.python_version()}, "
              f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} at the start, process "
              f"memory {peak_memory_mb(torch.device('cpu')):.0f} MB before the first run",
              f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {iters} timed steps after {warmup} warm-up steps per run",
              f"- baseline: sdpa attention, {base_dtype}, no compile; per-stream batch "
              f"{', '.join(f'{c} {batch_size[c]}' for c in configs)}; captions {CAPTION_LEN} "
              f"tokens, texts {', '.join(f'{c} {TEXT_LEN[c]}' for c in configs)} tokens"]
    say("\n".join(header))
    results = {"header": {"command": "python tools/bench.py " + " ".join(argv), "device": str(device),
                          "device_name": device_name, "torch": torch.__version__, "iters": iters, "warmup": warmup}}

    # ---- 1 + 2: training step and its knobs ----------------------------------------------------------------
    variants = [("sdpa", base_dtype, "off")]                            # (attention, dtype, compile)
    variants += [("sdpa", d, "off") for d in dtypes if d != base_dtype]
    variants += [("explicit", base_dtype, "off")]
    step_rows, baselines = [], {}
    for preset in configs:
        B = batch_size[preset]
        for recipe in recipes:
            compile_variant = [("sdpa", base_dtype, "blocks")] if (preset, recipe) in compiled else []
            for attn, dtype, comp in variants + compile_variant:
                is_base = (attn, dtype, comp) == variants[0]
                print(f"  step: {preset} {recipe} attn={attn} {dtype} compile={comp} batch={B} ...", flush=True)
                try:  # a compiled run needs at least 3 warm-up steps
                    row = bench_step(recipe, preset, device, B, dtype, attn, comp, iters,
                                     warmup if comp == "off" else max(warmup, 3), count=is_base)
                except Exception as e:  # a compile that fails is a finding, not the end of the benchmark
                    if comp == "off":
                        raise
                    torch._dynamo.reset()
                    free(device)
                    why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
                    notes.append(f"{preset} {recipe}: torch.compile of the encoders failed ({why}); no compiled row.")
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
    if not args.skip_hf and importlib.util.find_spec("transformers") is None:
        notes.append("Hugging Face comparison skipped: transformers is not installed "
                     "(pip install -r requirements-test.txt).")
    elif not args.skip_hf:
        hf_rows = []
        for preset in configs:
            print(f"  hf: {preset} ...", flush=True)
            hf_rows += bench_hf(build("xfm", preset)[0], preset, device, batch_size[preset],
                                TEXT_LEN[preset], base_dtype, iters, warmup)
            free(device)
        results["hf"] = hf_rows
        say(f"\n## 3. Our encoders vs Hugging Face transformers (forward + backward, train mode, {base_dtype})\n")
        say(hf_table(hf_rows))

    # ---- 4: data loading -----------------------------------------------------------------------------------
    if not args.skip_data:
        tiny = baselines.get(("tiny", "xfm"))                           # eats: {kind: (images, texts)} per step
        if not tiny:
            notes.append("data loading: no tiny X-FM step in this run, so no consumption rate to compare with.")
        print("  data loading ...", flush=True)
        rows, copy_rows, per_rank = bench_data(device, out_dir, args.data_batches,
                                               tiny["step_ms"] / 1e3 if tiny else None, tiny and tiny["eats"])
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
