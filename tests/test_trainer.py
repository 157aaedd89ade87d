"""End-to-end GRPO runs on tiny in-process models: formats, rewards, losses, LoRA, KL, invariances,
learning, resume, precision and errors. Every run is a few steps of max 6 completion tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.core.losses import LOSS_TYPES
from grpokit.engines.device import device_traits
from grpokit.engines.models import bf16_supported
from grpokit.rewards.scoring import RewardFunctionError
from grpokit.train import checkpoint as ckpt
from grpokit.train.checkpoint import CheckpointError
from grpokit.train.resume import RESUME_FREE_FIELDS, RESUME_LOCKED_FIELDS, ResumeConfigError
from tests.tiny import (
    make_causal_lm,
    make_reward_model,
    make_tokenizer,
    read_metrics,
    save_tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


PLAIN = Dataset.from_list([{"prompt": p, "target": p[-1]} for p in ["ab", "cd", "ef", "gh"]])
CHAT = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": p}], "target": p} for p in ["hi", "yo", "ok", "no"]]
)


def char_sum(completions: list[Any], **kwargs: Any) -> list[float]:
    """A reward that differs between completions (so advantages are non-zero)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(sum(map(ord, t)) % 7) for t in texts]


def count_a(completions: list[str], **kwargs: Any) -> list[float]:
    """Fraction of the completion's characters that are 'a': a tiny model learns it in seconds."""
    return [c.count("a") / max(1, len(c)) for c in completions]


