"""One optimiser step of each stage, and the latent scale of a trained mask autoencoder.

- :func:`ae_train_step`: the mask autoencoder (point-sampled CE + BCE + Dice, the paper's Sec. 3.1);
- :func:`ldm_train_step`: the denoiser on frozen AE latents (:func:`~ldmseg.training.losses.ldm_loss`);
- :func:`train_step`: the step of a :class:`~ldmseg.training.state.TrainState`'s stage;
- :func:`measure_latent_scale`: 1 / std of the AE's latents.

Batches are dicts: ``image`` (B, 3, H, W) float32 in [−1, 1], ``slot_map`` (B, H, W) int64 in
[0, S) (0 = void or padding), ``valid`` (B, H, W) bool.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from ldmseg.config import Config
from ldmseg.data.crops import random_crops
from ldmseg.data.encoding import ids_to_bits
from ldmseg.data.random_maps import random_slot_maps
from ldmseg.models.ddp import unwrap
from ldmseg.models.mask_losses import mask_ae_loss
from ldmseg.training.losses import LDMComponents, check_batch, host_floats, ldm_loss
from ldmseg.precision import autocast_context
from ldmseg.training.optim import check_scaler, loss_scale, optimizer_step

if TYPE_CHECKING:
    from ldmseg.training.state import TrainState


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

    When ``cfg.mask_ae.random_map_fraction > 0`` the last ``round(fraction × B)`` maps of the
    batch are replaced by procedural COCO-like maps (:func:`~ldmseg.data.random_maps.random_slot_maps`);
    with ``cfg.mask_ae.train_crop`` set, each map is then cut to a random window of that side
    (:func:`~ldmseg.data.crops.random_crops`: the maps' scale, a fraction of the cost); the
    slot map becomes bit planes (:func:`~ldmseg.data.encoding.ids_to_bits`); when
    ``cfg.mask_ae.latent_noise > 0`` Gaussian noise of that many latent stds (the std of this
    batch's latents) is added to the latent; the loss is
    :func:`~ldmseg.models.mask_losses.mask_ae_loss`; gradients are clipped to
    ``cfg.train_ae.grad_clip``. ``ae`` may be wrapped in DDP. ``generator`` draws the latent
    noise and the loss points when it lives on the batch's device (otherwise the global RNG does).

    Returns floats: ``loss``, ``ce``, ``bce``, ``dice``, ``num_segments``, ``grad_norm``, ``lr``,
    ``skipped`` (1.0 when the loss or grad norm was not finite and no update was made; see
    :func:`~ldmseg.training.optim.optimizer_step`) and, with an enabled scaler, ``loss_scale``.
    """
    image, slot_map, valid = check_batch(batch)
    module = unwrap(ae)
    ae.train()
    device = slot_map.device
    same_device = generator is not None and generator.device.type == device.type
    gen = generator if same_device else None
    n_random = round(cfg.mask_ae.random_map_fraction * slot_map.shape[0])
    if n_random:
        slot_map, valid = slot_map.clone(), valid.clone()  # the caller's batch stays as it was
        slot_map[-n_random:] = random_slot_maps(n_random, slot_map.shape[-1], module.num_slots,
                                                min_area=cfg.data.min_segment_area,
                                                generator=gen, device=device)
        valid[-n_random:] = True
    if cfg.mask_ae.train_crop is not None:  # after the procedural maps: their segments keep the scene's scale
        slot_map, valid = random_crops(slot_map, valid, cfg.mask_ae.train_crop,
                                       multiple=module.downsample_factor, generator=gen)
    bits = ids_to_bits(slot_map, module.num_bits)
    check_scaler(cfg.train_ae.mixed_precision, device, scaler)
    with autocast_context(device, cfg.train_ae.mixed_precision):
        # the AE draws its latent noise on the latent's device: a generator elsewhere is not used
        logits = ae(bits, latent_noise=float(cfg.mask_ae.latent_noise), generator=gen)
    loss, parts = mask_ae_loss(logits.float(), slot_map, valid, cfg.mask_ae, generator=gen)
    outcome = optimizer_step(loss, optimizer, cfg.train_ae.grad_clip, scaler, lr_scheduler)
    parts.update(grad_norm=outcome.grad_norm, lr=float(optimizer.param_groups[0]["lr"]),
                 skipped=float(outcome.skipped), **loss_scale(scaler))
    return parts


def ldm_train_step(
    components: LDMComponents,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    scheduler=None,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_scheduler=None,
) -> dict[str, float]:
    """One optimiser step of the denoiser on ``batch`` (see :func:`~ldmseg.training.losses.ldm_loss`).

    Runs under autocast per ``cfg.train_ldm.mixed_precision`` (for ``fp16`` pass a
    ``torch.amp.GradScaler("cuda")`` as ``scaler``), clips gradients to
    ``cfg.train_ldm.grad_clip``, steps ``lr_scheduler`` and ``components.ema`` if given (neither
    when the loss or grad norm is not finite: the step is skipped, ``skipped`` is 1.0).
    ``scheduler`` is the training ``DDPMScheduler`` (built from the config when None).

    Returns floats: ``loss``, ``mse``, (``aux_ce``), ``self_condition_fraction``,
    ``void_cell_fraction``, ``grad_norm``, ``lr``, ``skipped``, (``loss_scale``, with an enabled scaler).
    """
    components.denoiser.train()
    device = batch["image"].device
    check_scaler(cfg.train_ldm.mixed_precision, device, scaler)
    with autocast_context(device, cfg.train_ldm.mixed_precision):
        loss, parts = ldm_loss(components, batch, cfg, generator=generator, scheduler=scheduler)
    outcome = optimizer_step(loss, optimizer, cfg.train_ldm.grad_clip, scaler, lr_scheduler)
    if components.ema is not None and not outcome.skipped:
        components.ema.step([p for p in unwrap(components.denoiser).parameters() if p.requires_grad])
    parts = host_floats(parts)  # once the updates are queued
    parts.update(grad_norm=outcome.grad_norm, lr=float(optimizer.param_groups[0]["lr"]),
                 skipped=float(outcome.skipped), **loss_scale(scaler))
    return parts


def train_step(state: "TrainState", batch: dict) -> dict[str, float]:
    """One optimiser step of ``state``'s stage on ``batch``; its metrics.

    ``state.step`` counts applied updates only: a batch whose loss or grad norm is not finite is
    skipped (``skipped`` = 1.0) and counted by ``state.guard``, which raises ``FloatingPointError``
    after ``max_nonfinite_steps`` skips in a row. ``skipped_steps`` is the run's total of skips.
    A compact batch (uint8 images, as copied to a GPU) is converted on its device first.
    """
    from ldmseg.data.parquet_dataset import to_training_batch

    batch = to_training_batch(batch)
    if state.name == "ae":
        metrics = ae_train_step(state.trained, batch, state.optimizer, state.cfg, generator=state.generator,
                                scaler=state.scaler, lr_scheduler=state.lr_scheduler)
    else:
        metrics = ldm_train_step(state.components, batch, state.optimizer, state.cfg, generator=state.generator,
                                 scaler=state.scaler, lr_scheduler=state.lr_scheduler)
    skipped = bool(metrics["skipped"])
    state.guard.record(skipped, state.step + 1)
    if not skipped:
        state.step += 1
    metrics["skipped_steps"] = float(state.guard.total)
    return metrics


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
        _, slot_map, _ = check_batch(batch)
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
