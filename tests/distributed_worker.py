"""Training scenarios run on 1 process (in the test process) and on 2 (under `torchrun`), for the
equivalence tests of tests/test_distributed.py.

Every scenario trains a tiny model for 3 optimizer steps on the same global batch with a
deterministic `ScriptedEngine`, so that both runs see the same completions; the 2-process run
gives each process half of every micro-batch (`per_device_train_batch_size` halves). Results go
to `out_dir/<scenario>/`: the final parameters (`params.pt`, and `params_rank1.pt` from the
second process), `metrics.jsonl` and the other run files.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR
    python -m torch.distributed.run ... tests/distributed_worker.py OUT_DIR SCENARIO  # one only
    python -m torch.distributed.run ... tests/distributed_worker.py OUT_DIR dynamic  # DAPO's
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback

from grpokit.engines.base import (
    GenerationOutput,
    SamplingParams,
    completion_mask_from_ids,
    left_pad,
)
from grpokit.train.config import GRPOConfig
from grpokit.train.distributed import launched_num_processes, launched_process_index
from grpokit.train.trainer import GRPOTrainer
from tests.tiny import make_causal_lm, make_tokenizer, make_tool_tokenizer

GLOBAL_MICRO_BATCH = 8  # completions per micro-batch over all processes
NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 6

# The `keep_up_to` of the kept_activations scenario: between the sizes of its processes'
# training forwards, so that some keep their activations (whole, or split into forwards of
# whole prompts that fit) and others, where one prompt's rows alone exceed it, recompute them,
# in all but their last layer (a 4-layer model: `ActivationBound.kept_layers`).
KEEP_UP_TO = 20

# name -> GRPOConfig overrides. Each trains 3 optimizer steps of 2 micro-batches (16 completions,
# 4 prompts) unless it says otherwise, one optimizer step per generation round.
SCENARIOS: dict[str, dict[str, Any]] = {
    "dapo": {
        "loss_type": "dapo",
        "log_completions": True,
        "eval_strategy": "steps",
        "eval_steps": 2,
    },
    # DDP settings from the config (ignored by one process).
    "grpo": {
        "loss_type": "grpo",
        "beta": 0.04,
        "ddp_find_unused_parameters": True,
        "ddp_bucket_cap_mb": 1,
        "ddp_timeout": 600,
    },
    # 3 micro-batches per step: the second global micro-batch holds rows of both processes, so
    # its bnpo normaliser counts the tokens of both. The decoder layers recompute their
    # activations (gradient checkpointing, as max_forward_tokens="auto" on a CPU with native
    # bf16), under DDP, FSDP2 and DeepSpeed.
    "bnpo": {"loss_type": "bnpo", "gradient_accumulation_steps": 3, "gradient_checkpointing": True},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "batch"},
    "dapo_batch_std": {"loss_type": "dapo", "scale_rewards": "batch", "num_iterations": 2},
    # Compiled decoder blocks (policy and reference) inside DDP's wrapper.
    "compiled": {"loss_type": "dapo", "beta": 0.04, "torch_compile_backend": "aot_eager"},
    # Each prompt forwarded once for its rows (`GRPOTrainer.share_prompts`; the other scenarios
    # forward it with every row): under DDP the prompt pass runs on the wrapped model and the
    # completion pass through the wrapper. With the reference model's and the old log-probs'
    # passes (2 iterations, 2 optimizer steps a generation); DDP's settings as by default, and
    # with its search for unused parameters (which walks the graph from the wrapper's outputs),
    # and with a static graph (below; it counts each parameter's gradient hooks in a first step).
    "shared_prompts": {
        "share_prompts": True,
        "loss_type": "dapo",
        "beta": 0.04,
        "num_iterations": 2,
        "steps_per_generation": 2,
    },
    "shared_prompts_unused": {
        "share_prompts": True,
        "loss_type": "grpo",
        "ddp_find_unused_parameters": True,
    },
    # A LoRA adapter trained under DDP, its reference log-probs with the adapter off, each
    # shared prompt forwarded once (through the PEFT model's base model and DDP's wrapper).
    "lora": {"lora": True, "share_prompts": True, "loss_type": "dapo", "beta": 0.04},
    # Activations recomputed in backward (as max_forward_tokens="auto" on a CPU with native
    # bf16), but kept by training forwards of at most `keep_up_to` tokens
    # (`ActivationBound.keep_up_to`), which share their prompts (under DDP), and by the last
    # layers of somewhat larger ones (`ActivationBound.kept_layers`): each process decides by
    # its own forwards' sizes, so kept and recomputed forwards meet in one backward's gradient
    # reduction (DDP, FSDP2, DeepSpeed ZeRO-2); under ZeRO-3 by the processes' largest size.
    "kept_activations": {
        "model_overrides": {"num_hidden_layers": 4},
        "share_prompts": True,
        "keep_up_to": KEEP_UP_TO,
        "loss_type": "dapo",
        "gradient_checkpointing": True,
    },
    # DDP's static graph, which fails under no_sync (an internal assertion, pytorch#143580):
    # every backward averages the gradients instead (`World.gradient_sync`).
    "static_graph": {"share_prompts": True, "loss_type": "dapo", "ddp_static_graph": True},
    # The top-entropy filter's quantile over both processes' micro-batches (TRL gathers them):
    # with one micro-batch per step, that is the one process's micro-batch of 8 rows.
    "entropy_quantile": {
        "loss_type": "grpo",
        "top_entropy_quantile": 0.2,
        "gradient_accumulation_steps": 1,
    },
}


class ScriptedEngine:
    """Completions decided by the prompt's tokens and the completion's place in its group alone,
    so that any number of processes samples exactly what one process would.

    Some prompts get G identical completions (a zero-std group, whose rows the trainer skips);
    lengths vary from 1 token to `max_new_tokens` (truncated, no EOS)."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id)
        self.letters = tokenizer.convert_tokens_to_ids(list("abcdefgh"))

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        ids, mask = left_pad(prompt_ids, self.pad)  # [B, P]
        rows = []
        for prompt in prompt_ids:
            key = sum((i + 1) * t for i, t in enumerate(prompt))
            same = key % 3 == 0  # a group of equal completions
            for j in range(num_generations):
                g = torch.Generator().manual_seed(key * 101 + (0 if same else j + 1))
                length = int(torch.randint(1, max_new_tokens + 2, (1,), generator=g))
                picks = torch.randint(0, len(self.letters), (max_new_tokens,), generator=g)
                tokens = [self.letters[int(k)] for k in picks]
                if length <= max_new_tokens:
                    tokens[length - 1] = self.eos
                rows.append(tokens)
        raw = torch.tensor(rows, dtype=torch.long)  # [N, T]
        completion_ids, completion_mask, truncated = completion_mask_from_ids(
            raw, [self.eos], self.pad
        )
        return GenerationOutput(
            ids.repeat_interleave(num_generations, dim=0),
            mask.repeat_interleave(num_generations, dim=0),
            completion_ids,
            completion_mask,
            truncated,
        )

    def update_weights(self, model: Any) -> None:
        pass