def only_gh_varies(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """char_sum for the prompt "gh", 0 for every other prompt (zero advantages there)."""
    return [
        char_sum([c])[0] if p == "gh" else 0.0 for p, c in zip(prompts, completions, strict=True)
    ]


def make_trainer(
    tmp_path: Path,
    reward: Any = char_sum,
    *,
    dataset: Any = PLAIN,
    model: Any = None,
    tokenizer: Any = None,
    trainer_kwargs: dict | None = None,
    trainer_class: type[GRPOTrainer] = GRPOTrainer,
    **overrides: Any,
) -> GRPOTrainer:
    tok = tokenizer or make_tokenizer()
    config: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    config.update(overrides)
    return trainer_class(
        model if model is not None else make_causal_lm(tok),
        reward,
        args=GRPOConfig(**config),
        train_dataset=dataset,
        processing_class=tok,
        **(trainer_kwargs or {}),
    )


def params(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max((after[k] - before[k]).abs().max().item() for k in before)


# ---- full runs ----------------------------------------------------------------------------------


def test_plain_run_logs_trl_metrics_completions_and_checkpoints(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(
        tmp_path,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        log_completions=True,
        num_completions_to_print=3,
    )
    before = params(trainer)
    state = trainer.train()
    assert state.global_step == 2 and max_change(before, params(trainer)) > 0
    logged = read_metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/char_sum/mean",
        "rewards/char_sum/std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "completions/mean_terminated_length",
        "entropy",
        "clip_ratio/region_mean",
        "learning_rate",
        "grad_norm",
        "loss",
        "step_time",
        "time/generation",
        "time/rewards",
        "time/training",
        "tokens_per_second",
        "num_tokens",
        "epoch",
    ):
        assert key in logged[-1], key
    completions = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 8  # every completion of each logging step's round (4)
    assert {"prompt", "completion", "rewards", "advantage"} <= set(json.loads(completions[0]))
    # save_total_limit=1 keeps only the last checkpoint; it loads with from_pretrained.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert torch.equal(reloaded.lm_head.weight, trainer.model.lm_head.weight)
    assert json.loads((tmp_path / "grpo_config.json").read_text())["num_generations"] == 2


def test_conversational_prompts_reach_rewards_with_columns(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def reward(
        prompts: list,
        completions: list,
        completion_ids: list,
        target: list,
        trainer_state: Any,
        **kwargs: Any,
    ) -> list[float]:
        seen.update(
            prompts=prompts,
            completions=completions,
            ids=completion_ids,
            target=target,
            step=trainer_state.global_step,
        )
        return char_sum(completions)

    trainer = make_trainer(tmp_path, reward, dataset=CHAT, max_steps=1)
    trainer.train()
    assert len(seen["completions"]) == 4 and seen["completions"][0][0]["role"] == "assistant"
    assert seen["prompts"][0] == seen["prompts"][1]  # G=2 consecutive copies of a prompt
    assert seen["target"][0] == seen["prompts"][0][0]["content"]  # columns aligned with prompts
    text = trainer.processing_class.decode(seen["ids"][0], skip_special_tokens=True)
    assert text == seen["completions"][0][0]["content"]
    assert seen["step"] == 0


def test_callables_async_and_reward_model_together(tmp_path: Path) -> None:
    tok = make_tokenizer()

    async def async_len(completions: list[str], **kwargs: Any) -> list[float | None]:
        return [float(len(c)) if i % 2 else None for i, c in enumerate(completions)]

    trainer = make_trainer(
        tmp_path,
        [char_sum, async_len, make_reward_model(tok)],
        tokenizer=tok,
        trainer_kwargs=dict(reward_processing_classes=[None, None, tok]),
        reward_weights=[1.0, 0.5, 2.0],
        max_steps=1,
    )
    trainer.train()
    logged = read_metrics(tmp_path)[-1]
    names = [fn.name for fn in trainer.reward_funcs]
    assert names[:2] == ["char_sum", "async_len"]
    for name in names:
        assert f"rewards/{name}/mean" in logged


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains(tmp_path: Path, loss_type: str) -> None:
    level = "sequence" if loss_type == "luspo" else "token"
    trainer = make_trainer(
        tmp_path,
        loss_type=loss_type,
        importance_sampling_level=level,
        num_iterations=2,
        max_steps=2,
        epsilon_high=0.28,
    )
    before = params(trainer)
    trainer.train()
    logged = read_metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert max_change(before, params(trainer)) > 0


def test_a_registered_loss_type_trains_with_nothing_else_edited(tmp_path: Path) -> None:
    from grpokit.core.losses import LOSS_SPECS, LossInputs, register_loss_type

    # One objective function and one table entry: GRPO's PPO clip with GRPO's per-sequence mean,
    # written from scratch under a new name.
    def clipped(x: LossInputs) -> torch.Tensor:
        o = x.options
        clipped_ratio = x.ratio.clamp(1 - o.epsilon_low, 1 + o.epsilon_high)
        return -torch.min(x.ratio * x.advantages, clipped_ratio * x.advantages)

    spec = register_loss_type("my_grpo", clipped, "sequence_mean", uses_ppo_clip=True)
    try:
        assert spec.divides_by_rows and not spec.sums_over_step and not spec.depends_on_grouping
        runs = {}
        for name in ("grpo", "my_grpo"):
            # Steps of 6 rows (2 prompts x G=3) in micro-batches of 2. Only "gh" gets varied
            # rewards, so each step keeps 3 rows or none: micro-batches of 2 and 1 rows, which
            # must weigh 2/6 and 1/6. Two passes (off-policy ratios, clipping), delta (accepted
            # as uses_ppo_clip), two rounds (one epoch: "gh" is in one of them).
            trainer = make_trainer(
                tmp_path / name,
                only_gh_varies,
                loss_type=name,
                num_generations=3,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=3,
                num_iterations=2,
                max_steps=4,
                delta=4.0,
            )
            runs["start"] = params(trainer)
            trainer.train()
            runs[name] = params(trainer)
        assert max_change(runs["start"], runs["grpo"]) > 1e-3  # a real update
        for key, value in runs["grpo"].items():
            assert torch.equal(runs["my_grpo"][key], value), key
        with pytest.raises(ValueError, match="already registered"):
            register_loss_type("my_grpo", clipped, "sequence_mean")
    finally:
        del LOSS_SPECS["my_grpo"]
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOConfig(loss_type="my_grpo")


def test_lora_trains_adapter_only_and_saves_adapter_and_merged(tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(
        tmp_path,
        beta=0.1,
        max_steps=2,
        trainer_kwargs=dict(
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        ),
    )
    adapted = [m for m in trainer.model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4 and not any(m.cast_input_dtype_enabled for m in adapted)
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert "kl" in read_metrics(tmp_path)[-1]  # reference = base model with the adapter disabled
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    trainer.save_model(str(tmp_path / "merged"), merged=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())


def test_lora_layers_skip_casting_their_input_up_under_autocast() -> None:
    """PEFT casts a LoRA layer's bf16 input to its float32 adapters, which autocast casts
    straight back: skipping that gives the same loss and gradients bit for bit (bf16 -> float32
    -> bf16 is exact), without the two copies a layer. Kept where the model is not all
    float32."""
    from peft import LoraConfig, get_peft_model

    from grpokit.train.build import skip_adapter_input_casts

    tok = make_tokenizer()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(make_causal_lm(tok), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    copies: list[torch.Size] = []

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), _count_float32_casts(copies):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    cast_loss, cast_grads = loss_and_grads()
    cast_copies, copies[:] = len(copies), []
    assert skip_adapter_input_casts(model) == 6  # 3 adapted layers x 2 decoder layers
    loss, grads = loss_and_grads()
    assert torch.equal(loss, cast_loss)
    assert grads.keys() == cast_grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        assert torch.equal(grad, cast_grads[name]), name
    # one float32 copy fewer per adapted layer whose input is bf16: here down_proj's (the MLP's
    # product); q/v take the RMSNorm's float32 output in a plain model (the trainer's norms
    # cast theirs to bf16, `core.norms.cast_norm_outputs`: there every adapted layer's is)
    assert cast_copies - len(copies) == 2 and cast_copies >= 2
    half = get_peft_model(make_causal_lm(tok).to(torch.bfloat16), config)
    assert skip_adapter_input_casts(half) == 0  # a bf16 base: PEFT's casts stay
    dora = get_peft_model(make_causal_lm(tok), LoraConfig(r=4, use_dora=True))
    assert skip_adapter_input_casts(dora) == 0  # DoRA layers keep theirs too
    assert skip_adapter_input_casts(make_causal_lm(tok)) == 0  # not a PEFT model


@contextlib.contextmanager
def _count_float32_casts(seen: list[torch.Size]) -> Iterator[None]:
    """Record the shape of every bf16 tensor cast to float32 by `Tensor.to` meanwhile."""
    real = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(self, *args, **kwargs)
        if self.dtype == torch.bfloat16 and out.dtype == torch.float32:
            seen.append(self.shape)
        return out

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = real  # type: ignore[method-assign]


def test_beta_uses_frozen_reference_and_sync(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        beta=0.1,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
        max_steps=2,
    )
    initial = params(trainer)
    trainer.train()
    kl = [m["kl"] for m in read_metrics(tmp_path)]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the policy equals the reference at step 1
    assert kl[1] > 0
    ref = dict(trainer.ref_model.named_parameters())
    assert all(not p.requires_grad for p in ref.values())
    # After 2 syncs ref = 0.5 * p2 + 0.5 * (0.5 * p1 + 0.5 * p0): strictly between p0 and p2.
    key = "lm_head.weight"
    assert not torch.equal(ref[key], initial[key])
    assert not torch.equal(ref[key], trainer.model.lm_head.weight)


def test_old_logprobs_only_when_off_policy(tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting(GRPOTrainer):
        def compute_logprobs(self, model: Any, batch: Any) -> torch.Tensor:
            calls.append(1)
            return super().compute_logprobs(model, batch)

    make_trainer(tmp_path / "on", max_steps=1, trainer_class=Counting).train()
    assert calls == []  # on-policy, beta=0: no extra forward pass
    make_trainer(tmp_path / "iter", num_iterations=2, max_steps=2, trainer_class=Counting).train()
    assert calls == []  # the first iteration's own forward gives the old log-probs
    logged = read_metrics(tmp_path / "iter")[-1]
    assert logged["ratio/max"] > 1 or logged["ratio/min"] < 1  # second pass is off-policy
    make_trainer(
        tmp_path / "steps", steps_per_generation=2, max_steps=2, trainer_class=Counting
    ).train()
    assert calls == [1]  # two optimizer steps per generation: the second needs the pass


def test_old_logprobs_from_the_first_pass_equal_the_separate_pass(tmp_path: Path) -> None:
    """num_iterations=2: taking the old log-probs from the first optimizer step's forward gives
    the update of a separate no-grad pass (up to float summation order)."""
    runs = {}
    for name, reuse in (("reuse", True), ("pass", False)):
        trainer = make_trainer(tmp_path / name, num_iterations=2, max_steps=4, beta=0.05)
        trainer.old_logprobs_from_first_pass = reuse
        runs["start"] = params(trainer)
        trainer.train()
        runs[name] = params(trainer)
    assert max_change(runs["start"], runs["pass"]) > 1e-3  # the runs did train
    assert max_change(runs["pass"], runs["reuse"]) < 1e-5


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_1x4_equals_4x1(tmp_path: Path, loss_type: str) -> None:
    # Build and train one after the other: each trainer seeds the global RNG when it is built.
    one = make_trainer(
        tmp_path / "a",
        loss_type=loss_type,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
    )
    start = params(one)
    one.train()
    four = make_trainer(
        tmp_path / "b",
        loss_type=loss_type,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=1,
    )
    four.train()
    update_one = {k: v - start[k] for k, v in params(one).items()}
    update_four = {k: v - start[k] for k, v in params(four).items()}
    assert max(u.abs().max().item() for u in update_one.values()) > 1e-3  # a real update
    # Same completions (same seed), same loss; only float summation order differs. Tolerance:
    # 1e-6 absolute on updates of size ~lr = 1e-2.
    for k in update_one:
        torch.testing.assert_close(update_four[k], update_one[k], atol=1e-6, rtol=1e-4)
    assert read_metrics(tmp_path / "a")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "b")[0]["loss"], abs=1e-6
    )


def test_reward_rises_on_a_learnable_task(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        count_a,
        per_device_train_batch_size=16,
        num_generations=8,
        max_steps=14,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
    )
    trainer.train()
    rewards = [m["reward"] for m in read_metrics(tmp_path)]
    # A random 100-token policy emits 'a' ~1% of the time; after 14 steps it prefers 'a'.
    assert sum(rewards[:3]) / 3 < 0.1
    assert sum(rewards[-3:]) / 3 > 0.5


def test_adam_state_exists_before_the_first_step_and_resume_keeps_the_checkpoints(
    tmp_path: Path,
) -> None:
    """The moments are created when training begins (`optimizers.allocate_state`), zero, for
    each trainable parameter; a resumed run starts from the checkpoint's moments instead."""
    seen: list[tuple[int, int, float]] = []

    class AtBegin(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            opt = kwargs["optimizer"]
            moments = [s["exp_avg_sq"] for s in opt.state.values()]
            steps = sum(int(s["step"].item()) for s in opt.state.values())
            seen.append((len(moments), steps, sum(m.abs().sum().item() for m in moments)))

    trainable = sum(1 for p in make_causal_lm(make_tokenizer()).parameters() if p.requires_grad)
    kwargs = {"trainer_kwargs": {"callbacks": [AtBegin()]}, "max_steps": 2}
    make_trainer(tmp_path / "a", save_strategy="steps", save_steps=1, **kwargs).train()
    make_trainer(tmp_path / "b", **kwargs).train(str(tmp_path / "a" / "checkpoint-1"))
    assert seen[0] == (trainable, 0, 0.0)
    assert seen[1][:2] == (trainable, trainable) and seen[1][2] > 0


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = make_trainer(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, value in params(full).items():
        assert torch.equal(value, params(resumed)[name]), name
    # True = the latest checkpoint in output_dir.
    again = make_trainer(tmp_path / "full", max_steps=4)
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 4 and again.state.data_index == full.state.data_index


def test_lora_resume_equals_uninterrupted(tmp_path: Path) -> None:
    from peft import LoraConfig

    def lora() -> dict:
        return dict(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    full = make_trainer(
        tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=1, trainer_kwargs=lora()
    )
    full.train()
    resumed = make_trainer(tmp_path / "resumed", max_steps=2, trainer_kwargs=lora())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    for name, value in params(full).items():
        assert torch.equal(value, params(resumed)[name]), name


def test_sync_ref_model_is_inside_the_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    sync = dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=1, **sync)
    full.train()
    manifest = json.loads((tmp_path / "full" / "checkpoint-1" / "manifest.json").read_text())
    assert "ref_model.safetensors" in manifest["files"]  # sealed with the rest, not added after
    resumed = make_trainer(tmp_path / "resumed", **sync)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    for name, value in params(full).items():
        assert torch.equal(value, params(resumed)[name]), name
    for a, b in zip(full.ref_model.parameters(), resumed.ref_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_true_skips_a_torn_newest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=1)
    full.train()
    # A full disk left the newest trainer_state.json empty (0 bytes).
    (tmp_path / "full" / "checkpoint-2" / "trainer_state.json").write_text("")
    again = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=1)
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        again.train(resume_from_checkpoint=True)
    assert "checkpoint-2: torn file trainer_state.json (0 bytes" in caplog.text
    for name, value in params(full).items():
        assert torch.equal(value, params(again)[name]), name
    # A path that does not verify is refused, not skipped.
    (tmp_path / "full" / "checkpoint-1" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint-1: torn file optimizer\.pt"):
        make_trainer(tmp_path / "x").train(str(tmp_path / "full" / "checkpoint-1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_trainer(tmp_path / "x").train(str(tmp_path / "full" / "checkpoint-9"))


def test_fresh_run_into_another_runs_folder_is_refused_unless_overwrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1).train()
    with pytest.raises(CheckpointError, match="holds checkpoints of another run") as error:
        make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    assert "resume_from_checkpoint=True" in str(error.value)
    assert "overwrite_output_dir=True" in str(error.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        make_trainer(
            tmp_path, max_steps=1, save_strategy="steps", overwrite_output_dir=True
        ).train()
    assert (
        "deleting" in caplog.text and "checkpoint-2 (a valid checkpoint of step 2)" in caplog.text
    )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]  # the new run's only


def test_resume_drops_metrics_and_completions_past_the_checkpoint(tmp_path: Path) -> None:
    log = dict(save_strategy="steps", save_steps=2, log_completions=True, max_steps=4)
    make_trainer(tmp_path, **log).train()
    resumed = make_trainer(tmp_path, **log)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    rows = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4


def test_resume_config_field_sets_cover_every_config_field() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert not RESUME_FREE_FIELDS & RESUME_LOCKED_FIELDS
    unclassified = fields - RESUME_FREE_FIELDS - RESUME_LOCKED_FIELDS
    assert not unclassified, f"classify {unclassified} in grpokit/train/resume.py"
    assert fields == (RESUME_FREE_FIELDS | RESUME_LOCKED_FIELDS)


def test_resume_refuses_optimisation_changes_listing_each(tmp_path: Path) -> None:
    make_trainer(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2).train()
    changed = make_trainer(
        tmp_path / "resumed", max_steps=4, learning_rate=5e-3, num_generations=4, seed=3
    )
    with pytest.raises(ResumeConfigError) as error:
        changed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    message = str(error.value)
    for change in ("learning_rate: 0.01 -> 0.005", "num_generations: 2 -> 4", "seed: 0 -> 3"):
        assert change in message
    assert "resume_config_changes='apply'" in message and "--apply_config_changes" in message
    assert not (tmp_path / "resumed" / "metrics.jsonl").exists()  # refused before anything ran
    # Logging, saving and evaluation settings may change freely.
    free = make_trainer(
        tmp_path / "free", max_steps=4, logging_steps=2, save_strategy="steps", save_steps=1
    )
    free.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert free.state.global_step == 4


def test_applied_learning_rate_takes_effect_from_the_resumed_step(tmp_path: Path) -> None:
    make_trainer(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "full" / "checkpoint-2")
    frozen = make_trainer(
        tmp_path / "zero", max_steps=4, learning_rate=0.0, resume_config_changes="apply"
    )
    frozen.train(resume_from_checkpoint=checkpoint)
    # learning_rate 0: AdamW (and its decoupled weight decay) leaves the weights of step 2.
    at_step_2 = make_trainer(tmp_path / "x", max_steps=4)
    ckpt.load_model_weights(at_step_2.model, checkpoint)
    for name, value in params(at_step_2).items():
        assert torch.equal(value, params(frozen)[name]), name
    # A new peak learning rate follows this run's linear schedule from step 2: after step 3 the
    # lr is 5e-3 * (4 - 3) / 4 = 1.25e-3 (the checkpoint's schedule would give 1e-2 / 4).
    halved = make_trainer(
        tmp_path / "half", max_steps=4, learning_rate=5e-3, resume_config_changes="apply"
    )
    halved.train(resume_from_checkpoint=checkpoint)
    lrs = {m["step"]: m["learning_rate"] for m in read_metrics(tmp_path / "half")}
    assert lrs[3] == pytest.approx(1.25e-3) and lrs[4] == 0.0
    assert halved.optimizer.param_groups[0]["initial_lr"] == 5e-3


def test_max_steps_from_num_train_epochs(tmp_path: Path) -> None:
    # 4 prompts, 2 prompts per generation batch (4 completions / G=2) -> 2 rounds per epoch.
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=1.5)
    assert trainer.max_steps == 3
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.epoch == 1.5


def test_bf16_autocast_small_lr_still_changes_fp32_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        trainer = make_trainer(
            tmp_path,
            model=model,
            tokenizer=tok,
            bf16=True,
            learning_rate=1e-6,
            max_steps=1,
            max_grad_norm=None,
        )
    assert "upcasting to float32" in caplog.text
    assert trainer.use_bf16 == bf16_supported()
    before = params(trainer)
    assert all(p.dtype == torch.float32 for p in before.values())
    trainer.train()
    after = params(trainer)
    assert all(p.dtype == torch.float32 for p in after.values())
    # Adam's first step moves each parameter with a gradient by ~lr = 1e-6: far below bf16's
    # resolution (~0.4% of a weight), yet the float32 master weights change.
    change = max_change(before, after)
    assert 1e-7 < change < 1e-5


def test_evaluate_logs_eval_metrics_without_changing_training(tmp_path: Path) -> None:
    with_eval = make_trainer(
        tmp_path / "e",
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        trainer_kwargs=dict(eval_dataset=CHAT),
    )
    with_eval.train()
    logged = read_metrics(tmp_path / "e")
    assert "eval_reward" in logged[0] and "eval_completions/mean_length" in logged[0]
    plain = make_trainer(tmp_path / "p")
    plain.train()
    for name, value in params(plain).items():
        assert torch.equal(value, params(with_eval)[name]), name


def test_eval_on_start_and_at_the_end(tmp_path: Path) -> None:
    # eval_steps=10 is never crossed in 2 steps: the only evaluations are at the start (step 0,
    # its own record) and at the end (merged into the last step's record).
    trainer = make_trainer(
        tmp_path,
        eval_strategy="steps",
        eval_steps=10,
        eval_on_start=True,
        per_device_eval_batch_size=4,
        trainer_kwargs=dict(eval_dataset=PLAIN),
    )
    trainer.train()
    logged = read_metrics(tmp_path)
    assert [m["step"] for m in logged] == [0, 1, 2]
    assert "eval_reward" in logged[0] and "reward" not in logged[0]
    assert "eval_reward" not in logged[1]
    assert "eval_reward" in logged[2] and "reward" in logged[2]
    # eval_on_start alone evaluates once, at the start.
    start_only = make_trainer(
        tmp_path / "s",
        eval_on_start=True,
        per_device_eval_batch_size=4,
        trainer_kwargs=dict(eval_dataset=PLAIN),
    )
    start_only.train()
    assert [("eval_reward" in m) for m in read_metrics(tmp_path / "s")] == [True, False, False]


def test_prompt_length_policies(tmp_path: Path) -> None:
    data = Dataset.from_list([{"prompt": "x" * 20}, {"prompt": "ab"}, {"prompt": "cd"}])
    skip = make_trainer(
        tmp_path / "s",
        dataset=data,
        max_prompt_length=5,
        prompt_length_policy="skip",
        max_steps=1,
        shuffle_dataset=False,
    )
    prompts, ids, _ = skip.sample_prompts()
    assert prompts == ["ab", "ab", "cd", "cd"] and skip.state.prompts_over_length == 1
    cut = make_trainer(
        tmp_path / "t", dataset=data, max_prompt_length=5, max_steps=1, shuffle_dataset=False
    )
    _, ids, _ = cut.sample_prompts()
    assert len(ids[0]) == 5 and cut.state.prompts_over_length == 1
    only_long = Dataset.from_list([{"prompt": "x" * 20}])
    never = make_trainer(
        tmp_path / "n", dataset=only_long, max_prompt_length=5, prompt_length_policy="skip"
    )
    with pytest.raises(ValueError, match="max_prompt_length"):
        never.train()


def test_mask_truncated_completions_removes_them_from_the_loss(tmp_path: Path) -> None:
    # EOS is suppressed, so every completion is truncated: masked out, the loss is 0 and nothing
    # moves; without masking the same batch updates the weights.
    no_eos = {"suppress_tokens": [make_tokenizer().eos_token_id]}
    masked = make_trainer(
        tmp_path / "m", mask_truncated_completions=True, max_steps=1, generation_kwargs=no_eos
    )
    before = params(masked)
    masked.train()
    logged = read_metrics(tmp_path / "m")[0]
    assert logged["completions/clipped_ratio"] == 1.0
    assert logged["loss"] == 0.0 and max_change(before, params(masked)) == 0.0
    unmasked = make_trainer(tmp_path / "u", max_steps=1, generation_kwargs=no_eos)
    unmasked.train()
    assert max_change(before, params(unmasked)) > 0


def test_model_given_as_path(tmp_path: Path) -> None:
    path = save_tiny_model(str(tmp_path / "tiny"))
    trainer = GRPOTrainer(
        path,
        char_sum,
        args=GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=4,
            max_steps=1,
            bf16=False,
            save_strategy="no",
        ),
        train_dataset=PLAIN,
    )
    assert trainer.processing_class.eos_token == "<|im_end|>"
    trainer.train()


# ---- errors -------------------------------------------------------------------------------------


def test_reward_function_that_raises_names_itself(tmp_path: Path) -> None:
    def broken(completions: list[str], **kwargs: Any) -> list[float]:
        raise RuntimeError("boom")

    with pytest.raises(RewardFunctionError, match="broken"):
        make_trainer(tmp_path, broken, max_steps=1).train()


def test_reward_function_wrong_count(tmp_path: Path) -> None:
    def short(completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0]

    with pytest.raises(RewardFunctionError, match="short"):
        make_trainer(tmp_path, short, max_steps=1).train()


def test_missing_prompt_column(tmp_path: Path) -> None:
    data = Dataset.from_list([{"question": "ab"}, {"question": "cd"}])
    with pytest.raises(KeyError, match="prompt"):
        make_trainer(tmp_path, dataset=data, max_steps=1).train()


def test_bad_trainer_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward_weights has 2 entries"):
        make_trainer(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="GRPOConfig"):
        GRPOTrainer(make_causal_lm(make_tokenizer()), char_sum, args={"lr": 1}, train_dataset=PLAIN)
    with pytest.raises(ValueError, match="model_init_kwargs"):
        make_trainer(tmp_path, model_init_kwargs={"dtype": "float32"})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="need an eval_dataset"):
        make_trainer(tmp_path, eval_strategy="steps")
    with pytest.raises(ValueError, match="need an eval_dataset"):
        make_trainer(tmp_path, eval_on_start=True)


# ---- rollout importance sampling ----------------------------------------------------------------


class MismatchedEngine:
    """Samples with the policy but reports the log-probs of another model, as an inference engine
    whose numerics differ from the trainer's would (`sampling_logprobs` != the policy's)."""

    def __init__(self, policy: Any, tokenizer: Any) -> None:
        from grpokit.engines.transformers_engine import TransformersEngine

        self.inner = TransformersEngine(policy, tokenizer)
        self.other = make_causal_lm(tokenizer, seed=7)

    def generate(self, prompt_ids: list[list[int]], **kwargs: Any) -> Any:
        from grpokit.core.logprobs import model_completion_logprobs

        gen = self.inner.generate(prompt_ids, **kwargs)
        t = gen.completion_ids.shape[1]
        with torch.no_grad():
            logprobs, _ = model_completion_logprobs(
                self.other,
                torch.cat([gen.prompt_ids, gen.completion_ids], dim=1),
                torch.cat([gen.prompt_mask, gen.completion_mask], dim=1),
                t,
            )  # [N, T]
        gen.sampling_logprobs = logprobs * gen.completion_mask  # 0 at padding
        return gen

    def update_weights(self, model: Any) -> None:
        self.inner.update_weights(model)


def mismatched_trainer(tmp_path: Path, **overrides: Any) -> GRPOTrainer:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = MismatchedEngine(model, tok)
    return make_trainer(
        tmp_path,
        model=model,
        tokenizer=tok,
        trainer_kwargs=dict(generation_engine=engine),
        **overrides,
    )


def test_rollout_importance_weights_enter_the_loss(tmp_path: Path) -> None:
    from grpokit.core.logprobs import model_completion_logprobs

    trainer = mismatched_trainer(
        tmp_path,
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=1.2,
    )
    _, prompt_ids, _ = trainer.sample_prompts()
    gen = trainer.generate(prompt_ids)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch = trainer.build_rollout_batch(gen, advantages)
    num_items = batch.loss_mask.sum().float()
    loss, metrics, *_ = trainer.micro_batch_loss(batch, num_items)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()

    # By hand. On-policy dapo: ratio = 1, so the per-token loss is -A * w with the detached
    # truncated weight w = min(pi_train / pi_rollout, 1.2) = min(exp(logp - sampling_logp), 1.2);
    # the loss is sum_it(-A_i w_it mask_it) / num_items, and its gradient that of
    # sum_it(-A_i w_it logp_it mask_it) / num_items.
    input_ids, attention_mask, t = batch.trimmed(slice(0, 4))
    logp, _ = model_completion_logprobs(trainer.model, input_ids, attention_mask, t)  # [4, T']
    mask = batch.loss_mask[:, :t].float()  # [4, T']
    w = (logp.detach() - gen.sampling_logprobs[:, :t]).exp().clamp(max=1.2) * mask
    assert metrics["rollout_is/logprob_abs_diff/mean"] > 0.05  # the engines really disagree
    assert ((w < 1.2) & (mask > 0)).any() and ((w == 1.2) & (mask > 0)).any()  # some capped
    expected = -(advantages[:, None] * w * mask).sum() / num_items
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)
    (-(advantages[:, None] * w * logp * mask).sum() / num_items).backward()
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)

    # Without the correction the weight is 1: the loss is -sum(A mask) / num_items.
    trainer.args.vllm_importance_sampling_correction = False
    plain_loss, plain_metrics, *_ = trainer.micro_batch_loss(batch, num_items)
    torch.testing.assert_close(
        plain_loss.detach(), -(advantages[:, None] * mask).sum() / num_items, atol=1e-6, rtol=1e-5
    )
    assert "rollout_is/mean" not in plain_metrics


def test_rollout_importance_sampling_run_logs_its_metrics(tmp_path: Path) -> None:
    # Off-policy (two passes): the weight uses the old log-probs, computed before the update.
    trainer = mismatched_trainer(tmp_path, num_iterations=2, max_steps=2)
    trainer.train()
    logged = read_metrics(tmp_path)[-1]
    for key in ("rollout_is/mean", "rollout_is/frac_modified", "rollout_is/logprob_abs_diff/max"):
        assert key in logged, key
    assert logged["rollout_is/logprob_abs_diff/max"] > 0


# ---- exact speed-ups: trimmed micro-batches, zero-advantage skipping, length buckets ------------


class TakeGradients(TrainerCallback):
    """Takes the step's gradients before the optimizer sees them, so the weights do not move."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for name, p in kwargs["model"].named_parameters():
            self.grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None  # AdamW skips a parameter without a gradient


def step_gradients(trainer: GRPOTrainer, batch: Any) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the gradients (unclipped: use max_grad_norm=None) of one optimizer step over
    the whole batch; the weights stay unchanged."""
    take = TakeGradients()
    trainer.add_callback(take)
    out = trainer.optimizer_step(batch, range(0, batch.size))
    trainer.remove_callback(take)
    return out["loss"], take.grads


def count_grad_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows at each call of `module` with gradients on, by 1 when autocast's cache
    of weight casts is on and 0 when off. A pre-hook: a checkpointed recomputation stops once it
    has what backward needs (torch's early stop), before forward hooks would run."""
    calls: list[int] = []
    module.register_forward_pre_hook(
        lambda *a: (
            calls.append(int(torch.is_autocast_cache_enabled()))
            if torch.is_grad_enabled()
            else None
        )
    )
    return calls


def off_policy_batch(trainer: GRPOTrainer, advantages: torch.Tensor) -> Any:
    """A rollout batch of varied lengths with old log-probs 0.1-ish away (ratios clip)."""
    _, prompt_ids, _ = trainer.sample_prompts()
    generated = trainer.generate(prompt_ids)
    # Cut the completions to varied lengths (sampled lengths depend on the random stream).
    for row, length in enumerate([8, 3, 5, 8, 2, 6, 4, 7] * 4):
        if row < generated.completion_mask.shape[0]:
            generated.completion_mask[row, length:] = 0
    batch = trainer.build_rollout_batch(generated, advantages)
    current = trainer.compute_logprobs(trainer.model, batch)
    noise = 0.15 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    batch.old_logprobs = (current + noise) * batch.completion_mask
    return batch


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_skipping_zero_advantages_and_buckets_equal_the_plain_step(
    tmp_path: Path, loss_type: str
) -> None:
    # 8 rows in micro-batches of 2; rows 1-3, 6, 7 have advantage exactly 0 (row 1 alone in its
    # micro-batch: bnpo keeps row 0 with its own token denominator; the 3 kept rows make a
    # micro-batch of 1, scaled by 1/2 for the per-row means).
    overrides = dict(
        loss_type=loss_type,
        importance_sampling_level="sequence" if loss_type == "luspo" else "token",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_completion_length=8,
        max_grad_norm=None,
    )
    advantages = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, -0.5, 0.0, 0.0])
    fast = make_trainer(tmp_path / "fast", **overrides)
    batch = off_policy_batch(fast, advantages)
    lengths = batch.completion_mask.sum(1)
    assert lengths.unique().numel() > 1  # buckets have something to sort
    fast_loss, fast_grads = step_gradients(fast, batch)
    plain = make_trainer(tmp_path / "plain", **overrides)
    plain.skip_zero_advantage = plain.bucket_by_length = False
    plain_loss, plain_grads = step_gradients(plain, batch)
    # Same rows, same denominators; only float summation order and matmul shapes differ.
    # Tolerance: 1e-6 absolute on gradients of size ~1e-2.
    assert abs(fast_loss - plain_loss) < 1e-6
    assert max(g.abs().max().item() for g in plain_grads.values()) > 1e-3
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tmp_path: Path) -> None:
    # One optimizer step of 2 micro-batches of 4 rows. Checkpointed, each decoder layer runs a
    # second time in the backward pass (calls with gradients on: 2 -> 4), and the update is
    # the plain one up to float summation order (the recomputed forward is the same arithmetic).
    overrides = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        max_steps=1,
    )
    runs = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        trainer = make_trainer(tmp_path / name, gradient_checkpointing=checkpointing, **overrides)
        trainer.share_prompts = False  # one forward per micro-batch in both runs
        calls = count_grad_calls(trainer.model.model.layers[0])
        start = params(trainer)
        trainer.train()
        update = {k: v - start[k] for k, v in params(trainer).items()}
        runs[name] = (update, len(calls), read_metrics(tmp_path / name)[0]["loss"])
    (plain, plain_calls, plain_loss), (ckpt_update, ckpt_calls, ckpt_loss) = runs.values()
    assert (plain_calls, ckpt_calls) == (2, 4)
    assert max(u.abs().max().item() for u in plain.values()) > 1e-3  # a real update
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    for key, value in plain.items():
        torch.testing.assert_close(ckpt_update[key], value, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "cispo"])
