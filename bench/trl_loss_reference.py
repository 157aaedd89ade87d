"""Write TRL's own loss values to a fixture that grpokit's tests compare against.

Calls TRL 1.16's `GRPOTrainer._compute_loss` itself (the real method, not a copy) on fixed
random tensors for a grid of settings, and writes the inputs, the loss, its gradient with
respect to the log-probs (and the entropies, when the entropy bonus is on) and every metric TRL
records to `tests/data/trl_loss_reference.json`. `tests/test_trl_parity.py` recomputes each case
with `grpokit.core.losses.policy_loss` (and `core.entropy`) and compares, so CI checks parity
without TRL installed.

The trainer object is a `GRPOTrainer` made without `__init__` and given the attributes
`_compute_loss` reads (one process, no gradient accumulation: `current_gradient_accumulation_steps
= steps_per_generation = 1`); its `_get_per_token_logps_and_entropies` returns the fixture's
log-probs and entropies as leaf tensors, so no model runs.

Run inside the TRL environment (TRL is never a grpokit dependency), from the repository root:

    bench/.venv-trl/bin/python bench/trl_loss_reference.py  # -> tests/data/trl_loss_reference.json
"""

from __future__ import annotations

import argparse
import json
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import trl
from trl import GRPOTrainer

N, T = 6, 5  # rows, completion positions
MAX_COMPLETION_LENGTH = 6  # dr_grpo's L (longer than T, as in real batches)
PPO_CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")

# ---------------------------------------------------------------------------------------------
# Inputs: float32-representable values (stored exactly in JSON), computed in float64.
# ---------------------------------------------------------------------------------------------


def make_inputs(seed: int, lengths: list[int]) -> dict[str, Any]:
    """One set of tensors. Padding positions hold finite garbage, which must not matter."""
    g = torch.Generator().manual_seed(seed)

    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.float().double()

    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()  # [N, T]
    logprobs = f32(-torch.rand(N, T, generator=g) * 3 - 0.05)
    old = f32(logprobs + 0.4 * torch.randn(N, T, generator=g))
    ref = f32(logprobs + 0.3 * torch.randn(N, T, generator=g))
    sampling = f32(old + 0.2 * torch.randn(N, T, generator=g))
    entropies = f32(torch.rand(N, T, generator=g) * 3)
    advantages = f32(torch.randn(N, generator=g))
    token_advantages = f32(torch.randn(N, T, generator=g))
    # Rollout importance weights as TRL builds them: per token [N, T] (1 at padding) or per
    # sequence [N, 1]; a masked-IS weight is 0.
    token_is = f32(torch.rand(N, T, generator=g) * 2.5)
    token_is[0, 1] = 0.0
    token_is = torch.where(mask > 0, token_is, torch.ones_like(token_is))
    sequence_is = f32(torch.rand(N, 1, generator=g) * 2.5)
    sequence_is[2, 0] = 0.0
    garbage = f32(torch.randn(N, T, generator=g))
    for t in (logprobs, old, ref, sampling, entropies, token_advantages):
        t.copy_(torch.where(mask > 0, t, garbage))
    tensors = {
        "completion_mask": mask,
        "logprobs": logprobs,
        "old_logprobs": old,
        "ref_logprobs": ref,
        "sampling_logprobs": sampling,
        "entropies": entropies,
        "advantages": advantages,
        "token_advantages": token_advantages,
        "token_is_weights": token_is,
        "sequence_is_weights": sequence_is,
    }
    num_items = float(mask.sum()) + 7.0  # as if the step held more loss tokens than this batch
    # 9 significant digits give back each float32 value exactly (the test reads them as float32)
    return {
        "tensors": {k: _rounded(v.tolist(), 9) for k, v in tensors.items()},
        "num_items_in_batch": num_items,
    }