class ToolScriptedEngine(ScriptedEngine):
    """`ScriptedEngine` for tool conversations (one prompt per rollout, as with environments):
    the G rollouts of a row share one prompt, told apart by their order among the call's equal
    prompts. A first turn calls the `add` tool (by 1 to 4) or answers at once; later turns
    answer in letters."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.tok = tokenizer

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        ids, mask = left_pad(prompt_ids, self.pad)  # [B, P]
        rows, seen = [], {}  # seen: prompt -> how many equal prompts came before
        for prompt in prompt_ids:
            order = seen[tuple(prompt)] = seen.get(tuple(prompt), -1) + 1
            key = sum((i + 1) * t for i, t in enumerate(prompt))
            first_turn = "<|im_start|>tool" not in self.tok.decode(prompt)
            for j in range(num_generations):
                g = torch.Generator().manual_seed(key * 101 + order * 7 + j)
                if first_turn and (key + order) % 3:
                    by = (key + order) % 4 + 1
                    call = f'<tool_call>{{"name": "add", "arguments": {{"by": {by}}}}}</tool_call>'
                    tokens = self.tok(call, add_special_tokens=False)["input_ids"] + [self.eos]
                else:
                    length = int(torch.randint(1, 5, (1,), generator=g))
                    picks = torch.randint(0, len(self.letters), (length,), generator=g)
                    tokens = [self.letters[int(k)] for k in picks] + [self.eos]
                rows.append(tokens[:max_new_tokens])
        width = max(len(r) for r in rows)
        raw = torch.full((len(rows), width), self.pad, dtype=torch.long)  # [N, T]
        for i, r in enumerate(rows):
            raw[i, : len(r)] = torch.as_tensor(r)
        completion_ids, completion_mask, truncated = completion_mask_from_ids(
            raw, [self.eos], self.pad
        )
        return GenerationOutput(
            ids.repeat_interleave(num_generations, dim=0),
            mask.repeat_interleave(num_generations, dim=0),
            completion_ids,
            completion_mask,
            truncated,
        )


class Tally:
    """An environment (`environment_factory`): a tally the model adds to with its `add` tool;
    the reward (`get_reward`) is how much it added. Counts resets per process."""

    made = resets = 0

    def __init__(self) -> None:
        Tally.made += 1
        self.start = self.value = 0

    def reset(self, **row: Any) -> str:
        Tally.resets += 1
        self.start = self.value = int(row["start"])
        return f" Start at {self.start}."

    def add(self, by: int) -> str:
        """Add to the tally.

        Args:
            by: How much.
        """
        self.value += by
        return str(self.value)

    def get_reward(self) -> float:
        return (self.value - self.start) / 4


def chat_letter_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """`letter_reward` of a conversation's messages, joined."""
    return letter_reward(["".join(m.get("content") or "" for m in c) for c in completions])


