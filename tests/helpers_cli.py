"""Shared by the CLI error tests: good inputs, a guard that Ray never starts, and the one-line check."""

from __future__ import annotations

import shutil

import pytest

from helpers_coco import entry, write_coco_folder
from helpers_config import tiny_cfg
from paths import TINY_YAML
from pipelines.cli import main

GARBAGE = b"\x00\xffnot a safetensors file" * 8
# the tiny model with a two-level mask AE (factor 2)
TINY_MODEL = ("mask_ae.widths=[8,16]", "image_encoder.downsample_factor=2")


# --------------------------------------------------------------------------------------------
# Fixtures: good and bad inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray (or loading a model) fails the test: every check must come before."""
    import ray

    import ldmseg.checkpoint
    import ldmseg.segmenter
    from pipelines import ray_compat

    def fail(*args, **kwargs):
        raise AssertionError("Ray started (or a model loaded) before the inputs were checked")

    was_running = ray.is_initialized()
    monkeypatch.setattr(ray_compat, "init_ray", fail)
    monkeypatch.setattr(ldmseg.checkpoint, "load_model", fail)
    monkeypatch.setattr(ldmseg.segmenter.Segmenter, "from_pretrained", fail)
    yield
    assert was_running or not ray.is_initialized()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, str]:
    """Good inputs: a model folder (save_model of a tiny config), a COCO panoptic folder, a
    preprocessed folder (its manifest is all the checks look at), a config file."""
    from ldmseg.checkpoint import build_components, save_model

    root = tmp_path_factory.mktemp("good")
    cfg = tiny_cfg(*TINY_MODEL)
    save_model(root / "model", cfg, build_components(cfg), latent_scale=1.0, extra={"stage": "ldm", "step": 0})
    coco = write_coco_folder(root / "coco", [entry(1), entry(2)])
    (root / "shards").mkdir()
    (root / "shards" / "_manifest.json").write_text("{}")
    return {"model": str(root / "model"), "coco": str(coco.root), "shards": str(root / "shards"),
            "config": str(TINY_YAML)}


def damaged_model(good, tmp_path, what: str) -> str:
    """A copy of the good model folder without ``model.json`` or with a garbage denoiser."""
    folder = tmp_path / f"model-{what}"
    shutil.copytree(good["model"], folder)
    if what == "no-json":
        (folder / "model.json").unlink()
    else:
        (folder / "denoiser.safetensors").write_bytes(GARBAGE)
    return str(folder)


def fails(argv: list[str], capsys, *names: str) -> str:
    """Run ``ldmseg ARGV`` in-process; assert exit 2 and one stderr line naming ``names``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ldmseg {argv[0]}"), lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


