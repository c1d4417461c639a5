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
    from aaren_rl.evaluate import check_env_matches

    check_env_matches("aaren_rl.memory:RepeatFirst100-v0", 4, 4, True, "a test")  # a module: id resolves


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


def test_datasets_are_made_with_the_expert_and_train_a_discrete_agent(tmp_path):
    from aaren_rl.data import load_dataset
    from aaren_rl.memory import collect_datasets
    from aaren_rl.train import TrainConfig, make_update_step, model_config_for

    rep = collect_datasets(tmp_path, 50, episodes=6, seed=0)
    tiers = rep["tiers"]
    assert rep["ref_max_score"] == 1.0 and -0.7 < rep["ref_min_score"] < -0.3
    assert tiers["expert"]["success_by_distance"][20] == 1.0
    assert 0.45 < tiers["medium"]["success_by_distance"][0] < 0.8  # half its answers random
    assert tiers["medium-expert"]["episodes"] == 12 and tiers["medium-expert"]["steps"] == 12 * 51
    ds = load_dataset(tiers["medium-expert"]["hdf5"])
    assert ds.discrete and ds.action_dim == 4 and ds.observation_dim == 4 and ds.ref_max_score == 1.0
    mc = model_config_for(ds, backbone="aaren", context="episode", n_layer=1, embed_dim=16, n_head=1, dropout=0.0)
    update = make_update_step(mc, TrainConfig(batch_size=2, warmup_steps=1, device="cpu", compile="none"), ds)
    for _ in range(2):
        update()
    assert np.isfinite(update.pop_mean_loss())


def test_evaluate_success_scores_a_policy_by_cue_distance():
    from aaren_rl.memory import evaluate_success, env_id

    class Expert:  # StreamingPolicy's predict interface around the scripted expert
        def __init__(self, epsilon):
            self.p = FirstCuePolicy(1, epsilon, seed=0)

        def predict(self, obs, state, episode_start=None, reward=None):
            return self.p(np.asarray(obs)[None], np.asarray(episode_start)), state

    res = evaluate_success(Expert(0.0), env_id(100), episodes=3, seed=0)
    assert res["return_mean"] == pytest.approx(1.0) and set(res["success_by_distance"]) == {0, 20, 50, 100}
    assert all(v == 1.0 for v in res["success_by_distance"].values())
    res = evaluate_success(Expert(1.0), env_id(50), episodes=5, seed=0)
    assert 0.1 < res["success_by_distance"][20] < 0.45
