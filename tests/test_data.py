"""Prompt formats, chat templates, the prompt-length policy and the model's context limit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit.data.prompts import (
    apply_prompt_length_policy,
    completion_text,
    format_completions,
    is_conversational,
    prompt_token_limit,
    render_prompts,
)
from grpokit.errors import ConfigError, DataError, PromptFormatError, UserError
from tests.tiny import make_causal_lm, make_tokenizer

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
    with pytest.raises(DataError, match=r"prompt 0 is conversational.*no chat template"):
        render_prompts([CHAT], tok)


def test_render_rejects_bad_prompt_and_reserved_kwargs() -> None:
    with pytest.raises(TypeError, match="prompt 1 is neither a string nor a list") as error:
        render_prompts(["ok", 42], make_tokenizer())
    assert isinstance(error.value, PromptFormatError) and isinstance(error.value, UserError)
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


# ---- the model's context limits the prompt -----------------------------------------------------
CONTEXT = 32  # positions of the tiny models below
COMPLETION = 8  # max_completion_length: a prompt may have CONTEXT - COMPLETION = 24 tokens


def _tiny_gpt2(tok: Any) -> Any:
    """A 2-layer GPT-2 with learned position embeddings for CONTEXT positions: a longer sequence
    indexes past the embedding table (an IndexError without the limit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def _tiny_model(arch: str, tok: Any) -> Any:
    if arch == "gpt2":
        return _tiny_gpt2(tok)
    return make_causal_lm(tok, max_position_embeddings=CONTEXT)  # RoPE: would run silently


def test_prompt_token_limit() -> None:
    assert prompt_token_limit(None, None, COMPLETION) is None  # context unknown: no limit
    assert prompt_token_limit(10, None, COMPLETION) == 10
    assert prompt_token_limit(None, CONTEXT, COMPLETION) == 24  # 32 - 8
    assert prompt_token_limit(10, CONTEXT, COMPLETION) == 10  # the smaller limit wins
    assert prompt_token_limit(30, CONTEXT, COMPLETION) == 24
    assert prompt_token_limit(None, CONTEXT, 31) == 1
    with pytest.raises(
        ConfigError,
        match=r"max_completion_length=32 leaves no room for a prompt in the model's context of "
        r"32 tokens; set max_completion_length below 32\.",
    ):
        prompt_token_limit(None, CONTEXT, 32)


def test_context_length_from_the_model_config() -> None:
    from grpokit.engines.models import context_length

    tok = make_tokenizer()
    assert context_length(_tiny_gpt2(tok)) == CONTEXT  # GPT-2: n_positions
    assert context_length(make_causal_lm(tok, max_position_embeddings=48)) == 48
    assert context_length(object()) is None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_longer_than_the_context_is_truncated_then_trains(
    arch: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_tokenizer()
    long_prompt = "abcdefghij" * 4  # 40 tokens (one per character) > 24
    data = [{"prompt": long_prompt}, {"prompt": "hi"}]
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=COMPLETION,
        max_steps=1,
        bf16=False,
        save_strategy="no",
        shuffle_dataset=False,
        learning_rate=1e-3,
    )
    reward = lambda completions, **kw: [float(len(c)) for c in completions]  # noqa: E731
    trainer = GRPOTrainer(
        _tiny_model(arch, tok), reward, args=args, train_dataset=data, processing_class=tok
    )
    _, ids, _ = trainer.sample_prompts()
    # truncate_left keeps the long prompt's last 24 tokens; the short one is untouched.
    assert ids == [tok(long_prompt[-24:])["input_ids"], tok("hi")["input_ids"]]
    assert len(ids[0]) == 24
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        trainer.train()  # GPT-2 raised an IndexError here before the limit existed
        state = trainer.state
    assert state.global_step == 1
    assert state.prompts_over_length == 2  # the long prompt in both draws
    assert (
        "longer than 24 tokens (the model's context of 32 tokens minus max_completion_length=8) "
        "truncated from the left" in caplog.text
    )


@pytest.mark.usefixtures("one_thread")
def test_prompt_longer_than_the_context_is_skipped_or_refused(tmp_path: Path) -> None:
    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_tokenizer()
    config = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=COMPLETION,
        max_steps=1,
        bf16=False,
        save_strategy="no",
        shuffle_dataset=False,
        prompt_length_policy="skip",
    )
    reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731

    def trainer(data: list[dict[str, Any]], **overrides: Any) -> Any:
        args = GRPOConfig(**{**config, **overrides})
        return GRPOTrainer(
            _tiny_gpt2(tok), reward, args=args, train_dataset=data, processing_class=tok
        )

    # skip: the 25-token prompt is dropped, the 24-token one (exactly the room left) is kept.
    t = trainer([{"prompt": "a" * 25}, {"prompt": "b" * 24}])
    _, ids, _ = t.sample_prompts()
    assert ids == [tok("b" * 24)["input_ids"]]
    assert t.state.prompts_over_length == 1
    with pytest.raises(DataError, match=r"every prompt is longer than 24 tokens \(the model's"):
        trainer([{"prompt": "a" * 25}]).sample_prompts()
    # A completion that fills the whole context leaves no room: refused when the trainer is built.
    with pytest.raises(ConfigError, match="max_completion_length=32 leaves no room"):
        trainer([{"prompt": "a"}], max_completion_length=32)


@pytest.mark.usefixtures("one_thread")
def test_engine_refuses_a_sequence_longer_than_the_context() -> None:
    from grpokit.engines.base import SamplingParams
    from grpokit.engines.transformers_engine import TransformersEngine

    tok = make_tokenizer()
    engine = TransformersEngine(_tiny_gpt2(tok), tok)
    greedy = SamplingParams(top_k=1)
    out = engine.generate([[5] * 24], num_generations=1, max_new_tokens=8, sampling=greedy)
    assert out.prompt_ids.shape == (1, 24)  # 24 + 8 = 32 positions: fits exactly
    with pytest.raises(
        DataError,
        match=r"a prompt of 25 tokens plus max_new_tokens=8 is longer than the model's context "
        r"of 32 tokens",
    ):
        engine.generate([[5] * 25], num_generations=1, max_new_tokens=8, sampling=greedy)


@pytest.mark.usefixtures("one_thread")
def test_evaluation_truncates_prompts_to_the_context(caplog: pytest.LogCaptureFixture) -> None:
    from grpokit.app.evaluation import evaluate

    tok = make_tokenizer()
    reward = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731
    rows = [{"prompt": "x" * 40}, {"prompt": "y"}]
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        metrics = evaluate(_tiny_gpt2(tok), tok, rows, [reward], max_completion_length=COMPLETION)
    assert metrics["num_prompts"] == 2 and metrics["accuracy"] == 1.0
    assert metrics["prompts/over_length"] == 1
    assert (
        "1 prompt(s) longer than 24 tokens (the model's context of 32 tokens minus "
        "max_completion_length=8) truncated from the left" in caplog.text
    )
