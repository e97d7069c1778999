"""Panoptic quality (PQ = SQ · RQ) with the COCO panoptic semantics of panopticapi's ``pq_compute``.

Per image and per category (Kirillov et al., "Panoptic Segmentation", with COCO's rules):

* a ground-truth (GT) segment and a predicted segment of the same category *match* when
  IoU > 0.5, where the union leaves out the predicted pixels that lie on GT void (id 0):
  ``union = pred_area + gt_area - intersection - |pred ∩ void|``; a match is a true positive
  (TP) and adds its IoU;
* crowd GT segments (``iscrowd = 1``) are never matched and never false negatives (FN); every
  other unmatched GT segment is a FN;
* an unmatched prediction is a false positive (FP) unless more than half of its pixels lie on GT
  void plus the crowd region of its category. As in COCO there is ONE crowd region per category:
  the crowd segment listed last in ``segments_info`` for that category;
* ``gt_area`` is the JSON ``area`` of the GT segment (as panopticapi; the pixel count when the
  JSON has none), ``pred_area`` the predicted segment's pixel count. GT pixels whose id is not
  listed in ``segments_info`` are neither void nor a segment (panopticapi does the same).

Class-agnostic mode gives every segment (thing or stuff, GT and prediction) the single "thing"
category :data:`AGNOSTIC_CATEGORY_ID`, crowd flags kept; its crowd region is then the crowd
segment listed last.

Per category c with TP, FP, FN and the summed IoU of its TPs:
``PQ_c = ΣIoU / (TP + ½FP + ½FN)``, ``SQ_c = ΣIoU / TP`` (0 without TP),
``RQ_c = TP / (TP + ½FP + ½FN)``. A group (``All``, ``Things``, ``Stuff``) averages PQ_c, SQ_c,
RQ_c over its categories with TP + FP + FN > 0; ``n`` is their number. **PQ, SQ and RQ are
fractions in [0, 1], not percent.** A group without such a category (``Stuff`` in class-agnostic
mode) reports ``n = 0`` and PQ = SQ = RQ = 0.0. ``tp``, ``fp``, ``fn`` of a group are summed over
its categories.

Per image the work is vectorised: segment ids become dense indices through one lookup in a
table over all 2²⁴ ids, GT and predicted indices are combined into one pair index and counted
with ``np.bincount``; matching then runs on the small (GT segments × predicted segments)
intersection matrix. Decoding the two PNGs stays the main cost. Images run in a process pool.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ldmseg.data.ids import is_crowd
from ldmseg.metrics.pq_io import PanopticSet, PQInputError, load_panoptic_set, read_id_map

AGNOSTIC_CATEGORY_ID = 1
AGNOSTIC_CATEGORIES: dict[int, dict[str, Any]] = {
    AGNOSTIC_CATEGORY_ID: {"id": AGNOSTIC_CATEGORY_ID, "name": "object", "isthing": 1, "supercategory": "object"}}
GROUPS: tuple[tuple[str, Optional[bool]], ...] = (("All", None), ("Things", True), ("Stuff", False))
MATCH_IOU = 0.5  # a match needs IoU strictly above this
EXCUSED_FRACTION = 0.5  # an unmatched prediction is no FP when strictly more of it lies on void + crowd
MISSING_CHOICES = ("error", "void")
_MAX_ID = 256**3 - 1


@dataclass
class CategoryStat:
    """Counts of one category: true positives, false positives, false negatives, summed TP IoU."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def __iadd__(self, other: "CategoryStat") -> "CategoryStat":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


