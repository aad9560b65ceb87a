"""The pre-training pipeline: the run through main(argv), the three updates of a step and their clipping, the
parameter groups, exact resume, DDP + gradient accumulation, the config parser, bad input and non-finite losses."""
import json
import math
import os
import weakref

import pytest
import torch
import torch.multiprocessing as mp

import flava
from lib import runlog
from lib import pretrained
from lib import runtime
import train
from conftest import gloo_group, rendezvous, make_batch, tiny_config
from model import XFM, make_config
from lib import toyworld

FAST = ["--max_steps=4", "--batch_size=8", "--log_every=1", "--warmup_steps=2", "--vocab_size=300",
        "--eval_k=4", "--caption_len=24", "--text_len=32"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy world, built once for this file."""
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, seed=0, n_pairs=64, n_regions=32, n_text=64, n_images=32, n_test=16, n_down=8, progress=False)
    return d


def read_metrics(run):
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    return [l for l in lines if not l.get("final")], [l for l in lines if l.get("final")]


def test_default_run_through_main_writes_the_run_folder(toy, tmp_path):
    out = str(tmp_path / "run")
    res = train.main([f"--data_dir={toy}", f"--out_dir={out}", *FAST])
    for name in ("config.json", "metrics.jsonl", "ckpt.pt", "loss_curves.png", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    logs, final = read_metrics(out)
    assert [l["step"] for l in logs] == [1, 2, 3, 4]
    names = {k for k in logs[0] if k.startswith("loss/")}
    assert {"loss/mlm", "loss/itc", "loss/itm", "loss/imlm", "loss/mim", "loss/itc_region", "loss/bbox_l1",
            "loss/bbox_giou", "loss/mim_image", "loss/total"} <= names
    assert len(final) == 1 and "retrieval" in final[0] and final[0]["retrieval"]["n_images"] == 16
    assert 0 <= final[0]["retrieval"]["t2i_r1"] <= 100
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["stop_grad"] is True and cfg["train"]["mim_target"] == "vl"
    assert res["final"]["step"] == 4
    # the checkpoint loads with weights_only=True and holds everything a resume needs
    ckpt = runlog.load_checkpoint(out, "cpu")
    assert {"model", "optimizer", "scaler", "step", "rng", "data", "train_config", "model_config"} <= set(ckpt)
    assert ckpt["step"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_resume_reproduces_the_uninterrupted_run_exactly(toy, tmp_path, monkeypatch):
    """Steps 4-6 of a run stopped after step 3 and resumed match the uninterrupted run's. "Exactly" up to
    float32 rounding: CPU matmul kernels round differently depending on memory alignment, so even two
    uninterrupted runs in one process differ in the last bit (~1e-7 relative). A real resume bug (RNG, data
    position, optimizer or scaler state) moves the losses by far more than the 1e-5 allowed here.
    The resumed run holds no copy of the checkpoint's weights while it trains (gone by its first log record)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = [f"--data_dir={toy}", *FAST, "--max_steps=6"]
    train.main([*args, f"--out_dir={a}"])
    train.main([*args, f"--out_dir={b}", "--stop_at=3"])                  # "interrupted" after step 3
    logs_b, _ = read_metrics(b)
    assert [l["step"] for l in logs_b] == [1, 2, 3]
    loaded, alive_at_log = [], []
    load, append = runlog.load_checkpoint, runlog.append_record
    monkeypatch.setattr(runlog, "load_checkpoint", lambda *a: (lambda c: loaded.extend(
        weakref.ref(t) for t in c["model"].values()) or c)(load(*a)))
    monkeypatch.setattr(runlog, "append_record", lambda *a: alive_at_log.append(
        sum(r() is not None for r in loaded)) or append(*a))
    train.main([f"--resume={b}", "--stop_at=0"])                           # continue to max_steps
    assert loaded and alive_at_log == [0, 0, 0]
    logs_a, _ = read_metrics(a)
    logs_b, _ = read_metrics(b)
    assert [l["step"] for l in logs_b] == [1, 2, 3, 4, 5, 6]
    for la, lb in zip(logs_a, logs_b):
        for k in la:
            if k.startswith("loss/") or k in ("grad_norm", "lr", "temp"):
                assert math.isclose(la[k], lb[k], rel_tol=1e-5, abs_tol=1e-7), (la["step"], k, la[k], lb[k])


@pytest.fixture(scope="module")
def kept(toy, tmp_path_factory):
    """A 4-step run that writes a checkpoint every step, keeps the last 2 and exports its final weights -> (run
    folder, export folder, the final checkpoint's model state, read before any test resumes the run)."""
    run, exported = str(tmp_path_factory.mktemp("kept")), str(tmp_path_factory.mktemp("kept_export"))
    train.main([f"--data_dir={toy}", f"--out_dir={run}", *FAST, "--ckpt_every=1", "--keep_last=2", f"--export={exported}"])
    return run, exported, runlog.load_checkpoint(run, "cpu")["model"]


def test_keep_last_keeps_the_newest_n_and_a_kept_one_resumes(kept):
    """--keep_last=2 over 4 checkpoints: ckpt_000003.pt and ckpt_000004.pt, each holding its own step, and ckpt.pt
    the newest. Resumed from the older kept one, the run's step 4 repeats the straight run's (to float32 rounding,
    see test_resume_reproduces_the_uninterrupted_run_exactly), and the same two stay."""
    run, _, _ = kept
    names = ["ckpt.pt", "ckpt_000003.pt", "ckpt_000004.pt"]
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == names
    assert [runlog.load_checkpoint(os.path.join(run, n), "cpu")["step"] for n in names] == [4, 3, 4]
    train.main([f"--resume={os.path.join(run, 'ckpt_000003.pt')}", "--export="])  # continues in the run folder
    logs, _ = read_metrics(run)
    assert [l["step"] for l in logs] == [1, 2, 3, 4, 4]                  # the straight run's, then the resumed step
    for k in logs[3]:
        if k.startswith("loss/") or k in ("grad_norm", "lr", "temp"):
            assert math.isclose(logs[3][k], logs[4][k], rel_tol=1e-5, abs_tol=1e-7), (k, logs[3][k], logs[4][k])
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == names


def test_export_holds_the_final_weights_exactly_and_rebuilds_the_model(kept):
    """--export=DIR: model.safetensors, read by pretrained's reader, is the final checkpoint's state dict byte for
    byte (every key, dtype and shape); config.json rebuilds the model that loads it strictly; tokenizer.json is
    the run's."""
    run, exported, state = kept
    assert sorted(os.listdir(exported)) == ["config.json", "model.safetensors", "tokenizer.json"]
    got = pretrained.read_safetensors(os.path.join(exported, "model.safetensors"))
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    config = json.load(open(os.path.join(exported, "config.json")))
    assert (config["format"], config["recipe"], config["step"]) == ("xfm-export", "xfm", 4)
    assert config["train_config"]["export"] == exported
    model = flava.build_model(flava.config_from_dict(config["model_config"]))
    model.load_state_dict(pretrained.read_export(exported)["model"])      # strict: every key, every shape
    assert open(os.path.join(exported, "tokenizer.json"), "rb").read() == \
        open(os.path.join(run, "tokenizer.json"), "rb").read()


def test_unknown_and_malformed_keys_are_rejected(capsys):
    with pytest.raises(SystemExit, match="did you mean --max_steps"):
        train.parse_args(["--max_step=3"])
    with pytest.raises(SystemExit, match="takes a int"):
        train.parse_args(["--max_steps=many"])
    with pytest.raises(SystemExit, match="true/false"):
        train.parse_args(["--stop_grad=maybe"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        train.parse_args(["max_steps=3"])
    cfg, given = train.parse_args(["--stop_grad=false", "--mim_target=pixel", "--lr=3e-4"])
    assert cfg.stop_grad is False and cfg.mim_target == "pixel" and cfg.lr == 3e-4 and set(given) == {"stop_grad", "mim_target", "lr"}
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in ("config", "recipe", "data_dir", "out_dir", "max_steps", "batch_size", "log_every", "ckpt_every",
              "seed", "resume", "amp", "compile", "stop_grad", "mim_target", "strict"):
        assert f"--{f}=" in out, f


def test_param_groups_partition_and_lr_mult():
    model = XFM(tiny_config())
    groups = train.param_groups(model, 0.01, 2.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.temp)]["lr_scale"] == 2.0 and by_id[id(model.temp)]["weight_decay"] == 0.0
    assert by_id[id(model.itm_head[0].weight)]["lr_scale"] == 2.0
    assert by_id[id(model.fusion.blocks[0].mlp.fc1.weight)]["lr_scale"] == 1.0  # fusion trains at the base lr
    assert by_id[id(model.fusion.blocks[0].mlp.fc1.weight)]["weight_decay"] == 0.01
    assert by_id[id(model.vision.cls_token)]["weight_decay"] == 0.0
    assert by_id[id(model.vision.blocks[0].norm1.bias)]["weight_decay"] == 0.0
    new = {"text_proj", "vision_proj", "temp", "itm_head", "bbox_head"}  # the official lr_mult 2 set
    for name, p in model.named_parameters():
        assert by_id[id(p)]["lr_scale"] == (2.0 if name.split(".")[0] in new else 1.0), name


def test_optimizer_step_clips_to_the_given_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])                             # norm 5
    norm = runtime.optimizer_step(opt, None, [p], 1.0)
    assert math.isclose(norm.item(), 5.0)                                   # the norm before clipping
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))  # the step of a norm-1 gradient
    assert p.grad is None


