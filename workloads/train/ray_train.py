"""The Ray Train plumbing the causal-LM jobs share (SFT, pretraining, preference, tuning sweeps).

Driver side: `torch_trainer(...)` builds the `TorchTrainer` (scaling, storage, checkpoints kept,
restarts on failure) from the typed config sections, `check_cluster_fits` refuses a run that a
fixed-size Ray could never place, and `export_model` / `merge_adapter` turn the last checkpoint into
the Hugging Face folders vLLM loads. `write_training_curves` writes `metrics.csv` and `loss.png`.

Worker side, inside each job's `train_loop_per_worker`: `training_arguments(...)` gives the
Hugging Face / TRL arguments that every recipe shares (DeepSpeed JSON, precision, the checkpoint and
evaluation cadence), `load_causal_lm` loads the base model (4-bit for QLoRA), `lora_config` builds the
PEFT config, `checkpoint_to_resume` finds what to continue from, and `ThroughputCallback` adds
tokens per second and peak memory to every logged step, which `RayTrainReportCallback` reports.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import posixpath
import resource
import shutil
import tempfile
import time
from typing import Any

import pyarrow.fs as pafs

from workloads.common.config import RayConfig, digest
from workloads.common.manifest import JobFailed
from workloads.common.ray_runtime import on_fixed_size_ray
from workloads.train.config import (
    CheckpointingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    QuantizationConfig,
    TrainScalingConfig,
)

log = logging.getLogger(__name__)

# What a Hugging Face Trainer checkpoint holds besides the model: needed to resume, not to serve.
TRAINING_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "training_args.bin",
    "latest",
    "zero_to_fp32.py",
    "zero_to_torch.py",
)
TRAINING_STATE_PREFIXES = ("global_step", "rng_state")
# RayTrainReportCallback stores the Trainer's checkpoint folder under this name.
HF_CHECKPOINT = "checkpoint"


# ---------------------------------------------------------------------------------------------
# Driver side


def storage_path(storage: str | None, output_path: str) -> str:
    """Where Ray Train keeps checkpoints: `storage` or `<output>/_ray_train`, absolute if local."""
    path = storage or posixpath.join(output_path.rstrip("/"), "_ray_train")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def run_name(job: str, cfg) -> str:
    """`<job>-<hash>` of what the training depends on. Checkpoint cadence, restarts and storage are
    left out, so changing them (or where output goes) still resumes the same Ray Train run; the
    scaling stays in, since ZeRO checkpoints are sharded per worker."""
    payload = cfg.model_dump(mode="json", exclude={"ray", "output", "checkpoint", "storage_path"})
    return f"{job}-{digest(payload)}"


def worker_group_resources(scaling: TrainScalingConfig) -> dict[str, float]:
    """Ray resources the whole worker group asks for: Ray Train's per-worker default (1 CPU, plus
    1 GPU with use_gpu) or `resources_per_worker`, times the workers."""
    per_worker = dict(scaling.resources_per_worker or {"CPU": 1})
    if scaling.use_gpu:
        per_worker.setdefault("GPU", 1)
    return {k: v * scaling.num_workers for k, v in per_worker.items()}


def check_cluster_fits(ray_cfg: RayConfig, scaling: TrainScalingConfig) -> None:
    """On a local Ray of fixed size, workers that do not fit would wait forever: fail instead.

    On an autoscaling cluster the autoscaler may still add nodes, so only a fixed-size Ray is
    checked; there Ray Train would wait for resources that never come."""
    import ray

    if not on_fixed_size_ray(ray_cfg):
        return
    have = ray.cluster_resources()
    for resource_name, need in worker_group_resources(scaling).items():
        if have.get(resource_name, 0) < need:
            raise JobFailed(
                f"scaling.num_workers={scaling.num_workers} workers need {need:g} {resource_name} "
                f"in all, and this Ray has {have.get(resource_name, 0):g}: lower "
                "scaling.num_workers or scaling.resources_per_worker"
            )


def torch_trainer(
    train_loop_per_worker,
    train_loop_config: dict[str, Any],
    *,
    name: str,
    scaling: TrainScalingConfig,
    checkpointing: CheckpointingConfig,
    storage: str,
    datasets: dict[str, Any] | None = None,
    callbacks: list | None = None,
    keep_best: tuple[str, str] | None = None,
    keep_all: bool = False,
):
    """A TorchTrainer whose run is named `name` under `storage`.

    The same name and storage make a rerun of the same config continue the same Ray Train run
    from its latest checkpoint (Ray Train v2 restores the run's checkpoint manager), so a job that
    `ray job submit` or a RayJob retries picks up where it died. `callbacks` are Ray Train
    callbacks (a tuning sweep passes Tune's `TuneReportCallback`); `keep_best` = (metric, "min" or
    "max") keeps the best `checkpoint.num_to_keep` checkpoints by that metric, not the latest;
    `keep_all` keeps every checkpoint (a PBT sweep may seed another trial from any of them)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker,
            accelerator_type=scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=None if keep_all else checkpointing.num_to_keep,
                checkpoint_score_attribute=keep_best[0] if keep_best else None,
                checkpoint_score_order=keep_best[1] if keep_best else "max",
            ),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=checkpointing.max_failures),
            # Ray Train routes workers' print() to its logger, even a print into a StringIO that
            # the caller captures: `datasets` fingerprints TRL's map functions with dill, which
            # disassembles them into a captured stdout, and each worker then logged pages of
            # bytecode. Prints still reach the driver through Ray's stdout forwarding.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=datasets,
        # Every worker sees the whole (small, tokenized) dataset; the Trainer's distributed
        # sampler gives each rank its share, as it would without Ray.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def fit(trainer):
    """`trainer.fit()`, with training errors raised as JobFailed naming the cause."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise JobFailed(f"training failed: {exc}") from exc
    if result.error is not None:
        raise JobFailed(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise JobFailed("training reported no checkpoint")
    return result


def _is_training_state(name: str) -> bool:
    return name in TRAINING_STATE or name.startswith(TRAINING_STATE_PREFIXES)


def export_model(checkpoint, folder: str, fs: pafs.FileSystem) -> list[str]:
    """Copy the servable part of a reported checkpoint (the adapter or the full model, the
    tokenizer and the generation config) into `folder`; optimizer and DeepSpeed state stay behind.
    Returns the file names copied."""
    src_fs, root = checkpoint.filesystem, posixpath.join(checkpoint.path, HF_CHECKPOINT)
    infos = src_fs.get_file_info(pafs.FileSelector(root, recursive=False))
    fs.create_dir(folder, recursive=True)
    copied = []
    for info in infos:
        name = posixpath.basename(info.path)
        if _is_training_state(name) or info.type != pafs.FileType.File:
            continue
        pafs.copy_files(info.path, posixpath.join(folder, name), src_fs, fs)
        copied.append(name)
    if not any(n.endswith(".safetensors") for n in copied):
        raise JobFailed(f"checkpoint {checkpoint.path} holds no .safetensors weights")
    return sorted(copied)


def merge_adapter(
    base: str, adapter: str, folder: str, fs: pafs.FileSystem, *, use_gpu: bool = False
) -> None:
    """Fold a LoRA adapter into its base model and write a plain Hugging Face model to `folder`.

    Runs as one Ray task (the base model is loaded once, in its own process: in bf16 on GPU
    clusters, where the merged folder is then bf16 too, in fp32 on CPU), so the driver never holds
    the weights. On a GPU cluster the task takes a GPU node's memory, not a GPU."""
    import ray

    @ray.remote(num_cpus=1)
    def merge() -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory() as local_adapter, tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(adapter, local_adapter, fs, pafs.LocalFileSystem())
            dtype = torch.bfloat16 if use_gpu else torch.float32
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            merged = PeftModel.from_pretrained(model, local_adapter).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(local_adapter).save_pretrained(tmp)
            for name in ("generation_config.json",):
                if os.path.exists(os.path.join(base, name)):
                    pafs.copy_files(os.path.join(base, name), os.path.join(tmp, name))
            fs.create_dir(folder, recursive=True)
            pafs.copy_files(tmp, folder, pafs.LocalFileSystem(), fs)

    ray.get(merge.remote())


