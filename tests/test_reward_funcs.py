"""Built-in rewards on hand-written cases, malformed completions included."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from grpokit.rewards.builtin import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    answer_format_reward,
    extract_answer,
    get_accuracy_reward,
    get_cosine_scaled_reward,
    get_math_accuracy_reward,
    get_repetition_penalty_reward,
    get_reward_function,
    math_accuracy_reward,
    parse_number,
    reasoning_gym_score,
    soft_overlong_punishment,
    think_format_reward,
)

GARBAGE: list[Any] = ["", "<answer></answer>", "</answer>4<answer>", None, 7, [{"role": "user"}]]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def user_factory(scale: float = 1.0) -> Any:
    """A user's reward factory, referenced as 'tests.test_reward_funcs:user_factory'."""

    def scaled(completions: list[Any], **kwargs: Any) -> list[float]:
        return [scale] * len(completions)

    return scaled


def user_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [2.0] * len(completions)


def test_extract_and_parse() -> None:
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"  # last tag
    assert extract_answer("no tag") is None
    assert extract_answer("x = 3, so 4.5 apples.", "last_number") == "4.5"
    assert extract_answer("none", "last_number") is None
    with pytest.raises(ValueError, match="Unknown answer extraction mode 'boxed'"):
        extract_answer("x", "boxed")
    assert parse_number(" $1,234. ") == 1234.0
    assert parse_number("-2/4") == -0.5
    assert parse_number("1e-3") == 0.001
    for not_a_number in ("", "four", "1/0", "1,23", "3 apples"):
        assert parse_number(not_a_number) is None


def test_accuracy_numeric_string_and_malformed() -> None:
    completions = [
        "<answer> 4.0 </answer>",  # numeric match: 4.0 == 4
        "<answer>1,234</answer>",  # thousands separator
        "<answer>0.3333333</answer>",  # |0.3333333 - 1/3| = 3.3e-8 <= 1e-6
        "<answer>Paris</answer>",  # normalised exact match with "paris."
        "<answer>four</answer>",  # not a number, not equal
        "4",  # no tag: tag mode finds no answer
        *GARBAGE,
    ]
    answers = ["4", "1234", "1/3", "paris.", "4", "4", *(["4"] * len(GARBAGE))]
    rewards = accuracy_reward(completions=completions, answer=answers)
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, *([0.0] * len(GARBAGE))]


def test_accuracy_options_conversational_and_missing_reference() -> None:
    fn = get_accuracy_reward(answer_column="final", extract="last_number", abs_tol=0.01)
    completions = [chat("2 + 2 is 4."), chat("about 3.999"), chat("no idea"), "5"]
    assert fn(completions=completions, final=[4, 4, 4, None]) == [1.0, 1.0, 0.0, None]
    assert fn.__name__ == "accuracy_reward"


def test_accuracy_missing_column_lists_available() -> None:
    with pytest.raises(ValueError, match=r"needs the dataset column 'answer'.*\['solution'\]"):
        accuracy_reward(completions=["x"], solution=["1"], completion_ids=[[1]])
    with pytest.raises(ValueError, match="unknown extract 'boxed'"):
        get_accuracy_reward(extract="boxed")


def test_math_accuracy() -> None:
    completions = [
        r"The result is \boxed{\frac{1}{2}}",
        "<answer>1/2</answer>",
        "<answer>0.5</answer>",
        r"\boxed{3}",
        chat(r"so $\frac{2}{4}$"),
        *GARBAGE,
    ]
    answers = [r"\frac{1}{2}"] * len(completions)
    expected = [1.0, 1.0, 1.0, 0.0, 1.0, *([0.0] * len(GARBAGE))]
    assert math_accuracy_reward(completions=completions, answer=answers) == expected
    # An unparseable reference does not apply; extract="tag" requires the tag.
    assert math_accuracy_reward(completions=["1"], answer=[""]) == [None]
    assert get_math_accuracy_reward(extract="tag")(completions=[r"\boxed{1}"], answer=["1"]) == [
        0.0
    ]


def test_math_accuracy_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match="needs the optional package math-verify"):
        get_math_accuracy_reward()


def test_format_rewards() -> None:
    completions = [
        "<think>2+2</think> <answer>4</answer>",
        "<think>\nhm\n</think>\n<answer>4</answer>\n",
        "<answer>4</answer>",
        "<think>a</think><answer>4</answer> trailing",
        "<think>a</think><answer>4</answer><answer>5</answer>",
        "<think></think><answer>4</answer>",
        chat("<think>x</think><answer>y</answer>"),
        *GARBAGE,
    ]
    n = len(GARBAGE)
    assert answer_format_reward(completions=completions) == [1, 1, 1, 1, 0, 1, 1, *([0.0] * n)]
    assert think_format_reward(completions=completions) == [1, 1, 0, 0, 0, 0, 1, *([0.0] * n)]


