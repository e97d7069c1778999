"""Training-time monitoring (ldmseg.training.monitor): panels, AE reconstruction scores, sampled validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmseg.data.encoding import bits_to_ids, ids_to_bits, tensor_to_image
from ldmseg.segmenter import Segmenter
from helpers_batches import scene_batch
from helpers_coco import score_id_maps
from helpers_segmenter import vae_tiny_cfg


def test_colorize_and_overlay_panel():
    from ldmseg.training.monitor import colorize, overlay_panel

    ids = np.arange(65).reshape(5, 13)
    rgb = colorize(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 13, 3)
    assert (rgb[0, 0] == 0).all()  # void is black
    colours = {tuple(c) for c in rgb.reshape(-1, 3)[1:]}
    assert len(colours) == 64  # 64 ids, 64 colours
    image = np.full((32, 32, 3), 7, np.uint8)
    panel = overlay_panel([image, image], [ids[:1, :1].repeat(32, 0).repeat(32, 1)] * 2,
                          [np.ones((32, 32), int)] * 2, min_size=128, gap=2)
    assert panel.shape == (2 * 130 - 2, 3 * 130 - 2, 3)
    assert (panel[:128, :128] == 7).all() and (panel[:128, 128:130] == 255).all()
    assert (panel[:128, 130:258] == 0).all()  # the all-void GT tile
    assert (panel[:128, 260:] == colorize(np.array([[1]]))[0, 0]).all()


def test_monitor_ae_scores_reconstructions(trained):
    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from ldmseg.training.monitor import monitor_ae

    _, cfg, parts, _ = trained
    batch = scene_batch(cfg, 8, slot_seed=0)  # the batch the AE was trained on
    good, panel = monitor_ae(parts["mask_autoencoder"], batch, cfg)
    torch.manual_seed(5)
    bad, _ = monitor_ae(MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots), batch, cfg)
    assert set(good) == {"val_recon_pq", "val_recon_sq", "val_recon_rq", "val_recon_fp_per_image"}
    assert good["val_recon_pq"] > 0.6 > bad["val_recon_pq"]
    assert panel.shape == (8 * 130 - 2, 3 * 130 - 2, 3) and panel.dtype == np.uint8


class OracleDenoiser(torch.nn.Module):
    """Predicts x₀ (prediction type ``sample``): the scaled AE latent of the ground truth of the
    image whose latent is nearest to the one it is shown; no self-conditioning input."""

    self_condition = False

    def __init__(self, image_latents: torch.Tensor, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("keys", image_latents.flatten(1))
        self.register_buffer("x0", x0)
        self.unused = torch.nn.Parameter(torch.zeros(()))  # callers look up the device of a parameter

    def forward(self, x_t, t, image_latent, x0_self=None):
        nearest = torch.cdist(image_latent.flatten(1), self.keys).argmin(dim=1)
        return self.x0[nearest]


def check_validation_by_hand(metrics: dict, panel: np.ndarray, segmenter: Segmenter, batch: dict, seed: int,
                             steps: int, root) -> dict:
    """``monitor_ldm``'s figures and panel against the same sampling done here (seed + i per image),
    the predictions cut to the valid pixels, written as COCO folders with the ground truth and
    scored by the folder evaluator; returns the by-hand scores."""
    n = len(batch["image"])
    valid = batch["valid"].numpy()
    truth = [np.where(v, s, 0) for s, v in zip(batch["slot_map"].numpy(), valid)]
    images = [tensor_to_image(im) for im in batch["image"]]
    results = segmenter.segment(images, steps=steps, seed=[seed + i for i in range(n)])
    preds = [np.where(v, r.id_map, 0) for r, v in zip(results, valid)]
    by_hand = score_id_maps(root, truth, preds)
    assert by_hand["tp"] + by_hand["fn"] == sum(len(np.unique(t[t > 0])) for t in truth)  # every GT segment
    assert by_hand["tp"] + by_hand["fp"] == sum(len(np.unique(p[p > 0])) for p in preds) > 0
    for k in ("pq", "sq", "rq"):
        assert metrics[f"val_{k}"] == pytest.approx(by_hand[k], abs=1e-12), k
    assert metrics["val_fp_per_image"] == by_hand["fp"] / n
    # the panel shows those predictions: its third column is their colouring (32 px tiles shown at 128)
    from ldmseg.training.monitor import colorize

    assert panel.shape == (n * 130 - 2, 3 * 130 - 2, 3)
    for row, pred in enumerate(preds):
        assert np.array_equal(panel[row * 130:row * 130 + 128:4, 260::4], colorize(pred)), row
    return by_hand


def test_monitor_ldm_perfect_and_sampled(trained, tmp_path):
    from ldmseg.training import monitor

    _, cfg, parts, scale = trained
    batch = scene_batch(cfg, 4, slot_seed=0)
    # the scoring itself: the ground truth as prediction scores PQ 1 with no false positives
    truth = [np.where(v, s, 0) for s, v in zip(batch["slot_map"].numpy(), batch["valid"].numpy())]
    segs = [[{"id": int(i)} for i in np.unique(t) if i] for t in truth]
    metrics, _, _ = monitor._score(batch, truth, segs, "val")
    assert metrics["val_pq"] == pytest.approx(1.0) and metrics["val_fp_per_image"] == 0
    parts["denoiser"].train()
    args = (parts["mask_autoencoder"], parts["image_encoder"], parts["denoiser"], scale, batch, cfg)
    first, panel = monitor.monitor_ldm(*args, steps=2, seed=3)
    again, _ = monitor.monitor_ldm(*args, steps=2, seed=3)
    assert first == again  # seeded
    assert parts["denoiser"].training  # the caller's mode is restored
    # the random denoiser: PQ 0, but its false positives are counted
    seg = Segmenter(cfg, parts["mask_autoencoder"], parts["image_encoder"], parts["denoiser"], scale)
    check_validation_by_hand(first, panel, seg, batch, 3, 2, tmp_path / "random")
    parts["denoiser"].eval()
    # a denoiser that knows the answer: the figures are the AE's reconstructions scored
    oracle_cfg = vae_tiny_cfg("diffusion.prediction_type=sample")
    with torch.no_grad():
        x0 = parts["mask_autoencoder"].encode(ids_to_bits(
            torch.where(batch["valid"], batch["slot_map"], 0), parts["mask_autoencoder"].num_bits)) * scale
        oracle = OracleDenoiser(parts["image_encoder"].encode(batch["image"]), x0)
    told, panel = monitor.monitor_ldm(parts["mask_autoencoder"], parts["image_encoder"], oracle, scale, batch,
                                          oracle_cfg, steps=2, seed=3)
    seg = Segmenter(oracle_cfg, parts["mask_autoencoder"], parts["image_encoder"], oracle, scale)
    by_hand = check_validation_by_hand(told, panel, seg, batch, 3, 2, tmp_path / "oracle")
    assert by_hand["pq"] > 0.8 and by_hand["tp"] > 10


class PerfectAE(torch.nn.Module):
    """Stands in for the mask AE: bit planes (B, nb, H, W) → ±20 logits (B, S, H, W) of exactly the
    slots they encode."""

    def __init__(self, num_slots: int):
        super().__init__()
        self.num_slots, self.num_bits = num_slots, num_slots.bit_length() - 1
        self.unused = torch.nn.Parameter(torch.zeros(()))  # callers look up the device of a parameter

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        slots = bits_to_ids(bits)
        return torch.nn.functional.one_hot(slots, self.num_slots).permute(0, 3, 1, 2).float() * 40 - 20


def test_ae_reconstruction_pq_on_real_coco_masks(trained, coco_sample, tmp_path):
    from ldmseg.data import coco
    from ldmseg.data.synthetic import write_scenes
    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from ldmseg.training.monitor import ae_reconstruction_pq

    _, cfg, parts, _ = trained
    real = coco.load_coco_panoptic(str(coco_sample))
    r = ae_reconstruction_pq(parts["mask_autoencoder"], real, cfg)
    assert r["n_images"] == 2 and r["n_segments"] > 2 * (cfg.data.num_slots - 1) > 0
    assert r["n_over_slots"] > 0  # real images hold more segments than 7 slots: those count as missed
    # segments beyond the slots are void in the AE's input: at most N − n of the N ground-truth
    # segments can match (n = n_over_slots), so RQ = 2·TP / (TP + FP + N) <= 2·(N − n) / (2·N − n) ...
    n, over = r["n_segments"], r["n_over_slots"]
    ceiling = 2 * (n - over) / (2 * n - over)
    assert r["rq"] <= ceiling
    # ... and a perfect AE (no area floor in the post-processing) reaches it exactly: TP = N − n,
    # FN = n, FP = 0, every match exact
    perfect = ae_reconstruction_pq(PerfectAE(cfg.data.num_slots), real, vae_tiny_cfg("sampling.count_th=0.0"))
    assert (perfect["n_segments"], perfect["n_over_slots"]) == (n, over)
    assert perfect["sq"] == 1.0 and perfect["rq"] == pytest.approx(ceiling, abs=1e-12)
    write_scenes(tmp_path / "scenes", num_images=6, size=32, seed=3, max_things=4)  # like the AE's training scenes
    scenes = coco.load_coco_panoptic(str(tmp_path / "scenes"))
    good = ae_reconstruction_pq(parts["mask_autoencoder"], scenes, cfg)
    torch.manual_seed(1)
    bad = ae_reconstruction_pq(MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots), scenes, cfg)
    assert good["pq"] > bad["pq"] + 0.15  # 80 steps on 8 scenes vs random weights
