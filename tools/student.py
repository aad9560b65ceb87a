"""
Fill-in-the-blank exercises: a student copy of the repository in which the central functions of the method are
blanks. A blank keeps its signature, decorators and docstring (the docstring holds the formula); the rest of its
body becomes a `# TODO(student)` comment saying what to write (and how, where the docstring does not) and
`raise NotImplementedError("TODO(student): module.function")`. Each blank names the tests that grade it; those
tests fail in the student copy and pass once the blank is filled in, whatever the other blanks hold
(tests/test_student.py checks both). `git diff --no-index` between the copy and this repository is the answer key.

    python tools/student.py --out ../xfm-student     # write the copy (the folder must be empty or absent)
    python tools/student.py --list                   # the blanks, their functions and the command that grades each

The copy holds the files git would commit (tools/mutate.py's repo_files: no data/, runs/ or .git). The blanks are
the reference formulas of losses.py; the fast path's versions of the same losses (lib/fast_losses.py) are blanked
too, so the copy holds no answer.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutate import ROOT, repo_files  # noqa: E402


@dataclass
class Blank:
    id: str
    functions: tuple    # "file.py:qualname" of each function the student writes
    what: str           # the TODO message: what to write, in one line
    tests: tuple        # pytest node ids that grade it (seconds; they depend on no other blank)
    todo: dict = field(default_factory=dict)   # qualname -> comment lines, where the docstring lacks the recipe


TL, TM, TD = "tests/test_losses.py", "tests/test_model.py", "tests/test_data.py"

BLANKS = [
    Blank("stop_grad", ("losses.py:fusion_input",),
          "X-FM idea 1: the language states as the fusion encoder reads them (detached under stop_grad)",
          (f"{TL}::test_fusion_input_is_the_stop_gradient",)),
    Blank("mim", ("losses.py:mim_loss", "losses.py:mim_objective"),
          "X-FM idea 2: the MIM loss, and its target (the encoder's detached unmasked output)",
          (f"{TL}::test_mim_loss_formula_and_unmasked_patches_do_not_count",
           f"{TL}::test_mim_target_carries_no_gradient"),
          {"mim_objective": [
              "mim_target 'pixel': v_hat = model.encode_image(image, mim_mask); return pixel_mim_loss of",
              "  model.pixel_head(v_hat[:, 1:]) against the image (patch size model.cfg.patch_size).",
              "mim_target 'vl' (X-FM): v, when None, is model.encode_image(image); the target is v detached (no",
              "  EMA copy: the very encoder ITC/ITM/IMLM/BBP train in this step). When stats is a dict,",
              "  stats['mim_target_std'] = the per-dimension std of the target's patch slots, mean over dimensions.",
              "  The prediction is the block-masked view model.encode_image(image, mim_mask).",
              "Return mim_loss(prediction, target, mim_mask)."]}),
    Blank("itc", ("losses.py:itc_loss",),
          "global image-text contrastive loss: local rows against the keys of every rank",
          (f"{TL}::test_itc_formula_symmetry_and_minimum", f"{TL}::test_itc_with_ids_makes_duplicates_positives")),
    Blank("hard_negatives", ("losses.py:sample_hard_negatives",),
          "ALBEF's in-batch hard negatives: one per row, drawn with torch.multinomial",
          (f"{TL}::test_hard_negatives_never_pick_the_positive_or_a_duplicate",
           f"{TL}::test_hard_negatives_follow_the_itc_similarity",
           f"{TL}::test_hard_negatives_are_drawn_with_the_softmax_probabilities")),
    Blank("itm", ("losses.py:itm_loss",),
          "ITM: the fusion encoder on the pairs and on their hard negatives, then CE with labels 1 and 0",
          (f"{TL}::test_itm_loss_rows_and_labels_with_fixed_negatives",)),
    Blank("giou", ("losses.py:generalized_iou",),
          "generalized IoU of two xyxy box sets (box prediction)",
          (f"{TL}::test_giou_and_l1_against_hand_computed_boxes", f"{TL}::test_giou_is_zero_on_degenerate_boxes"),
          {"generalized_iou": ["box_iou(a, b) gives (IoU, |A u B|); C is spanned by the smaller top-left and the",
                               "larger bottom-right corner of each pair (its area clamped at 0)."]}),
    Blank("region_view", ("model.py:XFM.region_view",),
          "X-VLM's region view: slot 0 = the mean of the box's patches, a mask of slot 0 + them",
          (f"{TM}::test_region_view_mean_over_box_patches",),
          {"XFM.region_view": ["v_r[n] is v[img_index[n]] with slot 0 replaced by the mean of its patches where",
                               "patch_mask[n] is True (a box with no patch: divide by at least 1); the mask is",
                               "[True, patch_mask[n]]."]}),
    Blank("block_mask", ("data.py:block_mask",),
          "BEiT's block-wise mask with exactly num_masking patches",
          (f"{TD}::test_block_mask_exact_and_fresh",),
          {"block_mask": [
              "BEiT's recipe: place rectangles until num_masking patches are masked. For one rectangle, up to 10",
              "attempts: area ~ uniform between min_patches and the patches still to mask (in whichever order),",
              "aspect ratio ar = exp(uniform(log min_aspect, log 1/min_aspect)), h = round(sqrt(area * ar)),",
              "w = round(sqrt(area / ar)); it must fit (1 <= h, w < grid) at a uniform random position, add at",
              "least one new patch and no more than are left. When no attempt succeeds, stop placing. Then fix",
              "the count with random single patches (add unmasked ones or remove masked ones). Draw everything",
              "from rng (a numpy Generator), so each call gives a fresh mask."]}),
]

# the fast path's versions of the blanks (lib/fast_losses.py): blanked too, graded by nothing
HIDDEN = tuple(f"lib/fast_losses.py:{name}" for name in (
    "itc_loss", "one_per_row", "sample_hard_negatives", "itm_inputs", "itm_ce", "mim_loss", "mim_objective"))
HIDDEN_WHAT = "hidden during the exercise (the fast path's version of the losses.py function of this name)"


# ---------------------------------------------------------------------------------------------------------
# Blanking a function with ast


def find_function(tree, qualname):
    """The FunctionDef of `qualname` ("f" or "Class.f") at the top level of a module's ast, or None."""
    body = tree.body
    *outer, name = qualname.split(".")
    for cls in outer:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def docstring_node(fn):
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def blank_source(src, qualname, what, todo=(), label=None):
    """src with the body of `qualname` replaced: the lines up to the end of its docstring (decorators, signature,
    docstring) are kept verbatim, the rest of the body becomes `# TODO(student): what.`, the todo lines as
    comments, and `raise NotImplementedError("TODO(student): label")`."""
    fn = find_function(ast.parse(src), qualname)
    if fn is None:
        raise ValueError(f"no function {qualname}")
    doc = docstring_node(fn)
    label = label or qualname
    keep = doc.end_lineno if doc else fn.body[0].lineno - 1                # last kept line (1-based)
    indent = " " * fn.body[0].col_offset
    stub = [f"{indent}# TODO(student): {what}."] + [f"{indent}#   {line}" for line in todo]
    stub.append(f'{indent}raise NotImplementedError("TODO(student): {label}")')
    lines = src.splitlines(keepends=True)
    lines[keep:fn.end_lineno] = [s + "\n" for s in stub]
    return "".join(lines)


