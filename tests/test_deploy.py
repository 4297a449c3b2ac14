"""deploy/k8s: render the kustomize tree, validate every object, check the policies that matter."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")


def _load_render():
    spec = importlib.util.spec_from_file_location("shiftlab_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render.render(K8S / "overlays" / request.param)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _all_pod_templates(docs: list[dict]):
    for d in docs:
        yield from ((f"{d['kind']}/{d['metadata']['name']} {p}", t) for p, t in render.pod_templates(d))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the Python renderer is used)")
@pytest.mark.parametrize("tree", ["base", "overlays/cpu", "overlays/gpu", "overlays/digest"])
def test_python_render_equals_kubectl_kustomize(tree: str) -> None:
    ours = {render.key(d): d for d in render.render(K8S / tree)}
    theirs = {render.key(d): d for d in render.kubectl_render(K8S / tree)}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == theirs[k], k


def test_renders_the_expected_objects(overlay) -> None:
    name, docs = overlay
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ConfigMap", "shiftlab-env"), ("Namespace", "shiftlab"), ("NetworkPolicy", "shiftlab-ddp"),
                     ("NetworkPolicy", "shiftlab-ray-head"), ("NetworkPolicy", "shiftlab-ray-workers"),
                     ("PersistentVolumeClaim", "shiftlab-outputs"), ("PyTorchJob", "shiftlab-ddp"),
                     ("RayCluster", "shiftlab-ray"), ("RayJob", "shiftlab-sweep"),
                     ("ServiceAccount", "shiftlab-trainer")]
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "shiftlab"
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "shiftlab"
    tag = {"cpu": "0.1.0-cpu", "gpu": "0.1.0-cuda"}[name]
    images = {c["image"] for _, t in _all_pod_templates(docs) for c in t["spec"]["containers"]}
    assert images == {f"shiftlab-trainer:{tag}"}


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(render.RenderError, match="key 'namePrefix' is not supported here"):
        render.render(tmp_path)
    doc = {"a": [1, 2], "b": {"c": 1}}
    render.json_patch(doc, {"op": "add", "path": "/a/-", "value": 3})
    render.json_patch(doc, {"op": "add", "path": "/b/x~1y", "value": 4})
    render.json_patch(doc, {"op": "remove", "path": "/b/c"})
    assert doc == {"a": [1, 2, 3], "b": {"x/y": 4}}
    with pytest.raises(render.RenderError, match="does not exist"):
        render.json_patch(doc, {"op": "replace", "path": "/b/nope", "value": 1})


# --------------------------------------------------------------------------------------------
# validation: everything valid, and the validator does catch mistakes
# --------------------------------------------------------------------------------------------
def test_every_object_validates(overlay) -> None:
    _, docs = overlay
    assert render.validate(docs) == []


def _mutated(docs, kind, fn):
    docs = copy.deepcopy(docs)
    fn(_by_kind(docs, kind)[0])
    return docs


@pytest.mark.parametrize("kind, mutate, needle", [
    ("PyTorchJob", lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"), "'two' is not of type 'integer'"),
    ("PyTorchJob", lambda d: d["spec"].update(nprocPerNode=1), "1 is not of type 'string'"),
    ("PyTorchJob", lambda d: d["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .update(comand=["x"]), "comand"),
    ("RayJob", lambda d: d["spec"].update(entrypointt="x"), "'entrypointt' was unexpected"),
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]
     .update(containerPort="6379"), "'6379' is not of type 'integer'"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update(memory="lots"), "lots"),
    ("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes="ReadWriteMany"), "is not of type 'array'"),
    ("ServiceAccount", lambda d: d.update(automountToken=False), "automountToken"),
])
def test_validator_catches_mistakes(kind, mutate, needle) -> None:
    docs = render.render(K8S / "overlays" / "cpu")
    problems = render.validate(_mutated(docs, kind, mutate))
    assert problems and any(needle in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------
def test_pods_are_non_root_bounded_and_share_outputs_and_wandb_secret(overlay) -> None:
    name, docs = overlay
    for where, template in _all_pod_templates(docs):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, where
        assert pod["serviceAccountName"] == "shiftlab-trainer", where
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (where, part)
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            trial_or_ddp = "submitter" not in c["name"] and "head" not in c["name"]
            assert gpus == ("1" if name == "gpu" and trial_or_ddp else None), (where, c["name"])
            if "submitter" in c["name"]:
                continue
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/outputs"] == "outputs" and mounts["/dev/shm"] == "dshm", where
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "shiftlab-wandb", "key": "api-key",
                                                                         "optional": True}, where
            assert c["envFrom"] == [{"configMapRef": {"name": "shiftlab-env"}}], where
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        assert claims in ([], ["shiftlab-outputs"]), where
    pvc = _by_kind(docs, "PersistentVolumeClaim")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_root_filesystems_are_read_only_with_writable_scratch(overlay) -> None:
    """Finding 8: every container read-only; /tmp and $HOME are emptyDirs, /outputs the PVC."""
    _, docs = overlay
    home = re.search(r"ENV HOME=(\S+)", (ROOT / "deploy" / "Dockerfile").read_text()).group(1)
    assert home == re.search(r"ENV HOME=(\S+)", (ROOT / "deploy" / "Dockerfile.cpu").read_text()).group(1)
    n = 0
    for where, template in _all_pod_templates(docs):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in template["spec"]["containers"]:
            n += 1
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (where, c["name"])
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert {"/tmp", home} <= set(mounts), (where, c["name"])
            for path, volume in mounts.items():
                writable = "emptyDir" in volume or volume.get("persistentVolumeClaim", {}).get("claimName") == "shiftlab-outputs"
                assert writable and not any(m.get("readOnly") for m in c["volumeMounts"]), (where, path)
                assert "emptyDir" not in volume or volume["emptyDir"].get("sizeLimit"), (where, path)
    assert n == 5  # Ray head, Ray worker, RayJob submitter, DDP master and worker
    env = _by_kind(docs, "ConfigMap")[0]["data"]
    for var in ("MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "WANDB_DIR"):
        assert env[var].startswith(("/tmp/", "/outputs/")), var
    assert env["SHIFTLAB_ROOT"] == "/outputs"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the only selector form used here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ingress_allowed(policies: list[dict], dst: dict, src: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics for pods of one namespace: allowed if no policy selects
    ``dst`` for Ingress, else if any rule of a selecting policy admits ``src`` on ``port``."""
    selecting = [p for p in policies if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], dst)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            if (peers is None or any(_selects(peer["podSelector"], src) for peer in peers)) and \
                    (ports is None or any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports)):
                return True
    return False


