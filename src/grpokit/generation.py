"""Rollout generation behind a small interface: `GenerationEngine` and its transformers engine.

The training loop only sees `GenerationEngine.generate` (token ids in, padded tensors out) and
`update_weights` (called after each optimizer step), so another engine, e.g. vLLM, can be added
without touching the loop.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from grpokit.attention import NAME as GROUPED_ATTENTION
from grpokit.attention import use_grouped_attention


@dataclass
class SamplingParams:
    """How completions are sampled (the generation half of `GRPOConfig`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    """Completions of a batch of prompts. `N = B*G`; the G completions of a prompt are consecutive.

    Attributes:
        prompt_ids: `[N, P]` prompt tokens, left-padded.
        prompt_mask: `[N, P]` 1 = real prompt token, 0 = padding.
        completion_ids: `[N, T]` sampled tokens; the pad token after the first EOS.
        completion_mask: `[N, T]` 1 for every token up to and including the first EOS, 0 after it.
        is_truncated: `[N]` bool, True when no EOS was produced within `max_new_tokens`.
        sampling_logprobs: `[N, T]` float32 log-probs reported by the engine, or None.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    is_truncated: Tensor
    sampling_logprobs: Tensor | None = None


class GenerationEngine(Protocol):
    """Anything that samples completions for token-id prompts."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions for each prompt (unpadded token-id lists)."""
        ...

    def update_weights(self, model: Any) -> None:
        """Make the engine sample from `model`'s current weights (called after optimizer steps)."""
        ...


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into `(ids [B, P], mask [B, P])`; mask 1 = real token."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one prompt.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("A prompt has no tokens; every prompt needs at least one token.")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, tokens in enumerate(prompt_ids):
        ids[row, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def completion_mask_from_ids(
    completion_ids: Tensor, eos_token_ids: Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask each completion after its first EOS.

    Args:
        completion_ids: `[N, T]` sampled tokens (anything may follow an EOS).
        eos_token_ids: token ids that end a completion.
        pad_token_id: written over every position after the first EOS.

    Returns:
        `(completion_ids [N, T] with pad after the first EOS, completion_mask [N, T] long: 1 up to
        and including the first EOS, is_truncated [N] bool: no EOS at all)`.
    """
    n, t = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), dtype=torch.long))
    has_eos = is_eos.any(dim=1)  # [N]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((n,), t))  # [N]
    positions = torch.arange(t).expand(n, t)  # [N, T]
    completion_mask = (positions <= first_eos.unsqueeze(1)).long()  # [N, T]
    cleaned = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return cleaned, completion_mask, ~has_eos


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(
            "Neither the tokenizer nor the model's generation_config defines an EOS token; set "
            "tokenizer.eos_token so completions can end."
        )
    return sorted(ids)


class TransformersEngine:
    """Samples with a transformers causal LM in this process.

    Two decode paths give the same distribution:

    - `decode="lean"` (default): each distinct prompt is prefilled once and its KV cache is repeated
      for its G completions; then a plain loop of one-token forwards with `TokenSampler`, stopping
      as soon as every row has produced an EOS. Can return `sampling_logprobs`.
    - `decode="hf"`: `model.generate` on the G-times-repeated prompts (the reference path; takes
      any `generation_kwargs` that transformers knows; no `sampling_logprobs`).

    With `bf16_sampler` the engine samples from its own bf16 copy of the policy (parameters only;
    buffers such as rotary frequencies stay as they are), refreshed by an in-place copy in
    `update_weights`. Its matmuls round the weights to bf16 exactly as bf16 autocast does; the
    residual stream and norms then run in bf16 too, so the sampler differs from the autocast
    trainer by bf16 rounding (`sampling_logprobs` makes that gap measurable). Only parameters that
    changed are copied, so under PEFT the copy keeps the adapters unmerged and refreshes just them
    (no merge/unmerge of the base weights per step).

    `sampling_logprobs[n, t]` is `log_softmax(logits / temperature)` of the sampled token under the
    sampler's weights: after temperature, before repetition penalty, sequence bias, min_new_tokens
    and top-k/top-p/min-p. That is the quantity the trainer computes (`grpokit.logprobs`), so
    `old_logprobs - sampling_logprobs` measures only the sampler/trainer numerical gap; like TRL's
    importance-sampling correction it does not account for truncation by top-k/top-p.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        decode: str = "lean",
        share_prompt_prefill: bool = True,
        bf16_sampler: bool | None = None,
        sampler_attention: str | None = GROUPED_ATTENTION,
        draw: str = "inverse_cdf",
        return_logprobs: bool = False,
        num_threads: int | None = None,
        pack_weights: bool | None = None,
    ) -> None:
        """Wrap `model` (the policy being trained) and its tokenizer.

        Args:
            model: A transformers causal LM (optionally a PEFT model).
            tokenizer: Its tokenizer (EOS and pad ids).
            decode: "lean" (own decode loop) or "hf" (`model.generate`).
            share_prompt_prefill: Lean path only: prefill each prompt once for its G completions.
            bf16_sampler: Sample from a bf16 copy of the policy. None = when the device computes
                bf16 natively (`grpokit.models.bf16_supported`) and the policy is not already bf16.
            sampler_attention: Attention implementation of the bf16 copy (None = the policy's).
                The default, `grpokit.attention.grouped_attention`, computes transformers' eager
                attention without copying the key/value heads per query head; it decodes
                SmolLM2 ~1.6x faster per step than "sdpa" on CPU (one query row per step). The
                training model's own setting is never changed here.
            draw: Lean path: how a token is drawn from the processed distribution.
                "inverse_cdf" (default) = `sample_categorical`, exact, from one uniform number
                per row; "multinomial" = `torch.multinomial`, the same distribution and the same
                random stream as `model.generate` (same seed and same logits give the same
                tokens), but it draws V exponentials per row (~25% of a SmolLM2 decode step).
            return_logprobs: Lean path: fill `GenerationOutput.sampling_logprobs`. Off by
                default because the trainer applies its rollout importance correction
                (`vllm_importance_sampling_*`) whenever an engine returns them.
            num_threads: torch intra-op threads while generating (restored afterwards); None =
                leave torch's setting. On a busy CPU one thread can be much faster for small models.
            pack_weights: Keep the bf16 copy's linear weights also in oneDNN's blocked layout
                (`PackedLinear`), repacked after each weight update (~0.1 s for SmolLM2-135M);
                its matmuls then skip the per-call weight reordering (decode ~10% faster here).
                None = when the bf16 copy is used on a CPU whose torch has oneDNN.

        Raises:
            ValueError: an unknown `decode` or a non-positive `num_threads`.
        """
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {DECODE_PATHS}, got {decode!r}.")
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {sorted(DRAWS)}, got {draw!r}.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}.")
        self.model = model
        self.tokenizer = tokenizer
        self.decode = decode
        self.draw = DRAWS[draw]
        self.return_logprobs = return_logprobs
        self.share_prompt_prefill = share_prompt_prefill
        self.num_threads = num_threads
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        if bf16_sampler is None:
            from grpokit.models import bf16_supported

            dtype = next(model.parameters()).dtype
            bf16_sampler = bf16_supported() and dtype != torch.bfloat16
        self.sampler_model: Any = _bf16_copy(model, sampler_attention) if bf16_sampler else model
        # name -> (bf16 parameter, stamp of the source tensor it was last copied from)
        self._copies: dict[str, tuple[Tensor, tuple[int, int]]] = {}
        if bf16_sampler:
            source = dict(model.named_parameters())
            self._copies = {
                name: (param, _stamp(source[name]))
                for name, param in self.sampler_model.named_parameters()
            }
        self._packed: list[PackedLinear] = []
        if bf16_sampler and pack_weights is not False:
            self._packed = pack_linear_layers(self.sampler_model)
            if pack_weights and not self._packed:
                raise ValueError("pack_weights=True, but this torch build cannot pack weights.")

    def generation_config(self, max_new_tokens: int, sampling: SamplingParams) -> Any:
        """The `GenerationConfig` for one call: always sampling, never early length stopping."""
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = dict(
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 disables top-k in transformers
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
            use_cache=True,
        )
        kwargs.update(sampling.generation_kwargs)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions per prompt; see `GenerationOutput` for shapes."""
        ids, mask = left_pad(prompt_ids, self.pad_token_id)  # [B, P]
        # Picks up weights changed outside optimizer steps, e.g. a checkpoint load on resume.
        self._sync(self.model, copy_trainable=False)
        model = self.sampler_model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with _intra_op_threads(self.num_threads):
                if self.decode == "hf":
                    raw, logprobs = self._hf_generate(
                        ids, mask, num_generations, max_new_tokens, sampling, device
                    )
                else:
                    raw, logprobs = self._lean_generate(
                        ids.to(device), mask.to(device), num_generations, max_new_tokens, sampling
                    )
        finally:
            model.train(was_training)
        completion_ids, completion_mask, is_truncated = completion_mask_from_ids(
            raw.cpu(), self.eos_token_ids, self.pad_token_id
        )
        if logprobs is not None:
            logprobs = logprobs.cpu().masked_fill(completion_mask == 0, 0.0)
        ids = ids.repeat_interleave(num_generations, dim=0)  # [N, P]
        mask = mask.repeat_interleave(num_generations, dim=0)  # [N, P]
        return GenerationOutput(ids, mask, completion_ids, completion_mask, is_truncated, logprobs)

    def _hf_generate(
        self,
        ids: Tensor,
        mask: Tensor,
        g: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        device: torch.device,
    ) -> tuple[Tensor, None]:
        """`model.generate` on the prompts repeated G times: `([N, T] raw tokens, None)`."""
        ids = ids.repeat_interleave(g, dim=0)  # [N, P]
        sequences = self.sampler_model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.repeat_interleave(g, dim=0).to(device),
            generation_config=self.generation_config(max_new_tokens, sampling),
        )
        return sequences[:, ids.shape[1] :], None

    def _lean_generate(
        self, ids: Tensor, mask: Tensor, g: int, max_new_tokens: int, sampling: SamplingParams
    ) -> tuple[Tensor, Tensor | None]:
        """Prefill, then decode one token at a time until every row has ended.

        Args:
            ids: `[B, P]` left-padded prompts. mask: `[B, P]` 1 = real token.
            g: completions per prompt (G).

        Returns:
            `(tokens [N, T'], logprobs [N, T'] float32 or None)` with `T' <= max_new_tokens`: the
            steps actually run; rows that ended early hold the pad token after their EOS.
        """
        forward = _plain_forward(self.sampler_model)
        n = ids.shape[0] * g
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P]
        full_mask = mask.new_ones((n, mask.shape[1] + max_new_tokens))  # [N, P + T]
        full_mask[:, : mask.shape[1]] = mask.repeat_interleave(g, dim=0)
        sampler = TokenSampler(
            sampling,
            eos_token_ids=self.eos_token_ids,
            prompt_ids=ids.repeat_interleave(g, dim=0),
            prompt_mask=full_mask[:, : mask.shape[1]],
            vocab_size=int(forward.get_output_embeddings().weight.shape[0]),
            draw=self.draw,
        )
        cache, logits = prefill(forward, ids, mask, positions, g, share=self.share_prompt_prefill)
        next_position = positions[:, -1:].repeat_interleave(g, dim=0) + 1  # [N, 1]
        finished = torch.zeros(n, dtype=torch.bool, device=ids.device)
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            token = sampler.sample(logits, step)  # [N]
            if self.return_logprobs:
                scaled = logits / sampling.temperature  # [N, V]
                logprobs.append(torch.log_softmax(scaled, -1).gather(1, token[:, None]).squeeze(1))
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            finished |= torch.isin(token, sampler.eos)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            out = forward(
                input_ids=token[:, None],
                attention_mask=full_mask[:, : mask.shape[1] + step + 1],
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            next_position = next_position + 1
            logits = out.logits[:, -1].float()  # [N, V]
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1) if logprobs else None

    def update_weights(self, model: Any) -> None:
        """Copy `model`'s weights into the bf16 sampler after an optimizer step, in place (no
        allocation). Without a bf16 sampler this only records `model`.

        Every trainable parameter is copied (under PEFT only the adapters): fused optimizer
        kernels (AdamW with fused=True) write in place without bumping a tensor's version
        counter, so a version check would miss their updates. Frozen parameters are copied only
        when their version counter or storage moved.

        Raises:
            KeyError: `model` lacks a parameter the sampler copy has (a different architecture).
        """
        self._sync(model, copy_trainable=True)

    @torch.no_grad()
    def _sync(self, model: Any, *, copy_trainable: bool) -> None:
        """Copy into the sampler the parameters whose version counter or storage moved (a
        `load_state_dict`, `param.data = ...`), and with `copy_trainable` every trainable one."""
        self.model = model
        if not self._copies:
            return
        source = dict(model.named_parameters())
        for name, (param, stamp) in self._copies.items():
            if name not in source:
                raise KeyError(
                    f"update_weights: the model has no parameter {name!r}; pass the same model "
                    f"the engine was built with."
                )
            now = _stamp(source[name])
            if now != stamp or (copy_trainable and source[name].requires_grad):
                param.copy_(source[name])
                self._copies[name] = (param, now)
        for layer in self._packed:
            layer.repack_if_changed()


def prefill(
    forward: Any, ids: Tensor, mask: Tensor, positions: Tensor, g: int, *, share: bool
) -> tuple[Any, Tensor]:
    """Run the prompts through the model once and return the KV cache of the N = B*G rows.

    With `share`, each of the B prompts is prefilled once and its cache is repeated G times along
    the batch (the G completions of a prompt attend to the same prompt keys and values); without,
    the G-times-repeated prompts are prefilled as N rows. Both give the same cache and logits up
    to floating-point summation order.

    Args:
        forward: A causal LM taking `position_ids`, `logits_to_keep` and `use_cache`.
        ids: `[B, P]` left-padded prompts. mask: `[B, P]` 1 = real token.
        positions: `[B, P]` position ids (0 at padding).
        g: completions per prompt (G).
        share: prefill B rows instead of N.

    Returns:
        `(cache, logits)`: the model's cache object holding N rows, and the next-token logits
        `[N, V]` float32.
    """
    repeats = 1 if share else g
    out = forward(
        input_ids=ids.repeat_interleave(repeats, dim=0),
        attention_mask=mask.repeat_interleave(repeats, dim=0),
        position_ids=positions.repeat_interleave(repeats, dim=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    logits = out.logits[:, -1].float()  # [B or N, V]
    if share and g > 1:
        cache.batch_repeat_interleave(g)
        logits = logits.repeat_interleave(g, dim=0)  # [N, V]
    return cache, logits


DECODE_PATHS = ("lean", "hf")
LEAN_GENERATION_KWARGS = frozenset({"min_new_tokens", "sequence_bias", "suppress_tokens"})


def _stamp(tensor: Tensor) -> tuple[int, int]:
    """`(storage address, in-place version)`: changes whenever the tensor's values may have."""
    return tensor.data_ptr(), tensor._version


