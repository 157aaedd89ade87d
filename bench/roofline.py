"""Roofline model of one GRPO step: the FLOPs and bytes each phase must move, and its floor time.

Pure arithmetic on a Llama-style config and a workload (no torch, no grpokit), so the benchmark's
parent process, its TRL worker and the tests all import it.

What each phase must do (uniform lengths: `B` prompts of `P` tokens, `G` completions each,
`N = B*G` completions of `T` tokens):

- **One forward over the step's sequences** (`sequence_forward`): a prompt's hidden states do not
  depend on its completions, so the prompt runs once per distinct prompt (`B*P` tokens, causal
  attention over `P(P+1)/2` positions) and each completion feeds its first `T-1` tokens (the last
  token is never an input), the token at completion offset `j` attending `P+j+1` positions. The LM
  head runs where a completion token is predicted: the last prompt position (`B`, shared by the
  group) and the first `T-1` completion positions (`N*(T-1)`).
- **generation** = exactly that forward, split into *prefill* (the prompt part) and *decode*
  (`T-1` steps of `N` tokens). Decode is bandwidth-bound: every step reads all weights once in the
  sampler's dtype plus the KV cache so far (the prompt's KV once per group, each completion's own
  KV per row) and writes one KV entry per row.
- **logprobs**: one such forward per pass (old log-probs when `num_iterations > 1`, reference ones
  when `beta > 0`); bytes: the fp32 weights read once.
- **train_fwd_bwd**: 3x the forward FLOPs (backward = 2x forward) per optimizer step; under LoRA
  the frozen weights need no weight gradient: 2x their products, 3x attention, and the adapters'
  own products 3x (forward, input and weight gradients); bytes: fp32
  weights read in forward and backward, gradients written, saved activations written and read
  back, and the sampler copy refreshed (fp32 read, sampler dtype written; the benchmark times the
  weight sync inside this phase).
- **optimizer**: AdamW with gradient clipping on the trainable fp32 parameters:
  `OPTIMIZER_FLOPS_PER_PARAM` FLOPs and `OPTIMIZER_BYTES_PER_PARAM` bytes each (read parameter,
  gradient, two moments and the gradient again for the norm; write parameter and two moments).

Floor time of a phase = max(FLOPs / matmul peak, bytes / memory bandwidth); the ratio
measured / floor says how far an implementation is from what the machine allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTIMIZER_FLOPS_PER_PARAM = 16  # clip: square+add, scale; AdamW: 2 moments, bias fix, sqrt, update
OPTIMIZER_BYTES_PER_PARAM = 32  # reads p, g (twice: norm, step), m, v; writes p, m, v; fp32

PHASES = ("generation", "logprobs", "train_fwd_bwd", "optimizer")


@dataclass(frozen=True)
class ModelShape:
    """What the counts need from a Llama-style config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelShape:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=head_dim,
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_config(cls, path: str | Path) -> ModelShape:
        """From the `config.json` of a checkpoint folder."""
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder layers (q, k, v, o, gate, up, down)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q + kv + o + mlp)

    def lora_params(self, rank: int) -> int:
        """Parameters of a LoRA adapter of `rank` on every linear layer of the decoder layers
        (PEFT's "all-linear": A [rank, in] and B [out, rank] on q, k, v, o, gate, up, down)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        sides = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i)  # in + out of each layer
        return self.layers * rank * sides

    @property
    def head_params(self) -> int:
        """Weights the LM head multiplies by (the embedding matrix when tied)."""
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters: embeddings, layers, RMSNorm weights (2 per layer + final), head."""
        norms = (2 * self.layers + 1) * self.hidden
        head = 0 if self.tied_embeddings else self.head_params
        return self.vocab * self.hidden + self.body_params + norms + head

    @property
    def kv_per_token(self) -> int:
        """KV-cache elements per token (keys and values of every layer)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def forward_flops(self, tokens: float, head_tokens: float, attended: float) -> float:
        """Forward FLOPs: `tokens` through the layers, `head_tokens` through the LM head,
        `attended` = sum over tokens of the number of positions each attends to (QK^T and AV:
        2 products of `head_dim` per head and attended position, 2 FLOPs per multiply-add)."""
        attention = 4.0 * self.layers * self.heads * self.head_dim * attended
        return 2.0 * self.body_params * tokens + 2.0 * self.head_params * head_tokens + attention


@dataclass(frozen=True)
class Work:
    """One optimizer step's workload (uniform lengths) and the precisions it runs in.

    `compute_bytes`: bytes per element of the training/log-prob matmuls (2 under bf16 autocast,
    4 in fp32). `sampler_bytes`: bytes per weight of the model that decodes (2 for a bf16 sampler
    copy, 4 when the fp32 policy samples) and per element of its KV cache. `weight_bytes`: bytes
    per linear weight as the decode reads them, when they differ (None = `sampler_bytes`; 2 for
    the fp32 policy's float16 panels, `DecodePacks`). `lora_rank`: a LoRA adapter of this rank
    on every linear layer trains while the model stays frozen (0 = a full fine-tune).
    `trainable`: trainable parameters (None = the adapter's under `lora_rank`, else all).
    """

    num_prompts: int
    num_generations: int
    prompt_len: int
    completion_len: int
    beta: float = 0.0
    num_iterations: int = 1
    compute_bytes: int = 2
    sampler_bytes: int = 2
    weight_bytes: int | None = None
    lora_rank: int = 0
    trainable: int | None = None

    @property
    def completions(self) -> int:
        return self.num_prompts * self.num_generations

    @property
    def read_bytes(self) -> int:
        """Bytes per linear weight as the decode reads them."""
        return self.sampler_bytes if self.weight_bytes is None else self.weight_bytes


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved by one phase."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)

    def floor_seconds(self, peak_gflops: float, bandwidth_gbs: float) -> float:
        """max(FLOPs / peak, bytes / bandwidth), in seconds."""
        return max(self.flops / (peak_gflops * 1e9), self.bytes / (bandwidth_gbs * 1e9))


def prefill(shape: ModelShape, work: Work) -> Cost:
    """Each distinct prompt once: weights read once in the sampler dtype, its KV written."""
    b, p = work.num_prompts, work.prompt_len
    flops = shape.forward_flops(b * p, b, b * p * (p + 1) / 2)
    weights = (shape.body_params + shape.head_params) * work.read_bytes
    kv_written = b * p * shape.kv_per_token * work.sampler_bytes
    return Cost(flops, weights + kv_written)


def decode(shape: ModelShape, work: Work) -> Cost:
    """`T-1` steps of `N` tokens; each step reads every weight and the KV cache so far."""
    b, n, p, t = work.num_prompts, work.completions, work.prompt_len, work.completion_len
    steps = max(t - 1, 0)
    attended = n * (steps * p + steps * (steps + 1) / 2)  # step s: P + s positions per row
    flops = shape.forward_flops(n * steps, n * steps, attended)
    weights = (shape.body_params + shape.head_params) * work.read_bytes
    kv = shape.kv_per_token * work.sampler_bytes
    # step s (1..T-1): the prompt's KV read once per group (B*P entries); per row, the s-1
    # completion entries written so far read and the new one written (s entries)
    kv_bytes = kv * (steps * b * p + n * steps * (steps + 1) / 2)
    return Cost(flops, steps * weights + kv_bytes)


def sequence_forward_flops(shape: ModelShape, work: Work) -> float:
    """FLOPs of one forward over the step's sequences (= generation's FLOPs)."""
    return prefill(shape, work).flops + decode(shape, work).flops


def activation_bytes_per_token(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes autograd keeps per token for the backward of one training forward (all layers).

    Per layer: the fp32 residual inputs of the two RMSNorms (`2h` x 4 bytes); in the compute
    dtype: the two norm outputs (`2h`), q, k, v (`h + 2*kv`), the attention output (`h`) and the
    MLP's gate, up, silu(gate) and product (`4i`). The logits are counted apart
    (`logits_bytes`).
    """
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    per_layer = 4 * 2 * h + compute_bytes * (
        2 * h + shape.heads * shape.head_dim + 2 * kv + h + 4 * i
    )
    return shape.layers * per_layer


def trainable_params(shape: ModelShape, work: Work) -> int:
    """Parameters the optimizer updates (`Work.trainable`, else the adapter's or all)."""
    if work.trainable is not None:
        return work.trainable
    return shape.lora_params(work.lora_rank) if work.lora_rank else shape.params


def train_fwd_bwd(shape: ModelShape, work: Work) -> Cost:
    """Forward + backward of every optimizer step of the round, per optimizer step."""
    forward = sequence_forward_flops(shape, work)
    if work.lora_rank:
        # the weight products of that forward: input gradients only (the weights are frozen)
        steps = max(work.completion_len - 1, 0)
        layer_tokens = work.num_prompts * work.prompt_len + work.completions * steps
        products = shape.forward_flops(layer_tokens, work.num_prompts + work.completions * steps, 0)
        adapters = 2.0 * shape.lora_params(work.lora_rank) * layer_tokens
        flops = 2.0 * products + 3.0 * (forward - products) + 3.0 * adapters
    else:
        flops = 3.0 * forward
    trainable = trainable_params(shape, work)
    tokens = work.num_prompts * work.prompt_len + work.completions * work.completion_len
    saved = tokens * activation_bytes_per_token(shape, work.compute_bytes)
    saved += logits_bytes(shape, work)
    sync = shape.params * (4 + work.sampler_bytes) if work.sampler_bytes != 4 else 0
    moved = 2 * 4 * shape.params + 4 * trainable + 2 * saved + sync
    return Cost(flops, moved)


def logits_bytes(shape: ModelShape, work: Work) -> int:
    """The `[N, T, V]` logits a training forward keeps for the log-softmax backward."""
    return work.completions * work.completion_len * shape.vocab * work.compute_bytes


def phase_costs(shape: ModelShape, work: Work) -> dict[str, Cost]:
    """Cost per optimizer step of each phase (generation and log-prob passes happen once per
    round of `num_iterations` optimizer steps, so they are divided by it), plus its parts
    "prefill" and "decode"."""
    k = work.num_iterations
    pre, dec = prefill(shape, work), decode(shape, work)
    passes = int(work.num_iterations > 1) + int(work.beta != 0)
    one_pass = Cost(sequence_forward_flops(shape, work), 4.0 * shape.params)
    trainable = trainable_params(shape, work)
    return {
        "prefill": pre.scaled(1 / k),
        "decode": dec.scaled(1 / k),
        "generation": (pre + dec).scaled(1 / k),
        "logprobs": one_pass.scaled(passes / k),
        "train_fwd_bwd": train_fwd_bwd(shape, work),
        "optimizer": Cost(
            OPTIMIZER_FLOPS_PER_PARAM * trainable, OPTIMIZER_BYTES_PER_PARAM * trainable
        ),
    }


def memory_budget(
    shape: ModelShape,
    work: Work,
    *,
    sampler_copy: bool,
    packed: bool,
    micro_batch: int | None = None,
) -> dict[str, int]:
    """Bytes each component of a training process holds at the peak of a step (exact for
    tensors, from the config; the Python/torch runtime itself is not included).

    Args:
        shape: The model.
        work: The workload; `beta > 0` adds an fp32 reference model.
        sampler_copy: A separate sampler copy of the weights in `work.sampler_bytes`.
        packed: The sampler's linear weights kept in a packed (blocked) layout: with a sampler
            copy only there (`PackedLinear.release_weight`), except a head tied to the
            embeddings; without one (the fp32 policy decodes itself, `DecodePacks`) beside the
            policy's own weights.
        micro_batch: Completions per training forward (None = all `N`).
    """
    trainable = trainable_params(shape, work)
    rows = work.completions if micro_batch is None else micro_batch
    seq = work.prompt_len + work.completion_len
    released = shape.body_params + (0 if shape.tied_embeddings else shape.head_params)
    released = released if packed else 0
    budget = {
        "weights fp32": 4 * shape.params,
        "gradients fp32": 4 * trainable,
        "AdamW moments fp32": 8 * trainable,
        "sampler copy": work.sampler_bytes * (shape.params - released) if sampler_copy else 0,
        "packed sampler weights": (
            work.read_bytes * (shape.body_params + shape.head_params) if packed else 0
        ),
        "reference model fp32": 4 * shape.params if work.beta != 0 else 0,
        "activations (train micro-batch)": rows
        * seq
        * activation_bytes_per_token(shape, work.compute_bytes),
        "logits (train micro-batch)": rows * work.completion_len * shape.vocab * work.compute_bytes,
        "KV cache (per row)": work.completions * seq * shape.kv_per_token * work.sampler_bytes,
        "log-prob buffers [N, T] fp32": 3 * work.completions * work.completion_len * 4,
    }
    return budget


# =================================================================================================
# Report tables
# =================================================================================================
def roofline_table(
    costs: dict[str, Cost],
    peak_gflops: float,
    bandwidth_gbs: float,
    measured: dict[str, dict[str, float]],
) -> str:
    """Markdown table: per phase, GFLOP, MB moved, floor seconds and what bounds it, then per
    system (`measured[system][phase]` seconds per optimizer step) the measured time and its
    ratio to the floor."""
    systems = list(measured)
    head = "| phase | GFLOP | MB moved | floor s | bound |" + "".join(
        f" {s} s | {s} / floor |" for s in systems
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for phase in ("prefill", "decode", *PHASES):
        cost = costs[phase]
        floor = cost.floor_seconds(peak_gflops, bandwidth_gbs)
        compute = cost.flops / (peak_gflops * 1e9)
        bound = "-" if floor == 0 else ("FLOPs" if compute >= floor else "bytes")
        cells = [
            phase if phase in PHASES else f"  ({phase})",
            f"{cost.flops / 1e9:.2f}",
            f"{cost.bytes / 1e6:.0f}",
            f"{floor:.4f}",
            bound,
        ]
        for system in systems:
            seconds = measured[system].get(phase)
            if seconds is None:
                cells += ["", ""]
            else:
                ratio = f"{seconds / floor:.1f}x" if floor > 0 else "-"
                cells += [f"{seconds:.3f}", ratio]
        rows.append("| " + " | ".join(cells) + " |")
    total = sum(costs[p].floor_seconds(peak_gflops, bandwidth_gbs) for p in PHASES)
    cells = ["**step (phases above)**", "", "", f"{total:.4f}", ""]
    for system in systems:
        seconds = sum(measured[system].get(p, 0.0) for p in PHASES)
        cells += [f"{seconds:.3f}", f"{seconds / total:.1f}x" if total > 0 else "-"]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


MEMORY_CUTS = {
    "sampler copy": "embeddings and norms (the linear weights are held only packed)",
    "packed sampler weights": "a head tied to the embeddings is held both ways; without native "
    "bf16 the fp32 policy's packs are a second copy of its linear weights",
    "reference model fp32": "only for beta > 0; bf16 would halve it (it is never trained)",
    "activations (train micro-batch)": "smaller micro-batches or activation checkpointing; "
    "the prompt is stored once per row, not once per group",
    "logits (train micro-batch)": "a fused head + log-softmax keeps [N, T] instead of [N, T, V]",
    "AdamW moments fp32": "LoRA trains a small fraction of the parameters",
}


def memory_table(budget: dict[str, int], measured_mib: dict[str, float]) -> str:
    """Markdown table: bytes per component (MiB), their sum, and each system's measured peak RSS."""
    mib = 2**20
    rows = ["| component | MiB | could be cut |", "|---|---|---|"]
    for name, size in budget.items():
        if size:
            rows.append(f"| {name} | {size / mib:.1f} | {MEMORY_CUTS.get(name, '')} |")
    rows.append(f"| **sum of tensors** | **{sum(budget.values()) / mib:.1f}** | |")
    for system, rss in measured_mib.items():
        rows.append(
            f"| measured peak RSS, {system} (with runtime, allocator cache) | {rss:.0f} | |"
        )
    return "\n".join(rows)
