"""Ray Tune searches: sampling (sampler × steps × thresholds), training schedules, inpainting.

``ldmseg tune sampling --model URI --data SRC`` runs one trial per sampling configuration on a
held-out set and reports PQ, SQ, RQ and seconds per image; each trial is an MLflow run tagged with
the sweep id, and a summary run holds the table, a PQ-vs-latency Pareto plot and the best
configuration, which is also written as a named sampling config (``--save-best``, e.g.
``conf/sampling/best.yaml``) that ``ldmseg evaluate --sampling best`` uses by name.

``ldmseg tune schedules --data SHARDS --ae MODEL`` runs short LDM trainings under ASHA over
training schedules (beta schedule, Min-SNR γ, learning-rate schedule, self-conditioning
probability), reporting validation PQ so ASHA can stop bad trials early.

``ldmseg tune inpainting --model URI --data SRC`` measures PQ against the known fraction for
``sparse`` and ``global`` masks (a table and a plot).

A failing trial (exception, NaN) is recorded and the sweep goes on; re-running with the same
``--name`` resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ldmseg.config import redact_uri

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLING_KEYS = ("sampler", "steps", "timestep_spacing", "sigma_schedule", "mask_th", "count_th", "overlap_th",
                 "self_condition")


def _say(msg: str) -> None:
    print(f"[tune] {msg}", file=sys.stderr, flush=True)


def _bool(x: str) -> bool:
    if x.lower() in ("1", "true", "on", "yes"):
        return True
    if x.lower() in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {x!r}")


def load_sampling_config(name_or_path: str) -> dict[str, Any]:
    """A named sampling config (``conf/sampling/NAME.yaml``) or a YAML path → sampling overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = REPO_CONF / "sampling" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SystemExit(f"ldmseg: no sampling config {name_or_path!r} (looked for {path}); "
                         "run `ldmseg tune sampling ... --save-best NAME` first")
    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("sampling", data)
    unknown = sorted(set(data) - set(SAMPLING_KEYS) - {"eta", "seed", "batch_size"})
    if unknown:
        raise SystemExit(f"ldmseg: {path}: unknown sampling keys {unknown}")
    return data


# ------------------------------------------------------------------------------------------
# Sampling search
# ------------------------------------------------------------------------------------------

_SEGMENTERS: dict[str, Any] = {}


def _segmenter(model_dir: str):
    from ldmseg.segmenter import Segmenter

    if model_dir not in _SEGMENTERS:
        _SEGMENTERS[model_dir] = Segmenter.from_pretrained(model_dir)
    return _SEGMENTERS[model_dir]


def score_sampling(model_dir: str, gt: dict[str, Any], out: Path, params: dict[str, Any], *, seed: int = 0,
                   max_images: int | None = None) -> dict[str, float]:
    """Segment the ground truth ``gt`` (a :class:`~ldmseg.evaluation.GroundTruth` as a dict) with the
    sampling ``params``; → pq, sq, rq, seconds_per_image."""
    from ldmseg.evaluation import GroundTruth, predict_dataset
    from ldmseg.metrics.pq import evaluate_folders

    seg = _segmenter(model_dir)
    truth = GroundTruth(**gt)
    dataset = truth.load()
    if max_images:
        dataset.records = dataset.records[:max_images]
    stats = predict_dataset(seg, dataset, out, seed=seed, progress=False, **params)
    res = evaluate_folders(pred=str(out), class_agnostic=True, missing="void", workers=1,
                           image_ids=[r.image_id for r in dataset.records], **truth.pq_args())
    metrics = {"pq": res["All"]["pq"], "sq": res["All"]["sq"], "rq": res["All"]["rq"],
               "seconds_per_image": stats["seconds_per_image"], "n_images": res["n_images"]}
    if any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
        raise FloatingPointError(f"trial produced NaN metrics: {metrics}")
    return metrics


def sampling_trial(config: dict[str, Any]) -> None:
    """One Tune trial: score a sampling configuration and log it as an MLflow run."""
    import ray.tune

    params = {k: config[k] for k in SAMPLING_KEYS if k in config}
    out = Path(ray.tune.get_context().get_trial_dir()) / "predictions"
    scored_trial(config, "sampling-trial", params,
                 lambda: score_sampling(config["model_dir"], config["gt"], out, params, seed=config.get("seed", 0),
                                        max_images=config.get("max_images")))


