"""Nothing of a run is lost: a fresh run never writes into a folder that holds a run (unless --overwrite), one
process at a time writes a folder (its lock, and a dead holder's lock taken over), a resumed run keeps its own
model, recipe, tokenizer and data settings (a flag that contradicts them is refused before anything is written),
carries its tokenizer into a new folder, and cuts a torn last log record. Run: python -m pytest -q
tests/test_runfolder.py   (CPU, about half a minute)"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lib import runlog
from lib import tokenizer
from lib import toyworld
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps=4", "--batch_size=8", "--log_every=1", "--warmup_steps=2", "--vocab_size=300",
        "--eval_k=4", "--caption_len=24", "--text_len=32"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """(toy world, a run stopped after step 2 of 4), made once for this file; tests copy the run before changing it."""
    root = tmp_path_factory.mktemp("runfolder")
    toy = str(root / "toy")
    toyworld.make_toy(toy, seed=0, n_pairs=48, n_regions=24, n_text=48, n_images=24, n_test=12, n_down=8,
                      progress=False)
    run = str(root / "run")
    train.main([f"--data_dir={toy}", f"--out_dir={run}", *FAST, "--stop_at=2"])
    return toy, run


def snapshot(folder):
    """{file name: bytes} of a folder (not recursive)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def copy(run, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(run, dst)
    return dst


def steps_logged(run):
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]  # every line must parse
    return [r["step"] for r in lines if not r.get("final")], [r["step"] for r in lines if r.get("final")]


