"""The optimizer of a run, chosen by transformers' name (`GRPOConfig.optim`).

Each name builds what transformers' `Trainer` builds for it on one device, with
`learning_rate` and, for the Adam family, `adam_beta1`, `adam_beta2` and `adam_epsilon`:

| `optim` | optimizer | `optim_args` keys |
|---|---|---|
| `adamw_torch_fused` | `torch.optim.AdamW(fused=True)` | none |
| `adamw_torch` | `torch.optim.AdamW` (torch's default for-each loop) | none |
| `adafactor` | transformers' `Adafactor(scale_parameter=False, relative_step=False)` | none |
| `sgd` | `torch.optim.SGD` | momentum, dampening, nesterov |
| `adagrad` | `torch.optim.Adagrad` | lr_decay, eps |
| `rmsprop` | `torch.optim.RMSprop` | momentum, alpha, eps, centered |
| `adamw_bnb_8bit`, `adamw_8bit`, `paged_adamw_{8,32}bit` | `bitsandbytes.optim.AdamW` | none |
| `lion_{8,32}bit`, `paged_lion_{8,32}bit` | `bitsandbytes.optim.Lion` | none |

`optim_args` is parsed as transformers parses it (`"momentum=0.9,nesterov=True"`); unlike
transformers, a key the chosen optimizer does not read is an error rather than ignored. Weight
decay is the `weight_decay` field, applied to matrices only (not biases or norm weights) through
two parameter groups; transformers' groups override a `weight_decay` in `optim_args` the same
way, so there it is refused.
bitsandbytes is imported only when one of its optimizers is built; without it, validating the
config is an error that says how to install it. `allocate_state` makes torch Adam's zero state
when training begins instead of in the first step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

TORCH_OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adagrad", "rmsprop")
# name -> (bitsandbytes.optim class, optim_bits, is_paged), as transformers maps them.
BNB_OPTIMIZERS: dict[str, tuple[str, int, bool]] = {
    "adamw_bnb_8bit": ("AdamW", 8, False),
    "adamw_8bit": ("AdamW", 8, False),
    "paged_adamw_8bit": ("AdamW", 8, True),
    "paged_adamw_32bit": ("AdamW", 32, True),
    "lion_8bit": ("Lion", 8, False),
    "lion_32bit": ("Lion", 32, False),
    "paged_lion_8bit": ("Lion", 8, True),
    "paged_lion_32bit": ("Lion", 32, True),
}
OPTIMIZERS = TORCH_OPTIMIZERS + tuple(BNB_OPTIMIZERS)


def _as_bool(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


# The `optim_args` keys each optimizer reads, with how their text is parsed (as transformers does).
OPTIM_ARGS: dict[str, dict[str, Callable[[str], Any]]] = {
    "sgd": {"momentum": float, "dampening": float, "nesterov": _as_bool},
    "adagrad": {"lr_decay": float, "eps": float},
    "rmsprop": {"momentum": float, "alpha": float, "eps": float, "centered": _as_bool},
}


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """`"key=value,key=value"` (spaces ignored) as a dict of strings, as transformers parses it.

    Raises:
        ValueError: an item that is not `key=value`.
    """
    if not optim_args:
        return {}
    out = {}
    for item in optim_args.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"optim_args={optim_args!r}: {item!r} is not `key=value`; write e.g. "
                "'momentum=0.9,nesterov=True'."
            )
        out[key] = value
    return out


def optimizer_arguments(name: str, optim_args: str | None) -> dict[str, Any]:
    """The keyword arguments `optim_args` gives optimizer `name`, parsed.

    Raises:
        ValueError: a key `name` does not read, or a value that does not parse.
    """
    readers = OPTIM_ARGS.get(name, {})
    out = {}
    for key, text in parse_optim_args(optim_args).items():
        if key == "weight_decay":
            raise ValueError(
                "optim_args: set the weight_decay field instead of `weight_decay` in optim_args "
                "(the parameter groups set it: on matrices, not on biases or norm weights)."
            )
        if key not in readers:
            takes = f"it takes {', '.join(readers)}" if readers else "it takes none"
            raise ValueError(f"optim_args: optim={name!r} does not read `{key}` ({takes}).")
        try:
            out[key] = readers[key](text)
        except ValueError:
            raise ValueError(f"optim_args: `{key}={text}` is not a number.") from None
    return out


def check_optimizer(name: str, optim_args: str | None) -> None:
    """Check `optim` and `optim_args` without building anything (config validation).

    Raises:
        ValueError: an unsupported name, bad `optim_args`, or a bitsandbytes optimizer without
            bitsandbytes installed.
    """
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optim={name!r} is not supported; use one of {', '.join(OPTIMIZERS)} "
            "(train.optimizers)."
        )
    optimizer_arguments(name, optim_args)
    if name in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"optim={name!r} needs bitsandbytes, which is not installed: `pip install "
            "bitsandbytes` (its optimizers run where bitsandbytes supports the device), or use "
            'optim="adamw_torch_fused".'
        )


def optimizer_class_and_kwargs(args: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class `args.optim` names and its keyword arguments (besides the params).

    Args:
        args: A `GRPOConfig` (`optim`, `optim_args`, `learning_rate`, `adam_*`).
    """
    name = args.optim
    check_optimizer(name, args.optim_args)
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW, {**kwargs, **adam, "fused": name == "adamw_torch_fused" or None}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {**kwargs, "scale_parameter": False, "relative_step": False}
    if name in BNB_OPTIMIZERS:
        import bitsandbytes.optim as bnb_optim

        class_name, bits, paged = BNB_OPTIMIZERS[name]
        extra = adam if class_name == "AdamW" else {"betas": adam["betas"]}
        cls = getattr(bnb_optim, class_name)
        return cls, {**kwargs, **extra, "optim_bits": bits, "is_paged": paged}
    classes = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }
    return classes[name], {**kwargs, **optimizer_arguments(name, args.optim_args)}


def make_optimizer(model: torch.nn.Module, args: Any) -> torch.optim.Optimizer:
    """The run's optimizer over the trainable parameters of `model`; weight decay on matrices
    only (not biases or norm weights), as transformers.

    Args:
        model: The policy (its parameters with `requires_grad`).
        args: A `GRPOConfig`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    cls, kwargs = optimizer_class_and_kwargs(args)
    return cls([g for g in groups if g["params"]], **kwargs)


def allocate_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create the zero state torch's Adam and AdamW create at their first step, now.

    Left to the first step, the moments (two tensors of each trainable parameter's size) take
    the memory the step's activations have just freed, so the first step never holds both and
    the second is the first to reach the run's working set: it page-faults hundreds of MB in
    (on the benchmark workload, step 2 took about 1 s longer than step 4; bench/RESULTS.md).
    Created before the first step, they are in place while that step's activations are, and
    later steps reuse what it touched. The values are those torch's first step creates (zero
    moments, a float32 `step` of 0, on the parameter's device when fused or capturable), so the
    updates are unchanged.

    Args:
        optimizer: Any optimizer; only exactly `torch.optim.Adam` / `torch.optim.AdamW` with
            no state yet are filled (others, and subclasses, keep their own first step).

    Returns:
        True when the state was created.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return False
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        device_step = bool(group["capturable"] or group["fused"])
        for param in group["params"]:
            if not param.requires_grad:
                continue
            state = optimizer.state[param]
            device = param.device if device_step else None
            state["step"] = torch.zeros((), dtype=scalar, device=device)
            moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            for name in moments:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return True
