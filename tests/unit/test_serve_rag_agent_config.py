"""The RAG and agent serve configs: every app's args validate, the apps of one file refer to each
other correctly, the CPU files fit two logical CPUs, and the cluster files reuse the LLM app of
llm-gpu.yaml (the RayService's) verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from workloads.common.config import ConfigError
from workloads.serve.agent.config import parse_agent_args
from workloads.serve.llm.config import model_id, parse_app_args
from workloads.serve.rag.config import parse_rag_args

CONFIGS = REPO / "serve_configs"
COMPOSED = ["rag-cpu.yaml", "rag-gpu.yaml", "agent-cpu.yaml", "agent-gpu.yaml"]
LLM, RAG, AGENT = (
    "workloads.serve.llm.app:build_app",
    "workloads.serve.rag.app:build_app",
    "workloads.serve.agent.app:build_app",
)


def _apps(name: str) -> dict[str, dict]:
    config = yaml.safe_load((CONFIGS / name).read_text())
    return {a["name"]: a for a in config["applications"]} | {"_http": config["http_options"]}


@pytest.mark.parametrize("name", COMPOSED)
def test_apps_validate_and_refer_to_each_other(name: str):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    apps = _apps(name)
    served = {
        a["name"]: {model_id(c) for c in parse_app_args(a["args"]).llm_configs}
        for a in apps.values()
        if a.get("import_path") == LLM
    }
    rags = [a for a in apps.values() if a.get("import_path") == RAG]
    assert rags, name
    for app in rags:
        cfg = parse_rag_args(app["args"])
        assert cfg.model in served[cfg.llm_app] and cfg.api_key_env == "LLM_API_KEY"
    for app in (a for a in apps.values() if a.get("import_path") == AGENT):
        cfg = parse_agent_args(app["args"])
        assert cfg.retriever.app in apps and apps[cfg.retriever.app]["import_path"] == RAG
        assert cfg.llm.base_url == f"http://127.0.0.1:{apps['_http']['port']}/v1"
        assert cfg.llm.model in served["llm"]
        assert [s.name for s in cfg.mcp_servers] == ["utils"]


@pytest.mark.parametrize("name", ["rag-cpu.yaml", "agent-cpu.yaml"])
def test_cpu_configs_fit_two_logical_cpus(name: str):
    apps = _apps(name)
    total = 0.0
    for app in (a for a in apps.values() if "import_path" in a):
        args = app["args"]
        for key in (
            "ingress_deployment_config",
            "retriever_deployment_config",
            "deployment_config",
        ):
            if key in args:  # Serve's default is 1 CPU per replica
                total += args[key].get("ray_actor_options", {}).get("num_cpus", 1)
        for llm in args.get("llm_configs", []):
            total += sum(b.get("CPU", 0) for b in llm["placement_group_config"]["bundles"])
            total += llm["deployment_config"]["ray_actor_options"]["num_cpus"]
    assert total <= 2.0, total


def test_cluster_configs_reuse_the_llm_and_rag_apps():
    llm = _apps("llm-gpu.yaml")["llm"]
    assert _apps("rag-gpu.yaml")["llm"] == llm
    assert _apps("agent-gpu.yaml")["llm"] == llm
    assert _apps("agent-gpu.yaml")["rag"] == _apps("rag-gpu.yaml")["rag"]
    assert _apps("agent-cpu.yaml")["rag"] == _apps("rag-cpu.yaml")["rag"]
    engine = llm["args"]["llm_configs"][0]["engine_kwargs"]
    assert engine["enable_auto_tool_choice"] and engine["tool_call_parser"] == "llama3_json"
    agent = parse_agent_args(_apps("agent-gpu.yaml")["agent"]["args"])
    assert agent.checkpointer.kind == "postgres" and agent.mode == "supervisor"
    assert agent.require_api_key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"index": "i", "model": "m", "retrival": {}}, "retrival"),
        ({"index": "i", "model": "m", "retrieval": {"k": 30}}, "retrieval"),
        ({"index": "i", "model": "m", "retrieval": {"mode": "fuzzy"}}, "retrieval.mode"),
        ({"model": "m"}, "index"),
    ],
)
def test_rag_config_errors_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_rag_args(args)


def test_rag_build_fails_before_any_replica_on_a_missing_index(tmp_path: Path):
    from workloads.serve.rag.app import build_app

    with pytest.raises(FileNotFoundError, match="not an index folder"):
        build_app({"index": str(tmp_path / "nothing"), "model": "demo-llm"})
