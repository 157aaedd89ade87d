"""Every field of TRL's GRPOConfig: accepted with TRL's default, a status each, the generated
table up to date, a trl.GRPOConfig converted, and "did you mean" only for genuinely close names."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from grpokit import GRPOConfig
from grpokit.train.fields import closest_names
from grpokit.train.trl_compat import DEFAULT_DIFFERENCES, RETIRED_TRL_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def _table_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "trl_compat_table", ROOT / "bench/trl_compat_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _table_module()
SNAPSHOT = TABLE.load_snapshot()
TRL_DEFAULTS = {f["name"]: f["default"] for f in SNAPSHOT["fields"]}
OURS = {f.name: f for f in dataclasses.fields(GRPOConfig)}
AT_DEFAULT = sorted(name for name, f in OURS.items() if "accepted" in f.metadata)


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_the_generated_table_matches_the_code() -> None:
    # docs/TRL_COMPAT.md is regenerated in memory from GRPOConfig and the TRL snapshot; a field
    # added, removed or re-classified without regenerating it fails here.
    assert TABLE.render(SNAPSHOT) == (ROOT / "docs/TRL_COMPAT.md").read_text(), (
        "docs/TRL_COMPAT.md is out of date: run `python bench/trl_compat_table.py`"
    )
    assert SNAPSHOT["trl"] == "1.16.0" and len(TRL_DEFAULTS) == 189


def test_every_trl_field_is_a_field_with_trls_default() -> None:
    missing = [name for name in TRL_DEFAULTS if name not in OURS]
    assert not missing, f"TRL fields grpokit does not accept: {missing}"
    differ = {
        name
        for name, trl_default in TRL_DEFAULTS.items()
        if json.dumps(_default(OURS[name])) != json.dumps(trl_default)
    }
    # Exactly the documented differences, each of which changes nothing that is trained.
    assert differ == set(DEFAULT_DIFFERENCES) == {"gradient_checkpointing", "output_dir"}
    cfg = GRPOConfig()
    assert cfg.use_bias_correction_kl is True and cfg.max_completion_length == 512
    assert cfg.output_dir == "trainer_output" == GRPOConfig(output_dir=None).output_dir
    assert cfg.bf16 is True and GRPOConfig(bf16=False).bf16 is False  # TRL: None = not fp16


def test_every_trl_field_has_a_status_with_a_reason() -> None:
    # Fields of grpokit's own, which TRL 1.16 does not have (grpokit adds more over time).
    for name in ("attention", "max_prompt_length", "prompt_length_policy", "warmup_ratio"):
        assert TABLE.field_status(OURS[name], name in TRL_DEFAULTS)[0] == TABLE.GRPOKIT_ONLY
    for name in TRL_DEFAULTS:
        status, note = TABLE.field_status(OURS[name], True)
        assert status in (TABLE.SUPPORTED, TABLE.PARTIAL, TABLE.AT_DEFAULT), name
        if status != TABLE.SUPPORTED:
            assert note.strip(". "), f"{name}: {status} without a reason"


@pytest.mark.parametrize("name", AT_DEFAULT)
def test_a_field_accepted_only_at_its_default_refuses_another_value_saying_why(name: str) -> None:
    f = OURS[name]
    for value in f.metadata["accepted"]:
        GRPOConfig(**{name: value})  # TRL's default (and its equivalents) are accepted
    with pytest.raises(ValueError) as error:
        GRPOConfig(**{name: "a value of my own"})
    message = str(error.value)
    assert message.startswith(f"{name}='a value of my own' is not supported: ")
    assert f.metadata["reason"] in message and "TRL's default is" in message


def test_reasons_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"deepspeed=.*set up by the accelerate config"):
        GRPOConfig(deepspeed={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"save_on_each_node=True.*multi-process"):
        GRPOConfig(save_on_each_node=True)
    with pytest.raises(ValueError, match=r"hub_model_id=.*Hugging Face Hub"):
        GRPOConfig(hub_model_id="me/model")
    with pytest.raises(ValueError, match=r"vllm_enable_sleep_mode=True.*not yet supported"):
        GRPOConfig(vllm_enable_sleep_mode=True)
    # Values with the same effect as the default are accepted: TRL resolves 'auto' to None.
    assert GRPOConfig(pad_to_multiple_of=None).pad_to_multiple_of is None


# Fields the trainer has nothing to act on, by design (their metadata says so): data-loader worker
# settings (prompts are read in the training process), flags for the user's script, and
# multimodal logging (no multimodal inputs). Every other field must be read outside the config.
NOTHING_TO_ACT_ON = {
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "dataloader_in_order",
    "do_train",
    "do_eval",
    "do_predict",
    "log_multimodal",
}
# Fields the config itself consumes into derived values that the trainer reads, or whose only
# accepted value is what grpokit does (their other values are refused: status "partly").
CONSUMED_BY_THE_CONFIG = {
    "num_generations_eval": "resolved_num_generations_eval",
    "generation_batch_size": "steps_per_generation, steps_per_round",
    "steps_per_generation": "optimizer_steps_per_generation, steps_per_round",
    "scale_rewards": "resolved_scale_rewards",
    "epsilon": "loss_options() (epsilon_low)",
    "data_seed": "resolved_data_seed",
    "vllm_importance_sampling_cap": "sets vllm_importance_sampling_clip_max",
    "use_adaptive_entropy": "entropy_regularization() (adaptive)",
    "entropy_coef_min": "entropy_regularization() (coef_min)",
    "entropy_coef_max": "entropy_regularization() (coef_max)",
    "entropy_coef_delta": "entropy_regularization() (coef_delta)",
    "entropy_target": "entropy_regularization() (target)",
}
CONFIG_MODULES = {
    "config.py",
    "config_checks.py",
    "fields.py",
    "objective_settings.py",
    "rollout_settings.py",
    "run_settings.py",
    "trl_compat.py",
}


def test_no_field_is_accepted_and_then_ignored() -> None:
    # A field that is neither refused away from its default nor read by the code that trains,
    # logs or saves would be accepted and then ignored.
    source = "\n".join(
        path.read_text()
        for path in (ROOT / "src/grpokit").rglob("*.py")
        if path.name not in CONFIG_MODULES
    )
    unread = [
        name
        for name, f in OURS.items()
        if "accepted" not in f.metadata
        and name not in NOTHING_TO_ACT_ON
        and name not in CONSUMED_BY_THE_CONFIG
        and not re.search(rf"\.{name}\b", source)
    ]
    assert not unread, f"fields nothing reads: {unread}"
    config_source = (ROOT / "src/grpokit/train/config.py").read_text()
    for name, derived in CONSUMED_BY_THE_CONFIG.items():
        assert re.search(rf"self\.{name}\b", config_source), (name, derived)
    for name in NOTHING_TO_ACT_ON:
        assert "note" in OURS[name].metadata, name  # the table says why there is nothing to do


def test_retired_names_say_what_replaced_them() -> None:
    for name, why in RETIRED_TRL_FIELDS.items():
        assert name not in OURS
        with pytest.raises(TypeError, match=re.escape(why)):
            GRPOConfig(**{name: 1})


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [
        ("num_generation", ["num_generations"]),
        ("temprature", ["temperature"]),
        ("topp", ["top_p"]),
        ("learning_rte", ["learning_rate"]),
        ("max_completion_len", ["max_completion_length"]),
        ("epsilon_hi", ["epsilon_high"]),
        ("use_kv_cache", ["use_cache"]),
        ("gradient_accumulation", ["gradient_accumulation_steps"]),
        # Two fields almost equally close: both are named.
        ("per_device_batch_size", ["per_device_eval_batch_size", "per_device_train_batch_size"]),
        # Not close enough to be the same option: no suggestion rather than a wrong one.
        ("kl_coef", []),
        ("lr", []),
        ("max_new_tokens", []),
        ("batch_size", []),
    ],
)
def test_did_you_mean_only_for_genuinely_close_names(typed: str, suggested: list[str]) -> None:
    assert closest_names(typed, OURS) == suggested
    with pytest.raises(TypeError) as error:
        GRPOConfig(**{typed: 1})
    assert ("Did you mean" in str(error.value)) == bool(suggested)
    # `use_cache` is a field now; once, `use_cache` was "corrected" to the unrelated `use_cpu`.
    assert closest_names("use_cache", set(OURS) - {"use_cache"}) == []


# ---- a trl.GRPOConfig passed as args ------------------------------------------------------------
def _fake_trl(monkeypatch: pytest.MonkeyPatch) -> type:
    """A `trl` module whose GRPOConfig carries a few fields in the shapes TRL's __post_init__
    leaves them (enums, lists, derived batch sizes, a default AcceleratorConfig-like object)."""
    import enum

    class IntervalStrategy(str, enum.Enum):
        STEPS = "steps"
        NO = "no"

    class AcceleratorConfig:
        def __init__(self, split_batches: bool = False) -> None:
            self.split_batches = split_batches

        def to_dict(self) -> dict[str, Any]:
            return {"split_batches": self.split_batches}

    @dataclasses.dataclass
    class GRPOConfig:  # stands in for trl.GRPOConfig
        output_dir: str | None = None
        learning_rate: float = 1e-6
        num_generations: int = 8
        max_completion_length: int = 512
        loss_type: str = "dapo"
        logging_strategy: Any = IntervalStrategy.STEPS
        save_strategy: Any = IntervalStrategy.STEPS
        report_to: Any = "none"
        debug: Any = ""
        accelerator_config: Any = None
        generation_batch_size: int | None = None
        steps_per_generation: int | None = None
        per_device_train_batch_size: int = 8
        save_on_each_node: bool = False
        _n_gpu: int = dataclasses.field(init=False, default=0)

        def __post_init__(self) -> None:  # what TRL's and transformers' __post_init__ do
            self.output_dir = self.output_dir or "trainer_output"
            self.report_to = [] if self.report_to == "none" else self.report_to
            self.debug = []
            self.accelerator_config = AcceleratorConfig()
            self.steps_per_generation = self.steps_per_generation or 1
            self.generation_batch_size = (
                self.per_device_train_batch_size * self.steps_per_generation
            )

    module = types.ModuleType("trl")
    GRPOConfig.__module__ = "trl"
    module.GRPOConfig = GRPOConfig  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trl", module)
    return GRPOConfig


def test_a_trl_config_is_converted_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    trl_config_cls = _fake_trl(monkeypatch)
    trl_cfg = trl_config_cls(
        output_dir="runs/x",
        learning_rate=2e-6,
        num_generations=4,
        max_completion_length=64,
        loss_type="grpo",
        logging_strategy="no",
        per_device_train_batch_size=4,
        steps_per_generation=2,
    )
    cfg = GRPOConfig.from_trl(trl_cfg)
    assert isinstance(cfg, GRPOConfig)
    assert (cfg.output_dir, cfg.learning_rate, cfg.num_generations) == ("runs/x", 2e-6, 4)
    assert (cfg.max_completion_length, cfg.loss_type) == (64, "grpo")
    assert cfg.logging_strategy == "no" and cfg.save_strategy == "steps"  # enums -> strings
    assert cfg.report_to == [] and cfg.debug == [] and cfg.accelerator_config is None
    # TRL derived generation_batch_size from steps_per_generation; grpokit derives the same.
    assert (cfg.steps_per_generation, cfg.generation_batch_size) == (2, 8)
    # Fields the TRL config does not set keep grpokit's (= TRL's) defaults.
    assert cfg.temperature == 1.0 and cfg.use_bias_correction_kl is True


def test_a_trl_config_with_a_refused_value_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    trl_config_cls = _fake_trl(monkeypatch)
    from grpokit.train.config import as_grpo_config

    with pytest.raises(ValueError, match=r"converting a trl\.GRPOConfig: save_on_each_node"):
        as_grpo_config(trl_config_cls(save_on_each_node=True))
    with pytest.raises(TypeError, match=r"args must be a grpokit\.GRPOConfig"):
        as_grpo_config({"learning_rate": 1e-6})
    assert as_grpo_config(None) == GRPOConfig()


def test_the_trainer_takes_a_trl_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from grpokit.train.trainer import GRPOTrainer
    from tests.tiny import make_causal_lm, make_tokenizer

    trl_config_cls = _fake_trl(monkeypatch)
    tokenizer = make_tokenizer()
    trainer = GRPOTrainer(
        model=make_causal_lm(tokenizer),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=trl_config_cls(
            output_dir=str(tmp_path),
            num_generations=2,
            max_completion_length=4,
            per_device_train_batch_size=2,
        ),
        train_dataset=[{"prompt": "a b"}] * 4,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, GRPOConfig)
    assert trainer.args.max_completion_length == 4 and trainer.args.output_dir == str(tmp_path)


# TRL's environment (`python bench/bench_grpo.py setup` creates it); another may be named.
TRL_PYTHON = Path(os.environ.get("GRPOKIT_TRL_PYTHON", ROOT / "bench/.venv-trl/bin/python"))


@pytest.mark.slow
@pytest.mark.skipif(not TRL_PYTHON.exists(), reason="needs TRL in bench/.venv-trl")
def test_a_real_trl_config_is_converted() -> None:
    # With TRL installed (bench/.venv-trl), a real trl.GRPOConfig after its __post_init__.
    code = """if True:
        import trl
        from grpokit import GRPOConfig
        t = trl.GRPOConfig(output_dir="out", use_cpu=True, learning_rate=3e-6, num_generations=4,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           logging_steps=5, eval_strategy="no", lr_scheduler_type="cosine",
                           optim="sgd", beta=0.04, loss_type="grpo")
        g = GRPOConfig.from_trl(t)
        print(g.learning_rate, g.num_generations, g.steps_per_generation,
              g.generation_batch_size, g.lr_scheduler_type, g.optim, g.beta, g.loss_type,
              g.bf16, g.use_cpu, g.max_completion_length)
    """
    out = subprocess.run(
        [str(TRL_PYTHON), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.split() == [
        "3e-06", "4", "2", "8", "cosine", "sgd", "0.04", "grpo", "True", "True", "512"
    ]  # fmt: skip


def test_the_written_run_config_leaves_out_fields_fixed_at_their_default() -> None:
    from grpokit.app.run_config import build_config, load_config

    spec = load_config(str(ROOT / "examples/grpo.yaml"), [("data_seed", 3)])
    written = spec.to_yaml_dict()["training"]
    assert "deepspeed" not in written and "hub_token" not in written  # only TRL's default
    assert written["data_seed"] == 3 and "learning_rate" in written and "tf32" in written
    again = build_config(spec.to_yaml_dict())  # loading it reproduces the run
    assert again.training.to_dict() == spec.training.to_dict()


# ---- HfArgumentParser / TrlParser (how TRL's scripts build their config) ------------------------
@pytest.mark.usefixtures("restore_field_types")
def test_hf_argument_parser_builds_the_config_as_for_trl(tmp_path: Path) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((GRPOConfig,))
    assert "--per_device_train_batch_size" in parser.format_help()  # every field, help intact
    out = str(tmp_path / "out")
    # Unset fields come out at their defaults (debug: the parser gives None for TRL's "").
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", out])
    assert parsed.to_dict() == GRPOConfig(output_dir=out).to_dict()
    # Command-line values as TRL's scripts pass them: numbers, flags, lists, "none", JSON dicts,
    # *_steps as floats (a fraction below 1), TRL's scale_rewards names.
    argv = [
        "--output_dir", out, "--learning_rate", "1e-5", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--save_steps", "0.5", "--eval_strategy", "steps",
        "--eval_steps", "2", "--gradient_checkpointing", "--bf16", "false", "--beta", "0.04",
        "--reward_weights", "0.5", "1.0", "--report_to", "none", "--scale_rewards", "batch",
        "--model_init_kwargs", '{"dtype": "float32"}', "--max_completion_length", "8",
    ]  # fmt: skip
    (parsed,) = parser.parse_args_into_dataclasses(argv)
    direct = GRPOConfig(
        output_dir=out, learning_rate=1e-5, lr_scheduler_type="cosine", logging_steps=1,
        save_steps=0.5, eval_strategy="steps", eval_steps=2, gradient_checkpointing=True,
        bf16=False, beta=0.04, reward_weights=[0.5, 1.0], report_to="none",
        scale_rewards="batch", model_init_kwargs={"dtype": "float32"}, max_completion_length=8,
    )  # fmt: skip
    assert parsed.to_dict() == direct.to_dict()
    # A YAML recipe (TrlParser's --config) gives values of their own types, None included.
    (from_dict,) = parser.parse_dict(
        {"output_dir": out, "max_grad_norm": None, "report_to": ["tensorboard"], "eval_steps": 3}
    )
    assert from_dict.max_grad_norm is None and from_dict.report_to == ["tensorboard"]
    # Checks that read the declared types still hold after the parser rewrote `Field.type`.
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        GRPOConfig(output_dir=out, max_grad_norm=float("nan"))
    assert GRPOConfig(output_dir=out, max_grad_norm=None).max_grad_norm is None
