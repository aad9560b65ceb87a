"""
Start X-FM from real pre-trained encoders (docs/METHOD.md §1.1-1.2): the language encoder and its MLM head from a
Hugging Face RoBERTa folder, the vision encoder from a BEiT-v2 checkpoint (official/timm key layout, e.g.
beitv2_base_patch16_224_pt1k.pth, or a Hugging Face BEiT folder).

    python train.py --config=base --init_text=roberta-base/ --init_vision=beitv2_base_patch16_224_pt1k.pth
        # roberta-base/ holds config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json

    import pretrained
    overrides = pretrained.config_overrides("roberta-base/", "beitv2.pth")  # width, depth, heads, vocab, ...
    model = XFM(make_config("base", **overrides))
    print(pretrained.load_text(model, "roberta-base/"))                    # a LoadReport: what went where
    print(pretrained.load_vision(model, "beitv2.pth"))

Every key mapping is written out in ROBERTA_MAP / BEIT_MAP / BEIT_HF_MAP below: our key -> the checkpoint key, or
a tuple of keys that are concatenated along dim 0 (our fused qkv). Loading never runs code from a file:
torch files go through torch.load(weights_only=True), and safetensors files are parsed here as plain data
(an 8-byte header length, a JSON header, raw bytes), so the safetensors package is not needed.
The same few lines write them (write_safetensors): a run's weights go out as an export folder (export, below;
train.py --export=DIR, tools/export.py), config.json + model.safetensors + tokenizer.json, which finetune.py
--init DIR reads back (read_export).
A checkpoint tensor whose shape does not fit is refused with the key and the reason; keys we have no use for
are reported (known ones, such as BEiT's MIM head, with the reason they are skipped).

Exactness (checked against transformers in tests/test_pretrained.py, every layer within 1e-5 in fp32):
- RoBERTa adds token_type_embeddings[0] to every token; we fold that row into every position embedding row.
- BEiT's relative position index is the same as model.RelativePositionBias's (row-major (dy, dx) offsets, then
  cls->token, token->cls, cls->cls), so tables are copied row for row. A shared table is copied to every block.
- Another image size: tables are resized with model.resize_rel_pos (bicubic). The official code samples the
  old table at geometrically spaced points with scipy's cubic interpolation: close, not bit-identical.
- A BEiT pre-training checkpoint has no fc_norm (it was trained with a final `norm` instead, which mean
  pooling replaces): fc_norm stays at its init (ones, zeros), as in the official X-FM code.
"""
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, replace

import torch

from model import resize_rel_pos

# ---------------------------------------------------------------------------------------------------------
# Reading checkpoint files


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "F64": torch.float64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file as {name: tensor}: [8-byte little-endian header size][JSON header][raw bytes].
    The header maps each name to {dtype, shape, data_offsets: [begin, end)} relative to the end of the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buf = bytearray(f.read())  # writable, so torch.frombuffer does not warn; tensors are cloned below
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        t = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) \
            if end > begin else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}   # torch dtype -> the header's name


def _le_bytes(t):
    """A tensor's raw bytes in little-endian order (safetensors' order, whatever the machine's)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)   # (numel * itemsize,), the machine's order
    if sys.byteorder == "big" and t.element_size() > 1:                 # reverse the bytes of every element
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file, the layout read_safetensors (and the safetensors package) reads:
    [8-byte little-endian header size][JSON header][raw bytes]. The header gives each tensor's dtype, shape and
    data_offsets [begin, end) into the bytes after the header; the tensors follow one another with no gap, the
    widest dtype first (as the safetensors package orders them), and the header is padded with spaces to a
    multiple of 8 bytes, so every tensor starts at a multiple of its own element size. Written to path.tmp,
    then renamed: a crash never leaves a half-written file."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which this writer does not support")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                                     # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:                                               # one tensor in memory at a time
            f.write(_le_bytes(tensors[name]))
    os.replace(path + ".tmp", path)


def read_state_dict(path):
    """{name: tensor} from a folder (model.safetensors or pytorch_model.bin), a .safetensors file or a torch file
    (.bin/.pth/.pt). Official BEiT files wrap the weights under "model" (or "module" / "state_dict")."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _hf_file(path, name):
    """The file `name` of a Hugging Face folder, or next to a file (it need not exist)."""
    return os.path.join(path if os.path.isdir(path) else os.path.dirname(path), name)


