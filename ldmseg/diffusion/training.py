"""Training steps for the two stages and the one training loop (METHOD.md, "Mask autoencoder" and
"Latent diffusion model").

- :func:`ae_train_step`: one optimiser step of the mask autoencoder (point-sampled CE + BCE + Dice).
- :func:`ldm_train_step`: one optimiser step of the denoiser on frozen AE latents (masked,
  Min-SNR-weighted MSE, self-conditioning, optional auxiliary CE through the AE decoder).
- :func:`train_loop`: the plain loop both stages use, in tests and inside Ray Train alike; it
  reports only through its callbacks.
- :func:`make_optimizer` (AdamW + warm-up, then constant or cosine), :func:`make_ema` (diffusers
  ``EMAModel``), :func:`measure_latent_scale` (1 / std of training latents).

Batches are dicts: ``image`` (B, 3, H, W) float32 in [−1, 1], ``slot_map`` (B, H, W) int64 in
[0, S) (0 = void or padding), ``valid`` (B, H, W) bool.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ldmseg.config import Config, TrainConfig
from ldmseg.data.encoding import ids_to_bits, raster_slots
from ldmseg.data.random_maps import random_slot_maps
from ldmseg.diffusion.noise import make_train_scheduler, min_snr_weights, prediction_target, predict_x0
from ldmseg.diffusion.sampling import unwrap
from ldmseg.models.mask_losses import mask_ae_loss


@dataclass
class LDMComponents:
    """What :func:`ldm_train_step` works on.

    ``denoiser`` is trained (it may be wrapped in DDP); ``mask_ae`` and ``image_encoder`` are
    frozen; ``latent_scale`` multiplies AE latents (1 / their std); ``ema`` is an optional
    diffusers ``EMAModel`` over the denoiser's trainable parameters, updated after every step.
    """

    denoiser: nn.Module
    mask_ae: nn.Module
    image_encoder: nn.Module
    latent_scale: float
    ema: Any = None


# --------------------------------------------------------------------------------------------
# Optimiser, EMA, mixed precision
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, train_cfg: TrainConfig, elapsed_s: float | None = None) -> float:
    """LR multiplier after ``step`` optimiser steps: linear warm-up over ``warmup`` steps, then 1
    (``constant``) or a cosine decay to 0 (``cosine``).

    The cosine's progress is ``(step − warmup) / (iterations − warmup)``; when the stage has a
    ``time_budget_s`` and ``elapsed_s`` (seconds since training started) is given, progress is
    the larger of that and ``elapsed_s / time_budget_s``, so the decay ends when the run ends,
    whichever limit stops it.
    """
    warmup = max(0, int(train_cfg.warmup))
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.lr_schedule == "constant":
        return 1.0
    if train_cfg.lr_schedule == "cosine":
        span = max(1, int(train_cfg.iterations) - warmup)
        progress = (step - warmup) / span
        if elapsed_s is not None and train_cfg.time_budget_s:
            progress = max(progress, elapsed_s / float(train_cfg.time_budget_s))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {train_cfg.lr_schedule!r}")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW(``lr``, ``weight_decay``) and a ``LambdaLR`` of :func:`lr_factor`; step both once per iteration.

    With a ``time_budget_s``, the schedule's clock starts here (call this just before training).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: pass the parameters of the model being trained")
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    t0 = time.monotonic()
    timed = bool(train_cfg.time_budget_s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train_cfg, time.monotonic() - t0 if timed else None))
    return optimizer, scheduler


def make_ema(model: nn.Module, decay: float | None):
    """A diffusers ``EMAModel`` over ``model``'s trainable parameters, or ``None`` when ``decay`` is None."""
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or null, got {decay}")
    from diffusers.training_utils import EMAModel

    return EMAModel([p for p in unwrap(model).parameters() if p.requires_grad], decay=decay)


def ema_copy(model: nn.Module, ema) -> nn.Module:
    """A deep copy of ``model`` (unwrapped) holding the EMA weights, e.g. to save or evaluate."""
    model = copy.deepcopy(unwrap(model))
    if ema is not None:
        ema.copy_to([p for p in model.parameters() if p.requires_grad])
    return model


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def autocast_context(device: torch.device, mixed_precision: str):
    """The autocast context for ``mixed_precision`` (``no``, ``fp16``, ``bf16``) on ``device``.

    ``fp16`` needs CUDA and ``bf16`` a device that supports it; otherwise training runs in
    float32 and a warning says so (once).
    """
    device = torch.device(device)
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision == "fp16":
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        _warn_once(f"mixed_precision=fp16 needs a CUDA device (got {device.type}); training in float32. "
                   "Use bf16 on CPU.")
        return contextlib.nullcontext()
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            _warn_once("this GPU does not support bf16; training in float32 (use mixed_precision=fp16)")
            return contextlib.nullcontext()
        if device.type not in ("cuda", "cpu"):
            _warn_once(f"bf16 autocast is not set up for device {device.type}; training in float32")
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")


