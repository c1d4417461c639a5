"""Training end to end on tiny data: commands, checkpoints, resume, TensorBoard logs, bad inputs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aaren_rl.checkpoint import load_checkpoint, save_checkpoint
from aaren_rl.cli import main
from aaren_rl.data import TrajectoryDataset, load_dataset
from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.writers import write_hdf5
from aaren_rl.model import DecisionModel
from aaren_rl.train import TrainConfig, model_config_for, train

TINY = ["model.embed_dim=16", "model.n_layer=1", "train.batch_size=4", "train.log_every=2", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def hdf5_dataset(tmp_path_factory):
    """Six short Pendulum-shaped episodes in a D4RL-format file."""
    rng = np.random.default_rng(0)
    episodes = [RawEpisode(observations=rng.normal(size=(31, 3)).astype(np.float32),
                           actions=rng.uniform(-2, 2, size=(30, 1)).astype(np.float32),
                           rewards=-rng.uniform(0, 16, size=30).astype(np.float32),
                           terminated=False, truncated=True) for _ in range(6)]
    path = tmp_path_factory.mktemp("data") / "pendulum-tiny.hdf5"
    return write_hdf5(path, episodes, "Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0,
                      action_low=[-2.0], action_high=[2.0])


def tb_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


@pytest.mark.parametrize("agent", ["decision_aaren", "decision_transformer"])
def test_train_save_load_evaluate_end_to_end(tmp_path, hdf5_dataset, agent, capsys):
    run = tmp_path / "run"
    assert main(["train", "--agent", agent, "--dataset", str(hdf5_dataset), "--updates", "6",
                 "--eval-every", "3", "--eval-episodes", "1", "--checkpoint-every", "3", "--logdir", str(run),
                 "--no-progress", "--set", *TINY]) == 0
    out = capsys.readouterr().out
    assert "final evaluation (1 episodes)" in out and "tensorboard --logdir" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    tags, acc = tb_tags(run)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/updates_per_s", "eval/return_mean",
            "eval/return_std", "eval/normalized_score", "eval/episode_length", "eval/policy_ms_per_step"} <= tags
    assert [e.step for e in acc.Scalars("eval/return_mean")] == [3, 6]
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))

    result = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--env", "Pendulum-v1", "--episodes", "2", "--json", str(result)]) == 0
    res = json.loads(result.read_text())
    assert res["episodes"] == 2 and len(res["returns"]) == 2 and res["lengths"] == [200, 200]
    lo, hi = res["ref_min_score"], res["ref_max_score"]  # the Pendulum-v1 preset's references
    assert np.isclose(res["normalized_score_mean"], np.mean([100 * (r - lo) / (hi - lo) for r in res["returns"]]))


def _tiny_run(ds, logdir, updates=8, **kw):
    mc = model_config_for(ds, backbone="aaren", context="episode", embed_dim=16, n_layer=2, dropout=0.2)
    tc = TrainConfig(updates=updates, batch_size=3, warmup_steps=3, log_every=2, eval_every=0, eval_episodes=0,
                     checkpoint_every=4, seed=7, **kw)
    return train(mc, tc, ds, logdir, progress=False, resume=True)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, hdf5_dataset, monkeypatch):
    ds = load_dataset(hdf5_dataset)
    _tiny_run(ds, tmp_path / "straight")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step_0000008" / "model.safetensors")

    calls = {"n": 0}
    real = TrajectoryDataset.sample_episodes

    def killed_at_update_6(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # the process dies after checkpoint 4, before update 6
        return real(self, *a, **k)

    monkeypatch.setattr(TrajectoryDataset, "sample_episodes", killed_at_update_6)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(ds, tmp_path / "killed")
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    monkeypatch.setattr(TrajectoryDataset, "sample_episodes", real)
    _tiny_run(ds, tmp_path / "killed")
    resumed = load_file(tmp_path / "killed" / "checkpoints" / "step_0000008" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    first = load_file(tmp_path / "straight" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert not all(torch.equal(straight[k], first[k]) for k in straight)  # the updates did change weights


def test_checkpoint_round_trip(tmp_path, hdf5_dataset):
    ds = load_dataset(hdf5_dataset)
    torch.manual_seed(0)
    model = DecisionModel(model_config_for(ds, embed_dim=16, n_layer=1), ds.obs_mean, ds.obs_std)
    save_checkpoint(tmp_path, 5, model, {"env_id": "Pendulum-v1"})
    loaded, info = load_checkpoint(tmp_path)
    assert info["step"] == 5 and info["model"] == model.config.to_dict()
    assert np.allclose(info["obs_mean"], ds.obs_mean)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # nothing half-written is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000005"]


def test_bad_inputs_fail_clearly(tmp_path, hdf5_dataset, capsys):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["evaluate", str(tmp_path / "nope"), "--env", "Pendulum-v1"])
    ds = load_dataset(hdf5_dataset)
    model = DecisionModel(model_config_for(ds, embed_dim=16, n_layer=1), ds.obs_mean, ds.obs_std)
    folder = save_checkpoint(tmp_path / "ck", 1, model, {})
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is corrupt"):
        load_checkpoint(folder)
    with pytest.raises(SystemExit, match="unknown agent preset 'nope'.*decision_aaren"):
        main(["train", "--agent", "nope", "--dataset", str(hdf5_dataset)])
    with pytest.raises(SystemExit, match=r"unknown \[model\] key\(s\) \['width'\]"):
        main(["train", "--dataset", str(hdf5_dataset), "--set", "model.width=3", "--logdir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="batch_size must be positive"):
        main(["train", "--dataset", str(hdf5_dataset), "--batch-size", "0", "--logdir", str(tmp_path / "r")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="is not empty; pass --resume"):
        main(["train", "--dataset", str(hdf5_dataset), "--logdir", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="no such HDF5 dataset file"):
        main(["train", "--dataset", str(tmp_path / "missing.hdf5"), "--logdir", str(tmp_path / "r2")])


def test_evaluate_records_a_video(tmp_path):
    # a MuJoCo env rendered headless (EGL); an untrained model drops the pole within a few steps
    import os
    import subprocess
    import sys

    from aaren_rl.model import ModelConfig

    torch.manual_seed(0)
    model = DecisionModel(ModelConfig(embed_dim=16, n_layer=1, observation_dim=4, action_dim=1,
                                      action_low=[-3.0], action_high=[3.0]))
    save_checkpoint(tmp_path / "ck", 1, model, {"env_id": "InvertedPendulum-v5", "target_return": 100.0})
    video = tmp_path / "episode.gif"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, "-m", "aaren_rl", "evaluate", str(tmp_path / "ck"), "--episodes", "1",
                           "--video", str(video)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    if proc.returncode and ("EGL" in proc.stderr or "glGetError" in proc.stderr):
        pytest.skip(f"no headless OpenGL here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    import imageio.v2 as imageio

    frames = imageio.mimread(video)
    assert len(frames) >= 2 and frames[0].shape[-1] in (3, 4)
    with pytest.raises(SystemExit, match="--video must end in .gif or .mp4"):
        main(["evaluate", str(tmp_path / "ck"), "--episodes", "1", "--video", str(tmp_path / "v.avi")])
