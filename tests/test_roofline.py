"""The benchmark's roofline and memory model (bench/roofline.py) and CPU detection
(bench/machine_floor.py), checked against counts worked out by hand for a tiny Llama."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import machine_floor
import roofline
from roofline import Cost, ModelShape, Work

# 2 layers, hidden 8, intermediate 16, 2 heads of 4, 1 KV head, vocabulary 10, tied embeddings.
TINY = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
# 1 prompt of 3 tokens, 2 completions of 4 tokens, bf16 compute and sampler.
WORK = Work(num_prompts=1, num_generations=2, prompt_len=3, completion_len=4)


def test_parameter_counts_by_hand():
    # per layer: q 8*2*4=64, k+v 2*8*1*4=64, o 64, MLP 3*8*16=384 -> 576; 2 layers -> 1152
    assert TINY.body_params == 1152
    assert TINY.head_params == 80  # 10 * 8
    # embeddings 80 + layers 1152 + norms (2*2+1)*8=40; tied head adds nothing
    assert TINY.params == 1272
    untied = ModelShape(**{**TINY.__dict__, "tied_embeddings": False})
    assert untied.params == 1272 + 80
    assert TINY.kv_per_token == 16  # 2 (k, v) * 2 layers * 1 head * 4


def test_lora_parameters_by_hand_and_as_peft_counts_them():
    # rank 2, per layer (in + out): q 8+8, k 8+4, v 8+4, o 8+8, gate 8+16, up 8+16, down 16+8
    # = 16 + 12 + 12 + 16 + 24 + 24 + 24 = 128; x 2 (rank) x 2 layers = 512
    assert TINY.lora_params(2) == 512
    peft = pytest.importorskip("peft")
    from tests.tiny import make_causal_lm, make_tokenizer

    model = make_causal_lm(make_tokenizer())
    shape = ModelShape.from_dict(model.config.to_dict())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_params(4) == trainable > 0


def test_from_dict_reads_a_llama_config():
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 10,
        "tie_word_embeddings": True,
    }
    assert ModelShape.from_dict(cfg) == TINY  # head_dim = 8 / 2


def test_prefill_and_decode_by_hand():
    pre = roofline.prefill(TINY, WORK)
    # 3 prompt tokens through the layers (2*1152*3 = 6912), head on the last one (2*80 = 160),
    # attention over 1+2+3 = 6 positions: 4 * 2 layers * 2 heads * 4 * 6 = 384
    assert pre.flops == 6912 + 160 + 384
    # bf16 weights once: (1152 + 80) * 2 = 2464; KV of 3 tokens: 3 * 16 * 2 = 96
    assert pre.bytes == 2464 + 96
    dec = roofline.decode(TINY, WORK)
    # 3 steps x 2 rows = 6 tokens: layers 2*1152*6 = 13824, head 2*80*6 = 960; step s attends
    # 3 + s positions per row: 2 * (4 + 5 + 6) = 30 -> 64 * 30 = 1920
    assert dec.flops == 13824 + 960 + 1920
    # 3 weight reads 3 * 2464 = 7392; KV entries per step s: prompt 3 (shared) + s per row:
    # (3 + 2*1) + (3 + 2*2) + (3 + 2*3) = 21 entries * 16 * 2 bytes = 672
    assert dec.bytes == 7392 + 672


def test_one_completion_is_one_causal_forward_over_the_sequence():
    # G = 1: generation FLOPs == a plain forward over the P + T - 1 input tokens with the head on
    # the T predicting positions (the last token is never an input).
    work = Work(num_prompts=1, num_generations=1, prompt_len=5, completion_len=7)
    n_inputs = 5 + 7 - 1
    attended = sum(range(1, n_inputs + 1))
    expected = TINY.forward_flops(n_inputs, 7, attended)
    assert roofline.sequence_forward_flops(TINY, work) == pytest.approx(expected)


def test_group_shares_its_prompt():
    # G completions cost G times the completion part but the prompt part once.
    one = Work(num_prompts=1, num_generations=1, prompt_len=5, completion_len=7)
    four = Work(num_prompts=1, num_generations=4, prompt_len=5, completion_len=7)
    p1, d1 = roofline.prefill(TINY, one).flops, roofline.decode(TINY, one).flops
    assert roofline.prefill(TINY, four).flops == p1
    assert roofline.decode(TINY, four).flops == pytest.approx(4 * d1)


def test_phase_costs_by_hand():
    forward = 7456 + 16704  # prefill + decode FLOPs above
    work = Work(**{**WORK.__dict__, "beta": 0.04, "num_iterations": 2})
    costs = roofline.phase_costs(TINY, work)
    # generation once per round of 2 optimizer steps
    assert costs["generation"].flops == pytest.approx(forward / 2)
    # 2 passes (old and reference) per round -> 1 per step; fp32 weights 1272 * 4 read once each
    assert costs["logprobs"] == Cost(forward, 4 * 1272)
    # forward + backward = 3 forwards per optimizer step
    assert costs["train_fwd_bwd"].flops == 3 * forward
    # AdamW + clip: 16 FLOPs and 32 bytes per trainable parameter
    assert costs["optimizer"] == Cost(16 * 1272, 32 * 1272)
    assert roofline.phase_costs(TINY, WORK)["logprobs"].flops == 0


def test_lora_training_flops_and_trainable_by_hand():
    # Frozen weights: forward + input gradients, 2 x the weight products; attention 3x; the
    # adapters (rank 2, 512 parameters) 3 x 2 x 512 per layer token. Layer tokens: prompt 3 +
    # 2 rows x 3 = 9; head tokens 1 + 6 = 7. Products 2*1152*9 + 2*80*7 = 20736 + 1120 = 21856;
    # attention 384 + 1920 = 2304 (test_prefill_and_decode_by_hand).
    lora = Work(**{**WORK.__dict__, "lora_rank": 2})
    assert roofline.train_fwd_bwd(TINY, lora).flops == 2 * 21856 + 3 * 2304 + 3 * 2 * 512 * 9
    # = the forward (7456 + 16704), the input gradients (21856), attention's backward (2 x 2304)
    assert 2 * 21856 + 3 * 2304 == 7456 + 16704 + 21856 + 2 * 2304
    costs = roofline.phase_costs(TINY, lora)
    assert costs["optimizer"] == Cost(16 * 512, 32 * 512)  # the adapter's parameters train
    # gradients written for the adapter only: 4 * 512 instead of 4 * 1272
    full = roofline.train_fwd_bwd(TINY, WORK).bytes
    assert roofline.train_fwd_bwd(TINY, lora).bytes == full - 4 * (1272 - 512)
    budget = roofline.memory_budget(TINY, lora, sampler_copy=False, packed=False)
    assert budget["AdamW moments fp32"] == 8 * 512


def test_train_bytes_by_hand():
    # activations per token: per layer 4*2*8 = 64 fp32 bytes + 2 * (16 + 8 + 8 + 8 + 64) = 208
    # -> 272 per layer, 544 for 2 layers
    assert roofline.activation_bytes_per_token(TINY, 2) == 544
    # tokens: prompt 3 once + 2 rows * 4 = 11; saved 11 * 544 = 5984; logits 2*4*10*2 = 160
    saved = 5984 + 160
    # fp32 weights read twice 2*4*1272, gradients written 4*1272, saved written and read,
    # sampler sync: fp32 read + bf16 write per parameter 6*1272
    expected = 8 * 1272 + 4 * 1272 + 2 * saved + 6 * 1272
    assert roofline.train_fwd_bwd(TINY, WORK).bytes == expected


def test_floor_is_the_larger_of_compute_and_bandwidth():
    cost = Cost(flops=2e9, bytes=1e9)
    assert cost.floor_seconds(peak_gflops=100, bandwidth_gbs=10) == pytest.approx(0.1)  # bytes
    assert cost.floor_seconds(peak_gflops=10, bandwidth_gbs=100) == pytest.approx(0.2)  # FLOPs


def test_memory_budget_by_hand():
    work = Work(**{**WORK.__dict__, "beta": 0.04})
    budget = roofline.memory_budget(TINY, work, sampler_copy=True, packed=True, micro_batch=1)
    assert budget["weights fp32"] == 4 * 1272
    assert budget["gradients fp32"] == 4 * 1272
    assert budget["AdamW moments fp32"] == 8 * 1272
    assert budget["sampler copy"] == 2 * (1272 - 1152)  # the layers' linear weights: packed only
    assert budget["packed sampler weights"] == 2 * (1152 + 80)
    assert budget["reference model fp32"] == 4 * 1272
    assert budget["activations (train micro-batch)"] == 1 * 7 * 544  # 1 row of 3 + 4 tokens
    assert budget["logits (train micro-batch)"] == 1 * 4 * 10 * 2
    assert budget["KV cache (per row)"] == 2 * 7 * 16 * 2
    assert budget["log-prob buffers [N, T] fp32"] == 3 * 2 * 4 * 4
    plain = roofline.memory_budget(TINY, WORK, sampler_copy=False, packed=False)
    assert plain["sampler copy"] == plain["packed sampler weights"] == 0
    assert plain["reference model fp32"] == 0
    lora = Work(**{**WORK.__dict__, "trainable": 100})
    budget = roofline.memory_budget(TINY, lora, sampler_copy=False, packed=False)
    assert budget["AdamW moments fp32"] == 800


CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse avx2 fma avx512f
processor\t: 1
model name\t: other
flags\t\t: avx512_bf16
"""


