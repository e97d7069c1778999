"""The shared kit of the Ray Tune sweeps: tuner, trial MLflow runs, result table, summary run.

Every sweep module (:mod:`pipelines.sweeps.sampling`, :mod:`~pipelines.sweeps.inpainting`,
:mod:`~pipelines.sweeps.schedules`) builds on these and on nothing of another sweep.

MLflow layout: each trial is a run of the experiment ``ldmseg-tune`` named ``<sweep id>-<trial
id>`` and tagged ``ldmseg.sweep`` / ``ldmseg.kind``, a failed trial is a FAILED run with the
error in the tag ``ldmseg.error``; the sweep's summary run (``<sweep id>-summary``) holds the
table, the plots and the headline metrics. The trial runs are opened inside the trial
(:func:`trial_tracker`) rather than by Ray's ``MLflowLoggerCallback``, which names runs after
Tune's trial names, logs the whole trial config (model folder, ground-truth description) as
parameters and has no failed-trial tag or per-trial artifact root.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from ldmseg.logs import get_logger

log = get_logger("tune")
EXPERIMENT = "ldmseg-tune"


def collect_results(grid, config_keys, metric_keys, required: str) -> tuple[list[dict], list[dict]]:
    """Tune results → (rows of config values + metrics, failed trials with their first error line)."""
    rows, failed = [], []
    for result in grid:
        cfg = {k: result.config.get(k) for k in config_keys if k in result.config}
        if result.error is not None or not result.metrics or required not in result.metrics:
            failed.append({**cfg, "error": str(result.error).splitlines()[0][:300] if result.error else "no metrics"})
            continue
        rows.append({**cfg, **{k: result.metrics[k] for k in metric_keys}})
    return rows, failed


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def add_trial_resources(parser) -> None:
    """``--cpus-per-trial`` and ``--gpus-per-trial``: what Ray reserves for each trial."""
    parser.add_argument("--cpus-per-trial", type=float, default=1.0,
                        help="CPUs per trial, also its torch threads (default: %(default)s)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="GPUs per trial (default: 1 on a cluster with GPUs, else 0); a trial samples on "
                             "the GPU Ray assigns it")
    parser.add_argument("--allow-cpu", action="store_true",
                        help=f"sample a denoiser of more than {CPU_PARAMETER_LIMIT // 10**6} M parameters (Stable "
                             "Diffusion's is 815 M) on CPUs when trials get no GPU (refused by default: minutes per image)")


def resources_of(args) -> dict[str, float | None]:
    """The trial resources of a sweep's arguments (checked before Ray starts)."""
    from ldmseg.config import ConfigError

    if args.cpus_per_trial <= 0 or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    return {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial, "allow_cpu": getattr(args, "allow_cpu", False)}


CPU_PARAMETER_LIMIT = 200_000_000
"""Denoisers larger than this are not sampled on CPUs unless ``--allow-cpu`` (SD v1.x's: 815 M)."""


def trial_resources(resources: dict[str, float | None] | None, model_parameters: int | None = None
                    ) -> dict[str, float]:
    """Ray resources of one trial: ``cpu`` (default 1) and ``gpu`` (``None``: 1 when the connected
    cluster has GPUs, else 0; without one, every trial would see every GPU and take ``cuda:0``).

    A trial without a GPU for a denoiser of ``model_parameters`` > :data:`CPU_PARAMETER_LIMIT` is
    refused (``ConfigError``) unless ``resources["allow_cpu"]``."""
    from ldmseg.config import ConfigError
    from pipelines.ray_compat import cluster_gpus

    wanted = {"cpu": 1.0, "gpu": None, **(resources or {})}
    allow_cpu = bool(wanted.pop("allow_cpu", False))
    if wanted["gpu"] is None:
        wanted["gpu"] = 1.0 if cluster_gpus() > 0 else 0.0
    if not wanted["gpu"] and (model_parameters or 0) > CPU_PARAMETER_LIMIT and not allow_cpu:
        raise ConfigError(f"the model's denoiser has {model_parameters / 1e6:.0f} M parameters and the trials get no GPU "
                          f"(the cluster has {cluster_gpus():g}): sampling it on CPUs takes minutes per image. Run on a "
                          "cluster with GPUs (--gpus-per-trial 1), or pass --allow-cpu to sample on CPUs anyway")
    return {k: float(v) for k, v in wanted.items() if v}


