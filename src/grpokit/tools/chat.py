"""Tool conversations through the tokenizer's chat template.

The model's own tokens are never re-rendered: a tool reply is appended to the tokens the model
wrote as the *difference* between two renderings of a small conversation, with and without the
tool messages (the same construction as TRL's). That needs a template that renders tool calls
and tool messages at all (`check_tool_template`) and renders earlier messages the same whatever
follows them (prefix-preserving).

A model whose own template has no tool support (SmolLM2's, for one) can be given a ChatML template
that has it: `CHATML_TOOLS_TEMPLATE` (named "chatml_tools" in `CHAT_TEMPLATES`), in the
Hermes/Qwen2.5 layout: the tool schemas in the system turn inside `<tools></tools>`, each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the replies in a user turn inside
`<tool_response></tool_response>`.
"""

from __future__ import annotations

from typing import Any

from grpokit.errors import ConfigError

_NAME, _KEY, _VALUE, _CONTENT = "tool_name_q7", "arg_key_x4", "arg_value_z9", "tool_output_k2"

CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n'
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + fn.name + \'", "arguments": \' }}'
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML with tools in the Hermes/Qwen2.5 layout (module docstring), for models whose own
template has no tool support; prefix-preserving."""

CHAT_TEMPLATES = {"chatml_tools": CHATML_TOOLS_TEMPLATE}
"""Built-in chat templates by name (a run config's `chat_template`)."""


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **(chat_template_kwargs or {}),
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str.")
    return text


def _dummy_call(name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]


def check_tool_template(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> None:
    """Check that the chat template shows tools and renders a whole tool conversation.

    Raises:
        ConfigError: no chat template; it fails on, or silently drops, the tool schemas, the
            assistant's tool call or the tool message; or it is not prefix-preserving.
    """
    fix = (
        "Use a model whose chat template supports tools (e.g. Qwen2.5/Qwen3 Instruct) or set "
        "tokenizer.chat_template to one that renders `tools`, assistant `tool_calls` and "
        "`tool` messages: grpokit.tools.chat.CHATML_TOOLS_TEMPLATE for a ChatML model (in a "
        "run config, `chat_template: chatml_tools`)."
    )
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"tools need a chat template, but the tokenizer has none. {fix}")
    schema = {
        "type": "function",
        "function": {
            "name": _NAME,
            "description": "A tool.",
            "parameters": {"type": "object", "properties": {_KEY: {"type": "string"}}},
        },
    }
    calls = _dummy_call(_NAME, {_KEY: _VALUE})
    tool_message = {"role": "tool", "name": _NAME, "content": _CONTENT}
    try:
        shown = _render(
            tokenizer,
            [{"role": "user", "content": "hi"}],
            add_generation_prompt=True,
            tools=[schema],
            chat_template_kwargs=chat_template_kwargs,
        )
        conversation = _render(
            tokenizer,
            [*calls, tool_message],
            add_generation_prompt=True,
            chat_template_kwargs=chat_template_kwargs,
        )
    except Exception as error:
        raise ConfigError(
            f"the chat template cannot render a tool conversation ({error}). {fix}"
        ) from error
    missing = [
        what
        for what, text, needle in (
            ("the tool schemas", shown, _NAME),
            ("the assistant's tool call", conversation, _NAME),
            ("the tool call's arguments", conversation, _VALUE),
            ("the tool message", conversation, _CONTENT),
        )
        if needle not in text
    ]
    if missing:
        raise ConfigError(f"the chat template does not render {', '.join(missing)}. {fix}")
    reply_ids(tokenizer, [tool_message], chat_template_kwargs)  # prefix-preserving


def reply_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Tokens that follow an assistant turn's EOS to append `messages` (tool messages) and open
    the next assistant turn.

    Rendered as `render(conversation + messages, generation prompt) - render(conversation)`,
    the latter cut after its last EOS, for a one-call conversation calling `messages[0]`'s tool
    (some templates name the tool in the reply's header).

    Raises:
        ConfigError: the template renders the conversation differently once messages follow it.
    """
    base = _dummy_call(messages[0].get("name", "tool"), {})
    prefix = _render(
        tokenizer, base, add_generation_prompt=False, chat_template_kwargs=chat_template_kwargs
    )
    eos = tokenizer.eos_token
    if eos and eos in prefix:
        prefix = prefix[: prefix.rindex(eos) + len(eos)]
    full = _render(
        tokenizer,
        [*base, *messages],
        add_generation_prompt=True,
        chat_template_kwargs=chat_template_kwargs,
    )
    if not full.startswith(prefix):
        raise ConfigError(
            "the chat template renders an assistant tool call differently once tool messages "
            "follow it (it is not prefix-preserving), so tool replies cannot be appended to the "
            "model's tokens. Set tokenizer.chat_template to a prefix-preserving template."
        )
    return list(tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"])
