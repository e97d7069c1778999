"""The noise process (ldmseg.diffusion.noise): min-SNR loss weights and x₀ from each prediction type."""

from __future__ import annotations

import pytest
import torch

from ldmseg.diffusion.noise import make_train_scheduler, min_snr_weights, predict_x0, prediction_target
from helpers_training import training_cfg


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
