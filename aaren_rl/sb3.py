"""Stable-Baselines3's own loops with a return-conditioned policy.

SB3 calls ``model.predict(obs, state, episode_start, deterministic)`` and keeps the rewards to
itself, but a return-conditioned agent needs each step's reward to lower the return still to go.
``RewardFeedback`` wraps the VecEnv that SB3 steps and hands the rewards of its last step to the
policy it carries (``.policy``, SB3's ``predict`` signature):

    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    venv = RewardFeedback(make_vec_env("Pendulum-v1", n_envs=4, seed=0), StreamingPolicy(model, -150))
    mean_return, std_return = evaluate_policy(venv.policy, venv, n_eval_episodes=20)

It gives the episodes that ``aaren_rl.evaluate.evaluate_policy`` gives on the same VecEnv (tested).
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from .policy import StreamingPolicy


class RewardFeedback(VecEnvWrapper):
    """A VecEnv that remembers its last step's rewards for ``self.policy``."""

    def __init__(self, venv: VecEnv, policy: StreamingPolicy):
        super().__init__(venv)
        self.last_reward: np.ndarray | None = None
        self.policy = RewardFedPolicy(policy, self)

    def reset(self):
        self.last_reward = None
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.last_reward = np.array(rewards, dtype=np.float32)
        return obs, rewards, dones, infos


class RewardFedPolicy:
    """``predict`` in SB3's signature, with the rewards taken from the ``RewardFeedback`` env."""

    def __init__(self, policy: StreamingPolicy, env: RewardFeedback):
        self.policy, self.env = policy, env

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        return self.policy.predict(observation, state, episode_start=episode_start,
                                   deterministic=deterministic, reward=self.env.last_reward)