def scored_trial(config: dict[str, Any], kind: str, params: dict[str, Any], score) -> None:
    """Run ``score()`` (→ metrics) as one Tune trial with its MLflow run; a failure marks the run
    FAILED with the error as a tag and is re-raised (Tune records it and the sweep goes on)."""
    import ray.tune

    tracker = trial_tracker(config, kind, params)
    try:
        metrics = score()
    except Exception as exc:
        failed_trial(tracker, exc)
        raise
    tracker.log_metrics(metrics, step=0)
    tracker.finish()
    ray.tune.report(metrics)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials not beaten by another that is both faster and at least as good (PQ vs latency)."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["seconds_per_image"], -r["pq"])):
        if r["pq"] > best:
            front.append(r)
            best = r["pq"]
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    samplers = sorted({r["sampler"] for r in rows})
    for s in samplers:
        pts = [r for r in rows if r["sampler"] == s]
        ax.scatter([r["seconds_per_image"] for r in pts], [100 * r["pq"] for r in pts], label=s, s=28)
        for r in pts:
            ax.annotate(str(r["steps"]), (r["seconds_per_image"], 100 * r["pq"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    front = pareto_front(rows)
    ax.plot([r["seconds_per_image"] for r in front], [100 * r["pq"] for r in front], "k--", lw=1,
            label="Pareto front")
    save_pq_plot(fig, ax, path, "seconds per image", title)


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


def make_tuner(trainable, space: dict[str, Any], out: Path, sweep_id: str, *, metric: str, mode: str = "max",
               num_samples: int = 1, search_alg=None, scheduler=None, max_concurrent: int = 2,
               resources: dict[str, float] | None = None):
    """A ``Tuner`` for ``trainable`` storing under ``out/ray_tune/sweep_id``, or the restored one
    when an interrupted sweep of that id is there (failed trials are kept as failed)."""
    import ray.tune as tune

    storage = str(out / "ray_tune")
    trainable = tune.with_resources(trainable, resources or {"cpu": 1})
    exp_path = Path(storage) / sweep_id
    if exp_path.exists() and tune.Tuner.can_restore(str(exp_path)):
        _say(f"resuming sweep {sweep_id} from {exp_path}")
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
    if summary.start("ldmseg-tune", f"{sweep_id}-summary", params=params,
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
    tracker.set_tags({"ldmseg.error": f"{type(exc).__name__}: {exc}"[:500]})
    tracker.finish("FAILED")


def prepare_model_sweep(kind: str, model: str, data: str, output: str, *, name: str | None, max_images: int | None,
                        seed: int, tracking_uri: str | None, address: str | None
                        ) -> tuple[Path, str, str, dict[str, Any]]:
    """Common start of a sweep over a trained model: output folder, Ray, the model folder, the
    ground-truth folder, MLflow URI and experiment → (out, uri, sweep id, base param space)."""
    from pipelines import ray_compat
    from ldmseg.evaluation import resolve_ground_truth
    from pipelines.evaluate import resolve_model
    from pipelines.tracking import Tracker, local_artifact_root, resolve_tracking_uri

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_compat.init_ray(address)
    model_dir = resolve_model(model, out, tracking_uri)
    gt = resolve_ground_truth(data, out)
    print(f"[tune] scoring {gt.description}", file=sys.stderr, flush=True)
    uri = resolve_tracking_uri(tracking_uri, out)
    sweep_id = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    space: dict[str, Any] = {"model_dir": str(Path(model_dir).resolve()), "gt": dataclasses.asdict(gt),
                             "tracking_uri": uri, "artifact_root": local_artifact_root(uri, out),
                             "experiment": "ldmseg-tune", "sweep_id": sweep_id, "max_images": max_images, "seed": seed}
    Tracker(uri, artifact_root=space["artifact_root"]).ensure_experiment(space["experiment"])
    return out, uri, sweep_id, space


def run_sampling_sweep(model: str, data: str, output: str, *, samplers: list[str], steps: list[int],
                       search: str = "grid", num_samples: int = 1, space_extra: dict[str, list] | None = None,
                       max_images: int | None = None, max_concurrent: int = 2, name: str | None = None,
                       save_best: str | None = None, tracking_uri: str | None = None, seed: int = 0,
                       address: str | None = None) -> dict[str, Any]:
    import ray.tune as tune

    from ldmseg.diffusion.sampling import SAMPLERS

    for s in samplers:
        if s not in SAMPLERS:
            raise SystemExit(f"ldmseg tune: unknown sampler {s!r}; known: {', '.join(SAMPLERS)}")
    out, uri, sweep_id, space = prepare_model_sweep("sampling", model, data, output, name=name, max_images=max_images,
                                                    seed=seed, tracking_uri=tracking_uri, address=address)
    extra = space_extra or {}
    search_alg = None
    if search == "grid":
        space["sampler"] = tune.grid_search(samplers)
        space["steps"] = tune.grid_search(steps)
        for k, values in extra.items():
            space[k] = tune.grid_search(values)
    elif search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        space["sampler"] = tune.choice(samplers)
        space["steps"] = tune.randint(min(steps), max(steps) + 1)
        for k, values in extra.items():
            space[k] = tune.choice(values)
        search_alg = OptunaSearch(metric="pq", mode="max", seed=seed)
    else:
        raise SystemExit(f"ldmseg tune: --search must be grid or optuna, got {search!r}")

    tuner = make_tuner(sampling_trial, space, out, sweep_id, metric="pq", num_samples=num_samples,
                       search_alg=search_alg, max_concurrent=max_concurrent)
    _say(f"sweep {sweep_id}: {search} search over samplers {samplers}, steps {steps}"
         + (f", {extra}" if extra else "") + f"; MLflow {redact_uri(uri)}")
    grid = tuner.fit()

    rows, failed = collect_results(grid, SAMPLING_KEYS, ("pq", "sq", "rq", "seconds_per_image"), "pq")
    rows.sort(key=lambda r: (-r["pq"], r["seconds_per_image"]))
    keys = [k for k in SAMPLING_KEYS if any(k in r for r in rows)] + ["pq", "sq", "rq", "seconds_per_image"]
    table = markdown_table(rows, keys)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"sweep_id": sweep_id, "trials": rows, "failed": failed}, indent=2))
    best = None
    if rows:
        plot_pareto(rows, out / "pareto.png", f"{sweep_id}: PQ vs latency")
        best = rows[0]
        best_cfg = {"sampling": {k: best[k] for k in SAMPLING_KEYS if k in best}}
        (out / "best.yaml").write_text(yaml.safe_dump(best_cfg, sort_keys=False))
        if save_best:
            target = Path(save_best) if Path(save_best).suffix else REPO_CONF / "sampling" / f"{save_best}.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"# best sampling configuration of sweep {sweep_id} (PQ {best['pq']:.4f}, "
                              f"{best['seconds_per_image']:.3f} s/image)\n" + yaml.safe_dump(best_cfg, sort_keys=False))
    log_summary(uri, out, sweep_id, "sampling-summary", {"model": model, "data": data, "search": search},
                {"best_pq": best["pq"], "best_seconds_per_image": best["seconds_per_image"]} if best else {},
                ["table.md", "results.json", "pareto.png", "best.yaml"])
    _say(f"{len(rows)} trials scored, {len(failed)} failed; table {out / 'table.md'}")
    return {"sweep_id": sweep_id, "best": best, "trials": rows, "failed": failed, "output": str(out)}


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sampling", help="search samplers, step counts and thresholds on a trained model")
    s.add_argument("--model", required=True, help="checkpoint folder or models:/ldmseg-ldm@current")
    s.add_argument("--data", required=True, help="held-out COCO panoptic folder or Parquet shards")
    s.add_argument("--output", default="runs/tune-sampling", help="results folder (default: %(default)s)")
    s.add_argument("--samplers", default=None, help="comma list (default: every registered sampler)")
    s.add_argument("--steps", default="5,10,20,50", help="comma list of step counts (optuna: their range)")
    s.add_argument("--mask-th", default=None, help="comma list of mask_th values to search")
    s.add_argument("--count-th", default=None, help="comma list of count_th values to search")
    s.add_argument("--overlap-th", default=None, help="comma list of overlap_th values to search")
    s.add_argument("--timestep-spacing", default=None, help="comma list: trailing,leading,linspace")
    s.add_argument("--sigma-schedule", default=None, help="comma list: default,karras (karras: sigma-based "
                                                          "samplers only; other combinations fail as trials)")
    s.add_argument("--self-condition", default=None, help="comma list: true,false")
    s.add_argument("--search", choices=("grid", "optuna"), default="grid")
    s.add_argument("--num-samples", type=int, default=1, help="optuna trials (grid: repeats of the grid)")
    s.add_argument("--max-images", type=int, default=None, help="score on the first N images only")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: %(default)s)")
    s.add_argument("--name", default=None, help="sweep id; re-use it to resume an interrupted sweep")
    s.add_argument("--save-best", default=None, help="write the best config as conf/sampling/NAME.yaml (or a path)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--address", default=None, help="Ray address (default: a local Ray)")

    from pipelines import tune_inpainting
    from pipelines.sweeps import schedules as tune_schedules

    tune_schedules.add_arguments(sub.add_parser(
        "schedules", help="short LDM trainings under ASHA over beta schedule, Min-SNR γ, lr schedule and "
                          "self-conditioning probability"))
    tune_inpainting.add_arguments(sub.add_parser(
        "inpainting", help="PQ against the known fraction for sparse and global masks (table and plot)"))


