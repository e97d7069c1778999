"""The one place the three modules of a config are assembled (untrained, float32).

- :func:`build_components`: mask autoencoder, image encoder and denoiser of a config; the denoiser
  is sized for the mask latents (``latent_channels``, R/f, R/f) and the image encoder's channels.
  Build under ``torch.device("meta")`` to count parameters without memory or downloads.
- :func:`build_component`: one of them, as :func:`ldmseg.checkpoint.load_model` rebuilds a stored
  model before loading its weights (the denoiser's shape from ``model.json``; built empty with
  :func:`build_empty`, since the stored weights replace every tensor).

Training builds its stage with :func:`ldmseg.training.build.build_stage`, on top of these.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ldmseg.config import Config

COMPONENTS = ("mask_autoencoder", "image_encoder", "denoiser")
"""Component names a model folder may hold."""


def build_denoiser_for(cfg: Config, latent_channels: int, image_channels: int, sample_size: int, *,
                       load_pretrained: bool = True) -> nn.Module:
    """The denoiser of ``cfg`` for (latent_channels, sample_size, sample_size) mask latents
    conditioned on ``image_channels`` image-latent channels."""
    from ldmseg.models.denoiser import build_denoiser

    return build_denoiser(cfg.denoiser, latent_channels, image_channels, sample_size, load_pretrained=load_pretrained)


def build_empty(build: Callable[[], nn.Module], device: str | torch.device = "cpu") -> nn.Module:
    """``build()`` run on the meta device, then given uninitialised storage on ``device``
    (``to_empty``): no random initialisation or pretrained load is paid (seconds and gigabytes for
    the 815 M-parameter Stable Diffusion UNet). Every parameter and buffer holds garbage until a
    checkpoint's strict load overwrites it; a module with non-persistent buffers (which no load
    would restore) is refused."""
    with torch.device("meta"):
        module = build()
    stored = set(module.state_dict())
    transient = [name for name, _ in module.named_buffers() if name not in stored]
    if transient:
        raise ValueError(f"{type(module).__name__} has non-persistent buffers {transient[:3]}: a checkpoint load "
                         "would not restore them, build it normally")
    return module.to_empty(device=device)


def check_downsampling(image_encoder: nn.Module, mask_ae: nn.Module) -> None:
    """The image latent and the mask latent must have the same size: same downsampling factor."""
    if image_encoder.downsample_factor != mask_ae.downsample_factor:
        raise ValueError(f"the image encoder downsamples by {image_encoder.downsample_factor} but the mask AE by "
                         f"{mask_ae.downsample_factor}; match image_encoder (block_out_channels or "
                         "downsample_factor) with mask_ae.widths")


def build_components(cfg: Config, *, mask_ae: nn.Module | None = None, load_pretrained: bool = True
                     ) -> dict[str, nn.Module]:
    """Untrained ``mask_autoencoder``, ``image_encoder`` and ``denoiser`` of ``cfg`` (float32, on
    the current default device), built in that order.

    ``mask_ae``: an existing (e.g. trained, frozen) mask autoencoder to size the denoiser for and
    return instead of a new one. ``load_pretrained`` is passed to the image encoder and denoiser
    builders (``False``: shapes only, nothing loaded or downloaded).
    """
    from ldmseg.models.image_encoder import ImageEncoder
    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    if mask_ae is None:
        mask_ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    image_encoder = ImageEncoder.from_config(cfg.image_encoder, load_pretrained=load_pretrained)
    check_downsampling(image_encoder, mask_ae)
    denoiser = build_denoiser_for(cfg, mask_ae.latent_channels, image_encoder.out_channels,
                                  cfg.data.resolution // mask_ae.downsample_factor, load_pretrained=load_pretrained)
    return {"mask_autoencoder": mask_ae, "image_encoder": image_encoder, "denoiser": denoiser}


def build_component(name: str, cfg: Config, entry: dict) -> nn.Module:
    """An untrained module of the right shape for component ``name`` of a stored model
    (``entry``: its record in ``model.json``); its weights are loaded afterwards."""
    if name == "mask_autoencoder":
        from ldmseg.models.mask_autoencoder import MaskAutoencoder

        return MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    if name == "image_encoder":
        from ldmseg.models.image_encoder import ImageEncoder

        # no stored weights: pixel_unshuffle (none needed) or pretrained (loaded from its source)
        return ImageEncoder.from_config(cfg.image_encoder, load_pretrained=entry.get("weights") is None)
    if name == "denoiser":
        shape = (int(entry["latent_channels"]), int(entry["image_channels"]), int(entry["sample_size"]))
        def build() -> nn.Module:
            return build_denoiser_for(cfg, *shape, load_pretrained=False)

        try:  # stored weights replace every tensor (a strict load): no random initialisation needed
            return build_empty(build) if entry.get("weights") else build()
        except ValueError:
            if not cfg.denoiser.pretrained:
                raise
            # a hub id without denoiser.sd_config: the shape comes with the pretrained weights
            return build_denoiser_for(cfg, *shape, load_pretrained=True)
    raise ValueError(f"unknown component {name!r} in model.json; known: {', '.join(COMPONENTS)}")
