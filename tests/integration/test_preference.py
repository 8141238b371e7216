"""Preference optimisation on a real local Ray: TRL's DPO, KTO and ORPO trainers under TorchTrainer
with two gloo workers and real DeepSpeed, on the grounded-vs-scrambled set built from the sample
corpus with malformed records planted; the Ray Data reference pass; a killed worker."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.worker_faults import run_and_kill_a_worker
from workloads.common.manifest import JobFailed
from workloads.train.preference.config import PreferenceJobConfig
from workloads.train.preference.job import PLANTED_REASONS, make_pairs, run

pytestmark = pytest.mark.slow

RECORDS = 240


@pytest.fixture(scope="module")
def preferences(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preference-data") / "preferences.jsonl"
    counts = make_pairs(path, limit=RECORDS)
    assert counts == {"records": RECORDS, "planted_bad": sum(PLANTED_REASONS.values())}
    return path


def preference_config(tiny_model: Path, data: Path, out: Path, **sections) -> PreferenceJobConfig:
    raw = {
        "model": {"name_or_path": str(tiny_model)},
        "algorithm": "dpo",
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(data), "eval_fraction": 0.1, "max_length": 256},
        "preference": {"beta": 0.5},
        "train": {
            "max_steps": 16,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant_with_warmup",
            "warmup_ratio": 0.0,
            "logging_steps": 4,
            "eval_steps": 8,
        },
        "deepspeed": {"config": "zero2"},
        "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        "checkpoint": {"every_steps": 8, "num_to_keep": 2, "max_failures": 0},
        "output": {"path": str(out)},
        "storage_path": str(out.parent / f"{out.name}-ray-train"),
        "ray": {"num_cpus": 2, "data_progress_bars": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return PreferenceJobConfig.model_validate(raw)


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "training" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# DPO with LoRA under ZeRO-2, the reference computed online (the base with adapters off)


@pytest.fixture(scope="module")
def dpo_run(ray_session, tiny_model, preferences, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "lora-zero2"
    cfg = preference_config(tiny_model, preferences, out)
    return cfg, out, run(cfg)


def test_counts_reconcile_and_planted_records_are_rejected(dpo_run):
    _, out, manifest = dpo_run
    counts = json.loads((out / "_manifest.json").read_text())["counts"]
    assert counts["reconciled"]
    assert counts["read"] == RECORDS + sum(PLANTED_REASONS.values())
    assert counts["rejected"] == PLANTED_REASONS
    assert counts["kept"] == RECORDS
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert Counter(r["reject_reason"] for r in rejects) == Counter(PLANTED_REASONS)
    assert all(r["raw"] for r in rejects)
    pairs = manifest.extra["pairs"]
    assert pairs["train"] + pairs["eval"] == RECORDS and pairs["eval"] > 10


def test_dpo_raises_held_out_reward_accuracy_above_chance(dpo_run):
    _, _, manifest = dpo_run
    extra = manifest.extra
    before, after = extra["heldout_before"], extra["heldout_after"]
    assert before["step"] == 0 and after["step"] == 16 == extra["global_step"]
    # At step 0 the policy is its reference: every implicit reward is 0, a tie, counted half.
    assert before["heldout/reward_accuracy"] == 0.5 and before["heldout/kl"] == 0.0
    assert after["heldout/reward_accuracy"] > 0.7
    assert after["heldout/reward_margin"] > 0.5
    assert after["heldout/logps_chosen"] - after["heldout/logps_rejected"] > (
        before["heldout/logps_chosen"] - before["heldout/logps_rejected"]
    )
    assert 0 < after["heldout/kl"] < 5  # it moved, and not without bound
    assert extra["last_loss"] < 0.69  # below log 2, DPO's loss at a zero margin
    assert 0 < extra["trainable_parameters"] < 200_000


def test_metrics_reach_ray_train_the_csv_and_the_png(dpo_run):
    _, out, manifest = dpo_run
    reported = manifest.extra["reported_metrics"]
    for key in ("heldout/reward_accuracy", "heldout/reward_margin", "heldout/kl"):
        assert key in reported
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in reported
    rows = _metrics(out)
    heldout = [r for r in rows if r["heldout/reward_accuracy"]]
    assert [int(r["step"]) for r in heldout] == [0, 8, 16]
    assert all(r["heldout/kl"] for r in heldout)
    assert any(r["rewards/accuracies"] for r in rows)
    assert (out / "training" / "preference.png").read_bytes()[:4] == b"\x89PNG"


def test_the_adapter_loads_and_prefers_grounded_answers(dpo_run, tiny_model):
    """Reload the exported adapter with PEFT and recompute one held-out reward by hand."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workloads.train.preference.logprobs import (
        collate_pairs,
        completion_logps,
        tokenize_pair,
    )

    _, out, _ = dpo_run
    model_dir = out / "model"
    assert (model_dir / "adapter_config.json").exists()
    assert not (model_dir / "optimizer.pt").exists()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), model_dir
    ).eval()
    pairs = pq.read_table(out / "_stages" / "pairs").to_pylist()
    held_out = [p for p in pairs if p["split"] == "eval"]
    wins = 0
    for p in held_out:
        ids = tokenize_pair(
            tokenizer, *(json.loads(p[k]) for k in ("prompt", "chosen", "rejected"))
        )
        batch = collate_pairs([ids], pad_token_id=tokenizer.pad_token_id, max_length=256)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            policy = completion_logps(
                model(**inputs).logits, batch["input_ids"], batch["completion_mask"]
            )
            with model.disable_adapter():
                ref = completion_logps(
                    model(**inputs).logits, batch["input_ids"], batch["completion_mask"]
                )
        margin = (policy - ref)[0] - (policy - ref)[1]
        wins += int(margin > 0)
    assert wins / len(held_out) > 0.7


