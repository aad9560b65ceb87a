"""FLAVA (flava.py): which encoders each loss reaches, the fused sequence's layout and padding mask, the MMM
slices, ITM label polarity, the global contrastive loss with ITM negatives as keys only (1 vs 2 processes), the
frozen image tokenizer, the data-kind sampling ratios, and train.py / finetune.py end to end."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import data
from lib import tokenizer
from lib import formats
import losses
import finetune
import flava
import train
from conftest import gloo_group, rendezvous, make_batch
from losses import itc_loss
from lib import toyworld


def tiny_flava(**kw):
    kw.setdefault("vocab_size", 64)
    kw.setdefault("codebook_size", 16)
    return flava.make_flava_config("tiny", **kw)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = flava.FLAVA(tiny_flava())
    m.image_tokenizer.codebook.normal_()  # a codebook that gives varied ids on random images
    return m


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def reaches(grads, prefix):
    """True if some parameter under `prefix` got a non-zero gradient."""
    gs = [g for n, g in grads.items() if n.startswith(prefix) and g is not None]
    return any(g.abs().sum() > 0 for g in gs)


# ---------------------------------------------------------------------------------------------------------
# Gradient flow: FLAVA has no stop-gradient; each loss reaches exactly the parts of docs/METHOD.md §8.3's table


def test_each_loss_reaches_exactly_its_encoders(model):
    batch = make_batch(model.cfg, kinds=("text", "image", "pair"), B=8)
    expected = {  # loss -> (text, image, fusion) reached
        "mlm": (True, False, False), "mim": (False, True, False), "gc": (True, True, False),
        "itm": (True, True, True), "mmm_image": (True, True, True), "mmm_text": (True, True, True)}
    for name, (t, v, f) in expected.items():
        torch.manual_seed(1)
        out = flava.flava_losses(model, batch)
        g = grads_of(model, out[name])
        assert (reaches(g, "text."), reaches(g, "vision."), reaches(g, "fusion.")) == (t, v, f), name
    # the heads: each loss trains its own, and only its own
    torch.manual_seed(1)
    out = flava.flava_losses(model, batch)
    owner = {"mlm": "mlm_head.", "mim": "mim_head.", "mmm_text": "mmm_text_head.", "mmm_image": "mmm_image_head.",
             "itm": "itm_head.", "gc": "logit_scale"}
    for name, head in owner.items():
        torch.manual_seed(1)
        out = flava.flava_losses(model, batch)
        g = grads_of(model, out[name])
        for other in set(owner.values()) - {head}:
            assert not reaches(g, other), (name, other)
        assert reaches(g, head), name
    # MIM and MMM-image train the mask token; GC (unmasked passes) does not
    for name, hits in (("mim", True), ("mmm_image", True), ("gc", False)):
        torch.manual_seed(1)
        g = grads_of(model, flava.flava_losses(model, batch)[name])
        assert reaches(g, "vision.mask_token") == hits, name


def test_image_tokenizer_is_frozen(model):
    assert "image_tokenizer.codebook" not in dict(model.named_parameters())
    assert "image_tokenizer.codebook" in model.state_dict()                 # saved with the checkpoint
    before = model.image_tokenizer.codebook.clone()
    batch = make_batch(model.cfg, kinds=("image", "pair"), B=6)
    sum(flava.flava_losses(model, batch).values()).backward()
    assert torch.equal(before, model.image_tokenizer.codebook)
    groups = train.param_groups(model, 0.1, 1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_weight_decay_on_tokens_positions_logit_scale_norms_biases(model):
    decayed = {id(p) for g in train.param_groups(model, 0.1, 1.0) if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or name.endswith(("cls_token", "mask_token", "pos_embed", "logit_scale"))
        assert (id(p) not in decayed) == no_decay, name


# ---------------------------------------------------------------------------------------------------------
# The fused sequence: layout, padding mask, MMM slices


def test_fused_layout_is_cls_m_image_text(model):
    """With no fusion layers the output is LN([CLS_M; image_to_mm(v); text_to_mm(t)]): position 0 is CLS_M,
    1 CLS_I, 2..1+P the patches in order, 2+P.. the text."""
    m = flava.FLAVA(tiny_flava(fusion_layers=0))
    B, T, P, D = 2, 5, m.cfg.num_patches, m.cfg.width
    t, v = torch.randn(B, T, D), torch.randn(B, 1 + P, D)
    h = m.fuse(t, torch.ones(B, T, dtype=torch.long), v)
    assert h.shape == (B, 1 + 1 + P + T, D)
    norm = m.fusion.norm
    assert torch.allclose(h[:, 0], norm(m.fusion.cls_token.expand(B, 1, D))[:, 0], atol=1e-6)
    assert torch.allclose(h[:, 1:2 + P], norm(m.fusion.image_to_mm(v)), atol=1e-6)
    assert torch.allclose(h[:, 2 + P:], norm(m.fusion.text_to_mm(t)), atol=1e-6)


def test_text_padding_never_changes_the_other_fusion_outputs(model):
    """docs/METHOD.md §8.1: changing what sits at a pad position leaves every non-pad fusion output unchanged."""
    model.eval()
    B, T, P, D = 2, 7, model.cfg.num_patches, model.cfg.width
    att = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    t, v = torch.randn(B, T, D), torch.randn(B, 1 + P, D)
    h = model.fuse(t, att, v)
    t2 = t.clone()
    t2[1, 4:] = 100 * torch.randn(3, D)                                   # garbage at the pads of row 1
    h2 = model.fuse(t2, att, v)
    keep = torch.cat([torch.ones(B, 2 + P, dtype=torch.bool), att.bool()], 1)  # (B, 2+P+T) non-pad positions
    assert torch.allclose(h[keep], h2[keep], atol=1e-5)
    assert not torch.allclose(h[~keep], h2[~keep])                        # (the pads themselves do change)


def test_mmm_losses_read_the_right_slices(model):
    """Recompute MMM, ITM and GC by hand: image ids at positions 2..1+P for the masked patches of matched pairs,
    words at positions 2+P.. for the masked tokens of matched pairs, ITM from CLS_M, GC with matched pairs as
    the only queries."""
    b = make_batch(model.cfg, kinds=("pair",), B=8)["pair"]
    b["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])               # rows 1 and 4: swapped captions
    out = flava.flava_losses(model, {"pair": b})
    pos, P = b["itm_label"].bool(), model.cfg.num_patches
    h = model.fuse(model.encode_text(b["mlm_ids"], b["att"]), b["att"], model.encode_image(b["image"], b["mim_mask"]))
    codes = model.image_tokenizer(b["image"])
    sel = b["mim_mask"] & pos[:, None]                                     # (B, P)
    want_img = F.cross_entropy(model.mmm_image_head(h[:, 2:2 + P][sel]), codes[sel])
    sel_t = (b["mlm_labels"] != -100) & pos[:, None]
    want_txt = F.cross_entropy(model.mmm_text_head(h[:, 2 + P:][sel_t]), b["mlm_labels"][sel_t])
    assert torch.allclose(out["mmm_image"], want_img, atol=1e-5)
    assert torch.allclose(out["mmm_text"], want_txt, atol=1e-5)
    assert torch.allclose(out["itm"], F.cross_entropy(model.itm_head(h[:, 0]), b["itm_label"]), atol=1e-5)
    # GC on the unmasked pair: the swapped rows are keys but not queries
    f_t, f_v = model.itc_features(model.encode_text(b["ids"], b["att"]), model.encode_image(b["image"]))
    assert torch.allclose(out["gc"], itc_loss(f_v, f_t, model.temp, queries=pos), atol=1e-6)
    assert not torch.allclose(out["gc"], itc_loss(f_v, f_t, model.temp), atol=1e-4)
    # the swapped rows take no part in MMM: changing their masked words changes nothing there
    b2 = dict(b, mlm_labels=b["mlm_labels"].clone())
    b2["mlm_labels"][~pos] = -100
    assert torch.allclose(flava.flava_losses(model, {"pair": b2})["mmm_text"], out["mmm_text"], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# ITM: label 1 = match, 0 = a swapped caption from another image


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, seed=0, n_pairs=64, n_regions=8, n_text=64, n_images=32, n_test=16, n_down=16, progress=False)
    return d


def test_itm_negatives_swap_in_another_images_caption(toy, tmp_path):
    bad = formats.BadInput(verbose=False)
    tok = tokenizer.get_tokenizer(toy, str(tmp_path), 300)
    pairs = formats.parse_pairs(os.path.join(toy, "pairs.jsonl"), bad)
    own = lambda j: tok.encode(pairs[j]["caption"], 24)  # noqa: E731

    def dataset(prob):
        return data.PairDataset(pairs, tok, data.DataConfig(32, 8, 24, 24, 0, False, (1, 1), "flava", prob), bad)

    matched = [dataset(0.0)[(i, 0)] for i in range(20)]
    assert all(s["itm_label"] == 1 and s["ids"] == own(i) for i, s in enumerate(matched))
    swapped = [dataset(1.0)[(i, 0)] for i in range(20)]
    assert all(s["itm_label"] == 0 and s["ids"] != own(i) for i, s in enumerate(swapped))
    captions = {tuple(own(j)): pairs[j]["image"] for j in range(len(pairs))}
    assert all(captions[tuple(s["ids"])] != pairs[i]["image"] for i, s in enumerate(swapped))  # another image's
    some = [dataset(0.1)[(i, 0)]["itm_label"] for i in range(len(pairs))]
    assert 0 < some.count(0) < 0.3 * len(some)
    # four images with five captions each: a random pick shows the same image 1 time in 4 and must be redrawn
    caps = list(dict.fromkeys(p["caption"] for p in pairs))[:20]
    images = list(dict.fromkeys(p["image"] for p in pairs))[:4]
    few = [{**pairs[0], "image": images[n // 5], "caption": c} for n, c in enumerate(caps)]
    owner = {tuple(tok.encode(c, 24)): few[n]["image"] for n, c in enumerate(caps)}
    assert len(owner) == 20
    ds = data.PairDataset(few, tok, data.DataConfig(32, 8, 24, 24, 0, False, (1, 1), "flava", 1.0), bad)
    for i in range(20):
        s = ds[(i, 0)]
        assert s["itm_label"] == 0 and owner[tuple(s["ids"])] != few[i]["image"], i
    batch = dataset(0.5).collate([dataset(0.5)[(i, 0)] for i in range(8)])
    assert batch["itm_label"].dtype == torch.long and set(batch["itm_label"].tolist()) <= {0, 1}


def test_itm_loss_is_small_when_the_head_says_match_for_matches(model):
    """Polarity end to end: a head biased towards class 1 gives a small ITM loss on matched pairs, a large
    one on swapped pairs."""
    b = make_batch(model.cfg, kinds=("pair",), B=4)["pair"]
    with torch.no_grad():
        model.itm_head[2].bias.copy_(torch.tensor([-10.0, 10.0]))
    assert flava.flava_losses(model, {"pair": dict(b, itm_label=torch.ones(4, dtype=torch.long))})["itm"] < 1e-3
    assert flava.flava_losses(model, {"pair": dict(b, itm_label=torch.zeros(4, dtype=torch.long))})["itm"] > 5


# ---------------------------------------------------------------------------------------------------------
# GC: ITM negatives are keys but not queries; 2 processes == 1 process


def _gc_setup():
    torch.manual_seed(0)
    proj_v, proj_t = torch.nn.Linear(12, 8), torch.nn.Linear(12, 8)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    x_v, x_t = torch.randn(8, 12), torch.randn(8, 12)
    queries = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    return proj_v, proj_t, scale, x_v, x_t, queries


def _gc(proj_v, proj_t, scale, x_v, x_t, queries):
    f_v, f_t = F.normalize(proj_v(x_v), dim=-1), F.normalize(proj_t(x_t), dim=-1)
    loss = itc_loss(f_v, f_t, torch.exp(-scale), queries=queries)
    return loss.detach(), torch.autograd.grad(loss, [*proj_v.parameters(), *proj_t.parameters(), scale])


def test_gc_excludes_negatives_as_queries_but_keeps_them_as_keys():
    proj_v, proj_t, scale, x_v, x_t, q = _gc_setup()
    f_v, f_t = F.normalize(proj_v(x_v), dim=-1), F.normalize(proj_t(x_t), dim=-1)
    s = scale.exp()
    logits = s * f_v @ f_t.t()                                             # (8, 8) all keys
    y = torch.arange(8)
    want = 0.5 * (F.cross_entropy(logits[q], y[q]) + F.cross_entropy(logits.t()[q], y[q]))
    assert torch.allclose(_gc(proj_v, proj_t, scale, x_v, x_t, q)[0], want, atol=1e-6)
    dropped = 0.5 * (F.cross_entropy(logits[q][:, q], torch.arange(int(q.sum())))
                     + F.cross_entropy(logits.t()[q][:, q], torch.arange(int(q.sum()))))
    assert not torch.allclose(want, dropped)                              # the negatives' keys matter


def _gc_worker(rank, world, meet, out_dir):
    with gloo_group(rank, world, meet):
        proj_v, proj_t, scale, x_v, x_t, q = _gc_setup()
        rows = slice(4 * rank, 4 * rank + 4)                               # rank 0 has 1 negative, rank 1 has 1
        loss, grads = _gc(proj_v, proj_t, scale, x_v[rows], x_t[rows], q[rows])
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        if rank == 0:
            torch.save({"loss": loss / world, "grads": [g / world for g in grads]}, os.path.join(out_dir, "gc.pt"))


def test_gc_two_processes_equals_one_process(tmp_path):
    mp.spawn(_gc_worker, args=(2, rendezvous(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "gc.pt")
    loss, grads = _gc(*_gc_setup())
    assert torch.allclose(got["loss"], loss, atol=1e-6)
    for a, b in zip(got["grads"], grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_logit_scale_is_clamped_to_0_ln100(model):
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    flava.flava_losses(model, make_batch(model.cfg, kinds=("pair",), B=4))
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)
    assert math.isclose(model.temp.item(), 0.01, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Image tokenizer, sampling, initial losses


def test_kmeans_codebook_recovers_clusters_and_tokenizes_patches():
    torch.manual_seed(0)
    p, k = 2, 4
    centres = torch.randn(k, 3 * p * p) * 5
    patches = centres.repeat(200, 1) + 0.01 * torch.randn(800, 3 * p * p)
    c = flava.fit_codebook(patches, k, seed=0)
    # every true centre has a centroid next to it
    assert torch.cdist(centres, c).min(1).values.max() < 0.1
    tok = flava.PatchTokenizer(k, p)
    tok.codebook.copy_(c)
    # an image whose first row of patches shows the centres in order: those patches get the centres' codes
    img = torch.zeros(1, 3, k * p, k * p)
    for i in range(k):  # a patch vector is laid out (row, col, channel), as losses.patchify reads it
        img[0, :, :p, i * p:(i + 1) * p] = centres[i].view(p, p, 3).permute(2, 0, 1)
    assert torch.equal(losses.patchify(img, p)[0, :k], centres)
    ids = tok(img)                                                         # (1, k*k)
    assert ids[0, :k].tolist() == torch.cdist(centres, c).argmin(1).tolist()


def test_sampling_ratios_over_many_draws_and_same_on_every_rank():
    ratios = {"pair": 0.70, "image": 0.15, "text": 0.15}
    draws = [flava.sample_kind(ratios, 0, step, u) for step in range(4000) for u in range(3)]
    for kind, p in ratios.items():
        assert abs(draws.count(kind) / len(draws) - p) < 0.015, kind
    # deterministic in (seed, step, update): every rank computes the same sequence, and a resume continues it
    assert draws == [flava.sample_kind(ratios, 0, step, u) for step in range(4000) for u in range(3)]
    assert draws != [flava.sample_kind(ratios, 1, step, u) for step in range(4000) for u in range(3)]
    assert flava.parse_ratios("0.7,0.15,0.15", {"pair", "text"}) == {"pair": 0.7, "text": 0.15}
    with pytest.raises(ValueError):
        flava.parse_ratios("0,1,1", {"pair", "image", "text"})


def test_initial_losses_are_near_chance():
    torch.manual_seed(0)
    cfg = tiny_flava(vocab_size=500, codebook_size=64)
    m = flava.FLAVA(cfg)
    m.image_tokenizer.codebook.normal_()
    out = flava.flava_losses(m, make_batch(cfg, kinds=("text", "image", "pair"), B=8))
    for name, chance in (("mlm", math.log(500)), ("mmm_text", math.log(500)), ("mim", math.log(64)),
                         ("mmm_image", math.log(64)), ("gc", math.log(8))):
        assert abs(out[name].item() - chance) < 0.35 * chance, (name, out[name].item(), chance)


# ---------------------------------------------------------------------------------------------------------
# End to end: train.py --recipe=flava, resume, finetune.py on its checkpoint


FAST = ["--recipe=flava", "--batch_size=8", "--log_every=1", "--warmup_steps=2", "--vocab_size=300",
        "--eval_k=4", "--caption_len=24", "--text_len=32", "--codebook_size=32"]


def test_flava_run_resume_and_finetune(toy, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main([f"--data_dir={toy}", f"--out_dir={a}", *FAST, "--max_steps=6"])
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["train"]["weight_decay"] == 0.1 and cfg["train"]["beta2"] == 0.999   # FLAVA's own defaults
    assert cfg["model"]["recipe"] == "flava" and os.path.exists(os.path.join(a, "image_tokenizer.pt"))
    logs = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
    seen = {k for l in logs for k in l if k.startswith("loss/")}
    assert {"loss/gc", "loss/itm", "loss/mmm_image", "loss/mmm_text"} <= seen
    assert logs[-1]["final"] and "retrieval" in logs[-1]
    # resume: the same kinds drawn and the same losses as the uninterrupted run
    train.main([f"--data_dir={toy}", f"--out_dir={b}", *FAST, "--max_steps=6", "--stop_at=3"])
    train.main([f"--resume={b}", "--stop_at=0"])
    la = [l for l in logs if not l.get("final")]
    lb = [json.loads(l) for l in open(os.path.join(b, "metrics.jsonl")) if '"final"' not in l]
    assert [l["step"] for l in lb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(la, lb):
        assert sorted(k for k in x if k.startswith("loss/")) == sorted(k for k in y if k.startswith("loss/"))
        for k in x:
            if k.startswith("loss/"):
                assert math.isclose(x[k], y[k], rel_tol=1e-5, abs_tol=1e-7), (x["step"], k)
    # X-FM-only options are refused, not ignored
    with pytest.raises(SystemExit, match="xfm recipe"):
        train.main([f"--data_dir={toy}", f"--out_dir={tmp_path / 'c'}", *FAST, "--stop_grad=false"])
    # finetune.py on the FLAVA checkpoint: a fusion task (CLS_M), retrieval (GC embeddings) and grounding (new head)
    ft = ["--init", os.path.join(a, "ckpt.pt"), f"--data_dir={toy}", "--epochs=1", "--batch_size=8"]
    for task in ("vqa", "retrieval", "grounding", "imgcls"):
        res = finetune.main(["--task", task, *ft, f"--out_dir={tmp_path / 'ft'}"])
        assert res["epochs"] == 1 and math.isfinite(res["value"]), task
    res = finetune.main(["--task", "attention", *ft, f"--out_dir={tmp_path / 'ft'}"])
    assert os.path.exists(tmp_path / "ft" / "attention" / "attention.png")
