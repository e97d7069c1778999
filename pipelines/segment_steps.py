"""The three steps of ``ldmseg segment`` after the read, as Ray Data batch functions.

Rows start as ``uri``, ``name`` and ``image_id`` (the plan); every step keeps them with ``ok``,
``reason`` and ``message``, so a bad image travels to the write step as a row with ``ok=False``
and is quarantined there (output order is not kept: ids travel with the rows).

1. :func:`decode_step` (CPU tasks; :func:`shard_decode_step` for Parquet shards): read the bytes (a file that cannot be read is a reason, not a
   failed block: Ray's file readers fail the whole block), decode, apply EXIF orientation, check
   the pixel cap, resize and pad to the model's resolution → ``image_r`` (B, R, R, 3) uint8 and
   the geometry columns.
2. :class:`SegmentModel` (an actor pool): the model loaded once per actor on the device Ray
   assigned; → ``id_map`` (raw uint32 bytes at the source size, with ``height`` and ``width``),
   ``segments`` (JSON: score and, with several samples, stability per segment id) and
   ``uncertainty`` (raw uint8 bytes, disagreement × 255, or empty).
3. :func:`write_step` (CPU tasks): the panoptic PNGs, overlays and uncertainty PNGs, one JSON part
   per batch (``panoptic.parts/``) and one error file per batch (``errors/``); → one small row
   per image (``name``, ``status``, ``reason``) for the driver's counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Any

import numpy as np

from ldmseg.config import Config
from ldmseg.data.image_io import ImageDecodeError, decode_image
from ldmseg.data.resize import ResizeInfo
from ldmseg.logs import get_logger

log = get_logger("segment")

CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]
GEOMETRY = ("height", "width", "scaled_h", "scaled_w")
KEPT = ("name", "image_id", "uri", "ok", "reason", "message", "height", "width")


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The bytes of ``uri``; :class:`ImageDecodeError` ``unreadable`` if it cannot be read."""
    from ldmseg.data.manifest import open_fs

    try:
        fs, path = open_fs(uri, storage_options)
        return fs.cat_file(path)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError("unreadable", f"{uri}: cannot be read ({exc}); check that it exists and "
                                             "is readable") from None


