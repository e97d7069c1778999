"""The denoiser from a Stable-Diffusion-style UNet: widened conv_in, cross-attention stripped, COCO size."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from paths import COCO_YAML
from ldmseg.config import DenoiserConfig, load_config
from ldmseg.models.denoiser import build_denoiser
from helpers_models import n_params, tiny_sd_unet


def test_denoiser_from_stable_diffusion_unet(tmp_path):
    from ldmseg.models.stable_diffusion import strip_cross_attention, widen_conv_in

    unet = tiny_sd_unet()
    unet.save_pretrained(str(tmp_path / "unet"))
    cfg = DenoiserConfig(kind="stable-diffusion", pretrained=str(tmp_path), subfolder="unet",
                         image_stem_channels=0, self_condition=True, freeze_time_embedding=True)
    den = build_denoiser(cfg, latent_channels=4, image_channels=4, sample_size=8)

    conv = den.unet.conv_in
    assert conv.in_channels == 12 and den.unet.config.in_channels == 12
    assert torch.equal(conv.weight[:, :4], unet.conv_in.weight)
    assert torch.count_nonzero(conv.weight[:, 4:]) == 0
    assert torch.equal(conv.bias, unet.conv_in.bias)
    names = [name for name, _ in den.unet.named_parameters()]
    assert not any("transformer_blocks" in n and (".attn2." in n or ".norm2." in n) for n in names)
    cross = sum(p.numel() for n, p in unet.named_parameters() if "transformer_blocks" in n and (".attn2." in n or ".norm2." in n))
    assert cross > 0
    assert n_params(den) == n_params(unet) - cross + 8 * conv.out_channels * 9
    assert not any(p.requires_grad for p in den.unet.time_embedding.parameters())
    widen_conv_in(den.unet, 12, copy_channels=4)  # an already widened UNet keeps its weights
    assert den.unet.conv_in is conv

    # zero-initialised extra channels: the output is the (text-free) pretrained UNet's on x_t alone
    x_t, img, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 700])
    out = den(x_t, t, img, x0)
    from diffusers.models.attention import BasicTransformerBlock

    reference = copy.deepcopy(unet)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in reference.modules())
    assert blocks >= 3 and strip_cross_attention(reference) == blocks
    with torch.no_grad():
        expected = reference(x_t, t, encoder_hidden_states=None).sample
    assert torch.allclose(out, expected, atol=1e-5)

    # no path from text to the output is left
    x = torch.cat([x_t, img, x0], dim=1)
    with torch.no_grad():
        a = den.unet(x, t, encoder_hidden_states=torch.randn(2, 3, 12)).sample
        b = den.unet(x, t, encoder_hidden_states=torch.randn(2, 5, 12)).sample
    assert torch.equal(a, b) and torch.allclose(a, out, atol=1e-6)


def test_denoiser_stable_diffusion_from_config_on_meta():
    coco = load_config(COCO_YAML)
    with torch.device("meta"):
        den = build_denoiser(coco.denoiser, latent_channels=4, image_channels=4, sample_size=64, load_pretrained=False)
    assert den.unet.conv_in.in_channels == 12
    assert abs(n_params(den) - 815e6) <= 0.01 * 815e6
    with pytest.raises(ValueError, match="sd_config"):
        build_denoiser(dataclasses.replace(coco.denoiser, sd_config=None, pretrained="some/hub-id"), 4, 4, 64,
                       load_pretrained=False)
