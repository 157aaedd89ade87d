"""Generation engine: completion masks and truncation on hand-built ids, then on a tiny model."""

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from grpokit.core.logprobs import common_prefix_first, model_completion_logprobs
from grpokit.engines.base import SamplingParams, completion_mask_from_ids, left_pad
from grpokit.engines.sampling import TokenSampler, sample_categorical, top_p_filter
from grpokit.engines.transformers_engine import TransformersEngine, prefill
from grpokit.train.rollout import RolloutBatch
from tests.tiny import batch_sizes_seen, make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


EOS, PAD = 1, 0


def test_completion_mask_runs_through_first_eos() -> None:
    ids = torch.tensor(
        [
            [5, EOS, 7, 8],  # EOS at 1: mask 1 1 0 0, tokens after EOS become pad
            [5, 6, 7, 8],  # no EOS: truncated, all counted
            [EOS, EOS, 3, 4],  # EOS first: only it counts
            [5, 6, 7, EOS],  # EOS last: all counted, not truncated
        ]
    )
    cleaned, mask, truncated = completion_mask_from_ids(ids, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]
    assert cleaned.tolist() == [
        [5, EOS, PAD, PAD],
        [5, 6, 7, 8],
        [EOS, PAD, PAD, PAD],
        [5, 6, 7, EOS],
    ]


def test_several_eos_ids() -> None:
    ids = torch.tensor([[4, 9, 2], [4, 2, 9]])
    _, mask, truncated = completion_mask_from_ids(ids, [9, 2], PAD)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0]]
    assert not truncated.any()


def test_left_pad() -> None:
    ids, mask = left_pad([[3, 4, 5], [6]], PAD)
    assert ids.tolist() == [[3, 4, 5], [PAD, PAD, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_engine_groups_and_masks_on_tiny_model() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok)
    torch.manual_seed(0)
    out = engine.generate(
        [[5, 6], [7]], num_generations=3, max_new_tokens=6, sampling=SamplingParams()
    )
    assert out.prompt_ids.shape == (6, 2) and out.completion_ids.shape[0] == 6
    # the G completions of a prompt are consecutive rows sharing its left-padded prompt
    assert out.prompt_ids.tolist() == [[5, 6]] * 3 + [[PAD, 7]] * 3
    assert out.prompt_mask.tolist() == [[1, 1]] * 3 + [[0, 1]] * 3
    cleaned, expected_mask, expected_trunc = completion_mask_from_ids(
        out.completion_ids, [tok.eos_token_id], tok.pad_token_id
    )
    assert torch.equal(out.completion_mask, expected_mask)
    assert torch.equal(out.is_truncated, expected_trunc)
    assert torch.equal(out.completion_ids, cleaned)
    assert out.sampling_logprobs is None  # only with return_logprobs=True


def test_engine_stops_at_eos_and_top_k_one_is_greedy() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok)
    eos = tok.eos_token_id
    # A huge bias on EOS: every completion is exactly [EOS], mask [1], not truncated.
    forced = SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 100.0}})
    out = engine.generate([[5, 6]], num_generations=2, max_new_tokens=5, sampling=forced)
    assert out.completion_ids.tolist() == [[eos], [eos]]
    assert out.completion_mask.tolist() == [[1], [1]] and not out.is_truncated.any()
    # top_k=1 keeps only the argmax: the G samples of a prompt coincide.
    out = engine.generate(
        [[5, 6]], num_generations=3, max_new_tokens=5, sampling=SamplingParams(top_k=1)
    )
    assert (out.completion_ids == out.completion_ids[0]).all()


def test_rollout_batch_trims_shared_padding() -> None:
    batch = RolloutBatch(
        prompt_ids=torch.tensor([[0, 0, 5], [0, 6, 7], [0, 0, 8]]),
        prompt_mask=torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 1]]),
        completion_ids=torch.tensor([[9, 1, 0, 0], [9, 9, 1, 0], [1, 0, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]),
        loss_mask=torch.ones(3, 4),
        advantages=torch.zeros(3),
    )
    ids, mask, t = batch.trimmed(slice(0, 1))  # row 0: prompt 1 token, completion 2 tokens
    assert t == 2 and ids.tolist() == [[5, 9, 1]] and mask.tolist() == [[1, 1, 1]]
    ids, mask, t = batch.trimmed(slice(0, 3))  # widest prompt 2, longest completion 3
    assert t == 3 and ids.shape == (3, 5)
    assert mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]


# =================================================================================================
# The lean engine against the plain `model.generate` path
# =================================================================================================
PROMPTS = [[5, 6, 7], [8], [9, 10]]


def _engine(tok, model=None, **kwargs):
    return TransformersEngine(model or make_causal_lm(tok), tok, **kwargs)


@pytest.mark.parametrize("share", [True, False])
def test_lean_greedy_equals_model_generate(share: bool) -> None:
    """top_k=1 is argmax decoding: the lean loop must emit exactly model.generate's tokens."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 4})
    kwargs = dict(num_generations=2, max_new_tokens=12, sampling=greedy)
    plain = _engine(tok, model, decode="hf", bf16_sampler=False).generate(PROMPTS, **kwargs)
    lean = _engine(tok, model, share_prompt_prefill=share, bf16_sampler=False)
    out = lean.generate(PROMPTS, **kwargs)
    assert torch.equal(out.completion_ids, plain.completion_ids)
    assert torch.equal(out.completion_mask, plain.completion_mask)
    assert torch.equal(out.is_truncated, plain.is_truncated)
    assert torch.equal(out.prompt_ids, plain.prompt_ids)


def test_shared_prefill_equals_independent_prefill() -> None:
    """Prefilling B prompts and repeating the cache G times == prefilling the N = B*G rows."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    ids, mask = left_pad(PROMPTS, PAD)  # [3, 3]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        shared, shared_logits = prefill(model, ids, mask, positions, 4, share=True)
        alone, alone_logits = prefill(model, ids, mask, positions, 4, share=False)
    assert shared_logits.shape == alone_logits.shape == (12, len(tok))
    torch.testing.assert_close(shared_logits, alone_logits, rtol=0, atol=1e-5)
    for layer_s, layer_a in zip(shared.layers, alone.layers, strict=True):
        assert layer_s.keys.shape == layer_a.keys.shape == (12, 2, 3, 8)  # [N, kv heads, P, dim]
        torch.testing.assert_close(layer_s.keys, layer_a.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer_s.values, layer_a.values, rtol=0, atol=1e-5)


def test_sampling_logprobs_are_the_models_temperature_logprobs() -> None:
    """sampling_logprobs == log_softmax(logits / T) of the sampled tokens, recomputed by the
    trainer's own log-prob function on prompt + completion (fp32 sampler: same weights)."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = _engine(tok, model, bf16_sampler=False, return_logprobs=True)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1)
    out = engine.generate(PROMPTS, num_generations=3, max_new_tokens=10, sampling=sampling)
    t = out.completion_ids.shape[1]
    input_ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attention_mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    with torch.no_grad():
        expected, _ = model_completion_logprobs(
            model, input_ids, attention_mask, t, temperature=0.7, compute_entropy=False
        )
    assert out.sampling_logprobs is not None
    mask = out.completion_mask.bool()
    torch.testing.assert_close(out.sampling_logprobs[mask], expected[mask], rtol=0, atol=1e-4)
    # Sampled in inference mode, returned as ordinary tensors: a training forward (with
    # gradients) takes the tokens, and the log-probs enter a loss.
    assert not any(
        t.is_inference() for t in (out.completion_ids, out.completion_mask, out.sampling_logprobs)
    )
    trained, _ = model_completion_logprobs(model, input_ids, attention_mask, t, temperature=0.7)
    (trained - out.sampling_logprobs).exp().sum().backward()
    assert model.lm_head.weight.grad is not None


def _reference_processors(sampling: SamplingParams, eos: int, min_new: int, prompt_len: int):
    """transformers' own processors for the same settings, in `model.generate`'s order."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    steps = [
        RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty),
        MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos),
        TemperatureLogitsWarper(sampling.temperature),
    ]
    if sampling.top_k > 0:
        steps.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        steps.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p is not None:
        steps.append(MinPLogitsWarper(sampling.min_p))
    return LogitsProcessorList(steps)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.8, top_k=7, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, top_p=0.6, min_p=0.05),
        SamplingParams(top_k=30, top_p=0.95, min_p=0.2, repetition_penalty=0.8),
    ],
)
def test_token_sampler_scores_equal_transformers_processors(sampling: SamplingParams) -> None:
    """Same kept set and same processed scores as transformers' processors on random logits."""
    torch.manual_seed(0)
    n, p, v, eos = 6, 5, 50, 3
    prompt = torch.randint(4, v, (n, p))  # no pad in the prompt: both count the same tokens
    generated = torch.randint(4, v, (n, 2))  # two tokens sampled so far
    logits = torch.randn(n, v) * 3
    sampler = TokenSampler(
        SamplingParams(**{**vars(sampling), "generation_kwargs": {"min_new_tokens": 4}}),
        eos_token_ids=[eos],
        prompt_ids=prompt,
        prompt_mask=torch.ones_like(prompt),
        vocab_size=v,
    )
    for column in generated.T:  # what sample() records for each drawn token
        if sampler.seen is not None:  # None when repetition_penalty == 1
            sampler.seen[torch.arange(n), column] = True
    ours = sampler.scores(logits, step=2)
    reference = _reference_processors(sampling, eos, 4, p)(
        torch.cat([prompt, generated], 1), logits
    )
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))  # same tokens filtered out
    assert torch.isinf(ours[:, eos]).all()  # step 2 < min_new_tokens 4: EOS forbidden
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], reference[kept], rtol=1e-6, atol=1e-6)


