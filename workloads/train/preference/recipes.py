"""The three preference recipes, one `train_loop_per_worker` each, run by Ray Train's TorchTrainer.

Each reads top to bottom: the worker's data (every worker holds the prepared pairs; the Trainer's
distributed sampler hands each rank its share), the TRL arguments (the DeepSpeed JSON before the model,
so ZeRO-3 builds it partitioned), tokenizer and model, TRL's trainer with a PEFT config, the
held-out evaluation and Ray's report callback, then `_train`: Ray's `prepare_trainer`, resume,
train, per-worker peak memory.

The reference model: with LoRA it is the base with the adapters switched off (TRL does this when
it is given a PEFT model and no `ref_model`), so no second copy is loaded. With full fine-tuning TRL
loads a frozen copy, unless the Ray Data reference pass already scored every pair
(`preference.reference: precomputed`), in which case no reference model exists during training.
"""

from __future__ import annotations

import json
from typing import Any

from workloads.train.config import load_tokenizer
from workloads.train.preference.config import PreferenceJobConfig
from workloads.train.preference.logprobs import REF_COLUMNS, make_heldout_callback
from workloads.train.ray_train import (
    checkpoint_step,
    checkpoint_to_resume,
    gather_peak_memory,
    load_causal_lm,
    local_checkpoints,
    lora_config,
    make_schedule_callback,
    make_throughput_callback,
    parameter_count,
    prepare_worker,
    read_tokenized_split,
    resolve_precision,
    run_training,
    training_arguments,
)

TRAIN, EVAL = "train", "eval"
PAIR_COLUMNS = ["id", "kind", "prompt", "chosen", "rejected", "completion", "label"]


# ---------------------------------------------------------------------------------------------
# The recipes


def dpo_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """DPO (sigmoid loss, or IPO) with TRL's DPOTrainer."""
    cfg = PreferenceJobConfig.model_validate(config["cfg"])
    prepare_worker(cfg.scaling, cfg.deepspeed)
    from trl import DPOConfig

    # 1. Data: pairs, with the reference log-probs when the Ray Data pass computed them.
    train_rows, eval_rows = _read(config, TRAIN), _read(config, EVAL)
    train_dataset = _pairs_dataset(train_rows)

    # 2. Arguments (DeepSpeed first), 3. tokenizer and model, 4. the trainer.
    args = DPOConfig(
        **_arguments(cfg),
        beta=cfg.preference.beta,
        loss_type=[cfg.preference.loss_type],
        precompute_ref_log_probs=cfg.precomputes_reference,
    )
    tokenizer, model, peft_config = _model(cfg)
    heldout = _heldout(cfg, eval_rows)
    trainer = _dpo_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(heldout),
    )
    return _train(cfg, trainer, heldout, len(train_dataset))


def kto_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """KTO with TRL's KTOTrainer: each pair gives a desirable and an undesirable completion;
    unpaired records give one, labelled."""
    cfg = PreferenceJobConfig.model_validate(config["cfg"])
    prepare_worker(cfg.scaling, cfg.deepspeed)
    from trl import KTOConfig, KTOTrainer

    train_rows, eval_rows = _read(config, TRAIN), _read(config, EVAL)
    train_dataset = _kto_dataset(train_rows, cfg.train.seed)
    # Held-out unpaired completions have no partner to compare with: TRL's own evaluation scores
    # them (eval_kl, eval_rewards/*); held-out pairs go to the pair evaluation, as for DPO.
    eval_unpaired = [r for r in eval_rows if r["kind"] == "unpaired"]
    eval_dataset = _kto_dataset(eval_unpaired, cfg.train.seed) if eval_unpaired else None

    args = KTOConfig(
        **_arguments(cfg, has_eval=eval_dataset is not None),
        beta=cfg.preference.beta,
        desirable_weight=cfg.preference.desirable_weight,
        undesirable_weight=cfg.preference.undesirable_weight,
    )
    tokenizer, model, peft_config = _model(cfg)
    heldout = _heldout(cfg, eval_rows)
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(heldout),
    )
    return _train(cfg, trainer, heldout, len(train_dataset))


def orpo_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """ORPO with TRL's ORPOTrainer (trl.experimental): no reference model in the loss."""
    cfg = PreferenceJobConfig.model_validate(config["cfg"])
    prepare_worker(cfg.scaling, cfg.deepspeed)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    train_rows, eval_rows = _read(config, TRAIN), _read(config, EVAL)
    train_dataset = _pairs_dataset(train_rows, with_reference=False)

    args = ORPOConfig(**_arguments(cfg), beta=cfg.preference.beta)
    tokenizer, model, peft_config = _model(cfg)
    heldout = _heldout(cfg, eval_rows)
    trainer = ORPOTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(heldout),
    )
    return _train(cfg, trainer, heldout, len(train_dataset))


TRAIN_LOOPS = {"dpo": dpo_train_loop, "kto": kto_train_loop, "orpo": orpo_train_loop}


