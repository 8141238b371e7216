"""Quality, language and toxicity steps, and the per-batch pipeline functions. No Ray."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from workloads.common.config import ConfigError, load_config
from workloads.data.filters.heuristics import (
    C4QualityConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    c4_quality,
    fineweb_quality,
    gopher_quality,
    gopher_repetition,
)
from workloads.data.filters.language import LanguageConfig, detect_language, language_reason
from workloads.data.filters.pipeline import (
    WORK_FIELDS,
    CurateConfig,
    apply_steps,
    in_sample,
    reserved_actor_cpus,
    segments,
    start_rows,
    trim_dropped,
)
from workloads.data.filters.text import DocView
from workloads.data.filters.toxicity import profanity_scores
from workloads.data.sample import read_corpus_texts

PROSE = (
    "The committee met on Tuesday to review the proposal. Members agreed that the budget "
    "should be shared between the two schools, and that the new library would open in the "
    "spring. They also asked the city to repair the road that leads to the station, because "
    "it has been closed for most of the winter. A final report will be published next month, "
    "with a summary of the comments received from parents and teachers.\n"
    "Several parents said that the plan was fair. Others wanted more time to read it. "
    "The chair thanked everyone for coming and closed the meeting at nine."
)
STEP_TYPES = [
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4_quality",
    "fineweb_quality",
    "toxicity",
    "pii",
]


def curate_cfg(steps, **extra) -> CurateConfig:
    return CurateConfig.model_validate(
        {"input": {"path": "in"}, "output": {"path": "out"}, "steps": steps, **extra}
    )


def batch_of(texts: list[str | None]) -> pa.Table:
    n = len(texts)
    table = pa.table(
        {
            "id": [f"d{i}" for i in range(n)],
            "text": texts,
            "meta": [None] * n,
            "source": ["f.jsonl"] * n,
            "line": list(range(1, n + 1)),
            "reject_reason": [None] * n,
            "raw": [None] * n,
        },
        schema=pa.schema(WORK_FIELDS[:-1]),
    )
    return start_rows(table, max_doc_chars=1_000_000)


def test_clean_prose_passes_every_heuristic():
    view = DocView(PROSE)
    assert gopher_quality(view, GopherQualityConfig()) is None
    assert gopher_repetition(view, GopherRepetitionConfig()) is None
    assert fineweb_quality(view, FineWebQualityConfig()) is None
    reason, text = c4_quality(view, C4QualityConfig())
    assert reason is None and text == PROSE.strip()


def test_heuristics_catch_what_they_target():
    assert gopher_quality(DocView("too short"), GopherQualityConfig()) == "gopher_short_doc"
    hashes = PROSE + " #tag" * 40
    assert gopher_quality(DocView(hashes), GopherQualityConfig()) == "gopher_too_many_hashes"
    repeated = "\n".join(["Buy cheap watches online today."] * 10 + [PROSE])
    assert gopher_repetition(DocView(repeated), GopherRepetitionConfig()) == "dup_line_frac"
    assert c4_quality(DocView(PROSE + " {x}."), C4QualityConfig())[0] == "curly_bracket"
    assert c4_quality(DocView(PROSE + " Lorem ipsum."), C4QualityConfig())[0] == "lorem_ipsum"
    listing = "\n".join(f"item {i}" for i in range(50))
    assert fineweb_quality(DocView(listing), FineWebQualityConfig()) == "line_punct_ratio"


def test_c4_drops_lines_but_keeps_the_document():
    text = PROSE + "\nMenu\nThis site uses cookies to improve your experience."
    reason, rewritten = c4_quality(DocView(text), C4QualityConfig())
    assert reason is None
    assert "Menu" not in rewritten and "cookies" not in rewritten
    assert rewritten.startswith("The committee met")


def test_decisions_match_datatrove_on_the_sample_corpus(sample_corpus):
    """The reference implementation, document by document (the bench does this at scale)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    texts = [t for t in read_corpus_texts(sample_corpus / "corpus").values() if t.strip()][:200]
    pairs = [
        (GopherQualityFilter(), lambda v: gopher_quality(v, GopherQualityConfig())),
        (GopherRepetitionFilter(), lambda v: gopher_repetition(v, GopherRepetitionConfig())),
        (C4QualityFilter(), lambda v: c4_quality(v, C4QualityConfig())[0]),
        (FineWebQualityFilter(), lambda v: fineweb_quality(v, FineWebQualityConfig())),
    ]
    for ref, ours in pairs:
        for i, text in enumerate(texts):
            r = ref.filter(Document(text=text, id=str(i)))
            theirs = None if r is True else r[1]
            assert ours(DocView(text)) == theirs, (type(ref).__name__, i)


def test_language_id_offline():
    lang, score = detect_language(PROSE)
    assert lang == "en" and score > 0.9
    fr, _ = detect_language("Le comité s'est réuni mardi pour examiner la proposition du maire.")
    assert fr == "fr"
    cfg = LanguageConfig(languages=["en"], min_score=0.65)
    assert language_reason("en", 0.9, cfg) is None
    assert language_reason("fr", 0.99, cfg) == "not_allowed_fr"
    assert language_reason("en", 0.5, cfg) == "low_score"
    per_lang = LanguageConfig(languages=["en", "de"], min_score_by_language={"de": 0.9})
    assert language_reason("de", 0.8, per_lang) == "low_score"


def test_profanity_scores_separate_abuse_from_prose():
    clean, abusive = profanity_scores([PROSE, "you are a fucking idiot, shut the fuck up"], 1000)
    assert clean < 0.5 <= abusive


