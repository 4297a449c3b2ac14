"""Render and validate the kustomize tree offline.

Why a renderer of our own: ``kubectl kustomize`` is the reference (the tests compare against it
where it is installed), but CI machines and laptops may lack kubectl. This renders the subset of
kustomize the manifests use -- ``resources``, ``namespace``, ``labels``, ``images`` and JSON-6902
``patches`` with a ``target`` -- and refuses any other key, so it cannot silently diverge.

Validation: core kinds with ``kubernetes-validate`` (strict: unknown fields are errors; the pod
templates embedded in RayCluster / RayJob / PyTorchJob are checked as core ``PodTemplate`` objects
too); the custom kinds with ``jsonschema`` against the upstream CRD schemas in ``crds/`` (see
``crds/README.md``), made strict the same way.

Usage: python deploy/k8s/render.py deploy/k8s/overlays/gpu [--validate] [--kubectl]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

HERE = Path(__file__).resolve().parent
CRD_DIR = HERE / "crds"
K8S_VERSION = "1.32.0"  # oldest Kubernetes the manifests are validated against
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
CUSTOM_SCHEMAS = {("ray.io/v1", "RayCluster"): "raycluster.v1.json", ("ray.io/v1", "RayJob"): "rayjob.v1.json",
                  ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.v1.json"}

Doc = dict[str, Any]


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or a patch does not apply."""


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def render(directory: Path | str) -> list[Doc]:
    """All objects of the kustomization in ``directory``, transformers applied."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        raise RenderError(f"{directory} has no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(kust) - SUPPORTED_KEYS)
    if unknown:
        raise RenderError(f"{kfile}: key {unknown[0]!r} is not supported here; allowed: {', '.join(sorted(SUPPORTED_KEYS))}")
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kust.get("patches", []):
        _apply_patch_entry(directory, patch, docs)
    if kust.get("namespace"):
        for d in docs:
            if d.get("kind") not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for spec in kust.get("labels", []):
        if spec.get("includeSelectors") or spec.get("includeTemplates"):
            raise RenderError(f"{kfile}: labels with includeSelectors/includeTemplates are not supported here")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(spec.get("pairs", {}))
    for image in kust.get("images", []):
        for d in docs:
            _set_image(d, image)
    return docs


def _apply_patch_entry(directory: Path, entry: Doc, docs: list[Doc]) -> None:
    target = entry.get("target")
    if not target:
        raise RenderError(f"{directory}: only JSON-6902 patches with a target are supported here")
    ops = yaml.safe_load((directory / entry["path"]).read_text()) if "path" in entry else yaml.safe_load(entry["patch"])
    if not isinstance(ops, list):
        raise RenderError(f"{directory}: patch {entry.get('path', '<inline>')} is not a JSON-6902 list")
    matched = [d for d in docs if _matches(d, target)]
    if not matched:
        raise RenderError(f"{directory}: patch target {target} matches no object")
    for d in matched:
        for op in ops:
            json_patch(d, op)


def _matches(doc: Doc, target: Doc) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = doc.get("metadata", {})
    checks = {"group": group, "version": version, "kind": doc.get("kind"), "name": meta.get("name"),
              "namespace": meta.get("namespace")}
    return all(checks[k] == v for k, v in target.items() if k in checks)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Doc, op: Doc) -> None:
    """Apply one RFC-6902 operation (add, replace, remove) in place."""
    kind = op.get("op")
    if kind not in ("add", "replace", "remove"):
        raise RenderError(f"patch op {kind!r} is not supported here; allowed: add, replace, remove")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError):
            raise RenderError(f"patch path {op['path']} does not exist (at {part!r})") from None
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, value)
        elif index >= len(node):
            raise RenderError(f"patch path {op['path']} does not exist")
        elif kind == "replace":
            node[index] = value
        else:
            del node[index]
    else:
        if kind != "add" and last not in node:
            raise RenderError(f"patch path {op['path']} does not exist")
        if kind == "remove":
            del node[last]
        else:
            node[last] = value


def _containers(node: Any) -> Iterator[Doc]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _image_name(image: str) -> str:
    image = image.split("@", 1)[0]
    head, sep, tail = image.rpartition(":")
    return head if sep and "/" not in tail else image


def _set_image(doc: Doc, spec: Doc) -> None:
    for c in _containers(doc):
        if "image" in c and _image_name(c["image"]) == spec["name"]:
            name = spec.get("newName", spec["name"])
            if spec.get("digest"):
                c["image"] = f"{name}@{spec['digest']}"
            else:
                old = c["image"]
                tag = spec.get("newTag") or (old.rpartition(":")[2] if _image_name(old) != old else None)
                c["image"] = f"{name}:{tag}" if tag else name


def kubectl_render(directory: Path | str) -> list[Doc] | None:
    """``kubectl kustomize`` output, or ``None`` where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True,
                         timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def key(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc.get("metadata", {})
    return doc.get("apiVersion", ""), doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def strict_schema(node: Any) -> Any:
    """Close every object schema that lists its properties (what ``kubectl --validate=strict`` does
    for unknown fields), except where the CRD keeps unknown fields on purpose."""
    if isinstance(node, dict):
        out = {k: strict_schema(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def load_custom_schema(api_version: str, kind: str) -> Doc:
    name = CUSTOM_SCHEMAS.get((api_version, kind))
    if name is None:
        raise KeyError(f"no schema kept for {api_version} {kind}; known: {sorted(CUSTOM_SCHEMAS)}")
    return strict_schema(json.loads((CRD_DIR / name).read_text()))


def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(JSON path, template) of every pod template inside a custom object."""
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        yield "spec.headGroupSpec.template", spec["headGroupSpec"]["template"]
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            yield f"spec.workerGroupSpecs[{i}].template", group["template"]
    elif doc.get("kind") == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        if "rayClusterSpec" in spec:
            yield from pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    elif doc.get("kind") == "PyTorchJob":
        for role, replica in spec.get("pytorchReplicaSpecs", {}).items():
            yield f"spec.pytorchReplicaSpecs.{role}.template", replica["template"]


def validate(docs: Iterable[Doc], k8s_version: str = K8S_VERSION) -> list[str]:
    """Every problem found, as ``kind/name: message`` lines (empty: all valid)."""
    import jsonschema
    import kubernetes_validate

    problems = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        api = doc.get("apiVersion", "")
        if (api, doc.get("kind")) in CUSTOM_SCHEMAS:
            validator = jsonschema.Draft7Validator(load_custom_schema(api, doc["kind"]))
            for err in validator.iter_errors(doc):
                path = ".".join(str(p) for p in err.absolute_path)
                problems.append(f"{where}: {path}: {err.message}")
            for path, template in pod_templates(doc):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                problems += _core_problems(kubernetes_validate, wrapped, k8s_version, f"{where} {path}")
        else:
            problems += _core_problems(kubernetes_validate, doc, k8s_version, where)
    return problems


def _core_problems(kv: Any, doc: Doc, version: str, where: str) -> list[str]:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{where}: {path}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [f"{where}: no schema: {e}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render (and validate) a shiftlab kustomization offline")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--kubectl", action="store_true", help="render with kubectl kustomize instead")
    args = parser.parse_args(argv)
    try:
        docs = kubectl_render(args.directory) if args.kubectl else render(args.directory)
    except RenderError as e:
        print(f"render: error: {e}", file=sys.stderr)
        return 2
    if docs is None:
        print("render: error: kubectl is not installed; drop --kubectl", file=sys.stderr)
        return 2
    if args.validate:
        problems = validate(docs)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
