"""Matching the segments of one image, with the COCO panoptic semantics of panopticapi's ``pq_compute``.

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
The counts of an image are a :class:`~ldmseg.metrics.pq_stat.PQStat` (:func:`pq_image_stats`);
its module gives PQ, SQ and RQ.

The work is vectorised: segment ids become dense indices through one lookup in a table over all
2²⁴ ids (:func:`dense_index`), GT and predicted indices are combined into one pair index and
counted with ``np.bincount``; matching then runs on the small (GT segments × predicted segments)
intersection matrix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ldmseg.data.ids import MAX_ID, is_crowd
from ldmseg.metrics.pq_io import PQInputError
from ldmseg.metrics.pq_stat import CategoryStat, PQStat, category_dict

AGNOSTIC_CATEGORY_ID = 1
AGNOSTIC_CATEGORIES: dict[int, dict[str, Any]] = {
    AGNOSTIC_CATEGORY_ID: {"id": AGNOSTIC_CATEGORY_ID, "name": "object", "isthing": 1, "supercategory": "object"}}
MATCH_IOU = 0.5  # a match needs IoU strictly above this
EXCUSED_FRACTION = 0.5  # an unmatched prediction is no FP when strictly more of it lies on void + crowd


@dataclass
class Segments:
    """The JSON ``segments_info`` of one side as arrays (K segments, in JSON order)."""

    ids: np.ndarray  # (K,) uint32, unique, non-zero
    category: np.ndarray  # (K,) int64
    crowd: np.ndarray  # (K,) bool
    area: np.ndarray  # (K,) int64, the JSON area; -1 where the JSON has none


def check_segments(segments: Sequence[Mapping[str, Any]], role: str, where: str, class_agnostic: bool,
                   categories: Optional[Mapping[int, Any]]) -> list[tuple[int, int, bool, int]]:
    """Check one side's ``segments_info``: ``(id, category, crowd, area)`` per segment, in JSON order.

    ``area`` is the JSON area, -1 where the JSON has none. ``role`` ("ground-truth" / "predicted")
    and ``where`` (the image) name the side in errors; ``categories``: allowed category ids
    (``None``: any; ignored when ``class_agnostic``, which gives every segment
    :data:`AGNOSTIC_CATEGORY_ID`). Raises :class:`PQInputError` for an id outside [1, 2²⁴), a
    missing or unknown category, a bad ``iscrowd`` or an id listed twice.
    """
    rows, seen = [], set()
    for seg in segments:  # the checks cost ~2 µs a segment: plain JSON values take the first test
        sid = seg.get("id") if isinstance(seg, (dict, Mapping)) else None
        if not isinstance(sid, (int, np.integer)) or not 0 < sid <= MAX_ID:
            raise PQInputError(f"{where}: {role} segment {seg!r} needs an integer 'id' in [1, {MAX_ID}] "
                               "(0 is void); fix its segments_info")
        cat = seg.get("category_id")
        if class_agnostic:
            cat = AGNOSTIC_CATEGORY_ID
        elif not isinstance(cat, (int, np.integer)):
            raise PQInputError(f"{where}: {role} segment {sid} has no integer 'category_id'; add it, or "
                               "evaluate class-agnostic (class_agnostic=True, --class-agnostic)")
        elif categories is not None and cat not in categories:
            raise PQInputError(f"{where}: {role} segment {sid} has category_id {cat}, which is not among the "
                               "ground truth's categories; use the ground truth's category ids")
        crowd = seg.get("iscrowd", 0)
        if type(crowd) is not int or not 0 <= crowd <= 1:
            try:
                crowd = is_crowd(seg)
            except ValueError as exc:
                raise PQInputError(f"{where}: {role} {exc}") from None
        area = seg.get("area")
        if type(area) is not int:
            area = int(area) if isinstance(area, (float, np.integer, np.floating)) else -1
        sid = int(sid)
        rows.append((sid, int(cat), crowd == 1, area))
        seen.add(sid)
    if len(seen) != len(rows):
        ids = [r[0] for r in rows]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PQInputError(f"{where}: {role} segments_info lists segment id(s) {dup} more than once; "
                           "give every segment its own id")
    return rows


def read_segments(segments: Sequence[Mapping[str, Any]], role: str, where: str, class_agnostic: bool,
                  categories: Optional[Mapping[int, Any]]) -> Segments:
    """:func:`check_segments` (same arguments and errors) as arrays."""
    rows = check_segments(segments, role, where, class_agnostic, categories)
    ids, cats, crowd, area = zip(*rows) if rows else ((), (), (), ())
    return Segments(np.asarray(ids, dtype=np.uint32), np.asarray(cats, dtype=np.int64),
                    np.asarray(crowd, dtype=bool), np.asarray(area, dtype=np.int64))


class _Workspace(threading.local):
    """Per-thread scratch reused across images: a lookup table over all 2²⁴ segment ids and the
    per-pixel index arrays.

    The table (int32, 64 MiB of address space) is all zeros between images: only the entries of
    the current image's ids are set, and reset afterwards, so pages never touched stay unmapped.
    Reusing these arrays avoids a page fault per freshly allocated page, which on small machines
    costs about as much as the arithmetic itself.
    """

    def __init__(self) -> None:
        self.table = np.zeros(MAX_ID + 1, dtype=np.int32)
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


def dense_index(ids: np.ndarray, keys: np.ndarray, values: np.ndarray, out: Optional[np.ndarray] = None
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
    if ids.size and ((ids.dtype.kind == "i" and ids.min() < 0) or ids.max() > MAX_ID):
        raise ValueError(f"{name} ids must lie in [0, {MAX_ID}], got [{ids.min()}, {ids.max()}]")
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

    gt: Segments
    pred: Segments
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
    cats = None if categories is None or class_agnostic else category_dict(categories)
    gt = read_segments(gt_segments, "ground-truth", where, class_agnostic, cats)
    pred = read_segments(pred_segments, "predicted", where, class_agnostic, cats)
    kg, kp = len(gt.ids), len(pred.ids)

    # Dense indices, 0 = an id not in segments_info, 1 = void, 2.. = the segments in JSON order.
    # The GT index is pre-multiplied by the row length so that one addition gives the pair index.
    row = kp + 2
    g_buf, p_buf = _workspace().index_arrays(len(g_map))
    g_index = dense_index(g_map, np.concatenate([[0], gt.ids]).astype(np.uint32),
                           np.arange(1, kg + 2, dtype=np.int32) * row, g_buf)
    p_index = dense_index(p_map, np.concatenate([[0], pred.ids]).astype(np.uint32),
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
