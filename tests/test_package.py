"""The installed package: one `shiftlab.*` namespace, configs found through it, usable from any
directory (the user-project test is tests/test_user_project.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_packages_listed_in_pyproject_cover_every_source_folder():
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {"shiftlab.configs"}
    for top in ("trainers", "callbacks", "kernels", "experiments"):
        for init in (REPO / top).rglob("__init__.py"):
            found.add("shiftlab." + ".".join(init.parent.relative_to(REPO).parts))
    assert listed == found


def test_wheel_installs_one_namespace_and_runs_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies come from this interpreter's environment; shiftlab itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("shiftlab-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")))
    assert installed == ["bin", "shiftlab"] or installed == ["shiftlab"], installed
    assert (site / "shiftlab" / "configs" / "train.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = venv / "bin" / "python"
    code = "import sys; from shiftlab.trainers.train import main; sys.argv[0] = 'shiftlab-train'; main()"
    quiet = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=none"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(exe), "-c", code, *quiet], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1].split("run directory: ")[1])
    assert run_dir.is_relative_to(elsewhere / "outputs") and (run_dir / "summary.json").is_file()
    probe = subprocess.run([str(exe), "-c", "import shiftlab.trainers.train as t; print(t.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(site)), probe.stdout + probe.stderr
