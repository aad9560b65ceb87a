"""finetune.py: every task fine-tunes and evaluates on a tiny toy world, checkpoints load with exactly the
expected missing keys, metrics match hand-computed values, the rel-pos tables interpolate, fine-tuning has no
stop-gradient, the attention pictures use the model's own weights, and the config parser."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from PIL import Image

from lib import runlog
from lib import formats
import finetune
import losses
import train
from conftest import tiny_config
from model import XFM, build_mlp
from lib.pretrained import resize_rel_pos
from lib import toyworld
from lib import retrieval
from lib import pictures

EPOCH1 = ["--epochs=1", "--batch_size=8", "--eval_batch_size=16", "--k_test=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    toyworld.make_toy(d, n_pairs=64, n_regions=32, n_text=64, n_images=32, n_test=16, n_down=16, progress=False)
    return d


@pytest.fixture(scope="module")
def ckpt(toy, tmp_path_factory):
    """A tiny pre-trained checkpoint (2 steps of train.py) in its run folder with the tokenizer."""
    run = str(tmp_path_factory.mktemp("pre"))
    train.main([f"--data_dir={toy}", f"--out_dir={run}", "--max_steps=2", "--batch_size=8", "--vocab_size=300",
                "--caption_len=24", "--text_len=32", "--eval_k=4"])
    return os.path.join(run, "ckpt.pt")


@pytest.fixture(scope="module")
def suite(toy, ckpt, tmp_path_factory):
    """`--task all` for one epoch of every task: the whole benchmark, end to end."""
    out = str(tmp_path_factory.mktemp("ft"))
    rows = finetune.main(["--task", "all", "--init", ckpt, "--data_dir", toy, "--out_dir", out, *EPOCH1])
    return out, rows


def make_env(ckpt, **kw):
    cfg, _ = finetune.parse_args([f"--init={ckpt}"])
    env = finetune.load_init(cfg, False, 0, 1, torch.device("cpu"))
    cfg = replace(cfg, **{"image_size": env.mcfg.image_size, "text_len": env.mcfg.max_text_len, **kw})
    return cfg, env


# ---------------------------------------------------------------------------------------------------------
# The tasks, end to end


def test_every_task_trains_evaluates_and_the_table_is_written(suite):
    out, rows = suite
    assert [n for n, _, _ in rows] == [n for n, _ in finetune.SUITE]
    for name, res, command in rows:
        saved = json.load(open(os.path.join(out, name, "metrics.json")))
        assert saved["value"] == pytest.approx(res["value"]) and 0 <= res["value"] <= 100, name
        assert saved["epochs"] == (0 if name == "retrieval_zeroshot" else 1), name
        assert os.path.exists(os.path.join(out, name, "ckpt.pt")) == (name != "retrieval_zeroshot"), name
        assert os.path.exists(os.path.join(out, name, "tokenizer.json"))
        assert command.startswith(f"python finetune.py --task {name.split('_')[0]} --init ")
    zs = json.load(open(os.path.join(out, "retrieval_zeroshot", "metrics.json")))["metrics"]
    assert {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"} <= set(zs)
    assert zs["t2i_r1"] <= zs["t2i_r5"] <= zs["t2i_r10"]
    table = open(os.path.join(out, "benchmark.md")).read()
    assert table.count("\n| ") == len(finetune.SUITE) + 1 and "--probe linear" in table and "--epochs 0" in table
    for png in ("retrieval/retrieval_examples.png", "retrieval_zeroshot/retrieval_examples.png", "attention/attention.png"):
        with Image.open(os.path.join(out, png)) as im:
            assert im.size[0] > 100 and im.size[1] > 50, png


@pytest.mark.parametrize("task", ["vqa", "textcls"])
def test_eval_only_reproduces_the_fine_tuned_result(suite, task):
    out, rows = suite
    res = finetune.main(["--task", task, "--eval_only", "--init", os.path.join(out, task, "ckpt.pt"), "--data_dir",
                         json.load(open(os.path.join(out, task, "metrics.json")))["config"]["data_dir"]])
    assert res["value"] == pytest.approx(dict((n, r) for n, r, _ in rows)[task]["value"])
    assert res["epochs"] == 0 and os.path.exists(os.path.join(out, task, "eval.json"))


def test_linear_probe_freezes_the_encoder_and_full_fine_tuning_only_its_tower(suite, ckpt):
    pre = runlog.load_checkpoint(ckpt, "cpu")["model"]
    out, _ = suite
    probe = runlog.load_checkpoint(os.path.join(out, "imgcls_linear", "ckpt.pt"), "cpu")["model"]
    assert all(torch.equal(probe["xfm." + k], v) for k, v in pre.items())     # every encoder weight untouched
    assert set(k for k in probe if k.startswith("head.")) == {"head.weight", "head.bias"}  # one nn.Linear
    full = runlog.load_checkpoint(os.path.join(out, "imgcls", "ckpt.pt"), "cpu")["model"]
    assert not torch.equal(full["xfm.vision.blocks.0.attn.qkv.weight"], pre["vision.blocks.0.attn.qkv.weight"])
    assert torch.equal(full["xfm.text.blocks.0.attn.qkv.weight"], pre["text.blocks.0.attn.qkv.weight"])


def test_init_from_an_export_equals_init_from_the_checkpoint(toy, ckpt, tmp_path):
    """tools/export.py writes a checkpoint's weights as an export folder; finetune.py --init DIR builds from it the
    model --init ckpt.pt builds (every tensor bit for bit, the same tokenizer), and a tiny fine-tuning run from
    either gives the same losses and result."""
    from tools import export
    exported = export.main([ckpt, str(tmp_path / "export")])
    (cfg_a, env_a), (cfg_b, env_b) = make_env(ckpt), make_env(exported)
    assert not env_b.finetuned and env_b.tok.to_json() == env_a.tok.to_json() and env_b.mcfg == env_a.mcfg
    a = finetune.build_model(cfg_a, env_a, None, None).state_dict()
    b = finetune.build_model(cfg_b, env_b, None, None).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = [finetune.main(["--task", "textcls", "--init", init, "--data_dir", toy, "--out_dir", str(tmp_path / name),
                          *EPOCH1]) for name, init in (("from_ckpt", ckpt), ("from_export", exported))]
    assert res[0]["train_loss"] == pytest.approx(res[1]["train_loss"], rel=1e-5) and res[0]["value"] == res[1]["value"]


def test_textcls_reads_a_glue_tsv_of_pairs_and_regresses(toy, ckpt, tmp_path):
    """STS-B style: a TSV with a header, sentence pairs and float scores -> one output, MSE, Pearson."""
    texts = [json.loads(l)["text"] for l in open(os.path.join(toy, "downstream", "textcls_train.jsonl"))]
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.tsv", "w") as f:
            f.write("index\tsentence1\tsentence2\tscore\n")
            f.writelines(f"{i}\t{t}\t{texts[-i]}\t{(i * 7) % 11 / 2.0 + 0.25}\n" for i, t in enumerate(texts[:12]))
    res = finetune.main(["--task", "textcls", "--init", ckpt, "--train_file", str(tmp_path / "train.tsv"),
                         "--test_file", str(tmp_path / "test.tsv"), "--out_dir", str(tmp_path / "out"), *EPOCH1])
    assert res["metric"] == "pearson" and -100 <= res["value"] <= 100
    ck = runlog.load_checkpoint(str(tmp_path / "out" / "textcls" / "ckpt.pt"), "cpu")
    assert ck["model"]["head.3.weight"].shape[0] == 1 and ck["meta"]["labels"] == []


def test_karpathy_json_and_image_root(toy, tmp_path):
    """Karpathy's dataset_coco.json: images[{filepath, filename, split, sentences: [{raw}]}], paths under a root."""
    items = [{"filepath": "img", "filename": f"test_{i:05d}.png", "split": "test" if i < 3 else "restval",
              "sentences": [{"raw": f"caption {i}"}, {"raw": f"another {i}"}]} for i in range(5)]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": items, "dataset": "coco"}))
    cfg, _ = finetune.parse_args([f"--image_root={toy}"])
    bad = formats.BadInput(verbose=False)
    test, tr = formats.read_task_file(str(path), "test", cfg, bad), formats.read_task_file(str(path), "train", cfg, bad)
    assert len(test) == 3 and len(tr) == 2 and test[1]["caption"] == ["caption 1", "another 1"]
    assert test[0]["image"] == os.path.abspath(os.path.join(toy, "img", "test_00000.png")) and bad.counts() == {}


