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
actions, the discrete-action path of the agents; ``RepeatFirst50-v0``, ``RepeatFirst100-v0`` and
``RepeatFirst500-v0`` are its 1-, 2- and 10-deck versions, named by the cue distance they reach.
``FirstCuePolicy`` is its scripted expert, ``cue_success`` the success rate of a run's answers by
cue distance, and ``collect_datasets`` writes D4RL-style tiers made with the expert.
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


DISTANCES = {50: 1, 100: 2, 500: 10}  # cue distance reached -> decks (episodes of 51, 103, 519 steps)


def env_id(distance: int) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"cue distance must be one of {sorted(DISTANCES)}, got {distance!r}")
    return f"aaren_rl.memory:RepeatFirst{distance}-v0"


if "RepeatFirst-v0" not in gym.registry:
    gym.register("RepeatFirst-v0", entry_point=make_repeat_first)
    for _d, _n in DISTANCES.items():
        gym.register(f"RepeatFirst{_d}-v0", entry_point=make_repeat_first, kwargs={"num_decks": _n})


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


# ----------------------------------------------------------------------------------------------
# datasets made with the scripted expert, in D4RL's manner

# tier -> probability of a random answer: the expert, a medium policy right about 62% of the time
# (half its answers random), and the uniform random policy
TIER_EPSILON = {"random": 1.0, "medium": 0.5, "expert": 0.0}


def rollout_scripted(env_name: str, epsilon: float, episodes: int, seed: int, n_envs: int = 10):
    """``episodes`` episodes of ``FirstCuePolicy(epsilon)`` as RawEpisodes (every episode of the
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
        policy = FirstCuePolicy(n, epsilon, seed=seed + 10_000 * round_ + 7919)
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


def collect_datasets(out_dir, distance: int, episodes: int = 200, seed: int = 0, minari: bool = False) -> dict:
    """The tiers random, medium, expert and medium-expert of the task at ``distance``, as D4RL-format
    HDF5 files ``OUT/repeat_first_DISTANCE/TIER.hdf5`` (and Minari datasets
    ``aaren-rl/repeat-first-DISTANCE/TIER-v0`` with ``minari``), with the random and expert
    tiers' mean returns as the references. Returns the report (also written as report.json)."""
    from pathlib import Path

    from .data.writers import write_hdf5, write_minari
    from .output import write_json

    name = env_id(distance)
    folder = Path(out_dir) / f"repeat_first_{distance}"
    tiers = {tier: rollout_scripted(name, eps, episodes, seed + 1000 * k)
             for k, (tier, eps) in enumerate(TIER_EPSILON.items())}
    tiers["medium-expert"] = tiers["medium"] + tiers["expert"]
    ret = lambda eps: np.array([e.episode_return for e in eps])
    ref_min, ref_max = float(ret(tiers["random"]).mean()), float(ret(tiers["expert"]).mean())
    report = {"env_id": name, "cue_distance": distance, "episode_length": episode_length(DISTANCES[distance]),
              "ref_min_score": ref_min, "ref_max_score": ref_max, "tiers": {}}
    for tier, eps in tiers.items():
        r = ret(eps)
        actions = [e.actions for e in eps]
        cues = [int(e.observations[0].argmax()) for e in eps]
        rates = [cue_success(a, c) for a, c in zip(actions, cues)]
        success = {d: float(np.mean([x[d] for x in rates])) for d in rates[0] if rates[0][d] is not None}
        path = write_hdf5(folder / f"{tier}.hdf5", eps, name, ref_min_score=ref_min, ref_max_score=ref_max, tier=tier)
        entry = {"episodes": len(eps), "steps": int(sum(len(e) for e in eps)), "return_mean": float(r.mean()),
                 "return_std": float(r.std()), "success_by_distance": success, "hdf5": str(path)}
        if minari:
            entry["dataset_id"] = f"aaren-rl/repeat-first-{distance}/{tier}-v0"
            write_minari(entry["dataset_id"], eps, name, ref_min_score=ref_min, ref_max_score=ref_max,
                         algorithm_name=f"FirstCuePolicy(epsilon={TIER_EPSILON.get(tier, 'mixed')})", force=True)
        report["tiers"][tier] = entry
    write_json(folder / "report.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# evaluating an agent on the task


def evaluate_success(policy, env_name: str, episodes: int, seed: int, distances=(0, 20, 50, 100, 500)) -> dict:
    """Run ``policy`` (a ``StreamingPolicy`` or ``OnnxPolicy``) for ``episodes`` episodes, one env at a
    time (episode seeds ``seed + i``); the mean return and the success rate at cue distance >= d for
    each d the episodes reach (``cue_success``)."""
    env = gym.make(env_name)
    returns, rates = [], []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            cue, state, reward, actions, total = int(np.argmax(obs)), None, None, [], 0.0
            while True:
                action, state = policy.predict(obs, state, episode_start=np.array([reward is None]), reward=reward)
                a = int(np.asarray(action).reshape(-1)[0])
                actions.append(a)
                obs, r, term, trunc, _ = env.step(a)
                total += r
                reward = np.array([r], dtype=np.float32)
                if term or trunc:
                    break
            returns.append(total)
            rates.append(cue_success(np.array(actions), cue, distances))
    finally:
        env.close()
    success = {d: float(np.mean([x[d] for x in rates])) for d in distances if rates[0][d] is not None}
    return {"episodes": episodes, "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_by_distance": success}
