"""What a training stage carries from step to step, and its resume file.

:class:`TrainState` holds the stage's modules, optimiser, lr schedule, ``GradScaler`` (fp16 on
CUDA), EMA, noise generator, step count (applied updates) and non-finite guard (skipped
batches); :meth:`TrainState.save` / :meth:`TrainState.load` write and read ``trainer_state.pt``
(tensors only: loaded with ``weights_only=True``; the scaler's state and the skip total included)
next to a checkpoint's model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmseg.config import Config
from ldmseg.train_config import TrainConfig
from ldmseg.training.build import Stage, build_stage
from ldmseg.training.optim import NonFiniteGuard, ema_copy, make_ema, make_optimizer, make_scaler

TRAINER_STATE = "trainer_state.pt"
"""The resume file of a checkpoint folder."""


@dataclass
class TrainState:
    """A training stage in progress; build it with :meth:`create`.

    ``trained`` is the module the step runs (``model`` or its DDP wrapper, see :meth:`wrap`);
    ``generator`` draws the step's noise (seed it with :meth:`seed_generator` once the step is known).
    """

    stage: Stage
    cfg: Config
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    generator: torch.Generator | None = None
    step: int = 0
    trained: nn.Module = field(default=None)
    guard: NonFiniteGuard = field(default=None)
    """Counts batches skipped for a non-finite loss or grad norm (``train_*.max_nonfinite_steps``)."""

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = self.stage.model
        if self.guard is None:
            section = "train_ae" if self.name == "ae" else "train_ldm"
            self.guard = NonFiniteGuard(self.train_cfg.max_nonfinite_steps, section)

    @classmethod
    def create(cls, stage: str, cfg: Config, *, ae_model: str | None = None,
               device: str | torch.device = "cpu") -> "TrainState":
        """Seed the global RNG with the stage's ``seed`` (the same initial weights on every rank),
        build its modules (:func:`~ldmseg.training.build.build_stage`), then the optimiser and lr
        schedule (whose time-budget clock starts now), the EMA (LDM stage, ``train_ldm.ema_decay``)
        and a ``GradScaler`` for fp16 on CUDA."""
        device = torch.device(device)
        tcfg = train_config(cfg, stage)
        torch.manual_seed(tcfg.seed)
        built = build_stage(stage, cfg, ae_model=ae_model, device=device)
        optimizer, lr_scheduler = make_optimizer(built.model.parameters(), tcfg)
        ema = make_ema(built.model, tcfg.ema_decay) if stage == "ldm" else None
        if built.components is not None:
            built.components.ema = ema
        return cls(built, cfg, optimizer, lr_scheduler, device, scaler=make_scaler(tcfg.mixed_precision, device),
                   ema=ema)

    @property
    def name(self) -> str:
        """The stage: ``ae`` or ``ldm``."""
        return self.stage.name

    @property
    def model(self) -> nn.Module:
        """The trained module, unwrapped."""
        return self.stage.model

    @property
    def components(self):
        """LDM stage: the :class:`~ldmseg.training.losses.LDMComponents` the step works on."""
        return self.stage.components

    @property
    def train_cfg(self) -> TrainConfig:
        return train_config(self.cfg, self.name)

    def seed_generator(self, seed: int) -> None:
        """A new noise generator on the state's device, seeded with ``seed``."""
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def wrap(self, trained: nn.Module) -> None:
        """Train through ``trained`` (e.g. the DDP wrapper of ``model``)."""
        self.trained = trained
        if self.components is not None:
            self.components.denoiser = trained

    def judged(self) -> nn.Module:
        """The weights to evaluate and save: an EMA copy of the model when there is an EMA, else the model."""
        return ema_copy(self.model, self.ema) if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "step": self.step,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped_steps": self.guard.total}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.guard.total, self.guard.consecutive = int(state.get("skipped_steps", 0)), 0

    def save(self, folder: str | Path) -> None:
        """Write ``folder/trainer_state.pt``."""
        torch.save(self.state_dict(), Path(folder) / TRAINER_STATE)

    def load(self, folder: str | Path) -> None:
        """Resume from ``folder/trainer_state.pt`` (written by :meth:`save`)."""
        path = Path(folder) / TRAINER_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a checkpoint written during training")
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))


def train_config(cfg: Config, stage: str) -> TrainConfig:
    """The ``train_ae`` or ``train_ldm`` section of ``cfg``."""
    return cfg.train_ae if stage == "ae" else cfg.train_ldm
