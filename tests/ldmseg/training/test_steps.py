"""Training steps (ldmseg.training.steps) on tiny CPU models: the LDM and AE losses fall, self-conditioning,
other prediction types, the latent scale, random maps in the AE batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldmseg.models.build import build_components
from ldmseg.data.encoding import ids_to_bits
from ldmseg import training
from ldmseg.diffusion.noise import make_train_scheduler, predict_x0
from helpers_batches import scene_batch
from helpers_denoiser import RecordingDenoiser
from helpers_training import ldm_components, training_cfg


def eval_loss(comps, batch, cfg) -> float:
    """The loss on fixed timesteps and noise (same generator seed every time)."""
    with torch.no_grad():
        losses = [training.ldm_loss(comps, batch, cfg, generator=torch.Generator().manual_seed(s))[0].item()
                  for s in range(4)]
    return float(np.mean(losses))


def test_ldm_loss_falls_on_a_fixed_batch():
    cfg = training_cfg("diffusion.self_condition_prob=0.5")
    batch = scene_batch(cfg, 8)
    comps = ldm_components(cfg, batch)
    optimizer, lr_sched = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    g = torch.Generator().manual_seed(0)
    start = eval_loss(comps, batch, cfg)
    fractions = []
    for _ in range(60):
        out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=g, lr_scheduler=lr_sched)
        fractions.append(out["self_condition_fraction"])
        assert math.isfinite(out["loss"]) and out["grad_norm"] > 0
    end = eval_loss(comps, batch, cfg)
    assert end < 0.7 * start, (start, end)
    assert 0.3 < np.mean(fractions) < 0.7  # self-conditioning on about half of the samples


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_self_conditioning_probability_extremes(prob):
    cfg = training_cfg(f"diffusion.self_condition_prob={prob}")
    batch = scene_batch(cfg, 4)
    comps = ldm_components(cfg, batch)
    optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=g)
        assert out["self_condition_fraction"] == prob and math.isfinite(out["loss"])


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_self_conditioning_pass_gets_the_first_passs_detached_x0(prob):
    """On the images chosen for self-conditioning a first pass without gradients (and without a
    self-conditioning input) gives x̂₀; the trained pass gets exactly that x̂₀, detached, on those
    images and zeros on the others (all of them when none is chosen)."""
    cfg = training_cfg(f"diffusion.self_condition_prob={prob}")
    batch = scene_batch(cfg, 6)
    comps = ldm_components(cfg, batch)
    comps.denoiser = stub = RecordingDenoiser()
    optimizer, _ = training.make_optimizer(stub.parameters(), cfg.train_ldm)
    out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(1))
    *first, trained = stub.calls
    assert trained["grad_enabled"] and trained["x0_self"] is not None
    assert not trained["x0_self_requires_grad"], "the self-conditioning input must be detached"
    expected = torch.zeros_like(trained["x_t"])
    chosen: list[int] = []
    if first:
        (pre,) = first
        assert not pre["grad_enabled"] and pre["x0_self"] is None
        # the chosen images: the rows of the trained pass's x_t that the first pass saw
        chosen = [j for j in range(6) if any(torch.equal(trained["x_t"][j], row) for row in pre["x_t"])]
        assert len(chosen) == len(pre["x_t"]) and torch.equal(pre["t"], trained["t"][chosen])
        alphas_cumprod = make_train_scheduler(cfg.diffusion).alphas_cumprod
        expected[chosen] = predict_x0(cfg.diffusion.prediction_type, pre["out"], pre["x_t"], pre["t"], alphas_cumprod)
    assert torch.equal(trained["x0_self"], expected), "self-conditioning input: x̂₀ on chosen images, zeros elsewhere"
    assert out["self_condition_fraction"] == len(chosen) / 6
    assert {0.0: len(chosen) == 0, 1.0: len(chosen) == 6}.get(prob, 0 < len(chosen) < 6)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
def test_other_prediction_types_and_aux_loss_train(kind):
    cfg = training_cfg(f"diffusion.prediction_type={kind}", "diffusion.ae_aux_weight=0.1")
    batch = scene_batch(cfg, 4)
    comps = ldm_components(cfg, batch)
    optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    before = [p.detach().clone() for p in comps.denoiser.parameters()]
    out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(0))
    assert out["aux_ce"] > 0 and out["loss"] > out["mse"]
    assert any(not torch.equal(b, p) for b, p in zip(before, comps.denoiser.parameters()))
    assert all(p.grad is None for p in comps.mask_ae.parameters())  # the AE stays frozen


def test_ae_train_step_learns_and_latent_scale_normalises():
    cfg = training_cfg("mask_ae.latent_noise=0.1")
    batch = scene_batch(cfg, 8)
    torch.manual_seed(0)
    ae = build_components(cfg)["mask_autoencoder"]
    optimizer, lr_sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(0)
    losses = [training.ae_train_step(ae, batch, optimizer, cfg, generator=g, lr_scheduler=lr_sched)["loss"]
              for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    scale = training.measure_latent_scale(ae, [batch, batch], cfg.data.num_slots)
    with torch.no_grad():
        z = ae.encode(ids_to_bits(batch["slot_map"], 3))
    assert float((z * scale).std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_ae_train_step_mixes_in_random_maps(fraction):
    """``mask_ae.random_map_fraction`` replaces the last maps of the batch (the caller's batch is
    untouched): the step's segment count is that of the kept maps plus the procedural ones."""
    from ldmseg.data.random_maps import random_slot_maps

    cfg = training_cfg(f"mask_ae.random_map_fraction={fraction}")
    batch = scene_batch(cfg, 8)
    before = batch["slot_map"].clone()
    ae = build_components(cfg)["mask_autoencoder"]
    optimizer, _ = training.make_optimizer(ae.parameters(), cfg.train_ae)
    parts = training.ae_train_step(ae, batch, optimizer, cfg, generator=torch.Generator().manual_seed(5))
    n_random = round(8 * fraction)
    maps = random_slot_maps(n_random, 32, 8, min_area=10, generator=torch.Generator().manual_seed(5))
    kept = batch["slot_map"][: 8 - n_random]
    expected = sum(len(torch.unique(m[m > 0])) for m in [*kept, *maps])
    assert parts["num_segments"] == expected
    assert torch.equal(batch["slot_map"], before)
    with pytest.raises(Exception, match="random_map_fraction"):
        training_cfg("mask_ae.random_map_fraction=1.5")