def _logits(kind: str, seed: int) -> torch.Tensor:
    """`[64, V]` logits: plain float32, rounded to bf16 (many equal values among 1000 tokens), or
    integers 0..3 (ties everywhere, also at the nucleus boundary)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "float32":
        return torch.randn(64, 1000, generator=gen) * 3
    if kind == "bf16":
        return (torch.randn(64, 1000, generator=gen) * 2).bfloat16().float()
    return torch.randint(0, 4, (64, 50), generator=gen).float()


def _boundary_ties(scores: torch.Tensor, kept: torch.Tensor) -> int:
    """Rows where a kept and a dropped token have the same score (the tie-breaking matters)."""
    kept_min = torch.where(kept, scores, torch.inf).amin(-1)  # [N]
    dropped_max = torch.where(kept, -torch.inf, scores).amax(-1)  # [N]
    return int((kept_min == dropped_max).sum())


@pytest.mark.parametrize("kind", ["float32", "bf16", "integers"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_top_p_keeps_exactly_the_tokens_transformers_keeps(kind: str, p: float) -> None:
    """Same kept subset as transformers' TopPLogitsWarper, row for row, including tokens tied at
    the nucleus boundary; the tie-heavy inputs must really contain such ties (else the test would
    not test them)."""
    from transformers import TopPLogitsWarper

    ties = 0
    for seed in range(3):
        logits = _logits(kind, seed)
        ours = top_p_filter(logits, p)
        reference = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(reference))
        assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
        ties += _boundary_ties(logits, ~torch.isinf(ours))
    if kind == "integers" and p < 0.999:
        assert ties > 0


def test_bf16_logits_do_tie_at_the_top_p_boundary() -> None:
    """bf16-rounded logits over 1000 tokens put equal scores on both sides of the boundary in
    many rows: the case a different tie order gets wrong."""
    logits = _logits("bf16", 0)
    kept = ~torch.isinf(top_p_filter(logits, 0.9))
    assert _boundary_ties(logits, kept) > 0


@pytest.mark.parametrize("draw", ["multinomial", "inverse_cdf"])
def test_first_token_distribution_matches_the_model(draw: str) -> None:
    """Empirical distribution of 6000 first tokens (one shared prefill) vs the processed model
    distribution: total variation below 0.04 (expected about 0.02 for ~30 tokens at n = 6000)
    and no token outside the top-p/top-k support ever drawn."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    sampling = SamplingParams(temperature=3.0, top_k=40, top_p=0.9)
    n = 6000
    engine = _engine(tok, model, bf16_sampler=False, draw=draw)
    torch.manual_seed(0)
    out = engine.generate([[5, 6, 7]], num_generations=n, max_new_tokens=1, sampling=sampling)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits[:, -1]  # [1, V]
    processors = _reference_processors(sampling, tok.eos_token_id, 0, 3)
    expected = torch.softmax(processors(torch.tensor([[5, 6, 7]]), logits), -1)[0]  # [V]
    assert 10 < int((expected > 0).sum()) < 60  # a non-trivial support
    counts = torch.bincount(out.completion_ids[:, 0], minlength=len(tok)).float()
    assert counts[expected == 0].sum() == 0
    assert 0.5 * (counts / n - expected).abs().sum() < 0.04


def test_sample_categorical_is_exact() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25]]).expand(20000, 5)
    counts = torch.bincount(sample_categorical(probs), minlength=5).float() / 20000
    assert counts[0] == 0 and counts[2] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(counts, probs[0], rtol=0, atol=0.015)


def test_min_new_tokens_and_truncation_in_lean_loop() -> None:
    """A huge EOS bias ends every completion at the first allowed step: min_new_tokens=3 gives
    3 forced tokens + EOS (mask 1 1 1 1, not truncated); max_new_tokens=2 < 3 truncates."""
    tok = make_tokenizer()
    engine = _engine(tok)
    eos = tok.eos_token_id
    bias = {(eos,): 100.0}
    forced = SamplingParams(generation_kwargs={"sequence_bias": bias, "min_new_tokens": 3})
    out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=8, sampling=forced)
    assert out.completion_ids.shape == (6, 4)  # the loop stopped once every row had ended
    assert (out.completion_ids[:, 3] == eos).all() and (out.completion_ids[:, :3] != eos).all()
    assert out.completion_mask.tolist() == [[1, 1, 1, 1]] * 6 and not out.is_truncated.any()
    out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=2, sampling=forced)
    assert out.completion_ids.shape == (6, 2) and out.is_truncated.all()
    assert out.completion_mask.tolist() == [[1, 1]] * 6


def test_lean_loop_pads_rows_after_their_eos() -> None:
    """Rows that end early hold pad (mask 0, log-prob 0) while others continue."""
    tok = make_tokenizer()
    eos = tok.eos_token_id
    engine = _engine(tok, bf16_sampler=False, return_logprobs=True)
    sampling = SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 3.5}})
    torch.manual_seed(0)
    out = engine.generate([[5, 6]], num_generations=32, max_new_tokens=10, sampling=sampling)
    lengths = out.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # both early and late endings occurred
    assert out.sampling_logprobs is not None
    padding = out.completion_mask == 0
    assert (out.completion_ids[padding] == tok.pad_token_id).all()
    assert (out.sampling_logprobs[padding] == 0).all()
    assert (out.sampling_logprobs[~padding] < 0).all()


def test_lean_loop_rejects_unknown_generation_kwargs() -> None:
    tok = make_tokenizer()
    sampling = SamplingParams(generation_kwargs={"no_repeat_ngram_size": 2})
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size.*decode='hf'"):
        _engine(tok).generate([[5]], num_generations=2, max_new_tokens=3, sampling=sampling)
    bad_bias = SamplingParams(generation_kwargs={"sequence_bias": {(5, 6): 1.0}})
    with pytest.raises(ValueError, match="single-token"):
        _engine(tok).generate([[5]], num_generations=2, max_new_tokens=3, sampling=bad_bias)
    with pytest.raises(ValueError, match="decode must be one of"):
        _engine(tok, decode="vllm")
    with pytest.raises(ValueError, match="draw must be one of"):
        _engine(tok, draw="gumbel")


