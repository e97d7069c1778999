"""The modules of a training stage: :func:`build_stage`.

- ``ae``: a new mask autoencoder (it is what is trained);
- ``ldm``: the trained mask AE of ``ae_model`` (frozen), the image encoder of the config (frozen)
  and a new denoiser sized for their latents (:func:`ldmseg.models.build.build_components`).

Modules are created in that order with the global torch RNG (seed it first for reproducible
initial weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmseg.config import Config
from ldmseg.training.losses import LDMComponents

STAGES = ("ae", "ldm")


@dataclass
class Stage:
    """What :func:`build_stage` returns."""

    name: str
    """``ae`` or ``ldm``."""
    model: nn.Module
    """The module trained: the mask AE or the denoiser."""
    components: LDMComponents | None = None
    """LDM stage: the denoiser with its frozen mask AE, image encoder and latent scale."""

    def modules_to_save(self, trained: nn.Module) -> dict[str, nn.Module]:
        """The model folder's components, with ``trained`` (e.g. the EMA copy) as the trained module."""
        if self.name == "ae":
            return {"mask_autoencoder": trained}
        return {"mask_autoencoder": self.components.mask_ae, "image_encoder": self.components.image_encoder,
                "denoiser": trained}


def build_stage(stage: str, cfg: Config, *, ae_model: str | None = None, device: str | torch.device = "cpu",
                load_pretrained: bool = True) -> Stage:
    """The modules stage ``stage`` (``ae`` or ``ldm``) of ``cfg`` trains, on ``device``.

    ``ae_model``: the LDM stage's trained mask AE (a model folder of the ``ae`` stage).
    ``load_pretrained=False`` (resuming from a checkpoint, whose weights replace the trained
    module's): the trained module is built on the meta device and given uninitialised storage on
    ``device`` (:func:`ldmseg.models.build.build_empty`), so neither random initialisation nor the
    denoiser's pretrained weights (``denoiser.pretrained``) are paid for; its shape comes from
    ``denoiser.sd_config`` or the pretrained ``config.json``. The frozen image encoder, which
    checkpoints do not hold, is always loaded. Load the checkpoint before using the module.
    """
    from ldmseg.config import ConfigError
    from ldmseg.models.build import build_empty

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if stage == "ae":
        from ldmseg.models.mask_autoencoder import MaskAutoencoder

        if not load_pretrained:
            return Stage("ae", build_empty(lambda: MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots), device))
        return Stage("ae", MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots).to(device))
    if not ae_model:
        raise ConfigError("the ldm stage needs ae_model: the model folder of a trained mask AE")
    from ldmseg.checkpoint import load_model
    from ldmseg.models.build import build_components, build_denoiser_for, check_downsampling
    from ldmseg.models.image_encoder import ImageEncoder

    loaded = load_model(ae_model, device=device)
    mask_ae = loaded.components["mask_autoencoder"].eval().requires_grad_(False)
    if load_pretrained:
        parts = build_components(cfg, mask_ae=mask_ae)
        image_encoder, denoiser = parts["image_encoder"].to(device), parts["denoiser"].to(device)
    else:
        image_encoder = ImageEncoder.from_config(cfg.image_encoder).to(device)  # frozen, not in checkpoints
        check_downsampling(image_encoder, mask_ae)
        shape = (mask_ae.latent_channels, image_encoder.out_channels, cfg.data.resolution // mask_ae.downsample_factor)
        denoiser = build_empty(lambda: build_denoiser_for(cfg, *shape, load_pretrained=False), device)
    comps = LDMComponents(denoiser=denoiser, mask_ae=mask_ae, image_encoder=image_encoder,
                          latent_scale=float(loaded.latent_scale))
    return Stage("ldm", denoiser, comps)
