"""Turn COCO panoptic data (local or s3://) into sharded, latent-ready Parquet with Ray Data.

The JSON is read once on the driver; images are decoded, validated, cleaned, remapped
(deterministically per image id) and resized/padded to the training resolution in parallel
Ray tasks of ``preprocess.rows_per_file`` images (:func:`task_size`), each written by its own task
with ``write_parquet`` (one file of that many rows), one folder per split. Each image is decoded once and its ids are checked and relabelled in one pass
(:func:`coco.read_dense_sample`). Tasks stage rejected inputs with their reason; they end in
``OUT/errors/``. ``OUT/_manifest.json`` records counts that reconcile (inputs = written +
quarantined; rows written are read back from the Parquet footers). Work proceeds in chunks; a
finished chunk is never redone, so a killed run resumes where it stopped and a re-run of a
finished output does nothing.

Examples::

    ldmseg preprocess --source data/coco-folder --output runs/shards --config conf/tiny.yaml
    ldmseg preprocess --images val2017 --masks annotations/panoptic_val2017 \\
        --annotations annotations/panoptic_val2017.json --output s3://bucket/shards --split val
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import posixpath
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ldmseg.config import Config, config_hash, load_config, to_dict
from ldmseg.data import coco, shards
from ldmseg.data.manifest import ERRORS, PROGRESS, Manifest, open_fs, read_manifest, write_json, write_manifest
from pipelines import ray_compat

OK = "ok"


def _log(msg: str) -> None:
    print(f"[preprocess] {msg}", file=sys.stderr, flush=True)


def assign_split(image_id: int, default: str, val_fraction: float) -> str:
    """Deterministic split by image id: a stable hash puts ``val_fraction`` of ids in ``val``."""
    if val_fraction <= 0:
        return default
    h = int.from_bytes(hashlib.sha256(str(int(image_id)).encode()).digest()[:8], "little")
    return "val" if (h / 2**64) < val_fraction else default


def task_size(n_images: int, rows_per_file: int, cpus: int) -> int:
    """Images per Ray task for ``n_images`` of one split in a chunk.

    Each task writes its good rows to its own Parquet files (map and write fused: the images
    never pass through the object store), so a task takes ``rows_per_file`` images and writes one
    full file. A chunk too small to give every CPU two such tasks is shared out evenly instead
    (smaller files, every CPU busy).
    """
    share = -(-n_images // max(1, 2 * cpus))
    return max(1, min(rows_per_file, share))


def process_batch(batch: pd.DataFrame, cfg_dict: dict) -> pa.Table:
    """Ray Data task: records (one per row, JSON in column ``record``) → shard rows or errors
    (:data:`shards.SCHEMA` plus ``error``: None for a good row, the reason for a rejected one)."""
    from ldmseg.config import from_dict

    records = [coco.PanopticRecord.from_dict(json.loads(r)) for r in batch["record"]]
    out, images = _encode_records(records, list(batch["split"]), from_dict(cfg_dict))
    rows = [row if row["error"] is None else {**_empty_row(), **row} for row in out]
    schema = shards.SCHEMA.append(pa.field("error", pa.string()))
    return _table(rows, schema, images, [i for i, row in enumerate(rows) if row["error"] is None])


def process_groups(batch: pa.Table, cfg_dict: dict, staging: str) -> pa.Table:
    """Ray Data task: groups of records (column ``records``: a JSON list each; ``split``) → the
    good shard rows (:data:`shards.SCHEMA`). Rejected inputs are written to
    ``staging/<split>-<first image id>.parquet`` (a local path or URL; :data:`shards.ERROR_SCHEMA`;
    the name is fixed per group, so a retried task overwrites its own file)."""
    from ldmseg.config import from_dict

    _keep_freed_memory()
    cfg = from_dict(cfg_dict)
    tables, rejected = [], []
    for group, split in zip(batch.column("records").to_pylist(), batch.column("split").to_pylist()):
        records = [coco.PanopticRecord(**r) for r in json.loads(group)]
        if not records:
            continue
        out, images = _encode_records(records, [split] * len(records), cfg)
        good = [{k: v for k, v in row.items() if k != "error"} for row in out if row["error"] is None]
        tables.append(_table(good, shards.SCHEMA, images, list(range(len(good)))))
        errors = [row for row in out if row["error"] is not None]
        if errors:
            rejected.append((split, int(records[0].image_id), errors))
    if rejected:
        fs, folder = open_fs(staging)
        fs.makedirs(folder, exist_ok=True)
        for split, first_id, errors in rejected:
            rows = [{"image_id": e["image_id"], "file_name": e["file_name"], "segments_file": e["segments_file"],
                     "split": e["split"], "reason": e["error"]} for e in errors]
            _write_table(fs, posixpath.join(folder, f"{split}-{first_id}.parquet"),
                         pa.Table.from_pylist(rows, schema=shards.ERROR_SCHEMA))
    return pa.concat_tables(tables) if tables else shards.SCHEMA.empty_table()


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Let this (worker) process's C allocator keep freed blocks of up to 64 MB for reuse.

    A task holds its images (R·R·3 bytes each, tens of MB) until it returns; glibc maps such
    blocks afresh and returns them to the system when freed, so every task faulted its pages
    in again (~200 page faults per image, 1-2 ms of system time measured). Freed memory is kept
    up to 128 MB at the top of the heap; larger blocks are mapped as before. glibc only.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _encode_records(records: list[coco.PanopticRecord], splits: list[str], cfg: Config
                    ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Decode, check and encode records → (one dict per record, in order; raw images).

    Each dict is a shard row with ``error`` None, or the input's ids and names with the reason
    in ``error``. Each image is decoded and checked once (:func:`coco.read_dense_sample`: the id
    check also yields the dense labels) and encoded from its labels
    (:func:`shards.encode_dense_sample`). With the ``raw`` image format the good rows' images are
    written straight into one (N_good, R, R, 3) buffer, in order (their ``image`` is None), which
    becomes the column without a copy; otherwise the second value is None.
    """
    res = int(cfg.data.resolution)
    raw = cfg.preprocess.image_format == "raw"
    images = np.zeros((len(records), res, res, 3), dtype=np.uint8) if raw else None
    out: list[dict[str, Any]] = []
    n_good = 0
    for rec, split in zip(records, splits):
        try:
            sample = coco.read_dense_sample(rec)
            row = shards.encode_dense_sample(sample, image_id=rec.image_id, cfg=cfg, split=split,
                                             file_name=rec.file_name, segments_file=rec.segments_file,
                                             image_out=images[n_good] if raw else None)
            out.append({**row, "error": None})
            n_good += 1
            continue
        except (coco.DataError, shards.SkipImage) as exc:
            reason = str(getattr(exc, "reason", None) or exc)
        except Exception as exc:  # an unexpected failure of one image must not stop the run
            reason = f"unexpected {type(exc).__name__}: {exc}"
        if raw:
            images[n_good] = 0  # may hold part of the rejected image
        out.append({"image_id": int(rec.image_id), "file_name": rec.file_name,
                    "segments_file": rec.segments_file, "split": split, "error": reason})
    return out, (images[:n_good] if raw else None)


