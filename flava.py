"""
FLAVA, the second recipe (Singh et al. 2022, method: docs/METHOD.md §8), built from model.py's parts so that
the differences from X-FM are visible in one place. Everything FLAVA-specific is in this file: the model, the
frozen image tokenizer that makes its MIM targets, its objectives and its data-kind sampling.

                     X-FM (model.py, losses.py)                    FLAVA (this file)
    blocks           post-LN text/fusion, BEiT-v2 vision            pre-LN ViT blocks everywhere (ViTBlock)
    fusion           text queries cross-attend to the image         self-attention over [CLS_M; image; text]
    fusion input     the language encoder's output, DETACHED        both encoders' pre-final-LN states, projected
    image target     the same encoder's unmasked output (MSE)       discrete image-token ids (cross-entropy)
    masked pairs     IMLM: caption masked, image whole              MMM: image block-masked AND caption masked
    ITM negatives    hard negatives from the ITC similarities       a random other caption for 10 % of the pairs
                                                                    (swapped in by data.PairDataset)
    contrastive      256-d, temperature in [0.001, 0.5]             width-d, logit scale in [0, ln 100], only
                                                                    matched pairs are queries
    data mixing      every data kind in every step                  one data kind per update (0.70/0.15/0.15)

    python train.py --recipe=flava             # the toy world, the tiny FLAVA; same run folder as X-FM
    python finetune.py --task all --init runs/flava/ckpt.pt

What differs from the paper (said again in docs/FLAVA_RECIPE.md): FLAVA's targets come from the pre-trained DALL-E dVAE,
which nothing here downloads. The stand-in is `PatchTokenizer`: a k-means codebook fitted on the training
images' patches when the run starts (saved as RUN/image_tokenizer.pt; `--image_tokenizer=FILE` reuses one).
Each patch's id is its nearest centroid. Like the dVAE it is frozen and only makes integer targets, but its codes
describe raw pixels (colour, coarse shape), not the dVAE's learned features. The dVAE itself is `DalleCodebook`:
`--image_tokenizer=DIR` with a folder of its released weights (facebook/flava-image-codebook).
The text side has no token-type embedding and uses the project's BPE, not BERT's WordPiece.
"""
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import losses
from lib import fast_losses, runtime, transforms
from lib.transforms import CLIP_MEAN, CLIP_STD
from losses import patchify
from model import MLP, PRESETS, XFM, Attention, MLMHead, XFMConfig, additive_mask

# ---------------------------------------------------------------------------------------------------------
# Config: X-FM's fields plus FLAVA's own


@dataclass
class FLAVAConfig(XFMConfig):
    recipe: str = "flava"
    codebook_size: int = 256     # image-token vocabulary of the MIM / MMM-image heads (the DALL-E dVAE: 8192)
    itm_neg_prob: float = 0.1    # fraction of pairs whose caption is swapped for another one (ITM negatives)
    logit_scale: float = math.log(1 / 0.07)  # contrastive logit scale init, clamped to [0, ln 100]
    ln_eps: float = 1e-12        # LayerNorm eps inside the encoders
    head_ln_eps: float = 1e-5    # LayerNorm eps of the MLM / MIM / MMM heads (Hugging Face's FLAVA: 1e-12)
    # the image tokenizer: 0 = k-means PatchTokenizer; > 0 = DalleCodebook, this width (DALL-E: 256)
    codebook_width: int = 0
    codebook_blocks: int = 2     # DalleCodebook's residual blocks per group (released: 2)


# FLAVA-base: 12 + 12 layers, a 6-layer fusion encoder, 768-d contrastive projections; no dropout, no drop path
FLAVA_OVERRIDES = {"tiny": {}, "small": {}, "base": {"fusion_layers": 6, "codebook_size": 8192}}


def make_flava_config(preset="tiny", **overrides):
    """A model.PRESETS size with FLAVA's choices: projections as wide as the encoders, no dropout."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = {**PRESETS[preset], **FLAVA_OVERRIDES[preset]}
    base.update(embed_dim=base["width"], dropout=0.0, drop_path=0.0, mim_target="off")
    return FLAVAConfig(**{**base, **overrides})


def config_from_dict(d):
    """A checkpoint's model_config -> XFMConfig or FLAVAConfig (its "recipe" key says which)."""
    return FLAVAConfig(**d) if d.get("recipe") == "flava" else XFMConfig(**d)