def test_a_second_fresh_run_into_the_folder_is_refused_and_the_first_run_is_intact(stopped):
    toy, run = stopped
    assert not os.path.exists(os.path.join(run, runlog.LOCK_FILE))  # a run that ended released its lock
    before = snapshot(run)
    # `python train.py` again into the same folder, as a user types it: one line, no traceback, nothing written
    p = subprocess.run([sys.executable, "train.py", f"--data_dir={toy}", f"--out_dir={run}", *FAST], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {run} holds a run (ckpt.pt, config.json, loss_curves.png, "
                                             f"metrics.jsonl, tokenizer.json); continue it with --resume={run}, "
                                             f"start a new one with --out_dir=NEW, or replace it with --overwrite"]
    assert snapshot(run) == before


def test_overwrite_deletes_the_old_runs_files_and_nothing_else(stopped, tmp_path):
    toy, run = stopped
    old = copy(run, tmp_path, "old")
    for name in ("ckpt_000002.pt", "notes.txt"):  # a kept checkpoint of the old run; a file of the user's
        open(os.path.join(old, name), "w").write("x")
    train.main([f"--data_dir={toy}", f"--out_dir={old}", *FAST, "--max_steps=1", "--overwrite"])
    assert steps_logged(old) == ([1], [1])                      # the new run's log alone
    assert not os.path.exists(os.path.join(old, "ckpt_000002.pt"))
    assert open(os.path.join(old, "notes.txt")).read() == "x"
    assert runlog.load_checkpoint(old, "cpu")["step"] == 1


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(stopped, tmp_path, capsys):
    toy, _ = stopped
    busy = str(tmp_path / "busy")
    lock = runlog.RunLock(busy)
    try:
        with pytest.raises(SystemExit, match=rf"error: {busy} is in use by process {os.getpid()} on "):
            train.main([f"--data_dir={toy}", f"--out_dir={busy}", *FAST])
        assert os.listdir(busy) == [runlog.LOCK_FILE]             # nothing else written
    finally:
        lock.release()
    assert not os.path.exists(os.path.join(busy, runlog.LOCK_FILE))
    # a process that holds the lock and is killed (kill -9): its .lock stays, and the next claimant takes it over
    dead = str(tmp_path / "dead")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lib import runlog; lock = runlog.RunLock(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", dead], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"in use by process {holder.pid} "):
            runlog.RunLock(dead)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.load(open(os.path.join(dead, runlog.LOCK_FILE)))["pid"] == holder.pid
    lock = runlog.RunLock(dead)
    assert f"was left by process {holder.pid} on " in capsys.readouterr().out
    assert json.load(open(os.path.join(dead, runlog.LOCK_FILE)))["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("flag, says", [
    ("--config=small", "--config=small (the run has config=tiny)"),
    ("--recipe=flava", "--recipe=flava (the run has recipe=xfm)"),
    ("--vocab_size=999", "--vocab_size=999 (the run has vocab_size=300)"),
    ("--tokenizer=other.json", "--tokenizer=other.json (the run has tokenizer=)"),
    ("--weight_decay=0.5", "--weight_decay=0.5 (the run has weight_decay=0.01)"),
    ("--text_len=999", "--text_len/--caption_len 999 is beyond the model's position table of 32 tokens"),
    ("--overwrite", "--overwrite would delete the run that --resume="),
])
def test_resume_refuses_a_flag_that_contradicts_the_run_before_writing_anything(stopped, flag, says):
    _, run = stopped
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main([f"--resume={run}", flag])
    assert says in str(e.value)
    assert snapshot(run) == before
    ok = {"resume": run, "config": "tiny", "lr": 0.5}                  # the run's own value; a key that may change
    assert check_resume(run, runlog.load_checkpoint(run, "cpu"), ok).lr == 0.5


def test_resume_into_a_new_folder_carries_the_tokenizer_and_the_log(stopped, tmp_path):
    _, run = stopped
    src = copy(run, tmp_path, "src")
    os.remove(os.path.join(src, "tokenizer.json"))          # the checkpoint holds the run's tokenizer itself
    new = str(tmp_path / "new")
    train.main([f"--resume={src}", f"--out_dir={new}"])
    assert json.load(open(os.path.join(new, "tokenizer.json"))) == json.load(open(os.path.join(run, "tokenizer.json")))
    assert steps_logged(new) == ([1, 2, 3, 4], [4])          # the old run's records, then the resumed steps
    with pytest.raises(SystemExit, match="holds a run"):     # a new folder must be free like a fresh run's
        train.main([f"--resume={src}", f"--out_dir={new}"])


def test_a_torn_last_log_record_is_cut_on_resume(stopped, tmp_path, capsys):
    _, run = stopped
    torn = copy(run, tmp_path, "torn")
    with open(os.path.join(torn, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lr": 0.0')                    # killed mid-write
    train.main([f"--resume={torn}"])
    assert "cut a torn last record (21 bytes" in capsys.readouterr().out
    assert steps_logged(torn) == ([1, 2, 3, 4], [2, 4])      # (the stopped run's final record stays)


# ---------------------------------------------------------------------------------------------------------
# The same rules one function at a time (no training run: what the mutation check runs)


def check_resume(run, ckpt, given):
    """runlog.check_resume as train.py calls it."""
    return runlog.check_resume(run, ckpt, given, train.TrainConfig, train.RESUME_MAY_CHANGE)


def fake_run(folder, names=("ckpt.pt", "metrics.jsonl", "config.json", "ckpt_000500.pt")):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "w").write(name)


def saved_run(tok_json="", **train_config):
    """What check_resume, claim_run_folder and run_tokenizer read of a checkpoint."""
    cfg = {**vars(train.TrainConfig()), **train_config}
    return {"train_config": cfg, "model_config": {"max_text_len": max(cfg["text_len"], cfg["caption_len"])},
            "step": 2, **({"tokenizer": tok_json} if tok_json else {})}


def test_claim_fresh_refuses_a_run_and_overwrite_deletes_only_its_files(tmp_path):
    run = str(tmp_path / "run")
    runlog.claim_fresh(run, overwrite=False)                 # no folder yet: free
    fake_run(run, ("notes.txt", ".lock"))
    runlog.claim_fresh(run, overwrite=False)                 # other files are no run
    fake_run(run)
    with pytest.raises(SystemExit, match=r"holds a run \(ckpt.pt, ckpt_000500.pt, config.json, metrics.jsonl\); "
                                         rf"continue it with --resume={run}, .* --overwrite"):
        runlog.claim_fresh(run, overwrite=False)
    runlog.claim_fresh(run, overwrite=True)
    assert sorted(os.listdir(run)) == [".lock", "notes.txt"]


def test_run_lock_keeps_a_second_claimant_out_until_released(tmp_path):
    run = str(tmp_path / "run")
    lock = runlog.RunLock(run)
    with pytest.raises(SystemExit, match=rf"error: {run} is in use by process {os.getpid()} on .* since "):
        runlog.RunLock(run)
    lock.release()
    assert not os.path.exists(os.path.join(run, runlog.LOCK_FILE))  # a lock file is only ever a dead holder's
    runlog.RunLock(run).release()


def test_check_resume_refuses_what_contradicts_the_run(tmp_path):
    run = str(tmp_path / "run")
    fake_run(run)
    ckpt = saved_run(text_len=32, caption_len=24)
    cfg = check_resume(run, ckpt, {"resume": run, "config": "tiny", "lr": 0.5, "stop_at": 0})
    assert (cfg.config, cfg.lr, cfg.text_len, cfg.out_dir) == ("tiny", 0.5, 32, run)
    for given, says in (({"config": "small", "seed": 3}, "--config=small (the run has config=tiny); --seed=3 (the "
                                                         "run has seed=0)"),
                        ({"text_len": 33}, "--text_len/--caption_len 33 is beyond the model's position table of 32"),
                        ({"overwrite": True}, "--overwrite would delete the run")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            check_resume(run, ckpt, {"resume": run, **given})
    ckpt["train_config"]["from_a_newer_version"] = 1
    with pytest.raises(SystemExit, match=r"run/ckpt.pt: its train_config has keys .* \(from_a_newer_version\)"):
        check_resume(run, ckpt, {"resume": run})


def test_a_resume_into_a_new_folder_takes_the_checkpoints_tokenizer_and_a_free_folder(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    fake_run(old, ())
    with open(os.path.join(old, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ({"step": 1}, {"step": 2}, {"step": 3}, {"final": True,
                                                                                               "step": 3})))
        f.write('{"step": 4, "l')
    tok = tokenizer.Tokenizer.train(["a red circle", "a blue square"], 300, str(tmp_path / "tok.json"))
    ckpt = saved_run(tok.to_json())
    assert runlog.run_tokenizer(ckpt, old).encode("a red circle", 16) == tok.encode("a red circle", 16)
    cfg = check_resume(old, ckpt, {"resume": old, "out_dir": new})
    runlog.claim_run_folder(cfg, ckpt).release()
    assert steps_logged(new) == ([1, 2], [])                # the log up to the checkpoint's step 2
    with pytest.raises(SystemExit, match="holds a run"):
        runlog.claim_run_folder(cfg, ckpt)


def test_repair_metrics_cuts_only_a_torn_last_record(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    whole = '{"step": 1}\n{"step": 2}\n'
    open(path, "w").write(whole)
    runlog.repair_metrics(path)
    assert open(path).read() == whole
    open(path, "a").write('{"step": 3, "lo')
    runlog.repair_metrics(path)
    assert open(path).read() == whole
