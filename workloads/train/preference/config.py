"""The preference job's one typed config: `python ray_jobs/preference.py --config <yaml> [a.b=value ...]`.

The model, adapter, optimiser, DeepSpeed, scaling and checkpoint sections are the SFT job's
(workloads.train.config); what is new is the data (pairs, rated completions or KTO's labelled
completions), the algorithm and its loss, and where the reference log-probs come from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workloads.common.config import InputConfig, JobConfig, OutputConfig, StrictModel
from workloads.train.config import (
    CheckpointingConfig,
    DeepSpeedConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    QuantizationConfig,
    TrainScalingConfig,
    check_training_config,
)
from workloads.train.preference.data import KTO_FORMATTINGS


class PreferenceDataConfig(InputConfig):
    path: str = Field(
        description="JSONL or Parquet preference records: a file, folder, glob or URI (s3://, gs://)."
    )
    formatting: Literal[KTO_FORMATTINGS] = Field(  # type: ignore[valid-type]
        default="auto",
        description="Record layout (workloads.train.preference.data): standard "
        "(prompt/chosen/rejected strings), conversational (message lists, or an implicit prompt), "
        "ultrafeedback (rated completions, binarised best vs worst), unpaired (prompt/completion/"
        "label, KTO only). `auto` decides per record.",
    )
    min_score_margin: float = Field(
        default=1.0,
        ge=0,
        description="Rated completions: the best and worst scores must differ by this much, or "
        "the record is rejected as `margin_too_small` (UltraFeedback scores run 1-10).",
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of records held out (by a hash of the record id, stable across reruns) "
        "for the held-out reward accuracy, margin, log-probs and KL. 0: no evaluation.",
    )
    max_length: int = Field(
        default=1024,
        ge=16,
        description="Tokens per prompt + completion; longer ones are cut at the end (TRL's "
        "keep_start). A prompt that alone fills it leaves nothing to compare: rejected as "
        "`prompt_too_long`.",
    )
    seed: int = Field(default=0, description="Seed of the held-out split.")


class PreferenceLossConfig(StrictModel):
    beta: float = Field(
        default=0.1,
        gt=0,
        description="DPO/KTO: how far the policy may move from the reference (higher: less); for "
        "IPO it is the regulariser tau. ORPO: the weight of the odds-ratio term (lambda). Also the "
        "scale of the implicit rewards in the held-out metrics, so held-out margins compare across "
        "runs with the same beta only; accuracies, log-probs and KL compare across any.",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid",
        description="DPO only: sigmoid (the DPO paper's loss) or ipo (Azar et al., 2023: a squared "
        "loss that does not push the margin to infinity on deterministic preferences).",
    )
    desirable_weight: float = Field(
        default=1.0,
        gt=0,
        description="KTO only: weight of the desirable examples' loss. With unbalanced data, keep "
        "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3] "
        "(the KTO paper's advice).",
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, description="KTO only: weight of the undesirable examples' loss."
    )
    reference: Literal["online", "precomputed"] = Field(
        default="online",
        description="DPO only. online: the trainer scores each batch with the reference model "
        "(LoRA: the base with adapters off; full: a second, frozen copy). precomputed: a Ray "
        "Data pass scores every pair once before training (stage `_stages/reference`; a rerun of "
        "the job resumes after it), so training never runs, nor holds, the reference model.",
    )


class ReferencePassConfig(StrictModel):
    """The Ray Data actors that compute reference log-probs (`preference.reference: precomputed`)."""

    concurrency: int = Field(default=1, ge=1, description="Actors, each holding the model once.")
    batch_size: int = Field(default=8, ge=1, description="Pairs per forward pass.")
    num_cpus: float = Field(default=1, gt=0, description="CPUs per actor.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per actor (1 on a GPU cluster).")


class PreferenceOptimConfig(OptimConfig):
    """SFT's optimiser section with preference-tuning defaults: a learning rate of 5e-6 (full-weight
    DPO runs at 5e-7 to 5e-6; LoRA takes about 10x more) and 10% warmup (TRL's DPO examples)."""

    learning_rate: float = Field(default=5e-6, gt=0, le=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps in warmup.")


class PreferenceJobConfig(JobConfig):
    model: ModelConfig = Field(
        description="The model to align, usually an SFT model (its merged folder, or a hub id). "
        "It is also the reference."
    )
    algorithm: Literal["dpo", "kto", "orpo"] = Field(
        default="dpo",
        description="dpo: pairs, against a frozen reference (TRL DPOTrainer; `preference.loss_type` "
        "ipo for IPO). kto: desirable/undesirable completions, paired or not (TRL KTOTrainer). "
        "orpo: pairs, no reference model: SFT loss plus an odds-ratio penalty (TRL's ORPOTrainer, "
        "trl.experimental).",
    )
    method: Literal["full", "lora", "qlora"] = Field(
        default="lora",
        description="full: every weight; lora: PEFT adapters (the reference is the base with the "
        "adapters off, so no second copy is loaded); qlora: LoRA on a 4-bit base (GPU only).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: PreferenceDataConfig
    preference: PreferenceLossConfig = Field(default_factory=PreferenceLossConfig)
    reference_pass: ReferencePassConfig = Field(default_factory=ReferencePassConfig)
    train: PreferenceOptimConfig = Field(default_factory=PreferenceOptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    checkpoint: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    output: OutputConfig
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints: local on one machine, s3:// or gs:// on a "
        "multi-node cluster. Default: <output.path>/_ray_train.",
    )

    @model_validator(mode="after")
    def _combination(self) -> PreferenceJobConfig:
        check_training_config(
            method=self.method, optim=self.train, scaling=self.scaling, deepspeed=self.deepspeed
        )
        loss = self.preference
        if self.algorithm != "dpo":
            if loss.loss_type != "sigmoid":
                raise ValueError("preference.loss_type applies to algorithm: dpo only")
            if loss.reference == "precomputed":
                raise ValueError(
                    "preference.reference: precomputed applies to algorithm: dpo only (KTO's KL "
                    "term pairs each completion with another prompt in its batch, so its reference "
                    "log-probs depend on the batch; ORPO has no reference)"
                )
        if self.precomputes_reference and self.method == "qlora":
            raise ValueError(
                "preference.reference: precomputed scores pairs with the full-precision model, "
                "while method: qlora trains from its 4-bit copy, so every reward would start "
                "off by the quantisation error: use reference: online with qlora (the 4-bit base "
                "with the adapters off is the reference)"
            )
        if self.algorithm != "kto" and (loss.desirable_weight != 1 or loss.undesirable_weight != 1):
            raise ValueError("preference.desirable_weight/undesirable_weight apply to kto only")
        if self.data.formatting == "unpaired" and self.algorithm != "kto":
            raise ValueError(
                "data.formatting: unpaired records (prompt/completion/label) train algorithm: kto only"
            )
        if self.algorithm == "kto" and self.train.batch_size < 2:
            raise ValueError(
                "train.batch_size: KTO estimates its KL term from the other completions in a batch, "
                "so it needs at least 2 per worker"
            )
        if self.lora.merge and self.method == "full":
            raise ValueError("lora.merge: method full has no adapter to merge")
        return self

    @property
    def precomputes_reference(self) -> bool:
        return self.algorithm == "dpo" and self.preference.reference == "precomputed"
