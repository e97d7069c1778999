"""Shard rows as a preprocessing task writes them: equal to the in-memory encodings, old schemas refused,
slot maps beyond 256 slots, segment areas at the training resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers_coco import image_bytes
from helpers_preprocess import encode_records, expected_arrays
from helpers_shards import decode_row, dense_sample
from ldmseg.config import load_config
from ldmseg.data import coco
from ldmseg.data.manifest import open_fs
from ldmseg.data.parquet_dataset import ShardDataset, decode_rows
from paths import TINY_YAML

pytestmark = pytest.mark.ray


def test_task_rows_equal_encoded_samples_and_old_shards_are_refused(tmp_path, coco_val_examples):
    """A task (dense labels, label table, direct image column) writes encode_dense_sample's rows,
    whose raw slot maps are the in-memory encoding's; shards of schema version 3 (slot maps as
    PNG, a ``valid`` column) are refused with the command that fixes them."""
    from ldmseg.config import ConfigError
    from ldmseg.data import shards
    from ldmseg.data.manifest import SCHEMA_VERSION, Manifest, check_data_config, write_manifest

    cfg = load_config(TINY_YAML, ["data.resolution=128"])
    records = coco.load_coco_panoptic(coco_val_examples).records[:5]
    table = encode_records(records, cfg, tmp_path / "staging")
    assert table.schema.equals(shards.SCHEMA) and "valid" not in table.column_names
    for row, rec in zip(table.to_pylist(), records):
        expected = shards.encode_dense_sample(coco.read_dense_sample(rec), image_id=rec.image_id, cfg=cfg,
                                              file_name=rec.file_name, segments_file=rec.segments_file)
        assert row == expected
        source = Path(rec.image_path).read_bytes() + Path(rec.panoptic_path).read_bytes()
        assert row["checksum"] == hashlib.sha256(source).hexdigest()
        stored = shards.decode_slot_map(row["slot_map"], 128)
        assert stored.dtype == np.uint8 and len(row["slot_map"]) == 128 * 128
        assert np.array_equal(stored, expected_arrays(rec, cfg)["slot_map"])

    old_png = image_bytes(np.zeros((128, 128, 3), np.uint8), fmt="PNG", mode="L")
    old = {**table.to_pylist()[0], "slot_map": old_png}  # a row of schema version 3: slot map as PNG
    with pytest.raises(shards.ShardFormatError, match="re-run `ldmseg preprocess`"):
        decode_rows([old], 32)
    m = Manifest(schema_version=SCHEMA_VERSION - 1, config_hash="x", source="s", source_fingerprint="f",
                 complete=True, files={"train": ["train/a.parquet"]})
    (tmp_path / "old" / "train").mkdir(parents=True)
    pq.write_table(table, tmp_path / "old" / "train" / "a.parquet")
    write_manifest(*open_fs(str(tmp_path / "old")), m)
    with pytest.raises(ConfigError, match="schema version 3.*re-run `ldmseg preprocess`"):
        ShardDataset(str(tmp_path / "old"), "train", 32)
    with pytest.raises(ConfigError, match="re-run `ldmseg preprocess`"):
        check_data_config(m, cfg.data, "--data old")


def test_slot_maps_beyond_256_slots_are_stored_as_uint16():
    from ldmseg.data import shards

    id_map = np.arange(1, 32 * 32 + 1, dtype=np.int64).reshape(32, 32)  # 1024 one-pixel segments
    info = [{"id": i, "category_id": 1, "iscrowd": 0} for i in range(1, 32 * 32 + 1)]
    cfg = load_config(TINY_YAML, ["data.resolution=32", "data.num_slots=512",
                                                "data.min_segment_area=1"])
    row = shards.encode_dense_sample(dense_sample(np.zeros((32, 32, 3), np.uint8), id_map, info), image_id=1, cfg=cfg)
    assert (row["num_segments"], row["n_merged"]) == (511, 1024 - 511)
    assert len(row["slot_map"]) == 2 * 32 * 32
    stored = shards.decode_slot_map(row["slot_map"], 32)
    assert stored.dtype == np.dtype("<u2") and len(np.unique(stored[stored > 0])) == row["num_segments"]
    batch = decode_rows([row], 512, np.random.default_rng(0))
    assert torch.equal(batch["slot_map"][0], torch.from_numpy(decode_row(row, 512, np.random.default_rng(0))["slot_map"]))


def test_min_segment_area_counts_pixels_at_the_training_resolution():
    """A 12×12 segment (144 px) of a 96×96 map is 4×4 = 16 px at 32×32 (kept with min area 10)
    and 2×2 = 4 px at 16×16: there it becomes void and is counted in ``n_small``."""
    from ldmseg.data import shards

    id_map = np.zeros((96, 96), np.int64)
    id_map[:48] = 1
    id_map[48:] = 2
    id_map[60:72, 60:72] = 3
    info = [{"id": i, "category_id": 1, "iscrowd": 0} for i in (1, 2, 3)]
    image = np.zeros((96, 96, 3), np.uint8)
    for res, n_segments, n_small in ((32, 3, 0), (16, 2, 1)):
        cfg = load_config(TINY_YAML, [f"data.resolution={res}", "data.min_segment_area=10"])
        row = shards.encode_dense_sample(dense_sample(image, id_map, info), image_id=1, cfg=cfg)
        stored = shards.decode_slot_map(row["slot_map"], res)
        assert (row["num_segments"], row["n_small"]) == (n_segments, n_small)
        assert len(np.unique(stored[stored > 0])) == n_segments
