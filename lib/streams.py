"""
Streams: each data kind of a JSONL data folder (lib/formats.py) as an infinite iterator of batches, sharded
over the ranks and resumable to the batch. data.py's datasets make the samples and batches; lib/shards.py
streams the kinds that come as tar shards, with the same interface.

    python -m pytest tests/test_data.py -q -k "sampler or stream or resume"
"""
import sys

import torch
from torch.utils.data import DataLoader

from data import KINDS, ImageDataset, PairDataset, RegionDataset, TextDataset
from lib import formats



class ShardedBatchSampler:
    """Infinite batches of (index, epoch) for one rank. Epoch e permutes the data with seed*1000+e
    (the same on every rank), drops the tail so that every rank gets the same number of full
    batches, and gives rank r the disjoint slice perm[r::world_size]. `start` = the number of
    batches to skip (resume)."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1, name="data"):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"stream '{name}' has {n} samples, fewer than world_size * batch_size "
                             f"= {world_size} * {batch_size}; lower the batch size or add data")
        self.start = 0

    def epoch_batches(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        # drop_last, on all ranks alike
        keep = self.batches_per_epoch * self.world_size * self.batch_size
        mine = torch.randperm(self.n, generator=g)[:keep][self.rank::self.world_size].tolist()
        B = self.batch_size
        return [[(i, epoch) for i in mine[b * B:(b + 1) * B]]
                for b in range(self.batches_per_epoch)]

    def __iter__(self):
        k, cached = self.start, (None, None)
        while True:
            epoch, b = divmod(k, self.batches_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.epoch_batches(epoch))
            yield cached[1][b]
            k += 1


class Stream:
    """An infinite iterator of batch dicts for one kind. state_dict() / load_state_dict() resume it
    exactly."""

    def __init__(self, kind, dataset, batch_size, *, seed, rank, world_size, num_workers, bad,
                 pin_memory=False):
        self.kind, self.dataset, self.bad = kind, dataset, bad
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size,
                                           name=kind)
        # whole batches go to the workers, so workers read disjoint batches and keep their order
        # its own generator: creating the loader's iterator must not draw from the global torch
        # RNG, or a resumed run (which creates it at another point) would diverge from the
        # uninterrupted one
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=dataset.collate,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 # page-locked batches make runtime.to_device's non_blocking copy
                                 # truly asynchronous
                                 pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed * 1000 + rank))
        self.len_per_epoch = self.sampler.batches_per_epoch
        self.batches, self._it = 0, None

    @property
    def epoch(self):
        return self.batches // self.len_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:  # (re)start the sampler right after the last batch handed out
            self.sampler.start = self.batches
            self._it = iter(self.loader)
        batch = next(self._it)
        self.batches += 1
        # found where the batch was made (maybe a worker): counted here
        for problem in batch.pop("bad", ()):
            self.bad.once(*problem)
        return batch

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches, self._it = int(state["batches"]), None


def build_streams(data_dir, tok, dc, batch_size, bad, rank=0, world_size=1, num_workers=0,
                  pin_memory=False, skip=()):
    """{kind: Stream} for every kind present in data_dir and named in batch_size (a dict kind ->
    per-rank batch; for "region" it counts images), each dataset built with the run's DataConfig dc.
    The kinds in `skip` are left out (shards.build_streams streams them from tar shards)."""
    assert dc.image_size % dc.patch_size == 0, "image_size must be a multiple of patch_size"
    datasets = {"text": TextDataset, "pair": PairDataset, "region": RegionDataset}
    streams = {}
    for kind, path in formats.find_sources(data_dir).items():
        if kind not in KINDS or kind in skip:
            continue
        if kind not in batch_size:
            if bad.verbose:
                print(f"note: {path} found, but no batch size for '{kind}': stream not used",
                      file=sys.stderr)
            continue
        items = formats.PARSERS[kind](path, bad, dc.image_root)
        if kind == "image":
            ds = ImageDataset(items, dc, bad)
        else:
            ds = datasets[kind](items, tok, dc, bad)
        streams[kind] = Stream(kind, ds, batch_size[kind], seed=dc.seed, rank=rank,
                               world_size=world_size, num_workers=num_workers, bad=bad,
                               pin_memory=pin_memory)
    return {k: streams[k] for k in KINDS if k in streams}