def read_hf_config(path):
    """config.json of a Hugging Face folder (or next to a file), or None."""
    cfg = _hf_file(path, "config.json")
    return json.load(open(cfg)) if os.path.isfile(cfg) else None


def tokenizer_path(path):
    """The tokenizer.json of a Hugging Face folder such as --init_text's RoBERTa (or next to a file); it need
    not exist."""
    return _hf_file(path, "tokenizer.json")


# ---------------------------------------------------------------------------------------------------------
# Export folders: a run's final weights without the optimizer, for finetune.py --init DIR and other programs


EXPORT_FORMAT = "xfm-export"


def check_export_dir(out_dir, run_dir):
    """An export needs a folder of its own: not the run folder, nor any folder with a config.json that is not an
    export's (a run's, a Hugging Face model's), which it would replace. An earlier export is overwritten."""
    config = os.path.join(out_dir, "config.json")
    if os.path.realpath(out_dir) == os.path.realpath(run_dir) or \
            (os.path.isfile(config) and json.load(open(config)).get("format") != EXPORT_FORMAT):
        raise SystemExit(f"error: {out_dir} is a run folder or holds another config.json; export to a folder of "
                         f"its own")


def export(out_dir, run_dir, state, model_config, train_config, step):
    """Write the export folder out_dir of the run in run_dir (train.py --export=DIR at the end of a run,
    tools/export.py from a checkpoint):
        model.safetensors   the model's state dict, tensor for tensor (write_safetensors; no optimizer state)
        tokenizer.json      a copy of the run's RUN_DIR/tokenizer.json
        config.json         {"format": "xfm-export", "recipe", "model_config" (flava.config_from_dict and
                            flava.build_model rebuild the model from it), "train_config", "step", "weights",
                            "tokenizer"}
    config.json is written last, so a folder that has it is complete. read_export reads the folder back."""
    check_export_dir(out_dir, run_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(state, os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
    shutil.copyfile(os.path.join(run_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    config = {"format": EXPORT_FORMAT, "recipe": model_config.get("recipe", "xfm"), "model_config": model_config,
              "train_config": train_config, "step": step, "weights": "model.safetensors", "tokenizer": "tokenizer.json"}
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


def is_export(path):
    """Whether path is a folder with the files of an export (a Hugging Face folder has them too: read_export
    tells the two apart by config.json's "format")."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors"))


def read_export(path):
    """An export folder -> a dict shaped like train.py's checkpoint without its optimizer: {"model": state dict,
    "model_config", "train_config", "step", ...}, so finetune.py reads either the same way."""
    config = json.load(open(os.path.join(path, "config.json")))
    if config.get("format") != EXPORT_FORMAT:
        raise SystemExit(f"error: {path} is not an export of train.py (its config.json has no \"format\": "
                         f"\"{EXPORT_FORMAT}\"); Hugging Face encoders go to --init_text / --init_vision")
    return {**config, "model": read_safetensors(os.path.join(path, config["weights"]))}


# ---------------------------------------------------------------------------------------------------------
# The key maps: our key -> checkpoint key (copied) or tuple of checkpoint keys (concatenated along dim 0)


def _wb(ours, theirs):
    return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}


def ROBERTA_MAP(layers):
    """Hugging Face RoBERTa (keys without the `roberta.` prefix) -> our TextEncoder and text MLM head."""
    m = {"text.word_embed.weight": "embeddings.word_embeddings.weight",
         "text.pos_embed.weight": "embeddings.position_embeddings.weight",  # + token_type row 0 (load_text)
         **_wb("text.norm", "embeddings.LayerNorm"),
         **_wb("text_mlm.dense", "lm_head.dense"), **_wb("text_mlm.norm", "lm_head.layer_norm"),
         "text_mlm.bias": "lm_head.bias"}                                   # the decoder is tied to word_embed
    for i in range(layers):
        o, h = f"text.blocks.{i}", f"encoder.layer.{i}"
        for p in ("weight", "bias"):                                         # post-LN block
            m[f"{o}.attn.qkv.{p}"] = tuple(f"{h}.attention.self.{x}.{p}" for x in ("query", "key", "value"))
        m |= _wb(f"{o}.attn.proj", f"{h}.attention.output.dense") | _wb(f"{o}.norm1", f"{h}.attention.output.LayerNorm")
        m |= _wb(f"{o}.mlp.fc1", f"{h}.intermediate.dense") | _wb(f"{o}.mlp.fc2", f"{h}.output.dense")
        m |= _wb(f"{o}.norm2", f"{h}.output.LayerNorm")
    return m


# checkpoint keys we know and deliberately do not load, with the reason
ROBERTA_SKIP = {r"embeddings\.token_type_embeddings\.weight": "folded into pos_embed (every token has type 0)",
                r"embeddings\.position_ids": "a buffer",
                r"lm_head\.decoder\.weight": "tied to the word embeddings",
                r"lm_head\.decoder\.bias": "the same tensor as lm_head.bias",
                r"pooler\..*": "RoBERTa's pooler: X-FM uses token 0's state directly"}


def BEIT_MAP(layers):
    """Official BEiT / BEiT-v2 / timm layout -> our VisionEncoder (a shared table is expanded beforehand)."""
    m = {"vision.patch_embed.weight": "patch_embed.proj.weight", "vision.patch_embed.bias": "patch_embed.proj.bias",
         "vision.cls_token": "cls_token", "vision.mask_token": "mask_token", **_wb("vision.fc_norm", "fc_norm")}
    for i in range(layers):
        o, h = f"vision.blocks.{i}", f"blocks.{i}"                           # pre-LN block with layer scale
        m |= _wb(f"{o}.norm1", f"{h}.norm1") | _wb(f"{o}.attn.proj", f"{h}.attn.proj") | _wb(f"{o}.norm2", f"{h}.norm2")
        m |= _wb(f"{o}.mlp.fc1", f"{h}.mlp.fc1") | _wb(f"{o}.mlp.fc2", f"{h}.mlp.fc2")
        m |= {f"{o}.attn.qkv.weight": f"{h}.attn.qkv.weight", f"{o}.attn.q_bias": f"{h}.attn.q_bias",
              f"{o}.attn.v_bias": f"{h}.attn.v_bias", f"{o}.gamma_1": f"{h}.gamma_1", f"{o}.gamma_2": f"{h}.gamma_2",
              f"{o}.rel_pos.table": f"{h}.attn.relative_position_bias_table"}
    return m


BEIT_SKIP = {r".*relative_position_index": "a buffer (the index is rebuilt by model.RelativePositionBias)",
             r"norm\.(weight|bias)": "the final norm of BEiT pre-training; mean pooling uses fc_norm instead",
             r"head\..*": "an ImageNet classifier", r"lm_head\..*": "BEiT's MIM head (X-FM has none)",
             r"cls_pt_layers\..*": "BEiT-v2's patch-aggregation layers (pre-training only)",
             r"cls_pt_norm\..*": "BEiT-v2's patch-aggregation norm (pre-training only)"}


def BEIT_HF_MAP(layers):
    """Hugging Face BeitModel (keys without the `beit.` prefix) -> our VisionEncoder."""
    m = {"vision.patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
         "vision.patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
         "vision.cls_token": "embeddings.cls_token", "vision.mask_token": "embeddings.mask_token",
         **_wb("vision.fc_norm", "pooler.layernorm")}                       # mean pooling: pooler.layernorm = fc_norm
    for i in range(layers):
        o, h = f"vision.blocks.{i}", f"encoder.layer.{i}"
        a = f"{h}.attention.attention"
        m |= _wb(f"{o}.norm1", f"{h}.layernorm_before") | _wb(f"{o}.attn.proj", f"{h}.attention.output.dense")
        m |= _wb(f"{o}.norm2", f"{h}.layernorm_after")
        m |= _wb(f"{o}.mlp.fc1", f"{h}.intermediate.dense") | _wb(f"{o}.mlp.fc2", f"{h}.output.dense")
        m |= {f"{o}.attn.qkv.weight": (f"{a}.query.weight", f"{a}.key.weight", f"{a}.value.weight"),
              f"{o}.attn.q_bias": f"{a}.query.bias", f"{o}.attn.v_bias": f"{a}.value.bias",  # key has no bias
              f"{o}.gamma_1": f"{h}.lambda_1", f"{o}.gamma_2": f"{h}.lambda_2",
              f"{o}.rel_pos.table": f"{a}.relative_position_bias.relative_position_bias_table"}
    return m


BEIT_HF_SKIP = {r".*relative_position_index": "a buffer", r"layernorm\.(weight|bias)": "the final norm (unused under mean pooling)",
                r"lm_head\..*": "BEiT's MIM head", r"classifier\..*": "an ImageNet classifier"}


# ---------------------------------------------------------------------------------------------------------
# Applying a map


@dataclass
class LoadReport:
    source: str
    loaded: list = field(default_factory=list)       # our keys filled from the checkpoint
    missing: dict = field(default_factory=dict)      # our key -> the checkpoint key(s) it lacks (left at init)
    unexpected: list = field(default_factory=list)   # checkpoint keys nothing maps and no rule explains
    skipped: dict = field(default_factory=dict)      # checkpoint key -> why it is known and not loaded
    notes: list = field(default_factory=list)

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        lines += [f"  missing {k} (checkpoint has no {v}; left at its init)" for k, v in self.missing.items()]
        lines += [f"  unexpected {k} (not used)" for k in self.unexpected]
        why = {}
        for k, r in self.skipped.items():
            why.setdefault(r, []).append(k)
        lines += [f"  skipped {len(ks)} key(s) such as {ks[0]}: {r}" for r, ks in why.items()]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def apply_map(model, src, keymap, skip, source, fix=None):
    """Copy src (checkpoint {key: tensor}) into model through keymap (our key -> key or tuple of keys).
    fix(our_key, tensor) may adapt a tensor (e.g. resize a table) before the shape check. Shapes must fit
    exactly: otherwise a ValueError names the key and both shapes. -> LoadReport."""
    ours, rep, used, new = model.state_dict(), LoadReport(source), set(), {}
    for key, theirs in keymap.items():
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        absent = [n for n in names if n not in src]
        if absent:  # the parts that are there belong to this key: not "unexpected"
            rep.missing[key] = ", ".join(absent)
            used.update(n for n in names if n in src)
            continue
        t = torch.cat([src[n] for n in names], dim=0) if len(names) > 1 else src[names[0]]
        if fix is not None:
            t = fix(key, t)
        if key not in ours:
            raise KeyError(f"the key map names {key}, which the model does not have")
        if tuple(t.shape) != tuple(ours[key].shape):
            raise ValueError(f"checkpoint {source}: {' + '.join(names)} has shape {tuple(t.shape)}, but the model's "
                             f"{key} is {tuple(ours[key].shape)} (the checkpoint's width, depth, heads, vocabulary or "
                             f"patch size differ from the model config)")
        new[key] = t.to(ours[key].dtype)
        used.update(names)
        rep.loaded.append(key)
    for k in src:
        if k in used:
            continue
        reason = next((r for pat, r in skip.items() if re.fullmatch(pat, k)), None)
        if reason:
            rep.skipped[k] = reason
        else:
            rep.unexpected.append(k)
    model.load_state_dict(new, strict=False)
    return rep


def _strip(state, prefix):
    return {k.removeprefix(prefix): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------
# Language encoder: RoBERTa


def load_text(model, path):
    """Hugging Face RoBERTa folder (or weights file) -> model.text and model.text_mlm. -> LoadReport."""
    src = _strip(read_state_dict(path), "roberta.")
    cfg = model.cfg
    hf = read_hf_config(path)
    if hf is not None and hf.get("pad_token_id", cfg.pad_id) != cfg.pad_id:
        raise ValueError(f"{path}: pad_token_id {hf['pad_token_id']} != the model's pad_id {cfg.pad_id}")
    src = dict(src)
    tt = src.get("embeddings.token_type_embeddings.weight")
    pos = "embeddings.position_embeddings.weight"
    if tt is not None and pos in src:  # every token has type 0: that row is a constant added at every position
        src[pos] = src[pos] + tt[0]
    n_pos = model.text.pos_embed.num_embeddings
    if pos in src and src[pos].shape[0] > n_pos:  # a shorter max_text_len: keep the first rows (positions start at 0)
        src[pos] = src[pos][:n_pos]
    rep = apply_map(model, src, ROBERTA_MAP(cfg.text_layers), ROBERTA_SKIP, path)
    dec = src.get("lm_head.decoder.weight")
    if dec is not None and "embeddings.word_embeddings.weight" in src and \
            not torch.equal(dec, src["embeddings.word_embeddings.weight"]):
        rep.notes.append("lm_head.decoder.weight differs from the word embeddings; ours is tied to them")
    _check_eps(rep, hf, 1e-5, "text")
    return rep


# ---------------------------------------------------------------------------------------------------------
# Vision encoder: BEiT / BEiT-v2


def _is_hf_beit(src):
    return any(k.startswith("embeddings.patch_embeddings") for k in src)


def load_vision(model, path):
    """Official BEiT(-v2)/timm checkpoint or Hugging Face BEiT folder -> model.vision. Tables from another
    patch grid are resized to the model's with resize_rel_pos. -> LoadReport."""
    src = _strip(read_state_dict(path), "beit.")
    cfg = model.cfg
    hf = _is_hf_beit(src)
    if hf:
        keymap, skip = BEIT_HF_MAP(cfg.vision_layers), BEIT_HF_SKIP
        shared = "encoder.relative_position_bias.relative_position_bias_table"
        per_block = "encoder.layer.{}.attention.attention.relative_position_bias.relative_position_bias_table"
    else:
        keymap, skip = BEIT_MAP(cfg.vision_layers), BEIT_SKIP
        shared, per_block = "rel_pos_bias.relative_position_bias_table", "blocks.{}.attn.relative_position_bias_table"
    if any(k in src for k in ("pos_embed", "embeddings.position_embeddings")):
        raise ValueError(f"{path} has an absolute position embedding; our BEiT encoder has none (relative position "
                         f"bias only, as BEiT-v2), so it cannot compute what this checkpoint computes")
    src = dict(src)
    if shared in src:  # one table for all blocks: each block gets its own copy, as the official loader does
        for i in range(cfg.vision_layers):
            src.setdefault(per_block.format(i), src[shared].clone())
        skip = {**skip, re.escape(shared): "expanded to every block's table"}

    def fix(key, t):  # a table from another grid: ((2g-1)^2+3, nh) -> ((2g'-1)^2+3, nh)
        if key.endswith("rel_pos.table") and t.shape[0] != (2 * cfg.grid - 1) ** 2 + 3:
            side = ((t.shape[0] - 3) ** 0.5 + 1) / 2
            if side != int(side):
                raise ValueError(f"{key}: a table of {t.shape[0]} rows is not (2g-1)^2 + 3 for any grid g")
            return resize_rel_pos(t, int(side), cfg.grid)
        return t

    rep = apply_map(model, src, keymap, skip, path, fix=fix)
    if not hf and set(rep.missing) == {"vision.fc_norm.weight", "vision.fc_norm.bias"}:
        rep.notes.append("no fc_norm: a pre-training checkpoint (its final `norm` is not used under mean pooling)")
    _check_eps(rep, read_hf_config(path) if hf else None, 1e-6, "vision")
    return rep


def _check_eps(rep, hf, ours, which):
    eps = (hf or {}).get("layer_norm_eps")
    if eps is not None and abs(eps - ours) > 1e-12:
        rep.notes.append(f"the checkpoint's LayerNorm eps is {eps}; our {which} encoder uses {ours} (a tiny difference)")


# ---------------------------------------------------------------------------------------------------------
# Model config from the checkpoints


def text_config(path):
    """XFMConfig fields from a RoBERTa config.json: width, heads, text_layers, vocab_size, pad_id, max_text_len."""
    hf = read_hf_config(path)
    if hf is None:
        raise ValueError(f"{path}: no config.json next to the RoBERTa weights (a Hugging Face folder is expected)")
    d, pad = hf["hidden_size"], hf.get("pad_token_id", 1)
    if hf.get("intermediate_size", 4 * d) % d or hf.get("intermediate_size", 4 * d) // d != 4:
        raise ValueError(f"{path}: intermediate_size {hf['intermediate_size']} is not 4 x hidden_size {d} (mlp_ratio 4)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; our blocks use the exact (erf) gelu")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    return dict(width=d, heads=hf["num_attention_heads"], text_layers=hf["num_hidden_layers"],
                vocab_size=hf["vocab_size"], pad_id=pad, max_text_len=hf["max_position_embeddings"] - pad - 1)


def vision_config(path):
    """XFMConfig fields from a BEiT checkpoint: width, heads, vision_layers, image_size, patch_size. A Hugging Face
    folder says them in config.json; an official .pth has no config, so they are read off the tensor shapes."""
    hf = read_hf_config(path)
    if hf is not None and hf.get("model_type") == "beit":
        d = hf["hidden_size"]
        if hf.get("intermediate_size", 4 * d) != 4 * d:
            raise ValueError(f"{path}: intermediate_size {hf['intermediate_size']} is not 4 x hidden_size {d}")
        if hf.get("use_absolute_position_embeddings") or not (hf.get("use_relative_position_bias") or
                                                              hf.get("use_shared_relative_position_bias")):
            raise ValueError(f"{path}: our BEiT encoder needs relative position bias and no absolute position embedding")
        size = hf["image_size"] if isinstance(hf["image_size"], int) else hf["image_size"][0]
        return dict(width=d, heads=hf["num_attention_heads"], vision_layers=hf["num_hidden_layers"],
                    image_size=size, patch_size=hf["patch_size"])
    src = read_state_dict(path)
    if "patch_embed.proj.weight" not in src:
        raise ValueError(f"{path}: neither a Hugging Face BEiT folder nor an official BEiT checkpoint (no patch_embed.proj.weight)")
    w = src["patch_embed.proj.weight"]                                     # (D, 3, p, p)
    layers = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    table = src.get("rel_pos_bias.relative_position_bias_table", src.get("blocks.0.attn.relative_position_bias_table"))
    if table is None:
        raise ValueError(f"{path}: no relative position bias table, so the grid and heads cannot be inferred")
    grid = ((table.shape[0] - 3) ** 0.5 + 1) / 2                           # rows = (2g-1)^2 + 3
    if src["blocks.0.mlp.fc1.weight"].shape[0] != 4 * w.shape[0]:
        raise ValueError(f"{path}: the MLP is not 4 x the width (mlp_ratio 4)")
    return dict(width=w.shape[0], heads=table.shape[1], vision_layers=layers,
                image_size=int(grid) * w.shape[-1], patch_size=w.shape[-1])


def config_overrides(text_path="", vision_path=""):
    """make_config overrides from either or both checkpoints. The model has one width (and head count) for all
    three encoders, so the two checkpoints must agree on them."""
    out, t, v = {}, text_config(text_path) if text_path else {}, vision_config(vision_path) if vision_path else {}
    for k in ("width", "heads"):
        if t and v and t[k] != v[k]:
            raise ValueError(f"the text checkpoint has {k} {t[k]} but the vision checkpoint {v[k]}: X-FM uses one "
                             f"{k} for all three encoders")
    out.update(t)
    out.update(v)
    return out


def model_config(cfg, model_cfg, tok):
    """model_cfg with what --init_text / --init_vision say (width, depth, heads, vocabulary, image and patch size;
    cfg: the train.py or finetune.py config); the fusion depth stays the preset's. Mismatches are one-line errors."""
    try:
        over = config_overrides(cfg.init_text, cfg.init_vision)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    if "vocab_size" in over:
        if tok.vocab_size > over["vocab_size"]:
            raise SystemExit(f"error: the tokenizer has {tok.vocab_size} tokens but {cfg.init_text} only "
                             f"{over['vocab_size']} embeddings (use its tokenizer.json: --tokenizer)")
        if tok.pad_id != over["pad_id"]:
            raise SystemExit(f"error: the tokenizer's <pad> is {tok.pad_id}, {cfg.init_text}'s is {over['pad_id']}")
        if over["max_text_len"] < model_cfg.max_text_len:
            raise SystemExit(f"error: {cfg.init_text} has positions for {over['max_text_len']} tokens, fewer than "
                             f"--caption_len/--text_len {model_cfg.max_text_len}")
    return replace(model_cfg, **over)
