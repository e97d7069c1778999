"""GPU smoke test of the paper recipe (``conf/coco.yaml``): what to run first when a GPU is at hand.

In at most ~5 minutes on one GPU, with the recipe's shapes (512 px, 128 slots, the SD v1.x UNet with
random weights: nothing is downloaded) and procedural slot maps with random images:

1. the denoiser's training step (``train_step`` of a ``TrainState``: self-conditioning, Min-SNR, AdamW, EMA) for
   ``--steps`` steps at ``--batch`` per GPU, in ``fp16`` with a ``GradScaler`` and in ``bf16``
   (when the GPU supports it): steps/s, peak memory, skipped steps, loss scale, and whether every
   loss and gradient norm was finite;
2. one AE training step (``ae_train_step``) in float32;
3. one checkpoint save as training writes it (model folder + ``trainer_state.pt``): seconds and bytes;
4. sampling (``Segmenter``, ``--sample-steps`` DDIM steps) of one batch, with and without autocast:
   images/s and whether both give maps of the same shape (the counts of segments are printed).

Every line is also written to ``--out`` (JSON). It exits 1 when a loss or gradient norm was not
finite in a precision that ran, 2 without a CUDA device (``--device cpu`` runs it anyway on a tiny
config, for the code path only: ``--config conf/tiny.yaml --steps 2 --batch 2``).

    bash benchmarks/gpu_smoke.sh                       # conf/coco.yaml, 20 steps at batch 32
    python benchmarks/gpu_smoke.py --device cpu --config conf/tiny.yaml --steps 2 --batch 2 --sample-steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_batch(cfg, batch_size: int, device, seed: int = 0) -> dict:
    """Procedural slot maps (B, R, R) int64, random images (B, 3, R, R) float32 in [-1, 1], all valid."""
    import torch

    from ldmseg.data.random_maps import random_slot_maps

    g = torch.Generator().manual_seed(seed)
    size = cfg.data.resolution
    slot_map = random_slot_maps(batch_size, size, cfg.data.num_slots, min_area=cfg.data.min_segment_area, generator=g)
    batch = {"image": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1, "slot_map": slot_map,
             "valid": torch.ones_like(slot_map, dtype=torch.bool)}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ldm_state(cfg, device):
    """The LDM stage's :class:`~ldmseg.training.state.TrainState` with random weights of the config's
    shapes (nothing downloaded): optimizer, lr schedule, EMA and GradScaler as training makes them."""
    import torch

    from ldmseg.models.build import build_components
    from ldmseg.training import LDMComponents
    from ldmseg.training.build import Stage
    from ldmseg.training.optim import make_ema, make_optimizer, make_scaler
    from ldmseg.training.state import TrainState

    torch.manual_seed(0)
    parts = build_components(cfg, load_pretrained=False)
    comps = LDMComponents(denoiser=parts["denoiser"].to(device),
                          mask_ae=parts["mask_autoencoder"].to(device).eval().requires_grad_(False),
                          image_encoder=parts["image_encoder"].to(device), latent_scale=1.0)
    comps.ema = make_ema(comps.denoiser, cfg.train_ldm.ema_decay, on_cpu=cfg.train_ldm.ema_on_cpu)
    optimizer, lr_scheduler = make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    state = TrainState(Stage("ldm", comps.denoiser, comps), cfg, optimizer, lr_scheduler, torch.device(device),
                       scaler=make_scaler(cfg.train_ldm.mixed_precision, device), ema=comps.ema)
    state.seed_generator(0)
    return state


def ldm_run(cfg, precision: str, args, device) -> dict:
    """``args.steps`` denoiser steps (``train_step``) at ``args.batch`` in ``precision``: rates, memory,
    finiteness; the state is returned under ``_state`` for the checkpoint."""
    from ldmseg.config import override
    from ldmseg.training import train_step

    run_cfg = override(cfg, {"train_ldm.mixed_precision": precision})
    reset_peak(device)
    state = ldm_state(run_cfg, device)
    batch = make_batch(run_cfg, args.batch, device)
    metrics: list[dict] = []
    step = lambda: metrics.append(train_step(state, batch))  # noqa: E731
    step()  # warm-up: cudnn.benchmark picks its kernels, the allocator grows
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - t0
    timed = metrics[1:]
    finite = all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in timed)
    result = {"precision": precision, "steps": args.steps, "batch": args.batch,
              "steps_per_s": args.steps / seconds, "samples_per_s": args.steps * args.batch / seconds,
              "peak_memory_gib": peak_memory_gib(device), "skipped_steps": int(sum(m["skipped"] for m in timed)),
              "all_finite": finite, "last_loss": timed[-1]["loss"], "loss_scale": timed[-1].get("loss_scale")}
    return {**result, "_state": state}


def ae_run(cfg, args, device) -> dict:
    """One float32 AE step (after one warm-up step) at ``args.batch``."""
    import torch

    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from ldmseg.training import ae_train_step
    from ldmseg.training.optim import make_optimizer

    reset_peak(device)
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots).to(device)
    optimizer, lr_scheduler = make_optimizer(ae.parameters(), cfg.train_ae)
    batch = make_batch(cfg, args.batch, device, seed=1)
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(2):
        synchronize(device)
        t0 = time.perf_counter()
        m = ae_train_step(ae, batch, optimizer, cfg, generator=generator, lr_scheduler=lr_scheduler)
        synchronize(device)
    return {"seconds": time.perf_counter() - t0, "loss": m["loss"], "finite": math.isfinite(m["loss"]),
            "peak_memory_gib": peak_memory_gib(device)}


def checkpoint_run(state, device) -> dict:
    """One checkpoint as training writes it (:func:`~ldmseg.training.trainer.write_checkpoint`): seconds and bytes."""
    from ldmseg.training.trainer import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="ldmseg-smoke-") as tmp:
        synchronize(device)
        t0 = time.perf_counter()
        write_checkpoint(state, tmp, latent_scale=1.0, extra={"stage": "ldm", "step": state.step})
        seconds = time.perf_counter() - t0
        sizes = {f.name: f.stat().st_size for f in Path(tmp).iterdir()}
    return {"seconds": seconds, "bytes": sum(sizes.values()), "files": sizes}


def sampling_run(run_cfg, comps, args, device) -> dict:
    """Segment one batch of ``args.sample_batch`` random images with the EMA denoiser, with and without autocast."""
    import numpy as np

    from ldmseg.config import with_sampling
    from ldmseg.segmenter import Segmenter

    rng = np.random.default_rng(0)
    size = run_cfg.data.resolution
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.sample_batch)]
    seg = Segmenter(run_cfg, comps.mask_ae, comps.image_encoder, comps.denoiser.eval(), 1.0, device=device)
    out = {}
    for autocast in ("no", "auto"):
        seg.cfg = with_sampling(run_cfg, {"autocast": autocast})
        seg.segment(images[:1], steps=args.sample_steps)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        results = seg.segment(images, steps=args.sample_steps)
        synchronize(device)
        seconds = time.perf_counter() - t0
        out[autocast] = {"images_per_s": len(images) / seconds, "segments": [len(r.segments) for r in results],
                         "shapes_ok": all(r.id_map.shape == (size, size) for r in results)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default=str(REPO / "conf" / "coco.yaml"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (code path only)")
    parser.add_argument("--steps", type=int, default=20, help="timed denoiser steps per precision")
    parser.add_argument("--batch", type=int, default=32, help="images per training step (32 per GPU in the recipe)")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--sample-batch", type=int, default=8, help="images segmented per sampling pass")
    parser.add_argument("--out", default="gpu_smoke.json", help="where the JSON results go")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()

    import torch

    from ldmseg.config import ConfigError, load_config
    from ldmseg.precision import enable_cuda_fast_paths

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a GPU machine (or --device cpu with a tiny config)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    enable_cuda_fast_paths(device)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"gpu_smoke: {exc}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"config": args.config, "device": gpu, "torch": torch.__version__, "ldm": []}
    print(f"{args.config} on {gpu}: {cfg.data.resolution}x{cfg.data.resolution}, {cfg.data.num_slots} slots, "
          f"batch {args.batch}, {args.steps} timed steps", flush=True)
    precisions = ["fp16"] + (["bf16"] if device.type != "cuda" or torch.cuda.is_bf16_supported() else [])
    state = None
    for precision in precisions:
        res = ldm_run(cfg, precision, args, device)
        state = res.pop("_state")
        report["ldm"].append(res)
        mem = f"{res['peak_memory_gib']:.2f} GiB peak" if res["peak_memory_gib"] is not None else "memory n/a"
        print(f"ldm {precision:>5}: {res['steps_per_s']:.2f} steps/s ({res['samples_per_s']:.1f} images/s), {mem}, "
              f"all finite {res['all_finite']}, skipped {res['skipped_steps']}, loss {res['last_loss']:.4f}"
              + (f", loss scale {res['loss_scale']:.0f}" if res["loss_scale"] else ""), flush=True)
    report["ae"] = ae_run(cfg, args, device)
    print(f"ae  fp32: one step {report['ae']['seconds']:.2f} s, loss {report['ae']['loss']:.4f}", flush=True)
    report["checkpoint"] = checkpoint_run(state, device)
    print(f"checkpoint: {report['checkpoint']['bytes'] / 2**30:.2f} GiB in {report['checkpoint']['seconds']:.1f} s",
          flush=True)
    del state
    reset_peak(device)
    sampled = ldm_state(cfg, device).components  # a fresh model (the trained one's memory is freed)
    sampled.ema = None
    report["sampling"] = sampling_run(cfg, sampled, args, device)
    for mode, res in report["sampling"].items():
        print(f"sampling autocast={mode}: {res['images_per_s']:.2f} images/s, segments {res['segments']}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results in {args.out}")
    ok = all(r["all_finite"] for r in report["ldm"]) and report["ae"]["finite"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
