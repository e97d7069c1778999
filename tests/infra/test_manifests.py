"""The manifests of infra/ (KubeRay, MLflow, Ray Serve) check clean with ``ldmseg check-infra``, and
the checker catches what a deploy would reject: misspelled fields and wrong types (KubeRay CRD
schemas, kubernetes-validate), bad submission modes, long names, entrypoints the ldmseg CLI would
refuse, a Serve config drifted from infra/serve/ldmseg.yaml, overlays whose patches fail.

Offline and fast: no cluster, no network, no Ray started. Broken copies are written to tmp_path.
"""

from __future__ import annotations

import argparse
import shutil

import pytest
import yaml

from paths import REPO
from pipelines import infra_check
from pipelines.infra_check import check_paths
from pipelines.kustomize_render import apply_json6902, label, render

BASE = REPO / "infra" / "kuberay" / "base"
OVERLAYS = REPO / "infra" / "kuberay" / "overlays"


def messages(problems) -> str:
    return "\n".join(map(str, problems))


def broken_copy(tmp_path, name: str, old: str, new: str, count: int = 1):
    """``base/NAME`` with the first ``count`` occurrences of ``old`` replaced by ``new``, in tmp_path."""
    text = (BASE / name).read_text()
    assert old in text, f"{old!r} not in {name}: the test needs updating"
    path = tmp_path / name
    path.write_text(text.replace(old, new, count))
    return path


def edited_copy(tmp_path, name: str, edit):
    """``base/NAME`` with its first document changed by ``edit(doc)``, in tmp_path."""
    docs = list(yaml.safe_load_all((BASE / name).read_text()))
    edit(docs[0])
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_every_manifest_under_infra_checks_clean():
    problems = check_paths([REPO / "infra"])
    assert problems == [], messages(problems)


def test_the_crds_are_in_the_repository_with_their_license():
    crds = REPO / infra_check.CRDS
    assert {p.name for p in crds.iterdir()} >= {"LICENSE", "README.md", "ray.io_rayclusters.yaml",
                                                 "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"}


@pytest.mark.parametrize("name, old, new", [
    ("rayjob-train-ae.yaml", "rayClusterSpec:", "rayClusterSpc:"),
    ("raycluster.yaml", "rayStartParams:", "rayStartParms:"),
    ("rayservice.yaml", "envFrom:", "envFrm:"),  # deep in an embedded pod template
])
def test_a_misspelled_field_of_a_kuberay_object_fails_naming_it(tmp_path, name, old, new):
    problems = check_paths([broken_copy(tmp_path, name, old, new)])
    assert problems and all(p.file.endswith(name) for p in problems)
    assert new.rstrip(":") in messages(problems) and "was unexpected" in messages(problems)


def test_a_wrong_type_fails(tmp_path):
    def edit(doc):
        doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
        doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams are strings

    text = messages(check_paths([edited_copy(tmp_path, "raycluster.yaml", edit)]))
    assert "workerGroupSpecs.0.maxReplicas: 'eight' is not of type 'integer'" in text
    assert "rayStartParams.num-cpus: 0 is not of type 'string'" in text


def test_a_bad_submission_mode_fails(tmp_path):
    problems = check_paths([broken_copy(tmp_path, "rayjob-segment.yaml", "submissionMode: K8sJobMode",
                                        "submissionMode: K8sMode")])
    assert [p.obj for p in problems] == ["RayJob/ldmseg-segment"]
    assert "submissionMode: 'K8sMode' is not one of" in problems[0].message


@pytest.mark.parametrize("name, kind, length", [
    ("raycluster.yaml", "RayCluster", 54),
    ("mlflow.yaml", "Deployment", 54),
    ("rayjob-preprocess.yaml", "RayJob", 48),  # KubeRay: 47 at most, its cluster's name adds 6
])
def test_a_name_too_long_fails(tmp_path, name, kind, length):
    long = ("ldmseg-" + "x" * 60)[:length]
    problems = check_paths([edited_copy(tmp_path, name, lambda doc: doc["metadata"].update(name=long))])
    assert f"{kind}/{long}" in [p.obj for p in problems], messages(problems)
    assert f"{length} characters, more than" in messages(problems)


