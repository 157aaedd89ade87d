"""The device rules (`engines.device`) on a faked CUDA GPU and on the CPU: on a GPU none of the CPU
speed-ups is applied (packed oneDNN weights, grouped attention, intra-op threads,
`retain_freed_memory`), bf16 autocast and the bf16 sampler copy follow the GPU's native bf16, and
TF32 follows its compute capability; on the CPU everything stays as it was.

No test here needs a GPU: `fake_cuda` makes torch report one (availability, compute capability,
bf16 support), and each test checks a decision, never a CUDA kernel. bench/gpu_check.py runs the
same checks on a real GPU."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.core import attention
from grpokit.engines import device as device_module
from grpokit.engines import models, transformers_engine
from grpokit.engines.base import SamplingParams
from grpokit.engines.device import (
    CPU_FLOAT32_FORWARD_TOKENS,
    CPU_KEPT_ACTIVATION_SIZE,
    CPU_MAX_FORWARD_TOKENS,
    DeviceTraits,
    device_traits,
    fork_rng,
    synchronize,
)
from grpokit.engines.models import bf16_supported, cpu_bf16
from grpokit.engines.packed_linear import PackedLinear
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.train import build, host_memory
from grpokit.train import trainer as trainer_module
from tests.tiny import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

AMPERE, TURING = (8, 0), (7, 5)
CPU_ONLY_RULES = ("pack_sampler_weights", "grouped_attention", "retain_freed_memory")


@pytest.fixture(autouse=True)
def fresh_bf16_probe() -> Iterator[None]:
    """`bf16_supported` caches its answer per device type; each test sees its own devices."""
    bf16_supported.cache_clear()
    yield
    bf16_supported.cache_clear()


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = AMPERE) -> None:
    """Make torch report one CUDA GPU of `capability`. torch's own `is_bf16_supported()` counts
    emulated bf16 (True on any GPU), `including_emulation=False` only compute capability >= 8,
    as torch does on a real GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or capability[0] >= 8,
    )
    monkeypatch.setattr(torch.version, "hip", None)


def cpu_with_native_bf16() -> DeviceTraits:
    """This CPU's rules, as on a CPU with avx512_bf16 (whatever this one has)."""
    return dataclasses.replace(device_traits("cpu"), native_bf16=True)


# ---- the rules --------------------------------------------------------------------------------
def test_cpu_rules() -> None:
    traits = device_traits(torch.device("cpu"))
    assert traits.type == "cpu"
    assert all(getattr(traits, rule) for rule in (*CPU_ONLY_RULES, "intra_op_threads"))
    assert traits.tf32 is False  # no TF32 on a CPU
    assert traits.native_bf16 is bf16_supported("cpu")  # the /proc/cpuinfo verdict, less caps
    assert traits.bf16_reason == cpu_bf16().reason
    assert traits.sampler_dtype == (torch.bfloat16 if traits.native_bf16 else None)
    assert traits.max_forward_tokens == CPU_MAX_FORWARD_TOKENS == 512
    assert traits.float32_forward_tokens == CPU_FLOAT32_FORWARD_TOKENS == 768
    assert traits.recompute_activations is traits.native_bf16  # under bf16 autocast
    assert traits.activation_bound(bf16=False) == (768, False)  # float32: never AMX
    # SmolLM2-135M (30 layers, hidden 576, MLP 1536) keeps the activations of 1024 tokens
    assert traits.kept_activation_size == CPU_KEPT_ACTIVATION_SIZE == 1024 * 30 * (576 + 1536)


AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX512_BF16_CPUINFO = AMX_CPUINFO.replace(" amx_bf16 amx_tile", "")


