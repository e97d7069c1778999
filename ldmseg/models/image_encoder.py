"""The frozen image encoder: what the denoiser is conditioned on (docs/method.md#latent-diffusion-model).

Two kinds (``image_encoder.kind``):

- ``autoencoder_kl``: a diffusers ``AutoencoderKL``; the image latent is the posterior mean times
  ``scaling_factor`` (0.18215 for Stable Diffusion's ``vae/``). Loaded from ``pretrained`` (a local
  ``save_pretrained`` directory, an ``s3://`` prefix or a hub id, with an optional ``subfolder``
  such as ``vae``; see :mod:`ldmseg.models.pretrained`), or built from the config fields with a
  fixed seed (so the same config always gives the same frozen encoder; it is saved with
  checkpoints anyway).
- ``pixel_unshuffle``: ``F.pixel_unshuffle`` by ``downsample_factor`` → (3·f², H/f, W/f); no
  parameters, lossless.

Parameters never require gradients and the module stays in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmseg.config import ImageEncoderConfig
from ldmseg.models.mask_autoencoder import num_groups
from ldmseg.models.stable_diffusion import sd_vae_config

INIT_SEED = 0
"""Seed of the random weights of an ``AutoencoderKL`` built from config."""


def _vae_from_fields(cfg: ImageEncoderConfig):
    from diffusers import AutoencoderKL

    widths = tuple(cfg.block_out_channels)
    if not widths:
        raise ValueError("image_encoder.block_out_channels must list at least one width")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(num_groups(w) for w in widths),
        scaling_factor=cfg.scaling_factor,
    )


class ImageEncoder(nn.Module):
    """Images (B, 3, H, W) float32 in [-1, 1] → image latent (B, out_channels, H/f, W/f) float32.

    Attributes: ``kind``, ``downsample_factor`` (f), ``out_channels``, ``scaling_factor``,
    ``vae`` (the ``AutoencoderKL`` or ``None``), ``origin`` (how it was built, for logs).
    """

    def __init__(self, kind: str, vae: nn.Module | None = None, downsample_factor: int = 1,
                 scaling_factor: float = 1.0, origin: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.vae = vae
        self.origin = origin
        if kind == "autoencoder_kl":
            if vae is None:
                raise ValueError("kind autoencoder_kl needs an AutoencoderKL")
            self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.out_channels = int(vae.config.latent_channels)
            self.scaling_factor = float(scaling_factor)
            vae.register_to_config(scaling_factor=self.scaling_factor)
        elif kind == "pixel_unshuffle":
            if downsample_factor < 1:
                raise ValueError(f"image_encoder.downsample_factor must be >= 1, got {downsample_factor}")
            self.downsample_factor = int(downsample_factor)
            self.out_channels = 3 * self.downsample_factor**2
            self.scaling_factor = 1.0
        else:
            raise ValueError(f"unknown image_encoder.kind {kind!r}; choose autoencoder_kl or pixel_unshuffle")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Always stays in eval mode: the encoder is frozen."""
        return super().train(False)

    @classmethod
    def from_config(cls, cfg: ImageEncoderConfig, *, load_pretrained: bool = True) -> "ImageEncoder":
        """Build the encoder of ``cfg``.

        With ``cfg.pretrained`` set, loads it (:func:`ldmseg.models.pretrained.load_pretrained`: a
        local directory, an ``s3://`` prefix copied once into the weights cache, or a hub id from the
        Hugging Face cache). ``load_pretrained=False`` never loads weights or uses the network: the
        shape comes from the ``config.json`` of a local directory or of a cached copy, else from
        Stable Diffusion v1.x's VAE config (use under ``torch.device("meta")`` to count parameters).
        """
        if cfg.kind == "pixel_unshuffle":
            return cls("pixel_unshuffle", downsample_factor=cfg.downsample_factor, origin="pixel_unshuffle (no parameters)")
        if cfg.kind != "autoencoder_kl":
            raise ValueError(f"unknown image_encoder.kind {cfg.kind!r}; choose autoencoder_kl or pixel_unshuffle")
        from diffusers import AutoencoderKL

        from ldmseg.models.pretrained import load_pretrained as load, pretrained_config

        if cfg.pretrained:
            where = cfg.pretrained + (f" (subfolder {cfg.subfolder})" if cfg.subfolder else "")
            if load_pretrained:
                vae = load(AutoencoderKL, cfg.pretrained, cfg.subfolder)
                origin = f"AutoencoderKL loaded from {where}"
            elif (config := pretrained_config(cfg.pretrained, cfg.subfolder)) is not None:
                vae = AutoencoderKL.from_config(config)
                origin = f"AutoencoderKL built from the config.json of {where} (weights not loaded)"
            else:
                vae = AutoencoderKL(**sd_vae_config("sd-v1"))
                origin = f"sd-v1 VAE shape assumed for {where} (weights not loaded)"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(INIT_SEED)
                vae = _vae_from_fields(cfg)
            origin = f"AutoencoderKL built from config (seed {INIT_SEED})"
        return cls("autoencoder_kl", vae=vae, scaling_factor=cfg.scaling_factor, origin=origin)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) float in [-1, 1] → (B, out_channels, H/f, W/f) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"H and W must be multiples of the image encoder's factor {f}, got {tuple(images.shape[-2:])}")
        if self.kind == "pixel_unshuffle":
            return F.pixel_unshuffle(images.float(), f)
        x = images.to(self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return (mean * self.scaling_factor).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)
