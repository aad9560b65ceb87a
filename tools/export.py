"""
Export the weights of an existing run: a train.py checkpoint (RUN/ckpt.pt, a kept RUN/ckpt_STEP.pt, or the run
folder for its ckpt.pt) -> OUT/config.json + OUT/model.safetensors + OUT/tokenizer.json, the model's state dict
without the optimizer (pretrained.export). train.py --export=OUT writes the same folder at the end of a run;
finetune.py --init OUT reads it, and any program with a safetensors reader can read the weights.

    python tools/export.py runs/default runs/default_export
    python tools/export.py runs/default/ckpt_000500.pt runs/step500_export       # a checkpoint kept by --keep_last
    python finetune.py --task vqa --init runs/default_export
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from lib import runlog  # noqa: E402
from lib import pretrained  # noqa: E402
import train  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run folder of train.py, or one of its checkpoint files")
    ap.add_argument("out_dir", help="the export folder (not the run folder)")
    args = ap.parse_args(argv)
    ckpt = runlog.load_checkpoint(args.checkpoint, "cpu")
    if "task" in ckpt:
        raise SystemExit(f"error: {args.checkpoint} was fine-tuned by finetune.py ({ckpt['task']}); this tool exports "
                         f"pre-training checkpoints of train.py")
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint) or "."
    pretrained.export(args.out_dir, run_dir, ckpt["model"], ckpt["model_config"], ckpt["train_config"], ckpt["step"])
    print(f"wrote {args.out_dir}: {len(ckpt['model'])} tensors of step {ckpt['step']} (model.safetensors), "
          f"config.json, tokenizer.json")
    return args.out_dir


if __name__ == "__main__":
    main()
