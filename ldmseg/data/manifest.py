"""The ``_manifest.json`` of a preprocessed output and its resumable chunk markers.

Layout of an output folder (local or ``s3://``)::

    OUT/_manifest.json            schema version, config hash, source fingerprint, counts, files
                                  (with the rows and bytes of each shard file)
    OUT/<split>/chunk-00000-00000.parquet ...   shards, one folder per split
    OUT/errors/chunk-00000.parquet               quarantine: one row per rejected input + reason
    OUT/_progress/chunk-00000.json               written when a chunk is complete (resume)
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import fsspec

# The version of an output's row schema (:mod:`ldmseg.data.shards`), recorded in its manifest:
# 2: ``checksum`` hashes the source files as stored (1: the decoded image and id map)
# 3: ``min_segment_area`` counts pixels at the training resolution (2: at the source's)
# 4: slot maps stored raw in a compressed column (3: as PNG); no ``valid`` column (the valid
#    region is the top-left scaled_height × scaled_width rectangle)
SCHEMA_VERSION = 4

MANIFEST = "_manifest.json"
PROGRESS = "_progress"
ERRORS = "errors"


def open_fs(url: str, storage_options: dict | None = None):
    """``url`` (local path or ``s3://bucket/prefix``) → (fsspec filesystem, path inside it)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


@dataclass
class Manifest:
    schema_version: int
    config_hash: str
    source: str
    source_fingerprint: str
    inputs: int = 0
    written: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    files: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    source_paths: dict[str, str | None] = field(default_factory=dict)
    """The source as given to ``ldmseg preprocess`` (``source``, ``images``, ``masks``, ``annotations``;
    local paths made absolute), so that evaluation can score against the original ground truth."""
    cleaned: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per split, segments turned void while cleaning, summed over the rows: ``n_small`` (under
    ``data.min_segment_area`` px at the training resolution), ``n_crowd``, ``n_merged`` (beyond
    ``data.num_slots - 1`` segments)."""
    file_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per shard file of ``files`` (its path relative to the output, splits only): ``rows`` (from its
    Parquet footer) and ``bytes``, so readers size the input without opening or HEADing each file.
    Empty in manifests written before it existed (:func:`list_split_shards` then lists the folder)."""

    def reconciles(self) -> bool:
        return self.inputs == sum(self.written.values()) + self.quarantined


def read_manifest(fs, root: str) -> Manifest | None:
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        data = json.load(f)
    known = {f.name for f in fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known})  # fields of a newer ldmseg ignored


def write_json(fs, path: str, data: Any) -> None:
    """Write JSON through a temporary name, then move it in place (never half a file)."""
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    fs.mv(tmp, path)


def write_parquet_file(fs, path: str, table) -> None:
    """Write a pyarrow table to one Parquet file through a temporary name, then move it in place."""
    import pyarrow.parquet as pq

    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def write_manifest(fs, root: str, manifest: Manifest) -> None:
    write_json(fs, posixpath.join(root, MANIFEST), asdict(manifest))


DATA_KEYS = ("resolution", "num_slots", "min_segment_area", "resize_mode")
"""``data`` fields baked into the shards: training with other values would read wrong targets."""


def check_schema_version(manifest: Manifest, where: str) -> None:
    """Raise :class:`~ldmseg.config.ConfigError` if the shards were written in another schema
    version than :data:`SCHEMA_VERSION` (this code cannot read them)."""
    from ldmseg.config import ConfigError

    if manifest.schema_version != SCHEMA_VERSION:
        raise ConfigError(f"{where} holds shards of schema version {manifest.schema_version}; this ldmseg reads "
                          f"version {SCHEMA_VERSION}: re-run `ldmseg preprocess` (with --overwrite, or into a new "
                          "--output)")


def check_data_config(manifest: Manifest, data_cfg: Any, where: str) -> None:
    """Raise :class:`~ldmseg.config.ConfigError` if the shards are of another schema version
    (:func:`check_schema_version`) or ``data_cfg`` disagrees with their ``data`` section.

    Shards made with 32 slots read with ``data.num_slots=8`` would turn slots >= 8 void; other
    resolutions or area floors would train on targets the config does not describe.
    """
    from ldmseg.config import ConfigError

    check_schema_version(manifest, where)
    stored = manifest.config.get("data", {})
    diffs = [f"data.{k}={stored[k]!r} (this config: {getattr(data_cfg, k)!r})"
             for k in DATA_KEYS if k in stored and stored[k] != getattr(data_cfg, k)]
    if diffs:
        fix = " ".join(f"data.{k}={stored[k]}" for k in DATA_KEYS if k in stored and stored[k] != getattr(data_cfg, k))
        raise ConfigError(f"{where} was preprocessed with {', '.join(diffs)}; pass {fix}, or run "
                          "'ldmseg preprocess' again with this config into a new --output")


def data_fingerprint(fs, root: str) -> str:
    """Identity of a preprocessed output: its manifest's config hash, source fingerprint and counts
    (or, without a manifest, the names and sizes of its Parquet files). Training runs include it."""
    manifest = read_manifest(fs, root)
    if manifest is not None:
        blob = json.dumps([manifest.config_hash, manifest.source_fingerprint, manifest.written], sort_keys=True)
    else:
        found = fs.find(root, detail=True)  # sizes from the listing, not a request per file
        blob = json.dumps([[posixpath.relpath(p, root), found[p]["size"]] for p in sorted(found)
                           if p.endswith(".parquet")])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class ShardFile:
    """One Parquet file of a split (:func:`list_split_shards`)."""

    path: str
    """Full path within the output's filesystem."""
    bytes: int
    rows: int | None
    """From the manifest; ``None`` for outputs whose manifest does not record it."""


def list_split_files(fs, root: str, split: str) -> list[str]:
    """Parquet files of ``split`` in a preprocessed output, sorted (full paths within ``fs``)."""
    manifest = read_manifest(fs, root)
    if manifest is not None and split in manifest.files:
        return [posixpath.join(root, f) for f in manifest.files[split]]
    return [f.path for f in _listed(fs, root, split)]


def list_split_shards(fs, root: str, split: str, manifest: Manifest | None = None) -> list[ShardFile]:
    """The Parquet files of ``split`` with their sizes: from the manifest's ``file_sizes`` (no
    request per file), else from one listing of the split's folder (bytes only; an output written
    before the manifest recorded sizes, or without a manifest)."""
    manifest = manifest if manifest is not None else read_manifest(fs, root)
    if manifest is not None and split in manifest.files:
        rels = manifest.files[split]
        if all(r in manifest.file_sizes for r in rels):
            return [ShardFile(posixpath.join(root, r), int(manifest.file_sizes[r]["bytes"]),
                              int(manifest.file_sizes[r]["rows"])) for r in rels]
        listed = {f.path: f for f in _listed(fs, root, split)}
        paths = [posixpath.join(root, r) for r in rels]
        return [listed.get(p) or ShardFile(p, int(fs.size(p)), None) for p in paths]
    return _listed(fs, root, split)


def _listed(fs, root: str, split: str) -> list[ShardFile]:
    """The Parquet files in the split's folder, sorted, with their bytes (one listing)."""
    folder = posixpath.join(root, split)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"no split {split!r} under {root} (expected the folder {folder}); "
                                "run `ldmseg preprocess` first or pick another split")
    infos = fs.ls(folder, detail=True)
    return sorted((ShardFile(i["name"], int(i.get("size") or 0), None) for i in infos
                   if i["name"].endswith(".parquet")), key=lambda f: f.path)
