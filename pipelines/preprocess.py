"""Turn COCO panoptic data (local or s3://) into sharded, latent-ready Parquet with Ray Data.

The JSON is read once on the driver; images are decoded, validated, cleaned, remapped
(deterministically per image id) and resized/padded to the training resolution in parallel Ray tasks
of ``preprocess.rows_per_file`` images (:func:`plan_files`; their work:
:mod:`pipelines.preprocess_tasks`), each written by its own task with ``write_parquet`` (one file of
that many rows, whatever the cluster's CPU count: only the last file of a split in a chunk is
smaller, and a file lacks the rows its task rejected), one folder per split. Each image is decoded
once and its ids are checked and relabelled in one pass (:func:`coco.read_dense_sample`). Tasks
stage rejected inputs with their reason; they end in ``OUT/errors/``. ``OUT/_manifest.json`` records
counts that reconcile (inputs = written + quarantined; rows written are read back from the Parquet
footers) and the rows and bytes of every shard file (``file_sizes``), so training sizes its input
without a request per file. Work proceeds in chunks; a finished chunk is never redone, so a killed
run resumes where it stopped and a re-run of a finished output does nothing.

Examples::

    ldmseg preprocess --source data/coco-folder --output runs/shards --config conf/tiny.yaml
    ldmseg preprocess --images val2017 --masks annotations/panoptic_val2017 \\
        --annotations annotations/panoptic_val2017.json --output s3://bucket/shards --split val
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import posixpath
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ldmseg.config import Config, config_hash, load_config, to_dict
from ldmseg.data import coco, shards
from ldmseg.data.manifest import (ERRORS, PROGRESS, Manifest, open_fs, read_manifest, write_json, write_manifest,
                                  write_parquet_file)
from ldmseg.logs import get_logger, setup_logging
from pipelines import ray_compat
from pipelines.preprocess_tasks import process_groups

log = get_logger("preprocess")


def assign_split(image_id: int, default: str, val_fraction: float) -> str:
    """Deterministic split by image id: a stable hash puts ``val_fraction`` of ids in ``val``."""
    if val_fraction <= 0:
        return default
    h = int.from_bytes(hashlib.sha256(str(int(image_id)).encode()).digest()[:8], "little")
    return "val" if (h / 2**64) < val_fraction else default


def plan_files(n_images: int, rows_per_file: int, cpus: int) -> list[int]:
    """Images per Ray task (and so per Parquet file) for ``n_images`` of one split in a chunk.

    Each task writes its good rows to its own Parquet file (map and write fused: the images never
    pass through the object store), so a task takes ``rows_per_file`` images and writes one full
    file; only the last file of a split in a chunk may be smaller (and a file loses the rows its
    task rejected). ``cpus`` does not change the sizes: the file size is the config's whatever the
    cluster (sharing a chunk out over 2 × the CPUs gave 16-row files at 64 CPUs and ~30 k files
    for COCO at 256). A chunk of fewer files than CPUs leaves CPUs idle; :func:`run_preprocess`
    says so (a bigger ``preprocess.chunk_rows`` or a smaller ``rows_per_file`` gives more tasks).
    """
    del cpus  # the plan is the same on every cluster (the argument keeps call sites explicit)
    size = max(1, rows_per_file)
    return [min(size, n_images - i) for i in range(0, max(0, n_images), size)]


def _files_written(fs, root: str, split: str, prefix: str) -> dict[str, dict[str, int]]:
    """The Parquet files of one chunk in a split folder: path relative to ``root`` → ``rows`` (read
    from the footer) and ``bytes`` (from the listing)."""
    fs.invalidate_cache()
    out: dict[str, dict[str, int]] = {}
    for path, info in sorted(fs.glob(posixpath.join(root, split, f"{prefix}-*.parquet"), detail=True).items()):
        with fs.open(path, "rb") as f:
            rows = pq.read_metadata(f).num_rows
        out[posixpath.relpath(path, root)] = {"rows": int(rows), "bytes": int(info["size"])}
    return out


def _collect_errors(fs, folder: str) -> list[dict[str, Any]]:
    """The rejected inputs the tasks of one chunk staged, sorted by image id."""
    fs.invalidate_cache()
    rows: list[dict[str, Any]] = []
    if fs.isdir(folder):
        for path in sorted(fs.glob(posixpath.join(folder, "*.parquet"))):
            with fs.open(path, "rb") as f:
                rows.extend(pq.read_table(f).to_pylist())
    return sorted(rows, key=lambda e: (e["image_id"], e["split"]))


def _rm(fs, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def source_fingerprint(dataset: coco.CocoPanoptic) -> str:
    """Hash of the JSON's bytes and the listed files: a changed source gives a new fingerprint."""
    fs, path = open_fs(dataset.json_path, dataset.storage_options)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for r in dataset.records:
        h.update(f"{r.image_id}:{r.file_name}:{r.segments_file};".encode())
    return h.hexdigest()[:16]


