"""
Counting what a region of code asks of the host: the aten ops it dispatches and, among them, the host syncs (ops
that make the host wait for the GPU). tests/test_static.py proves with it that a step of the fast path
(lib/fast_losses.py) has no host sync; tools/bench.py counts a step's ops with it (docs/PERFORMANCE.md).

    python -m pytest -q tests/test_bench.py tests/test_static.py -k "counter or host"
"""
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


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
            # the innermost caller outside torch; this file itself there means the autograd engine's backward
            frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                         if f"{os.sep}torch{os.sep}" not in f.filename)
            in_this_file = os.path.abspath(frame.filename) == os.path.abspath(__file__)
            site = "backward" if in_this_file else f"{os.path.basename(frame.filename)}:{frame.lineno}"
            self.sync_sites[site] = self.sync_sites.get(site, 0) + 1
        return func(*args, **(kwargs or {}))


def uncounted(items):
    """The items of an iterator, each made with every dispatch mode paused (a DispatchCounter sees none of its ops):
    train.py's batch fetch (runtime.next_batches) is host work on the loader's CPU tensors, not the step's."""
    while True:
        with _disable_current_modes():
            item = next(items, None)
        if item is None:
            return
        yield item
