"""train.py --fsdp (runtime.shard: PyTorch's FSDP2) in 2 gloo processes on the CPU. The same runs with DDP and with
FSDP must give the same losses and final parameters (X-FM with both schedules, --grad_ckpt, and FLAVA); a run
stopped halfway and resumed must equal the straight run (parameters and AdamW state); its checkpoint must be a
DDP run's (a plain model loads it), as must its export (--export); and gradient accumulation under FSDP must
equal one big micro-batch.

The runs the selected tests need share one pair of spawned processes (starting them costs seconds); train.main
runs inside a gloo group whose 60 s timeout turns a hang (ranks waiting in different collectives) into a failure."""
import json
import os
import re

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import flava
from lib import runlog
from lib import pretrained
from lib import runtime
from lib import tokenizer
from lib import toyworld
import train
from conftest import gloo_group, make_batch, rendezvous, tiny_config
from model import XFM

STEPS = ["--max_steps=4", "--log_every=1", "--warmup_steps=1", "--batch_size=8", "--vocab_size=300", "--eval_k=4",
         "--caption_len=24", "--text_len=32", "--grad_clip=0.5"]      # (0.5: the clipping is active at every update)
RUNS = {  # name: the arguments after --data_dir and --out_dir, run in this order
    "xfm_ddp": [],
    "xfm_fsdp": ["--fsdp"],
    "xfm_fsdp_half": ["--fsdp", "--stop_at=2"],                        # then resumed: see _worker
    "summed_ddp": ["--schedule=summed"],
    "summed_fsdp": ["--schedule=summed", "--fsdp", "--grad_ckpt=true"],
    "flava_ddp": ["--recipe=flava"],
    "flava_fsdp": ["--recipe=flava", "--fsdp", "--image_tokenizer={root}/flava_ddp/image_tokenizer.pt",
                   "--export={root}/flava_fsdp_export"],
    # the fast path: DDP is runtime.PerUpdateDDP
    "fast_ddp": ["--losses=fast", "--micro_batch_size=2"],             # (accumulating)
    "fast_fsdp": ["--losses=fast", "--micro_batch_size=2", "--fsdp"],
    "flava_fast_ddp": ["--recipe=flava", "--losses=fast"],
    "flava_fast_fsdp": ["--recipe=flava", "--losses=fast", "--fsdp",
                        "--image_tokenizer={root}/flava_fast_ddp/image_tokenizer.pt"],
}


def needs(test):
    """The runs a test of this module reads ("accumulation": _accumulation's gradients). The fixture makes only
    the runs of the tests pytest selected, so one test (`pytest -k`, or a planted bug's test) pays for its own."""
    recipe = test.callspec.params.get("recipe") if hasattr(test, "callspec") else None
    return {"test_fsdp_run_equals_the_ddp_run": [f"{recipe}_ddp", f"{recipe}_fsdp"],
            "test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one": ["xfm_ddp", "xfm_fsdp", "xfm_fsdp_half"],
            "test_fsdp_export_is_the_whole_model": ["flava_fsdp"],
            "test_fsdp_accumulation_equals_one_big_micro_batch": ["accumulation"],
            "test_fast_path_ddp_run_equals_the_fsdp_run": [f"{recipe}_ddp", f"{recipe}_fsdp"],
            "test_ddp_on_the_fast_path_reduces_what_each_update_reached": ["fast_ddp"]}.get(test.originalname, [])


def _worker(rank, meet, toy, root, wanted):
    with gloo_group(rank, 2, meet, timeout_s=60):
        # train.main as under `torchrun --nproc_per_node=2`, in the group the test made
        runtime.setup_distributed = lambda name: (True, rank, rank, 2, torch.device("cpu"))
        runtime.teardown = lambda: None
        tok = ["--tokenizer=" + os.path.join(toy, "tokenizer.json")]
        made, reductions = _watch_per_update_ddp()
        for name, args in RUNS.items():
            if name in wanted:
                train.main([f"--data_dir={toy}", f"--out_dir={root}/{name}", *STEPS, *tok,
                            *[a.format(root=root) for a in args]])
            if name == "xfm_fsdp_half" and name in wanted:
                train.main([f"--resume={root}/xfm_fsdp_half", "--stop_at=0"])   # steps 3-4 of the stopped run
            if name == "fast_ddp" and name in wanted and rank == 0:
                _save_per_update(made[-1], reductions, os.path.join(root, "per_update.json"))
        if "accumulation" in wanted:
            _accumulation(rank, root)


