"""Kustomize, offline: render a kustomization (resources, JSON6902 patches, ``images``) with no
kustomize binary, for :mod:`pipelines.infra_check` to check the objects an overlay produces.

Supported: ``resources`` (files, or folders with their own kustomization), ``patches`` /
``patchesJson6902`` of JSON6902 operations with a ``target`` of group, version, kind and name, and
``images`` (kustomize's legacy filter, which reaches containers inside custom resources). Anything
else is a :class:`RenderError` rather than a silently different rendering.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "patchesJson6902", "images"}
PATCH_OPS = {"add": {"value"}, "remove": set(), "replace": {"value"}, "move": {"from"}, "copy": {"from"},
             "test": {"value"}}  # op -> its fields besides op and path


class RenderError(Exception):
    """A kustomization that cannot be rendered (missing file, unsupported field, failing patch)."""


def load_documents(path: Path) -> list:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def label(doc) -> str:
    return f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}" if isinstance(doc, dict) and "kind" in doc else "-"


def patch_op_problems(ops) -> list[str]:
    if not isinstance(ops, list):
        return ["a JSON6902 patch must be a list of operations"]
    out = []
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or op.get("op") not in PATCH_OPS:
            out.append(f"operation {i}: 'op' must be one of {', '.join(PATCH_OPS)}")
            continue
        needed = {"op", "path"} | PATCH_OPS[op["op"]]
        out += [f"operation {i} ({op['op']}): '{key}' missing" for key in sorted(needed - set(op))]
        out += [f"operation {i} ({op['op']}): unknown field '{key}'" for key in sorted(set(op) - needed)]
        out += [f"operation {i}: {key} {op[key]!r} is not a JSON pointer ('/a/b/0')" for key in ("path", "from")
                if key in op and not (isinstance(op[key], str) and op[key].startswith("/"))]
    return out


def _walk(doc, pointer: str):
    """(parent, key) of a JSON pointer's target: an index (len for '-') in a list, a key in a mapping."""
    *up, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    node = functools.reduce(lambda n, k: n[int(k)] if isinstance(n, list) else n[k], up, doc)
    return node, ((len(node) if last == "-" else int(last)) if isinstance(node, list) else last)


def apply_json6902(doc: dict, ops: list) -> dict:
    """``doc`` with the JSON6902 (RFC 6902) operations ``ops`` applied, on a copy."""
    doc = copy.deepcopy(doc)
    for op in ops:
        try:
            kind, value = op["op"], copy.deepcopy(op.get("value"))
            if kind in ("move", "copy"):
                node, key = _walk(doc, op["from"])
                value = copy.deepcopy(node[key])
                if kind == "move":
                    del node[key]
            parent, key = _walk(doc, op["path"])
            if kind in ("test", "remove", "replace") and isinstance(parent, dict) and key not in parent:
                raise KeyError(key)
            if kind == "test" and parent[key] != value:
                raise RenderError(f"test {op['path']} failed: {parent[key]!r}, not {value!r}")
            if kind == "remove":
                del parent[key]
            elif kind == "replace":
                parent[key] = value
            elif kind != "test":  # add, move, copy
                parent.insert(key, value) if isinstance(parent, list) else parent.__setitem__(key, value)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise RenderError(f"{op.get('op')} {op.get('path')}: no such path ({exc!r})") from None
    return doc


def set_images(node, images: list[dict]) -> None:
    """kustomize's ``images``: each ``image`` of a ``containers``/``initContainers`` list at any depth
    whose name matches (kustomize's legacy image filter, the one that reaches into custom resources)."""
    for key, value in node.items() if isinstance(node, dict) else enumerate(node if isinstance(node, list) else []):
        for c in value if key in ("containers", "initContainers") and isinstance(value, list) else []:
            image = c.get("image") if isinstance(c, dict) and isinstance(c.get("image"), str) else ""
            name, sep, tag = image.partition("@")
            if not sep and ":" in image.rpartition("/")[2]:
                name, sep, tag = image.rpartition(":")
            for img in (i for i in images if image and i.get("name") == name):
                new = img.get("newName", name)
                c["image"] = f"{new}@{img['digest']}" if "digest" in img else \
                    f"{new}:{img['newTag']}" if "newTag" in img else new + sep + tag
        set_images(value, images)


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    actual = {"group": group, "version": version, "kind": doc.get("kind"), "name": (doc.get("metadata") or {}).get("name")}
    return all(actual.get(key) == value for key, value in target.items())


def render(directory: Path, _seen: tuple = ()) -> list[dict]:
    """The objects of the kustomization in ``directory``: its resources (files, or folders rendered in
    turn), its JSON6902 patches and ``images`` applied; :class:`RenderError` for what fails."""
    directory = directory.resolve()
    path = next((directory / n for n in ("kustomization.yaml", "kustomization.yml") if (directory / n).is_file()), None)
    if path is None or directory in _seen:
        raise RenderError(f"{directory}: {'a kustomization cycle' if path else 'no kustomization.yaml'}")
    k = (load_documents(path) or [{}])[0]
    if unknown := sorted(set(k) - KUSTOMIZATION_FIELDS):
        raise RenderError(f"{path}: {', '.join(unknown)}: not supported by the offline renderer")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        if not (directory / res).exists():
            raise RenderError(f"{path}: resource {res}: no such file or folder")
        docs += render(directory / res, _seen + (directory,)) if (directory / res).is_dir() else load_documents(directory / res)
    for i, patch in enumerate([*(k.get("patches") or []), *(k.get("patchesJson6902") or [])]):
        where, target = f"{path}: patch {patch.get('path', i)}", patch.get("target") or {}
        if set(target) - {"group", "version", "kind", "name"}:
            raise RenderError(f"{where}: only target group, version, kind and name are supported")
        if "path" in patch and not (directory / patch["path"]).is_file():
            raise RenderError(f"{where}: no such file")
        ops = (load_documents(directory / patch["path"]) or [None])[0] if "path" in patch \
            else yaml.safe_load(patch.get("patch") or "null")
        if patch_op_problems(ops):
            raise RenderError(f"{where}: not a valid JSON6902 patch (strategic-merge patches are not rendered offline)")
        if not (hits := [j for j, doc in enumerate(docs) if _matches(doc, target)]):
            raise RenderError(f"{where}: its target {target} matches no object")
        for j in hits:
            try:
                docs[j] = apply_json6902(docs[j], ops)
            except RenderError as exc:
                raise RenderError(f"{where} on {label(docs[j])}: {exc}") from None
    set_images(docs, k.get("images") or [])
    return docs
