"""LoRA adapters from local folders, for `ray.serve.llm`'s multiplexing.

Ray serves `<base>:<adapter>` by downloading `<dynamic_lora_loading_path>/<adapter>` from cloud
storage into a per-node cache and handing vLLM that folder. Adapters our training jobs write on
one machine (or to a volume every pod mounts) are already folders, so the loader below hands vLLM
the folder itself and leaves cloud URIs to Ray's own loader. `LLMServer` takes it through its
`model_downloader` argument; Ray's routing, per-replica LRU of adapters and vLLM's LoRA slots are
unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

ADAPTER_CONFIG = "adapter_config.json"
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LocalAdapters:
    """One base model's local adapters: `named` folders, then the subfolders of `dir`."""

    dir: str | None = None
    named: dict[str, str] = field(default_factory=dict)

    def folder(self, name: str) -> Path | None:
        if name in self.named:
            return Path(self.named[name])
        if self.dir is not None and "/" not in name and name not in (".", ".."):
            candidate = Path(self.dir) / name
            if (candidate / ADAPTER_CONFIG).is_file():
                return candidate
        return None

    def names(self) -> list[str]:
        found = list(self.named)
        if self.dir is not None and Path(self.dir).is_dir():
            found += sorted(
                p.name
                for p in Path(self.dir).iterdir()
                if (p / ADAPTER_CONFIG).is_file() and p.name not in self.named
            )
        return found


def adapter_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())


def usable_named_adapters(
    named: dict[str, str], base_source: str, max_lora_rank: int | None
) -> tuple[dict[str, str], list[str]]:
    """The named adapters this base can serve, made absolute, and why each other one is skipped.

    An adapter is skipped when its folder has no adapter_config.json (not trained yet) or when it
    was trained on another local model than the one served. One of rank above the engine's
    `max_lora_rank` is an error: vLLM would refuse it at request time with a 400 the client
    cannot fix."""
    usable: dict[str, str] = {}
    skipped: list[str] = []
    base = Path(base_source).resolve() if Path(base_source).exists() else None
    for name, raw in named.items():
        folder = Path(raw).expanduser().resolve()
        if not (folder / ADAPTER_CONFIG).is_file():
            skipped.append(f"{name}: no {ADAPTER_CONFIG} in {folder}")
            continue
        cfg = adapter_config(folder)
        trained_on = cfg.get("base_model_name_or_path") or ""
        if base is not None and Path(trained_on).exists() and Path(trained_on).resolve() != base:
            skipped.append(f"{name}: trained on {trained_on}, not on the served {base}")
            continue
        rank = int(cfg.get("r", 0))
        if max_lora_rank is not None and rank > max_lora_rank:
            raise ValueError(
                f"adapters: {name} has LoRA rank {rank} but engine_kwargs.max_lora_rank is "
                f"{max_lora_rank}; raise max_lora_rank (vLLM takes 8, 16, 32, 64, ...)"
            )
        usable[name] = str(folder)
    return usable, skipped


class LocalAdapterLoader(LoraModelLoader):
    """Ray's LoRA loader, reading local adapters in place; cloud adapters go to Ray's code.

    Built by `LLMServer` as `model_downloader(download_timeout_s=..., max_tries=...)`, so the
    adapters are bound with `functools.partial`."""

    def __init__(self, *, local: LocalAdapters, **kwargs):
        super().__init__(**kwargs)
        self.local = local

    async def load_model_from_config(self, lora_model_id: str, llm_config):
        from fastapi import HTTPException
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.common.utils.lora_utils import get_lora_id
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        name = get_lora_id(lora_model_id)
        folder = self.local.folder(name)
        if folder is None:
            if llm_config.lora_config.dynamic_lora_loading_path:
                return await super().load_model_from_config(lora_model_id, llm_config)
            raise HTTPException(404, f"no adapter {name!r} for this model ({lora_model_id})")
        loaded = DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=adapter_config(folder).get("max_length"),
            local_path=str(folder),
            lora_assigned_int_id=global_id_manager.next(),
        )
        self.disk_cache[lora_model_id] = loaded
        logger.info("serving adapter %s from %s", lora_model_id, folder)
        return loaded
