"""Toxicity scores: an offline linear model by default, or any Hugging Face text classifier.

- `profanity_check`: alt-profanity-check's TF-IDF + linear SVM, shipped in the wheel; runs inside
  the fused per-document stage.
- `hf_classifier`: a sequence-classification model from a path or the hub, run as a callable-class
  stage on a Ray actor pool (the model loads once per actor), on a GPU when the cluster has one.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from workloads.data.filters.step import StepConfig


class ToxicityConfig(StepConfig):
    type: Literal["toxicity"] = "toxicity"
    backend: Literal["profanity_check", "hf_classifier"] = Field(
        default="profanity_check", description="Scorer to use."
    )
    threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Drop at or above this score (0.5: profanity_check's own decision boundary).",
    )
    max_chars: int = Field(default=20_000, ge=1, description="Characters scored per document.")
    model: str | None = Field(
        default=None, description="hf_classifier: model path or hub id (e.g. unitary/toxic-bert)."
    )
    label: str = Field(
        default="toxic", description="hf_classifier: the label whose probability is the score."
    )
    multi_label: bool = Field(
        default=False,
        description="hf_classifier: sigmoid per label (multi-label heads such as toxic-bert) "
        "instead of a softmax.",
    )
    max_length: int = Field(default=512, ge=8, description="hf_classifier: tokens per document.")
    batch_size: int = Field(default=32, ge=1, description="hf_classifier: documents per batch.")
    concurrency: int = Field(default=1, ge=1, description="hf_classifier: actors in the pool.")
    num_cpus: float = Field(
        default=1.0, gt=0, description="hf_classifier: logical CPUs reserved per actor."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="hf_classifier: `auto` uses a GPU when the cluster has one."
    )

    @model_validator(mode="after")
    def _needs_model(self) -> ToxicityConfig:
        if self.backend == "hf_classifier" and not self.model:
            raise ValueError("toxicity.model is required when backend is hf_classifier")
        return self


@functools.cache
def _profanity():
    import profanity_check

    return profanity_check


def profanity_scores(texts: list[str], max_chars: int) -> np.ndarray:
    """Probability of profanity per text (alt-profanity-check)."""
    if not texts:
        return np.zeros(0, np.float32)
    return _profanity().predict_prob([t[:max_chars] for t in texts]).astype(np.float32)


class TextClassifierStage:
    """Scores the live rows of a batch with a Hugging Face classifier; writes `<name>_score`."""

    def __init__(self, cfg: ToxicityConfig, use_gpu: bool) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.model).to(self.device)
        self.model.eval()
        label2id = {str(k).lower(): v for k, v in self.model.config.label2id.items()}
        if cfg.label.lower() not in label2id:
            raise ValueError(
                f"toxicity.label {cfg.label!r} is not a label of {cfg.model}: "
                f"{sorted(self.model.config.label2id)}"
            )
        self.label_id = label2id[cfg.label.lower()]

    def scores(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros(len(texts), np.float32)
        for start in range(0, len(texts), self.cfg.batch_size):
            chunk = [t[: self.cfg.max_chars] for t in texts[start : start + self.cfg.batch_size]]
            enc = self.tokenizer(
                chunk,
                truncation=True,
                max_length=self.cfg.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            probs = logits.sigmoid() if self.cfg.multi_label else logits.softmax(-1)
            out[start : start + len(chunk)] = probs[:, self.label_id].cpu().numpy()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        from workloads.data.filters.pipeline import apply_scores

        return apply_scores(batch, self.cfg, self.scores)
