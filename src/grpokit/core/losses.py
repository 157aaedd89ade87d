"""The GRPO policy-loss family as small pure functions on tensors.

A loss is built in four steps, in the order of TRL's `GRPOTrainer._compute_loss`, with TRL 1.16's
meanings by default (same loss, gradient and metrics on the same tensors; the papers' variants are
options). See docs/LOSSES.md for every formula and where grpokit departs from TRL:

1. importance weights `ratio = pi_theta / pi_old` at the token, sequence (GSPO) or
   sequence_token (GSPO-token) level (`core.importance`);
2. a per-token objective chosen by `loss_type` (PPO clip, CISPO, SAPO, VESPO);
3. token filters and weights: off-policy sequence mask and rollout IS weight
   (`core.importance`), top-entropy mask, then `+ beta * KL` (k3, optionally
   importance-corrected);
4. an aggregation of the `[N, T]` per-token losses into a scalar, also chosen by `loss_type`.

Each loss type is one `LossSpec` in the `LOSS_SPECS` table: its objective (step 2), its
aggregation (step 4), and the facts the trainer and the micro-batch planner read from it (does the
loss sum over the optimizer step's tokens, average over rows, depend on which rows share a
micro-batch, use the PPO clip) and its own metrics. `register_loss_type` adds one. The options
of a loss are one frozen `LossOptions`, checked once when built and passed to `policy_loss`.
The metrics `policy_loss` returns are computed in `core.loss_metrics`; TRL's entropy bonus is
`core.entropy`.

Conventions at every boundary: `N` sequences, `T` completion positions; `logprobs`,
`old_logprobs`, `ref_logprobs`, `sampling_logprobs`, `entropies` are `[N, T]`; `advantages` is `[N]`
or `[N, T]`; `completion_mask` is `[N, T]` with 1 = the token counts in the loss (the EOS token
counts, padding after it does not). Values at padding positions never reach the loss or its
gradient, even when they are inf or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grpokit.core.importance import (
    IMPORTANCE_SAMPLING_LEVELS,
    log_importance_weights,
    off_policy_sequence_mask,
)
from grpokit.core.importance import (  # its home is core.importance; kept here for old imports
    rollout_importance_weights as rollout_importance_weights,
)
from grpokit.core.loss_metrics import (
    cispo_clip_metrics,
    clip_ratio_metrics,
    policy_loss_metrics,
    trl_mean,
)
from grpokit.core.masking import check_same_shape, zero_padding

CISPO_CAP_MODES: tuple[str, ...] = ("absolute", "relative")
KL_BIAS_CORRECTION_LEVELS: tuple[str, ...] = ("token", "sequence")

# ---------------------------------------------------------------------------------------------
# 2. Per-token objectives (losses, i.e. the negated objectives J)
# ---------------------------------------------------------------------------------------------


def ppo_clip_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> Tensor:
    """`-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`, `[N, T]`.

    PPO (arXiv 1707.06347 Eq. 7) as used by GRPO (DeepSeekMath Eq. 3), with DAPO's decoupled
    bounds (Clip-Higher, arXiv 2503.14476 §3.1). With `delta`, the unclipped ratio is also capped
    at `delta` before the min (INTELLECT-2 two-sided clipping, arXiv 2505.07291), which bounds the
    loss of tokens with A < 0 whose ratio has grown large.
    """
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    return -torch.min(ratio * advantages, clipped_ratio * advantages)


def cispo_loss(ratio: Tensor, logprobs: Tensor, advantages: Tensor, *, cap: float) -> Tensor:
    """`-sg(min(r, cap)) A log pi`, `[N, T]`.

    CISPO (MiniMax-M1, arXiv 2506.13585 Eq. 4-5): clip the detached importance weight instead of
    the update, so every token keeps a gradient. No lower bound is applied (the paper sets its
    eps_low large). The cap is `epsilon_high` itself by default (TRL, ScaleRL's eps_max, arXiv
    2510.13786), or `1 + epsilon_high` as MiniMax-M1 writes it (`cispo_cap_mode`,
    `LossOptions.cispo_cap`).
    """
    weight = ratio.clamp(max=cap).detach()
    return -weight * advantages * logprobs


def sapo_loss(
    ratio: Tensor, advantages: Tensor, *, temperature_pos: float, temperature_neg: float
) -> Tensor:
    """`-f(r) A` with the soft gate `f(r) = sigmoid(tau (r - 1)) 4 / tau`, `[N, T]`.

    SAPO (arXiv 2511.20347): a smooth trust region. `f'(1) = 1`, so on-policy the update is the
    plain policy gradient; off-policy it decays smoothly instead of being cut to zero.
    `tau = temperature_pos` where A > 0, `temperature_neg` elsewhere.
    """
    temperature = torch.where(
        advantages > 0,
        torch.full_like(advantages, temperature_pos),
        torch.full_like(advantages, temperature_neg),
    )
    gate = torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature
    return -gate * advantages


def vespo_weights(
    log_ratio: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    rollout_is_weights: Tensor | None = None,
) -> Tensor:
    """VESPO's detached gamma-shaped sequence weight `phi(w) = exp(lambda (1 - w)) w^k`.

    `w = prod_t r_it` is the full sequence ratio (log clamped to [log 1e-8, 20] for safety); the
    shape `(k, lambda)` is `(k_pos, lambda_pos)` where A >= 0 and `(k_neg, lambda_neg)` elsewhere
    (lambda floored at 1e-4, a non-finite phi set to 0, as TRL). `phi(1) = 1`, so on-policy VESPO
    is REINFORCE. A rollout importance weight `pi_old / pi_rollout` (`rollout_is_weights`, `[N, 1]`
    per sequence or `[N, T]` per token, each log clamped to [log 1e-8, 20]) is folded into `w`,
    so that `w` is the ratio to the policy that sampled. Returns `[N, 1]` (or `[N, T]` for
    per-token A).
    """
    with torch.no_grad():
        lower = math.log(1e-8)
        per_token = zero_padding(log_ratio.clamp(-20.0, 20.0), completion_mask)
        log_w = per_token.sum(-1, keepdim=True)  # [N, 1]
        if rollout_is_weights is not None:
            log_is = torch.log(rollout_is_weights.detach().to(log_w.dtype)).clamp(lower, 20.0)
            if log_is.shape[-1] != 1:  # per token: padding carries no weight
                log_is = zero_padding(log_is, completion_mask)
            log_w = log_w + log_is.sum(-1, keepdim=True)
        log_w = log_w.clamp(lower, 20.0)
        nonnegative = advantages >= 0
        k = torch.where(nonnegative, k_pos, k_neg)
        lam = torch.where(nonnegative, lambda_pos, lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_loss(logprobs: Tensor, advantages: Tensor, phi: Tensor) -> Tensor:
    """`-phi A log pi`, `[N, T]`: REINFORCE weighted by VESPO's detached `phi` (`vespo_weights`)."""
    return -phi * advantages * logprobs


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator `ref/pi - log(ref/pi) - 1` of KL(pi_theta || pi_ref), `[N, T]`.

    DeepSeekMath Eq. 4. It is >= 0 (a Bregman gap of log) and 0 exactly when the log-probs agree;
    with samples from pi_theta its mean is the reverse KL.
    """
    log_ref_ratio = ref_logprobs - logprobs
    return torch.exp(log_ref_ratio) - log_ref_ratio - 1


# ---------------------------------------------------------------------------------------------
# 3. Token filters (the off-policy mask and rollout IS weights: core.importance)
# ---------------------------------------------------------------------------------------------


def top_entropy_threshold(entropies: Tensor, quantile: float) -> Tensor:
    """The entropy a loss token needs to pass the top-`quantile` filter: the `(1 - quantile)`
    quantile of `entropies` (`[M]`, the loss tokens' entropies; M > 0), a 0-dim float32."""
    return torch.quantile(entropies.float(), 1 - quantile)


def high_entropy_mask(
    entropies: Tensor, completion_mask: Tensor, quantile: float, threshold: Tensor | None = None
) -> Tensor:
    """Keep the top-`quantile` fraction of loss tokens by entropy, `[N, T]` bool.

    "Beyond the 80/20 rule" (arXiv 2506.01939 Eq. 6): the threshold is the `(1 - quantile)`
    quantile of the entropies of the micro-batch's loss tokens (`top_entropy_threshold`), or
    `threshold` when given (with several processes, TRL's quantile over every process's
    micro-batch). `quantile = 1` keeps every token.
    """
    if threshold is None:
        valid = entropies.detach()[completion_mask]
        if valid.numel() == 0:
            return completion_mask
        threshold = top_entropy_threshold(valid, quantile)
    return (entropies.detach() >= threshold) & completion_mask


# ---------------------------------------------------------------------------------------------
# 4. Aggregations: [N, T] per-token losses -> scalar
# ---------------------------------------------------------------------------------------------


def sequence_mean_aggregation(per_token_loss: Tensor, completion_mask: Tensor) -> Tensor:
    """`mean_i (sum_t l_it / |o_i|)`: GRPO (DeepSeekMath Eq. 3), SAPO; verl seq-mean-token-mean.

    A sequence without loss tokens contributes 0 and still counts in the mean over sequences
    (as in TRL).
    """
    lengths = completion_mask.sum(-1).clamp(min=1)  # [N]
    return (zero_padding(per_token_loss, completion_mask).sum(-1) / lengths).mean()


def token_mean_aggregation(
    per_token_loss: Tensor, completion_mask: Tensor, num_items: float | Tensor | None = None
) -> Tensor:
    """`sum_it l_it / num_items`: DAPO's token-level loss (arXiv 2503.14476 Eq. 12), CISPO, BNPO.

    `num_items` is the number of loss tokens the loss should be normalised by; None = this
    micro-batch's count (TRL's "bnpo"). Passing the whole generation batch's count makes the
    micro-batch losses sum to the whole-batch loss (TRL's "dapo").
    """
    total = zero_padding(per_token_loss, completion_mask).sum()
    if num_items is None:
        return total / completion_mask.sum().clamp(min=1)
    return total / num_items


def constant_length_aggregation(
    per_token_loss: Tensor, completion_mask: Tensor, max_completion_length: int
) -> Tensor:
    """`sum_it l_it / (N * L)` with the constant `L = max_completion_length`.

    Dr. GRPO (arXiv 2503.20783 §3.2, Listing 1): no per-sequence 1/|o_i|, so no length bias.
    """
    n = per_token_loss.shape[0]
    return zero_padding(per_token_loss, completion_mask).sum() / (n * max_completion_length)


def sequence_sum_aggregation(per_token_loss: Tensor, completion_mask: Tensor) -> Tensor:
    """`mean_i sum_t l_it`: LUSPO, i.e. GSPO with each sequence's loss multiplied by `|o_i|`."""
    return zero_padding(per_token_loss, completion_mask).sum(-1).mean()


# Loss types: one spec per loss type, in one registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossInputs:
    """What a per-token objective (and a loss type's metrics) reads.

    Attributes:
        logprobs: `[N, T]` current-policy log-probs (with grad), in the loss dtype, 0 at padding.
        log_ratio: `[N, T]` token-level `log(pi_theta / pi_old)`, 0 at padding.
        ratio: `[N, T]` importance weight at `options.importance_sampling_level`.
        advantages: `[N, 1]` or `[N, T]`, detached.
        mask: `[N, T]` bool, True = loss token.
        options: The loss options (clip bounds, gate temperatures, ...).
        rollout_is_weights: Detached `pi_old / pi_rollout` weights, `[N, 1]` or `[N, T]`, or None;
            for a loss type that folds them into its objective (`LossSpec.folds_rollout_weights`).
    """

    logprobs: Tensor
    log_ratio: Tensor
    ratio: Tensor
    advantages: Tensor
    mask: Tensor
    options: LossOptions
    rollout_is_weights: Tensor | None = None

    @property
    def natural_ratio(self) -> Tensor:
        """The ratio in TRL's shape: `[N, 1]` at the sequence levels (one per sequence), `[N, T]`
        at the token level. Metrics average it (and what is derived from it) per sequence or per
        loss token according to this shape (`loss_metrics.trl_mean`)."""
        if self.options.importance_sampling_level == "token":
            return self.ratio
        return self.ratio[:, :1]


Objective = Callable[[LossInputs], Tensor]  # LossInputs -> [N, T] per-token loss (the -J)
LossMetrics = Callable[[LossInputs], dict[str, Tensor]]  # LossInputs -> 0-dim detached metrics


def _ppo_clip(x: LossInputs) -> Tensor:
    o = x.options
    return ppo_clip_loss(
        x.ratio, x.advantages, epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, delta=o.delta
    )


def _cispo(x: LossInputs) -> Tensor:
    return cispo_loss(x.ratio, x.logprobs, x.advantages, cap=x.options.cispo_cap)


def _sapo(x: LossInputs) -> Tensor:
    o = x.options
    return sapo_loss(
        x.ratio,
        x.advantages,
        temperature_pos=o.sapo_temperature_pos,
        temperature_neg=o.sapo_temperature_neg,
    )


def _vespo_phi(x: LossInputs) -> Tensor:
    o = x.options
    return vespo_weights(
        x.log_ratio,
        x.advantages,
        x.mask,
        k_pos=o.vespo_k_pos,
        lambda_pos=o.vespo_lambda_pos,
        k_neg=o.vespo_k_neg,
        lambda_neg=o.vespo_lambda_neg,
        rollout_is_weights=x.rollout_is_weights,
    )


def _vespo(x: LossInputs) -> Tensor:
    return vespo_loss(x.logprobs, x.advantages, _vespo_phi(x))


def _vespo_metrics(x: LossInputs) -> dict[str, Tensor]:
    """TRL's `vespo/phi_seq_mean`: the mean of phi (per sequence, or per token for [N, T] A)."""
    return {"vespo/phi_seq_mean": trl_mean(_vespo_phi(x), x.mask)}


# What an aggregation divides by. It decides how micro-batch losses make an optimizer step's loss
# (grpokit.train.microbatch):
# - STEP_TOKENS: `num_items_in_batch`, the loss tokens of the whole step, so the micro-batch
#   losses *sum* to the step's loss;
# - ROWS: the number of rows passed (a mean over sequences, or N * L), so a micro-batch's share of
#   the step is its share of the step's rows;
# - MICRO_BATCH_TOKENS: this micro-batch's own loss tokens, so the update depends on which rows
#   share a micro-batch.
STEP_TOKENS, ROWS, MICRO_BATCH_TOKENS = "step_tokens", "rows", "micro_batch_tokens"


@dataclass(frozen=True)
class Aggregation:
    """`[N, T]` per-token losses -> the micro-batch's scalar loss, and what it divides by.

    Attributes:
        reduce: `(per_token_loss [N, T], mask [N, T] bool, num_items_in_batch, options) -> []`.
        divides_by: `STEP_TOKENS`, `ROWS` or `MICRO_BATCH_TOKENS` (see above).
    """

    reduce: Callable[[Tensor, Tensor, float | Tensor | None, LossOptions], Tensor]
    divides_by: str


def _constant_length(
    loss: Tensor, mask: Tensor, num_items: float | Tensor | None, options: LossOptions
) -> Tensor:
    assert options.max_completion_length is not None  # LossOptions checks it for this aggregation
    return constant_length_aggregation(loss, mask, options.max_completion_length)


AGGREGATIONS: dict[str, Aggregation] = {
    "sequence_mean": Aggregation(
        lambda loss, mask, n, o: sequence_mean_aggregation(loss, mask), ROWS
    ),
    "sequence_sum": Aggregation(
        lambda loss, mask, n, o: sequence_sum_aggregation(loss, mask), ROWS
    ),
    "constant_length": Aggregation(_constant_length, ROWS),
    "local_token_mean": Aggregation(
        lambda loss, mask, n, o: token_mean_aggregation(loss, mask), MICRO_BATCH_TOKENS
    ),
    "global_token_mean": Aggregation(
        lambda loss, mask, n, o: token_mean_aggregation(loss, mask, n), STEP_TOKENS
    ),
}


@dataclass(frozen=True)
class LossSpec:
    """One loss type: its per-token objective, its aggregation, and the facts derived from them
    that the trainer and the micro-batch planner read.

    Attributes:
        name: The `loss_type` value.
        objective: `LossInputs -> [N, T]` per-token loss.
        aggregation: A key of `AGGREGATIONS`.
        uses_ppo_clip: The objective is the PPO clip, so `delta` applies to it.
        check: Optional extra check of the options for this loss type; raises `ValueError`.
        metrics: Optional `LossInputs -> {name: 0-dim tensor}`, the loss type's own metrics
            (TRL's names: `clip_ratio/*` for the PPO clip, `cispo_clip_ratio`,
            `vespo/phi_seq_mean`).
        folds_rollout_weights: The objective applies the rollout importance weights itself
            (`LossInputs.rollout_is_weights`; VESPO folds them into its sequence ratio), so
            `policy_loss` does not multiply the per-token loss by them.
    """

    name: str
    objective: Objective
    aggregation: str
    uses_ppo_clip: bool = False
    check: Callable[[LossOptions], None] | None = None
    metrics: LossMetrics | None = None
    folds_rollout_weights: bool = False

    @property
    def sums_over_step(self) -> bool:
        """Divides by `num_items_in_batch`: a step's micro-batch losses sum to the step's loss."""
        return AGGREGATIONS[self.aggregation].divides_by == STEP_TOKENS

    @property
    def divides_by_rows(self) -> bool:
        """Divides by the number of rows passed: a per-micro-batch mean over rows."""
        return AGGREGATIONS[self.aggregation].divides_by == ROWS

    @property
    def depends_on_grouping(self) -> bool:
        """Divides by the micro-batch's own loss tokens: the update depends on which rows share a
        micro-batch (so the planner must keep the plain micro-batches)."""
        return AGGREGATIONS[self.aggregation].divides_by == MICRO_BATCH_TOKENS


def _check_vespo(o: LossOptions) -> None:
    if o.importance_sampling_level != "token":
        raise ValueError(
            "loss_type='vespo' computes its own sequence weight from the token log-ratios; set "
            f"importance_sampling_level='token' (got {o.importance_sampling_level!r})."
        )
    if min(o.vespo_k_pos, o.vespo_k_neg) < 0 or min(o.vespo_lambda_pos, o.vespo_lambda_neg) <= 0:
        raise ValueError(
            "VESPO needs vespo_k_pos, vespo_k_neg >= 0 and vespo_lambda_pos, vespo_lambda_neg > 0; "
            f"got k=({o.vespo_k_pos}, {o.vespo_k_neg}), "
            f"lambda=({o.vespo_lambda_pos}, {o.vespo_lambda_neg})."
        )


# The registry: loss_type -> spec. `register_loss_type` adds to it.
LOSS_SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        *(
            LossSpec(name, _ppo_clip, aggregation, uses_ppo_clip=True, metrics=clip_ratio_metrics)
            for name, aggregation in (
                ("grpo", "sequence_mean"),
                ("bnpo", "local_token_mean"),
                ("dr_grpo", "constant_length"),
                ("dapo", "global_token_mean"),
                ("luspo", "sequence_sum"),
            )
        ),
        LossSpec("cispo", _cispo, "global_token_mean", metrics=cispo_clip_metrics),
        LossSpec("sapo", _sapo, "sequence_mean"),
        LossSpec(
            "vespo",
            _vespo,
            "global_token_mean",
            check=_check_vespo,
            metrics=_vespo_metrics,
            folds_rollout_weights=True,
        ),
    )
}
LOSS_TYPES: tuple[str, ...] = tuple(LOSS_SPECS)  # the built-in loss types


