"""Vector indexes over chunk embeddings: FAISS flat, HNSW and IVF-PQ; build, save, load, search.

    python ray_jobs/build_index.py --config ray_jobs/configs/build_index/default.yaml
    python -m workloads.embed.search --index outputs/index --k 5 "how do I open a file"

    from workloads.embed.index import VectorIndex
    index = VectorIndex.load("outputs/index")               # a folder or a URI (s3://, gs://)
    for hit in index.search_texts(["how do I open a file"], k=5)[0]:
        print(hit.rank, hit.score, hit.chunk_id, hit.text)

An index folder (the build job's output) holds
    index.faiss      the FAISS index; vector i is row i of ids.parquet
    ids.parquet      doc_id, chunk_id, text, start, end of each vector
    index.json       IndexInfo: the embedding model, dimension, normalisation, metric, index type,
                     FAISS factory string, vector count, search parameters, FAISS version
    rejects/         input rows that were not indexed, each with `reject_reason`
    _manifest.json   config, versions, timings, counts (read = kept + rejected)

The query side refuses vectors from another model: `VectorIndex.check_query_model` raises
`IndexMismatchError` naming both models (or both dimensions), and `search_texts` embeds queries
with the model that index.json names, so a RAG app cannot silently compare two vector spaces.

The build job streams: it reads the embeddings in batches twice (pyarrow, one batch at a time).
The first pass checks every row (null, NaN or wrong-length vectors and duplicate chunk ids are
rejected) and keeps a uniform random training sample; the second adds the kept rows to the
trained index. Besides the index itself, it holds the sample, one batch, one byte per row and the
set of chunk ids seen. IVF-PQ is trained and filled on a GPU when the task has one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from workloads.common.config import ConfigError, JobConfig, OutputConfig, StrictModel
from workloads.common.manifest import JobFailed, JobManifest, StageTiming, finish_job
from workloads.common.storage import (
    InputNotFoundError,
    OutputLayout,
    expand_input_paths,
    resolve_filesystem,
)
from workloads.embed.schema import EMBEDDING_INFO_FILE, EmbeddingInfo

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INFO_FILE = "index.json"
REJECTS = "rejects"
IDS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("chunk_id", pa.string()),
        ("text", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("title", pa.string()),  # null in indexes built before titles, and for untitled docs
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("chunk_id", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("reject_reason", pa.string()),
    ]
)

# Reject reasons (manifest counts and rejects/reject_reason).
NULL_EMBEDDING = "null_embedding"
WRONG_DIMENSION = "wrong_dimension"
NON_FINITE = "non_finite_embedding"
MISSING_CHUNK_ID = "missing_chunk_id"
DUPLICATE_CHUNK_ID = "duplicate_chunk_id"

# FAISS's k-means warns below 39 training points per centroid (ClusteringParameters
# min_points_per_centroid) and fails below one.
MIN_POINTS_PER_CENTROID = 39
# GpuIndexIVFPQ accepts at most 96 sub-quantizers (bytes per code at 8 bits).
MAX_GPU_PQ_M = 96


class IndexMismatchError(ValueError):
    """Query vectors (or a query model) that do not match the model the index was built from."""


class IndexConfigError(ConfigError, JobFailed):
    """A config that cannot build an index over these embeddings (e.g. pq.m does not divide the
    dimension). Raised before any work; the message names each bad key."""


# ---------------------------------------------------------------------------------------------
# Config. The choice of index follows FAISS's "Guidelines to choose an index" (faiss wiki):
# exact results -> Flat; plenty of RAM or a small dataset -> HNSW (M 4..64, efSearch the speed /
# recall knob); memory a concern -> IVF with PQ codes, re-ranked by a finer code ("Refine").


class HnswConfig(StrictModel):
    m: int = Field(
        default=32,
        ge=4,
        le=128,
        description="Links per vector (HNSW's M). FAISS guidance: 4 to 64; higher is more accurate "
        "and costs dimension*4 + M*2*4 bytes per vector.",
    )
    ef_construction: int = Field(
        default=80,
        ge=8,
        description="Candidates kept while linking a new vector (FAISS's default 40): a better graph "
        "for a slower build.",
    )
    ef_search: int = Field(
        default=64,
        ge=1,
        description="Candidates kept per query: the speed/recall knob, applied when the index loads.",
    )


class IvfConfig(StrictModel):
    nlist: int | None = Field(
        default=None,
        ge=1,
        description="Inverted lists (k-means centroids). null: 4*sqrt(N) (the low end of FAISS's "
        "4..16*sqrt(N) for under 1M vectors), at most one per 39 training vectors.",
    )
    # 64 with refine k_factor 8: recall@10 0.98 on 10k MiniLM vectors (bench/RESULTS.md "index"),
    # where 32 with k_factor 4 gave 0.946. More lists (more vectors) need a larger nprobe.
    nprobe: int = Field(
        default=64,
        ge=1,
        description="Lists scanned per query: the speed/recall knob, applied when the index loads. "
        "Raise it with nlist.",
    )


class PqConfig(StrictModel):
    m: int | None = Field(
        default=None,
        ge=1,
        description="Sub-quantizers (code bytes per vector at 8 bits); must divide the dimension. "
        "null: the largest divisor of the dimension up to dimension/8 and 96 (48 for 384-d).",
    )
    nbits: int = Field(
        default=8,
        ge=4,
        le=12,
        description="Bits per sub-quantizer code; training needs at least 2**nbits vectors.",
    )


class RefineConfig(StrictModel):
    type: Literal["none", "sq8", "flat"] = Field(
        default="sq8",
        description="Re-rank the IVF-PQ candidates with a finer copy of each vector: sq8 (1 byte "
        "per dimension), flat (the float32 vector: exact scores) or none (PQ scores only).",
    )
    k_factor: float = Field(
        default=8.0,
        ge=1.0,
        description="Candidates re-ranked per query: k * k_factor.",
    )


class IndexConfig(StrictModel):
    type: Literal["flat", "hnsw", "ivf_pq"] = Field(
        default="hnsw",
        description="flat: exact, no training. hnsw: graph, fast and accurate, full vectors in RAM. "
        "ivf_pq: compressed codes, trained on a sample; for many millions of vectors.",
    )
    metric: Literal["auto", "inner_product", "l2"] = Field(
        default="auto",
        description="auto: inner_product (cosine) for normalised embeddings, else l2.",
    )
    hnsw: HnswConfig = Field(default_factory=HnswConfig, description="Used by type=hnsw.")
    ivf: IvfConfig = Field(default_factory=IvfConfig, description="Used by type=ivf_pq.")
    pq: PqConfig = Field(default_factory=PqConfig, description="Used by type=ivf_pq.")
    refine: RefineConfig = Field(default_factory=RefineConfig, description="Used by type=ivf_pq.")


class BuildConfig(StrictModel):
    train_sample: int = Field(
        default=100_000,
        ge=1,
        description="Vectors sampled (uniformly, seeded) to train IVF-PQ. FAISS wants 30..256 per "
        "list and 39 per PQ centroid.",
    )
    add_batch_size: int = Field(
        default=8192, ge=1, description="Rows read and added per batch (bounds memory)."
    )
    seed: int = Field(default=0, description="Seed of the training sample and of k-means.")
    num_cpus: float = Field(
        default=1, gt=0, description="CPUs of the Ray task that builds the index (FAISS threads)."
    )
    num_gpus: float = Field(
        default=0,
        ge=0,
        description="GPUs of that task. With one, IVF-PQ is trained and filled on it.",
    )


class EmbeddingsInputConfig(StrictModel):
    path: str = Field(
        description="The embed job's output folder or URI: embeddings/*.parquet and embedding.json."
    )


class BuildIndexConfig(JobConfig):
    input: EmbeddingsInputConfig
    output: OutputConfig
    index: IndexConfig = Field(default_factory=IndexConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)


# ---------------------------------------------------------------------------------------------
# Planning: resolve auto settings against the embeddings and fail early on impossible ones


@dataclass(frozen=True)
class IndexPlan:
    type: str
    metric: Literal["inner_product", "l2"]
    factory: str  # an index_factory string for the whole index
    nlist: int | None = None
    pq_m: int | None = None
    train_vectors: int = 0  # 0: the index needs no training
    ef_construction: int | None = None
    search_params: dict[str, float] | None = None

    @property
    def needs_training(self) -> bool:
        return self.train_vectors > 0


def auto_nlist(vectors: int, train_vectors: int) -> int:
    return max(1, min(round(4 * math.sqrt(vectors)), train_vectors // MIN_POINTS_PER_CENTROID))


def auto_pq_m(dimension: int) -> int:
    limit = max(1, min(dimension // 8, MAX_GPU_PQ_M))
    return max(m for m in range(1, limit + 1) if dimension % m == 0)


def plan_index(
    spec: IndexConfig,
    *,
    dimension: int,
    normalized: bool,
    vectors: int,
    train_sample: int,
    source: str = "the embeddings",
) -> IndexPlan:
    """The index that `spec` means for `vectors` vectors of `dimension`; IndexConfigError names
    every key that cannot work (the keys as they appear in BuildIndexConfig)."""
    metric = spec.metric
    if metric == "auto":
        metric = "inner_product" if normalized else "l2"
    if spec.type == "flat":
        return IndexPlan("flat", metric, "Flat")
    if spec.type == "hnsw":
        h = spec.hnsw
        return IndexPlan(
            "hnsw",
            metric,
            f"HNSW{h.m},Flat",
            ef_construction=h.ef_construction,
            search_params={"ef_search": h.ef_search},
        )

    problems: list[str] = []
    train = min(train_sample, vectors)
    pq_m = spec.pq.m if spec.pq.m is not None else auto_pq_m(dimension)
    if dimension % pq_m:
        divisors = [m for m in range(1, min(dimension, 128) + 1) if dimension % m == 0]
        problems.append(
            f"index.pq.m: {pq_m} does not divide the dimension {dimension}; "
            f"divisors: {', '.join(map(str, divisors))}"
        )
    nlist = spec.ivf.nlist if spec.ivf.nlist is not None else auto_nlist(vectors, train)
    if nlist > train:
        problems.append(
            f"index.ivf.nlist: {nlist} lists need at least {nlist:,} training vectors "
            f"({MIN_POINTS_PER_CENTROID * nlist:,} recommended), and there are {train:,} "
            f"(build.train_sample={train_sample:,}, {vectors:,} vectors); lower it or set null"
        )
    elif nlist * MIN_POINTS_PER_CENTROID > train:
        log.warning(
            "index.ivf.nlist=%d: %d training vectors are fewer than the %d per list FAISS asks for",
            nlist,
            train,
            MIN_POINTS_PER_CENTROID,
        )
    if 2**spec.pq.nbits > train:
        problems.append(
            f"index.pq.nbits: {spec.pq.nbits} bits need at least {2**spec.pq.nbits:,} training "
            f"vectors, and there are {train:,} (build.train_sample={train_sample:,}, "
            f"{vectors:,} vectors); lower it, or use index.type=hnsw or flat"
        )
    if problems:
        raise IndexConfigError(
            f"invalid config for {source} ({vectors:,} vectors of dimension {dimension}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    # `np`: no polysemous training, which only serves Hamming-thresholded search (unused here)
    # and takes most of the training time.
    factory = f"IVF{nlist},PQ{pq_m}x{spec.pq.nbits}np"
    params: dict[str, float] = {"nprobe": min(spec.ivf.nprobe, nlist)}
    if spec.refine.type != "none":
        factory += ",Refine(SQ8)" if spec.refine.type == "sq8" else ",Refine(Flat)"
        params["k_factor"] = spec.refine.k_factor
    return IndexPlan("ivf_pq", metric, factory, nlist, pq_m, train, search_params=params)


# ---------------------------------------------------------------------------------------------
# Building: train on a sample, add in batches, on a GPU when there is one


def _faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "inner_product" else faiss.METRIC_L2


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_search_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Apply query-time knobs (ef_search, nprobe, k_factor). FAISS does not store efSearch in
    the index file, so VectorIndex.load applies the ones in index.json."""
    import faiss

    for name, value in params.items():
        if name == "ef_search":
            faiss.downcast_index(index).hnsw.efSearch = int(value)
        elif name == "nprobe":
            faiss.extract_index_ivf(index).nprobe = int(value)
        elif name == "k_factor":
            faiss.downcast_index(index).k_factor = float(value)
        else:
            raise ValueError(f"unknown search parameter {name!r}")


