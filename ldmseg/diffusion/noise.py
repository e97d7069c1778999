"""The noise process shared by training and sampling (docs/method.md#latent-diffusion-model).

One DDPM forward process defines everything: ``x_t = sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε`` with the
betas of :class:`~ldmseg.config.DiffusionConfig` (1000 steps, scaled-linear 0.00085 → 0.012 by
default). The denoiser predicts ε, x₀ or v (``prediction_type``); the helpers here convert any of
them into x̂₀ and give the regression target and the Min-SNR-γ loss weights for each.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldmseg.config import DiffusionConfig

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"diffusion.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )


def scheduler_kwargs(cfg: DiffusionConfig) -> dict:
    """The diffusers scheduler arguments that define the noise process of ``cfg``."""
    _check_prediction_type(cfg.prediction_type)
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
    }


def make_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training noise process: a diffusers ``DDPMScheduler`` (``add_noise``, ``alphas_cumprod``).

    ``clip_sample`` is off: mask latents are not bounded to [−1, 1].
    """
    return DDPMScheduler(**scheduler_kwargs(cfg), clip_sample=False)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[timesteps]`` (B,) → (B, 1, 1, 1) float32 on ``like``'s device."""
    out = values.to(like.device)[timesteps.to(like.device).long()].float()
    return out.view(-1, *([1] * (like.ndim - 1)))


def prediction_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the denoiser regresses: ε (``epsilon``), x₀ (``sample``) or v (``v_prediction``).

    ``x0``, ``noise``: (B, C, h, w) float; ``timesteps``: (B,) int64; ``alphas_cumprod``: (T,).
    v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x₀. Returns (B, C, h, w) float32.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "sample":
        return x0.float()
    a = _gather(alphas_cumprod, timesteps, x0)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


def predict_x0(
    prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """x̂₀ from the denoiser's output at DDPM-scale ``x_t`` (B, C, h, w) and integer ``timesteps`` (B,).

    ε: (x_t − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ); x₀: the output itself; v: sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v̂.
    Returns (B, C, h, w) float32.
    """
    _check_prediction_type(prediction_type)
    out = model_output.float()
    if prediction_type == "sample":
        return out
    a = _gather(alphas_cumprod, timesteps, x_t)
    x_t = x_t.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * out


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample: (B,) int64 timesteps → (B,) float32.

    With SNR(t) = ᾱ_t / (1 − ᾱ_t) from diffusers' ``compute_snr``: ε-prediction
    ``min(SNR, γ) / SNR``, x₀-prediction ``min(SNR, γ)``, v-prediction ``min(SNR, γ) / (SNR + 1)``.
    ``gamma=None`` gives uniform weights (all ones).
    """
    _check_prediction_type(prediction_type)
    if gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if gamma <= 0:
        raise ValueError(f"diffusion.min_snr_gamma must be > 0 or null (uniform weights), got {gamma}")
    snr = compute_snr(scheduler, timesteps).float()
    clipped = snr.clamp(max=float(gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1)
