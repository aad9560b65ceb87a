"""tools/bench.py's own arithmetic: the analytic FLOP count against torch's FLOP counter, the host-overhead
counter (aten ops and host syncs) on planted code, and one tiny end-to-end run of the report; tools/gpu_check.py's
largest-batch search, deadline, failure handling and time limits, on fake steps (and one real compiled step)."""
import inspect
import json
import os

import pytest
import torch

import bench
from lib import fast_losses as losses
from lib.opcount import DispatchCounter


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
    with DispatchCounter() as views:
        x.view(6, 4).t().unsqueeze(0)[:, :2]
    assert (views.ops, views.syncs) == (0, 0)

    with DispatchCounter() as arith:
        (x + 1) * 2
    assert (arith.ops, arith.syncs) == (2, 0)

    mask = x > 0
    with DispatchCounter() as c:
        x.sum().item()                     # a Python number: sync
        c.line = inspect.currentframe().f_lineno - 1
    assert c.syncs == 1 and list(c.sync_sites) == [f"test_bench.py:{c.line}"]
    with DispatchCounter() as c:
        x[mask]                            # boolean-mask indexing: the output size needs the data
    assert c.syncs == 1
    with DispatchCounter() as c:
        if mask.any():                     # a tensor read as a bool
            pass
    assert c.syncs == 1
    with DispatchCounter() as c:
        x[torch.tensor([0, 2])]            # integer indexing: the size is known, no sync
    assert c.syncs == 0


def test_itc_is_sync_free():
    """ITC's targets are built on the device (no one_hot, which reads its input back on the CPU), so the
    contrastive loss of a pre-training step never makes the host wait, forward or backward."""
    torch.manual_seed(0)
    f_v = torch.nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
    f_t = torch.nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
    with DispatchCounter() as c:
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
    µs/op and the forward's ops inside the encoders; neither recipe's step makes the host wait (0 syncs: the loss
    code has fixed shapes, docs/ENGINEERING.md); both files are written."""
    out = tmp_path / "bench.md"
    res = bench.main(["--configs", "tiny", "--recipes", "xfm,flava", "--skip_hf", "--skip_data", "--iters", "1",
                      "--warmup", "1", "--dtypes", "fp32", "--batch_size", "4", "--out", str(out)])
    rows = {(r["recipe"], r["attn"]): r for r in res["step"]}
    for recipe in ("xfm", "flava"):
        r = rows[(recipe, "sdpa")]
        assert r["ops"] > 100 and r["syncs"] == 0 and not r["sync_sites"]
        assert r["us_per_op"] == pytest.approx(r["step_ms"] * 1e3 / r["ops"])
        assert 0 < r["encoder_forward_ops"] < r["forward_ops"] < r["ops"]
    text = out.read_text()
    assert "host syncs" in text and "Host syncs by source line" not in text  # no syncs: no sites listed
    assert json.load(open(os.path.splitext(out)[0] + ".json"))["step"][0]["ops"] == res["step"][0]["ops"]


# ---------------------------------------------------------------------------------------------------------
# tools/gpu_check.py: the largest-batch search, the deadline, failures kept in the report, the hard limit

import gpu_check  # noqa: E402
from bench_meters import peak_flops  # noqa: E402


def test_peak_flops_knows_the_h100_and_h200_names():
    """MFU's denominator exists for the names torch reports on the H100 and H200 (SXM: 989 dense bf16 TFLOP/s)."""
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H200 NVL", "bf16") == 835e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12


def fake_step_oom_above(limit, calls):
    """A bench_step that runs up to `limit` per stream and runs out of CUDA memory above it."""
    def step(recipe, preset, device, B, *args, **kwargs):
        calls.append(B)
        if B > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return dict(step_ms_median=10.0 * B, samples_per_step=4 * B, peak_mem_mb=100.0 * B, warmup_s=1.0)
    return step


@pytest.mark.parametrize("limit", [32, 47, 200, 1000])
def test_largest_batch_search_finds_the_out_of_memory_threshold(monkeypatch, limit):
    calls = []
    monkeypatch.setattr(bench, "bench_step", fake_step_oom_above(limit, calls))
    fits = gpu_check.fits_on_device("xfm", "base", torch.device("cpu"), gpu_check.parse_args(["--isolate", "off"]))
    largest, tried = gpu_check.find_max_batch(fits, 32, known_fits=True, doublings=6, bisections=12, multiple=1)
    assert largest == limit and calls == [b for b, _ in tried]
    assert all(ok == (b <= limit) for b, ok in tried)
    # the default: doubling (at most 4 times), then 2 bisections on multiples of 8: a batch that fits, near it
    calls.clear()
    largest, tried = gpu_check.find_max_batch(fits, 32, known_fits=True)
    assert largest <= limit and all(ok == (b <= limit) for b, ok in tried) and len(tried) <= 6
    if limit == 200:
        assert tried == [(64, True), (128, True), (256, False), (192, True), (224, False)] and largest == 192


