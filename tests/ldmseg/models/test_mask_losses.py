"""The mask autoencoder's loss (ldmseg.models.mask_losses): padding, point sampling, void pixels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldmseg.models.mask_losses import mask_ae_loss, sample_points
from helpers_models import TINY, scenes


def _loss_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    slot_map = torch.from_numpy(scenes(2, 32, 16, seed=seed))
    valid = torch.ones_like(slot_map, dtype=torch.bool)
    valid[0, 24:, :] = False
    valid[1, :, 20:] = False
    logits = torch.randn(2, 16, 32, 32, generator=gen)
    return logits, slot_map, valid


def test_loss_ignores_padding():
    logits, slot_map, valid = _loss_inputs()
    cfg = dataclasses.replace(TINY.mask_ae, num_points=256)
    base, parts = mask_ae_loss(logits, slot_map, valid, cfg, torch.Generator().manual_seed(1))

    changed = logits + 50.0 * torch.randn(logits.shape) * (~valid)[:, None]
    other_ids = torch.where(valid, slot_map, torch.full_like(slot_map, 7))
    again, _ = mask_ae_loss(changed, other_ids, valid, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(base, again)

    # the same change on valid pixels does change the loss
    moved = logits + 50.0 * torch.randn(logits.shape) * valid[:, None]
    assert not torch.isclose(mask_ae_loss(moved, slot_map, valid, cfg, torch.Generator().manual_seed(1))[0], base)
    assert set(parts) >= {"loss", "ce", "bce", "dice"}
    weighted = cfg.ce_weight * parts["ce"] + cfg.bce_weight * parts["bce"] + cfg.dice_weight * parts["dice"]
    assert parts["loss"] == pytest.approx(weighted, rel=1e-5)


def test_loss_points_stay_on_valid_pixels_and_seek_uncertainty():
    logits, slot_map, valid = _loss_inputs()
    logits[:, 0] += 20.0  # confident everywhere ...
    logits[:, 0, :8, :8] -= 20.0  # ... except an 8x8 corner (64 of ~700 valid pixels per image)
    index = sample_points(logits, valid, 200, oversample_ratio=3.0, importance_sample_ratio=0.75,
                          generator=torch.Generator().manual_seed(0))
    assert index.shape == (2, 200)
    assert valid.flatten(1).gather(1, index).all()
    rows, cols = index // 32, index % 32
    in_corner = ((rows < 8) & (cols < 8)).float().mean().item()
    assert in_corner > 0.3  # uniform sampling would give about 0.1


def test_loss_ce_ignores_void_and_rewards_correct_logits():
    logits, slot_map, valid = _loss_inputs()
    cfg = dataclasses.replace(TINY.mask_ae, num_points=256, importance_sample_ratio=0.0)
    _, parts = mask_ae_loss(logits, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    void = (slot_map == 0)[:, None]
    _, parts_void = mask_ae_loss(logits + 30.0 * void, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    assert parts_void["ce"] == pytest.approx(parts["ce"], rel=1e-6)

    perfect = 20.0 * torch.nn.functional.one_hot(slot_map, 16).permute(0, 3, 1, 2).float() - 10.0
    _, good = mask_ae_loss(perfect, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    assert good["ce"] < 1e-3 and good["bce"] < 1e-3 and good["dice"] < 0.01
    assert parts["ce"] > 1.0 and parts["dice"] > 0.5
    assert good["num_segments"] == sum(len(set(slot_map[b][valid[b]].tolist()) - {0}) for b in range(2))
