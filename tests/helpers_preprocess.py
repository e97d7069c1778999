"""Shared pieces of the preprocessing tests: the shard config, one task's rows without Ray, and the
in-memory encodings a shard row must equal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ldmseg.config import load_config, to_dict
from ldmseg.data import coco, resize, slots
from ldmseg.data.encoding import image_to_tensor
from paths import TINY_YAML


def shard_cfg(*overrides):
    """conf/tiny.yaml as it is (64 px scenes) with small shard files and chunks."""
    return load_config(TINY_YAML, ["preprocess.rows_per_file=4", "preprocess.chunk_rows=8", *overrides])


def encode_records(records: list[coco.PanopticRecord], cfg, staging: Path) -> pa.Table:
    """The good shard rows of ``records`` as one preprocessing task writes them (no Ray)."""
    from pipelines.preprocess_tasks import process_groups

    batch = pa.table({"records": [json.dumps([vars(r) for r in records])], "split": ["train"]})
    return process_groups(batch, to_dict(cfg), str(staging))


def expected_arrays(rec: coco.PanopticRecord, cfg) -> dict[str, np.ndarray]:
    """The in-memory encodings of issue 1/5 for one record, computed without the shard code."""
    sample = coco.read_sample(rec)
    image, ids_r, valid, _ = resize.resize_pad(sample.image, sample.id_map, cfg.data.resolution,
                                               cfg.data.resize_mode)
    clean = slots.clean_segments(ids_r, sample.segments_info, cfg.data.min_segment_area)  # areas at R×R
    remap = slots.remap_ids(clean.id_map, cfg.data.num_slots, slots.eval_generator(rec.image_id))
    return {"image": image_to_tensor(image).numpy(), "slot_map": remap.slot_map, "valid": valid}
