"""Curation as one Ray Data job: an ordered list of typed steps read from YAML.

    python ray_jobs/curate.py --config ray_jobs/configs/curate/default.yaml
    python ray_jobs/curate.py --config ray_jobs/configs/curate/default.yaml \
        input.path=s3://bucket/raw/ output.path=s3://bucket/curated/ drops.sample_fraction=0.01

Per-document steps (Gopher quality and repetition, C4, FineWeb, language, toxicity, PII) stream
through `map_batches`: consecutive ones fuse into one batch function that tokenises each document
once, and a Hugging Face classifier step runs as its own actor-pool stage. Each row carries a
`drop_reason` (`<step>:<reason>`); once set, later steps pass the row through untouched. Dedup steps
(`exact_dedup`, `minhash_dedup`) are barriers: they run the dedup job's stages on the documents still
alive at that point, and mark the duplicates they remove.

The first segment reads the input files itself, so malformed records (with `reject_reason`) travel
in the same rows and the text is written once per segment. Counts come from one pass over the
reason columns, summed on the driver: no shuffle.

Output (the foundation's layout; a rerun resumes at the first unfinished stage):
  kept/           surviving documents: id, text, meta, source, line, plus annotation columns
  drops/          dropped documents with `drop_reason` (all, or a deterministic sample)
  rejects/        malformed input records, with `reject_reason` and the raw record
  _manifest.json  read = kept + dropped (by step:reason) + rejected
  _stages/NN-*/   one folder of rows per segment of steps; a dedup segment keeps its input, the
                  dedup job's own output (`dedup/job/`) and the marked rows (`dedup/rows/`)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from workloads.common.config import DataJobConfig, InputConfig, OutputConfig, StrictModel
from workloads.common.documents import DOCUMENT_SCHEMA, list_input_files, read_documents
from workloads.common.manifest import JobManifest, finish_job
from workloads.common.ray_runtime import (
    check_cpus_left_for_tasks,
    init_ray,
    max_actors,
    resolve_device,
)
from workloads.common.storage import OutputLayout
from workloads.data.dedup.exact import KEPT_COLUMNS, REJECTS_SCHEMA, tally_reasons
from workloads.data.dedup.minhash import MinHashConfig, ShingleConfig
from workloads.data.dedup.minhash_lsh import ExactFirstConfig
from workloads.data.dedup.normalize import NormalizeConfig
from workloads.data.filters.heuristics import (
    C4QualityConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    c4_quality,
    fineweb_quality,
    gopher_quality,
    gopher_repetition,
)
from workloads.data.filters.language import LanguageConfig, detect_language, language_reason
from workloads.data.filters.pii import PII_KINDS, PiiConfig, redact
from workloads.data.filters.step import StepConfig
from workloads.data.filters.text import DocView
from workloads.data.filters.toxicity import ToxicityConfig, profanity_scores

# ---------------------------------------------------------------------------------------------
# Config


class PiiStep(PiiConfig, StepConfig):
    """PII as a step. It never drops: `mode: filter` (the default) redacts the text and counts what it
    replaced; `mode: annotate` only counts, leaving the text as it was."""


class ExactDedupStep(StepConfig):
    type: Literal["exact_dedup"] = "exact_dedup"
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    num_partitions: int = Field(default=16, ge=1, description="Partitions per group-by and join.")


class MinHashDedupStep(StepConfig):
    type: Literal["minhash_dedup"] = "minhash_dedup"
    exact: ExactFirstConfig = Field(default_factory=ExactFirstConfig)
    shingle: ShingleConfig = Field(default_factory=ShingleConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    verify: bool = Field(default=True, description="Drop LSH false positives by estimated Jaccard.")
    keep: Literal["lowest_id", "longest"] = Field(default="lowest_id")
    num_partitions: int = Field(default=16, ge=1, description="Partitions per group-by and join.")


Step = Annotated[
    GopherQualityConfig
    | GopherRepetitionConfig
    | C4QualityConfig
    | FineWebQualityConfig
    | LanguageConfig
    | ToxicityConfig
    | PiiStep
    | ExactDedupStep
    | MinHashDedupStep,
    Field(discriminator="type"),
]
FILE_BYTES = 32 << 20  # Parquet files of at least this size (but one) in every folder written
DEDUP_TYPES = ("exact_dedup", "minhash_dedup")


class DropsConfig(StrictModel):
    keep: bool = Field(default=True, description="Write dropped documents to drops/.")
    sample_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Fraction of dropped documents written (chosen by a hash of the id, so "
        "reruns pick the same ones). Counts always cover every drop.",
    )


class FilterActorsConfig(StrictModel):
    concurrency: int | tuple[int, int] = Field(
        default=2,
        description="Actors that run the fused per-document steps: a count, or [min, max] for an "
        "autoscaling pool. Each keeps its tokenizer, language and toxicity models loaded and warm.",
    )
    num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="Logical CPUs reserved per actor. On a small machine, 0.5 lets the read and "
        "write tasks run beside the actors instead of waiting for a free CPU.",
    )


class CurateConfig(DataJobConfig):
    steps: list[Step] = Field(min_length=1, description="Steps, applied in order.")
    max_doc_chars: int = Field(
        default=1_000_000,
        ge=1,
        description="Longer documents are dropped (`input:too_long`) before any step, which bounds "
        "every step's cost per document.",
    )
    drops: DropsConfig = Field(default_factory=DropsConfig)
    filter_actors: FilterActorsConfig = Field(default_factory=FilterActorsConfig)

    @model_validator(mode="after")
    def _check_steps(self) -> CurateConfig:
        names = [s.step_name for s in self.steps]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"steps: names must be unique, {repeated} repeat; give each a distinct `name`"
            )
        for i, s in enumerate(self.steps):
            if s.type in DEDUP_TYPES and s.mode != "filter":
                raise ValueError(f"steps.{i}.mode: a dedup step can only filter")
        return self


# ---------------------------------------------------------------------------------------------
# Per-batch logic (plain functions over pyarrow tables; no Ray)

# Working rows: the reader's rows (rejects included, with their reason and raw text) plus the step
# that dropped the document. A row is live while both reasons are null.
WORK_FIELDS = [*DOCUMENT_SCHEMA, pa.field("drop_reason", pa.string())]
DROP_FIELDS = [
    *(DOCUMENT_SCHEMA.field(c) for c in KEPT_COLUMNS),
    pa.field("drop_reason", pa.string()),
]


def annotation_fields(step) -> list[pa.Field]:
    """Columns a step adds to every row."""
    name = step.step_name
    fields = []
    if step.type == "language":
        fields += [pa.field(name, pa.string()), pa.field(f"{name}_score", pa.float32())]
    elif step.type == "toxicity":
        fields += [pa.field(f"{name}_score", pa.float32())]
    elif step.type == "pii":
        fields += [pa.field(f"{name}_{kind}", pa.int32()) for kind in PII_KINDS]
    if step.mode == "annotate" and step.type != "pii":
        fields.append(pa.field(f"{name}_flag", pa.string()))
    return fields


def rows_schema(steps) -> pa.Schema:
    return pa.schema(WORK_FIELDS + [f for s in steps for f in annotation_fields(s)])


def start_rows(batch: pa.Table, *, max_doc_chars: int) -> pa.Table:
    """Reader rows -> working rows: `drop_reason` is `input:too_long` or null."""
    lengths = pc.fill_null(pc.utf8_length(batch["text"]), 0)
    too_long = pc.greater(lengths, max_doc_chars)
    reason = pc.if_else(too_long, pa.scalar("input:too_long"), pa.scalar(None, pa.string()))
    return batch.select(DOCUMENT_SCHEMA.names).append_column("drop_reason", reason)


_CHECKS: dict[str, Callable] = {
    "gopher_quality": gopher_quality,
    "gopher_repetition": gopher_repetition,
    "fineweb_quality": fineweb_quality,
}


def apply_steps(batch: pa.Table, *, steps: list) -> pa.Table:
    """Run in-process steps over a batch in order, tokenising each live document once."""
    n = batch.num_rows
    texts: list[str | None] = batch["text"].to_pylist()
    reasons: list[str | None] = batch["drop_reason"].to_pylist()
    views: list[DocView | None] = [
        DocView(t) if r is None and t is not None else None
        for t, r in zip(texts, reasons, strict=True)
    ]
    columns: dict[str, list] = {}

    def verdict(i: int, step, reason: str | None) -> None:
        if step.mode == "annotate":
            columns[f"{step.step_name}_flag"][i] = reason
        elif reason is not None:
            reasons[i] = f"{step.step_name}:{reason}"
            views[i] = None

    for step in steps:
        name = step.step_name
        for f in annotation_fields(step):
            columns[f.name] = [None] * n
        live = [i for i in range(n) if views[i] is not None]
        if step.type == "toxicity":
            scores = profanity_scores([views[i].text for i in live], step.max_chars)
            for i, score in zip(live, scores, strict=True):
                columns[f"{name}_score"][i] = float(score)
                verdict(i, step, "toxic" if score >= step.threshold else None)
            continue
        for i in live:
            view = views[i]
            if step.type == "language":
                lang, score = detect_language(view.text, step.max_chars)
                columns[name][i], columns[f"{name}_score"][i] = lang, score
                verdict(i, step, language_reason(lang, score, step))
            elif step.type == "pii":
                text, counts = redact(view.text, step)
                for kind in PII_KINDS:
                    columns[f"{name}_{kind}"][i] = counts.get(kind, 0)
                if step.mode == "filter" and text != view.text:
                    texts[i], views[i] = text, DocView(text)
            elif step.type == "c4_quality":
                reason, text = c4_quality(view, step)
                verdict(i, step, reason)
                if reason is None and text != view.text:
                    texts[i], views[i] = text, DocView(text)
            else:
                verdict(i, step, _CHECKS[step.type](view, step))

    out = batch.set_column(
        batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string())
    )
    out = out.set_column(
        out.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons, pa.string())
    )
    for step in steps:
        for f in annotation_fields(step):
            out = out.append_column(f, pa.array(columns[f.name], f.type))
    return out


def apply_scores(batch: pa.Table, cfg: ToxicityConfig, score: Callable) -> pa.Table:
    """Score live rows with `score(texts) -> np.ndarray`; add `<name>_score`, drop or flag at the threshold."""
    reasons = batch["drop_reason"].to_pylist()
    texts = batch["text"].to_pylist()
    live = [i for i, r in enumerate(reasons) if r is None and texts[i] is not None]
    values: list[float | None] = [None] * batch.num_rows
    flags: list[str | None] = [None] * batch.num_rows
    for i, s in zip(live, score([texts[i] for i in live]) if live else [], strict=True):
        values[i] = float(s)
        if s >= cfg.threshold:
            if cfg.mode == "filter":
                reasons[i] = f"{cfg.step_name}:toxic"
            else:
                flags[i] = "toxic"
    out = batch.set_column(
        batch.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons, pa.string())
    )
    out = out.append_column(
        pa.field(f"{cfg.step_name}_score", pa.float32()), pa.array(values, pa.float32())
    )
    if cfg.mode == "annotate":
        out = out.append_column(
            pa.field(f"{cfg.step_name}_flag", pa.string()), pa.array(flags, pa.string())
        )
    return out


def conform(batch: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """`batch` with exactly `schema`'s columns and types (segments differ in nullability)."""
    return batch.select(schema.names).cast(schema)