# =================================================================================================
# The bf16 sampler copy
# =================================================================================================
def test_bf16_copy_tracks_weights_in_place_after_update() -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = _engine(tok, model, bf16_sampler=True)
    copy_params = dict(engine.sampler_model.named_parameters())
    pointers = {name: p.data_ptr() for name, p in copy_params.items()}
    assert all(p.dtype == torch.bfloat16 for p in copy_params.values())
    assert engine.sampler_model is not model and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # an optimizer step, larger than bf16 rounding
    engine.update_weights(model)
    weights = engine.sampler_weights()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.to(torch.bfloat16)), name
        if 0 not in copy_params[name].stride():  # held unpacked: updated in place
            assert copy_params[name].data_ptr() == pointers[name], f"{name} was re-allocated"
    # the updated copy samples as a copy made afresh from the updated model: the same tokens
    # from the same random state (packed layers re-packed, fused groups re-stacked)
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=SamplingParams())
    torch.manual_seed(5)
    expected = _engine(tok, model, bf16_sampler=True).generate(PROMPTS, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(engine.generate(PROMPTS, **kwargs).completion_ids, expected.completion_ids)


def test_bf16_copy_follows_a_fused_adamw_step() -> None:
    # Fused AdamW writes parameters in place without bumping their version counters; the copy
    # must still follow (a stale sampler would silently stop the policy from learning).
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = _engine(tok, model, bf16_sampler=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    engine.update_weights(model)
    weights = engine.sampler_weights()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach().to(torch.bfloat16)), name


def _copied_by_a_step(engine: TransformersEngine, model: Any, by: float) -> set[str]:
    """Add `by` to every trainable parameter of `model` (a step), `update_weights`: the names of
    the sampler's parameters copied again."""
    stamps = {name: stamp for name, (_, stamp) in engine._copies.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(by)
    engine.update_weights(model)
    return {name for name, (_, stamp) in engine._copies.items() if stamp != stamps[name]}


def test_bf16_copy_under_peft_syncs_only_the_adapter() -> None:
    # merge_adapters=False: the copy keeps the PEFT layers, the adapters apart.
    peft = pytest.importorskip("peft")
    tok = make_tokenizer()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(make_causal_lm(tok), config)
    engine = _engine(tok, model, bf16_sampler=True, merge_adapters=False)
    assert engine.sampler_model is not model and not engine._merged
    copied = _copied_by_a_step(engine, model, 0.5)
    assert copied and all("lora_" in name for name in copied)  # the frozen base was not copied
    weights = engine.sampler_weights()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.to(torch.bfloat16)), name
    out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=4, sampling=SamplingParams())
    assert out.completion_ids.shape[0] == 6


LORA_SCALE = 2.0  # lora_alpha 8 / r 4


def _lora_model(tok: Any, **config: Any) -> Any:
    """A tiny model with a LoRA adapter on q_proj and v_proj (r 4, alpha 8), B drawn."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)
    model = peft.get_peft_model(make_causal_lm(tok), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model


def _merged_by_hand(model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights with W + scale * B @ A at each LoRA layer, in float32."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        out[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = p.detach()
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            b = dict(model.named_parameters())[name.replace(".lora_A.", ".lora_B.")]
            layer = name.split(".lora_A.")[0].replace("base_model.model.", "", 1)
            out[f"{layer}.weight"] = out[f"{layer}.weight"] + LORA_SCALE * b.detach() @ p.detach()
    return out


def test_bf16_copy_holds_lora_layers_merged_and_merges_again_after_a_step() -> None:
    # By default the bf16 copy of a LoRA model is a plain copy of its base model whose adapted
    # layers hold bf16(W + scale * B @ A): no PEFT layer in the sampler, the frozen weights
    # copied once, the merged ones again after each step.
    tok = make_tokenizer()
    model = _lora_model(tok)
    engine = _engine(tok, model, bf16_sampler=True)
    assert type(engine.sampler_model).__name__ == "LlamaForCausalLM"
    layers = {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert set(engine._merged) == layers

    def check() -> None:
        weights = engine.sampler_weights()
        expected = _merged_by_hand(model)
        assert set(weights) == set(expected)
        for name, value in expected.items():
            assert torch.equal(weights[name], value.to(torch.bfloat16)), name
        assert any(  # the adapters count (bf16 rounding would not hide them)
            not torch.equal(
                weights[n],
                dict(model.named_parameters())[
                    "base_model.model." + n.replace(".weight", ".base_layer.weight")
                ].to(torch.bfloat16),
            )
            for n in layers
        )

    check()
    copied = _copied_by_a_step(engine, model, 0.05)
    check()
    assert copied == layers  # the frozen weights were not copied again
    out = engine.generate(PROMPTS, num_generations=2, max_new_tokens=4, sampling=SamplingParams())
    assert out.completion_ids.shape[0] == 6


def test_merged_lora_sampler_computes_what_the_merged_model_does() -> None:
    # The merged bf16 copy's logits against the float32 merged model's (PEFT's own
    # merge_and_unload): within bf16 rounding, and as close as the copy holding the adapters
    # apart.
    import copy

    tok = make_tokenizer()
    model = _lora_model(tok)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        exact = copy.deepcopy(model).merge_and_unload()(ids).logits
        merged = _engine(tok, model, bf16_sampler=True).sampler_model(ids).logits.float()
        apart = _engine(tok, model, bf16_sampler=True, merge_adapters=False)
        unmerged = apart.sampler_model(ids).logits.float()
    gap, gap_apart = (merged - exact).abs().max().item(), (unmerged - exact).abs().max().item()
    assert gap < 0.05 and gap_apart < 0.05, (gap, gap_apart)
    assert (merged - exact).abs().mean() <= 2 * (unmerged - exact).abs().mean()


@pytest.mark.parametrize("config", [{"use_dora": True}, {"lora_bias": True}])
def test_adapters_that_do_not_merge_plainly_keep_their_layers(config: dict[str, Any]) -> None:
    tok = make_tokenizer()
    model = _lora_model(tok, **config)
    engine = _engine(tok, model, bf16_sampler=True)
    assert not engine._merged and hasattr(engine.sampler_model, "peft_config")
    with pytest.raises(ValueError, match="merge_adapters=True"):
        _engine(tok, model, bf16_sampler=True, merge_adapters=True)
    with pytest.raises(ValueError, match="merge_adapters=True"):  # no bf16 copy to merge into
        _engine(tok, _lora_model(tok), bf16_sampler=False, merge_adapters=True)


def test_num_threads_is_restored() -> None:
    tok = make_tokenizer()
    engine = _engine(tok, num_threads=2)
    before = torch.get_num_threads()
    engine.generate([[5]], num_generations=2, max_new_tokens=2, sampling=SamplingParams())
    assert torch.get_num_threads() == before


def test_bf16_copy_picks_up_a_checkpoint_load_before_generating() -> None:
    """Weights loaded between steps (resume) reach the sampler without an update_weights call."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = _engine(tok, model, bf16_sampler=True)
    model.load_state_dict(make_causal_lm(tok, seed=5).state_dict())  # in-place copy_
    greedy = SamplingParams(top_k=1)
    kwargs = dict(num_generations=1, max_new_tokens=8, sampling=greedy)
    out = engine.generate(PROMPTS, **kwargs)
    weights = engine.sampler_weights()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.to(torch.bfloat16)), name
    fresh = _engine(tok, model, bf16_sampler=True).generate(PROMPTS, **kwargs)
    assert torch.equal(out.completion_ids, fresh.completion_ids)


def test_same_seed_same_tokens_as_model_generate() -> None:
    """draw="multinomial" consumes the random stream as model.generate does: with the same seed
    and the same (fp32) weights the sampled tokens are identical, filters included."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2)
    kwargs = dict(num_generations=3, max_new_tokens=10, sampling=sampling)
    torch.manual_seed(3)
    plain = _engine(tok, model, decode="hf", bf16_sampler=False).generate(
        [[5, 6, 7], [9, 8, 7]], **kwargs
    )
    torch.manual_seed(3)
    lean = _engine(tok, model, bf16_sampler=False, draw="multinomial").generate(
        [[5, 6, 7], [9, 8, 7]], **kwargs
    )
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    assert torch.equal(lean.completion_mask, plain.completion_mask)


def test_same_tokens_as_model_generate_with_ties_at_the_top_p_boundary() -> None:
    """The same claim with logits rounded to bf16 (through a public forward hook on the LM head,
    which both paths call) and integer-valued: equal logits sit at the nucleus boundary at most
    steps, and both paths still draw the same tokens."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    # Scale so the 100 logits take a few integer values: ties everywhere.
    model.lm_head.register_forward_hook(lambda module, args, out: (out * 8).round().bfloat16())
    sampling = SamplingParams(temperature=1.0, top_p=0.7)
    kwargs = dict(num_generations=4, max_new_tokens=12, sampling=sampling)
    torch.manual_seed(5)
    plain = _engine(tok, model, decode="hf", bf16_sampler=False).generate(PROMPTS, **kwargs)
    torch.manual_seed(5)
    lean = _engine(tok, model, bf16_sampler=False, draw="multinomial").generate(PROMPTS, **kwargs)
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    assert torch.equal(lean.completion_mask, plain.completion_mask)


