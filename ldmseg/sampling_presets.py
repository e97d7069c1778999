"""Named sampling configs: sampling options saved under a name in the user's config folder.

A named sampling config is a YAML file holding a ``sampling:`` mapping of
:class:`~ldmseg.config.SamplingConfig` fields (only the fields it sets; the model's own config
gives the rest)::

    # best sampling configuration of sweep sampling-20261204 (PQ 0.5760, 0.210 s/image)
    sampling:
      sampler: dpmsolver++
      steps: 10
      mask_th: 0.5

Names live in ``$LDMSEG_HOME/sampling/NAME.yaml``; ``LDMSEG_HOME`` defaults to
``~/.config/ldmseg``. The folder belongs to the user, never to the installed package, so a
config saved by ``ldmseg tune sampling --save-best NAME`` is found by ``ldmseg evaluate
--sampling NAME`` from any install. Anything with a ``.yaml``/``.yml`` suffix or a folder in it
is a path instead of a name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from ldmseg.config import Config, ConfigError, sampling_fields, with_sampling

HOME_VARIABLE = "LDMSEG_HOME"
DEFAULT_HOME = "~/.config/ldmseg"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def ldmseg_home() -> Path:
    """The user's ldmseg config folder: ``$LDMSEG_HOME``, else ``~/.config/ldmseg``."""
    return Path(os.environ.get(HOME_VARIABLE) or DEFAULT_HOME).expanduser()


def presets_folder() -> Path:
    """Where named sampling configs live: ``<ldmseg home>/sampling``."""
    return ldmseg_home() / "sampling"


def saved_presets() -> list[str]:
    """The names of the saved sampling configs, sorted."""
    folder = presets_folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def is_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a file (a ``.yaml``/``.yml`` suffix or a folder part) rather than a preset."""
    text = os.fspath(name_or_path)
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """The file of a preset name (``<presets folder>/NAME.yaml``) or the path itself."""
    if is_path(name_or_path):
        return Path(name_or_path).expanduser()
    name = os.fspath(name_or_path)
    if not _NAME.match(name):
        raise ConfigError(f"sampling config name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(or pass a path ending in .yaml)")
    return presets_folder() / f"{name}.yaml"


def check_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``options`` checked against the :class:`~ldmseg.config.SamplingConfig` fields and their types;
    → the same options as a plain dict (numbers in canonical form)."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sampling options, got {options!r}")
    try:
        sampling = with_sampling(Config(), options).sampling
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (a sampling config holds the fields {', '.join(sampling_fields())})"
                          ) from None
    return {k: getattr(sampling, k) for k, v in options.items() if v is not None}


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A named sampling config or a YAML path → its sampling options, e.g. ``{"sampler": "ddim", "steps": 10}``.

    The file holds a ``sampling:`` mapping (or the fields at its top level). An unknown name fails
    listing the saved names and the folder.
    """
    path = preset_path(name_or_path)
    if not path.is_file():
        if is_path(name_or_path):
            raise ConfigError(f"sampling config {path}: no such file; pass a saved name or a YAML file")
        saved = saved_presets()
        listing = f"saved: {', '.join(saved)}" if saved else "none saved yet"
        raise ConfigError(f"no sampling config named {os.fspath(name_or_path)!r} in {presets_folder()} ({listing}; "
                          f"set {HOME_VARIABLE} to use another folder); save one with "
                          "'ldmseg tune sampling ... --save-best NAME' or pass a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sampling config {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if isinstance(data, dict) and isinstance(data.get("sampling"), dict):
        data = data["sampling"]
    return check_options(data, f"sampling config {path}")


def save_preset(name_or_path: str | os.PathLike, options: Mapping[str, Any], note: str | None = None) -> Path:
    """Write ``options`` (SamplingConfig fields) as a named sampling config (or to a YAML path),
    with ``note`` as a comment line on top; → the file written."""
    path = preset_path(name_or_path)
    checked = check_options(options, f"sampling config {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# {' '.join(note.split())}\n" if note else ""
    path.write_text(head + yaml.safe_dump({"sampling": checked}, sort_keys=False))
    return path
