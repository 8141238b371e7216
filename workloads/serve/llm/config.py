"""The typed arguments of the LLM serving app: what `serve_configs/llm-*.yaml` pass as `args`.

    serve run serve_configs/llm-cpu.yaml            # a laptop or this repo's CI machine
    serve deploy serve_configs/llm-gpu.yaml         # a running Ray cluster (or a RayService)

`llm_configs` are Ray's own `ray.serve.llm.LLMConfig`s, unchanged and validated by Ray, so anything
in Ray's docs (engine_kwargs, placement, autoscaling, LoRA from s3://) works here. The few keys of
our own sit beside them: where adapters live when that is a local folder (Ray only reads cloud
URIs), which local model to serve when the training outputs may not exist yet, the API-key
variable, and the prompt-length check. Unknown keys are errors that name the key, before any
replica starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from workloads.common.config import ConfigError, StrictModel, format_validation_error

CLOUD_PREFIXES = ("s3://", "gs://", "abfss://", "azure://", "pyarrow-")
API_KEY_ENV = "LLM_API_KEY"
# An adapter's id is `<base model id>:<name>` (Ray's multiplexed model id), so a name may not
# contain ':'; it is also a folder name.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_cloud_uri(path: str) -> bool:
    return path.startswith(CLOUD_PREFIXES)


class AdapterSource(StrictModel):
    """Where one base model's LoRA adapters are. Each is served as `<model_id>:<name>`."""

    dir: str | None = Field(
        default=None,
        description=(
            "A folder whose subfolders are adapters (each with adapter_config.json), served as "
            "<model_id>:<subfolder>. A local path (present on every serving node: a volume or "
            "NFS on a cluster) or s3:// gs:// abfss:// azure:// (Ray's dynamic_lora_loading_path). "
            "Listed again on every /v1/models call, so adapters written later are served without "
            "a restart."
        ),
    )
    named: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Local adapter folders by name, served as <model_id>:<name>: the SFT, DPO and Tune "
            "jobs' outputs (outputs/sft/model, outputs/dpo/model, outputs/tune_lora/best). "
            "A folder that does not exist, or whose adapter was trained on another base model, is "
            "skipped with a warning, so one config serves whatever has been trained so far."
        ),
    )

    @field_validator("named")
    @classmethod
    def _names(cls, named: dict[str, str]) -> dict[str, str]:
        for name, path in named.items():
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: letters, digits, '.', '_' and '-' only")
            if is_cloud_uri(path):
                raise ValueError(
                    f"adapter {name!r}: named adapters are local folders; put cloud adapters "
                    "under `dir` (each subfolder an adapter)"
                )
        return named

    @model_validator(mode="after")
    def _something(self) -> AdapterSource:
        if self.dir is None and not self.named:
            raise ValueError("give `dir`, `named`, or both")
        return self


class LLMAppConfig(StrictModel):
    """Arguments of `workloads.serve.llm.app:build_app` (the serve YAML's `args`)."""

    llm_configs: list[dict[str, Any]] = Field(
        min_length=1,
        description=(
            "Ray's LLMConfig for each served model (model_loading_config, engine_kwargs, "
            "placement_group_config, deployment_config, lora_config, runtime_env, ...), "
            "validated by Ray."
        ),
    )
    ingress_deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Serve deployment options of the OpenAI ingress (replicas, max_ongoing_requests, ...).",
    )
    model_source_candidates: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "By model id: local model folders to try in order; the first that holds a "
            "config.json replaces model_loading_config.model_source. The CPU config serves the "
            "SFT model, else the pretrained one, else the tiny one."
        ),
    )
    adapters: dict[str, AdapterSource] = Field(
        default_factory=dict,
        description="By base model id: its LoRA adapters (a local or cloud folder, and/or named local folders).",
    )
    api_key_env: str | None = Field(
        default=API_KEY_ENV,
        description=(
            "Environment variable, read in the ingress replica, that holds the API key. When it "
            "is set there, every route but /ready needs `Authorization: Bearer <key>` (401 "
            "otherwise). The key "
            "itself never goes in the YAML: set it in the runtime_env, or from a Kubernetes secret."
        ),
    )
    require_api_key: bool = Field(
        default=False,
        description=(
            "Fail an ingress replica whose environment lacks the key, instead of serving it "
            "without authentication (set it on clusters, where a pod may miss the secret)."
        ),
    )
    check_prompt_budget: bool = Field(
        default=True,
        description=(
            "Answer 400 when prompt tokens + max_tokens exceed the model length (vLLM alone "
            "shortens max_tokens silently). Tokenizes in the ingress with the base model's tokenizer."
        ),
    )

    @field_validator("llm_configs")
    @classmethod
    def _ray_validates(cls, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from ray.serve.llm import LLMConfig

        for i, raw in enumerate(configs):
            try:
                LLMConfig.model_validate(raw)
            except ValidationError as exc:
                where = "; ".join(
                    f"llm_configs.{i}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors()
                )
                raise ValueError(f"Ray's LLMConfig refuses it: {where}") from None
        return configs

    @model_validator(mode="after")
    def _known_models(self) -> LLMAppConfig:
        ids = [model_id(c) for c in self.llm_configs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"llm_configs: model ids must be unique, got {ids}")
        for key in ("model_source_candidates", "adapters"):
            for mid in getattr(self, key):
                if mid not in ids:
                    raise ValueError(
                        f"{key}.{mid}: no llm_config has model_id {mid!r} (have {ids})"
                    )
        for mid, source in self.adapters.items():
            lora = _llm_config(self, mid).get("lora_config") or {}
            if source.dir and lora.get("dynamic_lora_loading_path"):
                raise ValueError(
                    f"adapters.{mid}.dir and llm_configs[{mid}].lora_config."
                    "dynamic_lora_loading_path both say where adapters are: keep one"
                )
        return self


def model_id(raw: dict[str, Any]) -> str:
    return raw["model_loading_config"]["model_id"]


def _llm_config(cfg: LLMAppConfig, mid: str) -> dict[str, Any]:
    return next(c for c in cfg.llm_configs if model_id(c) == mid)


def parse_app_args(args: dict[str, Any] | None) -> LLMAppConfig:
    """The serve YAML's `args`, validated; a `ConfigError` naming every bad key otherwise."""
    try:
        return LLMAppConfig.model_validate(dict(args or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(LLMAppConfig, exc, "serve app args")) from None


def first_model_folder(candidates: list[str]) -> str | None:
    """The first candidate that is a saved Hugging Face model (holds config.json), made absolute."""
    for candidate in candidates:
        path = Path(os.path.expanduser(candidate)).resolve()
        if (path / "config.json").is_file():
            return str(path)
    return None
