"""shiftlab training pipeline for Airflow 3: prepare data -> train -> evaluate -> publish the report.

Two DAGs from one definition, with the same tasks and the same command lines:

* ``shiftlab_pipeline`` -- every task is a ``KubernetesPodOperator`` running the shiftlab image
  (non-root, outputs volume, W&B key from the ``shiftlab-wandb`` Secret; see deploy/k8s).
* ``shiftlab_pipeline_local`` -- every task is a local process (``BashOperator``), for a laptop
  or a single machine, using the Python of the shiftlab environment (``params.python``).

Hydra overrides come from the DAG params (``overrides``: a list, e.g. ``["experiment=...",
"trainer.max_epochs=5"]``), so a triggered run can change anything ``shiftlab-train`` accepts.
Outputs of one DAG run go to ``<output_root>/<dag id>/<run id>/``: ``data.json``, ``train/``
(the run directory, with ``eval.json`` after evaluation) and ``report/``.

Parse-time settings (environment of the Airflow scheduler / dag processor):
``SHIFTLAB_IMAGE`` (default shiftlab-trainer:0.1.0-cpu), ``SHIFTLAB_NAMESPACE`` (shiftlab),
``SHIFTLAB_GPUS`` (GPUs for the train task, default 0), ``SHIFTLAB_PYTHON`` and
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


def run_slug(run_id: str) -> str:
    """A path- and Hydra-safe directory name for a DAG run id (ids carry ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_") or "run"


def step_argv(step: str, params: dict[str, Any], dag_id: str, run_id: str, python: str = "python") -> list[str]:
    """The command line of one step; the same for the pod and the local process."""
    root = f"{params['output_root'].rstrip('/')}/{dag_id}/{run_slug(run_id)}"
    overrides = [str(o) for o in params.get("overrides") or []]
    if step == "prepare_data":
        return [python, "-m", "trainers.pipeline", "prepare", "--out", root, *overrides]
    if step == "train":
        return [python, "-m", "trainers.train", *overrides, f"hydra.run.dir={root}/train", "print_config=false",
                "trainer.enable_progress_bar=false"]
    if step == "evaluate":
        return [python, "-m", "trainers.pipeline", "evaluate", f"{root}/train",
                "--min-test-acc", str(float(params.get("min_test_acc", 0.0)))]
    if step == "publish_report":
        return [python, "-m", "trainers.report", root]
    raise KeyError(f"step {step!r} is unknown; allowed: {', '.join(STEPS)}")


def _params(output_root: str) -> dict[str, Param]:
    return {
        "overrides": Param([], type="array", items={"type": "string"},
                           description="Hydra overrides for shiftlab-train, e.g. experiment=<name>"),
        "output_root": Param(output_root, type="string", description="where this DAG's run directories go"),
        "min_test_acc": Param(0.0, type="number", minimum=0, maximum=1,
                              description="evaluate fails below this test accuracy"),
        "python": Param(os.environ.get("SHIFTLAB_PYTHON", "python"), type="string",
                        description="local mode: Python of the shiftlab environment"),
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
        cmds=["python"],
        # native rendering: the macro returns the argument list itself
        arguments="{{ shiftlab_argv('" + step + "', params, dag.dag_id, run_id)[1:] }}",
        service_account_name="shiftlab-trainer",
        automount_service_account_token=False,
        env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name="shiftlab-env"))],
        env_vars=[k8s.V1EnvVar(name="WANDB_API_KEY", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name="shiftlab-wandb", key="api-key", optional=True)))],
        volumes=[k8s.V1Volume(name="outputs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                     claim_name="shiftlab-outputs")),
                 k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="2Gi"))],
        volume_mounts=[k8s.V1VolumeMount(name="outputs", mount_path="/outputs"),
                       k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        container_resources=k8s.V1ResourceRequirements(requests={"cpu": "1", "memory": "2Gi"}, limits=limits),
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, run_as_group=1000,
                                                  fs_group=1000,
                                                  seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(allow_privilege_escalation=False,
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
                step_argv(step, params, dag_id, run_id, python=params["python"])),
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
