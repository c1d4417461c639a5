"""Train and evaluate agents on the memory task (bsuite's memory_len), one JSON per run.

``python scripts/memory_runs.py --data data/memory --distance 50`` writes
benchmarks/results/memory/dDISTANCE_AGENT_sSEED.json (aaren_rl.memory).

Every agent gets the same budget: the same updates, about the same timesteps per batch (windows
of K = 20 steps x 40, or 16 whole episodes), the same width and optimizer; each run is evaluated
once at the end on the same episodes (seeds 20000 + i), conditioned on the expert's return, and
its success rate (the scored last action right) is reported next to the expert's and chance's.
``--stage train`` only trains (e.g. on a GPU machine without bsuite) and ``--stage evaluate`` then
evaluates the run folders it left under ``--out``, giving the JSON a whole run gives. ``--group``
trains each agent's seeds as one batched group (``aaren-rl train --seeds``; each run as it is
alone, up to the dropout masks' draw on CUDA), in OUT/dD/AGENT/sSEED instead of OUT/dD/AGENT-sSEED.
"""

import argparse
import json
import sys
import time
from pathlib import Path

AGENTS = {  # agent preset: the batch (episodes or windows) that holds about 800 timesteps
    "decision_transformer": 40, "decision_transformer_episode": 16,
    "decision_aaren_episode": 16, "decision_aaren": 40, "decision_aaren_segment": 40,
}
DEFAULT_AGENTS = ["decision_transformer", "decision_transformer_episode", "decision_aaren_episode", "decision_aaren"]
EVAL_SEED = 20_000


def settings(lr: float) -> list[str]:
    return ["model.embed_dim=64", "model.return_scale=1.0", f"train.learning_rate={lr:g}", "train.warmup_steps=200",
            "train.log_every=50"]


PROTOCOL_KEYS = {"model.embed_dim", "model.return_scale", "train.learning_rate", "train.warmup_steps", "train.log_every",
                 "train.compile", "train.batch_size"}


