"""aaren_rl.data: episodes, loading (Minari, D4RL-format HDF5), sampling, scores, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from aaren_rl.data import Batch, Episode, TrajectoryDataset, load_dataset, normalized_score
from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.writers import write_hdf5, write_minari

OBS_DIM, ACT_DIM = 3, 1  # Pendulum-v1


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def raw_episode(T: int, seed: int, terminated=False, truncated=True) -> RawEpisode:
    rng = np.random.default_rng(seed)
    return RawEpisode(
        observations=rng.normal(size=(T + 1, OBS_DIM)),
        actions=rng.uniform(-2, 2, size=(T, ACT_DIM)).astype(np.float32),
        rewards=rng.normal(size=T), terminated=terminated, truncated=truncated,
    )


@pytest.fixture
def raw_episodes():
    # a terminal, a time-out, and a shorter terminal: lengths 5, 8, 3
    return [raw_episode(5, 0, True, False), raw_episode(8, 1, False, True), raw_episode(3, 2, True, False)]


def make_dataset(lengths=(5, 8, 3), discrete=False) -> TrajectoryDataset:
    rng = np.random.default_rng(0)
    episodes = []
    for i, T in enumerate(lengths):
        actions = rng.integers(0, 2, size=T) if discrete else rng.normal(size=(T, ACT_DIM))
        episodes.append(Episode(rng.normal(size=(T, OBS_DIM)) * 5 + 1, actions, rng.normal(size=T),
                                terminated=i % 2 == 0, truncated=i % 2 == 1))
    return TrajectoryDataset(episodes, env_id="Pendulum-v1", ref_min_score=-1000.0, ref_max_score=-100.0)


# ---------------------------------------------------------------------------------- episodes


def test_returns_to_go_are_undiscounted_suffix_sums():
    ep = Episode(np.zeros((4, 2)), np.zeros((4, 1)), [1.0, 2.0, -3.0, 0.5])
    np.testing.assert_allclose(ep.returns_to_go, [0.5, -0.5, -2.5, 0.5])
    assert ep.episode_return == pytest.approx(0.5)


def test_episode_arrays_must_have_equal_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        Episode(np.zeros((4, 2)), np.zeros((3, 1)), np.zeros(4))


def test_dataset_statistics_and_floored_std():
    obs = np.zeros((6, 2))
    obs[:, 1] = np.arange(6)  # column 0 is constant: its std is floored, not zero
    ds = TrajectoryDataset([Episode(obs, np.zeros((6, 1)), np.ones(6))])
    assert ds.obs_std[0] == pytest.approx(1e-6) and ds.obs_std[1] == pytest.approx(np.arange(6).std())
    assert (ds.num_episodes, ds.num_steps, ds.observation_dim, ds.action_dim) == (1, 6, 2, 1)
    assert ds.return_mean == ds.return_max == 6.0 and ds.return_std == 0.0


# ---------------------------------------------------------------------------------- loading


def test_hdf5_round_trip_keeps_terminals_and_timeouts_apart(tmp_path, raw_episodes):
    path = write_hdf5(tmp_path / "d.hdf5", raw_episodes, "Pendulum-v1", ref_min_score=-1.0, ref_max_score=9.0)
    with h5py.File(path) as f:
        assert set(f) == {"observations", "next_observations", "actions", "rewards", "terminals", "timeouts"}
        assert f["observations"].dtype == np.float32  # as D4RL's
        np.testing.assert_allclose(f["next_observations"][:4], raw_episodes[0].observations[1:5], rtol=1e-6)
    ds = load_dataset(path)
    assert ds.env_id == "Pendulum-v1" and (ds.ref_min_score, ds.ref_max_score) == (-1.0, 9.0)
    assert [len(ep) for ep in ds.episodes] == [5, 8, 3]
    assert [(ep.terminated, ep.truncated) for ep in ds.episodes] == [(True, False), (False, True), (True, False)]
    for ep, raw in zip(ds.episodes, raw_episodes):
        np.testing.assert_allclose(ep.observations, raw.observations[:-1], rtol=1e-6)
        np.testing.assert_allclose(ep.actions, raw.actions)
        np.testing.assert_allclose(ep.returns_to_go[0], raw.rewards.sum(), rtol=1e-5)
    np.testing.assert_array_equal(ds.action_low, [-2.0])
    np.testing.assert_array_equal(ds.action_high, [2.0])
    assert ds.episodes[0].observations.dtype == np.float32 and ds.episodes[0].actions.dtype == np.float32


def test_hdf5_recording_that_stops_mid_episode_ends_with_a_timeout(tmp_path):
    path = tmp_path / "d4rl.hdf5"
    with h5py.File(path, "w") as f:  # D4RL's own layout, no attrs: env id passed by the caller
        f["observations"] = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
        f["actions"] = np.zeros((7, 1), np.float32)
        f["rewards"] = np.ones(7, np.float32)
        f["terminals"] = np.array([0, 1, 0, 0, 0, 0, 0], bool)
        f["timeouts"] = np.array([0, 0, 0, 1, 0, 0, 0], bool)
    ds = load_dataset(path, env_id="Pendulum-v1", ref_min_score=0.0, ref_max_score=10.0)
    assert [len(ep) for ep in ds.episodes] == [2, 2, 3]
    assert [(ep.terminated, ep.truncated) for ep in ds.episodes] == [(True, False), (False, True), (False, True)]
    assert ds.normalized_score(5.0) == pytest.approx(50.0)


def test_minari_round_trip(raw_episodes, minari_root):
    write_minari("test/pendulum/tiny-v0", raw_episodes, "Pendulum-v1", ref_min_score=-1000.0, ref_max_score=-100.0)
    assert (minari_root / "test/pendulum/tiny-v0/data").is_dir()
    ds = load_dataset("test/pendulum/tiny-v0")
    assert ds.env_id == "Pendulum-v1" and not ds.discrete
    assert (ds.ref_min_score, ds.ref_max_score) == (-1000.0, -100.0)
    assert [(len(ep), ep.terminated, ep.truncated) for ep in ds.episodes] == [(5, True, False), (8, False, True), (3, True, False)]
    np.testing.assert_allclose(ds.episodes[1].observations, raw_episodes[1].observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(ds.episodes[1].rewards, raw_episodes[1].rewards, rtol=1e-6)
    np.testing.assert_array_equal(ds.action_low, [-2.0])
    assert ds.normalized_score(-550.0) == pytest.approx(50.0)


def test_discrete_actions_load_as_int64(tmp_path):
    eps = [RawEpisode(np.zeros((4, 4)), np.array([0, 1, 1]), np.ones(3), True, False)]
    ds = load_dataset(write_hdf5(tmp_path / "c.hdf5", eps, "CartPole-v1"))
    assert ds.discrete and ds.action_dim == 2 and ds.episodes[0].actions.dtype == np.int64
    batch = ds.sample_windows(4, 3, torch.Generator().manual_seed(0))
    assert batch.actions.shape == (4, 3) and batch.actions.dtype == torch.int64


# ---------------------------------------------------------------------------------- sampling


def test_window_batches_shapes_masks_and_normalization():
    lengths = (5, 8, 3)
    # observation = (episode index, timestep, noise): each row of a batch says where it came from
    episodes = [Episode(np.stack([np.full(T, e), np.arange(T), np.random.default_rng(e).normal(size=T)], 1),
                        np.random.default_rng(e).normal(size=(T, ACT_DIM)), np.arange(T) + 10.0 * e)
                for e, T in enumerate(lengths)]
    ds = TrajectoryDataset(episodes)
    b = ds.sample_windows(64, K=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(b, Batch)
    assert b.observations.shape == (64, 4, OBS_DIM) and b.actions.shape == (64, 4, ACT_DIM)
    for key in ("returns_to_go", "rewards", "timesteps", "padding_mask"):
        assert getattr(b, key).shape == (64, 4)
    assert b.timesteps.dtype == torch.int64 and b.padding_mask.dtype == torch.bool
    raw = b.observations.numpy() * ds.obs_std + ds.obs_mean  # undo the normalization
    for row in range(64):
        e, t0 = int(round(raw[row, 0, 0])), int(round(raw[row, 0, 1]))
        ep = ds.episodes[e]
        assert t0 == b.timesteps[row, 0]
        n_real = min(4, len(ep) - t0)  # the window starts at t0 and stops at the episode's end
        assert (~b.padding_mask[row]).sum() == n_real and not b.padding_mask[row, :n_real].any()
        np.testing.assert_allclose(raw[row, :n_real], ep.observations[t0:t0 + n_real], atol=1e-4)
        np.testing.assert_allclose(b.actions[row, :n_real], ep.actions[t0:t0 + n_real])
        np.testing.assert_allclose(b.returns_to_go[row, :n_real], ep.returns_to_go[t0:t0 + n_real], rtol=1e-5)
        np.testing.assert_allclose(b.rewards[row, :n_real], ep.rewards[t0:t0 + n_real])
        np.testing.assert_array_equal(b.timesteps[row, :n_real], np.arange(t0, t0 + n_real))
        for key in ("observations", "actions", "returns_to_go", "rewards", "timesteps"):
            assert (getattr(b, key)[row, n_real:] == 0).all()  # padding is zeros
    # normalized with the dataset's statistics: over all real steps, mean 0 and std 1
    flat = (ds.flat.observations - ds.flat.obs_mean) / ds.flat.obs_std
    assert flat.mean(0).abs().max() < 1e-4 and (flat.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_windows_start_at_every_timestep_uniformly():
    ds = make_dataset(lengths=(1, 9))  # 10 steps: each should start ~10% of the windows
    b = ds.sample_windows(5000, K=2, generator=torch.Generator().manual_seed(1))
    from_short = (b.padding_mask[:, 1] & (b.timesteps[:, 0] == 0)).float().mean().item()
    assert 0.08 < from_short < 0.12  # DT weights episodes by length: 1 step in 10
    counts = torch.bincount(b.timesteps[:, 0], minlength=9).float() / 5000
    assert counts[0] == pytest.approx(0.2, abs=0.03)  # t = 0 of both episodes
    assert ((counts[1:] - 0.1).abs() < 0.025).all()


def test_episode_batches_start_at_zero_and_pad_to_longest_or_max_len():
    ds = make_dataset()
    b = ds.sample_episodes(16, generator=torch.Generator().manual_seed(0))
    L = int((~b.padding_mask).sum(1).max())
    assert b.observations.shape == (16, L, OBS_DIM) and L <= 8
    assert (b.timesteps[:, 0] == 0).all()
    lengths = (~b.padding_mask).sum(1)
    assert set(lengths.tolist()) <= {5, 8, 3}
    for row in range(16):
        n = int(lengths[row])
        np.testing.assert_array_equal(b.timesteps[row, :n], np.arange(n))
    b = ds.sample_episodes(16, generator=torch.Generator().manual_seed(0), max_len=6)
    assert b.observations.shape == (16, 6, OBS_DIM) and (~b.padding_mask).sum(1).max() == 6


def test_sampling_is_reproducible_with_a_generator_and_batches_move():
    ds = make_dataset()
    a = ds.sample_windows(8, 3, torch.Generator().manual_seed(7))
    b = ds.sample_windows(8, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a.observations, b.observations) and torch.equal(a.timesteps, b.timesteps)
    moved = a.to("cpu")
    assert isinstance(moved, Batch) and ds.to("cpu").device.type == "cpu"


@pytest.mark.parametrize("kwargs", [dict(batch_size=0, K=4), dict(batch_size=4, K=0),
                                    dict(batch_size=2.5, K=4), dict(batch_size=4, K=-1)])
def test_bad_batch_size_or_K_is_an_error(kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        make_dataset().sample_windows(generator=None, **kwargs)


# ---------------------------------------------------------------------------------- scores


def test_normalized_score():
    assert normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    np.testing.assert_allclose(normalized_score([0.0, 5.0], 0.0, 10.0), [0.0, 50.0])
    assert make_dataset().normalized_score(-100.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="reference returns"):
        TrajectoryDataset(make_dataset().episodes).normalized_score(1.0)


# ---------------------------------------------------------------------------------- bad input


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def good_arrays(n=6):
    return dict(observations=np.zeros((n, 3), np.float32), actions=np.zeros((n, 1), np.float32),
                rewards=np.zeros(n, np.float32), terminals=np.zeros(n, bool), timeouts=np.eye(1, n, n - 1, dtype=bool)[0])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        load_dataset(tmp_path / "nope.hdf5")


def test_missing_or_misnamed_hdf5_key(tmp_path):
    arrays = good_arrays()
    arrays["terminal"] = arrays.pop("terminals")  # misnamed
    with pytest.raises(KeyError, match="terminals"):
        load_dataset(write_h5(tmp_path / "bad.hdf5", **arrays), env_id="Pendulum-v1")


def test_mismatched_lengths(tmp_path):
    arrays = good_arrays()
    arrays["rewards"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="differ in length"):
        load_dataset(write_h5(tmp_path / "bad.hdf5", **arrays), env_id="Pendulum-v1")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_values(tmp_path, value):
    arrays = good_arrays()
    arrays["observations"][2, 1] = value
    with pytest.raises(ValueError, match="'observations' has NaN/inf"):
        load_dataset(write_h5(tmp_path / "bad.hdf5", **arrays), env_id="Pendulum-v1")


def test_zero_episodes(tmp_path):
    with pytest.raises(ValueError, match="zero"):
        load_dataset(write_h5(tmp_path / "empty.hdf5", **good_arrays(0)), env_id="Pendulum-v1")
    with pytest.raises(ValueError, match="zero episodes"):
        TrajectoryDataset([])


def test_unknown_environment_id(tmp_path):
    with pytest.raises(KeyError, match="NoSuchEnv-v0"):
        load_dataset(write_h5(tmp_path / "d.hdf5", **good_arrays()), env_id="NoSuchEnv-v0")


def test_unknown_environment_id_for_a_minari_dataset(raw_episodes):
    write_minari("test/pendulum/tiny-v0", raw_episodes, "Pendulum-v1", ref_min_score=0.0, ref_max_score=1.0)
    with pytest.raises(KeyError, match="NoSuchEnv-v0"):
        load_dataset("test/pendulum/tiny-v0", env_id="NoSuchEnv-v0")
    assert load_dataset("test/pendulum/tiny-v0", env_id="Pendulum-v1").env_id == "Pendulum-v1"


def test_unknown_minari_dataset(raw_episodes):
    write_minari("test/pendulum/tiny-v0", raw_episodes, "Pendulum-v1", ref_min_score=0.0, ref_max_score=1.0)
    with pytest.raises(FileNotFoundError, match="test/pendulum/nothing-v0.*test/pendulum/tiny-v0"):
        load_dataset("test/pendulum/nothing-v0")
    with pytest.raises(ValueError, match="version suffix"):
        load_dataset("test/pendulum/tiny")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("mujoco/hopper/medium-v0")  # a remote dataset: fetch it
    with pytest.raises(FileNotFoundError, match="make it with `aaren-rl collect --env hopper`") as e:
        load_dataset("aaren-rl/hopper/medium-v0")  # this project's own: made here, never downloaded
    assert "download=True" not in str(e.value)


def test_a_directory_named_like_a_file_is_said_to_be_a_directory(tmp_path):
    (tmp_path / "x.hdf5").mkdir()
    with pytest.raises(ValueError, match="x.hdf5 is a directory, not an HDF5 dataset file"):
        load_dataset(tmp_path / "x.hdf5")


def test_integer_actions_for_a_continuous_env_are_refused(tmp_path):
    arrays = good_arrays()
    arrays["actions"] = np.zeros(6, np.int64)
    with pytest.raises(ValueError, match=r"'actions' are int64 of shape \(6,\), but Pendulum-v1's continuous "
                                         r"actions are floats of shape \(steps, 1\)"):
        load_dataset(write_h5(tmp_path / "int.hdf5", **arrays), env_id="Pendulum-v1")
    arrays["actions"] = np.zeros((6, 2), np.float32)
    with pytest.raises(ValueError, match="'actions' have 2 entries per step, but Pendulum-v1's continuous actions have 1"):
        load_dataset(write_h5(tmp_path / "wide.hdf5", **arrays), env_id="Pendulum-v1")


def test_a_file_without_any_episode_end_is_refused(tmp_path):
    arrays = good_arrays()
    arrays["timeouts"][:] = False
    with pytest.raises(ValueError, match="noflags.hdf5: no step of 6 has a terminal or timeout flag"):
        load_dataset(write_h5(tmp_path / "noflags.hdf5", **arrays), env_id="Pendulum-v1")
