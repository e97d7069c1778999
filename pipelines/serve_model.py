"""The model deployment of ``ldmseg serve``: one :class:`~ldmseg.segmenter.Segmenter` per replica.

Segment requests are batched with ``@serve.batch`` (requests with the same sampling options share
one sampling call; each image keeps its own seed, so a request's map does not depend on what it
was batched with); inpainting requests run one at a time. The ingress (:mod:`pipelines.serve_api`)
has already checked and decoded every input: this deployment gets (H, W, 3) uint8 arrays and
checked options, and returns plain arrays and lists.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from ldmseg.logs import get_logger

log = get_logger("serve")


class ModelServer:
    """Loads the model once (on the device Ray assigned), warms it up, then serves requests.

    Args:
        model: a model folder (local or ``s3://``) or a pinned ``models:/NAME/VERSION`` URI.
        sampling: the served default :class:`~ldmseg.config.SamplingConfig` fields.
        max_batch_size, batch_wait_timeout_s: of the ``@serve.batch`` segment queue.
    """

    def __init__(self, model: str, sampling: dict, max_batch_size: int, batch_wait_timeout_s: float,
                 tracking_uri: str | None = None):
        import tempfile
        from pathlib import Path

        import torch

        from ldmseg.config import SamplingConfig
        from ldmseg.logs import setup_logging
        from ldmseg.segmenter import Segmenter
        from ldmseg.typed import build
        from pipelines.tracking import resolve_model
        from pipelines.ray_compat import assigned_device, worker_threads

        setup_logging()
        torch.set_num_threads(worker_threads())
        self._lock = threading.Lock()  # one computation at a time: a segment batch or an inpainting
        self._tmp = tempfile.TemporaryDirectory(prefix="ldmseg-serve-model-")
        t0 = time.time()
        self.segmenter = Segmenter.from_pretrained(resolve_model(model, Path(self._tmp.name), tracking_uri),
                                                   device=assigned_device())
        self.sampling = build(SamplingConfig, sampling)
        self._segment_batch.set_max_batch_size(max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        res = self.segmenter.cfg.data.resolution
        self._segment_many([{"image": np.zeros((res, res, 3), np.uint8), "options": {"steps": 1}, "seed": 0,
                             "samples": 1}])  # warm-up: the first call builds kernels and schedulers
        log.info(f"model {model} loaded and warmed up in {time.time() - t0:.1f} s")

    def ready(self) -> bool:
        return True

    def _config(self, options: dict[str, Any]):
        from ldmseg.config import to_dict
        from ldmseg.typed import build

        return build(type(self.sampling), {**to_dict(self.sampling), **options})

    def _segment_many(self, requests: list[dict]) -> list[dict]:
        """Requests (``image``, ``options``, ``seed``, ``samples``) → results, grouped by options."""
        with self._lock:
            return self._segment_groups(requests)

    def _segment_groups(self, requests: list[dict]) -> list[dict]:
        import json

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps([r["options"], r["samples"]], sort_keys=True), []).append(i)
        out: list[dict] = [{} for _ in requests]
        for members in groups.values():
            first = requests[members[0]]
            sampling = self._config(first["options"])
            prepared = [self.segmenter.prepare(requests[i]["image"]) for i in members]
            t0 = time.perf_counter()
            results = self.segmenter.segment_prepared(
                [p[0] for p in prepared], [p[1] for p in prepared], seeds=[requests[i]["seed"] for i in members],
                sampling=sampling, num_samples=first["samples"])
            model_ms = 1000 * (time.perf_counter() - t0)
            for i, r in zip(members, results):
                out[i] = {"id_map": r.id_map.astype(np.uint32), "segments": r.segments, "uncertainty": r.uncertainty,
                          "sampler": sampling.sampler, "steps": sampling.steps, "batch_size": len(members),
                          "model_ms": round(model_ms, 2)}
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _segment_batch(self, requests: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._segment_many, requests)

    async def segment(self, image: np.ndarray, options: dict, seed: int, samples: int) -> dict:
        """One image (H, W, 3) uint8 → ``id_map`` (H, W) uint32, ``segments``, timings."""
        return await self._segment_batch({"image": image, "options": options, "seed": seed, "samples": samples})

    def _inpaint(self, image: np.ndarray, partial: np.ndarray, known: np.ndarray | None, options: dict,
                 seed: int) -> dict:
        sampling = self._config(options)
        t0 = time.perf_counter()
        with self._lock:
            r = self.segmenter.inpaint(image, partial, known, seed=seed,
                                       **{k: v for k, v in vars(sampling).items() if k != "seed"})
        return {"id_map": r.id_map.astype(np.uint32), "segments": r.segments, "uncertainty": None,
                "sampler": sampling.sampler, "steps": sampling.steps, "batch_size": 1,
                "model_ms": round(1000 * (time.perf_counter() - t0), 2)}

    async def inpaint(self, image: np.ndarray, partial: np.ndarray, known: np.ndarray | None, options: dict,
                      seed: int) -> dict:
        """Complete ``partial`` (H, W) ids (0 = unknown unless ``known`` (H, W) bool says known void)."""
        return await asyncio.to_thread(self._inpaint, image, partial, known, options, seed)
