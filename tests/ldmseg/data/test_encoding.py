"""Bit planes of slot maps (ldmseg.data.encoding), from the real PNGs and back, and image tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmseg.data.encoding import bits_to_ids, ids_to_bits, image_to_tensor, tensor_to_image
from ldmseg.data.slots import clean_segments, remap_ids


def slots_to_ids(slot_map: np.ndarray, slots: dict[int, int]) -> np.ndarray:
    """Inverse of :func:`remap_ids`: (H, W) slots → (H, W) int64 original ids (unknown slots → 0)."""
    lut = np.zeros(max([int(slot_map.max(initial=0)), *slots.keys()]) + 1, dtype=np.int64)
    for slot, sid in slots.items():
        lut[int(slot)] = int(sid)
    return lut[np.asarray(slot_map, dtype=np.int64)]


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
