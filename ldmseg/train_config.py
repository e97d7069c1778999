"""The training sections of a config: ``train_ae`` (:class:`TrainConfig`) and ``train_ldm``
(:class:`LDMTrainConfig`), validated on load with the rest (:mod:`ldmseg.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    """A training stage: the mask autoencoder's (``train_ae``), and what the diffusion stage's
    (``train_ldm``, :class:`LDMTrainConfig`) adds to."""

    iterations: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 200
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    """Autocast dtype on the training device; ``auto``: bf16 on a GPU that supports it, else fp16 with a
    ``GradScaler`` on CUDA, else float32 (:func:`ldmseg.precision.resolve_precision`)."""
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each training worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray Train's ``placement_strategy``: ``PACK`` fills nodes first, ``SPREAD`` spreads workers."""
    torch_threads: Optional[int] = None
    """torch threads per worker (``None``: ``cpus_per_worker``). On a small machine, reserving one
    CPU but using two threads leaves a CPU free for Ray Data's read tasks."""
    report_every: int = 50
    checkpoint_every: int = 500
    num_to_keep: int = 2
    max_failures: int = 0
    time_budget_s: Optional[float] = None
    """Stop after this many seconds of training (checked between steps); ``None``: no limit."""
    validate_every: int = 0
    """Monitor (PQ on a fixed small batch, overlay panel; see ``ldmseg.training.monitor``) every
    this many steps; 0: once, after the final step."""
    validate_images: int = 8
    """Images in the monitoring batch (from the ``val`` split if there is one, else ``train``);
    0 turns monitoring off."""
    checkpoint_dir: Optional[str] = None
    """Node-local folder checkpoints are written to before upload (``None``: the system temp folder);
    its free space is checked before step 1 against the estimated checkpoint size."""
    max_nonfinite_steps: int = 20
    """Raise after this many optimizer steps in a row skipped for a non-finite loss or grad norm (>= 1)."""


@dataclass
class LDMTrainConfig(TrainConfig):
    """The diffusion stage (``train_ldm``): a :class:`TrainConfig` with an EMA and sampled monitoring."""

    ema_decay: Optional[float] = None
    """Decay of the denoiser's exponential moving average (saved and monitored instead of the
    raw weights); ``None``: no EMA."""
    validate_steps: int = 10
    """Sampling steps of the monitoring (the config's sampler and thresholds)."""
    ema_on_cpu: bool = False
    """Keep the EMA's shadow weights in host memory: 4 bytes per trainable parameter less on each GPU,
    one device-to-host copy of the weights per step."""
