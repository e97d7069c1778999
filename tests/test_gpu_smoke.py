"""``benchmarks/gpu_smoke.py`` stays runnable: without CUDA it exits 2 with one line; with
``--device cpu`` on the tiny config it runs every part (fp16 and bf16 steps, the AE step, a
checkpoint save, sampling with and without autocast) and writes its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

from paths import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_smoke.py")


def test_without_cuda_it_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_smoke: no CUDA device here; run it on a GPU machine (or --device cpu with a tiny config)"]


def test_on_cpu_with_the_tiny_config_every_part_runs(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--config", "conf/tiny.yaml", "--steps", "2",
                           "--batch", "2", "--sample-steps", "2", "--sample-batch", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["precision"] for r in report["ldm"]] == ["fp16", "bf16"]
    assert all(r["all_finite"] and r["steps_per_s"] > 0 and r["skipped_steps"] == 0 for r in report["ldm"])
    assert report["ae"]["finite"]
    files = report["checkpoint"]["files"]
    assert {"model.json", "denoiser.safetensors", "mask_autoencoder.safetensors", "trainer_state.pt"} <= set(files)
    assert report["checkpoint"]["bytes"] == sum(files.values()) > 0
    assert set(report["sampling"]) == {"no", "auto"}
    assert all(r["shapes_ok"] and r["images_per_s"] > 0 for r in report["sampling"].values())