def _rounded(value: Any, digits: int) -> Any:
    """`value` (nested lists/dicts of floats) with floats to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


INPUT_SETS = {
    "padded": make_inputs(0, [5, 3, 5, 1, 4, 2]),
    "with_empty_row": make_inputs(1, [5, 2, 0, 4, 5, 3]),
}

# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "on_policy": {"on_policy": True},
    "kl": {"beta": 0.04},
    "kl_uncorrected": {"beta": 0.04, "use_bias_correction_kl": False},
    "delta": {"delta": 1.5},
    "top_entropy": {"top_entropy_quantile": 0.5},
    "off_policy_mask": {"off_policy_mask_threshold": 0.05},
    "is_token": {"is": "token"},
    "is_sequence": {"is": "sequence"},
    "entropy_bonus": {"entropy_coef": 0.1},
    "token_advantages": {"token_advantages": True},
    "everything": {
        "beta": 0.04,
        "top_entropy_quantile": 0.6,
        "off_policy_mask_threshold": 0.05,
        "is": "sequence",
        "entropy_coef": 0.05,
        "delta": 1.5,
    },
}


def grid() -> list[dict[str, Any]]:
    cases = []
    for loss_type in (*PPO_CLIP, "cispo", "sapo", "vespo"):
        levels = ("token",) if loss_type == "vespo" else ("token", "sequence")
        for level in levels:
            for variant, settings in VARIANTS.items():
                settings = dict(settings)
                if loss_type not in PPO_CLIP:
                    if variant == "delta":
                        continue  # delta applies to the PPO clip only (an error in grpokit)
                    settings.pop("delta", None)
                inputs = ["padded"] if variant not in ("plain", "kl") else list(INPUT_SETS)
                for input_set in inputs:
                    cases.append(
                        {
                            "name": f"{loss_type}/{level}/{variant}/{input_set}",
                            "loss_type": loss_type,
                            "importance_sampling_level": level,
                            "inputs": input_set,
                            "epsilon_low": 0.2,
                            # TRL's CISPO caps the weight at epsilon_high itself
                            "epsilon_high": 1.25 if loss_type == "cispo" else 0.28,
                            "max_completion_length": MAX_COMPLETION_LENGTH,
                            **settings,
                        }
                    )
    return cases


# Adaptive entropy control: the same batch over consecutive optimizer steps, with the entropies
# scaled per step so that the measured entropy crosses the target (1.2 nats) both ways.
ADAPTIVE_SEQUENCES = [
    {
        "name": f"{loss_type}/{level}/adaptive{'_top_entropy' if q < 1 else ''}",
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "inputs": "padded",
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "top_entropy_quantile": q,
        "entropy_coef": 0.02,
        "use_adaptive_entropy": True,
        "entropy_coef_min": 0.0,
        "entropy_coef_max": 0.035,
        "entropy_coef_delta": 0.01,
        "entropy_target": 1.2,
        "entropy_scales": [1.0, 0.5, 0.5, 0.3, 0.3, 1.0, 0.2],
    }
    for loss_type, level, q in (("dapo", "token", 1.0), ("grpo", "sequence", 0.6))
]

# ---------------------------------------------------------------------------------------------
# A GRPOTrainer without __init__, holding what _compute_loss reads
# ---------------------------------------------------------------------------------------------


class _Accelerator:
    """One process: gathers and reductions are the identity."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    @staticmethod
    def pad_across_processes(x: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return x


def make_trainer(case: dict[str, Any]) -> Any:
    trainer = object.__new__(GRPOTrainer)
    args = types.SimpleNamespace(
        use_bias_correction_kl=case.get("use_bias_correction_kl", True),
        delta=case.get("delta"),
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=1,
        entropy_target=case.get("entropy_target", 0.2),
        entropy_coef_min=case.get("entropy_coef_min", 0.0),
        entropy_coef_max=case.get("entropy_coef_max", 1.0),
        entropy_coef_delta=case.get("entropy_coef_delta", 0.005),
    )
    attributes = {
        "args": args,
        "accelerator": _Accelerator(),
        "model": types.SimpleNamespace(training=True),
        "loss_type": case["loss_type"],
        "importance_sampling_level": case["importance_sampling_level"],
        "epsilon_low": case["epsilon_low"],
        "epsilon_high": case["epsilon_high"],
        "beta": case.get("beta", 0.0),
        "max_completion_length": case["max_completion_length"],
        "top_entropy_quantile": case.get("top_entropy_quantile", 1.0),
        "off_policy_mask_threshold": case.get("off_policy_mask_threshold"),
        "use_vllm": case.get("is") is not None,
        "vllm_importance_sampling_correction": True,
        "current_gradient_accumulation_steps": 1,
        "aux_loss_enabled": False,
        "entropy_coef": case.get("entropy_coef", 0.0),
        "use_adaptive_entropy": case.get("use_adaptive_entropy", False),
        "_last_world_entropy": float("inf"),
        "_entropy_window_stats": None,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
    }
    attributes["_entropy_bonus_enabled"] = (
        attributes["entropy_coef"] != 0.0 or attributes["use_adaptive_entropy"]
    )
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


def run_case(trainer: Any, case: dict[str, Any], entropy_scale: float = 1.0) -> dict[str, Any]:
    """One `_compute_loss` call; returns the loss, gradients and metrics it recorded."""
    data = INPUT_SETS[case["inputs"]]
    t = {k: torch.tensor(v).double() for k, v in data["tensors"].items()}  # float32 values
    logprobs = t["logprobs"].clone().requires_grad_(True)
    entropies = (t["entropies"] * entropy_scale).requires_grad_(True)

    def per_token_logps_and_entropies(*_args: Any, **_kwargs: Any) -> tuple[Any, Any, None]:
        return logprobs, entropies, None

    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    mask = t["completion_mask"]
    inputs: dict[str, Any] = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long),
        "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": t["token_advantages"] if case.get("token_advantages") else t["advantages"],
        "num_items_in_batch": torch.tensor(data["num_items_in_batch"], dtype=torch.float64),
        "sampling_per_token_logps": t["sampling_logprobs"],
    }
    if not case.get("on_policy"):
        inputs["old_per_token_logps"] = t["old_logprobs"]
    if case.get("beta"):
        inputs["ref_per_token_logps"] = t["ref_logprobs"]
    if case.get("is") is not None:
        inputs["importance_sampling_ratio"] = t[f"{case['is']}_is_weights"]
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    out: dict[str, Any] = {
        "loss": loss.item(),
        "grad_logprobs": logprobs.grad.tolist(),
        "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if v},
    }
    if trainer._entropy_bonus_enabled:
        grad = entropies.grad if entropies.grad is not None else torch.zeros_like(entropies)
        out["grad_entropies"] = grad.tolist()  # d loss / d (the scaled) entropies
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/trl_loss_reference.json")
    out_path = Path(parser.parse_args().out)
    torch.manual_seed(0)
    cases = []
    for case in grid():
        cases.append({**case, "expected": run_case(make_trainer(case), case)})
    sequences = []
    for seq in ADAPTIVE_SEQUENCES:
        trainer = make_trainer(seq)
        steps = []
        for scale in seq["entropy_scales"]:
            steps.append(run_case(trainer, seq, scale))
        sequences.append({**seq, "expected": steps})
    header = {
        "source": f"trl {trl.__version__}, torch {torch.__version__}: GRPOTrainer._compute_loss",
        "generated_by": "bench/trl_loss_reference.py",
        "shape": [N, T],
        "inputs": INPUT_SETS,
    }
    # One case per line (outputs to 12 significant digits), so that a regenerated file diffs well.
    lines = [json.dumps(header)[:-1] + ","]
    for key, items in (("cases", cases), ("adaptive_sequences", sequences)):
        rows = ",\n".join(json.dumps(_rounded(item, 12)) for item in items)
        lines.append(f'"{key}": [\n{rows}\n]' + ("," if key == "cases" else "}"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n")
    json.loads(out_path.read_text())  # well-formed
    print(f"{len(cases)} cases and {len(sequences)} adaptive sequences -> {out_path}")


if __name__ == "__main__":
    main()
