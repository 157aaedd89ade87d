"""Tools: schemas from callables, tool-call parsers, running calls (errors, timeouts, async),
replies rendered by the chat template, and the turn handler's record of a batch."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from grpokit.errors import ConfigError
from grpokit.tools import ToolCall, ToolCalling, ToolRunner, make_tool, make_tools
from grpokit.tools.chat import check_tool_template, reply_ids
from grpokit.tools.parsing import parse_auto, parse_hermes, parse_json, parse_mistral
from tests.tiny import make_tokenizer, make_tool_tokenizer


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


async def slow_echo(text: str, seconds: float = 0.0) -> str:
    """Echo text after a pause.

    Args:
        text: What to echo.
        seconds: How long to wait first.
    """
    await asyncio.sleep(seconds)
    return text


def fail(reason: str) -> str:
    """Always raise.

    Args:
        reason: The error message.
    """
    raise RuntimeError(reason)


# ---- schemas ------------------------------------------------------------------------------------
def test_schema_from_type_hints_and_docstring() -> None:
    tool = make_tool(add)
    assert tool.name == "add" and not tool.is_async
    assert tool.schema["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "The first.",
    }
    assert tool.schema["function"]["parameters"]["required"] == ["a", "b"]
    assert make_tool(slow_echo).is_async


def test_bad_tools_are_config_errors_naming_the_fix() -> None:
    def no_doc(a: int) -> int:
        return a

    def no_hint(a):  # type: ignore[no-untyped-def]
        """Doc.

        Args:
            a: x
        """
        return a

    with pytest.raises(ConfigError, match=r"'no_doc'.*docstring"):
        make_tool(no_doc)
    with pytest.raises(ConfigError, match=r"'no_hint'.*type hint"):
        make_tool(no_hint)
    with pytest.raises(ConfigError, match="two tools are named 'add'"):
        make_tools([add, add])


# ---- parsing ------------------------------------------------------------------------------------
def test_hermes_calls_content_and_errors() -> None:
    text = (
        'Let me add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
        "<tool_call>{not json</tool_call>"
    )
    turn = parse_hermes(text)
    assert turn.content == "Let me add."
    assert [(c.name, c.arguments) for c in turn.tool_calls[:2]] == [
        ("add", {"a": 1, "b": 2}),
        ("add", {"a": 3, "b": 4}),  # arguments written as a JSON string
    ]
    assert turn.tool_calls[2].error is not None and "not valid JSON" in turn.tool_calls[2].error
    # An unclosed block at the end of the turn is read to the end.
    unclosed = parse_hermes('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}')
    assert unclosed.tool_calls[0].arguments == {"a": 1, "b": 1}
    assert parse_hermes("no calls here").tool_calls == []
    # SmolLM2 writes a JSON list of calls in one block; an empty list is no call.
    listed = parse_hermes(
        '<tool_call>[\n{"name": "add", "arguments": {"a": 1, "b": 2}},\n'
        '{"name": "sub", "arguments": {"a": 3, "b": 1}}\n]</tool_call>'
    )
    assert [(c.name, c.arguments) for c in listed.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("sub", {"a": 3, "b": 1}),
    ]
    assert parse_hermes("<tool_call>[]</tool_call>").tool_calls == []


def test_json_mistral_and_auto() -> None:
    llama = parse_json('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert [(c.name, c.arguments) for c in llama.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert parse_json('{"answer": 3}').tool_calls == []  # JSON, but not a call
    assert parse_json("The answer is 3.").content == "The answer is 3."
    mistral = parse_mistral('ok[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]')
    assert mistral.content == "ok" and mistral.tool_calls[0].arguments == {"a": 5, "b": 6}
    assert parse_auto('<tool_call>{"name": "x", "arguments": {}}</tool_call>').tool_calls[0].name
    assert parse_auto('[TOOL_CALLS][{"name": "y", "arguments": {}}]').tool_calls[0].name == "y"
    assert parse_auto('{"name": "z", "arguments": {}}').tool_calls[0].name == "z"
    not_object = parse_hermes('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>')
    assert "must be a JSON object" in (not_object.tool_calls[0].error or "")


# ---- running calls ------------------------------------------------------------------------------
def test_runner_turns_every_failure_into_a_message() -> None:
    tools = make_tools([add, fail, slow_echo])
    calls = [
        ToolCall("add", {"a": 2, "b": 3}),
        ToolCall("nope", {}),
        ToolCall("add", {"a": 1}),
        ToolCall("add", {"a": 1, "c": 2}),
        ToolCall("fail", {"reason": "boom"}),
        ToolCall("", error="the tool call is not valid JSON"),
        ToolCall("slow_echo", {"text": "hi"}),
    ]
    runner = ToolRunner(timeout=5.0)
    try:
        results = runner.run(calls, tools)
    finally:
        runner.close()
    assert [r.error for r in results] == [False, True, True, True, True, True, False]
    assert results[0].content == "5"
    assert "unknown tool 'nope'; the tools are: add, fail, slow_echo" in results[1].content
    assert "bad arguments for add" in results[2].content and "'b'" in results[2].content
    assert "bad arguments for add" in results[3].content
    assert results[4].content == "Error: fail raised RuntimeError: boom"
    assert "not valid JSON" in results[5].content
    assert results[6].content == "hi"


def test_runner_timeout_for_sync_and_async_tools() -> None:
    release = threading.Event()

    def hang(x: int) -> int:
        """Block until released.

        Args:
            x: Returned.
        """
        release.wait(10)
        return x

    tools = make_tools([hang, slow_echo, add])
    runner = ToolRunner(timeout=0.2)
    try:
        results = runner.run(
            [
                ToolCall("hang", {"x": 1}),
                ToolCall("slow_echo", {"text": "late", "seconds": 10.0}),
                ToolCall("add", {"a": 1, "b": 1}),
            ],
            tools,
        )
    finally:
        release.set()
        runner.close()
    assert results[0].error and "timed out after 0.2 s" in results[0].content
    assert results[1].error and "timed out" in results[1].content
    assert not results[2].error and results[2].content == "2"


def test_calls_of_one_turn_run_concurrently() -> None:
    """Two calls that each wait for the other can only both finish if they run at once."""
    barrier = threading.Barrier(2, timeout=5)

    def meet(tag: str) -> str:
        """Wait for the other call.

        Args:
            tag: Returned.
        """
        barrier.wait()
        return tag

    runner = ToolRunner(timeout=10)
    calls = [ToolCall("meet", {"tag": "a"}), ToolCall("meet", {"tag": "b"})]
    results = runner.run(calls, make_tools([meet]))
    assert [r.content for r in results] == ["a", "b"]


def test_tool_results_as_text() -> None:
    def info(key: str) -> dict:
        """Look up.

        Args:
            key: The key.
        """
        return {"key": key, "n": 1}

    runner = ToolRunner()
    (result,) = runner.run([ToolCall("info", {"key": "k"})], make_tools([info]))
    assert result.content == '{"key": "k", "n": 1}'


# ---- chat template ------------------------------------------------------------------------------
def test_reply_ids_follow_the_eos_and_open_the_next_turn() -> None:
    tok = make_tool_tokenizer()
    ids = reply_ids(tok, [{"role": "tool", "name": "add", "content": "5"}])
    assert tok.decode(ids) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    two = reply_ids(
        tok,
        [
            {"role": "tool", "name": "a", "content": "1"},
            {"role": "tool", "name": "b", "content": "2"},
        ],
    )
    assert tok.decode(two) == (
        "\n<|im_start|>tool\n1<|im_end|>\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_without_tool_support_are_refused() -> None:
    check_tool_template(make_tool_tokenizer())
    with pytest.raises(ConfigError, match="does not render the tool schemas, the assistant's"):
        check_tool_template(make_tokenizer())
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has none"):
        check_tool_template(tok)
    not_prefix = make_tool_tokenizer()  # marks the last message: earlier ones render otherwise
    not_prefix.chat_template = not_prefix.chat_template.replace(
        "{% endfor %}<|im_end|>\n{% endif %}",
        "{% endfor %}{% if message == messages[-1] %}.{% endif %}<|im_end|>\n{% endif %}",
    )
    assert "messages[-1]" in not_prefix.chat_template
    with pytest.raises(ConfigError, match="prefix-preserving"):
        check_tool_template(not_prefix)


# ---- the turn handler ---------------------------------------------------------------------------
def test_turn_handler_runs_calls_records_and_respects_limits() -> None:
    tok = make_tool_tokenizer()
    calls: list[dict[str, Any]] = []

    def record(x: int) -> int:
        """Record a call.

        Args:
            x: Returned doubled.
        """
        calls.append({"x": x})
        return 2 * x

    setting = ToolCalling.from_functions([record], max_iterations=1, timeout=5)
    tools = setting.tools
    turns = setting.turns(tok, [tools, tools, tools])
    eos = tok.eos_token_id
    call = tok('<tool_call>{"name": "record", "arguments": {"x": 4}}</tool_call>')["input_ids"]
    try:
        reply = turns.end_turn(0, [*call, eos], room=100)
        assert reply is not None
        ids = reply.result(timeout=10)
        assert tok.decode(ids) == "\n<|im_start|>tool\n8<|im_end|>\n<|im_start|>assistant\n"
        # max_iterations=1: a second round of calls ends the rollout without running them.
        assert turns.end_turn(0, [*call, eos], room=100) is None
        # No tool call: the rollout is over.
        assert turns.end_turn(1, [*tok("42")["input_ids"], eos], room=100) is None
        # A reply longer than the room left: the call ran, the reply is dropped, the row ends.
        dropped = turns.end_turn(2, [*call, eos], room=len(ids))
        assert dropped is not None and dropped.result(timeout=10) is None
    finally:
        turns.close()
    assert calls == [{"x": 4}, {"x": 4}]
    assert turns.calls == [1, 0, 1] and turns.errors == [0, 0, 0] and turns.dropped == [0, 0, 1]
    assert turns.replies[0] == [[{"role": "tool", "name": "record", "content": "8"}]]
    # The transcript splits a completion at the tool mask into assistant and tool messages.
    answer = tok("It is 8")["input_ids"]
    completion = [*call, eos, *ids, *answer, eos]
    model = [1] * (len(call) + 1) + [0] * len(ids) + [1] * (len(answer) + 1)
    assert turns.transcript(0, completion, model) == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "record", "arguments": {"x": 4}}}
            ],
        },
        {"role": "tool", "name": "record", "content": "8"},
        {"role": "assistant", "content": "It is 8"},
    ]


def test_turn_handler_rows_wait_for_their_own_tools_only() -> None:
    """A slow tool in one row does not hold back another row's reply."""
    tok = make_tool_tokenizer()
    release = threading.Event()

    def wait(x: int) -> int:
        """Wait to be released.

        Args:
            x: Returned.
        """
        release.wait(10)
        return x

    setting = ToolCalling.from_functions([wait, add], timeout=20)
    turns = setting.turns(tok, [setting.tools] * 2)
    eos = tok.eos_token_id
    slow = tok('<tool_call>{"name": "wait", "arguments": {"x": 1}}</tool_call>')["input_ids"]
    fast = tok('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')["input_ids"]
    try:
        pending = turns.end_turn(0, [*slow, eos], room=100)
        ready = turns.end_turn(1, [*fast, eos], room=100)
        assert ready is not None and pending is not None
        assert "3" in tok.decode(ready.result(timeout=10))
        assert not pending.done()
        release.set()
        assert pending.result(timeout=10) is not None
    finally:
        release.set()
        turns.close()
