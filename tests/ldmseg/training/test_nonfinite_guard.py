"""The non-finite guard of the optimiser step: a batch with an infinite loss or gradient norm moves
nothing (weights, EMA, lr schedule, step), N in a row raise, and the GradScaler and skip count
survive a save/load of the trainer state."""

from __future__ import annotations

import pytest
import torch

from ldmseg import training
from ldmseg.config import ConfigError
from ldmseg.training.optim import optimizer_step
from ldmseg.training.state import TrainState
from helpers_batches import scene_batch
from helpers_training import training_cfg


def _inf_grad_hook(module: torch.nn.Module):
    """Make the first trainable parameter's gradient +inf; returns the hook handle."""
    param = next(p for p in module.parameters() if p.requires_grad)
    return param.register_hook(lambda g: torch.full_like(g, float("inf")))


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory):
    """A model folder of an untrained mask AE (the LDM stage's frozen encoder)."""
    from ldmseg.checkpoint import save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    cfg = training_cfg()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ae") / "ae"
    save_model(folder, cfg, {"mask_autoencoder": MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)}, latent_scale=1.5)
    return str(folder)


def test_inf_gradient_leaves_weights_ema_and_step_then_a_finite_step_moves_them(ae_folder):
    cfg = training_cfg("train_ldm.ema_decay=0.9")
    state = TrainState.create("ldm", cfg, ae_model=ae_folder)
    state.seed_generator(3)
    batch = scene_batch(cfg, 4, seed=1)
    training.train_step(state, batch)  # one good step: Adam has moments, the EMA has moved once
    weights, ema = _params(state.model), [p.clone() for p in state.ema.shadow_params]
    lr_epoch, ema_steps = state.lr_scheduler.last_epoch, state.ema.optimization_step

    handle = _inf_grad_hook(state.model)
    metrics = training.train_step(state, batch)
    handle.remove()
    assert metrics["skipped"] == 1.0 and metrics["skipped_steps"] == 1.0
    assert metrics["grad_norm"] == float("inf")
    assert _same(_params(state.model), weights) and _same(list(state.ema.shadow_params), ema)
    assert state.step == 1 and state.lr_scheduler.last_epoch == lr_epoch
    assert state.ema.optimization_step == ema_steps
    assert state.guard.consecutive == 1 and state.guard.total == 1

    metrics = training.train_step(state, batch)
    assert metrics["skipped"] == 0.0 and metrics["skipped_steps"] == 1.0
    assert not _same(_params(state.model), weights) and not _same(list(state.ema.shadow_params), ema)
    assert state.step == 2 and state.lr_scheduler.last_epoch == lr_epoch + 1
    assert state.guard.consecutive == 0 and state.guard.total == 1


def test_non_finite_steps_in_a_row_raise_naming_the_step_and_what_to_try():
    cfg = training_cfg("train_ae.max_nonfinite_steps=3")
    state = TrainState.create("ae", cfg)
    state.seed_generator(0)
    batch = scene_batch(cfg, 4, seed=2)
    training.train_step(state, batch)
    handle = _inf_grad_hook(state.model)
    for _ in range(2):
        training.train_step(state, batch)
    handle.remove()
    training.train_step(state, batch)  # a finite step resets the run of skips
    assert state.step == 2 and state.guard.total == 2 and state.guard.consecutive == 0
    handle = _inf_grad_hook(state.model)
    training.train_step(state, batch)
    training.train_step(state, batch)
    with pytest.raises(FloatingPointError, match=r"train_ae step 3: .* 3 batches in a row "
                                                 r"\(train_ae.max_nonfinite_steps=3; 5 skipped in all\)") as err:
        training.train_step(state, batch)
    handle.remove()
    assert "lower train_ae.lr" in str(err.value) and "bf16" in str(err.value) and "check the data" in str(err.value)
    assert state.step == 2


