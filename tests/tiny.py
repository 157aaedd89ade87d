"""Tiny models and a character-level tokenizer, built in-process (no downloads) for tests, and
the stand-ins several test modules share.

The tokenizer maps every printable ASCII character to one token, plus ChatML-style special tokens,
so that a completion's text and its token ids correspond one to one and tests can reason about
exact token counts. Shared stand-ins: `read_metrics`; `one_step_trainer`; `ScriptedEngine` with
the calculator tool (`add`, `calculator_script`, `correct`) for multi-turn runs; and for the vLLM
engines (colocated, server, client) `TINY`, the bf16 tolerances, `prompts`, `logprob_gap`,
`dominated_by`, `length_trainer` and `train_and_check_the_engine_follows`.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from grpokit.core.logprobs import model_completion_logprobs
from grpokit.engines.base import (
    GenerationOutput,
    SamplingParams,
    completion_mask_from_ids,
    left_pad,
)

if TYPE_CHECKING:
    from grpokit import GRPOTrainer

SPECIAL_TOKENS = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML with tools, in the Hermes/Qwen style: tool names in a system turn, assistant tool calls
# as <tool_call>{json}</tool_call>, tool replies in a `tool` turn.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: "
    "{% for tool in tools %}{{ tool['function']['name'] }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with pad, EOS (`<|im_end|>`) and a ChatML chat template."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tool_tokenizer() -> PreTrainedTokenizerFast:
    """`make_tokenizer` with `TOOL_CHAT_TEMPLATE` (renders tools, tool calls and tool replies)."""
    tok = make_tokenizer()
    tok.chat_template = TOOL_CHAT_TEMPLATE
    return tok


def _config(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> LlamaConfig:
    return LlamaConfig(**{**config_kwargs(tokenizer), **overrides})


def config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """The tiny models' config fields (2 layers, hidden 32, 4 query / 2 key-value heads), for any
    Llama-style config class."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def make_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: object):
    """A 2-layer Llama causal LM (~30k parameters) in float32 with deterministic weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tokenizer, **overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def make_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 1):
    """A 2-layer Llama sequence classifier with one output (logit 0 = the reward)."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tokenizer, num_labels=1))
    return model.eval()


def save_tiny_model(path: str, seed: int = 0, **overrides: object) -> str:
    """Save a tiny causal LM (config `overrides` applied) and its tokenizer to `path` (loadable
    with `from_pretrained`)."""
    tok = make_tokenizer()
    make_causal_lm(tok, seed=seed, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def batch_sizes_seen(model) -> tuple[list[tuple[int, int]], object]:
    """`(shapes, handle)`: the `[rows, tokens]` of each forward of `model`'s embedding."""
    shapes: list[tuple[int, int]] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape))
    )
    return shapes, handle


