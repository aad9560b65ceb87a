"""The fast paths of the training step against the slow computations they replace, on a fixed batch of
the tiny config: the same loss values AND the same gradient for every parameter (a fast path that dropped a
gradient, or took the wrong rows, would keep many values but not the gradients). Each test also checks that the
fast path is really taken (how many encoder passes run, under which grad mode, how many rows reach a head), so
removing an optimisation fails a test as surely as breaking one.

    fast path                                          where                          test
    MLM / IMLM heads on the masked positions only      fast_losses.mlm_loss              test_mlm_head_*
    IMLM language pass without a graph (stop-grad)     fast_losses.vl_losses             test_imlm_language_pass_*
    image-only MIM target without a graph              fast_losses.mim_objective         test_mim_target_*
    ITM negatives reuse the encoders' outputs          fast_losses.itm_inputs         test_itm_negatives_*
    a pair's two views in one vision call              fast_losses.xfm_losses            test_one_call_*
    ITM, IMLM and BBP rows in one fusion call          fast_losses.fuse_groups        test_one_call_*
    keys and values once per image token               fast_losses.fuse_groups        test_keys_and_values_*
    SDPA instead of the written-out softmax            model.Attention                test_sdpa_*
    auto: SDPA where fused, else the written-out path  runtime.choose_attention       test_auto_attention_*
    attention masks built once per encoder pass        model.additive_mask, encoders  test_masks_*
    every block's position bias in one gather          runtime.stack_position_biases  test_masks_*
    all of them at once                                fast_losses.xfm_losses         test_all_fast_paths_*
    fused AdamW (train.py and finetune.py on CUDA)     torch.optim.AdamW(fused=True)  test_fused_adamw_*
    pinned memory + non_blocking copies                runtime.to_device                test_pinned_* (CUDA only)
"""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from lib import fast_losses as losses
import model as model_py
from lib import runtime
from conftest import make_batch, tiny_config
from model import XFM

ALL_FAST = ("masked_heads", "no_grad_imlm", "no_grad_target", "reuse_itm", "one_vision_call", "one_fusion_call")

# ---------------------------------------------------------------------------------------------------------
# The slow reference: xfm_losses written out plainly, each fast path switchable


def slow_mlm_loss(hidden, labels, head):
    """The vocabulary-sized head on EVERY position, then a cross-entropy that ignores the unmasked ones."""
    logits = head(hidden)                                                  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def slow_itm_loss(model, b, t_sg, v, v_mask, f_v, f_t, reencode_images, stop_grad):
    """ITM whose hard negatives are encoded again from their raw inputs (pixels, token ids), in three fusion
    passes, instead of indexing the outputs the step already has."""
    neg_txt, neg_img, ii, ti = losses.sample_hard_negatives(f_v, f_t, model.temp, b["img_id"], b.get("filled"))
    if v_mask is None:
        v_mask = torch.ones(v.shape[:2], dtype=torch.bool)
    v_neg, m_neg = reencode_images(neg_img[ti])                            # the negative images, from pixels
    t_neg = losses.fusion_input(model.encode_text(b["ids"][neg_txt[ii]], b["att"][neg_txt[ii]]), stop_grad)
    cls = torch.cat([model.fuse(t_sg, b["att"], v, v_mask)[:, 0],         # positives
                     model.fuse(t_sg[ti], b["att"][ti], v_neg, m_neg)[:, 0],  # text i + a negative image
                     model.fuse(t_neg, b["att"][neg_txt[ii]], v[ii], v_mask[ii])[:, 0]])  # image i + a negative text
    labels = torch.zeros(len(cls), dtype=torch.long)
    labels[:len(t_sg)] = 1
    return F.cross_entropy(model.itm_head(cls).float(), labels)


def unshared_pool(groups):
    """fuse_groups' arguments for groups (t, att, v (n, S, D), v_mask): a pool where every row has its own copy of
    its image's tokens, so the cross-attention projects them once per row, as model.fuse does."""
    pool, out = torch.cat([g[2].flatten(0, 1) for g in groups]), []
    for t, att, v, v_mask in groups:
        start = sum(len(x) for _, _, x, _ in out) * v.shape[1]
        out.append((t, att, start + torch.arange(v.shape[0] * v.shape[1]).view(v.shape[:2]), v_mask))
    return (pool, *out)


