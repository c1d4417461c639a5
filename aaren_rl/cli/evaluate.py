"""``aaren-rl evaluate``: run a checkpoint in a gymnasium environment, N episodes in parallel.

    aaren-rl evaluate runs/da --env Pendulum-v1 --episodes 20 --json results.json
    aaren-rl evaluate runs/da/checkpoints/step_0005000 --video da.gif      # MUJOCO_GL=egl headless
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..output import write_json
from ..policy import MODES
from .presets import available, resolve_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder, its checkpoints folder, one checkpoint folder, or a folder "
                                      "written by aaren-rl export (run in ONNX Runtime)")
    p.add_argument("--env", help=f"gymnasium id or env preset ({', '.join(available('envs'))}) "
                                 f"(default: the checkpoint's)")
    p.add_argument("--episodes", type=int, default=10, help="episodes, run up to 16 at a time (default: 10)")
    p.add_argument("--target-return", type=float,
                   help="return to condition on (default: the env preset's first target, else the one training used)")
    p.add_argument("--mode", choices=list(MODES),
                   help="recurrent: constant-size state (Aaren) or key/value cache (Transformer); "
                        "window: recompute the last K steps (DT); sliding: a Transformer's key/value cache of the last "
                        "K steps (default: recurrent for Aaren and for models trained on whole episodes, else window; "
                        "an exported policy: the mode it was exported in)")
    p.add_argument("--seed", type=int, default=0, help="environment i is seeded with SEED + i (default: 0)")
    p.add_argument("--device", default="cpu", help="device the policy runs on (default: cpu, where the compiled "
                                                   "step runs)")
    p.add_argument("--json", metavar="OUT", help="write the results here (default: print only)")
    p.add_argument("--video", metavar="PATH", help="also render one episode to PATH, .gif or .mp4; needs "
                                                   "aaren-rl[video] (default: no video)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")


def run(args: argparse.Namespace) -> int:
    import torch

    from aaren_rl.checkpoint import load_checkpoint
    from aaren_rl.evaluate import check_env_matches, check_video_dependencies, evaluate_policy, record_video
    from aaren_rl.policy import StreamingPolicy
    from aaren_rl.runtime import OnnxPolicy, is_exported, read_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.video and Path(args.video).suffix not in (".gif", ".mp4"):
        raise SystemExit(f"error: --video must end in .gif or .mp4, got {args.video}")
    exported = is_exported(args.checkpoint)
    try:
        if exported:
            spec = read_spec(args.checkpoint)
            if args.mode and args.mode != spec["mode"]:
                raise ValueError(f"{args.checkpoint} was exported in mode {spec['mode']!r}; --mode {args.mode} needs "
                                 f"the checkpoint, or an export with --mode {args.mode}")
            model, info = None, {"env_id": spec.get("env_id"), "target_return": spec.get("target_return")}
        else:
            model, info = load_checkpoint(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    env = resolve_env(args.env) if args.env else resolve_env(info.get("env_id") or "")
    if not env["env_id"]:
        raise SystemExit("error: the checkpoint names no environment; pass --env")
    target, how = args.target_return, "--target-return"
    if target is None and env["target_returns"]:
        target, how = float(env["target_returns"][0]), f"env preset {env['name']!r}"
    elif target is None:
        target, how = info.get("target_return"), "the one training used"
        if target is None:
            raise SystemExit("error: the checkpoint records no target return; pass --target-return")
    if args.video:  # before the evaluation, not after it
        try:
            check_video_dependencies(env["env_id"], args.video)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    ds = info.get("dataset", {})
    ref_min = env["ref_min"] if env["ref_min"] is not None else ds.get("ref_min_score")
    ref_max = env["ref_max"] if env["ref_max"] is not None else ds.get("ref_max_score")
    print(f"evaluating {args.checkpoint} in {env['env_id']}, {args.episodes} episodes, target return {target:g} ({how})")
    try:
        if exported:
            policy = OnnxPolicy(args.checkpoint, target, threads=args.threads)
        else:
            policy = StreamingPolicy(model, target, mode=args.mode)
        c = policy.config if exported else model.config
        check_env_matches(env["env_id"], c.observation_dim, c.action_dim, c.discrete,
                          f"the exported policy {args.checkpoint}" if exported else "the model")
        res = evaluate_policy(policy, env["env_id"], args.episodes, seed=args.seed, progress=True,
                              ref_min_score=ref_min, ref_max_score=ref_max)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    res["checkpoint"] = str(args.checkpoint)
    line = f"{env['env_id']}: return {res['return_mean']:.1f} ± {res['return_std']:.1f} over {res['episodes']} episodes"
    if "normalized_score_mean" in res:
        line += f", normalized score {res['normalized_score_mean']:.1f} ± {res['normalized_score_std']:.1f}"
    print(line + f" (target {target:g}, {policy.mode} policy, {res['policy_ms_per_step']:.2f} ms/step)")
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.video:
        print(f"video: {record_video(policy, env['env_id'], args.video, seed=args.seed)}")
    return 0
