"""Sampling mask latents (docs/method.md#sampling-and-post-processing and #inpainting).

:data:`SAMPLERS` maps a sampler name to a function ``(DiffusionConfig, SamplingConfig) →`` diffusers
scheduler; all share the training noise process (same betas and prediction type).
:func:`sample_latents` runs one sampling loop:

- the initial noise is drawn per image from its own ``torch.Generator`` seeded with that image's
  seed (as is any noise a stochastic sampler adds), so an image's result does not depend on which
  other images share its batch;
- self-conditioning: the x̂₀ of each step is the self-conditioning input of the next (zeros at
  the first step), when ``sampling.self_condition`` is on and the denoiser has that input;
- every scheduler's ``scale_model_input`` is applied, so the denoiser always sees a DDPM-scale
  ``x_t`` (sigma-based schedulers such as Euler keep ``x₀ + σ·ε`` internally, and their initial
  sample is ``sqrt(σ_max² + 1)·ε``, the DDPM ``x_T = ε`` on their scale); x̂₀ is derived from the
  model output with the DDPM ᾱ of the step's integer timestep, whatever the prediction type
  (so Euler and DDIM with η = 0 give the same result: both are Euler's method on the same ODE);
- the result is the x̂₀ of the last step;
- inpainting: latent cells with ``known_mask`` are set, before every denoiser call, to
  ``known_latent`` noised to the step's timestep (with the image's initial noise, converted to
  the scheduler's sample scale), their self-conditioning input is ``known_latent``, and
  ``known_latent`` is pasted into the result.

:func:`decode_latents` turns x̂₀ into per-slot logits with the mask autoencoder's decoder.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

from ldmseg.config import DiffusionConfig, SamplingConfig
from ldmseg.diffusion.noise import make_train_scheduler, predict_x0, scheduler_kwargs
from ldmseg.models.ddp import unwrap
from ldmseg.precision import autocast_context

SamplerFactory = Callable[[DiffusionConfig, SamplingConfig], object]


SIGMA_SAMPLERS = ("dpmsolver++", "dpmsolver++-sde", "unipc", "euler", "heun")


SIGMA_SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu": {"use_lu_lambdas": True},
}
"""``sampling.sigma_schedule`` → the diffusers scheduler keyword that spaces the sampler's noise
levels: ``karras`` (Karras et al.), ``exponential`` (log-uniform σ), ``beta`` (Beta(0.6, 0.6)
quantiles of σ) and ``lu`` (uniform steps in log-SNR λ, DPM-Solver's own spacing; the
``dpmsolver++`` samplers only)."""

LU_SAMPLERS = ("dpmsolver++", "dpmsolver++-sde")


def check_sigma_schedule(name: str, schedule: str) -> None:
    """Raise ``ValueError`` when sampler ``name`` cannot space its noise levels by ``schedule``
    (``sampling.sigma_schedule``): every schedule but ``default`` needs a :data:`SIGMA_SAMPLERS`
    sampler, ``lu`` one of :data:`LU_SAMPLERS`."""
    if schedule == "default":
        return
    if name not in SIGMA_SAMPLERS:
        raise ValueError(f"sigma_schedule={schedule!r} needs a sigma-based sampler "
                         f"({', '.join(SIGMA_SAMPLERS)}); {name} has none: use sigma_schedule=default")
    if schedule == "lu" and name not in LU_SAMPLERS:
        raise ValueError(f"sigma_schedule='lu' (uniform log-SNR steps) exists for {', '.join(LU_SAMPLERS)} only, "
                         f"not {name}: use karras, exponential or beta")


def _sigmas(sampling: SamplingConfig) -> dict:
    """Scheduler keyword for ``sampling.sigma_schedule`` (see :data:`SIGMA_SCHEDULES`)."""
    return dict(SIGMA_SCHEDULES[sampling.sigma_schedule])


def _ddim(cfg: DiffusionConfig, sampling: SamplingConfig) -> DDIMScheduler:
    # η is passed to step(); set_alpha_to_one only affects the sample after the last step, which
    # is not used (the result is x̂₀ of the last step).
    return DDIMScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=0)


def _ddpm(cfg: DiffusionConfig, sampling: SamplingConfig) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing, clip_sample=False)


def _dpmsolver(cfg: DiffusionConfig, sampling: SamplingConfig) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                                       algorithm_type="dpmsolver++", solver_order=2, **_sigmas(sampling))


def _dpmsolver_sde(cfg: DiffusionConfig, sampling: SamplingConfig) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                                       algorithm_type="sde-dpmsolver++", solver_order=2, **_sigmas(sampling))


def _unipc(cfg: DiffusionConfig, sampling: SamplingConfig) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                                  **_sigmas(sampling))


def _euler(cfg: DiffusionConfig, sampling: SamplingConfig) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                                 **_sigmas(sampling))


def _heun(cfg: DiffusionConfig, sampling: SamplingConfig) -> HeunDiscreteScheduler:
    return HeunDiscreteScheduler(**scheduler_kwargs(cfg), timestep_spacing=sampling.timestep_spacing,
                                **_sigmas(sampling))


SAMPLERS: dict[str, SamplerFactory] = {
    "ddim": _ddim,
    "ddpm": _ddpm,
    "dpmsolver++": _dpmsolver,
    "dpmsolver++-sde": _dpmsolver_sde,
    "unipc": _unipc,
    "euler": _euler,
    "heun": _heun,
}
"""Sampler name → scheduler factory. ``heun`` calls the denoiser about twice per step."""


def make_sampler(name: str, diffusion_cfg: DiffusionConfig, sampling_cfg: SamplingConfig):
    """The diffusers scheduler registered as ``name`` (see :data:`SAMPLERS`)."""
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    check_sigma_schedule(name, sampling_cfg.sigma_schedule)
    return factory(diffusion_cfg, sampling_cfg)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One ``torch.Generator`` (CPU) per seed and the noise (B, *shape) float32 drawn from them, on ``device``.

    Drawing on the CPU makes the noise identical on every device.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device), generators


@torch.no_grad()
def sample_latents(
    denoiser: nn.Module,
    image_latent: torch.Tensor,
    *,
    diffusion_cfg: DiffusionConfig,
    sampling_cfg: SamplingConfig,
    seeds: Sequence[int],
    latent_channels: int,
    known_latent: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample mask latents conditioned on image latents; returns x̂₀ of the last step.

    Args:
        denoiser: ``(x_t, t, image_latent, x0_self) → prediction`` (a :class:`~ldmseg.models.denoiser.Denoiser`).
        image_latent: (B, Ci, h, w) float, the image encoder's output.
        diffusion_cfg: the noise process the denoiser was trained with.
        sampling_cfg: ``sampler``, ``steps``, ``timestep_spacing``, ``eta`` (DDIM), ``self_condition``,
            ``autocast`` (the denoiser's forward pass only: its output is cast back to float32).
        seeds: B ints, one per image (initial noise and any sampler noise of that image).
        latent_channels: C of the mask latent.
        known_latent: (B, C, h, w) float, scaled mask latents to keep (inpainting), or None.
        known_mask: (B, 1, h, w) bool, True on known latent cells; required with ``known_latent``.

    Returns:
        x̂₀ (B, C, h, w) float32 (scaled latents: divide by the latent scale before decoding).
    """
    if image_latent.ndim != 4:
        raise ValueError(f"image_latent must be (B, Ci, h, w), got shape {tuple(image_latent.shape)}")
    b, _, h, w = image_latent.shape
    seeds = [int(s) for s in seeds]
    if len(seeds) != b:
        raise ValueError(f"pass one seed per image: got {len(seeds)} seeds for a batch of {b}")
    steps = int(sampling_cfg.steps)
    if steps < 1:
        raise ValueError(f"sampling.steps must be >= 1, got {steps}")
    device = image_latent.device
    shape = (b, latent_channels, h, w)
    inpaint = known_latent is not None or known_mask is not None
    if inpaint:
        if known_latent is None or known_mask is None:
            raise ValueError("inpainting needs both known_latent (B, C, h, w) and known_mask (B, 1, h, w)")
        if tuple(known_latent.shape) != shape or tuple(known_mask.shape) != (b, 1, h, w):
            raise ValueError(
                f"known_latent must be {shape} and known_mask {(b, 1, h, w)}, got "
                f"{tuple(known_latent.shape)} and {tuple(known_mask.shape)}"
            )
        known_latent = known_latent.to(device=device, dtype=torch.float32)
        known_mask = known_mask.to(device=device, dtype=torch.bool)

    scheduler = make_sampler(sampling_cfg.sampler, diffusion_cfg, sampling_cfg)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    model_timesteps = timesteps.round().long().to(device)  # the denoiser's integer timesteps (N,)
    alphas_cumprod = make_train_scheduler(diffusion_cfg).alphas_cumprod.to(device)
    step_params = inspect.signature(scheduler.step).parameters

    noise, generators = initial_noise(seeds, shape[1:], device)
    step_kwargs: dict = {"return_dict": False}
    if "eta" in step_params:
        step_kwargs["eta"] = float(sampling_cfg.eta)
    if "generator" in step_params:
        step_kwargs["generator"] = generators  # diffusers' randn_tensor draws image i from generator i

    prediction_type = diffusion_cfg.prediction_type
    self_condition = bool(sampling_cfg.self_condition) and bool(getattr(unwrap(denoiser), "self_condition", False))
    one = torch.ones((), device=device)
    # x_T ~ N(0, I) on the DDPM scale, converted to the sampler's scale (x₀ + σ·ε for sigma-based
    # ones; diffusers' init_noise_sigma is σ_max there, slightly off sqrt(σ_max² + 1))
    sample = noise / scheduler.scale_model_input(one, timesteps[0])
    x0_hat = torch.zeros(shape, device=device) if self_condition else None
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        t_batch = model_timesteps[i].expand(b)
        if inpaint:
            a = alphas_cumprod[model_timesteps[i]]
            noised_known = a.sqrt() * known_latent + (1 - a).sqrt() * noise  # DDPM scale
            c_in = scheduler.scale_model_input(one, t)  # 1, or 1/sqrt(σ² + 1) for sigma-based samplers
            sample = torch.where(known_mask, noised_known / c_in, sample)
        model_input = scheduler.scale_model_input(sample, t)
        x0_self = None
        if self_condition:
            x0_self = torch.where(known_mask, known_latent, x0_hat) if inpaint else x0_hat
        with autocast_context(device, sampling_cfg.autocast):
            output = denoiser(model_input, t_batch, image_latent, x0_self)
        output = output.float()
        if self_condition or i == last:
            x0_hat = predict_x0(prediction_type, output, model_input, t_batch, alphas_cumprod)
        if i < last:
            sample = scheduler.step(output, t, sample, **step_kwargs)[0]
    if inpaint:
        x0_hat = torch.where(known_mask, known_latent, x0_hat)
    return x0_hat


@torch.no_grad()
def decode_latents(mask_ae: nn.Module, x0: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """Scaled latents x̂₀ (B, C, h, w) → per-slot logits (B, S, h·f, w·f) float32: AE decoder(x̂₀ / scale)."""
    if latent_scale <= 0:
        raise ValueError(f"latent_scale must be > 0 (stored with the checkpoint), got {latent_scale}")
    return unwrap(mask_ae).decode(x0 / latent_scale)
