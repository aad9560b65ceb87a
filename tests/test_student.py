"""tools/student.py, the fill-in-the-blank exercises. The copy it writes keeps every blank's decorators, signature
and docstring, holds no reference body and is otherwise the repository unchanged. In the copy each blank's grading
tests fail, and they pass once that blank's reference body is back while every other blank stays blank
(tests/student_restore.py): so each blank's tests depend on it and on no other blank. Two pytest runs in the
copy, side by side, each a subprocess with a wall-clock limit."""
import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import pytest

import student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADING = [t for b in student.BLANKS for t in b.tests]


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("student") / "copy")
    assert student.main(["--out", out]) == 0
    return out


def function(path, qualname):
    src = open(path, encoding="utf-8").read()
    return student.find_function(ast.parse(src), qualname)


def test_the_copy_keeps_signatures_and_docstrings_and_holds_no_reference_body(copy):
    assert all(b.tests for b in student.BLANKS) and len(GRADING) == len(set(GRADING)), "a test grades one blank"
    blanked = {}
    for path, qualname in map(student.split, [f for b in student.BLANKS for f in b.functions] + list(student.HIDDEN)):
        ref, got = function(os.path.join(ROOT, path), qualname), function(os.path.join(copy, path), qualname)
        assert got is not None, f"{path}: {qualname} is gone"
        assert ast.dump(got.args) == ast.dump(ref.args), f"{path}: {qualname}: the signature changed"
        assert [ast.dump(d) for d in got.decorator_list] == [ast.dump(d) for d in ref.decorator_list], qualname
        assert ast.get_docstring(ref), f"{path}: {qualname} has no docstring to keep"
        assert ast.get_docstring(got, clean=False) == ast.get_docstring(ref, clean=False), f"{path}: {qualname}: the docstring changed"
        body = got.body[1:]                                                # what follows the docstring
        assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{path}: {qualname}: the body is more than the raise"
        assert "NotImplementedError('TODO(student)" in ast.unparse(body[0]), qualname
        blanked.setdefault(path, []).append(qualname)
    assert set(blanked) >= {"losses.py", "model.py", "data.py"}
    # every other file is the repository's own, byte for byte; nothing else is written
    files = sorted(os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs)
    assert files == sorted(student.source_files())
    for f in files:
        if f not in blanked:
            assert open(os.path.join(copy, f), "rb").read() == open(os.path.join(ROOT, f), "rb").read(), f
    with pytest.raises(SystemExit):                                        # a non-empty folder is refused
        student.main(["--out", copy])
    exercises = re.sub(r"\s*\\\n\s*", " ", open(os.path.join(ROOT, "EXERCISES.md"), encoding="utf-8").read())
    for b in student.BLANKS:                                               # EXERCISES.md names each blank's tests
        assert student.grading_command(b) in exercises, f"EXERCISES.md lacks `{student.grading_command(b)}`"


def run_grading_tests(copy, junit, restore):
    """The grading tests in the copy -> {node id: (outcome, message)} from pytest's junit report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    plugin = []
    if restore:
        env["XFM_REFERENCE"] = ROOT
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
        plugin = ["-p", "student_restore"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
                        f"--junitxml={junit}", *GRADING], cwd=copy, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode in (0, 1), f"pytest exited with {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        bad = [c for c in case if c.tag in ("failure", "error")]
        out[node] = ("failed", bad[0].get("message", "") + (bad[0].text or "")) if bad else ("passed", "")
    return out


def test_each_blank_fails_its_tests_and_passes_them_with_only_its_reference_back(copy, tmp_path):
    with ThreadPoolExecutor(2) as pool:                                    # the two runs side by side
        runs = [pool.submit(run_grading_tests, copy, tmp_path / f"{name}.xml", restore=name == "restored")
                for name in ("blanked", "restored")]
        blanked, restored = (r.result() for r in runs)
    assert sorted(blanked) == sorted(GRADING)
    for b in student.BLANKS:
        for test in b.tests:
            outcome, message = blanked[test]
            assert outcome == "failed" and "TODO(student)" in message, (
                f"blank {b.id}: {test} does not fail on the blank ({outcome})\n{message[-1500:]}")
    assert sorted(restored) == sorted(GRADING)
    for b in student.BLANKS:
        for test in b.tests:
            outcome, message = restored[test]
            assert outcome == "passed", (f"blank {b.id}: {test} fails with only its own reference body back (it "
                                         f"depends on another blank or grades another one)\n{message[-1500:]}")
