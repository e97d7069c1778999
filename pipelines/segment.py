"""Batch segmentation of a folder, bucket or list of images with a trained model (Ray Data).

    ldmseg segment --model runs/quickstart/models/ldm --input photos/ --output runs/seg --overlays
    ldmseg segment --model models:/ldmseg-ldm@current --input s3://bucket/photos --output s3://bucket/seg \\
        --sampling best --uncertainty 4 segment.max_actors=8 segment.num_gpus=1
    ldmseg segment --model runs/quickstart/models/ldm --input runs/quickstart/shards --output runs/seg-shards

The driver plans (lists the input, names every image, leaves out what the output already holds)
before it starts Ray; then a streaming Ray Data pipeline reads and decodes on CPU tasks, segments
on an autoscaling pool of model actors, and writes on CPU tasks (:mod:`pipelines.segment_steps`).
Bad files are quarantined to ``OUT/errors/*.jsonl`` with their reason; the job goes on and exits 0.
At the end the JSON parts are merged into ``OUT/panoptic.json`` and ``OUT/_summary.json`` holds
the counts (found = segmented + already done + quarantined). Re-running the same command skips
what is done; ``--overwrite`` redoes everything. docs/segment.md has the output format.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

from ldmseg.logs import get_logger

log = get_logger("segment")

PROGRESS_EVERY_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True,
                        help="model folder written by 'ldmseg train ldm' (local or s3://), or models:/NAME@ALIAS")
    parser.add_argument("--input", required=True,
                        help="folder or s3:// prefix (searched recursively for jpg, jpeg, png, webp, bmp, tif, "
                             "tiff in any letter case), a text file listing image paths or URIs (one per line), or "
                             "the Parquet shards of 'ldmseg preprocess' (every split; rows named SPLIT/STEM)")
    parser.add_argument("--output", required=True, help="output folder (local or s3://): panoptic/, panoptic.json, "
                                                        "errors/, _summary.json")
    parser.add_argument("--sampling", default=None,
                        help="a named sampling config or a YAML file (as 'ldmseg evaluate --sampling'), applied "
                             "to the model's sampling config; --sampler and --steps go on top")
    parser.add_argument("--sampler", default=None, help="sampler name (default: the model's config)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's config)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed, the same for every image (default: the --sampling config's, else 0)")
    parser.add_argument("--overlays", action="store_true", help="also write overlays/<name>.jpg per image")
    parser.add_argument("--uncertainty", type=int, default=None, metavar="K",
                        help="sample K >= 2 seeds per image: the map is their vote (or the medoid sample, with "
                             "sampling.fusion=medoid), uncertainty/<name>.png holds the per-pixel disagreement (0-255) "
                             "and each segment a stability score (default: the model's sampling.num_samples, whose "
                             "one map the maps are whenever it is >= 2)")
    parser.add_argument("--config", default=None,
                        help="YAML whose 'segment' and 'sampling' sections go over the model's (e.g. batch "
                             "sizes, actors, GPUs per actor, segment.max_pixels)")
    parser.add_argument("--overwrite", action="store_true", help="redo every image, forgetting earlier runs' records")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow (default: MLFLOW_TRACKING_URI, else sqlite in OUTPUT when it is local)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("overrides", nargs="*", help="segment.* or sampling.* overrides key=value, e.g. "
                                                     "segment.batch_size=8")


def job_config(model_cfg: Any, config_file: str | None, overrides: list[str],
               sections: tuple[str, ...] = ("segment", "sampling"), command: str = "segment") -> Any:
    """The model's config with a config file's ``sections`` and the overrides (keys of those
    sections only: the other sections describe the model)."""
    import yaml

    from ldmseg.config import ConfigError, override, parse_overrides
    from ldmseg.config_files import find_config

    assignments: dict[str, Any] = {}
    if config_file:
        values = yaml.safe_load(find_config(config_file).read_text()) or {}
        for section in sections:
            assignments.update({f"{section}.{k}": v for k, v in (values.get(section) or {}).items()})
    assignments.update(parse_overrides(overrides))
    foreign = sorted(k for k in assignments if k.split(".", 1)[0] not in sections)
    if foreign:
        keys = " and ".join(f"{s}.*" for s in sections)
        raise ConfigError(f"override {foreign[0]}: {command} takes only {keys} keys (the model's other "
                          "settings are fixed by its training)")
    return override(model_cfg, assignments)


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checkable before Ray starts → the ``--sampling`` options."""
    from ldmseg import inputs

    inputs.sampling_flags(args.sampler, args.steps)
    sampling = inputs.sampling_preset(args.sampling)
    inputs.model("--model", args.model)
    inputs.s3_credentials("--input", args.input)
    inputs.s3_credentials("--output", args.output)
    if args.uncertainty is not None and args.uncertainty < 2:
        raise inputs.InputError(f"--uncertainty {args.uncertainty}: needs K >= 2 samples per image to measure "
                                "their disagreement; leave it out for one sample")
    if "://" not in args.output and Path(args.output).is_file():
        raise inputs.InputError(f"--output {args.output}: is a file; pass a folder (created if missing)")
    return sampling


