"""The `grpokit` command line: argparse, help text and the entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

from grpokit.app.run import _load_everything, run_eval, run_training
from grpokit.app.run_config import (
    SCHEMAS,
    ConfigError,
    field_defaults,
    field_help,
    load_config,
    parse_overrides,
)

logger = logging.getLogger("grpokit")


# =================================================================================================
# Help and entry point
# =================================================================================================
def fields_help(defaults: dict[str, Any] | None = None) -> str:
    """Every field of every section with its default and its help text (the field's metadata)."""
    defaults = defaults or {}
    lines = []
    for section, cls in SCHEMAS.items():
        docs = field_help(cls)
        values = {**field_defaults(cls)}
        given = defaults if section == "run" else defaults.get(section) or {}
        values.update({k: v for k, v in given.items() if k in values})
        title = "run-level fields (top of the YAML)" if section == "run" else f"{section} fields"
        lines.append(f"\n{title}:")
        for name, value in values.items():
            prefix = "" if section == "run" else f"{section}."
            shown = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"  --{prefix}{name} (default: {shown})")
            lines.extend(
                textwrap.wrap(
                    docs[name],
                    width=98,
                    initial_indent=" " * 6,
                    subsequent_indent=" " * 6,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="grpokit", description="GRPO fine-tuning.", formatter_class=fmt, allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = (
        "\noverrides: --field value (flat names: run-level, then training, then eval) or "
        "--section.field value; values are YAML."
    )
    train = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train from a YAML run config",
        formatter_class=fmt,
        description=__doc__,
        epilog=overrides + fields_help(),
    )
    train.add_argument("config", help="YAML run config (e.g. examples/grpo.yaml)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="discard an earlier run in output_dir"
    )
    ev = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a model on a task's held-out split",
        formatter_class=fmt,
        description="Score a model (base or trained: --model DIR) on the task's held-out split.",
        epilog=overrides + fields_help(),
    )
    ev.add_argument(
        "config",
        nargs="?",
        help="YAML run config (default: the built-in demo config); give it before any override",
    )
    ev.add_argument("--output", help="also write the metrics as JSON to this file")
    from grpokit.app.demo import DEMO_CONFIG, DEMO_DESCRIPTION

    sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="GRPO on SmolLM2-135M-Instruct for two-number sums, on a CPU in minutes",
        formatter_class=fmt,
        description=DEMO_DESCRIPTION,
        epilog=overrides + fields_help(DEMO_CONFIG),
    )
    return parser


_NO_CONFIG = "\0no-config"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `grpokit` command."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        # No config file: stop argparse from taking an override's value for the positional.
        argv.insert(1, _NO_CONFIG)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config", None) == _NO_CONFIG:
        args.config = None
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        overrides = parse_overrides(rest)
        if args.command == "train":
            spec = load_config(args.config, overrides)
            run_training(spec, resume=args.resume, overwrite=args.overwrite)
        elif args.command == "demo":
            from grpokit.app.demo import run_demo

            run_demo(overrides)
        else:
            from grpokit.app.demo import DEMO_CONFIG

            spec = load_config(args.config, overrides, base=None if args.config else DEMO_CONFIG)
            task, model, tokenizer, rewards = _load_everything(spec)
            metrics = run_eval(spec, model, tokenizer, task, rewards)
            print(json.dumps(metrics, indent=2))
            if args.output:
                Path(args.output).write_text(json.dumps(metrics, indent=2))
    except ConfigError as error:
        print(f"grpokit: error: {error}", file=sys.stderr)
        return 2
    return 0
