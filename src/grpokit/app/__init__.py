"""The application: YAML run configs, the `grpokit` command, the demo, evaluation and plots."""
