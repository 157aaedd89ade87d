"""Entropy regularisation by hand: TRL's entropy bonus, its gradient, its token set under the
top-entropy filter, the loss it makes with `policy_loss`, the adaptive coefficient over a sequence
of steps; then in the trainer: a step's gradient over micro-batches, the logged coefficient and a
resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpokit.core.entropy import EntropyRegularization, entropy_bonus
from grpokit.core.logprobs import model_completion_logprobs
from grpokit.core.losses import LossOptions, policy_loss
from grpokit.core.masking import masked_mean
from grpokit.train.config import GRPOConfig
from grpokit.train.microbatch import select_rows
from tests.test_trainer import make_trainer, off_policy_batch, params, read_metrics, step_gradients

# Two rows; the second has a padding position holding garbage (9.9).
ENTROPIES = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.3, 9.9]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_bonus_is_the_mean_over_loss_tokens_and_its_gradient_one_over_their_count() -> None:
    h = ENTROPIES.clone().requires_grad_(True)
    bonus, tokens = entropy_bonus(h, MASK)
    # (0.5 + 1.0 + 2.0 + 1.5 + 0.3) / 5 = 5.3 / 5 = 1.06
    assert bonus.item() == pytest.approx(1.06) and tokens.item() == 5
    bonus.backward()
    expected = torch.tensor([[0.2, 0.2, 0.2], [0.2, 0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(h.grad, expected)


def test_bonus_follows_the_top_entropy_filter() -> None:
    # Loss-token entropies sorted: 0.3, 0.5, 1.0, 1.5, 2.0. top_entropy_quantile = 0.4 keeps the
    # tokens >= the 0.6 quantile: index 0.6 * 4 = 2.4 -> 1.0 + 0.4 * (1.5 - 1.0) = 1.2, so 2.0 and
    # 1.5: bonus (2.0 + 1.5) / 2 = 1.75, gradient 1/2 on those two tokens.
    h = ENTROPIES.clone().requires_grad_(True)
    bonus, tokens = entropy_bonus(h, MASK, LossOptions(top_entropy_quantile=0.4))
    assert bonus.item() == pytest.approx(1.75) and tokens.item() == 2
    bonus.backward()
    expected = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(h.grad, expected)


def test_no_tokens_gives_zero_bonus() -> None:
    bonus, tokens = entropy_bonus(ENTROPIES, torch.zeros(2, 3))
    assert bonus.item() == 0.0 and tokens.item() == 0


def test_regularised_loss_gradient_by_hand() -> None:
    # One row, two tokens, on-policy dapo: policy loss = -(A + A) / 2 with A = 0.5, and
    # d/dlogp = -A / 2 = -0.25 per token. With entropy_coef 0.1 the loss is
    # -0.5 - 0.1 * (0.8 + 1.2) / 2 = -0.6, and d/dH = -0.1 / 2 = -0.05 per token.
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([[0.8, 1.2]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 2)
    options = LossOptions()
    loss, _ = policy_loss(logp, None, torch.tensor([0.5]), mask, options, entropies=h.detach())
    total = loss - 0.1 * entropy_bonus(h, mask, options)[0]
    assert total.item() == pytest.approx(-0.6)
    total.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25]], dtype=torch.float64))
    torch.testing.assert_close(h.grad, torch.tensor([[-0.05, -0.05]], dtype=torch.float64))


def test_adaptive_coefficient_sequence_by_hand() -> None:
    rule = EntropyRegularization(
        coef=0.02, adaptive=True, coef_min=0.0, coef_max=0.035, coef_delta=0.01, target=1.2
    )
    assert rule.enabled
    # (step entropy, coefficient applied during the step, coefficient after it):
    expected = [
        (1.5, 0.0, 0.01),  # no measurement yet -> 0; 1.5 > 1.2 -> 0.02 - 0.01
        (0.9, 0.0, 0.02),  # last 1.5 > target -> 0; 0.9 <= 1.2 -> 0.01 + 0.01
        (0.8, 0.02, 0.03),  # last 0.9 <= target -> applied; up again
        (1.3, 0.03, 0.02),  # applied; 1.3 > 1.2 -> down
        (1.0, 0.0, 0.03),  # last 1.3 > target -> 0; up
        (0.5, 0.03, 0.035),  # up, capped at coef_max
        (2.0, 0.035, 0.025),
        (2.0, 0.0, 0.015),
        (2.0, 0.0, 0.005),
        (2.0, 0.0, 0.0),  # floored at coef_min
    ]
    coef, last = rule.coef, None
    for entropy, applied, after in expected:
        assert rule.applied(coef, last) == pytest.approx(applied)
        coef, last = rule.updated(coef, entropy), entropy
        assert coef == pytest.approx(after)


def test_static_coefficient_never_moves() -> None:
    rule = EntropyRegularization(coef=0.05)
    assert rule.enabled and rule.applied(0.05, None) == 0.05
    assert rule.updated(0.05, 0.0) == 0.05 and rule.updated(0.05, 9.0) == 0.05
    assert not EntropyRegularization().enabled
    assert EntropyRegularization(adaptive=True).enabled  # a zero coefficient may rise


def test_config_fields_and_errors() -> None:
    cfg = GRPOConfig(
        entropy_coef=0.01,
        use_adaptive_entropy=True,
        entropy_coef_min=0.001,
        entropy_coef_max=0.1,
        entropy_coef_delta=0.002,
        entropy_target=3.0,
    )
    assert cfg.entropy_regularization() == EntropyRegularization(0.01, True, 0.001, 0.1, 0.002, 3.0)
    defaults = GRPOConfig().entropy_regularization()  # TRL's defaults: off
    assert defaults == EntropyRegularization(0.0, False, 0.0, 1.0, 0.005, 0.2)
    with pytest.raises(ValueError, match="entropy_coef_min"):
        GRPOConfig(entropy_coef_min=0.5, entropy_coef_max=0.1)
    with pytest.raises(ValueError, match="entropy_coef_delta"):
        GRPOConfig(entropy_coef_delta=-0.1)
    with pytest.raises(ValueError, match="entropy_target"):
        GRPOConfig(entropy_target=float("nan"))


# ---- in the trainer -----------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_step_gradient_is_policy_minus_coef_times_mean_of_micro_batch_bonuses(
    tmp_path: Path,
) -> None:
    # 4 rows in 2 micro-batches of 2 (gradient_accumulation_steps = 2). The first micro-batch has
    # advantage 0 everywhere: no policy gradient, yet it trains through its entropy bonus, so it
    # must not be skipped. TRL's step loss: sum over micro-batches m of
    #   policy_loss_m(num_items = the step's loss tokens) - entropy_coef * H_m / 2.
    trainer = make_trainer(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        max_grad_norm=None,
        entropy_coef=0.1,
    )
    batch = off_policy_batch(trainer, torch.tensor([0.0, 0.0, 1.0, -1.0]))
    loss, grads = step_gradients(trainer, batch)

    options, num_items = trainer.loss_options, batch.loss_mask.sum().float()
    by_hand = torch.zeros(())
    for rows in ([0, 1], [2, 3]):
        part = select_rows(batch, torch.tensor(rows))
        input_ids, attention_mask, t = part.trimmed(slice(0, 2))
        logp, h = model_completion_logprobs(
            trainer.model, input_ids, attention_mask, t, compute_entropy=True
        )
        mask = part.loss_mask[:, :t]
        pl, _ = policy_loss(
            logp, part.old_logprobs[:, :t], part.advantages, mask, options,
            num_items_in_batch=num_items, entropies=h.detach(),
        )  # fmt: skip
        assert h is not None
        by_hand = by_hand + pl - 0.1 * masked_mean(h, mask.bool()) / 2
    by_hand.backward()
    assert loss == pytest.approx(by_hand.item(), abs=1e-6)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4)
    # and the entropy term is really there: without it the first micro-batch adds nothing
    assert trainer.state.entropy_coef == 0.1 and trainer.state.last_step_entropy > 0


@pytest.mark.usefixtures("one_thread")
def test_adaptive_coefficient_is_logged_and_resumed(tmp_path: Path) -> None:
    # The tiny model's entropy (~3 nats) is below entropy_target = 100 at every step, so the
    # coefficient rises by 0.01 after each step from 0: 0.01, 0.02, 0.03 (TRL's metric
    # `entropy_coef`); the bonus applies from the second step on.
    adaptive = dict(
        use_adaptive_entropy=True,
        entropy_coef_delta=0.01,
        entropy_target=100.0,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    full = make_trainer(tmp_path / "full", **adaptive)
    full.train()
    logged = read_metrics(tmp_path / "full")
    assert [m["entropy_coef"] for m in logged] == pytest.approx([0.01, 0.02, 0.03])
    # One micro-batch per step: the measured entropy is the logged `entropy`.
    assert full.state.last_step_entropy == pytest.approx(logged[-1]["entropy"], rel=1e-5)
    assert all("policy_loss" in m for m in logged)
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["entropy_coef"] == pytest.approx(0.02)

    resumed = make_trainer(tmp_path / "resumed", **adaptive)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.entropy_coef == pytest.approx(0.03)
    assert resumed.state.last_step_entropy == full.state.last_step_entropy
    for name, value in params(full).items():
        assert torch.equal(value, params(resumed)[name]), name
