"""Shared pieces of the model tests: conf/tiny.yaml as it is, parameter counts, synthetic slot maps and
their bit planes, tiny Stable-Diffusion-style diffusers models (``tiny_sd_unet``, ``tiny_sd_vae``). Importing it keeps torch on one thread, as the model tests always ran."""

from __future__ import annotations

import numpy as np
import torch

from paths import TINY_YAML
from ldmseg.config import load_config

TINY = load_config(TINY_YAML)

torch.set_num_threads(1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_sd_unet():
    """A seeded UNet2DConditionModel of Stable Diffusion's layout (cross-attention, 4 latent channels), tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_sd_vae():
    """A seeded AutoencoderKL of Stable Diffusion's VAE layout (factor 4, 4 latent channels), tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, scaling_factor=0.18215,
    )


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
