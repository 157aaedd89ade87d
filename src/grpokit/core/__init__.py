"""Pure math on tensors: per-token log-probs, group advantages, the policy losses, attention.

Nothing here knows about models' loading, engines, rewards or the training loop.
"""
