"""The suite's results from its sweeps: ``python scripts/suite_table.py runs/suite/sweep.json [...]``.

One row per dataset, one column per way of acting: the Decision Transformer (window recompute),
Decision Aaren trained on K-step windows acting as a stream and, from the same checkpoints, by
window recompute (the sweep's ``window_recompute``), and Decision Aaren trained on whole episodes
acting as a stream; then a column per other agent preset and way of acting found in the runs (a
variant, labelled by its preset's name). A cell is the mean ± standard deviation over seeds of
each run's final evaluation, normalized with our references (the datasets' ref_min / ref_max) and, in the second
table, with D4RL's (the env preset's d4rl_ref_min / d4rl_ref_max), beside the Decision
Transformer's published D4RL scores (on D4RL's data, not ours). A last row gives the mean over the
datasets every column has. A third table gives each column's evaluation wall time and policy time
per step.

``--runs-dir DIR`` writes one JSON per run and way of acting (``DATASET_AGENT_MODE_sSEED.json``,
with its training-loss curve when the run folder is there) and, with no SWEEP.json, reads the tables
back from such a folder alone. ``--plots DIR`` draws, per dataset, the training-loss curves (mean
over seeds) and the final scores side by side (``suite_DATASET.png``). ``--markdown FILE`` writes the
tables into FILE between the lines ``<!-- suite-table:begin -->`` and ``<!-- suite-table:end -->``
(added at its end if missing), so that docs/results.md is rebuilt by this one command;
``--agents`` picks the agents whose runs make the columns, ``--datasets`` the rows, and ``--block
NAME`` the markers (a second table, e.g. of variants, in the same file).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from aaren_rl.cli.presets import available, load_preset
from aaren_rl.output import markdown_table, write_json

# (column, agent preset, mode of acting)
COLUMNS = [
    ("DT, window", "decision_transformer", "window"),
    ("DA window-trained, stream", "decision_aaren", "recurrent"),
    ("DA window-trained, window recompute", "decision_aaren", "window"),
    ("DA episode-trained, stream", "decision_aaren_episode", "recurrent"),
]
# The Decision Transformer's published D4RL scores (Chen et al., 2021; ../shared/AAREN.md), on D4RL's data.
PUBLISHED_DT = {
    "halfcheetah-medium": 42.6, "hopper-medium": 67.6, "walker2d-medium": 74.0,
    "halfcheetah-medium-replay": 36.6, "hopper-medium-replay": 82.7, "walker2d-medium-replay": 66.6,
    "halfcheetah-medium-expert": 86.8, "hopper-medium-expert": 107.6, "walker2d-medium-expert": 108.1,
}
BEGIN, END = "<!-- suite-table:begin -->", "<!-- suite-table:end -->"
CURVE_POINTS = 50  # a run's loss curve is stored with at most this many points


def env_preset(dataset: str, spec: dict) -> dict | None:
    name = spec.get("env") or dataset.split("-")[0]
    return load_preset("envs", name) if name in available("envs") else None


def loss_curve(folder: str | None) -> list[list[float]] | None:
    """A run's train/loss series from its TensorBoard log, thinned to CURVE_POINTS points."""
    if not folder or not Path(folder).is_dir():
        return None
    from aaren_rl.plots import read_scalars

    try:
        steps, values = read_scalars(folder).get("train/loss", ([], []))
    except Exception:  # no or unreadable events: the table does not need them
        return None
    if not steps:
        return None
    every = max(1, len(steps) // CURVE_POINTS)
    keep = list(range(0, len(steps), every))
    if keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)
    return [[steps[i], values[i]] for i in keep]


