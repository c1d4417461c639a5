"""Evaluate a checkpoint: the same as ``aaren-rl evaluate ...``."""
import sys

from aaren_rl.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
