"""Paths Ray workers on other nodes can reach (pipelines/cluster_paths.py), and the pre-flight
checks of the commands that hand paths to workers, called with a node count (no Ray here; a real
multi-node cluster runs them through the commands themselves)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers_cli import TINY_MODEL
from helpers_config import tiny_cfg
from ldmseg.config import ConfigError
from pipelines import cluster_paths
from pipelines.cluster_paths import (require_reachable, shared_prefixes, tracking_uri_reachable,
                                     worker_reachable)

SHARED = cluster_paths.SHARED_ENV


@pytest.fixture(autouse=True)
def nothing_shared(monkeypatch):
    """Each test starts without declared shared folders or an MLflow URI from the environment."""
    monkeypatch.delenv(SHARED, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def share(monkeypatch, *folders: Path | str) -> None:
    monkeypatch.setenv(SHARED, os.pathsep.join(str(f) for f in folders))


def raised(paths: dict, nodes: int = 3, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        require_reachable(paths, nodes, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The pure rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://bucket/shards", "gs://b/x", "abfs://c@acct.dfs.core.windows.net/x",
                                 "hdfs://namenode:8020/data", "http://host/x.jpg", "https://host/x", "models:/m/3",
                                 "runs:/abc123/model", "mlflow-artifacts:/0/abc/artifacts"])
def test_urls_are_reachable_everywhere(url):
    assert worker_reachable(url)


@pytest.mark.parametrize("path", ["runs/shards", "/tmp/x", "file:///tmp/x", "file:/tmp/x", "a:b/c"])
def test_local_paths_are_not_reachable_without_a_shared_folder(path):
    assert not worker_reachable(path)


def test_shared_prefixes_by_path_components_not_strings(tmp_path, monkeypatch):
    shared, sibling, other = tmp_path / "nfs", tmp_path / "nfs2", tmp_path / "other"
    for folder in (shared, sibling, other):
        folder.mkdir()
    share(monkeypatch, shared, other / "deep")
    assert shared_prefixes() == [str(shared.resolve()), str((other / "deep").resolve())]
    assert worker_reachable(str(shared))
    assert worker_reachable(str(shared / "data" / "x.parquet"))
    assert worker_reachable((shared / "data").as_uri())  # file:// URL
    assert not worker_reachable(str(sibling / "data"))  # /…/shared2 is not under /…/shared
    assert not worker_reachable(str(other))
    assert not worker_reachable(str(shared / ".." / "other"))  # resolved before comparing
    monkeypatch.chdir(shared)
    assert worker_reachable("runs/data")  # relative to this process's folder, in the shared one


def test_a_symlink_into_a_shared_folder_counts_as_shared(tmp_path, monkeypatch):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "mnt")
    share(monkeypatch, tmp_path / "mnt")
    assert worker_reachable(str(tmp_path / "link" / "shards"))


def test_shared_prefixes_skip_empty_entries_and_refuse_relative_ones(tmp_path, monkeypatch):
    share(monkeypatch, "", tmp_path, "")
    assert shared_prefixes() == [str(tmp_path.resolve())]
    share(monkeypatch, tmp_path, "mnt/shared")
    with pytest.raises(ConfigError, match="mnt/shared.*not an absolute folder"):
        shared_prefixes()


@pytest.mark.parametrize("uri", ["http://mlflow:5000", "https://mlflow.example.com", "databricks",
                                 "databricks://profile", "postgresql://user@db.internal:5432/mlflow",
                                 "mysql+pymysql://u@db/mlflow"])
def test_tracking_servers_and_databases_with_a_host_are_reachable(uri):
    assert tracking_uri_reachable(uri)


@pytest.mark.parametrize("uri", [None, "", "sqlite:////tmp/run/mlflow.db", "sqlite:///mlflow.db",
                                 "sqlite:///:memory:", "file:///tmp/mlruns", "mlruns", "postgresql:///mlflow"])
def test_local_tracking_stores_are_not_reachable(uri):
    assert not tracking_uri_reachable(uri)


def test_a_sqlite_or_file_store_in_a_shared_folder_is_reachable(tmp_path, monkeypatch):
    share(monkeypatch, tmp_path / "nfs")
    assert tracking_uri_reachable(f"sqlite:///{tmp_path / 'nfs' / 'mlflow.db'}")
    assert tracking_uri_reachable((tmp_path / "nfs" / "mlruns").as_uri())
    assert not tracking_uri_reachable(f"sqlite:///{tmp_path / 'shared2' / 'mlflow.db'}")


def test_one_node_checks_nothing():
    require_reachable({"--data": "runs/shards"}, 1, tracking_uri="sqlite:////x/mlflow.db", tracking_users="trials")


def test_the_message_names_flag_path_node_count_and_the_fix(tmp_path):
    message = raised({"--data": str(tmp_path), "--ae": None, "--model": "s3://b/m"}, 3, what="ldmseg train ae: ")
    assert message.startswith(f"ldmseg train ae: --data {tmp_path} is a folder on this machine only")
    assert "the Ray cluster has 3 nodes" in message
    assert "s3://" in message and f"{SHARED}=/mnt/shared" in message
    assert "--ae" not in message and "--model" not in message  # None skipped, URL reachable


def test_every_offender_is_named_and_the_declared_folders_shown(tmp_path, monkeypatch):
    share(monkeypatch, tmp_path / "nfs")
    message = raised({"--data": "runs/shards", "--storage": "/x/ray_results", "--output": "s3://b/o"}, 4)
    assert "--data runs/shards, --storage /x/ray_results are on this machine only" in message
    assert "4 nodes" in message and str(tmp_path / "nfs") in message


def test_a_flag_that_takes_no_url_is_told_to_use_a_shared_folder_only():
    message = raised({"--output": "/x/sweep"}, 2, local_only=("--output",))
    assert "--output /x/sweep" in message and SHARED in message and "s3://" not in message


def test_an_unreachable_mlflow_store_says_to_pass_a_tracking_server(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    message = raised({"--data": "s3://b/shards"}, 3, tracking_uri=uri, tracking_users="Tune trials")
    assert uri in message and "Tune trials" in message and "--tracking-uri http://MLFLOW:5000" in message
    assert "MLFLOW_TRACKING_URI" in message and "--data" not in message
    require_reachable({"--data": "s3://b/shards"}, 3, tracking_uri=uri)  # nobody on the workers uses it


def test_alive_node_count_counts_alive_nodes_only(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}, {"Alive": True}])
    assert cluster_paths.alive_node_count() == 2


# --------------------------------------------------------------------------------------------
# The commands' pre-flight checks, with the node count Ray would report
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory) -> str:
    from ldmseg.checkpoint import build_components, save_model

    cfg = tiny_cfg(*TINY_MODEL)
    folder = tmp_path_factory.mktemp("ae") / "ae"
    save_model(folder, cfg, build_components(cfg), latent_scale=1.0, extra={"stage": "ae", "step": 0})
    return str(folder)


@pytest.fixture
def plain_shards(tmp_path) -> str:
    """Shards as training finds them: a train/ folder of Parquet files (no manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "shards" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": [1]}), tmp_path / "shards" / "train" / "a.parquet")
    return str(tmp_path / "shards")


def test_train_on_three_nodes_needs_shared_data_storage_ae_and_a_tracking_server(plain_shards, ae_folder,
                                                                                  tmp_path, monkeypatch):
    from pipelines.train import cluster_check
    from pipelines.train_inputs import resolve_inputs

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    inputs = resolve_inputs("ldm", tiny_cfg(*TINY_MODEL), data=plain_shards, ae_model=ae_folder, run_dir=run_dir,
                            tracking_uri=uri)
    storage = str(run_dir / "ray_results")  # the default, RUN_DIR/ray_results
    with pytest.raises(ConfigError) as info:
        cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=3)
    message = str(info.value)
    for part in (f"--data {plain_shards}", f"--storage {storage}", f"--ae {ae_folder}", "3 nodes",
                 "--data s3://", SHARED, uri, "--tracking-uri http://MLFLOW:5000"):
        assert part in message, part
    assert cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=1) == ae_folder
    share(monkeypatch, tmp_path, Path(ae_folder).parent)
    assert cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=3) == ae_folder
    with pytest.raises(ConfigError, match="--storage /elsewhere/ray_results is a folder"):
        cluster_check(inputs, storage="/elsewhere/ray_results", tracking_uri=uri, nodes=3)


