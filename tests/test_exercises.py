"""EXERCISES.md, kept runnable. Every command in every exercise's ```bash blocks runs here, in the order written,
made tiny: train.py for 2 steps on a small toy world, finetune.py for 1 epoch, torchrun and the helper scripts in
exercises/ as they are, pytest commands collected only (CI runs those tests anyway). They run in a temporary copy of
the repository (data/toy is the small toy world there), so nothing is left in runs/. An exercise that reuses another's
run folder (runs/ex01_default/ckpt.pt) gets that exercise's train.py command run first. The code edits the exercises
ask for ("In `losses.py`, function `f`, replace `old` with `new`") must still match the code, and the deliberate
bugs of an exercise that runs the tests must make tests/test_losses.py fail."""
import ast
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest

import curves
import finetune
import train
from lib import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES_MD = os.path.join(ROOT, "EXERCISES.md")

# what makes a command tiny: forced keys replace the command's own value, the others fill in only when absent
TRAIN_FORCED = {"max_steps": "2", "log_every": "1", "warmup_steps": "1"}
TRAIN_SMALL = {"batch_size": "8", "vocab_size": "300", "eval_k": "4", "caption_len": "24", "text_len": "32"}
FINETUNE_SMALL = {"batch_size": "8", "eval_batch_size": "16", "k_test": "4"}
PARTS = ("**Goal.**", "**Commands", "**Look at.**", "**Questions.**")
EDIT = re.compile(r"[Ii]n `([^`]+\.py)`,\s+function\s+`(\w+)`,\s+replace\s+`([^`]+)`\s+with\s+`([^`]+)`")


# ---------------------------------------------------------------------------------------------------------
# Reading EXERCISES.md


