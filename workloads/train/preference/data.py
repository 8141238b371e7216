"""Preference records to TRL's conversational preference format, with a reject reason for each bad one:
the per-record logic of the preference job (DPO, IPO, ORPO on pairs; KTO on labelled completions).

    from workloads.train.preference.data import to_preference_pair, to_kto_examples
    pair = to_preference_pair(record, "auto")     # {"prompt", "chosen", "rejected"} or a reason
    examples = to_kto_examples(record, "auto")    # [{"prompt", "completion", "label"}, ...] or a reason

Accepted layouts (`formatting`, `auto` decides per record):
  standard        {"prompt": str, "chosen": str, "rejected": str}                 (TRL's standard form)
  conversational  {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}, or
                  full conversations in chosen/rejected that share all but the last turn (TRL's
                  implicit prompt; HuggingFaceH4/ultrafeedback_binarized, whose extra `prompt`
                  string is then ignored)
  ultrafeedback   {"instruction" or "prompt": str, "completions": [{"response", "overall_score"}]}:
                  rated completions, binarised to (best, worst) when the score margin is at least
                  `min_margin` (openbmb/UltraFeedback's layout)
  unpaired        {"prompt", "completion", "label": bool} (KTO only)
Every result is conversational: the prompt is a list of messages ending with a user turn and each
completion one assistant message, so the trainer renders both with the tokenizer's chat template.
"""

from __future__ import annotations

from typing import Any

from workloads.common.documents import NOT_AN_OBJECT
from workloads.train.conversations import (
    MALFORMED_TURN,
    TEMPLATE_REJECTED,
    UNKNOWN_FORMAT,
    UNKNOWN_ROLE,
    parse_turns,
)

# Why a record was rejected. Stable strings: they appear in manifests and rejects/.
MISSING_PROMPT = "missing_prompt"
MISSING_CHOSEN = "missing_chosen"
MISSING_REJECTED = "missing_rejected"
MISSING_COMPLETION = "missing_completion"
MISSING_LABEL = "missing_label"  # a KTO record whose label is absent or not a boolean
EMPTY_PROMPT = "empty_prompt"
EMPTY_COMPLETION = "empty_completion"
IDENTICAL_COMPLETIONS = "identical_completions"  # chosen == rejected: no preference to learn
PROMPT_NOT_ENDING_WITH_USER = "prompt_not_ending_with_user"
NO_SHARED_PROMPT = "no_shared_prompt"  # implicit prompt: chosen and rejected differ before the end
TOO_FEW_COMPLETIONS = "too_few_completions"  # ultrafeedback: fewer than two rated completions
MISSING_SCORE = "missing_score"
MARGIN_TOO_SMALL = "margin_too_small"  # ultrafeedback: best and worst scores too close to call
UNPAIRED_RECORD = (
    "unpaired_record"  # prompt/completion/label given to a pairwise algorithm (DPO, ORPO)
)
PROMPT_TOO_LONG = "prompt_too_long"  # the prompt alone fills data.max_length: no completion left
REJECT_REASONS = (
    NOT_AN_OBJECT,
    UNKNOWN_FORMAT,
    MALFORMED_TURN,
    UNKNOWN_ROLE,
    MISSING_PROMPT,
    MISSING_CHOSEN,
    MISSING_REJECTED,
    MISSING_COMPLETION,
    MISSING_LABEL,
    EMPTY_PROMPT,
    EMPTY_COMPLETION,
    IDENTICAL_COMPLETIONS,
    PROMPT_NOT_ENDING_WITH_USER,
    NO_SHARED_PROMPT,
    TOO_FEW_COMPLETIONS,
    MISSING_SCORE,
    MARGIN_TOO_SMALL,
    UNPAIRED_RECORD,
    PROMPT_TOO_LONG,
    TEMPLATE_REJECTED,
)

PAIR_FORMATTINGS = ("auto", "standard", "conversational", "ultrafeedback")
KTO_FORMATTINGS = (*PAIR_FORMATTINGS, "unpaired")

Messages = list[dict[str, str]]


def _messages(value: Any) -> Messages | str:
    """A non-empty list of {"role", "content"} with known roles and string contents, or a reason."""
    if not isinstance(value, list) or not value:
        return MALFORMED_TURN
    return parse_turns(value)


def _prompt(value: Any) -> Messages | str:
    """A prompt as messages ending with a user turn: a string is one user turn."""
    if value is None:
        return MISSING_PROMPT
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else EMPTY_PROMPT
    messages = _messages(value)
    if isinstance(messages, str):
        return messages
    if any(not m["content"].strip() for m in messages):
        return EMPTY_PROMPT
    if messages[-1]["role"] != "user":
        return PROMPT_NOT_ENDING_WITH_USER
    return messages


def _completion(value: Any, missing: str) -> Messages | str:
    """A completion as one assistant message: a string, or a one-message assistant list."""
    if value is None:
        return missing
    if isinstance(value, str):
        text = value
    else:
        messages = _messages(value)
        if isinstance(messages, str):
            return messages
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            return MALFORMED_TURN
        text = messages[0]["content"]
    return [{"role": "assistant", "content": text}] if text.strip() else EMPTY_COMPLETION


