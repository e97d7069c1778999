"""Model folders: ``model.json`` + one ``<component>.safetensors`` per component with weights.

A trained model is a folder (local, or any fsspec URL such as ``s3://bucket/models/ldm``)::

    model.json                    format, version, resolved config, latent scale, id slots,
                                  components, training step, extra metadata
    mask_autoencoder.safetensors  the mask autoencoder
    denoiser.safetensors          the denoiser
    image_encoder.safetensors     only for an image encoder built from config (random, frozen);
                                  a pretrained encoder is stored as its source id, ``pixel_unshuffle``
                                  has no parameters

Loading reads JSON and safetensors only (nothing is unpickled) and rebuilds every module from the
stored config (:func:`ldmseg.config.from_dict`) before loading its weights. Frozen pretrained
weights are never bundled (the official code's 3.3 GB pickles).

:func:`checkpoint_problems` tells a complete checkpoint folder from one cut short (a crash
mid-upload): missing files, truncated safetensors or ``torch.save`` archives.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from ldmseg.config import Config, from_dict
from ldmseg.redact import public_dict
from ldmseg.models.build import COMPONENTS, build_component, build_components  # noqa: F401 (build_components: re-exported)
from ldmseg.models.ddp import unwrap

FORMAT = "ldmseg-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: modules in eval mode on the requested device."""

    cfg: Config
    components: dict[str, nn.Module]
    latent_scale: float
    meta: dict[str, Any] = field(default_factory=dict)


def _is_remote(path: str | Path) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _local(path: str | Path) -> Path:
    s = str(path)
    return Path(s[len("file://"):]) if s.startswith("file://") else Path(s)


def _image_encoder_entry(cfg: Config, module: nn.Module) -> dict:
    kind = getattr(module, "kind", cfg.image_encoder.kind)
    entry = {"kind": kind, "out_channels": int(getattr(module, "out_channels", 0)),
             "downsample_factor": int(getattr(module, "downsample_factor", 0))}
    if kind == "pixel_unshuffle":
        entry["weights"] = None
    elif cfg.image_encoder.pretrained:
        entry["weights"] = None
        entry["source"] = cfg.image_encoder.pretrained
        entry["subfolder"] = cfg.image_encoder.subfolder
    else:
        entry["weights"] = "image_encoder.safetensors"
    return entry


