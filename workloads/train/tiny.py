"""Embedded models: a byte-level BPE tokenizer with a chat template and a tiny Llama, built offline.

    python -m workloads.train.tiny --out models/tiny-llama [--corpus data/sample/corpus]

Tests and the demo use this folder wherever a cluster config names a real hub model (for example
Qwen/Qwen2.5-0.5B-Instruct or meta-llama/Llama-3.1-8B-Instruct). It is a normal Hugging Face model
folder: `AutoModelForCausalLM.from_pretrained`, PEFT, TRL and vLLM load it as they would a hub model.

Shapes: head_dim 64 (vLLM's CPU attention accepts 32, 64, 80, 96, 112, 128, ...), 2 layers, hidden 128,
2 query heads and 1 KV head (grouped-query attention, as in current Llama and Qwen models).
The weights are random: training jobs (SFT, pretraining) turn it into something that writes text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from workloads.common.config import StrictModel

BOS = "<|begin_of_text|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, BOS, IM_START, IM_END, PAD]

# ChatML, as Qwen2 uses. `{% generation %}` marks the assistant's tokens, so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (and TRL's assistant-only loss)
# can mask everything else; the end-of-turn token is inside the marked span on purpose.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TinyModelConfig(StrictModel):
    vocab_size: int = Field(
        default=4096, ge=len(SPECIAL_TOKENS) + 256, description="BPE vocabulary size."
    )
    hidden_size: int = Field(default=128, ge=32)
    intermediate_size: int = Field(default=256, ge=32)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=2, ge=1)
    num_key_value_heads: int = Field(default=1, ge=1)
    max_position_embeddings: int = Field(default=1024, ge=64)
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: no unknown tokens) wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,  # end of an assistant turn ends generation
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


def _corpus_texts(corpus: Path | None) -> list[str]:
    from workloads.data.sample import base_documents, read_corpus_texts

    if corpus is not None:
        return list(read_corpus_texts(corpus).values())
    return [d.text for d in base_documents()]


def llama_config(cfg: TinyModelConfig, tokenizer, **extra):
    """The tiny Llama shape (2 layers, head_dim 64, GQA) for `tokenizer`, plus `extra` fields."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        **extra,
    )


def build_tiny_model(
    out: Path, cfg: TinyModelConfig | None = None, corpus: Path | None = None
) -> Path:
    """Build (or reuse, when the same config built it) the tokenizer and model folder at `out`."""
    cfg = cfg or TinyModelConfig()
    fingerprint = hashlib.sha256(
        json.dumps({"cfg": cfg.model_dump(), "corpus": str(corpus)}, sort_keys=True).encode()
    ).hexdigest()[:16]
    stamp = out / "tiny_model.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out

    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(_corpus_texts(corpus), cfg.vocab_size)
    model_cfg = llama_config(
        cfg,
        tokenizer,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "config": cfg.model_dump()}, indent=1))
    return out


def build_tiny_classifier(
    out: Path, tokenizer_dir: Path, labels: tuple[str, ...], seed: int = 0
) -> Path:
    """A 2-layer Llama sequence classifier (random weights) with `labels`, sharing the tiny tokenizer:
    a stand-in for a hub classifier such as a toxicity model, with the same loading code path."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = TinyModelConfig()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(
        llama_config(
            cfg,
            tokenizer,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.train.tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="JSONL folder to train the tokenizer on (default: the sample corpus's base text)",
    )
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, corpus=args.corpus)
    print(f"tiny model ready at {path}")


if __name__ == "__main__":
    main()
