"""PQ evaluator: hand-computed cases on small maps and on the real COCO sample, COCO's crowd / void
rules, missing predictions, and a cross-check against a slow loop-based reference on random maps.

All expected numbers are worked out in the comments: ``IoU = inter / (pred + gt - inter - pred∩void)``,
``PQ_c = ΣIoU / (TP + ½FP + ½FN)``, groups average over categories with TP + FP + FN > 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmseg.data.ids import decode_panoptic_png, encode_panoptic_png, id_to_rgb
from ldmseg.metrics.pq import CategoryStat, PQStat, evaluate_folders, match_segments, pq_image_stats
from ldmseg.metrics.pq_hotcoco import hotcoco_stat
from ldmseg.metrics.pq_io import PQInputError, load_panoptic_set, read_id_map
from ldmseg.metrics.pq_match import AGNOSTIC_CATEGORIES, dense_index

from paths import COCO_DATA, REPO

SAMPLE = COCO_DATA / "coco-panoptic-sample"
# the coco_sample fixture fails (does not skip) when the sample is missing from the checkout
needs_sample = pytest.mark.usefixtures("coco_sample")

PERSON, CAR, GROUND = 1, 2, 3
CATS = [{"id": PERSON, "name": "person", "isthing": 1}, {"id": CAR, "name": "car", "isthing": 1},
        {"id": GROUND, "name": "ground", "isthing": 0}]


def segs(ids: np.ndarray, cat: dict[int, int], crowd: tuple[int, ...] = (), order: list[int] | None = None) -> list:
    """segments_info of an id map: one entry per id in ``order`` (default: sorted), area = pixel count."""
    order = order if order is not None else sorted(cat)
    return [{"id": i, "category_id": cat[i], "iscrowd": int(i in crowd), "area": int((ids == i).sum())}
            for i in order]


def summary(gt, gt_cat, pred, pred_cat, agnostic=False, gt_crowd=(), gt_order=None, group="All"):
    gt, pred = np.array(gt), np.array(pred)
    stat = pq_image_stats(gt, segs(gt, gt_cat, gt_crowd, gt_order), pred, segs(pred, pred_cat), CATS, agnostic)
    cats = {1: {"isthing": 1}} if agnostic else CATS
    return stat.groups(cats)[group]


def check(result: dict, pq: float, sq: float, rq: float, tp: int, fp: int, fn: int) -> None:
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    assert result["pq"] == pytest.approx(pq, abs=1e-12)
    assert result["sq"] == pytest.approx(sq, abs=1e-12)
    assert result["rq"] == pytest.approx(rq, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# small synthetic maps


def test_identical_maps_score_one():
    gt = [[1, 1, 0], [3, 3, 3]]
    check(summary(gt, {1: PERSON, 3: GROUND}, gt, {1: PERSON, 3: GROUND}), 1, 1, 1, 2, 0, 0)


def test_eroded_segment():
    gt = [[1, 1, 1, 1, 1],
          [1, 1, 1, 1, 1],
          [2, 2, 2, 2, 2],
          [2, 2, 2, 2, 2]]
    pred = [[1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [2, 2, 2, 2, 2],
            [2, 2, 2, 2, 2]]
    # segment 1: 10 px in GT, 7 in the prediction, all inside -> IoU 7/10 (pred void on GT pixels
    # stays in the union); segment 2: IoU 1. One category: PQ = SQ = (0.7 + 1) / 2 = 0.85, RQ = 1
    check(summary(gt, {1: PERSON, 2: PERSON}, pred, {1: PERSON, 2: PERSON}), 0.85, 0.85, 1, 2, 0, 0)


def test_dropped_segment_is_a_false_negative():
    gt = [[1, 1, 2, 2],
          [1, 1, 2, 2]]
    pred = [[1, 1, 0, 0],
            [1, 1, 0, 0]]
    # TP = 1 (IoU 1), FN = 1: PQ = RQ = 1 / (1 + 0.5) = 2/3, SQ = 1
    check(summary(gt, {1: PERSON, 2: PERSON}, pred, {1: PERSON}), 2 / 3, 1, 2 / 3, 1, 0, 1)


def test_merged_segments():
    gt = [[1, 1, 1, 2, 2],
          [1, 1, 1, 2, 2],
          [3, 3, 3, 3, 3]]
    pred = [[1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [3, 3, 3, 3, 3]]
    # merged 1+2 (10 px) vs GT 1 (6 px): IoU 6/10 = 0.6 -> TP; GT 2 (4 px): IoU 4/10 -> FN; 3: IoU 1.
    # PQ = (0.6 + 1) / (2 + 0.5) = 0.64, SQ = 1.6 / 2 = 0.8, RQ = 2 / 2.5 = 0.8
    cat = {1: PERSON, 2: PERSON, 3: PERSON}
    check(summary(gt, cat, pred, {1: PERSON, 3: PERSON}), 0.64, 0.8, 0.8, 2, 0, 1)


def test_match_segments_exposes_the_pairs_pq_counts():
    """The merged-segments case, pair by pair: the matching pq_image_stats counts from."""
    gt = np.array([[1, 1, 1, 2, 2],
                   [1, 1, 1, 2, 2],
                   [3, 3, 3, 3, 3]])
    pred = np.array([[1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [3, 3, 3, 3, 3]])
    m = match_segments(gt, segs(gt, {1: PERSON, 2: PERSON, 3: PERSON}), pred, segs(pred, {1: PERSON, 3: PERSON}))
    assert m.inter.tolist() == [[6, 0], [4, 0], [0, 5]]
    assert m.iou == pytest.approx(np.array([[0.6, 0], [0.4, 0], [0, 1]]))
    assert m.match.tolist() == [[True, False], [False, False], [False, True]]
    assert (m.gt_area.tolist(), m.pred_area.tolist(), m.pred_on_void.tolist()) == ([6, 4, 5], [10, 5], [0, 0])


def test_merge_of_two_equal_halves_matches_neither():
    gt = [[1, 1, 2, 2],
          [3, 3, 3, 3]]
    pred = [[1, 1, 1, 1],
            [3, 3, 3, 3]]
    # IoU(merged, 1) = IoU(merged, 2) = 2/4 = 0.5, not > 0.5: FP 1, FN 2; segment 3 TP.
    # PQ = RQ = 1 / (1 + 0.5 + 1) = 0.4, SQ = 1
    cat = {1: PERSON, 2: PERSON, 3: PERSON}
    check(summary(gt, cat, pred, {1: PERSON, 3: PERSON}), 0.4, 1, 0.4, 1, 1, 2)


def test_split_stuff_region():
    gt = [[1, 1, 0, 0, 0, 0],
          [5, 5, 5, 5, 5, 5],
          [5, 5, 5, 5, 5, 5]]
    pred = [[1, 1, 0, 0, 0, 0],
            [5, 5, 5, 5, 6, 6],
            [5, 5, 5, 5, 6, 6]]
    # stuff 5 (12 px) split into 5 (8 px) and 6 (4 px): IoU(5, 5) = 8/12 = 2/3 -> TP, 6 -> FP.
    # Stuff: PQ = (2/3) / 1.5 = 4/9, SQ = 2/3, RQ = 1/1.5 = 2/3. Things: person 1 perfect.
    # All = mean over {person, ground}: PQ = (1 + 4/9) / 2 = 13/18, SQ = (1 + 2/3) / 2 = 5/6,
    # RQ = (1 + 2/3) / 2 = 5/6
    gt_cat, pred_cat = {1: PERSON, 5: GROUND}, {1: PERSON, 5: GROUND, 6: GROUND}
    check(summary(gt, gt_cat, pred, pred_cat, group="Stuff"), 4 / 9, 2 / 3, 2 / 3, 1, 1, 0)
    check(summary(gt, gt_cat, pred, pred_cat, group="Things"), 1, 1, 1, 1, 0, 0)
    check(summary(gt, gt_cat, pred, pred_cat), 13 / 18, 5 / 6, 5 / 6, 2, 1, 0)
    # class-agnostic: one category, ΣIoU = 1 + 2/3, TP 2, FP 1: PQ = (5/3) / 2.5 = 2/3,
    # SQ = (5/3) / 2 = 5/6, RQ = 2 / 2.5 = 0.8
    check(summary(gt, gt_cat, pred, pred_cat, agnostic=True), 2 / 3, 5 / 6, 0.8, 2, 1, 0)
    assert summary(gt, gt_cat, pred, pred_cat, agnostic=True, group="Stuff")["n"] == 0


def test_shifted_mask():
    gt = [[9, 9, 9, 9, 9, 9],
          [1, 1, 1, 1, 9, 9],
          [1, 1, 1, 1, 9, 9],
          [9, 9, 9, 9, 9, 9]]
    by_one = [[9, 9, 9, 9, 9, 9],
              [9, 1, 1, 1, 1, 9],
              [9, 1, 1, 1, 1, 9],
              [9, 9, 9, 9, 9, 9]]
    cat = {1: PERSON, 9: GROUND}
    # person (8 px) shifted by one column: inter 6, union 8 + 8 - 6 = 10 -> IoU 0.6.
    # ground (16 px each): inter 14, union 16 + 16 - 14 = 18 -> IoU 7/9.
    # All: PQ = SQ = (0.6 + 7/9) / 2 = 31/45, RQ = 1
    check(summary(gt, cat, by_one, cat), 31 / 45, 31 / 45, 1, 2, 0, 0)
    by_two = [[9, 9, 9, 9, 9, 9],
              [9, 9, 1, 1, 1, 1],
              [9, 9, 1, 1, 1, 1],
              [9, 9, 9, 9, 9, 9]]
    # by two columns: person inter 4, union 12 -> 1/3: FP 1 and FN 1 (PQ_person = 0);
    # ground inter 12, union 20 -> 0.6. Person PQ = SQ = RQ = 0; ground PQ = SQ = 0.6, RQ = 1.
    # All: PQ = SQ = (0 + 0.6) / 2 = 0.3, RQ = (0 + 1) / 2 = 0.5
    check(summary(gt, cat, by_two, cat), 0.3, 0.3, 0.5, 1, 1, 1)


def test_predicted_pixels_on_void_leave_the_union():
    gt = [[0, 0, 0, 0],
          [1, 1, 1, 1],
          [1, 1, 1, 1]]
    pred = [[1, 1, 1, 1],
            [1, 1, 1, 1],
            [1, 1, 1, 1]]
    # pred 12 px, 4 on void: union = 12 + 8 - 8 - 4 = 8 -> IoU 1 (8/12 without the rule)
    check(summary(gt, {1: PERSON}, pred, {1: PERSON}), 1, 1, 1, 1, 0, 0)
    # a prediction lying only on void is excused (all of it on void): no FP
    pred2 = [[2, 2, 0, 0],
             [1, 1, 1, 1],
             [1, 1, 1, 1]]
    check(summary(gt, {1: PERSON}, pred2, {1: PERSON, 2: CAR}), 1, 1, 1, 1, 0, 0)


def test_unmatched_prediction_excused_only_above_half_on_void():
    gt = [[0] * 12,
          [1] * 12]
    # P (id 7) = 6 void px + 4 px of segment 1 = 10 px, 6/10 = 0.6 > 0.5 on void -> excused.
    # Segment 1 (12 px) vs pred 1 (8 px, cols 4..11): IoU 8/12 -> TP. PQ = SQ = 2/3, RQ = 1
    excused = [[7] * 6 + [0] * 6,
               [7] * 4 + [1] * 8]
    check(summary(gt, {1: PERSON}, excused, {1: PERSON, 7: PERSON}), 2 / 3, 2 / 3, 1, 1, 0, 0)
    # P = 5 void px + 5 px of segment 1: exactly half on void, not more -> FP.
    # pred 1 = cols 5..11 (7 px): IoU 7/12 -> TP. PQ = (7/12) / 1.5 = 7/18, SQ = 7/12, RQ = 2/3
    half = [[7] * 5 + [0] * 7,
            [7] * 5 + [1] * 7]
    check(summary(gt, {1: PERSON}, half, {1: PERSON, 7: PERSON}), 7 / 18, 7 / 12, 2 / 3, 1, 1, 0)


def test_crowd_segments_never_match_and_excuse_their_category():
    gt = [[4, 4, 4, 4, 1, 1, 1, 1],
          [2, 2, 2, 2, 2, 2, 2, 2]]
    gt_cat = {4: PERSON, 1: PERSON, 2: CAR}
    # the prediction repeats the crowd region as a person segment: the crowd is never matched
    # (TP 2, not 3) and never FN; the prediction lies fully on its category's crowd -> excused
    check(summary(gt, gt_cat, gt, gt_cat, gt_crowd=(4,)), 1, 1, 1, 2, 0, 0)
    # the same pixels predicted as a car: a car has no crowd region -> FP for car.
    # person PQ 1; car TP 1 FP 1: PQ = RQ = 1/1.5; All PQ = RQ = (1 + 2/3) / 2 = 5/6, SQ 1
    as_car = {4: CAR, 1: PERSON, 2: CAR}
    check(summary(gt, gt_cat, gt, as_car, gt_crowd=(4,)), 5 / 6, 1, 5 / 6, 2, 1, 0)
    # class-agnostic: one category, so the crowd excuses it again
    check(summary(gt, gt_cat, gt, as_car, gt_crowd=(4,), agnostic=True), 1, 1, 1, 2, 0, 0)


def test_only_the_last_crowd_segment_of_a_category_counts():
    gt = [[4, 4, 4, 4, 5, 5, 5, 5, 1, 1, 1, 1]]
    pred = [[4, 4, 4, 4, 0, 0, 0, 0, 1, 1, 1, 1]]  # predicts crowd 4's region, not crowd 5's
    gt_cat, pred_cat = {4: PERSON, 5: PERSON, 1: PERSON}, {4: PERSON, 1: PERSON}
    # listed [4, 5, 1]: the person crowd region is 5 (listed last); prediction 4 lies on crowd 4,
    # which does not count -> FP. TP 1 FP 1: PQ = RQ = 1/1.5 = 2/3
    check(summary(gt, gt_cat, pred, pred_cat, gt_crowd=(4, 5), gt_order=[4, 5, 1]), 2 / 3, 1, 2 / 3, 1, 1, 0)
    # listed [5, 4, 1]: the crowd region is 4 -> excused, PQ 1
    check(summary(gt, gt_cat, pred, pred_cat, gt_crowd=(4, 5), gt_order=[5, 4, 1]), 1, 1, 1, 1, 0, 0)
    # crowds of different categories: class-aware, 4 is the person crowd -> excused;
    # class-agnostic, all crowds share one category and 5 (listed last) is its region -> FP
    gt_cat2 = {4: PERSON, 5: CAR, 1: PERSON}
    check(summary(gt, gt_cat2, pred, pred_cat, gt_crowd=(4, 5), gt_order=[4, 5, 1]), 1, 1, 1, 1, 0, 0)
    check(summary(gt, gt_cat2, pred, pred_cat, gt_crowd=(4, 5), gt_order=[4, 5, 1], agnostic=True),
          2 / 3, 1, 2 / 3, 1, 1, 0)


def test_gt_area_is_taken_from_the_json_as_in_panopticapi():
    gt = np.array([[1, 1, 1, 1]])
    stat = pq_image_stats(gt, [{"id": 1, "category_id": PERSON, "area": 6}], gt,
                          [{"id": 1, "category_id": PERSON}], CATS)
    # union = 4 + 6 (JSON) - 4 - 0 = 6 -> IoU 4/6
    assert stat.per_category[PERSON].iou == pytest.approx(4 / 6)
    stat = pq_image_stats(gt, [{"id": 1, "category_id": PERSON}], gt, [{"id": 1, "category_id": PERSON}], CATS)
    assert stat.per_category[PERSON].iou == 1.0  # no JSON area: the pixel count


def test_malformed_predictions_raise():
    gt = np.array([[1, 1, 2, 2]])
    gt_segs = [{"id": 1, "category_id": PERSON}, {"id": 2, "category_id": CAR}]
    with pytest.raises(PQInputError, match=r"image 7: the predicted PNG holds segment id\(s\) \[2\]"):
        pq_image_stats(gt, gt_segs, gt, gt_segs[:1], CATS, image_id=7)
    with pytest.raises(PQInputError, match=r"\[3\] are listed in segments_info but absent"):
        pq_image_stats(gt, gt_segs, gt, gt_segs + [{"id": 3, "category_id": CAR}], CATS)
    with pytest.raises(PQInputError, match="not among the ground truth's categories"):
        pq_image_stats(gt, gt_segs, gt, [{"id": 1, "category_id": 99}, gt_segs[1]], CATS)
    with pytest.raises(PQInputError, match="more than once"):
        pq_image_stats(gt, gt_segs, gt, gt_segs + gt_segs[:1], CATS)
    with pytest.raises(PQInputError, match="predict at the ground truth's size"):
        pq_image_stats(gt, gt_segs, gt[:, :2], gt_segs[:1], CATS)
    # class-agnostic ignores categories entirely
    assert pq_image_stats(gt, gt_segs, gt, [{"id": 1}, {"id": 2}], CATS, True).per_category[1].tp == 2


def test_stats_add_up_and_summary_skips_empty_categories():
    a = PQStat({PERSON: CategoryStat(tp=1, fp=0, fn=1, iou=0.75)})
    b = pq_image_stats(np.array([[1, 1]]), [{"id": 1, "category_id": CAR}], np.array([[1, 1]]),
                       [{"id": 1, "category_id": CAR}], CATS)
    total = sum([a, b])
    # person: 0.75 / 1.5 = 0.5; car: 1; ground has no counts and is skipped: PQ = 0.75, n = 2
    s = total.summary(CATS)
    assert s["n"] == 2 and s["pq"] == pytest.approx(0.75) and (s["tp"], s["fn"]) == (2, 1)
    assert total.summary(CATS, isthing=False) == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0, "n": 0}
    assert a.per_category[PERSON].tp == 1  # + does not modify its operands


def test_dense_index_with_many_keys():
    rng = np.random.default_rng(1)
    keys = np.concatenate([[0, 2**24 - 1], rng.choice(2**24 - 2, 3000, replace=False) + 1]).astype(np.uint32)
    ids = rng.choice(keys, 5000)
    ids[::7] = rng.integers(0, 2**24, len(ids[::7]))  # mostly not keys
    values = np.arange(1, len(keys) + 1, dtype=np.int32)
    out = dense_index(ids.astype(np.uint32), keys, values)
    position = {k: i for i, k in enumerate(keys.tolist())}
    assert out.tolist() == [values[position[i]] if i in position else 0 for i in ids.tolist()]
    # the table is clean again: a second lookup with other keys sees none of the first ones
    assert not dense_index(ids.astype(np.uint32), np.array([5], np.uint32), np.array([9], np.int32))[ids != 5].any()


# ---------------------------------------------------------------------------------------------
# folders: the real COCO sample and its perturbations


def write_folder(root: Path, images: list[tuple[int, np.ndarray, list]], categories=None) -> Path:
    """A COCO panoptic folder (panoptic/*.png + panoptic.json) from (image id, id map, segments_info)."""
    (root / "panoptic").mkdir(parents=True)
    anns = []
    for image_id, ids, info in images:
        name = f"{image_id:012d}.png"
        (root / "panoptic" / name).write_bytes(encode_panoptic_png(ids))
        anns.append({"image_id": image_id, "file_name": name, "segments_info": info})
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": m.shape[0], "width": m.shape[1]}
                       for i, m, _ in images], "annotations": anns}
    if categories is not None:
        data["categories"] = categories
    (root / "panoptic.json").write_text(json.dumps(data))
    return root


def sample_images() -> list[tuple[int, np.ndarray, list]]:
    data = json.loads((SAMPLE / "panoptic.json").read_text())
    return [(a["image_id"], read_id_map(SAMPLE / "panoptic" / a["file_name"]).astype(np.int64),
             [dict(s) for s in a["segments_info"]]) for a in data["annotations"]]


def perturbed_sample(tmp_path: Path, change) -> Path:
    """Prediction folder = the sample with ``change(ids, segments_info)`` applied to image 142238."""
    images = []
    for image_id, ids, info in sample_images():
        if image_id == 142238:
            ids, info = change(ids.copy(), info)
        images.append((image_id, ids, info))
    return write_folder(tmp_path / "pred", images)


def sample_checks(result, all_, things, stuff):
    for name, expect in (("All", all_), ("Things", things), ("Stuff", stuff)):
        check(result[name], *expect)


# The sample's non-crowd segments (checked below): image 142238: 13 persons (cat 1), a sports ball
# (37), stuff 184, 187, 193; image 439180: 13 persons, 2 cat 8, 11 cat 19, stuff 125, 184, 187, 193.
# 47 in all; per category TP: 1: 26, 8: 2, 19: 11, 37: 1, 125: 1, 184: 2, 187: 2, 193: 2.
# Things = {1, 8, 19, 37}, Stuff = {125, 184, 187, 193}: n = 8 = 4 + 4.
# Crowds: person 3153362 (142238); person 5120499 and cat-19 16175517 (439180), listed in this order.


@needs_sample
def test_sample_against_itself(tmp_path):
    images = sample_images()
    noncrowd = [sum(1 for s in info if not s["iscrowd"]) for _, _, info in images]
    assert noncrowd == [17, 30]
    result = evaluate_folders(SAMPLE, SAMPLE, workers=1)
    sample_checks(result, (1, 1, 1, 47, 0, 0), (1, 1, 1, 40, 0, 0), (1, 1, 1, 7, 0, 0))
    assert (result["All"]["n"], result["Things"]["n"], result["Stuff"]["n"], result["n_images"]) == (8, 4, 4, 2)

    # class-agnostic: the two crowds of 439180 share one category whose crowd region is 16175517
    # (listed last); the predicted copy of crowd 5120499 lies on neither void nor that region -> FP.
    # TP 47, FP 1: PQ = RQ = 47 / 47.5, SQ = 1
    agnostic = evaluate_folders(SAMPLE, SAMPLE, class_agnostic=True, workers=1)
    check(agnostic["All"], 47 / 47.5, 1, 47 / 47.5, 47, 1, 0)
    assert agnostic["Things"] == agnostic["All"] and agnostic["Stuff"]["n"] == 0

    # a prediction that leaves the crowd regions void (as LDMSeg does) scores 1 class-agnostic
    def crowd_to_void(ids, info):
        for s in [s for s in info if s["iscrowd"]]:
            ids[ids == s["id"]] = 0
            info.remove(s)
        return ids, info

    pred = write_folder(tmp_path / "pred", [(i, *crowd_to_void(m, info)) for i, m, info in images])
    check(evaluate_folders(SAMPLE, pred, class_agnostic=True, workers=1)["All"], 1, 1, 1, 47, 0, 0)


@needs_sample
def test_sample_dropped_person(tmp_path):
    def drop(ids, info):  # person 4917453 (477 px) becomes void
        ids[ids == 4917453] = 0
        return ids, [s for s in info if s["id"] != 4917453]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, drop), workers=1)
    # person: TP 25, FN 1 -> PQ = RQ = 25/25.5, SQ 1; the 7 other categories 1.
    p = 25 / 25.5
    sample_checks(result, ((7 + p) / 8, 1, (7 + p) / 8, 46, 0, 1), ((3 + p) / 4, 1, (3 + p) / 4, 39, 0, 1),
                  (1, 1, 1, 7, 0, 0))
    # class-agnostic: TP 46, FP 1 (crowd copy, see above), FN 1: PQ = RQ = 46 / 47
    check(evaluate_folders(SAMPLE, tmp_path / "pred", class_agnostic=True, workers=1)["All"],
          46 / 47, 1, 46 / 47, 46, 1, 1)


@needs_sample
def test_sample_merged_stuff(tmp_path):
    def merge(ids, info):  # stuff 187 (11829830, 8204 px) joins stuff 184 (2330219, 130762 px)
        ids[ids == 11829830] = 2330219
        return ids, [s for s in info if s["id"] != 11829830]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, merge), workers=1)
    # 184: IoU 130762 / (130762 + 8204) = 130762/138966 in 142238 (+1 in 439180): PQ = SQ = (1 + m)/2.
    # 187: FN in 142238, TP in 439180: PQ = RQ = 1/1.5, SQ 1.
    m = 130762 / 138966
    pq184, pq187 = (1 + m) / 2, 1 / 1.5
    sample_checks(result, ((6 + pq184 + pq187) / 8, (7 + pq184) / 8, (7 + pq187) / 8, 46, 0, 1),
                  (1, 1, 1, 40, 0, 0), ((2 + pq184 + pq187) / 4, (3 + pq184) / 4, (3 + pq187) / 4, 6, 0, 1))


@needs_sample
def test_sample_split_stuff(tmp_path):
    def split(ids, info):  # stuff 193 (10025880): its pixels at x >= 480 get the new id 10025881
        part = ids == 10025880
        part[:, :480] = False
        assert (part.sum(), (ids == 10025880).sum()) == (23776, 75100)
        ids[part] = 10025881
        return ids, info + [{"id": 10025881, "category_id": 193, "iscrowd": 0}]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, split), workers=1)
    # 193: left part 75100 - 23776 = 51324 px, IoU 51324/75100 -> TP; right part -> FP.
    # 193 over both images: TP 2, FP 1, ΣIoU = 1 + s: PQ = (1 + s)/2.5, SQ = (1 + s)/2, RQ = 2/2.5
    s = 51324 / 75100
    pq, sq, rq = (1 + s) / 2.5, (1 + s) / 2, 0.8
    sample_checks(result, ((7 + pq) / 8, (7 + sq) / 8, (7 + rq) / 8, 47, 1, 0), (1, 1, 1, 40, 0, 0),
                  ((3 + pq) / 4, (3 + sq) / 4, (3 + rq) / 4, 7, 1, 0))


@needs_sample
def test_sample_eroded_person(tmp_path):
    def erode(ids, info):  # person 3937500 (3528 px) loses every pixel with a 4-neighbour outside it
        seg = ids == 3937500
        inner = seg.copy()
        inner[1:] &= seg[:-1]
        inner[:-1] &= seg[1:]
        inner[:, 1:] &= seg[:, :-1]
        inner[:, :-1] &= seg[:, 1:]
        assert (seg.sum(), inner.sum()) == (3528, 3138)
        ids[seg & ~inner] = 0
        return ids, info

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, erode), workers=1)
    # person: 26 TPs, one with IoU 3138/3528: PQ = SQ = (25 + e)/26, RQ 1
    p = (25 + 3138 / 3528) / 26
    sample_checks(result, ((7 + p) / 8, (7 + p) / 8, 1, 47, 0, 0), ((3 + p) / 4, (3 + p) / 4, 1, 40, 0, 0),
                  (1, 1, 1, 7, 0, 0))


@needs_sample
def test_sample_shifted_ball(tmp_path):
    def shift(ids, info):  # sports ball 16757838 (175 px) moves 8 px right; its old pixels become void
        ball = ids == 16757838
        moved = np.zeros_like(ball)
        moved[:, 8:] = ball[:, :-8]
        # it lands on 58 of its old pixels, 41 sky (184) and 76 person-crowd (3153362) pixels, no void
        assert (ball.sum(), moved.sum(), (ball & moved).sum()) == (175, 175, 58)
        assert ((ids[moved & ~ball] == 2330219).sum(), (ids[moved & ~ball] == 3153362).sum()) == (41, 76)
        ids[ball] = 0
        ids[moved] = 16757838
        return ids, info

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, shift), workers=1)
    # ball: IoU 58 / (175 + 175 - 58) = 0.199 -> FP + FN, PQ_37 = SQ = RQ = 0.
    # sky 184: pred 130762 - 41 px inside GT: IoU 130721/130762 (+1 in 439180): PQ = SQ = (1 + k)/2.
    # The crowd copy loses 76 px but still lies fully on its crowd -> excused.
    k = (1 + 130721 / 130762) / 2
    sample_checks(result, ((6 + k) / 8, (6 + k) / 8, 7 / 8, 46, 1, 1), (3 / 4, 3 / 4, 3 / 4, 39, 1, 1),
                  ((3 + k) / 4, (3 + k) / 4, 1, 7, 0, 0))
    # class-agnostic: the ball has 76/175 < 0.5 on the (only) crowd of 142238 -> still FP; plus the
    # crowd-copy FP of 439180: TP 46, FP 2, FN 1, ΣIoU = 45 + 130721/130762, denominator 47.5
    iou = 45 + 130721 / 130762
    check(evaluate_folders(SAMPLE, tmp_path / "pred", class_agnostic=True, workers=1)["All"],
          iou / 47.5, iou / 46, 46 / 47.5, 46, 2, 1)


@needs_sample
def test_missing_prediction_is_an_error_or_void(tmp_path):
    images = sample_images()
    pred = write_folder(tmp_path / "pred", images[1:])  # no prediction for 142238
    with pytest.raises(PQInputError, match=r"no prediction for image 142238 .*missing='void'"):
        evaluate_folders(SAMPLE, pred, workers=1)
    # all-void: the 17 non-crowd segments of 142238 are FN; cat 37 and the stuff of 142238 too.
    # per category: 1: TP 13 FN 13 -> 13/19.5 = 2/3; 8, 19, 125: 1; 37: TP 0 FN 1 -> 0;
    # 184, 187, 193: TP 1 FN 1 -> 1/1.5 = 2/3 each. All PQ = RQ = (2/3 + 3 + 0 + 3 * 2/3) / 8 = 17/24;
    # SQ is 1 for every category with a TP and 0 for 37: SQ = 7/8
    result = evaluate_folders(SAMPLE, pred, missing="void", workers=1)
    check(result["All"], 17 / 24, 7 / 8, 17 / 24, 30, 0, 17)
    assert result["n_images"] == 2
    # only the images asked for
    only = evaluate_folders(SAMPLE, pred, image_ids=[439180], workers=1)
    assert only["n_images"] == 1 and only["All"]["pq"] == 1.0


@needs_sample
def test_cli(tmp_path):
    env_python = sys.executable
    images = sample_images()
    pred = write_folder(tmp_path / "pred", images[1:])
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(SAMPLE),
                          "--json", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 47, "fp": 0, "fn": 0, "n": 8}
    assert result["n_images"] == 2 and out.stderr == ""
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(SAMPLE),
                          "--json", "--engine", "numpy"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and json.loads(out.stdout) == result

    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(pred),
                          "--class-agnostic", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "142238" in out.stderr and "--missing void" in out.stderr
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred-json",
                          str(pred / "panoptic.json"), "--pred-masks", str(pred / "panoptic"), "--missing", "void",
                          "--class-agnostic", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    # 439180 as before (TP 30, FP 1 for the crowd copy), 142238 all-void: FN 17
    assert json.loads(out.stdout)["All"]["fn"] == 17 and "All" in out.stderr  # table on stderr

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "panoptic").mkdir()
    (tmp_path / "bad" / "panoptic.json").write_text("{not json")
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "panoptic.json is not readable JSON" in out.stderr
    shutil.rmtree(tmp_path / "pred" / "panoptic")
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(pred)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "mask folder" in out.stderr


@needs_sample
def test_read_id_map_matches_decode_panoptic_png(tmp_path):
    for png in sorted((SAMPLE / "panoptic").glob("*.png")):
        ids = read_id_map(png)
        assert ids.dtype == np.uint32
        assert np.array_equal(ids, decode_panoptic_png(png.read_bytes()))
    rgba = np.dstack([id_to_rgb(np.array([[1, 70000], [0, 2**24 - 1]])), np.array([[255, 0], [7, 128]], np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert read_id_map(tmp_path / "a.png").tolist() == [[1, 70000], [0, 2**24 - 1]]  # alpha ignored


# ---------------------------------------------------------------------------------------------
# cross-check against a slow, literal reference on random maps


def reference_stats(gt, gt_segs, pred, pred_segs, agnostic, excused_by_crowd=None):
    """Per-category [tp, fp, fn, iou], one segment pair at a time with boolean masks.

    ``excused_by_crowd[0]`` counts unmatched predictions excused only thanks to a crowd region."""
    excused_by_crowd = excused_by_crowd if excused_by_crowd is not None else [0]
    cat = (lambda s: 1) if agnostic else (lambda s: s["category_id"])
    stats = defaultdict(lambda: [0, 0, 0, 0.0])
    gt_matched, pred_matched = set(), set()
    for g in gt_segs:
        for p in pred_segs:
            if g["iscrowd"] or cat(g) != cat(p):
                continue
            inter = np.sum((gt == g["id"]) & (pred == p["id"]))
            if inter == 0:
                continue
            union = np.sum(pred == p["id"]) + g["area"] - inter - np.sum((gt == 0) & (pred == p["id"]))
            if inter / union > 0.5:
                stats[cat(g)][0] += 1
                stats[cat(g)][3] += inter / union
                gt_matched.add(g["id"])
                pred_matched.add(p["id"])
    crowd_of = {}
    for g in gt_segs:
        if g["iscrowd"]:
            crowd_of[cat(g)] = g["id"]
        elif g["id"] not in gt_matched:
            stats[cat(g)][2] += 1
    for p in pred_segs:
        if p["id"] in pred_matched:
            continue
        mask = pred == p["id"]
        covered = np.sum(mask & (gt == 0))
        on_void = covered
        if cat(p) in crowd_of:
            covered += np.sum(mask & (gt == crowd_of[cat(p)]))
        if covered / mask.sum() <= 0.5:
            stats[cat(p)][1] += 1
        elif on_void / mask.sum() <= 0.5:
            excused_by_crowd[0] += 1
    return stats


def reference_groups(stats, categories):
    out = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        values = []
        for c in categories:
            if isthing is not None and (c["isthing"] == 1) != isthing:
                continue
            tp, fp, fn, iou = stats.get(c["id"], [0, 0, 0, 0.0])
            if tp + fp + fn:
                values.append((iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2)))
        n = len(values)
        out[name] = [sum(v[i] for v in values) / n if n else 0.0 for i in range(3)]
    return out


def random_scene(rng, h=12, w=16):
    ids = np.zeros((h, w), np.int64)
    used = rng.choice(2**24 - 1, 12, replace=False) + 1
    for sid in used:
        y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
        ids[y:y + rng.integers(2, h), x:x + rng.integers(2, w)] = sid
    if rng.random() < 0.7:  # a void patch
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        ids[y:y + 3, x:x + 4] = 0
    return ids


def random_pair(rng):
    cats = [1, 2, 3, 4, 5]  # 1-3 things, 4-5 stuff
    gt = random_scene(rng)
    gt_segs = [{"id": int(i), "category_id": int(rng.choice(cats)), "iscrowd": int(rng.random() < 0.25),
                "area": int((gt == i).sum())} for i in np.unique(gt) if i]
    pred = gt.copy()
    new = random_scene(rng)
    take = rng.random(gt.shape) < 0.15  # noise
    pred[take] = new[take]
    y, x = rng.integers(0, 8), rng.integers(0, 12)
    pred[y:y + 4, x:x + 5] = new[y:y + 4, x:x + 5]
    if rng.random() < 0.5:
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    gt_cat = {s["id"]: s["category_id"] for s in gt_segs}
    if rng.random() < 0.2 and gt_segs:  # an id of the PNG missing from segments_info: neither void nor segment
        gt_segs.pop(int(rng.integers(len(gt_segs))))
    if rng.random() < 0.2:  # a listed segment absent from the PNG: a FN unless crowd
        gt_segs.append({"id": 2**24 - 1, "category_id": 1, "iscrowd": 0, "area": 5})
    pred_segs = [{"id": int(i), "category_id": gt_cat.get(int(i), int(rng.choice(cats))) if rng.random() < 0.8
                  else int(rng.choice(cats))} for i in np.unique(pred) if i]
    return gt, gt_segs, pred, pred_segs


def test_matches_reference_on_random_maps():
    rng = np.random.default_rng(0)
    categories = [{"id": c, "isthing": int(c <= 3)} for c in (1, 2, 3, 4, 5)]
    total = {False: PQStat(), True: PQStat()}
    ref_total = {False: defaultdict(lambda: [0, 0, 0, 0.0]), True: defaultdict(lambda: [0, 0, 0, 0.0])}
    n_tp = n_fp = 0
    excused_by_crowd = [0]
    for _ in range(150):
        gt, gt_segs, pred, pred_segs = random_pair(rng)
        for agnostic in (False, True):
            stat = pq_image_stats(gt, gt_segs, pred, pred_segs, categories, agnostic)
            ref = reference_stats(gt, gt_segs, pred, pred_segs, agnostic, excused_by_crowd)
            got = {c: [s.tp, s.fp, s.fn] for c, s in stat.per_category.items()}
            assert got == {c: v[:3] for c, v in ref.items() if any(v[:3])}
            for c, v in ref.items():
                if v[0]:
                    assert stat.per_category[c].iou == pytest.approx(v[3], rel=1e-12)
            total[agnostic] += stat
            for c, v in ref.items():
                ref_total[agnostic][c] = [a + b for a, b in zip(ref_total[agnostic][c], v)]
            n_tp += sum(v[0] for v in ref.values())
            n_fp += sum(v[1] for v in ref.values())
    assert n_tp > 300 and n_fp > 300 and excused_by_crowd[0] > 20  # the random maps exercise every rule
    for agnostic, cats in ((False, categories), (True, [{"id": 1, "isthing": 1}])):
        ours = total[agnostic].groups(cats)
        ref = reference_groups(ref_total[agnostic], cats)
        for name in ("All", "Things", "Stuff"):
            assert [ours[name][k] for k in ("pq", "sq", "rq")] == pytest.approx(ref[name], rel=1e-12)


def test_worker_pool_gives_the_same_numbers(tmp_path):
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng) for _ in range(12)]
    categories = [{"id": c, "isthing": int(c <= 3)} for c in (1, 2, 3, 4, 5)]
    write_folder(tmp_path / "gt", [(i, g, gs) for i, (g, gs, _, _) in enumerate(pairs)], categories)
    write_folder(tmp_path / "pred", [(i, p, ps) for i, (_, _, p, ps) in enumerate(pairs)])
    one = evaluate_folders(tmp_path / "gt", tmp_path / "pred", workers=1, per_image=True)
    two = evaluate_folders(tmp_path / "gt", tmp_path / "pred", workers=2, per_image=True)
    assert one == two and one["n_images"] == 12 and 0 < one["All"]["pq"] < 1
    assert [r["image_id"] for r in two["per_image"]] == list(range(12))


def assert_same_result(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["n_images"] == b["n_images"]
    for name in ("All", "Things", "Stuff"):
        assert a[name] == pytest.approx(b[name], rel=1e-12)


def test_both_engines_give_the_same_numbers(tmp_path):
    """hotcoco (the default folder engine) and the NumPy engine agree on maps that exercise every rule:
    crowd regions, void, GT ids outside segments_info, listed GT segments absent from the PNG."""
    rng = np.random.default_rng(5)
    pairs = [random_pair(rng) for _ in range(40)]
    categories = [{"id": c, "isthing": int(c <= 3)} for c in (1, 2, 3, 4, 5)]
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_folder(gt, [(i, g, gs) for i, (g, gs, _, _) in enumerate(pairs)], categories)
    write_folder(pred, [(i, p, ps) for i, (_, _, p, ps) in enumerate(pairs)])
    gt_set, pred_set = load_panoptic_set(gt), load_panoptic_set(pred)
    for agnostic in (False, True):
        cats = AGNOSTIC_CATEGORIES if agnostic else gt_set.categories
        assert hotcoco_stat(gt_set, pred_set, list(range(40)), cats, agnostic) is not None  # no fallback here
        fast = evaluate_folders(gt, pred, class_agnostic=agnostic, engine="hotcoco")
        assert fast["All"]["tp"] > 100
        assert_same_result(fast, evaluate_folders(gt, pred, class_agnostic=agnostic, engine="numpy", workers=1))
        assert_same_result(evaluate_folders(gt, pred, class_agnostic=agnostic, image_ids=[3, 1, 4]),
                           evaluate_folders(gt, pred, class_agnostic=agnostic, image_ids=[3, 1, 4], engine="numpy",
                                            workers=1))
