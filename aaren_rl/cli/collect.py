"""``aaren-rl collect``: train a Stable-Baselines3 (or sbx) learner and write D4RL-style dataset tiers.

    aaren-rl collect --env pendulum --hdf5                 # the quick demo environment
    aaren-rl collect --suite locomotion --hdf5             # hopper, halfcheetah, walker2d, ant
    aaren-rl collect --env CartPole-v1 --steps 50000       # any gymnasium id, default settings
    aaren-rl collect --env halfcheetah --pack benchmarks/learners        # keep the finished learner small
    aaren-rl collect --env halfcheetah --from-pack benchmarks/learners --hdf5   # the tiers again, no training

Settings come from the env preset's ``[collect]`` table (``envs/NAME.toml``); options given here
override them. Minari datasets go to ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``);
policies, HDF5 files and ``report.json`` to ``--out/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

from .presets import available, load_preset

SUITES = {"locomotion": ["hopper", "halfcheetah", "walker2d", "ant"]}
PRESET_DEFAULT = "(default: the env preset's [collect] value, else CollectConfig's)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--env", nargs="+", metavar="PRESET_OR_ID",
                       help=f"env preset(s) ({', '.join(available('envs')) or 'none'}) or gymnasium id(s) "
                            f"(no default: give --env or --suite)")
    which.add_argument("--suite", choices=sorted(SUITES), help="a named group of presets (no default: give --env or --suite)")
    p.add_argument("--tiers", nargs="+", metavar="TIER",
                   help="random medium medium-replay expert medium-expert (default: all)")
    p.add_argument("--library", choices=["sb3", "sbx"],
                   help="learner library: sb3 (Stable-Baselines3, with sb3-contrib's tqc/crossq) "
                        "or sbx (sbx-rl, JAX: pip install 'aaren-rl[sbx]') (default: the preset's, else sb3)")
    p.add_argument("--algorithm", help="learner: ppo, sac, td3, tqc, crossq, ... (default: the preset's, else ppo)")
    p.add_argument("--steps", type=int, help=f"learner training steps {PRESET_DEFAULT}")
    p.add_argument("--episodes", type=int, help=f"episodes per rolled-out tier (at least) {PRESET_DEFAULT}")
    p.add_argument("--tier-steps", type=int, help=f"steps per rolled-out tier (at least) {PRESET_DEFAULT}")
    p.add_argument("--ref-episodes", type=int, help="episodes for ref_min/ref_max (default: the preset's, else 100)")
    p.add_argument("--expert", choices=["best", "final"], default=None,
                   help="the expert policy: best (the checkpoint or final policy with the highest evaluated "
                        "return) or final (the last policy, as D4RL) (default: the preset's, else best)")
    p.add_argument("--seed", type=int, help="seed of the learner, the rollouts and the references (default: 0)")
    p.add_argument("--out", default="data", help="folder for policies, HDF5 files and reports (default: data)")
    p.add_argument("--hdf5", action="store_true", help="also write D4RL-format HDF5 files")
    p.add_argument("--results", metavar="DIR", default="",
                   help="also write a summary report DIR/data_NAME.json, e.g. benchmarks/results "
                        "(default: none)")
    p.add_argument("--force", action="store_true", help="replace existing datasets with the same ids")
    p.add_argument("--pack", metavar="DIR", default="",
                   help="after a finished collection, write its learner as a pack DIR/NAME: the medium and "
                        "expert policies (sbx: the actors only), the medium-replay experience and the "
                        "learner's record, a few MB to commit or carry (default: none)")
    p.add_argument("--from-pack", metavar="DIR", default="",
                   help="rebuild the tiers from the pack DIR/NAME (written by --pack) instead of training: "
                        "the same episodes, in minutes (default: train)")
    p.add_argument("--threads", type=int, default=1, help="torch (and JAX) CPU threads (default: 1)")


def _slug(env_id: str) -> str:
    return re.sub(r"-v\d+$", "", env_id).lower().replace("/", "-")


def config_for(name: str, args: argparse.Namespace):
    """The CollectConfig for one preset name (or gymnasium id), with command-line overrides."""
    from aaren_rl.data.collect import CollectConfig

    if name.endswith(".toml") or name in available("envs"):
        preset = load_preset("envs", name)
        env_id = preset["env_id"]
        settings = dict(preset.get("collect", {}))
        settings["name"] = preset["name"]
        settings["dataset_ids"] = dict(preset.get("datasets", {}))
        for key in ("d4rl_ref_min", "d4rl_ref_max"):
            if key in preset.get("reference", {}):
                settings[key] = float(preset["reference"][key])
    else:
        env_id, settings = name, {"name": _slug(name)}
    known = {f.name for f in fields(CollectConfig)}
    unknown = set(settings) - known
    if unknown:
        raise SystemExit(f"error: unknown [collect] setting(s) {sorted(unknown)} in preset {name!r}; "
                         f"known: {sorted(known)}")
    overrides = {"library": args.library, "algorithm": args.algorithm,
                 "tiers": args.tiers, "steps": args.steps, "episodes": args.episodes,
                 "tier_steps": args.tier_steps, "ref_episodes": args.ref_episodes,
                 "seed": args.seed, "expert": args.expert}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if "tiers" in settings:
        settings["tiers"] = tuple(settings["tiers"])
    from_pack = ""
    if args.from_pack:
        from_pack = str(Path(args.from_pack) / settings["name"])
        if not (Path(from_pack) / "pack.json").is_file():
            raise SystemExit(f"error: no pack for {settings['name']!r} in {args.from_pack} "
                             f"(expected {from_pack}/pack.json, written by aaren-rl collect --pack)")
    return CollectConfig(env_id=env_id, out_dir=args.out, hdf5=args.hdf5, force=args.force,
                         results_dir=args.results, from_pack=from_pack, **settings)


def run(args: argparse.Namespace) -> int:
    import os

    if args.threads == 1 and "XLA_FLAGS" not in os.environ:  # before JAX (sbx) is imported
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import gymnasium as gym
    import torch

    from aaren_rl.data.collect import CollectError, collect, tiers_table, write_pack
    from aaren_rl.data.dataset import env_spec

    torch.set_num_threads(args.threads)
    if args.pack and args.from_pack:
        raise SystemExit("error: --pack and --from-pack exclude each other (a pack is written from a "
                         "trained learner; --from-pack rebuilds tiers without one)")
    names = SUITES[args.suite] if args.suite else args.env
    configs = [config_for(name, args) for name in names]  # check every preset before any training
    for cfg in configs:
        try:
            env_spec(cfg.env_id)
        except gym.error.Error:
            raise SystemExit(f"error: {cfg.env_id!r} is neither an env preset "
                             f"({', '.join(available('envs'))}) nor a gymnasium environment id")
    summary, failed = [], []
    for cfg in configs:
        try:
            report = collect(cfg)
        except CollectError as e:
            if len(configs) == 1:
                raise SystemExit(f"error: {e}") from None
            print(f"\n{cfg.env_id}: collection FAILED: {e}", file=sys.stderr)
            failed.append(cfg.env_id)
            continue
        except Exception as e:  # one environment failing should not lose the others of a suite
            if len(configs) == 1:
                raise
            print(f"\n{cfg.env_id}: collection FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(cfg.env_id)
            continue
        if args.pack:
            try:
                dest = write_pack(cfg.folder, Path(args.pack) / cfg.name)
            except CollectError as e:
                raise SystemExit(f"error: {e}") from None
            size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
            print(f"\n{cfg.env_id}: learner packed in {dest} ({size:.1f} MB); rebuild the tiers with "
                  f"aaren-rl collect --env {cfg.name} --from-pack {args.pack}")
        if report.get("skipped"):
            print(f"\n{cfg.env_id}: already complete ({cfg.folder / 'report.json'}); "
                  "not redone (--force rebuilds its datasets)")
            summary.append({"env_id": cfg.env_id, "report": str(cfg.folder / "report.json")})
            continue
        trained = report.get("trained_steps", cfg.steps)  # a build stopped early (--steps) or read from a pack
        print(f"\n{cfg.env_id}: trained {trained} steps in {report['train_seconds']:.0f} s, "
              f"total {report['total_seconds']:.0f} s; ref_min {report['ref_min_score']:.1f}, "
              f"ref_max {report['ref_max_score']:.1f}; medium = checkpoint at step "
              f"{report['medium']['step']}")
        for tier, t in report["tiers"].items():
            print(f"  {tier:14s} {t['episodes']:6d} episodes {t['steps']:8d} steps  "
                  f"return {t['return_mean']:9.1f} ± {t['return_std']:7.1f}  {t['dataset_id']}")
        summary.append({"env_id": cfg.env_id, "report": str(cfg.folder / "report.json")})
    if summary:
        print("\n" + tiers_table([json.loads(Path(r["report"]).read_text()) for r in summary]))
    if failed:
        print(f"error: collection failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