def decode_step(batch: dict[str, np.ndarray], *, cfg: Config, max_pixels: int, keep_bytes: bool,
                storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Plan rows (``uri``, ``name``, ``image_id``) → model inputs, a reason for every image that is not one."""
    from ldmseg.segmenter import prepare_image

    res = cfg.data.resolution
    n = len(batch["uri"])
    out: dict[str, Any] = {k: [] for k in ("ok", "reason", "message", *GEOMETRY)}
    images = np.zeros((n, res, res, 3), dtype=np.uint8)
    kept = []
    for i, uri in enumerate(batch["uri"]):
        geometry, reason, message, data = (0, 0, 0, 0), "", "", b""
        try:
            data = read_bytes(str(uri), storage_options)
            image = decode_image(data, str(uri), max_pixels)
            images[i], info = prepare_image(image, cfg)
            geometry = (info.orig_h, info.orig_w, info.scaled_h, info.scaled_w)
        except ImageDecodeError as exc:
            reason, message = exc.reason, str(exc)
        out["ok"].append(not reason)
        out["reason"].append(reason)
        out["message"].append(message)
        for key, value in zip(GEOMETRY, geometry):
            out[key].append(value)
        kept.append(data if keep_bytes and not reason else b"")
    cols = {k: np.asarray(v) for k, v in out.items()}
    cols.update(name=batch["name"], image_id=np.asarray(batch["image_id"], dtype=np.int64), uri=batch["uri"],
                image_r=images, bytes=np.asarray(kept + [None], dtype=object)[:-1])
    return cols


SHARD_COLUMNS = ["image_id", "file_name", "height", "width", "resolution", "scaled_height", "scaled_width",
                 "image", "image_format"]


def shard_decode_step(batch: dict[str, np.ndarray], *, cfg: Config, todo: dict[int, str],
                      keep_bytes: bool) -> dict[str, np.ndarray]:
    """Rows of ``ldmseg preprocess`` shards (:data:`SHARD_COLUMNS`) → the columns of
    :func:`decode_step`, for the rows whose image id is in ``todo`` (id → output name) only. The
    image is the shard's, already at the training resolution; ``bytes`` (for overlays) is it
    restored to the source size, as PNG."""
    from PIL import Image

    from ldmseg.data.shards import decode_image as decode_shard_image

    res = cfg.data.resolution
    rows = [i for i, image_id in enumerate(batch["image_id"]) if int(image_id) in todo]
    out: dict[str, Any] = {k: [] for k in ("ok", "reason", "message", "bytes", "image_r", *GEOMETRY)}
    for i in rows:
        uri = str(batch["file_name"][i])
        height, width = int(batch["height"][i]), int(batch["width"][i])
        scaled_h, scaled_w = int(batch["scaled_height"][i]), int(batch["scaled_width"][i])
        image, reason, message, data = np.zeros((res, res, 3), dtype=np.uint8), "", "", b""
        try:
            if int(batch["resolution"][i]) != res:
                raise ValueError(f"a row at resolution {batch['resolution'][i]}, not the model's {res}")
            image = decode_shard_image(bytes(batch["image"][i]), str(batch["image_format"][i]), res)
            if keep_bytes:
                source = Image.fromarray(image[:scaled_h, :scaled_w]).resize((width, height), Image.BILINEAR)
                buf = io.BytesIO()
                source.save(buf, format="PNG")
                data = buf.getvalue()
        except (OSError, ValueError) as exc:
            reason, message = "corrupt", f"{uri} (image id {int(batch['image_id'][i])}): shard row unusable ({exc})"
        for key, value in (("ok", not reason), ("reason", reason), ("message", message), ("bytes", data),
                           ("image_r", image), ("height", height), ("width", width), ("scaled_h", scaled_h),
                           ("scaled_w", scaled_w)):
            out[key].append(value)
    cols = {k: np.asarray(v) for k, v in out.items() if k not in ("bytes", "image_r")}
    ids = [int(batch["image_id"][i]) for i in rows]
    cols.update(name=np.asarray([todo[i] for i in ids], dtype=object), image_id=np.asarray(ids, dtype=np.int64),
                uri=np.asarray([str(batch["file_name"][i]) for i in rows], dtype=object),
                image_r=np.stack(out["image_r"]) if rows else np.zeros((0, res, res, 3), dtype=np.uint8),
                bytes=np.asarray(out["bytes"] + [None], dtype=object)[:-1])
    return cols


class SegmentModel:
    """The model step: one :class:`~ldmseg.segmenter.Segmenter` per actor, loaded in ``__init__``."""

    def __init__(self, model: str, sampling: dict, seed: int, tracking_uri: str | None = None):
        import tempfile

        import torch

        from ldmseg.config import SamplingConfig
        from ldmseg.logs import setup_logging
        from ldmseg.segmenter import Segmenter
        from ldmseg.typed import build
        from pipelines.tracking import resolve_model
        from pipelines.ray_compat import assigned_device, worker_threads

        setup_logging()
        torch.set_num_threads(worker_threads())
        self._tmp = tempfile.TemporaryDirectory(prefix="ldmseg-segment-model-")
        model_dir = resolve_model(model, __import__("pathlib").Path(self._tmp.name), tracking_uri)
        self.segmenter = Segmenter.from_pretrained(model_dir, device=assigned_device())
        self.device = device_label()
        log.info(f"model actor on {self.device} (torch device {self.segmenter.device})")
        self.sampling = build(SamplingConfig, sampling)
        self.seed = int(seed)

    def _segment(self, batch: dict[str, np.ndarray], rows: list[int]) -> list:
        infos = [ResizeInfo(int(batch["height"][i]), int(batch["width"][i]), int(batch["scaled_h"][i]),
                            int(batch["scaled_w"][i]), self.segmenter.cfg.data.resolution,
                            self.segmenter.cfg.data.resize_mode) for i in rows]
        return self.segmenter.segment_prepared([batch["image_r"][i] for i in rows], infos,
                                               seeds=[self.seed] * len(rows), sampling=self.sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["name"])
        rows = [i for i in range(n) if batch["ok"][i]]
        results: dict[int, Any] = {}
        try:
            results = dict(zip(rows, self._segment(batch, rows)))
        except Exception:  # noqa: BLE001 - find the image that fails, keep the others
            for i in rows:
                try:
                    results[i] = self._segment(batch, [i])[0]
                except Exception as exc:  # noqa: BLE001 - quarantined with its reason, the job goes on
                    batch["ok"][i], batch["reason"][i] = False, "model_error"
                    batch["message"][i] = f"{batch['uri'][i]}: the model failed on this image ({exc!r})"
        id_maps, segments, uncertainty = [b""] * n, [""] * n, [b""] * n
        for i, r in results.items():
            id_maps[i] = np.ascontiguousarray(r.id_map, dtype=np.uint32).tobytes()
            segments[i] = json.dumps({str(s["id"]): {k: s[k] for k in ("score", "stability") if k in s}
                                      for s in r.segments})
            if r.uncertainty is not None:
                uncertainty[i] = np.round(r.uncertainty * 255).astype(np.uint8).tobytes()
        out = {k: batch[k] for k in KEPT + ("bytes",)}
        out.update(id_map=np.asarray(id_maps, dtype=object), segments=np.asarray(segments, dtype=object),
                   uncertainty=np.asarray(uncertainty, dtype=object), device=np.asarray([self.device] * n, dtype=object))
        return out


def device_label() -> str:
    """Where this Ray worker runs its model: ``GPU 1`` (the GPU ids Ray assigned it) or ``cpu``."""
    import ray

    ids = ray.get_gpu_ids()
    return f"GPU {','.join(str(g) for g in ids)}" if ids else "cpu"


def part_name(names: list[str]) -> str:
    """A part's file stem: a hash of its image names, so a retried batch rewrites its own part."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:20]


def write_step(batch: dict[str, np.ndarray], *, out: str, overlays: bool, alpha: float, quality: int,
               max_pixels: int, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Write one batch's outputs (module docstring); → ``name``, ``status``, ``reason`` per image."""
    from PIL import Image

    from ldmseg.data.coco_writer import CocoPanopticWriter
    from ldmseg.data.segments import segments_info
    from ldmseg.overlay import blend
    from pipelines.segment_plan import ERRORS

    names = [str(n) for n in batch["name"]]
    part = part_name(names)
    writer = CocoPanopticWriter(out, part=part, storage_options=storage_options)
    errors, status = [], []
    for i, name in enumerate(names):
        if not batch["ok"][i]:
            errors.append({"uri": str(batch["uri"][i]), "name": name, "reason": str(batch["reason"][i]),
                           "message": str(batch["message"][i])})
            status.append("quarantined")
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        id_map = np.frombuffer(batch["id_map"][i], dtype=np.uint32).reshape(h, w).astype(np.int64)
        extra = json.loads(batch["segments"][i])
        info = [{**s, **extra.get(str(s["id"]), {})} for s in segments_info(id_map)]
        source = posixpath.basename(str(batch["uri"][i]))
        writer.add_image(int(batch["image_id"][i]), posixpath.join(posixpath.dirname(name), source), h, w)
        writer.add_annotation(int(batch["image_id"][i]), name + ".png", id_map, info)
        if len(batch["uncertainty"][i]):
            disagreement = np.frombuffer(batch["uncertainty"][i], dtype=np.uint8).reshape(h, w)
            writer.write_file(f"uncertainty/{name}.png", _png(Image.fromarray(disagreement)))
        if overlays:
            image = decode_image(bytes(batch["bytes"][i]), str(batch["uri"][i]), max_pixels)
            buf = io.BytesIO()
            Image.fromarray(blend(image, id_map, alpha)).save(buf, format="JPEG", quality=quality)
            writer.write_file(f"overlays/{name}.jpg", buf.getvalue())
        status.append("segmented")
    if writer.images:
        writer.close()
    if errors:
        writer.write_file(f"{ERRORS}/{part}.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode())
    return {"name": np.asarray(names, dtype=object), "status": np.asarray(status, dtype=object),
            "reason": np.asarray([str(r) for r in batch["reason"]], dtype=object),
            "device": np.asarray([str(d) for d in batch["device"]], dtype=object)}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
