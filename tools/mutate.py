"""
The mutation check: a catalogue of planted bugs, each with the tests that must catch it. A test counts when a
planted bug makes it fail; this script plants each bug in turn and runs its tests.

For every bug it copies the repository's files (git's tracked and untracked-but-not-ignored files, without data/
and runs/) to a scratch folder, replaces the bug's `old` snippet (which must occur exactly once in its file) by
`new`, runs `pytest -x -q -p no:cacheprovider <its tests>` there (in a process forked from a server that has
imported torch and the other packages once) under a wall-clock limit and prints one
line: caught (the tests failed), SURVIVED (they passed), stale (`old` no longer occurs exactly once), timeout, or
error (pytest found no test or could not start). First it runs every selected test on the unmodified copy: a
test that already fails there would make every bug look caught. Exit status 0 only when every bug is caught.

    OMP_NUM_THREADS=1 python tools/mutate.py             # the whole catalogue
    OMP_NUM_THREADS=1 python tools/mutate.py --fast      # the quick subset (no process groups, no train.py runs)
    python tools/mutate.py --only stop_grad,itm_labels   # some bugs
    python tools/mutate.py --list                        # the catalogue: id, file, rule, tests
    python tools/mutate.py --jobs 2                      # bugs in parallel (each pytest still uses one thread)
    python tools/mutate.py --only itm_neg_is_positive -v # also show how the tests failed

Beware equivalent mutants (a change that does not change behaviour, e.g. a bias on attention keys: the softmax
is invariant to it); every bug below breaks its rule.
"""
import argparse
import gc
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("data/", "runs/", ".git")


@dataclass
class Bug:
    id: str
    file: str
    old: str
    new: str
    rule: str
    tests: str          # pytest arguments: node ids, or a file and -k EXPR
    fast: bool = True   # in the --fast subset (the tests take seconds: no process groups, no train.py run)


RL, FL, M, T, D, F, R = "losses.py", "lib/fast_losses.py", "model.py", "train.py", "data.py", "flava.py", "lib/retrieval.py"
TL, TM, TT, TD, TF = (f"tests/test_{n}.py" for n in ("losses", "model", "train", "data", "flava"))
TFP = "tests/test_fastpaths.py"
TO, TFT, TFS, TS = "tests/test_overfit.py", "tests/test_finetune.py", "tests/test_fsdp.py", "tests/test_static.py"
TSX, TSF = f"{TS}::test_xfm_fast_path_equals_the_reference", f"{TS}::test_flava_fast_path_equals_the_reference"
FM, TFM = "lib/formats.py", "tests/test_formats.py"
TE = "tests/test_evaluation.py"
SH, TSH = "lib/shards.py", "tests/test_shards.py"
P, TX = "lib/pretrained.py", "tests/test_export.py"
THF = "tests/test_hf_flava.py"
TOX = "tests/test_official_xfm.py"
THW = "tests/test_hostile_weights.py"
ST, TST = "tools/student.py", "tests/test_student.py"
TST_STATIC = "test_the_copy_keeps_signatures_and_docstrings_and_holds_no_reference_body"
TST_GRADING = "test_each_blank_fails_its_tests_and_passes_them_with_only_its_reference_back"
TW = "tests/test_walkthrough.py"
TRF = "tests/test_runfolder.py"
CR, TCR = "tools/class_results.py", "tests/test_class_results.py"
THR = "tests/test_hostile_readers.py"
THS, THS_LIE = "tests/test_hostile_shards.py", "test_an_index_that_lies_is_one_line_naming_it_and_the_command"
THS_OLD = "test_an_index_without_a_digest_is_checked_and_read_and_text_counts_are_bounded"
THS_DUP = "test_a_duplicate_key_is_named_counted_once_and_the_first_members_kept"
THS_ONCE = "test_an_unreadable_image_counts_once_across_epochs_workers_and_a_resume"
THS_SHARD = "test_a_bad_shard_member_counts_once_over_epochs_in_a_worker"
THS_PACK = "test_pack_reads_only_image_files_under_the_data_folder"
# BadInput.once: counts a (kind, where) the first time only
ONCE = "        if (kind, where) not in self._records:\n            self._records.add((kind, where))\n"
FT, TPC = "finetune.py", "tests/test_precheck.py"
TK, TTN = "lib/tokenizer.py", "tests/test_text_norm.py"
TDC, TDC_EQ = "tests/test_dalle_codebook.py", "test_logits_and_codes_equal_transformers"
TDC_PIX = "test_input_is_what_the_hugging_face_processor_makes"

