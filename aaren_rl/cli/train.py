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
import types
import typing
from dataclasses import fields

from .presets import available, load_preset, parse_overrides, resolve_dataset, resolve_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", default="decision_aaren",
                   help=f"agent preset: {', '.join(available('agents'))} or a .toml path (default: decision_aaren)")
    p.add_argument("--dataset", required=True, metavar="SOURCE", nargs="+",
                   help="Minari dataset id, D4RL-format .hdf5 file, or ENV_PRESET/TIER (e.g. pendulum/medium)")
    p.add_argument("--env", help="env preset or gymnasium id for evaluation, targets and references "
                                 "(default: the dataset's environment)")
    p.add_argument("--updates", type=int, help="gradient updates (default: the preset's, else 100000)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the preset's, else 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and evaluations (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train these seeds together as one batched group (also for several --dataset values of "
                        "one environment): LOGDIR/sSEED, or LOGDIR/DATASET/sSEED (default: one run, --seed)")
    p.add_argument("--logdir", default=None, help="run folder (default: runs/AGENT-DATASET-sSEED)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--eval-every", type=int, help="updates between evaluations, 0: only at the end "
                                                  "(default: the preset's, else 10000)")
    p.add_argument("--eval-episodes", type=int, help="episodes per evaluation, 0: none "
                                                     "(default: the preset's, else 10)")
    p.add_argument("--checkpoint-every", type=int, help="updates between checkpoints; the last update is always "
                                                        "saved (default: the preset's, else 10000)")
    p.add_argument("--target-return", type=float,
                   help="return to condition on at evaluation (default: the env preset's first target, else the "
                        "dataset's ref_max_score, else its best episode's return)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint, with "
                                                         "the same data, model and optimizer settings (default: off)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="override preset values, e.g. model.embed_dim=64 train.learning_rate=3e-4 (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on the terminal)")


def _type_name(t) -> str:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " (or unset)"
    if typing.get_origin(t) is list:
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(t, str(t))


def _has_type(value, t) -> bool:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(t))
    if t is type(None):
        return value is None
    if typing.get_origin(t) is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(t)[0]) for v in value)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def check_types(kw: dict, cls, section: str, where: str) -> None:
    """A clear error for a preset or ``--set`` value of the wrong type (``embed_dim = "32"``)."""
    hints = typing.get_type_hints(cls)
    for key, value in kw.items():
        if not _has_type(value, hints[key]):
            raise SystemExit(f"error: {section}.{key} must be {_type_name(hints[key])}, got {value!r} ({where})")


def settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """The model and train settings, checked (names and types): preset, then --set, then the named options."""
    from aaren_rl.model import ModelConfig
    from aaren_rl.train import TrainConfig

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
        check_types(kw, cls, section, f"agent preset {args.agent!r} or --set")
    return model_kw, train_kw


def build_configs(args: argparse.Namespace, dataset):
    """The model and train configs for ``dataset``."""
    from aaren_rl.train import TrainConfig, model_config_for

    model_kw, train_kw = settings(args)
    try:
        return model_config_for(dataset, **model_kw), TrainConfig(**train_kw).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from aaren_rl.data import load_dataset
    from aaren_rl.train import default_target_return, train

    if args.seeds or len(args.dataset) > 1:  # many runs as one batched computation
        from .sweep import run_train_group

        return run_train_group(args)
    args.dataset = args.dataset[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings(args)  # bad settings fail before the dataset is read
    env = resolve_env(args.env) if args.env else None
    source = resolve_dataset(args.dataset)
    dataset = load_dataset(source, env_id=env["env_id"] if env else None,
                           ref_min_score=env and env["ref_min"], ref_max_score=env and env["ref_max"])
    if dataset.env_id is None and not env:
        raise SystemExit(f"error: dataset {source} names no environment (no env_id attribute): pass --env "
                         f"(an env preset: {', '.join(available('envs'))}, or a gymnasium id)")
    model_config, train_config = build_configs(args, dataset)
    if env:
        train_config.env_id = env["env_id"]
    how = "--target-return"
    if train_config.target_return is None:
        if env and env["target_returns"]:
            train_config.target_return, how = float(env["target_returns"][0]), f"env preset {env['name']!r}"
        else:
            train_config.target_return = default_target_return(dataset)
            how = "the dataset's ref_max_score" if dataset.ref_max_score is not None else "the dataset's best return"
    name = Path(args.agent).stem
    logdir = Path(args.logdir or f"runs/{name}-{Path(source).stem.replace('/', '-')}-s{args.seed}")
    if logdir.exists() and any(logdir.iterdir()) and not args.resume:
        raise SystemExit(f"error: run folder {logdir} is not empty; pass --resume to continue it or choose --logdir")
    print(f"{dataset!r}\nagent {name}: {model_config.backbone}, context {model_config.context}; logging to {logdir}")
    print(f"target return {train_config.target_return:g} ({how})")
    train(model_config, train_config, dataset, logdir, resume=args.resume, progress=not args.no_progress)
    info = json.loads((logdir / "checkpoints" / (logdir / "checkpoints" / "latest").read_text().strip() / "config.json").read_text())
    ev = info.get("last_eval")
    if ev:
        score = f", normalized score {ev['normalized_score_mean']:.1f}" if "normalized_score_mean" in ev else ""
        print(f"final evaluation ({ev['episodes']} episodes): return {ev['return_mean']:.1f} ± {ev['return_std']:.1f}{score}")
    print(f"checkpoint: {logdir / 'checkpoints'}\ncurves:     tensorboard --logdir {logdir}")
    return 0
