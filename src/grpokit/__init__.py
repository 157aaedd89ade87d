"""grpokit: GRPO and its variants for fine-tuning language models."""

from grpokit.config import GRPOConfig
from grpokit.trainer import GRPOTrainer

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "__version__"]
