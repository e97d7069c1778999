"""Segment a dataset with a trained model and report PQ (one JSON object on stdout).

``--model`` is a checkpoint folder or ``models:/NAME@ALIAS``; ``--data`` is a COCO panoptic
folder or the Parquet output of ``ldmseg preprocess``. For shards, the images of one split
(``--split``, default ``val``; ``train`` only when asked) are scored against the source COCO data
their manifest records; if that source is not readable, against the shards' cleaned ground
truth, and the output says so. Predictions (COCO panoptic PNGs + JSON) and per-image
statistics are written to ``--output``; PQ/SQ/RQ (class-agnostic, and class-aware when the
ground truth has categories) go to stdout and MLflow. Progress goes to stderr.

Sampling: the model's own ``sampling`` config, with a named sampling config applied on top
(``--sampling NAME``, e.g. one saved by ``ldmseg tune sampling --save-best NAME``; or
``--sampling FILE.yaml``; :mod:`ldmseg.sampling_presets`), and the flags ``--sampler``,
``--steps``, ``--samples``, ``--fusion`` and the thresholds on top of that. The output records the sampling config used
(``sampling``) and the named config (``sampling_preset``).

Example::

    ldmseg evaluate --model runs/quickstart/models/ldm --data runs/quickstart/scenes/eval \\
        --sampler dpmsolver++ --steps 10
    ldmseg evaluate --model runs/bench/models/ldm --data runs/bench/scenes/test --sampling best
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ldmseg.logs import get_logger

log = get_logger("evaluate")


def evaluate(model: str, data: str, output: str, *, sampler: str | None = None, steps: int | None = None,
             seed: int = 0, batch_size: int | None = None, max_images: int | None = None,
             thresholds: Mapping[str, float] | None = None, sampling: Mapping[str, Any] | None = None,
             sampling_preset: str | None = None, tracking_uri: str | None = None, log_mlflow: bool = True,
             split: str | None = None, on_ray: bool = False, address: str | None = None,
             num_samples: int | None = None, fusion: str | None = None) -> dict[str, Any]:
    """Segment ``data`` with ``model`` into ``output`` and score it; → the result (also ``metrics.json``).

    ``sampling`` (SamplingConfig fields, e.g. a named sampling config's) is applied to the model's
    sampling config, then ``sampler``, ``steps``, ``num_samples``, ``fusion`` and ``thresholds``; ``sampling_preset`` only
    names where ``sampling`` came from, for the record. ``on_ray``: segment on Ray model actors
    (:mod:`pipelines.evaluate_ray`; ``address``: the cluster) instead of in this process.
    """
    from ldmseg.config import to_dict
    from ldmseg.evaluation import predict_dataset, progress_logger, resolve_ground_truth
    from ldmseg.metrics.pq import evaluate_folders
    from ldmseg.segmenter import Segmenter
    from pipelines.tracking import resolve_model

    options = {**(sampling or {}), **(thresholds or {})}
    options.update({k: v for k, v in (("sampler", sampler), ("steps", steps), ("num_samples", num_samples),
                                      ("fusion", fusion)) if v is not None})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ldmseg-eval-", dir=out) as tmp:
        work = Path(tmp)
        model_dir = resolve_model(model, work, tracking_uri)
        gt = resolve_ground_truth(data, work, split)
        log.info(f"scoring {gt.description}")
        dataset = gt.load()
        if max_images:
            dataset.records = dataset.records[:max_images]
        options.pop("seed", None)  # the ``seed`` argument decides
        pred_json = None
        if on_ray:  # the model is loaded by the actors: here only its config is read
            from pipelines.evaluate_ray import evaluate_on_ray

            pred_json, used, stats = evaluate_on_ray(model_dir, dataset.records, work, out / "predictions",
                                                     options=options, seed=seed, batch_size=batch_size,
                                                     address=address, tracking_uri=tracking_uri)
        else:
            segmenter = Segmenter.from_pretrained(model_dir)
            batch_size = batch_size or options.pop("batch_size", None) or segmenter.cfg.sampling.batch_size
            used = segmenter.sampling_config(**options, seed=seed, batch_size=batch_size)
            log.info(f"segmenting in this process on {segmenter.device}"
                     + ("" if segmenter.device.type == "cuda" else " (no CUDA device here; --on-ray puts the model "
                                                                    "on the cluster's GPUs)"))
            stats = predict_dataset(segmenter, dataset, out / "predictions", seed=seed, batch_size=batch_size,
                                    progress=progress_logger("evaluate", "segmented"), **options)
        agnostic = evaluate_folders(pred=str(out / "predictions"), pred_json=pred_json, class_agnostic=True,
                                    missing="void", image_ids=[r.image_id for r in dataset.records],
                                    **gt.local_for_pq(work).pq_args())
    result: dict[str, Any] = {
        "model": model, "data": data, "scored": gt.description,
        "sampler": used.sampler, "steps": used.steps, "seed": seed,
        "sampling": to_dict(used), "sampling_preset": sampling_preset,
        "pq": agnostic["All"]["pq"], "sq": agnostic["All"]["sq"], "rq": agnostic["All"]["rq"],
        "class_agnostic": agnostic, "n_images": agnostic["n_images"],
        "seconds_per_image": stats["seconds_per_image"], "skipped": stats["skipped"],
        "predictions": str(out / "predictions"), "on_ray": on_ray, **({"devices": stats["devices"]} if on_ray else {}),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if log_mlflow:
        from pipelines.tracking import Tracker, local_artifact_root, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri, out)
        t = Tracker(uri, artifact_root=local_artifact_root(uri, out))
        if t.start("ldmseg-evaluate", f"evaluate-{Path(out).name}",
                   params={"model": model, "data": data, "split": split or "",
                           "sampling_preset": sampling_preset or "", **to_dict(used)}):
            t.set_tags({"ldmseg.scored": gt.description[:5000]})
            t.log_metrics({k: result[k] for k in ("pq", "sq", "rq", "seconds_per_image")}, step=0)
            t.log_artifact(out / "metrics.json")
            t.finish()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ldmseg-ldm@current")
    parser.add_argument("--data", required=True, help="COCO panoptic folder or Parquet shards (ldmseg preprocess)")
    parser.add_argument("--split", choices=("val", "test", "train"), default=None,
                        help="with shards: the split to score (default val, the one choices are made on; test for "
                             "reported numbers, e.g. COCO val2017 preprocessed with --split test; train only when "
                             "asked: a figure of fit, not a held-out result). Scored against the shards' source COCO data")
    parser.add_argument("--output", default="runs/evaluate", help="predictions and metrics.json (default: %(default)s)")
    parser.add_argument("--sampling", default=None, metavar="NAME|FILE",
                        help="a named sampling config ($LDMSEG_HOME/sampling/NAME.yaml, LDMSEG_HOME defaulting to "
                             "~/.config/ldmseg; e.g. saved by 'ldmseg tune sampling --save-best NAME') or a YAML "
                             "file, applied to the model's sampling config (the flags below go on top)")
    parser.add_argument("--sampler", default=None, help="sampler name (default: the model's config)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's config)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: the --sampling config's, else 0)")
    parser.add_argument("--samples", type=int, default=None, metavar="K",
                        help="samples per image, scoring the one map --fusion makes of them (K "
                             "times the sampling time; default: the model's sampling.num_samples)")
    parser.add_argument("--fusion", choices=("vote", "medoid"), default=None,
                        help="how K >= 2 samples make one map: 'vote', each pixel to the segment most samples put it "
                             "in, or 'medoid', the sample agreeing most with the others (default: the model's "
                             "sampling.fusion)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--mask-th", type=float, default=None)
    parser.add_argument("--count-th", type=float, default=None, help="minimum segment area, fraction of the image")
    parser.add_argument("--overlap-th", type=float, default=None)
    parser.add_argument("--tracking-uri", default=None, help="MLflow (default: MLFLOW_TRACKING_URI or sqlite in OUTPUT)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--on-ray", action="store_true",
                        help="segment on Ray model actors ('ldmseg segment''s path: parallel image reads, one model "
                             "per actor, one GPU each when the cluster has GPUs) instead of in this process")
    parser.add_argument("--address", default=None, help="with --on-ray: Ray address (default: RAY_ADDRESS or a local Ray)")


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The inputs of ``ldmseg evaluate``, checked before the model loads → the ``--sampling`` options."""
    from ldmseg import inputs

    inputs.sampling_flags(args.sampler, args.steps, sample_count=args.samples, mask_th=args.mask_th,
                          count_th=args.count_th, overlap_th=args.overlap_th)
    sampling = inputs.sampling_preset(args.sampling)
    inputs.model("--model", args.model)
    inputs.dataset("--data", args.data)
    inputs.output_folder("--output", args.output)
    return sampling


def run(args: argparse.Namespace) -> int:
    sampling = check_inputs(args)
    seed = args.seed if args.seed is not None else sampling.get("seed", 0)
    thresholds = {k: v for k, v in (("mask_th", args.mask_th), ("count_th", args.count_th),
                                    ("overlap_th", args.overlap_th)) if v is not None}
    res = evaluate(args.model, args.data, args.output, sampler=args.sampler, steps=args.steps, seed=seed,
                   batch_size=args.batch_size, max_images=args.max_images, thresholds=thresholds, sampling=sampling,
                   sampling_preset=args.sampling, tracking_uri=args.tracking_uri, log_mlflow=not args.no_mlflow,
                   split=args.split, on_ray=args.on_ray, address=args.address, num_samples=args.samples,
                   fusion=args.fusion)
    print(json.dumps(res))
    return 0
