"""Exact deduplication on Ray Data: one document per hash of normalised text.

    python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml
    python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml \
        input.path=s3://bucket/corpus/ output.path=s3://bucket/dedup/ normalize.lowercase=true

Stages (each a Parquet folder under output.path; a rerun resumes at the first missing one):
  _stages/ingest       every record read, parsed and hashed (bad ones carry `reject_reason`)
  rejects/             the bad records with their reason and raw text
  _stages/hash_groups  one row per distinct hash: (text_hash, keeper = lowest id, size)
  removed/             (id, duplicate_of) for every document that is not its group's keeper
  kept/                the kept documents (id, text, meta, source, line)

Only (id, text_hash) pairs are shuffled to find duplicates; the full text is shuffled once, in the
join that writes kept/, against the much smaller table of duplicate groups.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from workloads.common.config import DataJobConfig, InputConfig
from workloads.common.documents import DOCUMENT_SCHEMA, list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout, where
from workloads.data.dedup.normalize import NormalizeConfig, normalize_text

log = logging.getLogger(__name__)

EXACT_DUPLICATE = "exact_duplicate"
KEPT_COLUMNS = ["id", "text", "meta", "source", "line"]
# Ingest files of 64 MB (in memory) at least: every later stage reads them, one task per file.
INGEST_FILE_BYTES = 64 << 20
INGEST_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("text_hash", pa.string()))
REJECTS_SCHEMA = pa.schema(
    [DOCUMENT_SCHEMA.field(c) for c in ("id", "source", "line", "reject_reason", "raw")]
)
HASH_GROUPS_SCHEMA = pa.schema(
    [("text_hash", pa.string()), ("keeper", pa.string()), ("size", pa.int64())]
)
REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("duplicate_of", pa.string())])
KEPT_SCHEMA = pa.schema([DOCUMENT_SCHEMA.field(c) for c in KEPT_COLUMNS])


class DuplicateIdsError(JobFailed):
    """Two documents with the same text share an id, so 'keep the lowest id' cannot pick one."""


class ExactDedupConfig(DataJobConfig):
    normalize: NormalizeConfig = Field(
        default_factory=NormalizeConfig, description="What counts as the same text before hashing."
    )
    num_partitions: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="Hash partitions for the group-by and joins. On a cluster, about 4 per GB of (id, hash) "
        "pairs and at least the number of CPUs.",
    )


# ---------------------------------------------------------------------------------------------
# Per-batch logic (plain functions; map_batches calls them, unit tests call them directly)


def text_hash(text: str, normalize: NormalizeConfig) -> str:
    """128-bit BLAKE2b of the normalised text, hex. 128 bits: no collision in any real corpus."""
    return hashlib.blake2b(
        normalize_text(text, normalize).encode("utf-8"), digest_size=16
    ).hexdigest()


def add_text_hash(batch: pa.Table, *, normalize: NormalizeConfig) -> pa.Table:
    """Append `text_hash` (null for rejected rows, whose text is null)."""
    hashes = [
        None if t is None else text_hash(t, normalize) for t in batch.column("text").to_pylist()
    ]
    return batch.append_column("text_hash", pa.array(hashes, pa.string()))


def not_keeper(batch: pa.Table) -> pa.Table:
    """Rows of (id, text_hash, keeper) whose id is not the keeper -> (id, duplicate_of)."""
    removed = batch.filter(pc.not_equal(batch["id"], batch["keeper"]))
    return pa.table({"id": removed["id"], "duplicate_of": removed["keeper"]})


def keepers_only(batch: pa.Table) -> pa.Table:
    """Rows of documents left-joined with duplicate groups: keep singletons and each group's keeper."""
    keep = pc.or_kleene(pc.is_null(batch["keeper"]), pc.equal(batch["id"], batch["keeper"]))
    return batch.filter(pc.fill_null(keep, True)).select(KEPT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Stages, shared with the MinHash job (which runs exact dedup first)


def reason_counts(batch: pa.Table, *, columns: tuple[str, ...]) -> pa.Table:
    """(column, reason, rows) for the non-null values of each of `columns` in a batch: summed on
    the driver (`tally_reasons`), so counting needs no shuffle."""
    cols: dict[str, list] = {"column": [], "reason": [], "rows": []}
    for column in columns:
        for c in pc.value_counts(batch[column].drop_null()) if batch.num_rows else []:
            cols["column"].append(column)
            cols["reason"].append(c["values"].as_py())
            cols["rows"].append(c["counts"].as_py())
    return pa.table(
        cols,
        schema=pa.schema([("column", pa.string()), ("reason", pa.string()), ("rows", pa.int64())]),
    )


def tally_reasons(ds, columns: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{column: {reason: rows}} over a Dataset holding `columns`, in one pass."""
    total: dict[str, dict[str, int]] = {c: {} for c in columns}
    counted = ds.map_batches(reason_counts, batch_format="pyarrow", fn_kwargs={"columns": columns})
    for r in counted.take_all():  # a row per (batch, column, reason)
        by = total[r["column"]]
        by[r["reason"]] = by.get(r["reason"], 0) + r["rows"]
    return total


def ingest_stages(
    out: OutputLayout,
    manifest: JobManifest,
    input_cfg: InputConfig,
    files,
    normalize: NormalizeConfig,
    *,
    extra: tuple[Callable[..., pa.Table], dict[str, Any]] | None = None,
    schema: pa.Schema = INGEST_SCHEMA,
) -> tuple[int, dict[str, int]]:
    """`_stages/ingest` (every record, parsed and hashed) and `rejects/`. Returns (read, rejected by
    reason). `extra` = (fn, kwargs) adds the caller's per-document columns in the same pass over
    the text (the MinHash job's signatures); `schema` is then the ingest schema with them."""

    def ingest(folder: str) -> dict:
        ds = read_documents(input_cfg, files, task_per_file=True).map_batches(
            add_text_hash, batch_format="pyarrow", fn_kwargs={"normalize": normalize}
        )
        if extra is not None:
            ds = ds.map_batches(extra[0], batch_format="pyarrow", fn_kwargs=extra[1])
        out.write_dataset(ds, folder, schema, min_bytes_per_file=INGEST_FILE_BYTES)
        return {"rows": out.count_rows("_stages/ingest")}

    def rejects(folder: str) -> dict:
        bad = where(
            out.read_dataset("_stages/ingest", REJECTS_SCHEMA.names),
            lambda b: pc.is_valid(b["reject_reason"]),
        )
        out.write_dataset(bad, folder, REJECTS_SCHEMA)
        by_reason: dict[str, int] = {}
        if out.count_rows("rejects"):
            reasons = out.read_dataset("rejects", ["reject_reason"])
            by_reason = tally_reasons(reasons, ("reject_reason",))["reject_reason"]
        return {"by_reason": by_reason}

    read_rows = out.run_stage("_stages/ingest", ingest, manifest).info["rows"]
    rejected = out.run_stage("rejects", rejects, manifest).info["by_reason"]
    return read_rows, rejected


def valid_documents(out: OutputLayout, columns: list[str]):
    """The ingested documents that were not rejected, as a Ray Dataset of `columns`."""
    return where(
        out.read_dataset("_stages/ingest", [*columns, "reject_reason"]),
        lambda b: pc.is_null(b["reject_reason"]),
    ).select_columns(columns)


@dataclass
class ExactResult:
    distinct_texts: int
    removed: int
    kept: int


def exact_stages(
    out: OutputLayout,
    manifest: JobManifest,
    num_partitions: int,
    id_field: str | None,
    *,
    removed_name: str = "removed",
    kept_name: str = "kept",
) -> ExactResult:
    """`_stages/hash_groups`, then (id, duplicate_of) in `removed_name` and the kept documents in
    `kept_name`. Needs `ingest_stages` first."""
    from ray.data.aggregate import Count, Min

    def hash_groups(folder: str) -> dict:
        groups = (
            valid_documents(out, ["id", "text_hash"])
            .groupby("text_hash", num_partitions=num_partitions)
            .aggregate(Min("id", alias_name="keeper"), Count(alias_name="size"))
        )
        out.write_dataset(groups, folder, HASH_GROUPS_SCHEMA)
        return {"groups": out.count_rows("_stages/hash_groups")}

    def duplicate_groups():
        return where(
            out.read_dataset("_stages/hash_groups", ["text_hash", "keeper", "size"]),
            lambda b: pc.greater(b["size"], 1),
        ).select_columns(["text_hash", "keeper"])

    def removed(folder: str) -> dict:
        pairs = valid_documents(out, ["id", "text_hash"]).join(
            duplicate_groups(), join_type="inner", num_partitions=num_partitions, on=("text_hash",)
        )
        out.write_dataset(
            pairs.map_batches(not_keeper, batch_format="pyarrow"), folder, REMOVED_SCHEMA
        )
        return {"rows": out.count_rows(removed_name)}

    def kept(folder: str) -> dict:
        joined = valid_documents(out, [*KEPT_COLUMNS, "text_hash"]).join(
            duplicate_groups(),
            join_type="left_outer",
            num_partitions=num_partitions,
            on=("text_hash",),
        )
        out.write_dataset(
            joined.map_batches(keepers_only, batch_format="pyarrow"), folder, KEPT_SCHEMA
        )
        return {"rows": out.count_rows(kept_name)}

    groups = out.run_stage("_stages/hash_groups", hash_groups, manifest).info["groups"]
    n_removed = out.run_stage(removed_name, removed, manifest).info["rows"]
    n_kept = out.run_stage(kept_name, kept, manifest).info["rows"]
    if n_kept != groups:
        raise DuplicateIdsError(
            f"kept {n_kept} documents for {groups} distinct texts: {n_kept - groups} documents share both "
            f"their text and their id ({id_field!r}) with another. Ids must be unique; set "
            "input.id_field=null to use <file>:<line> ids."
        )
    return ExactResult(distinct_texts=groups, removed=n_removed, kept=n_kept)


# ---------------------------------------------------------------------------------------------
# The job


def run(cfg: ExactDedupConfig) -> JobManifest:
    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    manifest = JobManifest("dedup_exact", cfg)
    out = OutputLayout(
        cfg.output.path,
        cfg.fingerprint(),
        overwrite=cfg.output.mode == "overwrite",
        task_footer_reads=True,
    )
    init_ray(cfg.ray)

    manifest.read, manifest.rejected = ingest_stages(out, manifest, cfg.input, files, cfg.normalize)
    result = exact_stages(out, manifest, cfg.num_partitions, cfg.input.id_field)
    manifest.kept = result.kept
    manifest.dropped = {EXACT_DUPLICATE: result.removed} if result.removed else {}
    manifest.outputs = {name: out.path(name) for name in ("kept", "removed", "rejects")}
    manifest.extra = {"distinct_texts": result.distinct_texts, "input_files": len(files[1])}
    return finish_job(manifest, out, cfg.output.keep_intermediate)