def test_a_registered_ae_goes_to_the_workers_as_its_pinned_uri_on_several_nodes(plain_shards, ae_folder, tmp_path,
                                                                               monkeypatch):
    """One node: the driver's download; several: ``models:/NAME/VERSION``, which a worker downloads
    itself (``train_worker.create_state``, run here as a worker would) to the same weights."""
    import torch

    from pipelines.tracking import Tracker
    from pipelines.train import cluster_check
    from pipelines.train_inputs import resolve_inputs
    from pipelines.train_worker import create_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_root=(tmp_path / "artifacts").as_uri())
    assert tracker.start("models", "register")
    assert str(tracker.register(ae_folder, "tiny-ae")) == "1"
    cfg = tiny_cfg(*TINY_MODEL)
    inputs = resolve_inputs("ldm", cfg, data=plain_shards, ae_model="models:/tiny-ae@current",
                            run_dir=tmp_path / "run", tracking_uri=uri)
    assert inputs.ae_source == "models:/tiny-ae/1" and Path(inputs.ae_model).is_dir()
    share(monkeypatch, tmp_path)
    storage = str(tmp_path / "run" / "ray_results")
    assert cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=1) == inputs.ae_model
    handed = cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=3)
    assert handed == "models:/tiny-ae/1"
    state = create_state("ldm", cfg, handed, uri, "cpu")
    from ldmseg.checkpoint import load_model

    expected = load_model(ae_folder).components["mask_autoencoder"].state_dict()
    for name, tensor in state.components.mask_ae.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    monkeypatch.delenv(SHARED)
    with pytest.raises(ConfigError, match="every worker, for --ae"):
        cluster_check(inputs, storage="s3://b/ray", tracking_uri=uri, nodes=3)


