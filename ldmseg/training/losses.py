"""The latent diffusion loss (the paper's Sec. 3.2) and what the training steps share.

- :class:`LDMComponents`: the denoiser being trained and its frozen mask AE and image encoder;
- :func:`check_batch`: a training batch's tensors, checked (``image`` (B, 3, H, W) float32 in
  [−1, 1], ``slot_map`` (B, H, W) int64 in [0, S) (0 = void or padding), ``valid`` (B, H, W) bool);
- :func:`latent_weights`, :func:`masked_mse`, :func:`encode_targets`, :func:`ldm_loss`.

The mask autoencoder's loss is :func:`ldmseg.models.mask_losses.mask_ae_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmseg.config import Config
from ldmseg.data.encoding import ids_to_bits
from ldmseg.data.slots import ordered_slots, slot_areas
from ldmseg.diffusion.noise import make_train_scheduler, min_snr_weights, prediction_target, predict_x0
from ldmseg.models.ddp import unwrap


@dataclass
class LDMComponents:
    """What :func:`ldm_loss` works on.

    ``denoiser`` is trained (it may be wrapped in DDP); ``mask_ae`` and ``image_encoder`` are
    frozen; ``latent_scale`` multiplies AE latents (1 / their std); ``ema`` is an optional
    diffusers ``EMAModel`` over the denoiser's trainable parameters, updated after every step.
    """

    denoiser: nn.Module
    mask_ae: nn.Module
    image_encoder: nn.Module
    latent_scale: float
    ema: Any = None


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn with ``generator`` (on its own device) and moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform [0, 1) noise drawn with ``generator`` (on its own device) and moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def check_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, slot_map, valid)`` of a training batch, with the slot map made 0 outside ``valid``."""
    missing = [k for k in ("image", "slot_map", "valid") if k not in batch]
    if missing:
        raise ValueError(f"batch misses {missing}; a training batch is a dict of image (B,3,H,W), "
                         "slot_map (B,H,W) int64 and valid (B,H,W) bool")
    image, slot_map, valid = batch["image"], batch["slot_map"].long(), batch["valid"].bool()
    if image.ndim != 4 or slot_map.shape != valid.shape or slot_map.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"batch shapes disagree: image {tuple(image.shape)}, slot_map {tuple(slot_map.shape)}, "
                         f"valid {tuple(valid.shape)}; expected (B,3,H,W), (B,H,W), (B,H,W)")
    return image, torch.where(valid, slot_map, torch.zeros_like(slot_map)), valid


def latent_weights(
    slot_map: torch.Tensor, valid: torch.Tensor, factor: int, power: float = 0.0, num_slots: int = 0
) -> torch.Tensor:
    """Loss weight per latent cell: (B, H, W) → (B, 1, H/f, W/f) float32.

    0 where all of the cell's f×f pixels are void or padding. Elsewhere, with ``power`` p = 0, 1;
    with p > 0, the largest (A / (H·W))^(−p) over the segments among the cell's pixels, A the
    segment's area in valid pixels, so cells that hold a small segment weigh more (Pix2Seq-D's
    mask-size weighting; :func:`masked_mse` divides by the weights' sum; ``num_slots`` S, the
    bound of the slot values, is then required). Max-pool of the per-pixel weights.
    """
    segment = (slot_map > 0) & valid
    pixel_w = segment.float()
    if power > 0:
        if num_slots < 1:
            raise ValueError("latent_weights with power > 0 needs num_slots (the number of id slots, S)")
        flat = torch.where(segment, slot_map, torch.zeros_like(slot_map)).flatten(1)  # (B, H·W)
        areas = slot_areas(flat, segment.flatten(1), num_slots)  # (B, S), no host sync
        fraction = areas.gather(1, flat).clamp(min=1.0) / flat.shape[1]  # each pixel's segment area / (H·W)
        pixel_w = pixel_w * fraction.pow(-power).view_as(pixel_w)
    return F.max_pool2d(pixel_w[:, None], kernel_size=factor, stride=factor)


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, sample_weights: torch.Tensor
) -> torch.Tensor:
    """Σ_b sample_weights[b] · Σ_{c,h,w} weights · (prediction − target)² / (C · Σ weights).

    ``prediction``, ``target``: (B, C, h, w); ``weights``: (B, 1, h, w) (0 on void cells);
    ``sample_weights``: (B,) (Min-SNR). Returns a scalar float32 (0 when every cell is void).
    """
    se = (prediction.float() - target.float()).pow(2) * weights
    per_sample = se.flatten(1).sum(dim=1)  # (B,)
    norm = weights.sum() * prediction.shape[1]
    return (sample_weights * per_sample).sum() / norm.clamp(min=1.0)


