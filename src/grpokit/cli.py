"""The `grpokit` command: `train`, `eval` and `demo`, driven by one YAML run config.

A run config has five sections; every key is checked before anything heavy is loaded::

    model: smollm2-135m-instruct          # HF id, local folder, .gguf file or built-in name
    task: {kind: reasoning_gym, name: chain_sum, config: {max_terms: 2}}
    rewards: [reasoning_gym_score, answer_format_reward]   # names, "module:function", or dicts
    training: {learning_rate: 1.0e-5, num_generations: 8, output_dir: runs/x}  # GRPOConfig
    eval: {num_samples: 1, num_prompts: 100}               # held-out evaluation (EvalConfig)

Any field can be overridden on the command line: `--learning_rate 2e-6` (a flat name is looked up
in the run-level fields, then `training`, then `eval`), or dotted: `--training.learning_rate 2e-6`,
`--eval.max_completion_length 64`, `--task.config.max_terms 3`. Values are parsed as YAML.

The config actually used is written to `<output_dir>/config.yaml`; `grpokit train
<output_dir>/config.yaml --resume` continues that run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import logging
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpokit.config import UNSUPPORTED_TRL_FIELDS, GRPOConfig

logger = logging.getLogger("grpokit")

SECTIONS = ("training", "eval")
RUN_ARTIFACTS = ("metrics.jsonl", "completions.jsonl", "eval.jsonl", "curves.png")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field and the fix."""


# =================================================================================================
# The run-level and evaluation schemas (GRPOConfig is the `training` section)
# =================================================================================================
@dataclass
class RunConfig:
    """Run-level fields of a YAML run config (the `training` and `eval` sections are separate)."""

    model: str = "smollm2-135m-instruct"
    """Policy: Hugging Face id, local folder, .gguf file, or built-in smollm2-135m-instruct."""
    task: dict[str, Any] = field(
        default_factory=lambda: {"kind": "reasoning_gym", "name": "chain_sum"}
    )
    """Task spec for grpokit.tasks.load_task: {kind: reasoning_gym | dataset, name/path, ...}."""
    rewards: list[Any] | None = None
    """Rewards: built-in names, "module:function" or {name: ..., params}; None = the task's."""
    lora: dict[str, Any] | None = None
    """LoRA options for peft.LoraConfig (r, lora_alpha, target_modules, ...); None = all weights."""
    plot: bool = True
    """Write curves.png (reward and accuracy over training) into output_dir at the end."""


@dataclass
class EvalConfig:
    """Held-out evaluation: `grpokit eval`, and before/after `grpokit train` (evaluation.py)."""

    num_samples: int = 1
    """Completions per held-out prompt (k of pass@k); 1 = greedy decoding."""
    num_prompts: int | None = None
    """Evaluate on the first this many held-out prompts; None = all of them."""
    max_completion_length: int | None = None
    """New tokens per completion; None = the training max_completion_length."""
    temperature: float = 1.0
    """Sampling temperature when num_samples > 1."""
    batch_size: int = 64
    """Completions per generate call."""
    accuracy_reward: str | None = None
    """Reward whose value decides correctness; None = the first reward function."""
    accuracy_threshold: float = 1.0
    """A completion is correct when the accuracy reward is >= this value."""
    before: bool = True
    """grpokit train: evaluate the model before training (skipped when resuming)."""
    after: bool = True
    """grpokit train: evaluate the trained model after training."""
    seed: int = 0
    """Seed of the evaluation's sampling (independent of training)."""


SCHEMAS: dict[str, type] = {"run": RunConfig, "training": GRPOConfig, "eval": EvalConfig}


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the source (via `ast`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"field_docs needs a class, got {cls!r}.")
    body = node.body
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


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


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


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

    def to_yaml_dict(self) -> dict[str, Any]:
        """The config actually used, in the YAML layout; loading it reproduces this spec."""
        run = dataclasses.asdict(self.run)
        return {
            **run,
            "training": dict(self.training_values),
            "eval": dataclasses.asdict(self.eval),
        }


def _all_fields() -> dict[str, list[str]]:
    return {section: list(field_defaults(cls)) for section, cls in SCHEMAS.items()}


def _suggest(key: str, section: str) -> str:
    """A hint for an unknown key: the closest name in its section, or the section it belongs to."""
    fields_by_section = _all_fields()
    for other, names in fields_by_section.items():
        if other != section and key in names:
            place = "at the top level" if other == "run" else f"under `{other}:`"
            return f" `{key}` belongs {place}."
    close = difflib.get_close_matches(key, fields_by_section[section], n=1)
    if close:
        return f" Did you mean `{close[0]}`?"
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
    close = difflib.get_close_matches(parts[-1], every, n=1)
    hint = f" Did you mean `--{close[0]}`?" if close else ""
    raise ConfigError(f"override --{key}: no such field.{hint} See `grpokit train --help`.")


