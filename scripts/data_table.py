"""Print the markdown table of collection reports: ``python scripts/data_table.py benchmarks/results/data_*.json``
(or ``data/NAME/report.json`` files), as in docs/data.md."""

import json
import sys
from pathlib import Path

from aaren_rl.data.collect import markdown_table

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/data_table.py REPORT.json [REPORT.json ...]")
    print(markdown_table([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