def test_soft_overlong_punishment_dapo_eq13() -> None:
    fn = soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    lengths = [50, 80, 90, 100, 101]
    # L - C = 80: 0 up to 80; (80 - 90) / 20 = -0.5; (80 - 100) / 20 = -1; beyond 100: -1.
    got = fn(completions=[""] * 5, completion_ids=[[1] * n for n in lengths])
    assert got == [0.0, 0.0, -0.5, -1.0, -1.0]
    no_cache = soft_overlong_punishment(10, 0)
    assert no_cache(completions=["", ""], completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="0 <= soft_punish_cache <= max_completion_len"):
        soft_overlong_punishment(10, 20)


def test_repetition_penalty() -> None:
    fn = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    # [5,5,5,5,5] has 4 bigrams, 1 unique: (1 - 1/4) * -1 = -0.75. Fewer than 2 tokens: 0.
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], [7], []]
    assert fn(completions=[""] * 4, completion_ids=ids) == [0.0, -0.75, 0.0, 0.0]
    words = get_repetition_penalty_reward(ngram_size=1, max_penalty=-0.5, unit="words")
    # "a a a b": 4 words, 2 unique: (1 - 2/4) * -0.5 = -0.25.
    assert words(completions=["a a a b", chat("x y"), None]) == [-0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="max_penalty <= 0"):
        get_repetition_penalty_reward(max_penalty=1.0)


def test_cosine_scaled_reward() -> None:
    fn = get_cosine_scaled_reward(max_len=100)
    right, wrong = "<answer>4</answer>", "<answer>5</answer>"
    completions = [right, wrong, right, wrong, right, "garbage", right]
    lengths = [50, 50, 0, 0, 200, 0, 100]
    got = fn(
        completions=completions,
        answer=["4"] * 6 + [None],
        completion_ids=[[1] * n for n in lengths],
    )
    # Half-way: cos(pi/2) = 0, so the midpoint: 0.5 + 0.5 * 0.5 = 0.75 and -0.5 - 0.5 * 0.5 = -0.75.
    # Length 0: cos 0 = 1 gives max_value_correct 1.0 / min_value_wrong -1.0. Beyond max_len the
    # progress is clamped to 1: min_value_correct 0.5. A missing reference does not apply.
    assert got == pytest.approx([0.75, -0.75, 1.0, -1.0, 0.5, -1.0, None])


def test_reasoning_gym_score() -> None:
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=5)[0]
    column = [json.dumps(entry)] * 5
    completions = [
        f"<answer>{entry['answer']}</answer>",
        chat(f"<think>x</think><answer>{entry['answer']}</answer>"),
        "<answer>not a number</answer>",
        entry["answer"],  # no tag
        None,
    ]
    got = reasoning_gym_score(completions=completions, reasoning_gym_entry=column)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_registry_names_match_function_names() -> None:
    params: dict[str, dict[str, Any]] = {
        "soft_overlong_punishment": {"max_completion_len": 10, "soft_punish_cache": 2},
        "cosine_scaled_reward": {"max_len": 10},
    }
    for name in REWARD_FUNCTIONS:
        fn = get_reward_function({"name": name, **params.get(name, {})})
        assert fn.__name__ == name  # type: ignore[attr-defined]


def test_get_reward_function_specs_and_errors() -> None:
    assert get_reward_function("accuracy_reward")(completions=["<answer>1</answer>"], answer=["1"])
    fn = get_reward_function({"name": "accuracy_reward", "extract": "last_number"})
    assert fn(completions=["it is 1"], answer=["1"]) == [1.0]
    assert get_reward_function("tests.test_reward_funcs:user_reward") is user_reward
    scaled = get_reward_function({"name": "tests.test_reward_funcs:user_factory", "scale": 3.0})
    assert scaled(completions=["a"]) == [3.0]
    with pytest.raises(ValueError, match=r"Unknown reward function 'acuracy'.*'accuracy_reward'"):
        get_reward_function("acuracy")
    with pytest.raises(ValueError, match=r"reward 'soft_overlong_punishment': bad parameters"):
        get_reward_function({"name": "soft_overlong_punishment", "max_len": 3})
    with pytest.raises(ValueError, match="no module 'no_such_module' on the import path"):
        get_reward_function("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        get_reward_function("tests.test_reward_funcs:nope")
    with pytest.raises(ValueError, match="must be a name or a dict"):
        get_reward_function({"scale": 1})  # type: ignore[arg-type]


def test_user_reward_module_import_failures_say_what_failed(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "needs_missing_dep_ue.py").write_text("import not_installed_dep_ue\n")
    with pytest.raises(
        ValueError,
        match=r"importing module 'needs_missing_dep_ue' failed: No module named "
        r"'not_installed_dep_ue' \(install the missing package or fix the import\)",
    ):
        get_reward_function("needs_missing_dep_ue:reward")
    (tmp_path / "bad_syntax_ue.py").write_text("def reward(:\n")
    with pytest.raises(
        ValueError, match=rf"failed: SyntaxError: .* at {tmp_path / 'bad_syntax_ue.py'}:1 \(fix"
    ):
        get_reward_function("bad_syntax_ue:reward")