@pytest.mark.parametrize(
    ("cpuinfo", "environ", "recompute"),
    [
        (AMX_CPUINFO, {}, True),
        (AMX_CPUINFO, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        (AMX_CPUINFO, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, True),
        (AMX_CPUINFO, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),  # AMX capped
        (AMX_CPUINFO, {"DNNL_MAX_CPU_ISA": "AVX10_1_512"}, True),
        (AMX_CPUINFO, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # no native bf16 at all
        (AMX_CPUINFO, {"ATEN_CPU_CAPABILITY": "avx2"}, False),
        (AVX512_BF16_CPUINFO, {}, True),  # native bf16 without AMX
        (AVX512_BF16_CPUINFO, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ("", {}, False),  # no /proc/cpuinfo
    ],
)
def test_auto_recomputes_activations_on_a_cpu_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cpuinfo: str,
    environ: dict[str, str],
    recompute: bool,
) -> None:
    # max_forward_tokens="auto" under bf16 autocast: no token bound and recomputed activations
    # where the CPU computes bf16 natively (with AMX or without), else 512-token forwards; in
    # float32 always 768 tokens.
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    monkeypatch.setattr(models, "CPUINFO", path)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    traits = device_traits("cpu")
    assert traits.recompute_activations is recompute
    assert traits.max_forward_tokens == 512
    assert traits.activation_bound(bf16=True) == ((None, True) if recompute else (512, False))
    assert traits.activation_bound(bf16=False) == (768, False)


def test_a_gpu_never_recomputes_for_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(AMX_CPUINFO)  # the host CPU has AMX: it does not decide for the GPU
    monkeypatch.setattr(models, "CPUINFO", path)
    fake_cuda(monkeypatch, AMPERE)
    traits = device_traits("cuda")
    assert traits.recompute_activations is False
    assert traits.activation_bound(bf16=True) == (None, False)
    assert traits.activation_bound(bf16=False) == (None, False)
    assert traits.kept_activation_size is None


def test_an_ampere_gpu_gets_bf16_and_tf32_and_no_cpu_speed_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cuda(monkeypatch, AMPERE)
    traits = device_traits("cuda:0")
    assert traits.type == "cuda"
    assert not any(getattr(traits, rule) for rule in (*CPU_ONLY_RULES, "intra_op_threads"))
    assert traits.native_bf16 is True and traits.tf32 is True
    assert traits.bf16_reason == "CUDA compute capability 8.0"
    assert traits.sampler_dtype == torch.bfloat16
    assert traits.max_forward_tokens is None  # max_forward_tokens="auto": no bound on a GPU
    assert device_traits() == traits  # the default device is the GPU when there is one


def test_a_gpu_that_only_emulates_bf16_stays_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # A T4 (compute capability 7.5): torch.cuda.is_bf16_supported() says True (emulation), but
    # emulated bf16 is slower than float32, so neither autocast nor a bf16 sampler copy.
    fake_cuda(monkeypatch, TURING)
    assert torch.cuda.is_bf16_supported() is True
    traits = device_traits("cuda")
    assert traits.native_bf16 is False and traits.sampler_dtype is None
    assert traits.tf32 is False
    assert not any(getattr(traits, rule) for rule in CPU_ONLY_RULES)


def test_use_cpu_on_a_gpu_host_keeps_the_cpu_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_before = device_traits("cpu")
    bf16_supported.cache_clear()
    fake_cuda(monkeypatch, AMPERE)
    assert device_traits("cpu") == cpu_before  # the GPU's bf16 does not leak into CPU rules


def test_meta_and_other_devices_get_no_cpu_speed_up() -> None:
    traits = device_traits("meta")
    assert not any(getattr(traits, rule) for rule in (*CPU_ONLY_RULES, "intra_op_threads"))
    assert traits.native_bf16 is False and traits.tf32 is False


def test_autocast_is_bf16_on_the_device_type_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, AMPERE)
    cuda = device_traits("cuda").autocast(True)
    assert isinstance(cuda, torch.autocast)
    assert (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)
    cpu = device_traits("cpu").autocast(True)
    assert isinstance(cpu, torch.autocast)
    assert (cpu.device, cpu.fast_dtype) == ("cpu", torch.bfloat16)
    assert isinstance(device_traits("cuda").autocast(False), contextlib.nullcontext)


def test_autocast_keeps_no_cast_cache_for_recomputed_forwards() -> None:
    # A recomputing training forward: no cache of weight casts (DeviceTraits.autocast); the
    # weights' bf16 casts are the same either way.
    traits = device_traits("cpu")
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4)
    outs = {}
    for recompute in (False, True):
        with traits.autocast(True, recompute=recompute):
            assert torch.is_autocast_cache_enabled() is (not recompute)
            outs[recompute] = x @ weight
    assert outs[True].dtype == outs[False].dtype == torch.bfloat16
    assert torch.equal(outs[True], outs[False])


