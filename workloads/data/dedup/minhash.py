"""MinHash signatures and LSH bands, vectorised over whole batches (numpy + polars, no Python loop
over shingles or permutations). Pure functions: Ray Data's `map_batches` calls them, tests call them
directly.

Shingles. Text is normalised and split into words with polars' string kernels; each word gets a
64-bit hash (polars' seeded hash), and a word n-gram's hash combines its n word hashes with n odd
multipliers plus a SplitMix64 finalizer, computed for every window of every document at once.
Character n-grams (over UTF-8 bytes) are the alternative for languages without spaces.

Permutations. K hash functions h_k(x) = (a_k * x + b_k) mod 2^64, keeping the top 32 bits
(multiply-shift, a universal family) or, for 64-bit signatures, SplitMix64(x xor a_k). The minimum of
each over a document's shingles is its signature, taken with `np.minimum.reduceat` over documents.

Bands. b bands of r rows each hash their r values to one 64-bit bucket key. Two documents with
Jaccard similarity s share at least one bucket with probability 1 - (1 - s^r)^b.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from workloads.common.config import StrictModel

_U64 = np.uint64
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)


class ShingleConfig(StrictModel):
    kind: Literal["word", "char"] = Field(
        default="word", description="Word n-grams, or UTF-8 byte n-grams."
    )
    ngram: int = Field(
        default=5,
        ge=1,
        le=64,
        description="n of the n-grams (5 words: FineWeb's and NeMo Curator's setting).",
    )
    lowercase: bool = Field(default=True, description="Fold case before shingling.")
    strip_punctuation: bool = Field(
        default=True, description="Drop punctuation; words are runs of \\w."
    )
    fold_digits: bool = Field(default=True, description="Replace every digit with 0.")
    unicode_nfkc: bool = Field(
        default=True, description="NFKC-normalise first (full-width, ligatures)."
    )


class MinHashConfig(StrictModel):
    num_perm: int = Field(
        default=128, ge=8, le=1024, description="K: hash functions per signature."
    )
    bits: Literal[32, 64] = Field(default=32, description="Bits per signature value.")
    threshold: float = Field(
        default=0.8, gt=0.0, lt=1.0, description="Target Jaccard similarity of a duplicate pair."
    )
    bands: int | None = Field(
        default=None, ge=1, description="b. Unset: derived from threshold as datasketch does."
    )
    rows_per_band: int | None = Field(default=None, ge=1, description="r. Set together with bands.")
    # Verification (on by default) drops candidates whose estimated Jaccard is below the threshold,
    # so the bands favour recall: at K=128, t=0.8 this gives 14 x 9 (P(candidate | s=0.8) = 0.87)
    # where equal weights give 9 x 13 (0.40). NeMo Curator pairs its LSH with a false-positive check
    # for the same reason.
    false_positive_weight: float = Field(
        default=0.1, ge=0, le=1, description="Weight of P(false positive) in the band choice."
    )
    false_negative_weight: float = Field(
        default=0.9, ge=0, le=1, description="Weight of P(false negative) in the band choice."
    )
    seed: int = Field(default=42, description="Seeds the word hash and the permutations.")

    @model_validator(mode="after")
    def _bands_fit(self) -> MinHashConfig:
        if (self.bands is None) != (self.rows_per_band is None):
            raise ValueError("set both minhash.bands and minhash.rows_per_band, or neither")
        if self.bands is not None and self.bands * self.rows_per_band > self.num_perm:
            raise ValueError(
                f"minhash.bands * minhash.rows_per_band = {self.bands * self.rows_per_band} "
                f"exceeds minhash.num_perm = {self.num_perm}"
            )
        return self

    def band_params(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows_per_band
        return optimal_bands(
            self.threshold, self.num_perm, self.false_positive_weight, self.false_negative_weight
        )


@lru_cache(maxsize=64)
def optimal_bands(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(b, r) minimising fp_weight * P(false positive) + fn_weight * P(false negative), the integrals
    of the LSH S-curve below and above the threshold: datasketch's `_optimal_param`, vectorised."""
    s = np.linspace(0.0, 1.0, 2001)
    best, best_err = (1, 1), float("inf")
    below, above = s <= threshold, s >= threshold
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            fp = np.trapezoid(p[below], s[below])
            fn = np.trapezoid(1.0 - p[above], s[above])
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


