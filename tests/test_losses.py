"""Numbers for core.losses: the worked example (ALGORITHMS.md §14), a loop-based reference on
random padded batches, invariances (REINFORCE at old == new, micro-batch sums), the KL estimator,
the token filters and the rollout importance weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grpokit.core.importance import IMPORTANCE_SAMPLING_LEVELS, rollout_importance_weights
from grpokit.core.losses import LOSS_TYPES, LossOptions, k3_kl, policy_loss

# ---------------------------------------------------------------------------------------------
# The worked example: A, logp, logp_old = -1, eps_low 0.1, eps_high 0.2, L = 3
# ---------------------------------------------------------------------------------------------

A = torch.tensor([[0.5, -0.3, 0.8], [0.2, 0.1, -0.4]], dtype=torch.float64)
LOGP = torch.tensor([[-1.2, -0.8, -1.5], [-0.9, -1.1, -0.7]], dtype=torch.float64)
OLD = torch.full((2, 3), -1.0, dtype=torch.float64)
FULL = torch.ones(2, 3)
PADDED = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

# Token level, full mask: every token takes the unclipped branch, so dL/dlogp = -r*A/6 for all
# four aggregations (both sequences have length 3 = L).
TOKEN_GRAD = [[-0.068228, 0.061070, -0.080871], [-0.036839, -0.015081, 0.089991]]
# Sequence level: s_1 = exp(-1/6) = 0.846482 (clipped to 0.9 for A < 0), s_2 = exp(0.1).
SEQ_GRAD = [[-0.061135] * 3, [0.006140] * 3]
GSPO_TOKEN_GRAD = [[-0.070540, 0.0, -0.112864], [-0.036839, -0.018420, 0.073678]]

# (level, mask, loss_type) -> (value, gradient), from worked_example_output.txt
WORKED = {
    **{("token", "full", k): (-0.049957, TOKEN_GRAD) for k in ("grpo", "bnpo", "dapo", "dr_grpo")},
    **{("sequence", "full", k): (-0.119985, SEQ_GRAD) for k in ("grpo", "bnpo", "dapo", "dr_grpo")},
    **{
        ("sequence_token", "full", k): (-0.119985, GSPO_TOKEN_GRAD)
        for k in ("grpo", "bnpo", "dapo", "dr_grpo")
    },
    ("token", "padded", "grpo"): (
        -0.165908,
        [[-0.068228, 0.061070, -0.080871], [-0.055259, -0.022621, 0.0]],
    ),
    ("token", "padded", "bnpo"): (
        -0.167937,
        [[-0.081873, 0.073284, -0.097045], [-0.044207, -0.018097, 0.0]],
    ),
    ("token", "padded", "dapo"): (
        -0.167937,
        [[-0.081873, 0.073284, -0.097045], [-0.044207, -0.018097, 0.0]],
    ),
    ("token", "padded", "dr_grpo"): (
        -0.139948,
        [[-0.068228, 0.061070, -0.080871], [-0.036839, -0.015081, 0.0]],
    ),
    ("sequence", "padded", "grpo"): (-0.213404, [[-0.061135] * 3, [-0.0375, -0.0375, 0.0]]),
    ("sequence", "padded", "bnpo"): (-0.226085, [[-0.073362] * 3, [-0.03, -0.03, 0.0]]),
    ("sequence", "padded", "dapo"): (-0.226085, [[-0.073362] * 3, [-0.03, -0.03, 0.0]]),
    ("sequence", "padded", "dr_grpo"): (-0.188404, [[-0.061135] * 3, [-0.025, -0.025, 0.0]]),
    # The remaining loss types, worked out by hand (token level, full mask, r = exp(logp + 1)):
    # cispo, capped at 1 + eps_high = 1.2 as MiniMax-M1 Eq. 5 (cispo_cap_mode="relative"):
    #   w = min(r, 1.2) = [[.818731, 1.2, .606531], [1.105171, .904837, 1.2]];
    #   L = -sum(w A logp) / 6, dL/dlogp = -w A / 6.
    ("token", "full", "cispo"): (
        0.148923,
        [[-0.068228, 0.06, -0.080871], [-0.036839, -0.015081, 0.08]],
    ),
    # sapo: f(r) = sigmoid(tau (r-1)) 4/tau, tau = 1 (A > 0) or 1.05; L = mean_i mean_t(-f A);
    #   dL/dlogp = -4 s (1-s) r A / 6 with s = sigmoid(tau (r-1)).
    ("token", "full", "sapo"): (
        -0.212082,
        [[-0.06767, 0.060252, -0.07782], [-0.036737, -0.015047, 0.087022]],
    ),
    # luspo: mean_i sum_t l_it = (sum of the six PPO terms) / 2 = -0.299743 / 2; gradient -r A / 2.
    ("token", "full", "luspo"): (
        -0.149872,
        [[-0.204683, 0.183211, -0.242613], [-0.110517, -0.045242, 0.269972]],
    ),
    # vespo: log w = sum_t log r = (-0.5, 0.3); phi = exp(lam + k log w - lam w) with
    #   (k, lam) = (2, 3) for A >= 0, (3, 2) for A < 0, e.g. exp(3 - 1 - 3 e^-0.5) = 1.197706;
    #   L = -sum(phi A logp) / 6, dL/dlogp = -phi A / 6.
    ("token", "full", "vespo"): (
        0.313523,
        [[-0.099809, 0.024507, -0.159694], [-0.021263, -0.010632, 0.08145]],
    ),
}


@pytest.mark.parametrize(("level", "mask_name", "loss_type"), sorted(WORKED))
def test_worked_example(level: str, mask_name: str, loss_type: str) -> None:
    expected_value, expected_grad = WORKED[(level, mask_name, loss_type)]
    mask = FULL if mask_name == "full" else PADDED
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(
        logp,
        OLD,
        A,
        mask,
        LossOptions(
            loss_type=loss_type,
            importance_sampling_level=level,
            epsilon_low=0.1,
            epsilon_high=0.2,
            max_completion_length=3,
            cispo_cap_mode="relative",  # the paper's cap (only cispo reads it)
        ),
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected_value, abs=1e-5)
    torch.testing.assert_close(
        logp.grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_cispo_absolute_cap_is_epsilon_high_itself() -> None:
    # TRL's default: the weight is capped at epsilon_high, so epsilon_high = 1.2 gives the paper
    # example's cap of 1 + 0.2, and the same value and gradient as above.
    expected_value, expected_grad = WORKED[("token", "full", "cispo")]
    logp = LOGP.clone().requires_grad_(True)
    options = LossOptions(loss_type="cispo", epsilon_high=1.2)
    assert options.cispo_cap_mode == "absolute" and options.cispo_cap == 1.2
    loss, metrics = policy_loss(logp, OLD, A, FULL, options)
    loss.backward()
    assert loss.item() == pytest.approx(expected_value, abs=1e-5)
    torch.testing.assert_close(
        logp.grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # capped with A > 0: only (2, 3) (r = 1.35, A = -0.4 is not; (1, 2) has A < 0): 0 of 6.
    assert metrics["cispo_clip_ratio"].item() == 0.0
    # epsilon_high = 0.2 read as TRL does caps every weight at 0.2: L = -0.2 sum(A logp) / 6
    # = -0.2 * (-0.6 + 0.24 - 1.2 - 0.18 - 0.11 + 0.28) / 6 = 0.052333.
    low_cap, metrics = policy_loss(LOGP, OLD, A, FULL, LossOptions(loss_type="cispo"))
    assert low_cap.item() == pytest.approx(0.0523333, abs=1e-6)
    # weights capped where r > 0.2 (all six) and A > 0 (four of them): 4/6
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(4 / 6)


def test_worked_example_gspo_token_padded_matches_reference() -> None:
    # GSPO-token with padding: same value as the sequence level, gradient of token t on token t.
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(
        logp, OLD, A, PADDED, LossOptions(
            loss_type="grpo", importance_sampling_level="sequence_token",
            epsilon_low=0.1, epsilon_high=0.2,
        ),
    )  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-0.213404, abs=1e-5)
    # row 1 is unchanged; row 2: s = 1 (inside the clip range) so dL/dlogp_t = -A_t / (2 * 2).
    expected = [[-0.070540, 0.0, -0.112864], [-0.05, -0.025, 0.0]]
    torch.testing.assert_close(
        logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_worked_example_metrics() -> None:
    _, token = policy_loss(LOGP, OLD, A, FULL, LossOptions(epsilon_low=0.1, epsilon_high=0.2))
    # No token sits on the clipped side of the trust region (§14, point 2).
    assert token["clip_ratio/region_mean"].item() == 0.0
    assert token["ratio/min"].item() == pytest.approx(math.exp(-0.5))
    assert token["ratio/max"].item() == pytest.approx(math.exp(0.3))
    ratios = [math.exp(x) for x in (-0.2, 0.2, -0.5, 0.1, -0.1, 0.3)]
    assert token["ratio/mean"].item() == pytest.approx(sum(ratios) / 6)
    _, seq = policy_loss(
        LOGP,
        OLD,
        A,
        FULL,
        LossOptions(importance_sampling_level="sequence", epsilon_low=0.1, epsilon_high=0.2),
    )
    # s_1 = 0.846 < 0.9 and token (1, 2) has A < 0: one low-clipped token of six.
    assert seq["clip_ratio/low_mean"].item() == pytest.approx(1 / 6)
    assert seq["clip_ratio/high_mean"].item() == 0.0
    assert seq["clip_ratio/region_mean"].item() == pytest.approx(1 / 6)
    assert "kl" not in seq and "entropy" not in seq


# ---------------------------------------------------------------------------------------------
# A straightforward loop-based reference
# ---------------------------------------------------------------------------------------------


def reference_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    level: str,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    max_len: int = 7,
    num_items: float | None = None,
) -> torch.Tensor:
    """One token at a time, straight from the papers' formulas (float64)."""
    n, t = logp.shape
    seq_terms, total, count = [], 0.0, 0.0
    for i in range(n):
        tokens = [j for j in range(t) if mask[i, j] > 0]
        mean_log_ratio = sum(logp[i, j] - old[i, j] for j in tokens) / max(len(tokens), 1)
        full_log_ratio = sum((logp[i, j] - old[i, j]).detach() for j in tokens)
        row = 0.0
        for j in tokens:
            a = adv[i]
            if level == "token":
                r = torch.exp(logp[i, j] - old[i, j])
            elif level == "sequence":
                r = torch.exp(mean_log_ratio)
            else:
                r = torch.exp(mean_log_ratio.detach() + logp[i, j] - logp[i, j].detach())
            if loss_type == "cispo":
                term = -torch.clamp(r, max=1 + eps_high).detach() * a * logp[i, j]
            elif loss_type == "sapo":
                tau = 1.0 if a > 0 else 1.05
                term = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            elif loss_type == "vespo":
                k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
                w = torch.exp(full_log_ratio)
                phi = w**k * torch.exp(lam * (1 - w))
                term = -phi * a * logp[i, j]
            else:
                term = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            row = row + term
        seq_terms.append((row, len(tokens)))
        total = total + row
        count += len(tokens)
    if loss_type in ("grpo", "sapo"):
        return sum(r / max(c, 1) for r, c in seq_terms) / n
    if loss_type == "bnpo":
        return total / count
    if loss_type in ("dapo", "cispo", "vespo"):
        return total / (num_items if num_items is not None else count)
    if loss_type == "dr_grpo":
        return total / (n * max_len)
    return total / n  # luspo