@pytest.mark.parametrize("old, new, expected", [
    ("--storage s3://", "--storge s3://", "ldmseg train: unrecognized arguments: --storge"),
    ("--data s3://ldmseg/shards --config coco", "--config coco", "required: --data"),
    ("ldmseg train ae", "ldmseg train xl", "invalid choice: 'xl'"),
    ("ldmseg train ae", "python -m pipelines.train ae", "is not 'ldmseg COMMAND ...'"),
])
def test_an_entrypoint_the_cli_would_refuse_fails(tmp_path, old, new, expected):
    problems = check_paths([broken_copy(tmp_path, "rayjob-train-ae.yaml", old, new)])
    assert len(problems) == 1 and problems[0].obj == "RayJob/ldmseg-train-ae"
    assert expected in problems[0].message and "spec.entrypoint" in problems[0].message


def test_entrypoints_of_sub_commands_and_chains_are_parsed_by_their_own_parsers():
    good = "ldmseg tune sampling --model models:/m@a --data s3://b/shards --steps 5 && ldmseg segment " \
           "--model m --input s3://b/in --output s3://b/out segment.num_gpus=1"
    assert infra_check.entrypoint_problems(good) == []
    bad = infra_check.entrypoint_problems(good.replace("--steps", "--stepz") + " && ldmseg nope")
    assert len(bad) == 2 and "unrecognized arguments: --stepz" in bad[0] and "'ldmseg nope'" in bad[1]
    assert "--help" in infra_check.entrypoint_problems("ldmseg segment --help")[0]


def test_a_rayservice_whose_serve_config_drifted_from_infra_serve_fails(tmp_path):
    problems = check_paths([broken_copy(tmp_path, "rayservice.yaml", "max_replicas: 4", "max_replicas: 3")])
    assert len(problems) == 1 and problems[0].obj == "RayService/ldmseg-serve"
    assert "drifted from" in problems[0].message and "autoscaling_config.max_replicas: 3 here, 4 there" \
        in problems[0].message


def test_a_serve_config_with_an_unknown_or_wrong_field_fails(tmp_path):
    path = tmp_path / "serve.yaml"
    text = (REPO / "infra" / "serve" / "ldmseg.yaml").read_text()
    path.write_text(text.replace("max_queued_requests: 64", "max_queued_request: 64").replace(
        "num_replicas: 1", "num_replicas: many"))
    text = messages(check_paths([path]))
    assert "deployments[1].max_queued_request: unknown field of DeploymentSchema" in text
    assert "num_replicas" in text and "many" in text


def test_a_deployment_with_a_misspelled_field_fails_with_kubernetes_validate(tmp_path):
    problems = check_paths([broken_copy(tmp_path, "mlflow.yaml", "readinessProbe:", "readinesProbe:")])
    assert [p.obj for p in problems] == ["Deployment/ldmseg-mlflow"]
    assert "'readinesProbe' was unexpected" in problems[0].message


def test_both_overlays_render_and_differ_as_intended():
    cpu, gpu = render(OVERLAYS / "cpu"), render(OVERLAYS / "gpu")
    assert [label(d) for d in cpu] == [label(d) for d in gpu] == \
        [label(d) for d in render(BASE)]
    for doc in cpu:
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        assert "gpu" not in [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)
    images = {line.split("image:")[1].strip() for line in yaml.safe_dump_all(cpu).splitlines() if "image:" in line}
    assert images == {"ldmseg:0.1.0-cpu"}
    by_name = {d["metadata"]["name"]: d for d in gpu}
    gpu_groups = [g for g in by_name["ldmseg-serve"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == "1"]
    assert gpu_groups and gpu_groups[0]["minReplicas"] == 1
    assert "segment.num_gpus=1" in by_name["ldmseg-segment"]["spec"]["entrypoint"]
    assert "num_gpus: 1" in by_name["ldmseg-serve"]["spec"]["serveConfigV2"]


def overlay(tmp_path, ops: list, target: dict) -> object:
    """A copy of base/ and an overlay of it in tmp_path with one JSON6902 patch → the overlay folder."""
    shutil.copytree(BASE, tmp_path / "base")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "patch.yaml").write_text(yaml.safe_dump(ops))
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../base"],
        "patches": [{"path": "patch.yaml", "target": target}]}))
    return tmp_path / "overlay"


