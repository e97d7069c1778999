"""What ``ldmseg segment`` has to do: the input images, their output names and ids, and what is done.

No Ray here: the driver plans before it starts Ray, so bad arguments fail at once.

Input (``--input``): a local folder or an ``s3://`` prefix, searched recursively for image suffixes
(:data:`ldmseg.data.image_io.IMAGE_EXTENSIONS`, any letter case); or a text file listing image
paths or URIs, one per line (``#`` comments and blank lines skipped; one filesystem per list); or
the Parquet shards of ``ldmseg preprocess`` (a folder with ``_manifest.json``): every row of every
split, segmented from the shard's image at the training resolution and restored to the source size.

Names: an image's output name is its path relative to the input root without the suffix
(``street/0001.jpg`` → ``panoptic/street/0001.png``), so two folders holding the same file name
keep apart; when two images of one folder differ only by suffix (``a.jpg``, ``a.png``) both keep
their suffix in the name (``a_jpg``, ``a_png``). Image ids: COCO names its files by image id
(``000000000139.jpg`` → 139), so an all-digit file stem is the id when no other input has the same
stem; any other image gets a stable 53-bit hash of its name. Ids and names depend only on the set
of input paths. A shard row is named ``<split>/<source file stem>`` and keeps its COCO image id.

Done: every image listed in a JSON part (``panoptic.parts/*.json``) or quarantined
(``errors/*.jsonl``) by an earlier run into the same output; ``--overwrite`` forgets both.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass

from ldmseg.data.coco_writer import PARTS
from ldmseg.data.image_io import is_image_name
from ldmseg.data.manifest import open_fs
from ldmseg.inputs import InputError
from ldmseg.logs import get_logger

log = get_logger("segment")

ERRORS = "errors"


@dataclass(frozen=True)
class ImageRef:
    """One input image: ``uri`` as given to the readers, ``name`` (output stem, ``/``-separated,
    no suffix), ``image_id`` (the COCO id written to the JSON)."""

    uri: str
    name: str
    image_id: int


@dataclass
class Plan:
    """The found images, split into those to segment and those already done."""

    namer: Namer | None
    found: list[ImageRef]
    todo: list[ImageRef]
    done_segmented: int
    done_quarantined: int
    shard_files: list[str] | None = None
    """For Parquet shards input: their files (URIs); the refs' ``uri`` is the row's source file name."""


def _uri(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_images(source: str, storage_options: dict | None = None) -> tuple[list[str], str]:
    """``(uris, root)``: the images of a folder / prefix (recursive, sorted), or of a list file; the
    root is what names are taken relative to."""
    fs, path = open_fs(source, storage_options)
    if not fs.exists(path):
        raise InputError(f"--input {source}: no such folder, prefix or list file; pass a folder of images, "
                         "an s3:// prefix, or a text file listing image paths")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if is_image_name(p))
        return [_uri(fs, p) for p in found], _uri(fs, path)
    if is_image_name(path):
        raise InputError(f"--input {source}: is an image, not a folder or a list; pass its folder, or a text "
                         "file listing the images to segment")
    try:
        lines = fs.cat_file(path).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--input {source}: is neither a folder nor a text list of image paths (not UTF-8 "
                         "text)") from None
    uris = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not uris:
        raise InputError(f"--input {source}: the list holds no image path; write one path or URI per line")
    schemes = {u.split("://", 1)[0] if "://" in u else "file" for u in uris}
    if len(schemes) > 1:
        raise InputError(f"--input {source}: the list mixes filesystems ({', '.join(sorted(schemes))}); "
                         "split it into one list per filesystem")
    uris = sorted(dict.fromkeys(uris))
    bare = [u.split("://", 1)[-1] for u in uris]
    root = posixpath.dirname(bare[0]) if len(bare) == 1 else posixpath.commonpath(bare)
    scheme = schemes.pop()
    return uris, root if scheme == "file" else f"{scheme}://{root}"


def stable_id(name: str) -> int:
    """A 53-bit id from a name (exact in JSON readers that use doubles)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 11


class Namer:
    """Output names and image ids of a set of input images (see the module docstring).

    Built on the driver from every input URI; :meth:`ref` then names one path in a Ray task (it
    keeps only the root and the few names that clash, so it is small to ship).
    """

    def __init__(self, uris: list[str], root: str):
        self.scheme = root.split("://", 1)[0] + "://" if "://" in root else ""
        self.root = root.split("://", 1)[-1].rstrip("/")
        stems = [self._stem(u) for u in uris]
        self.clashing_stems = {s for s, n in Counter(stems).items() if n > 1}
        leaves = Counter(posixpath.basename(self._name(u)) for u in uris)
        self.repeated_leaves = {leaf for leaf, n in leaves.items() if n > 1 and leaf.isdigit()}

    def _rel(self, path: str) -> str:
        bare = path.split("://", 1)[-1]
        return posixpath.relpath(bare, self.root) if self.root else bare.lstrip("/")

    def _stem(self, path: str) -> str:
        return posixpath.splitext(self._rel(path))[0]

    def _name(self, path: str) -> str:
        rel = self._rel(path)
        stem, suffix = posixpath.splitext(rel)
        return stem + "_" + suffix.lstrip(".").lower() if stem in self.clashing_stems else stem

    def ref(self, path: str) -> ImageRef:
        """The :class:`ImageRef` of ``path`` (a URI, or a path as the filesystem names it)."""
        name = self._name(path)
        leaf = posixpath.basename(name)
        image_id = int(leaf) if leaf.isdigit() and leaf not in self.repeated_leaves else stable_id(name)
        return ImageRef(self.scheme + path.split("://", 1)[-1], name, image_id)


