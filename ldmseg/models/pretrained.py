"""Where pretrained weights (Stable Diffusion's ``vae/`` and ``unet/``) come from.

``image_encoder.pretrained`` and ``denoiser.pretrained`` (with their ``subfolder``) name one of:

- a **local directory** (a diffusers ``save_pretrained`` layout): used as it is; the subfolder
  must hold ``config.json`` and the weights;
- an **fsspec URL** such as ``s3://bucket/prefix``: the subfolder's ``config.json`` and
  safetensors weights (nothing else) are copied once per machine into a cache directory,
  ``$LDMSEG_WEIGHTS_CACHE/<hash of the URL>`` (default ``~/.cache/ldmseg/weights``). The copy is
  made in a temporary directory next to it and renamed into place, under a file lock: a process
  that finds the entry reuses it without touching the URL, one that waits on the lock finds it
  complete, and one killed mid-copy leaves no entry (its leftovers are removed by the next);
- a **Hugging Face hub id** (``stable-diffusion-v1-5/stable-diffusion-v1-5``): the subfolder's
  ``config.json`` and safetensors weights are fetched into the Hugging Face cache (``HF_HOME`` /
  ``HF_HUB_CACHE``), or, with ``HF_HUB_OFFLINE=1``, only looked up there; a miss is an error that
  says how to fix it.

:func:`resolve_pretrained` turns any of them into a local directory; :func:`load_pretrained`
loads a diffusers model class from it. :func:`pretrained_config` gives the ``config.json`` without
loading weights or using the network (shapes only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CACHE_ENV = "LDMSEG_WEIGHTS_CACHE"
"""Environment variable: the directory of the weights cache for URL sources."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
"""diffusers' file names: one safetensors file, or shards listed by an index."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PretrainedNotFound(FileNotFoundError):
    """Pretrained weights cannot be found where the config says; the message says how to fix it."""


def cache_root() -> Path:
    """The weights cache: ``$LDMSEG_WEIGHTS_CACHE``, else ``~/.cache/ldmseg/weights``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldmseg" / "weights"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on (read now, as well as when huggingface_hub was imported)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if value in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def kind_of(source: str) -> str:
    """``local``, ``url`` or ``hub``: how ``source`` is read (an existing path is always local)."""
    if source.startswith("file://"):
        return "local"
    if "://" in source:
        return "url"
    path = Path(source).expanduser()
    if path.exists() or path.is_absolute() or source.startswith((".", "~")) or not _HUB_ID.match(source):
        return "local"
    return "hub"


def _join(source: str, subfolder: str | None) -> str:
    return source.rstrip("/") + "/" + subfolder.strip("/") if subfolder else source.rstrip("/")


def _local_path(source: str) -> Path:
    return Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()


def _label(source: str, subfolder: str | None) -> str:
    return f"{source} (subfolder {subfolder})" if subfolder else source


def _missing(where: Path) -> str | None:
    """What ``where`` lacks to be loaded from (``None``: nothing)."""
    if not where.is_dir():
        return f"no such directory {where}"
    if not (where / CONFIG_NAME).is_file():
        return f"{where} has no {CONFIG_NAME}"
    if not any(p.name.startswith("diffusion_pytorch_model") for p in where.iterdir()):
        return f"{where} has {CONFIG_NAME} but no weights ({WEIGHTS_NAME} or its shards)"
    return None


