"""
The fast path of losses.py: the same X-FM losses and gradients (tests/test_static.py holds them
equal, both recipes), computed the way a GPU step and torch.compile need them. losses.py is the
reference a reader learns from; this file only changes how the same numbers are computed:

    - fixed shapes: rows that take no part (unmasked positions, empty caption slots, rows without a
      hard negative) are computed and weigh 0, instead of being dropped by boolean masks;
    - no host sync: no `.item()`, no `if tensor`, no data-dependent sizes, so the host never waits
      for the device;
    - fewer, bigger launches: the two views of idea 2 in one vision-encoder call, ITM's, IMLM's and
      box prediction's rows in one fusion-encoder call;
    - no repeated work: the fusion encoder projects each image token's keys and values once, however
      many rows attend to that image.

Each trick is a named helper whose comment gives its plain equivalent in losses.py.
train.py --losses picks the path (fast on CUDA and under --compile).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from losses import (_distributed, _rank, box_xyxy, fusion_input, gather_no_grad, gather_with_grad,
                    generalized_iou, patchify)

# --------------------------------------------------------------------------------------------------
# The tricks, each with its plain equivalent


def gather_fixed(x):
    """= losses.gather_with_grad(x): every rank holds len(x) rows (fixed batch sizes; a region batch
    has a fixed number of caption slots per image), so no sizes are exchanged and nothing waits."""
    world = dist.get_world_size() if _distributed() else 1
    return gather_with_grad(x, [len(x)] * world)


def gather_fixed_no_grad(x):
    """= losses.gather_no_grad(x) for fixed per-rank row counts."""
    world = dist.get_world_size() if _distributed() else 1
    return gather_no_grad(x, [len(x)] * world)


def global_sum(x):
    """The sum of a (detached) count over every rank: a collective, not a host sync.
    = sum over ranks of int(x)."""
    x = x.detach().float()
    if _distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def weighted_mean(x, w):
    """= x[w].mean() for a boolean w of x's shape (0 when w is all False), with fixed shapes."""
    w = w.float()
    return (x * w).sum() / w.sum().clamp(min=1)


def one_per_row(w):
    """= torch.multinomial(w, 1).squeeze(1) for the rows with sum(w) > 0, without the host waiting.
    The exponential race argmax_j w_j / E_j, E_j ~ Exp(1), picks j with probability w_j / sum(w):
    the algorithm torch.multinomial uses for one draw, on the same random stream.
    -> (index (B,), has (B,) bool: sum(w) > 0);
    a row without candidates gets index 0 and has False."""
    # never 0: 0 / 0 would be NaN
    race = torch.empty_like(w).exponential_().clamp_min(1e-30)
    return (w / race).argmax(dim=1), w.sum(1) > 0


def masked_slots(labels, K):
    """The masked positions of each row gathered into K slots: = the boolean mask labels != -100, as
    (B, K) positions (masked ones first) and (B, K) 0/1 weights. K bounds the masked positions per
    row (data.mlm_slots)."""
    sel, where = (labels != -100).float().topk(K, dim=1)
    return where, sel


def fuse_groups(model, pool, *groups):
    """= [model.fuse(t, att, pool[index], v_mask) for (t, att, index, v_mask) in groups], in one fusion
    call. pool (M, D): every image token the rows attend to; each group: t (n, T, D), att (n, T),
    index (n, S) the pool rows of each row's S image tokens, v_mask (n, S) or None. The fusion
    encoder treats every row on its own (no op mixes rows), so one call over the concatenated rows
    gives each group's states; and its cross-attention projects the keys and values of each pooled
    token once (model.Attention's index), not once per row that sees it (ITM's negatives, IMLM,
    box prediction and a region batch's captions share their images' tokens)."""
    masks = [m for *_, m in groups]
    if all(m is None for m in masks):
        v_mask = None                                                      # every key of every row
    else:
        v_mask = torch.cat([torch.ones(g[2].shape, dtype=torch.bool, device=g[2].device)
                            if m is None else m
                            for g, m in zip(groups, masks)])
    t, att, index = (torch.cat([g[i] for g in groups]) for i in range(3))
    h = model.fuse(t, att, pool, v_mask, image_index=index)
    return h.split([len(g[0]) for g in groups])


def token_index(rows, S):
    """(n, S): the pool rows of the S tokens of images `rows` (n,) in a pool of images flattened to
    (U * S, D): = row r's image states v[rows[r]] for pool = v.flatten(0, 1)."""
    return rows[:, None] * S + torch.arange(S, device=rows.device)


