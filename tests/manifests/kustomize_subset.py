"""The small part of kustomize that `manifests/` uses, so the tests can render it without kubectl.

Why our own: CI may have no kubectl, and the manifests are meant for `kubectl apply -k`, so the
tests must see what kustomize would produce. The subset is deliberately tiny (resources, components,
JSON 6902 patches with a kind/name target, strategic-merge patches that merge lists by `name`,
configMapGenerator without name hashes, `images:` on pod templates' containers) and refuses
anything else, so a manifest change that needs more fails loudly here instead of being rendered
wrongly. When kubectl is present, test_manifests.py checks that this renders exactly what
`kubectl kustomize` does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "configMapGenerator",
    "images",
}
_KINDS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}


class KustomizeError(ValueError):
    """The kustomization uses something this subset does not implement, or is malformed."""


def render(directory: Path) -> list[Object]:
    """Render the kustomization in `directory` to a list of Kubernetes objects."""
    return _build(directory, expect="Kustomization")


def _load_kustomization(directory: Path, expect: str) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = set(data) - _KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields not supported by the subset: {sorted(unknown)}")
    if data.get("kind") != expect or data.get("apiVersion") != _KINDS[expect]:
        raise KustomizeError(f"{path}: expected kind {expect} ({_KINDS[expect]})")
    return data


def _build(directory: Path, expect: str, objects: list[Object] | None = None) -> list[Object]:
    data = _load_kustomization(directory, expect)
    out = [] if objects is None else objects
    for entry in data.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            _add(out, render(target), target)
        else:
            _add(out, _load_objects(target), target)
    for generator in data.get("configMapGenerator", []):
        _add(out, [_generate_config_map(directory, generator)], directory)
    for entry in data.get("components", []):
        _build((directory / entry).resolve(), expect="Component", objects=out)
    for patch in data.get("patches", []):
        _apply_patch(directory, patch, out)
    for image in data.get("images", []):
        _set_image(image, out)
    return out


def _set_image(entry: dict[str, Any], objects: list[Object]) -> None:
    """kustomize's image transformer on pod templates: match the name, swap name and/or tag."""
    if set(entry) - {"name", "newName", "newTag"} or "name" not in entry:
        raise KustomizeError(f"images: only name, newName and newTag are supported, got {entry}")
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            if "@" in container["image"]:
                raise KustomizeError(f"images: digest references are not supported: {container}")
            name, _, tag = container["image"].rpartition(":")
            if not name or "/" in tag:  # no tag: the colon (if any) was a registry port
                name, tag = container["image"], ""
            if name != entry["name"]:
                continue
            name = entry.get("newName", name)
            tag = str(entry.get("newTag", tag))
            container["image"] = f"{name}:{tag}" if tag else name


def _load_objects(path: Path) -> list[Object]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object")
    return docs


def object_id(obj: Object) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def _add(out: list[Object], new: list[Object], origin: Path) -> None:
    seen = {object_id(obj) for obj in out}
    for obj in new:
        if object_id(obj) in seen:
            raise KustomizeError(f"{origin}: {object_id(obj)} already defined")
        seen.add(object_id(obj))
        out.append(obj)


def _generate_config_map(directory: Path, spec: dict[str, Any]) -> Object:
    unknown = set(spec) - {"name", "namespace", "files", "options"}
    if unknown:
        raise KustomizeError(f"configMapGenerator: unsupported fields {sorted(unknown)}")
    options = spec.get("options", {})
    no_hash = options.get("disableNameSuffixHash") is True
    if set(options) - {"disableNameSuffixHash", "labels"} or not no_hash:
        raise KustomizeError("configMapGenerator: only labels, and disableNameSuffixHash: true")
    data = {}
    for name in spec.get("files", []):
        path = directory / name
        data[path.name] = path.read_text()
    metadata: dict[str, Any] = {"name": spec["name"]}
    if "namespace" in spec:
        metadata["namespace"] = spec["namespace"]
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[Object]) -> None:
    if set(patch) - {"path", "target"} or set(patch.get("target", {})) - {"kind", "name"}:
        raise KustomizeError(f"patches: only path + target(kind, name) is supported, got {patch}")
    body = yaml.safe_load((directory / patch["path"]).read_text())
    if isinstance(body, list):
        target = patch.get("target")
        if target is None:
            raise KustomizeError(f"{patch['path']}: a JSON 6902 patch needs a target")
    elif isinstance(body, dict):
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    else:
        raise KustomizeError(f"{patch['path']}: neither a JSON 6902 nor a strategic-merge patch")
    matched = [
        obj
        for obj in objects
        if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
    ]
    if not matched:
        raise KustomizeError(f"{patch['path']}: target {target} matches nothing")
    for obj in matched:
        if isinstance(body, list):
            for op in body:
                _apply_op(obj, op)
        else:
            _merge(obj, body, patch["path"])


# Lists a strategic-merge patch merges item by item, keyed by `name` (as Kubernetes' patchMergeKey);
# any other list in a patch would replace, or merge by another key, so the subset refuses it.
_MERGED_BY_NAME = {"containers", "initContainers", "volumes", "env"}


def _merge(node: dict[str, Any], patch: dict[str, Any], origin: str) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _merge(node[key], value, origin)
        elif isinstance(value, list):
            if key not in _MERGED_BY_NAME:
                raise KustomizeError(f"{origin}: list field {key!r} not supported by the subset")
            # Like kustomize: the patch's items come first, in the patch's order, then the rest.
            existing = {item["name"]: item for item in node.get(key, [])}
            merged = []
            for item in value:
                if item["name"] in existing:
                    _merge(existing[item["name"]], item, origin)
                    merged.append(existing[item["name"]])
                else:
                    merged.append(copy.deepcopy(item))
            patched = {item["name"] for item in value}
            node[key] = merged + [i for i in node.get(key, []) if i["name"] not in patched]
        else:
            node[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_op(obj: Object, op: dict[str, Any]) -> None:
    kind = op.get("op")
    *parents, last = _pointer(op["path"])
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if kind == "remove":
        if isinstance(node, list):
            del node[int(last)]
        elif last in node:
            del node[last]
        else:
            raise KustomizeError(f"remove: {op['path']} does not exist")
    elif kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), value)
            else:
                node[int(last)] = value
        else:
            if kind == "replace" and last not in node:
                raise KustomizeError(f"replace: {op['path']} does not exist")
            node[last] = value
    elif kind == "test":
        current = node[int(last)] if isinstance(node, list) else node.get(last)
        if current != op["value"]:
            raise KustomizeError(f"test failed: {op['path']} is {current!r}, not {op['value']!r}")
    else:
        raise KustomizeError(f"JSON patch op {kind!r} not supported")
