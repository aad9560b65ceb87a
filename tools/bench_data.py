"""Section 4 of tools/bench.py: whether data loading keeps up with a training step. Each of train.py's streams at
the default TrainConfig (the toy world, built if missing), with 0 and 2 workers; on CUDA also the host-to-device
copy of one step's batches from pageable vs pinned memory. bench.py imports it (with the repository root on
sys.path) and writes the tables."""
import gc
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

import data
from lib import tokenizer
from lib import formats
from lib import toyworld
from lib import runtime
from lib import streams
from lib import transforms
import train
from bench_meters import sync
from model import make_config


def bench_data(device, out_dir, n_batches, step_s, eats):
    """Loader throughput of each train.py stream at the default TrainConfig, with 0 and 2 workers, against a
    training step of step_s seconds that eats {kind: (images, texts)} per step (None: no comparison)."""
    tc = train.TrainConfig()
    toyworld.build_if_missing(tc.data_dir)
    tok = tokenizer.get_tokenizer(tc.data_dir, out_dir, tc.vocab_size, tc.tokenizer or None)
    mcfg = make_config(tc.config)
    per_rank = runtime.batch_plan(tc, 1)[2]                               # train.py's per-rank batches, one process
    rows, one_batch = [], {}
    for workers in (0, 2):
        for kind in data.KINDS:
            # one stream at a time (batch_size names only this kind), so idle workers of others do not compete
            dc = data.DataConfig(mcfg.image_size, mcfg.patch_size, tc.text_len, tc.caption_len, tc.seed, tc.hflip,
                                 (tc.crop_min_scale, 1.0))
            found = streams.build_streams(tc.data_dir, tok, dc, {kind: per_rank[kind]}, formats.BadInput(verbose=False),
                                          num_workers=workers)
            if kind not in found:
                continue
            stream = found.pop(kind)
            for _ in range(2 + workers):                                 # start-up (worker spawn) excluded
                one_batch[kind] = next(stream)
            images = texts = 0
            t0 = time.perf_counter()
            for _ in range(n_batches):
                b = next(stream)
                images, texts = images + len(b.get("image", ())), texts + len(b.get("ids", ()))
            dt = time.perf_counter() - t0
            del stream, found                                          # shuts the workers down
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
        for i in range(3 + reps):                                       # 3 untimed copies first
            if i == 3:
                sync(device)
                t0 = time.perf_counter()
            for b in src.values():
                runtime.to_device(b, device)
        sync(device)
        dt = (time.perf_counter() - t0) / reps
        rows.append(dict(memory=name, mb=nbytes / 2 ** 20, ms=dt * 1e3, gb_per_s=nbytes / dt / 1e9))
    return rows


def jpeg_decode(sizes=((640, 480), (1024, 768), (1600, 1200), (3000, 2000)), size=224, min_scale=0.8, reps=30):
    """Decode + random resized crop of one JPEG (synthetic: blurred noise, quality 90), in full and at the scale
    transforms.crop_draft allows for crops of min_scale to 1 of the area at size px: one row per image size
    with the median ms of each and the draft's decoded size (bench.py --jpeg)."""
    rng, rows = np.random.default_rng(0), []
    draft = transforms.crop_draft(size, (min_scale, 1.0))
    for W, H in sizes:
        noise = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        buf = io.BytesIO()
        noise.save(buf, format="JPEG", quality=90)
        row = {"image": f"{W}x{H}", "kib": len(buf.getvalue()) // 1024}
        for name, d in (("full", None), ("draft", draft)):
            times = []
            for i in range(reps):
                t = time.perf_counter()
                im = formats.load_image(io.BytesIO(buf.getvalue()), d)
                transforms.random_resized_crop(im, size, np.random.default_rng(i), scale=(min_scale, 1.0), uint8=True)
                times.append(time.perf_counter() - t)
            row[name + "_ms"], row[name + "_decoded"] = statistics.median(times) * 1e3, "x".join(map(str, im.size))
        rows.append(row)
    return rows
