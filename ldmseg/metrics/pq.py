"""Panoptic quality (PQ = SQ · RQ) with the COCO panoptic semantics of panopticapi's ``pq_compute``.

The rules (matching at IoU > 0.5, void, crowd regions, class-agnostic mode) are written out in
:mod:`ldmseg.metrics.pq_match`, which scores one image in memory (:func:`pq_image_stats`,
:func:`match_segments`: used during training); :mod:`ldmseg.metrics.pq_stat` turns the counts into
PQ, SQ and RQ (**fractions in [0, 1], not percent**). This module scores folders in the COCO
panoptic layout (:func:`evaluate_folders`, ``ldmseg pq``).

Two engines score folders, with the same numbers: ``"hotcoco"`` (default; :mod:`ldmseg.metrics.pq_hotcoco`:
PNG decoding and matching in Rust, behind the project's checks of every ``segments_info``) and
``"numpy"`` (this package's own :func:`pq_image_stats` on PNGs decoded by PIL, in a process pool),
which also gives per-image results, scores missing predictions as void and names every input
problem hotcoco refuses.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from ldmseg.metrics.pq_hotcoco import FileEvaluation, hotcoco_stat
from ldmseg.metrics.pq_io import PanopticSet, PQInputError, load_panoptic_set, panoptic_paths, read_id_map
from ldmseg.metrics.pq_match import (AGNOSTIC_CATEGORIES, AGNOSTIC_CATEGORY_ID, EXCUSED_FRACTION, MATCH_IOU,
                                     SegmentMatching, match_segments, pq_image_stats)
from ldmseg.metrics.pq_stat import GROUPS, CategoryStat, PQStat

__all__ = ["AGNOSTIC_CATEGORIES", "AGNOSTIC_CATEGORY_ID", "ENGINES", "EXCUSED_FRACTION", "GROUPS", "MATCH_IOU",
           "MISSING_CHOICES", "CategoryStat", "PQInputError", "PQStat", "SegmentMatching", "evaluate_folders",
           "match_segments", "pq_image_stats"]

MISSING_CHOICES = ("error", "void")
ENGINES = ("hotcoco", "numpy")


@dataclass
class _Task:
    image_id: int
    file_name: str
    gt_path: str
    gt_segments: list
    pred_path: Optional[str]  # None: no prediction, scored as all-void
    pred_segments: list


def _evaluate_task(task: _Task, categories: Optional[dict], class_agnostic: bool) -> tuple[int, str, PQStat]:
    gt_ids = read_id_map(task.gt_path)
    if task.pred_path is None:
        pred_ids = np.zeros_like(gt_ids)
    else:
        pred_ids = read_id_map(task.pred_path)
    where = f"{task.image_id} ({task.pred_path or task.gt_path})"  # match_segments says "image {where}"
    stat = pq_image_stats(gt_ids, task.gt_segments, pred_ids, task.pred_segments, categories, class_agnostic,
                          image_id=where)
    return task.image_id, task.file_name, stat


def _evaluate_chunk(tasks: list[_Task], categories: Optional[dict], class_agnostic: bool) -> list:
    return [_evaluate_task(t, categories, class_agnostic) for t in tasks]


def _pair_tasks(gt: PanopticSet, pred: PanopticSet, missing: str, image_ids: Optional[Iterable[int]]) -> list[_Task]:
    if image_ids is None:
        wanted = list(gt.annotations)
    else:
        wanted = list(dict.fromkeys(int(i) for i in image_ids))
        unknown = [i for i in wanted if i not in gt.annotations]
        if unknown:
            raise PQInputError(f"image id(s) {unknown[:8]} are not in the ground truth {gt.json_path}; "
                               "pass ids of its annotations")
    tasks = []
    gt_dir, pred_dir = str(gt.masks_dir), str(pred.masks_dir)  # os.path.join: ~10x cheaper than Path per image
    for image_id in wanted:
        ann = gt.annotations[image_id]
        p = pred.annotations.get(image_id)
        if p is None and missing != "void":
            raise PQInputError(
                f"no prediction for image {image_id} ({ann['file_name']}) of the ground truth: "
                f"{pred.json_path} has no annotation with image_id {image_id}. Predict every ground-truth image, "
                "or score missing ones as all-void with missing='void' (ldmseg pq --missing void); "
                "images are never skipped")
        tasks.append(_Task(image_id, ann["file_name"], os.path.join(gt_dir, ann["file_name"]),
                           list(ann["segments_info"]), None if p is None else os.path.join(pred_dir, p["file_name"]),
                           [] if p is None else list(p["segments_info"])))
    return tasks


def _pool_context():
    """fork when this process runs no other Python thread (fast: workers start in milliseconds);
    otherwise (a Ray driver, a training loop) forkserver, which is safe with threads but, like
    spawn, re-imports the calling script: scripts then need ``if __name__ == "__main__":``."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _evaluate_tasks(tasks: list[_Task], categories: Optional[dict], class_agnostic: bool,
                    workers: Optional[int]) -> list[tuple[int, str, PQStat]]:
    """The NumPy engine: ``(image_id, file_name, stat)`` per task, in order; ``categories``: ids only
    (small to send to the ``workers`` processes)."""
    workers = max(1, min(os.cpu_count() or 1, len(tasks)) if workers is None else min(int(workers), len(tasks)))
    if workers <= 1:
        return _evaluate_chunk(tasks, categories, class_agnostic)
    size = max(1, min(64, -(-len(tasks) // (4 * workers))))
    chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        futures = [pool.submit(_evaluate_chunk, c, categories, class_agnostic) for c in chunks]
        return [r for f in futures for r in f.result()]


def evaluate_folders(gt: Optional[str | os.PathLike] = None, pred: Optional[str | os.PathLike] = None,
                     class_agnostic: bool = False, missing: str = "error", workers: Optional[int] = None, *,
                     gt_json: Optional[str | os.PathLike] = None, gt_masks: Optional[str | os.PathLike] = None,
                     pred_json: Optional[str | os.PathLike] = None, pred_masks: Optional[str | os.PathLike] = None,
                     image_ids: Optional[Iterable[int]] = None, per_image: bool = False,
                     engine: str = "hotcoco") -> dict[str, Any]:
    """PQ of a prediction folder against a ground-truth folder (COCO panoptic layout).

    ``gt``: folder with ``panoptic/`` and ``panoptic.json`` (and ``images/``); ``pred``: folder with
    ``panoptic/`` and ``panoptic.json``; ``*_json`` / ``*_masks`` override their parts.
    ``missing``: ``"error"`` (default) raises :class:`PQInputError` for a GT image without a
    prediction; ``"void"`` scores it as an all-void prediction (all its segments are FN). Images
    are never skipped. ``image_ids``: evaluate only these GT images. Predictions of images not in
    the GT are ignored.

    ``engine``: ``"hotcoco"`` (default, fastest; threads: ``RAYON_NUM_THREADS``, default one per
    core, fixed at its first use in the process) or ``"numpy"`` (``workers`` processes, default
    ``os.cpu_count()``; 1 = in this process). The numbers are the same. ``per_image=True``, a
    prediction scored as void, or an input hotcoco refuses (then named by a :class:`PQInputError`)
    run the NumPy engine.

    Returns ``{"All": {...}, "Things": {...}, "Stuff": {...}, "n_images": N, "class_agnostic": bool}``
    where each group is ``{"pq", "sq", "rq", "tp", "fp", "fn", "n"}`` with PQ/SQ/RQ as fractions
    in [0, 1] (not percent); with ``per_image=True`` also ``"per_image"``: one
    ``{"image_id", "file_name", "All", "Things", "Stuff"}`` per image, in GT order.
    """
    if missing not in MISSING_CHOICES:
        raise ValueError(f"missing must be one of {MISSING_CHOICES}, got {missing!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    gt_files = panoptic_paths(gt, json_path=gt_json, masks=gt_masks, role="ground truth")
    pred_files = panoptic_paths(pred, json_path=pred_json, masks=pred_masks, role="prediction")
    from_files = None
    if engine == "hotcoco" and not per_image and not class_agnostic and image_ids is None:
        from_files = FileEvaluation(*gt_files, *pred_files)  # runs while Python reads and checks the JSON
    gt_set = load_panoptic_set(json_path=gt_files[0], masks=gt_files[1], role="ground truth")
    pred_set = load_panoptic_set(json_path=pred_files[0], masks=pred_files[1], role="prediction")
    if class_agnostic:
        categories = AGNOSTIC_CATEGORIES
    else:
        if not gt_set.categories:
            raise PQInputError(f"ground truth JSON {gt_set.json_path} has no 'categories'; add them, or evaluate "
                               "class-agnostic (class_agnostic=True, --class-agnostic)")
        categories = gt_set.categories
    tasks = _pair_tasks(gt_set, pred_set, missing, image_ids)

    if engine == "hotcoco" and not per_image and all(t.pred_path is not None for t in tasks):
        total = hotcoco_stat(gt_set, pred_set, [t.image_id for t in tasks], categories, class_agnostic,
                             from_files)
        if total is not None:
            return {**total.groups(categories), "n_images": len(tasks), "class_agnostic": class_agnostic}
    results = _evaluate_tasks(tasks, None if class_agnostic else {c: {} for c in categories}, class_agnostic, workers)
    total = PQStat()
    for _, _, stat in results:
        total += stat
    out: dict[str, Any] = {**total.groups(categories), "n_images": len(results), "class_agnostic": class_agnostic}
    if per_image:
        out["per_image"] = [{"image_id": image_id, "file_name": name, **stat.groups(categories)}
                            for image_id, name, stat in results]
    return out
