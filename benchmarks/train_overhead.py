"""Ray Train overhead: steps/s of one Ray Train worker vs the plain training loop, same model and data.

Both sides run the same engine step (``ldmseg.training``) with the same batch size
and torch threads on the same preprocessed shards:

  - plain: ``ShardDataset`` + ``iterate_batches`` + ``train_loop`` in this process;
  - Ray:   ``ldmseg train <stage>`` (``TorchTrainer``, 1 worker, Ray Data shard), steps/s taken
           from the metrics the worker reports (so Ray start-up, dataset materialisation and
           worker start are excluded; they are printed separately as start-up seconds).

    OMP_NUM_THREADS=1 python benchmarks/train_overhead.py [--stage ldm] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain_steps_per_s(stage: str, cfg, shards: str, ae_dir: str | None, steps: int, warmup: int
                      ) -> tuple[float, float, float]:
    """Steps/s of ``train_loop`` in this process, measured after ``warmup`` steps, and the mean
    seconds per step waiting for data and inside the step function."""
    import torch

    from ldmseg import training
    from ldmseg.data.parquet_dataset import ShardDataset, iterate_batches
    from ldmseg.training.state import TrainState, train_config

    tcfg = train_config(cfg, stage)
    torch.set_num_threads(tcfg.torch_threads or tcfg.cpus_per_worker)
    state = TrainState.create(stage, cfg, ae_model=ae_dir, device="cpu")
    state.seed_generator(0)
    batches = iterate_batches(ShardDataset(shards, "train", cfg.data.num_slots, repeat=True), tcfg.batch_size)

    def step_fn(batch):
        return training.train_step(state, batch)

    training.train_loop(step_fn, batches, warmup)
    means: dict[str, float] = {}
    t0 = time.perf_counter()
    training.train_loop(step_fn, batches, warmup + steps, start_step=warmup, report_every=steps,
                        on_report=lambda step, m: means.update(m))
    return steps / (time.perf_counter() - t0), means["data_seconds"], means["step_seconds"]


def make_shards(cfg, tmp: Path, images: int) -> str:
    """``images`` synthetic scenes of ``cfg``'s size, preprocessed with Ray Data into ``tmp/shards``
    (starts a local Ray); the shards' path."""
    from ldmseg.data.synthetic import write_scenes
    from pipelines import ray_compat
    from pipelines.preprocess import run_preprocess

    write_scenes(tmp / "scenes", num_images=images, size=cfg.data.resolution, seed=0,
                 min_things=cfg.synth.min_things, max_things=cfg.synth.max_things)
    ray_compat.init_ray(None)
    run_preprocess(cfg, output=str(tmp / "shards"), source=str(tmp / "scenes"))
    return str(tmp / "shards")


def untrained_ae(cfg, tmp: Path) -> str:
    """An untrained mask AE saved in ``tmp/ae`` (it costs the LDM step what a trained one does)."""
    import torch

    from ldmseg.checkpoint import save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    torch.manual_seed(0)
    save_model(str(tmp / "ae"), cfg, {"mask_autoencoder": MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)},
               latent_scale=1.0)
    return str(tmp / "ae")


def _uri(run_dir: Path) -> str:
    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(None, run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "quickstart.yaml"))
    parser.add_argument("--stage", choices=("ae", "ldm"), default="ldm")
    parser.add_argument("--steps", type=int, default=200, help="measured steps per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured first steps per side")
    parser.add_argument("--images", type=int, default=512, help="synthetic training scenes")
    args = parser.parse_args()

    from ldmseg.config import load_config
    from pipelines.train import run_train

    report = args.steps // 4
    total = args.warmup + args.steps
    cfg = load_config(args.config, [f"train_{args.stage}.iterations={total}", f"train_{args.stage}.time_budget_s=null",
                                    f"train_{args.stage}.report_every={report}",
                                    f"train_{args.stage}.checkpoint_every={total}", "train_ldm.warmup=10",
                                    "train_ae.warmup=10"])
    tcfg = cfg.train_ae if args.stage == "ae" else cfg.train_ldm
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shards(cfg, tmp, args.images)
        ae_dir = untrained_ae(cfg, tmp) if args.stage == "ldm" else None

        print(f"[bench] plain loop: {args.stage}, batch {tcfg.batch_size}, {tcfg.torch_threads} threads, "
              f"{args.steps} steps", file=sys.stderr, flush=True)
        plain, plain_data, plain_step = plain_steps_per_s(args.stage, cfg, str(tmp / "shards"), ae_dir, args.steps, args.warmup)

        print("[bench] Ray Train, 1 worker", file=sys.stderr, flush=True)
        t0 = time.time()
        res = run_train(args.stage, cfg, data=str(tmp / "shards"), run_dir=tmp / "run", ae_model=ae_dir)
        wall = time.time() - t0
        # the worker's reported steps/s per report interval; the first interval holds the warm-up
        client = mlflow.tracking.MlflowClient(_uri(tmp / "run"))
        hist = sorted(client.get_metric_history(res.mlflow_run_id, "steps_per_s"), key=lambda m: m.step)
        rates = [m.value for m in hist if m.step > report]
        ray_rate = len(rates) / sum(1.0 / r for r in rates)  # harmonic mean = steps / seconds
        ray_means = {}
        for name, key in (("data wait", "data_seconds"), ("step", "step_seconds")):
            hist = sorted(client.get_metric_history(res.mlflow_run_id, key), key=lambda m: m.step)
            ray_means[name] = [m.value for m in hist if m.step > report]
        startup = wall - total / ray_rate

    print(f"\nstage {args.stage}, config {Path(args.config).name}, batch {tcfg.batch_size}, "
          f"torch threads {tcfg.torch_threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"plain loop:           {plain:.3f} steps/s")
    print(f"Ray Train (1 worker): {ray_rate:.3f} steps/s")
    print(f"ratio Ray/plain:      {ray_rate / plain:.2f}   (target >= 0.9)")
    for name, vals in ray_means.items():
        print(f"Ray worker mean {name} per step: {1000 * sum(vals) / len(vals):.1f} ms")
    print(f"plain loop mean data wait per step: {1000 * plain_data:.1f} ms, step {1000 * plain_step:.1f} ms")
    print(f"Ray stage wall {wall:.1f} s; start-up and shutdown (wall - steps / rate): {startup:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
