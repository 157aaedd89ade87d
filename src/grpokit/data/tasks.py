"""Built-in tasks: a train and a held-out eval dataset with a `prompt` column, plus default rewards.

Three kinds, chosen by `load_task({"kind": ...})`:

- `"reasoning_gym"`: procedurally generated problems from `reasoning-gym` (basic_arithmetic,
  chain_sum, countdown, number_sorting, ...). Each row keeps the generator's entry as JSON in
  `reasoning_gym_entry`, which the `reasoning_gym_score` reward hands to the dataset's own
  verifier. The eval split is generated from seeds disjoint from the train split's and any
  question that also appears in train is dropped, so the two never overlap.
- `"dataset"`: local JSONL/JSON/CSV/Parquet files or a Hugging Face dataset name, with a column
  mapping onto `prompt` (and, for the accuracy rewards, `answer`); the eval split is either a
  named split or a fixed-seed random fraction, with prompts also present in train removed.
- `"humaneval"`: HumanEval's 164 problems with their tests (`data.code_tasks`), scored by
  `code_tests`; a seeded `eval_fraction` of them held out.

Prompts are plain strings or conversations (`format`), built from the question with an optional
`template` (containing `{prompt}`) and `system_prompt`.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from grpokit.data.prompts import is_conversational_prompt

ANSWER_INSTRUCTION = (
    "{prompt}\n\nThink briefly, then give only the final answer inside <answer></answer> tags, "
    "for example <answer>42</answer>."
)
"""Default template for reasoning-gym tasks: the answer goes in the tag the rewards read."""

PROMPT_FORMATS = ("conversational", "plain")


@dataclass
class Task:
    """A training task: datasets with a `prompt` column and the columns its rewards read."""

    name: str
    """Short name, e.g. `"basic_arithmetic"` or the dataset file's name."""
    train_dataset: Dataset
    """Training rows: `prompt` (string or messages) plus reward columns such as `answer`."""
    eval_dataset: Dataset | None
    """Held-out rows with the same columns; no prompt in it appears in `train_dataset`."""
    default_rewards: list[str] = field(default_factory=list)
    """Names in `grpokit.rewards.builtin.REWARD_FUNCTIONS` used when the config names none."""


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _require(spec: dict[str, Any], key: str, kind: str, example: str) -> Any:
    if key not in spec:
        raise ValueError(f"task kind {kind!r} needs {key!r}, e.g. {example}.")
    return spec.pop(key)


def _check_keys(spec: dict[str, Any], kind: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} for task kind {kind!r}; allowed keys: "
            f"{sorted(['kind', *allowed])}."
        )


def make_prompt(
    question: Any,
    *,
    prompt_format: str = "conversational",
    template: str | None = None,
    system_prompt: str | None = None,
    few_shot: list[dict[str, Any]] | None = None,
) -> Any:
    """Build one prompt from a question.

    Args:
        question: The question text, or an existing conversation (kept, system prompt added in
            front if it has none).
        prompt_format: `"conversational"` (a list of messages) or `"plain"` (a string).
        template: Text containing `{prompt}`, replaced by the question (plain `str.replace`, so
            other braces are literal).
        system_prompt: A system message (conversational) or a leading paragraph (plain).
        few_shot: Example turns (chat messages: `user`, `assistant` with optional
            `tool_calls`, `tool`) placed after the system message and before the question;
            conversational prompts only.

    Returns:
        A string or a list of `{"role", "content"}` messages.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; use one of {PROMPT_FORMATS}.")
    if few_shot and prompt_format == "plain":
        raise ValueError("few_shot turns are chat messages; they need format: conversational.")
    if is_conversational_prompt(question):
        messages = list(question)
        head = 1 if messages and messages[0]["role"] == "system" else 0
        messages[head:head] = [dict(m) for m in few_shot or []]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    text = str(question)
    if template is not None:
        text = template.replace("{prompt}", text)
    if prompt_format == "plain":
        return f"{system_prompt}\n\n{text}" if system_prompt else text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.extend(dict(m) for m in few_shot or [])
    messages.append({"role": "user", "content": text})
    return messages


def _few_shot(spec: dict[str, Any], prompt_format: str) -> list[dict[str, Any]] | None:
    """The task's `few_shot` turns, checked: a list of chat messages, for conversational
    prompts."""
    turns = spec.pop("few_shot", None)
    if turns is None:
        return None
    if prompt_format == "plain":
        raise ValueError("few_shot turns are chat messages; they need format: conversational.")
    roles = ("user", "assistant", "tool", "system")
    if not isinstance(turns, list) or not all(
        isinstance(m, dict) and m.get("role") in roles for m in turns
    ):
        raise ValueError(
            f"few_shot must be a list of chat messages with a role in {roles}, e.g. [{{role: "
            "user, content: ...}, {role: assistant, content: ...}], got "
            f"{json.dumps(turns, default=str)[:200]}."
        )
    return turns


def _prompt_key(prompt: Any) -> str:
    """A hashable identity of a prompt, for de-duplication."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _check_template(template: str | None) -> None:
    if template is not None and "{prompt}" not in template:
        raise ValueError(
            f"task template {template!r} has no '{{prompt}}' placeholder for the question."
        )


