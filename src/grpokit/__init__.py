"""grpokit: GRPO and its variants for fine-tuning language models.

`GRPOConfig` and `GRPOTrainer` are imported on first use, so that `import grpokit` (and the
command line's config validation) does not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpokit.config import GRPOConfig
    from grpokit.trainer import GRPOTrainer

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "GRPOConfig":
        from grpokit.config import GRPOConfig

        return GRPOConfig
    if name == "GRPOTrainer":
        from grpokit.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
