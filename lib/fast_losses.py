"""
Every X-FM pre-training objective, one function each, and `xfm_losses`, the single entry point that turns a
batch of any subset of the four data kinds into a dict of named scalar losses. The method: docs/METHOD.md §4.

    data kind   keys of its batch dict (made by data.py)                          losses
    text        ids, att, labels, max_masks                                       mlm
    image       image, mim_mask                                                   mim_image
    pair        image, mim_mask, ids, att, mlm_ids, mlm_labels, img_id, max_masks itc itm imlm mim
    region      image, img_index, ids, att, mlm_ids, mlm_labels, box, valid,
                is_region, patch_mask, img_id, max_masks                          itc_region itm_region
                                                                                  imlm_region bbox_l1 bbox_giou

Every loss keeps fixed shapes and never makes the host wait for the device (no boolean-mask indexing, no
`if tensor`, no data-dependent sizes): rows that take no part (unmasked positions, empty caption slots, rows
without a hard negative) are computed and weigh 0. So a GPU step never stalls on the host, and the whole step
compiles as one graph (train.py --compile; docs/METHOD.md §6.3).

X-FM's two ideas are both in this file:
  1. stop gradient: `fusion_input` detaches the language encoder's output before the fusion encoder reads it,
     so the language encoder learns only from MLM and ITC;
  2. vision-language-guided MIM: `mim_loss` regresses the same vision encoder's detached output on the
     unmasked image, the very tensor that ITC/ITM/IMLM train in this step.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Distributed helper: all-gather that keeps autograd


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather_rows(x):
    """All-gather along dim 0. Every rank holds the same number of rows (fixed per-rank batch sizes; region
    batches have a fixed number of caption slots per image), so no sizes need exchanging and nothing waits."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) the incoming gradient before taking this
    rank's rows: every rank's loss depends on every rank's features, so each slice must receive the sum of
    all those gradients. Returning only the local slice without the sum is the bug that scales the official
    ITC gradient by 1/world_size (docs/METHOD.md §6.2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return _all_gather_rows(x)                                         # (world * B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)                                              # sum over every rank's loss
        return grad[_rank() * ctx.rows:(_rank() + 1) * ctx.rows]


def gather_with_grad(x):
    """Concatenate x from every rank along dim 0, keeping the graph (identity when not distributed)."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def gather_no_grad(x):
    """Plain all-gather along dim 0 (for ids and masks, which carry no gradient)."""
    return _all_gather_rows(x) if _distributed() else x


def global_sum(x):
    """The sum of a (detached) count over every rank: a collective, not a host sync."""
    x = x.detach().float()
    if _distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------------------
# Idea 1: the stop-gradient


def fusion_input(t, stop_grad=True):
    """The language encoder's states as the fusion encoder reads them.

    X-FM idea 1 ("stop gradient", docs/METHOD.md §2.1): in pre-training the fusion encoder reads sg(t), so the
    ITM, IMLM and box losses never reach the language encoder; it learns only from MLM and ITC and keeps
    being a good *language* model. stop_grad=False is the ablation (and fine-tuning, where it is off).
    """
    return t.detach() if stop_grad else t


# ---------------------------------------------------------------------------------------------------------
# The objectives


def mlm_loss(hidden, labels, head, max_masked=None):
    """Masked language modelling: CE over the masked positions only.

    hidden (B, T, D), labels (B, T) with -100 where not masked, head: D -> V.
    L = mean over masked (b, i) of -log softmax(head(h_{b,i}))[labels_{b,i}]
    The vocabulary-sized head runs only on K slots per row, the masked positions gathered into them: K =
    max_masked, the data's bound on masked positions per row (data.max_masked; every position when None).
    Fixed shapes, no host sync: unused slots carry -100 and count for nothing.
    """
    B, T, D = hidden.shape
    K = T if max_masked is None else min(T, max_masked)
    sel, pos = (labels != -100).float().topk(K, dim=1)                      # (B, K): the masked positions first
    target = labels.gather(1, pos)                                         # (B, K), -100 in the unused slots
    logits = head(hidden.gather(1, pos.unsqueeze(-1).expand(B, K, D)))     # (B, K, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
    return loss / sel.sum().clamp(min=1)                                   # no masked position: 0, graph kept


def itc_loss(f_v, f_t, temp, ids=None, queries=None, keys=None):
    """Image-text contrastive loss, global across ranks (docs/METHOD.md §4.2, §6.2).

    f_v, f_t (B, E): this rank's L2-normalised image / text embeddings; temp: scalar temperature.
    Each rank scores its B local rows against the N = B * world keys gathered *with* autograd:
        S_i2t = f_v @ gather(f_t)^T / temp  (B, N),  S_t2i = f_t @ gather(f_v)^T / temp  (B, N)
        L = 1/2 [ CE(S_i2t, y) + CE(S_t2i, y) ],   y_b = b + B * rank
    Averaged over ranks by DDP, this is exactly the loss and gradient of one process on the whole batch.
    ids (B,) optional: pairs sharing an id are all positives (target uniform over them), as in fine-tuning.
    queries (B,) bool optional: only these rows are queries (FLAVA: not the ITM negatives, whose image and
    caption do not match); every row stays a key. keys (B,) bool optional: rows that are no key either
    (empty caption slots of a region batch). The mean is over the queries of all ranks.
    """
    B = f_v.shape[0]
    all_v, all_t = gather_with_grad(f_v), gather_with_grad(f_t)            # (N, E)
    s_i2t = (f_v @ all_t.t() / temp).float()                               # (B, N)
    s_t2i = (f_t @ all_v.t() / temp).float()                               # (B, N)
    if keys is not None:  # a finite floor, not -inf: 0 * -inf in the row loss below would be NaN
        not_key = ~gather_no_grad(keys)[None, :]                           # (1, N)
        s_i2t = s_i2t.masked_fill(not_key, torch.finfo(s_i2t.dtype).min)
        s_t2i = s_t2i.masked_fill(not_key, torch.finfo(s_t2i.dtype).min)
    if ids is None:
        y = torch.arange(B, device=f_v.device) + B * _rank()              # (B,) diagonal of the global matrix
        target = (y[:, None] == torch.arange(all_t.shape[0], device=y.device)[None, :]).float()  # (B, N) one-hot
    else:  # every pair sharing an id is a positive
        pos = (ids[:, None] == gather_no_grad(ids)[None, :]).float()       # (B, N) ids need no graph
        target = pos / pos.sum(1, keepdim=True)
    q = torch.ones(B, device=f_v.device) if queries is None else queries.float()  # (B,) 1 for a query row
    target = target * q[:, None]                                           # a row that is no query adds 0
    row_loss = -(F.log_softmax(s_i2t, 1) * target).sum(1) - (F.log_softmax(s_t2i, 1) * target).sum(1)
    # sum over local queries x world / all queries: DDP's mean over ranks is then the mean over ALL queries,
    # even when ranks hold different numbers of them; with every row a query this is the local mean
    world = dist.get_world_size() if _distributed() else 1
    return 0.5 * row_loss.sum() * world / global_sum(q.sum()).clamp(min=1)


@torch.no_grad()
def sample_hard_negatives(f_v, f_t, temp, img_id, valid=None):
    """ALBEF-style in-batch hard negatives from the (local) ITC similarities, with no gradient.

    w_i2t = softmax(f_v f_t^T / temp) + 1e-5, then every entry with the same image id (the positive, and
    duplicates of its image) is set to 0, as is every row and column of an empty slot (valid (B,) bool); one
    negative text per image ~ w_i2t / sum(w_i2t); likewise one negative image per text. The draw is the
    exponential race argmax_j w_j / E_j with E_j ~ Exp(1), which picks j with probability w_j / sum(w): the
    distribution of torch.multinomial, with fixed shapes and no host sync.
    Returns (neg_txt_for_img, neg_img_for_txt, has_txt, has_img): (B,) indices and (B,) bool, False where a
    row has no valid negative (batch size 1, every item sharing the image id, an empty slot); its index is 0.
    """
    sim = f_v @ f_t.t() / temp                                             # (B, B) image x text
    never = img_id[:, None] == img_id[None, :]                             # (B, B) never a negative
    if valid is not None:
        never = never | ~valid[:, None] | ~valid[None, :]

    def draw(logits):
        w = (logits.float().softmax(dim=1) + 1e-5).masked_fill(never, 0.0)
        race = torch.empty_like(w).exponential_().clamp_min(1e-30)       # never 0: 0 / 0 would be NaN
        return (w / race).argmax(dim=1), w.sum(1) > 0

    (neg_txt, has_txt), (neg_img, has_img) = draw(sim), draw(sim.t())
    return neg_txt, neg_img, has_txt, has_img


def itm_inputs(t_sg, att, v, v_mask, f_v, f_t, temp, img_id, valid=None):
    """The fusion encoder's input rows for ITM with hard negatives (docs/METHOD.md §4.3), and their weights.

    t_sg (B, T, D): language states as the fusion encoder reads them (detached in pre-training),
    v (B, S, D) image tokens with key mask v_mask (B, S) or None; valid (B,) bool or None: the filled slots.
    3B rows: the B positives, (text b, hard-negative image) and (hard-negative text, image b); the negatives reuse
    the outputs the step already has. -> ((t, att, v, v_mask) of the 3B rows, weight (3B,)): weight 0 for an
    empty slot and for a row that found no negative (fixed shapes).
    """
    neg_txt, neg_img, has_txt, has_img = sample_hard_negatives(f_v, f_t, temp, img_id, valid)
    # positives | text b with a negative image | image b with a negative text
    t_all = torch.cat([t_sg, t_sg, t_sg[neg_txt]])                         # (3B, T, D)
    a_all = torch.cat([att, att, att[neg_txt]])
    v_all = torch.cat([v, v[neg_img], v])                                  # (3B, S, D)
    m_all = None if v_mask is None else torch.cat([v_mask, v_mask[neg_img], v_mask])
    weight = torch.cat([torch.ones_like(has_img) if valid is None else valid, has_img, has_txt]).float()
    return (t_all, a_all, v_all, m_all), weight


def itm_ce(model, cls, weight):
    """ITM's loss on the fusion [CLS] of itm_inputs' 3B rows: L = CE(itm_head(F[CLS]), [1]*B + [0]*2B), averaged
    over the rows of weight 1."""
    B = len(cls) // 3
    labels = (torch.arange(3 * B, device=cls.device) < B).long()           # 1 for the positives
    ce = F.cross_entropy(model.itm_head(cls).float(), labels, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp(min=1)


def itm_loss(model, t_sg, att, v, v_mask, f_v, f_t, temp, img_id, valid=None):
    """Image-text matching with hard negatives: the fusion encoder once on itm_inputs' 3B rows, then itm_ce."""
    rows, weight = itm_inputs(t_sg, att, v, v_mask, f_v, f_t, temp, img_id, valid)
    return itm_ce(model, model.fuse(*rows)[:, 0], weight)


def fuse_groups(model, *groups):
    """One fusion call for several groups of rows, each (t (n, T, D), att (n, T), v (n, S, D), v_mask (n, S) or
    None) -> the fused states (n, T, D) of each group, in order. The fusion encoder treats every row on its own
    (no op mixes rows), so this equals one model.fuse per group, with fewer, bigger launches."""
    masks = [m for *_, m in groups]
    if all(m is None for m in masks):
        v_mask = None                                                      # every key of every row
    else:
        v_mask = torch.cat([torch.ones(g[2].shape[:2], dtype=torch.bool, device=g[2].device) if m is None else m
                            for g, m in zip(groups, masks)])
    h = model.fuse(*(torch.cat([g[i] for g in groups]) for i in range(3)), v_mask)
    return h.split([len(g[0]) for g in groups])


def mim_loss(pred, target, mim_mask):
    """Vision-language-guided MIM (docs/METHOD.md §4.5, §2.2): plain MSE between the masked view's outputs and the
    detached outputs of the same encoder on the unmasked image, over the masked patches plus slot 0.

    pred, target (B, 1+P, D); mim_mask (B, P) bool. target must carry no gradient.
        L = 1/|M| sum_{(b,i) in M} ||pred_{b,i} - target_{b,i}||^2 / D  +  1/B sum_b ||pred_{b,0} - target_{b,0}||^2 / D
    Unmasked patches contribute nothing (weight 0: fixed shapes, no host sync).
    """
    assert not target.requires_grad, "the MIM target must be detached"
    err = (pred.float() - target.float()).pow(2).mean(-1)                  # (B, 1+P) squared error / D
    m = mim_mask.float()
    patch_term = (err[:, 1:] * m).sum() / m.sum().clamp(min=1)
    slot0_term = err[:, 0].mean()
    return patch_term + slot0_term


def patchify(images, p):
    """(B, 3, H, W) -> (B, P, 3*p*p): each patch's pixels, row-major over the grid (the ViT's patch order)."""
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
    m = mim_mask.float()
    return (err * m).sum() / m.sum().clamp(min=1)


def box_xyxy(b):
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a, b):
    """Element-wise IoU of two (N, 4) xyxy box sets of positive area -> (IoU, |A u B|), (N,) each."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return inter / union, union


def generalized_iou(a, b):
    """Element-wise GIoU of two (N, 4) xyxy box sets: IoU - (|C| - |A u B|) / |C|, C the enclosing box."""
    iou, union = box_iou(a, b)
    c_lt, c_rb = torch.min(a[:, :2], b[:, :2]), torch.max(a[:, 2:], b[:, 2:])
    area_c = (c_rb - c_lt).clamp(min=0).prod(-1)
    return iou - (area_c - union) / area_c


def bbox_loss(pred, target, is_region):
    """Box prediction (docs/METHOD.md §4.6), only over region captions.

    pred, target (N, 4) normalised (cx, cy, w, h) in [0, 1]; is_region (N,) bool.
        L_l1   = sum_j ||pred_j - target_j||_1 / N_reg
        L_giou = sum_j (1 - GIoU(pred_j, target_j)) / N_reg      (0 if any box is degenerate, as officially)
    Every row is computed (fixed shapes, no host sync); rows that are no region caption weigh 0.
    """
    w = is_region.float()
    n_reg = w.sum().clamp(min=1)
    p, t = pred.float(), target.float()
    l1 = ((p - t).abs().sum(-1) * w).sum() / n_reg
    pb, tb = box_xyxy(p), box_xyxy(t)
    degenerate = (((pb[:, 2:] < pb[:, :2]) | (tb[:, 2:] <= tb[:, :2])).any(-1) & is_region).any()
    # GIoU off (a degenerate box in the batch) or not a region: the row compares the unit box with itself,
    # GIoU 1, loss 0. Weighting the row by 0 alone would not do: a degenerate box's GIoU is NaN or inf,
    # and 0 * NaN is NaN, in the sum and in the gradient.
    off = (degenerate | ~is_region)[:, None]                               # (N, 1)
    unit = pb.new_tensor([0.0, 0.0, 1.0, 1.0])
    giou = (1 - generalized_iou(torch.where(off, unit, pb), torch.where(off, unit, tb))).sum() / n_reg
    return l1, giou


# ---------------------------------------------------------------------------------------------------------
# The entry point


def _vl_losses(model, b, v, v_mask, stop_grad, suffix, box_image=None):
    """ITC, ITM and IMLM for image-text data (pairs, or regions through their region view); with box_image (N, S, D)
    also the fusion states of each caption with its full image, for box prediction. -> (losses, those states)."""
    out, valid = {}, b.get("valid")  # valid (B,) bool: a region batch's filled caption slots (None: every row)
    t = model.encode_text(b["ids"], b["att"])                              # (B, T, D), with grad (for ITC)
    f_t, f_v = model.itc_features(t, v)
    out["itc" + suffix] = itc_loss(f_v, f_t, model.temp, queries=valid, keys=valid)
    itm_rows, itm_weight = itm_inputs(fusion_input(t, stop_grad), b["att"], v, v_mask,
                                      f_v, f_t, model.temp, b["img_id"], valid)
    # IMLM: the masked caption through the language encoder, then (detached) through the fusion encoder.
    # Under the stop-gradient that pass can run without a graph: nothing will flow back into it anyway.
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_grad):
        t_m = model.encode_text(b["mlm_ids"], b["att"])
    groups = [itm_rows, (fusion_input(t_m, stop_grad), b["att"], v, v_mask)]
    if box_image is not None:  # BBP reads the caption (detached) and the FULL image, not the region view
        groups.append((fusion_input(t, stop_grad), b["att"], box_image, None))
    # ITM's 3B rows, IMLM's B rows (and BBP's B rows) in one fusion call: fewer, bigger launches
    h_itm, h, *h_box = fuse_groups(model, *groups)                         # (3B, T, D), (B, T, D), [(B, T, D)]
    out["itm" + suffix] = itm_ce(model, h_itm[:, 0], itm_weight)
    out["imlm" + suffix] = mlm_loss(h, b["mlm_labels"], model.fusion_mlm, b.get("max_masks"))
    return out, (h_box[0] if h_box else None)


def _mim(model, image, mim_mask, v, stats, v_hat=None):
    """MIM on one image batch. v = the unmasked output (already computed with grad for a pair batch, or
    None for an image-only batch, where no other loss needs it and a no-grad pass is equivalent); v_hat = the
    block-masked view's output when the caller already has it (None: computed here)."""
    target_kind = model.cfg.mim_target
    if target_kind == "pixel":
        v_hat = model.encode_image(image, mim_mask)
        return pixel_mim_loss(model.pixel_head(v_hat[:, 1:]), image, mim_mask, model.cfg.patch_size)
    if v is None:
        with torch.no_grad():
            v = model.encode_image(image)
    # X-FM idea 2: the target is the same encoder's output on the unmasked image, detached. That encoder is
    # trained right now by ITC/ITM/IMLM/BBP, so the targets carry vision-language semantics. No EMA copy.
    target = v.detach()
    if stats is not None:  # a collapsing target shows up as a per-dimension std going to 0
        stats.setdefault("mim_target_std", target[:, 1:].float().std(dim=(0, 1)).mean().detach())
    if v_hat is None:
        v_hat = model.encode_image(image, mim_mask)                        # the block-masked view
    return mim_loss(v_hat, target, mim_mask)


