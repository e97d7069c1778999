"""Targets and encoding (METHOD.md, "Targets and encoding"): pure functions, no I/O.

The path of one panoptic map to the mask autoencoder's input:

1. :func:`clean_segments` turns crowd segments and segments under ``min_area`` pixels into void.
2. :func:`resize_pad` brings image and id map to R×R (aspect kept, padded; or squashed).
3. :func:`remap_ids` gives the K non-void segments distinct random id slots in 1..S−1
   (void stays 0); validation uses :func:`eval_generator` so the permutation is fixed per image.
   With ``diffusion.slot_order: raster`` the diffusion stage renumbers them in reading order
   instead (:func:`raster_slots`).
4. :func:`ids_to_bits` writes log2(S) bit planes in {−1, +1} (void: 0 in every plane);
   :func:`bits_to_ids` inverts it.

:func:`restore_size` takes predictions (ids or logits) at R×R back to the original image size.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
from PIL import Image

from ldmseg.data.ids import is_crowd

if TYPE_CHECKING:
    import torch

ResizeMode = Literal["pad", "squash"]

_EVAL_STREAM = 0x1D5E6  # separates eval remap streams from other uses of (seed, image_id)


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor. torch is imported only where it is used: preprocessing
    workers never need it (importing it costs ~1.5 s per process), and a tensor implies it is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


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
    id_map = _check_id_map(id_map)
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


def _check_id_map(id_map: Any, name: str = "id_map") -> np.ndarray:
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
    id_map = _check_id_map(id_map)
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
    id_map = _check_id_map(id_map)
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
    lut = raster_slot_lut(slot_map, num_slots)
    return lut.gather(1, slot_map.reshape(slot_map.shape[0], -1).long()).reshape(slot_map.shape)


def slots_to_ids(slot_map: np.ndarray, slots: dict[int, int]) -> np.ndarray:
    """Inverse of :func:`remap_ids`: (H, W) slots → (H, W) int64 original ids (unknown slots → 0)."""
    slot_map = np.asarray(slot_map, dtype=np.int64)
    size = max([int(slot_map.max(initial=0)), *slots.keys()]) + 1
    lut = np.zeros(size, dtype=np.int64)
    for slot, sid in slots.items():
        lut[int(slot)] = int(sid)
    return lut[slot_map]


# --------------------------------------------------------------------------------------------
# Bit planes
# --------------------------------------------------------------------------------------------


def ids_to_bits(slot_map: np.ndarray | torch.Tensor, num_bits: int) -> np.ndarray | torch.Tensor:
    """Slot ids → bit planes, LSB first, in {−1, +1}; void (0) pixels are 0 in every plane.

    Args:
        slot_map: (H, W) or (B, H, W) integer slots in [0, 2**num_bits), numpy or torch.
        num_bits: nb = log2(S).

    Returns:
        (nb, H, W) or (B, nb, H, W) float32, of the input's kind (torch: on the same device).
    """
    is_torch = _is_tensor(slot_map)
    if is_torch:
        import torch
    ids = slot_map.long() if is_torch else np.asarray(slot_map)
    if ids.ndim not in (2, 3):
        raise ValueError(f"slot_map must be (H, W) or (B, H, W), got shape {tuple(ids.shape)}")
    if is_torch:
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"slot_map must hold integers, got {slot_map.dtype}")
    elif not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"slot_map must hold integers, got {ids.dtype}")
    if num_bits < 1:
        raise ValueError(f"num_bits must be >= 1, got {num_bits}")
    if ids.numel() if is_torch else ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= 2**num_bits:
            raise ValueError(
                f"slot_map values must lie in [0, {2 ** num_bits}) for {num_bits} bits, got [{lo}, {hi}]; "
                "remap segment ids to slots with remap_ids first"
            )

    if is_torch:
        shifts = torch.arange(num_bits, device=ids.device).view(num_bits, 1, 1)
        planes = (ids.unsqueeze(-3) >> shifts) & 1
        bits = planes.float() * 2 - 1
        return bits * (ids != 0).unsqueeze(-3).float()
    ids = ids.astype(np.int64, copy=False)
    shifts = np.arange(num_bits, dtype=np.int64).reshape(num_bits, 1, 1)
    planes = (np.expand_dims(ids, -3) >> shifts) & 1
    bits = planes.astype(np.float32) * 2 - 1
    return bits * np.expand_dims(ids != 0, -3).astype(np.float32)


def bits_to_ids(bits: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Bit planes → slot ids: the inverse of :func:`ids_to_bits`.

    Args:
        bits: (nb, H, W) or (B, nb, H, W) real values, numpy or torch.

    Returns:
        (H, W) or (B, H, W) int64 of the input's kind. A pixel is void (0) when the mean of
        ``|bits|`` over its planes is < 0.5; otherwise bit k is ``bits[k] > 0``.
    """
    is_torch = _is_tensor(bits)
    if is_torch:
        import torch
    if bits.ndim not in (3, 4):
        raise ValueError(f"bits must be (nb, H, W) or (B, nb, H, W), got shape {tuple(bits.shape)}")
    nb = bits.shape[-3]
    if is_torch:
        x = bits.float()
        weights = (2 ** torch.arange(nb, device=x.device, dtype=torch.int64)).view(nb, 1, 1)
        ids = ((x > 0).long() * weights).sum(dim=-3)
        void = x.abs().mean(dim=-3) < 0.5
        return torch.where(void, torch.zeros_like(ids), ids)
    x = np.asarray(bits, dtype=np.float32)
    weights = (2 ** np.arange(nb, dtype=np.int64)).reshape(nb, 1, 1)
    ids = ((x > 0).astype(np.int64) * weights).sum(axis=-3)
    void = np.abs(x).mean(axis=-3) < 0.5
    return np.where(void, 0, ids).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Resize and pad
