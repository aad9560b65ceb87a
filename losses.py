"""
Every X-FM pre-training objective, one function each, written as its formula, and `xfm_losses`, the
entry point that turns a batch of any subset of the four data kinds into a dict of named scalar
losses. The method: docs/METHOD.md §4.
The keys of each data kind's batch: data.py's module docstring.

    data kind   losses
    text        mlm
    image       mim_image
    pair        itc itm imlm mim
    region      itc_region itm_region imlm_region bbox_l1 bbox_giou

X-FM's two ideas are both in this file:
  1. stop gradient: `fusion_input` detaches the language encoder's output before the fusion encoder
     reads it, so the language encoder learns only from MLM and ITC;
  2. vision-language-guided MIM: `mim_objective` regresses the same vision encoder's detached output
     on the unmasked image, the very tensor that ITC/ITM/IMLM train in this step.

This is the reference. lib/fast_losses.py computes the same losses and gradients with fixed shapes
and without making the host wait (what a GPU step and torch.compile need); tests/test_static.py
holds it to this file.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Distributed helper: all-gather that keeps autograd


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(n, device):
    """Every rank's row count: region batches have a fixed number of images but a varying number of
    captions."""
    if not _distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def _all_gather_rows(x, sizes):
    """All-gather along dim 0 for per-rank row counts `sizes`: pad to the largest, gather, unpad."""
    pad = x.new_zeros((max(sizes) - x.shape[0],) + x.shape[1:])
    parts = [x.new_empty((max(sizes),) + x.shape[1:]) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) the incoming gradient before taking
    this rank's rows: every rank's loss depends on every rank's features, so each slice must receive
    the sum of all those gradients. Returning only the local slice without the sum is the bug that
    scales the official ITC gradient by 1/world_size (docs/METHOD.md §6.2)."""

    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return _all_gather_rows(x, sizes)                                  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        # sum over every rank's loss
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:_rank()])
        return grad[start:start + ctx.sizes[_rank()]], None


def gather_with_grad(x, sizes=None):
    """Concatenate x from every rank along dim 0, keeping the graph (identity when not distributed).
    sizes: every rank's row count (gather_sizes; asked for when None)."""
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x, sizes or gather_sizes(len(x), x.device))


def gather_no_grad(x, sizes=None):
    """Plain all-gather along dim 0 (for ids and other tensors that carry no gradient)."""
    if not _distributed():
        return x
    return _all_gather_rows(x, sizes or gather_sizes(len(x), x.device))


# --------------------------------------------------------------------------------------------------
# Idea 1: the stop-gradient


def fusion_input(t, stop_grad=True):
    """The language encoder's states as the fusion encoder reads them.

    X-FM idea 1 ("stop gradient", docs/METHOD.md §2.1): in pre-training the fusion encoder reads
    sg(t), so the ITM, IMLM and box losses never reach the language encoder; it learns only from MLM
    and ITC and keeps being a good *language* model. stop_grad=False is the ablation (and
    fine-tuning, where it is off).
    """
    return t.detach() if stop_grad else t


# --------------------------------------------------------------------------------------------------
# The objectives


def mlm_loss(hidden, labels, head):
    """Masked language modelling: CE over the masked positions only.

    hidden (B, T, D), labels (B, T) with -100 where not masked, head: D -> V.
    L = mean over masked (b, i) of -log softmax(head(h_{b,i}))[labels_{b,i}]
    The masked positions are gathered first, so the vocabulary-sized head runs only there.
    """
    sel = labels != -100                                                   # (B, T)
    if not sel.any():
        # keeps the graph, adds nothing
        return hidden.sum() * 0.0
    logits = head(hidden[sel])                                             # (M, V)
    return F.cross_entropy(logits.float(), labels[sel])


