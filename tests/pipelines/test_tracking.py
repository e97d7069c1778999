"""MLflow tracking: a real server receives runs; an unreachable one never stops training."""

from __future__ import annotations

import pytest

from pipelines.tracking import Tracker, resolve_tracking_uri


def test_default_uri_is_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("http://x:1", tmp_path) == "http://x:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_tracking_uri("http://x:1", tmp_path) == "http://env:2"


def test_unreachable_server_warns_once_and_goes_on(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from helpers_net import free_port
    from ldmseg.logs import setup_logging

    setup_logging()  # as every command and Ray worker does
    t = Tracker(f"http://127.0.0.1:{free_port()}")
    assert t.start("exp", "run", params={"a": 1}) is None
    t.log_metrics({"loss": 1.0}, step=1)
    t.finish()
    err = capsys.readouterr().err
    assert err.count("[mlflow]") == 1 and "training goes on without tracking" in err
    assert t.disabled


def test_real_server_receives_run_metrics_and_registered_model(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    t = Tracker(mlflow_server)
    run_id = t.start("ldmseg-test", "ae-abc", params={"train": {"lr": 0.001}}, tags={"ldmseg.stage": "ae"})
    assert run_id
    for step in (10, 20):
        t.log_metrics({"loss": 1.0 / step}, step)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    version = t.register(model, "ldmseg-test-ae", alias="current")
    t.finish()
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == pytest.approx([0.1, 0.05])
    mv = client.get_model_version_by_alias("ldmseg-test-ae", "current")
    assert mv.version == version and mv.run_id == run_id
    # re-starting with the same run name reuses the run (a resumed training logs into it)
    assert Tracker(mlflow_server).start("ldmseg-test", "ae-abc") == run_id
