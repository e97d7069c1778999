"""A training stage run to its end: :class:`Trainer` (the loop's hooks) and the :class:`Reporter` it reports to.

The trainer runs :func:`~ldmseg.training.steps.train_step` on a :class:`~ldmseg.training.state.TrainState`
in a :class:`~ldmseg.training.loop.TrainLoop` and, at the config's cadences,

- reports the mean metrics with the throughput (``steps_per_s``, ``samples_per_s``, ``world_size``),
  the run's total of batches skipped for a non-finite loss or grad norm (``skipped_steps``) and,
  with a ``GradScaler``, its current ``loss_scale``,
- monitors (rank 0, given a monitoring batch): PQ and an overlay panel (:mod:`ldmseg.training.monitor`),
  of the EMA weights when there are some,
- checkpoints: on rank 0 a model folder (:func:`ldmseg.checkpoint.save_model`, with the latent
  scale; the AE stage measures it on 4 training batches on every rank, which keeps the ranks' data
  in step) plus the resume file; other ranks report the metrics alone.

The final step (or the step the time budget stopped at) is monitored and checkpointed with the
final model and ``train_seconds``, ``train_steps_per_s``. Where things go is the reporter's
business: MLflow and ``ray.train.report`` in a Ray Train worker, ``ray.tune.report`` in a Tune trial.
"""

from __future__ import annotations

import tempfile
import time
from typing import Iterator

import numpy as np

from ldmseg.training.loop import Hooks, TrainLoop
from ldmseg.training.state import TrainState
from ldmseg.training.steps import measure_latent_scale, train_step


class Reporter:
    """Receives a :class:`Trainer`'s results; every method does nothing unless overridden."""

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``report_every`` steps, on every rank."""

    def monitored(self, step: int, metrics: dict[str, float], panel: np.ndarray) -> None:
        """After monitoring (rank 0): ``val_*`` metrics and the overlay panel (uint8 RGB)."""

    def checkpoint(self, step: int, metrics: dict[str, float], folder: str | None) -> None:
        """A checkpoint, on every rank: ``folder`` (rank 0, deleted after the call) holds the model
        folder and ``trainer_state.pt``; ``None`` on other ranks or when checkpoints are off."""


class Trainer(Hooks):
    """Run ``state`` on ``batches`` (an endless iterator of training batches on the state's device).

    ``monitor_batch``: the fixed monitoring batch (rank 0; ``None``: no monitoring). ``extra``:
    JSON-able metadata stored in each model folder's ``extra``. ``save_checkpoints=False`` never
    writes a model folder (the reporter gets ``folder=None``). ``world_size``: the ranks training
    together (for ``world_size`` and ``samples_per_s``, which counts the whole batch).
    """

    def __init__(self, state: TrainState, batches: Iterator[dict], reporter: Reporter | None = None, *,
                 rank: int = 0, world_size: int = 1, monitor_batch: dict | None = None, extra: dict | None = None,
                 save_checkpoints: bool = True) -> None:
        self.state, self.batches, self.reporter = state, batches, reporter or Reporter()
        self.rank, self.world_size = rank, world_size
        self.monitor_batch, self.extra, self.save_checkpoints = monitor_batch, dict(extra or {}), save_checkpoints
        self.loop = TrainLoop.from_config(state.train_cfg)
        self.start_step = state.step
        self._finished = False
        self._monitored: tuple[int, dict] | None = None

    def run(self) -> int:
        """Train to ``iterations`` (or the time budget); returns the last step."""
        self._t_start = self._t_last = time.time()
        self._step_last = self.start_step
        step = self.loop.run(lambda batch: train_step(self.state, batch), self.batches, self, start_step=self.start_step)
        if not self._finished:  # the time budget stopped the loop (or no checkpoint cadence)
            self.finish(step, {"stopped_early": float(step < self.loop.iterations)})
        return step

    # the loop's hooks ----------------------------------------------------------------------

    def report(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(step=step, resumed_from=self.start_step, skipped_steps=float(self.state.guard.total))
        metrics.pop("skipped", None)
        if self.state.scaler is not None and self.state.scaler.is_enabled():
            metrics["loss_scale"] = float(self.state.scaler.get_scale())
        metrics["steps_per_s"] = (step - self._step_last) / max(now - self._t_last, 1e-9)
        metrics["samples_per_s"] = metrics["steps_per_s"] * self.state.train_cfg.batch_size
        metrics["world_size"] = self.world_size
        self._t_last, self._step_last = now, step
        self.reporter.report(step, metrics)

    def validate(self, step: int) -> None:
        if step < self.loop.iterations:  # the final step is monitored with the final model
            self.monitor(step)

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if step >= self.loop.iterations:
            self.finish(step, metrics)
        else:
            self.save(step, {**metrics, "step": step, "resumed_from": self.start_step}, final=False)

    # ---------------------------------------------------------------------------------------

    def finish(self, step: int, metrics: dict[str, float]) -> None:
        """Monitor and checkpoint the final model with the run's duration."""
        seconds = time.time() - self._t_start
        metrics = {**metrics, "step": step, "resumed_from": self.start_step, **self.monitor(step),
                   "train_seconds": seconds, "train_steps_per_s": (step - self.start_step) / max(seconds, 1e-9)}
        self.save(step, metrics, final=True)
        self._finished = True

    def monitor(self, step: int) -> dict[str, float]:
        """PQ of the monitoring batch at ``step`` (once per step), given to the reporter; ``{}`` without a batch."""
        if self.monitor_batch is None:
            return {}
        if self._monitored is not None and self._monitored[0] == step:
            return dict(self._monitored[1])
        from ldmseg.training.monitor import monitor_ae, monitor_ldm

        state, t = self.state, time.time()
        if state.name == "ae":
            metrics, panel = monitor_ae(state.model, self.monitor_batch, state.cfg)
        else:
            comps = state.components
            metrics, panel = monitor_ldm(comps.mask_ae, comps.image_encoder, state.judged(), comps.latent_scale,
                                         self.monitor_batch, state.cfg, steps=state.train_cfg.validate_steps)
        metrics["val_seconds"] = time.time() - t
        self._monitored = (step, dict(metrics))
        self.reporter.monitored(step, metrics, panel)
        return metrics

    def save(self, step: int, metrics: dict[str, float], *, final: bool) -> None:
        """Checkpoint at ``step``: the model folder and resume file on rank 0, the metrics everywhere."""
        state = self.state
        if not self.save_checkpoints:
            self.reporter.checkpoint(step, metrics, None)
            return
        if state.name == "ae":  # every rank draws the same number of batches (keeps the shards in step)
            scale = measure_latent_scale(state.model, (next(self.batches) for _ in range(4)), state.cfg.data.num_slots)
        else:
            scale = state.components.latent_scale
        metrics = {**metrics, "latent_scale": float(scale)}
        if self.rank != 0:
            self.reporter.checkpoint(step, metrics, None)
            return
        from ldmseg.checkpoint import save_model

        with tempfile.TemporaryDirectory() as tmp:
            save_model(tmp, state.cfg, state.stage.modules_to_save(state.judged()), latent_scale=float(scale),
                       extra={"stage": state.name, "step": step, "final": final, **self.extra})
            state.save(tmp)
            self.reporter.checkpoint(step, metrics, tmp)
