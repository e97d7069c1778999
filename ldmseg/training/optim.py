"""Optimiser, learning-rate schedule, EMA and mixed precision of a training stage.

- :func:`make_optimizer`: AdamW + :func:`lr_factor` (linear warm-up, then constant or cosine);
- :func:`make_ema` (a diffusers ``EMAModel``, shadow optionally on the CPU), :func:`ema_state_dict`
  (the EMA weights as a CPU state dict, to save), :func:`ema_weights` (the EMA weights swapped into the
  model for a block) and :func:`ema_copy` (the EMA weights in a copy);
- :func:`make_scaler` (a ``GradScaler`` for fp16 on CUDA; precision itself: :mod:`ldmseg.precision`);
- :func:`optimizer_step`: backward, clip, step (through the scaler if any), skipped when the loss
  or the gradient norm is not finite; :class:`NonFiniteGuard` counts the skips and raises after
  ``max_nonfinite_steps`` in a row.

A *step* is an optimiser update that was applied: a skipped batch moves neither the weights, nor
the lr schedule, nor the EMA, nor ``TrainState.step`` (only a ``GradScaler`` lowers its scale).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import nn

from ldmseg.train_config import TrainConfig
from ldmseg.models.ddp import unwrap
from ldmseg.precision import autocast_context, resolve_precision, warn_once  # noqa: F401 (autocast_context: the training API)


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


def make_ema(model: nn.Module, decay: float | None, *, on_cpu: bool = False):
    """A diffusers ``EMAModel`` over ``model``'s trainable parameters (:func:`ema_class`), or
    ``None`` when ``decay`` is None.

    ``on_cpu`` (``train_ldm.ema_on_cpu``): the shadow weights live in host memory (4 bytes per
    trainable float32 parameter less on the GPU); each step then copies the weights to the host
    and averages there. The shadow stays on the CPU through :meth:`load_state_dict` (resume).
    """
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or null, got {decay}")
    return ema_class()([p for p in unwrap(model).parameters() if p.requires_grad], decay=decay, on_cpu=on_cpu)


_EMA_CLASS = None


def ema_class():
    """The ``EMAModel`` subclass :func:`make_ema` builds (diffusers is imported on first use).

    It updates with ``torch._foreach`` ops (one kernel launch per op for all tensors instead of a
    few per tensor) and, with ``on_cpu=True``, keeps ``shadow_params`` on the CPU: :meth:`step`
    copies the model's weights into reused (pinned, on CUDA) host buffers, then applies the same
    update ``s -= (1 - decay) * (s - p)`` there.
    """
    global _EMA_CLASS
    if _EMA_CLASS is not None:
        return _EMA_CLASS
    from diffusers.training_utils import EMAModel

    class EMA(EMAModel):
        def __init__(self, parameters, *, decay: float, on_cpu: bool = False) -> None:
            super().__init__(parameters, decay=decay, foreach=True)
            self.on_cpu = bool(on_cpu)
            self._host: list[torch.Tensor] | None = None
            if self.on_cpu:
                self.to("cpu")

        @property
        def shadow_device(self) -> torch.device | None:
            """The device of the shadow weights (None without any)."""
            return self.shadow_params[0].device if self.shadow_params else None

        def _host_copies(self, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
            """``parameters``' values on the CPU: the tensors themselves when already there, else
            copies into reused host buffers (one device-to-host pass, one sync)."""
            if all(p.device.type == "cpu" for p in parameters):
                return [p.detach() for p in parameters]
            if self._host is None or [b.shape for b in self._host] != [p.shape for p in parameters]:
                pin = torch.cuda.is_available()
                self._host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in parameters]
            for b, p in zip(self._host, parameters):
                b.copy_(p.detach(), non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return self._host

        @torch.no_grad()
        def step(self, parameters) -> None:
            if not self.on_cpu:
                return super().step(parameters)
            parameters = list(parameters)
            host = self._host_copies(parameters)
            self.optimization_step += 1
            decay = self.get_decay(self.optimization_step)
            self.cur_decay_value = decay
            grad = [i for i, p in enumerate(parameters) if p.requires_grad]
            frozen = [i for i, p in enumerate(parameters) if not p.requires_grad]
            if frozen:
                torch._foreach_copy_([self.shadow_params[i] for i in frozen], [host[i] for i in frozen])
            shadow = [self.shadow_params[i] for i in grad]
            values = [host[i] for i in grad]
            # the diffusers foreach update, on the host
            torch._foreach_sub_(shadow, torch._foreach_sub(shadow, values), alpha=1 - decay)

        def load_state_dict(self, state_dict: dict) -> None:
            """diffusers' ``load_state_dict`` (``shadow_params`` may be absent: kept as they are),
            then the shadow goes back to the device it was on (the CPU with ``on_cpu``)."""
            device = self.shadow_device
            super().load_state_dict(state_dict)
            if device is not None:
                self.to(device)

    _EMA_CLASS = EMA
    return EMA


def trainable_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s (unwrapped) trainable parameters, in the order of :func:`make_ema`'s shadow."""
    return [n for n, p in unwrap(model).named_parameters() if p.requires_grad]