def records(rows: list[dict], spec: dict) -> list[dict]:
    """One record per evaluated run and way of acting (a sweep row holds one or two of them)."""
    out = []
    for r in rows:
        preset = env_preset(r["dataset"], spec)
        ref = (preset or {}).get("reference", {})
        lo, hi = ref.get("d4rl_ref_min"), ref.get("d4rl_ref_max")
        curve = None
        for prefix in ("", "window_"):
            if r.get(f"{prefix}return_mean") is None:
                continue
            ret = r[f"{prefix}return_mean"]
            if curve is None:
                curve = loss_curve(r.get("folder"))
            out.append({
                "dataset": r["dataset"], "agent": r["agent"], "mode": r.get(f"{prefix}mode") or "recurrent",
                "seed": r["seed"], "updates": r["updates"], "episodes": r[f"{prefix}episodes"],
                "return_mean": ret, "return_std": r.get(f"{prefix}return_std"),
                "normalized_score": r.get(f"{prefix}normalized_score_mean"),
                "normalized_score_std": r.get(f"{prefix}normalized_score_std"),
                "d4rl_normalized_score": 100 * (ret - lo) / (hi - lo) if lo is not None and hi is not None else None,
                "policy_ms_per_step": r.get(f"{prefix}policy_ms_per_step"),
                "eval_seconds": r.get(f"{prefix}eval_seconds"),
                "loss_curve": curve,
            })
    return out


TIER_ORDER = ["random", "medium", "medium-replay", "expert", "medium-expert"]


def dataset_order(dataset: str) -> tuple:
    """Environments alphabetically, then D4RL's tier order (the paper's rows)."""
    env, _, tier = dataset.partition("-")
    return (env, TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), tier)


MODE_LABELS = {"recurrent": "stream", "window": "window recompute"}


