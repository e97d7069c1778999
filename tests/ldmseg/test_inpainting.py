"""Inpainting: Segmenter.inpaint keeps the known segments and numbers them as in training, and the
inpainting evaluation against the known fraction (ldmseg.inpainting_eval)."""

from __future__ import annotations

import numpy as np
import pytest

from ldmseg.checkpoint import save_model
from ldmseg.data.slots import clean_segments
from ldmseg.segmenter import Segmenter
from helpers_segmenter import scenes

def test_inpainting_everything_known_returns_the_map(segmenter):
    from ldmseg.metrics.pq import pq_image_stats

    scene = scenes(1, size=40, seed=6)[0]
    partial = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    res = segmenter.inpaint(scene.image, partial, np.ones(partial.shape, dtype=bool), seed=1)
    assert np.array_equal(res.id_map, partial)
    segs = [{"id": d["id"], "category_id": 1, "iscrowd": 0, "area": d["area"]} for d in res.segments]
    stats = pq_image_stats(partial, segs, res.id_map, segs, class_agnostic=True).per_category.values()
    tp, fp, fn, iou = (sum(getattr(st, k) for st in stats) for k in ("tp", "fp", "fn", "iou"))
    assert tp == len(segs) > 0 and fp == fn == 0 and iou / (tp + 0.5 * fp + 0.5 * fn) == pytest.approx(1.0)


def test_inpainting_keeps_known_ids_and_adds_fresh_ones(segmenter):
    scene = scenes(1, size=32, seed=7)[0]
    truth = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    known = np.zeros(truth.shape, dtype=bool)
    known[:16] = True
    partial = np.where(known, truth, 0)
    res = segmenter.inpaint(scene.image, partial, known, seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0)
    again = segmenter.inpaint(scene.image, partial, known, seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0)
    assert np.array_equal(res.id_map, again.id_map)
    assert np.array_equal(res.id_map[known], partial[known])
    known_ids = set(np.unique(partial[known]).tolist()) - {0}
    new_ids = set(np.unique(res.id_map[~known]).tolist()) - known_ids - {0}
    assert all(i > max(known_ids) for i in new_ids)
    assert np.isin(res.id_map[~known], list(known_ids)).any()  # predictions on a known slot keep its id
    flags = {d["id"]: d["known"] for d in res.segments}
    assert all(flags[i] for i in known_ids) and not any(flags[i] for i in new_ids)


@pytest.mark.parametrize("order,known_slots", [("random", "given"), ("raster", "given"), ("grid", "given"),
                                                ("random", "predicted"), ("raster", "predicted")])
def test_inpainting_numbers_known_segments_as_the_model_was_trained(trained, tmp_path, order, known_slots):
    import dataclasses

    folder, cfg, parts, scale = trained
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, slot_order=order))
    save_model(tmp_path / "ldm", cfg, parts, latent_scale=scale, extra={"stage": "ldm", "step": 80})
    seg = Segmenter.from_pretrained(tmp_path / "ldm", device="cpu")
    scene = scenes(1, size=32, seed=7)[0]
    truth = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    known = np.zeros(truth.shape, dtype=bool)
    known[:20] = True
    partial = np.where(known, truth, 0)
    flipped = np.where(partial > 0, partial.max() + 1 - partial, 0)  # the same segments, ids reversed
    opts = dict(seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0, known_slots=known_slots)
    a = seg.inpaint(scene.image, partial, known, **opts).id_map
    b = seg.inpaint(scene.image, flipped, known, **opts).id_map
    assert np.array_equal(a[known], partial[known]) and np.array_equal(b[known], flipped[known])
    # the same partition of the unknown pixels iff the known slots do not depend on the id values
    pairs = set(zip(a[~known].tolist(), b[~known].tolist()))
    same = len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
    assert same == (order != "random" or known_slots == "predicted")


def test_match_known_slots_follows_the_largest_overlaps():
    from ldmseg.segmenter import match_known_slots

    known = np.array([[1, 1, 1, 2, 2, 3],
                      [1, 1, 1, 2, 2, 3],
                      [0, 0, 4, 4, 0, 0]])
    pred = np.array([[5, 5, 6, 6, 6, 6],
                     [5, 5, 5, 6, 6, 0],
                     [7, 7, 7, 7, 7, 7]])
    lut = match_known_slots(known, pred, 8)
    # 1 overlaps 5 (5 px) > 2 overlaps 6 (4 px) > 4 overlaps 7 (2 px); 1's overlap with 6 (1 px) comes
    # after 6 is taken; 3 overlaps only 6 (taken) and void, so it takes the lowest unused slot, 1
    assert lut.tolist() == [0, 5, 6, 1, 7, 0, 0, 0]
    with pytest.raises(ValueError, match="same shape"):
        match_known_slots(known, pred[:2], 8)


def test_known_pixels_cover_the_fraction_of_the_latent_grid():
    from ldmseg.inpainting_eval import known_pixels

    for kind in ("sparse", "global"):
        none = known_pixels(kind, 0.0, 32, 32, 32, 4, "pad", seed=1)
        assert none.shape == (32, 32) and not none.any()
    half = known_pixels("global", 0.5, 32, 32, 32, 4, "pad", seed=1)
    assert half.mean() == pytest.approx(0.5)  # 32 of the 64 latent cells, 4x4 pixels each
    assert known_pixels("global", 0.5, 32, 32, 32, 4, "pad", seed=1).tolist() == half.tolist()  # seeded
    wide = known_pixels("global", 0.25, 20, 40, 32, 4, "pad", seed=2)  # padded image: mapped back to 20x40
    assert wide.shape == (20, 40) and 0.25 <= wide.mean() < 0.35  # drawn on the image's cells only


def test_inpainting_scores_rise_with_the_known_fraction(segmenter, tmp_path):
    from ldmseg.data import coco
    from ldmseg.data.synthetic import write_scenes
    from ldmseg.inpainting_eval import inpainting_scores

    write_scenes(tmp_path / "scenes", num_images=4, size=32, seed=31, max_things=3)
    data = coco.load_coco_panoptic(str(tmp_path / "scenes"))
    full = inpainting_scores(segmenter, data, "global", 1.0, steps=2)
    assert full["pq"] == pytest.approx(1.0) and full["known_fraction"] == pytest.approx(1.0)
    assert full["n_unknown_segments"] == 0 and full["n_images"] == 4
    none = inpainting_scores(segmenter, data, "global", 0.0, steps=2)
    most = inpainting_scores(segmenter, data, "global", 0.75, steps=2)
    assert none["known_fraction"] == 0.0 and most["known_fraction"] == pytest.approx(0.75, abs=0.02)
    assert none["n_unknown_segments"] > most["n_unknown_segments"] > 0
    assert most["pq"] > none["pq"] + 0.2  # the known 75 % are kept as given (random denoiser)
