"""tools/bench.py's own arithmetic: the analytic FLOP count against torch's FLOP counter, the host-overhead
counter (aten ops and host syncs) on planted code, and one tiny end-to-end run of the report."""
import inspect
import json
import os

import pytest
import torch

import bench
import losses


@pytest.mark.parametrize("stop_grad", [True, False])
def test_analytic_flops_equal_torch_flop_counter(stop_grad):
    """flops_per_step (the MFU numerator) counts every matmul of a tiny X-FM step, forward and backward, exactly
    as torch.utils.flop_counter does on a real step (explicit attention, so the counter sees q k^T and att v)."""
    torch.manual_seed(0)
    cfg, model, _ = bench.build("xfm", "tiny", attn_impl="explicit")
    batch = bench.synthetic_batch(cfg, 4, bench.TEXT_LEN["tiny"], "xfm")
    loss_fn = lambda m, b: losses.xfm_losses(m, b, stop_grad=stop_grad)
    counted = bench.counted_flops(model.train(), loss_fn, batch)
    assert bench.flops_per_step(cfg, bench.batch_shape(batch), stop_grad=stop_grad) == counted


def test_dispatch_counter_counts_kernels_and_syncs():
    """Views are free, arithmetic counts, and each way of making a CUDA host wait counts once, at its line."""
    x = torch.randn(4, 6)
    with bench.DispatchCounter() as views:
        x.view(6, 4).t().unsqueeze(0)[:, :2]
    assert (views.ops, views.syncs) == (0, 0)

    with bench.DispatchCounter() as arith:
        (x + 1) * 2
    assert (arith.ops, arith.syncs) == (2, 0)

    mask = x > 0
    with bench.DispatchCounter() as c:
        x.sum().item()                     # a Python number: sync
        c.line = inspect.currentframe().f_lineno - 1
    assert c.syncs == 1 and list(c.sync_sites) == [f"test_bench.py:{c.line}"]
    with bench.DispatchCounter() as c:
        x[mask]                            # boolean-mask indexing: the output size needs the data
    assert c.syncs == 1
    with bench.DispatchCounter() as c:
        if mask.any():                     # a tensor read as a bool
            pass
    assert c.syncs == 1
    with bench.DispatchCounter() as c:
        x[torch.tensor([0, 2])]            # integer indexing: the size is known, no sync
    assert c.syncs == 0


def test_itc_is_sync_free():
    """ITC's targets are built on the device (no one_hot, which reads its input back on the CPU), so the
    contrastive loss of a pre-training step never makes the host wait, forward or backward."""
    torch.manual_seed(0)
    f_v = torch.nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
    f_t = torch.nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
    with bench.DispatchCounter() as c:
        loss = losses.itc_loss(f_v, f_t, torch.tensor(0.07))
        loss.backward()
    assert c.syncs == 0
    # and the targets are still the diagonal: the loss equals the textbook cross-entropy
    s = f_v @ f_t.t() / 0.07
    y = torch.arange(8)
    ref = 0.5 * (torch.nn.functional.cross_entropy(s, y) + torch.nn.functional.cross_entropy(s.t(), y))
    torch.testing.assert_close(loss, ref)


def test_bench_report_tiny(tmp_path):
    """The whole report on the CPU at the tiny preset: every baseline row carries its op count, sync count,
    µs/op and the forward's ops inside the encoders; the X-FM step's syncs are all in the loss code (the encoders
    never wait); both files are written."""
    out = tmp_path / "bench.md"
    res = bench.main(["--configs", "tiny", "--recipes", "xfm,flava", "--skip_hf", "--skip_data", "--iters", "1",
                      "--warmup", "1", "--dtypes", "fp32", "--batch_size", "4", "--out", str(out)])
    rows = {(r["recipe"], r["attn"]): r for r in res["step"]}
    for recipe in ("xfm", "flava"):
        r = rows[(recipe, "sdpa")]
        assert r["ops"] > 100 and 0 < r["syncs"] < r["ops"]
        assert r["us_per_op"] == pytest.approx(r["step_ms"] * 1e3 / r["ops"])
        assert sum(r["sync_sites"].values()) == r["syncs"]
        assert 0 < r["encoder_forward_ops"] < r["forward_ops"] < r["ops"]
    assert {site.split(":")[0] for site in rows[("xfm", "sdpa")]["sync_sites"]} <= {"losses.py", "backward"}
    text = out.read_text()
    assert "host syncs" in text and "Host syncs by source line" in text
    assert json.load(open(os.path.splitext(out)[0] + ".json"))["step"][0]["ops"] == res["step"][0]["ops"]
