"""The project as a user installs it: a wheel in a fresh venv, run from a folder outside the source tree.

The heavy dependencies come from the test's own environment (a ``.pth`` file in the fresh venv
points at its site-packages), so nothing is downloaded. The named sampling config that
``ldmseg tune sampling --save-best NAME`` saves (in ``$LDMSEG_HOME``, not in the package) is the
one ``ldmseg evaluate --sampling NAME`` uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from paths import REPO
from helpers_config import tiny_cfg


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def install_wheel(tmp: Path) -> Path:
    """Build the project's wheel from a copy of its sources and install it into a fresh venv
    whose other packages are this environment's; → the venv's ``bin`` folder."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("ldmseg", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    shutil.copytree(REPO / "conf", src / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], tmp)
    wheel = next((tmp / "dist").glob("ldmseg-*.whl"))
    run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], tmp)
    python = tmp / "venv" / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    Path(purelib, "base_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    return tmp / "venv" / "bin"


@pytest.mark.slow
def test_wheel_install_evaluates_with_the_sampling_config_its_sweep_saved(tmp_path):
    from ldmseg.checkpoint import build_components, save_model
    from ldmseg.data.synthetic import write_scenes

    cfg = tiny_cfg("sampling.steps=2", "sampling.count_th=0.0", "preprocess.rows_per_file=8")  # the model's own sampling: ddim, 2 steps
    save_model(tmp_path / "model", cfg, build_components(cfg), latent_scale=1.0)
    write_scenes(tmp_path / "scenes", num_images=2, size=32, seed=5, max_things=2)
    bin_ = install_wheel(tmp_path)
    work = tmp_path / "elsewhere"  # outside the source tree: nothing of it can be imported from here
    work.mkdir()
    env = {**os.environ, "LDMSEG_HOME": str(tmp_path / "home")}
    for name in ("PYTHONPATH", "RAY_ADDRESS"):  # nothing of the source tree, a Ray of its own
        env.pop(name, None)
    where = run([bin_ / "python", "-c", "import ldmseg, pipelines; print(ldmseg.__file__, pipelines.__file__)"],
                work, env).stdout
    assert str(REPO) not in where and str(tmp_path / "venv") in where
    # the shipped configs come with the wheel: the quickstart's default is found by name
    found = run([bin_ / "python", "-c", "from ldmseg.config import load_config; from ldmseg.config_files import find_config; "
                 "print(find_config('quickstart')); print(load_config('conf/tiny.yaml').name)"], work, env).stdout
    assert found.split() == [str(tmp_path / "venv" / "share" / "ldmseg" / "conf" / "quickstart.yaml"), "tiny"]

    common = ["--model", tmp_path / "model", "--data", tmp_path / "scenes", "--max-images", "2"]
    sweep = run([bin_ / "ldmseg", "tune", "sampling", *common, "--samplers", "euler", "--steps", "1",
                 "--max-concurrent", "1", "--save-best", "fast", "--output", work / "sweep"], work, env)
    swept = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert swept["n_trials"] == 1 and swept["saved"] == str(tmp_path / "home" / "sampling" / "fast.yaml")
    assert (swept["best"]["sampler"], swept["best"]["steps"]) == ("euler", 1)

    ev = run([bin_ / "ldmseg", "evaluate", *common, "--sampling", "fast", "--no-mlflow", "--output", work / "ev"],
             work, env)
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert (res["sampler"], res["steps"], res["sampling_preset"]) == ("euler", 1, "fast")
    assert res["n_images"] == 2
    recorded = json.loads((work / "ev" / "metrics.json").read_text())
    assert (recorded["sampling"]["sampler"], recorded["sampling"]["steps"]) == ("euler", 1)
