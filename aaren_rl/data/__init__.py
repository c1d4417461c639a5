"""Offline data: episodes and datasets (Minari, D4RL-format HDF5), training batches, collection.

    ds = load_dataset("aaren-rl/hopper/medium-v0")          # or "path/to/medium.hdf5"
    batch = ds.to("cuda").sample_windows(64, K=20, generator=torch.Generator("cuda").manual_seed(0))
    ds.normalized_score(returns)                              # 0 = random, 100 = expert

Collection (Stable-Baselines3 learner -> D4RL-style tiers) lives in ``aaren_rl.data.collect`` and
is imported lazily, so loading data does not import Stable-Baselines3.
"""

from .dataset import Episode, TrajectoryDataset, load_dataset, normalized_score
from .sampling import Batch, FlatEpisodes, sample_episodes, sample_packed, sample_segments, sample_windows

__all__ = [
    "Batch", "Episode", "FlatEpisodes", "TrajectoryDataset", "load_dataset", "normalized_score",
    "sample_episodes", "sample_packed", "sample_segments", "sample_windows",
]
