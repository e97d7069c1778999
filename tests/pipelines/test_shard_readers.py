"""Reading shards back: the training reader re-permutes slots, and the Ray Data reader, the columnar decoder
and ShardDataset agree with the per-row reference."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers_preprocess import encode_records, shard_cfg
from helpers_shards import decode_row
from ldmseg.config import load_config
from ldmseg.data import coco
from ldmseg.data.parquet_dataset import (ShardDataset, columns_to_rows, decode_columns, decode_rows,
                                         to_training_batch)
from ldmseg.data.synthetic import write_scenes
from paths import TINY_YAML

pytestmark = pytest.mark.ray


def test_training_reader_repermutes_and_ray_reader_agrees(ray_session, tmp_path):
    import ray.data

    from pipelines.preprocess import run_preprocess

    cfg = shard_cfg()
    write_scenes(tmp_path / "s", num_images=6, size=64, seed=5)
    m = run_preprocess(cfg, output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    plain = {int(s["image_id"]): s for s in ShardDataset(str(tmp_path / "o"), "train", 32, train=False)}
    rows = ray.data.read_parquet([str(tmp_path / "o" / f) for f in m.files["train"]]).take_all()
    batch = decode_rows(rows, 32)
    for i, image_id in enumerate(batch["image_id"].tolist()):
        assert torch.equal(batch["slot_map"][i], plain[image_id]["slot_map"])
        assert torch.equal(batch["image"][i], plain[image_id]["image"])
    # training mode: same partition of pixels, different slot values
    trained = list(ShardDataset(str(tmp_path / "o"), "train", 32, train=True, seed=1))
    assert len(trained) == 6
    changed = 0
    for s in trained:
        ref = plain[int(s["image_id"])]["slot_map"].numpy()
        got = s["slot_map"].numpy()
        assert np.array_equal(got == 0, ref == 0)
        pairs = set(zip(ref[ref > 0].tolist(), got[got > 0].tolist()))
        assert len(pairs) == len(np.unique(ref[ref > 0])) == len(np.unique(got[got > 0]))  # a bijection
        changed += int(not np.array_equal(got, ref))
    assert changed >= 5


def test_decode_columns_equals_decode_rows(ray_session, tmp_path):
    """The columnar decoder (Ray Data numpy batches, pyarrow columns) gives decode_rows' tensors,
    which are the per-row reference decode_row's, for the same rows and seed."""
    import ray.data

    from pipelines.preprocess import run_preprocess

    write_scenes(tmp_path / "s", num_images=7, size=64, seed=6)
    m = run_preprocess(shard_cfg(), output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    files = [str(tmp_path / "o" / f) for f in m.files["train"]]
    rows = ray.data.read_parquet(files).take_all()
    table = pq.read_table(files[0]).combine_chunks()
    numpy_batch = next(iter(ray.data.read_parquet(files).iter_batches(batch_size=7, batch_format="numpy")))
    for seed in (None, 3):
        gen = (lambda: None) if seed is None else (lambda: np.random.default_rng(seed))
        by_rows = decode_rows(rows, 32, gen())
        g = gen()
        ref = [decode_row(r, 32, g) for r in rows]
        for i, r in enumerate(ref):
            assert np.array_equal(by_rows["image"][i].numpy(), r["image"])
            assert np.array_equal(by_rows["slot_map"][i].numpy(), r["slot_map"])
            assert np.array_equal(by_rows["valid"][i].numpy(), r["valid"])
        by_cols = decode_columns(numpy_batch, 32, gen())
        assert by_cols["image"].shape == (7, 3, 64, 64) and by_cols["image"].is_contiguous()
        for k in ("image", "slot_map", "valid", "image_id"):
            assert by_cols[k].dtype == by_rows[k].dtype
            assert torch.equal(by_cols[k], decode_rows(columns_to_rows(numpy_batch), 32, gen())[k])
        arrow = decode_columns({c: table.column(c) for c in table.column_names}, 32, gen())
        again = decode_rows(table.to_pylist(), 32, gen())
        for k in ("image", "slot_map", "valid", "image_id"):
            assert torch.equal(arrow[k], again[k])
        # the compact batch (bound for a GPU): uint8 images and slots, converted to the same tensors
        compact = decode_columns(numpy_batch, 32, gen(), compact=True)
        assert compact["image"].dtype == compact["slot_map"].dtype == torch.uint8
        assert compact["image"].shape == (7, 64, 64, 3)
        assert sum(t.nbytes for t in compact.values()) * 4 < sum(t.nbytes for t in by_cols.values())
        converted = to_training_batch(compact)
        for k in ("image", "slot_map", "valid", "image_id"):
            assert converted[k].dtype == by_cols[k].dtype and torch.equal(converted[k], by_cols[k]), k
        assert to_training_batch(by_cols) is by_cols


def test_shard_dataset_equals_row_by_row_reference(tmp_path, coco_val_examples):
    """ShardDataset (columns sliced per sample) yields what reading row dicts and decode_row
    gives, in the same order and with the same random slots for the same seed."""
    from ldmseg.data.parquet_dataset import TRAIN_COLUMNS

    cfg = load_config(TINY_YAML, ["data.resolution=96"])
    records = coco.load_coco_panoptic(coco_val_examples).records[:7]
    table = encode_records(records, cfg, tmp_path / "staging")
    (tmp_path / "o" / "train").mkdir(parents=True)
    files = [str(tmp_path / "o" / "train" / f"{k}.parquet") for k in ("a", "b")]
    pq.write_table(table.slice(0, 3), files[0])
    pq.write_table(table.slice(3), files[1])

    def reference(train: bool, shuffle_buffer: int, epochs: int):
        rng = np.random.default_rng([4, 0])
        for _ in range(epochs):
            order = list(files)
            if train:
                rng.shuffle(order)
            rows = [r for f in order for r in pq.read_table(f, columns=TRAIN_COLUMNS).to_pylist()]
            buffer = []
            for row in rows:
                if not train:
                    yield decode_row(row, 32, None), row["image_id"]
                    continue
                buffer.append(row)
                if len(buffer) >= shuffle_buffer:
                    r = buffer.pop(int(rng.integers(len(buffer))))
                    yield decode_row(r, 32, rng), r["image_id"]
            rng.shuffle(buffer)
            for r in buffer:
                yield decode_row(r, 32, rng), r["image_id"]

    for train, buffer, epochs in ((True, 3, 3), (True, 256, 2), (False, 256, 1)):
        got = ShardDataset(str(tmp_path / "o"), "train", 32, train=train, seed=4, shuffle_buffer=buffer,
                           repeat=train)
        it = iter(got)
        for expected, image_id in reference(train, buffer, epochs):
            sample = next(it)
            assert int(sample["image_id"]) == image_id and sample["image"].shape == (3, 96, 96)
            for k in ("image", "slot_map", "valid"):
                assert np.array_equal(sample[k].numpy(), expected[k]), k


def test_training_files_are_read_in_a_new_order_every_epoch(ray_session, tmp_path):
    """``read_parquet(shuffle_seed=...)``: each execution (epoch) reads every file once, in an order
    drawn from the seed and the execution's index (Ray's read tasks may still finish out of order)."""
    import pyarrow as pa

    from pipelines import ray_compat

    files = []
    for i in range(12):
        files.append(str(tmp_path / f"f{i:02d}.parquet"))
        pq.write_table(pa.table({"i": [i]}), files[-1])
    ds = ray_compat.read_parquet(files, shuffle_seed=5)
    orders = [[int(r["i"]) for r in ds.iter_rows()] for _ in range(3)]
    assert all(sorted(order) == list(range(12)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
