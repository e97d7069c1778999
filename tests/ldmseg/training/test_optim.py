"""Optimiser and its helpers (ldmseg.training.optim): the learning-rate schedule, mixed precision, EMA."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ldmseg import precision, training
from helpers_batches import scene_batch
from helpers_training import ldm_components, training_cfg


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


def test_mixed_precision_bf16_on_cpu_and_fp16_fallback():
    batch = None
    for mode in ("bf16", "fp16"):
        cfg = training_cfg(f"train_ldm.mixed_precision={mode}")
        batch = batch if batch is not None else scene_batch(cfg, 2)
        comps = ldm_components(cfg, batch)
        optimizer, _ = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            precision._warned.clear()
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
