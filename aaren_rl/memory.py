"""The long-memory task: bsuite's memory_len, where a cue seen d steps before the decision decides it.

**memory_len** (bsuite's ``MemoryChain``, Osband et al., 2020; ``pip install 'aaren-rl[memory]'``):
an observation is three numbers ``[1 - t/L, query, context]``. The context, +1 or -1, is shown in
the first two observations of an episode only (bsuite's step returns the observation of the time
before it advanced, so the reset observation and the first step's are the same); the query is
always 0 with one bit. The episode takes L + 1 actions (L = ``memory_length``) and only the last is
scored: +1 if it is 1 for a context of +1 (0 for -1), else -1; every other reward is 0. So neither
an agent's own earlier actions nor its rewards say anything about the cue, unlike POPGym's
RepeatFirst, which this module used first: there the answer is the same at every step, so a
Decision-Transformer-style agent, which sees its previous action, solved it without memory
(docs/results.md, "Long memory").

The cue distance d counts steps from the last observation that shows the context (step 1) to the
decision (step L): d = L - 1, so ``memory_length = d + 1``, and an agent that sees only its last K
observations has the cue at the decision if and only if d < K. ``MemoryLength50-v0``,
``MemoryLength100-v0`` and ``MemoryLength500-v0`` are named by d;
``gym.make("aaren_rl.memory:MemoryLength-v0", memory_length=L)`` takes any L (gymnasium imports
this module for the ``module:`` prefix). ``ContextPolicy`` is the scripted expert (random actions
in the corridor, the remembered context at the end), ``success_rate`` the fraction of episodes
whose scored action was right (chance 0.5), ``collect_datasets`` writes D4RL-style tiers.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "aaren_rl.memory:MemoryLength-v0"
DISTANCES = (50, 100, 500)
CHANCE = 0.5  # two actions, one scored answer


def memory_length_for(distance: int) -> int:
    """bsuite's memory_length that puts the decision ``distance`` steps after the cue was last seen."""
    return distance + 1


def episode_length(memory_length: int) -> int:
    """Actions in an episode of ``MemoryChain(memory_length)``."""
    return memory_length + 1


def env_id(distance: int) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"cue distance must be one of {list(DISTANCES)}, got {distance!r}")
    return f"aaren_rl.memory:MemoryLength{distance}-v0"