def _bf16_copy(model: Any, attention: str | None) -> Any:
    """A frozen eval-mode copy of `model` whose parameters are bf16 (buffers keep their dtype),
    using the `attention` implementation (None = the model's)."""
    clone = copy.deepcopy(model)
    for param in clone.parameters():
        param.data = param.data.to(torch.bfloat16)
        param.requires_grad_(False)
    if attention == GROUPED_ATTENTION:
        use_grouped_attention(clone)
    elif attention is not None:
        _plain_forward(clone).set_attn_implementation(attention)
    return clone.eval()


def _plain_forward(model: Any) -> Any:
    """The module whose forward takes `logits_to_keep`/`position_ids` (a PEFT model's base)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` torch intra-op threads (None = unchanged)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PackedLinear(torch.nn.Linear):
    """An inference-only `nn.Linear` that also keeps its weight in oneDNN's blocked layout.

    transformers' bf16 matmuls on CPU go through oneDNN, which reorders the `[out, in]` weight
    into its blocked layout on every call; with 16 rows per decode step that reordering costs
    about as much as the product. `pack()` reorders once (`torch.ops.mkldnn`); `forward` then
    multiplies by the packed copy: the same bf16 product. The `weight` parameter stays (tying,
    weight copies, PEFT), and `repack_if_changed()` re-packs after it was written in place.
    """

    packed: Tensor | None = None
    packed_version: int = -1

    def pack(self) -> None:
        """(Re)build the packed copy from `weight`."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self.packed_version = self.weight._version

    def repack_if_changed(self) -> None:
        if self.weight._version != self.packed_version:
            self.pack()

    def forward(self, x: Tensor) -> Tensor:
        """`x` `[..., in]` -> `[..., out]`."""
        if self.packed is None or x.dtype != self.weight.dtype:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linear_layers(model: torch.nn.Module) -> list[PackedLinear]:
    """Turn every plain bf16 CPU `nn.Linear` of `model` into a `PackedLinear` in place (same
    parameters, so tied weights stay tied) and pack it. Returns them; empty (model unchanged)
    when this torch cannot pack (no oneDNN)."""
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
    ]
    if not layers or not torch.backends.mkldnn.is_available():
        return []
    try:  # a private operator: check it works here before converting anything
        probe = layers[0].weight.detach()[:2]
        torch.ops.mkldnn._linear_pointwise(
            probe.new_zeros(1, probe.shape[1]),
            torch.ops.mkldnn._reorder_linear_weight(probe),
            None,
            "none",
            [],
            "",
        )
    except (RuntimeError, AttributeError):
        return []
    packed = []
    for layer in layers:
        layer.__class__ = PackedLinear
        assert isinstance(layer, PackedLinear)
        layer.pack()
        packed.append(layer)
    return packed


