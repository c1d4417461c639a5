"""Benchmarks: scripts that print a table and write JSON (never timed assertions in tests).

Each benchmark is a module here with ``add_arguments(parser)`` and ``run(args)``; ``aaren-rl
bench NAME`` dispatches to it (see ``aaren_rl/cli/bench.py``). ``common`` holds what they share:
the machine's description and timing with warm-up and medians; ``aaren_rl.output`` writes
the JSON and the tables.
"""
