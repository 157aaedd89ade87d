"""The `grpokit` command: `train`, `eval` and `demo`, driven by one YAML run config.

A run config has five sections; every key is checked before any model, tokenizer or dataset is
loaded (validation imports torch, for the loss and reward tables, but not transformers unless the
config names tools, whose schemas transformers reads from their type hints and docstrings)::

    model: smollm2-135m-instruct          # HF id, local folder, .gguf file or built-in name
    task: {kind: reasoning_gym, name: chain_sum, config: {max_terms: 2}}
    rewards: [reasoning_gym_score, answer_format_reward]   # names, "module:function", or dicts
    tools: [calculator]                   # optional: names, "module:function", or dicts
    training: {learning_rate: 1.0e-5, num_generations: 8, output_dir: runs/x}  # GRPOConfig
    eval: {num_samples: 1, num_prompts: 100}               # held-out evaluation (EvalConfig)

Any field can be overridden on the command line: `--learning_rate 2e-6` (a flat name is looked up
in the run-level fields, then `training`, then `eval`), or dotted: `--training.learning_rate 2e-6`,
`--eval.max_completion_length 64`, `--task.config.max_terms 3`. Values are parsed as YAML.

The config actually used is written to `<output_dir>/config.yaml`; `grpokit train
<output_dir>/config.yaml --resume` continues that run from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grpokit.errors import ConfigError
from grpokit.train.config import GRPOConfig
from grpokit.train.config_checks import (
    EVAL_STRATEGIES,
    LOGGING_STRATEGIES,
    SAVE_STRATEGIES,
    check_number,
)
from grpokit.train.fields import did_you_mean, option
from grpokit.train.trl_compat import RETIRED_TRL_FIELDS

logger = logging.getLogger("grpokit")

SECTIONS = ("training", "eval")
RUN_ARTIFACTS = ("metrics.jsonl", "completions.jsonl", "eval.jsonl", "curves.png")

# String fields whose choices include "no": YAML 1.1 reads an unquoted `no` (or `off`) as False.
NO_CHOICE_FIELDS = {
    "save_strategy": SAVE_STRATEGIES,
    "eval_strategy": EVAL_STRATEGIES,
    "logging_strategy": LOGGING_STRATEGIES,
}


# =================================================================================================
# The run-level and evaluation schemas (GRPOConfig is the `training` section)
# =================================================================================================
@dataclass
class RunConfig:
    """Run-level fields of a YAML run config (the `training` and `eval` sections are separate)."""

    model: str = option(
        "smollm2-135m-instruct",
        "Policy: Hugging Face id, local folder, .gguf file, or built-in smollm2-135m-instruct.",
    )
    task: dict[str, Any] = option(
        {"kind": "reasoning_gym", "name": "chain_sum"},
        "Task spec for `grpokit.data.tasks.load_task`: {kind: reasoning_gym | dataset, name, ...}.",
    )
    rewards: list[Any] | None = option(
        None,
        'Rewards: built-in names, "module:function" or {name: ..., params}; None = the task\'s.',
    )
    tools: list[Any] | None = option(
        None,
        "Tools the model may call during generation (multi-turn rollouts, docs/TOOLS.md): "
        'built-in names (calculator, python), "module:function", or {name: ..., params}. '
        "Settings: training.max_tool_calling_iterations, tool_timeout, tool_call_parser.",
    )
    environment_factory: str | None = option(
        None,
        '"module:Class" (or a zero-argument function) making one environment per rollout '
        "(TRL's environment_factory): reset(**row) may return text appended to the prompt, its "
        "public methods are tools, an optional get_reward() is one more reward.",
    )
    chat_template: str | None = option(
        None,
        "Replace the tokenizer's chat template: a built-in name (chatml_tools: ChatML that "
        "renders tools, tool calls and tool replies, for models whose template has no tool "
        "support, e.g. SmolLM2) or a .jinja file. None = the model's own.",
    )
    lora: dict[str, Any] | None = option(
        None,
        "LoRA options for peft.LoraConfig (r, lora_alpha, target_modules, ...); None = all "
        "weights.",
    )
    plot: bool = option(
        True, "Write curves.png (reward and accuracy over training) into output_dir at the end."
    )
    min_free_disk_gb: float | None = option(
        None,
        "grpokit train: refuse to start when the disk of output_dir has less free space (GB), "
        "checked before the model loads; None = room for what the run writes (a checkpoint and "
        "the final model, estimated from the loaded model's size: a few MB for a tiny model), "
        "checked once it is loaded; 0 = no minimum (a warning still says when a checkpoint may "
        "not fit).",
    )


@dataclass
class EvalConfig:
    """Held-out evaluation: `grpokit eval`, and before/after `grpokit train` (evaluation.py)."""

    num_samples: int = option(
        1, "Completions per held-out prompt (k of pass@k); 1 = greedy decoding."
    )
    num_prompts: int | None = option(
        None, "Evaluate on the first this many held-out prompts; None = all of them."
    )
    max_completion_length: int | None = option(
        None, "New tokens per completion; None = the training max_completion_length."
    )
    temperature: float = option(1.0, "Sampling temperature when num_samples > 1.")
    batch_size: int = option(64, "Completions per generate call.")
    accuracy_reward: str | None = option(
        None, "Reward whose value decides correctness; None = the first reward function."
    )
    accuracy_threshold: float = option(
        1.0, "A completion is correct when the accuracy reward is >= this value."
    )
    before: bool = option(
        True, "grpokit train: evaluate the model before training (skipped when resuming)."
    )
    after: bool = option(True, "grpokit train: evaluate the trained model after training.")
    seed: int = option(0, "Seed of the evaluation's sampling (independent of training).")


SCHEMAS: dict[str, type] = {"run": RunConfig, "training": GRPOConfig, "eval": EvalConfig}


def field_help(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to its help text (`metadata["help"]`, see `option`)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.init}


def fields_by_declaring_class(cls: type) -> list[tuple[type, list[str]]]:
    """The init fields of a config dataclass grouped by the class that declares them: `cls`'s
    own first, then each base's in method-resolution order (for `--help`)."""
    groups: list[tuple[type, list[str]]] = []
    seen: set[str] = set()
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for owner in cls.__mro__:
        declared = inspect.get_annotations(owner)
        own = [n for n in names if n in declared and n not in seen]
        if own:
            groups.append((owner, own))
            seen.update(own)
    return groups


