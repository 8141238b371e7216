"""Shared fixtures: one local Ray session, the sample corpus and the tiny model, built once per run.

Unit tests take none of these and need no Ray; integration tests share `ray_session`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small enough for the 2-core CI machine, large enough to plant every variant several times.
SAMPLE_DOCS = 300

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test (`ray.init(num_cpus=2)`)."""
    import ray
    from ray.data import DataContext

    # Idle workers above Ray's soft limit (the CPU count) live a minute instead of a second, so a
    # job's shuffles find them warm, but the session does not keep them all (as a job's own Ray
    # does, local_system_config): later tests run vLLM engines on the same machine and need the
    # memory that workers which imported torch would hold.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": 60_000},
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    """`python -m workloads.data.sample build` into a temporary folder; returns that folder."""
    from workloads.data.sample import build

    out = tmp_path_factory.mktemp("sample")
    build(out, docs=SAMPLE_DOCS, seed=0, shards=3)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_corpus) -> Path:
    """The tiny Llama and its tokenizer, trained on the sample corpus, built once per test run."""
    from workloads.train.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", corpus=sample_corpus / "corpus"
    )


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_model) -> Path:
    """A tiny sequence classifier with labels (clean, toxic), on the tiny model's tokenizer."""
    from workloads.train.tiny import build_tiny_classifier

    return build_tiny_classifier(
        tmp_path_factory.mktemp("models") / "tiny-classifier", tiny_model, ("clean", "toxic")
    )
