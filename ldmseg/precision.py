"""Numeric precision on a device: ``mixed_precision`` / ``sampling.autocast`` values (``no``, ``fp16``,
``bf16``, ``auto``) resolved for the device (:func:`resolve_precision`), the autocast context they
mean (:func:`autocast_context`), and CUDA's fast paths (:func:`enable_cuda_fast_paths`).

Used by training (:mod:`ldmseg.training.optim`) and sampling (:mod:`ldmseg.diffusion.sampling`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this message is given in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_precision(mixed_precision: str, device) -> str:
    """``mixed_precision`` with ``auto`` resolved for ``device``: ``bf16`` on a CUDA GPU that
    supports it (Ampere and newer: no loss scaling needed), ``fp16`` on an older GPU (trained with a
    ``GradScaler``), ``no`` (float32) elsewhere. Other values are returned unchanged."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.device(device).type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_context(device: torch.device, mixed_precision: str):
    """The autocast context for ``mixed_precision`` (``no``, ``fp16``, ``bf16``, ``auto``) on ``device``.

    ``fp16`` needs CUDA and ``bf16`` a device that supports it; otherwise training runs in
    float32 and a warning says so (once). ``auto``: :func:`resolve_precision`.
    """
    device = torch.device(device)
    mixed_precision = resolve_precision(mixed_precision, device)
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision == "fp16":
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        warn_once(f"mixed_precision=fp16 needs a CUDA device (got {device.type}); running in float32. "
                  "Use bf16 on CPU.")
        return contextlib.nullcontext()
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            warn_once("this GPU does not support bf16; running in float32 (use mixed_precision=fp16)")
            return contextlib.nullcontext()
        if device.type not in ("cuda", "cpu"):
            warn_once(f"bf16 autocast is not set up for device {device.type}; running in float32")
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or 'auto', got {mixed_precision!r}")


def enable_cuda_fast_paths(device) -> bool:
    """On CUDA: TF32 matmuls and convolutions (Ampere+, ~10-bit mantissa inside fp32 kernels) and
    ``cudnn.benchmark`` (fixed training shapes: the fastest conv algorithm is picked once).
    Returns whether anything was set (nothing on other devices)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return True