def mark_duplicates(batch: pa.Table, *, reason: str) -> pa.Table:
    """After a left join with a dedup's removed/ ids: rows with `duplicate_of` get `reason`."""
    dup = pc.is_valid(batch["duplicate_of"])
    out = batch.drop_columns(["duplicate_of"])
    return out.set_column(
        out.schema.get_field_index("drop_reason"),
        "drop_reason",
        pc.if_else(dup, pa.scalar(reason), out["drop_reason"]),
    )


def _sampled(ids: list[str], fraction: float) -> list[bool]:
    """Whether each id hashes below `fraction`: the same sample on every run."""
    if fraction >= 1:
        return [True] * len(ids)
    cut = int(fraction * 2**64)
    return [
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") < cut
        for i in ids
    ]


def in_sample(batch: pa.Table, *, fraction: float) -> pa.Table:
    """The rows of a deterministic `fraction` sample (by id)."""
    return batch.filter(pa.array(_sampled(batch["id"].to_pylist(), fraction), pa.bool_()))


def trim_dropped(batch: pa.Table, *, fraction: float) -> pa.Table:
    """Clear text and meta of dropped rows outside the drops sample: their reason is all that is
    counted, so a 1% sample of drops does not write the other 99% of dropped text again."""
    dropped = pc.is_valid(batch["drop_reason"])
    if fraction >= 1 or not pc.any(dropped).as_py():
        return batch
    keep = pa.array(_sampled(batch["id"].to_pylist(), fraction), pa.bool_())
    clear = pc.and_(dropped, pc.invert(keep))
    for name in ("text", "meta"):
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(
            i, name, pc.if_else(clear, pa.scalar(None, pa.string()), batch[name])
        )
    return batch


