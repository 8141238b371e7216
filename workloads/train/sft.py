"""Supervised fine-tuning of a causal LM on Ray Train: full, LoRA (or DoRA) and QLoRA, with
DeepSpeed ZeRO 0-3, through TRL's SFTTrainer.

    python -m workloads.train.sft make-instructions --out data/instructions.jsonl
    python ray_jobs/sft.py --config ray_jobs/configs/sft/lora-cpu.yaml        # tiny model, 2 CPU workers
    python ray_jobs/sft.py --config ray_jobs/configs/sft/zero3-cpu.yaml       # full fine-tuning, ZeRO-3
    ray job submit --working-dir . -- python ray_jobs/sft.py --config ray_jobs/configs/sft/lora-8b.yaml

Data: JSONL or Parquet records in alpaca, sharegpt or OpenAI `messages` form (`data.formatting`,
`auto` by default, per record). A Ray Data pass turns each record into messages, renders them with the
tokenizer's own chat template and keeps the assistant-token mask (assistant-only loss, on by
default), so a record that is not a usable conversation (unknown role, empty turn, no assistant
turn, ...) or leaves nothing to learn after truncation is written to `rejects/` with its reason and
counted. Before any of that, the chat template is checked: a template whose mask would be empty, or
would leave the end-of-turn token out (the model would never learn to stop), is refused.

Training: a `TorchTrainer` with `scaling.num_workers` workers runs `train_loop_per_worker` below, which reads
top to bottom: arguments (DeepSpeed JSON from `ray_jobs/configs/deepspeed/`), tokenizer, model (4-bit
for QLoRA), TRL's SFTTrainer with a PEFT config, Ray's `prepare_trainer` and report callback, resume,
train. Every `checkpoint.every_steps` the checkpoint (with each rank's ZeRO shards) and the latest
metrics go to `storage_path`; a failed worker group restarts from it (`checkpoint.max_failures`), and a
rerun of the same config, or `checkpoint.resume_from`, continues from the latest one, step counter
included.

Output:
  model/          the adapter (LoRA, DoRA, QLoRA) or the full model, plus the tokenizer: a Hugging Face
                  folder that vLLM loads (`--lora-modules name=<output>/model`, or as the model)
  merged/         with `lora.merge`: the base model with the adapter folded in
  training/       metrics.csv (loss, eval loss, learning rate, tokens/s, peak memory per logged step)
                  and loss.png
  rejects/        records that are not trainable conversations, with `reject_reason` and the raw record
  _manifest.json  read = kept (train + eval) + rejected; steps, tokens/s, peak memory per worker
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import Field, model_validator

from workloads.common.config import InputConfig, JobConfig, OutputConfig
from workloads.common.documents import list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout
from workloads.train import conversations
from workloads.train.config import (
    CheckpointingConfig,
    DeepSpeedConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    QuantizationConfig,
    TrainScalingConfig,
    check_training_config,
    load_tokenizer,
)
from workloads.train.ray_train import (
    check_cluster_fits,
    checkpoint_step,
    checkpoint_to_resume,
    export_model,
    fit,
    gather_peak_memory,
    history_summary,
    load_causal_lm,
    local_checkpoints,
    lora_config,
    make_schedule_callback,
    make_throughput_callback,
    merge_adapter,
    parameter_count,
    prepare_worker,
    read_tokenized_split,
    resolve_precision,
    run_name,
    run_training,
    storage_path,
    torch_trainer,
    training_arguments,
    write_rejects,
    write_training_curves,
)
from workloads.train.splits import is_held_out

log = logging.getLogger(__name__)

TRAIN, EVAL = "train", "eval"
TOKENIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("split", pa.string()),  # train | eval; null for rejects
        ("input_ids", pa.list_(pa.int32())),
        ("assistant_masks", pa.list_(pa.int8())),
        ("n_tokens", pa.int32()),
        ("n_trainable", pa.int32()),
        ("truncated", pa.bool_()),
        ("reject_reason", pa.string()),
        ("raw", pa.string()),
    ]
)
MASKED = ["input_ids", "assistant_masks"]  # what the trainer reads


# ---------------------------------------------------------------------------------------------
# Config


class ConversationDataConfig(InputConfig):
    path: str = Field(
        description="JSONL or Parquet conversations: a file, folder, glob or URI (s3://, gs://)."
    )
    formatting: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        default="auto",
        description="Record layout. `auto` picks per record: `messages` -> OpenAI messages, "
        "`conversations` -> sharegpt, `instruction` + `output` -> alpaca.",
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Share of records held out for the eval loss, chosen by a hash of the record "
        "id (stable across reruns). 0: no evaluation.",
    )
    max_length: int = Field(
        default=1024, ge=16, description="Tokens per sequence; longer conversations are truncated."
    )
    assistant_only_loss: bool = Field(
        default=True,
        description="Learn only the assistant's tokens (end-of-turn included); prompts are context.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several conversations into each max_length row (TRL's best-fit "
        "decreasing packing, position ids reset per conversation): fewer pad tokens.",
    )
    seed: int = Field(default=0, description="Seed of the held-out split.")


class SFTJobConfig(JobConfig):
    model: ModelConfig
    method: Literal["full", "lora", "qlora"] = Field(
        default="lora",
        description="full: every weight; lora: PEFT adapters on a frozen base (DoRA with "
        "lora.use_dora); qlora: LoRA on a 4-bit NF4 base (bitsandbytes, GPU only).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: ConversationDataConfig
    train: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    checkpoint: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    output: OutputConfig
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints: a local folder on one machine, s3:// or "
        "gs:// on a multi-node cluster (every worker writes there). Default: <output.path>/_ray_train.",
    )

    @model_validator(mode="after")
    def _combination(self) -> SFTJobConfig:
        check_training_config(
            method=self.method, optim=self.train, scaling=self.scaling, deepspeed=self.deepspeed
        )
        if self.lora.merge and self.method == "full":
            raise ValueError("lora.merge: method full has no adapter to merge")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer or self.model.name_or_path


# ---------------------------------------------------------------------------------------------
# Per-batch logic: records -> token ids and assistant masks (Ray Data calls this)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str):
    """The model's tokenizer (with `model.chat_template`), loaded once per worker process."""
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def tokenize_conversations(
    batch: pa.Table,
    *,
    model: str,
    formatting: str,
    max_length: int,
    assistant_only_loss: bool,
    eval_fraction: float,
    seed: int,
) -> pa.Table:
    """DOCUMENT_SCHEMA rows (`text` = the record as JSON) -> TOKENIZED_SCHEMA rows, one per row.
    `model` is the ModelConfig as JSON (it names the tokenizer and chat template).

    A reader reject keeps its reason; a record that is not a usable conversation gets one of
    `conversations.REJECT_REASONS`. Pure apart from the cached tokenizer load: no Ray."""
    tokenizer = _tokenizer(model)
    cols: dict[str, list[Any]] = {name: [] for name in TOKENIZED_SCHEMA.names}
    for row in batch.to_pylist():
        reason, encoded = row["reject_reason"], None
        if reason is None:
            messages = conversations.to_messages(json.loads(row["text"]), formatting)
            if isinstance(messages, str):
                reason = messages
            else:
                encoded = conversations.tokenize_conversation(
                    tokenizer,
                    messages,
                    max_length=max_length,
                    assistant_only_loss=assistant_only_loss,
                )
                if isinstance(encoded, str):
                    reason, encoded = encoded, None
        cols["id"].append(row["id"])
        cols["source"].append(row["source"])
        cols["line"].append(row["line"])
        cols["reject_reason"].append(reason)
        cols["raw"].append(None if reason is None else (row["raw"] or row["text"]))
        if encoded is None:
            for name in ("split", "input_ids", "assistant_masks", "n_tokens", "n_trainable"):
                cols[name].append(None)
            cols["truncated"].append(None)
            continue
        split = EVAL if is_held_out(row["id"], eval_fraction=eval_fraction, seed=seed) else TRAIN
        cols["split"].append(split)
        cols["input_ids"].append(encoded["input_ids"])
        cols["assistant_masks"].append(encoded["assistant_masks"])
        cols["n_tokens"].append(encoded["n_tokens"])
        cols["n_trainable"].append(encoded["n_trainable"])
        cols["truncated"].append(encoded["truncated"])
    return pa.Table.from_pydict(cols, schema=TOKENIZED_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The recipe: one Ray Train worker


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = SFTJobConfig.model_validate(config["cfg"])
    prepare_worker(cfg.scaling, cfg.deepspeed)  # DeepSpeed's CPU accelerator on CPU workers
    import datasets
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from trl import SFTConfig, SFTTrainer

    # 1. Data: the tokenized conversations. Every worker holds them all; the Trainer's distributed
    #    sampler hands each rank its share.
    train_dataset = datasets.Dataset(read_tokenized_split(config["tokenized"], TRAIN, MASKED))
    eval_dataset = None
    if config["has_eval"]:
        eval_dataset = datasets.Dataset(read_tokenized_split(config["tokenized"], EVAL, MASKED))

    # 2. Arguments before the model: under ZeRO-3 they make from_pretrained partition the weights
    #    as it loads them (deepspeed.zero.Init), so no worker ever holds the whole model.
    args = SFTConfig(
        **training_arguments(
            optim=cfg.train,
            checkpointing=cfg.checkpoint,
            deepspeed=cfg.deepspeed.load(),
            use_gpu=cfg.scaling.use_gpu,
            has_eval=eval_dataset is not None,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        ),
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        # The masks were built in the data pass (conversations.tokenize_conversation); TRL folds
        # `assistant_masks` into the labels.
        assistant_only_loss=False,
        ddp_find_unused_parameters=False,
    )

    # 3. Tokenizer and model (4-bit NF4 for QLoRA), and the adapter config.
    tokenizer = load_tokenizer(cfg.model)  # saved with every checkpoint, template included
    model = load_causal_lm(
        cfg.model,
        method=cfg.method,
        precision=resolve_precision(cfg.train.precision, cfg.scaling.use_gpu),
        quantization=cfg.quantization,
    )
    peft_config = None if cfg.method == "full" else lora_config(cfg.lora)

    # 4. TRL's trainer, reporting each checkpoint and its metrics to Ray Train.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[make_throughput_callback(), make_schedule_callback(), RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)

    # 5. Resume (Ray Train's latest checkpoint after a failure, or checkpoint.resume_from), train.
    resume = checkpoint_to_resume(cfg.checkpoint.resume_from)
    resumed_from_step = checkpoint_step(resume)
    with local_checkpoints(args.output_dir, resume):
        run_training(trainer, resume)

    # 6. Peak memory of every worker, into Ray Train's metrics (every rank reports).
    peaks = gather_peak_memory()
    ray.train.report({f"peak_memory_mb_rank{r}": v for r, v in enumerate(peaks)})
    return {
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from_step,
        "peak_memory_mb_per_worker": peaks,
        "trainable_parameters": parameter_count(trainer.model, trainable_only=True),
        "train_sequences": len(train_dataset),
    }


# ---------------------------------------------------------------------------------------------
# The job


def check_tokenizer(cfg: SFTJobConfig) -> None:
    """Refuse a chat template that would train on nothing, or never teach the model to stop."""
    try:
        tokenizer = _tokenizer(cfg.model.model_dump_json())
    except OSError as exc:
        raise JobFailed(f"model.tokenizer: cannot load {cfg.tokenizer_path!r}: {exc}") from None
    try:
        conversations.check_chat_template(
            tokenizer, assistant_only_loss=cfg.data.assistant_only_loss
        )
    except conversations.ChatTemplateError as exc:
        raise JobFailed(f"data.assistant_only_loss / model.tokenizer: {exc}") from None


def tokenize_stage(cfg: SFTJobConfig, out: OutputLayout, files, folder: str) -> dict[str, Any]:
    ds = read_documents(cfg.data, files, whole_record=True).map_batches(
        tokenize_conversations,
        batch_format="pyarrow",
        fn_kwargs=dict(
            model=cfg.model.model_dump_json(),
            formatting=cfg.data.formatting,
            max_length=cfg.data.max_length,
            assistant_only_loss=cfg.data.assistant_only_loss,
            eval_fraction=cfg.data.eval_fraction,
            seed=cfg.data.seed,
        ),
    )
    out.write_dataset(ds, folder, TOKENIZED_SCHEMA)
    table = pads.dataset(folder, format="parquet", filesystem=out.fs).to_table(
        columns=["split", "reject_reason", "n_tokens", "n_trainable", "truncated"]
    )
    good = table.filter(pc.is_null(table["reject_reason"]))
    splits = Counter(good["split"].to_pylist())
    return {
        "read": table.num_rows,
        "train": splits.get(TRAIN, 0),
        "eval": splits.get(EVAL, 0),
        "rejected": dict(Counter(r for r in table["reject_reason"].to_pylist() if r)),
        "tokens": int(pc.sum(good["n_tokens"]).as_py() or 0),
        "trainable_tokens": int(pc.sum(good["n_trainable"]).as_py() or 0),
        "truncated": int(pc.sum(pc.cast(good["truncated"], pa.int64())).as_py() or 0),
    }


def _fine_tune(cfg: SFTJobConfig, tokenized_uri: str, has_eval: bool):
    trainer = torch_trainer(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "tokenized": tokenized_uri, "has_eval": has_eval},
        # One run name per config: rerunning the job continues its run from the last checkpoint.
        name=run_name("sft", cfg),
        scaling=cfg.scaling,
        checkpointing=cfg.checkpoint,
        storage=storage_path(cfg.storage_path, cfg.output.path),
    )
    result = fit(trainer)
    value = result.return_value or {}
    return result, value


