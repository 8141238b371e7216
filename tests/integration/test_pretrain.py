"""Pretraining from scratch on a real local Ray: two gloo workers under ZeRO-2 train a tiny Llama on
the sample corpus (malformed records included), measured against a unigram model."""

from __future__ import annotations

import json

import pytest

from workloads.train.pretrain import PretrainJobConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(ray_session, tiny_model, sample_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = PretrainJobConfig.model_validate(
        {
            "tokenizer": str(tiny_model),
            "data": {
                "path": str(sample_corpus / "corpus"),
                "eval_fraction": 0.1,
                "block_size": 128,
            },
            "train": {
                "max_steps": 90,
                "batch_size": 8,
                "learning_rate": 3e-3,
                "warmup_ratio": 0.05,
                "weight_decay": 0.1,
                "logging_steps": 10,
                "eval_steps": 45,
            },
            "deepspeed": {"config": "zero2"},
            "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
            "checkpoint": {"every_steps": 45, "max_failures": 0},
            "output": {"path": str(out / "out")},
            "storage_path": str(out / "ray-train"),
            "ray": {"num_cpus": 2, "data_progress_bars": False},
        }
    )
    return out / "out", run(cfg)


def test_counts_reconcile_with_the_readers_rejects(pretrained):
    out, manifest = pretrained
    counts = json.loads((out / "_manifest.json").read_text())["counts"]
    assert counts["reconciled"]
    # build() plants malformed records of each kind the reader knows (see test_sample_corpus).
    assert {"malformed_json", "invalid_utf8", "missing_text"} <= set(counts["rejected"])
    docs = manifest.extra["documents"]
    assert docs["train"] + docs["eval"] == counts["kept"] and docs["eval"] > 0


def test_held_out_perplexity_falls_below_the_unigram_baseline(pretrained):
    _, manifest = pretrained
    ppl = manifest.extra["perplexity"]
    # Random weights are about as surprised as a uniform guess over the 4k vocabulary.
    assert ppl["before_training"] > 1000
    assert ppl["after_training"] < ppl["unigram_baseline"]
    assert ppl["ratio_to_unigram"] < 0.9


def test_the_model_folder_is_a_causal_lm_that_writes(pretrained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = pretrained
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template  # servable as a chat model once fine-tuned
    prompt = tokenizer("The list", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert ids.shape[1] > prompt["input_ids"].shape[1]
    assert (out / "training" / "loss.png").exists()