def run_preprocess(cfg: Config, *, output: str, source: str | None = None, images: str | None = None,
                   masks: str | None = None, annotations: str | None = None, split: str = "train",
                   overwrite: bool = False) -> Manifest:
    """Preprocess a COCO panoptic source into Parquet shards under ``output``; returns the manifest.

    Ray must be initialised (:func:`pipelines.ray_compat.init_ray`): on several nodes the folders
    its tasks read and write are checked first (:func:`cluster_check`)."""
    from pipelines.cluster_paths import alive_node_count

    cluster_check(output=output, source=source, images=images, masks=masks, nodes=alive_node_count())
    t0 = time.time()
    dataset = coco.load_coco_panoptic(source, images=images, masks=masks, json_path=annotations)
    records = sorted(dataset.records, key=lambda r: r.image_id)
    problems = list(dataset.problems)
    log.info(f"source: {len(records)} images listed, {len(problems)} dataset-level problems")

    cfg_hash = config_hash(cfg, ["data", "preprocess"]) + f"-v{shards.SCHEMA_VERSION}"
    fingerprint = source_fingerprint(dataset)
    fs, root = open_fs(output)
    existing = read_manifest(fs, root)
    if existing is not None and (existing.config_hash != cfg_hash or existing.source_fingerprint != fingerprint):
        if not overwrite:
            what = "config" if existing.config_hash != cfg_hash else "source"
            raise SystemExit(
                f"ldmseg preprocess: {output} already holds shards of another {what} "
                f"(config {existing.config_hash}, source {existing.source_fingerprint}; "
                f"now {cfg_hash}, {fingerprint}). Choose a new --output, or pass --overwrite to replace it.")
        log.info(f"--overwrite: removing the previous output in {output}")
        fs.rm(root, recursive=True)
        existing = None
    if existing is not None and existing.complete:
        log.info(f"up to date: {output} already holds this source with this config (nothing to do)")
        return existing

    manifest = Manifest(schema_version=shards.SCHEMA_VERSION, config_hash=cfg_hash,
                        source=source or annotations or "", source_fingerprint=fingerprint,
                        source_paths={k: _absolute(v) for k, v in (("source", source), ("images", images),
                                                                    ("masks", masks), ("annotations", annotations))},
                        config={k: v for k, v in to_dict(cfg).items() if k in ("data", "preprocess")})
    fs.makedirs(root, exist_ok=True)
    write_manifest(fs, root, manifest)  # claims the folder for this config before any shard

    # Dataset-level problems (duplicate ids, annotations without image) are quarantined on the driver.
    quarantine_rows = [{"image_id": int(p.image_id) if p.image_id is not None else -1,
                        "file_name": p.file_name or "", "segments_file": "",
                        "split": split, "reason": f"{p.kind}: {p.reason}"} for p in problems]
    fs.makedirs(posixpath.join(root, ERRORS), exist_ok=True)
    fs.makedirs(posixpath.join(root, PROGRESS), exist_ok=True)
    write_parquet_file(fs, posixpath.join(root, ERRORS, "dataset.parquet"),
                       pa.Table.from_pylist(quarantine_rows, schema=shards.ERROR_SCHEMA))

    chunk_rows = max(1, cfg.preprocess.chunk_rows)
    chunks = [records[i:i + chunk_rows] for i in range(0, len(records), chunk_rows)]
    cfg_dict = to_dict(cfg)
    done_images = 0
    cpus, idle_noted = ray_compat.cluster_cpus(), False
    for k, chunk in enumerate(chunks):
        marker = posixpath.join(root, PROGRESS, f"chunk-{k:05d}.json")
        if fs.exists(marker):
            done_images += len(chunk)
            log.info(f"chunk {k + 1}/{len(chunks)}: already done, skipped")
            continue
        tc = time.time()
        prefix = f"chunk-{k:05d}"
        _remove_partial(fs, root, prefix)
        by_split: dict[str, list[coco.PanopticRecord]] = {}
        for r in chunk:
            by_split.setdefault(assign_split(r.image_id, split, cfg.preprocess.val_fraction), []).append(r)
        staging = posixpath.join(root, PROGRESS, f"{prefix}-errors")
        counts: dict[str, int] = {}
        written_files: dict[str, dict[str, int]] = {}
        tasks = 0
        for s, recs in sorted(by_split.items()):
            # One item (one block) per task batch (vars: a shallow dict; asdict deep-copies).
            # Each task stages its rejects and returns its good rows only. Materialised before the
            # write: Ray Data would otherwise fuse the map into the writer's tasks, which take
            # rows_per_file *items* (batches) each, i.e. one task for the whole chunk.
            plan = plan_files(len(recs), cfg.preprocess.rows_per_file, cpus)
            starts = itertools.accumulate(plan[:-1], initial=0)
            items = [{"records": json.dumps([vars(r) for r in recs[a:a + n]]), "split": s}
                     for a, n in zip(starts, plan)]
            tasks += len(items)
            with ray_compat.one_stage_scheduling():
                ds = ray_compat.dataset_from_items(items)
                ds = ray_compat.map_batches(ds, process_groups, batch_size=1, batch_format="pyarrow",
                                            fn_kwargs={"cfg_dict": cfg_dict, "staging": _url(fs, staging)})
                ray_compat.write_parquet(ds, posixpath.join(root, s), filesystem=ray_compat.arrow_filesystem(fs),
                                         rows_per_file=cfg.preprocess.rows_per_file, filename_prefix=prefix)
            split_files = _files_written(fs, root, s, prefix)
            written_files.update(split_files)
            n = sum(v["rows"] for v in split_files.values())
            if n:
                counts[s] = n
        t_map = time.time() - tc
        err_rows = _collect_errors(fs, staging)
        if sum(counts.values()) + len(err_rows) != len(chunk):
            raise RuntimeError(f"chunk {k}: {len(chunk)} images but {counts} written + {len(err_rows)} quarantined")
        write_parquet_file(fs, posixpath.join(root, ERRORS, f"{prefix}.parquet"),
                           pa.Table.from_pylist(err_rows, schema=shards.ERROR_SCHEMA))
        _rm(fs, staging)
        write_json(fs, marker, {"chunk": k, "images": len(chunk), "written": counts, "quarantined": len(err_rows),
                                "files": written_files})
        done_images += len(chunk)
        rate = len(chunk) / max(time.time() - tc, 1e-9)
        log.info(f"chunk {k + 1}/{len(chunks)}: {sum(counts.values())} written in {len(written_files)} files, "
                 f"{len(err_rows)} quarantined ({rate:.1f} images/s, {t_map:.1f} s decoding and writing; "
                 f"{done_images}/{len(records)} images done)")
        if tasks < cpus and len(chunk) == chunk_rows and not idle_noted:
            idle_noted = True
            log.info(f"a chunk of {chunk_rows} images gives {tasks} tasks of preprocess.rows_per_file="
                     f"{cfg.preprocess.rows_per_file} for {cpus} CPUs: raise preprocess.chunk_rows to keep every "
                     "CPU busy (files keep rows_per_file rows)")

    manifest = _finalise(fs, root, manifest, n_inputs=len(records) + len(problems))
    dt = time.time() - t0
    log.info(f"done in {dt:.1f} s: {manifest.inputs} inputs = {sum(manifest.written.values())} written "
             f"{manifest.written} + {manifest.quarantined} quarantined; "
             f"{sum(len(v) for v in manifest.files.values())} shards; {len(records) / max(dt, 1e-9):.1f} images/s")
    log.info("segments turned void while cleaning: " + "; ".join(
        f"{split}: {c['n_small']} under data.min_segment_area px, {c['n_crowd']} crowd, {c['n_merged']} merged "
        f"beyond {cfg.data.num_slots - 1} slots" for split, c in manifest.cleaned.items()))
    return manifest


