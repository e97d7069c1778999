"""The Segmenter: images of any size, batch independence, several samples, COCO prediction output."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldmseg.agreement import consensus_map
from ldmseg.data.ids import rgb_to_id
from ldmseg.segmenter import to_coco_prediction
from helpers_segmenter import scenes


def check_result(result, shape):
    assert result.id_map.shape == shape and result.id_map.dtype == np.int64
    ids, counts = np.unique(result.id_map, return_counts=True)
    areas = dict(zip(ids.tolist(), counts.tolist()))
    assert {d["id"]: d["area"] for d in result.segments} == {k: v for k, v in areas.items() if k != 0}


def test_segment_any_size_and_batch_independent(segmenter):
    images = [s.image for s in scenes(1, size=40, seed=1)] + [s.image for s in scenes(2, size=24, seed=2, height=36)]
    together = segmenter.segment(images, seed=3, batch_size=2)
    for im, res in zip(images, together):
        check_result(res, im.shape[:2])
        assert res.uncertainty is None
    assert sum(len(r.segments) for r in together) > 0
    alone = segmenter.segment([images[2]], seed=3)[0]
    assert np.array_equal(alone.id_map, together[2].id_map)
    twice = segmenter.segment([images[2], images[2]], seed=[3, 4])
    assert np.array_equal(twice[0].id_map, alone.id_map)
    nothing = segmenter.segment([images[0]], seed=3, count_th=1.0)[0]
    assert nothing.segments == [] and (nothing.id_map == 0).all()
    with pytest.raises(TypeError, match="thresholds|options are"):
        segmenter.segment([images[0]], mask_threshold=0.3)
    with pytest.raises(TypeError, match="wrap a single image"):
        segmenter.segment(images[0])


def test_several_samples_give_the_medoid_and_uncertainty(segmenter, monkeypatch):
    monkeypatch.setattr(segmenter.cfg.sampling, "fusion", "medoid")
    image = scenes(1, size=32, seed=4)[0].image
    res = segmenter.segment([image], seed=10, num_samples=3, sampler="ddpm")[0]
    single = [segmenter.segment([image], seed=10 + k, sampler="ddpm")[0].id_map for k in range(3)]
    assert any(np.array_equal(res.id_map, m) for m in single)
    assert res.uncertainty.shape == (32, 32) and res.uncertainty.dtype == np.float32
    assert set(np.unique(res.uncertainty).tolist()) <= {0.0, 0.5, 1.0}


def test_the_config_sets_the_samples_per_image(segmenter, monkeypatch):
    image = scenes(1, size=32, seed=4)[0].image
    asked = segmenter.segment([image], seed=10, num_samples=3, sampler="ddpm")[0]
    monkeypatch.setattr(segmenter.cfg.sampling, "num_samples", 3)
    configured = segmenter.segment([image], seed=10, sampler="ddpm")[0]
    assert np.array_equal(configured.id_map, asked.id_map)
    assert np.array_equal(configured.uncertainty, asked.uncertainty)
    assert segmenter.segment([image], seed=10, sampler="ddpm", num_samples=1)[0].uncertainty is None
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        segmenter.segment([image], num_samples=0)


def test_several_samples_are_voted_by_default(segmenter):
    assert segmenter.cfg.sampling.fusion == "vote"
    image = scenes(1, size=32, seed=4)[0].image
    single = [segmenter.segment([image], seed=10 + k, count_th=0.0)[0].id_map for k in range(3)]
    res = segmenter.segment([image], seed=10, num_samples=3, count_th=0.0)[0]
    ids, segments, uncertainty = consensus_map(single)
    assert np.array_equal(res.id_map, ids) and np.array_equal(res.uncertainty, uncertainty)
    assert res.segments == segments
    assert res.uncertainty.max() > 0  # this untrained denoiser's samples disagree


def test_to_coco_prediction_round_trips(segmenter):
    image = scenes(1, size=40, seed=8)[0].image
    res = segmenter.segment([image], seed=0, count_th=0.0)[0]
    png, ann = to_coco_prediction(res, 42, "x.png")
    decoded = rgb_to_id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    assert np.array_equal(decoded, res.id_map)
    assert ann["image_id"] == 42 and ann["file_name"] == "x.png"
    assert len(ann["segments_info"]) == len(res.segments) > 0
    for info in ann["segments_info"]:
        mask = res.id_map == info["id"]
        ys, xs = np.nonzero(mask)
        assert info["area"] == mask.sum() and info["category_id"] == 1 and info["iscrowd"] == 0
        assert info["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