def _export(result, value: dict, folder: str, fs) -> dict:
    files = export_model(result.checkpoint, folder, fs)
    history = value.get("log_history", [])
    return {
        "files": files,
        "checkpoint": result.checkpoint.path,
        "ray_train_run": result.path,
        "global_step": value.get("global_step"),
        "resumed_from_step": value.get("resumed_from_step"),
        "trainable_parameters": value.get("trainable_parameters"),
        "peak_memory_mb_per_worker": value.get("peak_memory_mb_per_worker"),
        **history_summary(history),
        "log_history": history,
    }


def run(cfg: SFTJobConfig) -> JobManifest:
    manifest = JobManifest("sft", cfg)
    files = list_input_files(cfg.data)  # a missing path fails here, before Ray
    check_tokenizer(cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray, dashboard=True)
    check_cluster_fits(cfg.ray, cfg.scaling)

    tokenized = out.run_stage(
        "_stages/tokenized", lambda folder: tokenize_stage(cfg, out, files, folder), manifest
    )
    counts = tokenized.info
    manifest.read = counts["read"]
    manifest.kept = counts["train"] + counts["eval"]
    manifest.rejected = counts["rejected"]
    if counts["train"] == 0:
        raise JobFailed(f"no trainable conversation among {counts['read']} records: see rejects/")

    out.run_stage("rejects", lambda folder: write_rejects(out, folder, TOKENIZED_SCHEMA), manifest)
    manifest.outputs["rejects"] = out.path("rejects")

    def fine_tune(folder: str) -> dict:
        tokenized_uri = out.uri_of("_stages/tokenized")
        result, value = _fine_tune(cfg, tokenized_uri, has_eval=counts["eval"] > 0)
        return _export(result, value, folder, out.fs)

    trained = out.run_stage("model", fine_tune, manifest).info
    manifest.outputs["model"] = out.path("model")
    manifest.outputs.update(
        write_training_curves(trained["log_history"], out.path("training"), out.fs)
    )
    if cfg.method != "full" and cfg.lora.merge:
        out.run_stage(
            "merged",
            lambda folder: merge_adapter(cfg.model.name_or_path, out.path("model"), folder, out.fs),
            manifest,
        )
        manifest.outputs["merged"] = out.path("merged")
    manifest.extra = {
        "sequences": {"train": counts["train"], "eval": counts["eval"]},
        "tokens": counts["tokens"],
        "trainable_tokens": counts["trainable_tokens"],
        "truncated_sequences": counts["truncated"],
        **{k: v for k, v in trained.items() if k != "log_history"},
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)