def test_cpuinfo_parsing_takes_the_first_cpu(tmp_path):
    parsed = machine_floor.parse_cpuinfo(CPUINFO)
    assert parsed["model"] == "AMD EPYC 7B12"
    assert parsed["flags"] == {"fpu", "sse", "avx2", "fma", "avx512f"}
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = machine_floor.cpu_info(str(path), environ={})
    assert info["flags"] == ["avx2", "fma", "avx512f"]
    assert info["native_bf16"] is False
    assert (info["isa_caps"], info["bf16_reason"]) == ({}, "no avx512_bf16/amx_bf16")
    path.write_text(CPUINFO.replace("avx512f\n", "avx512f amx_bf16\n", 1))
    assert machine_floor.cpu_info(str(path), environ={})["native_bf16"] is True
    assert machine_floor.cpu_info(str(tmp_path / "missing"))["flags"] == []
    # The ISA caps of an emulated AVX2 CPU: no native bf16, and the machine line says why.
    caps = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "HOME": "/x"}
    capped = machine_floor.cpu_info(str(path), environ=caps)
    assert capped["native_bf16"] is False
    assert capped["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert capped["bf16_reason"] == "amx_bf16 capped by ONEDNN_MAX_CPU_ISA=AVX2"
    floor = {
        "cpu": capped,
        "threads": 2,
        "matmul_peak_gflops": {"bf16": 20.0, "fp32": 100.0},
        "compute_dtype": "fp32",
        "bandwidth_gbs": 10.0,
        "loadavg": (0.5, 0.5, 0.5),
    }
    line = machine_floor.describe(floor)
    assert "flags avx2 fma avx512f amx_bf16, ISA caps ONEDNN_MAX_CPU_ISA=AVX2 " in line
    assert "MKL_ENABLE_INSTRUCTIONS=AVX2 (native bf16: no, amx_bf16 capped by" in line


def test_roofline_table_reports_floor_bound_and_ratio():
    costs = {
        "prefill": Cost(1e9, 1e6),
        "decode": Cost(1e9, 1e9),
        "generation": Cost(2e9, 1.001e9),
        "logprobs": Cost(0, 0),
        "train_fwd_bwd": Cost(6e9, 1e6),
        "optimizer": Cost(1e6, 1e8),
    }
    # peak 10 GFLOP/s, 1 GB/s: generation floor max(0.2, 1.001) = 1.001 s (bytes); training
    # 0.6 s (FLOPs); optimizer 0.1 s (bytes); step floor 1.701 s
    measured = {"grpokit": {"generation": 2.002, "train_fwd_bwd": 1.2, "optimizer": 0.1}}
    table = roofline.roofline_table(costs, 10, 1, measured)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "| 1.0010 | bytes | 2.002 | 2.0x |" in lines["generation"]
    assert "| 0.6000 | FLOPs | 1.200 | 2.0x |" in lines["train_fwd_bwd"]
    assert "| 0.0000 | - |" in lines["logprobs"]
    assert "| 1.7010 |  | 3.302 | 1.9x |" in lines["**step (phases above)**"]


def test_bench_report_builds_the_roofline_from_a_summary():
    import bench_grpo

    summary = {
        "workload": "fixed-beta0-iter1",
        "workload_fields": {"num_prompts": 1, "num_generations": 2, "max_completion_length": 4},
        "system": "grpokit",
        "mean_prompt_length": 3.0,
        "mean_completion_length": 4.0,
        "per_step": {"generation": 1.0, "logprobs": 0.0, "train_fwd_bwd": 1.0, "optimizer": 0.1},
        "peak_rss_mb": 512.0,
    }
    work = bench_grpo.roofline_work(summary, native_bf16=False)
    assert work == Work(1, 2, 3, 4, compute_bytes=4, sampler_bytes=4, weight_bytes=4)
    # calls of FP16_TRAINABLE_MIN_TOKENS new tokens decode from float16 panels (where fbgemm is)
    from grpokit.engines.packed_linear import can_pack_fp16
    from grpokit.engines.transformers_engine import FP16_TRAINABLE_MIN_TOKENS

    long = dict(summary, workload_fields=dict(max_completion_length=FP16_TRAINABLE_MIN_TOKENS))
    long_work = bench_grpo.roofline_work(long, native_bf16=False)
    assert long_work is not None and long_work.read_bytes == (2 if can_pack_fp16() else 4)
    assert long_work.sampler_bytes == 4  # the KV cache stays float32
    halves = roofline.decode(TINY, Work(1, 2, 3, 4, sampler_bytes=4, weight_bytes=2))
    full = roofline.decode(TINY, Work(1, 2, 3, 4, sampler_bytes=4))
    assert full.bytes - halves.bytes == 3 * 2 * (TINY.body_params + TINY.head_params)
    assert bench_grpo.roofline_work(summary, native_bf16=True).weight_bytes is None
    floor = {
        "native_bf16": False,
        "peak_gflops": 1.0,
        "bandwidth_gbs": 1.0,
        "compute_dtype": "fp32",
    }
    report = bench_grpo.format_roofline([summary], TINY, floor)
    assert "P=3, T=4" in report
    # no sampler copy without native bf16, but the fp32 policy's packed weights for decoding;
    # measured RSS beside the sum
    assert "| sampler copy |" not in report
    assert "| packed sampler weights |" in report
    assert "| measured peak RSS, grpokit (with runtime, allocator cache) | 512 | |" in report


def test_bench_report_gives_each_pair_of_workers_its_ratio():
    """`bench_grpo.py --pairs 3`: the workers ran TRL first, then grpokit first, then TRL first;
    each pair's speed-up is TRL's step over grpokit's, in the order they ran, its peak RSS
    grpokit's over TRL's, and the median speed-up closes the table."""
    import bench_grpo

    def run(system: str, pair: int, step: float, rss: float) -> dict[str, Any]:
        per_step = {"total": step}
        return {
            "workload": "w",
            "system": system,
            "pair": pair,
            "per_step": per_step,
            "peak_rss_mb": rss,
        }

    summaries = [
        run("trl", 0, 30.0, 8000.0),
        run("grpokit", 0, 10.0, 4000.0),
        run("grpokit", 1, 8.0, 3600.0),
        run("trl", 1, 32.0, 9000.0),
        run("trl", 2, 27.0, 8000.0),
        run("grpokit", 2, 9.0, 4400.0),
    ]
    lines = bench_grpo.format_pairs(summaries).splitlines()
    assert lines[3:] == [
        "| 1 | trl then grpokit | 30.000 | 10.000 | 3.00x | 8000 / 4000 (0.50x) |",
        "| 2 | grpokit then trl | 32.000 | 8.000 | 4.00x | 9000 / 3600 (0.40x) |",
        "| 3 | trl then grpokit | 27.000 | 9.000 | 3.00x | 8000 / 4400 (0.55x) |",
        "median speed-up over 3 pairs: 3.00x (range 3.00x-4.00x)",
    ]
    assert bench_grpo.format_pairs(summaries[:2]) == ""  # one pair: the main tables say it all


def test_phase_clock_probes_after_each_cycle_outside_its_time():
    import bench_grpo

    calls = []

    def probe() -> float:
        calls.append(clock.current)  # the cycle has ended when the probe runs
        return 90.0 + len(calls)

    clock = bench_grpo.PhaseClock(probe)
    for _ in range(2):
        clock.start_cycle()
        clock.add("generation", 1.0)
        clock.end_cycle()
    assert calls == [None, None]
    assert [c["probe_gflops"] for c in clock.cycles] == [91.0, 92.0]
    plain = bench_grpo.PhaseClock()
    plain.start_cycle()
    plain.end_cycle()
    assert "probe_gflops" not in plain.cycles[0]


def test_matmul_probe_times_the_shape_the_parent_times_at_the_start():
    import bench_grpo
    import matmul_peak

    m, k, n = bench_grpo.PROBE_SHAPE
    assert (m, k, n) in matmul_peak.SHAPES  # so `probe_start_gflops` exists in every run
    rate = bench_grpo.matmul_probe("fp32", seconds=0.01)()
    assert rate > 0


def test_the_start_probe_is_the_higher_of_two_readings(monkeypatch):
    # A slow moment during the peak sweep (515 GFLOP/s) does not become the start rate when the
    # reading taken after it is higher, nor does a slow second reading replace the sweep's.
    import bench_grpo
    import matmul_peak

    key = "x".join(map(str, bench_grpo.PROBE_SHAPE))
    calls = []

    def now(m, k, n, dtype, seconds):
        calls.append(((m, k, n), dtype, seconds))
        return 1046.0

    monkeypatch.setattr(matmul_peak, "time_matmul", now)
    assert bench_grpo.start_probe({"bf16": {key: 515.0}}, "bf16", 0.3) == 1046.0
    assert calls == [(bench_grpo.PROBE_SHAPE, matmul_peak.DTYPES["bf16"], 0.3)]
    monkeypatch.setattr(matmul_peak, "time_matmul", lambda *a: 500.0)
    assert bench_grpo.start_probe({"fp32": {key: 980.0}}, "fp32", 0.3) == 980.0
    assert bench_grpo.start_probe({"fp32": {"peak": 980.0}}, "fp32", 0.3) is None


def test_bench_report_judges_each_system_at_the_speed_of_its_own_run():
    """The machine multiplied at 100 GFLOP/s at the start; the worker's probes read 40, 50 and
    60 (median 50: 0.5x), so its floor is that of a 50 GFLOP/s peak (the bandwidth as at the
    start)."""
    import bench_grpo

    costs = {
        "prefill": Cost(0, 0),
        "decode": Cost(0, 0),
        "generation": Cost(100e9, 1e6),  # 1 s at 100 GFLOP/s, 2 s at 50
        "logprobs": Cost(0, 0),
        "train_fwd_bwd": Cost(300e9, 1e6),  # 3 s at 100 GFLOP/s, 6 s at 50
        "optimizer": Cost(0, 1e9),  # 1 s at 1 GB/s either way
    }
    floor = {"peak_gflops": 200.0, "probe_start_gflops": 100.0, "bandwidth_gbs": 1.0}
    summary = {
        "system": "grpokit",
        "per_step": {"generation": 4.0, "train_fwd_bwd": 9.0, "optimizer": 1.0},
        "probe_gflops": [60.0, 40.0, 50.0],
    }
    assert bench_grpo.probe_drift(summary, floor) == 0.5
    # peak 200 x 0.5 = 100 GFLOP/s: generation floor 1 s, training 3 s, step 1 + 3 + 1 = 5 s
    line = bench_grpo.format_drift([summary], costs, floor)
    assert line == (
        "- grpokit: `2048x576x1536` products after each measured step at 60, 40, 50 GFLOP/s, "
        "0.50x the start of the run; against the floor at 100 GFLOP/s: generation 4.0x, "
        "train_fwd_bwd 3.0x, step 2.8x"
    )
    assert bench_grpo.format_drift([dict(summary, probe_gflops=[])], costs, floor) == ""
