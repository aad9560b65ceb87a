"""The modules: attention paths, BEiT's q/v biases, padding, RoBERTa's position ids, the relative position bias, the vision output and mask token,
the fusion encoder's wiring, and the presets."""
import math

import pytest
import torch

from conftest import tiny_config
from model import XFM, Attention, RelativePositionBias, additive_mask, drop_path, make_config


@pytest.mark.parametrize("cross", [False, True])
def test_explicit_attention_equals_sdpa(cross):
    torch.manual_seed(0)
    fast = Attention(32, 4, cross=cross, beit_bias=not cross, sdpa=True).eval()
    slow = Attention(32, 4, cross=cross, beit_bias=not cross, sdpa=False).eval()
    slow.load_state_dict(fast.state_dict())
    x, kv = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    key_mask = torch.ones(3, 7 if cross else 5, dtype=torch.bool)
    key_mask[0, -2:] = False
    mask = additive_mask(key_mask) + (0 if cross else torch.randn(4, 5, 5))  # (B, 1, 1, S) + a position bias
    a = fast(x, kv=kv if cross else None, mask=mask)
    b = slow(x, kv=kv if cross else None, mask=mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_whole_model_explicit_equals_sdpa():
    torch.manual_seed(0)
    fast = XFM(tiny_config()).eval()
    slow = XFM(tiny_config(attn_impl="explicit")).eval()
    slow.load_state_dict(fast.state_dict())
    img = torch.randn(2, 3, 32, 32)
    ids, att = torch.randint(5, 64, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    assert torch.allclose(fast.encode_image(img), slow.encode_image(img), atol=1e-5)
    t = fast.encode_text(ids, att)
    assert torch.allclose(t, slow.encode_text(ids, att), atol=1e-5)
    assert torch.allclose(fast.fuse(t, att, fast.encode_image(img)), slow.fuse(t, att, slow.encode_image(img)), atol=1e-5)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = XFM(cfg).eval()
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    att = torch.ones_like(ids)
    pad = cfg.pad_id
    ids_p = torch.tensor([[0, 10, 11, 12, 2, pad, pad, pad]])
    att_p = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    t, t_p = model.encode_text(ids, att), model.encode_text(ids_p, att_p)
    assert torch.allclose(t, t_p[:, :5], atol=1e-5)
    img = model.encode_image(torch.randn(1, 3, 32, 32))
    assert torch.allclose(model.fuse(t, att, img), model.fuse(t_p, att_p, img)[:, :5], atol=1e-5)


def test_roberta_position_ids_start_after_padding():
    cfg = tiny_config(max_text_len=8)
    model = XFM(cfg)
    assert model.text.pos_embed.num_embeddings == 8 + cfg.pad_id + 1
    model.encode_text(torch.full((1, 8), 7), torch.ones(1, 8, dtype=torch.long))  # 8 tokens fit
    seen = {}
    model.text.pos_embed.register_forward_hook(lambda m, args, out: seen.update(pos=args[0]))
    pad = cfg.pad_id
    model.encode_text(torch.tensor([[0, 10, 11, 2, pad, pad]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert seen["pos"].tolist() == [[pad + 1, pad + 2, pad + 3, pad + 4, pad, pad]]  # token i: pad_id + 1 + i
    with pytest.raises(ValueError, match="max_text_len"):
        model.encode_text(torch.full((1, 9), 7), torch.ones(1, 9, dtype=torch.long))


def test_relative_position_bias_table_and_index():
    for g, size in ((4, 52), (8, 228), (14, 732)):  # (2g-1)^2 + 3
        assert RelativePositionBias(g, 2).table.shape == (size, 2)
    g = 4
    rpb = RelativePositionBias(g, 2)
    idx = rpb.index
    n = rpb.num_distances
    assert idx.shape == (g * g + 1, g * g + 1)
    assert idx[0, 0] == n - 1 and (idx[0, 1:] == n - 3).all() and (idx[1:, 0] == n - 2).all()
    center = (g - 1) * (2 * g - 1) + (g - 1)  # offset (0, 0)
    assert (idx[1:, 1:].diagonal() == center).all()
    # patch (0,0) -> patch (0,1): offset (dy, dx) = (0, -1); patch (1,0) -> patch (0,0): (1, 0)
    assert idx[1 + 0, 1 + 1] == (g - 1) * (2 * g - 1) + (g - 2)
    assert idx[1 + g, 1 + 0] == g * (2 * g - 1) + (g - 1)
    # the same relative offset uses the same entry anywhere on the grid
    assert idx[1 + 5, 1 + 6] == idx[1 + 0, 1 + 1]
    rpb.table.data = torch.randn_like(rpb.table)
    bias = rpb()
    assert bias.shape == (2, g * g + 1, g * g + 1)
    assert torch.equal(bias[:, 3, 7], rpb.table[idx[3, 7]])


def test_vision_output_is_mean_slot_plus_normed_patches():
    torch.manual_seed(0)
    model = XFM(tiny_config()).eval()
    v = model.encode_image(torch.randn(2, 3, 32, 32))
    assert v.shape == (2, 1 + 16, 128)
    assert torch.allclose(v[:, 0], v[:, 1:].mean(1), atol=1e-6)
    # the patches are fc_norm'ed: zero mean and unit variance per token (fc_norm at init is the identity affine)
    assert torch.allclose(v[:, 1:].mean(-1), torch.zeros(2, 16), atol=1e-5)
    # the ViT's CLS output never appears: changing cls_token changes the patches only through attention
    x = torch.randn(1, 3, 32, 32)
    cls_out = {}
    model.vision.blocks[-1].register_forward_hook(lambda m, i, o: cls_out.update(x=o[:, 0]))  # returns None
    v = model.encode_image(x)
    assert not any(torch.allclose(v[0, k], model.vision.fc_norm(cls_out["x"])[0], atol=1e-4) for k in range(17))


def test_mask_token_replaces_exactly_the_masked_patches():
    torch.manual_seed(0)
    model = XFM(tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    mask[1, [15]] = True
    seen = {}
    model.vision.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model.encode_image(x, mask)
    tokens = seen["x"]                                                    # (B, 1+P, D), block 0's input
    patches = model.vision.patch_embed(x).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens[:, 0], model.vision.cls_token[0].expand(2, -1))
    assert torch.allclose(tokens[:, 1:][mask], model.vision.mask_token[0, 0].expand(int(mask.sum()), -1))
    assert torch.allclose(tokens[:, 1:][~mask], patches[~mask])


def test_fusion_cross_attends_text_to_image_and_returns_text_states():
    torch.manual_seed(0)
    model = XFM(tiny_config()).eval()
    t = torch.randn(2, 6, 128)
    att = torch.ones(2, 6, dtype=torch.long)
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    out = model.fuse(t, att, img)
    assert out.shape == t.shape                                            # text side only
    assert not torch.allclose(out, model.fuse(t, att, img.flip(0)))        # depends on the image
    # an image key outside the mask has no effect
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, 5] = False
    img2 = img.clone()
    img2[:, 5] += 3.0
    assert torch.allclose(model.fuse(t, att, img, mask), model.fuse(t, att, img2, mask), atol=1e-5)
    for blk in model.fusion.blocks:                                        # K/V come from the image width
        assert blk.cross_attn.kv.in_features == 128 and blk.cross_attn.q.in_features == 128


def test_region_view_mean_over_box_patches():
    v = torch.randn(2, 17, 8)
    patch_mask = torch.zeros(3, 16, dtype=torch.bool)
    patch_mask[0, [0, 1]] = True
    patch_mask[1, :] = True
    patch_mask[2, [15]] = True
    v_r, m = XFM.region_view(v, torch.tensor([0, 0, 1]), patch_mask)
    assert torch.allclose(v_r[0, 0], v[0, 1:3].mean(0))
    assert torch.allclose(v_r[1, 0], v[0, 1:].mean(0))
    assert torch.allclose(v_r[2, 0], v[1, 16])
    assert m[:, 0].all() and torch.equal(m[:, 1:], patch_mask)


def test_presets_and_heads():
    for name, grid in (("tiny", 4), ("small", 8)):
        cfg = make_config(name, vocab_size=100)
        model = XFM(cfg)
        assert cfg.grid == grid
        v = model.encode_image(torch.randn(1, 3, cfg.image_size, cfg.image_size))
        assert v.shape == (1, 1 + grid * grid, cfg.width)
    base = make_config("base")
    assert (base.width, base.text_layers, base.vision_layers, base.fusion_layers, base.vocab_size,
            base.image_size, base.patch_size, base.embed_dim) == (768, 12, 12, 12, 50265, 224, 16, 256)
    with pytest.raises(ValueError):
        make_config("huge")
    with pytest.raises(ValueError):
        make_config("tiny", widht=3)
    model = XFM(tiny_config())
    assert model.text_mlm.decoder.weight is model.text.word_embed.weight  # RoBERTa ties the MLM decoder
    assert model.fusion_mlm.decoder.weight is not model.text.word_embed.weight
    assert not hasattr(model, "pixel_head") and hasattr(XFM(tiny_config(mim_target="pixel")), "pixel_head")


def test_beit_attention_has_q_and_v_biases_only():
    """BEiT's qkv: q = x Wq + q_bias, k = x Wk (no bias), v = x Wv + v_bias, then softmax(q k^T / sqrt(hs)) v.
    (A bias on k would change nothing: the softmax over keys is invariant to it.)"""
    torch.manual_seed(0)
    att = Attention(16, 2, beit_bias=True).eval()
    with torch.no_grad():
        att.q_bias.normal_()
        att.v_bias.normal_()
    x = torch.randn(2, 5, 16)
    w_q, w_k, w_v = att.qkv.weight.chunk(3)
    heads = lambda z: z.view(2, 5, 2, 8).transpose(1, 2)                  # noqa: E731  (B, nh, N, hs)
    q, k, v = heads(x @ w_q.t() + att.q_bias), heads(x @ w_k.t()), heads(x @ w_v.t() + att.v_bias)
    y = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v
    assert torch.allclose(att(x), att.proj(y.transpose(1, 2).reshape(2, 5, 16)), atol=1e-5)


def test_fusion_encoder_reads_the_language_states_as_they_are():
    """The fusion encoder has no embedding layer of its own (no position table, no LayerNorm on its input): with
    no layers it returns the language states unchanged, and all its parameters are in its blocks."""
    torch.manual_seed(0)
    model = XFM(tiny_config(fusion_layers=0)).eval()
    t, att = torch.randn(2, 6, 128), torch.ones(2, 6, dtype=torch.long)
    assert torch.equal(model.fuse(t, att, model.encode_image(torch.randn(2, 3, 32, 32))), t)
    assert all(n.startswith("blocks.") for n, _ in XFM(tiny_config()).fusion.named_parameters())


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    """drop_path multiplies by one (B, 1, 1) factor, 0 or 1/(1-p), drawn as the plain x * keep / (1-p) draws it:
    the same values and input gradient under the same seed; off in eval mode."""
    x = torch.randn(64, 3, 5, requires_grad=True)
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    torch.manual_seed(0)
    keep = torch.empty(64, 1, 1).bernoulli_(0.75)
    torch.testing.assert_close(y, x * keep / 0.75)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, (keep / 0.75).expand_as(x))
    assert 0 < int(keep.sum()) < 64                                       # some samples dropped, some kept
    assert drop_path(x, 0.25, training=False) is x
