"""PQ evaluation routes agree: a worker pool and one process, the hotcoco engine and the NumPy engine."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_pq import random_pair, write_folder
from ldmseg.metrics.pq import evaluate_folders
from ldmseg.metrics.pq_hotcoco import hotcoco_stat
from ldmseg.metrics.pq_io import load_panoptic_set
from ldmseg.metrics.pq_match import AGNOSTIC_CATEGORIES


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