def test_rerun_resumes_every_stage(dpo_run):
    cfg, _, _ = dpo_run
    again = run(cfg)
    assert [s.resumed for s in again.stages] == [True, True, True]
    assert again.extra["global_step"] == 16


# ---------------------------------------------------------------------------------------------
# The Ray Data reference pass, full fine-tuning under ZeRO-3


@pytest.fixture(scope="module")
def precomputed_run(ray_session, tiny_model, preferences, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "full-zero3-precomputed"
    cfg = preference_config(
        tiny_model,
        preferences,
        out,
        method="full",
        deepspeed={"config": "zero3"},
        preference={"beta": 0.5, "reference": "precomputed"},
        train={"max_steps": 6, "learning_rate": 1e-4, "eval_steps": 6},
        checkpoint={"every_steps": 6},
    )
    return cfg, out, run(cfg)


def test_reference_pass_scores_every_pair_once(precomputed_run):
    _, out, manifest = precomputed_run
    reference = pq.read_table(out / "_stages" / "reference").to_pylist()
    assert len(reference) == RECORDS == manifest.extra["reference_pass"]["pairs"]
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in reference)
    stages = [s.name for s in manifest.stages]
    assert stages.index("_stages/reference") < stages.index("model")


def test_precomputed_reference_trains_without_a_reference_model(precomputed_run):
    _, _, manifest = precomputed_run
    extra = manifest.extra
    assert extra["global_step"] == 6
    # Full fine-tuning with the reference pass: no reference model exists in the workers, so the
    # held-out rewards come from the precomputed log-probs and the vocabulary-wide KL is not there.
    assert "heldout/kl" not in extra["heldout_after"]
    # At step 0 the policy is the model the pass scored: the rewards are 0 up to rounding.
    assert abs(extra["heldout_before"]["heldout/reward_margin"]) < 1e-3
    assert (
        extra["heldout_after"]["heldout/reward_margin"]
        > extra["heldout_before"]["heldout/reward_margin"]
    )


# ---------------------------------------------------------------------------------------------
# KTO and ORPO


