"""The LDM loss (ldmseg.training.losses): masking of all-void latent cells, and the raster slot order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmseg.data.slots import remap_ids
from ldmseg import training
from helpers_batches import scene_batch
from helpers_training import ldm_components, training_cfg


def test_latent_weights_are_zero_only_on_all_void_cells():
    slot_map = torch.zeros(1, 8, 8, dtype=torch.int64)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    slot_map[0, 0, 0] = 3  # one segment pixel in cell (0, 0)
    slot_map[0, 4:8, 4:8] = 5  # a whole cell (1, 1)
    slot_map[0, 0, 7] = 2  # a segment pixel on padding in cell (0, 1)
    valid[0, :, 6:] = False
    w = training.latent_weights(slot_map, valid, 4)
    assert w.shape == (1, 1, 2, 2)
    assert w[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_latent_weights_with_a_power_favour_cells_of_small_segments():
    slot_map = torch.zeros(2, 8, 8, dtype=torch.int64)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    slot_map[0, :, :4] = 1  # 32 px: cells (0, 0) and (1, 0)
    slot_map[0, 4:, 4:] = 2  # 16 px: cell (1, 1)
    slot_map[0, 1, 5] = 3  # 1 px inside otherwise void cell (0, 1)
    slot_map[1] = slot_map[0]
    slot_map[1, 4:, 4:] = 0  # image 1 lacks segment 2: cell (1, 1) is void there
    w0 = training.latent_weights(slot_map, valid, 4)
    assert torch.equal(training.latent_weights(slot_map, valid, 4, power=0.0), w0)
    w = training.latent_weights(slot_map, valid, 4, power=0.5, num_slots=4)
    area = torch.tensor([32.0, 16.0, 1.0]) / 64  # segment areas as fractions of the image
    expected = area.pow(-0.5)
    assert torch.allclose(w[0, 0], torch.tensor([[expected[0], expected[2]], [expected[0], expected[1]]]))
    assert w[1, 0, 1, 1] == 0 and w0[1, 0, 1, 1] == 0  # void cells stay 0 whatever the power
    # a cell shared by a big and a small segment takes the small one's weight
    slot_map[0, 0, 0] = 3
    assert training.latent_weights(slot_map, valid, 4, power=0.5, num_slots=4)[0, 0, 0, 0] == pytest.approx(float((2 / 64) ** -0.5))


def test_segment_weight_power_is_validated_and_reaches_the_loss():
    from ldmseg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="segment_weight_power must lie in"):
        load_config(None, ["diffusion.segment_weight_power=-0.1"])
    cfg, weighted = training_cfg(), training_cfg("diffusion.segment_weight_power=0.5")
    batch = scene_batch(cfg, 4, seed=2)
    comps = ldm_components(cfg, batch)
    plain, small = (float(training.ldm_loss(comps, batch, c, generator=torch.Generator().manual_seed(0))[0])
                    for c in (cfg, weighted))
    assert np.isfinite(small) and small != pytest.approx(plain, rel=1e-4)  # same noise, other cell weights


def test_masked_mse_ignores_targets_on_void_cells():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    weights = (torch.rand(2, 1, 4, 4, generator=g) > 0.4).float()
    snr_w = torch.tensor([0.5, 1.0])
    loss = training.masked_mse(pred, target, weights, snr_w)
    changed = target + 100.0 * (1 - weights)  # only void cells change
    assert training.masked_mse(pred, changed, weights, snr_w) == loss
    assert training.masked_mse(pred, target + 0.1 * weights, weights, snr_w) != loss
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(training.masked_mse(pred, target, ones, torch.ones(2)),
                          torch.nn.functional.mse_loss(pred, target))


def test_all_void_batch_gives_zero_loss():
    cfg = training_cfg()
    batch = scene_batch(cfg, 2)
    comps = ldm_components(cfg, batch)
    void = dict(batch, slot_map=torch.zeros_like(batch["slot_map"]))
    loss, parts = training.ldm_loss(comps, void, cfg, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and parts["void_cell_fraction"] == 1.0


@pytest.mark.parametrize("order", ["random", "raster", "grid"])
def test_ordered_slots_make_the_loss_blind_to_the_slot_permutation(order):
    cfg = training_cfg(f"diffusion.slot_order={order}")
    batch = scene_batch(cfg, 6, seed=3)
    other = scene_batch(cfg, 6, seed=3)  # the same scenes ...
    rng = np.random.default_rng(99)
    other["slot_map"] = torch.from_numpy(np.stack(  # ... with other random slots
        [remap_ids(m, cfg.data.num_slots, rng).slot_map for m in batch["slot_map"].numpy()]))
    assert not torch.equal(other["slot_map"], batch["slot_map"])
    comps = ldm_components(cfg, batch)
    losses = [float(training.ldm_loss(comps, b, cfg, generator=torch.Generator().manual_seed(0))[0])
              for b in (batch, other)]
    if order != "random":
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    else:
        assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]


def test_loss_parts_stay_on_the_device_until_one_read():
    """``ldm_loss`` returns its parts as detached 0-d tensors (no host sync before the backward pass);
    ``host_floats`` reads them all at once, to the same values."""
    from ldmseg.training.losses import host_floats

    cfg = training_cfg("diffusion.ae_aux_weight=0.1")
    batch = scene_batch(cfg, 2)
    comps = ldm_components(cfg, batch)
    loss, parts = training.ldm_loss(comps, batch, cfg, generator=torch.Generator().manual_seed(0))
    assert all(torch.is_tensor(parts[k]) and parts[k].ndim == 0 and not parts[k].requires_grad
               for k in ("mse", "aux_ce", "loss", "void_cell_fraction"))
    floats = host_floats(parts)
    assert all(type(v) is float for v in floats.values())
    assert floats["loss"] == loss.item() and floats["mse"] == parts["mse"].item()
    assert floats["loss"] == pytest.approx(floats["mse"] + 0.1 * floats["aux_ce"], rel=1e-6)