def random_batch(seed: int, n: int = 5, t: int = 7, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()  # right padding
    # Garbage at padding: must neither change the loss nor produce NaN gradients.
    logp = torch.where(mask > 0, logp, torch.full_like(logp, float("-inf")))
    old = torch.where(mask > 0, old, torch.full_like(old, float("nan")))
    return logp, old, adv, mask


CASES = [(lt, "token") for lt in LOSS_TYPES] + [
    (lt, level)
    for lt in ("grpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo")
    for level in ("sequence", "sequence_token")
]


@pytest.mark.parametrize(("loss_type", "level"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_with_padding(loss_type: str, level: str, seed: int) -> None:
    logp, old, adv, mask = random_batch(seed)
    ours = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours, old, adv, mask, LossOptions(
            loss_type=loss_type, importance_sampling_level=level,
            epsilon_high=0.28, max_completion_length=7,
            cispo_cap_mode="relative",  # the reference caps CISPO at 1 + eps_high (paper)
        ),
    )  # fmt: skip
    loss.backward()
    assert ours.grad is not None

    ref_in = torch.where(mask > 0, logp, torch.zeros_like(logp)).requires_grad_(True)
    ref_old = torch.where(mask > 0, old, torch.zeros_like(old))
    expected = reference_loss(ref_in, ref_old, adv, mask, loss_type, level)
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    torch.testing.assert_close(ours.grad, ref_in.grad, atol=1e-10, rtol=1e-8)
    assert torch.all(ours.grad[mask == 0] == 0), "padding received gradient"
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_content_does_not_matter(loss_type: str) -> None:
    logp, old, adv, mask = random_batch(3)
    values = []
    for fill in (0.0, -5.0, 123.0):
        lp = torch.where(mask > 0, logp, torch.full_like(logp, fill))
        values.append(
            policy_loss(
                lp, old, adv, mask, LossOptions(loss_type=loss_type, max_completion_length=7)
            )[0]
        )
    assert values[0].item() == values[1].item() == values[2].item()


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


def aggregation_weights(loss_type: str, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """d loss / d per-token-loss for each aggregation, [N, T]."""
    n = mask.shape[0]
    lengths = mask.sum(-1, keepdim=True)
    return {
        "grpo": mask / (n * lengths),
        "sapo": mask / (n * lengths),
        "bnpo": mask / mask.sum(),
        "dapo": mask / mask.sum(),
        "cispo": mask / mask.sum(),
        "vespo": mask / mask.sum(),
        "dr_grpo": mask / (n * max_len),
        "luspo": mask / n,
    }[loss_type]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old_is_none", [True, False])
def test_reinforce_gradient_on_policy(loss_type: str, old_is_none: bool) -> None:
    # At old == new every ratio is 1 and every objective's gradient is -A grad(logp), scaled by
    # the aggregation (SAPO's gate has slope 1 at r = 1, VESPO's phi(1) = 1, CISPO's weight 1
    # under a cap >= 1: TRL's recommended epsilon_high = 5).
    logp, _, adv, mask = random_batch(5)
    logp = torch.where(mask > 0, logp, torch.zeros_like(logp)).requires_grad_(True)
    old = None if old_is_none else logp.detach().clone()
    options = LossOptions(loss_type=loss_type, epsilon_high=5.0, max_completion_length=7)
    loss, metrics = policy_loss(logp, old, adv, mask, options)
    loss.backward()
    expected = -adv[:, None] * aggregation_weights(loss_type, mask, 7)
    torch.testing.assert_close(logp.grad, expected, atol=1e-12, rtol=1e-10)
    assert metrics.get("clip_ratio/region_mean", 0.0) == 0.0
    assert metrics.get("cispo_clip_ratio", 0.0) == 0.0
    assert metrics["ratio/min"].item() == metrics["ratio/max"].item() == 1.0


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_micro_batches_sum_to_whole_batch(loss_type: str) -> None:
    logp, old, adv, mask = random_batch(7, n=6)
    num_items = mask.sum()
    whole = logp.clone().requires_grad_(True)
    options = LossOptions(loss_type=loss_type)
    policy_loss(whole, old, adv, mask, options, num_items_in_batch=num_items)[0].backward()
    split = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        loss, _ = policy_loss(
            split[rows], old[rows], adv[rows], mask[rows], options,
            num_items_in_batch=num_items,
        )  # fmt: skip
        loss.backward()
        total += loss.item()
    whole_loss = policy_loss(logp, old, adv, mask, options, num_items_in_batch=num_items)
    assert total == pytest.approx(whole_loss[0].item(), abs=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, atol=1e-12, rtol=1e-10)


def test_dapo_defaults_to_micro_batch_count() -> None:
    logp, old, adv, mask = random_batch(8)
    dapo = policy_loss(logp, old, adv, mask, LossOptions(loss_type="dapo"))[0]
    bnpo = policy_loss(logp, old, adv, mask, LossOptions(loss_type="bnpo"))[0]
    assert dapo.item() == bnpo.item()


def test_delta_caps_negative_advantage_tokens() -> None:
    # A < 0 and r = e^2 = 7.39 > delta = 4: the term is -delta*A = 4 * 0.5 = 2 with zero gradient.
    logp = torch.tensor([[1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([-0.5], dtype=torch.float64)
    loss, _ = policy_loss(
        logp, old, adv, torch.ones(1, 2), LossOptions(loss_type="bnpo", delta=4.0)
    )
    loss.backward()
    # token 2: r = 1, term = 0.5; mean of (2, 0.5) = 1.25
    assert loss.item() == pytest.approx(1.25)
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(0.5 / 2)
    without, _ = policy_loss(logp, old, adv, torch.ones(1, 2), LossOptions(loss_type="bnpo"))
    assert without.item() == pytest.approx((0.5 * math.exp(2) + 0.5) / 2)


# ---------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------


def test_k3_nonnegative_and_zero_at_equality() -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g, dtype=torch.float64) * 5
    ref = logp + 2 * torch.randn(1000, generator=g, dtype=torch.float64)
    assert torch.all(k3_kl(logp, ref) >= 0)
    assert torch.all(k3_kl(logp, logp) == 0)
    # r = ref/pi = e: k3 = e - 1 - 1
    assert k3_kl(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(math.e - 2)


def _four_way() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)  # the same categorical as worked_example.py's k3_checks
    return torch.tensor(rng.normal(size=4)), torch.tensor(rng.normal(size=4))


@pytest.mark.parametrize(
    ("corrected", "expected"),
    [
        (False, [0.155317, 0.001298, -0.066676, -0.08994]),  # = grad KL(ref || theta), forward
        (True, [0.233983, -0.020897, -0.109475, -0.103611]),  # = grad KL(theta || ref), reverse
    ],
)
def test_kl_gradient_in_expectation(corrected: bool, expected: list[float]) -> None:
    # Exact expectation over the 4 outcomes sampled from pi_old = pi_theta: each outcome is one
    # sequence of one token.
    logits_theta, logits_ref = _four_way()
    z = logits_theta.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)[:, None]  # [4, 1], outcome x
    ref = torch.log_softmax(logits_ref, -1)[:, None]
    prob = logp.detach().exp()
    # E_x[grad loss_x] = sum_x pi(x) grad loss_x, with A = 0 so loss_x = KL term of outcome x.
    total = torch.zeros((), dtype=torch.float64)
    for x in range(4):
        loss, metrics = policy_loss(
            logp[x : x + 1], logp[x : x + 1].detach(), torch.zeros(1, dtype=torch.float64),
            torch.ones(1, 1), LossOptions(beta=1.0, use_bias_correction_kl=corrected),
            ref_logprobs=ref[x : x + 1],
        )  # fmt: skip
        total = total + prob[x, 0] * loss
        assert metrics["kl"].item() >= 0
    total.backward()
    torch.testing.assert_close(
        z.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_kl_added_per_token_with_token_ratio() -> None:
    logp, old, adv, mask = random_batch(11)
    logp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    old = torch.where(mask > 0, old, torch.zeros_like(old))
    ref = logp + 0.2
    base = policy_loss(logp, old, adv, mask, LossOptions(loss_type="bnpo"))[0]
    for corrected in (False, True):
        loss, metrics = policy_loss(
            logp, old, adv, mask,
            LossOptions(loss_type="bnpo", beta=0.04, use_bias_correction_kl=corrected),
            ref_logprobs=ref,
        )  # fmt: skip
        k3 = math.exp(0.2) - 0.2 - 1  # ref - logp = 0.2 everywhere
        weight = torch.exp(logp - old) if corrected else torch.ones_like(logp)
        kl = (k3 * weight * mask).sum() / mask.sum()
        assert loss.item() == pytest.approx(base.item() + 0.04 * kl.item(), abs=1e-12)
        assert metrics["kl"].item() == pytest.approx(kl.item(), abs=1e-12)


@pytest.mark.parametrize(
    ("level", "correction_level", "expected"),
    [
        # k3 per token: ref - logp = (-0.5, 0.5) -> (e^-0.5 + 0.5 - 1, e^0.5 - 0.5 - 1)
        # = (0.1065307, 0.1487213); token ratios r = (e^0.2, e^-0.2); sequence ratio
        # s = exp(mean(0.2, -0.2)) = 1. bnpo, A = 0, beta = 1: L = mean_t(k3_t * weight_t).
        ("token", None, (0.1065307 * math.exp(0.2) + 0.1487213 * math.exp(-0.2)) / 2),
        ("sequence", None, (0.1065307 + 0.1487213) / 2),  # TRL: the sequence ratio, s = 1
        ("sequence", "token", (0.1065307 * math.exp(0.2) + 0.1487213 * math.exp(-0.2)) / 2),
        ("token", "sequence", (0.1065307 + 0.1487213) / 2),
    ],
)
def test_kl_bias_correction_level(
    level: str, correction_level: str | None, expected: float
) -> None:
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.2, -0.8]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -0.5]], dtype=torch.float64)
    options = LossOptions(
        loss_type="bnpo",
        importance_sampling_level=level,
        beta=1.0,
        kl_bias_correction_level=correction_level,
    )
    loss, metrics = policy_loss(
        logp, old, torch.zeros(1), torch.ones(1, 2), options, ref_logprobs=ref
    )
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert metrics["kl"].item() == pytest.approx(expected, abs=1e-7)


def test_beta_zero_ignores_reference() -> None:
    logp, old, adv, mask = random_batch(2)
    plain = policy_loss(logp, old, adv, mask)[0]
    with_ref = policy_loss(logp, old, adv, mask, ref_logprobs=torch.full_like(logp, float("nan")))
    assert plain.item() == with_ref[0].item()
    assert "kl" not in with_ref[1]


# ---------------------------------------------------------------------------------------------
# Token filters and rollout importance weights
# ---------------------------------------------------------------------------------------------


def test_top_entropy_quantile_keeps_top_tokens_and_normaliser() -> None:
    logp, old, adv, mask = random_batch(4)
    g = torch.Generator().manual_seed(1)
    entropies = torch.rand(logp.shape, generator=g, dtype=torch.float64)
    loss, metrics = policy_loss(
        logp,
        old,
        adv,
        mask,
        LossOptions(loss_type="bnpo", top_entropy_quantile=0.2),
        entropies=entropies,
    )
    valid = entropies[mask > 0]
    threshold = torch.quantile(valid, 0.8)
    keep = ((entropies >= threshold) & (mask > 0)).double()
    assert 0 < keep.sum() < mask.sum()
    lp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    od = torch.where(mask > 0, old, torch.zeros_like(old))
    ratio = torch.exp(lp - od)
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    expected = (per_token * keep).sum() / mask.sum()  # TRL: normaliser unchanged
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["entropy"].item() == pytest.approx(valid.mean().item())
    bnpo = LossOptions(loss_type="bnpo")
    full = policy_loss(logp, old, adv, mask, bnpo, entropies=entropies)[0]
    assert full.item() == policy_loss(logp, old, adv, mask, bnpo)[0].item()


def test_off_policy_mask_drops_negative_far_sequences() -> None:
    # seq 0: A < 0, mean log(pi_old / pi) = 1.0 > 0.5 -> dropped; seq 1: same gap but A > 0 -> kept;
    # seq 2: A < 0, gap 0.1 -> kept.
    logp = torch.full((3, 2), -2.0, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.9, -1.9]], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    loss, _ = policy_loss(
        logp, old, adv, torch.ones(3, 2), LossOptions(
            loss_type="bnpo", off_policy_mask_threshold=0.5, epsilon_low=10.0, epsilon_high=10.0,
        ),
    )  # fmt: skip
    loss.backward()
    assert torch.all(logp.grad[0] == 0)
    r1, r2 = math.exp(-1.0), math.exp(-0.1)
    assert loss.item() == pytest.approx((2 * (-r1) + 2 * r2) / 6)