def register_loss_type(
    name: str,
    objective: Objective,
    aggregation: str,
    *,
    uses_ppo_clip: bool = False,
    check: Callable[[LossOptions], None] | None = None,
    metrics: LossMetrics | None = None,
    folds_rollout_weights: bool = False,
) -> LossSpec:
    """Add a loss type: after this, `LossOptions(loss_type=name)` and
    `GRPOConfig(loss_type=name)` train with it; nothing else needs editing.

    Args:
        name: The new `loss_type` value.
        objective: `LossInputs -> [N, T]` per-token loss; its own hyperparameters can be bound
            with a closure or `functools.partial`.
        aggregation: A key of `AGGREGATIONS` (e.g. "global_token_mean", "sequence_mean").
        uses_ppo_clip: Whether `delta` applies (the objective is the PPO clip).
        check: Optional extra check of the `LossOptions`, raising `ValueError`.
        metrics: Optional `LossInputs -> {name: 0-dim tensor}` of the loss type's own metrics;
            None = TRL's `clip_ratio/*` when `uses_ppo_clip`, else none.
        folds_rollout_weights: The objective applies `LossInputs.rollout_is_weights` itself.

    Returns:
        The registered `LossSpec`.

    Raises:
        ValueError: `name` is already registered, or `aggregation` is unknown.
    """
    if name in LOSS_SPECS:
        raise ValueError(f"loss_type {name!r} is already registered; pick another name.")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {tuple(AGGREGATIONS)}, got {aggregation!r}.")
    if metrics is None and uses_ppo_clip:
        metrics = clip_ratio_metrics
    spec = LossSpec(
        name,
        objective,
        aggregation,
        uses_ppo_clip=uses_ppo_clip,
        check=check,
        metrics=metrics,
        folds_rollout_weights=folds_rollout_weights,
    )
    LOSS_SPECS[name] = spec
    return spec