def loss_history(history: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training log rows, evaluation rows) from a Trainer's `log_history`."""
    train = [e for e in history if "loss" in e and "step" in e]
    evals = [e for e in history if "eval_loss" in e and "step" in e]
    return train, evals


def history_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest keeps of a Trainer's `log_history`: mean tokens/s over the logged windows,
    the first and last training loss, and every evaluation's loss by step."""
    train, evals = loss_history(history)
    tps = [e["tokens_per_second"] for e in train if "tokens_per_second" in e]
    return {
        "tokens_per_second": round(sum(tps) / len(tps), 1) if tps else None,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "eval_loss": [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in evals],
    }


# The columns of `rejects/` in every job that tokenizes into a `_stages/tokenized` Parquet stage.
REJECT_COLUMNS = ["id", "source", "line", "reject_reason", "raw"]


def select_rejects(batch):
    """The rejected rows of a tokenized batch, with the columns `rejects/` keeps."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_valid(batch["reject_reason"])).select(REJECT_COLUMNS)


def write_rejects(out, folder: str, schema, stage: str = "_stages/tokenized") -> dict:
    """`rejects/` from the job's prepared-records `stage` (a typed empty table when there are none)."""
    ds = out.read_dataset(stage).map_batches(select_rejects, batch_format="pyarrow")
    out.write_dataset(ds, folder, schema.empty_table().select(REJECT_COLUMNS).schema)
    return {}


