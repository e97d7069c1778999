"""Reading and checking one HTTP request of ``ldmseg serve`` (no Ray, no FastAPI: plain functions).

Every problem is an :class:`ApiError` with the HTTP status, a short code and a message that says
what to send instead; the ingress turns it into a JSON error body. Nothing here can raise anything
else on bad input: that is the contract the fuzzing test holds the server to.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldmseg.data.image_io import ImageDecodeError, decode_image
from ldmseg.serve_config import ServeConfig

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
"""Content types of a raw image body (multipart uploads may carry any of the decodable formats)."""

INT_PARAMS = ("steps", "seed", "samples")
FLOAT_PARAMS = ("mask_th", "count_th", "overlap_th")
PARAMS = ("sampler", *INT_PARAMS, *FLOAT_PARAMS)
"""Query or form parameters of ``/v1/segment`` and ``/v1/inpaint``."""

MAX_SEED = 2**31 - 1


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx), ``code`` (machine-readable) and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Options:
    """A request's checked sampling options: ``sampling`` (SamplingConfig fields), ``seed``, ``samples``."""

    sampling: dict[str, Any]
    seed: int
    samples: int | None
    """Samples per image; ``None``: the model's ``sampling.num_samples``."""


def check_options(params: dict[str, str], cfg: ServeConfig, samplers: list[str]) -> Options:
    """Query/form strings → checked :class:`Options` (unknown names, bad numbers, limits: 400)."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown parameter {unknown[0]!r}; parameters are "
                                                 f"{', '.join(PARAMS)}")
    values: dict[str, Any] = {}
    for name, raw in params.items():
        kind = int if name in INT_PARAMS else float if name in FLOAT_PARAMS else str
        try:
            values[name] = kind(raw)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_parameter", f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}"
                           if kind is not str else f"{name}: not text") from None
    sampler = values.get("sampler")
    if sampler is not None and sampler not in samplers:
        raise ApiError(400, "unknown_sampler", f"unknown sampler {sampler!r}; samplers: {', '.join(samplers)}")
    steps = values.get("steps")
    if steps is not None and not 1 <= steps <= cfg.max_steps:
        raise ApiError(400, "steps_out_of_range", f"steps={steps} is out of range: 1 to {cfg.max_steps} on this server")
    seed = values.pop("seed", 0)
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, "seed_out_of_range", f"seed={seed} is out of range: 0 to {MAX_SEED}")
    samples = values.pop("samples", None)  # None: the model's sampling.num_samples
    if samples is not None and not 1 <= samples <= cfg.max_samples:
        raise ApiError(400, "samples_out_of_range", f"samples={samples} is out of range: 1 to {cfg.max_samples} "
                                                    "(2 or more give each segment a stability score)")
    for name in FLOAT_PARAMS:
        if name in values and not (0.0 <= values[name] <= 1.0):  # also refuses nan
            raise ApiError(400, "threshold_out_of_range", f"{name}={values[name]} is out of range: a fraction in [0, 1]")
    return Options(values, seed, samples)


def decode_upload(data: bytes, what: str, cfg: ServeConfig) -> np.ndarray:
    """An uploaded image → (H, W, 3) uint8; empty, not an image, truncated, too many pixels: 4xx."""
    try:
        return decode_image(data, what, cfg.max_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.reason == "too_many_pixels" else 400 if exc.reason == "empty" else 422
        raise ApiError(status, exc.reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the upload's problem
        raise ApiError(422, "corrupt", f"{what}: cannot be decoded ({type(exc).__name__})") from None


def decode_id_map(data: bytes, what: str, shape: tuple[int, int], cfg: ServeConfig) -> np.ndarray:
    """A PNG id map in COCO colours (black = unknown) → (H, W) int64; must match the image's size."""
    from PIL import Image

    from ldmseg.data.ids import rgb_to_id

    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "PNG":
            raise ApiError(415, "map_not_png", f"{what}: a {img.format} file; send the map as a PNG in COCO colours "
                                               "(id = R + 256·G + 256²·B, black = unknown)")
        if img.width * img.height > cfg.max_pixels:
            raise ApiError(413, "too_many_pixels", f"{what}: {img.width}x{img.height} is over the pixel cap")
        if img.mode not in ("RGB", "RGBA", "P", "L"):
            raise ApiError(422, "unsupported_mode", f"{what}: mode {img.mode}; send an 8-bit RGB PNG in COCO colours")
        rgb = np.asarray(img.convert("RGB"))
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ApiError(422, "bad_map", f"{what}: not a readable PNG ({type(exc).__name__}); send an RGB PNG") from None
    if rgb.shape[:2] != shape:
        raise ApiError(422, "map_size_mismatch", f"{what}: {rgb.shape[1]}x{rgb.shape[0]} but the image is "
                                                 f"{shape[1]}x{shape[0]}; send a map of the image's size")
    return rgb_to_id(rgb).astype(np.int64)


def decode_mask(data: bytes, what: str, shape: tuple[int, int]) -> np.ndarray:
    """A known-region mask (PNG, non-zero = known) → (H, W) bool of the image's size."""
    from PIL import Image

    try:
        mask = np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0
    except Exception as exc:  # noqa: BLE001
        raise ApiError(422, "bad_mask", f"{what}: not a readable image ({type(exc).__name__}); send a PNG "
                                        "(white = known)") from None
    if mask.shape != shape:
        raise ApiError(422, "mask_size_mismatch", f"{what}: {mask.shape[1]}x{mask.shape[0]} but the image is "
                                                  f"{shape[1]}x{shape[0]}")
    return mask


def encode_result(result: dict, request_id: str, timings: dict[str, float]) -> tuple[dict, bytes]:
    """A model result → (the JSON body, the id map as a COCO-colour PNG)."""
    from ldmseg.data.ids import encode_panoptic_png
    from ldmseg.data.segments import segments_info

    id_map = result["id_map"]
    png = encode_panoptic_png(id_map)
    extra = {s["id"]: {k: s[k] for k in ("score", "stability") if k in s} for s in result["segments"]}
    segments = [{"id": s["id"], "area": s["area"], "bbox": s["bbox"], **extra.get(s["id"], {})}
                for s in segments_info(id_map)]
    body = {"request_id": request_id, "width": int(id_map.shape[1]), "height": int(id_map.shape[0]),
            "segments": segments, "id_map_png": base64.b64encode(png).decode("ascii"),
            "sampler": result["sampler"], "steps": result["steps"], "batch_size": result["batch_size"],
            "timings_ms": {**timings, "model": result["model_ms"]}}
    return body, png
