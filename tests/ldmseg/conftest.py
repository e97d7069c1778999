"""Fixtures of the method-layer tests: a small trained model folder, the Segmenter loaded from it, and the
real COCO samples read whole."""

from __future__ import annotations

import pytest
import torch

from ldmseg.checkpoint import build_components, save_model
from ldmseg import training
from ldmseg.segmenter import Segmenter
from helpers_batches import scene_batch
from helpers_maps import load_folder
from helpers_segmenter import vae_tiny_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model folder: mask AE trained for 80 steps (so decoded maps have segments), random denoiser."""
    cfg = vae_tiny_cfg()
    torch.manual_seed(0)
    parts = build_components(cfg)
    ae = parts["mask_autoencoder"]
    batch = scene_batch(cfg, 8, slot_seed=0)
    optimizer, sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        training.ae_train_step(ae, batch, optimizer, cfg, generator=g, lr_scheduler=sched)
    ae.eval()
    scale = training.measure_latent_scale(ae, [batch], cfg.data.num_slots)
    folder = tmp_path_factory.mktemp("model") / "ldm"
    save_model(folder, cfg, parts, latent_scale=scale, extra={"stage": "ldm", "step": 80})
    return folder, cfg, parts, scale


@pytest.fixture(scope="module")
def segmenter(trained):
    return Segmenter.from_pretrained(trained[0], device="cpu")


@pytest.fixture(scope="module")
def real_samples(coco_sample, coco_val_examples) -> list[dict]:
    return load_folder(coco_sample) + load_folder(coco_val_examples)
