"""The conditional denoiser (docs/method.md#latent-diffusion-model).

Input channels, concatenated: ``[noisy mask latent x_t (C) | image features | self-conditioning
x̂₀ (C, zeros when absent)]``; output: C channels, the model's prediction (ε, x₀ or v: the
denoiser does not know which, the diffusion code decides). Image features are the image latent
itself, or, when ``denoiser.image_stem_channels > 0``, a small learned stem of it
(Conv 3×3 → SiLU → Conv 3×3).

Two backbones (``denoiser.kind``):

- ``unet2d``: a diffusers ``UNet2DModel`` trained from scratch (the CPU-scale configuration).
- ``stable-diffusion``: Stable Diffusion v1.x's ``UNet2DConditionModel`` (pretrained or built from
  ``denoiser.sd_config``) with its cross-attention removed and ``conv_in`` widened (see
  :mod:`ldmseg.models.stable_diffusion`); it is called with ``encoder_hidden_states=None``.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmseg.config import DenoiserConfig
from ldmseg.models.mask_autoencoder import num_groups
from ldmseg.models.stable_diffusion import sd_unet_config, strip_cross_attention, widen_conv_in


class ImageStem(nn.Module):
    """Learned features of the image latent: Conv 3×3 → SiLU → Conv 3×3, (B, Ci, h, w) → (B, Cs, h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Denoiser(nn.Module):
    """``(x_t, t, image_latent, x0_self) → prediction``, all latents at the same (h, w).

    Attributes: ``latent_channels`` (C), ``image_channels`` (Ci, of the image latent it takes),
    ``self_condition`` (whether the x̂₀ input exists), ``unet`` (the diffusers backbone),
    ``image_stem`` (``ImageStem`` or ``None``), ``text_free`` (True for the SD backbone, called
    without text), ``origin`` (how the backbone was built, for logs).
    """

    def __init__(
        self,
        unet: nn.Module,
        latent_channels: int,
        image_channels: int,
        self_condition: bool,
        image_stem: ImageStem | None = None,
        text_free: bool = False,
        origin: str = "",
    ) -> None:
        super().__init__()
        self.unet = unet
        self.image_stem = image_stem
        self.latent_channels = int(latent_channels)
        self.image_channels = int(image_channels)
        self.self_condition = bool(self_condition)
        self.text_free = bool(text_free)
        self.origin = origin
        stem_out = image_stem.layers[-1].out_channels if image_stem is not None else image_channels
        self.in_channels = self.latent_channels + stem_out + (self.latent_channels if self_condition else 0)
        if unet.config.in_channels != self.in_channels:
            raise ValueError(f"the UNet takes {unet.config.in_channels} input channels, expected {self.in_channels}")
        if unet.config.out_channels != self.latent_channels:
            raise ValueError(
                f"the UNet predicts {unet.config.out_channels} channels but the mask latent has "
                f"{self.latent_channels}; set mask_ae.latent_channels={unet.config.out_channels}"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image_latent: torch.Tensor,
        x0_self: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy latent.

        Args:
            x_t: (B, C, h, w) float, noisy mask latent.
            t: (B,) int64 timesteps (a scalar is broadcast to the batch).
            image_latent: (B, Ci, h, w) float, the image encoder's output.
            x0_self: (B, C, h, w) float self-conditioning estimate, or ``None`` (zeros).
        Returns:
            (B, C, h, w) float32.
        """
        b, c, h, w = x_t.shape
        if c != self.latent_channels:
            raise ValueError(f"x_t must be (B, {self.latent_channels}, h, w), got {tuple(x_t.shape)}")
        if image_latent.shape != (b, self.image_channels, h, w):
            raise ValueError(
                f"image_latent must be (B, Ci, h, w) = {(b, self.image_channels, h, w)} to match x_t, got "
                f"{tuple(image_latent.shape)}; the image encoder and the mask AE need the same downsampling factor"
            )
        if x0_self is not None:
            if not self.self_condition:
                raise ValueError("this denoiser has no self-conditioning input (denoiser.self_condition=false); "
                                 "pass x0_self=None")
            if x0_self.shape != x_t.shape:
                raise ValueError(f"x0_self must have the shape of x_t {tuple(x_t.shape)}, got {tuple(x0_self.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be (B,) = ({b},) timesteps, got shape {tuple(t.shape)}")

        dtype = self.unet.conv_in.weight.dtype
        image_features = image_latent.to(dtype)
        if self.image_stem is not None:
            image_features = self.image_stem(image_features)
        parts = [x_t.to(dtype), image_features]
        if self.self_condition:
            parts.append(torch.zeros_like(parts[0]) if x0_self is None else x0_self.to(dtype))
        x = torch.cat(parts, dim=1)
        if self.text_free:
            out = self.unet(x, t, encoder_hidden_states=None, return_dict=False)[0]
        else:
            out = self.unet(x, t, return_dict=False)[0]
        return out.float()


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _unet2d(cfg: DenoiserConfig, in_channels: int, out_channels: int, sample_size: int) -> nn.Module:
    from diffusers import UNet2DModel

    widths = tuple(cfg.block_out_channels)
    levels = tuple(cfg.attention_levels)
    if len(levels) != len(widths):
        raise ValueError(
            f"denoiser.attention_levels has {len(levels)} entries but denoiser.block_out_channels has "
            f"{len(widths)}; give one true/false per level"
        )
    for width, attention in zip(widths + (widths[-1],), levels + (True,)):  # the mid block has attention
        if attention and width % cfg.attention_head_dim:
            raise ValueError(
                f"denoiser.attention_head_dim={cfg.attention_head_dim} must divide the width {width} of every "
                "level with attention and of the last level (mid-block attention)"
            )
    groups = min(num_groups(w) for w in widths)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=widths,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=groups,
    )


def _sd_unet(cfg: DenoiserConfig, sample_size: int, load_pretrained: bool) -> tuple[nn.Module, str]:
    from diffusers import UNet2DConditionModel

    from ldmseg.models.pretrained import load_pretrained as load, pretrained_config

    where = f"{cfg.pretrained}" + (f" (subfolder {cfg.subfolder})" if cfg.subfolder else "")
    if cfg.pretrained and load_pretrained:
        unet = load(UNet2DConditionModel, cfg.pretrained, cfg.subfolder)
        return unet, f"Stable Diffusion UNet loaded from {where}"
    if cfg.sd_config:
        config = sd_unet_config(cfg.sd_config)
        config["sample_size"] = sample_size
        unet = UNet2DConditionModel(**config)
        note = f"; pretrained weights of {cfg.pretrained} not loaded" if cfg.pretrained else ""
        return unet, f"{cfg.sd_config} UNet built from config{note}"
    if cfg.pretrained and (config := pretrained_config(cfg.pretrained, cfg.subfolder)) is not None:
        unet = UNet2DConditionModel.from_config(config)
        return unet, f"UNet built from the config.json of {where} (weights not loaded)"
    raise ValueError(
        "denoiser.kind=stable-diffusion needs denoiser.pretrained (a local save_pretrained directory, s3:// prefix "
        "or hub id) or denoiser.sd_config=sd-v1 to build it from config"
        + (" (without loading weights, a source whose config.json is not local or cached also needs sd_config)"
           if cfg.pretrained else "")
    )


def build_denoiser(
    cfg: DenoiserConfig,
    latent_channels: int,
    image_channels: int,
    sample_size: int,
    *,
    load_pretrained: bool = True,
) -> Denoiser:
    """Build the denoiser of ``cfg`` for latents (C, sample_size, sample_size) and image latents Ci.

    ``load_pretrained=False`` never loads (or downloads) ``cfg.pretrained`` weights: a
    ``stable-diffusion`` UNet is then built from ``cfg.sd_config`` or from the ``config.json`` of
    ``cfg.pretrained`` (a local directory or a cached copy), with random weights; use it before ``load_state_dict``
    from a checkpoint, or under ``torch.device("meta")`` to count parameters.
    ``freeze_time_embedding`` and ``gradient_checkpointing`` are applied here.
    """
    if cfg.image_stem_channels < 0:
        raise ValueError(f"denoiser.image_stem_channels must be >= 0, got {cfg.image_stem_channels}")
    stem = ImageStem(image_channels, cfg.image_stem_channels) if cfg.image_stem_channels > 0 else None
    image_features = cfg.image_stem_channels if stem is not None else image_channels
    in_channels = latent_channels + image_features + (latent_channels if cfg.self_condition else 0)

    if cfg.kind == "unet2d":
        unet = _unet2d(cfg, in_channels, latent_channels, sample_size)
        origin = "UNet2DModel built from config"
        text_free = False
    elif cfg.kind == "stable-diffusion":
        unet, origin = _sd_unet(cfg, sample_size, load_pretrained)
        strip_cross_attention(unet)
        widen_conv_in(unet, in_channels, copy_channels=latent_channels)
        text_free = True
    else:
        raise ValueError(f"unknown denoiser.kind {cfg.kind!r}; choose unet2d or stable-diffusion")

    if cfg.freeze_time_embedding:
        unet.time_embedding.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Denoiser(unet, latent_channels, image_channels, cfg.self_condition, stem, text_free, origin)
