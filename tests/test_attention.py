"""core.attention: grouped attention equals transformers' eager attention (repeated key/value
heads), directly and inside a model (log-probs, gradients, cached decoding, left padding), and its
SDPA hand-over for large score tensors gives the same result."""

from __future__ import annotations

import pytest
import torch

from grpokit import attention
from grpokit.core.attention import grouped_attention, use_grouped_attention
from grpokit.core.logprobs import model_completion_logprobs
from grpokit.engines.base import SamplingParams
from grpokit.engines.transformers_engine import TransformersEngine
from tests.tiny import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Module(torch.nn.Module):
    pass


def reference_attention(query, key, value, mask, scaling):
    """transformers' eager attention: repeat each key/value head for its query heads."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2)


def padded_causal_mask(lengths: list[int], s: int, k: int) -> torch.Tensor:
    """`[B, 1, S, K]` additive mask: causal over the last S of K keys, left padding per row."""
    neg = torch.finfo(torch.float32).min
    mask = torch.full((len(lengths), 1, s, k), neg)
    for b, length in enumerate(lengths):
        for i in range(s):
            last = k - s + i  # key index of query i
            mask[b, 0, i, k - length : last + 1] = 0.0
    return mask


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize(("s", "k"), [(7, 7), (1, 9)])  # a prefill/training call, a decode step
def test_equals_eager_attention(heads: int, kv_heads: int, s: int, k: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(3, heads, s, 8)
    key, value = torch.randn(3, kv_heads, k, 8), torch.randn(3, kv_heads, k, 8)
    mask = padded_causal_mask([k, k - 2, k - 4], s, k)
    ours, weights = grouped_attention(_Module(), q, key, value, mask, scaling=0.3)
    assert weights is None and ours.shape == (3, s, heads, 8) and ours.is_contiguous()
    expected = reference_attention(q, key, value, mask, 0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_reads_cache_views_and_matches_float32_math(dtype: torch.dtype) -> None:
    """A decode step (one query per row, no gradient) on keys/values that are views of larger
    cache buffers (as `kv_cache.ReservedLayer` hands them over), with left padding: equal to
    transformers' eager math in float32, and in bf16 no farther from the float32 result than
    the eager math in bf16 is (the kernel accumulates in float32 and keeps the probabilities
    unrounded)."""
    torch.manual_seed(3)
    heads, kv_heads, k, capacity = 6, 2, 11, 16
    q32 = torch.randn(3, heads, 1, 8)
    buffers = [torch.randn(3, kv_heads, capacity, 8) for _ in range(2)]
    mask32 = padded_causal_mask([k, k - 3, 2], 1, k)
    exact = reference_attention(q32, buffers[0][:, :, :k], buffers[1][:, :, :k], mask32, 0.3)
    q, key_buffer, value_buffer = (t.to(dtype) for t in (q32, *buffers))
    key, value = key_buffer[:, :, :k], value_buffer[:, :, :k]
    assert not key.is_contiguous()
    with torch.no_grad():
        ours, _ = grouped_attention(_Module(), q, key, value, mask32.to(dtype), scaling=0.3)
    assert ours.shape == (3, 1, heads, 8) and ours.dtype == dtype and ours.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-6)
    else:
        eager = reference_attention(q, key, value, mask32.to(dtype), 0.3).float()
        ours_error = (ours.float() - exact).abs().max()
        assert ours_error <= (eager - exact).abs().max()
        assert ours_error < 0.02


def test_one_query_call_with_gradients_has_the_eager_gradients() -> None:
    """A one-query call that needs gradients (not a decode step) takes the eager path: its
    gradients equal autograd through transformers' eager math."""
    torch.manual_seed(4)
    inputs = [torch.randn(2, heads, n, 8) for heads, n in ((4, 1), (2, 5), (2, 5))]
    mask = padded_causal_mask([5, 3], 1, 5)
    grads = []
    for ours in (True, False):
        q, key, value = (t.clone().requires_grad_(True) for t in inputs)
        if ours:
            out, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.3)
        else:
            out = reference_attention(q, key, value, mask, 0.3)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        grads.append([t.grad for t in (q, key, value)])
    for ours_grad, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours_grad, reference, rtol=1e-5, atol=1e-6)


def test_sdpa_hand_over_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    q, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = padded_causal_mask([5, 3], 5, 5)
    small, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.35)
    monkeypatch.setattr(attention, "MAX_MATERIALIZED_SCORES", 10)
    large, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.35)
    torch.testing.assert_close(large, small, rtol=1e-5, atol=1e-6)