class IndexBuilder:
    """An empty index for `plan`: `train(sample)` when plan.needs_training, `add(batch)` any
    number of times, then `finish()` for the CPU index with its search parameters set.

    IVF-PQ with refinement is built as its two parts (the IVF-PQ index and the refine codes), both
    fed the same batches and joined in `finish`, so that on a GPU only the IVF-PQ part moves there
    (faiss index_cpu_to_gpu; FAISS has no GPU version of IndexRefine).
    """

    def __init__(self, plan: IndexPlan, dimension: int, *, seed: int = 0, gpu: bool = False):
        import faiss

        self.plan, self.dimension = plan, dimension
        metric = _faiss_metric(plan.metric)
        self.refine = None
        self.gpu_resources = None
        if plan.type == "ivf_pq":
            base_factory, _, refine = plan.factory.partition(",Refine(")
            self.index = faiss.index_factory(dimension, base_factory, metric)
            ivf = faiss.downcast_index(self.index)
            ivf.cp.seed = seed
            ivf.pq.cp.seed = seed
            if refine:
                self.refine = faiss.index_factory(dimension, refine.rstrip(")"), metric)
            if gpu:
                self.index = self._to_gpu(self.index)
        else:
            self.index = faiss.index_factory(dimension, plan.factory, metric)
            if plan.type == "hnsw":
                self.index.hnsw.efConstruction = plan.ef_construction
        self.on_gpu = self.gpu_resources is not None

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        """UNVERIFIED (the build machine has no GPU): faiss-gpu's documented clone, or the CPU
        index with a warning when the GPU IVF-PQ does not take these settings (it needs
        pq.nbits <= 8 and a supported code size)."""
        import faiss

        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # codes of 56 bytes and more need fp16 lookup tables on GPU
        try:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
        except RuntimeError as exc:
            log.warning("%s stays on the CPU: faiss-gpu refused it (%s)", self.plan.factory, exc)
            return index
        self.gpu_resources = resources  # must outlive the GPU index
        log.info("training and filling %s on GPU 0", self.plan.factory)
        return gpu_index

    def train(self, sample: np.ndarray) -> None:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        self.index.train(sample)
        if self.refine is not None:
            self.refine.train(sample)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index.add(vectors)
        if self.refine is not None:
            self.refine.add(vectors)

    def finish(self) -> faiss.Index:
        import faiss

        index = self.index
        if self.on_gpu:
            index = faiss.index_gpu_to_cpu(index)
        if self.refine is not None:
            index = faiss.IndexRefine(index, self.refine)
        set_search_params(index, self.plan.search_params or {})
        return index


