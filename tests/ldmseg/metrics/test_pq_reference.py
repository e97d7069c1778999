"""PQ evaluator against a slow, literal reference implementation (one segment pair at a time, boolean
masks) on random maps."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from helpers_pq import random_pair
from ldmseg.metrics.pq import PQStat, pq_image_stats


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