def field_defaults(cls: type) -> dict[str, Any]:
    """The default value of every init field of a dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# =================================================================================================
# Types: check and coerce YAML values against the dataclass annotations
# =================================================================================================
def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "None" if hint is type(None) else str(hint)
    )


def _exact(value: Any, hint: Any) -> bool:
    """Whether `value` already has the type `hint` (no conversion), bool never counting as int."""
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    return isinstance(value, origin)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the annotation `hint`; convert int -> float and numeric strings.

    YAML 1.1 reads `2e-6` as a string (it wants `2.0e-6`), so a string that parses as a number
    is accepted where a float is expected.

    Raises:
        ConfigError: naming `where`, the expected type and the value.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if _exact(value, arg):
                return coerce(value, arg, where)
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg, where)
                except ConfigError:
                    continue
    elif hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif origin is list and isinstance(value, list):
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    elif _exact(value, hint):
        return value
    raise ConfigError(
        f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__}); "
        f"fix the value of `{where}`."
    )


def _accepts(hint: Any, kind: type) -> bool:
    """Whether the annotation `hint` is `kind` or a union that includes it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return kind in typing.get_args(hint)
    return bool(hint is kind)


def bool_for_string(value: Any, hint: Any, where: str, choices: Sequence[str] = ()) -> Any:
    """Undo YAML 1.1 reading `no`/`off` as False (and `yes`/`on` as True) for a string field.

    A False given for a string field whose `choices` include "no" becomes "no"
    (`save_strategy: no`); any other bool for a field that takes a string but not a bool is an
    error that says to quote the value. Other values are returned unchanged.

    Raises:
        ConfigError: a bool where only a string (or None) is accepted.
    """
    if not isinstance(value, bool) or _accepts(hint, bool) or not _accepts(hint, str):
        return value
    if value is False and "no" in choices:
        return "no"
    options = f"one of {', '.join(map(repr, choices))}" if choices else "a string"
    raise ConfigError(
        f"{where}: got {str(value).lower()} but the field takes {options}; YAML reads an unquoted "
        'yes/no/on/off/true/false as true/false, so quote the value (e.g. "off").'
    )


