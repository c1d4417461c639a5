"""Print the results table of one or more sweeps: ``python scripts/suite_table.py runs/suite/sweep.json``.

One row per dataset, one column per way of acting: the Decision Transformer (window recompute),
Decision Aaren trained on K-step windows acting as a stream and, from the same checkpoints, by
window recompute (the sweep's ``window_recompute``), and Decision Aaren trained on whole episodes
acting as a stream. A cell is the mean ± standard deviation over seeds of each run's final
evaluation, normalized with our references (the datasets' ref_min / ref_max) and, in the second
table, with D4RL's (the env preset's d4rl_ref_min / d4rl_ref_max). ``--json`` writes the cells.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from aaren_rl.cli.presets import available, load_preset
from aaren_rl.output import markdown_table, write_json

# (column, agent preset, field prefix in sweep.json's rows)
COLUMNS = [
    ("DT, window", "decision_transformer", ""),
    ("DA window-trained, stream", "decision_aaren", ""),
    ("DA window-trained, window recompute", "decision_aaren", "window_"),
    ("DA episode-trained, stream", "decision_aaren_episode", ""),
]


def env_preset(dataset: str, spec: dict) -> dict | None:
    name = spec.get("env") or dataset.split("-")[0]
    return load_preset("envs", name) if name in available("envs") else None


def cells(rows: list[dict], spec: dict) -> list[dict]:
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        preset = env_preset(dataset, spec)
        ref = (preset or {}).get("reference", {})
        lo, hi = ref.get("d4rl_ref_min"), ref.get("d4rl_ref_max")
        for column, agent, prefix in COLUMNS:
            done = [r for r in rows if r["dataset"] == dataset and r["agent"] == agent
                    and r.get(f"{prefix}return_mean") is not None]
            if not done:
                continue
            returns = [r[f"{prefix}return_mean"] for r in done]
            ours = [r[f"{prefix}normalized_score_mean"] for r in done if r.get(f"{prefix}normalized_score_mean") is not None]
            d4rl = [100 * (x - lo) / (hi - lo) for x in returns] if lo is not None and hi is not None else []
            out.append(dict(dataset=dataset, column=column, agent=agent, seeds=sorted(r["seed"] for r in done),
                            updates=sorted({r["updates"] for r in done}), episodes=sorted({r["episodes"] for r in done}),
                            return_mean=returns, normalized=ours, d4rl_normalized=d4rl))
    return out


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {sd:.1f} ({len(xs)})"


def table(cs: list[dict], key: str) -> str:
    columns = [c for c, _, _ in COLUMNS if any(x["column"] == c for x in cs)]
    rows = []
    for dataset in dict.fromkeys(x["dataset"] for x in cs):
        by = {x["column"]: x for x in cs if x["dataset"] == dataset}
        rows.append([dataset] + [fmt(by[c][key]) if c in by else "-" for c in columns])
    return markdown_table(["dataset"] + columns, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", metavar="SWEEP.json", help="sweep summaries (OUT/sweep.json of aaren-rl sweep)")
    p.add_argument("--json", default=None, help="also write the cells (every seed's score) to this file (default: none)")
    args = p.parse_args()
    rows, specs = [], []
    for path in args.sweeps:
        try:
            data = json.loads(Path(path).read_text())
            rows += data["runs"]
            specs.append(data.get("spec", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            sys.exit(f"error: cannot read sweep summary {path}: {e}")
    spec = specs[0] if specs else {}
    cs = cells(rows, spec)
    if not cs:
        sys.exit("error: no evaluated run in " + ", ".join(args.sweeps))
    seeds = sorted({s for c in cs for s in c["seeds"]})
    updates = sorted({u for c in cs for u in c["updates"]})
    episodes = sorted({e for c in cs for e in c["episodes"]})
    print(f"final evaluation of each run: updates {updates}, {episodes} episodes, seeds {seeds}; "
          "mean ± std over seeds (number of seeds)\n")
    print("normalized with our references (the datasets' ref_min / ref_max):\n")
    print(table(cs, "normalized"))
    print("\nnormalized with D4RL's references:\n")
    print(table(cs, "d4rl_normalized"))
    if args.json:
        write_json(args.json, dict(sweeps=args.sweeps, specs=specs, cells=cs))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
