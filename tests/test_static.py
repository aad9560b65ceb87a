"""Fixed shapes and no host syncs (docs/METHOD.md §6.3): the loss code computes every row and weighs the rows that
take no part by 0, instead of dropping them with boolean masks and `if tensor` branches. These tests pin that it is
the same method:

    - every loss and every gradient equals the plain version (tests/plain_losses.py: boolean-mask indexing,
      `if not sel.any()`, torch.multinomial, data-dependent sizes), on a batch whose region part has empty caption
      slots (the plain version sees the batch without them), for X-FM and FLAVA;
    - a step makes the host wait for nothing: bench's DispatchCounter sees 0 syncs in forward + backward, both recipes.

The compiled step (0 graph breaks, 0 recompiles over 50 steps) is tests/test_train.py's
test_compiled_step_never_breaks_the_graph_nor_recompiles; the hard-negative draw's distribution is
tests/test_losses.py's test_hard_negatives_are_drawn_with_the_softmax_probabilities.
"""

import pytest
import torch

import flava
from lib import fast_losses as losses
import losses as plain_losses
from bench_meters import DispatchCounter
from conftest import make_batch, tiny_config
from model import XFM


def with_empty_slots(region):
    """The region batch of make_batch (2 captions per image) with a third, empty slot per image, as
    data.RegionDataset makes them: <s> </s>, nothing masked, no box, every patch, valid False."""
    n_img, T = len(region["image"]), region["ids"].shape[1]
    empty_ids = torch.full((T,), 1)
    empty_ids[:2] = torch.tensor([0, 2])
    rows = []  # (source row or None) per slot, grouped by image
    for i in range(n_img):
        rows += [r for r in range(len(region["img_index"])) if region["img_index"][r] == i] + [None]

    def stack(key, empty):
        return torch.stack([region[key][r] if r is not None else empty for r in rows])

    out = {"image": region["image"], "img_index": torch.tensor([i for i in range(n_img) for _ in range(3)])}
    out.update(ids=stack("ids", empty_ids), att=stack("att", (empty_ids != 1).long()), mlm_ids=stack("mlm_ids", empty_ids),
               mlm_labels=stack("mlm_labels", torch.full((T,), -100)), box=stack("box", torch.tensor([0.5, 0.5, 1, 1])),
               is_region=stack("is_region", torch.tensor(False)), patch_mask=stack("patch_mask", region["patch_mask"][0] | True),
               valid=torch.tensor([r is not None for r in rows]))
    out["img_id"] = out["img_index"].clone()
    return out


def masks_bound(b, key):
    b["max_masks"] = int((b[key] != -100).sum(1).max())                   # as data.py's bound, reached by some row
    return b


@pytest.fixture
def hardest_negatives(monkeypatch):
    """Both samplers pick the most likely negative: the exponential race with every E = 1, the multinomial by argmax.
    The same negatives on both sides, so the two ITM losses can be compared exactly."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self: self.fill_(1.0))
    monkeypatch.setattr(torch, "multinomial", lambda w, n: w.argmax(1, keepdim=True))


def losses_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert set(la) == set(lb) and set(ga) == set(gb)
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=atol), (k, la[k], lb[k])
    for n in ga:  # relative to the gradient's size: FLAVA's untrained heads give gradients in the thousands
        assert (ga[n] - gb[n]).norm() <= atol * (1 + gb[n].norm()), n


def xfm_batches():
    plain = make_batch(tiny_config(), B=6, seed=5)
    fixed = {k: dict(v) for k, v in plain.items()}
    fixed["region"] = masks_bound(with_empty_slots(plain["region"]), "mlm_labels")
    masks_bound(fixed["text"], "labels")
    masks_bound(fixed["pair"], "mlm_labels")
    return plain, fixed


def test_xfm_losses_and_gradients_equal_the_plain_version(hardest_negatives):
    plain, fixed = xfm_batches()
    assert (~fixed["region"]["valid"]).sum() == 3 and fixed["text"]["max_masks"] < fixed["text"]["ids"].shape[1]
    torch.manual_seed(0)
    model = XFM(tiny_config()).train()
    assert_same(losses_and_grads(model, losses.xfm_losses, fixed), losses_and_grads(model, plain_losses.xfm_losses, plain))


def test_flava_losses_and_gradients_equal_the_plain_version(monkeypatch):
    """flava.flava_losses with the fixed-shape mlm_loss and itc_loss == with the plain ones (swapped captions
    included: rows 1 and 4 are no GC queries and have no MMM targets)."""
    torch.manual_seed(0)
    model = flava.FLAVA(flava.make_flava_config("tiny", vocab_size=64, dropout=0.0, drop_path=0.0)).train()
    model.image_tokenizer.codebook.normal_()
    batch = make_batch(model.cfg, kinds=("text", "image", "pair"), B=6, seed=5)
    batch["pair"]["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1])
    masks_bound(batch["text"], "labels")
    masks_bound(batch["pair"], "mlm_labels")
    batch["image"]["mim_count"] = batch["pair"]["mim_count"] = int(batch["image"]["mim_mask"].sum(1).max())
    fixed = losses_and_grads(model, flava.flava_losses, batch)
    monkeypatch.setattr(flava, "mlm_loss", lambda h, labels, head, k=None: plain_losses.mlm_loss(h, labels, head))
    monkeypatch.setattr(flava, "itc_loss", plain_losses.itc_loss)
    assert_same(fixed, losses_and_grads(model, flava.flava_losses, batch))


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_a_step_makes_the_host_wait_for_nothing(recipe):
    """0 host syncs (ops whose result the host must read: .item(), `if tensor`, nonzero, boolean-mask indexing) in
    the forward and backward of every loss. The plain version has dozens: the counter does see them."""
    torch.manual_seed(0)
    if recipe == "xfm":
        model, (plain, batch) = XFM(tiny_config()).train(), xfm_batches()
        fns = (losses.xfm_losses, plain_losses.xfm_losses)
    else:
        model = flava.FLAVA(flava.make_flava_config("tiny", vocab_size=64)).train()
        batch = plain = make_batch(model.cfg, kinds=("text", "image", "pair"), B=6, seed=5)
        batch["pair"]["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1])
        fns = (flava.flava_losses, None)
    counter = DispatchCounter()
    with counter:
        sum(fns[0](model, batch).values()).backward()
    assert counter.syncs == 0, counter.sync_sites
    assert counter.ops > 500
    if fns[1] is not None:
        with DispatchCounter() as plain_counter:
            sum(fns[1](model, plain).values()).backward()
        assert plain_counter.syncs > 20
