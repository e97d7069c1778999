"""ldmseg segment on a real local Ray (and a real moto S3 server): folders, awkward and broken files,
resuming, a killed driver, and PQ equal to ldmseg evaluate's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_images import write_awkward_images, write_broken_images
from ldmseg.data.ids import decode_panoptic_png
from paths import REPO
from pipelines.segment import segment

pytestmark = pytest.mark.ray

MAX_PIXELS = 1_000_000
FAST = ["sampling.steps=2", "segment.batch_size=4", "segment.write_batch_size=4", "segment.decode_batch_size=4",
        f"segment.max_pixels={MAX_PIXELS}"]


def outputs(out: Path) -> dict[str, bytes]:
    """Every file under ``out/panoptic`` by relative path → its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "panoptic").rglob("*.png"))}


def output_name(rel: str, names) -> str:
    """The output name of ``rel`` among ``names``: its stem, with ``_<ext>`` when stems clash."""
    stem, suffix = os.path.splitext(rel)
    clash = sum(os.path.splitext(n)[0] == stem for n in names) > 1
    return f"{stem}_{suffix[1:].lower()}" if clash else stem


def listed(out: Path) -> tuple[list, list]:
    doc = json.loads((out / "panoptic.json").read_text())
    return doc["images"], doc["annotations"]


def test_folder_with_awkward_and_broken_files(tiny_model, tmp_path, ray_session):
    model, scenes, _ = tiny_model
    src = tmp_path / "in"
    shutil.copytree(Path(scenes) / "images", src / "scenes")
    shutil.copytree(Path(scenes) / "images", src / "copy")  # the same file names in another folder
    awkward = write_awkward_images(src / "awkward")
    broken = write_broken_images(src / "broken", MAX_PIXELS)
    assert len(broken) >= 10 and len(set(broken.values())) >= 5
    out = tmp_path / "out"
    summary = segment(model, str(src), str(out), seed=3, overlays=True, overrides=FAST, log_mlflow=False)

    n_scenes = len(list((Path(scenes) / "images").glob("*.jpg")))
    ok = 2 * n_scenes + len(awkward)
    assert summary["found"] == ok + len(broken)
    assert (summary["segmented"], summary["quarantined"], summary["already_done"]) == (ok, len(broken), 0)
    assert summary["reconciles"] and summary["listed_in_json"] == ok
    images, annotations = listed(out)
    assert len({i["id"] for i in images}) == len({a["file_name"] for a in annotations}) == ok
    # awkward legal images: a prediction at the source size (after EXIF orientation), and an overlay
    for rel, (h, w) in awkward.items():
        stem = "awkward/" + str(Path(rel).with_suffix(""))
        ids = decode_panoptic_png((out / "panoptic" / f"{stem}.png").read_bytes())
        assert ids.shape == (h, w), rel
        assert (out / "overlays" / f"{stem}.jpg").is_file()
    # the copies keep apart; the scenes keep their COCO ids (digit stems are ids when unique: not here)
    assert (out / "panoptic" / "scenes" / "000000000001.png").is_file()
    assert (out / "panoptic" / "copy" / "000000000001.png").is_file()
    # every broken file quarantined once, with its reason
    errors = [json.loads(line) for f in (out / "errors").glob("*.jsonl") for line in f.read_text().splitlines()]
    got = {e["name"]: e["reason"] for e in errors}
    assert len(errors) == len(broken)
    assert got == {"broken/" + output_name(rel, broken): reason for rel, reason in broken.items()}
    assert all(Path(e["uri"]).name in e["message"] for e in errors)
    assert summary["quarantine_reasons"] == {r: list(broken.values()).count(r) for r in set(broken.values())}

    # a re-run does no work: nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in (out / "panoptic").rglob("*.png")}
    again = segment(model, str(src), str(out), seed=3, overlays=True, overrides=FAST, log_mlflow=False)
    assert (again["segmented"], again["quarantined"], again["already_done"]) == (0, 0, summary["found"])
    assert again["reconciles"] and {p: p.stat().st_mtime_ns for p in before} == before

    # --overwrite redoes everything, byte for byte
    first = outputs(out)
    redo = segment(model, str(src), str(out), seed=3, overlays=True, overrides=FAST, log_mlflow=False,
                   overwrite=True)
    assert redo["segmented"] == ok and outputs(out) == first