def both_views(model, image, mim_mask):
    """= (model.encode_image(image), model.encode_image(image, mim_mask)) in one call of 2B rows: no
    op of the encoder mixes rows, and an all-False mim_mask leaves an image as it is."""
    no_mask = torch.zeros_like(mim_mask)
    return model.encode_image(torch.cat([image, image]), torch.cat([no_mask, mim_mask])).chunk(2)


# --------------------------------------------------------------------------------------------------
# The objectives (the formulas: losses.py)


def fp32_scores(a, b, temp):
    """a @ b^T / temp in fp32, autocast or not (= (a.float() @ b.float().t()) / temp without autocast): at a
    temperature near 0.01, bf16's 8-bit mantissa would round the similarities a softmax compares."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().t() / temp


def mlm_loss(hidden, labels, head, slots=None):
    """= losses.mlm_loss: CE over the masked positions. The vocabulary-sized head runs on
    K = `slots` slots per row (data.mlm_slots bounds the masked positions of a row; every
    position when None); empty slots weigh 0."""
    B, T, D = hidden.shape
    where, sel = masked_slots(labels, T if slots is None else min(T, slots))  # (B, K) each
    # (B, K), -100 in the empty slots
    target = labels.gather(1, where)
    logits = head(hidden.gather(1, where.unsqueeze(-1).expand(*where.shape, D)))  # (B, K, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                           reduction="sum")
    # no masked position: 0, graph kept
    return loss / sel.sum().clamp(min=1)


def itc_loss(f_v, f_t, temp, ids=None, queries=None, keys=None):
    """= losses.itc_loss on the rows that are keys (keys (B,) bool: empty caption slots are no key
    and no query), with queries (B,) bool as there. Every rank holds B rows, so the gathers need no
    sizes."""
    B = f_v.shape[0]
    all_v, all_t = gather_fixed(f_v), gather_fixed(f_t)                    # (N, E)
    s_i2t = fp32_scores(f_v, all_t, temp)                                  # (B, N)
    s_t2i = fp32_scores(f_t, all_v, temp)                                  # (B, N)
    if keys is not None:
        # a finite floor, not -inf: 0 * -inf in the row loss below would be NaN
        not_key = ~gather_fixed_no_grad(keys)[None, :]                     # (1, N)
        s_i2t = s_i2t.masked_fill(not_key, torch.finfo(s_i2t.dtype).min)
        s_t2i = s_t2i.masked_fill(not_key, torch.finfo(s_t2i.dtype).min)
    if ids is None:
        # (B,) diagonal of the global matrix
        y = torch.arange(B, device=f_v.device) + B * _rank()
        # (B, N)
        target = (y[:, None] == torch.arange(all_t.shape[0], device=y.device)[None, :]).float()
    else:  # every pair sharing an id is a positive
        positive = (ids[:, None] == gather_fixed_no_grad(ids)[None, :]).float()  # (B, N)
        target = positive / positive.sum(1, keepdim=True)
    # (B,) 1 for a query row
    q = torch.ones(B, device=f_v.device) if queries is None else queries.float()
    # a row that is no query adds 0
    target = target * q[:, None]
    row_loss = (-(F.log_softmax(s_i2t, 1) * target).sum(1)
                - (F.log_softmax(s_t2i, 1) * target).sum(1))
    # sum over local queries x world / all queries:
    # DDP's mean over ranks is then the mean over ALL queries
    world = dist.get_world_size() if _distributed() else 1
    return 0.5 * row_loss.sum() * world / global_sum(q.sum()).clamp(min=1)


@torch.no_grad()
def sample_hard_negatives(f_v, f_t, temp, img_id, filled=None):
    """= losses.sample_hard_negatives, where rows and columns of an empty slot (filled (B,) bool) are
    no candidate.
    -> (neg_txt_for_img, neg_img_for_txt, has_neg_txt, has_neg_img): (B,) indices and (B,) bool, False where
    a row has no candidate (its index is then 0)."""
    sim = fp32_scores(f_v, f_t, temp)                                      # (B, B) image x text
    never = img_id[:, None] == img_id[None, :]                             # (B, B) never a negative
    if filled is not None:
        never = never | ~filled[:, None] | ~filled[None, :]

    def draw(logits):
        return one_per_row((logits.float().softmax(dim=1) + 1e-5).masked_fill(never, 0.0))

    (neg_txt, has_neg_txt), (neg_img, has_neg_img) = draw(sim), draw(sim.t())
    return neg_txt, neg_img, has_neg_txt, has_neg_img


def itm_inputs(t_sg, att, v, v_mask, f_v, f_t, temp, img_id, filled=None):
    """The 3B fusion rows of losses.itm_loss and their weights: the B positives,
    (text b, hard-negative image) and (hard-negative text, image b). v: the images' states (B, S, D),
    or their tokens' rows in fuse_groups' pool (B, S).
    -> ((t, att, v, v_mask) of the 3B rows, weight (3B,)): weight 0 for an empty slot and for a row
    that found no negative, which losses.itm_loss leaves out."""
    neg_txt, neg_img, has_neg_txt, has_neg_img = sample_hard_negatives(f_v, f_t, temp, img_id, filled)
    # positives | text b with a negative image | image b with a negative text
    t_all = torch.cat([t_sg, t_sg, t_sg[neg_txt]])                         # (3B, T, D)
    a_all = torch.cat([att, att, att[neg_txt]])
    v_all = torch.cat([v, v[neg_img], v])                                  # (3B, S, D)
    m_all = None if v_mask is None else torch.cat([v_mask, v_mask[neg_img], v_mask])
    weight = torch.cat([torch.ones_like(has_neg_img) if filled is None else filled, has_neg_img, has_neg_txt])
    return (t_all, a_all, v_all, m_all), weight


def itm_ce(model, cls, weight):
    """ITM's loss on the fusion [CLS] (3B, D) of itm_inputs' rows: CE(itm_head(cls), [1]*B + [0]*2B)
    averaged over the rows of weight True."""
    B = len(cls) // 3
    labels = (torch.arange(3 * B, device=cls.device) < B).long()           # 1 for the positives
    return weighted_mean(F.cross_entropy(model.itm_head(cls).float(), labels, reduction="none"),
                         weight)


def itm_loss(model, t_sg, att, v, v_mask, f_v, f_t, temp, img_id, filled=None):
    """= losses.itm_loss: the fusion encoder once on itm_inputs' 3B rows, then itm_ce."""
    rows, weight = itm_inputs(t_sg, att, v, v_mask, f_v, f_t, temp, img_id, filled)
    return itm_ce(model, model.fuse(*rows)[:, 0], weight)


