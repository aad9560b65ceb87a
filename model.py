"""
The X-FM model: a language encoder, a vision encoder and a fusion encoder, written by hand.

    language encoder  E_t  RoBERTa style: word + learned position embeddings, post-LN blocks,
                           MLM head
    vision encoder    E_v  BEiT-v2 style: conv patches, CLS, mask token, pre-LN blocks with layer
                           scale, drop path and a relative position bias in every block; output
                           v = [mean of LayerNormed patches, LayerNormed patches]  (B, 1+P, D)
    fusion encoder    F    post-LN blocks: self-attention over text, cross-attention from text
                           (queries) to image tokens (keys/values), FFN; input = the language
                           encoder's states
    heads                  ITC projections + temperature, ITM head, box head, the fusion encoder's
                           MLM head

This file holds only the modules and their forward passes. The objectives (and the stop-gradient
that is X-FM's first idea) live in losses.py; the training loop in train.py. The method:
docs/METHOD.md §1.
FLAVA (flava.py) builds its encoders from the same Attention, MLP and MLMHead.

Try it:  python model.py            (prints the parameter count of every preset)
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class XFMConfig:
    vocab_size: int = 4096       # set from the tokenizer by train.py
    pad_id: int = 1              # RoBERTa: <s>=0 <pad>=1 </s>=2 <unk>=3
    max_text_len: int = 64       # longest text the position table covers (RoBERTa-base: 512)
    width: int = 128             # hidden size of all three encoders (X-FM base: 768 everywhere)
    heads: int = 4
    mlp_ratio: int = 4
    text_layers: int = 2
    vision_layers: int = 2
    fusion_layers: int = 2
    image_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64          # ITC projection size (X-FM: 256)
    dropout: float = 0.1         # RoBERTa stacks (language and fusion encoders)
    drop_path: float = 0.1       # ViT stochastic depth, linearly increasing over the blocks
    layer_scale: float = 0.1     # BEiT-v2 layer-scale init (gamma_1, gamma_2)
    temp: float = 0.07           # ITC temperature init, clamped to [0.001, 0.5]
    mim_target: str = "vl"       # vl (X-FM) | pixel (MAE-style, adds a pixel head) | off
    # sdpa | explicit (the softmax written out) | auto: SDPA here; runtime.choose_attention (lib/)
    # picks per device
    attn_impl: str = "auto"

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2


PRESETS = {
    # unit tests, CI: seconds on a CPU (docs/METHOD.md §11)
    "tiny": dict(width=128, heads=4, text_layers=2, vision_layers=2, fusion_layers=2,
                 image_size=32, patch_size=8, embed_dim=64, max_text_len=64),
    # CPU smoke runs that learn something
    "small": dict(width=256, heads=4, text_layers=4, vision_layers=4, fusion_layers=2,
                  image_size=64, patch_size=8, embed_dim=128, max_text_len=128),
    # the paper's size: RoBERTa-base + BEiT-v2 ViT-B/16 + 12 fusion layers
    "base": dict(width=768, heads=12, text_layers=12, vision_layers=12, fusion_layers=12,
                 image_size=224, patch_size=16, embed_dim=256, max_text_len=512, vocab_size=50265),
}


def make_config(preset="tiny", **overrides):
    """A preset from PRESETS with field overrides, e.g. make_config("small", vocab_size=2000)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    bad = set(overrides) - {f.name for f in fields(XFMConfig)}
    if bad:
        raise ValueError(f"unknown XFMConfig fields {sorted(bad)}")
    return XFMConfig(**{**PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------------------
# Building blocks: attention, MLP, drop path, relative position bias, Block


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias for a g x g patch grid plus a CLS token.

    The table holds one bias per head for every relative offset (dy, dx) in [-(g-1), g-1]^2, i.e.
    (2g-1)^2 entries, plus 3 extra entries for cls->token, token->cls and cls->cls. `index[i, j]`
    says which entry the pair (query i, key j) uses, for the N = g*g + 1 tokens [CLS, patches].
    forward() -> the bias (nh, N, N).
    """

    def __init__(self, grid, heads):
        super().__init__()
        self.num_distances = (2 * grid - 1) ** 2 + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, heads))  # ((2g-1)^2 + 3, nh)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])               # (2, P)
        rel = coords[:, :, None] - coords[:, None, :]          # (2, P, P) offsets query - key
        rel = rel.permute(1, 2, 0) + (grid - 1)                # (P, P, 2), each in [0, 2g-2]
        patch_index = rel[..., 0] * (2 * grid - 1) + rel[..., 1]  # (P, P) row-major offset id
        index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
        index[1:, 1:] = patch_index
        index[0, :] = self.num_distances - 3                               # cls -> token
        index[:, 0] = self.num_distances - 2                               # token -> cls
        index[0, 0] = self.num_distances - 1                               # cls -> cls
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1).contiguous()      # (N, N, nh) -> (nh, N, N)


def additive_mask(key_mask):
    """key_mask (B, S), nonzero for keys that may be attended to (0 = padding / outside a region) ->
    the additive mask (B, 1, 1, S): 0 there, -inf elsewhere. An encoder builds it once per pass and
    hands it to every layer."""
    mask = torch.zeros(key_mask.shape, device=key_mask.device)
    return mask.masked_fill_(key_mask == 0, float("-inf"))[:, None, None]


class Attention(nn.Module):
    """Multi-head attention, as self-attention (kv=None) or cross-attention (kv = other tokens).

    mask: additive, broadcastable to (B, nh, N, S), or None: additive_mask() of a key mask, or the
          relative position bias (nh, N, S) of a BEiT block.
    beit_bias: BEiT's qkv has biases on q and v only (k has none); RoBERTa has all three.
    sdpa: F.scaled_dot_product_attention, or (False) the same computation written out (see forward).
    index (B,S): keys from a pool kv (M,D), each token projected once; row b sees kv[index[b]]
    """

    def __init__(self, dim, heads, cross=False, beit_bias=False, attn_drop=0.0, proj_drop=0.0,
                 sdpa=True):
        super().__init__()
        assert dim % heads == 0, "width must be divisible by heads"
        self.heads, self.head_dim, self.cross, self.sdpa = heads, dim // heads, cross, sdpa
        self.attn_drop = attn_drop
        if cross:  # queries from the text, keys and values from the image
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        elif beit_bias:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            # fixed zeros, made once
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.beit_bias = beit_bias and not cross
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x):
        B, N, _ = x.shape
        return x.view(B, N, self.heads, self.head_dim).transpose(1, 2)     # (B, nh, N, hs)

    def forward(self, x, kv=None, mask=None, index=None):
        B, N, C = x.shape
        if self.cross:
            q, kv = self.q(x), self.kv(kv)
            k, v = (kv if index is None else kv[index]).chunk(2, dim=-1)
        else:  # BEiT: k gets a fixed zero bias
            bias = self.qkv.bias
            if self.beit_bias:
                bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])
            q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, nh, N|S, hs)
        mask = None if mask is None else mask.to(q.dtype)  # a copy only under autocast
        drop = self.attn_drop if self.training else 0.0
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:  # the same computation written out: softmax(q k^T / sqrt(hs) + mask) v
            att, scale = q @ k.transpose(-2, -1), 1 / math.sqrt(self.head_dim)  # (B, nh, N, S)
            # mask + scale * att: one op
            att = att.mul_(scale) if mask is None else torch.add(mask, att, alpha=scale)
            att = F.dropout(att.softmax(dim=-1), p=drop, training=self.training)
            y = att @ v                                                     # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(B, N, C)                              # (B, N, C)
        return self.proj_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch of a random subset of samples (p: see Block)."""
    if not training or (isinstance(p, float) and p == 0.0):
        return x
    # 0 or 1/(1-p)
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p).div_(1 - p)
    return x * keep


class Block(nn.Module):
    """One transformer layer in one of the two flavours X-FM's encoders need.

    post-LN (RoBERTa; language and fusion encoders):
        x = LN(x + SelfAttn(x));  [cross=True: x = LN(x + CrossAttn(x, image))];
        x = LN(x + MLP(x))
    pre-LN (BEiT-v2; vision encoder), layer scale g1, g2, a q and v bias (no k bias), drop path:
        x = x + DropPath(g1 * SelfAttn(LN(x), mask=rel_pos bias));
        x = x + DropPath(g2 * MLP(LN(x)))
    forward's mask / image_mask: the additive masks of the self- / cross-attention, which the
    encoder builds once per pass (additive_mask() of the padding or the region). A BEiT block adds
    its own rel_pos bias (a bias handed down as mask takes its place:
    lib/runtime.stack_position_biases gathers every block's at once).
    """

    def __init__(self, cfg, pre_norm=False, cross=False, drop_path=0.0, rel_pos_grid=None):
        super().__init__()
        D, eps = cfg.width, 1e-6 if pre_norm else 1e-5
        # BEiT-v2 pre-training uses no dropout, only drop path
        drop = 0.0 if pre_norm else cfg.dropout
        self.pre_norm, self.drop_path = pre_norm, drop_path
        kw = dict(attn_drop=drop, proj_drop=drop, sdpa=cfg.attn_impl != "explicit")
        self.attn = Attention(D, cfg.heads, beit_bias=pre_norm, **kw)
        self.norm1 = nn.LayerNorm(D, eps=eps)
        if cross:
            self.cross_attn = Attention(D, cfg.heads, cross=True, **kw)
            self.norm_cross = nn.LayerNorm(D, eps=eps)
        self.mlp = MLP(D, cfg.mlp_ratio * D, drop=drop)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        if pre_norm:  # BEiT's layer scale: each residual branch starts scaled down by layer_scale
            self.gamma_1 = nn.Parameter(cfg.layer_scale * torch.ones(D))
            self.gamma_2 = nn.Parameter(cfg.layer_scale * torch.ones(D))
        self.rel_pos = RelativePositionBias(rel_pos_grid, cfg.heads) if rel_pos_grid else None

    def forward(self, x, mask=None, image=None, image_mask=None, image_index=None):
        if self.rel_pos is not None and mask is None:  # BEiT: each block adds its own position bias
            mask = self.rel_pos()                                          # (nh, N, N)
        if self.pre_norm:
            # eager: the float (no draw at rate 0); compiled: the tensor runtime.compile_blocks gave
            compiled = torch.compiler.is_compiling() and hasattr(self, "drop_rate")
            p = self.drop_rate if compiled else self.drop_path
            a = self.gamma_1 * self.attn(self.norm1(x), mask=mask)
            x = x + drop_path(a, p, self.training)
            m = self.gamma_2 * self.mlp(self.norm2(x))
            return x + drop_path(m, p, self.training)
        x = self.norm1(x + self.attn(x, mask=mask))
        if image is not None:  # text queries attend to image keys/values; the image is not updated
            x = self.norm_cross(x + self.cross_attn(x, kv=image, mask=image_mask, index=image_index))
        return self.norm2(x + self.mlp(x))


def build_mlp(d, out):
    """The official heads' MLP: Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, out)."""
    return nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, out))