def test_a_rendered_overlay_is_checked_too(tmp_path):
    folder = overlay(tmp_path, [{"op": "replace", "path": "/spec/submissionMode", "value": "Bogus"}],
                     {"kind": "RayJob", "name": "ldmseg-preprocess"})
    problems = check_paths([folder])
    assert [(p.file, p.obj) for p in problems] == [(f"{folder} (rendered)", "RayJob/ldmseg-preprocess")]
    assert "'Bogus' is not one of" in problems[0].message


@pytest.mark.parametrize("ops, target, expected", [
    ([{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "gpu"}], {"kind": "RayCluster"},
     "test /spec/workerGroupSpecs/0/groupName failed: 'cpu', not 'gpu'"),
    ([{"op": "remove", "path": "/spec/workerGroupSpecs/5"}], {"kind": "RayCluster"}, "no such path"),
    ([{"op": "remove", "path": "/spec/entrypoint"}], {"kind": "RayJob", "name": "ldmseg-nothing"}, "matches no object"),
    ([{"op": "delete", "path": "/spec"}], {"kind": "RayCluster"}, "not a valid JSON6902 patch"),
])
def test_an_overlay_whose_patch_fails_is_a_problem(tmp_path, ops, target, expected):
    problems = check_paths([overlay(tmp_path, ops, target) / "kustomization.yaml"])
    assert any(expected in p.message and "cannot render" in p.message for p in problems), messages(problems)


def test_json6902_operations():
    doc = {"a": {"b": [1, 2]}, "c": "x"}
    ops = [{"op": "add", "path": "/a/b/-", "value": 3}, {"op": "add", "path": "/a/b/0", "value": 0},
           {"op": "replace", "path": "/c", "value": "y"}, {"op": "copy", "from": "/c", "path": "/d"},
           {"op": "move", "from": "/d", "path": "/a/e"}, {"op": "remove", "path": "/a/b/1"},
           {"op": "test", "path": "/a/b", "value": [0, 2, 3]}, {"op": "add", "path": "/f~1g", "value": {}}]
    assert apply_json6902(doc, ops) == {"a": {"b": [0, 2, 3], "e": "y"}, "c": "y", "f/g": {}}
    assert doc == {"a": {"b": [1, 2]}, "c": "x"}  # on a copy


def test_the_command_exits_0_clean_1_with_problems_2_for_bad_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    infra_check.add_arguments(parser)
    assert infra_check.run(parser.parse_args([str(REPO / "infra" / "serve")])) == 0
    bad = broken_copy(tmp_path, "rayjob-segment.yaml", "submissionMode: K8sJobMode", "submissionMode: Nope")
    assert infra_check.run(parser.parse_args([str(bad)])) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{bad}: RayJob/ldmseg-segment: spec.submissionMode")
    assert infra_check.run(parser.parse_args([str(tmp_path / "missing")])) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_kustomization_listing_a_missing_file_cannot_render(tmp_path):
    shutil.copytree(BASE, tmp_path / "base")
    (tmp_path / "base" / "rayjob-segment.yaml").unlink()
    problems = check_paths([tmp_path / "base"])
    assert len(problems) == 1 and "resource rayjob-segment.yaml: no such file or folder" in problems[0].message
