"""tools/class_results.py: pooling students' run folders, on fake run folders written here (no training)."""
import json
import math
import os

import pytest

from tools import class_results as cr


def fake_run(root, name, losses, r1, textcls=None, temp=(0.07, 0.12, 0.08), ft_dir="finetune/textcls"):
    """A run folder: three log records (loss/itc falls to `losses`), a final record, optionally a textcls report."""
    run = os.path.join(root, name)
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for i, t in enumerate(temp):
            f.write(json.dumps({"step": 25 * (i + 1), "loss/itc": 2.77 - i * (2.77 - losses) / 2, "temp": t,
                                "stop_grad": True}) + "\n")
        f.write(json.dumps({"final": True, "step": 75, "wall_s": 60.0,
                            "retrieval": {"t2i_r1": r1, "t2i_itc_r1": r1 - 5, "n_images": 200}}) + "\n")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"train": {"seed": 0}}, f)
    if textcls is not None:
        os.makedirs(os.path.join(run, ft_dir))
        with open(os.path.join(run, ft_dir, "metrics.json"), "w") as f:
            json.dump({"task": "textcls", "metric": "accuracy", "value": textcls, "metrics": {"accuracy": textcls},
                       "wall_s": 30.0, "config": {"lr": 1e-4}}, f)
    return run


@pytest.fixture
def klass(tmp_path):
    """alice and bob ran exercises 1 and 2; carol only exercise 1 (no fine-tuning); one seed folder pair."""
    root = str(tmp_path)
    fake_run(os.path.join(root, "alice"), "ex01_default", 1.0, 20.0, textcls=60.0)
    fake_run(os.path.join(root, "bob"), "ex01_default", 1.2, 22.0, textcls=62.0)
    fake_run(os.path.join(root, "carol"), "ex01_default", 1.4, 27.0)
    fake_run(os.path.join(root, "alice"), "ex02_no_stop_grad", 0.8, 30.0, textcls=50.0)
    fake_run(os.path.join(root, "bob"), "ex02_no_stop_grad", 0.9, 34.0, textcls=54.0)
    return root


def test_stats_sample_std():
    s = cr.stats([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))   # n - 1 in the denominator, not n (1.118)
    assert cr.stats([7.0])["std"] is None


def test_reads_last_record_final_record_and_finetune_report(klass):
    q = cr.read_run(os.path.join(klass, "alice", "ex01_default"), series=("first", "last", "max"))
    assert q["loss/itc"] == pytest.approx(1.0) and q["loss/itc@first"] == pytest.approx(2.77)
    assert q["temp"] == 0.08 and q["temp@max"] == 0.12 and "temp@min" not in q
    at = cr.read_run(os.path.join(klass, "alice", "ex01_default"), series=("step50", "step999"))
    assert at["loss/itc@step50"] == pytest.approx(1.885) and at["temp@step50"] == 0.12 and "temp" not in at
    assert not any(k.endswith("@step999") for k in at)  # a step the run never logged gives nothing
    assert q["retrieval/t2i_r1"] == 20.0 and q["retrieval/t2i_itc_r1"] == 15.0 and q["wall_s"] == 60.0
    assert q["ft/textcls/accuracy"] == 60.0 and "ft/textcls/config/lr" not in q
    assert "stop_grad" not in q and "final" not in q    # booleans are not quantities
    # a fine-tuned retrieval report (finetune/retrieval/) never overwrites the zero-shot figures of the final record
    ft = os.path.join(klass, "alice", "ex01_default", "finetune", "retrieval")
    os.makedirs(ft)
    with open(os.path.join(ft, "metrics.json"), "w") as f:
        json.dump({"metric": "R@1/5/10", "value": 90.0, "metrics": {"t2i_r1": 99.0, "i2t_r1": 81.0}}, f)
    q = cr.read_run(os.path.join(klass, "alice", "ex01_default"))
    assert q["retrieval/t2i_r1"] == 20.0 and q["ft/retrieval/t2i_r1"] == 99.0 and q["ft/retrieval/value"] == 90.0
    assert not any("metrics" in k for k in q)                # the report's "metrics" are flattened into ft/TASK/


def test_finds_runs_below_class_folders_and_globs(klass):
    runs = cr.find_runs([klass])
    assert len(runs) == 5 and all(os.path.basename(r).startswith("ex0") for r in runs)
    assert len(cr.find_runs([os.path.join(klass, "*", "ex01_default")])) == 3
    # finetune.py --out_dir DIR: DIR holds only TASK/metrics.json and counts as a run
    fake_dir = os.path.join(klass, "dave", "ex09_k64", "retrieval_zeroshot")
    os.makedirs(fake_dir)
    with open(os.path.join(fake_dir, "metrics.json"), "w") as f:
        json.dump({"t2i_r1": 20.3}, f)
    assert os.path.join(klass, "dave", "ex09_k64") in cr.find_runs([klass])
    assert cr.read_run(os.path.join(klass, "dave", "ex09_k64")) == {"ft/retrieval_zeroshot/t2i_r1": 20.3}


def test_grouping_by_glob_and_by_regex(klass, tmp_path):
    runs = cr.find_runs([klass])
    table, members = cr.pool(runs, globs=["ex01_*", "ex02_*"])
    assert sorted(table) == ["ex01_*", "ex02_*"] and len(members["ex01_*"]) == 3
    r1 = table["ex01_*"]["retrieval/t2i_r1"]
    assert r1["n"] == 3 and r1["mean"] == pytest.approx(23.0) and r1["std"] == pytest.approx(math.sqrt(13.0))
    assert (r1["min"], r1["max"]) == (20.0, 27.0)
    assert table["ex01_*"]["ft/textcls/accuracy"]["n"] == 2                # carol did not fine-tune
    assert table["ex02_*"]["ft/textcls/accuracy"]["mean"] == pytest.approx(52.0)
    only1, _ = cr.pool(runs, globs=["ex02_*"])
    assert list(only1) == ["ex02_*"] and only1["ex02_*"]["loss/itc"]["n"] == 2
    seeds = str(tmp_path / "seeds")
    for s, r in enumerate((10.0, 12.0, 14.0)):
        fake_run(seeds, f"ex08_s{s}", 1.5, r)
    fake_run(seeds, "ex07_b8_s0", 2.0, 5.0)
    table, _ = cr.pool(cr.find_runs([seeds]), by=r"_s[0-9]+$")
    assert sorted(table) == ["ex07_b8", "ex08"]
    assert table["ex08"]["retrieval/t2i_r1"]["std"] == pytest.approx(2.0)
    assert table["ex07_b8"]["retrieval/t2i_r1"]["std"] is None


def test_command_line_table_and_json(klass, capsys):
    assert cr.main([klass, "--group", "ex02_*", "--only", "t2i_r1$|accuracy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["ex02_*"] and sorted(out["ex02_*"]) == ["ft/textcls/accuracy", "retrieval/t2i_r1"]
    assert out["ex02_*"]["retrieval/t2i_r1"]["std"] == pytest.approx(math.sqrt(8.0))
    assert cr.main([os.path.join(klass, "*", "ex01_default"), "--only", "t2i_r1$"]) == 0
    text = capsys.readouterr().out
    assert "== all: 3 run(s)" in text
    row = next(line for line in text.splitlines() if line.startswith("retrieval/t2i_r1"))
    assert row.split()[1:] == ["3", "23", "3.606", "20", "27"]
    assert cr.main([os.path.join(klass, "nobody")]) == 2
