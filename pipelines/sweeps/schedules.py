"""``ldmseg tune schedules``: short LDM trainings under ASHA over training schedules.

Each Ray Tune trial trains the diffusion model from scratch on the Parquet shards (plain
training loop in the trial process, on the frozen AE given by ``--ae``) with one combination of

- ``diffusion.beta_schedule``    (``scaled_linear``, ``linear``, ``squaredcos_cap_v2``),
- ``diffusion.min_snr_gamma``    (off, 1, 5),
- ``train_ldm.lr_schedule``      (``constant``, ``cosine``),
- ``diffusion.self_condition_prob`` (0, 0.5, 0.9),

and every ``--eval-every`` steps reports the PQ of a fixed validation batch (few sampling steps,
:func:`ldmseg.training.monitor.monitor_ldm`), so the ASHA scheduler stops bad trials early. The trial
is the training engine of ``ldmseg train`` (:class:`ldmseg.training.trainer.Trainer`) with a
reporter that reports to Ray Tune. Each trial
is an MLflow run tagged with the sweep id; the summary run holds the table and the best schedule.
Concurrency is bounded (``--max-concurrent``, one CPU per trial) for small machines.

Example::

    ldmseg tune schedules --data runs/quickstart/shards --ae runs/quickstart/models/ae \\
        --config conf/quickstart.yaml --num-samples 8 --max-steps 300 --eval-every 50
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ldmseg.config import override
from ldmseg.redact import redact_uri
from ldmseg.logs import get_logger
from ldmseg.training.trainer import Reporter
from pipelines.sweeps.kit import (add_trial_resources, cluster_check, collect_results, failed_trial, log_summary,
                                  make_tuner, markdown_table, resources_of, trial_tracker)
from pipelines.train_inputs import absolute_path

log = get_logger("tune")

SPACE = {
    "diffusion.beta_schedule": ["scaled_linear", "linear", "squaredcos_cap_v2"],
    "diffusion.min_snr_gamma": [None, 1.0, 5.0],
    "train_ldm.lr_schedule": ["constant", "cosine"],
    "diffusion.self_condition_prob": [0.0, 0.5, 0.9],
}


class TuneReporter(Reporter):
    """A schedule trial's results: each monitoring, with the mean loss since the last one, goes to
    ``ray.tune.report`` (ASHA's rungs) and the trial's MLflow run; a non-finite loss fails the trial."""

    def __init__(self, tracker) -> None:
        self.tracker, self.loss, self.t0 = tracker, float("nan"), time.time()

    def report(self, step, metrics):
        self.loss = metrics["loss"]
        if not math.isfinite(self.loss):
            raise FloatingPointError(f"training loss is {self.loss} at step {step}")

    def monitored(self, step, metrics, panel):
        import ray.tune

        metrics = {**metrics, "step": step, "loss": self.loss, "seconds": time.time() - self.t0}
        self.tracker.log_metrics(metrics, step)
        ray.tune.report(metrics)


def schedule_trial(config: dict[str, Any]) -> None:
    """One Tune trial: train the LDM for ``max_steps`` steps, reporting validation PQ every ``eval_every``."""
    import torch

    from ldmseg.data.parquet_dataset import ShardDataset, iterate_batches
    from ldmseg.training.monitor import monitor_batch
    from ldmseg.training.state import TrainState
    from ldmseg.training.trainer import Trainer

    choice = {k: config[k] for k in SPACE if k in config}
    max_steps, eval_every = int(config["max_steps"]), int(config["eval_every"])
    cfg = override(config["cfg"], {**choice, "train_ldm.iterations": max_steps, "train_ldm.time_budget_s": None,
                                   "train_ldm.report_every": eval_every, "train_ldm.validate_every": eval_every,
                                   "train_ldm.checkpoint_every": max_steps,
                                   "train_ldm.validate_steps": int(config["val_steps"])})
    tracker = trial_tracker(config, "schedule-trial", choice)
    try:
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        from pipelines.ray_compat import assigned_device

        device = assigned_device()  # the trial's GPU when it has one (--gpus-per-trial), else the CPU
        state = TrainState.create("ldm", cfg, ae_model=config["ae_dir"], device=device)
        state.seed_generator(cfg.train_ldm.seed)
        batches = iterate_batches(ShardDataset(config["data"], "train", cfg.data.num_slots, seed=cfg.train_ldm.seed,
                                               repeat=True), cfg.train_ldm.batch_size)
        watch = monitor_batch(config["data"], config["val_split"], int(config["val_images"]),
                              cfg.data.num_slots, device)
        Trainer(state, batches, TuneReporter(tracker), monitor_batch=watch, save_checkpoints=False).run()
    except Exception as exc:
        failed_trial(tracker, exc)
        raise
    tracker.finish()


def run_schedule_sweep(data: str, ae: str, output: str, *, config: str | None = None, overrides: list[str] | None = None,
                       num_samples: int = 8, max_steps: int = 300, eval_every: int = 50, grace_steps: int | None = None,
                       val_images: int = 16, val_steps: int = 10, max_concurrent: int = 2,
                       resources: dict | None = None, name: str | None = None,
                       tracking_uri: str | None = None, seed: int = 0, address: str | None = None) -> dict[str, Any]:
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    from ldmseg.config import load_config, to_dict
    from ldmseg.data.manifest import list_split_files, open_fs
    from pipelines import ray_compat
    from pipelines.cluster_paths import alive_node_count
    from pipelines.tracking import resolve_model
    from pipelines.tracking import Tracker, local_artifact_root, resolve_tracking_uri

    if eval_every < 1 or max_steps < eval_every:
        raise SystemExit(f"ldmseg tune schedules: need 1 <= --eval-every <= --max-steps, got {eval_every} and {max_steps}")
    cfg = load_config(config, overrides)
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_compat.init_ray(address)
    ae_dir = resolve_model(ae, out, tracking_uri)
    fs, root = open_fs(data)
    list_split_files(fs, root, "train")  # fails early, naming the folder, when there are no shards
    try:
        val_split = "val" if list_split_files(fs, root, "val") else "train"
    except FileNotFoundError:
        val_split = "train"
    uri = resolve_tracking_uri(tracking_uri, out)
    # models:/ AE downloaded into OUTPUT/model: reachable when the output folder (Tune's storage) is
    cluster_check({"--data": absolute_path(data), "--ae": absolute_path(ae_dir)}, out=out,
                  tracking_uri=uri, nodes=alive_node_count())
    sweep_id = name or f"schedules-{time.strftime('%Y%m%d-%H%M%S')}"
    space: dict[str, Any] = {
        "cfg": to_dict(cfg), "data": absolute_path(data),
        "ae_dir": absolute_path(ae_dir), "val_split": val_split, "val_images": val_images,
        "val_steps": val_steps, "max_steps": max_steps, "eval_every": eval_every, "tracking_uri": uri,
        "artifact_root": local_artifact_root(uri, out), "experiment": "ldmseg-tune", "sweep_id": sweep_id,
        **{k: tune.choice(v) for k, v in SPACE.items()}}
    rungs = max_steps // eval_every
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=rungs,
                              grace_period=max(1, (grace_steps or eval_every) // eval_every), reduction_factor=2)
    Tracker(uri, artifact_root=space["artifact_root"]).ensure_experiment(space["experiment"])
    tuner = make_tuner(schedule_trial, space, out, sweep_id, metric="val_pq", num_samples=num_samples,
                       search_alg=tune.search.BasicVariantGenerator(random_state=seed), scheduler=scheduler,
                       max_concurrent=max_concurrent, resources=resources)
    log.info(f"sweep {sweep_id}: {num_samples} schedules, up to {max_steps} steps each, validation every {eval_every} "
         f"steps under ASHA; MLflow {redact_uri(uri)}")
    grid = tuner.fit()

    rows, failed = collect_results(grid, SPACE, ("step", "val_pq", "val_sq", "val_rq", "loss"), "val_pq")
    for r in rows:
        r["steps"] = r.pop("step")
        r["stopped_early"] = r["steps"] < max_steps
    rows.sort(key=lambda r: (-r["steps"], -r["val_pq"]))
    keys = [*SPACE, "steps", "val_pq", "val_sq", "val_rq", "loss", "stopped_early"]
    (out / "table.md").write_text(markdown_table(rows, keys) + "\n")
    best = rows[0] if rows else None
    (out / "results.json").write_text(json.dumps({"sweep_id": sweep_id, "best": best, "trials": rows,
                                                  "failed": failed}, indent=2))
    log_summary(uri, out, sweep_id, "schedules-summary", {"data": data, "ae": ae, "max_steps": max_steps},
                {"best_val_pq": best["val_pq"]} if best else {}, ["table.md", "results.json"])
    log.info(f"{len(rows)} trials, {sum(r['stopped_early'] for r in rows)} stopped early by ASHA, {len(failed)} failed; "
         f"table {out / 'table.md'}")
    return {"sweep_id": sweep_id, "best": best, "trials": rows, "failed": failed, "output": str(out)}


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="Parquet shards of ldmseg preprocess (local or s3://)")
    parser.add_argument("--ae", required=True, help="trained mask AE folder or models:/ldmseg-ae@current")
    parser.add_argument("--config", default=None, help="base YAML config (e.g. conf/quickstart.yaml)")
    parser.add_argument("--output", default="runs/tune-schedules", help="results folder (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=8, help="schedules to try (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=300, help="training steps of a full trial (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: %(default)s)")
    parser.add_argument("--grace-steps", type=int, default=None, help="ASHA grace period in steps (default: --eval-every)")
    parser.add_argument("--val-images", type=int, default=16, help="validation batch size (default: %(default)s)")
    parser.add_argument("--val-steps", type=int, default=10, help="sampling steps of validation (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: %(default)s)")
    add_trial_resources(parser)
    parser.add_argument("--name", default=None, help="sweep id; re-use it to resume an interrupted sweep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train_ldm.batch_size=32")


def check_inputs(args) -> None:
    """The inputs of ``ldmseg tune schedules``, checked before Ray starts."""
    from ldmseg import inputs
    from ldmseg.config import load_config

    inputs.sampling_config(load_config(args.config, args.overrides).sampling)
    inputs.steps(args.val_steps, "--val-steps")
    inputs.shards("--data", args.data)
    inputs.model("--ae", args.ae)
    inputs.output_folder("--output", args.output)


def run(args) -> dict[str, Any]:
    check_inputs(args)
    return run_schedule_sweep(args.data, args.ae, args.output, config=args.config, overrides=args.overrides,
                              num_samples=args.num_samples, max_steps=args.max_steps, eval_every=args.eval_every,
                              grace_steps=args.grace_steps, val_images=args.val_images, val_steps=args.val_steps,
                              max_concurrent=args.max_concurrent,
                              resources=resources_of(args), name=args.name, tracking_uri=args.tracking_uri,
                              seed=args.seed, address=args.address)
