"""Recording episodes as an environment produces them: from a learner's vector env, or from rollouts.

A :class:`RawEpisode` keeps what Minari stores: T+1 observations (the last one is where the
episode ended), T actions and rewards, and whether it ended by termination or truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnvWrapper


@dataclass
class RawEpisode:
    observations: np.ndarray  # (T+1, obs_dim), as the environment returned them
    actions: np.ndarray  # (T, act_dim) or (T,)
    rewards: np.ndarray  # (T,)
    terminated: bool
    truncated: bool
    first_step: int = 0  # learner's env-step count when this episode began (training recordings)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def cut(self, T: int) -> "RawEpisode":
        """The first T steps, marked truncated (the recording stopped there, not the episode)."""
        return RawEpisode(self.observations[: T + 1], self.actions[:T], self.rewards[:T],
                          terminated=False, truncated=True, first_step=self.first_step)


class EpisodeRecorder:
    """Per-environment step lists, closed into a :class:`RawEpisode` when an episode ends."""

    def __init__(self, n_envs: int):
        self._obs = [[] for _ in range(n_envs)]
        self._act = [[] for _ in range(n_envs)]
        self._rew = [[] for _ in range(n_envs)]
        self._first = [0] * n_envs

    def begin(self, i: int, obs, first_step: int = 0) -> None:
        self._obs[i], self._act[i], self._rew[i] = [np.array(obs)], [], []
        self._first[i] = first_step

    def add(self, i: int, action, reward, next_obs, terminated: bool, truncated: bool):
        """Record one step; return the finished episode when it ended, else None."""
        self._act[i].append(np.array(action))
        self._rew[i].append(float(reward))
        self._obs[i].append(np.array(next_obs))
        if terminated or truncated:
            return self._close(i, bool(terminated), bool(truncated and not terminated))
        return None

    def partial(self, i: int) -> RawEpisode | None:
        """The episode in progress in env i (cut, so truncated), or None if it has no step yet."""
        return self._close(i, False, True) if self._rew[i] else None

    def _close(self, i, terminated, truncated) -> RawEpisode:
        return RawEpisode(np.stack(self._obs[i]), np.stack(self._act[i]),
                          np.asarray(self._rew[i], dtype=np.float64), terminated, truncated,
                          self._first[i])


class RecordingVecEnv(VecEnvWrapper):
    """Keeps every transition the learner's vector env produces, below any VecNormalize.

    Wrap the raw vector env with it (``VecNormalize(RecordingVecEnv(venv))``) so that what is kept
    is the environment's own observations, the (clipped) actions it executed and its own rewards.
    ``num_steps`` counts env steps over all envs, like SB3's ``num_timesteps``.
    """

    def __init__(self, venv):
        super().__init__(venv)
        self.recorder = EpisodeRecorder(venv.num_envs)
        self.episodes: list[RawEpisode] = []
        self.num_steps = 0
        self._actions = None

    def reset(self):
        obs = self.venv.reset()
        for i in range(self.num_envs):
            self.recorder.begin(i, obs[i], self.num_steps)
        return obs

    def step_async(self, actions):
        self._actions = np.array(actions)
        self.venv.step_async(actions)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.num_steps += self.num_envs
        for i in range(self.num_envs):
            if dones[i]:
                truncated = bool(infos[i].get("TimeLimit.truncated", False))
                ep = self.recorder.add(i, self._actions[i], rewards[i],
                                       infos[i]["terminal_observation"], not truncated, truncated)
                self.episodes.append(ep)
                self.recorder.begin(i, obs[i], self.num_steps)
            else:
                self.recorder.add(i, self._actions[i], rewards[i], obs[i], False, False)
        return obs, rewards, dones, infos

    def snapshot(self) -> dict:
        """What :meth:`restore` needs to continue the recording after a restart: every episode so
        far, the running ones cut here (the restarted learner resets its environments)."""
        running = [p for p in (self.recorder.partial(i) for i in range(self.num_envs)) if p is not None]
        return {"episodes": self.episodes + running, "num_steps": self.num_steps}

    def restore(self, snapshot: dict) -> None:
        self.episodes = list(snapshot["episodes"])
        self.num_steps = int(snapshot["num_steps"])

    def episodes_until(self, step: int) -> list[RawEpisode]:
        """Everything seen in the first ``step`` env steps (:func:`episodes_until`), the episodes
        running now included."""
        running = [p for p in (self.recorder.partial(i) for i in range(self.num_envs)) if p is not None]
        return episodes_until(self.episodes + running, step, self.num_envs)


def episodes_until(episodes: list[RawEpisode], step: int, n_envs: int) -> list[RawEpisode]:
    """What a learner with ``n_envs`` envs saw in its first ``step`` env steps, by episode start;
    episodes running at that moment are cut there (truncated)."""
    kept = []
    for ep in sorted(episodes, key=lambda e: e.first_step):
        if ep.first_step >= step:
            continue
        # Step j of an episode happens during vector step first_step / n + j, which is
        # complete once (first_step / n + j + 1) * n env steps have been taken.
        seen = (step - ep.first_step) // n_envs
        if seen >= len(ep):
            kept.append(ep)
        elif seen > 0:
            kept.append(ep.cut(seen))
    return kept


def rollout(env_id: str, policy, *, episodes: int, min_steps: int = 0, seed: int = 0,
            n_envs: int = 8, progress=None) -> list[RawEpisode]:
    """Run ``policy`` (a batch of observations -> a batch of actions) in ``n_envs`` copies of the
    environment until ``episodes`` episodes and ``min_steps`` steps have been started, then let
    the started ones finish. Keeping every started episode avoids favouring short episodes."""
    envs = [gym.make(env_id) for _ in range(min(n_envs, max(episodes, 1)))]
    recorder = EpisodeRecorder(len(envs))
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    for i, o in enumerate(obs):
        recorder.begin(i, o)
    for i, env in enumerate(envs):
        env.action_space.seed(seed + i)
    started, steps, done = len(envs), 0, []
    active = list(range(len(envs)))
    try:
        while active:
            actions = policy(np.stack([obs[i] for i in active]))
            still = []
            for a, i in zip(actions, active):
                next_obs, reward, terminated, truncated, _ = envs[i].step(a)
                steps += 1
                ep = recorder.add(i, a, reward, next_obs, terminated, truncated)
                if ep is None:
                    obs[i] = next_obs
                    still.append(i)
                    continue
                done.append(ep)
                if started < episodes or steps < min_steps:
                    obs[i] = envs[i].reset()[0]
                    recorder.begin(i, obs[i])
                    started += 1
                    still.append(i)
            if progress is not None:
                progress.update(len(active))
            active = still
    finally:
        for env in envs:
            env.close()
    return done
