"""TRL's `GRPOTrainer(optimizers=..., quantization_config=...)`: a user's optimizer and schedule
step exactly as built, mismatched ones are refused before training, and QLoRA trains a LoRA
adapter on a bitsandbytes 4-bit model (on the CPU here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from tests.test_trainer import make_trainer, read_metrics
from tests.tiny import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class StepRecorder(TrainerCallback):
    """Each optimizer step's weights before, the gradients it applies (after clipping) and the
    weights after."""

    def __init__(self) -> None:
        self.steps: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.steps.append(
            {
                "before": {n: p.detach().clone() for n, p in model.named_parameters()},
                "grad": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_user_sgd_and_lambda_schedule_give_the_hand_computed_weights(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    recorder = StepRecorder()
    trainer = make_trainer(
        tmp_path,
        model=model,
        tokenizer=tok,
        trainer_kwargs=dict(optimizers=(optimizer, scheduler), callbacks=[recorder]),
    )
    assert trainer.optimizer is optimizer and trainer.scheduler is scheduler
    trainer.train()
    # SGD without momentum: w' = w - lr_k * g, lr_k = 0.1 * 0.5**k at the k-th step (k = 0, 1).
    assert len(recorder.steps) == 2
    for k, step in enumerate(recorder.steps):
        lr = 0.1 * 0.5**k
        assert max(g.abs().max().item() for g in step["grad"].values()) > 0
        for name, before in step["before"].items():
            expected = before - lr * step["grad"][name]
            torch.testing.assert_close(step["after"][name], expected, atol=1e-7, rtol=0)
    # The logged learning rate is the schedule's after each step: 0.1 * 0.5, 0.1 * 0.25.
    assert [m["learning_rate"] for m in read_metrics(tmp_path)] == [0.05, 0.025]


def test_user_optimizer_without_scheduler_gets_the_configured_schedule(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    trainer = make_trainer(
        tmp_path,
        model=model,
        tokenizer=tok,
        lr_scheduler_type="linear",
        trainer_kwargs=dict(optimizers=(optimizer, None)),
    )
    # transformers' linear schedule on the user's optimizer: its lr, down to 0 at max_steps = 2.
    assert trainer.scheduler.optimizer is optimizer
    assert trainer.scheduler.get_last_lr() == [0.3]
    trainer.scheduler.step()
    assert trainer.scheduler.get_last_lr() == [0.15]


def test_mismatched_optimizers_are_refused_before_training(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model, other = make_causal_lm(tok), make_causal_lm(tok, seed=1)
    out = tmp_path / "out"

    def build(optimizers: Any) -> None:
        make_trainer(out, model=model, tokenizer=tok, trainer_kwargs=dict(optimizers=optimizers))

    with pytest.raises(ValueError, match=r"holds \d+ tensor\(s\) that are not parameters"):
        build((torch.optim.SGD(other.parameters(), lr=0.1), None))
    head = [p for n, p in model.named_parameters() if n.startswith("lm_head")]
    with pytest.raises(ValueError, match=r"trainable parameter.*not in the optimizer.*'model"):
        build((torch.optim.SGD(head, lr=0.1), None))
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(other.parameters(), lr=1), abs)
    with pytest.raises(ValueError, match="scheduler steps another optimizer"):
        build((mine, theirs))
    with pytest.raises(ValueError, match="built from args"):
        build((None, torch.optim.lr_scheduler.LambdaLR(mine, abs)))
    with pytest.raises(TypeError, match="pair"):
        build(mine)
    assert not out.exists()  # nothing was written


def test_optimizer_built_before_peft_wrapping_is_refused(tmp_path: Path) -> None:
    from peft import LoraConfig

    tok = make_tokenizer()
    model = make_causal_lm(tok)
    with pytest.raises(ValueError, match=r"wrap the model with peft\.get_peft_model yourself"):
        make_trainer(
            tmp_path,
            model=model,
            tokenizer=tok,
            trainer_kwargs=dict(
                optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
            ),
        )


# ---- quantization_config ------------------------------------------------------------------------
def save_64_wide_model(path: Path) -> str:
    """A tiny model whose layers are 64 wide: bitsandbytes' 4-bit CPU layout needs multiples of
    its block size (64)."""
    tok = make_tokenizer()
    make_causal_lm(tok, hidden_size=64, intermediate_size=128).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_qlora_trains_the_adapter_on_a_4bit_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    model_path = save_64_wide_model(tmp_path / "model")
    trainer = make_trainer(
        tmp_path / "run",
        model=model_path,
        tokenizer=make_tokenizer(),
        beta=0.04,  # the reference is the quantized base with the adapter disabled
        trainer_kwargs=dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
            ),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        ),
    )
    quantized = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 7 and trainer.ref_model is None
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    lora = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert all(frozen[n].dtype == torch.float32 for n in lora)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    # Every adapter weight of both layers trained (after a generation pass, which on an
    # AVX512-BF16 CPU would otherwise cut the gradient to layer 0); the 4-bit base did not move.
    for name, before in frozen.items():
        changed = not torch.equal(after[name].detach(), before)
        assert changed == (name in lora), name
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_quantization_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    four_bit = BitsAndBytesConfig(load_in_4bit=True)
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    model_path = save_64_wide_model(tmp_path / "model")

    def build(model: Any = model_path, **kwargs: Any) -> None:
        make_trainer(tmp_path / "out", model=model, tokenizer=make_tokenizer(), **kwargs)

    with pytest.raises(ValueError, match="already an instance"):
        build(make_causal_lm(make_tokenizer()), trainer_kwargs=dict(quantization_config=four_bit))
    with pytest.raises(ValueError, match="pass peft_config"):
        build(trainer_kwargs=dict(quantization_config=four_bit))
    with pytest.raises(ValueError, match="both as a GRPOTrainer argument and in"):
        build(
            model_init_kwargs={"quantization_config": {"load_in_8bit": True}},
            trainer_kwargs=dict(quantization_config=four_bit, peft_config=lora),
        )
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match="`pip install bitsandbytes`"):
        build(trainer_kwargs=dict(quantization_config=four_bit, peft_config=lora))
    with pytest.raises(ValueError, match="`pip install bitsandbytes`"):  # TRL's dict form too
        build(
            model_init_kwargs={"quantization_config": {"load_in_4bit": True}},
            trainer_kwargs=dict(peft_config=lora),
        )
    assert not (tmp_path / "out").exists()