def _cache_entry(url: str) -> Path:
    return cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (POSIX ``flock``; a no-op where there is none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: the atomic rename alone keeps entries whole
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remote_files(fs, root: str, url: str) -> list[str]:
    """The names under ``root`` to copy: ``config.json`` and the safetensors weights (or shards)."""
    try:
        names = {Path(p.rstrip("/")).name for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        names = set()
    if CONFIG_NAME not in names:
        raise PretrainedNotFound(f"pretrained {url}: no {CONFIG_NAME} there; point pretrained (and subfolder, e.g. "
                                 "vae or unet) at a copy of a diffusers save_pretrained directory")
    if WEIGHTS_NAME in names:
        return [CONFIG_NAME, WEIGHTS_NAME]
    if WEIGHTS_INDEX_NAME in names:
        with fs.open(f"{root}/{WEIGHTS_INDEX_NAME}", "r") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [CONFIG_NAME, WEIGHTS_INDEX_NAME, *shards]
    raise PretrainedNotFound(f"pretrained {url}: {CONFIG_NAME} but no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} "
                             "with its shards); only safetensors weights are copied")


def download_count() -> int:
    """How many URL sources this process has copied into the cache (for tests and logs)."""
    return _DOWNLOADS[0]


_DOWNLOADS = [0]


def _fetch_url(url: str) -> Path:
    """The cache entry of ``url`` (a directory), copied into place first if it is not there yet."""
    entry = _cache_entry(url)
    if (entry / CONFIG_NAME).is_file():
        return entry
    with _locked(entry.with_name(entry.name + ".lock")):
        if (entry / CONFIG_NAME).is_file():  # another process copied it while we waited
            return entry
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # a copy killed midway (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        names = _remote_files(fs, root, url)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            for name in names:
                fs.get_file(f"{root}/{name}", str(tmp / name))
            (tmp / "source.txt").write_text(url + "\n")
            try:
                os.rename(tmp, entry)  # atomic: the entry appears whole or not at all
            except OSError:
                if not (entry / CONFIG_NAME).is_file():
                    raise
                return entry  # another process won a race (a filesystem without working locks)
            _DOWNLOADS[0] += 1
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _hub_patterns(subfolder: str | None) -> list[str]:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [prefix + CONFIG_NAME, prefix + WEIGHTS_NAME, prefix + WEIGHTS_INDEX_NAME,
            prefix + "diffusion_pytorch_model-*-of-*.safetensors"]


def _hub_fix(repo_id: str, subfolder: str | None) -> str:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return (f"download it once with 'hf download {repo_id} {prefix}{CONFIG_NAME} {prefix}{WEIGHTS_NAME}' "
            "(without HF_HUB_OFFLINE, with the same HF_HOME), or point pretrained at a local directory or an "
            "s3:// prefix holding it")


def _fetch_hub(repo_id: str, subfolder: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    label = _label(repo_id, subfolder)
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(subfolder), local_files_only=offline))
    except Exception as exc:  # not cached (offline) or not reachable: both fixed the same way
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else f"cannot be fetched ({reason})"
        raise PretrainedNotFound(f"pretrained {label}: not a local directory, and as a hub id it is {where}; "
                                 + _hub_fix(repo_id, subfolder)) from exc
    where = snapshot / subfolder if subfolder else snapshot
    if (missing := _missing(where)) is not None:
        raise PretrainedNotFound(f"pretrained {label}: in the Hugging Face cache, {missing}; "
                                 + _hub_fix(repo_id, subfolder))
    return where


def resolve_pretrained(source: str, subfolder: str | None = None) -> Path:
    """The local directory holding ``config.json`` and the weights of ``source`` / ``subfolder``.

    ``source``: a local directory, an fsspec URL (copied into the cache once per machine, see the
    module docstring) or a hub id (the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` nothing is
    fetched). Raises :class:`PretrainedNotFound` naming what is missing and how to fix it.
    """
    kind = kind_of(source)
    if kind == "local":
        where = _local_path(source) / (subfolder or "")
        if (missing := _missing(where)) is not None:
            raise PretrainedNotFound(f"pretrained {_label(source, subfolder)}: {missing}; point pretrained (and "
                                     "subfolder, e.g. vae or unet) at a diffusers save_pretrained directory, an "
                                     "s3:// prefix holding one, or a hub id")
        return where
    if kind == "url":
        return _fetch_url(_join(source, subfolder))
    return _fetch_hub(source, subfolder)


def pretrained_config(source: str, subfolder: str | None = None) -> dict[str, Any] | None:
    """``config.json`` of ``source`` / ``subfolder`` when it is readable without the network (a
    local directory, or a URL or hub id already in its cache), else ``None``. Reads no weights."""
    kind = kind_of(source)
    if kind == "local":
        path = _local_path(source) / (subfolder or "") / CONFIG_NAME
    elif kind == "url":
        path = _cache_entry(_join(source, subfolder)) / CONFIG_NAME
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(source, _hub_patterns(subfolder)[0])
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def load_pretrained(model_class, source: str, subfolder: str | None = None):
    """``model_class.from_pretrained`` (a diffusers model class) on :func:`resolve_pretrained`'s
    directory: a local load, no network.

    ``low_cpu_mem_usage`` is diffusers' default only with ``accelerate`` installed (without it
    diffusers warns and turns it off), so it is asked for exactly then. Without ``accelerate``
    diffusers still skips the random initialisation (``no_init_weights``) and, with torch >= 2.1,
    assigns the memory-mapped safetensors tensors to the parameters: a 220 M-parameter UNet loads in
    0.1 s and takes one copy of its weights in memory (diffusers 0.42)."""
    from diffusers.utils import is_accelerate_available

    where = resolve_pretrained(source, subfolder)
    return model_class.from_pretrained(str(where), low_cpu_mem_usage=is_accelerate_available())