class MLMHead(nn.Module):
    """RoBERTa's LM head: dense -> GELU -> LayerNorm -> decoder to the vocabulary (+ bias)."""

    def __init__(self, cfg, tied_embedding=None, num_classes=None):
        super().__init__()
        # FLAVA's MIM heads predict image-token ids instead
        num_classes = num_classes or cfg.vocab_size
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-5)
        self.decoder = nn.Linear(cfg.width, num_classes, bias=False)
        if tied_embedding is not None:  # RoBERTa ties the decoder to the input word embeddings
            self.decoder.weight = tied_embedding.weight
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, h):                                                  # (..., D) -> (..., V)
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias


# --------------------------------------------------------------------------------------------------
# The three encoders


class TextEncoder(nn.Module):
    """RoBERTa-style language encoder. forward(ids (B,T), att (B,T)) -> hidden states t (B, T, D).

    RoBERTa's positions start after the padding index: real token i gets position pad_id + 1 + i and
    padding gets pad_id, so the position table has max_text_len + pad_id + 1 rows (514 for
    RoBERTa-base).
    """

    def __init__(self, cfg):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_text_len + cfg.pad_id + 1, cfg.width,
                                      padding_idx=cfg.pad_id)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-5)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.text_layers)])

    def forward(self, ids, att):
        # the largest position id is at most T + pad_id: checked on the shape, so the GPU never
        # waits for the CPU
        if ids.shape[1] + self.pad_id >= self.pos_embed.num_embeddings:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than max_text_len "
                             f"{self.pos_embed.num_embeddings - self.pad_id - 1}")
        not_pad = (ids != self.pad_id).long()
        pos = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id  # (B, T) RoBERTa position ids
        x = self.drop(self.norm(self.word_embed(ids) + self.pos_embed(pos)))  # (B, T, D)
        mask = additive_mask(att)                                           # (B, 1, 1, T)
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class VisionEncoder(nn.Module):
    """BEiT-v2 ViT. forward(images (B,3,H,W), mim_mask (B,P) bool or None) -> v (B, 1+P, D).

    v[:, 0] is the mean of the LayerNormed patch outputs (the image "[CLS]" of X-FM); the ViT's own
    CLS output is dropped (docs/METHOD.md §1.2). With mim_mask, masked patch embeddings are
    replaced by mask_token.
    """

    def __init__(self, cfg):
        super().__init__()
        D, g = cfg.width, cfg.grid
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        dpr = [cfg.drop_path * i / max(cfg.vision_layers - 1, 1) for i in range(cfg.vision_layers)]
        self.blocks = nn.ModuleList([Block(cfg, pre_norm=True, drop_path=dpr[i], rel_pos_grid=g)
                                     for i in range(cfg.vision_layers)])
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)

    def forward(self, images, mim_mask=None):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)             # (B, P, D)
        # swap in the learnable mask token, before CLS and any position handling
        if mim_mask is not None:
            x = torch.where(mim_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)                                      # (B, 1+P, D)
        for blk in self.blocks:
            x = blk(x)                                  # each with its own position bias
        patches = self.fc_norm(x[:, 1:])                # (B, P, D), the CLS output is dropped
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)  # (B, 1+P, D)


