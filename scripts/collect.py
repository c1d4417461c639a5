"""Collect offline datasets: the same as ``aaren-rl collect ARGS`` (see ``--help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aaren_rl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
