"""Print the markdown table of collection reports: ``python scripts/data_table.py benchmarks/results/data_*.json``
(or ``data/NAME/report.json`` files), as in docs/data.md."""

import argparse
import json
import sys
from pathlib import Path

from aaren_rl.data.collect import tiers_table

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="REPORT.json", help="collection reports (data_<env>.json or report.json)")
    args = p.parse_args()
    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: cannot read report {path}: {e}")
    print(tiers_table(reports))
