"""``aaren-rl bench NAME``: run one benchmark, print its table, write its JSON.

Each benchmark is a module ``aaren_rl.bench.NAME`` with ``add_arguments(parser)`` and
``run(args)``; one not written yet is left out of the choices.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "layer": "Aaren vs Transformer stack: fwd+bwd time and peak memory by length; per-token step cost",
    "scan": "the Aaren scan alone (plain vs fused Triton kernel): time and achieved memory bandwidth",
    "step": "acting cost of a whole agent, step by step",
    "train": "training throughput of a whole agent",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"aaren_rl.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"aaren_rl.bench.{name}":
                raise
            continue  # not written yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args) or 0
