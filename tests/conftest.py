"""Shared test helpers: a tiny config and synthetic batches of every data kind (no files needed)."""
import os
import sys
import tempfile
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))  # bench, curves

from model import XFM, make_config  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**kw):
    kw.setdefault("vocab_size", 64)
    kw.setdefault("drop_path", 0.0)
    kw.setdefault("dropout", 0.0)
    return make_config("tiny", **kw)


def _text(g, B, T, vocab, pad=1, cls=0, sep=2, mask_id=4, p=0.3):
    lens = torch.randint(4, T + 1, (B,), generator=g)
    ids = torch.full((B, T), pad, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        ids[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = cls, sep
        att[b, :n] = 1
    # masked copy: a few real positions (never <s>, </s>, padding), at least one per row
    labels = torch.full_like(ids, -100)
    mlm_ids = ids.clone()
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(1, n - 1)
        chosen = pos[torch.rand(len(pos), generator=g) < p]
        if len(chosen) == 0:
            chosen = pos[:1]
        labels[b, chosen] = ids[b, chosen]
        mlm_ids[b, chosen] = mask_id
    return ids, att, mlm_ids, labels


def _mim_mask(g, B, P, n):
    m = torch.zeros(B, P, dtype=torch.bool)
    for b in range(B):
        m[b, torch.randperm(P, generator=g)[:n]] = True
    return m


def make_batch(cfg, kinds=("text", "image", "pair", "region"), B=6, T=10, seed=0):
    """A synthetic batch dict with the exact keys data.py produces."""
    g = torch.Generator().manual_seed(seed)
    S, P, V = cfg.image_size, cfg.num_patches, cfg.vocab_size
    batch = {}
    if "text" in kinds:
        ids, att, mlm_ids, labels = _text(g, B, T, V)
        batch["text"] = {"ids": mlm_ids, "att": att, "labels": labels}
    if "image" in kinds:
        batch["image"] = {"image": torch.randn(B, 3, S, S, generator=g), "mim_mask": _mim_mask(g, B, P, 6)}
    if "pair" in kinds:
        ids, att, mlm_ids, labels = _text(g, B, T, V, p=0.5)
        batch["pair"] = {"image": torch.randn(B, 3, S, S, generator=g), "mim_mask": _mim_mask(g, B, P, 6),
                         "ids": ids, "att": att, "mlm_ids": mlm_ids, "mlm_labels": labels,
                         "img_id": torch.arange(B)}
    if "region" in kinds:
        n_img = max(2, B // 2)
        N = 2 * n_img  # two captions per image: the first a region, the second the whole image
        ids, att, mlm_ids, labels = _text(g, N, T, V, p=0.5)
        img_index = torch.arange(n_img).repeat_interleave(2)
        is_region = torch.tensor([True, False] * n_img)
        cxcy = 0.25 + 0.5 * torch.rand(N, 2, generator=g)
        wh = 0.2 + 0.3 * torch.rand(N, 2, generator=g)
        box = torch.cat([cxcy, wh], 1)
        box[~is_region] = torch.tensor([0.5, 0.5, 1.0, 1.0])
        patch_mask = torch.rand(N, P, generator=g) < 0.4
        patch_mask[:, 0] = True
        patch_mask[~is_region] = True
        batch["region"] = {"image": torch.randn(n_img, 3, S, S, generator=g), "img_index": img_index,
                           "ids": ids, "att": att, "mlm_ids": mlm_ids, "mlm_labels": labels, "box": box,
                           "is_region": is_region, "patch_mask": patch_mask, "img_id": img_index.clone()}
    return batch


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = tiny_config()
    return cfg, XFM(cfg)


def rendezvous():
    """Where the processes of a 2-process test meet: a fresh file path (file:// initialisation needs no TCP port,
    so no other test or program on a busy machine can take it between choosing it and binding it)."""
    fd, path = tempfile.mkstemp(prefix="xfm_gloo_")
    os.close(fd)
    os.remove(path)  # the store creates it
    return path


@contextmanager
def gloo_group(rank, world, path, timeout_s=60):
    """A CPU process group for the 2-process tests (torch.multiprocessing.spawn workers), met at rendezvous()'s
    path. Its short timeout turns a deadlock (ranks waiting in different collectives) into an error within a
    minute instead of a hung CI."""
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
        # no rank tears the group down while another is still in a collective or about to enter one (gloo
        # aborts the process whose peer closed the connection under it)
        dist.barrier()
    finally:
        dist.destroy_process_group()
