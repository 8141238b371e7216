"""The embedded corpus: real text, planted variants whose properties hold, and bad records the
readers reject with exactly the planted reasons."""

from __future__ import annotations

import json
import random
import re

from workloads.common.documents import parse_jsonl_lines
from workloads.data import sample
from workloads.data.sample import read_corpus_texts


def _shingles(text: str, n: int = 5) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _records(out) -> dict[str, dict]:
    return {i: {"text": t} for i, t in read_corpus_texts(out / "corpus").items()}


def test_planted_variants_have_the_promised_properties(sample_corpus):
    truth = json.loads((sample_corpus / "planted.json").read_text())
    records = _records(sample_corpus)
    assert truth["documents"] == len(records)
    assert all(len(truth["pairs"][k]) >= 10 for k in ("exact", "reformat", "near"))
    for a, b in truth["pairs"]["exact"]:
        assert records[a]["text"] == records[b]["text"]
    for a, b in truth["pairs"]["reformat"]:
        assert records[a]["text"] != records[b]["text"]
        assert records[a]["text"].split() == records[b]["text"].split()
    for a, b in truth["pairs"]["near"]:
        sa, sb = _shingles(records[a]["text"]), _shingles(records[b]["text"])
        assert records[a]["text"].split() != records[b]["text"].split()
        assert len(sa & sb) / len(sa | sb) >= 0.7


def test_base_documents_are_distinct(sample_corpus):
    truth = json.loads((sample_corpus / "planted.json").read_text())
    records = _records(sample_corpus)
    planted_copies = {a for pairs in truth["pairs"].values() for a, _ in pairs}
    texts = [
        re.sub(r"\s+", " ", r["text"]).strip()
        for i, r in records.items()
        if i not in planted_copies
    ]
    assert len(texts) == len(set(texts)) == truth["base_documents"]


def test_readers_reject_every_planted_bad_record_with_its_reason(sample_corpus):
    truth = json.loads((sample_corpus / "planted.json").read_text())
    found = {}
    for path in sorted((sample_corpus / "corpus").glob("*.jsonl")):
        table = parse_jsonl_lines(
            path.read_bytes().split(b"\n"),
            source=str(path),
            id_prefix=path.name,
            first_line=1,
            text_field="text",
            id_field="id",
        )
        for row in table.to_pylist():
            if row["reject_reason"]:
                found[(path.name, row["line"])] = row["reject_reason"]
    assert found == {(m["file"], m["line"]): m["reason"] for m in truth["malformed"]}
    assert len({m["reason"] for m in truth["malformed"]}) == 7


def test_build_is_deterministic(tmp_path):
    a = sample.build(tmp_path / "a", docs=60, seed=3, shards=2)
    b = sample.build(tmp_path / "b", docs=60, seed=3, shards=2)
    assert a["pairs"] == b["pairs"]
    assert (tmp_path / "a/corpus/part-00001.jsonl").read_bytes() == (
        tmp_path / "b/corpus/part-00001.jsonl"
    ).read_bytes()


def test_near_duplicate_edits_scale_with_length():
    rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(400))
    near = sample.near_duplicate(text, rng, ["zzz"]).split()
    assert near != text.split() and abs(len(near) - 400) <= 4


def test_score_counts_pairs_in_one_cluster_and_unplanted_removals():
    truth = {
        "pairs": {"exact": [["b", "a"], ["d", "c"]]},
        "malformed": [{"file": "f", "line": 3, "reason": "r"}],
    }
    rows = sample.score_dedup(truth, {"b": "a", "x": "y"}, [("/p/f", 3, "r")])
    assert ("duplicates: exact", 2, 1) in rows
    assert ("removed but not planted", 0, 1) in rows
    assert ("rejected: r", 1, 1) in rows
