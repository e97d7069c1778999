"""What a config's step budget costs on this machine: CPU-minutes of its training, from measured steps/s.

The bench's budgets are step counts (``train_ae.iterations``, ``train_ldm.iterations``); what they
cost in time depends on the CPU (docs/benchmarks.md: the same steps took 161 CPU-minutes on an
AVX-512 machine and about 218 on an AVX2-only one). This measures, in one run on this machine,
the plain training loop of each stage (the engine's step on preprocessed shards, as in
``benchmarks/train_overhead.py``) at the config's batch sizes and torch threads, and prints:

- seconds per step of each stage and the stage's minutes for its ``iterations``;
- training CPU-minutes (wall minutes × the stage's torch threads) and their ratio to ``--budget``.

Ray Train adds a few per cent to the plain loop, and the LDM's in-training validation adds its own
time (``train_ldm.validate_every``); the figure is a lower bound of a run's training time.

    OMP_NUM_THREADS=1 python benchmarks/step_budget.py --config conf/bench.yaml [overrides ...]
    OMP_NUM_THREADS=1 python benchmarks/step_budget.py --shards runs/bench/shards   # skip making scenes
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import REPO, make_shards, plain_steps_per_s, untrained_ae  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({vector})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "bench.yaml"))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, as for ldmseg quickstart")
    parser.add_argument("--shards", help="preprocessed shards to train on (default: make and preprocess scenes)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per stage (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured first steps per stage")
    parser.add_argument("--images", type=int, default=256, help="synthetic scenes when --shards is not given")
    parser.add_argument("--budget", type=float, default=90.0, help="CPU-minutes to compare with (default: %(default)s)")
    args = parser.parse_args()

    import torch

    from ldmseg.config import load_config

    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards or make_shards(cfg, tmp, args.images)
        ae_dir = untrained_ae(cfg, tmp)

        rows = []
        for stage, tcfg in (("ae", cfg.train_ae), ("ldm", cfg.train_ldm)):
            print(f"[bench] {stage}: {args.warmup} + {args.steps} steps of batch {tcfg.batch_size}", file=sys.stderr,
                  flush=True)
            rate, _, _ = plain_steps_per_s(stage, cfg, shards, ae_dir if stage == "ldm" else None, args.steps,
                                           args.warmup)
            threads = tcfg.torch_threads or tcfg.cpus_per_worker
            minutes = tcfg.iterations / rate / 60
            rows.append((stage, tcfg.iterations, tcfg.batch_size, 1 / rate, minutes, minutes * threads))

    print(f"\nconfig {Path(args.config).name} {' '.join(args.overrides)}".rstrip())
    print(f"machine: {cpu_name()}, torch {torch.__version__}")
    print("| stage | iterations | batch | s/step | wall min | CPU-min |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stage, iterations, batch, seconds, minutes, cpu_minutes in rows:
        print(f"| {stage} | {iterations} | {batch} | {seconds:.3f} | {minutes:.1f} | {cpu_minutes:.1f} |")
    total = sum(r[5] for r in rows)
    print(f"training: {total:.1f} CPU-minutes (plain loop, a lower bound), {total / args.budget:.2f} × the "
          f"{args.budget:g} CPU-minute budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