def _watch_per_update_ddp():
    """-> (each runtime.PerUpdateDDP made: what each kind of update reduces; the reductions: for every bucket a DDP
    of the last one reduces, the micro-step's sync flag, and "first:" and the kinds for each first update's own)."""
    made, reductions, per_update = [], [], runtime.PerUpdateDDP

    def made_one(*args):
        wrapper = per_update(*args)
        first = wrapper.reduce_reached
        wrapper.reduce_reached = lambda: reductions.append("first:" + "+".join(wrapper.kinds)) or first()
        made.append(wrapper)
        return wrapper
    runtime.PerUpdateDDP = made_one
    ddp_class = torch.nn.parallel.DistributedDataParallel

    def watched_ddp(*args, **kwargs):
        ddp = ddp_class(*args, **kwargs)
        if made:
            ddp.register_comm_hook(None, lambda state, bucket: reductions.append(made[-1].sync) or
                                   allreduce_hook(None, bucket))
        return ddp
    torch.nn.parallel.DistributedDataParallel = watched_ddp
    return made, reductions


def _save_per_update(wrapper, reductions, path):
    every = [n for n, p in wrapper.module.named_parameters() if p.requires_grad]
    reduced = {"+".join(k): sorted(set(every) - set(ddp.parameters_to_ignore)) for k, ddp in wrapper.lean.items()}
    reached = {"+".join(k): sorted(v) for k, v in wrapper.reached.items()}
    with open(path, "w") as f:
        json.dump({"every": every, "reduced": reduced, "reached": reached, "reductions": reductions}, f)


@pytest.fixture(scope="module")
def runs(request, toy, tmp_path_factory):
    """The runs (of RUNS, and the accumulation check) that this module's selected tests need, in one spawn of 2
    processes -> the folder holding a folder per run (and per_update.json: what PerUpdateDDP reduced)."""
    wanted = {n for test in request.session.items if test.module is request.module for n in needs(test)}
    for name, args in reversed(RUNS.items()):       # a run reading another's files needs that one first
        if name in wanted:
            wanted |= set(re.findall(r"\{root\}/(\w+)/", " ".join(args)))
    root = str(tmp_path_factory.mktemp("runs"))
    mp.spawn(_worker, args=(rendezvous(), toy, root, wanted), nprocs=2, join=True)
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    toy = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(toy, seed=0, n_pairs=48, n_regions=24, n_text=48, n_images=24, n_test=8, n_down=4,
                      progress=False)
    tokenizer.get_tokenizer(toy, toy, 300, None).save(os.path.join(toy, "tokenizer.json"))
    return toy


def logs(run):
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [r for r in lines if not r.get("final")], [r for r in lines if r.get("final")]


