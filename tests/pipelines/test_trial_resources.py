"""Tune trials ask Ray for their CPUs and GPUs (issue 6/7, item 2): on a Ray with logical GPUs each
trial receives its own GPU id; without GPUs a trial asks for none; the flags are checked before Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from helpers_cli import fails
from paths import REPO

SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import ray
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
from ray import tune
from pipelines.sweeps.kit import make_tuner, trial_resources

def trial(config):
    import time
    from pipelines.ray_compat import worker_threads
    time.sleep(2)  # the two trials overlap
    tune.report({"score": 1.0, "gpus": ",".join(str(g) for g in ray.get_gpu_ids()), "threads": worker_threads()})

out = Path(tempfile.mkdtemp())
tuner = make_tuner(trial, {"x": tune.grid_search([0, 1])}, out, "gpus", metric="score", max_concurrent=2)
grid = tuner.fit()
print(json.dumps({"default": trial_resources(None), "asked": trial_resources({"cpu": 1, "gpu": 0.5}),
                  "gpus": sorted(r.metrics["gpus"] for r in grid), "threads": [r.metrics["threads"] for r in grid]}))
"""


def test_trials_on_a_ray_with_logical_gpus_each_get_their_own_gpu():
    with tempfile.TemporaryDirectory(prefix="ldmseg-gpus-") as tmp:  # short: Ray's socket paths have a limit
        proc = subprocess.run([sys.executable, "-c", SCRIPT, tmp], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["default"] == {"cpu": 1.0, "gpu": 1.0}  # the cluster has GPUs: one per trial by default
    assert res["asked"] == {"cpu": 1.0, "gpu": 0.5}
    assert res["gpus"] == ["0", "1"], res  # two overlapping trials, one GPU each, not both on cuda:0
    assert res["threads"] == [1, 1]


def test_without_gpus_a_trial_asks_for_none(ray_session):
    from pipelines.sweeps.kit import trial_resources

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert trial_resources(None) == {"cpu": 1.0}
    assert trial_resources({"cpu": 2, "gpu": None}) == {"cpu": 2.0}


def test_bad_trial_resources_fail_before_ray(tiny_model, capsys, monkeypatch):
    from pipelines import ray_compat

    model, scenes, _ = tiny_model
    monkeypatch.setattr(ray_compat, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    fails(["tune", "sampling", "--model", model, "--data", scenes, "--cpus-per-trial", "0"], capsys, "--cpus-per-trial")
    fails(["tune", "inpainting", "--model", model, "--data", scenes, "--gpus-per-trial", "-1"], capsys,
          "--gpus-per-trial")
