"""Embedding fine-tuning on a real local Ray: two gloo workers under TorchTrainer train
all-MiniLM-L6-v2 on pairs from the sample corpus, with bad records planted in the input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workloads.train.embedder import FinetuneEmbedderConfig, retrieval_task, run, split_pairs

pytestmark = pytest.mark.slow

PAIRS = 200
PLANTED = {
    b'{"query": "broken json", "positive": ': "malformed_json",
    b'{"query": "no positive"}': "missing_positive",
    b'{"query": "", "positive": "an empty query"}': "empty_query",
    b'{"query": "q", "positive": "p", "negative": 7}': "non_string_negative",
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    from workloads.data.sample import base_documents
    from workloads.train.embedder import pairs_from_documents

    records, _ = pairs_from_documents(base_documents(), max_words=64)
    lines = [json.dumps(r).encode() for r in records[::4][:PAIRS]]  # pydoc and stdlib alike
    for i, bad in enumerate(PLANTED):
        lines.insert(20 * (i + 1), bad)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def finetuned(ray_session, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_embedder")
    cfg = FinetuneEmbedderConfig.model_validate(
        {
            "data": {"path": str(pairs_file), "eval_fraction": 0.2, "seed": 0},
            # 160 training pairs in steps of 16 x 2 workers: 5 steps, short texts, a high rate.
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 1e-4,
                "warmup_ratio": 0.0,
                "max_seq_length": 64,
                "logging_steps": 1,
            },
            "eval": {"k": [1, 10]},
            "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
            "output": {"path": str(out)},
            "ray": {"num_cpus": 2, "data_progress_bars": False},
        }
    )
    return cfg, out, run(cfg)


def test_counts_reconcile_and_bad_records_are_rejected_with_reasons(finetuned):
    _, out, manifest = finetuned
    assert manifest.read == PAIRS + len(PLANTED)
    assert manifest.kept == PAIRS
    assert manifest.rejected == {reason: 1 for reason in PLANTED.values()}
    split = manifest.extra["split"]
    assert split["train"] + split["held_out"] == PAIRS
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert {r["reject_reason"] for r in rejects} == set(PLANTED.values())
    assert {r["raw"].encode() for r in rejects} == set(PLANTED)
    assert json.loads((out / "_manifest.json").read_text())["counts"]["reconciled"] is True


def test_training_lowers_the_held_out_loss(finetuned):
    _, _, manifest = finetuned
    before, after = manifest.extra["before"], manifest.extra["after"]
    assert {"recall@1", "recall@10", "mrr@10", "ndcg@10", "loss"} <= before.keys() & after.keys()
    # The in-batch-negatives loss on pairs no worker trained on: the model generalises.
    assert after["loss"] < before["loss"]
    # 160 training pairs, 16 per worker per step, 2 workers: 5 steps, each logged.
    assert manifest.extra["steps"] == 5
    assert [e["step"] for e in manifest.extra["train_loss"]] == [1, 2, 3, 4, 5]


def test_the_model_folder_loads_and_reproduces_the_reported_metrics(finetuned, pairs_file):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    from workloads.train.embedder import read_pairs

    cfg, out, manifest = finetuned
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert model.get_embedding_dimension() == 384
    assert model.max_seq_length == 64
    pairs, _, _ = read_pairs(str(pairs_file))
    _, held_out = split_pairs(pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.seed)
    queries, corpus, relevant = retrieval_task(held_out)
    scores = InformationRetrievalEvaluator(
        queries, corpus, relevant, mrr_at_k=[10], precision_recall_at_k=[10], name="check"
    )(model)
    # The saved model is the one that was evaluated after training, not the starting point.
    assert scores["check_cosine_mrr@10"] == pytest.approx(
        manifest.extra["after"]["mrr@10"], abs=1e-3
    )
    assert scores["check_cosine_mrr@10"] != pytest.approx(
        manifest.extra["before"]["mrr@10"], abs=1e-6
    )


def test_the_model_is_reported_to_ray_train_as_a_checkpoint(finetuned):
    _, out, manifest = finetuned
    run_dir = Path(manifest.extra["ray_train_run"])
    assert run_dir.is_relative_to(out / "_ray_train")
    checkpoints = list(run_dir.glob("checkpoint_*/checkpoint/model.safetensors"))
    assert len(checkpoints) == 1  # CheckpointConfig(num_to_keep=1): the final one
    assert "eval_heldout_cosine_mrr@10" in manifest.extra["ray_train_metrics"]


def test_a_rerun_with_the_same_config_reuses_the_model(finetuned):
    cfg, out, manifest = finetuned
    again = run(cfg)
    assert [s.resumed for s in again.stages if s.name == "model"] == [True]
    assert again.extra["after"] == manifest.extra["after"]