def test_pq_of_the_output_equals_evaluate(tiny_model, tmp_path, ray_session):
    from ldmseg.metrics.pq import evaluate_folders
    from pipelines.evaluate import evaluate

    model, scenes, _ = tiny_model
    out = tmp_path / "seg"
    summary = segment(model, str(Path(scenes) / "images"), str(out), seed=7, steps=2, log_mlflow=False,
                      overrides=["segment.batch_size=4", "segment.write_batch_size=2"])
    assert summary["segmented"] == summary["found"] > 0
    ours = evaluate_folders(scenes, out, class_agnostic=True)
    reference = evaluate(model, scenes, str(tmp_path / "eval"), steps=2, seed=7, log_mlflow=False)
    assert ours["n_images"] == reference["n_images"]
    assert ours["All"]["pq"] == pytest.approx(reference["pq"], abs=1e-9)
    assert ours["All"]["tp"] + ours["All"]["fp"] > 0
    # the output is a valid COCO panoptic folder with the source photos
    check = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(out), "--images",
                            str(Path(scenes) / "images"), "--json"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)["summary"]
    assert report["images"] == ours["n_images"] and report["with_problems"] == report["dataset_problems"] == 0


def test_parquet_shards_input_gives_the_folder_inputs_maps(tiny_model, tmp_path, ray_session):
    """Shards of ``ldmseg preprocess`` hold the images the folder input would prepare: the same maps."""
    from ldmseg.inputs import InputError
    from pipelines.preprocess import run_preprocess

    model, scenes, cfg = tiny_model
    shards = tmp_path / "shards"
    run_preprocess(cfg, output=str(shards), source=scenes, split="val")
    images = Path(scenes) / "images"
    from_shards = segment(model, str(shards), str(tmp_path / "a"), seed=5, steps=2, log_mlflow=False)
    from_folder = segment(model, str(images), str(tmp_path / "b"), seed=5, steps=2, log_mlflow=False)
    n = len(list(images.glob("*.jpg")))
    assert (from_shards["found"], from_shards["segmented"]) == (n, n)
    a_images, _ = listed(tmp_path / "a")
    b_images, _ = listed(tmp_path / "b")
    assert sorted(i["id"] for i in a_images) == sorted(i["id"] for i in b_images)  # COCO ids kept
    for p in sorted(images.glob("*.jpg")):
        a = decode_panoptic_png((tmp_path / "a" / "panoptic" / "val" / f"{p.stem}.png").read_bytes())
        b = decode_panoptic_png((tmp_path / "b" / "panoptic" / f"{p.stem}.png").read_bytes())
        np.testing.assert_array_equal(a, b)
    again = segment(model, str(shards), str(tmp_path / "a"), seed=5, steps=2, log_mlflow=False)
    assert (again["segmented"], again["already_done"]) == (0, n)
    # shards of another resolution are refused before any work
    manifest = json.loads((shards / "_manifest.json").read_text())
    manifest["config"]["data"]["resolution"] = cfg.data.resolution * 2
    (shards / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="data.resolution"):
        segment(model, str(shards), str(tmp_path / "c"), seed=5, steps=2, log_mlflow=False)


def test_uncertainty_maps_and_stability(tiny_model, tmp_path, ray_session):
    model, scenes, _ = tiny_model
    out = tmp_path / "unc"
    summary = segment(model, str(Path(scenes) / "images"), str(out), seed=1, steps=2, uncertainty=3,
                      log_mlflow=False, overrides=["sampling.count_th=0.0"])
    assert summary["num_samples"] == 3
    _, annotations = listed(out)
    stabilities = [s["stability"] for a in annotations for s in a["segments_info"]]
    assert stabilities and all(v in (1 / 3, 2 / 3, 1.0) for v in stabilities)
    for a in annotations:
        ids = decode_panoptic_png((out / "panoptic" / a["file_name"]).read_bytes())
        from PIL import Image

        unc = np.asarray(Image.open(out / "uncertainty" / a["file_name"]))
        assert unc.shape == ids.shape and unc.dtype == np.uint8
        assert set(np.unique(unc)) <= {0, 85, 170, 255}  # the vote: 0 to 3 of the 3 samples outvoted


