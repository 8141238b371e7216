"""Vector indexes without Ray: build each type, find the right neighbours, save and load, refuse
queries from another model, reject bad rows, and name the key of a config that cannot work."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from workloads.common.config import ConfigError, load_config
from workloads.embed.index import (
    DUPLICATE_CHUNK_ID,
    IDS_SCHEMA,
    MISSING_CHUNK_ID,
    NON_FINITE,
    NULL_EMBEDDING,
    WRONG_DIMENSION,
    BuildIndexConfig,
    ChunkIdCheck,
    IndexConfig,
    IndexConfigError,
    IndexInfo,
    IndexMismatchError,
    TrainingSample,
    VectorIndex,
    auto_nlist,
    auto_pq_m,
    build_index,
    embedding_rows,
    plan_index,
)
from workloads.embed.schema import EmbeddingInfo, vectors_to_arrow

DIM = 32
N = 2000


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """Normalised vectors around 40 centres: neighbours mostly share a centre, as text does."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM))
    x = centres[rng.integers(0, 40, N)] + 0.35 * rng.standard_normal((N, DIM))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    return x


def exact_neighbours(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ x.T), axis=1)[:, :k]


def _info(model="m", dimension=DIM) -> EmbeddingInfo:
    return EmbeddingInfo(model=model, dimension=dimension, normalized=True, precision="fp32")


def _ids(n: int) -> pa.Table:
    return pa.table(
        {
            "doc_id": [f"doc-{i}" for i in range(n)],
            "chunk_id": [f"doc-{i}#0" for i in range(n)],
            "text": [f"text {i}" for i in range(n)],
            "start": [0] * n,
            "end": [7] * n,
            "title": [None] * n,
        },
        schema=IDS_SCHEMA,
    )


@pytest.fixture(scope="module")
def built(clustered):
    """Each index type at its default settings, built once."""
    return {
        kind: build_index(clustered, IndexConfig(type=kind)) for kind in ("flat", "hnsw", "ivf_pq")
    }


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_each_index_type_finds_the_true_neighbours(kind, clustered, built):
    index, plan = built[kind]
    assert index.ntotal == N and plan.type == kind
    rng = np.random.default_rng(1)
    queries = clustered[:100] + 0.05 * rng.standard_normal((100, DIM)).astype(np.float32)
    faiss.normalize_L2(queries)
    _, found = index.search(queries, 10)
    truth = exact_neighbours(clustered, queries, 10)
    assert (found[:, 0] == truth[:, 0]).mean() >= 0.95  # the nearest one, nearly always
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.9)


def test_ivf_pq_defaults_resolve_against_the_data():
    plan = plan_index(
        IndexConfig(type="ivf_pq"),
        dimension=384,
        normalized=True,
        vectors=10_000,
        train_sample=10**5,
    )
    assert plan.nlist == auto_nlist(10_000, 10_000) == 256  # 4*sqrt(N)=400, 39 per list caps it
    assert plan.pq_m == auto_pq_m(384) == 48
    assert plan.factory == "IVF256,PQ48x8np,Refine(SQ8)"
    assert plan.metric == "inner_product"
    assert auto_pq_m(768) == 96 and auto_pq_m(1024) == 64  # at most 96 sub-quantizers (GPU)
    flat = plan_index(
        IndexConfig(type="flat"), dimension=8, normalized=False, vectors=5, train_sample=1
    )
    assert flat.metric == "l2" and not flat.needs_training


def test_factory_string_in_index_json_rebuilds_the_same_structure(built):
    index, plan = built["ivf_pq"]
    rebuilt = faiss.index_factory(DIM, plan.factory, faiss.METRIC_INNER_PRODUCT)
    assert type(rebuilt) is type(index) is faiss.IndexRefine
    assert faiss.extract_index_ivf(rebuilt).nlist == plan.nlist


def test_save_load_roundtrip_gives_the_same_results_and_search_params(tmp_path, clustered):
    index, plan = build_index(clustered, IndexConfig(type="hnsw", hnsw={"ef_search": 48}))
    saved = VectorIndex(index, IndexInfo.describe(plan, _info(), index.ntotal), _ids(N))
    before = saved.search(clustered[:20], 5)
    saved.save(str(tmp_path / "idx"))

    loaded = VectorIndex.load(str(tmp_path / "idx"))
    after = loaded.search(clustered[:20], 5)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6)
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 48  # FAISS does not store it
    assert loaded.info.factory == "HNSW32,Flat" and loaded.info.faiss_version == faiss.__version__
    hits = loaded.hits(loaded.search(clustered[7], 3))[0]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert (hits[0].doc_id, hits[0].chunk_id, hits[0].row) == ("doc-7", "doc-7#0", 7)


def test_fewer_vectors_than_k_are_not_padded_with_fake_hits():
    x = np.eye(4, DIM, dtype=np.float32)
    index, plan = build_index(x, IndexConfig(type="flat"))
    vi = VectorIndex(index, IndexInfo.describe(plan, _info(), 4), _ids(4))
    hits = vi.hits(vi.search(x[0], 10))[0]
    assert len(hits) == 4 and hits[0].row == 0


