"""Same as ``aaren-rl bench ...`` (e.g. ``python scripts/bench.py layer --device cpu``)."""

import sys

from aaren_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