class MemoryLength(gym.Env):
    """bsuite's ``MemoryChain(memory_length, num_bits=1)`` as a gymnasium env: flat float32
    observations ``[1 - t/L, query, context]`` and Discrete(2) actions. ``reset(seed=...)``
    reseeds bsuite's generator from gymnasium's, so a seeded sequence of episodes repeats.

    bsuite is imported at the first ``reset``: making the env for its spaces (what loading a
    dataset and training do) works without it, so a training machine needs no bsuite."""

    metadata = {"render_modes": []}

    def __init__(self, memory_length: int | None = None, render_mode=None):
        if memory_length is None:
            raise ValueError("memory_length is required: gym.make('aaren_rl.memory:MemoryLength-v0', "
                             f"memory_length=L), or one of {[env_id(d) for d in DISTANCES]}")
        if isinstance(memory_length, bool) or not isinstance(memory_length, (int, np.integer)) or memory_length < 1:
            raise ValueError(f"memory_length must be a positive integer, got {memory_length!r}")
        self.memory_length = int(memory_length)
        self._env = None  # bsuite's MemoryChain, made at the first reset
        self.observation_space = gym.spaces.Box(np.array([0.0, 0.0, -1.0], np.float32),
                                                np.array([1.0, 1.0, 1.0], np.float32), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._done = True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self._env is None:
            try:
                from bsuite.environments.memory_chain import MemoryChain
            except ImportError as e:
                raise ImportError("the memory task needs bsuite to run episodes: "
                                  "pip install 'aaren-rl[memory]'") from e
            self._env = MemoryChain(self.memory_length, num_bits=1, seed=0)
        # bsuite draws each episode's context from its own RandomState: derive it from gymnasium's
        # generator, so that reset(seed=s) and the resets after it are reproducible
        self._env._rng = np.random.RandomState(int(self.np_random.integers(2**31)))
        ts = self._env.reset()
        self._done = False
        context = int(self._env._context[0])
        return self._obs(ts), {"context": 2 * context - 1}

    def step(self, action):
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset()")
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action must be 0 or 1, got {action!r}")
        ts = self._env.step(int(action))
        self._done = ts.last()
        info = {"success": ts.reward > 0} if self._done else {}
        return self._obs(ts), float(ts.reward), self._done, False, info

    @staticmethod
    def _obs(ts) -> np.ndarray:
        return np.asarray(ts.observation, dtype=np.float32).reshape(3)


if "MemoryLength-v0" not in gym.registry:
    # a string entry point: Minari stores the spec as JSON
    gym.register("MemoryLength-v0", entry_point="aaren_rl.memory:MemoryLength")
    for _d in DISTANCES:
        gym.register(f"MemoryLength{_d}-v0", entry_point="aaren_rl.memory:MemoryLength",
                     kwargs={"memory_length": memory_length_for(_d)})


def success_rate(returns) -> float:
    """The fraction of episodes whose scored (last) action was right: an episode's return is its
    final reward, +1 or -1. Chance is 0.5."""
    returns = np.asarray(returns, dtype=np.float64)
    if returns.size == 0:
        raise ValueError("success_rate needs at least one episode")
    return float((returns > 0).mean())


class ContextPolicy:
    """The scripted expert: remember the context of each episode's first observation, act at random
    in the corridor, answer the context at the decision (step ``memory_length``). Its corridor
    actions are independent of the cue, so its data does not leak the answer to an agent that sees
    its previous actions. ``epsilon`` answers the decision at random with that probability.

    Vectorized over n environments: ``__call__(obs (n, 3), episode_start (n,) bool) -> (n,) int``."""

    def __init__(self, n_envs: int, memory_length: int, epsilon: float = 0.0, seed: int | None = None):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.memory_length, self.epsilon = int(memory_length), epsilon
        self.answer = np.zeros(n_envs, dtype=np.int64)
        self.t = np.zeros(n_envs, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs).reshape(len(self.t), 3)
        start = np.asarray(episode_start, dtype=bool)
        self.t = np.where(start, 0, self.t + 1)
        self.answer[start] = (obs[start, 2] > 0).astype(np.int64)
        actions = self.rng.integers(0, 2, len(self.t))
        decide = (self.t == self.memory_length) & (self.rng.random(len(self.t)) >= self.epsilon)
        actions[decide] = self.answer[decide]
        return actions


# ----------------------------------------------------------------------------------------------
# datasets made with the scripted expert, in D4RL's manner

# tier -> probability of a random answer at the decision (the corridor is random in every tier):
# the uniform random policy (success 0.5), a medium policy (0.75) and the expert (1.0)
TIER_EPSILON = {"random": 1.0, "medium": 0.5, "expert": 0.0}


def rollout_scripted(env_name: str, memory_length: int, epsilon: float, episodes: int, seed: int,
                     n_envs: int = 10):
    """``episodes`` episodes of ``ContextPolicy(epsilon)`` as RawEpisodes (every episode of the
    task has the same length, so they run in rounds of ``n_envs``)."""
    from .data.recording import EpisodeRecorder

    out, round_ = [], 0
    while len(out) < episodes:
        n = min(n_envs, episodes - len(out))
        envs = [gym.make(env_name) for _ in range(n)]
        recorder = EpisodeRecorder(n)
        obs = [env.reset(seed=seed + 10_000 * round_ + i)[0] for i, env in enumerate(envs)]
        for i, o in enumerate(obs):
            recorder.begin(i, o)
        policy = ContextPolicy(n, memory_length, epsilon, seed=seed + 10_000 * round_ + 7919)
        start, active = np.ones(n, bool), list(range(n))
        while active:
            actions = policy(np.stack(obs), start)
            start[:] = False
            for i in list(active):
                obs[i], r, term, trunc, _ = envs[i].step(int(actions[i]))
                ep = recorder.add(i, int(actions[i]), r, obs[i], term, trunc)
                if ep is not None:
                    out.append(ep)
                    active.remove(i)
        for env in envs:
            env.close()
        round_ += 1
    return out


def collect_datasets(out_dir, distance: int, episodes: int = 2000, seed: int = 0, minari: bool = False) -> dict:
    """The tiers random, medium, expert and medium-expert of the task at ``distance``, as D4RL-format
    HDF5 files ``OUT/memory_length_DISTANCE/TIER.hdf5`` (and Minari datasets
    ``aaren-rl/memory-length-DISTANCE/TIER-v0`` with ``minari``), with the random and expert
    tiers' mean returns as the references. Returns the report (also written as report.json)."""
    import dataclasses
    from pathlib import Path

    from .data.writers import write_hdf5, write_minari
    from .output import write_json

    name, L = env_id(distance), memory_length_for(distance)
    # Minari looks the id up in gymnasium's registry, which knows it without the module prefix; the
    # spec under the prefixed id makes the stored id one that gym.make (and aaren-rl) resolve later
    spec = dataclasses.replace(gym.spec(name.partition(":")[2]), id=name)
    folder = Path(out_dir) / f"memory_length_{distance}"
    tiers = {tier: rollout_scripted(name, L, eps, episodes, seed + 1000 * k)
             for k, (tier, eps) in enumerate(TIER_EPSILON.items())}
    tiers["medium-expert"] = tiers["medium"] + tiers["expert"]
    ret = lambda eps: np.array([e.episode_return for e in eps])
    ref_min, ref_max = float(ret(tiers["random"]).mean()), float(ret(tiers["expert"]).mean())
    report = {"env_id": name, "cue_distance": distance, "memory_length": L, "episode_length": episode_length(L),
              "ref_min_score": ref_min, "ref_max_score": ref_max, "tiers": {}}
    for tier, eps in tiers.items():
        r = ret(eps)
        path = write_hdf5(folder / f"{tier}.hdf5", eps, name, ref_min_score=ref_min, ref_max_score=ref_max, tier=tier)
        entry = {"episodes": len(eps), "steps": int(sum(len(e) for e in eps)), "return_mean": float(r.mean()),
                 "return_std": float(r.std()), "success_rate": success_rate(r), "hdf5": str(path)}
        if minari:
            entry["dataset_id"] = f"aaren-rl/memory-length-{distance}/{tier}-v0"
            write_minari(entry["dataset_id"], eps, spec, ref_min_score=ref_min, ref_max_score=ref_max,
                         algorithm_name=f"ContextPolicy(epsilon={TIER_EPSILON.get(tier, 'mixed')})", force=True)
        report["tiers"][tier] = entry
    write_json(folder / "report.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# evaluating an agent on the task


def evaluate_success(policy, env_name: str, episodes: int, seed: int) -> dict:
    """Run ``policy`` (a ``StreamingPolicy`` or ``OnnxPolicy``) for ``episodes`` episodes, one env at a
    time (episode seeds ``seed + i``): the mean return and the success rate (``success_rate``)."""
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes!r}")
    env = gym.make(env_name)
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            state, reward, total = None, None, 0.0
            while True:
                action, state = policy.predict(obs, state, episode_start=np.array([reward is None]), reward=reward)
                obs, r, term, trunc, _ = env.step(int(np.asarray(action).reshape(-1)[0]))
                total += r
                reward = np.array([r], dtype=np.float32)
                if term or trunc:
                    break
            returns.append(total)
    finally:
        env.close()
    return {"episodes": episodes, "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": success_rate(returns)}
