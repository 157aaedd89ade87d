"""`GRPOConfig`: every training option in one typed dataclass, with every field of TRL's.

The fields are declared in groups, one base class each, under their own heading in `grpokit train
--help`: `ModelSettings`, `OptimisationSettings` and `ReportingSettings` (`train.run_settings`),
`DataSettings`, `GenerationSettings` and `ToolSettings` (`train.rollout_settings`),
`ObjectiveSettings` (`train.objective_settings`), and TRL's fields that do not shape training,
`TrainerSettings` and `AcceptedAtDefault` (`train.trl_compat`). Each field is written
`name: type = option(default, "help")` (or `at_default(...)` for a TRL field accepted only at
TRL's default; see `train.fields`): the help text is stored in the field's metadata
(`dataclasses.fields(GRPOConfig)[i].metadata["help"]`, as transformers and TRL do), the `grpokit`
command shows it in `--help`, and docs/TRL_COMPAT.md is generated from it.

This module holds what concerns the whole config: TRL's shorthands resolved and the values
derived once, in `__post_init__` and the properties at the end of the class
(`steps_per_generation`, `generation_batch_size`, `steps_per_round`, `resolved_epsilon_high`,
...), which use sites read instead of re-deriving; the checks of every field's value are in
`train.config_checks`, run from `__post_init__`. An unknown keyword is a `TypeError` that names it
(and the field it is close to), and a TRL field set to a value grpokit cannot honour is a
`ValueError` that says why, never accepted and then ignored.

Importing this module imports neither torch nor transformers; constructing a `GRPOConfig` imports
torch (the loss and advantage tables it validates against live in `grpokit.core`) but not
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpokit.core.entropy import EntropyRegularization
    from grpokit.core.losses import LossOptions

from grpokit.train import config_checks as checks
from grpokit.train.config_checks import EVAL_STRATEGIES, check_number, positive_int
from grpokit.train.fields import check_at_default, did_you_mean
from grpokit.train.objective_settings import ObjectiveSettings
from grpokit.train.rollout_settings import DataSettings, GenerationSettings, ToolSettings
from grpokit.train.run_settings import ModelSettings, OptimisationSettings, ReportingSettings
from grpokit.train.trl_compat import (
    RETIRED_TRL_FIELDS,
    AcceptedAtDefault,
    TrainerSettings,
    is_trl_config,
    trl_config_kwargs,
)

# Fields TRL types `dict | str`: a string starting with "{" is parsed as JSON, as transformers does.
JSON_DICT_FIELDS = (
    "model_init_kwargs",
    "gradient_checkpointing_kwargs",
    "generation_kwargs",
    "chat_template_kwargs",
    "lr_scheduler_kwargs",
)


def _check_field_names(kwargs: dict[str, Any]) -> None:
    """Raise a `TypeError` naming any keyword that is not a `GRPOConfig` field."""
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    for key in kwargs:
        if key in names:
            continue
        if key in RETIRED_TRL_FIELDS:
            raise TypeError(f"GRPOConfig: `{key}` was {RETIRED_TRL_FIELDS[key]}; use that.")
        raise TypeError(f"GRPOConfig got an unknown field `{key}`.{did_you_mean(key, names)}")


# `grpokit train --help` lists the groups in the order of the bases; a dataclass's fields (and
# `to_dict()`) run from the last base's to the first's.
@dataclass
class GRPOConfig(
    ModelSettings,
    DataSettings,
    GenerationSettings,
    ObjectiveSettings,
    ToolSettings,
    OptimisationSettings,
    ReportingSettings,
    TrainerSettings,
    AcceptedAtDefault,
):
    """Configuration of a GRPO run: every field of TRL's `GRPOConfig`, with TRL's name, meaning
    and default, plus grpokit's own (docs/TRL_COMPAT.md lists them all).

    The fields are declared in its bases, one group each (see the module docstring); those of
    `TrainerSettings` (log level, progress bar, determinism, ...) and `AcceptedAtDefault` (TRL
    fields accepted only at their default, e.g. multi-process and Hub options, each with the
    reason another value is refused) do not shape training. The declared defaults that differ
    from TRL's (`trl_compat.DEFAULT_DIFFERENCES`) change nothing that is trained:
    `gradient_checkpointing` only trades memory for speed, `output_dir` is the directory TRL's
    None resolves to.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> GRPOConfig:
        _check_field_names(kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self._resolve_trl_shorthands()
        self._resolve_compile_settings()
        check_at_default(self)
        from grpokit.train.trackers import check_trackio_settings, resolve_report_to

        self.report_to = resolve_report_to(self.report_to)  # a missing tracker fails here
        check_trackio_settings(self)
        checks.check_numbers(self)
        self._resolve_trainer_settings()
        checks.check_unsupported(self)
        self._resolve_batch_sizes()
        checks.check_generation(self)
        checks.check_objective(self)
        checks.check_optimisation(self)
        checks.check_schedule(self)

    # ---- resolution -----------------------------------------------------------------------------
    def _resolve_trl_shorthands(self) -> None:
        """TRL's shorthands and derived defaults, resolved once as TRL resolves them; to_dict()
        then shows the values actually used."""
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.debug is None:  # what HfArgumentParser passes for an unset `debug`
            self.debug = ""
        for name in ("warmup_steps", "logging_steps", "save_steps", "eval_steps", "eval_delay"):
            value = getattr(self, name)  # 10.0 from a parser = 10 steps, as transformers reads it
            if isinstance(value, float) and value >= 1 and value.is_integer():
                setattr(self, name, int(value))
        for name in JSON_DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("{"):
                setattr(self, name, json.loads(value))
        self.scale_rewards = self.resolved_scale_rewards
        self.epsilon_high = self.resolved_epsilon_high
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        elif self.report_to is None:
            self.report_to = []
        tokens_seen = self.include_num_input_tokens_seen
        if isinstance(tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if tokens_seen else "no"
        if self.vllm_importance_sampling_cap is not None:
            check_number(
                "vllm_importance_sampling_cap", self.vllm_importance_sampling_cap, "(0, inf)"
            )
            warnings.warn(
                "vllm_importance_sampling_cap is deprecated in TRL; it sets "
                "vllm_importance_sampling_clip_max, which you should use instead.",
                FutureWarning,
                stacklevel=4,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        if self.metric_for_best_model is None and self.load_best_model_at_end:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _resolve_compile_settings(self) -> None:
        """A backend or mode turns `torch_compile` on; compiling defaults to inductor (as
        transformers' `TrainingArguments` resolve them)."""
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True
        if self.torch_compile and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"

    def _resolve_batch_sizes(self) -> None:
        """`steps_per_generation` and `generation_batch_size` derived from each other (as TRL),
        with the batch sizes checked against the processes and `num_generations`."""
        positive_int("per_device_train_batch_size", self.per_device_train_batch_size)
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        positive_int("num_iterations", self.num_iterations)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"num_generations must be an integer >= 2 (advantages compare the completions of a "
                f"prompt), got {self.num_generations!r}."
            )
        from grpokit.train.distributed import launched_num_processes

        # As TRL: per_device_* sizes are per process; the generation batch spans the processes.
        processes = launched_num_processes()
        bs = self.per_device_train_batch_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "generation_batch_size and steps_per_generation cannot both be set; set only one "
                "(generation_batch_size = per_device_train_batch_size * processes * "
                "steps_per_generation)."
            )
        if self.generation_batch_size is not None:
            positive_int("generation_batch_size", self.generation_batch_size)
            if self.generation_batch_size % (bs * processes):
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                    f"per_device_train_batch_size ({bs})"
                    + (f" x {processes} processes" if processes > 1 else "")
                    + "."
                )
            self.steps_per_generation = self.generation_batch_size // (bs * processes)
        elif self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        positive_int("steps_per_generation", self.steps_per_generation)
        self.generation_batch_size = bs * processes * self.steps_per_generation
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) so that each "
                "optimizer step uses whole micro-batches of one generation batch."
            )
        per_process = bs * self.steps_per_generation
        if per_process % self.num_generations and processes > 1:
            raise ValueError(
                f"Each of the {processes} processes generates per_device_train_batch_size * "
                f"steps_per_generation = {per_process} completions, which is not a whole number "
                f"of groups of num_generations ({self.num_generations}): a group's completions "
                "must be generated on one process. Make per_device_train_batch_size * "
                "steps_per_generation a multiple of num_generations."
            )
        if per_process % self.num_generations:
            raise ValueError(
                f"The generation batch (per_device_train_batch_size * steps_per_generation = "
                f"{self.generation_batch_size} completions) must be divisible by num_generations "
                f"({self.num_generations}); change per_device_train_batch_size, "
                "steps_per_generation or num_generations."
            )
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(
                f"eval_strategy must be one of {EVAL_STRATEGIES}, got {self.eval_strategy!r}."
            )
        if self.eval_strategy != "no" or self.eval_on_start:
            g_eval = self.resolved_num_generations_eval
            if self.per_device_eval_batch_size % g_eval:
                raise ValueError(
                    f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be "
                    f"divisible by the completions per prompt in evaluation ({g_eval})."
                )

    # ---- derived values ------------------------------------------------------------------------
    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps taken on one generation batch in one of the `num_iterations` passes."""
        assert self.steps_per_generation is not None
        return self.steps_per_generation // self.gradient_accumulation_steps

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per generation round: `num_iterations` passes over one generation
        batch, `optimizer_steps_per_generation` steps each."""
        return self.num_iterations * self.optimizer_steps_per_generation

    @property
    def prompts_per_generation(self) -> int:
        """Unique prompts (B) per generation batch, over all processes."""
        assert self.generation_batch_size is not None
        return self.generation_batch_size // self.num_generations

    @property
    def prompts_per_process(self) -> int:
        """Unique prompts each process generates per generation batch (whole groups)."""
        assert self.steps_per_generation is not None
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations

    def loss_options(self) -> LossOptions:
        """The loss options of this run for `policy_loss` (`epsilon_high` resolved from
        `epsilon`), checked when built."""
        from grpokit.core.losses import LossOptions

        return LossOptions(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon_low=self.epsilon,
            epsilon_high=self.resolved_epsilon_high,
            cispo_cap_mode=self.cispo_cap_mode,
            delta=self.delta,
            beta=self.beta,
            use_bias_correction_kl=self.use_bias_correction_kl,
            kl_bias_correction_level=self.kl_bias_correction_level,
            max_completion_length=self.max_completion_length,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
        )

    def entropy_regularization(self) -> EntropyRegularization:
        """The run's entropy regularisation settings (`entropy_coef` and the adaptive fields),
        checked when built."""
        from grpokit.core.entropy import EntropyRegularization

        return EntropyRegularization(
            coef=self.entropy_coef,
            adaptive=self.use_adaptive_entropy,
            coef_min=self.entropy_coef_min,
            coef_max=self.entropy_coef_max,
            coef_delta=self.entropy_coef_delta,
            target=self.entropy_target,
        )

    @property
    def is_off_policy(self) -> bool:
        """Whether the policy changes between generation and some update (old log-probs needed)."""
        return self.num_iterations > 1 or self.optimizer_steps_per_generation > 1

    @property
    def resolved_data_seed(self) -> int:
        """Seed of the prompt order: `data_seed`, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_num_generations_eval(self) -> int:
        """Completions per prompt in evaluation: `num_generations_eval`, else `num_generations`."""
        return self.num_generations_eval or self.num_generations

    @property
    def resolved_epsilon_high(self) -> float:
        """Upper clip of the ratio: `epsilon_high`, else `epsilon` (set in place at init)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def resolved_scale_rewards(self) -> str:
        """`scale_rewards` as a name: True = "group", False = "none" (set in place at init)."""
        if isinstance(self.scale_rewards, bool):
            return "group" if self.scale_rewards else "none"
        return self.scale_rewards

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (the config actually used, after derivation)."""
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """`to_dict()` as indented JSON (transformers' `TrainingArguments` method, which tracker
        callbacks call); values JSON cannot hold are written as their `str`."""
        import json

        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """`to_dict()` plus `train_batch_size` and `eval_batch_size`, every value that is not a
        bool, int, float or str turned into its `str` (transformers' method, for TensorBoard's
        hyper-parameters)."""
        d = {
            **self.to_dict(),
            "train_batch_size": self.per_device_train_batch_size,
            "eval_batch_size": self.per_device_eval_batch_size,
        }
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    @classmethod
    def from_trl(cls, config: Any) -> GRPOConfig:
        """The `GRPOConfig` equal, field by field, to a `trl.GRPOConfig` instance (see
        `trl_compat.trl_config_kwargs`); TRL itself is not imported.

        Raises:
            TypeError: `config` is not a dataclass, or has a field grpokit does not know.
            ValueError: a field set to a value grpokit refuses (the message says why).
        """
        kwargs = trl_config_kwargs(config)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            source = f"{type(config).__module__}.{type(config).__name__}"
            raise type(error)(f"converting a {source}: {error}") from error


def as_grpo_config(args: Any) -> GRPOConfig:
    """The trainer's `args`: a `GRPOConfig` as is, None as `GRPOConfig()`, a `trl.GRPOConfig`
    converted (`GRPOConfig.from_trl`).

    Raises:
        TypeError: anything else.
    """
    if args is None:
        return GRPOConfig()
    if isinstance(args, GRPOConfig):
        return args
    if is_trl_config(args):
        return GRPOConfig.from_trl(args)
    raise TypeError(
        f"args must be a grpokit.GRPOConfig (or a trl.GRPOConfig, converted field by field), got "
        f"{type(args).__name__}."
    )
