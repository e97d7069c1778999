"""Where Stable Diffusion weights come from (ldmseg.models.pretrained): a local directory, an s3:// prefix
copied once into the weights cache (a real moto_server), a hub id from the Hugging Face cache with
HF_HUB_OFFLINE=1; and the resume build that reads no denoiser weights (build_stage(load_pretrained=False))."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ldmseg.config import DenoiserConfig, ImageEncoderConfig
from ldmseg.models import pretrained
from ldmseg.models.denoiser import build_denoiser
from ldmseg.models.image_encoder import ImageEncoder
from ldmseg.models.pretrained import PretrainedNotFound, resolve_pretrained
from helpers_models import tiny_sd_unet, tiny_sd_vae

ENV = {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder: sd/vae and sd/unet written by save_pretrained."""
    root = tmp_path_factory.mktemp("weights") / "sd"
    tiny_sd_vae().save_pretrained(str(root / "vae"))
    tiny_sd_unet().save_pretrained(str(root / "unet"))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LDMSEG_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _vae_cfg(source: str) -> ImageEncoderConfig:
    return ImageEncoderConfig(pretrained=source, subfolder="vae", block_out_channels=(8, 16, 16))


def _unet_cfg(source: str, **kw) -> DenoiserConfig:
    return DenoiserConfig(kind="stable-diffusion", pretrained=source, subfolder="unet", image_stem_channels=0, **kw)


