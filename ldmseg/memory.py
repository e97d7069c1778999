"""What a training stage holds per GPU and writes per checkpoint, by arithmetic on byte counts.

:func:`estimate_stage` takes the three components of a config (built on the meta device: shapes
only, see :func:`ldmseg.commands.model_summary.build_on_meta`, or real modules) and returns a
:class:`StageEstimate`:

- **parameters** of the modules the stage puts on its device (``ae``: the mask autoencoder, all
  trained; ``ldm``: the frozen mask AE and image encoder and the denoiser, whose trainable
  parameters are those with ``requires_grad``: Stable Diffusion's frozen time embedding is not);
- **fixed memory per GPU**: the fp32 weights of every module on the device, the fp32 gradients of
  the trainable parameters, AdamW's two fp32 moments, the EMA's fp32 shadow (``train_ldm.ema_decay``;
  in host memory instead with ``train_ldm.ema_on_cpu``), DDP's gradient buckets (more than one
  worker: Ray's ``prepare_model`` wraps with the default ``gradient_as_bucket_view=False``, which
  keeps a copy of the gradients) and a ``GradScaler``'s two scalars (fp16 on CUDA). Activations
  are **not** included: they depend on the batch per GPU, the resolution and gradient checkpointing;
- **checkpoint size**: one checkpoint folder as the trainer writes it, the model folder of
  :func:`ldmseg.checkpoint.save_model` (``model.json`` and one safetensors file per component with
  weights: a pretrained image encoder is stored as its source id and ``pixel_unshuffle`` has no
  parameters; the trained component's file holds the EMA weights when there is an EMA) plus
  ``trainer_state.pt`` (:meth:`ldmseg.training.state.TrainState.save` with ``ema_in_model=True``:
  the trained module's raw weights, the AdamW state, lr schedule, scaler, step and the EMA's
  counters; its shadow is the model folder's file, written once).

Nothing is allocated or written: every figure is ``numel × element_size`` of the tensors involved,
plus small allowances for file headers (safetensors' JSON header, ``torch.save``'s zip records)
that a test checks against real files of ``conf/tiny.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

from torch import nn

from ldmseg.config import Config
from ldmseg.redact import public_dict

GIB = 1 << 30
SAFETENSORS_BYTES_PER_TENSOR = 64
"""safetensors' JSON header per tensor, beyond its name: dtype, shape and offsets."""
TORCH_SAVE_BYTES_PER_TENSOR = 288
"""``torch.save``'s zip archive per tensor: a local file header padded to 64 bytes, a central
directory record and the pickled reference."""
SMALL_STATE_BYTES = 4096
"""``trainer_state.pt``'s small entries: lr schedule, scaler, EMA settings, step, the zip's
fixed records and the pickle's structure."""
GRAD_SCALER_BYTES = 8
"""A ``GradScaler`` on the device: its scale (float32) and growth tracker (int32)."""
ACTIVATIONS_NOTE = ("activations are excluded: they depend on the batch per GPU, the resolution and "
                    "gradient checkpointing")


@dataclass(frozen=True)
class Item:
    """One line of an estimate: what it is, its bytes, and where the figure comes from."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class StageEstimate:
    """Parameters, fixed memory per GPU and checkpoint size of one training stage."""

    stage: str
    """``ae`` or ``ldm``."""
    trained: str
    """The component the stage trains: ``mask_autoencoder`` or ``denoiser``."""
    on_device: tuple[str, ...]
    """Components on each GPU."""
    total_params: int
    trainable_params: int
    gpu: tuple[Item, ...]
    """Fixed memory per GPU (activations excluded)."""
    host: tuple[Item, ...]
    """Training state kept in host memory instead (the EMA with ``ema_on_cpu``)."""
    checkpoint: tuple[Item, ...]
    """The files of one checkpoint folder."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gpu_bytes(self) -> int:
        return sum(i.bytes for i in self.gpu)

    @property
    def host_bytes(self) -> int:
        return sum(i.bytes for i in self.host)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(i.bytes for i in self.checkpoint)

    def to_dict(self) -> dict:
        """JSON-able: every field, the three totals, and GiB figures of the totals."""
        out = asdict(self)
        out.update(gpu_bytes=self.gpu_bytes, host_bytes=self.host_bytes, checkpoint_bytes=self.checkpoint_bytes,
                   gpu_gib=round(self.gpu_bytes / GIB, 3), host_gib=round(self.host_bytes / GIB, 3),
                   checkpoint_gib=round(self.checkpoint_bytes / GIB, 3))
        return out


FREE_SPACE_MARGIN = 0.1
"""Free disk space wanted beyond a size estimate, as a fraction of it."""
FREE_SPACE_SLACK = 64 << 20
"""Free disk space wanted beyond the estimate and the margin, in bytes (logs, temporary files)."""


def space_wanted(needed: int) -> int:
    """Free bytes to ask of a disk for ``needed`` estimated bytes: the margin and the slack added
    (the trainer's check before step 1 and ``train --dry-run`` use the same)."""
    return int(needed * (1 + FREE_SPACE_MARGIN)) + FREE_SPACE_SLACK