def _split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | str:
    """(prompt, chosen, rejected) from two full conversations that share all but the last turn."""
    c, r = _messages(chosen), _messages(rejected)
    for side in (c, r):
        if isinstance(side, str):
            return side
    if len(c) < 2 or len(r) < 2 or c[:-1] != r[:-1]:
        return NO_SHARED_PROMPT
    return c[:-1], c[-1:], r[-1:]


def binarize_ratings(
    prompt: Any, completions: Any, *, min_margin: float, score_key: str = "overall_score"
) -> dict | str:
    """The best- and worst-rated completions as a pair, when their scores differ by `min_margin`
    or more. (HuggingFaceH4's ultrafeedback_binarized pairs the best with a random other; the
    worst gives the clearest signal and is deterministic.)"""
    if not isinstance(completions, list):
        return MISSING_COMPLETION
    rated = []
    for item in completions:
        if not isinstance(item, dict) or not isinstance(item.get("response"), str):
            return MALFORMED_TURN
        score = item.get(score_key)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return MISSING_SCORE
        rated.append((float(score), item["response"]))
    if len(rated) < 2:
        return TOO_FEW_COMPLETIONS
    # Stable: among equal scores the earliest wins, so the pair does not depend on sort details.
    best = max(rated, key=lambda s: s[0])
    worst = min(rated, key=lambda s: s[0])
    if best[0] - worst[0] < min_margin:
        return MARGIN_TOO_SMALL
    return _pair({"prompt": prompt, "chosen": best[1], "rejected": worst[1]})


def _pair(record: dict) -> dict | str:
    # Full conversations in chosen/rejected: TRL's implicit prompt, and also HuggingFaceH4's
    # ultrafeedback_binarized, whose `prompt` string repeats the user turn the conversations hold.
    chosen = record.get("chosen")
    prompt = record.get("prompt")
    if isinstance(chosen, list) and (
        prompt is None or (isinstance(prompt, str) and len(chosen) > 1)
    ):
        split = _split_implicit(record.get("chosen"), record.get("rejected"))
        if isinstance(split, str):
            return split
        record = {"prompt": split[0], "chosen": split[1], "rejected": split[2]}
    prompt = _prompt(record.get("prompt"))
    if isinstance(prompt, str):
        return prompt
    chosen = _completion(record.get("chosen"), MISSING_CHOSEN)
    if isinstance(chosen, str):
        return chosen
    rejected = _completion(record.get("rejected"), MISSING_REJECTED)
    if isinstance(rejected, str):
        return rejected
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        return IDENTICAL_COMPLETIONS
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def detect_formatting(record: dict) -> str | None:
    if record.get("completions") is not None:
        return "ultrafeedback"
    if record.get("chosen") is not None or record.get("rejected") is not None:
        if isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list):
            return "conversational"
        return "standard"
    if record.get("completion") is not None or "label" in record:
        return "unpaired"
    return None


def to_preference_pair(record: Any, formatting: str, *, min_margin: float = 1.0) -> dict | str:
    """`record` as {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}, or the
    reason it cannot be one. `min_margin` applies to rated (ultrafeedback) records."""
    if formatting not in PAIR_FORMATTINGS:
        raise ValueError(f"formatting must be one of {PAIR_FORMATTINGS}, not {formatting!r}")
    if not isinstance(record, dict):
        return NOT_AN_OBJECT
    if formatting == "auto":
        formatting = detect_formatting(record)
        if formatting == "unpaired":
            return UNPAIRED_RECORD
        if formatting not in PAIR_FORMATTINGS:
            return UNKNOWN_FORMAT
    if formatting == "ultrafeedback":
        prompt = record.get("prompt", record.get("instruction"))
        return binarize_ratings(prompt, record.get("completions"), min_margin=min_margin)
    return _pair(record)


def to_kto_examples(record: Any, formatting: str, *, min_margin: float = 1.0) -> list[dict] | str:
    """KTO examples {"prompt", "completion", "label"}: one from an unpaired record, two (chosen
    desirable, rejected undesirable) from a pair, or the reason there are none."""
    if formatting not in KTO_FORMATTINGS:
        raise ValueError(f"formatting must be one of {KTO_FORMATTINGS}, not {formatting!r}")
    if not isinstance(record, dict):
        return NOT_AN_OBJECT
    if formatting == "auto":
        formatting = detect_formatting(record)
        if formatting is None:
            return UNKNOWN_FORMAT
    if formatting != "unpaired":
        pair = to_preference_pair(record, formatting, min_margin=min_margin)
        if isinstance(pair, str):
            return pair
        return [
            {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
        ]
    prompt = _prompt(record.get("prompt"))
    if isinstance(prompt, str):
        return prompt
    completion = _completion(record.get("completion"), MISSING_COMPLETION)
    if isinstance(completion, str):
        return completion
    if not isinstance(record.get("label"), bool):
        return MISSING_LABEL
    return [{"prompt": prompt, "completion": completion, "label": record["label"]}]
