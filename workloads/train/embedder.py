"""Fine-tune a sentence-transformers embedding model on (query, positive[, negative]) pairs, on Ray Train.

    python -m workloads.train.embedder make-pairs --out data/pairs.jsonl      # pairs from the sample corpus
    python ray_jobs/finetune_embedder.py --config ray_jobs/configs/finetune_embedder/default.yaml
    ray job submit --working-dir . -- python ray_jobs/finetune_embedder.py \
        --config ray_jobs/configs/finetune_embedder/cluster.yaml

The data is JSONL, one record per line: {"query": ..., "positive": ...[, "negative": ...]}; other
fields are ignored. A record that is not one (bad JSON or UTF-8, a missing, non-string or empty field)
is counted and written to `rejects/` with its reason; it never stops the job. The driver reads the
pairs, holds out a deterministic share of them *by positive* (pairs that share a document land on
the same side, so the evaluation never sees a training document), and starts a `TorchTrainer`.
Each worker runs `train_loop_per_worker`: sentence-transformers' own `SentenceTransformerTrainer`
with in-batch-negatives loss (`MultipleNegativesRankingLoss`; with several workers the embeddings
are gathered across them, so every query is scored against every positive in the global batch),
evaluated on the held-out pairs before training and after each epoch with
`InformationRetrievalEvaluator` (queries: held-out queries; corpus: held-out positives and
negatives; relevant: each query's positive). `RayTrainReportCallback` reports each epoch's metrics
and model (a sentence-transformers folder saved by rank 0) to Ray Train.

Output:
  model/          the fine-tuned model: `SentenceTransformer("<output>/model")` loads it
  rejects/        malformed pair records, with `reject_reason` and the raw line
  _manifest.json  read = kept (train + held-out) + rejected; held-out recall@k, MRR@k and nDCG@k
                  before and after training; the training loss curve
A rerun with the same config reuses `model/` (see `output.mode`).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from workloads.common.config import JobConfig, OutputConfig, StrictModel
from workloads.common.documents import (
    INVALID_UTF8,
    JSONL_EXTENSIONS,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
)
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout, expand_input_paths
from workloads.train.config import TrainScalingConfig
from workloads.train.ray_train import check_cluster_fits, storage_path
from workloads.train.splits import is_held_out

log = logging.getLogger(__name__)

# The evaluator's name: its metrics are `<prefix>_heldout_cosine_<metric>@k` in the trainer's logs.
EVALUATOR_NAME = "heldout"
REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line", pa.int64()),
        ("reject_reason", pa.string()),
        ("raw", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Config


class PairsConfig(StrictModel):
    path: str = Field(
        description='JSONL file, folder or URI of {"query", "positive"[, "negative"]} records '
        "(`python -m workloads.train.embedder make-pairs` builds one from the sample corpus)."
    )
    eval_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of documents (distinct positives) held out for evaluation.",
    )
    seed: int = Field(default=0, description="Seed of the held-out split.")


class EmbedderTrainConfig(StrictModel):
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(
        default=32,
        ge=2,
        description="Pairs per worker per step. With gather_across_workers, each query is scored "
        "against batch_size x num_workers positives.",
    )
    learning_rate: float = Field(default=2e-5, gt=0, le=1)
    warmup_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="Share of steps with linear learning-rate warmup."
    )
    max_seq_length: int = Field(
        default=128, ge=8, le=8192, description="Tokens per text; longer texts are truncated."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Mixed precision. `auto`: bf16 on GPUs that support it, else fp16; fp32 on CPU.",
    )
    loss_scale: float = Field(
        default=20.0,
        gt=0,
        description="Similarity scale (1 / temperature) of the in-batch-negatives loss; "
        "20 is sentence-transformers' default.",
    )
    gather_across_workers: bool = Field(
        default=True,
        description="Score each query against the positives of every worker's batch, not only its own.",
    )
    logging_steps: int = Field(default=5, ge=1, description="Log the training loss every N steps.")
    seed: int = Field(default=0, description="Seed of model init, shuffling and dropout.")


class RetrievalEvalConfig(StrictModel):
    k: list[int] = Field(
        default=[1, 5, 10],
        min_length=1,
        description="Cut-offs for held-out recall@k, MRR@k and nDCG@k.",
    )
    batch_size: int = Field(default=64, ge=1, description="Texts per encode batch.")

    @field_validator("k")
    @classmethod
    def _positive_k(cls, k: list[int]) -> list[int]:
        if any(v < 1 for v in k):
            raise ValueError(f"every cut-off must be at least 1 (got {k})")
        return sorted(set(k))


class FinetuneEmbedderConfig(JobConfig):
    model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="Hub id or folder of the sentence-transformers model to start from.",
    )
    data: PairsConfig
    train: EmbedderTrainConfig = Field(default_factory=EmbedderTrainConfig)
    eval: RetrievalEvalConfig = Field(default_factory=RetrievalEvalConfig)
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    output: OutputConfig
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints: a local folder on one machine, s3:// or "
        "gs:// on a multi-node cluster (every worker writes there). Default: <output.path>/_ray_train.",
    )

    @model_validator(mode="after")
    def _precision_fits_device(self) -> FinetuneEmbedderConfig:
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision: fp16 mixed precision needs scaling.use_gpu=true "
                "(on CPU use fp32 or bf16)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Pairs: parse, reject with a reason, split by document


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negative: str | None = None


@dataclass(frozen=True)
class Reject:
    source: str
    line: int
    reason: str
    raw: str


def pair_or_reason(record: Any) -> Pair | str:
    """The pair in one decoded JSON record, or why it is not one (`missing_query`,
    `non_string_positive`, `empty_negative`, ...). `negative` is optional; `null` means absent."""
    if not isinstance(record, dict):
        return NOT_AN_OBJECT
    fields: dict[str, str | None] = {}
    for name in ("query", "positive", "negative"):
        value = record.get(name)
        if value is None:
            if name != "negative":
                return f"missing_{name}"
        elif not isinstance(value, str):
            return f"non_string_{name}"
        elif not value.strip():
            return f"empty_{name}"
        fields[name] = value
    return Pair(fields["query"], fields["positive"], fields.get("negative"))


def parse_pair_lines(
    lines: Iterable[bytes], source: str, first_line: int = 1
) -> tuple[list[Pair], list[Reject]]:
    """Pairs and rejects from JSONL lines; blank lines are not records. Pure: no Ray."""
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    for line_no, raw_bytes in enumerate(lines, start=first_line):
        if not raw_bytes.strip():
            continue
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            rejects.append(
                Reject(source, line_no, INVALID_UTF8, raw_bytes.decode("utf-8", "replace"))
            )
            continue
        try:
            parsed = pair_or_reason(json.loads(raw))
        except json.JSONDecodeError:
            parsed = MALFORMED_JSON
        if isinstance(parsed, Pair):
            pairs.append(parsed)
        else:
            rejects.append(Reject(source, line_no, parsed, raw.rstrip("\r")))
    return pairs, rejects


def split_pairs(
    pairs: list[Pair], *, eval_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """(train, held out), by document: keyed on the positive's text, so every pair of one
    document lands on the same side."""
    train, held_out = [], []
    for pair in pairs:
        side = (
            held_out
            if is_held_out(pair.positive, eval_fraction=eval_fraction, seed=seed)
            else train
        )
        side.append(pair)
    return train, held_out


def read_pairs(uri: str) -> tuple[list[Pair], list[Reject], int]:
    """(pairs, rejects, records read) from a JSONL file, folder or glob, local or in object storage."""
    fs, files = expand_input_paths(uri, JSONL_EXTENSIONS)
    pairs, rejects = [], []
    for path in files:
        with fs.open_input_stream(path, compression="detect") as f:
            file_pairs, file_rejects = parse_pair_lines(f.read().split(b"\n"), source=path)
        pairs += file_pairs
        rejects += file_rejects
    return pairs, rejects, len(pairs) + len(rejects)


def retrieval_task(
    held_out: list[Pair],
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(queries, corpus, relevant) for InformationRetrievalEvaluator: each held-out query against
    every held-out positive and negative; its own positive is the relevant document."""
    corpus_ids: dict[str, str] = {}  # text -> id: a document shared by several pairs is one entry
    for pair in held_out:
        for text in (pair.positive, pair.negative):
            if text is not None and text not in corpus_ids:
                corpus_ids[text] = f"d{len(corpus_ids)}"
    queries = {f"q{i}": pair.query for i, pair in enumerate(held_out)}
    relevant = {f"q{i}": {corpus_ids[pair.positive]} for i, pair in enumerate(held_out)}
    return queries, {cid: text for text, cid in corpus_ids.items()}, relevant


