"""Cleaning and random id slots (docs/method.md#targets-and-encoding): pure functions, no I/O.

1. :func:`clean_segments` turns crowd segments and segments under ``min_area`` pixels into void.
2. :func:`remap_ids` gives the K non-void segments distinct random id slots in 1..S−1
   (void stays 0); validation uses :func:`eval_generator` so the permutation is fixed per image.
   :func:`clean_remap_labels` makes both decisions from a dense label map's areas alone
   (preprocessing); :func:`repermute_slots` draws a fresh permutation of a stored slot map
   (training). With ``diffusion.slot_order: raster`` the diffusion stage renumbers the slots in
   reading order instead (:func:`raster_slots`); with ``grid``, by the place of each segment's
   first pixel (:func:`grid_slot_lut`); :func:`ordered_slots` picks by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from ldmseg.data.ids import is_crowd

if TYPE_CHECKING:
    import torch

_EVAL_STREAM = 0x1D5E6  # separates eval remap streams from other uses of (seed, image_id)

# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------


@dataclass
class CleanResult:
    """Output of :func:`clean_segments`.

    ``id_map`` (H, W) int64 with removed segments set to 0 (void); ``segments_info`` the kept
    entries (copies, in input order); ``n_small`` / ``n_crowd`` how many segments became void
    for each reason; ``n_unlisted`` ids present in the map but absent from ``segments_info``
    (also made void); ``has_segments`` whether any segment is left (callers skip the image if not).
    """

    id_map: np.ndarray
    segments_info: list[dict]
    n_small: int
    n_crowd: int
    has_segments: bool
    n_unlisted: int = 0


def _unique_counts(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique ids, inverse indices (flat) and pixel counts of an (H, W) id map.

    Small ids (slot maps, ids below 2¹⁶) take a bincount path ~10x faster than ``np.unique``.
    """
    flat = id_map.ravel()
    if flat.size and int(flat.max()) < 65536:
        full = np.bincount(flat)
        uniq = np.flatnonzero(full)
        index = np.zeros(full.size, dtype=np.int64)
        index[uniq] = np.arange(uniq.size)
        return uniq, index[flat], full[uniq]
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return uniq, inverse.ravel(), counts


