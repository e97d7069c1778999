"""A stand-in denoiser that records what the sampler or the training step feeds it.

Typical use::

    stub = RecordingDenoiser()
    sample_latents(stub, image_latent, ...)
    stub.calls[i]["x_t"], stub.calls[i]["t"], stub.calls[i]["x0_self"], stub.calls[i]["out"]

Its output is ``gain · x_t + 0.1 · (call number + 1)`` (``gain`` a trainable parameter), so every
call answers differently and a stale or zero input downstream is told apart from the real one.
"""

from __future__ import annotations

import torch
from torch import nn


class RecordingDenoiser(nn.Module):
    """``(x_t, t, image_latent, x0_self) → prediction`` like :class:`ldmseg.models.denoiser.Denoiser`;
    every call's inputs and output are kept (cloned, detached) in :attr:`calls`."""

    self_condition = True

    def __init__(self, gain: float = 0.5):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.calls: list[dict] = []

    def forward(self, x_t, t, image_latent, x0_self=None):
        out = self.gain * x_t + 0.1 * (len(self.calls) + 1)
        self.calls.append({
            "x_t": x_t.detach().clone(), "t": t.detach().clone(),
            "x0_self": None if x0_self is None else x0_self.detach().clone(),
            "x0_self_requires_grad": x0_self is not None and x0_self.requires_grad,
            "grad_enabled": torch.is_grad_enabled(), "out": out.detach().clone(),
        })
        return out
