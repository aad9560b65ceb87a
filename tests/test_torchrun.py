"""Every script under `torchrun --nproc_per_node=2` (gloo, CPU), as a user runs it on a fresh clone: train.py
from an empty data folder and an empty run folder for both recipes, then finetune.py's whole task suite (every
task kind) on each recipe's checkpoint, the X-FM one from an empty data folder too. Each command has a wall-clock
limit, so a hang (ranks pairing up the wrong collectives) fails here in minutes, never at CI's time limit.

Also: runtime.rank0_shares, the "rank 0 prepares, the others use it" step, in 2 gloo processes."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import _set_pg_timeout

from lib import runtime
from conftest import gloo_group, rendezvous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TINY = ["--max_steps=4", "--log_every=2", "--warmup_steps=1", "--batch_size=8", "--vocab_size=300", "--eval_k=4"]
FINETUNE_TINY = ["--epochs=1", "--batch_size=8", "--k_test=4", "--eval_batch_size=32"]


def torchrun(script, args, cwd, timeout=300):
    """`torchrun --standalone --nproc_per_node=2 ROOT/script args` in cwd -> its output; fails on a non-zero exit
    and on a run past `timeout` seconds (the whole process group is killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *args]
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[3:])} hung: killed after {timeout} s\n{out[-3000:]}")
    assert p.returncode == 0, f"{' '.join(cmd[3:])} failed:\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module", params=["xfm", "flava"])
def pretrained_run(request, tmp_path_factory):
    """train.py under torchrun in an empty folder: the toy world and the run folder do not exist yet."""
    cwd = tmp_path_factory.mktemp(f"torchrun_{request.param}")
    out = torchrun("train.py", [f"--recipe={request.param}", "--out_dir=runs/r", *TRAIN_TINY], cwd)
    return request.param, cwd, out


def test_train_from_empty_folders_under_torchrun(pretrained_run):
    recipe, cwd, out = pretrained_run
    run = cwd / "runs" / "r"
    assert (cwd / "data" / "toy" / "pairs.jsonl").is_file() and "building the toy world" in out
    for name in ("ckpt.pt", "tokenizer.json", "config.json", "metrics.jsonl", "loss_curves.png"):
        assert (run / name).is_file(), name
    assert (run / "image_tokenizer.pt").is_file() == (recipe == "flava")
    assert json.load(open(run / "config.json"))["world_size"] == 2
    final = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    assert final["final"] and final["step"] == 4 and "retrieval" in final


def test_finetune_every_task_under_torchrun(pretrained_run, tmp_path):
    """`--task all`: textcls, imgcls (full and linear probe), vqa, nlvr, retrieval (zero-shot and fine-tuned),
    grounding and the attention picture, with DDP over 2 processes. The X-FM suite runs in an empty folder, so
    finetune.py builds the toy world itself."""
    recipe, cwd, _ = pretrained_run
    here = tmp_path if recipe == "xfm" else cwd
    torchrun("finetune.py", ["--task=all", f"--init={cwd / 'runs' / 'r' / 'ckpt.pt'}", "--out_dir=ft", *FINETUNE_TINY],
             here, timeout=420)
    rows = json.load(open(here / "ft" / "benchmark.json"))
    assert [r["name"] for r in rows] == [name for name, _ in __import__("finetune").SUITE]
    assert all(r["steps"] > 0 for r in rows if r["name"] != "retrieval_zeroshot")
    assert (here / "ft" / "attention" / "attention.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# runtime.rank0_shares in 2 gloo processes


def _shares_worker(rank, meet, folder, results):
    with gloo_group(rank, 2, meet, timeout_s=30):
        calls = []

        def prepare():  # rank 0 alone decides, from its own view of the file system
            calls.append(rank)
            os.makedirs(os.path.join(folder, "made"))
            return {"made_by": rank, "existed_before": False}
        got = runtime.rank0_shares(prepare, True, rank)
        try:
            runtime.rank0_shares(lambda: (_ for _ in ()).throw(SystemExit("error: rank 0 cannot")), True, rank)
            err = None
        except SystemExit as e:
            err = str(e.code)
        # a preparation longer than the default group's timeout (NCCL's watchdog on a GPU node)
        dist.barrier()
        _set_pg_timeout(timedelta(seconds=1), dist.group.WORLD)
        slow = runtime.rank0_shares(lambda: time.sleep(3) or "slow", True, rank)
        results[rank] = {"got": got, "calls": calls, "error": err, "slow": slow}


def test_rank0_shares_runs_once_and_every_rank_stops_with_rank0(tmp_path):
    """fn runs on rank 0 only and every rank gets its result (rank 1 never looks at the folder, so it cannot
    re-decide); when fn fails on rank 0, rank 1 stops too instead of waiting (the group timeout is 30 s); rank 1
    waits out a preparation longer than the default group's timeout (runtime.prep_group)."""
    results = mp.Manager().dict()
    mp.spawn(_shares_worker, args=(rendezvous(), str(tmp_path), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["got"] == {"made_by": 0, "existed_before": False}
        assert results[rank]["calls"] == ([0] if rank == 0 else [])
    assert results[0]["error"] == "error: rank 0 cannot" and results[1]["error"] == "1"
    assert results[0]["slow"] == results[1]["slow"] == "slow"
