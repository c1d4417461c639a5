"""Evaluation: run a streaming policy for N episodes in a gymnasium (vector) env or an SB3 VecEnv.

Stable-Baselines3's own ``evaluate_policy`` can drive the policy too, through the wrapper in
``aaren_rl.sb3`` that hands it each step's rewards.
"""

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
    _check_env_id(env_id)
    envs = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    return envs


def _check_env_id(env_id) -> None:
    if not isinstance(env_id, str):
        raise TypeError(f"env must be a gymnasium id, a gymnasium Env or VectorEnv, or an SB3 VecEnv; "
                        f"got {type(env_id).__name__}")
    from .data.dataset import env_spec

    try:
        env_spec(env_id)
    except gym.error.Error as e:
        raise ValueError(f"unknown gymnasium environment id {env_id!r}: {e}") from None


def check_env_matches(env_id: str, observation_dim: int, action_dim: int, discrete: bool, what: str) -> None:
    """ValueError unless ``env_id``'s spaces are those of ``what`` (a dataset, a model): flat Box
    observations of ``observation_dim`` entries, and ``action_dim`` Box actions or ``action_dim``
    Discrete ones."""
    _check_env_id(env_id)
    env = gym.make(env_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(obs_space, gym.spaces.Box):
        raise ValueError(f"{env_id}: only Box observations are supported, got {obs_space}")
    problems = []
    if int(np.prod(obs_space.shape)) != observation_dim:
        problems.append(f"observations have {int(np.prod(obs_space.shape))} entries in the env, "
                        f"{observation_dim} in {what}")
    if isinstance(act_space, gym.spaces.Discrete):
        if not discrete or int(act_space.n) != action_dim:
            problems.append(f"the env has {act_space.n} discrete actions, {what} "
                            + (f"{action_dim}" if discrete else f"continuous actions of {action_dim} entries"))
    elif isinstance(act_space, gym.spaces.Box):
        if discrete or int(np.prod(act_space.shape)) != action_dim:
            problems.append(f"the env's actions are continuous with {int(np.prod(act_space.shape))} entries, {what}'s "
                            + (f"{action_dim} discrete ones" if discrete else f"have {action_dim}"))
    else:
        problems.append(f"unsupported action space {act_space} (expected Box or Discrete)")
    if problems:
        raise ValueError(f"{env_id} does not match {what}: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# Environments of every kind behind one stepping rule. ``step`` returns, per row, the observation
# to act on next, the reward, whether an episode ended with this step, and whether this step
# belongs to an episode at all: gymnasium's NEXT_STEP autoreset spends one step (its action
# ignored, reward 0) on the reset after each done; that step is not counted, and the policy starts
# afresh from the observation it returns.


class _SameStepVector:
    """A gymnasium VectorEnv in SAME_STEP mode: the observation that comes with a done is already
    the next episode's first."""

    def __init__(self, envs):
        self.envs, self.num_envs = envs, envs.num_envs

    def reset(self, seed):
        return self.envs.reset(seed=seed)[0]

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.envs.step(action)
        return obs, reward, terminated | truncated, np.ones(self.num_envs, bool)


class _NextStepVector(_SameStepVector):
    """A gymnasium VectorEnv in NEXT_STEP mode (gymnasium's default): the step after a done resets."""

    def reset(self, seed):
        self.resetting = np.zeros(self.num_envs, bool)
        return super().reset(seed)

    def step(self, action):
        obs, reward, done, _ = super().step(action)
        counted = ~self.resetting
        self.resetting = done & counted
        return obs, reward, done & counted, counted


class _SB3Vector:
    """A Stable-Baselines3 VecEnv (autoreset in the same step)."""

    def __init__(self, venv):
        self.envs, self.num_envs = venv, venv.num_envs

    def reset(self, seed):
        self.envs.seed(seed)
        return self.envs.reset()

    def step(self, action):
        obs, reward, done, _ = self.envs.step(action)
        return obs, reward, np.asarray(done, bool), np.ones(self.num_envs, bool)


class _Single:
    """One gymnasium Env as a vector of one, reset by hand after each done."""

    num_envs = 1

    def __init__(self, env):
        self.envs = env

    def reset(self, seed):
        return self.envs.reset(seed=seed)[0][None]

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.envs.step(action[0])
        done = bool(terminated or truncated)
        if done:
            obs, _ = self.envs.reset()
        return obs[None], np.array([reward], np.float64), np.array([done]), np.ones(1, bool)


def _stepper(env):
    """The adapter for ``env`` (an environment object) and its name for the results."""
    spec = getattr(env, "spec", None)
    name = getattr(spec, "id", None) or type(env).__name__
    if isinstance(env, gym.vector.VectorEnv):
        mode = env.metadata.get("autoreset_mode")
        if mode in (gym.vector.AutoresetMode.SAME_STEP, "SameStep"):
            return _SameStepVector(env), name
        if mode in (gym.vector.AutoresetMode.NEXT_STEP, "NextStep"):
            return _NextStepVector(env), name
        raise ValueError(f"vector env {name}: autoreset mode {mode!r} is not supported (the policy needs each "
                         f"episode's end and the next one's start); make it with AutoresetMode.SAME_STEP or NEXT_STEP")
    if isinstance(env, gym.Env):
        return _Single(env), name
    if all(hasattr(env, a) for a in ("step_async", "step_wait", "num_envs", "env_method")):  # an SB3 VecEnv
        try:
            name = env.get_attr("spec", [0])[0].id
        except Exception:
            pass
        return _SB3Vector(env), name
    _check_env_id(env)  # the error for anything else


def evaluate_policy(policy: StreamingPolicy, env, n_episodes: int = 10, seed: int = 0,
                    max_envs: int = 16, progress: bool = False, ref_min_score: float | None = None,
                    ref_max_score: float | None = None) -> dict:
    """Run ``n_episodes`` episodes; returns the statistics as a dict.

    ``env``: a gymnasium id (a vector env of up to ``max_envs`` environments is made, and closed
    at the end), or an environment object, left open: a gymnasium ``Env`` (one episode at a time),
    a gymnasium ``VectorEnv`` (SAME_STEP or NEXT_STEP autoreset) or a Stable-Baselines3 ``VecEnv``.
    Environment i is seeded with ``seed + i``, so the same seed gives the same episodes in each kind.
    Each environment runs a fixed share of the episodes, so short episodes are not favoured.
    """
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be positive, got {n_episodes}")
    if isinstance(env, str):
        owned = make_vector_env(env, min(n_episodes, max_envs))
        envs, env_id = _SameStepVector(owned), env
    else:
        owned = None
        envs, env_id = _stepper(env)
    n_envs = envs.num_envs
    quota = np.full(n_envs, n_episodes // n_envs) + (np.arange(n_envs) < n_episodes % n_envs)
    ep_return, ep_len = np.zeros(n_envs), np.zeros(n_envs, np.int64)
    returns, lengths, done_count = [], [], np.zeros(n_envs, np.int64)
    policy_time, policy_calls = 0.0, 0
    bar = _progress(n_episodes, progress)
    try:
        obs = envs.reset(seed)
        state, starts, reward = None, np.ones(n_envs, bool), np.zeros(n_envs, np.float32)
        while (done_count < quota).any():
            t0 = time.perf_counter()
            action, state = policy.predict(obs, state, episode_start=starts, reward=reward)
            policy_time += time.perf_counter() - t0
            policy_calls += 1
            obs, reward, done, counted = envs.step(action)
            ep_return += np.where(counted, reward, 0.0)
            ep_len += counted
            for i in np.flatnonzero(done):
                if done_count[i] < quota[i]:
                    returns.append(float(ep_return[i]))
                    lengths.append(int(ep_len[i]))
                    done_count[i] += 1
                    if bar is not None:
                        bar.update(1)
                ep_return[i], ep_len[i] = 0.0, 0
            starts = done | ~counted  # after a NEXT_STEP done the policy's action is spent on the reset
    finally:
        if owned is not None:
            owned.close()
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


VIDEO_EXTRA = "pip install 'aaren-rl[video]'"


def check_video_dependencies(env_id: str, path: str | Path) -> None:
    """ValueError, naming what to install, unless one frame of ``env_id`` can be rendered and
    written to ``path``'s format: run it before an evaluation whose video would fail after it."""
    import os

    path = Path(path)
    if path.suffix not in (".gif", ".mp4"):
        raise ValueError(f"video path must end in .gif or .mp4, got {path}")
    for module, why in (("imageio", "writing a video"), *((("imageio_ffmpeg", "an .mp4 video"),) if path.suffix == ".mp4" else ())):
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"{why} needs {module.replace('_', '-')}: {VIDEO_EXTRA}"
                             + (" (or write a .gif)" if module == "imageio_ffmpeg" else "")) from None
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering
    _check_env_id(env_id)
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        try:
            env.reset(seed=0)
            env.render()
        finally:
            env.close()
    except gym.error.DependencyNotInstalled as e:
        raise ValueError(f"rendering {env_id} needs a package that is not installed ({e}): {VIDEO_EXTRA}") from None
    except Exception as e:  # MuJoCo without an OpenGL context, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot render {env_id} ({type(e).__name__}: {first}); headless MuJoCo needs "
                         f"MUJOCO_GL=egl or osmesa") from None


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
