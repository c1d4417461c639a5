"""Train and evaluate agents on the memory task (aaren_rl.memory), one JSON per run under
benchmarks/results/memory/: ``python scripts/memory_runs.py --data data/memory --distance 50``.

Every agent gets the same budget: the same updates, about the same timesteps per batch (windows
or segments of K = 20 steps x 40, or 16 whole episodes), the same width and optimizer; each run is
evaluated once at the end on the same episodes (seeds 20000 + i), conditioned on the expert's
return, and its success rate is reported by cue distance next to the expert's and chance's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from aaren_rl.cli import main as cli
from aaren_rl.memory import env_id
from aaren_rl.output import markdown_table, write_json

AGENTS = {  # agent preset: the batch (episodes or windows) that holds about 800 timesteps
    "decision_transformer": 40, "decision_transformer_episode": 16,
    "decision_aaren": 40, "decision_aaren_episode": 16, "decision_aaren_segment": 40,
}
SETTINGS = ["model.embed_dim=64", "model.return_scale=1.0", "train.learning_rate=1e-3", "train.warmup_steps=200",
            "train.log_every=50"]
EVAL_SEED = 20_000

def table(rows: list[dict]) -> str:
    """Mean ± std over seeds of each agent's success by cue distance, with the expert and chance."""
    import numpy as np

    ds = list(rows[0]["success_rate"])
    out = []
    for agent in dict.fromkeys(r["agent"] for r in rows):
        rs = [r for r in rows if r["agent"] == agent]
        cell = lambda d: f"{np.mean([r['success_rate'][d] for r in rs]):.2f} ± {np.std([r['success_rate'][d] for r in rs]):.2f}"
        out.append([agent, rs[0]["mode"], len(rs)] + [cell(d) for d in ds])
    for name, key in (("expert (scripted)", "expert_success"), ("chance (random)", "chance_success")):
        out.append([name, "-", "-"] + [f"{rows[0][key][str(d)] if str(d) in rows[0][key] else rows[0][key][d]:.2f}"
                                       for d in ds])
    return markdown_table(["agent", "acts", "seeds"] + [f"success at distance >= {d}" for d in ds], out,
                          "llr" + "r" * len(ds))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/memory", help="where scripts/memory_data.py wrote (default: data/memory)")
    p.add_argument("--distance", type=int, default=50, help="cue distance of the task (default: 50)")
    p.add_argument("--tier", default="medium-expert", help="dataset tier (default: medium-expert)")
    p.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS), help="agents (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--updates", type=int, default=2000, help="updates per run (default: 2000)")
    p.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes (default: 20)")
    p.add_argument("--out", default="runs/memory", help="run folders (default: runs/memory)")
    p.add_argument("--results", default="benchmarks/results/memory", help="per-run JSON (default: benchmarks/results/memory)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--table-from", nargs="+", metavar="RUN.json", default=None,
                   help="print the table of saved per-run JSON files and stop (default: train and evaluate)")
    args = p.parse_args()
    if args.table_from:
        try:
            saved = [json.loads(Path(f).read_text()) for f in args.table_from]
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read a run file: {e}")
        print(table(saved))
        sys.exit(0)
    from aaren_rl.checkpoint import load_checkpoint
    from aaren_rl.memory import evaluate_success
    from aaren_rl.policy import StreamingPolicy

    folder = Path(args.data) / f"repeat_first_{args.distance}"
    try:
        report = json.loads((folder / "report.json").read_text())
    except OSError as e:
        sys.exit(f"error: no memory datasets at {folder} ({e}); run scripts/memory_data.py first")
    dataset = folder / f"{args.tier}.hdf5"
    expert = report["tiers"]["expert"]["success_by_distance"]
    chance = report["tiers"]["random"]["success_by_distance"]
    rows = []
    for agent in args.agents:
        for seed in args.seeds:
            run = Path(args.out) / f"d{args.distance}" / f"{agent}-s{seed}"
            t0 = time.perf_counter()
            cli(["train", "--agent", agent, "--dataset", str(dataset), "--updates", str(args.updates), "--seed", str(seed),
                 "--eval-every", "0", "--eval-episodes", "0", "--checkpoint-every", str(args.updates), "--device", "cpu",
                 "--threads", str(args.threads), "--logdir", str(run), "--no-progress",
                 "--set", *SETTINGS, f"train.batch_size={AGENTS[agent]}"])
            train_s = time.perf_counter() - t0
            model, _ = load_checkpoint(run, device="cpu")
            policy = StreamingPolicy(model, report["ref_max_score"])
            res = evaluate_success(policy, env_id(args.distance), args.eval_episodes, EVAL_SEED)
            out = {"agent": agent, "seed": seed, "cue_distance": args.distance, "tier": args.tier, "mode": policy.mode,
                   "updates": args.updates, "success_rate": res["success_by_distance"],
                   "expert_success": expert, "chance_success": chance, "return_mean": res["return_mean"],
                   "episodes": res["episodes"], "train_seconds": train_s, "settings": SETTINGS,
                   "batch_size": AGENTS[agent], "target_return": report["ref_max_score"], "eval_seed": f"{EVAL_SEED} + i"}
            write_json(Path(args.results) / f"d{args.distance}_{agent}_s{seed}.json", out)
            s = res["success_by_distance"]
            rows.append(out)
            print(f"{agent} seed {seed}: success {', '.join(f'>={d}: {v:.2f}' for d, v in s.items())} "
                  f"(return {res['return_mean']:.2f}), train {train_s:.0f} s", flush=True)
    print("\n" + table(rows))