def parameter_bytes(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of ``module``'s parameters (``trainable``: only those with ``requires_grad`` (True) or
    without (False); ``None``: all). Works on the meta device."""
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def state_bytes(module: nn.Module) -> tuple[int, int, int]:
    """``(bytes, tensors, name characters)`` of ``module.state_dict()`` (parameters and buffers)."""
    sd = module.state_dict()
    return (sum(t.numel() * t.element_size() for t in sd.values()), len(sd), sum(len(k) for k in sd))


def safetensors_bytes(module: nn.Module) -> int:
    """Size of the safetensors file of ``module``: its tensors plus the JSON header."""
    data, tensors, names = state_bytes(module)
    return 8 + data + names + SAFETENSORS_BYTES_PER_TENSOR * tensors


def bundles_weights(name: str, module: nn.Module, cfg: Config) -> bool:
    """Whether :func:`ldmseg.checkpoint.save_model` writes ``<name>.safetensors``: always, except an
    image encoder that is pretrained (stored as its source id) or ``pixel_unshuffle`` (no parameters)."""
    if name != "image_encoder":
        return True
    kind = getattr(module, "kind", cfg.image_encoder.kind)
    return kind != "pixel_unshuffle" and not cfg.image_encoder.pretrained


def model_folder_bytes(cfg: Config, components: Mapping[str, nn.Module]) -> int:
    """Bytes of the safetensors files :func:`ldmseg.checkpoint.save_model` writes for ``components``
    (DDP wrappers unwrapped; :func:`bundles_weights` decides which are written)."""
    from ldmseg.models.ddp import unwrap

    return sum(safetensors_bytes(unwrap(m)) for name, m in components.items() if bundles_weights(name, unwrap(m), cfg))


def model_json_bytes(cfg: Config) -> int:
    """An upper estimate of ``model.json``: the resolved config as stored, plus 2 KiB for the
    format, components, versions and metadata."""
    return len(json.dumps(public_dict(cfg), indent=2)) + 2048


def estimate_stage(stage: str, cfg: Config, modules: Mapping[str, nn.Module], *, grad_scaler: bool = False
                   ) -> StageEstimate:
    """The :class:`StageEstimate` of stage ``stage`` (``ae`` or ``ldm``) of ``cfg``.

    Args:
        modules: ``mask_autoencoder``, ``image_encoder``, ``denoiser`` as built from ``cfg`` (the
            ``ae`` stage needs only the first); meta-device modules are enough.
        grad_scaler: whether the stage trains with a ``GradScaler`` (fp16 on CUDA).
    """
    if stage not in ("ae", "ldm"):
        raise ValueError(f"unknown stage {stage!r}; choose ae or ldm")
    trained = "mask_autoencoder" if stage == "ae" else "denoiser"
    on_device = ("mask_autoencoder",) if stage == "ae" else ("mask_autoencoder", "image_encoder", "denoiser")
    missing = [n for n in on_device if n not in modules]
    if missing:
        raise ValueError(f"estimate_stage({stage!r}) needs the modules {', '.join(on_device)}; missing {missing}")
    tcfg = cfg.train_ae if stage == "ae" else cfg.train_ldm
    model = modules[trained]
    trainable_tensors = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in trainable_tensors)
    total = sum(p.numel() for n in on_device for p in modules[n].parameters())
    trainable_b = parameter_bytes(model, trainable=True)
    ema_decay = getattr(tcfg, "ema_decay", None)
    ema_on_cpu = bool(getattr(tcfg, "ema_on_cpu", False))
    workers = int(tcfg.num_workers)

    weights = sum(state_bytes(modules[n])[0] for n in on_device)
    gpu = [Item("weights", weights, "fp32, every module on the GPU"),
           Item("gradients", trainable_b, "fp32, of the trainable parameters"),
           Item("adamw_moments", 2 * trainable_b, "AdamW exp_avg + exp_avg_sq, fp32")]
    host: list[Item] = []
    notes = [ACTIVATIONS_NOTE]
    if ema_decay is not None and not ema_on_cpu:
        gpu.append(Item("ema_shadow", trainable_b, f"EMA (ema_decay {ema_decay}), fp32"))
    elif ema_decay is not None:
        host += [Item("ema_shadow", trainable_b, f"EMA (ema_decay {ema_decay}), fp32, ema_on_cpu"),
                 Item("ema_host_buffers", trainable_b, "the weights copied to the host for each EMA update")]
    if workers > 1:
        gpu.append(Item("ddp_buckets", trainable_b, f"DDP gradient buckets ({workers} workers)"))
    if grad_scaler:
        gpu.append(Item("grad_scaler", GRAD_SCALER_BYTES, "GradScaler state (fp16)"))

    folder = [Item("model.json", model_json_bytes(cfg), "config and metadata")]
    for name in on_device:
        if bundles_weights(name, modules[name], cfg):
            what = "EMA weights" if name == trained and ema_decay is not None else (
                "trained weights" if name == trained else "frozen weights")
            folder.append(Item(f"{name}.safetensors", safetensors_bytes(modules[name]), what))
    model_b, model_tensors, model_names = state_bytes(model)
    tensors = model_tensors + 3 * len(trainable_tensors)  # AdamW: exp_avg, exp_avg_sq, step
    trainer_state = (model_b + model_names + 2 * trainable_b + 4 * len(trainable_tensors)
                     + TORCH_SAVE_BYTES_PER_TENSOR * tensors + SMALL_STATE_BYTES)
    folder.append(Item("trainer_state.pt", trainer_state, "raw weights, AdamW moments, step"
                       + (", EMA counters" if ema_decay is not None else "")))
    return StageEstimate(stage, trained, on_device, total, trainable, tuple(gpu), tuple(host), tuple(folder),
                         tuple(notes))


def checkpoint_space(estimate: StageEstimate, num_to_keep: int | None, iterations: int, checkpoint_every: int
                     ) -> tuple[int, int]:
    """``(checkpoints, bytes)`` run storage holds at most: ``num_to_keep`` checkpoints plus the one
    being written before the oldest is deleted (``num_to_keep`` None or < 1: every checkpoint of
    the run, one per ``checkpoint_every`` steps and the final one)."""
    every_one = iterations // max(1, checkpoint_every) + 1
    kept = every_one if not num_to_keep or num_to_keep < 1 else min(num_to_keep + 1, every_one)
    return kept, kept * estimate.checkpoint_bytes