def save_model(
    directory: str | Path,
    cfg: Config,
    components: dict[str, nn.Module],
    *,
    latent_scale: float,
    extra: dict | None = None,
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
) -> str:
    """Write a model folder (created if missing; existing component files are overwritten).

    Args:
        directory: local folder or fsspec URL (``s3://...``; written via a temporary folder).
        cfg: the resolved config the components were built from (stored with ``public_dict``: secrets redacted).
        components: name → module, names from :data:`COMPONENTS`; DDP wrappers are unwrapped.
            A model that :class:`~ldmseg.segmenter.Segmenter` can use needs ``mask_autoencoder``
            and ``denoiser`` (``image_encoder`` is rebuilt from the config when absent).
        latent_scale: the factor applied to AE latents before diffusion (1 / std of training latents).
        extra: JSON-able metadata (e.g. ``{"stage": "ldm", "step": 1000}``); ``step`` is also
            stored at the top level as the training step.
        state_dicts: component name → the state dict to write for it instead of the module's own
            weights (same keys; e.g. the EMA weights built on the CPU by
            :func:`ldmseg.training.optim.ema_state_dict`); the module still gives the metadata.

    Returns:
        ``directory`` as a string.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; name components among {', '.join(COMPONENTS)}")
    if not latent_scale or latent_scale <= 0:
        raise ValueError(f"latent_scale must be > 0 (measure_latent_scale), got {latent_scale}")
    if _is_remote(directory):
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            save_model(tmp, cfg, components, latent_scale=latent_scale, extra=extra, state_dicts=state_dicts)
            fs, root = fsspec.core.url_to_fs(str(directory))
            fs.makedirs(root, exist_ok=True)
            for f in sorted(Path(tmp).iterdir()):
                fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
        return str(directory)

    state_dicts = dict(state_dicts or {})
    for name, sd in state_dicts.items():
        if name not in components:
            raise ValueError(f"state_dicts[{name!r}] given without a module for it in components")
        expected, given = set(unwrap(components[name]).state_dict()), set(sd)
        if expected != given:
            missing, unexpected = sorted(expected - given)[:3], sorted(given - expected)[:3]
            raise ValueError(f"state_dicts[{name!r}] does not match its module's state dict (missing {missing}, "
                             f"unexpected {unexpected}): pass the weights of that module")
    out = _local(directory)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict] = {}
    for name, module in components.items():
        module = unwrap(module)
        entry: dict[str, Any] = {"weights": f"{name}.safetensors"}
        if name == "image_encoder":
            entry = _image_encoder_entry(cfg, module)
        elif name == "denoiser":
            entry.update(latent_channels=int(module.latent_channels), image_channels=int(module.image_channels),
                         sample_size=cfg.data.resolution // cfg.mask_ae.downsample_factor)
        if entry["weights"] and name in state_dicts:
            save_state_dict(state_dicts[name], out / entry["weights"])
        elif entry["weights"]:
            st_save_model(module, str(out / entry["weights"]), force_contiguous=True)
        entry["parameters"] = sum(p.numel() for p in module.parameters())
        entries[name] = entry
    extra = dict(extra or {})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "latent_scale": float(latent_scale),
        "num_slots": cfg.data.num_slots,
        "step": extra.get("step"),
        "components": entries,
        "extra": extra,
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers")},
        "config": public_dict(cfg),
    }
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return str(directory)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state_dict`` as safetensors the way ``safetensors.torch.save_model`` writes a module:
    a name that is another view of the same tensor (tied weights) is written once (the others
    recorded in the metadata as ``alias -> kept name``; :func:`load_model` fills them in through the
    module), tensors made contiguous, ``format: pt``. Tensors on a device are copied to the host."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    out: dict[str, torch.Tensor] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state_dict.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if view in views:
            metadata[name] = views[view]
            continue
        views[view] = name
        # another view of a storage already written: an independent copy (safetensors refuses shared storage)
        out[name] = t.detach().clone() if storage in storages else t.detach().contiguous()
        storages.add(storage)
    save_file(out, str(path), metadata=metadata)


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors in ``tensors`` (a tensor, or dicts/lists/tuples of them, nested; other
    values count 0), each storage once: e.g. of a state dict, an optimiser's ``state_dict()``."""
    seen: set[tuple] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.numel())
            if key in seen:
                return 0
            seen.add(key)
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(tensors)


def safetensors_problem(opened, size: int) -> str | None:
    """Why a safetensors file of ``size`` bytes (``opened``: its binary file object, at offset 0)
    is incomplete, or None: the 8-byte header length, the JSON header, and the end of the last
    tensor against the file size (a truncated upload ends early)."""
    head = opened.read(8)
    if len(head) < 8:
        return f"{size} bytes: shorter than the 8-byte header length"
    n = int.from_bytes(head, "little")
    if n <= 0 or 8 + n > size:
        return f"header of {n} bytes does not fit in {size} bytes"
    try:
        header = json.loads(opened.read(n))
    except ValueError:
        return "header is not JSON"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{size} bytes, the header describes {8 + n + end}"
    return None


