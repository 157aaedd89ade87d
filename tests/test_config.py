"""GRPOConfig: TRL defaults, derived batch sizes, and an error naming the field for bad input."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from grpokit import GRPOConfig


def test_defaults_follow_trl() -> None:
    cfg = GRPOConfig()
    assert (cfg.loss_type, cfg.beta, cfg.epsilon, cfg.num_iterations) == ("dapo", 0.0, 0.2, 1)
    assert cfg.epsilon_high == 0.2  # None -> epsilon
    assert cfg.learning_rate == 1e-6 and cfg.num_generations == 8
    assert cfg.scale_rewards == "group" and cfg.importance_sampling_level == "token"
    # steps_per_generation defaults to gradient_accumulation_steps: one optimizer step per batch
    assert cfg.steps_per_generation == 1 and cfg.generation_batch_size == 8
    assert not cfg.is_off_policy


def test_batch_semantics() -> None:
    # 2 completions per micro-batch, 4 micro-batches per generation batch -> 8 completions,
    # 8 / G=4 = 2 prompts; GA=2 -> 2 optimizer steps per generation batch (off-policy).
    cfg = GRPOConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        num_generations=4,
    )
    assert cfg.generation_batch_size == 8
    assert cfg.prompts_per_generation == 2
    assert cfg.optimizer_steps_per_generation == 2
    assert cfg.is_off_policy
    # TRL's generation_batch_size is accepted instead of steps_per_generation.
    cfg = GRPOConfig(per_device_train_batch_size=2, generation_batch_size=6, num_generations=3)
    assert cfg.steps_per_generation == 3
    assert GRPOConfig(num_iterations=2, num_generations=2).is_off_policy


def test_derived_values_are_resolved_once_in_the_config() -> None:
    # 8 completions per micro-batch, GA 2, 4 micro-batches per generation batch: 4 / 2 = 2
    # optimizer steps per pass, 3 passes (num_iterations) -> 6 optimizer steps per round.
    cfg = GRPOConfig(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        num_iterations=3,
        num_generations=4,
    )
    assert (cfg.optimizer_steps_per_generation, cfg.steps_per_round) == (2, 6)
    assert GRPOConfig().steps_per_round == 1
    # Evaluation generations fall back to num_generations.
    assert GRPOConfig(num_generations=4).resolved_num_generations_eval == 4
    assert GRPOConfig(num_generations=4, num_generations_eval=2).resolved_num_generations_eval == 2
    # epsilon_high falls back to epsilon, in place (to_dict shows the value used).
    cfg = GRPOConfig(epsilon=0.1)
    assert cfg.epsilon_high == cfg.resolved_epsilon_high == 0.1
    assert GRPOConfig(epsilon=0.1, epsilon_high=0.28).resolved_epsilon_high == 0.28
    # scale_rewards: TRL's booleans become names, in place.
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).to_dict()["scale_rewards"] == "none"
    assert GRPOConfig(scale_rewards="batch").resolved_scale_rewards == "batch"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_generations=1), "num_generations"),
        (dict(per_device_train_batch_size=6, num_generations=4), "divisible by num_generations"),
        (dict(generation_batch_size=8, steps_per_generation=2), "cannot both be set"),
        (dict(per_device_train_batch_size=4, generation_batch_size=6), "generation_batch_size"),
        (dict(gradient_accumulation_steps=2, steps_per_generation=3), "multiple of"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="word"), "importance_sampling_level"),
        (dict(scale_rewards="std"), "scale_rewards"),
        (dict(beta=-0.1), "beta"),
        (dict(sync_ref_model=True), "sync_ref_model"),
        (dict(max_prompt_length=0), "max_prompt_length"),
        (dict(prompt_length_policy="drop"), "prompt_length_policy"),
        (dict(use_vllm=True, vllm_mode="remote"), "vllm_mode"),
        (dict(use_vllm=True, vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size"),
        (dict(use_vllm=True, vllm_gpu_memory_utilization=0.0), "vllm_gpu_memory_utilization"),
        (dict(fp16=True), "fp16"),
        (dict(report_to="comet_ml"), "report_to"),
        (dict(optim="lomo"), "optim"),
        (dict(optim="sgd", optim_args="momentum"), "optim_args.*key=value"),
        (dict(optim="sgd", optim_args="betas=0.9"), "does not read `betas`"),
        (dict(optim="sgd", optim_args="weight_decay=0.1"), "weight_decay field"),
        (dict(optim="adamw_torch", optim_args="momentum=0.9"), "it takes none"),
        (dict(optim="sgd", optim_args="momentum=fast"), "not a number"),
        (dict(save_strategy="weekly"), "save_strategy"),
        (dict(logging_strategy="often"), "logging_strategy"),
        (dict(eval_strategy="weekly"), "eval_strategy"),
        (dict(eval_delay=-1), "eval_delay"),
        (dict(save_strategy="best", eval_strategy="steps"), "metric_for_best_model"),
        (dict(save_strategy="best", metric_for_best_model="reward"), "eval_strategy"),
        (
            dict(save_strategy="best", eval_strategy="steps", metric_for_best_model="eval_loss"),
            "logs rewards, not a loss",
        ),
        (dict(load_best_model_at_end=True, eval_strategy="steps"), "logs rewards, not a loss"),
        (
            dict(
                load_best_model_at_end=True,
                eval_strategy="epoch",
                metric_for_best_model="reward",
            ),
            "save_strategy .* equal to eval_strategy",
        ),
        (
            dict(
                load_best_model_at_end=True,
                eval_strategy="steps",
                eval_steps=3,
                save_steps=4,
                metric_for_best_model="reward",
            ),
            "multiple of eval_steps",
        ),
        (dict(include_num_input_tokens_seen="some"), "include_num_input_tokens_seen"),
        (dict(data_seed="7"), "data_seed"),
        (dict(log_level="loud"), "log_level"),
        (dict(dataloader_num_workers=-1), "dataloader_num_workers"),
        (dict(dataloader_prefetch_factor=2), "dataloader_prefetch_factor"),
        (dict(dataloader_persistent_workers=True), "dataloader_persistent_workers"),
        (dict(dataloader_multiprocessing_context="thread"), "dataloader_multiprocessing_context"),
        (dict(lr_scheduler_type="warmup_magic"), "lr_scheduler_type"),
        (dict(max_steps=-1, num_train_epochs=0), "max_steps"),
        (dict(logging_steps=0), "logging_steps"),
        (dict(delta=1.1), "delta"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=-0.5), "off_policy_mask_threshold"),
        (dict(loss_type="vespo", vespo_lambda_pos=0.0), "vespo_lambda_pos"),
        (dict(loss_type="vespo", vespo_k_neg=-1.0), "vespo_k_neg"),
        (dict(vllm_importance_sampling_mode="token_clip"), "vllm_importance_sampling_mode"),
        (dict(vllm_importance_sampling_clip_min=-0.1), "vllm_importance_sampling_clip_min"),
        (
            dict(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.5),
            "vllm_importance_sampling_clip_max",
        ),
        (dict(eval_on_start=True, per_device_eval_batch_size=3), "per_device_eval_batch_size"),
        (dict(attention=""), "attention"),
        (dict(attention=3), "attention"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def test_unknown_and_retired_fields_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"unknown field `num_generation`.*num_generations"):
        GRPOConfig(num_generation=4)
    with pytest.raises(TypeError, match="`evaluation_strategy` was renamed eval_strategy"):
        GRPOConfig(evaluation_strategy="steps")
    # A TRL field set to a value grpokit cannot honour is a ValueError that says why.
    with pytest.raises(ValueError, match=r"vllm_model_impl='transformers'.*not yet supported"):
        GRPOConfig(vllm_model_impl="transformers")
    # TRL's deprecated cap still works as in TRL: it sets the clip's upper bound, with a warning.
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_clip_max"):
        cfg = GRPOConfig(vllm_importance_sampling_cap=2.0)
    assert cfg.vllm_importance_sampling_clip_max == 2.0


def test_rollout_importance_sampling_fields_take_trl_names_and_defaults() -> None:
    cfg = GRPOConfig()
    assert cfg.vllm_importance_sampling_correction is True
    assert cfg.vllm_importance_sampling_mode == "sequence_mask"
    assert (cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max) == (
        None,
        3.0,
    )
    # No upper bound is allowed (TRL: clip_max=None masks only below clip_min).
    GRPOConfig(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=None)
    vespo = GRPOConfig(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_neg=4.0)
    assert (vespo.vespo_k_pos, vespo.vespo_lambda_pos, vespo.vespo_k_neg) == (1.0, 3.0, 3.0)


def test_scale_rewards_bools_and_to_dict() -> None:
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    data = GRPOConfig(epsilon_high=0.28, report_to="none").to_dict()
    assert data["epsilon_high"] == 0.28 and data["report_to"] == []
    json.dumps(data)  # serialisable


# A time, a size, a speed ratio or a percentage: figures that belong in README/bench/RESULTS.md.
MEASURED = re.compile(r"\d\s?(s|ms|min|GB|MB|MiB|GiB|%)(\W|$)|\d(\.\d+)?x\b|\bmeasured\b", re.I)


def test_every_field_has_help_text_without_measured_figures() -> None:
    # `--help` shows `metadata["help"]`; figures there would go stale as the code changes.
    fields = dataclasses.fields(GRPOConfig)
    assert len(fields) > 50
    for f in fields:
        text = f.metadata["help"]
        assert isinstance(text, str) and text.strip(), f.name
        assert not MEASURED.search(text), (f.name, text)
        assert not re.search(r"\b[0-9a-f]{7,40}\b", text), (f.name, text)  # a commit hash
    assert MEASURED.search("5.5 -> 3.9 s") and MEASURED.search("~1.25x faster")


def test_lr_scheduler_names_are_transformers_schedulers():
    # The config lists scheduler names itself (validation must not import transformers); every
    # listed name must be one transformers' get_scheduler knows.
    from transformers import SchedulerType

    from grpokit.train.config_checks import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_what_importing_and_validating_a_config_import() -> None:
    # As the docstrings of grpokit, grpokit.train.config and grpokit.app.run_config say: importing
    # the config imports no torch; validating a GRPOConfig or a whole YAML run config imports
    # torch (the loss, advantage and reward tables) but never transformers, and loads no model.
    import subprocess
    import sys

    example = str(Path(__file__).parents[1] / "examples" / "grpo.yaml")
    code = f"""if True:
        import sys
        import grpokit, grpokit.train.config, grpokit.app.cli
        print('torch' in sys.modules)
        grpokit.GRPOConfig(loss_type="grpo", scale_rewards=False)
        from grpokit.app.run_config import load_config
        spec = load_config({example!r}, [("max_steps", 3)])
        assert spec.training.max_steps == 3 and spec.rewards
        print('torch' in sys.modules, 'transformers' in sys.modules)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "False"]