def test_ae_train_step_on_crops_learns_and_encodes_whole_maps():
    """``mask_ae.train_crop``: the AE sees windows of that side (random maps are drawn at the full
    side first), its loss falls, and the trained AE still reconstructs whole maps."""
    cfg = training_cfg("mask_ae.train_crop=16", "mask_ae.random_map_fraction=0.25", "train_ae.lr=3e-3")
    batch = scene_batch(cfg, 8)
    before = batch["slot_map"].clone()
    torch.manual_seed(0)
    ae = build_components(cfg)["mask_autoencoder"]
    def whole_map_accuracy() -> float:
        with torch.no_grad():
            logits = ae(ids_to_bits(batch["slot_map"], 3))
        assert logits.shape == (8, cfg.data.num_slots, 32, 32)
        return float((logits.argmax(1) == batch["slot_map"])[batch["valid"]].float().mean())

    untrained = whole_map_accuracy()
    seen = []
    ae.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    optimizer, lr_sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(0)
    losses = [training.ae_train_step(ae, batch, optimizer, cfg, generator=g, lr_scheduler=lr_sched)["loss"]
              for _ in range(150)]
    assert set(seen) == {(8, 3, 16, 16)} and batch["slot_map"].shape[-1] == 32
    assert torch.equal(batch["slot_map"], before)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    seen.clear()
    accuracy = whole_map_accuracy()
    assert seen == [(8, 3, 32, 32)]
    assert accuracy > 0.6 and accuracy > 2 * untrained, (untrained, accuracy)


@pytest.mark.parametrize("crop, message", [(6, "multiple of the AE's downsampling factor"),
                                           (64, "exceeds data.resolution")])
def test_train_crop_is_checked_on_load(crop, message):
    with pytest.raises(Exception, match=message):
        training_cfg(f"mask_ae.train_crop={crop}")