def assert_same_run(a, b, param_atol):
    """Two run folders: the same logged losses, gradient norms and temperatures at every step (1e-5 relative), the
    end-of-run evaluation, and final parameters within param_atol."""
    (la, fa), (lb, fb) = logs(a), logs(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        keys = {k for k in ra if k.startswith("loss/") or k in ("grad_norm", "temp")}
        assert keys == {k for k in rb if k.startswith("loss/") or k in ("grad_norm", "temp")} and len(keys) > 4
        for k in keys:
            assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert "retrieval" in fa[-1] and "retrieval" in fb[-1]                 # (a resumed run has two final lines)
    ma, mb = (runlog.load_checkpoint(run, "cpu")["model"] for run in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k].shape == mb[k].shape and torch.allclose(ma[k], mb[k], rtol=0, atol=param_atol), k


@pytest.mark.parametrize("recipe", ["xfm", "summed", "flava"])
def test_fsdp_run_equals_the_ddp_run(runs, recipe):
    """Same init, same data, 2 processes: --fsdp trains exactly as DDP (losses at every step, clipped gradient
    norms, temperature, final parameters), for X-FM's three updates, its summed schedule (with --grad_ckpt on the
    FSDP side) and FLAVA. The gradients are bit for bit DDP's; clip_grad_norm_ sums the squares of each rank's
    slices in another order, so the clipping factor differs in the last bit (1e-7 relative), and AdamW's
    normalised steps carry that to at most about 1.5e-5 in a parameter after the 12 updates here (one update
    moves a parameter by up to lr = 1e-3). Without clipping, one update is bit for bit DDP's."""
    assert_same_run(os.path.join(runs, f"{recipe}_ddp"), os.path.join(runs, f"{recipe}_fsdp"), param_atol=5e-5)


def test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one(runs):
    """4 steps straight == 2 steps, stop, resume, 2 steps (losses, parameters, AdamW state), and the FSDP
    checkpoint has the DDP run's format: a plain single-process model and optimizer load it."""
    straight, resumed, ddp = (os.path.join(runs, n) for n in ("xfm_fsdp", "xfm_fsdp_half", "xfm_ddp"))
    assert_same_run(straight, resumed, param_atol=1e-7)
    a, b, d = (runlog.load_checkpoint(run, "cpu") for run in (straight, resumed, ddp))
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2                 # each rank's random state
    for k, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.allclose(v, b["optimizer"]["state"][k][name], rtol=1e-5, atol=1e-7), (k, name)
    # the format of the DDP run's checkpoint: the same keys, shapes, optimizer keys and groups
    assert a["model"].keys() == d["model"].keys()
    assert all(a["model"][k].shape == d["model"][k].shape for k in d["model"])
    assert a["optimizer"]["param_groups"] == d["optimizer"]["param_groups"]
    assert {k: {n: v.shape for n, v in s.items()} for k, s in a["optimizer"]["state"].items()} == \
           {k: {n: v.shape for n, v in s.items()} for k, s in d["optimizer"]["state"].items()}
    model = flava.build_model(flava.config_from_dict(a["model_config"]))
    model.load_state_dict(a["model"])                                          # strict
    cfg = train.TrainConfig(**a["train_config"])
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg.weight_decay, cfg.lr_mult))
    optimizer.load_state_dict(a["optimizer"])
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())


def test_fsdp_export_is_the_whole_model(runs):
    """--export under --fsdp: rank 0 writes the whole model gathered from the ranks' slices, the final
    checkpoint's state dict byte for byte (FLAVA's logit scale 0-dim again, its codebook buffer too)."""
    state = runlog.load_checkpoint(os.path.join(runs, "flava_fsdp"), "cpu")["model"]
    got = pretrained.read_export(os.path.join(runs, "flava_fsdp_export"))["model"]
    assert sorted(got) == sorted(state) and got["logit_scale"].shape == () and "image_tokenizer.codebook" in got
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation under FSDP: 2 ranks x 2 micro-steps of 2 == 2 ranks x 1 micro-step of 4


def _batch(rows):
    """Rows of one fixed text + image batch (equal masked-token counts per sample, so the mean over a micro-batch
    weighs every token alike, as in test_train.py's DDP accumulation test)."""
    b = make_batch(tiny_config(), kinds=("text", "image"), B=8, seed=3)
    labels = torch.full_like(b["text"]["labels"], -100)
    labels[:, 1:3] = 7
    b["text"]["labels"] = labels
    return {k: {n: t[rows] for n, t in v.items()} for k, v in b.items()}