def denoiser_parameters(model_dir: str) -> int | None:
    """The denoiser's parameter count recorded in a model folder's ``model.json`` (None if absent)."""
    from ldmseg.checkpoint import read_meta

    return read_meta(model_dir).get("components", {}).get("denoiser", {}).get("parameters")


def make_tuner(trainable, space: dict[str, Any], out: Path, sweep_id: str, *, metric: str, mode: str = "max",
               num_samples: int = 1, search_alg=None, scheduler=None, max_concurrent: int = 2,
               resources: dict[str, float] | None = None, model_parameters: int | None = None):
    """A ``Tuner`` for ``trainable`` storing under ``out/ray_tune/sweep_id``, or the restored one
    when an interrupted sweep of that id is there (failed trials are kept as failed).
    ``model_parameters``: the denoiser's size, for :func:`trial_resources`'s CPU refusal."""
    import ray.tune as tune

    storage = str(out / "ray_tune")
    trainable = tune.with_resources(trainable, trial_resources(resources, model_parameters))
    exp_path = Path(storage) / sweep_id
    if exp_path.exists() and tune.Tuner.can_restore(str(exp_path)):
        log.info(f"resuming sweep {sweep_id} from {exp_path}")
        return tune.Tuner.restore(str(exp_path), trainable, resume_errored=False, restart_errored=False)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, search_alg=search_alg,
                                    scheduler=scheduler, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=sweep_id, storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))


def log_summary(uri: str, out: Path, sweep_id: str, kind: str, params: dict[str, Any], metrics: dict[str, float],
                files: list[str]) -> None:
    """The sweep's summary MLflow run: parameters, headline metrics and the files that exist in ``out``."""
    from pipelines.tracking import Tracker, local_artifact_root

    summary = Tracker(uri, artifact_root=local_artifact_root(uri, out))
    if summary.start(EXPERIMENT, f"{sweep_id}-summary", params=params,
                     tags={"ldmseg.sweep": sweep_id, "ldmseg.kind": kind}):
        if metrics:
            summary.log_metrics(metrics, 0)
        for f in files:
            if (out / f).exists():
                summary.log_artifact(out / f)
        summary.finish()


def trial_tracker(config: dict[str, Any], kind: str, params: dict[str, Any]):
    """An MLflow run for the current Tune trial, named ``<sweep id>-<trial id>`` and tagged with the sweep."""
    import ray.tune

    from pipelines.tracking import Tracker

    tracker = Tracker(config["tracking_uri"], artifact_root=config.get("artifact_root"))
    tracker.start(config["experiment"], f"{config['sweep_id']}-{ray.tune.get_context().get_trial_id()}",
                  params=params, tags={"ldmseg.sweep": config["sweep_id"], "ldmseg.kind": kind})
    return tracker


def failed_trial(tracker, exc: BaseException) -> None:
    """Mark a trial's MLflow run FAILED with the error as the tag ``ldmseg.error``."""
    tracker.set_tags({"ldmseg.error": f"{type(exc).__name__}: {exc}"[:500]})
    tracker.finish("FAILED")


def scored_trial(config: dict[str, Any], kind: str, params: dict[str, Any], score: Callable[[], dict]) -> None:
    """Run ``score()`` (→ metrics) as one Tune trial with its MLflow run; a failure marks the run
    FAILED with the error as a tag and is re-raised (Tune records it and the sweep goes on)."""
    import ray.tune

    from ldmseg.logs import setup_logging

    setup_logging()
    tracker = trial_tracker(config, kind, params)
    try:
        metrics = score()
    except Exception as exc:
        failed_trial(tracker, exc)
        raise
    tracker.log_metrics(metrics, step=0)
    tracker.finish()
    ray.tune.report(metrics)


