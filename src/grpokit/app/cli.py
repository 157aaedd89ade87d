"""The `grpokit` command line: argparse, help text and the entry point.

A mistake the user can fix (`grpokit.errors.UserError`: config, data, reward module, LoRA keys,
output folder, full disk, missing checkpoint) is printed as one line `grpokit: error: ...` with
exit code 2; `--debug` also prints its traceback. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any, NoReturn

from grpokit.app.run import _load_everything, run_eval, run_training
from grpokit.app.run_config import (
    SCHEMAS,
    field_defaults,
    field_help,
    fields_by_declaring_class,
    load_config,
    parse_overrides,
)
from grpokit.errors import ConfigError, UserError, output_errors

logger = logging.getLogger("grpokit")


# =================================================================================================
# Help and entry point
# =================================================================================================
def fields_help(defaults: dict[str, Any] | None = None) -> str:
    """Every field of every section with its default and its help text (the field's metadata).

    The training section lists `GRPOConfig`'s fields group by group, in the order of its bases
    (output and model, ..., logging, saving and evaluation, then `TrainerSettings` and the TRL
    fields accepted only at their default), each group under its own heading.
    """
    defaults = defaults or {}
    lines = []
    for section, cls in SCHEMAS.items():
        docs = field_help(cls)
        values = {**field_defaults(cls)}
        given = defaults if section == "run" else defaults.get(section) or {}
        values.update({k: v for k, v in given.items() if k in values})
        title = "run-level fields (top of the YAML)" if section == "run" else f"{section} fields"
        for group, names in fields_by_declaring_class(cls):
            heading = title if group is cls else f"{title}: {_first_line(group.__doc__)}"
            lines.append(f"\n{heading}:")
            for name in names:
                prefix = "" if section == "run" else f"{section}."
                value = values[name]
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


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].rstrip(".") if doc else ""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="grpokit", description="GRPO fine-tuning.", formatter_class=fmt, allow_abbrev=False
    )
    debug = "on an error, also print its traceback"
    parser.add_argument("--debug", action="store_true", help=debug)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = (
        "\noverrides: --field value (flat names: run-level, then training, then eval) or "
        "--section.field value; values are YAML."
    )
    train = sub.add_parser(
        "train",
        parents=[common],
        allow_abbrev=False,
        help="train from a YAML run config",
        formatter_class=fmt,
        description=__doc__,
        epilog=overrides + fields_help(),
    )
    train.add_argument("config", help="YAML run config (e.g. examples/grpo.yaml)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output_dir that verifies (newer ones that do "
        "not are skipped, with the reason), or from the CHECKPOINT directory given",
    )
    train.add_argument(
        "--apply_config_changes",
        action="store_true",
        help="with --resume: apply config changes that alter the optimisation (learning rate, "
        "schedule, batch sizes, loss, ...) from the resumed step instead of refusing them",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run in output_dir (each deleted checkpoint is named)",
    )
    train.add_argument(
        "--num_processes",
        type=int,
        help="train on N processes of this machine: runs `accelerate launch --num_processes N` "
        "on this command (GPUs: one per process; CPUs: gloo)",
    )
    train.add_argument(
        "--accelerate_config",
        help="an accelerate config file for --num_processes (examples/accelerate/*.yaml)",
    )
    ev = sub.add_parser(
        "eval",
        parents=[common],
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
        parents=[common],
        allow_abbrev=False,
        help="GRPO on SmolLM2-135M-Instruct for two-number sums, on a CPU in minutes",
        formatter_class=fmt,
        description=DEMO_DESCRIPTION,
        epilog=overrides + fields_help(DEMO_CONFIG),
    )
    from grpokit.engines.vllm_server import add_arguments as add_vllm_serve_arguments

    add_vllm_serve_arguments(
        sub.add_parser(
            "vllm-serve",
            parents=[common],
            allow_abbrev=False,
            help="serve rollouts with vLLM for training runs with vllm_mode: server",
            description="Run vLLM in this process behind an HTTP API (docs/VLLM_SERVER.md).",
        )
    )
    return parser


_NO_CONFIG = "\0no-config"


def add_import_paths(config: str | None) -> None:
    """Put the current folder, then the config file's folder, first on `sys.path`, so that a
    `module:function` reward written next to either imports (as for `python script.py`)."""
    folders = [os.getcwd()]
    if config is not None:
        folders.append(str(Path(config).resolve().parent))
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `grpokit` command.

    Returns:
        0 on success, 2 for a user error (one line on stderr, no traceback unless `--debug`),
        130 after Ctrl-C (training saves a checkpoint and logs one line on how to resume).
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        first = 1
        while argv[first : first + 1] == ["--debug"]:
            first += 1
        if first < len(argv) and argv[first].startswith("--") and argv[first] != "--help":
            # No config file: stop argparse from taking an override's value for the positional.
            argv.insert(first, _NO_CONFIG)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config", None) == _NO_CONFIG:
        args.config = None
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.command == "vllm-serve" and rest:
        parser.error(f"vllm-serve: unrecognized arguments: {' '.join(rest)}")
    try:
        code = _run_command(args, rest)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"grpokit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # A TrainingInterrupted was already reported in one line (checkpoint, how to resume).
        # Its module is loaded whenever training ran; importing it here could take seconds.
        guards = sys.modules.get("grpokit.train.guards")
        if guards is None or not isinstance(interrupt, guards.TrainingInterrupted):
            print("grpokit: interrupted", file=sys.stderr)
        return 130
    return code or 0


def _run_command(args: argparse.Namespace, rest: list[str]) -> int | None:
    if args.command == "vllm-serve":
        from grpokit.engines.vllm_server import serve

        serve(args)
        return None
    overrides = parse_overrides(rest)
    add_import_paths(args.config if args.command != "demo" else None)
    if args.command == "train" and (args.num_processes is not None or args.accelerate_config):
        from grpokit.app.launch import launch_processes

        return launch_processes(args, rest)
    if args.command == "train":
        spec = load_config(args.config, overrides)
        run_training(
            spec,
            resume=args.resume,
            overwrite=args.overwrite,
            apply_config_changes=args.apply_config_changes,
        )
    elif args.command == "demo":
        from grpokit.app.demo import run_demo

        run_demo(overrides)
    else:
        from grpokit.app.demo import DEMO_CONFIG

        spec = load_config(args.config, overrides, base=None if args.config else DEMO_CONFIG)
        output = Path(args.output) if args.output else None
        if output is not None and not output.parent.is_dir():
            raise ConfigError(
                f"--output {str(output)!r}: folder {str(output.parent)!r} does not exist; "
                "create it or give another path."
            )
        task, model, tokenizer, rewards = _load_everything(spec)
        metrics = run_eval(spec, model, tokenizer, task, rewards)
        print(json.dumps(metrics, indent=2))
        if output is not None:
            with output_errors(output.parent):
                output.write_text(json.dumps(metrics, indent=2))
    return None


def run() -> NoReturn:
    """The `grpokit` command and `python -m grpokit.app.cli`: `main()`, then exit with its
    code. A process that a launcher started (`torchrun`, `accelerate launch`) exits without
    interpreter finalization (`train.distributed.exit_launched_process`)."""
    code = main()
    from grpokit.train.distributed import exit_launched_process

    exit_launched_process(code)
    sys.exit(code)


if __name__ == "__main__":  # `python -m grpokit.app.cli`, as `accelerate launch` runs it
    run()
