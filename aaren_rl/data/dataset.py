"""Offline datasets as episodes: loading Minari datasets and D4RL-format HDF5 files.

``load_dataset(source)`` is the one entry point. It returns a :class:`TrajectoryDataset`: a list of
:class:`Episode` (terminal and time-out kept apart, returns-to-go precomputed), the statistics a
model needs (observation mean/std, action bounds) and the reference returns that turn a return
into a D4RL normalized score. The same episodes are also kept as flat torch tensors so that batches
are built by tensor indexing, on whatever device the dataset was moved to (see ``sampling.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .sampling import Batch, FlatEpisodes, sample_episodes, sample_packed, sample_segments, sample_windows

HDF5_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
OBS_STD_FLOOR = 1e-6
_MINARI_ID = re.compile(r"^[-_\w][-_\w/]*-v\d+$")


# ---------------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One episode: T steps of (observation, action, reward), and how it ended.

    ``terminated`` means the environment reached a terminal state (no value beyond it);
    ``truncated`` means it was cut (time limit, or the end of a recording): the return would
    have continued. ``returns_to_go[t]`` is the undiscounted sum of ``rewards[t:]``.
    """

    observations: np.ndarray  # (T, obs_dim) float32
    actions: np.ndarray  # (T, act_dim) float32, or (T,) int64 for discrete actions
    rewards: np.ndarray  # (T,) float32
    terminated: bool = False
    truncated: bool = False
    returns_to_go: np.ndarray = field(init=False, repr=False)  # (T,) float32

    def __post_init__(self):
        self.observations = np.asarray(self.observations, dtype=np.float32)
        actions = np.asarray(self.actions)
        discrete = np.issubdtype(actions.dtype, np.integer) and actions.ndim == 1
        self.actions = actions.astype(np.int64) if discrete else actions.astype(np.float32)
        if self.actions.ndim == 1 and not discrete:
            self.actions = self.actions[:, None]
        self.rewards = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        if self.observations.ndim == 1:
            self.observations = self.observations[:, None]
        T = len(self.rewards)
        if T == 0:
            raise ValueError("an episode needs at least one step, got 0")
        if len(self.observations) != T or len(self.actions) != T:
            raise ValueError(
                f"episode arrays differ in length: observations {len(self.observations)}, "
                f"actions {len(self.actions)}, rewards {T} (expected all equal)"
            )
        self.terminated, self.truncated = bool(self.terminated), bool(self.truncated)
        # Suffix sums in float64, so long episodes keep their precision.
        self.returns_to_go = np.cumsum(self.rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


# ---------------------------------------------------------------------------------- scores


def normalized_score(returns, ref_min: float | None, ref_max: float | None):
    """D4RL's normalized score, ``100 * (R - ref_min) / (ref_max - ref_min)``: 0 = random, 100 = expert."""
    if ref_min is None or ref_max is None:
        raise ValueError(
            f"cannot normalize a score without reference returns (ref_min={ref_min}, "
            f"ref_max={ref_max}); pass ref_min_score/ref_max_score to load_dataset, or use a dataset "
            "whose metadata has them"
        )
    if ref_max == ref_min:
        raise ValueError(f"ref_max ({ref_max}) must differ from ref_min ({ref_min})")
    scores = 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(scores) if scores.ndim == 0 else scores


# ---------------------------------------------------------------------------------- dataset


class TrajectoryDataset:
    """Episodes plus what training and evaluation need to know about them.

    Observations in batches are normalized with ``obs_mean``/``obs_std``; returns-to-go are raw
    (the model scales them). ``.to(device)`` moves the flat tensors once; sampling then runs on
    that device with no Python loop over the batch.
    """

    def __init__(
        self,
        episodes: list[Episode],
        *,
        env_id: str | None = None,
        action_low=None,
        action_high=None,
        discrete: bool | None = None,
        ref_min_score: float | None = None,
        ref_max_score: float | None = None,
        name: str | None = None,
    ):
        if len(episodes) == 0:
            raise ValueError(f"dataset {name!r} has zero episodes; expected at least one")
        self.episodes = list(episodes)
        self.name = name
        self.env_id = env_id
        first = self.episodes[0]
        self.discrete = bool(first.actions.ndim == 1) if discrete is None else bool(discrete)
        self.observation_dim = int(first.observations.shape[1])
        if not self.discrete:
            self.action_dim = int(first.actions.shape[1])
        elif action_high is not None:  # discrete: the number of actions
            self.action_dim = int(np.asarray(action_high).item() - np.asarray(action_low).item() + 1)
        else:
            self.action_dim = max(int(ep.actions.max()) for ep in self.episodes) + 1
        for i, ep in enumerate(self.episodes):
            if ep.observations.shape[1] != self.observation_dim:
                raise ValueError(
                    f"episode {i} has observation dim {ep.observations.shape[1]}, "
                    f"episode 0 has {self.observation_dim}"
                )
        self.action_low = None if action_low is None else np.asarray(action_low, dtype=np.float32)
        self.action_high = None if action_high is None else np.asarray(action_high, dtype=np.float32)
        self.ref_min_score = None if ref_min_score is None else float(ref_min_score)
        self.ref_max_score = None if ref_max_score is None else float(ref_max_score)

        all_obs = np.concatenate([ep.observations for ep in self.episodes]).astype(np.float64)
        self.obs_mean = all_obs.mean(0).astype(np.float32)
        self.obs_std = np.maximum(all_obs.std(0), OBS_STD_FLOOR).astype(np.float32)
        self.flat = FlatEpisodes.from_episodes(self.episodes, self.obs_mean, self.obs_std)

    # -- summary
    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_steps(self) -> int:
        return int(sum(len(ep) for ep in self.episodes))

    @property
    def returns(self) -> np.ndarray:
        return np.array([ep.episode_return for ep in self.episodes])

    @property
    def return_mean(self) -> float:
        return float(self.returns.mean())

    @property
    def return_std(self) -> float:
        return float(self.returns.std())

    @property
    def return_max(self) -> float:
        return float(self.returns.max())

    @property
    def max_episode_length(self) -> int:
        return int(max(len(ep) for ep in self.episodes))

    def summary(self) -> dict:
        return {
            "name": self.name, "env_id": self.env_id, "episodes": self.num_episodes,
            "steps": self.num_steps, "return_mean": self.return_mean,
            "return_std": self.return_std, "return_max": self.return_max,
            "ref_min_score": self.ref_min_score, "ref_max_score": self.ref_max_score,
        }

    def __repr__(self) -> str:
        return (f"TrajectoryDataset({self.name or self.env_id!r}: {self.num_episodes} episodes, "
                f"{self.num_steps} steps, return {self.return_mean:.1f} ± {self.return_std:.1f})")

    def normalized_score(self, returns):
        return normalized_score(returns, self.ref_min_score, self.ref_max_score)

    # -- sampling
    @property
    def device(self) -> torch.device:
        return self.flat.observations.device

    def to(self, device) -> "TrajectoryDataset":
        self.flat = self.flat.to(device)
        return self

    def sample_windows(self, batch_size: int, K: int, generator: torch.Generator | None = None) -> Batch:
        return sample_windows(self.flat, batch_size, K, generator)

    def sample_episodes(self, batch_size: int, generator: torch.Generator | None = None,
                        max_len: int | None = None) -> Batch:
        return sample_episodes(self.flat, batch_size, generator, max_len)

    def sample_segments(self, batch_size: int, K: int, generator: torch.Generator | None = None,
                        max_prefix: int | None = None) -> tuple[Batch, Batch]:
        return sample_segments(self.flat, batch_size, K, generator, max_prefix)

    def sample_packed(self, batch_size: int, row_len: int, generator: torch.Generator | None = None,
                      candidates: int | None = None) -> Batch:
        return sample_packed(self.flat, batch_size, row_len, generator, candidates)

    @property
    def min_episode_length(self) -> int:
        return int(min(len(ep) for ep in self.episodes))


# ---------------------------------------------------------------------------------- loading


def load_dataset(
    source: str | os.PathLike,
    env_id: str | None = None,
    download: bool = False,
    *,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
) -> TrajectoryDataset:
    """Load a Minari dataset id (``"aaren-rl/hopper/medium-v0"``) or a D4RL-format ``.hdf5`` file.

    ``env_id`` names the gymnasium environment when the source does not (HDF5 files without an
    ``env_id`` attribute); ``download`` is passed to Minari (needs ``minari[hf]`` and the network).
    ``ref_min_score``/``ref_max_score`` override the reference returns stored with the data.
    """
    path = Path(source)
    looks_like_file = path.suffix.lower() in (".hdf5", ".h5") or path.is_file()
    if looks_like_file:
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an HDF5 dataset file")
        if not path.is_file():
            raise FileNotFoundError(f"no such HDF5 dataset file: {path}")
        ds = _load_hdf5(path, env_id)
    else:
        ds = _load_minari(str(source), env_id, download)
    if ref_min_score is not None:
        ds.ref_min_score = float(ref_min_score)
    if ref_max_score is not None:
        ds.ref_max_score = float(ref_max_score)
    return ds


def _space_bounds(space):
    """(discrete, low, high) of a gymnasium Box or Discrete space."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        return True, np.array(space.start), np.array(space.start + space.n - 1)
    if isinstance(space, gym.spaces.Box):
        return False, space.low.reshape(-1), space.high.reshape(-1)
    raise ValueError(f"unsupported action space {space}; expected Box or Discrete")


def env_spec(env_id: str):
    """gymnasium's spec of ``env_id``; a ``module:Name-vN`` id imports its module first, as
    ``gym.make`` does (e.g. ``aaren_rl.memory:MemoryLength50-v0``). Raises gymnasium's error."""
    import importlib

    import gymnasium as gym

    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise gym.error.Error(f"cannot import {module!r} for {env_id!r}: {e}") from None
    return gym.spec(name)


def _check_env_id(env_id: str) -> None:
    import gymnasium as gym

    try:
        env_spec(env_id)
    except gym.error.Error as e:
        raise KeyError(f"unknown gymnasium environment id {env_id!r}: {e}") from None


def env_action_bounds(env_id: str):
    """(discrete, low, high) from gymnasium's registration of ``env_id``; KeyError if unknown."""
    import gymnasium as gym

    _check_env_id(env_id)
    env = gym.make(env_id)
    try:
        return _space_bounds(env.action_space)
    finally:
        env.close()


def _check_finite(name: str, array: np.ndarray, where: str):
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"{where}: {name!r} has NaN/inf values (first at index {tuple(bad)})")