def test_three_updates_in_order_each_clipped(toy, tmp_path, monkeypatch):
    """One step is three optimizer updates in the official order (text | regions + images | pairs), each
    clipped at --grad_clip."""
    kinds, clips = [], []
    real_losses, real_step = train.xfm_losses, runtime.optimizer_step

    def losses(model, batch, **kw):
        kinds.append(sorted(batch))
        return real_losses(model, batch, **kw)

    def step(optimizer, scaler, params, clip):
        clips.append(clip)
        return real_step(optimizer, scaler, params, clip)

    monkeypatch.setattr(train, "xfm_losses", losses)
    monkeypatch.setattr(runtime, "optimizer_step", step)
    train.main([f"--data_dir={toy}", f"--out_dir={tmp_path / 'run'}", *FAST, "--max_steps=2", "--grad_clip=0.25"])
    assert kinds == [["text"], ["image", "region"], ["pair"]] * 2
    assert clips == [0.25] * 6


def test_lr_schedule_warmup_then_linear_decay():
    lrs = [train.get_lr(s, lr=1.0, warmup_steps=4, max_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == 0.5 and lrs[11] == 0.125


def test_bad_input_is_skipped_counted_and_reported(toy, tmp_path):
    import shutil
    d = tmp_path / "data"
    shutil.copytree(toy, d)
    with open(d / "pairs.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"image": "img/missing.png", "caption": "a red circle"}) + "\n")
        f.write(json.dumps({"image": "img/" + sorted(os.listdir(d / "img"))[0], "caption": ""}) + "\n")
    out = str(tmp_path / "run")
    train.main([f"--data_dir={d}", f"--out_dir={out}", *FAST, "--max_steps=1"])
    _, final = read_metrics(out)
    counts = final[0]["bad_input"]
    assert sum(counts.values()) >= 3, counts
    with pytest.raises(SystemExit, match=r"^error: \S*/pairs.jsonl:65: malformed JSON "
                                         r"\(.*\) \(--strict: every bad record stops the run\)$"):  # one line
        train.main([f"--data_dir={d}", f"--out_dir={out}2", *FAST, "--max_steps=1", "--strict=true"])


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_non_finite_losses_skip_then_stop_with_a_checkpoint(toy, tmp_path, monkeypatch, path):
    """Skipped on the host (the reference path) or on the device (the fast path: fused AdamW's found_inf, the
    counts read at the log steps), the same run: step 1's three updates are skipped, the run stops after it with
    the weights of step 0 in its checkpoint."""
    owner = train if path == "reference" else train.fast_losses
    real = owner.xfm_losses
    calls = {"n": 0}

    def flaky(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] >= 4:  # from the 4th update on, every loss is NaN
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(owner, "xfm_losses", flaky)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="3 non-finite updates in a row by step 2"):
        train.main([f"--data_dir={toy}", f"--out_dir={out}", *FAST, "--max_steps=10", "--max_bad_steps=3",
                    f"--losses={path}", "--ckpt_every=1", "--keep_last=2"])
    ckpt, after_step_0 = (runlog.load_checkpoint(os.path.join(out, f), "cpu") for f in ("ckpt.pt", "ckpt_000001.pt"))
    assert ckpt["step"] == 2  # three updates of step 0 were good; step 1's updates were skipped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.equal(v, after_step_0["model"][k]) for k, v in ckpt["model"].items())


# ---------------------------------------------------------------------------------------------------------
# 2-process gloo DDP with gradient accumulation == one process on the full batch


def _full_batch():
    cfg = tiny_config()
    b = make_batch(cfg, kinds=("text", "image", "pair"), B=8, seed=3)
    # equal masked-token counts per sample, so the mean over a micro-batch weighs every token alike
    for kind, lab, ids in (("text", "labels", "ids"), ("pair", "mlm_labels", "mlm_ids")):
        labels = torch.full_like(b[kind][lab], -100)
        labels[:, 1:3] = 7
        b[kind][lab] = labels
    b["pair"]["att"][:] = 1
    return cfg, b


def _rows(batch, rows):
    return {k: {n: t[rows] for n, t in v.items()} for k, v in batch.items()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, meet, out_dir):
    with gloo_group(rank, world, meet):
        torch.manual_seed(0)
        cfg, full = _full_batch()
        model = XFM(cfg)
        # train.py's wrapper; its buffers never change, so no forward broadcasts them (counted)
        ddp = runtime.distribute(train.LossModel(model, True), model, True, False, torch.device("cpu"), True)
        broadcasts = []
        sync = ddp._distributed_broadcast_coalesced
        ddp._distributed_broadcast_coalesced = lambda *a, **k: broadcasts.append(1) or sync(*a, **k)
        # global batch 8 = 2 ranks x 2 micro-steps x 2; ITM is left out (its hard negatives are sampled per
        # micro-batch, so they differ by design) and ITC is checked without accumulation in test_losses.py
        mine = [_rows(full, slice(4 * rank + 2 * i, 4 * rank + 2 * i + 2)) for i in range(2)]
        for b in mine:
            b.pop("pair")
        train.forward_backward(ddp, iter(mine), 2, True, train.nullcontext, None)
        assert not broadcasts, "a forward broadcast the buffers, which never change"
        if rank == 0:
            torch.save(_grads(model), os.path.join(out_dir, "ddp_grads.pt"))


def test_ddp_with_accumulation_equals_one_process_full_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, rendezvous(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp_grads.pt")
    torch.manual_seed(0)
    cfg, full = _full_batch()
    full.pop("pair")
    model = XFM(cfg)
    train.forward_backward(train.LossModel(model, True), iter([full]), 1, False, train.nullcontext, None)
    ref = _grads(model)
    assert set(got) == set(ref) and len(ref) > 20
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=2e-5, rtol=1e-4), n


def _ddp_pair_worker(rank, world, meet, out_dir):
    """Pairs without accumulation: ITC is global, so 2 ranks x 4 equal 1 x 8 (ITM switched off: sampled)."""
    with gloo_group(rank, world, meet):
        torch.manual_seed(0)
        cfg, full = _full_batch()
        model = XFM(cfg)
        lm = _NoITM(model)
        ddp = torch.nn.parallel.DistributedDataParallel(lm, find_unused_parameters=True)
        train.forward_backward(ddp, iter([_rows({"pair": full["pair"]}, slice(4 * rank, 4 * rank + 4))]), 1, True,
                               train.nullcontext, None)
        if rank == 0:
            torch.save(_grads(model), os.path.join(out_dir, "pair_grads.pt"))


class _NoITM(train.LossModel):
    def __init__(self, model):
        super().__init__(model, True)

    def forward(self, batch):
        losses, stats = super().forward(batch)
        losses.pop("itm")
        return losses, stats


def test_ddp_pairs_with_global_itc_equal_one_process(tmp_path):
    mp.spawn(_ddp_pair_worker, args=(2, rendezvous(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "pair_grads.pt")
    torch.manual_seed(0)
    cfg, full = _full_batch()
    model = XFM(cfg)
    train.forward_backward(_NoITM(model), iter([{"pair": full["pair"]}]), 1, False, train.nullcontext, None)
    ref = _grads(model)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=2e-5, rtol=1e-4), n


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(recipe):
    """runtime.checkpoint_blocks (--grad_ckpt): the blocks recompute their forward in the backward pass (a hook
    inside a block fires more often), with dropout and drop path on, and losses and gradients equal the plain
    run: the recomputation replays the same random draws."""
    import flava
    from lib import runtime
    if recipe == "flava":
        cfg = flava.make_flava_config("tiny", vocab_size=64, dropout=0.1)
        batch = make_batch(cfg, kinds=("text", "image", "pair"), seed=1)
        batch["pair"]["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1])
    else:
        cfg = tiny_config(dropout=0.1, drop_path=0.2)
        batch = make_batch(cfg, seed=1)

    def run(checkpointed):
        torch.manual_seed(0)
        model = flava.build_model(cfg).train()
        if checkpointed:
            runtime.checkpoint_blocks(model)
        calls = []
        for block in runtime.encoder_blocks(model):
            block.mlp.fc1.register_forward_hook(lambda *args: calls.append(1))
        torch.manual_seed(1)                                               # the same dropout / drop-path draws
        losses, _ = train.LossModel(model, True, recipe)(batch)
        sum(losses.values()).backward()
        return losses, _grads(model), len(calls)

    (plain_losses, plain_grads, plain_calls), (losses, grads, calls) = run(False), run(True)
    assert calls > plain_calls, "the checkpointed blocks must run their forward again in the backward pass"
    for name in plain_losses:
        assert torch.allclose(plain_losses[name], losses[name], rtol=1e-6, atol=1e-7), name
    assert plain_grads.keys() == grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], grads[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_compiled_step_never_breaks_the_graph_nor_recompiles(toy, tmp_path, monkeypatch, recipe):
    """--compile compiles each kind of Transformer block once (runtime.compile_blocks): over 50 steps, torch's own
    counters see no graph break, and no update compiles anything once an update of its kind (X-FM: text |
    regions + images | pairs; FLAVA: pair, image and text updates) has run: fixed shapes (texts padded to fixed
    lengths, fixed caption slots per region image), the drop-path rate a tensor. The "eager" backend traces
    exactly as inductor does, without generating code."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    updates, forward_backward = [], train.forward_backward

    def counted(loss_model, micro_batches, *args):                       # (kinds, frames compiled in the update)
        batches = list(micro_batches)
        before = counters["frames"]["total"]
        out = forward_backward(loss_model, iter(batches), *args)
        updates.append((tuple(sorted(batches[0])), counters["frames"]["total"] - before))
        return out
    monkeypatch.setattr(train, "forward_backward", counted)
    torch._dynamo.reset()
    counters.clear()
    train.main([f"--data_dir={toy}", f"--out_dir={tmp_path / 'run'}", *FAST, "--max_steps=50", "--batch_size=4", "--caption_len=40",
                "--log_every=25", "--compile", f"--recipe={recipe}"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(updates) >= 50 and updates[0][1] > 0
    assert not [(i, kinds, n) for i, (kinds, n) in enumerate(updates) if n and kinds in {k for k, _ in updates[:i]}]
    torch._dynamo.reset()


def test_cuda_runs_stream_uint8_images_and_four_workers(toy, monkeypatch):
    """shards.run_streams for a CUDA run: pinned batches of uint8 images (normalised on the GPU) from 4 workers per
    rank (--num_workers=-1, the default); 0 workers and float images on the CPU."""
    from lib import shards, tokenizer
    got = {}
    def build(data_dir, tok, dc, per_rank, bad, rank, world, workers, pin_memory, buffer):
        got.update(uint8=dc.uint8_images, workers=workers, pin=pin_memory)
        return {"pair": None}
    monkeypatch.setattr(shards, "build_streams", build)
    cfg, tok = train.TrainConfig(data_dir=toy), tokenizer.get_tokenizer(toy, toy, 300, None)
    for device, want in (("cuda", dict(uint8=True, workers=4, pin=True)),
                         ("cpu", dict(uint8=False, workers=0, pin=False))):
        shards.run_streams(cfg, tok, make_config("tiny"), {"pair": 2}, None, 0, 1, torch.device(device))
        assert got == want, device
