"""Ray Train stages: DDP runs report metrics and checkpoints; resume after a killed run. (Worker loss,
S3 checkpoints and an MLflow server: tests/cluster/test_local_cluster.py, on three nodes.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paths import REPO, TINY_YAML
from helpers_coco import score_id_maps
from helpers_config import tiny_cfg, tiny_overrides
from ldmseg.data.synthetic import write_scenes

pytestmark = pytest.mark.ray

# the tiny config, in batches of 8 over shard files of 16 rows
TRAIN = ("mask_ae.num_points=256", "sampling.steps=2", "train_ae.batch_size=8", "train_ldm.batch_size=8",
         "train_ae.warmup=2", "train_ldm.warmup=2", "preprocess.rows_per_file=16")


def cfg_with(*overrides):
    return tiny_cfg(*TRAIN, *overrides)


# post-processing that keeps every argmax segment: the validation of a model trained for a few
# steps then scores predicted segments (false positives at least), not an empty map
KEEP_ALL = ["sampling.mask_th=0.0", "sampling.count_th=0.0", "sampling.overlap_th=0.0"]


def make_shards(tmp_path_factory, name: str, num_images: int, seed: int) -> str:
    """Scenes of ``seed`` preprocessed with the tiny config; → the shards folder."""
    from pipelines.preprocess import run_preprocess

    root = tmp_path_factory.mktemp(name)
    write_scenes(root / "scenes", num_images=num_images, size=32, seed=seed, max_things=4)
    run_preprocess(cfg_with(), output=str(root / "shards"), source=str(root / "scenes"))
    return str(root / "shards")


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory):
    return make_shards(tmp_path_factory, "train_data", 32, seed=11)


@pytest.fixture(scope="module")
def trained_ae(shards, tmp_path_factory):
    from pipelines.train import run_train

    run_dir = tmp_path_factory.mktemp("ae_run")
    res = run_train("ae", cfg_with("train_ae.iterations=6", "train_ae.report_every=3",
                                   "train_ae.checkpoint_every=3"), data=shards, run_dir=run_dir)
    return res


def read_model_json(model_dir) -> dict:
    return json.loads((Path(model_dir) / "model.json").read_text())


def validation_batch(shards: str, n: int, num_slots: int) -> dict:
    """The batch a stage validates on: the first ``n`` rows of the shards' val split (train if none)."""
    from ldmseg.data.manifest import list_split_files, open_fs
    from ldmseg.training.monitor import monitor_batch

    try:
        split = "val" if list_split_files(*open_fs(shards), "val") else "train"
    except FileNotFoundError:
        split = "train"
    return monitor_batch(shards, split, n, num_slots, "cpu")


def check_validation(metrics: dict, prefix: str, truth: list, preds: list, root) -> None:
    """The reported ``{prefix}_pq/sq/rq/fp_per_image`` against the predictions scored by hand
    (COCO folders through :func:`evaluate_folders`); every ground-truth segment is counted."""
    by_hand = score_id_maps(root, truth, preds)
    assert by_hand["tp"] + by_hand["fn"] == sum(len(np.unique(t[t > 0])) for t in truth) > 0
    assert by_hand["tp"] + by_hand["fp"] > 0, "no predicted segments: the comparison would prove nothing"
    for k in ("pq", "sq", "rq"):
        assert metrics[f"{prefix}_{k}"] == pytest.approx(by_hand[k], abs=1e-9), (k, metrics, by_hand)
    assert metrics[f"{prefix}_fp_per_image"] == pytest.approx(by_hand["fp"] / len(preds)), (metrics, by_hand)


def check_ae_validation(metrics: dict, model_dir, shards: str, root) -> None:
    """The saved AE reconstructs the validation batch here; its scores must be the reported ones."""
    import torch

    from ldmseg.checkpoint import load_model
    from ldmseg.data.encoding import ids_to_bits
    from ldmseg.postprocess import postprocess

    loaded = load_model(model_dir, device="cpu")
    cfg, ae = loaded.cfg, loaded.components["mask_autoencoder"].eval()
    batch = validation_batch(shards, cfg.train_ae.validate_images, cfg.data.num_slots)
    truth = torch.where(batch["valid"], batch["slot_map"], 0)
    with torch.no_grad():
        logits = ae(ids_to_bits(truth, ae.num_bits))
    th = {k: getattr(cfg.sampling, k) for k in ("mask_th", "count_th", "overlap_th")}
    preds = [postprocess(lg, valid=v, **th)[0] for lg, v in zip(logits, batch["valid"])]
    check_validation(metrics, "val_recon", list(truth.numpy()), preds, root)


