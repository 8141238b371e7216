"""Config sections every causal-LM training job shares: the model, the adapter, the optimiser, the
DeepSpeed config, the Ray Train scaling and the checkpoints. `workloads.train.sft`,
`workloads.train.pretrain` and the preference and tuning jobs put them together in their own
`JobConfig`; each section validates itself, and the cross-section rules (QLoRA needs a GPU, fp16
needs a GPU, parameter offload needs ZeRO-3) live in `check_training_config`, which those
configs call from a model validator, so a bad combination fails before Ray starts, naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from workloads.common.config import StrictModel

# The checkout (or image folder) that holds ray_jobs/: config files name paths relative to it.
REPO_ROOT = Path(__file__).resolve().parents[2]
# The four ZeRO configs under ray_jobs/configs/deepspeed/ (stage 0 is plain data parallelism).
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "ray_jobs" / "configs" / "deepspeed"


def local_path_absolute(value: str | None) -> str | None:
    """An existing local folder or file as an absolute path; anything else (a hub id, a URI) as is.

    Ray Train runs each worker in its run's own directory, not the driver's, so a relative
    `models/tiny-llama` would be read there as a hub id."""
    if value is None or "://" in value or not Path(value).exists():
        return value
    return str(Path(value).resolve())


def project_file(path: str) -> Path:
    """`path` as given when it exists (absolute, or relative to the working directory), else
    relative to the project root, so `ray_jobs/configs/...` in a YAML works from any directory."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    return REPO_ROOT / given


class ModelConfig(StrictModel):
    name_or_path: str = Field(
        description="Hub id or folder of the base model (for example meta-llama/Llama-3.1-8B-Instruct, "
        "or models/tiny-llama from `python -m workloads.train.tiny`)."
    )
    tokenizer: str | None = Field(
        default=None, description="Hub id or folder of the tokenizer. Default: the model's."
    )
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template file that replaces the tokenizer's, e.g. "
        "ray_jobs/configs/chat_templates/llama3-generation.jinja: Meta's Llama 3 format with the "
        "{% generation %} markers that assistant-only loss needs. It is saved with the output.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="Attention kernel. flash_attention_2 needs a GPU and the flash-attn package.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, about 30% more compute.",
    )
    trust_remote_code: bool = False

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _local_folder_absolute(cls, value: str | None) -> str | None:
        return local_path_absolute(value)

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, path: str | None) -> str | None:
        if path is not None and not project_file(path).is_file():
            raise ValueError(f"no chat template file at {path!r}")
        return None if path is None else str(project_file(path).resolve())


class LoraConfig(StrictModel):
    """PEFT LoRA. Every linear layer by default, as the QLoRA paper found necessary to match full
    fine-tuning; r 16 and alpha 32 are common defaults (the paper itself used r 64, alpha 16)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(default=32, gt=0, description="Scale: the update is (alpha / r) * B @ A.")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description="`all-linear` (every linear layer but the output head, as PEFT defines it) or "
        "module names such as [q_proj, k_proj, v_proj, o_proj].",
    )
    use_dora: bool = Field(
        default=False, description="Weight-decomposed LoRA (DoRA): slower steps, often better."
    )
    merge: bool = Field(
        default=False,
        description="Also write `merged/`: the base model with the adapter folded in, a plain "
        "Hugging Face model for servers that do not load adapters.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m for m in v)):
            raise ValueError("give `all-linear` or a non-empty list of module names")
        return v


class QuantizationConfig(StrictModel):
    """bitsandbytes 4-bit loading for QLoRA (the QLoRA paper's NF4 + double quantisation)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["bfloat16", "float16"] = "bfloat16"


class OptimConfig(StrictModel):
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(default=4, ge=1, description="Sequences per worker per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps in warmup.")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    optim: str = Field(
        default="adamw_torch",
        description="Optimizer, by its transformers name: adamw_torch, adamw_torch_fused, "
        "paged_adamw_8bit (QLoRA's paged optimizer, GPU only), adafactor, ...",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Mixed precision. `auto`: bf16 on GPUs that support it, else fp16; fp32 on CPU.",
    )
    logging_steps: int = Field(default=10, ge=1, description="Log (and report) every N steps.")
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate every N steps. Default: at each checkpoint (checkpoint.every_steps).",
    )
    seed: int = 0


