"""Bad command-line values fail before any work with a one-line message that names the allowed values, and
--help explains every key of train.py and finetune.py."""
import os

import pytest
import torch

from lib import cli
import finetune
import train


BAD_TRAIN = [("--config=huge", "--config must be one of tiny, small, base, not 'huge'"),
             ("--recipe=clip", "--recipe must be one of xfm, flava"),
             ("--mim_target=foo", "--mim_target must be one of vl, pixel, off"),
             ("--attn_impl=flash", "--attn_impl must be one of auto, sdpa, explicit"),
             ("--schedule=twice", "--schedule must be one of three, summed"),
             ("--amp=fp8", "--amp must be one of auto, bf16, fp16, fp32"),
             ("--device=tpu", "--device must be one of auto, cpu, cuda, mps"),
             ("--keep_last=-1", "--keep_last is a number of checkpoints to keep (0: ckpt.pt alone), not -1"),
             ("--export=runs/default", "runs/default is a run folder or holds another config.json"),
             ("--compile --compile_mode=reduce-overhead --micro_batch_size=8 --data_dir=none",  # (none: fails fast)
              "--compile_mode=reduce-overhead (CUDA graphs) takes no gradient accumulation (batch_size 16 = micro 8 x "
              "accum 2 x world 1)")]
BAD_FINETUNE = [("--task=glue", "--task must be one of textcls, imgcls, vqa, nlvr, retrieval, grounding, all"),
                ("--probe=lin", "--probe must be one of full, linear"),
                ("--metric=auc", "--metric must be one of , accuracy, f1, mcc, pearson"),
                ("--preset=huge", "--preset must be one of tiny, small, base")]
if not torch.cuda.is_available():
    BAD_TRAIN += [("--device=cuda", "--device=cuda, but torch sees no CUDA device"),
                  ("--amp=fp16", "--amp=fp16 needs CUDA")]
if not torch.backends.mps.is_available():
    BAD_TRAIN += [("--device=mps", "--device=mps, but torch sees no MPS device")]


def _refused_before_any_work(main, args, message, folder, capsys):
    """main(args) exits with `message` as one line, and writes nothing: no toy world, no run folder."""
    with pytest.raises(SystemExit) as e:
        main(args)
    text = str(e.value.code)
    assert message in text and "\n" not in text and text.startswith("error: ")
    assert os.listdir(folder) == [], "work started before the bad value was refused"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("arg,message", BAD_TRAIN)
def test_train_refuses_bad_values_before_any_work(arg, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                            # data/toy and runs/ would appear here
    _refused_before_any_work(train.main, arg.split(), message, tmp_path, capsys)


@pytest.mark.parametrize("arg,message", BAD_FINETUNE)
def test_finetune_refuses_bad_values_before_any_work(arg, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _refused_before_any_work(finetune.main, [arg, "--init=runs/default"], message, tmp_path, capsys)


def test_batch_smaller_than_the_world_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = train.parse_args(["--batch_size=1"])
    with pytest.raises(SystemExit, match="smaller than the world size 2"):
        train.train(cfg, None, False, 0, 2, torch.device("cpu"), held=[])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module,cls", [(train, train.TrainConfig), (finetune, finetune.FinetuneConfig)])
def test_help_explains_every_key(module, cls, capsys):
    """Each key's line carries the comment written beside it in the config dataclass; group headings
    ("# optimisation ...") are not taken as the help of the key above them."""
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    lines = {line.split()[0].split("=")[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  --")}
    helps = cli.key_help(cls)
    for name in cls.__dataclass_fields__:
        assert len(helps[name]) > 10, f"--{name} has no help text"
        assert helps[name] in lines[f"--{name}"]
    assert "optimisation" not in helps.get("text_len", "") and "task options" not in helps.get("grad_clip", "")
