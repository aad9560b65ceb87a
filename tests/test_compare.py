"""tools/compare.py's table: mean and half-range per task, per domain and macro, from finished run folders."""
import json
import os

import compare


def fake_run(root, name, seed, values, wall):
    run = os.path.join(root, f"{name}_seed{seed}")
    os.makedirs(os.path.join(run, "finetune"))
    rows = [{"name": task, "value": values[task], "wall_s": 1.0} for task in compare.TASKS]
    json.dump(rows, open(os.path.join(run, "finetune", "benchmark.json"), "w"))
    json.dump({"device": "test device"}, open(os.path.join(run, "config.json"), "w"))
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss/itc": 1.0}) + "\n" + json.dumps({"final": True, "wall_s": wall}) + "\n")


def test_table_mean_spread_domains_and_macro(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RECIPES", {"A": ("Recipe A", []), "B": ("Recipe B", [])})
    base = {t: 50.0 for t in compare.TASKS}
    fake_run(tmp_path, "A", 0, {**base, "textcls": 60.0, "imgcls": 40.0}, 100)
    fake_run(tmp_path, "A", 1, {**base, "textcls": 70.0, "imgcls": 30.0}, 120)
    fake_run(tmp_path, "B", 0, base, 50)                                   # B: one seed finished of two
    args = type("Args", (), {"out_dir": str(tmp_path)})
    md = compare.table(args, [0, 1])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in md.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["text classification acc"] == ["65.0 ± 5.0", "50.0 ± 0.0"]
    assert rows["image classification acc"] == ["35.0 ± 5.0", "50.0 ± 0.0"]
    assert rows["**language average**"] == ["**65.0 ± 5.0**", "**50.0 ± 0.0**"]
    # vision = mean(imgcls, linear probe) per seed: (40+50)/2 = 45 and (30+50)/2 = 40
    assert rows["**vision average**"] == ["**42.5 ± 2.5**", "**50.0 ± 0.0**"]
    # macro per seed: (60 + 45 + 50) / 3 = 51.67 and (70 + 40 + 50) / 3 = 53.33
    assert rows["**macro average** (of the 3 domains)"] == ["**52.5 ± 0.8**", "**50.0 ± 0.0**"]
    assert rows["pre-training wall time (s)"] == ["110", "50"]
    assert "runs finished: A 2, B 1" in md and "test device" in md
    assert os.path.exists(tmp_path / "comparison.md") and os.path.exists(tmp_path / "comparison.json")
