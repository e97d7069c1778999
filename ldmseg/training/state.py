"""What a training stage carries from step to step, and its resume file.

:class:`TrainState` holds the stage's modules, optimiser, lr schedule, ``GradScaler`` (fp16 on
CUDA), EMA, noise generator, step count (applied updates) and non-finite guard (skipped
batches); :meth:`TrainState.save` / :meth:`TrainState.load` write and read ``trainer_state.pt``
(tensors only: loaded with ``weights_only=True``; the scaler's state and the skip total included)
next to a checkpoint's model folder.

In a checkpoint the EMA's weights are written once: the model folder's ``denoiser.safetensors``
*is* the EMA (:meth:`TrainState.saved_weights`), and ``trainer_state.pt`` (``ema_in_model=True``)
holds the raw model, the optimiser, the EMA's counters without its shadow tensors, the lr
schedule, scaler, step and skip total; :meth:`TrainState.load` reads the shadow back from the
safetensors next to it.
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
from ldmseg.training.optim import (NonFiniteGuard, ema_copy, ema_state_dict, ema_weights, make_ema, make_optimizer,
                                   make_scaler, trainable_names, trainable_params)

TRAINER_STATE = "trainer_state.pt"
"""The resume file of a checkpoint folder."""

EMA_SHADOW_FILE = "ema_shadow_file"
"""Key of ``trainer_state.pt`` naming the model folder's safetensors that hold the EMA's shadow
(written with ``ema_in_model=True``); absent: the shadow is in ``trainer_state.pt`` itself."""


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
               device: str | torch.device = "cpu", load_pretrained: bool = True) -> "TrainState":
        """Seed the global RNG with the stage's ``seed`` (the same initial weights on every rank),
        build its modules (:func:`~ldmseg.training.build.build_stage`), then the optimiser and lr
        schedule (whose time-budget clock starts now), the EMA (LDM stage, ``train_ldm.ema_decay``)
        and a ``GradScaler`` for fp16 on CUDA. With ``train_ldm.ema_on_cpu`` the EMA's shadow lives
        in host memory. ``load_pretrained=False`` when a checkpoint is loaded next (:meth:`load`):
        the trained module is built empty, without reading pretrained weights or drawing random ones
        (:func:`~ldmseg.training.build.build_stage`); its values are garbage until then."""
        device = torch.device(device)
        tcfg = train_config(cfg, stage)
        torch.manual_seed(tcfg.seed)
        built = build_stage(stage, cfg, ae_model=ae_model, device=device, load_pretrained=load_pretrained)
        optimizer, lr_scheduler = make_optimizer(built.model.parameters(), tcfg)
        ema = (make_ema(built.model, tcfg.ema_decay, on_cpu=bool(getattr(tcfg, "ema_on_cpu", False)))
               if stage == "ldm" else None)
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

    @property
    def trained_component(self) -> str:
        """The model-folder component the stage trains: ``mask_autoencoder`` or ``denoiser``."""
        return "mask_autoencoder" if self.name == "ae" else "denoiser"

    def judged(self) -> nn.Module:
        """The weights to evaluate: a copy of the model with the EMA weights (on the model's device)
        when there is an EMA, else the model. The trainer avoids the copy: it saves
        :meth:`saved_weights` and monitors inside :meth:`ema_applied`."""
        return ema_copy(self.model, self.ema) if self.ema is not None else self.model

    def ema_applied(self):
        """Context manager: the model holds the EMA weights within the block (its own are kept in
        host memory and restored on exit); yields the unwrapped model. Without an EMA, the model."""
        return ema_weights(self.model, self.ema)

    def saved_weights(self) -> dict[str, torch.Tensor] | None:
        """The trained component's weights for the model folder when they are not the module's own:
        with an EMA, the model's state dict on the CPU with the EMA's shadow for its trainable
        entries (:func:`~ldmseg.training.optim.ema_state_dict`: no copy on the GPU); else None."""
        return ema_state_dict(self.model, self.ema) if self.ema is not None else None

    def state_dict(self, *, ema_shadow: bool = True) -> dict:
        """Everything to resume from; ``ema_shadow=False`` leaves the EMA's shadow tensors out (they
        are the model folder's weights, :meth:`save` with ``ema_in_model=True``)."""
        ema = None
        if self.ema is not None:
            ema = dict(self.ema.state_dict())
            if not ema_shadow:
                ema.pop("shadow_params", None)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "step": self.step, "ema": ema,
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

    def save(self, folder: str | Path, *, ema_in_model: bool = False) -> None:
        """Write ``folder/trainer_state.pt`` (through a temporary name, so a crash never leaves a
        truncated file under the real one).

        ``ema_in_model=True``: ``folder`` also holds the model folder written with
        :meth:`saved_weights`, whose ``<trained component>.safetensors`` are the EMA's shadow; the
        shadow is then not written a second time (a quarter less for an AdamW checkpoint)."""
        path = Path(folder) / TRAINER_STATE
        lean = ema_in_model and self.ema is not None
        state = self.state_dict(ema_shadow=not lean)
        if lean:
            state[EMA_SHADOW_FILE] = f"{self.trained_component}.safetensors"
        tmp = path.with_name(path.name + ".partial")
        torch.save(state, tmp)
        tmp.replace(path)

    def load(self, folder: str | Path) -> None:
        """Resume from ``folder/trainer_state.pt`` (written by :meth:`save`), and the EMA's shadow
        from the model folder's safetensors when it was saved with ``ema_in_model=True``."""
        path = Path(folder) / TRAINER_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a checkpoint written during training")
        state = torch.load(path, map_location=self.device, weights_only=True)
        shadow_file = state.pop(EMA_SHADOW_FILE, None)
        self.load_state_dict(state)
        if shadow_file and self.ema is not None:
            self.ema.shadow_params = read_shadow(Path(folder) / shadow_file, trainable_names(self.model),
                                                 self.ema.shadow_params[0].device)

    def checkpoint_bytes(self) -> int:
        """Estimated bytes of one checkpoint of this state (:meth:`save` with ``ema_in_model`` plus
        the model folder): the saved components' tensors, the raw model's and the optimiser's state
        (before the first step AdamW has none yet: counted as two moments per trainable parameter,
        three with ``amsgrad``). File headers and pickled scalars are not counted."""
        from ldmseg.checkpoint import tensor_bytes
        from ldmseg.memory import model_folder_bytes

        folder = model_folder_bytes(self.cfg, self.stage.modules_to_save(self.model))
        model = tensor_bytes(self.model.state_dict())
        if self.optimizer.state:
            optimizer = tensor_bytes(self.optimizer.state_dict()["state"])
        else:
            moments = 3 if any(g.get("amsgrad") for g in self.optimizer.param_groups) else 2
            optimizer = moments * sum(p.numel() * p.element_size() for p in trainable_params(self.optimizer))
        return folder + model + optimizer


def read_shadow(path: Path, names: list[str], device) -> list[torch.Tensor]:
    """The tensors ``names`` of safetensors file ``path`` on ``device``, in that order (a name
    written once for several tied ones is found through the file's metadata)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: trainer_state.pt takes the EMA's weights from it; the checkpoint "
                                "folder is incomplete (resume from an earlier checkpoint)")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys, aliases = set(f.keys()), f.metadata() or {}
        missing = [n for n in names if n not in keys and aliases.get(n) not in keys]
        if missing:
            raise ValueError(f"{path} lacks the EMA tensors {missing[:3]}: it was not written for this model")
        return [f.get_tensor(n if n in keys else aliases[n]) for n in names]


def train_config(cfg: Config, stage: str) -> TrainConfig:
    """The ``train_ae`` or ``train_ldm`` section of ``cfg``."""
    return cfg.train_ae if stage == "ae" else cfg.train_ldm
