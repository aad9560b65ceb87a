"""
A walk through X-FM in one printout: a toy batch of every data kind (text, image, pair, region) goes through
every module of a tiny X-FM, and the script prints the tensor shapes at each stage, every loss, which encoder
each loss trains (with the stop-gradient on and off), a check of the MIM target, and how far one step of the
vision-language losses alone moves that target. Seconds on a CPU, no downloads, nothing left on disk; the same
printout on every run (seed 0, fp32, modest precision).

    python walkthrough.py                                  # read it beside README's "X-FM in one screen"
    python walkthrough.py > tests/walkthrough_expected.txt # the golden printout tests/test_walkthrough.py compares

The batch is data.py's own (`toy_batch`: its streams on a toy world of a few images in a temporary folder), but
one batch of an untrained model: the numbers mean nothing about learning; the shapes, the zeros in the gradient
table, the MIM check and which MIM target moves are the point.
docs/METHOD.md §3 quotes this printout. tools/check_setup.py reuses `toy_batch`, `tiny_model` and `one_thread`.
"""
import copy
import tempfile
from contextlib import contextmanager

import torch

import data
from lib import formats, streams, tokenizer, toyworld
from losses import fusion_input, xfm_losses
import losses
from model import XFM, make_config

GROUPS = ("language", "vision", "fusion", "heads")
LOSS_ORDER = ("mlm", "itc", "itm", "imlm", "mim", "itc_region", "itm_region", "imlm_region", "bbox_l1", "bbox_giou",
              "mim_image")
VL_LOSSES = ("itm", "imlm", "itm_region", "imlm_region", "bbox_l1", "bbox_giou")  # the losses the detach cuts
VL_STEP = ("itc", "itm", "imlm")  # a pair batch's vision-language losses: section 12's step, no MIM


# ---------------------------------------------------------------------------------------------------------
# A tiny model and data.py's batch of every data kind


def tiny_model(seed=0, **overrides):
    """The tiny preset (tests, CI), a 300-word vocabulary (toy_batch's tokenizer fits in it), no dropout or drop
    path: the same numbers every run."""
    torch.manual_seed(seed)
    cfg = make_config("tiny", **{"vocab_size": 300, "dropout": 0.0, "drop_path": 0.0, **overrides})
    return XFM(cfg)


