"""engines.llama_decode: the written-out decode step gives transformers' logits bit for bit
(Llama with GQA, Qwen2 with projection biases, Mistral without a sliding window), the engine's
generations are the same with and without it, and it is refused where it was not written for."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

from grpokit.engines.base import SamplingParams, left_pad, plain_forward
from grpokit.engines.llama_decode import LlamaDecodeStep
from grpokit.engines.transformers_engine import TransformersEngine
from tests.tiny import config_kwargs, make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8], [9], [10, 11]]  # left padding of 3 and 2 positions


def _model(kind: str, tok, **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        return make_causal_lm(tok, **overrides)
    if kind == "qwen2":  # biases on q/k/v, as Qwen2 has
        return Qwen2ForCausalLM(Qwen2Config(**{**config_kwargs(tok), **overrides})).eval()
    return MistralForCausalLM(MistralConfig(**{**config_kwargs(tok), **overrides})).eval()


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": None}),
    ],
)
@pytest.mark.bf16_kernels
def test_step_logits_are_transformers_forward_bit_for_bit(kind: str, overrides: dict) -> None:
    """After the same prefill, six decode steps through the step and through transformers'
    forward (each on its own copy of the cache) give identical logits, with left padding."""
    tok = make_tokenizer()
    engine = TransformersEngine(_model(kind, tok, **overrides), tok, bf16_sampler=True)
    with torch.no_grad():
        _step_against_forward(engine, tok, 6, torch.bfloat16)


def _step_against_forward(engine, tok, steps: int, dtype: torch.dtype, between=None):
    """After one prefill, `steps` decode steps through the engine's step and through
    transformers' forward, each on its own copy of the cache: the same logits bit for bit.
    `between()` runs before each forward (after the step). Returns the step's cache."""
    step = engine.decode_step
    assert step is not None
    forward = plain_forward(engine.sampler_model)
    ids, mask = left_pad(PROMPTS, tok.pad_token_id)
    g = 2
    cache, _, positions = engine._prefilled(forward, ids, mask, g, steps)
    assert step.accepts(cache)
    full_mask = torch.cat([mask.repeat_interleave(g, 0), mask.new_ones(6, steps)], dim=1)
    caches = {"step": cache, "forward": copy.deepcopy(cache)}
    tokens = torch.tensor([3, 17, 4, 9, 12, 20])  # [N]
    for t in range(steps):
        step_mask = full_mask[:, : mask.shape[1] + t + 1]
        ours = step(tokens, step_mask, positions, caches["step"])
        if between is not None:
            between()
        theirs = forward(
            input_ids=tokens[:, None],
            attention_mask=step_mask,
            position_ids=positions,
            past_key_values=caches["forward"],
            use_cache=True,
        ).logits[:, -1]
        assert ours.dtype == dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs), f"step {t}"
        tokens = (tokens * 7 + t) % len(tok)
        positions = positions + 1
    return cache


class _Counting:
    """A decode step that counts its calls."""

    def __init__(self, step: LlamaDecodeStep) -> None:
        self.step, self.calls = step, 0

    def accepts(self, cache) -> bool:
        return self.step.accepts(cache)

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