def _table(rows: list[dict[str, Any]], schema: pa.Schema, images: np.ndarray | None,
           image_rows: list[int]) -> pa.Table:
    """Rows → a table of ``schema``; ``images[k]`` is the raw image of row ``image_rows[k]``
    (rows whose ``image`` is None); the other rows' images are empty."""
    if images is None or not image_rows:
        return pa.Table.from_pylist([{**r, "image": r["image"] or b""} for r in rows], schema=schema)
    size = int(np.prod(images.shape[1:]))
    if len(image_rows) * size >= 2**31:  # binary offsets are int32
        rows = list(rows)
        for k, i in enumerate(image_rows):
            rows[i] = {**rows[i], "image": images[k].tobytes()}
        return pa.Table.from_pylist(rows, schema=schema)
    lengths = np.zeros(len(rows), dtype=np.int64)
    lengths[image_rows] = size
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    data = pa.py_buffer(np.ascontiguousarray(images).reshape(-1))
    column = pa.Array.from_buffers(pa.binary(), len(rows), [None, pa.py_buffer(offsets), data])
    table = pa.Table.from_pylist([{**r, "image": b""} for r in rows], schema=schema)
    return table.set_column(schema.get_field_index("image"), schema.field("image"), column)


def _rows_written(fs, folder: str, prefix: str) -> int:
    """Rows in the Parquet files of one chunk in a split folder (read from the footers)."""
    fs.invalidate_cache()
    n = 0
    for path in fs.glob(posixpath.join(folder, f"{prefix}-*.parquet")):
        with fs.open(path, "rb") as f:
            n += pq.read_metadata(f).num_rows
    return n


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


