"""Turn COCO panoptic data (local or s3://) into sharded, latent-ready Parquet with Ray Data.

The JSON is read once on the driver; images are decoded, validated, cleaned, remapped
(deterministically per image id) and resized/padded to the training resolution in parallel
Ray tasks, then written with ``write_parquet``, one folder per split. Rejected inputs go to
``OUT/errors/`` with their reason; ``OUT/_manifest.json`` records counts that reconcile
(inputs = written + quarantined). Work proceeds in chunks; a finished chunk is never redone,
so a killed run resumes where it stopped and a re-run of a finished output does nothing.

Examples::

    ldmseg preprocess --source data/coco-folder --output runs/shards --config conf/tiny.yaml
    ldmseg preprocess --images val2017 --masks annotations/panoptic_val2017 \\
        --annotations annotations/panoptic_val2017.json --output s3://bucket/shards --split val
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import sys
import time
from dataclasses import asdict
from typing import Any

import pandas as pd
import pyarrow as pa
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


def process_batch(batch: pd.DataFrame, cfg_dict: dict) -> pa.Table:
    """Ray Data task: records (one per row, JSON in column ``record``) → shard rows or errors."""
    from ldmseg.config import from_dict

    cfg = from_dict(cfg_dict)
    rows: list[dict[str, Any]] = []
    for rec_json, split in zip(batch["record"], batch["split"]):
        rec = coco.PanopticRecord.from_dict(json.loads(rec_json))
        base = {"image_id": int(rec.image_id), "file_name": rec.file_name,
                "segments_file": rec.segments_file, "split": split}
        try:
            sample = coco.read_sample(rec)
            row = shards.encode_sample(sample.image, sample.id_map, sample.segments_info,
                                       image_id=rec.image_id, cfg=cfg, split=split,
                                       file_name=rec.file_name, segments_file=rec.segments_file)
            row["error"] = None
        except (coco.DataError, shards.SkipImage) as exc:
            row = {**_empty_row(), **base, "error": str(getattr(exc, "reason", None) or exc)}
        except Exception as exc:  # an unexpected failure of one image must not stop the run
            row = {**_empty_row(), **base, "error": f"unexpected {type(exc).__name__}: {exc}"}
        rows.append(row)
    schema = shards.SCHEMA.append(pa.field("error", pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)


def _empty_row() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in shards.SCHEMA:
        out[f.name] = b"" if pa.types.is_binary(f.type) else ("" if pa.types.is_string(f.type) else 0)
    return out


def _select(batch: pa.Table, split: str) -> pa.Table:
    """Keep the good rows of ``split`` (without the ``error`` column)."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.is_null(batch["error"]), pc.equal(batch["split"], split))
    return batch.filter(mask).drop_columns(["error"])


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
        items = [{"record": json.dumps(r.to_dict()),
                  "split": assign_split(r.image_id, split, cfg.preprocess.val_fraction)} for r in chunk]
        ds = ray_compat.dataset_from_items(items)
        ds = ray_compat.map_batches(ds, process_batch, batch_size=cfg.preprocess.batch_size,
                                    fn_kwargs={"cfg_dict": cfg_dict}, batch_format="pandas")
        ds = ds.materialize()  # the heavy map runs once; the light passes below reuse its blocks
        t_map = time.time() - tc
        light = ds.select_columns(["image_id", "file_name", "segments_file", "split", "error"]).take_all()
        err_rows = [{"image_id": e["image_id"], "file_name": e["file_name"], "segments_file": e["segments_file"],
                     "split": e["split"], "reason": e["error"]} for e in light if e["error"] is not None]
        counts: dict[str, int] = {}
        for e in light:
            if e["error"] is None:
                counts[e["split"]] = counts.get(e["split"], 0) + 1
        for s, n in sorted(counts.items()):
            part = ray_compat.map_batches(ds, _select, batch_size=None, fn_kwargs={"split": s},
                                          batch_format="pyarrow")
            ray_compat.write_parquet(part, posixpath.join(root, s), filesystem=_arrow_fs(fs),
                                     rows_per_file=cfg.preprocess.rows_per_file, filename_prefix=prefix)
        _write_table(fs, posixpath.join(root, ERRORS, f"{prefix}.parquet"),
                     pa.Table.from_pylist(err_rows, schema=shards.ERROR_SCHEMA))
        write_json(fs, marker, {"chunk": k, "images": len(chunk), "written": counts, "quarantined": len(err_rows)})
        done_images += len(chunk)
        rate = len(chunk) / max(time.time() - tc, 1e-9)
        _log(f"chunk {k + 1}/{len(chunks)}: {sum(counts.values())} written, {len(err_rows)} quarantined "
             f"({rate:.1f} images/s, {t_map:.1f} s decoding; {done_images}/{len(records)} images done)")

    manifest = _finalise(fs, root, manifest, n_inputs=len(records) + len(problems))
    dt = time.time() - t0
    _log(f"done in {dt:.1f} s: {manifest.inputs} inputs = {sum(manifest.written.values())} written "
         f"{manifest.written} + {manifest.quarantined} quarantined; "
         f"{sum(len(v) for v in manifest.files.values())} shards; {len(records) / max(dt, 1e-9):.1f} images/s")
    return manifest


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
        fs.rm(path)


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


def run(args: argparse.Namespace) -> int:
    if not args.source and not (args.images and args.masks and args.annotations):
        print("ldmseg preprocess: give --source FOLDER, or all of --images, --masks and --annotations",
              file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    ray_compat.init_ray(args.address)
    manifest = run_preprocess(cfg, output=args.output, source=args.source, images=args.images,
                              masks=args.masks, annotations=args.annotations, split=args.split,
                              overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "inputs": manifest.inputs, "written": manifest.written,
                      "quarantined": manifest.quarantined, "config_hash": manifest.config_hash}))
    return 0
