"""The work of one preprocessing task (a Ray Data task of :mod:`pipelines.preprocess`): decode,
check and encode a group of COCO panoptic records into shard rows (:mod:`ldmseg.data.shards`).

Good rows are returned (Ray Data writes them); rejected inputs are staged with their reason.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

from ldmseg.config import Config, from_dict
from ldmseg.data import coco, shards
from ldmseg.data.manifest import open_fs, write_parquet_file


def process_groups(batch: pa.Table, cfg_dict: dict, staging: str) -> pa.Table:
    """Ray Data task: groups of records (column ``records``: a JSON list each; ``split``) → the
    good shard rows (:data:`shards.SCHEMA`). Rejected inputs are written to
    ``staging/<split>-<first image id>.parquet`` (a local path or URL; :data:`shards.ERROR_SCHEMA`;
    the name is fixed per group, so a retried task overwrites its own file)."""
    _keep_freed_memory()
    cfg = from_dict(cfg_dict)
    tables, rejected = [], []
    for group, split in zip(batch.column("records").to_pylist(), batch.column("split").to_pylist()):
        records = [coco.PanopticRecord(**r) for r in json.loads(group)]
        if not records:
            continue
        out, images = _encode_records(records, split, cfg)
        good = [{k: v for k, v in row.items() if k != "error"} for row in out if row["error"] is None]
        tables.append(_table(good, images))
        errors = [row for row in out if row["error"] is not None]
        if errors:
            rejected.append((split, int(records[0].image_id), errors))
    if rejected:
        fs, folder = open_fs(staging)
        fs.makedirs(folder, exist_ok=True)
        for split, first_id, errors in rejected:
            rows = [{"image_id": e["image_id"], "file_name": e["file_name"], "segments_file": e["segments_file"],
                     "split": e["split"], "reason": e["error"]} for e in errors]
            write_parquet_file(fs, posixpath.join(folder, f"{split}-{first_id}.parquet"),
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


def _encode_records(records: list[coco.PanopticRecord], split: str, cfg: Config
                    ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Decode, check and encode the records of ``split`` → (one dict per record, in order; raw images).

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
    for rec in records:
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


def _table(rows: list[dict[str, Any]], images: np.ndarray | None) -> pa.Table:
    """Good rows → a table of :data:`shards.SCHEMA`; with ``images`` ((N, R, R, 3) uint8, one per
    row, in order: the rows' ``image`` is None) the image column is built on their buffer, no copy."""
    schema = shards.SCHEMA
    if images is None or not rows:
        return pa.Table.from_pylist(rows, schema=schema)
    size = int(np.prod(images.shape[1:]))
    if len(rows) * size >= 2**31:  # binary offsets are int32
        return pa.Table.from_pylist([{**r, "image": im.tobytes()} for r, im in zip(rows, images)], schema=schema)
    offsets = np.arange(len(rows) + 1, dtype=np.int64) * size
    data = pa.py_buffer(np.ascontiguousarray(images).reshape(-1))
    column = pa.Array.from_buffers(pa.binary(), len(rows), [None, pa.py_buffer(offsets.astype(np.int32)), data])
    table = pa.Table.from_pylist([{**r, "image": b""} for r in rows], schema=schema)
    return table.set_column(schema.get_field_index("image"), schema.field("image"), column)
