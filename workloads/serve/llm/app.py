"""The Serve application behind `serve_configs/llm-*.yaml`: vLLM on Ray Serve with an OpenAI API.

    make serve                                      # = serve run serve_configs/llm-cpu.yaml
    LLM_API_KEY=secret serve run serve_configs/llm-cpu.yaml
    serve deploy serve_configs/llm-gpu.yaml         # or the RayService in cluster/kuberay

It is `ray.serve.llm.build_openai_app` with three changes: our ingress (`ingress.py`: API keys,
the prompt budget, /ready, proxy-safe streaming headers) in place of Ray's default one, adapters
from local folders (`adapters.py`) beside Ray's cloud ones, and an `LLMServer` that streams the
first token at once (`server.py`). The LLM deployments are
Ray's `LLMServer`s, built by `build_llm_deployment` from the same `llm_configs`, so everything
Ray documents for them (autoscaling, placement, tensor parallelism, prefix-aware routing) holds.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path
from typing import Any

from workloads.common.config import ConfigError
from workloads.embed.models import resolve_model_path
from workloads.serve.llm.adapters import LocalAdapterLoader, LocalAdapters, usable_named_adapters
from workloads.serve.llm.config import (
    LLMAppConfig,
    first_model_folder,
    is_cloud_uri,
    model_id,
    parse_app_args,
)
from workloads.serve.llm.server import StreamingLLMServer

logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any]):
    """Serve's application builder (`import_path: workloads.serve.llm.app:build_app`)."""
    from ray import serve
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from workloads.serve.llm.ingress import build_ingress_cls

    cfg = parse_app_args(args)
    plans = [resolve_llm_config(cfg, raw) for raw in cfg.llm_configs]
    configs = {mid: LLMConfig.model_validate(raw) for mid, raw, _, _ in plans}
    deployments = {}
    for mid, _, local, _ in plans:
        bind = {}
        if local is not None:
            bind["model_downloader"] = functools.partial(LocalAdapterLoader, local=local)
        deployments[mid] = build_llm_deployment(
            configs[mid],
            bind_kwargs=bind,
            deployment_cls=None if configs[mid].server_cls else StreamingLLMServer,
            name_prefix="LLMServer:",
        )

    ingress_cls = build_ingress_cls(cfg.api_key_env)
    options = maybe_apply_llm_deployment_config_defaults(
        ingress_cls.get_deployment_options(list(configs.values())),
        cfg.ingress_deployment_config,
    )
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments=deployments,
        model_cards={mid: to_model_metadata(mid, c) for mid, c in configs.items()},
        lora_paths={
            mid: c.lora_config.dynamic_lora_loading_path
            for mid, c in configs.items()
            if c.lora_config is not None and c.lora_config.dynamic_lora_loading_path
        },
        local_adapters={mid: local for mid, _, local, _ in plans if local is not None},
        prompt_budgets={mid: budget for mid, _, _, budget in plans if budget is not None},
        pooling_models=[mid for mid, raw, _, _ in plans if _is_pooling(raw)],
        api_key_env=cfg.api_key_env,
        require_api_key=cfg.require_api_key,
    )


def _is_pooling(raw: dict[str, Any]) -> bool:
    return (raw.get("engine_kwargs") or {}).get("runner") == "pooling"


def resolve_llm_config(
    cfg: LLMAppConfig, raw: dict[str, Any]
) -> tuple[str, dict[str, Any], LocalAdapters | None, tuple[str, int] | None]:
    """One llm_config with our keys applied: (model id, Ray's LLMConfig dict, local adapters,
    (tokenizer source, max_model_len) for the prompt budget or None)."""
    raw = copy.deepcopy(raw)
    mid = model_id(raw)
    loading = raw["model_loading_config"]
    if mid in cfg.model_source_candidates:
        candidates = cfg.model_source_candidates[mid]
        found = first_model_folder(candidates)
        if found is None:
            raise ConfigError(
                f"model_source_candidates.{mid}: none of {candidates} holds a saved model "
                "(config.json); build one first (make demo, or python -m workloads.train.tiny)"
            )
        loading["model_source"] = found
    source = loading.get("model_source") or mid
    if isinstance(source, str) and not is_cloud_uri(source):
        # A hub id whose weights ship in a package (all-MiniLM-L6-v2) runs offline; a local
        # folder is made absolute, as replicas do not share the builder's working directory.
        source = resolve_model_path(source)
        if Path(source).exists():
            source = str(Path(source).resolve())
        loading["model_source"] = source

    engine = raw.setdefault("engine_kwargs", {})
    local = None
    adapters = cfg.adapters.get(mid)
    if adapters is not None:
        engine.setdefault("enable_lora", True)
        lora = raw.setdefault("lora_config", {})
        named, skipped = usable_named_adapters(
            adapters.named, source if isinstance(source, str) else "", engine.get("max_lora_rank")
        )
        for why in skipped:
            logger.warning("%s: adapter skipped: %s", mid, why)
        local_dir = None
        if adapters.dir is not None and is_cloud_uri(adapters.dir):
            lora["dynamic_lora_loading_path"] = adapters.dir
        elif adapters.dir is not None:
            local_dir = str(Path(adapters.dir).expanduser().resolve())
        local = LocalAdapters(dir=local_dir, named=named)

    budget = None
    if cfg.check_prompt_budget and not _is_pooling(raw):
        budget = _prompt_budget(loading, source, engine)
        if budget is None:
            logger.warning(
                "%s: prompt budget not checked (set engine_kwargs.max_model_len and a "
                "tokenizer_source the ingress can load); vLLM shortens max_tokens silently",
                mid,
            )
    return mid, raw, local, budget


def _prompt_budget(loading: dict[str, Any], source: Any, engine: dict[str, Any]):
    tokenizer = loading.get("tokenizer_source") or source
    if not isinstance(tokenizer, str) or is_cloud_uri(tokenizer):
        return None
    max_len = engine.get("max_model_len")
    if max_len is None and (Path(tokenizer) / "config.json").is_file():
        max_len = json.loads((Path(tokenizer) / "config.json").read_text()).get(
            "max_position_embeddings"
        )
    return (tokenizer, int(max_len)) if max_len else None
