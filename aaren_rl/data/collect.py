"""D4RL-style offline datasets from a Stable-Baselines3 learner.

One call to :func:`collect` does what D4RL did for its MuJoCo datasets:

1. train an SB3 agent (PPO with vectorized envs by default), recording every transition it sees
   and saving a checkpoint every ``steps / checkpoints`` steps;
2. evaluate every checkpoint and the final policy on ``checkpoint_eval_episodes`` episodes; the
   *expert* is the best of them (``expert="best"``: off-policy learners such as TQC swing by
   thousands of return between checkpoints late in training) or the final policy
   (``expert="final"``, as D4RL's 1M-step SAC experts were);
3. measure the reference returns: ``ref_min`` = a uniform random policy, ``ref_max`` = the
   expert, each the mean over ``ref_episodes`` episodes; pick as *medium* the checkpoint whose return is closest to one third of
   the way from random to expert, ``ref_min + (ref_max - ref_min) / 3`` (a normalized score of
   33; D4RL's "a third of the expert's performance", stated so that it also works for negative
   returns such as Pendulum's);
4. roll out the tiers: ``random``, ``medium``, ``expert``; ``medium-replay`` = everything the
   learner saw until the medium checkpoint, in order; ``medium-expert`` = medium then expert;
5. write each tier as a Minari dataset (and optionally a D4RL-format HDF5 file), plus a JSON report.

A finished learner can be kept as a *pack* (:func:`write_pack`, ``aaren-rl collect --pack DIR``):
the medium and expert policies (for sbx, only the actor's parameters), the learner's experience up
to the medium checkpoint, and what the report says of the learner: a few MB, small enough to
commit or carry to another machine. ``collect`` with ``from_pack`` rebuilds every tier from it
without training, the same episodes as the collection that wrote it (tested).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from ..output import write_json
from .recording import RawEpisode, RecordingVecEnv, episodes_until, rollout
from .dataset import env_spec
from .writers import (clean_stale_staging, minari_dataset_exists, minari_root, publish_minari,
                      stage_minari, write_hdf5)

TIERS = ("random", "medium", "medium-replay", "expert", "medium-expert")
ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "elu": torch.nn.ELU}
# Different seed streams for each use of randomness, so that changing one leaves the others alone.
SEED_OFFSETS = {"random": 1000, "medium": 2000, "expert": 3000, "ref_min": 4000, "ref_max": 5000,
                "checkpoints": 6000}


class CollectError(ValueError):
    """A collection that cannot go on, with a message for the user (the CLI prints it as is)."""


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class CollectConfig:
    """One collection run. Defaults suit a quick run on Pendulum; presets in ``envs/`` override."""

    env_id: str = "Pendulum-v1"
    name: str = "pendulum"  # folder name under out_dir
    tiers: tuple[str, ...] = TIERS
    dataset_ids: dict[str, str] = field(default_factory=dict)  # tier -> Minari id
    out_dir: str = "data"
    seed: int = 0
    # learner
    library: str = "sb3"  # sb3: Stable-Baselines3 (+ sb3-contrib for tqc); sbx: sbx-rl (JAX)
    algorithm: str = "ppo"  # ppo | sac | td3 | a2c | tqc | crossq (what the library offers)
    steps: int = 100_000
    n_envs: int = 4
    normalize: bool = False  # VecNormalize observations and rewards while training
    hyperparameters: dict = field(default_factory=dict)
    lr_schedule: str = "constant"  # or "linear": anneal learning_rate to 0, as in the PPO paper
    policy_kwargs: dict = field(default_factory=dict)
    checkpoints: int = 20  # saved evenly during training; the medium policy is one of them
    checkpoint_eval_episodes: int = 10
    resume_every: int = 0  # save the learner's full state (replay buffer too) every so many
    #                        steps, to continue a killed run; 0: at every checkpoint
    # datasets
    episodes: int = 100  # per rolled-out tier (at least)
    tier_steps: int = 0  # and at least this many steps per rolled-out tier
    ref_episodes: int = 100  # episodes averaged for ref_min_score / ref_max_score
    deterministic: bool = False  # act with the policy's mean action (else sample, as D4RL did)
    medium_fraction: float = 1 / 3
    expert: str = "best"  # "best": the best-evaluated checkpoint (or final policy); "final": the final policy
    check_references: bool = True  # refuse to write datasets whose expert is no better than random
    rollout_envs: int = 10
    hdf5: bool = False
    force: bool = False
    results_dir: str = ""  # if set, also write the summary report results_dir/data_<name>.json
    d4rl_ref_min: float | None = None  # D4RL's references (from the preset), for the summary
    d4rl_ref_max: float | None = None
    from_pack: str = ""  # a pack folder (write_pack): rebuild the tiers from it, no training

    def dataset_id(self, tier: str) -> str:
        return self.dataset_ids.get(tier) or f"aaren-rl/{self.name}/{tier}-v0"

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name


# ---------------------------------------------------------------------------------- policies


LIBRARIES = {
    "sb3": ("stable_baselines3", {"ppo": "PPO", "sac": "SAC", "td3": "TD3", "a2c": "A2C",
                                  "ddpg": "DDPG"}),
    "sb3-contrib": ("sb3_contrib", {"tqc": "TQC", "crossq": "CrossQ", "trpo": "TRPO"}),
    "sbx": ("sbx", {"ppo": "PPO", "sac": "SAC", "td3": "TD3", "tqc": "TQC", "crossq": "CrossQ",
                    "ddpg": "DDPG"}),
}
LIBRARY_NAMES = {"sb3": "stable-baselines3", "sbx": "sbx-rl"}
INSTALL_HINT = {"sb3-contrib": "pip install sb3-contrib", "sbx": "pip install 'aaren-rl[sbx]'"}


def _algorithm(name: str, library: str = "sb3"):
    """The learner class ``name`` of ``library``. ``sb3`` also finds sb3-contrib's (tqc, crossq)."""
    import importlib

    if library not in ("sb3", "sbx"):
        raise CollectError(f"unknown learner library {library!r}; expected 'sb3' or 'sbx'")
    sources = ["sb3", "sb3-contrib"] if library == "sb3" else ["sbx"]
    for source in sources:
        module, names = LIBRARIES[source]
        if name.lower() in names:
            try:
                return getattr(importlib.import_module(module), names[name.lower()])
            except ImportError:
                raise CollectError(f"algorithm {name!r} needs {module}, which is not installed: "
                                 f"{INSTALL_HINT.get(source, 'pip install ' + module)}") from None
    known = sorted({n for source in sources for n in LIBRARIES[source][1]})
    raise CollectError(f"unknown algorithm {name!r} for library {library!r}; expected one of {known}")


