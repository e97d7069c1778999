"""Training steps, losses, optimiser schedule, EMA and the training loop on tiny CPU models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ldmseg.models.build import build_components
from ldmseg.data.encoding import ids_to_bits, image_to_tensor
from ldmseg.data.resize import resize_pad
from ldmseg.data.slots import clean_segments, remap_ids
from ldmseg.data.synthetic import make_config, render_scene
from ldmseg import training
from ldmseg.diffusion.noise import make_train_scheduler, min_snr_weights, predict_x0, prediction_target
from helpers_batches import scene_batch
from helpers_config import tiny_cfg
from helpers_denoiser import RecordingDenoiser

# the tiny config, training fast enough that a few steps show learning
TRAINING = ("mask_ae.num_points=256", "train_ae.lr=3e-3", "train_ae.warmup=1", "train_ldm.lr=2e-3", "train_ldm.warmup=1")


def training_cfg(*overrides):
    return tiny_cfg(*TRAINING, *overrides)


def ldm_components(cfg, batch, seed: int = 0) -> training.LDMComponents:
    torch.manual_seed(seed)
    parts = build_components(cfg)
    mask_ae = parts["mask_autoencoder"].eval().requires_grad_(False)
    scale = training.measure_latent_scale(mask_ae, [batch], cfg.data.num_slots)
    return training.LDMComponents(parts["denoiser"], mask_ae, parts["image_encoder"], scale)


# --------------------------------------------------------------------------------------------
# Noise process
# --------------------------------------------------------------------------------------------


def test_min_snr_weights_follow_the_formula_per_prediction_type():
    cfg = training_cfg()
    sched = make_train_scheduler(cfg.diffusion)
    t = torch.tensor([0, 10, 100, 300, 999])
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}
    for kind, want in expected.items():
        got = min_snr_weights(sched, t, 5.0, kind)
        assert torch.allclose(got.double(), want, rtol=1e-5), kind
    eps = min_snr_weights(sched, t, 5.0, "epsilon")
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)  # low noise is down-weighted
    assert torch.equal(min_snr_weights(sched, t, None, "epsilon"), torch.ones(5))


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_predict_x0_inverts_the_target(kind):
    cfg = training_cfg(f"diffusion.prediction_type={kind}")
    sched = make_train_scheduler(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t = sched.add_noise(x0, noise, t)
    target = prediction_target(kind, x0, noise, t, sched.alphas_cumprod)
    if kind == "v_prediction":
        assert torch.allclose(target, sched.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.allclose(predict_x0(kind, target, x_t, t, sched.alphas_cumprod), x0, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Loss masking
# --------------------------------------------------------------------------------------------


def test_latent_weights_are_zero_only_on_all_void_cells():
    slot_map = torch.zeros(1, 8, 8, dtype=torch.int64)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    slot_map[0, 0, 0] = 3  # one segment pixel in cell (0, 0)
    slot_map[0, 4:8, 4:8] = 5  # a whole cell (1, 1)
    slot_map[0, 0, 7] = 2  # a segment pixel on padding in cell (0, 1)
    valid[0, :, 6:] = False
    w = training.latent_weights(slot_map, valid, 4)
    assert w.shape == (1, 1, 2, 2)
    assert w[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_masked_mse_ignores_targets_on_void_cells():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    weights = (torch.rand(2, 1, 4, 4, generator=g) > 0.4).float()
    snr_w = torch.tensor([0.5, 1.0])
    loss = training.masked_mse(pred, target, weights, snr_w)
    changed = target + 100.0 * (1 - weights)  # only void cells change
    assert training.masked_mse(pred, changed, weights, snr_w) == loss
    assert training.masked_mse(pred, target + 0.1 * weights, weights, snr_w) != loss
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(training.masked_mse(pred, target, ones, torch.ones(2)),
                          torch.nn.functional.mse_loss(pred, target))


def test_all_void_batch_gives_zero_loss():
    cfg = training_cfg()
    batch = scene_batch(cfg, 2)
    comps = ldm_components(cfg, batch)
    void = dict(batch, slot_map=torch.zeros_like(batch["slot_map"]))
    loss, parts = training.ldm_loss(comps, void, cfg, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and parts["void_cell_fraction"] == 1.0


# --------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------


def eval_loss(comps, batch, cfg) -> float:
    """The loss on fixed timesteps and noise (same generator seed every time)."""
    with torch.no_grad():
        losses = [training.ldm_loss(comps, batch, cfg, generator=torch.Generator().manual_seed(s))[0].item()
                  for s in range(4)]
    return float(np.mean(losses))


def test_ldm_loss_falls_on_a_fixed_batch():
    cfg = training_cfg("diffusion.self_condition_prob=0.5")
    batch = scene_batch(cfg, 8)
    comps = ldm_components(cfg, batch)
    optimizer, lr_sched = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    g = torch.Generator().manual_seed(0)
    start = eval_loss(comps, batch, cfg)
    fractions = []
    for _ in range(60):
        out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=g, lr_scheduler=lr_sched)
        fractions.append(out["self_condition_fraction"])
        assert math.isfinite(out["loss"]) and out["grad_norm"] > 0
    end = eval_loss(comps, batch, cfg)
    assert end < 0.7 * start, (start, end)
    assert 0.3 < np.mean(fractions) < 0.7  # self-conditioning on about half of the samples


@pytest.mark.parametrize("order", ["random", "raster"])
def test_raster_slot_order_makes_the_loss_blind_to_the_slot_permutation(order):
    cfg = training_cfg(f"diffusion.slot_order={order}")
    batch = scene_batch(cfg, 6, seed=3)
    other = scene_batch(cfg, 6, seed=3)  # the same scenes ...
    rng = np.random.default_rng(99)
    other["slot_map"] = torch.from_numpy(np.stack(  # ... with other random slots
        [remap_ids(m, cfg.data.num_slots, rng).slot_map for m in batch["slot_map"].numpy()]))
    assert not torch.equal(other["slot_map"], batch["slot_map"])
    comps = ldm_components(cfg, batch)
    losses = [float(training.ldm_loss(comps, b, cfg, generator=torch.Generator().manual_seed(0))[0])
              for b in (batch, other)]
    if order == "raster":
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    else:
        assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_self_conditioning_probability_extremes(prob):
    cfg = training_cfg(f"diffusion.self_condition_prob={prob}")
    batch = scene_batch(cfg, 4)
    comps = ldm_components(cfg, batch)
    optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=g)
        assert out["self_condition_fraction"] == prob and math.isfinite(out["loss"])


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_self_conditioning_pass_gets_the_first_passs_detached_x0(prob):
    """On the images chosen for self-conditioning a first pass without gradients (and without a
    self-conditioning input) gives x̂₀; the trained pass gets exactly that x̂₀, detached, on those
    images and zeros on the others (all of them when none is chosen)."""
    cfg = training_cfg(f"diffusion.self_condition_prob={prob}")
    batch = scene_batch(cfg, 6)
    comps = ldm_components(cfg, batch)
    comps.denoiser = stub = RecordingDenoiser()
    optimizer, _ = training.make_optimizer(stub.parameters(), cfg.train_ldm)
    out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(1))
    *first, trained = stub.calls
    assert trained["grad_enabled"] and trained["x0_self"] is not None
    assert not trained["x0_self_requires_grad"], "the self-conditioning input must be detached"
    expected = torch.zeros_like(trained["x_t"])
    chosen: list[int] = []
    if first:
        (pre,) = first
        assert not pre["grad_enabled"] and pre["x0_self"] is None
        # the chosen images: the rows of the trained pass's x_t that the first pass saw
        chosen = [j for j in range(6) if any(torch.equal(trained["x_t"][j], row) for row in pre["x_t"])]
        assert len(chosen) == len(pre["x_t"]) and torch.equal(pre["t"], trained["t"][chosen])
        alphas_cumprod = make_train_scheduler(cfg.diffusion).alphas_cumprod
        expected[chosen] = predict_x0(cfg.diffusion.prediction_type, pre["out"], pre["x_t"], pre["t"], alphas_cumprod)
    assert torch.equal(trained["x0_self"], expected), "self-conditioning input: x̂₀ on chosen images, zeros elsewhere"
    assert out["self_condition_fraction"] == len(chosen) / 6
    assert {0.0: len(chosen) == 0, 1.0: len(chosen) == 6}.get(prob, 0 < len(chosen) < 6)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
def test_other_prediction_types_and_aux_loss_train(kind):
    cfg = training_cfg(f"diffusion.prediction_type={kind}", "diffusion.ae_aux_weight=0.1")
    batch = scene_batch(cfg, 4)
    comps = ldm_components(cfg, batch)
    optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    before = [p.detach().clone() for p in comps.denoiser.parameters()]
    out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(0))
    assert out["aux_ce"] > 0 and out["loss"] > out["mse"]
    assert any(not torch.equal(b, p) for b, p in zip(before, comps.denoiser.parameters()))
    assert all(p.grad is None for p in comps.mask_ae.parameters())  # the AE stays frozen


def test_mixed_precision_bf16_on_cpu_and_fp16_fallback():
    batch = None
    for mode in ("bf16", "fp16"):
        cfg = training_cfg(f"train_ldm.mixed_precision={mode}")
        batch = batch if batch is not None else scene_batch(cfg, 2)
        comps = ldm_components(cfg, batch)
        optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training.optim._warned.clear()
            out = training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(0))
        assert math.isfinite(out["loss"])
        fell_back = any("fp16 needs a CUDA device" in str(w.message) for w in caught)
        assert fell_back == (mode == "fp16")


def test_ema_tracks_the_denoiser():
    cfg = training_cfg()
    batch = scene_batch(cfg, 2)
    comps = ldm_components(cfg, batch)
    comps.ema = training.make_ema(comps.denoiser, 0.9)
    start = [p.detach().clone() for p in comps.denoiser.parameters()]
    optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    for _ in range(3):
        training.ldm_train_step(comps, batch, optimizer, cfg, generator=torch.Generator().manual_seed(0))
    averaged = training.ema_copy(comps.denoiser, comps.ema)
    for p0, p, pe in zip(start, comps.denoiser.parameters(), averaged.parameters()):
        if not torch.equal(p0, p):  # the EMA lies strictly between the start and the current weights
            assert not torch.equal(pe, p) and not torch.equal(pe, p0)
    assert training.make_ema(comps.denoiser, None) is None


def test_ae_train_step_learns_and_latent_scale_normalises():
    cfg = training_cfg("mask_ae.latent_noise=0.1")
    batch = scene_batch(cfg, 8)
    torch.manual_seed(0)
    ae = build_components(cfg)["mask_autoencoder"]
    optimizer, lr_sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(0)
    losses = [training.ae_train_step(ae, batch, optimizer, cfg, generator=g, lr_scheduler=lr_sched)["loss"]
              for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    scale = training.measure_latent_scale(ae, [batch, batch], cfg.data.num_slots)
    with torch.no_grad():
        z = ae.encode(ids_to_bits(batch["slot_map"], 3))
    assert float((z * scale).std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Optimiser and loop
# --------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_constant_or_cosine():
    cfg = training_cfg("train_ldm.warmup=4", "train_ldm.iterations=20", "train_ldm.lr=1.0")
    w = torch.nn.Parameter(torch.zeros(1))
    for schedule in ("constant", "cosine"):
        cfg.train_ldm.lr_schedule = schedule
        opt, sched = training.make_optimizer([w], cfg.train_ldm)
        lrs = []
        for _ in range(20):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        if schedule == "constant":
            assert lrs[4:] == pytest.approx([1.0] * 16)
        else:
            assert lrs[4] == pytest.approx(1.0) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
            assert lrs[-1] < 0.02


def test_cosine_follows_the_time_budget_when_it_ends_the_run_first():
    cfg = training_cfg("train_ldm.warmup=4", "train_ldm.iterations=1000", "train_ldm.lr_schedule=cosine",
                   "train_ldm.time_budget_s=100")
    tc = cfg.train_ldm
    assert training.lr_factor(10, tc) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 996)))
    assert training.lr_factor(10, tc, elapsed_s=50.0) == pytest.approx(0.5)  # half the budget: half-way
    assert training.lr_factor(10, tc, elapsed_s=250.0) == pytest.approx(0.0)
    assert training.lr_factor(2, tc, elapsed_s=90.0) == pytest.approx(0.75)  # warm-up is by steps
    assert training.lr_factor(900, tc, elapsed_s=1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 896 / 996)))
    tc.time_budget_s = None
    assert training.lr_factor(10, tc, elapsed_s=50.0) == training.lr_factor(10, tc)


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


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_ae_train_step_mixes_in_random_maps(fraction):
    """``mask_ae.random_map_fraction`` replaces the last maps of the batch (the caller's batch is
    untouched): the step's segment count is that of the kept maps plus the procedural ones."""
    from ldmseg.data.random_maps import random_slot_maps

    cfg = training_cfg(f"mask_ae.random_map_fraction={fraction}")
    batch = scene_batch(cfg, 8)
    before = batch["slot_map"].clone()
    ae = build_components(cfg)["mask_autoencoder"]
    optimizer, _ = training.make_optimizer(ae.parameters(), cfg.train_ae)
    parts = training.ae_train_step(ae, batch, optimizer, cfg, generator=torch.Generator().manual_seed(5))
    n_random = round(8 * fraction)
    maps = random_slot_maps(n_random, 32, 8, min_area=10, generator=torch.Generator().manual_seed(5))
    kept = batch["slot_map"][: 8 - n_random]
    expected = sum(len(torch.unique(m[m > 0])) for m in [*kept, *maps])
    assert parts["num_segments"] == expected
    assert torch.equal(batch["slot_map"], before)
    with pytest.raises(Exception, match="random_map_fraction"):
        training_cfg("mask_ae.random_map_fraction=1.5")