# =================================================================================================
# Loading, overriding and validating a run config
# =================================================================================================
@dataclass
class RunSpec:
    """A validated run config: the three sections plus the resolved reward functions."""

    run: RunConfig
    training: GRPOConfig
    eval: EvalConfig
    training_values: dict[str, Any]
    """The training section as given (defaults filled in), before GRPOConfig derives sizes."""
    rewards: list[Any] | None = None
    """Named reward functions, resolved from `run.rewards` (None until the task's are known)."""
    tools: list[Callable[..., Any]] | None = None
    """The tool functions `run.tools` names (checked: type hints, docstrings, unique names)."""
    environment_factory: Callable[[], Any] | None = None
    """What `run.environment_factory` names (checked: it makes an environment with `reset`)."""

    def to_yaml_dict(self) -> dict[str, Any]:
        """The config actually used, in the YAML layout; loading it reproduces this spec.

        TRL fields accepted only at their default (`train.trl_compat.AcceptedAtDefault`) are left
        out: they can hold nothing else.
        """
        run = dataclasses.asdict(self.run)
        fixed = {f.name for f in dataclasses.fields(GRPOConfig) if "accepted" in f.metadata}
        defaults = field_defaults(GRPOConfig)
        training = {
            k: v for k, v in self.training_values.items() if not (k in fixed and v == defaults[k])
        }
        return {**run, "training": training, "eval": dataclasses.asdict(self.eval)}


def _all_fields() -> dict[str, list[str]]:
    return {section: list(field_defaults(cls)) for section, cls in SCHEMAS.items()}


def _suggest(key: str, section: str) -> str:
    """A hint for an unknown key: the closest name in its section, or the section it belongs to."""
    fields_by_section = _all_fields()
    for other, names in fields_by_section.items():
        if other != section and key in names:
            place = "at the top level" if other == "run" else f"under `{other}:`"
            return f" `{key}` belongs {place}."
    hint = did_you_mean(key, fields_by_section[section])
    if hint:
        return hint
    if section == "training":
        return " See `grpokit train --help` for the fields."
    return f" Valid keys: {', '.join(fields_by_section[section])}."


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """Parse `--key value`, `--key=value` and bare `--flag` (= true) tokens; values are YAML."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}; overrides are written `--field value` "
                "(for example `--learning_rate 2e-6` or `--training.max_steps 10`)."
            )
        key, sep, raw = token[2:].partition("=")
        if not sep:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                raw, i = tokens[i + 1], i + 1
            else:
                raw = "true"
        i += 1
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out.append((key.replace("-", "_"), value))
    return out


def apply_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set one override in the raw config dict (flat names looked up run -> training -> eval)."""
    parts = key.split(".")
    fields_by_section = _all_fields()
    if parts[0] in SECTIONS:
        if len(parts) != 2:
            raise ConfigError(f"override --{key}: write `--{parts[0]}.<field> value`.")
        config.setdefault(parts[0], {})
        if not isinstance(config[parts[0]], dict):
            raise ConfigError(f"`{parts[0]}` must be a mapping of fields to values.")
        config[parts[0]][parts[1]] = value
        return
    if parts[0] in fields_by_section["run"]:
        target = config
        for part in parts[:-1]:
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ConfigError(f"override --{key}: `{part}` is not a mapping.")
            target = target[part]
        target[parts[-1]] = value
        return
    if len(parts) == 1:
        for section in SECTIONS:
            if key in fields_by_section[section]:
                config.setdefault(section, {})[key] = value
                return
    every = [n for names in fields_by_section.values() for n in names]
    hint = did_you_mean(parts[-1], every, prefix="--")
    raise ConfigError(f"override --{key}: no such field.{hint} See `grpokit train --help`.")