def chat_dataset(size: int) -> list[dict[str, Any]]:
    """Conversational rows with a `start` column. Prompts i = 0 or 5 mod 8 are longer than
    `max_prompt_length` in the environment scenario, which skips them: with the sampler's order
    (seed 0), each of the 3 rounds skips one or two rows, on either process of 2."""
    rows = []
    for i in range(size):
        long = " and more words" if i % 8 in (0, 5) else ""
        text = f"q{i}: {'xyz'[i % 3] * (1 + i % 4)}{long}"
        rows.append({"prompt": [{"role": "user", "content": text}], "start": i % 5})
    return rows


def environment_trainer(out: Path) -> Any:
    """The environment scenario: dapo (whose update does not depend on the rows' order), long
    prompts skipped and refilled."""
    tok = make_tool_tokenizer()
    model = make_causal_lm(tok, seed=0).train()
    args = config(
        out,
        loss_type="dapo",
        max_completion_length=112,
        max_prompt_length=64,
        prompt_length_policy="skip",
    )
    return GRPOTrainer(
        model,
        [chat_letter_reward],
        args=args,
        train_dataset=chat_dataset(40),
        processing_class=tok,
        generation_engine=ToolScriptedEngine(tok),
        environment_factory=Tally,
    )


def letter_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Share of a completion's characters in "abc" (0 for an empty one)."""
    return [sum(c in "abc" for c in text) / max(1, len(text)) for text in completions]


def dataset(size: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"prompt": f"q{i + offset}: {'xyz'[i % 3] * (1 + i % 4)}"} for i in range(size)]


def config(out: Path, **overrides: Any) -> GRPOConfig:
    processes = launched_num_processes()
    values: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=GLOBAL_MICRO_BATCH // processes,
        gradient_accumulation_steps=2,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        max_steps=3,
        learning_rate=0.05,
        # Adam's epsilon well above float noise: a gradient entry that is rounding noise (one
        # summation order against another) then moves its weight by ~lr * noise / eps, not ~lr.
        adam_epsilon=1e-4,
        logging_steps=1,
        save_strategy="no",
        per_device_eval_batch_size=NUM_GENERATIONS,
        bf16=False,
        use_cpu=True,
        attention=None,
        retain_freed_memory=False,
        seed=0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def trainer(
    out: Path, model_overrides: dict[str, Any] | None = None, model: Any = None, **overrides: Any
) -> Any:
    """The scenarios' trainer, on `model` or a fresh tiny model (`model_overrides` applied);
    `share_prompts=True` among `overrides` keeps `GRPOTrainer.share_prompts` on, `reward=f`
    rewards with `f` instead of `letter_reward`, `lora=True`
    trains a LoRA adapter, `keep_up_to=K` (with `gradient_checkpointing`) has training forwards
    of at most K tokens keep their activations and larger ones keep them in their last layers,
    as many as K tokens' worth (`ActivationBound.kept_layers`), as "auto" does on a CPU with
    native bf16."""
    tok = make_tokenizer()
    if model is None:
        model = make_causal_lm(tok, seed=0, **(model_overrides or {})).train()
    share = overrides.pop("share_prompts", False)
    keep_up_to = overrides.pop("keep_up_to", None)
    reward = overrides.pop("reward", letter_reward)
    peft_config = lora_config() if overrides.pop("lora", False) else None
    t = GRPOTrainer(
        model,
        reward,
        args=config(out, **overrides),
        peft_config=peft_config,
        train_dataset=dataset(40),
        eval_dataset=dataset(5, offset=100),
        processing_class=tok,
        # with use_vllm, the trainer's own engine (a vLLM server's client)
        generation_engine=None if overrides.get("use_vllm") else ScriptedEngine(tok),
    )
    if keep_up_to is not None:
        layers = model.config.num_hidden_layers
        # agreed under DeepSpeed, as `resolve_activation_bound` sets it (`agree_forwards`)
        agreed = t.world.deepspeed
        bound = dataclasses.replace(
            t.activation_bound, keep_up_to=keep_up_to, layers=layers, agreed=agreed
        )
        t.activation_bound = bound
    return t if share else one_forward_per_row(t)


def lora_config() -> Any:
    """The LoRA adapter of the scenarios with `lora=True`."""
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "gate_proj"]
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)