def _sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows at each call of torch's SDPA (where grouped attention hands over)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_recomputed_layers_materialise_larger_bf16_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within `recomputed_layers`, a bf16 call of more than `MAX_MATERIALIZED_SCORES` scores
    and at most `MAX_RECOMPUTED_SCORES` materialises its probabilities instead of going to SDPA,
    with the same result to bf16 rounding (at every query with a key to attend); a float32
    call, a larger one and one outside still go to SDPA. The setting nests and is restored on
    exit."""
    torch.manual_seed(2)
    q, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = padded_causal_mask([5, 3], 5, 5)
    scores = 2 * 4 * 5 * 5  # b * h * s * k
    monkeypatch.setattr(attention, "MAX_MATERIALIZED_SCORES", 10)
    monkeypatch.setattr(attention, "MAX_RECOMPUTED_SCORES", scores)
    calls = _sdpa_calls(monkeypatch)

    def run(recomputed: bool, bf16: bool) -> tuple[torch.Tensor, int]:
        calls.clear()
        with (
            attention.recomputed_layers(recomputed),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            out, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.35)
        return out, len(calls)

    materialised, n = run(True, True)
    assert n == 0 and materialised.dtype == torch.bfloat16
    handed_over, n = run(False, True)
    assert n == 1
    real = (mask > torch.finfo(torch.float32).min).any(-1)[:, 0]  # [2, 5] a key to attend
    torch.testing.assert_close(
        materialised[real].float(), handed_over[real].float(), rtol=0.02, atol=0.02
    )
    assert run(True, False)[1] == 1  # float32
    monkeypatch.setattr(attention, "MAX_RECOMPUTED_SCORES", scores - 1)
    assert run(True, True)[1] == 1  # above the bound
    with attention.recomputed_layers():
        with attention.recomputed_layers(False):
            assert not attention.in_recomputed_layers()
        assert attention.in_recomputed_layers()
    assert not attention.in_recomputed_layers()


def test_a_recomputed_layer_takes_its_forwards_path_only_within_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny Llama checkpointing its layers (non-reentrant), under bf16 autocast, with calls
    above `MAX_MATERIALIZED_SCORES`: forward and backward within `recomputed_layers` materialise
    every call (the recomputation too) and give the gradients of the same forward without
    checkpointing. A backward outside the setting recomputes through SDPA, and torch's checkpoint
    refuses it: what the recomputation saves differs from what the forward did, hence the
    trainer's backward within the setting its forward had."""
    monkeypatch.setattr(attention, "MAX_MATERIALIZED_SCORES", 10)
    calls = _sdpa_calls(monkeypatch)
    tok = make_tokenizer()
    ids, mask = _batch(tok)
    grads = []
    for checkpointed in (False, True):
        model = make_causal_lm(tok).train()
        assert use_grouped_attention(model)
        if checkpointed:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        with attention.recomputed_layers(), torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs, _ = model_completion_logprobs(model, ids, mask, 4)
        with attention.recomputed_layers():
            (logprobs * torch.tensor([[1.0], [-0.5]])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert calls == []
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    with attention.recomputed_layers(), torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = model_completion_logprobs(model, ids, mask, 4)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        logprobs.sum().backward()


def test_the_mask_is_prepared_once_for_the_calls_that_pass_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls passing the same mask tensor (the layers of one forward) reuse its blocks and its
    conversion to the compute dtype; another tensor, an in-place change, other sizes, another
    compute dtype or an inference-mode mask prepare it again, and so the results equal those of
    a fresh preparation. Once the mask is freed the prepared one is dropped."""
    checks: list[int] = []
    blocks_of = attention.causal_query_blocks

    def counted(*args: object) -> list[tuple[int, int]]:
        checks.append(1)
        return blocks_of(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "causal_query_blocks", counted)
    monkeypatch.setattr(attention, "CAUSAL_QUERY_BLOCK", 4)
    torch.manual_seed(5)
    q, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = padded_causal_mask([9, 6], 9, 9)

    def call(m: torch.Tensor, bf16: bool = False, keys: int = 9) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = grouped_attention(
                _Module(), q[:, :, 9 - keys :], key[:, :, :keys], value[:, :, :keys], m, 0.35
            )
        return out

    first = call(mask)
    assert torch.equal(call(mask), first) and len(checks) == 1  # reused
    assert torch.equal(call(mask.clone()), first) and len(checks) == 2  # another tensor
    changed = mask.clone()
    call(changed)
    changed[1, 0, 8, 5] = torch.finfo(torch.float32).min  # row 1's last query loses a key
    again = call(changed)
    assert len(checks) == 4 and not torch.equal(again[1, 8], first[1, 8])
    torch.testing.assert_close(again, call(changed.clone()), rtol=0, atol=0)
    call(mask, bf16=True)
    call(mask[..., 3:, :], keys=6)  # the last 6 queries over 6 keys (a new view)
    assert len(checks) == 7
    with torch.inference_mode():
        frozen = mask.clone()
        call(frozen)
        call(frozen)
    assert len(checks) == 9
    call(changed)
    assert attention._last_layer_mask is not None
    del changed
    assert attention._last_layer_mask is None


def test_causal_query_blocks_only_where_every_later_key_is_masked() -> None:
    from grpokit.core.attention import CAUSAL_QUERY_BLOCK, causal_query_blocks

    n = 2 * CAUSAL_QUERY_BLOCK + 10
    mask = padded_causal_mask([n, n - 3], n, n)
    c = CAUSAL_QUERY_BLOCK
    assert causal_query_blocks(mask, n, n) == [(0, c), (c, 2 * c), (2 * c, n)]
    assert causal_query_blocks(mask == 0, n, n) == [(0, c), (c, 2 * c), (2 * c, n)]  # bool
    assert causal_query_blocks(mask[..., :c, :c], c, c) == []  # one block's worth: one call
    assert causal_query_blocks(None, n, n) == []
    assert causal_query_blocks(mask[..., -1:, :], 1, n) == []  # a decode step
    # after 5 cached keys: block (a, z) attends keys [0, 5 + z)
    cached = padded_causal_mask([n + 5, n], n, n + 5)
    assert causal_query_blocks(cached, n, n + 5) == [(0, c), (c, 2 * c), (2 * c, n)]
    cached[0, 0, c - 1, c + 5] = 0.0  # a key one past its block's keys, attended
    assert causal_query_blocks(cached, n, n + 5) == []
    open_ahead = mask.clone()
    open_ahead[1, 0, 5, c + 1] = 0.0  # query 5 of row 1 sees a key after its block
    assert causal_query_blocks(open_ahead, n, n) == []
    assert causal_query_blocks(open_ahead == 0, n, n) == []


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("cached", [0, 3])
def test_causal_blocks_give_the_attention_and_gradients_of_one_call(
    monkeypatch: pytest.MonkeyPatch, sdpa: bool, cached: int
) -> None:
    """Split into blocks of 4 queries (11 queries after `cached` keys, as after a cached
    prompt): the same outputs at every query with a key to attend, and the same gradients of a
    loss over them (left padding: a padding query has none)."""
    torch.manual_seed(0)
    k = 11 + cached
    lengths = [k, 8]
    mask = padded_causal_mask(lengths, 11, k)
    real = (mask > torch.finfo(torch.float32).min).any(-1)[:, 0]  # [2, 11] a key to attend
    assert int(real.sum()) == 11 + 8
    weights = torch.randn(2, 11, 6, 8)
    results = []
    for block in (1000, 4):
        monkeypatch.setattr(attention, "CAUSAL_QUERY_BLOCK", block)
        if sdpa:
            monkeypatch.setattr(attention, "MAX_MATERIALIZED_SCORES", 10)
        torch.manual_seed(1)
        q = torch.randn(2, 6, 11, 8, requires_grad=True)
        key = torch.randn(2, 2, k, 8, requires_grad=True)
        value = torch.randn(2, 2, k, 8, requires_grad=True)
        out, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.35)
        assert out.shape == (2, 11, 6, 8) and out.is_contiguous()
        (out[real] * weights[real]).sum().backward()
        results.append((out.detach()[real], q.grad, key.grad, value.grad))
    assert attention.causal_query_blocks(mask, 11, k) == [(0, 4), (4, 8), (8, 11)]
    for blocked, whole in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    expected = reference_attention(q, key, value, mask, 0.35)[real]
    torch.testing.assert_close(results[1][0], expected.detach(), rtol=1e-5, atol=1e-6)


def test_model_logprobs_and_gradients_equal_with_causal_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny Llama's completion log-probs and parameter gradients (left-padded batch) are the
    same with its attention split into blocks of 3 queries as in one call. The blocks are
    checked once per forward: every layer gets the same mask tensor (`_layer_mask`)."""
    tok = make_tokenizer()
    results = []
    split: list[int] = []  # blocks per check
    blocks_of = attention.causal_query_blocks

    def counted(*args: object) -> list[tuple[int, int]]:
        blocks = blocks_of(*args)  # type: ignore[arg-type]
        split.append(len(blocks))
        return blocks

    monkeypatch.setattr(attention, "causal_query_blocks", counted)
    for block in (1000, 3):
        monkeypatch.setattr(attention, "CAUSAL_QUERY_BLOCK", block)
        model = make_causal_lm(tok)
        assert use_grouped_attention(model)
        ids, mask = _batch(tok)
        logprobs, _ = model_completion_logprobs(model, ids, mask, 4)
        (logprobs * torch.tensor([[1.0], [-0.5]])).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logprobs.detach(), grads))
    assert make_causal_lm(tok).config.num_hidden_layers > 1
    assert split == [0, 3]  # one call a layer; then 9 positions in 3 blocks
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_keeps_only_the_cast_probabilities(dtype: torch.dtype) -> None:
    """With gradients on, no float32 copy of the probabilities is saved for backward when the
    query is bf16 (only the bf16 ones), and the gradients are those of autograd through
    transformers' eager math: equal in float32, within bf16 rounding in bf16."""
    torch.manual_seed(2)
    inputs = [torch.randn(2, heads, 6, 8).to(dtype) for heads in (4, 2, 2)]
    mask = padded_causal_mask([6, 4], 6, 6)  # float32, as transformers' mask under autocast
    upstream = torch.randn(2, 6, 4, 8).to(dtype)
    grads, saved = [], []
    for ours in (True, False):
        q, key, value = (t.clone().requires_grad_(True) for t in inputs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if ours:
                out, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.3)
            else:
                out = reference_attention(q, key, value, mask, 0.3)
        (out.float() * upstream.float()).sum().backward()
        grads.append([t.grad.float() for t in (q, key, value)])
        if ours:
            scores = 2 * 4 * 6 * 6
            kept = {t.data_ptr(): t.dtype for t in saved if t.numel() == scores}
            assert list(kept.values()) == [dtype]  # one tensor of probabilities, query's dtype
    exact = dtype == torch.float32
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if exact else {"rtol": 0.0, "atol": 0.05}
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, **tolerance)