def _check_section(values: Any, section: str) -> dict[str, Any]:
    """Unknown keys and types of one section; returns the coerced values."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"`{section}` must be a mapping of fields to values, got {values!r}.")
    cls = SCHEMAS[section]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # a TRL shorthand: True/False for two of its strings
        if f.metadata.get("takes_bool"):
            hints[f.name] = hints[f.name] | bool
    known = field_defaults(cls)
    out = {}
    for key, value in values.items():
        where = key if section == "run" else f"{section}.{key}"
        if section == "training" and key in RETIRED_TRL_FIELDS:
            raise ConfigError(f"{where}: {RETIRED_TRL_FIELDS[key]}; use that.")
        if key not in known:
            raise ConfigError(f"unknown key `{where}`.{_suggest(str(key), section)}")
        choices = NO_CHOICE_FIELDS.get(key, ()) if section == "training" else ()
        value = bool_for_string(value, hints[key], where, choices)
        out[key] = coerce(value, hints[key], where)
    return out


def _check_eval(cfg: EvalConfig) -> None:
    for name in ("num_samples", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"eval.{name} must be >= 1, got {getattr(cfg, name)}.")
    for name in ("num_prompts", "max_completion_length"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(
                f"eval.{name} must be >= 1 or null (= all / training's), got {value}."
            )
    for where, value, interval in (
        ("eval.temperature", cfg.temperature, "(0, inf)"),
        ("eval.accuracy_threshold", cfg.accuracy_threshold, "(-inf, inf)"),
    ):
        _check_number(where, value, interval)


def _check_number(where: str, value: Any, interval: str) -> None:
    try:
        check_number(where, value, interval)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def check_accuracy_reward(cfg: EvalConfig, rewards: Sequence[Any]) -> None:
    """`eval.accuracy_reward` must name one of the run's rewards (checked before any training).

    Raises:
        ConfigError: naming the value and the rewards it may be.
    """
    names = [reward.name for reward in rewards]
    if cfg.accuracy_reward is not None and cfg.accuracy_reward not in names:
        hint = did_you_mean(cfg.accuracy_reward, names)
        raise ConfigError(
            f"eval.accuracy_reward {cfg.accuracy_reward!r} is not one of the run's rewards "
            f"{names}; set it to one of them, or null for the first.{hint}"
        )


def build_config(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]] = ()) -> RunSpec:
    """Validate a raw run config (plus overrides) into a `RunSpec`; loads no model or dataset.

    Raises:
        ConfigError: unknown key (with the closest name), wrong type, out-of-range value,
            inconsistent batch sizes or loss options (from `GRPOConfig`), unknown reward.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a run config is a mapping (model, task, rewards, training, eval), got {raw!r}."
        )
    raw = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for key, value in overrides:
        apply_override(raw, key, value)
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    run = RunConfig(**_check_section(top, "run"))
    if run.min_free_disk_gb is not None:
        _check_number("min_free_disk_gb", run.min_free_disk_gb, "[0, inf)")
    eval_cfg = EvalConfig(**_check_section(raw.get("eval"), "eval"))
    _check_eval(eval_cfg)
    training_values = {
        **field_defaults(GRPOConfig),
        **_check_section(raw.get("training"), "training"),
    }
    if not isinstance(run.task, dict) or "kind" not in run.task:
        raise ConfigError(
            f"task: {run.task!r} needs a `kind` (reasoning_gym or dataset), e.g. "
            "{kind: reasoning_gym, name: chain_sum}."
        )
    reward_specs = run.rewards if run.rewards is not None else run.task.get("rewards")
    rewards = None if reward_specs is None else resolve_rewards(reward_specs, training_values)
    if rewards is not None:
        check_accuracy_reward(eval_cfg, rewards)
    tools = None if run.tools is None else resolve_tools(run.tools)
    factory = resolve_environment_factory(run.environment_factory, tools or [])
    if run.chat_template is not None:
        load_chat_template(run.chat_template)
    try:  # ranges and consistency (GRPOConfig.__post_init__), after the cheap checks above
        training = GRPOConfig(**training_values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"training: {error}") from error
    return RunSpec(run, training, eval_cfg, training_values, rewards, tools, factory)


def resolve_rewards(specs: Any, training: dict[str, Any]) -> list[Any]:
    """Turn reward specs into named reward functions; check `reward_weights` fits.

    `training` holds the training section's values (`max_completion_length`, `reward_weights`).

    A built-in reward taking `max_completion_len` (soft overlong punishment) gets the training
    `max_completion_length` unless the spec sets it.
    """
    from grpokit.core.advantages import check_reward_weights
    from grpokit.rewards.builtin import REWARD_FUNCTIONS, get_reward_function
    from grpokit.rewards.scoring import CallableReward

    if not isinstance(specs, list) or not specs:
        raise ConfigError(
            f"rewards: give a non-empty list of reward names or mappings, got {specs!r}."
        )
    built = []
    for i, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, dict) else spec
        if not isinstance(name, str):
            raise ConfigError(
                f"rewards[{i}]: {spec!r} is neither a name nor a mapping with `name`."
            )
        if isinstance(spec, dict) and name in REWARD_FUNCTIONS:
            params = inspect.signature(REWARD_FUNCTIONS[name]).parameters
            if "max_completion_len" in params and "max_completion_len" not in spec:
                spec = {**spec, "max_completion_len": training["max_completion_length"]}
        elif name == "soft_overlong_punishment":
            spec = {"name": name, "max_completion_len": training["max_completion_length"]}
        try:
            fn = get_reward_function(spec)
        except (ValueError, TypeError) as error:
            hint = did_you_mean(name, REWARD_FUNCTIONS) if ":" not in name else ""
            raise ConfigError(f"rewards[{i}]: {error}{hint}") from error
        built.append(CallableReward(fn, name=name.rpartition(":")[2]))
    try:
        check_reward_weights(training["reward_weights"], len(built), [r.name for r in built])
    except ValueError as error:
        raise ConfigError(f"training.{error}") from error
    return built


