"""Turn upstream CustomResourceDefinition yaml files into compact JSON schemas.

Why: RayJob, RayCluster and PyTorchJob are not core Kubernetes kinds, so
``kubernetes-validate`` cannot check them. We keep the ``openAPIV3Schema`` of the
upstream CRDs in the repo (descriptions stripped: they are ~80% of the bytes and
carry no validation meaning) and validate rendered manifests with ``jsonschema``.

Usage: python deploy/k8s/crds/extract_schemas.py CRD.yaml [...] --version v1 -o deploy/k8s/crds
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    """Drop every ``description`` key of a schema tree (keeps property names that are called so)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
            else:
                out[key] = strip_descriptions(value)
        return out
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def extract(crd_path: Path, out_dir: Path, versions: set[str] | None = None) -> list[Path]:
    """Write ``<kind>.<version>.json`` for the served versions (all, or ``versions``) of a CRD."""
    crd = yaml.safe_load(crd_path.read_text())
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    written = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", True) or (versions and version["name"] not in versions):
            continue
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        schema["$comment"] = f"{group}/{version['name']} {kind}, from {crd_path.name}, descriptions stripped"
        path = out_dir / f"{kind.lower()}.{version['name']}.json"
        path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--version", action="append", help="keep only these API versions (repeatable)")
    args = parser.parse_args()
    for crd in args.crds:
        for path in extract(crd, args.out, set(args.version or [])):
            print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
