"""Resize and pad to the training resolution, and restore to the original size (ldmseg.data.resize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers_maps import area_map, random_id_map
from ldmseg.data.resize import ResizeInfo, resize_pad, restore_size

# --------------------------------------------------------------------------------------------
# Resize, pad, restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,r", [(427, 640, 64), (500, 336, 64), (30, 30, 64), (7, 100, 32), (64, 48, 64)])
def test_resize_pad_geometry(h, w, r):
    rng = np.random.default_rng(h * w)
    image = rng.integers(1, 256, size=(h, w, 3)).astype(np.uint8)
    ids = random_id_map(rng, h, w, 5) + 1  # no void, so padding is the only 0
    image_r, id_r, valid, info = resize_pad(image, ids, r, "pad")
    assert image_r.shape == (r, r, 3) and image_r.dtype == np.uint8
    assert id_r.shape == (r, r) and id_r.dtype == np.int64 and valid.dtype == bool
    assert (info.orig_h, info.orig_w, info.resolution, info.mode) == (h, w, r, "pad")
    assert max(info.scaled_h, info.scaled_w) == r
    # aspect ratio kept up to rounding of the short side
    short_exact = min(h, w) * r / max(h, w)
    assert abs(min(info.scaled_h, info.scaled_w) - short_exact) <= 0.5 + 1e-9
    assert valid.sum() == info.scaled_h * info.scaled_w
    assert valid[: info.scaled_h, : info.scaled_w].all()
    assert (image_r[~valid] == 0).all() and (id_r[~valid] == 0).all()
    assert (id_r[valid] > 0).all() and (image_r[valid].max(axis=-1) > 0).mean() > 0.99
    assert set(np.unique(id_r[valid])) <= set(np.unique(ids))  # nearest: no blended ids


def test_resize_pad_identity_at_native_size(real_samples):
    for s in real_samples[:4]:
        h, w = s["ids"].shape
        image_r, id_r, valid, info = resize_pad(s["image"], s["ids"], max(h, w), "pad")
        assert (info.scaled_h, info.scaled_w) == (h, w)
        np.testing.assert_array_equal(id_r[:h, :w], s["ids"])
        np.testing.assert_array_equal(image_r[:h, :w], s["image"])
        np.testing.assert_array_equal(restore_size(id_r, info, "ids"), s["ids"])


def test_resize_pad_constant_image_and_squash():
    image = np.full((40, 90, 3), (10, 200, 30), dtype=np.uint8)
    image_r, id_r, valid, info = resize_pad(image, None, 32, "pad")
    assert id_r is None and (info.scaled_h, info.scaled_w) == (14, 32)  # 40·32/90 = 14.2
    assert (image_r[valid] == (10, 200, 30)).all()

    ids = np.zeros((40, 90), np.int64)
    ids[:, 45:] = 5
    image_r, id_r, valid, info = resize_pad(image, ids, 32, "squash")
    assert valid.all() and (info.scaled_h, info.scaled_w) == (32, 32)
    assert (image_r == (10, 200, 30)).all()
    assert (id_r[:, :16] == 0).all() and (id_r[:, 16:] == 5).all()  # left/right halves
    np.testing.assert_array_equal(restore_size(id_r, info, "ids"), ids)

    _, only_ids, _, _ = resize_pad(None, ids, 32, "pad")
    assert only_ids.shape == (32, 32)
    with pytest.raises(ValueError, match="needs an image"):
        resize_pad(None, None, 32)
    with pytest.raises(ValueError, match="'pad' or 'squash'"):
        resize_pad(image, None, 32, "stretch")
    with pytest.raises(ValueError, match="sizes differ"):
        resize_pad(image, ids[:10], 32)


@pytest.mark.parametrize("mode", ["pad", "squash"])
def test_restore_size_on_real_samples(real_samples, mode):
    for s in real_samples:
        ids = s["ids"]
        _, id_r, valid, info = resize_pad(None, ids, 256, mode)
        restored = restore_size(id_r, info, "ids")
        assert restored.shape == ids.shape and restored.dtype == np.int64
        assert (restored == ids).mean() >= 0.9
        resized_set = set(np.unique(id_r[valid]).tolist())
        assert set(np.unique(restored).tolist()) == resized_set  # upsampling loses no segment
        assert resized_set <= set(np.unique(ids).tolist())
        areas = area_map(ids)
        scale = info.scaled_h * info.scaled_w / ids.size
        big = {k for k, a in areas.items() if a * scale >= 50}
        assert big <= resized_set  # segments of >= 50 resized pixels survive
        # torch ids path agrees
        np.testing.assert_array_equal(restore_size(torch.from_numpy(id_r), info, "ids").numpy(), restored)


def test_restore_size_logits():
    h, w = 45, 70
    rng = np.random.default_rng(0)
    ids = random_id_map(rng, h, w, 3) % 4
    _, id_r, _, info = resize_pad(None, ids, 32, "pad")
    onehot = np.eye(4, dtype=np.float32)[id_r].transpose(2, 0, 1) * 10  # (4, R, R)
    out = restore_size(onehot, info, "logits")
    assert isinstance(out, np.ndarray) and out.shape == (4, h, w) and out.dtype == np.float32
    nearest = restore_size(id_r, info, "ids")
    assert (out.argmax(0) == nearest).mean() > 0.9
    # batched torch in float64 keeps its dtype; a constant field stays constant
    const = torch.full((2, 3, 32, 32), 0.25, dtype=torch.float64)
    out_t = restore_size(const, info, "logits")
    assert out_t.dtype == torch.float64 and tuple(out_t.shape) == (2, 3, h, w)
    assert torch.allclose(out_t, torch.full_like(out_t, 0.25))
    with pytest.raises(ValueError, match="'ids' or 'logits'"):
        restore_size(id_r, info, "probs")
    with pytest.raises(ValueError, match="resolution 32"):
        restore_size(id_r[:16], info, "ids")


def test_resize_info_dict_round_trip():
    info = resize_pad(None, np.ones((30, 50), np.int64), 16, "pad")[3]
    d = json.loads(json.dumps(info.to_dict()))
    assert ResizeInfo.from_dict(d) == info
    with pytest.raises(ValueError, match="missing keys"):
        ResizeInfo.from_dict({"orig_h": 1})