def test_toy_grounding_split(toy):
    """data.py's grounding split: a phrase naming one shape of a VQA-split image, and its pixel box."""
    recs = [json.loads(l) for l in open(os.path.join(toy, "downstream", "grounding_train.jsonl"))]
    assert len(recs) == 16
    for r in recs:
        x, y, w, h = r["box"]
        assert r["phrase"].startswith("the ") and 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0
        assert os.path.isfile(os.path.join(toy, "downstream", r["image"]))


# ---------------------------------------------------------------------------------------------------------
# Loading, interpolation, gradient flow, attention maps


def test_checkpoint_loads_with_exactly_the_expected_missing_keys(ckpt, capsys):
    cfg, env = make_env(ckpt)
    finetune.build_model(cfg, env, build_mlp(env.mcfg.width, 3), None)
    assert "missing keys ['head.0.bias', 'head.0.weight', 'head.1.bias', 'head.1.weight', 'head.3.bias', " \
           "'head.3.weight'], unexpected none" in capsys.readouterr().out
    finetune.build_model(cfg, env, None, None)              # reused heads: nothing missing
    assert "missing keys none, unexpected none" in capsys.readouterr().out
    env.ckpt["model"] = {**env.ckpt["model"], "surplus.weight": torch.zeros(1)}
    with pytest.raises(AssertionError, match="surplus"):
        finetune.build_model(cfg, env, None, None)
    env.ckpt["model"] = {k: v for k, v in env.ckpt["model"].items() if k not in ("surplus.weight", "temp")}
    with pytest.raises(AssertionError, match="temp"):
        finetune.build_model(cfg, env, None, None)