class FusionEncoder(nn.Module):
    """Text queries cross-attend to image tokens in every layer. It has no embedding layer of its
    own: its input is the language encoder's hidden states (detached in pre-training: see
    losses.py).

    forward(t (B,T,D), att (B,T), image (B,S,D), image_mask (B,S) or None[, image_index (B,S)])
        -> text-side states (B, T, D); with image_index, image is a pool of tokens (Attention)
    """

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg, cross=True) for _ in range(cfg.fusion_layers)])

    def forward(self, t, att, image, image_mask=None, image_index=None):
        x, mask = t, additive_mask(att)                                     # (B, 1, 1, T)
        image_mask = None if image_mask is None else additive_mask(image_mask)  # (B, 1, 1, S)
        for blk in self.blocks:
            x = blk(x, mask, image, image_mask, image_index)
        return x


# --------------------------------------------------------------------------------------------------
# X-FM


class XFM(nn.Module):
    """The three encoders and every pre-training head. Losses are computed in losses.py."""

    # parameters that train at 2x the base learning rate (the official `lr_mult: 2` set,
    # docs/METHOD.md §6.1)
    NEW_PARAMS = ("text_proj", "vision_proj", "temp", "itm_head", "bbox_head")

    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size "
                             f"{cfg.patch_size}")
        if cfg.mim_target not in ("vl", "pixel", "off"):
            raise ValueError(f"mim_target must be vl, pixel or off, not {cfg.mim_target!r}")
        self.cfg = cfg
        self.text = TextEncoder(cfg)
        self.vision = VisionEncoder(cfg)
        self.fusion = FusionEncoder(cfg)
        self.text_mlm = MLMHead(cfg, tied_embedding=self.text.word_embed)  # MLM on text
        self.fusion_mlm = MLMHead(cfg)                          # IMLM (untied, random init)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim)               # ITC
        self.vision_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = build_mlp(cfg.width, 2)                            # ITM: [no match, match]
        self.bbox_head = build_mlp(cfg.width, 4)                # BBP: (cx, cy, w, h) after sigmoid
        if cfg.mim_target == "pixel":  # MAE-style baseline: regress normalized pixels of each patch
            self.pixel_head = nn.Linear(cfg.width, 3 * cfg.patch_size ** 2)
        self.apply(self._init_weights)
        self._init_vision()

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def _init_vision(self):
        v = self.vision
        nn.init.trunc_normal_(v.cls_token, std=0.02)
        nn.init.trunc_normal_(v.mask_token, std=0.02)
        # BEiT rescales each residual projection by 1/sqrt(2 * layer id)
        for i, blk in enumerate(v.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    # --- the pieces losses.py and finetune.py put together ---

    def encode_text(self, ids, att):
        return self.text(ids, att)                                         # (B, T, D)

    def encode_image(self, images, mim_mask=None):
        return self.vision(images, mim_mask)                               # (B, 1+P, D)

    def fuse(self, t, att, image, image_mask=None, image_index=None):
        return self.fusion(t, att, image, image_mask, image_index)         # (B, T, D)

    def text_cls(self, t):
        return t[:, 0]                        # (B, D) <s>: the encoder ends in a LayerNorm

    def image_cls(self, v):
        return v[:, 0]                        # (B, D) the mean-pooled image "[CLS]"

    def itc_features(self, t, v):
        """L2-normalised ITC embeddings of the text [CLS] t[:, 0] and the image [CLS] v[:, 0]."""
        f_t = F.normalize(self.text_proj(t[:, 0]), dim=-1)                 # (B, E)
        f_v = F.normalize(self.vision_proj(v[:, 0]), dim=-1)               # (B, E)
        return f_t, f_v

    def clamp_temp(self):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    @staticmethod
    def region_view(v, img_index, patch_mask):
        """X-VLM's region mode: for caption n about a box in image img_index[n], slot 0 becomes the
        mean of the patches inside the box, and the returned mask limits cross-attention to slot 0 +
        those patches.

        v (B_img, 1+P, D), img_index (N,), patch_mask (N, P) bool
            -> (v_r (N, 1+P, D), mask (N, 1+P) bool)
        """
        v_n = v[img_index]                                                 # (N, 1+P, D)
        m = patch_mask.to(v.dtype).unsqueeze(-1)                           # (N, P, 1)
        # (N, 1, D)
        slot0 = (v_n[:, 1:] * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        v_r = torch.cat([slot0, v_n[:, 1:]], dim=1)
        mask = torch.cat([torch.ones_like(patch_mask[:, :1]), patch_mask], dim=1).bool()
        return v_r, mask

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


if __name__ == "__main__":
    for name in PRESETS:
        model = XFM(make_config(name))
        parts = {k: sum(p.numel() for p in getattr(model, k).parameters())
                 for k in ("text", "vision", "fusion")}
        print(f"{name:6s} {model.num_params() / 1e6:8.2f}M  (language {parts['text'] / 1e6:.2f}M, "
              f"vision {parts['vision'] / 1e6:.2f}M, fusion {parts['fusion'] / 1e6:.2f}M, "
              f"heads {(model.num_params() - sum(parts.values())) / 1e6:.2f}M)")