def model_meta(model: str, work: Path, tracking_uri: str | None) -> dict:
    """``model.json`` of ``model`` (a folder, s3:// prefix or ``models:/`` URI), read on the driver."""
    from ldmseg.checkpoint import read_meta
    from pipelines.tracking import resolve_model

    local = resolve_model(model, work, tracking_uri)
    if "://" in local:
        import fsspec

        fs, root = fsspec.core.url_to_fs(local)
        fs.get_file(posixpath.join(root, "model.json"), str(work / "model.json"))
        local = str(work)
    return read_meta(local)


def check_shards_match(source: str, cfg: Any) -> None:
    """Parquet shards hold images at their training resolution: it must be the model's."""
    from ldmseg import inputs
    from ldmseg.data.manifest import open_fs, read_manifest

    fs, root = open_fs(source)
    stored = read_manifest(fs, root).config.get("data", {})
    for key in ("resolution", "resize_mode"):
        if key in stored and stored[key] != getattr(cfg.data, key):
            raise inputs.InputError(
                f"--input {source}: shards preprocessed with data.{key}={stored[key]}, the model uses "
                f"{getattr(cfg.data, key)}; segment the source images instead, or shards made for this model")


class Progress:
    """Counts of the images written back by the pipeline, logged every ``PROGRESS_EVERY_S`` seconds."""

    def __init__(self, total: int):
        self.total, self.t0 = total, time.time()
        self.last = self.t0
        self.segmented = self.quarantined = 0
        self.reasons: dict[str, int] = {}
        self.devices: dict[str, int] = {}
        """Images segmented per model device (``GPU 0``, ``cpu``): where the actors ran."""

    def add(self, status: list[str], reasons: list[str], devices: list[str] | None = None) -> None:
        for i, (s, r) in enumerate(zip(status, reasons)):
            if s == "segmented":
                self.segmented += 1
                if devices is not None:
                    self.devices[devices[i]] = self.devices.get(devices[i], 0) + 1
            else:
                self.quarantined += 1
                self.reasons[r] = self.reasons.get(r, 0) + 1
        if time.time() - self.last >= PROGRESS_EVERY_S:
            self.log()

    def log(self) -> None:
        self.last = time.time()
        done = self.segmented + self.quarantined
        log.info(f"{done}/{self.total} images ({done / max(self.last - self.t0, 1e-9):.2f} images/s), "
                 f"{self.quarantined} quarantined")


