"""A linear probe on sentence embeddings: embed labelled texts, train, report held-out accuracy/F1.

    python -m workloads.embed.classify make-sample --out data/labelled.jsonl
    python ray_jobs/train_probe.py --config ray_jobs/configs/train_probe/default.yaml
    python -m workloads.embed.classify predict --probe outputs/train_probe/probe "asyncio event loop"

Input is JSONL (or Parquet) of `{"text": ..., "label": ...}` records, read with the shared document
reader: records without a usable text are rejected with its reasons, and records without a label
(a missing, empty or non-scalar `label_field`) with `missing_label` / `invalid_label`. The texts are
embedded by the configured sentence-transformers model on an actor pool (the model loads once per
actor), with `normalize_embeddings=True`. Labels with fewer than `min_label_count` examples are
dropped (`rare_label`): a stratified split cannot put one in both halves. The rest is split
train/held-out by label (stratified, seeded, ids sorted first so the split does not depend on how
Ray ordered the blocks), a scikit-learn LogisticRegression (or SGDClassifier, for many rows) is
trained on the train split, and accuracy, macro-F1 and per-class scores are measured on the
held-out split.

Output (a rerun resumes at the first unfinished stage):
  probe/probe.json   labels, classifier, the embedding model and its dimension, metrics
  probe/probe.npz    coef and intercept (plain arrays: no pickle). `LinearProbe.load` reads both and
                     refuses to score embeddings of another model.
  metrics.json       held-out accuracy, macro-F1, per-class precision/recall/F1, majority baseline
  rejects/           records without a usable text or label, with `reject_reason` and the raw record
  _manifest.json     read = kept (train + held-out) + dropped (rare_label) + rejected
  _stages/           labelled rows, embeddings (id, label, embedding)

The labelled sample (`make-sample`) labels each of `workloads.data.sample.base_documents()` by the
family of the Python documentation it comes from (see DOC_FAMILIES).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from workloads.common.config import DataJobConfig, StrictModel
from workloads.common.documents import DOCUMENT_SCHEMA, list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray, resolve_device
from workloads.common.storage import OutputLayout, resolve_filesystem
from workloads.embed.clustering import count_reasons
from workloads.embed.schema import EmbeddingInfo, embedding_matrix, vectors_to_arrow

log = logging.getLogger(__name__)

MISSING_LABEL = "missing_label"
INVALID_LABEL = "invalid_label"
RARE_LABEL = "rare_label"
PROBE_FORMAT = 1

# ---------------------------------------------------------------------------------------------
# Config


class EmbedActorsConfig(StrictModel):
    batch_size: int = Field(default=64, ge=1, description="Texts per model.encode call.")
    concurrency: int | tuple[int, int] = Field(
        default=1,
        description="Actors that hold the model: a count, or [min, max] for an autoscaling pool.",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="Logical CPUs per actor.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="`auto`: one GPU per actor when the cluster has GPUs, else CPU.",
    )


class ProbeClassifierConfig(StrictModel):
    kind: Literal["auto", "logistic_regression", "sgd"] = Field(
        default="auto",
        description="`auto`: LogisticRegression (lbfgs) up to `sgd_above` training rows, "
        "SGDClassifier (log loss) above.",
    )
    sgd_above: int = Field(
        default=100_000,
        ge=1,
        description="Training rows above which `auto` picks SGD (scikit-learn's estimator "
        "cheat-sheet draws the line at 100k samples).",
    )
    C: float = Field(default=1.0, gt=0, description="LogisticRegression inverse regularisation.")
    alpha: float = Field(default=1e-4, gt=0, description="SGDClassifier regularisation.")
    max_iter: int = Field(default=1000, ge=1, description="Solver iterations (epochs for SGD).")
    class_weight: Literal["balanced"] | None = Field(
        default=None, description="`balanced` weighs classes by inverse frequency."
    )
    num_cpus: float = Field(default=1, gt=0, description="Logical CPUs of the training task.")


class TrainProbeConfig(DataJobConfig):
    label_field: str = Field(default="label", min_length=1, description="Field holding the label.")
    model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="sentence-transformers model (hub id or folder) that embeds the texts.",
    )
    max_seq_length: int | None = Field(
        default=None, ge=8, description="Truncate texts to this many tokens (empty: the model's)."
    )
    embed: EmbedActorsConfig = Field(default_factory=EmbedActorsConfig)
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of each label held out for evaluation."
    )
    seed: int = Field(default=0, description="Seed of the split and of the classifier.")
    min_label_count: int = Field(
        default=2,
        ge=2,
        description="Labels with fewer examples are dropped (`rare_label`); 2 is the least a "
        "stratified split can use.",
    )
    classifier: ProbeClassifierConfig = Field(default_factory=ProbeClassifierConfig)


# ---------------------------------------------------------------------------------------------
# Per-batch logic (plain functions; no Ray)

LABELLED_SCHEMA = pa.schema(
    [
        DOCUMENT_SCHEMA.field("id"),
        DOCUMENT_SCHEMA.field("text"),
        ("label", pa.string()),
        DOCUMENT_SCHEMA.field("source"),
        DOCUMENT_SCHEMA.field("line"),
        DOCUMENT_SCHEMA.field("reject_reason"),
        DOCUMENT_SCHEMA.field("raw"),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [DOCUMENT_SCHEMA.field(c) for c in ("id", "source", "line", "reject_reason", "raw")]
)
EMBEDDED_FALLBACK_SCHEMA = pa.schema(
    [("id", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32()))]
)


def label_value(value: Any) -> tuple[str | None, str | None]:
    """(label, reject reason) of a record's label field: a non-empty string, an integer or a bool."""
    if value is None:
        return None, MISSING_LABEL
    if isinstance(value, bool):
        return str(value).lower(), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, str):
        return (value.strip(), None) if value.strip() else (None, MISSING_LABEL)
    return None, INVALID_LABEL