def test_off_policy_mask_prefers_sampling_logprobs() -> None:
    logp = torch.full((1, 2), -2.0, dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    options = LossOptions(loss_type="bnpo", off_policy_mask_threshold=0.5)
    kept = policy_loss(logp, logp, adv, torch.ones(1, 2), options)[0]
    dropped = policy_loss(logp, logp, adv, torch.ones(1, 2), options, sampling_logprobs=logp + 1.0)[
        0
    ]
    assert kept.item() == pytest.approx(1.0)
    assert dropped.item() == 0.0


def test_rollout_is_weights_multiply_per_token_loss() -> None:
    logp, old, adv, mask = random_batch(9)
    weights = torch.rand(logp.shape, dtype=torch.float64) * 2
    luspo = LossOptions(loss_type="luspo")
    plain = policy_loss(logp, old, adv, mask, luspo)[0]
    ones = policy_loss(logp, old, adv, mask, luspo, rollout_is_weights=torch.ones_like(logp))[0]
    assert plain.item() == ones.item()
    weighted = policy_loss(logp, old, adv, mask, luspo, rollout_is_weights=weights)[0]
    lp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    od = torch.where(mask > 0, old, torch.zeros_like(old))
    ratio = torch.exp(lp - od)
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    assert weighted.item() == pytest.approx(((per_token * weights * mask).sum(-1)).mean().item())


@pytest.mark.parametrize("per_token", [False, True])
def test_vespo_folds_rollout_weights_into_its_sequence_ratio(per_token: bool) -> None:
    # Worked example, vespo: log w = (-0.5, 0.3). A rollout weight pi_old / pi_rollout = e^0.5 on
    # sequence 1 (per sequence, or on its first token) makes its w = 1, so phi = exp(lam - lam)
    # = 1 and it is plain REINFORCE, dL/dlogp = -A / 6 = [-0.083333, 0.05, -0.133333]; sequence
    # 2 (weight 1) keeps its phi (gradient row as in the worked example).
    e = math.exp(0.5)
    weights = torch.tensor([[e, 1, 1], [1, 1, 1]] if per_token else [[e], [1.0]])
    logp = LOGP.clone().requires_grad_(True)
    options = LossOptions(loss_type="vespo", epsilon_low=0.1, epsilon_high=0.2)
    policy_loss(logp, OLD, A, FULL, options, rollout_is_weights=weights)[0].backward()
    expected = [[-0.083333, 0.05, -0.133333], WORKED[("token", "full", "vespo")][1][1]]
    torch.testing.assert_close(
        logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_rollout_importance_weights_modes() -> None:
    # token log gaps (old - sampling): [0, 0.5, 1.5] and [-2, 0.1, <pad>]
    old = torch.tensor([[0.0, 0.5, 1.5], [-2.0, 0.1, 9.0]])
    sampling = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    e = math.exp
    w, m = rollout_importance_weights(old, sampling, mask, mode="token_truncate", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, e(0.5), 3.0], [e(-2.0), e(0.1), 0.0]]))
    assert m["rollout_is/frac_modified"].item() == pytest.approx(1 / 5)
    w, _ = rollout_importance_weights(
        old, sampling, mask, mode="token_mask", clip_min=0.5, clip_max=3.0
    )
    torch.testing.assert_close(w, torch.tensor([[1.0, e(0.5), 0.0], [0.0, e(0.1), 0.0]]))
    # sequence ratio = exp(sum of gaps): exp(2.0) = 7.39 and exp(-1.9) = 0.150, one per row
    w, _ = rollout_importance_weights(old, sampling, mask, mode="sequence_truncate", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([[3.0], [e(-1.9)]]))
    w, m = rollout_importance_weights(old, sampling, mask, mode="sequence_mask", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([[0.0], [e(-1.9)]]))
    # token-weighted mean over the 5 loss tokens: (3 * 0 + 2 * 0.150) / 5
    assert m["rollout_is/mean"].item() == pytest.approx(2 * e(-1.9) / 5)
    assert m["rollout_is/max"].item() == pytest.approx(e(-1.9))
    assert m["rollout_is/min"].item() == 0.0
    assert m["rollout_is/logprob_abs_diff/max"].item() == pytest.approx(2.0)
    assert not w.requires_grad


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level must be one of"),
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"delta": 1.1, "epsilon_high": 0.2}, "delta must be > 1 \\+ epsilon_high"),
        ({"delta": 4.0, "loss_type": "cispo"}, "delta"),
        ({"beta": -0.1}, "beta"),
        ({"top_entropy_quantile": 0.0}, "top_entropy_quantile"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature"),
        ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "vespo"),
        ({"loss_type": "vespo", "vespo_lambda_pos": 0.0}, "VESPO"),
        ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"cispo_cap_mode": "paper"}, "cispo_cap_mode must be one of"),
        ({"kl_bias_correction_level": "sequence_token"}, "kl_bias_correction_level"),
    ],
)
def test_invalid_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossOptions(**options)


