"""The tiny config set up to train fast, and the LDM stage's components built from it."""

from __future__ import annotations

import torch

from ldmseg.models.build import build_components
from ldmseg import training
from helpers_config import tiny_cfg

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
