"""The ``aaren-rl`` command line: ``collect``, ``train``, ``sweep``, ``evaluate``, ``export``, ``bench``, ``demo``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args)``; this
module only dispatches. ``python -m aaren_rl`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "collect": "collect data with a Stable-Baselines3 or sbx learner and write Minari / D4RL-format datasets",
    "train": "train an agent on an offline dataset",
    "sweep": "train agents x datasets x seeds, compatible runs together as batched groups; resumable",
    "evaluate": "evaluate a checkpoint in a gymnasium environment",
    "export": "export a checkpoint's streaming step as ONNX, to act without PyTorch",
    "bench": "benchmarks: Aaren vs Transformer speed and memory",
    "demo": "the main job: collect, train, evaluate and plot on a quick environment",
}


def add_subcommands(sub, package: str, commands: dict[str, str], run_key: str) -> None:
    """One sub-parser per module ``package.NAME`` (its ``add_arguments`` and ``run``)."""
    for name, help_text in commands.items():
        module = importlib.import_module(f"{package}.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        show_defaults(p)
        p.set_defaults(**{run_key: module.run})


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Add "(default: ...)" to each option's help that does not say its default itself."""
    for action in parser._actions:
        if (not action.option_strings or action.required or action.help in (None, argparse.SUPPRESS)
                or "default" in action.help.lower()):
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            value = "off" if isinstance(action, argparse._StoreTrueAction) else None
        elif isinstance(action.default, (list, tuple)):
            value = " ".join(map(str, action.default)) or "none"
        else:
            value = "none" if action.default is None else action.default
        if value is not None:
            action.help = f"{action.help} (default: {value})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aaren-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_subcommands(sub, "aaren_rl.cli", SUBCOMMANDS, "run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: a message, not a traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SystemExit(f"aaren-rl {args.command}: error: {msg}") from None


if __name__ == "__main__":
    sys.exit(main())
