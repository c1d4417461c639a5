"""Evaluation: run a streaming policy for N episodes in a gymnasium vector environment."""

from __future__ import annotations

import time
from pathlib import Path

import gymnasium as gym
import numpy as np

from .policy import StreamingPolicy


def make_vector_env(env_id: str, n_envs: int) -> gym.vector.VectorEnv:
    """A synchronous vector env (on few cores the subprocesses of an async one cost more than they give).

    Same-step autoreset, as Stable-Baselines3: the observation returned with a done is already the
    next episode's first one, so ``episode_start`` for the next ``predict`` is just that done.
    """
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(f"unknown gymnasium environment id {env_id!r}: {e}") from None
    envs = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    return envs


def evaluate_policy(policy: StreamingPolicy, env_id: str, n_episodes: int = 10, seed: int = 0,
                    max_envs: int = 16, progress: bool = False, ref_min_score: float | None = None,
                    ref_max_score: float | None = None) -> dict:
    """Run ``n_episodes`` episodes, up to ``max_envs`` at a time; returns the statistics as a dict.

    Each environment runs a fixed share of the episodes, so short episodes are not favoured.
    """
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be positive, got {n_episodes}")
    n_envs = min(n_episodes, max_envs)
    quota = np.full(n_envs, n_episodes // n_envs) + (np.arange(n_envs) < n_episodes % n_envs)
    envs = make_vector_env(env_id, n_envs)
    obs, _ = envs.reset(seed=seed)
    state, starts, reward = None, np.ones(n_envs, bool), np.zeros(n_envs, np.float32)
    ep_return, ep_len = np.zeros(n_envs), np.zeros(n_envs, np.int64)
    returns, lengths, done_count = [], [], np.zeros(n_envs, np.int64)
    policy_time, policy_calls = 0.0, 0
    bar = _progress(n_episodes, progress)
    try:
        while (done_count < quota).any():
            t0 = time.perf_counter()
            action, state = policy.predict(obs, state, episode_start=starts, reward=reward)
            policy_time += time.perf_counter() - t0
            policy_calls += 1
            obs, reward, terminated, truncated, _ = envs.step(action)
            ep_return += reward
            ep_len += 1
            done = terminated | truncated
            for i in np.flatnonzero(done):
                if done_count[i] < quota[i]:
                    returns.append(float(ep_return[i]))
                    lengths.append(int(ep_len[i]))
                    done_count[i] += 1
                    if bar is not None:
                        bar.update(1)
                ep_return[i], ep_len[i] = 0.0, 0
            starts = done
    finally:
        envs.close()
        if bar is not None:
            bar.close()
    returns_arr = np.array(returns)
    result = {
        "env_id": env_id,
        "episodes": len(returns),
        "target_return": policy.target_return,
        "mode": policy.mode,
        "return_mean": float(returns_arr.mean()),
        "return_std": float(returns_arr.std()),
        "length_mean": float(np.mean(lengths)),
        "returns": returns,
        "lengths": lengths,
        "policy_ms_per_step": 1e3 * policy_time / max(policy_calls, 1),
        "n_envs": n_envs,
    }
    if ref_min_score is not None and ref_max_score is not None:
        from .data import normalized_score

        scores = normalized_score(returns_arr, ref_min_score, ref_max_score)
        result.update(normalized_score_mean=float(np.mean(scores)), normalized_score_std=float(np.std(scores)),
                      ref_min_score=ref_min_score, ref_max_score=ref_max_score)
    return result


def record_video(policy: StreamingPolicy, env_id: str, path: str | Path, seed: int = 0, fps: int = 30) -> Path:
    """Render one episode to ``path`` (.gif, or .mp4 with imageio-ffmpeg). MuJoCo headless: MUJOCO_GL=egl."""
    import os

    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix not in (".gif", ".mp4"):
        raise ValueError(f"video path must end in .gif or .mp4, got {path}")
    if path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError("an .mp4 video needs imageio-ffmpeg (pip install imageio-ffmpeg); or use .gif") from None
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering
    path.parent.mkdir(parents=True, exist_ok=True)
    env = gym.make(env_id, render_mode="rgb_array")
    frames, state = [], None
    try:
        obs, _ = env.reset(seed=seed)
        reward, done = 0.0, False
        while not done:
            frames.append(env.render())
            action, state = policy.predict(obs, state, reward=np.array([reward]))
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    finally:
        env.close()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    imageio.mimsave(tmp, frames, fps=fps)
    tmp.replace(path)
    return path


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="ep", leave=False)