def test_sample_categorical_keeps_tiny_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token of probability 1e-9 after 0.7 of cumulative mass keeps its interval (in a float32
    running sum it would round away): a uniform number inside that interval draws it."""
    probs = torch.full((1, 1000), 0.3 / 299)
    probs[0, :700] = 0.7 / 700
    probs[0, 700] = 1e-9
    total = probs.double().sum().item()
    before = probs[0, :700].double().sum().item()
    target = (before + 0.5e-9) / total
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((1, 1), target, **k))
    assert sample_categorical(probs).item() == 700
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((1, 1), 1.0, **k))
    assert sample_categorical(probs).item() == 999  # u clamped below the total: the last token
    probs[0, 990:] = 0.0  # zero-probability tail: u -> total draws the last positive token
    assert sample_categorical(probs).item() == 989


def test_packed_linear_equals_linear_and_follows_weight_writes() -> None:
    from grpokit.engines.packed_linear import PackedLinear, pack_linear_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 8, bias=False))
    model.to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    expected = model(x)
    layers = pack_linear_layers(model)
    if not layers:
        pytest.skip("this torch build has no oneDNN")
    assert all(isinstance(m, PackedLinear) for m in model)
    assert torch.equal(model(x), expected)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an in-place write, as update_weights does
        for layer in layers:
            layer.repack_if_changed()
        plain = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
    assert torch.equal(model[0](x), plain)


def test_packed_sampler_decodes_the_same_tokens() -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
    outs = [
        TransformersEngine(model, tok, bf16_sampler=True, pack_weights=pack).generate(
            [[5, 6, 7], [9, 8, 7, 6]], **kwargs
        )
        for pack in (False, None)
    ]
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)


def _held(layer: Any) -> Any:
    """A `DecodePacks` layer's packed weight: its group's when it is in one."""
    return layer.packed if layer.group is None else layer.group.packed


def test_fp32_decode_packs_give_the_same_tokens_and_leave_the_model_alone() -> None:
    from grpokit.engines.packed_linear import decode_packs

    tok = make_tokenizer()
    model = make_causal_lm(tok)
    if decode_packs(make_causal_lm(tok)) is None:
        pytest.skip("this torch build has no oneDNN")
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
    prompts = [[5, 6, 7], [9, 8, 7, 6]]
    plain = TransformersEngine(model, tok, bf16_sampler=False, pack_weights=False)
    packed = TransformersEngine(model, tok, bf16_sampler=False)  # default: packs on the CPU
    assert plain._decode_packs is None and packed._decode_packs is not None
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(packed._decode_packs.layers) == len(linears)  # every projection and lm_head
    assert torch.equal(
        packed.generate(prompts, **kwargs).completion_ids,
        plain.generate(prompts, **kwargs).completion_ids,
    )
    # Outside generate the model is untouched: no forward override, gradients reach weights.
    assert not any("forward" in m.__dict__ for m in linears)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)
    model.zero_grad()
    # Before an optimizer step the packs of trainable weights are freed (every weight here
    # trains); a weight written in place (as the step does) is re-packed before the next
    # decode: the packed engine follows the new weights exactly as the unpacked one does.
    packed.discard_trainable_copies(model)
    assert [_held(layer) for layer in packed._decode_packs.layers] == [None] * len(linears)
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(-1.5)
    assert torch.equal(
        packed.generate(prompts, **kwargs).completion_ids,
        plain.generate(prompts, **kwargs).completion_ids,
    )
    assert all(_held(layer) is not None for layer in packed._decode_packs.layers)


def test_fp32_decode_packs_repack_trainable_and_moved_weights_only() -> None:
    from grpokit.engines.packed_linear import decode_packs

    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    layers[0].requires_grad_(False)  # frozen, e.g. a LoRA base layer
    packs = decode_packs(layers, fp16_frozen=False)
    if packs is None:
        pytest.skip("this torch build has no oneDNN")
    frozen, trainable = (layer.packed for layer in packs.layers)
    assert packs.discard_trainable() == 1  # the trainable layer's pack goes, the frozen stays
    assert packs.layers[0].packed is frozen and packs.layers[1].packed is None
    packs.refresh()
    assert packs.layers[0].packed is frozen  # unchanged: kept
    assert packs.layers[1].packed is not trainable  # trainable: always re-packed (fused AdamW)
    with torch.no_grad():
        layers[0].weight.add_(1.0)  # bumps the version counter
    packs.refresh()
    assert packs.layers[0].packed is not frozen
    x = torch.randn(3, 8)
    with packs.active():
        out = layers(x)
    # the same float32 product up to summation order
    torch.testing.assert_close(out, layers(x), rtol=1e-5, atol=1e-5)


def _fp16_or_skip() -> None:
    from grpokit.engines.packed_linear import can_pack_fp16

    if not can_pack_fp16():
        pytest.skip("this torch build has no fbgemm float16 products")


@contextlib.contextmanager
def _frozen_weights_rounded_to_fp16(packs: Any) -> Iterator[None]:
    """The model's own forward, but every layer `packs` holds in float16 multiplies by its
    weight rounded to float16 (in float32): what the float16 packs should compute."""
    for layer in packs.layers:
        if layer.half:
            rounded = layer.linear.weight.detach().half().float()
            layer.linear.__dict__["forward"] = functools.partial(
                torch.nn.functional.linear, weight=rounded, bias=layer.linear.bias
            )
    try:
        yield
    finally:
        for layer in packs.layers:
            layer.linear.__dict__.pop("forward", None)


def test_half_block_rows_split_only_weights_beyond_the_limit() -> None:
    from grpokit.engines.packed_linear import half_block_rows

    assert half_block_rows(49152, 576) == 3584  # SmolLM2-135M's output layer: 14 blocks
    assert half_block_rows(3072, 576) is None  # its gate/up group: one panel set
    assert half_block_rows(151936, 896) == 2304  # Qwen2-0.5B's output layer
    assert half_block_rows(100000, 40000) == 64  # never fewer than 64 rows


def test_pack_half_blocks_give_the_products_of_one_panel_set(monkeypatch: Any) -> None:
    from grpokit.engines import packed_linear

    _fp16_or_skip()
    torch.manual_seed(0)
    weight = torch.randn(300, 16)
    whole = packed_linear.pack_half(weight)
    assert not isinstance(whole, tuple)
    monkeypatch.setattr(packed_linear, "HALF_BLOCK_LIMIT", 1000)  # 300 x 16 x 2 bytes beyond
    monkeypatch.setattr(packed_linear, "HALF_BLOCK_BYTES", 64 * 16 * 2)  # blocks of 64 rows
    blocks = packed_linear.pack_half(weight)
    assert isinstance(blocks, tuple) and len(blocks) == 5  # 4 x 64 rows + 44
    bias = torch.randn(300)
    x = torch.randn(2, 3, 16)
    out = packed_linear.half_product(blocks, bias, (), x)
    assert out.shape == (2, 3, 300)
    assert torch.equal(out, packed_linear.half_product(whole, bias, (), x))
    rounded = torch.nn.functional.linear(x, weight.half().float(), bias)
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, torch.nn.functional.linear(x, weight, bias))


def test_decode_packs_multiply_by_a_blocked_float16_layer(monkeypatch: Any) -> None:
    from grpokit.engines import packed_linear

    _fp16_or_skip()
    monkeypatch.setattr(packed_linear, "HALF_BLOCK_LIMIT", 1000)
    monkeypatch.setattr(packed_linear, "HALF_BLOCK_BYTES", 64 * 8 * 2)
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 200), torch.nn.Linear(200, 4))
    layers[0].requires_grad_(False)
    packs = packed_linear.decode_packs(layers, fp16_frozen=True)
    assert packs is not None and packs.layers[0].half
    assert isinstance(packs.layers[0].packed, tuple) and len(packs.layers[0].packed) == 4
    x = torch.randn(3, 8)
    with packs.active():
        out = layers(x)
    with _frozen_weights_rounded_to_fp16(packs):
        expected = layers(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_fp16_decode_packs_hold_frozen_weights_once_rounded_to_float16() -> None:
    from grpokit.engines.packed_linear import decode_packs

    _fp16_or_skip()
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    layers[0].requires_grad_(False)  # frozen, e.g. a LoRA base layer
    packs = decode_packs(layers, fp16_frozen=True)
    assert packs is not None
    assert [layer.half for layer in packs.layers] == [True, False]  # the trainable stays fp32
    frozen = packs.layers[0].packed
    assert packs.discard_trainable() == 1 and packs.layers[0].packed is frozen
    packs.refresh()
    assert packs.layers[0].packed is frozen  # packed once
    x = torch.randn(3, 5, 8)
    with packs.active():
        out = layers(x)
    with _frozen_weights_rounded_to_fp16(packs):
        expected = layers(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, layers(x))  # the rounding is there: float32 weights differ
    with torch.no_grad():
        layers[0].weight.add_(1.0)  # a frozen weight written (a checkpoint load): re-packed
    packs.refresh()
    assert packs.layers[0].packed is not frozen and packs.layers[0].half
    with packs.active():
        out = layers(x)
    with _frozen_weights_rounded_to_fp16(packs):
        torch.testing.assert_close(out, layers(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layers[0].weight[0, 0] = 1e5  # beyond float16's range: this weight stays float32
    packs.refresh()
    assert not packs.layers[0].half
    with packs.active():
        torch.testing.assert_close(layers(x), layers[1](layers[0](x)), rtol=1e-5, atol=1e-5)


def test_fp16_trainable_weights_packed_per_call_rounded_to_float16() -> None:
    from grpokit.engines.packed_linear import decode_packs

    _fp16_or_skip()
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    layers[0].requires_grad_(False)  # frozen, packed in float32 here (fp16_frozen=False)
    packs = decode_packs(layers, fp16_frozen=False)
    assert packs is not None and packs.fp16
    frozen = packs.layers[0].packed
    packs.refresh(fp16_trainable=True)
    assert [layer.half for layer in packs.layers] == [False, True]
    assert packs.layers[0].packed is frozen
    x = torch.randn(3, 5, 8)
    with packs.active():
        out = layers(x)
    with _frozen_weights_rounded_to_fp16(packs):  # rounds every layer held in float16
        torch.testing.assert_close(out, layers(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, layers(x), rtol=1e-6, atol=1e-7)
    # freed before an optimizer step like any trainable pack; the next call chooses again
    assert packs.discard_trainable() == 1 and packs.layers[1].packed is None
    packs.refresh(fp16_trainable=False)
    assert [layer.half for layer in packs.layers] == [False, False]
    with packs.active():
        torch.testing.assert_close(layers(x), layers[1](layers[0](x)), rtol=1e-5, atol=1e-5)


def test_engine_packs_trainable_weights_in_float16_for_long_calls_only() -> None:
    from grpokit.engines.transformers_engine import FP16_TRAINABLE_MIN_TOKENS

    _fp16_or_skip()
    tok = make_tokenizer()
    model = make_causal_lm(tok)  # every weight trains: a full fine-tune
    auto = TransformersEngine(model, tok, bf16_sampler=False, pack_weights=True)
    if auto._decode_packs is None:
        pytest.skip("this torch build has no oneDNN")
    assert not auto._fp16_trainable(FP16_TRAINABLE_MIN_TOKENS - 1)
    assert auto._fp16_trainable(FP16_TRAINABLE_MIN_TOKENS)
    never = TransformersEngine(model, tok, bf16_sampler=False, fp16_trainable_weights=False)
    assert not never._fp16_trainable(10 * FP16_TRAINABLE_MIN_TOKENS)
    always = TransformersEngine(model, tok, bf16_sampler=False, fp16_trainable_weights=True)
    assert always._fp16_trainable(1)
    # the tokens drawn are those of the weights rounded to float16, and a call after a weight
    # update packs the new weights (the first call packed them in float16: 8 new tokens)
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
    plain = TransformersEngine(model, tok, bf16_sampler=False, pack_weights=False)
    for _ in range(2):
        b = always.generate(PROMPTS, **kwargs)
        packs = always._decode_packs
        assert packs is not None and all(layer.half for layer in packs.layers)
        with _frozen_weights_rounded_to_fp16(packs):
            a = plain.generate(PROMPTS, **kwargs)
        assert torch.equal(a.completion_ids, b.completion_ids)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)


@pytest.mark.parametrize("name", ["fp16_frozen_weights", "fp16_trainable_weights"])
def test_fp16_weights_refused_where_there_are_no_decode_packs(name: str) -> None:
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=f"{name}=True applies only"):
        TransformersEngine(make_causal_lm(tok), tok, pack_weights=False, **{name: True})


@pytest.mark.parametrize("fp16_frozen", [False, True])
def test_fp32_decode_packs_merge_lora_adapters(fp16_frozen: bool) -> None:
    """Without `fp16_frozen` a LoRA layer is packed with its adapters merged; with it, its frozen
    base is held in float16 and the adapters are applied apart in float32."""
    peft = pytest.importorskip("peft")
    from grpokit.engines.packed_linear import decode_packs

    if fp16_frozen:
        _fp16_or_skip()

    tok = make_tokenizer()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = peft.get_peft_model(make_causal_lm(tok), lora)
    with torch.no_grad():  # B starts at 0: give the adapters an effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    packs = decode_packs(model, fp16_frozen=fp16_frozen)
    if packs is None:
        pytest.skip("this torch build has no oneDNN")
    # under LoRA every base weight (and the untargeted lm_head) is frozen
    assert [layer.half for layer in packs.layers] == [fp16_frozen] * len(packs.layers)
    lora_layers = [m for m in model.modules() if hasattr(m, "base_layer")]
    merged = [layer for layer in packs.layers if layer.adapters]
    assert [layer.module for layer in merged] == lora_layers
    assert all(layer.adapters == ("default",) for layer in merged)
    # lm_head is not a LoRA target: packed alone; no adapter matrix is packed on its own
    assert [layer.module for layer in packs.layers if not layer.adapters] == [
        model.get_base_model().lm_head
    ]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()

    def rounded() -> contextlib.AbstractContextManager[None]:
        return _frozen_weights_rounded_to_fp16(packs) if fp16_frozen else contextlib.nullcontext()

    with torch.no_grad():
        with rounded():
            expected = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
        with packs.active():
            packed = model(input_ids=ids).logits
        # adapters switched off while packed: those layers run their own forward (the base)
        with model.disable_adapter(), packs.active():
            packed_base = model(input_ids=ids).logits
    # merged: float32 up to summation order; float16 base: as its rounded weights compute
    tolerance = 1e-5 if fp16_frozen else 1e-4
    torch.testing.assert_close(packed, expected, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(base, expected, atol=1e-2)  # the adapters matter
    if not fp16_frozen:
        torch.testing.assert_close(packed_base, base, rtol=1e-4, atol=1e-4)
    else:  # lm_head (not a LoRA target) still multiplies by its float16 pack
        torch.testing.assert_close(packed_base, base, rtol=1e-3, atol=1e-3)
        with torch.no_grad():
            float32 = model(input_ids=ids).logits
        assert not torch.allclose(packed, float32, rtol=1e-5, atol=1e-5)  # rounded indeed
    # the engine samples the same tokens with and without the packs (the float16 ones against
    # the weights they round to), before and after an adapter update (refreshed at each call)
    greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
    plain = TransformersEngine(model, tok, bf16_sampler=False, pack_weights=False)
    packed_engine = TransformersEngine(
        model, tok, bf16_sampler=False, pack_weights=True, fp16_frozen_weights=fp16_frozen
    )
    for _ in range(2):
        with rounded():
            a = plain.generate([[5, 6, 7], [9, 8, 7, 6]], **kwargs)
        b = packed_engine.generate([[5, 6, 7], [9, 8, 7, 6]], **kwargs)
        assert torch.equal(a.completion_ids, b.completion_ids)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.mul_(-1.0)


def test_packed_sampler_holds_linear_weights_once() -> None:
    """The packed layers keep no plain bf16 weight (a tied one excepted), and still follow the
    policy: after an update they decode what an unpacked bf16 copy decodes."""
    from grpokit.engines.packed_linear import PackedLinear

    tok = make_tokenizer()
    untied = make_causal_lm(tok, tie_word_embeddings=False)
    tied = make_causal_lm(tok, tie_word_embeddings=True)
    for model in (untied, tied):
        engine = TransformersEngine(model, tok, bf16_sampler=True)
        layers = {n: m for n, m in engine.sampler_model.named_modules() if type(m) is PackedLinear}
        if not layers:
            pytest.skip("this torch build has no oneDNN")
        for name, layer in layers.items():
            shared = model is tied and name == "lm_head"  # the embedding reads it
            assert layer.weight_released is not shared, name
            held = layer.weight.untyped_storage().nbytes()
            assert held == (layer.weight.numel() * 2 if shared else 2), name  # bf16: 2 bytes
            assert layer.weight.shape == (layer.out_features, layer.in_features)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        engine.update_weights(model)
        plain = TransformersEngine(model, tok, bf16_sampler=True, pack_weights=False)
        greedy = SamplingParams(top_k=1, generation_kwargs={"min_new_tokens": 6})
        kwargs = dict(num_generations=2, max_new_tokens=8, sampling=greedy)
        assert torch.equal(
            engine.generate(PROMPTS, **kwargs).completion_ids,
            plain.generate(PROMPTS, **kwargs).completion_ids,
        )


def test_bf16_copy_never_copies_the_float32_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler copy is built from bf16 casts of the parameters (no float32 parameter is
    deep-copied): its parameters are new bf16 tensors, a tied weight stays one parameter,
    buffers are copied."""
    tok = make_tokenizer()
    model = make_causal_lm(tok, tie_word_embeddings=True)

    def refuse(self: torch.nn.Parameter, memo: dict[int, object]) -> None:
        raise AssertionError("a float32 parameter was deep-copied")

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    engine = TransformersEngine(model, tok, bf16_sampler=True, pack_weights=False)
    copy = engine.sampler_model
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and not q.requires_grad, name
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name
    for (name, b), c in zip(model.named_buffers(), copy.buffers(), strict=True):
        assert torch.equal(b, c) and b.data_ptr() != c.data_ptr(), name


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_sample_what_separate_packs_sample(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding q/k/v and gate/up as one packed weight each changes no bit: the same seed gives
    the same tokens and sampling log-probs as separately packed layers, before and after an
    update of every weight (and bias)."""
    from grpokit.engines import packed_linear

    tok = make_tokenizer()
    model = make_causal_lm(tok, attention_bias=bias)
    fused = TransformersEngine(model, tok, bf16_sampler=True, return_logprobs=True)
    groups = {id(m.group) for m in fused.sampler_model.modules() if getattr(m, "group", None)}
    if not groups:
        pytest.skip("this torch build has no oneDNN")
    assert len(groups) == 2 * 2  # 2 layers x (q/k/v, gate/up)
    with monkeypatch.context() as patch:
        patch.setattr(packed_linear, "FUSABLE_PROJECTIONS", ())
        separate = TransformersEngine(model, tok, bf16_sampler=True, return_logprobs=True)
    assert not any(getattr(m, "group", None) for m in separate.sampler_model.modules())
    sampling = SamplingParams(temperature=0.9, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=3, max_new_tokens=8, sampling=sampling)
    for _ in range(2):
        outs = []
        for engine in (fused, separate):
            torch.manual_seed(3)
            outs.append(engine.generate(PROMPTS, **kwargs))
        assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
        assert torch.equal(outs[0].sampling_logprobs, outs[1].sampling_logprobs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        for engine in (fused, separate):
            engine.update_weights(model)
    weights = fused.sampler_weights()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach().to(torch.bfloat16)), name


def test_kept_product_computed_once_per_input_for_the_members_in_turn() -> None:
    """`KeptProduct`: three members called on one tensor share one product; a new tensor, one
    written in place since, or a member called again after all took theirs computes afresh;
    an inference-mode tensor (no version counter) is matched by identity."""
    from grpokit.engines.packed_linear import KeptProduct

    calls: list[torch.Tensor] = []

    def product(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return torch.cat([x, 2 * x, 3 * x], dim=-1)  # [..., 3 * in]: members' columns

    kept = KeptProduct(3)
    cols = [slice(0, 4), slice(4, 8), slice(8, 12)]
    x = torch.randn(2, 4)
    outs = [kept.columns(x, c, product) for c in cols]
    assert len(calls) == 1 and kept.input is None and kept.waiting == 0  # dropped after all 3
    for i, out in enumerate(outs):
        assert torch.equal(out, (i + 1) * x)
    kept.columns(x, cols[0], product)
    assert len(calls) == 2  # a new round on the same tensor: computed again
    x.mul_(2.0)  # written in place before the other members' calls
    assert torch.equal(kept.columns(x, cols[1], product), 2 * x) and len(calls) == 3
    assert torch.equal(kept.columns(torch.ones(2, 4), cols[2], product), 3 * torch.ones(2, 4))
    assert len(calls) == 4  # another tensor
    kept.clear()
    with torch.inference_mode():
        z = torch.randn(3, 4)
        outs = [kept.columns(z, c, product) for c in cols]
    assert len(calls) == 5 and torch.equal(outs[2], 3 * z)


def test_fused_group_in_float32_computes_one_product_per_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The q/k/v `FusedGroup` (here over float32 `PackedLinear`s, so on every CPU with oneDNN):
    each member's own product, one stacked product for the three called on one input."""
    from grpokit.engines import packed_linear

    torch.manual_seed(0)
    attention = torch.nn.Module()
    attention.q_proj = torch.nn.Linear(32, 32, bias=False)
    attention.k_proj = torch.nn.Linear(32, 16, bias=False)
    attention.v_proj = torch.nn.Linear(32, 16, bias=False)
    names = ("q_proj", "k_proj", "v_proj")
    weights = {n: getattr(attention, n).weight.detach().clone() for n in names}
    if not packed_linear.can_pack(attention.q_proj.weight):
        pytest.skip("this torch build has no oneDNN")
    for name in names:
        getattr(attention, name).__class__ = packed_linear.PackedLinear
    assert len(packed_linear.fuse_projections(attention)) == 1
    products = []
    real = packed_linear.packed_product

    def counted(*args: Any) -> torch.Tensor:
        products.append(args)
        return real(*args)

    monkeypatch.setattr(packed_linear, "packed_product", counted)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            x = torch.randn(3, 32)
            for name in names:
                out = getattr(attention, name)(x)
                expected = torch.nn.functional.linear(x, weights[name])
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert len(products) == 1
        products.clear()


def test_fused_group_members_called_on_other_inputs_compute_their_own_product() -> None:
    """A member reuses the group's product only for the same, unchanged input tensor; on any
    other input (a new tensor, one written in place, an inference-mode tensor, a member called
    alone or twice) it still returns exactly its own product."""
    from grpokit.engines.packed_linear import FusedGroup, pack_linear_layers

    torch.manual_seed(0)
    attention = torch.nn.Module()
    attention.q_proj = torch.nn.Linear(32, 32, bias=False)
    attention.k_proj = torch.nn.Linear(32, 16, bias=False)
    attention.v_proj = torch.nn.Linear(32, 16, bias=False)
    attention.to(torch.bfloat16)
    names = ("q_proj", "k_proj", "v_proj")
    weights = {n: getattr(attention, n).weight.detach().clone() for n in names}

    def expected(name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, weights[name])

    if not pack_linear_layers(attention, release=True, fuse=True):
        pytest.skip("this torch build has no oneDNN")
    assert isinstance(attention.q_proj.group, FusedGroup)
    assert attention.q_proj.packed is None  # the group holds the weights, once
    x, y = torch.randn(2, 3, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    calls = [("k_proj", x), ("q_proj", y), ("q_proj", x), ("v_proj", x), ("v_proj", x)]
    with torch.no_grad():
        for name, inp in calls:
            assert torch.equal(getattr(attention, name)(inp), expected(name, inp)), name
        assert torch.equal(attention.q_proj(x), expected("q_proj", x))
        x.mul_(2.0)  # written in place between two members' calls
        assert torch.equal(attention.k_proj(x), expected("k_proj", x))
    with torch.inference_mode():
        z = torch.randn(5, 32, dtype=torch.bfloat16)
        for name in names:
            assert torch.equal(getattr(attention, name)(z), expected(name, z)), name
    attention.k_proj.pack(weights["k_proj"] * 2)  # staged until the group is flushed
    assert torch.equal(attention.k_proj.dense_weight(), weights["k_proj"] * 2)
    attention.k_proj.repack_if_changed()
    weights["k_proj"] = weights["k_proj"] * 2
    with torch.no_grad():
        for name in names:
            assert torch.equal(getattr(attention, name)(y), expected(name, y)), name
            assert torch.equal(getattr(attention, name).dense_weight(), weights[name]), name
    # New values for every member: the group re-packs at the last one, keeping none staged
    group = attention.q_proj.group
    for name in names:
        weights[name] = weights[name] * 3
        getattr(attention, name).pack(weights[name])
    assert not group.staged
    with torch.no_grad():
        for name in names:
            assert torch.equal(getattr(attention, name)(y), expected(name, y)), name


def _reference_sample(sampler: TokenSampler, logits: torch.Tensor, step: int) -> torch.Tensor:
    """`TokenSampler.sample` spelt out with out-of-place ops on a float32 copy and an
    elementwise NaN test, as a reference for the in-place fills and the row-sum test."""
    s = sampler.sampling
    scores = logits.float().clone()
    if step < sampler.min_new_tokens:
        scores = scores.index_fill(1, sampler.eos, float("-inf"))
    if sampler.suppressed.numel():
        scores = scores.index_fill(1, sampler.suppressed, float("-inf"))
    scores = scores / s.temperature
    if s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p)
    probs = torch.softmax(scores, dim=-1)
    assert not torch.isnan(probs).any()
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_sampler_draws_what_the_out_of_place_reference_draws(dtype: torch.dtype) -> None:
    """The in-place fills change no draw (same seed, same tokens) and leave the caller's logits
    alone, for float32 logits (no copy of them is made first) and bf16 ones (cast to a copy)."""
    torch.manual_seed(0)
    n, v = 6, 300
    logits = (torch.randn(n, v) * 3).to(dtype)
    before = logits.clone()
    for sampling in (
        SamplingParams(generation_kwargs={"min_new_tokens": 2, "suppress_tokens": [4, 5]}),
        SamplingParams(temperature=0.7, top_p=0.9, generation_kwargs={"min_new_tokens": 2}),
        SamplingParams(temperature=0.7),
    ):
        kwargs = dict(eos_token_ids=[EOS, 3], vocab_size=v)
        prompts = dict(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1))
        sampler = TokenSampler(sampling, **kwargs, **prompts)
        for step in (0, 3):
            torch.manual_seed(step)
            expected = _reference_sample(sampler, logits, step)
            torch.manual_seed(step)
            assert torch.equal(sampler.sample(logits, step), expected), (sampling, step)
            assert torch.equal(logits, before)


