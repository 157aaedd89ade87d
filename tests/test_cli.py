"""`grpokit train / eval / demo` end to end on a tiny model, and every config error."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from grpokit.app import cli, run_config
from grpokit.app.cli import main
from grpokit.app.demo import demo_config
from grpokit.app.run_config import ConfigError, build_config, field_help
from grpokit.train.checkpoint import verify_checkpoint
from grpokit.train.config import GRPOConfig
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _write_data(path: Path) -> Path:
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _config(tmp_path: Path, model: str, **training: Any) -> dict[str, Any]:
    return {
        "model": model,
        "task": {
            "kind": "dataset",
            "path": str(_write_data(tmp_path / "data.jsonl")),
            "columns": {"question": "prompt", "answer": "answer"},
            "format": "plain",
            "eval_fraction": 0.25,
        },
        "rewards": ["accuracy_reward", "answer_format_reward"],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "num_generations": 2,
            "per_device_train_batch_size": 4,
            "max_completion_length": 6,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 1,
            **training,
        },
        "eval": {"num_prompts": 3, "num_samples": 2, "batch_size": 8},
    }


def _write_yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_resume_eval_end_to_end(tmp_path: Path, tiny_model: str, capsys) -> None:
    config = _write_yaml(tmp_path / "run.yaml", _config(tmp_path, tiny_model))
    assert main(["train", config, "--learning_rate", "2e-6"]) == 0
    run = tmp_path / "run"

    # The config actually used (with the override) is written and loads back to the same spec.
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["training"]["learning_rate"] == 2e-6
    assert written["rewards"] == ["accuracy_reward", "answer_format_reward"]
    again = run_config.load_config(str(run / "config.yaml"), [])
    assert again.training.to_dict() == build_config(written).training.to_dict()

    assert _steps(run) == [1, 2]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(e["when"], e["step"]) for e in evals] == [("before", 0), ("after", 2)]
    assert {"accuracy", "pass@1", "pass@2", "reward", "completion_length"} <= set(evals[0])
    assert (run / "checkpoint-2").is_dir()
    assert (run / "final_model" / "config.json").is_file()
    # written whole or not at all: sealed with a manifest, as a checkpoint is
    assert verify_checkpoint(run / "final_model")["step"] == 2
    assert (run / "curves.png").stat().st_size > 1000

    # Starting the same run again without a flag is refused; --resume continues it. A longer
    # max_steps changes the learning-rate schedule: refused (config.yaml untouched) unless
    # applied explicitly; --resume also takes a checkpoint directory.
    assert main(["train", str(run / "config.yaml")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(run / "config.yaml"), "--resume", "--max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "max_steps: 2 -> 4" in err and "--apply_config_changes" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_steps"] == 2
    resume = ["--resume", str(run / "checkpoint-2"), "--apply_config_changes", "--max_steps", "4"]
    assert main(["train", str(run / "config.yaml"), *resume]) == 0
    assert _steps(run) == [1, 2, 3, 4]
    assert (run / "checkpoint-4").is_dir()
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["when"] for e in evals] == ["before", "after", "after"]  # no "before" on resume
    written = yaml.safe_load((run / "config.yaml").read_text())["training"]
    assert written["max_steps"] == 4 and written["resume_config_changes"] == "refuse"

    # eval: the trained model on the held-out split, metrics to stdout and a file.
    out = tmp_path / "metrics.json"
    capsys.readouterr()
    code = main(
        [
            "eval",
            str(run / "config.yaml"),
            "--model",
            str(run / "final_model"),
            "--output",
            str(out),
            "--eval.num_samples",
            "1",
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_prompts"] == 3 and metrics["num_samples"] == 1
    assert json.loads(capsys.readouterr().out) == metrics

    # --overwrite starts again from scratch, naming each checkpoint it deletes and its state.
    (run / "checkpoint-4" / "trainer_state.json").write_text("")
    capsys.readouterr()
    assert main(["train", str(run / "config.yaml"), "--overwrite", "--max_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"deleting {run / 'checkpoint-3'} (a valid checkpoint of step 3)" in out
    assert f"deleting {run / 'checkpoint-4'} (not a valid checkpoint: torn file" in out
    assert _steps(run) == [1]
    assert not (run / "checkpoint-4").exists()


def test_resume_errors_are_one_line_before_training(
    tmp_path: Path, tiny_model: str, capsys
) -> None:
    config = _write_yaml(tmp_path / "run.yaml", _config(tmp_path, tiny_model, max_steps=1))
    assert main(["train", config, "--resume"]) == 2  # nothing to resume
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["train", config]) == 0
    checkpoint = tmp_path / "run" / "checkpoint-1"
    (checkpoint / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["train", config, "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("grpokit: error:")]
    assert len(errors) == 1 and "missing manifest.json" in errors[0]
    assert "Traceback" not in err
    assert main(["train", config, "--resume"]) == 2
    assert "no checkpoint verifies (checkpoint-1: missing manifest.json" in capsys.readouterr().err


# ---- overrides and help ------------------------------------------------------------------------
def test_overrides_flat_dotted_and_nested(tmp_path: Path) -> None:
    raw = _config(tmp_path, "some/model")
    overrides = run_config.parse_overrides(
        [
            "--learning_rate",
            "2e-6",
            "--eval.max_completion_length=5",
            "--task.seed",
            "3",
            "--bf16",
            "--max-steps",
            "7",
            "--model",
            "other/model",
            "--temperature",
            "0.7",
        ]
    )
    spec = build_config(raw, overrides)
    assert spec.training.learning_rate == 2e-6  # YAML reads "2e-6" as a string: coerced
    assert spec.training.max_steps == 7
    assert spec.training.bf16 is True
    assert spec.training.temperature == 0.7  # flat names go to training before eval
    assert spec.eval.max_completion_length == 5
    assert spec.run.task["seed"] == 3
    assert spec.run.model == "other/model"
    assert [r.name for r in spec.rewards or []] == ["accuracy_reward", "answer_format_reward"]


def test_every_field_of_every_schema_has_help_in_its_metadata() -> None:
    for cls in run_config.SCHEMAS.values():
        fields = dataclasses.fields(cls)
        assert fields
        for f in fields:
            assert isinstance(f.metadata.get("help"), str), (cls.__name__, f.name)
            assert f.metadata["help"].strip(), (cls.__name__, f.name)
        assert field_help(cls) == {f.name: f.metadata["help"] for f in fields}
    assert field_help(GRPOConfig)["learning_rate"] == "Peak learning rate of the optimizer."
    # A mutable default is copied per instance, not shared.
    a, b = run_config.RunConfig(), run_config.RunConfig()
    a.task["name"] = "other"
    assert b.task["name"] == "chain_sum"


def _help_blocks(text: str) -> dict[str, str]:
    """`--<name> (default: ...)` -> the help lines under it, joined with single spaces."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  --") and " (default: " in line:
            current = blocks.setdefault(line.split()[0][2:], [])
        elif line.startswith(" " * 6) and current is not None:
            current.append(line.strip())
        else:
            current = None
    return {name: " ".join(lines) for name, lines in blocks.items()}


