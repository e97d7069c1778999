"""``ldmseg tune inpainting``: PQ against the known fraction for ``sparse`` and ``global`` masks.

One Ray Tune trial per (mask kind, known fraction), each an MLflow run tagged with the sweep id;
the summary run holds the table (``table.md``), ``results.json`` and a plot of PQ against the
known fraction (``inpainting.png``: whole image and mostly-unknown segments, per mask kind).
The scoring itself is :func:`ldmseg.inpainting_eval.inpainting_scores`.

Example::

    ldmseg tune inpainting --model runs/bench/models/ldm --data runs/bench/scenes/eval \\
        --fractions 0,0.1,0.25,0.5,0.75 --kinds sparse,global --steps 20
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldmseg.redact import redact_uri
from pipelines.sweeps.kit import (add_trial_resources, cached_segmenter, collect_results, denoiser_parameters, log,
                                  log_summary, make_tuner, markdown_table, prepare_model_sweep, resources_of,
                                  save_pq_plot, scored_trial)

KINDS = ("sparse", "global")
KNOWN_SLOTS = ("given", "predicted")  # Segmenter.inpaint(known_slots=...); not imported here to keep --help light
DEFAULT_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75)
METRICS = ("pq", "sq", "rq", "pq_unknown", "sq_unknown", "rq_unknown", "known_fraction", "n_unknown_segments",
           "seconds_per_image")


def inpainting_trial(config: dict[str, Any]) -> None:
    """One Tune trial: inpaint the held-out set at one (kind, fraction) and log an MLflow run."""
    from ldmseg.evaluation import GroundTruth, progress_logger
    from ldmseg.inpainting_eval import inpainting_scores

    params = {"kind": config["kind"], "fraction": config["fraction"], "sampler": config.get("sampler"),
              "steps": config.get("steps"), "known_slots": config.get("known_slots", "given")}
    options = {k: config[k] for k in ("sampler", "steps", "known_slots") if config.get(k) is not None}
    scored_trial(config, "inpainting-trial", params,
                 lambda: inpainting_scores(cached_segmenter(config["model_dir"]), GroundTruth(**config["gt"]).load(),
                                           config["kind"], config["fraction"], seed=config.get("seed", 0),
                                           max_images=config.get("max_images"),
                                           progress=progress_logger("inpainting", f"{config['kind']} "
                                                                                  f"{config['fraction']:.0%}:"),
                                           **options))


def add_unknown_gains(rows: list[dict[str, Any]]) -> None:
    """``gain_unknown``: each row's PQ on the mostly-unknown segments minus that of its kind at 0 %
    known (the plain segmentation): the headline of inpainting. The whole-image PQ also counts the
    known pixels pasted back, which any model, even a random one, gets right."""
    base = {r["kind"]: r["pq_unknown"] for r in rows if r["fraction"] == 0.0}
    for r in rows:
        r["gain_unknown"] = r["pq_unknown"] - base[r["kind"]] if r["kind"] in base else None


def plot_inpainting(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for kind, colour in zip(KINDS, ("tab:blue", "tab:orange")):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["fraction"])
        if not pts:
            continue
        xs = [100 * r["fraction"] for r in pts]
        ax.plot(xs, [100 * r["pq"] for r in pts], "-o", color=colour, label=f"{kind}: whole image")
        ax.plot(xs, [100 * r["pq_unknown"] for r in pts], "--s", color=colour, label=f"{kind}: mostly-unknown segments")
    save_pq_plot(fig, ax, path, "known fraction of the latent grid (%)", title)


def run_inpainting_sweep(model: str, data: str, output: str, *, kinds: list[str], fractions: list[float],
                         sampler: str | None = None, steps: int | None = None, known_slots: str = "given",
                         max_images: int | None = None, max_concurrent: int = 2,
                         resources: dict | None = None, name: str | None = None,
                         tracking_uri: str | None = None, seed: int = 0, address: str | None = None) -> dict[str, Any]:
    import ray.tune as tune

    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"ldmseg tune inpainting: unknown mask kind(s) {bad}; choose from {', '.join(KINDS)}")
    if known_slots not in KNOWN_SLOTS:
        raise SystemExit(f"ldmseg tune inpainting: --known-slots must be one of {', '.join(KNOWN_SLOTS)}, "
                         f"got {known_slots!r}")
    bad = [f for f in fractions if not 0.0 <= f < 1.0]
    if bad:
        raise SystemExit(f"ldmseg tune inpainting: known fractions must lie in [0, 1), got {bad} "
                         "(write 25 % as 0.25)")
    out, uri, sweep_id, space = prepare_model_sweep("inpainting", model, data, output, name=name, max_images=max_images,
                                                    seed=seed, tracking_uri=tracking_uri, address=address)
    space.update(sampler=sampler, steps=steps, known_slots=known_slots, kind=tune.grid_search(kinds),
                 fraction=tune.grid_search(fractions))
    tuner = make_tuner(inpainting_trial, space, out, sweep_id, metric="pq_unknown", max_concurrent=max_concurrent,
                       resources=resources, model_parameters=denoiser_parameters(space["model_dir"]))
    log.info(f"sweep {sweep_id}: inpainting with {kinds} masks at known fractions {fractions}; "
             f"MLflow {redact_uri(uri)}")
    grid = tuner.fit()

    rows, failed = collect_results(grid, ("kind", "fraction"), METRICS, "pq_unknown")
    rows.sort(key=lambda r: (r["kind"], r["fraction"]))
    add_unknown_gains(rows)
    (out / "table.md").write_text(markdown_table(rows, ["kind", "fraction", "gain_unknown", *METRICS]) + "\n")
    (out / "results.json").write_text(json.dumps({"sweep_id": sweep_id, "trials": rows, "failed": failed}, indent=2))
    if rows:
        plot_inpainting(rows, out / "inpainting.png", f"{sweep_id}: PQ vs known fraction")
    headline = {f"{m}_{r['kind']}_{round(100 * r['fraction'])}": r[m] for r in rows
                for m in ("pq", "pq_unknown", "gain_unknown") if r.get(m) is not None}
    for r in rows:
        if r.get("gain_unknown") is not None and r["fraction"] > 0:
            log.info(f"{r['kind']} {r['fraction']:.0%} known: PQ on the unknown segments {100 * r['pq_unknown']:.1f} "
                     f"({100 * r['gain_unknown']:+.1f} over 0 % known; whole image, pasted known pixels included: "
                     f"{100 * r['pq']:.1f})")
    log_summary(uri, out, sweep_id, "inpainting-summary", {"model": model, "data": data, "sampler": sampler,
                                                            "steps": steps, "known_slots": known_slots}, headline,
                ["table.md", "results.json", "inpainting.png"])
    log.info(f"{len(rows)} trials scored, {len(failed)} failed; table {out / 'table.md'}")
    return {"sweep_id": sweep_id, "trials": rows, "failed": failed, "output": str(out)}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ldmseg-ldm@current")
    parser.add_argument("--data", required=True, help="held-out COCO panoptic folder or Parquet shards")
    parser.add_argument("--output", default="runs/tune-inpainting", help="results folder (default: %(default)s)")
    parser.add_argument("--kinds", default="sparse,global", help="comma list of mask kinds (default: %(default)s)")
    parser.add_argument("--fractions", default="0,0.1,0.25,0.5,0.75",
                        help="comma list of known fractions in [0, 1) (default: %(default)s)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--known-slots", choices=KNOWN_SLOTS, default="given",
                        help="id slots of the known segments: 'given' (a seeded permutation, or reading order "
                             "for raster-slot models) or 'predicted' (sample once without hints and give each "
                             "known segment the slot of the predicted segment it overlaps most; twice the "
                             "sampling time) (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="score on the first N images only")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: %(default)s)")
    add_trial_resources(parser)
    parser.add_argument("--name", default=None, help="sweep id; re-use it to resume an interrupted sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")


def check_inputs(args) -> None:
    """The model, data, sampler and steps of ``ldmseg tune inpainting``, checked before Ray starts
    (mask kinds and known fractions: :func:`run_inpainting_sweep`, also before Ray)."""
    from ldmseg import inputs

    inputs.sampling_flags(args.sampler, args.steps)
    inputs.model("--model", args.model)
    inputs.dataset("--data", args.data)
    inputs.output_folder("--output", args.output)


def run(args) -> dict[str, Any]:
    from ldmseg import inputs

    check_inputs(args)
    return run_inpainting_sweep(args.model, args.data, args.output, kinds=inputs.parse_list("--kinds", args.kinds, str),
                                fractions=inputs.parse_list("--fractions", args.fractions, float, "numbers"),
                                sampler=args.sampler, steps=args.steps,
                                known_slots=args.known_slots, max_images=args.max_images,
                                max_concurrent=args.max_concurrent,
                                resources=resources_of(args), name=args.name, tracking_uri=args.tracking_uri,
                                seed=args.seed, address=args.address)
