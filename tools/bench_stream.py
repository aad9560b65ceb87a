"""
The data side's memory per rank: N synthetic image-text pairs streamed from tar shards (lib/shards.py) against the
same pairs read from pairs.jsonl (data.py, which parses every record on every rank). For each N it writes the
pairs once (shards of 1000, 32x32 JPEG images, captions of 5-12 words; the JSONL copy names 100 image files
over and over, since only its records cost memory), then runs each rank of a 2-rank run in a fresh process:
build the stream and hand out one whole epoch of this rank's batches (num_workers=0: the main process reads).

    python tools/bench_stream.py                          # N = 10k and 100k, 2 ranks, batch 32 (a few minutes)
    python tools/bench_stream.py --n 10000 --no_jsonl     # shards only

Memory: the process's resident set just before the stream is built (imports and tokenizer loaded) and its
peak while the stream is built and read (Linux VmHWM, reset at that point); "data side" = peak - before.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))

WORDS = ("red green blue yellow purple orange small large circle square triangle cross diamond left right above "
         "below top bottom center shape there is one two three a the of to and with next near far").split()


def synthetic(i):
    """Pair i: (JPEG bytes of a 32x32 image, caption), the same for the same i."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(i)
    img = np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    x, y, w = (int(v) for v in rng.integers(0, 20, 3))
    img[y:y + w + 4, x:x + w + 4] = rng.integers(0, 256, 3)                  # a rectangle of another colour
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue(), " ".join(rng.choice(WORDS, int(rng.integers(5, 13))))


def write_data(folder, n, progress=True):
    """folder/shards/pairs/*.tar (+ index.json) and folder/jsonl/pairs.jsonl with 100 images, for n pairs."""
    from lib import shards
    from tqdm import tqdm
    pairs_dir, jsonl = os.path.join(folder, "shards", "pairs"), os.path.join(folder, "jsonl")
    if os.path.isfile(os.path.join(pairs_dir, shards.INDEX)) and os.path.isfile(os.path.join(jsonl, "pairs.jsonl")):
        return
    os.makedirs(pairs_dir, exist_ok=True)
    os.makedirs(os.path.join(jsonl, "img"), exist_ok=True)
    with open(os.path.join(jsonl, "pairs.jsonl"), "w", encoding="utf-8") as records:
        for s in tqdm(range(0, n, 1000), desc=f"write {n} pairs", disable=not progress, unit="shard"):
            with tarfile.open(os.path.join(pairs_dir, f"{s // 1000:05d}.tar"), "w") as tf:
                for i in range(s, min(s + 1000, n)):
                    jpg, caption = synthetic(i)
                    shards._add(tf, f"{i:09d}.jpg", jpg)
                    shards._add(tf, f"{i:09d}.txt", caption.encode("utf-8"))
                    if i < 100:
                        with open(os.path.join(jsonl, "img", f"{i:03d}.jpg"), "wb") as f:
                            f.write(jpg)
                    records.write(json.dumps({"image": f"img/{i % 100:03d}.jpg", "caption": caption}) + "\n")
    shards.write_index(pairs_dir, "pair", progress=False)


def measure(folder, source, rank, world, batch, buffer):
    """One rank in this process: -> {rss_before_mb, peak_mb, data_mb, batches, samples, seconds}."""
    import data
    from lib import formats
    from lib import shards
    from lib import tokenizer
    from bench_meters import peak_memory_mb, reset_peak_memory
    import torch
    tok = tokenizer.Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    dc = data.DataConfig(image_size=32, patch_size=8, caption_len=30, seed=0)
    bad = formats.BadInput(verbose=False)
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    reset_peak_memory(torch.device("cpu"))
    t0 = time.perf_counter()
    streams = shards.build_streams(os.path.join(folder, source), tok, dc, {"pair": batch}, bad, rank, world,
                                   buffer=buffer)
    st, samples = streams["pair"], 0
    for _ in range(st.len_per_epoch):
        samples += len(next(st)["ids"])
    peak = peak_memory_mb(torch.device("cpu"))
    return {"rss_before_mb": before, "peak_mb": peak, "data_mb": peak - before, "batches": st.len_per_epoch,
            "samples": samples, "seconds": time.perf_counter() - t0, "bad": bad.counts()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="pairs to write (default 10k 100k)")
    p.add_argument("--dir", default="data/bench_stream", help="where the pairs are written (kept and reused)")
    p.add_argument("--world", type=int, default=2, help="ranks of the simulated run (each measured in turn)")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--buffer", type=int, default=1000, help="the shuffle buffer (train.py --shuffle_buffer)")
    p.add_argument("--no_jsonl", action="store_true", help="measure the shards only, not pairs.jsonl")
    p.add_argument("--_measure", nargs=3, metavar=("FOLDER", "SOURCE", "RANK"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._measure:  # a child: one rank, one source
        folder, source, rank = a._measure
        print(json.dumps(measure(folder, source, int(rank), a.world, a.batch, a.buffer)))
        return
    if min(a.n) < a.world * a.batch or a.world < 1 or a.batch < 1 or a.buffer < 1:
        raise SystemExit("error: --n must be at least --world x --batch, and --world, --batch, --buffer at least 1")
    from lib import tokenizer
    rows = []
    for n in a.n:
        folder = os.path.join(a.dir, f"pairs_{n}")
        write_data(folder, n)
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer.Tokenizer.train([synthetic(i)[1] for i in range(2000)], 300, os.path.join(folder, "tokenizer.json"))
        for source in ("shards",) + (() if a.no_jsonl else ("jsonl",)):
            for rank in range(a.world):
                cmd = [sys.executable, os.path.abspath(__file__), "--_measure", folder, source, str(rank),
                       f"--world={a.world}", f"--batch={a.batch}", f"--buffer={a.buffer}"]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                r = {"n": n, "source": source, "rank": rank, **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(r)
                print(f"{n:>7} pairs  {source:<6} rank {rank}: {r['batches']} batches ({r['samples']} samples) in "
                      f"{r['seconds']:.1f} s | before {r['rss_before_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
                      f"data side {r['data_mb']:.1f} MB", flush=True)
    print("\n| pairs | read from | rank | batches | data side peak (MB) | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {'tar shards' if r['source'] == 'shards' else 'pairs.jsonl'} | {r['rank']} | "
              f"{r['batches']} | {r['data_mb']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
