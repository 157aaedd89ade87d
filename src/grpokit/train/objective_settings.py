"""`GRPOConfig`'s fields for the objective: the loss, advantages, KL and entropy terms,
the rollout importance correction, the reference model, reward calls and dynamic sampling.

One of `GRPOConfig`'s bases (`train.config`), a group of fields under its own heading in
`grpokit train --help`. `GRPOConfig.loss_options()` and `entropy_regularization()` turn them into
the options of `core.losses.policy_loss` and `core.entropy`; the values each field accepts are
checked in `train.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpokit.train.fields import option


@dataclass
class ObjectiveSettings:
    """The objective: policy loss, advantages, KL, entropy, rollout correction, rewards."""

    loss_type: str = option(
        "dapo",
        'Policy loss: "grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo" '
        "(docs/LOSSES.md).",
    )
    beta: float = option(
        0.0, "KL coefficient against the reference model. 0 = no reference model is kept or run."
    )
    num_iterations: int = option(
        1, "Passes over each generation batch (μ in DeepSeekMath); > 1 makes the update off-policy."
    )
    epsilon: float = option(
        0.2, "Lower clipping bound of the importance ratio: clip(ratio, 1 - epsilon, ...)."
    )
    epsilon_high: float | None = option(
        None,
        "Upper clipping bound: clip(ratio, ..., 1 + epsilon_high). None = `epsilon` (DAPO: "
        'recommends 0.28). With loss_type="cispo" it caps the importance weight (see '
        "`cispo_cap_mode`; TRL recommends 5.0).",
    )
    cispo_cap_mode: str = option(
        "absolute",
        'How loss_type="cispo" caps its detached importance weight: "absolute" (TRL; ScaleRL\'s '
        'eps_max, arXiv 2510.13786) at `epsilon_high` itself; "relative" (MiniMax-M1, arXiv '
        "2506.13585, equation 5) at 1 + `epsilon_high`.",
    )
    delta: float | None = option(
        None,
        "Two-sided clipping (INTELLECT-2): cap the ratio at delta when advantages are negative.",
    )
    importance_sampling_level: str = option(
        "token",
        'Importance ratio per "token", or per "sequence" (GSPO: geometric mean over the tokens), '
        'or "sequence_token" (GSPO-token: the sequence value, each token\'s gradient its own).',
    )
    scale_rewards: str = option(
        "group",
        'Divide centred rewards by the std of the "group", the "batch", or not at all ("none"). '
        'True = "group", False = "none".',
        takes_bool=True,
    )
    reward_weights: list[float] | None = option(
        None, "One weight per reward function; None = all 1.0."
    )
    multi_objective_aggregation: str = option(
        "sum_then_normalize",
        'Combine several rewards: "sum_then_normalize" or "normalize_then_sum" (GDPO).',
    )
    mask_truncated_completions: bool = option(
        False,
        "Exclude completions that reached max_completion_length without EOS from the loss (DAPO).",
    )
    top_entropy_quantile: float = option(
        1.0,
        "Keep in the loss only the top-ρ fraction of tokens by entropy (Beyond the 80/20 rule).",
    )
    off_policy_mask_threshold: float | None = option(
        None, "DeepSeek-V3.2 off-policy sequence masking threshold δ. None = off."
    )
    use_bias_correction_kl: bool = option(
        True,
        "Multiply the KL term by the importance ratio pi_theta / pi_old (DeepSeek-V3.2 unbiased "
        "KL); only acts when beta > 0. Which ratio: `kl_bias_correction_level`.",
    )
    kl_bias_correction_level: str | None = option(
        None,
        "The ratio `use_bias_correction_kl` multiplies the per-token KL by: None (TRL) = the one "
        'of `importance_sampling_level` (the sequence ratio at "sequence"); "token" = the token '
        "ratio at every level, DeepSeek-V3.2's per-token correction (arXiv 2512.02556); "
        '"sequence" = the sequence ratio at every level.',
    )
    entropy_coef: float = option(
        0.0,
        "Entropy regularisation as TRL: subtract entropy_coef * (mean per-token entropy over the "
        "tokens the policy loss acts on) from each micro-batch's loss; the same meaning for "
        "every loss_type. > 0 encourages exploration. With `use_adaptive_entropy`, the initial "
        "coefficient. 0 = off.",
    )
    use_adaptive_entropy: bool = option(
        False,
        "Adaptive entropy control (Skywork-OR1, arXiv 2505.22312): after each optimizer step "
        "move entropy_coef by `entropy_coef_delta`, up when the step's mean entropy is <= "
        "`entropy_target`, down otherwise (within [entropy_coef_min, entropy_coef_max]); the "
        "bonus applies only while the previous step's entropy is <= entropy_target.",
    )
    entropy_coef_min: float = option(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = option(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = option(
        0.005, "Step of the adaptive entropy coefficient per optimizer step."
    )
    entropy_target: float = option(
        0.2,
        "Target mean per-token entropy (nats) of adaptive entropy control, over the same tokens "
        "as the policy loss. Language models typically sit at 2-10 nats, so the default (as "
        "TRL) rarely engages; set it near the `entropy` logged early in training.",
    )
    sapo_temperature_pos: float = option(
        1.0, "SAPO gate temperature for tokens with positive advantage."
    )
    sapo_temperature_neg: float = option(
        1.05, "SAPO gate temperature for tokens with non-positive advantage."
    )
    vespo_k_pos: float = option(
        2.0,
        'VESPO (loss_type="vespo") gamma shape k where A >= 0: how strongly sequences whose '
        "ratio w < 1 are down-weighted by phi(w) = exp(lambda (1 - w)) w^k. >= 0.",
    )
    vespo_lambda_pos: float = option(
        3.0,
        "VESPO gamma rate lambda where A >= 0: how strongly sequences whose ratio w > 1 are "
        "down-weighted. > 0.",
    )
    vespo_k_neg: float = option(3.0, "VESPO gamma shape k where A < 0. >= 0.")
    vespo_lambda_neg: float = option(2.0, "VESPO gamma rate lambda where A < 0. > 0.")
    vllm_importance_sampling_correction: bool = option(
        True,
        "Correct for a rollout engine whose log-probs differ from the trained model's (TRL's "
        "name; applies to any engine that returns `sampling_logprobs`, never to the default "
        "transformers engine, which samples from the trained model itself): multiply the "
        "per-token loss by the detached weight pi_train / pi_rollout, shaped by "
        "`vllm_importance_sampling_mode`.",
    )
    vllm_importance_sampling_mode: str = option(
        "sequence_mask",
        'Rollout importance sampling: "token_truncate" / "sequence_truncate" cap the per-token '
        '/ per-sequence weight to [clip_min, clip_max] (TIS); "token_mask" / "sequence_mask" '
        "set weights outside it to 0 (MIS / IcePop). Sequence modes use the product of the "
        "token ratios.",
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, "Lower bound of the rollout importance weight; None = no lower bound. >= 0."
    )
    vllm_importance_sampling_clip_max: float | None = option(
        3.0, "Upper bound of the rollout importance weight; None = no upper bound. > clip_min."
    )
    vllm_importance_sampling_cap: float | None = option(
        None,
        "Deprecated in TRL: when set, it replaces vllm_importance_sampling_clip_max (with a "
        "warning), as in TRL.",
    )
    sync_ref_model: bool = option(
        False,
        "Every `ref_model_sync_steps` steps, set ref = alpha * policy + (1 - alpha) * ref "
        "(TR-DPO).",
    )
    ref_model_mixup_alpha: float = option(
        0.6, "alpha of the reference-model mix-up when `sync_ref_model` is on. In [0, 1]."
    )
    ref_model_sync_steps: int = option(
        512, "Optimizer steps between reference-model syncs when `sync_ref_model` is on."
    )
    reward_timeout: float | None = option(
        None,
        "Seconds one call of a reward function may take; None = no limit. With a limit, sync "
        "functions run in a worker thread, which cannot be stopped once timed out and keeps "
        "running: run code that may never return in the sandbox (docs/SECURITY.md). Async "
        "functions are cancelled. See `reward_timeout_policy`.",
    )
    reward_timeout_policy: str = option(
        "error",
        'What a timed-out reward call does: "error" stops training with an error naming the '
        'function; "nan" scores that batch as not applicable for that function (NaN rewards), '
        "with a warning.",
    )
    dynamic_sampling: bool = option(
        False,
        "DAPO's dynamic sampling (arXiv 2503.14476 §3.2): drop prompt groups whose G rewards "
        "are all equal (advantage 0, no policy gradient) and draw more prompts, as many as "
        "groups are missing, until the generation batch holds only groups with varied rewards; "
        "at most `max_dynamic_sampling_draws` extra draws per generation batch.",
    )
    max_dynamic_sampling_draws: int = option(
        10,
        "Extra draws dynamic sampling may make per generation batch. When they are used up, the "
        "batch is completed with equal-reward groups (advantage 0: they add no policy gradient, "
        "as without dynamic sampling) and a warning says how many.",
    )
