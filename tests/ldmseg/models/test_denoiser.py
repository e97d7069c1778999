"""The denoiser from scratch (a UNet2D): shapes, inputs, self-conditioning and options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldmseg.config import DenoiserConfig
from ldmseg.models.denoiser import Denoiser, build_denoiser
from helpers_models import TINY, n_params


def _small_unet_cfg(**kw) -> DenoiserConfig:
    return dataclasses.replace(TINY.denoiser, block_out_channels=(16, 32), attention_head_dim=8, **kw)


def test_denoiser_unet2d_shapes_and_inputs():
    torch.manual_seed(0)
    den = build_denoiser(_small_unet_cfg(), latent_channels=4, image_channels=6, sample_size=8)
    assert isinstance(den, Denoiser)
    assert (den.latent_channels, den.image_channels, den.self_condition) == (4, 6, True)
    assert den.in_channels == 4 + TINY.denoiser.image_stem_channels + 4
    assert den.unet.conv_in.in_channels == den.in_channels
    x_t, img, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    out = den(x_t, t, img, None)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, den(x_t, t, img, torch.zeros_like(x0)))  # absent x̂₀ = zeros
    assert not torch.allclose(out, den(x_t, t, img, x0))
    assert not torch.allclose(out, den(x_t, t, img + 1.0, None))  # the image matters
    assert not torch.allclose(out, den(x_t, torch.tensor([500, 900]), img, None))
    with pytest.raises(ValueError, match="image_latent"):
        den(x_t, t, torch.randn(2, 6, 4, 4), None)


def test_denoiser_unet2d_options():
    raw = build_denoiser(_small_unet_cfg(image_stem_channels=0, self_condition=False), 4, 6, 8)
    assert raw.image_stem is None and raw.in_channels == 4 + 6
    with pytest.raises(ValueError, match="self-conditioning"):
        raw(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 6, 8, 8), torch.randn(1, 4, 8, 8))
    frozen = build_denoiser(_small_unet_cfg(freeze_time_embedding=True, gradient_checkpointing=True), 4, 6, 8)
    assert not any(p.requires_grad for p in frozen.unet.time_embedding.parameters())
    assert frozen.unet.is_gradient_checkpointing
    trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    assert trainable == n_params(frozen) - n_params(frozen.unet.time_embedding)
    attn = [name for name, _ in frozen.unet.named_modules() if name.endswith("attentions.0")]
    assert any(n.startswith("down_blocks.1") for n in attn) and not any(n.startswith("down_blocks.0") for n in attn)
    with pytest.raises(ValueError, match="attention_levels"):
        build_denoiser(_small_unet_cfg(attention_levels=(True,)), 4, 6, 8)