def attach_labels(batch: pa.Table, *, label_field: str) -> pa.Table:
    """Reader rows -> labelled rows: `label` from the record's `meta`, or a reject reason."""
    metas = batch["meta"].to_pylist()
    reasons = batch["reject_reason"].to_pylist()
    raws = batch["raw"].to_pylist()
    labels: list[str | None] = []
    for i, meta in enumerate(metas):
        if reasons[i] is not None:
            labels.append(None)
            continue
        record = json.loads(meta) if meta else {}
        label, reason = label_value(record.get(label_field))
        labels.append(label)
        if reason is not None:
            reasons[i] = reason
            text = batch["text"][i].as_py()
            raws[i] = json.dumps({"id": batch["id"][i].as_py(), "text": text, **record})
    return pa.Table.from_arrays(
        [
            batch["id"],
            batch["text"],
            pa.array(labels, pa.string()),
            batch["source"],
            batch["line"],
            pa.array(reasons, pa.string()),
            pa.array(raws, pa.string()),
        ],
        schema=LABELLED_SCHEMA,
    )


def with_embeddings(batch: pa.Table, encode) -> pa.Table:
    """(id, label, text) rows -> (id, label, embedding), with `encode(texts) -> (n, dim) array`."""
    vectors = np.asarray(encode(batch["text"].to_pylist()), np.float32)
    return pa.table(
        {"id": batch["id"], "label": batch["label"], "embedding": vectors_to_arrow(vectors)}
    )


class TextEmbedder:
    """A sentence-transformers model on an actor: loads once in __init__, encodes batches of texts
    into L2-normalised vectors."""

    def __init__(
        self, model: str, device: str, batch_size: int, max_seq_length: int | None = None
    ) -> None:
        from workloads.embed.models import load_sentence_transformer

        self.model = load_sentence_transformer(model, device=device)
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return with_embeddings(batch, self.encode)


# ---------------------------------------------------------------------------------------------
# Split, train, evaluate (plain functions; no Ray)


def drop_rare_labels(labels: list[str], min_count: int) -> tuple[np.ndarray, dict[str, int]]:
    """(mask of rows kept, {dropped label: rows}) for labels with fewer than `min_count` rows."""
    values, counts = np.unique(np.array(labels, dtype=object), return_counts=True)
    rare = {str(v): int(c) for v, c in zip(values, counts, strict=True) if c < min_count}
    keep = np.array([label not in rare for label in labels], bool)
    return keep, rare


