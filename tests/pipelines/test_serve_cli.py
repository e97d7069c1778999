"""ldmseg serve's argument checks (before Ray starts), its config section and the Serve config file."""

from __future__ import annotations

import pytest
import yaml

from helpers_cli import fails, good, no_ray  # noqa: F401 - fixtures
from paths import REPO


@pytest.mark.parametrize("extra, names", [
    (["--port", "0"], ["--port 0"]),
    (["serve.nope=1"], ["serve.nope"]),
    (["train_ae.lr=1"], ["train_ae.lr", "serve.*"]),
    (["serve.max_batch_size=32"], ["serve.max_ongoing_requests", "serve.max_batch_size"]),
    (["serve.max_replicas=0"], ["serve.max_replicas"]),
    (["--sampling", "no-such-preset"], ["no-such-preset"]),
    (["--config", "no-such-config"], ["no-such-config"]),
])
def test_bad_arguments_fail_in_one_line_before_ray(extra, names, good, no_ray, capsys):
    fails(["serve", "--model", good["model"], *extra], capsys, *names)


def test_a_missing_model_fails_before_ray(good, no_ray, tmp_path, capsys):
    fails(["serve", "--model", str(tmp_path / "nothing")], capsys, "nothing")


def test_shipped_serve_config_loads_and_infra_serve_config_is_valid_for_ray():
    from ray.serve.schema import ServeDeploySchema

    from ldmseg.config import load_config

    cfg = load_config("conf/serve.yaml")
    assert cfg.serve.max_ongoing_requests >= cfg.serve.max_batch_size
    doc = yaml.safe_load((REPO / "infra" / "serve" / "ldmseg.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(doc)  # unknown fields and wrong types fail here
    app = schema.applications[0]
    assert app.import_path == "pipelines.serve:app_builder" and app.args["model"]
    assert {d.name for d in app.deployments} == {"Ingress", "ModelServer"}
    model = next(d for d in app.deployments if d.name == "ModelServer")
    assert model.max_ongoing_requests >= 8 and model.autoscaling_config["max_replicas"] >= 1
    broken = {**doc["applications"][0], "deployments": [{"name": "Ingress", "num_replicas": "many"}]}
    with pytest.raises(Exception, match="num_replicas"):  # a wrong type fails
        ServeDeploySchema.parse_obj({**doc, "applications": [broken]})


def test_the_serve_config_import_path_builds_the_application(good):
    """What ``serve run infra/serve/ldmseg.yaml`` calls: ``app_builder(args)`` (no Ray needed to build)."""
    from ray.serve import Application

    from pipelines.serve import app_builder

    app = app_builder({"model": good["model"], "config": "conf/serve.yaml", "overrides": ["serve.max_batch_size=4"]})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="need 'model'"):
        app_builder({"config": "conf/serve.yaml"})


def test_a_relative_model_folder_is_handed_to_workers_as_an_absolute_path(good, monkeypatch):
    from pathlib import Path

    from pipelines.tracking import pin_model_uri

    folder = Path(good["model"])
    monkeypatch.chdir(folder.parent)
    assert pin_model_uri(folder.name) == (str(folder.resolve()), None)
    assert pin_model_uri("s3://bucket/model") == ("s3://bucket/model", None)
    assert pin_model_uri("models:/ldm/3") == ("models:/ldm/3", "3")
