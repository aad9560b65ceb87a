"""
Start X-FM from real pre-trained encoders (docs/METHOD.md §1.1-1.2): the language encoder and its MLM head from a
Hugging Face RoBERTa folder, the vision encoder from a BEiT-v2 checkpoint (official/timm key layout, e.g.
beitv2_base_patch16_224_pt1k.pth, or a Hugging Face BEiT folder).

    python train.py --config=base --init_text=roberta-base/ --init_vision=beitv2_base_patch16_224_pt1k.pth
        # roberta-base/ holds config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json

    from lib import pretrained
    overrides = pretrained.config_overrides("roberta-base/", "beitv2.pth")  # width, depth, heads, vocab, ...
    model = XFM(make_config("base", **overrides))
    print(pretrained.load_text(model, "roberta-base/"))                    # a LoadReport: what went where
    print(pretrained.load_vision(model, "beitv2.pth"))

A whole official X-FM checkpoint becomes an export folder (the last section, convert_xfm; docs/FINETUNING.md,
"Start from released weights"):

    python -m lib.pretrained convert-xfm xfm_base.pth --out runs/xfm_official --text_config roberta-base/

Any export folder (train.py --export, convert-xfm, convert-flava) starts a fresh pre-training run from its whole
model: train.py --init=DIR (init_run, init_model_config, load_init).

Every key mapping is written out in ROBERTA_MAP / BEIT_MAP / BEIT_HF_MAP below: our key -> the checkpoint key, or
a tuple of keys that are concatenated along dim 0 (our fused qkv). Loading never runs code from a file:
torch files go through torch.load(weights_only=True), and safetensors files are parsed here as plain data
(an 8-byte header length, a JSON header, raw bytes), so the safetensors package is not needed.
The same few lines write them (write_safetensors): a run's weights go out as an export folder (export, below;
train.py --export=DIR, tools/export.py), config.json + model.safetensors + tokenizer.json, which finetune.py
--init DIR reads back (read_export).

Every file is read as hostile, and one that is not what it should be stops the run before any work with one
line naming it and the reason, never a traceback:
- a .safetensors file whose header breaks the format: `error: FILE: not a valid safetensors file (REASON)`. The
  header (at most ST_MAX_HEADER bytes, and no more than the file holds) is checked whole before anything is
  allocated: known dtypes, shapes of ints >= 0, each tensor's bytes = prod(shape) x its dtype's size, the
  tensors tiling the data section with no overlap and no gap (safetensors_header);
- a torch file that torch.load(weights_only=True) cannot read: a text file, a zip of something else, a pickle
  naming any other global (read_torch); runlog.load_checkpoint refuses a dict without a "model" state dict;
- a config.json that is not a JSON object, or whose sizes are missing or not ints (a string, zero heads), named
  with its key (config_int); an export's model_config of the wrong types (model_of);
- an export whose "weights" or "tokenizer" is not a name inside its folder (an absolute path, a `..`), or whose
  tensors are not the model its model_config describes: every key, shape, and floating where the model's is,
  so F32 bytes labelled I32 are refused (check_state).
    python finetune.py --task textcls --init DIR     # a bad export: "error: DIR/config.json: ..." and exit 1

A checkpoint tensor whose shape does not fit is refused with the key and the reason; keys we have no use for
are reported (known ones, such as BEiT's MIM head, with the reason they are skipped).

Exactness (checked against transformers in tests/test_pretrained.py, every layer within 1e-5 in fp32):
- RoBERTa adds token_type_embeddings[0] to every token; we fold that row into every position embedding row.
- BEiT's relative position index is the same as model.RelativePositionBias's (row-major (dy, dx) offsets, then
  cls->token, token->cls, cls->cls), so tables are copied row for row. A shared table is copied to every block.
- Another image size: tables are resized with resize_rel_pos (bicubic). The official code samples the
  old table at geometrically spaced points with scipy's cubic interpolation: close, not bit-identical.
- A BEiT pre-training checkpoint has no fc_norm (it was trained with a final `norm` instead, which mean
  pooling replaces): fc_norm stays at its init (ones, zeros), as in the official X-FM code.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F

import flava
from lib import formats
from lib.tokenizer import Tokenizer, for_official_weights
from model import XFM, XFMConfig, make_config

# ---------------------------------------------------------------------------------------------------------
# Reading checkpoint files


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "F64": torch.float64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_MAX_HEADER = 100_000_000   # the largest JSON header read (the safetensors package's own limit)


def _not_safetensors(path, why):
    return SystemExit(f"error: {path}: not a valid safetensors file ({why})")


def _unique_keys(pairs):
    """json.loads' object_pairs_hook: an object that names a key twice is refused (the format says once)."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"the key {k!r} appears twice")
        seen.add(k)
    return dict(pairs)


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def safetensors_header(path):
    """The checked header of a .safetensors file -> ({name: (torch dtype, shape, begin, end)}, the offset of the
    data section). Every number is checked before anything is allocated, and any violation of the format stops
    the run with one line, `error: FILE: not a valid safetensors file (REASON)`:
      - the 8-byte header length is at most the bytes after it, and at most ST_MAX_HEADER;
      - the header is a UTF-8 JSON object, each key once; "__metadata__", if there, maps strings to strings;
      - each tensor has a known dtype (_ST_DTYPES), a shape of non-negative ints and data_offsets [begin, end]
        of two ints with end - begin = prod(shape) x the dtype's size;
      - sorted by offset, the tensors tile the data section exactly: no overlap, no gap, nothing after."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"{size} bytes, fewer than the 8 of the header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _not_safetensors(path, f"a header length of {n} bytes, but only {size - 8} bytes follow it")
        if n > ST_MAX_HEADER:
            raise _not_safetensors(path, f"a header length of {n} bytes, over the limit of {ST_MAX_HEADER}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:   # not UTF-8, not JSON, a key twice, nesting too deep
        raise _not_safetensors(path, f"the header is not a JSON object: {e}")
    if not isinstance(header, dict):
        raise _not_safetensors(path, f"the header is {formats.type_of(header)}, not an object")
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _not_safetensors(path, "__metadata__ is not a map of strings to strings")
    entries = {}
    for name, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
            raise _not_safetensors(path, f"tensor {name!r} is not an object with dtype, shape and "
                                         f"data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise _not_safetensors(path, f"tensor {name!r} has the unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise _not_safetensors(path, f"tensor {name!r} has the shape {shape!r}, not a list of ints >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _not_safetensors(path, f"tensor {name!r} has the data_offsets {offsets!r}, not [begin, end] "
                                         f"with 0 <= begin <= end")
        need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            raise _not_safetensors(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but {dtype} "
                                         f"of shape {shape} takes {need}")
        entries[name] = (_ST_DTYPES[dtype], shape, *offsets)
    end, last = 0, None
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != end:
            where = f"where {last!r} ends" if last else "at the start of the data"
            raise _not_safetensors(path, f"tensor {name!r} starts at byte {begin}, not {where} (byte {end}): "
                                         f"{'an overlap' if begin < end else 'a gap'}")
        end, last = stop, name
    if end != size - 8 - n:
        raise _not_safetensors(path, f"the tensors cover {end} bytes of a data section of {size - 8 - n}")
    return entries, 8 + n


def read_safetensors(path):
    """A .safetensors file as {name: tensor}: [8-byte little-endian header size][JSON header][raw bytes]. The
    header maps each name to {dtype, shape, data_offsets: [begin, end)} relative to the end of the header; it is
    checked whole (safetensors_header) before any tensor is read, each into a buffer of its own."""
    entries, start = safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, stop) in entries.items():
            raw = torch.empty(stop - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(raw.numpy()) != stop - begin:                 # the file shrank since it was checked
                raise _not_safetensors(path, f"tensor {name!r} is cut short")
            out[name] = raw.view(dtype).reshape(shape)
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


def read_torch(path, device="cpu"):
    """torch.load(path, weights_only=True): tensors and plain data only, never code. A file it cannot read (a
    text file, a zip that is no torch file, a file cut short, a pickle naming any other global) stops the run
    with one line naming the file and what torch.load found."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (whatever torch.load meets in a hostile file, it raises)
        text = str(e)
        if "WeightsUnpickler error:" in text:  # a global or an opcode weights_only never runs
            found = text.split("WeightsUnpickler error:")[1].strip().split("\n")[0].split(" Please use")[0]
            raise SystemExit(f"error: {path}: not a checkpoint of tensors and plain data ({found.rstrip('.')}; "
                             f"torch.load with weights_only=True reads nothing else)")
        first = re.split(r"(?<=\.)\s", text.strip().split("\n")[0])[0][:160]      # its first sentence
        raise SystemExit(f"error: {path}: not a torch checkpoint (torch.load: {type(e).__name__}"
                         f"{': ' + first if first else ''})")


