"""``ldmseg model-summary``: parameter counts per component, on the meta device."""

from __future__ import annotations

import json

import torch

from paths import COCO_YAML, TINY_YAML
from pipelines.cli import main
from ldmseg.config import load_config
from ldmseg.models.denoiser import build_denoiser
from ldmseg.models.image_encoder import ImageEncoder
from ldmseg.models.mask_autoencoder import MaskAutoencoder



def _summary_json(capsys, *args: str) -> dict:
    assert main(["model-summary", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_coco_counts_match_the_paper(capsys):
    counts = _summary_json(capsys, "--config", str(COCO_YAML))
    assert set(counts) == {"mask_autoencoder", "image_encoder", "denoiser"}
    ae, image, den = counts["mask_autoencoder"], counts["image_encoder"], counts["denoiser"]
    assert abs(ae["total"] - 2.0e6) <= 0.03 * 2.0e6 and ae["trainable"] == ae["total"]
    assert abs(den["total"] - 815e6) <= 0.01 * 815e6
    # SD's frozen time-embedding MLP: 320 -> 1280 -> 1280 (weights and biases)
    c0 = 320
    assert den["total"] - den["trainable"] == c0 * 4 * c0 + 4 * c0 + (4 * c0) ** 2 + 4 * c0
    assert image["trainable"] == 0 and 80e6 < image["total"] < 90e6  # SD v1.x VAE: 83.7 M
    assert torch.empty(1).device.type == "cpu"  # the meta device was only a context


def test_coco_human_output_says_nothing_was_loaded(capsys):
    assert main(["model-summary", "--config", str(COCO_YAML)]) == 0
    out = capsys.readouterr().out
    assert "meta device" in out and "not loaded" in out
    for name in ("mask_autoencoder", "image_encoder", "denoiser"):
        assert name in out


def test_tiny_counts_equal_the_real_models(capsys):
    counts = _summary_json(capsys, "--config", str(TINY_YAML))
    cfg = load_config(TINY_YAML)
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    image = ImageEncoder.from_config(cfg.image_encoder)
    den = build_denoiser(cfg.denoiser, ae.latent_channels, image.out_channels, cfg.data.resolution // 4)
    for name, model in (("mask_autoencoder", ae), ("image_encoder", image), ("denoiser", den)):
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[name] == {"total": total, "trainable": trainable}
    assert counts["image_encoder"]["trainable"] == 0 < counts["image_encoder"]["total"]


def test_overrides_change_counts(capsys):
    conf = str(TINY_YAML)
    base = _summary_json(capsys, "--config", conf)
    wider = _summary_json(capsys, "--config", conf, "mask_ae.widths=[16,32,128]", "image_encoder.kind=pixel_unshuffle")
    assert wider["mask_autoencoder"]["total"] > base["mask_autoencoder"]["total"]
    assert wider["image_encoder"] == {"total": 0, "trainable": 0}
    # 48 raw pixel channels instead of 4 latent channels into the image stem
    assert wider["denoiser"]["total"] > base["denoiser"]["total"]


def test_bad_override_is_reported(capsys):
    assert main(["model-summary", "--config", str(TINY_YAML), "mask_ae.nope=1"]) == 2
    assert "mask_ae.nope" in capsys.readouterr().err