def test_apply_steps_reasons_annotations_and_pass_through():
    cfg = curate_cfg(
        [
            {"type": "language"},
            {"type": "gopher_quality", "mode": "annotate", "name": "gq"},
            {"type": "toxicity"},
            {"type": "pii"},
        ]
    )
    toxic = PROSE + " You fucking idiot, fuck off."
    batch = batch_of([PROSE, "Ceci est un texte entièrement en français, pas en anglais.", toxic])
    out = apply_steps(batch, steps=cfg.steps).to_pydict()
    assert out["drop_reason"] == [None, "language:not_allowed_fr", "toxicity:toxic"]
    assert out["language"][0] == "en" and out["language"][1] == "fr"
    assert out["gq_flag"][0] is None  # annotate: the reason (none here) goes to a column
    assert out["toxicity_score"][1] is None  # dropped before toxicity ran: never scored
    assert out["toxicity_score"][2] >= 0.5
    contact = batch_of([PROSE + " Write to jane.doe@example.com for details."])
    redacted = apply_steps(contact, steps=[cfg.steps[3]]).to_pydict()
    assert "jane.doe@example.com" not in redacted["text"][0]
    assert redacted["pii_email"] == [1]


def test_annotate_mode_keeps_the_document():
    cfg = curate_cfg([{"type": "gopher_quality", "mode": "annotate"}])
    out = apply_steps(batch_of(["too short"]), steps=cfg.steps).to_pydict()
    assert out["drop_reason"] == [None]
    assert out["gopher_quality_flag"] == ["gopher_short_doc"]


def test_too_long_documents_are_dropped_before_any_step():
    table = batch_of(["x" * 20])
    table = start_rows(table.drop_columns(["drop_reason"]), max_doc_chars=10)
    assert table["drop_reason"].to_pylist() == ["input:too_long"]


@pytest.mark.timeout(120)
def test_pathological_documents_have_bounded_cost():
    """1 MB on one line, binary junk and mixed scripts go through every step without a hang."""
    rng = random.Random(0)
    docs = [
        "".join(chr(rng.randrange(32, 127)) for _ in range(999_000)),
        bytes(rng.randrange(256) for _ in range(200_000)).decode("latin-1"),
        "9" * 999_000,
        ("Привет мир 你好世界 hello world مرحبا.\n" * 20_000)[:999_000],
    ]
    for t in STEP_TYPES:
        steps = curate_cfg([{"type": t}]).steps
        out = apply_steps(batch_of(docs), steps=steps)
        assert out.num_rows == len(docs)
        assert all(r is None or r.startswith(f"{t}:") for r in out["drop_reason"].to_pylist())


def test_segments_split_at_dedup_steps():
    cfg = curate_cfg(
        [{"type": "language"}, {"type": "exact_dedup"}, {"type": "pii"}, {"type": "gopher_quality"}]
    )
    assert [[s.type for s in seg] for seg in segments(cfg.steps)] == [
        ["language"],
        ["exact_dedup"],
        ["pii", "gopher_quality"],
    ]


def test_drop_sample_is_deterministic():
    table = batch_of([f"text {i}" for i in range(2000)])
    a = in_sample(table, fraction=0.1)["id"].to_pylist()
    assert a == in_sample(table, fraction=0.1)["id"].to_pylist()
    assert 120 < len(a) < 280


def test_bad_configs_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "input: {path: in}\noutput: {path: out}\nsteps:\n  - type: gopher_quality\n    min_doc_wrds: 3\n"
    )
    with pytest.raises(ConfigError, match="min_doc_wrds"):
        load_config(CurateConfig, path)
    path.write_text("input: {path: in}\noutput: {path: out}\nsteps:\n  - type: nonsense\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(CurateConfig, path)
    path.write_text(
        "input: {path: in}\noutput: {path: out}\nsteps:\n  - type: toxicity\n    backend: hf_classifier\n"
    )
    with pytest.raises(ConfigError, match="toxicity.model"):
        load_config(CurateConfig, path)
    path.write_text(
        "input: {path: in}\noutput: {path: out}\nsteps:\n  - type: pii\n  - type: pii\n"
    )
    with pytest.raises(ConfigError, match="unique"):
        load_config(CurateConfig, path)


def test_dropped_text_outside_the_sample_is_cleared():
    table = batch_of([f"text {i}" for i in range(1000)])
    reasons = pa.array(["gopher_quality:x" if i % 2 else None for i in range(1000)], pa.string())
    table = table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason", reasons)
    out = trim_dropped(table, fraction=0.1).to_pydict()
    live_text = [t for t, r in zip(out["text"], out["drop_reason"], strict=True) if r is None]
    dropped_text = [t for t, r in zip(out["text"], out["drop_reason"], strict=True) if r]
    assert None not in live_text  # live rows are never touched
    kept = [t for t in dropped_text if t is not None]
    assert 20 < len(kept) < 80  # ~10% of the 500 dropped rows keep their text
    assert trim_dropped(table, fraction=1.0) is table


def test_reserved_actor_cpus_count_every_pool_of_a_segment():
    cfg = curate_cfg(
        [
            {"type": "language"},
            {"type": "toxicity", "backend": "hf_classifier", "model": "m", "num_cpus": 0.5},
            {"type": "pii"},
        ],
        filter_actors={"concurrency": [1, 3], "num_cpus": 0.5},
    )
    # two fused runs (before and after the classifier) of up to 3 actors, plus the classifier
    assert reserved_actor_cpus(cfg.steps, cfg.filter_actors) == 3 * 0.5 * 2 + 0.5
