"""`TransformersEngine`: sampling with a transformers causal LM in the training process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from grpokit.core.attention import NAME as GROUPED_ATTENTION
from grpokit.core.attention import use_grouped_attention
from grpokit.core.logprobs import common_prefix_first, is_prompt_learning
from grpokit.engines.base import (
    GenerationOutput,
    SamplingParams,
    TurnHandler,
    completion_mask_from_ids,
    eos_token_ids,
    left_pad,
    plain_forward,
)
from grpokit.engines.device import DeviceTraits, device_traits, model_device
from grpokit.engines.kv_cache import reserve_positions
from grpokit.engines.llama_decode import LlamaDecodeStep
from grpokit.engines.models import context_length
from grpokit.engines.multi_turn import RowRecord, assemble_output, reprefill_turns
from grpokit.engines.packed_linear import (
    DecodePacks,
    PackedLinear,
    decode_packs,
    pack_linear_layers,
)
from grpokit.engines.sampling import DRAWS, TokenSampler
from grpokit.engines.weight_sync import (
    is_shard,
    mergeable_lora_layers,
    merged_lora_weight,
    whole_tensor,
    zero3_partition,
)
from grpokit.errors import DataError

# `fp16_trainable_weights=None` packs the trainable weights as float16 panels for calls of at
# least this many new tokens. For a full fine-tune of SmolLM2-135M on an AVX2 CPU, 16 rows: the
# float16 packing costs 1.1-1.6 s more a call, and each decode step 25-30 ms less
# (bench/RESULTS.md).
FP16_TRAINABLE_MIN_TOKENS = 128


class TransformersEngine:
    """Samples with a transformers causal LM in this process.

    Two decode paths give the same distribution:

    - `decode="lean"` (default, except for a prompt-learning PEFT adapter): each distinct prompt
      is prefilled once and its KV cache is repeated for its G completions; then a plain loop
      of one-token forwards with `TokenSampler`, stopping as soon as every row has produced an
      EOS. Can return `sampling_logprobs`.
    - `decode="hf"`: `model.generate` on the G-times-repeated prompts (the reference path; takes
      any `generation_kwargs` that transformers knows; no `sampling_logprobs`).

    With `bf16_sampler` the engine samples from its own bf16 copy of the policy (parameters only;
    buffers such as rotary frequencies stay as they are), refreshed by an in-place copy in
    `update_weights` (linear weights held packed are re-packed from the policy's). Its matmuls
    round the weights to bf16 exactly as bf16 autocast does; the residual stream and norms then
    run in bf16 too, so the sampler differs from the autocast trainer by bf16 rounding
    (`sampling_logprobs` makes that gap measurable). Only parameters that changed are copied, so
    under PEFT the copy keeps the adapters unmerged and refreshes just them (no merge/unmerge of
    the base weights per step).

    `sampling_logprobs[n, t]` is `log_softmax(logits / temperature)` of the sampled token under the
    sampler's weights: after temperature, before repetition penalty, sequence bias, min_new_tokens
    and top-k/top-p/min-p. That is the quantity the trainer computes (`grpokit.core.logprobs`), so
    `old_logprobs - sampling_logprobs` measures only the sampler/trainer numerical gap; like TRL's
    importance-sampling correction it does not account for truncation by top-k/top-p.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        decode: str | None = None,
        share_prompt_prefill: bool = True,
        bf16_sampler: bool | None = None,
        sampler_attention: str | None = "auto",
        draw: str = "inverse_cdf",
        return_logprobs: bool = False,
        num_threads: int | None = None,
        pack_weights: bool | None = None,
        decode_step: bool | None = None,
        drop_finished_rows: bool | None = None,
        share_common_prefix: bool = True,
        fp16_frozen_weights: bool | None = None,
        fp16_trainable_weights: bool | None = None,
        merge_adapters: bool | None = None,
    ) -> None:
        """Wrap `model` (the policy being trained) and its tokenizer.

        Args:
            model: A transformers causal LM (optionally a PEFT model).
            tokenizer: Its tokenizer (EOS and pad ids).
            decode: "lean" (own decode loop) or "hf" (`model.generate`). None = "lean", except
                for a PEFT model with a prompt-learning adapter (prompt tuning, prefix tuning,
                p-tuning): its virtual tokens are added only by the PEFT model's own
                `generate`, so it samples through "hf".
            share_prompt_prefill: Lean path only: prefill each prompt once for its G completions.
            bf16_sampler: Sample from a bf16 copy of the policy. None = when the policy's device
                computes bf16 natively (`DeviceTraits.native_bf16`) and the policy is neither
                bf16 already nor quantized.
            sampler_attention: Attention implementation of the bf16 copy (None = the policy's).
                "auto" (default) = on the CPU `core.attention.grouped_attention`, which computes
                transformers' eager attention without copying the key/value heads per query head
                and suits the one query row per decode step better than the CPU "sdpa" kernel
                (timings in bench/RESULTS.md); elsewhere the policy's own
                (`DeviceTraits.grouped_attention`). The training model's own setting is never
                changed here.
            draw: Lean path: how a token is drawn from the processed distribution.
                "inverse_cdf" (default) = `sample_categorical`, exact, from one uniform number
                per row; "multinomial" = `torch.multinomial`, the same distribution and the same
                random stream as `model.generate` (same seed and same logits give the same
                tokens, also when logits tie at the top-p boundary: `sampling.top_p_filter`),
                but it draws V exponentials per row (a pass over the vocabulary).
            return_logprobs: Lean path: fill `GenerationOutput.sampling_logprobs`. Off by
                default because the trainer applies its rollout importance correction
                (`vllm_importance_sampling_*`) whenever an engine returns them.
            num_threads: torch intra-op threads while generating on the CPU (restored
                afterwards); None = leave torch's setting. On a busy CPU one thread can be much
                faster for small models. Not applied on a GPU (`DeviceTraits.intra_op_threads`).
            pack_weights: Keep the sampler's linear weights also in oneDNN's blocked layout, so
                its matmuls skip the per-call weight reordering (bench/RESULTS.md). With the bf16
                copy: `PackedLinear`, repacked after each weight update (one reorder per weight
                and step); a weight only linear layers use is then held packed only (its plain
                bf16 copy is released: the weights are held once; sibling projections, an
                attention's q/k/v and an MLP's gate/up, are then held as one packed weight each,
                `FusedGroup`), while one tied to the embeddings, and every weight of a PEFT model,
                is held both ways. Without it, a
                float32 policy that samples itself: `DecodePacks`, used only while decoding and
                repacked at the start of each generate call (trainable weights and any weight
                written since). None = where the device allows it
                (`DeviceTraits.pack_sampler_weights`: a CPU) and its torch has oneDNN, for a bf16
                copy or a float32 policy (not for a quantized one).
            decode_step: Lean path: run the decode steps through `LlamaDecodeStep`, transformers'
                forward written out for Llama-style models (the same logits bit for bit, less
                time per step; `engines.llama_decode`). None = whenever the sampler has the
                structure it was written for (a "llama", "qwen2" or "mistral" model with grouped
                attention whose projections are packed: a bf16 copy with fused projections, or
                the float32 policy's `DecodePacks`, with q/k/v and gate/up grouped), False = always
                transformers' forward, True = the same as None but refused where it cannot run.
            drop_finished_rows: Lean path, one-turn `generate`: take the rows that ended (EOS)
                out of the decode batch, so the steps after run only the rows still going
                (their keys/values kept in place: `kv_cache.ReservedLayer.batch_select_indices`).
                A row is dropped once the ended rows are at least an eighth of the batch. The
                tokens drawn are the same in distribution; the random stream differs, as fewer
                rows draw. None = on, except with draw="multinomial", whose point is
                `model.generate`'s random stream (which samples every row at every step).
            share_common_prefix: Lean path, one-turn `generate`: prefill the leading tokens
                that every prompt of the call shares (a system prompt, a chat template's
                header) once for all of them (`common_prefix_first`), when that saves at least
                16 token forwards.
            fp16_frozen_weights: With the float32 policy's `DecodePacks` (a CPU without native
                bf16): hold its frozen linear weights (a LoRA adapter's base, frozen layers) as
                fbgemm float16 panels, packed once, and apply LoRA adapters apart in float32.
                Sampling then uses weights rounded to float16 (relative error about 2e-4 per
                product; activations and sums stay float32), 18-26% faster per `generate` call
                on an AVX2 CPU (bench/RESULTS.md). With `return_logprobs` the sampling
                log-probs are those of the weights sampled from, so the trainer's importance
                correction sees the gap. None = where this torch has fbgemm's
                float16 products; False = the float32 weights.
            fp16_trainable_weights: The same for the trainable weights (a full fine-tune),
                packed afresh as float16 panels at each call instead of float32. The packing
                costs more (1.3-1.9 s against 0.15-0.35 s a call for SmolLM2-135M on an AVX2
                CPU) and each decode step less (bench/RESULTS.md), so it pays only for long
                decodes.
                None = for calls of at least `FP16_TRAINABLE_MIN_TOKENS` new tokens, where this
                torch has fbgemm's float16 products; False = never; True = every call.
            merge_adapters: With the bf16 copy of a PEFT model: hold each LoRA layer merged,
                `bf16(W + scaling * B @ A)`, in a plain copy of the base model (packed and fused
                as a full fine-tune's, sampled through the decode step), and merge again from
                the policy's weights in `update_weights`, instead of the PEFT layers with their
                adapters apart (bf16(W) x + scaling * B(A x)). The two round differently, both
                within bf16 of the trainer's products (`sampling_logprobs` measures the gap);
                merged samples at about a full fine-tune's speed (bench/RESULTS.md). None =
                where every adapter layer is plain LoRA on a linear layer
                (`weight_sync.mergeable_lora_layers`); False = keep the PEFT layers. Under FSDP2
                each layer is merged shard by shard and gathered in bf16, as a full
                fine-tune's weights are; under ZeRO-3 the trainer gathers the merged layers'
                base weights with the adapters (`sync_parameters`).

        Raises:
            ValueError: `merge_adapters=True` where the adapters cannot be held merged, an
                unknown `decode` (or "lean" for a prompt-learning adapter), a
                non-positive `num_threads`, `bf16_sampler` with a quantized model, or
                `pack_weights=True` where the weights cannot be packed (not on a CPU, a
                quantized or bf16 policy without a copy, or a torch without oneDNN), or
                `decode_step=True` for a sampler the step was not written for, or
                `fp16_frozen_weights=True` or `fp16_trainable_weights=True` where there are no
                `DecodePacks` or no fbgemm.
        """
        decode = _decode_path(decode, model)
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
        self.share_common_prefix = share_common_prefix
        self.drop_finished_rows = (
            draw != "multinomial" if drop_finished_rows is None else drop_finished_rows
        )
        self.num_threads = num_threads
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        quantized = bool(getattr(model, "is_quantized", False))  # e.g. bitsandbytes 4/8-bit
        self.traits: DeviceTraits = device_traits(model_device(model))
        if bf16_sampler is None:
            dtype = next(model.parameters()).dtype
            bf16_sampler = (
                self.traits.sampler_dtype == torch.bfloat16
                and dtype != torch.bfloat16
                and not quantized
            )
        elif bf16_sampler and quantized:
            raise ValueError("bf16_sampler=True cannot copy a quantized model to bf16.")
        if sampler_attention == "auto":
            sampler_attention = GROUPED_ATTENTION if self.traits.grouped_attention else None
        # the sampler: the policy itself, or its bf16 copy (`_copy_policy`)
        self.sampler_model: Any = model
        self._source_name: dict[str, str] = {}
        self._merged: dict[str, str] = {}
        self._copies: dict[str, tuple[Tensor, Any]] = {}
        if bf16_sampler:
            self._copy_policy(model, sampler_attention, merge_adapters)
        elif merge_adapters:
            raise ValueError(MERGE_REFUSED)
        self._packed: list[PackedLinear] = []
        self._decode_packs: DecodePacks | None = None
        if pack_weights is not False and self.traits.pack_sampler_weights:
            if bf16_sampler:
                # Under PEFT the weights stay unpacked too: adapter layers may read a base weight
                # (the copy holds none where it holds the adapters merged).
                release = getattr(model, "peft_config", None) is None or bool(self._merged)
                # [] without oneDNN
                self._packed = pack_linear_layers(self.sampler_model, release=release, fuse=release)
            elif not quantized:
                # None without oneDNN
                self._decode_packs = decode_packs(
                    self.sampler_model, fp16_frozen=fp16_frozen_weights
                )
        _check_fp16_weights(self._decode_packs, fp16_frozen_weights, fp16_trainable_weights)
        self.fp16_trainable_weights = fp16_trainable_weights
        if pack_weights and not self._packed and self._decode_packs is None:
            raise ValueError(
                "pack_weights=True, but the sampler's weights cannot be packed: packing needs "
                "a CPU whose torch has oneDNN and either the bf16 copy (bf16_sampler) or a "
                f"float32 policy that is not quantized (the model is on {self.traits.type}); "
                "leave pack_weights=None."
            )
        # name -> packed layer that holds its weight only packed (`PackedLinear.release_weight`)
        self._packed_only: dict[str, PackedLinear] = {
            f"{name}.weight": module
            for name, module in self.sampler_model.named_modules()
            if isinstance(module, PackedLinear) and module.weight_released
        }
        self._packed_name = {id(layer): name for name, layer in self._packed_only.items()}
        self.decode_step: LlamaDecodeStep | None = None
        if decode_step is not False and decode == "lean":
            self.decode_step = LlamaDecodeStep.build(
                plain_forward(self.sampler_model), packs=self._decode_packs
            )
        if decode_step and self.decode_step is None:
            raise ValueError(
                "decode_step=True, but the sampler is not a model LlamaDecodeStep was written for "
                "(a llama, qwen2 or mistral model with grouped attention whose projections are "
                "packed: a bf16 copy, or the float32 policy's DecodePacks; decode='lean'); leave "
                "decode_step=None."
            )

    def _copy_policy(self, model: Any, attention: str | None, merge_adapters: bool | None) -> None:
        """Make the bf16 copy the engine samples from (`_bf16_copy`), LoRA layers merged as
        `merge_adapters` asks, and record what each of its parameters is copied from."""
        lora_layers = None if merge_adapters is False else mergeable_lora_layers(model)
        if merge_adapters and lora_layers is None:
            raise ValueError(MERGE_REFUSED)
        # sampler parameter name -> the policy's parameter it copies (where the names differ);
        # sampler weight name -> name of the policy's LoRA layer it holds merged (in the base)
        self.sampler_model, self._source_name, self._merged = _bf16_copy(
            model, attention, lora_layers
        )
        # name -> (bf16 parameter, stamp of the source tensors it was last copied from)
        source = dict(model.named_parameters())
        self._copies = {
            name: (param, self._source_stamp(model, source, name))
            for name, param in self.sampler_model.named_parameters()
        }

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
        """Sample `num_generations` completions per prompt; see `GenerationOutput` for shapes.

        Raises:
            DataError: a prompt plus `max_new_tokens` is longer than the model's context (the
                caller truncates prompts: `data.prompts.prompt_token_limit`).
        """
        with self._sampling_call(prompt_ids, max_new_tokens) as (ids, mask, device):
            if self.decode == "hf":
                raw, logprobs = self._hf_generate(
                    ids, mask, num_generations, max_new_tokens, sampling, device
                )
            else:
                raw, logprobs = self._lean_generate(
                    ids.to(device), mask.to(device), num_generations, max_new_tokens, sampling
                )
        completion_ids, completion_mask, is_truncated = completion_mask_from_ids(
            raw.cpu(), self.eos_token_ids, self.pad_token_id
        )
        if logprobs is not None:
            logprobs = logprobs.cpu().masked_fill(completion_mask == 0, 0.0)
        ids = ids.repeat_interleave(num_generations, dim=0)  # [N, P]
        mask = mask.repeat_interleave(num_generations, dim=0)  # [N, P]
        return GenerationOutput(ids, mask, completion_ids, completion_mask, is_truncated, logprobs)

    @torch.no_grad()
    def generate_turns(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        turns: TurnHandler,
    ) -> GenerationOutput:
        """Multi-turn rollouts (`engines.multi_turn`) keeping each row's KV cache across turns.

        One decode loop runs all N rows. When a row's turn ends (EOS), `turns.end_turn` is asked
        for its reply; the row then waits (its steps are masked-out holes in the cache, its
        position does not move) until the reply is ready, and the reply's tokens are fed one per
        step, as if sampled, before the row samples again. The history is never prefilled again;
        other rows go on decoding while a row waits, and when every live row waits the loop
        blocks on the first reply. Rows that are done only fill masked holes. With
        `decode="hf"` the turns run by `reprefill_turns` instead.

        Returns:
            A `GenerationOutput` with `tool_mask` (1 = sampled by the model); `sampling_logprobs`
            with `return_logprobs` (0 at appended tokens).
        """
        if self.decode == "hf":
            return reprefill_turns(
                self,
                prompt_ids,
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                turns=turns,
            )
        with self._sampling_call(prompt_ids, max_new_tokens) as (ids, mask, device):
            rows = self._lean_turns(
                ids.to(device), mask.to(device), num_generations, max_new_tokens, sampling, turns
            )
        return assemble_output(
            ids.repeat_interleave(num_generations, dim=0),
            mask.repeat_interleave(num_generations, dim=0),
            rows,
            self.pad_token_id,
            with_logprobs=self.return_logprobs,
        )

    @contextlib.contextmanager
    def _sampling_call(
        self, prompt_ids: list[list[int]], max_new_tokens: int
    ) -> Iterator[tuple[Tensor, Tensor, torch.device]]:
        """The set-up of one `generate` / `generate_turns` call, undone when the block ends.

        Checks the prompts against the model's context, left-pads them, refreshes the sampler
        copy (or re-packs the float32 policy's `DecodePacks`), puts the sampler in eval mode (its
        training mode is restored afterwards) and runs the block with `num_threads` intra-op
        threads, with `DecodePacks` the packed weights in use, and eagerly: modules compiled by
        `torch.compile` (`GRPOConfig.torch_compile`; the sampler may be the policy itself) run
        uncompiled, as a decode loop's shapes change at every step.

        Yields:
            `(ids, mask, device)`: the left-padded prompts `[B, P]` and their mask (1 = prompt
            token, 0 = padding), on the CPU, and the sampler's device.

        Raises:
            DataError: a prompt plus `max_new_tokens` is longer than the model's context.
        """
        self._check_context(prompt_ids, max_new_tokens)
        ids, mask = left_pad(prompt_ids, self.pad_token_id)  # [B, P]
        # Picks up weights changed outside optimizer steps, e.g. a checkpoint load on resume.
        self._sync(self.model, copy_trainable=False)
        model = self.sampler_model
        was_training = model.training
        model.eval()
        try:
            with _intra_op_threads(self.num_threads, self.traits), contextlib.ExitStack() as stack:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
                if self._decode_packs is not None:
                    self._decode_packs.refresh(fp16_trainable=self._fp16_trainable(max_new_tokens))
                    stack.enter_context(self._decode_packs.active())
                # No autograd bookkeeping at all (version counters, views): 5% off a `generate`
                # call (bench/RESULTS.md). What the block makes is an inference tensor; the
                # callers return new tensors computed from it outside the block.
                stack.enter_context(torch.inference_mode())
                yield ids, mask, next(model.parameters()).device
        finally:
            model.train(was_training)

    def _fp16_trainable(self, max_new_tokens: int) -> bool:
        """Whether a call of `max_new_tokens` packs the trainable weights as float16 panels
        (`fp16_trainable_weights`)."""
        if self._decode_packs is None or not self._decode_packs.fp16:
            return False
        if self.fp16_trainable_weights is None:
            return max_new_tokens >= FP16_TRAINABLE_MIN_TOKENS
        return self.fp16_trainable_weights

    def _lean_turns(
        self,
        ids: Tensor,
        mask: Tensor,
        g: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        turns: TurnHandler,
    ) -> list[RowRecord]:
        """The multi-turn decode loop of `generate_turns`: N row records (`_TurnRows`).

        Every step feeds one token per row; `real` marks the tokens that enter the attention
        mask and advance the row's position (holes do neither).
        """
        forward = plain_forward(self.sampler_model)
        n, p = ids.shape[0] * g, mask.shape[1]
        device = ids.device
        attention = mask.new_ones((n, p + max_new_tokens))  # [N, columns], grown on demand
        attention[:, :p] = mask.repeat_interleave(g, dim=0)
        sampler = TokenSampler(
            sampling,
            eos_token_ids=self.eos_token_ids,
            prompt_ids=ids.repeat_interleave(g, dim=0),
            prompt_mask=attention[:, :p],
            vocab_size=int(forward.get_output_embeddings().weight.shape[0]),
            draw=self.draw,
        )
        cache, logits, next_position = self._prefilled(forward, ids, mask, g, max_new_tokens)
        state = _TurnRows(n, turns, max_new_tokens, set(self.eos_token_ids))
        column, step = p, 0
        while True:
            state.take_replies()
            live = state.live()
            if not live:
                break
            if all(state.mode[r] == "wait" for r in live):
                state.wait_for_a_reply()
                continue
            feed = torch.full((n,), self.pad_token_id, dtype=torch.long)
            real = torch.zeros(n, dtype=torch.long)
            sampling_rows = [r for r in live if state.mode[r] == "sample"]
            if sampling_rows:
                index = torch.as_tensor(sampling_rows, device=device)
                drawn = sampler.sample(logits[index], step, index)  # [n]
                logprobs = [0.0] * len(sampling_rows)
                if self.return_logprobs:
                    scaled = torch.log_softmax(logits[index] / sampling.temperature, -1)
                    logprobs = scaled.gather(1, drawn[:, None]).squeeze(1).tolist()
                tokens = drawn.tolist()
                for row, token, logprob in zip(sampling_rows, tokens, logprobs, strict=True):
                    state.sampled(row, token, logprob)
                    feed[row], real[row] = token, 1
                step += 1
            forced_rows = [r for r in live if state.mode[r] == "force"]
            for row in forced_rows:
                feed[row], real[row] = state.forced_token(row), 1
            if forced_rows:
                index = torch.as_tensor(forced_rows, device=device)
                sampler.observe(feed[forced_rows].to(device), index)
            if not state.live():
                break
            if column == attention.shape[1]:
                attention = torch.cat([attention, attention.new_ones((n, max_new_tokens))], dim=1)
            attention[:, column] = real.to(device)
            out = forward(
                input_ids=feed[:, None].to(device),
                attention_mask=attention[:, : column + 1],
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            column += 1
            next_position = next_position + real[:, None].to(device)
            logits = out.logits[:, -1].float()  # [N, V]
        return state.rows

    def _prefilled(
        self,
        forward: Any,
        ids: Tensor,
        mask: Tensor,
        g: int,
        max_new_tokens: int,
        common: int = 0,
    ) -> tuple[Any, Tensor, Tensor]:
        """The start of a decode loop: `prefill` of the `[B, P]` prompts for their N = B*G rows
        (shared per group as the engine is set; the first `common` columns once for all), the
        cache reserved for `max_new_tokens` more positions. Returns `(cache, logits [N, V]
        float32, next position ids [N, 1])`."""
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P]
        cache, logits = prefill(
            forward,
            ids,
            mask,
            positions,
            g,
            share=self.share_prompt_prefill,
            reserve=mask.shape[1] + max_new_tokens,
            common=common,
        )
        return cache, logits, positions[:, -1:].repeat_interleave(g, dim=0) + 1

    def _check_context(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        limit = context_length(self.model)
        longest = max((len(ids) for ids in prompt_ids), default=0)
        if limit is not None and longest + max_new_tokens > limit:
            raise DataError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is longer "
                f"than the model's context of {limit} tokens; shorten the prompts "
                "(max_prompt_length) or generate fewer tokens (max_completion_length)."
            )

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
        forward = plain_forward(self.sampler_model)
        n = ids.shape[0] * g
        sampler = TokenSampler(
            sampling,
            eos_token_ids=self.eos_token_ids,
            prompt_ids=ids.repeat_interleave(g, dim=0),
            prompt_mask=mask.repeat_interleave(g, dim=0),
            vocab_size=int(forward.get_output_embeddings().weight.shape[0]),
            draw=self.draw,
        )
        common = 0
        if self.share_common_prefix:  # the cache's columns: shared tokens first
            order, common = common_prefix_first(ids, mask)
            ids, mask = ids.gather(1, order), mask.gather(1, order)
        full_mask = mask.new_ones((n, mask.shape[1] + max_new_tokens))  # [N, P + T]
        full_mask[:, : mask.shape[1]] = mask.repeat_interleave(g, dim=0)
        cache, logits, next_position = self._prefilled(
            forward, ids, mask, g, max_new_tokens, common
        )
        step_fn = self.decode_step
        if step_fn is not None and not step_fn.accepts(cache):
            step_fn = None
        drop = self.drop_finished_rows and _rows_can_be_dropped(cache)
        device = ids.device
        tokens = torch.full((n, max_new_tokens), self.pad_token_id, device=device)  # [N, T]
        logprobs = torch.zeros((n, max_new_tokens), device=device) if self.return_logprobs else None
        rows: Tensor | None = None  # [n] the rows of N still in the batch (None = all N)
        row_mask = full_mask  # [n, P + T] their attention mask
        going = torch.ones(n, dtype=torch.bool, device=device)  # [n] not ended
        steps = max_new_tokens
        for step in range(max_new_tokens):
            token = sampler.sample(logits, step, rows)  # [n]
            token = token.masked_fill(~going, self.pad_token_id)
            at = slice(None) if rows is None else rows
            tokens[at, step] = token
            if logprobs is not None:
                scaled = logits.float() / sampling.temperature  # [n, V]
                chosen = torch.log_softmax(scaled, -1).gather(1, token[:, None]).squeeze(1)
                logprobs[at, step] = chosen
            going &= ~torch.isin(token, sampler.eos)
            ended = int(going.numel() - going.sum())
            if step + 1 == max_new_tokens or ended == going.numel():
                steps = step + 1
                break
            if drop and ended * 8 >= going.numel():
                keep = going.nonzero().squeeze(1)  # [n'] ascending
                cache.batch_select_indices(keep)
                rows = keep if rows is None else rows[keep]
                token, next_position = token[keep], next_position[keep]
                row_mask, going = full_mask[rows], going[keep]
            step_mask = row_mask[:, : mask.shape[1] + step + 1]
            if step_fn is not None:
                logits = step_fn(token, step_mask, next_position, cache)
            else:
                out = forward(
                    input_ids=token[:, None],
                    attention_mask=step_mask,
                    position_ids=next_position,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1]
            next_position = next_position + 1
            # logits: [n, V] in the model's dtype; the sampler casts a copy
        return tokens[:, :steps], None if logprobs is None else logprobs[:, :steps]

    def update_weights(self, model: Any) -> None:
        """Copy `model`'s weights into the bf16 sampler after an optimizer step: in place, and
        linear weights held packed are re-packed from `model`'s. Without a bf16 sampler this
        only records `model`.

        Every trainable parameter is copied (under PEFT only the adapters): fused optimizer
        kernels (AdamW with fused=True) write in place without bumping a tensor's version
        counter, so a version check would miss their updates. Frozen parameters are copied only
        when their version counter or storage moved.

        Raises:
            KeyError: `model` lacks a parameter the sampler copy has (a different architecture).
        """
        self._sync(model, copy_trainable=True)

    def discard_trainable_copies(self, model: Any) -> None:
        """Free the sampler's packed copies of `model`'s trainable weights before an optimizer
        step changes them: `update_weights` after the step packs every one of them afresh in any
        case, so during the policy update they would only take memory (the bf16 linear weights
        of a full fine-tune: 257 MiB for SmolLM2-135M). A fused group goes only when all its
        members are trainable; frozen, partitioned (ZeRO-3) and unpacked weights stay. Whatever
        is still missing when sampling starts (no `update_weights` came) is packed again from
        `model` first. Without a copy, the float32 policy's packs of trainable and LoRA layers go
        too (`DecodePacks.discard_trainable`): each sampling call re-packs them anyway."""
        source = dict(model.named_parameters())
        trainable = {  # the adapters train; a partitioned (ZeRO-3) base weight stays packed
            name
            for name in set(self._merged) & set(self._packed_only)
            if not zero3_partition(self._lora_layer(model, name).base_layer.weight)
        }
        for name in self._packed_only.keys() - set(self._merged):
            param = source.get(self._source_name.get(name, name))
            if param is not None and param.requires_grad and not zero3_partition(param):
                trainable.add(name)
        for layer in self._packed_only.values():
            group = layer.group
            members = group.members if group is not None else [layer]
            names = {self._packed_name[id(member)] for member in members}
            if names <= trainable and not layer.discarded:
                layer.discard()
        if self._decode_packs is not None:  # the float32 policy's packs: re-packed at sampling
            self._decode_packs.discard_trainable()

    def sampler_weights(self) -> dict[str, Tensor]:
        """The sampler's parameters by name, as it computes with them: the bf16 copy's values
        (linear weights held only packed are unpacked, a new tensor), or the policy's own
        parameters without a copy."""
        if any(layer.discarded for layer in self._packed_only.values()):
            self._sync(self.model, copy_trainable=False)  # packs what was discarded
        out = {}
        for name, param in self.sampler_model.named_parameters():
            layer = self._packed_only.get(name)
            out[name] = layer.dense_weight() if layer is not None else param.detach()
        return out

    @torch.no_grad()
    def _sync(self, model: Any, *, copy_trainable: bool) -> None:
        """Copy into the sampler the parameters whose version counter or storage moved (a
        `load_state_dict`, `param.data = ...`), and with `copy_trainable` every trainable one."""
        self.model = model
        if not self._copies:
            return
        source = dict(model.named_parameters())
        for name, (param, stamp) in self._copies.items():
            layer = self._packed_only.get(name)
            refill = layer is not None and layer.discarded
            value: Any
            if name in self._merged:  # a LoRA layer held merged: its adapters train
                lora = self._lora_layer(model, name)
                if any(zero3_partition(p) for p in lora.parameters()):
                    continue  # ZeRO-3 partitions: merged with `update_weights`, gathered
                now = self._source_stamp(model, source, name)
                if now == stamp and not refill and not copy_trainable:
                    continue
                value = merged_lora_weight(lora)  # FSDP2: merged shard by shard
            else:
                origin = self._source_name.get(name, name)
                if origin not in source:
                    raise KeyError(
                        f"update_weights: the model has no parameter {origin!r}; pass the same "
                        f"model the engine was built with."
                    )
                if zero3_partition(source[origin]):
                    # A DeepSpeed ZeRO-3 partition: its whole value comes with `update_weights`,
                    # which the trainer calls with the parameters gathered (every process
                    # together).
                    continue
                now = _stamp(source[origin])
                trained = copy_trainable and source[origin].requires_grad
                if now == stamp and not refill and not trained:
                    continue
                value = source[origin]
            if is_shard(value):
                # A sharded (FSDP2) value is gathered whole (every process syncs together), cast
                # to the copy's dtype first: the values of a cast after the gather, with the
                # copy's bytes on the wire (half of float32's for bf16).
                value = whole_tensor(value.to(param.dtype))
            if layer is not None:
                layer.pack(value)
            else:
                param.copy_(value)
            self._copies[name] = (param, now)
        for layer in self._packed:
            layer.repack_if_changed()

    def sync_parameters(self, model: Any) -> list[Tensor]:
        """The parameters of `model` that `update_weights` reads whole after a step: the
        trainable ones, and the base weight of each LoRA layer the copy holds merged. Under
        DeepSpeed ZeRO-3 the trainer gathers just these (the copy keeps the other frozen
        weights it was built with)."""
        params = [p for p in model.parameters() if p.requires_grad]
        bases = [self._lora_layer(model, name).base_layer.weight for name in self._merged]
        return params + bases

    def _lora_layer(self, model: Any, name: str) -> Any:
        """The LoRA layer of `model` whose merged weight the copy holds as `name`."""
        return model.get_base_model().get_submodule(self._merged[name])

    def _source_stamp(self, model: Any, source: dict[str, Tensor], name: str) -> Any:
        """The stamp of what the sampler's parameter `name` is made from: the policy's
        parameter, or for a LoRA layer held merged its base weight and adapters."""
        if name not in self._merged:
            origin = self._source_name.get(name, name)
            return _stamp(source[origin]) if origin in source else None
        lora = self._lora_layer(model, name)
        (adapter,) = lora.active_adapters
        parts = (lora.base_layer.weight, lora.lora_A[adapter].weight, lora.lora_B[adapter].weight)
        return tuple(_stamp(part) for part in parts)


