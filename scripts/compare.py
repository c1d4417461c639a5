"""Compare agents on the same data: train each (agent, dataset, seed), evaluate, print one table.

    python scripts/compare.py --agents decision_aaren decision_transformer \
        --datasets data/hopper/medium.hdf5 data/hopper/medium-replay.hdf5 --env hopper \
        --seeds 0 1 2 --updates 20000 --device cuda --out runs/compare

Training runs one after another on ``--device``; evaluation runs on the CPU (the policies act at
batch sizes where the CPU is faster). Results: ``OUT/compare.json`` and ``OUT/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from aaren_rl.checkpoint import load_checkpoint
from aaren_rl.cli import main as cli
from aaren_rl.output import write_json
from aaren_rl.cli.presets import resolve_env
from aaren_rl.evaluate import evaluate_policy
from aaren_rl.policy import StreamingPolicy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", nargs="+", default=["decision_aaren", "decision_transformer"])
    p.add_argument("--datasets", nargs="+", required=True, help="dataset sources, as `aaren-rl train` takes them")
    p.add_argument("--env", required=True, help="env preset or gymnasium id (targets, references)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--updates", type=int, default=20_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--set", nargs="+", default=[], help="preset overrides for every agent (SECTION.KEY=VALUE)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = resolve_env(args.env)
    target = float(env["target_returns"][0])
    out = Path(args.out)
    rows = []
    for source in args.datasets:
        for agent in args.agents:
            for seed in args.seeds:
                run = out / f"{Path(source).stem}-{agent}-s{seed}"
                t0 = time.perf_counter()
                cli(["train", "--agent", agent, "--dataset", source, "--env", args.env, "--updates", str(args.updates),
                     "--seed", str(seed), "--device", args.device, "--eval-every", "0", "--eval-episodes", "0",
                     "--checkpoint-every", str(args.updates), "--logdir", str(run), "--no-progress",
                     *(["--set", *args.set] if args.set else [])])
                train_s = time.perf_counter() - t0
                model, info = load_checkpoint(run, device="cpu")
                res = evaluate_policy(StreamingPolicy(model, target), env["env_id"], args.eval_episodes, seed=1000 + seed,
                                      ref_min_score=env["ref_min"] or info["dataset"]["ref_min_score"],
                                      ref_max_score=env["ref_max"] or info["dataset"]["ref_max_score"])
                row = {"dataset": Path(source).stem, "agent": agent, "seed": seed, "train_seconds": train_s,
                       **{k: v for k, v in res.items() if k not in ("returns", "lengths")}}
                rows.append(row)
                write_json(out / "compare.json", {"env": env["env_id"], "target_return": target, "rows": rows})
                print(f"{row['dataset']:>20} {agent:>28} seed {seed}: score {row['normalized_score_mean']:.1f} "
                      f"(return {row['return_mean']:.0f}), {row['policy_ms_per_step']:.2f} ms/step, train {train_s:.0f} s",
                      flush=True)
    lines = ["| dataset | agent | normalized score (mean ± std over seeds) | return | policy ms/step | train s |",
             "|---|---|---|---|---|---|"]
    for source in args.datasets:
        for agent in args.agents:
            rs = [r for r in rows if r["dataset"] == Path(source).stem and r["agent"] == agent]
            sc = np.array([r["normalized_score_mean"] for r in rs])
            lines.append(f"| {Path(source).stem} | {agent} | {sc.mean():.1f} ± {sc.std():.1f} (n={len(rs)}) | "
                         f"{np.mean([r['return_mean'] for r in rs]):.0f} | "
                         f"{np.mean([r['policy_ms_per_step'] for r in rs]):.2f} | {np.mean([r['train_seconds'] for r in rs]):.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    write_json(out / "compare.json", {"env": env["env_id"], "target_return": target, "updates": args.updates,
                                             "device": machine, "rows": rows})
    (out / "compare.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
