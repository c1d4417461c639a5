"""Training batches from a dataset kept as flat tensors, built by tensor indexing alone.

All episodes are concatenated into flat tensors (one row per step) with each episode's start
offset and length. A batch is a gather with an index tensor of shape (B, L), so sampling runs on
the dataset's device (move it once with ``.to(device)``) with no Python loop over batch items and
no data-loader process.

Padding is on the right: the real steps of a row come first, from its first timestep, and
``padding_mask`` is True on the padded tail. Causal models (and Aaren's left-to-right scan) never
see the padding from a real position; only the loss must ignore it.

Packed rows (``sample_packed``) hold several whole episodes one after another, each from its own
t = 0, with ``episode_ids`` numbering them within the row: a model keeps its episodes apart by
attending only within an episode (``blocks``, ``layer``), so a row of L steps trains on as many
episodes as fit instead of one episode and padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Batch:
    """B rows of L steps. Observations normalized; returns-to-go raw; padding_mask True = padding."""

    observations: torch.Tensor  # (B, L, obs_dim) float32
    actions: torch.Tensor  # (B, L, act_dim) float32, or (B, L) int64 for discrete actions
    returns_to_go: torch.Tensor  # (B, L) float32, undiscounted sum of rewards from t on
    rewards: torch.Tensor  # (B, L) float32
    timesteps: torch.Tensor  # (B, L) int64, t within the episode (0 on padding)
    padding_mask: torch.Tensor  # (B, L) bool
    episode_ids: torch.Tensor | None = None  # (B, L) int64, packed rows: the episode's number in its row

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class FlatEpisodes:
    """Every step of every episode, concatenated (N steps, E episodes)."""

    observations: torch.Tensor  # (N, obs_dim) float32, raw
    actions: torch.Tensor  # (N, act_dim) float32 or (N,) int64
    rewards: torch.Tensor  # (N,)
    returns_to_go: torch.Tensor  # (N,)
    timesteps: torch.Tensor  # (N,) int64
    step_episode: torch.Tensor  # (N,) int64, the episode each step belongs to
    episode_start: torch.Tensor  # (E,) int64, offset of each episode's first step
    episode_length: torch.Tensor  # (E,) int64
    obs_mean: torch.Tensor  # (obs_dim,)
    obs_std: torch.Tensor  # (obs_dim,)

    @classmethod
    def from_episodes(cls, episodes, obs_mean, obs_std) -> "FlatEpisodes":
        lengths = np.array([len(ep) for ep in episodes], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cat = lambda name: torch.from_numpy(np.concatenate([getattr(ep, name) for ep in episodes]))
        return cls(
            observations=cat("observations"),
            actions=cat("actions"),
            rewards=cat("rewards"),
            returns_to_go=cat("returns_to_go"),
            timesteps=torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])),
            step_episode=torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)),
            episode_start=torch.from_numpy(starts.astype(np.int64)),
            episode_length=torch.from_numpy(lengths),
            obs_mean=torch.from_numpy(np.asarray(obs_mean, dtype=np.float32)),
            obs_std=torch.from_numpy(np.asarray(obs_std, dtype=np.float32)),
        )

    @property
    def num_steps(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_episodes(self) -> int:
        return self.episode_start.shape[0]

    def to(self, device) -> "FlatEpisodes":
        return FlatEpisodes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def gather(self, start: torch.Tensor, valid: torch.Tensor) -> Batch:
        """Rows of consecutive steps: row b holds flat steps ``start[b] + j`` where ``valid[b, j]``."""
        L = valid.shape[1]
        return self.gather_at(start[:, None] + torch.arange(L, device=start.device), valid)

    def gather_at(self, idx: torch.Tensor, valid: torch.Tensor, episode_ids: torch.Tensor | None = None) -> Batch:
        """Row b, position j holds flat step ``idx[b, j]`` where ``valid[b, j]`` (padding elsewhere)."""
        idx = torch.where(valid, idx, torch.zeros_like(idx))  # padding reads step 0, then is zeroed
        obs = (self.observations[idx] - self.obs_mean) / self.obs_std
        obs = obs * valid[..., None]
        actions = self.actions[idx]
        actions = actions * (valid[..., None] if actions.dim() == 3 else valid)
        zero = lambda x: x * valid
        return Batch(
            observations=obs,
            actions=actions,
            returns_to_go=zero(self.returns_to_go[idx]),
            rewards=zero(self.rewards[idx]),
            timesteps=zero(self.timesteps[idx]),
            padding_mask=~valid,
            episode_ids=episode_ids,
        )


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _randint(high: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """n integers in [0, high), drawn on the generator's device (a CPU generator works with
    data on the GPU: only the n indices are copied)."""
    where = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=where).to(device)


def sample_windows(flat: FlatEpisodes, batch_size: int, K: int,
                   generator: torch.Generator | None = None) -> Batch:
    """Decision Transformer's batches: K-step windows starting at a timestep drawn uniformly over
    all steps of the dataset (so episodes are weighted by their length), right-padded to K where
    the episode ends first."""
    _check_positive("batch_size", batch_size)
    _check_positive("K", K)
    device = flat.rewards.device
    i = _randint(flat.num_steps, batch_size, generator, device)
    episode = flat.step_episode[i]
    end = flat.episode_start[episode] + flat.episode_length[episode]  # one past the last step
    valid = (i[:, None] + torch.arange(K, device=device)) < end[:, None]  # (B, K)
    return flat.gather(i, valid)


def sample_episodes(flat: FlatEpisodes, batch_size: int, generator: torch.Generator | None = None,
                    max_len: int | None = None) -> Batch:
    """Whole episodes from t = 0, drawn uniformly over episodes, right-padded to the longest in the
    batch; with ``max_len``, every row has exactly ``max_len`` steps (longer episodes are cut)."""
    _check_positive("batch_size", batch_size)
    if max_len is not None:
        _check_positive("max_len", max_len)
    device = flat.rewards.device
    e = _randint(flat.num_episodes, batch_size, generator, device)
    length = flat.episode_length[e]
    L = max_len if max_len is not None else int(length.max())
    valid = torch.arange(L, device=device) < length[:, None]  # (B, L)
    return flat.gather(flat.episode_start[e], valid)


def packing_candidates(row_len: int, min_episode_len: int) -> int:
    """How many episodes a packed row of ``row_len`` steps draws: enough to fill it with the
    shortest episodes (a fixed count: one shape, one number of draws per update)."""
    _check_positive("row_len", row_len)
    return -(-row_len // max(int(min_episode_len), 1))


def pack_rows(flat: FlatEpisodes, episodes: torch.Tensor, row_len: int) -> Batch:
    """Rows of ``row_len`` steps, row b filled with the episodes ``episodes[b, 0], episodes[b, 1],
    ...`` ((B, M) indices) one after another, each from its t = 0, as far as they fit; the last
    one that starts in the row is cut at its end (a prefix from t = 0, a context the stream
    acts in too), and only steps past the M-th episode are padding. ``episode_ids`` numbers the
    episodes within each row (0, 0, ..., 1, 1, ...). Tensor ops alone: no host sync, one shape."""
    length = flat.episode_length[episodes]  # (B, M)
    end = length.cumsum(1)  # one past each episode's last step, within the row
    B, M = episodes.shape
    j = torch.arange(row_len, device=episodes.device).expand(B, row_len).contiguous()
    seg = torch.searchsorted(end, j, right=True)  # (B, L): the episode that position j falls in
    valid = seg < M
    seg = seg.clamp(max=M - 1)
    t = j - (end - length).gather(1, seg)  # the step's timestep within its episode
    idx = flat.episode_start[episodes.gather(1, seg)] + t
    return flat.gather_at(idx, valid, episode_ids=seg)


def sample_packed(flat: FlatEpisodes, batch_size: int, row_len: int, generator: torch.Generator | None = None,
                  candidates: int | None = None) -> Batch:
    """Whole episodes drawn uniformly (as ``sample_episodes`` draws them), packed into
    ``batch_size`` rows of ``row_len`` steps (``pack_rows``); ``candidates`` episodes are drawn per
    row (default: ``packing_candidates``, enough to fill a row with the shortest episodes)."""
    _check_positive("batch_size", batch_size)
    _check_positive("row_len", row_len)
    M = candidates if candidates is not None else packing_candidates(row_len, int(flat.episode_length.min()))
    _check_positive("candidates", M)
    e = _randint(flat.num_episodes, batch_size * M, generator, flat.rewards.device).view(batch_size, M)
    return pack_rows(flat, e, row_len)


def sample_segments(flat: FlatEpisodes, batch_size: int, K: int, generator: torch.Generator | None = None,
                    max_prefix: int | None = None) -> tuple[Batch, Batch]:
    """K-step segments drawn as ``sample_windows`` draws windows, each with its *prefix*: the steps
    of its episode before it (from t = 0), right-padded to the longest prefix in the batch (or to
    ``max_prefix`` steps: one shape for compiled code and CUDA graphs; longer prefixes keep their
    last ``max_prefix`` steps). Returns (segments, prefixes)."""
    _check_positive("batch_size", batch_size)
    _check_positive("K", K)
    device = flat.rewards.device
    i = _randint(flat.num_steps, batch_size, generator, device)
    episode = flat.step_episode[i]
    start = flat.episode_start[episode]
    end = start + flat.episode_length[episode]  # one past the last step
    valid = (i[:, None] + torch.arange(K, device=device)) < end[:, None]  # (B, K)
    P = i - start  # prefix lengths
    if max_prefix is None:
        P_max = max(int(P.max()), 1)  # a host sync: eager training only
    else:
        _check_positive("max_prefix", max_prefix)
        P_max = max_prefix
        start = torch.maximum(start, i - P_max)
        P = i - start
    prefix_valid = torch.arange(P_max, device=device) < P[:, None]  # (B, P_max)
    return flat.gather(i, valid), flat.gather(start, prefix_valid)