def stratified_split(
    ids: list[str], labels: list[str], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) as indexes into `ids`: stratified by label, seeded, and
    independent of the input order (rows are sorted by id first)."""
    from sklearn.model_selection import train_test_split

    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    classes = len(set(labels))
    n_test = int(np.ceil(test_fraction * len(ids)))
    if n_test < classes or len(ids) - n_test < classes:
        raise JobFailed(
            f"test_fraction={test_fraction} of {len(ids)} rows gives {n_test} held-out rows for "
            f"{classes} labels: each split needs one row per label; change test_fraction or add data"
        )
    train, test = train_test_split(
        order,
        test_size=test_fraction,
        stratify=[labels[i] for i in order],
        random_state=seed,
        shuffle=True,
    )
    return np.sort(train), np.sort(test)


@dataclass
class LinearProbe:
    """A trained linear classifier over one embedding model's vectors, saved as JSON + npz."""

    labels: list[str]
    coef: np.ndarray  # (n_labels, dim), or (1, dim) for two labels (the second is the positive)
    intercept: np.ndarray
    embedding: EmbeddingInfo
    classifier: str
    multinomial: bool  # softmax probabilities (LogisticRegression); else one-vs-rest sigmoids (SGD)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_estimator(cls, estimator, embedding: EmbeddingInfo, kind: str) -> LinearProbe:
        return cls(
            labels=[str(c) for c in estimator.classes_],
            coef=np.asarray(estimator.coef_, np.float32),
            intercept=np.asarray(estimator.intercept_, np.float32),
            embedding=embedding,
            classifier=kind,
            multinomial=kind == "logistic_regression",
        )

    def decision_function(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding.dimension:
            raise ValueError(
                f"probe expects ({self.embedding.dimension},)-dim vectors of {self.embedding.model},"
                f" got shape {vectors.shape}"
            )
        return np.asarray(vectors, np.float32) @ self.coef.T + self.intercept

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        scores = self.decision_function(vectors)
        if scores.shape[1] == 1:
            p = 1 / (1 + np.exp(-scores[:, 0]))
            return np.stack([1 - p, p], axis=1)
        if self.multinomial:
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        p = 1 / (1 + np.exp(-scores))
        return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)

    def predict(self, vectors: np.ndarray) -> list[str]:
        scores = self.decision_function(vectors)
        if scores.shape[1] == 1:
            return [self.labels[int(s > 0)] for s in scores[:, 0]]
        return [self.labels[i] for i in scores.argmax(axis=1)]

    def check_model(self, model: str, dimension: int | None = None) -> None:
        """Refuse embeddings of another model: a probe's weights mean nothing in another space."""
        if model != self.embedding.model or (
            dimension is not None and dimension != self.embedding.dimension
        ):
            raise ProbeModelMismatch(
                f"this probe was trained on {self.embedding.model} embeddings "
                f"({self.embedding.dimension}-dim); got {model}"
                + (f" ({dimension}-dim)" if dimension is not None else "")
                + ": embed with the probe's model, or train a probe on this one"
            )

    def save(self, fs, folder: str) -> None:
        import io

        fs.create_dir(folder, recursive=True)
        meta = {
            "format": PROBE_FORMAT,
            "labels": self.labels,
            "classifier": self.classifier,
            "multinomial": self.multinomial,
            "embedding": self.embedding.model_dump(),
            "metrics": self.metrics,
        }
        with fs.open_output_stream(posixpath.join(folder, "probe.json")) as f:
            f.write(json.dumps(meta, indent=2).encode())
        buf = io.BytesIO()
        np.savez(buf, coef=self.coef, intercept=self.intercept)
        with fs.open_output_stream(posixpath.join(folder, "probe.npz")) as f:
            f.write(buf.getvalue())

    @classmethod
    def load(cls, uri: str, expect_model: str | None = None) -> LinearProbe:
        """The probe in folder `uri`; with `expect_model`, refuse one trained on another model."""
        import io

        fs, folder = resolve_filesystem(uri.rstrip("/"))
        with fs.open_input_stream(posixpath.join(folder, "probe.json")) as f:
            meta = json.loads(f.read().decode())
        if meta.get("format") != PROBE_FORMAT:
            raise ValueError(f"{uri}: probe format {meta.get('format')!r}, expected {PROBE_FORMAT}")
        with fs.open_input_stream(posixpath.join(folder, "probe.npz")) as f:
            arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
        probe = cls(
            labels=meta["labels"],
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            embedding=EmbeddingInfo.model_validate(meta["embedding"]),
            classifier=meta["classifier"],
            multinomial=meta["multinomial"],
            metrics=meta.get("metrics", {}),
        )
        if expect_model is not None:
            probe.check_model(expect_model)
        return probe