def _check_section(values: Any, section: str) -> dict[str, Any]:
    """Unknown keys and types of one section; returns the coerced values."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"`{section}` must be a mapping of fields to values, got {values!r}.")
    cls = SCHEMAS[section]
    hints = typing.get_type_hints(cls)
    known = field_defaults(cls)
    out = {}
    for key, value in values.items():
        where = key if section == "run" else f"{section}.{key}"
        if section == "training" and key in UNSUPPORTED_TRL_FIELDS:
            raise ConfigError(
                f"{where}: a TRL option grpokit does not support ({UNSUPPORTED_TRL_FIELDS[key]}); "
                "remove it."
            )
        if key not in known:
            raise ConfigError(f"unknown key `{where}`.{_suggest(str(key), section)}")
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
    if not cfg.temperature > 0:
        raise ConfigError(f"eval.temperature must be > 0, got {cfg.temperature}.")


def build_config(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]] = ()) -> RunSpec:
    """Validate a raw run config (plus overrides) into a `RunSpec`, without loading anything heavy.

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
    try:  # ranges and consistency (GRPOConfig.__post_init__), after the cheap checks above
        training = GRPOConfig(**training_values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"training: {error}") from error
    return RunSpec(run, training, eval_cfg, training_values, rewards)


def resolve_rewards(specs: Any, training: dict[str, Any]) -> list[Any]:
    """Turn reward specs into named reward functions; check `reward_weights` fits.

    `training` holds the training section's values (`max_completion_length`, `reward_weights`).

    A built-in reward taking `max_completion_len` (soft overlong punishment) gets the training
    `max_completion_length` unless the spec sets it.
    """
    from grpokit.reward_funcs import REWARD_FUNCTIONS, get_reward_function
    from grpokit.rewards import CallableReward

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
            close = difflib.get_close_matches(name, list(REWARD_FUNCTIONS), n=1)
            hint = f" Did you mean `{close[0]}`?" if close and ":" not in name else ""
            raise ConfigError(f"rewards[{i}]: {error}{hint}") from error
        built.append(CallableReward(fn, name=name.rpartition(":")[2]))
    weights = training["reward_weights"]
    if weights is not None and len(weights) != len(built):
        raise ConfigError(
            f"training.reward_weights has {len(weights)} entries but there are {len(built)} "
            f"rewards ({[r.name for r in built]}); give one weight per reward."
        )
    return built


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


# =================================================================================================
# Commands
# =================================================================================================
def _load_everything(spec: RunSpec) -> tuple[Any, Any, Any, list[Any]]:
    """Task, rewards (task defaults if none were given), model and tokenizer, in that order."""
    from grpokit.models import load_causal_lm
    from grpokit.tasks import load_task

    try:
        task = load_task(dict(spec.run.task))
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise ConfigError(f"task: {error}") from error
    if spec.rewards is None:
        spec.rewards = resolve_rewards(task.default_rewards, spec.training_values)
    model, tokenizer = load_causal_lm(spec.run.model)
    return task, model, tokenizer, spec.rewards


def _use_bf16(spec: RunSpec) -> bool:
    import torch

    from grpokit.models import bf16_supported

    use = spec.training.bf16 and bf16_supported() and not torch.cuda.is_available()
    logger.info(
        "precision: float32 weights, gradients and optimizer state; compute in %s",
        "bf16 autocast (native bf16 on this CPU)" if use else "float32",
    )
    return use


def run_eval(
    spec: RunSpec, model: Any, tokenizer: Any, task: Any, rewards: list[Any]
) -> dict[str, float]:
    """Evaluate `model` on the task's held-out split with the `eval` section's settings."""
    from grpokit.evaluation import evaluate
    from grpokit.generation import SamplingParams

    if task.eval_dataset is None or len(task.eval_dataset) == 0:
        raise ConfigError("task: has no held-out split to evaluate on; set task.eval_size > 0.")
    cfg = spec.eval
    data = task.eval_dataset
    if cfg.num_prompts is not None:
        data = data.select(range(min(cfg.num_prompts, len(data))))
    return evaluate(
        model,
        tokenizer,
        data,
        rewards,
        num_samples=cfg.num_samples,
        max_completion_length=cfg.max_completion_length or spec.training.max_completion_length,
        sampling=None if cfg.num_samples == 1 else SamplingParams(temperature=cfg.temperature),
        batch_size=cfg.batch_size,
        accuracy_reward=cfg.accuracy_reward,
        accuracy_threshold=cfg.accuracy_threshold,
        reward_weights=spec.training.reward_weights,
        chat_template_kwargs=spec.training.chat_template_kwargs,
        seed=cfg.seed,
        bf16=_use_bf16(spec),
    )


def _log_eval(output_dir: Path, when: str, step: int, metrics: dict[str, float]) -> None:
    with (output_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"when": when, "step": step, **metrics}) + "\n")
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "reward", "completion_length"))
    print(f"[grpokit] held-out eval {when} (step {step}): {shown}", flush=True)


