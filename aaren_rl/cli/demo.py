"""``aaren-rl demo``: the main job, from nothing to a trained, evaluated agent and its curves.

    1. collect the quick environment's datasets (Stable-Baselines3 learner -> D4RL-style tiers),
       unless they are already there;
    2. train Decision Aaren (and the Decision Transformer baseline on the same data);
    3. evaluate both in the gymnasium environment, print the results table;
    4. draw the curves to a PNG and print the TensorBoard command.

Everything goes under ``--out`` (default ``runs/demo``), Minari datasets included unless
``MINARI_DATASETS_PATH`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from .presets import load_preset, resolve_env

DEFAULT_AGENTS = ["decision_aaren", "decision_transformer"]
LABELS = {"decision_aaren": "Decision Aaren", "decision_transformer": "Decision Transformer"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for data, runs, results (default: runs/demo)")
    p.add_argument("--env", default="pendulum", help="env preset (default: pendulum)")
    p.add_argument("--tier", default="medium-expert", help="dataset tier to train on (default: medium-expert)")
    p.add_argument("--agents", nargs="+", default=DEFAULT_AGENTS, help=f"agent presets to train and compare (default: {' '.join(DEFAULT_AGENTS)})")
    p.add_argument("--updates", type=int, default=2000, help="updates per agent (default: 2000)")
    p.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per agent (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and (+10000) the "
                                                        "evaluation episodes (default: 0)")
    p.add_argument("--device", default="auto", help="training device: auto (CUDA if available), cpu, cuda, ... "
                                                     "(default: auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; small models gain little from more, and "
                        "OpenMP threads competing with another busy process can slow them 100x)")


# The agents' presets are DT's 100k-update MuJoCo setting; a demo of a few thousand updates on two
# CPU cores uses a narrower model, a shorter warm-up and a larger step size, the same for every
# agent so that the comparison stays fair. A batch holds about 800 timesteps in either context.
# The step size is 3e-4: at 1e-3 (the demo's until 2026-12-02) every agent scored 20-28 points
# lower on Pendulum over 5 seeds (docs/results.md, benchmarks/results/compare_pendulum_lr.json).
DEMO_MODEL = {"embed_dim": 64}
DEMO_TRAIN = {"warmup_steps": 200, "learning_rate": 3e-4, "log_every": 50}
DEMO_BATCH = {"window": 40, "segment": 40, "episode": 4}

# The evaluation protocol, shared with scripts/compare.py so that their numbers can be pooled:
# episodes seeded from EVAL_SEED + the training seed, the env preset's first target return, and
# scores normalized with the dataset's own references (measured when it was collected).
EVAL_SEED = 10_000


def demo_settings(context: str) -> tuple[dict, dict]:
    """The demo's model and train overrides (the same for every agent) for an agent's context."""
    return dict(DEMO_MODEL), {**DEMO_TRAIN, "batch_size": DEMO_BATCH[context]}


def evaluate_run(logdir, env_id: str, target: float, episodes: int, seed: int,
                 ref_min_score: float | None, ref_max_score: float | None) -> dict:
    """Evaluate a run's latest checkpoint by the protocol above (on the CPU)."""
    from aaren_rl.checkpoint import load_checkpoint
    from aaren_rl.evaluate import evaluate_policy
    from aaren_rl.policy import StreamingPolicy

    model, _ = load_checkpoint(logdir, device="cpu")
    return evaluate_policy(StreamingPolicy(model, target), env_id, episodes, seed=EVAL_SEED + seed,
                           ref_min_score=ref_min_score, ref_max_score=ref_max_score)


