"""Optimiser, learning-rate schedule, EMA and mixed precision of a training stage.

- :func:`make_optimizer`: AdamW + :func:`lr_factor` (linear warm-up, then constant or cosine);
- :func:`make_ema` (a diffusers ``EMAModel``) and :func:`ema_copy` (the EMA weights in a copy);
- :func:`autocast_context`, :func:`make_scaler` (a ``GradScaler`` for fp16 on CUDA);
- :func:`optimizer_step`: backward, clip, step (through the scaler if any).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from typing import Iterable

import torch
from torch import nn

from ldmseg.config import TrainConfig
from ldmseg.models.ddp import unwrap


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


def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this message is given in this process."""
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
        warn_once(f"mixed_precision=fp16 needs a CUDA device (got {device.type}); training in float32. "
                  "Use bf16 on CPU.")
        return contextlib.nullcontext()
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            warn_once("this GPU does not support bf16; training in float32 (use mixed_precision=fp16)")
            return contextlib.nullcontext()
        if device.type not in ("cuda", "cpu"):
            warn_once(f"bf16 autocast is not set up for device {device.type}; training in float32")
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")


def make_scaler(mixed_precision: str, device) -> torch.amp.GradScaler | None:
    """A ``GradScaler("cuda")`` for fp16 training on CUDA (small gradients would underflow), else None."""
    if mixed_precision == "fp16" and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def check_scaler(mixed_precision: str, device, scaler) -> None:
    """Warn (once) when fp16 on CUDA runs without a ``GradScaler``."""
    if mixed_precision == "fp16" and torch.device(device).type == "cuda" and scaler is None:
        warn_once("fp16 training without a GradScaler: small gradients may underflow; pass "
                  "scaler=torch.amp.GradScaler('cuda') to the training step")


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer`` updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None,
    lr_scheduler,
) -> float:
    """Backward, clip, step; returns the gradient norm before clipping (inf/nan if it overflowed)."""
    params = trainable_params(optimizer)
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