class ProbeModelMismatch(JobFailed):
    """A probe was asked to score embeddings of a model it was not trained on."""


def fit_classifier(
    vectors: np.ndarray, labels: list[str], cfg: ProbeClassifierConfig, seed: int
) -> tuple[Any, str]:
    """(fitted scikit-learn estimator, kind)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    kind = cfg.kind
    if kind == "auto":
        kind = "sgd" if len(labels) > cfg.sgd_above else "logistic_regression"
    if kind == "logistic_regression":
        est = LogisticRegression(
            C=cfg.C, max_iter=cfg.max_iter, class_weight=cfg.class_weight, random_state=seed
        )
    else:
        est = SGDClassifier(
            loss="log_loss",
            alpha=cfg.alpha,
            max_iter=cfg.max_iter,
            class_weight=cfg.class_weight,
            random_state=seed,
        )
    est.fit(vectors, labels)
    return est, kind


def evaluate(predicted: list[str], truth: list[str], train_labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class scores on held-out rows, beside the accuracy of always
    answering the train split's most common label (the baseline a probe must beat)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    classes = sorted(set(truth) | set(train_labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    )
    values, counts = np.unique(np.array(train_labels, dtype=object), return_counts=True)
    majority = str(values[counts.argmax()])
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(
            f1_score(truth, predicted, labels=classes, average="macro", zero_division=0)
        ),
        "majority_label": majority,
        "majority_baseline_accuracy": float(np.mean([t == majority for t in truth])),
        "held_out_rows": len(truth),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
    }


def train_and_evaluate(
    ids: list[str],
    labels: list[str],
    vectors: np.ndarray,
    cfg: TrainProbeConfig,
    embedding: EmbeddingInfo,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Drop rare labels, split, fit, evaluate: (probe, info with metrics and row counts)."""
    keep, rare = drop_rare_labels(labels, cfg.min_label_count)
    idx = np.flatnonzero(keep)
    ids = [ids[i] for i in idx]
    labels = [labels[i] for i in idx]
    vectors = vectors[idx]
    if len(set(labels)) < 2:
        raise JobFailed(
            f"{len(set(labels))} label(s) with at least min_label_count={cfg.min_label_count} "
            "examples: a classifier needs two or more"
        )
    train, test = stratified_split(ids, labels, cfg.test_fraction, cfg.seed)
    train_labels = [labels[i] for i in train]
    est, kind = fit_classifier(vectors[train], train_labels, cfg.classifier, cfg.seed)
    probe = LinearProbe.from_estimator(est, embedding, kind)
    predicted = probe.predict(vectors[test])
    metrics = evaluate(predicted, [labels[i] for i in test], train_labels)
    metrics.update(classifier=kind, train_rows=len(train), labels=probe.labels)
    probe.metrics = metrics
    info = {
        "metrics": metrics,
        "kept": len(ids),
        "rare_rows": int((~keep).sum()),
        "rare_labels": rare,
    }
    return probe, info


# ---------------------------------------------------------------------------------------------
# The labelled sample

# Documentation families: the pydoc topics form one, and standard-library modules are grouped by
# their top-level package. Families are broad enough that a label is not just a module name in the
# text (`email` docstrings rarely say "internet"; pdb's own pydoc topic is `language_reference`).
DOC_FAMILIES: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter", "turtle", "curses"),
    "internet": (
        "email",
        "http",
        "urllib",
        "smtplib",
        "smtpd",
        "nntplib",
        "wsgiref",
        "xmlrpc",
        "socket",
        "socketserver",
        "ssl",
        "ftplib",
        "poplib",
        "imaplib",
        "mailbox",
        "mimetypes",
        "telnetlib",
        "cgi",
        "cgitb",
        "webbrowser",
        "ipaddress",
        "mailcap",
        "quopri",
    ),
    "packaging_and_imports": (
        "distutils",
        "importlib",
        "pkgutil",
        "zipimport",
        "runpy",
        "site",
        "sysconfig",
        "modulefinder",
        "venv",
        "zipapp",
        "compileall",
        "py_compile",
        "imp",
    ),
    "concurrency": (
        "asyncio",
        "multiprocessing",
        "threading",
        "_threading_local",
        "concurrent",
        "subprocess",
        "queue",
        "sched",
        "selectors",
        "asynchat",
        "asyncore",
    ),
    "testing_and_debugging": (
        "unittest",
        "doctest",
        "bdb",
        "pdb",
        "trace",
        "traceback",
        "tracemalloc",
        "cProfile",
        "profile",
        "pstats",
        "timeit",
        "faulthandler",
    ),
}
LANGUAGE_REFERENCE = "language_reference"