def xfm_losses(model, batch, stop_grad=True, stats=None):
    """All X-FM pre-training losses for a batch holding any subset of the four data kinds.

    model: an XFM (not a DDP wrapper: call this inside the wrapper's forward so DDP sees the graph).
    batch: {"text": {...}, "image": {...}, "pair": {...}, "region": {...}} (any subset; see module doc).
    stop_grad: X-FM's stop-gradient (True in pre-training; False for the ablation).
    stats: optional dict that receives diagnostics (not losses), e.g. the MIM target's feature std.
    Returns {name: scalar loss}; the training objective is their unweighted sum (docs/METHOD.md §5.2).
    """
    out = {}
    use_mim = model.cfg.mim_target != "off"
    if "pair" in batch or "region" in batch:
        model.clamp_temp()  # temp lives in [0.001, 0.5], clamped at every forward

    if "text" in batch:  # MLM: the language encoder alone
        b = batch["text"]
        t = model.encode_text(b["ids"], b["att"])
        out["mlm"] = mlm_loss(t, b["labels"], model.text_mlm, b.get("max_masks"))

    if "pair" in batch:
        b = batch["pair"]
        v_hat = None
        if use_mim and model.cfg.mim_target == "vl":
            # the unmasked image and its block-masked view in one call of 2B rows (no op of the encoder mixes
            # rows; an all-False mim_mask leaves an image as it is): fewer, bigger launches
            no_mask = torch.zeros_like(b["mim_mask"])
            v, v_hat = model.encode_image(torch.cat([b["image"], b["image"]]),
                                          torch.cat([no_mask, b["mim_mask"]])).chunk(2)  # 2 x (B, 1+P, D)
        else:
            v = model.encode_image(b["image"])                             # (B, 1+P, D)
        # v WITH grad: ITC/ITM/IMLM need it
        vl, _ = _vl_losses(model, b, v, None, stop_grad, "")
        out.update(vl)
        if use_mim:
            out["mim"] = _mim(model, b["image"], b["mim_mask"], v, stats, v_hat)

    if "region" in batch:
        b = batch["region"]
        v = model.encode_image(b["image"])                                 # (B_img, 1+P, D) full images
        v_r, v_r_mask = model.region_view(v, b["img_index"], b["patch_mask"])  # (N, 1+P, D), (N, 1+P)
        # BBP reads the caption (detached) and the FULL image, not the region view (docs/METHOD.md §4.6)
        vl, h = _vl_losses(model, b, v_r, v_r_mask, stop_grad, "_region", box_image=v[b["img_index"]])
        out.update(vl)
        pred = model.bbox_head(h[:, 0]).sigmoid()                          # (N, 4) cx, cy, w, h in [0, 1]
        out["bbox_l1"], out["bbox_giou"] = bbox_loss(pred, b["box"], b["is_region"])

    if "image" in batch and use_mim:
        b = batch["image"]
        out["mim_image"] = _mim(model, b["image"], b["mim_mask"], None, stats)
    return out
