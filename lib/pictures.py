"""
Pictures, drawn with Pillow (no plotting library): the loss curves of a run (train.py writes
RUN/loss_curves.png; tools/curves.py adds reference bands and chance levels), the fusion encoder's attention from
each word to the image (finetune.py --task attention) and a sheet of retrieval examples (finetune.py --task
retrieval).
"""
import math
import textwrap

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lib import formats
from lib import transforms


def plot_curves(records, path, chance=None, bands=None, cols=4, w=300, h=200):
    """One small panel per loss (blue), with optional chance levels (dashed red) and reference bands
    {name: (steps, lo, hi)} (grey). Pillow only, so no plotting library is needed."""
    from PIL import Image, ImageDraw
    chance, bands = chance or {}, bands or {}
    names = sorted({k[5:] for r in records for k in r if k.startswith("loss/")} | set(bands))
    if not names:
        return
    rows = math.ceil(len(names) / cols)
    img = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        pts = [(r["step"], r[f"loss/{name}"]) for r in records if f"loss/{name}" in r]
        band = bands.get(name)
        x0, y0 = (i % cols) * w, (i // cols) * h
        left, top, right, bottom = x0 + 45, y0 + 22, x0 + w - 10, y0 + h - 22
        draw.rectangle([left, top, right, bottom], outline="gray")
        draw.text((x0 + 45, y0 + 5), name, fill="black")
        xs = [p[0] for p in pts] + (list(band[0]) if band else [])
        ys = [p[1] for p in pts] + (list(band[2]) if band else []) + ([chance[name]] if name in chance else [])
        if not xs:
            continue
        xmin, xmax, ymin, ymax = min(xs), max(xs), min(0.0, min(ys)), max(ys) or 1.0
        sx = lambda x: left + (x - xmin) / max(xmax - xmin, 1) * (right - left)
        sy = lambda y: bottom - (y - ymin) / max(ymax - ymin, 1e-9) * (bottom - top)
        if band:  # the reference band as a grey polygon
            steps, lo, hi = band
            draw.polygon([(sx(x), sy(y)) for x, y in zip(steps, hi)] + [(sx(x), sy(y)) for x, y in zip(steps[::-1], lo[::-1])],
                         fill=(225, 225, 225))
        if name in chance:  # dashed line at the chance level
            y = sy(chance[name])
            for x in range(int(left), int(right), 8):
                draw.line([(x, y), (min(x + 4, right), y)], fill="red", width=1)
        if pts:
            line = [(sx(x), sy(y)) for x, y in pts]
            draw.line(line if len(line) > 1 else line * 2, fill="blue", width=2)
        draw.text((x0 + 2, top - 4), f"{ymax:.2f}", fill="black")
        draw.text((x0 + 2, bottom - 8), f"{ymin:.2f}", fill="black")
        draw.text((left, bottom + 4), f"step {xmin}", fill="black")
        draw.text((right - 30, bottom + 4), f"{xmax}", fill="black")
    img.save(path)


def to_pil(x, size):
    """A CLIP-normalised (3, S, S) tensor back to an RGB image, resized to size x size."""
    arr = (x.float().cpu().permute(1, 2, 0).numpy() * transforms.CLIP_STD + transforms.CLIP_MEAN).clip(0, 1)  # (S, S, 3)
    return Image.fromarray((arr * 255).astype("uint8")).resize((size, size), Image.Resampling.BICUBIC)


@torch.no_grad()
def cross_attention_maps(xfm, ids, att, image):
    """The fusion encoder's attention from each word to the image tokens, one (B, nh, T, 1+P) tensor per layer:
    softmax(q k^T / sqrt(hs)). model.Attention hands the weights to SDPA without keeping them, so a forward hook
    on each fusion attention module recomputes them from the module's own projections and the inputs it was called
    with (no change to model.py). X-FM: the cross-attention over [mean-pooled slot, patches]. FLAVA has no
    cross-attention: its maps are the text rows of the fusion self-attention over [CLS_I, patches] (their
    softmax runs over the whole fused sequence, so a row need not sum to 1 over the image)."""
    maps, flava_model = [], getattr(xfm.cfg, "recipe", "xfm") == "flava"
    P = xfm.cfg.num_patches

    def hook(m, args, kwargs, output):
        x, mask = args[0], kwargs.get("mask")                              # additive: 0 or -inf per key
        if flava_model:  # self-attention over [CLS_M; CLS_I; patches; text]
            q, k, _ = F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
        else:            # text queries, image keys
            q, k = m.q(x), m.kv(kwargs["kv"]).chunk(2, dim=-1)[0]
        q, k = m.split_heads(q), m.split_heads(k)                          # (B, nh, N, hs), (B, nh, S, hs)
        a = (q @ k.transpose(-2, -1)) / math.sqrt(m.head_dim)              # (B, nh, N, S)
        if mask is not None:
            a = a + mask
        a = a.float().softmax(dim=-1)
        maps.append(a[:, :, 2 + P:, 1:2 + P] if flava_model else a)       # (B, nh, T, 1+P)

    modules = [blk.attn if flava_model else blk.cross_attn for blk in xfm.fusion.blocks]
    hooks = [mod.register_forward_hook(hook, with_kwargs=True) for mod in modules]
    try:
        xfm.eval()
        xfm.fuse(xfm.encode_text(ids, att), att, xfm.encode_image(image))
    finally:
        for h in hooks:
            h.remove()
    return maps


def render_attention(maps, words, image, grid, path, tile=96):
    """A PNG grid, one row per fusion layer and one tile per word: the image with that word's attention over the
    patches (mean over heads) as a red heatmap. The number is the weight on slot 0, the mean-pooled image token."""
    pad, top = 4, 16
    sheet = Image.new("RGB", (60 + len(words) * (tile + pad), len(maps) * (tile + top + pad)), "white")
    draw, base = ImageDraw.Draw(sheet), image.resize((tile, tile), Image.Resampling.BICUBIC)
    red = Image.new("RGB", (tile, tile), (255, 0, 0))
    for l, a in enumerate(maps):
        a, y0 = a[0].mean(0), l * (tile + top + pad)                      # (T, 1+P), heads averaged
        draw.text((4, y0 + top + tile // 2 - 6), f"layer {l}", fill="black")
        for j, word in enumerate(words):
            w = a[j, 1:].reshape(grid, grid)                               # (g, g) weights on the patches
            w = (w / w.max().clamp(min=1e-12) * 255).byte().numpy()        # each tile scaled to its own maximum
            alpha = Image.fromarray(w).resize((tile, tile), Image.Resampling.BILINEAR).point(lambda p: int(p * 0.7))
            x0 = 60 + j * (tile + pad)
            sheet.paste(Image.composite(red, base, alpha), (x0, y0 + top))
            draw.text((x0, y0 + 2), f"{word[:10]} {float(a[j, 0]):.2f}", fill="black")
    sheet.save(path)


def attention_picture(xfm, tok, caption, image, image_size, text_len, device, path):
    """finetune.py --task attention: the caption tokenized as the model reads it and the image file as every task
    transforms it (transforms.eval_transform), their cross_attention_maps drawn by render_attention, each tile named
    by its token -> (layers, tokens) drawn."""
    ids = torch.tensor([tok.encode(caption, text_len)], device=device)  # (1, T)
    x = transforms.eval_transform(formats.load_image(image), image_size)[None].to(device)  # (1, 3, S, S)
    maps = cross_attention_maps(xfm, ids, torch.ones_like(ids), x)
    words = [tok.hf.id_to_token(i).replace("\u0120", "") for i in ids[0].tolist()]  # byte-level BPE: Ġ = space
    render_attention([m.cpu() for m in maps], words, formats.load_image(image), xfm.cfg.grid, path)
    return len(maps), len(words)


@torch.no_grad()
def retrieval_sheet(rs, t2i, tok, k_test, path, n_queries=6, k=5, size=72):
    """A PNG: a few text queries, each with its top-5 images by t2i (retrieval.scores' re-ranked text->image
    scores: the ITM logit in the ITC top k_test, -100 elsewhere); the correct image is framed in green."""
    qs = torch.linspace(0, len(rs["ids"]) - 1, min(n_queries, len(rs["ids"]))).long()  # spread over the set
    rows = []
    for q in qs.tolist():
        top = t2i[q].topk(min(k, k_test, t2i.shape[1])).indices           # by the ITM "match" logit
        rows.append((tok.decode(rs["ids"][q].tolist()), top.tolist(), int(rs["txt2img"][q])))
    left, pad = 260, 6
    sheet = Image.new("RGB", (left + k * (size + pad), len(rows) * (size + 2 * pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, top, gold) in enumerate(rows):
        y0 = r * (size + 2 * pad) + pad
        note = [] if gold in top else ["(correct image: not in the top 5)"]
        draw.multiline_text((4, y0), "\n".join(textwrap.wrap(caption, 40)[:4] + note), fill="black")
        for j, idx in enumerate(top):
            x0 = left + j * (size + pad)
            sheet.paste(to_pil(rs["image"][idx], size), (x0, y0))
            hit = idx == gold
            draw.rectangle([x0 - 2, y0 - 2, x0 + size + 1, y0 + size + 1], outline="green" if hit else "lightgray",
                           width=3 if hit else 1)
    sheet.save(path)