class _Batches:
    """A stand-in training set for freeze_unused: `collate` of any examples is one fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i

    def collate(self, samples):
        return self.batch


@pytest.mark.parametrize("recipe", ["xfm", "flava"])
def test_freeze_unused_keeps_exactly_what_each_loss_reaches(recipe):
    """textcls reaches the language encoder and the head; the linear probe only its head (the encoder runs
    under no_grad); a fused task reaches all three encoders, except FLAVA's final LayerNorms (the fusion reads the
    states before them), which must be frozen or DDP fails waiting for their gradients."""
    import flava
    torch.manual_seed(0)
    cfg = flava.make_flava_config("tiny", vocab_size=64) if recipe == "flava" else tiny_config()
    ids = torch.randint(5, 64, (4, 8))
    batch = {"ids": ids, "att": torch.ones_like(ids), "image": torch.randn(4, 3, cfg.image_size, cfg.image_size),
             "y": torch.tensor([0, 1, 2, 0])}
    ce = lambda z, b: (nn.functional.cross_entropy(z, b["y"]), {})  # noqa: E731

    def trained(loss_fn, frozen=False):
        model = finetune.TaskModel(flava.build_model(cfg), build_mlp(cfg.width, 3), loss_fn, frozen)
        names = {n for n, _ in model.named_parameters()}
        frozen_now = set(finetune.freeze_unused(model, _Batches(batch), 4, torch.device("cpu")))
        assert {n for n, p in model.named_parameters() if p.requires_grad} == names - frozen_now
        return names - frozen_now

    def probe(m, b):
        with torch.no_grad():
            v = m.xfm.encode_image(b["image"])[:, 0]
        return ce(m.head(v), b)

    text = trained(lambda m, b: ce(m.head(m.xfm.encode_text(b["ids"], b["att"])[:, 0]), b))
    assert text == {n for n in text if n.startswith(("head.", "xfm.text."))} and "xfm.text.blocks.0.mlp.fc1.weight" in text
    assert trained(probe, frozen=True) == {n for n, _ in build_mlp(cfg.width, 3).named_parameters("head")}
    fused = trained(lambda m, b: ce(m.head(finetune.fused_cls(m, b)), b))
    assert {n.split(".")[1] for n in fused if n.startswith("xfm.")} == {"text", "vision", "fusion"}
    final_norms = {f"xfm.{e}.norm.{w}" for e in ("text", "vision") for w in ("weight", "bias")}
    assert (final_norms & fused == set()) == (recipe == "flava") and "xfm.vision.mask_token" not in fused


def test_rel_pos_interpolation():
    table = torch.randn(7 * 7 + 3, 4)                                       # grid 4: (2*4-1)^2 + 3 rows
    assert torch.equal(resize_rel_pos(table, 4, 4), table)                  # unchanged grid: identity
    big = resize_rel_pos(table, 4, 6)
    assert big.shape == (11 * 11 + 3, 4) and torch.equal(big[-3:], table[-3:])  # the 3 CLS entries kept
    assert torch.allclose(big[:-3].view(11, 11, 4)[5, 5], table[:-3].view(7, 7, 4)[3, 3])  # zero offset stays
    assert torch.allclose(big[:-3].view(11, 11, 4)[0, 0], table[:-3].view(7, 7, 4)[0, 0])  # so do the corners
    assert torch.allclose(resize_rel_pos(torch.full((52, 4), 0.3), 4, 8), torch.full((228, 4), 0.3))


def test_model_at_a_new_image_size_from_a_checkpoint_of_another(ckpt):
    cfg, env = make_env(ckpt, image_size=48)                               # pre-trained at 32 px (grid 4)
    xfm = finetune.build_model(cfg, env, None, None).xfm.eval()
    assert xfm.vision.blocks[0].rel_pos.table.shape == ((2 * 6 - 1) ** 2 + 3, xfm.cfg.heads)
    assert xfm.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 36, xfm.cfg.width)


def test_fine_tuning_has_no_stop_gradient_vqa_loss_reaches_the_language_encoder(toy, ckpt, tmp_path, monkeypatch):
    cfg, env = make_env(ckpt, task="vqa", data_dir=toy)
    got = {}
    monkeypatch.setattr(finetune, "fit", lambda cfg, env, model, train_set, *a: got.update(model=model, ds=train_set))
    finetune.run_vqa(cfg, env, str(tmp_path))
    model, ds = got["model"].train(), got["ds"]
    loss, _ = model(ds.collate([ds[i] for i in range(4)]))
    loss.backward()
    for part in ("text", "vision", "fusion", "head"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(("xfm." + part, part))]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_attention_maps_are_the_weights_the_model_uses():
    torch.manual_seed(0)
    xfm = XFM(tiny_config()).eval()
    ids, att = torch.randint(5, 64, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    seen = []
    attn = xfm.fusion.blocks[1].cross_attn
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.append((a[0], kw["kv"], out)), with_kwargs=True)
    maps = pictures.cross_attention_maps(xfm, ids, att, torch.randn(2, 3, 32, 32))
    hook.remove()
    assert len(maps) == 2 and maps[1].shape == (2, 4, 6, 17)              # (B, nh, T, 1+P) per fusion layer
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 4, 6))
    x, kv, out = seen[0]
    v = attn.split_heads(attn.kv(kv).chunk(2, dim=-1)[1])                  # (B, nh, S, hs)
    y = (maps[1] @ v).transpose(1, 2).reshape(x.shape)                    # weights x values, heads merged
    assert torch.allclose(attn.proj(y), out, atol=1e-5)                    # = what the module returned


# ---------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_classification_and_regression_metrics_by_hand():
    pred, y = torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])
    assert retrieval.accuracy(pred, y) == 50.0
    assert retrieval.f1_score(pred, y) == pytest.approx(100 * 4 / 6)        # tp 2, fp 1, fn 1: 2tp / (2tp+fp+fn)
    # binary MCC: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (0 - 1) / sqrt(3 * 3 * 1 * 1)
    assert retrieval.matthews(pred, y, 2) == pytest.approx(-100 / 3)
    assert retrieval.matthews(y, y, 2) == pytest.approx(100.0)
    # 3 classes: c = 3, s = 6, t = (2, 2, 2), p = (3, 1, 2): (18 - 12) / sqrt((36 - 14)(36 - 12))
    three = retrieval.matthews(torch.tensor([0, 2, 1, 0, 0, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert three == pytest.approx(100 * 6 / math.sqrt(22 * 24))
    # x - mean = (-1, 0, 1), y - mean = (-7, -1, 8) / 3: r = 5 / (sqrt(2) sqrt(114) / 3)
    r = retrieval.pearson(torch.tensor([1., 2, 3]), torch.tensor([2., 4, 7]))
    assert r == pytest.approx(100 * 15 / math.sqrt(228))


def test_vqa_score_and_iou_by_hand():
    assert retrieval.vqa_score("two", ["two", "two", "three"]) == pytest.approx(2 / 3)
    assert retrieval.vqa_score("two", ["two"] * 4 + ["three"] * 6) == 1.0
    assert retrieval.vqa_score("four", ["two", "three"]) == 0.0
    assert retrieval.vqa_score("yes", ["yes"]) == 1.0 and retrieval.vqa_score("no", ["yes"]) == 0.0
    a = torch.tensor([[0., 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    b = torch.tensor([[1., 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]])
    assert torch.allclose(losses.box_iou(a, b)[0], torch.tensor([1 / 7, 1.0, 0.0]))  # 1 / (4 + 4 - 1)


class _Stub(nn.Module):
    """Scores chosen by hand: image i is the one-hot vector e_i, text j a row of 6 numbers whose first 3 are its
    ITC scores with the 3 images and whose last 3 are its ITM "match" logits with them."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def encode_image(self, x):
        return x.flatten(1)[:, None]                                       # (B, 1, 3)

    def encode_text(self, ids, att):
        return self.texts[ids[:, 0]][:, None]                              # (B, 1, 6)

    def itc_features(self, t, v):
        return t[:, 0, :3], v[:, 0]

    def fuse(self, t, att, v):
        return t[..., 3:] * v                                              # the ITM logit of (text, image), spread

    def itm_head(self, h):
        return torch.stack([-h.sum(-1), h.sum(-1)], dim=-1)