def cluster_check(*, output: str, source: str | None, images: str | None, masks: str | None, nodes: int) -> None:
    """On a cluster of several nodes, the folders the preprocessing tasks read (``--source``, or
    ``--images`` and ``--masks``: the JSON is read here, on the driver) and write (``--output``:
    shards and rejected inputs) must be reachable from every node (:mod:`pipelines.cluster_paths`)."""
    from pipelines.cluster_paths import require_reachable

    require_reachable({"--source": source, "--images": images, "--masks": masks, "--output": output}, nodes)


def _url(fs, path: str) -> str:
    """A path of ``fs`` as Ray tasks can open it (absolute local path, or with the protocol)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols else f"{protocols[0]}://{path}"


def _remove_partial(fs, root: str, prefix: str) -> None:
    """Delete files a killed run left for this chunk, so a redo never duplicates rows."""
    fs.invalidate_cache()
    for path in fs.glob(posixpath.join(root, "*", f"{prefix}*")):
        fs.rm(path, recursive=True)


CLEANING_COLUMNS = ("n_small", "n_crowd", "n_merged")


def _cleaning_counts(fs, root: str, paths: list[str]) -> dict[str, int]:
    """Segments turned void while cleaning, summed over the rows of ``paths`` (three columns read)."""
    totals = dict.fromkeys(CLEANING_COLUMNS, 0)
    for rel in paths:
        with fs.open(posixpath.join(root, rel), "rb") as f:
            table = pq.read_table(f, columns=list(CLEANING_COLUMNS))
        for c in CLEANING_COLUMNS:
            totals[c] += int(pa.compute.sum(table[c]).as_py() or 0)
    return totals


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (URLs unchanged): the manifest's record of the source."""
    import os

    return path if path is None or "://" in path else os.path.abspath(path)