def build_model(cfg):
    """XFM or FLAVA, whichever the config describes (a checkpoint's model_config: finetune.py,
    lib/pretrained.py; train.py builds the model of its --recipe, train.MODELS)."""
    return FLAVA(cfg) if isinstance(cfg, FLAVAConfig) else XFM(cfg)


# ---------------------------------------------------------------------------------------------------------
# The frozen image tokenizer: a stand-in for the DALL-E dVAE


class PatchTokenizer(nn.Module):
    """Image -> one id per patch: the nearest centroid of a k-means codebook over raw (normalised) patch pixels.
    Frozen: a buffer, not a parameter; no gradient ever reaches it (docs/METHOD.md §8.4)."""

    def __init__(self, codebook_size, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.register_buffer("codebook", torch.zeros(codebook_size, 3 * patch_size ** 2))  # (K, 3*p*p)

    @torch.no_grad()
    def forward(self, images):                                             # (B, 3, H, W) -> (B, P) long
        with torch.autocast(images.device.type, enabled=False):           # distances in fp32, even under AMP
            x = patchify(images.float(), self.patch_size)                  # (B, P, d)
            c = self.codebook.float()
            # squared distances ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
            d = c.pow(2).sum(-1) - 2 * x @ c.t()                           # (B, P, K)
        return d.argmin(-1)


@torch.no_grad()
def fit_codebook(patches, k, iters=25, seed=0):
    """Plain k-means (Lloyd) on patches (N, d): k-means++-style seeding on a subsample, then `iters` rounds of
    assign-and-average. An emptied cluster is re-seeded at the patch farthest from its centroid. -> (k, d)."""
    g = torch.Generator().manual_seed(seed)
    patches = patches.float()
    N = len(patches)
    if N < k:
        raise ValueError(f"{N} training patches are too few for a codebook of {k} (lower --codebook_size)")
    # seeding: each new centroid drawn with probability ~ squared distance to the nearest one so far
    sub = patches[torch.randperm(N, generator=g)[: min(N, 20 * k)]]
    centroids = [sub[torch.randint(len(sub), (1,), generator=g)].squeeze(0)]
    d2 = (sub - centroids[0]).pow(2).sum(-1)
    for _ in range(k - 1):
        i = torch.multinomial(d2 + 1e-12, 1, generator=g).item()
        centroids.append(sub[i])
        d2 = torch.minimum(d2, (sub - sub[i]).pow(2).sum(-1))
    c = torch.stack(centroids)                                             # (k, d)
    for _ in range(iters):
        assign, dist = _nearest(patches, c)
        sums = torch.zeros_like(c).index_add_(0, assign, patches)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # the farthest patches become the emptied clusters' new centroids
            c[empty] = patches[dist.topk(int(empty.sum())).indices]
    return c


def _nearest(x, c, chunk=65536):
    """Nearest centroid of every row of x, in chunks (the (N, k) distance matrix can be large)."""
    assign, dist = [], []
    for i in range(0, len(x), chunk):
        d = (x[i:i + chunk].pow(2).sum(-1, keepdim=True) - 2 * x[i:i + chunk] @ c.t() + c.pow(2).sum(-1))
        m = d.min(-1)
        assign.append(m.indices)
        dist.append(m.values)
    return torch.cat(assign), torch.cat(dist)


# ---------------------------------------------------------------------------------------------------------
# The frozen image tokenizer FLAVA was trained with: DALL-E's dVAE encoder (flava-image-codebook)


def frozen_conv(c_in, c_out, k):
    """A k x k convolution (padding k // 2 keeps the size) whose weight and bias are buffers, not
    parameters: saved with the model, moved by .to(), unseen by the optimizer, DDP and FSDP."""
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    for name in ("weight", "bias"):
        t = getattr(conv, name).detach()
        delattr(conv, name)
        conv.register_buffer(name, t)
    return conv


class DalleBlock(nn.Module):
    """x -> skip(x) + gain * res(x). res: relu-conv3x3 (to c_out / 4), relu-conv3x3, relu-conv3x3,
    relu-conv1x1 (to c_out); skip: a 1x1 conv where the width changes, else x itself."""

    def __init__(self, c_in, c_out, gain):
        super().__init__()
        hid = c_out // 4
        self.skip = frozen_conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.res = nn.ModuleList([frozen_conv(c_in, hid, 3), frozen_conv(hid, hid, 3),
                                  frozen_conv(hid, hid, 3), frozen_conv(hid, c_out, 1)])
        self.gain = gain                                                   # 1 / (all blocks)^2

    def forward(self, x):
        h = x
        for conv in self.res:
            h = conv(F.relu(h))
        return self.skip(x) + self.gain * h


class DalleCodebook(nn.Module):
    """Image -> one id per patch from DALL-E's dVAE encoder: the ids FLAVA's MIM / MMM-image heads
    were trained to predict (facebook/flava-image-codebook: width 256, 2 blocks per group, 8,192
    codes; lib/pretrained.load_dalle_codebook loads it). PatchTokenizer's interface: CLIP-normalised
    images (B, 3, S, S) -> (B, P) long, no gradient, every tensor a buffer.

        conv 7x7 (3 -> w) | group (w) | max-pool 2 | group (2w) | max-pool 2 | group (4w)
        | max-pool 2 | group (8w) | relu, conv 1x1 (-> vocabulary logits) | argmax

    A group is `blocks` DalleBlocks. Three poolings give one code per CELL x CELL input pixels, so
    the codebook reads the image resized to CELL * g pixels, g = S / patch_size the model's patch
    grid: its g x g codes, row-major, are the model's patches (FLAVA-base: 224 / 16 = 14 patches a
    side, a 112-pixel codebook input, as Hugging Face's processor makes). Its input is the image's
    pixels in [0, 1] mapped to [0.1, 0.9], DALL-E's range."""
    GROUPS, CELL, EPS = 4, 8, 0.1

    def __init__(self, codebook_size, patch_size, width=256, blocks=2):
        super().__init__()
        if patch_size < self.CELL:
            raise ValueError(f"the DALL-E codebook gives one code per {self.CELL} x {self.CELL} "
                             f"pixels; patches of {patch_size} pixels would need an enlarged image "
                             f"(patch_size >= {self.CELL})")
        self.patch_size = patch_size
        gain = 1 / (self.GROUPS * blocks) ** 2
        widths = [width * 2 ** i for i in range(self.GROUPS)]              # w, 2w, 4w, 8w
        self.input = frozen_conv(3, width, 7)
        self.groups = nn.ModuleList(
            nn.ModuleList(DalleBlock(c_in if b == 0 else c_out, c_out, gain) for b in range(blocks))
            for c_in, c_out in zip([width] + widths[:-1], widths))
        self.output = frozen_conv(widths[-1], codebook_size, 1)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def pixels(self, images):
        """CLIP-normalised (B, 3, S, S) -> codebook input (B, 3, CELL*g, CELL*g) in [0.1, 0.9].
        Resized bicubically with antialiasing (Hugging Face's processor: Lanczos on the uint8 image;
        close, not equal); an image CELL * g wide is used as it is."""
        x = images.float() * self.std + self.mean                            # [0, 1]
        side = self.CELL * (images.shape[-1] // self.patch_size)
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True,
                              align_corners=False)
        return (1 - 2 * self.EPS) * x.clamp(0, 1) + self.EPS

    def logits(self, pixels):
        """(B, 3, H, W) codebook input -> (B, vocabulary, H / CELL, W / CELL) logits."""
        x = self.input(pixels)
        for i, group in enumerate(self.groups):
            for block in group:
                x = block(x)
            if i < len(self.groups) - 1:
                x = F.max_pool2d(x, 2)
        return self.output(F.relu(x))

    @torch.no_grad()
    def forward(self, images):                                       # (B, 3, S, S) -> (B, P) long
        with torch.autocast(images.device.type, enabled=False):     # fp32 under AMP: exact codes
            return self.logits(self.pixels(images)).argmax(1).flatten(1)


def image_tokenizer(cfg):
    """The frozen image tokenizer the config names: DalleCodebook where codebook_width > 0, else
    the k-means PatchTokenizer."""
    if cfg.codebook_width:
        return DalleCodebook(cfg.codebook_size, cfg.patch_size, cfg.codebook_width,
                             cfg.codebook_blocks)
    return PatchTokenizer(cfg.codebook_size, cfg.patch_size)


# ---------------------------------------------------------------------------------------------------------
# The three encoders: pre-LN ViT blocks. Each returns its last layer's states BEFORE the final LayerNorm (the
# fusion encoder reads those); `norm` is applied by whoever reads features.


class ViTBlock(nn.Module):
    """FLAVA's layer, a plain pre-LN ViT block: no layer scale, a full qkv bias, no dropout, no drop path.
        x = x + SelfAttn(LN(x), mask);  x = x + MLP(LN(x))
    """

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.attn = Attention(D, cfg.heads, sdpa=cfg.attn_impl != "explicit")
        self.norm1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = MLP(D, cfg.mlp_ratio * D)
        self.norm2 = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """BERT-style embeddings (word + absolute position, then LayerNorm), pre-LN blocks, a final LayerNorm.
    forward(ids (B,T), att (B,T)) -> (B, T, D), pre-final-LN."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_text_len, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.text_layers)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, ids, att):
        T = ids.shape[1]
        if T > self.pos_embed.num_embeddings:
            raise ValueError(f"text of {T} tokens is longer than max_text_len {self.pos_embed.num_embeddings}")
        pos = torch.arange(T, device=ids.device)
        x = self.embed_norm(self.word_embed(ids) + self.pos_embed(pos))    # (B, T, D)
        mask = additive_mask(att)                                          # padding is never attended to
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class ImageEncoder(nn.Module):
    """ViT: conv patches, mask token (before the positions), CLS_I, learned absolute positions (zero init),
    pre-LN blocks, a final LayerNorm. forward(images, mim_mask (B,P) or None) -> (B, 1+P, D), pre-final-LN."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vision_layers)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, images, mim_mask=None):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)             # (B, P, D)
        if mim_mask is not None:
            x = torch.where(mim_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x                                                           # (B, 1+P, D): CLS_I, patches


class FusionEncoder(nn.Module):
    """Self-attention over [CLS_M; image-to-mm(image states); text-to-mm(text states)], text padding masked.
    forward(t (B,T,D), att (B,T), v (B,1+P,D), image_mask (B,1+P) or None) -> (B, 1 + 1+P + T, D) after the final
    LayerNorm. Layout: 0 = CLS_M, 1 = CLS_I, 2..1+P = patches, 2+P.. = text (CLS_T first)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.image_to_mm = nn.Linear(D, D)
        self.text_to_mm = nn.Linear(D, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.fusion_layers)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)

    def forward(self, t, att, v, image_mask=None):
        B = t.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(t.dtype), self.image_to_mm(v), self.text_to_mm(t)], 1)
        if image_mask is None:
            image_mask = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
        # the key mask covers CLS_M and the image, and hides the text padding (docs/METHOD.md §8.1)
        key_mask = torch.cat([torch.ones_like(image_mask[:, :1]), image_mask.bool(), att.bool()], dim=1)
        mask = additive_mask(key_mask)                                     # (B, 1, 1, 1 + 1+P + T)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------
# FLAVA: the encoders and every pre-training head, with the interface finetune.py and train.py use for X-FM


class FLAVA(nn.Module):
    NEW_PARAMS = ()  # FLAVA trains every parameter at the same learning rate
    NO_DECAY = ("cls_token", "mask_token", "pos_embed", "logit_scale")  # + every bias and norm (train.param_groups)

    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.text = TextEncoder(cfg)
        self.vision = ImageEncoder(cfg)
        self.fusion = FusionEncoder(cfg)
        # separate heads, none tied to the word embeddings (docs/METHOD.md §8.2)
        self.mlm_head = MLMHead(cfg)                                       # text batches
        self.mim_head = MLMHead(cfg, num_classes=cfg.codebook_size)        # image batches
        self.mmm_text_head = MLMHead(cfg)                                  # pairs: masked words from the fusion
        self.mmm_image_head = MLMHead(cfg, num_classes=cfg.codebook_size)  # pairs: masked patches from the fusion
        for head in (self.mlm_head, self.mim_head, self.mmm_text_head, self.mmm_image_head):
            head.norm.eps = cfg.head_ln_eps
        self.itm_head = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.Tanh(), nn.Linear(cfg.width, 2))  # pooler
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.vision_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale))
        self.image_tokenizer = image_tokenizer(cfg)
        self.apply(self._init_weights)  # N(0, 0.02); CLS, mask token and positions stay zero (docs/METHOD.md §8.1)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def temp(self):
        """The contrastive temperature 1 / exp(logit_scale), so losses.itc_loss serves both recipes."""
        return torch.exp(-self.logit_scale)

    def clamp_temp(self):
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(100.0))

    def encode_text(self, ids, att):
        return self.text(ids, att)                                         # (B, T, D), pre-final-LN

    def encode_image(self, images, mim_mask=None):
        return self.vision(images, mim_mask)                               # (B, 1+P, D), pre-final-LN

    def fuse(self, t, att, v, image_mask=None):
        return self.fusion(t, att, v, image_mask)                          # (B, 2+P+T, D); [:, 0] = CLS_M

    def text_cls(self, t):
        return self.text.norm(t[:, 0])                                     # (B, D) final-LN CLS_T

    def image_cls(self, v):
        return self.vision.norm(v[:, 0])                                   # (B, D) final-LN CLS_I

    def itc_features(self, t, v):
        """L2-normalised contrastive embeddings of the final-LN CLS tokens (not a pooler): (f_t, f_v)."""
        return (F.normalize(self.text_proj(self.text_cls(t)), dim=-1),
                F.normalize(self.vision_proj(self.image_cls(v)), dim=-1))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def resize_pos_embed(pos, new_grid):
    """(1, 1+g*g, D) -> (1, 1+g'*g', D): the patch positions resized bicubically, CLS_I's kept (fine-tuning at
    another image size)."""
    g = math.isqrt(pos.shape[1] - 1)
    if g == new_grid:
        return pos.clone()
    grid = pos[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)     # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_grid ** 2, -1).to(pos.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------------------
# The objectives (docs/METHOD.md §8.3). The total loss is the unweighted sum of what the batch's data kind gives.


def flava_losses(model, batch, stats=None, fast=False):
    """All FLAVA pre-training losses for a batch holding any subset of text / image / pair (docs/METHOD.md §8.3).

        text    MLM:  CE of mlm_head at the masked tokens (15 %, 80/10/10) of the text encoder's final-LN output
        image   MIM:  CE of mim_head at the block-masked patches; targets = the frozen tokenizer's ids
        pair    GC:   global contrastive loss on the UNMASKED image and text, matched pairs as queries
                MMM:  ONE fusion pass over the masked image + masked caption; mmm_image_head predicts the patch
                      ids at fusion positions 2..1+P, mmm_text_head the words at the text positions (matched pairs)
                ITM:  CE of itm_head(CLS_M) of that same pass, label 1 = matched, 0 = swapped caption
    The pair batch's itm_label (B,) marks the ITM negatives: data.PairDataset replaced their caption by the
    caption of a random pair with another image (probability cfg.itm_neg_prob); without it every pair matches.
    No stop-gradient: every pair loss reaches both encoders. stats receives nothing here (kept for the interface).
    fast: the same losses through lib/fast_losses.py (each masked CE on the batch's fixed number of slots).
    """
    out, P = {}, model.cfg.num_patches
    if fast:
        itc_loss = fast_losses.itc_loss
        mlm_loss = fast_losses.mlm_loss                                   # (h, labels, head, slots)
    else:
        itc_loss = losses.itc_loss
        def mlm_loss(h, labels, head, slots):                             # noqa: E306 (slots: the fast path's)
            return losses.mlm_loss(h, labels, head)
    if "text" in batch:
        b = batch["text"]
        h = model.text.norm(model.encode_text(b["ids"], b["att"]))         # (B, T, D) final-LN
        out["mlm"] = mlm_loss(h, b["labels"], model.mlm_head, b.get("mlm_slots"))

    if "image" in batch:
        b = batch["image"]
        codes = model.image_tokenizer(b["image"])                          # (B, P), no graph
        h = model.vision.norm(model.encode_image(b["image"], b["mim_mask"])[:, 1:])  # (B, P, D), CLS_I excluded
        out["mim"] = mlm_loss(h, codes.masked_fill(~b["mim_mask"], -100), model.mim_head, b.get("mim_count"))

    if "pair" in batch:
        model.clamp_temp()
        b = batch["pair"]
        itm_labels = b.get("itm_label", torch.ones_like(b["img_id"]))     # (B,) 1 = match, 0 = swapped caption
        matched = itm_labels.bool()
        matched = matched | ~matched.any()  # no matched pair in the batch: every row serves (both public implementations)
        # GC: unmasked passes; swapped captions are not queries but stay among the keys
        t, v = model.encode_text(b["ids"], b["att"]), model.encode_image(b["image"])
        f_t, f_v = model.itc_features(t, v)
        out["gc"] = itc_loss(f_v, f_t, model.temp, queries=matched)
        # MMM + ITM: one fusion pass over the masked pair
        t_m = model.encode_text(b["mlm_ids"], b["att"])                    # (B, T, D)
        v_m = model.encode_image(b["image"], b["mim_mask"])                # (B, 1+P, D)
        h = model.fuse(t_m, b["att"], v_m)                                 # (B, 2+P+T, D)
        out["itm"] = F.cross_entropy(model.itm_head(h[:, 0]).float(), itm_labels)
        codes = model.image_tokenizer(b["image"])                          # (B, P)
        img_labels = codes.masked_fill(~b["mim_mask"] | ~matched[:, None], -100)   # masked patches of matched pairs
        txt_labels = b["mlm_labels"].masked_fill(~matched[:, None], -100)
        out["mmm_image"] = mlm_loss(h[:, 2:2 + P], img_labels, model.mmm_image_head, b.get("mim_count"))
        out["mmm_text"] = mlm_loss(h[:, 2 + P:], txt_labels, model.mmm_text_head, b.get("mlm_slots"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Data mixing: one data kind per update


def sample_kind(ratios, seed, step, update):
    """The data kind of one update, drawn with probabilities `ratios` {kind: weight} (FLAVA: pairs 0.70,
    images 0.15, text 0.15). The draw depends only on (seed, step, update), so every rank makes the same choice
    without a broadcast (a rank running another kind would deadlock the all-gather) and a resumed run
    continues the same sequence."""
    kinds = sorted(ratios)
    p = np.array([ratios[k] for k in kinds], dtype=float)
    return kinds[np.random.default_rng([seed, step, update]).choice(len(kinds), p=p / p.sum())]


def parse_ratios(text, available):
    """'0.70,0.15,0.15' (pair, image, text) -> {kind: weight} over the kinds the data has."""
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        w = []
    if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"--flava_ratios takes three weights pair,image,text like 0.70,0.15,0.15, not {text!r}")
    ratios = {k: x for k, x in zip(("pair", "image", "text"), w) if x > 0 and k in available}
    if "pair" not in ratios:
        raise ValueError("FLAVA needs image-text pairs (a pairs file in --data_dir and a weight above 0)")
    return ratios


def fit_image_tokenizer(model, dataset, n_images=2000, seed=0, progress=None):
    """Fit model.image_tokenizer's codebook on the patches of up to n_images training images (the dataset's own
    augmented views, epoch 0). -> the number of patches used."""
    idx = np.random.default_rng(seed).permutation(len(dataset))[:n_images]
    images = []
    for i in (progress(idx) if progress else idx):
        x = dataset[(int(i), 0)]["image"]
        images.append(transforms.normalize(x) if x.dtype == torch.uint8 else x)   # (uint8 on CUDA runs)
    patches = patchify(torch.stack(images), model.cfg.patch_size).flatten(0, 1)   # (n * P, 3*p*p)
    model.image_tokenizer.codebook.copy_(fit_codebook(patches, model.cfg.codebook_size, seed=seed))
    return len(patches)


# ---------------------------------------------------------------------------------------------------------
# FLAVA's part of a train.py run (train.py --recipe=flava)

XFM_ONLY_KEYS = ("stop_grad", "mim_target", "schedule", "init_text", "init_vision", "lr_mult")
RUN_DEFAULTS = {"weight_decay": 0.1, "beta2": 0.999}  # AdamW as in the FLAVA paper (docs/METHOD.md §8.5)
DATA_KINDS = ("text", "pair", "image")  # no region objective; pairs masked 15 %, BERT style


def run_settings(cfg, given, fresh):
    """A FLAVA run's config (cfg: train.TrainConfig; given: the keys the command line set): an X-FM key given is
    refused rather than silently ignored; a fresh run takes RUN_DEFAULTS where the command line says nothing."""
    refused = [k for k in XFM_ONLY_KEYS if k in given]
    if refused:
        raise SystemExit(f"error: --{refused[0]} belongs to the xfm recipe; flava has no such option")
    if "codebook_size" in given and os.path.isdir(cfg.image_tokenizer):
        raise SystemExit(f"error: --codebook_size is the vocab_size of the codebook in "
                         f"{cfg.image_tokenizer}; leave it out")
    return replace(cfg, **{k: v for k, v in RUN_DEFAULTS.items() if k not in given}) if fresh else cfg


def run_config(cfg, tok):
    """The model config of a train.py run (cfg: train.TrainConfig). The image tokenizer: with
    --image_tokenizer=DIR (a FlavaImageCodebook folder) a DalleCodebook of that folder's sizes;
    with a .pt file or none, the k-means PatchTokenizer of --codebook_size codes."""
    tokenizer = {"codebook_size": cfg.codebook_size}
    if os.path.isdir(cfg.image_tokenizer):
        from lib import pretrained  # here, not at the top: lib/pretrained.py imports this file
        tokenizer = pretrained.dalle_config(cfg.image_tokenizer)
    model_cfg = make_flava_config(cfg.config, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                  attn_impl=cfg.attn_impl, **tokenizer,
                                  max_text_len=max(cfg.caption_len, cfg.text_len))
    if model_cfg.codebook_width and model_cfg.patch_size < DalleCodebook.CELL:
        raise SystemExit(f"error: the DALL-E codebook gives one code per {DalleCodebook.CELL} x "
                         f"{DalleCodebook.CELL} pixels; this model's patches are "
                         f"{model_cfg.patch_size} pixels")
    return model_cfg


def run_ratios(cfg, streams):
    """--flava_ratios as {kind: weight} over the kinds the run has (parse_ratios); a bad value stops the run."""
    try:
        return parse_ratios(cfg.flava_ratios, streams)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def step_updates(ratios, seed, step):
    """The data kinds of each of a step's three updates: one kind per update, drawn with ratios (the same on every
    rank: sample_kind)."""
    return [(sample_kind(ratios, seed, step, u),) for u in range(3)]


def prepare_run(cfg, model, streams, ddp, rank, save):
    """Give the model its frozen image tokenizer (the codebook that makes the MIM / MMM targets):
    the DALL-E codebook of the folder --image_tokenizer=DIR, the k-means codebook of the file
    --image_tokenizer=FILE, or one fitted on the training pairs and saved as RUN/image_tokenizer.pt.
    Rank 0 makes it and hands every rank its result (runtime.rank0_shares); `save(obj, path)` writes
    atomically (runlog.atomic_save)."""
    progress = lambda x: tqdm(x, desc="image tokenizer", leave=False, disable=rank != 0)  # noqa: E731

    def share(fn):
        return runtime.rank0_shares(fn, ddp, rank)

    def dalle():  # rank 0 reads the folder into a codebook of its own; every rank copies it
        from lib import pretrained  # here, not at the top: lib/pretrained.py imports this file
        book = image_tokenizer(model.cfg)
        report = pretrained.load_dalle_codebook(book, cfg.image_tokenizer)
        print(f"image tokenizer: the DALL-E codebook, {report}", flush=True)
        return book.state_dict()

    if os.path.isdir(cfg.image_tokenizer):  # run_config built a DalleCodebook
        model.image_tokenizer.load_state_dict(share(dalle))
        return

    def codebook():
        if cfg.image_tokenizer:
            book = torch.load(cfg.image_tokenizer, map_location="cpu", weights_only=True)["codebook"]
            if tuple(book.shape) != tuple(model.image_tokenizer.codebook.shape):
                raise SystemExit(f"error: {cfg.image_tokenizer} holds a codebook of shape {tuple(book.shape)}; this "
                                 f"model needs {tuple(model.image_tokenizer.codebook.shape)} (--codebook_size, patch size)")
            return book
        n = fit_image_tokenizer(model, streams["pair"].dataset, seed=cfg.seed, progress=progress)
        path = os.path.join(cfg.out_dir, "image_tokenizer.pt")
        save({"codebook": model.image_tokenizer.codebook, "patch_size": model.cfg.patch_size}, path)
        print(f"image tokenizer: k-means codebook of {model.cfg.codebook_size} fitted on {n} patches -> {path}",
              flush=True)
        return model.image_tokenizer.codebook
    model.image_tokenizer.codebook.copy_(share(codebook))


if __name__ == "__main__":
    for name in PRESETS:
        model = FLAVA(make_flava_config(name, vocab_size=PRESETS[name].get("vocab_size", 4096)))
        parts = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in ("text", "vision", "fusion")}
        print(f"{name:6s} {model.num_params() / 1e6:8.2f}M  (text {parts['text'] / 1e6:.2f}M, "
              f"image {parts['vision'] / 1e6:.2f}M, fusion {parts['fusion'] / 1e6:.2f}M, "
              f"heads {(model.num_params() - sum(parts.values())) / 1e6:.2f}M)")
