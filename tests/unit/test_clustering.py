"""Clustering without Ray: c-TF-IDF, FAISS k-means and assignment, embedding checks, config errors."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import adjusted_rand_score

from workloads.common.config import ConfigError, load_config
from workloads.embed.clustering import (
    MISSING_DOC_ID,
    MISSING_EMBEDDING,
    NON_FINITE_EMBEDDING,
    WRONG_DIMENSION,
    ZERO_EMBEDDING,
    CentroidAssigner,
    ClusterDocsConfig,
    TermCounts,
    auto_k,
    chunk_units,
    class_tfidf,
    cluster_term_counts,
    document_text,
    document_units,
    merge_nearest,
    nearest_per_cluster,
    top_terms,
    train_kmeans,
)
from workloads.embed.schema import embedding_matrix, embeddings_table

REQUIRED = ["input.path=/in", "output.path=/out"]


def _blobs(n_per: int, k: int, dim: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------------------------
# c-TF-IDF


def test_class_tfidf_matches_bertopic_formula_on_a_tiny_matrix():
    # 2 classes x 3 terms. A = (3 + 1) / 2 words per class; f = column sums.
    counts = np.array([[2, 1, 0], [0, 0, 1]], dtype=float)
    got = class_tfidf(counts).toarray()
    avg, f = 2.0, counts.sum(axis=0)
    tf = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, tf * np.log(1 + avg / f), rtol=1e-12)


def test_top_terms_of_separated_classes_are_their_own_words_not_shared_ones():
    texts = {
        0: ["the socket sends a packet over tcp", "tcp socket packet retransmit python"],
        1: ["the widget draws a button on the canvas", "canvas widget button python layout"],
        2: ["the thread takes the lock from the queue", "queue lock thread python deadlock"],
    }
    batch = pa.table(
        {
            "cluster": pa.array([c for c, ts in texts.items() for _ in ts], pa.int32()),
            "text": [t for ts in texts.values() for t in ts],
        }
    )
    terms = TermCounts(k=3, buckets=1 << 16)
    # Two batches summed on the "driver", as the job does.
    terms.add(cluster_term_counts(batch.slice(0, 3), buckets=1 << 16))
    terms.add(cluster_term_counts(batch.slice(3), buckets=1 << 16))
    matrix, names = terms.matrix()
    ranked = top_terms(class_tfidf(matrix), names, 3)
    assert {t for t, _ in ranked[0]} == {"socket", "tcp", "packet"}
    assert {t for t, _ in ranked[1]} == {"widget", "button", "canvas"}
    assert {t for t, _ in ranked[2]} == {"thread", "lock", "queue"}
    # `python` is in every class, `the` is a stop word: neither leads any class.
    assert "the" not in names
    for row in top_terms(class_tfidf(matrix), names, 10):
        scores = dict(row)
        assert scores["python"] < min(s for t, s in row if t != "python")


def test_term_counts_memory_is_bounded_by_the_buckets():
    words = [
        f"term{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(5000)
    ]
    batch = pa.table(
        {
            "cluster": pa.array([0, 1] * 50, pa.int32()),
            "text": [" ".join(words[i::100]) for i in range(100)],
        }
    )
    terms = TermCounts(k=2, buckets=1024)
    terms.add(cluster_term_counts(batch, buckets=1024))
    matrix, names = terms.matrix()
    assert matrix.shape[1] == len(names) <= 1024
    assert matrix.sum() == 5000  # every occurrence is counted, colliding terms share a bucket


# --------------------------------------------------------------------------------------------
# k-means and assignment


def _kmeans(x, k):
    """train_kmeans with the job's defaults."""
    d = ClusterDocsConfig.model_validate({"input": {"path": "/in"}, "output": {"path": "/out"}})
    return train_kmeans(
        x, k=k, niter=d.niter, nredo=d.nredo, seed=d.seed, spherical=True, init=d.init
    )


def test_kmeans_recovers_well_separated_clusters():
    x, truth = _blobs(n_per=60, k=5, dim=32, spread=0.15)
    centroids, objective = _kmeans(x, 5)
    assert centroids.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-4)
    table = pa.table({"doc_id": [f"d{i}" for i in range(len(x))], "embedding": _fixed(x)})
    out = CentroidAssigner(centroids, spherical=True, level="doc")(table)
    assert out.column_names == ["doc_id", "cluster", "similarity", "distance"]
    assert adjusted_rand_score(truth, out["cluster"].to_numpy()) >= 0.9
    sims, dists = out["similarity"].to_numpy(), out["distance"].to_numpy()
    np.testing.assert_allclose(dists, 2 - 2 * sims, atol=1e-4)  # unit vectors: |x-c|^2 = 2 - 2cos
    again, _ = _kmeans(x, 5)
    np.testing.assert_array_equal(centroids, again)  # seeded: a rerun finds the same clusters


def test_kmeans_refuses_fewer_rows_than_clusters():
    x, _ = _blobs(n_per=2, k=2, dim=8, spread=0.1)
    with pytest.raises(Exception, match="at least k=10"):
        train_kmeans(x, k=10, niter=5, nredo=1, seed=0, spherical=True)


