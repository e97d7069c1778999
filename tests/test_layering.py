"""The method layer never imports Ray or MLflow (ARCHITECTURE.md: two layers)."""

import pkgutil
import subprocess
import sys

import ldmseg


def test_ldmseg_modules_do_not_import_ray_or_mlflow():
    modules = [m.name for m in pkgutil.walk_packages(ldmseg.__path__, "ldmseg.")]
    assert "ldmseg.config" in modules and len(modules) > 5
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ldmseg imported: {out.stdout.strip()}"