def _check_scaler(mixed_precision: str, device, scaler) -> None:
    if mixed_precision == "fp16" and torch.device(device).type == "cuda" and scaler is None:
        _warn_once("fp16 training without a GradScaler: small gradients may underflow; pass "
                   "scaler=torch.amp.GradScaler('cuda') to the training step")


def _optimizer_step(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None,
    lr_scheduler,
) -> float:
    """Backward, clip, step; returns the gradient norm before clipping (inf/nan if it overflowed)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return float(grad_norm)


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn with ``generator`` (on its own device) and moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check_batch(batch: dict, num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [k for k in ("image", "slot_map", "valid") if k not in batch]
    if missing:
        raise ValueError(f"batch misses {missing}; a training batch is a dict of image (B,3,H,W), "
                         "slot_map (B,H,W) int64 and valid (B,H,W) bool")
    image, slot_map, valid = batch["image"], batch["slot_map"].long(), batch["valid"].bool()
    if image.ndim != 4 or slot_map.shape != valid.shape or slot_map.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"batch shapes disagree: image {tuple(image.shape)}, slot_map {tuple(slot_map.shape)}, "
                         f"valid {tuple(valid.shape)}; expected (B,3,H,W), (B,H,W), (B,H,W)")
    return image, torch.where(valid, slot_map, torch.zeros_like(slot_map)), valid


# --------------------------------------------------------------------------------------------
# Mask autoencoder
# --------------------------------------------------------------------------------------------


def ae_train_step(
    ae: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_scheduler=None,
) -> dict[str, float]:
    """One optimiser step of the mask autoencoder on ``batch``.

    The slot map becomes bit planes (:func:`~ldmseg.data.encoding.ids_to_bits`); when
    ``cfg.mask_ae.random_map_fraction > 0`` the last ``round(fraction × B)`` maps of the batch are
    replaced by procedural COCO-like maps (:func:`~ldmseg.data.random_maps.random_slot_maps`); when
    ``cfg.mask_ae.latent_noise > 0`` Gaussian noise of that many latent stds (the std of this
    batch's latents) is added to the latent; the loss is
    :func:`~ldmseg.models.mask_losses.mask_ae_loss`; gradients are clipped to
    ``cfg.train_ae.grad_clip``. ``ae`` may be wrapped in DDP. ``generator`` draws the latent
    noise and the loss points when it lives on the batch's device (otherwise the global RNG does).

    Returns floats: ``loss``, ``ce``, ``bce``, ``dice``, ``num_segments``, ``grad_norm``, ``lr``.
    """
    image, slot_map, valid = _check_batch(batch)
    module = unwrap(ae)
    ae.train()
    device = slot_map.device
    same_device = generator is not None and generator.device.type == device.type
    n_random = round(cfg.mask_ae.random_map_fraction * slot_map.shape[0])
    if n_random:
        slot_map, valid = slot_map.clone(), valid.clone()
        slot_map[-n_random:] = random_slot_maps(n_random, slot_map.shape[-1], module.num_slots,
                                                min_area=cfg.data.min_segment_area,
                                                generator=generator if same_device else None, device=device)
        valid[-n_random:] = True
    bits = ids_to_bits(slot_map, module.num_bits)
    noise_std = 0.0
    if cfg.mask_ae.latent_noise > 0:
        with torch.no_grad():
            noise_std = float(cfg.mask_ae.latent_noise) * float(module.encode(bits).std())
    _check_scaler(cfg.train_ae.mixed_precision, device, scaler)
    with autocast_context(device, cfg.train_ae.mixed_precision):
        # the AE draws its latent noise on the latent's device: a generator elsewhere is not used
        logits = ae(bits, latent_noise=noise_std, generator=generator if same_device else None)
    loss, parts = mask_ae_loss(logits.float(), slot_map, valid, cfg.mask_ae,
                               generator=generator if same_device else None)
    grad_norm = _optimizer_step(loss, _trainable(optimizer), optimizer, cfg.train_ae.grad_clip, scaler, lr_scheduler)
    parts.update(grad_norm=grad_norm, lr=float(optimizer.param_groups[0]["lr"]))
    return parts


@torch.no_grad()
def measure_latent_scale(mask_ae: nn.Module, batches: Iterable[dict], num_slots: int) -> float:
    """1 / std of the AE's latents over ``batches`` (all latent cells; float64 accumulation).

    Store it with the checkpoint: the diffusion model works on ``latent × scale`` (unit variance).
    """
    module = unwrap(mask_ae)
    was_training = module.training
    module.eval()
    num_bits = int(math.log2(num_slots))
    total = total_sq = count = 0.0
    for batch in batches:
        _, slot_map, _ = _check_batch(batch)
        z = module.encode(ids_to_bits(slot_map, num_bits)).double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
    module.train(was_training)
    if count == 0:
        raise ValueError("measure_latent_scale got no batches")
    var = total_sq / count - (total / count) ** 2
    if var <= 0:
        raise ValueError("the AE's latents are constant (std 0); cannot derive a latent scale")
    return float(1.0 / math.sqrt(var))


# --------------------------------------------------------------------------------------------
# Latent diffusion model
# --------------------------------------------------------------------------------------------


def latent_weights(slot_map: torch.Tensor, valid: torch.Tensor, factor: int) -> torch.Tensor:
    """Loss weight per latent cell: (B, H, W) → (B, 1, H/f, W/f) float32.

    1 where at least one of the cell's f×f pixels is a segment (non-void and valid), 0 where
    all of them are void or padding (max-pool of ``(slot_map > 0) & valid``).
    """
    segment = ((slot_map > 0) & valid).float()[:, None]
    return F.max_pool2d(segment, kernel_size=factor, stride=factor)


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
def encode_targets(components: LDMComponents, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen encodings of a batch: scaled mask latent x₀ (B, C, h, w), image latent (B, Ci, h, w),
    and the latent loss weights (B, 1, h, w) of :func:`latent_weights`."""
    image, slot_map, valid = _check_batch(batch)
    mask_ae = unwrap(components.mask_ae)
    x0 = mask_ae.encode(ids_to_bits(slot_map, mask_ae.num_bits)) * float(components.latent_scale)
    image_latent = components.image_encoder.encode(image)
    weights = latent_weights(slot_map, valid, mask_ae.downsample_factor)
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
    sample weights, plus ``ae_aux_weight`` × cross-entropy of the frozen AE decoder on x̂₀ / scale
    against the slot map (void and padding ignored). With ``diffusion.slot_order: raster`` the
    batch's slots are first renumbered in reading order (:func:`raster_slots`).
    """
    dcfg = cfg.diffusion
    scheduler = scheduler or make_train_scheduler(dcfg)
    if dcfg.slot_order == "raster":
        batch = {**batch, "slot_map": raster_slots(batch["slot_map"], cfg.data.num_slots)}
    x0, image_latent, weights = encode_targets(components, batch)
    b, device = x0.shape[0], x0.device
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    if generator is None:
        timesteps = torch.randint(0, dcfg.num_train_timesteps, (b,), device=device)
    else:
        timesteps = torch.randint(0, dcfg.num_train_timesteps, (b,), generator=generator,
                                  device=generator.device).to(device)
    noise = _randn(x0.shape, generator, device)
    x_t = scheduler.add_noise(x0, noise, timesteps)

    denoiser = components.denoiser
    x0_self = None
    num_self = 0
    if getattr(unwrap(denoiser), "self_condition", False):
        x0_self = torch.zeros_like(x0)
        chosen = _rand((b,), generator, device) < dcfg.self_condition_prob
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
    parts = {"mse": float(mse.detach()), "self_condition_fraction": num_self / b,
             "void_cell_fraction": float(1.0 - weights.mean())}
    if dcfg.ae_aux_weight > 0:
        x0_hat = predict_x0(dcfg.prediction_type, prediction, x_t, timesteps, alphas_cumprod)
        logits = unwrap(components.mask_ae).decode(x0_hat / float(components.latent_scale))
        _, slot_map, valid = _check_batch(batch)
        ce_target = torch.where(valid & (slot_map > 0), slot_map, torch.full_like(slot_map, -100))
        aux = F.cross_entropy(logits.float(), ce_target, ignore_index=-100) if (ce_target >= 0).any() \
            else logits.sum() * 0.0
        loss = loss + dcfg.ae_aux_weight * aux
        parts["aux_ce"] = float(aux.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def ldm_train_step(
    components: LDMComponents,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_scheduler=None,
    scheduler=None,
) -> dict[str, float]:
    """One optimiser step of the denoiser on ``batch`` (see :func:`ldm_loss`).

    Runs under autocast per ``cfg.train_ldm.mixed_precision`` (for ``fp16`` pass a
    ``torch.amp.GradScaler("cuda")`` as ``scaler``), clips gradients to
    ``cfg.train_ldm.grad_clip``, steps ``lr_scheduler`` and ``components.ema`` if given.
    ``scheduler`` is the training ``DDPMScheduler`` (built from the config when None).

    Returns floats: ``loss``, ``mse``, (``aux_ce``), ``self_condition_fraction``,
    ``void_cell_fraction``, ``grad_norm``, ``lr``.
    """
    components.denoiser.train()
    device = batch["image"].device
    _check_scaler(cfg.train_ldm.mixed_precision, device, scaler)
    with autocast_context(device, cfg.train_ldm.mixed_precision):
        loss, parts = ldm_loss(components, batch, cfg, generator=generator, scheduler=scheduler)
    params = _trainable(optimizer)
    parts["grad_norm"] = _optimizer_step(loss, params, optimizer, cfg.train_ldm.grad_clip, scaler, lr_scheduler)
    parts["lr"] = float(optimizer.param_groups[0]["lr"])
    if components.ema is not None:
        components.ema.step([p for p in unwrap(components.denoiser).parameters() if p.requires_grad])
    return parts


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_loop(
    step_fn: Callable[[dict], dict[str, float]],
    batches: Iterable[dict],
    iterations: int,
    *,
    start_step: int = 0,
    on_report: Callable[[int, dict[str, float]], None] | None = None,
    report_every: int = 50,
    on_checkpoint: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_every: int | None = None,
    on_validate: Callable[[int], None] | None = None,
    validate_every: int | None = None,
    time_budget_s: float | None = None,
) -> int:
    """Run ``step_fn(batch)`` from ``start_step`` until ``iterations`` steps; returns the last step.

    After every ``report_every``-th step, ``on_report(step, metrics)`` gets the mean of each
    float metric over the steps since the previous report; after every ``checkpoint_every``-th
    step and after the final step, ``on_checkpoint(step, metrics)`` gets the last step's metrics;
    after every ``validate_every``-th step, ``on_validate(step)``. The three intervals are
    independent: each callback runs at the multiples of its own interval, whatever the others are.
    Besides ``step_fn``'s metrics these hold ``data_seconds`` (waiting for the batch) and
    ``step_seconds`` (inside ``step_fn``).
    ``batches`` is cycled when it runs out (it must then be re-iterable, e.g. a list or a
    DataLoader); ``time_budget_s`` stops the loop between steps once exceeded. Nothing is
    printed or logged here: the callbacks do that (Ray Train passes ones that call
    ``ray.train.report``).
    """
    if report_every < 1:
        raise ValueError(f"report_every must be >= 1, got {report_every}")
    for name, every in (("checkpoint_every", checkpoint_every), ("validate_every", validate_every)):
        if every is not None and every < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {every}")
    step = int(start_step)
    iterator = iter(batches)
    t0 = time.monotonic()
    sums: dict[str, float] = {}
    count = 0
    metrics: dict[str, float] = {}
    while step < iterations:
        if time_budget_s is not None and time.monotonic() - t0 >= time_budget_s:
            break
        t_data = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError("batches ran out and yields nothing when iterated again; pass a re-iterable "
                                 "(a list or DataLoader) or an endless generator") from None
        data_seconds = time.perf_counter() - t_data
        t_step = time.perf_counter()
        metrics = step_fn(batch)
        metrics = {**metrics, "data_seconds": data_seconds, "step_seconds": time.perf_counter() - t_step}
        step += 1
        count += 1
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v)
        if on_report is not None and step % report_every == 0:
            on_report(step, {k: v / count for k, v in sums.items()})
            sums, count = {}, 0
        if on_validate is not None and validate_every and step % validate_every == 0:
            on_validate(step)
        if on_checkpoint is not None and checkpoint_every and (step % checkpoint_every == 0 or step == iterations):
            on_checkpoint(step, dict(metrics))
    return step
