"""Preference records (standard, conversational, implicit prompt, rated, unpaired) to TRL's
conversational preference format, and every reject reason from a realistic bad record."""

from __future__ import annotations

import pytest

from workloads.train.preference import data as pref

USER = {"role": "user", "content": "What does len() return?"}
GOOD = {"role": "assistant", "content": "The number of items."}
BAD = {"role": "assistant", "content": "A string."}


def test_standard_pair():
    pair = pref.to_preference_pair(
        {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}, "auto"
    )
    assert pair == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_conversational_pair_keeps_the_history():
    system = {"role": "system", "content": "Answer briefly."}
    pair = pref.to_preference_pair(
        {"prompt": [system, USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"
    )
    assert pair["prompt"] == [system, USER] and pair["chosen"] == [GOOD]


def test_implicit_prompt_is_the_shared_prefix():
    pair = pref.to_preference_pair({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "auto")
    assert pair == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_ultrafeedback_binarized_layout_uses_the_conversations():
    """HuggingFaceH4/ultrafeedback_binarized: a `prompt` string, and chosen/rejected as whole
    conversations (the user turn repeated in each)."""
    record = {
        "prompt": USER["content"],
        "prompt_id": "abc",
        "chosen": [USER, GOOD],
        "rejected": [USER, BAD],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    pair = pref.to_preference_pair(record, "auto")
    assert pair == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_rated_completions_binarise_best_against_worst():
    record = {
        "instruction": USER["content"],
        "completions": [
            {"response": "A string.", "overall_score": 2},
            {"response": "The number of items.", "overall_score": 9},
            {"response": "An int, the size.", "overall_score": 7.5},
        ],
    }
    pair = pref.to_preference_pair(record, "auto", min_margin=1.0)
    assert pair["chosen"][0]["content"] == "The number of items."
    assert pair["rejected"][0]["content"] == "A string."
    assert pref.to_preference_pair(record, "auto", min_margin=8) == pref.MARGIN_TOO_SMALL


def test_kto_from_unpaired_and_from_pairs():
    unpaired = {"prompt": USER["content"], "completion": GOOD["content"], "label": True}
    assert pref.to_kto_examples(unpaired, "auto") == [
        {"prompt": [USER], "completion": [GOOD], "label": True}
    ]
    paired = {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}
    examples = pref.to_kto_examples(paired, "auto")
    assert [(e["completion"], e["label"]) for e in examples] == [([GOOD], True), ([BAD], False)]


BAD_RECORDS = [
    ("not an object", "auto", pref.NOT_AN_OBJECT),
    ({"question": "q", "answer": "a"}, "auto", pref.UNKNOWN_FORMAT),
    ({"chosen": "a", "rejected": "b"}, "standard", pref.MISSING_PROMPT),
    ({"prompt": "q", "rejected": "b"}, "standard", pref.MISSING_CHOSEN),
    ({"prompt": "q", "chosen": "a"}, "standard", pref.MISSING_REJECTED),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "standard", pref.EMPTY_PROMPT),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "standard", pref.EMPTY_COMPLETION),
    (
        {"prompt": "q", "chosen": "same", "rejected": "same "},
        "standard",
        pref.IDENTICAL_COMPLETIONS,
    ),
    (
        {"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},
        "conversational",
        pref.PROMPT_NOT_ENDING_WITH_USER,
    ),
    (
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": [GOOD], "rejected": [BAD]},
        "conversational",
        pref.UNKNOWN_ROLE,
    ),
    (
        {"prompt": [USER], "chosen": [GOOD, GOOD], "rejected": [BAD]},
        "conversational",
        pref.MALFORMED_TURN,
    ),
    (
        {"prompt": [{"role": "user"}], "chosen": [GOOD], "rejected": [BAD]},
        "auto",
        pref.MALFORMED_TURN,
    ),
    (
        {"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},
        "auto",
        pref.NO_SHARED_PROMPT,
    ),
    (
        {"prompt": "q", "completions": [{"response": "a", "overall_score": 5}]},
        "auto",
        pref.TOO_FEW_COMPLETIONS,
    ),
    (
        {"prompt": "q", "completions": [{"response": "a"}, {"response": "b", "overall_score": 1}]},
        "auto",
        pref.MISSING_SCORE,
    ),
    (
        {
            "prompt": "q",
            "completions": [
                {"response": "a", "overall_score": 5},
                {"response": "b", "overall_score": 4.5},
            ],
        },
        "auto",
        pref.MARGIN_TOO_SMALL,
    ),
    ({"prompt": "q", "completions": "a, b"}, "ultrafeedback", pref.MISSING_COMPLETION),
]
# Good for KTO, not for a pairwise algorithm.
PAIR_ONLY_BAD = [({"prompt": "q", "completion": "a", "label": True}, "auto", pref.UNPAIRED_RECORD)]
KTO_BAD = [
    ({"prompt": "q", "completion": "a"}, "unpaired", pref.MISSING_LABEL),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", pref.MISSING_LABEL),
    ({"prompt": "q", "label": True}, "unpaired", pref.MISSING_COMPLETION),
]


@pytest.mark.parametrize(("record", "formatting", "reason"), BAD_RECORDS + PAIR_ONLY_BAD)
def test_bad_pairs_are_rejected_with_their_reason(record, formatting, reason):
    assert pref.to_preference_pair(record, formatting, min_margin=1.0) == reason


@pytest.mark.parametrize(("record", "formatting", "reason"), KTO_BAD + BAD_RECORDS[:3])
def test_bad_kto_records_are_rejected_with_their_reason(record, formatting, reason):
    assert pref.to_kto_examples(record, formatting) == reason


def test_every_reason_is_produced_by_some_record():
    produced = {reason for *_, reason in BAD_RECORDS + PAIR_ONLY_BAD + KTO_BAD}
    # The job's tokenization gives the other two (tests/unit/test_preference_job.py).
    assert produced == set(pref.REJECT_REASONS) - {pref.PROMPT_TOO_LONG, pref.TEMPLATE_REJECTED}


def test_an_unknown_formatting_is_a_config_error():
    with pytest.raises(ValueError, match="formatting"):
        pref.to_preference_pair({}, "alpaca")