def columns_for(recs: list[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS, then one column per other (agent, mode) in the records (a variant's preset, e.g.
    sweeps/agents/decision_aaren_recency-0.1.toml), labelled by its preset name and way of acting."""
    known = {(agent, mode) for _, agent, mode in COLUMNS}
    extra = sorted({(r["agent"], r["mode"]) for r in recs} - known)
    return COLUMNS + [(f"{agent}, {MODE_LABELS.get(mode, mode)}", agent, mode) for agent, mode in extra]


def cells(recs: list[dict]) -> list[dict]:
    out = []
    for dataset in sorted({r["dataset"] for r in recs}, key=dataset_order):
        for column, agent, mode in columns_for(recs):
            done = sorted((r for r in recs if (r["dataset"], r["agent"], r["mode"]) == (dataset, agent, mode)),
                          key=lambda r: r["seed"])
            if not done:
                continue
            out.append(dict(dataset=dataset, column=column, agent=agent, mode=mode,
                            seeds=[r["seed"] for r in done], updates=sorted({r["updates"] for r in done}),
                            episodes=sorted({r["episodes"] for r in done}),
                            return_mean=[r["return_mean"] for r in done],
                            normalized=[r["normalized_score"] for r in done if r["normalized_score"] is not None],
                            d4rl_normalized=[r["d4rl_normalized_score"] for r in done
                                             if r["d4rl_normalized_score"] is not None],
                            eval_seconds=[r["eval_seconds"] for r in done if r.get("eval_seconds") is not None],
                            policy_ms_per_step=[r["policy_ms_per_step"] for r in done
                                                if r.get("policy_ms_per_step") is not None]))
    return out


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {sd:.1f} ({len(xs)})"


def columns_of(cs: list[dict]) -> list[str]:
    return list(dict.fromkeys(x["column"] for x in sorted(cs, key=lambda x: _column_rank(x))))


def _column_rank(cell: dict) -> tuple:
    """COLUMNS' order first, then the other columns by name."""
    names = [c for c, _, _ in COLUMNS]
    return (names.index(cell["column"]), "") if cell["column"] in names else (len(names), cell["column"])


def table(cs: list[dict], key: str, published: bool = False) -> str:
    columns = columns_of(cs)
    datasets = list(dict.fromkeys(x["dataset"] for x in cs))
    rows = []
    for dataset in datasets:
        by = {x["column"]: x for x in cs if x["dataset"] == dataset}
        row = [dataset] + [fmt(by[c][key]) if c in by else "-" for c in columns]
        if published:
            row.append(f"{PUBLISHED_DT[dataset]:.1f}" if dataset in PUBLISHED_DT else "-")
        rows.append(row)
    # the mean over the datasets that every column has (each dataset's seed mean, then their mean)
    common = [d for d in datasets if all(any(x["dataset"] == d and x["column"] == c and x[key] for x in cs)
                                         for c in columns)]
    if len(common) > 1:
        means = []
        for c in columns:
            per = [statistics.fmean(next(x[key] for x in cs if x["dataset"] == d and x["column"] == c)) for d in common]
            means.append(f"{statistics.fmean(per):.1f}")
        row = [f"mean over {len(common)} datasets"] + means
        if published:
            pub = [PUBLISHED_DT[d] for d in common if d in PUBLISHED_DT]
            row.append(f"{statistics.fmean(pub):.1f}" if len(pub) == len(common) else "-")
        rows.append(row)
    header = ["dataset"] + columns + (["DT published (D4RL's data)"] if published else [])
    return markdown_table(header, rows)


def cost_table(cs: list[dict]) -> str:
    rows = []
    for c in columns_of(cs):
        xs = [x for x in cs if x["column"] == c]
        ev = [s for x in xs for s in x["eval_seconds"]]
        ms = [s for x in xs for s in x["policy_ms_per_step"]]
        rows.append([c, str(sum(len(x["seeds"]) for x in xs)),
                     f"{statistics.fmean(ev):.1f}" if ev else "-", f"{statistics.fmean(ms):.2f}" if ms else "-"])
    return markdown_table(["way of acting", "runs", "evaluation wall s per run", "policy ms per step"], rows)


def report(cs: list[dict], recs: list[dict]) -> str:
    seeds = sorted({s for c in cs for s in c["seeds"]})
    updates = sorted({u for c in cs for u in c["updates"]})
    episodes = sorted({e for c in cs for e in c["episodes"]})
    return "\n".join([
        f"final evaluation of each run: updates {updates}, {episodes} episodes, seeds {seeds}; "
        "mean ± std over seeds (number of seeds)\n",
        "normalized with our references (the datasets' ref_min / ref_max):\n",
        table(cs, "normalized"),
        "\nnormalized with D4RL's references:\n",
        table(cs, "d4rl_normalized", published=True),
        "\nacting cost (each run's final evaluation; policy time per step of its evaluation envs):\n",
        cost_table(cs),
    ])


def plot(cs: list[dict], recs: list[dict], out_dir: Path) -> list[Path]:
    """Per dataset: mean training-loss curve per column's agent, and the final scores side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for dataset in dict.fromkeys(x["dataset"] for x in cs):
        fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4.2))
        for agent in dict.fromkeys(x["agent"] for x in cs if x["dataset"] == dataset):
            # one curve per seed (a run acting two ways has one training curve)
            curves = list({r["seed"]: r["loss_curve"] for r in recs if r["dataset"] == dataset
                           and r["agent"] == agent and r.get("loss_curve")}.values())
            if curves:
                n = min(len(c) for c in curves)
                steps = [p[0] for p in curves[0][:n]]
                mean = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
                ax_loss.plot(steps, mean, label=f"{agent} ({len(curves)} seeds)")
        if ax_loss.lines:
            ax_loss.set_yscale("log")
        else:
            ax_loss.text(0.5, 0.5, "no training logs: the run folders are not here", ha="center",
                         transform=ax_loss.transAxes, fontsize=8)
        ax_loss.set_xlabel("update")
        ax_loss.set_title("training loss (mean over seeds)")
        ax_loss.grid(alpha=0.3)
        if ax_loss.lines:
            ax_loss.legend(fontsize=7)
        xs = [x for x in cs if x["dataset"] == dataset]
        for i, x in enumerate(xs):
            ax_score.bar(i, statistics.fmean(x["normalized"]) if x["normalized"] else 0, color=f"C{i}", alpha=0.6)
            ax_score.scatter([i] * len(x["normalized"]), x["normalized"], color="k", s=10, zorder=3)
        ax_score.set_xticks(range(len(xs)), [x["column"].replace(", ", "\n") for x in xs], fontsize=6,
                            rotation=30, ha="right", rotation_mode="anchor")
        ax_score.set_ylabel("normalized score (ours)")
        ax_score.set_title("final score (bars: mean; dots: seeds)")
        ax_score.grid(alpha=0.3, axis="y")
        fig.suptitle(dataset)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"suite_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markers(block: str | None) -> tuple[str, str]:
    """The lines around a table in the markdown file: BEGIN / END, or with ``:BLOCK`` in them."""
    if not block:
        return BEGIN, END
    return BEGIN.replace("suite-table", f"suite-table:{block}"), END.replace("suite-table", f"suite-table:{block}")


def write_markdown(path: Path, text: str, block: str | None = None) -> None:
    old = path.read_text() if path.exists() else ""
    begin, end = markers(block)
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(new)
    tmp.replace(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="*", metavar="SWEEP.json", help="sweep summaries (OUT/sweep.json of aaren-rl sweep); "
                   "none: read the per-run JSONs of --runs-dir")
    p.add_argument("--runs-dir", default=None, help="write one JSON per run and way of acting here (or, with no "
                   "SWEEP.json, read them from here) (default: none)")
    p.add_argument("--json", default=None, help="also write the cells (every seed's score) to this file (default: none)")
    p.add_argument("--plots", default=None, metavar="DIR", help="draw suite_DATASET.png per dataset here (default: none)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the tables into FILE between "
                   f"'{BEGIN}' and '{END}' (default: none)")
    p.add_argument("--agents", nargs="+", default=None, metavar="PRESET", help="the agents whose runs make the "
                   "columns, by preset name (default: every agent in the runs)")
    p.add_argument("--datasets", nargs="+", default=None, metavar="DATASET", help="the datasets that make the "
                   "rows, e.g. walker2d-medium (default: every dataset in the runs)")
    p.add_argument("--block", default=None, metavar="NAME", help="with --markdown: the table goes between "
                   "'<!-- suite-table:NAME:begin -->' and '<!-- suite-table:NAME:end -->' instead, so that one "
                   "file holds several tables (default: none)")
    args = p.parse_args()
    if not args.sweeps and not args.runs_dir:
        p.error("give SWEEP.json files, or --runs-dir with the per-run JSONs of earlier sweeps")
    recs, specs = [], []
    if args.sweeps:
        rows = []
        for path in args.sweeps:
            try:
                data = json.loads(Path(path).read_text())
                rows += [r for r in data["runs"] if r.get("status") == "done"]
                specs.append(data.get("spec", {}))
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                sys.exit(f"error: cannot read sweep summary {path}: {e}")
        try:
            recs = records(rows, specs[0] if specs else {})
        except KeyError as e:
            sys.exit(f"error: a sweep row lacks {e}: not a summary of aaren-rl sweep")
        if args.runs_dir:
            for r in recs:
                write_json(Path(args.runs_dir) / f"{r['dataset']}_{r['agent']}_{r['mode']}_s{r['seed']}.json", r)
    else:
        files = sorted(Path(args.runs_dir).glob("*.json"))
        if not files:
            sys.exit(f"error: no per-run JSON in {args.runs_dir}")
        for f in files:
            try:
                recs.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                sys.exit(f"error: cannot read {f}: {e}")
    for key, wanted in (("agent", args.agents), ("dataset", args.datasets)):
        if wanted:
            there = sorted({r[key] for r in recs})
            recs = [r for r in recs if r[key] in wanted]
            if not recs:  # a name with no run yet is fine (a column to come), but not all of them
                sys.exit(f"error: no run of {key} {', '.join(wanted)}; the runs have {', '.join(there)}")
    cs = cells(recs)
    if not cs:
        sys.exit("error: no evaluated run in " + ", ".join(args.sweeps or [args.runs_dir]))
    text = report(cs, recs)
    print(text)
    if args.json:
        write_json(args.json, dict(sweeps=args.sweeps, specs=specs, cells=cs))
        print(f"\nwrote {args.json}")
    if args.plots:
        for path in plot(cs, recs, Path(args.plots)):
            print(f"wrote {path}")
    if args.markdown:
        write_markdown(Path(args.markdown), text, args.block)
        print(f"wrote the tables into {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
