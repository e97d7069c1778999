"""Sampler registry, the seeded sampling loop, self-conditioning and latent inpainting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldmseg.checkpoint import build_components
from ldmseg.diffusion.noise import make_train_scheduler, predict_x0
from ldmseg.diffusion.sampling import (SAMPLERS, LU_SAMPLERS, SIGMA_SAMPLERS, SIGMA_SCHEDULES, decode_latents,
                                       initial_noise, make_sampler, sample_latents)
from helpers_config import tiny_cfg
from helpers_denoiser import RecordingDenoiser

C, H = 4, 8  # latent channels and size of the tiny config (32 px / factor 4)


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return build_components(tiny_cfg())["denoiser"].eval()


def image_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 48, H, H, generator=torch.Generator().manual_seed(seed))


def run(denoiser, cfg, image_latent, seeds, **kwargs):
    return sample_latents(denoiser, image_latent, diffusion_cfg=cfg.diffusion, sampling_cfg=cfg.sampling,
                          seeds=seeds, latent_channels=C, **kwargs)


def test_ddim_50_trailing_timesteps():
    cfg = tiny_cfg("sampling.sampler=ddim", "sampling.steps=50")
    sched = make_sampler("ddim", cfg.diffusion, cfg.sampling)
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(999, 0, -20))


def test_unknown_sampler_lists_the_registry():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="ddim.*dpmsolver\\+\\+.*unipc.*euler"):
        make_sampler("plms", cfg.diffusion, cfg.sampling)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_for_1_2_and_10_steps(name, denoiser):
    for steps in (1, 2, 10):
        cfg = tiny_cfg(f"sampling.sampler={name}", f"sampling.steps={steps}")
        x0 = run(denoiser, cfg, image_latents(2), [0, 1])
        assert x0.shape == (2, C, H, H) and torch.isfinite(x0).all()


@pytest.mark.parametrize("schedule", [s for s in SIGMA_SCHEDULES if s != "default"])
@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_sigma_schedules(name, schedule, denoiser):
    if schedule == "lu" and name not in LU_SAMPLERS:
        cfg = tiny_cfg(f"sampling.sampler={name}", "sampling.sigma_schedule=lu")
        with pytest.raises(ValueError, match="'lu'.*dpmsolver.*not " + name):
            make_sampler(name, cfg.diffusion, cfg.sampling)
        return
    default, spaced = tiny_cfg(f"sampling.sampler={name}"), tiny_cfg(f"sampling.sampler={name}",
                                                                     f"sampling.sigma_schedule={schedule}")
    a, b = make_sampler(name, default.diffusion, default.sampling), make_sampler(name, spaced.diffusion, spaced.sampling)
    a.set_timesteps(10)
    b.set_timesteps(10)
    assert len(b.timesteps) == (2 * 10 - 1 if name == "heun" else 10)  # heun: two calls per step but the last
    assert a.timesteps.tolist() != b.timesteps.tolist()  # the schedule moves the noise levels
    spaced.sampling.steps = 4
    x0 = run(denoiser, spaced, image_latents(2), [0, 1])
    assert x0.shape == (2, C, H, H) and torch.isfinite(x0).all()


def test_every_configurable_sigma_schedule_has_its_scheduler_keyword():
    import typing

    from ldmseg.config import SamplingConfig

    allowed = typing.get_args(typing.get_type_hints(SamplingConfig)["sigma_schedule"])
    assert set(allowed) == set(SIGMA_SCHEDULES)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_karras_sigmas_need_a_sigma_sampler(name):
    cfg = tiny_cfg("sampling.sigma_schedule=karras")
    with pytest.raises(ValueError, match="sigma-based sampler.*euler"):
        make_sampler(name, cfg.diffusion, cfg.sampling)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_euler_and_first_order_dpm_solver_reproduce_ddim(kind, denoiser):
    """DDIM (η = 0) is Euler's method on the probability-flow ODE in (σ, x/sqrt(ᾱ)), and
    DPM-Solver++ of order 1 is DDIM: equal results show that sigma-scaled samples are fed to the
    denoiser on the DDPM scale and that x̂₀ is derived right, with and without inpainting."""
    mask = torch.zeros(2, 1, H, H, dtype=torch.bool)
    mask[..., : H // 2] = True
    known = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(3))
    for name, step_counts in (("euler", (1, 2, 10)), ("dpmsolver++", (1, 2))):
        for steps in step_counts:
            outs = {}
            for sampler in ("ddim", name):
                cfg = tiny_cfg(f"sampling.sampler={sampler}", f"sampling.steps={steps}",
                               f"diffusion.prediction_type={kind}")
                outs[sampler] = (run(denoiser, cfg, image_latents(2), [0, 1]),
                                 run(denoiser, cfg, image_latents(2), [0, 1], known_latent=known, known_mask=mask))
            for ref, got in zip(outs["ddim"], outs[name]):
                scale = float(ref.abs().max())
                assert torch.allclose(got, ref, rtol=0, atol=1e-5 * scale), (name, steps, float((got - ref).abs().max()))


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++-sde", "euler"])
def test_seeded_sampling_is_reproducible_and_batch_independent(name, denoiser):
    cfg = tiny_cfg(f"sampling.sampler={name}", "sampling.steps=4", "sampling.eta=1.0")
    lat = image_latents(3)
    batch = run(denoiser, cfg, lat, [10, 11, 12])
    again = run(denoiser, cfg, lat, [10, 11, 12])
    assert torch.equal(batch, again)
    alone = run(denoiser, cfg, lat[1:2], [11])
    scale = float(batch.abs().max())
    assert torch.allclose(alone[0], batch[1], rtol=0, atol=1e-5 * scale)
    other_seed = run(denoiser, cfg, lat[1:2], [99])
    assert not torch.allclose(other_seed[0], batch[1], atol=1e-2 * scale)


def test_self_conditioning_feeds_the_next_step(denoiser):
    cfg = tiny_cfg("sampling.steps=3")
    lat = image_latents(1)
    with_sc = run(denoiser, cfg, lat, [0])
    cfg.sampling.self_condition = False
    without = run(denoiser, cfg, lat, [0])
    assert not torch.allclose(with_sc, without)
    cfg.sampling.steps = 1  # one step: the only self-conditioning input is zeros either way
    one = run(denoiser, cfg, lat, [0])
    cfg.sampling.self_condition = True
    assert torch.equal(run(denoiser, cfg, lat, [0]), one)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_self_conditioning_input_is_the_previous_steps_x0(name, kind):
    """Step 1 gets zeros; every later step gets exactly the x̂₀ of the step before (not zeros, not
    the first step's x̂₀): derived by hand from the recorded output and input of that step."""
    cfg = tiny_cfg(f"sampling.sampler={name}", "sampling.steps=4", f"diffusion.prediction_type={kind}")
    stub = RecordingDenoiser()
    x0 = run(stub, cfg, image_latents(2), [0, 1])
    calls = stub.calls
    assert len(calls) == 4
    assert torch.equal(calls[0]["x0_self"], torch.zeros(2, C, H, H))
    alphas_cumprod = make_train_scheduler(cfg.diffusion).alphas_cumprod
    for i, (prev, call) in enumerate(zip(calls, calls[1:]), start=1):
        by_hand = predict_x0(kind, prev["out"], prev["x_t"], prev["t"], alphas_cumprod)
        assert torch.equal(call["x0_self"], by_hand), f"step {i + 1} was not given the x̂₀ of step {i}"
    last = calls[-1]
    assert torch.equal(x0, predict_x0(kind, last["out"], last["x_t"], last["t"], alphas_cumprod))
    # self-conditioning off: the denoiser gets no self-conditioning input at all
    cfg.sampling.self_condition = False
    off = RecordingDenoiser()
    run(off, cfg, image_latents(2), [0, 1])
    assert len(off.calls) == 4 and all(c["x0_self"] is None for c in off.calls)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_inpainting_replaces_known_cells_before_every_step(name):
    """Not only the final paste: at every step the denoiser sees, on known cells, the known latent
    noised to that step's timestep with the image's own initial noise (on the DDPM scale, whatever
    the sampler's scale), and the known latent as its self-conditioning input."""
    cfg = tiny_cfg(f"sampling.sampler={name}", "sampling.steps=4")
    seeds = [0, 1]
    known_latent = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(2, 1, H, H, dtype=torch.bool)
    mask[0, :, : H // 2] = True
    mask[1, :, :, H // 4:] = True
    stub = RecordingDenoiser()
    x0 = run(stub, cfg, image_latents(2), seeds, known_latent=known_latent, known_mask=mask)
    noise, _ = initial_noise(seeds, (C, H, H), "cpu")
    alphas_cumprod = make_train_scheduler(cfg.diffusion).alphas_cumprod
    m = mask.expand(2, C, H, H)
    assert len(stub.calls) == 4 and len({int(c["t"][0]) for c in stub.calls}) == 4
    for i, call in enumerate(stub.calls):
        a = alphas_cumprod[call["t"]].view(-1, 1, 1, 1)
        noised = a.sqrt() * known_latent + (1 - a).sqrt() * noise
        got = call["x_t"][m]
        assert torch.allclose(got, noised[m], rtol=0, atol=1e-5 * float(noised.abs().max())), (
            f"step {i + 1}: known cells of x_t are not the known latent noised to t={int(call['t'][0])}: "
            f"max error {float((got - noised[m]).abs().max()):.3g}")
        assert torch.equal(call["x0_self"][m], known_latent[m]), f"step {i + 1}: self-conditioning input"
    assert torch.equal(x0[m], known_latent[m])


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "euler"])
def test_inpainting_keeps_known_cells(name, denoiser):
    cfg = tiny_cfg(f"sampling.sampler={name}", "sampling.steps=5")
    lat = image_latents(2)
    known_latent = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(2, 1, H, H, dtype=torch.bool)
    mask[:, :, : H // 2] = True
    free = run(denoiser, cfg, lat, [0, 1])
    x0 = run(denoiser, cfg, lat, [0, 1], known_latent=known_latent, known_mask=mask)
    m = mask.expand_as(x0)
    assert torch.equal(x0[m], known_latent[m])
    assert not torch.allclose(x0[~m], free[~m], atol=1e-3)  # the known half conditions the rest
    everything = run(denoiser, cfg, lat, [0, 1], known_latent=known_latent, known_mask=torch.ones_like(mask))
    assert torch.equal(everything, known_latent)


def test_sampling_argument_errors(denoiser):
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="one seed per image"):
        run(denoiser, cfg, image_latents(2), [0])
    with pytest.raises(ValueError, match="known_mask"):
        run(denoiser, cfg, image_latents(1), [0], known_latent=torch.zeros(1, C, H, H))
    bad = dataclasses.replace(cfg.sampling, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample_latents(denoiser, image_latents(1), diffusion_cfg=cfg.diffusion, sampling_cfg=bad, seeds=[0],
                       latent_channels=C)


def test_decode_latents_divides_by_the_scale():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ae = build_components(cfg)["mask_autoencoder"].eval()
    z = torch.randn(2, C, H, H)
    logits = decode_latents(ae, z * 2.5, 2.5)
    assert logits.shape == (2, 8, 32, 32)
    assert torch.allclose(logits, ae.decode(z), atol=1e-5)


def test_autocast_runs_the_denoiser_in_bf16_and_keeps_the_sampler_in_float32(denoiser):
    """``sampling.autocast=bf16`` changes the denoiser's arithmetic (results close, not equal) while
    x̂₀ stays float32; ``auto`` is float32 off CUDA (identical to ``no``)."""
    lat = image_latents(2)
    base = run(denoiser, tiny_cfg("sampling.steps=3"), lat, [1, 2])
    bf16 = run(denoiser, tiny_cfg("sampling.steps=3", "sampling.autocast=bf16"), lat, [1, 2])
    auto = run(denoiser, tiny_cfg("sampling.steps=3", "sampling.autocast=auto"), lat, [1, 2])
    assert base.dtype == bf16.dtype == torch.float32
    assert torch.equal(auto, base)
    scale = float(base.abs().max())
    assert not torch.equal(bf16, base)
    assert torch.allclose(bf16, base, rtol=0, atol=0.05 * scale)