_SEGMENTERS: dict[str, Any] = {}


def cached_segmenter(model_dir: str):
    """The :class:`~ldmseg.segmenter.Segmenter` of ``model_dir``, loaded once per trial process on the
    device Ray assigned the trial (``cuda:0`` of its GPU, else the CPU) with its CPUs as torch threads."""
    from ldmseg.segmenter import Segmenter

    if model_dir not in _SEGMENTERS:
        import torch

        from pipelines.ray_compat import assigned_device, worker_threads

        torch.set_num_threads(worker_threads())
        _SEGMENTERS[model_dir] = Segmenter.from_pretrained(model_dir, device=assigned_device())
    return _SEGMENTERS[model_dir]


def save_pq_plot(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """Label a PQ plot (y: class-agnostic PQ in %), add grid and legend, save it as PNG, close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("PQ (class-agnostic, %)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def prepare_model_sweep(kind: str, model: str, data: str, output: str, *, name: str | None, max_images: int | None,
                        seed: int, tracking_uri: str | None, address: str | None
                        ) -> tuple[Path, str, str, dict[str, Any]]:
    """Common start of a sweep over a trained model: output folder, Ray, the model folder, the
    ground-truth folder, MLflow URI and experiment → (out, uri, sweep id, base param space)."""
    from ldmseg.evaluation import resolve_ground_truth
    from pipelines import ray_compat
    from pipelines.cluster_paths import alive_node_count
    from pipelines.tracking import resolve_model
    from pipelines.tracking import Tracker, local_artifact_root, resolve_tracking_uri
    from pipelines.train_inputs import absolute_path

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_compat.init_ray(address)
    model_dir = absolute_path(resolve_model(model, out, tracking_uri))  # models:/ downloaded into OUTPUT/model
    gt = resolve_ground_truth(data, out)
    uri = resolve_tracking_uri(tracking_uri, out)
    cluster_check({"--model": model_dir, **ground_truth_paths(data, gt)}, out=out, tracking_uri=uri,
                  nodes=alive_node_count())
    log.info(f"scoring {gt.description}")
    sweep_id = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    space: dict[str, Any] = {"model_dir": model_dir, "gt": dataclasses.asdict(gt),
                             "tracking_uri": uri, "artifact_root": local_artifact_root(uri, out),
                             "experiment": EXPERIMENT, "sweep_id": sweep_id, "max_images": max_images, "seed": seed}
    Tracker(uri, artifact_root=space["artifact_root"]).ensure_experiment(space["experiment"])
    return out, uri, sweep_id, space


def ground_truth_paths(data: str, gt) -> dict[str, str | None]:
    """The folders and files of a :class:`~ldmseg.evaluation.GroundTruth` the trials read, labelled
    for :func:`cluster_check` (``--data``, or ``--data DATA: its source images`` for shards scored
    against their source, or against their ground truth exported into the output folder)."""
    from pipelines.train_inputs import absolute_path

    given = absolute_path(data)
    paths: dict[str, str | None] = {}
    for field in ("root", "images", "masks", "json_path"):
        value = getattr(gt, field)
        if value and value not in paths.values():
            label = "--data" if value == given else f"--data {data}: its ground truth {field.replace('_path', '')}"
            paths[label] = value
    return paths


def cluster_check(paths: dict[str, str | None], *, out: Path, tracking_uri: str, nodes: int) -> None:
    """On a cluster of several nodes, what the trials get must be reachable from every node
    (:mod:`pipelines.cluster_paths`): the output folder (Ray Tune's storage ``OUTPUT/ray_tune``, a
    downloaded ``models:/`` model in ``OUTPUT/model``), ``paths`` (flag → model, data, AE) and the
    MLflow store each trial logs its run to."""
    from pipelines.cluster_paths import require_reachable

    require_reachable({"--output": str(out), **paths}, nodes, tracking_uri=tracking_uri,
                      tracking_users="the Tune trials (an MLflow run each)", local_only=("--output",))
