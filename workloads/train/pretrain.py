"""Pretrain a small causal LM from scratch on Ray Train (DeepSpeed ZeRO 0-3), and measure it against a
unigram model on held-out text.

    python ray_jobs/pretrain.py --config ray_jobs/configs/pretrain/tiny-cpu.yaml     # the demo's LM
    ray job submit --working-dir . -- python ray_jobs/pretrain.py --config ray_jobs/configs/pretrain/cluster.yaml

Data: JSONL or Parquet documents (the curated sample corpus by default), read with the shared reader,
so malformed records are rejects with a reason. A Ray Data pass tokenizes each document with the
project's byte-level BPE (`workloads.train.tiny`), appends the end-of-text token and assigns it to the
train or held-out split by a hash of its id (a document never straddles the two). Each worker then
concatenates its split and cuts it into `data.block_size` blocks, the GPT-2 recipe.

The model is a Llama (grouped-query attention, RoPE, SwiGLU) of the shape in `architecture`, built
from its config under the DeepSpeed config (under ZeRO-3 the weights are partitioned as they are
created). Training is TRL's SFTTrainer on plain token blocks (every token is a target), with
checkpoints, resume and metrics exactly as in `workloads.train.sft`.

Scale: each worker holds its split's token blocks in memory (4 bytes a token, about 250M tokens
per GB): "small-scale pretraining", up to a few billion tokens on GPU nodes. Larger corpora would
stream blocks through Ray Data instead; that is not built.

The yardstick: held-out perplexity exp(eval loss) before training (about the vocabulary size for
random weights), after training, and of an add-one-smoothed unigram model fitted on the training
tokens and scored on the same held-out predictions. A model that learnt nothing beyond token
frequencies would match the unigram model; the manifest records the ratio.

Output:
  model/          a Hugging Face Llama folder with the tokenizer and chat template: the embedded
                  default LM for SFT (`ray_jobs/configs/sft/lora-cpu.yaml`) and for serving
  training/       metrics.csv and loss.png
  rejects/        documents that could not be read, with `reject_reason`
  _manifest.json  read = kept + dropped (no tokens) + rejected; perplexities and the baseline
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import Field, field_validator, model_validator

from workloads.common.config import InputConfig, JobConfig, OutputConfig, StrictModel
from workloads.common.documents import list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout
from workloads.train.config import (
    CheckpointingConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    TrainScalingConfig,
    check_training_config,
    local_path_absolute,
)
from workloads.train.ray_train import (
    check_cluster_fits,
    checkpoint_to_resume,
    export_model,
    fit,
    gather_peak_memory,
    history_summary,
    load_causal_lm,
    local_checkpoints,
    make_schedule_callback,
    make_throughput_callback,
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

TRAIN, EVAL = "train", "eval"
NO_TOKENS = "no_tokens"
TOKENIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("reject_reason", pa.string()),
        ("raw", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Config


class TextDataConfig(InputConfig):
    eval_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="Share of documents held out for perplexity."
    )
    block_size: int = Field(
        default=256, ge=16, description="Tokens per training sequence (the context length)."
    )
    seed: int = Field(default=0, description="Seed of the held-out split.")


class ArchitectureConfig(StrictModel):
    """A Llama shape. The defaults are the tiny model's (about 1M parameters with a 4k vocabulary);
    head_dim = hidden_size / num_attention_heads must be one vLLM's CPU attention takes (64)."""

    hidden_size: int = Field(default=128, ge=32)
    intermediate_size: int = Field(default=256, ge=32)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=2, ge=1)
    num_key_value_heads: int = Field(default=1, ge=1)
    max_position_embeddings: int = Field(default=1024, ge=64)
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _shape(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class PretrainJobConfig(JobConfig):
    tokenizer: str = Field(
        default="models/tiny-llama",
        description="Folder (or hub id) of the tokenizer; `python -m workloads.train.tiny` builds "
        "the project's byte-level BPE with its chat template.",
    )
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    attn_implementation: str = Field(default="sdpa", description="sdpa, eager or flash_attention_2")
    data: TextDataConfig
    train: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    checkpoint: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    output: OutputConfig
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints (local folder, s3:// or gs://). "
        "Default: <output.path>/_ray_train.",
    )

    @field_validator("tokenizer")
    @classmethod
    def _local_folder_absolute(cls, value: str) -> str:
        return local_path_absolute(value)

    @model_validator(mode="after")
    def _combination(self) -> PretrainJobConfig:
        check_training_config(
            method="full", optim=self.train, scaling=self.scaling, deepspeed=self.deepspeed
        )
        if self.data.block_size > self.architecture.max_position_embeddings:
            raise ValueError(
                f"data.block_size={self.data.block_size} exceeds "
                f"architecture.max_position_embeddings={self.architecture.max_position_embeddings}"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Per-batch logic and the yardstick (no Ray)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def end_of_text_id(tokenizer) -> int:
    """The document separator: `<|endoftext|>` when the vocabulary has it, else the EOS token."""
    from workloads.train.tiny import EOS

    token_id = tokenizer.convert_tokens_to_ids(EOS)
    return (
        token_id
        if token_id is not None and token_id != tokenizer.unk_token_id
        else tokenizer.eos_token_id
    )


def tokenize_documents(
    batch: pa.Table, *, tokenizer_path: str, eval_fraction: float, seed: int
) -> pa.Table:
    """DOCUMENT_SCHEMA rows -> one TOKENIZED_SCHEMA row each: the document's ids plus end-of-text,
    and its split. Reader rejects keep their reason; a text with no tokens is `no_tokens`."""
    tokenizer = _tokenizer(tokenizer_path)
    eot = end_of_text_id(tokenizer)
    rows = batch.to_pylist()
    texts = [r["text"] for r in rows if r["reject_reason"] is None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    cols: dict[str, list[Any]] = {name: [] for name in TOKENIZED_SCHEMA.names}
    for row in rows:
        ids = next(encoded) if row["reject_reason"] is None else None
        reason = row["reject_reason"] or (NO_TOKENS if not ids else None)
        cols["id"].append(row["id"])
        cols["source"].append(row["source"])
        cols["line"].append(row["line"])
        cols["reject_reason"].append(reason)
        cols["raw"].append(row["raw"] if reason else None)
        if reason:
            cols["split"].append(None)
            cols["input_ids"].append(None)
            cols["n_tokens"].append(None)
            continue
        split = EVAL if is_held_out(row["id"], eval_fraction=eval_fraction, seed=seed) else TRAIN
        cols["split"].append(split)
        cols["input_ids"].append([*ids, eot])
        cols["n_tokens"].append(len(ids) + 1)
    return pa.Table.from_pydict(cols, schema=TOKENIZED_SCHEMA)


def token_blocks(documents: pa.ChunkedArray | pa.Array, block_size: int) -> np.ndarray:
    """Concatenate the documents' ids and cut them into (n, block_size) blocks; the tail that does
    not fill a block is dropped (GPT-2's `group_texts`)."""
    flat = pc.list_flatten(documents).to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(flat) // block_size
    return flat[: n * block_size].reshape(n, block_size)


def blocks_table(documents: pa.ChunkedArray | pa.Array, block_size: int) -> pa.Table:
    """`token_blocks` as an Arrow table of int32 lists: 4 bytes a token, no Python objects, so a
    worker holds about 250M tokens per GB."""
    ids = token_blocks(documents, block_size).astype(np.int32)
    offsets = np.arange(0, ids.size + 1, block_size, dtype=np.int32)
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids.reshape(-1))})


