"""The curation job on a real local Ray: dedup as a barrier inside the chain, filters, a Hugging Face
classifier on an actor pool, PII redaction, drops with reasons, reconciled counts, resume."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from workloads.common.documents import read_documents  # noqa: F401  (import check: shared reader)
from workloads.data.filters.pipeline import CurateConfig, run

pytestmark = pytest.mark.slow
THRESHOLD = 0.5


def _cfg(corpus, out, classifier) -> CurateConfig:
    return CurateConfig.model_validate(
        {
            "input": {"path": str(corpus)},
            "output": {"path": str(out)},
            "steps": [
                {"type": "exact_dedup", "num_partitions": 2},
                {"type": "language", "languages": ["en"], "min_score": 0.3},
                {"type": "gopher_repetition"},
                {
                    "type": "toxicity",
                    "backend": "hf_classifier",
                    "model": str(classifier),
                    "label": "toxic",
                    "threshold": THRESHOLD,
                    "batch_size": 16,
                    "num_cpus": 0.5,
                    "device": "auto",
                },
                {"type": "pii"},
            ],
            # Two CPUs hold two filter actors (the steps before and after the classifier), the
            # classifier actor, and the read and write tasks: actor pools that reserved every CPU
            # would leave the reads none.
            "filter_actors": {"concurrency": 1, "num_cpus": 0.25},
            "ray": {"num_cpus": 2, "data_progress_bars": False},
        }
    )


@pytest.fixture(scope="module")
def curated(ray_session, sample_corpus, tiny_classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("curate")
    cfg = _cfg(sample_corpus / "corpus", out, tiny_classifier)
    return cfg, out, run(cfg)


def _ids(folder) -> list[str]:
    return pq.read_table(folder, columns=["id"])["id"].to_pylist()


def test_every_record_is_kept_dropped_or_rejected_exactly_once(curated, sample_corpus):
    _, out, manifest = curated
    planted = json.loads((sample_corpus / "planted.json").read_text())
    kept, drops, rejects = _ids(out / "kept"), _ids(out / "drops"), _ids(out / "rejects")
    assert manifest.read == planted["records"]
    assert len(kept) == manifest.kept and len(drops) == manifest.total_dropped
    assert len(rejects) == manifest.total_rejected == len(planted["malformed"])
    assert len(set(kept) | set(drops) | set(rejects)) == manifest.read
    saved = json.loads((out / "_manifest.json").read_text())
    assert saved["counts"]["reconciled"] is True


def test_dedup_inside_the_chain_removes_the_planted_copies(curated, sample_corpus):
    _, out, manifest = curated
    pairs = json.loads((sample_corpus / "planted.json").read_text())["pairs"]
    groups: dict[str, set[str]] = {}  # original -> its copies; the lowest id of each group stays
    for kind in ("exact", "reformat"):
        for dup, original in pairs[kind]:
            groups.setdefault(original, {original}).add(dup)
    copies = {i for g in groups.values() for i in g if i != min(g)}
    drops = pq.read_table(out / "drops").to_pydict()
    deduped = {
        i
        for i, r in zip(drops["id"], drops["drop_reason"], strict=True)
        if r == "exact_dedup:duplicate"
    }
    assert deduped == copies
    assert manifest.dropped["exact_dedup:duplicate"] == len(copies)
    assert all(
        r.split(":")[0] in {s.step_name for s in curated[0].steps} for r in drops["drop_reason"]
    )


def test_classifier_stage_scores_with_the_model_and_drops_at_the_threshold(
    curated, tiny_classifier
):
    from workloads.data.filters.toxicity import TextClassifierStage

    cfg, out, manifest = curated
    step = next(s for s in cfg.steps if s.type == "toxicity")
    scorer = TextClassifierStage(step, use_gpu=False)
    kept = pq.read_table(out / "kept").to_pydict()
    assert "toxicity_score" in kept and "pii_email" in kept and "language" in kept
    assert all(s < THRESHOLD for s in kept["toxicity_score"])
    drops = pq.read_table(out / "drops").to_pydict()
    toxic = [
        t for t, r in zip(drops["text"], drops["drop_reason"], strict=True) if r == "toxicity:toxic"
    ]
    assert manifest.dropped.get("toxicity:toxic", 0) == len(toxic)
    if toxic:
        assert (scorer.scores(toxic) >= THRESHOLD).all()
    # PII redaction runs after the classifier, so kept text is the redacted text; score the first
    # few documents without PII and compare with what the actor wrote.
    clean = [
        i
        for i in range(len(kept["id"]))
        if not any(
            kept[f"pii_{k}"][i]
            for k in ("email", "phone", "ip_address", "credit_card", "iban", "secret")
        )
    ][:8]
    ours = scorer.scores([kept["text"][i] for i in clean])
    for i, s in zip(clean, ours, strict=True):
        assert kept["toxicity_score"][i] == pytest.approx(float(s), abs=1e-4)


def test_rerun_resumes_every_stage_with_the_same_output(curated, sample_corpus, tiny_classifier):
    cfg, out, first = curated
    again = run(cfg)
    assert all(s.resumed for s in again.stages)
    assert again.kept == first.kept and again.dropped == first.dropped


def test_actor_pools_that_would_starve_the_reads_fail_before_any_work(
    ray_session, sample_corpus, tmp_path
):
    from workloads.common.manifest import JobFailed

    cfg = CurateConfig.model_validate(
        {
            "input": {"path": str(sample_corpus / "corpus")},
            "output": {"path": str(tmp_path / "out")},
            "steps": [{"type": "gopher_quality"}],
            "filter_actors": {"concurrency": 2, "num_cpus": 1},
        }
    )
    with pytest.raises(JobFailed, match="filter_actors.num_cpus"):
        run(cfg)
    assert not (tmp_path / "out" / "_stages").exists()