def _vecnormalize_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + "_vecnormalize.pkl")


def load_policy(model_path, algorithm: str, env_id: str, deterministic: bool = False,
                library: str = "sb3"):
    """A saved SB3 policy as a function from a batch of raw observations to a batch of actions
    (observations normalized with the VecNormalize statistics saved beside it, if any)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    model_path = Path(model_path)
    model = _algorithm(algorithm, library).load(model_path, device="cpu")
    norm = None
    if _vecnormalize_path(model_path).exists():
        norm = VecNormalize.load(str(_vecnormalize_path(model_path)),
                                 DummyVecEnv([lambda: gym.make(env_id)]))
        norm.training = False

    def policy(obs: np.ndarray) -> np.ndarray:
        if norm is not None:
            obs = norm.normalize_obs(obs)
        return model.predict(obs, deterministic=deterministic)[0]

    return policy


def random_policy(env_id: str, seed: int):
    """Uniform random actions from the env's action space, seeded."""
    env = gym.make(env_id)
    space = env.action_space
    env.close()
    rng = np.random.default_rng(seed)
    if isinstance(space, gym.spaces.Discrete):
        return lambda obs: rng.integers(space.start, space.start + space.n, size=len(obs))
    return lambda obs: rng.uniform(space.low, space.high, size=(len(obs),) + space.shape).astype(space.dtype)


# ---------------------------------------------------------------------------------- training


def _policy_kwargs(kwargs: dict, library: str = "sb3") -> dict:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("activation_fn"), str):
        name = kwargs["activation_fn"].lower()
        if library == "sbx":  # flax functions, not torch modules
            import flax.linen as nn

            kwargs["activation_fn"] = getattr(nn, name)
        else:
            kwargs["activation_fn"] = ACTIVATIONS[name]
    return kwargs


# What a saved learner state must agree on to be continued (the step count may grow).
RESUME_KEYS = ("env_id", "seed", "library", "algorithm", "n_envs", "normalize", "hyperparameters",
               "lr_schedule", "policy_kwargs")


def _resume_key(cfg: CollectConfig) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RESUME_KEYS}))


def machine() -> dict:
    """Where a collection ran, for its report."""
    import os
    import platform

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