def unigram_perplexity(train_counts: np.ndarray, eval_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (fitted on `train_counts`) on the tokens the
    LM predicts in `eval_blocks`: every token but the first of each block."""
    targets = eval_blocks[:, 1:].reshape(-1)
    probs = (train_counts.astype(np.float64) + 1) / (train_counts.sum() + vocab_size)
    return float(math.exp(-np.log(probs[targets]).mean()))


# ---------------------------------------------------------------------------------------------
# The recipe: one Ray Train worker


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = PretrainJobConfig.model_validate(config["cfg"])
    prepare_worker(cfg.scaling, cfg.deepspeed)
    import datasets
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoTokenizer, GenerationConfig
    from trl import SFTConfig, SFTTrainer

    from workloads.train.tiny import llama_config

    # 1. Data: each split's documents, concatenated and cut into blocks.
    def blocks(split: str) -> datasets.Dataset:
        table = read_tokenized_split(config["tokenized"], split, ["input_ids"])
        return datasets.Dataset(blocks_table(table["input_ids"], cfg.data.block_size))

    train_dataset, eval_dataset = blocks(TRAIN), blocks(EVAL)

    # 2. Arguments before the model (under ZeRO-3 the weights are created partitioned).
    args = SFTConfig(
        **training_arguments(
            optim=cfg.train,
            checkpointing=cfg.checkpoint,
            deepspeed=cfg.deepspeed.load(),
            use_gpu=cfg.scaling.use_gpu,
            has_eval=True,
        ),
        max_length=cfg.data.block_size,
        eval_on_start=True,  # the random-weights perplexity: the "before" of the yardstick
        ddp_find_unused_parameters=False,
    )

    # 3. Tokenizer and a freshly initialised Llama of the configured shape.
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    model_config = llama_config(
        cfg.architecture,
        tokenizer,
        max_position_embeddings=cfg.architecture.max_position_embeddings,
        tie_word_embeddings=cfg.architecture.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch_seed(cfg.train.seed)
    model = load_causal_lm(
        ModelConfig(name_or_path=cfg.tokenizer, attn_implementation=cfg.attn_implementation),
        method="full",
        precision=resolve_precision(cfg.train.precision, cfg.scaling.use_gpu),
        from_scratch_config=model_config,
    )
    with contextlib.suppress(OSError):  # stop at the end of a turn or a text, as the folder says
        model.generation_config = GenerationConfig.from_pretrained(cfg.tokenizer)

    # 4. TRL's trainer on plain blocks: no mask columns, so every token is a target.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[make_throughput_callback(), make_schedule_callback(), RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)

    # 5. Resume and train.
    resume = checkpoint_to_resume(cfg.checkpoint.resume_from)
    with local_checkpoints(args.output_dir, resume):
        run_training(trainer, resume)

    peaks = gather_peak_memory()
    ray.train.report({f"peak_memory_mb_rank{r}": v for r, v in enumerate(peaks)})
    return {
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "peak_memory_mb_per_worker": peaks,
        "parameters": parameter_count(trainer.model),
        "blocks": {TRAIN: len(train_dataset), EVAL: len(eval_dataset)},
    }


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The job


def _tokenize(cfg: PretrainJobConfig, out: OutputLayout, files, folder: str) -> dict[str, Any]:
    ds = read_documents(cfg.data, files).map_batches(
        tokenize_documents,
        batch_format="pyarrow",
        fn_kwargs=dict(
            tokenizer_path=cfg.tokenizer, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.seed
        ),
    )
    out.write_dataset(ds, folder, TOKENIZED_SCHEMA)
    dataset = pads.dataset(folder, format="parquet", filesystem=out.fs)
    table = dataset.to_table(columns=["split", "reject_reason", "n_tokens"])
    reasons = Counter(r for r in table["reject_reason"].to_pylist() if r)
    dropped = {NO_TOKENS: reasons.pop(NO_TOKENS, 0)}
    good = table.filter(pc.is_null(table["reject_reason"]))
    splits = Counter(good["split"].to_pylist())

    # The unigram yardstick: token frequencies of the training split, scored on the held-out
    # blocks exactly as the model will be.
    vocab_size = len(_tokenizer(cfg.tokenizer))
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in dataset.to_batches(columns=["input_ids"], filter=pc.field("split") == TRAIN):
        ids = pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False)
        counts += np.bincount(ids, minlength=vocab_size)
    eval_ids = dataset.to_table(columns=["input_ids"], filter=pc.field("split") == EVAL)
    eval_blocks = token_blocks(eval_ids["input_ids"], cfg.data.block_size)
    if len(eval_blocks) == 0:
        raise JobFailed(
            f"the held-out documents make no block of data.block_size={cfg.data.block_size} "
            "tokens: raise data.eval_fraction"
        )
    return {
        "read": table.num_rows,
        "documents": {TRAIN: splits.get(TRAIN, 0), EVAL: splits.get(EVAL, 0)},
        "dropped": {k: v for k, v in dropped.items() if v},
        "rejected": dict(reasons),
        "tokens": {TRAIN: int(counts.sum()), EVAL: int(eval_blocks.size)},
        "unigram_perplexity": unigram_perplexity(counts, eval_blocks, vocab_size),
    }


def _pretrain(cfg: PretrainJobConfig, out: OutputLayout, folder: str) -> dict[str, Any]:
    trainer = torch_trainer(
        train_loop_per_worker,
        {
            "cfg": cfg.model_dump(mode="json"),
            "tokenized": out.uri_of("_stages/tokenized"),
        },
        name=run_name("pretrain", cfg),
        scaling=cfg.scaling,
        checkpointing=cfg.checkpoint,
        storage=storage_path(cfg.storage_path, cfg.output.path),
    )
    result = fit(trainer)
    value = result.return_value or {}
    files = export_model(result.checkpoint, folder, out.fs)
    history = value.get("log_history", [])
    return {
        "files": files,
        "checkpoint": result.checkpoint.path,
        "global_step": value.get("global_step"),
        "parameters": value.get("parameters"),
        "blocks": value.get("blocks"),
        "peak_memory_mb_per_worker": value.get("peak_memory_mb_per_worker"),
        **history_summary(history),
        "log_history": history,
    }


def run(cfg: PretrainJobConfig) -> JobManifest:
    manifest = JobManifest("pretrain", cfg)
    files = list_input_files(cfg.data)
    try:
        _tokenizer(cfg.tokenizer)
    except OSError as exc:
        raise JobFailed(
            f"tokenizer: cannot load {cfg.tokenizer!r} ({exc}); build it with "
            "`python -m workloads.train.tiny --out models/tiny-llama`"
        ) from None
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray, dashboard=True)
    check_cluster_fits(cfg.ray, cfg.scaling)

    counts = out.run_stage(
        "_stages/tokenized", lambda folder: _tokenize(cfg, out, files, folder), manifest
    ).info
    manifest.read = counts["read"]
    manifest.kept = sum(counts["documents"].values())
    manifest.dropped = counts["dropped"]
    manifest.rejected = counts["rejected"]

    out.run_stage("rejects", lambda folder: write_rejects(out, folder, TOKENIZED_SCHEMA), manifest)
    manifest.outputs["rejects"] = out.path("rejects")

    trained = out.run_stage("model", lambda folder: _pretrain(cfg, out, folder), manifest).info
    manifest.outputs["model"] = out.path("model")
    manifest.outputs.update(
        write_training_curves(trained["log_history"], out.path("training"), out.fs)
    )
    evals = trained["eval_loss"]
    before, after = math.exp(evals[0]["eval_loss"]), math.exp(evals[-1]["eval_loss"])
    unigram = counts["unigram_perplexity"]
    manifest.extra = {
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "perplexity": {
            "before_training": round(before, 2),
            "after_training": round(after, 2),
            "unigram_baseline": round(unigram, 2),
            "ratio_to_unigram": round(after / unigram, 4),
        },
        **{k: v for k, v in trained.items() if k != "log_history"},
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)