def test_recall_at_k_by_hand():
    """retrieval.evaluate_retrieval (reused for retrieval) on scores where every rank is known: ITC ranks, ITM alone
    re-scores the top k (k = 2 here), every other pair scores -100, and ties count against the right candidate."""
    itc = [[0.9, 0.2, 0.1], [0.1, 0.8, 0.25], [0.5, 0.4, 0.3], [0.0, 0.5, 0.5], [0.3, 0.6, 0.0]]
    itm = [[-1.5, -1.0, -3.0], [-3.0, -1.0, -2.0], [-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0], [-1.0, -1.5, -3.0]]
    texts = torch.cat([torch.tensor(itc), torch.tensor(itm)], dim=1)      # (5 texts, 3 ITC + 3 ITM)
    rs = {"image": torch.eye(3).view(3, 3, 1, 1), "ids": torch.arange(5)[:, None],
          "att": torch.ones(5, 1, dtype=torch.long), "txt2img": torch.tensor([0, 1, 2, 1, 0]),
          "img2txt": [[0, 4], [1, 3], [2]]}
    r = retrieval.evaluate_retrieval(_Stub(texts), rs, torch.device("cpu"), 2, 2, train.nullcontext)
    # text -> image, ITC alone: texts 0 and 1 rank their image first; text 2's (0.3) is third; text 3's ties with
    # image 2 (0.5 = 0.5: a miss); text 4's (0.3) is behind image 1 (0.6).  R@1 = 2/5
    assert (r["t2i_itc_r1"], r["t2i_itc_r5"], r["t2i_itc_r10"]) == pytest.approx((40.0, 100.0, 100.0))
    # re-ranked: text 0's top 2 are images 0, 1 and ITM prefers image 1 (-1.0 > -1.5): a miss; text 2's image is
    # outside its top 2, so it scores -100 and ranks third; texts 1, 3 and 4 rank their image first by ITM.
    # (ITM + ITC summed would rescue text 0; ITC kept outside the top k would rank image 0 first for text 1.)
    assert (r["t2i_r1"], r["t2i_r5"], r["t2i_r10"]) == pytest.approx((60.0, 100.0, 100.0))
    # image -> text: image 0 ranks text 0 first by ITC but ITM prefers text 2 in its top 2 (t0, t2); image 1 ranks
    # text 1 first both ways; image 2's text 2 (0.3) is behind text 3 by ITC, first by ITM.
    assert (r["i2t_itc_r1"], r["i2t_itc_r5"]) == pytest.approx((200 / 3, 100.0))
    assert (r["i2t_r1"], r["i2t_r5"]) == pytest.approx((200 / 3, 100.0))


