"""PQ of zero-shot mask inpainting against the known fraction (docs/method.md#inpainting).

For every image of a COCO panoptic dataset, a known-mask of ``kind`` (``sparse`` or ``global``)
covering ``fraction`` of the latent grid (seeded by the image id) is drawn at the model's latent
resolution and mapped to the image; the ground truth is given on the known pixels, the model
fills in the rest (:meth:`~ldmseg.segmenter.Segmenter.inpaint`), and the completed map is
scored against the whole ground truth:

- ``pq_unknown`` (``sq_unknown``, ``rq_unknown``): PQ over the *mostly unknown* segments only
  (at most ``unknown_th`` of their pixels given); the other ground-truth segments count as void,
  so predictions on them are neither matches nor false positives. This is the headline: its
  gain over 0 % known is what the hints taught the model about the segments it had to fill in;
- ``pq``, ``sq``, ``rq``: class-agnostic PQ over all segments of the image. The known pixels are
  pasted back into the result, so this rises with the known fraction whatever the model does
  (a random denoiser gains 20+ points at 50 % known): never report it alone.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ldmseg.data import coco
from ldmseg.data.masks import make_known_mask, upsample_mask
from ldmseg.data.resize import resize_pad, restore_size, scaled_size
from ldmseg.data.segments import segments_info
from ldmseg.data.slots import clean_segments
from ldmseg.metrics.pq import PQStat, pq_image_stats

_CATEGORY = {1: {"id": 1, "isthing": 1}}


def known_pixels(kind: str, fraction: float, height: int, width: int, resolution: int, factor: int,
                 resize_mode: str, seed: int) -> np.ndarray:
    """An (H, W) bool known-mask for an image: drawn on the latent cells that cover the image at
    the training resolution R (``ceil(h'/f) × ceil(w'/f)`` for the resized h' × w'; padding is
    never drawn), upsampled by f and mapped back to the image size."""
    sh, sw = scaled_size(height, width, resolution, resize_mode)
    cells = resolution // factor
    grid = np.zeros((cells, cells), dtype=bool)
    ch, cw = min(cells, -(-sh // factor)), min(cells, -(-sw // factor))
    grid[:ch, :cw] = make_known_mask(kind, ch, cw, fraction, seed)
    mask_r = upsample_mask(grid, factor).astype(np.int64)
    info = resize_pad(None, np.zeros((height, width), np.int64), resolution, resize_mode)[3]
    return restore_size(mask_r, info, kind="ids") > 0


def inpainting_scores(segmenter, dataset: coco.CocoPanoptic, kind: str, fraction: float, *, seed: int = 0,
                      unknown_th: float = 0.5, max_images: int | None = None,
                      progress: Callable[[int, int], None] | None = None, **options: Any) -> dict[str, float]:
    """Inpaint every readable image with ``fraction`` known (``kind`` masks) → PQ figures.

    ``options`` go to :meth:`Segmenter.inpaint` (``sampler``, ``steps``, thresholds). Returns
    ``pq``, ``sq``, ``rq``, ``pq_unknown``, ``sq_unknown``, ``rq_unknown``, ``known_fraction``
    (measured over the images' pixels), ``n_images``, ``n_unknown_segments``, ``seconds_per_image``.
    Unreadable images are skipped and counted in ``n_skipped``. ``progress(done, total)`` is
    called after each image (images inpainted so far, of the records).
    """
    cfg = segmenter.cfg
    factor = segmenter.mask_ae.downsample_factor
    records = dataset.records[:max_images] if max_images else dataset.records
    whole, unknown = PQStat(), PQStat()
    n, n_unknown, skipped, known_px, total_px = 0, 0, 0, 0, 0
    t0 = time.time()
    for rec in records:
        try:
            sample = coco.read_sample(rec)
        except coco.DataError:
            skipped += 1
            continue
        gt = clean_segments(sample.id_map, sample.segments_info, cfg.data.min_segment_area).id_map
        h, w = gt.shape
        known = known_pixels(kind, fraction, h, w, cfg.data.resolution, factor, cfg.data.resize_mode,
                             seed * 1_000_003 + int(rec.image_id))
        result = segmenter.inpaint(sample.image, np.where(known, gt, 0), known, seed=seed + int(rec.image_id),
                                   **options)
        pred = result.id_map.astype(np.uint32)
        pred_segs = [{"id": s["id"], "category_id": 1} for s in result.segments]
        whole += pq_image_stats(gt.astype(np.uint32), segments_info(gt, bbox=False), pred, pred_segs,
                                class_agnostic=True,
                                image_id=rec.image_id)
        ids, areas = np.unique(gt, return_counts=True)
        given = np.bincount(np.where(known, gt, 0).ravel(), minlength=int(gt.max()) + 1)
        mostly_unknown = [int(i) for i, a in zip(ids, areas) if i and given[i] <= unknown_th * a]
        gt_u = np.where(np.isin(gt, mostly_unknown), gt, 0).astype(np.uint32)
        unknown += pq_image_stats(gt_u, segments_info(gt_u, bbox=False), pred, pred_segs, class_agnostic=True,
                                  image_id=rec.image_id)
        n_unknown += len(mostly_unknown)
        known_px += int(known.sum())
        total_px += known.size
        n += 1
        if progress is not None:
            progress(n, len(records))
    a, u = whole.summary(_CATEGORY), unknown.summary(_CATEGORY)
    return {"pq": a["pq"], "sq": a["sq"], "rq": a["rq"], "pq_unknown": u["pq"], "sq_unknown": u["sq"],
            "rq_unknown": u["rq"], "known_fraction": known_px / max(total_px, 1), "n_images": n,
            "n_unknown_segments": n_unknown, "n_skipped": skipped,
            "seconds_per_image": (time.time() - t0) / max(n, 1)}
