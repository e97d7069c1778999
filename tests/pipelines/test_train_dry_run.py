"""``ldmseg train ae|ldm ... --dry-run`` (pipelines/train_plan.py): the plan is printed, nothing is
trained, no local Ray starts, and what would fail exits 1 with every problem marked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from helpers_cli import fails, no_ray  # noqa: F401 - fixture
from helpers_preprocess import encode_records
from paths import COCO_YAML, REPO, TINY_YAML
from pipelines.cli import main
from pipelines.train_plan import (FREE_SPACE_SLACK, PROBLEM, DiskNeed, Resources, TrainPlan, disk_checks,
                                  pretrained_line, resource_lines)
from ldmseg.config import load_config, to_dict

# conf/coco.yaml read against the tiny shards (64 px, 32 slots); the model is coco's
COCO_ON_TINY_SHARDS = ["data.resolution=64", "data.num_slots=32"]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Real shards of the tiny config without Ray: 4 synthetic scenes encoded as one preprocessing
    task encodes them, one Parquet file, a complete manifest."""
    from ldmseg.data import coco
    from ldmseg.data.manifest import SCHEMA_VERSION, Manifest, open_fs, write_manifest
    from ldmseg.data.synthetic import write_scenes

    root = tmp_path_factory.mktemp("dry_run")
    cfg = load_config(TINY_YAML)
    write_scenes(root / "scenes", num_images=4, size=64, seed=3)
    table = encode_records(coco.load_coco_panoptic(root / "scenes").records, cfg, root / "staging")
    (root / "shards" / "train").mkdir(parents=True)
    pq.write_table(table, root / "shards" / "train" / "part-0.parquet")
    fs, path = open_fs(str(root / "shards"))
    write_manifest(fs, path, Manifest(SCHEMA_VERSION, "test", str(root / "scenes"), "test", inputs=4,
                                      written={"train": 4}, files={"train": ["train/part-0.parquet"]},
                                      config={"data": to_dict(cfg)["data"]}, complete=True))
    return str(root / "shards")


@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory) -> str:
    """A model folder holding a (random) mask AE of coco's shape."""
    from ldmseg.checkpoint import save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    cfg = load_config(COCO_YAML, COCO_ON_TINY_SHARDS)
    folder = tmp_path_factory.mktemp("ae") / "ae"
    save_model(folder, cfg, {"mask_autoencoder": MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)},
               latent_scale=1.0, extra={"stage": "ae", "step": 5})
    return str(folder)


def cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """``ldmseg ARGV`` in a subprocess, with no Ray address (a dry run then reads this machine)."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", RAY_AUTH_MODE="disabled", **env)
    ldmseg = Path(sys.executable).parent / "ldmseg"
    return subprocess.run([str(ldmseg), *argv], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def plan_lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith(status + " ")]


def test_tiny_plan_passes_and_trains_nothing(shards, tmp_path):
    run_dir = tmp_path / "run"
    res = cli("train", "ae", "--data", shards, "--config", str(TINY_YAML), "--run-dir", str(run_dir), "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for section in ("[paths]", "[resources]", "[memory]", "[disk]", "[pretrained]"):
        assert section in out
    assert "1 train file" in out and "this machine" in out and "mixed_precision no -> no on cpu" in out
    assert "no problem found" in out and not plan_lines(out, PROBLEM)
    assert not run_dir.exists()  # no run folder, no MLflow store, no checkpoint: nothing ran
    assert "Started a local Ray instance" not in res.stderr


@pytest.mark.skipif(GPUS > 0, reason="needs a machine without a GPU")
def test_coco_ldm_plan_on_a_machine_without_gpus_fails_naming_each_problem(shards, ae_folder, tmp_path):
    """conf/coco.yaml's LDM stage here: 8 GPU workers of 8 CPUs, Stable Diffusion from the hub
    (offline, not cached) and a local image encoder folder that does not exist."""
    run_dir = tmp_path / "run"
    res = cli("train", "ldm", "--data", shards, "--config", str(COCO_YAML), "--ae", ae_folder,
              "--run-dir", str(run_dir), "--dry-run", *COCO_ON_TINY_SHARDS,
              "image_encoder.pretrained=" + str(tmp_path / "sd15"),
              HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    problems = plan_lines(out, PROBLEM)
    labels = [line.split()[1] for line in problems]
    assert labels == ["CPUs", "GPUs", "image_encoder", "denoiser"], out
    assert "train_ldm.use_gpu=true" in problems[1] and "no GPU is visible" in out
    assert f"local folder {tmp_path / 'sd15' / 'vae'}" in problems[2]
    assert "HF_HUB_OFFLINE" in problems[3]
    assert "4 problems" in out.splitlines()[-1]
    # the whole plan was printed, problems or not
    for section in ("[paths]", "[resources]", "[memory]", "[disk]", "[pretrained]"):
        assert section in out
    assert "ok      AE model" in out and "step 5" in out
    # the memory line: 4 bytes a weight of the three modules; gradient, 2 AdamW moments, EMA shadow
    # and DDP bucket per trainable parameter; a GradScaler (tests/ldmseg/commands/test_model_summary.py)
    gpu_bytes = 4 * (2_023_208 + 83_653_863 + 815_556_484) + 20 * 813_505_924 + 8
    assert f"{gpu_bytes / 2**30:,.2f} GiB fixed + activations (excluded" in out
    assert "denoiser.safetensors" in out and "trainer_state.pt" in out
    assert not run_dir.exists()


@pytest.fixture
def no_ray_here(no_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield


def dry_run_with_one_problem(shards, tmp_path, capsys, override: str) -> tuple[str, str]:
    """``ldmseg train ae --dry-run OVERRIDE`` on the tiny shards: it exits 1 with one problem → (output, problem)."""
    code = main(["train", "ae", "--data", shards, "--config", str(TINY_YAML), "--run-dir", str(tmp_path / "r"),
                 "--dry-run", override])
    out = capsys.readouterr().out
    assert code == 1
    (problem,) = plan_lines(out, PROBLEM)
    return out, problem


@pytest.mark.skipif(GPUS > 0, reason="needs a machine without a GPU")
def test_use_gpu_without_a_gpu_exits_1_after_the_whole_plan(shards, tmp_path, capsys, no_ray_here):
    out, problem = dry_run_with_one_problem(shards, tmp_path, capsys, "train_ae.use_gpu=true")
    assert "GPUs" in problem and "train_ae.use_gpu=true" in problem and "no GPU is visible" in out
    assert "set train_ae.use_gpu=false" in out
    assert out.splitlines()[-1].startswith("dry run: 1 problem")


def test_shards_of_another_data_config_are_a_problem(shards, tmp_path, capsys, no_ray_here):
    out, problem = dry_run_with_one_problem(shards, tmp_path, capsys, "data.num_slots=16")
    assert "data" in problem and "data.num_slots=32" in out


def test_bad_arguments_stay_one_line_and_exit_2(shards, tmp_path, capsys, no_ray_here):
    fails(["train", "ae", "--data", str(tmp_path / "missing"), "--config", str(TINY_YAML), "--dry-run"], capsys,
          "--data", str(tmp_path / "missing"))
    fails(["train", "ldm", "--data", shards, "--config", str(TINY_YAML), "--dry-run"], capsys, "--ae")
    fails(["train", "ae", "--data", shards, "--config", str(TINY_YAML), "--dry-run", "train_ae.nope=1"],
          capsys, "train_ae.nope")


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_free_space_check_adds_up_needs_on_one_filesystem(tmp_path):
    (tmp_path / "a").mkdir()
    budget = 1000 + FREE_SPACE_SLACK  # a tiny fake disk: 1000 bytes beyond the slack
    ok = disk_checks([DiskNeed("staging", str(tmp_path / "a"), 500, "x")], usage=lambda p: _Usage(budget))
    assert [line.status for line in ok] == ["ok"] and "needs" in ok[0].text
    # each fits alone, not both: the two folders share one filesystem (b does not exist yet)
    both = disk_checks([DiskNeed("staging", str(tmp_path / "a"), 500, "x"),
                        DiskNeed("storage", str(tmp_path / "b" / "c"), 500, "y")], usage=lambda p: _Usage(budget))
    assert [line.status for line in both] == [PROBLEM, PROBLEM]
    assert "with storage on the same filesystem" in both[0].text and "checkpoint_dir" in both[0].fix
    # the real disk: one byte fits, more than is free does not
    free = shutil.disk_usage(tmp_path).free
    assert disk_checks([DiskNeed("run dir", str(tmp_path), 1, "z")])[0].status == "ok"
    assert disk_checks([DiskNeed("run dir", str(tmp_path), free + 1, "z")])[0].status == PROBLEM


def test_pretrained_sources(tmp_path, monkeypatch):
    unet = tmp_path / "sd" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    line = pretrained_line("denoiser", str(tmp_path / "sd"), "unet", "-")
    assert line.status == PROBLEM and "diffusion_pytorch_model.safetensors" in line.fix
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert pretrained_line("denoiser", str(tmp_path / "sd"), "unet", "-").status == "ok"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = pretrained_line("denoiser", "ldmseg-tests/not-a-model", "unet", "-")
    assert line.status == PROBLEM and "HF_HUB_OFFLINE" in line.text
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert pretrained_line("image_encoder", "s3://bucket/sd15", "vae", "-").status == "note"
    assert pretrained_line("image_encoder", None, None, "built from config").text == "built from config"


def test_cluster_with_fewer_gpus_than_workers():
    cfg = load_config(COCO_YAML)
    plan = TrainPlan("ldm")
    device = resource_lines(plan, cfg, Resources("Ray cluster x", cpus=128, gpus=4, cluster=True))
    assert device == "cuda"
    (problem,) = plan.problems
    assert problem.label == "GPUs" and "num_workers=4" in problem.fix
    assert "decided on each worker" in plan.lines[-1].text