def _finalise(fs, root: str, manifest: Manifest, n_inputs: int) -> Manifest:
    fs.invalidate_cache()  # Ray workers wrote files this process's listing cache has not seen
    written: dict[str, int] = {}
    files: dict[str, list[str]] = {}
    sizes: dict[str, dict[str, int]] = {}
    quarantined = 0
    for marker in sorted(fs.glob(posixpath.join(root, PROGRESS, "chunk-*.json"))):
        with fs.open(marker, "r") as f:
            m = json.load(f)
        for s, n in m["written"].items():
            written[s] = written.get(s, 0) + n
        quarantined += m["quarantined"]
        sizes.update(m.get("files", {}))  # markers of an older run (resumed) have none: read below
    for split_dir in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(split_dir.rstrip("/"))
        if name.startswith("_") or name == ERRORS or not fs.isdir(split_dir):
            continue
        files[name] = sorted(posixpath.relpath(p, root) for p in fs.glob(posixpath.join(split_dir, "*.parquet")))
    with fs.open(posixpath.join(root, ERRORS, "dataset.parquet"), "rb") as f:
        quarantined += pq.read_table(f).num_rows
    files[ERRORS] = sorted(posixpath.relpath(p, root) for p in fs.glob(posixpath.join(root, ERRORS, "*.parquet")))
    manifest.inputs = n_inputs
    manifest.written = {s: n for s, n in written.items() if n}
    manifest.quarantined = quarantined
    manifest.files = files
    manifest.file_sizes = _file_sizes(fs, root, files, sizes)
    by_split = {s: sum(manifest.file_sizes[f]["rows"] for f in paths) for s, paths in files.items() if s != ERRORS}
    if {s: n for s, n in by_split.items() if n} != manifest.written:
        raise RuntimeError(f"rows in the files {by_split} differ from the chunks' counts {manifest.written}")
    manifest.cleaned = {split: _cleaning_counts(fs, root, paths) for split, paths in files.items() if split != ERRORS}
    manifest.complete = True
    if not manifest.reconciles():
        raise RuntimeError(f"counts do not reconcile: {n_inputs} inputs != {written} + {quarantined}")
    write_manifest(fs, root, manifest)
    return manifest


