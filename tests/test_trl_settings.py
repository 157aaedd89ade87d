"""TRL / transformers settings with TRL's meaning: checkpoints without optimizer state, the data
seed, where a resumed run draws prompts from, logging filters, the progress bar, process-wide
settings (seed, determinism, TF32, log level) and what reaches `from_pretrained`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig
from grpokit.train import build
from grpokit.train.loggers import MetricsBuffer, RunLogger, completion_rows
from tests.test_trainer import make_trainer
from tests.tiny import make_causal_lm, make_tokenizer, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EIGHT = Dataset.from_list([{"prompt": p} for p in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]])


def test_save_only_model_checkpoints_hold_the_model_and_cannot_be_resumed(tmp_path: Path) -> None:
    from grpokit.train import checkpoint as ckpt

    config = dict(max_steps=3, save_strategy="steps", save_steps=1, save_only_model=True)
    make_trainer(tmp_path, **config).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (
        list(checkpoint.glob("model*.safetensors")) and (checkpoint / "trainer_state.json").exists()
    )
    assert not any((checkpoint / f).exists() for f in ckpt.RESUME_FILES)
    ckpt.verify_checkpoint(checkpoint)  # complete and sealed: only resuming is refused
    with pytest.raises(
        ckpt.CheckpointError, match=r"checkpoint-2: holds the model only.*save_only"
    ):
        make_trainer(tmp_path, **config).train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-3: holds the model only"):
        make_trainer(tmp_path, **config).train(resume_from_checkpoint=True)  # the newest


def test_data_seed_alone_decides_the_prompt_order(tmp_path: Path) -> None:
    def first_prompts(**config: Any) -> list[str]:
        trainer = make_trainer(tmp_path, dataset=EIGHT, **config)
        return [trainer.sampler.next()["prompt"] for _ in range(8)]

    assert first_prompts(seed=0, data_seed=5) == first_prompts(seed=1, data_seed=5)
    assert first_prompts(seed=5) == first_prompts(seed=0, data_seed=5)  # None = seed
    assert first_prompts(seed=0) != first_prompts(seed=1)


def test_ignore_data_skip_restarts_the_prompts_on_resume(tmp_path: Path) -> None:
    # 4 prompts, 2 per round (4 completions per batch, G=2): checkpoint-1 stopped at prompt 2.
    make_trainer(tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=1).train()
    checkpoint = str(tmp_path / "full" / "checkpoint-1")
    resumed = make_trainer(tmp_path / "a", max_steps=2)
    resumed.train(resume_from_checkpoint=checkpoint)
    from_start = make_trainer(tmp_path / "b", max_steps=2, ignore_data_skip=True)
    from_start.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == from_start.state.global_step == 2
    assert (resumed.state.data_epoch, resumed.state.data_index) == (0, 4)  # prompts 3 and 4
    assert (from_start.state.data_epoch, from_start.state.data_index) == (0, 2)  # 1 and 2 again


def test_logging_nan_inf_filter_decides_whether_a_nan_loss_shows() -> None:
    for nan_inf_filter, expected in ((True, 2.0), (False, math.nan)):
        buffer = MetricsBuffer(nan_inf_filter=nan_inf_filter)
        buffer.extend({"loss": [1.0, math.nan, 3.0], "kl": [0.5, math.nan]})
        out = buffer.flush()
        assert out["loss"] == expected or (math.isnan(expected) and math.isnan(out["loss"]))
        assert out["kl"] == 0.5  # only the loss is affected, as in transformers


def test_log_unique_prompts_keeps_the_first_completion_of_each_prompt() -> None:
    prompts = ["p", "p", "q", "q", [{"role": "user", "content": "r"}]] * 1
    completions = ["a", "b", "c", "d", "e"]
    rewards = torch.arange(5.0)[:, None]  # [N, K=1]
    combined, advantages = torch.arange(5.0), torch.zeros(5)
    rows = completion_rows(prompts, completions, rewards, combined, advantages, ["r"])
    assert [r["completion"] for r in rows] == ["a", "b", "c", "d", "e"]
    rows = completion_rows(
        prompts, completions, rewards, combined, advantages, ["r"], unique_prompts=True
    )
    assert [r["completion"] for r in rows] == ["a", "c", "e"]


def test_disable_tqdm_hides_the_bar_and_defaults_to_the_log_level(tmp_path: Path) -> None:
    run_log = RunLogger(tmp_path, total_steps=3, disable_tqdm=True)
    assert run_log.progress.bar.disable
    run_log.close()
    grpokit_logger = logging.getLogger("grpokit")
    level = grpokit_logger.level
    try:
        grpokit_logger.setLevel(logging.ERROR)
        assert GRPOConfig().disable_tqdm is True  # None: hidden above WARNING, as transformers
        grpokit_logger.setLevel(logging.INFO)
        assert GRPOConfig().disable_tqdm is False
        assert GRPOConfig(disable_tqdm=True).disable_tqdm is True
    finally:
        grpokit_logger.setLevel(level)


def test_process_settings_seed_determinism_tf32_and_log_level() -> None:
    from transformers.utils import logging as hf_logging

    grpokit_logger = logging.getLogger("grpokit")
    level, hf_level = grpokit_logger.level, hf_logging.get_verbosity()
    try:
        build.apply_process_settings(GRPOConfig(seed=3, log_level="error"))
        first = torch.rand(3)
        assert grpokit_logger.level == logging.ERROR and hf_logging.get_verbosity() == logging.ERROR
        build.apply_process_settings(GRPOConfig(seed=3, full_determinism=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.rand(3), first)  # the same seeding either way
    finally:
        torch.use_deterministic_algorithms(False)
        grpokit_logger.setLevel(level)
        hf_logging.set_verbosity(hf_level)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tf32=True needs a CUDA GPU"):
            build.apply_process_settings(GRPOConfig(tf32=True))
        build.apply_process_settings(GRPOConfig(tf32=False))  # nothing to turn off on the CPU


def test_trust_remote_code_reaches_every_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from grpokit.engines.models import load_causal_lm
    from grpokit.rewards.scoring import build_reward_functions

    path = save_tiny_model(str(tmp_path / "tiny"))
    seen: list[tuple[str, Any]] = []
    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def record(klass: Any, *args: Any, _name: str = cls_name, _real: Any = real, **kw: Any):
            seen.append((_name, kw.get("trust_remote_code")))
            return _real(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(record))
    build.load_policy(path, None, GRPOConfig(trust_remote_code=True))
    load_causal_lm(path, trust_remote_code=True)
    build_reward_functions(path, trust_remote_code=True)
    assert {name for name, _ in seen} == {
        "AutoModelForCausalLM",
        "AutoTokenizer",
        "AutoModelForSequenceClassification",
    }
    assert all(value is True for _, value in seen), seen
    seen.clear()
    build.load_policy(path, None, GRPOConfig())
    assert seen and all(value is None for _, value in seen)  # not passed at all by default


def test_use_cache_is_the_policys_training_setting() -> None:
    tokenizer = make_tokenizer()
    for use_cache in (True, False):
        model = build.prepare_model(
            make_causal_lm(tokenizer), None, GRPOConfig(use_cache=use_cache), torch.device("cpu")
        )
        assert model.config.use_cache is use_cache


def test_dict_fields_take_json_strings_as_transformers_does() -> None:
    cfg = GRPOConfig(generation_kwargs='{"no_repeat_ngram_size": 2}', lr_scheduler_kwargs="{}")
    assert cfg.generation_kwargs == {"no_repeat_ngram_size": 2} and cfg.lr_scheduler_kwargs == {}


# ---- epoch / best strategies, evaluation delay, token counts ------------------------------------
def _records(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


def test_epoch_strategies_act_when_a_pass_over_the_prompts_ends(tmp_path: Path) -> None:
    # 4 prompts, 2 per round (4 completions per batch, G=2), one optimizer step per round: a pass
    # over the prompts ends after steps 2 and 4; step 5 is the last step (actions happen then too).
    trainer = make_trainer(
        tmp_path,
        max_steps=5,
        trainer_kwargs={"eval_dataset": Dataset.from_list([{"prompt": "ab"}])},
        per_device_eval_batch_size=2,
        logging_strategy="epoch",
        eval_strategy="epoch",
        save_strategy="epoch",
        include_num_input_tokens_seen=True,
    )
    trainer.train()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [r["epoch"] for r in records] == [1.0, 2.0, 2.5]
    assert all("eval_reward" in r for r in records)
    assert _checkpoints(tmp_path) == [2, 4, 5]
    # The prompt + completion tokens so far, the same count as num_tokens at that step.
    assert records[-1]["num_input_tokens_seen"] == trainer.state.num_input_tokens_seen > 0


def test_logging_strategy_no_and_eval_delay(tmp_path: Path) -> None:
    make_trainer(
        tmp_path,
        max_steps=4,
        trainer_kwargs={"eval_dataset": Dataset.from_list([{"prompt": "ab"}])},
        per_device_eval_batch_size=2,
        logging_strategy="no",  # only the final record
        eval_strategy="steps",
        eval_steps=1,
        eval_delay=3,  # no evaluation before step 3
    ).train()
    records = _records(tmp_path)
    assert [(r["step"], "eval_reward" in r, "loss" in r) for r in records] == [
        (3, True, False),
        (4, True, True),
    ]


def by_step(values: dict[int, float]) -> Any:
    """A reward of `values[global_step]` (plus a small per-completion spread, so that training
    updates the weights): evaluation at step k scores about `values[k]`."""

    def reward(completions: list[str], trainer_state: Any, **kwargs: Any) -> list[float]:
        base = values.get(trainer_state.global_step, 0.0)
        return [base + 0.001 * min(len(c), 9) for c in completions]

    return reward


def test_save_strategy_best_saves_each_improvement(tmp_path: Path) -> None:
    # Evaluations at steps 1-4 score about 0.5, 0.9, 0.2, 0.9: new bests at steps 1 and 2 only
    # (0.9 at step 4 does not beat 0.9 by more than the per-completion spread).
    trainer = make_trainer(
        tmp_path,
        by_step({1: 0.5, 2: 0.9, 3: 0.2, 4: 0.8}),
        max_steps=4,
        trainer_kwargs={"eval_dataset": Dataset.from_list([{"prompt": "ab"}])},
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="best",
        metric_for_best_model="reward",
    )
    trainer.train()
    assert _checkpoints(tmp_path) == [1, 2]
    assert trainer.state.best_global_step == 2 and trainer.args.greater_is_better is True
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert 0.9 <= trainer.state.best_metric < 0.91


def test_load_best_model_at_end_keeps_and_loads_the_best_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    trainer = make_trainer(
        tmp_path,
        by_step({1: 0.9, 2: 0.1, 3: 0.5}),
        max_steps=3,
        trainer_kwargs={"eval_dataset": Dataset.from_list([{"prompt": "ab"}])},
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="reward",
    )
    trainer.train()
    # The best (step 1) survives save_total_limit=1 next to the latest, and is loaded at the end.
    assert _checkpoints(tmp_path) == [1, 3]
    best = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    weights = dict(trainer.model.named_parameters())
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training moved the weights
    for name, value in best.items():
        if name in weights:
            assert torch.equal(weights[name].detach(), value), name


def test_a_metric_the_evaluation_does_not_log_is_named(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        trainer_kwargs={"eval_dataset": Dataset.from_list([{"prompt": "ab"}])},
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        save_strategy="best",
        metric_for_best_model="accuracy",
    )
    with pytest.raises(ValueError, match=r"no 'eval_accuracy'; it logs .*eval_reward"):
        trainer.train()
