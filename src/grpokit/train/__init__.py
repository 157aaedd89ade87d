"""The training loop: `GRPOConfig`, `GRPOTrainer`, rollouts, micro-batches, checkpoints, loggers."""