def ema_state_dict(model: nn.Module, ema) -> dict[str, torch.Tensor]:
    """``model``'s (unwrapped) state dict on the CPU with the trainable entries taken from
    ``ema.shadow_params``: the EMA weights to save, without a copy of the model on its device.

    Entries already on the CPU (e.g. an ``ema_on_cpu`` shadow) are not copied: write them before
    the next step changes them. Tied names of one parameter all get its shadow.
    """
    model = unwrap(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len(trainable) != len(ema.shadow_params):
        raise ValueError(f"the EMA holds {len(ema.shadow_params)} tensors, the model {len(trainable)} trainable "
                         "parameters: the EMA was made for another model")
    shadow = {id(p): s for p, s in zip(trainable, ema.shadow_params)}
    return {k: shadow.get(id(v), v).detach().cpu() for k, v in model.state_dict(keep_vars=True).items()}


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema):
    """Within the block, ``model`` (unwrapped, in place) holds the EMA weights; its own weights are
    kept in host memory and put back on exit (also on error). Yields the unwrapped model.

    No copy of the model on its device (unlike :func:`ema_copy`): e.g. for monitoring on a GPU
    between steps. With ``ema=None`` the model is yielded unchanged.
    """
    model = unwrap(model)
    if ema is None:
        yield model
        return
    params = [p for p in model.parameters() if p.requires_grad]
    kept = [p.detach().to("cpu", copy=True) for p in params]
    try:
        ema.copy_to(params)
        yield model
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k.to(p.device))


def ema_copy(model: nn.Module, ema) -> nn.Module:
    """A deep copy of ``model`` (unwrapped, on its device) holding the EMA weights, e.g. to
    evaluate it apart from training; the trainer saves :func:`ema_state_dict` and monitors with
    :func:`ema_weights` instead (neither copies the model on its device)."""
    model = copy.deepcopy(unwrap(model))
    if ema is not None:
        ema.copy_to([p for p in model.parameters() if p.requires_grad])
    return model


def make_scaler(mixed_precision: str, device) -> torch.amp.GradScaler | None:
    """A ``GradScaler("cuda")`` for fp16 training on CUDA (small gradients would underflow), else None."""
    if resolve_precision(mixed_precision, device) == "fp16" and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def check_scaler(mixed_precision: str, device, scaler) -> None:
    """Warn (once) when fp16 on CUDA runs without a ``GradScaler``."""
    if resolve_precision(mixed_precision, device) == "fp16" and torch.device(device).type == "cuda" and scaler is None:
        warn_once("fp16 training without a GradScaler: small gradients may underflow; pass "
                  "scaler=torch.amp.GradScaler('cuda') to the training step")


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer`` updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class StepOutcome(NamedTuple):
    """What :func:`optimizer_step` did."""

    grad_norm: float
    """The gradient norm before clipping, after unscaling (inf/nan when it overflowed)."""
    skipped: bool
    """True when the loss or ``grad_norm`` was not finite: no optimiser, lr-schedule or EMA step."""


@dataclass
class NonFiniteGuard:
    """Counts optimiser steps skipped for a non-finite loss or gradient norm (:func:`optimizer_step`).

    ``record`` raises ``FloatingPointError`` after ``max_consecutive`` skips in a row, so that a
    run fails (and Ray Train's ``FailureConfig`` restarts it from the last good checkpoint) instead
    of training on NaN weights. ``section`` names the config section in the message.
    """

    max_consecutive: int = 20
    section: str = "train_ldm"
    consecutive: int = 0
    total: int = 0

    def record(self, skipped: bool, step: int) -> None:
        """Count one batch; ``step`` is the step it would have been (applied steps + 1)."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.section} step {step}: the loss or gradient norm was not finite for {self.consecutive} "
                f"batches in a row ({self.section}.max_nonfinite_steps={self.max_consecutive}; {self.total} "
                f"skipped in all); the weights were not updated. Try a lower {self.section}.lr, "
                f"{self.section}.mixed_precision=bf16 (or no), a smaller {self.section}.grad_clip, or check the "
                "data for NaN/inf or empty targets")


def _all_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether the loss and the gradient norm are finite, on every rank when torch.distributed runs
    (the ranks must skip together: gradients are all-reduced, the loss is not)."""
    finite = (torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.float())).to(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item() > 0)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None,
    lr_scheduler,
) -> StepOutcome:
    """Backward, clip, step; skip the optimiser and lr-schedule steps when ``loss`` (a scalar) or
    the gradient norm (after unscaling) is not finite.

    With a ``scaler`` the loss is scaled for the backward pass and ``scaler.update()`` runs on
    every batch, so the scale backs off after an overflow (and is halved by hand when the check
    here skips a step the scaler saw as finite, e.g. a norm overflowing from finite gradients).
    Gradients are left cleared (``None``) after a skipped step.
    """
    params = trainable_params(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    skipped = not _all_finite(loss, grad_norm)
    if scaler is not None:
        scale = scaler.get_scale()
        if not skipped:
            scaler.step(optimizer)
        scaler.update()
        if skipped and scaler.is_enabled() and scaler.get_scale() >= scale:
            scaler.update(scale * scaler.get_backoff_factor())
    elif not skipped:
        optimizer.step()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    elif lr_scheduler is not None:
        lr_scheduler.step()
    return StepOutcome(float(grad_norm), skipped)


def loss_scale(scaler: torch.amp.GradScaler | None) -> dict[str, float]:
    """``{"loss_scale": scale}`` of an enabled ``scaler``, else ``{}`` (a metric)."""
    return {"loss_scale": float(scaler.get_scale())} if scaler is not None and scaler.is_enabled() else {}
