"""Gopher quality, Gopher repetition, C4 and FineWeb heuristics, with their published thresholds.

Each check reads a `DocView` (words and lines computed once per document for the whole chain) and
returns the reason to drop, or None. Reason names and default thresholds are datatrove's, which
follow the papers: Gopher (Rae et al. 2021, section A.1.1 and table A1), C4 (Raffel et al. 2020,
section 2.2, with the extra rules of the TFDS `c4_utils` reference code) and FineWeb (Penedo et al.
2024). `bench/filters_bench.py` measures agreement with datatrove document by document.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

import numba
import numpy as np
from pydantic import Field

from workloads.data.filters.step import StepConfig
from workloads.data.filters.text import (
    PUNCTUATION_SET,
    TERMINAL_PUNCTUATION,
    DocView,
    sentence_counts,
)

# ---------------------------------------------------------------------------------------------
# Gopher quality


class GopherQualityConfig(StepConfig):
    type: Literal["gopher_quality"] = "gopher_quality"
    min_doc_words: int | None = Field(default=50, ge=0, description="Fewest non-symbol words.")
    max_doc_words: int | None = Field(default=100_000, ge=1, description="Most non-symbol words.")
    min_avg_word_length: float | None = Field(default=3, ge=0, description="Shortest mean word.")
    max_avg_word_length: float | None = Field(default=10, ge=0, description="Longest mean word.")
    max_symbol_word_ratio: float | None = Field(
        default=0.1, ge=0, description="Most '#' or '...' per word."
    )
    max_bullet_lines_ratio: float | None = Field(
        default=0.9, ge=0, le=1, description="Most lines starting with a bullet."
    )
    max_ellipsis_lines_ratio: float | None = Field(
        default=0.3, ge=0, le=1, description="Most lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float | None = Field(
        default=0.8, ge=0, le=1, description="Fewest words with an alphabetic character."
    )
    min_stop_words: int | None = Field(default=2, ge=0, description="Fewest distinct stop words.")
    stop_words: list[str] = Field(
        default=["the", "be", "to", "of", "and", "that", "have", "with"],
        description="Gopher's stop words.",
    )


def gopher_quality(view: DocView, cfg: GopherQualityConfig) -> str | None:
    text, words = view.text, view.words
    n_words = len(words)
    # Each distinct word is classified once; a document repeats most of its words.
    counts = Counter(words)
    n_content = content_chars = n_alpha = 0
    for w, k in counts.items():
        if not PUNCTUATION_SET.issuperset(w):  # a word, not only symbols
            n_content += k
            content_chars += len(w) * k
        if any(c.isalpha() for c in w):
            n_alpha += k
    if cfg.min_doc_words and n_content < cfg.min_doc_words:
        return "gopher_short_doc"
    if cfg.max_doc_words and n_content > cfg.max_doc_words:
        return "gopher_long_doc"
    if n_content:
        mean = content_chars / n_content
        if cfg.min_avg_word_length and mean < cfg.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if cfg.max_avg_word_length and mean > cfg.max_avg_word_length:
            return "gopher_above_avg_threshold"
    if not n_words:
        return "gopher_short_doc"
    if cfg.max_symbol_word_ratio:
        if text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
    lines = view.lines
    if lines and cfg.max_bullet_lines_ratio:
        bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
    if lines and cfg.max_ellipsis_lines_ratio:
        ellipsis = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if ellipsis / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
    if cfg.min_alpha_words_ratio and n_alpha / n_words < cfg.min_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    if cfg.min_stop_words and len(counts.keys() & set(cfg.stop_words)) < cfg.min_stop_words:
        return "gopher_enough_stop_words"
    return None


# ---------------------------------------------------------------------------------------------
# Gopher repetition (table A1)


class GopherRepetitionConfig(StepConfig):
    type: Literal["gopher_repetition"] = "gopher_repetition"
    dup_line_frac: float | None = Field(default=0.3, ge=0, le=1, description="Duplicate lines.")
    dup_para_frac: float | None = Field(
        default=0.3, ge=0, le=1, description="Duplicate paragraphs."
    )
    dup_line_char_frac: float | None = Field(
        default=0.2, ge=0, le=1, description="Characters in duplicate lines."
    )
    dup_para_char_frac: float | None = Field(
        default=0.2, ge=0, le=1, description="Characters in duplicate paragraphs."
    )
    top_n_grams: list[tuple[int, float]] = Field(
        default=[(2, 0.2), (3, 0.18), (4, 0.16)],
        description="(n, max fraction of characters in the most frequent word n-gram).",
    )
    dup_n_grams: list[tuple[int, float]] = Field(
        default=[(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, max fraction of characters in duplicated word n-grams).",
    )


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(duplicate elements, characters in them): every repeat after the first occurrence."""
    seen: set[str] = set()
    n = chars = 0
    for e in elements:
        if e in seen:
            n += 1
            chars += len(e)
        else:
            seen.add(e)
    return n, chars


