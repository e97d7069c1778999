"""Session fixtures: paths to the real COCO samples (tests/data/coco) and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers_net import free_port, wait_http
from paths import COCO_DATA

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def coco_folder(name: str = "") -> Path:
    """A folder of the real COCO samples that ship with the tests (tests/data/coco/README.md).

    A missing folder is an error, not a skip: a test that reads real data must not pass silently
    on a checkout without it.
    """
    path = COCO_DATA / name if name else COCO_DATA
    if not path.is_dir():
        pytest.fail(f"real COCO samples missing: {path} is not a folder (they ship with the "
                    f"repository in tests/data/coco)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def coco_data() -> Path:
    return coco_folder()


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    return coco_folder("coco-panoptic-sample")


@pytest.fixture(scope="session")
def coco_val_examples() -> Path:
    return coco_folder("coco-val-examples")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, s3_server):
    """One local Ray for the whole session (start-up costs ~10 s); shut down at the end.

    Starts after the S3 server so that Ray's workers inherit its endpoint and credentials.
    """
    import ray

    from pipelines.ray_compat import init_ray

    started = not ray.is_initialized()
    # 4 logical CPUs on 2 cores: two 1-CPU training workers leave room for Ray Data's tasks
    init_ray(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto_server) on a free 127.0.0.1 port, stopped by its PID.

    Sets ``AWS_ENDPOINT_URL`` and dummy credentials for this process (inherited by local Ray
    workers started afterwards) and yields the endpoint URL.
    """
    import shutil
    import signal
    import subprocess
    import sys

    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_http(endpoint + "/", timeout=30)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free 127.0.0.1 port (sqlite store), stopped by its PID."""
    import signal
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", timeout=120)
        yield uri
    finally:
        # the server runs gunicorn/uvicorn children in its own session: signal that group only
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
