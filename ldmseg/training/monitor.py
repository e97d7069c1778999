"""Training-time monitoring: PQ on a fixed small batch and an overlay panel (the metrics ``val_*``).

- :func:`monitor_batch`: the fixed batch, the first rows of a split of the shards;
- :func:`monitor_ae`: reconstruction PQ of the mask autoencoder (encode → decode →
  post-process) on the batch's slot maps.
- :func:`monitor_ldm`: PQ of sampled segmentations (few sampling steps) against the batch's
  slot maps, through :class:`~ldmseg.segmenter.Segmenter` (the same path as evaluation).
- :func:`ae_reconstruction_pq`: the mask AE's reconstruction PQ on a COCO panoptic dataset.
- :func:`overlay_panel`: image | ground truth | prediction, one row per sample, as uint8 RGB.

(Checking a dataset before training is ``ldmseg validate``, another thing.) A monitoring batch
is a training batch (``image`` (B, 3, R, R) float32 in [−1, 1], ``slot_map``
(B, R, R) int64, ``valid`` (B, R, R) bool) read without slot re-permutation; its slots are the
ground-truth segment ids (0 = void), class-agnostic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ldmseg.config import Config
from ldmseg.data.encoding import ids_to_bits, tensor_to_image
from ldmseg.data.segments import segments_info
from ldmseg.metrics.pq import PQStat, pq_image_stats
from ldmseg.models.ddp import unwrap
from ldmseg.overlay import colorize
from ldmseg.postprocess import postprocess

def monitor_batch(data: str, split: str, n: int, num_slots: int, device) -> dict:
    """The first ``n`` rows of ``split`` of the shards in ``data`` (stored slots, no re-permutation)
    as one batch on ``device``: ``image``, ``slot_map``, ``valid``."""
    from ldmseg.data.parquet_dataset import ShardDataset, iterate_batches

    batch = next(iterate_batches(ShardDataset(data, split, num_slots, train=False), n, drop_last=False))
    return {k: batch[k].to(device) for k in ("image", "slot_map", "valid")}


def overlay_panel(images: list[np.ndarray], gts: list[np.ndarray], preds: list[np.ndarray],
                  min_size: int = 128, gap: int = 2) -> np.ndarray:
    """Rows of image | GT | prediction → (N·(s+gap)−gap, 3·(s+gap)−gap, 3) uint8 on white.

    ``images``: (H, W, 3) uint8; ``gts`` / ``preds``: (H, W) id maps (0 = void, black). Tiles are
    enlarged by an integer nearest-neighbour factor to at least ``min_size`` pixels.
    """
    if not (len(images) == len(gts) == len(preds)) or not images:
        raise ValueError(f"overlay_panel needs equally many images, GT and predicted maps (>= 1), got "
                         f"{len(images)}, {len(gts)}, {len(preds)}")
    h, w = images[0].shape[:2]
    k = max(1, -(-min_size // max(h, w)))
    th, tw = h * k, w * k
    out = np.full((len(images) * (th + gap) - gap, 3 * (tw + gap) - gap, 3), 255, np.uint8)
    for row, tiles in enumerate(zip(images, map(colorize, gts), map(colorize, preds))):
        for col, tile in enumerate(tiles):
            big = np.repeat(np.repeat(np.asarray(tile, np.uint8), k, axis=0), k, axis=1)
            y, x = row * (th + gap), col * (tw + gap)
            out[y:y + th, x:x + tw] = big
    return out


def _gt(slot_map: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Ground truth of a stored slot map: (H, W) uint32 ids (0 outside ``valid``) and its segments."""
    ids = np.where(valid, slot_map, 0).astype(np.uint32)
    return ids, segments_info(ids, bbox=False)


def _pred_segments(segments: list[dict]) -> list[dict]:
    return [{"id": int(s["id"]), "category_id": 1} for s in segments]


def _summary(stat: PQStat, prefix: str) -> dict[str, float]:
    s = stat.summary({1: {"id": 1, "isthing": 1}})
    return {f"{prefix}_pq": s["pq"], f"{prefix}_sq": s["sq"], f"{prefix}_rq": s["rq"]}


def _score(batch: dict, pred_maps: list[np.ndarray], pred_segments: list[list[dict]], prefix: str
           ) -> tuple[dict[str, float], list[np.ndarray], list[np.ndarray]]:
    slot_maps = batch["slot_map"].cpu().numpy()
    valids = batch["valid"].cpu().numpy()
    stat, gts = PQStat(), []
    for slot_map, valid, pred, segs in zip(slot_maps, valids, pred_maps, pred_segments):
        gt_ids, gt_segs = _gt(slot_map, valid)
        gts.append(gt_ids)
        stat += pq_image_stats(gt_ids, gt_segs, pred.astype(np.uint32), _pred_segments(segs), class_agnostic=True)
    metrics = _summary(stat, prefix)
    c = stat.per_category.get(1)
    metrics[f"{prefix}_fp_per_image"] = (c.fp if c else 0) / max(1, len(pred_maps))
    images = [tensor_to_image(im) for im in batch["image"].cpu()]
    return metrics, images, gts


