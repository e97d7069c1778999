"""``ldmseg model-summary``: parameter counts per component on the meta device, and per training
stage the fixed memory per GPU and the checkpoint size (:mod:`ldmseg.memory`)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers_batches import scene_batch
from paths import COCO_YAML, TINY_YAML
from pipelines.cli import main
from ldmseg.config import load_config
from ldmseg.models.denoiser import build_denoiser
from ldmseg.models.image_encoder import ImageEncoder
from ldmseg.models.mask_autoencoder import MaskAutoencoder
from ldmseg.training.state import TrainState
from ldmseg.training.steps import train_step
from ldmseg.training.trainer import Reporter, Trainer

# conf/coco.yaml, pinned: the mask AE, SD v1.x's VAE (frozen) and SD v1.x's UNet with a 12-channel
# conv_in and its time-embedding MLP frozen
COCO_AE = 2_023_208
COCO_IMAGE = 83_653_863
COCO_DENOISER = 815_556_484
COCO_DENOISER_TRAINABLE = 813_505_924


def _summary(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["model-summary", *args, "--json"]) == 0
    return json.loads(out.getvalue())  # exactly one JSON object, nothing else on stdout


def _summary_json(capsys, *args: str) -> dict:
    assert main(["model-summary", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def coco() -> dict:
    return _summary("--config", str(COCO_YAML))


def test_coco_counts_match_the_paper(coco):
    counts = coco["components"]
    assert set(counts) == {"mask_autoencoder", "image_encoder", "denoiser"}
    ae, image, den = counts["mask_autoencoder"], counts["image_encoder"], counts["denoiser"]
    assert abs(ae["total"] - 2.0e6) <= 0.03 * 2.0e6 and ae["trainable"] == ae["total"]
    assert abs(den["total"] - 815e6) <= 0.01 * 815e6
    # SD's frozen time-embedding MLP: 320 -> 1280 -> 1280 (weights and biases)
    c0 = 320
    assert den["total"] - den["trainable"] == c0 * 4 * c0 + 4 * c0 + (4 * c0) ** 2 + 4 * c0
    assert image["trainable"] == 0 and 80e6 < image["total"] < 90e6  # SD v1.x VAE: 83.7 M
    assert torch.empty(1).device.type == "cpu"  # the meta device was only a context


def test_coco_table_is_pinned(coco):
    """The coco table against arithmetic of its own: 4 bytes per fp32 number."""
    assert coco["components"] == {
        "mask_autoencoder": {"total": COCO_AE, "trainable": COCO_AE},
        "image_encoder": {"total": COCO_IMAGE, "trainable": 0},
        "denoiser": {"total": COCO_DENOISER, "trainable": COCO_DENOISER_TRAINABLE}}
    ae, ldm = coco["stages"]["ae"], coco["stages"]["ldm"]

    # AE stage, 1 GPU, no EMA, fp32: weights + gradients + 2 AdamW moments = 16 bytes a parameter
    assert (ae["total_params"], ae["trainable_params"]) == (COCO_AE, COCO_AE)
    assert ae["gpu_bytes"] == 16 * COCO_AE and ae["host_bytes"] == 0
    # LDM stage, 8 GPUs: every module's fp32 weights; per trainable parameter its gradient, 2
    # moments, the EMA shadow and DDP's bucket copy of the gradient; a GradScaler (fp16 via auto)
    everything = COCO_AE + COCO_IMAGE + COCO_DENOISER
    assert (ldm["total_params"], ldm["trainable_params"]) == (everything, COCO_DENOISER_TRAINABLE)
    assert ldm["gpu_bytes"] == 4 * everything + (4 + 8 + 4 + 4) * COCO_DENOISER_TRAINABLE + 8
    assert 18.5 < ldm["gpu_gib"] < 18.52

    # checkpoints: the model folder (the mask AE, the denoiser's EMA weights; the pretrained VAE
    # is not bundled) + trainer_state.pt (the raw denoiser, 2 moments; the EMA is the model
    # folder's denoiser, written once), within file headers
    files = {item["name"]: item["bytes"] for item in ldm["checkpoint"]}
    assert set(files) == {"model.json", "mask_autoencoder.safetensors", "denoiser.safetensors", "trainer_state.pt"}
    assert files["denoiser.safetensors"] == pytest.approx(4 * COCO_DENOISER, rel=1e-3)
    assert files["trainer_state.pt"] == pytest.approx(4 * COCO_DENOISER + 8 * COCO_DENOISER_TRAINABLE, rel=1e-3)
    assert ldm["checkpoint_bytes"] == pytest.approx(4 * (COCO_AE + 2 * COCO_DENOISER)
                                                    + 8 * COCO_DENOISER_TRAINABLE, rel=1e-3)
    assert ae["checkpoint_bytes"] == pytest.approx(4 * COCO_AE + 12 * COCO_AE, rel=1e-2)
    # run storage: num_to_keep (2) checkpoints and the one being written
    assert ldm["storage_checkpoints"] == 3 and ldm["storage_bytes"] == 3 * ldm["checkpoint_bytes"]


def test_ema_on_cpu_saves_4_bytes_per_trainable_parameter(coco):
    moved = _summary("--config", str(COCO_YAML), "train_ldm.ema_on_cpu=true")["stages"]["ldm"]
    ldm = coco["stages"]["ldm"]
    assert ldm["gpu_bytes"] - moved["gpu_bytes"] == 4 * COCO_DENOISER_TRAINABLE
    # on the host: the shadow and the buffers the weights are copied into for each update
    assert moved["host_bytes"] == 8 * COCO_DENOISER_TRAINABLE
    # the shadow is saved either way (model.json holds the config: "true" is a character shorter)
    assert moved["checkpoint_bytes"] == pytest.approx(ldm["checkpoint_bytes"], abs=8)


def test_coco_human_output_says_nothing_was_loaded_and_what_is_left_out(capsys):
    assert main(["model-summary", "--config", str(COCO_YAML)]) == 0
    out = capsys.readouterr().out
    assert "meta device" in out and "not loaded" in out
    for name in ("mask_autoencoder", "image_encoder", "denoiser", "stage ae", "stage ldm", "trainer_state.pt"):
        assert name in out
    assert "activations are excluded" in out and "GiB" in out
    assert f"{COCO_DENOISER_TRAINABLE:,}" in out


def test_tiny_counts_equal_the_real_models(capsys):
    counts = _summary_json(capsys, "--config", str(TINY_YAML))["components"]
    cfg = load_config(TINY_YAML)
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    image = ImageEncoder.from_config(cfg.image_encoder)
    den = build_denoiser(cfg.denoiser, ae.latent_channels, image.out_channels, cfg.data.resolution // 4)
    for name, model in (("mask_autoencoder", ae), ("image_encoder", image), ("denoiser", den)):
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[name] == {"total": total, "trainable": trainable}
    assert counts["image_encoder"]["trainable"] == 0 < counts["image_encoder"]["total"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)


class _Keep(Reporter):
    """Copies each checkpoint folder the trainer hands over to ``dest``."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def checkpoint(self, step, metrics, folder):
        shutil.copytree(folder, self.dest)