def run(args: argparse.Namespace) -> int:
    import torch

    from aaren_rl.data import load_dataset
    from aaren_rl.data.collect import CollectConfig, collect
    from aaren_rl.data.writers import minari_dataset_exists
    from aaren_rl.plots import plot_runs
    from aaren_rl.train import TrainConfig, default_target_return, model_config_for, train

    from ..output import markdown_table, write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    os.environ.setdefault("MINARI_DATASETS_PATH", str((out / "data" / "minari").resolve()))
    t_start = time.perf_counter()
    env = resolve_env(args.env)
    preset = load_preset("envs", args.env)

    # 1. data
    tiers = ["random", "medium", "expert", args.tier]
    if all(minari_dataset_exists(env["datasets"][t]) for t in dict.fromkeys(tiers)):
        print(f"[1/4] datasets already in {os.environ['MINARI_DATASETS_PATH']}: not collecting again")
    else:
        print(f"[1/4] collecting {env['env_id']} datasets (Stable-Baselines3, {preset['collect']['steps']} steps)")
        settings = {k: v for k, v in preset["collect"].items()}
        collect(CollectConfig(env_id=env["env_id"], name=preset["name"], dataset_ids=env["datasets"],
                              out_dir=str(out / "data"), seed=args.seed, force=True, **settings))
    t_data = time.perf_counter() - t_start
    dataset = load_dataset(env["datasets"][args.tier])
    print(f"      {dataset!r}")

    # 2. train
    runs, results = {}, {}
    target = float(env["target_returns"][0]) if env["target_returns"] else default_target_return(dataset)
    for i, agent in enumerate(args.agents):
        p = load_preset("agents", agent)
        demo_model, demo_train = demo_settings(p.get("model", {}).get("context", "window"))
        model_config = model_config_for(dataset, **{**p.get("model", {}), **demo_model})
        train_config = TrainConfig(**{**p.get("train", {}), **demo_train,
                                      "updates": args.updates, "seed": args.seed,
                                      "device": args.device, "eval_every": max(args.updates // 5, 1),
                                      "eval_episodes": 10, "checkpoint_every": args.updates,
                                      "env_id": env["env_id"], "target_return": target})
        logdir = out / "runs" / agent
        label = LABELS.get(agent, agent)
        print(f"[2/4] training {label} ({model_config.backbone}, {model_config.context} context), "
              f"{args.updates} updates -> {logdir}")
        t0 = time.perf_counter()
        if logdir.exists():
            shutil.rmtree(logdir)
        train(model_config, train_config, dataset, logdir)
        runs[label] = logdir
        results[label] = {"train_seconds": time.perf_counter() - t0}

    # 3. evaluate
    print(f"[3/4] evaluating {args.eval_episodes} episodes each in {env['env_id']} (target return {target:g})")
    for label, logdir in runs.items():
        res = evaluate_run(logdir, env["env_id"], target, args.eval_episodes, args.seed,
                           dataset.ref_min_score, dataset.ref_max_score)
        results[label].update({k: v for k, v in res.items() if k not in ("returns", "lengths")})

    # 4. report
    rows = []
    for tier in dict.fromkeys(tiers):  # each tier once, in order
        ds = dataset if tier == args.tier else load_dataset(env["datasets"][tier])
        score = ds.normalized_score(ds.return_mean)
        rows.append([f"dataset: {tier}", f"{ds.return_mean:.1f} ± {ds.return_std:.1f}", f"{score:.1f}", "", ""])
    for label, r in results.items():
        rows.append([f"**{label}** ({r['mode']})", f"{r['return_mean']:.1f} ± {r['return_std']:.1f}",
                     f"{r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}",
                     f"{r['policy_ms_per_step']:.2f}", f"{r['train_seconds']:.0f}"])
    table = markdown_table(["", "return", "normalized score", "policy ms/step", "train s"], rows, "lllll")
    png = plot_runs(runs, out / "curves.png", title=f"{env['env_id']}, {args.tier} data")
    summary = {"env_id": env["env_id"], "tier": args.tier, "target_return": target, "updates": args.updates,
               "results": results, "data_seconds": t_data, "total_seconds": time.perf_counter() - t_start}
    write_json(out / "results.json", summary)
    (out / "results.md").write_text(table + "\n")
    print(f"[4/4] results ({env['env_id']}, trained on {args.tier}; normalized: 0 = random, 100 = expert)\n")
    print(table)
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}\ncurves:  {png}\n"
          f"view the curves: {Path(os.sys.executable).parent / 'tensorboard'} --logdir {out / 'runs'}\n"
          f"total time: {summary['total_seconds'] / 60:.1f} min")
    return 0
