"""Topic clusters over an embed job's output: spherical k-means (FAISS), c-TF-IDF top terms per cluster.

    python ray_jobs/cluster_docs.py --config ray_jobs/configs/cluster_docs/default.yaml
    python ray_jobs/cluster_docs.py --config ray_jobs/configs/cluster_docs/default.yaml k=20 level=chunk

Input is the embed job's output folder (`<input.path>/embeddings/*.parquet`, one row per chunk, and
`<input.path>/embedding.json`; see workloads/embed/schema.py). What is clustered (`level`):
  doc    (the default) one vector per document: the mean of its chunk vectors, re-normalised. The
         user's unit is the document: a long document split into 40 chunks would otherwise weigh 40
         times in cluster sizes and could land in several clusters at once.
  chunk  every chunk on its own: for long, multi-topic documents.

Scale: k-means trains on a bounded random sample (`train_sample` rows, in one Ray task); every row
is then assigned by an actor pool that holds the centroids (`actors.concurrency`). Top terms come
from per-batch, per-cluster term counts (scikit-learn's CountVectorizer, English stop words) summed
on the driver into `term_buckets` hash buckets, so the driver's memory is bounded by k x buckets
whatever the corpus size; then BERTopic's class-based TF-IDF ranks each cluster's terms.

Output (a rerun resumes at the first unfinished stage):
  assignments/    doc_id [, chunk_id], cluster, similarity (cosine to the centroid), distance (squared L2)
  clusters/       cluster, size, top_terms, term_scores, representatives (ids nearest the centroid)
  centroids/      cluster, centroid
  rejects/        rows whose embedding is missing, non-finite, all-zero or of the wrong dimension
  _manifest.json  read (documents, or chunks at level chunk) = assigned + rejected
  _stages/units/  the vectors clustered (document means, or chunks), with text for the term counts
"""

from __future__ import annotations

import logging
import math
import posixpath
import zlib
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from workloads.common.config import JobConfig, OutputConfig, StrictModel
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import InputNotFoundError, OutputLayout, resolve_filesystem
from workloads.embed.schema import (
    EMBEDDING_INFO_FILE,
    EmbeddingInfo,
    embedding_matrix,
    vectors_to_arrow,
)

log = logging.getLogger(__name__)

# Why a row was rejected. Stable strings: they appear in manifests and rejects/.
MISSING_DOC_ID = "missing_doc_id"
MISSING_EMBEDDING = "missing_embedding"
WRONG_DIMENSION = "wrong_dimension"
NON_FINITE_EMBEDDING = "non_finite_embedding"
ZERO_EMBEDDING = "zero_embedding"

FILE_BYTES = 32 << 20  # Parquet files of at least this size (but one) in the folders written
# Letters only, two or more: drops numbers and the underscores of identifiers (`__init__` -> init).
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"


# ---------------------------------------------------------------------------------------------
# Config


class EmbeddingsInputConfig(StrictModel):
    path: str = Field(
        description="The embed job's output folder or URI: holds embeddings/*.parquet and embedding.json."
    )


class AssignActorsConfig(StrictModel):
    concurrency: int | tuple[int, int] = Field(
        default=(1, 2),
        description="Actors that hold the centroids and assign rows: a count, or [min, max] for an "
        "autoscaling pool.",
    )
    num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="Logical CPUs per actor. On a small machine, 0.5 leaves room for the read tasks.",
    )
    batch_size: int = Field(default=4096, ge=1, description="Rows per assignment batch.")