def read_state_dict(path):
    """{name: tensor} from a folder (model.safetensors or pytorch_model.bin), a .safetensors file or a torch file
    (.bin/.pth/.pt). Official BEiT files wrap the weights under "model" (or "module" / "state_dict")."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise SystemExit(f"error: {path}: no model.safetensors or pytorch_model.bin in this folder")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    state = read_torch(path)
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise SystemExit(f"error: {path}: holds {formats.type_of(state)}, not a state dict of named tensors")
    return {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}


def _hf_file(path, name):
    """The file `name` of a Hugging Face folder, or next to a file (it need not exist)."""
    return os.path.join(path if os.path.isdir(path) else os.path.dirname(path), name)


def read_json(path):
    """The JSON object in the file path. A file that is none (unreadable, not UTF-8, not JSON, nested too deep,
    a list) stops the run with one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot be read ({e.strerror})")
    except (ValueError, RecursionError) as e:                             # UnicodeDecodeError is a ValueError
        raise SystemExit(f"error: {path}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        raise SystemExit(f"error: {path}: holds {formats.type_of(obj)}, not a JSON object")
    return obj


def read_hf_config(path):
    """config.json of a Hugging Face folder (or next to a file), or None."""
    cfg = _hf_file(path, "config.json")
    return read_json(cfg) if os.path.isfile(cfg) else None


def config_int(config, key, where, default=None, least=1):
    """config[key] (or default, when given, for a key that is absent): an int >= least. Anything else (a missing
    key, a string where a size should be, zero heads) stops the run with one line naming where and the key."""
    if key not in config and default is not None:
        return default
    if key not in config:
        raise SystemExit(f"error: {where}: no {key!r}")
    v = config[key]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= least):
        raise SystemExit(f"error: {where}: {key} is {formats.type_of(v)} ({formats._short(repr(v))}), not an "
                         f"int >= {least}")
    return v


def own_tokenizer(path):
    """The tokenizer.json of a pre-trained text encoder's folder, or "" when it has none."""
    return tokenizer_path(path) if os.path.isfile(tokenizer_path(path)) else ""


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
            (os.path.isfile(config) and read_json(config).get("format") != EXPORT_FORMAT):
        raise SystemExit(f"error: {out_dir} is a run folder or holds another config.json; export to a folder of "
                         f"its own")