@torch.no_grad()
def monitor_ae(mask_ae: nn.Module, batch: dict, cfg: Config) -> tuple[dict[str, float], np.ndarray]:
    """Reconstruction PQ of the mask AE on ``batch`` → (``{"val_recon_pq", ...}``, overlay panel)."""
    module = unwrap(mask_ae)
    was_training = module.training
    module.eval()
    valid = batch["valid"]
    logits = module(ids_to_bits(torch.where(valid, batch["slot_map"], 0), module.num_bits))
    module.train(was_training)
    th = cfg.sampling.postprocess_options
    maps, segs = zip(*(postprocess(lg, valid=v, **th) for lg, v in zip(logits, valid)))
    metrics, images, gts = _score(batch, list(maps), list(segs), "val_recon")
    return metrics, overlay_panel(images, gts, list(maps))


@torch.no_grad()
def monitor_ldm(mask_ae: nn.Module, image_encoder: nn.Module, denoiser: nn.Module, latent_scale: float,
                 batch: dict, cfg: Config, *, steps: int | None = None, seed: int = 0
                 ) -> tuple[dict[str, float], np.ndarray]:
    """PQ of sampled segmentations on ``batch`` (``steps`` sampling steps, default the config's)
    → (``{"val_pq", "val_sq", "val_rq", "val_fp_per_image"}``, overlay panel).

    ``denoiser`` should hold the weights to judge (e.g. the EMA copy); the modules are left in
    the mode they were in.
    """
    from ldmseg.segmenter import Segmenter

    modules = [unwrap(m) for m in (mask_ae, image_encoder, denoiser)]
    modes = [m.training for m in modules]
    device = next(modules[2].parameters()).device
    segmenter = Segmenter(cfg, *modules, latent_scale, device=device)
    images = [tensor_to_image(im) for im in batch["image"].cpu()]
    results = segmenter.segment(images, steps=steps, seed=[seed + i for i in range(len(images))])
    for m, mode in zip(modules, modes):
        m.train(mode)
    valid = batch["valid"].cpu().numpy()
    maps = [np.where(v, r.id_map, 0) for r, v in zip(results, valid)]
    segs = [[s for s in r.segments if (m == s["id"]).any()] for r, m in zip(results, maps)]
    metrics, images, gts = _score(batch, maps, segs, "val")
    return metrics, overlay_panel(images, gts, maps)


@torch.no_grad()
def ae_reconstruction_pq(mask_ae: nn.Module, dataset, cfg: Config, *, max_images: int | None = None
                         ) -> dict[str, float]:
    """Class-agnostic PQ of the mask AE reconstructing a COCO panoptic dataset's masks.

    Per image, as the shards make it: the id map resized to the training resolution (nearest,
    padded), crowd segments and segments under ``data.min_segment_area`` pixels *at that
    resolution* made void (``clean_segments``), ids given slots by the evaluation permutation, encoded,
    decoded and post-processed with ``cfg.sampling``'s thresholds; scored against the resized
    map with *all* its segments (segments beyond the ``num_slots − 1`` slots count as missed).
    Returns ``pq``, ``sq``, ``rq``, ``n_images``, ``n_segments``, ``n_over_slots``.
    """
    from ldmseg.data import coco
    from ldmseg.data.resize import resize_pad
    from ldmseg.data.slots import clean_segments, eval_generator, remap_ids

    module = unwrap(mask_ae)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    th = cfg.sampling.postprocess_options
    stat, n, n_segments, n_over = PQStat(), 0, 0, 0
    for rec in dataset.records[:max_images] if max_images else dataset.records:
        sample = coco.read_sample(rec)
        _, ids_r, valid, _ = resize_pad(None, sample.id_map, cfg.data.resolution, cfg.data.resize_mode)
        ids_r = clean_segments(ids_r, sample.segments_info, cfg.data.min_segment_area).id_map
        remap = remap_ids(ids_r, cfg.data.num_slots, eval_generator(int(rec.image_id)))
        slots = torch.from_numpy(remap.slot_map)[None].to(device)
        logits = module(ids_to_bits(slots, module.num_bits))[0]
        pred, segs = postprocess(logits, valid=torch.from_numpy(valid).to(device), **th)
        gt_ids, gt_segs = _gt(ids_r, valid)
        stat += pq_image_stats(gt_ids, gt_segs, pred.astype(np.uint32), _pred_segments(segs), class_agnostic=True,
                               image_id=rec.image_id)
        n += 1
        n_segments += len(gt_segs)
        n_over += remap.n_merged
    module.train(was_training)
    s = stat.summary({1: {"id": 1, "isthing": 1}})
    return {"pq": s["pq"], "sq": s["sq"], "rq": s["rq"], "n_images": n, "n_segments": n_segments,
            "n_over_slots": n_over}