def _check_continuous_actions(actions: np.ndarray, low, where: str, env_id) -> None:
    """Actions for a continuous (Box) action space: floats, one row of ``len(low)`` entries per step."""
    space = f"{env_id}'s continuous actions" if env_id else "continuous actions"
    if np.issubdtype(actions.dtype, np.integer) or actions.dtype == bool:
        raise ValueError(f"{where}: 'actions' are {actions.dtype} of shape {actions.shape}, but {space} "
                         f"are floats of shape (steps, {np.size(low)})")
    width = 1 if actions.ndim == 1 else int(np.prod(actions.shape[1:]))
    if low is not None and width != np.size(low):
        raise ValueError(f"{where}: 'actions' have {width} entries per step, but {space} have {np.size(low)}")


def _load_minari(dataset_id: str, env_id: str | None, download: bool) -> TrajectoryDataset:
    import minari

    if not _MINARI_ID.match(dataset_id):
        raise ValueError(
            f"{dataset_id!r} is neither an existing .hdf5 file nor a Minari dataset id; Minari ids "
            "look like 'namespace/env/name-v0' (the version suffix is required)"
        )
    try:
        md = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        local = sorted(minari.list_local_datasets())
        parts = dataset_id.split("/")
        if parts[0] == "aaren-rl" and len(parts) == 3:  # this project's own data: made here, never downloaded
            hint = f"; make it with `aaren-rl collect --env {parts[1]}` (docs/data.md)"
        else:
            hint = "" if download else "; pass download=True to fetch it (needs minari[hf] and the network)"
        raise FileNotFoundError(
            f"unknown Minari dataset {dataset_id!r}: not found under "
            f"{minari.storage.get_dataset_path()} (MINARI_DATASETS_PATH); local datasets: "
            f"{', '.join(local) or 'none'}{hint}"
        ) from None
    discrete, low, high = _space_bounds(md.action_space)
    episodes = []
    for ep in md.iterate_episodes():
        where = f"Minari dataset {dataset_id!r}, episode {ep.id}"
        if not isinstance(ep.observations, np.ndarray):
            raise ValueError(f"{where}: only flat Box observations are supported, got a dict/tuple")
        for name in ("observations", "actions", "rewards"):
            _check_finite(name, np.asarray(getattr(ep, name)), where)
        T = len(ep.rewards)
        terminated = bool(ep.terminations[-1]) if T else False
        truncated = bool(ep.truncations[-1]) if T else False
        # An episode that neither terminated nor truncated was cut by the recording: a time-out.
        episodes.append(Episode(
            ep.observations[:T], ep.actions, ep.rewards,
            terminated=terminated, truncated=truncated or not terminated,
        ))
    metadata = md.storage.metadata
    if env_id is not None:
        _check_env_id(env_id)
    elif md.env_spec is not None:
        env_id = md.env_spec.id
    return TrajectoryDataset(
        episodes,
        env_id=env_id,
        action_low=low, action_high=high, discrete=discrete,
        ref_min_score=metadata.get("ref_min_score"), ref_max_score=metadata.get("ref_max_score"),
        name=dataset_id,
    )


