"""The MLflow record of an ``ldmseg segment`` job: its settings, counts, speed and a grid of overlays."""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ldmseg.logs import get_logger

log = get_logger("segment")

GRID_IMAGES = 12


def overlay_grid(output: str, count: int = GRID_IMAGES, max_pixels: int = 40_000_000) -> np.ndarray | None:
    """(H, W, 3) uint8: the first ``count`` images of ``output``'s ``panoptic.json`` with their
    segments blended over them (None when it lists none)."""
    from ldmseg.data.ids import decode_panoptic_png
    from ldmseg.data.image_io import decode_image
    from ldmseg.data.manifest import open_fs
    from ldmseg.overlay import blend, grid

    fs, root = open_fs(output)
    doc = json.loads(fs.cat_file(posixpath.join(root, "panoptic.json")))
    summary = json.loads(fs.cat_file(posixpath.join(root, "_summary.json")))
    source_root = summary["input"]
    tiles = []
    for image, ann in list(zip(doc["images"], doc["annotations"]))[:count]:
        id_map = decode_panoptic_png(fs.cat_file(posixpath.join(root, "panoptic", ann["file_name"])))
        uri = image.get("uri") or posixpath.join(source_root, image["file_name"])
        try:
            src_fs, src = open_fs(uri)
            tiles.append(blend(decode_image(src_fs.cat_file(src), uri, max_pixels), id_map))
        except (OSError, ValueError):  # the source moved since: the map alone
            from ldmseg.overlay import colorize

            tiles.append(colorize(id_map))
    return grid(tiles) if tiles else None


def log_run(summary: dict[str, Any], output: str, tracking_uri: str | None) -> None:
    """One MLflow run in experiment ``ldmseg-segment``; skipped with a note when the output is
    remote and no tracking server is configured (a sqlite file lives beside a local output)."""
    import os

    from pipelines.tracking import Tracker, local_artifact_root, resolve_tracking_uri

    if "://" in output and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        log.info("no MLflow run: the output is remote and no --tracking-uri / MLFLOW_TRACKING_URI is set")
        return
    uri = resolve_tracking_uri(tracking_uri, output)
    tracker = Tracker(uri, artifact_root=local_artifact_root(uri, output))
    params = {k: summary[k] for k in ("input", "output", "model", "model_loaded", "model_version", "model_step",
                                      "sampler", "steps", "seed", "num_samples", "config_hash") if summary[k] is not None}
    if not tracker.start("ldmseg-segment", f"segment-{Path(output.rstrip('/')).name}-{int(summary['seconds'])}",
                         params={**params, "segment": summary["segment"]}):
        return
    tracker.log_metrics({k: float(summary[k]) for k in ("found", "segmented", "already_done", "quarantined",
                                                        "seconds", "images_per_s")}, step=0)
    image = overlay_grid(output)
    if image is not None:
        tracker.log_image(image, "overlays.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_summary.json"
        path.write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(path)
    tracker.finish()