# ---------------------------------------------------------------------------------------------
# The job


def segments(steps: list) -> list[list]:
    """Consecutive per-document steps form one segment; each dedup step is its own."""
    out: list[list] = []
    for s in steps:
        if s.type in DEDUP_TYPES or not out or out[-1][0].type in DEDUP_TYPES:
            out.append([s])
        else:
            out[-1].append(s)
    return out


class FilterStage:
    """The fused per-document steps as a callable class: the spaCy tokenizer (and its cache), the
    language and toxicity models load once per actor and stay warm across batches."""

    def __init__(self, steps: list) -> None:
        from workloads.data.filters.text import spacy_english

        spacy_english()
        if any(s.type == "language" for s in steps):
            from workloads.data.filters.language import lid_model

            lid_model()
        self.steps = steps

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_steps(batch, steps=self.steps)


def _is_classifier(step) -> bool:
    return step.type == "toxicity" and step.backend == "hf_classifier"


def actor_stages(steps: list) -> list[list]:
    """The actor-pool stages of a segment in order: each run of in-process steps fuses into one
    `FilterStage`; each Hugging Face classifier step is a stage of its own (a one-step list)."""
    stages: list[list] = []
    for step in steps:
        if _is_classifier(step) or not stages or _is_classifier(stages[-1][0]):
            stages.append([step])
        else:
            stages[-1].append(step)
    return stages