CSV_FIELDS = (
    "step",
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "peak_memory_mb",
    "memory_mb",
)
# What `loss.png` shows by default: one panel, training and evaluation loss.
LOSS_PANELS = (("cross-entropy (nats/token)", ("loss", "eval_loss")),)


def write_training_curves(
    history: list[dict[str, Any]],
    folder: str,
    fs: pafs.FileSystem,
    *,
    fields: tuple[str, ...] = CSV_FIELDS,
    panels: tuple[tuple[str, tuple[str, ...]], ...] = LOSS_PANELS,
    png_name: str = "loss.png",
) -> dict:
    """`metrics.csv` (one row per logged step, the `fields` that step logged) and a PNG with one
    panel per `(title, metric names)` in `panels`, each metric against the optimizer step."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in history:
        if "step" not in entry or not any(k in entry for k in fields if k != "step"):
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        row.update({k: entry[k] for k in fields if k in entry})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(posixpath.join(folder, "metrics.csv")) as f:
        f.write(text.getvalue().encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(s, r[key]) for s, r in sorted(rows.items()) if r.get(key) is not None]
            if points:
                style = "o-" if len(points) < 12 else "-"
                ax.plot(*zip(*points, strict=True), style, label=key, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    with fs.open_output_stream(posixpath.join(folder, png_name)) as f:
        f.write(png.getvalue())
    return {
        "metrics_csv": posixpath.join(folder, "metrics.csv"),
        png_name.removesuffix(".png") + "_png": posixpath.join(folder, png_name),
    }


# ---------------------------------------------------------------------------------------------
# Worker side


def prepare_worker(scaling: TrainScalingConfig, deepspeed) -> None:
    """First thing in every `train_loop_per_worker`, before torch or DeepSpeed is imported there.

    On CPU workers DeepSpeed must pick its CPU accelerator (gloo collectives, plus a shared-memory
    op it JIT-builds once into ~/.cache/torch_extensions), which it does on import; and the heap
    threshold (`limit_heap_retention`) only holds for allocations made after it is set."""
    if scaling.use_gpu:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if deepspeed.releases_host_memory():
        limit_heap_retention()


def read_tokenized_split(uri: str, split: str, columns: list[str]):
    """One split (`split` column) of a tokenized Parquet stage, local or in object storage, as an
    Arrow table with `columns`.

    Workers read the Parquet directly rather than through Ray Data: a fine-tuning set is small
    next to the model, and Ray Data read tasks would need CPUs that the training workers already
    hold (on a 2-CPU machine they would wait forever)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from workloads.common.storage import resolve_filesystem

    fs, path = resolve_filesystem(uri)
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    return dataset.to_table(columns=columns, filter=pc.field("split") == split)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    if precision != "auto":
        return precision
    import torch

    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def training_arguments(
    *,
    optim: OptimConfig,
    checkpointing: CheckpointingConfig,
    deepspeed: dict[str, Any] | None,
    use_gpu: bool,
    has_eval: bool,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `transformers.TrainingArguments` (or a TRL config built on it).

    Checkpoints go to a temporary folder per worker: with DeepSpeed each rank writes its own
    optimizer shards there, and Ray Train merges every rank's files into one reported checkpoint."""
    precision = resolve_precision(optim.precision, use_gpu)
    eval_steps = optim.eval_steps or checkpointing.every_steps
    if deepspeed is not None:
        # Join DeepSpeed's communicator to the process group Ray Train set up, now: under ZeRO-3
        # the model is built partitioned (zero.Init) before the Trainer would do it, and an
        # uninitialised communicator would size the batch for a world of one.
        import deepspeed as ds

        ds.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    return dict(
        output_dir=tempfile.mkdtemp(prefix="ray-train-hf-"),
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps or -1,
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.lr_scheduler,
        warmup_steps=optim.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        optim=optim.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not use_gpu,  # else accelerate sees no CPU process group and skips DDP
        deepspeed=deepspeed,
        gradient_checkpointing=gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen (LoRA) bases and with DDP.
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=optim.logging_steps,
        save_strategy="steps",
        save_steps=checkpointing.every_steps,
        save_total_limit=1,  # locally; Ray Train keeps checkpoint.num_to_keep in storage
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        include_num_input_tokens_seen="non_padding",  # global tokens, restored on resume
        seed=optim.seed,
        report_to="none",
        disable_tqdm=True,
    )


def load_causal_lm(
    model_cfg: ModelConfig,
    *,
    method: str,
    precision: str,
    quantization: QuantizationConfig | None = None,
    from_scratch_config: Any = None,
):
    """The base model: 4-bit NF4 for QLoRA (bitsandbytes, GPU only), else full precision weights
    in the training dtype. With ZeRO-3, call this after the TrainingArguments exist: transformers
    then builds the model under `deepspeed.zero.Init`, so no rank ever holds all the weights."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if from_scratch_config is not None:
        return AutoModelForCausalLM.from_config(
            from_scratch_config,
            dtype=torch.float32,
            attn_implementation=model_cfg.attn_implementation,
        )
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        q = quantization or QuantizationConfig()
        compute = getattr(torch, q.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            # Stored in the compute dtype so ZeRO-3 can shard the 4-bit weights like any other.
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing
        )
    return model


def lora_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def checkpoint_to_resume(resume_from: str | None) -> str | None:
    """A local folder holding the Hugging Face checkpoint to continue from, or None.

    Ray Train's own latest checkpoint (after a worker failure, or a rerun of the same run) wins
    over `checkpoint.resume_from`, which only seeds a fresh run."""
    import ray.train
    from ray.train import Checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = Checkpoint(resume_from)
    if checkpoint is None:
        return None
    local = checkpoint.to_directory(tempfile.mkdtemp(prefix="resume-"))
    path = os.path.join(local, HF_CHECKPOINT)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"checkpoint {checkpoint.path} has no {HF_CHECKPOINT}/ folder: is it a checkpoint_* "
            "folder written by this project's training jobs?"
        )
    return path


def run_training(trainer, resume: str | None) -> None:
    """`trainer.train(resume_from_checkpoint=resume)`, except when `resume` is already at
    `max_steps`: then the checkpoint's state is loaded and nothing trains.

    A run restarted after its last checkpoint (a worker lost while gathering the final metrics, a
    tuning trial paused by its scheduler at the end) resumes at max_steps; the Trainer (5.19),
    when that step falls mid-epoch, skips the epoch's trained batches and runs one more step
    before it checks the limit, so the run would end at max_steps + 1 with a new checkpoint.
    The checkpoint's metrics are reported again instead (`_report_again`)."""
    from transformers import TrainerState

    step = checkpoint_step(resume)
    if step is not None and 0 < trainer.args.max_steps <= step:
        log.info(
            "checkpoint %s is at step %d of %d: nothing left to train",
            resume,
            step,
            trainer.args.max_steps,
        )
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        _report_again(trainer.state, resume)
        return
    trainer.train(resume_from_checkpoint=resume)


def _report_again(state, hf_checkpoint: str) -> None:
    """Report a finished run's last checkpoint and metrics once more, as RayTrainReportCallback
    did when it was saved: whoever restarted the run (Tune restoring a trial it had not yet seen
    finish) then gets its final result instead of nothing. Outside Ray Train, nothing."""
    import ray.train
    from ray.train import Checkpoint

    try:
        rank = ray.train.get_context().get_world_rank()
    except RuntimeError:  # a plain Trainer, not under Ray Train
        return
    metrics: dict[str, Any] = {}
    for entry in state.log_history:
        metrics.update(entry)
    # Marked: the rows are the checkpoint's, not trained under this run's config (a PBT trial
    # exploited at its last step reports its donor's learning rate here).
    metrics["reported_again"] = True
    folder = os.path.dirname(hf_checkpoint)  # the downloaded Ray Train checkpoint
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)