RETRIEVAL_METRICS = ("recall", "mrr", "ndcg", "map")  # accuracy@k == recall@k: one relevant doc


def retrieval_metrics(logged: dict[str, Any], prefix: str) -> dict[str, float]:
    """{'recall@10': ..., 'mrr@10': ..., 'loss': ...} from one evaluation's logged metrics."""
    head = f"{prefix}_{EVALUATOR_NAME}_cosine_"
    out = {
        k[len(head) :]: float(v)
        for k, v in sorted(logged.items())
        if k.startswith(head) and k[len(head) :].split("@")[0] in RETRIEVAL_METRICS
    }
    if f"{prefix}_loss" in logged:
        out["loss"] = float(logged[f"{prefix}_loss"])
    return out


# ---------------------------------------------------------------------------------------------
# Pairs from the sample corpus

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+_])\1{2,}\s*$", re.MULTILINE)  # reST heading underlines
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
MIN_QUERY_WORDS = 3
MAX_QUERY_WORDS = 64
MIN_POSITIVE_WORDS = 20


def query_and_rest(text: str) -> tuple[str, str] | None:
    """(first sentence, the rest of the text), whitespace collapsed; None when either is too short.

    The first sentence ends at the first `.`, `!` or `?` after at least MIN_QUERY_WORDS words, or
    at the end of the first paragraph (a heading such as `The "assert" statement`)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", _UNDERLINE.sub("", text)) if p.strip()]
    if not paragraphs:
        return None
    first = " ".join(paragraphs[0].split())
    end = len(first)
    for match in _SENTENCE_END.finditer(first):
        if len(first[: match.end()].split()) >= MIN_QUERY_WORDS:
            end = match.end()
            break
    query, rest = first[:end], " ".join([first[end:], *paragraphs[1:]])
    rest = " ".join(rest.split())
    if not MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS:
        return None
    if len(rest.split()) < MIN_POSITIVE_WORDS:
        return None
    return query, rest


def pairs_from_documents(
    docs: Iterable[Any], *, max_words: int = 200, with_title: bool = False
) -> tuple[list[dict[str, str]], int]:
    """One {"query", "positive", "doc_id"} record per document (objects with .source, .title and
    .text): the first sentence asks for the rest, truncated to `max_words` words. Returns
    (records, documents skipped because they have no usable first sentence or rest)."""
    records, skipped = [], 0
    per_source: Counter[str] = Counter()
    for doc in docs:
        split = query_and_rest(doc.text)
        if split is None:
            skipped += 1
            continue
        query, rest = split
        if with_title:
            query = f"{doc.title}: {query}"
        doc_id = f"{doc.source}#{per_source[doc.source]}"
        per_source[doc.source] += 1
        records.append(
            {"query": query, "positive": " ".join(rest.split()[:max_words]), "doc_id": doc_id}
        )
    return records, skipped


def make_pairs(
    out: Path,
    *,
    site_packages: bool = False,
    max_words: int = 200,
    with_title: bool = False,
    limit: int | None = None,
) -> dict[str, int]:
    """Write pairs built from `workloads.data.sample.base_documents` to `out` (JSONL)."""
    from workloads.data.sample import base_documents

    records, skipped = pairs_from_documents(
        base_documents(site_packages), max_words=max_words, with_title=with_title
    )
    records = records[:limit] if limit else records
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"pairs": len(records), "skipped_documents": skipped}


# ---------------------------------------------------------------------------------------------
# The recipe: one Ray Train worker


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Load the model, evaluate, train with in-batch negatives, evaluate and checkpoint each epoch.
    Returns the trainer's log history (rank 0's becomes `Result.return_value`)."""
    import datasets
    import ray
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import cos_sim

    from workloads.embed.models import load_sentence_transformer

    cfg = FinetuneEmbedderConfig.model_validate(config["cfg"])
    train_pairs: list[Pair] = ray.get(config["train"])
    held_out: list[Pair] = ray.get(config["held_out"])

    # Model: the same weights on every worker; the trainer wraps it in DDP.
    model = load_sentence_transformer(cfg.model, device="cpu")
    model.max_seq_length = cfg.train.max_seq_length

    # Data: anchor/positive(/negative) columns, in that order, are what the loss reads.
    def columns(pairs: list[Pair], negatives: bool) -> datasets.Dataset:
        cols = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
        if negatives:
            cols["negative"] = [p.negative for p in pairs]
        return datasets.Dataset.from_dict(cols)

    negatives = config["use_negatives"]
    train_dataset = columns(train_pairs, negatives)
    # The held-out loss needs one full batch per worker (batches are dropped, not padded).
    full_batch = cfg.train.batch_size * ray.train.get_context().get_world_size()
    eval_dataset = None
    if len(held_out) >= full_batch:
        eval_dataset = columns(held_out, negatives and all(p.negative for p in held_out))

    # Loss: InfoNCE over in-batch negatives; gathering makes every worker's positives negatives
    # for every query, so the effective batch is batch_size x num_workers.
    loss = MultipleNegativesRankingLoss(
        model, scale=cfg.train.loss_scale, gather_across_devices=cfg.train.gather_across_workers
    )
    queries, corpus, relevant = retrieval_task(held_out)
    evaluator = InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        mrr_at_k=cfg.eval.k,
        ndcg_at_k=cfg.eval.k,
        accuracy_at_k=cfg.eval.k,
        precision_recall_at_k=cfg.eval.k,
        map_at_k=[max(cfg.eval.k)],
        score_functions={"cosine": cos_sim},
        batch_size=cfg.eval.batch_size,
        name=EVALUATOR_NAME,
        write_csv=False,
    )

    precision = cfg.train.precision
    if precision == "auto":
        gpu = torch.cuda.is_available()
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "fp32"
    # Each worker writes its own folder: only rank 0 saves, so only rank 0 finds a checkpoint
    # to hand to RayTrainReportCallback, and Ray Train stores one copy of the model.
    output_dir = tempfile.mkdtemp(prefix="finetune_embedder-")
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate,
        warmup_steps=cfg.train.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        use_cpu=not cfg.scaling.use_gpu,  # else accelerate sees no CPU process group: no DDP
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Duplicate texts in a batch would be false negatives for each other.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        # Same-size batches, and as many, on every worker: the gather needs equal shapes and
        # DDP's gradient all-reduce needs every worker to take every step.
        dataloader_drop_last=True,
        # Evaluate inside train(), not by a trainer.evaluate() before it: that would register
        # the bare model with accelerate, which then skips the DDP wrapping and every worker
        # would train its own copy.
        eval_on_start=True,
        eval_strategy="epoch",
        save_strategy="epoch",  # Ray's pattern: each reported checkpoint carries its evaluation
        save_only_model=True,  # the model is the product; optimizer state would double the upload
        save_total_limit=1,
        logging_steps=cfg.train.logging_steps,
        seed=cfg.train.seed,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)

    trainer.train()

    shutil.rmtree(output_dir, ignore_errors=True)
    return trainer.state.log_history