def test_max_forward_tokens_splits_the_forward_and_keeps_the_update(
    tmp_path: Path, loss_type: str
) -> None:
    # One optimizer step over 8 rows in micro-batches of 4. A limit of one row's width makes
    # every row its own forward (decoder-layer calls with gradients on: 2 -> 8); the loss and
    # gradients are the unsplit step's up to float summation order.
    overrides = dict(
        loss_type=loss_type,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        max_grad_norm=None,
    )
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.5, -0.5, 0.7, -0.2])
    runs = {}
    for name, limit in (("whole", None), ("split", 1)):
        trainer = make_trainer(tmp_path / name, max_forward_tokens=limit, **overrides)
        batch = off_policy_batch(trainer, advantages)
        calls = count_grad_calls(trainer.model.model.layers[0])
        loss, grads = step_gradients(trainer, batch)
        runs[name] = (loss, grads, len(calls))
    (whole_loss, whole, whole_calls), (split_loss, split, split_calls) = runs.values()
    assert (whole_calls, split_calls) == (2, 8)
    assert abs(split_loss - whole_loss) < 1e-6
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-4)


def test_max_forward_tokens_auto_is_the_devices_bound(tmp_path: Path) -> None:
    from grpokit.train.build import ActivationBound, resolve_activation_bound

    # The default "auto" with float32 compute is the CPU's float32 bound (768 tokens), on any
    # CPU (recomputing pays under bf16 autocast only); None and a number are taken as given.
    auto = make_trainer(tmp_path / "auto")
    assert auto.max_forward_tokens == 768
    assert auto.activation_bound.recompute is False
    assert auto.model.is_gradient_checkpointing is False
    assert make_trainer(tmp_path / "none", max_forward_tokens=None).max_forward_tokens is None
    assert make_trainer(tmp_path / "n", max_forward_tokens=64).max_forward_tokens == 64
    gpu = dataclasses.replace(
        device_traits("cpu"),
        type="cuda",
        max_forward_tokens=None,
        float32_forward_tokens=None,
        recompute_activations=False,
    )
    for bf16 in (True, False):
        bound = resolve_activation_bound(GRPOConfig(), gpu, bf16=bf16)
        assert (bound.max_forward_tokens, bound.recompute) == (None, False)
    given = resolve_activation_bound(GRPOConfig(max_forward_tokens=64), bf16_cpu(), bf16=True)
    assert given == ActivationBound(64, False, "max_forward_tokens=64")
    for bad in (0, -3, "512", 1.5, True):
        with pytest.raises(ValueError, match=r"^max_forward_tokens must be a positive integer"):
            GRPOConfig(max_forward_tokens=bad)