def checkpoint_step(hf_checkpoint: str | None) -> int | None:
    """The optimizer step a Hugging Face checkpoint folder was saved at (None: no checkpoint)."""
    if hf_checkpoint is None:
        return None
    state = os.path.join(hf_checkpoint, "trainer_state.json")
    if not os.path.exists(state):
        return None
    with open(state) as f:
        return json.load(f)["global_step"]


@contextlib.contextmanager
def local_checkpoints(output_dir: str, resumed: str | None):
    """Delete this worker's local Trainer checkpoints (and the downloaded one it resumed from) when
    training ends, failed or not: what matters was reported to Ray Train's storage already."""
    try:
        yield
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        if resumed is not None:
            shutil.rmtree(os.path.dirname(resumed), ignore_errors=True)


def limit_heap_retention(threshold: int = 128 * 1024) -> None:
    """Make glibc hand freed tensor memory back to the OS on CPU workers.

    By default glibc raises its mmap threshold after each large free, so the 1-32 MB tensors that
    ZeRO creates and frees every step (gathered layers, gradient buckets) come from a heap that
    only grows: measured at 49M parameters, ~600 MB of freed-but-held heap per worker under ZeRO-3,
    which made it peak above ZeRO-0. A fixed mmap and trim threshold keeps the resident set at
    what is live, at a price: every large tensor is then a fresh mmap with fresh page faults, which
    halved CPU training throughput in bench/sft_bench.py. `deepspeed.release_host_memory` decides;
    by default only ZeRO-3 pays it. Call first thing in a worker, before loading."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD


def memory_mb() -> float:
    """This process's memory now: CUDA allocated on GPU, resident set size on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb() -> float:
    """This process's peak memory: CUDA allocator peak on GPU, peak resident set size on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_throughput_callback():
    """A TrainerCallback that adds `tokens_per_second` (all workers together, non-padding tokens),
    `peak_memory_mb` and `memory_mb` (this worker: peak and current) to each logged step, so they
    reach Ray Train's metrics."""
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self._time, self._tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.log_history or "loss" not in state.log_history[-1]:
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            extra = {
                "peak_memory_mb": round(peak_memory_mb(), 1),
                "memory_mb": round(memory_mb(), 1),
            }
            if now > self._time and tokens > self._tokens:
                extra["tokens_per_second"] = round((tokens - self._tokens) / (now - self._time), 1)
            self._time, self._tokens = now, tokens
            # log_history[-1] is what RayTrainReportCallback reports at the next save.
            state.log_history[-1].update(extra)
            if logs is not None:
                logs.update(extra)

    return ThroughputCallback()