# ---------------------------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------------------------


def _generate(name: str, seed: int, size: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except ValueError as error:
        if "not registered" in str(error):
            from reasoning_gym.factory import DATASETS

            raise ValueError(
                f"unknown reasoning-gym task {name!r}; e.g. basic_arithmetic, chain_sum, "
                f"countdown, number_sorting. All: {sorted(DATASETS)}."
            ) from error
        raise
    return [dataset[i] for i in range(size)]


def _json_default(value: Any) -> Any:
    return list(value) if isinstance(value, (set, frozenset)) else str(value)


def _reasoning_gym_rows(
    entries: list[dict[str, Any]],
    prompt_format: str,
    template: str,
    system_prompt: str | None,
    few_shot: list[dict[str, Any]] | None,
) -> dict[str, list[Any]]:
    return {
        "prompt": [
            make_prompt(
                e["question"],
                prompt_format=prompt_format,
                template=template,
                system_prompt=system_prompt,
                few_shot=few_shot,
            )
            for e in entries
        ],
        "question": [e["question"] for e in entries],
        "answer": [str(e["answer"]) for e in entries],
        # JSON because metadata differs between generators (Arrow needs one schema per column).
        "reasoning_gym_entry": [json.dumps(e, default=_json_default) for e in entries],
    }


def _load_reasoning_gym(spec: dict[str, Any]) -> Task:
    kind = "reasoning_gym"
    try:
        import reasoning_gym  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "reasoning_gym tasks need the optional package reasoning-gym; install it with "
            "`pip install 'grpokit[tasks]'`."
        ) from error
    name = _require(spec, "name", kind, "{'kind': 'reasoning_gym', 'name': 'chain_sum'}")
    size = int(spec.pop("size", 1000))
    seed = int(spec.pop("seed", 0))
    eval_size = int(spec.pop("eval_size", 100))
    config = dict(spec.pop("config", {}) or {})
    prompt_format = spec.pop("format", "conversational")
    template = spec.pop("template", ANSWER_INSTRUCTION)
    system_prompt = spec.pop("system_prompt", None)
    few_shot = _few_shot(spec, prompt_format)
    rewards = list(spec.pop("rewards", ["reasoning_gym_score", "answer_format_reward"]))
    _check_template(template)
    if size < 1 or eval_size < 0:
        raise ValueError(
            f"reasoning_gym task needs size >= 1 and eval_size >= 0; got {size}, {eval_size}."
        )

    train = _generate(name, seed, size, config)
    train_questions = {e["question"] for e in train}
    # reasoning-gym seeds item i with (seed + i), so eval seeds start after the train range;
    # different seeds can still produce the same question, hence the de-duplication.
    held_out: list[dict[str, Any]] = []
    seen = set(train_questions)
    next_seed = seed + size
    for _ in range(20):
        if len(held_out) >= eval_size:
            break
        chunk = max(eval_size, 16) * 2
        for entry in _generate(name, next_seed, chunk, config):
            if entry["question"] not in seen and len(held_out) < eval_size:
                seen.add(entry["question"])
                held_out.append(entry)
        next_seed += chunk
    if len(held_out) < eval_size:
        raise ValueError(
            f"reasoning-gym task {name!r} produced only {len(held_out)} questions not in the "
            f"train split (wanted eval_size={eval_size}); its question space is too small. Lower "
            "eval_size or size, or widen the generator's config."
        )
    style = (prompt_format, template, system_prompt, few_shot)
    train_ds = Dataset.from_dict(_reasoning_gym_rows(train, *style))
    eval_ds = Dataset.from_dict(_reasoning_gym_rows(held_out, *style)) if eval_size else None
    return Task(name=name, train_dataset=train_ds, eval_dataset=eval_ds, default_rewards=rewards)