def test_token_sampler_names_exactly_the_rows_without_a_distribution() -> None:
    """The row-sum NaN test flags the rows whose softmax holds a NaN: a NaN logit, a +inf logit,
    every token filtered out (here by suppress_tokens); a row with some -inf logits, or with
    huge finite ones, still has a distribution."""
    from grpokit.engines.sampling import NonFiniteLogitsError

    v = 8
    logits = torch.zeros(6, v)
    logits[1, 2] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :] = float("-inf")
    logits[4, 1:] = float("-inf")  # only token 0 left: a distribution
    logits[5, :] = 3e38  # finite: exp(x - max) is 1 everywhere
    prompts = dict(prompt_ids=torch.zeros(6, 1, dtype=torch.long), prompt_mask=torch.ones(6, 1))
    sampler = TokenSampler(SamplingParams(), eos_token_ids=[EOS], vocab_size=v, **prompts)
    probs = torch.softmax(logits, -1)
    expected = torch.isnan(probs).any(-1)  # the elementwise test
    assert expected.tolist() == [False, True, True, True, False, False]
    assert torch.equal(torch.isnan(probs.sum(-1)), expected)
    with pytest.raises(NonFiniteLogitsError, match=r"logits of 3 of 6 rows are NaN or inf"):
        sampler.sample(logits, 0)
    assert sampler.sample(logits[[0, 4, 5]], 0)[1] == 0
    suppress_all = SamplingParams(generation_kwargs={"suppress_tokens": list(range(v))})
    sampler = TokenSampler(suppress_all, eos_token_ids=[EOS], vocab_size=v, **prompts)
    with pytest.raises(NonFiniteLogitsError, match=r"logits of 6 of 6 rows"):
        sampler.sample(torch.zeros(6, v), 0)


