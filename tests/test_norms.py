"""`core.norms`: the RMSNorm that casts its output once under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from grpokit.core import norms
from tests.tiny import config_kwargs, make_causal_lm, make_tokenizer


def _norm(hidden: int = 48, seed: int = 0) -> LlamaRMSNorm:
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def test_output_is_the_norm_cast_as_a_linear_layer_would_bit_for_bit() -> None:
    norm = _norm()
    x = torch.randn(3, 7, 48) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = norm(x)  # float32: autocast leaves the norm's operations alone
        ours = norms.rms_norm_cast(x, norm.weight, norm.variance_epsilon, torch.bfloat16)
    assert theirs.dtype == torch.float32 and ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs.to(torch.bfloat16))


def test_gradients_match_autograd_through_the_formula_in_float64() -> None:
    norm = _norm()
    x = (torch.randn(2, 5, 48) * 3).requires_grad_()
    g = torch.randn(2, 5, 48)  # the output's gradient
    out = norms.rms_norm_cast(x, norm.weight, norm.variance_epsilon, torch.float32)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    ref.backward(g.double())
    assert x.grad is not None and norm.weight.grad is not None and x64.grad is not None
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_gets_no_gradient() -> None:
    norm = _norm().requires_grad_(False)
    x = torch.randn(4, 48, requires_grad=True)
    out = norms.rms_norm_cast(x, norm.weight, norm.variance_epsilon, torch.bfloat16)
    out.float().sum().backward()
    assert x.grad is not None and norm.weight.grad is None


def test_keeps_the_input_and_the_inverse_rms_only() -> None:
    norm = _norm()
    x = torch.randn(6, 48, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norms.rms_norm_cast(x, norm.weight, norm.variance_epsilon, torch.bfloat16)
    assert sorted(tuple(t.shape) for t in saved) == [(6, 1), (6, 48), (48,)]


def _training_forward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_a_llama_trains_with_the_same_logits_and_close_gradients() -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok).train()
    ids = torch.randint(3, len(tok), (3, 9))
    logits, grads = _training_forward(model, ids)
    layers = model.config.num_hidden_layers
    assert norms.cast_norm_outputs(model) == 2 * layers + 1
    assert norms.cast_norm_outputs(model) == 2 * layers + 1  # idempotent
    ours, our_grads = _training_forward(model, ids)
    assert torch.equal(ours, logits)
    assert our_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        error = (our_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-2, name
    # the norms' own gradients come from the closed form: not the same floats as autograd's
    norm_names = [name for name in grads if "norm" in name]
    assert any(not torch.equal(our_grads[name], grads[name]) for name in norm_names)


def test_outside_autocast_the_norms_act_as_before() -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    ids = torch.randint(3, len(tok), (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        norms.cast_norm_outputs(model)
        after = model(input_ids=ids).logits
        hidden = torch.randn(2, 6, model.config.hidden_size)
        assert model.model.norm(hidden).dtype == torch.float32
    assert torch.equal(before, after)


def test_a_copy_keeps_the_change_on_its_own_norms() -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    norms.cast_norm_outputs(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.mul_(2)
    x = torch.randn(2, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model.model.norm(x), twin.model.norm(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(theirs, (ours.float() * 2).to(torch.bfloat16))  # the twin's own weight


def test_the_output_layer_takes_its_kept_positions_contiguous() -> None:
    # Under autocast the final norm's bf16 output reaches the output layer as a slice (the
    # positions `logits_to_keep` keeps): the layer takes it as a contiguous copy (a frozen layer
    # would otherwise multiply it through a batched product of its weight copied per row), once
    # however often it is installed, in a copy of the model too; the logits are the same.
    tok = make_tokenizer()
    model = make_causal_lm(tok).requires_grad_(False)
    ids = torch.randint(3, len(tok), (3, 9))
    norms.cast_norm_outputs(model)
    norms.cast_norm_outputs(model)
    head = model.get_output_embeddings()
    assert list(head._forward_pre_hooks.values()) == [norms._contiguous_input]
    for twin in (model, copy.deepcopy(model)):
        seen: list[tuple[bool, torch.dtype]] = []
        twin.get_output_embeddings().register_forward_hook(
            lambda module, args, out, seen=seen: seen.append(
                (args[0].is_contiguous(), args[0].dtype)
            )
        )
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            kept = twin(input_ids=ids, logits_to_keep=4).logits
            whole = twin(input_ids=ids).logits
        assert seen == [(True, torch.bfloat16)] * 2
        assert torch.equal(kept, whole[:, -4:])
    sliced = torch.randn(2, 5, 8)[:, 1:]
    assert not sliced.is_contiguous()
    (copied,) = norms._contiguous_input(head, (sliced,))
    assert copied.is_contiguous() and torch.equal(copied, sliced)
    assert norms._contiguous_input(head, (copied,)) is None  # no copy of a contiguous input
    # One shared prompt's last position: contiguous, but its first stride is the prompt's
    # (5 * 8), not one position's: copied with row-major strides, the same values
    last = torch.randn(1, 5, 8)[:, -1:]
    assert last.is_contiguous() and last.stride() == (40, 8, 1) and not norms.foldable(last)
    (copied,) = norms._contiguous_input(head, (last,))
    assert copied.stride() == (8, 8, 1) and torch.equal(copied, last) and norms.foldable(copied)
    assert norms.foldable(torch.randn(3, 1, 8)) and norms.foldable(torch.randn(8))
    assert not norms.foldable(torch.randn(2, 3, 8)[:, 1:])


def test_a_frozen_output_layer_multiplies_one_shared_prompt_position_as_rows() -> None:
    # A shared prompt's pass keeps one position of one prompt ([1, 1, hidden] sliced from
    # [1, P, hidden]). Through the hook a frozen output layer multiplies it as one matrix
    # product (`aten::mm`), not a batched product of its weight copied whole (`aten::bmm`).
    tok = make_tokenizer()
    model = make_causal_lm(tok).requires_grad_(False)
    norms.cast_norm_outputs(model)
    ids = torch.randint(3, len(tok), (1, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.profiler.profile() as prof:
            kept = model(input_ids=ids, logits_to_keep=1).logits
        whole = model(input_ids=ids).logits
    ops = {event.key for event in prof.key_averages()}
    assert "aten::mm" in ops and "aten::bmm" not in ops
    assert torch.equal(kept, whole[:, -1:])


def test_other_models_are_left_alone() -> None:
    tok = make_tokenizer()
    # Qwen3's q/k norms feed the rotary embedding, not a linear layer
    model = Qwen3ForCausalLM(Qwen3Config(**config_kwargs(tok), head_dim=8))
    assert norms.linear_fed_norms(model) == []
    assert norms.cast_norm_outputs(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("model_type", norms.MODEL_TYPES)
def test_linear_fed_norms_of_each_llama_family(model_type: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    config = AutoConfig.for_model(model_type, **config_kwargs(tok))
    model = AutoModelForCausalLM.from_config(config)
    found = norms.linear_fed_norms(model)
    assert len(found) == 2 * config.num_hidden_layers + 1 and found[-1] is model.model.norm
