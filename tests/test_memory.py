"""The long-memory task: POPGym's RepeatFirst with one-hot observations, its scripted expert, and
the success rate by cue distance."""

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("popgym")

from aaren_rl.memory import ENV_ID, FirstCuePolicy, cue_success, episode_length  # noqa: E402


def run_episodes(policy_for, num_decks, n=4, seed=0):
    """Returns, and each env's first episode's actions and cue, of a policy in a vector env."""
    env = gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID, num_decks=num_decks) for _ in range(n)])
    obs, _ = env.reset(seed=seed)
    policy = policy_for(n)
    start, total = np.ones(n, bool), np.zeros(n)
    actions, cue = [], obs.argmax(-1)
    for _ in range(episode_length(num_decks)):
        a = policy(obs, start)
        actions.append(a)
        obs, r, term, trunc, _ = env.step(a)
        total += r
        start = term | trunc
    assert start.all()  # every episode ended after exactly 52 * num_decks - 1 steps
    env.close()
    return total, np.array(actions).T, cue


@pytest.mark.parametrize("num_decks", [1, 2])
def test_the_expert_always_answers_the_first_card(num_decks):
    returns, actions, cue = run_episodes(lambda n: FirstCuePolicy(n), num_decks)
    np.testing.assert_allclose(returns, 1.0)
    assert all(cue_success(a, c)[50] == 1.0 for a, c in zip(actions, cue))
    assert gym.make(ENV_ID).observation_space == gym.spaces.Box(0.0, 1.0, (4,), np.float32)


def test_random_and_short_memory_are_at_chance_beyond_their_reach():
    returns, actions, cue = run_episodes(lambda n: FirstCuePolicy(n, epsilon=1.0, seed=1), 10, n=8)
    assert -0.6 < returns.mean() < -0.4  # a quarter right: 0.25 - 0.75
    rates = [cue_success(a, c)[100] for a, c in zip(actions, cue)]
    assert 0.18 < np.mean(rates) < 0.32

    class LastK:  # remembers the cue for K = 20 steps, then answers the latest card (no memory)
        def __init__(self, n):
            self.t, self.cue = np.zeros(n, int), np.zeros(n, int)

        def __call__(self, obs, start):
            self.t = np.where(start, 0, self.t + 1)
            self.cue = np.where(start, obs.argmax(-1), self.cue)
            return np.where(self.t < 20, self.cue, obs.argmax(-1))

    _, actions, cue = run_episodes(LastK, 2, n=8)
    success = [cue_success(a, c) for a, c in zip(actions, cue)]
    assert all(s[0] > 0.18 for s in success) and np.mean([s[20] for s in success]) < 0.35
    assert cue_success(np.zeros(30), 0)[50] is None  # an episode shorter than the distance


def test_bad_task_settings_fail_clearly():
    with pytest.raises(ValueError, match="num_decks must be a positive integer"):
        gym.make(ENV_ID, num_decks=0)
    with pytest.raises(ValueError, match="epsilon"):
        FirstCuePolicy(2, epsilon=1.5)
