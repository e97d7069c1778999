"""Ray work asks for its CPUs and GPUs (issue 6/7, item 2): on a Ray with logical GPUs each Tune trial
and each segment model actor receives its own GPU id; without GPUs they ask for none; training asks
for ``use_gpu`` exactly when the config does; an SD-sized denoiser is not sampled on CPUs unless
allowed; the flags are checked before Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest

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


SEGMENT_SCRIPT = r"""
import json, sys
import ray
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
from pipelines.segment import segment
summary = segment(sys.argv[2], sys.argv[3], sys.argv[4], log_mlflow=False, steps=2,
                  overrides=["segment.num_gpus=1", "segment.min_actors=2", "segment.max_actors=2",
                             "segment.batch_size=1", "segment.num_cpus=0.5", "segment.decode_cpus=0.5"])
print(json.dumps({"devices": summary["devices"], "segmented": summary["segmented"]}))
"""


def test_segment_actors_on_a_ray_with_logical_gpus_each_hold_their_own_gpu(tiny_model, tmp_path):
    """With ``segment.num_gpus=1`` every model actor asks Ray for a GPU and gets its own id (two
    actors, two GPUs: never both on GPU 0); the summary counts the images each device segmented."""
    model, scenes, _ = tiny_model
    with tempfile.TemporaryDirectory(prefix="ldmseg-gpus-") as tmp:
        proc = subprocess.run([sys.executable, "-c", SEGMENT_SCRIPT, tmp, model, f"{scenes}/images", str(tmp_path / "out")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["segmented"] == 6 and sum(res["devices"].values()) == 6, res
    assert set(res["devices"]) <= {"GPU 0", "GPU 1"}, res  # a GPU each, not the CPU
    assert "model actor on GPU 0" in proc.stderr and "model actor on GPU 1" in proc.stderr, proc.stderr[-3000:]


def test_without_gpus_segment_actors_run_on_the_cpu(tiny_model, tmp_path, ray_session):
    from pipelines.segment import segment

    model, scenes, _ = tiny_model
    summary = segment(model, f"{scenes}/images", str(tmp_path / "out"), log_mlflow=False, steps=2,
                      overrides=["segment.batch_size=3"])
    assert summary["devices"] == {"cpu": 6}


def test_training_asks_for_gpus_exactly_when_the_config_says_so(ray_session):
    """``train_*.use_gpu`` is what Ray Train's ScalingConfig asks for: one GPU per worker with it, none without."""
    from ldmseg.config import load_config
    from pipelines import ray_compat

    def scaling(stage_cfg):
        trainer = ray_compat.torch_trainer(
            lambda config: None, {}, name="plan", storage=tempfile.mkdtemp(prefix="ldmseg-plan-"), datasets={},
            num_workers=stage_cfg.num_workers, use_gpu=stage_cfg.use_gpu, cpus_per_worker=stage_cfg.cpus_per_worker,
            torch_threads=1, num_to_keep=1, max_failures=0)
        sc = trainer.scaling_config
        return sc.num_workers, sc.use_gpu, sc._resources_per_worker_not_none

    coco = load_config("conf/coco.yaml")
    assert scaling(coco.train_ldm) == (8, True, {"CPU": 8, "GPU": 1})
    assert scaling(coco.train_ae) == (1, True, {"CPU": 1, "GPU": 1})
    tiny = load_config("conf/tiny.yaml")
    assert tiny.train_ldm.use_gpu is False
    assert scaling(tiny.train_ldm)[1:] == (False, {"CPU": tiny.train_ldm.cpus_per_worker})


def test_an_sd_sized_denoiser_is_not_sampled_on_cpus_unless_allowed(tiny_model, ray_session):
    """Without GPUs in the cluster, a trial for a denoiser of SD's size is refused with what to do;
    ``--allow-cpu`` lets it run; the tiny model's denoiser (read from its model.json) is no problem."""
    import argparse

    from ldmseg.config import ConfigError
    from pipelines.sweeps.kit import add_trial_resources, denoiser_parameters, resources_of, trial_resources

    parser = argparse.ArgumentParser()
    add_trial_resources(parser)
    refused, allowed = resources_of(parser.parse_args([])), resources_of(parser.parse_args(["--allow-cpu"]))
    with pytest.raises(ConfigError, match=r"815 M parameters .*no GPU.*--gpus-per-trial 1.*--allow-cpu"):
        trial_resources(refused, 815_000_000)
    assert trial_resources(allowed, 815_000_000) == {"cpu": 1.0}
    small = denoiser_parameters(tiny_model[0])
    assert 0 < small < 10_000_000
    assert trial_resources(refused, small) == {"cpu": 1.0}
    assert trial_resources({**refused, "gpu": 1}, 815_000_000) == {"cpu": 1.0, "gpu": 1.0}  # a GPU is asked for