def make_schedule_callback():
    """A TrainerCallback that, when training resumes from a checkpoint, puts this run's learning
    rate back in place of the checkpoint's.

    The Trainer restores the optimizer and the LR scheduler from the checkpoint, their peak
    learning rate included, so a run seeded from another's checkpoint with a different
    `train.learning_rate` (PBT's exploit step, or continuing a run at a lower rate) would silently
    train at the old one. The weights, the optimizer's moments and the step still come from the
    checkpoint, and the warmup and decay shape is this run's (the scheduler's lambdas are rebuilt
    from its arguments). Resuming a run with unchanged arguments computes the same values again."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import TrainerCallback

    class ScheduleCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            if state.global_step == 0 or optimizer is None or lr_scheduler is None:
                return
            scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate's wrapper
            if not isinstance(scheduler, LambdaLR):
                if any(lr != args.learning_rate for lr in getattr(scheduler, "base_lrs", [])):
                    log.warning(
                        "resumed with a %s scheduler, which keeps the checkpoint's learning rate",
                        type(scheduler).__name__,
                    )
                return
            groups = optimizer.param_groups
            scheduler.base_lrs = [args.learning_rate] * len(groups)
            for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
                group["initial_lr"] = args.learning_rate
                group["lr"] = args.learning_rate * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]

    return ScheduleCallback()


def parameter_count(model, trainable_only: bool = False) -> int:
    """Parameters of `model`, counting ZeRO-3-partitioned ones at their full size (`ds_numel`)."""
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )


def gather_peak_memory() -> list[float]:
    """Every worker's peak memory in MB, by rank (a collective: every worker must call it)."""
    import torch.distributed as dist

    mine = round(peak_memory_mb(), 1)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [float(v) for v in everyone]
