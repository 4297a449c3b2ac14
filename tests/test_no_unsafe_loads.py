"""No code outside tests unpickles untrusted bytes (finding 8 of issue 15).

A static check over every Python file of the project except tests/: checkpoints load with
``torch.load(..., weights_only=True)`` (trainers/checkpoint_io.py), data through allow-list
unpicklers, YAML with the safe loader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "pandas", "pd"}


def unsafe_calls(source: str) -> list[str]:
    """``line: what`` for every call that may run code from the bytes it reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        where = f"{node.lineno}: {owner + '.' if owner else ''}{name}"
        if isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is False:
            found.append(f"{where} weights_only=False")
        elif owner in PICKLERS and name in ("load", "loads", "Unpickler", "open", "read_pickle"):
            found.append(where)
        elif owner == "torch" and name == "load" and not (
                isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            found.append(f"{where} without weights_only=True")
        elif name == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
            found.append(f"{where} allow_pickle=True")
        elif owner == "yaml" and (name in ("unsafe_load", "full_load") or (name == "load" and not (
                isinstance(kw.get("Loader"), ast.Attribute) and "Safe" in kw["Loader"].attr))):
            found.append(where)
    return found


def project_files() -> list[Path]:
    skip = {"tests", "outputs", "data", "shared", "multirun"}  # top-level folders that are not project code
    return sorted(p for p in ROOT.rglob("*.py")
                  if (parts := p.relative_to(ROOT).parts)[0] not in skip and not any(x.startswith(".") for x in parts))


@pytest.mark.parametrize("snippet", [
    "torch.load(p, weights_only=False)", "torch.load(p)", "pickle.load(f)", "pickle.loads(b)",
    "pickle.Unpickler(f).load()", "np.load(p, allow_pickle=True)", "yaml.load(s)", "yaml.unsafe_load(s)",
    "joblib.load(p)", "x.load_state(weights_only=False)",
])
def test_detector_flags_unsafe_loads(snippet: str) -> None:
    assert unsafe_calls(snippet), snippet


def test_detector_passes_safe_loads() -> None:
    assert unsafe_calls("torch.load(p, weights_only=True)\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
                        "np.load(p)\nclass U(pickle.Unpickler):\n    pass\nU(f).load()\n") == []


def test_no_unsafe_loads_outside_tests() -> None:
    files = project_files()
    assert any(p.name == "cifar10.py" for p in files) and any(p.name == "pipeline.py" for p in files)
    problems = [f"{p.relative_to(ROOT)}:{hit}" for p in files for hit in unsafe_calls(p.read_text())]
    assert problems == []
