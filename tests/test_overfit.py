"""Overfit one batch: on a fixed small batch with the tiny config, training on one data kind's losses drives every
objective it checks far below its chance level within seconds of CPU. Each loss must be wired to what it
should learn from: an image feature pooled over the batch keeps ITC at ln N, an ITM negative that shows the
positive image keeps ITM near ln 2 on those rows, a box read from the batch mean keeps L1 and GIoU at the
constant-box level (tools/mutate.py plants these and more). The learning test's bands (test_learning.py) are
too wide for that: around ITM, box and GC losses they contain the chance level.

X-FM's MIM is not checked here: its target is the same encoder's output, so a collapsed encoder also reaches 0
(test_losses.py checks its formula, masks and detached target instead)."""
import math

import torch

import flava
from conftest import make_batch, tiny_config
from losses import bbox_loss, xfm_losses
from model import XFM

ITM_CHANCE = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))        # 1 positive : 2 hard negatives


def overfit(model, batch, loss_fn, names, steps, lr=2e-3):
    """Train `model` on the sum of `names` for `steps` AdamW steps on the same batch -> each loss, mean of the
    last 5 steps (ITM draws new hard negatives every step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    last = []
    for _ in range(steps):
        out = loss_fn(model, batch)
        loss = sum(out[n] for n in names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = (last + [{n: out[n].item() for n in names}])[-5:]
    return {n: sum(d[n] for d in last) / len(last) for n in names}


def constant_box_chance(b):
    """L1 and GIoU losses of the best constant guess (the mean box of the region captions)."""
    reg = b["is_region"]
    mean = b["box"][reg].mean(0, keepdim=True).expand_as(b["box"])
    return [x.item() for x in bbox_loss(mean, b["box"], reg)]


def assert_far_below(got, chance, frac):
    bad = {n: (round(got[n], 3), round(chance[n], 3)) for n in chance if not got[n] < frac * chance[n]}
    assert not bad, f"not below {frac} x chance (loss, chance): {bad}"


def test_xfm_text_mlm():
    torch.manual_seed(0)
    cfg = tiny_config(mim_target="off")
    batch = make_batch(cfg, kinds=("text",), B=4)
    got = overfit(XFM(cfg), batch, xfm_losses, ["mlm"], 40)
    assert_far_below(got, {"mlm": math.log(cfg.vocab_size)}, 0.2)


def test_xfm_pair_itc_itm_imlm():
    torch.manual_seed(0)
    cfg = tiny_config(mim_target="off")
    batch = make_batch(cfg, kinds=("pair",), B=6)
    got = overfit(XFM(cfg), batch, xfm_losses, ["itc", "itm", "imlm"], 60)
    assert_far_below(got, {"itc": math.log(6), "itm": ITM_CHANCE, "imlm": math.log(cfg.vocab_size)}, 0.3)


def test_xfm_region_itc_itm_imlm_bbox():
    torch.manual_seed(0)
    cfg = tiny_config(mim_target="off")
    batch = make_batch(cfg, kinds=("region",), B=6)
    b = batch["region"]
    l1, giou = constant_box_chance(b)
    names = ["itc_region", "itm_region", "imlm_region", "bbox_l1", "bbox_giou"]
    got = overfit(XFM(cfg), batch, xfm_losses, names, 80)  # 60 left GIoU within 10 % of its bar on some seeds
    chance = {"itc_region": math.log(len(b["ids"])), "itm_region": ITM_CHANCE,
              "imlm_region": math.log(cfg.vocab_size), "bbox_l1": l1, "bbox_giou": giou}
    assert_far_below(got, chance, 0.3)


# ---------------------------------------------------------------------------------------------------------
# FLAVA


def tiny_flava():
    torch.manual_seed(0)
    cfg = flava.make_flava_config("tiny", vocab_size=64, codebook_size=16)
    m = flava.FLAVA(cfg)
    m.image_tokenizer.codebook.normal_()  # varied image-token ids on random images
    return m


def test_flava_text_and_image_mlm_mim():
    m = tiny_flava()
    batch = make_batch(m.cfg, kinds=("text", "image"), B=4)
    got = overfit(m, batch, lambda mod, b: flava.flava_losses(mod, b), ["mlm", "mim"], 60, lr=3e-4)
    assert_far_below(got, {"mlm": math.log(64), "mim": math.log(16)}, 0.3)


def test_flava_pair_gc_mmm():
    m = tiny_flava()
    batch = make_batch(m.cfg, kinds=("pair",), B=6)                        # every pair matched
    got = overfit(m, batch, lambda mod, b: flava.flava_losses(mod, b), ["gc", "mmm_text", "mmm_image"], 110, lr=1e-3)
    assert_far_below(got, {"gc": math.log(6), "mmm_text": math.log(64), "mmm_image": math.log(16)}, 0.3)


def test_flava_pair_itm_needs_both_image_and_text():
    """Rows 0-3 are matched pairs (image i, caption i); rows 4-7 show image i+1 with caption i, labelled 0. Every
    image and every caption appears once with each label, so only the pairing tells the label."""
    m = tiny_flava()
    b = make_batch(m.cfg, kinds=("pair",), B=4)["pair"]
    nxt = torch.tensor([1, 2, 3, 0])
    pair = {k: torch.cat([v, v]) for k, v in b.items()}
    pair["image"] = torch.cat([b["image"], b["image"][nxt]])
    pair["mim_mask"] = torch.cat([b["mim_mask"], b["mim_mask"][nxt]])
    pair["img_id"] = torch.cat([b["img_id"], b["img_id"][nxt]])
    pair["itm_label"] = torch.tensor([1] * 4 + [0] * 4)
    got = overfit(m, {"pair": pair}, lambda mod, bt: flava.flava_losses(mod, bt), ["itm"], 50, lr=3e-4)
    assert_far_below(got, {"itm": math.log(2)}, 0.3)
