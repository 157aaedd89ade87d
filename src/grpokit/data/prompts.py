"""Prompt formats, chat templates and the prompt-length policy.

A prompt is either *plain* (a string, passed to the model as is) or *conversational* (a list of
`{"role": ..., "content": ...}` messages, rendered with the tokenizer's chat template). Completions
reach reward functions in the same format as their prompt, exactly like TRL's `GRPOTrainer` hands
them over: a string for a plain prompt, `[{"role": "assistant", "content": text}]` for a
conversational one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpokit.errors import ConfigError, DataError, PromptFormatError

Message = dict[str, Any]

PROMPT_LENGTH_POLICIES = ("truncate_left", "skip")


def is_conversational_prompt(prompt: Any) -> bool:
    """True if `prompt` is a non-empty list of `{"role", "content"}` message dicts."""
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


def is_conversational(example: dict[str, Any]) -> bool:
    """True if the example's `prompt` is a list of chat messages (TRL's conversational format).

    Args:
        example: One dataset row; only its `"prompt"` entry is inspected.

    Returns:
        Whether `example["prompt"]` is a non-empty list of dicts with `"role"` and `"content"`.
    """
    return is_conversational_prompt(example.get("prompt"))


def _check_prompt(prompt: Any, index: int) -> None:
    if isinstance(prompt, str) or is_conversational_prompt(prompt):
        return
    raise PromptFormatError(
        f"prompt {index} is neither a string nor a list of {{'role', 'content'}} messages: "
        f"{prompt!r:.200}. Give plain prompts as strings and conversational prompts as "
        "[{'role': 'user', 'content': '...'}, ...]."
    )


def render_prompts(
    prompts: Sequence[Any],
    tokenizer: Any,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Turn prompts into the text the policy is conditioned on.

    Plain prompts are returned unchanged. Conversational prompts go through
    `tokenizer.apply_chat_template(..., tokenize=False)`: with the generation prompt added when the
    last message is from the user (or system/tool), and, like TRL, continuing the final message
    (`continue_final_message=True`, no generation prompt) when the last message is from the
    assistant, so a partial assistant answer is extended rather than restarted.

    Args:
        prompts: B prompts, each a string or a list of message dicts.
        tokenizer: A Hugging Face tokenizer; needs a chat template for conversational prompts.
        chat_template_kwargs: Extra keyword arguments for `apply_chat_template` (for example
            `{"enable_thinking": False}`).
        tools: JSON schemas of the tools the model may call, shown by the chat template
            (`apply_chat_template(..., tools=...)`); None = no tools. Needs conversational prompts.

    Returns:
        B prompt strings.

    Raises:
        PromptFormatError: A prompt is neither a string nor a list of messages (a `TypeError`).
        DataError: A conversational prompt is given but the tokenizer has no chat template (a
            `ValueError`).
    """
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("tokenize", "add_generation_prompt", "continue_final_message"):
        if reserved in kwargs:
            raise ValueError(
                f"chat_template_kwargs must not set {reserved!r}: grpokit sets it itself "
                "(the generation prompt is added unless the last message is from the assistant)."
            )
    texts: list[str] = []
    for i, prompt in enumerate(prompts):
        _check_prompt(prompt, i)
        if isinstance(prompt, str):
            if tools:
                raise DataError(
                    f"prompt {i} is a plain string, but tools are shown to the model by the chat "
                    "template: give conversational prompts ([{'role': 'user', 'content': ...}])."
                )
            texts.append(prompt)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                f"prompt {i} is conversational but the tokenizer "
                f"({type(tokenizer).__name__}) has no chat template. Set "
                "`tokenizer.chat_template`, use an instruct model's tokenizer, or give plain "
                "string prompts."
            )
        continues = prompt[-1]["role"] == "assistant"
        text = tokenizer.apply_chat_template(
            prompt,
            tokenize=False,
            add_generation_prompt=not continues,
            continue_final_message=continues,
            **({"tools": tools} if tools else {}),
            **kwargs,
        )
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template returned {type(text).__name__} for prompt {i}; expected a "
                "string. Do not pass return_dict/tokenize options in chat_template_kwargs."
            )
        texts.append(text)
    return texts


