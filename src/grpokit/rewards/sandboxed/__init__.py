"""Trusted modules that run inside the sandbox (`grpokit.sandbox`), next to untrusted data.

This folder goes on the sandbox's `sys.path`, so each module here is imported there by its bare
name (`reasoning_gym_verifier`). They may import the standard library and the packages their
reward allows into the sandbox, and nothing from grpokit: grpokit is not importable inside.
"""
