"""The Airflow DAG (deploy/airflow): parse it, render and validate its pods, run the local mode.

Runs inside the Airflow virtualenv (``.venv-airflow``; tests/test_airflow_venv.py starts it from
the main test run). In shiftlab's own environment, where Airflow is absent, the module is skipped.
The pod specs are rendered against a dummy kubeconfig pointing at 127.0.0.1:1, which is never
contacted. The local-mode DAG runs end to end with ``dag.test()`` on SQLite; its tasks call
shiftlab through ``SHIFTLAB_PYTHON`` (default: the repository's .venv).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if importlib.util.find_spec("airflow") is None:
    pytest.skip("Airflow lives in its own virtualenv (.venv-airflow); see tests/test_airflow_venv.py",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "deploy" / "airflow" / "dags"
_HOME = Path(tempfile.mkdtemp(prefix="shiftlab-airflow-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}
  name: never-contacted
contexts:
- context: {cluster: never-contacted, user: nobody}
  name: never-contacted
current-context: never-contacted
users:
- name: nobody
  user: {token: not-a-real-token}
"""
(_HOME / "kubeconfig").write_text(KUBECONFIG)
# Airflow reads its configuration when first imported: set it before that.
os.environ.update({
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "KUBECONFIG": str(_HOME / "kubeconfig"),
    "SHIFTLAB_WORKDIR": str(_HOME),
    "WANDB_MODE": "disabled",
})
SHIFTLAB_PYTHON = os.environ.get("SHIFTLAB_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
os.environ["SHIFTLAB_PYTHON"] = SHIFTLAB_PYTHON  # read when the DAG file is parsed, not per run

STEPS = ["prepare_data", "train", "evaluate", "publish_report"]
RUN_ID = "manual__2026-11-24T15:00:00+00:00"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags  # the parsed DAGs (DagBag.get_dag would also consult the metadata database)


@pytest.fixture(scope="module")
def dag_module():
    spec = importlib.util.spec_from_file_location("shiftlab_pipeline_dag", DAGS / "shiftlab_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(dag, **changes) -> dict:
    params = {k: dag.params[k] for k in dag.params}
    params.update(changes)
    return params


def _render_pod(dag, step: str, params: dict) -> dict:
    """The pod one task instance would create (rendering a copy: Airflow renders per task instance)."""
    import copy

    from kubernetes.client import ApiClient

    task = copy.deepcopy(dag.get_task(step))
    ctx = {"params": params, "dag": dag, "run_id": RUN_ID, "task": task}
    task.render_template_fields(ctx, jinja_env=dag.get_template_env())
    pod = task.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def test_both_dags_parse_with_the_same_steps(dagbag) -> None:
    assert sorted(dagbag) == ["shiftlab_pipeline", "shiftlab_pipeline_local"]
    for dag_id, dag in dagbag.items():
        assert [t.task_id for t in dag.topological_sort()] == STEPS
        for up, down in zip(STEPS, STEPS[1:]):
            assert dag.get_task(up).downstream_task_ids == {down}
        assert set(dag.params) == {"overrides", "output_root", "min_test_acc"}  # no executable among them
    kinds = {dag_id: {type(t).__name__ for t in dag.tasks} for dag_id, dag in dagbag.items()}
    assert kinds == {"shiftlab_pipeline": {"KubernetesPodOperator"}, "shiftlab_pipeline_local": {"BashOperator"}}


def test_pod_specs_render_from_dag_params_and_validate(dagbag, dag_module) -> None:
    import kubernetes_validate

    dag = dagbag["shiftlab_pipeline"]
    overrides = ["experiment=a b", "optimizer.lr=0.05", "trainer.max_epochs=3"]
    params = _params(dag, overrides=overrides, min_test_acc=0.9)
    for step in STEPS:
        pod = _render_pod(dag, step, params)
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        spec = pod["spec"]
        c = spec["containers"][0]
        expected = dag_module.step_argv(step, params, "shiftlab_pipeline", RUN_ID)
        assert [*c["command"], *c["args"]] == expected, step
        assert c["image"] == "shiftlab-trainer:0.1.0-cpu" and pod["metadata"]["namespace"] == "shiftlab"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["serviceAccountName"] == "shiftlab-trainer"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] in scratch} == {"/tmp", "/home/shiftlab", "/dev/shm"}
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and "nvidia.com/gpu" not in c["resources"]["limits"]
        assert {"mountPath": "/outputs", "name": "outputs"} in c["volumeMounts"]
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shiftlab-outputs"
        wandb = next(e for e in c["env"] if e["name"] == "WANDB_API_KEY")
        assert wandb["valueFrom"]["secretKeyRef"] == {"name": "shiftlab-wandb", "key": "api-key", "optional": True}
    train = _render_pod(dag, "train", params)["spec"]["containers"][0]["args"]
    assert train[:2] == ["-m", "shiftlab.trainers.train"] and train[2:5] == overrides  # one argument per override
    assert "hydra.run.dir=/outputs/pipelines/shiftlab_pipeline/manual__2026-11-24T15_00_00_00_00/train" in train
    evaluate = _render_pod(dag, "evaluate", params)["spec"]["containers"][0]["args"]
    assert evaluate[-2:] == ["--min-test-acc", "0.9"]


