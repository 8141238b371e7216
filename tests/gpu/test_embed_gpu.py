"""The embed job on a CUDA GPU: fp16 autocast by default, vectors that agree with fp32. Skipped
without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.integration.test_embed import MINILM, job_config
from workloads.embed.embedding import run
from workloads.embed.schema import embedding_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_embed_job_on_a_gpu_uses_fp16_and_agrees_with_fp32(ray_session, sample_corpus, tmp_path):
    from workloads.embed.models import load_sentence_transformer

    out = tmp_path / "embed"
    manifest = run(job_config(sample_corpus / "corpus", out, "encoder.device=auto"))
    assert manifest.extra["device"] == "cuda"
    assert manifest.extra["precision"] == "fp16"
    table = pq.read_table(out / "embeddings")
    assert table.num_rows == manifest.extra["chunks"]
    reference = load_sentence_transformer(MINILM, device="cpu").encode(
        table["text"].to_pylist()[:128], normalize_embeddings=True
    )
    cosine = (embedding_matrix(table)[:128] * reference).sum(axis=1)
    assert cosine.min() > 0.999
