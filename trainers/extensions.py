"""Components from outside the package: a user's modules imported before anything is built.

Why: a registered norm / model / optimizer / stopping rule only exists once its module has been
imported, and a user's ``_target_`` must be importable without editing shiftlab or PYTHONPATH.
Three ways in, all run before the config is checked:

* ``imports: [my_pkg.norms, ./local_file.py]`` in the config or on the command line;
* installed distributions that declare an entry point in the ``shiftlab.plugins`` group;
* the working directory is importable for ``shiftlab-train`` as it is for ``python -m``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

ENTRY_POINT_GROUP = "shiftlab.plugins"
_done: set[str] = set()


class ExtensionError(ImportError):
    """A listed module could not be imported (one line: the name and why)."""


def _import_one(name: str) -> None:
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ExtensionError(f"imports={name!r} is not allowed; allowed: an importable module or an "
                                 f"existing .py file ({path} does not exist)")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ExtensionError(f"imports={name!r} is not allowed; allowed: an importable module ({e})") from None


def load_extensions(names: Iterable[str] = ()) -> None:
    """Import ``names`` and every ``shiftlab.plugins`` entry point, once per process."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if ENTRY_POINT_GROUP not in _done:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
        _done.add(ENTRY_POINT_GROUP)
    for name in names or ():
        if name not in _done:
            _import_one(str(name))
            _done.add(name)
