"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# The shared helpers assert too: show their failures as pytest shows a test's.
pytest.register_assert_rewrite("tests.tiny")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a `bf16_kernels` test on a CPU without native bf16. Such a test fakes a bf16 CPU's
    device rules (bf16 sampler copy, packed bf16 weights, the written-out decode step), and
    oneDNN builds no bf16 product kernels without avx512_bf16/amx_bf16 ("could not create a
    primitive descriptor"); grpokit itself never takes those paths there (`engines.device`)."""
    if item.get_closest_marker("bf16_kernels") is None:
        return
    from grpokit.engines.models import cpu_bf16

    verdict = cpu_bf16()
    if not verdict.native:
        pytest.skip(f"needs a CPU with native bf16 for oneDNN's bf16 products ({verdict.reason})")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the module: tiny models are dominated by per-op overhead, and
    on a 2-core machine that is busy elsewhere two OpenMP threads wait on each other at every op
    (seen: ~100x slower generation), while one thread costs a tiny model nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_field_types() -> Iterator[None]:
    """transformers' HfArgumentParser overwrites each `Field.type` of the dataclasses it parses
    with the one type it parses; put GRPOConfig's back so later tests see the declared types."""
    import dataclasses

    from grpokit import GRPOConfig

    saved = {f.name: f.type for f in dataclasses.fields(GRPOConfig)}
    yield
    for f in dataclasses.fields(GRPOConfig):
        f.type = saved[f.name]
