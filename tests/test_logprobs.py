"""core.logprobs against naive references: chunked == unchunked in fp32 and bf16, temperature,
entropy, gradients, and the model forward on a tiny Llama (left padding does not matter)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from grpokit.core.logprobs import (
    forward_module,
    model_completion_logprobs,
    selective_logprobs_and_entropy,
)
from tests.tiny import batch_sizes_seen, config_kwargs, make_causal_lm, make_tokenizer


def naive(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


def random_logits(dtype: torch.dtype, n: int = 3, t: int = 11, v: int = 37):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(n, t, v, generator=g)).to(dtype)
    ids = torch.randint(0, v, (n, t), generator=g)
    return logits, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 5, 33, 10_000, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive(dtype: torch.dtype, chunk_size: int, temperature: float) -> None:
    logits, ids = random_logits(dtype)
    logp, entropy = selective_logprobs_and_entropy(
        logits, ids, temperature=temperature, compute_entropy=True, chunk_size=chunk_size
    )
    ref_logp, ref_entropy = naive(logits, ids, temperature)
    assert logp.dtype == torch.float32 and entropy is not None and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)


def test_entropy_of_uniform_and_one_hot() -> None:
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4  # essentially one-hot
    _, entropy = selective_logprobs_and_entropy(
        logits, torch.zeros(1, 2, dtype=torch.long), compute_entropy=True
    )
    assert entropy is not None
    torch.testing.assert_close(entropy, torch.tensor([[torch.log(torch.tensor(8.0)).item(), 0.0]]))


def test_entropy_not_computed_by_default() -> None:
    logits, ids = random_logits(torch.float32)
    assert selective_logprobs_and_entropy(logits, ids)[1] is None


@pytest.mark.parametrize(
    ("use_logprobs", "use_entropy"), [(True, True), (True, False), (False, True)]
)
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_gradients_match_naive(use_logprobs: bool, use_entropy: bool, temperature: float) -> None:
    """Each output's gradient, alone and together, equals autograd through log_softmax."""
    logits, ids = random_logits(torch.float32)
    weights = torch.randn(ids.shape)
    entropy_weights = torch.randn(ids.shape)

    def objective(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        if use_logprobs:
            total = total + (logp * weights).sum()
        if use_entropy:
            total = total + (entropy * entropy_weights).sum()
        return total

    ours = logits.clone().requires_grad_(True)
    logp, entropy = selective_logprobs_and_entropy(
        ours, ids, temperature=temperature, compute_entropy=True, chunk_size=4
    )
    assert entropy is not None
    objective(logp, entropy).backward()
    ref = logits.clone().requires_grad_(True)
    objective(*naive(ref, ids, temperature)).backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_bf16_gradient_is_the_float32_gradient_rounded() -> None:
    """bf16 logits: the gradient is computed in float32 and rounded to bf16 at the end."""
    logits, ids = random_logits(torch.bfloat16, n=2, t=7, v=300)
    weights = torch.randn(ids.shape)
    ours = logits.clone().requires_grad_(True)
    (selective_logprobs_and_entropy(ours, ids)[0] * weights).sum().backward()
    ref = logits.float().requires_grad_(True)
    (naive(ref, ids)[0] * weights).sum().backward()
    assert ours.grad is not None and ours.grad.dtype == torch.bfloat16
    # at most one bf16 rounding step apart (float32 summation order may differ)
    torch.testing.assert_close(ours.grad, ref.grad.to(torch.bfloat16), atol=1e-7, rtol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_written_over_the_logits_is_the_same_gradient(dtype: torch.dtype) -> None:
    """`overwrite=True` (model_completion_logprobs' own logits): the backward pass returns the
    same gradient, held in the logits' own storage; the public function leaves a caller's
    logits as they were."""
    from grpokit.core.logprobs import _selective

    logits, ids = random_logits(dtype, n=3, t=9, v=301)
    weights = torch.randn(3, 8)
    grads = {}
    for overwrite in (False, True):
        leaf = logits.clone().requires_grad_(True)
        scaled = leaf * 1.5  # a non-leaf, as a model's output is
        seen = []
        scaled.register_hook(lambda g, seen=seen: seen.append(g))
        logp, entropy = _selective(scaled, ids[:, :8], 0.8, True, 4, overwrite=overwrite)
        assert entropy is not None
        ((logp * weights).sum() + entropy.sum()).backward()
        grads[overwrite] = leaf.grad
        assert (seen[0].data_ptr() == scaled.data_ptr()) is overwrite
        changed = not torch.equal(scaled.detach(), (logits * 1.5).to(dtype))
        assert changed is overwrite
    assert grads[False] is not None and grads[True] is not None
    assert grads[False].abs().max() > 0
    assert torch.equal(grads[True], grads[False])
    ours = logits.clone().requires_grad_(True)
    (selective_logprobs_and_entropy(ours, ids)[0] * torch.randn(ids.shape)).sum().backward()
    assert torch.equal(ours.detach(), logits)


def test_invalid_inputs() -> None:
    logits, ids = random_logits(torch.float32)
    with pytest.raises(ValueError, match="token_ids"):
        selective_logprobs_and_entropy(logits, ids[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        selective_logprobs_and_entropy(logits, ids, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# model_completion_logprobs on a tiny Llama
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    return tokenizer, make_causal_lm(tokenizer, seed=0)


def encode(tokenizer, prompts: list[str], completions: list[str], prompt_pad: int = 0):
    """Left-padded prompts (+ `prompt_pad` extra pad columns), right-padded completions."""
    pad = tokenizer.pad_token_id
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    p_len = max(map(len, p_ids)) + prompt_pad
    c_len = max(map(len, c_ids))
    ids, mask = [], []
    for p, c in zip(p_ids, c_ids, strict=True):
        left = p_len - len(p)
        right = c_len - len(c)
        ids.append([pad] * left + p + c + [pad] * right)
        mask.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), c_len


def reference(
    model, ids: torch.Tensor, mask: torch.Tensor, completion_len: int, temperature: float = 1.0
):
    """Each row on its own, with its padding stripped: one full forward, log_softmax, gather."""
    rows = []
    for row_ids, row_mask in zip(ids, mask, strict=True):
        real = row_ids[row_mask.bool()]
        n_completion = int(row_mask[-completion_len:].sum())
        with torch.no_grad():
            logits = model(input_ids=real[None]).logits[0].float() / temperature  # [L, V]
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, real[1:, None]).squeeze(-1)
        rows.append(logp[len(logp) - n_completion :])
    return rows


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_model_logprobs_match_unpadded_forward(tiny, temperature: float) -> None:
    tokenizer, model = tiny
    ids, mask, t = encode(tokenizer, ["2+2=", "hello there, "], ["4<|im_end|>", "general kenobi"])
    with torch.no_grad():
        logp, entropy = model_completion_logprobs(
            model, ids, mask, t, temperature=temperature, compute_entropy=True
        )
    assert logp.shape == (2, t) and entropy is not None and entropy.shape == (2, t)
    for row, expected in enumerate(reference(model, ids, mask, t, temperature)):
        torch.testing.assert_close(logp[row, : len(expected)], expected, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_completion_logprobs(tiny) -> None:
    tokenizer, model = tiny
    prompts, completions = ["abc", "a much longer prompt"], ["xyz", "ok"]
    ids, mask, t = encode(tokenizer, prompts, completions)
    more_ids, more_mask, _ = encode(tokenizer, prompts, completions, prompt_pad=5)
    with torch.no_grad():
        a, _ = model_completion_logprobs(model, ids, mask, t)
        b, _ = model_completion_logprobs(model, more_ids, more_mask, t)
    completion_mask = mask[:, -t:].bool()
    torch.testing.assert_close(a[completion_mask], b[completion_mask], atol=1e-5, rtol=1e-5)


def test_batch_size_slices_and_gradients(tiny) -> None:
    tokenizer, model = tiny
    ids, mask, t = encode(tokenizer, ["q1", "question 2", "3"], ["a", "bb", "ccc"])
    with torch.no_grad():
        whole, _ = model_completion_logprobs(model, ids, mask, t)
    sliced, _ = model_completion_logprobs(model, ids, mask, t, batch_size=2)
    completion_mask = mask[:, -t:].bool()
    torch.testing.assert_close(
        sliced.detach()[completion_mask], whole[completion_mask], atol=1e-5, rtol=1e-5
    )
    sliced[completion_mask].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_invalid_completion_len(tiny) -> None:
    tokenizer, model = tiny
    ids, mask, _ = encode(tokenizer, ["ab"], ["c"])
    with pytest.raises(ValueError, match="completion_len"):
        model_completion_logprobs(model, ids, mask, ids.shape[1])


# ---------------------------------------------------------------------------------------------
# PEFT: a LoRA wrapper's forward(**kwargs) must not hide logits_to_keep / position_ids
# ---------------------------------------------------------------------------------------------


def lora_model(tokenizer):
    """A tiny Llama with a LoRA adapter whose B is random (not zero), so the adapter matters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(make_causal_lm(tokenizer, seed=0), config)


def test_lora_model_logprobs_match_unpadded_forward_and_keep_their_kwargs(tiny) -> None:
    tokenizer, plain = tiny
    model = lora_model(tokenizer)
    seen: dict[str, object] = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    handle = model.get_base_model().register_forward_pre_hook(spy, with_kwargs=True)
    ids, mask, t = encode(
        tokenizer, ["2+2=", "hello there, "], ["4<|im_end|>", "general kenobi"], prompt_pad=3
    )
    try:
        with torch.no_grad():
            logp, _ = model_completion_logprobs(model, ids, mask, t)
    finally:
        handle.remove()
    # Both arguments reached the causal LM: only T + 1 positions were projected to the vocabulary,
    # and positions come from the mask (left padding would otherwise shift them).
    assert seen["logits_to_keep"] == t + 1 and "position_ids" in seen
    # The reference runs each row unpadded through the PEFT wrapper's own forward.
    expected_rows = reference(model, ids, mask, t)
    for row, expected in enumerate(expected_rows):
        torch.testing.assert_close(logp[row, : len(expected)], expected, atol=1e-5, rtol=1e-5)
    # The adapter is applied (the result differs from the plain model) ...
    plain_rows = reference(plain, ids, mask, t)
    assert not torch.allclose(expected_rows[1], plain_rows[1], atol=1e-4)
    # ... and disable_adapter() still switches it off through the base model.
    with model.disable_adapter(), torch.no_grad():
        off, _ = model_completion_logprobs(model, ids, mask, t)
    for row, expected in enumerate(plain_rows):
        torch.testing.assert_close(off[row, : len(expected)], expected, atol=1e-5, rtol=1e-5)


def test_prompt_learning_peft_model_keeps_its_wrapper() -> None:
    from peft import PromptTuningConfig, get_peft_model

    from grpokit.core.logprobs import forward_module

    tokenizer = make_tokenizer()
    base = make_causal_lm(tokenizer)
    wrapped = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert forward_module(wrapped) is wrapped  # virtual tokens are added in the wrapper's forward
    assert forward_module(base) is base


def test_unscored_trailing_positions_get_zero_gradient() -> None:
    """The model forward passes `[N, T+1, V]` logits for `[N, T]` tokens: the last position
    scores nothing, so its gradient is exactly 0 and the others match the sliced computation."""
    from grpokit.core.logprobs import _selective

    logits, ids = random_logits(torch.float32, n=2, t=6, v=50)
    weights = torch.randn(2, 5)
    full = logits.clone().requires_grad_(True)
    logp, _ = _selective(full, ids[:, :5], 1.0, False, 2)
    (logp * weights).sum().backward()
    sliced = logits[:, :5].clone().requires_grad_(True)
    (naive(sliced, ids[:, :5])[0] * weights).sum().backward()
    assert full.grad is not None and sliced.grad is not None
    assert torch.equal(full.grad[:, 5], torch.zeros(2, 50))
    torch.testing.assert_close(full.grad[:, :5], sliced.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# share_prompts: a prompt shared by several rows is forwarded once
# ---------------------------------------------------------------------------------------------


def shared_batch(tokenizer):
    """5 rows, 2 distinct prompts (rows 0, 2, 4 and rows 1, 3), 2 extra pad columns."""
    prompts = ["2+2=", "hello there, ", "2+2=", "hello there, ", "2+2="]
    completions = ["4<|im_end|>", "general kenobi", "5", "gen", "four"]
    return encode(tokenizer, prompts, completions, prompt_pad=2)


def test_shared_prompt_rows_groups_rows_by_prompt_in_row_order(tiny) -> None:
    from grpokit.core.logprobs import shared_prompt_rows

    tokenizer, _ = tiny
    ids, mask, t = shared_batch(tokenizer)
    first, inverse = shared_prompt_rows(ids, mask, t)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 1, 0]
    # Reordered rows: prompts numbered by their first row.
    order = torch.tensor([3, 0, 1, 4, 2])
    first, inverse = shared_prompt_rows(ids[order], mask[order], t)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 1, 1]
    # Every prompt distinct: nothing to share.
    ids, mask, t = encode(tokenizer, ["ab", "cd"], ["x", "y"])
    assert shared_prompt_rows(ids, mask, t) is None


def test_rows_of_prompts_indexes_every_layer_and_sums_each_prompts_gradient() -> None:
    # Two layers' keys and values of 2 prompts [U=2, Hkv, P, D]; rows 0, 2, 3 take prompt 0 and
    # row 1 prompt 1: the rows' tensors are the prompts' and a prompt's gradient is the sum of
    # its rows' gradients, as with transformers' own `batch_select_indices`.
    from transformers.cache_utils import DynamicCache

    from grpokit.core.logprobs import rows_of_prompts

    config = LlamaConfig(**config_kwargs(make_tokenizer()))
    generator = torch.Generator().manual_seed(0)
    inverse = torch.tensor([0, 1, 0, 0])
    ours, theirs = DynamicCache(config=config), DynamicCache(config=config)
    sources = []
    for layer in range(2):
        keys, values = (
            torch.randn(2, 2, 3, 4, generator=generator, requires_grad=True) for _ in range(2)
        )
        sources += [keys, values]
        ours.update(keys, values, layer)
        theirs.update(keys, values, layer)
    rows_of_prompts(ours, inverse)
    theirs.batch_select_indices(inverse)
    weights = torch.randn(4, 2, 3, 4, generator=generator)
    grads = []
    for cache in (ours, theirs):
        for layer in cache.layers[:2]:
            assert layer.keys.shape == layer.values.shape == (4, 2, 3, 4)
        total = sum(
            (layer.keys * weights).sum() + (layer.values * 2 * weights).sum()
            for layer in cache.layers[:2]
        )
        grads.append(torch.autograd.grad(total, sources))
    for layer_ours, layer_theirs in zip(ours.layers[:2], theirs.layers[:2], strict=True):
        assert torch.equal(layer_ours.keys, layer_theirs.keys)
        assert torch.equal(layer_ours.values, layer_theirs.values)
    for mine, reference in zip(*grads, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-6)
    expected_keys = weights[[0, 2, 3]].sum(0)  # prompt 0's keys: rows 0, 2 and 3
    torch.testing.assert_close(grads[0][0][0], expected_keys, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][0][1], weights[1], atol=0, rtol=0)


def test_forward_tokens_counts_each_shared_prompt_once() -> None:
    from grpokit.core.logprobs import forward_tokens

    # 4 rows of a 3-column prompt + 2 completion columns; rows 0 and 2 share their prompt
    # (padding included), rows 1 and 3 differ: 3 distinct prompts.
    ids = torch.tensor([[0, 5, 6, 7, 8], [4, 5, 6, 7, 8], [0, 5, 6, 9, 9], [1, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert forward_tokens(ids, mask, 2, share_prompts=True) == 3 * 3 + 4 * 2
    assert forward_tokens(ids, mask, 2, share_prompts=False) == 4 * 5
    # every prompt distinct: each row forwards its own
    assert forward_tokens(ids[1:2], mask[1:2], 2, share_prompts=True) == 5
    assert forward_tokens(ids[[0, 1, 3]], mask[[0, 1, 3]], 2, share_prompts=True) == 15


def logprobs_and_grads(model, ids, mask, t, **kwargs):
    """Completion-token log-probs and entropies (real tokens only) and the gradients of
    `sum(logprobs) + 0.3 * sum(entropies)` over the trainable parameters."""
    model.zero_grad()
    logp, entropy = model_completion_logprobs(model, ids, mask, t, compute_entropy=True, **kwargs)
    real = mask[:, -t:].bool()
    (logp[real].sum() + 0.3 * entropy[real].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logp.detach()[real], entropy.detach()[real], grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompts_give_the_plain_logprobs_and_gradients(temperature: float) -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = shared_batch(tokenizer)
    plain = logprobs_and_grads(model, ids, mask, t, temperature=temperature)
    shapes, handle = batch_sizes_seen(model)
    try:
        shared = logprobs_and_grads(
            model, ids, mask, t, temperature=temperature, share_prompts=True
        )
    finally:
        handle.remove()
    p = ids.shape[1] - t
    # The 2 distinct prompts once (their common left padding trimmed: both have the 2 extra
    # columns), then the 5 completions on the prompts' cache.
    assert shapes == [(2, p - 2), (5, t)]
    torch.testing.assert_close(shared[0], plain[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(shared[1], plain[1], atol=2e-6, rtol=0)
    assert plain[2].keys() == shared[2].keys() and len(plain[2]) > 5
    for name, grad in plain[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared[2][name], grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_shared_prompts_with_one_completion_token_and_in_slices(checkpointed: bool) -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = encode(tokenizer, ["abc", "abc", "de", "abc"], ["x", "y", "z", "w"])
    assert t == 1
    plain = logprobs_and_grads(model, ids, mask, t)
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shapes, handle = batch_sizes_seen(model)
    try:
        shared = logprobs_and_grads(model, ids, mask, t, share_prompts=True, batch_size=3)
    finally:
        handle.remove()
    # slice 1: 2 distinct prompts, whose last logits score every token (no completion forward),
    # or, checkpointed, the prompts but their last token, then each row's last prompt token and
    # its completion token; slice 2: one row, plain
    assert shapes == ([(2, 2), (3, 2), (1, 4)] if checkpointed else [(2, 3), (1, 4)])
    torch.testing.assert_close(shared[0], plain[0], atol=2e-6, rtol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=2e-6, rtol=1e-4)


def test_shared_prompts_only_where_the_processes_agree() -> None:
    # `agree` hears each slice's own verdict (slice 1 shares, slice 2 is one row) and decides:
    # saying no to slice 1 (another process's slice would not share) makes it take the plain
    # path; saying yes shares it. A process with sharing off still asks, with False.
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = encode(tokenizer, ["abc", "abc", "de", "abc"], ["xy", "yz", "z", "wx"])
    width = ids.shape[1]
    plain = logprobs_and_grads(model, ids, mask, t)
    for answer, share, expected_shapes in [
        (False, True, [(3, width), (1, width)]),
        (True, True, [(2, 3), (3, t), (1, width)]),
        (False, False, [(3, width), (1, width)]),
    ]:
        heard: list[bool] = []

        def agree(verdict: bool, answer: bool = answer, heard: list[bool] = heard) -> bool:
            heard.append(verdict)
            return answer and verdict

        shapes, handle = batch_sizes_seen(model)
        try:
            out = logprobs_and_grads(
                model, ids, mask, t, share_prompts=share, batch_size=3, agree=agree
            )
        finally:
            handle.remove()
        assert heard == ([True, False] if share else [False, False])
        assert shapes == expected_shapes, (answer, share)
        torch.testing.assert_close(out[0], plain[0], atol=2e-6, rtol=0)
        for name, grad in plain[2].items():
            torch.testing.assert_close(out[2][name], grad, atol=2e-6, rtol=1e-4)


def test_processes_that_agree_share_no_slice_of_one_completion_token() -> None:
    # One process's shared slice of one completion token would make one call (its prompts'
    # last logits score every row) where another process's makes two: with `agree` such a
    # slice says it would not share, and takes the plain path.
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = encode(tokenizer, ["abc", "abc", "abc"], ["x", "y", "z"])
    assert t == 1
    plain = logprobs_and_grads(model, ids, mask, t)
    heard: list[bool] = []

    def agree(verdict: bool) -> bool:
        heard.append(verdict)
        return verdict

    shapes, handle = batch_sizes_seen(model)
    try:
        out = logprobs_and_grads(model, ids, mask, t, share_prompts=True, agree=agree)
    finally:
        handle.remove()
    assert heard == [False] and shapes == [(3, ids.shape[1])]
    torch.testing.assert_close(out[0], plain[0], atol=2e-6, rtol=0)


class EngineLike(torch.nn.Module):
    """A training engine as DeepSpeed's: holds the model as `module`, runs it in a forward that
    names no argument, and records the keywords each call got."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls: list[list[str]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(sorted(kwargs))
        return self.module(*args, **kwargs)


def test_a_training_engine_is_called_with_the_arguments_its_model_names() -> None:
    # Called through the engine (whose own bookkeeping runs in its forward), the model still
    # gets its position ids and keeps only the completion positions' logits: the same log-probs
    # and gradients as called alone.
    from grpokit.core.logprobs import training_wrapper

    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    engine = EngineLike(model)
    assert training_wrapper(engine) is engine and forward_module(engine) is model
    assert training_wrapper(model) is None and forward_module(model) is model
    ids, mask, t = encode(tokenizer, ["abc", "de"], ["xyz", "w"])
    plain = logprobs_and_grads(model, ids, mask, t)
    shapes: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape[:2]))
    )
    try:
        wrapped = logprobs_and_grads(engine, ids, mask, t)
    finally:
        handle.remove()
    expected = ["attention_mask", "input_ids", "logits_to_keep", "position_ids"]
    assert engine.calls == [expected]
    assert shapes == [(2, t + 1)]  # the head saw the T + 1 positions only
    torch.testing.assert_close(wrapped[0], plain[0], atol=0, rtol=0)
    assert wrapped[2].keys() == {f"module.{name}" for name in plain[2]}
    for name, grad in plain[2].items():
        torch.testing.assert_close(wrapped[2][f"module.{name}"], grad, atol=0, rtol=0)


@pytest.fixture
def ddp_wrap(tmp_path):
    """Wrap a model in a real `DistributedDataParallel` over a one-process gloo group (a file
    store; no network), destroyed after the test."""
    import torch.distributed as td

    td.init_process_group(
        "gloo", store=td.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        yield torch.nn.parallel.DistributedDataParallel
    finally:
        td.destroy_process_group()


def test_ddp_wrapper_takes_the_completion_pass_of_a_shared_prompt(ddp_wrap) -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = shared_batch(tokenizer)
    plain = logprobs_and_grads(model, ids, mask, t)
    wrapper = ddp_wrap(model)
    assert forward_module(wrapper) is model  # the forward with the full signature
    through_wrapper: list[tuple[int, ...]] = []
    wrapper.register_forward_pre_hook(
        lambda _, args, kwargs: through_wrapper.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    shapes, handle = batch_sizes_seen(model)
    try:
        shared = logprobs_and_grads(wrapper, ids, mask, t, share_prompts=True)
    finally:
        handle.remove()
    p = ids.shape[1] - t
    # The prompts on the wrapped model, the completions through the wrapper (its forward readies
    # the gradients' averaging for the backward both passes feed).
    assert shapes == [(2, p - 2), (5, t)] and through_wrapper == [(5, t)]
    torch.testing.assert_close(shared[0], plain[0], atol=2e-6, rtol=0)
    grads = {name.removeprefix("module."): grad for name, grad in shared[2].items()}
    assert plain[2].keys() == grads.keys()
    for name, grad in plain[2].items():
        torch.testing.assert_close(grads[name], grad, atol=2e-6, rtol=1e-4)
    # One completion token: no completion pass to carry DDP's forward, so the plain path.
    ids, mask, t = encode(tokenizer, ["abc", "abc", "de", "abc"], ["x", "y", "z", "w"])
    through_wrapper.clear()
    logprobs_and_grads(wrapper, ids, mask, t, share_prompts=True)
    assert through_wrapper == [tuple(ids.shape)]


def test_shared_prompts_under_lora_train_the_adapter_as_the_plain_forward(tiny) -> None:
    tokenizer, _ = tiny
    model = lora_model(tokenizer).train()
    ids, mask, t = shared_batch(tokenizer)
    plain = logprobs_and_grads(model, ids, mask, t)
    shared = logprobs_and_grads(model, ids, mask, t, share_prompts=True)
    assert plain[2] and all("lora" in name for name in plain[2])  # only the adapter trains
    torch.testing.assert_close(shared[0], plain[0], atol=2e-6, rtol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=2e-6, rtol=1e-4)
    with model.disable_adapter(), torch.no_grad():  # the reference: the adapter off
        on, _ = model_completion_logprobs(model, ids, mask, t, share_prompts=True)
        off, _ = model_completion_logprobs(model, ids, mask, t)
    real = mask[:, -t:].bool()
    torch.testing.assert_close(on[real], off[real], atol=2e-6, rtol=0)


def test_prompt_sharing_is_declined_where_the_cache_would_not_hold_the_prompt() -> None:
    from peft import PromptTuningConfig, get_peft_model

    from grpokit.core.logprobs import forward_module, prompt_sharing_supported

    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer).train()
    assert prompt_sharing_supported(model)
    # torch's reentrant checkpoint gives no gradient to the cached prompt's keys and values a
    # checkpointed layer reads (in training mode; in eval nothing is checkpointed).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not prompt_sharing_supported(model)
    assert prompt_sharing_supported(model.eval())
    ids, mask, t = shared_batch(tokenizer)
    model.train()
    shapes, handle = batch_sizes_seen(model)
    try:
        logprobs_and_grads(model, ids, mask, t, share_prompts=True)
    finally:
        handle.remove()
    assert shapes[0] == tuple(ids.shape)  # the plain forward: every row with its prompt
    # A sliding-window attention keeps only the window in its cache.
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(**config_kwargs(tokenizer), sliding_window=4))
    assert not prompt_sharing_supported(mistral)
    unbounded = MistralForCausalLM(MistralConfig(**config_kwargs(tokenizer), sliding_window=None))
    assert prompt_sharing_supported(unbounded)
    # Prompt-learning adapters add virtual tokens in the wrapper's forward.
    tuned = get_peft_model(
        make_causal_lm(tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    assert not prompt_sharing_supported(forward_module(tuned))


@pytest.mark.parametrize("kept", [0, 1])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_prompts_under_gradient_checkpointing_give_the_plain_gradients(
    kind: str, kept: int
) -> None:
    # Every decoder layer checkpointed (kept = 0), or the last one keeping its activations: the
    # checkpointed layers take the prompts' cache read-only, the prompt pass recomputes in every
    # layer and leaves each prompt's last token to the completion pass, and the log-probs and
    # gradients are the plain forward's without checkpointing.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpokit.core.logprobs import prompt_sharing_supported

    tokenizer = make_tokenizer()
    if kind == "llama":
        model = make_causal_lm(tokenizer, seed=0)
    else:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**config_kwargs(tokenizer)))
    model.train()
    ids, mask, t = shared_batch(tokenizer)
    plain = logprobs_and_grads(model, ids, mask, t)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.layers
    for layer in layers[len(layers) - kept :] if kept else []:
        layer.gradient_checkpointing = False
    assert prompt_sharing_supported(model)
    recomputed: list[int] = []  # the layers' calls in the backward pass (recomputations)
    in_backward = [False]
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, i=i: recomputed.append(i) if in_backward[0] else None
        )
        for i, layer in enumerate(layers)
    ]
    shapes, handle = batch_sizes_seen(model)
    try:
        model.zero_grad()
        logp, entropy = model_completion_logprobs(
            model, ids, mask, t, compute_entropy=True, share_prompts=True
        )
        real = mask[:, -t:].bool()
        in_backward[0] = True
        (logp[real].sum() + 0.3 * entropy[real].sum()).backward()
        in_backward[0] = False
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    p = ids.shape[1] - t
    # shared: the prompts but their last token, then each row's last prompt token and its
    # completion
    assert shapes == [(2, p - 3), (5, 1 + t)]
    # each checkpointed layer recomputed for the completion pass, every layer for the prompts'
    assert sorted(recomputed) == sorted([*range(len(layers) - kept), *range(len(layers))])
    assert all(
        layer.gradient_checkpointing is (i < len(layers) - kept) for i, layer in enumerate(layers)
    )  # the flags restored
    torch.testing.assert_close(logp.detach()[real], plain[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy.detach()[real], plain[1], atol=2e-6, rtol=0)
    assert grads.keys() == plain[2].keys()
    for name, grad in plain[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=2e-6, rtol=1e-4)


def test_a_model_that_drops_the_cache_under_checkpointing_falls_back_to_the_plain_forward(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A model whose own forward drops the cache while its flag is set (as older transformers
    # models checkpoint in their own loop): the shared forward sees a prompt cache left empty
    # (or a layer that never read its past), takes the plain forward for the slice, says so,
    # and does not share again.
    from grpokit.core.logprobs import prompt_sharing_supported

    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer, seed=0).train()
    ids, mask, t = shared_batch(tokenizer)
    plain = logprobs_and_grads(model, ids, mask, t)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner = model.model
    forward = inner.forward

    def dropping(*args: Any, **kwargs: Any) -> Any:
        if inner.gradient_checkpointing and inner.training:
            kwargs["past_key_values"] = None
        return forward(*args, **kwargs)

    inner.forward = dropping
    assert prompt_sharing_supported(model)
    shapes, handle = batch_sizes_seen(model)
    try:
        with caplog.at_level("WARNING", logger="grpokit.core.logprobs"):
            out = logprobs_and_grads(model, ids, mask, t, share_prompts=True)
    finally:
        handle.remove()
    p = ids.shape[1] - t
    assert shapes == [(2, p - 3), tuple(ids.shape)]  # the prompt pass, then the plain path
    assert "dropped the shared prompts' cache" in caplog.text
    assert not prompt_sharing_supported(model)
    torch.testing.assert_close(out[0], plain[0], atol=2e-6, rtol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(out[2][name], grad, atol=2e-6, rtol=1e-4)
