"""From per-slot logits to panoptic segments (docs/method.md#sampling-and-post-processing).

Given the decoder's S logits per pixel (slot 0 = void) at the original image size:

1. per pixel, the id slot is the argmax; the pixel is void when that slot is 0, when its softmax
   probability is below ``mask_th``, or when it is outside ``valid``;
2. per segment (a non-void slot that owns at least one pixel): it is dropped when its area is
   below ``count_th`` × the image area (valid pixels), or when its argmax area divided by the
   area where ``sigmoid(logit) ≥ mask_th`` for its slot is below ``overlap_th`` (a segment that
   keeps little of its own mask is mostly hidden by others); a segment whose sigmoid area is 0
   has no such evidence and is kept;
3. with ``split_disconnected``, each survivor whose pixels form several 4-connected pieces of at
   least ``count_th`` × the image area becomes one segment per such piece (smaller pieces stay
   with the largest one): a prior that segments are connected, true of the synthetic scenes,
   false of occluded COCO objects (docs/method.md#sampling-and-post-processing);
4. the survivors get fresh ids 1..K by decreasing area (ties: lower slot first, then the piece
   with the first pixel in reading order); dropped pixels become void (0). Segments never overlap.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage


def _logit(p: float) -> float:
    """The logit whose sigmoid is ``p`` (±inf at 0 and 1)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def postprocess(
    logits: torch.Tensor | np.ndarray,
    *,
    mask_th: float,
    count_th: float,
    overlap_th: float,
    split_disconnected: bool = False,
    valid: torch.Tensor | np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Per-slot logits → non-overlapping segments.

    Args:
        logits: (S, H, W) float logits, slot 0 = void (torch on any device, or numpy).
        mask_th: a pixel is void when its max softmax probability is below this; also the
            sigmoid threshold of a slot's own mask for the overlap test.
        count_th: minimum segment area as a fraction of the image area (the valid pixels).
        overlap_th: minimum argmax area / sigmoid-mask area of a kept segment.
        split_disconnected: one segment per 4-connected piece of at least ``count_th`` of the
            image area (the same slot may hold several segments).
        valid: (H, W) bool, False where no prediction is wanted (void); ``None``: all valid.

    Returns:
        ``id_map`` (H, W) int64 (0 = void, segments 1..K) and ``segments``: one dict per segment,
        in id order, ``{"id", "area" (pixels), "score" (mean max-probability), "slot"}``.
    """
    x = torch.as_tensor(logits)
    if x.ndim != 3:
        raise ValueError(f"logits must be (S, H, W), got shape {tuple(x.shape)}")
    for name, value in (("mask_th", mask_th), ("count_th", count_th)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if overlap_th < 0:
        raise ValueError(f"overlap_th must be >= 0, got {overlap_th}")
    s, h, w = x.shape
    x = x.float()
    prob, slot = x.softmax(dim=0).max(dim=0)  # (H, W)
    keep = (slot != 0) & (prob >= mask_th)
    if valid is not None:
        valid_t = torch.as_tensor(valid, device=x.device)
        if tuple(valid_t.shape) != (h, w) or valid_t.dtype != torch.bool:
            raise ValueError(f"valid must be an (H, W) = {(h, w)} bool mask, got {tuple(valid_t.shape)} {valid_t.dtype}")
        keep &= valid_t
        image_area = int(valid_t.sum())
        own_mask = (x >= _logit(mask_th)) & valid_t  # (S, H, W)
    else:
        image_area = h * w
        own_mask = x >= _logit(mask_th)
    slot = torch.where(keep, slot, torch.zeros_like(slot))

    area = torch.bincount(slot.flatten(), minlength=s).cpu()  # (S,) argmax area per slot
    score_sum = torch.zeros(s, device=x.device).index_add_(0, slot.flatten(), prob.flatten()).cpu()
    mask_area = own_mask.flatten(1).sum(dim=1).cpu()  # (S,) sigmoid-mask area per slot
    area[0] = 0

    candidates = []
    for k in torch.nonzero(area).flatten().tolist():
        a, m = int(area[k]), int(mask_area[k])
        if a < count_th * image_area:
            continue
        if m > 0 and a / m < overlap_th:
            continue
        candidates.append((-a, k))
    candidates.sort()
    if split_disconnected:
        return _split_pieces(slot.cpu().numpy(), prob.cpu().numpy(), [k for _, k in candidates],
                             count_th * image_area)

    lut = torch.zeros(s, dtype=torch.int64)
    segments = []
    for new_id, (neg_area, k) in enumerate(candidates, start=1):
        lut[k] = new_id
        segments.append({"id": new_id, "area": -neg_area, "score": float(score_sum[k]) / -neg_area, "slot": k})
    id_map = lut.to(slot.device)[slot].cpu().numpy().astype(np.int64)
    return id_map, segments


def _split_pieces(
    slot: np.ndarray, prob: np.ndarray, kept: list[int], min_area: float
) -> tuple[np.ndarray, list[dict]]:
    """Step 3–4 with ``split_disconnected``: ``slot`` (H, W) int64 slot map (0 void), ``prob`` (H, W)
    float32 max-probabilities, ``kept`` the surviving slots → ``id_map`` (H, W) int64 and segments."""
    pieces = []  # (-area, slot, first pixel, mask)
    for k in kept:
        own = slot == k
        labels, n = ndimage.label(own)  # 4-connectivity
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
        large = [j for j in range(n) if sizes[j] >= min_area] or [int(sizes.argmax())]
        largest = max(large, key=lambda j: sizes[j])
        for j in large:
            mask = labels == j + 1
            if j == largest:  # the pieces under min_area stay with the largest piece
                mask |= own & ~np.isin(labels, [i + 1 for i in large])
            pieces.append((-int(mask.sum()), k, int(np.flatnonzero(mask)[0]), mask))
    pieces.sort(key=lambda p: p[:3])
    id_map = np.zeros(slot.shape, dtype=np.int64)
    segments = []
    for new_id, (neg_area, k, _, mask) in enumerate(pieces, start=1):
        id_map[mask] = new_id
        segments.append({"id": new_id, "area": -neg_area, "score": float(prob[mask].mean()), "slot": k})
    return id_map, segments
