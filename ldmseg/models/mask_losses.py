"""The mask autoencoder's loss: point-sampled cross-entropy + per-segment BCE + Dice.

Mask2Former / PointRend style (docs/method.md#mask-autoencoder): for each image, ``num_points``
points are drawn, a fraction ``importance_sample_ratio`` of them being the most uncertain among
``oversample_ratio · num_points`` random candidates (uncertainty = −(top-1 − top-2 logit)), the
rest uniformly random. All points are drawn among the image's **valid** pixels (never padding),
at pixel centres: since the logits are already at full resolution, point-sampling them there
(``grid_sample`` at pixel centres) is exactly a gather, which also guarantees that logits on
padding never leak into the loss through interpolation. Targets are read at the same pixels
(nearest neighbour).

Terms, on the sampled points:

- ``ce``: cross-entropy over the S id slots; points whose target is void (slot 0) are ignored.
- ``bce`` and ``dice``: for every segment of an image (a non-void slot present among its valid
  pixels), sigmoid BCE and Dice between the logit channel of that slot and the segment's binary
  mask (void points are negatives); averaged over all segments of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmseg.config import MaskAEConfig
from ldmseg.data.slots import slot_areas


def uncertainty_map(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, S, H, W) → (B, H, W) float32: −(top-1 − top-2), highest where least certain."""
    top2 = logits.detach().float().topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def sample_valid_pixels(valid: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly draw ``num`` valid pixels per image, with replacement.

    ``valid`` (B, H, W) bool → flat pixel indices (B, num) int64 into ``H·W``. An image without any
    valid pixel gets uniform indices; callers mask those points out with ``valid``.
    """
    weights = valid.flatten(1).float()
    empty = weights.sum(1) == 0
    if empty.any():
        weights = torch.where(empty[:, None], torch.ones_like(weights), weights)
    return torch.multinomial(weights, num, replacement=True, generator=generator)


def sample_points(
    logits: torch.Tensor,
    valid: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the loss points: flat pixel indices (B, num_points) int64, all on valid pixels.

    ``round(importance_sample_ratio · num_points)`` are the most uncertain of
    ``max(num_points, round(oversample_ratio · num_points))`` random valid candidates; the rest are
    fresh uniform valid pixels.
    """
    if num_points < 1:
        raise ValueError(f"mask_ae.num_points must be >= 1, got {num_points}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"mask_ae.importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    with torch.no_grad():
        num_uncertain = int(round(importance_sample_ratio * num_points))
        num_random = num_points - num_uncertain
        parts = []
        if num_uncertain > 0:
            num_candidates = max(num_points, int(round(oversample_ratio * num_points)))
            candidates = sample_valid_pixels(valid, num_candidates, generator)
            scores = uncertainty_map(logits).flatten(1).gather(1, candidates)
            top = scores.topk(num_uncertain, dim=1).indices
            parts.append(candidates.gather(1, top))
        if num_random > 0:
            parts.append(sample_valid_pixels(valid, num_random, generator))
        return torch.cat(parts, dim=1)


def _check_inputs(logits: torch.Tensor, slot_map: torch.Tensor, valid: torch.Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, S, H, W), got shape {tuple(logits.shape)}")
    b, s, h, w = logits.shape
    if tuple(slot_map.shape) != (b, h, w) or tuple(valid.shape) != (b, h, w):
        raise ValueError(
            f"slot_map and valid must be (B, H, W) = {(b, h, w)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(slot_map.shape)} and {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor (True inside the image), got {valid.dtype}")
    if slot_map.numel() and (int(slot_map.min()) < 0 or int(slot_map.max()) >= s):
        raise ValueError(
            f"slot_map values must be in [0, {s}) (S = logits.shape[1]), got range "
            f"[{int(slot_map.min())}, {int(slot_map.max())}]"
        )


def mask_ae_loss(
    logits: torch.Tensor,
    slot_map: torch.Tensor,
    valid: torch.Tensor,
    cfg: MaskAEConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Point-sampled CE + BCE + Dice of the AE's logits against the slot map.

    Args:
        logits: (B, S, H, W) float, the decoder output at full resolution.
        slot_map: (B, H, W) int64 in [0, S), 0 = void or padding.
        valid: (B, H, W) bool, False on padding; padding never counts in any term.
        cfg: weights (``ce_weight``, ``bce_weight``, ``dice_weight``) and point sampling
            (``num_points``, ``oversample_ratio``, ``importance_sample_ratio``).
        generator: for the point sampling (on the logits' device); ``None``: the global RNG.

    Returns:
        ``(loss, parts)``: the weighted sum (scalar float32 tensor, differentiable) and floats
        ``{"loss", "ce", "bce", "dice", "num_segments"}``.
    """
    _check_inputs(logits, slot_map, valid)
    b, s, h, w = logits.shape
    logits = logits.float()
    slot_map = torch.where(valid, slot_map, torch.zeros_like(slot_map))

    index = sample_points(
        logits, valid, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio, generator
    )  # (B, N)
    n = index.shape[1]
    point_logits = logits.flatten(2).gather(2, index[:, None, :].expand(b, s, n))  # (B, S, N)
    point_targets = slot_map.flatten(1).gather(1, index)  # (B, N)
    point_valid = valid.flatten(1).gather(1, index)  # (B, N); False only for all-padding images

    # Cross-entropy over id slots, void ignored.
    ce = F.cross_entropy(point_logits, point_targets, reduction="none")  # (B, N)
    ce_weight = (point_valid & (point_targets != 0)).float()
    ce_loss = (ce * ce_weight).sum() / ce_weight.sum().clamp(min=1.0)

    # Segments: non-void slots present among each image's valid pixels.
    counts = slot_areas(slot_map, valid, s)
    counts[:, 0] = 0
    seg_image, seg_slot = counts.nonzero(as_tuple=True)  # (M,), (M,)
    if seg_image.numel() == 0:
        zero = logits.sum() * 0.0
        bce_loss, dice_loss = zero, zero
    else:
        seg_logits = point_logits[seg_image, seg_slot]  # (M, N)
        seg_targets = (point_targets[seg_image] == seg_slot[:, None]).float()  # (M, N)
        seg_valid = point_valid[seg_image].float()  # (M, N)
        bce = F.binary_cross_entropy_with_logits(seg_logits, seg_targets, reduction="none")
        bce_loss = ((bce * seg_valid).sum(1) / seg_valid.sum(1).clamp(min=1.0)).mean()
        prob = seg_logits.sigmoid() * seg_valid
        inter = (prob * seg_targets).sum(1)
        dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(1) + seg_targets.sum(1) + 1.0)
        dice_loss = dice.mean()

    loss = cfg.ce_weight * ce_loss + cfg.bce_weight * bce_loss + cfg.dice_weight * dice_loss
    parts = {
        "loss": float(loss.detach()),
        "ce": float(ce_loss.detach()),
        "bce": float(bce_loss.detach()),
        "dice": float(dice_loss.detach()),
        "num_segments": float(seg_image.numel()),
    }
    return loss, parts
