"""
Image transforms in Pillow and numpy (no torchvision): CLIP normalisation, torchvision's random
resized crop with an optional flip, and the plain resize of evaluation and fine-tuning. data.py's
datasets, finetune.py's tasks and lib/retrieval.py use them.

Pre-training's augmentation: random resized crop (scale data.DataConfig.crop_scale) + optional horizontal
flip + bicubic resize + CLIP normalisation; no RandAugment (our choice). The toy world's captions name
positions and left/right relations, so for it pass hflip=False (a flip would make "left of" false) and a
mild crop_scale such as (0.8, 1.0), or (1.0, 1.0) for no crop at all: a crop moves shapes, so "at the
top" can become false.

    python -m pytest tests/test_data.py -q -k "crop or transform"
"""
import math

import numpy as np
import torch
from PIL import Image

from lib import formats

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)



def to_tensor(img):
    """PIL RGB (H, W) -> CLIP-normalised float tensor (3, H, W)."""
    x = (np.asarray(img, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# CLIP normalisation as a table: CLIP_TABLE[c, v] = (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c], the very float32
# values to_tensor computes (tests/test_data.py compares all 3 x 256), so a uint8 image normalised with it on
# its device equals to_tensor's bit for bit
CLIP_TABLE = torch.from_numpy((np.arange(256, dtype=np.float32)[None, :] / 255.0 - CLIP_MEAN[:, None])
                              / CLIP_STD[:, None])                         # (3, 256)


def to_uint8(img):
    """PIL RGB (H, W) -> uint8 tensor (3, H, W): the pixels as they are, a quarter of to_tensor's bytes
    (data.DataConfig.uint8_images: what a DataLoader worker sends; normalize() on the device)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(x):
    """uint8 images (..., 3, H, W), on any device -> to_tensor's float32 values, by looking up CLIP_TABLE."""
    table = CLIP_TABLE.to(x.device, non_blocking=True)
    return table[torch.arange(3, device=x.device).view(3, 1, 1), x.long()]


def crop_draft(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """formats.load_image's draft for random_resized_crop(img, size, scale=scale, ratio=ratio): every crop it
    can draw keeps at least `size` pixels on its shorter side in the decoded image, so the resize to size x size
    loses nothing a full decode would give. The shortest side of a crop is that of the smallest one (area
    scale[0] of the image, the most elongated ratio r = min(ratio[0], 1 / ratio[1])): sqrt(scale[0] * W * H * r),
    or of the image itself (the fallback, central crop): min(W, H). A decode at a fraction
    f >= size / (that side) of the full resolution keeps it."""
    r = min(ratio[0], 1 / ratio[1])

    def need(W, H):
        f = min(1.0, size / min(math.sqrt(scale[0] * W * H * r), W, H))
        return math.ceil(W * f), math.ceil(H * f)
    return need


def random_resized_crop(img, size, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, uint8=False):
    """torchvision's RandomResizedCrop (bicubic) + optional horizontal flip (p 0.5) + normalise
    -> (3, size, size); uint8: the pixels unnormalised (to_uint8). scale=(1, 1) means no crop at all."""
    W, H = img.size
    box = (0, 0, W, H) if scale[0] >= 1 else None
    for _ in range(10 if box is None else 0):
        area = W * H * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < w <= W and 0 < h <= H:
            x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    # fallback as in torchvision: the largest central crop with an allowed aspect ratio
    if box is None:
        if W / H < ratio[0]:
            w, h = W, int(round(W / ratio[0]))
        elif W / H > ratio[1]:
            w, h = int(round(H * ratio[1])), H
        else:
            w, h = W, H
        box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)  # crop and resize in one call
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_uint8(out) if uint8 else to_tensor(out)


def eval_transform(img, size):
    """Plain bicubic resize to size x size + normalise -> (3, size, size)."""
    return to_tensor(img.resize((size, size), Image.Resampling.BICUBIC))


def task_image(path, size):
    """Every fine-tuning task's image (finetune.py): bicubic resize + CLIP normalisation ->
    (3, S, S). No crop or flip: the toy world's questions name positions (for real image
    classification, add random_resized_crop)."""
    return eval_transform(formats.load_image(path), size)