class ClusterDocsConfig(JobConfig):
    input: EmbeddingsInputConfig
    output: OutputConfig
    level: Literal["doc", "chunk"] = Field(
        default="doc",
        description="`doc`: cluster documents (mean of their chunk vectors, re-normalised); "
        "`chunk`: cluster chunks.",
    )
    k: int | None = Field(
        default=None,
        ge=2,
        description="Clusters. Empty: round(sqrt(N / 2)) for N rows, the rule of thumb of Mardia, "
        "Kent & Bibby (Multivariate Analysis, 1979), clamped to [2, auto_k_max].",
    )
    auto_k_max: int = Field(default=1000, ge=2, description="Largest k that `k: null` picks.")
    niter: int = Field(default=25, ge=1, description="k-means iterations (FAISS's default).")
    nredo: int = Field(
        default=3,
        ge=1,
        description="k-means runs (different seeds), the best objective kept. On 5 well-separated "
        "blobs, a single k-means++ run merged two of them in 1 of 40 seeded trials (one was "
        "FAISS's default seed); the best of 3 never did. Costs nredo x the training time.",
    )
    init: Literal["kmeans++", "random"] = Field(
        default="kmeans++",
        description="Centroid initialisation. k-means++ (Arthur & Vassilvitskii, 2007) avoids the "
        "merged clusters that random seeding leaves; it costs O(n k d) on the sample only.",
    )
    seed: int = Field(
        default=1234, description="Seed of the sample and of k-means (FAISS's default)."
    )
    spherical: bool | None = Field(
        default=None,
        description="Spherical k-means (unit vectors, cosine). Empty: when embedding.json says the "
        "vectors are normalised.",
    )
    train_sample: int = Field(
        default=100_000,
        ge=2,
        description="k-means trains on a random sample of at most this many rows (FAISS itself "
        "uses at most 256 per centroid and warns under 39 per centroid).",
    )
    train_cpus: float = Field(default=1, gt=0, description="Logical CPUs of the k-means task.")
    top_terms: int = Field(default=10, ge=1, le=100, description="Top c-TF-IDF terms per cluster.")
    representatives: int = Field(
        default=3, ge=0, le=100, description="Ids nearest each centroid listed in clusters/."
    )
    term_buckets: int = Field(
        default=1 << 20,
        ge=1 << 10,
        le=1 << 24,
        description="Hash buckets for term counts: bounds the driver's memory at k x buckets "
        "counts. Terms that share a bucket share a count (rare with 2^20 buckets).",
    )
    num_partitions: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="Partitions of the doc_id group-by that averages chunks (level doc). On a "
        "cluster, about 4 per GB of embeddings and at least the number of CPUs.",
    )
    actors: AssignActorsConfig = Field(default_factory=AssignActorsConfig)

    @model_validator(mode="after")
    def _check_k(self) -> ClusterDocsConfig:
        if self.k is not None and self.train_sample < self.k:
            raise ValueError(
                f"train_sample: {self.train_sample} rows cannot train k={self.k} centroids; "
                "raise train_sample or lower k"
            )
        return self


def auto_k(n: int, k_max: int = 1000) -> int:
    """round(sqrt(n / 2)), clamped to [2, k_max] and to n (Mardia, Kent & Bibby's rule of thumb)."""
    return max(2, min(k_max, n, round(math.sqrt(n / 2))))


# ---------------------------------------------------------------------------------------------
# Per-batch logic (plain functions over pyarrow tables; no Ray)


def units_schema(dimension: int) -> pa.Schema:
    """The rows k-means sees: one per document (level doc) or per chunk (level chunk)."""
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("chunk_id", pa.string()),  # null for documents; the bad chunk of a rejected document
            ("text", pa.string()),
            ("n_chunks", pa.int32()),
            ("embedding", pa.list_(pa.float32(), dimension)),  # null when rejected
            ("reject_reason", pa.string()),
        ]
    )


REJECTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("chunk_id", pa.string()),
        ("n_chunks", pa.int32()),
        ("reject_reason", pa.string()),
    ]
)


def assignments_schema(level: str) -> pa.Schema:
    ids = [("doc_id", pa.string())] + ([("chunk_id", pa.string())] if level == "chunk" else [])
    return pa.schema(
        [*ids, ("cluster", pa.int32()), ("similarity", pa.float32()), ("distance", pa.float32())]
    )


CLUSTERS_SCHEMA = pa.schema(
    [
        ("cluster", pa.int32()),
        ("size", pa.int64()),
        ("top_terms", pa.list_(pa.string())),
        ("term_scores", pa.list_(pa.float32())),
        ("representatives", pa.list_(pa.string())),
        ("representative_similarity", pa.list_(pa.float32())),
    ]
)


def _null_mask_vectors(vectors: np.ndarray, bad: np.ndarray) -> pa.FixedSizeListArray:
    dim = vectors.shape[1]
    values = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(bad, pa.bool_()))