def check_sampling_inputs(args: argparse.Namespace) -> tuple[list[str], list[int], dict[str, list]]:
    """The inputs of ``ldmseg tune sampling``, checked before Ray starts → samplers, steps and the
    other searched values (key → list)."""
    from ldmseg import inputs
    from ldmseg.diffusion.sampling import SAMPLERS

    extra: dict[str, list] = {}
    for key, cast, what in (("mask_th", float, "numbers"), ("count_th", float, "numbers"),
                            ("overlap_th", float, "numbers"), ("timestep_spacing", str, "names"),
                            ("sigma_schedule", str, "names"), ("self_condition", _bool, "true/false")):
        raw = getattr(args, key)
        if raw:
            extra[key] = inputs.parse_list("--" + key.replace("_", "-"), raw, cast, what)
    samplers = inputs.parse_list("--samplers", args.samplers, str, "names") if args.samplers else list(SAMPLERS)
    steps = inputs.parse_list("--steps", args.steps, int, "integers")
    for s in samplers:
        inputs.sampler(s, "--samplers")
    for n in steps:
        inputs.steps(n, "--steps")
    for key in inputs.THRESHOLDS:
        for value in extra.get(key, []):
            inputs.threshold(value, "--" + key.replace("_", "-"))
    inputs.model("--model", args.model)
    inputs.dataset("--data", args.data)
    inputs.output_folder("--output", args.output)
    return samplers, steps, extra


def run(args: argparse.Namespace) -> int:
    if args.what == "sampling":
        samplers, steps, extra = check_sampling_inputs(args)
        res = run_sampling_sweep(args.model, args.data, args.output, samplers=samplers,
                                 steps=steps, search=args.search, num_samples=args.num_samples,
                                 space_extra=extra, max_images=args.max_images, max_concurrent=args.max_concurrent,
                                 name=args.name, save_best=args.save_best, tracking_uri=args.tracking_uri,
                                 seed=args.seed, address=args.address)
        print(json.dumps({"sweep_id": res["sweep_id"], "best": res["best"], "n_trials": len(res["trials"]),
                          "n_failed": len(res["failed"]), "output": res["output"]}))
        return 0
    if args.what in ("schedules", "inpainting"):
        from pipelines import tune_inpainting
        from pipelines.sweeps import schedules as tune_schedules

        res = (tune_schedules if args.what == "schedules" else tune_inpainting).run(args)
        print(json.dumps({"sweep_id": res["sweep_id"], "best": res.get("best"), "n_trials": len(res["trials"]),
                          "n_failed": len(res["failed"]), "output": res["output"]}))
        return 0
    raise SystemExit(f"ldmseg tune: unknown search {args.what!r}")