def test_train_help_shows_each_fields_metadata_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = _help_blocks(capsys.readouterr().out)
    for section, cls in run_config.SCHEMAS.items():
        prefix = "" if section == "run" else f"{section}."
        for f in dataclasses.fields(cls):
            assert shown[prefix + f.name] == " ".join(f.metadata["help"].split()), f.name


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_help_lists_every_field_with_default_and_meaning(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section, cls in run_config.SCHEMAS.items():
        prefix = "" if section == "run" else f"{section}."
        for name in run_config.field_defaults(cls):
            assert f"--{prefix}{name} (default: " in text, name
    assert "--training.learning_rate (default: " in text
    assert "Peak learning rate of the optimizer." in text
    if command == "demo":
        assert "--training.max_steps (default: " in text
        assert "smollm2-135m-instruct" in text


# ---- every config error: named field, fix, fast -----------------------------------------------
ERRORS = [
    ({"learning_rate": 1e-5}, "`learning_rate` belongs under `training:`"),
    ({"modle": "x"}, "Did you mean `model`"),
    ({"training": {"learning_rat": 1e-5}}, "`training.learning_rat`. Did you mean `learning_rate`"),
    ({"training": {"num_generation": 4}}, "Did you mean `num_generations`"),
    ({"eval": {"num_sample": 4}}, "Did you mean `num_samples`"),
    ({"training": {"max_steps": "ten"}}, "training.max_steps: expected an integer, got 'ten'"),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate: expected a number"),
    ({"training": {"bf16": "yes please"}}, "training.bf16: expected true/false"),
    ({"training": {"reward_weights": ["a", 1]}}, "training.reward_weights[0]: expected a number"),
    ({"eval": {"num_samples": 0}}, "eval.num_samples must be >= 1"),
    ({"training": {"learning_rate": -1.0}}, "learning_rate must be a finite number >= 0"),
    (
        {"training": {"learning_rate": float("inf")}},
        "training: learning_rate must be a finite number >= 0, got inf.",
    ),
    (
        {"training": {"max_grad_norm": float("nan")}},
        "training: max_grad_norm must be a finite number >= 0 or None, got nan.",
    ),
    ({"training": {"adam_beta1": 1.5}}, "training: adam_beta1 must be in [0, 1), got 1.5."),
    ({"training": {"adam_epsilon": -1}}, "training: adam_epsilon must be a finite number > 0"),
    ({"eval": {"temperature": float("inf")}}, "eval.temperature must be a finite number > 0"),
    ({"eval": {"accuracy_threshold": float("nan")}}, "eval.accuracy_threshold must be a finite"),
    ({"min_free_disk_gb": -1}, "min_free_disk_gb must be a finite number >= 0, got -1.0."),
    (
        {"eval": {"accuracy_reward": "acuracy_reward"}},
        "eval.accuracy_reward 'acuracy_reward' is not one of the run's rewards "
        "['accuracy_reward', 'answer_format_reward']; set it to one of them, or null for the "
        "first. Did you mean `accuracy_reward`?",
    ),
    (
        {"training": {"save_strategy": True}},
        "training.save_strategy: got true but the field takes one of 'no', 'steps', 'epoch', "
        "'best'; YAML reads",
    ),
    (
        {"training": {"lr_scheduler_type": False}},
        "training.lr_scheduler_type: got false but the field takes a string; YAML reads an "
        'unquoted yes/no/on/off/true/false as true/false, so quote the value (e.g. "off").',
    ),
    ({"training": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    ({"training": {"per_device_train_batch_size": 3}}, "must be divisible by num_generations"),
    (
        {"training": {"loss_type": "vespo", "importance_sampling_level": "sequence"}},
        "importance_sampling_level='token'",
    ),
    ({"training": {"loss_type": "ppo"}}, "loss_type must be one of"),
    (
        {"training": {"vllm_mode": "server", "vllm_server_port": 70000}},
        "training: vllm_server_port must be a port number in [1, 65535]",
    ),
    ({"rewards": ["acuracy_reward"]}, "rewards[0]: Unknown reward function 'acuracy_reward'"),
    ({"rewards": ["no_such_module_xyz:fn"]}, "rewards[0]: reward 'no_such_module_xyz:fn'"),
    ({"training": {"reward_weights": [1.0]}}, "reward_weights has 1 entries but there are 2"),
    ({"task": {"name": "chain_sum"}}, "task: {'name': 'chain_sum'} needs a `kind`"),
]


@pytest.mark.parametrize(("change", "message"), ERRORS)
def test_config_errors_name_the_field_and_fix(tmp_path: Path, change, message) -> None:
    raw = _config(tmp_path, "some/model")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "task":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        build_config(raw)
    assert time.perf_counter() - start < 1.0
    assert message in str(error.value)


def test_suggestion_for_misspelt_reward(tmp_path: Path) -> None:
    raw = {**_config(tmp_path, "m"), "rewards": ["acuracy_reward"]}
    with pytest.raises(ConfigError, match="Did you mean `accuracy_reward`"):
        build_config(raw)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learnin_rate", "1"], "--learnin_rate: no such field. Did you mean `--learning_rate`"),
        (["--training.max_steps", "x"], "training.max_steps: expected an integer"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_cli_errors_exit_2_before_loading_anything(
    tmp_path: Path, argv, message, capsys, monkeypatch
) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr("grpokit.engines.models.load_causal_lm", fail)
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, "some/model"))
    assert main(["train", config, *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_and_bad_yaml(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_unknown_task_key_is_reported_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(
        "grpokit.engines.models.load_causal_lm",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError),
    )
    raw = _config(tmp_path, "some/model")
    raw["task"]["colums"] = {}
    assert main(["train", _write_yaml(tmp_path / "c.yaml", raw)]) == 2
    assert "task: unknown key(s) ['colums']" in capsys.readouterr().err


# ---- the example configs -----------------------------------------------------------------------
EXAMPLES = sorted(Path(__file__).resolve().parent.parent.glob("examples/*.yaml"))


def test_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"grpo", "dapo", "dr_grpo", "gspo"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate(path: Path) -> None:
    spec = run_config.load_config(str(path), [])
    assert spec.rewards is not None
    assert "arxiv.org" in path.read_text()  # each example cites its paper


# The tool examples run end to end in test_tool_runs.py (they need a tool template and room).
RECIPES = [p for p in EXAMPLES if "tools" not in yaml.safe_load(p.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_examples_train_one_step_on_a_tiny_model(
    path: Path, tmp_path: Path, tiny_model: str
) -> None:
    """Each recipe runs end to end through `grpokit train` (tiny model and sizes)."""
    argv = ["train", str(path), "--model", tiny_model, "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "4",
            "--max_completion_length", "16", "--task.size", "16", "--task.eval_size", "2",
            "--eval.batch_size", "4", "--eval.after", "false", "--plot", "false"]  # fmt: skip
    assert main(argv) == 0
    assert _steps(tmp_path / "run") == [1]
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_model(tmp_path: Path, tiny_model: str, capsys) -> None:
    """`grpokit demo` with its own config (model and sizes shrunk): before/after, model, plot."""
    run = tmp_path / "demo"
    argv = ["demo", "--model", tiny_model, "--output_dir", str(run), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "4", "--task.size", "16", "--task.eval_size", "4",
            "--eval.num_prompts", "4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (4 prompts, greedy): before " in out
    # Without native bf16 the demo trains a LoRA adapter (demo.FP32_SETTINGS) and saves it.
    lora = "lora" in demo_config()[0]
    saved = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (run / "final_model" / saved).is_file()
    assert (run / "curves.png").is_file()
    assert main(argv) == 0  # a second demo replaces the first
    assert _steps(run) == [1, 2]


def test_demo_config_is_valid() -> None:
    from grpokit.app.demo import DEMO_CONFIG

    spec = build_config(DEMO_CONFIG)
    assert spec.run.model == "smollm2-135m-instruct"
    assert spec.training.max_steps > 0


def test_plot_run_from_metrics_and_eval_files(tmp_path: Path) -> None:
    from grpokit.app.plotting import moving_average, plot_run

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    metrics = [{"step": s, "reward": s / 10, "rewards/acc/mean": s / 20} for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
    evals = [
        {"step": 0, "accuracy": 0.1, "reward": 0.1},
        {"step": 7, "accuracy": 0.4, "reward": 0.4},
    ]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(e) for e in evals))
    path = plot_run(tmp_path, accuracy_reward="acc")
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_without_config_uses_the_demo_config(monkeypatch, capsys) -> None:
    seen: dict[str, Any] = {}

    def fake_load(spec: Any) -> Any:
        seen["model"] = spec.run.model
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "_load_everything", fake_load)
    assert main(["eval", "--model", "my/model", "--eval.num_prompts", "3"]) == 2
    assert seen["model"] == "my/model"
    assert "stop here" in capsys.readouterr().err


# ---- the generation engine of evaluation --------------------------------------------------------
class FakeVLLM:
    """Stands in for `VLLMEngine` (vLLM is not installed here): samples with a
    `TransformersEngine`, and records how it was built and used."""

    built: ClassVar[list[FakeVLLM]] = []  # every instance, in order (reset per test)

    def __init__(self, model: Any, tokenizer: Any, **kwargs: Any) -> None:
        from grpokit.engines.transformers_engine import TransformersEngine

        self.inner = TransformersEngine(model, tokenizer)
        self.kwargs = kwargs
        self.completions = 0  # completions generated
        self.updates = 0  # update_weights calls
        FakeVLLM.built.append(self)

    def generate(self, prompt_ids: list[list[int]], **kwargs: Any) -> Any:
        self.completions += len(prompt_ids) * kwargs["num_generations"]
        return self.inner.generate(prompt_ids, **kwargs)

    def update_weights(self, model: Any) -> None:
        self.updates += 1
        self.inner.update_weights(model)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeVLLM]:
    """`VLLMEngine` replaced by `FakeVLLM`, and the config's check that vLLM is installed told
    that it is."""
    import importlib.machinery
    import importlib.util

    from grpokit.engines import vllm_engine

    find_spec = importlib.util.find_spec

    def vllm_found(name: str, *args: Any) -> Any:
        return (
            importlib.machinery.ModuleSpec(name, None) if name == "vllm" else find_spec(name, *args)
        )

    monkeypatch.setattr(importlib.util, "find_spec", vllm_found)
    monkeypatch.setattr(vllm_engine, "VLLMEngine", FakeVLLM)
    monkeypatch.setattr(FakeVLLM, "built", [])
    return FakeVLLM


def test_eval_with_use_vllm_samples_with_the_vllm_engine(
    tmp_path: Path, tiny_model: str, fake_vllm: type[FakeVLLM], capsys
) -> None:
    raw = _config(tmp_path, tiny_model, use_vllm=True, max_prompt_length=32)
    config = _write_yaml(tmp_path / "run.yaml", raw)
    assert main(["eval", config, "--eval.max_completion_length", "5"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    [engine] = fake_vllm.built
    # vLLM holds the longest prompt plus the evaluation's completions: 32 + 5 tokens
    assert engine.kwargs["max_model_len"] == 37
    # every completion scored came from it: 3 prompts x 2 samples
    assert metrics["num_prompts"] == 3 and metrics["num_samples"] == 2
    assert engine.completions == 6
    assert metrics["completion_length"] <= 5


@pytest.mark.slow
def test_train_with_use_vllm_evaluates_with_the_trainers_engine(
    tmp_path: Path, tiny_model: str, fake_vllm: type[FakeVLLM]
) -> None:
    raw = _config(tmp_path, tiny_model, use_vllm=True, max_prompt_length=32, max_steps=1)
    raw["eval"]["num_samples"] = 1
    config = _write_yaml(tmp_path / "run.yaml", raw)
    assert main(["train", config, "--plot", "false"]) == 0
    # One engine for the whole run: 3 held-out prompts x 1 sample before and after training, and
    # 4 training completions in between; its weights were synced after the one optimizer step.
    [engine] = fake_vllm.built
    assert engine.completions == 3 + 4 + 3
    assert engine.updates == 1
    evals = [
        json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()
    ]
    assert [(e["when"], e["num_prompts"]) for e in evals] == [("before", 3), ("after", 3)]


# ---- user errors: one line, exit code 2, no traceback (--debug shows it) -----------------------
def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr("grpokit.engines.models.load_causal_lm", fail)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `grpokit: error:` line on stderr (there must be exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("grpokit: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0].removeprefix("grpokit: error: ")


def test_yaml_non_finite_value_is_one_line_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _no_model(monkeypatch)
    text = yaml.safe_dump(_config(tmp_path, "some/model")).replace(
        "learning_rate: 0.001", "learning_rate: .inf"
    )
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert _error_line(capsys) == "training: learning_rate must be a finite number >= 0, got inf."
    assert main(["train", str(tmp_path / "c.yaml"), "--learning_rate", "1e-3", "--adam_beta2", "1"])
    assert _error_line(capsys) == "training: adam_beta2 must be in [0, 1), got 1.0."


def test_yaml_no_and_off_read_as_the_string_for_strategy_fields(tmp_path: Path) -> None:
    text = yaml.safe_dump(_config(tmp_path, "m")).replace(
        "save_steps: 1", "save_steps: 1\n  save_strategy: no\n  eval_strategy: off"
    )
    assert "save_strategy: no\n" in text
    (tmp_path / "c.yaml").write_text(text)
    spec = run_config.load_config(str(tmp_path / "c.yaml"), [])
    assert (spec.training.save_strategy, spec.training.eval_strategy) == ("no", "no")
    # The same through an override, and the written config keeps the string.
    overrides = run_config.parse_overrides(["--save_strategy", "no", "--eval_strategy=off"])
    assert overrides == [("save_strategy", False), ("eval_strategy", False)]
    spec = run_config.load_config(str(tmp_path / "c.yaml"), overrides)
    assert spec.training.save_strategy == "no"
    written = run_config.write_config(spec, tmp_path / "out.yaml")
    assert run_config.load_config(str(written), []).training_values["save_strategy"] == "no"
    # A bool is still fine where the field takes one (scale_rewards: false = "none").
    spec = run_config.load_config(str(tmp_path / "c.yaml"), [("scale_rewards", False)])
    assert spec.training.scale_rewards == "none"


def _reward_config(tmp_path: Path, folder: Path, rewards: list[str]) -> str:
    folder.mkdir(exist_ok=True)
    raw = {**_config(tmp_path, "some/model"), "rewards": rewards}
    raw["eval"] = {**raw["eval"], "accuracy_reward": None}
    return _write_yaml(folder / "run.yaml", raw)


def test_reward_module_that_fails_to_import_is_one_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _no_model(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "cfg"
    config = _reward_config(tmp_path, folder, ["broken_rewards_ue:reward"])
    module = folder / "broken_rewards_ue.py"
    module.write_text(
        "def reward(completions, **kw):\n    return [0.0] * len(completions)\n1 / 0\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", config]) == 2
    assert _error_line(capsys) == (
        "rewards[0]: reward 'broken_rewards_ue:reward': importing module 'broken_rewards_ue' "
        f"failed: ZeroDivisionError: division by zero at {module}:3 (fix the module)."
    )
    # --debug (before or after the command) also prints the traceback, then the same line.
    for argv in (["train", config, "--debug"], ["--debug", "train", config]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "1 / 0" in err
        assert err.rstrip().splitlines()[-1].startswith("grpokit: error: rewards[0]: reward ")


def test_reward_modules_next_to_the_config_and_in_the_cwd_import(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder, cwd = tmp_path / "cfg", tmp_path / "cwd"
    config = _reward_config(
        tmp_path, folder, ["rewards_by_config_ue:reward", "rewards_in_cwd_ue:reward"]
    )
    cwd.mkdir()
    source = "def reward(completions, **kw):\n    return [1.0] * len(completions)\n"
    (folder / "rewards_by_config_ue.py").write_text(source)
    (cwd / "rewards_in_cwd_ue.py").write_text(source)
    monkeypatch.chdir(cwd)
    # Without the command's import path, neither folder is searched.
    with pytest.raises(ConfigError, match="no module 'rewards_by_config_ue' on the import path"):
        run_config.load_config(config, [])

    def stop(spec: str, **kwargs: Any) -> Any:
        raise ConfigError(f"stop before loading {spec}")

    monkeypatch.setattr("grpokit.engines.models.load_causal_lm", stop)
    assert main(["train", config]) == 2  # both rewards imported; it got as far as the model
    assert _error_line(capsys) == "stop before loading some/model"
    assert sys.path[:2] == [str(cwd), str(folder)]


def test_bad_lora_key_fails_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_model(monkeypatch)
    raw = {**_config(tmp_path, "some/model"), "lora": {"r": 4, "lora_alpah": 8}}
    assert main(["train", _write_yaml(tmp_path / "c.yaml", raw)]) == 2
    assert _error_line(capsys).startswith(
        "lora: unknown key `lora_alpah` (did you mean `lora_alpha`? the keys are "
        "peft.LoraConfig's fields"
    )
    raw["lora"] = {"r": 4, "task_type": "SEQ_CLS"}
    assert main(["train", _write_yaml(tmp_path / "c.yaml", raw)]) == 2
    assert _error_line(capsys) == "lora.task_type must be CAUSAL_LM (or left out), got 'SEQ_CLS'."


def test_misspelt_lora_target_module_fails_before_training(
    tmp_path: Path, tiny_model: str, capsys
) -> None:
    raw = {**_config(tmp_path, tiny_model), "lora": {"r": 2, "target_modules": ["q_proj", "v_prj"]}}
    assert main(["train", _write_yaml(tmp_path / "c.yaml", raw)]) == 2
    assert _error_line(capsys) == (
        "lora.target_modules: ['v_prj'] match no module of LlamaForCausalLM; its linear layers "
        "are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
        "'up_proj', 'v_proj']."
    )
    assert not any((tmp_path / "run").iterdir())  # no config, eval or metrics written


def test_unknown_accuracy_reward_fails_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _no_model(monkeypatch)
    raw = _config(tmp_path, "some/model")
    del raw["rewards"]  # the task's default rewards, known once the task is loaded
    raw["eval"] = {**raw["eval"], "accuracy_reward": "correctness"}
    assert run_config.build_config(raw).rewards is None
    assert main(["train", _write_yaml(tmp_path / "c.yaml", raw)]) == 2
    assert _error_line(capsys).startswith(
        "eval.accuracy_reward 'correctness' is not one of the run's rewards "
        "['accuracy_reward', 'answer_format_reward']"
    )


def test_resume_without_a_checkpoint_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_model(monkeypatch)
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, "some/model"))
    assert main(["train", config, "--resume"]) == 2
    assert _error_line(capsys) == (
        f"--resume: training.output_dir '{tmp_path / 'run'}' holds no checkpoint to resume; "
        "start without --resume, or set --output_dir to the run to continue."
    )


def test_output_dir_writable_and_free_disk_checked_up_front(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import errno
    import shutil

    _no_model(monkeypatch)
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, "some/model"))
    (tmp_path / "a_file").write_text("")
    assert main(["train", config, "--output_dir", str(tmp_path / "a_file" / "run")]) == 2
    assert _error_line(capsys) == (
        f"training.output_dir '{tmp_path / 'a_file' / 'run'}' cannot be written (Not a "
        "directory); make it writable or set another --output_dir."
    )

    def read_only(self: Path, data: bytes) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", read_only)
        assert main(["train", config]) == 2
    assert "cannot be written (Read-only file system)" in _error_line(capsys)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(0.25e9)))
    assert main(["train", config, "--min_free_disk_gb", "1"]) == 2
    assert _error_line(capsys) == (
        f"training.output_dir '{tmp_path / 'run'}': 0.25 GB free on its disk, below "
        "min_free_disk_gb=1; free some space, set another --output_dir, or lower "
        "--min_free_disk_gb."
    )
    # Under a lower minimum, or none set (the default: room for what the run writes, known
    # once the model is loaded), the checks pass and the run goes on to load the model.
    for more in (["--min_free_disk_gb", "0.2"], []):
        with pytest.raises(AssertionError, match="the model must not be loaded"):
            main(["train", config, *more])
    assert not list((tmp_path / "run").iterdir())  # the probe file is gone


def test_the_default_free_disk_check_is_the_room_the_run_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil
    import types

    import torch

    from grpokit.app.run import check_space_for_the_run
    from grpokit.errors import OutputError

    # 1,001,000 weights, all trained: the final model 4 bytes each (4.004 MB); a checkpoint
    # also holds AdamW's two moments, 8 bytes each (12.012 MB in all): 16.016 MB for both.
    trainer = types.SimpleNamespace(
        model=torch.nn.Linear(1000, 1000),
        is_peft=False,
        args=types.SimpleNamespace(sync_ref_model=False, save_strategy="steps"),
    )
    usage = shutil.disk_usage(tmp_path)

    def free(num_bytes: int) -> None:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=num_bytes))

    free(16_016_000)  # a low-disk machine still fits a tiny run: no error, no warning
    check_space_for_the_run(trainer, tmp_path, None)
    free(16_015_999)
    with pytest.raises(
        OutputError,
        match=r"16.0 MB free, but a checkpoint .* about 12.0 MB \(1 on disk at once .*\) and "
        r"the final model 4.0",
    ):
        check_space_for_the_run(trainer, tmp_path, None)
    # A minimum the user set was checked before the model loaded: here only a warning.
    with caplog.at_level("WARNING", logger="grpokit"):
        check_space_for_the_run(trainer, tmp_path, 0.0)
    assert "the run may stop when it saves" in caplog.text
    # Without checkpoints the final model alone must fit.
    trainer.args.save_strategy = "no"
    free(4_004_000)
    check_space_for_the_run(trainer, tmp_path, None)
    free(4_003_999)
    with pytest.raises(OutputError, match="--min_free_disk_gb 0 to start anyway"):
        check_space_for_the_run(trainer, tmp_path, None)
    # 50 steps saved every 10: five checkpoints stay (4.004 + 5 * 12.012 MB); a limit of 1
    # keeps two at once (the new one is written before the old one goes).
    trainer.args = types.SimpleNamespace(
        sync_ref_model=False, save_strategy="steps", max_steps=50, save_steps=10
    )
    free(64_064_000)
    check_space_for_the_run(trainer, tmp_path, None)
    free(64_063_999)
    with pytest.raises(OutputError, match=r"\(5 on disk at once .*--save_total_limit"):
        check_space_for_the_run(trainer, tmp_path, None)
    trainer.args.save_total_limit = 1
    free(28_028_000)
    check_space_for_the_run(trainer, tmp_path, None)
    free(28_027_999)
    with pytest.raises(OutputError, match=r"\(2 on disk at once"):
        check_space_for_the_run(trainer, tmp_path, None)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"save_strategy": "no", "max_steps": 50, "save_steps": 10}, 0),
        ({"save_strategy": "steps", "max_steps": 50, "save_steps": 10}, 5),
        ({"save_strategy": "steps", "max_steps": 55, "save_steps": 10}, 5),
        ({"save_strategy": "steps", "max_steps": 50, "save_steps": 0.25}, 3),  # every 13 steps
        ({"save_strategy": "steps", "max_steps": -1, "save_steps": 10}, 1),  # length unknown
        ({"save_strategy": "epoch", "max_steps": 50, "save_steps": 10}, 1),
        ({"save_strategy": "steps", "max_steps": 50, "save_steps": 10, "save_total_limit": 2}, 3),
    ],
)
def test_checkpoints_on_disk(fields: dict, expected: int) -> None:
    import types

    from grpokit.app.run import checkpoints_on_disk

    assert (
        checkpoints_on_disk(types.SimpleNamespace(**{"save_total_limit": None, **fields}))
        == expected
    )