def test_discarded_trainable_copies_come_back_before_sampling() -> None:
    """`discard_trainable_copies` frees the packed weights of trainable parameters (a fused
    group only when all its members are trainable) and keeps the others; `update_weights`, or
    without it the next `generate`, packs them again from the model, so the engine samples
    exactly what an engine that never discarded samples."""
    from grpokit.engines.packed_linear import PackedLinear

    tok = make_tokenizer()
    model = make_causal_lm(tok)
    frozen_layer = model.model.layers[1]
    frozen_layer.mlp.down_proj.weight.requires_grad_(False)
    frozen_layer.self_attn.q_proj.weight.requires_grad_(False)  # its group (q/k/v) stays
    discarding = TransformersEngine(model, tok, bf16_sampler=True, return_logprobs=True)
    plain = TransformersEngine(model, tok, bf16_sampler=True, return_logprobs=True)
    packed = {  # the layers that hold their weight only packed, by parameter name
        f"{name}.weight": module
        for name, module in discarding.sampler_model.named_modules()
        if isinstance(module, PackedLinear) and module.weight_released
    }
    if not packed:
        pytest.skip("this torch build has no oneDNN")
    discarding.discard_trainable_copies(model)
    kept = {
        "model.layers.1.mlp.down_proj.weight",
        *(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"),
    }
    assert {name for name, layer in packed.items() if not layer.discarded} == kept
    assert all(layer.packed is None for name, layer in packed.items() if name not in kept)
    with pytest.raises(RuntimeError, match="discarded"), torch.no_grad():
        packed["model.layers.0.mlp.down_proj.weight"](torch.zeros(1, 64, dtype=torch.bfloat16))
    sampling = SamplingParams(temperature=0.9, generation_kwargs={"min_new_tokens": 6})
    kwargs = dict(num_generations=3, max_new_tokens=8, sampling=sampling)
    for refill in ("update_weights", "generate"):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        plain.update_weights(model)
        if refill == "update_weights":
            discarding.update_weights(model)
            assert not any(layer.discarded for layer in packed.values())
        outs = []
        for engine in (discarding, plain):
            torch.manual_seed(5)
            outs.append(engine.generate(PROMPTS, **kwargs))
        assert torch.equal(outs[0].completion_ids, outs[1].completion_ids), refill
        assert torch.equal(outs[0].sampling_logprobs, outs[1].sampling_logprobs), refill
        discarding.discard_trainable_copies(model)
    weights = discarding.sampler_weights()  # packs what was discarded first
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach().to(torch.bfloat16)), name


