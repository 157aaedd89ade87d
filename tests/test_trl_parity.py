"""Parity with TRL 1.16's `GRPOTrainer._compute_loss`, without TRL installed.

tests/data/trl_loss_reference.json holds what TRL's own `_compute_loss` returned on fixed random
tensors (written by bench/trl_loss_reference.py inside the TRL environment) for every shared loss
type, both importance-sampling levels, delta, beta with and without the bias-corrected KL, the
top-entropy filter, the off-policy mask, rollout importance weights per token and per sequence,
token-level advantages, the entropy bonus, and the adaptive entropy coefficient over a sequence
of steps. Each case is recomputed here with grpokit's defaults (TRL's meanings) and must match:
the loss, its gradient with respect to the log-probs (and the entropies), and every metric TRL
records, under TRL's name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit.core.entropy import EntropyRegularization, entropy_bonus
from grpokit.core.losses import LossOptions, policy_loss

FIXTURE = json.loads((Path(__file__).parent / "data" / "trl_loss_reference.json").read_text())
ATOL = 1e-6


def _inputs(name: str, entropy_scale: float = 1.0) -> dict[str, Any]:
    data = FIXTURE["inputs"][name]
    # The fixture stores float32 values; TRL computed in float64 on exactly those.
    tensors = {k: torch.tensor(v).double() for k, v in data["tensors"].items()}
    tensors["entropies"] = tensors["entropies"] * entropy_scale
    return {**tensors, "num_items_in_batch": data["num_items_in_batch"]}


def _options(case: dict[str, Any]) -> LossOptions:
    return LossOptions(
        loss_type=case["loss_type"],
        importance_sampling_level=case["importance_sampling_level"],
        epsilon_low=case["epsilon_low"],
        epsilon_high=case["epsilon_high"],
        delta=case.get("delta"),
        beta=case.get("beta", 0.0),
        use_bias_correction_kl=case.get("use_bias_correction_kl", True),
        max_completion_length=case["max_completion_length"],
        top_entropy_quantile=case.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=case.get("off_policy_mask_threshold"),
    )


def _grpokit_step(
    case: dict[str, Any], entropy_coef: float, entropy_scale: float = 1.0
) -> tuple[float, dict[str, float], Tensors, float]:
    """grpokit's loss for one case: `policy_loss - entropy_coef * entropy_bonus`.

    Returns the loss, the metrics, the gradients `(d/dlogprobs, d/dentropies)` and the mean
    entropy the bonus averaged (what the adaptive controller measures)."""
    t = _inputs(case["inputs"], entropy_scale)
    options = _options(case)
    logprobs = t["logprobs"].clone().requires_grad_(True)
    entropies = t["entropies"].clone().requires_grad_(True)
    is_weights = t[f"{case['is']}_is_weights"] if case.get("is") else None
    loss, metrics = policy_loss(
        logprobs,
        None if case.get("on_policy") else t["old_logprobs"],
        t["token_advantages"] if case.get("token_advantages") else t["advantages"],
        t["completion_mask"],
        options,
        ref_logprobs=t["ref_logprobs"] if case.get("beta") else None,
        num_items_in_batch=t["num_items_in_batch"],
        entropies=entropies.detach(),
        sampling_logprobs=t["sampling_logprobs"],
        rollout_is_weights=is_weights,
    )
    values = {k: v.item() for k, v in metrics.items()}
    bonus, _ = entropy_bonus(entropies, t["completion_mask"], options)
    if "entropy_coef" in case:
        values["policy_loss"] = loss.item()
        loss = loss - entropy_coef * bonus
    loss.backward()
    grad_entropies = entropies.grad if entropies.grad is not None else torch.zeros_like(entropies)
    return loss.item(), values, (logprobs.grad, grad_entropies), bonus.item()


Tensors = tuple[torch.Tensor, torch.Tensor]


def _assert_matches(
    expected: dict[str, Any], loss: float, metrics: dict[str, float], grads: Tensors
) -> None:
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    torch.testing.assert_close(
        grads[0], torch.tensor(expected["grad_logprobs"]).double(), atol=ATOL, rtol=0
    )
    if "grad_entropies" in expected:
        torch.testing.assert_close(
            grads[1], torch.tensor(expected["grad_entropies"]).double(), atol=ATOL, rtol=0
        )
    for key, value in expected["metrics"].items():
        if key == "entropy_coef":
            continue  # the trainer's (checked with the adaptive sequences)
        ours = metrics[key]  # every TRL metric, under TRL's name
        assert (math.isnan(value) and math.isnan(ours)) or ours == pytest.approx(value, abs=ATOL), (
            key
        )


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: c["name"])
def test_matches_trl(case: dict[str, Any]) -> None:
    loss, metrics, grads, _ = _grpokit_step(case, case.get("entropy_coef", 0.0))
    _assert_matches(case["expected"], loss, metrics, grads)


def test_grid_covers_every_shared_setting() -> None:
    cases = FIXTURE["cases"]
    assert {c["loss_type"] for c in cases} == {
        "grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo",
    }  # fmt: skip
    assert {c["importance_sampling_level"] for c in cases} == {"token", "sequence"}
    for key in ("delta", "beta", "top_entropy_quantile", "off_policy_mask_threshold", "is"):
        assert any(key in c for c in cases), key
    assert any(c.get("use_bias_correction_kl") is False for c in cases)
    assert any(c.get("beta") and "use_bias_correction_kl" not in c for c in cases)
    assert len(cases) >= 200


@pytest.mark.parametrize("sequence", FIXTURE["adaptive_sequences"], ids=lambda s: s["name"])
def test_adaptive_entropy_matches_trl(sequence: dict[str, Any]) -> None:
    rule = EntropyRegularization(
        coef=sequence["entropy_coef"],
        adaptive=True,
        coef_min=sequence["entropy_coef_min"],
        coef_max=sequence["entropy_coef_max"],
        coef_delta=sequence["entropy_coef_delta"],
        target=sequence["entropy_target"],
    )
    coef, last = rule.coef, None
    applied_seen = set()
    for scale, expected in zip(sequence["entropy_scales"], sequence["expected"], strict=True):
        applied = rule.applied(coef, last)
        applied_seen.add(applied > 0)
        loss, metrics, grads, measured = _grpokit_step(sequence, applied, scale)
        _assert_matches(expected, loss, metrics, grads)
        coef, last = rule.updated(coef, measured), measured
        assert coef == pytest.approx(expected["metrics"]["entropy_coef"], abs=1e-12)
    assert applied_seen == {True, False}  # the sequence turns the bonus both on and off