# curves._band_verdict: when a loss out of its band is BAD
BAND_BAD = "if (i + 1 < len(sides) and sides[i + 1][3] == side) or i == len(sides) - 1:"
CATALOGUE = [
    # ==== the objectives, twice: the reference (losses.py) and the fast path (lib/fast_losses.py). The reference's
    # bugs are caught by the formula and gradient tests; the fast path's by its equality with the reference
    # (tests/test_static.py), and by the fast path's own tests where the equality batch cannot show a rule.
    # --- X-FM idea 1: the stop-gradient (fusion_input serves both paths)
    Bug("stop_grad", RL, "return t.detach() if stop_grad else t", "return t",
        "the fusion encoder reads sg(t): ITM/IMLM/BBP never reach the language encoder",
        f"{TL}::test_gradient_flow_with_stop_gradient"),
    Bug("bbox_stop_grad", RL, 'h = model.fuse(fusion_input(t, stop_grad), b["att"], v[b["img_index"]])',
        'h = model.fuse(t, b["att"], v[b["img_index"]])',
        "BBP reads the detached caption states too", f"{TL}::test_gradient_flow_with_stop_gradient"),
    Bug("fast_bbox_stop_grad", FL, 'groups.append((fusion_input(t, stop_grad), b["att"], box_index, None))',
        'groups.append((t, b["att"], box_index, None))', "fast path: BBP reads the detached caption states too", TSX),
    Bug("fast_itm_stop_grad", FL, 'itm_inputs(fusion_input(t, stop_grad), b["att"]', 'itm_inputs(t, b["att"]',
        "fast path: ITM's rows read sg(t)", TSX),
    # --- the walkthrough's printout: the gradient table and the MIM target check (walkthrough.py)
    Bug("walk_stop_grad_inverted", RL, "return t.detach() if stop_grad else t", "return t if stop_grad else t.detach()",
        "the detach is on in pre-training and off in the ablation, not the other way round", TW),
    Bug("walk_itm_stop_grad", RL, 'itm_loss(model, fusion_input(t, stop_grad), b["att"]', 'itm_loss(model, t, b["att"]',
        "ITM's rows (positives and both negatives) read sg(t): ITM never reaches the language encoder", TW),
    Bug("walk_mim_image_target_masked", RL, "        v = model.encode_image(image)                                      #",
        "        v = model.encode_image(image, mim_mask)  #",
        "an image batch's MIM target is the encoder's output on the UNMASKED image", TW),
    Bug("walk_mim_pair_target_masked", RL, 'out["mim"] = mim_objective(model, b["image"], b["mim_mask"], v, stats)',
        'out["mim"] = mim_objective(model, b["image"], b["mim_mask"], model.encode_image(b["image"], b["mim_mask"]), stats)',
        "a pair's MIM target is the unmasked output that ITC/ITM/IMLM use, not the masked view", TW),
    # --- X-FM idea 2: the MIM target and the MIM loss
    Bug("mim_target_grad", RL, "target = v.detach()", "target = v",
        "the MIM target is the detached unmasked output (mim_loss refuses a target with a graph)",
        f"{TL}::test_every_loss_is_present_and_finite"),
    Bug("mim_assert_off", RL, 'assert not target.requires_grad, "the MIM target must be detached"', "pass",
        "mim_loss refuses a target with a graph", f"{TL}::test_mim_target_carries_no_gradient"),
    Bug("mim_unmasked_view", RL, "v_hat = model.encode_image(image, mim_mask)                            #",
        "v_hat = model.encode_image(image)  #",
        "the MIM prediction comes from the block-masked view", f"{TL}::test_mim_target_carries_no_gradient"),
    Bug("mim_unmasked_patches", RL, "patch_term = err[:, 1:][mim_mask].mean()", "patch_term = err[:, 1:][~mim_mask].mean()",
        "MIM counts the masked patches only", f"{TL}::test_mim_loss_formula_and_unmasked_patches_do_not_count"),
    Bug("mim_no_slot0", RL, "return patch_term + slot0_term", "return patch_term",
        "MIM also regresses slot 0", f"{TL}::test_mim_loss_formula_and_unmasked_patches_do_not_count"),
    Bug("fast_mim_target_grad", FL, "target = v.detach()", "target = v", "fast path: the MIM target is detached", TSX),
    Bug("fast_mim_image_target_masked", FL, "with torch.no_grad():\n            v = model.encode_image(image)\n",
        "with torch.no_grad():\n            v = model.encode_image(image, mim_mask)\n",
        "fast path: an image batch's MIM target is the encoder's output on the UNMASKED image", TSX),
    Bug("fast_mim_pair_target_masked", FL, 'out["mim"] = mim_objective(model, b["image"], b["mim_mask"], v, stats, v_hat)',
        'out["mim"] = mim_objective(model, b["image"], b["mim_mask"], v_hat, stats, v_hat)',
        "fast path: a pair's MIM target is the unmasked output", TSX),
    Bug("fast_mim_unmasked_view", FL, "v_hat = model.encode_image(image, mim_mask)                        #",
        "v_hat = model.encode_image(image)  #", "fast path: the MIM prediction comes from the block-masked view", TSX),
    Bug("fast_mim_unmasked_patches", FL, "return weighted_mean(err[:, 1:], mim_mask) + err[:, 0].mean()",
        "return weighted_mean(err[:, 1:], ~mim_mask) + err[:, 0].mean()", "fast path: MIM counts the masked patches only",
        TSX),
    Bug("fast_mim_no_slot0", FL, "return weighted_mean(err[:, 1:], mim_mask) + err[:, 0].mean()",
        "return weighted_mean(err[:, 1:], mim_mask)", "fast path: MIM also regresses slot 0", TSX),
    Bug("mim_pair_unmasked_view", FL, "torch.cat([no_mask, mim_mask])).chunk(2)", "torch.cat([no_mask, no_mask])).chunk(2)",
        "a pair's MIM prediction comes from the block-masked view (the 2B-row vision call's second half)",
        f"{TFP}::test_one_call_for_both_views_and_for_every_fusion_objective"),
    Bug("one_call_views_swapped", FL, "torch.cat([no_mask, mim_mask])).chunk(2)", "torch.cat([mim_mask, no_mask])).chunk(2)",
        "the 2B-row vision call: first half the unmasked image (ITC/ITM/IMLM, MIM target), second half the masked view",
        f"{TFP}::test_one_call_for_both_views_and_for_every_fusion_objective"),
    Bug("one_call_rows_misaligned", FL, "t, att, index = (torch.cat([g[i] for g in groups]) for i in range(3))",
        "t, att, index = (torch.cat([g[i] for g in (groups if i < 2 else groups[::-1])]) for i in range(3))",
        "in the shared fusion call every row keeps its own image",
        f"{TFP}::test_one_call_for_both_views_and_for_every_fusion_objective"),
    # --- the fusion encoder's keys and values, once per image token (fast_losses.fuse_groups, model.Attention)
    Bug("kv_per_row", FL, "h = model.fuse(t, att, pool, v_mask, image_index=index)", "h = model.fuse(t, att, pool[index], v_mask)",
        "the cross-attention projects each pooled image token once, not once per row that attends to it",
        f"{TFP}::test_keys_and_values_once_per_image_token"),
    Bug("kv_token_stride", FL, "return rows[:, None] * S + torch.arange(S, device=rows.device)",
        "return rows[:, None] + torch.arange(S, device=rows.device)",
        "a row's pooled tokens are its own image's S tokens", TSX),
    Bug("kv_region_slot0", FL, "v_index = torch.cat([slot0, full[:, 1:]], dim=1)", "v_index = full",
        "a region caption's slot 0 in the pool is the mean over its box, not the image's own slot 0", TSX),
    Bug("one_call_fusion_mask", FL, "torch.ones(g[2].shape, dtype=torch.bool, device=g[2].device)\n",
        "torch.zeros(g[2].shape, dtype=torch.bool, device=g[2].device)\n",
        "a group without a key mask sees every key in the shared fusion call",
        f"{TFP}::test_one_call_for_both_views_and_for_every_fusion_objective"),
    # --- IMLM
    Bug("imlm_reads_unmasked", RL, 't_m = model.encode_text(b["mlm_ids"], b["att"])',
        't_m = model.encode_text(b["ids"], b["att"])',
        "IMLM reads the masked caption, never the words it predicts", f"{TL}::test_imlm_reads_only_the_masked_caption"),
    Bug("fast_imlm_reads_unmasked", FL, 't_m = model.encode_text(b["mlm_ids"], b["att"])',
        't_m = model.encode_text(b["ids"], b["att"])', "fast path: IMLM reads the masked caption", TSX),
    Bug("mlm_slots_bound", FL, "T if slots is None else min(T, slots))", "T if slots is None else 1)",
        "fast path: mlm_loss gives each row mlm_slots slots (every masked position finds one)", TSX),
    # --- ITC: gather, backward (shared), labels, mean, temperature, queries
    Bug("itc_gather_no_grad", RL, "all_v, all_t = gather_with_grad(f_v, sizes), gather_with_grad(f_t, sizes)",
        "all_v, all_t = gather_no_grad(f_v, sizes), gather_no_grad(f_t, sizes)",
        "ITC's all-gather keeps autograd", f'{TL} -k "global_itc and reference"', fast=False),
    Bug("itc_backward_no_sum", RL, "        dist.all_reduce(grad)\n",
        "        pass\n", "ITC's gather backward sums every rank's gradient (both paths)", f"{TL} -k global_itc",
        fast=False),
    Bug("itc_label_offset", RL, "y = torch.arange(B, device=f_v.device) + sum(sizes[:_rank()])",
        "y = torch.arange(B, device=f_v.device)", "ITC's positives sit at this rank's offset in the global batch",
        f'{TL} -k "global_itc and reference"', fast=False),
    Bug("itc_local_mean", RL, "return 0.5 * row_loss.sum() * len(sizes) / max(sum(n_queries), 1)",
        "return 0.5 * row_loss.sum() / max(len(row_loss), 1)", "ITC averages over all ranks' rows, even unequal counts",
        f'{TL} -k "global_itc and reference"', fast=False),
    Bug("itc_temp_times", RL, "s_i2t = f_v @ all_t.t() / temp", "s_i2t = f_v @ all_t.t() * temp",
        "ITC divides the similarities by the temperature", f"{TL}::test_itc_formula_symmetry_and_minimum"),
    Bug("itc_queries_ignored", RL, "        row_loss = row_loss[queries]\n", "        pass\n",
        "itc_loss(queries=...) averages over the query rows only",
        f"{TF}::test_gc_excludes_negatives_as_queries_but_keeps_them_as_keys"),
    Bug("fast_itc_gather_no_grad", FL, "all_v, all_t = gather_fixed(f_v), gather_fixed(f_t)",
        "all_v, all_t = gather_fixed_no_grad(f_v), gather_fixed_no_grad(f_t)", "fast path: ITC's all-gather keeps autograd",
        f'{TL} -k "global_itc and fast"', fast=False),
    Bug("fast_itc_label_offset", FL, "y = torch.arange(B, device=f_v.device) + B * _rank()",
        "y = torch.arange(B, device=f_v.device)", "fast path: ITC's positives sit at this rank's offset",
        f'{TL} -k "global_itc and fast"', fast=False),
    Bug("fast_itc_local_mean", FL, "return 0.5 * row_loss.sum() * world / global_sum(q.sum()).clamp(min=1)",
        "return 0.5 * row_loss.sum() / q.sum().clamp(min=1)", "fast path: ITC averages over all ranks' rows",
        f'{TL} -k "global_itc and fast"', fast=False),
    Bug("fast_itc_temp_times", FL, "        return a.float() @ b.float().t() / temp", "        return a.float() @ b.float().t() * temp",
        "fast path: ITC divides the similarities by the temperature", TSX),
    Bug("fast_itc_queries_ignored", FL,
        "q = torch.ones(B, device=f_v.device) if queries is None else queries.float()", "q = torch.ones(B, device=f_v.device)",
        "fast path: itc_loss(queries=...) averages over the query rows only", TSF),
    Bug("empty_slot_is_key", FL, "queries=filled, keys=filled)", "queries=filled)", "fast path: an empty caption slot is no ITC key",
        TSX),
    Bug("empty_slots_kept", RL, '    if "filled" not in b:  ', '    if True:  ',
        "the reference drops a region batch's empty caption slots before any loss reads it", TSX),
    # --- hard negatives and ITM
    Bug("hard_neg_duplicates", RL, "same = img_id[:, None] == img_id[None, :]",
        "same = torch.eye(len(img_id), dtype=torch.bool, device=img_id.device)",
        "a hard negative never shares the image id (duplicates of the image included)",
        f"{TL}::test_hard_negatives_never_pick_the_positive_or_a_duplicate"),
    Bug("hard_neg_uniform", RL, "w = logits.float().softmax(dim=1) + 1e-5", "w = torch.ones_like(logits.float())",
        "hard negatives are drawn by ITC similarity", f"{TL}::test_hard_negatives_follow_the_itc_similarity"),
    Bug("itm_labels_inverted", RL, "labels[:B] = 1", "labels[B:] = 1", "ITM label 1 = the matched pair, 0 = a hard negative",
        f"{TL}::test_itm_labels_one_for_pairs_zero_for_negatives"),
    Bug("itm_neg_is_positive", RL, "v_all = torch.cat([v, v[neg_img[ti]], v[ii]])", "v_all = torch.cat([v, v[ti], v[ii]])",
        "a negative pair shows the text with ANOTHER image", f"{TO} -k xfm_pair"),
    Bug("fast_hard_neg_duplicates", FL, "never = img_id[:, None] == img_id[None, :]",
        "never = torch.eye(len(img_id), dtype=torch.bool, device=img_id.device)",
        "fast path: a hard negative never shares the image id",
        f"{TL}::test_fast_hard_negatives_skip_empty_slots_and_flag_rows_without_one"),
    Bug("fast_hard_neg_uniform", FL, "return one_per_row((logits.float().softmax(dim=1) + 1e-5).masked_fill(never, 0.0))",
        "return one_per_row(torch.ones_like(logits.float()).masked_fill(never, 0.0))",
        "fast path: hard negatives are drawn by ITC similarity", TSX),
    Bug("race_uniform", FL, "return (w / race).argmax(dim=1), w.sum(1) > 0",
        "return ((w > 0).float() / race).argmax(dim=1), w.sum(1) > 0",
        "fast path: one_per_row draws what torch.multinomial draws (the exponential race), not uniformly",
        f"{TL}::test_fast_draw_is_torch_multinomial_on_the_same_random_stream"),
    Bug("fast_itm_labels_inverted", FL, "labels = (torch.arange(3 * B, device=cls.device) < B).long()",
        "labels = (torch.arange(3 * B, device=cls.device) >= B).long()", "fast path: ITM label 1 = the matched pair", TSX),
    Bug("fast_itm_neg_is_positive", FL, "v_all = torch.cat([v, v[neg_img], v])", "v_all = torch.cat([v, v, v])",
        "fast path: a negative pair shows the text with ANOTHER image", TSX),
    Bug("empty_slot_itm_positive", FL, "torch.ones_like(has_neg_img) if filled is None else filled", "torch.ones_like(has_neg_img)",
        "fast path: an empty caption slot is no ITM positive", TSX),
    # --- box prediction
    Bug("bbox_l1_mean", RL, "l1 = (p - t).abs().sum() / n_reg", "l1 = (p - t).abs().mean(-1).sum() / n_reg",
        "L1 sums the 4 coordinates and averages over region captions",
        f"{TL}::test_giou_and_l1_against_hand_computed_boxes"),
    Bug("giou_no_enclosing", RL, "return iou - (area_c - union) / area_c", "return iou",
        "GIoU subtracts the enclosing box's empty share (both paths)", f"{TL}::test_giou_and_l1_against_hand_computed_boxes"),
    Bug("giou_degenerate", RL, "giou = (1 - generalized_iou(pb, tb)).sum() / n_reg if not degenerate else l1 * 0.0",
        "giou = (1 - generalized_iou(pb, tb)).sum() / n_reg", "the GIoU term is 0 when a box is degenerate",
        f"{TL}::test_giou_is_zero_on_degenerate_boxes"),
    Bug("bbox_whole_image", RL, "p, t = pred[is_region].float(), target[is_region].float()",
        "p, t = pred.float(), target.float()", "box losses count region captions only",
        f"{TL}::test_giou_and_l1_against_hand_computed_boxes"),
    Bug("bbox_region_view", RL, 'h = model.fuse(fusion_input(t, stop_grad), b["att"], v[b["img_index"]])',
        'h = model.fuse(fusion_input(t, stop_grad), b["att"], v_r, v_r_mask)', "BBP reads the full image, not the region view",
        f"{TL}::test_bbox_loss_sees_only_region_captions_and_the_full_image"),
    Bug("bbox_batch_mean", RL, "pred = model.bbox_head(h[:, 0]).sigmoid()",
        "pred = model.bbox_head(h[:, 0].mean(0)).sigmoid().expand(len(h), 4)",
        "each caption's box comes from its own fusion [CLS]", f"{TO} -k xfm_region"),
    Bug("fast_bbox_l1_mean", FL, "l1 = ((p - t).abs().sum(-1) * w).sum() / n_reg", "l1 = ((p - t).abs().mean(-1) * w).sum() / n_reg",
        "fast path: L1 sums the 4 coordinates", f"{TL}::test_fast_bbox_loss_on_hand_computed_and_degenerate_boxes"),
    Bug("fast_giou_degenerate", FL, "off = (degenerate | ~is_region)[:, None]", "off = (~is_region)[:, None]",
        "fast path: the GIoU term is 0 when a box is degenerate", f"{TL}::test_fast_bbox_loss_on_hand_computed_and_degenerate_boxes"),
    Bug("giou_nan_guard", FL,
        "torch.where(off, unit, pb),\n                                torch.where(off, unit, tb)",
        "pb,\n                                tb",
        "fast path: GIoU of a degenerate box is computed on unit boxes, so no NaN reaches the sum",
        f"{TL}::test_fast_bbox_loss_on_hand_computed_and_degenerate_boxes"),
    Bug("fast_bbox_whole_image", FL, "    w = is_region.float()\n", "    w = torch.ones_like(is_region, dtype=torch.float)\n",
        "fast path: box losses count region captions only", f"{TL}::test_fast_bbox_loss_on_hand_computed_and_degenerate_boxes"),
    Bug("fast_bbox_region_view", FL, 'stop_grad, "_region", box_index=full)', 'stop_grad, "_region", box_index=v_index)',
        "fast path: BBP reads the full image, not the region view", TSX),
    Bug("fast_bbox_batch_mean", FL, "pred = model.bbox_head(h[:, 0]).sigmoid()",
        "pred = model.bbox_head(h[:, 0].mean(0)).sigmoid().expand(len(h), 4)",
        "fast path: each caption's box comes from its own fusion [CLS]", TSX),
    # --- the walkthrough's printout: the gradient table and the MIM target check (walkthrough.py)
    Bug("walk_batch_tensors_only", "walkthrough.py", "return {kind: next(stream) for kind, stream in found.items()}",
        "return {kind: {k: v for k, v in next(s).items() if torch.is_tensor(v)} for kind, s in found.items()}",
        "the walkthrough's batch is data.py's, every key of it (mlm_slots, mim_count: ints)",
        f"{TW}::test_printout_equals_the_stored_one"),
    Bug("walk_guided_step_includes_mim", "walkthrough.py", "sum(out[name] for name in VL_STEP).backward()",
        "sum(out.values()).backward()",
        "section 12's step takes the vision-language losses alone: no MIM gradient moves the target",
        f"{TW}::test_the_move_comes_from_the_vl_losses_alone"),
    Bug("walk_guided_target_masked", "walkthrough.py", "vl = model.encode_image(images)",
        'vl = model.encode_image(images, batch["image"]["mim_mask"])',
        "section 12 measures the MIM target: the encoder's output on the UNMASKED images",
        f"{TW}::test_the_measured_target_is_the_unmasked_output_of_the_untouched_encoder"),
    Bug("walk_guided_step_misses_vision", "walkthrough.py", "opt = torch.optim.AdamW(model.parameters(), lr=lr)",
        'opt = torch.optim.AdamW([q for n, q in model.named_parameters() if not n.startswith("vision.")], lr=lr)',
        "section 12's vision-language step updates the vision encoder, the one that makes the MIM target",
        f"{TW}::test_a_vl_only_step_moves_the_vl_target_and_not_the_pixel_target"),
    Bug("setup_no_mps_warning", "tools/check_setup.py", 'if device_type == "mps":', 'if device_type == "mps-off":',
        "the setup check warns that --device=auto picks MPS while the reference bands are CPU fp32",
        "tests/test_check_setup.py::test_versions_and_device_warnings"),
    Bug("reference_reuse_any_seed", "tools/curves.py", '(*MATCH_KEYS, "seed")', 'MATCH_KEYS',
        "`curves.py make --reuse` reads a finished run only when its seed is the reference's",
        "tests/test_learning.py::test_make_reuses_only_a_finished_run_of_the_same_command_and_seed"),
    Bug("reference_reuse_unfinished", "tools/curves.py", "return final is not None and all(", "return all(",
        "`curves.py make --reuse` never reads a run that has not finished",
        "tests/test_learning.py::test_make_reuses_only_a_finished_run_of_the_same_command_and_seed"),
    Bug("region_chance_counts_empty_slots", "tools/curves.py", 'math.log(int(b["filled"].sum()) * world)',
        'math.log(len(b["ids"]) * world)', "region ITC's chance level is ln of the filled caption slots per batch",
        "tests/test_learning.py::test_region_chance_is_ln_of_the_filled_caption_slots"),
    Bug("toy_world_built_in_place", "lib/toyworld.py", 'tmp = f"{os.path.normpath(data_dir)}.building-{os.getpid()}"',
        "tmp = data_dir", "the toy world is built in a private folder and renamed into place whole",
        "tests/test_data.py::test_the_toy_world_appears_whole_or_not_at_all"),
    Bug("toy_world_leftover_copy", "lib/toyworld.py", "                raise\n            shutil.rmtree(tmp)",
        "                raise", "a run that lost the race to build the toy world removes its own copy",
        "tests/test_data.py::test_the_toy_world_appears_whole_or_not_at_all"),
    Bug("tokenizer_on_no_text", "lib/tokenizer.py", "    if not texts:", "    if False:",
        "no tokenizer is trained (and saved for reuse) on a folder without texts",
        "tests/test_data.py::test_get_tokenizer_refuses_a_folder_without_texts"),
    # --- run folders and resume (lib/runlog.py, train.py): nothing of a run is lost, a resumed run stays itself
    Bug("fresh_run_clobbers", "lib/runlog.py", "if found and not overwrite:", "if False:",
        "a fresh run into a folder that holds a run is refused (without --overwrite)",
        f"{TRF}::test_claim_fresh_refuses_a_run_and_overwrite_deletes_only_its_files"),
    Bug("overwrite_keeps_old_files", "lib/runlog.py", "        os.remove(os.path.join(out_dir, name))", "        pass",
        "--overwrite deletes the old run's files (kept checkpoints included), so nothing stale mixes in",
        f"{TRF}::test_claim_fresh_refuses_a_run_and_overwrite_deletes_only_its_files"),
    Bug("no_run_lock", "lib/runlog.py", "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
        "one process at a time writes a run folder (its lock)",
        f"{TRF}::test_run_lock_keeps_a_second_claimant_out_until_released"),
    Bug("lock_left_behind", "lib/runlog.py", "os.remove(self.path)  # removed while still locked", "pass  #",
        "a run that ends removes its .lock, so a .lock file is always a dead holder's",
        f"{TRF}::test_run_lock_keeps_a_second_claimant_out_until_released"),
    Bug("resume_takes_any_flag", "lib/runlog.py", "if k not in may_change and k in saved and v != saved[k]]",
        "if False]",
        "a resumed run refuses a flag that contradicts its own config",
        f"{TRF}::test_check_resume_refuses_what_contradicts_the_run"),
    Bug("resume_text_len_unchecked", "lib/runlog.py", 'if longest > ckpt["model_config"]["max_text_len"]:', "if False:",
        "--text_len/--caption_len beyond the model's position table is refused at start-up",
        f"{TRF}::test_check_resume_refuses_what_contradicts_the_run"),
    Bug("resume_tokenizer_from_folder", "lib/runlog.py", 'if "tokenizer" in ckpt:', "if False:",
        "a resumed run reads its tokenizer from its checkpoint (so --out_dir=NEW carries it over)",
        f"{TRF}::test_a_resume_into_a_new_folder_takes_the_checkpoints_tokenizer_and_a_free_folder"),
    Bug("resume_new_folder_clobbers", "lib/runlog.py", "            claim_fresh(cfg.out_dir, cfg.overwrite)\n",
        "            pass\n", "a run resumed into another folder needs that folder free, like a fresh run",
        f"{TRF}::test_a_resume_into_a_new_folder_takes_the_checkpoints_tokenizer_and_a_free_folder"),
    Bug("torn_log_kept", "lib/runlog.py", 'if not raw or raw.endswith(b"\\n"):', "if True:",
        "a resumed run cuts a torn last record off metrics.jsonl (else the next record is glued onto it)",
        f"{TRF}::test_repair_metrics_cuts_only_a_torn_last_record"),
    Bug("strict_traceback", "lib/cli.py", "            raise formats.strict_exit(e) from None", "            raise",
        "a bad record under --strict stops the run with one line, not a traceback",
        f"{TT}::test_bad_input_is_skipped_counted_and_reported"),
    Bug("train_strict_unguarded", T, "@cli.strict_stops\ndef main", "def main",
        "train.py's main ends a --strict run at a bad record with one line (cli.strict_stops)",
        f"{TT}::test_bad_input_is_skipped_counted_and_reported"),
    Bug("finetune_strict_traceback", "finetune.py", "@cli.strict_stops\ndef main", "def main",
        "a bad record under finetune.py --strict stops with one line, not a traceback",
        f"{TFT}::test_strict_stops_at_a_bad_record_with_one_line", fast=False),
    Bug("tokenizer_reused_from_run_dir", "lib/tokenizer.py", '    path = os.path.join(run_dir, "tokenizer.json")\n    texts',
        '    path = os.path.join(run_dir, "tokenizer.json")\n    if os.path.isfile(path):\n'
        '        return Tokenizer.load(path)\n    texts',
        "a fresh run never reuses a tokenizer.json it finds in its folder",
        "tests/test_data.py::test_get_tokenizer_trains_never_reuses_a_file_it_finds_and_loads_a_given_one"),
    Bug("band_single_excursion_bad", "tools/curves.py", BAND_BAD,
        "if True:", "a loss out of its band at one step and back in is reported, not called BAD",
        "tests/test_learning.py::test_health_check_calls_bad_only_a_lasting_excursion"),
    Bug("band_last_step_ignored", "tools/curves.py", BAND_BAD,
        "if i + 1 < len(sides) and sides[i + 1][3] == side:", "a loss out of its band at the last step is BAD",
        "tests/test_learning.py::test_health_check_calls_bad_only_a_lasting_excursion"),
    # --- X-FM idea 2: the MIM target and its masks
    Bug("mask_token_swapped", M,
        "x = torch.where(mim_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)\n"
        "        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)",
        "x = torch.where(mim_mask.unsqueeze(-1), x, self.mask_token.to(x.dtype))\n"
        "        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)",
        "the mask token replaces exactly the masked patches", f"{TM}::test_mask_token_replaces_exactly_the_masked_patches"),
    # --- the vision output and the fusion input
    Bug("vision_slot0_cls", M,
        "return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)  # (B, 1+P, D)",
        "return torch.cat([self.fc_norm(x[:, :1]), patches], dim=1)",
        "vision slot 0 is the mean of the normed patches, not the ViT's CLS output",
        f"{TM}::test_vision_output_is_mean_slot_plus_normed_patches"),
    Bug("fusion_own_embedding", M,
        "self.blocks = nn.ModuleList([Block(cfg, cross=True) for _ in range(cfg.fusion_layers)])\n\n"
        "    def forward(self, t, att, image, image_mask=None, image_index=None):\n        x, mask = t, additive_mask(att)",
        "self.blocks = nn.ModuleList([Block(cfg, cross=True) for _ in range(cfg.fusion_layers)])\n"
        "        self.pos_embed = nn.Embedding(cfg.max_text_len, cfg.width)\n"
        "        self.norm = nn.LayerNorm(cfg.width)\n\n"
        "    def forward(self, t, att, image, image_mask=None, image_index=None):\n"
        "        x, mask = self.norm(t + self.pos_embed(torch.arange(t.shape[1], device=t.device))), additive_mask(att)",
        "the fusion encoder's input is the language encoder's states as they are (no embedding layer of its own)",
        f"{TM}::test_fusion_encoder_reads_the_language_states_as_they_are"),
    Bug("fusion_region_mask", M, "self.cross_attn(x, kv=image, mask=image_mask, index=image_index)",
        "self.cross_attn(x, kv=image, index=image_index)",
        "cross-attention sees only the image keys its mask allows (region view)",
        f"{TM}::test_fusion_cross_attends_text_to_image_and_returns_text_states"),
    Bug("text_pad_mask", M, "            x = blk(x, mask)\n        return x\n\n\nclass VisionEncoder",
        "            x = blk(x)\n        return x\n\n\nclass VisionEncoder", "the language encoder never attends to padding",
        f"{TM}::test_padding_does_not_change_real_positions"),
    Bug("region_slot0", M,
        "slot0 = (v_n[:, 1:] * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)",
        "slot0 = v_n[:, :1]", "a region caption's slot 0 is the mean of the patches in its box",
        f"{TM}::test_region_view_mean_over_box_patches"),
    # --- ITC: gather, backward, labels, mean, temperature
    Bug("temp_clamp", M, "self.temp.clamp_(0.001, 0.5)", "self.temp.clamp_(0.001, 5.0)",
        "the temperature stays in [0.001, 0.5]", f"{TL}::test_temperature_is_clamped"),
    Bug("itc_batch_mean_image", M, "f_v = F.normalize(self.vision_proj(v[:, 0]), dim=-1)",
        "f_v = F.normalize(self.vision_proj(v[:, 0].mean(0, keepdim=True).expand_as(v[:, 0])), dim=-1)",
        "each image's ITC feature comes from its own slot 0", f"{TO} -k xfm_pair"),
    # --- ITM: hard negatives and labels
    # --- box prediction
    # --- positions and BEiT's attention
    Bug("roberta_pos_offset", M, "pos = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id",
        "pos = torch.cumsum(not_pad, dim=1) * not_pad",
        "RoBERTa: token i gets position pad_id + 1 + i, padding pad_id",
        f"{TM}::test_roberta_position_ids_start_after_padding"),
    Bug("beit_no_v_bias", M,
        "torch.cat([self.q_bias, self.k_bias, self.v_bias])", "torch.cat([self.q_bias, self.k_bias, self.k_bias])",
        "BEiT's qkv has biases on q and v", f"{TM}::test_beit_attention_has_q_and_v_biases_only"),
    Bug("beit_qv_swapped", M,
        "torch.cat([self.q_bias, self.k_bias, self.v_bias])", "torch.cat([self.v_bias, self.k_bias, self.q_bias])",
        "BEiT's q bias goes to q, its v bias to v", f"{TM}::test_beit_attention_has_q_and_v_biases_only"),
    Bug("relpos_sign", M, "rel = coords[:, :, None] - coords[:, None, :]",
        "rel = coords[:, None, :] - coords[:, :, None]",
        "the relative position index is query minus key", f"{TM}::test_relative_position_bias_table_and_index"),
    # --- optimisation: parameter groups, the update schedule, clipping, accumulation
    Bug("new_params", M, 'NEW_PARAMS = ("text_proj", "vision_proj", "temp", "itm_head", "bbox_head")',
        'NEW_PARAMS = ("temp", "itm_head")', "the projections, the temperature and the ITM and box heads train at 2x lr",
        f"{TT}::test_param_groups_partition_and_lr_mult"),
    Bug("no_decay_tokens", T, "no_decay = p.ndim < 2 or name.endswith(no_decay_names)", "no_decay = p.ndim < 2",
        "no weight decay on the CLS and mask tokens", f"{TT}::test_param_groups_partition_and_lr_mult"),
    Bug("updates_reversed", T, 'XFM_UPDATES = [("text",), ("region", "image"), ("pair",)]',
        'XFM_UPDATES = [("pair",), ("region", "image"), ("text",)]',
        "three updates in order: text | regions + images | pairs", f"{TT}::test_three_updates_in_order_each_clipped",
        fast=False),
    Bug("updates_regrouped", T, 'XFM_UPDATES = [("text",), ("region", "image"), ("pair",)]',
        'XFM_UPDATES = [("text",), ("region",), ("image", "pair")]',
        "regions and images share the second update", f"{TT}::test_three_updates_in_order_each_clipped", fast=False),
    Bug("clip_off", "lib/runtime.py", "grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)",
        'grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))',
        "optimizer_step clips the gradient norm to clip", f"{TT}::test_optimizer_step_clips_to_the_given_norm"),
    Bug("grad_ckpt_rng", "lib/runtime.py", "block.forward, use_reentrant=False)",
        "block.forward, use_reentrant=False, preserve_rng_state=False)",
        "--grad_ckpt replays dropout and drop path exactly", f"{TT} -k checkpointing"),
    Bug("grad_ckpt_off", "lib/runtime.py", "        block.forward = functools.partial(", "        block.fwd = functools.partial(",
        "--grad_ckpt recomputes each block in the backward pass", f"{TT} -k checkpointing"),
    Bug("clip_off_loop", T, "grad_norm = runtime.optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)",
        'grad_norm = runtime.optimizer_step(optimizer, scaler, model.parameters(), float("inf"))',
        "every update is clipped at --grad_clip", f"{TT}::test_three_updates_in_order_each_clipped", fast=False),
    Bug("accum_sum", T, "loss = sum(losses.values()) / accum", "loss = sum(losses.values())",
        "accumulated gradients are the mean over the global batch",
        f"{TT}::test_ddp_with_accumulation_equals_one_process_full_batch", fast=False),
    # --- zero-shot retrieval: top k, -100, ITM re-ranking, ties
    Bug("retrieval_no_itm", R, "out.scatter_(1, top, itm)", "out.scatter_(1, top, sim.gather(1, top))",
        "the top k are re-scored by ITM", f"{TFT}::test_recall_at_k_by_hand"),
    Bug("retrieval_sum", R, "out.scatter_(1, top, itm)", "out.scatter_(1, top, itm + sim.gather(1, top))",
        "the re-ranked score is the ITM logit alone", f"{TFT}::test_recall_at_k_by_hand"),
    Bug("retrieval_keep_itc", R, "out = torch.full_like(sim, -100.0)", "out = sim.clone()",
        "every pair outside the top k scores -100", f"{TFT}::test_recall_at_k_by_hand"),
    Bug("retrieval_bottom_k", R, "top = sim.topk(k, dim=1).indices", "top = sim.topk(k, dim=1, largest=False).indices",
        "ITM re-ranks the k best by ITC", f"{TFT}::test_recall_at_k_by_hand"),
    Bug("retrieval_ties", R, "return int((scores[wrong] >= scores[right].max()).sum())",
        "return int((scores[wrong] > scores[right].max()).sum())",
        "ties count against the right candidate", f"{TFT}::test_recall_at_k_by_hand"),
    # --- evaluation split over the ranks (runtime.share / gather_shares) and the batched ITM re-ranking
    Bug("rerank_misaligned", R, "qq, cand = q.repeat_interleave(k), top[q].flatten()",
        "qq, cand = q.repeat(k), top[q].flatten()",
        "a batched ITM call pairs each query with its own k candidates",
        f"{TE}::test_batched_rerank_equals_one_query_at_a_time"),
    Bug("eval_share_dropped", "lib/runtime.py", "for p, s in zip(parts, sizes)]).to(x.device)",
        "for p, s in zip(parts[:-1], sizes)]).to(x.device)",
        "the gather keeps every rank's share (the last one too)", f"{TE} -k two_processes", fast=False),
    Bug("eval_share_duplicated", "lib/runtime.py", "return range(min(n, rank * per), min(n, (rank + 1) * per))",
        "return range(0, min(n, per))", "each rank evaluates its own share, not rank 0's",
        f"{TE} -k two_processes", fast=False),
    Bug("eval_padding_kept", "lib/runtime.py", "torch.cat([p[:s] for p, s in zip(parts, sizes)])",
        "torch.cat([p for p, s in zip(parts, sizes)])", "the gather drops the padding of the shorter shares",
        f"{TE} -k two_processes", fast=False),
    Bug("eval_gather_order", "lib/runtime.py", "for p, s in zip(parts, sizes)]).to(x.device)",
        "for p, s in zip(parts[::-1], sizes[::-1])]).to(x.device)", "the shares are gathered in rank order",
        f"{TE} -k two_processes", fast=False),
    Bug("predict_whole_set", "finetune.py", "DataLoader(Subset(dataset, runtime.share(n, env.rank, env.world, bs)), bs,",
        "DataLoader(Subset(dataset, range(n)), bs,", "finetune.predict runs this rank's share only",
        f"{TE}::test_predict_two_processes_equals_one", fast=False),
    Bug("unsharded_rank0_only", "lib/runtime.py", "    state = {k: full_tensor(v) for k, v in model.state_dict().items()}\n",
        "    state = {k: full_tensor(v) for k, v in model.state_dict().items()}\n    if dist.get_rank() != 0:\n"
        "        return None\n", "under --fsdp every rank gets a plain copy of the model for the evaluation",
        f"{TE} -k unsharded", fast=False),
    # --- masking rates (data.py)
    Bug("text_mlm_rate", D, 'TEXT_MASKING = (0.15, 20)',
        'TEXT_MASKING = (0.5, 15)',
        "MLM on text masks 15 %, at most 20", f"{TD}::test_batch_formats"),
    Bug("region_imlm_rate", D, 'mlm_ids, mlm_labels = mask_text(ids, self.tok, *CAPTION_MASKING["xfm"][:2], rng)',
        'mlm_ids, mlm_labels = mask_text(ids, self.tok, *TEXT_MASKING, rng)',
        "IMLM on region captions masks half, at most 15", f"{TD}::test_batch_formats"),
    Bug("pair_imlm_rate", D, 'CAPTION_MASKING = {"xfm": (0.5, 15, 0.2)', 'CAPTION_MASKING = {"xfm": (0.15, 20, 0.2)',
        "IMLM on pair captions masks half, at most 15", f"{TD}::test_batch_formats"),
    Bug("mask_80_10_10", D, "if r < 0.8:  # 80 %", "if r < 0.9:  # 80 %",
        "BERT's 80/10/10 corruption", f"{TD}::test_mask_text_80_10_10_and_spans"),
    # --- FLAVA
    Bug("flava_layout", F, "self.image_to_mm(v), self.text_to_mm(t)], 1)", "self.text_to_mm(t), self.image_to_mm(v)], 1)",
        "FLAVA's fused sequence is [CLS_M; image; text]", f"{TF}::test_fused_layout_is_cls_m_image_text"),
    Bug("flava_pad_mask", F, "image_mask.bool(), att.bool()], dim=1)", "image_mask.bool(), att.bool() | True], dim=1)",
        "FLAVA's fusion never attends to text padding",
        f"{TF}::test_text_padding_never_changes_the_other_fusion_outputs"),
    Bug("flava_mmm_image_slice", F, "mlm_loss(h[:, 2:2 + P], img_labels", "mlm_loss(h[:, 1:1 + P], img_labels",
        "MMM-image reads the patch positions 2..1+P", f"{TF}::test_mmm_losses_read_the_right_slices"),
    Bug("flava_itm_reads_cls_i", F, "model.itm_head(h[:, 0])", "model.itm_head(h[:, 1])",
        "FLAVA's ITM reads CLS_M", f"{TF}::test_mmm_losses_read_the_right_slices"),
    Bug("flava_itm_polarity", F, "model.itm_head(h[:, 0]).float(), itm_labels)", "model.itm_head(h[:, 0]).float(), 1 - itm_labels)",
        "FLAVA's ITM label 1 = matched", f"{TF}::test_itm_loss_is_small_when_the_head_says_match_for_matches"),
    Bug("flava_gc_queries", F, "itc_loss(f_v, f_t, model.temp, queries=matched)", "itc_loss(f_v, f_t, model.temp)",
        "GC: swapped captions are keys, never queries", f"{TF}::test_mmm_losses_read_the_right_slices"),
    Bug("flava_gc_batch_mean", F, "F.normalize(self.vision_proj(self.image_cls(v)), dim=-1))",
        "F.normalize(self.vision_proj(self.image_cls(v).mean(0, keepdim=True).expand(len(v), -1)), dim=-1))",
        "each image's contrastive feature comes from its own CLS_I", f"{TO} -k flava_pair"),
    Bug("flava_logit_scale_clamp", F, "self.logit_scale.clamp_(0.0, math.log(100.0))", "self.logit_scale.clamp_(0.0, 10.0)",
        "the logit scale stays in [0, ln 100]", f"{TF}::test_logit_scale_is_clamped_to_0_ln100"),
    Bug("flava_neg_label", D, 'caption, match = self.items[k]["caption"], 0', 'caption, match = self.items[k]["caption"], 1',
        "a swapped caption is labelled 0", f"{TF}::test_itm_negatives_swap_in_another_images_caption"),
    Bug("flava_neg_same_image", D, "if self.img_ids[k] != self.img_ids[j]:", "if True:",
        "an ITM negative's caption comes from another image",
        f"{TF}::test_itm_negatives_swap_in_another_images_caption"),
    # --- --fsdp (runtime.shard, PyTorch's FSDP2) and the checkpoints of a run over several ranks
    Bug("fsdp_no_sync_last", "lib/runtime.py", "    finally:\n        loss_model.set_requires_gradient_sync(True)",
        "    finally:\n        pass", "under FSDP the last micro-step reduce-scatters the accumulated gradients",
        f"{TFS}::test_fsdp_accumulation_equals_one_big_micro_batch", fast=False),
    Bug("fsdp_clip_rank_norm", "lib/runtime.py", "    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)\n",
        "    params = list(params)\n    grad_norm = torch.nn.utils.get_total_norm([getattr(p.grad, '_local_tensor', p.grad)"
        " for p in params if p.grad is not None])\n    torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)\n",
        "under FSDP the clipping and the logged norm use the global norm, not this rank's slices",
        f"{TFS}::test_fsdp_run_equals_the_ddp_run[xfm]", fast=False),
    Bug("fsdp_stacked_bias", "lib/runtime.py", "    if not (ddp and cfg.fsdp):\n", "    if True:\n",
        "under FSDP each vision block gathers its own position bias inside its forward (where its table is whole)",
        f"{TFS}::test_fsdp_run_equals_the_ddp_run", fast=False),
    Bug("per_block_bias_dropped", M, "        if self.rel_pos is not None and mask is None:",
        "        if False:", "each BEiT block adds its own relative position bias",
        "tests/test_pretrained.py::test_beit_official_pth_parity"),
    Bug("fsdp_no_root", "lib/runtime.py", "    fully_shard(loss_model, mp_policy=policy)  ", "    pass  ",
        "FSDP shards the root too: the parameters outside the blocks are reduced like the rest",
        f"{TFS}::test_fsdp_run_equals_the_ddp_run", fast=False),
    Bug("fsdp_save_sharded", "lib/runlog.py", 'ckpt = {"model": model_state,', 'ckpt = {"model": model.state_dict(),',
        "an FSDP checkpoint holds the full model, not this rank's slices",
        f"{TFS}::test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one", fast=False),
    Bug("fsdp_scalar_shape", "lib/runtime.py", "model_state[name] = model_state[name].reshape(())",
        "model_state[name] = model_state[name]", "an FSDP checkpoint keeps 0-dim parameters 0-dim (a DDP run's format)",
        f"{TFS}::test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one", fast=False),
    Bug("fsdp_optimizer_not_loaded", "lib/runtime.py",
        '    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_state_options())',
        "    pass", "an FSDP resume restores the AdamW state",
        f"{TFS}::test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one", fast=False),
    Bug("resume_rank0_rng", T, 'runtime.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])',
        'runtime.set_rng_state(ckpt["rng"][0])', "a resume restores each rank's own random state",
        f"{TFS}::test_fsdp_resume_is_exact_and_the_checkpoint_is_a_plain_one", fast=False),
    # --- fast paths of the encoders (tests/test_fastpaths.py): the same results as the plain computation
    Bug("mask_first_layer_only", M, "            x = blk(x, mask)\n        return x\n\n\nclass VisionEncoder",
        "            x = blk(x, mask)\n            mask = None\n        return x\n\n\nclass VisionEncoder",
        "the mask an encoder builds once per pass reaches every layer",
        "tests/test_fastpaths.py::test_masks_built_once_per_encoder_pass"),
    Bug("relpos_shared_table", "lib/runtime.py", "tables = torch.stack([m.table for m in rel_pos])",
        "tables = torch.stack([rel_pos[0].table for m in rel_pos])",
        "every block's position bias, gathered at once, comes from its own table",
        "tests/test_fastpaths.py::test_masks_built_once_per_encoder_pass"),
    Bug("stacked_biases_not_applied", "lib/runtime.py", "        stack_position_biases(model)\n", "        pass\n",
        "a training run gathers every vision block's position bias at once (the fast path is applied)",
        "tests/test_fastpaths.py::test_a_training_run_gathers_the_position_biases_at_once"),
    Bug("mask_per_layer", M, "        for blk in self.blocks:\n            x = blk(x, mask, image, image_mask",
        "        for blk in self.blocks:\n            mask = additive_mask(att)\n            x = blk(x, mask, image, image_mask",
        "the fusion encoder builds its masks once per pass, not per layer",
        "tests/test_fastpaths.py::test_masks_built_once_per_encoder_pass"),
    Bug("auto_always_sdpa", "lib/runtime.py",
        'attn.sdpa = device.type != "cpu" or not (attn.attn_drop > 0 or learned_mask)', "attn.sdpa = True",
        "attention auto runs SDPA only where it has a fused kernel (on a CPU: no dropout, no mask gradient)",
        "tests/test_fastpaths.py -k test_auto_attention"),
    Bug("auto_learned_mask_sdpa", "lib/runtime.py", "attn.attn_drop > 0 or learned_mask)", "attn.attn_drop > 0)",
        "attention auto on a CPU runs a block with a learned position bias written out (SDPA: no fused kernel)",
        "tests/test_fastpaths.py -k test_auto_attention"),
    Bug("auto_scale_dropped", M, "torch.add(mask, att, alpha=scale)", "torch.add(mask, att)",
        "the written-out attention scales the scores by 1/sqrt(hs) where it adds the mask",
        "tests/test_fastpaths.py -k test_sdpa_equals_explicit"),
    Bug("drop_path_unscaled", M, ".bernoulli_(1 - p).div_(1 - p)", ".bernoulli_(1 - p)",
        "drop path rescales the kept samples by 1/(1-p)",
        f"{TM}::test_drop_path_zeroes_whole_samples_and_rescales_the_rest"),
    # --- fixed shapes, no host syncs (docs/ENGINEERING.md): the same method as the plain version
    Bug("flava_pos_sync", F, "matched = matched | ~matched.any()", "matched = matched if matched.any() else torch.ones_like(matched)",
        "the loss code makes the host wait for nothing (no `if tensor`)",
        f"{TS}::test_a_step_makes_the_host_wait_for_nothing"),
    Bug("mask_bound_too_small", D, "return min(max_predictions, max(1, round((T - 2) * prob)))",
        "return min(max_predictions, max(1, round((T - 2) * prob))) - 1",
        "mlm_slots bounds the masked positions of every row (none is dropped from MLM)",
        f"{TD}::test_batch_formats"),
    Bug("mask_bound_unchecked", D, "    if len(chosen) > bound:", "    if False:",
        "mask_text refuses a row that would mask more positions than mlm_slots (the loss's slots per row)",
        f"{TD}::test_mask_text_never_masks_more_than_the_loss_has_slots"),
    Bug("mask_span_overshoots", D, "if len(chosen) < n and p in cand_set:", "if p in cand_set:",
        "a skipgram span stops at the count, so no row masks more than mlm_slots positions",
        f"{TD}::test_mask_text_never_masks_more_than_the_loss_has_slots"),
    Bug("static_caption_len", D,
        "T = self.dc.caption_len if self.dc.static else None\n        ids = pad_seqs([s[\"ids\"] for s in samples], self.tok.pad_id, T)  # (B, T)",
        "T = None\n        ids = pad_seqs([s[\"ids\"] for s in samples], self.tok.pad_id, T)  # (B, T)",
        "--compile pads captions to a fixed length: one compilation per kind of update",
        f"{TT} -k compiled_step", fast=False),
    # --- the data formats of ALBEF and X-VLM (lib/formats.py), the image root, the VQA results file
    Bug("xvlm_elems_skipped", FM, 'key = "regions" if "regions" in rec or "elems" not in rec else "elems"',
        'key = "regions"', "X-VLM's records hold their regions in elems", f"{TFM} -k xvlm_region"),
    Bug("xvlm_bb_xyxy", FM, "x, y, w, h = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy",
        "x, y, w, h = box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy",
        "X-VLM's bb (like box) is [x, y, w, h] in pixels, not [x0, y0, x1, y1]", f"{TFM} -k xvlm_region"),
    Bug("xvlm_attributes_dropped", FM, 'rcaps = [f"{a} {c}" for a in attrs for c in rcaps] if attrs else rcaps',
        "rcaps = rcaps", "X-VLM's attributes prefix the region's phrase", f"{TFM} -k xvlm_region"),
    Bug("xvlm_size_ignored", FM, "sx, sy = W / iw, H / ih", "sx, sy = 1.0, 1.0",
        "boxes measured in the declared image_w x image_h are scaled to the image file's size",
        f"{TFM} -k xvlm_region"),
    Bug("image_root_ignored", FM, "return image_root or (path if os.path.isdir(path) else os.path.dirname(path))",
        "return path if os.path.isdir(path) else os.path.dirname(path)",
        "image paths are relative to --image_root when one is given", f"{TFM} -k image_root_resolves"),
    Bug("train_image_root_dropped", SH, "caption_mask=cfg.recipe, image_root=cfg.image_root,",
        "caption_mask=cfg.recipe,", "train.py's streams read their images under --image_root",
        f"{TFM} -k test_train_reads", fast=False),
    Bug("eval_image_root_dropped", "lib/runlog.py", "cfg.caption_len, held_bad, cfg.image_root),",
        "cfg.caption_len, held_bad),", "train.py's retrieval evaluation reads its images under --image_root",
        f"{TFM} -k test_train_reads", fast=False),
    Bug("karpathy_unfiltered", FM, 'if not isinstance(im, dict) or im.get("split") not in keep:',
        "if not isinstance(im, dict):", "a Karpathy file gives only the images of the split asked for",
        f"{TFM} -k karpathy_test_split"),
    Bug("karpathy_test_as_train", FM, 'return parse_pairs(path, bad, image_root, split="test")',
        "return parse_pairs(path, bad, image_root)", "the held-out pairs are a Karpathy file's test split",
        f"{TFM} -k karpathy_test_split"),
    Bug("vqa_results_misaligned", FM, "for r, a in zip(records, predicted)]",
        "for r, a in zip(records[1:] + records[:1], predicted)]",
        "the VQA results file pairs each question_id with the answer to that question", f"{TFM} -k vqa_results"),
    # --- tar shards (lib/shards.py): equal batches per rank, exact resume, keyed samples, bad members
    Bug("shard_unequal_ranks", SH, "self.m = self.index.total // self.slots ",
        "self.m = len(range(rank * self.workers, self.index.total, self.slots)) ",
        "every rank yields the same number of batches an epoch (no rank takes the remainder)",
        f"{TSH}::test_every_rank_yields_the_same_batches_each_epoch"),
    Bug("shard_resume_off_by_one", SH, "        for _ in range(start):  # replay", "        for _ in range(start - 1):  # replay",
        "a resume continues at the exact sample it stopped at (the buffer's order replayed to that place)",
        f"{TSH}::test_a_resumed_stream_continues_exactly_mid_epoch"),
    Bug("shard_resume_buffer_fresh", SH, "        for _ in range(start):  # replay", "        for _ in range(0):  # replay",
        "a resume rebuilds the shuffle buffer as it was (replaying its order), not a fresh one",
        f"{TSH}::test_a_resumed_stream_continues_exactly_mid_epoch"),
    Bug("shard_worker_turns", SH, "j = ((info.id if info else 0) + self.start) % W", "j = (info.id if info else 0) % W",
        "after a resume each worker plays the slot whose turn it is",
        f"{TSH}::test_a_resumed_stream_continues_exactly_mid_epoch"),
    Bug("shard_buffer_unseeded", SH, "np.random.default_rng([self.dc.seed, self.salt, epoch, slot, 2])",
        "np.random.default_rng()", "the shuffle buffer's order is keyed (seed, stream, epoch, slot)",
        f"{TSH}::test_a_resumed_stream_continues_exactly_mid_epoch"),
    Bug("shard_rng_by_place", SH, "np.random.default_rng([self.dc.seed, self.salt, epoch, self.ordinals[index]])",
        "np.random.default_rng([self.dc.seed, self.salt, epoch, index])",
        "a sample's randomness is keyed by its ordinal (as data.py's by its index), not by its place in the batch",
        f"{TSH}::test_packed_shards_give_the_jsonl_samples"),
    Bug("shard_rng_no_epoch", SH, "np.random.default_rng([self.dc.seed, self.salt, epoch, self.ordinals[index]])",
        "np.random.default_rng([self.dc.seed, self.salt, 0, self.ordinals[index]])",
        "a sample's randomness is keyed by the epoch too: new crops and masks every epoch",
        f"{TSH}::test_packed_shards_give_the_jsonl_samples"),
    Bug("shard_pack_reorders", SH, "items = formats.PARSERS[kind](src[kind], bad, image_root)",
        "items = sorted(formats.PARSERS[kind](src[kind], bad, image_root), key=str)",
        "packing keeps data.py's order: ordinal i is data.py's index i",
        f"{TSH}::test_packed_shards_give_the_jsonl_samples"),
    Bug("shard_images_dir_is_images", "lib/formats.py",
        'os.path.isdir(path) and not any(n.endswith(".tar") for n in os.listdir(path)) if name == "images"',
        'os.path.isdir(path) if name == "images"', "an images/ folder of tar shards is no folder of image files",
        f"{TSH}::test_packed_shards_give_the_jsonl_samples"),
    Bug("shard_bad_not_counted", SH, "tally.report(*p, replaced=sample is None)", "pass",
        "a bad member is named and counted",
        f"{TSH} -k bad_members"),
    Bug("shard_bad_counted_in_worker", SH, "self.problems.append(self.bad.found(kind, where, msg, action))",
        "self.bad.once(kind, where, msg, action)", "bad members found in a DataLoader worker are counted in the "
        "main process (a worker's counts are lost)", f"{TSH} -k bad_members"),
    Bug("shard_index_size_unchecked", SH, 'if size != f["bytes"]:', "if False:",
        "a shard changed since it was indexed stops the run before any work",
        f"{TSH}::test_bad_folders_and_flags_stop_with_one_clear_error"),
    Bug("shard_state_restarts", SH, 'self.batches, self._it = int(state["batches"]), None',
        'self.batches, self._it = 0, None',
        "a resumed run continues each stream's data where it stopped, mid-epoch",
        f"{TSH}::test_train_from_shards_in_two_processes_resumes_exactly_mid_epoch", fast=False),
    # --- export folders (pretrained.write_safetensors, train.py --export, finetune.py --init DIR) and --keep_last
    Bug("st_offsets_not_cumulative", P, "offset += nbytes", "offset = nbytes",
        "each tensor's data_offsets start where the previous tensor's end", f"{TX}::test_writer_layout_byte_by_byte"),
    Bug("st_bf16_labelled_f16", P, "_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}",
        '_ST_NAMES = {**{dtype: name for name, dtype in _ST_DTYPES.items()}, torch.bfloat16: "F16"}',
        "the header names each tensor's own dtype", f"{TX}::test_writer_layout_byte_by_byte"),
    Bug("st_big_endian", P, 'if sys.byteorder == "big" and t.element_size() > 1:',
        'if sys.byteorder == "little" and t.element_size() > 1:',
        "the data is little-endian on every machine", f"{TX}::test_writer_layout_byte_by_byte"),
    Bug("st_data_in_name_order", P, "        for name in names:                                               #",
        "        for name in sorted(tensors):  #",
        "the data follows the header's order (widest dtype first), not the names'",
        f"{TX}::test_every_dtype_round_trips_through_the_reader"),
    Bug("export_params_only", T, "cfg.out_dir, model.state_dict(),", "cfg.out_dir, dict(model.named_parameters()),",
        "the export holds the whole state dict (the tied MLM decoder, FLAVA's codebook buffer)",
        f"{TT}::test_export_holds_the_final_weights_exactly_and_rebuilds_the_model", fast=False),
    Bug("init_export_ignored", "finetune.py",
        'pretrained.read_export(cfg.init) if pretrained.is_export(cfg.init) else runlog.load_checkpoint(cfg.init, "cpu")',
        'runlog.load_checkpoint(cfg.init, "cpu")',
        "finetune.py --init DIR reads an export folder",
        f"{TFT}::test_init_from_an_export_equals_init_from_the_checkpoint", fast=False),
    Bug("keep_last_off_by_one", "lib/runtime.py", "for old in steps[:-keep_last]:", "for old in steps[:-keep_last - 1]:",
        "--keep_last=N keeps exactly N numbered checkpoints",
        f"{TT}::test_keep_last_keeps_the_newest_n_and_a_kept_one_resumes", fast=False),
    Bug("keep_last_drops_newest", "lib/runtime.py", "for old in steps[:-keep_last]:", "for old in steps[keep_last:]:",
        "--keep_last deletes the oldest checkpoints, never the newest",
        f"{TT}::test_keep_last_keeps_the_newest_n_and_a_kept_one_resumes", fast=False),
    # --- the student copy (tools/student.py): blanks keep signature and docstring, hold no answer, each graded alone
    Bug("student_blank_keeps_body", ST, 'lines[keep:fn.end_lineno] = [s + "\\n" for s in stub]',
        'lines[keep:keep] = [s + "\\n" for s in stub]',
        "a blank's body is the raise alone: the reference body is not in the copy", f"{TST}::{TST_STATIC}"),
    Bug("student_docstring_dropped", ST, "keep = doc.end_lineno if doc else fn.body[0].lineno - 1",
        "keep = fn.body[0].lineno - 1", "a blank keeps its docstring (the formula)", f"{TST}::{TST_STATIC}"),
    Bug("student_nonempty_out", ST, "if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):",
        "if os.path.exists(out) and not os.path.isdir(out):", "--out refuses a folder that is not empty",
        f"{TST}::{TST_STATIC}"),
    Bug("student_plain_losses_kept", ST,
        'return out + [(*split(s), HIDDEN_WHAT, (), f"{split(s)[1]}, hidden") for s in HIDDEN]', "return out",
        "the fast path's losses (lib/fast_losses.py) are blanked too: the copy holds no answer", f"{TST}::{TST_STATIC}"),
    Bug("student_test_of_another_blank", ST, '(f"{TM}::test_region_view_mean_over_box_patches",),',
        '(f"{TD}::test_block_mask_exact_and_fresh",),', "a grading test grades one blank", f"{TST}::{TST_STATIC}"),
    Bug("student_test_not_pinning_blank", ST, '(f"{TM}::test_region_view_mean_over_box_patches",),',
        '(f"{TM}::test_presets_and_heads",),', "a blank's grading tests fail on the blank",
        f"{TST}::{TST_GRADING}", fast=False),
    Bug("student_test_needs_other_blanks", ST, '(f"{TL}::test_itm_loss_rows_and_labels_with_fixed_negatives",)',
        '(f"{TL}::test_itm_labels_one_for_pairs_zero_for_negatives",)',
        "a blank's grading tests pass with its own reference body back and every other blank still blank",
        f"{TST}::{TST_GRADING}", fast=False),
    # --- tools/class_results.py: a class's runs pooled
    Bug("class_std_population", CR, "/ (n - 1)) if n > 1 else None", "/ n) if n > 1 else None",
        "the spread is the sample standard deviation (n - 1 in the denominator)", TCR),
    Bug("class_group_ignores_pattern", CR, "next((g for g in globs if fnmatch.fnmatch(name, g)), None)",
        "next((g for g in globs), None)", "a run joins the first --group pattern its folder name matches", TCR),
    Bug("class_first_record", CR, '"last": values[-1]', '"last": values[0]',
        "a run's quantity is its last log record, not its first", TCR),
    Bug("class_by_regex_ignored", CR, 'return re.sub(by, "", name)', "return name",
        "--by REGEX pools the folders whose names differ only by REGEX (the seeds of one command)", TCR),
    Bug("class_finetune_prefix_kept", CR, 'task = task[len("finetune/"):] if task.startswith("finetune/") else task',
        "pass", "a finetune report's quantities are ft/TASK/KEY, as for a finetune.py --out_dir folder", TCR),
    Bug("class_report_metrics_nested", CR, 'if isinstance(report.get("metrics"), dict):', "if False:",
        "a finetune report's metrics are ft/TASK/NAME (ft/textcls/accuracy), not ft/TASK/metrics/NAME", TCR),
    Bug("class_finetune_overwrites_final", CR, 'out.update({f"ft/{task}/{k}": v', 'out.update({f"{task}/{k}": v',
        "a fine-tuned retrieval report never overwrites the run's zero-shot retrieval/...", TCR),
    # --- hostile input: record readers (formats.parse_json, _number, the size and box range, cut, load_image)
    Bug("json_guard_decode_error_only", FM,
        "    except ValueError as e:  # an int of more digits than Python converts (sys.get_int_max_str_digits)\n"
        "        return None, str(e).split(\";\")[0]\n"
        "    except RecursionError:  # json's own limit, near sys.getrecursionlimit() levels\n"
        "        return None, f\"nested deeper than {JSON_DEPTH} levels\"\n", "",
        "every error parsing a record's JSON can raise (deep nesting, a 5,000-digit int) is malformed JSON",
        f"{THR}::test_no_json_line_file_or_member_raises"),
    Bug("json_depth_unbounded", FM, "    if level:  # deeper values", "    if False:  # deeper values",
        "arrays and objects nested deeper than JSON_DEPTH are malformed JSON",
        f"{THR}::test_no_json_line_file_or_member_raises"),
    Bug("shard_json_unguarded", SH, "rec, why = formats.parse_json(text)", "rec, why = json.loads(text), None",
        "a tar member's KEY.json goes through the same guarded parse",
        f"{THR}::test_no_json_line_file_or_member_raises"),
    Bug("number_huge_int", FM, "abs(v) <= sys.float_info.max", 'abs(v) < float("inf")',
        "a number is one a float holds: an int of 400 digits is none",
        f"{THR}::test_number_is_what_a_float_holds"),
    Bug("declared_size_unbounded", FM, "_number(v) and 1 <= v <= MAX_SIDE for k, v", "_number(v) and 0 < v for k, v",
        "a declared image_w, image_h is 1 to MAX_SIDE pixels (5e-324 would make W / iw infinite)",
        f"{THR}::test_sizes_and_boxes_that_would_not_stay_finite_are_refused"),
    Bug("scaled_box_unchecked", FM, "if not (x1 > x0 and y1 > y0):", "if False:",
        "a box keeps an area once scaled to the image file and clipped to it",
        f"{THR}::test_sizes_and_boxes_that_would_not_stay_finite_are_refused"),
    Bug("text_uncut", FM, "return text.strip()[:MAX_TEXT_CHARS]", "return text.strip()",
        "every reader cuts a text to MAX_TEXT_CHARS characters",
        f"{THR}::test_every_reader_cuts_a_long_text_and_keeps_the_others"),
    Bug("shard_text_uncut", SH, "return (formats.cut(text), problems)", "return (text.strip(), problems)",
        "a shard's text line is cut as the JSONL readers cut it",
        f"{THR}::test_every_reader_cuts_a_long_text_and_keeps_the_others"),
    Bug("tokenizer_train_uncut", "lib/tokenizer.py", "hf.train_from_iterator((t[:formats.MAX_TEXT_CHARS] for t in texts)",
        "hf.train_from_iterator((t for t in texts)", "tokenizer training cuts each text: a 1 MB word takes seconds",
        f"{THR}::test_tokenizer_trains_on_a_megabyte_line_without_spaces_in_seconds", fast=False),
    Bug("tokenizer_encode_uncut", "lib/tokenizer.py", "text = text[:formats.MAX_TEXT_CHARS]",
        "text = text", "encode hands the library at most MAX_TEXT_CHARS characters",
        f"{THR}::test_encode_hands_the_library_at_most_the_limit"),
    Bug("image_16_bit_clipped", FM, "a = (a.astype(np.uint32) * 255 + 32767) // 65535  # v / 257, rounded", "pass",
        "a 16-bit image is scaled to 8 bits by / 257, not clipped",
        f"{THR}::test_16_bit_and_float_images_are_scaled_to_8_bits"),
    Bug("image_float_unstretched", FM, "a = np.rint((a - lo) * (255 / (hi - lo) if hi > lo else 0))", "a = np.rint(a)",
        "a float image is stretched from its own min..max to 0..255",
        f"{THR}::test_16_bit_and_float_images_are_scaled_to_8_bits"),
    Bug("check_images_unreported", FM, '                bad.report("unreadable image", named[path]',
        '                pass  # bad.report("unreadable image", named[path]',
        "check --images names and counts each image that does not decode",
        f"{THR}::test_check_reports_each_and_images_decodes_every_image"),
    # --- hostile input: shards (index.json verified, duplicate keys, one count per bad record, pack's path guard)
    Bug("index_negative_count", SH, "isinstance(v, int) and not isinstance(v, bool) and v >= 0\n",
        "isinstance(v, int) and not isinstance(v, bool)\n", "an index's sample counts are >= 0",
        f"{THS}::{THS_LIE}[negative-once]"),
    Bug("index_float_count", SH, "isinstance(v, int) and not isinstance(v, bool) and v >= 0\n",
        "isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0\n",
        "an index's sample count is an int (31.9 is refused, not read as 31)", f"{THS}::{THS_LIE}[float]"),
    Bug("index_listed_twice", SH, "    if twice:", "    if False:", "an index lists each file once",
        f"{THS}::{THS_LIE}[listed-twice]"),
    Bug("index_count_unbounded", SH, 'if f["samples"] > _most(kind, size):', "if False:",
        "an index count is at most what its file's size can hold", f"{THS}::{THS_LIE}[billion]"),
    Bug("index_text_bound_loose", SH, 'return (size + 1) // 2 if kind == "text"', 'return size if kind == "text"',
        "a text file of n bytes holds at most (n + 1) // 2 lines", f"{THS}::{THS_OLD}"),
    Bug("index_digest_unchecked", SH, 'if "digest" in index and index["digest"] != _digest(files):', "if False:",
        "an index edited after lib/shards.py wrote it (an under-count) is refused", f"{THS}::{THS_LIE}[under-count]"),
    Bug("index_digest_required", SH, 'if "digest" in index and index["digest"] != _digest(files):',
        'if index["digest"] != _digest(files):', "an index without a digest is read when its other checks pass",
        f"{THS}::{THS_OLD}"),
    Bug("index_refusal_two_lines", SH, 'SystemExit(f"error: {path}: {problem}; rewrite it with: {redo}")',
        'SystemExit(f"error: {path}: {problem}; rewrite it with:\\n    {redo}")',
        "an index refusal is one line", f"{THS}::{THS_LIE}[float]"),
    Bug("duplicate_key_uncounted", SH, "    if again:", "    if False:",
        "a tar sample holding a member twice is named and counted", f"{THS}::{THS_DUP}"),
    Bug("duplicate_key_last_kept", SH, "        (again if ext in seen else first).append((name, raw))",
        "        (again if ext in seen else first).insert(0, (name, raw))",
        "a duplicate key keeps the sample's first member of each extension", f"{THS}::{THS_DUP}"),
    Bug("bad_counted_per_draw", FM, ONCE, ONCE.replace("if (kind, where) not in self._records:", "if True:"),
        "an image that does not decode counts once however often it is drawn", f"{THS}::{THS_ONCE}[0]"),
    Bug("bad_state_empty", FM, 'return {"records": sorted(self._records)}', 'return {"records": []}',
        "a resumed run keeps the records counted before its checkpoint", f"{THS}::{THS_ONCE}[0]"),
    Bug("bad_plain_counts_added", FM, "self._counts[kind] = max(self._counts[kind], int(n))",
        "self._counts[kind] += int(n)", "an older checkpoint's plain counts are not added to what parsing finds again",
        f"{THS}::{THS_ONCE}[0]"),
    Bug("bad_counted_in_worker", D, 'bad.append(self.bad.found("unreadable image"', '(self.bad.once("unreadable image"',
        "an unreadable image found in a DataLoader worker is counted in the main process (a worker's counts are "
        "lost)", f"{THS}::{THS_ONCE}[2]"),
    Bug("shard_bad_counted_per_draw", SH, "            self.bad.once(*problem)",
        "            self.bad.report(*problem)",
        "a bad shard member counts once however often it is drawn", f"{THS}::{THS_SHARD}"),
    Bug("pack_reads_outside", SH, "if _root_of(real, roots) is None:", "if False:",
        "pack reads no file outside the data folder (/etc/passwd, ..)", f"{THS}::{THS_PACK}"),
    Bug("pack_links_unresolved", SH, "real = os.path.realpath(path)", "real = os.path.abspath(path)",
        "pack resolves links before it checks a path: a link leading out is refused", f"{THS}::{THS_PACK}"),
    Bug("pack_packs_non_images", SH, "        formats.load_image(real)\n", "        os.path.getsize(real)\n",
        "pack packs only files that decode as images", f"{THS}::{THS_PACK}"),
    Bug("pack_regions_unguarded", SH, "            if problem:\n                bad.once(problem[0], where,",
        "            if False:\n                bad.once(problem[0], where,",
        "pack copies no region image from outside the data folder", f"{THS}::{THS_PACK}"),
    # --- hostile input: checked before training
    Bug("held_out_verified_not_decoded", R, "            formats.load_image(path)\n",
        "            formats.Image.open(path).verify()\n",
        "every held-out image is decoded at start-up: a truncated JPEG passes PIL's verify, not a decode",
        f"{TPC}::test_held_out_images_are_decoded_and_the_bad_ones_skipped_and_counted"),
    Bug("held_out_not_read_at_start", "lib/runlog.py", 'ddp, rank) if "pair_test" in sources else None',
        "ddp, rank) if False else None",
        "train.py reads and checks its held-out pairs before step 1 (and evaluates that set at the end)",
        f"{TPC}::test_train_checks_the_held_out_set_before_step_1", fast=False),
    Bug("held_out_count_saved", T, "    held_out, held_bad = runlog.load_held_out(cfg, sources, tok, model_cfg.image_size, ddp, rank)\n",
        "    held_out, held_bad = runlog.load_held_out(cfg, sources, tok, model_cfg.image_size, ddp, rank)\n"
        "    [bad.add(k, n) for k, n in held_bad.counts().items()]\n",
        "the held-out set's skipped pairs are counted once per run, not saved and counted again by a resume",
        f"{TPC}::test_train_checks_the_held_out_set_before_step_1", fast=False),
    Bug("held_out_empty_accepted", R, "    if not paths:\n        raise SystemExit",
        "    if False:\n        raise SystemExit",
        "a held-out set with no readable pair stops the run at start-up, in one line",
        f"{TPC}::test_a_held_out_set_with_nothing_left_is_refused_in_one_line"),
    Bug("final_record_lost", "lib/runlog.py", "        except OSError as e:  #",
        "        except ZeroDivisionError as e:  #",
        "an evaluation that fails on a file changed during the run still leaves the final record",
        f"{TPC}::test_an_evaluation_that_fails_at_the_end_still_writes_the_final_record"),
    Bug("finetune_images_unchecked", FT, 'return None if path is None else ("unreadable image"',
        'return None if True else ("unreadable image"',
        "every image of a fine-tuning task file is decoded at start-up; a record with a bad one is skipped",
        f"{TPC}::test_every_task_decodes_its_images_at_start_up "
        f"{TPC}::test_image_folder_images_are_decoded_at_start_up"),
    Bug("label_range_unchecked", FM, "    if not 0 <= x < len(labels):", "    if False:",
        "a class index outside 0..C-1 (-5, 100000000, 1e308) is a bad label, skipped",
        f"{TPC}::test_classification_labels_outside_the_classes_are_counted_skips"),
    Bug("label_range_from_the_largest", FM, "if c + 1 <= 2 * j), default=0)", "), default=0)",
        "the inferred classes 0..C-1 have at least half of their indices in use: one outlier adds no classes",
        f"{TPC}::test_the_inferred_class_range_holds_at_least_half_of_its_indices"),
    Bug("float_label_makes_regression", FM, "2 * fractions > len(values)", "fractions > 0",
        "one 1.5 among integer labels is a bad label; regression needs most labels to have a fraction",
        f"{TPC}::test_the_inferred_class_range_holds_at_least_half_of_its_indices"),
    # --- hostile input: weights and exports (lib/pretrained.py's readers, runlog.load_checkpoint, Tokenizer.load)
    Bug("st_header_length_unbounded", P, "        if n > size - 8:", "        if False:",
        "a safetensors header length past the end of the file is refused before anything is read",
        f"{THW}::test_bad_safetensors_is_refused_by_name[header_length_past_the_end]"),
    Bug("st_header_cap_off", P, "        if n > ST_MAX_HEADER:", "        if False:",
        "a safetensors header longer than ST_MAX_HEADER is refused unread",
        f"{THW}::test_a_header_over_the_limit_is_refused_unread"),
    Bug("st_overlap_allowed", P, "        if begin != end:", "        if begin > end:",
        "safetensors tensors tile the data section: an overlap is refused",
        f"{THW}::test_bad_safetensors_is_refused_by_name[overlap]"),
    Bug("st_byte_count_unchecked", P, "        if offsets[1] - offsets[0] != need:", "        if False:",
        "a tensor's bytes are prod(shape) x its dtype's size (F32 bytes labelled I64 are refused)",
        f"{THW}::test_bad_safetensors_is_refused_by_name[bytes_not_shape_times_dtype]"),
    Bug("export_file_outside_folder", P, '    if os.path.isabs(name) or ".." in re.split(',
        "    if False and re.split(",
        "an export's weights and tokenizer are names inside its folder (no absolute path, no ..)",
        f"{THW}::test_export_weights_and_tokenizer_stay_inside_the_folder"),
    Bug("pretrained_int_labelled_float", P,
        "        if t.dtype.is_floating_point != ours[key].dtype.is_floating_point:", "        if False:",
        "a --init_text / --init_vision tensor is floating where the model's is",
        f"{THW}::test_a_pretrained_tensor_of_another_kind_is_refused"),
    Bug("beit_pth_table_unchecked", P,
        "    if grid != int(grid) or grid < 1 or table.shape[1] < 1 or w.shape[0] % table.shape[1]:",
        "    if False:", "an official BEiT file's sizes come off a table of (2g-1)^2 + 3 rows per head",
        f"{THW}::test_official_beit_file_of_wrong_shapes_is_refused_by_name"),
    Bug("export_int_labelled_float", P, "        v.dtype.is_floating_point != t.dtype.is_floating_point:",
        "        False:",
        "an export's tensor is floating where the model's is (F32 bytes labelled I32 are refused)",
        f"{THW}::test_export_tensors_must_be_the_model_of_its_config"),
    Bug("export_model_config_types", P, "        if not fits or (kind is int and v < least):", "        if False:",
        "an export's model_config of the wrong type is refused naming the key",
        f"{THW}::test_export_config_of_wrong_types_is_refused_by_key[width_a_string] "
        f"{THW}::test_export_config_of_wrong_types_is_refused_by_key[zero_heads]"),
    Bug("hf_config_types", P, "    if not (isinstance(v, int) and not isinstance(v, bool) and v >= least):",
        "    if False:", "a Hugging Face config.json size of the wrong type is refused naming the file and key",
        f"{THW}::test_hf_config_of_wrong_types_is_refused_by_key"),
    Bug("torch_error_unnamed", P, "    except Exception as e:  # noqa: BLE001 (whatever torch.load",
        "    except OSError as e:  # noqa: BLE001 (whatever torch.load",
        "a file torch.load cannot read is refused in one line naming it",
        f"{THW}::test_not_a_checkpoint_is_refused_by_name"),
    # --- official X-FM checkpoints (pretrained.convert_xfm)
    Bug("official_fusion_qk_swapped", P, 'tuple(f"{a}.self.{x}.{p}" for x in ("query", "key", "value"))',
        'tuple(f"{a}.self.{x}.{p}" for x in ("key", "query", "value"))',
        "an official fusion layer's query, key, value are concatenated in that order into attn.qkv",
        f"{TOX}::test_every_official_tensor_is_placed_or_listed_and_the_outputs_are_equal"),
    Bug("official_token_type_not_folded", P, "    if tt is not None and pos in src:\n        src[pos] = src[pos] + tt[0]",
        "    if tt is not None and pos in src:\n        src[pos] = src[pos]",
        "RoBERTa's token-type row is folded into every position row",
        f"{TOX}::test_every_official_tensor_is_placed_or_listed_and_the_outputs_are_equal"),
    Bug("official_cross_kv_swapped", P, '(f"{c}.self.key.{p}", f"{c}.self.value.{p}")',
        '(f"{c}.self.value.{p}", f"{c}.self.key.{p}")',
        "an official cross-attention's key then value make cross_attn.kv",
        f"{TOX}::test_every_official_tensor_is_placed_or_listed_and_the_outputs_are_equal"),
    Bug("official_export_without_norm", P, "    for_official_weights(tok_path).save(", "    Tokenizer.load(tok_path).save(",
        "an official X-FM export reads text with the official normalisation, as the weights were trained",
        f"{TOX}::test_the_export_reads_text_as_the_official_weights_were_trained"),
    Bug("official_unknown_tensor_accepted", P, "    if rep.unexpected:\n        raise SystemExit(f\"error: {path}: {len(",
        "    if False:\n        raise SystemExit(f\"error: {path}: {len(",
        "an official tensor with no place in the model refuses the file",
        f"{TOX}::test_a_tensor_with_no_place_is_refused"),
    Bug("ckpt_without_model", "lib/runlog.py",
        "if not isinstance(model, dict) or not all(isinstance(k, str) for k in model):",
        "if False:", "a torch file without a \"model\" state dict is no checkpoint, refused naming it",
        f"{THW}::test_not_a_checkpoint_is_refused_by_name"),
    Bug("tokenizer_garbage_unnamed", "lib/tokenizer.py", "except Exception as e:  # noqa: BLE001 (the tokenizers",
        "except ValueError as e:  # noqa: BLE001 (the tokenizers",
        "a tokenizer.json the tokenizers library cannot read is refused naming it",
        f"{THW}::test_garbage_tokenizer_is_refused_by_name"),
    Bug("export_tokenizer_entry_ignored", "finetune.py", 'ckpt["tokenizer"] if pretrained.is_export(cfg.init)',
        'os.path.join(run_dir, "tokenizer.json") if pretrained.is_export(cfg.init)',
        "finetune.py --init DIR reads the tokenizer the export's config.json names",
        f"{THW}::test_init_reads_the_tokenizer_the_export_names"),
    # --- Hugging Face FLAVA -> flava.FLAVA (lib/pretrained.py convert-flava, lib/tokenizer.py's BERT names)
    Bug("hf_flava_qk_swapped", P, 'attention.attention.{x}.{p}" for x in ("query", "key", "value")',
        'attention.attention.{x}.{p}" for x in ("key", "query", "value")',
        "Hugging Face FLAVA's query, key, value are concatenated into qkv in that order",
        f"{THF}::test_every_stage_agrees_with_transformers"),
    Bug("hf_flava_no_token_type_fold", P,
        '    fold_token_type(src, "text_model.")', '    pass',
        "Hugging Face FLAVA's token-type row 0 is folded into every position row",
        f"{THF}::test_every_stage_agrees_with_transformers"),
    Bug("hf_flava_position_rows", P,
        "# a shorter max_text_len: the first rows (positions from 0)\n        src[pos] = src[pos][:n_pos]",
        "# a shorter max_text_len: the first rows (positions from 0)\n        src[pos] = src[pos][-n_pos:]",
        "a shorter max_text_len keeps the first rows of the position table (positions start at 0)",
        f"{THF}::test_every_stage_agrees_with_transformers"),
    Bug("flava_head_eps_ignored", F, "            head.norm.eps = cfg.head_ln_eps", "            head.norm.eps = 1e-5",
        "the MLM / MIM / MMM heads' LayerNorm eps is FLAVAConfig.head_ln_eps",
        f"{THF}::test_every_stage_agrees_with_transformers"),
    Bug("hf_flava_eps_not_read", P, "ln_eps=eps, head_ln_eps=eps)", "ln_eps=eps)",
        "the heads' LayerNorm eps comes from the Hugging Face config (layer_norm_eps)",
        f"{THF}::test_the_export_holds_the_config_and_reports_the_unused"),
    Bug("hf_flava_pooler_refused", P, r'{r"(text|image|multimodal)_model\.pooler\..*"',
        r'{r"(text|image)_model\.pooler\..*"',
        "the three poolers are known and unused, not tensors without a place",
        f"{THF}::test_the_export_holds_the_config_and_reports_the_unused"),
    Bug("hf_flava_unplaced_tensor_kept", P,
        "    if rep.unexpected:\n        raise SystemExit(f\"error: {path}: the tensor {rep.unexpected[0]} has "
        "no place in flava.FLAVA", "    if False:\n        raise SystemExit(f\"error: {path}: the tensor "
        "{rep.unexpected[0]} has no place in flava.FLAVA",
        "a Hugging Face FLAVA tensor with no place in flava.FLAVA is refused in one line",
        f"{THF}::test_a_tensor_with_no_place_is_refused_in_one_line"),
    Bug("hf_flava_missing_encoder_tensor", P, "    if lost:", "    if False:",
        "a Hugging Face FLAVA file missing an encoder tensor is refused in one line",
        f"{THF}::test_a_tensor_with_no_place_is_refused_in_one_line"),
    Bug("hf_flava_model_heads_required", P,
        "    lost = [k for k in rep.missing if not k.startswith(FLAVA_PRETRAINING_ONLY)]",
        "    lost = list(rep.missing)", "a FlavaModel folder (no pre-training heads) converts, the heads at their init",
        f"{THF}::test_a_flava_model_folder_converts_with_the_heads_at_their_init"),
    Bug("tokenizer_bert_names", "lib/tokenizer.py", "for names in (self.SPECIALS, self.BERT_SPECIALS):",
        "for names in (self.SPECIALS,):", "a WordPiece tokenizer.json is read by BERT's special tokens' names",
        f"{THF}::test_the_wordpiece_tokenizer_is_read_by_its_special_tokens_names"),
    # --- the official X-FM text normalisation (lib/tokenizer.py, tests/test_text_norm.py)
    Bug("tn_no_lowercase", TK, 'PUNCTUATION.sub(" ", text.lower())', 'PUNCTUATION.sub(" ", text)',
        "the normalisation lowercases", f"{TTN}::test_lowercases"),
    Bug("tn_marks_deleted", TK, 'PUNCTUATION.sub(" ", text.lower())', 'PUNCTUATION.sub("", text.lower())',
        "a punctuation mark becomes a space, not nothing (red-circle: two words)",
        f"{TTN}::test_each_punctuation_mark_becomes_a_space"),
    Bug("tn_dash_slash_kept", TK, "#:;~/-]", "#:;~]",
        "- and / become spaces too", f"{TTN}::test_each_punctuation_mark_becomes_a_space"),
    Bug("tn_every_symbol", TK, "re.compile(r\"[,.'!?\\\"()*#:;~/-]\")", r're.compile(r"[^\w\s]")',
        "only the official marks go; & < > _ + = % [ ] @ stay", f"{TTN}::test_other_characters_stay"),
    Bug("tn_whitespace_kept", TK, 'text.lower()).split()', 'text.lower()).split(" ")',
        "runs of whitespace become one space, none at either end",
        f"{TTN}::test_whitespace_is_collapsed_and_stripped"),
    Bug("tn_no_word_cut", TK, 'return " ".join(words[:max_words])', 'return " ".join(words)',
        "captions and questions keep their first 30 words", f"{TTN}::test_cut_to_thirty_words"),
    Bug("tn_on_by_default", TK, "self.text_norm = bool(text_norm)", "self.text_norm = True",
        "the normalisation is off unless a run turns it on",
        f"{TTN}::test_off_by_default_a_fresh_tokenizer_encodes_as_the_library_does"),
    Bug("tn_never_applied", TK, "if self.text_norm and not document:", "if False:",
        "with it on, encode normalises captions, questions and retrieval queries",
        f"{TTN}::test_on_a_caption_a_question_and_a_retrieval_query_are_normalised_alike"),
    Bug("tn_documents_normalised", TK, "if self.text_norm and not document:", "if self.text_norm:",
        "documents (text-only pre-training, text classification) are never normalised",
        f"{TTN}::test_documents_are_never_normalised"),
    Bug("tn_text_stream_not_a_document", D, "self.dc.text_len, document=True)", "self.dc.text_len)",
        "the text-only stream encodes documents", f"{TTN}::test_documents_are_never_normalised"),
    Bug("tn_textcls_tokens_not_documents", FT, "ids = tok.encode(a, max_len, document)",
        "ids = tok.encode(a, max_len)", "text classification's sentences are documents",
        f"{TTN}::test_documents_are_never_normalised"),
    Bug("tn_lost_in_save", TK, "        if self.text_norm:\n            with open(",
        "        if False:\n            with open(",
        "tokenizer.json keeps the normalisation", f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_lost_in_json", TK, "        if not self.text_norm:\n            return self.hf.to_str()",
        "        if True:\n            return self.hf.to_str()",
        "to_json (what ranks and checkpoints get) keeps the normalisation",
        f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_file_ignored", TK, "cls(hf, own_norm if text_norm is None else text_norm)", "cls(hf, bool(text_norm))",
        "a loaded tokenizer.json keeps its own setting", f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_override_ignored", TK, "cls(hf, own_norm if text_norm is None else text_norm)", "cls(hf, own_norm)",
        "load(text_norm=) overrides the file (for_official_weights turns it on)",
        f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_given_tokenizer_raw", TK, "return Tokenizer.load(tokenizer_path, text_norm or None)",
        "return Tokenizer.load(tokenizer_path)", "--text_norm turns it on for a --tokenizer file too",
        f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_bpe_on_raw_texts", TK, "        if text_norm:\n            texts = [",
        "        if False:\n            texts = [", "a normalising tokenizer's BPE learns the normalised texts",
        f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_trained_off", TK, "tok = cls(hf, text_norm)", "tok = cls(hf)",
        "a tokenizer trained with text_norm has it on", f"{TTN}::test_it_survives_save_and_load_of_tokenizer_json"),
    Bug("tn_train_key_ignored", "lib/runlog.py", "cfg.image_root, cfg.text_norm)", "cfg.image_root)",
        "train.py --text_norm reaches the run's tokenizer",
        f"{TTN}::test_train_py_text_norm_reaches_the_runs_tokenizer"),
    Bug("tn_resume_may_change", T, '"eval_batch_size")', '"eval_batch_size", "text_norm")',
        "a resume keeps the run's normalisation (text_norm is not in RESUME_MAY_CHANGE)",
        f"{TTN}::test_a_resume_keeps_the_runs_normalisation"),
    Bug("tn_finetune_key_ignored", FT, "tokenizer.Tokenizer.load(tok_path, cfg.text_norm or None)",
        "tokenizer.Tokenizer.load(tok_path)", "finetune.py --text_norm turns it on for the task",
        f"{TFT}::test_text_norm_turns_on_for_a_task_and_its_folder_keeps_it", fast=False),
    Bug("tn_task_folder_loses_it", FT, 'env.tok.save(os.path.join(out, "tokenizer.json"))',
        'env.tok.hf.save(os.path.join(out, "tokenizer.json"))', "a task folder's tokenizer.json keeps the normalisation",
        f"{TFT}::test_text_norm_turns_on_for_a_task_and_its_folder_keeps_it", fast=False),
    # the DALL-E image codebook (flava.DalleCodebook, lib/pretrained.load_dalle_codebook)
    Bug("dalle_no_maxpool", F, "                x = F.max_pool2d(x, 2)", "                x = x",
        "a max-pool 2 between the groups (one code per 8 x 8 pixels)", f"{TDC}::{TDC_EQ}"),
    Bug("dalle_residual_swapped", F, "return self.skip(x) + self.gain * h", "return self.gain * self.skip(x) + h",
        "the gain scales the residual path, not the skip path", f"{TDC}::{TDC_EQ}"),
    Bug("dalle_relu_after_conv", F, "h = conv(F.relu(h))", "h = F.relu(conv(h))",
        "each residual conv reads a relu of its input (pre-activation)", f"{TDC}::{TDC_EQ}"),
    Bug("dalle_gain_per_group", F, "gain = 1 / (self.GROUPS * blocks) ** 2", "gain = 1 / blocks ** 2",
        "the residual gain is 1 / (all blocks)^2", f"{TDC}::{TDC_EQ}"),
    Bug("dalle_codes_column_major", F, ".argmax(1).flatten(1)", ".argmax(1).transpose(1, 2).flatten(1)",
        "codes are row-major over the grid, as the patches", f"{TDC}::{TDC_EQ}"),
    Bug("dalle_input_not_mapped", F, "return (1 - 2 * self.EPS) * x.clamp(0, 1) + self.EPS", "return x.clamp(0, 1)",
        "the codebook reads pixels mapped to [0.1, 0.9]", f"{TDC}::{TDC_PIX}"),
    Bug("dalle_input_clip_normalised", F, "x = images.float() * self.std + self.mean", "x = images.float()",
        "the codebook reads pixels in [0, 1], not CLIP-normalised ones", f"{TDC}::{TDC_PIX}"),
    Bug("dalle_unplaced_tensor_kept", P, "    if rep.unexpected:\n        raise SystemExit(f\"error: {path}: the "
        "tensor {rep.unexpected[0]} has no place in flava.DalleCodebook", "    if False:\n        raise "
        "SystemExit(f\"error: {path}: the tensor {rep.unexpected[0]} has no place in flava.DalleCodebook",
        "a codebook tensor with no place is refused",
        f"{TDC}::test_a_tensor_with_no_place_or_a_missing_one_is_refused"),
    Bug("dalle_folder_ignored", F, "    if os.path.isdir(cfg.image_tokenizer):\n        from lib",
        "    if False:\n        from lib", "train.py --image_tokenizer=DIR (a folder) means the DALL-E codebook",
        f"{TDC}::test_a_flava_run_trains_with_the_codebook_folder", fast=False),
    Bug("dalle_run_weights_not_loaded", F, "model.image_tokenizer.load_state_dict(share(dalle))", "share(dalle)",
        "every rank's DalleCodebook gets the folder's weights",
        f"{TDC}::test_a_flava_run_trains_with_the_codebook_folder", fast=False),
    Bug("dalle_export_without_codebook", P,
        'rep.notes.append(f"image tokenizer: {load_dalle_codebook(model.image_tokenizer, codebook)}")',
        'rep.notes.append("image tokenizer")', "convert-flava --codebook DIR exports the codebook's weights",
        f"{TDC}::test_convert_flava_with_the_codebook"),
    Bug("dalle_vocab_unchecked", P, 'if sizes["codebook_size"] != cfg.codebook_size:', "if False:",
        "convert-flava refuses a codebook whose vocabulary is not the heads'",
        f"{TDC}::test_convert_flava_with_the_codebook"),
    # train.py --init=DIR: a fresh run from an export's whole model (lib/pretrained.py, init_run)
    Bug("init_weights_not_loaded", T, "            pretrained.load_init(model, ctx.init, cfg.image_tokenizer)",
        "            pass", "--init loads every tensor of the export",
        f"{TX}::test_init_starts_a_fresh_run_from_the_exports_weights_and_tokenizer", fast=False),
    Bug("init_tokenizer_not_taken", P, 'return replace(cfg, **own, tokenizer=init["tokenizer"]), init',
        "return replace(cfg, **own), init", "--init's tokenizer is the export's tokenizer.json",
        f"{TX}::test_init_starts_a_fresh_run_from_the_exports_weights_and_tokenizer", fast=False),
    Bug("init_zero_codebook_accepted", P, "if book and not cfg.image_tokenizer and not any(v.any() for v in book):",
        "if False:", "--init refuses an image tokenizer of zeros unless --image_tokenizer gives one",
        f"{THF}::test_train_starts_from_the_converted_folder_with_an_image_tokenizer", fast=False),
    Bug("init_resumable", T, 'RESUME_MAY_CHANGE = ("resume", "out_dir",',
        'RESUME_MAY_CHANGE = ("resume", "init", "out_dir",', "a resume keeps the run's --init",
        f"{TX}::test_init_refuses_what_contradicts_the_export_and_is_not_resumable", fast=False),
    Bug("init_recipe_unchecked", P, "if (k in own and v != own[k]) or k in INIT_REPLACES:",
        "if k in INIT_REPLACES:", "--init refuses a --recipe or --config other than the export's",
        f"{TX}::test_init_refuses_what_contradicts_the_export_and_is_not_resumable", fast=False),
    Bug("init_codebook_refitted", T, 'if cfg.recipe == "flava" and (ctx.init is None or cfg.image_tokenizer):',
        'if cfg.recipe == "flava":', "--init keeps the export's image tokenizer (no k-means fitted over it)",
        f"{TDC}::test_train_starts_from_a_flava_export_with_the_codebook", fast=False),
    # regional compilation (lib/runtime.compile_blocks, model.Block.drop_rate)
    Bug("compile_drop_rate_baked", M, "            p = self.drop_rate if compiled else self.drop_path\n",
        "            p = self.drop_path\n",
        "a compiled block reads its drop-path rate as a tensor, not a per-layer constant",
        "tests/test_compile.py::test_each_kind_of_block_compiles_once_for_every_depth"),
    Bug("compile_eager_draws_at_rate_0", M, 'compiled = torch.compiler.is_compiling() and hasattr(self, "drop_rate")',
        'compiled = hasattr(self, "drop_rate")', "the eager path draws drop path's random numbers as the float formula",
        "tests/test_compile.py::test_eager_drop_path_draws_as_the_float_formula"),
    Bug("compile_before_checkpoint", "lib/runtime.py",
        "    if cfg.grad_ckpt:\n        checkpoint_blocks(model)\n    if cfg.compile:\n"
        "        compile_blocks(model, cfg.compile_mode)\n",
        "    if cfg.compile:\n        compile_blocks(model, cfg.compile_mode)\n    if cfg.grad_ckpt:\n"
        "        checkpoint_blocks(model)\n",
        "activation checkpointing first, then compile: the compiled graph holds the checkpoint",
        "tests/test_compile.py::test_compiled_blocks_hold_the_checkpoint"),
    Bug("compile_limit_default", "lib/runtime.py",
        "    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPHS_LIMIT)\n",
        "",
        "a block's code keeps a graph per kind and call signature of a step (more than torch's default 8)",
        "tests/test_compile.py::test_each_kind_of_block_compiles_once_for_every_depth"),
    Bug("compile_blocks_off", "lib/runtime.py", "    if cfg.compile:\n        compile_blocks(",
        "    if False:\n        compile_blocks(",
        "--compile compiles the blocks",
        "tests/test_compile.py::test_compiled_blocks_equal_eager_without_breaks_or_recompiles"),
    Bug("bench_blocks_not_compiled", "tools/bench.py", "            runtime.compile_blocks(model)\n",
        "            pass\n", "bench's compiled row compiles each kind of block",
        "tests/test_compile.py::test_bench_reports_the_compile_of_each_kind_of_block"),
    # a GPU node: preparation, resume memory, ITC precision, CUDA graphs, the sync-free loop, DDP's traffic
    Bug("fsdp_gathers_fp32", "lib/runtime.py",
        "    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)",
        "    policy = MixedPrecisionPolicy()", "--fsdp under bf16 gathers bf16 parameters and reduces fp32 gradients",
        "tests/test_fsdp.py::test_fsdp_accumulation_equals_one_big_micro_batch", fast=False),
    Bug("fsdp_policy_not_given", "lib/runtime.py",
        '    param_dtype = torch.bfloat16 if sharded and amp_setup(cfg.amp, device, sharded)[2] == "bf16" else None',
        "    param_dtype = None", "train.py's --fsdp takes the bf16 policy under --amp=bf16",
        "tests/test_fsdp.py::test_fsdp_takes_bf16_parameters_under_bf16_autocast"),
    Bug("gpu_check_loop_reference", "tools/gpu_check.py", '"--losses", "fast"', '"--losses", "reference"',
        "gpu_check's loop rows run train.py's fast path", "tests/test_bench.py::test_gpu_check_loop_row_times_train_py_own_step",
        fast=False),
    # uint8 images from the workers, normalised on the device (CUDA runs)
    Bug("uint8_not_normalised", "lib/runtime.py", '    if torch.is_tensor(out.get("image")) and out["image"].dtype == torch.uint8:',
        "    if False:", "runtime.to_device normalises uint8 images on the device", "tests/test_data.py::test_uint8_images_normalised_on_the_device_equal_to_tensor"),
    Bug("draft_ignores_crop_scale", "lib/transforms.py", "f = min(1.0, size / min(math.sqrt(scale[0] * W * H * r), W, H))",
        "f = min(1.0, size / max(W, H))", "a JPEG decodes at no less than the smallest crop's resolution",
        "tests/test_data.py::test_a_jpeg_decodes_at_the_resolution_its_crops_need"),
    Bug("dataset_no_draft", "data.py", "j, img, bad = self.load(index, crop_draft(self.dc.image_size, self.dc.crop_scale))",
        "j, img, bad = self.load(index)", "pair and image JPEGs decode at the scale their crops need",
        "tests/test_data.py::test_a_jpeg_decodes_at_the_resolution_its_crops_need"),
    Bug("uint8_region_crop_float", "data.py", "min_scale=self.dc.crop_scale[0], uint8=self.dc.uint8_images)",
        "min_scale=self.dc.crop_scale[0])", "a region batch's images are uint8 too", "tests/test_data.py::test_uint8_images_normalised_on_the_device_equal_to_tensor"),
    Bug("uint8_table_float64", "lib/transforms.py", "np.arange(256, dtype=np.float32)[None, :] / 255.0",
        "np.arange(256, dtype=np.float64)[None, :] / 255.0", "the table holds to_tensor's float32 values", "tests/test_data.py::test_uint8_images_normalised_on_the_device_equal_to_tensor"),
    Bug("uint8_codebook_unnormalised", "flava.py",
        "        images.append(transforms.normalize(x) if x.dtype == torch.uint8 else x)   # (uint8 on CUDA runs)",
        "        images.append(x)", "FLAVA's k-means reads normalised images from a uint8 dataset", "tests/test_data.py::test_uint8_images_normalised_on_the_device_equal_to_tensor"),
    Bug("cuda_streams_float", "lib/shards.py", "                         uint8_images=cuda)",
        "                         uint8_images=False)", "on CUDA the workers send uint8 images",
        "tests/test_train.py::test_cuda_runs_stream_uint8_images_and_four_workers"),
    # DDP on the fast path: one DDP per kind of update over what it reaches (runtime.PerUpdateDDP)
    Bug("per_update_ddp_off", "lib/runtime.py", '    if ddp and find_unused and getattr(loss_model, "fast", False):',
        "    if False:", "the fast path under torchrun reduces per kind of update, with no unused-parameter search",
        "tests/test_fsdp.py::test_ddp_on_the_fast_path_reduces_what_each_update_reached", fast=False),
    Bug("per_update_first_not_averaged", "lib/runtime.py", "        flat /= dist.get_world_size()\n", "",
        "a kind's first update averages its gradients over the ranks",
        "tests/test_fsdp.py::test_fast_path_ddp_run_equals_the_fsdp_run[fast]", fast=False),
    Bug("per_update_ddp_mid_update", "lib/runtime.py", "            self.kinds, self.recording = kinds, set()",
        "            self.kinds, self.recording = kinds, self.reached.setdefault(kinds, set())",
        "a kind's DDP is built after its first update has ended (and reduced what the ranks reached)",
        "tests/test_fsdp.py::test_ddp_on_the_fast_path_reduces_what_each_update_reached", fast=False),
    Bug("per_update_reduces_everything", "lib/runtime.py",
        "            ignore = [n for n in self.names if n not in self.reached[kinds]]", "            ignore = []",
        "a kind's DDP reduces only what the kind reached",
        "tests/test_fsdp.py::test_ddp_on_the_fast_path_reduces_what_each_update_reached", fast=False),
    Bug("per_update_syncs_every_micro_step", "lib/runtime.py",
        "            self.lean[kinds].require_backward_grad_sync = self.sync    # (no_sync: a micro-step before the last)\n",
        "", "a kind's DDP reduces once per update, after its last micro-batch",
        "tests/test_fsdp.py::test_ddp_on_the_fast_path_reduces_what_each_update_reached", fast=False),
    Bug("ddp_broadcasts_buffers", "lib/runtime.py", "                                                         broadcast_buffers=False,\n",
        "", "DDP broadcasts no buffer at each forward (none changes in training)",
        f"{TT}::test_ddp_with_accumulation_equals_one_process_full_batch", fast=False),
    Bug("nonfinite_read_every_update", "lib/runtime.py",
        '        self.on_device = optimizer.defaults["fused"] and scaler is None and not (ddp and cfg.fsdp)',
        "        self.on_device = False", "the fast path's loop skips a non-finite update on the device (no .item())",
        "tests/test_static.py::test_a_train_py_step_makes_the_host_wait_for_nothing", fast=False),
    Bug("found_inf_not_given", "lib/runtime.py",
        "            optimizer.found_inf = flag                               # fused AdamW: no update where 1",
        "            pass", "on the device, fused AdamW skips the non-finite update (found_inf)",
        f"{TT}::test_non_finite_losses_skip_then_stop_with_a_checkpoint", fast=False),
    Bug("fast_adamw_not_fused", T, '                                  fused=ctx.device.type == "cuda" or fast)',
        '                                  fused=ctx.device.type == "cuda")',
        "the fast path steps a fused AdamW (no host sync per parameter)",
        "tests/test_static.py::test_a_train_py_step_makes_the_host_wait_for_nothing", fast=False),
    Bug("prep_in_default_group", "lib/runtime.py", "dist.broadcast_object_list(box, src=0, group=prep_group())",
        "dist.broadcast_object_list(box, src=0)",
        "the ranks wait for rank 0's preparation in a group of their own (no NCCL watchdog timeout)",
        "tests/test_torchrun.py::test_rank0_shares_runs_once_and_every_rank_stops_with_rank0", fast=False),
    Bug("resume_ckpt_kept", T, "        ckpt.clear()  # restored", "        pass  # restored",
        "a resumed run frees the checkpoint once restored",
        f"{TT}::test_resume_reproduces_the_uninterrupted_run_exactly", fast=False),
    Bug("itc_scores_bf16", "lib/fast_losses.py", "with torch.autocast(a.device.type, enabled=False):",
        "with torch.autocast(a.device.type, enabled=torch.is_autocast_enabled(a.device.type)):",
        "the fast path's ITC similarities are fp32 under autocast", f"{TFP}::test_itc_scores_are_fp32_under_autocast"),
    Bug("graphs_with_accumulation", "lib/runtime.py", '    if accum > 1 and cfg.compile and cfg.compile_mode == "reduce-overhead":',
        "    if False:", "CUDA graphs with gradient accumulation are refused before any work",
        "tests/test_cli.py::test_train_refuses_bad_values_before_any_work"),
]


# ---------------------------------------------------------------------------------------------------------


def repo_files():
    """The files git would commit (tracked, and untracked but not ignored), minus data/, runs/ and .git."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and not f.startswith(SKIP) and os.path.isfile(os.path.join(ROOT, f))]


def copy_repo(dst):
    for f in repo_files():
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


# Each bug's pytest runs in a process forked from a server that has imported the heavy packages once (torch, numpy,
# ...): a bug then costs its tests, not a fresh interpreter and a torch import (about 1.5 s of CPU each). The server
# is single-threaded, so forking it is safe; the project's own modules are imported fresh in each child, from the
# bug's scratch copy.
# Imported once by the fork server, so no bug's pytest pays for them again (about a second a bug): torch's
# distributed, checkpointing and compiler modules that lib/runtime.py and the tests import, and the transformers
# models that are the parity oracles of tests/test_pretrained.py, test_hf_flava.py and test_dalle_codebook.py (a
# module that cannot be imported is skipped).
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "torch.distributed.tensor",
           "torch.utils.checkpoint", "torch.utils.data", "torch._dynamo", "numpy", "PIL.Image", "tokenizers", "tqdm",
           "pytest", "transformers.models.roberta.modeling_roberta", "transformers.models.beit.modeling_beit",
           "transformers.models.flava.modeling_flava"]
_forkserver = None


def _pytest_child(cwd, args, out_path):
    """In a child of the fork server: pytest.main(args) in cwd, stdout and stderr to out_path; exits with its code."""
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    sys.path[:] = [cwd] + [p for p in sys.path if p and not os.path.abspath(p).startswith(ROOT)]  # not the repository
    sys.dont_write_bytecode = True
    # the fork server's modules (torch...) never become garbage: frozen, the collections pytest makes when its run
    # ends (5, for unraisable exceptions) and any made by a test skip them, about 0.8 s a bug
    gc.freeze()
    import pytest as _pytest
    rc = int(_pytest.main(["-x", "-q", "-p", "no:cacheprovider", *args]))
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out_path + ".rc", "w") as f:  # the verdict; the fork server's exit-code channel can lose it (255)
        f.write(str(rc))
    sys.exit(rc)


def pytest(cwd, args, timeout):
    """-> (status, seconds, last lines). rc 1 = a test failed (caught); 0 = all passed; anything else = error."""
    global _forkserver
    if _forkserver is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")                 # read by torch when the server imports it
        os.environ.update(PYTHONDONTWRITEBYTECODE="1", COLUMNS="240")  # pytest's summary lines are cut at the width
        # the tests use no third-party pytest plugin; loading every installed one costs each bug's run most of a second
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(PRELOAD)
    out_path = os.path.join(os.path.dirname(cwd), "pytest.log")  # beside the copy: the copy stays the repository's
    for old in (out_path, out_path + ".rc"):
        if os.path.exists(old):
            os.remove(old)
    t0 = time.time()
    child = _forkserver.Process(target=_pytest_child, args=(cwd, args, out_path))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        out = open(out_path, errors="replace").read() if os.path.exists(out_path) else "(pytest did not start)"
        return "timeout", time.time() - t0, "\n".join(out.strip().splitlines()[-3:])
    out = open(out_path, errors="replace").read() if os.path.exists(out_path) else "(pytest did not start)"
    tail = "\n".join(out.strip().splitlines()[-3:])
    rc = int(open(out_path + ".rc").read()) if os.path.exists(out_path + ".rc") else child.exitcode
    return {0: "passed", 1: "failed"}.get(rc, f"error rc={rc}"), time.time() - t0, tail


def run_bug(bug, timeout):
    """Plant one bug in a scratch copy and run its tests -> (id, verdict, seconds, detail)."""
    with tempfile.TemporaryDirectory(prefix=f"mutate_{bug.id}_") as tmp:
        repo = os.path.join(tmp, "repo")
        copy_repo(repo)
        path = os.path.join(repo, bug.file)
        src = open(path).read()
        if src.count(bug.old) != 1:
            return bug.id, "stale", 0.0, f"`old` occurs {src.count(bug.old)} times in {bug.file}"
        with open(path, "w") as f:
            f.write(src.replace(bug.old, bug.new))
        status, dt, tail = pytest(repo, shlex.split(bug.tests), timeout)
        if status == "timeout":  # a hang is no verdict: run once more (a bug that hangs its tests times out twice)
            first = tail
            status, dt2, tail = pytest(repo, shlex.split(bug.tests), timeout)
            dt, tail = dt + dt2, f"first try timed out after {timeout:.0f} s; its last lines:\n{first}\nretry:\n{tail}"
    verdict = {"failed": "caught", "passed": "SURVIVED"}.get(status, status)
    return bug.id, verdict, dt, tail


def baseline(bugs, timeout):
    """Every selected test on the unmodified copy must pass, or 'caught' would mean nothing."""
    node_ids, by_k = set(), {}
    for b in bugs:
        args = shlex.split(b.tests)
        if "-k" in args:
            i = args.index("-k")
            by_k.setdefault(args[0], []).append(args[i + 1])
        else:
            node_ids.update(args)
    runs = ([sorted(node_ids)] if node_ids else []) + [[f, "-k", " or ".join(sorted(set(ks)))] for f, ks in by_k.items()]
    with tempfile.TemporaryDirectory(prefix="mutate_baseline_") as tmp:
        copy_repo(os.path.join(tmp, "repo"))
        for args in runs:
            status, dt, tail = pytest(os.path.join(tmp, "repo"), args, timeout * 4)
            if status != "passed":
                return False, f"{' '.join(args)}: {status}\n{tail}"
    return True, ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated bug ids")
    ap.add_argument("--fast", action="store_true", help="only the bugs whose tests take seconds")
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--jobs", type=int, default=1, help="bugs run in parallel")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per bug")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmodified copy")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pytest's last lines for caught bugs too")
    args = ap.parse_args(argv)
    ids = [b.id for b in CATALOGUE]
    assert len(ids) == len(set(ids)), "duplicate bug ids"
    bugs = CATALOGUE
    if args.only:
        want = args.only.split(",")
        unknown = set(want) - set(ids)
        if unknown:
            raise SystemExit(f"error: unknown bug ids {sorted(unknown)}")
        bugs = [b for b in bugs if b.id in want]
    if args.fast:
        bugs = [b for b in bugs if b.fast]
    if args.list:
        for b in bugs:
            print(f"{b.id:<24} {b.file:<10} {'fast' if b.fast else 'slow':<5} {b.rule}\n{'':<41}{b.tests}")
        print(f"{len(bugs)} bugs")
        return 0
    t0 = time.time()
    if not args.no_baseline:
        ok, why = baseline(bugs, args.timeout)
        if not ok:
            print(f"baseline: the tests fail WITHOUT any planted bug:\n{why}")
            return 2
        print(f"baseline: every selected test passes unmodified ({time.time() - t0:.0f} s)", flush=True)
    bad = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        slow_first = sorted(bugs, key=lambda b: b.fast)   # (so no job is left running a slow bug alone at the end)
        for bug_id, verdict, dt, tail in pool.map(lambda b: run_bug(b, args.timeout), slow_first):
            print(f"{verdict:<9} {bug_id:<24} {dt:5.1f} s", flush=True)
            if verdict != "caught":
                bad.append(bug_id)
            if tail and (verdict != "caught" or args.verbose or tail.startswith("first try timed out")):
                print("    " + tail.replace("\n", "\n    "))
    print(f"{len(bugs) - len(bad)}/{len(bugs)} planted bugs caught in {time.time() - t0:.0f} s"
          + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
