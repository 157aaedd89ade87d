"""grpokit: GRPO and its variants for fine-tuning language models.

Layers, each importing only from those above it in this list:

- `grpokit.sandbox`: isolated worker processes for model-written code (standard library only);
- `grpokit.core`: pure math on tensors (log-probs, advantages, losses, attention);
- `grpokit.engines`: model loading and generation engines;
- `grpokit.data`: prompt formats and tasks; `grpokit.rewards`: reward plumbing and built-ins;
- `grpokit.train`: the config, the training loop and what it needs;
- `grpokit.app`: run configs, the `grpokit` command, the demo, evaluation, plots.

`grpokit.errors` (the errors a user can fix: config, data, output folder) imports nothing from
grpokit, so every layer raises them.

`GRPOConfig` and `GRPOTrainer` are imported on first use, so that `import grpokit` does not pay
for importing torch and transformers. The one process-wide setting made at import is torch's
huge-page allocation of large CPU tensors (`prefer_huge_pages`), which torch reads only once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpokit.train.config import GRPOConfig
    from grpokit.train.trainer import GRPOTrainer

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "__version__"]


def prefer_huge_pages() -> None:
    """Ask torch's CPU allocator to put tensors of 2 MiB or more on transparent huge pages
    (Linux only): `THP_MEM_ALLOC_ENABLE=1`, unless the variable is already set
    (`THP_MEM_ALLOC_ENABLE=0` before importing grpokit keeps 4 KiB pages).

    Such tensors then start on a 2 MiB boundary and are `madvise(MADV_HUGEPAGE)`d, so a
    training step page-faults its activations and gradients in 2 MiB at a time instead of
    4 KiB, and glibc's heap holds fewer partly used pages: less step time and less peak RSS
    (bench/RESULTS.md). torch reads the variable at its first CPU allocation and never again,
    so this runs when grpokit is imported, before grpokit imports torch; a process that made
    tensors before importing grpokit keeps torch's setting. Child processes inherit it.
    """
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


prefer_huge_pages()

# Module paths of grpokit 0.1's flat layout, still importable: `from grpokit.losses import
# policy_loss` gives the same objects as `from grpokit.core.losses import policy_loss`.
MOVED_MODULES = {
    "grpokit.logprobs": "grpokit.core.logprobs",
    "grpokit.advantages": "grpokit.core.advantages",
    "grpokit.losses": "grpokit.core.losses",
    "grpokit.attention": "grpokit.core.attention",
    "grpokit.models": "grpokit.engines.models",
    "grpokit.vllm_engine": "grpokit.engines.vllm_engine",
    "grpokit.tasks": "grpokit.data.tasks",
    "grpokit.reward_funcs": "grpokit.rewards.builtin",
    "grpokit.config": "grpokit.train.config",
    "grpokit.trainer": "grpokit.train.trainer",
    "grpokit.evaluation": "grpokit.app.evaluation",
    "grpokit.cli": "grpokit.app.cli",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new home (the same module object)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import system overwrites it; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module already ran under its new name; only its own spec is restored."""
        alias = module.__spec__
        if alias is not None and alias.loader_state is not None:
            module.__spec__ = alias.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str) -> Any:
    if name == "GRPOConfig":
        from grpokit.train.config import GRPOConfig

        return GRPOConfig
    if name == "GRPOTrainer":
        from grpokit.train.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
