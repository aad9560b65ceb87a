"""
Exercises 2 and 12 of EXERCISES.md: held-out MLM, i.e. how good a language model each run's language encoder is
on text it never saw in pre-training.

    python exercises/heldout_mlm.py runs/ex01_default runs/ex02_no_stop_grad

For each run folder: the language encoder and its MLM head from RUN/ckpt.pt, the run's tokenizer, and the
held-out captions of the run's data (pairs_test.jsonl: scenes that never occur in the pre-training files).
Every caption is masked the way the text stream masks (15 %, at most 20 tokens, BERT 80/10/10: data.mask_text),
with 5 fixed seeds, so every run is scored on the same masked tokens. The loss is the cross-entropy over the
masked tokens (as losses.mlm_loss), in eval mode. Lower is better; chance is ln V. The training MLM loss of the
last log step is printed beside it.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from lib import runlog  # noqa: E402
from lib import tokenizer  # noqa: E402
from lib import formats
import train  # noqa: E402
import flava  # noqa: E402

SEEDS = 5


@torch.no_grad()
def heldout_mlm(run_dir, batch_size=128):
    """-> (mean CE over the masked tokens, masked-token accuracy in %, number of masked tokens, ln V)."""
    config = json.load(open(os.path.join(run_dir, "config.json")))
    tok = tokenizer.Tokenizer.load(os.path.join(run_dir, "tokenizer.json"))
    sources = formats.find_sources(config["train"]["data_dir"])
    if "pair_test" not in sources:
        raise SystemExit(f"error: {config['train']['data_dir']} has no pairs_test.jsonl (the held-out captions)")
    held_out = formats.parse_test_pairs(sources["pair_test"], formats.BadInput(verbose=False),
                                        config["train"].get("image_root", ""))
    captions = [it["caption"] for it in held_out]
    ckpt = runlog.load_checkpoint(run_dir, "cpu")
    model = flava.build_model(flava.config_from_dict(ckpt["model_config"]))  # X-FM or FLAVA, as the checkpoint says
    model.load_state_dict(ckpt["model"])
    model.eval()
    if getattr(model.cfg, "recipe", "xfm") == "flava":  # FLAVA's MLM head reads the final-LN states
        text_states, head = lambda ids, att: model.text.norm(model.encode_text(ids, att)), model.mlm_head
    else:
        text_states, head = model.encode_text, model.text_mlm
    seqs, labels = [], []
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        for c in captions:
            ids, lab = data.mask_text(tok.encode(c, config["train"]["caption_len"]), tok, 0.15, 20, rng)
            seqs.append(ids)
            labels.append(lab)
    ce, correct, n = 0.0, 0, 0
    for i in range(0, len(seqs), batch_size):
        ids = data.pad_seqs(seqs[i:i + batch_size], tok.pad_id)           # (B, T)
        att = data.padding_mask(seqs[i:i + batch_size], ids.shape[1])         # (B, T)
        y = data.pad_seqs(labels[i:i + batch_size], -100)                  # (B, T), -100 where not masked
        sel = y != -100
        logits = head(text_states(ids, att)[sel]).float()                 # (M, V) at the masked positions only
        ce += float(F.cross_entropy(logits, y[sel], reduction="sum"))
        correct += int((logits.argmax(-1) == y[sel]).sum())
        n += int(sel.sum())
    return ce / n, 100.0 * correct / n, n, math.log(tok.vocab_size)


def last_train_mlm(run_dir):
    logs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"final"' not in l]
    vals = [r["loss/mlm"] for r in logs if "loss/mlm" in r]
    return vals[-1] if vals else float("nan")


def main(argv):
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    print(f"{'run':<32} {'recipe':<7} {'stop_grad':<9} {'mim':<6} {'held-out MLM':>12} {'accuracy %':>10} "
          f"{'train MLM':>9} {'chance':>7}")
    for run in argv:
        t = json.load(open(os.path.join(run, "config.json")))["train"]
        loss, acc, n, chance = heldout_mlm(run)
        xfm = t.get("recipe", "xfm") == "xfm"  # FLAVA has neither option
        print(f"{run:<32} {t.get('recipe', 'xfm'):<7} {str(t['stop_grad']) if xfm else '-':<9} "
              f"{t['mim_target'] if xfm else '-':<6} {loss:12.3f} "
              f"{acc:10.1f} {last_train_mlm(run):9.3f} {chance:7.3f}")
    print(f"(held-out: {n} masked tokens of the held-out captions, {SEEDS} maskings each; train MLM: the last log step)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