def _accumulation(rank, root):
    grads = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        model = XFM(tiny_config())
        loss_model = runtime.shard(train.LossModel(model, True), model)
        mine = [_batch(slice(4 * rank + i * 4 // accum, 4 * rank + (i + 1) * 4 // accum)) for i in range(accum)]
        train.forward_backward(loss_model, iter(mine), accum, True, train.nullcontext, None)
        grads[accum] = {n: runtime.full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    # bf16 autocast: bf16 parameters gathered (seen inside a block's forward), fp32 gradients and slices
    torch.manual_seed(0)
    model = XFM(tiny_config())
    loss_model = runtime.shard(train.LossModel(model, True), model, param_dtype=torch.bfloat16)
    block = runtime.encoder_blocks(model)[0]
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(next(module.parameters()).dtype))
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)                   # noqa: E731
    train.forward_backward(loss_model, iter([_batch(slice(4 * rank, 4 * rank + 4))]), 1, True, bf16, None)
    grads["bf16"] = {n: runtime.full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    grads["bf16_seen"] = seen
    grads["bf16_slices"] = {p.to_local().dtype for p in model.parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(root, "accumulation.pt"))


def test_fsdp_accumulation_equals_one_big_micro_batch(runs):
    """The gradients (gathered from the shards) of 2 micro-steps of 2 samples per rank, synchronised on the last
    one only, equal those of 1 micro-step of 4; and both equal one process on the whole batch of 8."""
    grads = torch.load(os.path.join(runs, "accumulation.pt"))
    torch.manual_seed(0)
    model = XFM(tiny_config())
    train.forward_backward(train.LossModel(model, True), iter([_batch(slice(0, 8))]), 1, False, train.nullcontext, None)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[2].keys() == ref.keys() and len(ref) > 20
    for n in ref:
        assert torch.allclose(grads[2][n], grads[1][n], rtol=1e-4, atol=2e-6), n
        assert torch.allclose(grads[2][n].reshape(ref[n].shape), ref[n], rtol=1e-4, atol=2e-5), n
    # --fsdp under bf16: the block computed with bf16 parameters, the gradients and the slices stay fp32, and
    # the gradient is the fp32 one to bf16's precision
    assert set(grads["bf16_seen"]) == {torch.bfloat16} and grads["bf16_slices"] == {torch.float32}
    for n in ref:
        g = grads["bf16"][n].reshape(ref[n].shape)
        assert g.dtype == torch.float32 and (g - ref[n]).norm() <= 0.05 * ref[n].norm() + 1e-6, n


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_fsdp_takes_bf16_parameters_under_bf16_autocast(amp, dtype, monkeypatch):
    """runtime.wrap hands FSDP the bf16 policy under --amp=bf16 (and none in fp32)."""
    got = []
    monkeypatch.setattr(runtime, "distribute", lambda *args: got.append(args[-1]))
    model = XFM(tiny_config())
    runtime.wrap(train.LossModel(model, True), model, train.TrainConfig(fsdp=True, amp=amp), True,
                 torch.device("cpu"), True)
    assert got == [dtype]


@pytest.mark.parametrize("recipe", ["fast", "flava_fast"])
def test_fast_path_ddp_run_equals_the_fsdp_run(runs, recipe):
    """The fast path under torchrun (runtime.PerUpdateDDP, X-FM with 2 micro-batches per update, and FLAVA, whose
    kinds of update come in a drawn order) trains as FSDP does: test_fsdp_run_equals_the_ddp_run's check."""
    assert_same_run(os.path.join(runs, f"{recipe}_ddp"), os.path.join(runs, f"{recipe}_fsdp"),
                    param_atol=5e-5)


def test_ddp_on_the_fast_path_reduces_what_each_update_reached(runs):
    """runtime.PerUpdateDDP (the fast path under torchrun): each of X-FM's three updates reduces exactly the
    parameters its first backward reached, no DDP looks for unused ones, and the run equals FSDP's (above). The text
    update reaches no vision, fusion or box parameter; the region-and-image update none of the text MLM head."""
    got = json.load(open(os.path.join(runs, "per_update.json")))
    assert set(got["reduced"]) == {"text", "image+region", "pair"}
    assert got["reduced"] == got["reached"]
    text, region = set(got["reduced"]["text"]), set(got["reduced"]["image+region"])
    assert text and not any(n.startswith(("model.vision.", "model.fusion.", "model.bbox")) for n in text)
    assert len(text) < len(got["every"]) and len(region) < len(got["every"])
    assert not any(n.startswith("model.text_mlm.") for n in region)
    # with 2 micro-batches per update: each kind's first update reduces once, at the end of its last micro-batch's
    # backward, then its DDP reduces in the last micro-batch's backward alone
    syncs = [r for r in got["reductions"] if r in (True, False)]
    assert got["reductions"][:3] == ["first:text", "first:image+region", "first:pair"]
    assert len(got["reductions"]) == 3 + len(syncs) and syncs and all(syncs)
