"""The ``_manifest.json`` of a preprocessed output and its resumable chunk markers.

Layout of an output folder (local or ``s3://``)::

    OUT/_manifest.json            schema version, config hash, source fingerprint, counts, files
    OUT/<split>/chunk-00000-00000.parquet ...   shards, one folder per split
    OUT/errors/chunk-00000.parquet               quarantine: one row per rejected input + reason
    OUT/_progress/chunk-00000.json               written when a chunk is complete (resume)
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

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

    def reconciles(self) -> bool:
        return self.inputs == sum(self.written.values()) + self.quarantined


def read_manifest(fs, root: str) -> Manifest | None:
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return Manifest(**json.load(f))


def write_json(fs, path: str, data: Any) -> None:
    """Write JSON through a temporary name, then move it in place (never half a file)."""
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    fs.mv(tmp, path)


def write_manifest(fs, root: str, manifest: Manifest) -> None:
    write_json(fs, posixpath.join(root, MANIFEST), asdict(manifest))


def list_split_files(fs, root: str, split: str) -> list[str]:
    """Parquet files of ``split`` in a preprocessed output, sorted (full paths within ``fs``)."""
    manifest = read_manifest(fs, root)
    if manifest is not None and split in manifest.files:
        return [posixpath.join(root, f) for f in manifest.files[split]]
    folder = posixpath.join(root, split)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"no split {split!r} under {root} (expected the folder {folder}); "
                                "run `ldmseg preprocess` first or pick another split")
    return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))