def _filter_chain(ds, steps: list, actors: FilterActorsConfig | None = None):
    """The per-document steps on a dataset of working rows: fused runs plus classifier stages."""
    actors = actors or FilterActorsConfig()
    for stage in actor_stages(steps):
        if not _is_classifier(stage[0]):
            ds = ds.map_batches(
                FilterStage,
                batch_format="pyarrow",
                fn_constructor_kwargs={"steps": stage},
                concurrency=actors.concurrency,
                num_cpus=actors.num_cpus,
            )
            continue
        step = stage[0]
        gpu = resolve_device(step.device) == "cuda"
        ds = ds.map_batches(
            _classifier_class(),
            batch_format="pyarrow",
            batch_size=step.batch_size * 4,
            fn_constructor_kwargs={"cfg": step, "use_gpu": gpu},
            concurrency=step.concurrency,
            num_cpus=step.num_cpus,
            num_gpus=1 if gpu else 0,
        )
    return ds


def reserved_actor_cpus(steps: list, actors: FilterActorsConfig) -> float:
    """Logical CPUs the actor pools of one segment hold at their largest."""
    pool = max_actors(actors.concurrency)
    return sum(
        stage[0].concurrency * stage[0].num_cpus
        if _is_classifier(stage[0])
        else pool * actors.num_cpus
        for stage in actor_stages(steps)
    )