# ---- runs ---------------------------------------------------------------------------------------
def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl`, in order."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def one_step_trainer(
    tmp_path: Path,
    tokenizer: Any,
    reward_funcs: Any,
    dataset: Any,
    *,
    config: dict[str, Any],
    model: Any = None,
    **trainer_kwargs: Any,
) -> GRPOTrainer:
    """A `GRPOTrainer` for one optimizer step of 4 completions (float32, nothing saved), writing to
    `tmp_path`. `config` holds the other `GRPOConfig` fields; `model` defaults to the tiny causal
    LM with a 1024-token context (room for multi-turn transcripts); `trainer_kwargs` go to
    `GRPOTrainer` (`generation_engine`, `tools`, ...)."""
    from grpokit import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        bf16=False,
        save_strategy="no",
        **config,
    )
    return GRPOTrainer(
        model if model is not None else make_causal_lm(tokenizer, max_position_embeddings=1024),
        reward_funcs,
        train_dataset=dataset,
        processing_class=tokenizer,
        args=args,
        **trainer_kwargs,
    )


# ---- a scripted engine and a calculator tool, for multi-turn rollouts ----------------------------
class ScriptedEngine:
    """A `GenerationEngine` that answers from a script: its n-th answer in a conversation (n =
    the number of tool turns in the prompt so far) is `script(prompt_text, n, g)` for completion
    g. Records every call."""

    def __init__(self, tokenizer: Any, script: Any) -> None:
        self.tok, self.script = tokenizer, script
        self.pad_token_id = tokenizer.pad_token_id
        self.calls: list[tuple[int, int, int]] = []  # (prompts, num_generations, max_new_tokens)

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        self.calls.append((len(prompt_ids), num_generations, max_new_tokens))
        rows = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            for g in range(num_generations):
                answer = self.script(text, text.count("<|im_start|>tool"), g)
                rows.append(
                    self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
                )
        width = max(1, max(len(r) for r in rows))
        raw = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            raw[i, : len(r)] = torch.as_tensor(r)
        ids, mask, truncated = completion_mask_from_ids(
            raw, [self.tok.eos_token_id], self.pad_token_id
        )
        p_ids, p_mask = left_pad(prompt_ids, self.pad_token_id)
        return GenerationOutput(
            p_ids.repeat_interleave(num_generations, 0),
            p_mask.repeat_interleave(num_generations, 0),
            ids,
            mask,
            truncated,
        )

    def update_weights(self, model: Any) -> None:
        pass


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def call(a: Any, b: Any, name: str = "add") -> str:
    arguments = json.dumps({"a": a, "b": b})
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call><|im_end|>'


def calculator_script(text: str, turn: int, g: int) -> str:
    """g=0: one correct call then the answer; g=1: answers at once; g=2: a bad call, then a
    good one, then the answer; g=3: never stops calling (cut by max_tool_calling_iterations).
    Later turns are continued one row at a time (g = 0), so g is read from the first call."""
    if turn > 0:
        g = 2 if '"sub"' in text else 3 if '"a": 1' in text else 0
    if g == 0:
        return [call(2, 3), "It is 5<|im_end|>"][min(turn, 1)]
    if g == 1:
        return "5<|im_end|>"
    if g == 2:
        return [call(2, 3, name="sub"), call(2, 3), "5!<|im_end|>"][min(turn, 2)]
    return call(1, 1)


def correct(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    return [float(c[-1]["content"].startswith(a)) for c, a in zip(completions, answer, strict=True)]


# ---- the vLLM engines ----------------------------------------------------------------------------
# head_dim 64 (vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, 256); tied embeddings
# as SmolLM2, the case where vLLM's weight reload needs the LM head re-tied.
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)
# bf16 weights and activations in vLLM vs the fp32 model: per-token log-prob tolerance.
BF16_ATOL_MEAN, BF16_ATOL_MAX = 0.01, 0.05


def prompts(tok: Any) -> list[list[int]]:
    texts = ["Hi", "Tell me a story about the sea"]  # different lengths: left padding
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def logprob_gap(model: Any, out: Any, temperature: float = 1.0) -> torch.Tensor:
    """|the engine's `sampling_logprobs` - the trainer's fp32 log-probs| over the completion
    tokens (`out` is a `GenerationOutput`; log-probs at `temperature`)."""
    with torch.no_grad():
        expected, _ = model_completion_logprobs(
            model,
            torch.cat([out.prompt_ids, out.completion_ids], 1),
            torch.cat([out.prompt_mask, out.completion_mask], 1),
            out.completion_ids.shape[1],
            temperature=temperature,
        )
    assert out.sampling_logprobs is not None
    return (out.sampling_logprobs - expected)[out.completion_mask.bool()].abs()


def dominated_by(model: Any, token: int) -> Any:
    """A copy of `model` whose every next-token distribution puts (almost) all mass on `token`.

    Attention and MLP outputs are zeroed, so the final hidden state is the normalised embedding
    of the current token; every embedding row is all-ones except `token`'s, all-twos, so (tied
    head) `token`'s logit exceeds every other by `hidden_size` (128).
    """
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
        embed = clone.get_input_embeddings().weight
        embed.fill_(1.0)
        embed[token] = 2.0
    return clone


def length_trainer(
    tmp_path: Path, model: Any, tokenizer: Any, reward: Any = None, **config: Any
) -> GRPOTrainer:
    """A `GRPOTrainer` for 2 optimizer steps of 4 completions (G = 2) on four two-letter prompts,
    rewarded by completion length (so rewards differ within a group) or by `reward`, nothing
    saved, no tracker; `config` holds the other `GRPOConfig` fields (the engine's: `use_vllm`,
    `vllm_mode`, ...)."""
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        **config,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward or (lambda completions, **_: [float(len(c)) for c in completions]),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in ["ab", "cd", "ef", "gh"]]),
        processing_class=tokenizer,
    )


def train_and_check_the_engine_follows(trainer: GRPOTrainer, model: Any, tokenizer: Any) -> None:
    """Train `trainer` (on `model`): the weights change, and afterwards its engine samples with
    the trained weights: its log-probs of 4 fresh completions of "ab" are the policy's within the
    bf16 tolerance."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = trainer.engine.generate(
        [tokenizer("ab", add_special_tokens=False)["input_ids"]],
        num_generations=4,
        max_new_tokens=8,
        sampling=SamplingParams(),
    )
    gap = logprob_gap(model, out)
    assert gap.mean() <= BF16_ATOL_MEAN and gap.max() <= BF16_ATOL_MAX
