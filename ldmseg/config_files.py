"""The config files that ship with ldmseg, found by name: ``--config quickstart`` anywhere.

A source checkout (or an editable install) has them in ``conf/``; a wheel installs the same files
into ``<prefix>/share/ldmseg/conf`` (pyproject's ``data-files``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldmseg.typed import ConfigError


def shipped_config_dirs() -> list[Path]:
    """Where the configs that ship with ldmseg live: ``conf/`` of a source checkout (or an
    editable install), then ``<prefix>/share/ldmseg/conf`` of a wheel install."""
    return [Path(__file__).resolve().parents[1] / "conf", Path(sys.prefix) / "share" / "ldmseg" / "conf"]


def find_config(path: str | Path) -> Path:
    """A config file: ``path`` if it is a file, else the shipped config of that name (``quickstart``,
    ``conf/quickstart.yaml`` and ``quickstart.yaml`` all name it), so that a wheel install finds them."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if path.parent in (Path("."), Path("conf")):
        for folder in shipped_config_dirs():
            if (folder / name).is_file():
                return folder / name
    shipped = sorted({p.stem for d in shipped_config_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"config file {path} does not exist; pass a YAML file or a shipped config name "
                      f"({', '.join(shipped) or 'none found'})")