def resolve_tools(specs: Any) -> list[Callable[..., Any]]:
    """The tool functions of a run config's `tools` list, each checked as `GRPOTrainer` checks
    it (a type hint on every argument, a Google-style docstring, no two with one name).

    Raises:
        ConfigError: not a non-empty list, an unknown built-in (with the closest name), a
            `module:function` that does not import, bad parameters, or a tool the model cannot
            be shown (naming the fix).
    """
    from grpokit.tools.builtin import TOOLS, get_tool
    from grpokit.tools.registry import make_tools

    if not isinstance(specs, list) or not specs:
        raise ConfigError(
            f"tools: give a non-empty list of tool names or mappings (or leave it out), got "
            f"{specs!r}."
        )
    functions = []
    for i, spec in enumerate(specs):
        try:
            functions.append(get_tool(spec))
        except ValueError as error:
            name = spec.get("name") if isinstance(spec, dict) else spec
            hint = did_you_mean(name, TOOLS) if isinstance(name, str) and ":" not in name else ""
            raise ConfigError(f"tools[{i}]: {error}{hint}") from error
    make_tools(functions)
    return functions


def resolve_environment_factory(
    spec: str | None, tools: list[Callable[..., Any]]
) -> Callable[[], Any] | None:
    """What a run config's `environment_factory` names, checked by making one environment (it
    needs `reset`; its public methods must be valid tools not named like one of `tools`).

    Raises:
        ConfigError: it does not import, making an environment fails, or the environment is not
            usable (naming the fix).
    """
    if spec is None:
        return None
    from grpokit.rewards.builtin import import_user_callable
    from grpokit.tools.environments import Environments
    from grpokit.tools.registry import make_tools

    if ":" not in spec:
        raise ConfigError(
            f"environment_factory: {spec!r} is written 'module:Class' (a class or function in "
            "a module next to the config, in the current folder or installed)."
        )
    try:
        factory = import_user_callable(spec, what="environment_factory")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    try:
        Environments(factory, make_tools(tools))
    except ConfigError:
        raise
    except Exception as error:  # the user's constructor raised
        raise ConfigError(
            f"environment_factory {spec!r}: making an environment raised "
            f"{type(error).__name__}: {error} (it is called with no arguments; fix it)."
        ) from error
    return factory


def load_chat_template(spec: str) -> str:
    """The text of a run config's `chat_template`: a built-in name or a .jinja file.

    Raises:
        ConfigError: neither a built-in name nor a readable file (the names are listed).
    """
    from grpokit.tools.chat import CHAT_TEMPLATES

    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        hint = did_you_mean(spec, CHAT_TEMPLATES)
        raise ConfigError(
            f"chat_template: {spec!r} is neither a built-in template ({sorted(CHAT_TEMPLATES)}) "
            f"nor a file; give one of those names or the path of a .jinja file.{hint}"
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"chat_template: cannot read {spec!r} ({error}).") from error


def load_config(
    path: str | None, overrides: list[tuple[str, Any]], base: dict[str, Any] | None = None
) -> RunSpec:
    """Read a YAML run config (or start from `base`), apply overrides and validate."""
    raw: Any = dict(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"config file {path!r} not found; give the path of a YAML run config."
            )
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error}).") from error
    return build_config(raw, overrides)


def write_config(spec: RunSpec, path: str | Path) -> Path:
    """Write the config actually used as YAML (loadable by `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = spec.to_yaml_dict()
    if spec.rewards is not None and data["rewards"] is None:
        data["rewards"] = [r.name for r in spec.rewards]
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return path
