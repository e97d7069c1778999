"""Ray Data preprocessing: Parquet shards equal the in-memory encodings; quarantine; S3; resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers_coco import entry, image_bytes, truncated, write_coco_folder
from helpers_shards import decode_row, dense_sample
from ldmseg.config import load_config, to_dict
from ldmseg.data import coco, resize, slots
from ldmseg.data.encoding import image_to_tensor
from ldmseg.data.manifest import open_fs, read_manifest
from ldmseg.data.parquet_dataset import ShardDataset, columns_to_rows, decode_columns, decode_rows
from ldmseg.data.synthetic import write_scenes
from paths import REPO, TINY_YAML

pytestmark = pytest.mark.ray


def shard_cfg(*overrides):
    """conf/tiny.yaml as it is (64 px scenes) with small shard files and chunks."""
    return load_config(TINY_YAML, ["preprocess.rows_per_file=4", "preprocess.chunk_rows=8", *overrides])


def test_task_size_fills_files_or_shares_small_chunks():
    from pipelines.preprocess import task_size

    assert task_size(10_000, 512, 8) == 512  # big chunk: one full file per task
    assert task_size(240, 512, 2) == 60  # small chunk: two tasks per CPU
    assert task_size(3, 512, 2) == 1 and task_size(0, 4, 2) == 1


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


def check_against_memory(output: str, source: str, cfg) -> int:
    records = {r.image_id: r for r in coco.load_coco_panoptic(source).records}
    n = 0
    for sample in ShardDataset(output, "train", cfg.data.num_slots, train=False):
        exp = expected_arrays(records[int(sample["image_id"])], cfg)
        np.testing.assert_allclose(sample["image"].numpy(), exp["image"], atol=1e-6)
        assert np.array_equal(sample["slot_map"].numpy(), exp["slot_map"])
        assert np.array_equal(sample["valid"].numpy(), exp["valid"])
        n += 1
    return n


def test_synthetic_and_real_samples_round_trip(ray_session, tmp_path, coco_val_examples, coco_sample):
    from pipelines.preprocess import run_preprocess

    cfg = shard_cfg()
    scenes = tmp_path / "scenes"
    write_scenes(scenes, num_images=20, size=64, seed=3)
    m = run_preprocess(cfg, output=str(tmp_path / "out_syn"), source=str(scenes))
    assert m.complete and m.reconciles()
    assert m.written == {"train": 20} and m.quarantined == 0
    # rows per file honoured: 20 rows over chunks of 8 in files of at most 4 rows
    sizes = [pq.read_metadata(tmp_path / "out_syn" / f).num_rows for f in m.files["train"]]
    assert sum(sizes) == 20 and max(sizes) <= 4
    assert check_against_memory(str(tmp_path / "out_syn"), str(scenes), cfg) == 20
    # a chunk big enough for every CPU: one task per file, every file full
    from pipelines.preprocess import task_size
    from pipelines.ray_compat import cluster_cpus

    big = shard_cfg("preprocess.chunk_rows=64", "preprocess.rows_per_file=2")
    assert task_size(20, 2, cluster_cpus()) == 2  # 4 CPUs: 20 images > 2 × 4 × 2
    m = run_preprocess(big, output=str(tmp_path / "out_full"), source=str(scenes))
    sizes = [pq.read_metadata(tmp_path / "out_full" / f).num_rows for f in m.files["train"]]
    assert sorted(sizes) == [2] * 10

    for name, src in (("val", coco_val_examples), ("sample", coco_sample)):
        out = tmp_path / f"out_{name}"
        m = run_preprocess(cfg, output=str(out), source=str(src))
        n_listed = len(json.loads((src / "panoptic.json").read_text())["images"])
        assert m.inputs == n_listed == m.written["train"] + m.quarantined
        assert check_against_memory(str(out), str(src), cfg) == m.written["train"]

    # the schema is plain Parquet: pyarrow alone reads it, with the documented columns
    table = pq.read_table(tmp_path / "out_sample" / m.files["train"][0])
    segs = json.loads(table.column("segments")[0].as_py())
    assert {"slot", "id", "category_id", "iscrowd", "area", "bbox"} <= set(segs[0])
    assert table.column("resolution")[0].as_py() == 64


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


def test_bad_inputs_are_quarantined_with_reasons(ray_session, tmp_path, capsys):
    from pipelines.cli import main

    good_jpeg = image_bytes(np.full((12, 16, 3), 90, np.uint8))
    entries = [
        entry(1), entry(2), entry(3, write_image=False), entry(4, png_data=b""),
        entry(5, image_data=truncated(good_jpeg)), entry(6, image_json={"height": 99}),
        entry(7, in_images=False), entry(8, ids=(0, 0, 0)),  # no segment at all: nothing to train on
        entry(9, segments_info=[]),  # PNG colours absent from segments_info
    ]
    paths = write_coco_folder(tmp_path / "bad", entries)
    out = tmp_path / "out"
    code = main(["preprocess", "--source", str(paths.root), "--output", str(out),
                 "--config", str(TINY_YAML), "preprocess.rows_per_file=4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = read_manifest(*open_fs(str(out)))
    assert m.reconciles() and summary["written"] == {"train": 2}
    errors = pq.read_table(out / "errors").to_pylist()
    reasons = {e["image_id"]: e["reason"] for e in errors}
    assert m.quarantined == len(errors) == 7
    assert "missing" in reasons[3] or "not found" in reasons[3].lower()
    assert reasons[4] and reasons[5] and "99" in reasons[6]
    assert "annotation_without_image" in reasons[7]
    assert "no non-crowd segment" in reasons[8]
    assert "segments_info" in reasons[9]


def test_s3_source_and_output(ray_session, tmp_path, s3_server):
    import s3fs

    from pipelines.preprocess import run_preprocess

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("ldmseg-test")
    write_scenes(tmp_path / "scenes", num_images=10, size=64, seed=9)
    fs.put(str(tmp_path / "scenes"), "ldmseg-test/scenes", recursive=True)
    cfg = shard_cfg()
    m = run_preprocess(cfg, output="s3://ldmseg-test/shards", source="s3://ldmseg-test/scenes")
    assert m.written == {"train": 10} and m.reconciles()
    assert fs.exists("ldmseg-test/shards/_manifest.json")
    # a rejected input is staged by the task on S3, then quarantined with its reason
    fs.cp("ldmseg-test/scenes", "ldmseg-test/broken", recursive=True)
    png = sorted(fs.glob("ldmseg-test/broken/panoptic/*.png"))[3]
    fs.rm(png)
    b = run_preprocess(cfg, output="s3://ldmseg-test/shards-b", source="s3://ldmseg-test/broken")
    assert b.written == {"train": 9} and b.quarantined == 1 and b.reconciles()
    with fs.open("ldmseg-test/shards-b/errors/chunk-00000.parquet", "rb") as f:
        (err,) = pq.read_table(f).to_pylist()
    assert "not found" in err["reason"] and png.rsplit("/", 1)[1] in err["reason"]
    assert not fs.glob("ldmseg-test/shards-b/_progress/*-errors*")  # staging removed
    local = run_preprocess(cfg, output=str(tmp_path / "local"), source=str(tmp_path / "scenes"))
    a = {int(s["image_id"]): s for s in ShardDataset("s3://ldmseg-test/shards", "train", 32, train=False)}
    b = {int(s["image_id"]): s for s in ShardDataset(str(tmp_path / "local"), "train", 32, train=False)}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for k in a:
        assert torch.equal(a[k]["slot_map"], b[k]["slot_map"]) and torch.equal(a[k]["image"], b[k]["image"])
    assert local.written == m.written


def test_val_fraction_splits_with_rejects(ray_session, tmp_path):
    from pipelines.preprocess import assign_split, run_preprocess

    write_scenes(tmp_path / "s", num_images=30, size=64, seed=8)
    (tmp_path / "s" / "panoptic" / sorted(p.name for p in (tmp_path / "s" / "panoptic").iterdir())[0]).unlink()
    m = run_preprocess(shard_cfg("preprocess.val_fraction=0.3"), output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    split_of = {i: assign_split(i, "train", 0.3) for i in range(1, 31)}
    errors = pq.read_table(tmp_path / "o" / "errors").to_pylist()
    assert m.quarantined == len(errors) == 1 and m.reconciles()
    rejected = errors[0]["image_id"]
    for split in ("train", "val"):
        ids = pq.read_table(tmp_path / "o" / split, columns=["image_id", "split"]).to_pylist()
        expected = sorted(i for i, s in split_of.items() if s == split and i != rejected)
        assert sorted(r["image_id"] for r in ids) == expected and {r["split"] for r in ids} == {split}
        assert m.written[split] == len(expected)
        sizes = [pq.read_metadata(tmp_path / "o" / f).num_rows for f in m.files[split]]
        assert sum(sizes) == len(expected) and max(sizes) <= 4
    assert errors[0]["split"] == split_of[rejected]


def test_rerun_is_idempotent_and_changed_config_refuses(ray_session, tmp_path):
    from pipelines.preprocess import run_preprocess

    write_scenes(tmp_path / "s", num_images=10, size=64, seed=2)
    cfg = shard_cfg()
    first = run_preprocess(cfg, output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "o").rglob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*.parquet")}
    again = run_preprocess(cfg, output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "o").rglob("*.parquet")) == files
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*.parquet")} == stamps
    assert again.files == first.files and again.written == first.written
    with pytest.raises(SystemExit, match="another config"):
        run_preprocess(shard_cfg("data.min_segment_area=20"), output=str(tmp_path / "o"), source=str(tmp_path / "s"))
    replaced = run_preprocess(shard_cfg("data.min_segment_area=20"), output=str(tmp_path / "o"),
                              source=str(tmp_path / "s"), overwrite=True)
    assert replaced.config_hash != first.config_hash and replaced.reconciles()


def test_killed_run_resumes_without_redoing_chunks(ray_session, tmp_path):
    from pipelines.preprocess import run_preprocess

    write_scenes(tmp_path / "s", num_images=40, size=64, seed=4)
    out = tmp_path / "o"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines.cli", "preprocess", "--source", str(tmp_path / "s"), "--output", str(out),
           "--config", str(TINY_YAML), "--address", address,
           "preprocess.rows_per_file=4", "preprocess.chunk_rows=8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    deadline = time.time() + 120
    while not list((out / "_progress").glob("chunk-*.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "_progress").glob("chunk-*.json"))
    assert 1 <= len(done_before) < 5, "the run should have been killed part-way"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "_progress").glob("chunk-*.json")}
    m = run_preprocess(shard_cfg(), output=str(out), source=str(tmp_path / "s"))
    assert m.written == {"train": 40} and m.reconciles()
    for name, t in stamps.items():  # finished chunks were not redone
        assert (out / "_progress" / name).stat().st_mtime_ns == t
    ids = pq.read_table(out / "train", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == list(range(1, 41))  # no duplicates, nothing lost
