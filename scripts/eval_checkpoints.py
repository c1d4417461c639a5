"""Evaluate the newest checkpoints of a running (or finished) collection on a few sampled episodes.

    python scripts/eval_checkpoints.py Walker2d-v5 data/walker2d/policies --last 3

Prints one line per checkpoint: its step and the mean ± std return over --episodes episodes (seed
123, actions sampled, as `collect` evaluates its checkpoints). A side check while a learner trains;
`collect` itself evaluates every checkpoint on 10 episodes at the end."""

import argparse
import glob
import os
import sys

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env_id", help="gymnasium id the learner trained on, e.g. Walker2d-v5")
    p.add_argument("policies", help="the collection's policies folder (DIR/NAME/policies)")
    p.add_argument("--last", type=int, default=1, help="how many of the newest checkpoints (default: 1)")
    p.add_argument("--episodes", type=int, default=5, help="episodes per checkpoint (default: 5)")
    p.add_argument("--algorithm", default="tqc", help="learner algorithm (default: tqc)")
    p.add_argument("--library", default="sbx", help="sb3 or sbx (default: sbx)")
    args = p.parse_args()
    paths = sorted(glob.glob(os.path.join(args.policies, "checkpoint_*.zip")))[-args.last:]
    if not paths:
        sys.exit(f"error: no checkpoint_*.zip in {args.policies}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from aaren_rl.data.collect import load_policy
    from aaren_rl.data.recording import rollout

    for path in paths:
        policy = load_policy(path, args.algorithm, args.env_id, library=args.library)
        returns = np.array([e.episode_return for e in rollout(args.env_id, policy, episodes=args.episodes,
                                                              seed=123, n_envs=args.episodes)])
        print(f"{os.path.basename(path)[11:-4]} {returns.mean():.0f} ± {returns.std():.0f}", flush=True)