def test_bf16_autocast_keeps_bf16_probabilities_and_padding_rows_finite() -> None:
    """Under bf16 autocast with float32 query and keys (a float32 model's training forward) and
    float32's most negative value in the mask (as transformers builds it): the only score-sized
    tensor saved for backward is the bf16 probabilities, the queries of left padding (every key
    masked) give finite outputs and gradients, and the rest is eager float32 math within bf16
    rounding."""
    torch.manual_seed(6)
    inputs = [torch.randn(2, heads, 6, 8) for heads in (4, 2, 2)]
    mask = padded_causal_mask([6, 3], 6, 6)  # row 1: queries 0-2 see no key
    upstream = torch.randn(2, 6, 4, 8)
    grads, outs, saved = [], [], []
    for ours in (True, False):
        q, key, value = (t.clone().requires_grad_(True) for t in inputs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if ours:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out, _ = grouped_attention(_Module(), q, key, value, mask, scaling=0.25)
            else:
                out = reference_attention(q, key, value, mask, 0.25)
        (out.float() * upstream).sum().backward()
        outs.append(out.float().detach())
        grads.append([t.grad for t in (q, key, value)])
        if ours:
            assert out.dtype == torch.bfloat16
            kept = {t.data_ptr(): t.dtype for t in saved if t.numel() == 2 * 4 * 6 * 6}
            assert list(kept.values()) == [torch.bfloat16]
    assert torch.isfinite(outs[0]).all() and all(torch.isfinite(g).all() for g in grads[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0.0, atol=0.03)
    for ours_grad, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours_grad, reference, rtol=0.0, atol=0.05)


def _batch(tok):
    """Two left-padded prompts of lengths 3 and 5 followed by 4 completion tokens."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 11, 12, 13, 14], [9, 8, 7, 6, 5, 21, 22, 23, 24]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def test_model_logprobs_and_gradients_equal_eager() -> None:
    """A GQA tiny Llama switched to grouped attention: same log-probs and parameter gradients
    as with transformers' eager attention (float32)."""
    tok = make_tokenizer()
    results = []
    for grouped in (False, True):
        model = make_causal_lm(tok)
        if grouped:
            assert use_grouped_attention(model)
            assert model.config._attn_implementation == attention.NAME
        else:
            model.set_attn_implementation("eager")
        ids, mask = _batch(tok)
        logprobs, _ = model_completion_logprobs(model, ids, mask, 4)
        (logprobs * torch.tensor([[1.0], [-0.5]])).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logprobs.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_cached_greedy_decoding_equals_eager() -> None:
    """The sampler copy with grouped attention decodes (KV cache, padded prompts) exactly the
    greedy tokens of one with transformers' eager attention."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5]]
    outs = [
        TransformersEngine(model, tok, bf16_sampler=True, sampler_attention=impl).generate(
            prompts, **kwargs
        )
        for impl in ("eager", attention.NAME)
    ]
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)


def test_use_grouped_attention_refuses_what_cannot_switch() -> None:
    assert use_grouped_attention(torch.nn.Linear(2, 2)) is False
