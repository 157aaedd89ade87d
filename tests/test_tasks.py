"""Built-in tasks: reasoning-gym generators and local datasets, with held-out splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from grpokit.data.tasks import load_task, make_prompt
from grpokit.rewards.builtin import get_reward_function

# chain_sum with 2 one-digit terms: few distinct questions, so seeds collide often.
SMALL_CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def questions(dataset: Dataset) -> set[str]:
    return set(dataset["question"])


def test_reasoning_gym_split_never_overlaps() -> None:
    task = load_task(
        {
            "kind": "reasoning_gym",
            "name": "chain_sum",
            "size": 60,
            "eval_size": 30,
            "seed": 1,
            "config": SMALL_CHAIN_SUM,
        }
    )
    assert task.eval_dataset is not None
    assert len(task.train_dataset) == 60 and len(task.eval_dataset) == 30
    assert questions(task.train_dataset).isdisjoint(questions(task.eval_dataset))
    assert len(questions(task.eval_dataset)) == 30  # eval has no duplicates either
    assert task.default_rewards == ["reasoning_gym_score", "answer_format_reward"]
    assert set(task.train_dataset.column_names) == {
        "prompt",
        "question",
        "answer",
        "reasoning_gym_entry",
    }


def test_reasoning_gym_rows_score_with_the_verifier() -> None:
    task = load_task({"kind": "reasoning_gym", "name": "basic_arithmetic", "size": 4, "seed": 7})
    row = task.train_dataset[0]
    assert row["prompt"][0]["role"] == "user"
    assert row["prompt"][0]["content"].startswith(row["question"])
    assert "<answer></answer>" in row["prompt"][0]["content"]
    score = get_reward_function("reasoning_gym_score")
    rows = task.train_dataset[:2]
    completions = [f"<answer>{rows['answer'][0]}</answer>", "<answer>nope</answer>"]
    assert score(completions=completions, reasoning_gym_entry=rows["reasoning_gym_entry"]) == [
        1.0,
        0.0,
    ]


def test_reasoning_gym_is_deterministic_and_formats() -> None:
    spec = {
        "kind": "reasoning_gym",
        "name": "number_sorting",
        "size": 5,
        "eval_size": 3,
        "seed": 2,
        "format": "plain",
        "template": "Q: {prompt}\nA:",
        "system_prompt": "You sort numbers.",
    }
    first, second = load_task(spec), load_task(spec)
    assert first.train_dataset["prompt"] == second.train_dataset["prompt"]
    assert first.eval_dataset is not None and second.eval_dataset is not None
    assert first.eval_dataset["prompt"] == second.eval_dataset["prompt"]
    prompt = first.train_dataset[0]["prompt"]
    assert prompt.startswith("You sort numbers.\n\nQ: Sort these numbers") and prompt.endswith("A:")


def test_reasoning_gym_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown reasoning-gym task 'chain_sums'.*chain_sum"):
        load_task({"kind": "reasoning_gym", "name": "chain_sums"})
    with pytest.raises(ValueError, match="question space is too small"):
        load_task(
            {
                "kind": "reasoning_gym",
                "name": "chain_sum",
                "size": 300,
                "eval_size": 200,
                "config": {**SMALL_CHAIN_SUM, "allow_negation": False},
            }
        )
    with pytest.raises(ValueError, match="needs 'name'"):
        load_task({"kind": "reasoning_gym"})


def test_make_prompt() -> None:
    assert make_prompt("q", template="<{prompt}>", system_prompt="s") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "<q>"},
    ]
    chat = [{"role": "user", "content": "q"}]
    assert make_prompt(chat, prompt_format="plain") == chat  # conversations stay conversations
    assert make_prompt("q {x}", prompt_format="plain", template="{prompt} {y}") == "q {x} {y}"


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------

ROWS = [{"question": f"What is {i}+{i}?", "final": str(2 * i), "id": i} for i in range(20)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_with_column_mapping_and_eval_fraction(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arith.jsonl", ROWS)
    spec = {
        "kind": "dataset",
        "path": path,
        "columns": {"question": "prompt", "final": "answer"},
        "eval_fraction": 0.25,
        "seed": 3,
        "format": "plain",
    }
    task = load_task(spec)
    assert task.name == "arith"
    assert task.eval_dataset is not None
    assert (len(task.train_dataset), len(task.eval_dataset)) == (15, 5)
    assert set(task.train_dataset.column_names) == {"prompt", "answer", "id"}
    train_ids, eval_ids = set(task.train_dataset["id"]), set(task.eval_dataset["id"])
    assert train_ids.isdisjoint(eval_ids) and train_ids | eval_ids == set(range(20))
    assert task.train_dataset[0]["answer"] == str(2 * task.train_dataset[0]["id"])
    # The same seed gives the same split; another seed a different one.
    assert load_task(spec).eval_dataset["id"] == task.eval_dataset["id"]  # type: ignore[index]
    other = load_task({**spec, "seed": 4}).eval_dataset
    assert other is not None and other["id"] != task.eval_dataset["id"]


def test_duplicate_prompts_never_reach_eval(tmp_path: Path) -> None:
    rows = [{"question": "same?", "final": "1"}] * 10 + ROWS[:10]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    task = load_task(
        {
            "kind": "dataset",
            "path": path,
            "columns": {"question": "prompt", "final": "answer"},
            "eval_fraction": 0.5,
        }
    )
    assert task.eval_dataset is not None
    train = {json.dumps(p) for p in task.train_dataset["prompt"]}
    assert train.isdisjoint(json.dumps(p) for p in task.eval_dataset["prompt"])
    assert task.train_dataset[0]["prompt"][-1]["role"] == "user"  # conversational by default


def test_csv_and_parquet(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows([{"prompt": "p1", "answer": "007"}, {"prompt": "p2", "answer": "2"}])
    task = load_task({"kind": "dataset", "path": str(csv_path), "eval_fraction": 0.0})
    assert task.eval_dataset is None
    assert task.train_dataset["answer"] == ["007", "2"]  # CSV values stay strings

    parquet_path = tmp_path / "d.parquet"
    Dataset.from_list(ROWS).to_parquet(str(parquet_path))
    task = load_task(
        {
            "kind": "dataset",
            "path": str(parquet_path),
            "columns": {"question": "prompt"},
            "size": 4,
            "eval_fraction": 0.5,
        }
    )
    assert len(task.train_dataset) == 4 and task.eval_dataset is not None
    assert len(task.eval_dataset) == 10


def test_dataset_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(
        ValueError, match=r"no column\(s\) \['questions'\].*\['question', 'final', 'id'\]"
    ):
        load_task({"kind": "dataset", "path": path, "columns": {"questions": "prompt"}})
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['question', 'final', 'id'\]"):
        load_task({"kind": "dataset", "path": path})
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*does not exist"):
        load_task({"kind": "dataset", "path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "a.txt").write_text("x")
        load_task({"kind": "dataset", "path": str(tmp_path / "a.txt")})
    with pytest.raises(ValueError, match=r"no '\{prompt\}' placeholder"):
        load_task({"kind": "dataset", "path": path, "template": "Answer:"})
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        load_task({"kind": "dataset"})


def test_unknown_kind_and_keys() -> None:
    with pytest.raises(
        ValueError, match=r"unknown task kind 'gym'.*\['dataset', 'humaneval', 'reasoning_gym'\]"
    ):
        load_task({"kind": "gym"})
    with pytest.raises(ValueError, match=r"needs a 'kind'"):
        load_task({"name": "chain_sum"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['eval_sise'\].*'eval_size'"):
        load_task({"kind": "reasoning_gym", "name": "chain_sum", "eval_sise": 3})