# --------------------------------------------------------------------------------------------
# The engine: TrainState, train_step, Trainer
# --------------------------------------------------------------------------------------------


def test_engine_steps_are_the_step_functions_on_the_stage_built_from_its_seed(tmp_path):
    """TrainState.create + train_step give the losses of the step functions called by hand on
    modules built after seeding with the stage's seed (same RNG streams, same op order), and the
    resume file restores a state that continues identically."""
    from ldmseg.checkpoint import load_model, save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from ldmseg.training.state import TrainState

    cfg = training_cfg("train_ldm.ema_decay=0.9")
    batches = [scene_batch(cfg, 4, seed=s) for s in (3, 4, 5)]

    torch.manual_seed(cfg.train_ae.seed)
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    opt, sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(5)
    by_hand = [training.ae_train_step(ae, b, opt, cfg, generator=g, lr_scheduler=sched)["loss"] for b in batches]
    state = TrainState.create("ae", cfg)
    state.seed_generator(5)
    assert [training.train_step(state, b)["loss"] for b in batches] == by_hand and state.step == 3

    save_model(tmp_path / "ae", cfg, {"mask_autoencoder": ae}, latent_scale=1.5)
    torch.manual_seed(cfg.train_ldm.seed)
    mask_ae = load_model(tmp_path / "ae").components["mask_autoencoder"].requires_grad_(False)
    parts = build_components(cfg, mask_ae=mask_ae)
    comps = training.LDMComponents(parts["denoiser"], mask_ae, parts["image_encoder"], latent_scale=1.5)
    opt, sched = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    comps.ema = training.make_ema(comps.denoiser, cfg.train_ldm.ema_decay)
    g = torch.Generator().manual_seed(7)
    by_hand = [training.ldm_train_step(comps, b, opt, cfg, generator=g, lr_scheduler=sched)["loss"] for b in batches]
    state = TrainState.create("ldm", cfg, ae_model=str(tmp_path / "ae"))
    state.seed_generator(7)
    assert [training.train_step(state, b)["loss"] for b in batches[:2]] == by_hand[:2]
    state.save(tmp_path)
    resumed = TrainState.create("ldm", cfg, ae_model=str(tmp_path / "ae"))
    resumed.load(tmp_path)
    assert resumed.step == 2
    for s in (state, resumed):
        s.seed_generator(11)
    assert training.train_step(resumed, batches[2]) == training.train_step(state, batches[2])
    for a, b in zip(state.judged().parameters(), resumed.judged().parameters()):
        assert torch.equal(a, b)