def read_exercises(path=EXERCISES_MD):
    """[{"number", "title", "text", "commands": [command line, ...], "edits": [(file, function, old, new)]}]"""
    text = open(path, encoding="utf-8").read()
    heads = list(re.finditer(r"^## (\d+)\. (.+)$", text, re.M))
    out = []
    for i, h in enumerate(heads):
        body = text[h.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        commands = []
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    commands.append(line)
        out.append({"number": int(h.group(1)), "title": h.group(2).strip(), "text": body, "commands": commands,
                     "edits": EDIT.findall(body)})
    return out


EXERCISES = read_exercises() if os.path.exists(EXERCISES_MD) else []


def options(args):
    """{key: value} of --key=value, --key value and bare --flag arguments (as cli.parse_overrides reads them)."""
    out, i = {}, 0
    while i < len(args):
        a, i = args[i], i + 1
        if not a.startswith("--"):
            continue
        key, eq, val = a[2:].partition("=")
        if not eq:
            if i < len(args) and not args[i].startswith("--"):
                val, i = args[i], i + 1
            else:
                val = "true"
        out[key] = val
    return out


def run_names(line):
    """The runs/NAME folders a command line mentions."""
    return sorted(set(re.findall(r"\bruns/([\w.-]+)", line)))


def output_run(argv):
    """The runs/NAME a command writes to (its --out_dir), or None."""
    out_dir = options(argv[2:]).get("out_dir", "") if len(argv) > 2 else ""
    names = run_names(out_dir)
    return names[0] if names else None


def producers():
    """{run name: (exercise number, train.py command line)} over all exercises."""
    out = {}
    for ex in EXERCISES:
        for line in ex["commands"]:
            argv = shlex.split(line)
            if argv[:2] == ["python", "train.py"] and output_run(argv):
                out.setdefault(output_run(argv), (ex["number"], line))
    return out


# ---------------------------------------------------------------------------------------------------------
# Running a command, tiny


def tiny(argv):
    """The command with the overrides that make it run in seconds."""
    if argv[:2] == ["python", "train.py"]:
        given = options(argv[2:])
        extra = {**{k: v for k, v in TRAIN_SMALL.items() if k not in given}, **TRAIN_FORCED}
        return argv + [f"--{k}={v}" for k, v in extra.items()]
    if argv[:2] == ["python", "finetune.py"]:
        given = options(argv[2:])
        extra = {k: v for k, v in FINETUNE_SMALL.items() if k not in given}
        if given.get("epochs") != "0":
            extra["epochs"] = "1"
        return argv + [f"--{k}={v}" for k, v in extra.items()]
    return argv


@contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def subprocess_ok(argv, repo, line, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"`{line}` exited with {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


def run_command(line, repo):
    """One command line of an exercise, tiny, from the repository copy's root; fails the test on any error."""
    argv = shlex.split(line)
    if argv[:3] == ["python", "-m", "pytest"]:  # the tests themselves run in CI: check that they are found
        subprocess_ok([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *argv[3:]],
                      repo, line, timeout=120)
        return
    if argv[0] == "torchrun":  # the same launcher, found through this interpreter rather than PATH
        subprocess_ok([sys.executable, "-m", "torch.distributed.run", *argv[1:]], repo, line)
        return
    if argv[0] != "python" or len(argv) < 2:
        pytest.fail(f"`{line}`: the exercises run python and torchrun commands only")
    argv = tiny(argv)
    with cwd(repo):
        try:
            if argv[1] == "train.py":
                train.main(argv[2:])
            elif argv[1] == "finetune.py":
                finetune.main(argv[2:])
            elif argv[1] == "tools/curves.py":  # a 2-step run is not healthy: the verdict may be 1, but it must not crash
                assert curves.main(argv[2:]) in (0, 1)
            elif argv[1].startswith("exercises/"):
                old_argv, old_path = sys.argv, list(sys.path)
                sys.argv = argv[1:]
                try:  # (a script puts its repository on sys.path: later tests' processes must not import the copy)
                    runpy.run_path(argv[1], run_name="__main__")
                finally:
                    sys.argv, sys.path[:] = old_argv, old_path
            else:
                pytest.fail(f"`{line}`: no tiny version of {argv[1]} is known to this test")
        except SystemExit as e:
            if e.code not in (0, None):
                pytest.fail(f"`{line}` exited with {e.code}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repository with a small toy world in data/toy; run folders done so far."""
    repo = str(tmp_path_factory.mktemp("exercises") / "repo")
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        "runs", "data", ".git", "__pycache__", ".pytest_cache", ".benchmarks", "*.pt", "*.pth", "out"))
    toyworld.make_toy(os.path.join(repo, "data", "toy"), seed=0, n_pairs=64, n_regions=32, n_text=64, n_images=32,
                  n_test=16, n_down=16, progress=False)
    return {"repo": repo, "done": set()}


def ensure_runs(line, ws, made_here):
    """Run the train.py command of every run folder this line reads that no earlier command has written."""
    argv = shlex.split(line)
    for name in run_names(line):
        if name in ws["done"] or name in made_here or name == output_run(argv):
            continue
        prod = producers().get(name)
        assert prod, f"`{line}` reads runs/{name}, which no exercise's train.py command writes"
        ensure_runs(prod[1], ws, made_here)
        run_command(prod[1], ws["repo"])
        ws["done"].add(name)


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_exercises_md_has_8_to_12_complete_exercises():
    assert 8 <= len(EXERCISES) <= 12, f"{len(EXERCISES)} exercises"
    assert [ex["number"] for ex in EXERCISES] == list(range(1, len(EXERCISES) + 1))
    for ex in EXERCISES:
        missing = [p for p in PARTS if p not in ex["text"]]
        assert not missing, f"exercise {ex['number']} ({ex['title']}) lacks {missing}"
        assert ex["commands"], f"exercise {ex['number']} has no command"
    outs = [output_run(shlex.split(l)) for ex in EXERCISES for l in ex["commands"] if l.startswith("python train.py")]
    assert all(o and o.startswith("ex") for o in outs), "every train.py command writes its own runs/ex... folder"
    assert len(outs) == len(set(outs)), "two train.py commands write the same run folder"


@pytest.mark.parametrize("ex", EXERCISES, ids=[f"{ex['number']:02d}" for ex in EXERCISES])
def test_exercise_commands_run(ex, workspace):
    made_here = set()
    for line in ex["commands"]:
        ensure_runs(line, workspace, made_here)
        run_command(line, workspace["repo"])
        name = output_run(shlex.split(line))
        if name:
            made_here.add(name)
            if line.startswith("python train.py"):
                workspace["done"].add(name)


def _function_source(src, name):
    node = next((n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    return ast.get_source_segment(src, node) if node else None


def test_the_code_edits_still_match_the_code():
    edits = [(ex["number"], *e) for ex in EXERCISES for e in ex["edits"]]
    assert edits, "no exercise asks for a code edit"
    for number, path, func, old, new in edits:
        src = open(os.path.join(ROOT, path), encoding="utf-8").read()
        body = _function_source(src, func)
        assert body is not None, f"exercise {number}: {path} has no function {func}"
        assert body.count(old) == 1 and src.count(old) == 1, f"exercise {number}: `{old}` is not once in {path} {func}"
        compile(src.replace(old, new), path, "exec")


def test_the_files_and_functions_the_exercises_name_exist():
    text = open(EXERCISES_MD, encoding="utf-8").read()
    for path in set(re.findall(r"`((?:tests|reference|exercises)/[\w./-]+)`", text)):
        assert os.path.exists(os.path.join(ROOT, path)), f"EXERCISES.md names {path}, which does not exist"
    for module, name in set(re.findall(r"`(losses|model|data|train|finetune|curves|flava)\.(\w+)`", text)):
        if name == "py":  # a file name such as `train.py`
            continue
        assert hasattr(__import__(module), name), f"EXERCISES.md names {module}.{name}, which does not exist"


def test_the_deliberate_bugs_fail_the_tests(workspace):
    """Each edit in an exercise that runs the tests breaks something tests/test_losses.py sees."""
    repo = workspace["repo"]
    for ex in EXERCISES:
        if not any(line.startswith("python -m pytest") for line in ex["commands"]):
            continue
        for path, func, old, new in ex["edits"]:
            target = os.path.join(repo, path)
            src = open(target, encoding="utf-8").read()
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(src.replace(old, new))
                r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                    "tests/test_losses.py"], cwd=repo, capture_output=True, text=True, timeout=300)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(src)
            assert r.returncode == 1, (f"exercise {ex['number']}: with `{old}` -> `{new}` in {path} {func}, "
                                       f"tests/test_losses.py did not fail:\n{r.stdout[-3000:]}")
