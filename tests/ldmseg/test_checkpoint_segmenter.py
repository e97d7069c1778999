"""Post-processing, model folders (safetensors + JSON) and the Segmenter (segment, inpaint, COCO output)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmseg.checkpoint import build_components, load_model, save_model
from ldmseg.data.encoding import bits_to_ids, ids_to_bits, image_to_tensor, tensor_to_image
from ldmseg.data.resize import resize_pad
from ldmseg.data.slots import clean_segments, remap_ids
from ldmseg.data.ids import rgb_to_id
from ldmseg.data.synthetic import make_config, render_scene
from ldmseg import training
from ldmseg.postprocess import postprocess
from ldmseg.segmenter import Segmenter, choose_medoid, segment_agreement, to_coco_prediction
from helpers_batches import scene_batch
from helpers_coco import score_id_maps
from helpers_config import tiny_cfg

# the tiny config with a small AutoencoderKL image encoder, so model folders store and reload one
VAE_TINY = ("image_encoder.kind=autoencoder_kl", "image_encoder.block_out_channels=[8,16,16]", "mask_ae.num_points=256",
            "train_ae.lr=3e-3", "train_ae.warmup=1", "sampling.steps=3", "sampling.count_th=0.01")


def vae_tiny_cfg(*overrides):
    return tiny_cfg(*VAE_TINY, *overrides)


def scenes(n: int, size: int = 32, seed: int = 3, **knobs):
    return [render_scene(make_config(n, size=size, seed=seed, max_things=4, **knobs), i) for i in range(n)]


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


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


def test_postprocess_thresholds_on_hand_made_logits():
    s, h, w = 5, 10, 10
    logits = torch.full((s, h, w), -8.0)
    logits[0] = 0.0  # void slot
    logits[1, :, :5] = 8.0  # left half: 50 px
    logits[2, :5, 5:] = 6.0  # top right: 25 px, 23 after slot 3 takes two
    logits[3, 0, 8:] = 9.0  # 2 px: below count_th (5 px)
    logits[4, 5:, :] = 7.5  # a 50-px sigmoid mask, but slot 1 (8.0) owns its left half: argmax area 25
    ids, segs = postprocess(logits, mask_th=0.5, count_th=0.05, overlap_th=0.6)
    assert [(d["id"], d["slot"], d["area"]) for d in segs] == [(1, 1, 50), (2, 2, 23)]
    assert (ids[:, :5] == 1).all() and (ids[1:5, 5:] == 2).all() and (ids[0, 5:8] == 2).all()
    assert (ids[0, 8:] == 0).all()  # the 2-px segment was dropped
    assert (ids[5:, 5:] == 0).all()  # the mostly hidden segment (25 / 50 < 0.6) was dropped
    prob = logits.softmax(dim=0).max(dim=0).values.numpy()  # a segment's score: mean max-probability
    assert [d["score"] for d in segs] == pytest.approx([float(prob[ids == d["id"]].mean()) for d in segs])
    # a lenient overlap threshold keeps slot 4; ids go by decreasing area
    _, segs = postprocess(logits, mask_th=0.5, count_th=0.05, overlap_th=0.4)
    assert [(d["id"], d["slot"], d["area"]) for d in segs] == [(1, 1, 50), (2, 4, 25), (3, 2, 23)]
    # count_th is a fraction of the valid area
    _, segs = postprocess(logits, mask_th=0.5, count_th=0.0, overlap_th=0.0)
    assert [d["slot"] for d in segs] == [1, 4, 2, 3]


def test_postprocess_mask_th_and_valid():
    logits = torch.zeros(3, 4, 4)
    logits[1, :2] = 3.0  # softmax ≈ 0.91
    logits[2, 2:] = 0.5  # softmax ≈ 0.45 < 0.5 → void
    ids, segs = postprocess(logits, mask_th=0.5, count_th=0.0, overlap_th=0.0)
    assert (ids[:2] == 1).all() and (ids[2:] == 0).all() and len(segs) == 1
    ids, segs = postprocess(logits, mask_th=0.4, count_th=0.0, overlap_th=0.0)
    assert (ids[2:] == 2).all() and len(segs) == 2
    valid = np.ones((4, 4), dtype=bool)
    valid[0] = False
    ids, segs = postprocess(logits.numpy(), mask_th=0.5, count_th=0.0, overlap_th=0.0, valid=valid)
    assert (ids[0] == 0).all() and segs[0]["area"] == 4
    with pytest.raises(ValueError, match="logits must be"):
        postprocess(torch.zeros(4, 4), mask_th=0.5, count_th=0.0, overlap_th=0.5)


def test_agreement_and_medoid():
    a = np.zeros((6, 6), dtype=np.int64)
    a[:, :3], a[:, 3:] = 1, 2
    relabelled = np.where(a == 1, 7, 3)
    assert segment_agreement(a, relabelled).all()
    split = a.copy()
    split[:2, :3] = 5  # one third of segment 1 becomes another segment
    agree = segment_agreement(a, split)
    assert agree[:, 3:].all() and agree[2:, :3].all() and not agree[:2, :3].any()
    other = np.zeros_like(a)
    other[:3], other[3:] = 1, 2  # horizontal halves: IoU 1/3 with every vertical half
    assert not segment_agreement(a, other).any()
    best, uncertainty = choose_medoid([other, a, relabelled, split])
    assert best in (1, 2)  # a and its relabelling agree most with the rest
    assert uncertainty.dtype == np.float32 and uncertainty[3:, 3:].max() == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------


def check_result(result, shape):
    assert result.id_map.shape == shape and result.id_map.dtype == np.int64
    ids, counts = np.unique(result.id_map, return_counts=True)
    areas = dict(zip(ids.tolist(), counts.tolist()))
    assert {d["id"]: d["area"] for d in result.segments} == {k: v for k, v in areas.items() if k != 0}


def test_segment_any_size_and_batch_independent(segmenter):
    images = [s.image for s in scenes(1, size=40, seed=1)] + [s.image for s in scenes(2, size=24, seed=2, height=36)]
    together = segmenter.segment(images, seed=3, batch_size=2)
    for im, res in zip(images, together):
        check_result(res, im.shape[:2])
        assert res.uncertainty is None
    assert sum(len(r.segments) for r in together) > 0
    alone = segmenter.segment([images[2]], seed=3)[0]
    assert np.array_equal(alone.id_map, together[2].id_map)
    twice = segmenter.segment([images[2], images[2]], seed=[3, 4])
    assert np.array_equal(twice[0].id_map, alone.id_map)
    nothing = segmenter.segment([images[0]], seed=3, count_th=1.0)[0]
    assert nothing.segments == [] and (nothing.id_map == 0).all()
    with pytest.raises(TypeError, match="thresholds|options are"):
        segmenter.segment([images[0]], mask_threshold=0.3)
    with pytest.raises(TypeError, match="wrap a single image"):
        segmenter.segment(images[0])


def test_several_samples_give_the_medoid_and_uncertainty(segmenter):
    image = scenes(1, size=32, seed=4)[0].image
    res = segmenter.segment([image], seed=10, num_samples=3, sampler="ddpm")[0]
    single = [segmenter.segment([image], seed=10 + k, sampler="ddpm")[0].id_map for k in range(3)]
    assert any(np.array_equal(res.id_map, m) for m in single)
    assert res.uncertainty.shape == (32, 32) and res.uncertainty.dtype == np.float32
    assert set(np.unique(res.uncertainty).tolist()) <= {0.0, 0.5, 1.0}


def test_inpainting_everything_known_returns_the_map(segmenter):
    from ldmseg.metrics.pq import pq_image_stats

    scene = scenes(1, size=40, seed=6)[0]
    partial = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    res = segmenter.inpaint(scene.image, partial, np.ones(partial.shape, dtype=bool), seed=1)
    assert np.array_equal(res.id_map, partial)
    segs = [{"id": d["id"], "category_id": 1, "iscrowd": 0, "area": d["area"]} for d in res.segments]
    stats = pq_image_stats(partial, segs, res.id_map, segs, class_agnostic=True).per_category.values()
    tp, fp, fn, iou = (sum(getattr(st, k) for st in stats) for k in ("tp", "fp", "fn", "iou"))
    assert tp == len(segs) > 0 and fp == fn == 0 and iou / (tp + 0.5 * fp + 0.5 * fn) == pytest.approx(1.0)


def test_inpainting_keeps_known_ids_and_adds_fresh_ones(segmenter):
    scene = scenes(1, size=32, seed=7)[0]
    truth = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    known = np.zeros(truth.shape, dtype=bool)
    known[:16] = True
    partial = np.where(known, truth, 0)
    res = segmenter.inpaint(scene.image, partial, known, seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0)
    again = segmenter.inpaint(scene.image, partial, known, seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0)
    assert np.array_equal(res.id_map, again.id_map)
    assert np.array_equal(res.id_map[known], partial[known])
    known_ids = set(np.unique(partial[known]).tolist()) - {0}
    new_ids = set(np.unique(res.id_map[~known]).tolist()) - known_ids - {0}
    assert all(i > max(known_ids) for i in new_ids)
    assert np.isin(res.id_map[~known], list(known_ids)).any()  # predictions on a known slot keep its id
    flags = {d["id"]: d["known"] for d in res.segments}
    assert all(flags[i] for i in known_ids) and not any(flags[i] for i in new_ids)


@pytest.mark.parametrize("order,known_slots", [("random", "given"), ("raster", "given"), ("random", "predicted"),
                                                ("raster", "predicted")])
def test_inpainting_numbers_known_segments_as_the_model_was_trained(trained, tmp_path, order, known_slots):
    import dataclasses

    folder, cfg, parts, scale = trained
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, slot_order=order))
    save_model(tmp_path / "ldm", cfg, parts, latent_scale=scale, extra={"stage": "ldm", "step": 80})
    seg = Segmenter.from_pretrained(tmp_path / "ldm", device="cpu")
    scene = scenes(1, size=32, seed=7)[0]
    truth = clean_segments(scene.id_map, scene.segments_info, 10).id_map
    known = np.zeros(truth.shape, dtype=bool)
    known[:20] = True
    partial = np.where(known, truth, 0)
    flipped = np.where(partial > 0, partial.max() + 1 - partial, 0)  # the same segments, ids reversed
    opts = dict(seed=2, count_th=0.0, mask_th=0.0, overlap_th=0.0, known_slots=known_slots)
    a = seg.inpaint(scene.image, partial, known, **opts).id_map
    b = seg.inpaint(scene.image, flipped, known, **opts).id_map
    assert np.array_equal(a[known], partial[known]) and np.array_equal(b[known], flipped[known])
    # the same partition of the unknown pixels iff the known slots do not depend on the id values
    pairs = set(zip(a[~known].tolist(), b[~known].tolist()))
    same = len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
    assert same == (order == "raster" or known_slots == "predicted")


def test_match_known_slots_follows_the_largest_overlaps():
    from ldmseg.segmenter import match_known_slots

    known = np.array([[1, 1, 1, 2, 2, 3],
                      [1, 1, 1, 2, 2, 3],
                      [0, 0, 4, 4, 0, 0]])
    pred = np.array([[5, 5, 6, 6, 6, 6],
                     [5, 5, 5, 6, 6, 0],
                     [7, 7, 7, 7, 7, 7]])
    lut = match_known_slots(known, pred, 8)
    # 1 overlaps 5 (5 px) > 2 overlaps 6 (4 px) > 4 overlaps 7 (2 px); 1's overlap with 6 (1 px) comes
    # after 6 is taken; 3 overlaps only 6 (taken) and void, so it takes the lowest unused slot, 1
    assert lut.tolist() == [0, 5, 6, 1, 7, 0, 0, 0]
    with pytest.raises(ValueError, match="same shape"):
        match_known_slots(known, pred[:2], 8)


def test_to_coco_prediction_round_trips(segmenter):
    image = scenes(1, size=40, seed=8)[0].image
    res = segmenter.segment([image], seed=0, count_th=0.0)[0]
    png, ann = to_coco_prediction(res, 42, "x.png")
    decoded = rgb_to_id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    assert np.array_equal(decoded, res.id_map)
    assert ann["image_id"] == 42 and ann["file_name"] == "x.png"
    assert len(ann["segments_info"]) == len(res.segments) > 0
    for info in ann["segments_info"]:
        mask = res.id_map == info["id"]
        ys, xs = np.nonzero(mask)
        assert info["area"] == mask.sum() and info["category_id"] == 1 and info["iscrowd"] == 0
        assert info["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


# --------------------------------------------------------------------------------------------
# Training-time monitoring (ldmseg.training.monitor)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Inpainting against the known fraction (ldmseg.inpainting_eval)
# --------------------------------------------------------------------------------------------


def test_known_pixels_cover_the_fraction_of_the_latent_grid():
    from ldmseg.inpainting_eval import known_pixels

    for kind in ("sparse", "global"):
        none = known_pixels(kind, 0.0, 32, 32, 32, 4, "pad", seed=1)
        assert none.shape == (32, 32) and not none.any()
    half = known_pixels("global", 0.5, 32, 32, 32, 4, "pad", seed=1)
    assert half.mean() == pytest.approx(0.5)  # 32 of the 64 latent cells, 4x4 pixels each
    assert known_pixels("global", 0.5, 32, 32, 32, 4, "pad", seed=1).tolist() == half.tolist()  # seeded
    wide = known_pixels("global", 0.25, 20, 40, 32, 4, "pad", seed=2)  # padded image: mapped back to 20x40
    assert wide.shape == (20, 40) and 0.25 <= wide.mean() < 0.35  # drawn on the image's cells only


def test_inpainting_scores_rise_with_the_known_fraction(segmenter, tmp_path):
    from ldmseg.data import coco
    from ldmseg.data.synthetic import write_scenes
    from ldmseg.inpainting_eval import inpainting_scores

    write_scenes(tmp_path / "scenes", num_images=4, size=32, seed=31, max_things=3)
    data = coco.load_coco_panoptic(str(tmp_path / "scenes"))
    full = inpainting_scores(segmenter, data, "global", 1.0, steps=2)
    assert full["pq"] == pytest.approx(1.0) and full["known_fraction"] == pytest.approx(1.0)
    assert full["n_unknown_segments"] == 0 and full["n_images"] == 4
    none = inpainting_scores(segmenter, data, "global", 0.0, steps=2)
    most = inpainting_scores(segmenter, data, "global", 0.75, steps=2)
    assert none["known_fraction"] == 0.0 and most["known_fraction"] == pytest.approx(0.75, abs=0.02)
    assert none["n_unknown_segments"] > most["n_unknown_segments"] > 0
    assert most["pq"] > none["pq"] + 0.2  # the known 75 % are kept as given (random denoiser)


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
