"""The image encoder: an AutoencoderKL from config or a pretrained folder, and pixel unshuffle."""

from __future__ import annotations

import dataclasses

import torch

from ldmseg.config import ImageEncoderConfig
from ldmseg.models.image_encoder import ImageEncoder
from helpers_models import TINY, n_params


def _tiny_vae_cfg(**kw) -> ImageEncoderConfig:
    return dataclasses.replace(TINY.image_encoder, block_out_channels=(8, 16, 16), **kw)


def test_image_encoder_from_config_is_frozen_and_deterministic():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = ImageEncoder.from_config(_tiny_vae_cfg())
    assert (enc.downsample_factor, enc.out_channels) == (4, 4)
    assert n_params(enc) > 0 and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    latent = enc.encode(images)
    assert latent.shape == (2, 4, 8, 8) and latent.dtype == torch.float32
    torch.manual_seed(123)  # the global RNG does not change the from-config weights
    assert torch.equal(ImageEncoder.from_config(_tiny_vae_cfg()).encode(images), latent)
    expected = enc.vae.encode(images).latent_dist.mean * TINY.image_encoder.scaling_factor
    assert torch.allclose(latent, expected)


def test_image_encoder_from_pretrained_folder(tmp_path):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = ImageEncoder.from_config(_tiny_vae_cfg(scaling_factor=0.5))
    # a plain save_pretrained layout, as in a Stable Diffusion repository (subfolder "vae")
    enc.vae.save_pretrained(str(tmp_path / "sd" / "vae"))
    cfg = ImageEncoderConfig(pretrained=str(tmp_path / "sd"), subfolder="vae", scaling_factor=0.5)
    loaded = ImageEncoder.from_config(cfg)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(images), enc.encode(images))
    with torch.device("meta"):  # shape only, from the local config.json
        shaped = ImageEncoder.from_config(cfg, load_pretrained=False)
    assert n_params(shaped) == n_params(enc)


def test_pixel_unshuffle_encoder(tmp_path):
    cfg = ImageEncoderConfig(kind="pixel_unshuffle", downsample_factor=4)
    enc = ImageEncoder.from_config(cfg)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latent = enc.encode(images)
    assert enc.out_channels == 48 and latent.shape == (2, 48, 8, 8) and n_params(enc) == 0
    assert torch.equal(torch.nn.functional.pixel_shuffle(latent, 4), images)