# ---- precision and TF32 -----------------------------------------------------------------------
@pytest.mark.parametrize(("capability", "expected"), [(AMPERE, True), (TURING, False)])
def test_precision_on_a_gpu_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: bool
) -> None:
    fake_cuda(monkeypatch, capability)
    assert build.resolve_precision(GRPOConfig(), torch.device("cuda")) is expected  # bf16=None
    assert build.resolve_precision(GRPOConfig(bf16=True), "cuda:0") is expected
    assert build.resolve_precision(GRPOConfig(bf16=False), "cuda") is False


def _no_seeding(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(transformers, "set_seed", lambda seed: None)  # would seed the fake GPU


def test_tf32_is_set_on_an_ampere_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, AMPERE)
    _no_seeding(monkeypatch)
    calls: list[bool] = []
    monkeypatch.setattr(build, "set_tf32", calls.append)
    build.apply_process_settings(GRPOConfig(tf32=True))
    build.apply_process_settings(GRPOConfig(tf32=False))
    build.apply_process_settings(GRPOConfig(tf32=None))  # None leaves torch's setting
    assert calls == [True, False]


def test_tf32_true_is_refused_on_an_older_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, TURING)
    _no_seeding(monkeypatch)
    calls: list[bool] = []
    monkeypatch.setattr(build, "set_tf32", calls.append)
    with pytest.raises(ValueError, match="tf32=True needs a CUDA GPU"):
        build.apply_process_settings(GRPOConfig(tf32=True))
    build.apply_process_settings(GRPOConfig(tf32=False))  # nothing to turn off
    assert calls == []


def test_fp16_is_refused_with_the_reason_and_the_alternatives() -> None:
    with pytest.raises(ValueError, match="fp16=True is not supported") as error:
        GRPOConfig(fp16=True, bf16=False)
    assert "GradScaler" in str(error.value) and "bf16=False" in str(error.value)


# ---- attention --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "grouped"), [("cpu", True), ("cuda", False)])
def test_attention_auto_is_grouped_only_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, kind: str, grouped: bool
) -> None:
    fake_cuda(monkeypatch)
    model = make_causal_lm(make_tokenizer())
    before = model.config._attn_implementation
    build.set_attention(model, "auto", torch.device(kind))
    expected = attention.NAME if grouped else before
    assert model.config._attn_implementation == expected


# ---- the generation engine --------------------------------------------------------------------
def _engine_on(
    monkeypatch: pytest.MonkeyPatch, traits: DeviceTraits, **kwargs: Any
) -> TransformersEngine:
    """An engine that takes the policy (really on the CPU) to be on a device with `traits`."""
    monkeypatch.setattr(transformers_engine, "device_traits", lambda device: traits)
    tok = make_tokenizer()
    return TransformersEngine(make_causal_lm(tok), tok, **kwargs)


def _cuda(capability: tuple[int, int] = AMPERE) -> DeviceTraits:
    """The rules of a GPU of `capability` (torch is faked only while they are worked out)."""
    with pytest.MonkeyPatch.context() as patch:
        fake_cuda(patch, capability)
        traits = device_traits("cuda")
    bf16_supported.cache_clear()
    return traits


def _generate(engine: TransformersEngine) -> None:
    greedy = SamplingParams(top_k=1)
    engine.generate([[5, 6, 7]], num_generations=2, max_new_tokens=3, sampling=greedy)


def _sampler_state(engine: TransformersEngine) -> tuple[bool, set[torch.dtype], int, str]:
    sampler = engine.sampler_model
    return (
        sampler is not engine.model,  # a separate copy
        {p.dtype for p in sampler.parameters()},
        sum(isinstance(m, PackedLinear) for m in sampler.modules()),
        sampler.config._attn_implementation,
    )


def test_engine_on_an_ampere_gpu_copies_to_bf16_and_nothing_cpu_specific(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _engine_on(monkeypatch, _cuda(), num_threads=1)
    copy, dtypes, packed, impl = _sampler_state(engine)
    assert copy and dtypes == {torch.bfloat16}  # bf16 sampler copy on a bf16 GPU
    assert packed == 0 and engine._packed == []  # no oneDNN layout
    assert impl == engine.model.config._attn_implementation != attention.NAME  # its own
    assert engine.decode_step is None  # transformers' forward: the step needs the packed copy
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _generate(engine)
    assert calls == []  # num_threads is a CPU setting


def test_engine_on_an_older_gpu_samples_from_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine_on(monkeypatch, _cuda(TURING))
    assert engine.sampler_model is engine.model  # no bf16 copy where bf16 is emulated
    assert engine._packed == []
    assert engine._decode_packs is None  # the float32 policy is not packed on a GPU either


@pytest.mark.parametrize("capability", [AMPERE, TURING])
def test_engine_refuses_packing_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]
) -> None:
    # With a bf16 copy (Ampere) or a float32 policy sampling itself (Turing): never on a GPU.
    with pytest.raises(ValueError, match="on cuda"):
        _engine_on(monkeypatch, _cuda(capability), pack_weights=True)