def _assert_same(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = module.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _assert_denoiser_has(den, unet) -> None:
    """The denoiser's UNet holds ``unet``'s weights (conv_in widened, cross-attention stripped)."""
    got, want = den.unet.state_dict(), unet.state_dict()
    assert torch.equal(got["conv_in.weight"][:, :4], want["conv_in.weight"])
    shared = [k for k in got if k != "conv_in.weight"]
    assert len(shared) > 50 and all(torch.equal(got[k], want[k]) for k in shared)


def test_local_directory_loads_offline(sd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = ImageEncoder.from_config(_vae_cfg(str(sd)))
    _assert_same(enc.vae, tiny_sd_vae())
    den = build_denoiser(_unet_cfg(str(sd)), latent_channels=4, image_channels=4, sample_size=8)
    _assert_denoiser_has(den, tiny_sd_unet())
    assert "loaded from" in den.origin and resolve_pretrained(f"file://{sd}", "unet") == sd / "unet"


def test_missing_local_directory_names_the_path(sd, tmp_path):
    missing = tmp_path / "no-such-sd"
    with pytest.raises(PretrainedNotFound, match=f"no such directory {missing}/vae"):
        ImageEncoder.from_config(_vae_cfg(str(missing)))  # checked before diffusers is asked
    with pytest.raises(PretrainedNotFound, match=f"no such directory {missing}/unet"):
        build_denoiser(_unet_cfg(str(missing)), 4, 4, 8)
    half = tmp_path / "half"
    shutil.copytree(sd / "unet", half / "unet")
    (half / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PretrainedNotFound, match="has config.json but no weights"):
        resolve_pretrained(str(half), "unet")
    (half / "unet" / "config.json").unlink()
    with pytest.raises(PretrainedNotFound, match=f"{half}/unet has no config.json"):
        resolve_pretrained(str(half), "unet")


@pytest.fixture
def bucket(s3_server, sd):
    """s3://<new bucket>/sd holding sd/ plus files that must not be copied (an fp16 variant, a text encoder)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    name = f"weights-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.put(str(sd), f"{name}/sd", recursive=True)
    fs.pipe({f"{name}/sd/unet/diffusion_pytorch_model.fp16.safetensors": b"not needed",
             f"{name}/sd/text_encoder/config.json": b"{}"})
    return fs, f"s3://{name}/sd"


def test_s3_prefix_is_copied_once_into_the_cache(bucket, cache):
    fs, url = bucket
    before = pretrained.download_count()
    enc = ImageEncoder.from_config(_vae_cfg(url))
    _assert_same(enc.vae, tiny_sd_vae())
    den = build_denoiser(_unet_cfg(url), 4, 4, 8)
    _assert_denoiser_has(den, tiny_sd_unet())
    assert pretrained.download_count() == before + 2

    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    unet_entry = resolve_pretrained(url, "unet")
    assert unet_entry in entries
    assert sorted(p.name for p in unet_entry.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                           "source.txt"]
    assert (unet_entry / "source.txt").read_text().strip() == f"{url}/unet"
    mtimes = {p: p.stat().st_mtime_ns for p in unet_entry.iterdir()}

    fs.rm(url.removeprefix("s3://"), recursive=True)  # the second load reads the cache only
    fs.invalidate_cache()
    again = build_denoiser(_unet_cfg(url), 4, 4, 8)
    _assert_denoiser_has(again, tiny_sd_unet())
    assert pretrained.download_count() == before + 2
    assert {p: p.stat().st_mtime_ns for p in unet_entry.iterdir()} == mtimes
    with pytest.raises(PretrainedNotFound, match="no config.json there"):
        resolve_pretrained(url, "text_encoder2")


def test_s3_concurrent_loads_copy_once(bucket, cache):
    """Two loaders at once (separate lock handles, as two processes): one copy, both get it whole;
    a copy killed midway (its temporary folder) is cleared by the next."""
    _, url = bucket
    entry = pretrained._cache_entry(f"{url}/unet")
    stale = entry.with_name(f".{entry.name}.tmp-999999-dead")
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    before = pretrained.download_count()
    results, errors = [], []

    def load():
        try:
            results.append(resolve_pretrained(url, "unet"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [entry] * 3
    assert pretrained.download_count() == before + 1
    assert not stale.exists() and not list(entry.parent.glob(".*tmp-*"))


COPY = """
import sys
from ldmseg.models import pretrained
print(pretrained.resolve_pretrained(sys.argv[1], "unet"), pretrained.download_count())
"""


def test_s3_two_processes_at_once_copy_once(bucket, cache):
    """Two processes on one machine loading the same weights together: one copies, the other waits and reuses."""
    _, url = bucket
    env = {**os.environ, **ENV}
    procs = [subprocess.Popen([sys.executable, "-c", COPY, url], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    lines = sorted(out.split() for out, _ in outs)
    entry = str(pretrained._cache_entry(f"{url}/unet"))
    assert lines == [[entry, "0"], [entry, "1"]]
    assert sorted(p.name for p in Path(entry).iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                             "source.txt"]


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return subprocess.run([sys.executable, "-c", code], env={**full, **ENV, **env}, capture_output=True,
                          text=True, timeout=300)


HUB = """
import sys
from diffusers import UNet2DConditionModel
from ldmseg.models.pretrained import PretrainedNotFound, load_pretrained
unet = load_pretrained(UNet2DConditionModel, "acme/tiny-sd", "unet")
print(sum(float(p.detach().double().sum()) for p in unet.parameters()))
try:
    load_pretrained(UNet2DConditionModel, "stable-diffusion-v1-5/stable-diffusion-v1-5", "unet")
except PretrainedNotFound as exc:
    print(exc)
"""


def test_hub_id_offline_reads_the_hf_cache_or_says_how_to_fix(sd, tmp_path):
    # the Hugging Face cache layout with one cached snapshot of acme/tiny-sd (unet only)
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sd / "unet", repo / "snapshots" / commit / "unet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = _run(HUB, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    total, message = out.stdout.strip().splitlines()
    assert float(total) == pytest.approx(sum(float(p.detach().double().sum()) for p in tiny_sd_unet().parameters()))
    assert message.startswith("pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 (subfolder unet): not a local "
                              "directory, and as a hub id it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert ("download it once with 'hf download stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json "
            "unet/diffusion_pytorch_model.safetensors'") in message and "s3:// prefix" in message


def test_shapes_without_weights_come_from_config_json(sd, bucket, cache):
    """load_pretrained=False reads config.json only: locally, or from a cached copy (no network)."""
    with torch.device("meta"):
        den = build_denoiser(_unet_cfg(str(sd)), 4, 4, 8, load_pretrained=False)
        enc = ImageEncoder.from_config(_vae_cfg(str(sd)), load_pretrained=False)
    assert "config.json" in den.origin and "config.json" in enc.origin
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in tiny_sd_vae().parameters())
    _, url = bucket
    with pytest.raises(ValueError, match="also needs sd_config"):  # not cached yet, and nothing is fetched
        build_denoiser(_unet_cfg(url), 4, 4, 8, load_pretrained=False)
    assert not cache.exists()
    resolve_pretrained(url, "unet")
    with torch.device("meta"):
        den = build_denoiser(_unet_cfg(url), 4, 4, 8, load_pretrained=False)
    assert den.unet.conv_in.in_channels == 12


def test_default_cache_is_under_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LDMSEG_WEIGHTS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.cache_root() == tmp_path / ".cache" / "ldmseg" / "weights"
    assert [pretrained.kind_of(s) for s in ("s3://b/p", "acme/tiny-sd", "/abs/dir", "./rel", "file:///x")] == [
        "url", "hub", "local", "local", "local"]


@pytest.fixture
def ae_model(tmp_path):
    """A model folder of the ae stage (an untrained tiny mask AE: factor 4, 4 latent channels)."""
    from ldmseg.checkpoint import save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from helpers_config import tiny_cfg

    cfg = tiny_cfg()
    folder = tmp_path / "ae"
    save_model(folder, cfg, {"mask_autoencoder": MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)},
               latent_scale=1.0, extra={"stage": "ae"})
    return folder


def test_build_stage_for_resume_reads_no_denoiser_weights(sd, ae_model, tmp_path):
    from ldmseg.training.build import build_stage
    from helpers_config import tiny_cfg

    def cfg_for(root: Path):
        cfg = tiny_cfg("image_encoder.kind=autoencoder_kl", "denoiser.kind=stable-diffusion")
        return dataclasses.replace(cfg, image_encoder=_vae_cfg(str(root)),
                                   denoiser=dataclasses.replace(cfg.denoiser, pretrained=str(root), subfolder="unet"))

    full = build_stage("ldm", cfg_for(sd), ae_model=str(ae_model))
    without = tmp_path / "sd"  # the same folder without the UNet's weights
    shutil.copytree(sd, without)
    (without / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PretrainedNotFound, match="no weights"):
        build_stage("ldm", cfg_for(without), ae_model=str(ae_model))

    resumed = build_stage("ldm", cfg_for(without), ae_model=str(ae_model), load_pretrained=False)
    shapes = {k: v.shape for k, v in resumed.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in full.model.state_dict().items()}
    assert resumed.model.unet.conv_in.in_channels == 4 + 8 + 4 and resumed.model.image_stem is not None
    assert all(p.device.type == "cpu" for p in resumed.model.parameters())
    _assert_same(resumed.components.image_encoder.vae, tiny_sd_vae())  # frozen, not in checkpoints: loaded
    resumed.model.load_state_dict(full.model.state_dict())  # what a resume does next (strict)
    _assert_same(resumed.model, full.model)
    ae = build_stage("ae", cfg_for(sd), load_pretrained=False)
    assert ae.model.latent_channels == 4


def test_worker_env_forwards_hf_and_cache_variables(monkeypatch):
    import json

    from pipelines.ray_compat import worker_env

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("LDMSEG_WEIGHTS_CACHE", "/data/weights")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HOME": "/job"}}}))
    env = worker_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["LDMSEG_WEIGHTS_CACHE"] == "/data/weights"
    assert "HF_HOME" not in env and env["OMP_NUM_THREADS"] == "1"  # the job's own value wins