def compact_ids(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel COCO ids (up to 2²⁴−1) densely: → ((H, W) int64 labels, (K,) int64 ids).

    Void stays 0 and ``ids[label]`` is the original id (``ids[0] == 0``). Later steps on the
    dense map (:func:`clean_segments`, :func:`remap_ids`) then take the fast bincount path.
    """
    id_map = check_id_map(id_map)
    try:
        import pandas as pd

        codes, uniq = pd.factorize(id_map.ravel())
        uniq = np.asarray(uniq, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
    except ImportError:  # pandas is optional: np.unique is ~3x slower
        uniq, codes = np.unique(id_map.ravel(), return_inverse=True)
    ids = np.concatenate([[0], np.sort(uniq[uniq != 0])])  # sorted: labels keep the ids' order
    relabel = np.searchsorted(ids, uniq).astype(np.int64)
    return relabel[codes].reshape(id_map.shape), ids


def check_id_map(id_map: Any, name: str = "id_map") -> np.ndarray:
    """``id_map`` as an (H, W) int64 array of ids >= 0 (0 = void), or a ValueError saying how to fix it."""
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(
            f"{name} must be an (H, W) integer array, got shape {id_map.shape} dtype {id_map.dtype}; "
            "decode panoptic PNGs with ldmseg.data.ids.decode_panoptic_png"
        )
    id_map = id_map.astype(np.int64, copy=False)
    if id_map.size and id_map.min() < 0:
        raise ValueError(f"{name} holds negative ids (min {id_map.min()}); ids must be >= 0, 0 = void")
    return id_map


def _check_slots_and_generator(num_slots: int, generator: Any) -> None:
    if num_slots < 2:
        raise ValueError(f"num_slots must be >= 2 (slot 0 is void), got {num_slots}")
    if not isinstance(generator, np.random.Generator):
        raise TypeError(
            "generator must be a numpy.random.Generator (np.random.default_rng(seed) for training, "
            f"eval_generator(image_id) for validation), got {type(generator).__name__}"
        )


def _filter_segments(segments_info: list[dict], area_of: Callable[[int], int], min_area: int
                     ) -> tuple[list[dict], set[int], int, int]:
    """The cleaning decision per ``segments_info`` entry → (kept entries (copies), their ids,
    n_small, n_crowd). Crowd wins over small; entries for id 0 (void) are ignored;
    ``area_of(id)`` is the segment's pixel count in the map (0 if absent)."""
    kept: list[dict] = []
    keep_ids: set[int] = set()
    n_small = n_crowd = 0
    for seg in segments_info:
        if "id" not in seg:
            raise ValueError(f"segments_info entry without an 'id' key: {seg!r}")
        sid = int(seg["id"])
        if sid == 0:
            continue  # an entry for void carries no segment
        if is_crowd(seg):
            n_crowd += 1
        elif area_of(sid) < min_area:
            n_small += 1
        else:
            kept.append(dict(seg))
            keep_ids.add(sid)
    return kept, keep_ids, n_small, n_crowd


def clean_segments(id_map: np.ndarray, segments_info: list[dict], min_area: int = 10) -> CleanResult:
    """Make crowd segments and segments under ``min_area`` pixels void (0).

    Args:
        id_map: (H, W) integer segment ids, 0 = void.
        segments_info: COCO ``segments_info`` entries (``id``, optional ``iscrowd``, ...).
        min_area: segments with fewer pixels in ``id_map`` than this become void.

    Areas are counted in ``id_map`` (not taken from the JSON ``area``). A crowd segment counts
    as crowd even when it is also small. Ids in the map without a ``segments_info`` entry are
    made void and counted in ``n_unlisted``. The input is not modified.
    """
    id_map = check_id_map(id_map)
    uniq, inverse, counts = _unique_counts(id_map)
    area = dict(zip(uniq.tolist(), counts.tolist()))

    kept, keep_ids, n_small, n_crowd = _filter_segments(segments_info, lambda sid: area.get(sid, 0), min_area)

    listed = {int(s["id"]) for s in segments_info}
    n_unlisted = sum(1 for u in uniq.tolist() if u != 0 and u not in listed)

    keep_lut = np.array([u in keep_ids for u in uniq.tolist()], dtype=bool)
    cleaned = np.where(keep_lut[inverse], id_map.ravel(), 0).reshape(id_map.shape)
    return CleanResult(cleaned, kept, n_small, n_crowd, bool(kept), n_unlisted)


# --------------------------------------------------------------------------------------------
# Random id slots
# --------------------------------------------------------------------------------------------


@dataclass
class RemapResult:
    """Output of :func:`remap_ids`.

    ``slot_map`` (H, W) int64 in [0, S), 0 = void; ``slots`` maps each used slot to the original
    segment id; ``n_merged`` segments made void because there were more than S−1.
    """

    slot_map: np.ndarray
    slots: dict[int, int]
    n_merged: int


def eval_generator(image_id: int, seed: int = 0) -> np.random.Generator:
    """Deterministic generator for the validation id permutation of one image.

    Any non-negative ``image_id`` works (also above 2³¹); the same (image_id, seed) always gives
    the same stream.
    """
    image_id, seed = int(image_id), int(seed)
    if image_id < 0 or seed < 0:
        raise ValueError(f"image_id and seed must be >= 0, got image_id={image_id}, seed={seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, image_id, _EVAL_STREAM]))


def remap_ids(id_map: np.ndarray, num_slots: int, generator: np.random.Generator) -> RemapResult:
    """Give the K non-void segments distinct random slots in 1..S−1; void stays 0.

    Args:
        id_map: (H, W) integer segment ids, 0 = void (usually the output of :func:`clean_segments`).
        num_slots: S, the number of id slots including the void slot 0.
        generator: source of the permutation; each call draws a fresh one from it.

    If K > S−1 the K−(S−1) smallest segments (by pixel area; ties: smaller id first) are merged
    into void and counted in ``n_merged``.
    """
    id_map = check_id_map(id_map)
    _check_slots_and_generator(num_slots, generator)
    uniq, inverse, counts = _unique_counts(id_map)
    segment = uniq != 0
    seg_index = np.flatnonzero(segment)  # positions in uniq of the non-void segments
    n_merged = max(0, seg_index.size - (num_slots - 1))
    if n_merged:
        # stable sort on area keeps the id order (uniq is sorted) among equal areas
        by_area = seg_index[np.argsort(counts[seg_index], kind="stable")]
        seg_index = np.sort(by_area[n_merged:])

    lut = np.zeros(uniq.size, dtype=np.int64)
    chosen = generator.permutation(num_slots - 1)[: seg_index.size] + 1
    lut[seg_index] = chosen
    slot_map = lut[inverse].reshape(id_map.shape)
    slots = {int(s): int(uniq[i]) for s, i in zip(chosen, seg_index)}
    return RemapResult(slot_map, slots, n_merged)


@dataclass
class LabelRemap:
    """Output of :func:`clean_remap_labels`: cleaning and slot choice decided on label areas.

    ``lut`` (L,) int64 maps each dense label to its slot (0 for void, removed and merged labels),
    so ``lut[labels]`` is the slot map; ``slots`` maps each used slot to its label;
    ``segments_info`` holds the kept entries (copies, input order) as :func:`clean_segments` does.
    """

    lut: np.ndarray
    slots: dict[int, int]
    segments_info: list[dict]
    n_small: int
    n_crowd: int
    n_merged: int
    has_segments: bool


def clean_remap_labels(counts: np.ndarray, segments_info: list[dict], min_area: int, num_slots: int,
                       generator: np.random.Generator) -> LabelRemap:
    """:func:`clean_segments` then :func:`remap_ids` on a dense label map, from its areas alone.

    Args:
        counts: (L,) pixels of each label 0..L−1 of an (H, W) dense label map (0 = void), e.g.
            ``np.bincount(labels.ravel())``.
        segments_info: entries whose ``id`` is a label.
        min_area, num_slots, generator: as for :func:`clean_segments` and :func:`remap_ids`.

    ``lut[labels]`` equals ``remap_ids(clean_segments(labels, segments_info, min_area).id_map,
    num_slots, generator).slot_map`` (the same draw from ``generator``) and the counts equal
    theirs, without a pass over the pixels: callers apply ``lut`` to the (resized) labels.
    """
    _check_slots_and_generator(num_slots, generator)
    counts = np.asarray(counts, dtype=np.int64).ravel()
    area = counts.tolist()
    kept, keep, n_small, n_crowd = _filter_segments(
        segments_info, lambda sid: area[sid] if 0 < sid < len(area) else 0, min_area)
    # the labels left in the cleaned map, in label order (remap_ids' sorted unique ids)
    seg_index = np.array(sorted(s for s in keep if 0 < s < len(area) and area[s] > 0), dtype=np.int64)
    n_merged = max(0, seg_index.size - (num_slots - 1))
    if n_merged:
        by_area = seg_index[np.argsort(counts[seg_index], kind="stable")]
        seg_index = np.sort(by_area[n_merged:])
    lut = np.zeros(max(len(area), 1), dtype=np.int64)
    chosen = generator.permutation(num_slots - 1)[: seg_index.size] + 1
    lut[seg_index] = chosen
    slots = {int(s): int(i) for s, i in zip(chosen, seg_index)}
    return LabelRemap(lut, slots, kept, n_small, n_crowd, n_merged, bool(kept))


def repermute_slots(slot_map: np.ndarray, num_slots: int, generator: np.random.Generator) -> np.ndarray:
    """Training-time re-permutation of an already remapped slot map (values in [0, S)).

    Same distribution as :func:`remap_ids` on a slot map (present slots get fresh distinct
    random slots, void stays 0) but keeps the input's small dtype and avoids a full relabel:
    (H, W) uint8/uint16 → (H, W) same dtype.
    """
    if slot_map.dtype == np.uint8 and num_slots <= 256:
        # PIL's histogram and lookup-table point() run in C, ~5x faster than numpy indexing
        img = Image.fromarray(slot_map, mode="L")
        present = np.flatnonzero(np.asarray(img.histogram()[:num_slots]))
        present = present[present != 0]
        lut = np.zeros(256, dtype=np.uint8)
        lut[present] = generator.permutation(num_slots - 1)[: present.size] + 1
        return np.asarray(img.point(lut.tolist()))
    present = np.flatnonzero(np.bincount(slot_map.ravel(), minlength=num_slots))
    present = present[present != 0]
    lut = np.zeros(num_slots, dtype=slot_map.dtype)
    lut[present] = generator.permutation(num_slots - 1)[: present.size] + 1
    return lut[slot_map]


def slot_areas(slot_map: torch.Tensor, valid: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Pixels of each slot per map: (B, H, W) int64 slots in [0, S) and (B, H, W) bool ``valid``
    → (B, S) float32 counts of valid pixels (slot 0, void, included)."""
    import torch

    counts = torch.zeros(slot_map.shape[0], num_slots, device=slot_map.device)
    counts.scatter_add_(1, slot_map.flatten(1).long(), valid.flatten(1).float())
    return counts


def raster_slot_lut(slot_map: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Renumbering of each map's segments in raster (reading) order of their first pixel.

    Args:
        slot_map: (B, H, W) int64 slots in [0, S), 0 = void.
        num_slots: S.

    Returns (B, S) int64 ``lut``: ``lut[b, s]`` is 1, 2, … for the present non-void slots of map
    ``b``, ordered by the flat index of their first pixel, and 0 for void and absent slots. The
    result depends only on which pixels share a slot, not on the slot values.
    """
    import torch

    if slot_map.ndim != 3:
        raise ValueError(f"slot_map must be (B, H, W), got shape {tuple(slot_map.shape)}")
    b = slot_map.shape[0]
    flat = slot_map.reshape(b, -1).long()
    n = flat.shape[1]
    pos = torch.arange(n, device=flat.device).expand(b, n)
    first = torch.full((b, num_slots), n, dtype=torch.long, device=flat.device)
    first.scatter_reduce_(1, flat, pos, reduce="amin")
    first[:, 0] = n  # void is never numbered
    order = first.argsort(dim=1, stable=True)  # present slots first, by first pixel
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_slots, device=flat.device).expand(b, num_slots))
    return torch.where(first < n, rank + 1, torch.zeros_like(rank))


def raster_slots(slot_map: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, H, W) int64 slots → the same segmentation with slots 1..K in raster order of each
    segment's first pixel (void stays 0); see :func:`raster_slot_lut`. Any permutation of the
    input's non-void slots gives the same output."""
    return apply_slot_lut(slot_map, raster_slot_lut(slot_map, num_slots))


def slot_grid(num_slots: int) -> tuple[int, int]:
    """The (rows, cols) of the cell grid of :func:`grid_slot_lut`: rows = ⌊√(S−1)⌋, cols =
    ⌊(S−1) / rows⌋, so every cell has its own non-void slot (S = 32: 5 × 6; S = 128: 11 × 11)."""
    if num_slots < 3:
        raise ValueError(f"the grid slot order needs num_slots >= 3, got {num_slots}")
    rows = int((num_slots - 1) ** 0.5)
    return rows, (num_slots - 1) // rows


def grid_slot_lut(slot_map: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Renumbering of each map's segments by where their first pixel (in reading order) lies.

    The image is cut into the :func:`slot_grid` of rows × cols cells; a segment whose first pixel
    falls in cell ``c`` (numbered in reading order) gets slot ``1 + c``, so a segment's slot
    depends on its own place, not on how many segments come before it (as with
    :func:`raster_slot_lut`). Segments are placed in reading order of their first pixel; one whose
    cell's slot is taken gets the next free slot after it (cyclically over 1..S−1).

    Args:
        slot_map: (B, H, W) int64 slots in [0, S), 0 = void.
        num_slots: S (≥ 3).

    Returns (B, S) int64 ``lut`` (0 for void and absent slots). Like the raster order, it depends
    only on which pixels share a slot, not on the slot values. The placement loops on the host
    over the at most S − 1 segments of each map.
    """
    import torch

    rows, cols = slot_grid(num_slots)
    raster = raster_slot_lut(slot_map, num_slots)  # (B, S): 1..K by first pixel
    b, h, w = slot_map.shape
    flat = slot_map.reshape(b, -1).long()
    n = flat.shape[1]
    first = torch.full((b, num_slots), n, dtype=torch.long, device=flat.device)
    first.scatter_reduce_(1, flat, torch.arange(n, device=flat.device).expand(b, n), reduce="amin")
    cell = (first // w * rows // h) * cols + (first % w * cols // w)  # (B, S), meaningless for absent slots
    lut = torch.zeros(b, num_slots, dtype=torch.long)
    for i, (ranks, cells) in enumerate(zip(raster.cpu().tolist(), cell.cpu().tolist())):
        taken = [False] * num_slots
        for _, s in sorted((r, s) for s, r in enumerate(ranks) if r > 0):
            slot = 1 + cells[s]
            while taken[slot]:
                slot = slot % (num_slots - 1) + 1
            taken[slot] = True
            lut[i, s] = slot
    return lut.to(slot_map.device)


def apply_slot_lut(slot_map: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64 slots and a (B, S) renumbering → the renumbered (B, H, W) int64 slots."""
    return lut.gather(1, slot_map.reshape(slot_map.shape[0], -1).long()).reshape(slot_map.shape)


SLOT_ORDERS = {"raster": raster_slot_lut, "grid": grid_slot_lut}
"""The numbered slot orders of ``diffusion.slot_order`` (``random`` keeps the stored slots)."""


def ordered_slots(slot_map: torch.Tensor, num_slots: int, order: str) -> torch.Tensor:
    """(B, H, W) int64 slots renumbered in ``order`` (``raster`` or ``grid``; ``random``: unchanged)."""
    if order == "random":
        return slot_map
    return apply_slot_lut(slot_map, SLOT_ORDERS[order](slot_map, num_slots))
