"""
Data for xfm: the samples and batches of X-FM's four pre-training streams (text, image,
image-text pairs, region-text) and the two masking generators (text MLM and BEiT block-wise MIM)
(docs/METHOD.md §4.1, §5, §11). lib/streams.py turns the datasets into sharded, resumable streams;
the tokenizer is lib/tokenizer.py; the synthetic toy world that feeds every stream is written by
lib/toyworld.py.

Run:
    python -m pytest tests/test_data.py -q

The files of a data folder, their formats and the bad-input rules: lib/formats.py.

Batches (tensors, and the ints mlm_slots, mim_count; T = the longest sequence in the batch, or
text_len / caption_len with DataConfig.static (train.py --compile);
P = (image_size // patch_size) ** 2):
    text:   ids (B,T) masked ids, att (B,T), labels (B,T) with -100 where not masked
            (MLM p=0.15, <= 20 masks)
    image:  image (B,3,S,S), mim_mask (B,P) bool, mim_count (masked patches per image)
    pair:   image, mim_mask, mim_count, ids/att (unmasked caption),
            mlm_ids/mlm_labels (p=0.5, <= 15), img_id (B,), itm_label (B,)
    region: image (B_img,3,S,S) and, per caption slot (N = B_img * slots): img_index, ids, att,
            mlm_ids, mlm_labels, box (N,4) normalised cx,cy,w,h, is_region, patch_mask (N,P),
            img_id, filled (N,) (False: an empty slot). No MIM on regions.
    mlm_slots (text, pair, region): the most masked positions any row can hold (data.mlm_slots), the
            slots the fast path's mlm_loss gives each row, so that loss has fixed shapes
            (lib/fast_losses.py); the reference losses.py does not read it.
Images: CLIP-normalised float32, or uint8 (DataConfig.uint8_images), normalised by runtime.to_device.
A collated image, pair or region batch also holds `bad`: the unreadable images passed over while
making it, as formats.BadInput.found gives them; lib/streams.Stream takes them out and counts each
record once (BadInput.once), so a file that fails is counted once however often it is drawn, in
any DataLoader worker and any epoch.
Every sample draws its randomness from np.random.default_rng([seed, stream, epoch, index]), so
batches do not depend on the number of DataLoader workers and a resumed run continues the exact same
sequence.

Augmentation (random resized crop, flip, CLIP normalisation) and what the toy world needs of it:
lib/transforms.py. crop_scale[0] is also the smallest area (fraction of the image) of the region
stream's box-preserving crop.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lib import formats
from lib.transforms import crop_draft, random_resized_crop, to_tensor, to_uint8

# the four streams; the index also salts each stream's rng
KINDS = ("text", "image", "pair", "region")

# -----------------------------------------------------------------------------
# Masking: text MLM (docs/METHOD.md §4.1) and BEiT block-wise MIM (§5.3)


def mask_text(ids, tok, prob, max_predictions, rng, skipgram_prob=0.2, max_span=3):
    """MLM corruption. -> (masked ids, labels) with labels = original id where chosen, -100
    elsewhere. Masks n = min(max_predictions, max(1, round(prob * #candidates))) positions, never
    more than mlm_slots(len(ids)) (ValueError otherwise: ids that do not end with </s>)."""
    ids, labels = list(ids), [-100] * len(ids)
    # never <s>, </s>, <pad>
    cand = [i for i, t in enumerate(ids) if i > 0 and t not in tok.special_ids]
    if not cand:
        return ids, labels
    n = min(max_predictions, max(1, round(len(cand) * prob)))
    cand_set, chosen = set(cand), set()
    while len(chosen) < n:
        # start at an unchosen position, so each round progresses
        free = [i for i in cand if i not in chosen]
        start = free[rng.integers(len(free))]
        # "skipgram": 2-3 tokens
        span = int(rng.integers(2, max_span + 1)) if rng.random() < skipgram_prob else 1
        for p in range(start, start + span):
            if len(chosen) < n and p in cand_set:
                chosen.add(p)
    # the fast path gathers a row's masked positions into mlm_slots(T) slots (fast_losses.mlm_loss),
    # T >= len(ids): a row with more would lose some silently. Within the bound whenever ids is
    # <s> ... </s> (tokenizer.encode).
    bound = mlm_slots(len(ids), prob, max_predictions)
    if len(chosen) > bound:
        raise ValueError(f"mask_text masked {len(chosen)} of {len(ids)} positions, more than "
                         f"mlm_slots = {bound}, the slots the fast mlm_loss gives a row: ids must "
                         "start with <s> and end with </s>")
    for p in sorted(chosen):
        labels[p] = ids[p]
        r = rng.random()
        if r < 0.8:  # 80 % <mask>, 10 % a random token, 10 % unchanged (BERT)
            ids[p] = tok.mask_id
        elif r < 0.9:
            ids[p] = tok.random_token(rng)
    return ids, labels


def mlm_slots(T, prob, max_predictions):
    """The most positions mask_text masks in a text of at most T tokens (<s> and </s> are never
    masked): the fixed number of slots the fast path's mlm_loss gives each row, so that loss has
    fixed shapes (lib/fast_losses.py)."""
    return min(max_predictions, max(1, round((T - 2) * prob)))


def mim_counts(grid):
    """(num_masking, min_patches) scaled from BEiT's 75 and 16 of 196:
    (75, 16) @14, (24, 5) @8, (6, 2) @4."""
    return round(grid * grid * 75 / 196), max(2, round(grid * grid * 16 / 196))


def block_mask(grid, num_masking, min_patches, rng, min_aspect=0.3):
    """BEiT block-wise mask over a grid x grid patch grid -> bool (grid*grid,) with exactly
    num_masking True."""
    mask = np.zeros((grid, grid), dtype=bool)
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        left, delta = num_masking - count, 0
        for _ in range(10):  # up to 10 attempts to place one more rectangle
            # BEiT draws the area between min_patches and what is left, in whichever order they come
            area = rng.uniform(min(min_patches, left), max(min_patches, left))
            ar = math.exp(rng.uniform(*log_ar))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 1 <= w < grid and 1 <= h < grid:
                top, lft = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
                new = h * w - int(mask[top:top + h, lft:lft + w].sum())
                if 0 < new <= left:  # must add something and must not overshoot
                    mask[top:top + h, lft:lft + w] = True
                    delta = new
                    break
        if delta == 0:
            break  # no rectangle fits any more
        count += delta
    # blocks can fall short of the target (rarely overshoot): random single patches fix the count
    flat = mask.reshape(-1)
    diff = num_masking - int(flat.sum())
    if diff > 0:
        flat[rng.choice(np.flatnonzero(~flat), diff, replace=False)] = True
    elif diff < 0:
        flat[rng.choice(np.flatnonzero(flat), -diff, replace=False)] = False
    return flat


# -----------------------------------------------------------------------------
# Region crops and boxes (the generic transforms: lib/transforms.py)


def crop_boxes(boxes_xywh, crop, min_in=0.5):
    """Pixel boxes (x, y, w, h) -> normalised (cx, cy, w, h) inside crop = (x0, y0, x1, y1), clipped
    to it; None for a box with less than min_in of its area left inside the crop."""
    x0, y0, x1, y1 = crop
    cw, ch = x1 - x0, y1 - y0
    out = []
    for bx, by, bw, bh in boxes_xywh:
        # clip to the crop, then shift into its frame
        l, t = max(bx, x0) - x0, max(by, y0) - y0
        r, b = min(bx + bw, x1) - x0, min(by + bh, y1) - y0
        if r <= l or b <= t or (r - l) * (b - t) < min_in * bw * bh:
            out.append(None)
            continue
        # the crop is resized to a square: normalising by its own width and height maps it exactly
        out.append(((l + r) / 2 / cw, (t + b) / 2 / ch, (r - l) / cw, (b - t) / ch))
    return out


def region_crop(img, boxes_xywh, size, rng, n_keep=None, min_scale=0.0, uint8=False):
    """X-VLM style box-preserving crop. The crop contains the first n_keep boxes (default all)
    fully; its edges are drawn uniformly between those boxes and the image border (redrawn up to 10
    times until it covers at least min_scale of the image; min_scale >= 1: no crop); then it is
    resized to size x size.
    -> (tensor (3, size, size), list of normalised (cx, cy, w, h), None where a box was dropped)."""
    W, H = img.size
    keep = boxes_xywh[: len(boxes_xywh) if n_keep is None else n_keep]
    crop = (0, 0, W, H)  # also the fallback when no drawn crop is large enough
    for _ in range(10 if keep and min_scale < 1 else 0):
        # the union of the kept boxes, in whole pixels
        ux0 = int(math.floor(min(b[0] for b in keep)))
        uy0 = int(math.floor(min(b[1] for b in keep)))
        ux1 = int(math.ceil(max(b[0] + b[2] for b in keep)))
        uy1 = int(math.ceil(max(b[1] + b[3] for b in keep)))
        c = (int(rng.integers(0, ux0 + 1)), int(rng.integers(0, uy0 + 1)),
             int(rng.integers(ux1, W + 1)), int(rng.integers(uy1, H + 1)))
        if (c[2] - c[0]) * (c[3] - c[1]) >= min_scale * W * H:
            crop = c
            break
    x = img.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    x = to_uint8(x) if uint8 else to_tensor(x)
    return x, crop_boxes(boxes_xywh, crop)


def box_patch_mask(box_cxcywh, grid):
    """bool (grid*grid,): the patches whose cells overlap a normalised (cx, cy, w, h) box; never
    empty."""
    cx, cy, w, h = box_cxcywh
    lo = np.arange(grid) / grid  # left/top edge of each cell
    eps = 1e-6  # a box edge lying exactly on a cell border does not touch the next cell
    cols = (lo < cx + w / 2 - eps) & (lo + 1 / grid > cx - w / 2 + eps)
    rows = (lo < cy + h / 2 - eps) & (lo + 1 / grid > cy - h / 2 + eps)
    m = rows[:, None] & cols[None, :]  # (grid, grid), row-major like the patch sequence
    if not m.any():  # a degenerate box still gets the cell under its centre
        m[min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)] = True
    return m.reshape(-1)


# -----------------------------------------------------------------------------
# Datasets: items are keyed by (index, epoch) from the sampler; collate builds the batch dicts


def pad_seqs(seqs, value, T=None):
    """list of lists -> (B, T) long tensor padded with value; T = the longest when None."""
    out = torch.full((len(seqs), T or max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def padding_mask(seqs, T):
    """(B, T) long: 1 at the real tokens, 0 at the padding (the `att` every encoder takes)."""
    return (torch.arange(T)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()


@dataclass
class DataConfig:
    """What every dataset of a run shares (train.py fills it from its config and the model's)."""
    image_size: int
    patch_size: int
    text_len: int = 64              # max tokens of a text-only document
    caption_len: int = 30           # max tokens of a caption (pairs, regions)
    seed: int = 0                   # with (stream, epoch, index): each sample's random generator
    hflip: bool = False             # horizontal flip of the pair and image views
    # random resized crop; [0] also bounds the region crop's area ((1, 1): no crop)
    crop_scale: tuple = (0.8, 1.0)
    caption_mask: str = "xfm"       # a CAPTION_MASKING key: how pair captions are masked
    # FLAVA: the fraction of pairs whose caption is swapped (ITM negatives)
    itm_neg_prob: float = 0.0
    max_regions: int = 5            # region captions sampled per image
    # pad every text to text_len and caption to caption_len: one batch shape
    static: bool = False
    # image paths are relative to this folder ("": the file's own; formats.image_base)
    image_root: str = ""
    # images leave the workers as uint8, normalised on the device (runtime.to_device; CUDA runs)
    uint8_images: bool = False

    @property
    def grid(self):
        return self.image_size // self.patch_size


class _Base(Dataset):
    """Shared plumbing: per-sample rng and image loading with a deterministic fallback."""

    def __init__(self, items, kind, dc, bad):
        self.items, self.salt, self.dc, self.bad = items, KINDS.index(kind), dc, bad

    def __len__(self):
        return len(self.items)

    def rng(self, epoch, index):
        # the sample's own generator, independent of worker count and of earlier samples, so a
        # resumed run draws exactly what the uninterrupted one drew
        return np.random.default_rng([self.dc.seed, self.salt, epoch, index])

    def load(self, index, draft=None):
        """-> (j, PIL image, bad): item j is index or, if its image cannot be decoded, the next
        readable one; bad: the problem of each item passed over (BadInput.found: the batch carries
        them to the main process). draft: formats.load_image's."""
        n, bad = len(self.items), []
        for k in range(n):
            j = (index + k) % n
            item = self.items[j]
            try:
                return j, formats.load_image(item["image"], draft), bad
            except Exception as e:
                bad.append(self.bad.found("unreadable image", item["where"],
                                          f"{item['image']}: {e}", "replaced by the next sample"))
        raise RuntimeError("no readable image in the whole dataset")


class TextDataset(_Base):
    def __init__(self, texts, tok, dc, bad):
        super().__init__(texts, "text", dc, bad)
        self.tok = tok

    def __getitem__(self, key):
        index, epoch = key
        ids = self.tok.encode(self.items[index], self.dc.text_len, document=True)
        masked, labels = mask_text(ids, self.tok, *TEXT_MASKING, self.rng(epoch, index))
        return {"ids": masked, "labels": labels}

    def collate(self, samples):
        T = self.dc.text_len if self.dc.static else None
        ids = pad_seqs([s["ids"] for s in samples], self.tok.pad_id, T)  # (B, T)
        return {"ids": ids, "att": padding_mask([s["ids"] for s in samples], ids.shape[1]),
                "labels": pad_seqs([s["labels"] for s in samples], -100, T),
                "mlm_slots": mlm_slots(ids.shape[1], *TEXT_MASKING)}


class ImageView(NamedTuple):
    """One drawn image sample (ImageDataset.image_and_mask)."""
    j: int                     # the item used: the index asked for, or the next readable one (load)
    image: torch.Tensor        # (3, S, S) float: cropped, maybe flipped, CLIP-normalised
    mim_mask: torch.Tensor     # (P,) bool: exactly mim_counts(grid)[0] masked patches
    bad: list                  # the unreadable images passed over (BadInput.found)
    rng: np.random.Generator   # the sample's generator: the caller's next draws (captions, masks)


class ImageDataset(_Base):
    def __init__(self, items, dc, bad, kind="image"):
        super().__init__(items, kind, dc, bad)

    def image_and_mask(self, key):
        """(index, epoch) -> ImageView: the augmented image and its MIM mask (the sample's rng)."""
        index, epoch = key
        rng = self.rng(epoch, index)
        j, img, bad = self.load(index, crop_draft(self.dc.image_size, self.dc.crop_scale))
        x = random_resized_crop(img, self.dc.image_size, rng, scale=self.dc.crop_scale,
                                hflip=self.dc.hflip, uint8=self.dc.uint8_images)
        # the masked and unmasked MIM views are this same tensor; only the mask differs
        # (docs/METHOD.md §5.3)
        m = block_mask(self.dc.grid, *mim_counts(self.dc.grid), rng)
        return ImageView(j, x, torch.from_numpy(m), bad, rng)

    def __getitem__(self, key):
        v = self.image_and_mask(key)
        return {"image": v.image, "mim_mask": v.mim_mask, "bad": v.bad}

    def collate(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
                "mim_mask": torch.stack([s["mim_mask"] for s in samples]),  # (B, P)
                # masked patches per image (block_mask: exactly)
                "mim_count": mim_counts(self.dc.grid)[0],
                "bad": [p for s in samples for p in s["bad"]]}


def _image_ids(items):
    """Same image file -> same integer id (so a duplicate is never used as a hard negative)."""
    ids = {}
    return [ids.setdefault(it["image"], len(ids)) for it in items]


# How texts are masked for MLM: 15 %, at most 20 tokens (prob, max_predictions). How captions are
# masked: X-FM's IMLM masks half of each caption (at most 15 tokens, with "skipgram" spans);
# FLAVA's MMM masks 15 % of the tokens, BERT style (docs/METHOD.md §8.3).
# (prob, max_predictions, skipgram_prob)
TEXT_MASKING = (0.15, 20)
CAPTION_MASKING = {"xfm": (0.5, 15, 0.2), "flava": (0.15, 10 ** 6, 0.0)}


class PairDataset(ImageDataset):
    """Image-text pairs. itm_neg_prob > 0 (FLAVA): with that probability the caption is replaced by
    the caption of a random pair with another image, and itm_label says 0 (1 = the caption matches
    the image)."""

    def __init__(self, pairs, tok, dc, bad):
        super().__init__(pairs, dc, bad, kind="pair")
        self.tok, self.img_ids = tok, _image_ids(pairs)
        self.masking = CAPTION_MASKING[dc.caption_mask]

    def __getitem__(self, key):
        v = self.image_and_mask(key)
        j, rng = v.j, v.rng
        caption, match = self.items[j]["caption"], 1  # j: the caption goes with the image
        if self.dc.itm_neg_prob and rng.random() < self.dc.itm_neg_prob:
            # a random pair showing another image (10 tries: duplicates are rare)
            for _ in range(10):
                k = int(rng.integers(len(self.items)))
                if self.img_ids[k] != self.img_ids[j]:
                    caption, match = self.items[k]["caption"], 0
                    break
        ids = self.tok.encode(caption, self.dc.caption_len)
        mlm_ids, mlm_labels = mask_text(ids, self.tok, *self.masking[:2], rng,
                                        skipgram_prob=self.masking[2])
        return {"image": v.image, "mim_mask": v.mim_mask, "ids": ids, "mlm_ids": mlm_ids,
                "mlm_labels": mlm_labels, "img_id": self.img_ids[j], "itm_label": match,
                "bad": v.bad}

    def collate(self, samples):
        batch = super().collate(samples)
        T = self.dc.caption_len if self.dc.static else None
        ids = pad_seqs([s["ids"] for s in samples], self.tok.pad_id, T)  # (B, T)
        batch.update(ids=ids, att=padding_mask([s["ids"] for s in samples], ids.shape[1]),
                     mlm_ids=pad_seqs([s["mlm_ids"] for s in samples], self.tok.pad_id, T),
                     mlm_labels=pad_seqs([s["mlm_labels"] for s in samples], -100, T),
                     mlm_slots=mlm_slots(ids.shape[1], *self.masking[:2]),
                     img_id=torch.tensor([s["img_id"] for s in samples], dtype=torch.long),
                     itm_label=torch.tensor([s["itm_label"] for s in samples], dtype=torch.long))
        return batch


# the box (cx, cy, w, h) of a whole-image caption and of an empty slot
WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)


class RegionDataset(_Base):
    """One item = one image with up to dc.max_regions sampled region captions, plus its whole-image
    caption.

    Every image gets the same number of caption slots, `slots` (the most regions of any record, at
    most max_regions, plus the whole-image caption): batch shapes are fixed and equal on every rank.
    Slots an image leaves empty hold an empty caption with filled = False, and weigh 0 in every
    loss."""

    def __init__(self, records, tok, dc, bad):
        super().__init__(records, "region", dc, bad)
        self.tok, self.img_ids = tok, _image_ids(records)
        self.slots = min(dc.max_regions, max((len(r["regions"]) for r in records), default=0)) + 1

    def __getitem__(self, key):
        index, epoch = key
        rng = self.rng(epoch, index)
        j, img, bad = self.load(index)
        rec = self.items[j]
        # the steps draw from rng in this order: another order gives other samples (and other
        # resumed runs)
        pick = self.sample_regions(rec, rng)
        x, boxes = self.crop(img, rec, pick, rng)
        captions = self.pick_captions(rec, pick, boxes, rng)
        texts = [self.caption_slot(cap, box, self.patch_mask(box, is_region), is_region, rng)
                 for cap, box, is_region in captions]
        return {"image": x, "texts": self.pad_slots(texts), "img_id": self.img_ids[j], "bad": bad}

    def sample_regions(self, rec, rng):
        """-> (k,) int: k = min(max_regions, #regions) distinct indices into rec["regions"], in
        drawn order."""
        regs = rec["regions"]
        return rng.choice(len(regs), min(self.dc.max_regions, len(regs)), replace=False)

    def crop(self, img, rec, pick, rng):
        """-> (image (3, S, S), k boxes (cx, cy, w, h) normalised to the crop, or None):
        region_crop's."""
        # the crop keeps every sampled box whole, so no region is lost (no hflip: it would swap
        # left/right words)
        return region_crop(img, [rec["regions"][i]["box"] for i in pick], self.dc.image_size, rng,
                           min_scale=self.dc.crop_scale[0], uint8=self.dc.uint8_images)

    def pick_captions(self, rec, pick, boxes, rng):
        """-> [(caption, box (4,), is_region)]: one drawn caption per kept region, in pick's order,
        then one of the whole-image captions (if the record has any) with box = the whole image."""
        out = []
        for i, box in zip(pick, boxes):
            if box is None:  # cannot happen while the crop keeps every sampled box; kept as a guard
                continue
            caps = rec["regions"][i]["captions"]
            out.append((caps[rng.integers(len(caps))], box, True))
        if rec["captions"]:
            caps = rec["captions"]
            out.append((caps[rng.integers(len(caps))], WHOLE_IMAGE, False))
        return out

    def patch_mask(self, box, is_region):
        """-> (P,) bool: the patches a caption's fusion pass sees: its box's (box_patch_mask), or
        every one."""
        if is_region:
            return box_patch_mask(box, self.dc.grid)
        return np.ones(self.dc.grid ** 2, dtype=bool)

    def caption_slot(self, caption, box, patch_mask, is_region, rng):
        """-> one filled slot: ids, mlm_ids, mlm_labels (each <= caption_len; IMLM p = 0.5, <= 15),
        box (4,), is_region, patch_mask (P,), filled = True."""
        ids = self.tok.encode(caption, self.dc.caption_len)
        mlm_ids, mlm_labels = mask_text(ids, self.tok, *CAPTION_MASKING["xfm"][:2], rng)
        return {"ids": ids, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels, "box": box,
                "is_region": is_region, "patch_mask": patch_mask, "filled": True}

    def pad_slots(self, texts):
        """-> exactly self.slots slots: texts, then empty ones (<s> </s>, nothing masked, the whole
        image, every patch, filled = False)."""
        ids = self.tok.encode("", self.dc.caption_len)  # <s> </s>: an empty slot
        empty = {"ids": ids, "mlm_ids": ids, "mlm_labels": [-100] * len(ids), "box": WHOLE_IMAGE,
                 "is_region": False, "patch_mask": np.ones(self.dc.grid ** 2, dtype=bool),
                 "filled": False}
        return texts + [empty] * (self.slots - len(texts))

    def collate(self, samples):
        # flatten B_img images into N = B_img * slots captions; img_index says which image each
        # belongs to
        texts = [t for s in samples for t in s["texts"]]
        img_index = [b for b, s in enumerate(samples) for _ in s["texts"]]
        T = self.dc.caption_len if self.dc.static else None
        ids = pad_seqs([t["ids"] for t in texts], self.tok.pad_id, T)  # (N, T)
        return {"image": torch.stack([s["image"] for s in samples]),  # (B_img, 3, S, S)
                "img_index": torch.tensor(img_index, dtype=torch.long),  # (N,)
                "ids": ids, "att": padding_mask([t["ids"] for t in texts], ids.shape[1]),
                "mlm_ids": pad_seqs([t["mlm_ids"] for t in texts], self.tok.pad_id, T),
                "mlm_labels": pad_seqs([t["mlm_labels"] for t in texts], -100, T),
                "mlm_slots": mlm_slots(ids.shape[1], *CAPTION_MASKING["xfm"][:2]),
                # (N,) filled slots
                "filled": torch.tensor([t["filled"] for t in texts], dtype=torch.bool),
                # (N, 4) cx, cy, w, h
                "box": torch.tensor([t["box"] for t in texts], dtype=torch.float32),
                "is_region": torch.tensor([t["is_region"] for t in texts], dtype=torch.bool),
                # (N, P)
                "patch_mask": torch.from_numpy(np.stack([t["patch_mask"] for t in texts])),
                "img_id": torch.tensor([samples[b]["img_id"] for b in img_index], dtype=torch.long),
                "bad": [p for s in samples for p in s["bad"]]}
