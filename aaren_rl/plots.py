"""Curves from TensorBoard logs, drawn to a PNG (for the README and for machines with no browser)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TAGS = ("train/loss", "eval/return_mean", "eval/normalized_score", "train/updates_per_s")


def read_scalars(logdir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series in a run folder: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def plot_runs(runs: dict[str, str | Path], out: str | Path, tags=DEFAULT_TAGS, title: str | None = None) -> Path:
    """One panel per tag, one line per run (label -> run folder); written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {label: read_scalars(d) for label, d in runs.items()}
    tags = [t for t in tags if any(t in s for s in series.values())]
    if not tags:
        raise ValueError(f"no scalars {list(DEFAULT_TAGS)} in {list(runs.values())}")
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for label, s in series.items():
            if tag in s:
                steps, values = s[tag]
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 15 else None, ms=3)
        if "loss" in tag:
            ax.set_yscale("log")
        ax.set_title(tag)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
