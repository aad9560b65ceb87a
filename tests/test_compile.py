"""Regional compilation (train.py --compile, lib/runtime.compile_blocks): each kind of Transformer block compiled once
and reused by every layer of its kind, after activation checkpointing and before DDP / FSDP; the eager path draws
its random numbers as it always did. Compiled with the "aot_eager" backend: TorchDynamo and AOTAutograd trace the
graphs (forward and backward) that Inductor would get, without generating code."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import train
from conftest import gloo_group, make_batch, rendezvous, tiny_config
from lib import runtime
from model import XFM, drop_path


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _options(compile, grad_ckpt=False, fsdp=False):
    """The TrainConfig fields runtime.wrap reads."""
    return SimpleNamespace(compile=compile, compile_mode="default", grad_ckpt=grad_ckpt, fsdp=fsdp, amp="fp32")


def _steps(loss_model, model, batch, steps=2):
    """`steps` X-FM steps (train.XFM_UPDATES, each update its own backward) on one fixed batch, no optimizer ->
    (every update's losses, the last update's gradients, Dynamo's frames compiled in the first step and after it)."""
    losses, frames = [], []
    for _ in range(steps):
        for kinds in train.XFM_UPDATES:
            out, _ = loss_model({k: batch[k] for k in kinds})
            sum(out.values()).backward()
            losses.append({k: v.detach() for k, v in out.items()})
            grads = {n: runtime.full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
        frames.append(counters["frames"]["total"])
    return losses, grads, (frames[0], frames[-1] - frames[0])


def _run(cfg, batch, compile, grad_ckpt=False, ddp=False, fsdp=False):
    torch.manual_seed(0)
    model = XFM(cfg).train()
    loss_model = runtime.wrap(train.LossModel(model, True, fast=True), model, _options(compile, grad_ckpt, fsdp),
                              ddp, torch.device("cpu"), find_unused=True)
    counters.clear()
    torch.manual_seed(1)
    return _steps(loss_model, model, batch)


def _assert_equal(a, b):
    (losses_a, grads_a, _), (losses_b, grads_b, _) = a, b
    for la, lb in zip(losses_a, losses_b):
        for name in la:
            assert torch.allclose(la[name], lb[name], rtol=1e-5, atol=1e-6), name
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_compiled_blocks_equal_eager_without_breaks_or_recompiles(aot_eager, grad_ckpt):
    """Two X-FM steps (three updates each) with compiled blocks give the eager run's losses and gradients (no
    dropout, no drop path: a compiled graph draws random numbers in another order), with no graph break, and
    nothing compiles in the second step."""
    cfg = tiny_config(vision_layers=2, text_layers=2, fusion_layers=2)
    batch = make_batch(cfg, seed=1)
    eager = _run(cfg, batch, compile=False, grad_ckpt=grad_ckpt)
    compiled = _run(cfg, batch, compile=True, grad_ckpt=grad_ckpt)
    assert not counters["graph_break"], dict(counters["graph_break"])
    first, later = compiled[2]
    assert first > 0 and later == 0, (first, later)
    _assert_equal(eager, compiled)


def _signatures(model):
    """Forward pre-hooks on every block that collect what a compiled block's graph depends on: the kind of block,
    the shapes of its inputs, train or eval, the grad mode and whether its input needs a gradient (the layer's
    index is not part of it)."""
    seen = set()

    def record(block, args, kwargs):
        shapes = tuple(a.shape if torch.is_tensor(a) else None for a in (*args, *kwargs.values()))
        seen.add((type(block), block.pre_norm, hasattr(block, "cross_attn"), shapes, block.training,
                  torch.is_grad_enabled(), args[0].requires_grad))
    for block in runtime.encoder_blocks(model):
        block.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def test_each_kind_of_block_compiles_once_for_every_depth(aot_eager):
    """With drop path and dropout on, the compiled graphs are one per kind of block and call signature (the same
    for 2 and 3 layers of every encoder), not one per layer: every vision layer's drop-path rate differs, and is a
    tensor the graph reads (the drop_rate runtime.compile_blocks gives), not a constant of it. No recompile in the second step."""
    graphs = []
    for layers in (2, 3):
        torch._dynamo.reset()
        cfg = tiny_config(drop_path=0.1, dropout=0.1, vision_layers=layers, text_layers=layers,
                          fusion_layers=layers)
        torch.manual_seed(0)
        model = XFM(cfg).train()
        seen = _signatures(model)
        loss_model = runtime.wrap(train.LossModel(model, True, fast=True), model, _options(True), False,
                                  torch.device("cpu"), find_unused=True)
        counters.clear()
        _, _, (first, later) = _steps(loss_model, model, make_batch(cfg, seed=1))
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert later == 0, f"{later} recompiles after the first step"
        assert counters["stats"]["unique_graphs"] == first == len(seen), (counters["stats"], first, len(seen))
        graphs.append(first)
    assert graphs[0] == graphs[1], f"compiled graphs grow with depth: {graphs}"


def test_compiled_blocks_hold_the_checkpoint(aot_eager, monkeypatch):
    """--grad_ckpt --compile in torchtitan's order: the blocks are checkpointed first and the checkpointed forward
    compiled, so every block graph Dynamo captures holds the checkpoint (its recomputation compiled with it)."""
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", recorder)
    cfg = tiny_config()
    torch.manual_seed(0)
    model = XFM(cfg).train()
    loss_model = runtime.wrap(train.LossModel(model, True, fast=True), model, _options(True, grad_ckpt=True),
                              False, torch.device("cpu"), find_unused=True)
    out, _ = loss_model(make_batch(cfg, kinds=("pair",), seed=1))
    sum(out.values()).backward()
    assert graphs and all("checkpoint" in code for code in graphs), [c[:300] for c in graphs]


def test_eager_drop_path_draws_as_the_float_formula():
    """The eager path (no --compile) is the plain float formula of stochastic depth, with the same draws from the
    same random stream: a layer of rate p keeps a sample with bernoulli_(1 - p) and scales it by 1 / (1 - p); the
    first layer (rate 0) draws nothing. (The CPU reference runs, reference/*.json, rely on this stream.)"""
    cfg = tiny_config(drop_path=0.2, vision_layers=2)
    torch.manual_seed(0)
    first, block = XFM(cfg).train().vision.blocks
    for b in (first, block):  # the tensor rate a compiled block reads (runtime.compile_blocks), here read eagerly
        b.register_buffer("drop_rate", torch.tensor(b.drop_path), persistent=False)
    x = torch.randn(4, cfg.num_patches + 1, cfg.width)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first(x)
    assert torch.equal(torch.get_rng_state(), before), "a block of drop-path rate 0 draws random numbers"
    y = block(x)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    p, mask = block.drop_path, block.rel_pos()
    keep = lambda a: a.new_empty((a.shape[0], 1, 1)).bernoulli_(1 - p).div_(1 - p)  # noqa: E731
    a = block.gamma_1 * block.attn(block.norm1(x), mask=mask)
    x1 = x + a * keep(a)
    m = block.gamma_2 * block.mlp(block.norm2(x1))
    assert p == 0.2 and torch.equal(y, x1 + m * keep(m))
    assert torch.equal(torch.get_rng_state(), after)
    assert drop_path(x, 0.0, True) is x and drop_path(x, 0.5, False) is x


def _distributed_worker(rank, path, out_dir):
    runtime.COMPILE_BACKEND = "aot_eager"
    torch.set_num_threads(1)
    with gloo_group(rank, 2, path, timeout_s=120):
        cfg = tiny_config(vision_layers=2)
        batch = make_batch(cfg, seed=1)                                   # the same batch on both ranks
        result = {}
        for fsdp in (False, True):
            eager = _run(cfg, batch, compile=False, ddp=True, fsdp=fsdp)
            compiled = _run(cfg, batch, compile=True, ddp=True, fsdp=fsdp)
            result["fsdp" if fsdp else "ddp"] = (eager, compiled, sum(counters["graph_break"].values()))
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "compiled.pt"))


