"""Run tests/test_airflow.py inside the Airflow virtualenv from the main test run.

Airflow is kept out of shiftlab's environment (deploy/airflow/requirements.txt says why), so its
tests need their own interpreter: ``.venv-airflow`` (``make .venv-airflow``), or the one named by
``SHIFTLAB_AIRFLOW_PYTHON``. Missing on a laptop: skipped. Missing in CI: a failure.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_airflow_suite_in_its_own_virtualenv() -> None:
    python = Path(os.environ.get("SHIFTLAB_AIRFLOW_PYTHON") or ROOT / ".venv-airflow" / "bin" / "python")
    if not python.exists():
        message = f"no Airflow virtualenv at {python}; create it with `make .venv-airflow`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, SHIFTLAB_PYTHON=sys.executable)
    run = subprocess.run([str(python), "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                          "-o", "addopts=", "tests/test_airflow.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 4 and "skipped" not in run.stdout.splitlines()[-1], tail
