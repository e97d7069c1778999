"""The file-based PQ engine: hotcoco's panoptic evaluation, fed with segments the project has checked.

``hotcoco`` (a Rust implementation of the COCO tools) decodes the PNGs and matches the segments with
panopticapi's rules, the ones of :mod:`ldmseg.metrics.pq_match`, several times faster than NumPy
behind PIL. The project keeps its own semantics in front of it: every ``segments_info`` is read
with :func:`~ldmseg.metrics.pq_match.check_segments` first (ids, categories, crowd flags, class-agnostic
relabelling, errors that say how to fix the input), and any image hotcoco refuses (a PNG id not in
``segments_info``, a size mismatch, an unreadable PNG) is left to the NumPy engine, whose
:class:`~ldmseg.metrics.pq_io.PQInputError` names the problem.

When the two JSON files can be read as they are (class-aware, every ground-truth image asked for),
:class:`FileEvaluation` lets hotcoco read them itself and evaluate in a second thread, started
before Python reads the JSON, while the reading and the checks run in this one (hotcoco releases
the GIL): the checks then cost no wall time. Its result is used only if both sides list the same
images and every checked value is the one written in the files; otherwise hotcoco is given the
checked, rewritten annotations.

hotcoco runs on Rayon's thread pool of this process: ``RAYON_NUM_THREADS`` threads (default: one
per core), fixed when hotcoco first runs in the process.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ldmseg.metrics.pq_io import PanopticSet
from ldmseg.metrics.pq_match import check_segments
from ldmseg.metrics.pq_stat import CategoryStat, PQStat


def _coco_segments(segments: Sequence[Mapping[str, Any]], role: str, where: str, class_agnostic: bool,
                   categories: Optional[Mapping[int, Any]]) -> tuple[list[dict[str, int]], bool]:
    """``segments_info`` checked and rewritten as plain COCO entries (int id, category, 0/1 crowd, area
    if given), and whether the JSON already held exactly those values."""
    out, as_written = [], True
    for seg, (sid, cat, crowd, area) in zip(segments, check_segments(segments, role, where, class_agnostic,
                                                                      categories)):
        entry = {"id": sid, "category_id": cat, "iscrowd": int(crowd), "area": area}
        if area < 0:
            del entry["area"]
        as_written = as_written and type(seg["id"]) is int and type(seg.get("category_id")) is int \
            and type(seg.get("iscrowd", 0)) is int and seg.get("area", area) == area \
            and type(seg.get("area", 0)) is int
        out.append(entry)
    return out, as_written


def _checked_annotations(gt: PanopticSet, pred: PanopticSet, image_ids: Sequence[int],
                         categories: Mapping[int, Any], class_agnostic: bool) -> tuple[list, list, bool]:
    """Both sides' annotations, checked and rewritten, and whether the files already held them."""
    check = None if class_agnostic else categories
    gt_anns, pred_anns, as_written = [], [], not class_agnostic
    pred_dir = str(pred.masks_dir)
    for image_id in image_ids:
        g, p = gt.annotations[image_id], pred.annotations[image_id]
        where = f"image {image_id} ({os.path.join(pred_dir, p['file_name'])})"  # as PanopticSet.mask_path
        g_segs, g_same = _coco_segments(g["segments_info"], "ground-truth", where, class_agnostic, check)
        p_segs, p_same = _coco_segments(p["segments_info"], "predicted", where, class_agnostic, check)
        as_written = as_written and g_same and p_same
        gt_anns.append({"image_id": image_id, "file_name": g["file_name"], "segments_info": g_segs})
        pred_anns.append({"image_id": image_id, "file_name": p["file_name"], "segments_info": p_segs})
    return gt_anns, pred_anns, as_written


def _per_class(gt_doc: Any, pred_doc: Any, gt_masks: str, pred_masks: str) -> Optional[dict]:
    """hotcoco's per-class counts, or ``None`` when it refuses the input."""
    from hotcoco import panoptic

    try:
        evaluation = panoptic.PanopticEval(gt_doc, pred_doc, gt_folder=gt_masks, pred_folder=pred_masks)
        evaluation.evaluate()
        return evaluation.results()["per_class"]
    except Exception:  # noqa: BLE001 - any refusal: the NumPy engine scores the input or names its problem
        return None


class FileEvaluation:
    """hotcoco evaluating two COCO panoptic folders from their files, in a thread started at once."""

    def __init__(self, gt_json: Path, gt_masks: Path, pred_json: Path, pred_masks: Path):
        self._per_class: Optional[dict] = None
        args = (str(gt_json), str(pred_json), str(gt_masks), str(pred_masks))
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="hotcoco-files")
        self._thread.start()

    def _run(self, *args: str) -> None:
        self._per_class = _per_class(*args)

    def per_class(self) -> Optional[dict]:
        """hotcoco's per-class counts once it is done, or ``None`` if it refused the files."""
        self._thread.join()
        return self._per_class


def hotcoco_stat(gt: PanopticSet, pred: PanopticSet, image_ids: Sequence[int],
                 categories: Mapping[int, Mapping[str, Any]], class_agnostic: bool,
                 from_files: Optional[FileEvaluation] = None) -> Optional[PQStat]:
    """Summed per-category counts of ``image_ids`` (each must have a prediction), or ``None`` when
    hotcoco refuses an input (the NumPy engine then finds and names the problem).

    ``categories``: the categories to evaluate in (the GT's, or the single class-agnostic one);
    ``from_files``: hotcoco already evaluating the two folders' files (used when they can be read
    as written). Raises :class:`~ldmseg.metrics.pq_io.PQInputError` for a malformed ``segments_info``.
    """
    gt_anns, pred_anns, as_written = _checked_annotations(gt, pred, image_ids, categories, class_agnostic)
    files_usable = (as_written and from_files is not None
                    and len(image_ids) == len(gt.annotations) == len(pred.annotations)
                    and set(image_ids) == set(gt.annotations) == set(pred.annotations))
    per_class = from_files.per_class() if files_usable else None
    if per_class is None:
        cats = [{"name": str(c), **info, "id": int(c)} for c, info in categories.items()]
        per_class = _per_class({"annotations": gt_anns, "categories": cats},
                               {"annotations": pred_anns, "categories": cats}, str(gt.masks_dir), str(pred.masks_dir))
        if per_class is None:
            return None
    stat = PQStat()
    for cat, r in per_class.items():
        if r["tp"] or r["fp"] or r["fn"]:
            stat.per_category[int(cat)] = CategoryStat(int(r["tp"]), int(r["fp"]), int(r["fn"]), float(r["iou"]))
    return stat
