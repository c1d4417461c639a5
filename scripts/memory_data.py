"""Write the memory task's datasets (bsuite's memory_len; tiers made with its scripted expert).

``python scripts/memory_data.py --distances 50 100 500 --out data/memory`` (aaren_rl.memory)."""

import argparse
import sys

from aaren_rl.memory import DISTANCES, collect_datasets
from aaren_rl.output import markdown_table

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES), choices=list(DISTANCES),
                   help="cue distances: steps from the last sight of the cue to the decision "
                        f"(default: {' '.join(map(str, DISTANCES))})")
    p.add_argument("--episodes", type=int, default=2000,
                   help="episodes per tier (default: 2000; with 200, whole-episode models memorize the training "
                        "episodes: docs/results.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rollouts (default: 0)")
    p.add_argument("--out", default="data/memory", help="output folder (default: data/memory)")
    p.add_argument("--minari", action="store_true", help="also write Minari datasets (default: off)")
    args = p.parse_args()
    if args.episodes < 1:
        sys.exit(f"error: --episodes must be positive, got {args.episodes}")
    if args.seed < 0:
        sys.exit(f"error: --seed must be non-negative, got {args.seed}")
    rows = []
    for d in args.distances:
        try:
            rep = collect_datasets(args.out, d, args.episodes, args.seed, minari=args.minari)
        except (ImportError, OSError) as e:
            sys.exit(f"error: {e}")
        for tier, t in rep["tiers"].items():
            rows.append([d, rep["episode_length"], tier, t["episodes"], t["steps"],
                         f"{t['return_mean']:.3f} ± {t['return_std']:.3f}", f"{t['success_rate']:.3f}"])
    print(markdown_table(["cue distance", "episode length", "tier", "episodes", "steps", "return (mean ± std)",
                          "success rate"], rows, "rrlrrrr"))