def _prepare_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> None:
    existing = sorted(output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"training.output_dir {str(output_dir)!r} already holds a run ({existing[-1].name}); "
            "pass --resume to continue it, --overwrite to start again, or set another "
            "--output_dir."
        )
    if overwrite and not resume:
        for path in existing:
            shutil.rmtree(path)
        for name in RUN_ARTIFACTS:
            (output_dir / name).unlink(missing_ok=True)


def run_training(
    spec: RunSpec, *, resume: bool | str = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train as the spec says: eval before, GRPO, save the model, eval after, plot.

    Returns:
        `{"before": metrics | None, "after": metrics | None, "model_dir": str, "plot": str | None}`.
    """
    output_dir = Path(spec.training.output_dir)
    _prepare_output_dir(output_dir, resume, overwrite)
    task, model, tokenizer, rewards = _load_everything(spec)
    write_config(spec, output_dir / "config.yaml")
    print(f"[grpokit] run config written to {output_dir / 'config.yaml'}", flush=True)

    from grpokit.trainer import GRPOTrainer

    peft_config = None
    if spec.run.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec.run.lora)
    result: dict[str, Any] = {"before": None, "after": None, "plot": None}
    if spec.eval.before and not resume:
        result["before"] = run_eval(spec, model, tokenizer, task, rewards)
        _log_eval(output_dir, "before", 0, result["before"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=spec.training,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    state = trainer.train(resume_from_checkpoint=resume or None)
    result["model_dir"] = str(output_dir / "final_model")
    trainer.save_model(result["model_dir"])
    print(f"[grpokit] trained model saved to {result['model_dir']}", flush=True)
    if spec.eval.after:
        result["after"] = run_eval(spec, trainer.model, tokenizer, task, rewards)
        _log_eval(output_dir, "after", state.global_step, result["after"])
    if spec.run.plot:
        from grpokit.plotting import plot_run

        accuracy_name = spec.eval.accuracy_reward or rewards[0].name
        result["plot"] = str(plot_run(output_dir, accuracy_reward=accuracy_name))
        print(f"[grpokit] curves written to {result['plot']}", flush=True)
    return result


# =================================================================================================
# Help and entry point
# =================================================================================================
def fields_help(defaults: dict[str, Any] | None = None) -> str:
    """Every field of every section with its default and one line of meaning."""
    defaults = defaults or {}
    lines = []
    for section, cls in SCHEMAS.items():
        docs = field_docs(cls)
        values = {**field_defaults(cls)}
        given = defaults if section == "run" else defaults.get(section) or {}
        values.update({k: v for k, v in given.items() if k in values})
        title = "run-level fields (top of the YAML)" if section == "run" else f"{section} fields"
        lines.append(f"\n{title}:")
        for name, value in values.items():
            prefix = "" if section == "run" else f"{section}."
            shown = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"  --{prefix}{name} (default: {shown})")
            lines.append(f"      {_first_sentence(docs.get(name, ''))}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="grpokit", description="GRPO fine-tuning.", formatter_class=fmt, allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = (
        "\noverrides: --field value (flat names: run-level, then training, then eval) or "
        "--section.field value; values are YAML."
    )
    train = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train from a YAML run config",
        formatter_class=fmt,
        description=__doc__,
        epilog=overrides + fields_help(),
    )
    train.add_argument("config", help="YAML run config (e.g. examples/grpo.yaml)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="discard an earlier run in output_dir"
    )
    ev = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a model on a task's held-out split",
        formatter_class=fmt,
        description="Score a model (base or trained: --model DIR) on the task's held-out split.",
        epilog=overrides + fields_help(),
    )
    ev.add_argument(
        "config",
        nargs="?",
        help="YAML run config (default: the built-in demo config); give it before any override",
    )
    ev.add_argument("--output", help="also write the metrics as JSON to this file")
    from grpokit.demo import DEMO_CONFIG, DEMO_DESCRIPTION

    sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="GRPO on SmolLM2-135M-Instruct in about three to four minutes on 2 CPU cores",
        formatter_class=fmt,
        description=DEMO_DESCRIPTION,
        epilog=overrides + fields_help(DEMO_CONFIG),
    )
    return parser


_NO_CONFIG = "\0no-config"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `grpokit` command."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        # No config file: stop argparse from taking an override's value for the positional.
        argv.insert(1, _NO_CONFIG)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config", None) == _NO_CONFIG:
        args.config = None
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        overrides = parse_overrides(rest)
        if args.command == "train":
            spec = load_config(args.config, overrides)
            run_training(spec, resume=args.resume, overwrite=args.overwrite)
        elif args.command == "demo":
            from grpokit.demo import run_demo

            run_demo(overrides)
        else:
            from grpokit.demo import DEMO_CONFIG

            spec = load_config(args.config, overrides, base=None if args.config else DEMO_CONFIG)
            task, model, tokenizer, rewards = _load_everything(spec)
            metrics = run_eval(spec, model, tokenizer, task, rewards)
            print(json.dumps(metrics, indent=2))
            if args.output:
                Path(args.output).write_text(json.dumps(metrics, indent=2))
    except ConfigError as error:
        print(f"grpokit: error: {error}", file=sys.stderr)
        return 2
    return 0