def _check_room_for_reads(cfg: CurateConfig) -> None:
    for seg in segments(cfg.steps):
        if seg[0].type in DEDUP_TYPES:
            continue
        check_cpus_left_for_tasks(
            cfg.ray,
            reserved_actor_cpus(seg, cfg.filter_actors),
            f"steps {[s.step_name for s in seg]}",
            "lower filter_actors.num_cpus or filter_actors.concurrency (and toxicity.num_cpus / "
            "toxicity.concurrency)",
        )


def _classifier_class():
    from workloads.data.filters.toxicity import TextClassifierStage

    return TextClassifierStage


def _dedup_subjob(step, source: str, folder: str, cfg: CurateConfig):
    """The dedup job's config for a dedup step: its input is the previous segment's live rows."""
    from workloads.data.dedup.exact import ExactDedupConfig
    from workloads.data.dedup.minhash_lsh import MinHashDedupConfig

    common = {
        "input": InputConfig(path=source, format="parquet", id_field="id"),
        "output": OutputConfig(path=folder, mode=cfg.output.mode),
        "ray": cfg.ray,
    }
    if step.type == "exact_dedup":
        return ExactDedupConfig(
            **common, normalize=step.normalize, num_partitions=step.num_partitions
        )
    return MinHashDedupConfig(
        **common,
        exact=step.exact,
        shingle=step.shingle,
        minhash=step.minhash,
        verify=step.verify,
        keep=step.keep,
        num_partitions=step.num_partitions,
    )