class DeepSpeedConfig(StrictModel):
    config: str | None = Field(
        default=None,
        description="DeepSpeed JSON: zero0|zero1|zero2|zero3 (ray_jobs/configs/deepspeed/<name>.json) "
        "or a path. Empty: plain DDP, no DeepSpeed.",
    )
    offload_optimizer: bool = Field(
        default=False, description="ZeRO-Offload: keep optimizer state (and step it) in CPU memory."
    )
    offload_params: bool = Field(
        default=False, description="ZeRO-Infinity style parameter offload to CPU (ZeRO-3 only)."
    )
    release_host_memory: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="CPU workers: make glibc return freed tensor memory to the OS at once "
        "(workloads.train.ray_train.limit_heap_retention). Without it ZeRO-3's gather-and-free "
        "churn leaves ~600 MB of freed heap per worker at 49M parameters; with it CPU training "
        "runs about 2x slower. `auto`: on under ZeRO-3 (chosen to save memory), off otherwise.",
    )

    def path(self) -> Path | None:
        if self.config is None:
            return None
        named = DEEPSPEED_CONFIG_DIR / f"{self.config}.json"
        return named if named.is_file() else project_file(self.config)

    def load(self) -> dict[str, Any] | None:
        """The JSON, with the offload switches applied; None without DeepSpeed."""
        path = self.path()
        if path is None:
            return None
        ds = json.loads(path.read_text())
        zero = ds.setdefault("zero_optimization", {"stage": 0})
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return ds

    def releases_host_memory(self) -> bool:
        if self.release_host_memory != "auto":
            return self.release_host_memory == "on"
        return self.stage == 3

    @property
    def stage(self) -> int | None:
        ds = self.load()
        return None if ds is None else int(ds["zero_optimization"].get("stage", 0))

    @field_validator("config")
    @classmethod
    def _path_absolute(cls, value: str | None) -> str | None:
        if value is None or (DEEPSPEED_CONFIG_DIR / f"{value}.json").is_file():
            return value  # a name
        return str(project_file(value).resolve())

    @model_validator(mode="after")
    def _readable(self) -> DeepSpeedConfig:
        path = self.path()
        if path is None:
            return self
        if not path.is_file():
            names = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
            raise ValueError(f"config: {self.config!r} is neither one of {names} nor a JSON file")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path} is not valid JSON: {exc}") from None
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"config: {path} has zero_optimization.stage={stage!r}; use 0-3")
        if self.offload_params and stage != 3:
            raise ValueError(f"offload_params: parameter offload needs ZeRO-3 ({path} is {stage})")
        if self.offload_optimizer and stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3")
        return self


class TrainScalingConfig(StrictModel):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(default=False, description="One GPU per worker (NCCL); else CPU (gloo).")
    resources_per_worker: dict[str, float] | None = Field(
        default=None,
        description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}. Default: Ray Train's "
        "(1 CPU, plus 1 GPU with use_gpu). The CPU count is also each worker's torch thread "
        "count (Ray sets OMP_NUM_THREADS from it): one CPU worker on a 4-core node wants {CPU: 4}.",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Ray accelerator type every worker needs, e.g. A100 or H100 (GPU clusters).",
    )


class CheckpointingConfig(StrictModel):
    every_steps: int = Field(
        default=50, ge=1, description="Save (and report to Ray Train) every N optimizer steps."
    )
    num_to_keep: int = Field(default=2, ge=1, description="Checkpoints Ray Train keeps.")
    max_failures: int = Field(
        default=1,
        ge=-1,
        description="Worker-group restarts from the latest checkpoint before the run fails "
        "(Ray Train FailureConfig; -1: unlimited).",
    )
    resume_from: str | None = Field(
        default=None,
        description="A Ray Train checkpoint folder or URI (one `checkpoint_*` of an earlier run) to "
        "continue from: weights, optimizer, scheduler and the step counter, at this config's "
        "train.learning_rate (a tuning sweep's PBT seeds trials this way).",
    )

    @field_validator("resume_from")
    @classmethod
    def _local_folder_absolute(cls, value: str | None) -> str | None:
        return local_path_absolute(value)


def load_tokenizer(model: ModelConfig):
    """The tokenizer of `model`, with `model.chat_template` in place of its own when set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model.tokenizer or model.name_or_path, trust_remote_code=model.trust_remote_code
    )
    if model.chat_template:
        tokenizer.chat_template = project_file(model.chat_template).read_text()
    return tokenizer


def check_training_config(
    *,
    method: str,
    optim: OptimConfig,
    scaling: TrainScalingConfig,
    deepspeed: DeepSpeedConfig,
) -> None:
    """Rules that span sections. Raises ValueError naming the key to change."""
    if method == "qlora" and not scaling.use_gpu:
        raise ValueError(
            "method: qlora loads the base model in 4-bit with bitsandbytes, whose kernels need a "
            "CUDA GPU: set scaling.use_gpu=true on a GPU cluster, or use method: lora on CPU"
        )
    if "8bit" in optim.optim and not scaling.use_gpu:
        raise ValueError(
            f"train.optim: {optim.optim} uses bitsandbytes CUDA kernels; on CPU use adamw_torch"
        )
    if optim.precision == "fp16" and not scaling.use_gpu:
        raise ValueError(
            "train.precision: fp16 mixed precision needs scaling.use_gpu=true (on CPU use fp32 or bf16)"
        )