def prefill(
    forward: Any,
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    g: int,
    *,
    share: bool,
    reserve: int | None = None,
    common: int = 0,
) -> tuple[Any, Tensor]:
    """Run the prompts through the model once and return the KV cache of the N = B*G rows.

    With `share`, each of the B prompts is prefilled once and its cache is repeated G times along
    the batch (the G completions of a prompt attend to the same prompt keys and values); without,
    the G-times-repeated prompts are prefilled as N rows. Both give the same cache and logits up
    to floating-point summation order.

    With `common = c > 0` the first c columns of every row hold the same real tokens (a shared
    system prompt or template: `common_prefix_first`): they are prefilled once, as one row, and
    their cache is repeated for the B rows before the rest of the prompts runs on it. The same
    cache and logits again, up to summation order.

    Args:
        forward: A causal LM taking `position_ids`, `logits_to_keep` and `use_cache`.
        ids: `[B, P]` left-padded prompts. mask: `[B, P]` 1 = real token.
        positions: `[B, P]` position ids (0 at padding).
        g: completions per prompt (G).
        share: prefill B rows instead of N.
        reserve: Positions (prompt + new tokens) the cache reserves for the decode steps
            (`kv_cache.reserve_positions`); None = transformers' own growing cache.
        common: c, the leading columns that are the same real tokens in every row (0 = none;
            at most P - 1).

    Returns:
        `(cache, logits)`: the model's cache object holding N rows, and the next-token logits
        `[N, V]` float32.
    """
    repeats = 1 if share else g
    past: dict[str, Any] = {}
    if common > 0:
        head = forward(
            input_ids=ids[:1, :common],
            attention_mask=mask[:1, :common],
            position_ids=positions[:1, :common],
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        head.batch_repeat_interleave(ids.shape[0] * repeats)
        past = {"past_key_values": head}
    out = forward(
        input_ids=ids[:, common:].repeat_interleave(repeats, dim=0),
        attention_mask=mask.repeat_interleave(repeats, dim=0),  # [rows, P]: cached + these
        position_ids=positions[:, common:].repeat_interleave(repeats, dim=0),
        use_cache=True,
        logits_to_keep=1,
        **past,
    )
    cache = out.past_key_values
    logits = out.logits[:, -1].float()  # [B or N, V]
    if share and g > 1:
        cache.batch_repeat_interleave(g)
        logits = logits.repeat_interleave(g, dim=0)  # [N, V]
    if reserve is not None:
        reserve_positions(cache, reserve)
    return cache, logits


def _check_fp16_weights(
    packs: DecodePacks | None, frozen: bool | None, trainable: bool | None
) -> None:
    """Refuse `fp16_frozen_weights=True` / `fp16_trainable_weights=True` where they cannot
    apply (no `DecodePacks`, or no fbgemm float16 products)."""
    for name, value in (("fp16_frozen_weights", frozen), ("fp16_trainable_weights", trainable)):
        if value and packs is None:
            raise ValueError(
                f"{name}=True applies only to a float32, unquantized policy that samples itself "
                "on a CPU with weights packed (no bf16 sampler copy, pack_weights not False); "
                "leave it None."
            )
    if trainable and packs is not None and not packs.fp16:
        raise ValueError(
            "fp16_trainable_weights=True, but this torch has no fbgemm float16 products "
            "(quantized::linear_prepack_fp16); leave it None."
        )


DECODE_PATHS = ("lean", "hf")


def _rows_can_be_dropped(cache: Any) -> bool:
    """Whether rows can leave `cache` mid-call (`batch_select_indices`): a transformers cache
    whose layers all hold plain per-row keys and values (`DynamicLayer` and its subclasses:
    `kv_cache.ReservedLayer`, sliding windows); not a cache of another kind of state."""
    layers = getattr(cache, "layers", None)
    return (
        callable(getattr(cache, "batch_select_indices", None))
        and isinstance(layers, list)
        and all(isinstance(layer, DynamicLayer) for layer in layers)
    )


class _TurnRows:
    """Per-row state of the multi-turn decode loop.

    Each row is in one mode: "sample" (draws its next token), "force" (feeds the next token of
    a reply), "wait" (its reply is not ready: a hole) or "done" (a hole).
    """

    def __init__(self, n: int, turns: TurnHandler, max_new_tokens: int, eos: set[int]) -> None:
        self.turns, self.max_new_tokens, self.eos = turns, max_new_tokens, eos
        self.rows = [RowRecord() for _ in range(n)]
        self.mode = ["sample"] * n
        self.turn_start = [0] * n  # where the row's current model turn began
        self.forced: list[deque[int]] = [deque() for _ in range(n)]
        self.waiting: dict[int, Future[list[int] | None]] = {}

    def live(self) -> list[int]:
        return [r for r, mode in enumerate(self.mode) if mode != "done"]

    def take_replies(self) -> None:
        """Rows whose reply is ready start feeding it (or are done when there is none)."""
        for row in [r for r, reply in self.waiting.items() if reply.done()]:
            suffix = self.waiting.pop(row).result()
            if suffix is None:
                self.mode[row] = "done"
                continue
            self.forced[row].extend(suffix)
            self.mode[row] = "force" if suffix else "sample"
            self.turn_start[row] = len(self.rows[row].tokens) + len(suffix)

    def wait_for_a_reply(self) -> None:
        concurrent.futures.wait(
            self.waiting.values(), return_when=concurrent.futures.FIRST_COMPLETED
        )

    def sampled(self, row: int, token: int, logprob: float) -> None:
        """Record a sampled token; an EOS ends the turn (the handler decides what follows)."""
        record = self.rows[row]
        record.add([token], model=True, logprobs=[logprob])
        if token in self.eos:
            room = self.max_new_tokens - len(record.tokens)
            with torch.inference_mode(False):  # the user's parser and tools, as anywhere else
                reply = self.turns.end_turn(row, record.tokens[self.turn_start[row] :], room)
            if reply is None:
                self.mode[row] = "done"
            else:
                self.mode[row], self.waiting[row] = "wait", reply
        elif len(record.tokens) >= self.max_new_tokens:
            self.mode[row], record.truncated = "done", True

    def forced_token(self, row: int) -> int:
        """The row's next reply token (recorded as not the model's)."""
        token = self.forced[row].popleft()
        self.rows[row].add([token], model=False)
        if not self.forced[row]:
            self.mode[row] = "sample"
        return token


MERGE_REFUSED = (
    "merge_adapters=True, but the sampler cannot hold the adapters merged: that needs the bf16 "
    "copy (bf16_sampler) of a PEFT model whose adapter layers are all plain LoRA on linear "
    "layers (no DoRA, adapter bias, modules_to_save or prompt learning); leave "
    "merge_adapters=None."
)


def _decode_path(decode: str | None, model: Any) -> str:
    """`TransformersEngine`'s `decode` argument resolved for `model` (see there)."""
    if decode is None:
        return "hf" if is_prompt_learning(model) else "lean"
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {DECODE_PATHS}, got {decode!r}.")
    if decode == "lean" and is_prompt_learning(model):
        raise ValueError(
            "decode='lean' cannot sample from a prompt-learning PEFT adapter: its virtual "
            "tokens are added only by the PEFT model's own generate. Leave decode=None "
            "(it then uses decode='hf')."
        )
    return decode


def _stamp(tensor: Tensor) -> tuple[int, int]:
    """`(storage address, in-place version)`: changes whenever the tensor's values may have."""
    return tensor.data_ptr(), tensor._version


def _bf16_copy(
    model: Any, attention: str | None, lora_layers: dict[str, Any] | None = None
) -> tuple[Any, dict[str, str], dict[str, str]]:
    """A frozen eval-mode copy of `model` whose parameters are bf16 (buffers keep their dtype),
    using the `attention` implementation (None = the model's).

    With `lora_layers` (`weight_sync.mergeable_lora_layers(model)`) the copy is of the PEFT
    model's base model, each of those layers a `torch.nn.Linear` holding `W + scaling * B @ A`
    in bf16: a plain model, sampled at a full fine-tune's speed.

    Returns:
        The copy; the policy's parameter name of each copied parameter whose name differs;
        the LoRA layer's name (in the base model) of each merged weight, by its name.
    """
    lora_layers = lora_layers or {}
    root = model.get_base_model() if lora_layers else model
    # Parameters of the merged layers are not copied but their base's bias.
    skipped = {
        id(p)
        for layer in lora_layers.values()
        for p in layer.parameters()
        if p is not layer.base_layer.bias
    }
    # The bf16 parameters are made first and handed to deepcopy, so the float32 weights are
    # never copied (a tied weight is one parameter, so it stays tied in the copy).
    memo: dict[int, Any] = {
        id(param): torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)
        for param in model.parameters()
        if id(param) not in skipped
    }
    copied_from = {id(memo[id(p)]): name for name, p in model.named_parameters() if id(p) in memo}
    for layer in lora_layers.values():
        base = layer.base_layer
        linear = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        weight = merged_lora_weight(layer).to(torch.bfloat16)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            linear.bias = memo[id(base.bias)]
        memo[id(layer)] = linear  # the copy holds this layer in the LoRA layer's place
    clone = copy.deepcopy(root, memo)
    if attention == GROUPED_ATTENTION:
        use_grouped_attention(clone)
    elif attention is not None:
        plain_forward(clone).set_attn_implementation(attention)
    names: dict[str, str] = {}
    for name, param in clone.named_parameters():
        origin = copied_from.get(id(param))
        if origin is not None and origin != name:
            names[name] = origin
    merged = {f"{name}.weight": name for name in lora_layers}
    return clone.eval(), names, merged


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None, traits: DeviceTraits) -> Iterator[None]:
    """Run the block with `num_threads` torch intra-op threads (None, or a device whose kernels
    do not use them: unchanged)."""
    if num_threads is None or not traits.intra_op_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
