"""Train an agent: the same as ``aaren-rl train ...``."""
import sys

from aaren_rl.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