def test_tiny_estimates_match_real_modules_and_files(tmp_path: Path, capsys):
    """Real tiny stages on CPU after one training step: the per-GPU figure equals the bytes of the
    tensors the state holds, and the checkpoint estimate the files the Trainer writes (within 1 %)."""
    stages = _summary_json(capsys, "--config", str(TINY_YAML))["stages"]
    cfg = load_config(TINY_YAML)
    batch = scene_batch(cfg, 2)
    for stage in ("ae", "ldm"):
        state = TrainState.create(stage, cfg, ae_model=str(tmp_path / "ae") if stage == "ldm" else None)
        state.seed_generator(0)
        train_step(state, batch)  # AdamW's moments exist from the first step on
        Trainer(state, iter(lambda: batch, None), _Keep(tmp_path / stage)).save(1, {}, final=True)

        on_device = [state.model] if stage == "ae" else [state.components.mask_ae, state.components.image_encoder,
                                                        state.model]
        held = sum(_tensor_bytes(m.state_dict().values()) for m in on_device)
        trainable = [p for p in state.model.parameters() if p.requires_grad]
        held += _tensor_bytes(p.grad for p in trainable)
        held += _tensor_bytes(v for s in state.optimizer.state.values() for v in s.values())  # moments, not steps
        if state.ema is not None:
            held += _tensor_bytes(state.ema.shadow_params)
        record = stages[stage]
        assert record["gpu_bytes"] == held  # tiny: 1 worker, float32 on CPU, no GradScaler
        assert record["trainable_params"] == sum(p.numel() for p in trainable)

        real = {f.name: f.stat().st_size for f in (tmp_path / stage).iterdir()}
        estimated = {item["name"]: item["bytes"] for item in record["checkpoint"]}
        assert set(estimated) == set(real)
        for name, size in real.items():
            assert estimated[name] == pytest.approx(size, rel=0.01, abs=2048), name
        assert record["checkpoint_bytes"] == pytest.approx(sum(real.values()), rel=0.01)
    # the tiny image encoder is built from config, so it is bundled (a pretrained one is not)
    assert (tmp_path / "ldm" / "image_encoder.safetensors").is_file()


def test_overrides_change_counts(capsys):
    conf = str(TINY_YAML)
    base = _summary_json(capsys, "--config", conf)["components"]
    wider = _summary_json(capsys, "--config", conf, "mask_ae.widths=[16,32,128]",
                          "image_encoder.kind=pixel_unshuffle")
    assert wider["components"]["mask_autoencoder"]["total"] > base["mask_autoencoder"]["total"]
    assert wider["components"]["image_encoder"] == {"total": 0, "trainable": 0}
    # 48 raw pixel channels instead of 4 latent channels into the image stem
    assert wider["components"]["denoiser"]["total"] > base["denoiser"]["total"]
    # pixel_unshuffle has no weights to save
    assert "image_encoder.safetensors" not in {i["name"] for i in wider["stages"]["ldm"]["checkpoint"]}


def test_bad_override_is_reported(capsys):
    assert main(["model-summary", "--config", str(TINY_YAML), "mask_ae.nope=1"]) == 2
    assert "mask_ae.nope" in capsys.readouterr().err
