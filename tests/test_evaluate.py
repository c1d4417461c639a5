"""Evaluation drives every kind of environment alike: a gymnasium id, Env or VectorEnv (either
autoreset mode that tells episodes apart), a Stable-Baselines3 VecEnv, and SB3's own evaluate_policy
through the reward-feeding wrapper; the env's spaces are checked against the data."""

import gymnasium as gym
import numpy as np
import pytest
from helpers import make_model
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy as sb3_evaluate_policy

from aaren_rl.evaluate import check_env_matches, evaluate_policy
from aaren_rl.policy import StreamingPolicy
from aaren_rl.sb3 import RewardFeedback


def pendulum_policy(backend="auto"):
    model = make_model("aaren", "window", obs_dim=3, act_dim=1, embed_dim=16, n_head=1, max_timestep=256)
    return StreamingPolicy(model, target_return=-150.0, backend=backend)


@pytest.fixture(scope="module")
def reference():
    """4 episodes in 2 envs, from the id (a SAME_STEP vector env made and closed by evaluate_policy)."""
    return evaluate_policy(pendulum_policy(), "Pendulum-v1", n_episodes=4, max_envs=2, seed=3)["returns"]


@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.SAME_STEP, gym.vector.AutoresetMode.NEXT_STEP])
def test_a_gymnasium_vector_env_in_either_autoreset_mode_gives_the_same_episodes(reference, mode):
    envs = gym.make_vec("Pendulum-v1", num_envs=2, vector_kwargs={"autoreset_mode": mode})
    res = evaluate_policy(pendulum_policy(), envs, n_episodes=4, seed=3)
    assert res["returns"] == reference and res["lengths"] == [200] * 4 and res["env_id"] == "Pendulum-v1"
    envs.step(np.zeros((2, 1), np.float32))  # the caller's env is left open


def test_an_sb3_vecenv_gives_the_same_episodes(reference):
    venv = make_vec_env("Pendulum-v1", n_envs=2)
    res = evaluate_policy(pendulum_policy(), venv, n_episodes=4, seed=3)
    assert np.allclose(res["returns"], reference, rtol=1e-6) and res["env_id"] == "Pendulum-v1"


def test_a_single_gymnasium_env_runs_its_episodes_one_after_another():
    expected = evaluate_policy(pendulum_policy(), "Pendulum-v1", n_episodes=2, max_envs=1, seed=5)["returns"]
    res = evaluate_policy(pendulum_policy(), gym.make("Pendulum-v1"), n_episodes=2, seed=5)
    assert res["returns"] == expected and res["n_envs"] == 1


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_sb3_evaluate_policy_through_reward_feedback_equals_ours(backend):
    policy = pendulum_policy(backend)
    venv = make_vec_env("Pendulum-v1", n_envs=2)
    ours = evaluate_policy(policy, venv, n_episodes=4, seed=11)["returns"]
    with pytest.raises(ValueError, match="reward is required"):  # SB3 keeps the rewards to itself
        venv.seed(11)
        sb3_evaluate_policy(policy, venv, n_eval_episodes=4, warn=False)
    fed = RewardFeedback(venv, policy)
    fed.seed(11)
    theirs, lengths = sb3_evaluate_policy(fed.policy, fed, n_eval_episodes=4, return_episode_rewards=True, warn=False)
    assert np.allclose(sorted(theirs), sorted(ours), rtol=1e-6) and lengths == [200] * 4


def test_a_vector_env_without_autoreset_is_refused():
    envs = gym.make_vec("Pendulum-v1", num_envs=2, vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})
    with pytest.raises(ValueError, match="autoreset mode.*not supported.*SAME_STEP or NEXT_STEP"):
        evaluate_policy(pendulum_policy(), envs, n_episodes=2)


def test_other_env_objects_are_refused():
    with pytest.raises(TypeError, match="env must be a gymnasium id.*got list"):
        evaluate_policy(pendulum_policy(), ["Pendulum-v1"], n_episodes=2)


def test_env_spaces_are_checked_against_the_data():
    check_env_matches("Pendulum-v1", 3, 1, False, "the data")
    with pytest.raises(ValueError, match="observations have 3 entries in the env, 5 in the data"):
        check_env_matches("Pendulum-v1", 5, 1, False, "the data")
    with pytest.raises(ValueError, match="continuous with 1 entries, the data's have 2"):
        check_env_matches("Pendulum-v1", 3, 2, False, "the data")
    with pytest.raises(ValueError, match="2 discrete actions, the data continuous"):
        check_env_matches("CartPole-v1", 4, 1, False, "the data")
