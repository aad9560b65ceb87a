"""Two paths, one truth: lib/fast_losses.py (fixed shapes, no host syncs, one-call encoder and fusion passes)
computes the same losses and gradients as the reference, losses.py (boolean-mask indexing, `if not sel.any()`,
torch.multinomial, data-dependent sizes, one fusion call per objective). These tests hold it to that:

    - every loss and every gradient of the fast path equals the reference's, for X-FM and FLAVA, on data.py-shaped
      batches whose region part has empty caption slots, and on a batch where no row has a hard negative;
    - a step of the fast path makes the host wait for nothing: lib/opcount's DispatchCounter sees 0 syncs in forward +
      backward, both recipes (the reference has dozens), and 0 in a whole train.py step (its updates, the non-finite
      check, clipping, fused AdamW, the meter) that logs nothing.

The compiled step (0 graph breaks, 0 recompiles over 50 steps) is tests/test_train.py's
test_compiled_step_never_breaks_the_graph_nor_recompiles; the hard-negative draw's distribution is
tests/test_losses.py's test_hard_negatives_are_drawn_with_the_softmax_probabilities.
"""

import pytest
import torch

import flava
import losses
import train
from lib import fast_losses, runtime, toyworld
from lib.opcount import DispatchCounter, uncounted
from conftest import make_batch, tiny_config
from model import XFM


def with_empty_slots(region):
    """The region batch of make_batch (2 captions per image) with a third, empty slot per image, as
    data.RegionDataset makes them: <s> </s>, nothing masked, no box, every patch, filled False."""
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
               filled=torch.tensor([r is not None for r in rows]))
    out["img_id"] = out["img_index"].clone()
    return out


def masks_bound(b, key):
    b["mlm_slots"] = int((b[key] != -100).sum(1).max())                   # as data.py's bound, reached by some row
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


def xfm_batch(no_negatives=False):
    """make_batch's four kinds as data.py makes them: a third, empty caption slot per image in the region part, and
    mlm_slots, the slots each row's masked positions get in the fast path. no_negatives: every pair shows one image
    (img_id 0), so no row finds a hard negative."""
    batch = make_batch(tiny_config(), B=6, seed=5)
    batch["region"] = masks_bound(with_empty_slots(batch["region"]), "mlm_labels")
    masks_bound(batch["text"], "labels")
    masks_bound(batch["pair"], "mlm_labels")
    if no_negatives:
        batch["pair"]["img_id"] = torch.zeros_like(batch["pair"]["img_id"])
    return batch


@pytest.mark.parametrize("no_negatives", [False, True])
def test_xfm_fast_path_equals_the_reference(hardest_negatives, no_negatives):
    batch = xfm_batch(no_negatives)
    assert (~batch["region"]["filled"]).sum() == 3 and batch["text"]["mlm_slots"] < batch["text"]["ids"].shape[1]
    torch.manual_seed(0)
    model = XFM(tiny_config()).train()
    fast, reference = losses_and_grads(model, fast_losses.xfm_losses, batch), losses_and_grads(model, losses.xfm_losses, batch)
    assert_same(fast, reference)


def test_flava_fast_path_equals_the_reference():
    """flava.flava_losses(fast=True) == flava.flava_losses(fast=False), swapped captions included: rows 1 and 4 are
    no GC queries and have no MMM targets."""
    torch.manual_seed(0)
    model = flava.FLAVA(flava.make_flava_config("tiny", vocab_size=64, dropout=0.0, drop_path=0.0)).train()
    model.image_tokenizer.codebook.normal_()
    batch = make_batch(model.cfg, kinds=("text", "image", "pair"), B=6, seed=5)
    batch["pair"]["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1])
    masks_bound(batch["text"], "labels")
    masks_bound(batch["pair"], "mlm_labels")
    batch["image"]["mim_count"] = batch["pair"]["mim_count"] = int(batch["image"]["mim_mask"].sum(1).max())
    fast = losses_and_grads(model, lambda m, b: flava.flava_losses(m, b, fast=True), batch)
    assert_same(fast, losses_and_grads(model, flava.flava_losses, batch))


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_a_step_makes_the_host_wait_for_nothing(recipe):
    """0 host syncs (ops whose result the host must read: .item(), `if tensor`, nonzero, boolean-mask indexing) in
    the forward and backward of every loss. The plain version has dozens: the counter does see them."""
    torch.manual_seed(0)
    if recipe == "xfm":
        model, batch = XFM(tiny_config()).train(), xfm_batch()
        fast, reference = fast_losses.xfm_losses, losses.xfm_losses
    else:
        model = flava.FLAVA(flava.make_flava_config("tiny", vocab_size=64)).train()
        batch = make_batch(model.cfg, kinds=("text", "image", "pair"), B=6, seed=5)
        batch["pair"]["itm_label"] = torch.tensor([1, 0, 1, 1, 0, 1])
        fast = lambda m, b: flava.flava_losses(m, b, fast=True)        # noqa: E731
        reference = flava.flava_losses
    with DispatchCounter() as counter:
        sum(fast(model, batch).values()).backward()
    assert counter.syncs == 0, counter.sync_sites
    assert counter.ops > 500
    with DispatchCounter() as reference_counter:
        sum(reference(model, batch).values()).backward()
    assert reference_counter.syncs > 10


# ---------------------------------------------------------------------------------------------------------
# A whole train.py step on the fast path: the three updates (X-FM) or FLAVA's, forward and backward, the
# non-finite check, clipping, fused AdamW, the temperature clamp, the meter; a step that logs nothing


class _StepCounter:
    """Stands in for train.py's progress bar: counts the dispatched ops of the second step (from the first
    pbar.update to the second). The data fetch is host work on the loader's CPU tensors (a worker's batch, read
    and counted before its copy to the device), so it runs with the counter paused."""

    def __init__(self, *args, **kwargs):
        self.updates, self.counter = 0, DispatchCounter()

    def update(self, n):
        self.updates += 1
        if self.updates == 1:
            self.counter.__enter__()
        elif self.updates == 2:
            self.counter.__exit__(None, None, None)
            counted.append(self.counter)

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


counted = []


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, seed=0, n_pairs=64, n_regions=32, n_text=64, n_images=32, n_test=16, n_down=8, progress=False)
    return d


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_a_train_py_step_makes_the_host_wait_for_nothing(recipe, toy, tmp_path, monkeypatch):
    """0 host syncs in a whole train.py step of the fast path (no .item() for the non-finite check: fused AdamW
    skips on the device, runtime.NonFinite), where the reference path's step has one per update and per
    parameter (the non-fused AdamW's step counter) at least."""
    fetch = runtime.next_batches
    monkeypatch.setattr(runtime, "next_batches", lambda *args: uncounted(fetch(*args)))
    monkeypatch.setattr(train, "tqdm", _StepCounter)
    args = [f"--recipe={recipe}", f"--data_dir={toy}", "--max_steps=3", "--log_every=100", "--ckpt_every=100",
            "--batch_size=8", "--vocab_size=300", "--eval_k=4", "--caption_len=24", "--text_len=32",
            "--num_workers=1"]
    train.main([*args, "--losses=fast", f"--out_dir={tmp_path / 'fast'}"])
    fast = counted[-1]
    assert fast.syncs == 0, fast.sync_sites
    train.main([*args, "--losses=reference", f"--out_dir={tmp_path / 'reference'}"])   # (the counter counts)
    assert fast.ops > 500 and counted[-1].syncs > 10
