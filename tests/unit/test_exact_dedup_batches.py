"""The per-batch functions of exact dedup, without Ray."""

from __future__ import annotations

import pyarrow as pa

from workloads.data.dedup.exact import add_text_hash, keepers_only, not_keeper, text_hash
from workloads.data.dedup.normalize import NormalizeConfig, normalize_text


def test_default_normalisation_equates_whitespace_only_changes():
    cfg = NormalizeConfig()
    assert text_hash("a  b\n\nc ", cfg) == text_hash("a b c", cfg)
    assert text_hash("A b c", cfg) != text_hash("a b c", cfg)  # case is kept unless asked
    assert text_hash("A b c", NormalizeConfig(lowercase=True)) == text_hash("a b c", cfg)


def test_unicode_punctuation_and_digit_options():
    assert normalize_text("\ufb01ne", NormalizeConfig(unicode_form="NFKC")) == "fine"
    assert normalize_text("Hello, world!", NormalizeConfig(strip_punctuation=True)) == "Hello world"
    assert normalize_text("v1.25", NormalizeConfig(fold_digits=True)) == "v0.00"


def test_add_text_hash_leaves_rejects_null():
    batch = pa.table({"id": ["a", "b"], "text": ["x", None]})
    out = add_text_hash(batch, normalize=NormalizeConfig())
    hashes = out["text_hash"].to_pylist()
    assert hashes[0] is not None and len(hashes[0]) == 32 and hashes[1] is None


def test_not_keeper_maps_removed_ids_to_their_keeper():
    batch = pa.table(
        {"id": ["a", "b", "c"], "text_hash": ["h", "h", "h"], "keeper": ["a", "a", "a"]}
    )
    assert not_keeper(batch).to_pylist() == [
        {"id": "b", "duplicate_of": "a"},
        {"id": "c", "duplicate_of": "a"},
    ]


def test_keepers_only_keeps_singletons_and_keepers():
    batch = pa.table(
        {
            "id": ["a", "b", "s"],
            "text": ["t", "t", "u"],
            "meta": [None] * 3,
            "source": ["f"] * 3,
            "line": [1, 2, 3],
            "text_hash": ["h", "h", "g"],
            "keeper": ["a", "a", None],
        }
    )
    assert keepers_only(batch)["id"].to_pylist() == ["a", "s"]
    assert keepers_only(batch).column_names == ["id", "text", "meta", "source", "line"]
