"""The linear probe without Ray: labels and rejects, the split, train/eval on separable vectors, the
saved probe (and its refusal of another model's embeddings), config errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from workloads.common.config import ConfigError, load_config
from workloads.common.documents import NON_STRING_TEXT, parse_jsonl_lines
from workloads.embed.classify import (
    INVALID_LABEL,
    LANGUAGE_REFERENCE,
    MISSING_LABEL,
    LinearProbe,
    ProbeClassifierConfig,
    ProbeModelMismatch,
    TrainProbeConfig,
    attach_labels,
    doc_family,
    fit_classifier,
    stratified_split,
    train_and_evaluate,
)
from workloads.embed.schema import EmbeddingInfo

REQUIRED = ["input.path=/in.jsonl", "output.path=/out"]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _info(dim: int) -> EmbeddingInfo:
    return EmbeddingInfo(model=MODEL, dimension=dim, normalized=True, precision="fp32")


def _separable(n_per: dict[str, int], dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, labels, rows = [], [], []
    for c, (label, n) in enumerate(n_per.items()):
        center = np.zeros(dim)
        center[c] = 3.0
        for i in range(n):
            ids.append(f"{label}-{i:03d}")
            labels.append(label)
            rows.append(center + rng.normal(size=dim) * 0.5)
    x = np.array(rows, np.float32)
    return ids, labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def _cfg(**overrides) -> TrainProbeConfig:
    return TrainProbeConfig.model_validate(
        {"input": {"path": "/in.jsonl"}, "output": {"path": "/out"}, **overrides}
    )


def test_probe_learns_separable_embeddings_and_beats_the_majority_baseline():
    ids, labels, x = _separable({"a": 80, "b": 50, "c": 30})
    probe, info = train_and_evaluate(ids, labels, x, _cfg(), _info(64))
    m = info["metrics"]
    assert m["accuracy"] >= 0.95 and m["macro_f1"] >= 0.95
    assert m["majority_label"] == "a"
    assert m["majority_baseline_accuracy"] == pytest.approx(16 / 32)  # 20% of each label held out
    assert m["held_out_rows"] == 32 and m["train_rows"] == 128
    assert {c: v["support"] for c, v in m["per_class"].items()} == {"a": 16, "b": 10, "c": 6}
    assert info["kept"] == 160 and info["rare_rows"] == 0


def test_labels_with_one_example_are_dropped_and_counted():
    ids, labels, x = _separable({"a": 30, "b": 30, "lonely": 1})
    probe, info = train_and_evaluate(ids, labels, x, _cfg(), _info(64))
    assert info["rare_labels"] == {"lonely": 1}
    assert info["rare_rows"] == 1 and info["kept"] == 60
    assert probe.labels == ["a", "b"]


def test_split_is_stratified_seeded_and_independent_of_row_order():
    ids, labels, _ = _separable({"a": 50, "b": 25, "c": 25})
    train, test = stratified_split(ids, labels, 0.2, seed=3)
    assert len(test) == 20 and not set(train) & set(test) and len(train) + len(test) == 100
    assert sorted(labels[i] for i in test).count("a") == 10  # each label keeps its share
    order = np.random.default_rng(0).permutation(100)
    shuffled_ids = [ids[i] for i in order]
    train2, test2 = stratified_split(shuffled_ids, [labels[i] for i in order], 0.2, seed=3)
    assert {shuffled_ids[i] for i in test2} == {ids[i] for i in test}
    _, other = stratified_split(ids, labels, 0.2, seed=4)
    assert set(other) != set(test)


def test_too_small_a_held_out_split_fails_naming_the_key():
    ids, labels, _ = _separable({"a": 4, "b": 4, "c": 4})
    with pytest.raises(Exception, match="test_fraction"):
        stratified_split(ids, labels, 0.1, seed=0)


@pytest.mark.parametrize("kind", ["logistic_regression", "sgd"])
def test_saved_probe_predicts_like_the_estimator(tmp_path, kind):
    ids, labels, x = _separable({"a": 40, "b": 40, "c": 40})
    est, got_kind = fit_classifier(x, labels, ProbeClassifierConfig(kind=kind), seed=0)
    probe = LinearProbe.from_estimator(est, _info(64), got_kind)
    probe.save(pafs.LocalFileSystem(), str(tmp_path / "probe"))
    assert not list((tmp_path / "probe").glob("*.pkl"))
    loaded = LinearProbe.load(str(tmp_path / "probe"), expect_model=MODEL)
    assert loaded.predict(x) == list(est.predict(x))
    np.testing.assert_allclose(loaded.predict_proba(x), est.predict_proba(x), atol=1e-4)
    meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert meta["labels"] == ["a", "b", "c"] and meta["embedding"]["model"] == MODEL


def test_binary_probe_predicts_like_the_estimator(tmp_path):
    ids, labels, x = _separable({"no": 40, "yes": 40})
    est, kind = fit_classifier(x, labels, ProbeClassifierConfig(), seed=0)
    probe = LinearProbe.from_estimator(est, _info(64), kind)
    assert probe.coef.shape == (1, 64)
    assert probe.predict(x) == list(est.predict(x))
    np.testing.assert_allclose(probe.predict_proba(x), est.predict_proba(x), atol=1e-4)


def test_probe_refuses_another_models_embeddings(tmp_path):
    ids, labels, x = _separable({"a": 20, "b": 20})
    probe, _ = train_and_evaluate(ids, labels, x, _cfg(), _info(64))
    probe.save(pafs.LocalFileSystem(), str(tmp_path / "probe"))
    with pytest.raises(ProbeModelMismatch, match="all-MiniLM-L6-v2"):
        LinearProbe.load(str(tmp_path / "probe"), expect_model="BAAI/bge-base-en-v1.5")
    with pytest.raises(ValueError, match="64"):
        probe.predict(np.zeros((2, 768), np.float32))


def test_records_without_a_usable_label_are_rejected_with_a_reason():
    lines = [
        json.dumps({"id": "ok", "text": "fine", "label": "x"}),
        json.dumps({"id": "int", "text": "fine", "label": 3}),
        json.dumps({"id": "none", "text": "no label here"}),
        json.dumps({"id": "blank", "text": "blank label", "label": "  "}),
        json.dumps({"id": "list", "text": "list label", "label": ["a", "b"]}),
        json.dumps({"id": "num", "text": 5, "label": "x"}),
    ]
    batch = parse_jsonl_lines(
        [line.encode() for line in lines],
        source="f.jsonl",
        id_prefix="f.jsonl",
        first_line=1,
        text_field="text",
        id_field="id",
    )
    out = attach_labels(batch, label_field="label")
    assert out["label"].to_pylist() == ["x", "3", None, None, None, None]
    assert out["reject_reason"].to_pylist() == [
        None,
        None,
        MISSING_LABEL,
        MISSING_LABEL,
        INVALID_LABEL,
        NON_STRING_TEXT,
    ]
    assert json.loads(out["raw"][2].as_py())["text"] == "no label here"  # the record is kept


def test_doc_families_come_from_the_source():
    assert doc_family("pydoc:debugger") == LANGUAGE_REFERENCE
    assert doc_family("stdlib:email.mime.text") == "internet"
    assert doc_family("stdlib:tkinter.ttk") == "gui"
    assert doc_family("stdlib:json.decoder") is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("test_fraction=1.5", "test_fraction"),
        ("classifier.kind=svm", "classifier.kind"),
        ("min_label_count=1", "min_label_count"),
        ("embed.devic=cuda", "embed.device"),  # the did-you-mean names the real key
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainProbeConfig, None, [*REQUIRED, override])
