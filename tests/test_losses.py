"""The objectives: gradient flow per loss (the proof that the method is X-FM), formulas against hand
computations, hard negatives, ITM's labels, IMLM's input, the box losses' degenerate guard, the temperature
clamp, and global ITC across 2 processes."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import gloo_group, rendezvous, make_batch, tiny_config
from lib import fast_losses as fast
from losses import (bbox_loss, box_xyxy, fusion_input, generalized_iou, itc_loss, mim_loss, sample_hard_negatives,
                    xfm_losses)
from model import XFM


def grad_norms(loss, modules):
    """Gradient norm that `loss` sends to each module's parameters (0.0 when nothing reaches them)."""
    out = {}
    for name, mod in modules.items():
        params = [p for p in mod.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(float(g.abs().sum()) for g in grads if g is not None)
    return out


def losses_and_parts(stop_grad, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = XFM(cfg)
    losses = xfm_losses(model, make_batch(cfg, seed=seed), stop_grad=stop_grad)
    parts = {"language": model.text, "vision": model.vision, "fusion": model.fusion}
    return model, losses, parts


def test_every_loss_is_present_and_finite():
    _, losses, _ = losses_and_parts(True)
    assert set(losses) == {"mlm", "itc", "itm", "imlm", "mim", "itc_region", "itm_region", "imlm_region",
                           "bbox_l1", "bbox_giou", "mim_image"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())


def test_gradient_flow_with_stop_gradient():
    """docs/METHOD.md §3: the language encoder learns only from MLM and ITC; the vision encoder from everything
    else that sees an image; MIM never reaches the language or fusion encoders."""
    _, losses, parts = losses_and_parts(stop_grad=True)
    g = {name: grad_norms(loss, parts) for name, loss in losses.items()}
    for name in ("mlm", "itc", "itc_region"):
        assert g[name]["language"] > 0, name
    for name in ("itm", "imlm", "itm_region", "imlm_region", "bbox_l1", "bbox_giou"):
        assert g[name]["language"] == 0.0, f"{name} leaked into the language encoder"
    for name in ("itc", "itm", "imlm", "mim", "itc_region", "itm_region", "imlm_region", "bbox_l1",
                 "bbox_giou", "mim_image"):
        assert g[name]["vision"] > 0, name
    for name in ("itm", "imlm", "itm_region", "imlm_region", "bbox_l1", "bbox_giou"):
        assert g[name]["fusion"] > 0, name
    for name in ("mim", "mim_image"):
        assert g[name]["language"] == 0.0 and g[name]["fusion"] == 0.0, name
    assert g["mlm"]["vision"] == 0.0 and g["mlm"]["fusion"] == 0.0
    assert g["itc"]["fusion"] == 0.0


def test_gradient_flow_without_stop_gradient():
    """The ablation (and fine-tuning): with the detach removed, ITM, IMLM and BBP reach the language encoder."""
    _, losses, parts = losses_and_parts(stop_grad=False)
    for name in ("itm", "imlm", "itm_region", "imlm_region", "bbox_l1", "bbox_giou"):
        assert grad_norms(losses[name], parts)["language"] > 0, name


def test_fusion_input_is_the_stop_gradient():
    """X-FM idea 1 in one function: the fusion encoder reads the language states' values; under the stop-gradient
    no gradient flows back through them, without it (the ablation, fine-tuning) every gradient does."""
    t = torch.randn(2, 3, 4, requires_grad=True)
    sg = fusion_input(t)
    assert torch.equal(sg, t) and not sg.requires_grad
    kept = fusion_input(t, stop_grad=False)
    (g,) = torch.autograd.grad((kept * 3).sum(), t)
    assert torch.equal(kept, t) and torch.equal(g, torch.full_like(t, 3.0))


def test_mim_target_carries_no_gradient():
    """The MIM gradient equals the one computed with a target made under no_grad: nothing flows through
    the unmasked branch, and no second copy (EMA) of the encoder exists."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg)
    b = make_batch(cfg, kinds=("image",))["image"]
    params = list(model.vision.parameters())
    loss = xfm_losses(model, {"image": b})["mim_image"]
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        target = model.encode_image(b["image"])
    loss2 = mim_loss(model.encode_image(b["image"], b["mim_mask"]), target, b["mim_mask"])
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    assert torch.allclose(loss, loss2)
    for a, c in zip(g1, g2):
        assert (a is None and c is None) or torch.allclose(a, c, atol=1e-6)
    # pair batches: the target is the same tensor that ITC uses, so it is made WITH grad, then detached
    with pytest.raises(AssertionError):
        mim_loss(target.requires_grad_(), target, b["mim_mask"])


def test_mim_loss_formula_and_unmasked_patches_do_not_count():
    torch.manual_seed(0)
    B, P, D = 3, 16, 8
    pred, target = torch.randn(B, 1 + P, D), torch.randn(B, 1 + P, D)
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, [0]] = True
    mask[2, [3, 4, 15]] = True
    # by hand: mean over the 6 masked patches of ||.||^2 / D, plus mean over images of slot 0's ||.||^2 / D
    sq = ((pred - target) ** 2).sum(-1) / D
    masked = [sq[0, 2], sq[0, 6], sq[1, 1], sq[2, 4], sq[2, 5], sq[2, 16]]
    expected = sum(masked) / 6 + sq[:, 0].mean()
    assert torch.allclose(mim_loss(pred, target, mask), expected)
    changed = pred.clone()
    changed[0, 1 + 0] += 10.0  # an unmasked patch
    assert torch.allclose(mim_loss(changed, target, mask), expected)


def test_itc_formula_symmetry_and_minimum():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(5, 16), dim=-1)
    temp = torch.tensor(0.1)
    s = f @ f.t() / temp
    y = torch.arange(5)
    by_hand = 0.5 * (F.cross_entropy(s, y) + F.cross_entropy(s.t(), y))
    assert torch.allclose(itc_loss(f, f, temp), by_hand)
    g = F.normalize(torch.randn(5, 16), dim=-1)
    assert torch.allclose(itc_loss(f, g, temp), itc_loss(g, f, temp))  # symmetric in image/text
    shuffled = itc_loss(f, f[torch.tensor([1, 0, 2, 3, 4])], temp)
    assert itc_loss(f, f, temp) < shuffled  # lowest when the diagonal pairs match


def test_itc_with_ids_makes_duplicates_positives():
    f = F.normalize(torch.randn(4, 8), dim=-1)
    v = f.clone()
    v[1] = v[0]  # images 0 and 1 are the same image
    ids = torch.tensor([0, 0, 1, 2])
    temp = torch.tensor(0.05)
    s = v @ f.t() / temp
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]])
    i2t = -(F.log_softmax(s, 1) * target).sum(1).mean()
    t2i = -(F.log_softmax(s.t(), 1) * target).sum(1).mean()
    assert torch.allclose(itc_loss(v, f, temp, ids), 0.5 * (i2t + t2i))


def test_hard_negatives_never_pick_the_positive_or_a_duplicate():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(6, 8), dim=-1)
    img_id = torch.tensor([0, 1, 1, 2, 3, 3])  # rows 1,2 and 4,5 share an image
    temp = torch.tensor(0.001)  # the positive dominates the softmax: a buggy sampler would pick it
    for _ in range(200):
        neg_txt, neg_img = sample_hard_negatives(f, f, temp, img_id)
        assert (img_id[neg_txt] != img_id).all() and (img_id[neg_img] != img_id).all()
    # batch size 1, or a batch that is all one image: no valid negative, -1 (no crash)
    assert all((x == -1).all() for x in sample_hard_negatives(f[:1], f[:1], temp, img_id[:1]))
    assert all((x == -1).all() for x in sample_hard_negatives(f[1:3], f[1:3], temp, img_id[1:3]))


def test_fast_hard_negatives_skip_empty_slots_and_flag_rows_without_one():
    """lib/fast_losses.py: an empty slot (filled False) is never a negative and gets none (has False); a row with no
    candidate gets has False."""
    torch.manual_seed(0)
    f = F.normalize(torch.randn(6, 8), dim=-1)
    img_id = torch.tensor([0, 1, 1, 2, 3, 3])
    filled = torch.tensor([True, True, True, True, True, False])
    for _ in range(50):
        neg_txt, neg_img, has_neg_txt, has_neg_img = fast.sample_hard_negatives(f, f, torch.tensor(1.0), img_id, filled)
        assert (img_id[neg_txt] != img_id)[filled].all() and (img_id[neg_img] != img_id)[filled].all()
        assert (neg_txt[filled] != 5).all() and (neg_img[filled] != 5).all()
        assert has_neg_txt.tolist() == has_neg_img.tolist() == filled.tolist()
    assert not any(x.any() for x in fast.sample_hard_negatives(f[1:3], f[1:3], torch.tensor(1.0), img_id[1:3])[2:])


def test_fast_draw_is_torch_multinomial_on_the_same_random_stream():
    """fast_losses.one_per_row(w) picks what torch.multinomial(w, 1) picks from the same generator state (both
    are the exponential race), so the fast path's hard negatives are the reference's draw, without a host sync."""
    w = torch.rand(7, 9).masked_fill(torch.eye(7, 9, dtype=torch.bool), 0.0)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = torch.multinomial(w, 1).squeeze(1)
        torch.manual_seed(seed)
        got, has = fast.one_per_row(w)
        assert torch.equal(got, expected) and has.all()


def test_hard_negatives_are_drawn_with_the_softmax_probabilities():
    """One negative per row, drawn with probability w_j / sum(w): the frequencies of 10000 draws match w within a
    few standard errors, for both directions."""
    torch.manual_seed(0)
    f_v, f_t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    temp, img_id, n = torch.tensor(0.3), torch.arange(4), 10000
    for direction, sim in ((0, f_v @ f_t.t() / temp), (1, f_t @ f_v.t() / temp)):
        w = (sim.softmax(1) + 1e-5).masked_fill(torch.eye(4, dtype=torch.bool), 0)
        w = w / w.sum(1, keepdim=True)                                     # (4, 4) the draw's probabilities
        picks = torch.stack([sample_hard_negatives(f_v, f_t, temp, img_id)[direction] for _ in range(n)])  # (n, 4)
        freq = torch.stack([(picks == j).float().mean(0) for j in range(4)], dim=1)  # (4 rows, 4 picks)
        assert (freq - w).abs().max() < 5 * (0.25 / n) ** 0.5


def test_losses_work_at_batch_size_one():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg)
    losses = xfm_losses(model, make_batch(cfg, kinds=("pair", "text"), B=1))
    assert all(torch.isfinite(v) for v in losses.values())


def test_temperature_is_clamped():
    cfg = tiny_config()
    model = XFM(cfg)
    assert math.isclose(model.temp.item(), 0.07, rel_tol=1e-6)
    batch = make_batch(cfg, kinds=("pair",))
    for value, clamped in ((5.0, 0.5), (1e-6, 0.001)):
        with torch.no_grad():
            model.temp.fill_(value)
        xfm_losses(model, batch)
        assert math.isclose(model.temp.item(), clamped, rel_tol=1e-6)


def test_giou_and_l1_against_hand_computed_boxes():
    # A = [0,0,2,2], B = [1,1,3,3]: inter 1, union 7, enclosing C = [0,0,3,3] area 9 -> GIoU = 1/7 - 2/9
    a = torch.tensor([[0., 0., 2., 2.]])
    b = torch.tensor([[1., 1., 3., 3.]])
    assert torch.allclose(generalized_iou(a, b), torch.tensor([1 / 7 - 2 / 9]))
    # disjoint: A = [0,0,1,1], B = [2,0,3,1]: IoU 0, C = [0,0,3,1] area 3, union 2 -> GIoU = -1/3
    assert torch.allclose(generalized_iou(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([[2., 0., 3., 1.]])),
                          torch.tensor([-1 / 3]))
    assert torch.allclose(box_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    is_region = torch.tensor([True, True, False])  # the third is a whole-image caption: ignored
    hand_computed_box_losses(bbox_loss, pred, target, is_region)


def hand_computed_box_losses(bbox_loss, pred, target, is_region):
    l1, giou = bbox_loss(pred, target, is_region)
    assert torch.allclose(l1, torch.tensor(0.1 / 2))
    # second pair: boxes [0.2,0.2,0.4,0.4] and [0.3,0.2,0.5,0.4]: IoU = 0.02/0.06, C area 0.06
    assert torch.allclose(giou, torch.tensor((0.0 + (1 - 1 / 3)) / 2))
    none = bbox_loss(pred, target, torch.zeros(3, dtype=torch.bool))
    assert none[0].item() == 0.0 and none[1].item() == 0.0


def test_bbox_loss_sees_only_region_captions_and_the_full_image():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg).eval()
    batch = make_batch(cfg, kinds=("region",))
    torch.manual_seed(1)
    ref = xfm_losses(model, batch)
    moved = {k: v.clone() for k, v in batch["region"].items()}
    moved["box"][~moved["is_region"]] = torch.tensor([0.1, 0.1, 0.1, 0.1])  # whole-image captions' targets
    torch.manual_seed(1)
    out = xfm_losses(model, {"region": moved})
    assert torch.allclose(ref["bbox_l1"], out["bbox_l1"]) and torch.allclose(ref["bbox_giou"], out["bbox_giou"])
    # BBP reads the full image: changing which patches a caption's region covers changes ITC/ITM (region
    # view) but not the box prediction
    moved = {k: v.clone() for k, v in batch["region"].items()}
    moved["patch_mask"][:] = True
    torch.manual_seed(1)
    out = xfm_losses(model, {"region": moved})
    assert torch.allclose(ref["bbox_l1"], out["bbox_l1"])
    assert not torch.allclose(ref["itc_region"], out["itc_region"])


# ---------------------------------------------------------------------------------------------------------
# Global ITC across 2 processes (gloo) == 1 process on the concatenated batch


def _itc_setup(seed=0):
    torch.manual_seed(seed)
    proj_v, proj_t = torch.nn.Linear(12, 8), torch.nn.Linear(12, 8)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    x_v, x_t = torch.randn(8, 12), torch.randn(8, 12)
    return proj_v, proj_t, temp, x_v, x_t


def _itc_grads(proj_v, proj_t, temp, x_v, x_t, filled=None, path="reference"):
    """The reference reads the filled rows alone (ranks then hold different numbers of rows); the fast path reads
    every row, empty slots marked as neither query nor key."""
    if path == "reference" and filled is not None:
        x_v, x_t, filled = x_v[filled], x_t[filled], None
    f_v, f_t = F.normalize(proj_v(x_v), dim=-1), F.normalize(proj_t(x_t), dim=-1)
    loss = (fast.itc_loss(f_v, f_t, temp, queries=filled, keys=filled) if path == "fast" else
            itc_loss(f_v, f_t, temp))
    params = [*proj_v.parameters(), *proj_t.parameters(), temp]
    return loss.detach(), torch.autograd.grad(loss, params)


def _itc_worker(rank, world, meet, out_dir, empty, path):
    with gloo_group(rank, world, meet):
        proj_v, proj_t, temp, x_v, x_t = _itc_setup()
        filled = torch.tensor([i not in empty for i in range(8)])
        rows = slice(4 * rank, 4 * rank + 4)
        loss, grads = _itc_grads(proj_v, proj_t, temp, x_v[rows], x_t[rows], filled[rows], path)
        # what DDP does: average loss and gradients over the ranks
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        if rank == 0:
            torch.save({"loss": loss / world, "grads": [g / world for g in grads]}, os.path.join(out_dir, "itc.pt"))


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("empty", [(), (2, 5, 6)])  # rows that are empty caption slots (region batches)
def test_global_itc_two_processes_equals_one_process(tmp_path, empty, path):
    """4 + 4 rows on 2 processes (DDP's averaging) == one process on the 8 rows; with empty slots, == one
    process on the filled rows alone: an empty slot is neither a query nor a key, and ranks holding different
    numbers of filled rows still average to the mean over all of them."""
    mp.spawn(_itc_worker, args=(2, rendezvous(), str(tmp_path), empty, path), nprocs=2, join=True)
    got = torch.load(tmp_path / "itc.pt")
    keep = [i for i in range(8) if i not in empty]
    proj_v, proj_t, temp, x_v, x_t = _itc_setup()
    loss, grads = _itc_grads(proj_v, proj_t, temp, x_v[keep], x_t[keep])
    assert torch.allclose(got["loss"], loss, atol=1e-6)
    for a, b in zip(got["grads"], grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_imlm_reads_only_the_masked_caption():
    """IMLM predicts the masked words from the masked caption: the original words at the masked positions (in
    `ids`, which ITC and ITM read) never reach it."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg).eval()
    b = make_batch(cfg, kinds=("pair",))["pair"]
    torch.manual_seed(1)
    ref = xfm_losses(model, {"pair": b})["imlm"]
    other = dict(b, ids=b["ids"].clone())
    masked = b["mlm_labels"] != -100
    other["ids"][masked] = 5 + (other["ids"][masked] - 5 + 1) % (cfg.vocab_size - 5)   # other real words there
    torch.manual_seed(1)
    assert torch.allclose(xfm_losses(model, {"pair": other})["imlm"], ref)


def test_hard_negatives_follow_the_itc_similarity():
    """ALBEF's hard negatives: drawn with probability softmax(similarity / temp), so at a low temperature the
    most similar non-positive is drawn almost always (uniform draws would pick it 1 time in 4)."""
    torch.manual_seed(0)
    f_v = F.normalize(torch.randn(5, 8), dim=-1)
    f_t = f_v.clone()
    f_t[3] = F.normalize(f_v[0] + 0.05 * torch.randn(8), dim=0)          # text 3 is nearly image 0
    img_id = torch.arange(5)
    picks = torch.stack([sample_hard_negatives(f_v, f_t, torch.tensor(0.02), img_id)[0] for _ in range(100)])
    assert (picks[:, 0] == 3).float().mean() > 0.9


def test_fast_itm_rows_labels_and_weights_with_fixed_negatives(monkeypatch):
    """lib/fast_losses.py: itm_inputs' 3B rows: the B pairs, then (text b, its negative image), then (its negative text, image b);
    weight 0 for an empty slot and for a row without a negative. itm_ce: label 1 for the first B rows, 0 for the
    others, CE averaged over the rows of weight 1. The negatives are fixed here (sample_hard_negatives has its
    own tests)."""
    torch.manual_seed(0)
    B, T, S, D = 3, 4, 5, 2
    neg_txt, neg_img = torch.tensor([1, 0, 0]), torch.tensor([1, 0, 0])
    has_neg_txt, has_neg_img = torch.tensor([True, False, False]), torch.tensor([False, True, False])  # slot 2 is empty
    monkeypatch.setattr(fast, "sample_hard_negatives", lambda *args: (neg_txt, neg_img, has_neg_txt, has_neg_img))
    t, att = torch.randn(B, T, D), torch.randint(0, 2, (B, T))
    v, v_mask = torch.randn(B, S, D), torch.rand(B, S) < 0.5
    f, temp, img_id = torch.randn(B, 8), torch.tensor(0.07), torch.arange(B)
    filled = torch.tensor([True, True, False])
    (t_all, a_all, v_all, m_all), weight = fast.itm_inputs(t, att, v, v_mask, f, f, temp, img_id, filled)
    assert torch.equal(t_all, torch.cat([t, t, t[neg_txt]])) and torch.equal(a_all, torch.cat([att, att, att[neg_txt]]))
    assert torch.equal(v_all, torch.cat([v, v[neg_img], v]))
    assert torch.equal(m_all, torch.cat([v_mask, v_mask[neg_img], v_mask]))
    assert weight.tolist() == [1, 1, 0, 0, 1, 0, 1, 0, 0]
    (_, _, _, m_all), weight = fast.itm_inputs(t, att, v, None, f, f, temp, img_id)  # every slot filled, every key
    assert m_all is None and weight.tolist() == [1, 1, 1, 0, 1, 0, 1, 0, 0]
    cls = torch.randn(3 * B, 2)                                              # the head is the identity: logits
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    by_hand = (F.cross_entropy(cls, labels, reduction="none") * weight).sum() / weight.sum()
    assert torch.allclose(fast.itm_ce(SimpleNamespace(itm_head=torch.nn.Identity()), cls, weight), by_hand)


def test_itm_loss_rows_and_labels_with_fixed_negatives(monkeypatch):
    """losses.itm_loss: the fusion encoder reads the B pairs, then (text b, its negative image) for each row that
    found one, then (its negative text, image b); CE with label 1 for the pairs and 0 for the rest. The negatives
    are fixed here (sample_hard_negatives has its own tests); row 2 found no negative image."""
    import losses
    torch.manual_seed(0)
    B, T, S, D = 3, 4, 5, 2
    neg_txt, neg_img = torch.tensor([1, 0, 0]), torch.tensor([1, 0, -1])
    monkeypatch.setattr(losses, "sample_hard_negatives", lambda *args: (neg_txt, neg_img))
    t, att = torch.randn(B, T, D), torch.randint(0, 2, (B, T))
    v, v_mask = torch.randn(B, S, D), torch.rand(B, S) < 0.5
    seen = {}

    def fuse(t_all, a_all, v_all, m_all):                                  # [CLS] = the first text state
        seen.update(t=t_all, a=a_all, v=v_all, m=m_all)
        return t_all
    model = SimpleNamespace(fuse=fuse, itm_head=torch.nn.Identity())      # the logits are t[:, 0] itself
    f, temp, img_id = torch.randn(B, 8), torch.tensor(0.07), torch.arange(B)
    loss = losses.itm_loss(model, t, att, v, v_mask, f, f, temp, img_id)
    ti, ii = torch.tensor([0, 1]), torch.tensor([0, 1, 2])                 # rows with a negative image / text
    assert torch.equal(seen["t"], torch.cat([t, t[ti], t[neg_txt[ii]]]))
    assert torch.equal(seen["a"], torch.cat([att, att[ti], att[neg_txt[ii]]]))
    assert torch.equal(seen["v"], torch.cat([v, v[neg_img[ti]], v[ii]]))
    assert torch.equal(seen["m"], torch.cat([v_mask, v_mask[neg_img[ti]], v_mask[ii]]))
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    assert torch.allclose(loss, F.cross_entropy(seen["t"][:, 0], labels))


def test_itm_labels_one_for_pairs_zero_for_negatives():
    """ITM's targets: 1 for the B matched pairs, 0 for the hard negatives. A head that always answers [0, 10]
    costs ~0 on a positive and ~10 on a negative, so the loss is 10 x (#negatives / #rows): 10 x 2/3 with a
    negative image and a negative text for every pair."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg)
    with torch.no_grad():
        model.itm_head[-1].weight.zero_()
        model.itm_head[-1].bias.copy_(torch.tensor([0.0, 10.0]))
    out = xfm_losses(model, make_batch(cfg, kinds=("pair", "region")))
    assert math.isclose(out["itm"].item(), 10 * 2 / 3, rel_tol=1e-3)
    assert math.isclose(out["itm_region"].item(), 10 * 2 / 3, rel_tol=1e-3)


def test_giou_is_zero_on_degenerate_boxes():
    """As officially: a degenerate target box (w or h = 0) turns the GIoU term off for the batch (L1 stays)."""
    degenerate_box_losses(bbox_loss)


def test_fast_bbox_loss_on_hand_computed_and_degenerate_boxes():
    """lib/fast_losses.bbox_loss (rows weighed, no boolean mask) gives the hand-computed values too."""
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    hand_computed_box_losses(fast.bbox_loss, pred, target, torch.tensor([True, True, False]))
    degenerate_box_losses(fast.bbox_loss)


def degenerate_box_losses(bbox_loss):
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    target = torch.tensor([[0.4, 0.5, 0.2, 0.2], [0.3, 0.3, 0.0, 0.2]])  # the second has no width
    l1, giou = bbox_loss(pred, target, torch.tensor([True, True]))
    assert torch.allclose(l1, torch.tensor(0.3 / 2)) and giou.item() == 0.0
    assert bbox_loss(pred, target[[0, 0]], torch.tensor([True, True]))[1].item() > 0  # non-degenerate: counted