def test_trainer_checkpoints_and_monitors_at_their_cadences(tmp_path):
    """The Trainer reports every report_every steps, monitors every validate_every steps and once
    with the final model, and checkpoints loadable model folders with the resume file."""
    from pathlib import Path

    from ldmseg.checkpoint import load_model
    from ldmseg.training.state import TRAINER_STATE, TrainState
    from ldmseg.training.trainer import Reporter, Trainer

    cfg = training_cfg("train_ae.iterations=4", "train_ae.report_every=2", "train_ae.checkpoint_every=3",
                   "train_ae.validate_every=2")
    batch = scene_batch(cfg, 4)
    seen: list[tuple] = []

    class Record(Reporter):
        def report(self, step, metrics):
            seen.append(("report", step, metrics["world_size"]))

        def monitored(self, step, metrics, panel):
            seen.append(("monitor", step, panel.dtype))

        def checkpoint(self, step, metrics, folder):
            model = load_model(folder)
            assert (Path(folder) / TRAINER_STATE).is_file()
            seen.append(("checkpoint", step, model.meta["extra"]["final"], metrics["latent_scale"] > 0))

    state = TrainState.create("ae", cfg)
    assert Trainer(state, iter(lambda: batch, None), Record(), monitor_batch=batch).run() == 4
    assert seen == [("report", 2, 1), ("monitor", 2, np.uint8), ("checkpoint", 3, False, True),
                    ("report", 4, 1), ("monitor", 4, np.uint8), ("checkpoint", 4, True, True)]
