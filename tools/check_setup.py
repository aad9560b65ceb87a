"""
The setup check: run it first on a new machine. It prints the versions this code depends on, the thread count and
the device and precision `train.py` picks with `--device=auto`, warns about anything unsupported or anything that
makes results differ from the reference numbers, then runs a smoke step: a tiny X-FM's forward, backward and one
AdamW update on a synthetic batch of every data kind (no downloads, no data on disk; seconds).

    python tools/check_setup.py                # on the device train.py would pick
    python tools/check_setup.py --device=cpu   # on the CPU, the device of the reference bands

Exit status 0 when the versions are supported and the smoke step passed, 1 otherwise; a warning alone (MPS, a
torch other than the pinned one) does not fail it.
"""
import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root

# (name, floor, why): below the floor this code does not run, or its tests do not pass
PYTHON_FLOOR = ((3, 10), "torch==2.13.0 (requirements.txt) needs Python 3.10; the code itself needs 3.9 "
                         "(str.removeprefix)")
FLOORS = {
    "torch": ((2, 6), "lib/runtime.py imports torch.distributed.fsdp.fully_shard (public from torch 2.6)"),
    "numpy": ((1, 26), "tested with NumPy 1.26 and 2.x; resume stores NumPy's random state as a tensor, so "
                       "checkpoints hold no NumPy objects"),
    "PIL": ((9, 1), "data.py and lib/toyworld.py use Image.Resampling and Image.Transpose (Pillow 9.1)"),
}
TORCH_PIN = "2.13.0"  # requirements.txt: the reference numbers and CI use it


def version_tuple(text):
    """'2.13.0+cpu' -> (2, 13, 0); the leading numbers only."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
        if digits != part:  # '0rc1': the numbers end here
            break
    return tuple(out)


def device_warnings(device_type):
    """The warnings about the device `--device=auto` picked (a string like 'cpu', 'cuda', 'mps')."""
    if device_type == "mps":
        return ["device=auto picks MPS (Apple silicon). The reference bands (reference/*.json, tools/curves.py check) "
                "and the numbers in EXERCISES.md and docs/ are CPU fp32 runs; to compare with them pass "
                "--device=cpu to train.py and finetune.py (and to this check)."]
    if device_type == "cuda":
        return ["device=auto picks CUDA with bf16 autocast where the GPU supports it. The reference bands are CPU "
                "fp32 runs: pass --device=cpu (or --amp=fp32) to compare with them."]
    return []


def smoke_step(device):
    """A tiny X-FM's forward, backward and one AdamW update on walkthrough.toy_batch. -> (seconds, losses)."""
    from walkthrough import one_thread
    with one_thread():  # a tiny model: threads add only overhead
        return _smoke_step(device)


def _smoke_step(device):
    import torch
    from losses import xfm_losses
    from walkthrough import tiny_model, toy_batch
    from lib import runtime
    t0 = time.time()
    model = tiny_model().to(device)
    batch = {kind: runtime.to_device(b, device) for kind, b in toy_batch(model.cfg).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = xfm_losses(model, batch)
    sum(losses.values()).backward()
    bad = [k for k, v in losses.items() if not torch.isfinite(v)]
    assert not bad, f"non-finite losses: {bad}"
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    before = model.temp.detach().clone()
    opt.step()
    assert not torch.equal(before, model.temp.detach()), "the AdamW update changed nothing"
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t0, {k: float(v.detach()) for k, v in losses.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                    help="where the smoke step runs (auto: where train.py would run)")
    args = ap.parse_args(argv)
    errors, warnings = [], []

    print(f"python      {sys.version.split()[0]}")
    if sys.version_info[:2] < PYTHON_FLOOR[0]:
        errors.append(f"Python {sys.version.split()[0]} is too old: {PYTHON_FLOOR[1]}")
    modules = {}
    for name in ("torch", "numpy", "PIL", "tokenizers"):
        try:
            modules[name] = __import__(name)
        except ImportError as e:
            errors.append(f"{name} is missing ({e}): pip install -r requirements.txt")
            continue
        version = modules[name].__version__
        print(f"{'pillow' if name == 'PIL' else name:<11} {version}")
        if name in FLOORS and version_tuple(version) < FLOORS[name][0]:
            floor = ".".join(map(str, FLOORS[name][0]))
            errors.append(f"{name} {version} is older than {floor}: {FLOORS[name][1]}")
    if "torch" in modules and version_tuple(modules["torch"].__version__)[:3] != version_tuple(TORCH_PIN):
        warnings.append(f"torch {modules['torch'].__version__} is not the pinned {TORCH_PIN} (requirements.txt); "
                        "the reference numbers and CI use the pin")
    if errors and "torch" not in modules:
        for e in errors:
            print(f"ERROR: {e}")
        return 1

    import torch
    from lib import runtime
    print(f"threads     {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if "RANK" in os.environ:
        errors.append("run this check without torchrun (RANK is set)")
    else:
        picked = runtime.setup_distributed("auto")[4]
        amp = runtime.amp_setup("auto", picked)[2]
        print(f"device      train.py --device=auto -> {picked.type}, --amp=auto -> {amp}")
        warnings += device_warnings(picked.type)
        device = picked if args.device == "auto" else runtime.setup_distributed(args.device)[4]
        try:
            seconds, losses = smoke_step(device)
            print(f"smoke step  ok on {device.type}: forward + backward + AdamW update of a tiny X-FM in "
                  f"{seconds:.1f} s, {len(losses)} losses, sum {sum(losses.values()):.3f}")
        except Exception as e:  # reported, not raised: the check's job is to say what is wrong
            errors.append(f"smoke step failed on {device.type}: {type(e).__name__}: {e}")
    for w in warnings:
        print(f"WARNING: {w}")
    for e in errors:
        print(f"ERROR: {e}")
    print("setup: " + ("NOT ok" if errors else "ok") + (f" ({len(warnings)} warnings)" if warnings else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