@dataclass
class PQStat:
    """Per-category :class:`CategoryStat` keyed by category id; statistics of images add up (``+``, ``sum``)."""

    per_category: dict[int, CategoryStat] = field(default_factory=dict)

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cat, stat in other.per_category.items():
            self.per_category.setdefault(cat, CategoryStat()).__iadd__(stat)
        return self

    def __add__(self, other: "PQStat") -> "PQStat":
        out = PQStat()
        out += self
        out += other
        return out

    def __radd__(self, other: Any) -> "PQStat":  # sum(stats) starts from 0
        if other == 0:
            return self + PQStat()
        return NotImplemented

    def category_results(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
                         ) -> dict[int, dict[str, float]]:
        """Category id → ``{"pq", "sq", "rq", "tp", "fp", "fn"}`` for every category of ``categories``."""
        out = {}
        for cat in _category_dict(categories):
            s = self.per_category.get(cat, CategoryStat())
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            out[cat] = {"pq": s.iou / denom if denom else 0.0, "sq": s.iou / s.tp if s.tp else 0.0,
                        "rq": s.tp / denom if denom else 0.0, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        return out

    def summary(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
                isthing: Optional[bool] = None) -> dict[str, Any]:
        """``{"pq", "sq", "rq", "tp", "fp", "fn", "n"}`` over ``categories`` (things only if
        ``isthing`` is True, stuff only if False); PQ/SQ/RQ are fractions averaged over the ``n``
        categories with TP + FP + FN > 0 (0.0 when ``n == 0``)."""
        cats = _category_dict(categories)
        chosen = [c for c, info in cats.items() if isthing is None or (int(info.get("isthing", 0)) == 1) == isthing]
        per = self.category_results({c: cats[c] for c in chosen})
        present = [r for r in per.values() if r["tp"] + r["fp"] + r["fn"] > 0]
        n = len(present)
        out = {k: (sum(r[k] for r in present) / n if n else 0.0) for k in ("pq", "sq", "rq")}
        out.update({k: int(sum(r[k] for r in per.values())) for k in ("tp", "fp", "fn")})
        out["n"] = n
        return out

    def groups(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
               ) -> dict[str, dict[str, Any]]:
        """``{"All": summary, "Things": summary, "Stuff": summary}``."""
        return {name: self.summary(categories, isthing) for name, isthing in GROUPS}


def _category_dict(categories) -> dict[int, Mapping[str, Any]]:
    if isinstance(categories, Mapping):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}


# ----------------------------------------------------------------------------------------------
# one image


@dataclass
class _Segments:
    """The JSON ``segments_info`` of one side as arrays (K segments, in JSON order)."""

    ids: np.ndarray  # (K,) uint32, unique, non-zero
    category: np.ndarray  # (K,) int64
    crowd: np.ndarray  # (K,) bool
    area: np.ndarray  # (K,) int64, the JSON area; -1 where the JSON has none