def cluster_check(*, source: str, output: str, model: str, tracking_uri: str | None, nodes: int,
                  read: list[str]) -> None:
    """On a cluster of several nodes, what the Ray tasks and actors get must be reachable from
    every node (:mod:`pipelines.cluster_paths`): the images or shard files they read (``read``;
    for a list file, the folders of the images it lists), ``--output`` and ``--model``; a
    ``models:/`` model is loaded by each actor through MLflow, so the tracking URI too."""
    from pipelines.cluster_paths import local_path, model_uri_users, require_reachable, worker_reachable

    local = local_path(source)
    if local is not None and os.path.isdir(local):
        inputs: dict[str, str | None] = {"--input": os.path.abspath(local)}
    else:  # a list file (read here): the images it lists are read by the tasks
        folders = sorted({posixpath.dirname(u) for u in read if local_path(u) is not None})
        inputs = {f"--input {source}: the images in": next((f for f in folders if not worker_reachable(f)), None)}
    paths = {**inputs, "--output": output, "--model": model}
    require_reachable(paths, nodes, tracking_uri=tracking_uri,
                      tracking_users=model_uri_users(paths, "the model actors (they load --model from MLflow)"))


def run_pipeline(todo: list, cfg: Any, *, source: str, model: str, output: str, seed: int,
                 overlays: bool, address: str | None, tracking_uri: str | None, progress: Progress,
                 shard_files: list[str] | None = None) -> None:
    """The Ray Data pipeline over the images of ``todo`` (:class:`~pipelines.segment_plan.ImageRef`) of
    ``source``, read from ``shard_files`` when the input is Parquet shards."""
    from ldmseg.config import to_dict
    from pipelines import ray_compat
    from pipelines.cluster_paths import alive_node_count
    from pipelines.segment_steps import SHARD_COLUMNS, SegmentModel, decode_step, shard_decode_step, write_step

    seg = cfg.segment
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # the actors' own may differ
    ray_compat.init_ray(address)
    cluster_check(source=source, output=output, model=model, tracking_uri=tracking_uri, nodes=alive_node_count(),
                  read=shard_files or [r.uri for r in todo])
    if shard_files:
        ds = ray_compat.read_parquet(shard_files, columns=SHARD_COLUMNS)
        ds = ray_compat.map_batches(ds, shard_decode_step, batch_size=seg.decode_batch_size, batch_format="numpy",
                                    num_cpus=seg.decode_cpus, fn_kwargs={
                                        "cfg": cfg, "todo": {r.image_id: r.name for r in todo}, "keep_bytes": overlays})
    else:
        ds = ray_compat.dataset_from_items([{"uri": r.uri, "name": r.name, "image_id": r.image_id} for r in todo])
        ds = ray_compat.map_batches(ds, decode_step, batch_size=seg.decode_batch_size, batch_format="numpy",
                                    num_cpus=seg.decode_cpus,
                                    fn_kwargs={"cfg": cfg, "max_pixels": seg.max_pixels, "keep_bytes": overlays})
    ds = ray_compat.map_batches_actors(
        ds, SegmentModel, batch_size=seg.batch_size, min_actors=seg.min_actors, max_actors=seg.max_actors,
        num_cpus=seg.num_cpus, num_gpus=seg.num_gpus,
        constructor_kwargs={"model": model, "sampling": to_dict(cfg.sampling), "seed": seed,
                            "tracking_uri": tracking_uri})
    ds = ray_compat.map_batches(ds, write_step, batch_size=seg.write_batch_size, batch_format="numpy",
                                fn_kwargs={"out": output, "overlays": overlays, "alpha": seg.overlay_alpha,
                                           "quality": seg.overlay_quality, "max_pixels": seg.max_pixels})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.add([str(s) for s in batch["status"]], [str(r) for r in batch["reason"]],
                     [str(d) for d in batch["device"]])
    progress.log()