def _linear():
    """A seeded 3 -> 2 linear model with the AE stage's optimiser and lr schedule."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer, sched = training.make_optimizer(model.parameters(), training_cfg().train_ae)
    return model, optimizer, sched


def test_an_infinite_loss_skips_the_step_without_a_scaler():
    model, optimizer, sched = _linear()
    x = torch.randn(5, 3)  # (B, 3)
    before = _params(model)
    outcome = optimizer_step(model(x).pow(2).mean() * float("inf"), optimizer, 1.0, None, sched)
    assert outcome.skipped and _same(_params(model), before) and sched.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())
    outcome = optimizer_step(model(x).pow(2).mean(), optimizer, 1.0, None, sched)
    assert not outcome.skipped and outcome.grad_norm > 0 and not _same(_params(model), before)
    assert sched.last_epoch == 1


def test_grad_scaler_backs_off_on_a_skipped_step_and_steps_on_a_finite_one():
    model, optimizer, sched = _linear()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    x = torch.randn(5, 3)  # (B, 3)
    before = _params(model)
    handle = model.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    outcome = optimizer_step(model(x).pow(2).mean(), optimizer, 1.0, scaler, sched)
    handle.remove()
    assert outcome.skipped and _same(_params(model), before) and sched.last_epoch == 0
    assert scaler.get_scale() == 512.0
    outcome = optimizer_step(model(x).pow(2).mean(), optimizer, 1.0, scaler, sched)
    assert not outcome.skipped and not _same(_params(model), before) and sched.last_epoch == 1
    assert scaler.get_scale() == 1024.0  # growth_interval=1: one good step doubles it
    # finite gradients whose norm overflows float32 (the scaler sees nothing wrong): skipped, the scale backs off
    big = torch.nn.Linear(2, 1, bias=False)
    opt_big, _ = training.make_optimizer(big.parameters(), training_cfg().train_ae)
    with torch.no_grad():
        big.weight.fill_(1e-10)
    unit = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    outcome = optimizer_step(big(torch.full((1, 2), 3e38)).sum(), opt_big, 1.0, unit, None)
    assert outcome.skipped and outcome.grad_norm == float("inf") and unit.get_scale() == 0.5
    assert torch.equal(big.weight, torch.full((1, 2), 1e-10))


def test_grad_scaler_and_skip_count_round_trip_through_the_trainer_state(tmp_path):
    cfg = training_cfg()
    state = TrainState.create("ae", cfg)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    state.seed_generator(0)
    batch = scene_batch(cfg, 4, seed=3)
    training.train_step(state, batch)
    handle = _inf_grad_hook(state.model)
    metrics = training.train_step(state, batch)
    handle.remove()
    training.train_step(state, batch)
    assert metrics["loss_scale"] == 2.0 ** 11 and state.scaler.get_scale() == 2.0 ** 11
    saved = state.scaler.state_dict()
    assert saved["_growth_tracker"] == 1
    state.save(tmp_path)

    resumed = TrainState.create("ae", cfg)
    resumed.scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == saved
    assert resumed.step == 2 and resumed.guard.total == 1 and resumed.guard.consecutive == 0
    for s in (state, resumed):
        s.seed_generator(9)
    assert training.train_step(resumed, batch) == training.train_step(state, batch)
    assert resumed.scaler.state_dict() == state.scaler.state_dict()


def test_the_loop_does_not_count_skipped_batches():
    reports: list[tuple[int, dict]] = []
    batches = [1.0, float("nan"), float("nan"), 2.0, float("nan"), 3.0, 4.0]
    last = training.train_loop(lambda b: {"loss": b, "skipped": float(b != b)}, batches, 4,
                               on_report=lambda s, m: reports.append((s, m)), report_every=2)
    assert last == 4
    assert [(s, m["loss"], m["skipped"]) for s, m in reports] == [(2, 1.5, 0.0), (4, 3.5, 0.0)]


def test_max_nonfinite_steps_is_validated_and_left_out_of_the_config_hash():
    from ldmseg.config import config_hash

    with pytest.raises(ConfigError, match="train_ldm.max_nonfinite_steps must be >= 1, got 0"):
        training_cfg("train_ldm.max_nonfinite_steps=0")
    assert config_hash(training_cfg("train_ae.max_nonfinite_steps=5")) == config_hash(training_cfg())


def test_the_trainer_reports_the_skip_total_and_runs_its_iterations_in_applied_steps():
    from ldmseg.training.trainer import Reporter, Trainer

    class Collect(Reporter):
        def __init__(self) -> None:
            self.reports: list[tuple[int, dict]] = []

        def report(self, step, metrics):
            self.reports.append((step, metrics))

    cfg = training_cfg("train_ae.iterations=3", "train_ae.report_every=1", "train_ae.validate_images=0")
    state = TrainState.create("ae", cfg)
    state.seed_generator(0)
    poison = iter([False, True, False, False])
    param = next(p for p in state.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if next(poison) else g)
    batch = scene_batch(cfg, 4, seed=4)
    reporter = Collect()
    assert Trainer(state, iter([batch] * 4), reporter, save_checkpoints=False).run() == 3
    assert [(s, m["skipped_steps"]) for s, m in reporter.reports] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert all("skipped" not in m and "loss_scale" not in m for _, m in reporter.reports)
    assert state.step == 3 and state.lr_scheduler.last_epoch == 3