def test_auto_k_is_sqrt_half_n_clamped():
    assert auto_k(300) == round(math.sqrt(150)) == 12
    assert auto_k(3) == 2
    assert auto_k(10_000_000, k_max=1000) == 1000


def test_nearest_per_cluster_merges_across_batches():
    rows = pa.table(
        {
            "doc_id": ["a", "b", "c", "d", "e"],
            "cluster": pa.array([0, 0, 1, 0, 1], pa.int32()),
            "similarity": pa.array([0.5, 0.9, 0.7, 0.95, 0.8], pa.float32()),
        }
    )
    partials = [
        *nearest_per_cluster(rows.slice(0, 3), id_column="doc_id", n=2).to_pylist(),
        *nearest_per_cluster(rows.slice(3), id_column="doc_id", n=2).to_pylist(),
    ]
    sizes, ids, sims = merge_nearest(3, partials, 2)
    assert sizes == [3, 2, 0]
    assert ids == [["d", "b"], ["e", "c"], []]
    assert sims[0] == pytest.approx([0.95, 0.9])


# --------------------------------------------------------------------------------------------
# Embedding checks and document vectors


def _fixed(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def test_bad_embeddings_are_rejected_with_their_reason():
    good = np.eye(4, dtype=np.float32)[:2]
    embedding = pa.array(
        [good[0].tolist(), [1.0, 2.0], None, [float("nan"), 0, 0, 1], [0.0] * 4, good[1].tolist()],
        pa.list_(pa.float32()),
    )
    batch = pa.table(
        {
            "doc_id": ["a", "b", "c", "d", "e", None],
            "chunk_id": ["a#0", "b#0", "c#0", "d#0", "e#0", "x#0"],
            "text": ["t"] * 6,
            "embedding": embedding,
        }
    )
    out = chunk_units(batch, dimension=4, spherical=True)
    assert out["reject_reason"].to_pylist() == [
        None,
        WRONG_DIMENSION,
        MISSING_EMBEDDING,
        NON_FINITE_EMBEDDING,
        ZERO_EMBEDDING,
        MISSING_DOC_ID,
    ]
    assert out["embedding"].is_null().to_pylist() == [False, True, True, True, True, True]
    np.testing.assert_array_equal(embedding_matrix(out.slice(0, 1))[0], good[0])


def _chunks(doc_id: str, document: str, spans, vectors) -> pa.Table:
    return embeddings_table(
        doc_ids=[doc_id] * len(spans),
        texts=[document[s:e] for s, e in spans],
        starts=[s for s, _ in spans],
        ends=[e for _, e in spans],
        vectors=np.asarray(vectors, np.float32),
        chunk_indexes=list(range(len(spans))),
    )


def test_a_document_is_the_renormalised_mean_of_its_chunks_and_its_text_once():
    document = "alpha beta gamma delta epsilon"
    spans = [(0, 16), (11, 30)]  # "alpha beta gamma", "gamma delta epsilon": overlap "gamma"
    group = _chunks("doc", document, spans, [[1, 0, 0], [0, 1, 0]])
    out = document_units(group.take([1, 0]), dimension=3, spherical=True)  # chunk order restored
    assert out["reject_reason"][0].as_py() is None
    assert out["n_chunks"][0].as_py() == 2
    assert out["text"][0].as_py() == document
    np.testing.assert_allclose(embedding_matrix(out)[0], [2**-0.5, 2**-0.5, 0], rtol=1e-6)


def test_a_document_with_a_bad_chunk_is_rejected_naming_it():
    group = _chunks("doc", "one two three", [(0, 3), (4, 13)], [[1, 0], [np.nan, 1]])
    out = document_units(group, dimension=2, spherical=True)
    assert out.select(["doc_id", "chunk_id", "reject_reason"]).to_pylist() == [
        {"doc_id": "doc", "chunk_id": "doc#1", "reject_reason": NON_FINITE_EMBEDDING}
    ]


def test_document_text_joins_disjoint_chunks_with_a_space():
    assert document_text(["abc", "xyz"], [0, 10], [3, 13]) == "abc xyz"
    assert document_text(["abc", "bcd"], [0, 1], [3, 4]) == "abcd"


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("k=1", "k"),
        ("level=paragraph", "level"),
        ("actors.num_cpus=0", "actors.num_cpus"),
        ("top_term=5", "top_terms"),  # the did-you-mean names the real key
        ("term_buckets=10", "term_buckets"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ClusterDocsConfig, None, [*REQUIRED, override])


def test_train_sample_smaller_than_k_is_a_config_error():
    with pytest.raises(ConfigError, match="train_sample"):
        load_config(ClusterDocsConfig, None, [*REQUIRED, "k=50", "train_sample=10"])


def test_defaults_cluster_documents_with_automatic_k():
    cfg = load_config(ClusterDocsConfig, None, REQUIRED)
    assert (cfg.level, cfg.k, cfg.niter) == ("doc", None, 25)