def test_largest_batch_search_halves_when_the_start_does_not_fit_and_stops_at_the_deadline(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "bench_step", fake_step_oom_above(10, calls))
    fits = gpu_check.fits_on_device("xfm", "base", torch.device("cpu"), gpu_check.parse_args(["--isolate", "off"]))
    largest, tried = gpu_check.find_max_batch(fits, 32, bisections=8, multiple=1)
    assert tried[:3] == [(32, False), (16, False), (8, True)] and largest == 10
    calls.clear()
    assert gpu_check.find_max_batch(fits, 4, known_fits=True, time_left=lambda: 0) == (4, [])
    # an error that is not out-of-memory is not a "does not fit": it reaches the caller
    monkeypatch.setattr(bench, "bench_step", lambda *a, **k: 1 / 0)
    with pytest.raises(RuntimeError, match="batch 8: failed: ZeroDivisionError"):
        gpu_check.find_max_batch(fits, 4, known_fits=True)


def test_gpu_check_deadline_skips_failures_are_kept_and_every_row_is_reported(monkeypatch, tmp_path):
    """A fake clock: each measurement takes 100 s of a 250 s budget, so a row starts only while the deadline
    leaves it its NEEDS_S; a compile error and an out-of-memory are written in their rows; the report lists every
    requested row with its status, in Markdown and JSON."""
    clock = [0.0]
    monkeypatch.setattr(gpu_check.Report, "elapsed", lambda self: clock[0])
    monkeypatch.setattr(gpu_check, "NEEDS_S", {"eager": 20, "step": 60, "graphs": 60, "toy": 60, "search": 40})

    def step(recipe, preset, device, B, dtype, attn, compile, iters, warmup, count=False, backend="inductor"):
        clock[0] += 100
        if (recipe, compile) == ("flava", "off"):
            raise RuntimeError("Inductor failed: planted")
        row = dict(step_ms_median=50.0, samples_per_step=4 * B, peak_mem_mb=1024.0, warmup_s=1.0)
        return {**row, "flops_analytic": 1e12, "ops": 1000, "syncs": 3} if compile == "off" else \
            {**row, "dynamo": {"graph_breaks": 2, "break_reasons": {"x at losses.py:1": 2}, "graphs": 3,
                               "recompiles": 0}}
    monkeypatch.setattr(bench, "bench_step", step)
    res = gpu_check.main(["--device", "cpu", "--configs", "tiny", "--out", str(tmp_path), "--budget_s", "250",
                          "--modes", "eager,step,graphs", "--loop", "off", "--skip_toy", "--max_batch_search", "off",
                          "--matmul_n", "64", "--isolate", "off"])
    status = {(r["recipe"], r["mode"]): r["status"] for r in res["rows"]}
    # t=0 eager runs (-> 100), t=100 step runs (-> 200), t=200 graphs needs 60 of the 50 left: skipped,
    # flava eager needs 20: runs and fails (-> 300), the rest skipped
    assert status[("xfm", "eager")] == status[("xfm", "step")] == "ok"
    assert status[("xfm", "graphs")].startswith("skipped")
    assert status[("flava", "eager")].startswith("failed: RuntimeError")
    assert status[("flava", "step")].startswith("skipped") and status[("flava", "graphs")].startswith("skipped")
    xfm = res["rows"][0]
    assert xfm["tflops_per_s_median"] == pytest.approx(1e12 / 0.05 / 1e12) and xfm["us_per_op_median"] == 50.0
    text = (tmp_path / "gpu_check.md").read_text()
    for recipe in ("xfm", "flava"):
        for mode in ("eager", "step", "graphs"):
            assert f"| tiny | {recipe} | 32 | {mode} | {status[(recipe, mode)]} |" in text
    assert "x at losses.py:1 x2" in text and "state: finished" in text
    saved = json.load(open(tmp_path / "gpu_check.json"))
    assert [r["status"] for r in saved["rows"]] == [r["status"] for r in res["rows"]]

    # an out-of-memory at a batch, and the largest-batch rows reported even when the search finds nothing bigger
    clock[0] = 0.0
    monkeypatch.setattr(bench, "bench_step", fake_step_oom_above(32, []))
    res = gpu_check.main(["--device", "cpu", "--configs", "tiny", "--recipes", "xfm", "--modes", "eager", "--batch",
                          "64", "--loop", "off", "--out", str(tmp_path), "--skip_toy", "--matmul_n", "64",
                          "--isolate", "off"])
    assert res["rows"][0]["status"] == "out of memory"
    assert res["search"][0]["largest"] == 32 and res["rows"][1]["batch"] == 32 and res["rows"][1]["status"] == "ok"
    assert "64 out of memory, 32 fits" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_hard_limit_writes_the_report_and_ends(tmp_path):
    report = gpu_check.Report(str(tmp_path), "python tools/gpu_check.py", 450)
    report.data["rows"] = [gpu_check.step_row("base", "xfm", "step", 32)]
    report.data["rows"][0]["status"] = "running"
    ended = []
    timer = gpu_check.start_watchdog(report, 0.01, exit=ended.append)
    timer.join(5)
    gpu_check.stop_watchdog(timer)                         # (pytest's own SIGTERM handling again)
    assert ended == [3] and report.data["rows"][0]["status"] == "stopped at the hard limit (0 s)"
    assert "stopped at the hard limit" in (tmp_path / "gpu_check.md").read_text()