def test_gpu_variant_and_bad_input(dag_module, monkeypatch) -> None:
    monkeypatch.setenv("SHIFTLAB_GPUS", "2")
    monkeypatch.setenv("SHIFTLAB_IMAGE", "reg.example/shiftlab-trainer:0.1.0-cuda")
    dag = dag_module.build_dag("k8s")
    pod = _render_pod(dag, "train", _params(dag))
    assert str(pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "2"
    assert pod["spec"]["containers"][0]["image"] == "reg.example/shiftlab-trainer:0.1.0-cuda"
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in _render_pod(dag, "evaluate", _params(dag))["spec"]["containers"][0]["resources"]["limits"]
    with pytest.raises(ValueError, match="mode='slurm' is unknown; allowed: k8s, local"):
        dag_module.build_dag("slurm")
    with pytest.raises(KeyError, match="allowed: prepare_data, train, evaluate, publish_report"):
        dag_module.step_argv("deploy", _params(dag), "d", "r")
    assert dag_module.run_slug("manual__2026-11-24T15:00:00.123+00:00") == "manual__2026-11-24T15_00_00.123_00_00"


def _render_bash(dag, step: str, params: dict) -> str:
    import copy

    task = copy.deepcopy(dag.get_task(step))
    task.render_template_fields({"params": params, "dag": dag, "run_id": RUN_ID, "task": task},
                                jinja_env=dag.get_template_env())
    return task.bash_command


def test_executable_is_fixed_when_the_dag_is_parsed(dagbag, dag_module, monkeypatch) -> None:
    """Finding 8: a triggered run cannot choose what executes on the worker."""
    import shlex

    dag = dagbag["shiftlab_pipeline_local"]
    for step in STEPS:
        # a run's conf naming another executable changes nothing: it is not a parameter
        argv = shlex.split(_render_bash(dag, step, _params(dag, python="/tmp/evil", overrides=["seed=2"])))
        assert argv[0] == SHIFTLAB_PYTHON and argv[1] == "-m" and "/tmp/evil" not in argv, step
    k8s = dagbag["shiftlab_pipeline"].get_task("train")
    assert k8s.cmds == ["python"]
    monkeypatch.setenv("SHIFTLAB_PYTHON", "/opt/other/bin/python")
    rebuilt = dag_module.build_dag("local")
    assert shlex.split(_render_bash(rebuilt, "train", _params(rebuilt)))[0] == "/opt/other/bin/python"
    monkeypatch.setenv("SHIFTLAB_PYTHON", "venv/bin/python")
    with pytest.raises(dag_module.PipelineError, match="SHIFTLAB_PYTHON=venv/bin/python is not allowed; allowed: an "
                                                       "absolute path"):
        dag_module.build_dag("local")


@pytest.mark.parametrize("override", [
    "-m", "--config-dir=/tmp/x", "-cd=/tmp", "hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "+hydra.callbacks.x=1",
    "hydra/launcher=joblib", "+callbacks.x._target_=os.system", "callbacks.x={_target_: os.system, command: id}",
    "+model._partial_=true", "=1",
])
def test_overrides_that_change_the_program_are_refused(dagbag, dag_module, override) -> None:
    dag = dagbag["shiftlab_pipeline"]
    with pytest.raises(dag_module.PipelineError, match=r"^overrides: .* is not allowed; allowed: key=value"):
        dag_module.step_argv("train", _params(dag, overrides=["seed=1", override]), "d", "r")
    ok = ["experiment=a b", "+trainer.limit_train_batches=5", "~shiftlab.callbacks.early_stopping", "optimizer.lr=0.05",
          "data@data2=digits", "++task_name=x_y"]
    assert dag_module.check_overrides(ok) == ok


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_local_dag_runs_end_to_end(dagbag, tmp_path: Path) -> None:
    if not Path(SHIFTLAB_PYTHON).exists():
        pytest.skip(f"no shiftlab environment at {SHIFTLAB_PYTHON}")
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                             timeout=180, env=os.environ.copy())
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    dag = dagbag["shiftlab_pipeline_local"]
    out = tmp_path / "pipelines"
    conf = {"overrides": ["trainer.max_epochs=2", "+trainer.limit_train_batches=5", "seed=1"],
            "output_root": str(out), "min_test_acc": 0.0}
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states == {step: "success" for step in STEPS}
    (root,) = (out / "shiftlab_pipeline_local").iterdir()
    data = json.loads((root / "data.json").read_text())
    assert data["data"]["name"] == "digits" and data["overrides"] == conf["overrides"]
    summary = json.loads((root / "train" / "summary.json").read_text())
    evaluation = json.loads((root / "train" / "eval.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    # evaluate reloaded the best checkpoint: its val/acc is the best one logged during training
    import csv

    with (root / "train" / "metrics.csv").open() as fh:
        logged = [float(r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    assert evaluation["checkpoint"] == "best.ckpt" and abs(evaluation["val/acc"] - max(logged)) < 1e-5
    assert 0.0 < evaluation["test/acc"] <= 1.0
    report = (root / "report" / "report.md").read_text()
    assert "**Best run: `train`**" in report
