"""Make D4RL-format HDF5 files smaller to carry: drop ``next_observations``, gzip 9, and optionally
concatenate (medium + expert = medium-expert, rebuilt where the files arrive).

    python scripts/slim_hdf5.py data/halfcheetah/medium.hdf5 /tmp/carry/halfcheetah/medium.hdf5
    python scripts/slim_hdf5.py medium.hdf5 expert.hdf5 /tmp/carry/halfcheetah/medium-expert.hdf5

The result loads to the same episodes (``aaren_rl.data.load_dataset``)."""

import argparse
import sys
from pathlib import Path

from aaren_rl.data.writers import slim_hdf5

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="source file(s), then the destination (several sources are concatenated in order)")
    p.add_argument("--level", type=int, default=9, choices=range(10), metavar="0-9",
                   help="gzip level (default: 9)")
    args = p.parse_args()
    if len(args.files) < 2:
        p.error("give at least one source and a destination")
    *sources, dest = args.files
    if Path(dest).exists():
        sys.exit(f"error: {dest} exists; choose another destination (nothing was written)")
    try:
        out = slim_hdf5(sources, dest, level=args.level)
    except (KeyError, ValueError) as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")
    before = sum(Path(s).stat().st_size for s in sources) / 2**20
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MB (from {before:.1f} MB)")
