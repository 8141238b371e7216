"""SFT records: alpaca, sharegpt and messages become one chat; only the assistant's tokens train."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

from workloads.train import conversations as conv  # noqa: E402
from workloads.train.conversations import (  # noqa: E402
    ChatTemplateError,
    check_chat_template,
    to_messages,
    tokenize_conversation,
)
from workloads.train.tiny import CHAT_TEMPLATE, IM_END, train_tokenizer  # noqa: E402

# A few KB of chat-like English, enough for a 512-token BPE to learn common words.
_CORPUS = [
    "You are a helpful assistant. Answer in one short sentence.",
    "What is a list in Python? A list is a mutable sequence of values.",
    "How do I reverse a string? Use slicing with a step of minus one.",
    "What colour is the sky? The sky is blue on a clear day.",
    "Translate hello into French. Bonjour is hello in French.",
    "Summarise the text below in one line. The report says sales grew by ten percent.",
    "Write a haiku about rain. Soft rain on the roof, the garden drinks it slowly, night hums.",
    "Why is the sea salty? Rivers carry dissolved minerals into the sea, and water evaporates.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
] * 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_CORPUS, vocab_size=512)


def _with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


# --- to_messages ---------------------------------------------------------------------------------


def test_messages_format_keeps_roles_and_drops_extra_keys():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief.", "name": "ops"},
            {"role": "user", "content": "What is a list?", "weight": 0},
            {"role": "assistant", "content": "A mutable sequence."},
            {"role": "user", "content": "And a tuple?"},
            {"role": "assistant", "content": "An immutable one."},
        ],
        "id": 7,
    }
    assert to_messages(record, "messages") == CHAT


def test_sharegpt_maps_llama_factory_roles_and_prepends_system():
    record = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "What is a list?"},
            {"from": "gpt", "value": "A mutable sequence."},
            {"from": "user", "value": "And a tuple?"},
            {"from": "model", "value": "An immutable one."},
        ],
    }
    assert to_messages(record, "sharegpt") == CHAT
    blank_system = {**record, "system": ""}
    assert to_messages(blank_system, "sharegpt") == CHAT[1:]


def test_alpaca_puts_history_first_and_joins_instruction_and_input():
    record = {
        "system": "Be brief.",
        "history": [["What is a list?", "A mutable sequence."]],
        "instruction": "Summarise the text.",
        "input": "Sales grew by ten percent.",
        "output": "Sales grew.",
    }
    assert to_messages(record, "alpaca") == [
        *CHAT[:3],
        {"role": "user", "content": "Summarise the text.\n\nSales grew by ten percent."},
        {"role": "assistant", "content": "Sales grew."},
    ]
    plain = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert to_messages(plain, "alpaca") == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ]
    input_only = {"instruction": "", "input": "Say hi.", "output": "Hi."}
    assert to_messages(input_only, "alpaca") == to_messages(plain, "alpaca")


@pytest.mark.parametrize(
    "record",
    [
        {"messages": CHAT[1:3]},
        {"conversations": [{"from": "human", "value": "What is a list?"},
                           {"from": "gpt", "value": "A mutable sequence."}]},
        {"instruction": "What is a list?", "output": "A mutable sequence.", "messages": None},
    ],
    ids=["messages", "sharegpt", "alpaca"],
)  # fmt: skip
def test_auto_detects_each_format(record):
    assert to_messages(record, "auto") == CHAT[1:3]


def _turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# One realistic bad record per reason (NO_TRAINABLE_TOKENS is tokenize_conversation's, below).
BAD_RECORDS = [
    (["a", "list"], "auto", conv.NOT_AN_OBJECT),
    ({"text": "plain pretraining text"}, "auto", conv.UNKNOWN_FORMAT),
    ({"instruction": "Say hi."}, "auto", conv.UNKNOWN_FORMAT),
    ({"conversations": []}, "messages", conv.MISSING_MESSAGES),
    ({"messages": []}, "sharegpt", conv.MISSING_CONVERSATIONS),
    ({"prompt": "Say hi.", "output": "Hi."}, "alpaca", conv.MISSING_INSTRUCTION),
    ({"instruction": "Say hi.", "response": "Hi."}, "alpaca", conv.MISSING_OUTPUT),
    ({"messages": "user: hi\nassistant: hello"}, "auto", conv.NOT_A_LIST),
    ({"conversations": {"from": "human", "value": "hi"}}, "auto", conv.NOT_A_LIST),
    ({"instruction": "a", "output": "b", "history": "a b"}, "auto", conv.NOT_A_LIST),
    ({"messages": [["user", "hi"], ["assistant", "hello"]]}, "auto", conv.MALFORMED_TURN),
    (  # OpenAI content parts and tool calls are not plain text
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "hello"}]},
        "auto",
        conv.MALFORMED_TURN,
    ),
    ({"conversations": [{"role": "user", "content": "hi"}]}, "auto", conv.MALFORMED_TURN),
    ({"instruction": "a", "output": ["b", "c"]}, "auto", conv.MALFORMED_TURN),
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "auto", conv.MALFORMED_TURN),
    (
        {"messages": _turns(("user", "Weather?"), ("tool", "{}"), ("assistant", "Sunny."))},
        "auto",
        conv.UNKNOWN_ROLE,
    ),
    (
        {"conversations": [{"from": "human", "value": "2+2?"},
                           {"from": "function_call", "value": "{}"},
                           {"from": "gpt", "value": "4"}]},
        "auto",
        conv.UNKNOWN_ROLE,
    ),
    ({"messages": _turns(("user", "hi"), ("assistant", "  \n"))}, "auto", conv.EMPTY_TURN),
    ({"instruction": " ", "input": "", "output": "Hi."}, "auto", conv.EMPTY_TURN),
    ({"messages": _turns(("user", "hi"), ("user", "anyone?"))}, "auto", conv.NO_ASSISTANT_TURN),
    (
        {"messages": _turns(("user", "hi"), ("system", "Be rude."), ("assistant", "What."))},
        "auto",
        conv.SYSTEM_NOT_FIRST,
    ),
    (
        {"system": "Be brief.",
         "conversations": [{"from": "system", "value": "Be long."},
                           {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        "auto",
        conv.SYSTEM_NOT_FIRST,
    ),
    (
        {"messages": _turns(("user", "hi"), ("assistant", "hello"), ("user", "bye"))},
        "auto",
        conv.LAST_TURN_NOT_ASSISTANT,
    ),
]  # fmt: skip


@pytest.mark.parametrize(("record", "formatting", "reason"), BAD_RECORDS)
def test_bad_record_is_rejected_with_its_reason(record, formatting, reason):
    assert to_messages(record, formatting) == reason


def test_every_reject_reason_is_produced_by_a_test():
    produced = {reason for _, _, reason in BAD_RECORDS}
    produced |= {conv.NO_TRAINABLE_TOKENS, conv.TEMPLATE_REJECTED}  # tokenize_conversation's
    assert produced == set(conv.REJECT_REASONS)
    assert len(set(conv.REJECT_REASONS)) == len(conv.REJECT_REASONS)


def test_unknown_formatting_is_a_config_error():
    with pytest.raises(ValueError, match="formatting must be one of"):
        to_messages({"messages": CHAT}, "chatml")


# --- tokenize_conversation -----------------------------------------------------------------------


def _masked_text(tokenizer, example):
    ids = example["input_ids"]
    kept = [i for i, m in zip(ids, example["assistant_masks"], strict=True) if m]
    return tokenizer.decode(kept)


def test_mask_covers_exactly_the_assistant_replies_and_their_end_tokens(tokenizer):
    example = tokenize_conversation(tokenizer, CHAT, max_length=1024)
    assert _masked_text(tokenizer, example) == (
        "A mutable sequence." + IM_END + "An immutable one." + IM_END
    )
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
    assert example["n_tokens"] == len(example["input_ids"]) == len(example["assistant_masks"])
    assert example["n_trainable"] == sum(example["assistant_masks"]) < example["n_tokens"]
    assert example["truncated"] is False


def test_without_assistant_only_loss_every_token_trains(tokenizer):
    example = tokenize_conversation(tokenizer, CHAT, max_length=1024, assistant_only_loss=False)
    assert example["assistant_masks"] == [1] * example["n_tokens"]
    assert example["n_trainable"] == example["n_tokens"]


def test_truncation_keeps_the_first_tokens(tokenizer):
    full = tokenize_conversation(tokenizer, CHAT, max_length=1024)
    # Cut inside the first reply: its start trains, the rest of the chat is gone.
    first_reply_end = full["assistant_masks"].index(1) + 3
    cut = tokenize_conversation(tokenizer, CHAT, max_length=first_reply_end)
    assert cut["input_ids"] == full["input_ids"][:first_reply_end]
    assert cut["assistant_masks"] == full["assistant_masks"][:first_reply_end]
    assert cut["n_tokens"] == first_reply_end and cut["n_trainable"] == 3
    assert cut["truncated"] is True
    assert "A mutable sequence.".startswith(_masked_text(tokenizer, cut))


def test_no_trainable_tokens_when_truncation_leaves_only_the_prompt(tokenizer):
    # A long prompt pushes the reply past max_length: there is nothing left to learn from.
    messages = _turns(("user", "Summarise the text below in one line. " * 20), ("assistant", "Ok."))
    assert tokenize_conversation(tokenizer, messages, max_length=32) == conv.NO_TRAINABLE_TOKENS
    assert isinstance(tokenize_conversation(tokenizer, messages, max_length=4096), dict)


def test_a_record_the_template_refuses_is_rejected(tokenizer):
    strict = _with_template(
        tokenizer,
        "{%- for m in messages %}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
        "{%- endif %}"
        "{{- m['content'] }}"
        "{%- endfor %}",
    )
    messages = _turns(("user", "hi"), ("user", "anyone?"), ("assistant", "hello"))
    assert tokenize_conversation(strict, messages, max_length=64) == conv.TEMPLATE_REJECTED


# --- check_chat_template -------------------------------------------------------------------------


def test_tiny_template_passes(tokenizer):
    check_chat_template(tokenizer)
    check_chat_template(tokenizer, assistant_only_loss=False)


def test_template_without_generation_markers_fails_only_for_assistant_only_loss(tokenizer):
    plain = _with_template(
        tokenizer,
        CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""),
    )
    assert "{%- generation %}" not in plain.chat_template
    with pytest.raises(ChatTemplateError, match=r"data\.assistant_only_loss=false"):
        check_chat_template(plain)
    check_chat_template(plain, assistant_only_loss=False)


def test_end_of_turn_token_outside_the_mask_fails(tokenizer):
    unmasked_end = _with_template(
        tokenizer,
        CHAT_TEMPLATE.replace(
            "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}",
            "{%- generation %}{{- message['content'] }}{%- endgeneration %}{{- '<|im_end|>' }}",
        ),
    )
    assert unmasked_end.chat_template != CHAT_TEMPLATE
    with pytest.raises(ChatTemplateError, match="never learn to stop"):
        check_chat_template(unmasked_end)
    # Without assistant-only loss the end token is trained like every other token.
    check_chat_template(unmasked_end, assistant_only_loss=False)


def test_template_that_never_emits_the_eos_token_fails(tokenizer):
    base_eos = copy.deepcopy(tokenizer)
    base_eos.eos_token = (
        "<|endoftext|>"  # a base model's eos, which the ChatML template never writes
    )
    for assistant_only_loss in (True, False):
        with pytest.raises(ChatTemplateError, match="never learn to stop"):
            check_chat_template(base_eos, assistant_only_loss=assistant_only_loss)


def test_generation_block_around_user_text_fails(tokenizer):
    everything = _with_template(
        tokenizer,
        "{%- generation %}"
        + CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
        + "{%- endgeneration %}",
    )
    with pytest.raises(ChatTemplateError, match="not the assistant's"):
        check_chat_template(everything)


def test_no_chat_template_fails(tokenizer):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        check_chat_template(_with_template(tokenizer, None))