def test_a_registered_model_is_pinned_to_its_version_and_the_job_logged(tiny_model, tmp_path, ray_session):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import Tracker

    model, scenes, _ = tiny_model
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_root=str(tmp_path / "artifacts"))
    assert tracker.start("models", "register")
    assert str(tracker.register(model, "tiny-ldm")) == "1"
    tracker.finish()
    out = tmp_path / "out"
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    summary = segment("models:/tiny-ldm@current", str(Path(scenes) / "images"), str(out), seed=0, steps=2,
                      overlays=True, tracking_uri=uri)
    assert (summary["model_loaded"], summary["model_version"]) == ("models:/tiny-ldm/1", "1")
    # the tracking URI was passed, not set for the rest of the process (later runs would log there)
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before
    assert summary["segmented"] == summary["found"] > 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ldmseg-segment").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["model_version"] == "1"
    assert runs[0].data.metrics["segmented"] == summary["segmented"]
    assert {"overlays.png", "_summary.json"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_s3_to_s3(tiny_model, ray_session, s3_server):
    import s3fs

    model, scenes, _ = tiny_model
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("seg-in")
    for p in sorted((Path(scenes) / "images").glob("*.jpg"))[:3]:
        fs.put_file(str(p), f"seg-in/photos/{p.name}")
    fs.pipe_file("seg-in/photos/empty.png", b"")
    summary = segment(model, "s3://seg-in/photos", "s3://seg-in/out", seed=0, steps=2, log_mlflow=False)
    assert (summary["found"], summary["segmented"], summary["quarantined"]) == (4, 3, 1)
    fs.invalidate_cache()
    assert len(fs.glob("seg-in/out/panoptic/*.png")) == 3
    doc = json.loads(fs.cat_file("seg-in/out/panoptic.json"))
    assert len(doc["annotations"]) == 3
    errors = fs.cat_file(fs.glob("seg-in/out/errors/*.jsonl")[0]).decode().splitlines()
    assert [json.loads(e)["reason"] for e in errors] == ["empty"]


def test_driver_killed_mid_run_then_rerun_completes(tiny_model, tmp_path, ray_session):
    """SIGKILL the driver (connected to the session's Ray) once some parts are written; the re-run
    finishes the rest: every image listed once, none missing."""
    model, scenes, _ = tiny_model
    src = tmp_path / "many"
    for k in range(6):
        shutil.copytree(Path(scenes) / "images", src / f"f{k}")
    total = len(list(src.rglob("*.jpg")))
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines.cli", "segment", "--model", model, "--input", str(src), "--output",
           str(out), "--address", address, "--no-mlflow", "sampling.steps=10", "segment.batch_size=2",
           "segment.write_batch_size=2"]  # 10 steps: slow enough to be killed mid-run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and len(list((out / "panoptic.parts").glob("*.json"))) < 2:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    parts_before = len(list((out / "panoptic.parts").glob("*.json")))
    assert 2 <= parts_before and not (out / "panoptic.json").exists()
    summary = segment(model, str(src), str(out), seed=0, overrides=["sampling.steps=10"], log_mlflow=False)
    assert summary["already_done"] >= 4 and summary["segmented"] + summary["already_done"] == total
    images, annotations = listed(out)
    assert len(images) == len(annotations) == total
    assert len({a["image_id"] for a in annotations}) == total
    assert len(list((out / "panoptic").rglob("*.png"))) == total


def test_on_several_nodes_local_paths_fail_before_any_task_unless_shared(tiny_model, tmp_path, tmp_path_factory,
                                                                         ray_session, monkeypatch, capsys):
    """The command's own wiring: with the cluster reporting 3 nodes (the session's Ray has one:
    ``alive_node_count`` is replaced), ``ldmseg segment`` of local folders stops right after Ray
    starts, in one line naming every folder; once they lie in LDMSEG_SHARED_PATHS it runs."""
    from pipelines import cluster_paths
    from pipelines.cli import main

    model, scenes, _ = tiny_model
    monkeypatch.setattr(cluster_paths, "alive_node_count", lambda: 3)
    monkeypatch.delenv(cluster_paths.SHARED_ENV, raising=False)
    out = tmp_path / "out"
    argv = ["segment", "--model", model, "--input", str(Path(scenes) / "images"), "--output", str(out),
            "--no-mlflow", "sampling.steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"ldmseg segment: --input {Path(scenes) / 'images'}, --output"), err
    for part in (f"--input {Path(scenes) / 'images'}", f"--output {out}", f"--model {model}", "3 nodes",
                 cluster_paths.SHARED_ENV):
        assert part in err[-1], part
    assert not (out / "panoptic.parts").exists()  # no task ran
    monkeypatch.setenv(cluster_paths.SHARED_ENV, str(tmp_path_factory.getbasetemp()))
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["segmented"] == summary["found"] > 0


def test_evaluate_on_ray_scores_the_same_predictions_as_in_process(tiny_model, tmp_path, ray_session):
    """``evaluate --on-ray`` segments through the segment pipeline's model actors, maps the
    predictions' ids back to the ground truth's, and scores exactly what in-process evaluation scores."""
    from pipelines.evaluate import evaluate

    model, scenes, _ = tiny_model
    local = evaluate(model, scenes, str(tmp_path / "local"), steps=2, seed=5, max_images=5, log_mlflow=False)
    on_ray = evaluate(model, scenes, str(tmp_path / "ray"), steps=2, seed=5, max_images=5, log_mlflow=False,
                      on_ray=True)
    assert on_ray["n_images"] == local["n_images"] == 5
    assert on_ray["class_agnostic"]["All"] == local["class_agnostic"]["All"]
    assert on_ray["sampling"] == local["sampling"] and on_ray["devices"] == {"cpu": 5}
    assert local["class_agnostic"]["All"]["tp"] + local["class_agnostic"]["All"]["fp"] > 0
