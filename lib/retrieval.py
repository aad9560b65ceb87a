"""
Zero-shot and fine-tuned image-text retrieval, the way X-FM evaluates it (docs/METHOD.md §7.3): ITC ranks every pair, then
the ITM head re-scores the top k candidates of each query, and every pair outside the top k scores -100.
train.py runs it on the held-out pairs at the end of pre-training; finetune.py's retrieval task uses it too.
train.py reads the set before step 1 and decodes each image once to check it (check_images): a bad one is skipped
and counted then, and a set with nothing left stops the run before it starts. finetune.py checks the images of its
task files the same way.

Under torchrun every rank takes part (rank=, world=): each encodes its share of the images and of the texts
(runtime.share: whole batches, so each batch is the one a single process would run), the states are gathered so
every rank holds the full ITC score matrix, and the ITM re-ranking is split by query the same way, its logits
gathered. Each batch holds the items it holds in one process, so the results are one process's
(tests/test_evaluation.py: the same recalls; ITC scores and ITM logits within 1e-5). The re-ranking runs batched,
several queries x their k candidates per fusion call (at most max(batch_size, k) rows). Images are decoded lazily,
batch by batch through a DataLoader (num_workers=), never all at once. Memory: every rank holds the encoders'
outputs of the whole set (images (Ni, 1+P, D), texts (Nt, T, D)), as one process does.

    python train.py --eval_k=16 --eval_batch_size=64                          # at the end of pre-training
    torchrun --standalone --nproc_per_node=8 finetune.py --task retrieval --epochs 0 --init RUN/ckpt.pt

The metrics of finetune.py's other tasks, in %, stand at the end: accuracy, f1_score, matthews, pearson and
vqa_score (tests/test_finetune.py checks each against hand-computed values).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

import data
from lib import formats
from lib import runtime
from lib import transforms


class Images(Dataset):
    """Image files, each decoded when a batch asks for it: [i] -> (3, S, S) by transforms.eval_transform."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return transforms.eval_transform(formats.load_image(self.paths[i]), self.image_size)


# check_images shows a progress bar for more files than this
PROGRESS_MIN = 256


