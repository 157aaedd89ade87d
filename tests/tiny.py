"""Tiny models and a character-level tokenizer, built in-process (no downloads) for tests.

The tokenizer maps every printable ASCII character to one token, plus ChatML-style special tokens,
so that a completion's text and its token ids correspond one to one and tests can reason about
exact token counts.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML with tools, in the Hermes/Qwen style: tool names in a system turn, assistant tool calls
# as <tool_call>{json}</tool_call>, tool replies in a `tool` turn.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: "
    "{% for tool in tools %}{{ tool['function']['name'] }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with pad, EOS (`<|im_end|>`) and a ChatML chat template."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tool_tokenizer() -> PreTrainedTokenizerFast:
    """`make_tokenizer` with `TOOL_CHAT_TEMPLATE` (renders tools, tool calls and tool replies)."""
    tok = make_tokenizer()
    tok.chat_template = TOOL_CHAT_TEMPLATE
    return tok


def _config(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> LlamaConfig:
    kwargs: dict[str, object] = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: object):
    """A 2-layer Llama causal LM (~30k parameters) in float32 with deterministic weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tokenizer, **overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def make_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 1):
    """A 2-layer Llama sequence classifier with one output (logit 0 = the reward)."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tokenizer, num_labels=1))
    return model.eval()


def save_tiny_model(path: str, seed: int = 0, **overrides: object) -> str:
    """Save a tiny causal LM (config `overrides` applied) and its tokenizer to `path` (loadable
    with `from_pretrained`)."""
    tok = make_tokenizer()
    make_causal_lm(tok, seed=seed, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path