def test_query_model_and_dimension_mismatch_are_refused(clustered):
    index, plan = build_index(clustered[:50], IndexConfig(type="flat"))
    vi = VectorIndex(index, IndexInfo.describe(plan, _info("model-a"), 50), _ids(50), source="/x")
    vi.check_query_model("model-a", DIM)  # the same model: fine
    with pytest.raises(IndexMismatchError, match="'model-a'.*'model-b'"):
        vi.check_query_model("model-b", DIM)
    with pytest.raises(IndexMismatchError, match=f"{DIM}-d.*64-d"):
        vi.check_query_model("model-a", 64)
    with pytest.raises(IndexMismatchError, match=f"64-d.*{DIM}-d"):
        vi.search(np.zeros((1, 64), np.float32), 3)
    with pytest.raises(IndexMismatchError, match="model-b"):
        vi.search_texts(["a query"], 3, model="model-b")  # refused before loading any model


def test_inconsistent_index_folder_is_refused(clustered):
    index, plan = build_index(clustered[:50], IndexConfig(type="flat"))
    with pytest.raises(ValueError, match="ids.parquet has 49 rows"):
        VectorIndex(index, IndexInfo.describe(plan, _info(), 50), _ids(49))


def test_config_problems_name_the_key_before_any_work():
    def plan(vectors=1000, train_sample=100_000, **spec):
        return plan_index(
            IndexConfig(type="ivf_pq", **spec),
            dimension=384,
            normalized=True,
            vectors=vectors,
            train_sample=train_sample,
        )

    with pytest.raises(
        IndexConfigError, match=r"index\.pq\.m: 50 does not divide the dimension 384"
    ):
        plan(pq={"m": 50})
    with pytest.raises(IndexConfigError, match=r"index\.ivf\.nlist: 2000 lists"):
        plan(ivf={"nlist": 2000})
    with pytest.raises(IndexConfigError, match=r"index\.pq\.nbits: 10 bits need at least 1,024"):
        plan(pq={"nbits": 10})
    with pytest.raises(IndexConfigError, match=r"build\.train_sample=100"):
        plan(train_sample=100, ivf={"nlist": 200})
    assert issubclass(IndexConfigError, ConfigError)  # the job exits as on any config error


def test_yaml_keys_are_checked_by_the_config_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: a}\noutput: {path: b}\n")
    cfg = load_config(BuildIndexConfig, path, ["index.type=ivf_pq", "index.ivf.nprobe=8"])
    assert cfg.index.ivf.nprobe == 8 and cfg.index.refine.type == "sq8"
    with pytest.raises(
        ConfigError, match=r"index\.hnsw\.ef_serch: .*did you mean .index\.hnsw\.ef_search."
    ):
        load_config(BuildIndexConfig, path, ["index.hnsw.ef_serch=16"])
    with pytest.raises(ConfigError, match=r"index\.type: .*'ivf'"):
        load_config(BuildIndexConfig, path, ["index.type=ivf"])
    with pytest.raises(ConfigError, match=r"index\.refine\.k_factor"):
        load_config(BuildIndexConfig, path, ["index.refine.k_factor=0.5"])


def test_bad_embedding_rows_get_a_reason_and_good_ones_their_vector():
    good = np.arange(4, dtype=np.float32)
    fixed = pa.table(
        {
            "embedding": pa.array(
                [good, None, [1.0, float("nan"), 0.0, 0.0], [1.0, None, 0.0, 0.0]],
                pa.list_(pa.float32(), 4),
            )
        }
    )
    vectors, reasons = embedding_rows(fixed, 4)
    assert reasons == [None, NULL_EMBEDDING, NON_FINITE, NON_FINITE]
    np.testing.assert_array_equal(vectors[0], good)
    assert not vectors[1:].any()

    ragged = pa.table(
        {"embedding": pa.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], pa.list_(pa.float64()))}
    )
    vectors, reasons = embedding_rows(ragged, 4)
    assert reasons == [None, WRONG_DIMENSION]
    assert vectors.dtype == np.float32 and vectors[0].tolist() == [1, 2, 3, 4]

    whole_file_wrong = pa.table({"embedding": vectors_to_arrow(np.ones((2, 3)))})
    assert embedding_rows(whole_file_wrong, 4)[1] == [WRONG_DIMENSION] * 2


def test_duplicate_chunk_ids_are_rejected_after_the_first_good_row():
    check = ChunkIdCheck()
    reasons = [NULL_EMBEDDING, None, None, None]
    check(["a", "a", "b", None], reasons)  # the first `a` is bad, so the second one is kept
    assert reasons == [NULL_EMBEDDING, None, None, MISSING_CHUNK_ID]
    reasons = [None, None]
    check(["b", "c"], reasons)  # across batches
    assert reasons == [DUPLICATE_CHUNK_ID, None]


def test_training_sample_is_bounded_uniform_and_seeded():
    def draw(seed):
        sample = TrainingSample(size=500, dimension=1, seed=seed)
        for b in range(20):  # 20 batches of 100: batch b holds the value b
            sample.offer(np.full((100, 1), b, np.float32))
        return sample.take()[:, 0]

    values = draw(0)
    assert len(values) == 500 and len(np.unique(values)) == 20
    counts = np.bincount(values.astype(int), minlength=20)
    assert counts.min() >= 10 and counts.max() <= 45  # 25 expected per batch
    np.testing.assert_array_equal(np.sort(values), np.sort(draw(0)))
    assert not np.array_equal(np.sort(values), np.sort(draw(1)))