# ---------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets
# ---------------------------------------------------------------------------------------------


def _read_file(path: str) -> Dataset:
    if not os.path.exists(path):
        raise FileNotFoundError(f"task data file {path!r} does not exist.")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            if lower.endswith(".json"):
                data = json.load(f)
                rows = data if isinstance(data, list) else None
            else:
                rows = [json.loads(line) for line in f if line.strip()]
        if rows is None:
            raise ValueError(f"{path!r}: a .json task file must hold a list of objects.")
        return Dataset.from_list(rows)
    if lower.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return Dataset.from_list(list(csv.DictReader(f)))
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return Dataset(pq.read_table(path))
    raise ValueError(
        f"task data file {path!r}: unsupported extension; use .jsonl, .json, .csv or .parquet."
    )


def _apply_mapping(dataset: Dataset, columns: dict[str, str], source: str) -> Dataset:
    available = dataset.column_names
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(
            f"task data {source!r} has no column(s) {missing} named in the column mapping; "
            f"available columns: {available}."
        )
    renames = {src: dst for src, dst in columns.items() if src != dst}
    clashing = [dst for dst in renames.values() if dst in available and dst not in renames]
    if clashing:
        dataset = dataset.remove_columns(clashing)
    dataset = dataset.rename_columns(renames)
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"task data {source!r} has no 'prompt' column; available columns: {available}. Map "
            "the question column onto it, e.g. columns: {'question': 'prompt'}."
        )
    return dataset


