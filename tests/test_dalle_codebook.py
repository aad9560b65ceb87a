"""The DALL-E image codebook (flava.DalleCodebook, lib/pretrained.load_dalle_codebook): a small random
transformers.FlavaImageCodebook (a test-only oracle; skipped without it) saved with save_pretrained and loaded
here gives the same logits (within 1e-5) and the same codes; its input is what Hugging Face's image processor
makes of the same picture; a tensor with no place or a missing one is refused; a FLAVA run trains with it
(train.py --image_tokenizer=DIR), convert-flava --codebook DIR puts it into an export, and train.py --init=EXPORT
keeps it."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

import data  # noqa: E402
import flava  # noqa: E402
import train  # noqa: E402
from lib import pretrained, toyworld  # noqa: E402
from test_hf_flava import CODES, hf_model, wordpiece_json  # noqa: E402,F401 (hf_model: a fixture used below)

TOL = 1e-5
# sizes no other test uses: width 8, 3 blocks per group (residual gain 1 / 12^2); CODES codes, the vocabulary
# of test_hf_flava's FLAVA, so the two convert together
WIDTH, BLOCKS = 8, 3


@pytest.fixture(scope="module")
def hf_codebook():
    """A random FlavaImageCodebook: every tensor drawn anew (weights with variance 2 / fan-in, so the signal
    neither dies nor explodes through the blocks; biases 0.1), so a swapped or dropped one shows. The output
    conv loses each code's response to the average feature vector, which would otherwise pick the same code
    everywhere: the codes then vary with the image, and a wrong code can show."""
    cfg = transformers.FlavaImageCodebookConfig(hidden_size=WIDTH, num_blocks_per_group=BLOCKS, vocab_size=CODES)
    model = transformers.FlavaImageCodebook(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            std = (2 / p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1
            p.copy_(std * torch.randn(p.shape, generator=g))
        h = F.relu(model.blocks[:-1](0.1 + 0.8 * torch.rand(16, 3, 32, 32, generator=g))).mean((0, 2, 3))
        w = model.blocks.output.conv.weight                              # (vocab, 8 * width, 1, 1)
        w.sub_(((w[:, :, 0, 0] @ h)[:, None] * h / h.pow(2).sum())[:, :, None, None])
    return model.eval()


@pytest.fixture(scope="module")
def codebook_dir(hf_codebook, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("flava_image_codebook"))
    hf_codebook.save_pretrained(d)
    return d


def load(path, patch_size=8):
    """A DalleCodebook with the folder's sizes (as a train.py run builds it), its weights loaded."""
    cfg = flava.make_flava_config("tiny", patch_size=patch_size, **pretrained.dalle_config(path))
    book = flava.image_tokenizer(cfg)
    assert isinstance(book, flava.DalleCodebook)
    pretrained.load_dalle_codebook(book, path)
    return book