def itc_loss(f_v, f_t, temp, ids=None, queries=None):
    """Image-text contrastive loss, global across ranks (docs/METHOD.md §4.2, §6.2).

    f_v, f_t (B, E): this rank's L2-normalised image / text embeddings; temp: scalar temperature.
    Each rank scores its B local rows against the N = B * world keys gathered *with* autograd:
        S_i2t = f_v @ gather(f_t)^T / temp  (B, N),  S_t2i = f_t @ gather(f_v)^T / temp  (B, N)
        L = 1/2 [ CE(S_i2t, y) + CE(S_t2i, y) ],   y_b = b + (rows of the ranks before this one)
    Averaged over ranks by DDP, this is exactly the loss and gradient of one process on the whole
    batch.
    ids (B,) optional: pairs sharing an id are all positives (target uniform over them), as in
    fine-tuning.
    queries (B,) bool optional: only these rows are queries (FLAVA: not the ITM negatives, whose
    image and caption do not match); every row stays a key. The mean is then over the queries of all
    ranks.
    """
    B = f_v.shape[0]
    # rows per rank (regions vary)
    sizes = gather_sizes(B, f_v.device)
    all_v, all_t = gather_with_grad(f_v, sizes), gather_with_grad(f_t, sizes)  # (N, E)
    s_i2t = f_v @ all_t.t() / temp                                         # (B, N)
    s_t2i = f_t @ all_v.t() / temp                                         # (B, N)
    if ids is None:
        # (B,) diagonal of the global matrix
        y = torch.arange(B, device=f_v.device) + sum(sizes[:_rank()])
        # (B, N) one-hot
        target = (y[:, None] == torch.arange(len(all_t), device=y.device)[None, :]).float()
    else:  # every pair sharing an id is a positive
        all_ids = gather_no_grad(ids, sizes)                               # (N,) ids need no graph
        positive = (ids[:, None] == all_ids[None, :]).float()              # (B, N)
        target = positive / positive.sum(1, keepdim=True)
    row_loss = (-(F.log_softmax(s_i2t.float(), 1) * target).sum(1)
                - (F.log_softmax(s_t2i.float(), 1) * target).sum(1))
    n_queries = sizes
    if queries is not None:
        row_loss = row_loss[queries]
        n_queries = gather_sizes(len(row_loss), f_v.device)                # query rows per rank
    # sum over local rows x world / N: DDP's mean over ranks is then the mean over ALL N rows, even
    # when ranks hold different row counts (region captions);
    # with equal counts this is the local mean
    return 0.5 * row_loss.sum() * len(sizes) / max(sum(n_queries), 1)


@torch.no_grad()
def sample_hard_negatives(f_v, f_t, temp, img_id):
    """ALBEF-style in-batch hard negatives from the (local) ITC similarities, with no gradient.

    w_i2t = softmax(f_v f_t^T / temp) + 1e-5, then every entry with the same image id (the positive,
    and duplicates of its image) is set to 0; one negative text per image ~ multinomial(w_i2t);
    likewise one negative image per text. Returns (neg_txt_for_img, neg_img_for_txt): (B,) indices,
    -1 where a row has no valid negative (batch size 1, or every item shares the image id).
    """
    sim = f_v @ f_t.t() / temp                                             # (B, B) image x text
    same = img_id[:, None] == img_id[None, :]                              # (B, B) never a negative

    def draw(logits):
        w = logits.float().softmax(dim=1) + 1e-5
        w = w.masked_fill(same, 0.0)
        has_neg = w.sum(1) > 0
        idx = torch.full((w.shape[0],), -1, dtype=torch.long, device=w.device)
        if has_neg.any():
            idx[has_neg] = torch.multinomial(w[has_neg], 1).squeeze(1)
        return idx

    return draw(sim), draw(sim.t())


def itm_loss(model, t_sg, att, v, v_mask, f_v, f_t, temp, img_id):
    """Image-text matching with hard negatives (docs/METHOD.md §4.3).

    t_sg (B, T, D): language states as the fusion encoder reads them (detached in pre-training),
    v (B, S, D) image tokens with key mask v_mask (B, S) or None. The fusion encoder runs on the B
    positives, on (text, hard-negative image) and on (hard-negative text, image); the negative texts
    reuse t_sg.
    L = CE(itm_head(F[CLS]), [1]*B + [0]*(#negatives)).
    """
    B = t_sg.shape[0]
    neg_txt, neg_img = sample_hard_negatives(f_v, f_t, temp, img_id)
    # rows that found a negative
    ti, ii = neg_img >= 0, neg_txt >= 0
    if v_mask is None:
        v_mask = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
    # positives | text i with a negative image | image i with a negative text
    t_all = torch.cat([t_sg, t_sg[ti], t_sg[neg_txt[ii]]])                # (B + n1 + n2, T, D)
    a_all = torch.cat([att, att[ti], att[neg_txt[ii]]])
    v_all = torch.cat([v, v[neg_img[ti]], v[ii]])                          # (B + n1 + n2, S, D)
    m_all = torch.cat([v_mask, v_mask[neg_img[ti]], v_mask[ii]])
    cls = model.fuse(t_all, a_all, v_all, m_all)[:, 0]                     # fusion [CLS]
    labels = torch.zeros(cls.shape[0], dtype=torch.long, device=cls.device)
    labels[:B] = 1
    return F.cross_entropy(model.itm_head(cls).float(), labels)


