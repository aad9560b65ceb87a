"""pretrained.write_safetensors, the writer of export folders (train.py --export, tools/export.py): the file's layout
checked byte by byte against the safetensors format (header length, dtype names, shapes, offsets, little-endian
data), a round trip of every dtype through pretrained.read_safetensors, and the safetensors package as a second
reader where it is installed. The export folders themselves are tested in test_train.py (train.py --export, with
--keep_last), test_fsdp.py (under --fsdp) and test_finetune.py (tools/export.py, finetune.py --init DIR); here,
train.py --init=DIR: a fresh pre-training run from an export's whole model (lib/pretrained.py, init_run);
test_official_xfm.py, test_hf_flava.py and test_dalle_codebook.py start one from convert-xfm's and
convert-flava's exports."""
import json
import os

import pytest
import torch

import train
from lib import pretrained, toyworld

EVERY_DTYPE = {"f32": torch.randn(3, 4), "f64": torch.randn(2, dtype=torch.float64), "f16": torch.randn(5).half(),
               "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(7), "i32": torch.arange(-3, 3, dtype=torch.int32),
               "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.arange(250, 256, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(0.07), "empty": torch.zeros(0, 3),
               "transposed": torch.randn(4, 3).t()}                     # not contiguous


def same_bytes(a, b):
    """Equal dtype, shape and bytes (torch.equal would call NaN unequal and -0.0 equal to 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_writer_layout_byte_by_byte(tmp_path):
    """[8-byte little-endian header size][JSON header padded to 8 bytes][tensors back to back], the header naming
    each tensor's dtype and shape and its [begin, end) in the data, the data little-endian: 1.0 in bf16 is
    0x3F80, stored 80 3F."""
    tensors = {"w_bf16": torch.tensor([1.0, -2.0], dtype=torch.bfloat16), "w_f32": torch.tensor([[1.0]]),
               "w_f16": torch.tensor([1.0], dtype=torch.float16), "w_i64": torch.tensor([1, 258]),
               "w_bool": torch.tensor([True, False])}
    path = str(tmp_path / "w.safetensors")
    pretrained.write_safetensors(tensors, path, {"format": "pt"})
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    assert {k: (h["dtype"], h["shape"]) for k, h in header.items()} == {
        "w_bf16": ("BF16", [2]), "w_f32": ("F32", [1, 1]), "w_f16": ("F16", [1]), "w_i64": ("I64", [2]),
        "w_bool": ("BOOL", [2])}
    spans = sorted(h["data_offsets"] for h in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data)                # no gap, no overlap, nothing after
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    expected = {"w_bf16": "803f00c0", "w_f32": "0000803f", "w_f16": "003c", "w_i64": "0100000000000000" "0201000000000000",
                "w_bool": "0100"}
    for k, hexbytes in expected.items():
        begin, end = header[k]["data_offsets"]
        assert data[begin:end].hex() == hexbytes, k
        assert begin % tensors[k].element_size() == 0, k                # each tensor aligned to its element size


def test_every_dtype_round_trips_through_the_reader(tmp_path):
    path = str(tmp_path / "x.safetensors")
    pretrained.write_safetensors(EVERY_DTYPE, path)
    got = pretrained.read_safetensors(path)
    assert set(got) == set(EVERY_DTYPE)
    for k, t in EVERY_DTYPE.items():
        assert same_bytes(got[k], t), k


def test_the_safetensors_package_reads_our_file(tmp_path):
    """An independent reader, used only where it is installed (it is no requirement of the project)."""
    load_file = pytest.importorskip("safetensors.torch").load_file
    path = str(tmp_path / "x.safetensors")
    pretrained.write_safetensors(EVERY_DTYPE, path, {"format": "pt"})
    got = load_file(path)
    assert set(got) == set(EVERY_DTYPE)
    for k, t in EVERY_DTYPE.items():
        assert same_bytes(got[k], t), k


# train.py --init=DIR

FAST = ["--batch_size=8", "--log_every=1", "--warmup_steps=2", "--eval_k=4", "--caption_len=24", "--text_len=32"]


@pytest.fixture(scope="module")
def inited(tmp_path_factory):
    """A 2-step X-FM run exported, then a run from that export with --lr=0 (its one update changes nothing)
    -> (toy folder, export folder, the new run's folder)."""
    d = tmp_path_factory.mktemp("init")
    toy, exported, run = str(d / "toy"), str(d / "export"), str(d / "run")
    toyworld.make_toy(toy, seed=0, n_pairs=32, n_regions=16, n_text=32, n_images=16, n_test=8, n_down=8,
                      progress=False)
    train.main([f"--data_dir={toy}", f"--out_dir={d / 'first'}", *FAST, "--vocab_size=300", "--max_steps=2",
                f"--export={exported}"])
    train.main([f"--data_dir={toy}", f"--out_dir={run}", *FAST, f"--init={exported}", "--lr=0", "--max_steps=1"])
    return toy, exported, run


def test_init_starts_a_fresh_run_from_the_exports_weights_and_tokenizer(inited):
    """Step 0, the export's model (every tensor, equal before the first update: --lr=0) and its tokenizer.json."""
    _, exported, run = inited
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    state = pretrained.read_export(exported)["model"]
    assert ckpt["step"] == 1 and set(ckpt["model"]) == set(state)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items())
    assert open(os.path.join(run, "tokenizer.json")).read() == open(os.path.join(exported, "tokenizer.json")).read()
    assert ckpt["train_config"]["init"] == exported and ckpt["model_config"] == json.load(
        open(os.path.join(exported, "config.json")))["model_config"]


def test_init_refuses_what_contradicts_the_export_and_is_not_resumable(inited, tmp_path):
    """A --recipe other than the export's, or a caption longer than its position table: refused in one line
    before anything is written. A resume continues the run and keeps its --init."""
    toy, exported, run = inited
    args = [f"--data_dir={toy}", f"--out_dir={tmp_path / 'new'}", f"--init={exported}", *FAST, "--max_steps=1"]
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--recipe=flava"])
    assert str(e.value).startswith(f"error: --recipe=flava contradicts --init={exported} (its model: recipe xfm,")
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--caption_len 99 is beyond the position table of 32"):
        train.main([*args, "--caption_len=99"])
    assert not os.path.exists(tmp_path / "new")
    with pytest.raises(SystemExit, match=f"--init={tmp_path} \\(the run has init={exported}\\)"):
        train.main([f"--resume={run}", f"--init={tmp_path}"])
