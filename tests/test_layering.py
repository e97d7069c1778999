"""Layering (ARCHITECTURE.md: two layers): the method layer never imports Ray, MLflow or the pipelines;
no module imports another's private names; no import circle."""

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


def project_imports() -> dict[str, dict[str, set[str]]]:
    """module → {imported project module: names taken from it} for every module of ldmseg/ and
    pipelines/, counting imports inside functions too (``importlib`` strings are not imports)."""
    import ast
    from pathlib import Path

    root = Path(ldmseg.__file__).resolve().parents[1]
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("ldmseg", "pipelines") for p in (root / pkg).rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files:
                        edges.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:  # from package import module
                        edges.setdefault(f"{base}.{alias.name}", set())
                    elif base in files:
                        edges.setdefault(base, set()).add(alias.name)
        edges.pop(module, None)
    return graph


def test_no_module_imports_another_modules_private_names():
    bad = sorted(f"{m} imports {name} from {source}" for m, edges in project_imports().items()
                 for source, names in edges.items() for name in names
                 if name.startswith("_") and not name.startswith("__"))
    assert not bad, "; ".join(bad)


def test_no_import_circle():
    graph = {m: set(edges) for m, edges in project_imports().items()}
    # a package importing its own submodules (its __init__ re-exporting them) is no circle
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (circle := visit(t)):
                return circle
        state[m] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            raise AssertionError("import circle: " + " -> ".join(circle))


def test_method_layer_imports_nothing_of_the_pipelines():
    bad = sorted(f"{m} imports {t}" for m, edges in project_imports().items() if m.split(".")[0] == "ldmseg"
                 for t in edges if t.split(".")[0] == "pipelines")
    assert not bad, "; ".join(bad)