def _split(train: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    n_eval = round(len(train) * eval_fraction)
    if n_eval == 0:
        return train, None
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    return train.select(sorted(order[n_eval:])), train.select(sorted(order[:n_eval]))


def _load_dataset(spec: dict[str, Any]) -> Task:
    path = spec.pop("path", None)
    hf_name = spec.pop("name", None)
    columns = dict(spec.pop("columns", {}) or {})
    split = spec.pop("split", "train")
    eval_split = spec.pop("eval_split", None)
    eval_fraction = float(spec.pop("eval_fraction", 0.1))
    eval_path = spec.pop("eval_path", None)
    seed = int(spec.pop("seed", 0))
    hf_config = spec.pop("config_name", None)
    limit = spec.pop("size", None)
    prompt_format = spec.pop("format", "conversational")
    template = spec.pop("template", None)
    system_prompt = spec.pop("system_prompt", None)
    few_shot = _few_shot(spec, prompt_format)
    rewards = list(spec.pop("rewards", ["accuracy_reward", "answer_format_reward"]))
    _check_template(template)
    if (path is None) == (hf_name is None):
        raise ValueError(
            "task kind 'dataset' needs exactly one of 'path' (a local .jsonl/.csv/.parquet file) "
            "or 'name' (a Hugging Face dataset)."
        )

    eval_ds: Dataset | None
    if path is not None:
        source = str(path)
        train = _read_file(source)
        eval_ds = _read_file(str(eval_path)) if eval_path else None
    else:
        import datasets

        source = str(hf_name)
        train = datasets.load_dataset(source, hf_config, split=split)
        eval_ds = datasets.load_dataset(source, hf_config, split=eval_split) if eval_split else None
    train = _apply_mapping(train, columns, source)
    if eval_ds is not None:
        eval_ds = _apply_mapping(eval_ds, columns, source)
    else:
        train, eval_ds = _split(train, eval_fraction, seed)
    if limit is not None:
        train = train.select(range(min(int(limit), len(train))))

    def build(example: dict[str, Any]) -> dict[str, Any]:
        prompt = make_prompt(
            example["prompt"],
            prompt_format=prompt_format,
            template=template,
            system_prompt=system_prompt,
            few_shot=few_shot,
        )
        return {"prompt": prompt}

    train = train.map(build)
    train_keys = {_prompt_key(p) for p in train["prompt"]}
    if eval_ds is not None:
        eval_ds = eval_ds.map(build)
        keep = [i for i, p in enumerate(eval_ds["prompt"]) if _prompt_key(p) not in train_keys]
        eval_ds = eval_ds.select(keep)
    name = os.path.splitext(os.path.basename(source))[0] if path else source
    return Task(name=name, train_dataset=train, eval_dataset=eval_ds, default_rewards=rewards)


# ---------------------------------------------------------------------------------------------
# Code tasks with tests
# ---------------------------------------------------------------------------------------------


def _load_humaneval(spec: dict[str, Any]) -> Task:
    from grpokit.data.code_tasks import load_humaneval

    prompt_format = spec.pop("format", "conversational")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; use one of {PROMPT_FORMATS}.")
    system_prompt = spec.pop("system_prompt", None)
    few_shot = _few_shot(spec, prompt_format)
    limit = spec.pop("size", None)
    train, held_out = load_humaneval(
        eval_fraction=float(spec.pop("eval_fraction", 0.2)),
        seed=int(spec.pop("seed", 0)),
        conversational=prompt_format == "conversational",
    )
    if limit is not None:
        train = train[: int(limit)]
    for row in (*train, *held_out):
        row["prompt"] = make_prompt(
            row["prompt"],
            prompt_format=prompt_format,
            system_prompt=system_prompt,
            few_shot=few_shot,
        )
    rewards = list(spec.pop("rewards", ["code_tests"]))
    return Task(
        name="humaneval",
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        default_rewards=rewards,
    )


TASK_KINDS = {
    "reasoning_gym": _load_reasoning_gym,
    "dataset": _load_dataset,
    "humaneval": _load_humaneval,
}
_COMMON_KEYS = ("format", "template", "system_prompt", "few_shot", "rewards", "seed", "size")
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "reasoning_gym": ("name", "eval_size", "config", *_COMMON_KEYS),
    "dataset": (
        *("path", "name", "config_name", "columns", "split", "eval_split", "eval_path"),
        *("eval_fraction", *_COMMON_KEYS),
    ),
    "humaneval": (
        *("eval_fraction", "format", "system_prompt", "few_shot", "rewards", "seed", "size"),
    ),
}
"""The keys each task kind accepts besides `kind`."""


def load_task(spec: dict[str, Any]) -> Task:
    """Build a task from its config.

    Args:
        spec: `{"kind": "reasoning_gym", "name": "chain_sum", "size": 1000, "seed": 0,
            "eval_size": 100, "config": {...generator options}}` or `{"kind": "dataset",
            "path": "data.jsonl" | "name": "hf/dataset", "columns": {"question": "prompt",
            "final": "answer"}, "eval_fraction": 0.1, "seed": 0}`. Both accept `format`
            (`"conversational"` default, or `"plain"`), `template` (with `{prompt}`),
            `system_prompt`, `few_shot` (example chat turns before the question), `rewards`
            (default reward names) and `size`. A dataset can instead
            take its eval rows from `eval_split` (HF) or `eval_path` (a file); `size` caps its
            train rows; `name` with `config_name` and `split` loads from the Hugging Face Hub.
            `{"kind": "humaneval", "eval_fraction": 0.2, "seed": 0}` takes `format`,
            `system_prompt`, `rewards` and `size` too. Unknown keys are errors.

    Returns:
        The task.

    Raises:
        ValueError: Unknown kind or key, missing columns (the available ones are listed).
        FileNotFoundError: A data file does not exist.
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"task spec {spec!r} needs a 'kind': one of {sorted(TASK_KINDS)}.")
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; use one of {sorted(TASK_KINDS)}.")
    _check_keys(spec, kind, TASK_KEYS[kind])
    return TASK_KINDS[kind](spec)
