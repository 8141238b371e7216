"""Every manifest in cluster/kuberay validates against the KubeRay CRDs in ../shared/kuberay-crds,
strictly: an unknown field is an error, as with `kubectl apply --validate=strict`."""

from __future__ import annotations

import copy
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

CRDS = REPO.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def _strict(schema: dict) -> dict:
    """Forbid unknown fields wherever the CRD lists the known ones (the API server prunes them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@cache
def _schemas() -> dict[str, dict]:
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = _strict(v1["schema"]["openAPIV3Schema"])
    return out


def _docs() -> list[tuple[str, dict]]:
    return [
        (f"{p.name}#{i}", d)
        for p in MANIFESTS
        for i, d in enumerate(yaml.safe_load_all(p.read_text()))
        if d
    ]


def test_crds_and_manifests_are_present():
    assert {"RayCluster", "RayJob", "RayService"} <= set(_schemas())
    kinds = {d["kind"] for _, d in _docs()}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds


@pytest.mark.parametrize(("name", "doc"), _docs(), ids=[n for n, _ in _docs()])
def test_manifest_validates_against_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _schemas()[doc["kind"]])


def test_strict_validation_catches_a_misspelt_field():
    doc = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == "RayCluster"))
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(doc, _schemas()["RayCluster"])


def _cluster_specs():
    for name, doc in _docs():
        spec = {
            "RayCluster": lambda s: s,
            "RayJob": lambda s: s.get("rayClusterSpec"),
            "RayService": lambda s: s.get("rayClusterConfig"),
        }[doc["kind"]](doc["spec"])
        if spec:
            yield name, spec


@pytest.mark.parametrize(
    ("name", "spec"), list(_cluster_specs()), ids=[n for n, _ in _cluster_specs()]
)
def test_clusters_autoscale_with_a_cpu_free_head(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert (
            group["minReplicas"]
            <= group.get("replicas", group["minReplicas"])
            <= group["maxReplicas"]
        )


def test_raycluster_has_cpu_and_gpu_worker_groups():
    (cluster,) = [d for _, d in _docs() if d["kind"] == "RayCluster"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (
        "nvidia.com/gpu" in gpu_limits
        and groups["gpu"]["maxReplicas"] > groups["gpu"]["minReplicas"]
    )
    cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits


@pytest.mark.parametrize(("name", "doc"), [(n, d) for n, d in _docs() if d["kind"] == "RayJob"])
def test_rayjob_entrypoint_names_a_real_job_and_config(name, doc):
    """The image puts the repo at /home/ray/app; every script and config in the entrypoint (one
    command, or several joined by `&&`) must exist in this repo."""
    commands = doc["spec"]["entrypoint"].split("&&")
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "python"
        script = Path(args[1].removeprefix("/home/ray/app/"))
        config = Path(args[args.index("--config") + 1].removeprefix("/home/ray/app/"))
        assert (REPO / script).is_file() and (REPO / config).is_file(), command
        assert f"ray_jobs/{script.stem}.py --config {config}" in (REPO / config).read_text()


def test_rayservice_serves_the_gpu_serve_config_on_an_autoscaling_gpu_group():
    """serveConfigV2 is serve_configs/llm-gpu.yaml (the same text `serve deploy` takes), and the
    GPU group can grow to fit Serve's max replicas."""
    (service,) = [d for n, d in _docs() if n.startswith("rayservice-llm.yaml")]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "serve_configs" / "llm-gpu.yaml").read_text())

    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (gpu,) = [
        g
        for g in groups
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    gpus_per_pod = int(
        gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert gpu["maxReplicas"] > gpu["minReplicas"]
    needed = 0
    for llm in serve_config["applications"][0]["args"]["llm_configs"]:
        per_replica = llm["engine_kwargs"].get("tensor_parallel_size", 1)
        needed += per_replica * llm["deployment_config"]["autoscaling_config"]["max_replicas"]
        accelerator = llm["accelerator_type"]
        assert f"accelerator_type:{accelerator}" in gpu["rayStartParams"]["resources"]
    assert gpu["maxReplicas"] * gpus_per_pod >= needed


def test_agent_rayservice_serves_the_agent_config_and_its_cpu_group_fits_the_cpu_replicas():
    """serveConfigV2 is serve_configs/agent-gpu.yaml; the CPU group can grow to hold every CPU
    replica at Serve's maxima, and every group has the secrets the apps read."""
    (service,) = [d for n, d in _docs() if n.startswith("rayservice-agent.yaml")]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "serve_configs" / "agent-gpu.yaml").read_text())

    cluster = service["spec"]["rayClusterConfig"]
    (cpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "cpu"]
    cpus_per_pod = int(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    needed = 0.0
    for app in serve_config["applications"]:
        args = app["args"]
        for key in (
            "ingress_deployment_config",
            "retriever_deployment_config",
            "deployment_config",
        ):
            if key in args:
                options = args[key]
                per = options.get("ray_actor_options", {}).get("num_cpus", 1)
                needed += per * options.get("autoscaling_config", {}).get("max_replicas", 1)
    assert cpu["maxReplicas"] * cpus_per_pod >= needed, needed
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {"LLM_API_KEY", "AGENT_POSTGRES_DSN"} <= env, group.get("groupName", "head")
