"""``aaren-rl bench NAME``: run one benchmark, print its table, write its JSON.

Each benchmark is a module ``aaren_rl.bench.NAME`` with ``add_arguments(parser)`` and
``run(args)``. ``aaren-rl bench all`` runs every benchmark that this machine can run (the GPU ones
where CUDA is available) with its defaults.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "layer": "Aaren vs Transformer stack: fwd+bwd time and peak memory by length; per-token step cost",
    "scan": "the Aaren scan alone (plain vs fused Triton kernel): time and achieved memory bandwidth",
    "step": "acting cost of a whole agent, step by step",
    "train": "training throughput of a whole agent",
    "sweep": "many runs as one batched group: aggregate updates/s and memory against one run",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import add_subcommands

    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_subcommands(sub, "aaren_rl.bench", BENCHMARKS, "bench_run")
    p = sub.add_parser("all", help="every benchmark this machine can run, with its defaults")
    p.set_defaults(bench_run=run_all)


GPU_ONLY = {"scan", "train"}


def run_all(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    plan = [("layer", [])] + ([("layer", ["--device", "cuda"])] if cuda else []) + [("step", []), ("sweep", [])]
    plan += [(name, []) for name in ("scan", "train") if cuda]
    if not cuda:
        print(f"no CUDA GPU: skipping {', '.join(sorted(GPU_ONLY))} and the GPU layer benchmark")
    for name, argv in plan:
        module = importlib.import_module(f"aaren_rl.bench.{name}")
        p = argparse.ArgumentParser(prog=f"aaren-rl bench {name}")
        module.add_arguments(p)
        print(f"\n=== aaren-rl bench {name} {' '.join(argv)}".rstrip(), flush=True)
        module.run(p.parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args) or 0