def read_hdf5_arrays(path: Path) -> tuple[dict, dict]:
    """The arrays of :data:`HDF5_REQUIRED_KEYS` and the attributes of a D4RL-format file, unchecked
    beyond the keys' presence; ValueError / KeyError with the file's name otherwise."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file: {e}") from None
    with f:
        missing = [k for k in HDF5_REQUIRED_KEYS if k not in f]
        if missing:
            raise KeyError(
                f"{path}: missing key(s) {missing}; a D4RL-format file needs {list(HDF5_REQUIRED_KEYS)} "
                f"(found {sorted(f.keys())})"
            )
        data = {k: np.asarray(f[k][()]) for k in HDF5_REQUIRED_KEYS}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return data, attrs


def _load_hdf5(path: Path, env_id: str | None) -> TrajectoryDataset:
    data, attrs = read_hdf5_arrays(path)
    n = len(data["rewards"])
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: arrays differ in length {lengths}; expected all {n}")
    for k, v in data.items():
        _check_finite(k, v, str(path))
    if n == 0:
        raise ValueError(f"{path}: zero steps, so zero episodes; expected at least one")

    env_id = env_id or attrs.get("env_id")
    if env_id is not None:
        discrete, low, high = env_action_bounds(str(env_id))
    elif "action_low" in attrs and "action_high" in attrs:
        low, high = np.asarray(attrs["action_low"]), np.asarray(attrs["action_high"])
        discrete = np.issubdtype(data["actions"].dtype, np.integer) and data["actions"].ndim == 1
    else:
        discrete, low, high = None, None, None

    if discrete is False:
        _check_continuous_actions(data["actions"], low, str(path), env_id)
    terminals = data["terminals"].astype(bool).reshape(-1)
    timeouts = data["timeouts"].astype(bool).reshape(-1)
    if n > 1 and not (terminals | timeouts).any():
        raise ValueError(f"{path}: no step of {n} has a terminal or timeout flag, so the episodes cannot be told "
                         "apart; a D4RL-format file marks each episode's last step in 'terminals' or 'timeouts'")
    ends = np.flatnonzero(terminals | timeouts) + 1
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)  # a recording that stops mid-episode: the last one is cut short
    episodes, start = [], 0
    for end in ends:
        last = end - 1
        episodes.append(Episode(
            data["observations"][start:end], data["actions"][start:end], data["rewards"][start:end],
            terminated=bool(terminals[last]), truncated=not terminals[last],
        ))
        start = end
    return TrajectoryDataset(
        episodes, env_id=None if env_id is None else str(env_id),
        action_low=low, action_high=high, discrete=discrete,
        ref_min_score=attrs.get("ref_min_score"), ref_max_score=attrs.get("ref_max_score"),
        name=str(path),
    )