def zip_problem(opened) -> str | None:
    """Why a ``torch.save`` file (a zip archive; ``opened``: its seekable binary file object) is
    incomplete, or None: its central directory (at the end) must be intact; a truncated file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(opened) as z:
            if not z.namelist():
                return "an empty archive"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a complete zip archive ({e})"
    return None


def checkpoint_problems(folder: str | Path, required: tuple[str, ...] = (MODEL_JSON,), fs=None) -> list[str]:
    """What makes checkpoint folder ``folder`` incomplete (``[]``: nothing found): a file of
    ``required`` missing, ``model.json`` unreadable or a component's weights it lists missing, a
    truncated ``*.safetensors`` (:func:`safetensors_problem`) or ``*.pt`` (:func:`zip_problem`).

    ``folder``: a local path or fsspec URL, or a path in the fsspec filesystem ``fs``. Reads the
    small headers and zip directories only (a few requests per file on object storage).
    """
    if fs is None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(folder))
    else:
        root = str(folder)
    root = root.rstrip("/")
    try:
        infos = fs.ls(root, detail=True)
    except FileNotFoundError:
        return [f"{folder} does not exist"]
    listed = {i["name"].rstrip("/").split("/")[-1]: i for i in infos if i.get("type") != "directory"}
    problems = [f"{name} missing" for name in required if name not in listed]
    if MODEL_JSON in listed:
        try:
            with fs.open(f"{root}/{MODEL_JSON}", "rb") as f:
                meta = json.loads(f.read())
            for cname, entry in (meta.get("components") or {}).items():
                if entry.get("weights") and entry["weights"] not in listed:
                    problems.append(f"{entry['weights']} missing (model.json lists component {cname!r})")
        except (ValueError, OSError, AttributeError) as e:
            problems.append(f"{MODEL_JSON} unreadable ({e})")
    for name, info in sorted(listed.items()):
        if name.endswith(".pt"):
            with fs.open(f"{root}/{name}", "rb") as f:
                why = zip_problem(f)
        elif name.endswith(".safetensors"):
            with fs.open(f"{root}/{name}", "rb") as f:
                why = safetensors_problem(f, int(info.get("size") or 0))
        else:
            continue
        if why:
            problems.append(f"{name}: {why}")
    return problems


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def read_meta(directory: str | Path) -> dict:
    """``model.json`` of a local model folder, checked for format and version."""
    path = _local(directory) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a model folder written by save_model")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta['format_version']} is newer than this ldmseg "
                         f"({FORMAT_VERSION}); upgrade ldmseg")
    return meta


def weights_hash(directory: str | Path, component: str = "mask_autoencoder") -> str:
    """Short SHA-256 of a model folder's ``<component>.safetensors`` bytes (local, or an fsspec URL
    such as ``s3://bucket/models/ae``, streamed): the identity of trained weights (an LDM run
    includes its AE's, so a new AE never resumes an old denoiser)."""
    digest = hashlib.sha256()
    if _is_remote(directory):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(directory))
        remote = f"{root.rstrip('/')}/{component}.safetensors"
        if not fs.isfile(remote):
            raise FileNotFoundError(f"{directory}/{component}.safetensors not found: {directory} is not a model "
                                    f"folder with a {component}")
        opened = fs.open(remote, "rb")
    else:
        path = _local(directory) / f"{component}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a model folder with a {component}")
        opened = open(path, "rb")
    with opened as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


RETIRED_KEYS = {"mask_ae": ("kl_weight",), "train_ae": ("ema_decay", "validate_steps")}
"""Config keys that did nothing and were removed; model folders saved before still hold them."""


def _without_retired_keys(config: dict) -> dict:
    return {section: ({k: v for k, v in values.items() if k not in RETIRED_KEYS.get(section, ())}
                      if isinstance(values, dict) else values) for section, values in config.items()}


def model_config(directory: str | Path, meta: dict | None = None) -> Config:
    """The :class:`~ldmseg.config.Config` a local model folder was trained with (``model.json`` only)."""
    meta = read_meta(directory) if meta is None else meta
    return from_dict(_without_retired_keys(meta["config"]))


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder written by :func:`save_model` (local or fsspec URL).

    Every component listed in ``model.json`` is rebuilt from the stored config and its
    safetensors weights are loaded strictly (a missing or unexpected tensor is an error).
    Modules are returned in eval mode on ``device``.
    """
    if _is_remote(directory):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(directory))
        with tempfile.TemporaryDirectory() as tmp:
            for remote in fs.ls(root, detail=False):
                fs.get_file(remote, str(Path(tmp) / Path(remote).name))
            return load_model(tmp, device)

    folder = _local(directory)
    meta = read_meta(folder)
    cfg = model_config(folder, meta)
    if int(meta["num_slots"]) != cfg.data.num_slots:
        raise ValueError(f"{folder / MODEL_JSON}: num_slots {meta['num_slots']} disagrees with "
                         f"data.num_slots {cfg.data.num_slots}")
    components: dict[str, nn.Module] = {}
    for name, entry in meta["components"].items():
        module = build_component(name, cfg, entry)
        if entry.get("weights"):
            path = folder / entry["weights"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: model.json lists component {name!r} with weights")
            st_load_model(module, str(path), strict=True)
        components[name] = module.to(device).eval()
    return LoadedModel(cfg=cfg, components=components, latent_scale=float(meta["latent_scale"]), meta=meta)