def segment(model: str, source: str, output: str, *, sampling: dict | None = None, sampler: str | None = None,
            steps: int | None = None, seed: int = 0, overlays: bool = False, uncertainty: int | None = None,
            config_file: str | None = None, overrides: list[str] | None = None, overwrite: bool = False,
            address: str | None = None, tracking_uri: str | None = None, log_mlflow: bool = True) -> dict[str, Any]:
    """Segment every image of ``source`` into ``output``; → the summary (also ``OUT/_summary.json``)."""
    from ldmseg.checkpoint import model_config
    from ldmseg.config import config_hash, to_dict, with_sampling
    from ldmseg.data.coco_writer import merge_parts
    from ldmseg.data.manifest import open_fs
    from pipelines.segment_plan import plan as make_plan
    from pipelines.segment_steps import CATEGORIES
    from pipelines.tracking import pin_model_uri

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ldmseg-segment-") as tmp:
        pinned, version = pin_model_uri(model, tracking_uri)
        meta = model_meta(pinned, Path(tmp), tracking_uri)
        cfg = job_config(model_config(tmp, meta), config_file, overrides or [])
    cfg = with_sampling(cfg, {**(sampling or {}), "sampler": sampler, "steps": steps, "seed": seed,
                              "num_samples": uncertainty})
    work = make_plan(source, output, overwrite=overwrite)
    if work.shard_files:
        check_shards_match(source, cfg)
    already = work.done_segmented + work.done_quarantined
    log.info(f"{len(work.found)} images in {source}: {len(work.todo)} to segment, {already} already done "
             f"({work.done_quarantined} of them quarantined)")
    progress = Progress(len(work.todo))
    if work.todo:
        run_pipeline(work.todo, cfg, source=source, model=pinned, output=output, seed=seed,
                     overlays=overlays, address=address, tracking_uri=tracking_uri,
                     progress=progress, shard_files=work.shard_files)
    seconds = time.time() - t0
    fs, root = open_fs(output)
    listed = 0
    if fs.glob(posixpath.join(root, "panoptic.parts", "*.json")):
        _, listed = merge_parts(output, CATEGORIES, keep_parts=True,
                                info={"description": f"ldmseg segment of {source}", "model": model})
    summary = {
        "input": source, "output": output, "model": model, "model_loaded": pinned, "model_version": version,
        "model_step": meta.get("step"), "model_stage": meta.get("extra", {}).get("stage"), "found": len(work.found),
        "segmented": progress.segmented, "already_done": already, "quarantined": progress.quarantined,
        "quarantine_reasons": progress.reasons, "devices": progress.devices, "listed_in_json": listed,
        "reconciles": len(work.found) == progress.segmented + already + progress.quarantined,
        "seconds": round(seconds, 3), "images_per_s": round(progress.segmented / max(seconds, 1e-9), 4),
        "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps, "seed": seed,
        "num_samples": cfg.sampling.num_samples, "sampling": to_dict(cfg.sampling), "segment": to_dict(cfg.segment),
        "config_hash": config_hash(cfg, ["sampling", "segment"]),
    }
    fs.pipe_file(posixpath.join(root, "_summary.json"), json.dumps(summary, indent=2).encode())
    if not summary["reconciles"]:
        raise RuntimeError(f"counts do not reconcile: found {len(work.found)} != segmented {progress.segmented} + "
                           f"already done {already} + quarantined {progress.quarantined}; see {output}/_summary.json")
    if log_mlflow and work.todo:
        from pipelines.segment_report import log_run

        log_run(summary, output, tracking_uri)
    return summary


def run(args: argparse.Namespace) -> int:
    sampling = check_inputs(args)
    seed = args.seed if args.seed is not None else int(sampling.get("seed", 0))
    summary = segment(args.model, args.input, args.output, sampling=sampling, sampler=args.sampler,
                      steps=args.steps, seed=seed, overlays=args.overlays, uncertainty=args.uncertainty,
                      config_file=args.config, overrides=args.overrides, overwrite=args.overwrite,
                      address=args.address, tracking_uri=args.tracking_uri, log_mlflow=not args.no_mlflow)
    print(json.dumps(summary))
    return 0
