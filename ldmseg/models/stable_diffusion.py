"""Stable Diffusion v1.x shapes and the surgery that turns its UNet into LDMSeg's denoiser.

- :data:`SD_V1_UNET_CONFIG` / :data:`SD_V1_VAE_CONFIG`: the diffusers configs of SD v1.x's
  ``unet/`` and ``vae/`` (859.5 M and 83.7 M parameters), to build the models without weights
  (e.g. on the meta device to count parameters) or from scratch.
- :func:`strip_cross_attention`: LDMSeg conditions on the image by concatenation, not on text, so
  every transformer block loses its cross-attention (``attn2``) and the norm before it (``norm2``).
  The UNet is then called with ``encoder_hidden_states=None``.
- :func:`widen_conv_in`: the input conv takes ``[mask latent | image latent | self-cond x̂₀]``; the
  pretrained weights go to the mask channels, the new channels start at zero, so at step 0 the
  widened UNet computes what the pretrained one computed on the mask latent alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SD_V1_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
"""``UNet2DConditionModel`` kwargs of Stable Diffusion v1.x (``unet/config.json``)."""

SD_V1_VAE_CONFIG: dict = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
"""``AutoencoderKL`` kwargs of Stable Diffusion v1.x (``vae/config.json``)."""

UNET_CONFIGS: dict[str, dict] = {"sd-v1": SD_V1_UNET_CONFIG}
VAE_CONFIGS: dict[str, dict] = {"sd-v1": SD_V1_VAE_CONFIG}


def sd_unet_config(name: str) -> dict:
    """A copy of the named SD UNet config (``denoiser.sd_config``)."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown denoiser.sd_config {name!r}; choose one of: {', '.join(UNET_CONFIGS)}")
    return copy.deepcopy(UNET_CONFIGS[name])


def sd_vae_config(name: str) -> dict:
    """A copy of the named SD VAE config."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown SD VAE config {name!r}; choose one of: {', '.join(VAE_CONFIGS)}")
    return copy.deepcopy(VAE_CONFIGS[name])


def strip_cross_attention(unet: nn.Module) -> int:
    """Remove text cross-attention in place: every ``BasicTransformerBlock`` gets ``attn2 = None``
    and ``norm2 = None`` (so they hold no parameters and are skipped in ``forward``).

    Returns the number of blocks changed. Call the UNet with ``encoder_hidden_states=None``.
    """
    from diffusers.models.attention import BasicTransformerBlock

    stripped = 0
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            if getattr(module, "only_cross_attention", False):
                raise ValueError("this UNet's attn1 is a cross-attention (only_cross_attention=True); "
                                 "it cannot run without text")
            if module.attn2 is not None:
                stripped += 1
            module.attn2 = None
            module.norm2 = None
    return stripped


def widen_conv_in(unet: nn.Module, in_channels: int, copy_channels: int) -> None:
    """Replace ``unet.conv_in`` by one with ``in_channels`` inputs, in place.

    Input channels ``[0, copy_channels)`` get the old weights of the same input channels (at most
    the old input count), every other input channel gets zero weights; bias, kernel size, stride
    and padding are kept. ``unet.config.in_channels`` is updated. A ``conv_in`` that already has
    ``in_channels`` inputs (an LDMSeg UNet saved after training) is left untouched.
    """
    old = unet.conv_in
    if in_channels < 1 or copy_channels < 0:
        raise ValueError(f"in_channels must be >= 1 and copy_channels >= 0, got {in_channels}, {copy_channels}")
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    n = min(copy_channels, old.in_channels, in_channels)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :n] = old.weight[:, :n]
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    if hasattr(unet, "register_to_config"):
        unet.register_to_config(in_channels=in_channels)
