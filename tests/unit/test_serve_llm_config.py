"""The serving app's own parts, without Ray or vLLM running: its typed args (and the shipped serve
YAMLs through them), how an llm_config is resolved (model fallbacks, adapters, the prompt budget),
the adapters' rules, the prompt budget's counting, and the auth/streaming-header middleware."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from workloads.common.config import ConfigError
from workloads.serve.llm.adapters import LocalAdapters, usable_named_adapters
from workloads.serve.llm.app import resolve_llm_config
from workloads.serve.llm.config import parse_app_args

SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def _args(**extra) -> dict:
    args = {
        "llm_configs": [
            {
                "model_loading_config": {"model_id": "m", "model_source": "models/tiny-llama"},
                "engine_kwargs": {"max_model_len": 512},
            }
        ]
    }
    args.update(extra)
    return args


def _adapter(folder: Path, base: str, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": base, "r": rank, "peft_type": "LORA"})
    )
    return folder


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    return folder


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_shipped_serve_configs_validate_as_app_args(path: Path):
    config = yaml.safe_load(path.read_text())
    header = path.read_text().split("\n")[0]
    assert header.startswith("# ") and path.name in header or "make serve" in header
    for app in config["applications"]:
        if app["import_path"] != "workloads.serve.llm.app:build_app":
            continue  # the RAG and agent apps: tests/unit/test_serve_rag_agent_config.py
        cfg = parse_app_args(app["args"])
        assert cfg.api_key_env == "LLM_API_KEY" and cfg.check_prompt_budget
        for llm in cfg.llm_configs:  # backpressure instead of Ray's unbounded default
            deployment = llm["deployment_config"]
            assert deployment["max_ongoing_requests"] and deployment["max_queued_requests"]


def test_gpu_config_has_tensor_parallelism_autoscaling_accelerator_and_prefix_caching():
    args = yaml.safe_load((REPO / "serve_configs" / "llm-gpu.yaml").read_text())
    (llm, _embedder) = args["applications"][0]["args"]["llm_configs"]
    assert llm["engine_kwargs"]["tensor_parallel_size"] > 1
    assert llm["engine_kwargs"]["enable_prefix_caching"] is True
    assert llm["accelerator_type"] == "A10G"
    scaling = llm["deployment_config"]["autoscaling_config"]
    assert scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_args(adapter={}), "adapter: Extra inputs are not permitted; did you mean 'adapters'?"),
        (
            _args(llm_configs=[{"model_loading_config": {"model_id": "m"}, "engine_kwarg": {}}]),
            "llm_configs.0.engine_kwarg",
        ),
        (_args(adapters={"other": {"dir": "/x"}}), "adapters.other: no llm_config has model_id"),
        (_args(adapters={"m": {}}), "give `dir`, `named`, or both"),
        (_args(adapters={"m": {"named": {"a:b": "/x"}}}), "adapter name 'a:b'"),
        (_args(adapters={"m": {"named": {"a": "s3://b/a"}}}), "named adapters are local folders"),
        (_args(model_source_candidates={"x": ["/m"]}), "model_source_candidates.x"),
        (_args(api_key_envv="K"), "did you mean 'api_key_env'?"),
    ],
)
def test_bad_args_fail_naming_the_key(args, message):
    with pytest.raises(ConfigError) as err:
        parse_app_args(args)
    assert message in str(err.value)


def test_two_places_for_the_adapters_dir_are_refused():
    args = _args(adapters={"m": {"dir": "s3://bucket/adapters"}})
    args["llm_configs"][0]["lora_config"] = {"dynamic_lora_loading_path": "s3://bucket/other"}
    with pytest.raises(ConfigError, match="keep one"):
        parse_app_args(args)


def test_model_candidates_pick_the_first_saved_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _model(tmp_path / "outputs" / "pretrain" / "model")
    cfg = parse_app_args(
        _args(
            model_source_candidates={"m": ["outputs/sft/merged", "outputs/pretrain/model", "tiny"]}
        )
    )
    mid, raw, local, budget = resolve_llm_config(cfg, cfg.llm_configs[0])
    source = str(tmp_path / "outputs" / "pretrain" / "model")
    assert mid == "m" and raw["model_loading_config"]["model_source"] == source
    assert local is None and budget == (source, 512)  # max_model_len from engine_kwargs

    cfg = parse_app_args(_args(model_source_candidates={"m": ["nothing/here"]}))
    with pytest.raises(ConfigError, match=r"model_source_candidates.m: none of \['nothing/here'\]"):
        resolve_llm_config(cfg, cfg.llm_configs[0])


def test_adapters_resolve_to_local_folders_or_ray_cloud_path(tmp_path):
    base = _model(tmp_path / "base")
    other = _model(tmp_path / "other-base")
    sft = _adapter(tmp_path / "sft", str(base))
    _adapter(tmp_path / "dpo", str(other))
    args = _args(
        adapters={
            "m": {
                "dir": str(tmp_path / "adapters"),
                "named": {"sft": str(sft), "dpo": str(tmp_path / "dpo"), "later": "/nope"},
            }
        }
    )
    args["llm_configs"][0]["model_loading_config"]["model_source"] = str(base)
    cfg = parse_app_args(args)
    _, raw, local, _ = resolve_llm_config(cfg, cfg.llm_configs[0])
    assert raw["engine_kwargs"]["enable_lora"] is True and raw["lora_config"] == {}
    assert local == LocalAdapters(dir=str(tmp_path / "adapters"), named={"sft": str(sft)})

    cloud = _args(adapters={"m": {"dir": "s3://bucket/adapters"}})
    cfg = parse_app_args(cloud)
    _, raw, local, _ = resolve_llm_config(cfg, cfg.llm_configs[0])
    assert raw["lora_config"]["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    assert local == LocalAdapters(dir=None, named={})


def test_named_adapters_skip_untrained_or_foreign_and_refuse_a_rank_too_high(tmp_path):
    base, other = _model(tmp_path / "base"), _model(tmp_path / "other")
    named = {
        "ok": str(_adapter(tmp_path / "ok", str(base))),
        "hub": str(_adapter(tmp_path / "hub", "meta-llama/Llama-3.1-8B")),  # not checkable
        "foreign": str(_adapter(tmp_path / "foreign", str(other))),
        "later": str(tmp_path / "later"),
    }
    usable, skipped = usable_named_adapters(named, str(base), max_lora_rank=16)
    assert set(usable) == {"ok", "hub"}
    assert any(s.startswith("foreign: trained on") for s in skipped)
    assert any(s.startswith("later: no adapter_config.json") for s in skipped)

    _adapter(tmp_path / "wide", str(base), rank=64)
    with pytest.raises(ValueError, match="rank 64 but engine_kwargs.max_lora_rank is 16"):
        usable_named_adapters({"wide": str(tmp_path / "wide")}, str(base), max_lora_rank=16)


def test_local_adapters_list_only_adapter_folders_and_no_paths(tmp_path):
    _adapter(tmp_path / "dir" / "a", "x")
    (tmp_path / "dir" / "not-an-adapter").mkdir()
    _adapter(tmp_path / "elsewhere", "x")
    local = LocalAdapters(dir=str(tmp_path / "dir"), named={"b": str(tmp_path / "elsewhere")})
    assert local.names() == ["b", "a"]
    assert local.folder("a") == tmp_path / "dir" / "a"
    assert local.folder("b") == tmp_path / "elsewhere"
    for name in ("not-an-adapter", "..", "../dir/a", "missing"):
        assert local.folder(name) is None


def test_pooling_models_get_no_prompt_budget_and_bundled_weights_resolve():
    cfg = parse_app_args(
        {
            "llm_configs": [
                {
                    "model_loading_config": {
                        "model_id": "e",
                        "model_source": "sentence-transformers/all-MiniLM-L6-v2",
                    },
                    "engine_kwargs": {"runner": "pooling", "convert": "embed"},
                }
            ]
        }
    )
    _, raw, _, budget = resolve_llm_config(cfg, cfg.llm_configs[0])
    assert budget is None
    assert Path(raw["model_loading_config"]["model_source"], "config.json").is_file()


def test_prompt_budget_counts_like_vllm_and_answers_400(tiny_model):
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        OpenAIHTTPException,
    )
    from transformers import AutoTokenizer

    from workloads.serve.llm.ingress import PromptBudget

    budget = PromptBudget(str(tiny_model), 64)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "sort the list and return it"
    n = len(tok(prompt).input_ids)
    assert budget.prompt_tokens(CompletionRequest(model="m", prompt=prompt)) == n
    assert budget.prompt_tokens(CompletionRequest(model="m", prompt=[5, 6, 7])) == 3
    messages = [{"role": "user", "content": prompt}]
    chat = ChatCompletionRequest(model="m", messages=messages, max_tokens=64 - 3)
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert budget.prompt_tokens(chat) == len(templated)

    budget.check(CompletionRequest(model="m", prompt=prompt, max_tokens=64 - n))  # fits exactly
    budget.check(CompletionRequest(model="m", prompt=prompt))  # no max_tokens: vLLM's default
    with pytest.raises(OpenAIHTTPException) as err:
        budget.check(CompletionRequest(model="m", prompt=prompt, max_tokens=64 - n + 1))
    assert err.value.status_code == 400
    assert f"maximum context length is 64 tokens. The prompt has {n} tokens" in err.value.message
    with pytest.raises(OpenAIHTTPException):
        budget.check(chat)


def _asgi(
    middleware_app, path: str, headers: dict[str, str], method: str = "GET", root_path: str = ""
) -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "path": path,
        "root_path": root_path,
        "method": method,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(middleware_app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_middleware_checks_bearer_keys_and_marks_event_streams(monkeypatch):
    from workloads.serve.llm.ingress import ServingMiddleware

    async def app(scope, receive, send):
        kind = b"text/event-stream" if scope["path"].endswith("stream") else b"application/json"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setenv("TEST_LLM_KEY", "s3cret")
    guarded = ServingMiddleware(app, api_key_env="TEST_LLM_KEY")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        code, sent_headers, body = _asgi(guarded, "/v1/models", headers)
        assert code == 401 and sent_headers[b"www-authenticate"] == b"Bearer"
        assert json.loads(body)["error"]["code"] == 401
    assert _asgi(guarded, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
    assert _asgi(guarded, "/ready", {})[0] == 200  # probes carry no key
    for path in ("/tokenize", "/detokenize", "/docs", "/openapi.json"):  # Ray's other routes
        assert _asgi(guarded, path, {})[0] == 401, path
    # An app under a route_prefix: the proxy keeps the prefix in the path and sets root_path.
    assert _asgi(guarded, "/llm/v1/models", {}, root_path="/llm")[0] == 401
    assert _asgi(guarded, "/llm/ready", {}, root_path="/llm")[0] == 200
    assert _asgi(guarded, "/v1/models", {}, method="OPTIONS")[0] == 200  # CORS preflight
    _, stream_headers, _ = _asgi(guarded, "/v1/stream", {"Authorization": "Bearer s3cret"})
    assert stream_headers[b"x-accel-buffering"] == b"no"
    assert (
        b"x-accel-buffering"
        not in _asgi(guarded, "/v1/models", {"Authorization": "Bearer s3cret"})[1]
    )

    monkeypatch.delenv("TEST_LLM_KEY")
    assert _asgi(ServingMiddleware(app, api_key_env="TEST_LLM_KEY"), "/v1/models", {})[0] == 200
    assert _asgi(ServingMiddleware(app, api_key_env=None), "/v1/models", {})[0] == 200


def test_first_streamed_chunk_is_not_held_for_the_batching_interval():
    """Ray's Batcher holds the first token until its first tick (ray-project/ray#59681); ours
    yields it at once and batches the rest on the interval."""
    from workloads.serve.llm.server import first_chunk_then_batches

    async def tokens():
        for i in range(6):
            yield i
            await asyncio.sleep(0.01)

    async def collect():
        loop = asyncio.get_running_loop()
        start, out = loop.time(), []
        async for batch in first_chunk_then_batches(tokens(), interval_ms=1000):
            out.append((batch, loop.time() - start))
        return out

    batches = asyncio.run(collect())
    assert batches[0][0] == [0] and batches[0][1] < 0.5  # not after the 1 s interval
    assert [x for b, _ in batches for x in b] == list(range(6))
    assert len(batches) == 2  # the other five together, at the interval (or the end)


def test_an_ingress_replica_without_the_required_key_refuses_to_start(monkeypatch):
    from workloads.serve.llm.ingress import ServingIngress

    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"\$TEST_LLM_KEY is empty"):
        ServingIngress({}, {}, api_key_env="TEST_LLM_KEY", require_api_key=True)
    monkeypatch.setenv("TEST_LLM_KEY", "k")
    ServingIngress({}, {}, api_key_env="TEST_LLM_KEY", require_api_key=True)
    monkeypatch.delenv("TEST_LLM_KEY")
    ServingIngress({}, {}, api_key_env="TEST_LLM_KEY", require_api_key=False)  # auth just off


def test_budget_counting_leaves_list_content_for_the_model(tiny_model):
    """List-form message content can be a single-use iterator; counting must happen on the
    request Ray sanitizes, so the engine still gets the text."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest
    from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

    from workloads.serve.llm.ingress import PromptBudget

    body = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "sort the list"}]}],
        max_tokens=8,
    )
    body = _sanitize_chat_completion_request(body)
    budget = PromptBudget(str(tiny_model), 1024)
    first = budget.prompt_tokens(body)
    assert first and first == budget.prompt_tokens(body)  # counted twice, same answer
    assert "sort the list" in json.dumps(body.model_dump()["messages"])