def reference_losses(model, batch, stop_grad=True, fast=()):
    """The X-FM losses of docs/METHOD.md §4 without the fast paths, except those named in `fast` (ALL_FAST: the same
    computation as losses.xfm_losses). Hard negatives are drawn in the same order as xfm_losses draws them."""
    mlm = losses.mlm_loss if "masked_heads" in fast else slow_mlm_loss
    out = {}
    model.clamp_temp()
    if "text" in batch:
        b = batch["text"]
        out["mlm"] = mlm(model.encode_text(b["ids"], b["att"]), b["labels"], model.text_mlm)
    for kind, sfx in (("pair", ""), ("region", "_region")):
        if kind not in batch:
            continue
        b = batch[kind]
        if kind == "pair" and "one_vision_call" in fast:                   # both views in one call of 2B rows
            no_mask = torch.zeros_like(b["mim_mask"])
            v_full, v_hat = model.encode_image(torch.cat([b["image"], b["image"]]),
                                               torch.cat([no_mask, b["mim_mask"]])).chunk(2)
        else:
            v_full = model.encode_image(b["image"])                        # (B_img, 1+P, D)
            v_hat = model.encode_image(b["image"], b["mim_mask"]) if kind == "pair" else None
        if kind == "pair":
            v, v_mask = v_full, None
            ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)
            reencode = lambda rows: (lambda x: (x, ones(x)))(model.encode_image(b["image"][rows]))
        else:  # caption n sees the region view of its image img_index[n]
            v, v_mask = model.region_view(v_full, b["img_index"], b["patch_mask"])
            reencode = lambda rows: model.region_view(model.encode_image(b["image"][b["img_index"][rows]]),
                                                      torch.arange(len(rows)), b["patch_mask"][rows])
        t = model.encode_text(b["ids"], b["att"])
        f_t, f_v = model.itc_features(t, v)
        out["itc" + sfx] = losses.itc_loss(f_v, f_t, model.temp)
        t_sg = losses.fusion_input(t, stop_grad)
        if "reuse_itm" in fast:
            itm_rows, itm_weight = losses.itm_inputs(t_sg, b["att"], v, v_mask, f_v, f_t, model.temp, b["img_id"])
        else:
            out["itm" + sfx] = slow_itm_loss(model, b, t_sg, v, v_mask, f_v, f_t, reencode, stop_grad)
        # IMLM: slow = the masked caption's language pass always builds a graph (detached afterwards)
        with torch.set_grad_enabled(not (stop_grad and "no_grad_imlm" in fast)):
            t_m = model.encode_text(b["mlm_ids"], b["att"])
        groups = [(losses.fusion_input(t_m, stop_grad), b["att"], v, v_mask)]                   # IMLM
        if kind == "region":
            groups.append((t_sg, b["att"], v_full[b["img_index"]], None))                       # BBP: the full image
        if "reuse_itm" in fast:
            groups.insert(0, itm_rows)
        if "one_fusion_call" in fast:
            hs = list(losses.fuse_groups(model, *unshared_pool(groups)))
        else:                                                              # slow: one fusion call per objective
            hs = [model.fuse(*g) for g in groups]
        if "reuse_itm" in fast:
            out["itm" + sfx] = losses.itm_ce(model, hs.pop(0)[:, 0], itm_weight)
        out["imlm" + sfx] = mlm(hs[0], b["mlm_labels"], model.fusion_mlm)
        if kind == "pair":
            out["mim"] = losses.mim_loss(v_hat, v_full.detach(), b["mim_mask"])
        else:
            out["bbox_l1"], out["bbox_giou"] = losses.bbox_loss(model.bbox_head(hs[1][:, 0]).sigmoid(), b["box"],
                                                                b["is_region"])
    if "image" in batch:
        b = batch["image"]
        with torch.set_grad_enabled("no_grad_target" not in fast):         # slow: a graph, then detach
            target = model.encode_image(b["image"])
        out["mim_image"] = losses.mim_loss(model.encode_image(b["image"], b["mim_mask"]), target.detach(), b["mim_mask"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Helpers


def tiny_model(**kw):
    torch.manual_seed(0)
    return XFM(tiny_config(**kw)).train()  # dropout and drop path are 0 in tiny_config: deterministic


def step(model, fn, batch, seed=0):
    """({name: loss}, {param name: grad}) of one forward + backward of fn(model, batch); `seed` fixes the hard
    negatives (torch.multinomial is the only random draw with dropout and drop path off)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = fn(model, batch)
    sum(out.values()).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in out.items()}, grads


def assert_same(fast, slow, atol=1e-5, rtol=1e-4):
    (l_fast, g_fast), (l_slow, g_slow) = fast, slow
    assert sorted(l_fast) == sorted(l_slow)
    for k in l_fast:
        torch.testing.assert_close(l_fast[k], l_slow[k], atol=atol, rtol=rtol, msg=lambda m: f"loss {k}: {m}")
    assert sum(g.abs().sum() for g in g_fast.values()) > 0
    for n in g_fast:
        torch.testing.assert_close(g_fast[n], g_slow[n], atol=atol, rtol=rtol, msg=lambda m: f"grad of {n}: {m}")


def record_calls(module):
    """Forward hook on `module`: a list of (first input, grad mode) per call."""
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append((args[0], torch.is_grad_enabled())))
    return calls


@pytest.fixture(scope="module")
def batch():
    return make_batch(tiny_config())


# ---------------------------------------------------------------------------------------------------------
# The fast paths, one at a time


def test_mlm_head_on_masked_positions_only(batch):
    """The head runs on K slots per row, K = the data's bound on masked positions per row (data.mlm_slots), with
    the masked positions gathered into them: the same loss and gradients as the head on every position."""
    model = tiny_model()
    b = batch["text"]
    hidden = torch.randn(*b["ids"].shape, model.cfg.width, requires_grad=True)  # (B, T, D)
    K = int((b["labels"] != -100).sum(1).max())                            # the most masked positions of a row
    rows = []
    model.text_mlm.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    results = []
    for fn in (lambda *a: losses.mlm_loss(*a, slots=K), slow_mlm_loss, losses.mlm_loss):
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = fn(hidden, b["labels"], model.text_mlm)
        loss.backward()
        results.append(({"mlm": loss.detach()}, {"hidden": hidden.grad.clone(),
                                                 **{n: p.grad.clone() for n, p in model.text_mlm.named_parameters()}}))
    assert_same(*results[:2], atol=1e-6)
    assert_same(*results[1:], atol=1e-6)                                  # no bound given: every position
    B, T = b["ids"].shape
    assert rows == [(B, K), (B, T), (B, T)] and K < T / 2                 # the fast head saw K slots per row


def test_mlm_head_with_no_masked_position_adds_nothing():
    """No masked token in a batch: the fast loss is 0 with zero gradients (the full-position CE would be NaN)."""
    model = tiny_model()
    hidden = torch.randn(2, 5, model.cfg.width, requires_grad=True)
    loss = losses.mlm_loss(hidden, torch.full((2, 5), -100), model.text_mlm)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


@pytest.mark.parametrize("stop_grad", [True, False])
def test_imlm_language_pass_without_graph(batch, stop_grad):
    """Under the stop-gradient the masked caption's language pass runs without a graph: the same IMLM losses and
    every gradient as the pass with a graph that is detached afterwards. Without the stop-gradient the graph
    must be kept (IMLM then trains the language encoder: a wrongly disabled graph loses those gradients)."""
    vl = {k: batch[k] for k in ("pair", "region")}
    model = tiny_model()
    calls = record_calls(model.text)
    fast = step(model, lambda m, bt: losses.xfm_losses(m, bt, stop_grad=stop_grad), vl)
    masked_pass_grad = [g for x, g in calls if any(x is vl[k]["mlm_ids"] for k in vl)]
    assert masked_pass_grad == [not stop_grad] * 2                         # one per kind, graph only without sg
    slow = step(model, lambda m, bt: reference_losses(m, bt, stop_grad, [f for f in ALL_FAST if f != "no_grad_imlm"]), vl)
    assert_same(fast, slow)
    text_grad = sum(g.abs().sum() for n, g in fast[1].items() if n.startswith("text."))
    assert text_grad > 0  # ITC always reaches the language encoder


def test_mim_target_without_graph(batch):
    """The image-only MIM target (the unmasked pass) runs under no_grad: the same loss and gradients as a pass
    with a graph that is detached."""
    img = {"image": batch["image"]}
    model = tiny_model()
    calls = record_calls(model.vision)
    fast = step(model, losses.xfm_losses, img)
    assert [g for _, g in calls] == [False, True]                          # target without graph, masked view with
    slow = step(model, lambda m, bt: reference_losses(m, bt, True, [f for f in ALL_FAST if f != "no_grad_target"]), img)
    assert_same(fast, slow)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_itm_negatives_reuse_encoder_outputs(batch, stop_grad):
    """ITM's hard negatives index the encoders' outputs of the step (text states, image tokens, region views)
    instead of encoding the negative images and captions again: the same losses and gradients (the vision
    encoder's gradient from the negatives arrives through the shared output), with fewer encoder passes."""
    vl = {k: batch[k] for k in ("pair", "region")}
    model = tiny_model()
    vision_calls, text_calls = record_calls(model.vision), record_calls(model.text)
    fast = step(model, lambda m, bt: losses.xfm_losses(m, bt, stop_grad=stop_grad), vl)
    # pair: both views in one pass; region: one pass; language: caption + masked caption per kind
    assert (len(vision_calls), len(text_calls)) == (2, 4)
    slow = step(model, lambda m, bt: reference_losses(m, bt, stop_grad, [f for f in ALL_FAST if f != "reuse_itm"]), vl)
    assert (len(vision_calls), len(text_calls)) == (2 + 4, 4 + 6)  # the reference re-encodes the negatives
    assert_same(fast, slow)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_one_call_for_both_views_and_for_every_fusion_objective(batch, stop_grad):
    """A pair batch's unmasked image and block-masked view go through the vision encoder as one call of 2B rows, and
    each image-text kind's fusion rows (ITM's 3B, IMLM's B, for regions BBP's B) go through the fusion encoder as
    one call: the same losses and gradients as one call per view and per objective (no op of an encoder mixes rows)."""
    vl = {k: batch[k] for k in ("pair", "region")}
    model = tiny_model()
    vision_calls, fusion_calls = record_calls(model.vision), record_calls(model.fusion)
    fast = step(model, lambda m, bt: losses.xfm_losses(m, bt, stop_grad=stop_grad), vl)
    B, N = len(vl["pair"]["ids"]), len(vl["region"]["ids"])
    assert [len(x) for x, _ in vision_calls] == [2 * B, len(vl["region"]["image"])]
    assert [len(x) for x, _ in fusion_calls] == [4 * B, 5 * N]
    slow_paths = [f for f in ALL_FAST if f not in ("one_vision_call", "one_fusion_call")]
    slow = step(model, lambda m, bt: reference_losses(m, bt, stop_grad, slow_paths), vl)
    assert [len(x) for x, _ in vision_calls[2:]] == [B, B, len(vl["region"]["image"])]
    assert [len(x) for x, _ in fusion_calls[2:]] == [3 * B, B, 3 * N, N, N]
    assert_same(fast, slow)


def test_keys_and_values_once_per_image_token(batch):
    """The fusion encoder's cross-attention projects the keys and values of each image token once per step (the pair
    images' tokens; the region images' tokens and each caption's slot 0), not once per fusion row that attends to
    it (ITM's 3 rows and IMLM's row per pair; 5 rows per caption with box prediction): the same losses and
    gradients."""
    vl = {k: batch[k] for k in ("pair", "region")}
    model = tiny_model()
    projected = record_calls(model.fusion.blocks[0].cross_attn.kv)
    fast = step(model, lambda m, bt: losses.xfm_losses(m, bt), vl)
    B, N, n_img = len(vl["pair"]["ids"]), len(vl["region"]["ids"]), len(vl["region"]["image"])
    S = model.cfg.num_patches + 1
    assert [x.shape[:-1] for x, _ in projected] == [(B * S,), (n_img * S + N,)]
    slow = step(model, lambda m, bt: reference_losses(m, bt, True, ALL_FAST), vl)
    assert [x.shape[:-1] for x, _ in projected[2:]] == [(4 * B * S,), (5 * N * S,)]
    assert_same(fast, slow)


@pytest.mark.parametrize("impl", ["sdpa", "auto"])
def test_sdpa_equals_explicit_attention(batch, impl):
    """F.scaled_dot_product_attention (and auto as runtime.choose_attention makes it on a CPU, which mixes both)
    and the written-out softmax(q k^T / sqrt(d) + mask) v give the same losses and gradients on every data kind:
    text padding, the position bias, region masks."""
    fast = runtime.choose_attention(tiny_model(attn_impl=impl), torch.device("cpu"))
    explicit = tiny_model(attn_impl="explicit")
    explicit.load_state_dict(fast.state_dict())
    assert_same(step(fast, losses.xfm_losses, batch), step(explicit, losses.xfm_losses, batch))


def test_itc_scores_are_fp32_under_autocast():
    """Under bf16 autocast ITC and the hard negatives score in fp32 (fast_losses.fp32_scores): the loss equals
    the fp32 one to fp32 rounding, where bf16 similarities over a temperature of 0.01 move it by ~1e-2."""
    g = torch.Generator().manual_seed(0)
    f_v, f_t = (F.normalize(torch.randn(16, 32, generator=g), dim=-1) for _ in range(2))
    temp = torch.tensor(0.01)
    fp32 = losses.itc_loss(f_v, f_t, temp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = losses.itc_loss(f_v, f_t, temp)
        sim = losses.fp32_scores(f_v, f_t, temp)
    assert sim.dtype == torch.float32 and torch.equal(sim, f_v @ f_t.t() / temp)
    assert torch.allclose(amp, fp32, rtol=1e-6, atol=1e-6), (amp.item(), fp32.item())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_auto_attention_takes_sdpa_only_where_it_is_fused(batch, dropout, monkeypatch):
    """attn_impl auto (runtime.choose_attention) on a CPU: SDPA's fused kernel takes no dropout and gives no
    gradient to a mask, so an attention layer without either calls SDPA and the rest run the written-out path (SDPA
    would fall back to the same math in more ops): in a training step the vision blocks (a learned position bias)
    never call SDPA, the text and fusion blocks only when their dropout is 0. On a GPU every layer calls SDPA."""
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(model_py.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: sdpa_calls.append(kw) or sdpa(q, k, v, **kw))
    model = runtime.choose_attention(tiny_model(attn_impl="auto", dropout=dropout), torch.device("cpu"))
    calls = []                                                             # the encoder of each attention call
    for name in ("text", "vision", "fusion"):
        for blk in getattr(model, name).blocks:
            for attn in [blk.attn] + ([blk.cross_attn] if hasattr(blk, "cross_attn") else []):
                attn.register_forward_hook(lambda *_, n=name: calls.append(n))
    step(model, losses.xfm_losses, batch)
    fused = [c for c in calls if c != "vision" and not dropout]
    assert len(sdpa_calls) == len(fused) and len(calls) > len(fused)
    assert not any(kw["dropout_p"] > 0 or (kw["attn_mask"] is not None and kw["attn_mask"].requires_grad)
                   for kw in sdpa_calls)
    gpu = runtime.choose_attention(tiny_model(attn_impl="auto", dropout=dropout), torch.device("cuda"))
    assert all(m.sdpa for m in gpu.modules() if isinstance(m, model_py.Attention))


def plain_mask(key_mask):
    """The (B, 1, 1, S) additive mask of a key mask, built the plain way: -inf filled in where the key is masked."""
    return torch.zeros(key_mask.shape).masked_fill(~key_mask.bool(), float("-inf"))[:, None, None, :]


def plain_rel_pos(rpb):
    """One block's relative position bias gathered from its own table: (nh, N, N)."""
    n = rpb.index.shape[0]
    return rpb.table[rpb.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


@contextmanager
def masks_per_layer(model):
    """Every attention layer gets its mask made in that layer, the plain way, from the key masks its encoder was
    called with (each vision block: its own bias), in place of what the encoder built once and handed down."""
    seen = {}
    hooks = [model.text.register_forward_pre_hook(lambda m, a: seen.update(text=a[1])),
             model.fusion.register_forward_pre_hook(lambda m, a: seen.update(fusion=a[1], image=a[3]))]

    def swap(module, make):  # the attention's `mask` keyword replaced by make()
        hooks.append(module.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "mask": make()}), with_kwargs=True))
    for blk in model.text.blocks:
        swap(blk.attn, lambda: plain_mask(seen["text"]))
    for blk in model.fusion.blocks:
        swap(blk.attn, lambda: plain_mask(seen["fusion"]))
        swap(blk.cross_attn, lambda: None if seen["image"] is None else plain_mask(seen["image"]))
    for blk in model.vision.blocks:
        swap(blk.attn, lambda rpb=blk.rel_pos: plain_rel_pos(rpb))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def test_masks_built_once_per_encoder_pass(batch, monkeypatch):
    """Each encoder pass builds its additive masks once (additive_mask: the text padding, a region's patches)
    and gathers every block's position bias in one op (runtime.stack_position_biases), then hands them to its
    layers: the same losses and gradients (every relative position table included) as masks made in each layer
    the plain way; and only once per pass (a mask per layer would be the slow path)."""
    built = {"masks": 0, "gathers": 0}
    real_mask, real_stacked = model_py.additive_mask, runtime.stacked_biases

    def count(key, fn):
        return lambda *a: built.__setitem__(key, built[key] + 1) or fn(*a)
    monkeypatch.setattr(model_py, "additive_mask", count("masks", real_mask))
    monkeypatch.setattr(runtime, "stacked_biases", count("gathers", real_stacked))
    model = runtime.stack_position_biases(tiny_model())
    passes = {"text": [], "vision": [], "fusion": []}
    for name, calls in passes.items():
        getattr(model, name).register_forward_pre_hook(lambda m, a, c=calls: c.append(a))
    fast = step(model, losses.xfm_losses, batch)
    region_fusions = sum(a[3] is not None for a in passes["fusion"])
    assert built == {"masks": len(passes["text"]) + len(passes["fusion"]) + region_fusions,
                     "gathers": len(passes["vision"])} and region_fusions > 0
    with masks_per_layer(model):
        slow = step(model, losses.xfm_losses, batch)
    assert_same(fast, slow)
    assert all(fast[1][f"vision.blocks.{i}.rel_pos.table"].abs().sum() > 0 for i in range(model.cfg.vision_layers))



def test_a_training_run_gathers_the_position_biases_at_once(batch, monkeypatch):
    """train.setup_model gives a run's model the stacked position biases (runtime.wrap, stack_position_biases): one
    gather per vision encoder pass, not one per block."""
    import train
    from lib import formats
    gathers = []
    real = runtime.stacked_biases
    monkeypatch.setattr(runtime, "stacked_biases", lambda rel_pos: gathers.append(len(rel_pos)) or real(rel_pos))
    ctx = train.Context(None, False, 0, 1, torch.device("cpu"), formats.BadInput())
    model = train.setup_model(train.TrainConfig(), ctx, tiny_config(), {})[0]
    with torch.no_grad():
        model.encode_image(batch["image"]["image"])
    assert gathers == [model.cfg.vision_layers]


def test_all_fast_paths_together(batch):
    """losses.xfm_losses with SDPA == the slow reference with explicit attention, on all four data kinds; and the
    reference with every fast path switched on is xfm_losses itself (so the single-path tests above compare
    against a faithful copy)."""
    fast_model = tiny_model(attn_impl="sdpa")
    slow_model = tiny_model(attn_impl="explicit")
    slow_model.load_state_dict(fast_model.state_dict())
    fast = step(fast_model, losses.xfm_losses, batch)
    assert_same(fast, step(slow_model, reference_losses, batch))
    assert_same(fast, step(fast_model, lambda m, bt: reference_losses(m, bt, True, ALL_FAST), batch), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Optimizer and host-to-device copies

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_matches_foreach(batch, device):
    """AdamW(fused=True) (train.py and finetune.py on CUDA) makes the same updates as the default for-each AdamW:
    three steps with two parameter groups (decay / no decay) on the gradients of a real step."""
    model = tiny_model()
    _, grads = step(model, losses.xfm_losses, batch)
    params = {}
    for kind in ("fused", "foreach"):
        ps = {n: p.detach().clone().to(device).requires_grad_() for n, p in model.named_parameters()}
        groups = [{"params": [p for n, p in ps.items() if p.ndim >= 2], "weight_decay": 0.01},
                  {"params": [p for n, p in ps.items() if p.ndim < 2], "weight_decay": 0.0}]
        try:
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, fused=kind == "fused",
                                    foreach=None if kind == "fused" else True)
        except RuntimeError as e:  # an old torch without a fused CPU kernel
            pytest.skip(f"fused AdamW unavailable on {device}: {e}")
        for i in range(3):
            for n, p in ps.items():
                p.grad = grads[n].to(device) * (1 + i)                     # a different gradient each step
            opt.step()
        params[kind] = ps
    for n in params["fused"]:
        torch.testing.assert_close(params["fused"][n], params["foreach"][n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(not torch.equal(params["fused"][n].cpu(), p) for n, p in model.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_non_blocking_copy_is_exact(batch):
    """runtime.to_device with non_blocking=True from pinned memory (what a DataLoader with pin_memory=True hands
    out) gives the same tensors as a plain copy, once the stream is synchronized."""
    runtime = pytest.importorskip("runtime")
    device = torch.device("cuda")
    for kind, b in batch.items():
        pinned = {k: v.pin_memory() for k, v in b.items()}
        assert all(v.is_pinned() for v in pinned.values())
        got = runtime.to_device(pinned, device)
        torch.cuda.synchronize()
        for k, v in b.items():
            assert torch.equal(got[k].cpu(), v), (kind, k)