def export(out_dir, run_dir, state, model_config, train_config, step, tokenizer=""):
    """Write the export folder out_dir of the run in run_dir (train.py --export=DIR at the end of a run,
    tools/export.py from a checkpoint):
        model.safetensors   the model's state dict, tensor for tensor (write_safetensors; no optimizer state)
        tokenizer.json      a copy of the run's RUN_DIR/tokenizer.json (or of the file tokenizer names)
        config.json         {"format": "xfm-export", "recipe", "model_config" (flava.config_from_dict and
                            flava.build_model rebuild the model from it), "train_config", "step", "weights",
                            "tokenizer"}
    config.json is written last, so a folder that has it is complete. read_export reads the folder back."""
    check_export_dir(out_dir, run_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(state, os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
    shutil.copyfile(tokenizer or os.path.join(run_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    config = {"format": EXPORT_FORMAT, "recipe": model_config.get("recipe", "xfm"), "model_config": model_config,
              "train_config": train_config, "step": step, "weights": "model.safetensors", "tokenizer": "tokenizer.json"}
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


def is_export(path):
    """Whether path is a folder with the files of an export (a Hugging Face folder has them too: read_export
    tells the two apart by config.json's "format")."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors"))


def export_file(folder, config, key):
    """The file an export's config.json names under key ("weights", "tokenizer"): a name inside the folder,
    never an absolute path or one through `..` (an export is read from its own folder only)."""
    name, where = config.get(key), os.path.join(folder, "config.json")
    if not isinstance(name, str) or not name:
        raise SystemExit(f"error: {where}: {key} is {formats.type_of(name)}, not the name of a file in the "
                         f"folder")
    if os.path.isabs(name) or ".." in re.split(r"[/\\]", name):
        raise SystemExit(f"error: {where}: {key} {name!r} is not a name inside the export folder (no absolute "
                         f"path, no ..)")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {where}: {key} {name!r} is no file in the export folder")
    return path


def read_export(path):
    """An export folder -> a dict shaped like train.py's checkpoint without its optimizer: {"model": state dict,
    "model_config", "train_config", "step", ...; "tokenizer": its path}, so finetune.py reads either the same
    way. Refused in one line naming the file: a config.json that is no export's or holds a value of the wrong
    type, a weights or tokenizer entry outside the folder, a model.safetensors that is not valid or whose tensors
    are not the model its model_config describes (check_state)."""
    where = os.path.join(path, "config.json")
    config = read_json(where)
    if config.get("format") != EXPORT_FORMAT:
        raise SystemExit(f"error: {path} is not an export of train.py (its config.json has no \"format\": "
                         f"\"{EXPORT_FORMAT}\"); Hugging Face encoders go to --init_text / --init_vision")
    weights, tok = export_file(path, config, "weights"), export_file(path, config, "tokenizer")
    config_int(config, "step", where, least=0)
    train_config = config.get("train_config", {})
    if not isinstance(train_config, dict):
        raise SystemExit(f"error: {where}: train_config is {formats.type_of(train_config)}, not an object")
    model = model_of(config.get("model_config"), where)
    state = read_safetensors(weights)
    check_state(state, model, weights)
    return {**config, "model": state, "tokenizer": tok}


# The model_config sizes below 1 describe no model (zero heads would divide by zero)
SIZES = ("vocab_size", "max_text_len", "width", "heads", "mlp_ratio", "image_size", "patch_size", "embed_dim",
         "codebook_size")


def model_of(model_config, where):
    """The model a checkpoint's or an export's model_config describes, built on the meta device (shapes and
    dtypes, no memory), for check_state. A model_config that is no config of ours stops the run with one line
    naming where and the key: not an object, an unknown key, a value of the wrong type (a string where a size
    should be), a size below 1, or values no model is built from (a width its heads do not divide)."""
    if not isinstance(model_config, dict):
        raise SystemExit(f"error: {where}: model_config is {formats.type_of(model_config)}, not an object")
    cls = flava.FLAVAConfig if model_config.get("recipe") == "flava" else XFMConfig
    kinds = {f.name: type(f.default) for f in fields(cls)}  # int, float or str
    for key, v in model_config.items():
        if key not in kinds:
            raise SystemExit(f"error: {where}: model_config has the unknown key {key!r}")
        kind, least = kinds[key], 1 if key in SIZES else 0
        fits = formats._number(v) if kind is float else isinstance(v, kind) and not isinstance(v, bool)
        if not fits or (kind is int and v < least):
            want = {float: "a number", str: "a string", int: f"an int >= {least}"}[kind]
            raise SystemExit(f"error: {where}: model_config.{key} is {formats.type_of(v)} "
                             f"({formats._short(repr(v))}), not {want}")
    try:
        with torch.device("meta"):
            return flava.build_model(flava.config_from_dict(model_config))
    except Exception as e:  # noqa: BLE001 (the model's own checks: any of them refuses the config)
        raise SystemExit(f"error: {where}: model_config describes no model ({type(e).__name__}: {e})")


def check_state(state, model, where):
    """state must hold the model's tensors (model_of): every key, nothing else, each with the model's shape and
    floating where the model's is (F32 bytes labelled I32 are refused). Otherwise one line names where and the
    first key that differs."""
    ours = model.state_dict()
    missing, unexpected = [k for k in ours if k not in state], [k for k in state if k not in ours]
    if missing or unexpected:
        first = f"no {missing[0]}" if missing else f"an unexpected {unexpected[0]}"
        raise SystemExit(f"error: {where}: not the model its model_config describes ({first}; {len(missing)} "
                         f"missing, {len(unexpected)} unexpected)")
    for k, t in ours.items():
        v = state[k]
        if not torch.is_tensor(v) or v.shape != t.shape or \
                v.dtype.is_floating_point != t.dtype.is_floating_point:
            got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else formats.type_of(v)
            raise SystemExit(f"error: {where}: {k} is {got}, but the model's is {t.dtype} {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------------------
# train.py --init=DIR: a fresh pre-training run (step 0, a new optimizer, a new run folder) from an export's
# whole model: its recipe, model config, weights and tokenizer are the run's
#     python train.py --init=runs/xfm_official --data_dir=my_data --max_steps=20000
#     python train.py --init=runs/flava_full --image_tokenizer=flava-image-codebook/   # the export's codebook is zeros

# the train.py keys an export decides (init_run: given with another value, refused) and those it replaces
INIT_DECIDES = ("recipe", "config", "mim_target", "codebook_size")
INIT_REPLACES = ("tokenizer", "vocab_size", "init_text", "init_vision")


def init_run(cfg, given):
    """train.py --init=DIR (cfg: train.TrainConfig; given: the keys the command line set) -> (cfg with the
    export's recipe, config, mim_target or codebook_size and its tokenizer.json as --tokenizer, the export as
    read_export reads it). Refused in one line before any work: a folder that is no export, a key of
    INIT_DECIDES given with another value than the export's, one of INIT_REPLACES given at all, a text length
    beyond the model's position table, a tokenizer the embeddings do not fit, and a FLAVA image tokenizer of
    zeros (convert-flava without --codebook) unless --image_tokenizer gives one."""
    if not is_export(cfg.init):
        raise SystemExit(f"error: --init={cfg.init} is no export folder (config.json, model.safetensors: "
                         f"train.py --export, convert-xfm, convert-flava write one; tools/export.py RUN OUT "
                         f"exports a run of train.py, --resume=RUN continues it)")
    init = read_export(cfg.init)
    mc, tc = init["model_config"], init.get("train_config", {})
    own = {"recipe": mc.get("recipe", "xfm"), "config": tc.get("config", cfg.config)}
    own |= {"mim_target": mc.get("mim_target", "vl")} if own["recipe"] == "xfm" else \
        {"codebook_size": mc["codebook_size"]}
    model = ", ".join(f"{k} {v}" for k, v in own.items())
    for k, v in given.items():
        if (k in own and v != own[k]) or k in INIT_REPLACES:
            raise SystemExit(f"error: --{k}={v} contradicts --init={cfg.init} (its model: {model}; its "
                             f"tokenizer.json): the export decides the model and the tokenizer; leave --{k} out")
    longest = max(cfg.text_len, cfg.caption_len)
    if longest > mc["max_text_len"]:
        raise SystemExit(f"error: --text_len/--caption_len {longest} is beyond the position table of "
                         f"{mc['max_text_len']} tokens of --init={cfg.init}")
    tok = Tokenizer.load(init["tokenizer"])
    if tok.pad_id != mc["pad_id"] or tok.vocab_size > mc["vocab_size"]:
        raise SystemExit(f"error: {init['tokenizer']}: pad id {tok.pad_id} and {tok.vocab_size} tokens; the "
                         f"model of --init={cfg.init} has pad id {mc['pad_id']} and {mc['vocab_size']} embeddings")
    book = [v for k, v in init["model"].items() if k.startswith("image_tokenizer.")]
    if book and not cfg.image_tokenizer and not any(v.any() for v in book):
        raise SystemExit(f"error: --init={cfg.init}: its image tokenizer is all zeros (convert-flava without "
                         f"--codebook); give FLAVA's MIM / MMM targets with --image_tokenizer=DIR (a DALL-E "
                         f"codebook folder) or --image_tokenizer=FILE.pt (a k-means codebook)")
    return replace(cfg, **own, tokenizer=init["tokenizer"]), init


def init_model_config(cfg, init):
    """The model config of a run from --init (init: init_run's export): the export's, with --attn_impl, and
    with --image_tokenizer's codebook in place of the export's (a DALL-E folder's sizes, or the k-means
    PatchTokenizer for a .pt file); its vocabulary must be the one the MIM / MMM heads predict."""
    model_cfg = replace(flava.config_from_dict(init["model_config"]), attn_impl=cfg.attn_impl)
    if not cfg.image_tokenizer or model_cfg.recipe != "flava":
        return model_cfg
    sizes = dalle_config(cfg.image_tokenizer) if os.path.isdir(cfg.image_tokenizer) else {"codebook_width": 0}
    if sizes.get("codebook_size", model_cfg.codebook_size) != model_cfg.codebook_size:
        raise SystemExit(f"error: {cfg.image_tokenizer}: a codebook of {sizes['codebook_size']} codes; the MIM / "
                         f"MMM heads of --init={cfg.init} predict {model_cfg.codebook_size}")
    if sizes["codebook_width"] and model_cfg.patch_size < flava.DalleCodebook.CELL:
        raise SystemExit(f"error: the DALL-E codebook gives one code per {flava.DalleCodebook.CELL} pixels; the "
                         f"patches of --init={cfg.init} are {model_cfg.patch_size} pixels")
    return replace(model_cfg, **sizes)


def load_init(model, init, image_tokenizer=""):
    """Every tensor of the export into model (strict: every key, every shape), except the image tokenizer's
    where --image_tokenizer replaces it (flava.prepare_run then loads that one)."""
    if not image_tokenizer:
        model.load_state_dict(init["model"])
        return
    state = {k: v for k, v in init["model"].items() if not k.startswith("image_tokenizer.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("image_tokenizer.") for k in missing), (missing, unexpected)


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
    exactly, and a tensor is floating where ours is: otherwise a ValueError names the key and both.
    -> LoadReport."""
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
        if t.dtype.is_floating_point != ours[key].dtype.is_floating_point:
            raise ValueError(f"checkpoint {source}: {' + '.join(names)} is {t.dtype}, but the model's {key} is "
                             f"{ours[key].dtype}")
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


def load_encoders(model, init_text="", init_vision="", verbose=True):
    """train.py --init_text / --init_vision: the pre-trained language encoder (load_text) and vision encoder
    (load_vision) of a fresh run, each load's report printed when verbose (rank 0)."""
    for path, load in ((init_text, load_text), (init_vision, load_vision)):
        report = load(model, path) if path else None
        if report and verbose:
            print(report, flush=True)


def _strip(state, prefix):
    return {k.removeprefix(prefix): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------
# Language encoder: RoBERTa


def fold_token_type(src, prefix=""):
    """RoBERTa adds token_type_embeddings[0] to every token (every token has type 0): a constant, folded here
    into every row of the position table of src (a dict, changed in place; keys under prefix)."""
    tt = src.get(f"{prefix}embeddings.token_type_embeddings.weight")
    pos = f"{prefix}embeddings.position_embeddings.weight"
    if tt is not None and pos in src:
        src[pos] = src[pos] + tt[0]


def load_text(model, path):
    """Hugging Face RoBERTa folder (or weights file) -> model.text and model.text_mlm. -> LoadReport."""
    src = _strip(read_state_dict(path), "roberta.")
    cfg = model.cfg
    hf = read_hf_config(path)
    if hf is not None and hf.get("pad_token_id", cfg.pad_id) != cfg.pad_id:
        raise ValueError(f"{path}: pad_token_id {hf['pad_token_id']} != the model's pad_id {cfg.pad_id}")
    src = dict(src)
    fold_token_type(src)
    pos = "embeddings.position_embeddings.weight"
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


def resize_rel_pos(table, old_grid, new_grid):
    """A relative position bias table for a new patch grid (fine-tuning at another image size,
    docs/METHOD.md §7.4).

    table ((2g-1)^2 + 3, nh) -> ((2g'-1)^2 + 3, nh). The (2g-1) x (2g-1) map of offsets (dy, dx) is
    resized bicubically with align_corners=True, so the zero offset stays at the centre and the
    largest offsets at the corners; the 3 CLS entries are kept as they are. (BEiT samples the old
    map at geometrically spaced points with scipy's cubic interpolation; a plain bicubic resize is
    our choice: no scipy.) Same grid: a copy.
    """
    if old_grid == new_grid:
        return table.clone()
    n_old, n_new, heads = 2 * old_grid - 1, 2 * new_grid - 1, table.shape[1]
    assert table.shape[0] == n_old ** 2 + 3, \
        f"table has {table.shape[0]} rows, not (2*{old_grid}-1)^2 + 3"
    grid = table[:-3].float().t().reshape(1, heads, n_old, n_old)  # (1, nh, 2g-1, 2g-1) offset map
    grid = F.interpolate(grid, size=(n_new, n_new), mode="bicubic", align_corners=True)
    # ((2g'-1)^2, nh), row-major as the index
    grid = grid.reshape(heads, n_new * n_new).t().to(table.dtype)
    return torch.cat([grid, table[-3:]], dim=0)              # + cls->token, token->cls, cls->cls


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
    if eps is not None and (not formats._number(eps) or abs(eps - ours) > 1e-12):
        rep.notes.append(f"the checkpoint's LayerNorm eps is {eps!r}; our {which} encoder uses {ours} (a tiny "
                         f"difference)")


# ---------------------------------------------------------------------------------------------------------
# Model config from the checkpoints. A config.json value of the wrong type stops the run naming the file and the
# key (config_int); a checkpoint our encoders cannot hold is a ValueError naming it (model_config: one line).


def text_config(path):
    """XFMConfig fields from a RoBERTa config.json: width, heads, text_layers, vocab_size, pad_id, max_text_len."""
    hf, where = read_hf_config(path), _hf_file(path, "config.json")
    if hf is None:
        raise ValueError(f"{path}: no config.json next to the RoBERTa weights (a Hugging Face folder is expected)")
    d, pad = config_int(hf, "hidden_size", where), config_int(hf, "pad_token_id", where, default=1, least=0)
    heads = config_int(hf, "num_attention_heads", where)
    if config_int(hf, "intermediate_size", where, default=4 * d) != 4 * d:
        raise ValueError(f"{path}: intermediate_size {hf['intermediate_size']} is not 4 x hidden_size {d} (mlp_ratio 4)")
    if d % heads:
        raise ValueError(f"{path}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; our blocks use the exact (erf) gelu")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    return dict(width=d, heads=heads, text_layers=config_int(hf, "num_hidden_layers", where),
                vocab_size=config_int(hf, "vocab_size", where), pad_id=pad,
                max_text_len=config_int(hf, "max_position_embeddings", where, least=pad + 2) - pad - 1)


def vision_config(path):
    """XFMConfig fields from a BEiT checkpoint: width, heads, vision_layers, image_size, patch_size. A Hugging Face
    folder says them in config.json; an official .pth has no config, so they are read off the tensor shapes."""
    hf, where = read_hf_config(path), _hf_file(path, "config.json")
    if hf is not None and hf.get("model_type") == "beit":
        d, heads = config_int(hf, "hidden_size", where), config_int(hf, "num_attention_heads", where)
        if config_int(hf, "intermediate_size", where, default=4 * d) != 4 * d:
            raise ValueError(f"{path}: intermediate_size {hf['intermediate_size']} is not 4 x hidden_size {d}")
        if d % heads:
            raise ValueError(f"{path}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
        if hf.get("use_absolute_position_embeddings") or not (hf.get("use_relative_position_bias") or
                                                              hf.get("use_shared_relative_position_bias")):
            raise ValueError(f"{path}: our BEiT encoder needs relative position bias and no absolute position embedding")
        size = hf.get("image_size")                                        # an int, or [height, width]
        size = size[0] if isinstance(size, list) and size else size
        size = config_int({"image_size": size}, "image_size", where)
        return dict(width=d, heads=heads, vision_layers=config_int(hf, "num_hidden_layers", where),
                    image_size=size, patch_size=config_int(hf, "patch_size", where))
    return beit_sizes(read_state_dict(path), path)


def beit_sizes(src, path):
    """vision_config of an official BEiT state dict src (read from path): the sizes off the tensor shapes, the
    head count off the relative position bias table ((2g-1)^2 + 3 rows, one column per head)."""
    if "patch_embed.proj.weight" not in src:
        raise ValueError(f"{path}: neither a Hugging Face BEiT folder nor an official BEiT checkpoint (no patch_embed.proj.weight)")
    w = src["patch_embed.proj.weight"]                                     # (D, 3, p, p)
    if w.dim() != 4 or w.shape[0] < 1 or w.shape[-1] < 1 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"{path}: patch_embed.proj.weight has the shape {tuple(w.shape)}, not "
                         f"(width, 3, p, p)")
    table = src.get("rel_pos_bias.relative_position_bias_table", src.get("blocks.0.attn.relative_position_bias_table"))
    if table is None:
        raise ValueError(f"{path}: no relative position bias table, so the grid and heads cannot be inferred")
    rows = table.shape[0] if table.dim() == 2 else 0
    grid = ((rows - 3) ** 0.5 + 1) / 2 if rows >= 4 else 0               # rows = (2g-1)^2 + 3
    if grid != int(grid) or grid < 1 or table.shape[1] < 1 or w.shape[0] % table.shape[1]:
        raise ValueError(f"{path}: a relative position bias table of shape {tuple(table.shape)} is not "
                         f"((2g-1)^2 + 3, heads) for a width of {w.shape[0]}")
    fc1 = src.get("blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.dim() != 2 or fc1.shape[0] != 4 * w.shape[0]:
        raise ValueError(f"{path}: blocks.0.mlp.fc1.weight is not there or not 4 x the width (mlp_ratio 4)")
    layers = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in src) if m)
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
    except ValueError as e:
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


def from_pretrained_encoders(cfg, tok, master):
    """A stand-in for a train.py checkpoint: the --preset model with the language encoder (+ MLM head) from
    --init_text and the vision encoder from --init_vision (load_text, load_vision); fusion encoder and heads are
    fresh (finetune.py --init_text / --init_vision)."""
    base = make_config(cfg.preset, vocab_size=tok.vocab_size, pad_id=tok.pad_id, max_text_len=cfg.text_len or 1)
    mcfg = model_config(cfg, base, tok)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = XFM(mcfg)
    for path, load in ((cfg.init_text, load_text), (cfg.init_vision, load_vision)):
        if path:
            rep = load(model, path)
            if master:
                print(rep, flush=True)
    return {"model": model.state_dict(), "model_config": asdict(mcfg), "step": 0}


# ---------------------------------------------------------------------------------------------------------
# Hugging Face FLAVA: a FlavaForPreTraining or FlavaModel folder -> flava.FLAVA, written as an export folder
#     python -m lib.pretrained convert-flava flava-full/ --out runs/flava_full   # then finetune.py --init DIR
# Every tensor is placed one to one (q, k, v concatenated into qkv); checked against transformers in
# tests/test_hf_flava.py, every stage within 1e-5 in fp32:
# - Hugging Face adds token_type_embeddings[0] to every token; that row is folded into every position row;
# - its position table has max_position_embeddings rows from 0; a shorter max_text_len keeps the first rows;
# - its MLM / MIM / MMM heads' LayerNorm eps is the config's layer_norm_eps (FLAVAConfig.head_ln_eps);
# - its ITM head is a pooler (dense, tanh) and a linear layer: flava.FLAVA's itm_head, Linear-Tanh-Linear;
# - each head's decoder has a bias that is the same tensor as the head's `bias` (tied in transformers);
# - unused: the three encoders' poolers (FLAVA's features are final-LN CLS states) and the DALL-E image
#   codebook a FlavaForPreTraining folder may hold (`image_codebook.*`); --codebook DIR reads a
#   FlavaImageCodebook folder instead (the subsection after convert_flava).

FLAVA_HEADS = ("mlm_head", "mim_head", "mmm_text_head", "mmm_image_head")


def FLAVA_HF_MAP(cfg):
    """Hugging Face FLAVA (keys without the `flava.` prefix) -> flava.FLAVA."""
    emb = "text_model.embeddings"
    m = {"text.word_embed.weight": f"{emb}.word_embeddings.weight",
         "text.pos_embed.weight": f"{emb}.position_embeddings.weight",       # + token-type row 0 (load_flava)
         **_wb("text.embed_norm", f"{emb}.LayerNorm"), **_wb("text.norm", "text_model.layernorm"),
         **_wb("vision.patch_embed", "image_model.embeddings.patch_embeddings.projection"),
         "vision.cls_token": "image_model.embeddings.cls_token",
         "vision.mask_token": "image_model.embeddings.mask_token",
         "vision.pos_embed": "image_model.embeddings.position_embeddings",
         **_wb("vision.norm", "image_model.layernorm"),
         **_wb("fusion.image_to_mm", "image_to_mm_projection"), **_wb("fusion.text_to_mm", "text_to_mm_projection"),
         "fusion.cls_token": "multimodal_model.cls_token", **_wb("fusion.norm", "multimodal_model.layernorm"),
         **_wb("text_proj", "text_projection"), **_wb("vision_proj", "image_projection"),
         "logit_scale": "logit_scale",
         **_wb("itm_head.0", "itm_head.pooler.dense"), **_wb("itm_head.2", "itm_head.seq_relationship")}
    for head in FLAVA_HEADS:
        m |= _wb(f"{head}.dense", f"{head}.transform.dense") | _wb(f"{head}.norm", f"{head}.transform.LayerNorm")
        m |= {f"{head}.decoder.weight": f"{head}.decoder.weight", f"{head}.bias": f"{head}.decoder.bias"}
    for ours, theirs, layers in (("text", "text_model", cfg.text_layers), ("vision", "image_model", cfg.vision_layers),
                                 ("fusion", "multimodal_model", cfg.fusion_layers)):
        for i in range(layers):
            o, h = f"{ours}.blocks.{i}", f"{theirs}.encoder.layer.{i}"    # pre-LN ViT block
            for p in ("weight", "bias"):
                m[f"{o}.attn.qkv.{p}"] = tuple(f"{h}.attention.attention.{x}.{p}" for x in ("query", "key", "value"))
            m |= _wb(f"{o}.attn.proj", f"{h}.attention.output.dense") | _wb(f"{o}.norm1", f"{h}.layernorm_before")
            m |= _wb(f"{o}.mlp.fc1", f"{h}.intermediate.dense") | _wb(f"{o}.mlp.fc2", f"{h}.output.dense")
            m |= _wb(f"{o}.norm2", f"{h}.layernorm_after")
    return m


# checkpoint keys known and not loaded, with the reason
FLAVA_HF_SKIP = {r"(text|image|multimodal)_model\.pooler\..*": "a pooler (FLAVA's features are final-LN CLS states)",
                 r"text_model\.embeddings\.token_type_embeddings\.weight": "folded into pos_embed (every token has "
                                                                           "type 0)",
                 r"(mlm|mim|mmm_text|mmm_image)_head\.bias": "the same tensor as the head's decoder.bias (tied)",
                 r".*(position_ids|token_type_ids)": "a buffer",
                 r"image_codebook\..*": "the DALL-E image codebook (convert-flava --codebook DIR reads a "
                                         "FlavaImageCodebook folder)"}
# the keys a FlavaModel folder lacks: the pre-training heads, left at their init
FLAVA_PRETRAINING_ONLY = tuple(f"{h}." for h in (*FLAVA_HEADS, "itm_head"))

# Hugging Face's defaults, for a config.json that leaves a key out
_FLAVA_HF_DEFAULTS = {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12,
                      "intermediate_size": 3072, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}


def flava_hf_config(path, max_text_len=0):
    """flava.FLAVAConfig of a Hugging Face FLAVA folder's config.json: one width, head count, MLP ratio and eps
    for the three encoders (refused when they differ), vocabulary, pad id, position rows (or max_text_len, at
    most that many), layers, image and patch size, codebook size, projection size, logit scale."""
    where = _hf_file(path, "config.json")
    hf = read_hf_config(path)
    if hf is None or hf.get("model_type") != "flava":
        raise SystemExit(f"error: {where}: not the config.json of a Hugging Face FLAVA model (model_type \"flava\")")
    parts = {}
    for part in ("text_config", "image_config", "multimodal_config"):
        sub = hf.get(part, {})
        if not isinstance(sub, dict):
            raise SystemExit(f"error: {where}: {part} is {formats.type_of(sub)}, not an object")
        sub = {**_FLAVA_HF_DEFAULTS, **({"num_hidden_layers": 6} if part == "multimodal_config" else {}), **sub}
        d, heads = config_int(sub, "hidden_size", where), config_int(sub, "num_attention_heads", where)
        eps = sub["layer_norm_eps"]
        if d % heads or config_int(sub, "intermediate_size", where) % d or not formats._number(eps) or \
                sub["hidden_act"] != "gelu" or sub["qkv_bias"] is not True:
            raise SystemExit(f"error: {where}: {part} is no encoder flava.FLAVA has (hidden_size a multiple of "
                             f"num_attention_heads and a divisor of intermediate_size, gelu, qkv_bias, a number "
                             f"layer_norm_eps)")
        parts[part] = (sub, (d, heads, sub["intermediate_size"] // d, float(eps)))
    shared = {p[1] for p in parts.values()}
    if len(shared) > 1:
        raise SystemExit(f"error: {where}: the text, image and multimodal configs differ in hidden_size, "
                         f"num_attention_heads, intermediate_size or layer_norm_eps; flava.FLAVA has one of each")
    (d, heads, ratio, eps), = shared
    text, image, mm = (parts[p][0] for p in ("text_config", "image_config", "multimodal_config"))
    if config_int(hf, "hidden_size", where, default=768) != d or not mm.get("use_cls_token", True) or \
            image.get("num_channels", 3) != 3:
        raise SystemExit(f"error: {where}: hidden_size must be the encoders' width {d}, the multimodal encoder "
                         f"must use its CLS token and images must have 3 channels")
    rows = config_int(text, "max_position_embeddings", where, default=512)
    if max_text_len > rows:
        raise SystemExit(f"error: {where}: max_position_embeddings {rows} is fewer than --max_text_len {max_text_len}")
    logit_scale = hf.get("logit_scale_init_value", 2.6592)
    return flava.make_flava_config(
        "base", vocab_size=config_int(text, "vocab_size", where, default=30522),
        pad_id=config_int(text, "pad_token_id", where, default=0, least=0), max_text_len=max_text_len or rows,
        width=d, heads=heads, mlp_ratio=ratio, text_layers=config_int(text, "num_hidden_layers", where),
        vision_layers=config_int(image, "num_hidden_layers", where),
        fusion_layers=config_int(mm, "num_hidden_layers", where),
        image_size=config_int(image, "image_size", where, default=224),
        patch_size=config_int(image, "patch_size", where, default=16),
        codebook_size=config_int(image, "vocab_size", where, default=8192),
        embed_dim=config_int(hf, "projection_dim", where, default=768),
        logit_scale=float(logit_scale) if formats._number(logit_scale) else 2.6592, ln_eps=eps, head_ln_eps=eps)


def load_flava(model, path):
    """A Hugging Face FlavaForPreTraining or FlavaModel folder (or weights file) -> flava.FLAVA model, every
    tensor placed (FLAVA_HF_MAP) or known and unused (FLAVA_HF_SKIP). A tensor with no place, or one missing that
    is not a pre-training head's (a FlavaModel has none), is refused with one line. -> LoadReport."""
    src = _strip(read_state_dict(path), "flava.")
    fold_token_type(src, "text_model.")  # every token has type 0: that row is a constant added at every position
    pos = "text_model.embeddings.position_embeddings.weight"
    n_pos = model.text.pos_embed.num_embeddings
    if pos in src and src[pos].shape[0] > n_pos:  # a shorter max_text_len: the first rows (positions from 0)
        src[pos] = src[pos][:n_pos]
    for head in FLAVA_HEADS:  # a file may hold either name of the tied bias
        if f"{head}.decoder.bias" not in src and f"{head}.bias" in src:
            src[f"{head}.decoder.bias"] = src[f"{head}.bias"]
    try:
        rep = apply_map(model, src, FLAVA_HF_MAP(model.cfg), FLAVA_HF_SKIP, path)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if rep.unexpected:
        raise SystemExit(f"error: {path}: the tensor {rep.unexpected[0]} has no place in flava.FLAVA "
                         f"({len(rep.unexpected)} such tensors)")
    lost = [k for k in rep.missing if not k.startswith(FLAVA_PRETRAINING_ONLY)]
    if lost:
        raise SystemExit(f"error: {path}: no {rep.missing[lost[0]]} for flava.FLAVA's {lost[0]} "
                         f"({len(lost)} encoder tensors missing)")
    for head in FLAVA_HEADS:
        a, b = src.get(f"{head}.bias"), src.get(f"{head}.decoder.bias")
        if a is not None and b is not None and not torch.equal(a, b):
            rep.notes.append(f"{head}.bias differs from {head}.decoder.bias; the decoder's is loaded (transformers "
                             f"ties the two)")
    return rep


def convert_flava(hf_dir, out_dir, max_text_len=0, codebook=""):
    """A Hugging Face FLAVA folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json) -> the
    export folder out_dir (config.json, model.safetensors, tokenizer.json) that finetune.py --init reads. The
    image tokenizer is the DALL-E codebook of the FlavaImageCodebook folder `codebook` (load_dalle_codebook);
    without one it is a k-means PatchTokenizer whose codebook stays zeros. -> LoadReport."""
    if not os.path.isdir(hf_dir):
        raise SystemExit(f"error: {hf_dir}: no such folder (a Hugging Face FLAVA folder is expected)")
    if not os.path.isfile(tokenizer_path(hf_dir)):
        raise SystemExit(f"error: {hf_dir}: no tokenizer.json (transformers' AutoTokenizer.from_pretrained(DIR)"
                         f".save_pretrained(DIR) writes one)")
    cfg = flava_hf_config(hf_dir, max_text_len)
    tok = Tokenizer.load(tokenizer_path(hf_dir))
    if tok.pad_id != cfg.pad_id or tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"error: {tokenizer_path(hf_dir)}: pad id {tok.pad_id} and {tok.vocab_size} tokens; the "
                         f"model has pad_token_id {cfg.pad_id} and {cfg.vocab_size} embeddings")
    train_config = {"config": f"Hugging Face FLAVA {hf_dir}"}
    if codebook:  # the DALL-E codebook as the export's image tokenizer: its vocabulary must be the heads'
        sizes = dalle_config(codebook)
        if sizes["codebook_size"] != cfg.codebook_size:
            raise SystemExit(f"error: {codebook}: a codebook of {sizes['codebook_size']} codes; {hf_dir}'s MIM / "
                             f"MMM heads predict {cfg.codebook_size} (image_config.vocab_size)")
        cfg, train_config = replace(cfg, **sizes), {**train_config, "image_tokenizer": codebook}
    model = flava.FLAVA(cfg)
    rep = load_flava(model, hf_dir)
    if codebook:
        rep.notes.append(f"image tokenizer: {load_dalle_codebook(model.image_tokenizer, codebook)}")
    export(out_dir, hf_dir, model.state_dict(), asdict(cfg), train_config, 0)
    return rep


# The DALL-E image codebook: a Hugging Face FlavaImageCodebook folder (facebook/flava-image-codebook: config.json,
# model.safetensors or pytorch_model.bin) -> flava.DalleCodebook, every tensor placed (DALLE_MAP)
#     python train.py --recipe=flava --image_tokenizer=flava-image-codebook/    # FLAVA's own MIM / MMM targets
#     python -m lib.pretrained convert-flava flava-full/ --out runs/flava_full --codebook flava-image-codebook/
# Checked against transformers in tests/test_dalle_codebook.py: logits within 1e-5, the same codes.

# Hugging Face's defaults, for a config.json that leaves a key out
_DALLE_HF_DEFAULTS = {"num_groups": 4, "input_channels": 3, "num_blocks_per_group": 2, "hidden_size": 256,
                      "vocab_size": 8192}


def DALLE_MAP(blocks):
    """Hugging Face's FlavaImageCodebook -> flava.DalleCodebook (4 groups of `blocks` blocks; the first block
    of groups 2-4 widens, so it has a 1x1 skip conv)."""
    m = {**_wb("input", "blocks.input"), **_wb("output", "blocks.output.conv")}
    for g in range(flava.DalleCodebook.GROUPS):
        for b in range(blocks):
            o, h = f"groups.{g}.{b}", f"blocks.group_{g + 1}.group.block_{b + 1}"
            if g > 0 and b == 0:
                m |= _wb(f"{o}.skip", f"{h}.id_path")
            for i in range(4):
                m |= _wb(f"{o}.res.{i}", f"{h}.res_path.path.conv_{i + 1}")
    return m


def dalle_config(path):
    """The flava.FLAVAConfig fields of a FlavaImageCodebook folder's config.json: {"codebook_size": its
    vocab_size, "codebook_width": hidden_size, "codebook_blocks": num_blocks_per_group}. Hugging Face's model has
    4 groups on 3 channels whatever the config says, and its residual gain reads num_groups: a config with
    other values is refused."""
    where = _hf_file(path, "config.json")
    hf = read_hf_config(path)
    if hf is None or hf.get("model_type") != "flava_image_codebook":
        raise SystemExit(f"error: {where}: not the config.json of a FlavaImageCodebook (model_type "
                         f"\"flava_image_codebook\"); --image_tokenizer takes that folder or a saved "
                         f"image_tokenizer.pt")
    hf = {**_DALLE_HF_DEFAULTS, **hf}
    if config_int(hf, "num_groups", where) != 4 or config_int(hf, "input_channels", where) != 3:
        raise SystemExit(f"error: {where}: num_groups must be 4 and input_channels 3 (DALL-E's encoder)")
    return {"codebook_size": config_int(hf, "vocab_size", where),
            "codebook_width": config_int(hf, "hidden_size", where),
            "codebook_blocks": config_int(hf, "num_blocks_per_group", where)}


def load_dalle_codebook(codebook, path):
    """A FlavaImageCodebook folder's weights -> codebook (a flava.DalleCodebook built with dalle_config's
    sizes): every tensor placed, none missing; a tensor with no place, a missing one or a shape that differs is
    refused with one line. -> LoadReport."""
    try:
        rep = apply_map(codebook, read_state_dict(path), DALLE_MAP(len(codebook.groups[0])), {}, path)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if rep.unexpected:
        raise SystemExit(f"error: {path}: the tensor {rep.unexpected[0]} has no place in flava.DalleCodebook "
                         f"({len(rep.unexpected)} such tensors)")
    if rep.missing:
        first = next(iter(rep.missing))
        raise SystemExit(f"error: {path}: no {rep.missing[first]} for flava.DalleCodebook's {first} "
                         f"({len(rep.missing)} tensors missing)")
    return rep


# Official X-FM checkpoints: a file of the official repository ({"model": state dict, "config": the run's
# YAML as a dict}, or a bare state dict) -> an export folder, which finetune.py --init DIR reads
#     python -m lib.pretrained convert-xfm xfm_base.pth --out runs/xfm_official --text_config roberta-base/
# The official model is XFMBase: text_encoder and fusion_encoder are RobertaForMaskedLM (keys under `roberta.`,
# lm_head and lm_cap_head beside it; in a fine-tuned file a bare RobertaModel), vision_encoder is BEiT-v2 with a
# table in every block and mean pooling (fc_norm). Every fusion layer has a cross-attention (fusion_start_at 0).


def FUSION_MAP(layers):
    """The official fusion encoder (keys without `roberta.`) and its MLM head -> our FusionEncoder and
    fusion_mlm. Self-attention's query, key, value are concatenated into our qkv, cross-attention's key and
    value into our kv; its decoder is a tensor of its own (ours is untied)."""
    m = {**_wb("fusion_mlm.dense", "lm_head.dense"), **_wb("fusion_mlm.norm", "lm_head.layer_norm"),
         "fusion_mlm.decoder.weight": "lm_head.decoder.weight", "fusion_mlm.bias": "lm_head.bias"}
    for i in range(layers):
        o, h = f"fusion.blocks.{i}", f"encoder.layer.{i}"
        a, c = f"{h}.attention", f"{h}.crossattention"                    # post-LN, as RoBERTa's blocks
        for p in ("weight", "bias"):
            m[f"{o}.attn.qkv.{p}"] = tuple(f"{a}.self.{x}.{p}" for x in ("query", "key", "value"))
            m[f"{o}.cross_attn.q.{p}"] = f"{c}.self.query.{p}"
            m[f"{o}.cross_attn.kv.{p}"] = (f"{c}.self.key.{p}", f"{c}.self.value.{p}")
        m |= _wb(f"{o}.attn.proj", f"{a}.output.dense") | _wb(f"{o}.norm1", f"{a}.output.LayerNorm")
        m |= _wb(f"{o}.cross_attn.proj", f"{c}.output.dense") | _wb(f"{o}.norm_cross", f"{c}.output.LayerNorm")
        m |= _wb(f"{o}.mlp.fc1", f"{h}.intermediate.dense") | _wb(f"{o}.mlp.fc2", f"{h}.output.dense")
        m |= _wb(f"{o}.norm2", f"{h}.output.LayerNorm")
    return m


def _prefixed(prefix, names):
    return tuple(prefix + n for n in names) if isinstance(names, tuple) else prefix + names


def XFM_OFFICIAL_MAP(text_layers, vision_layers, fusion_layers):
    """Every tensor of model.XFM -> its official name(s) (the text and fusion encoders' without `roberta.`):
    the three encoders through ROBERTA_MAP, BEIT_MAP and FUSION_MAP, the heads by the same names."""
    m = {k: _prefixed("text_encoder.", v) for k, v in ROBERTA_MAP(text_layers).items()}
    m |= {k: _prefixed("vision_encoder.", v) for k, v in BEIT_MAP(vision_layers).items()}
    m |= {k: _prefixed("fusion_encoder.", v) for k, v in FUSION_MAP(fusion_layers).items()}
    for p in ("weight", "bias"):
        m |= {f"{h}.{i}.{p}": f"{h}.{i}.{p}" for h in ("itm_head", "bbox_head") for i in (0, 1, 3)}
        m |= {f"{h}.{p}": f"{h}.{p}" for h in ("text_proj", "vision_proj")}
    return m | {"temp": "temp"}


# official tensors with no place in model.XFM, known and listed (names without `roberta.`)
XFM_OFFICIAL_SKIP = {
    r"text_encoder\.embeddings\.token_type_embeddings\.weight": "folded into the position table",
    r"(text|fusion)_encoder\.embeddings\.(position_ids|token_type_ids)": "a buffer",
    r"text_encoder\.lm_head\.decoder\.weight": "tied to the word embeddings",
    r"(text|fusion)_encoder\.lm_head\.decoder\.bias": "the same tensor as lm_head.bias",
    r"(text|fusion)_encoder\.lm_cap_head\..*": "a captioning head (no task here uses it)",
    r"fusion_encoder\.embeddings\..*": "the fusion encoder's embeddings (its input is the text encoder's states)",
    r"vision_encoder\..*relative_position_index": "a buffer (model.RelativePositionBias builds the index)"}

# the model's tensors a file may lack (a fine-tuned file has no MLM heads): they keep a fresh init, and say so
XFM_OFFICIAL_OPTIONAL = ("text_mlm.", "fusion_mlm.", "text_proj.", "vision_proj.", "temp", "itm_head.",
                         "bbox_head.", "vision.fc_norm.")


def plain_data(obj, where):
    """Refuse (one line naming where and the type) anything in obj but dicts, lists, tuples, strings, numbers,
    None and tensors. torch.load(weights_only=True) already refuses every class it does not know; this refuses
    the few others it rebuilds (torch.Size, torch.device, dtypes, ...), which no official file holds."""
    todo = [(obj, "the file")]
    while todo:
        x, at = todo.pop()
        if isinstance(x, dict) and type(x).__module__ in ("builtins", "collections"):
            todo += [(v, f"{at}[{k!r}]") for k, v in x.items()]
        elif type(x) in (list, tuple):
            todo += [(v, f"{at}[{i}]") for i, v in enumerate(x)]
        elif not (torch.is_tensor(x) or x is None or type(x) in (str, int, float, bool)):
            raise SystemExit(f"error: {where}: {at} is {formats.type_of(x)} ({type(x).__name__}); an official "
                             f"X-FM file holds only dicts, lists, strings, numbers and tensors")


def official_parts(raw, where):
    """(state dict, run config) of an official file: {"model": state dict, "config": {...}, ...} or a bare state
    dict. The state dict's keys are strings and its values tensors; the text and fusion encoders' keys lose their
    `roberta.` -> ({name without roberta.: tensor}, {that name: the official name}, run config)."""
    plain_data(raw, where)
    if not isinstance(raw, dict):
        raise SystemExit(f"error: {where}: holds {formats.type_of(raw)}, not a dict")
    state, run_config = (raw["model"], raw.get("config") or {}) if isinstance(raw.get("model"), dict) else (raw, {})
    if not isinstance(run_config, dict):
        raise SystemExit(f"error: {where}: its config is {formats.type_of(run_config)}, not a dict")
    src, names = {}, {}
    for k, v in state.items():
        if not (isinstance(k, str) and torch.is_tensor(v)):
            raise SystemExit(f"error: {where}: the state dict holds {formats.type_of(v)} under {k!r}, not a "
                             f"tensor under a name")
        short = re.sub(r"^(text_encoder|fusion_encoder)\.roberta\.", r"\1.", k)
        if short in src:
            raise SystemExit(f"error: {where}: holds both {names[short]} and {k}")
        src[short], names[short] = v, k
    return src, names, run_config


def _layers(src, prefix):
    found = {int(m.group(1)) for m in (re.match(rf"{re.escape(prefix)}(\d+)\.", k) for k in src) if m}
    return 1 + max(found) if found else 0


def official_xfm_config(src, run_config, text_dir, where):
    """make_config overrides for an official state dict (official_parts' names) -> (overrides, notes). The
    vision sizes come off the BEiT tensors (beit_sizes: heads = the last dimension of each table), vocabulary,
    width and position rows off the text embeddings, depths off the layer numbers, embed_dim off text_proj; the
    pad id and the head count of the text encoder from its RoBERTa config.json (text_dir), when given. The
    run's config, where it names a size, must say the same."""
    try:
        sizes = beit_sizes({k.removeprefix("vision_encoder."): v for k, v in src.items()
                            if k.startswith("vision_encoder.")}, f"{where} (vision_encoder)")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    word = src.get("text_encoder.embeddings.word_embeddings.weight")
    pos = src.get("text_encoder.embeddings.position_embeddings.weight")
    proj = src.get("text_proj.weight")
    if any(t is None or t.dim() != 2 for t in (word, pos, proj)):
        raise SystemExit(f"error: {where}: no text_encoder word and position embeddings and text_proj of 2 "
                         f"dimensions: not an X-FM model")
    notes, pad = [], 1
    if text_dir:
        try:
            t = text_config(text_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if (t["width"], t["heads"]) != (word.shape[1], sizes["heads"]):
            raise SystemExit(f"error: {text_dir}: width {t['width']} and {t['heads']} heads, but {where} has "
                             f"width {word.shape[1]} and {sizes['heads']} heads (one for all three encoders)")
        pad = t["pad_id"]
    else:
        notes.append(f"no --text_config: pad id 1 (RoBERTa's) and the vision encoder's {sizes['heads']} heads "
                     f"for the text and fusion encoders")
    over = dict(sizes, vocab_size=word.shape[0], pad_id=pad, max_text_len=pos.shape[0] - pad - 1,
                text_layers=_layers(src, "text_encoder.encoder.layer."), embed_dim=proj.shape[0],
                fusion_layers=_layers(src, "fusion_encoder.encoder.layer."))
    if word.shape[1] != sizes["width"]:
        raise SystemExit(f"error: {where}: text width {word.shape[1]}, vision width {sizes['width']}: this model "
                         f"has one width for all three encoders")
    if over["max_text_len"] < 1:
        raise SystemExit(f"error: {where}: a position table of {pos.shape[0]} rows leaves no position past "
                         f"the pad id {pad}")
    said = {"image_res": "image_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
            "text_num_hidden_layers": "text_layers", "fusion_num_hidden_layers": "fusion_layers"}
    for key, ours in said.items():
        if key in run_config and config_int(run_config, key, f"{where} config") != over[ours]:
            raise SystemExit(f"error: {where}: its config says {key} {run_config[key]}, its tensors "
                             f"{over[ours]}")
    return over, notes


def convert_xfm(path, out_dir, text_dir="", tokenizer=""):
    """An official X-FM checkpoint file -> the export folder out_dir (config.json, model.safetensors,
    tokenizer.json; finetune.py --init out_dir). The file is read with torch.load(weights_only=True) and
    checked to be plain data (plain_data); the sizes come from its tensors and config (official_xfm_config);
    the tokenizer.json is --tokenizer's, else text_dir's, exported with the official text normalisation on
    (tokenizer.for_official_weights). Every tensor goes through XFM_OFFICIAL_MAP, the text
    encoder's token-type row folded into its positions. A tensor with no place (neither mapped nor in
    XFM_OFFICIAL_SKIP), or an encoder tensor the file lacks, refuses the file with one line and writes
    nothing. -> the LoadReport, whose keys are the official names; the lines it prints list every official
    tensor not used."""
    src, names, run_config = official_parts(read_torch(path), path)
    over, notes = official_xfm_config(src, run_config, text_dir, path)
    tok_path = tokenizer or (tokenizer_path(text_dir) if text_dir else "")
    if not tok_path:
        raise SystemExit("error: no tokenizer.json: give --tokenizer FILE, or --text_config DIR with one")
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size > over["vocab_size"] or tok.pad_id != over["pad_id"]:
        raise SystemExit(f"error: {tok_path}: {tok.vocab_size} tokens with <pad> {tok.pad_id}, but {path} has "
                         f"{over['vocab_size']} embeddings and pad id {over['pad_id']}")
    fold_token_type(src, "text_encoder.")
    cfg = make_config("base", **over)
    torch.manual_seed(0)                                                  # the heads a file lacks: one init
    model = XFM(cfg)
    keymap = XFM_OFFICIAL_MAP(cfg.text_layers, cfg.vision_layers, cfg.fusion_layers)
    try:
        rep = apply_map(model, src, keymap, XFM_OFFICIAL_SKIP, path)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if rep.unexpected:
        raise SystemExit(f"error: {path}: {len(rep.unexpected)} tensor(s) with no place in this model, such as "
                         f"{names[rep.unexpected[0]]}: refused, nothing written")
    lacking = [k for k in rep.missing if not k.startswith(XFM_OFFICIAL_OPTIONAL)]
    if lacking:
        raise SystemExit(f"error: {path}: no {rep.missing[lacking[0]]} (for {lacking[0]}; {len(lacking)} of the "
                         f"model's tensors lacking): not a whole X-FM model")
    dec, word = src.get("text_encoder.lm_head.decoder.weight"), src["text_encoder.embeddings.word_embeddings.weight"]
    if dec is not None and not torch.equal(dec, word):
        notes.append("text_encoder.lm_head.decoder.weight differs from the word embeddings; ours is tied to them")
    rep.skipped = {names[k]: r for k, r in rep.skipped.items()}
    rep.notes += notes
    export(out_dir, os.path.dirname(os.path.abspath(path)), model.state_dict(), asdict(cfg),
           {"converted_from": os.path.abspath(path), "official_config": run_config}, 0, tokenizer=tok_path)
    # the tokenizer the weights were trained with: the official text normalisation on (docs/METHOD.md §10.1)
    for_official_weights(tok_path).save(os.path.join(out_dir, "tokenizer.json"))
    return rep


def report_unused(rep):
    """The lines convert-xfm prints: the LoadReport, then every official tensor not used, one a line."""
    return "\n".join([str(replace(rep, skipped={}))] + [f"  unused {k}: {r}" for k, r in rep.skipped.items()])


def main(argv=None):
    """python -m lib.pretrained SUBCOMMAND ...: released weights -> an export folder that finetune.py --init DIR
    reads (docs/FINETUNING.md, Start from released weights)."""
    ap = argparse.ArgumentParser(prog="python -m lib.pretrained", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert-xfm", help="an official X-FM checkpoint file -> an export folder")
    c.add_argument("ckpt", help="the official file: {\"model\": state dict, \"config\": the run's config} or a bare "
                   "state dict (read with torch.load(weights_only=True): no code from it runs)")
    c.add_argument("--out", required=True, help="the export folder to write (config.json, model.safetensors, "
                   "tokenizer.json); a folder of its own")
    c.add_argument("--text_config", default="", help="the RoBERTa folder the run's config names as text_encoder "
                   "(roberta-base/): its config.json gives the pad id and the head count, its tokenizer.json the "
                   "tokenizer; without it: pad id 1 and the vision encoder's head count")
    c.add_argument("--tokenizer", default="", help="the tokenizer.json to export (default: --text_config's)")
    fl = sub.add_parser("convert-flava", help="a Hugging Face FlavaForPreTraining / FlavaModel folder -> an export")
    fl.add_argument("hf_dir", help="config.json, model.safetensors or pytorch_model.bin, tokenizer.json")
    fl.add_argument("--out", required=True, help="the export folder to write (finetune.py --init DIR)")
    fl.add_argument("--max_text_len", type=int, default=0, help="position rows kept (default: all of them)")
    fl.add_argument("--codebook", default="", help="a FlavaImageCodebook folder (facebook/flava-image-codebook): "
                    "the export's image tokenizer, the DALL-E codebook the MIM / MMM heads predict")
    args = ap.parse_args(argv)
    if args.command == "convert-xfm":
        rep = convert_xfm(args.ckpt, args.out, args.text_config, args.tokenizer)
        print(report_unused(rep) + f"\nwritten to {args.out} (python finetune.py --task retrieval --epochs 0 "
              f"--init {args.out})")
    else:
        print(convert_flava(args.hf_dir, args.out, args.max_text_len, args.codebook))
        print(f"wrote {args.out}: python finetune.py --task all --init {args.out}")


if __name__ == "__main__":  # python -m lib.pretrained: run the one copy that the other modules import
    from lib.pretrained import main
    main()