def sample_multinomial(probs: Tensor) -> Tensor:
    """One draw per row of `probs` `[N, V]` by `torch.multinomial`, as `model.generate`: `[N]`."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def sample_categorical(probs: Tensor) -> Tensor:
    """One exact draw per row of `probs` `[N, V]` (non-negative, any positive total) by inverting
    its cumulative distribution: `[N]` long.

    Needs one uniform number per row, where `torch.multinomial` draws V exponentials per row
    (about 12 ms per step for 16 x 49k on one core, a sixth of a SmolLM2 decode step). The CDF
    is inverted in two levels, both in float64 so that no token's interval is lost to rounding
    against a running sum near 1 (in float32 a token with p < ~6e-8 would vanish): first the
    block of `CDF_BLOCK` tokens, from the cumulative block masses `[N, V / CDF_BLOCK]`, then the
    token inside it, from that block's own cumulative sum `[N, CDF_BLOCK]`; this avoids a full
    `[N, V]` float64 cumulative sum. `u` is uniform in `[0, total)` and the drawn token is the
    first whose cumulative mass exceeds `u`, so a zero-probability token is never drawn.
    """
    n, v = probs.shape
    pad = -v % CDF_BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.reshape(n, -1, CDF_BLOCK)  # [N, nb, B]
    # Block masses by a float64 matrix-vector product (on CPU ~30x faster than a sum over the
    # last dim of this shape).
    ones = torch.ones(CDF_BLOCK, dtype=torch.float64, device=probs.device)
    block_cdf = (blocks.double() @ ones).cumsum(-1)  # [N, nb]
    total = block_cdf[:, -1:]  # [N, 1]
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total
    block = torch.searchsorted(block_cdf, u, right=True)  # [N, 1], a block of positive mass
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    flat = block.squeeze(1) + torch.arange(n, device=probs.device) * blocks.shape[1]  # [N]
    inner_cdf = blocks.reshape(-1, CDF_BLOCK).index_select(0, flat).cumsum(-1, dtype=torch.float64)
    rest = torch.minimum(u - before, torch.nextafter(inner_cdf[:, -1:], torch.zeros_like(u)))
    inner = torch.searchsorted(inner_cdf, rest, right=True)  # [N, 1]
    return (block * CDF_BLOCK + inner).squeeze(1)


DRAWS: dict[str, Callable[[Tensor], Tensor]] = {
    "multinomial": sample_multinomial,
    "inverse_cdf": sample_categorical,
}


class TokenSampler:
    """Next-token sampling from raw logits, in transformers' processor order.

    Order (the same as `model.generate` with `do_sample=True`): sequence bias, repetition penalty,
    `min_new_tokens` (EOS forbidden), `suppress_tokens`, temperature, top-k, top-p, min-p; then
    one draw per row from the softmax of the processed scores (`draw`).

    The repetition penalty counts the real prompt tokens and the tokens sampled so far
    (transformers also counts left-padding tokens, which only differs for the pad token's logit).
    """

    def __init__(
        self,
        sampling: SamplingParams,
        *,
        eos_token_ids: Sequence[int],
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        vocab_size: int,
        draw: Callable[[Tensor], Tensor] = sample_multinomial,
    ) -> None:
        """Validate `sampling` for the lean decode loop and prepare its per-call state.

        Args:
            sampling: The sampling settings; `generation_kwargs` may hold only
                `LEAN_GENERATION_KWARGS`.
            eos_token_ids: Tokens that end a completion (forbidden before `min_new_tokens`).
            prompt_ids: `[N, P]` left-padded prompts, one row per completion.
            prompt_mask: `[N, P]` 1 = real prompt token.
            vocab_size: V, the width of the logits.
            draw: `[N, V]` probabilities -> `[N]` tokens (`sample_multinomial` or
                `sample_categorical`).

        Raises:
            ValueError: an unsupported `generation_kwargs` key or a malformed value.
        """
        unknown = sorted(set(sampling.generation_kwargs) - LEAN_GENERATION_KWARGS)
        if unknown:
            raise ValueError(
                f"generation_kwargs {unknown} are not supported by the lean decode loop "
                f"(supported: {sorted(LEAN_GENERATION_KWARGS)}); drop them or build the engine "
                f"with TransformersEngine(model, tokenizer, decode='hf') to sample with "
                f"model.generate."
            )
        self.sampling = sampling
        self.draw = draw
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=prompt_ids.device)
        self.min_new_tokens = int(sampling.generation_kwargs.get("min_new_tokens") or 0)
        self.bias = _dense_sequence_bias(
            sampling.generation_kwargs.get("sequence_bias"), vocab_size, prompt_ids.device
        )
        suppressed = sampling.generation_kwargs.get("suppress_tokens") or []
        self.suppressed = torch.as_tensor(list(suppressed), dtype=torch.long).to(prompt_ids.device)
        self.seen: Tensor | None = None  # [N, V] bool: token occurred (repetition penalty)
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.bool)
            seen = seen.to(prompt_ids.device)
            self.seen = seen.scatter_(1, prompt_ids, prompt_mask.bool())

    def scores(self, logits: Tensor, step: int) -> Tensor:
        """Processed scores `[N, V]` float32 from raw `logits` `[N, V]` at completion `step`."""
        s = self.sampling
        scores = logits.float()
        if self.bias is not None:
            scores = scores + self.bias
        if self.seen is not None:
            scores = repetition_penalty(scores, self.seen, s.repetition_penalty)
        if step < self.min_new_tokens:
            scores = scores.index_fill(1, self.eos, float("-inf"))
        if self.suppressed.numel():
            scores = scores.index_fill(1, self.suppressed, float("-inf"))
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k > 0:
            scores = top_k_filter(scores, s.top_k)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p)
        if s.min_p is not None:
            scores = min_p_filter(scores, s.min_p)
        return scores

    def sample(self, logits: Tensor, step: int) -> Tensor:
        """Draw one token per row: `[N]` long from raw `logits` `[N, V]`."""
        probs = torch.softmax(self.scores(logits, step), dim=-1)  # [N, V]
        tokens = self.draw(probs)  # [N]
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        return tokens


def _dense_sequence_bias(bias: Any, vocab_size: int, device: torch.device) -> Tensor | None:
    """`{(token,): bias}` (single-token keys only) as a dense `[V]` float32 vector, or None."""
    if not bias:
        return None
    dense = torch.zeros(vocab_size, device=device)
    for key, value in dict(bias).items():
        tokens = (key,) if isinstance(key, int) else tuple(key)
        if len(tokens) != 1:
            raise ValueError(
                f"generation_kwargs['sequence_bias'] key {key!r}: the lean decode loop supports "
                f"single-token keys only; use TransformersEngine(..., decode='hf') for sequences."
            )
        dense[int(tokens[0])] += float(value)
    return dense


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, arXiv 1909.05858) on tokens already seen.

    A seen token's score is divided by `penalty` when positive and multiplied by it when negative,
    so `penalty > 1` always makes it less likely. `scores` `[N, V]`, `seen` `[N, V]` bool.
    """
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Keep the `k` highest scores per row (ties with the k-th kept), the rest -inf. `[N, V]`."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # [N, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of tokens,
    by descending probability, whose mass reaches `p`; the most likely token always stays. `[N, V]`.

    A token is dropped when the mass of the tokens strictly more likely than it is already >= p.
    """
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [N, V] mass of the tokens ranked above
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def min_p_filter(scores: Tensor, min_p: float) -> Tensor:
    """Min-p filter (Nguyen et al. 2024, arXiv 2407.01082): drop tokens whose probability is below
    `min_p` times the most likely token's. `[N, V]`."""
    probs = torch.softmax(scores, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # [N, 1]
    return scores.masked_fill(probs < threshold, float("-inf"))


@dataclass
class RolloutBatch:
    """One generation batch ready for the update. `N = B*G` rows; all tensors on the CPU.

    Attributes:
        prompt_ids: `[N, P]` left-padded. prompt_mask: `[N, P]` 1 = real token.
        completion_ids: `[N, T]`. completion_mask: `[N, T]` 1 up to and including the first EOS
            (the tokens the model attends to).
        loss_mask: `[N, T]` 1 = the token counts in the loss: `completion_mask`, with truncated
            completions zeroed when `mask_truncated_completions` is on.
        advantages: `[N]` float32.
        old_logprobs / ref_logprobs / sampling_logprobs: `[N, T]` float32 or None (0 at padding).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    loss_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    sampling_logprobs: Tensor | None = None

    @property
    def size(self) -> int:
        """N, the number of completions."""
        return int(self.completion_ids.shape[0])

    def trimmed(self, rows: slice) -> tuple[Tensor, Tensor, int]:
        """`(input_ids [n, P'+T'], attention_mask [n, P'+T'], T')` of `rows` without the padding
        columns every row shares: leading prompt padding and trailing completion padding."""
        prompt_mask = self.prompt_mask[rows]  # [n, P]
        completion_mask = self.completion_mask[rows]  # [n, T]
        first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # first column with a real token
        t = max(1, int(completion_mask.sum(1).max()))
        input_ids = torch.cat([self.prompt_ids[rows, first:], self.completion_ids[rows, :t]], dim=1)
        attention_mask = torch.cat([prompt_mask[:, first:], completion_mask[:, :t]], dim=1)
        return input_ids, attention_mask, t

    def sliced(self, name: str, rows: slice, t: int, device: torch.device) -> Tensor | None:
        """`[n, t]` rows of the per-token tensor `name`, or None when it was not computed."""
        value: Tensor | None = getattr(self, name)
        return None if value is None else value[rows, :t].to(device)
