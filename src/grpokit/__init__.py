"""grpokit: GRPO and its variants for fine-tuning language models."""
__version__ = "0.1.0"
