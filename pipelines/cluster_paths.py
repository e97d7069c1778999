"""Paths that Ray workers on other nodes can reach: the rule, and its checks.

On a Ray cluster of more than one node, a local path the driver hands to Ray workers (tasks,
actors, Ray Train workers, Tune trials, Serve replicas) names a file on the driver's machine;
a worker on another node opens the same path on *its* machine and finds nothing there (or
writes where nobody reads). The rule every command follows:

- URLs (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``http(s)://``, ...) are reachable from
  every node;
- a local path (or ``file://`` URL) is reachable only under a folder the user declares as
  mounted at the same path on every node (an NFS, EFS or Lustre mount) in the environment
  variable ``LDMSEG_SHARED_PATHS`` (absolute folders separated by ``os.pathsep``, ``:``);
- MLflow: a tracking server (``http(s)://``), Databricks and database URIs with a host
  (``postgresql://``, ``mysql://``) are reachable; a ``sqlite:///`` or ``file:`` store only
  under a declared shared folder.

On one node nothing is checked. Each command calls :func:`require_reachable` right after Ray
is initialised (the node count is Ray's) and before any work is submitted, with the paths it
hands to workers; an offending path is a :class:`~ldmseg.config.ConfigError` (the CLI prints it
as one line and exits 2) naming the flag, the path, the node count and what to pass instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Collection, Mapping
from urllib.parse import unquote, urlsplit

from ldmseg.config import ConfigError

SHARED_ENV = "LDMSEG_SHARED_PATHS"
"""Environment variable: absolute folders mounted at the same path on every node."""
EXAMPLE_SHARED = "/mnt/shared"
TRACKING_FIX = "pass --tracking-uri http://MLFLOW:5000 (or set MLFLOW_TRACKING_URI) to a tracking server"
MODEL_URIS = ("models:/", "runs:/")
"""MLflow model URIs: resolved through the tracking server by whoever loads them."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_OPAQUE_SCHEMES = ("file", "models", "runs", "mlflow-artifacts", "sqlite", "databricks")
"""Schemes recognised without ``//`` (``file:/x``, ``models:/m/1``); any other needs ``scheme://``."""
_DB_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")


def alive_node_count() -> int:
    """Alive nodes of the connected Ray cluster (Ray must be initialised)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def shared_prefixes() -> list[str]:
    """The folders of ``LDMSEG_SHARED_PATHS`` (resolved; empty entries skipped).

    A relative entry is a :class:`ConfigError`: "mounted at the same path on every node" needs
    an absolute path.
    """
    prefixes = []
    for entry in os.environ.get(SHARED_ENV, "").split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        if not os.path.isabs(entry):
            raise ConfigError(f"{SHARED_ENV}: {entry!r} is not an absolute folder; list the absolute paths of "
                              f"folders mounted on every node, separated by {os.pathsep!r} (e.g. {EXAMPLE_SHARED})")
        prefixes.append(str(Path(entry).resolve()))
    return prefixes


def _scheme(path: str) -> str | None:
    """The URL scheme of ``path`` (lower case), or None for a plain path (``a:b`` is a file name)."""
    m = _SCHEME.match(path)
    if not m:
        return None
    scheme = m.group(1).lower()
    return scheme if path[m.end():].startswith("//") or scheme in _OPAQUE_SCHEMES else None


def local_path(path: str) -> str | None:
    """The local file-system path ``path`` names (a plain path or ``file:`` URL), else None."""
    scheme = _scheme(path)
    if scheme is None:
        return path
    if scheme == "file":
        return unquote(urlsplit(path).path) or "/"
    return None


def is_shared(path: str) -> bool:
    """``path`` (local) lies in a folder of ``LDMSEG_SHARED_PATHS``: compared as resolved absolute
    paths, component by component (``/mnt/shared2`` is not under ``/mnt/shared``)."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(prefix) for prefix in shared_prefixes())


def worker_reachable(path: str) -> bool:
    """Whether a worker on any node can open ``path``: any URL but ``file:``; a local path (or
    ``file:`` URL) only under a folder of ``LDMSEG_SHARED_PATHS``."""
    local = local_path(path)
    return local is None or is_shared(local)


def tracking_uri_reachable(uri: str | None) -> bool:
    """Whether Ray workers on any node can log to (or read models from) the MLflow store ``uri``:
    a tracking server (``http(s)://``), Databricks, a database with a host; a ``sqlite:///`` or
    ``file:`` store (or a plain folder) only under a folder of ``LDMSEG_SHARED_PATHS``. None
    (no URI: each worker would use its own machine's default store) is not reachable."""
    if not uri:
        return False
    scheme = _scheme(uri)
    if scheme in ("http", "https") or uri.startswith("databricks"):
        return True
    if scheme == "sqlite":
        # sqlite:////abs/mlflow.db (absolute) or sqlite:///rel.db (relative to this process's folder)
        db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        return bool(db) and db != ":memory:" and is_shared(db)
    if scheme is not None and scheme.split("+", 1)[0] in _DB_SCHEMES:
        return bool(urlsplit(uri).hostname)
    local = local_path(uri)
    return local is not None and is_shared(local)


