"""Optimizers by transformers' name: the class each builds, its arguments, a hand-checked step."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.train.optimizers import allocate_state, make_optimizer, parse_optim_args


class TwoParams(torch.nn.Module):
    """A matrix (gets weight decay) and a vector (does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
        self.bias = torch.nn.Parameter(torch.tensor([0.5]))


@pytest.mark.parametrize(
    ("optim", "cls_name", "expected"),
    [
        ("adamw_torch_fused", "AdamW", {"fused": True, "betas": (0.8, 0.9), "eps": 1e-7}),
        ("adamw_torch", "AdamW", {"fused": None, "betas": (0.8, 0.9), "eps": 1e-7}),
        ("adafactor", "Adafactor", {"scale_parameter": False, "relative_step": False}),
        ("sgd", "SGD", {"momentum": 0.0, "nesterov": False}),
        ("adagrad", "Adagrad", {"lr_decay": 0.0}),
        ("rmsprop", "RMSprop", {"momentum": 0.0, "centered": False}),
    ],
)
def test_each_name_builds_that_optimizer(optim: str, cls_name: str, expected: dict) -> None:
    args = GRPOConfig(
        optim=optim, learning_rate=0.05, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9,
        adam_epsilon=1e-7,
    )  # fmt: skip
    opt = make_optimizer(TwoParams(), args)
    assert type(opt).__name__ == cls_name
    if cls_name == "Adafactor":
        from transformers.optimization import Adafactor

        assert isinstance(opt, Adafactor)
    matrix, vector = opt.param_groups
    assert matrix["lr"] == 0.05 and (matrix["weight_decay"], vector["weight_decay"]) == (0.1, 0.0)
    for key, value in expected.items():
        assert matrix[key] == value, key


def test_optim_args_are_parsed_as_transformers_parses_them() -> None:
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    assert parse_optim_args("momentum=0.9, nesterov=True") == {
        "momentum": "0.9",
        "nesterov": "True",
    }
    opt = make_optimizer(TwoParams(), GRPOConfig(optim="sgd", optim_args="momentum=0.9,nesterov=1"))
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["nesterov"]) == (0.9, True)
    opt = make_optimizer(TwoParams(), GRPOConfig(optim="rmsprop", optim_args="alpha=0.5"))
    assert opt.param_groups[0]["alpha"] == 0.5


def test_sgd_with_momentum_steps_as_worked_out_by_hand() -> None:
    # loss = 3 * w0 - 1 * w1 has the constant gradient g = [3, -1]. SGD with lr 0.1, momentum
    # 0.9: step 1: buf = g, w = [1, 2] - 0.1 * [3, -1] = [0.7, 2.1]; step 2: buf = 0.9 g + g =
    # [5.7, -1.9], w = [0.7, 2.1] - 0.1 * [5.7, -1.9] = [0.13, 2.29].
    model = TwoParams()
    opt = make_optimizer(
        model, GRPOConfig(optim="sgd", learning_rate=0.1, optim_args="momentum=0.9")
    )
    coef = torch.tensor([[3.0, -1.0]])
    seen = []
    for _ in range(2):
        opt.zero_grad()
        (model.weight * coef).sum().backward()
        opt.step()
        seen.append(model.weight.detach().clone())
    torch.testing.assert_close(seen[0], torch.tensor([[0.7, 2.1]]))
    torch.testing.assert_close(seen[1], torch.tensor([[0.13, 2.29]]))


def test_8bit_optimizers_need_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ValueError, match=r"optim='adamw_8bit' needs bitsandbytes.*pip install"):
        GRPOConfig(optim="adamw_8bit")


def test_8bit_optimizers_map_to_bitsandbytes_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in bitsandbytes records what it is asked to build: transformers' mapping of the
    # names to bitsandbytes' AdamW / Lion with optim_bits and is_paged.
    built: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> type:
        class Recorded(torch.optim.SGD):
            def __init__(self, params: Any, **kwargs: Any) -> None:
                built.append((name, kwargs))
                super().__init__(params, lr=kwargs["lr"])

        return Recorded

    optim = types.ModuleType("bitsandbytes.optim")
    optim.AdamW = recorder("AdamW")  # type: ignore[attr-defined]
    optim.Lion = recorder("Lion")  # type: ignore[attr-defined]
    package = types.ModuleType("bitsandbytes")
    package.optim = optim  # type: ignore[attr-defined]
    package.__spec__ = importlib_spec("bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)
    for name, (cls, bits, paged) in {
        "adamw_8bit": ("AdamW", 8, False),
        "paged_adamw_32bit": ("AdamW", 32, True),
        "lion_8bit": ("Lion", 8, False),
    }.items():
        make_optimizer(TwoParams(), GRPOConfig(optim=name, learning_rate=0.01))
        got_cls, kwargs = built[-1]
        assert (got_cls, kwargs["optim_bits"], kwargs["is_paged"]) == (cls, bits, paged)
        assert kwargs["lr"] == 0.01 and kwargs["betas"] == (0.9, 0.999)
        assert ("eps" in kwargs) == (cls == "AdamW")


def importlib_spec(name: str) -> Any:
    import importlib.machinery

    return importlib.machinery.ModuleSpec(name, None)


def _three_steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for param in params:
            param.grad = torch.randn(param.shape, generator=gen) if param.requires_grad else None
        optimizer.step()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.AdamW, {"fused": True}),
        (torch.optim.AdamW, {"foreach": True}),
        (torch.optim.AdamW, {"foreach": False, "amsgrad": True}),
        (torch.optim.Adam, {"weight_decay": 0.1}),
    ],
)
def test_allocated_state_is_torchs_first_step_state(cls: type, kwargs: dict) -> None:
    """The state created before the first step has the keys, dtypes, devices and (zero) values
    torch's first step creates, so three steps give the same parameters and state bit for bit;
    a frozen parameter gets none."""

    def params() -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(0)
        made = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(3)]
        made[1].requires_grad_(False)
        return made

    lazy_params, eager_params = params(), params()
    lazy = cls([{"params": lazy_params[:2]}, {"params": lazy_params[2:], "weight_decay": 0.0}],
               lr=0.1, **kwargs)  # fmt: skip
    eager = cls([{"params": eager_params[:2]}, {"params": eager_params[2:], "weight_decay": 0.0}],
                lr=0.1, **kwargs)  # fmt: skip
    assert allocate_state(eager)
    assert eager_params[1] not in eager.state and eager.state[eager_params[0]]["step"].item() == 0
    assert eager.state[eager_params[0]]["exp_avg"].abs().sum().item() == 0.0
    assert not allocate_state(eager)  # state already there: left alone
    _three_steps(lazy, lazy_params)
    _three_steps(eager, eager_params)
    for a, b in zip(lazy_params, eager_params, strict=True):
        assert torch.equal(a, b)
    lazy_state, eager_state = lazy.state_dict()["state"], eager.state_dict()["state"]
    assert lazy_state.keys() == eager_state.keys() and len(lazy_state) == 2
    for index, entries in lazy_state.items():
        assert entries.keys() == eager_state[index].keys()
        for name, value in entries.items():
            other = eager_state[index][name]
            assert (value.dtype, value.device) == (other.dtype, other.device)
            assert torch.equal(value, other), name


def test_allocate_state_leaves_other_optimizers_alone() -> None:
    param = torch.nn.Parameter(torch.ones(2))

    class MyAdam(torch.optim.AdamW):
        pass

    for optimizer in (torch.optim.SGD([param], lr=0.1, momentum=0.9), MyAdam([param], lr=0.1)):
        assert not allocate_state(optimizer)
        assert len(optimizer.state) == 0
