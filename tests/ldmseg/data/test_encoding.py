"""Targets and encoding: cleaning, random id slots (slots.py), bit planes (encoding.py), resize/pad and
restore (resize.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmseg.data.encoding import bits_to_ids, ids_to_bits, image_to_tensor, tensor_to_image
from ldmseg.data.ids import decode_panoptic_png
from ldmseg.data.resize import ResizeInfo, resize_pad, restore_size
from ldmseg.data.slots import (clean_remap_labels, clean_segments, compact_ids, eval_generator, raster_slot_lut,
                               raster_slots, remap_ids)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def load_folder(folder: Path) -> list[dict]:
    """Every sample of a COCO panoptic folder: image id, RGB image, id map, segments_info."""
    meta = json.loads((folder / "panoptic.json").read_text())
    images = {im["id"]: im for im in meta["images"]}
    samples = []
    for ann in meta["annotations"]:
        entry = images[ann["image_id"]]
        ids = decode_panoptic_png((folder / "panoptic" / ann["file_name"]).read_bytes())
        with Image.open(folder / "images" / entry["file_name"]) as img:
            image = np.asarray(img.convert("RGB"))
        assert ids.shape == image.shape[:2] == (entry["height"], entry["width"])
        samples.append({"image_id": ann["image_id"], "image": image, "ids": ids,
                        "segments_info": ann["segments_info"]})
    return samples


@pytest.fixture(scope="module")
def real_samples(coco_sample, coco_val_examples) -> list[dict]:
    return load_folder(coco_sample) + load_folder(coco_val_examples)


def slots_to_ids(slot_map: np.ndarray, slots: dict[int, int]) -> np.ndarray:
    """Inverse of :func:`remap_ids`: (H, W) slots → (H, W) int64 original ids (unknown slots → 0)."""
    lut = np.zeros(max([int(slot_map.max(initial=0)), *slots.keys()]) + 1, dtype=np.int64)
    for slot, sid in slots.items():
        lut[int(slot)] = int(sid)
    return lut[np.asarray(slot_map, dtype=np.int64)]


def area_map(ids: np.ndarray) -> dict[int, int]:
    u, c = np.unique(ids, return_counts=True)
    return dict(zip(u.tolist(), c.tolist()))


def random_id_map(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """Blocky map of k random large ids (COCO-like values up to 2²⁴) plus some void."""
    ids = rng.choice(np.arange(1, 2**24), size=k, replace=False)
    palette = np.concatenate([[0], ids])
    coarse = rng.integers(0, k + 1, size=(max(1, h // 4), max(1, w // 4)))
    full = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])), mode="edge")
    return palette[full].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------


def test_clean_segments_by_hand():
    ids = np.zeros((10, 10), dtype=np.int64)
    ids[0, :9] = 7          # 9 px: small
    ids[1, :] = 8           # 10 px: kept (not < 10)
    ids[2:5, :] = 9         # 30 px crowd
    ids[5, :3] = 3          # 3 px crowd and small: counted as crowd
    ids[6:8, :] = 11        # 20 px, not listed in segments_info
    ids[8:, :] = 12         # 20 px kept
    info = [{"id": 7, "iscrowd": 0}, {"id": 8, "iscrowd": 0}, {"id": 9, "iscrowd": 1},
            {"id": 3, "iscrowd": 1}, {"id": 12}, {"id": 99, "iscrowd": 0}]
    before = ids.copy()
    res = clean_segments(ids, info, min_area=10)
    np.testing.assert_array_equal(ids, before)  # input untouched
    assert sorted(area_map(res.id_map)) == [0, 8, 12]
    assert (res.id_map[1] == 8).all() and (res.id_map[8:] == 12).all()
    assert [s["id"] for s in res.segments_info] == [8, 12]
    assert res.n_small == 2      # 7 (9 px) and 99 (absent from the map)
    assert res.n_crowd == 2
    assert res.n_unlisted == 1
    assert res.has_segments


def test_clean_segments_without_segments():
    ids = np.full((4, 4), 5, dtype=np.int64)
    res = clean_segments(ids, [{"id": 5, "iscrowd": 1}])
    assert not res.has_segments and res.segments_info == [] and (res.id_map == 0).all()
    with pytest.raises(ValueError, match="integer"):
        clean_segments(ids.astype(np.float32), [])


def test_clean_real_samples(real_samples):
    total_crowd = 0
    for s in real_samples:
        res = clean_segments(s["ids"], s["segments_info"], min_area=10)
        crowd = {seg["id"] for seg in s["segments_info"] if seg.get("iscrowd", 0)}
        areas = area_map(s["ids"])
        expect_kept = {seg["id"] for seg in s["segments_info"]
                       if seg["id"] not in crowd and areas.get(seg["id"], 0) >= 10}
        assert set(area_map(res.id_map)) - {0} == expect_kept
        assert {seg["id"] for seg in res.segments_info} == expect_kept
        assert res.n_crowd == len(crowd)
        kept_px = np.isin(s["ids"], list(expect_kept))
        np.testing.assert_array_equal(res.id_map[kept_px], s["ids"][kept_px])
        assert (res.id_map[~kept_px] == 0).all()
        total_crowd += res.n_crowd
    assert total_crowd == 3  # the sample README: 3 iscrowd segments


# --------------------------------------------------------------------------------------------
# Random id slots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_slots", [32, 128])
def test_real_round_trip_png_to_bits_and_back(real_samples, num_slots):
    rng = np.random.default_rng(0)
    nb = int(np.log2(num_slots))
    for s in real_samples:
        clean = clean_segments(s["ids"], s["segments_info"])
        rem = remap_ids(clean.id_map, num_slots, rng)
        assert rem.n_merged == 0  # at most 30 non-crowd segments per sample
        bits = ids_to_bits(rem.slot_map, nb)
        assert bits.shape == (nb, *s["ids"].shape) and bits.dtype == np.float32
        slots_back = bits_to_ids(bits)
        np.testing.assert_array_equal(slots_back, rem.slot_map)
        np.testing.assert_array_equal(slots_to_ids(slots_back, rem.slots), clean.id_map)
        # the torch path gives the same planes and ids
        bits_t = ids_to_bits(torch.from_numpy(rem.slot_map), nb)
        assert bits_t.dtype == torch.float32
        np.testing.assert_array_equal(bits_t.numpy(), bits)
        np.testing.assert_array_equal(bits_to_ids(bits_t).numpy(), rem.slot_map)


def test_remap_properties_on_random_maps():
    rng = np.random.default_rng(1)
    for trial in range(20):
        h, w = rng.integers(8, 70, size=2)
        k = int(rng.integers(1, 40))
        ids = random_id_map(rng, int(h), int(w), k)
        present = set(np.unique(ids).tolist()) - {0}
        res = remap_ids(ids, 64, np.random.default_rng(trial))
        assert res.n_merged == 0 and set(res.slots.values()) == present
        assert len(res.slots) == len(present)
        assert all(1 <= slot < 64 for slot in res.slots)
        assert res.slot_map.dtype == np.int64 and res.slot_map.shape == ids.shape
        assert ((res.slot_map == 0) == (ids == 0)).all()
        inverse = {v: k for k, v in res.slots.items()}
        for sid in present:  # each segment's pixels map to exactly its slot
            assert (res.slot_map[ids == sid] == inverse[sid]).all()


def test_raster_slots_number_segments_in_reading_order():
    slot_map = torch.tensor([[[0, 5, 5, 2],
                              [3, 3, 5, 2],
                              [0, 7, 7, 7]]])
    assert raster_slots(slot_map, 8).tolist() == [[[0, 1, 1, 2],
                                                   [3, 3, 1, 2],
                                                   [0, 4, 4, 4]]]
    assert raster_slot_lut(slot_map, 8).tolist() == [[0, 0, 2, 3, 0, 1, 0, 4]]  # absent slots → 0
    assert raster_slots(torch.zeros(2, 3, 3, dtype=torch.long), 8).abs().sum() == 0


def test_raster_slots_forget_the_permutation():
    rng = np.random.default_rng(4)
    maps = [random_id_map(rng, 20, 24, int(k)) for k in rng.integers(1, 30, size=6)]
    outs = [raster_slots(torch.from_numpy(np.stack([remap_ids(m, 32, np.random.default_rng(trial)).slot_map
                                                    for m in maps])), 32)
            for trial in range(3)]  # fresh random slots per trial: the raster numbering is the same
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for m, r in zip(maps, outs[0].numpy()):
        k = len(set(np.unique(m).tolist()) - {0})
        assert sorted(set(np.unique(r).tolist()) - {0}) == list(range(1, k + 1))
        assert ((r == 0) == (m == 0)).all()
        for sid in set(np.unique(m).tolist()) - {0}:  # each segment keeps one slot of its own
            assert len(np.unique(r[m == sid])) == 1
        firsts = [int(np.flatnonzero(r.ravel() == s)[0]) for s in range(1, k + 1)]
        assert firsts == sorted(firsts)  # slot s starts before slot s + 1


def test_remap_fresh_per_call_and_deterministic_for_eval():
    ids = np.arange(1, 21, dtype=np.int64).repeat(5).reshape(10, 10) * 1000
    rng = np.random.default_rng(0)
    a, b = remap_ids(ids, 128, rng), remap_ids(ids, 128, rng)
    assert a.slots != b.slots  # a fresh permutation per call
    c = remap_ids(ids, 128, np.random.default_rng(0))
    assert c.slots == a.slots  # same seed, same first permutation

    big = 2**40 + 7
    e1 = remap_ids(ids, 128, eval_generator(big))
    e2 = remap_ids(ids, 128, eval_generator(big))
    e3 = remap_ids(ids, 128, eval_generator(big + 1))
    e4 = remap_ids(ids, 128, eval_generator(big, seed=1))
    np.testing.assert_array_equal(e1.slot_map, e2.slot_map)
    assert e1.slots == e2.slots
    assert e1.slots != e3.slots and e1.slots != e4.slots
    with pytest.raises(ValueError, match=">= 0"):
        eval_generator(-1)


def test_remap_slot_usage_is_uniform():
    # over many draws every slot 1..S-1 is used about equally and slot 0 never
    ids = np.array([[1, 2], [3, 0]], dtype=np.int64)
    rng = np.random.default_rng(5)
    counts = np.zeros(16, dtype=int)
    for _ in range(3000):
        for slot in remap_ids(ids, 16, rng).slots:
            counts[slot] += 1
    assert counts[0] == 0
    expected = 3000 * 3 / 15
    assert np.all(np.abs(counts[1:] - expected) < 0.2 * expected)


def test_remap_merges_the_smallest_segments():
    rng = np.random.default_rng(3)
    areas = rng.permutation(np.arange(11, 51))  # 40 segments with distinct areas 11..50
    ids_of = rng.choice(np.arange(1, 2**24), size=40, replace=False)
    flat = np.concatenate([np.full(a, i) for a, i in zip(areas, ids_of)] + [np.zeros(100, np.int64)])
    flat = rng.permutation(flat)
    side = int(np.ceil(np.sqrt(flat.size)))
    ids = np.zeros(side * side, dtype=np.int64)
    ids[: flat.size] = flat
    ids = ids.reshape(side, side)

    res = remap_ids(ids, 32, np.random.default_rng(0))
    assert res.n_merged == 9
    smallest = {int(i) for a, i in zip(areas, ids_of) if a <= 19}  # areas 11..19
    assert len(smallest) == 9
    assert set(res.slots.values()) == set(ids_of.tolist()) - smallest
    assert sorted(res.slots) == sorted(set(res.slots))  # distinct
    assert len(res.slots) == 31
    merged_px = np.isin(ids, list(smallest))
    assert (res.slot_map[merged_px] == 0).all()
    assert (res.slot_map[(ids != 0) & ~merged_px] > 0).all()


def test_remap_merges_on_real_sample(real_samples):
    s = next(s for s in real_samples if s["image_id"] == 439180)
    clean = clean_segments(s["ids"], s["segments_info"])
    areas = {k: v for k, v in area_map(clean.id_map).items() if k != 0}
    assert len(areas) == 30
    res = remap_ids(clean.id_map, 16, np.random.default_rng(0))
    assert res.n_merged == 15
    largest = sorted(areas, key=lambda k: areas[k])[15:]
    assert set(res.slots.values()) == set(largest)


def _clean_then_remap(labels, info, min_area, num_slots, seed):
    clean = clean_segments(labels, info, min_area)
    return clean, remap_ids(clean.id_map, num_slots, np.random.default_rng(seed))


def test_clean_remap_labels_equals_clean_then_remap(real_samples):
    """The label-table path of preprocessing decides exactly as cleaning then remapping the map."""
    rng = np.random.default_rng(7)
    cases = []
    for trial in range(30):
        ids = random_id_map(rng, int(rng.integers(8, 60)), int(rng.integers(8, 60)), int(rng.integers(1, 50)))
        labels, uniq = compact_ids(ids)
        info = [{"id": int(i), "iscrowd": int(rng.random() < 0.15), "category_id": 1}
                for i in range(1, len(uniq)) if rng.random() < 0.9]  # some labels unlisted
        info += [{"id": len(uniq) + 3, "iscrowd": 0}, {"id": 0, "iscrowd": 0}]  # absent id, void entry
        cases.append((labels, info, int(rng.integers(0, 40)), int(rng.choice([4, 8, 32, 128]))))
    for s in real_samples:
        labels, uniq = compact_ids(s["ids"])
        label_of = {int(v): i for i, v in enumerate(uniq.tolist())}
        info = [{**x, "id": label_of[x["id"]]} for x in s["segments_info"] if x["id"] in label_of]
        cases += [(labels, info, 10, 16), (labels, info, 10, 128)]
    for seed, (labels, info, min_area, num_slots) in enumerate(cases):
        clean, rem = _clean_then_remap(labels, info, min_area, num_slots, seed)
        got = clean_remap_labels(np.bincount(labels.ravel()), info, min_area, num_slots, np.random.default_rng(seed))
        np.testing.assert_array_equal(got.lut[labels], rem.slot_map)
        assert got.slots == rem.slots and got.n_merged == rem.n_merged
        assert (got.n_small, got.n_crowd, got.has_segments) == (clean.n_small, clean.n_crowd, clean.has_segments)
        assert got.segments_info == clean.segments_info
    assert any(c[3] == 4 and len(np.unique(c[0])) > 4 for c in cases)  # merges were exercised


def test_remap_rejects_bad_input():
    with pytest.raises(TypeError, match="default_rng"):
        remap_ids(np.zeros((2, 2), np.int64), 8, 0)
    with pytest.raises(ValueError, match="negative"):
        remap_ids(-np.ones((2, 2), np.int64), 8, np.random.default_rng())


# --------------------------------------------------------------------------------------------
# Bit planes
# --------------------------------------------------------------------------------------------


def test_bits_are_lsb_first_and_void_is_zero():
    slot_map = np.array([[0, 1], [6, 31]])
    bits = ids_to_bits(slot_map, 5)
    np.testing.assert_array_equal(bits[:, 0, 0], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(bits[:, 0, 1], [1, -1, -1, -1, -1])
    np.testing.assert_array_equal(bits[:, 1, 0], [-1, 1, 1, -1, -1])   # 6 = 0b00110
    np.testing.assert_array_equal(bits[:, 1, 1], [1, 1, 1, 1, 1])


def test_bits_batched_numpy_and_torch_agree():
    rng = np.random.default_rng(2)
    slot_map = rng.integers(0, 128, size=(3, 9, 11))
    bits = ids_to_bits(slot_map, 7)
    bits_t = ids_to_bits(torch.from_numpy(slot_map).int(), 7)
    assert bits.shape == (3, 7, 9, 11) and tuple(bits_t.shape) == (3, 7, 9, 11)
    assert isinstance(bits_t, torch.Tensor) and bits_t.dtype == torch.float32
    np.testing.assert_array_equal(bits_t.numpy(), bits)
    for b in range(3):  # batched = per-image
        np.testing.assert_array_equal(bits[b], ids_to_bits(slot_map[b], 7))
    np.testing.assert_array_equal(bits_to_ids(bits), slot_map)
    back_t = bits_to_ids(bits_t)
    assert back_t.dtype == torch.int64
    np.testing.assert_array_equal(back_t.numpy(), slot_map)


def test_bits_to_ids_thresholds_noisy_predictions():
    rng = np.random.default_rng(4)
    slot_map = rng.integers(0, 32, size=(2, 16, 16))
    bits = ids_to_bits(slot_map, 5)
    noisy = bits * rng.uniform(0.6, 1.5, size=bits.shape) + rng.uniform(-0.3, 0.3, size=bits.shape)
    np.testing.assert_array_equal(bits_to_ids(noisy), slot_map)
    np.testing.assert_array_equal(bits_to_ids(torch.from_numpy(noisy)).numpy(), slot_map)
    # small magnitudes everywhere mean "unknown": void
    assert (bits_to_ids(0.3 * np.sign(bits)) == 0).all()


def test_bits_reject_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        ids_to_bits(np.array([[32]]), 5)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        ids_to_bits(torch.tensor([[-1]]), 5)
    with pytest.raises(ValueError, match="integers"):
        ids_to_bits(np.zeros((2, 2), np.float32), 5)


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


# --------------------------------------------------------------------------------------------
# Image tensors
# --------------------------------------------------------------------------------------------


def test_image_tensor_round_trip(real_samples):
    image = real_samples[0]["image"]
    t = image_to_tensor(image)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, *image.shape[:2])
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, 0, 0].item() == pytest.approx(image[0, 0, 0] / 127.5 - 1)
    np.testing.assert_array_equal(tensor_to_image(t), image)
    batch = np.stack([image[:20, :30], image[20:40, :30]])
    tb = image_to_tensor(batch)
    assert tuple(tb.shape) == (2, 3, 20, 30)
    np.testing.assert_array_equal(tensor_to_image(tb), batch)
    edges = image_to_tensor(np.array([[[0, 255, 0]]], np.uint8))
    assert edges.flatten().tolist() == [-1.0, 1.0, -1.0]
    assert tensor_to_image(torch.full((3, 1, 1), 3.0)).flatten().tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="uint8"):
        image_to_tensor(image.astype(np.float32))