def build_index(
    vectors: np.ndarray,
    spec: IndexConfig | None = None,
    *,
    normalized: bool = True,
    train_sample: int = BuildConfig().train_sample,
    seed: int = 0,
    batch_size: int = 65_536,
    gpu: bool | None = None,
) -> tuple[faiss.Index, IndexPlan]:
    """Build the index `spec` describes from an in-memory (n, dim) matrix: the same plan, sample
    and batches as the job, without Ray or files. `gpu=None`: use one when FAISS sees one."""
    spec = spec or IndexConfig()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dimension = vectors.shape
    plan = plan_index(
        spec, dimension=dimension, normalized=normalized, vectors=n, train_sample=train_sample
    )
    use_gpu = plan.type == "ivf_pq" and (gpu_available() if gpu is None else gpu)
    builder = IndexBuilder(plan, dimension, seed=seed, gpu=use_gpu)
    if plan.needs_training:
        rows = np.sort(np.random.default_rng(seed).choice(n, plan.train_vectors, replace=False))
        builder.train(vectors[rows])
    for start in range(0, n, batch_size):
        builder.add(vectors[start : start + batch_size])
    return builder.finish(), plan


# ---------------------------------------------------------------------------------------------
# Per-batch checks (plain functions; the job calls them on each batch it reads)


