"""Models: mask autoencoder and its loss, image encoder, denoiser (from scratch and SD-style)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from paths import COCO_YAML, TINY_YAML
from ldmseg.config import DenoiserConfig, ImageEncoderConfig, load_config
from ldmseg.models.denoiser import Denoiser, build_denoiser
from ldmseg.models.image_encoder import ImageEncoder
from ldmseg.models.mask_autoencoder import MaskAutoencoder
from ldmseg.models.mask_losses import mask_ae_loss, sample_points

TINY = load_config(TINY_YAML)

torch.set_num_threads(1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def scenes(n: int, size: int, num_slots: int, seed: int) -> np.ndarray:
    """(n, size, size) int64 slot maps: two stuff bands, 3-6 rectangles/circles, a void square."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        ids = rng.permutation(np.arange(1, num_slots))
        cut = rng.integers(size // 4, 3 * size // 4)
        maps[i, :cut], maps[i, cut:] = ids[0], ids[1]
        for k in range(2, 2 + rng.integers(3, 7)):
            if rng.random() < 0.5:
                (y0, x0), (h, w) = rng.integers(0, size - 8, 2), rng.integers(6, size // 2, 2)
                inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            else:
                (cy, cx), r = rng.integers(4, size - 4, 2), rng.integers(4, size // 5)
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            maps[i][inside] = ids[k]
        y0, x0 = rng.integers(0, size - 6, 2)
        maps[i, y0 : y0 + 5, x0 : x0 + 5] = 0
    return maps


def to_bits(slot_map: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(B, H, W) int64 → (B, nb, H, W) float32 in {-1, 0, +1}, LSB first, void 0."""
    try:
        from ldmseg.data.encoding import ids_to_bits
    except ImportError:
        planes = (slot_map[:, None] >> torch.arange(num_bits)[None, :, None, None]) & 1
        return (planes.float() * 2 - 1) * (slot_map[:, None] != 0)
    bits = torch.stack([torch.as_tensor(ids_to_bits(m, num_bits)) for m in slot_map]).float()
    assert bits.shape == (slot_map.shape[0], num_bits, *slot_map.shape[1:])
    return bits


# --------------------------------------------------------------------------------------------
# Mask autoencoder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [(16, 32, 64), (8, 16), (8,), (8, 8, 16, 16)])
def test_mask_ae_shapes(widths):
    cfg = dataclasses.replace(TINY.mask_ae, widths=widths)
    ae = MaskAutoencoder(cfg, num_slots=32)
    f = 2 ** (len(widths) - 1)
    assert (ae.num_slots, ae.num_bits, ae.downsample_factor, ae.latent_channels) == (32, 5, f, 4)
    bits = to_bits(torch.from_numpy(scenes(2, 32, 32, seed=1)), 5)
    mean, logvar = ae.encode_posterior(bits)
    assert mean.shape == logvar.shape == (2, 4, 32 // f, 32 // f)
    z = ae.encode(bits)
    assert torch.equal(z, mean) and z.dtype == torch.float32
    logits = ae.decode(z)
    assert logits.shape == (2, 32, 32, 32) and logits.dtype == torch.float32
    assert torch.equal(ae(bits), logits)  # no noise: deterministic
    g = torch.Generator().manual_seed(0)
    noisy = ae(bits, latent_noise=0.5, generator=g)
    assert noisy.shape == logits.shape and not torch.allclose(noisy, logits)


def test_mask_ae_rejects_bad_inputs():
    ae = MaskAutoencoder(TINY.mask_ae, num_slots=32)
    with pytest.raises(ValueError, match="bit planes"):
        ae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples"):
        ae.encode(torch.zeros(1, 5, 30, 32))
    with pytest.raises(ValueError, match="power of two"):
        MaskAutoencoder(TINY.mask_ae, num_slots=30)


def test_mask_ae_coco_size_matches_paper():
    coco = load_config(COCO_YAML)
    with torch.device("meta"):
        ae = MaskAutoencoder(coco.mask_ae, coco.data.num_slots)
    assert ae.downsample_factor == 8 and ae.num_bits == 7
    assert abs(n_params(ae) - 2.0e6) <= 0.03 * 2.0e6  # paper: 2.02 M


def overfit(ae: MaskAutoencoder, bits: torch.Tensor, slot_map: torch.Tensor, valid: torch.Tensor, steps: int
            ) -> tuple[float, float]:
    """``steps`` Adam steps (lr 2e-3) of ``mask_ae_loss`` on one batch → (first loss, last loss)."""
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss, parts = mask_ae_loss(ae(bits), slot_map, valid, ae.cfg, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
    return losses[0], losses[-1]


def test_mask_ae_overfits_synthetic_masks():
    """The tiny AE reconstructs 8 synthetic maps (64², 32 slots) after 300 Adam steps (~35 s)."""
    torch.manual_seed(0)
    slot_map = torch.from_numpy(scenes(8, 64, 32, seed=0))
    valid = torch.ones_like(slot_map, dtype=torch.bool)
    valid[4:, 56:] = False  # padding on the last 8 rows of half the batch
    slot_map[~valid] = 0
    bits = to_bits(slot_map, 5)
    ae = MaskAutoencoder(TINY.mask_ae, num_slots=32)
    first, last = overfit(ae, bits, slot_map, valid, steps=300)
    assert last < 0.2 * first

    with torch.no_grad():
        pred = ae(bits).argmax(1)
    known = valid & (slot_map != 0)
    assert (pred[known] == slot_map[known]).float().mean() >= 0.95
    ious = []
    for b in range(8):
        for s in slot_map[b][known[b]].unique():
            gt, pr = (slot_map[b] == s) & valid[b], (pred[b] == s) & valid[b] & (slot_map[b] != 0)
            ious.append(((gt & pr).sum() / (gt | pr).sum()).item())
    assert len(ious) > 30 and min(ious) >= 0.9

    # reconstruction PQ through the real post-processing and evaluator (issue target: >= 0.95)
    from ldmseg.metrics.pq import pq_image_stats
    from ldmseg.postprocess import postprocess

    with torch.no_grad():
        logits = ae(bits)
    stats = []
    for b in range(8):
        gt = torch.where(valid[b], slot_map[b], 0).numpy()
        gt_segments = [{"id": int(s), "category_id": 1, "iscrowd": 0, "area": int((gt == s).sum())}
                       for s in np.unique(gt) if s != 0]
        pred, segs = postprocess(logits[b], mask_th=0.5, count_th=0.0, overlap_th=0.5, valid=valid[b])
        pred_segments = [{**s, "category_id": 1} for s in segs]
        stats.append(pq_image_stats(gt, gt_segments, np.asarray(pred), pred_segments, class_agnostic=True))
    result = sum(stats).summary({1: {"id": 1, "isthing": 1}})
    assert result["pq"] >= 0.95, result


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _loss_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    slot_map = torch.from_numpy(scenes(2, 32, 16, seed=seed))
    valid = torch.ones_like(slot_map, dtype=torch.bool)
    valid[0, 24:, :] = False
    valid[1, :, 20:] = False
    logits = torch.randn(2, 16, 32, 32, generator=gen)
    return logits, slot_map, valid


def thin_line_maps(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) int64 maps of 1 px lines (ids 2-7, rows and columns) on a background (id 1)."""
    rng = np.random.default_rng(seed)
    maps = np.ones((n, size, size), np.int64)
    for i in range(n):
        for k in range(2, 8):
            pos = rng.integers(1, size - 1)
            if rng.random() < 0.5:
                maps[i, pos, :] = k
            else:
                maps[i, :, pos] = k
    return maps


def test_mask_ae_full_resolution_decoder_draws_1px_lines():
    """The full-resolution head decodes without interpolation and, on 1 px lines, overfits with at
    most half the line errors of the paper's 1/2-resolution head in the same 300 steps."""
    slot_map = torch.from_numpy(thin_line_maps(8, 32, seed=0))
    valid = torch.ones_like(slot_map, dtype=torch.bool)
    bits = to_bits(slot_map, 3)
    line = slot_map != 1
    accuracy = {}
    for full in (False, True):
        torch.manual_seed(0)
        cfg = dataclasses.replace(TINY.mask_ae, decoder_full_resolution=full)
        ae = MaskAutoencoder(cfg, num_slots=8)
        assert ae.final_upsample == (1 if full else 2)
        overfit(ae, bits, slot_map, valid, steps=300)
        with torch.no_grad():
            logits = ae(bits)
        assert logits.shape == (8, 8, 32, 32)
        accuracy[full] = (logits.argmax(1)[line] == slot_map[line]).float().mean().item()
    assert accuracy[True] >= 0.98, accuracy
    assert 1 - accuracy[True] <= 0.5 * (1 - accuracy[False]), accuracy


def test_loss_ignores_padding():
    logits, slot_map, valid = _loss_inputs()
    cfg = dataclasses.replace(TINY.mask_ae, num_points=256)
    base, parts = mask_ae_loss(logits, slot_map, valid, cfg, torch.Generator().manual_seed(1))

    changed = logits + 50.0 * torch.randn(logits.shape) * (~valid)[:, None]
    other_ids = torch.where(valid, slot_map, torch.full_like(slot_map, 7))
    again, _ = mask_ae_loss(changed, other_ids, valid, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(base, again)

    # the same change on valid pixels does change the loss
    moved = logits + 50.0 * torch.randn(logits.shape) * valid[:, None]
    assert not torch.isclose(mask_ae_loss(moved, slot_map, valid, cfg, torch.Generator().manual_seed(1))[0], base)
    assert set(parts) >= {"loss", "ce", "bce", "dice"}
    weighted = cfg.ce_weight * parts["ce"] + cfg.bce_weight * parts["bce"] + cfg.dice_weight * parts["dice"]
    assert parts["loss"] == pytest.approx(weighted, rel=1e-5)


def test_loss_points_stay_on_valid_pixels_and_seek_uncertainty():
    logits, slot_map, valid = _loss_inputs()
    logits[:, 0] += 20.0  # confident everywhere ...
    logits[:, 0, :8, :8] -= 20.0  # ... except an 8x8 corner (64 of ~700 valid pixels per image)
    index = sample_points(logits, valid, 200, oversample_ratio=3.0, importance_sample_ratio=0.75,
                          generator=torch.Generator().manual_seed(0))
    assert index.shape == (2, 200)
    assert valid.flatten(1).gather(1, index).all()
    rows, cols = index // 32, index % 32
    in_corner = ((rows < 8) & (cols < 8)).float().mean().item()
    assert in_corner > 0.3  # uniform sampling would give about 0.1


def test_loss_ce_ignores_void_and_rewards_correct_logits():
    logits, slot_map, valid = _loss_inputs()
    cfg = dataclasses.replace(TINY.mask_ae, num_points=256, importance_sample_ratio=0.0)
    _, parts = mask_ae_loss(logits, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    void = (slot_map == 0)[:, None]
    _, parts_void = mask_ae_loss(logits + 30.0 * void, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    assert parts_void["ce"] == pytest.approx(parts["ce"], rel=1e-6)

    perfect = 20.0 * torch.nn.functional.one_hot(slot_map, 16).permute(0, 3, 1, 2).float() - 10.0
    _, good = mask_ae_loss(perfect, slot_map, valid, cfg, torch.Generator().manual_seed(3))
    assert good["ce"] < 1e-3 and good["bce"] < 1e-3 and good["dice"] < 0.01
    assert parts["ce"] > 1.0 and parts["dice"] > 0.5
    assert good["num_segments"] == sum(len(set(slot_map[b][valid[b]].tolist()) - {0}) for b in range(2))


# --------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Denoiser from scratch
# --------------------------------------------------------------------------------------------


def _small_unet_cfg(**kw) -> DenoiserConfig:
    return dataclasses.replace(TINY.denoiser, block_out_channels=(16, 32), attention_head_dim=8, **kw)


def test_denoiser_unet2d_shapes_and_inputs():
    torch.manual_seed(0)
    den = build_denoiser(_small_unet_cfg(), latent_channels=4, image_channels=6, sample_size=8)
    assert isinstance(den, Denoiser)
    assert (den.latent_channels, den.image_channels, den.self_condition) == (4, 6, True)
    assert den.in_channels == 4 + TINY.denoiser.image_stem_channels + 4
    assert den.unet.conv_in.in_channels == den.in_channels
    x_t, img, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    out = den(x_t, t, img, None)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, den(x_t, t, img, torch.zeros_like(x0)))  # absent x̂₀ = zeros
    assert not torch.allclose(out, den(x_t, t, img, x0))
    assert not torch.allclose(out, den(x_t, t, img + 1.0, None))  # the image matters
    assert not torch.allclose(out, den(x_t, torch.tensor([500, 900]), img, None))
    with pytest.raises(ValueError, match="image_latent"):
        den(x_t, t, torch.randn(2, 6, 4, 4), None)


def test_denoiser_unet2d_options():
    raw = build_denoiser(_small_unet_cfg(image_stem_channels=0, self_condition=False), 4, 6, 8)
    assert raw.image_stem is None and raw.in_channels == 4 + 6
    with pytest.raises(ValueError, match="self-conditioning"):
        raw(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 6, 8, 8), torch.randn(1, 4, 8, 8))
    frozen = build_denoiser(_small_unet_cfg(freeze_time_embedding=True, gradient_checkpointing=True), 4, 6, 8)
    assert not any(p.requires_grad for p in frozen.unet.time_embedding.parameters())
    assert frozen.unet.is_gradient_checkpointing
    trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    assert trainable == n_params(frozen) - n_params(frozen.unet.time_embedding)
    attn = [name for name, _ in frozen.unet.named_modules() if name.endswith("attentions.0")]
    assert any(n.startswith("down_blocks.1") for n in attn) and not any(n.startswith("down_blocks.0") for n in attn)
    with pytest.raises(ValueError, match="attention_levels"):
        build_denoiser(_small_unet_cfg(attention_levels=(True,)), 4, 6, 8)


# --------------------------------------------------------------------------------------------
# Denoiser from a Stable-Diffusion-style UNet
# --------------------------------------------------------------------------------------------


def _tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=8, norm_num_groups=8,
    )


def test_denoiser_from_stable_diffusion_unet(tmp_path):
    from ldmseg.models.stable_diffusion import strip_cross_attention, widen_conv_in

    unet = _tiny_sd_unet()
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