# One optimizer step of 2 micro-batches of 4 rows under bf16 autocast.
BF16_STEP: dict[str, Any] = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_completion_length=8,
    max_steps=1,
    bf16=True,
)


def bf16_cpu(recompute: bool = True, kept: int = 0) -> Any:
    """This CPU's rules, as on a CPU with native bf16 (whatever this one has), whose "auto"
    recomputes activations (`DeviceTraits.recompute_activations`) or not; `kept`: its
    `kept_activation_size` (0 = every forward recomputes in every layer under "auto")."""
    traits = device_traits("cpu")
    return dataclasses.replace(
        traits, native_bf16=True, recompute_activations=recompute, kept_activation_size=kept
    )


def on_bf16_cpu(monkeypatch: pytest.MonkeyPatch, recompute: bool = True, kept: int = 0) -> None:
    """Trainers built next take their CPU to have native bf16 (bf16 autocast) and "auto" to
    recompute activations there or not (`kept`: see `bf16_cpu`)."""
    from grpokit.train import build
    from grpokit.train import trainer as trainer_module

    traits = bf16_cpu(recompute, kept)
    monkeypatch.setattr(trainer_module, "device_traits", lambda device: traits)
    monkeypatch.setattr(build, "device_traits", lambda device=None: traits)


def test_auto_with_native_bf16_recomputes_only_where_it_pays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from grpokit.train.build import resolve_activation_bound

    traits = bf16_cpu()
    assert traits.max_forward_tokens == 512
    with caplog.at_level(logging.INFO, logger="grpokit"):
        bound = resolve_activation_bound(GRPOConfig(), traits, bf16=True)
    assert (bound.max_forward_tokens, bound.recompute) == (None, True)
    logged = [r.getMessage() for r in caplog.records if "training forwards" in r.getMessage()]
    assert logged == [f"training forwards: {bound.describe()}"]
    assert logged[0].startswith("training forwards: recomputed activations, one forward per")
    # Each case that keeps a token bound without recomputing: (bound, recompute).
    cases = {
        "float32 compute": (GRPOConfig(), dict(bf16=False), 768),
        "no checkpointing": (GRPOConfig(), dict(bf16=True, model=torch.nn.Linear(2, 2)), 512),
    }
    for name, (args, kwargs, tokens) in cases.items():
        bound = resolve_activation_bound(args, traits, **kwargs)
        assert (bound.max_forward_tokens, bound.recompute) == (tokens, False), name
    # The user's gradient_checkpointing=True: as on any CPU, 512 tokens and checkpointing.
    user = GRPOConfig(gradient_checkpointing=True)
    no_recompute = dataclasses.replace(traits, recompute_activations=False)
    for device in (traits, no_recompute):
        bound = resolve_activation_bound(user, device, bf16=True)
        assert (bound.max_forward_tokens, bound.recompute) == (512, True)