def check_ldm_validation(metrics: dict, model_dir, shards: str, root) -> None:
    """The saved (EMA) model segments the validation batch here (validate_steps steps, seed i for
    image i); its scores must be the reported ones."""
    from ldmseg.data.encoding import tensor_to_image
    from ldmseg.segmenter import Segmenter

    seg = Segmenter.from_pretrained(str(model_dir), device="cpu")
    cfg = seg.cfg
    batch = validation_batch(shards, cfg.train_ldm.validate_images, cfg.data.num_slots)
    valid = batch["valid"].numpy()
    results = seg.segment([tensor_to_image(im) for im in batch["image"]], steps=cfg.train_ldm.validate_steps,
                          seed=list(range(len(valid))))
    truth = list(np.where(valid, batch["slot_map"].numpy(), 0))
    check_validation(metrics, "val", truth, [np.where(v, r.id_map, 0) for r, v in zip(results, valid)], root)


def test_two_worker_ae_and_ldm_report_metrics_and_checkpoints(shards, tmp_path, monkeypatch):
    """Also: relative data, AE and run paths (workers run in Ray's own working folder)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import run_train

    cfg = cfg_with("train_ae.iterations=4", "train_ae.report_every=2", "train_ae.checkpoint_every=2",
                   "train_ae.num_workers=2", "train_ldm.iterations=4", "train_ldm.report_every=2",
                   "train_ldm.checkpoint_every=2", "train_ldm.num_workers=2", *KEEP_ALL)
    monkeypatch.chdir(Path(shards).parent)
    ae = run_train("ae", cfg, data=Path(shards).name, run_dir=os.path.relpath(tmp_path))
    # the final validation read the (relative) data: its figures are the saved AE's on that batch
    check_ae_validation(ae.metrics, ae.model_dir, shards, tmp_path / "ae_by_hand")
    assert ae.metrics["step"] == 4 and ae.metrics["loss"] > 0
    meta = read_model_json(ae.model_dir)
    assert meta["latent_scale"] > 0 and (Path(ae.model_dir) / "mask_autoencoder.safetensors").exists()
    ldm = run_train("ldm", cfg, data=Path(shards).name, run_dir=tmp_path,
                    ae_model=os.path.relpath(ae.model_dir))
    check_ldm_validation(ldm.metrics, ldm.model_dir, shards, tmp_path / "ldm_by_hand")
    assert ldm.metrics["step"] == 4 and ldm.metrics["loss"] > 0
    assert read_model_json(ldm.model_dir)["latent_scale"] == pytest.approx(meta["latent_scale"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(ldm.mlflow_run_id, "loss")
    assert [m.step for m in history] == [2, 4]
    assert client.get_model_version_by_alias("ldmseg-ldm", "current").run_id == ldm.mlflow_run_id
    # two ranks trained: each report carries the size of the worker group that made it
    for run in (ae, ldm):
        world = client.get_metric_history(run.mlflow_run_id, "world_size")
        assert [(m.step, m.value) for m in world] == [(2, 2.0), (4, 2.0)], run.stage


def test_a_budget_stop_on_a_checkpoint_step_still_saves_a_validated_final_model(shards, tmp_path):
    """With a checkpoint after every step the time budget always ends the run on a checkpoint step,
    one saved as intermediate (not validated); the final model must still be validated and marked final."""
    from pipelines.train import run_train

    res = run_train("ae", cfg_with("train_ae.iterations=100000", "train_ae.report_every=1",
                                   "train_ae.checkpoint_every=1", "train_ae.time_budget_s=2", *KEEP_ALL),
                    data=shards, run_dir=tmp_path)
    assert 0 < res.metrics["step"] < 100000
    check_ae_validation(res.metrics, res.model_dir, shards, tmp_path / "by_hand")
    meta = read_model_json(res.model_dir)
    assert meta["step"] == res.metrics["step"] and meta["extra"]["final"] is True


@pytest.fixture(scope="module")
def other_shards(ray_session, tmp_path_factory):
    """Shards of other scenes, made with the same config as ``shards``."""
    return make_shards(tmp_path_factory, "other_data", 24, seed=12)


def checkpoint_steps(run_dir: Path, stage: str) -> list[int]:
    return sorted(read_model_json(d.parent)["step"] for d in run_dir.glob(f"ray_results/{stage}-*/checkpoint_*/model.json"))


def test_other_data_starts_a_new_run_and_checkpoints_keep_their_own_interval(shards, other_shards, tmp_path, capsys):
    """Run identity covers the data: the same command on other shards in the same --run-dir trains
    a new run from step 0 (it used to resume the finished run and return it unchanged). Checkpoints
    come every checkpoint_every steps, whatever report_every is (they used to wait for lcm of both)."""
    from pipelines.train import run_train

    cfg = cfg_with("train_ae.iterations=4", "train_ae.report_every=3", "train_ae.checkpoint_every=2",
                   "train_ae.num_to_keep=5", "train_ae.validate_images=0")
    first = run_train("ae", cfg, data=shards, run_dir=tmp_path)
    assert checkpoint_steps(tmp_path, "ae") == [2, 4]
    second = run_train("ae", cfg, data=other_shards, run_dir=tmp_path)
    assert second.run_name != first.run_name and second.run_name.rsplit("-", 1)[0] == first.run_name.rsplit("-", 1)[0]
    assert second.metrics["resumed_from"] == 0 and second.metrics["step"] == 4
    assert checkpoint_steps(tmp_path, "ae") == [2, 2, 4, 4]
    assert "used other inputs (data_fingerprint" in capsys.readouterr().err
    inputs = read_model_json(second.model_dir)["extra"]["inputs"]
    assert inputs["data"] == str(Path(other_shards).resolve()) and inputs["ae_hash"] is None


def test_another_ae_is_another_ldm_run(shards, trained_ae, tmp_path):
    """An LDM run's identity includes its AE's weights: another AE never resumes an old denoiser."""
    import shutil

    from pipelines.train import resolve_inputs, run_name

    other_ae = tmp_path / "other_ae"
    shutil.copytree(trained_ae.model_dir, other_ae)
    weights = other_ae / "mask_autoencoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # another float in the last tensor: other weights, same shapes
    weights.write_bytes(bytes(data))
    cfg = cfg_with()
    a = resolve_inputs("ldm", cfg, data=shards, ae_model=trained_ae.model_dir, run_dir=tmp_path, tracking_uri="")
    b = resolve_inputs("ldm", cfg, data=shards, ae_model=str(other_ae), run_dir=tmp_path, tracking_uri="")
    assert a.ae_hash != b.ae_hash and a.data_fingerprint == b.data_fingerprint
    assert run_name("ldm", cfg, a) != run_name("ldm", cfg, b)
    assert run_name("ldm", cfg, a) == run_name("ldm", cfg, resolve_inputs(
        "ldm", cfg, data=shards, ae_model=trained_ae.model_dir, run_dir=tmp_path, tracking_uri=""))


def test_shards_of_another_slot_count_fail_before_ray_starts(shards, tmp_path, monkeypatch):
    """Shards of 8 slots trained with data.num_slots=16 (or another resolution) fail up front,
    naming the stored value and the fix; Ray is never started."""
    from ldmseg.config import ConfigError
    from pipelines import ray_compat
    from pipelines.train import run_train

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(ray_compat, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=r"data.num_slots=8 \(this config: 16\).*pass data.num_slots=8"):
        run_train("ae", cfg_with("data.num_slots=16"), data=shards, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.resolution=32 \(this config: 64\)"):
        run_train("ae", cfg_with("data.resolution=64"), data=shards, run_dir=tmp_path)


def test_manifest_sums_the_cleaning_counts_of_its_rows(shards):
    """``_manifest.json`` carries, per split, the segments cleaning turned void, summed over the rows."""
    import pyarrow.parquet as pq

    from ldmseg.data.manifest import open_fs, read_manifest

    fs, root = open_fs(shards)
    manifest = read_manifest(fs, root)
    for split, counts in manifest.cleaned.items():
        table = pq.read_table([f"{root}/{f}" for f in manifest.files[split]], columns=list(counts))
        assert counts == {k: int(sum(table[k].to_pylist())) for k in counts}
    assert sum(sum(c.values()) for c in manifest.cleaned.values()) > 0  # these scenes have crowd and tiny segments


def test_killed_run_resumes_from_its_checkpoint(shards, ray_session, tmp_path):
    from pipelines.train import run_train

    overrides = ["train_ae.iterations=150", "train_ae.report_every=5", "train_ae.checkpoint_every=5"]
    cfg = cfg_with(*overrides)
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "ae", "--data", shards, "--config", str(TINY_YAML),
           "--run-dir", str(tmp_path), "--address", address, *tiny_overrides(*TRAIN, *overrides)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "ray_results").glob("ae-*/checkpoint_*"))) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "ray_results").glob("ae-*/checkpoint_*")), "no checkpoint before the kill"
    # the re-run of the same command resumes: its first report continues the step counter
    res = run_train("ae", cfg, data=shards, run_dir=tmp_path)
    assert res.metrics["step"] == 150
    assert res.metrics.get("resumed_from", 0) >= 5


def test_quickstart_end_to_end_with_a_tiny_budget(ray_session, tmp_path, capsys):
    """The README's command 1, shrunk: every stage runs, the summary is complete and honest, and the
    three data roles stay apart (val held out of training, test scenes of their own seed)."""
    import filecmp
    import shlex

    import pyarrow.parquet as pq

    from pipelines.cli import main
    from ldmseg.data.roles import TEST_SEED_OFFSET
    from ldmseg.metrics.pq import evaluate_folders

    work = tmp_path / "qs"
    code = main(["quickstart", "--workdir", str(work), "--num-test", "4", "synth.num_images=48",
                 "train_ae.iterations=12", "train_ae.report_every=6", "train_ae.checkpoint_every=12",
                 "train_ldm.iterations=8", "train_ldm.report_every=4", "train_ldm.checkpoint_every=8",
                 "train_ldm.batch_size=8", "train_ae.batch_size=8", "train_ldm.validate_every=4",
                 "train_ldm.validate_images=4", "train_ldm.validate_steps=2", "sampling.steps=2",
                 "preprocess.val_fraction=0.25"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    test = summary["test"]
    # the summary's PQ is the test scenes' PQ, re-computed here from the written predictions
    again = evaluate_folders(str(work / "scenes" / "test"), summary["predictions"], class_agnostic=True)
    assert test["n_images"] == 4 and (test["tp"], test["fp"], test["fn"]) == (
        again["All"]["tp"], again["All"]["fp"], again["All"]["fn"])
    assert test["pq"] == pytest.approx(again["All"]["pq"]) and test["seed"] == 0 + TEST_SEED_OFFSET
    assert summary["ldm"]["steps"] == 8 and summary["ae"]["steps"] == 12
    assert summary["ldm"]["steps_per_s"] > 0 and not summary["ldm"]["stopped_by_time_budget"]
    assert set(summary["ldm"]["validation"]) == {"val_pq", "val_sq", "val_rq"}
    assert f"PQ {100 * test['pq']:.1f}" in printed and Path(summary["model"], "model.json").is_file()
    assert (work / "overlays.png").stat().st_size > 1000
    assert {"synth", "preprocess", "train_ae", "train_ldm", "evaluate", "total"} <= set(summary["timings_s"])
    # the validation split is held out of training
    def ids(split):
        return {i for f in (work / "shards" / split).glob("*.parquet") for i in pq.read_table(f)["image_id"].to_pylist()}
    train_ids, val_ids = ids("train"), ids("val")
    assert val_ids and train_ids and not train_ids & val_ids and len(train_ids | val_ids) == 48
    # the printed synth command makes the same test scenes again
    words = shlex.split(test["scenes"])
    assert words[:2] == ["ldmseg", "synth"]
    words[2] = str(tmp_path / "again")
    assert main(words[1:]) == 0
    same = filecmp.dircmp(work / "scenes" / "test" / "images", tmp_path / "again" / "images")
    assert same.left_list and not same.diff_files and not same.left_only
    assert (work / "scenes" / "test" / "panoptic.json").read_bytes() == (tmp_path / "again" / "panoptic.json").read_bytes()


def test_on_several_nodes_a_registered_ae_goes_to_the_workers_and_local_storage_fails_first(
        trained_ae, shards, tmp_path, tmp_path_factory, monkeypatch, capfd):
    """The command's own wiring, the cluster reporting 3 nodes (``alive_node_count`` replaced; the
    session's Ray has one): the default storage RUN_DIR/ray_results fails before any worker starts;
    with the folders declared shared, the workers get ``--ae models:/...`` pinned to its version
    and download it themselves."""
    from ldmseg.checkpoint import weights_hash
    from ldmseg.config import ConfigError
    from pipelines import cluster_paths
    from pipelines.train import run_train

    monkeypatch.setattr(cluster_paths, "alive_node_count", lambda: 3)
    monkeypatch.delenv(cluster_paths.SHARED_ENV, raising=False)
    uri = f"sqlite:///{Path(trained_ae.model_dir).parents[1] / 'mlflow.db'}"  # where the AE stage registered it
    cfg = cfg_with("train_ldm.iterations=2", "train_ldm.report_every=2", "train_ldm.checkpoint_every=2",
                   "train_ldm.num_workers=2")
    with pytest.raises(ConfigError) as info:
        run_train("ldm", cfg, data=shards, run_dir=tmp_path, ae_model="models:/ldmseg-ae@current", tracking_uri=uri)
    message = str(info.value)
    for part in (f"--storage {tmp_path / 'ray_results'}", "--data", "3 nodes", "s3://", "--tracking-uri http://"):
        assert part in message, part
    assert not (tmp_path / "ray_results").exists()
    monkeypatch.setenv(cluster_paths.SHARED_ENV, str(tmp_path_factory.getbasetemp()))
    res = run_train("ldm", cfg, data=shards, run_dir=tmp_path, ae_model="models:/ldmseg-ae@current", tracking_uri=uri)
    assert res.metrics["step"] == 2
    version = re.search(r"every worker downloads the AE (models:/ldmseg-ae/\d+) itself", capfd.readouterr().err)
    assert version, "the workers were handed the driver's download, not the pinned URI"
    assert weights_hash(res.model_dir) == weights_hash(trained_ae.model_dir)
