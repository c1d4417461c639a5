"""Train agents x datasets x seeds, compatible runs as batched groups: the same as ``aaren-rl sweep ...``."""
import sys

from aaren_rl.cli import main

sys.exit(main(["sweep", *sys.argv[1:]]))