def label(row: dict) -> str:
    """The agent, with the settings it ran with beyond the protocol's (``--set``), if any."""
    extra = [s for s in row.get("settings", []) if s.split("=")[0] not in PROTOCOL_KEYS]
    return " ".join([row["agent"], *extra])


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds of each agent's success rate at each cue distance, with the expert and chance.
    Runs with other ``--set`` settings, or trained on another number of episodes, are rows of their own
    (``train episodes``: the episodes of the tier trained on; '-' for runs that did not record it)."""
    import numpy as np

    from aaren_rl.output import markdown_table

    out = []
    for d in sorted({r["cue_distance"] for r in rows}):
        at = [r for r in rows if r["cue_distance"] == d]
        for agent, n in dict.fromkeys((label(r), r.get("train_episodes")) for r in at):
            same = [r for r in at if label(r) == agent and r.get("train_episodes") == n]
            s = [r["success_rate"] for r in same]
            out.append([d, agent, same[0]["mode"], "-" if n is None else n, len(s), f"{np.mean(s):.2f} ± {np.std(s):.2f}"])
        out.append([d, "expert (scripted)", "-", "-", "-", f"{at[0]['expert_success']:.2f}"])
        out.append([d, "chance (random)", "-", "-", "-", f"{at[0]['chance_success']:.2f}"])
    return markdown_table(["cue distance", "agent", "acts", "train episodes", "seeds", "success rate (mean ± std)"],
                          out, "rllrrr")


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


if __name__ == "__main__":
    from aaren_rl.memory import DISTANCES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/memory", help="where scripts/memory_data.py wrote (default: data/memory)")
    p.add_argument("--distance", type=int, default=50, choices=list(DISTANCES),
                   help="cue distance of the task, steps from the last sight of the cue to the decision (default: 50)")
    p.add_argument("--tier", default="medium-expert", choices=["random", "medium", "expert", "medium-expert"],
                   help="dataset tier to train on (default: medium-expert)")
    p.add_argument("--agents", nargs="+", default=DEFAULT_AGENTS, choices=list(AGENTS),
                   help=f"agent presets (default: {' '.join(DEFAULT_AGENTS)})")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--updates", type=positive(int), default=2000, help="updates per run (default: 2000)")
    p.add_argument("--lr", type=positive(float), default=3e-4, help="learning rate (default: 3e-4)")
    p.add_argument("--eval-episodes", type=positive(int), default=100, help="evaluation episodes (default: 100)")
    p.add_argument("--out", default="runs/memory", help="run folders (default: runs/memory)")
    p.add_argument("--results", default="benchmarks/results/memory", help="per-run JSON (default: benchmarks/results/memory)")
    p.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu",
                   help="where to train: cpu, cuda, cuda:1, ...; evaluation always runs on the CPU (default: cpu)")
    p.add_argument("--compile", default="none", choices=["none", "cudagraph", "torch.compile", "torch.compile+cudagraph"],
                   help="train.compile for every run; on CUDA 'cudagraph' replays each update as one graph without "
                        "compiling, cheap to start when many runs start at once (default: none)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                   help="more settings for every run, after the protocol's (e.g. model.query_init=1.0; "
                        "see aaren-rl train --help) (default: none)")
    p.add_argument("--stage", default="all", choices=["all", "train", "evaluate"],
                   help="train and evaluate each run (all), only train it (train: e.g. on a GPU machine without "
                        "bsuite), or only evaluate the run folders a train stage left under --out (evaluate) "
                        "(default: all)")
    p.add_argument("--group", action="store_true",
                   help="train each agent's seeds together as one batched group (one process, one model "
                        "update for all seeds; cheaper on a GPU for these small models) (default: one run at a time)")
    p.add_argument("--checkpoint-every", type=positive(int), default=None,
                   help="also save a checkpoint every N updates, so a run stopped early can go on with --resume "
                        "(default: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="train stage: continue each run folder from its last checkpoint up to --updates "
                        "(e.g. after a GPU lease ended) (default: start new run folders)")
    p.add_argument("--table-from", nargs="+", metavar="RUN.json", default=None,
                   help="print the table of saved per-run JSON files and stop (default: train and evaluate)")
    args = p.parse_args()
    if args.table_from:
        try:
            saved = [json.loads(Path(f).read_text()) for f in args.table_from]
            print(table(saved))
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: cannot read a run file ({type(e).__name__}: {e})")
        sys.exit(0)

    folder = Path(args.data) / f"memory_length_{args.distance}"
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: no memory datasets at {folder} ({e}); run scripts/memory_data.py first")
    dataset = folder / f"{args.tier}.hdf5"
    if not dataset.exists():
        sys.exit(f"error: no dataset {dataset}; run scripts/memory_data.py first")

    from aaren_rl.checkpoint import load_checkpoint
    from aaren_rl.cli import main as cli
    from aaren_rl.memory import CHANCE, env_id, evaluate_success
    from aaren_rl.output import write_json
    from aaren_rl.policy import StreamingPolicy

    def evaluate_run(run, agent, seed, trained):
        """Evaluate a trained run folder as the protocol says; write and return its JSON row."""
        model, info = load_checkpoint(run, device="cpu")
        policy = StreamingPolicy(model, report["ref_max_score"])
        t0 = time.perf_counter()
        res = evaluate_success(policy, env_id(args.distance), args.eval_episodes, EVAL_SEED)
        out = {"agent": agent, "seed": seed, "task": "bsuite memory_len", "env_id": report["env_id"],
               "cue_distance": args.distance, "memory_length": report["memory_length"], "tier": args.tier,
               "train_episodes": trained.get("train_episodes", report["tiers"][args.tier]["episodes"]),
               "mode": policy.mode, "updates": info["step"], "success_rate": res["success_rate"],
               "expert_success": report["tiers"]["expert"]["success_rate"], "chance_success": CHANCE,
               "random_tier_success": report["tiers"]["random"]["success_rate"],
               "return_mean": res["return_mean"], "episodes": res["episodes"], "train_seconds": trained["train_seconds"],
               "eval_seconds": time.perf_counter() - t0, "settings": trained["settings"], "batch_size": AGENTS[agent],
               "target_return": report["ref_max_score"], "eval_seed": f"{EVAL_SEED} + i",
               "train_device": trained["train_device"], "eval_device": "cpu",
               "group_runs": trained.get("group_runs", 1), "resumed": trained.get("resumed", False)}
        write_json(Path(args.results) / f"d{args.distance}_{agent}_s{seed}.json", out)
        print(f"{agent} seed {seed}: success {res['success_rate']:.2f} (return {res['return_mean']:.2f}), "
              f"train {trained['train_seconds']:.0f} s", flush=True)
        return out

    rows, run_settings = [], settings(args.lr) + [f"train.compile={args.compile}"] + args.set
    solo_dir = lambda agent, seed: Path(args.out) / f"d{args.distance}" / f"{agent}-s{seed}"
    group_dir = lambda agent: Path(args.out) / f"d{args.distance}" / agent
    common = ["--dataset", str(dataset), "--updates", str(args.updates), "--eval-every", "0", "--eval-episodes", "0",
              "--checkpoint-every", str(args.checkpoint_every or args.updates), "--device", args.device,
              "--threads", str(args.threads), "--no-progress", *(["--resume"] if args.resume else [])]
    for agent in args.agents:
        flags = ["--set", *run_settings, f"train.batch_size={AGENTS[agent]}"]
        if args.stage == "evaluate":
            for seed in args.seeds:
                run = next((r for r in (solo_dir(agent, seed), group_dir(agent) / f"s{seed}")
                            if (r / "memory_run.json").exists()), solo_dir(agent, seed))
                try:
                    trained = json.loads((run / "memory_run.json").read_text())
                except (OSError, ValueError) as e:
                    sys.exit(f"error: no trained run at {run} ({e}); run the train stage first")
                rows.append(evaluate_run(run, agent, seed, trained))
            continue
        record = lambda seconds, n: {"train_seconds": seconds, "train_device": args.device, "updates": args.updates,
                                     "settings": run_settings, "train_episodes": report["tiers"][args.tier]["episodes"],
                                     "dataset": str(dataset), "group_runs": n,
                                     "resumed": args.resume}  # train_seconds: this call's only, when resumed
        if args.group:
            t0 = time.perf_counter()
            cli(["train", "--agent", agent, "--seeds", *map(str, args.seeds), "--logdir", str(group_dir(agent)),
                 *common, *flags])
            runs = [(seed, group_dir(agent) / f"s{seed}") for seed in args.seeds]
            trained_all = record(time.perf_counter() - t0, len(args.seeds))  # the group's wall time
            for seed, run in runs:
                write_json(run / "memory_run.json", trained_all)
        else:
            runs = []
            for seed in args.seeds:
                run = solo_dir(agent, seed)
                t0 = time.perf_counter()
                cli(["train", "--agent", agent, "--seed", str(seed), "--logdir", str(run), *common, *flags])
                write_json(run / "memory_run.json", record(time.perf_counter() - t0, 1))
                runs.append((seed, run))
        if args.stage == "all":
            for seed, run in runs:
                rows.append(evaluate_run(run, agent, seed, json.loads((run / "memory_run.json").read_text())))
    if rows:
        print("\n" + table(rows))