# ---------------------------------------------------------------------------------------------
# The job


def _write_rejects(out: OutputLayout, rejects: list[Reject]) -> str:
    folder = out.path("rejects")
    out.clear("rejects")
    out.fs.create_dir(folder, recursive=True)
    table = pa.Table.from_pylist(
        [
            {"source": r.source, "line": r.line, "reject_reason": r.reason, "raw": r.raw}
            for r in rejects
        ],
        schema=REJECTS_SCHEMA,
    )
    with out.fs.open_output_stream(posixpath.join(folder, "pairs.parquet")) as f:
        pq.write_table(table, f)
    return folder


def _fine_tune(
    cfg: FinetuneEmbedderConfig, train: list[Pair], held_out: list[Pair], folder: str, fs
) -> dict[str, Any]:
    """Run the TorchTrainer and copy the last checkpoint's model into `folder`."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with_negative = sum(p.negative is not None for p in train)
    # One batch holds one shape: triplets only when every training pair has a negative.
    use_negatives = with_negative == len(train)
    if with_negative and not use_negatives:
        log.warning(
            "%d of %d training pairs have a negative; training on (query, positive) only",
            with_negative,
            len(train),
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train": ray.put(train),
            "held_out": ray.put(held_out),
            "use_negatives": use_negatives,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
        ),
        run_config=RunConfig(
            name=f"finetune_embedder-{cfg.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path(cfg.storage_path, cfg.output.path),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise JobFailed(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise JobFailed("training reported no checkpoint")
    # RayTrainReportCallback stores the trainer's checkpoint folder under `checkpoint/`.
    source = posixpath.join(result.checkpoint.path, "checkpoint")
    pafs.copy_files(source, folder, result.checkpoint.filesystem, fs)

    history: list[dict[str, Any]] = result.return_value or []
    evals = [e for e in history if _has(e, "eval")]  # before training, then after each epoch
    if len(evals) < 2:
        raise JobFailed(f"expected evaluations before and after training, found {len(evals)}")
    return {
        "before": retrieval_metrics(evals[0], "eval"),
        "after": retrieval_metrics(evals[-1], "eval"),
        "after_each_epoch": [
            {"epoch": e.get("epoch"), **retrieval_metrics(e, "eval")} for e in evals[1:]
        ],
        "steps": max(e.get("step", 0) for e in history),
        "train_loss": [
            {"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e and "step" in e
        ],
        "pairs_with_negative": with_negative,
        "trained_on_negatives": use_negatives,
        "ray_train_run": result.path,
        "ray_train_metrics": {
            k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
        },
    }


def _has(entry: dict[str, Any], prefix: str) -> bool:
    return any(k.startswith(f"{prefix}_{EVALUATOR_NAME}_") for k in entry)


def run(cfg: FinetuneEmbedderConfig) -> JobManifest:
    manifest = JobManifest("finetune_embedder", cfg)
    with manifest.stage("read_pairs"):
        pairs, rejects, manifest.read = read_pairs(cfg.data.path)
        train, held_out = split_pairs(
            pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.seed
        )
    manifest.kept = len(train) + len(held_out)
    manifest.rejected = dict(Counter(r.reason for r in rejects))
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    manifest.outputs["rejects"] = _write_rejects(out, rejects)

    steps_per_epoch = len(train) // (cfg.train.batch_size * cfg.scaling.num_workers)
    if steps_per_epoch == 0:
        raise JobFailed(
            f"{len(train)} training pairs make no full step of train.batch_size="
            f"{cfg.train.batch_size} x scaling.num_workers={cfg.scaling.num_workers}: "
            "lower either, or add pairs"
        )
    if not held_out:
        raise JobFailed(f"no pair was held out of {len(pairs)}: raise data.eval_fraction")

    def fine_tune(folder: str) -> dict[str, Any]:
        init_ray(cfg.ray)
        check_cluster_fits(cfg.ray, cfg.scaling)
        return _fine_tune(cfg, train, held_out, folder, out.fs)

    info = out.run_stage("model", fine_tune, manifest).info
    manifest.outputs["model"] = out.path("model")
    manifest.extra = {
        "split": {"train": len(train), "held_out": len(held_out)},
        "held_out_corpus": len(retrieval_task(held_out)[1]),
        **info,
        "improvement": {
            k: round(v - info["before"][k], 6)
            for k, v in info["after"].items()
            if k in info["before"]
        },
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)


# ---------------------------------------------------------------------------------------------
# CLI: make-pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-pairs", help="(first sentence, rest) pairs from the sample corpus")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument(
        "--site-packages",
        action="store_true",
        help="also use the docstrings of every installed package (many more documents)",
    )
    p.add_argument("--max-words", type=int, default=200, help="truncate positives to N words")
    p.add_argument("--with-title", action="store_true", help="query = '<title>: <first sentence>'")
    p.add_argument("--limit", type=int, default=None, help="write at most N pairs")
    args = parser.parse_args(argv)
    counts = make_pairs(
        args.out,
        site_packages=args.site_packages,
        max_words=args.max_words,
        with_title=args.with_title,
        limit=args.limit,
    )
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