# ---------------------------------------------------------------------------------------------
# Options: built and checked once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossOptions:
    """The options of `policy_loss`, checked once when built. Defaults and meanings follow TRL's
    `GRPOConfig`; `GRPOConfig.loss_options()` builds them from a config.

    Attributes:
        loss_type: A key of `LOSS_SPECS` (default "dapo", as TRL).
        importance_sampling_level: "token", "sequence" (GSPO) or "sequence_token" (GSPO-token).
        epsilon_low: Lower clip: ratios below `1 - epsilon_low` are clipped.
        epsilon_high: Upper clip: `1 + epsilon_high` (DAPO uses 0.28). For `cispo` it sets the
            IS-weight cap, per `cispo_cap_mode`.
        cispo_cap_mode: How `cispo` caps its weight: "absolute" (default, TRL and ScaleRL's
            eps_max, arXiv 2510.13786): at `epsilon_high` itself (TRL recommends 5.0);
            "relative" (MiniMax-M1 Eq. 5, arXiv 2506.13585): at `1 + epsilon_high`.
        delta: INTELLECT-2 cap on the unclipped ratio (> 1 + epsilon_high), PPO-clip losses only.
        beta: KL coefficient; 0 skips the KL entirely (then `ref_logprobs` is not needed).
        use_bias_correction_kl: Multiply the per-token k3 by an importance ratio `pi_theta /
            pi_old` (DeepSeek-V3.2, arXiv 2512.02556), making it unbiased under samples from the
            old policy; which ratio is `kl_bias_correction_level`.
        kl_bias_correction_level: The ratio the KL is corrected with: None (default, TRL) = the
            one of `importance_sampling_level` (at "sequence", the sequence ratio); "token" = the
            token ratio, DeepSeek-V3.2's per-token correction of the per-token KL at every level;
            "sequence" = the sequence ratio at every level.
        max_completion_length: `L` for `dr_grpo` (required by its aggregation).
        top_entropy_quantile: Keep only this top fraction of tokens by entropy (1 = all). As in
            TRL the normaliser is not changed (see docs/LOSSES.md).
        off_policy_mask_threshold: DeepSeek-V3.2 off-policy sequence masking threshold (None = off).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures where A > 0 / A <= 0.
        vespo_k_pos, vespo_lambda_pos: VESPO gamma shape and rate where A >= 0.
        vespo_k_neg, vespo_lambda_neg: VESPO gamma shape and rate where A < 0.

    Raises:
        ValueError: for an unknown `loss_type` or `importance_sampling_level`, negative epsilons,
            `delta <= 1 + epsilon_high` or `delta` with a loss type it does not apply to, a
            negative `beta`, `top_entropy_quantile` outside (0, 1], a missing or non-positive
            `max_completion_length` where needed, non-positive SAPO temperatures, or what the loss
            type's own `check` rejects (VESPO: a sequence level, non-positive rates).
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    cispo_cap_mode: str = "absolute"
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    kl_bias_correction_level: str | None = None
    max_completion_length: int | None = None
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_SPECS:
            raise ValueError(
                f"loss_type must be one of {tuple(LOSS_SPECS)}, got {self.loss_type!r}."
            )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}."
            )
        self._check_clipping()
        self._check_filters()
        if self.spec.check is not None:
            self.spec.check(self)

    @property
    def spec(self) -> LossSpec:
        """The `LossSpec` of `loss_type`."""
        return LOSS_SPECS[self.loss_type]

    @property
    def cispo_cap(self) -> float:
        """The cap of CISPO's importance weight: `epsilon_high` ("absolute") or `1 +
        epsilon_high` ("relative"), per `cispo_cap_mode`."""
        return self.epsilon_high + (1.0 if self.cispo_cap_mode == "relative" else 0.0)

    @property
    def kl_correction_level(self) -> str:
        """The level of the ratio the KL is multiplied by (`kl_bias_correction_level`)."""
        return self.kl_bias_correction_level or self.importance_sampling_level

    def _check_clipping(self) -> None:
        for name, value in (("epsilon_low", self.epsilon_low), ("epsilon_high", self.epsilon_high)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.delta is not None:
            if not self.spec.uses_ppo_clip:
                ppo = tuple(name for name, spec in LOSS_SPECS.items() if spec.uses_ppo_clip)
                raise ValueError(
                    f"delta (INTELLECT-2 two-sided clipping) applies to the PPO-clip losses {ppo}, "
                    f"not loss_type={self.loss_type!r}; set delta=None."
                )
            if not self.delta > 1 + self.epsilon_high:
                raise ValueError(
                    f"delta must be > 1 + epsilon_high = {1 + self.epsilon_high} (it caps ratios "
                    f"above the clip range; INTELLECT-2 uses 4); got delta={self.delta}."
                )
        if self.cispo_cap_mode not in CISPO_CAP_MODES:
            raise ValueError(
                f"cispo_cap_mode must be one of {CISPO_CAP_MODES}, got {self.cispo_cap_mode!r}."
            )
        if not (self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0):
            raise ValueError(
                "sapo_temperature_pos and sapo_temperature_neg must be > 0; got "
                f"{self.sapo_temperature_pos}, {self.sapo_temperature_neg}."
            )

    def _check_filters(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(
                f"beta (KL coefficient) must be a finite number >= 0, got {self.beta}."
            )
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(
                f"top_entropy_quantile must be in (0, 1] (1 keeps every token; the 80/20 paper "
                f"uses 0.2); got {self.top_entropy_quantile}."
            )
        level = self.kl_bias_correction_level
        if level is not None and level not in KL_BIAS_CORRECTION_LEVELS:
            raise ValueError(
                f"kl_bias_correction_level must be None (the importance_sampling_level's ratio, "
                f"as TRL) or one of {KL_BIAS_CORRECTION_LEVELS}, got {level!r}."
            )
        length = self.max_completion_length
        if length is not None and length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {length}.")
        if length is None and self.spec.aggregation == "constant_length":
            raise ValueError(
                f"loss_type={self.loss_type!r} divides by N * max_completion_length; pass "
                "max_completion_length (the generation length limit, a constant)."
            )
        threshold = self.off_policy_mask_threshold
        if threshold is not None and not threshold >= 0:
            raise ValueError(
                "off_policy_mask_threshold must be >= 0 or None (TRL suggests 0.5); "
                f"got {threshold}."
            )


# ---------------------------------------------------------------------------------------------
# policy_loss: composition in TRL's order
# ---------------------------------------------------------------------------------------------


def _constant(values: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A detached per-token input in `dtype`, 0 at padding."""
    return zero_padding(values.detach().to(dtype), mask)


def _check_inputs(
    logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    num_items_in_batch: float | Tensor | None,
    rollout_is_weights: Tensor | None,
    **per_token: Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}.")
    check_same_shape(logprobs, completion_mask=completion_mask, **per_token)
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be [N] = [{logprobs.shape[0]}] or [N, T] = {list(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}."
        )
    n = logprobs.shape[0]
    if rollout_is_weights is not None and rollout_is_weights.shape not in ((n, 1), logprobs.shape):
        raise ValueError(
            f"rollout_is_weights must be [N, 1] = [{n}, 1] (per sequence) or [N, T] = "
            f"{list(logprobs.shape)} (per token), got {tuple(rollout_is_weights.shape)}."
        )
    if num_items_in_batch is not None and not float(num_items_in_batch) > 0:
        raise ValueError(
            f"num_items_in_batch must be > 0 (the loss-token count of the generation batch), "
            f"got {float(num_items_in_batch)}."
        )


def loss_token_mask(
    completion_mask: Tensor,
    options: LossOptions,
    entropies: Tensor | None = None,
    entropy_threshold: Tensor | None = None,
) -> Tensor:
    """The tokens the policy loss acts on after the top-entropy filter, `[N, T]` bool.

    `completion_mask` (1 = loss token) restricted to the top `top_entropy_quantile` of its tokens
    by entropy (`high_entropy_mask`, with `entropy_threshold` when given) when that is < 1. TRL's
    entropy bonus averages over these tokens (`core.entropy.entropy_bonus`).

    Raises:
        ValueError: `top_entropy_quantile < 1` without `entropies`.
    """
    mask = completion_mask.bool()
    if options.top_entropy_quantile >= 1.0:
        return mask
    if entropies is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token `entropies`; pass them.")
    return high_entropy_mask(entropies, mask, options.top_entropy_quantile, entropy_threshold)


def _token_filters(
    x: LossInputs, behaviour_logprobs: Tensor, entropies: Tensor | None, threshold: Tensor | None
) -> Tensor:
    """`[N, T]` float multiplier from the off-policy and entropy masks (1 = keep)."""
    o = x.options
    keep = loss_token_mask(x.mask, o, entropies, threshold)
    if o.off_policy_mask_threshold is not None:
        keep = keep & off_policy_sequence_mask(
            x.logprobs, behaviour_logprobs, x.advantages, x.mask, o.off_policy_mask_threshold
        )
    return keep.to(x.logprobs.dtype)


_DEFAULT_OPTIONS = LossOptions()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    options: LossOptions = _DEFAULT_OPTIONS,
    *,
    ref_logprobs: Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
    entropies: Tensor | None = None,
    sampling_logprobs: Tensor | None = None,
    rollout_is_weights: Tensor | None = None,
    entropy_threshold: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of one micro-batch, and its metrics: TRL's `GRPOTrainer._compute_loss`.

    Per token: objective(`loss_type`) x off-policy mask x entropy mask x rollout IS weight
    + `beta` * KL, then the aggregation of `loss_type` over `completion_mask` (TRL's order). The
    built-in loss types (`LOSS_SPECS`; `register_loss_type` adds more):

    | loss_type | per-token objective | aggregation |
    |---|---|---|
    | grpo | PPO clip | mean over each sequence's tokens, then over sequences |
    | bnpo | PPO clip | sum / loss tokens of this micro-batch |
    | dr_grpo | PPO clip | sum / (N * max_completion_length) |
    | dapo | PPO clip | sum / num_items_in_batch (micro-batch count if None) |
    | luspo | PPO clip | sum over each sequence's tokens, mean over sequences |
    | cispo | clipped detached IS weight x log pi | as dapo |
    | sapo | soft gate | as grpo |
    | vespo | detached gamma sequence weight x log pi | as dapo |

    With TRL's entropy regularisation, a micro-batch's loss is `policy_loss(...) - entropy_coef *
    core.entropy.entropy_bonus(...)`. For one micro-batch per optimizer step (TRL's
    `gradient_accumulation_steps=1`, `num_items_in_batch` = the batch's loss tokens), loss,
    gradient and metrics equal TRL 1.16's on the same tensors (tests/test_trl_parity.py).

    Micro-batching: when `options.spec.sums_over_step` (dapo, cispo, vespo) and
    `num_items_in_batch` = the loss-token count of the whole batch being accumulated, the
    micro-batch losses *sum* to the whole-batch loss. The other aggregations are per-micro-batch
    means (see `grpokit.train.microbatch` for how the trainer weights them).

    Args:
        logprobs: `[N, T]` float log-probs of the completion tokens under the current policy.
        old_logprobs: `[N, T]` log-probs under the sampling policy; None = on-policy
            (`logprobs.detach()`), where every ratio is 1.
        advantages: `[N]` (one per sequence) or `[N, T]`.
        completion_mask: `[N, T]`; 1 = the token counts in the loss (EOS counts, padding does
            not). Zero the rows of truncated completions before calling to mask them.
        options: The `LossOptions` (checked when built); default `LossOptions()`.
        ref_logprobs: `[N, T]` reference-model log-probs, required when `options.beta != 0`.
        num_items_in_batch: Loss-token count to normalise `dapo`/`cispo`/`vespo` by.
        entropies: `[N, T]` per-token entropies; logged, and used by `top_entropy_quantile`.
        sampling_logprobs: `[N, T]` rollout-engine log-probs; the behaviour policy for the
            off-policy mask (falls back to `old_logprobs`).
        rollout_is_weights: Detached weights from `rollout_importance_weights`, `[N, 1]` per
            sequence or `[N, T]` per token.
        entropy_threshold: The top-entropy filter's threshold (0-dim) instead of this
            micro-batch's own quantile: with several processes, the quantile over every
            process's micro-batch (`top_entropy_threshold` of their gathered entropies), as TRL.

    Returns:
        `(loss, metrics)`: the scalar loss (float32, or float64 for float64 `logprobs`;
        differentiable w.r.t. `logprobs`) and detached 0-dim metrics with TRL's names
        and meanings. A mean over "sequences" below is over the N rows when the value is one
        per sequence (a sequence-level ratio with per-sequence advantages), else over loss
        tokens (`trl_mean`):

        - PPO-clip loss types: `clip_ratio/low_mean` (ratio < 1 - epsilon_low with A < 0),
          `clip_ratio/high_mean` (ratio > 1 + epsilon_high with A > 0),
          `clip_ratio/region_mean` (either), and the min / max over sequences of each
          sequence's low / high fraction, `clip_ratio/low_min` / `clip_ratio/high_max`;
        - cispo: `cispo_clip_ratio` (weight capped, A > 0); vespo: `vespo/phi_seq_mean`;
        - `kl` (when beta != 0; over loss tokens, after the bias correction), `entropy` (when
          `entropies` is given; over loss tokens);
        - grpokit's `ratio/mean`, `ratio/min` and `ratio/max` over loss tokens (a sequence's
          ratio counted once per token; 1 without loss tokens).

        Keys whose last part starts or ends with `min` / `max` are to be min- or max-reduced
        across micro-batches, the rest averaged.

    Raises:
        ValueError: on mismatched shapes, or a missing input the options need (ref_logprobs,
            entropies).
    """
    _check_inputs(
        logprobs,
        advantages,
        completion_mask,
        num_items_in_batch,
        rollout_is_weights,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        entropies=entropies,
        sampling_logprobs=sampling_logprobs,
    )
    if options.beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's log-probs).")

    mask = completion_mask.bool()  # [N, T], True = loss token
    # Zero every per-token input at padding first: no inf/NaN there can reach a value or gradient.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    logprobs = zero_padding(logprobs.to(dtype), mask)  # [N, T]
    old = logprobs.detach() if old_logprobs is None else _constant(old_logprobs, mask, dtype)
    adv = advantages.detach().to(dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    is_weights = None
    if rollout_is_weights is not None:  # [N, 1] or [N, T]; a per-token weight is 0 at padding
        is_weights = rollout_is_weights.detach().to(dtype)
        if is_weights.shape[-1] != 1:
            is_weights = zero_padding(is_weights, mask)
    spec = options.spec
    x = LossInputs(
        logprobs=logprobs,
        log_ratio=zero_padding(logprobs - old, mask),
        ratio=torch.exp(
            log_importance_weights(logprobs, old, mask, options.importance_sampling_level)
        ),
        advantages=adv,
        mask=mask,
        options=options,
        rollout_is_weights=is_weights if spec.folds_rollout_weights else None,
    )

    per_token_loss = spec.objective(x)  # [N, T]
    behaviour = old if sampling_logprobs is None else _constant(sampling_logprobs, mask, dtype)
    per_token_loss = per_token_loss * _token_filters(x, behaviour, entropies, entropy_threshold)
    if is_weights is not None and not spec.folds_rollout_weights:
        per_token_loss = per_token_loss * is_weights

    kl = None
    if options.beta != 0:
        assert ref_logprobs is not None  # checked above
        kl = k3_kl(logprobs, _constant(ref_logprobs, mask, dtype))  # [N, T], 0 at padding
        if options.use_bias_correction_kl:  # times pi_theta / pi_old (DeepSeek-V3.2)
            level = options.kl_correction_level
            ratio = x.ratio
            if level != options.importance_sampling_level:
                ratio = torch.exp(log_importance_weights(logprobs, old, mask, level))
            kl = kl * ratio
        per_token_loss = per_token_loss + options.beta * kl

    aggregation = AGGREGATIONS[spec.aggregation]
    loss = aggregation.reduce(per_token_loss, mask, num_items_in_batch, options)
    return loss, policy_loss_metrics(x, kl, entropies)
