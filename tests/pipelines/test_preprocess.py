"""Ray Data preprocessing end to end: Parquet shards equal the in-memory encodings; quarantine; S3;
validation split; re-runs and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers_coco import entry, image_bytes, truncated, write_coco_folder
from helpers_preprocess import expected_arrays, shard_cfg
from ldmseg.data import coco
from ldmseg.data.manifest import open_fs, read_manifest
from ldmseg.data.parquet_dataset import ShardDataset
from ldmseg.data.synthetic import write_scenes
from paths import REPO, TINY_YAML

pytestmark = pytest.mark.ray


def test_task_size_fills_files_or_shares_small_chunks():
    from pipelines.preprocess import task_size

    assert task_size(10_000, 512, 8) == 512  # big chunk: one full file per task
    assert task_size(240, 512, 2) == 60  # small chunk: two tasks per CPU
    assert task_size(3, 512, 2) == 1 and task_size(0, 4, 2) == 1


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
