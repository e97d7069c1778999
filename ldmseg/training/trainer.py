"""A training stage run to its end: :class:`Trainer` (the loop's hooks) and the :class:`Reporter` it reports to.

The trainer runs :func:`~ldmseg.training.steps.train_step` on a :class:`~ldmseg.training.state.TrainState`
in a :class:`~ldmseg.training.loop.TrainLoop` and, at the config's cadences,

- reports the mean metrics with the throughput (``steps_per_s``, ``samples_per_s``, ``world_size``),
  the run's total of batches skipped for a non-finite loss or grad norm (``skipped_steps``) and,
  with a ``GradScaler``, its current ``loss_scale``,
- monitors (rank 0, given a monitoring batch): PQ and an overlay panel (:mod:`ldmseg.training.monitor`),
  of the EMA weights when there are some (swapped into the model for the monitoring,
  :meth:`~ldmseg.training.state.TrainState.ema_applied`: no copy of the model on the GPU),
- checkpoints: on rank 0 a model folder (:func:`ldmseg.checkpoint.save_model`, with the latent
  scale; the AE stage measures it on 4 training batches on every rank, which keeps the ranks' data
  in step; the trained component's weights are the EMA's, built on the CPU from its shadow) plus
  the resume file (without a second copy of the EMA), staged in ``train_*.checkpoint_dir`` (default:
  the system temp folder) and handed to the reporter; other ranks report the metrics alone.

Before step 1, rank 0 deletes staged folders of killed processes on its host
(:func:`remove_stale_staging`) and checks that ``checkpoint_dir`` has room for the checkpoints the reporter may
hold at once (:meth:`Reporter.staged_checkpoints`) and stops with the free and needed bytes if not.

The final step (or the step the time budget stopped at) is monitored and checkpointed with the
final model and ``train_seconds``, ``train_steps_per_s``. Where things go is the reporter's
business: MLflow and ``ray.train.report`` in a Ray Train worker, ``ray.tune.report`` in a Tune trial.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ldmseg.training.loop import Hooks, TrainLoop
from ldmseg.training.state import TrainState
from ldmseg.training.steps import measure_latent_scale, train_step


class Reporter:
    """Receives a :class:`Trainer`'s results; every method does nothing unless overridden."""

    staged_checkpoints: int = 1
    """How many checkpoint folders may sit in ``checkpoint_dir`` at once because of this reporter
    (2 when it uploads one while the trainer writes the next): the free-space check counts them."""

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``report_every`` steps, on every rank."""

    def monitored(self, step: int, metrics: dict[str, float], panel: np.ndarray) -> None:
        """After monitoring (rank 0): ``val_*`` metrics and the overlay panel (uint8 RGB)."""

    def checkpoint(self, step: int, metrics: dict[str, float], folder: str | None) -> bool | None:
        """A checkpoint, on every rank: ``folder`` (rank 0) holds the model folder and
        ``trainer_state.pt``; ``None`` on other ranks or when checkpoints are off.

        Returns True when the reporter takes ownership of ``folder`` (it must delete it when done,
        e.g. once an asynchronous upload finished); otherwise (None, False) the trainer deletes the
        folder as soon as this returns."""


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
        self.checkpoint_root = str(Path(state.train_cfg.checkpoint_dir or tempfile.gettempdir()).expanduser())
        self.start_step = state.step
        self._finished = False
        self._monitored: tuple[int, dict] | None = None

    def run(self) -> int:
        """Train to ``iterations`` (or the time budget); returns the last step.

        Raises ``OSError`` before step 1 when rank 0's ``checkpoint_dir`` lacks room for a checkpoint."""
        if self.save_checkpoints and self.rank == 0:
            section = "train_ae" if self.state.name == "ae" else "train_ldm"
            remove_stale_staging(self.checkpoint_root)
            staged = max(1, self.reporter.staged_checkpoints)
            check_free_space(self.checkpoint_root, self.state.checkpoint_bytes() * staged, f"{section}.checkpoint_dir")
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
            with state.ema_applied() as denoiser:  # the EMA weights in the model itself, restored after
                metrics, panel = monitor_ldm(comps.mask_ae, comps.image_encoder, denoiser, comps.latent_scale,
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
        Path(self.checkpoint_root).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"{staging_prefix()}{state.name}-step{step}-", dir=self.checkpoint_root)
        owned = False
        try:
            write_checkpoint(state, folder, latent_scale=float(scale),
                             extra={"stage": state.name, "step": step, "final": final, **self.extra})
            owned = bool(self.reporter.checkpoint(step, metrics, folder))
        finally:
            if not owned:
                shutil.rmtree(folder, ignore_errors=True)


def write_checkpoint(state: TrainState, folder: str | Path, *, latent_scale: float, extra: dict) -> None:
    """One checkpoint of ``state`` into ``folder``: the model folder (the trained component's weights
    are the EMA's, built on the CPU, when there is an EMA) and ``trainer_state.pt`` without a second
    copy of the EMA's shadow."""
    from ldmseg.checkpoint import save_model

    weights = state.saved_weights()  # the EMA's, on the CPU (None: the module's own)
    save_model(folder, state.cfg, state.stage.modules_to_save(state.model), latent_scale=latent_scale, extra=extra,
               state_dicts={state.trained_component: weights} if weights is not None else None)
    del weights
    state.save(folder, ema_in_model=True)


def staging_prefix(host: str | None = None, pid: int | None = None) -> str:
    """Name prefix of the checkpoint folders this process stages: ``ldmseg-staged-<host>-<pid>-``
    (a folder left by a killed process is known as stale by its host and pid)."""
    import os
    import socket

    host = (host or socket.gethostname()).replace("-", "_")
    return f"ldmseg-staged-{host}-{pid if pid is not None else os.getpid()}-"


def remove_stale_staging(root: str | Path) -> list[str]:
    """Delete the staged checkpoint folders in ``root`` left by processes of this host that are
    gone (a worker killed before its upload ended); returns their names. Folders of live
    processes and of other hosts (``root`` may be shared) are left alone."""
    import os

    mine = staging_prefix(pid=0)[: -len("0-")]
    removed = []
    if not Path(root).is_dir():
        return removed
    for folder in Path(root).glob(f"{mine}*"):
        pid = folder.name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def check_free_space(folder: str | Path, needed: int, key: str) -> None:
    """Raise ``OSError`` unless ``folder`` (created if missing) has :func:`ldmseg.memory.space_wanted`
    of ``needed`` bytes free; ``key`` names the config key that sets the folder."""
    from ldmseg.memory import FREE_SPACE_MARGIN, space_wanted

    Path(folder).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    want = space_wanted(needed)
    if free < want:
        raise OSError(f"{key}: {folder} has {free:,} bytes free ({free / 1e9:.1f} GB); checkpoints staged there "
                      f"need about {want:,} bytes ({want / 1e9:.1f} GB, {FREE_SPACE_MARGIN:.0%} margin included). Free space "
                      f"there, or set {key}=<a node-local folder with room> (it must exist on every node)")
