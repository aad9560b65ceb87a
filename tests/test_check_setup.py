"""tools/check_setup.py, the first command of EXERCISES.md: it runs end to end on this machine (versions, threads,
the device train.py picks, the smoke step) and says `setup: ok`; its device warnings name --device=cpu."""
import check_setup


def test_check_setup_runs_and_passes(capsys):
    """`python tools/check_setup.py --device=cpu`, run in this process (the interpreter and torch are loaded)."""
    rc = check_setup.main(["--device=cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("python ", "torch ", "numpy ", "pillow ", "tokenizers ", "threads ", "device ",
                 "smoke step  ok on cpu", "setup: ok"):
        assert line in out, f"{line!r} missing from:\n{out}"


def test_versions_and_device_warnings():
    assert check_setup.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert check_setup.version_tuple("1.26.4") >= check_setup.FLOORS["numpy"][0]
    assert check_setup.version_tuple("2.0.0rc1") == (2, 0, 0)
    mps = " ".join(check_setup.device_warnings("mps"))
    assert "MPS" in mps and "--device=cpu" in mps and "CPU fp32" in mps
    assert check_setup.device_warnings("cpu") == []