def _segments(segments: Sequence[Mapping[str, Any]], role: str, where: str, class_agnostic: bool,
              categories: Optional[Mapping[int, Any]]) -> _Segments:
    ids, cats, crowd, area = [], [], [], []
    for seg in segments:
        sid = seg.get("id") if isinstance(seg, Mapping) else None
        if not isinstance(sid, (int, np.integer)) or not 0 < int(sid) <= _MAX_ID:
            raise PQInputError(f"{where}: {role} segment {seg!r} needs an integer 'id' in [1, {_MAX_ID}] "
                               "(0 is void); fix its segments_info")
        cat = seg.get("category_id")
        if class_agnostic:
            cat = AGNOSTIC_CATEGORY_ID
        elif not isinstance(cat, (int, np.integer)):
            raise PQInputError(f"{where}: {role} segment {sid} has no integer 'category_id'; add it, or "
                               "evaluate class-agnostic (class_agnostic=True, --class-agnostic)")
        elif categories is not None and int(cat) not in categories:
            raise PQInputError(f"{where}: {role} segment {sid} has category_id {cat}, which is not among the "
                               "ground truth's categories; use the ground truth's category ids")
        ids.append(int(sid))
        cats.append(int(cat))
        try:
            crowd.append(is_crowd(seg))
        except ValueError as exc:
            raise PQInputError(f"{where}: {role} {exc}") from None
        a = seg.get("area")
        area.append(int(a) if isinstance(a, (int, float, np.integer, np.floating)) else -1)
    out = _Segments(np.asarray(ids, dtype=np.uint32), np.asarray(cats, dtype=np.int64),
                    np.asarray(crowd, dtype=bool), np.asarray(area, dtype=np.int64))
    if len(np.unique(out.ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PQInputError(f"{where}: {role} segments_info lists segment id(s) {dup} more than once; "
                           "give every segment its own id")
    return out


class _Workspace(threading.local):
    """Per-thread scratch reused across images: a lookup table over all 2²⁴ segment ids and the
    per-pixel index arrays.

    The table (int32, 64 MiB of address space) is all zeros between images: only the entries of
    the current image's ids are set, and reset afterwards, so pages never touched stay unmapped.
    Reusing these arrays avoids a page fault per freshly allocated page, which on small machines
    costs about as much as the arithmetic itself.
    """

    def __init__(self) -> None:
        self.table = np.zeros(_MAX_ID + 1, dtype=np.int32)
        self.size = -1

    def index_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n != self.size:
            self.g_index, self.p_index = np.empty(n, np.int32), np.empty(n, np.int32)
            self.size = n
        return self.g_index, self.p_index


_WORKSPACE: Optional[_Workspace] = None


def _workspace() -> _Workspace:
    global _WORKSPACE
    if _WORKSPACE is None:
        _WORKSPACE = _Workspace()
    return _WORKSPACE


def _dense_index(ids: np.ndarray, keys: np.ndarray, values: np.ndarray, out: Optional[np.ndarray] = None
                 ) -> np.ndarray:
    """``values[k]`` where ``ids == keys[k]``, 0 where an id is no key (so ``values`` should be non-zero).

    ``ids (N,) uint32`` in [0, 2²⁴), ``keys (K,) uint32`` unique, ``values (K,) int32`` →
    ``(N,) int32`` (written into ``out`` when given). One table lookup per pixel.
    """
    table = _workspace().table
    out = np.empty(len(ids), np.int32) if out is None else out
    table[keys] = values
    try:
        table.take(ids, out=out, mode="clip")  # ids < 2**24 = len(table): clip never changes one
    finally:
        table[keys] = 0
    return out


def _flat_ids(ids: np.ndarray, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "ui":
        raise ValueError(f"{name} must be an (H, W) integer id map, got {ids.dtype} of shape {ids.shape}")
    if ids.size and ((ids.dtype.kind == "i" and ids.min() < 0) or ids.max() > _MAX_ID):
        raise ValueError(f"{name} ids must lie in [0, {_MAX_ID}], got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint32, copy=False).ravel()


@dataclass
class SegmentMatching:
    """How the segments of one image match (the rules of the module docstring), before counting.

    Arrays over the GT segments (kg, JSON order) and predicted segments (kp, JSON order):
    ``inter`` (kg, kp) int64 pixel intersections, ``iou`` (kg, kp) float64 (0 where not a
    candidate: no overlap, a crowd GT or another category), ``match`` (kg, kp) bool (IoU > 0.5),
    ``gt_area`` (kg,) int64 (JSON area, else pixels), ``pred_area`` (kp,) int64 pixels and
    ``pred_on_void`` (kp,) int64 predicted pixels on GT void. ``gt`` / ``pred`` hold the segments'
    ids, categories (:data:`AGNOSTIC_CATEGORY_ID` in class-agnostic mode) and crowd flags.
    """

    gt: _Segments
    pred: _Segments
    inter: np.ndarray
    iou: np.ndarray
    match: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pred_on_void: np.ndarray


def match_segments(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], pred_ids: np.ndarray,
                   pred_segments: Sequence[Mapping[str, Any]],
                   categories: Optional[Mapping[int, Any] | Sequence[Mapping[str, Any]]] = None,
                   class_agnostic: bool = False, *, image_id: Any = None) -> SegmentMatching:
    """Match the segments of one image; the arguments and errors are those of :func:`pq_image_stats`."""
    where = f"image {image_id}" if image_id is not None else "image"
    g_map, p_map = _flat_ids(gt_ids, "gt_ids"), _flat_ids(pred_ids, "pred_ids")
    if np.shape(gt_ids) != np.shape(pred_ids):
        raise PQInputError(f"{where}: the prediction is {np.shape(pred_ids)[0]}x{np.shape(pred_ids)[1]} pixels but "
                           f"the ground truth is {np.shape(gt_ids)[0]}x{np.shape(gt_ids)[1]}; predict at the "
                           "ground truth's size")
    cats = None if categories is None or class_agnostic else _category_dict(categories)
    gt = _segments(gt_segments, "ground-truth", where, class_agnostic, cats)
    pred = _segments(pred_segments, "predicted", where, class_agnostic, cats)
    kg, kp = len(gt.ids), len(pred.ids)

    # Dense indices, 0 = an id not in segments_info, 1 = void, 2.. = the segments in JSON order.
    # The GT index is pre-multiplied by the row length so that one addition gives the pair index.
    row = kp + 2
    g_buf, p_buf = _workspace().index_arrays(len(g_map))
    g_index = _dense_index(g_map, np.concatenate([[0], gt.ids]).astype(np.uint32),
                           np.arange(1, kg + 2, dtype=np.int32) * row, g_buf)
    p_index = _dense_index(p_map, np.concatenate([[0], pred.ids]).astype(np.uint32),
                           np.arange(1, kp + 2, dtype=np.int32), p_buf)
    g_index += p_index
    counts = np.bincount(g_index, minlength=(kg + 2) * row).reshape(kg + 2, row)
    if counts[:, 0].any():
        extra = np.unique(p_map[p_index == 0])
        raise PQInputError(f"{where}: the predicted PNG holds segment id(s) {extra[:8].tolist()}"
                           f"{' and more' if len(extra) > 8 else ''} that its segments_info does not list; "
                           "list every non-zero id of the PNG (or set those pixels to 0 = void)")

    # counts[i, j]: pixels with GT index i and predicted index j. GT ids outside segments_info
    # (row 0) are neither void nor a segment, but their pixels count in pred_area (as panopticapi).
    pred_area = counts[:, 2:].sum(axis=0)  # (kp,)
    if kp and (pred_area == 0).any():
        missing = pred.ids[pred_area == 0]
        raise PQInputError(f"{where}: predicted segment id(s) {missing[:8].tolist()} are listed in segments_info "
                           "but absent from the PNG; drop them from the JSON")
    pred_on_void = counts[1, 2:]  # (kp,)
    inter = counts[2:, 2:]  # (kg, kp)
    gt_area = np.where(gt.area >= 0, gt.area, counts[2:, :].sum(axis=1))  # (kg,)

    candidate = (inter > 0) & ~gt.crowd[:, None] & (gt.category[:, None] == pred.category[None, :])
    union = pred_area[None, :] + gt_area[:, None] - inter - pred_on_void[None, :]
    iou = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=iou, where=candidate & (union > 0))
    return SegmentMatching(gt, pred, inter, iou, iou > MATCH_IOU, gt_area, pred_area, pred_on_void)


def pq_image_stats(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], pred_ids: np.ndarray,
                   pred_segments: Sequence[Mapping[str, Any]],
                   categories: Optional[Mapping[int, Any] | Sequence[Mapping[str, Any]]] = None,
                   class_agnostic: bool = False, *, image_id: Any = None) -> PQStat:
    """Per-category TP/FP/FN/IoU of one image (see the module docstring for the rules).

    ``gt_ids`` / ``pred_ids``: (H, W) integer id maps (uint32 fastest; 0 = void);
    ``*_segments``: the JSON ``segments_info`` lists (``id``, ``category_id``, ``iscrowd``,
    ``area``); ``categories``: the GT categories (ids checked in class-aware mode; ``None`` skips
    the check); ``image_id`` only names the image in errors.

    Raises :class:`PQInputError` when the maps disagree in size, a predicted PNG holds an id not
    in its ``segments_info`` or the reverse, or an id is listed twice.
    """
    m = match_segments(gt_ids, gt_segments, pred_ids, pred_segments, categories, class_agnostic, image_id=image_id)
    gt, pred, inter, iou, match = m.gt, m.pred, m.inter, m.iou, m.match
    pred_area, pred_on_void = m.pred_area, m.pred_on_void
    kg, kp = len(gt.ids), len(pred.ids)
    g_tp, p_tp = np.nonzero(match)
    fn = ~match.any(axis=1) & ~gt.crowd

    # One crowd region per category: the crowd segment listed last (later entries overwrite).
    crowd_row = {int(c): i for i, c in enumerate(gt.category) if gt.crowd[i]}
    p_crowd = np.array([crowd_row.get(int(c), -1) for c in pred.category], dtype=np.int64)
    on_crowd = np.where(p_crowd >= 0, inter[np.maximum(p_crowd, 0), np.arange(kp)] if kg else 0, 0)
    excused = (pred_on_void + on_crowd) / np.maximum(pred_area, 1) > EXCUSED_FRACTION
    fp = ~match.any(axis=0) & ~excused

    labels, inverse = np.unique(np.concatenate([gt.category, pred.category]), return_inverse=True)
    g_cat, p_cat = inverse[:kg], inverse[kg:]
    n = len(labels)
    tp_c = np.bincount(g_cat[g_tp], minlength=n)
    iou_c = np.bincount(g_cat[g_tp], weights=iou[g_tp, p_tp], minlength=n)
    fn_c = np.bincount(g_cat[fn], minlength=n)
    fp_c = np.bincount(p_cat[fp], minlength=n)
    stat = PQStat()
    for k, cat in enumerate(labels.tolist()):
        if tp_c[k] or fp_c[k] or fn_c[k]:
            stat.per_category[cat] = CategoryStat(int(tp_c[k]), int(fp_c[k]), int(fn_c[k]), float(iou_c[k]))
    return stat


# ----------------------------------------------------------------------------------------------
# folders


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
    where = f"image {task.image_id} ({task.pred_path or task.gt_path})"
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
    for image_id in wanted:
        ann = gt.annotations[image_id]
        p = pred.annotations.get(image_id)
        if p is None and missing != "void":
            raise PQInputError(
                f"no prediction for image {image_id} ({ann['file_name']}) of the ground truth: "
                f"{pred.json_path} has no annotation with image_id {image_id}. Predict every ground-truth image, "
                "or score missing ones as all-void with missing='void' (ldmseg pq --missing void); "
                "images are never skipped")
        tasks.append(_Task(image_id, ann["file_name"], str(gt.mask_path(image_id)), list(ann["segments_info"]),
                           None if p is None else str(pred.mask_path(image_id)),
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


def evaluate_folders(gt: Optional[str | os.PathLike] = None, pred: Optional[str | os.PathLike] = None,
                     class_agnostic: bool = False, missing: str = "error", workers: Optional[int] = None, *,
                     gt_json: Optional[str | os.PathLike] = None, gt_masks: Optional[str | os.PathLike] = None,
                     pred_json: Optional[str | os.PathLike] = None, pred_masks: Optional[str | os.PathLike] = None,
                     image_ids: Optional[Iterable[int]] = None, per_image: bool = False) -> dict[str, Any]:
    """PQ of a prediction folder against a ground-truth folder (COCO panoptic layout).

    ``gt``: folder with ``panoptic/`` and ``panoptic.json`` (and ``images/``); ``pred``: folder with
    ``panoptic/`` and ``panoptic.json``; ``*_json`` / ``*_masks`` override their parts.
    ``missing``: ``"error"`` (default) raises :class:`PQInputError` for a GT image without a
    prediction; ``"void"`` scores it as an all-void prediction (all its segments are FN). Images
    are never skipped. ``workers``: processes (default ``os.cpu_count()``; 1 = in this process).
    ``image_ids``: evaluate only these GT images. Predictions of images not in the GT are ignored.

    Returns ``{"All": {...}, "Things": {...}, "Stuff": {...}, "n_images": N, "class_agnostic": bool}``
    where each group is ``{"pq", "sq", "rq", "tp", "fp", "fn", "n"}`` with PQ/SQ/RQ as fractions
    in [0, 1] (not percent); with ``per_image=True`` also ``"per_image"``: one
    ``{"image_id", "file_name", "All", "Things", "Stuff"}`` per image, in GT order.
    """
    if missing not in MISSING_CHOICES:
        raise ValueError(f"missing must be one of {MISSING_CHOICES}, got {missing!r}")
    gt_set = load_panoptic_set(gt, json_path=gt_json, masks=gt_masks, role="ground truth")
    pred_set = load_panoptic_set(pred, json_path=pred_json, masks=pred_masks, role="prediction")
    if class_agnostic:
        categories = AGNOSTIC_CATEGORIES
    else:
        if not gt_set.categories:
            raise PQInputError(f"ground truth JSON {gt_set.json_path} has no 'categories'; add them, or evaluate "
                               "class-agnostic (class_agnostic=True, --class-agnostic)")
        categories = gt_set.categories
    tasks = _pair_tasks(gt_set, pred_set, missing, image_ids)

    workers = max(1, min(os.cpu_count() or 1, len(tasks)) if workers is None else min(int(workers), len(tasks)))
    check = None if class_agnostic else {c: {} for c in categories}  # ids only: small to send to workers
    if workers <= 1:
        results = _evaluate_chunk(tasks, check, class_agnostic)
    else:
        size = max(1, min(64, -(-len(tasks) // (4 * workers))))
        chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            futures = [pool.submit(_evaluate_chunk, c, check, class_agnostic) for c in chunks]
            results = [r for f in futures for r in f.result()]

    total = PQStat()
    for _, _, stat in results:
        total += stat
    out: dict[str, Any] = {**total.groups(categories), "n_images": len(results), "class_agnostic": class_agnostic}
    if per_image:
        out["per_image"] = [{"image_id": image_id, "file_name": name, **stat.groups(categories)}
                            for image_id, name, stat in results]
    return out
