"""shiftlab training pipeline for Airflow 3: prepare data -> train -> evaluate -> publish the report.

Two DAGs from one definition, with the same tasks and the same command lines:

* ``shiftlab_pipeline`` -- every task is a ``KubernetesPodOperator`` running the shiftlab image
  (non-root, outputs volume, W&B key from the ``shiftlab-wandb`` Secret; see deploy/k8s).
* ``shiftlab_pipeline_local`` -- every task is a local process (``BashOperator``), for a laptop
  or a single machine, using the Python of the shiftlab environment (``SHIFTLAB_PYTHON``).

Hydra overrides come from the DAG params (``overrides``: a list, e.g. ``["experiment=...",
"trainer.max_epochs=5"]``), so a triggered run can change any config value ``shiftlab-train``
accepts -- but not what runs: the executable is fixed when the DAG is parsed (``python`` in the
image; ``SHIFTLAB_PYTHON`` for local mode), and overrides that would make Hydra import or call
something else (``_target_``-style keys, ``hydra.*``, command-line flags) are refused.
Outputs of one DAG run go to ``<output_root>/<dag id>/<run id>/``: ``data.json``, ``train/``
(the run directory, with ``eval.json`` after evaluation) and ``report/``.

Parse-time settings (environment of the Airflow scheduler / dag processor):
``SHIFTLAB_IMAGE`` (default shiftlab-trainer:0.1.0-cpu), ``SHIFTLAB_NAMESPACE`` (shiftlab),
``SHIFTLAB_GPUS`` (GPUs for the train task, default 0), ``SHIFTLAB_PYTHON`` (local mode: an
absolute path to the shiftlab environment's python; default ``python`` from the worker's PATH),
``SHIFTLAB_WORKDIR`` (local mode), ``SHIFTLAB_PIPELINE_ROOT`` (local mode output root).

Airflow stays out of shiftlab's own environment (its SQLAlchemy and other pins conflict): install
it into its own virtualenv with deploy/airflow/constraints.txt.
"""
from __future__ import annotations

import os
import re
import shlex
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param

STEPS = ("prepare_data", "train", "evaluate", "publish_report")
K8S_ROOT = "/outputs/pipelines"
K8S_PYTHON = "python"  # the image's interpreter (deploy/Dockerfile*: /opt/venv on PATH)
# key=value with a config path for a key; no flags (-m, --config-dir, ...), nothing Hydra would
# import or call (_target_, _partial_, _args_, ...), no hydra.* (callbacks, env, launcher)
_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?(?P<key>[A-Za-z0-9_][A-Za-z0-9_.@/-]*)(?:=|$)")
_INSTANTIATE = re.compile(r"_(?:target|partial|args|recursive|convert)_")


class PipelineError(ValueError):
    """A DAG run parameter or deployment setting that is not allowed; one line."""


def parse_time_python(env: dict[str, str] | None = None) -> str:
    """The local-mode interpreter, fixed when the DAG file is parsed (not a run-time parameter:
    whoever may trigger a run must not choose what executes on the worker)."""
    value = (os.environ if env is None else env).get("SHIFTLAB_PYTHON", "").strip() or "python"
    if value != "python" and not os.path.isabs(value):
        raise PipelineError(f"SHIFTLAB_PYTHON={value} is not allowed; allowed: an absolute path to the shiftlab "
                            "environment's python (or unset: python from PATH)")
    return value


def check_overrides(overrides: list[Any]) -> list[str]:
    """The ``overrides`` DAG param as strings, refusing what could change the program run."""
    out = []
    for item in overrides:
        text = str(item)
        m = _OVERRIDE.match(text)
        key = m.group("key") if m else ""
        if not m or re.split(r"[./@]", key)[0] == "hydra" or _INSTANTIATE.search(text):
            raise PipelineError(f"overrides: {text!r} is not allowed; allowed: key=value config overrides "
                                "(no command-line flags, hydra.* keys or _target_-style keys)")
        out.append(text)
    return out