def name_images(uris: list[str], root: str) -> tuple[Namer, list[ImageRef]]:
    """The :class:`Namer` of ``uris`` and their refs; fails if two images would get one id."""
    namer = Namer(uris, root)
    refs = [namer.ref(u) for u in uris]
    ids = Counter(r.image_id for r in refs)
    repeated = [r for r in refs if ids[r.image_id] > 1]
    if repeated:  # a stem like "12" beside a hash that happens to be 12: practically never
        raise InputError(f"--input {root}: images {repeated[0].uri} and {repeated[1].uri} get the same image id; "
                         "rename one of them")
    return namer, refs


def done_names(out: str, storage_options: dict | None = None) -> tuple[set[str], set[str]]:
    """``(segmented, quarantined)``: names recorded in ``out``'s JSON parts and error lines. A part
    or line left unreadable by a killed job is ignored (its images are done again)."""
    fs, root = open_fs(out, storage_options)
    segmented: set[str] = set()
    quarantined: set[str] = set()
    for path in fs.glob(posixpath.join(root, PARTS, "*.json")):
        try:
            annotations = json.loads(fs.cat_file(path))["annotations"]
        except (ValueError, KeyError):
            log.warning(f"{path}: unreadable part (a job killed while writing it?); its images are redone")
            continue
        segmented.update(posixpath.splitext(ann["file_name"])[0] for ann in annotations)
    for path in fs.glob(posixpath.join(root, ERRORS, "*.jsonl")):
        for line in fs.cat_file(path).decode(errors="replace").splitlines():
            try:
                quarantined.add(json.loads(line)["name"])
            except (ValueError, KeyError):
                continue
    return segmented, quarantined - segmented


def shard_rows(source: str, storage_options: dict | None = None) -> tuple[list[str], list[ImageRef]] | None:
    """For the Parquet shards of ``ldmseg preprocess`` at ``source``: ``(files, refs)``, every row of
    every split (only the ``image_id`` and ``file_name`` columns are read); None for anything else."""
    import pyarrow.parquet as pq

    from ldmseg.data.manifest import check_schema_version, read_manifest

    fs, root = open_fs(source, storage_options)
    manifest = read_manifest(fs, root) if fs.isdir(root) else None
    if manifest is None:
        return None
    check_schema_version(manifest, f"--input {source}")
    files, refs = [], []
    for split in sorted(manifest.files):
        for f in manifest.files[split]:
            path = posixpath.join(root, f)
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=["image_id", "file_name"])
            files.append(_uri(fs, path))
            refs += [ImageRef(file_name, f"{split}/{posixpath.splitext(posixpath.basename(file_name))[0]}", int(i))
                     for i, file_name in zip(table["image_id"].to_pylist(), table["file_name"].to_pylist())]
    if not refs:
        raise InputError(f"--input {source}: the shards hold no rows; run 'ldmseg preprocess' again")
    return files, refs


def plan(source: str, out: str, *, overwrite: bool = False, storage_options: dict | None = None) -> Plan:
    """List ``source``, name its images, and leave out those ``out`` already holds (unless ``overwrite``)."""
    shards = shard_rows(source, storage_options)
    namer, files = None, None
    if shards is None:
        uris, root = list_images(source, storage_options)
        namer, refs = name_images(uris, root)
    else:
        files, refs = shards
    if overwrite:
        clear_records(out, storage_options)
        return Plan(namer, refs, refs, 0, 0, files)
    segmented, quarantined = done_names(out, storage_options)
    todo = [r for r in refs if r.name not in segmented and r.name not in quarantined]
    names = {r.name for r in refs}
    return Plan(namer, refs, todo, len(segmented & names), len(quarantined & names), files)


def clear_records(out: str, storage_options: dict | None = None) -> None:
    """Forget earlier work in ``out`` (its JSON parts, error lines and merged JSON); PNGs are overwritten."""
    fs, root = open_fs(out, storage_options)
    for folder in (PARTS, ERRORS):
        path = posixpath.join(root, folder)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    for name in ("panoptic.json", "_summary.json"):
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path)
