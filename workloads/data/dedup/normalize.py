"""Text normalisation shared by the dedup stages: what counts as "the same text"."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field

from workloads.common.config import StrictModel

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
_DIGITS = re.compile(r"\d")


class NormalizeConfig(StrictModel):
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        default="NFC", description="Unicode normal form applied first."
    )
    lowercase: bool = Field(default=False, description="Fold case.")
    collapse_whitespace: bool = Field(
        default=True, description="Collapse runs of whitespace to one space and strip the ends."
    )
    strip_punctuation: bool = Field(default=False, description="Remove punctuation characters.")
    fold_digits: bool = Field(default=False, description="Replace every digit with 0.")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_punctuation:
        text = _PUNCTUATION.sub(" " if cfg.collapse_whitespace else "", text)
    if cfg.fold_digits:
        text = _DIGITS.sub("0", text)
    if cfg.collapse_whitespace:
        # str.split() splits on exactly what re's \s matches (str.isspace()), several times faster
        text = " ".join(text.split())
    return text