def _draw_from_history(probs: torch.Tensor) -> torch.Tensor:
    """A stand-in for a random draw that depends only on each row's own distribution `[N, V]`
    (so on its history), never on which rows share the batch: the inverse CDF at a number
    spread over [0, 1) by the row's probabilities. `[N]` long."""
    weights = torch.linspace(0.1, 0.9, probs.shape[1], dtype=torch.float64)
    u = ((probs.double() @ weights) * 97) % 1  # [N]
    cdf = probs.double().cumsum(-1)  # [N, V]
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    return token.clamp(max=probs.shape[1] - 1)


def _off_and_on(tok, model, option: str, prompts, max_new_tokens: int):
    """`generate` with the engine `option` False, then True (EOS-biased sampling through
    `_draw_from_history`, sampling log-probs kept): `({False: out, True: out}, {False: shapes,
    True: shapes})`, the `(rows, tokens)` of each forward (`batch_sizes_seen`)."""
    eos_bias = {(tok.eos_token_id,): 3.0}
    sampling = SamplingParams(generation_kwargs={"sequence_bias": eos_bias})
    outs, shapes = {}, {}
    for on in (False, True):
        engine = _engine(tok, model, bf16_sampler=False, return_logprobs=True, **{option: on})
        engine.draw = _draw_from_history
        shapes[on], handle = batch_sizes_seen(model)
        try:
            outs[on] = engine.generate(
                prompts, num_generations=2, max_new_tokens=max_new_tokens, sampling=sampling
            )
        finally:
            handle.remove()
    return outs, shapes