@torch.no_grad()
def encode_targets(
    components: LDMComponents, batch: dict, segment_weight_power: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen encodings of a batch: scaled mask latent x₀ (B, C, h, w), image latent (B, Ci, h, w),
    and the latent loss weights (B, 1, h, w) of :func:`latent_weights` with ``segment_weight_power``."""
    image, slot_map, valid = check_batch(batch)
    mask_ae = unwrap(components.mask_ae)
    x0 = mask_ae.encode(ids_to_bits(slot_map, mask_ae.num_bits)) * float(components.latent_scale)
    image_latent = components.image_encoder.encode(image)
    weights = latent_weights(slot_map, valid, mask_ae.downsample_factor, segment_weight_power, mask_ae.num_slots)
    if image_latent.shape[-2:] != x0.shape[-2:]:
        raise ValueError(f"image latent {tuple(image_latent.shape)} and mask latent {tuple(x0.shape)} differ in size; "
                         "the image encoder and the mask AE need the same downsampling factor")
    return x0, image_latent, weights


def ldm_loss(
    components: LDMComponents, batch: dict, cfg: Config, *, generator: torch.Generator | None = None,
    scheduler=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The diffusion loss of one batch (differentiable w.r.t. the denoiser), without stepping.

    Sample t ~ U{0..T−1} and ε per image, x_t = add_noise(x₀, ε, t); with probability
    ``cfg.diffusion.self_condition_prob`` per image a first no-grad pass (zero self-condition)
    gives x̂₀, which (detached) is the self-conditioning input of the second pass. The loss is
    :func:`masked_mse` between the prediction and its target (ε, x₀ or v) with Min-SNR-γ
    sample weights (and, with ``diffusion.segment_weight_power`` > 0, cell weights that favour small
    segments: :func:`latent_weights`), plus ``ae_aux_weight`` × cross-entropy of the frozen AE decoder on x̂₀ / scale
    against the slot map (void and padding ignored). With ``diffusion.slot_order`` ``raster`` or
    ``grid`` the batch's slots are first renumbered in that order (:func:`ordered_slots`).
    """
    dcfg = cfg.diffusion
    scheduler = scheduler or make_train_scheduler(dcfg)
    if dcfg.slot_order != "random":
        batch = {**batch, "slot_map": ordered_slots(batch["slot_map"], cfg.data.num_slots, dcfg.slot_order)}
    x0, image_latent, weights = encode_targets(components, batch, dcfg.segment_weight_power)
    b, device = x0.shape[0], x0.device
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    if generator is None:
        timesteps = torch.randint(0, dcfg.num_train_timesteps, (b,), device=device)
    else:
        timesteps = torch.randint(0, dcfg.num_train_timesteps, (b,), generator=generator,
                                  device=generator.device).to(device)
    noise = randn(x0.shape, generator, device)
    x_t = scheduler.add_noise(x0, noise, timesteps)

    denoiser = components.denoiser
    x0_self = None
    num_self = 0
    if getattr(unwrap(denoiser), "self_condition", False):
        x0_self = torch.zeros_like(x0)
        chosen = rand((b,), generator, device) < dcfg.self_condition_prob
        num_self = int(chosen.sum())
        if num_self:
            idx = chosen.nonzero().flatten()
            with torch.no_grad():
                first = unwrap(denoiser)(x_t[idx], timesteps[idx], image_latent[idx], None)
                x0_self[idx] = predict_x0(dcfg.prediction_type, first, x_t[idx], timesteps[idx],
                                          alphas_cumprod).detach()
    prediction = denoiser(x_t, timesteps, image_latent, x0_self)
    target = prediction_target(dcfg.prediction_type, x0, noise, timesteps, alphas_cumprod)
    snr_w = min_snr_weights(scheduler, timesteps, dcfg.min_snr_gamma, dcfg.prediction_type)
    mse = masked_mse(prediction, target, weights, snr_w)
    loss = mse
    # 0-d tensors, not floats: reading them here would stall the device before the backward pass
    parts = {"mse": mse.detach(), "self_condition_fraction": num_self / b,
             "void_cell_fraction": (1.0 - weights.mean()).detach()}
    if dcfg.ae_aux_weight > 0:
        x0_hat = predict_x0(dcfg.prediction_type, prediction, x_t, timesteps, alphas_cumprod)
        logits = unwrap(components.mask_ae).decode(x0_hat / float(components.latent_scale))
        _, slot_map, valid = check_batch(batch)
        ce_target = torch.where(valid & (slot_map > 0), slot_map, torch.full_like(slot_map, -100))
        # the mean over labelled pixels, 0 without any (no host sync to ask which)
        ce = F.cross_entropy(logits.float(), ce_target, ignore_index=-100, reduction="sum")
        aux = ce / (ce_target >= 0).sum().clamp(min=1)
        loss = loss + dcfg.ae_aux_weight * aux
        parts["aux_ce"] = aux.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def host_floats(parts: dict) -> dict[str, float]:
    """``parts`` with its tensors read to the host in one transfer (one sync), as floats."""
    keys = [k for k, v in parts.items() if torch.is_tensor(v)]
    values = torch.stack([parts[k].float().reshape(()) for k in keys]).tolist() if keys else []
    return {**{k: float(v) for k, v in parts.items()}, **dict(zip(keys, values))}