def lora_model(model: Any) -> Any:
    """`model` wrapped with the scenarios' LoRA adapter, initialised as `GRPOTrainer` initialises
    it under `peft_config=lora_config()` (the run's seed set, then the adapter made)."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(0)  # the scenarios' seed
    return get_peft_model(model, lora_config())


class SharedForwards:
    """Counts the prompt passes of forwards that pass each shared prompt once (a call with a
    cache that keeps one position's logits: `core.logprobs.model_completion_logprobs` with
    `share_prompts`), on the policy and the reference model, with and without gradients, while
    installed; `recomputing`: the training ones whose layers recompute their activations (the
    first decoder layer's `gradient_checkpointing` flag set at the call)."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        from grpokit.core.logprobs import forward_module

        self.counts = {"training": 0, "no_grad": 0, "recomputing": 0}
        self.models = [forward_module(trainer.model), trainer.ref_model]

    def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("past_key_values") is not None and kwargs.get("logits_to_keep") == 1:
            if not torch.is_grad_enabled():
                self.counts["no_grad"] += 1
                return
            self.counts["training"] += 1
            self.counts["recomputing"] += int(module.model.layers[0].gradient_checkpointing)

    def __enter__(self) -> SharedForwards:
        self.handles = [
            m.register_forward_pre_hook(self.count, with_kwargs=True)
            for m in self.models
            if m is not None
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class KeptForwards:
    """Counts, while installed, the training forwards whose first decoder layer keeps its
    activations (`kept`) and recomputes them (`recomputed`: a recomputed forward counts its
    recomputation too), by the layer's `gradient_checkpointing` flag at each call with
    gradients; and the calls of the last decoder layer that keep theirs (`last_kept`), more than
    `kept` when larger forwards keep their last layers only."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        from grpokit.core.logprobs import forward_module

        self.counts = {"kept": 0, "recomputed": 0, "last_kept": 0}
        self.layers = forward_module(trainer.model).model.layers

    def count(self, module: Any, args: Any) -> None:
        if torch.is_grad_enabled():
            self.counts["recomputed" if module.gradient_checkpointing else "kept"] += 1

    def count_last(self, module: Any, args: Any) -> None:
        if torch.is_grad_enabled() and not module.gradient_checkpointing:
            self.counts["last_kept"] += 1

    def __enter__(self) -> KeptForwards:
        self.handles = [
            self.layers[0].register_forward_pre_hook(self.count),
            self.layers[-1].register_forward_pre_hook(self.count_last),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def train_counting(t: GRPOTrainer, out: Path, scenario: dict[str, Any]) -> None:
    """`t.train()`, this process's `SharedForwards` counts written to
    `out/shared_forwards_<rank>.json` and, for a scenario with `keep_up_to`, its `KeptForwards`
    counts to `out/kept_forwards_<rank>.json`."""
    rank = launched_process_index()
    kept = KeptForwards(t) if "keep_up_to" in scenario else contextlib.nullcontext()
    with SharedForwards(t) as shared, kept:
        t.train()
    (out / f"shared_forwards_{rank}.json").write_text(json.dumps(shared.counts))
    if isinstance(kept, KeptForwards):
        (out / f"kept_forwards_{rank}.json").write_text(json.dumps(kept.counts))


class StopAt(TrainerCallback):
    """Stops training after optimizer step `step`, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def write_recompute(t: Any, out: Path) -> None:
    """`gradient_checkpointing_<rank>.txt`: whether the trained model recomputed its decoder
    layers' activations ("True" / "False")."""
    rank = launched_process_index()
    (out / f"gradient_checkpointing_{rank}.txt").write_text(str(t.model.is_gradient_checkpointing))


def save_params(model: torch.nn.Module, out: Path) -> None:
    rank = launched_process_index()
    name = "params.pt" if rank == 0 else f"params_rank{rank}.pt"
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / name)


def run_scenarios(out_dir: Path) -> None:
    """Every scenario of `SCENARIOS`, then the resume scenario, into `out_dir`."""
    torch.set_num_threads(1)
    for name, overrides in SCENARIOS.items():
        out = out_dir / name
        t = trainer(out, **overrides)
        train_counting(t, out, overrides)
        rank = launched_process_index()
        save_params(t.model, out)
        save_merged(t, out)
        for setting in ("find_unused_parameters", "static_graph"):  # DDP's wrapper's
            value = getattr(t.train_model, setting, None)
            (out / f"{setting}_{rank}.txt").write_text(str(value))
        write_recompute(t, out)
    # Environments: each process makes and resets only its own rollouts' instances.
    out = out_dir / "environments"
    t = environment_trainer(out)
    t.train()
    save_params(t.model, out)
    counts = f"{Tally.made} {Tally.resets} {t.state.prompts_over_length}"
    (out / f"environments_{launched_process_index()}.txt").write_text(counts)
    train_resumed(out_dir)
    run_vllm_server_scenarios(out_dir)


def train_resumed(out_dir: Path, prefix: str = "", **overrides: Any) -> None:
    """The resume scenario (dapo, `overrides` applied), checkpoints every step, dropout making
    each process's random stream matter: `out_dir/<prefix>uninterrupted` trains 3 steps;
    `<prefix>resumed` stops after step 2 (the same schedule), then a new trainer resumes from
    its checkpoint-2. Each holds the final whole weights (`params.pt`); the resumed run also
    its final model (`final_model`)."""
    dropout = {"attention_dropout": 0.3}
    settings = {"save_strategy": "steps", "save_steps": 1, **overrides}
    full, resumed = out_dir / f"{prefix}uninterrupted", out_dir / f"{prefix}resumed"
    t = trainer(full, dropout, **settings)
    t.train()
    _save_whole(t, full)
    t = trainer(resumed, dropout, **settings)
    t.add_callback(StopAt(2))
    t.train()
    t = trainer(resumed, dropout, **settings)
    t.train(resume_from_checkpoint=str(resumed / "checkpoint-2"))
    _save_whole(t, resumed)
    t.save_model(str(resumed / "final_model"))


# The LoRA resume scenario: the adapter's checkpoints (and the merged weights inside them).
LORA_RESUME = {"lora": True, "loss_type": "dapo", "beta": 0.04, "save_merged": True}


def save_merged(t: Any, out: Path) -> None:
    """Under LoRA, the final model merged (`out/merged`, whole weights, one writer)."""
    if t.is_peft:
        t.save_model(str(out / "merged"), merged=True)


class DynamicScenario(NamedTuple):
    """A dynamic-sampling scenario (tests/test_distributed_dynamic.py works them out).

    Attributes:
        kinds: Each dataset row's kind: "c" = its group's rewards are all equal (dropped), "v" =
            they vary. The rows are read in order, 4 per generation batch, 2 per process.
        overrides: GRPOConfig overrides.
        trained: The rows 2 processes train, 4 per step, in rank order (process 0's first);
            a 1-process run without dynamic sampling on these rows is the replay.
    """

    kinds: str
    overrides: dict[str, Any]
    trained: tuple[int, ...]


DYNAMIC_SCENARIOS: dict[str, DynamicScenario] = {
    # Each round both processes are short and draw more; the third round wraps the epoch.
    "dynamic_both": DynamicScenario(
        "cvcvvcvvcccvvvcv", {"scale_rewards": "batch"}, (1, 4, 3, 6, 7, 11, 12, 13, 15, 4, 1, 3)
    ),
    # Each round one process is short: the other takes no prompts in the extra draws.
    "dynamic_one": DynamicScenario(
        "vvcvcvcvvvvvvvcc", {}, (0, 1, 3, 5, 7, 10, 8, 9, 11, 12, 13, 0)
    ),
    # One extra draw at most: rounds 1 and 3 end with one process still short.
    "dynamic_cap": DynamicScenario(
        "vvcvccvvvvccvvvc",
        {"max_dynamic_sampling_draws": 1},
        (0, 1, 3, 2, 6, 9, 7, 8, 14, 10, 12, 13),
    ),
}


def kind_reward(completions: list[str], kind: list[str], **kwargs: Any) -> list[float]:
    """For a "v" row, `letter_reward` plus 0.5 on every other completion (a group's G = 4
    completions are consecutive, so its rewards vary); 1.0 for a "c" row."""
    letters = letter_reward(completions)
    return [
        score + 0.5 * (i % 2) if k == "v" else 1.0
        for i, (score, k) in enumerate(zip(letters, kind, strict=True))
    ]


def kind_dataset(kinds: str) -> list[dict[str, str]]:
    rows = dataset(len(kinds))
    return [{**row, "kind": kind} for row, kind in zip(rows, kinds, strict=True)]


def run_dynamic_scenarios(out_dir: Path) -> None:
    """Every scenario of `DYNAMIC_SCENARIOS` (dapo, dynamic sampling, completions logged) into
    `out_dir/<scenario>/`; this process's grpokit warnings go to `<scenario>_warnings_<rank>.txt`
    in `out_dir`. On one process, also each scenario's replay into `out_dir/<scenario>_replay/`:
    its `trained` rows, without dynamic sampling."""
    torch.set_num_threads(1)
    rank = launched_process_index()
    for name, scenario in DYNAMIC_SCENARIOS.items():
        out = out_dir / name
        t = dynamic_trainer(out, kind_dataset(scenario.kinds), **scenario.overrides)
        handler = logging.FileHandler(out_dir / f"{name}_warnings_{rank}.txt")
        handler.setLevel(logging.WARNING)
        grpokit_logger = logging.getLogger("grpokit")
        grpokit_logger.addHandler(handler)
        try:
            t.train()
        finally:
            grpokit_logger.removeHandler(handler)
            handler.close()
        save_params(t.model, out)
        if launched_num_processes() == 1:
            rows = kind_dataset(scenario.kinds)
            replay = out_dir / f"{name}_replay"
            overrides = {**scenario.overrides, "dynamic_sampling": False}
            t = dynamic_trainer(replay, [rows[i] for i in scenario.trained], **overrides)
            t.train()
            save_params(t.model, replay)


def dynamic_trainer(out: Path, rows: list[dict[str, str]], **overrides: Any) -> Any:
    """dapo with dynamic sampling on `rows` read in order, completions logged."""
    tok = make_tokenizer()
    args = config(
        out,
        **{
            "loss_type": "dapo",
            "dynamic_sampling": True,
            "shuffle_dataset": False,
            "log_completions": True,
            "num_completions_to_print": 0,
            # Rows joined from several draws sum in another order than one draw's; Adam turns
            # that float noise into ~lr * noise / eps at weights whose gradient is near 0 (an
            # embedding row the step barely uses): an epsilon 10x the other scenarios' damps it.
            "adam_epsilon": 1e-3,
            **overrides,
        },
    )
    return one_forward_per_row(
        GRPOTrainer(
            make_causal_lm(tok, seed=0).train(),
            kind_reward,
            args=args,
            train_dataset=rows,
            processing_class=tok,
            generation_engine=ScriptedEngine(tok),
        )
    )


def one_forward_per_row(trainer: GRPOTrainer) -> GRPOTrainer:
    """`trainer` with every row forwarding its own prompt, as on several processes (where
    `GRPOTrainer.share_prompts` does not apply): a one-process run then sums the same products
    in the same order, and its weights can be held to the multi-process run's within 1e-5."""
    trainer.share_prompts = False
    return trainer


def _probed_trainer(out: Path, scenario: dict[str, Any]) -> tuple[GRPOTrainer, Any]:
    """A scenario's trainer on a fresh tiny model, with a `TransformersEngine` (bf16 copy) built
    on the whole model before the trainer shards or partitions it."""
    from grpokit.engines.transformers_engine import TransformersEngine

    tok = make_tokenizer()
    scenario = dict(scenario)
    model = make_causal_lm(tok, seed=0, **scenario.pop("model_overrides", {})).train()
    if scenario.pop("lora", False):  # the adapter made here, for the probe to copy it too
        model = lora_model(model)
    # a copy of the whole model (under LoRA its layers merged, as the trainer's own engine)
    probe = TransformersEngine(model, tok, bf16_sampler=True)
    return trainer(out, model=model, **scenario), probe


def sample_from(engine: Any) -> None:
    """A short `generate` call from the engine's copy, after training: sampling first syncs
    the copy with whatever changed since (`TransformersEngine._sync`), outside any gathering,
    with the policy's parameters sharded or partitioned."""
    engine.generate([[5, 6, 7]], num_generations=2, max_new_tokens=2, sampling=SamplingParams())


def _write_engine_gap(probe: Any, full: dict[str, torch.Tensor], out: Path) -> None:
    """engine_gap.txt: the largest difference between the probe engine's weights (as it computes
    with them) and the whole trained weights `full` rounded to bf16."""
    copies = probe.sampler_weights()  # linear weights held packed: unpacked
    if probe._merged:  # LoRA layers held merged: the whole weights as PEFT merges them
        from grpokit.train.checkpoint import merged_copy

        full = merged_copy(probe.model, full).state_dict()
    gap = max(
        (copies[k].float() - full[k].to(torch.bfloat16).float()).abs().max().item() for k in copies
    )
    (out / "engine_gap.txt").write_text(str(gap))


FSDP_SCENARIOS = ("dapo", "grpo", "bnpo", "kept_activations", "shared_prompts", "lora")


def run_fsdp_scenarios(out_dir: Path) -> None:
    """`FSDP_SCENARIOS` with the model sharded by FSDP2 (launched with an accelerate config that
    asks for FSDP); the final model is saved whole, and a `TransformersEngine` built on the
    unsharded model follows the sharded one's weights (`update_weights` gathers them)."""
    from grpokit.train.distributed import full_state_dict

    torch.set_num_threads(1)
    for name in FSDP_SCENARIOS:
        out = out_dir / name
        t, probe = _probed_trainer(out, SCENARIOS[name])
        train_counting(t, out, SCENARIOS[name])
        write_recompute(t, out)
        probe.update_weights(t.model)
        sample_from(probe)
        full = full_state_dict(t.model, t.world)
        t.save_model(str(out / "final_model"))
        save_merged(t, out)
        if full is not None:  # the main process
            torch.save(full, out / "params.pt")
            sharded = type(next(t.model.parameters())).__name__  # DTensor under FSDP2
            (out / "parameter_type.txt").write_text(sharded)
            _write_engine_gap(probe, full, out)

    # Resume under FSDP2: checkpoints hold the whole states, gathered; loading scatters them.
    train_resumed(out_dir)
    train_resumed(out_dir, "lora_", **LORA_RESUME)
    run_vllm_server_scenarios(out_dir)


# Sampling from a vLLM server (`vllm_mode="server"`): the parent test serves
# tests/test_vllm_client.py's fake vLLM behind the real `VLLMServer`, one server per scenario,
# their URLs in `VLLM_SERVERS` (comma-separated, in this order). After every optimizer step the
# trainer pushes what the step changed, gathered from FSDP2 shards or ZeRO-3 partitions; the
# test compares what the server then holds with the trained weights.
def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A completion's length in characters (the fake vLLM's completions of a group differ in
    length only)."""
    return [float(len(text)) for text in completions]


# The fake's sampling log-probs (-0.25 each) are not the policy's: no importance correction.
VLLM_SERVED = {"reward": length_reward, "vllm_importance_sampling_correction": False}
VLLM_SERVER_SCENARIOS = {
    "vllm_server": {"loss_type": "dapo", **VLLM_SERVED},
    "vllm_server_lora": {"loss_type": "dapo", "lora": True, **VLLM_SERVED},
}
VLLM_SERVERS = "GRPOKIT_TEST_VLLM_SERVERS"


def run_vllm_server_scenarios(out_dir: Path) -> None:
    """`VLLM_SERVER_SCENARIOS` with the servers of `VLLM_SERVERS` (none when it is unset): the
    final whole weights in `params.pt`."""
    urls = os.environ.get(VLLM_SERVERS)
    if not urls:
        return
    for (name, scenario), url in zip(VLLM_SERVER_SCENARIOS.items(), urls.split(","), strict=True):
        out = out_dir / name
        server = {"vllm_server_base_url": url, "vllm_group_port": 0, "vllm_server_timeout": 60}
        t = trainer(out, use_vllm=True, vllm_mode="server", **server, **scenario)
        t.train()
        _save_whole(t, out)


def _save_whole(t: Any, out: Path) -> None:
    full = _whole_weights(t)
    if full is not None:
        torch.save(full, out / "params.pt")


# Two optimizer steps per generation round: the old log-probs come from a separate no-grad
# pass over the policy (under ZeRO-3, its partitions gathered by DeepSpeed's module hooks).
# Each process then trains its own slice of its share per step (docs/DISTRIBUTED.md), so the
# reference is DDP on as many processes, not one process.
SCENARIOS_DEEPSPEED_ONLY = {"old_logprobs": {"loss_type": "dapo", "steps_per_generation": 4}}
# Each shared prompt forwarded once in the training forwards (the model's module forward, then
# the engine's for the completions) and in the reference log-probs' pass; under ZeRO-3 where
# both processes' forwards share (`GRPOTrainer._prompt_agreement`).
SCENARIOS_ZERO = {"shared_reference": {"share_prompts": True, "loss_type": "dapo", "beta": 0.04}}
ALL_SCENARIOS = {**SCENARIOS, **SCENARIOS_DEEPSPEED_ONLY, **SCENARIOS_ZERO}
DEEPSPEED_SCENARIOS = ("dapo", "grpo", "bnpo", "old_logprobs", "shared_reference")
# With kept_activations: under ZeRO-3, which gathers a layer around its recomputation too, the
# processes judge each forward by their largest size (`ActivationBound.agreed`).
# With a LoRA adapter (each shared prompt forwarded once, the reference pass with the adapter
# off): tests/test_distributed_deepspeed.py checks it on its own.
ZERO_SCENARIOS = (*DEEPSPEED_SCENARIOS, "kept_activations", "lora")
POISONED_STEP = 2  # the optimizer step of the "nonfinite" scenario whose forwards are NaN


def poisoned_trainer(out: Path) -> Any:
    """The dapo scenario with the training forwards of step `POISONED_STEP` made NaN: that step
    must apply no update (the non-finite guard, or DeepSpeed's own check)."""
    t = trainer(out, **SCENARIOS["dapo"])

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if torch.is_grad_enabled() and t.state.global_step + 1 == POISONED_STEP:
            return output * float("nan")
        return None

    t.model.get_input_embeddings().register_forward_hook(hook)
    return t


def run_deepspeed_references(out_dir: Path) -> None:
    """`ZERO_SCENARIOS` (but those of `SCENARIOS_DEEPSPEED_ONLY`) and the "nonfinite" one on a
    single process (the reference the DeepSpeed runs must equal)."""
    torch.set_num_threads(1)
    for name in ZERO_SCENARIOS:
        if name in SCENARIOS_DEEPSPEED_ONLY:
            continue
        t = trainer(out_dir / name, **ALL_SCENARIOS[name])
        t.train()
        save_params(t.model, out_dir / name)
        save_merged(t, out_dir / name)
    t = poisoned_trainer(out_dir / "nonfinite")
    t.train()
    save_params(t.model, out_dir / "nonfinite")
    (out_dir / "nonfinite" / "skipped.txt").write_text(str(t.state.nonfinite_skipped))


def _whole_weights(t: Any) -> dict[str, torch.Tensor] | None:
    """The trained model's whole weights on the main process (gathered under ZeRO-3), else
    None."""
    from grpokit.train.distributed import full_state_dict

    full = full_state_dict(t.model, t.world)
    if full is None and t.world.is_main_process:
        full = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    return full


def run_deepspeed_scenarios(out_dir: Path) -> None:
    """`ZERO_SCENARIOS` trained by the DeepSpeed engine (launched with an accelerate config
    that asks for ZeRO-2 or ZeRO-3); a `TransformersEngine` built on the whole model follows the
    trained weights (`update_weights`, gathered under ZeRO-3). Each scenario also records the
    number of elements the first parameter holds on this process during training (0 for a
    ZeRO-3 partition), and the final model is saved."""

    torch.set_num_threads(1)
    for name in ZERO_SCENARIOS:
        out = out_dir / name
        t, probe = _probed_trainer(out, ALL_SCENARIOS[name])
        named: set[str] = set()  # the keywords the engine's training forwards gave the model

        def record(module: Any, args: Any, kwargs: dict[str, Any], named: set[str] = named) -> None:
            if torch.is_grad_enabled():
                named.update(kwargs)

        handle = t.model.register_forward_pre_hook(record, with_kwargs=True)
        gathers = broadcast_gathers()
        train_counting(t, out, ALL_SCENARIOS[name])
        handle.remove()
        rank = launched_process_index()
        (out / f"broadcast_gathers_{rank}.txt").write_text(str(broadcast_gathers() - gathers))
        (out / f"forward_arguments_{rank}.json").write_text(json.dumps(sorted(named)))
        write_recompute(t, out)
        numel = next(t.model.parameters()).numel()  # outside any gathering
        # what the engine says its sync reads (under ZeRO-3 the rest stays partitioned)
        with t.world.whole_parameters(t.model, probe.sync_parameters(t.model)):
            probe.update_weights(t.model)
        sample_from(probe)
        full = _whole_weights(t)
        t.save_model(str(out / "final_model"))
        save_merged(t, out)
        (out / f"local_numel_{t.world.process_index}.txt").write_text(str(numel))
        if full is not None:  # the main process
            torch.save(full, out / "params.pt")
            _write_engine_gap(probe, full, out)

    # A NaN step: DeepSpeed skips the update (and the schedule's step), the guard counts it.
    t = poisoned_trainer(out_dir / "nonfinite")
    t.train()
    _save_whole(t, out_dir / "nonfinite")
    if t.world.is_main_process:
        skipped = f"{t.state.nonfinite_skipped} {t.train_model.skipped_steps}"
        (out_dir / "nonfinite" / "skipped.txt").write_text(skipped)

    # Resume: checkpoints hold the whole weights and optimizer state, gathered from the
    # partitions; loading puts each process's partitions back.
    train_resumed(out_dir)
    train_resumed(out_dir, "lora_", **LORA_RESUME)
    run_vllm_server_scenarios(out_dir)


def broadcast_gathers() -> int:
    """The blocking all-gathers DeepSpeed has made as broadcasts in this process so far
    (`train.distributed.gather_by_broadcasts_over_gloo`)."""
    from deepspeed.comm import comm as ds_comm

    return int(ds_comm.cdb.all_gather_function.calls)


def run_one_scenario(out_dir: Path, name: str) -> None:
    """The scenario `name` alone (the two-node test), and where this process ran:
    `process_<rank>.json` with its ranks as the trainer saw them."""
    torch.set_num_threads(1)
    out = out_dir / name
    t = trainer(out, **ALL_SCENARIOS[name])
    t.train()
    save_params(t.model, out)
    place = {
        "rank": t.world.process_index,
        "local_rank": t.world.local_process_index,
        "num_processes": t.world.num_processes,
        "is_world_process_zero": t.state.is_world_process_zero,
        "is_local_process_zero": t.state.is_local_process_zero,
    }
    (out / f"process_{t.world.process_index}.json").write_text(json.dumps(place))


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        run_deepspeed_scenarios(Path(sys.argv[1]))
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        run_fsdp_scenarios(Path(sys.argv[1]))
    elif len(sys.argv) > 2 and sys.argv[2] == "dynamic":
        run_dynamic_scenarios(Path(sys.argv[1]))
    elif len(sys.argv) > 2:
        run_one_scenario(Path(sys.argv[1]), sys.argv[2])
    else:
        run_scenarios(Path(sys.argv[1]))
    # Leave the process group together, as `GRPOTrainer.end` does at the end of a run: a process
    # that exits with it (and DeepSpeed's communication threads) alive can abort at interpreter
    # exit ("terminate called without an active exception", exit -6).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    from grpokit.train.distributed import exit_launched_process

    exit_launched_process(0)