def test_dropping_ended_rows_keeps_every_token_and_logprob() -> None:
    """Prompts whose completions end at different steps: the rows that ended leave the decode
    batch (the forwards shrink), and every row's tokens, mask and sampling log-probs are those
    of the loop that keeps all N rows to the end (a draw that depends only on each row's own
    distribution, so that both loops draw the same tokens)."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]
    outs, shapes = _off_and_on(tok, model, "drop_finished_rows", prompts, 16)
    sizes = {on: [rows for rows, _ in shapes[on]] for on in shapes}
    lengths = outs[False].completion_mask.sum(1)  # [12]
    assert len(set(lengths.tolist())) >= 4  # rows end at several different steps
    assert torch.equal(outs[True].completion_ids, outs[False].completion_ids)
    assert torch.equal(outs[True].completion_mask, outs[False].completion_mask)
    assert torch.equal(outs[True].is_truncated, outs[False].is_truncated)
    torch.testing.assert_close(outs[True].sampling_logprobs, outs[False].sampling_logprobs)
    assert sizes[False][0] == 6  # the shared prefill: each prompt once
    assert sizes[False][1:] == [12] * (len(sizes[False]) - 1)
    steps = sizes[True][1:]  # the decode forwards, the k-th computing completion token k
    assert len(steps) == len(sizes[False]) - 1 == int(lengths.max()) - 1
    assert steps == sorted(steps, reverse=True) and steps[-1] < 12
    for k, rows in enumerate(steps, start=1):
        going = int((lengths > k).sum())  # rows whose completion has not ended by token k - 1
        # every row still going is there; ended rows linger only while under an eighth
        assert going <= rows and (rows - going) * 8 < rows


def test_draw_multinomial_keeps_every_row_to_the_end() -> None:
    """draw="multinomial" reproduces model.generate's random stream, which samples every row
    at every step: there rows are not dropped unless asked for."""
    tok = make_tokenizer()
    assert not _engine(tok, draw="multinomial").drop_finished_rows
    assert _engine(tok, draw="multinomial", drop_finished_rows=True).drop_finished_rows
    assert _engine(tok).drop_finished_rows


def test_common_prefix_first_moves_padding_after_the_shared_tokens() -> None:
    """Hand-built rows: the 3 tokens all prompts begin with come first, the padding after them,
    each row's own tokens stay in place; a row keeps at least one token of its own."""
    ids, mask = left_pad([[4, 5, 6, 7, 8], [4, 5, 6, 9], [4, 5, 6, 7]], PAD)
    order, common = common_prefix_first(ids, mask, min_saved=1)
    assert common == 3
    assert ids.gather(1, order).tolist() == [[4, 5, 6, 7, 8], [4, 5, 6, PAD, 9], [4, 5, 6, PAD, 7]]
    assert mask.gather(1, order).tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 0, 1]]
    # the shortest prompt bounds the run; one forward saved per row beyond the first
    ids, mask = left_pad([[4, 5, 6, 7], [4, 5]], PAD)
    assert common_prefix_first(ids, mask, min_saved=1)[1] == 1
    assert common_prefix_first(ids, mask, min_saved=2)[1] == 0  # (2 - 1) * 1 < 2: not worth it
    ids, mask = left_pad([[4, 5, 6], [7, 5, 6]], PAD)
    order, common = common_prefix_first(ids, mask, min_saved=0)
    assert common == 0 and torch.equal(order, torch.arange(3).expand(2, 3))


def test_shared_common_prefix_samples_what_separate_prompts_sample() -> None:
    """Prompts that share a long head (a system prompt) of different lengths: the shared head is
    prefilled once (a forward of one row, then one of the prompts' own tokens only), and the
    tokens, masks and sampling log-probs are those of the plain left-padded prefill."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    head = [20 + i % 30 for i in range(24)]
    prompts = [[*head, 5, 6, 7], [*head, 8], [*head, 9, 10, 11, 12, 13]]
    outs, sizes = _off_and_on(tok, model, "share_common_prefix", prompts, 12)
    assert torch.equal(outs[True].completion_ids, outs[False].completion_ids)
    assert torch.equal(outs[True].completion_mask, outs[False].completion_mask)
    torch.testing.assert_close(outs[True].sampling_logprobs, outs[False].sampling_logprobs)
    assert torch.equal(outs[True].prompt_ids, outs[False].prompt_ids)  # left-padded as given
    assert torch.equal(outs[True].prompt_mask, outs[False].prompt_mask)
    assert sizes[False][0] == (3, 29)  # the prompts, left-padded to the longest
    assert sizes[True][:2] == [(1, 24), (3, 5)]  # the head once, then 29 - 24 columns each
    assert sizes[True][2:] == sizes[False][1:]  # the decode steps


@pytest.mark.parametrize("bf16_sampler", [False, True])
def test_prompt_tuning_adapter_samples_with_its_virtual_tokens(bf16_sampler: bool) -> None:
    """A prompt-learning adapter's virtual tokens exist only in the PEFT model's own forward and
    generate: the engine samples through them (decode="hf"), and refuses the lean loop."""
    peft = pytest.importorskip("peft")
    tok = make_tokenizer()
    base = make_causal_lm(tok)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        torch.manual_seed(0)
        model.prompt_encoder["default"].embedding.weight.normal_(0, 3)
    dtype = torch.bfloat16 if bf16_sampler else torch.float32

    def first_token(forward, prompt: list[int]) -> int:
        with torch.no_grad(), torch.autocast("cpu", dtype, enabled=bf16_sampler):
            logits = forward(input_ids=torch.tensor([prompt])).logits
        return int(logits[0, -1].argmax())

    engine = TransformersEngine(model, tok, bf16_sampler=bf16_sampler)
    assert engine.decode == "hf"
    greedy = SamplingParams(top_k=1)
    drawn = [
        int(
            engine.generate(
                [p], num_generations=1, max_new_tokens=1, sampling=greedy
            ).completion_ids[0, 0]
        )
        for p in PROMPTS
    ]
    with_adapter = [first_token(engine.sampler_model, p) for p in PROMPTS]
    with model.disable_adapter():
        without = [first_token(model, p) for p in PROMPTS]
    assert drawn == with_adapter
    assert drawn != without  # the virtual tokens change what is drawn: the check has teeth
    with pytest.raises(ValueError, match="prompt-learning"):
        TransformersEngine(model, tok, decode="lean")


def test_float32_policy_with_float16_panels_samples_under_bf16_autocast() -> None:
    # The float32 policy sampling itself (bf16_sampler=False) under the trainer's bf16 autocast
    # on a CPU with native bf16: the LoRA layers' frozen weights are float16 panels, which take
    # float32 rows only; their products get the autocast's bf16 activations as float32 (before,
    # fbgemm refused them: "expected scalar type Float but found BFloat16").
    _fp16_or_skip()
    tok = make_tokenizer()
    model = _lora_model(tok)
    engine = _engine(tok, model, bf16_sampler=False, fp16_frozen_weights=True, return_logprobs=True)
    assert any(layer.half for layer in engine._decode_packs.layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.generate(
            PROMPTS, num_generations=2, max_new_tokens=4, sampling=SamplingParams()
        )
    mask = out.completion_mask.bool()
    assert mask.any() and torch.isfinite(out.sampling_logprobs[mask]).all()
    assert (out.sampling_logprobs[mask] <= 0).all()


def test_sync_parameters_are_the_adapters_and_the_merged_layers_base_weights() -> None:
    # What update_weights reads whole after a step (under ZeRO-3 the trainer gathers just
    # these): the trainable adapters and the base weight of each merged layer, not the other
    # frozen weights; with the adapters apart, the adapters alone.
    tok = make_tokenizer()
    model = _lora_model(tok)
    named = dict(model.named_parameters())
    adapters = {n for n, p in named.items() if p.requires_grad}
    bases = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.base_layer.weight"
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
    }
    ids = {id(p): n for n, p in named.items()}
    merged = _engine(tok, model, bf16_sampler=True).sync_parameters(model)
    assert {ids[id(p)] for p in merged} == adapters | bases and len(merged) == len(adapters) + 4
    apart = _engine(tok, model, bf16_sampler=True, merge_adapters=False).sync_parameters(model)
    assert {ids[id(p)] for p in apart} == adapters
