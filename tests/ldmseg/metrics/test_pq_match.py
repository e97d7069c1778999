"""PQ evaluator on single images: segment matching and the PQ arithmetic on small hand-made maps, COCO's
crowd / void rules, malformed predictions, and adding up per-image statistics.

All expected numbers are worked out in the comments: ``IoU = inter / (pred + gt - inter - pred∩void)``,
``PQ_c = ΣIoU / (TP + ½FP + ½FN)``, groups average over categories with TP + FP + FN > 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers_pq import check
from ldmseg.metrics.pq import CategoryStat, PQStat, match_segments, pq_image_stats
from ldmseg.metrics.pq_io import PQInputError
from ldmseg.metrics.pq_match import dense_index

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
