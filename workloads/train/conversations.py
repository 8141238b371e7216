"""Chat records to token ids with an assistant-only loss mask: the per-record logic of the SFT job.

    from workloads.train.conversations import check_chat_template, to_messages, tokenize_conversation
    check_chat_template(tokenizer, assistant_only_loss=True)      # once, before any Ray work
    messages = to_messages(record, "auto")                       # list of {"role","content"} or reason
    example = tokenize_conversation(tokenizer, messages, max_length=2048)  # dict or reason

A record is in one of three shapes: alpaca (`instruction`, `input`, `output`, optional `system` and
`history`), sharegpt as LLaMA-Factory reads it (`conversations` of `{"from","value"}`, optional
`system`), or OpenAI chat (`messages` of `{"role","content"}`). `to_messages` turns each into one
list of system/user/assistant messages; `tokenize_conversation` renders it with the tokenizer's chat
template and keeps `assistant_masks`, so only the assistant's tokens (its end-of-turn token
included) are learnt. Neither raises on bad data: they return a reject reason, which the job counts
in its manifest and writes to rejects/. `check_chat_template` raises once, up front, when the
template would make every record useless (no `{% generation %}` markers, end-of-turn token unmasked).
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from workloads.common.documents import NOT_AN_OBJECT

# Why a record was rejected. Stable strings: they appear in manifests and rejects/.
UNKNOWN_FORMAT = "unknown_format"  # auto: none of messages / conversations / instruction+output
MISSING_MESSAGES = "missing_messages"
MISSING_CONVERSATIONS = "missing_conversations"
MISSING_INSTRUCTION = "missing_instruction"
MISSING_OUTPUT = "missing_output"
NOT_A_LIST = "not_a_list"  # messages, conversations or history is not a list
MALFORMED_TURN = "malformed_turn"  # a turn is not an object with string role and content
UNKNOWN_ROLE = "unknown_role"  # a role other than system/user/assistant (tool, function_call, ...)
EMPTY_TURN = "empty_turn"  # a turn whose content is empty or only whitespace
NO_ASSISTANT_TURN = "no_assistant_turn"
SYSTEM_NOT_FIRST = "system_not_first"
LAST_TURN_NOT_ASSISTANT = "last_turn_not_assistant"  # nothing to learn after the last user turn
TEMPLATE_REJECTED = "template_rejected"  # the chat template raised, e.g. "roles must alternate"
NO_TRAINABLE_TOKENS = "no_trainable_tokens"  # after truncation no assistant token is left
REJECT_REASONS = (
    NOT_AN_OBJECT,
    UNKNOWN_FORMAT,
    MISSING_MESSAGES,
    MISSING_CONVERSATIONS,
    MISSING_INSTRUCTION,
    MISSING_OUTPUT,
    NOT_A_LIST,
    MALFORMED_TURN,
    UNKNOWN_ROLE,
    EMPTY_TURN,
    NO_ASSISTANT_TURN,
    SYSTEM_NOT_FIRST,
    LAST_TURN_NOT_ASSISTANT,
    TEMPLATE_REJECTED,
    NO_TRAINABLE_TOKENS,
)

FORMATTINGS = ("auto", "alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
# LLaMA-Factory's sharegpt tags (human/gpt), plus the role names other exports use.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

Messages = list[dict[str, str]]


def _is_optional_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def parse_turns(turns: list) -> Messages | str:
    """OpenAI-style turns as {"role", "content"} messages (other keys dropped), or the reason they
    are not: a turn without string role and content, or a role other than system/user/assistant."""
    messages = []
    for turn in turns:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            return MALFORMED_TURN
        if turn["role"] not in ROLES:
            return UNKNOWN_ROLE
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def _from_messages(record: dict) -> Messages | str:
    turns = record.get("messages")
    if turns is None:
        return MISSING_MESSAGES
    if not isinstance(turns, list):
        return NOT_A_LIST
    return parse_turns(turns)


def _from_sharegpt(record: dict) -> Messages | str:
    turns = record.get("conversations")
    if turns is None:
        return MISSING_CONVERSATIONS
    if not isinstance(turns, list):
        return NOT_A_LIST
    # A blank top-level system is the same as none: datasets often carry the column for every row.
    system = record.get("system")
    if not _is_optional_text(system):
        return MALFORMED_TURN
    messages = [{"role": "system", "content": system}] if _has_text(system) else []
    for turn in turns:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str)
        ):
            return MALFORMED_TURN
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            return UNKNOWN_ROLE
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _from_alpaca(record: dict) -> Messages | str:
    if record.get("instruction") is None:
        return MISSING_INSTRUCTION
    if record.get("output") is None:
        return MISSING_OUTPUT
    instruction, output = record["instruction"], record["output"]
    extra_input, system = record.get("input"), record.get("system")
    if not (
        isinstance(instruction, str)
        and isinstance(output, str)
        and _is_optional_text(extra_input)
        and _is_optional_text(system)
    ):
        return MALFORMED_TURN
    messages = [{"role": "system", "content": system}] if _has_text(system) else []
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            return NOT_A_LIST
        for pair in history:
            if not (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(isinstance(text, str) for text in pair)
            ):
                return MALFORMED_TURN
            messages.append({"role": "user", "content": pair[0]})
            messages.append({"role": "assistant", "content": pair[1]})
    # An empty instruction with a real input is common in scraped alpaca sets: use the input alone.
    prompt = "\n\n".join(text for text in (instruction, extra_input) if _has_text(text))
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages


_CONVERTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}


def detect_formatting(record: dict) -> str | None:
    """The formatting `auto` picks for `record`, or None. A key whose value is null does not count
    (Parquet fills a column that only some rows have with nulls)."""
    if record.get("messages") is not None:
        return "messages"
    if record.get("conversations") is not None:
        return "sharegpt"
    if record.get("instruction") is not None and record.get("output") is not None:
        return "alpaca"
    return None


def _check_turns(messages: Messages) -> Messages | str:
    if any(not m["content"].strip() for m in messages):
        return EMPTY_TURN
    if any(m["role"] == "system" for m in messages[1:]):
        return SYSTEM_NOT_FIRST
    if not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT_TURN
    if messages[-1]["role"] != "assistant":
        return LAST_TURN_NOT_ASSISTANT
    return messages


def to_messages(record: Any, formatting: str) -> Messages | str:
    """`record` as a list of {"role", "content"} messages, or the reason it cannot be one.

    The result starts with at most one system message, has non-blank contents, and ends with an
    assistant turn. Content is kept as written (no stripping): whitespace can matter, as in code.
    """
    if formatting not in FORMATTINGS:
        raise ValueError(f"formatting must be one of {FORMATTINGS}, not {formatting!r}")
    if not isinstance(record, dict):
        return NOT_AN_OBJECT
    if formatting == "auto":
        formatting = detect_formatting(record)
        if formatting is None:
            return UNKNOWN_FORMAT
    messages = _CONVERTERS[formatting](record)
    return messages if isinstance(messages, str) else _check_turns(messages)


def tokenize_conversation(
    tokenizer, messages: Messages, *, max_length: int, assistant_only_loss: bool = True
) -> dict[str, Any] | str:
    """Render `messages` with the tokenizer's chat template and tokenize them, or say why not.

    Returns {"input_ids", "assistant_masks", "n_tokens", "n_trainable", "truncated"}: the first
    `max_length` tokens, and a mask that is 1 on the tokens the loss is computed on (the assistant's,
    from the template's `{% generation %}` blocks; every token when `assistant_only_loss` is off).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")
    try:
        # The mask is only asked for when it is used: without generation markers, asking for it
        # makes transformers warn.
        encoded = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
        )
    except TemplateError:  # the template's raise_exception(): a record it refuses, not a bug
        return TEMPLATE_REJECTED
    input_ids = [int(i) for i in encoded["input_ids"]]
    masks = [int(m) for m in encoded["assistant_masks"]] if assistant_only_loss else None
    truncated = len(input_ids) > max_length
    input_ids = input_ids[:max_length]
    masks = masks[:max_length] if masks is not None else [1] * len(input_ids)
    n_trainable = sum(masks)
    if n_trainable == 0:
        return NO_TRAINABLE_TOKENS
    return {
        "input_ids": input_ids,
        "assistant_masks": masks,
        "n_tokens": len(input_ids),
        "n_trainable": n_trainable,
        "truncated": truncated,
    }


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot train this way; the message says what to change."""


# Distinct, plain-word contents, so each one is found in the decoded tokens of exactly one turn.
_PROBE = (
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And what colour is grass?"},
    {"role": "assistant", "content": "Grass is green."},
)


def _masked_spans(input_ids: list[int], masks: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = 0
    for token, mask in zip(input_ids, masks, strict=True):
        if mask and not previous:
            spans.append([])
        if mask:
            spans[-1].append(token)
        previous = mask
    return spans


def check_chat_template(tokenizer, *, assistant_only_loss: bool = True) -> None:
    """Raise ChatTemplateError unless the chat template can train a model that answers and stops.

    Renders a probe conversation (system, user, assistant, user, assistant) and checks that each
    assistant reply is followed by the end-of-turn token (`tokenizer.eos_token`) and, with
    `assistant_only_loss`, that the mask covers each reply and its end-of-turn token and no other
    turn's text. A template without `{% generation %}` markers masks every token, and one that
    leaves the end-of-turn token out of the mask trains a model that never stops; neither fails
    loudly in training, so this runs before it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat template: use an instruct/chat model's tokenizer, or set "
            "tokenizer.chat_template to one (with {% generation %} markers around the assistant's "
            "reply and its end-of-turn token, for assistant-only loss)"
        )
    eos = tokenizer.eos_token
    if eos is None:
        raise ChatTemplateError(
            "the tokenizer has no eos_token: set it to the chat template's end-of-turn token, "
            "which generation stops on"
        )
    messages = [dict(m) for m in _PROBE]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
        )
    except Exception as exc:
        raise ChatTemplateError(
            f"the chat template fails on a system, user, assistant, user, assistant conversation: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    others = [m["content"] for m in messages if m["role"] != "assistant"]

    position = 0
    for reply in replies:
        start = rendered.find(reply, position)
        end_of_turn = rendered.find(eos, start + len(reply)) if start >= 0 else -1
        next_turn = min((i for c in others if (i := rendered.find(c, start)) >= 0), default=None)
        if start < 0 or end_of_turn < 0 or (next_turn is not None and end_of_turn > next_turn):
            raise ChatTemplateError(
                f"the chat template does not end each assistant turn with the tokenizer's "
                f"eos_token {eos!r}: the model would never learn to stop. Set eos_token to the "
                f"template's end-of-turn token, or use a template that emits it. Rendered: "
                f"{rendered!r}"
            )
        position = end_of_turn
    if not assistant_only_loss:
        return

    spans = _masked_spans(list(encoded["input_ids"]), list(encoded["assistant_masks"]))
    if not spans:
        raise ChatTemplateError(
            "the chat template has no {% generation %} markers, so the assistant-only loss mask is "
            "all zeros and every token would be masked: set data.assistant_only_loss=false (train "
            "on every token), or use a chat template with {% generation %}...{% endgeneration %} "
            "around the assistant's reply and its end-of-turn token"
        )
    texts = [tokenizer.decode(span) for span in spans]
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    for reply in replies:
        span = next((s for s, t in zip(spans, texts, strict=True) if reply in t), None)
        if span is None:
            raise ChatTemplateError(
                f"the assistant-only loss mask does not cover the assistant's reply {reply!r} "
                f"(masked text: {texts!r}): put {{% generation %}}...{{% endgeneration %}} around "
                f"the reply in the chat template, or set data.assistant_only_loss=false"
            )
        if eos_id not in span:
            raise ChatTemplateError(
                f"the end-of-turn token {eos!r} is outside the assistant-only loss mask (masked "
                f"text: {texts!r}), so the model would never learn to stop: move it inside the "
                f"template's {{% generation %}}...{{% endgeneration %}} block, or set "
                f"data.assistant_only_loss=false"
            )
    leaked = [c for c in others if any(c in t for t in texts)]
    if leaked:
        raise ChatTemplateError(
            f"the assistant-only loss mask covers text that is not the assistant's ({leaked!r}): "
            f"the template's {{% generation %}} blocks must wrap only assistant turns"
        )