def collision_probability(similarity: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - similarity**rows) ** bands


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U64(30))
    x = x * _MIX1
    x = x ^ (x >> _U64(27))
    x = x * _MIX2
    return x ^ (x >> _U64(31))


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | _U64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


# ---------------------------------------------------------------------------------------------
# Kernels (numba): one pass over UTF-8 bytes for words, one for n-grams, one for the permutations.
# Fused loops keep the (shingles x permutations) work in registers; numpy's version of the same
# arithmetic allocates four temporaries of that size and runs about 10x slower.

_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_BASIS = np.uint64(0xCBF29CE484222325)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _word_hashes(
    data, offsets, alt_data, alt_offsets, alt_row, lowercase, fold_digits, word_bytes_only, basis
):
    """FNV-1a hash of every word of every document. Document d's bytes come from `data` or, where
    alt_row[d] >= 0, from row alt_row[d] of `alt_*` (its Unicode-normalised text). Bytes >= 0x80
    are word bytes: the Unicode-aware pre-pass has already turned non-ASCII punctuation and spaces
    into ASCII spaces. For ASCII text this equals lowercase -> fold digits -> findall(\\w+)."""
    n_docs = len(offsets) - 1
    out = np.empty((len(data) + len(alt_data)) // 2 + n_docs + 1, np.uint64)
    counts = np.zeros(n_docs, np.int64)
    w = 0
    for d in range(n_docs):
        if alt_row[d] >= 0:
            buf, lo, hi = alt_data, alt_offsets[alt_row[d]], alt_offsets[alt_row[d] + 1]
        else:
            buf, lo, hi = data, offsets[d], offsets[d + 1]
        h = basis
        in_word = False
        c = 0
        for i in range(lo, hi):
            ch = buf[i]
            if lowercase and 65 <= ch <= 90:
                ch += 32
            if fold_digits and 48 <= ch <= 57:
                ch = 48
            if word_bytes_only:
                is_word = (
                    ch >= 128 or 48 <= ch <= 57 or 97 <= ch <= 122 or 65 <= ch <= 90 or ch == 95
                )
            else:
                is_word = not (ch == 32 or 9 <= ch <= 13)
            if is_word:
                h = (h ^ np.uint64(ch)) * _FNV_PRIME
                in_word = True
            elif in_word:
                out[w] = h
                w += 1
                c += 1
                h = basis
                in_word = False
        if in_word:
            out[w] = h
            w += 1
            c += 1
        counts[d] = c
    return out[:w], counts


@numba.njit(cache=True, nogil=True)
def _ngram_kernel(tokens, counts, n):
    """Hash of every n-token window inside each document (windows never cross documents)."""
    windows = np.maximum(counts - n + 1, 0)
    out = np.empty(windows.sum(), np.uint64)
    pos = 0
    w = 0
    for d in range(len(counts)):
        for i in range(windows[d]):
            h = np.uint64(0)
            for j in range(n):
                h += tokens[pos + i + j] * (np.uint64(0x9E3779B97F4A7C15) * np.uint64(2 * j + 1))
            out[w] = _mix(h)
            w += 1
        pos += counts[d]
    return out, windows


@numba.njit(cache=True, nogil=True)
def _minhash32(shingles, counts, a, b, out):
    pos = 0
    for d in range(len(counts)):
        row = out[d]
        for s in range(pos, pos + counts[d]):
            x = shingles[s]
            for k in range(len(a)):
                v = np.uint32((x * a[k] + b[k]) >> np.uint64(32))
                if v < row[k]:
                    row[k] = v
        pos += counts[d]


@numba.njit(cache=True, nogil=True)
def _minhash64(shingles, counts, a, out):
    pos = 0
    for d in range(len(counts)):
        row = out[d]
        for s in range(pos, pos + counts[d]):
            x = shingles[s]
            for k in range(len(a)):
                v = _mix(x ^ a[k])
                if v < row[k]:
                    row[k] = v
        pos += counts[d]


def _utf8_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, int64 offsets) of a string array, without copying the text."""
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    )
    return data, offsets


def _unicode_pass(texts: pa.Array, cfg: ShingleConfig) -> pa.Array:
    """What the byte kernels cannot do: NFKC, Unicode case and digits, non-ASCII punctuation/spaces."""
    import polars as pl

    s = pl.Series("t", texts)
    if cfg.unicode_nfkc:
        s = s.str.normalize("NFKC")
    if cfg.lowercase:
        s = s.str.to_lowercase()
    if cfg.fold_digits:
        s = s.str.replace_all(r"\d", "0")
    if cfg.strip_punctuation:
        s = s.str.replace_all(r"[^\w\s]", " " if cfg.kind == "word" else "")
    s = s.str.replace_all(r"\s+", " ")
    return s.to_arrow()


def shingle_hashes(texts, cfg: ShingleConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes of all shingles of all texts back to back, shingles per text). A text with fewer
    tokens than `cfg.ngram` has no shingles. `texts`: a list of str or an Arrow string array."""
    arr = (
        texts
        if isinstance(texts, (pa.Array, pa.ChunkedArray))
        else pa.array(texts, pa.large_string())
    )
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.fill_null("")
    if cfg.kind == "char":
        data, offsets = _utf8_buffers(_unicode_pass(arr, cfg))
        counts = np.diff(offsets)
        with np.errstate(over="ignore"):
            token_hashes = _splitmix(
                data[offsets[0] : offsets[-1]].astype(np.uint64) + _U64(seed) * _GOLDEN
            )
        return _ngram_kernel(token_hashes, counts, cfg.ngram)
    # ASCII documents go straight to the byte kernel; the rest get the Unicode pass first.
    non_ascii = np.flatnonzero(np.asarray(pc.invert(pc.string_is_ascii(arr)).fill_null(False)))
    alt_row = np.full(len(arr), -1, dtype=np.int64)
    if cfg.unicode_nfkc or cfg.lowercase or cfg.fold_digits or cfg.strip_punctuation:
        alt_row[non_ascii] = np.arange(len(non_ascii))
        alt = (
            _unicode_pass(arr.take(pa.array(non_ascii, pa.int64())), cfg)
            if len(non_ascii)
            else pa.array([], pa.large_string())
        )
    else:
        alt = pa.array([], pa.large_string())
    data, offsets = _utf8_buffers(arr)
    alt_data, alt_offsets = _utf8_buffers(alt)
    basis = _FNV_BASIS ^ _mix(np.uint64(seed))
    words, counts = _word_hashes(
        data,
        offsets,
        alt_data,
        alt_offsets,
        alt_row,
        cfg.lowercase,
        cfg.fold_digits,
        cfg.strip_punctuation,
        basis,
    )
    return _ngram_kernel(words, counts, cfg.ngram)


def minhash_signatures(hashes: np.ndarray, counts: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """(documents x num_perm) signature matrix; rows of documents without shingles are all max."""
    a, b = permutations(cfg.num_perm, cfg.seed)
    dtype = np.uint32 if cfg.bits == 32 else np.uint64
    out = np.full((len(counts), cfg.num_perm), np.iinfo(dtype).max, dtype=dtype)
    counts = np.asarray(counts, dtype=np.int64)
    if cfg.bits == 32:
        _minhash32(hashes, counts, a, b, out)
    else:
        _minhash64(hashes, counts, a, out)
    return out


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents x bands) 64-bit keys: band j hashes signature values j*r .. j*r + r - 1."""
    sig = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    h = np.zeros((len(signatures), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(rows):
            h = _splitmix(h ^ (sig[:, :, k] + _GOLDEN * _U64(k + 1)))
    return h


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise share of equal signature values: an unbiased estimate of Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=-1)