def run(cfg: CurateConfig) -> JobManifest:
    from ray.data.expressions import col

    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    manifest = JobManifest("curate", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray)
    _check_room_for_reads(cfg)
    read, stage = out.read_dataset, out.run_stage

    def write(ds, folder: str, schema: pa.Schema) -> None:
        # Per-document steps emit many small blocks; a few large files keep later stages' read
        # tasks few.
        out.write_dataset(ds, folder, schema, min_bytes_per_file=FILE_BYTES)

    def save(name: str, ds, schema: pa.Schema) -> None:
        """A stage that writes `ds` (built before the call, so nothing binds late)."""
        stage(name, lambda folder: write(ds, folder, schema), manifest)

    def live(folder: str, columns=None):
        return read(folder, columns).filter(
            expr=col("reject_reason").is_null() & col("drop_reason").is_null()
        )

    def tally(folders: list[str]) -> dict[str, dict[str, int]]:
        """Rows per drop reason and per reject reason over all segments, in one pass."""
        parts = [read(f, ["drop_reason", "reject_reason"]) for f in folders]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        return tally_reasons(ds, ("drop_reason", "reject_reason"))

    def dedup(step, name: str, source: str, schema: pa.Schema, _folder: str) -> dict:
        """Run the dedup job on `source` (live rows) into `name`/job, then mark the ids it removed
        in `name`/rows."""
        from workloads.data.dedup import exact, minhash_lsh

        job = exact.run if step.type == "exact_dedup" else minhash_lsh.run
        sub_manifest = job(_dedup_subjob(step, out.path(source), out.path(f"{name}/job"), cfg))
        removed = read(f"{name}/job/removed", ["id", "duplicate_of"])
        rows = live(source).join(
            removed, join_type="left_outer", num_partitions=step.num_partitions, on=("id",)
        )
        rows = rows.map_batches(
            mark_duplicates,
            batch_format="pyarrow",
            fn_kwargs={"reason": f"{step.step_name}:duplicate"},
        )
        write(
            rows.map_batches(trim_dropped, batch_format="pyarrow", fn_kwargs=trim),
            out.path(f"{name}/rows"),
            schema,
        )
        return {"dropped": sub_manifest.dropped}

    trim = {"fraction": cfg.drops.sample_fraction if cfg.drops.keep else 0.0}
    # The reader's rows, rejects included: the first segment reads the input files itself, so the
    # text is written once per segment, not once more by a separate ingest stage.
    reader_rows = read_documents(cfg.input, files).map_batches(
        start_rows, batch_format="pyarrow", fn_kwargs={"max_doc_chars": cfg.max_doc_chars}
    )
    folders: list[str] = []  # every segment's rows; a dropped row is in exactly one of them
    done: list = []  # steps whose columns the rows carry
    extra: dict[str, dict] = {}
    for k, seg in enumerate(segments(cfg.steps), start=1):
        name = f"_stages/{k:02d}-{seg[0].step_name}" + (
            f"-to-{seg[-1].step_name}" if len(seg) > 1 else ""
        )
        schema = rows_schema([*done, *seg])
        if seg[0].type in DEDUP_TYPES:
            if not folders:  # a leading dedup step: the reader's rows are written first
                rows = reader_rows.map_batches(trim_dropped, batch_format="pyarrow", fn_kwargs=trim)
                save("_stages/00-input", rows, rows_schema([]))
                folders.append("_stages/00-input")
            # The dedup job reads files, so the rows still alive are written out for it.
            save(f"{name}/input", live(folders[-1]), rows_schema(done))
            produce = functools.partial(dedup, seg[0], f"{name}/dedup", f"{name}/input", schema)
            extra[seg[0].step_name] = stage(f"{name}/dedup", produce, manifest).info["dropped"]
            folders.append(f"{name}/dedup/rows")
        else:
            source = live(folders[-1]) if folders else reader_rows
            rows = _filter_chain(source, seg, cfg.filter_actors).map_batches(
                trim_dropped, batch_format="pyarrow", fn_kwargs=trim
            )
            save(name, rows, schema)
            folders.append(name)
        done += seg

    def rejects(folder: str) -> dict:
        bad = read(folders[0], REJECTS_SCHEMA.names).filter(expr=col("reject_reason").is_not_null())
        write(bad, folder, REJECTS_SCHEMA)
        return {"read": out.count_rows(folders[0])}

    def kept(folder: str) -> dict:
        drop = ("reject_reason", "raw", "drop_reason")
        columns = [f for f in rows_schema(done) if f.name not in drop]
        write(live(folders[-1], [f.name for f in columns]), folder, pa.schema(columns))
        return {"rows": out.count_rows("kept")}

    def drops(folder: str) -> dict:
        if cfg.drops.keep:
            # Dropped rows outside the sample had their text cleared when their segment was written
            # (`trim_dropped`); the sample is what still has text.
            parts = [
                read(f, [f.name for f in DROP_FIELDS]).filter(
                    expr=col("drop_reason").is_not_null() & col("text").is_not_null()
                )
                for f in folders
            ]
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            schema = pa.schema(DROP_FIELDS)
            write(
                ds.map_batches(conform, batch_format="pyarrow", fn_kwargs={"schema": schema}),
                folder,
                schema,
            )
        return tally(folders)

    manifest.read = stage("rejects", rejects, manifest).info["read"]
    manifest.kept = stage("kept", kept, manifest).info["rows"]
    counted = stage("drops", drops, manifest).info
    manifest.dropped, manifest.rejected = counted["drop_reason"], counted["reject_reason"]
    manifest.outputs = {"kept": out.path("kept"), "rejects": out.path("rejects")}
    if cfg.drops.keep:
        manifest.outputs["drops"] = out.path("drops")
    manifest.extra = {"steps": [s.step_name for s in cfg.steps]}
    if extra:
        manifest.extra["dedup"] = extra
    return finish_job(manifest, out, cfg.output.keep_intermediate)