def mim_loss(pred, target, mim_mask):
    """= losses.mim_loss; pred, target (B, 1+P, D), mim_mask (B, P) bool;
    unmasked patches weigh 0."""
    assert not target.requires_grad, "the MIM target must be detached"
    # (B, 1+P) squared error / D
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return weighted_mean(err[:, 1:], mim_mask) + err[:, 0].mean()


def pixel_mim_loss(pred_pixels, images, mim_mask, patch_size):
    """= losses.pixel_mim_loss; unmasked patches weigh 0."""
    patches = patchify(images, patch_size)                                 # (B, P, 3*p*p)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()
    return weighted_mean((pred_pixels.float() - target).pow(2).mean(-1), mim_mask)


def bbox_loss(pred, target, is_region):
    """= losses.bbox_loss over the rows of is_region (N,) bool; the other rows weigh 0.
    -> (L_l1, L_giou)."""
    w = is_region.float()
    n_reg = w.sum().clamp(min=1)
    p, t = pred.float(), target.float()
    l1 = ((p - t).abs().sum(-1) * w).sum() / n_reg
    pb, tb = box_xyxy(p), box_xyxy(t)
    degenerate = (((pb[:, 2:] < pb[:, :2]) | (tb[:, 2:] <= tb[:, :2])).any(-1) & is_region).any()
    # GIoU off (a degenerate box in the batch) or not a region: the row compares the unit box with
    # itself, GIoU 1, loss 0. Weighting the row by 0 alone would not do: a degenerate box's GIoU is
    # NaN or inf, and 0 * NaN is NaN, in the sum and in the gradient.
    off = (degenerate | ~is_region)[:, None]                               # (N, 1)
    unit = pb.new_tensor([0.0, 0.0, 1.0, 1.0])
    giou = (1 - generalized_iou(torch.where(off, unit, pb),
                                torch.where(off, unit, tb))).sum() / n_reg
    return l1, giou


# --------------------------------------------------------------------------------------------------
# The entry point: losses.xfm_losses, computed with the tricks above