@pytest.fixture(scope="module")
def kto_data(preferences, tmp_path_factory) -> Path:
    """The pairs plus unpaired records from other documents (so no held-out answer is trained on
    under another id): KTO takes both, each pair as one desirable and one undesirable completion."""
    from workloads.data.sample import base_documents
    from workloads.train.preference.job import preference_records

    path = tmp_path_factory.mktemp("kto-data") / "kto.jsonl"
    unpaired = []
    for record in preference_records(base_documents())[RECORDS : RECORDS + 60]:
        if isinstance(record.get("chosen"), str):  # the standard layout
            good = len(unpaired) % 2 == 0
            completion = record["chosen"] if good else record["rejected"]
            unpaired.append(
                {"id": f"u-{record['id']}", "prompt": record["prompt"], "completion": completion}
                | {"label": good}
            )
    lines = preferences.read_text().splitlines() + [json.dumps(u) for u in unpaired]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kto_learns_from_pairs_and_unpaired_completions(
    ray_session, tiny_model, kto_data, tmp_path
):
    out = tmp_path / "kto"
    cfg = preference_config(
        tiny_model,
        kto_data,
        out,
        algorithm="kto",
        preference={"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    )
    manifest = run(cfg)
    extra = manifest.extra
    assert extra["unpaired"]["desirable"] > 10 and extra["unpaired"]["undesirable"] > 10
    assert extra["train_examples"] > 2 * extra["pairs"]["train"]  # pairs count twice, plus unpaired
    assert extra["heldout_after"]["heldout/reward_accuracy"] > 0.6
    rows = _metrics(out)
    assert any(r["kl"] for r in rows)  # KTO's own KL estimate, per logged step
    assert json.loads((out / "_manifest.json").read_text())["counts"]["reconciled"]
    shutil.rmtree(cfg.storage_path, ignore_errors=True)


def test_full_weight_orpo_needs_no_reference_model(ray_session, tiny_model, preferences, tmp_path):
    """ORPO has no reference in its loss; with full weights no reference model exists at all, so the
    held-out rewards come from a reference pass over the held-out pairs only."""
    out = tmp_path / "orpo"
    cfg = preference_config(
        tiny_model,
        preferences,
        out,
        algorithm="orpo",
        method="full",
        preference={"beta": 0.5},
        train={"learning_rate": 1e-4},
    )
    manifest = run(cfg)
    extra = manifest.extra
    assert extra["global_step"] == 16 and extra["train_examples"] == extra["pairs"]["train"]
    assert extra["reference_pass"]["pairs"] == extra["pairs"]["eval"]
    assert extra["last_loss"] < extra["first_loss"]
    rows = _metrics(out)
    assert any(r["log_odds_ratio"] for r in rows) and any(r["nll_loss"] for r in rows)
    assert extra["heldout_after"]["heldout/reward_margin"] > 0
    shutil.rmtree(cfg.storage_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reliability: the shared Ray Train plumbing restarts the worker group from the last checkpoint


def test_killed_worker_resumes_from_the_last_checkpoint(
    ray_session, tiny_model, preferences, tmp_path
):
    out = tmp_path / "killed"
    cfg = preference_config(
        tiny_model,
        preferences,
        out,
        preference={"beta": 0.5, "reference": "precomputed"},
        train={"max_steps": 30, "eval_steps": 30},
        checkpoint={"every_steps": 5, "max_failures": 1},
    )
    storage = Path(cfg.storage_path)
    killed, outcome = run_and_kill_a_worker(lambda: run(cfg), storage, "preference-dpo-*")
    assert killed is not None, "training finished (or never checkpointed) before the kill"
    assert "error" not in outcome, outcome.get("error")
    extra = outcome["result"].extra
    assert extra["global_step"] == 30
    assert 5 <= extra["resumed_from_step"] < 30
    assert extra["heldout_after"]["heldout/reward_accuracy"] > 0.6
    shutil.rmtree(storage, ignore_errors=True)


def test_reference_actors_that_starve_ray_data_fail_fast(
    ray_session, tiny_model, preferences, tmp_path
):
    """Two reference actors of one CPU on a 2-CPU Ray would leave Ray Data's read tasks no CPU, and
    the pass would wait forever: refused before any stage runs."""
    cfg = preference_config(
        tiny_model,
        preferences,
        tmp_path / "starved",
        preference={"beta": 0.5, "reference": "precomputed"},
        reference_pass={"concurrency": 2},
    )
    with pytest.raises(JobFailed, match="reference_pass.num_cpus or reference_pass.concurrency"):
        run(cfg)
    assert not (tmp_path / "starved" / "_stages").exists()