def toy_batch(cfg, B=4, T=16, seed=0):
    """{"text", "image", "pair", "region"}: the first batch of each of data.py's streams, exactly as train.py gets
    them (streams.build_streams, then next() on each stream). The data: a toy world (lib/toyworld.py) of B pairs,
    B // 2 region images, B texts and B images, written to a temporary folder and deleted after, and a BPE
    tokenizer trained on its texts with at most cfg.vocab_size words (lib/tokenizer.py). Texts and captions are
    padded to T tokens (DataConfig.static); each region image has one box caption and its whole-image caption
    (max_regions=1). Milliseconds."""
    with tempfile.TemporaryDirectory() as d:
        toyworld.make_toy(d, seed=seed, n_pairs=B, n_regions=B // 2, n_text=B, n_images=B, n_test=1, n_down=1,
                          progress=False)
        tok = tokenizer.get_tokenizer(d, d, cfg.vocab_size)
        assert tok.vocab_size <= cfg.vocab_size, (tok.vocab_size, cfg.vocab_size)
        dc = data.DataConfig(cfg.image_size, cfg.patch_size, text_len=T, caption_len=T, seed=seed, max_regions=1,
                             static=True)
        sizes = {"text": B, "image": B, "pair": B, "region": B // 2}
        found = streams.build_streams(d, tok, dc, sizes, formats.BadInput(verbose=False))
        return {kind: next(stream) for kind, stream in found.items()}


@contextmanager
def one_thread():
    """torch on one thread inside, the caller's count restored after. The tensors here are tiny: threads only add
    overhead, and on a busy machine (OMP threads waiting on each other) one thread runs ten times faster or more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------
# Printing


def shape(x):
    return str(tuple(x.shape))


def row(name, x, note=""):
    print(f"  {name:<34} {shape(x) if torch.is_tensor(x) else x:<16} {note}".rstrip())


def num(x):
    """Three significant digits; an exact zero prints as 0, so 'no gradient' stands out."""
    return "0" if x == 0 else f"{x:.2e}"


# ---------------------------------------------------------------------------------------------------------
# The stages


def show_shapes(model, batch):
    """Every stage of one forward pass, with the functions losses.xfm_losses calls, shapes only."""
    cfg = model.cfg
    print("1. inputs: data.py's first batch of each stream (data.py's module docstring lists every key)")
    for kind, b in batch.items():
        for key, x in b.items():
            row(f"{kind}[{key!r}]", x, str(x.dtype).replace("torch.", "") if torch.is_tensor(x) else "int")
    with torch.no_grad():
        p, r = batch["pair"], batch["region"]
        print("2. language encoder E_t (model.TextEncoder)")
        t = model.encode_text(p["ids"], p["att"])
        row("t = E_t(pair ids)", t, "(B, T, D) one state per token")
        row("t[:, 0]", t[:, 0], "(B, D) <s>: the text [CLS]")
        row("text_mlm(E_t(text ids))", model.text_mlm(model.encode_text(batch["text"]["ids"], batch["text"]["att"])),
            "(B, T, V) MLM logits; the loss reads the masked slots only")
        print("3. vision encoder E_v (model.VisionEncoder)")
        v = model.encode_image(p["image"])
        row("v = E_v(image)", v, f"(B, 1+P, D), P = {cfg.num_patches} patches of {cfg.patch_size} px")
        row("v[:, 0]", v[:, 0], "(B, D) slot 0 = mean of the patch outputs: the image [CLS]")
        row("v_hat = E_v(image, mim_mask)", model.encode_image(p["image"], p["mim_mask"]),
            "(B, 1+P, D) the block-masked view, MIM's prediction")
        print("4. region view (model.XFM.region_view)")
        v_img = model.encode_image(r["image"])
        row("E_v(region images)", v_img, "(B_img, 1+P, D) two captions per image")
        v_r, v_r_mask = model.region_view(v_img, r["img_index"], r["patch_mask"])
        row("v_r", v_r, "(N, 1+P, D) slot 0 = mean of the patches in the box")
        row("v_r_mask", v_r_mask, "(N, 1+P) cross-attention sees slot 0 + the box")
        print("5. ITC features (model.XFM.itc_features)")
        f_t, f_v = model.itc_features(t, v)
        row("f_t = norm(text_proj(t[:, 0]))", f_t, f"(B, E) unit length: {f_t.norm(dim=-1).mean():.3f}")
        row("f_v = norm(vision_proj(v[:, 0]))", f_v, "(B, E)")
        row("f_v @ f_t.T / temp", f_v @ f_t.t() / model.temp, "(B, B) image x text similarities")
        print("6. ITM rows (losses.itm_loss: positives, then hard negatives)")
        torch.manual_seed(0)  # the hard negatives are drawn
        neg_txt, neg_img = losses.sample_hard_negatives(f_v, f_t, model.temp, p["img_id"])
        row("negative text of each image", neg_txt, "(B,) ~ softmax(sim / temp), never the positive")
        row("negative image of each text", neg_img, "(B,) likewise")
        t_sg = fusion_input(t)
        t_rows, a_rows = torch.cat([t_sg, t_sg, t_sg[neg_txt]]), torch.cat([p["att"], p["att"], p["att"][neg_txt]])
        v_rows = torch.cat([v, v[neg_img], v])
        row("text rows", t_rows, "(3B, T, D) sg(t): b, b, hard-negative text")
        row("image rows", v_rows, "(3B, 1+P, D) image b, hard-negative image, b")
        print("7. fusion encoder F (model.FusionEncoder; one call per objective)")
        t_m = model.encode_text(p["mlm_ids"], p["att"])
        h_itm, h_imlm = model.fuse(t_rows, a_rows, v_rows), model.fuse(fusion_input(t_m), p["att"], v)
        row("h = F(sg(t), v), ITM rows", h_itm, "(3B, T, D) text-side states; h[:, 0] = fusion [CLS]")
        row("h = F(sg(E_t(masked caption)), v)", h_imlm, "(B, T, D) IMLM")
        t_r = model.encode_text(r["ids"], r["att"])
        h_box = model.fuse(fusion_input(t_r), r["att"], v_img[r["img_index"]])
        row("h = F(sg(t_region), v_full)", h_box, "(N, T, D) box prediction reads the FULL image")
        print("8. heads")
        row("itm_head(h[:, 0])", model.itm_head(h_itm[:, 0]), "(3B, 2) [no match, match]")
        row("fusion_mlm(h)", model.fusion_mlm(h_imlm), "(B, T, V) IMLM logits")
        row("bbox_head(h[:, 0]).sigmoid()", model.bbox_head(h_box[:, 0]).sigmoid(), "(N, 4) cx, cy, w, h")


def group_params(model):
    """{group: parameters}: each encoder, and 'heads' = every other parameter (projections, temperature, ITM,
    box and MLM heads; the MLM decoder is tied to the word embeddings, so it counts as language)."""
    parts = {"language": model.text, "vision": model.vision, "fusion": model.fusion}
    out = {name: list(m.parameters()) for name, m in parts.items()}
    taken = {id(q) for ps in out.values() for q in ps}
    out["heads"] = [q for q in model.parameters() if id(q) not in taken]
    return out


def gradient_table(model, batch, stop_grad):
    """{loss: {group: L2 norm of the gradient that loss alone sends to the group's parameters}} (0.0: none)."""
    torch.manual_seed(0)  # the same hard negatives with the stop-gradient on and off
    out = xfm_losses(model, batch, stop_grad=stop_grad)
    groups = group_params(model)
    params = [q for ps in groups.values() for q in ps]
    table = {}
    for name in LOSS_ORDER:  # one backward pass per loss, its gradients split by group
        grads = torch.autograd.grad(out[name], params, retain_graph=True, allow_unused=True)  # None: not reached
        table[name], start = {}, 0
        for group, ps in groups.items():
            reached = [g for g in grads[start:start + len(ps)] if g is not None]
            table[name][group] = sum(float(g.pow(2).sum()) for g in reached) ** 0.5
            start += len(ps)
    return {k: float(v.detach()) for k, v in out.items()}, table


def mim_check(model, batch):
    """The MIM target, caught on its way into losses.mim_loss: the detached output of the same vision encoder on
    the unmasked image. -> {check: bool}."""
    seen = []
    real = losses.mim_loss

    def spy(pred, target, mim_mask):  # records what mim_objective hands to the loss, then computes it as usual
        seen.append((pred, target))
        return real(pred, target, mim_mask)

    losses.mim_loss = spy
    try:
        torch.manual_seed(0)
        out = xfm_losses(model, {k: batch[k] for k in ("pair", "image")})
    finally:
        losses.mim_loss = real
    checks = {}
    for (pred, target), kind in zip(seen, ("pair", "image")):
        b = batch[kind]
        with torch.no_grad():
            fresh, masked = model.encode_image(b["image"]), model.encode_image(b["image"], b["mim_mask"])
        checks[f"{kind}: target equals a fresh no-grad E_v(unmasked image)"] = torch.allclose(target, fresh, atol=1e-5)
        checks[f"{kind}: target.requires_grad is False"] = not target.requires_grad
        checks[f"{kind}: prediction equals E_v(masked view)"] = torch.allclose(pred, masked, atol=1e-5)
    # the gradient of MIM through the target is none: the same as with a target made under no_grad
    params = list(model.vision.parameters())
    g_loss = torch.autograd.grad(out["mim_image"], params, allow_unused=True)
    b = batch["image"]
    with torch.no_grad():
        target = model.encode_image(b["image"])
    g_ref = torch.autograd.grad(real(model.encode_image(b["image"], b["mim_mask"]), target, b["mim_mask"]), params,
                                allow_unused=True)
    checks["image: MIM gradient equals the one with a no-grad target"] = all(
        (a is None and c is None) or (a is not None and c is not None and torch.allclose(a, c, atol=1e-6))
        for a, c in zip(g_loss, g_ref))
    return checks


def vl_guided_target(model, batch, lr=1e-4):
    """X-FM's idea 2, measured: the MIM target of the image batch (the vision encoder's output on the unmasked
    images, with no gradient, as losses.py takes it) before and after ONE plain AdamW step (lr 1e-4, X-FM's
    official peak lr) on the pair batch's vision-language losses alone (VL_STEP: ITC, ITM, IMLM; no MIM loss), on
    a copy of the model. The target moves although no MIM loss was taken: the encoder that makes it is the one the
    vision-language losses train. A pixel target (MAE: each patch's pixels normalised, as losses.pixel_mim_loss
    takes them) cannot move. Adam's first step moves each weight by about lr whatever its gradient's size, so
    the number says that the target follows the encoder, not how hard the losses pull.
    -> {"vl": (before, after), "pixel": (before, after), "change": {target: ||after - before|| / ||before||}}."""
    model = copy.deepcopy(model)  # the caller's model stays as it is
    images, p = batch["image"]["image"], model.cfg.patch_size

    def targets():
        with torch.no_grad():
            vl = model.encode_image(images)                                # (B, 1+P, D)
        x = losses.patchify(images, p)                                     # (B, P, 3*p*p)
        return vl, (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()

    before = targets()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)  # the hard negatives are drawn
    out = xfm_losses(model, {"pair": batch["pair"]})                       # also holds "mim": left out
    sum(out[name] for name in VL_STEP).backward()
    opt.step()
    after = targets()
    change = {k: float((a - b).norm() / b.norm()) for k, b, a in zip(("vl", "pixel"), before, after)}
    return {"vl": (before[0], after[0]), "pixel": (before[1], after[1]), "change": change}


def main():
    with one_thread():
        return walk()


def walk():
    model = tiny_model()
    cfg = model.cfg
    batch = toy_batch(cfg)
    n = {k: sum(q.numel() for q in ps) for k, ps in group_params(model).items()}
    print(f"X-FM walkthrough: a tiny X-FM (D={cfg.width}, {cfg.heads} heads, layers {cfg.text_layers}/"
          f"{cfg.vision_layers}/{cfg.fusion_layers}, image {cfg.image_size} px, patch {cfg.patch_size}, "
          f"V={cfg.vocab_size}, E={cfg.embed_dim}), seed 0, fp32")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in n.items()))
    B, T = batch["pair"]["ids"].shape
    n_img, N = len(batch["region"]["image"]), len(batch["region"]["ids"])
    print(f"B={B} rows of each kind, texts and captions of T={T} tokens; region: {n_img} images x {N // n_img} "
          f"captions (N={N})")
    show_shapes(model, batch)

    values_on, on = gradient_table(model, batch, stop_grad=True)
    values_off, off = gradient_table(model, batch, stop_grad=False)
    print("9. losses (losses.xfm_losses); the stop-gradient changes the backward pass only, so the values agree")
    print(f"  {'loss':<12} {'stop_grad on':>12} {'off':>10}")
    for name in LOSS_ORDER:
        print(f"  {name:<12} {values_on[name]:>12.4f} {values_off[name]:>10.4f}")
    print("10. gradient norm each loss alone sends to each part (L2 over the part's parameters; 0 = none)")
    head = f"  {'':<12} {'stop-gradient ON (pre-training)':^44} | {'stop-gradient OFF (--stop_grad=false)':^44}"
    print(head.rstrip())
    print(f"  {'loss':<12}" + "".join(f"{g:>11}" for g in GROUPS) + " |" + "".join(f"{g:>11}" for g in GROUPS))
    for name in LOSS_ORDER:
        print(f"  {name:<12}" + "".join(f"{num(on[name][g]):>11}" for g in GROUPS) + " |"
              + "".join(f"{num(off[name][g]):>11}" for g in GROUPS))
    cut = [k for k in VL_LOSSES if on[k]["language"] == 0 and off[k]["language"] > 0]
    print(f"  language encoder: 0 from {', '.join(cut)} with the stop-gradient,")
    print("  non-zero without it; MLM and ITC reach it either way; MIM never reaches the language or fusion encoder")
    print("11. the MIM target (losses.mim_objective): the same vision encoder on the unmasked image, detached")
    checks = mim_check(model, batch)
    for name, ok in checks.items():
        print(f"  {name:<62} {ok}")
    guided = vl_guided_target(model, batch)
    print(f"12. why the MIM target is vision-language-guided: one AdamW step (lr 1e-4) on {' + '.join(VL_STEP)}")
    print("  of the pair batch alone, no MIM loss; the image batch's MIM target before and after it")
    print(f"  {'target':<52} {'||after - before|| / ||before||'}")
    print(f"  {'X-FM: E_v(unmasked image), detached (losses.py)':<52} {num(guided['change']['vl'])}")
    print(f"  {'MAE: normalised patch pixels (losses.patchify)':<52} {num(guided['change']['pixel'])}")
    print("  X-FM's target follows what the encoder learns from the captions; a pixel target never does")
    return {"losses": values_on, "on": on, "off": off, "mim": checks, "guided": guided, "batch": batch}


if __name__ == "__main__":
    main()