def _empty_row() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in shards.SCHEMA:
        out[f.name] = b"" if pa.types.is_binary(f.type) else ("" if pa.types.is_string(f.type) else 0)
    return out


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
    """Preprocess a COCO panoptic source into Parquet shards under ``output``; returns the manifest."""
    t0 = time.time()
    dataset = coco.load_coco_panoptic(source, images=images, masks=masks, json_path=annotations)
    records = sorted(dataset.records, key=lambda r: r.image_id)
    problems = list(dataset.problems)
    _log(f"source: {len(records)} images listed, {len(problems)} dataset-level problems")

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
        _log(f"--overwrite: removing the previous output in {output}")
        fs.rm(root, recursive=True)
        existing = None
    if existing is not None and existing.complete:
        _log(f"up to date: {output} already holds this source with this config (nothing to do)")
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
    _write_table(fs, posixpath.join(root, ERRORS, "dataset.parquet"),
                 pa.Table.from_pylist(quarantine_rows, schema=shards.ERROR_SCHEMA))

    chunk_rows = max(1, cfg.preprocess.chunk_rows)
    chunks = [records[i:i + chunk_rows] for i in range(0, len(records), chunk_rows)]
    cfg_dict = to_dict(cfg)
    done_images = 0
    for k, chunk in enumerate(chunks):
        marker = posixpath.join(root, PROGRESS, f"chunk-{k:05d}.json")
        if fs.exists(marker):
            done_images += len(chunk)
            _log(f"chunk {k + 1}/{len(chunks)}: already done, skipped")
            continue
        tc = time.time()
        prefix = f"chunk-{k:05d}"
        _remove_partial(fs, root, prefix)
        by_split: dict[str, list[coco.PanopticRecord]] = {}
        for r in chunk:
            by_split.setdefault(assign_split(r.image_id, split, cfg.preprocess.val_fraction), []).append(r)
        staging = posixpath.join(root, PROGRESS, f"{prefix}-errors")
        counts: dict[str, int] = {}
        for s, recs in sorted(by_split.items()):
            # One item (one block) per task batch (vars: a shallow dict; asdict deep-copies).
            # Each task stages its rejects and returns its good rows only. Materialised before the
            # write: Ray Data would otherwise fuse the map into the writer's tasks, which take
            # rows_per_file *items* (batches) each, i.e. one task for the whole chunk.
            size = task_size(len(recs), cfg.preprocess.rows_per_file, ray_compat.cluster_cpus())
            items = [{"records": json.dumps([vars(r) for r in recs[i:i + size]]), "split": s}
                     for i in range(0, len(recs), size)]
            with _one_stage_scheduling():
                ds = ray_compat.dataset_from_items(items)
                ds = ray_compat.map_batches(ds, process_groups, batch_size=1, batch_format="pyarrow",
                                            fn_kwargs={"cfg_dict": cfg_dict, "staging": _url(fs, staging)})
                ray_compat.write_parquet(ds, posixpath.join(root, s), filesystem=_arrow_fs(fs),
                                         rows_per_file=cfg.preprocess.rows_per_file, filename_prefix=prefix)
            n = _rows_written(fs, posixpath.join(root, s), prefix)
            if n:
                counts[s] = n
        t_map = time.time() - tc
        err_rows = _collect_errors(fs, staging)
        if sum(counts.values()) + len(err_rows) != len(chunk):
            raise RuntimeError(f"chunk {k}: {len(chunk)} images but {counts} written + {len(err_rows)} quarantined")
        _write_table(fs, posixpath.join(root, ERRORS, f"{prefix}.parquet"),
                     pa.Table.from_pylist(err_rows, schema=shards.ERROR_SCHEMA))
        _rm(fs, staging)
        write_json(fs, marker, {"chunk": k, "images": len(chunk), "written": counts, "quarantined": len(err_rows)})
        done_images += len(chunk)
        rate = len(chunk) / max(time.time() - tc, 1e-9)
        _log(f"chunk {k + 1}/{len(chunks)}: {sum(counts.values())} written, {len(err_rows)} quarantined "
             f"({rate:.1f} images/s, {t_map:.1f} s decoding and writing; {done_images}/{len(records)} images done)")

    manifest = _finalise(fs, root, manifest, n_inputs=len(records) + len(problems))
    dt = time.time() - t0
    _log(f"done in {dt:.1f} s: {manifest.inputs} inputs = {sum(manifest.written.values())} written "
         f"{manifest.written} + {manifest.quarantined} quarantined; "
         f"{sum(len(v) for v in manifest.files.values())} shards; {len(records) / max(dt, 1e-9):.1f} images/s")
    _log("segments turned void while cleaning: " + "; ".join(
        f"{split}: {c['n_small']} under data.min_segment_area px, {c['n_crowd']} crowd, {c['n_merged']} merged "
        f"beyond {cfg.data.num_slots - 1} slots" for split, c in manifest.cleaned.items()))
    return manifest


