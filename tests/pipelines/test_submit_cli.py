"""``ldmseg submit`` and ``ldmseg job``: their checks (before any cluster is contacted) and the job
they would submit. Submitting to a real cluster: tests/cluster/test_local_cluster.py."""

from __future__ import annotations

import pytest

from helpers_cli import fails
from helpers_net import free_port
from paths import REPO
from pipelines.submit import UPLOAD_EXCLUDES, forwarded_env, job_spec, source_tree


@pytest.fixture
def no_cluster(monkeypatch):
    """Contacting a cluster fails the test: every check must come before."""
    import pipelines.jobs

    def fail(address):
        raise AssertionError(f"the job API at {address} was contacted before the arguments were checked")

    monkeypatch.setattr(pipelines.jobs, "client", fail)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")


@pytest.mark.parametrize("argv, names", [
    (["submit", "preprocess", "--source", "s3://b/x", "--output", "s3://b/y", "--splt", "val"], ["--splt"]),
    (["submit", "train", "aee", "--data", "s3://b/shards"], ["aee"]),
    (["submit", "train", "ae"], ["--data"]),
    (["submit", "no-such-command"], ["no-such-command", "preprocess"]),
    (["submit", "serve", "--model", "m"], ["serve", "infra/serve/ldmseg.yaml"]),
    (["submit", "--address", "127.0.0.1:6379", "preprocess", "--output", "x"], ["127.0.0.1:6379", "http://HEAD:8265"]),
    (["submit", "--cpus", "-1", "preprocess", "--output", "x"], ["--cpus"]),
    (["submit", "--working-dir", "/", "preprocess", "--output", "x"], ["--working-dir", "pipelines/cli.py"]),
    (["job", "status"], ["job id"]),
])
def test_bad_arguments_fail_in_one_line_before_any_cluster_is_contacted(argv, names, no_cluster, capsys):
    fails(argv, capsys, *names)


def test_without_an_address_it_says_how_to_give_one(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fails(["submit", "preprocess", "--output", "x"], capsys, "--address", "RAY_ADDRESS")


def test_an_unreachable_cluster_is_one_line_naming_the_address(monkeypatch, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    fails(["job", "list"], capsys, address, "cluster up")


def test_the_job_runs_the_uploaded_tree_with_the_forwarded_environment():
    tree = source_tree(None)
    assert tree == REPO
    env = forwarded_env({"AWS_ENDPOINT_URL": "http://s3", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                         "HF_HUB_OFFLINE": "1", "LDMSEG_SHARED_PATHS": "/mnt/shared", "HOME": "/root",
                         "PATH": "/usr/bin", "RAY_ADDRESS": "http://head:8265"})
    assert env == {"AWS_ENDPOINT_URL": "http://s3", "HF_HUB_OFFLINE": "1", "LDMSEG_SHARED_PATHS": "/mnt/shared",
                   "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    spec = job_spec("train", ["ae", "--data", "s3://b/my shards"], tree=tree, cpus=1, gpus=0.5, env=env)
    assert spec["entrypoint"] == "python -m pipelines.cli train ae --data 's3://b/my shards'"
    assert spec["runtime_env"] == {"env_vars": env, "working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES}
    assert {"runs/", ".venv/", ".git/"} <= set(UPLOAD_EXCLUDES)
    assert (spec["entrypoint_num_cpus"], spec["entrypoint_num_gpus"]) == (1, 0.5)
    installed = job_spec("segment", ["--model", "m"], tree=None, cpus=0, gpus=0, env={})
    assert installed == {"entrypoint": "ldmseg segment --model m", "runtime_env": None, "entrypoint_num_cpus": 0}


def test_the_upload_leaves_out_runs_venv_and_git(tmp_path):
    """Ray's own packaging, with our excludes, over a tree that has the folders to leave out."""
    from ray._private.runtime_env.packaging import _get_excludes, _dir_travel

    for part in ("pipelines/cli.py", "conf/tiny.yaml", "runs/big/model.safetensors", ".venv/bin/python",
                 ".git/HEAD", "tests/data/x.png", "pipelines/__pycache__/cli.cpython-311.pyc"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("x")
    seen: list[str] = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, UPLOAD_EXCLUDES)],
                lambda p: seen.append(p.relative_to(tmp_path).as_posix()) if p.is_file() else None,
                include_gitignore=False)
    assert sorted(seen) == ["conf/tiny.yaml", "pipelines/cli.py"]
