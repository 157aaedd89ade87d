"""Prompt formats, chat templates and the prompt-length policy."""

from __future__ import annotations

import pytest

from grpokit.data.prompts import (
    apply_prompt_length_policy,
    completion_text,
    format_completions,
    is_conversational,
    render_prompts,
)
from tests.tiny import make_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_is_conversational() -> None:
    assert is_conversational({"prompt": CHAT, "answer": "4"})
    assert not is_conversational({"prompt": "2+2?"})
    assert not is_conversational({"prompt": []})
    assert not is_conversational({"prompt": [{"text": "no role"}]})
    assert not is_conversational({"question": CHAT})


def test_render_plain_prompts_unchanged() -> None:
    assert render_prompts(["a", "b c"], make_tokenizer()) == ["a", "b c"]


def test_render_conversational_adds_generation_prompt() -> None:
    (text,) = render_prompts([CHAT], make_tokenizer())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_continues_final_assistant_message() -> None:
    prefilled = [*CHAT, {"role": "assistant", "content": "<think>"}]
    (text,) = render_prompts([prefilled], make_tokenizer())
    # No end-of-turn after the prefill and no new assistant header: generation continues it.
    assert text.endswith("<|im_start|>assistant\n<think>")


def test_render_mixed_batch_and_chat_template_kwargs() -> None:
    tok = make_tokenizer()
    tok.chat_template = "{{ greeting }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    texts = render_prompts(["plain", CHAT], tok, chat_template_kwargs={"greeting": "hi"})
    assert texts == ["plain", "hi|Be brief.2+2?"]


def test_render_without_chat_template_is_a_clear_error() -> None:
    tok = make_tokenizer()
    tok.chat_template = None
    assert render_prompts(["plain is fine"], tok) == ["plain is fine"]
    with pytest.raises(ValueError, match=r"prompt 0 is conversational.*no chat template"):
        render_prompts([CHAT], tok)


def test_render_rejects_bad_prompt_and_reserved_kwargs() -> None:
    with pytest.raises(TypeError, match="prompt 1 is neither a string nor a list"):
        render_prompts(["ok", 42], make_tokenizer())
    with pytest.raises(ValueError, match="must not set 'add_generation_prompt'"):
        render_prompts([CHAT], make_tokenizer(), chat_template_kwargs={"add_generation_prompt": 0})


def test_format_completions_like_trl() -> None:
    prefilled = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}]
    completions = format_completions(["p", CHAT, prefilled], ["a", "4", "hm</think>"])
    assert completions == [
        "a",
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "<think>hm</think>"}],
    ]
    assert prefilled[-1] == {"role": "assistant", "content": "<think>"}  # prompt not mutated
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        format_completions(["a", "b"], ["x"])


def test_completion_text_never_raises() -> None:
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "y"}]) == "y"
    assert completion_text({"content": "z"}) == "z"
    for garbage in (None, 3, [1, 2], [{"role": "assistant"}], {"content": 5}):
        assert completion_text(garbage) == ""


def test_prompt_length_policy() -> None:
    ids = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    # truncate_left keeps the last 3 tokens of the long prompt and every index.
    assert apply_prompt_length_policy(ids, 3, "truncate_left") == (
        [[1, 2, 3], [6, 7, 8], [9]],
        [0, 1, 2],
    )
    # skip drops prompt 1 (5 tokens > 3) and reports the kept indices.
    assert apply_prompt_length_policy(ids, 3, "skip") == ([[1, 2, 3], [9]], [0, 2])
    assert apply_prompt_length_policy(ids, None, "skip") == (ids, [0, 1, 2])
    with pytest.raises(ValueError, match=r"Unknown prompt length policy 'truncate'.*truncate_left"):
        apply_prompt_length_policy(ids, 3, "truncate")
    with pytest.raises(ValueError, match="max_prompt_length must be a positive"):
        apply_prompt_length_policy(ids, 0, "skip")