def _file_sizes(fs, root: str, files: dict[str, list[str]], known: dict[str, dict[str, int]]
                ) -> dict[str, dict[str, int]]:
    """``rows`` and ``bytes`` of every shard file of ``files`` (splits, not ``errors``): from the
    chunk markers, else (a chunk finished by an older ldmseg) from the footer and the listing."""
    out: dict[str, dict[str, int]] = {}
    for split, paths in files.items():
        if split == ERRORS:
            continue
        for rel in paths:
            if rel not in known:
                path = posixpath.join(root, rel)
                with fs.open(path, "rb") as f:
                    known[rel] = {"rows": int(pq.read_metadata(f).num_rows), "bytes": int(fs.size(path))}
            out[rel] = known[rel]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="COCO panoptic folder (images/, panoptic/, panoptic.json), local or s3://")
    parser.add_argument("--images", help="image folder (COCO layout, e.g. val2017/), instead of --source")
    parser.add_argument("--masks", help="panoptic PNG folder (e.g. annotations/panoptic_val2017/)")
    parser.add_argument("--annotations", help="panoptic JSON (e.g. annotations/panoptic_val2017.json)")
    parser.add_argument("--output", required=True, help="output folder, local or s3://bucket/prefix")
    parser.add_argument("--split", default="train", help="split name for these images (default: train)")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults; see conf/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output made with another config")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. preprocess.rows_per_file=128")


def check_inputs(args: argparse.Namespace) -> None:
    """The source and output of ``ldmseg preprocess``, checked before Ray starts."""
    from ldmseg import inputs

    if args.source:
        inputs.coco_folder("--source", args.source)
    else:
        fix = "pass COCO's panoptic files (e.g. --annotations annotations/panoptic_val2017.json)"
        inputs.folder("--images", args.images, fix)
        inputs.folder("--masks", args.masks, fix)
        inputs.file("--annotations", args.annotations, fix)
    inputs.output_folder("--output", args.output)


def run(args: argparse.Namespace) -> int:
    if not args.source and not (args.images and args.masks and args.annotations):
        print("ldmseg preprocess: give --source FOLDER, or all of --images, --masks and --annotations",
              file=sys.stderr)
        return 2
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    check_inputs(args)
    ray_compat.init_ray(args.address)
    manifest = run_preprocess(cfg, output=args.output, source=args.source, images=args.images,
                              masks=args.masks, annotations=args.annotations, split=args.split,
                              overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "inputs": manifest.inputs, "written": manifest.written,
                      "quarantined": manifest.quarantined, "config_hash": manifest.config_hash}))
    return 0