def embedding_rows(batch: pa.RecordBatch | pa.Table, dimension: int) -> tuple[np.ndarray, list]:
    """(vectors, reasons): an (n, dimension) float32 matrix of the batch's `embedding` column and,
    per row, None or why the row cannot be indexed (null, wrong length, NaN or infinite values).
    Rows with a reason hold zeros. Takes fixed-size and variable-size list columns of any float."""
    column = batch.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and not (
        pa.types.is_fixed_size_list(column.type)
    ):
        raise ValueError(f"column `embedding` is {column.type}, not a list of floats")
    n = len(column)
    null = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(n, column.type.list_size)
    else:
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    reasons: list[str | None] = [None] * n
    vectors = np.zeros((n, dimension), np.float32)
    good = ~null & (lengths == dimension)
    for i in np.flatnonzero(~good):
        reasons[i] = NULL_EMBEDDING if null[i] else WRONG_DIMENSION
    if good.any():
        rows = np.flatnonzero(good)
        values = column.filter(pa.array(good)).flatten()  # null values inside a list become NaN
        matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors[rows] = matrix.reshape(len(rows), dimension)
        for i in rows[~np.isfinite(vectors[rows]).all(axis=1)]:
            reasons[i] = NON_FINITE
            vectors[i] = 0.0
    return vectors, reasons