# ---------------------------------------------------------------------------------------------
# An instruction set from the sample corpus (for the demo and the tests)

_FIRST_SENTENCE = re.compile(r"^(.{20,400}?[.!?])(\s|$)", re.DOTALL)


def instructions_from_documents(docs, *, max_words: int = 48) -> list[dict[str, Any]]:
    """Two OpenAI-style conversations per document whose answers the text itself holds: name the
    topic of an excerpt (its title), and give the opening sentence of the documentation of a topic."""
    records = []
    for i, doc in enumerate(docs):
        text = " ".join(doc.text.split())
        match = _FIRST_SENTENCE.match(text)
        if not match or not doc.title.strip():
            continue
        first = match.group(1)
        excerpt = " ".join(text.split()[:max_words])
        records.append(
            {
                "id": f"title-{i}",
                "messages": [
                    {"role": "system", "content": "You answer questions about Python."},
                    {"role": "user", "content": f"What is this text about?\n\n{excerpt}"},
                    {"role": "assistant", "content": doc.title},
                ],
            }
        )
        records.append(
            {
                "id": f"opening-{i}",
                "messages": [
                    {
                        "role": "user",
                        "content": f"How does the documentation of {doc.title} begin?",
                    },
                    {"role": "assistant", "content": first},
                ],
            }
        )
    return records