def format_completions(prompts: Sequence[Any], completion_texts: Sequence[str]) -> list[Any]:
    """Put decoded completions in the format reward functions receive (TRL's convention).

    For a plain prompt the completion is its text. For a conversational prompt it is
    `[{"role": "assistant", "content": text}]`; when that prompt ends with an assistant message
    (a pre-filled answer that generation continued), its content is prepended to the text, as
    TRL does. Unlike TRL, the prompt itself is not modified.

    Args:
        prompts: N prompts (each repeated G times for its group).
        completion_texts: N decoded completions, special tokens removed.

    Returns:
        N completions: strings or one-message lists.

    Raises:
        ValueError: The two lists differ in length.
    """
    if len(prompts) != len(completion_texts):
        raise ValueError(
            f"format_completions got {len(prompts)} prompts but {len(completion_texts)} "
            "completions; pass one prompt per completion (repeat each prompt G times)."
        )
    completions: list[Any] = []
    for i, (prompt, text) in enumerate(zip(prompts, completion_texts, strict=True)):
        _check_prompt(prompt, i)
        if isinstance(prompt, str):
            completions.append(text)
            continue
        prefill = prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""
        completions.append([{"role": "assistant", "content": prefill + text}])
    return completions


def completion_text(completion: Any) -> str:
    """The text of one completion in either format; `""` for anything unrecognisable.

    A conversational completion's text is the concatenated content of its assistant messages
    (all messages if none is marked as assistant). Never raises: reward functions use it on
    arbitrary model output.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, list):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"] or messages
        return "".join(m["content"] for m in assistant if isinstance(m.get("content"), str))
    return ""


def apply_prompt_length_policy(
    prompt_ids: list[list[int]],
    max_prompt_length: int | None,
    policy: str,
) -> tuple[list[list[int]], list[int]]:
    """Enforce `max_prompt_length` on tokenized prompts.

    Args:
        prompt_ids: B token-id lists (unpadded).
        max_prompt_length: Longest allowed prompt in tokens; `None` keeps every prompt whole.
        policy: `"truncate_left"` keeps the last `max_prompt_length` tokens of a long prompt (the
            end of a prompt, next to the answer, matters most); `"skip"` drops long prompts.

    Returns:
        `(ids, kept_indices)`: the kept prompts' ids and their indices into `prompt_ids`. With
        `"truncate_left"` every index is kept; the caller compares lengths to count truncations
        and warns with the count.

    Raises:
        ValueError: Unknown `policy` or a non-positive `max_prompt_length`.
    """
    if policy not in PROMPT_LENGTH_POLICIES:
        raise ValueError(
            f"Unknown prompt length policy {policy!r}; use one of {list(PROMPT_LENGTH_POLICIES)}."
        )
    if max_prompt_length is None:
        return [list(ids) for ids in prompt_ids], list(range(len(prompt_ids)))
    if max_prompt_length < 1:
        raise ValueError(
            f"max_prompt_length must be a positive number of tokens or None, got "
            f"{max_prompt_length}."
        )
    if policy == "truncate_left":
        return [list(ids[-max_prompt_length:]) for ids in prompt_ids], list(range(len(prompt_ids)))
    kept = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_prompt_length]
    return [list(prompt_ids[i]) for i in kept], kept


def prompt_token_limit(
    max_prompt_length: int | None, context_length: int | None, max_completion_length: int
) -> int | None:
    """The longest prompt in tokens: `max_prompt_length`, and at most what the model's context
    leaves after `max_completion_length` tokens of completion.

    A prompt beyond the context would otherwise fail (an `IndexError` in learned position
    embeddings, e.g. GPT-2) or run silently past the positions the model was trained on (RoPE).

    Args:
        max_prompt_length: The configured limit; None = none.
        context_length: The model's longest sequence, prompt plus completion
            (`engines.models.context_length`); None = unknown, no limit from the model.
        max_completion_length: Tokens generated per completion.

    Returns:
        The limit for `apply_prompt_length_policy`, or None for no limit.

    Raises:
        ConfigError: `max_completion_length` leaves no room for a prompt in the context.
    """
    if context_length is None:
        return max_prompt_length
    room = context_length - max_completion_length
    if room < 1:
        raise ConfigError(
            f"max_completion_length={max_completion_length} leaves no room for a prompt in the "
            f"model's context of {context_length} tokens; set max_completion_length below "
            f"{context_length}."
        )
    return room if max_prompt_length is None else min(max_prompt_length, room)