def vl_losses(model, b, pool, v_index, v_mask, stop_grad, suffix, box_index=None):
    """= losses.vl_losses on the images pool[v_index] (B, S, D), with ITM's 3B rows, IMLM's B rows
    (and, given box_index (N, S), box prediction's rows of each caption with its full image) in one
    fusion call (fuse_groups). -> (losses, box prediction's fused states or None)."""
    # filled (B,) bool: a region batch's filled caption slots (None: every row)
    out, filled = {}, b.get("filled")
    # (B, T, D), with grad (for ITC)
    t = model.encode_text(b["ids"], b["att"])
    f_t, f_v = model.itc_features(t, pool[v_index[:, :1]])                # the images' slot 0
    out["itc" + suffix] = itc_loss(f_v, f_t, model.temp, queries=filled, keys=filled)
    # the rows' images as pool indices: itm_inputs indexes them as it would the states
    itm_rows, itm_weight = itm_inputs(fusion_input(t, stop_grad), b["att"], v_index, v_mask,
                                      f_v, f_t, model.temp, b["img_id"], filled)
    # under the stop-gradient IMLM's language pass runs without a graph:
    # nothing would flow back into it
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_grad):
        t_m = model.encode_text(b["mlm_ids"], b["att"])
    groups = [itm_rows, (fusion_input(t_m, stop_grad), b["att"], v_index, v_mask)]
    if box_index is not None:
        groups.append((fusion_input(t, stop_grad), b["att"], box_index, None))
    # (3B, T, D), (B, T, D), [(B, T, D)]
    h_itm, h, *h_box = fuse_groups(model, pool, *groups)
    out["itm" + suffix] = itm_ce(model, h_itm[:, 0], itm_weight)
    out["imlm" + suffix] = mlm_loss(h, b["mlm_labels"], model.fusion_mlm, b.get("mlm_slots"))
    return out, (h_box[0] if h_box else None)


def mim_objective(model, image, mim_mask, v=None, stats=None, v_hat=None):
    """= losses.mim_objective; v_hat: the masked view's output when the caller has it (both_views),
    else None. An image batch's unmasked view (v None) runs without a graph: only its detached
    output is used."""
    if model.cfg.mim_target == "pixel":
        v_hat = model.encode_image(image, mim_mask)
        return pixel_mim_loss(model.pixel_head(v_hat[:, 1:]), image, mim_mask, model.cfg.patch_size)
    if v is None:
        with torch.no_grad():
            v = model.encode_image(image)
    # X-FM idea 2: losses.mim_objective
    target = v.detach()
    if stats is not None:
        stats.setdefault("mim_target_std", target[:, 1:].float().std(dim=(0, 1)).mean().detach())
    if v_hat is None:
        v_hat = model.encode_image(image, mim_mask)                        # the block-masked view
    return mim_loss(v_hat, target, mim_mask)


def xfm_losses(model, batch, stop_grad=True, stats=None):
    """= losses.xfm_losses (same arguments, same losses and gradients), for batches with fixed
    shapes."""
    out = {}
    use_mim = model.cfg.mim_target != "off"
    if "pair" in batch or "region" in batch:
        model.clamp_temp()

    if "text" in batch:
        b = batch["text"]
        t = model.encode_text(b["ids"], b["att"])
        out["mlm"] = mlm_loss(t, b["labels"], model.text_mlm, b.get("mlm_slots"))

    if "pair" in batch:
        b = batch["pair"]
        v_hat = None
        if model.cfg.mim_target == "vl":
            v, v_hat = both_views(model, b["image"], b["mim_mask"])        # 2 x (B, 1+P, D)
        else:
            v = model.encode_image(b["image"])                             # (B, 1+P, D)
        rows = token_index(torch.arange(len(v), device=v.device), v.shape[1])  # image b: v[b]
        vl, _ = vl_losses(model, b, v.flatten(0, 1), rows, None, stop_grad, "")
        out.update(vl)
        if use_mim:
            out["mim"] = mim_objective(model, b["image"], b["mim_mask"], v, stats, v_hat)

    if "region" in batch:
        b = batch["region"]
        # (B_img, 1+P, D) full images
        v = model.encode_image(b["image"])
        # (N, 1+P, D), (N, 1+P)
        v_r, v_r_mask = model.region_view(v, b["img_index"], b["patch_mask"])
        # the pool: every image's tokens, then each caption's slot 0 (the mean over its box)
        (n_img, S), N = v.shape[:2], len(v_r)
        pool = torch.cat([v.flatten(0, 1), v_r[:, 0]])                     # (n_img * S + N, D)
        full = token_index(b["img_index"], S)                             # = v[img_index]
        slot0 = n_img * S + torch.arange(N, device=v.device)[:, None]
        v_index = torch.cat([slot0, full[:, 1:]], dim=1)                   # = v_r
        vl, h = vl_losses(model, b, pool, v_index, v_r_mask, stop_grad, "_region", box_index=full)
        out.update(vl)
        # (N, 4) cx, cy, w, h in [0, 1]
        pred = model.bbox_head(h[:, 0]).sigmoid()
        out["bbox_l1"], out["bbox_giou"] = bbox_loss(pred, b["box"], b["is_region"])

    if "image" in batch and use_mim:
        b = batch["image"]
        out["mim_image"] = mim_objective(model, b["image"], b["mim_mask"], None, stats)
    return out
