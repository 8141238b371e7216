"""WIP (issue 9): the Serve application builder that `serve_configs/llm-*.yaml` name as their
import_path. It is `ray.serve.llm.build_openai_app` with our ingress (auth, readiness, streaming
headers) in place of the default one; the LLM deployments are Ray's, built by
`build_llm_deployment` from the same `llm_configs`.

TODO (next session): typed config for our keys (api_key_env, adapters dir local or s3 via a
LoraModelLoader subclass for local folders), 400 for prompt + max_tokens beyond max_model_len,
serve_configs/llm-cpu.yaml and llm-gpu.yaml, RayService manifest, tests, bench/serve_bench.py.
"""

from __future__ import annotations

from typing import Any

from workloads.serve.llm.ingress import API_KEY_ENV, build_ingress_cls


def build_app(args: dict[str, Any]):
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
    from ray.llm._internal.serve.core.server.builder import (
        maybe_apply_llm_deployment_config_defaults,
    )
    from ray.serve.llm import build_llm_deployment

    args = dict(args)
    api_key_env = args.pop("api_key_env", API_KEY_ENV)
    serving = LLMServingArgs.model_validate(args)
    configs = serving.llm_configs
    ingress_cls = build_ingress_cls(api_key_env)
    options = maybe_apply_llm_deployment_config_defaults(
        serving.ingress_cls_config.ingress_cls.get_deployment_options(configs),
        serving.ingress_deployment_config,
    )
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={
            c.model_id: c.lora_config.dynamic_lora_loading_path
            for c in configs
            if c.lora_config is not None
        },
    )