def test_engine_on_a_cpu_without_bf16_packs_the_float32_policy_while_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    traits = dataclasses.replace(device_traits("cpu"), native_bf16=False)
    engine = _engine_on(monkeypatch, traits)
    assert engine.sampler_model is engine.model and engine._packed == []  # no bf16 copy
    assert engine._decode_packs is not None
    assert engine.decode_step is None  # written for the bf16 copy's fused products only
    linear = [m for m in engine.model.modules() if type(m) is torch.nn.Linear]
    assert [layer.module for layer in engine._decode_packs.layers] == linear  # every one
    # The packed forwards are installed by the sampling call only: inside it, never after it.
    seen: list[bool] = []
    real_forward = transformers_engine.plain_forward

    def spy(model: Any) -> Any:
        seen.append(all("forward" in m.__dict__ for m in linear))
        return real_forward(model)

    monkeypatch.setattr(transformers_engine, "plain_forward", spy)
    _generate(engine)
    assert seen == [True]
    assert not any("forward" in m.__dict__ for m in linear)
    # pack_weights=False: the policy decodes with its own weights.
    assert _engine_on(monkeypatch, traits, pack_weights=False)._decode_packs is None


@pytest.mark.bf16_kernels
def test_engine_on_a_bf16_cpu_keeps_its_cpu_speed_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine_on(monkeypatch, cpu_with_native_bf16(), num_threads=1)
    copy, dtypes, packed, impl = _sampler_state(engine)
    assert copy and dtypes == {torch.bfloat16}
    if torch.backends.mkldnn.is_available():
        linear = sum(type(m) is torch.nn.Linear for m in engine.model.modules())
        assert packed == len(engine._packed) == linear > 0  # every linear layer packed
        assert engine.decode_step is not None  # the written-out Llama step
    assert impl == attention.NAME
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    _generate(engine)
    assert calls == [1, before]  # set for generation, then restored


def test_engine_on_a_cpu_without_onednn_samples_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    engine = _engine_on(monkeypatch, cpu_with_native_bf16())  # pack_weights=None: no error
    assert engine._packed == [] and _sampler_state(engine)[2] == 0
    assert engine.decode_step is None  # no fused packed products to multiply by
    with pytest.raises(ValueError, match="on cpu"):
        _engine_on(monkeypatch, cpu_with_native_bf16(), pack_weights=True)


def test_engine_default_follows_the_policy_device_not_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # use_cpu=True on a host with a bf16 GPU: the policy is on the CPU, so the CPU decides.
    fake_cuda(monkeypatch, AMPERE)
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok)
    assert engine.traits == device_traits("cpu")
    assert (engine.sampler_model is not engine.model) is device_traits("cpu").native_bf16


# ---- the trainer ------------------------------------------------------------------------------
PROMPTS = [{"prompt": p} for p in ("ab", "cd")]


def _trainer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, traits: DeviceTraits, **overrides: Any
) -> tuple[GRPOTrainer, list[str]]:
    """A trainer (really on the CPU) that takes its device to have `traits`; returns it and the
    process-wide settings it applied."""
    from datasets import Dataset

    applied: list[str] = []
    monkeypatch.setattr(trainer_module, "device_traits", lambda device: traits)
    monkeypatch.setattr(
        host_memory, "retain_freed_memory", lambda: applied.append("retain") or True
    )
    monkeypatch.setattr(host_memory, "log_huge_pages", lambda: applied.append("huge pages"))
    tok = make_tokenizer()
    config = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=3,
        max_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
    )
    config.update(overrides)
    trainer = GRPOTrainer(
        make_causal_lm(tok),
        lambda completions, **kw: [float(len(c)) for c in completions],
        args=GRPOConfig(**config),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=tok,
    )
    return trainer, applied


