"""Parameter counts of the mask autoencoder, the image encoder and the denoiser of a config, and
per training stage the fixed memory per GPU and the size of one checkpoint (:mod:`ldmseg.memory`;
activations are not included).

Every model is built on the meta device (shapes only: no memory, no weights), so this runs in
seconds even for the 815 M-parameter Stable Diffusion denoiser and never downloads anything: a
``pretrained`` component is built from its config instead (``sd_config``, a local directory's
``config.json``, or Stable Diffusion v1.x's shape for a hub id).

Examples:
  ldmseg model-summary --config conf/coco.yaml
  ldmseg model-summary --config conf/tiny.yaml denoiser.block_out_channels=[32,64] --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from ldmseg.config import Config, ConfigError, load_config
from ldmseg.memory import ACTIVATIONS_NOTE, GIB, StageEstimate, checkpoint_space, estimate_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. conf/tiny.yaml or conf/coco.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mask_ae.widths=[16,32]")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: total/trainable per component, and per stage the memory "
                             "per GPU and checkpoint size")


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"total": N, "trainable": N}`` (trainable: ``requires_grad``) of a module."""
    params = list(module.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def build_on_meta(cfg: Config) -> dict[str, nn.Module]:
    """The three components of ``cfg`` on the meta device, without loading any pretrained weights."""
    from ldmseg.models.build import build_components

    with torch.device("meta"):
        return build_components(cfg, load_pretrained=False)


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def may_use_grad_scaler(cfg: Config, stage: str) -> bool:
    """Whether the stage may train with a ``GradScaler``: on GPUs with ``fp16``, or ``auto`` (fp16
    on a GPU without bf16; :func:`ldmseg.precision.resolve_precision`)."""
    tcfg = cfg.train_ae if stage == "ae" else cfg.train_ldm
    return bool(tcfg.use_gpu) and tcfg.mixed_precision in ("fp16", "auto")


def stage_estimates(cfg: Config, models: dict[str, nn.Module]) -> dict[str, StageEstimate]:
    """The :class:`~ldmseg.memory.StageEstimate` of the ``ae`` and ``ldm`` stages of ``cfg``."""
    return {stage: estimate_stage(stage, cfg, models, grad_scaler=may_use_grad_scaler(cfg, stage))
            for stage in ("ae", "ldm")}


def stage_record(cfg: Config, est: StageEstimate) -> dict:
    """A stage's estimate as JSON, with the most checkpoints its run storage holds at once."""
    tcfg = cfg.train_ae if est.stage == "ae" else cfg.train_ldm
    kept, storage = checkpoint_space(est, tcfg.num_to_keep, tcfg.iterations, tcfg.checkpoint_every)
    return {**est.to_dict(), "num_workers": tcfg.num_workers, "storage_checkpoints": kept, "storage_bytes": storage,
            "storage_gib": round(storage / GIB, 3)}


def _gib(n: int) -> str:
    return f"{n / GIB:,.3f}"


def print_stage(record: dict) -> None:
    """The human table of one stage's record (:func:`stage_record`)."""
    print(f"stage {record['stage']}: trains {record['trained']} on {record['num_workers']} worker(s); "
          f"on each GPU: {', '.join(record['on_device'])}")
    print(f"  {'parameters':<30} {record['total_params']:>16,} total, {record['trainable_params']:,} trainable")
    print(f"  {'per GPU (fixed part)':<30} {'bytes':>16} {'GiB':>9}")
    for item in record["gpu"]:
        print(f"    {item['name']:<28} {item['bytes']:>16,} {_gib(item['bytes']):>9}  {item['note']}")
    print(f"    {'total':<28} {record['gpu_bytes']:>16,} {_gib(record['gpu_bytes']):>9}  + activations")
    if record["host"]:
        print("  host memory per worker (instead of the GPU)")
        for item in record["host"]:
            print(f"    {item['name']:<28} {item['bytes']:>16,} {_gib(item['bytes']):>9}  {item['note']}")
    print("  checkpoint folder")
    for item in record["checkpoint"]:
        print(f"    {item['name']:<28} {item['bytes']:>16,} {_gib(item['bytes']):>9}  {item['note']}")
    print(f"    {'total':<28} {record['checkpoint_bytes']:>16,} {_gib(record['checkpoint_bytes']):>9}")
    print(f"  {'run storage, at most':<30} {record['storage_bytes']:>16,} {_gib(record['storage_bytes']):>9}  "
          f"{record['storage_checkpoints']} checkpoints (num_to_keep + 1)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"ldmseg model-summary: {exc}", file=sys.stderr)
        return 2
    try:
        models = build_on_meta(cfg)
    except ValueError as exc:
        print(f"ldmseg model-summary: {exc}", file=sys.stderr)
        return 2
    counts = {name: count_parameters(model) for name, model in models.items()}
    stages = {name: stage_record(cfg, est) for name, est in stage_estimates(cfg, models).items()}

    mask_ae, image_encoder = models["mask_autoencoder"], models["image_encoder"]
    if args.json:
        print(json.dumps({"config": str(args.config), "name": cfg.name, "components": counts, "stages": stages,
                          "notes": [ACTIVATIONS_NOTE]}))
        return 0

    latent = cfg.data.resolution // mask_ae.downsample_factor
    origins = {
        "mask_autoencoder": (
            f"widths {list(cfg.mask_ae.widths)}, f={mask_ae.downsample_factor}, "
            f"latent {mask_ae.latent_channels}x{latent}x{latent}, S={mask_ae.num_slots}"
        ),
        "image_encoder": f"{image_encoder.origin}; {image_encoder.out_channels} channels, f={image_encoder.downsample_factor}",
        "denoiser": f"{models['denoiser'].origin}; {models['denoiser'].in_channels} input channels",
    }
    print(f"config {args.config} (name {cfg.name}), {cfg.data.resolution}x{cfg.data.resolution} pixels")
    print(f"{'component':<18} {'total':>16} {'trainable':>16}  {'(millions)':>10}")
    for name, c in counts.items():
        print(f"{name:<18} {c['total']:>16,} {c['trainable']:>16,}  {_millions(c['total']):>10}")
        print(f"{'':<18} {origins[name]}")
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    print(f"{'all':<18} {total:>16,} {trainable:>16,}  {_millions(total):>10}")
    print("Counted on the meta device: no weights were allocated, loaded or downloaded "
          "(pretrained components are built from their config).")
    print()
    print("Training memory per GPU and checkpoint size (1 GiB = 2^30 bytes);")
    print(f"{ACTIVATIONS_NOTE}.")
    for record in stages.values():
        print_stage(record)
    return 0