class LearnerState:
    """The learner's full state in ``policies/resume/``: the model, VecNormalize statistics, the
    recorded transitions (``recording.npz``, float32, compressed) and ``state.json`` (written
    last, so that a state without it is ignored). Each save replaces the previous one atomically
    (a new folder, renamed). An off-policy learner's replay buffer is not saved: with one env it
    holds exactly the recorded transitions, so it is rebuilt from them (:func:`refill_replay_buffer`),
    which keeps the state small enough to carry between machines."""

    def __init__(self, policies_dir: Path):
        self.dir = policies_dir / "resume"

    def load_meta(self) -> dict | None:
        old = self.dir.with_name(self.dir.name + ".old")
        if not self.dir.exists() and old.exists():  # stopped between the two renames of a save
            os.replace(old, self.dir)
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def save(self, model, norm, recording: RecordingVecEnv, meta: dict) -> None:
        tmp = self.dir.with_name(self.dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save(tmp / "model.zip")
        if getattr(model, "replay_buffer", None) is not None and recording.num_envs > 1:
            model.save_replay_buffer(tmp / "replay_buffer.pkl")  # not rebuilt from the recording
        if norm is not None:
            norm.save(str(tmp / "vecnormalize.pkl"))
        save_episodes(tmp / "recording.npz", recording.snapshot())
        write_json(tmp / "state.json", meta)
        old = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        for d in (self.dir, self.dir.with_name(self.dir.name + ".partial"),
                  self.dir.with_name(self.dir.name + ".old")):
            shutil.rmtree(d, ignore_errors=True)


def save_episodes(path: Path, snapshot: dict, replay_seed: int | None = None) -> None:
    """A recording snapshot (``RecordingVecEnv.snapshot``) as one compressed npz, float32. With
    ``replay_seed`` the observations and rewards are left out: :func:`load_episodes` makes them
    again by replaying the actions (:func:`replay_episodes`; the caller has checked that it can)."""
    eps = snapshot["episodes"]
    cat = lambda key, dtype=np.float32: (np.concatenate([getattr(e, key) for e in eps]).astype(dtype)
                                        if eps else np.zeros(0, dtype))
    arrays = {} if replay_seed is not None else {"observations": cat("observations"), "rewards": cat("rewards")}
    if replay_seed is not None:
        arrays["replay_seed"] = np.array(replay_seed, np.int64)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez_compressed(
            f, **arrays,
            actions=cat("actions", np.float32 if eps and eps[0].actions.dtype.kind == "f" else np.int64),
            lengths=np.array([len(e) for e in eps], np.int64),
            terminated=np.array([e.terminated for e in eps], bool),
            truncated=np.array([e.truncated for e in eps], bool),
            first_step=np.array([e.first_step for e in eps], np.int64),
            num_steps=np.array(snapshot["num_steps"], np.int64))
    os.replace(partial, path)


def replay_episodes(env_id: str, actions: list[np.ndarray], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(observations, rewards) of each episode made again by stepping its recorded actions in one
    fresh env, its first reset seeded with ``seed`` and the later ones not, as the learner's single
    training env ran; rounded through float32 as :func:`save_episodes` stores them."""
    env = gym.make(env_id)
    out = []
    try:
        for i, acts in enumerate(actions):
            obs, _ = env.reset(seed=seed) if i == 0 else env.reset()
            xs, rs = [obs], []
            for a in acts:
                obs, r, *_ = env.step(a)
                xs.append(obs)
                rs.append(r)
            out.append((np.asarray(xs, np.float32), np.asarray(rs, np.float32).astype(np.float64)))
    finally:
        env.close()
    return out


def replays_exactly(env_id: str, episodes: list[RawEpisode], seed: int) -> bool:
    """Whether :func:`replay_episodes` gives back these episodes' observations and rewards to the bit."""
    again = replay_episodes(env_id, [e.actions for e in episodes], seed)
    return all(np.array_equal(x, np.asarray(e.observations, np.float32))
               and np.array_equal(r, np.asarray(e.rewards, np.float32).astype(np.float64))
               for (x, r), e in zip(again, episodes))


def load_episodes(path: Path, env_id: str | None = None) -> dict:
    """What :func:`save_episodes` wrote; a file written with ``replay_seed`` needs ``env_id``."""
    with np.load(path) as z:
        act, lengths = z["actions"], z["lengths"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        actions = [act[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
        if "observations" in z:
            obs, rew = z["observations"], z["rewards"]
            made = [(obs[bounds[i] + i:bounds[i + 1] + i + 1], rew[bounds[i]:bounds[i + 1]].astype(np.float64))
                    for i in range(len(lengths))]
        elif env_id is None:
            raise CollectError(f"{path} keeps actions only; its observations are made again in the env "
                               "it was recorded in, so give its env id")
        else:
            made = replay_episodes(env_id, actions, int(z["replay_seed"]))
        episodes = [RawEpisode(x, a, r, bool(term), bool(trunc), int(first))
                    for (x, r), a, term, trunc, first in zip(made, actions, z["terminated"], z["truncated"],
                                                             z["first_step"])]
        return {"episodes": episodes, "num_steps": int(z["num_steps"])}


def refill_replay_buffer(model, episodes: list[RawEpisode]) -> None:
    """Put the recorded transitions of a one-env learner back in its (empty) replay buffer, in
    the order they happened, as the learner stored them: actions rescaled to [-1, 1], episode ends
    done, time-outs (and the cut episodes of a restart) marked as such so they are bootstrapped."""
    buf = model.replay_buffer
    eps = sorted(episodes, key=lambda e: e.first_step)
    if not eps:
        return
    obs = np.concatenate([e.observations[:-1] for e in eps])
    next_obs = np.concatenate([e.observations[1:] for e in eps])
    actions = model.policy.scale_action(np.concatenate([e.actions for e in eps]))
    rewards = np.concatenate([e.rewards for e in eps])
    ends = np.concatenate([np.arange(len(e)) == len(e) - 1 for e in eps])
    timeouts = np.concatenate([(np.arange(len(e)) == len(e) - 1) & e.truncated for e in eps])
    n, size = len(rewards), buf.buffer_size
    keep = np.arange(max(n - size, 0), n)  # a full buffer keeps the latest transitions
    idx = keep % size
    buf.observations[idx, 0] = obs[keep].reshape(len(keep), *buf.obs_shape)
    if getattr(buf, "optimize_memory_usage", False):
        buf.observations[(idx + 1) % size, 0] = next_obs[keep].reshape(len(keep), *buf.obs_shape)
    else:
        buf.next_observations[idx, 0] = next_obs[keep].reshape(len(keep), *buf.obs_shape)
    buf.actions[idx, 0] = actions[keep].reshape(len(keep), buf.action_dim)
    buf.rewards[idx, 0] = rewards[keep]
    buf.dones[idx, 0] = ends[keep]
    if hasattr(buf, "timeouts"):
        buf.timeouts[idx, 0] = timeouts[keep]
    buf.pos, buf.full = n % size, n >= size


def train_learner(cfg: CollectConfig, policies_dir: Path, log=print):
    """Train the learner, saving checkpoints and (every ``resume_every`` steps) its full state, so
    that a killed run continues where it was saved; returns (recording env, [(step, path)], info)
    with info = {"train_seconds", "resumed_from", "sessions"}."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    policies_dir.mkdir(parents=True, exist_ok=True)
    state = LearnerState(policies_dir)
    meta = state.load_meta()
    if meta is not None and (meta.get("key") != _resume_key(cfg) or meta["step"] > cfg.steps):
        log(f"{cfg.name}: the saved learner state in {state.dir} is of other settings; starting over")
        meta = None
    if meta is None:
        state.clear()
        for stale in policies_dir.glob("checkpoint_*"):  # from an earlier or interrupted run
            stale.unlink()
    start_step = meta["step"] if meta else 0
    every = max(cfg.steps // max(cfg.checkpoints, 1), 1)
    save_every = cfg.resume_every or every
    algo = _algorithm(cfg.algorithm, cfg.library)

    # A resumed run gets fresh env seeds (derived from the step it continues from): its data is
    # whole and seeded, though not the same as that of an uninterrupted run.
    env_seed = cfg.seed + start_step
    recording = RecordingVecEnv(make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=env_seed))
    if meta:
        if (state.dir / "recording.npz").exists():
            recording.restore(load_episodes(state.dir / "recording.npz"))
        else:  # the layout of earlier versions
            with open(state.dir / "recording.pkl", "rb") as f:
                recording.restore(pickle.load(f))
    env = recording
    if cfg.normalize:
        if meta:
            env = VecNormalize.load(str(state.dir / "vecnormalize.pkl"), recording)
        else:
            env = VecNormalize(recording, gamma=cfg.hyperparameters.get("gamma", 0.99))
    hyperparameters = dict(cfg.hyperparameters)
    if cfg.lr_schedule == "linear":
        lr = hyperparameters.get("learning_rate", 3e-4)
        hyperparameters["learning_rate"] = lambda progress_remaining: progress_remaining * lr
    elif cfg.lr_schedule != "constant":
        raise CollectError(f"lr_schedule must be 'constant' or 'linear', got {cfg.lr_schedule!r}")
    device = {} if cfg.library == "sbx" else {"device": "cpu"}
    if meta:
        custom = {"learning_rate": hyperparameters["learning_rate"]} if cfg.lr_schedule == "linear" else {}
        model = algo.load(state.dir / "model.zip", env=env, custom_objects=custom or None, **device)
        if (state.dir / "replay_buffer.pkl").exists():
            model.load_replay_buffer(state.dir / "replay_buffer.pkl")
        elif getattr(model, "replay_buffer", None) is not None:
            refill_replay_buffer(model, recording.episodes)
        model.set_random_seed(env_seed)
        saved = [(s, Path(p)) for s, p in meta["checkpoints"]]
        sessions = list(meta["sessions"])
        log(f"{cfg.name}: resuming the learner at step {start_step} of {cfg.steps} "
            f"(state saved in {state.dir})")
    else:
        model = algo("MlpPolicy", env, seed=cfg.seed, verbose=0,
                     policy_kwargs=_policy_kwargs(cfg.policy_kwargs, cfg.library), **hyperparameters,
                     **device)
        saved, sessions = [], []
    session = {"from_step": start_step, "to_step": start_step, "seconds": 0.0, "machine": machine()}
    start = time.perf_counter()

    def save(path: Path):
        model.save(path)
        if cfg.normalize:
            env.save(str(_vecnormalize_path(path)))

    def save_state(step: int, finished: bool):
        session["to_step"], session["seconds"] = step, time.perf_counter() - start
        state.save(model, env if cfg.normalize else None, recording,
                   {"key": _resume_key(cfg), "step": step, "finished": finished,
                    "checkpoints": [(s, str(p)) for s, p in saved], "sessions": sessions})

    remaining = cfg.steps - start_step
    if not (meta and meta.get("finished") and remaining <= 0):
        sessions.append(session)
        class Checkpoints(BaseCallback):
            def _on_training_start(self):
                self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step",
                                desc=f"{cfg.name}: train {cfg.library} {cfg.algorithm}")
                self.next = (start_step // every + 1) * every
                self.next_state = (start_step // save_every + 1) * save_every

            def _on_step(self):
                self.bar.update(self.training_env.num_envs)
                if self.num_timesteps >= self.next and self.num_timesteps < cfg.steps:
                    path = policies_dir / f"checkpoint_{self.num_timesteps:09d}.zip"
                    save(path)
                    saved.append((self.num_timesteps, path))
                    self.next += every
                if self.num_timesteps >= self.next_state and self.num_timesteps < cfg.steps:
                    save_state(self.num_timesteps, False)
                    self.next_state += save_every
                return True

            def _on_training_end(self):
                self.bar.close()

        if remaining > 0:
            model.learn(remaining, callback=Checkpoints(), reset_num_timesteps=not meta)
        expert_path = policies_dir / "expert.zip"
        save(expert_path)
        saved = [(s, p) for s, p in saved if p != expert_path] + [(model.num_timesteps, expert_path)]
        save_state(model.num_timesteps, True)
    info = {"train_seconds": sum(s["seconds"] for s in sessions), "resumed_from": start_step or None,
            "sessions": sessions}
    return recording, saved, info


# ---------------------------------------------------------------------------------- packs

PACK_VERSION = 2  # 2: medium_replay.npz may keep the actions only (replay_seed); 1 is read too


def _save_pack_policy(model_path: Path, cfg: CollectConfig, dest: Path, name: str) -> None:
    """One saved policy into a pack: sbx's actor parameters and sampling key (the critics and
    optimizer states, ~97% of the saved model, are not needed to act), or the saved model as is."""
    if cfg.library == "sbx":
        import flax.serialization
        import jax

        model = _algorithm(cfg.algorithm, cfg.library).load(model_path)
        (dest / f"{name}_actor.msgpack").write_bytes(flax.serialization.to_bytes(model.policy.actor_state.params))
        np.save(dest / f"{name}_key.npy", np.asarray(jax.random.key_data(model.policy.key)
                                                      if jax.dtypes.issubdtype(model.policy.key.dtype, jax.dtypes.prng_key)
                                                      else model.policy.key))
    else:
        shutil.copy(model_path, dest / f"{name}.zip")
    if _vecnormalize_path(model_path).exists():
        shutil.copy(_vecnormalize_path(model_path), dest / f"{name}_vecnormalize.pkl")


def load_pack_policy(pack: Path, name: str, cfg: CollectConfig):
    """A pack's ``medium`` or ``expert`` policy, as :func:`load_policy` returns it: the same
    actions, for sbx from a fresh model of the pack's settings given the saved actor and key."""
    pack = Path(pack)
    if cfg.library != "sbx":
        return load_policy(pack / f"{name}.zip", cfg.algorithm, cfg.env_id, cfg.deterministic, cfg.library)
    import flax.serialization
    import jax.numpy as jnp
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    env = gym.make(cfg.env_id)
    hyper = {k: v for k, v in cfg.hyperparameters.items() if k not in ("buffer_size", "learning_starts")}
    model = _algorithm(cfg.algorithm, cfg.library)("MlpPolicy", env, seed=cfg.seed, verbose=0, buffer_size=1,
                                                   policy_kwargs=_policy_kwargs(cfg.policy_kwargs, cfg.library),
                                                   **hyper)
    env.close()
    state = model.policy.actor_state
    params = flax.serialization.from_bytes(state.params, (pack / f"{name}_actor.msgpack").read_bytes())
    model.policy.actor_state = state.replace(params=params)
    model.policy.key = jnp.asarray(np.load(pack / f"{name}_key.npy"))
    norm = None
    if (pack / f"{name}_vecnormalize.pkl").exists():
        norm = VecNormalize.load(str(pack / f"{name}_vecnormalize.pkl"), DummyVecEnv([lambda: gym.make(cfg.env_id)]))
        norm.training = False

    def policy(obs: np.ndarray) -> np.ndarray:
        if norm is not None:
            obs = norm.normalize_obs(obs)
        return model.predict(obs, deterministic=cfg.deterministic)[0]

    return policy


def write_pack(folder: Path, dest: Path) -> Path:
    """The finished collection in ``folder`` (``--out/NAME``) as a pack in ``dest``: medium and
    expert policies, ``medium_replay.npz`` (the learner's experience up to the medium checkpoint,
    float32, compressed) and ``pack.json`` (the learner's settings, training sessions, checkpoint
    evaluations and the medium and expert choices). Written in a side folder and renamed, so a
    stopped write leaves no pack."""
    folder, dest = Path(folder), Path(dest)
    report = _read_report(folder / "report.json")
    if not report or report.get("status") != "complete":
        raise CollectError(f"{folder}: no finished collection to pack (report.json is missing or not "
                           "complete); run the collection first")
    cfg = CollectConfig(**{**report["config"], "tiers": tuple(report["config"]["tiers"])})
    evals = report["checkpoints"] + [report["final_eval"]]
    expert = next(e for e in evals if e["step"] == report["expert"]["step"])
    expert_path = folder / "policies" / Path(expert["path"]).name  # paths in the report: from where it ran
    recording = folder / "policies" / "resume" / "recording.npz"
    medium_path = folder / "policies" / "medium.zip"
    for path in (expert_path, medium_path, recording):
        if not path.exists():
            raise CollectError(f"{folder}: {path} is missing; a pack needs the finished learner's files")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_pack_policy(expert_path, cfg, tmp, "expert")
    _save_pack_policy(medium_path, cfg, tmp, "medium")
    replay = episodes_until(load_episodes(recording)["episodes"], report["medium"]["step"], cfg.n_envs)
    # One env whose recorded actions, replayed from the learner's env seed, give back every
    # observation and reward to the bit (MuJoCo and classic control are deterministic): keep the
    # actions only (Walker2d's 280k steps: 24.6 MB -> about a quarter). Otherwise keep everything.
    compact = cfg.n_envs == 1 and replays_exactly(cfg.env_id, replay, cfg.seed)
    save_episodes(tmp / "medium_replay.npz", {"episodes": replay, "num_steps": report["medium"]["step"]},
                  replay_seed=cfg.seed if compact else None)
    keep = ("trained_steps", "train_seconds", "sessions", "checkpoints", "final_eval", "expert", "medium",
            "ref_min_score", "ref_max_score")
    write_json(tmp / "pack.json", {"version": PACK_VERSION, "env_id": cfg.env_id, "name": cfg.name,
                                   "key": _resume_key(cfg), "steps": cfg.steps, "machine": report.get("machine"),
                                   **{k: report[k] for k in keep}})
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def read_pack(pack: Path, cfg: CollectConfig) -> dict:
    """A pack's ``pack.json``, checked against ``cfg`` (the same env and learner settings)."""
    pack = Path(pack)
    meta = _read_report(pack / "pack.json")
    if meta is None:
        raise CollectError(f"{pack} is not a pack (no readable pack.json); write one with "
                           f"aaren-rl collect --env NAME --pack DIR")
    if meta.get("version") not in (1, PACK_VERSION):
        raise CollectError(f"{pack}: pack version {meta.get('version')!r}, expected 1 to {PACK_VERSION}")
    if meta["key"] != _resume_key(cfg):
        diff = sorted(k for k in meta["key"] if meta["key"][k] != _resume_key(cfg).get(k))
        raise CollectError(f"{pack} holds a learner of other settings than {cfg.name}'s ({', '.join(diff)} "
                           f"differ): rebuild with the settings it was made with")
    return meta


# ---------------------------------------------------------------------------------- collection


def _stats(episodes: list[RawEpisode]) -> dict:
    returns = np.array([ep.episode_return for ep in episodes])
    return {"episodes": len(episodes), "steps": int(sum(len(ep) for ep in episodes)),
            "return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "return_min": float(returns.min()), "return_max": float(returns.max())}


def _evaluate(cfg: CollectConfig, policy, episodes: int, seed: int, desc: str | None = None):
    torch.manual_seed(seed)  # SB3 samples stochastic actions from torch's global generator
    with tqdm(desc=f"{cfg.name}: {desc}", unit="step", leave=False, disable=desc is None) as bar:
        return rollout(cfg.env_id, policy, episodes=episodes, seed=seed,
                       n_envs=cfg.rollout_envs, progress=bar)


def collect(cfg: CollectConfig) -> dict:
    """Train, measure references, roll out and write the tiers; returns (and writes) the report."""
    unknown = set(cfg.tiers) - set(TIERS)
    if unknown:
        raise CollectError(f"unknown tier(s) {sorted(unknown)}; expected some of {list(TIERS)}")
    env_spec(cfg.env_id)  # fail now on an unknown env id or learner, not after training
    _algorithm(cfg.algorithm, cfg.library)
    folder = cfg.folder
    clean_stale_staging()  # left by a writer killed with -9
    for stale in folder.glob("*.partial"):
        stale.unlink()
    previous = _read_report(folder / "report.json")
    # datasets this folder's earlier run wrote or was publishing: a rerun may replace them
    ours = set(previous.get("publishing", [])) | {t.get("dataset_id") for t in
                                                   previous.get("tiers", {}).values()} if previous else set()
    existing = [t for t in cfg.tiers if minari_dataset_exists(cfg.dataset_id(t))]
    if previous and previous.get("status") == "complete" and not cfg.force \
            and set(cfg.tiers) <= set(previous.get("tiers", {})) and len(existing) == len(cfg.tiers):
        return {**previous, "skipped": True}
    foreign = [cfg.dataset_id(t) for t in existing if cfg.dataset_id(t) not in ours]
    if foreign and not cfg.force:
        raise CollectError(
            f"Minari dataset(s) {', '.join(foreign)} already exist under {minari_root()} and are not "
            f"from an unfinished run in {folder}; pass --force to replace them")
    t_start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    report = {"env_id": cfg.env_id, "config": asdict(cfg), "status": "running"}
    write_json(folder / "report.json", report)  # not complete: a rerun continues this one

    # 1.-3. from a pack: its learner's choices and experience, no training
    if cfg.from_pack:
        pack = Path(cfg.from_pack)
        meta = read_pack(pack, cfg)
        report.update({k: meta[k] for k in ("trained_steps", "train_seconds", "sessions", "checkpoints",
                                            "final_eval", "expert", "medium")}, resumed_from=None,
                      from_pack=str(pack))
        replay = load_episodes(pack / "medium_replay.npz", cfg.env_id)["episodes"]
        policies = {name: (lambda name=name: load_pack_policy(pack, name, cfg)) for name in ("medium", "expert")}
        ref_max_policy = policies["expert"]
    else:
        # 1. the learner
        recording, checkpoints, info = train_learner(cfg, folder / "policies")
        report.update(info)
        report["trained_steps"] = checkpoints[-1][0]  # SB3 rounds up to whole rollouts
        policy = lambda path: load_policy(path, cfg.algorithm, cfg.env_id, cfg.deterministic, cfg.library)

        # 2. every checkpoint (and the final policy) evaluated; the expert
        if cfg.expert not in ("best", "final"):
            raise CollectError(f"expert must be 'best' or 'final', got {cfg.expert!r}")
        evals = []
        for step, path in tqdm(checkpoints, desc=f"{cfg.name}: evaluate checkpoints", leave=False):
            eps = _evaluate(cfg, policy(path), cfg.checkpoint_eval_episodes,
                            cfg.seed + SEED_OFFSETS["checkpoints"])
            evals.append({"step": step, "path": str(path), **_stats(eps)})
        report["checkpoints"] = evals[:-1]
        report["final_eval"] = evals[-1]
        chosen = max(evals, key=lambda e: e["return_mean"]) if cfg.expert == "best" else evals[-1]
        expert_step, expert_path = chosen["step"], Path(chosen["path"])
        report["expert"] = {"rule": ("the checkpoint or final policy with the highest mean return over "
                                     f"{cfg.checkpoint_eval_episodes} episodes" if cfg.expert == "best" else "the final policy"),
                            "step": expert_step, "eval_return_mean": chosen["return_mean"],
                            "final_step": evals[-1]["step"], "final_eval_return_mean": evals[-1]["return_mean"]}
        ref_max_policy = lambda: policy(expert_path)

    # 3. references, and the medium checkpoint
    ref_min_eps = _evaluate(cfg, random_policy(cfg.env_id, cfg.seed + SEED_OFFSETS["ref_min"]),
                            cfg.ref_episodes, cfg.seed + SEED_OFFSETS["ref_min"], "ref_min (random)")
    ref_max_eps = _evaluate(cfg, ref_max_policy(), cfg.ref_episodes,
                            cfg.seed + SEED_OFFSETS["ref_max"], "ref_max (expert)")
    ref_min = _stats(ref_min_eps)["return_mean"]
    ref_max = _stats(ref_max_eps)["return_mean"]
    report.update(ref_min_score=ref_min, ref_max_score=ref_max, ref_episodes=cfg.ref_episodes)
    if cfg.check_references and not ref_max > ref_min:
        write_json(folder / "report.json", {**report, "status": "failed: expert no better than random"})
        raise CollectError(
            f"{cfg.env_id}: the expert ({cfg.library} {cfg.algorithm}, {report['trained_steps']} steps) "
            f"returns {ref_max:.1f}, no better than the random policy's {ref_min:.1f}, so normalized "
            f"scores would be meaningless; no dataset written. Train longer (a larger --steps "
            f"continues this learner) or change the learner's settings")
    if not cfg.from_pack:
        target = ref_min + cfg.medium_fraction * (ref_max - ref_min)
        before = [e for e in evals if e["step"] < expert_step]  # medium-replay: the learner's data up to it
        medium = min(before, key=lambda e: abs(e["return_mean"] - target)) if before else \
            {"step": expert_step, "path": str(expert_path), "return_mean": ref_max}
        shutil.copy(medium["path"], folder / "policies" / "medium.zip")
        if cfg.normalize:
            shutil.copy(_vecnormalize_path(Path(medium["path"])),
                        _vecnormalize_path(folder / "policies" / "medium.zip"))
        report["medium"] = {"rule": f"checkpoint before the expert whose mean return is closest to ref_min + "
                                    f"{cfg.medium_fraction:.3g} * (ref_max - ref_min)",
                            "target_return": target, "step": medium["step"],
                            "eval_return_mean": medium["return_mean"]}
        policies = {"medium": lambda: policy(folder / "policies" / "medium.zip"),
                    "expert": lambda: policy(expert_path)}
        replay = None

    # 4. the tiers
    def roll(name, pol):
        seed = cfg.seed + SEED_OFFSETS[name]
        torch.manual_seed(seed)
        with tqdm(desc=f"{cfg.name}: {name}", unit="step") as bar:
            return rollout(cfg.env_id, pol, episodes=cfg.episodes, min_steps=cfg.tier_steps,
                           seed=seed, n_envs=cfg.rollout_envs, progress=bar)

    data: dict[str, list[RawEpisode]] = {}
    tier_seconds = {}
    needed = set(cfg.tiers) | ({"medium", "expert"} if "medium-expert" in cfg.tiers else set())
    for name, make in (("random", lambda: random_policy(cfg.env_id, cfg.seed + SEED_OFFSETS["random"])),
                       ("medium", policies["medium"]), ("expert", policies["expert"])):
        if name in needed:
            t = time.perf_counter()
            data[name] = roll(name, make())
            tier_seconds[name] = time.perf_counter() - t
    if "medium-replay" in cfg.tiers:
        data["medium-replay"] = replay if replay is not None else recording.episodes_until(report["medium"]["step"])
    if "medium-expert" in cfg.tiers:
        data["medium-expert"] = data["medium"] + data["expert"]

    # 5. write
    env = gym.make(cfg.env_id)
    low = getattr(env.action_space, "low", None)
    high = getattr(env.action_space, "high", None)
    env.close()
    # Every tier is built in a staging place first and published together at the end, so that
    # a stopped run leaves no dataset that looks complete; the report says what is being published
    # so that a rerun may replace it without --force.
    report["tiers"] = {}
    staged = {}
    try:
        for tier in tqdm(cfg.tiers, desc=f"{cfg.name}: write", leave=False):
            episodes = data[tier]
            dataset_id = cfg.dataset_id(tier)
            staged[tier] = [stage_minari(
                dataset_id, episodes, cfg.env_id, ref_min_score=ref_min, ref_max_score=ref_max,
                algorithm_name=f"{cfg.algorithm.upper()} ({LIBRARY_NAMES[cfg.library]}), {tier} tier",
                description=f"aaren-rl {tier} tier of {cfg.env_id}")]
            entry = {"dataset_id": dataset_id, **_stats(episodes)}
            if tier in tier_seconds:
                entry["rollout_seconds"] = tier_seconds[tier]
            if cfg.hdf5:
                staged[tier].append(write_hdf5(folder / f"{tier}.hdf5", episodes, cfg.env_id,
                                               ref_min_score=ref_min, ref_max_score=ref_max,
                                               action_low=low, action_high=high, tier=tier,
                                               publish=False))
                entry["hdf5"] = str(folder / f"{tier}.hdf5")
            report["tiers"][tier] = entry
        write_json(folder / "report.json", {**report, "status": "publishing",
                                            "publishing": [cfg.dataset_id(t) for t in cfg.tiers]})
        for tier, (minari_staging, *hdf5) in staged.items():
            publish_minari(cfg.dataset_id(tier), minari_staging)
            if hdf5:
                os.replace(hdf5[0], folder / f"{tier}.hdf5")
    finally:
        for minari_staging, *hdf5 in staged.values():
            shutil.rmtree(minari_staging, ignore_errors=True)
            for path in hdf5:
                Path(path).unlink(missing_ok=True)
    report["total_seconds"] = time.perf_counter() - t_start
    report["machine"] = machine()
    report["status"] = "complete"
    if cfg.results_dir:
        write_json(Path(cfg.results_dir) / f"data_{cfg.name}.json", summary(cfg, report))
    write_json(folder / "report.json", report)
    return report


def summary(cfg: CollectConfig, report: dict) -> dict:
    """The short report of one environment's datasets (``benchmarks/results/data_<name>.json``)."""
    lo, hi = cfg.d4rl_ref_min, cfg.d4rl_ref_max
    d4rl = (lambda r: 100 * (r - lo) / (hi - lo)) if lo is not None and hi is not None else None
    tiers = {}
    for tier, t in report["tiers"].items():
        tiers[tier] = {k: t[k] for k in ("episodes", "steps", "return_mean", "return_std",
                                         "return_min", "return_max", "dataset_id")}
        if d4rl:
            tiers[tier]["d4rl_normalized"] = d4rl(t["return_mean"])
    learner = {k: getattr(cfg, k) for k in ("library", "algorithm", "n_envs", "normalize",
                                            "lr_schedule", "hyperparameters", "policy_kwargs")}
    settings = {k: getattr(cfg, k) for k in ("seed", "steps", "checkpoints", "checkpoint_eval_episodes",
                                             "episodes", "tier_steps", "ref_episodes",
                                             "deterministic", "medium_fraction", "rollout_envs")}
    return {
        "env_id": cfg.env_id, "ref_min_score": report["ref_min_score"],
        "ref_max_score": report["ref_max_score"], "d4rl_ref_min": lo, "d4rl_ref_max": hi,
        "expert_d4rl_normalized": d4rl(report["ref_max_score"]) if d4rl else None,
        "tiers": tiers, "learner": learner, "settings": settings,
        "steps": report["trained_steps"], "train_seconds": report["train_seconds"],
        "total_seconds": report["total_seconds"], "training_sessions": report["sessions"],
        "medium": report["medium"], "expert": report.get("expert"), "machine": report["machine"],
    }


def tiers_table(reports: list[dict]) -> str:
    """The tiers of collection reports (``report.json`` or the ``data_<name>.json`` summaries) as
    a markdown table, with each tier's mean return normalized by D4RL's references where known."""
    from ..output import markdown_table

    rows = []
    for r in reports:
        lo = r.get("d4rl_ref_min", r.get("config", {}).get("d4rl_ref_min"))
        hi = r.get("d4rl_ref_max", r.get("config", {}).get("d4rl_ref_max"))
        for tier, t in r["tiers"].items():
            d4rl = f"{100 * (t['return_mean'] - lo) / (hi - lo):.1f}" if lo is not None and hi is not None else "-"
            rows.append([r["env_id"], tier, t["episodes"], t["steps"], f"{t['return_mean']:.1f} ± {t['return_std']:.1f}",
                         f"{t['return_min']:.1f}", f"{t['return_max']:.1f}", f"{r['ref_min_score']:.1f}",
                         f"{r['ref_max_score']:.1f}", d4rl])
    header = ["env", "tier", "episodes", "steps", "return (mean ± std)", "min", "max", "ref_min", "ref_max",
              "D4RL-normalized"]
    return markdown_table(header, rows, "ll" + "r" * 8)