def run_slug(run_id: str) -> str:
    """A path- and Hydra-safe directory name for a DAG run id (ids carry ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_") or "run"


def step_argv(step: str, params: dict[str, Any], dag_id: str, run_id: str, python: str = "python") -> list[str]:
    """The command line of one step; the same for the pod and the local process."""
    root = f"{params['output_root'].rstrip('/')}/{dag_id}/{run_slug(run_id)}"
    overrides = check_overrides(list(params.get("overrides") or []))
    if step == "prepare_data":
        return [python, "-m", "shiftlab.trainers.orchestration.pipeline", "prepare", "--out", root, *overrides]
    if step == "train":
        return [python, "-m", "shiftlab.trainers.train", *overrides, f"hydra.run.dir={root}/train", "print_config=false",
                "trainer.enable_progress_bar=false"]
    if step == "evaluate":
        return [python, "-m", "shiftlab.trainers.orchestration.pipeline", "evaluate", f"{root}/train",
                "--min-test-acc", str(float(params.get("min_test_acc", 0.0)))]
    if step == "publish_report":
        return [python, "-m", "shiftlab.trainers.orchestration.report", root]
    raise KeyError(f"step {step!r} is unknown; allowed: {', '.join(STEPS)}")


def _params(output_root: str) -> dict[str, Param]:
    return {
        "overrides": Param([], type="array", items={"type": "string"},
                           description="Hydra overrides for shiftlab-train, e.g. experiment=<name>"),
        "output_root": Param(output_root, type="string", description="where this DAG's run directories go"),
        "min_test_acc": Param(0.0, type="number", minimum=0, maximum=1,
                              description="evaluate fails below this test accuracy"),
    }


def _k8s_task(step: str, dag: DAG):
    from kubernetes.client import models as k8s

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    gpus = int(os.environ.get("SHIFTLAB_GPUS", "0") or 0) if step == "train" else 0
    limits = {"cpu": "4", "memory": "8Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return KubernetesPodOperator(
        task_id=step,
        dag=dag,
        name=f"shiftlab-{step.replace('_', '-')}",
        namespace=os.environ.get("SHIFTLAB_NAMESPACE", "shiftlab"),
        image=os.environ.get("SHIFTLAB_IMAGE", "shiftlab-trainer:0.1.0-cpu"),
        cmds=[K8S_PYTHON],
        # native rendering: the macro returns the argument list itself
        arguments="{{ shiftlab_argv('" + step + "', params, dag.dag_id, run_id)[1:] }}",
        service_account_name="shiftlab-trainer",
        automount_service_account_token=False,
        env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name="shiftlab-env"))],
        env_vars=[k8s.V1EnvVar(name="WANDB_API_KEY", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name="shiftlab-wandb", key="api-key", optional=True)))],
        # read-only root filesystem: scratch and caches in emptyDirs, results on the volume
        volumes=[k8s.V1Volume(name="outputs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                     claim_name="shiftlab-outputs")),
                 k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="2Gi")),
                 k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="4Gi")),
                 k8s.V1Volume(name="home", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi"))],
        volume_mounts=[k8s.V1VolumeMount(name="outputs", mount_path="/outputs"),
                       k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                       k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
                       k8s.V1VolumeMount(name="home", mount_path="/home/shiftlab")],
        container_resources=k8s.V1ResourceRequirements(requests={"cpu": "1", "memory": "2Gi"}, limits=limits),
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, run_as_group=1000,
                                                  fs_group=1000,
                                                  seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(allow_privilege_escalation=False,
                                                         read_only_root_filesystem=True,
                                                         capabilities=k8s.V1Capabilities(drop=["ALL"])),
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if gpus else None,
        labels={"app.kubernetes.io/part-of": "shiftlab", "shiftlab/step": step},
        get_logs=True,
        do_xcom_push=False,
        on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=600,
    )


def _local_task(step: str, dag: DAG):
    from airflow.providers.standard.operators.bash import BashOperator

    workdir = os.environ.get("SHIFTLAB_WORKDIR") or os.getcwd()
    return BashOperator(
        task_id=step,
        dag=dag,
        bash_command="{{ shiftlab_shell('" + step + "', params, dag.dag_id, run_id) }}",
        cwd=workdir,
        # (templated natively: a value like "1" would become an int, so only words here)
        env={"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")},
        append_env=True,
    )


def build_dag(mode: str) -> DAG:
    """``mode``: ``k8s`` (pods) or ``local`` (processes); same steps, same command lines."""
    if mode not in ("k8s", "local"):
        raise ValueError(f"mode={mode!r} is unknown; allowed: k8s, local")
    local = mode == "local"
    python = parse_time_python() if local else K8S_PYTHON
    root = os.environ.get("SHIFTLAB_PIPELINE_ROOT", os.path.join(os.getcwd(), "outputs", "pipelines")) if local \
        else K8S_ROOT
    dag = DAG(
        dag_id="shiftlab_pipeline_local" if local else "shiftlab_pipeline",
        description="shiftlab: prepare data -> train -> evaluate -> publish the report",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        params=_params(root),
        render_template_as_native_obj=True,
        user_defined_macros={
            "shiftlab_argv": lambda step, params, dag_id, run_id: step_argv(step, params, dag_id, run_id),
            "shiftlab_shell": lambda step, params, dag_id, run_id: shlex.join(
                step_argv(step, params, dag_id, run_id, python=python)),
        },
        default_args={"retries": 0 if local else 1, "retry_delay": timedelta(minutes=2)},
        tags=["shiftlab"],
    )
    make = _local_task if local else _k8s_task
    tasks = [make(step, dag) for step in STEPS]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
    return dag


shiftlab_pipeline = build_dag("k8s")
shiftlab_pipeline_local = build_dag("local")
