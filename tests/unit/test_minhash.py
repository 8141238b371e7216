"""MinHash signatures, LSH bands and the star steps of connected components, without Ray."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from workloads.data.dedup import components as cc
from workloads.data.dedup.minhash import (
    MinHashConfig,
    ShingleConfig,
    band_hashes,
    collision_probability,
    estimated_jaccard,
    minhash_signatures,
    optimal_bands,
    shingle_hashes,
)

# Letters only: digit folding would map "w12" and "w34" to the same word.
WORDS = ["".join(chr(97 + (i // 26**k) % 26) for k in range(3)) for i in range(400)]


def _sig(texts, shingle=None, minhash=None):
    shingle, minhash = shingle or ShingleConfig(), minhash or MinHashConfig()
    h, c = shingle_hashes(texts, shingle, minhash.seed)
    return minhash_signatures(h, c, minhash), c


def _exact_jaccard(a: str, b: str, n: int = 5) -> float:
    def sh(t):
        w = re.findall(r"\w+", re.sub(r"\d", "0", t.lower()))
        return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}

    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_shingle_counts_and_short_documents():
    texts = ["one two three four", "a b c d e", "a b c d e f g", ""]
    h, counts = shingle_hashes(texts, ShingleConfig(ngram=5), seed=1)
    assert counts.tolist() == [0, 1, 3, 0]
    assert len(h) == 4 and h.dtype == np.uint64


def test_normalisation_makes_case_punctuation_and_digits_irrelevant():
    sig, _ = _sig(["The Year 1999, said Bob!!", "the year 2024 said bob"], ShingleConfig(ngram=2))
    assert (sig[0] == sig[1]).all()
    raw = ShingleConfig(ngram=2, lowercase=False, strip_punctuation=False, fold_digits=False)
    sig, _ = _sig(["The Year 1999, said Bob!!", "the year 2024 said bob"], raw)
    assert (sig[0] != sig[1]).any()


def test_signatures_are_deterministic_and_batch_independent():
    texts = [" ".join(WORDS[i : i + 50]) for i in range(0, 300, 30)]
    alone = np.vstack([_sig([t])[0] for t in texts])
    together, _ = _sig(texts)
    assert (alone == together).all()


def test_estimated_jaccard_tracks_exact_jaccard():
    rng = np.random.default_rng(0)
    base = [" ".join(rng.choice(WORDS, 200)) for _ in range(40)]
    edited = []
    for i, t in enumerate(base):
        w = t.split()
        for j in rng.choice(len(w), size=2 + i, replace=False):
            w[j] = "zz"
        edited.append(" ".join(w))
    for bits in (32, 64):
        sig, _ = _sig(base + edited, minhash=MinHashConfig(num_perm=256, bits=bits))
        est = estimated_jaccard(sig[:40], sig[40:])
        exact = np.array([_exact_jaccard(a, b) for a, b in zip(base, edited, strict=True)])
        # Standard error of a K=256 estimate is at most 0.5 / 16 = 0.031.
        assert np.abs(est - exact).mean() < 0.03, bits
        assert np.corrcoef(est, exact)[0, 1] > 0.9


def test_char_ngrams_work_without_spaces():
    sig, counts = _sig(
        ["東京都は日本の首都です", "東京都は日本の首都です。", "大阪は関西にあります"],
        ShingleConfig(kind="char", ngram=3),
    )
    assert counts[0] > 0
    assert estimated_jaccard(sig[0], sig[1]) == 1.0  # punctuation stripped
    assert estimated_jaccard(sig[0], sig[2]) < 0.2


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold, k in ((0.8, 128), (0.7, 128), (0.5, 64), (0.9, 256)):
        assert optimal_bands(threshold, k) == _optimal_param(threshold, k, 0.5, 0.5)


def test_config_rejects_inconsistent_bands():
    with pytest.raises(ValueError, match="exceeds minhash.num_perm"):
        MinHashConfig(num_perm=64, bands=10, rows_per_band=8)
    with pytest.raises(ValueError, match="set both"):
        MinHashConfig(bands=10)
    assert MinHashConfig(num_perm=112, bands=14, rows_per_band=8).band_params() == (14, 8)


def test_band_hashes_collide_exactly_when_band_values_match():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 4]], dtype=np.uint32)
    h = band_hashes(sig, bands=2, rows=2)
    assert h[0, 0] == h[1, 0] == h[2, 0]
    assert h[0, 1] == h[2, 1] != h[1, 1]
    assert MinHashConfig().band_params() == (
        14,
        9,
    )  # recall-leaning default: verification drops false positives
    assert collision_probability(0.9, 14, 9) > 0.99 and collision_probability(0.5, 14, 9) < 0.03


def _edges(pairs):
    return pa.table({"u": [u for u, _ in pairs], "v": [v for _, v in pairs]}, schema=cc.EDGE_SCHEMA)


def _shuffle(table: pa.Table, key: str, parts: int) -> list[pa.Table]:
    """What `partitioned` hands its function: every row of a key in the same block."""
    keys = table[key].to_numpy()
    return [table.filter(pa.array(keys % parts == p)) for p in range(parts)]


def _run_local(pairs, parts: int = 1):
    """The job's rounds with the shuffles done in Python: large-star, then small-star, per block of
    `parts` hash partitions, until a round changes nothing."""
    edges, rounds = _edges(sorted(set(pairs))), 0
    while True:
        rounds += 1
        directed = cc.both_directions(edges)
        large = pa.concat_tables([cc.large_star(b) for b in _shuffle(directed, "x", parts)])
        small = pa.concat_tables([cc.small_star(b) for b in _shuffle(large, "a", parts)])
        edges = small.select(["u", "v"])
        if small["changed"].null_count == len(small):
            return sorted(
                set(zip(edges["u"].to_pylist(), edges["v"].to_pylist(), strict=True))
            ), rounds


@pytest.mark.parametrize("parts", [1, 3])
def test_star_rounds_converge_to_min_centred_stars(parts):
    chain = [
        (i + 1, i) for i in range(1, 20)
    ]  # a path 1-2-...-20, the worst case for label propagation
    other = [(105, 107), (107, 103)]
    stars, rounds = _run_local(chain + other, parts)
    assert rounds >= 2  # at least one round that changes, one that confirms
    centre = dict(stars)
    assert len(centre) == len(stars)  # every leaf once
    assert all(centre[n] == 1 for n in range(2, 21))
    assert centre[105] == centre[107] == 103 and 1 not in centre and 103 not in centre


def test_a_star_forest_is_confirmed_in_one_round():
    stars, rounds = _run_local([(5, 1), (7, 1), (9, 8)], parts=2)
    assert rounds == 1 and stars == [(5, 1), (7, 1), (9, 8)]


def test_components_of_converged_stars_include_the_centres_once():
    rows = cc.component_rows(_edges([(5, 1), (7, 1)]))
    comp = cc.distinct_nodes(rows).to_pylist()
    assert sorted((r["uid"], r["component"]) for r in comp) == [(1, 1), (5, 1), (7, 1)]
