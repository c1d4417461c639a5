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


def _train(dataset, run, *extra, updates=4):
    return main(["train", "--dataset", str(dataset), "--updates", str(updates), "--eval-episodes", "0",
                 "--checkpoint-every", "2", "--logdir", str(run), "--no-progress", *extra, "--set", *TINY])


def _pendulum_file(path, obs_dim=3, reward_shift=0.0, env_id="Pendulum-v1"):
    rng = np.random.default_rng(1)
    episodes = [RawEpisode(observations=rng.normal(size=(21, obs_dim)).astype(np.float32),
                           actions=rng.uniform(-2, 2, size=(20, 1)).astype(np.float32),
                           rewards=(reward_shift - rng.uniform(0, 16, size=20)).astype(np.float32),
                           terminated=False, truncated=True) for _ in range(4)]
    return write_hdf5(path, episodes, env_id, ref_min_score=-1200.0, ref_max_score=-150.0,
                      action_low=[-2.0], action_high=[2.0])


def test_resume_refuses_changed_settings_and_names_them(tmp_path, hdf5_dataset, capsys):
    run = tmp_path / "run"
    assert _train(hdf5_dataset, run) == 0
    assert "target return -150 (the dataset's ref_max_score)" in capsys.readouterr().out
    other = _pendulum_file(tmp_path / "other.hdf5", reward_shift=1.0)
    for extra, dataset, expected in [
        (["--batch-size", "8"], hdf5_dataset, r"train.batch_size 4 -> 8"),
        (["--seed", "3"], hdf5_dataset, r"train.seed 0 -> 3"),
        ([], other, r"dataset.episodes 6 -> 4; dataset.steps 180 -> 80; dataset.return_mean"),
    ]:
        with pytest.raises(SystemExit, match=rf"cannot resume {run}: settings differ .*{expected}"):
            _train(dataset, run, "--resume", *extra, updates=6)
    with pytest.raises(SystemExit, match=r"train.learning_rate 0.0001 -> 0.001"):
        main(["train", "--dataset", str(hdf5_dataset), "--updates", "6", "--logdir", str(run), "--resume",
              "--no-progress", "--set", *TINY, "train.learning_rate=1e-3"])
    with pytest.raises(SystemExit, match=r"model.embed_dim 16 -> 32"):
        main(["train", "--dataset", str(hdf5_dataset), "--updates", "6", "--logdir", str(run), "--resume",
              "--no-progress", "--set", *TINY, "model.embed_dim=32"])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert _train(hdf5_dataset, run, "--resume", "--eval-every", "3", updates=6) == 0  # what may change
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the foreign pickle, on purpose
def test_resume_from_a_damaged_checkpoint_is_one_clear_line(tmp_path, hdf5_dataset):
    import argparse
    import pickle
    import shutil

    good = tmp_path / "good"
    assert _train(hdf5_dataset, good) == 0
    step = "checkpoints/step_0000004"
    for name, damage, expected in [
        ("model.safetensors", lambda b: b[: len(b) // 2], "model.safetensors is corrupt"),
        ("trainer.pt", lambda b: b[: len(b) // 2], "trainer.pt is corrupt or not a trainer state"),
        ("trainer.pt", lambda b: pickle.dumps(argparse.Namespace(step=4)),
         "trainer.pt is corrupt or not a trainer state .*UnpicklingError"),
        ("trainer.pt", lambda b: _saved({"step": 4}), r"trainer.pt is not a trainer state: missing \['optimizer'"),
    ]:
        run = tmp_path / "damaged"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(good, run)
        f = run / step / name
        f.write_bytes(damage(f.read_bytes()))
        with pytest.raises(SystemExit, match=f"^aaren-rl train: error: .*{expected}") as e:
            _train(hdf5_dataset, run, "--resume", updates=6)
        assert "\n" not in str(e.value)


def test_the_last_checkpoint_is_saved_before_the_final_evaluation(tmp_path, hdf5_dataset, monkeypatch):
    import aaren_rl.evaluate

    def broken(*a, **k):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(aaren_rl.evaluate, "evaluate_policy", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        main(["train", "--dataset", str(hdf5_dataset), "--updates", "3", "--eval-every", "0", "--eval-episodes", "1",
              "--checkpoint-every", "100", "--logdir", str(run), "--no-progress", "--set", *TINY])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    monkeypatch.undo()
    assert _train(hdf5_dataset, tmp_path / "evaluated", "--eval-episodes", "1", updates=2) == 0
    info = json.loads((tmp_path / "evaluated" / "checkpoints" / "step_0000002" / "config.json").read_text())
    assert info["last_eval"]["step"] == 2 and info["last_eval"]["episodes"] == 1  # added after the save


def test_env_spaces_are_checked_before_any_training(tmp_path):
    wide = _pendulum_file(tmp_path / "wide.hdf5", obs_dim=5)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"Pendulum-v1 does not match the dataset .*wide.hdf5'?: observations have "
                                         r"3 entries in the env, 5 in"):
        main(["train", "--dataset", str(wide), "--updates", "3", "--eval-episodes", "1", "--logdir", str(run),
              "--no-progress", "--set", *TINY])
    assert not (run / "checkpoints").exists()


def test_a_d4rl_file_without_an_env_id_asks_for_env(tmp_path):
    import h5py

    path = tmp_path / "plain.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((6, 3), np.float32)
        f["actions"] = np.zeros((6, 1), np.float32)
        f["rewards"] = np.zeros(6, np.float32)
        f["terminals"] = np.zeros(6, bool)
        f["timeouts"] = np.eye(1, 6, 5, dtype=bool)[0]
    with pytest.raises(SystemExit, match=r"names no environment \(no env_id attribute\): pass --env"):
        main(["train", "--dataset", str(path), "--logdir", str(tmp_path / "r")])


def test_stale_save_folders_are_cleaned_and_permissions_follow_the_umask(tmp_path, hdf5_dataset):
    import os

    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".step_0000002.x1y2").mkdir(parents=True)  # what a kill -9 during a save leaves
    (ckpts / ".step_0000002.x1y2" / "model.safetensors").write_bytes(b"half")
    (ckpts / ".latest.abc").write_text("step_0000002")
    old = os.umask(0o027)
    try:
        assert _train(hdf5_dataset, tmp_path / "run", "--resume", updates=2) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]
    assert (ckpts / "step_0000002").stat().st_mode & 0o777 == 0o750
    assert (ckpts / "latest").stat().st_mode & 0o777 == 0o640
    assert (ckpts / "step_0000002" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_video_dependencies_are_checked_before_the_evaluation(tmp_path, hdf5_dataset, monkeypatch, capsys):
    import sys

    import aaren_rl.evaluate

    run = tmp_path / "run"
    assert _train(hdf5_dataset, run, updates=2) == 0
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if aaren-rl[video] were not installed
    monkeypatch.setattr(aaren_rl.evaluate, "evaluate_policy", lambda *a, **k: pytest.fail("evaluated first"))
    with pytest.raises(SystemExit, match=r"rendering Pendulum-v1 needs a package .*aaren-rl\[video\]"):
        main(["evaluate", str(run), "--episodes", "1", "--video", str(tmp_path / "v.gif")])
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(SystemExit, match=r"an .mp4 video needs imageio-ffmpeg: .*aaren-rl\[video\]"):
        main(["evaluate", str(run), "--episodes", "1", "--video", str(tmp_path / "v.mp4")])
    monkeypatch.undo()
    assert main(["evaluate", str(run), "--episodes", "1", "--target-return", "-200"]) == 0
    assert "target return -200 (--target-return)" in capsys.readouterr().out