# Planted bad records: the demo shows each counted under its reason, never silently lost.
PLANTED_BAD_RECORDS = [
    {"id": "bad-no-assistant", "messages": [{"role": "user", "content": "Hello?"}]},
    {
        "id": "bad-unknown-role",
        "messages": [
            {"role": "narrator", "content": "Once upon a time"},
            {"role": "assistant", "content": "Yes."},
        ],
    },
    {
        "id": "bad-empty-turn",
        "messages": [
            {"role": "user", "content": "   "},
            {"role": "assistant", "content": "Nothing was asked."},
        ],
    },
]


def make_instructions(out: Path, *, limit: int | None = None, planted_bad: bool = True) -> dict:
    from workloads.data.sample import base_documents

    records = instructions_from_documents(base_documents())[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if planted_bad:
            for record in PLANTED_BAD_RECORDS:
                f.write(json.dumps(record) + "\n")
            f.write('{"id": "bad-json", "messages": [\n')  # a truncated line
    return {"conversations": len(records), "planted_bad": 4 if planted_bad else 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-instructions", help="conversations from the sample corpus (JSONL)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="write at most N conversations")
    p.add_argument("--no-bad", action="store_true", help="do not plant the 4 malformed records")
    args = parser.parse_args(argv)
    counts = make_instructions(args.out, limit=args.limit, planted_bad=not args.no_bad)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