# Word n-grams as 64-bit polynomial hashes of their exact strings, so every n-gram statistic is a
# numba loop over integers instead of a Python loop that joins strings. H(a + b) = H(a) * B^len(b) +
# H(b), so the hash of "".join(words) (duplicated n-grams) and of " ".join(words) (top n-gram)
# follow from per-word hashes. Equal strings hash equally, as datatrove's string keys compare.
_BASE = np.uint64(0x9E3779B97F4A7C15)
_NO_SEPARATOR = -1


@numba.njit(cache=True)
def _word_hashes(cps, spans, base):
    n = spans.shape[0]
    wh = np.empty(n, np.uint64)
    pw = np.empty(n, np.uint64)
    for k in range(n):
        h = np.uint64(0)
        p = np.uint64(1)
        for i in range(spans[k, 0], spans[k, 0] + spans[k, 1]):
            h = h * base + np.uint64(cps[i]) + np.uint64(1)
            p = p * base
        wh[k] = h
        pw[k] = p
    return wh, pw


@numba.njit(cache=True)
def _ngram_hashes(wh, pw, n, separator, base):
    m = max(len(wh) - n + 1, 0)
    out = np.empty(m, np.uint64)
    for i in range(m):
        h = wh[i]
        for j in range(i + 1, i + n):
            if separator >= 0:
                h = h * base + np.uint64(separator + 1)
            h = h * pw[j] + wh[j]
        out[i] = h
    return out


@numba.njit(cache=True)
def _duplicated_chars(hashes, prefix, n):
    """Gopher's count: characters of n-grams seen before, skipping past each repeat."""
    seen = set()
    seen.add(np.uint64(0))
    seen.clear()
    chars = 0
    i = 0
    while i < len(hashes):
        if hashes[i] in seen:
            chars += prefix[i + n] - prefix[i]
            i += n
        else:
            seen.add(hashes[i])
            i += 1
    return chars