def test_valid_defaults_pass() -> None:
    for loss_type in LOSS_TYPES:
        for level in IMPORTANCE_SAMPLING_LEVELS:
            if loss_type != "vespo" or level == "token":
                LossOptions(
                    loss_type=loss_type, importance_sampling_level=level, max_completion_length=3
                )
    LossOptions(delta=4.0, epsilon_high=0.28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"old_logprobs": OLD[:, :2]}, "old_logprobs has shape"),
        ({"completion_mask": FULL[:1]}, "completion_mask has shape"),
        ({"advantages": torch.zeros(3)}, "advantages must be"),
        ({"options": {"loss_type": "dr_grpo"}}, "max_completion_length"),
        ({"options": {"beta": 0.1}}, "ref_logprobs"),
        ({"options": {"top_entropy_quantile": 0.5}}, "entropies"),
        ({"num_items_in_batch": 0}, "num_items_in_batch"),
    ],
)
def test_invalid_inputs(kwargs: dict, message: str) -> None:
    args = {"logprobs": LOGP, "old_logprobs": OLD, "advantages": A[:, 0], "completion_mask": FULL}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        args["options"] = LossOptions(**args.get("options", {}))
        policy_loss(**args)


def test_token_level_advantages_accepted() -> None:
    # [N, T] advantages equal to the broadcast [N] ones give the same loss.
    logp, old, adv, mask = random_batch(6)
    grpo = LossOptions(loss_type="grpo")
    a = policy_loss(logp, old, adv, mask, grpo)[0]
    b = policy_loss(logp, old, adv[:, None].expand_as(logp), mask, grpo)[0]
    assert a.item() == pytest.approx(b.item(), abs=1e-14)


def test_bf16_inputs_give_float32_loss() -> None:
    logp, old, adv, mask = random_batch(1)
    lp = torch.where(mask > 0, logp, torch.zeros_like(logp)).bfloat16().requires_grad_(True)
    loss, metrics = policy_loss(lp, old.bfloat16(), adv.bfloat16(), mask)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad is not None
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_readme_core_snippet_runs_and_gives_the_worked_example() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The core", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md lost its 'The core' python example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    assert namespace["loss"].item() == pytest.approx(-0.049957, abs=1e-5)
    torch.testing.assert_close(
        namespace["out"].advantages,
        torch.tensor([1.4997, -0.4999, -0.4999, -0.4999]),
        atol=1e-4,
        rtol=0,
    )
