"""The shallow mask autoencoder (docs/method.md#mask-autoencoder).

It compresses a class-agnostic panoptic map, given as ``nb = log2(S)`` bit planes in {-1, 0, +1},
into a small latent ``(C, H/f, W/f)`` and decodes a latent back into ``S`` logits per pixel, one
per id slot (slot 0 = void). The id of a pixel is the argmax over the slots.

Architecture for ``cfg.widths = (w0, ..., wL)`` (``f = 2^L``):

- encoder: conv 3×3 ``nb → w0``, SiLU; per stage ``i``: conv 3×3 ``wi → wi``, conv 3×3 stride 2
  ``wi → wi+1``, SiLU; conv 3×3 ``wL → wL``; GroupNorm, SiLU; conv 3×3 ``wL → 2C`` (mean, logvar).
- decoder: conv 3×3 ``C → wL``; ``L - 1`` times (ConvTranspose 2×2 stride 2, channel LayerNorm,
  SiLU), which brings the latent to 1/2 resolution; GroupNorm, SiLU; conv 3×3 ``wL → S`` logits;
  bilinear upsampling by the remaining factor (×2) to full resolution. With
  ``cfg.decoder_full_resolution`` one more stage (ConvTranspose 2×2 stride 2 ``wL → w0``, channel
  LayerNorm, SiLU, conv 3×3 ``w0 → w0``) reaches full resolution and the logits come from a conv
  ``w0 → S`` there, without interpolation.

At COCO scale (widths 32, 64, 128, 256; C = 4; S = 128) this has 2.02 M parameters, the paper's
size. The KL weight is 0 in the paper, so :meth:`MaskAutoencoder.encode` returns the posterior mean
and the autoencoder is in effect deterministic; robustness comes from ``latent_noise`` added in
:meth:`MaskAutoencoder.forward` while training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldmseg.config import MaskAEConfig


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: the largest divisor of ``channels`` that is at most ``max_groups``."""
    return math.gcd(channels, max_groups)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (each pixel normalised on its own)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) → (B, C, H, W)."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


class MaskAutoencoder(nn.Module):
    """Bit planes of a panoptic map ↔ latent ↔ per-slot logits.

    Attributes: ``num_slots`` (S), ``num_bits`` (nb = log2 S), ``downsample_factor`` (f),
    ``latent_channels`` (C).
    """

    def __init__(self, cfg: MaskAEConfig, num_slots: int) -> None:
        super().__init__()
        widths = tuple(int(w) for w in cfg.widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"mask_ae.widths must be a non-empty list of positive ints, got {cfg.widths}")
        if num_slots < 2 or num_slots & (num_slots - 1):
            raise ValueError(f"num_slots must be a power of two >= 2 (data.num_slots), got {num_slots}")
        if cfg.latent_channels < 1:
            raise ValueError(f"mask_ae.latent_channels must be >= 1, got {cfg.latent_channels}")
        self.cfg = cfg
        self.num_slots = int(num_slots)
        self.num_bits = int(math.log2(num_slots))
        self.downsample_factor = 2 ** (len(widths) - 1)
        self.latent_channels = int(cfg.latent_channels)
        top = widths[-1]

        encoder: list[nn.Module] = [_conv3x3(self.num_bits, widths[0]), nn.SiLU()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            encoder += [_conv3x3(w_in, w_in), _conv3x3(w_in, w_out, stride=2), nn.SiLU()]
        encoder += [
            _conv3x3(top, top),
            nn.GroupNorm(num_groups(top), top, eps=1e-6),
            nn.SiLU(),
            _conv3x3(top, 2 * self.latent_channels),
        ]
        self.encoder = nn.Sequential(*encoder)

        num_upsamplings = max(len(widths) - 2, 0)
        decoder: list[nn.Module] = [_conv3x3(self.latent_channels, top)]
        for _ in range(num_upsamplings):
            decoder += [nn.ConvTranspose2d(top, top, kernel_size=2, stride=2), ChannelLayerNorm(top), nn.SiLU()]
        head = top
        if cfg.decoder_full_resolution and len(widths) > 1:
            head = widths[0]
            decoder += [
                nn.ConvTranspose2d(top, head, kernel_size=2, stride=2),
                ChannelLayerNorm(head),
                nn.SiLU(),
                _conv3x3(head, head),
            ]
            num_upsamplings += 1
        decoder += [nn.GroupNorm(num_groups(head), head, eps=1e-6), nn.SiLU(), _conv3x3(head, self.num_slots)]
        self.decoder = nn.Sequential(*decoder)
        self.final_upsample = self.downsample_factor // 2**num_upsamplings
        """Bilinear factor from the decoder's logits to full resolution (2 for the paper's decoder,
        1 with ``decoder_full_resolution`` or f = 1)."""

    # ------------------------------------------------------------------------------------------

    def _check_bits(self, bits: torch.Tensor) -> None:
        if bits.ndim != 4 or bits.shape[1] != self.num_bits:
            raise ValueError(
                f"bits must be (B, {self.num_bits}, H, W) bit planes (ids_to_bits(slot_map, {self.num_bits})), "
                f"got shape {tuple(bits.shape)}"
            )
        f = self.downsample_factor
        if bits.shape[-2] % f or bits.shape[-1] % f:
            raise ValueError(
                f"H and W must be multiples of the downsampling factor {f}, got {tuple(bits.shape[-2:])}; "
                "pad the map (data.resolution must be a multiple of f)"
            )

    def encode_posterior(self, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``bits`` (B, nb, H, W) float → (mean, logvar), each (B, C, H/f, W/f) float32.

        ``logvar`` is clamped to [-30, 20] as in diffusers' ``DiagonalGaussianDistribution``.
        """
        self._check_bits(bits)
        moments = self.encoder(bits.to(self.encoder[0].weight.dtype))
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, bits: torch.Tensor) -> torch.Tensor:
        """``bits`` (B, nb, H, W) float32 in {-1, 0, +1} → latent (B, C, H/f, W/f) float32.

        The posterior mean: with KL weight 0 the autoencoder is deterministic.
        """
        return self.encode_posterior(bits)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` (B, C, h, w) → logits (B, S, h·f, w·f) float32, one channel per id slot."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must be (B, {self.latent_channels}, h, w), got shape {tuple(z.shape)}")
        logits = self.decoder(z.to(self.decoder[0].weight.dtype))
        if self.final_upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.final_upsample, mode="bilinear", align_corners=False)
        return logits.float()

    def forward(
        self,
        bits: torch.Tensor,
        latent_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruct: ``bits`` (B, nb, H, W) → logits (B, S, H, W) float32.

        ``latent_noise`` is the std of Gaussian noise added to the posterior mean, in units of
        the std of this batch's latents (``cfg.latent_noise``; the std is taken without gradient).
        The posterior is not sampled; a caller that trains with ``kl_weight > 0`` uses
        :meth:`encode_posterior` and :meth:`decode` itself.
        """
        z = self.encode(bits)
        if latent_noise > 0:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + latent_noise * z.detach().std() * noise
        return self.decode(z)