# --------------------------------------------------------------------------------------------


@dataclass
class ResizeInfo:
    """Geometry of :func:`resize_pad`: the original size and where the image sits in R×R.

    In ``pad`` mode the resized image occupies rows [0, scaled_h) and columns [0, scaled_w);
    in ``squash`` mode scaled_h = scaled_w = resolution.
    """

    orig_h: int
    orig_w: int
    scaled_h: int
    scaled_w: int
    resolution: int
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ResizeInfo":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"ResizeInfo.from_dict: missing keys {missing}; expected {names}")
        return cls(**{n: (str(d[n]) if n == "mode" else int(d[n])) for n in names})


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels for nearest resampling (pixel centres)."""
    i = np.arange(dst, dtype=np.int64)
    return np.minimum(((2 * i + 1) * src) // (2 * dst), src - 1)


def scaled_size(height: int, width: int, resolution: int, mode: ResizeMode = "pad") -> tuple[int, int]:
    """(scaled_h, scaled_w): long side = resolution (``pad``) or both = resolution (``squash``)."""
    if mode == "squash":
        return resolution, resolution
    if mode != "pad":
        raise ValueError(f"mode must be 'pad' or 'squash', got {mode!r}")
    scale = resolution / max(height, width)
    return (max(1, min(resolution, int(np.floor(height * scale + 0.5)))),
            max(1, min(resolution, int(np.floor(width * scale + 0.5)))))


def resize_pad(
    image: np.ndarray | None,
    id_map: np.ndarray | None,
    resolution: int,
    mode: ResizeMode = "pad",
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, ResizeInfo]:
    """Resize an image and/or its id map to R×R.

    Args:
        image: (H, W, 3) uint8 RGB, or None.
        id_map: (H, W) integer ids, or None (at least one of the two is needed).
        resolution: R.
        mode: ``pad`` resizes so the long side is R (aspect kept) and pads bottom/right with 0
            (image black, ids void); ``squash`` resizes to R×R ignoring the aspect ratio.

    Returns:
        ``image_r`` (R, R, 3) uint8 (bilinear) or None, ``id_r`` (R, R) int64 (nearest: ids are
        never blended) or None, ``valid`` (R, R) bool (False on padding) and a :class:`ResizeInfo`.
    """
    if image is None and id_map is None:
        raise ValueError("resize_pad needs an image, an id_map or both")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if id_map is not None:
        id_map = _check_id_map(id_map)
    if image is not None and id_map is not None and image.shape[:2] != id_map.shape:
        raise ValueError(f"image {image.shape[:2]} and id_map {id_map.shape} sizes differ")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    h, w = image.shape[:2] if image is not None else id_map.shape
    sh, sw = scaled_size(h, w, resolution, mode)
    info = ResizeInfo(h, w, sh, sw, resolution, mode)

    image_r = id_r = None
    if image is not None:
        small = image if (sh, sw) == (h, w) else np.asarray(
            Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR))
        image_r = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        image_r[:sh, :sw] = small
    if id_map is not None:
        id_r = np.zeros((resolution, resolution), dtype=np.int64)
        id_r[:sh, :sw] = id_map[np.ix_(_nearest_index(h, sh), _nearest_index(w, sw))]
    valid = np.zeros((resolution, resolution), dtype=bool)
    valid[:sh, :sw] = True
    return image_r, id_r, valid, info


def restore_size(
    array: np.ndarray | torch.Tensor, info: ResizeInfo, kind: Literal["ids", "logits"] = "ids"
) -> np.ndarray | torch.Tensor:
    """Take an R×R prediction back to the original image size: crop the valid region, resize.

    Args:
        array: ``kind="ids"``: (..., R, R) integer ids, resized nearest.
            ``kind="logits"``: (C, R, R) or (B, C, R, R) logits or probabilities, resized bilinear.
            numpy or torch (the output has the same kind, dtype and device).
        info: the :class:`ResizeInfo` returned by :func:`resize_pad`.

    Returns:
        (..., orig_h, orig_w).
    """
    r = info.resolution
    if tuple(array.shape[-2:]) != (r, r):
        raise ValueError(f"expected (..., {r}, {r}) for resolution {r}, got shape {tuple(array.shape)}")
    crop = array[..., : info.scaled_h, : info.scaled_w]
    if kind == "ids":
        rows = _nearest_index(info.scaled_h, info.orig_h)
        cols = _nearest_index(info.scaled_w, info.orig_w)
        if _is_tensor(crop):
            import torch

            rows_t = torch.from_numpy(rows).to(crop.device)
            cols_t = torch.from_numpy(cols).to(crop.device)
            return crop.index_select(-2, rows_t).index_select(-1, cols_t)
        return crop[..., rows[:, None], cols[None, :]]
    if kind != "logits":
        raise ValueError(f"kind must be 'ids' or 'logits', got {kind!r}")
    if crop.ndim not in (3, 4):
        raise ValueError(f"logits must be (C, R, R) or (B, C, R, R), got shape {tuple(array.shape)}")
    import torch
    import torch.nn.functional as F

    is_torch = isinstance(crop, torch.Tensor)
    x = crop if is_torch else torch.from_numpy(np.array(crop))  # a writable copy
    x4 = x.unsqueeze(0) if x.ndim == 3 else x
    out = F.interpolate(x4.float(), size=(info.orig_h, info.orig_w), mode="bilinear", align_corners=False)
    out = (out[0] if x.ndim == 3 else out).to(x.dtype)
    return out if is_torch else out.numpy()


# --------------------------------------------------------------------------------------------
# Image tensors
# --------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 RGB → (3, H, W) or (B, 3, H, W) float32 in [−1, 1]."""
    import torch

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(
            f"image must be (H, W, 3) or (B, H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
        )
    t = torch.from_numpy(image.astype(np.float32)) / 127.5 - 1.0
    return t.movedim(-1, -3).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) float in [−1, 1] → (H, W, 3) or (B, H, W, 3) uint8 (clamped, rounded)."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) torch tensor, got {getattr(tensor, 'shape', tensor)!r}")
    x = ((tensor.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).movedim(-3, -1).numpy()