def test_network_policies_close_the_ray_head_to_other_pods(overlay) -> None:
    """Finding 8: the dashboard's job-submission API (8265), GCS (6379) and client port (10001)
    reach the head only from the cluster's own pods; the RayJob submitter only on 8265."""
    _, docs = overlay
    policies = _by_kind(docs, "NetworkPolicy")
    for p in policies:
        assert all("namespaceSelector" not in peer and "ipBlock" not in peer
                   for rule in p["spec"].get("ingress", []) for peer in rule.get("from", [])), p["metadata"]["name"]
    cluster = _by_kind(docs, "RayCluster")[0]
    name = cluster["metadata"]["name"]
    head_ports = {p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == {6379, 8265, 10001}
    # the labels KubeRay puts on the pods it creates, plus the submitter template's own labels
    head = {"ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/is-ray-node": "yes"}
    worker = {"ray.io/cluster": name, "ray.io/node-type": "worker", "ray.io/group": "trials"}
    submitter = _by_kind(docs, "RayJob")[0]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    ddp = {"training.kubeflow.org/job-name": "shiftlab-ddp", "training.kubeflow.org/replica-type": "worker"}
    stranger = {"app": "notebook"}
    for port in sorted(head_ports):
        assert _ingress_allowed(policies, head, worker, port) and _ingress_allowed(policies, head, head, port)
        assert _ingress_allowed(policies, head, submitter, port) == (port == 8265), port
        for other in (stranger, ddp, {"ray.io/cluster": "another-cluster", "ray.io/node-type": "worker"}):
            assert not _ingress_allowed(policies, head, other, port), (other, port)
    assert _ingress_allowed(policies, worker, head, 40000) and not _ingress_allowed(policies, worker, stranger, 40000)
    assert not _ingress_allowed(policies, worker, submitter, 8265)
    assert _ingress_allowed(policies, ddp, {**ddp, "training.kubeflow.org/replica-type": "master"}, 23456)
    assert not _ingress_allowed(policies, ddp, stranger, 23456)
    # the evaluator itself: without the policies, the stranger gets in
    assert _ingress_allowed([], head, stranger, 8265)


def test_digest_overlay_pins_every_image() -> None:
    docs = render.render(K8S / "overlays" / "digest")
    assert render.validate(docs) == []
    images = {c["image"] for _, t in _all_pod_templates(docs) for c in t["spec"]["containers"]}
    assert len(images) == 1 and re.fullmatch(r"shiftlab-trainer@sha256:[0-9a-f]{64}", images.pop())
    # the rest is the CPU overlay unchanged
    cpu = render.render(K8S / "overlays" / "cpu")
    strip = lambda ds: json.dumps(ds, sort_keys=True).replace("shiftlab-trainer:0.1.0-cpu", "X")  # noqa: E731
    assert re.sub(r"shiftlab-trainer@sha256:[0-9a-f]{64}", "X", json.dumps(docs, sort_keys=True)) == strip(cpu)


def test_pytorchjob_matches_its_trainer_overrides(overlay) -> None:
    name, docs = overlay
    job = _by_kind(docs, "PyTorchJob")[0]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(r["replicas"] for r in replicas.values())
    for role, r in replicas.items():
        c = r["template"]["spec"]["containers"][0]
        assert c["name"] == "pytorch" and c["command"] == ["torchrun"]
        assert {"name": "pytorchjob-port", "containerPort": 23456} in c["ports"]
        args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
        assert c["args"][:2] == ["--module", "shiftlab.trainers.train"], role
        assert int(args["trainer.num_nodes"]) == nodes, role
        assert args["trainer.devices"] == job["spec"]["nprocPerNode"], role
        assert args["trainer"] == "ddp" and args["trainer.accelerator"] == name, role
    masters = replicas["Master"]["template"]["spec"]["containers"][0]["args"]
    assert masters == replicas["Worker"]["template"]["spec"]["containers"][0]["args"]


def test_manifest_commands_compose_with_the_real_configs(overlay) -> None:
    """The overrides in the manifests must name config keys and groups that exist."""
    from shiftlab.trainers.orchestration.settings import SweepSettings
    from shiftlab.trainers.orchestration.trial import compose_config, route_overrides

    _, docs = overlay
    job = _by_kind(docs, "PyTorchJob")[0]
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"][2:]
    cfg = compose_config(args)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    entry = shlex.split(_by_kind(docs, "RayJob")[0]["spec"]["entrypoint"])
    assert entry[0] == "shiftlab-sweep"
    settings = SweepSettings.from_cfg(compose_config(route_overrides(entry[1:])))
    assert settings.backend == "ray" and settings.ray.address == "auto"
    assert str(settings.dir) == "/outputs/sweeps/digits_mlp"
    assert _by_kind(docs, "RayJob")[0]["spec"]["clusterSelector"] == {"ray.io/cluster": "shiftlab-ray"}


def test_ray_head_takes_no_trials_and_versions_match() -> None:
    docs = render.render(K8S / "overlays" / "cpu")
    cluster = _by_kind(docs, "RayCluster")[0]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__


def test_crd_schemas_state_their_provenance() -> None:
    readme = (K8S / "crds" / "README.md").read_text()
    for name in render.CUSTOM_SCHEMAS.values():
        schema = json.loads((K8S / "crds" / name).read_text())
        assert "descriptions stripped" in schema["$comment"]
        assert f"`{name}`" in readme
    assert re.search(r"kuberay, v1\.7\.0 \([0-9a-f]{40}\)", readme)
    assert re.search(r"training-operator, v1\.9\.0 \([0-9a-f]{40}\)", readme)


@pytest.mark.parametrize("dockerfile, base", [("Dockerfile", "nvidia/cuda:"), ("Dockerfile.cpu", "python:3.11-slim")])
def test_dockerfiles_are_non_root_and_install_the_sweep_extra(dockerfile: str, base: str) -> None:
    text = (ROOT / "deploy" / dockerfile).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert base in text
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")
    assert '-c constraints.txt -e ".[sweep]"' in text
    for needed in ("configs", "trainers", "callbacks", "kernels"):
        assert f"COPY {needed} {needed}" in text
    assert "torch==" in text or "^torch==" in text
