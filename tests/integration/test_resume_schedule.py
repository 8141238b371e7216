"""Resuming on the Hugging Face Trainer that every training job uses (no Ray needed): a run seeded
from another run's checkpoint trains at its own learning rate (PBT's exploit step depends on it),
and a run resumed at its last step trains no further."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _train(
    tiny_model: Path,
    out: Path,
    lr: float,
    max_steps: int,
    resume: str | None = None,
    rows: int = 32,
):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from workloads.train.ray_train import make_schedule_callback, run_training

    torch.manual_seed(0)
    rows = [[1, 5 + i, 9, 30 + i, 2] for i in range(rows)]
    data = datasets.Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=data,
        callbacks=[make_schedule_callback()],
    )
    run_training(trainer, resume)
    return {
        h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h
    }


@pytest.mark.parametrize("new_lr", [1.0e-3, 5.0e-2])
def test_a_seeded_run_trains_at_its_own_learning_rate(tiny_model, tmp_path, new_lr):
    first = _train(tiny_model, tmp_path / "a", lr=1.0e-2, max_steps=8)
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4

    seeded = _train(tiny_model, tmp_path / "b", lr=new_lr, max_steps=8, resume=str(checkpoint))
    # The log history carries the checkpoint's first 4 steps; training continued at step 5.
    assert {s: lr for s, lr in seeded.items() if s <= 4} == {s: first[s] for s in range(1, 5)}
    after = {s: lr for s, lr in seeded.items() if s > 4}
    assert sorted(after) == [5, 6, 7, 8]
    for step, lr in after.items():
        # The same linear decay (warmup 2, 8 steps), scaled to the new peak.
        assert lr == pytest.approx(first[step] * new_lr / 1.0e-2, rel=1e-6)


def test_resuming_with_the_same_arguments_changes_nothing(tiny_model, tmp_path):
    first = _train(tiny_model, tmp_path / "a", lr=1.0e-2, max_steps=8)
    again = _train(
        tiny_model,
        tmp_path / "b",
        lr=1.0e-2,
        max_steps=8,
        resume=str(tmp_path / "a" / "checkpoint-4"),
    )
    assert again == first


def test_resuming_at_max_steps_mid_epoch_trains_nothing(tiny_model, tmp_path):
    # 64 rows at batch 4: step 8 is mid-epoch, where the Trainer alone would run a step 9.
    first = _train(tiny_model, tmp_path / "a", lr=1.0e-2, max_steps=8, rows=64)
    again = _train(
        tiny_model,
        tmp_path / "b",
        lr=1.0e-2,
        max_steps=8,
        resume=str(tmp_path / "a" / "checkpoint-8"),
        rows=64,
    )
    assert again == first and max(again) == 8
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("checkpoint-*"))
