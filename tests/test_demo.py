"""The main job end to end, on tiny datasets made here (collection itself is tested in test_collect)."""

import json

import numpy as np

from aaren_rl.cli import main
from aaren_rl.cli.presets import resolve_env
from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.writers import write_minari


def test_demo_trains_evaluates_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(0)
    for tier, dataset_id in resolve_env("pendulum")["datasets"].items():
        episodes = [RawEpisode(observations=rng.normal(size=(21, 3)).astype(np.float32),
                               actions=rng.uniform(-2, 2, size=(20, 1)).astype(np.float32),
                               rewards=-rng.uniform(0, 16, size=20).astype(np.float32),
                               terminated=False, truncated=True) for _ in range(4)]
        write_minari(dataset_id, episodes, "Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--updates", "4", "--eval-episodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "not collecting again" in printed and "tensorboard" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"Decision Aaren", "Decision Transformer"}
    for r in results["results"].values():
        assert r["episodes"] == 2 and np.isfinite(r["normalized_score_mean"])
    table = (out / "results.md").read_text()
    assert table.count("| dataset: ") == 4 and "**Decision Aaren** (recurrent)" in table
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "runs" / "decision_aaren" / "checkpoints" / "latest").is_file()
