"""Numbers for grpokit.core.advantages: the test vectors of worked_example.py (Bessel std + 1e-4, as
TRL), NaN handling, each scaling mode and both multi-reward aggregations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.core.advantages import (
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    check_reward_weights,
    group_advantages,
)
from grpokit.core.losses import LossOptions
from grpokit.train.microbatch import plan_micro_batches

NAN = float("nan")


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0
    )


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        # mean 0.25, Bessel std 0.5: 0.75 / 0.5001 = 1.4997, -0.25 / 0.5001 = -0.4999
        ([1, 0, 0, 0], [1.4997001, -0.4999000, -0.4999000, -0.4999000]),
        # mean 0.5, Bessel std 0.707107: 0.5 / 0.707207 = 0.707007
        ([1, 0], [0.707007, -0.707007]),
        # mean 0.25, Bessel std sqrt(3/14) = 0.462910: 0.75 / 0.463010 = 1.619835
        ([1, 1, 0, 0, 0, 0, 0, 0], [1.619835] * 2 + [-0.539945] * 6),
        ([0.5, 0.5, 0.5, 0.5], [0.0] * 4),
    ],
)
def test_group_scaling_matches_worked_vectors(rewards: list[float], expected: list[float]) -> None:
    out = group_advantages(torch.tensor(rewards, dtype=torch.float32), len(rewards))
    close(out.advantages, expected)
    assert out.advantages.dtype == torch.float32


def test_none_scaling_is_dr_grpo() -> None:
    out = group_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]), 4, scale_rewards="none")
    close(out.advantages, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert out.metrics["frac_reward_zero_std"] == 0.5


def test_batch_scaling_keeps_group_mean_divides_by_batch_std() -> None:
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    # batch mean 0.375; Bessel variance (3 * 0.625^2 + 5 * 0.375^2) / 7 = 15/56
    std = math.sqrt(15 / 56) + 1e-4
    out = group_advantages(rewards, 4, scale_rewards="batch")
    close(out.advantages, [x / std for x in (0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5)])


def test_nan_rewards_are_left_out() -> None:
    # group 1: [1, NaN, 0, 0] -> valid [1, 0, 0], mean 1/3, Bessel std sqrt(1/3); NaN sample -> 0
    # group 2: all NaN -> every advantage 0
    rewards = torch.tensor([1.0, NAN, 0, 0, NAN, NAN, NAN, NAN])
    out = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3) + 1e-4
    close(out.advantages, [(2 / 3) / std, 0, (-1 / 3) / std, (-1 / 3) / std, 0, 0, 0, 0])
    assert not torch.isnan(out.rewards).any()
    close(out.rewards, [1, 0, 0, 0, 0, 0, 0, 0])
    assert out.metrics["reward"] == pytest.approx(1 / 3)
    assert out.metrics["rewards/0/mean"] == pytest.approx(1 / 3)
    assert out.metrics["rewards/0/std"] == pytest.approx(math.sqrt(1 / 3))


def test_multi_reward_sum_then_normalize_with_weights_and_nan() -> None:
    # Two functions, weights (2, 0.5); function 1 does not apply to samples 2 and 3.
    rewards = torch.tensor([[1.0, 2.0], [0.0, 4.0], [NAN, 4.0], [NAN, 0.0]])
    out = group_advantages(rewards, 4, reward_weights=[2.0, 0.5])
    combined = [2 + 1, 0 + 2, 2, 0]  # weighted sums over the applicable functions
    close(out.rewards, combined)
    mean = sum(combined) / 4
    std = math.sqrt(sum((c - mean) ** 2 for c in combined) / 3) + 1e-4
    close(out.advantages, [(c - mean) / std for c in combined], atol=1e-5)
    assert out.metrics["rewards/0/mean"] == pytest.approx(0.5)
    assert out.metrics["rewards/0/std"] == pytest.approx(math.sqrt(0.5))
    assert out.metrics["rewards/1/mean"] == pytest.approx(2.5)


def test_normalize_then_sum() -> None:
    # Function 0 is on a scale 100x function 1; each is normalised per group before the sum.
    rewards = torch.tensor(
        [[100.0, 0.0], [0.0, 1.0], [100.0, 1.0], [0.0, 0.0], [50.0, 1.0], [50.0, 0.0]]
    )
    out = group_advantages(rewards, 2, multi_objective_aggregation="normalize_then_sum")
    # per-group z-scores with Bessel std (+1e-4), G = 2: +-x / (sqrt(2) x + 1e-4)
    z100 = 50 / (math.sqrt(2) * 50 + 1e-4)
    z1 = 0.5 / (math.sqrt(2) * 0.5 + 1e-4)
    summed = [z100 - z1, -z100 + z1, z100 + z1, -z100 - z1, 0 + z1, 0 - z1]
    mean = sum(summed) / 6
    std = math.sqrt(sum((s - mean) ** 2 for s in summed) / 5) + 1e-4
    close(out.advantages, [(s - mean) / std for s in summed], atol=1e-5)
    close(out.rewards, [100, 1, 101, 0, 51, 50])


def test_zero_std_fraction_and_reward_metrics() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    out = group_advantages(rewards, 2)
    assert out.metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert out.metrics["reward"] == pytest.approx(4 / 6)
    assert out.metrics["reward_std"] == pytest.approx(rewards.std().item())
    close(out.advantages, [0, 0, -0.707007, 0.707007, 0, 0])


def test_singleton_groups_give_zero() -> None:
    out = group_advantages(torch.tensor([3.0, -1.0]), 1)
    close(out.advantages, [0.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 3}, "not a multiple of num_generations"),
        ({"scale_rewards": "std"}, "scale_rewards must be one of"),
        ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation must be one of"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    args: dict = {"rewards": torch.zeros(4), "num_generations": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        group_advantages(**args)


def test_infinite_reward_rejected() -> None:
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)


def test_check_reward_weights_is_the_one_check() -> None:
    check_reward_weights(None, 3)  # None = all 1.0
    check_reward_weights([1.0, 0.5], 2)
    check_reward_weights(torch.tensor([1.0, 0.5]), 2)
    with pytest.raises(ValueError) as info:
        check_reward_weights([1.0], 2, ["accuracy", "format"])
    assert str(info.value) == (
        "reward_weights has 1 entries but there are 2 reward functions (accuracy, format); "
        "give one weight per reward function, or none for all 1.0."
    )
    with pytest.raises(ValueError, match=r"flat list of 2 numbers.*shape \(2, 1\)"):
        check_reward_weights(torch.ones(2, 1), 2)  # [K, 1] would broadcast against [N, K]


# ---- equal rewards give exactly zero ------------------------------------------------------------
TRICKY_VALUES = [0.1, 0.3, 1 / 3, 1e6 + 0.1, -2.7, 7e-5]


@settings(max_examples=60, deadline=None)
@given(
    value=st.sampled_from(TRICKY_VALUES) | st.floats(-1e6, 1e6, width=32),
    other=st.sampled_from(TRICKY_VALUES) | st.floats(-1e3, 1e3, width=32),
    g=st.integers(2, 16),
    scale_rewards=st.sampled_from(SCALE_REWARDS),
)
def test_a_group_of_equal_rewards_gets_exactly_zero(
    value: float, other: float, g: int, scale_rewards: str
) -> None:
    """G equal rewards whose float32 mean does not round-trip (0.3, 1e6 + 0.1, ...) must give 0,
    not ~1e-4..1 (0.3 * 8 gave 3e-4 in "group" mode, 1e6 + 0.1 gave 0.93), in every mode; the
    varied group next to it keeps non-zero advantages."""
    varied = 2.0 ** torch.arange(g)  # 1, 2, 4, ...: no element equals the mean
    rewards = torch.cat([torch.full((g,), value), varied, torch.full((g,), other)])
    out = group_advantages(rewards, g, scale_rewards=scale_rewards)
    assert torch.equal(out.advantages[:g], torch.zeros(g))
    assert torch.equal(out.advantages[2 * g :], torch.zeros(g))
    assert (out.advantages[g : 2 * g] != 0).all()
    assert out.metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)


@settings(max_examples=40, deadline=None)
@given(
    values=st.tuples(*[st.sampled_from(TRICKY_VALUES) | st.floats(-1e6, 1e6, width=32)] * 2),
    g=st.integers(2, 8),
    scale_rewards=st.sampled_from(SCALE_REWARDS),
    aggregation=st.sampled_from(MULTI_OBJECTIVE_AGGREGATIONS),
    weights=st.tuples(st.floats(0.1, 3.0), st.floats(0.1, 3.0)),
)
def test_equal_multi_objective_rewards_get_exactly_zero(
    values: tuple[float, float],
    g: int,
    scale_rewards: str,
    aggregation: str,
    weights: tuple[float, float],
) -> None:
    """Two reward functions, each constant over the first group, both varying over the second:
    the first group's advantages are exactly 0 under both aggregations, with any weights. Under
    normalize_then_sum a function that does not apply to one sample (NaN) leaves it constant; under
    sum_then_normalize it would not (that sample's combined reward lacks the term)."""
    constant = torch.tensor([values] * g, dtype=torch.float32)  # [G, 2]
    if aggregation == "normalize_then_sum":
        constant[0, 1] = NAN
    varied = torch.stack([torch.arange(g) * 1.0, torch.arange(g) % 2 * 1.0], 1)  # [G, 2]
    out = group_advantages(
        torch.cat([constant, varied]),
        g,
        reward_weights=list(weights),
        scale_rewards=scale_rewards,
        multi_objective_aggregation=aggregation,
    )
    assert torch.equal(out.advantages[:g], torch.zeros(g))
    assert (out.advantages[g:] != 0).any()


def test_zero_advantage_groups_are_skipped_by_the_micro_batch_planner() -> None:
    """The zero-advantage skip sees the constant group: 8 rewards of 0.3 gave 3e-4 advantages,
    so before the fix its rows were still forwarded."""
    rewards = torch.cat([torch.full((8,), 0.3), torch.tensor([0.0, 1.0] * 4)])
    advantages = group_advantages(rewards, 8).advantages
    mask = torch.ones(16, 3, dtype=torch.long)
    plan = plan_micro_batches(advantages, mask, mask, range(16), 4, LossOptions(loss_type="dapo"))
    assert sorted(i for micro in plan for i in micro.rows) == list(range(8, 16))