def test_bench_step_compiles_the_whole_step(tmp_path):
    """compile="step" runs train.LossModel through torch.compile (here the "eager" backend: Dynamo's tracing
    without Inductor) and reports Dynamo's counters; on a fixed batch nothing compiles after the first step."""
    row = bench.bench_step("flava", "tiny", torch.device("cpu"), 2, compile="step", iters=1, warmup=2, backend="eager")
    assert row["compile"] == "step" and torch.isfinite(torch.tensor(row["loss"]))
    d = row["dynamo"]
    assert d["graphs"] >= 1 and d["frames"] >= 1 and d["recompiles"] == 0
    assert d["graph_breaks"] == 0 or d["break_reasons"]    # (today's loss code breaks; each break has a reason)
    assert "ops" not in row and row["step_ms_median"] > 0


def test_gpu_check_isolated_measurement_runs_in_a_child_and_stops_at_its_limit(tmp_path):
    """--isolate: a measurement runs in its own process (a real tiny probe fits; its log is kept), and one that
    outlives its time limit is stopped and marked, without stopping the caller."""
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    report = gpu_check.Report(str(tmp_path), "test", 450)
    spec = dict(kind="probe", device="cpu", recipe="flava", config="tiny", batch=2, dtype="fp32", backend="eager")
    assert gpu_check.run(spec, args, report, 120) == {"status": "ok", "row": {"fits": True}}
    assert (tmp_path / "logs" / "probe_tiny_flava_2.log").exists()
    spec = dict(spec, kind="step", mode="eager", iters=1000, warmup=1)
    result = gpu_check.run(spec, args, report, 0.5)
    assert result["status"] == "stopped at its 0 s limit"
    assert report.child is None


def test_gpu_check_loop_row_times_train_py_own_step(tmp_path):
    """The loop row runs train.py itself in a child process, as under a 1-rank torchrun (DDP-wrapped), on the fast
    path: its step time, its samples, the host syncs of its checked step (on a CPU: lib/opcount's count), and a
    profile of 3 steps. Under --schedule=summed every parameter takes part in the update, so DDP runs without
    find_unused_parameters, and the step makes the host wait for nothing (with it, DDP's reducer reads its map of
    used parameters back on the host)."""
    from lib import toyworld
    toy = str(tmp_path / "toy")
    toyworld.make_toy(toy, seed=0, n_pairs=64, n_regions=32, n_text=64, n_images=32, n_test=16, n_down=8, progress=False)
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    report = gpu_check.Report(str(tmp_path), "test", 450)
    spec = dict(kind="loop", device="cpu", recipe="xfm", config="tiny", batch=4, mode="eager", iters=2, warmup=1,
                workers=0, data_dir=toy, extra=["--schedule", "summed"])
    result = gpu_check.run(spec, args, report, 300)
    assert result["status"] == "ok", result
    row = result["row"]
    assert row["step_ms_median"] > 0 and row["samples_per_step"] > 0 and row["syncs"] == 0, row["sync_sites"]
    assert row["profile"]["top"] and "--losses fast" in row["argv"]
