"""Model folders (safetensors + JSON): contents, bit-identical round trips, pretrained sources, URLs, errors."""

from __future__ import annotations

import json

import pytest
import torch

from ldmseg.checkpoint import load_model, save_model
from ldmseg.segmenter import Segmenter
from helpers_segmenter import scenes, vae_tiny_cfg


def test_model_folder_is_json_and_safetensors(trained):
    folder, cfg, parts, scale = trained
    assert sorted(p.name for p in folder.iterdir()) == [
        "denoiser.safetensors", "image_encoder.safetensors", "mask_autoencoder.safetensors", "model.json"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["num_slots"] == 8 and meta["step"] == 80
    assert meta["latent_scale"] == pytest.approx(scale) and meta["config"]["data"]["resolution"] == 32
    assert set(meta["components"]) == {"mask_autoencoder", "image_encoder", "denoiser"}


def test_round_trip_is_bit_identical(trained, segmenter):
    folder, cfg, parts, scale = trained
    loaded = load_model(folder)
    for name, module in parts.items():
        ref = module.state_dict()
        got = loaded.components[name].state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert loaded.cfg == cfg and loaded.latent_scale == pytest.approx(scale)
    original = Segmenter(cfg, parts["mask_autoencoder"], parts["image_encoder"], parts["denoiser"], scale)
    images = [s.image for s in scenes(2, size=40, seed=9)]
    a = original.segment(images, seed=5)
    b = segmenter.segment(images, seed=5)
    for ra, rb in zip(a, b):
        assert torch.equal(torch.from_numpy(ra.id_map), torch.from_numpy(rb.id_map)) and ra.segments == rb.segments
    prep = [segmenter.prepare(im)[0] for im in images]
    assert torch.equal(original._sample(prep, [5, 5], cfg.sampling), segmenter._sample(prep, [5, 5], cfg.sampling))


def test_pretrained_image_encoder_is_stored_by_source(trained, tmp_path):
    folder, cfg, parts, scale = trained
    parts["image_encoder"].vae.save_pretrained(str(tmp_path / "vae"))
    cfg2 = vae_tiny_cfg(f"image_encoder.pretrained={tmp_path / 'vae'}")
    save_model(tmp_path / "m", cfg2, parts, latent_scale=scale)
    assert not (tmp_path / "m" / "image_encoder.safetensors").exists()
    entry = json.loads((tmp_path / "m" / "model.json").read_text())["components"]["image_encoder"]
    assert entry["source"] == str(tmp_path / "vae") and entry["weights"] is None
    loaded = load_model(tmp_path / "m")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.components["image_encoder"].encode(image), parts["image_encoder"].encode(image))


def test_fsspec_url_round_trip(trained):
    folder, cfg, parts, scale = trained
    url = "memory://ldmseg-test/models/ldm"
    save_model(url, cfg, parts, latent_scale=scale)
    loaded = load_model(url)
    ref = parts["denoiser"].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.components["denoiser"].state_dict().items())


def test_loading_errors_name_the_problem(trained, tmp_path):
    folder, cfg, parts, scale = trained
    save_model(tmp_path / "m", cfg, {"mask_autoencoder": parts["mask_autoencoder"]}, latent_scale=scale)
    with pytest.raises(ValueError, match="needs a model saved with both"):
        Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    (tmp_path / "m" / "mask_autoencoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mask_autoencoder"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown component"):
        save_model(tmp_path / "x", cfg, {"unet": parts["denoiser"]}, latent_scale=scale)