def mim_loss(pred, target, mim_mask):
    """Vision-language-guided MIM (docs/METHOD.md §4.5, §2.2): plain MSE between the masked view's
    outputs and the detached outputs of the same encoder on the unmasked image, over the masked
    patches plus slot 0.

    pred, target (B, 1+P, D); mim_mask (B, P) bool. target must carry no gradient.
        L = 1/|M| sum_{(b,i) in M} ||pred_{b,i} - target_{b,i}||^2 / D
          + 1/B sum_b ||pred_{b,0} - target_{b,0}||^2 / D
    Unmasked patches contribute nothing.
    """
    assert not target.requires_grad, "the MIM target must be detached"
    # (B, 1+P) squared error / D
    err = (pred.float() - target.float()).pow(2).mean(-1)
    patch_term = err[:, 1:][mim_mask].mean()
    slot0_term = err[:, 0].mean()
    return patch_term + slot0_term


def patchify(images, p):
    """(B, 3, H, W) -> (B, P, 3*p*p): each patch's pixels, row-major over the grid
    (the ViT's patch order)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def pixel_mim_loss(pred_pixels, images, mim_mask, patch_size):
    """MAE-style baseline target (mim_target=pixel): each masked patch regresses its own pixels,
    normalised per patch to zero mean and unit variance. pred_pixels (B, P, 3*p*p)."""
    patches = patchify(images, patch_size)                                 # (B, P, 3*p*p)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()
    err = (pred_pixels.float() - target).pow(2).mean(-1)                   # (B, P)
    return err[mim_mask].mean()


def box_xyxy(b):
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a, b):
    """Element-wise IoU of two (N, 4) xyxy box sets of positive area
    -> (IoU, |A u B|), (N,) each."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return inter / union, union


def generalized_iou(a, b):
    """Element-wise GIoU of two (N, 4) xyxy box sets:
    IoU - (|C| - |A u B|) / |C|, C the enclosing box."""
    iou, union = box_iou(a, b)
    c_lt, c_rb = torch.min(a[:, :2], b[:, :2]), torch.max(a[:, 2:], b[:, 2:])
    area_c = (c_rb - c_lt).clamp(min=0).prod(-1)
    return iou - (area_c - union) / area_c


def bbox_loss(pred, target, is_region):
    """Box prediction (docs/METHOD.md §4.6), only over region captions.

    pred, target (N, 4) normalised (cx, cy, w, h) in [0, 1]; is_region (N,) bool.
        L_l1   = sum_j ||pred_j - target_j||_1 / N_reg
        L_giou = sum_j (1 - GIoU(pred_j, target_j)) / N_reg
                 (0 if any box is degenerate, as officially)
    """
    n_reg = is_region.sum()
    if n_reg == 0:
        zero = pred.sum() * 0.0
        return zero, zero
    p, t = pred[is_region].float(), target[is_region].float()
    l1 = (p - t).abs().sum() / n_reg
    pb, tb = box_xyxy(p), box_xyxy(t)
    degenerate = (pb[:, 2:] < pb[:, :2]).any() or (tb[:, 2:] <= tb[:, :2]).any()
    giou = (1 - generalized_iou(pb, tb)).sum() / n_reg if not degenerate else l1 * 0.0
    return l1, giou


# --------------------------------------------------------------------------------------------------
# The entry point


def vl_losses(model, b, v, v_mask, stop_grad, suffix):
    """ITC, ITM and IMLM for image-text data: b's captions (ids, att, mlm_ids, mlm_labels, img_id)
    with the image tokens v (B, S, D) and their key mask v_mask (B, S) or None.
    -> (losses, the language states t (B, T, D))."""
    out = {}
    # (B, T, D), with grad (for ITC)
    t = model.encode_text(b["ids"], b["att"])
    f_t, f_v = model.itc_features(t, v)
    out["itc" + suffix] = itc_loss(f_v, f_t, model.temp)
    out["itm" + suffix] = itm_loss(model, fusion_input(t, stop_grad), b["att"], v, v_mask,
                                   f_v, f_t, model.temp, b["img_id"])
    # IMLM: the masked caption through the language encoder,
    # then (detached) through the fusion encoder
    t_m = model.encode_text(b["mlm_ids"], b["att"])
    h = model.fuse(fusion_input(t_m, stop_grad), b["att"], v, v_mask)      # (B, T, D)
    out["imlm" + suffix] = mlm_loss(h, b["mlm_labels"], model.fusion_mlm)
    return out, t


