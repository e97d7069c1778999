"""Sampling-loop overhead: a full sampling run vs the denoiser forwards and AE decode it needs.

For the tiny config (untrained weights: the cost does not depend on them), on one batch:

    ratio = time(sample_latents + decode_latents) / time(steps denoiser forwards + one AE decode)

both measured back to back in the same run (``--repeat`` pairs, median ratio, so that load from
other processes affects both alike); target ≤ 1.10 (the loop adds at most 10 % to the network
cost). Printed for ddim and dpmsolver++ at 10 and 50 steps, with the time a sampling run spends
outside the denoiser's forward calls (scheduler steps, x̂₀, noise, decode), measured inside the
same runs and therefore immune to load drift between measurements.

    OMP_NUM_THREADS=1 python benchmarks/sampling_overhead.py [--config conf/tiny.yaml] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class TimedDenoiser(torch.nn.Module):
    """Wraps the denoiser and adds up the wall time spent inside its forward calls."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.self_condition = denoiser.self_condition
        self.seconds = 0.0

    def forward(self, *args):
        t = time.perf_counter()
        out = self.denoiser(*args)
        self.seconds += time.perf_counter() - t
        return out


def timed(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "tiny.yaml"))
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: sampling.batch_size)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmsolver++"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50])
    args = parser.parse_args()

    from ldmseg.checkpoint import build_components
    from ldmseg.config import load_config, with_sampling
    from ldmseg.diffusion.sampling import decode_latents, sample_latents

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    parts = build_components(cfg)
    ae, encoder, denoiser = (parts[k].eval() for k in ("mask_autoencoder", "image_encoder", "denoiser"))
    b = args.batch or cfg.sampling.batch_size
    images = torch.rand(b, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    with torch.no_grad():
        image_latent = encoder.encode(images)
    c, h, w = ae.latent_channels, image_latent.shape[-2], image_latent.shape[-1]
    x_t, x0 = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    t = torch.full((b,), 500, dtype=torch.int64)
    self_cond = x0 if denoiser.self_condition and cfg.sampling.self_condition else None

    def forwards(steps: int) -> None:
        with torch.no_grad():
            for i in range(steps):
                denoiser(x_t, t - i, image_latent, self_cond)

    def decode() -> None:
        decode_latents(ae, x0, 1.0)

    t_forward = timed(lambda: forwards(1), max(5, 3 * args.repeat))
    t_decode = timed(decode, max(5, 3 * args.repeat))
    print(f"config {args.config}: batch {b}, latent {c}x{h}x{w}, denoiser "
          f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f} M params, torch threads 1")
    print(f"one denoiser forward {1000 * t_forward:.1f} ms, one AE decode {1000 * t_decode:.1f} ms")
    print("| sampler | steps | sampling + decode | steps × forward + decode | ratio (median of pairs) "
          "| loop time outside the denoiser |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.samplers:
        for steps in args.steps:
            sampling = with_sampling(cfg, {"sampler": name, "steps": steps}).sampling

            timed_denoiser = TimedDenoiser(denoiser)

            def run() -> None:
                z = sample_latents(timed_denoiser, image_latent, diffusion_cfg=cfg.diffusion, sampling_cfg=sampling,
                                   seeds=list(range(b)), latent_channels=c)
                decode_latents(ae, z, 1.0)

            def budget() -> None:
                forwards(steps)
                decode()

            run()  # warm-up
            timed_denoiser.seconds = 0.0
            pairs = []
            for _ in range(args.repeat):  # each pair measured back to back: machine load drifts slowly
                pairs.append((timed(budget, 1), timed(run, 1)))
            t_budget = statistics.median(p[0] for p in pairs)
            t_sample = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            outside = sum(p[1] for p in pairs) - timed_denoiser.seconds  # includes the decode
            print(f"| {name} | {steps} | {t_sample:.3f} s | {t_budget:.3f} s | **{ratio:.3f}** "
                  f"| {1000 * outside / args.repeat:.0f} ms ({100 * outside / sum(p[1] for p in pairs):.1f} %) |",
                  flush=True)


if __name__ == "__main__":
    main()
