"""The one DDP unwrapper: the model inside ``DistributedDataParallel`` (or any ``.module`` wrapper)."""

from __future__ import annotations

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper; ``module`` itself
    when it is not wrapped."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module
