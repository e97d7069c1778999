"""Cleaning (ignored, crowd and small segments) and random id slots (ldmseg.data.slots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_maps import area_map, random_id_map
from ldmseg.data.slots import (clean_remap_labels, clean_segments, compact_ids, eval_generator, grid_slot_lut,
                               ordered_slots, raster_slot_lut, raster_slots, remap_ids, slot_grid)

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


@pytest.mark.parametrize("order", ["raster", "grid"])
def test_ordered_slots_forget_the_permutation(order):
    rng = np.random.default_rng(4)
    maps = [random_id_map(rng, 20, 24, int(k)) for k in rng.integers(1, 30, size=6)]
    outs = [ordered_slots(torch.from_numpy(np.stack([remap_ids(m, 32, np.random.default_rng(trial)).slot_map
                                                     for m in maps])), 32, order)
            for trial in range(3)]  # fresh random slots per trial: the numbering is the same
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for m, r in zip(maps, outs[0].numpy()):
        k = len(set(np.unique(m).tolist()) - {0})
        slots = sorted(set(np.unique(r).tolist()) - {0})
        assert len(slots) == k and all(1 <= s < 32 for s in slots)  # distinct non-void slots
        if order == "raster":
            assert slots == list(range(1, k + 1))
            firsts = [int(np.flatnonzero(r.ravel() == s)[0]) for s in range(1, k + 1)]
            assert firsts == sorted(firsts)  # slot s starts before slot s + 1
        assert ((r == 0) == (m == 0)).all()
        for s in set(np.unique(m).tolist()) - {0}:  # one segment, one slot
            assert len(np.unique(r[m == s])) == 1


def test_grid_slots_follow_the_cell_of_the_first_pixel():
    assert slot_grid(8) == (2, 3) and slot_grid(32) == (5, 6) and slot_grid(128) == (11, 11)
    slot_map = torch.zeros(1, 6, 6, dtype=torch.long)  # 2 x 3 cells of 3 x 2 pixels
    slot_map[0, 0, :2] = 5   # first pixel (0, 0): cell 0 -> slot 1
    slot_map[0, 0, 2] = 7    # (0, 2): cell 1 -> slot 2
    slot_map[0, 4, :2] = 2   # (4, 0): cell 3 -> slot 4
    slot_map[0, 5, 5] = 3    # (5, 5): cell 5 -> slot 6
    slot_map[0, 1, 0] = 4    # (1, 0): cell 0, after (0, 0) and (0, 2) in reading order; slots 1 and 2
    # are taken -> the next free slot, 3
    assert grid_slot_lut(slot_map, 8).tolist() == [[0, 0, 4, 6, 3, 1, 0, 2]]
    # a segment's slot does not depend on the segments before it in reading order (unlike raster)
    alone = torch.where(slot_map == 3, slot_map, torch.zeros_like(slot_map))
    assert grid_slot_lut(alone, 8)[0, 3] == 6 and raster_slot_lut(alone, 8)[0, 3] == 1
    full = torch.arange(1, 8).repeat(6)[:36].reshape(1, 6, 6) * (torch.arange(36).reshape(1, 6, 6) < 7)
    lut = grid_slot_lut(full, 8)  # 7 segments in 1 row of cells: every slot 1..7 used once
    assert sorted(lut[0, 1:].tolist()) == list(range(1, 8))


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