def mim_objective(model, image, mim_mask, v=None, stats=None):
    """MIM on one image batch (X-FM idea 2, docs/METHOD.md §2.2, §4.5).
    v (B, 1+P, D): the encoder's output on the unmasked images when the caller has it (a pair batch,
    where ITC/ITM/IMLM train it), else None."""
    if model.cfg.mim_target == "pixel":  # the MAE-style baseline
        v_hat = model.encode_image(image, mim_mask)
        return pixel_mim_loss(model.pixel_head(v_hat[:, 1:]), image, mim_mask, model.cfg.patch_size)
    if v is None:
        v = model.encode_image(image)                                      # the unmasked view
    # the target: the same encoder's output on the unmasked image, detached. That encoder is trained
    # in this very step by ITC/ITM/IMLM/BBP, so the target carries vision-language semantics. No EMA
    # copy, no tokenizer.
    target = v.detach()
    if stats is not None:  # a collapsing target shows up as a per-dimension std going to 0
        stats.setdefault("mim_target_std", target[:, 1:].float().std(dim=(0, 1)).mean())
    v_hat = model.encode_image(image, mim_mask)                            # the block-masked view
    return mim_loss(v_hat, target, mim_mask)


def filled_slots(b):
    """A region batch without its empty caption slots (filled False): data.RegionDataset gives every
    image the same number of slots, and the losses read only the filled ones. Every tensor but the
    images has a row per slot."""
    if "filled" not in b:                                                  # every slot filled
        return b
    return {k: x[b["filled"]] if torch.is_tensor(x) and k != "image" else x for k, x in b.items()}


def xfm_losses(model, batch, stop_grad=True, stats=None):
    """All X-FM pre-training losses for a batch holding any subset of the four data kinds.

    model: an XFM (not a DDP wrapper: call this inside the wrapper's forward so DDP sees the graph).
    batch: {"text": {...}, "image": {...}, "pair": {...}, "region": {...}}
        (any subset; data.py makes them).
    stop_grad: X-FM's stop-gradient (True in pre-training; False for the ablation).
    stats: optional dict that receives diagnostics (not losses), e.g. the MIM target's feature std.
    Returns {name: scalar loss}; the training objective is their unweighted sum
    (docs/METHOD.md §5.2).
    """
    out = {}
    use_mim = model.cfg.mim_target != "off"
    if "pair" in batch or "region" in batch:
        model.clamp_temp()  # temp lives in [0.001, 0.5], clamped at every forward

    if "text" in batch:  # MLM: the language encoder alone
        b = batch["text"]
        out["mlm"] = mlm_loss(model.encode_text(b["ids"], b["att"]), b["labels"], model.text_mlm)

    if "pair" in batch:
        b = batch["pair"]
        # (B, 1+P, D), WITH grad: ITC/ITM/IMLM
        v = model.encode_image(b["image"])
        vl, _ = vl_losses(model, b, v, None, stop_grad, "")
        out.update(vl)
        if use_mim:
            out["mim"] = mim_objective(model, b["image"], b["mim_mask"], v, stats)

    if "region" in batch:
        b = filled_slots(batch["region"])
        # (B_img, 1+P, D) full images
        v = model.encode_image(b["image"])
        # (N, 1+P, D), (N, 1+P)
        v_r, v_r_mask = model.region_view(v, b["img_index"], b["patch_mask"])
        vl, t = vl_losses(model, b, v_r, v_r_mask, stop_grad, "_region")
        out.update(vl)
        # box prediction reads the caption (detached) and the FULL image, not the region view
        # (docs/METHOD.md §4.6)
        h = model.fuse(fusion_input(t, stop_grad), b["att"], v[b["img_index"]])
        # (N, 4) cx, cy, w, h in [0, 1]
        pred = model.bbox_head(h[:, 0]).sigmoid()
        out["bbox_l1"], out["bbox_giou"] = bbox_loss(pred, b["box"], b["is_region"])

    if "image" in batch and use_mim:
        b = batch["image"]
        out["mim_image"] = mim_objective(model, b["image"], b["mim_mask"], None, stats)
    return out