def check_embeddings(batch: pa.Table, *, dimension: int) -> tuple[np.ndarray, list[str | None]]:
    """(vectors (n, dimension) float32 with zeros in bad rows, reject reason per row).

    The embedding column may be a fixed-size or variable list of any float type (a file written by
    another tool, or by a run of another model), so a wrong dimension is a row's reject reason,
    not a crash of the job.
    """
    n = batch.num_rows
    reasons: list[str | None] = [None] * n
    vectors = np.zeros((n, dimension), np.float32)
    doc_ids = batch["doc_id"].to_pylist()
    col = batch["embedding"].combine_chunks() if "embedding" in batch.column_names else None
    if col is None or not (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        reason = MISSING_EMBEDDING
        return vectors, [MISSING_DOC_ID if d is None else reason for d in doc_ids]
    lists = col.cast(pa.list_(pa.float32()))
    lengths = pc.fill_null(pc.list_value_length(lists), -1).to_numpy(zero_copy_only=False)
    right = np.flatnonzero(lengths == dimension)
    if len(right):
        flat = pc.list_flatten(lists.take(pa.array(right))).to_numpy(zero_copy_only=False)
        vectors[right] = flat.reshape(len(right), dimension)  # null floats arrive as NaN
    finite = np.isfinite(vectors).all(axis=1)
    vectors[~finite] = 0.0
    nonzero = np.abs(vectors).sum(axis=1) > 0
    for i in range(n):
        if doc_ids[i] is None:
            reasons[i] = MISSING_DOC_ID
        elif lengths[i] < 0:
            reasons[i] = MISSING_EMBEDDING
        elif lengths[i] != dimension:
            reasons[i] = WRONG_DIMENSION
        elif not finite[i]:
            reasons[i] = NON_FINITE_EMBEDDING
        elif not nonzero[i]:
            reasons[i] = ZERO_EMBEDDING
    return vectors, reasons


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def chunk_units(batch: pa.Table, *, dimension: int, spherical: bool) -> pa.Table:
    """Embedding rows -> unit rows, one per chunk (level chunk)."""
    vectors, reasons = check_embeddings(batch, dimension=dimension)
    bad = np.array([r is not None for r in reasons], bool)
    if spherical:
        vectors = normalize_rows(vectors)
    return pa.Table.from_arrays(
        [
            batch["doc_id"],
            batch["chunk_id"],
            batch["text"],
            pa.array(np.ones(batch.num_rows, np.int32)),
            _null_mask_vectors(vectors, bad),
            pa.array(reasons, pa.string()),
        ],
        schema=units_schema(dimension),
    )


def document_text(texts: list[str | None], starts: list, ends: list) -> str:
    """A document's text from its chunks (in order), without repeating where chunks overlap:
    each chunk is `document[start:end]`, so the part of it before the covered end is skipped."""
    pieces: list[str] = []
    covered = None
    for text, start, end in zip(texts, starts, ends, strict=True):
        text = text or ""
        if start is None or end is None or covered is None:
            if pieces and (start is None or covered is None or start > covered):
                pieces.append(" ")
            pieces.append(text)
        elif end > covered:
            if start > covered:
                pieces.append(" ")
            pieces.append(text[max(0, covered - start) :])
        if end is not None:
            covered = end if covered is None else max(covered, end)
    return "".join(pieces)


def document_units(group: pa.Table, *, dimension: int, spherical: bool) -> pa.Table:
    """All the chunk rows of one document -> its unit row: the mean of the chunk vectors
    (re-normalised when spherical), or a rejection naming the first bad chunk.

    A document with any bad chunk is rejected whole: a mean over the remaining chunks would stand
    for part of the document only, and a bad vector means its embed run needs redoing anyway.
    """
    if "chunk_index" in group.column_names:
        group = group.sort_by([("chunk_index", "ascending")])
    vectors, reasons = check_embeddings(group, dimension=dimension)
    bad = next((i for i, r in enumerate(reasons) if r is not None), None)
    doc_id = group["doc_id"][0].as_py()
    text = document_text(
        group["text"].to_pylist(), group["start"].to_pylist(), group["end"].to_pylist()
    )
    if bad is None:
        mean = vectors.mean(axis=0, keepdims=True)
        if spherical:
            mean = normalize_rows(mean)
        if not np.abs(mean).sum() > 0:  # chunks that cancel out: no direction to cluster by
            bad, reasons = 0, [ZERO_EMBEDDING]
    else:
        mean = np.zeros((1, dimension), np.float32)
    return pa.Table.from_arrays(
        [
            pa.array([doc_id], pa.string()),
            pa.array([None if bad is None else group["chunk_id"][bad].as_py()], pa.string()),
            pa.array([text], pa.string()),
            pa.array([group.num_rows], pa.int32()),
            _null_mask_vectors(mean, np.array([bad is not None])),
            pa.array([None if bad is None else reasons[bad]], pa.string()),
        ],
        schema=units_schema(dimension),
    )


def orphan_chunk_units(batch: pa.Table, *, dimension: int) -> pa.Table:
    """Chunks without a doc_id (level doc): each is a unit of its own, rejected."""
    return chunk_units(batch, dimension=dimension, spherical=False)


def centroid_index(centroids: np.ndarray, spherical: bool):
    """A FAISS flat index over the centroids: inner product for unit vectors, else L2."""
    import faiss

    centroids = np.ascontiguousarray(centroids, np.float32)
    index = (
        faiss.IndexFlatIP(centroids.shape[1])
        if spherical
        else faiss.IndexFlatL2(centroids.shape[1])
    )
    index.add(centroids)
    return index


def assign_vectors(
    vectors: np.ndarray, centroids: np.ndarray, index
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster, cosine similarity, squared L2 distance) of each vector's nearest centroid."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if len(vectors) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    _, labels = index.search(vectors, 1)
    labels = labels[:, 0]
    c = centroids[labels]
    dot = (vectors * c).sum(axis=1)
    xx, cc = (vectors * vectors).sum(axis=1), (c * c).sum(axis=1)
    similarity = dot / np.maximum(np.sqrt(xx * cc), 1e-12)
    distance = np.maximum(xx + cc - 2 * dot, 0.0)
    return labels.astype(np.int32), similarity.astype(np.float32), distance.astype(np.float32)


def assign_batch(
    batch: pa.Table, *, centroids: np.ndarray, index, level: str, keep_text: bool
) -> pa.Table:
    """Good unit rows -> assignment rows (plus `text` when `keep_text`, for the term counts)."""
    labels, similarity, distance = assign_vectors(embedding_matrix(batch), centroids, index)
    schema = assignments_schema(level)
    columns = [batch[name] for name in schema.names[: len(schema) - 3]]
    columns += [pa.array(labels), pa.array(similarity), pa.array(distance)]
    out = pa.Table.from_arrays(columns, schema=schema)
    return out.append_column("text", batch["text"]) if keep_text else out


class CentroidAssigner:
    """Assigns unit rows to their nearest centroid. A callable class, so that each actor of the
    pool builds its FAISS index once and keeps it across batches."""

    def __init__(self, centroids: np.ndarray, spherical: bool, level: str, keep_text: bool = False):
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.index = centroid_index(self.centroids, spherical)
        self.level, self.keep_text = level, keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        return assign_batch(
            batch,
            centroids=self.centroids,
            index=self.index,
            level=self.level,
            keep_text=self.keep_text,
        )


TERM_COUNTS_SCHEMA = pa.schema(
    [
        ("cluster", pa.int32()),
        ("term", pa.string()),
        ("bucket", pa.int64()),  # term_bucket(term): where the driver adds the count
        ("count", pa.int64()),
    ]
)


def cluster_term_counts(batch: pa.Table, *, buckets: int) -> pa.Table:
    """(cluster, term, bucket, count) for a batch of (cluster, text) rows: the batch's documents
    joined per cluster and counted, English stop words removed (c-TF-IDF's bag of words per
    class). Terms are hashed here, in parallel, so the driver only adds arrays."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [t or "" for t in batch["text"].to_pylist()]
    clusters = batch["cluster"].to_numpy(zero_copy_only=False).astype(np.int64)
    vectorizer = CountVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN, dtype=np.int64)
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError:  # every word a stop word, or no text at all
        return TERM_COUNTS_SCHEMA.empty_table()
    ids, local = np.unique(clusters, return_inverse=True)
    onehot = sparse.csr_matrix(
        (np.ones(len(texts), np.int64), (local, np.arange(len(texts)))),
        shape=(len(ids), len(texts)),
    )
    per_cluster = (onehot @ counts).tocoo()
    terms = vectorizer.get_feature_names_out()
    bucket = np.fromiter((term_bucket(t, buckets) for t in terms), np.int64, len(terms))
    return pa.Table.from_arrays(
        [
            pa.array(ids[per_cluster.row].astype(np.int32)),
            pa.array(terms[per_cluster.col].tolist(), pa.string()),
            pa.array(bucket[per_cluster.col]),
            pa.array(per_cluster.data.astype(np.int64)),
        ],
        schema=TERM_COUNTS_SCHEMA,
    )


def term_bucket(term: str, buckets: int) -> int:
    """A stable hash (CRC-32; Python's hash() changes between processes)."""
    return zlib.crc32(term.encode("utf-8")) % buckets


class TermCounts:
    """Per-cluster term counts summed over batches in k x `buckets` sparse counts: memory bounded
    by the config, not by the corpus's vocabulary. A bucket is named by the most frequent term
    seen in it (within one batch), which is the term that decides its count."""

    def __init__(self, k: int, buckets: int):
        from scipy import sparse

        self.k, self.buckets = k, buckets
        self.counts = sparse.csr_matrix((k, buckets), dtype=np.int64)
        self.names: dict[int, tuple[str, int]] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, table: pa.Table) -> None:
        """Add a `cluster_term_counts` table (hashed with the same number of buckets)."""
        if table.num_rows == 0:
            return
        counts = table["count"].to_numpy(zero_copy_only=False)
        rows = table["cluster"].to_numpy(zero_copy_only=False).astype(np.int64)
        cols = table["bucket"].to_numpy(zero_copy_only=False)
        totals = table.group_by(["bucket", "term"]).aggregate([("count", "sum")])
        names = self.names
        for b, t, c in zip(
            totals["bucket"].to_pylist(),
            totals["term"].to_pylist(),
            totals["count_sum"].to_pylist(),
            strict=True,
        ):
            if b not in names or names[b][1] < c:
                names[b] = (t, c)
        self._pending.append((rows, cols, counts))
        self._pending_rows += table.num_rows
        if self._pending_rows > 5_000_000:
            self._flush()

    def _flush(self) -> None:
        from scipy import sparse

        if not self._pending:
            return
        rows, cols, data = (np.concatenate(p) for p in zip(*self._pending, strict=True))
        self.counts = self.counts + sparse.csr_matrix(
            (data, (rows, cols)), shape=(self.k, self.buckets)
        )
        self._pending, self._pending_rows = [], 0

    def matrix(self):
        """(k x buckets counts, bucket names) with only the buckets that were seen."""
        self._flush()
        used = np.array(sorted(self.names), np.int64)
        return self.counts[:, used].tocsr(), [self.names[b][0] for b in used.tolist()]


def class_tfidf(counts):
    """BERTopic's class-based TF-IDF (Grootendorst, 2022, eq. 1; bertopic/vectorizers/_ctfidf.py):
    W[c, t] = tf[c, t] * log(1 + A / f[t]), with tf the L1-normalised count of term t in class c,
    f[t] the count of t over all classes and A the average number of words per class.
    `counts` is a (classes x terms) sparse matrix; returns the same shape."""
    from scipy import sparse
    from sklearn.preprocessing import normalize

    counts = sparse.csr_matrix(counts, dtype=np.float64)
    f = np.asarray(counts.sum(axis=0)).ravel()
    avg_words = counts.sum() / max(counts.shape[0], 1)
    idf = np.log(1 + avg_words / np.where(f > 0, f, 1.0))
    tf = normalize(counts, norm="l1", axis=1)
    return (tf @ sparse.diags(idf)).tocsr()


def top_terms(weights, names: list[str], n: int) -> list[list[tuple[str, float]]]:
    """The `n` highest-weighted terms of each row (ties: alphabetical, so reruns agree)."""
    out = []
    for r in range(weights.shape[0]):
        row = weights.getrow(r)
        pairs = sorted(
            ((names[j], float(w)) for j, w in zip(row.indices, row.data, strict=True) if w > 0),
            key=lambda p: (-p[1], p[0]),
        )
        out.append(pairs[:n])
    return out


NEAREST_SCHEMA = pa.schema(
    [
        ("cluster", pa.int32()),
        ("size", pa.int64()),
        ("ids", pa.list_(pa.string())),
        ("similarity", pa.list_(pa.float32())),
    ]
)


def nearest_per_cluster(batch: pa.Table, *, id_column: str, n: int) -> pa.Table:
    """Per cluster in a batch of assignments: its row count and its `n` rows nearest the centroid."""
    clusters = batch["cluster"].to_numpy(zero_copy_only=False)
    sims = batch["similarity"].to_numpy(zero_copy_only=False)
    ids = batch[id_column].to_pylist()
    rows: dict[str, list] = {"cluster": [], "size": [], "ids": [], "similarity": []}
    for c in np.unique(clusters).tolist():
        members = np.flatnonzero(clusters == c)
        best = members[np.lexsort(([ids[i] for i in members], -sims[members]))][:n]
        rows["cluster"].append(c)
        rows["size"].append(len(members))
        rows["ids"].append([ids[i] for i in best])
        rows["similarity"].append(sims[best].tolist())
    return pa.table(rows, schema=NEAREST_SCHEMA)


def merge_nearest(
    k: int, partials: list[dict], n: int
) -> tuple[list[int], list[list[str]], list[list[float]]]:
    """Sum the sizes and keep the overall `n` nearest of per-batch `nearest_per_cluster` rows."""
    sizes = [0] * k
    best: list[list[tuple[float, str]]] = [[] for _ in range(k)]
    for row in partials:
        c = row["cluster"]
        sizes[c] += row["size"]
        best[c].extend(zip(row["similarity"], row["ids"], strict=True))
    ids, sims = [], []
    for c in range(k):
        top = sorted(best[c], key=lambda p: (-p[0], p[1]))[:n]
        ids.append([i for _, i in top])
        sims.append([s for s, _ in top])
    return sizes, ids, sims


def train_kmeans(
    vectors: np.ndarray,
    *,
    k: int,
    niter: int,
    nredo: int,
    seed: int,
    spherical: bool,
    init: str = "kmeans++",
) -> tuple[np.ndarray, float]:
    """FAISS k-means: (centroids (k, d), final objective). Deterministic for a seed and row order."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    if len(vectors) < k:
        raise JobFailed(
            f"k-means needs at least k={k} rows to train on, got {len(vectors)}: lower k "
            "(or leave it empty to pick one from the row count)"
        )
    method = (
        faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
        if init == "kmeans++"
        else faiss.ClusteringInitMethod_RANDOM
    )
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=spherical,
        init_method=method,
        verbose=False,
    )
    kmeans.train(vectors)
    return np.ascontiguousarray(kmeans.centroids, np.float32), float(kmeans.obj[-1])


# ---------------------------------------------------------------------------------------------
# The job


def _read_input(cfg: ClusterDocsConfig) -> tuple[pafs.FileSystem, str, EmbeddingInfo]:
    """(filesystem, embeddings folder, EmbeddingInfo); fails before any Ray work, naming the path."""
    fs, root = resolve_filesystem(cfg.input.path.rstrip("/"))
    folder = posixpath.join(root, "embeddings")
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        raise InputNotFoundError(
            f"input.path {cfg.input.path!r} holds no embeddings/ folder (run ray_jobs/embed.py first)"
        )
    info_path = posixpath.join(root, EMBEDDING_INFO_FILE)
    if fs.get_file_info(info_path).type != pafs.FileType.File:
        raise InputNotFoundError(f"input.path {cfg.input.path!r} holds no {EMBEDDING_INFO_FILE}")
    return fs, folder, EmbeddingInfo.read(fs, info_path)


def _count_parquet_rows(fs, folder: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(
        folder, format="parquet", filesystem=fs, exclude_invalid_files=True
    ).count_rows()


def count_reasons(fs, folder: str) -> dict[str, int]:
    """Rows per `reject_reason` in a rejects/ folder, scanned on the driver: rejects are few, and
    one column of them costs less to read here than a Ray pass costs to start."""
    import pyarrow.dataset as pads

    counts: dict[str, int] = {}
    scan = pads.dataset(folder, format="parquet", filesystem=fs, exclude_invalid_files=True)
    for batch in scan.to_batches(columns=["reject_reason"]):
        for reason in batch.column(0).to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def run(cfg: ClusterDocsConfig) -> JobManifest:
    import ray
    from ray.data.expressions import col

    fs, folder, info = _read_input(cfg)
    spherical = info.normalized if cfg.spherical is None else cfg.spherical
    dim = info.dimension
    manifest = JobManifest("cluster_docs", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray)
    id_column = "chunk_id" if cfg.level == "chunk" else "doc_id"

    def chunks():
        return ray.data.read_parquet(folder, filesystem=fs, file_extensions=["parquet"])

    def good_units(columns=None):
        return out.read_dataset("_stages/units", columns).filter(
            expr=col("reject_reason").is_null()
        )

    def units(stage_folder: str) -> dict:
        kwargs = {"dimension": dim, "spherical": spherical}
        if cfg.level == "chunk":
            ds = chunks().map_batches(chunk_units, batch_format="pyarrow", fn_kwargs=kwargs)
        else:
            named = chunks().filter(expr=col("doc_id").is_not_null())
            docs = named.groupby("doc_id", num_partitions=cfg.num_partitions).map_groups(
                document_units, batch_format="pyarrow", fn_kwargs=kwargs
            )
            orphans = (
                chunks()
                .filter(expr=col("doc_id").is_null())
                .map_batches(
                    orphan_chunk_units, batch_format="pyarrow", fn_kwargs={"dimension": dim}
                )
            )
            ds = docs.union(orphans)
        # Group-by partitions emit many small blocks; a few large files keep later reads few.
        out.write_dataset(ds, stage_folder, units_schema(dim), min_bytes_per_file=FILE_BYTES)
        return {"rows": out.count_rows("_stages/units"), "chunks": _count_parquet_rows(fs, folder)}

    def rejects(stage_folder: str) -> dict:
        bad = out.read_dataset("_stages/units", REJECTS_SCHEMA.names).filter(
            expr=col("reject_reason").is_not_null()
        )
        out.write_dataset(bad, stage_folder, REJECTS_SCHEMA)
        return {"reasons": count_reasons(out.fs, stage_folder)}

    def centroids(stage_folder: str) -> dict:
        import pyarrow.parquet as pq

        n = read_info["rows"] - sum(rejected.values())
        k = cfg.k if cfg.k is not None else auto_k(n, cfg.auto_k_max)
        if n < k:
            raise JobFailed(f"k={k} clusters but only {n} rows have a usable embedding: lower k")
        fraction = min(1.0, cfg.train_sample / n)
        sample = good_units([id_column, "embedding"])
        if fraction < 1.0:
            sample = sample.random_sample(fraction, seed=cfg.seed)
        tables = list(sample.iter_batches(batch_format="pyarrow", batch_size=None))
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows < k:
            raise JobFailed(
                f"the k-means sample holds {0 if table is None else table.num_rows} rows, fewer "
                f"than k={k}: raise train_sample or lower k"
            )
        # Row order decides FAISS's sampling and seeding: sort by id, so block order does not.
        table = table.sort_by(id_column)
        if table.num_rows > cfg.train_sample:  # the Bernoulli sample overshot its expected size
            rng = np.random.default_rng(cfg.seed)
            keep = np.sort(rng.choice(table.num_rows, cfg.train_sample, replace=False))
            table = table.take(pa.array(keep))
        vectors = embedding_matrix(table)
        task = ray.remote(num_cpus=cfg.train_cpus)(train_kmeans)
        found, objective = ray.get(
            task.remote(
                vectors,
                k=k,
                niter=cfg.niter,
                nredo=cfg.nredo,
                seed=cfg.seed,
                spherical=spherical,
                init=cfg.init,
            )
        )
        result = pa.table(
            {"cluster": pa.array(np.arange(k, dtype=np.int32)), "centroid": vectors_to_arrow(found)}
        )
        with out.fs.open_output_stream(posixpath.join(stage_folder, "centroids.parquet")) as f:
            pq.write_table(result, f)
        return {"k": k, "auto_k": cfg.k is None, "train_rows": len(vectors), "objective": objective}

    def assigner(keep_text: bool) -> dict:
        return dict(
            fn_constructor_kwargs={
                "centroids": centers,
                "spherical": spherical,
                "level": cfg.level,
                "keep_text": keep_text,
            },
            batch_format="pyarrow",
            batch_size=cfg.actors.batch_size,
            concurrency=cfg.actors.concurrency,
            num_cpus=cfg.actors.num_cpus,
        )

    def assignments(stage_folder: str) -> dict:
        columns = [*assignments_schema(cfg.level).names[:-3], "embedding"]
        ds = good_units(columns).map_batches(CentroidAssigner, **assigner(keep_text=False))
        out.write_dataset(
            ds, stage_folder, assignments_schema(cfg.level), min_bytes_per_file=FILE_BYTES
        )
        return {"rows": out.count_rows("assignments")}

    def clusters(stage_folder: str) -> dict:
        import pyarrow.parquet as pq

        # Term counts assign the rows again rather than join text to assignments/: one k x d
        # product per batch costs less than shuffling every document's text.
        columns = [*assignments_schema(cfg.level).names[:-3], "text", "embedding"]
        counted = (
            good_units(columns)
            .map_batches(CentroidAssigner, **assigner(keep_text=True))
            .map_batches(
                cluster_term_counts,
                batch_format="pyarrow",
                fn_kwargs={"buckets": cfg.term_buckets},
            )
        )
        terms = TermCounts(k, cfg.term_buckets)
        for batch in counted.iter_batches(batch_format="pyarrow", batch_size=None):
            terms.add(batch)
        matrix, names = terms.matrix()
        ranked = top_terms(class_tfidf(matrix), names, cfg.top_terms)
        partials = (
            out.read_dataset("assignments", [id_column, "cluster", "similarity"])
            .map_batches(
                nearest_per_cluster,
                batch_format="pyarrow",
                fn_kwargs={"id_column": id_column, "n": cfg.representatives},
            )
            .take_all()
        )
        sizes, reps, rep_sims = merge_nearest(k, partials, cfg.representatives)
        summary = pa.table(
            {
                "cluster": pa.array(np.arange(k, dtype=np.int32)),
                "size": pa.array(sizes, pa.int64()),
                "top_terms": [[t for t, _ in r] for r in ranked],
                "term_scores": [[s for _, s in r] for r in ranked],
                "representatives": reps,
                "representative_similarity": rep_sims,
            },
            schema=CLUSTERS_SCHEMA,
        )
        with out.fs.open_output_stream(posixpath.join(stage_folder, "clusters.parquet")) as f:
            pq.write_table(summary, f)
        largest = sorted(range(k), key=lambda c: -sizes[c])[:10]
        for c in largest:
            log.info("cluster %d (%d rows): %s", c, sizes[c], ", ".join(t for t, _ in ranked[c]))
        return {"empty_clusters": sum(1 for s in sizes if s == 0)}

    read_info = out.run_stage("_stages/units", units, manifest).info
    rejected = out.run_stage("rejects", rejects, manifest).info["reasons"]
    trained = out.run_stage("centroids", centroids, manifest).info
    k = trained["k"]
    centers = _read_centroids(out)
    manifest.read = read_info["rows"]
    manifest.rejected = rejected
    manifest.kept = out.run_stage("assignments", assignments, manifest).info["rows"]
    summary = out.run_stage("clusters", clusters, manifest).info
    manifest.outputs = {
        name: out.path(name) for name in ("assignments", "clusters", "centroids", "rejects")
    }
    manifest.extra = {
        "level": cfg.level,
        "chunks_read": read_info["chunks"],
        "embedding_model": info.model,
        "dimension": dim,
        "spherical": spherical,
        **trained,
        **summary,
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)


def _read_centroids(out: OutputLayout) -> np.ndarray:
    import pyarrow.parquet as pq

    with out.fs.open_input_file(posixpath.join(out.path("centroids"), "centroids.parquet")) as f:
        table = pq.read_table(f)
    return embedding_matrix(table.sort_by("cluster"), "centroid")
