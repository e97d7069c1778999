"""The one writer of COCO panoptic folders (synthetic scenes, the shards' ground truth, predictions).

Layout written under ``out`` (a local path or an fsspec URL such as ``s3://bucket/prefix``)::

    out/panoptic/<file_name>   one PNG per annotation (id = R + 256·G + 256²·B, 0 = void)
    out/images/<file_name>     the images, when the writer is opened with ``images=True``
    out/panoptic.json          ``images``, ``annotations``, ``categories`` (and ``info``)

Typical use::

    writer = CocoPanopticWriter(out, categories)
    writer.add_image(image_id, "000000000001.jpg", height, width)
    writer.add_annotation(image_id, "000000000001.png", id_map, segments_info(id_map))
    writer.close()

Parallel jobs give each worker its own ``part``: its :meth:`~CocoPanopticWriter.close` writes
``out/panoptic.parts/<part>.json`` instead, and :func:`merge_parts` joins the parts into
``panoptic.json`` once every worker is done, streaming (one part in memory at a time), one entry
per image id. File names may hold ``/`` (``panoptic/street/0001.png``). JSON files are written
under a temporary name and moved in place, so a killed job never leaves half a file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath

import numpy as np
from PIL import Image

from ldmseg.data.ids import encode_panoptic_png
from ldmseg.data.manifest import open_fs

PARTS = "panoptic.parts"


class CocoPanopticWriter:
    """Writes one COCO panoptic folder (or one part of it, see the module docstring).

    Args:
        out: the folder, local or fsspec URL; created if missing.
        categories: the JSON's ``categories`` (not needed for a ``part``).
        info: the JSON's ``info`` (written with an empty ``licenses`` list), or None for neither.
        images: also write images (``add_image(..., image=...)``) into ``out/images``.
        part: write ``out/panoptic.parts/<part>.json`` at :meth:`close` instead of ``panoptic.json``.
        jpeg_quality: quality of images named ``*.jpg`` / ``*.jpeg`` (others are written as PNG).
    """

    def __init__(self, out: str | os.PathLike, categories: list[dict] | None = None, *, info: dict | None = None,
                 images: bool = False, part: str | None = None, jpeg_quality: int = 95,
                 storage_options: dict | None = None):
        self.out = os.fspath(out)
        self.fs, self.root = open_fs(self.out, storage_options)
        self.categories = list(categories or [])
        self.info, self.part, self.jpeg_quality = info, part, jpeg_quality
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.fs.makedirs(self._path("panoptic"), exist_ok=True)
        if images:
            self.fs.makedirs(self._path("images"), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def add_image(self, image_id: int, file_name: str, height: int, width: int,
                  image: np.ndarray | None = None) -> None:
        """List an image; with ``image`` ((H, W, 3) uint8 RGB) also write it to ``images/<file_name>``
        (JPEG for ``.jpg``/``.jpeg`` names, else PNG)."""
        if image is not None:
            buf = io.BytesIO()
            if file_name.lower().endswith((".jpg", ".jpeg")):
                Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=self.jpeg_quality)
            else:
                Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
            self.fs.pipe_file(self._path("images", file_name), buf.getvalue())
        self.images.append({"id": int(image_id), "file_name": file_name, "height": int(height), "width": int(width)})

    def add_annotation(self, image_id: int, file_name: str, id_map: np.ndarray, segments_info: list[dict]) -> None:
        """Write ``id_map`` ((H, W) int ids, 0 = void) to ``panoptic/<file_name>`` and list it with
        its ``segments_info`` (:func:`ldmseg.data.segments.segments_info` builds them)."""
        self.write_file(posixpath.join("panoptic", file_name), encode_panoptic_png(id_map))
        self.annotations.append({"image_id": int(image_id), "file_name": file_name, "segments_info": segments_info})

    def write_file(self, relative: str, data: bytes) -> None:
        """Write ``data`` to ``out/<relative>`` (parent folders made as needed)."""
        path = self._path(relative)
        if "/" in relative.strip("/"):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def close(self, categories: list[dict] | None = None) -> str:
        """Write the JSON (``panoptic.json``, or this part's file); returns its path.
        ``categories``: replace those given at construction (when known only at the end)."""
        if categories is not None:
            self.categories = list(categories)
        if self.part is not None:
            self.fs.makedirs(self._path(PARTS), exist_ok=True)
            path = self._path(PARTS, f"{self.part}.json")
            doc = {"images": self.images, "annotations": self.annotations}
        else:
            path = self._path("panoptic.json")
            doc = _document(self.images, self.annotations, self.categories, self.info)
        _put_json(self.fs, path, doc)
        return path

    def __enter__(self) -> "CocoPanopticWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def merge_parts(out: str | os.PathLike, categories: list[dict], *, info: dict | None = None,
                storage_options: dict | None = None, keep_parts: bool = False) -> tuple[str, int]:
    """Join the parts written by ``CocoPanopticWriter(out, part=...)`` into ``out/panoptic.json``;
    returns ``(its path, images listed)``.

    Parts are read in name order, one at a time (memory does not grow with the image count); an
    image id met again (a part written twice by a retried or resumed job) is listed once, from
    its first part. The parts are removed unless ``keep_parts`` (a resumable job keeps them as its
    record of what is done).
    """
    fs, root = open_fs(os.fspath(out), storage_options)
    folder = posixpath.join(root, PARTS)
    paths = sorted(p for p in fs.glob(posixpath.join(folder, "*.json")))
    if not paths:
        raise FileNotFoundError(f"{out} has no {PARTS}/*.json to merge; write them with "
                                "CocoPanopticWriter(out, part=NAME) first")
    path = posixpath.join(root, "panoptic.json")
    tmp = path + ".tmp"
    listed = 0
    with fs.open(tmp, "w") as f:
        head = {} if info is None else {"info": info, "licenses": []}
        f.write(json.dumps(head)[:-1] + (", " if head else ""))
        for key, id_key in (("images", "id"), ("annotations", "image_id")):
            f.write(f'"{key}": [')
            seen: set[int] = set()
            for p in paths:
                for entry in json.loads(fs.cat_file(p))[key]:
                    if entry[id_key] in seen:
                        continue
                    f.write((", " if seen else "") + json.dumps(entry))
                    seen.add(entry[id_key])
            f.write("], ")
            listed = len(seen)
        f.write(f'"categories": {json.dumps(categories)}}}')
    fs.mv(tmp, path)
    if not keep_parts:
        fs.rm(folder, recursive=True)
    return path, listed


def _put_json(fs, path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    fs.pipe_file(tmp, json.dumps(doc).encode())
    fs.mv(tmp, path)


def _document(images: list[dict], annotations: list[dict], categories: list[dict], info: dict | None) -> dict:
    head = {} if info is None else {"info": info, "licenses": []}
    return {**head, "images": images, "annotations": annotations, "categories": categories}
