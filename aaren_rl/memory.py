"""Long-memory tasks: what was seen long before the last K steps decides success.

**RepeatFirst** from POPGym (Morad et al., 2023, a benchmark of the memory-RL literature;
``pip install 'aaren-rl[memory]'``): the first observation of an episode is a card's suit, and at
every step the agent must output that suit while new random cards arrive. The decision at step t
depends on a cue seen t steps before, so with ``num_decks`` decks (episodes of 52 * num_decks - 1
steps) the cue distance runs up to 51, 103, ..., 519 steps (1, 2, ..., 10 decks). A step's reward
is +-1 / (episode length): the expert returns 1.0, a uniform random policy about -0.5 (a quarter of
its answers right). A Decision Transformer that sees its last K = 20 steps loses the cue after 20
steps and is left at chance (0.25 per answer); a recurrent state can keep it.

``gym.make("aaren_rl.memory:RepeatFirst-v0", num_decks=N)`` (gymnasium imports this module for the
``module:`` prefix) gives the task with one-hot observations (Box(0, 1, (4,))) and Discrete(4)
actions, the discrete-action path of the agents. ``FirstCuePolicy`` is its scripted expert, and
``cue_success`` the success rate of a run's answers by cue distance.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "aaren_rl.memory:RepeatFirst-v0"
SUITS = 4


class OneHotObservation(gym.ObservationWrapper):
    """Discrete(n) observations as one-hot float32 vectors (the agents embed vectors)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        if not isinstance(env.observation_space, gym.spaces.Discrete):
            raise ValueError(f"OneHotObservation needs a Discrete observation space, got {env.observation_space}")
        self.n = int(env.observation_space.n)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.n,), dtype=np.float32)

    def observation(self, observation):
        out = np.zeros(self.n, dtype=np.float32)
        out[int(observation)] = 1.0
        return out


def make_repeat_first(num_decks: int = 1, render_mode=None) -> gym.Env:
    """POPGym's RepeatFirst with one-hot observations; episodes of 52 * num_decks - 1 steps."""
    try:
        from popgym.envs.repeat_first import RepeatFirst
    except ImportError as e:
        raise ImportError("the memory task needs popgym: pip install 'aaren-rl[memory]'") from e
    if isinstance(num_decks, bool) or not isinstance(num_decks, int) or num_decks < 1:
        raise ValueError(f"num_decks must be a positive integer, got {num_decks!r}")
    return OneHotObservation(RepeatFirst(num_decks=num_decks))


def episode_length(num_decks: int) -> int:
    return 52 * num_decks - 1


if "RepeatFirst-v0" not in gym.registry:
    gym.register("RepeatFirst-v0", entry_point=make_repeat_first)


class FirstCuePolicy:
    """The scripted expert: remember each episode's first observation and answer it at every step.

    Vectorized over n environments: ``__call__(obs (n, 4), episode_start (n,) bool) -> (n,) int``;
    ``epsilon`` answers uniformly at random with that probability (the weaker tiers)."""

    def __init__(self, n_envs: int, epsilon: float = 0.0, seed: int | None = None):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.cue = np.zeros(n_envs, dtype=np.int64)
        self.epsilon, self.rng = epsilon, np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        start = np.asarray(episode_start, dtype=bool)
        self.cue[start] = obs[start].argmax(-1)
        actions = self.cue.copy()
        explore = self.rng.random(len(actions)) < self.epsilon
        actions[explore] = self.rng.integers(0, SUITS, explore.sum())
        return actions


def cue_success(actions: np.ndarray, cue: int, distances=(0, 20, 50, 100, 500)) -> dict[int, float | None]:
    """Success rate of one episode's answers at cue distance >= d, for each d: the fraction of the
    steps t >= d (t counted from the cue at t = 0) whose action is the cue (None where the episode
    is shorter). Chance is 1/4, the expert 1."""
    actions = np.asarray(actions)
    return {d: (float((actions[d:] == cue).mean()) if len(actions) > d else None) for d in distances}
