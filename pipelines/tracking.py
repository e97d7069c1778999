"""MLflow tracking that never stops training.

The embedded default is a sqlite store (``sqlite:///RUN_DIR/mlflow.db``) with artifacts under
``RUN_DIR/mlartifacts``; ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` select any tracking
server instead. If the server cannot be reached, training goes on and says so once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ldmseg.redact import redact_uri
from ldmseg.logs import get_logger

log = get_logger("mlflow")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def filter_value(value: str) -> str:
    """``value`` quoted as a string literal of an MLflow search filter (never pasted in raw: a
    name with a quote would break the filter or change its meaning)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters, which MLflow's search filters cannot express; "
                     "choose a name without one of them")


def resolve_tracking_uri(configured: str | None, run_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` > the config's ``tracking.tracking_uri`` > sqlite in ``run_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str, run_dir: str | Path) -> str | None:
    """Artifact location for a new experiment: ``RUN_DIR/mlartifacts`` for a local sqlite store
    (MLflow's default would be ``./mlruns`` in the current directory), the server's own otherwise."""
    if tracking_uri.startswith("sqlite:") or "://" not in tracking_uri:
        return (Path(run_dir).resolve() / "mlartifacts").as_uri()
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run, addressed by id so that a Ray worker can log into the driver's run.

    Every call is guarded: the first failure logs one warning, later calls are skipped.
    """

    def __init__(self, tracking_uri: str, run_id: str | None = None, *, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.artifact_root = artifact_root
        self.disabled = False
        self._client = None

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        if self.disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # unreachable server, bad URI, ...: warn once, go on
            self.disabled = True
            log.warning(f"tracking at {redact_uri(self.tracking_uri)} failed during {what} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); training goes on without tracking")
            return None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # each process opening a sqlite store logs "Creating initial MLflow database tables..."
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- runs ---------------------------------------------------------------------------------
    def start(self, experiment: str, run_name: str, params: dict | None = None,
              tags: dict | None = None) -> str | None:
        """Create (or reuse, by run name) a run in ``experiment``; returns its id."""

        def _start():
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(experiment, artifact_location=self.artifact_root)
                except Exception:  # a concurrent trial created it first
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            found = self.client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = {filter_value(run_name)}",
                                            max_results=1)
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
            else:
                run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
                if params:
                    flat = _flatten(params)
                    from mlflow.entities import Param

                    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
                    for i in range(0, len(items), 100):
                        self.client.log_batch(run_id, params=items[i:i + 100])
            return run_id

        self.run_id = self._call("start", _start)
        return self.run_id

    def ensure_experiment(self, experiment: str) -> None:
        """Create ``experiment`` now (before concurrent trials would race to create it)."""

        def _ensure():
            if self.client.get_experiment_by_name(experiment) is None:
                self.client.create_experiment(experiment, artifact_location=self.artifact_root)

        self._call("create experiment", _ensure)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self._call("log_artifact", fn, self.run_id, str(path), artifact_path)

    def log_image(self, image, artifact_file: str) -> None:
        """Log an (H, W, 3) uint8 array as a PNG artifact at ``artifact_file`` (e.g. ``validation/x.png``)."""
        if self.run_id:
            self._call("log_image", self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            for k, v in tags.items():
                self._call("set_tag", self.client.set_tag, self.run_id, k, str(v))

    def register(self, model_dir: str | Path, name: str, alias: str = "current") -> str | None:
        """Log ``model_dir`` as the run's ``model`` artifact and register it as ``name@alias``."""
        if not self.run_id:
            return None

        def _register():
            self.client.log_artifacts(self.run_id, str(model_dir), "model")
            try:
                self.client.get_registered_model(name)
            except Exception:
                self.client.create_registered_model(name)
            source = f"runs:/{self.run_id}/model"
            mv = self.client.create_model_version(name, source, run_id=self.run_id)
            self.client.set_registered_model_alias(name, alias, mv.version)
            return mv.version

        return self._call("register", _register)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call("finish", self.client.set_terminated, self.run_id, status)


def download_model(uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """``models:/name@alias`` (or ``runs:/...``) → a local checkpoint folder under ``dst``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    # the URI is passed to each call, never set globally: mlflow.set_tracking_uri would also set
    # MLFLOW_TRACKING_URI for everything this process does afterwards
    pinned, version = pin_model_uri(uri, tracking_uri)
    if version is not None:  # models:/NAME/VERSION → where the registry stores that version
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        uri = client.get_model_version_download_uri(pinned[len("models:/"):].rsplit("/", 1)[0], version)
    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    return Path(path)


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``models:/NAME@ALIAS`` → (``models:/NAME/VERSION``, VERSION): the version the alias points to
    now, so that every worker of a job loads the same weights even if the alias moves meanwhile.
    ``models:/NAME/VERSION`` → (uri, VERSION); a local folder → (its absolute path, None); any
    other URI → (uri, None)."""
    if not uri.startswith("models:/"):
        # a local folder as an absolute path: Ray workers need not share the driver's working dir
        return (str(Path(uri).resolve()) if "://" not in uri and Path(uri).exists() else uri), None
    name, _, rest = uri[len("models:/"):].partition("@")
    if not rest:  # models:/NAME/VERSION (or a stage name, which MLflow resolves itself)
        version = name.rsplit("/", 1)[-1]
        return uri, version if version.isdigit() else None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, rest).version
    return f"models:/{name}/{version}", str(version)


def resolve_model(uri: str, workdir: Path, tracking_uri: str | None = None) -> str:
    """A checkpoint folder path for ``uri`` (downloading ``models:/``/``runs:/`` URIs)."""
    if uri.startswith(("models:/", "runs:/")):
        return str(download_model(uri, workdir / "model", tracking_uri))
    if not Path(uri).is_dir() and "://" not in uri:
        raise SystemExit(f"ldmseg: model {uri} is not a folder; pass a checkpoint folder "
                         "(e.g. runs/quickstart/models/ldm) or models:/ldmseg-ldm@current")
    return uri