# ---------------------------------------------------------------------------------------------------------
# Config


def test_parse_args_takes_both_styles_and_rejects_unknown_keys(capsys):
    cfg, given = finetune.parse_args(["--task", "vqa", "--init=r/ckpt.pt", "--eval_only", "--epochs", "3", "--lr=1e-4"])
    assert (cfg.task, cfg.init, cfg.eval_only, cfg.epochs, cfg.lr) == ("vqa", "r/ckpt.pt", True, 3, 1e-4)
    assert set(given) == {"task", "init", "eval_only", "epochs", "lr"}
    assert finetune.parse_args(["--eval_only", "false", "--probe", "linear"])[0].eval_only is False
    with pytest.raises(SystemExit, match="did you mean --epochs"):
        finetune.parse_args(["--epoch=3"])
    with pytest.raises(SystemExit, match="needs a value"):
        finetune.parse_args(["--epochs"])
    with pytest.raises(SystemExit, match="takes a int"):
        finetune.parse_args(["--epochs", "many"])
    with pytest.raises(SystemExit, match="--key=value or --key value"):
        finetune.parse_args(["vqa"])
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--help"])
    assert e.value.code == 0 and "--probe=full" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--task must be one of"):
        finetune.main(["--task", "glue", "--init", "x"])


def test_strict_stops_at_a_bad_record_with_one_line(ckpt, tmp_path):
    task = tmp_path / "textcls.jsonl"
    task.write_text('{"text": "a red circle", "label": 0}\n{"text": "unclosed\n')
    with pytest.raises(SystemExit, match=r"^error: \S*textcls\.jsonl:2: malformed JSON \(.*\) \(--strict: every "
                                         r"bad record stops the run\)$"):
        finetune.main(["--task", "textcls", "--init", ckpt, "--train_file", str(task), "--test_file", str(task),
                       "--strict", "--out_dir", str(tmp_path / "ft")])


def test_text_norm_turns_on_for_a_task_and_its_folder_keeps_it(toy, ckpt, tmp_path):
    """--text_norm normalises a pre-trained run's captions in fine-tuning (docs/METHOD.md §10.1), and the task
    folder's tokenizer.json records it, so the folder is an --init that normalises too."""
    from lib import tokenizer
    out = str(tmp_path / "ft")
    finetune.main(["--task", "retrieval", "--init", ckpt, "--data_dir", toy, "--out_dir", out, "--epochs", "0",
                   "--k_test", "4", "--text_norm"])
    assert tokenizer.Tokenizer.load(os.path.join(out, "retrieval_zeroshot", "tokenizer.json")).text_norm
    assert not tokenizer.Tokenizer.load(os.path.join(os.path.dirname(ckpt), "tokenizer.json")).text_norm