def test_use_vllm_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"use_vllm=True needs vLLM.*pip install grpokit\[vllm\]"):
        GRPOConfig(use_vllm=True)


# ---- numbers: finite and in range ---------------------------------------------------------------
def _float_fields() -> list[str]:
    import dataclasses

    # Fields accepted only at TRL's default refuse any other value, NaN included (test_trl_compat).
    return [
        f.name
        for f in dataclasses.fields(GRPOConfig)
        if "float" in str(f.type) and "accepted" not in f.metadata
    ]


def test_every_float_field_has_a_range() -> None:
    from grpokit.train.config_checks import NUMBER_RANGES

    # *_steps (int or fraction) are checked by _steps_value, reward_weights element by element.
    others = {"logging_steps", "save_steps", "eval_steps", "reward_weights"}
    assert set(_float_fields()) - others == set(NUMBER_RANGES)


@pytest.mark.parametrize("name", [n for n in _float_fields() if n != "reward_weights"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_naming_the_field(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be .*got {bad!r}"):
        GRPOConfig(**{name: bad})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number >= 0, got inf."),
        (dict(learning_rate=-1e-6), "learning_rate must be a finite number >= 0, got -1e-06."),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number >= 0 or None"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number >= 0 or None, got -1.0"),
        (dict(adam_beta1=1.5), "adam_beta1 must be in [0, 1), got 1.5."),
        (dict(adam_beta1=1.0), "adam_beta1 must be in [0, 1), got 1.0."),
        (dict(adam_beta2=-0.1), "adam_beta2 must be in [0, 1), got -0.1."),
        (dict(adam_epsilon=-1.0), "adam_epsilon must be a finite number > 0, got -1.0."),
        (dict(adam_epsilon=0.0), "adam_epsilon must be a finite number > 0, got 0.0."),
        (dict(weight_decay=-0.01), "weight_decay must be a finite number >= 0, got -0.01."),
        (dict(warmup_ratio=1.5), "warmup_ratio must be in [0, 1], got 1.5."),
        (dict(num_train_epochs=float("inf")), "num_train_epochs must be a finite number >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0."),
        (dict(reward_weights=[1.0, float("nan")]), "reward_weights[1] must be a finite number"),
        (dict(save_steps=float("nan")), "save_steps must be > 0 (an integer, or a float < 1"),
        (dict(logging_steps=float("inf")), "logging_steps must be > 0"),
    ],
)
def test_out_of_range_messages_name_field_value_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        GRPOConfig(**kwargs)
    assert str(error.value).startswith(message)