class ChunkIdCheck:
    """Rejects rows without a chunk id, and every row whose chunk id an earlier good row had: the
    first good row of each id is indexed. Holds the set of ids seen (about 100 bytes each)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, chunk_ids: list[str | None], reasons: list[str | None]) -> None:
        for i, cid in enumerate(chunk_ids):
            if reasons[i] is not None:
                continue
            if not cid:
                reasons[i] = MISSING_CHUNK_ID
            elif cid in self.seen:
                reasons[i] = DUPLICATE_CHUNK_ID
            else:
                self.seen.add(cid)


class TrainingSample:
    """A uniform random sample of at most `size` vectors from a stream of batches: each vector
    draws a random key and the `size` smallest keys stay. Holds the sample and one batch."""

    def __init__(self, size: int, dimension: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.vectors = np.empty((size, dimension), np.float32)
        self.keys = np.empty(0)
        self.size = size

    def offer(self, vectors: np.ndarray) -> None:
        keys = self.rng.random(len(vectors))
        filled = len(self.keys)
        room = min(self.size - filled, len(vectors))
        if room:
            self.vectors[filled : filled + room] = vectors[:room]
            self.keys = np.concatenate([self.keys, keys[:room]])
            vectors, keys = vectors[room:], keys[room:]
        if len(keys) == 0:
            return
        everything = np.concatenate([self.keys, keys])
        keep = np.argpartition(everything, self.size - 1)[: self.size]
        incoming = keep[keep >= self.size] - self.size
        if len(incoming):
            evicted = np.setdiff1d(np.arange(self.size), keep[keep < self.size])
            self.vectors[evicted] = vectors[incoming]
            self.keys[evicted] = keys[incoming]

    def take(self) -> np.ndarray:
        return self.vectors[: len(self.keys)]


# ---------------------------------------------------------------------------------------------
# Files: index.faiss, ids.parquet and index.json on any filesystem pyarrow knows


class IndexInfo(BaseModel):
    """index.json: what the index holds and how it was built. The query side checks `embedding`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    embedding: EmbeddingInfo
    index_type: Literal["flat", "hnsw", "ivf_pq"]
    factory: str = Field(description="faiss.index_factory string of the whole index.")
    metric: Literal["inner_product", "l2"]
    vectors: int = Field(ge=0)
    search_params: dict[str, float] = Field(default_factory=dict)
    train_vectors: int = 0
    built_on: Literal["cpu", "gpu"] = "cpu"
    faiss_version: str
    fingerprint: str | None = Field(default=None, description="Config fingerprint of the job run.")

    @property
    def model(self) -> str:
        return self.embedding.model

    @property
    def dimension(self) -> int:
        return self.embedding.dimension

    @classmethod
    def describe(
        cls,
        plan: IndexPlan,
        embedding: EmbeddingInfo,
        vectors: int,
        *,
        on_gpu: bool = False,
        fingerprint: str | None = None,
    ) -> IndexInfo:
        import faiss

        return cls(
            embedding=embedding,
            index_type=plan.type,
            factory=plan.factory,
            metric=plan.metric,
            vectors=vectors,
            search_params=plan.search_params or {},
            train_vectors=plan.train_vectors,
            built_on="gpu" if on_gpu else "cpu",
            faiss_version=faiss.__version__,
            fingerprint=fingerprint,
        )


def write_faiss_index(index: faiss.Index, fs: pafs.FileSystem, path: str) -> None:
    """faiss.write_index to any filesystem: remote paths go through a local temporary file."""
    import faiss

    if isinstance(fs, pafs.LocalFileSystem):
        faiss.write_index(index, path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, local)
        pafs.copy_files(local, path, pafs.LocalFileSystem(), fs)