def test_logits_and_codes_equal_transformers(hf_codebook, codebook_dir):
    book = load(codebook_dir)
    assert not list(book.parameters())                                   # frozen: buffers only
    g = torch.Generator().manual_seed(2)
    pixels = 0.1 + 0.8 * torch.rand(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        theirs = hf_codebook(pixels)                                     # (B, vocab, 4, 4)
    ours = book.logits(pixels)
    assert ours.shape == theirs.shape == (3, CODES, 4, 4)
    assert (ours - theirs).abs().max() < TOL
    # codes of CLIP-normalised images, at the model's size (32 px, 8 px patches) and resized (64 px, 16 px)
    for side, patch in ((32, 8), (64, 16)):
        images = torch.randn(3, 3, side, side, generator=g)
        book.patch_size = patch
        codes = book(images)
        assert codes.shape == (3, 16) and codes.dtype == torch.long
        with torch.no_grad():
            want = hf_codebook.get_codebook_indices(book.pixels(images)).flatten(1)   # row-major, as patches
        assert torch.equal(codes, want)
        assert len(codes.unique()) > 3                                   # varied codes: the check can fail


def test_input_is_what_the_hugging_face_processor_makes(codebook_dir):
    """A picture already 8 * grid pixels wide: this code's CLIP-normalised tensor, turned into codebook input,
    equals FlavaImageProcessor's codebook pixels (rescale 1/255, then 0.1 + 0.8 x)."""
    book = load(codebook_dir)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = book.pixels(data.to_tensor(Image.fromarray(rgb))[None])
    proc = transformers.FlavaImageProcessor(codebook_size={"height": 32, "width": 32},
                                            codebook_crop_size={"height": 32, "width": 32})
    theirs = proc(Image.fromarray(rgb), return_codebook_pixels=True, return_tensors="pt")["codebook_pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max() < TOL


def test_a_tensor_with_no_place_or_a_missing_one_is_refused(codebook_dir, tmp_path):
    state = pretrained.read_state_dict(codebook_dir)
    for name, change in (("extra", {**state, "blocks.group_1.group.block_1.id_path.weight": torch.zeros(8, 8, 1, 1)}),
                         ("lacking", {k: v for k, v in state.items() if k != "blocks.output.conv.bias"})):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(os.path.join(codebook_dir, "config.json"), d)
        pretrained.write_safetensors(change, str(d / "model.safetensors"))
        book = flava.DalleCodebook(CODES, 8, WIDTH, BLOCKS)
        want = "has no place in flava.DalleCodebook" if name == "extra" else "no blocks.output.conv.bias"
        with pytest.raises(SystemExit, match=want):
            pretrained.load_dalle_codebook(book, str(d))
    with pytest.raises(ValueError, match="patch_size >= 8"):                # one code per 8 x 8 pixels
        flava.DalleCodebook(CODES, 4, WIDTH, BLOCKS)


FAST = ["--recipe=flava", "--batch_size=8", "--log_every=1", "--warmup_steps=2", "--vocab_size=300",
        "--eval_k=4", "--caption_len=24", "--text_len=32", "--max_steps=2"]


def test_a_flava_run_trains_with_the_codebook_folder(codebook_dir, tmp_path):
    toy, run = str(tmp_path / "toy"), str(tmp_path / "run")
    toyworld.make_toy(toy, seed=0, n_pairs=32, n_regions=8, n_text=32, n_images=16, n_test=8, n_down=8,
                      progress=False)
    train.main([f"--data_dir={toy}", f"--out_dir={run}", *FAST, f"--image_tokenizer={codebook_dir}", "--stop_at=1"])
    train.main([f"--resume={run}", "--stop_at=0"])                      # the model rebuilt from its config
    cfg = json.load(open(os.path.join(run, "config.json")))["model"]
    assert (cfg["codebook_size"], cfg["codebook_width"], cfg["codebook_blocks"]) == (CODES, WIDTH, BLOCKS)
    state = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["model"]
    book = load(codebook_dir)
    for k, v in book.state_dict().items():                                # the folder's weights, kept frozen
        assert torch.equal(state[f"image_tokenizer.{k}"], v), k
    assert not os.path.exists(os.path.join(run, "image_tokenizer.pt"))    # no k-means codebook fitted
    with pytest.raises(SystemExit, match="--codebook_size"):
        train.main([f"--data_dir={toy}", f"--out_dir={tmp_path / 'b'}", *FAST, f"--image_tokenizer={codebook_dir}",
                    "--codebook_size=16"])


def test_convert_flava_with_the_codebook(hf_model, codebook_dir, tmp_path):
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "export")
    hf_model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write(wordpiece_json())
    pretrained.main(["convert-flava", hf_dir, "--out", out, "--codebook", codebook_dir])
    ckpt = pretrained.read_export(out)
    model = flava.build_model(flava.config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.image_tokenizer(images), load(codebook_dir)(images))
    # a codebook whose vocabulary is not the heads' is refused
    other = tmp_path / "other"
    shutil.copytree(codebook_dir, other)
    cfg = json.load(open(other / "config.json"))
    json.dump({**cfg, "vocab_size": CODES + 1}, open(other / "config.json", "w"))
    with pytest.raises(SystemExit, match="MIM / MMM heads predict"):
        pretrained.main(["convert-flava", hf_dir, "--out", str(tmp_path / "x"), "--codebook", str(other)])


def test_train_starts_from_a_flava_export_with_the_codebook(hf_model, codebook_dir, tmp_path):
    """train.py --init=EXPORT of convert-flava --codebook: the run keeps the export's DALL-E codebook (no k-means
    fitted over it) and starts from every tensor of the export (--lr=0)."""
    hf_dir, out, toy, run = (str(tmp_path / n) for n in ("hf", "export", "toy", "run"))
    hf_model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write(wordpiece_json())
    pretrained.convert_flava(hf_dir, out, max_text_len=16, codebook=codebook_dir)
    toyworld.make_toy(toy, n_pairs=16, n_regions=8, n_text=16, n_images=8, n_test=8, n_down=8, progress=False)
    train.main([f"--data_dir={toy}", f"--out_dir={run}", f"--init={out}", "--lr=0", "--max_steps=1", "--batch_size=8",
                "--caption_len=16", "--text_len=16", "--eval_k=4"])
    state, ckpt = pretrained.read_export(out)["model"], torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items())
    assert not os.path.exists(os.path.join(run, "image_tokenizer.pt"))