@pytest.mark.bf16_kernels
def test_generations_are_the_same_with_and_without_the_step() -> None:
    """The same seed gives the same tokens and sampling log-probs, and the step is used."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    _same_generations(
        lambda step: TransformersEngine(
            model, tok, bf16_sampler=True, decode_step=step, return_logprobs=True
        )
    )


def _same_generations(make_engine) -> None:
    """Engines made by `make_engine(decode_step)` with the step (None) and without (False)
    draw the same tokens with the same sampling log-probs from one seed; the step is used."""
    sampling = SamplingParams(temperature=0.9, generation_kwargs={"min_new_tokens": 5})
    outs, counted = [], []
    for decode_step in (None, False):
        engine = make_engine(decode_step)
        if engine.decode_step is not None:
            engine.decode_step = _Counting(engine.decode_step)  # type: ignore[assignment]
            counted.append(engine.decode_step)
        torch.manual_seed(11)
        outs.append(
            engine.generate(PROMPTS, num_generations=2, max_new_tokens=9, sampling=sampling)
        )
    assert len(counted) == 1 and counted[0].calls >= 5  # at least min_new_tokens steps
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert torch.equal(outs[0].sampling_logprobs, outs[1].sampling_logprobs)


def _grouped(model):
    from grpokit.core.attention import use_grouped_attention

    use_grouped_attention(model)
    return model


def _with_lora(model):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # B starts at 0: give the adapters an effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


def _fp32_engine(model, tok, fp16: bool, **kwargs) -> TransformersEngine:
    from grpokit.engines.packed_linear import can_pack_fp16

    if fp16 and not can_pack_fp16():
        pytest.skip("this torch build has no fbgemm float16 products")
    engine = TransformersEngine(
        model,
        tok,
        bf16_sampler=False,
        fp16_frozen_weights=fp16,
        fp16_trainable_weights=fp16,
        **kwargs,
    )
    if engine._decode_packs is None:
        pytest.skip("this torch build has no oneDNN")
    return engine


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize(
    ("kind", "lora"), [("llama", False), ("qwen2", False), ("mistral", False), ("llama", True)]
)
def test_float32_policy_step_is_its_packed_forward_bit_for_bit(
    kind: str, lora: bool, fp16: bool, monkeypatch
) -> None:
    """The float32 policy's step multiplies by the same `DecodePacks` (q/k/v and gate/up as
    one product each, LoRA adapters at once) as transformers' forward within `active()`: the
    same logits bit for bit; and that forward computes each group's product once per input."""
    from grpokit.engines import packed_linear

    tok = make_tokenizer()
    overrides = {"sliding_window": None} if kind == "mistral" else {}
    model = _grouped(_model(kind, tok, **overrides))
    if lora:
        model = _with_lora(model)
    engine = _fp32_engine(model, tok, fp16)
    step, packs = engine.decode_step, engine._decode_packs
    assert step is not None and packs is not None
    layers = plain_forward(model).model.layers
    assert len(packs.groups) == 2 * len(layers)
    calls = []
    product = packed_linear.group_product
    monkeypatch.setattr(
        packed_linear, "group_product", lambda group, x: calls.append(x.shape) or product(group, x)
    )
    packs.refresh(fp16_trainable=fp16)
    assert all(layer.half == fp16 for layer in packs.layers)
    counts = []

    def count_forward_products() -> None:
        counts.append(len(calls))
        calls.clear()

    with torch.no_grad(), packs.active():
        cache = _step_against_forward(engine, tok, 4, torch.float32, count_forward_products)
        count_forward_products()
    # transformers' forward computed each group's product once a step, for all its rows (the
    # step holds the function itself, so only the forward's calls are counted)
    assert counts[1:] == [2 * len(layers)] * 4
    # the adapters (or weights) switched off: the step declines, transformers' forward runs
    if lora:
        with model.disable_adapter():
            assert not step.accepts(cache)


@pytest.mark.parametrize("lora", [False, True])
def test_float32_policy_generations_are_the_same_with_and_without_the_step(lora: bool) -> None:
    tok = make_tokenizer()
    model = _grouped(make_causal_lm(tok))
    if lora:
        model = _with_lora(model)
    _same_generations(
        lambda step: _fp32_engine(model, tok, fp16=False, decode_step=step, return_logprobs=True)
    )


def test_not_built_where_it_was_not_written_for() -> None:
    tok = make_tokenizer()
    llama = make_causal_lm(tok)
    cases = {
        "float32 policy without grouped attention": dict(model=llama, bf16_sampler=False),
        "float32 policy, weights unpacked": dict(
            model=_grouped(make_causal_lm(tok)), bf16_sampler=False, pack_weights=False
        ),
        "transformers' eager attention": dict(
            model=llama, bf16_sampler=True, sampler_attention="eager"
        ),
        "unpacked weights": dict(model=llama, bf16_sampler=True, pack_weights=False),
        "model.generate": dict(model=llama, bf16_sampler=True, decode="hf"),
        "a sliding window": dict(model=_model("mistral", tok, sliding_window=4), bf16_sampler=True),
        "no SiLU": dict(model=make_causal_lm(tok, hidden_act="gelu"), bf16_sampler=True),
    }
    for name, kwargs in cases.items():
        model = kwargs.pop("model")
        assert TransformersEngine(model, tok, **kwargs).decode_step is None, name
        with pytest.raises(ValueError, match="decode_step=True"):
            TransformersEngine(model, tok, decode_step=True, **kwargs)


@pytest.mark.bf16_kernels
def test_a_cache_without_reserved_layers_is_not_accepted() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok, bf16_sampler=True)
    assert engine.decode_step is not None
    assert not engine.decode_step.accepts(DynamicCache())