def read_faiss_index(fs: pafs.FileSystem, path: str) -> faiss.Index:
    import faiss

    if isinstance(fs, pafs.LocalFileSystem):
        return faiss.read_index(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        pafs.copy_files(path, local, fs, pafs.LocalFileSystem())
        return faiss.read_index(local)


def _write_json(fs: pafs.FileSystem, path: str, model: BaseModel) -> None:
    with fs.open_output_stream(path) as f:
        f.write(model.model_dump_json(indent=2).encode())


# ---------------------------------------------------------------------------------------------
# Query side


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # inner product (higher is closer) or squared L2 distance (lower is closer)
    doc_id: str
    chunk_id: str
    text: str
    start: int
    end: int
    row: int  # the vector's id in the index and its row in ids.parquet
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Neighbours:
    """(n_queries, k) arrays from VectorIndex.search. ids are rows of ids.parquet; -1 (with the
    worst possible score) where the index found fewer than k vectors."""

    scores: np.ndarray
    ids: np.ndarray


class VectorIndex:
    """A FAISS index, the rows it points to, and the model its vectors came from."""

    def __init__(self, index: faiss.Index, info: IndexInfo, ids: pa.Table, source: str = ""):
        if index.d != info.dimension or index.ntotal != info.vectors or len(ids) != index.ntotal:
            raise ValueError(
                f"index {source or '(in memory)'} is inconsistent: index.faiss holds "
                f"{index.ntotal} vectors of dimension {index.d}, index.json says {info.vectors} "
                f"of dimension {info.dimension}, ids.parquet has {len(ids)} rows"
            )
        self.index, self.info, self.ids, self.source = index, info, ids, source
        self._encoders: dict[tuple[str, str], Any] = {}

    @classmethod
    def load(cls, path: str) -> VectorIndex:
        """Load an index folder (local or a URI) written by the build job or `save`."""
        fs, root = resolve_filesystem(str(path))
        info_path = posixpath.join(root, INFO_FILE)
        if fs.get_file_info(info_path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{path} is not an index folder: it has no {INFO_FILE}")
        with fs.open_input_stream(info_path) as f:
            info = IndexInfo.model_validate(json.loads(f.read().decode()))
        index = read_faiss_index(fs, posixpath.join(root, INDEX_FILE))
        set_search_params(index, info.search_params)
        ids = pq.read_table(posixpath.join(root, IDS_FILE), filesystem=fs, schema=IDS_SCHEMA)
        return cls(index, info, ids, source=str(path))

    def save(self, path: str) -> None:
        fs, root = resolve_filesystem(str(path))
        fs.create_dir(root, recursive=True)
        write_faiss_index(self.index, fs, posixpath.join(root, INDEX_FILE))
        pq.write_table(self.ids, posixpath.join(root, IDS_FILE), filesystem=fs)
        _write_json(fs, posixpath.join(root, INFO_FILE), self.info)  # last: marks the folder done

    @property
    def model(self) -> str:
        return self.info.model

    @property
    def dimension(self) -> int:
        return self.info.dimension

    def __len__(self) -> int:
        return self.index.ntotal

    def check_query_model(self, model_name: str, dimension: int | None = None) -> None:
        """Raise IndexMismatchError unless queries from `model_name` (of `dimension`, when known)
        are comparable with this index's vectors."""
        if model_name != self.model:
            raise IndexMismatchError(
                f"index {self.source or '(in memory)'} was built from {self.model!r} embeddings "
                f"({self.dimension}-d); queries embedded with {model_name!r}"
                f"{f' ({dimension}-d)' if dimension else ''} live in another vector space. Query "
                f"with {self.model!r}, or rebuild the index from {model_name!r} embeddings."
            )
        if dimension is not None and dimension != self.dimension:
            raise IndexMismatchError(
                f"index {self.source or '(in memory)'} holds {self.dimension}-d vectors from "
                f"{self.model!r}, but the query vectors are {dimension}-d: the model behind that "
                "name has changed since the index was built. Rebuild the index."
            )

    def search(self, vectors: np.ndarray, k: int) -> Neighbours:
        """The k nearest vectors of each query row (queries must come from the index's model)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dimension:
            raise IndexMismatchError(
                f"query vectors are {vectors.shape[1]}-d; index {self.source or '(in memory)'} "
                f"holds {self.dimension}-d vectors from {self.model!r}"
            )
        scores, ids = self.index.search(vectors, k)
        return Neighbours(scores, ids)

    def hits(self, neighbours: Neighbours) -> list[list[Hit]]:
        """The rows behind each query's neighbours, best first, without the -1 padding."""
        out: list[list[Hit]] = []
        for scores, ids in zip(neighbours.scores, neighbours.ids, strict=True):
            found = ids >= 0
            rows = self.ids.take(pa.array(ids[found])).to_pylist()
            out.append(
                [
                    Hit(rank=r + 1, score=float(s), row=int(i), **row)
                    for r, (s, i, row) in enumerate(
                        zip(scores[found], ids[found], rows, strict=True)
                    )
                ]
            )
        return out

    def encoder(self, model: str | None = None, device: str = "cpu"):
        """The sentence-transformers model for queries (loaded once), after checking it matches."""
        name = model or self.model
        self.check_query_model(name)  # a different model fails before it is loaded
        if (name, device) not in self._encoders:
            from workloads.embed.models import load_sentence_transformer

            encoder = load_sentence_transformer(name, device=device)
            self.check_query_model(name, encoder.get_embedding_dimension())
            self._encoders[(name, device)] = encoder
        return self._encoders[(name, device)]

    def search_texts(
        self, texts: list[str], k: int, *, model: str | None = None, device: str = "cpu"
    ) -> list[list[Hit]]:
        """Embed `texts` with the index's model (its query prompt, if it has one) and search."""
        encoder = self.encoder(model, device)
        vectors = encoder.encode_query(
            list(texts), normalize_embeddings=self.info.embedding.normalized
        )
        return self.hits(self.search(np.asarray(vectors), k))


# ---------------------------------------------------------------------------------------------
# The job: check and sample, train, add, save; inside one Ray task with the configured resources


def read_embedding_info(input_path: str) -> EmbeddingInfo:
    fs, root = resolve_filesystem(input_path)
    path = posixpath.join(root, EMBEDDING_INFO_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputNotFoundError(
            f"input.path {input_path!r} has no {EMBEDDING_INFO_FILE}: point it at the output "
            "folder of ray_jobs/embed.py"
        )
    return EmbeddingInfo.read(fs, path)


def _batches(fs: pafs.FileSystem, files: list[str], columns: list[str], batch_size: int):
    """(file, first row in file, batch) over `files` in order, one batch in memory at a time."""
    for path in files:
        with fs.open_input_file(path) as f:
            offset = 0
            parquet = pq.ParquetFile(f)
            # Embeddings written before titles existed have no `title`: read it as nulls.
            missing = [c for c in columns if c == "title" and c not in parquet.schema_arrow.names]
            present = [c for c in columns if c not in missing]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                for name in missing:
                    batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
                yield path, offset, batch
                offset += batch.num_rows


def build_index_files(
    cfg: BuildIndexConfig, embedding: EmbeddingInfo, files: list[str], plan: IndexPlan
) -> dict[str, Any]:
    """Write index.faiss, ids.parquet, rejects/ and (last) index.json to cfg.output.path. Runs in
    a Ray task; returns what the manifest reports."""
    import faiss

    faiss.omp_set_num_threads(max(1, int(cfg.build.num_cpus)))
    in_fs, _ = resolve_filesystem(cfg.input.path)
    out_fs, root = resolve_filesystem(cfg.output.path)
    dim, batch_size = embedding.dimension, cfg.build.add_batch_size
    seconds: dict[str, float] = {}

    # Pass 1: check every row, write the rejects, draw the training sample.
    start = time.perf_counter()
    out_fs.create_dir(posixpath.join(root, REJECTS), recursive=True)
    rejects_path = posixpath.join(root, REJECTS, "part-00000.parquet")
    check_ids = ChunkIdCheck()
    sample = (
        TrainingSample(min(cfg.build.train_sample, plan.train_vectors), dim, cfg.build.seed)
        if plan.needs_training
        else None
    )
    masks: list[np.ndarray] = []  # one bool per row: pass 2 adds exactly the rows pass 1 kept
    with pq.ParquetWriter(out_fs.open_output_stream(rejects_path), REJECTS_SCHEMA) as rejects:
        for path, offset, batch in _batches(
            in_fs, files, ["doc_id", "chunk_id", "embedding"], batch_size
        ):
            vectors, reasons = embedding_rows(batch, dim)
            check_ids(batch.column("chunk_id").to_pylist(), reasons)
            good = np.array([r is None for r in reasons], dtype=bool)
            masks.append(good)
            if sample is not None and good.any():
                sample.offer(vectors[good])
            if not good.all():
                bad = np.flatnonzero(~good)
                rejects.write_table(
                    pa.table(
                        {
                            "doc_id": batch.column("doc_id").take(pa.array(bad)),
                            "chunk_id": batch.column("chunk_id").take(pa.array(bad)),
                            "file": pa.array([path] * len(bad), pa.string()),
                            "row": pa.array(offset + bad, pa.int64()),
                            "reject_reason": pa.array([reasons[i] for i in bad], pa.string()),
                        },
                        schema=REJECTS_SCHEMA,
                    )
                )
    kept = int(sum(int(m.sum()) for m in masks))
    seconds["check_and_sample"] = time.perf_counter() - start
    log.info("checked %d rows in %d files: %d to index", sum(map(len, masks)), len(files), kept)
    if kept == 0:
        raise JobFailed(f"no indexable vectors in {cfg.input.path}: see {rejects_path}")
    if plan.needs_training:  # the plan assumed every row is good; recheck with the real count
        plan = plan_index(
            cfg.index,
            dimension=dim,
            normalized=embedding.normalized,
            vectors=kept,
            train_sample=cfg.build.train_sample,
            source=cfg.input.path,
        )

    builder = IndexBuilder(
        plan, dim, seed=cfg.build.seed, gpu=plan.type == "ivf_pq" and gpu_available()
    )
    if sample is not None:
        start = time.perf_counter()
        builder.train(sample.take())
        del sample
        seconds["train"] = time.perf_counter() - start
        log.info(
            "trained %s on %d vectors in %.1f s", plan.factory, plan.train_vectors, seconds["train"]
        )

    # Pass 2: add the good rows in file order; row i of ids.parquet is vector i of the index.
    start = time.perf_counter()
    columns = [*IDS_SCHEMA.names, "embedding"]
    with pq.ParquetWriter(
        out_fs.open_output_stream(posixpath.join(root, IDS_FILE)), IDS_SCHEMA
    ) as ids:
        for (_, _, batch), good in zip(
            _batches(in_fs, files, columns, batch_size), masks, strict=True
        ):
            if not good.any():
                continue
            batch = batch.filter(pa.array(good))
            builder.add(embedding_rows(batch, dim)[0])
            ids.write_table(
                pa.Table.from_batches([batch.select(IDS_SCHEMA.names)]).cast(IDS_SCHEMA)
            )
    seconds["add"] = time.perf_counter() - start

    start = time.perf_counter()
    index = builder.finish()
    write_faiss_index(index, out_fs, posixpath.join(root, INDEX_FILE))
    info = IndexInfo.describe(
        plan, embedding, index.ntotal, on_gpu=builder.on_gpu, fingerprint=cfg.fingerprint()
    )
    _write_json(out_fs, posixpath.join(root, INFO_FILE), info)  # last: marks the build done
    seconds["save"] = time.perf_counter() - start
    return {
        "seconds": seconds,
        "index_bytes": out_fs.get_file_info(posixpath.join(root, INDEX_FILE)).size,
    }


def _check_resources_fit(cfg: BuildIndexConfig) -> None:
    """On a local Ray that the job started, a task asking for more than the machine has would wait
    for ever: fail instead, naming the key."""
    import ray

    from workloads.common.ray_runtime import on_fixed_size_ray

    if not on_fixed_size_ray(cfg.ray):
        return
    have = ray.cluster_resources()
    for key, want, resource in (
        ("build.num_cpus", cfg.build.num_cpus, "CPU"),
        ("build.num_gpus", cfg.build.num_gpus, "GPU"),
    ):
        if want > have.get(resource, 0):
            raise IndexConfigError(
                f"{key}={want:g}, but this local Ray has {have.get(resource, 0):g} {resource}s"
            )


def run(cfg: BuildIndexConfig) -> JobManifest:
    in_fs, files = expand_input_paths(posixpath.join(cfg.input.path, "embeddings"), (".parquet",))
    embedding = read_embedding_info(cfg.input.path)
    read = sum(pq.ParquetFile(f, filesystem=in_fs).metadata.num_rows for f in files)
    # Fail on impossible settings before Ray starts (the task rechecks with the rows it keeps).
    plan = plan_index(
        cfg.index,
        dimension=embedding.dimension,
        normalized=embedding.normalized,
        vectors=read,
        train_sample=cfg.build.train_sample,
        source=cfg.input.path,
    )
    manifest = JobManifest("build_index", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    done = out.read_json(out.path(INFO_FILE))
    resumed = (
        cfg.output.mode == "resume"
        and done is not None
        and done.get("fingerprint") == cfg.fingerprint()
    )
    if resumed:
        manifest.stages.append(StageTiming("build", 0.0, resumed=True))
        index_bytes = out.fs.get_file_info(out.path(INDEX_FILE)).size
    else:
        import ray

        _init_ray(cfg)
        if out.fs.get_file_info(out.path(INFO_FILE)).type == pafs.FileType.File:
            out.fs.delete_file(out.path(INFO_FILE))  # a failed rebuild must not look finished
        out.clear(REJECTS)
        task = ray.remote(build_index_files).options(
            num_cpus=cfg.build.num_cpus, num_gpus=cfg.build.num_gpus
        )
        with manifest.stage("build"):
            result = ray.get(task.remote(cfg, embedding, files, plan))
        manifest.stages.extend(StageTiming(f"build/{k}", v) for k, v in result["seconds"].items())
        index_bytes = result["index_bytes"]
        done = out.read_json(out.path(INFO_FILE))
    info = IndexInfo.model_validate(done)

    # Counts from what was written: vectors in the index, rows in ids.parquet and in rejects/.
    manifest.read = read
    manifest.kept = info.vectors
    id_rows = pq.ParquetFile(out.path(IDS_FILE), filesystem=out.fs).metadata.num_rows
    if id_rows != info.vectors:
        raise JobFailed(f"{out.path(IDS_FILE)} has {id_rows} rows for {info.vectors} vectors")
    reasons = pq.read_table(out.path(REJECTS), filesystem=out.fs, columns=["reject_reason"])
    manifest.rejected = dict(Counter(reasons.column("reject_reason").to_pylist()))
    manifest.outputs = {name: out.path(name) for name in (INDEX_FILE, IDS_FILE, INFO_FILE, REJECTS)}
    manifest.extra = {
        "factory": info.factory,
        "metric": info.metric,
        "model": info.model,
        "train_vectors": info.train_vectors,
        "built_on": info.built_on,
        "index_bytes": index_bytes,
        "input_files": len(files),
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)


def _init_ray(cfg: BuildIndexConfig) -> None:
    from workloads.common.ray_runtime import init_ray

    init_ray(cfg.ray)
    _check_resources_fit(cfg)
