"""Compare agents on the same data: train each (agent, dataset, seed), evaluate, print one table.

    python scripts/compare.py --agents decision_aaren decision_transformer \
        --datasets data/hopper/medium.hdf5 data/hopper/medium-replay.hdf5 --env hopper \
        --seeds 0 1 2 --updates 20000 --device cuda --out runs/compare

    python scripts/compare.py --datasets pendulum/medium-expert --env pendulum --seeds 0 1 2 \
        --updates 2000 --eval-episodes 20 --demo-settings --device cpu     # the demo, over seeds

Training runs one after another on ``--device``; evaluation runs on the CPU (the policies act at
batch sizes where the CPU is faster), by the demo's protocol (``aaren_rl.cli.demo.evaluate_run``:
evaluation seeds 10000 + seed, the env preset's first target, the dataset's references), so that a
seed's row equals the demo's. Results: ``OUT/compare.json`` and ``OUT/compare.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aaren_rl.cli import main as cli
from aaren_rl.output import markdown_table, write_json
from aaren_rl.cli.demo import EVAL_SEED, demo_settings, evaluate_run
from aaren_rl.cli.presets import load_preset, resolve_dataset, resolve_env
from aaren_rl.data import load_dataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", nargs="+", default=["decision_aaren", "decision_transformer"],
                   help="agent presets (default: decision_aaren decision_transformer)")
    p.add_argument("--datasets", nargs="+", help="dataset sources, as `aaren-rl train` takes them (required)")
    p.add_argument("--env", help="env preset (its first target return; references where the dataset has none) "
                                 "(required)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default: 0)")
    p.add_argument("--updates", type=int, default=20_000, help="updates per run (default: 20000)")
    p.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per run (default: 10)")
    p.add_argument("--device", default="auto", help="training device (default: auto)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, as the demo)")
    p.add_argument("--demo-settings", action="store_true",
                   help="train with the demo's settings (aaren_rl/cli/demo.py: width 64, lr 1e-3, ...)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--set", nargs="+", default=[], help="preset overrides for every agent (SECTION.KEY=VALUE), "
                                                        "after --demo-settings (default: none)")
    p.add_argument("--table-from", metavar="COMPARE.json", nargs="+", default=None,
                   help="print the table of saved compare.json files (their rows pooled) and stop "
                        "(default: train and evaluate)")
    p.add_argument("--json", default=None, help="with --table-from: also write the pooled rows to this file "
                                                "(default: none)")
    args = p.parse_args(argv)
    if not args.table_from and not (args.datasets and args.env):
        p.error("--datasets and --env are required (unless --table-from)")
    return args


def label(row: dict) -> str:
    """The agent of a row, with the ``--set`` overrides it was trained with (if any)."""
    return " ".join([row["agent"], *row.get("set", [])])


def table(rows: list[dict]) -> str:
    """One row per (dataset, agent and its ``--set`` overrides) in the order first seen: the mean ± std over seeds."""
    out = []
    for dataset, agent in dict.fromkeys((r["dataset"], label(r)) for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset and label(r) == agent]
        sc = np.array([r["normalized_score_mean"] for r in rs])
        out.append([dataset, agent, f"{sc.mean():.1f} ± {sc.std():.1f} (n={len(rs)})",
                    f"{np.mean([r['return_mean'] for r in rs]):.0f}",
                    f"{np.mean([r['policy_ms_per_step'] for r in rs]):.2f}",
                    f"{np.mean([r['train_seconds'] for r in rs]):.0f}"])
    header = ["dataset", "agent", "normalized score (mean ± std over seeds)", "return", "policy ms/step", "train s"]
    return markdown_table(header, out, "l" * 6)


def agent_overrides(agent: str, args) -> list[str]:
    """``--set`` items for one agent: the demo's settings (if asked for), then ``--set``."""
    items = []
    if args.demo_settings:
        model_kw, train_kw = demo_settings(load_preset("agents", agent).get("model", {}).get("context", "window"))
        items += [f"model.{k}={v!r}" for k, v in model_kw.items()] + [f"train.{k}={v!r}" for k, v in train_kw.items()]
    return items + list(args.set)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _set_from_command(command: str) -> list[str]:
    """The ``--set`` items of a saved command line (they are its last option's values)."""
    words = command.split()
    if "--set" not in words:
        return []
    rest = words[words.index("--set") + 1:]
    return rest[:next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_from:
        import json

        rows = []
        for path in args.table_from:
            try:
                saved = json.loads(Path(path).read_text())
                for row in saved["rows"]:  # files written before rows carried their overrides
                    row.setdefault("set", saved.get("set", _set_from_command(saved.get("command", ""))))
                rows += saved["rows"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                sys.exit(f"error: cannot read {path}: {e}")
        print(table(rows))
        if args.json:
            write_json(args.json, {"sources": args.table_from, "rows": rows})
        return 0
    env = resolve_env(args.env)
    target = float(env["target_returns"][0])
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    meta = {"env": env["env_id"], "target_return": target, "updates": args.updates, "device": args.device,
            "machine": machine(), "eval_seed": f"{EVAL_SEED} + seed", "command": " ".join(sys.argv),
            "set": list(args.set),
            # what --demo-settings meant when this ran (the demo's settings change between versions)
            "demo_settings": {agent: agent_overrides(agent, args) for agent in args.agents} if args.demo_settings else None}
    rows = []
    for source in args.datasets:
        ds = load_dataset(resolve_dataset(source), env_id=env["env_id"])
        ref_min = ds.ref_min_score if ds.ref_min_score is not None else env["ref_min"]
        ref_max = ds.ref_max_score if ds.ref_max_score is not None else env["ref_max"]
        for agent in args.agents:
            overrides = agent_overrides(agent, args)
            for seed in args.seeds:
                run = out / f"{Path(source).stem}-{agent}-s{seed}"
                t0 = time.perf_counter()
                cli(["train", "--agent", agent, "--dataset", source, "--env", args.env, "--updates", str(args.updates),
                     "--seed", str(seed), "--device", args.device, "--eval-every", "0", "--eval-episodes", "0",
                     "--checkpoint-every", str(args.updates), "--logdir", str(run), "--no-progress",
                     "--threads", str(args.threads), *(["--set", *overrides] if overrides else [])])
                train_s = time.perf_counter() - t0
                res = evaluate_run(run, env["env_id"], target, args.eval_episodes, seed, ref_min, ref_max)
                row = {"dataset": Path(source).stem, "agent": agent, "set": list(args.set), "seed": seed,
                       "train_seconds": train_s,
                       **{k: v for k, v in res.items() if k not in ("returns", "lengths")}}
                rows.append(row)
                write_json(out / "compare.json", {**meta, "rows": rows})
                print(f"{row['dataset']:>20} {agent:>28} seed {seed}: score {row['normalized_score_mean']:.1f} "
                      f"(return {row['return_mean']:.0f}), {row['policy_ms_per_step']:.2f} ms/step, train {train_s:.0f} s",
                      flush=True)
    text = table(rows)
    print("\n" + text)
    write_json(out / "compare.json", {**meta, "rows": rows})
    (out / "compare.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