# ---------------------------------------------------------------------------------------------
# The steps the recipes share


def _read(config: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """One split of the prepared records, from the reference stage (which adds the log-probs)
    when the reference pass scored that split."""
    if config["reference"] and split in config["reference_splits"]:
        return read_tokenized_split(
            config["reference"], split, [*PAIR_COLUMNS, *REF_COLUMNS]
        ).to_pylist()
    return read_tokenized_split(config["pairs"], split, PAIR_COLUMNS).to_pylist()


def _pairs_dataset(rows: list[dict], with_reference: bool = True):
    """TRL's conversational preference format: prompt messages, one-message chosen and rejected."""
    import datasets

    records = []
    for r in rows:
        record = {k: json.loads(r[k]) for k in ("prompt", "chosen", "rejected")}
        if with_reference and REF_COLUMNS[0] in r:
            record.update({c: r[c] for c in REF_COLUMNS})
        records.append(record)
    return datasets.Dataset.from_list(records)


def _kto_dataset(rows: list[dict], seed: int):
    """TRL's conversational unpaired format: prompt, completion, label (desirable or not), in a
    seeded random order.

    TRL's KTO reads its data in order (its KL estimate pairs each completion with its neighbour's
    prompt within a batch), so the order matters twice: a pair's two completions must not sit side
    by side, or the "mismatched" KL pairs would share a prompt and the estimate would collapse into
    the implied reward; and data stored grouped by source would train one source at a time."""
    import random

    import datasets

    examples = []
    for r in rows:
        prompt = json.loads(r["prompt"])
        if r["kind"] == "pair":
            examples.append(
                {"prompt": prompt, "completion": json.loads(r["chosen"]), "label": True}
            )
            examples.append(
                {"prompt": prompt, "completion": json.loads(r["rejected"]), "label": False}
            )
        else:
            examples.append(
                {"prompt": prompt, "completion": json.loads(r["completion"]), "label": r["label"]}
            )
    random.Random(seed).shuffle(examples)
    return datasets.Dataset.from_list(examples)


def _arguments(cfg: PreferenceJobConfig, has_eval: bool = False) -> dict[str, Any]:
    return dict(
        **training_arguments(
            optim=cfg.train,
            checkpointing=cfg.checkpoint,
            deepspeed=cfg.deepspeed.load(),
            use_gpu=cfg.scaling.use_gpu,
            has_eval=has_eval,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        ),
        max_length=cfg.data.max_length,
        ddp_find_unused_parameters=False,
        # TRL builds the reference copy itself (full weights, online reference) from the model's
        # name: it needs the same permission as the policy.
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _model(cfg: PreferenceJobConfig):
    tokenizer = load_tokenizer(cfg.model)  # saved with every checkpoint, template included
    model = load_causal_lm(
        cfg.model,
        method=cfg.method,
        precision=resolve_precision(cfg.train.precision, cfg.scaling.use_gpu),
        quantization=cfg.quantization,
    )
    peft_config = None if cfg.method == "full" else lora_config(cfg.lora)
    return tokenizer, model, peft_config


def _heldout(cfg: PreferenceJobConfig, eval_rows: list[dict]):
    """The held-out evaluation on the held-out pairs (unpaired KTO records have no partner)."""
    return make_heldout_callback(
        [r for r in eval_rows if r["kind"] == "pair"],
        beta=cfg.preference.beta,
        batch_size=cfg.train.batch_size,
        max_length=cfg.data.max_length,
        eval_steps=cfg.train.eval_steps or cfg.checkpoint.every_steps,
    )


def _callbacks(heldout) -> list:
    from ray.train.huggingface.transformers import RayTrainReportCallback

    # Ray's callback last: at each save it reports the log history the others have added to.
    return [make_throughput_callback(), make_schedule_callback(), heldout, RayTrainReportCallback()]


def _dpo_trainer_class():
    from trl import DPOTrainer

    class DPOTrainerWithReferencePass(DPOTrainer):
        """TRL's DPOTrainer, except that when the dataset already holds the reference log-probs
        (the job's Ray Data pass computed them) it uses them instead of computing them again."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if all(c in dataset.column_names for c in REF_COLUMNS):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return DPOTrainerWithReferencePass


def _train(cfg: PreferenceJobConfig, trainer, heldout, n_train: int) -> dict[str, Any]:
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer

    heldout.attach(trainer)
    trainer = prepare_trainer(trainer)
    resume = checkpoint_to_resume(cfg.checkpoint.resume_from)
    resumed_from_step = checkpoint_step(resume)
    with local_checkpoints(trainer.args.output_dir, resume):
        run_training(trainer, resume)
    peaks = gather_peak_memory()
    ray.train.report({f"peak_memory_mb_rank{r}": v for r, v in enumerate(peaks)})
    return {
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from_step,
        "peak_memory_mb_per_worker": peaks,
        "trainable_parameters": parameter_count(trainer.model, trainable_only=True),
        "train_examples": n_train,
    }