class _NGrams:
    """The word hashes of one document, from which each n's statistics follow."""

    def __init__(self, view: DocView) -> None:
        spans = view.spans
        cps = np.frombuffer(view.text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        self.wh, self.pw = _word_hashes(cps, spans, _BASE)
        self.prefix = np.concatenate(([0], np.cumsum(spans[:, 1])))

    def top_chars(self, n: int) -> int:
        """len(" ".join(most common n-gram)) * its count; ties go to the first seen, as in
        `Counter.most_common`."""
        h = _ngram_hashes(self.wh, self.pw, n, ord(" "), _BASE)
        if not len(h):
            return 0
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        top = counts.max()
        i = int(first[counts == top].min())
        return (int(self.prefix[i + n] - self.prefix[i]) + n - 1) * int(top)

    def duplicated_chars(self, n: int) -> int:
        h = _ngram_hashes(self.wh, self.pw, n, _NO_SEPARATOR, _BASE)
        return int(_duplicated_chars(h, self.prefix, n))


def gopher_repetition(view: DocView, cfg: GopherRepetitionConfig) -> str | None:
    text = view.text
    if not text:
        return "empty"
    paragraphs = _PARAGRAPHS.split(text.strip())
    n_dup, dup_chars = _duplicates(paragraphs)
    if cfg.dup_para_frac and n_dup / len(paragraphs) > cfg.dup_para_frac:
        return "dup_para_frac"
    if cfg.dup_para_char_frac and dup_chars / len(text) > cfg.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINES.split(text)
    n_dup, dup_chars = _duplicates(lines)
    if cfg.dup_line_frac and n_dup / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac"
    if cfg.dup_line_char_frac and dup_chars / len(text) > cfg.dup_line_char_frac:
        return "dup_line_char_frac"
    grams = _NGrams(view)
    for n, frac in cfg.top_n_grams:
        if grams.top_chars(n) / len(text) > frac:
            return f"top_{n}_gram"
    for n, frac in cfg.dup_n_grams:
        if grams.duplicated_chars(n) / len(text) > frac:
            return f"duplicated_{n}_n_grams"
    return None


# ---------------------------------------------------------------------------------------------
# C4 (line filters that rewrite the document, then document filters)


class C4QualityConfig(StepConfig):
    type: Literal["c4_quality"] = "c4_quality"
    remove_citations: bool = Field(
        default=True, description="Strip [1], [edit], [citation needed]."
    )
    filter_no_terminal_punct: bool = Field(
        default=True, description="Drop lines that do not end in . ? ! \" or '."
    )
    min_num_sentences: int = Field(
        default=5, ge=-1, description="Fewest sentences after line filtering (-1: off)."
    )
    min_words_per_line: int = Field(default=3, ge=-1, description="Drop shorter lines (-1: off).")
    max_word_length: int = Field(
        default=1000, ge=-1, description="Drop lines with a longer word (-1: off)."
    )
    filter_lorem_ipsum: bool = Field(default=True, description="Drop documents with lorem ipsum.")
    filter_javascript: bool = Field(default=True, description="Drop lines mentioning javascript.")
    filter_curly_bracket: bool = Field(default=True, description="Drop documents with '{'.")
    filter_policy: bool = Field(
        default=True, description="Drop lines about cookies, privacy or terms of use."
    )


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def c4_quality(view: DocView, cfg: C4QualityConfig) -> tuple[str | None, str]:
    """(reason or None, the text with C4's line filters applied)."""
    kept: list[str] = []
    for raw in view.lines:
        line = raw.strip()
        words = line.split()
        if cfg.max_word_length != -1 and any(len(w) > cfg.max_word_length for w in words):
            continue
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (
            not line.endswith(_END_PUNCTUATION) or line.endswith("...")
        ):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum", view.text
        if cfg.filter_javascript and "javascript" in lower:
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return "curly_bracket", view.text
        if cfg.filter_policy and any(p in lower for p in _POLICY):
            continue
        kept.append(line)
    if cfg.min_num_sentences != -1 and sum(sentence_counts(kept)) < cfg.min_num_sentences:
        return "too_few_sentences", view.text
    return None, "\n".join(kept).strip()


# ---------------------------------------------------------------------------------------------
# FineWeb


class FineWebQualityConfig(StepConfig):
    type: Literal["fineweb_quality"] = "fineweb_quality"
    line_punct_thr: float = Field(
        default=0.12, ge=0, le=1, description="Fewest lines ending in terminal punctuation."
    )
    line_punct_exclude_zero: bool = Field(
        default=False, description="Keep documents where no line ends in punctuation."
    )
    short_line_thr: float = Field(default=0.67, ge=0, le=1, description="Most short lines.")
    short_line_length: int = Field(default=30, ge=0, description="A short line has at most this.")
    char_duplicates_ratio: float = Field(
        default=0.01, ge=0, le=1, description="Most characters in duplicate lines."
    )
    new_line_ratio: float = Field(default=0.3, ge=0, description="Most newlines per word.")


_STOP_CHARS = tuple(TERMINAL_PUNCTUATION)


def fineweb_quality(view: DocView, cfg: FineWebQualityConfig) -> str | None:
    text = view.text
    lines = [line for line in text.split("\n") if line.strip() != ""]
    if not lines:
        return "empty"
    ratio = sum(1 for line in lines if line.endswith(_STOP_CHARS)) / len(lines)
    if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "line_punct_ratio"
    if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) > cfg.short_line_thr:
        return "short_line_ratio"
    if _duplicates(lines)[1] / len(text.replace("\n", "")) > cfg.char_duplicates_ratio:
        return "char_dup_ratio"
    if not view.n_words or text.count("\n") / view.n_words > cfg.new_line_ratio:
        return "list_ratio"
    return None