def _kind(path: str) -> str:
    return "file" if os.path.isfile(path) else "folder"


def _flag(label: str) -> str | None:
    """The flag a label starts with (``--data`` of ``--data runs/x: its source images``), or None."""
    first = label.split()[0] if label.split() else ""
    return first.rstrip(":,") if first.startswith("--") else None


def _fix(flags: list[str], local_only: Collection[str]) -> str:
    """What to pass instead of local paths given with ``flags``."""
    declared = shared_prefixes()
    now = f" (it is {os.pathsep.join(declared)} now)" if declared else ""
    share = f"declare a folder mounted on every node with {SHARED_ENV}={EXAMPLE_SHARED}"
    urls = [f for f in flags if f not in local_only]
    if not urls:  # flags that take no URL (e.g. the sweeps' --output, Ray Tune's storage)
        return f"{share} and pass a folder in it{now}"
    if len(urls) < len(flags):
        fixed = [f for f in flags if f in local_only]
        return (f"{share} and pass folders in it{now} ({', '.join(fixed)} take{'s' if len(fixed) == 1 else ''} "
                f"no URL; {', '.join(urls)} may be {'s3:// URLs' if len(urls) > 1 else 'an s3:// URL'} instead)")
    several = len(urls) > 1 or len(set(flags)) > 1
    example = f" ({urls[0]} s3://BUCKET/PATH)" if urls[0].startswith("--") else ""
    return f"pass {'s3:// URLs' if several else 'an s3:// URL'}{example}, or {share}{now}"


def path_problems(paths: Mapping[str, str | None], nodes: int, local_only: Collection[str] = ()) -> str | None:
    """The message for the paths of ``paths`` (flag → path; None skipped) that workers on other
    nodes cannot reach, or None when every one is reachable. ``local_only``: flags that take no
    URL (their fix is a shared folder only)."""
    bad = [(flag, str(path)) for flag, path in paths.items() if path is not None and not worker_reachable(str(path))]
    if not bad:
        return None
    fix = _fix([_flag(flag) or flag for flag, _ in bad], local_only)
    if len(bad) == 1:
        flag, path = bad[0]
        return (f"{flag} {path} is a {_kind(local_path(path) or path)} on this machine only, but the Ray cluster "
                f"has {nodes} nodes: {fix}")
    listed = ", ".join(f"{flag} {path}" for flag, path in bad)
    return f"{listed} are on this machine only, but the Ray cluster has {nodes} nodes: {fix}"


def tracking_problem(uri: str | None, nodes: int, users: str) -> str | None:
    """The message for an MLflow store ``uri`` that ``users`` (e.g. "Ray Train's rank 0") on
    other nodes cannot reach, or None."""
    if tracking_uri_reachable(uri):
        return None
    from ldmseg.redact import redact_uri

    where = f"MLflow store {redact_uri(uri)} is on this machine only" if uri else "no MLflow tracking URI is set"
    return f"{where}, but the Ray cluster has {nodes} nodes and it is used by {users} on any of them: {TRACKING_FIX}"


def require_reachable(paths: Mapping[str, str | None], nodes: int, *, what: str = "",
                      tracking_uri: str | None = None, tracking_users: str | None = None,
                      local_only: Collection[str] = ()) -> None:
    """With ``nodes > 1``, raise :class:`ConfigError` naming every path of ``paths`` (flag → path
    handed to workers; None skipped) that workers on other nodes cannot reach, and what to pass
    instead; ``what`` prefixes the message (e.g. ``"ldmseg train: "``). With ``tracking_users``
    (who uses MLflow from the workers, e.g. ``"Tune trials"``) the MLflow URI ``tracking_uri``
    is checked too (:func:`tracking_uri_reachable`); ``local_only`` names flags that take no URL.
    With one node nothing is checked."""
    if nodes <= 1:
        return
    problems = [path_problems(paths, nodes, local_only)]
    if tracking_users:
        problems.append(tracking_problem(tracking_uri, nodes, tracking_users))
    found = [p for p in problems if p]
    if found:
        raise ConfigError(what + "; ".join(found))


def model_uri_users(paths: Mapping[str, str | None], users: str) -> str | None:
    """``users`` if a value of ``paths`` is a ``models:/`` or ``runs:/`` URI (workers then resolve
    it through the MLflow tracking server), else None: the ``tracking_users`` of
    :func:`require_reachable` for commands whose workers use MLflow only to load a model."""
    return users if any(p and str(p).startswith(MODEL_URIS) for p in paths.values()) else None
