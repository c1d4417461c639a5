"""``aaren-rl train``: train an agent preset on an offline dataset.

    aaren-rl train --agent decision_aaren --dataset pendulum/medium-replay --updates 5000 --logdir runs/da
    aaren-rl train --agent decision_transformer --dataset data/hopper/medium.hdf5 --env hopper
    aaren-rl train ... --set model.embed_dim=64 train.batch_size=8      # any preset value
    aaren-rl train ... --resume                                         # go on from the last checkpoint

Values come from the agent preset (``agents/NAME.toml``), then from the options given here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from .presets import available, load_preset, parse_overrides, resolve_dataset, resolve_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", default="decision_aaren",
                   help=f"agent preset: {', '.join(available('agents'))} or a .toml path (default: decision_aaren)")
    p.add_argument("--dataset", required=True, metavar="SOURCE", nargs="+",
                   help="Minari dataset id, D4RL-format .hdf5 file, or ENV_PRESET/TIER (e.g. pendulum/medium)")
    p.add_argument("--env", help="env preset or gymnasium id for evaluation, targets and references "
                                 "(default: the dataset's environment)")
    p.add_argument("--updates", type=int, help="gradient updates")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train these seeds together as one batched group (also for several --dataset values of "
                        "one environment): LOGDIR/sSEED, or LOGDIR/DATASET/sSEED (default: one run, --seed)")
    p.add_argument("--logdir", default=None, help="run folder (default: runs/AGENT-DATASET-sSEED)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-every", type=int, help="updates between evaluations (0: only at the end)")
    p.add_argument("--eval-episodes", type=int, help="episodes per evaluation")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--target-return", type=float, help="return to condition on at evaluation")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="override preset values")
    p.add_argument("--no-progress", action="store_true")


def build_configs(args: argparse.Namespace, dataset):
    """The model and train configs: preset, then --set, then the named options."""
    from aaren_rl.model import ModelConfig
    from aaren_rl.train import TrainConfig, model_config_for

    preset = load_preset("agents", args.agent)
    unknown = set(preset) - {"model", "train", "name"}
    if unknown:
        raise SystemExit(f"error: agent preset {args.agent!r} has unknown section(s) {sorted(unknown)}")
    overrides = parse_overrides(args.set)
    model_kw = {**preset.get("model", {}), **overrides.get("model", {})}
    train_kw = {**preset.get("train", {}), **overrides.get("train", {})}
    named = {"updates": args.updates, "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
             "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
             "checkpoint_every": args.checkpoint_every, "target_return": args.target_return}
    train_kw.update({k: v for k, v in named.items() if v is not None})
    for kw, cls, section in ((model_kw, ModelConfig, "model"), (train_kw, TrainConfig, "train")):
        known = {f.name for f in fields(cls)}
        bad = set(kw) - known
        if bad:
            raise SystemExit(f"error: unknown [{section}] key(s) {sorted(bad)} for agent {args.agent!r}; known: {sorted(known)}")
    try:
        return model_config_for(dataset, **model_kw), TrainConfig(**train_kw).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from aaren_rl.data import load_dataset
    from aaren_rl.train import train

    if args.seeds or len(args.dataset) > 1:  # many runs as one batched computation
        from .sweep import run_train_group

        return run_train_group(args)
    args.dataset = args.dataset[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = resolve_env(args.env) if args.env else None
    source = resolve_dataset(args.dataset)
    dataset = load_dataset(source, env_id=env["env_id"] if env else None,
                           ref_min_score=env and env["ref_min"], ref_max_score=env and env["ref_max"])
    model_config, train_config = build_configs(args, dataset)
    if env:
        train_config.env_id = env["env_id"]
        if train_config.target_return is None and env["target_returns"]:
            train_config.target_return = float(env["target_returns"][0])
    name = Path(args.agent).stem
    logdir = Path(args.logdir or f"runs/{name}-{Path(source).stem.replace('/', '-')}-s{args.seed}")
    if logdir.exists() and any(logdir.iterdir()) and not args.resume:
        raise SystemExit(f"error: run folder {logdir} is not empty; pass --resume to continue it or choose --logdir")
    print(f"{dataset!r}\nagent {name}: {model_config.backbone}, context {model_config.context}; logging to {logdir}")
    train(model_config, train_config, dataset, logdir, resume=args.resume, progress=not args.no_progress)
    info = json.loads((logdir / "checkpoints" / (logdir / "checkpoints" / "latest").read_text().strip() / "config.json").read_text())
    ev = info.get("last_eval")
    if ev:
        score = f", normalized score {ev['normalized_score_mean']:.1f}" if "normalized_score_mean" in ev else ""
        print(f"final evaluation ({ev['episodes']} episodes): return {ev['return_mean']:.1f} ± {ev['return_std']:.1f}{score}")
    print(f"checkpoint: {logdir / 'checkpoints'}\ncurves:     tensorboard --logdir {logdir}")
    return 0
