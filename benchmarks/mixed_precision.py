"""bf16 autocast against float32: training steps/s of the mask AE and the denoiser, one process.

Both stages run their real step functions (``ae_train_step``, ``ldm_train_step``: forward, loss,
backward, clipping, AdamW) on the same batch of procedural slot maps and random images, first
with ``mixed_precision: "no"`` and then ``"bf16"``; the ratio is bf16 steps/s over float32 steps/s.
On a CPU, bf16 pays only where oneDNN has bf16 kernels (AVX512-BF16 or AMX); elsewhere it is
slower, and the printed ratio says so.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py [--config conf/bench.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def steps_per_s(step, steps: int, warmup: int = 2) -> float:
    """Calls ``step()`` ``warmup`` times, then ``steps`` times under the clock → steps/s."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "bench.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage and precision")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch

    from ldmseg.config import load_config
    from ldmseg.data.random_maps import random_slot_maps
    from ldmseg.models.build import build_components
    from ldmseg.training import LDMComponents, ae_train_step, ldm_train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config)
    size, slots = cfg.data.resolution, cfg.data.num_slots
    g = torch.Generator().manual_seed(0)
    batch_size = cfg.train_ldm.batch_size
    slot_map = random_slot_maps(batch_size, size, slots, min_area=cfg.data.min_segment_area, generator=g)
    batch = {"image": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
             "slot_map": slot_map, "valid": torch.ones_like(slot_map, dtype=torch.bool)}
    print(f"{args.config}: {size}x{size}, {slots} slots, batch {batch_size}, {args.threads} threads, "
          f"{args.steps} timed steps")

    rates: dict[tuple[str, str], float] = {}
    for precision in ("no", "bf16"):
        run_cfg = dataclasses.replace(
            cfg,
            train_ae=dataclasses.replace(cfg.train_ae, mixed_precision=precision),
            train_ldm=dataclasses.replace(cfg.train_ldm, mixed_precision=precision),
        )
        torch.manual_seed(0)
        modules = build_components(cfg)
        ae, denoiser = modules["mask_autoencoder"], modules["denoiser"]
        opt = torch.optim.AdamW(ae.parameters(), lr=cfg.train_ae.lr)
        rates["ae", precision] = steps_per_s(lambda: ae_train_step(ae, batch, opt, run_cfg, generator=g), args.steps)

        comps = LDMComponents(denoiser=denoiser, mask_ae=ae.eval().requires_grad_(False),
                              image_encoder=modules["image_encoder"], latent_scale=1.0)
        opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.train_ldm.lr)
        rates["ldm", precision] = steps_per_s(lambda: ldm_train_step(comps, batch, opt, run_cfg, generator=g),
                                              args.steps)
        print(f"  {precision:>4}: AE {rates['ae', precision]:.2f} steps/s, LDM {rates['ldm', precision]:.2f} steps/s",
              flush=True)
    for stage in ("ae", "ldm"):
        print(f"{stage.upper()} bf16 / float32 steps/s: {rates[stage, 'bf16'] / rates[stage, 'no']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
