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


@pytest.mark.parametrize("cpus", [64, 256])
def test_file_size_is_rows_per_file_on_any_cluster(cpus):
    """Files of ``rows_per_file`` rows except the last of a split in a chunk, whatever the CPUs
    (sharing a chunk over 2 × CPUs gave 16-row files at 64 CPUs and ~30 k files for COCO at 256)."""
    from pipelines.preprocess import plan_files

    assert plan_files(2048, 512, cpus) == [512] * 4  # the default chunk: 4 tasks, 4 full files
    assert plan_files(32768, 512, cpus) == [512] * 64  # coco.yaml's chunk: 64 tasks, 64 full files
    plan = plan_files(2048, 100, cpus)
    assert plan[:-1] == [100] * 20 and plan[-1] == 48 and sum(plan) == 2048
    assert plan_files(3, 512, cpus) == [3] and plan_files(0, 4, cpus) == []
    # COCO train (118 287 images) at 512 rows per file: 232 files on any cluster, chunks of 2 048 or
    # of coco.yaml's 32 768 (was ~30 k files of 4 rows at 256 CPUs)
    n = 118_287
    for chunk, full_chunks, per_chunk in ((2048, 57, 4), (32768, 3, 64)):
        plans = [plan_files(min(chunk, n - i), 512, cpus) for i in range(0, n, chunk)]
        assert sum(len(p) for p in plans) == full_chunks * per_chunk + len(plans[-1]) == 232
        assert sum(map(sum, plans)) == n and all(size == 512 for p in plans for size in p[:-1])
    assert plan_files(2048, 512, cpus) == plan_files(2048, 512, 1)  # the CPU count changes nothing


def check_file_sizes(out, m) -> None:
    """The manifest's rows per file equal the Parquet footers', its bytes the files', and the rows of
    each split add up to ``written``."""
    assert set(m.file_sizes) == {f for split, files in m.files.items() if split != "errors" for f in files}
    for split, files in m.files.items():
        if split == "errors":
            continue
        for f in files:
            assert m.file_sizes[f] == {"rows": pq.read_metadata(out / f).num_rows, "bytes": (out / f).stat().st_size}
        assert sum(m.file_sizes[f]["rows"] for f in files) == m.written.get(split, 0)


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
    assert sorted(sizes) == [4] * 5  # chunks of 8, 8, 4: every file full
    check_file_sizes(tmp_path / "out_syn", m)
    assert check_against_memory(str(tmp_path / "out_syn"), str(scenes), cfg) == 20
    # one chunk of 20 at 6 rows per file: three full files and a last one of 2, on any CPU count
    big = shard_cfg("preprocess.chunk_rows=64", "preprocess.rows_per_file=6")
    m = run_preprocess(big, output=str(tmp_path / "out_full"), source=str(scenes))
    sizes = [pq.read_metadata(tmp_path / "out_full" / f).num_rows for f in m.files["train"]]
    assert sorted(sizes) == [2, 6, 6, 6]
    check_file_sizes(tmp_path / "out_full", m)

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
    check_file_sizes(tmp_path / "o", m)  # with a reject: the manifest still matches the footers


def test_manifest_sizes_spare_requests_and_older_manifests_still_load(ray_session, tmp_path, monkeypatch):
    """Training sizes its input from the manifest (no request per file); a manifest written before
    it recorded sizes (or with a field of a newer ldmseg) loads, its sizes then come from a listing."""
    from ldmseg.data import manifest as mf
    from pipelines.preprocess import run_preprocess
    from pipelines.train_inputs import resolve_inputs

    write_scenes(tmp_path / "s", num_images=12, size=64, seed=5)
    out = tmp_path / "o"
    m = run_preprocess(shard_cfg(), output=str(out), source=str(tmp_path / "s"))
    cfg = shard_cfg()
    fs, root = open_fs(str(out))
    opened: list[str] = []
    real_size, real_open = type(fs).size, type(fs).open

    def counted_size(self, path, *a, **k):
        opened.append(str(path))
        return real_size(self, path, *a, **k)

    def counted_open(self, path, *a, **k):
        if str(path).endswith(".parquet"):
            opened.append(str(path))
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(type(fs), "size", counted_size)
    monkeypatch.setattr(type(fs), "open", counted_open)
    inputs = resolve_inputs("ae", cfg, data=str(out), ae_model=None, run_dir=tmp_path / "run", tracking_uri="")
    assert opened == []  # neither HEAD nor footer per file
    assert inputs.train_rows == m.written["train"] == 12
    assert inputs.train_bytes == sum((out / f).stat().st_size for f in m.files["train"])
    assert inputs.train_files == [str(out / f) for f in m.files["train"]]
    monkeypatch.undo()

    # an older manifest: no file_sizes; a newer one: a field this ldmseg does not know
    raw = json.loads((out / "_manifest.json").read_text())
    del raw["file_sizes"]
    raw["from_a_newer_ldmseg"] = 1
    (out / "_manifest.json").write_text(json.dumps(raw))
    old = read_manifest(fs, root)
    assert old.file_sizes == {} and old.files == m.files
    shards = mf.list_split_shards(fs, root, "train")
    assert [s.path for s in shards] == [str(out / f) for f in m.files["train"]]
    assert [s.bytes for s in shards] == [(out / f).stat().st_size for f in m.files["train"]]
    assert {s.rows for s in shards} == {None}
    inputs = resolve_inputs("ae", cfg, data=str(out), ae_model=None, run_dir=tmp_path / "run", tracking_uri="")
    assert inputs.train_rows is None and inputs.train_bytes == sum(s.bytes for s in shards)


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
