"""Property tests: for any finite inputs every loss type gives a finite loss and gradient, and
every metric lies in its range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.core.advantages import group_advantages
from grpokit.core.importance import IMPORTANCE_SAMPLING_LEVELS
from grpokit.core.losses import LOSS_TYPES, LossOptions, policy_loss

FRACTIONS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@st.composite
def batches(draw: st.DrawFn):
    n = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 8
    old = (logp + spread * torch.randn(n, t, generator=g)).clamp(max=0)
    ref = (logp + spread * torch.randn(n, t, generator=g)).clamp(max=0)
    adv = 3 * torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.9]))).float()
    entropies = torch.rand(n, t, generator=g) * 4
    return logp, old, ref, adv, mask, entropies


@settings(max_examples=60, deadline=None)
@given(
    batch=batches(),
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(IMPORTANCE_SAMPLING_LEVELS),
    beta=st.sampled_from([0.0, 0.04]),
    epsilons=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (3e-4, 4e-4), (1.0, 4.0)]),
    quantile=st.sampled_from([1.0, 0.2]),
    off_policy=st.sampled_from([None, 0.5]),
)
def test_loss_finite_and_metrics_in_range(
    batch, loss_type, level, beta, epsilons, quantile, off_policy
) -> None:
    if loss_type == "vespo":
        level = "token"
    logp, old, ref, adv, mask, entropies = batch
    logp = logp.clone().requires_grad_(True)
    options = LossOptions(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=epsilons[0],
        epsilon_high=epsilons[1],
        beta=beta,
        max_completion_length=logp.shape[1],
        top_entropy_quantile=quantile,
        off_policy_mask_threshold=off_policy,
    )
    loss, metrics = policy_loss(
        logp, old, adv, mask, options, ref_logprobs=ref, entropies=entropies
    )
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[mask == 0] == 0)
    if options.spec.uses_ppo_clip:
        for key in FRACTIONS:
            assert 0.0 <= metrics[key].item() <= 1.0
        low, high = metrics["clip_ratio/low_mean"].item(), metrics["clip_ratio/high_mean"].item()
        assert metrics["clip_ratio/region_mean"].item() == pytest.approx(low + high, abs=1e-6)
        if mask.any():  # per-sequence extremes of the per-sequence fractions
            assert 0.0 <= metrics["clip_ratio/low_min"].item() <= 1.0
            assert 0.0 <= metrics["clip_ratio/high_max"].item() <= 1.0
    if loss_type == "cispo":
        assert 0.0 <= metrics["cispo_clip_ratio"].item() <= 1.0
    if loss_type == "vespo":
        assert metrics["vespo/phi_seq_mean"].item() >= 0.0
    assert 0 <= metrics["ratio/min"].item() <= metrics["ratio/mean"].item() * (1 + 1e-5) + 1e-6
    assert metrics["ratio/mean"].item() <= metrics["ratio/max"].item() * (1 + 1e-5) + 1e-6
    assert metrics["entropy"].item() >= 0
    if beta:
        assert metrics["kl"].item() >= 0
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert all(torch.isfinite(v) for k, v in metrics.items() if mask.any() or "clip" not in k)


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 4),
    g=st.integers(1, 5),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    nan_rate=st.sampled_from([0.0, 0.3, 1.0]),
    scale=st.sampled_from(["group", "batch", "none"]),
    aggregation=st.sampled_from(["sum_then_normalize", "normalize_then_sum"]),
)
def test_advantages_finite(groups, g, k, seed, nan_rate, scale, aggregation) -> None:
    gen = torch.Generator().manual_seed(seed)
    rewards = 10 * torch.randn(groups * g, k, generator=gen)
    rewards[torch.rand(rewards.shape, generator=gen) < nan_rate] = float("nan")
    out = group_advantages(rewards, g, scale_rewards=scale, multi_objective_aggregation=aggregation)
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.rewards).all()
    no_reward = torch.isnan(rewards).all(-1)
    assert torch.all(out.advantages[no_reward] == 0)
    assert 0.0 <= out.metrics["frac_reward_zero_std"] <= 1.0
    if aggregation == "sum_then_normalize":
        # group-centred: each group's advantages over its valid samples sum to ~0
        sums = torch.where(no_reward, 0.0, out.advantages).view(groups, g).sum(-1)
        assert torch.all(sums.abs() < 1e-2 * (1 + out.advantages.abs().max()))
