"""Prompts and tasks: prompt formats (plain text or chat messages), chat templates, the
prompt-length policy, and built-in tasks with a held-out split."""