def check_images(paths, desc="checking images", show=True):
    """{path: None, or why it does not decode} for each image file of `paths`. Each is fully decoded
    (formats.load_image: a truncated JPEG fails here, PIL's verify lets it pass) and dropped at once, so only the
    verdicts stay in memory. A pool of threads decodes them (PIL decodes outside the GIL), with a progress bar
    (`show`) for more than PROGRESS_MIN files. finetune.py checks its task files' images with it too."""
    paths = list(dict.fromkeys(paths))

    def why(path):
        try:
            formats.load_image(path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            return str(e) or type(e).__name__
        return None

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        verdicts = list(tqdm(pool.map(why, paths), desc=desc, total=len(paths), leave=False,
                             disable=not show or len(paths) <= PROGRESS_MIN))
    return dict(zip(paths, verdicts))


def load_retrieval_set(path, tok, image_size, caption_len, bad, image_root=""):
    """Held-out pairs with images deduplicated, for retrieval: image (an Images dataset of Ni files), ids/att
    (Nt, T), txt2img (Nt,) and img2txt (Ni lists of text indices). Reads formats.parse_test_pairs: pairs files,
    ALBEF's test JSON and the test split of Karpathy's dataset_*.json. Every image is decoded once here
    (check_images; the set keeps paths, the evaluation decodes them again): one that does not decode is reported
    ("unreadable image") and dropped with its captions. A set left with no pair stops the run (SystemExit)."""
    items = formats.parse_test_pairs(path, bad, image_root)
    verdicts = check_images([item["image"] for item in items], "checking held-out images")
    index, paths, seqs, txt2img, img2txt = {}, [], [], [], []
    for item in items:
        p = item["image"]
        if p not in index:
            index[p] = None
            if verdicts[p] is None:
                paths.append(p)
                index[p] = len(paths) - 1
                img2txt.append([])
            else:
                bad.report("unreadable image", item["where"], f"{p}: {verdicts[p]}", action="dropped with its captions")
        if index[p] is not None:
            img2txt[index[p]].append(len(seqs))
            txt2img.append(index[p])
            seqs.append(tok.encode(item["caption"], caption_len))
    if not paths:
        raise SystemExit(f"error: {path}: no image-text pair to evaluate retrieval on (the file holds none, or "
                         f"each was skipped as bad input: see the warnings)")
    ids = data.pad_seqs(seqs, tok.pad_id)
    return {"image": Images(paths, image_size), "ids": ids, "att": data.padding_mask(seqs, ids.shape[1]),
            "txt2img": torch.tensor(txt2img, dtype=torch.long), "img2txt": img2txt}


@torch.no_grad()
def encode(fn, dataset, batch_size, autocast, rank=0, world=1, num_workers=0, desc=""):
    """fn(batch) over this rank's share of a dataset, batch by batch; the outputs of every share gathered in order
    on every rank -> (len(dataset), ...)."""
    mine = runtime.share(len(dataset), rank, world, batch_size)
    loader = DataLoader(Subset(dataset, mine), batch_size, num_workers=num_workers)
    outs = []
    for batch in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        with autocast():
            outs.append(fn(batch))
    return runtime.gather_shares(torch.cat(outs) if outs else None, len(dataset), rank, world, batch_size)


@torch.no_grad()
def rerank(model, sim, t, att, v, k, autocast, query_is_text=True, batch_size=64, rank=0, world=1):
    """ITM re-scoring of each query's ITC top k. sim (Nq, Nc): ITC scores of queries x candidates; t, att the
    texts' states and mask, v the images' outputs (the queries' side indexed by query, the other by candidate).
    -> (Nq, Nc): the ITM "match" logit for each query's k best candidates by ITC, -100 for every other pair.
    Each fusion call takes n = batch_size // k queries (at least 1) with their k candidates, n x k rows; the
    ranks split the queries in whole calls and every rank gets every query's logits."""
    top = sim.topk(k, dim=1).indices                                       # (Nq, k)
    n = max(1, batch_size // k)                                            # queries per fusion call
    mine = runtime.share(len(sim), rank, world, n)
    logits = []
    for s in tqdm(range(mine.start, mine.stop, n), desc=f"ITM {'t2i' if query_is_text else 'i2t'}",
                  disable=rank != 0, leave=False):
        q = torch.arange(s, min(s + n, mine.stop), device=sim.device)     # (n,) these queries
        qq, cand = q.repeat_interleave(k), top[q].flatten()                # (n*k,) each: query j, its k candidates
        ti, vi = (qq, cand) if query_is_text else (cand, qq)
        with autocast():
            logit = model.itm_head(model.fuse(t[ti], att[ti], v[vi])[:, 0])[:, 1]  # (n*k,) ITM "match" logit
        logits.append(logit.float().view(-1, k))                           # (n, k)
    itm = runtime.gather_shares(torch.cat(logits) if logits else None, len(sim), rank, world, n)  # (Nq, k)
    out = torch.full_like(sim, -100.0)                                     # every pair outside the top k
    out.scatter_(1, top, itm)
    return out


@torch.no_grad()
def scores(model, rs, device, k, batch_size, autocast, rank=0, world=1, num_workers=0):
    """rs: load_retrieval_set output. -> {"itc": (Nt, Ni) ITC scores of texts x images, "t2i": (Nt, Ni) and
    "i2t": (Ni, Nt) the re-ranked scores (the ITM logit in each query's ITC top k, -100 elsewhere)}, fp32, on every
    rank. Every rank must call it (collectives) when world > 1."""
    model.eval()
    v = encode(lambda x: model.encode_image(x.to(device)), rs["image"], batch_size, autocast, rank, world,
               num_workers, "retrieval: images")                          # (Ni, 1+P, D)
    t = encode(lambda b: model.encode_text(b[0].to(device), b[1].to(device)), TensorDataset(rs["ids"], rs["att"]),
               batch_size, autocast, rank, world, 0, "retrieval: texts")   # (Nt, T, D)
    with autocast():
        f_t, f_v = model.itc_features(t, v)
    att = rs["att"].to(device)
    itc = (f_t @ f_v.t()).float()                                          # (Nt, Ni) text x image
    k = min(k, itc.shape[1], itc.shape[0])
    t2i = rerank(model, itc, t, att, v, k, autocast, True, batch_size, rank, world)
    i2t = rerank(model, itc.t().contiguous(), t, att, v, k, autocast, False, batch_size, rank, world)
    model.train()
    return {"itc": itc, "t2i": t2i, "i2t": i2t}


def recalls(sc, rs):
    """scores() -> R@1/5/10 for text->image and image->text, with ITM re-ranking (the official procedure: the top
    k by ITC get the ITM positive logit, every other pair -100) and by ITC alone, and the chance R@1."""
    txt2img, img2txt = rs["txt2img"], rs["img2txt"]

    def rank(scores, right):
        """How many wrong candidates score at least as high as the best right one. Ties count against the right
        one: outside the re-ranked top k every candidate scores -100, so a right one there ranks behind them all."""
        wrong = torch.ones_like(scores, dtype=torch.bool)
        wrong[right] = False
        return int((scores[wrong] >= scores[right].max()).sum())

    def recall(sim, rights):  # a query is right at n if one of its right candidates ranks in the top n
        sim = sim.cpu()
        ranks = torch.tensor([rank(sim[q], rights[q]) for q in range(sim.shape[0])])
        return {f"r{n}": float((ranks < n).float().mean()) * 100 for n in (1, 5, 10)}

    t2i_right = [[int(i)] for i in txt2img]                               # one right image per caption
    res = {}                                                               # (every caption of an image is right)
    for prefix, sim, rights in (("t2i_itc_", sc["itc"], t2i_right), ("i2t_itc_", sc["itc"].t(), img2txt),
                                ("t2i_", sc["t2i"], t2i_right), ("i2t_", sc["i2t"], img2txt)):
        res.update({prefix + name: r for name, r in recall(sim, rights).items()})
    res["t2i_chance_r1"] = 100.0 / sc["itc"].shape[1]
    res["i2t_chance_r1"] = float(np.mean([len(x) for x in img2txt])) * 100.0 / sc["itc"].shape[0]
    return res


def evaluate_retrieval(model, rs, device, k, batch_size, autocast, rank=0, world=1, num_workers=0):
    """rs: load_retrieval_set output -> recalls(): R@1/5/10 both ways, ITM re-ranked and ITC alone. Under torchrun
    every rank calls it with its rank and the world size, and every rank gets the same figures."""
    return recalls(scores(model, rs, device, k, batch_size, autocast, rank, world, num_workers), rs)


# ---------------------------------------------------------------------------------------------------------
# Metrics of the other tasks (finetune.py), in % (checked against hand-computed values in tests/test_finetune.py)


def accuracy(pred, y):
    return float((pred == y).float().mean()) * 100


def f1_score(pred, y, positive=1):
    """Binary F1 of the positive class (GLUE MRPC, QQP): 2 tp / (2 tp + fp + fn)."""
    tp = float(((pred == positive) & (y == positive)).sum())
    fp, fn = float(((pred == positive) & (y != positive)).sum()), float(((pred != positive) & (y == positive)).sum())
    return 200 * tp / max(2 * tp + fp + fn, 1)


def matthews(pred, y, num_classes):
    """Matthews correlation (CoLA) in its multi-class form, from the confusion matrix C (rows true, columns
    predicted): (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), c = trace, s = total, t / p = true / predicted counts."""
    C = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    C.index_put_((y.long(), pred.long()), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    t, p, c, s = C.sum(1), C.sum(0), C.trace(), C.sum()
    den = math.sqrt(float((s * s - p @ p) * (s * s - t @ t)))
    return float((c * s - t @ p) / den) * 100 if den > 0 else 0.0        # 0 when one side is constant


def pearson(x, y):
    """Pearson correlation (STS-B)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x @ y) / (x.norm() * y.norm()).clamp(min=1e-12)) * 100


def vqa_score(pred, answers):
    """VQA score of one predicted answer (a fraction): min(1, #annotators who gave it / 3) for several answers
    (the usual simplification of the official average over 10-choose-9 subsets); plain accuracy for one."""
    return min(1.0, answers.count(pred) / 3) if len(answers) > 1 else float(pred == answers[0])
