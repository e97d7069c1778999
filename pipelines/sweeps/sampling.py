"""``ldmseg tune sampling``: samplers × steps × other sampling options, PQ against latency.

One Ray Tune trial per sampling configuration on a held-out set reports PQ, SQ, RQ and seconds per
image; each trial is an MLflow run tagged with the sweep id, and a summary run holds the table, a
PQ-vs-latency Pareto plot and the best configuration (``best.yaml``). ``--save-best NAME`` also
saves it as a named sampling config (:mod:`ldmseg.sampling_presets`, ``$LDMSEG_HOME/sampling/
NAME.yaml``) that ``ldmseg evaluate --sampling NAME`` uses.

The searched values are :class:`~ldmseg.config.SamplingConfig` fields: the search space holds them
as ``sampling.<field>`` keys and each trial applies them to the model's config with
:func:`ldmseg.config.with_sampling` (through ``Segmenter.segment``'s options). Besides
``--samplers`` and ``--steps``, every other field but ``seed`` and ``batch_size`` has a flag taking
a comma list (``--mask-th 0.4,0.5``, ``--sigma-schedule default,karras,lu``: the schedules fit the
sigma-based samplers only, other combinations fail as trials).

Example::

    ldmseg tune sampling --model runs/bench/models/ldm --data runs/bench/scenes/validation \\
        --samplers ddim,dpmsolver++ --steps 5,10,20 --save-best best
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ldmseg.config import sampling_fields
from ldmseg.redact import redact_uri
from pipelines.sweeps.kit import (add_trial_resources, cached_segmenter, collect_results, denoiser_parameters, log,
                                  log_summary, make_tuner, markdown_table, prepare_model_sweep, resources_of,
                                  save_pq_plot, scored_trial)

PREFIX = "sampling."
METRICS = ("pq", "sq", "rq", "seconds_per_image")
# the sampling fields with a comma-list flag of their own (sampler and steps: --samplers, --steps)
SEARCHED_BY_FLAG = tuple(k for k in sampling_fields() if k not in ("sampler", "steps", "seed", "batch_size"))
# a field's flag is --<field with dashes>, but for num_samples: --samples (as in ldmseg evaluate and the
# served API), since --num-samples is Ray Tune's trial count
FLAG_NAMES = {"num_samples": "samples"}


def searched_flag(key: str) -> str:
    """The comma-list flag of the sampling field ``key``, e.g. ``--mask-th``."""
    return "--" + FLAG_NAMES.get(key, key).replace("_", "-")


def score_sampling(model_dir: str, gt: dict[str, Any], out: Path, options: dict[str, Any], *, seed: int = 0,
                   max_images: int | None = None) -> dict[str, float]:
    """Segment the ground truth ``gt`` (a :class:`~ldmseg.evaluation.GroundTruth` as a dict) with the
    sampling ``options`` (SamplingConfig fields); → pq, sq, rq, seconds_per_image, n_images."""
    from ldmseg.evaluation import GroundTruth, predict_dataset
    from ldmseg.metrics.pq import evaluate_folders

    truth = GroundTruth(**gt)
    dataset = truth.load()
    if max_images:
        dataset.records = dataset.records[:max_images]
    stats = predict_dataset(cached_segmenter(model_dir), dataset, out, seed=seed, **options)
    res = evaluate_folders(pred=str(out), class_agnostic=True, missing="void", workers=1,
                           image_ids=[r.image_id for r in dataset.records], **truth.local_for_pq().pq_args())
    metrics = {"pq": res["All"]["pq"], "sq": res["All"]["sq"], "rq": res["All"]["rq"],
               "seconds_per_image": stats["seconds_per_image"], "n_images": res["n_images"]}
    if any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
        raise FloatingPointError(f"trial produced NaN metrics: {metrics}")
    return metrics


def trial_options(config: dict[str, Any]) -> dict[str, Any]:
    """The searched sampling options of a trial config: its ``sampling.<field>`` keys, unprefixed."""
    return {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}


def sampling_trial(config: dict[str, Any]) -> None:
    """One Tune trial: score a sampling configuration and log it as an MLflow run."""
    import ray.tune

    options = trial_options(config)
    out = Path(ray.tune.get_context().get_trial_dir()) / "predictions"
    scored_trial(config, "sampling-trial", options,
                 lambda: score_sampling(config["model_dir"], config["gt"], out, options, seed=config.get("seed", 0),
                                        max_images=config.get("max_images")))


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


def search_space(samplers: list[str], steps: list[int], extra: dict[str, list], search: str, seed: int
                 ) -> tuple[dict[str, Any], Any]:
    """The ``sampling.<field>`` entries of the Tune param space, and the search algorithm (grid: ``None``)."""
    import ray.tune as tune

    values = {"sampler": samplers, "steps": steps, **extra}
    if search == "grid":
        return {PREFIX + k: tune.grid_search(v) for k, v in values.items()}, None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        space = {PREFIX + k: tune.choice(v) for k, v in values.items()}
        space[PREFIX + "steps"] = tune.randint(min(steps), max(steps) + 1)
        return space, OptunaSearch(metric="pq", mode="max", seed=seed)
    raise SystemExit(f"ldmseg tune: --search must be grid or optuna, got {search!r}")


def run_sampling_sweep(model: str, data: str, output: str, *, samplers: list[str], steps: list[int],
                       search: str = "grid", num_samples: int = 1, space_extra: dict[str, list] | None = None,
                       max_images: int | None = None, max_concurrent: int = 2,
                       resources: dict | None = None, name: str | None = None,
                       save_best: str | None = None, tracking_uri: str | None = None, seed: int = 0,
                       address: str | None = None) -> dict[str, Any]:
    """Run the sweep; → sweep id, best row, trial rows, failed trials, output folder and (with
    ``save_best``, a preset name or a YAML path) the saved named sampling config."""
    from ldmseg.diffusion.sampling import SAMPLERS
    from ldmseg.sampling_presets import save_preset

    for s in samplers:
        if s not in SAMPLERS:
            raise SystemExit(f"ldmseg tune: unknown sampler {s!r}; known: {', '.join(SAMPLERS)}")
    extra = space_extra or {}
    out, uri, sweep_id, space = prepare_model_sweep("sampling", model, data, output, name=name, max_images=max_images,
                                                    seed=seed, tracking_uri=tracking_uri, address=address)
    searched, search_alg = search_space(samplers, steps, extra, search, seed)
    tuner = make_tuner(sampling_trial, {**space, **searched}, out, sweep_id, metric="pq", num_samples=num_samples,
                       search_alg=search_alg, max_concurrent=max_concurrent, resources=resources,
                       model_parameters=denoiser_parameters(space["model_dir"]))
    log.info(f"sweep {sweep_id}: {search} search over samplers {samplers}, steps {steps}"
             + (f", {extra}" if extra else "") + f"; MLflow {redact_uri(uri)}")
    grid = tuner.fit()

    keyed_rows, keyed_failed = collect_results(grid, [PREFIX + k for k in sampling_fields()], METRICS, "pq")
    rows = [{**trial_options(r), **{m: r[m] for m in METRICS}} for r in keyed_rows]
    failed = [{**trial_options(f), "error": f["error"]} for f in keyed_failed]
    rows.sort(key=lambda r: (-r["pq"], r["seconds_per_image"]))
    keys = [k for k in sampling_fields() if any(k in r for r in rows)] + list(METRICS)
    (out / "table.md").write_text(markdown_table(rows, keys) + "\n")
    (out / "results.json").write_text(json.dumps({"sweep_id": sweep_id, "trials": rows, "failed": failed}, indent=2))
    best, saved = None, None
    if rows:
        plot_pareto(rows, out / "pareto.png", f"{sweep_id}: PQ vs latency")
        best = rows[0]
        options = {k: best[k] for k in sampling_fields() if k in best}
        (out / "best.yaml").write_text(yaml.safe_dump({"sampling": options}, sort_keys=False))
        if save_best:
            saved = str(save_preset(save_best, options, note=f"best sampling configuration of sweep {sweep_id} "
                                    f"(PQ {best['pq']:.4f}, {best['seconds_per_image']:.3f} s/image)"))
            log.info(f"saved the best sampling config as {saved} (ldmseg evaluate --sampling {save_best})")
    log_summary(uri, out, sweep_id, "sampling-summary", {"model": model, "data": data, "search": search},
                {"best_pq": best["pq"], "best_seconds_per_image": best["seconds_per_image"]} if best else {},
                ["table.md", "results.json", "pareto.png", "best.yaml"])
    log.info(f"{len(rows)} trials scored, {len(failed)} failed; table {out / 'table.md'}")
    return {"sweep_id": sweep_id, "best": best, "trials": rows, "failed": failed, "output": str(out),
            "saved": saved}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ldmseg-ldm@current")
    parser.add_argument("--data", required=True, help="held-out COCO panoptic folder or Parquet shards")
    parser.add_argument("--output", default="runs/tune-sampling", help="results folder (default: %(default)s)")
    parser.add_argument("--samplers", default=None, help="comma list (default: every registered sampler)")
    parser.add_argument("--steps", default="5,10,20,50", help="comma list of step counts (optuna: their range)")
    for key in SEARCHED_BY_FLAG:
        parser.add_argument(searched_flag(key), dest="searched_" + key, default=None,
                            help=f"comma list of sampling.{key} values to search (default: the model's)")
    parser.add_argument("--search", choices=("grid", "optuna"), default="grid")
    parser.add_argument("--num-samples", type=int, default=1, help="optuna trials (grid: repeats of the grid)")
    parser.add_argument("--max-images", type=int, default=None, help="score on the first N images only")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: %(default)s)")
    add_trial_resources(parser)
    parser.add_argument("--name", default=None, help="sweep id; re-use it to resume an interrupted sweep")
    parser.add_argument("--save-best", default=None,
                        help="save the best config as the named sampling config NAME ($LDMSEG_HOME/sampling/"
                             "NAME.yaml, LDMSEG_HOME defaulting to ~/.config/ldmseg) or to a .yaml path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")


def searched_values(flag: str, key: str, text: str) -> list:
    """A comma list of values of the sampling field ``key``, each checked against its type → the values."""
    from ldmseg import inputs
    from ldmseg.config import Config, ConfigError, SamplingConfig, with_sampling

    values = inputs.parse_list(flag, text, yaml.safe_load, "values")
    try:
        checked = [getattr(with_sampling(Config(), {key: v}).sampling, key) for v in values]
    except ConfigError as exc:
        raise inputs.InputError(f"{flag} {text}: {exc}") from None
    if key in SamplingConfig.THRESHOLDS:
        for value in checked:
            inputs.threshold(value, flag)
    return checked


def check_inputs(args: argparse.Namespace) -> tuple[list[str], list[int], dict[str, list]]:
    """The inputs of ``ldmseg tune sampling``, checked before Ray starts → samplers, steps and the
    other searched values (field → list)."""
    from ldmseg import inputs
    from ldmseg.diffusion.sampling import SAMPLERS

    extra = {key: searched_values(searched_flag(key), key, getattr(args, "searched_" + key))
             for key in SEARCHED_BY_FLAG if getattr(args, "searched_" + key)}
    samplers = inputs.parse_list("--samplers", args.samplers, str, "names") if args.samplers else list(SAMPLERS)
    steps = inputs.parse_list("--steps", args.steps, int, "integers")
    for s in samplers:
        inputs.sampler(s, "--samplers")
    for n in steps:
        inputs.steps(n, "--steps")
    inputs.model("--model", args.model)
    inputs.dataset("--data", args.data)
    inputs.output_folder("--output", args.output)
    if args.save_best:
        from ldmseg.sampling_presets import preset_path

        preset_path(args.save_best)  # a bad name fails now, not after the sweep
    return samplers, steps, extra


def run(args: argparse.Namespace) -> dict[str, Any]:
    samplers, steps, extra = check_inputs(args)
    return run_sampling_sweep(args.model, args.data, args.output, samplers=samplers, steps=steps, search=args.search,
                              num_samples=args.num_samples, space_extra=extra, max_images=args.max_images,
                              max_concurrent=args.max_concurrent,
                              resources=resources_of(args), name=args.name, save_best=args.save_best,
                              tracking_uri=args.tracking_uri, seed=args.seed, address=args.address)