def test_disk_full_while_writing_is_one_line(
    tmp_path: Path, tiny_model: str, capsys, monkeypatch
) -> None:
    import errno

    from grpokit.app import run

    def full(spec: Any, path: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run, "write_config", full)
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, tiny_model))
    assert main(["train", config]) == 2
    assert _error_line(capsys) == (
        f"cannot write {tmp_path / 'run' / 'config.yaml'}: the disk is full (free disk space, "
        "or set --output_dir to a disk with room)."
    )


def test_completion_longer_than_the_context_is_one_line(
    tmp_path: Path, tiny_model: str, capsys
) -> None:
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, tiny_model))
    assert main(["train", config, "--max_completion_length", "300"]) == 2
    assert _error_line(capsys) == (
        "max_completion_length=300 leaves no room for a prompt in the model's context of 256 "
        "tokens; set max_completion_length below 256."
    )


def test_missing_model_and_eval_output_folder_are_one_line(tmp_path: Path, capsys) -> None:
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, str(tmp_path / "no" / "model")))
    assert main(["train", config]) == 2
    assert "local folder not found" in _error_line(capsys)
    argv = ["eval", config, "--output", str(tmp_path / "missing" / "m.json")]
    assert main(argv) == 2
    assert _error_line(capsys).startswith(f"--output '{tmp_path / 'missing' / 'm.json'}': folder")


def test_internal_errors_keep_their_traceback(tmp_path: Path, monkeypatch) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("grpokit.engines.models.load_causal_lm", bug)
    config = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, "some/model"))
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(["train", config])


def test_the_grpokit_command_exits_with_mains_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `grpokit` console script is `cli.run`: `main()`'s code becomes the exit status (and a
    launched process would leave without finalization: tests/test_distributed.py)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="grpokit")
    assert script.value == "grpokit.app.cli:run"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "main", lambda: 2)
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 2