@contextlib.contextmanager
def _one_stage_scheduling():
    """Ray Data without per-operator CPU reservation, for the decoding pass.

    By default Ray Data reserves a share of the CPUs for each operator; with this pass's single
    compute stage on few CPUs that left one CPU idle at the start (measured on 2 CPUs: one task
    at a time for the first ~1 s of each chunk, 4.1 s instead of 2.7 s for 240 images). The pass
    has nothing to reserve for, so reservation is off while its dataset is built and run, then
    restored (training in the same process keeps Ray Data's default). Ray Data API: belongs in
    ``pipelines/ray_compat.py``.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = getattr(ctx, "op_resource_reservation_enabled", None)
    if previous is None:  # another Ray version: nothing to change
        yield
        return
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = previous


def _url(fs, path: str) -> str:
    """A path of ``fs`` as Ray tasks can open it (absolute local path, or with the protocol)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols else f"{protocols[0]}://{path}"


def _arrow_fs(fs):
    """An fsspec filesystem as a pyarrow filesystem for Ray Data (local stays native)."""
    import pyarrow.fs as pafs

    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _write_table(fs, path: str, table: pa.Table) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


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
    quarantined = 0
    for marker in sorted(fs.glob(posixpath.join(root, PROGRESS, "chunk-*.json"))):
        with fs.open(marker, "r") as f:
            m = json.load(f)
        for s, n in m["written"].items():
            written[s] = written.get(s, 0) + n
        quarantined += m["quarantined"]
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
    manifest.cleaned = {split: _cleaning_counts(fs, root, paths) for split, paths in files.items() if split != ERRORS}
    manifest.complete = True
    if not manifest.reconciles():
        raise RuntimeError(f"counts do not reconcile: {n_inputs} inputs != {written} + {quarantined}")
    write_manifest(fs, root, manifest)
    return manifest


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
    cfg = load_config(args.config, args.overrides)
    check_inputs(args)
    ray_compat.init_ray(args.address)
    manifest = run_preprocess(cfg, output=args.output, source=args.source, images=args.images,
                              masks=args.masks, annotations=args.annotations, split=args.split,
                              overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "inputs": manifest.inputs, "written": manifest.written,
                      "quarantined": manifest.quarantined, "config_hash": manifest.config_hash}))
    return 0