def test_frozen_gradient_bytes_counts_the_weights_training_leaves_unchanged() -> None:
    from peft import LoraConfig

    from grpokit.train.build import frozen_gradient_bytes

    model = make_causal_lm(make_tokenizer())
    total = sum(p.numel() for p in model.parameters())
    assert frozen_gradient_bytes(model) == 0  # a full fine-tune: every weight trains
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    assert frozen_gradient_bytes(model, lora) == 4 * total  # PEFT freezes the whole base model
    assert frozen_gradient_bytes(model, lora, shards=2) == 2 * total  # sharded gradients
    head = model.get_output_embeddings().weight
    head.requires_grad_(False)  # frozen by the user (tied to the input embedding here)
    assert frozen_gradient_bytes(model) == 4 * head.numel()
    head.ds_numel = 3 * head.numel()  # a ZeRO-3 partition counts its whole size
    assert frozen_gradient_bytes(model) == 12 * head.numel()


def test_a_lora_run_keeps_more_activations_than_a_full_fine_tune(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from peft import LoraConfig

    on_bf16_cpu(monkeypatch, kept=960)  # 5 tokens of the tiny model (2 layers x 96)
    model = make_causal_lm(make_tokenizer())
    frozen = sum(p.numel() for p in model.parameters())  # PEFT freezes all of these
    widened = min(960, 4 * frozen // 14)  # float32 gradients, KEPT_ACTIVATION_BYTES a unit
    assert widened == 960  # the tiny model's gradients are far more than the kept size: doubled
    full = make_trainer(tmp_path / "full", max_forward_tokens="auto", **BF16_STEP)
    assert full.activation_bound.keep_up_to == 5
    lora = make_trainer(
        tmp_path / "lora",
        model=model,
        max_forward_tokens="auto",
        trainer_kwargs=dict(peft_config=LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")),
        **BF16_STEP,
    )
    assert lora.activation_bound.keep_up_to == (960 + widened) // 192 == 10
    assert "(capped at double)" in lora.activation_bound.reason


def test_auto_with_native_bf16_keeps_the_activations_of_forwards_up_to_a_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from grpokit.train.build import ActivationBound, activation_width, resolve_activation_bound

    tok = make_tokenizer()
    model = make_causal_lm(tok)  # 2 layers, hidden 32, MLP 64
    assert activation_width(model) == (2, 32 + 64)
    assert activation_width(torch.nn.Linear(2, 2)) is None  # no config
    traits = bf16_cpu(kept=1000)
    with caplog.at_level(logging.INFO, logger="grpokit"):
        bound = resolve_activation_bound(GRPOConfig(), traits, bf16=True, model=model)
    assert (bound.max_forward_tokens, bound.recompute) == (None, True)
    assert (bound.keep_up_to, bound.layers) == (5, 2)  # 1000 // (2 * 96) tokens, 2 layers
    assert (
        "activations kept by forwards of at most 5 tokens (a larger micro-batch split into "
        "forwards of whole prompts that fit), above that by as many" in caplog.text
    )
    assert [bound.recomputes(n) for n in (1, 5, 6, 500)] == [False, False, True, True]
    # Above 5 tokens the last layers keep 10 token-layers' worth: 1 layer up to 10 tokens.
    assert [bound.kept_layers(n) for n in (5, 6, 10, 11, 500)] == [2, 1, 1, 0, 0]
    assert ActivationBound(None, True, "no size").kept_layers(6) == 0
    assert not bound.agreed  # each process by its own forward's size
    # Under DeepSpeed the same bound, judged by the processes' largest size.
    with caplog.at_level(logging.INFO, logger="grpokit"):
        deepspeed = resolve_activation_bound(
            GRPOConfig(), traits, bf16=True, model=model, agree_forwards=True
        )
    assert deepspeed == dataclasses.replace(bound, agreed=True)
    assert "sized by the largest of the processes' sizes" in caplog.text
    # Every forward recomputes: no model to size, no kept size, and the user's
    # gradient_checkpointing (its token bound, as on any CPU), with or without DeepSpeed.
    cases = {
        "deepspeed user": (
            GRPOConfig(gradient_checkpointing=True),
            dict(model=model, agree_forwards=True),
            traits,
        ),
        "no model": (GRPOConfig(), {}, traits),
        "no kept size": (GRPOConfig(), dict(model=model), bf16_cpu(kept=0)),
        "user": (GRPOConfig(gradient_checkpointing=True), dict(model=model), traits),
    }
    for name, (args, kwargs, device) in cases.items():
        other = resolve_activation_bound(args, device, bf16=True, **kwargs)
        assert other.recompute and other.keep_up_to is None and not other.agreed, name
        assert other.recomputes(1) and other.kept_layers(1) == 0, name
    # Weights the run does not train free their float32 gradients' bytes, which widen the kept
    # size (KEPT_ACTIVATION_BYTES a unit), at most to double: (1000 + 7000 // 14) // 192 = 7
    # tokens, then (1000 + 1000) // 192 = 10 however many more.
    with caplog.at_level(logging.INFO, logger="grpokit"):
        wider = resolve_activation_bound(
            GRPOConfig(), traits, bf16=True, model=model, frozen_gradient_bytes=7000
        )
    assert (wider.keep_up_to, wider.layers) == (7, 2)
    assert "widened by 0 MiB of frozen weights' gradients" in caplog.text
    capped = resolve_activation_bound(
        GRPOConfig(), traits, bf16=True, model=model, frozen_gradient_bytes=10**9
    )
    assert capped.keep_up_to == 10 and "(capped at double)" in capped.reason
    assert "widened" not in bound.reason
    # A bound without recomputation keeps every forward's activations; a number is as given.
    assert not ActivationBound(None, False, "given").recomputes(10**9)
    given = resolve_activation_bound(GRPOConfig(max_forward_tokens=64), traits, bf16=True)
    assert given == ActivationBound(64, False, "max_forward_tokens=64")


def test_recomputed_forwards_and_their_backward_run_within_recomputed_layers(
    tmp_path: Path,
) -> None:
    # With the decoder layers recomputing their activations (gradient_checkpointing), every
    # attention call with gradients, in a training forward and in its recomputation during
    # backward, runs within `core.attention.recomputed_layers` (which may take the
    # materialised path where SDPA would run: the two must agree); without recomputation none.
    from transformers import AttentionInterface

    from grpokit.core import attention

    seen: dict[bool, list[tuple[bool, bool]]] = {}
    try:
        for checkpointing in (False, True):
            calls: list[tuple[bool, bool]] = []

            def spy(*args: Any, calls: list = calls, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():  # (within the setting, within a backward pass)
                    in_backward = torch._C._current_graph_task_id() >= 0
                    calls.append((attention.in_recomputed_layers(), in_backward))
                return attention.grouped_attention(*args, **kwargs)

            trainer = make_trainer(
                tmp_path / str(checkpointing),
                gradient_checkpointing=checkpointing,
                max_forward_tokens=None,
                max_steps=1,
            )
            assert trainer.activation_bound.recompute is checkpointing
            # what the layers call (the trainer registered grouped_attention when built)
            AttentionInterface.register(attention.NAME, spy)
            trainer.train()
            seen[checkpointing] = calls
    finally:
        attention.register()  # grouped_attention itself again
    assert seen[False] and not any(within for within, _ in seen[False])
    assert {in_backward for _, in_backward in seen[True]} == {False, True}
    assert all(within for within, _ in seen[True])


@pytest.mark.bf16_kernels
def test_auto_with_native_bf16_keeps_small_forwards_and_shares_their_prompts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One optimizer step of 2 micro-batches of 4 rows (2 prompts x 2 completions each) under
    # bf16 autocast. With every forward within `keep_up_to`, "auto" on a CPU with native bf16
    # forwards each micro-batch as the plain path does: no recomputation, autocast's cache of
    # weight casts on, each prompt forwarded once (2 calls per micro-batch: the prompts, then
    # the completions); the same update. With `keep_up_to` below the forwards' size the
    # prompts are still shared, and every layer recomputes (each pass and its recomputation: 8
    # calls, no cache), or with one layer's worth of activations (`kept_layers`) the last of the
    # 2 layers keeps its completion pass's activations (its prompt pass recomputes: 6 calls, no
    # cache) and the first recomputes; the last layer's completion-pass attention runs outside
    # `core.attention.recomputed_layers`, every other call within. Either way the layers are
    # left checkpointed between forwards.
    from grpokit.core import attention
    from grpokit.train import trainer as trainer_module
    from grpokit.train.build import ActivationBound, LayerRecompute

    on_bf16_cpu(monkeypatch, kept=10**9)
    real = trainer_module.model_completion_logprobs
    real_plan = trainer_module.plan_micro_batches
    runs = {}
    planned: dict[str, list[Any]] = {}
    within: dict[str, tuple[set[bool], set[bool]]] = {}
    for name, tokens, keep_up_to in (
        ("plain", None, None),
        ("kept", "auto", None),
        ("big", "auto", 0),
        ("partial", "auto", 0),
    ):
        trainer = make_trainer(tmp_path / name, max_forward_tokens=tokens, **BF16_STEP)
        bound = trainer.activation_bound
        assert bound.recompute is (name != "plain")
        if keep_up_to is not None:
            trainer.activation_bound = dataclasses.replace(bound, keep_up_to=keep_up_to)
        elif name == "kept":
            assert (bound.keep_up_to, bound.layers) == (10**9 // (2 * (32 + 64)), 2)
        if name == "partial":
            monkeypatch.setattr(ActivationBound, "kept_layers", lambda self, tokens: 1)
        assert trainer.model.is_gradient_checkpointing is (name != "plain")
        shared: list[bool] = []

        def spy(*args: Any, shared: list = shared, **kwargs: Any) -> Any:
            # whether this training forward could share prompts, as the trainer asked
            shared.append(kwargs["share_prompts"])
            return real(*args, **kwargs)

        planned[name] = []

        def plan_spy(*args: Any, seen: list = planned[name], **kwargs: Any) -> Any:
            # the token count up to which the plan takes a micro-batch to share its prompts
            seen.append(kwargs["share_up_to"])
            return real_plan(*args, **kwargs)

        monkeypatch.setattr(trainer_module, "model_completion_logprobs", spy)
        monkeypatch.setattr(trainer_module, "plan_micro_batches", plan_spy)
        first, last = trainer.model.model.layers
        calls = (count_grad_calls(first), count_grad_calls(last))
        flags: tuple[set[bool], set[bool]] = (set(), set())
        for layer, seen in zip((first, last), flags, strict=True):  # within recomputed_layers
            layer.self_attn.register_forward_pre_hook(
                lambda *a, seen=seen: (
                    seen.add(attention.in_recomputed_layers()) if torch.is_grad_enabled() else None
                )
            )
        start = params(trainer)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing is (name != "plain")
        update = {k: v - start[k] for k, v in params(trainer).items()}
        runs[name] = (update, calls, shared, read_metrics(tmp_path / name)[0]["loss"])
        within[name] = flags
    monkeypatch.undo()
    (plain, plain_calls, plain_shared, plain_loss) = runs["plain"]
    (kept, kept_calls, kept_shared, kept_loss) = runs["kept"]
    (big, big_calls, big_shared, big_loss) = runs["big"]
    (partial, partial_calls, partial_shared, partial_loss) = runs["partial"]
    assert plain_calls == kept_calls == ([1] * 4, [1] * 4)
    assert big_calls == ([0] * 8, [0] * 8)
    assert partial_calls == ([0] * 8, [0] * 6)
    assert plain_shared == kept_shared == big_shared == partial_shared == [True] * 2
    assert within["plain"] == within["kept"] == ({False}, {False})
    assert within["big"] == ({True}, {True})
    assert within["partial"] == ({True}, {True, False})
    # every forward shares (None), or those within keep_up_to do
    kept_size = 10**9 // (2 * (32 + 64))
    assert planned == {"plain": [None], "kept": [kept_size], "big": [0], "partial": [0]}
    assert max(u.abs().max().item() for u in plain.values()) > 1e-3  # a real update
    for loss in (kept_loss, big_loss, partial_loss):
        assert loss == pytest.approx(plain_loss, abs=1e-6)
    # the same update as the plain path where no layer recomputes, and as each other where
    # some do (AdamW's first step turns a gradient's sign into a step of the learning rate,
    # so a gradient within rounding of 0, summed in another order, may step either way)
    for update, same in ((kept, plain), (partial, big)):
        for key, value in same.items():
            torch.testing.assert_close(update[key], value, atol=1e-6, rtol=1e-4)
    # the switch itself: off within the block (or for the last layers only), restored after, a
    # no-op when not asked
    model = make_causal_lm(make_tokenizer())
    model.gradient_checkpointing_enable()
    switch = LayerRecompute(model)
    assert len(switch.layers) == 2
    with switch.off():
        assert model.is_gradient_checkpointing is False
        assert not any(layer.gradient_checkpointing for layer in switch.layers)
    for layers, flagged in ((0, [True, True]), (1, [True, False]), (2, [False, False])):
        with switch.keep(layers):
            assert [layer.gradient_checkpointing for layer in switch.layers] == flagged
            assert model.model.gradient_checkpointing is True  # the model's own flag stays
    with switch.off(False):
        assert model.is_gradient_checkpointing is True
    assert model.is_gradient_checkpointing is True
    assert all(layer.gradient_checkpointing for layer in switch.layers)


def test_log_prob_passes_run_the_layers_unchecked_and_share_prompts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The old log-probs of an off-policy update come from the policy without gradients: a
    # checkpointed policy ("auto" with native bf16 here) runs its layers unchecked there, so
    # its prompts are shared, and the layers are checkpointed again after; the log-probs are
    # those of a policy that never checkpoints.
    from grpokit.core.logprobs import prompt_sharing_supported
    from grpokit.train import trainer as trainer_module

    on_bf16_cpu(monkeypatch)
    real = trainer_module.model_completion_logprobs
    seen: list[tuple[bool, bool]] = []

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((model.is_gradient_checkpointing, kwargs["share_prompts"]))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "model_completion_logprobs", spy)
    out = {}
    for name, tokens in (("plain", None), ("auto", "auto")):
        trainer = make_trainer(tmp_path / name, max_forward_tokens=tokens, **BF16_STEP)
        trainer.model.train()
        batch = trainer.build_rollout_batch(
            trainer.generate(trainer.sample_prompts()[1]), torch.ones(8)
        )
        seen.clear()
        out[name] = trainer.compute_logprobs(trainer.model, batch)
        assert seen == [(False, True)] * 2, name  # 2 micro-batches of 4 rows
        assert trainer.model.is_gradient_checkpointing is (name == "auto")
        assert prompt_sharing_supported(trainer.model)  # checkpointed layers take the cache
    assert out["plain"].abs().sum() > 0
    torch.testing.assert_close(out["auto"], out["plain"], atol=0, rtol=0)


@pytest.mark.bf16_kernels
def test_auto_with_native_bf16_checkpoints_and_gives_the_plain_update(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One optimizer step of 2 micro-batches of 4 rows under bf16 autocast. "auto" with native
    # bf16 forwards each micro-batch whole and checkpoints the decoder layers (calls with gradients
    # on: 2 -> 4); the update is the plain path's (one forward per micro-batch, nothing
    # recomputed) up to float summation order: the recomputed forward is the same arithmetic.
    on_bf16_cpu(monkeypatch)
    runs = {}
    for name, tokens in (("plain", None), ("auto", "auto")):
        trainer = make_trainer(tmp_path / name, max_forward_tokens=tokens, **BF16_STEP)
        trainer.share_prompts = False  # one forward per micro-batch (checkpointing shares none)
        assert trainer.use_bf16 is True
        assert trainer.max_forward_tokens is None
        assert trainer.activation_bound.recompute is (name == "auto")
        assert trainer.model.is_gradient_checkpointing is (name == "auto")
        calls = count_grad_calls(trainer.model.model.layers[0])
        start = params(trainer)
        trainer.train()
        update = {k: v - start[k] for k, v in params(trainer).items()}
        runs[name] = (update, calls, read_metrics(tmp_path / name)[0]["loss"])
    (plain, plain_calls, plain_loss), (auto, auto_calls, auto_loss) = runs.values()
    # recomputing, autocast keeps no cache of weight casts (DeviceTraits.autocast)
    assert (plain_calls, auto_calls) == ([1, 1], [0, 0, 0, 0])
    assert max(u.abs().max().item() for u in plain.values()) > 1e-3  # a real update
    assert auto_loss == pytest.approx(plain_loss, abs=1e-6)
    for key, value in plain.items():
        torch.testing.assert_close(auto[key], value, atol=1e-6, rtol=1e-4)


@pytest.mark.bf16_kernels
def test_auto_with_native_bf16_leaves_a_users_gradient_checkpointing_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # gradient_checkpointing=True decides as on a CPU where "auto" would not recompute:
    # 512-token forwards, checkpointed, as many decoder-layer calls with gradients on.
    calls = {}
    for recompute in (False, True):
        on_bf16_cpu(monkeypatch, recompute)
        trainer = make_trainer(
            tmp_path / str(recompute), gradient_checkpointing=True, bf16=True, max_steps=1
        )
        assert trainer.use_bf16 is True
        assert trainer.max_forward_tokens == 512
        assert trainer.activation_bound.recompute is True
        assert trainer.model.is_gradient_checkpointing is True
        counted = count_grad_calls(trainer.model.model.layers[0])
        trainer.train()
        calls[recompute] = len(counted)
    assert calls[True] == calls[False] > 0


@pytest.mark.bf16_kernels
def test_auto_with_native_bf16_recomputes_under_lora(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The adapter trains through checkpointed layers whose embedding is frozen: the same
    # adapter update as without recomputation, and only the adapter changes.
    from peft import LoraConfig

    on_bf16_cpu(monkeypatch)
    runs = {}
    for name, tokens in (("plain", None), ("auto", "auto")):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        trainer = make_trainer(
            tmp_path / name,
            max_forward_tokens=tokens,
            max_steps=1,
            bf16=True,
            trainer_kwargs=dict(peft_config=lora),
        )
        assert trainer.is_peft
        trainer.share_prompts = False  # one forward per micro-batch (checkpointing shares none)
        base = trainer.model.get_base_model()
        assert base.is_gradient_checkpointing is (name == "auto")
        calls = count_grad_calls(base.model.layers[0])
        start = params(trainer)
        trainer.train()
        runs[name] = ({k: v - start[k] for k, v in params(trainer).items()}, len(calls))
    (plain, plain_calls), (auto, auto_calls) = runs.values()
    assert auto_calls == 2 * plain_calls > 0
    changed = {k for k, u in auto.items() if u.abs().max().item() > 0}
    assert changed and all("lora_" in k for k in changed)
    assert max(u.abs().max().item() for u in plain.values()) > 1e-3
    for key, value in plain.items():
        torch.testing.assert_close(auto[key], value, atol=1e-6, rtol=1e-4)


def test_all_zero_advantages_step_like_the_plain_path(tmp_path: Path) -> None:
    # No row trains, yet AdamW still steps on a zero gradient (its step count and weight decay).
    runs = {}
    for name, skip in (("fast", True), ("plain", False)):
        trainer = make_trainer(tmp_path / name, weight_decay=0.1, max_steps=1)
        trainer.skip_zero_advantage = skip
        batch = trainer.build_rollout_batch(
            trainer.generate(trainer.sample_prompts()[1]), torch.zeros(4)
        )
        trainer.optimizer_step(batch, range(0, 4))
        step = next(iter(trainer.optimizer.state.values()))["step"]
        runs[name] = (params(trainer), float(step))
    assert runs["fast"][1] == runs["plain"][1] == 1.0
    for key, value in runs["plain"][0].items():
        torch.testing.assert_close(runs["fast"][0][key], value, atol=0, rtol=0)


def test_plan_micro_batches_by_hand() -> None:
    from grpokit.core.losses import LossOptions
    from grpokit.train.microbatch import plan_micro_batches

    adv = torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0, 2.0])
    completion_mask = torch.tensor([[1] * k + [0] * (4 - k) for k in (1, 4, 2, 3, 2, 1)])
    loss_mask = completion_mask.clone()

    def plan(loss_type: str, **kw: Any) -> list[tuple[list[int], float]]:
        options = LossOptions(
            loss_type=loss_type, beta=kw.pop("beta", 0.0), top_entropy_quantile=kw.pop("q", 1.0)
        )
        out = plan_micro_batches(adv, completion_mask, loss_mask, range(0, 6), 2, options, **kw)
        assert all(m.num_items_in_batch.item() == 13 for m in out)  # the step's 13 loss tokens
        return [(m.rows.tolist(), m.loss_weight) for m in out]

    # R = 6 rows in micro-batches of 2.
    # dapo: rows 1, 4, 5 kept, sorted by length (4, 2, 1 tokens -> 5, 4, 1); the losses divide
    # by the step's tokens and sum: weight 1.
    assert plan("dapo") == [([5, 4], 1.0), ([1], 1.0)]
    # grpo: the same rows; the step's loss is the mean over its 6 rows, so k rows weigh k/6.
    assert plan("grpo") == [([5, 4], pytest.approx(2 / 6)), ([1], pytest.approx(1 / 6))]
    # bnpo keeps the plain micro-batches, each 2/6 of the step: [0,1] keeps row 1 (4 of its 5
    # tokens), [2,3] is skipped, [4,5] keeps both (3 of 3 tokens).
    assert plan("bnpo") == [([1], pytest.approx(2 / 6 * 4 / 5)), ([4, 5], pytest.approx(2 / 6))]
    # beta != 0 or a top-entropy filter couples the rows: the plain path.
    assert plan("dapo", beta=0.1, bucket_by_length=False) == [
        ([0, 1], 1.0), ([2, 3], 1.0), ([4, 5], 1.0)
    ]  # fmt: skip
    third = pytest.approx(1 / 3)
    assert plan("grpo", q=0.5) == [([0, 1], third), ([2, 3], third), ([4, 5], third)]
    # max_tokens: [5, 4] is 2 rows x 2 tokens (its longest completion) = 4 tokens; a limit of 3
    # splits it into single rows, a limit of 4 keeps it. grpo's rows keep weighing 1/6 each.
    sixth = pytest.approx(1 / 6)
    assert plan("dapo", max_tokens=3) == [([5], 1.0), ([4], 1.0), ([1], 1.0)]
    assert plan("dapo", max_tokens=4) == [([5, 4], 1.0), ([1], 1.0)]
    assert plan("grpo", max_tokens=3) == [([5], sixth), ([4], sixth), ([1], sixth)]
    # With prompts of 1 token, [5, 4] holds 2 x (1 + 2) = 6 tokens: a limit of 4 splits it.
    prompts = torch.ones(6, 1, dtype=torch.long)
    assert plan("dapo", max_tokens=4, prompt_mask=prompts) == [([5], 1.0), ([4], 1.0), ([1], 1.0)]
    # bnpo keeps its plain micro-batches whatever the limit.
    assert plan("bnpo", max_tokens=1) == plan("bnpo")


def test_split_by_tokens_by_hand() -> None:
    from grpokit.train.microbatch import split_by_tokens

    rows = torch.arange(5)
    completions = torch.tensor([3, 1, 4, 2, 2])
    prompts = torch.tensor([2, 1, 1, 1, 2])
    # width = longest prompt 2 + longest completion 4 = 6; 12 tokens hold 2 rows: 3 parts 2/2/1.
    parts = split_by_tokens(rows, 12, completions, prompts)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p.tolist() for p in split_by_tokens(rows, 30, completions, prompts)] == [rows.tolist()]
    # A limit below one row's width: one row per part. None: no split.
    assert len(split_by_tokens(rows, 2, completions, prompts)) == 5
    assert split_by_tokens(rows, None, completions)[0] is rows
    # Completions only: width 4, 8 tokens hold 2 rows.
    assert [len(p) for p in split_by_tokens(rows, 8, completions)] == [2, 2, 1]


def test_split_by_tokens_counts_a_shared_prompt_once() -> None:
    from grpokit.train.microbatch import split_by_tokens

    rows = torch.arange(6)
    completions = torch.tensor([2, 3, 1, 2, 4, 1])
    prompts = torch.tensor([10, 10, 10, 8, 8, 8])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # Every row with its prompt: width 10 + 4 = 14, so 28 tokens hold 2 rows: 3 parts.
    assert [len(p) for p in split_by_tokens(rows, 28, completions, prompts)] == [2, 2, 2]
    # Shared: the whole step is 2 prompts x 10 + 6 rows x 4 = 44 tokens; halves are one
    # prompt each, 10 + 3 x 3 = 19 and 8 + 3 x 4 = 20.
    assert [p.tolist() for p in split_by_tokens(rows, 44, completions, prompts, groups)] == [
        rows.tolist()
    ]
    parts = split_by_tokens(rows, 20, completions, prompts, groups)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    # 19 tokens: the second half no longer fits (8 + 3 x 4 = 20); three or four near-equal parts
    # put rows 2 and 3 together (two prompts: 2 x 10 + 2 x 2 = 24); five parts fit.
    parts = split_by_tokens(rows, 19, completions, prompts, groups)
    assert [p.tolist() for p in parts] == [[0, 1], [2], [3], [4], [5]]
    # Below one row's width: one row per part.
    assert len(split_by_tokens(rows, 3, completions, prompts, groups)) == 6


def test_buckets_keep_a_prompts_rows_together_when_that_forwards_fewer_tokens() -> None:
    from grpokit.core.losses import LossOptions
    from grpokit.train.microbatch import plan_micro_batches

    # 4 rows, 2 prompts (rows 0, 2 and 1, 3), micro-batches of 2; completion lengths 1, 2, 8, 9.
    lengths = torch.tensor([1, 2, 8, 9])
    completion_mask = (torch.arange(9)[None, :] < lengths[:, None]).long()  # [4, 9]
    groups = torch.tensor([0, 1, 0, 1])
    options = LossOptions(loss_type="dapo")

    def plan(prompt_length: int, **kw: Any) -> list[list[int]]:
        prompt_mask = torch.ones(4, prompt_length, dtype=torch.long)
        out = plan_micro_batches(
            torch.ones(4), completion_mask, completion_mask, range(0, 4), 2, options,
            prompt_mask=prompt_mask, **kw,
        )  # fmt: skip
        return [m.rows.tolist() for m in out]

    # Short prompts (1 token): by length, [0, 1] and [2, 3] forward 2 + 2x2 + 2 + 2x9 = 26
    # tokens, by prompt [0, 2] and [1, 3] 1 + 2x8 + 1 + 2x9 = 36.
    assert plan(1, prompt_groups=groups) == [[0, 1], [2, 3]]
    # Long prompts (20 tokens): by length 2x20 + 4 + 2x20 + 18 = 102, by prompt 20 + 16 + 20 +
    # 18 = 74: each micro-batch holds one prompt.
    assert plan(20, prompt_groups=groups) == [[0, 2], [1, 3]]
    assert plan(20) == [[0, 1], [2, 3]]  # every row forwards its prompt: by length
    # Only forwards of at most `share_up_to` tokens share (those that keep their activations).
    # 37: [0, 2] shares (36), [1, 3] does not (38 -> 2 x 29): by prompt 36 + 58 = 94 against
    # by length 44 + 58 = 102 (two prompts each: nothing shared).
    assert plan(20, prompt_groups=groups, share_up_to=37) == [[0, 2], [1, 3]]
    # 30: by prompt, neither micro-batch fits (36, 38) and each is one prompt: 2 x 28 + 2 x 29
    # = 114 unshared. By length, [0, 1] (44) and [2, 3] (48) each split into their prompts,
    # forwards that fit and keep their activations: 21 + 22 + 28 + 29 = 100.
    assert plan(20, prompt_groups=groups, share_up_to=30) == [[0], [1], [2], [3]]


def test_a_micro_batch_above_the_kept_bound_is_split_into_whole_prompts() -> None:
    from grpokit.core.losses import LossOptions
    from grpokit.train.microbatch import plan_micro_batches

    # 6 rows of 3 prompts (2 rows each), one micro-batch; prompts of 10 tokens, completions of
    # 4: one forward sharing its prompts holds 3 x 10 + 6 x 4 = 54 tokens.
    completion_mask = torch.ones(6, 4, dtype=torch.long)
    prompt_mask = torch.ones(6, 10, dtype=torch.long)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])

    def plan(share_up_to: int | None, loss_type: str = "dapo") -> list[tuple[list[int], float]]:
        out = plan_micro_batches(
            torch.ones(6), completion_mask, completion_mask, range(0, 6), 6,
            LossOptions(loss_type=loss_type), prompt_mask=prompt_mask, prompt_groups=groups,
            share_up_to=share_up_to, bucket_by_length=False,
        )  # fmt: skip
        return [(m.rows.tolist(), m.loss_weight) for m in out]

    assert plan(None) == [([0, 1, 2, 3, 4, 5], 1.0)]  # every forward shares
    assert plan(54) == [([0, 1, 2, 3, 4, 5], 1.0)]  # it fits
    # 40: whole prompts packed in order, 2 x 10 + 4 x 4 = 36 then 10 + 2 x 4 = 18
    assert plan(40) == [([0, 1, 2, 3], 1.0), ([4, 5], 1.0)]
    assert plan(20) == [([0, 1], 1.0), ([2, 3], 1.0), ([4, 5], 1.0)]  # 18 each
    # 17: one prompt's rows alone do not fit (18): one forward, which recomputes
    assert plan(17) == [([0, 1, 2, 3, 4, 5], 1.0)]
    # a loss over rows weighs each part by its rows (n / R), as any split of a micro-batch
    assert plan(40, "grpo") == [([0, 1, 2, 3], 4 / 6), ([4, 5], 2 / 6)]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="dapo"),
        dict(loss_type="grpo", beta=0.04, max_forward_tokens=40),
        dict(loss_type="bnpo", num_iterations=2),
    ],
    ids=["dapo", "grpo-kl-bounded", "bnpo-two-passes"],
)
def test_shared_prompts_give_the_plain_step(tmp_path: Path, overrides: dict[str, Any]) -> None:
    # One optimizer step of 8 rows (4 prompts x 2) with and without forwarding each prompt once;
    # with beta the reference pass shares too, and a token bound splits micro-batches by
    # the shared count (more rows per forward than without).
    config = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        max_grad_norm=None,
        **overrides,
    )
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0])
    # Prompts of 16 characters and completions of at most 8: keeping a prompt's rows together
    # forwards fewer tokens than sorting them by completion length (microbatch._bucketed).
    long_prompts = Dataset.from_list([{"prompt": p * 8, "target": p[-1]} for p in PLAIN["prompt"]])
    runs = {}
    for share in (True, False):
        trainer = make_trainer(tmp_path / str(share), dataset=long_prompts, **config)
        trainer.share_prompts = share
        assert trainer._shares_prompts() is share
        batch = off_policy_batch(trainer, advantages)  # reference log-probs with beta
        shapes: list[tuple[int, ...]] = []
        trainer.model.get_input_embeddings().register_forward_hook(
            lambda module, args, out, seen=shapes: seen.append(tuple(args[0].shape))
        )
        runs[share] = (*step_gradients(trainer, batch), batch.ref_logprobs, shapes)
    (shared_loss, shared_grads, shared_ref, shapes), (plain_loss, plain_grads, plain_ref, _) = (
        runs.values()
    )
    assert any(rows < 4 for rows, _ in shapes)  # prompts forwarded once per micro-batch
    assert abs(shared_loss - plain_loss) < 1e-6
    if plain_ref is not None:
        torch.testing.assert_close(shared_ref, plain_ref, atol=2e-6, rtol=0)
    assert max(g.abs().max().item() for g in plain_grads.values()) > 1e-3
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_trimmed_micro_batch_equals_the_full_width_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpokit.train.rollout import RolloutBatch

    # Micro-batches of 2: rows 0-1 share the short prompt, so their left padding is trimmed.
    trainer = make_trainer(
        tmp_path,
        max_completion_length=12,
        per_device_train_batch_size=2,
        steps_per_generation=2,
        max_grad_norm=None,
    )
    trainer.bucket_by_length = False
    data = Dataset.from_list([{"prompt": p} for p in ["a", "a much longer prompt"]])
    trainer.sampler = type(trainer.sampler)(data, seed=0, shuffle=False)
    batch = off_policy_batch(trainer, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    input_ids, _, _ = batch.trimmed(slice(0, 2))
    assert input_ids.shape[1] < batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    trimmed_loss, trimmed_grads = step_gradients(trainer, batch)

    def full_width(self: RolloutBatch, rows: slice) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = torch.cat([self.prompt_ids[rows], self.completion_ids[rows]], dim=1)
        mask = torch.cat([self.prompt_mask[rows], self.completion_mask[rows]], dim=1)
        return ids, mask, int(self.completion_ids.shape[1])

    monkeypatch.setattr(RolloutBatch, "trimmed", full_width)
    full_loss, full_grads = step_gradients(trainer, batch)
    assert abs(trimmed_loss - full_loss) < 1e-6
    for name, grad in full_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_fused_and_loop_adamw_give_the_same_update():
    # optim="adamw_torch_fused" (the default, as transformers') and "adamw_torch" are the same
    # algorithm; one step from the same gradients must agree to float32 rounding.
    from grpokit.train.build import make_optimizer

    updated = []
    for optim in ("adamw_torch_fused", "adamw_torch"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = make_optimizer(layer, GRPOConfig(output_dir="unused", optim=optim, weight_decay=0.1))
        layer(torch.randn(3, 8)).pow(2).sum().backward()
        opt.step()
        updated.append([p.detach().clone() for p in layer.parameters()])
    for fused, loop in zip(*updated, strict=True):
        torch.testing.assert_close(fused, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("attention", "expected"),
    [("auto", "grpokit_grouped"), (None, "sdpa"), ("eager", "eager")],
)
def test_attention_setting_reaches_the_policy_and_reference(
    tmp_path: Path, attention: str | None, expected: str
) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    model.set_attn_implementation("sdpa")
    trainer = make_trainer(tmp_path, model=model, tokenizer=tok, attention=attention, beta=0.1)
    assert trainer.model.config._attn_implementation == expected
    assert trainer.ref_model is not None
    assert trainer.ref_model.config._attn_implementation == expected