def doc_family(source: str) -> str | None:
    """The family of a sample document's `source` (`pydoc:<topic>` or `stdlib:<module>`), or None."""
    kind, _, name = source.partition(":")
    if kind == "pydoc":
        return LANGUAGE_REFERENCE
    if kind != "stdlib":
        return None
    top = name.split(".")[0]
    return next((family for family, mods in DOC_FAMILIES.items() if top in mods), None)


def labelled_sample(max_per_label: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """{"id", "text", "label", "source"} records: each base document of the sample corpus whose
    source belongs to a family, labelled with it; at most `max_per_label` per label (seeded)."""
    from workloads.data.sample import base_documents

    by_label: dict[str, list] = {}
    for doc in base_documents(site_packages=False):
        family = doc_family(doc.source)
        if family is not None:
            by_label.setdefault(family, []).append(doc)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        docs = by_label[label]
        if max_per_label is not None and len(docs) > max_per_label:
            docs = rng.sample(docs, max_per_label)
        chosen += [(label, d) for d in docs]
    rng.shuffle(chosen)
    return [
        {"id": f"lab-{i:05d}", "text": d.text, "label": label, "source": d.source}
        for i, (label, d) in enumerate(chosen)
    ]


def write_labelled_sample(out: Path, max_per_label: int | None = None, seed: int = 0) -> dict:
    """Write the labelled sample as JSONL; returns {label: rows}."""
    records = labelled_sample(max_per_label, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for r in records:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# The job


def _train_from_folder(
    uri: str, cfg: TrainProbeConfig, embedding: EmbeddingInfo, probe_folder: str
) -> dict:
    """The training task: read (id, label, embedding) rows, train and evaluate, save the probe."""
    import pyarrow.dataset as pads

    fs, folder = resolve_filesystem(uri)
    table = pads.dataset(folder, format="parquet", filesystem=fs).to_table()
    probe, info = train_and_evaluate(
        table["id"].to_pylist(), table["label"].to_pylist(), embedding_matrix(table), cfg, embedding
    )
    out_fs, out_folder = resolve_filesystem(probe_folder)
    probe.save(out_fs, out_folder)
    return info


def run(cfg: TrainProbeConfig) -> JobManifest:
    import ray
    from ray.data.expressions import col

    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    manifest = JobManifest("train_probe", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray)

    def labelled(folder: str) -> dict:
        ds = read_documents(cfg.input, files).map_batches(
            attach_labels, batch_format="pyarrow", fn_kwargs={"label_field": cfg.label_field}
        )
        out.write_dataset(ds, folder, LABELLED_SCHEMA)
        return {"rows": out.count_rows("_stages/labelled")}

    def rejects(folder: str) -> dict:
        bad = out.read_dataset("_stages/labelled", REJECTS_SCHEMA.names).filter(
            expr=col("reject_reason").is_not_null()
        )
        out.write_dataset(bad, folder, REJECTS_SCHEMA)
        return {"reasons": count_reasons(out.fs, folder)}

    def embeddings(folder: str) -> dict:
        import pyarrow.dataset as pads

        gpu = resolve_device(cfg.embed.device) == "cuda"
        ds = (
            out.read_dataset("_stages/labelled", ["id", "text", "label", "reject_reason"])
            .filter(expr=col("reject_reason").is_null())
            .map_batches(
                TextEmbedder,
                batch_format="pyarrow",
                batch_size=cfg.embed.batch_size * 4,
                fn_constructor_kwargs={
                    "model": cfg.model,
                    "device": "cuda" if gpu else "cpu",
                    "batch_size": cfg.embed.batch_size,
                    "max_seq_length": cfg.max_seq_length,
                },
                concurrency=cfg.embed.concurrency,
                num_cpus=cfg.embed.num_cpus,
                num_gpus=1 if gpu else 0,
            )
        )
        # run() fails before this stage when no record survived, so the fallback schema (for an
        # empty output) is never what readers see.
        out.write_dataset(ds, folder, EMBEDDED_FALLBACK_SCHEMA)
        written = pads.dataset(folder, format="parquet", filesystem=out.fs).schema
        info = EmbeddingInfo(
            model=cfg.model,
            dimension=written.field("embedding").type.list_size,
            normalized=True,
            precision="fp32",
            max_seq_length=cfg.max_seq_length,
        )
        return {"rows": out.count_rows("_stages/embeddings"), "embedding": info.model_dump()}

    def probe(folder: str) -> dict:
        # The task may run on another node, or in another working directory: pass absolute URIs.
        base = out.uri if "://" in out.uri else out.root
        task = ray.remote(num_cpus=cfg.classifier.num_cpus)(_train_from_folder)
        return ray.get(task.remote(f"{base}/_stages/embeddings", cfg, embedding, f"{base}/probe"))

    manifest.read = out.run_stage("_stages/labelled", labelled, manifest).info["rows"]
    manifest.rejected = out.run_stage("rejects", rejects, manifest).info["reasons"]
    if manifest.read == manifest.total_rejected:
        raise JobFailed(
            f"all {manifest.read} records of {cfg.input.path} were rejected "
            f"({manifest.rejected}): see {out.path('rejects')}"
        )
    embedded = out.run_stage("_stages/embeddings", embeddings, manifest).info
    embedding = EmbeddingInfo.model_validate(embedded["embedding"])
    trained = out.run_stage("probe", probe, manifest).info
    manifest.kept = trained["kept"]
    if trained["rare_rows"]:
        manifest.dropped = {RARE_LABEL: trained["rare_rows"]}
    metrics = {**trained["metrics"], "rare_labels": trained["rare_labels"], "model": cfg.model}
    out.write_json(out.path("metrics.json"), metrics)
    manifest.outputs = {
        "probe": out.path("probe"),
        "metrics": out.path("metrics.json"),
        "rejects": out.path("rejects"),
    }
    manifest.extra = {
        "model": cfg.model,
        "dimension": embedding.dimension,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "majority_baseline_accuracy": metrics["majority_baseline_accuracy"],
        "per_class_f1": {c: round(m["f1"], 4) for c, m in metrics["per_class"].items()},
        "rare_labels": trained["rare_labels"],
    }
    log.info(
        "held-out accuracy %.3f, macro-F1 %.3f (majority baseline %.3f)",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["majority_baseline_accuracy"],
    )
    return finish_job(manifest, out, cfg.output.keep_intermediate)


# ---------------------------------------------------------------------------------------------
# Command line: make the labelled sample, predict with a saved probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.embed.classify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-sample", help="write the labelled sample JSONL")
    m.add_argument("--out", type=Path, default=Path("data/labelled.jsonl"))
    m.add_argument("--max-per-label", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("predict", help="label texts with a saved probe")
    p.add_argument("--probe", required=True, help="the probe/ folder of a train_probe run")
    p.add_argument(
        "--model", default=None, help="embedding model to use (default: the probe's own)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "make-sample":
        counts = write_labelled_sample(args.out, args.max_per_label, args.seed)
        print(f"wrote {sum(counts.values())} labelled records to {args.out}: {counts}")
        return 0
    try:
        probe = LinearProbe.load(args.probe, expect_model=args.model)
    except ProbeModelMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    embedder = TextEmbedder(probe.embedding.model, args.device, 32, probe.embedding.max_seq_length)
    vectors = embedder.encode(args.texts)
    probe.check_model(probe.embedding.model, vectors.shape[1])
    for text, label, proba in zip(
        args.texts, probe.predict(vectors), probe.predict_proba(vectors).max(axis=1), strict=True
    ):
        print(f"{label}\t{proba:.3f}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
