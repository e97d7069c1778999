"""The tiny config with a small AutoencoderKL image encoder and the synthetic scenes the model-folder,
Segmenter and monitoring tests use."""

from __future__ import annotations

from ldmseg.data.synthetic import make_config, render_scene
from helpers_config import tiny_cfg

# the tiny config with a small AutoencoderKL image encoder, so model folders store and reload one
VAE_TINY = ("image_encoder.kind=autoencoder_kl", "image_encoder.block_out_channels=[8,16,16]", "mask_ae.num_points=256",
            "train_ae.lr=3e-3", "train_ae.warmup=1", "sampling.steps=3", "sampling.count_th=0.01")


def vae_tiny_cfg(*overrides):
    return tiny_cfg(*VAE_TINY, *overrides)


def scenes(n: int, size: int = 32, seed: int = 3, **knobs):
    return [render_scene(make_config(n, size=size, seed=seed, max_things=4, **knobs), i) for i in range(n)]