def test_compiled_blocks_under_ddp_and_fsdp(tmp_path):
    """2 gloo ranks, DDP and FSDP (each block sharded after it is compiled): compiled blocks give the eager run's
    losses and gradients, with no graph break and no recompile after the first step; FSDP's and DDP's hooks run
    around each compiled forward, not inside it."""
    mp.spawn(_distributed_worker, args=(rendezvous(), str(tmp_path)), nprocs=2, join=True)
    for mode, (eager, compiled, breaks) in torch.load(tmp_path / "compiled.pt").items():
        first, later = compiled[2]
        assert breaks == 0 and later == 0, (mode, breaks, first, later)  # (FSDP's blocks reuse DDP's graphs)
        _assert_equal(eager, compiled)


def test_bench_reports_the_compile_of_each_kind_of_block():
    """tools/bench.py's compiled row (compile="blocks", train.py --compile): the compile time, no graph break, the
    graphs compiled and no recompile after the first step, for both recipes."""
    import bench
    for recipe in ("flava", "xfm"):
        row = bench.bench_step(recipe, "tiny", torch.device("cpu"), 2, compile="blocks", iters=1, warmup=2,
                               backend="aot_eager")
        assert row["compile"] == "blocks" and torch.isfinite(torch.tensor(row["loss"]))
        assert row["graph_breaks"] == 0 and row["recompiles"] == 0 and row["graphs"] > 0, row["dynamo"]
        assert row["compile_s"] > 0
