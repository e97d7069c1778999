"""The one training loop, in tests, benchmarks, Tune trials and Ray Train workers alike.

:class:`TrainLoop` runs a step function over batches and calls its :class:`Hooks` at three
independent cadences (report, validate, checkpoint), within an optional time budget;
:func:`train_loop` is the same loop with plain callbacks. Nothing is printed or logged here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ldmseg.train_config import TrainConfig


class Hooks:
    """What a :class:`TrainLoop` calls; every method does nothing unless overridden."""

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """After every ``report_every``-th step: the mean of each float metric since the last report."""

    def validate(self, step: int) -> None:
        """After every ``validate_every``-th step."""

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """After every ``checkpoint_every``-th step and the final step: the last step's metrics."""


@dataclass
class TrainLoop:
    """Run ``step_fn(batch)`` until ``iterations`` steps (see :meth:`run`).

    The three intervals are independent: each hook runs at the multiples of its own interval,
    whatever the others are (``None``: never; the checkpoint hook also after the final step).
    """

    iterations: int
    report_every: int = 50
    checkpoint_every: int | None = None
    validate_every: int | None = None
    time_budget_s: float | None = None
    """Stop between steps once this many seconds have passed."""

    def __post_init__(self) -> None:
        if self.report_every < 1:
            raise ValueError(f"report_every must be >= 1, got {self.report_every}")
        for name in ("checkpoint_every", "validate_every"):
            every = getattr(self, name)
            if every is not None and every < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {every}")

    @classmethod
    def from_config(cls, tcfg: TrainConfig) -> "TrainLoop":
        """The cadences of a stage's config (``validate_every: 0`` → no periodic validation)."""
        return cls(tcfg.iterations, report_every=tcfg.report_every, checkpoint_every=tcfg.checkpoint_every,
                   validate_every=tcfg.validate_every or None, time_budget_s=tcfg.time_budget_s)

    def run(self, step_fn: Callable[[dict], dict[str, float]], batches: Iterable[dict], hooks: Hooks | None = None,
            *, start_step: int = 0) -> int:
        """Run from ``start_step``; returns the last step.

        Besides ``step_fn``'s metrics the hooks get ``data_seconds`` (waiting for the batch) and
        ``step_seconds`` (inside ``step_fn``). ``batches`` is cycled when it runs out (it must then
        be re-iterable, e.g. a list or a DataLoader). A batch whose metrics say ``skipped`` (truthy:
        no update was made, see :func:`~ldmseg.training.optim.optimizer_step`) is not a step: the
        step count, the metric means and the hooks ignore it.
        """
        hooks = hooks or Hooks()
        step = int(start_step)
        iterator = iter(batches)
        t0 = time.monotonic()
        sums: dict[str, float] = {}
        count = 0
        while step < self.iterations:
            if self.time_budget_s is not None and time.monotonic() - t0 >= self.time_budget_s:
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
            if metrics.get("skipped"):  # no update was made (non-finite loss or grad norm): not a step
                continue
            metrics = {**metrics, "data_seconds": data_seconds, "step_seconds": time.perf_counter() - t_step}
            step += 1
            count += 1
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v)
            if step % self.report_every == 0:
                hooks.report(step, {k: v / count for k, v in sums.items()})
                sums, count = {}, 0
            if self.validate_every and step % self.validate_every == 0:
                hooks.validate(step)
            if self.checkpoint_every and (step % self.checkpoint_every == 0 or step == self.iterations):
                hooks.checkpoint(step, dict(metrics))
        return step


class _Callbacks(Hooks):
    def __init__(self, on_report, on_validate, on_checkpoint) -> None:
        self.on_report, self.on_validate, self.on_checkpoint = on_report, on_validate, on_checkpoint

    def report(self, step, metrics):
        if self.on_report is not None:
            self.on_report(step, metrics)

    def validate(self, step):
        if self.on_validate is not None:
            self.on_validate(step)

    def checkpoint(self, step, metrics):
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, metrics)


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
    """:meth:`TrainLoop.run` with callbacks: ``on_report(step, mean metrics)`` every
    ``report_every`` steps, ``on_validate(step)`` every ``validate_every``, ``on_checkpoint(step,
    last metrics)`` every ``checkpoint_every`` and after the final step. Returns the last step."""
    loop = TrainLoop(iterations, report_every=report_every, checkpoint_every=checkpoint_every,
                     validate_every=validate_every, time_budget_s=time_budget_s)
    return loop.run(step_fn, batches, _Callbacks(on_report, on_validate, on_checkpoint), start_step=start_step)