def test_trainer_on_a_gpu_leaves_the_allocator_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trainer, applied = _trainer(monkeypatch, tmp_path, _cuda())
    assert applied == []  # retain_freed_memory is on by default, and a CPU setting
    trainer.use_bf16 = True
    with warnings.catch_warnings():  # torch warns that it has no CUDA to autocast on
        warnings.simplefilter("ignore", UserWarning)
        context = trainer.autocast()
    assert isinstance(context, torch.autocast)
    assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)


def test_trainer_on_the_cpu_retains_freed_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On the CPU the trainer keeps freed memory (unless told not to) and says whether torch put
    large tensors on huge pages (`host_memory.log_huge_pages`)."""
    _, applied = _trainer(monkeypatch, tmp_path, device_traits("cpu"))
    assert applied == ["retain", "huge pages"]
    _, applied = _trainer(monkeypatch, tmp_path, device_traits("cpu"), retain_freed_memory=False)
    assert applied == ["huge pages"]


@pytest.mark.parametrize(
    ("traits", "retain", "release", "expected"),
    [
        # per step: before generation, before each of the 2 micro-batches, before the optimizer
        ("cpu", True, True, ["release"] * 4 * 2),
        ("cpu", True, False, []),  # the default: glibc keeps what it freed
        ("cpu", False, True, []),
        ("cuda", True, True, []),
    ],
)
def test_trainer_releases_kept_memory_between_phases_when_asked(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    traits: str,
    retain: bool,
    release: bool,
    expected: list[str],
) -> None:
    """Where glibc keeps freed memory (the CPU, `retain_freed_memory`) and
    `release_freed_memory` asks for it, the trainer hands it back before each phase:
    generation, each training micro-batch, the optimizer step."""
    on = device_traits("cpu") if traits == "cpu" else _cuda()
    trainer, applied = _trainer(
        monkeypatch,
        tmp_path,
        on,
        retain_freed_memory=retain,
        release_freed_memory=release,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=2,
        max_steps=2,
    )
    applied.clear()
    released: list[str] = []
    monkeypatch.setattr(
        host_memory, "release_freed_memory", lambda: released.append("release") or True
    )
    trainer.device_traits = device_traits("cpu")  # the rule was read at construction
    trainer.skip_zero_advantage = False  # the reward is constant: keep the rows to train
    trainer.train()
    assert released == expected


# ---- which device ------------------------------------------------------------------------------
def test_the_training_device_as_transformers_picks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpokit.train.distributed import World

    assert World().device(use_cpu=False) == torch.device("cpu")  # no GPU here
    fake_cuda(monkeypatch)
    assert World().device(use_cpu=False) == torch.device("cuda")
    assert World().device(use_cpu=True) == torch.device("cpu")
    # One of several processes (the config's view, before accelerate joins them): its GPU.
    assert World(4, 3, 1).device(use_cpu=False) == torch.device("cuda", 1)
    assert World(4, 3, 1).device(use_cpu=True) == torch.device("cpu")


def test_the_config_reports_the_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    config = GRPOConfig(output_dir="unused", num_generations=2, per_device_train_batch_size=2)
    assert (config.device, config.n_gpu) == (torch.device("cuda", 1), 1)
    config.use_cpu = True
    assert (config.device, config.n_gpu) == (torch.device("cpu"), 0)


# ---- random state and timing ------------------------------------------------------------------
def test_fork_rng_covers_every_cuda_device_once_cuda_is_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[list[int], str | None]] = []

    @contextlib.contextmanager
    def record(
        devices: Any = None, device_type: str | None = None, **kwargs: Any
    ) -> Iterator[None]:
        seen.append((list(devices), device_type))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with fork_rng():
        pass
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with fork_rng():
        pass
    # Never started: the CPU generator alone (forking CUDA's would start CUDA); in use: both GPUs
    # (torch.manual_seed reseeds every one).
    assert seen == [([], "cuda"), ([0, 1], "cuda")]


def test_fork_rng_restores_the_cpu_generator() -> None:
    before = torch.get_rng_state()
    with fork_rng():
        torch.manual_seed(123)
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)


def test_synchronize_waits_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", calls.append)
    synchronize("cpu")
    synchronize(torch.device("meta"))
    synchronize("cuda:1")
    assert calls == [torch.device("cuda:1")]


def test_model_device_reads_the_first_parameter() -> None:
    assert device_module.model_device(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    assert device_module.model_device(torch.nn.ReLU()) == torch.device("cpu")
