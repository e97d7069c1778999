"""Shared fixtures: paths to the real COCO samples and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real COCO samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_sample(shared_data) -> Path:
    return shared_data / "coco-panoptic-sample"


@pytest.fixture(scope="session")
def coco_val_examples(shared_data) -> Path:
    return shared_data / "coco-val-examples"


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session (start-up costs ~10 s); shut down at the end."""
    import ray

    from pipelines.ray_compat import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=2, temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    if started:
        ray.shutdown()
