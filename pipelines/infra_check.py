"""``ldmseg check-infra [PATH ...]``: check the Kubernetes and Ray Serve files under infra/, offline.

What ``kubectl apply`` or KubeRay would reject, and job entrypoints that would fail on their first
line, found with no cluster, no network and no Ray. Each YAML document under PATH (default
``infra/``; folders named ``crds`` hold schema data and are skipped) is checked as what it is:

- RayCluster, RayJob, RayService: the CRD schemas of KubeRay v1.7.0 (``infra/kuberay/crds/v1.7.0``)
  as JSON Schema with ``additionalProperties: false`` wherever ``properties`` are listed, so a
  misspelled field or a wrong type fails; then what no schema sees: KubeRay's own rules (names of
  at most 53 characters, 47 for RayJob/RayService, DNS-1035; token auth needs rayVersion >= 2.52.0;
  minReplicas <= maxReplicas), ``submissionMode`` among KubeRay's four, each RayJob ``entrypoint``
  an ``ldmseg COMMAND ...`` (``&&`` may chain several) that COMMAND's own argparse parser accepts,
  and ``serveConfigV2`` valid for Ray Serve and agreeing with ``infra/serve/ldmseg.yaml``: the same
  applications exactly as written; after an overlay, the same names, import paths, routes, args and
  deployments (an overlay may change resources, e.g. GPUs);
- other Kubernetes objects (Deployment, Service, Secret, ...): ``kubernetes-validate``'s strict
  schemas (unknown fields fail) and the 53-character name rule;
- a Ray Serve config (a mapping with ``applications``): Ray's ``ServeDeploySchema`` and the keys it
  would silently ignore;
- a kustomization: its fields, and it is rendered here as kustomize would (its resources must
  exist); the objects of one that changes them (JSON6902 ``patches``/``patchesJson6902``,
  ``images``) are checked as above once rendered (a patch that matches nothing or fails, e.g. a
  ``test`` operation, is a problem too);
- a JSON6902 patch (a list of operations): each operation's shape.

One problem per line (``FILE: KIND/NAME: what is wrong``); exit 0 when clean, 1 with problems, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.kustomize_render import (KUSTOMIZATION_FIELDS, RenderError, label, load_documents, patch_op_problems,
                                       render)

REPO = Path(__file__).resolve().parents[1]
CRDS = Path("infra/kuberay/crds/v1.7.0")
SERVE_CONFIG = Path("infra/serve/ldmseg.yaml")
KUBERNETES_VERSION = "1.33.0"
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
MAX_NAME = {"RayJob": 47, "RayService": 47}  # KubeRay: 53 less the 6 of its clusters' suffix; else 53
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")



@dataclass(frozen=True)
class Problem:
    file: str
    obj: str  # KIND/NAME, or "-" when the document has none
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.obj}: {self.message}"


def _line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def to_json_schema(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema: ``nullable`` as a null type, descriptions and
    ``x-kubernetes-*`` dropped, ``additionalProperties: false`` where ``properties`` are listed and
    unknown fields are not preserved (KubeRay's CRDs preserve none)."""
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key not in ("description", "nullable") and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(crd_dir: Path, kind: str, version: str):
    """The jsonschema validator of ``kind`` at ``version`` from the CRD files in ``crd_dir``, or None."""
    import jsonschema

    for path in sorted(crd_dir.glob(f"*_{kind.lower()}s.yaml")):
        with open(path) as f:
            crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for ver in crd["spec"]["versions"] if crd.get("spec", {}).get("names", {}).get("kind") == kind else []:
            if ver["name"] == version:
                return jsonschema.Draft7Validator(to_json_schema(ver["schema"]["openAPIV3Schema"]))
    return None


def schema_problems(doc: dict, crd_dir: Path, kubernetes_version: str) -> list[str]:
    kind, api = doc["kind"], str(doc["apiVersion"])
    if kind in KUBERAY_KINDS:
        if (validator := crd_validator(crd_dir, kind, api.rpartition("/")[2])) is None:
            return [f"no CRD schema for {kind} {api} in {crd_dir}"]
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors[:20]]
    try:
        from kubernetes_validate import utils as kv
    except ImportError:
        return ["not validated: kubernetes-validate is not installed (pip install 'ldmseg[dev]')"]
    try:
        kv.validate(doc, kubernetes_version, strict=True)
    except kv.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"]
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        return [e.message]
    return []


def serve_problems(config) -> list[str]:
    """Ray's ``ServeDeploySchema`` on a Serve config, plus the keys it would silently ignore."""
    from ray.serve import schema as s

    if not isinstance(config, dict):
        return ["a Serve config must be a mapping"]
    checks = [("", config, s.ServeDeploySchema), ("http_options.", config.get("http_options"), s.HTTPOptionsSchema)]
    for i, app in enumerate(config.get("applications") or []):
        checks.append((f"applications[{i}].", app, s.ServeApplicationSchema))
        for j, dep in enumerate((app.get("deployments") if isinstance(app, dict) else None) or []):
            checks.append((f"applications[{i}].deployments[{j}].", dep, s.DeploymentSchema))
            checks.append((f"applications[{i}].deployments[{j}].ray_actor_options.",
                           dep.get("ray_actor_options") if isinstance(dep, dict) else None, s.RayActorOptionsSchema))
    out = [f"{where}{key}: unknown field of {model.__name__}" for where, obj, model in checks
           if isinstance(obj, dict) for key in obj if key not in model.model_fields]
    try:
        s.ServeDeploySchema.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, or a ValueError of Ray's own validators
        out.append(_line(exc))
    return out


