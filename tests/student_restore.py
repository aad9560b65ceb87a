"""A pytest plugin for tests/test_student.py, loaded in a student copy (tools/student.py) with
`-p student_restore` and XFM_REFERENCE=the repository: while a grading test runs, the functions of the blank it
grades get their reference bodies back (each function object's __code__ swapped); every other blank stays blank.
A grading test that passes this way depends on no other blank."""
import importlib
import inspect
import os
import sys

REFERENCE = os.environ["XFM_REFERENCE"]
sys.path.insert(0, os.path.join(REFERENCE, "tools"))
import student  # noqa: E402  (the reference's table)

GRADES = {test: blank for blank in student.BLANKS for test in blank.tests}
_swapped = []


def live_function(path, qualname):
    """The function object the copy's code and tests call (inside any decorator's wrapper, staticmethod)."""
    obj = importlib.import_module(path[:-3])
    for part in qualname.split("."):
        obj = vars(obj)[part] if inspect.isclass(obj) else getattr(obj, part)
    return inspect.unwrap(getattr(obj, "__func__", obj))


def pytest_runtest_setup(item):
    blank = GRADES.get(item.nodeid)
    for spec in blank.functions if blank else ():
        path, qualname = student.split(spec)
        ref = os.path.join(REFERENCE, path)
        code = student.reference_code(open(ref, encoding="utf-8").read(), qualname, ref)
        fn = live_function(path, qualname)
        _swapped.append((fn, fn.__code__))
        fn.__code__ = code


def pytest_runtest_teardown(item):
    while _swapped:
        fn, code = _swapped.pop()
        fn.__code__ = code