def test_range_edges_are_accepted() -> None:
    cfg = GRPOConfig(
        learning_rate=0.0,
        adam_beta1=0.0,
        adam_beta2=0.9999,
        adam_epsilon=1e-12,
        weight_decay=0.0,
        warmup_ratio=1.0,
        top_p=1.0,
        min_p=0.0,
    )
    assert (cfg.adam_beta2, cfg.warmup_ratio) == (0.9999, 1.0)
    assert GRPOConfig(max_grad_norm=None).max_grad_norm is None  # None and 0 = no clipping
    assert GRPOConfig(max_grad_norm=0.0).max_grad_norm == 0.0
    assert GRPOConfig(learning_rate=1).learning_rate == 1  # an int is a number


def test_check_number_intervals() -> None:
    from grpokit.train.config_checks import check_number

    check_number("x", 0.5, "(0, 1]")
    check_number("x", 1, "(0, 1]")
    for bad in (0, 1.0001, True, "0.5", None):
        with pytest.raises(ValueError, match=r"^x must be in \(0, 1\], got "):
            check_number("x", bad, "(0, 1]")
    with pytest.raises(ValueError, match=r"^x must be a finite number, got inf\.$"):
        check_number("x", float("inf"), "(-inf, inf)")
    with pytest.raises(ValueError, match=r"^x must be a finite number > 2 or None, got 2\.$"):
        check_number("x", 2, "(2, inf)", or_none=True)