def _differences(a, b, where: str = ""):
    """Paths where ``a`` and ``b`` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _differences(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} here, {b!r} there"


def drift_problems(config: dict, reference: Path, exact: bool) -> list[str]:
    """serveConfigV2's applications against those of the Serve config file ``reference``; not
    ``exact``: only what an overlay may not change (names, import paths, routes, args, deployments)."""
    if not reference.is_file():
        return [f"serveConfigV2: {reference}, the Serve config to compare with, is missing"]
    apps, ref = config.get("applications") or [], (load_documents(reference) or [{}])[0].get("applications") or []
    if not exact:
        apps, ref = ([{"name": a.get("name"), "import_path": a.get("import_path"), "route_prefix": a.get("route_prefix"),
                       "args": a.get("args"), "deployments": sorted(str(d.get("name")) for d in a.get("deployments") or [])}
                      for a in x if isinstance(a, dict)] for x in (apps, ref))
    return [f"serveConfigV2 drifted from {reference}: applications{d}" for d in list(_differences(apps, ref))[:10]]


@functools.lru_cache(maxsize=None)
def _parser(name: str) -> argparse.ArgumentParser:
    from pipelines.cli import command_parser

    return command_parser(name)[1]


def parse_problem(name: str, argv: list[str]) -> str | None:
    """Why ``ldmseg NAME ARGV`` would stop in argument parsing (pipelines.cli's own parser and
    parsing, their SystemExit caught and its message kept), or None when the arguments parse."""
    from pipelines.cli import parse_command_args

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            parse_command_args(_parser(name), argv)
        except SystemExit as exc:
            lines = [line.split(": error: ", 1)[1] for line in err.getvalue().splitlines() if ": error: " in line]
            return lines[-1] if lines else f"the command would exit (status {exc.code}) before running (--help?)"
    return None


def entrypoint_problems(entrypoint) -> list[str]:
    """Each ``&&``-separated part must be ``ldmseg COMMAND ARGS`` that COMMAND's own parser accepts
    (a parse failure is reported, never an exit)."""
    from pipelines.cli import COMMANDS

    try:
        words = shlex.split(entrypoint) if isinstance(entrypoint, str) else []
    except ValueError as exc:
        return [f"spec.entrypoint: {exc}"]
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    out = []
    for part in parts:
        if len(part) < 2 or part[0] != "ldmseg" or part[1] not in COMMANDS:
            out.append(f"spec.entrypoint: {' '.join(part[:3])!r} is not 'ldmseg COMMAND ...' with a command of "
                       f"{', '.join(COMMANDS)}")
            continue
        if (problem := parse_problem(part[1], part[2:])) is not None:
            out.append(f"spec.entrypoint: ldmseg {part[1]}: {problem}")
    return out


def cluster_problems(spec, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return []
    version = tuple(int(x) for x in re.findall(r"\d+", str(spec.get("rayVersion", "")))[:3])
    out = []
    if (spec.get("authOptions") or {}).get("mode") == "token" and version < (2, 52, 0):
        out.append(f"{where}.rayVersion: token auth needs Ray >= 2.52.0, got {spec.get('rayVersion')!r}")
    groups = [g for g in spec.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    return out + [f"{where}.workerGroupSpecs[{g.get('groupName')}]: minReplicas {g['minReplicas']} > maxReplicas "
                  f"{g['maxReplicas']}" for g in groups if isinstance(g.get("minReplicas"), int)
                  and isinstance(g.get("maxReplicas"), int) and g["minReplicas"] > g["maxReplicas"]]


def kuberay_problems(doc: dict, reference: Path, rendered: bool) -> list[str]:
    kind, spec, name = doc["kind"], doc.get("spec"), str((doc.get("metadata") or {}).get("name", ""))
    out = [] if DNS1035.match(name) else [f"metadata.name {name!r}: not a DNS-1035 label (KubeRay requires one)"]
    if not isinstance(spec, dict):
        return out
    if kind == "RayCluster":
        return out + cluster_problems(spec, "spec")
    if kind == "RayJob":
        if (mode := spec.get("submissionMode", "K8sJobMode")) not in SUBMISSION_MODES:
            out.append(f"spec.submissionMode: {mode!r} is not one of {', '.join(sorted(SUBMISSION_MODES))}")
        if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
            out.append("spec: SidecarMode takes no submitterPodTemplate or submitterConfig")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            out.append("spec: one of rayClusterSpec or clusterSelector must be set")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        except yaml.YAMLError as exc:
            out.append(f"spec.runtimeEnvYAML: not YAML ({_line(exc)})")
        return out + entrypoint_problems(spec.get("entrypoint")) + cluster_problems(spec.get("rayClusterSpec"),
                                                                                      "spec.rayClusterSpec")
    out += cluster_problems(spec.get("rayClusterConfig"), "spec.rayClusterConfig")  # a RayService
    try:
        config = yaml.safe_load(spec.get("serveConfigV2") or "")
    except yaml.YAMLError as exc:
        return out + [f"spec.serveConfigV2: not YAML ({_line(exc)})"]
    if config is None:
        return out + ["spec.serveConfigV2: missing (KubeRay would deploy no Serve application)"]
    out += [f"spec.serveConfigV2: {p}" for p in serve_problems(config)]
    return out + (drift_problems(config, reference, exact=not rendered) if isinstance(config, dict) else [])


def document_problems(doc, crds: Path, reference: Path, kubernetes_version: str, rendered: bool = False) -> list[str]:
    if isinstance(doc, list):
        return patch_op_problems(doc)
    if not isinstance(doc, dict):
        return ["not a mapping: expected a Kubernetes object, a Serve config, a kustomization or a patch"]
    if doc.get("kind") == "Kustomization":
        return [f"{key}: not supported by the offline renderer" for key in sorted(set(doc) - KUSTOMIZATION_FIELDS)]
    if "kind" not in doc and "applications" in doc:
        return serve_problems(doc)
    if "kind" not in doc or "apiVersion" not in doc:
        return ["no apiVersion/kind: not a Kubernetes object (nor a Serve config, kustomization or patch)"]
    name, limit = str((doc.get("metadata") or {}).get("name", "")), MAX_NAME.get(doc["kind"], 53)
    out = [] if name else ["metadata.name: missing"]
    out += [f"metadata.name {name!r}: {len(name)} characters, more than {limit}"] if len(name) > limit else []
    out += schema_problems(doc, crds, kubernetes_version)
    return out + (kuberay_problems(doc, reference, rendered) if doc["kind"] in KUBERAY_KINDS else [])


def check_paths(paths, *, crds: Path | None = None, serve_config: Path | None = None,
                kubernetes_version: str = KUBERNETES_VERSION) -> list[Problem]:
    """Every problem of the YAML files under ``paths``, and of the kustomizations there, rendered.
    ``crds`` and ``serve_config`` default to infra/'s under the working directory, else this tree's."""
    crds = Path(crds) if crds else CRDS if CRDS.is_dir() else REPO / CRDS
    reference = Path(serve_config) if serve_config else SERVE_CONFIG if SERVE_CONFIG.is_file() else REPO / SERVE_CONFIG
    paths = [Path(p) for p in paths]
    problems = [Problem(str(p), "-", "no such file or folder") for p in paths if not p.exists()]
    files = [f for p in paths if p.exists() for f in (sorted(
        x for x in p.rglob("*") if x.suffix in (".yaml", ".yml") and x.is_file() and "crds" not in x.relative_to(p).parts)
        if p.is_dir() else [p])]
    for file in files:
        try:
            docs = load_documents(file)
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem(str(file), "-", f"unreadable YAML: {_line(exc)}"))
            continue
        for doc in docs:
            problems += [Problem(str(file), label(doc), m) for m in document_problems(doc, crds, reference, kubernetes_version)]
            if not (isinstance(doc, dict) and doc.get("kind") == "Kustomization"):
                continue
            where = f"{file.parent} (rendered)"
            try:  # every kustomization renders; the objects of one that changes them are checked again
                rendered = render(file.parent)
            except (RenderError, OSError, yaml.YAMLError) as exc:
                problems.append(Problem(where, "-", f"cannot render: {_line(exc)}"))
                continue
            if doc.get("patches") or doc.get("patchesJson6902") or doc.get("images"):
                problems += [Problem(where, label(obj), m) for obj in rendered
                             for m in document_problems(obj, crds, reference, kubernetes_version, rendered=True)]
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", default=["infra"],
                        help="YAML files or folders to check (default: infra)")
    parser.add_argument("--crds", default=None, help=f"folder of the KubeRay CRDs (default: {CRDS})")
    parser.add_argument("--serve-config", default=None,
                        help=f"the Serve config a RayService must agree with (default: {SERVE_CONFIG})")


def run(args: argparse.Namespace) -> int:
    bad = [p for p in args.paths if not Path(p).exists()] + [p for p in (args.crds,) if p and not Path(p).is_dir()]
    if bad := bad + [p for p in (args.serve_config,) if p and not Path(p).is_file()]:
        print(f"ldmseg check-infra: no such file or folder: {', '.join(bad)}", file=sys.stderr)
        return 2
    problems = check_paths(args.paths, crds=args.crds, serve_config=args.serve_config)
    for problem in problems:
        print(problem)
    print(f"ldmseg check-infra: {len(problems)} problem(s) in {', '.join(args.paths)}", file=sys.stderr)
    return 1 if problems else 0
