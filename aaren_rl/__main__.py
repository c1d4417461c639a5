import sys

from aaren_rl.cli import main

sys.exit(main())
