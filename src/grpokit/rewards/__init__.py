"""Rewards: turning reward functions and reward models into one `[N, K]` tensor, and the
built-in reward functions."""
