"""The training loop (ldmseg.training.loop): cycling the data, reports, checkpoints, validation cadences."""

from __future__ import annotations

import pytest

from ldmseg import training


def test_train_loop_cycles_reports_means_and_checkpoints():
    seen, reports, ckpts = [], [], []

    def step_fn(batch):
        seen.append(batch)
        return {"loss": float(batch), "tag": "x"}

    last = training.train_loop(step_fn, [1, 2, 3], 7, start_step=0, report_every=2,
                               on_report=lambda s, m: reports.append((s, m)), checkpoint_every=3,
                               on_checkpoint=lambda s, m: ckpts.append((s, m["loss"])))
    assert last == 7 and seen == [1, 2, 3, 1, 2, 3, 1]
    assert [(s, m["loss"]) for s, m in reports] == [(2, 1.5), (4, 2.0), (6, 2.5)]
    assert all(set(m) == {"loss", "data_seconds", "step_seconds"} and m["data_seconds"] >= 0
               and m["step_seconds"] >= 0 for _, m in reports)
    assert ckpts == [(3, 3.0), (6, 3.0), (7, 1.0)]
    # resuming: start_step counts towards iterations
    assert training.train_loop(step_fn, [5], 9, start_step=7) == 9
    # a time budget of 0 stops before the first step
    assert training.train_loop(step_fn, [5], 100, start_step=4, time_budget_s=0.0) == 4
    with pytest.raises(ValueError, match="re-iterable"):
        training.train_loop(step_fn, iter([1, 2]), 5)


def test_train_loop_reports_validates_and_checkpoints_each_at_its_own_interval():
    """Three independent cadences: none waits for a step that is a multiple of another's interval."""
    events = []
    training.train_loop(lambda b: {"loss": 1.0}, [0], 12, report_every=3, checkpoint_every=4, validate_every=5,
                        on_report=lambda s, m: events.append(("report", s)),
                        on_checkpoint=lambda s, m: events.append(("checkpoint", s)),
                        on_validate=lambda s: events.append(("validate", s)))
    assert [s for e, s in events if e == "report"] == [3, 6, 9, 12]
    assert [s for e, s in events if e == "checkpoint"] == [4, 8, 12]
    assert [s for e, s in events if e == "validate"] == [5, 10]
    with pytest.raises(ValueError, match="validate_every"):
        training.train_loop(lambda b: {}, [0], 2, validate_every=0)