def test_an_s3_ae_folder_is_hashed_and_checked_where_it_is(plain_shards, ae_folder, tmp_path, s3_server):
    import s3fs

    from ldmseg.checkpoint import weights_hash
    from pipelines.train import cluster_check
    from pipelines.train_inputs import resolve_inputs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("cluster-ae")
    fs.put(ae_folder, "cluster-ae/models/ae", recursive=True)
    url = "s3://cluster-ae/models/ae"
    assert weights_hash(url) == weights_hash(ae_folder)
    inputs = resolve_inputs("ldm", tiny_cfg(*TINY_MODEL), data=plain_shards, ae_model=url, run_dir=tmp_path / "run",
                            tracking_uri="http://mlflow:5000")
    assert (inputs.ae_model, inputs.ae_source, inputs.ae_hash) == (url, url, weights_hash(ae_folder))
    with pytest.raises(ConfigError) as info:
        cluster_check(inputs, storage="s3://cluster-ae/ray", tracking_uri="http://mlflow:5000", nodes=3)
    assert "--data" in str(info.value) and "--ae" not in str(info.value) and "MLflow" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no-model"):
        weights_hash("s3://cluster-ae/no-model")


def test_preprocess_on_three_nodes(tmp_path):
    from pipelines.preprocess import cluster_check

    with pytest.raises(ConfigError) as info:
        cluster_check(output=str(tmp_path / "out"), source=None, images="s3://b/val2017", masks=str(tmp_path / "m"),
                      nodes=3)
    message = str(info.value)
    assert message.startswith(f"--masks {tmp_path / 'm'}, --output") and "3 nodes" in message
    assert f"--output {tmp_path / 'out'}" in message and "--images" not in message
    cluster_check(output="s3://b/shards", source="s3://b/coco", images=None, masks=None, nodes=3)


def test_segment_on_three_nodes(ae_folder, tmp_path):
    from pipelines.segment import cluster_check

    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(ConfigError) as info:
        cluster_check(source=str(photos), output=str(tmp_path / "out"), model=ae_folder, tracking_uri=None, nodes=3,
                      read=[str(photos / "a.jpg")])
    message = str(info.value)
    for part in (f"--input {photos}", f"--output {tmp_path / 'out'}", f"--model {ae_folder}", "3 nodes"):
        assert part in message, part
    # a list file: the folders of the images it lists are what the tasks read
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'a.jpg'}\n")
    with pytest.raises(ConfigError, match=f"--input {listing}: the images in {photos} is a folder"):
        cluster_check(source=str(listing), output="s3://b/out", model="s3://b/m", tracking_uri=None, nodes=3,
                      read=[str(photos / "a.jpg")])
    cluster_check(source=str(listing), output="s3://b/out", model="s3://b/m", tracking_uri=None, nodes=3,
                  read=["s3://b/photos/a.jpg"])
    # a registered model is loaded by each actor: through a tracking server, not a local store
    with pytest.raises(ConfigError, match="no MLflow tracking URI is set.*model actors"):
        cluster_check(source="s3://b/in", output="s3://b/out", model="models:/m/2", tracking_uri=None, nodes=3,
                      read=[])
    cluster_check(source="s3://b/in", output="s3://b/out", model="models:/m/2", tracking_uri="http://mlflow:5000",
                  nodes=3, read=[])


def test_serve_on_three_nodes(ae_folder):
    from pipelines.serve import cluster_check

    with pytest.raises(ConfigError, match=f"^--model {ae_folder} is a folder on this machine only"):
        cluster_check(ae_folder, None, 3)
    with pytest.raises(ConfigError, match="sqlite:////x/mlflow.db is on this machine only.*replicas"):
        cluster_check("models:/m/2", "sqlite:////x/mlflow.db", 3)
    cluster_check("models:/m/2", "http://mlflow:5000", 3)
    cluster_check("s3://b/models/ldm", None, 3)
    cluster_check(ae_folder, None, 1)


def test_sweeps_on_three_nodes(tmp_path, monkeypatch):
    from ldmseg.evaluation import GroundTruth
    from pipelines.sweeps.kit import cluster_check, ground_truth_paths

    out, coco = tmp_path / "sweep", tmp_path / "coco"
    gt = GroundTruth(root=str(coco), images=str(coco / "images"), masks="s3://b/panoptic", json_path=None)
    paths = ground_truth_paths(str(coco), gt)
    assert paths == {"--data": str(coco), f"--data {coco}: its ground truth images": str(coco / "images"),
                     f"--data {coco}: its ground truth masks": "s3://b/panoptic"}
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.raises(ConfigError) as info:
        cluster_check({"--model": "s3://b/m", **paths}, out=out, tracking_uri=uri, nodes=3)
    message = str(info.value)
    assert message.startswith(f"--output {out}, --data {coco}, ")
    assert "Tune trials" in message and "--tracking-uri http://MLFLOW:5000" in message
    assert "--model" not in message and "s3://b/panoptic" not in message
    share(monkeypatch, tmp_path)
    cluster_check({"--model": "s3://b/m", **paths}, out=out, tracking_uri=uri, nodes=3)