def reference_code(src, qualname, filename):
    """The code object of `qualname` as written in src (decorators left out), compiled on its own."""
    fn = find_function(ast.parse(src), qualname)
    fn.decorator_list = []
    namespace = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), filename, "exec"), namespace)
    return namespace[fn.name].__code__


def split(spec):
    path, qualname = spec.split(":")
    return path, qualname


def blanked_functions():
    """[(path, qualname, what, todo lines, label of the raise)] of every blank and every hidden function."""
    out = []
    for b in BLANKS:
        for path, qualname in map(split, b.functions):
            label = f"{path[:-3]}.{qualname}"
            out.append((path, qualname, b.what, b.todo.get(qualname, ()), label))
    return out + [(*split(s), HIDDEN_WHAT, (), f"{split(s)[1]}, hidden") for s in HIDDEN]


def source_files():
    """The files of the repository as tools/mutate.py's repo_files lists them (git's); in a folder that is no git
    work tree (a scratch copy made by tools/mutate.py), every file but data/, runs/, out/ and caches."""
    try:
        return repo_files()
    except (subprocess.CalledProcessError, OSError):
        out = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in ("data", "runs", "out", ".git", "__pycache__", ".pytest_cache")]
            out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files
                    if not f.endswith((".pyc", ".pt", ".pth", ".safetensors"))]
        return sorted(out)


def write_copy(out):
    """Copy the repository to `out` (an empty or absent folder), then blank every function in it."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f"error: {out} exists and is not an empty folder")
    for f in source_files():
        os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(out, f))
    by_file = {}
    for path, *item in blanked_functions():
        by_file.setdefault(path, []).append(item)
    for path, items in by_file.items():
        target = os.path.join(out, path)
        src = open(target, encoding="utf-8").read()
        for qualname, what, todo, label in items:                          # each call parses the source again
            src = blank_source(src, qualname, what, todo, label)
        compile(src, target, "exec")                                       # the copy still imports
        with open(target, "w", encoding="utf-8") as f:
            f.write(src)


def grading_command(blank):
    return "python -m pytest -q " + " ".join(blank.tests)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--out", help="the folder to write the student copy to (empty or absent)")
    ap.add_argument("--list", action="store_true", help="print the blanks and the tests that grade each")
    args = ap.parse_args(argv)
    if args.list:
        for b in BLANKS:
            print(f"{b.id:<15} {', '.join(b.functions)}\n{'':<16}{b.what}\n{'':<16}{grading_command(b)}")
        print(f"{len(BLANKS)} blanks, {sum(len(b.functions) for b in BLANKS)} functions")
        return 0
    if not args.out:
        ap.error("give --out DIR or --list")
    write_copy(args.out)
    print(f"wrote the student copy to {args.out}: {len(BLANKS)} blanks "
          f"({sum(len(b.functions) for b in BLANKS)} functions); `python tools/student.py --list` there names "
          f"the tests that grade each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
