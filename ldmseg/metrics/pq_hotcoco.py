"""The file-based PQ engine: hotcoco's panoptic evaluation, fed with segments the project has checked.

``hotcoco`` (a Rust implementation of the COCO tools) decodes the PNGs and matches the segments with
panopticapi's rules, the ones of :mod:`ldmseg.metrics.pq_match`, several times faster than NumPy
behind PIL. The project keeps its own semantics in front of it: every ``segments_info`` is read
with :func:`~ldmseg.metrics.pq_match.check_segments` first (ids, categories, crowd flags, class-agnostic
relabelling, errors that say how to fix the input), and any image hotcoco refuses (a PNG id not in
``segments_info``, a size mismatch, an unreadable PNG) is left to the NumPy engine, whose
:class:`~ldmseg.metrics.pq_io.PQInputError` names the problem.

hotcoco runs on Rayon's thread pool of this process: ``RAYON_NUM_THREADS`` threads (default: one
per core), fixed when hotcoco first runs in the process.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from ldmseg.metrics.pq_io import PanopticSet
from ldmseg.metrics.pq_match import check_segments
from ldmseg.metrics.pq_stat import CategoryStat, PQStat


def _coco_segments(segments: Sequence[Mapping[str, Any]], role: str, where: str, class_agnostic: bool,
                   categories: Optional[Mapping[int, Any]]) -> list[dict[str, int]]:
    """``segments_info`` checked and rewritten as plain COCO entries (int id, category, 0/1 crowd, area if given)."""
    out = []
    for sid, cat, crowd, area in check_segments(segments, role, where, class_agnostic, categories):
        entry = {"id": sid, "category_id": cat, "iscrowd": int(crowd), "area": area}
        if area < 0:
            del entry["area"]
        out.append(entry)
    return out


def hotcoco_stat(gt: PanopticSet, pred: PanopticSet, image_ids: Sequence[int],
                 categories: Mapping[int, Mapping[str, Any]], class_agnostic: bool) -> Optional[PQStat]:
    """Summed per-category counts of ``image_ids`` (each must have a prediction), or ``None`` when
    hotcoco refuses an input (the NumPy engine then finds and names the problem).

    ``categories``: the categories to evaluate in (the GT's, or the single class-agnostic one).
    Raises :class:`~ldmseg.metrics.pq_io.PQInputError` for a malformed ``segments_info``.
    """
    from hotcoco import panoptic

    check = None if class_agnostic else categories
    gt_anns, pred_anns = [], []
    pred_dir = str(pred.masks_dir)
    for image_id in image_ids:
        g, p = gt.annotations[image_id], pred.annotations[image_id]
        where = f"image {image_id} ({os.path.join(pred_dir, p['file_name'])})"  # as PanopticSet.mask_path
        gt_anns.append({"image_id": image_id, "file_name": g["file_name"],
                        "segments_info": _coco_segments(g["segments_info"], "ground-truth", where, class_agnostic,
                                                           check)})
        pred_anns.append({"image_id": image_id, "file_name": p["file_name"],
                          "segments_info": _coco_segments(p["segments_info"], "predicted", where, class_agnostic,
                                                             check)})
    cats = [{"name": str(c), **info, "id": int(c)} for c, info in categories.items()]
    try:
        evaluation = panoptic.PanopticEval({"annotations": gt_anns, "categories": cats},
                                           {"annotations": pred_anns, "categories": cats},
                                           gt_folder=str(gt.masks_dir), pred_folder=str(pred.masks_dir))
        evaluation.evaluate()
        per_class = evaluation.results()["per_class"]
    except Exception:  # noqa: BLE001 - any refusal: the NumPy engine scores the input or names its problem
        return None
    stat = PQStat()
    for cat, r in per_class.items():
        if r["tp"] or r["fp"] or r["fn"]:
            stat.per_category[int(cat)] = CategoryStat(int(r["tp"]), int(r["fp"]), int(r["fn"]), float(r["iou"]))
    return stat
