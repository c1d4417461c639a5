"""D4RL-style offline datasets from a Stable-Baselines3 learner.

One call to :func:`collect` does what D4RL did for its MuJoCo datasets:

1. train an SB3 agent (PPO with vectorized envs by default), recording every transition it sees
   and saving a checkpoint every ``steps / checkpoints`` steps;
2. measure the reference returns: ``ref_min`` = a uniform random policy, ``ref_max`` = the final
   (expert) policy, each the mean over ``ref_episodes`` episodes;
3. evaluate the checkpoints and pick as *medium* the one whose return is closest to one third of
   the way from random to expert, ``ref_min + (ref_max - ref_min) / 3`` (a normalized score of
   33; D4RL's "a third of the expert's performance", stated so that it also works for negative
   returns such as Pendulum's);
4. roll out the tiers: ``random``, ``medium``, ``expert``; ``medium-replay`` = everything the
   learner saw until the medium checkpoint, in order; ``medium-expert`` = medium then expert;
5. write each tier as a Minari dataset (and optionally a D4RL-format HDF5 file), plus a JSON report.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from .recording import RawEpisode, RecordingVecEnv, rollout
from ..output import write_json
from .writers import minari_dataset_exists, write_hdf5, write_minari

TIERS = ("random", "medium", "medium-replay", "expert", "medium-expert")
ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "elu": torch.nn.ELU}
# Different seed streams for each use of randomness, so that changing one leaves the others alone.
SEED_OFFSETS = {"random": 1000, "medium": 2000, "expert": 3000, "ref_min": 4000, "ref_max": 5000,
                "checkpoints": 6000}


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
    algorithm: str = "ppo"  # ppo | sac | td3 | a2c (Stable-Baselines3)
    steps: int = 100_000
    n_envs: int = 4
    normalize: bool = False  # VecNormalize observations and rewards while training
    hyperparameters: dict = field(default_factory=dict)
    lr_schedule: str = "constant"  # or "linear": anneal learning_rate to 0, as in the PPO paper
    policy_kwargs: dict = field(default_factory=dict)
    checkpoints: int = 20  # saved evenly during training; the medium policy is one of them
    checkpoint_eval_episodes: int = 10
    # datasets
    episodes: int = 100  # per rolled-out tier (at least)
    tier_steps: int = 0  # and at least this many steps per rolled-out tier
    ref_episodes: int = 100  # episodes averaged for ref_min_score / ref_max_score
    deterministic: bool = False  # act with the policy's mean action (else sample, as D4RL did)
    medium_fraction: float = 1 / 3
    rollout_envs: int = 10
    hdf5: bool = False
    force: bool = False

    def dataset_id(self, tier: str) -> str:
        return self.dataset_ids.get(tier) or f"aaren-rl/{self.name}/{tier}-v0"

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name


# ---------------------------------------------------------------------------------- policies


def _algorithm(name: str):
    import stable_baselines3 as sb3

    algos = {"ppo": sb3.PPO, "sac": sb3.SAC, "td3": sb3.TD3, "a2c": sb3.A2C}
    if name.lower() not in algos:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(algos)}")
    return algos[name.lower()]


def _vecnormalize_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + "_vecnormalize.pkl")


def load_policy(model_path, algorithm: str, env_id: str, deterministic: bool = False):
    """A saved SB3 policy as a function from a batch of raw observations to a batch of actions
    (observations normalized with the VecNormalize statistics saved beside it, if any)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    model_path = Path(model_path)
    model = _algorithm(algorithm).load(model_path, device="cpu")
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


def _policy_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("activation_fn"), str):
        kwargs["activation_fn"] = ACTIVATIONS[kwargs["activation_fn"].lower()]
    return kwargs


def train_learner(cfg: CollectConfig, policies_dir: Path):
    """Train the SB3 learner, saving checkpoints; returns (recording env, [(step, path)], seconds)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    policies_dir.mkdir(parents=True, exist_ok=True)
    for stale in policies_dir.glob("checkpoint_*"):  # from an earlier or interrupted run
        stale.unlink()
    recording = RecordingVecEnv(make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=cfg.seed))
    env = VecNormalize(recording, gamma=cfg.hyperparameters.get("gamma", 0.99)) if cfg.normalize else recording
    hyperparameters = dict(cfg.hyperparameters)
    if cfg.lr_schedule == "linear":
        lr = hyperparameters.get("learning_rate", 3e-4)
        hyperparameters["learning_rate"] = lambda progress_remaining: progress_remaining * lr
    elif cfg.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {cfg.lr_schedule!r}")
    model = _algorithm(cfg.algorithm)(
        "MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0,
        policy_kwargs=_policy_kwargs(cfg.policy_kwargs), **hyperparameters,
    )
    every = max(cfg.steps // max(cfg.checkpoints, 1), 1)
    saved: list[tuple[int, Path]] = []

    def save(path: Path):
        model.save(path)
        if cfg.normalize:
            env.save(str(_vecnormalize_path(path)))

    class Checkpoints(BaseCallback):
        def _on_training_start(self):
            self.bar = tqdm(total=cfg.steps, desc=f"{cfg.name}: train {cfg.algorithm}", unit="step")
            self.next = every

        def _on_step(self):
            self.bar.update(self.training_env.num_envs)
            if self.num_timesteps >= self.next and self.num_timesteps < cfg.steps:
                path = policies_dir / f"checkpoint_{self.num_timesteps:09d}.zip"
                save(path)
                saved.append((self.num_timesteps, path))
                self.next += every
            return True

        def _on_training_end(self):
            self.bar.close()

    start = time.perf_counter()
    model.learn(cfg.steps, callback=Checkpoints())
    seconds = time.perf_counter() - start
    expert_path = policies_dir / "expert.zip"
    save(expert_path)
    saved.append((model.num_timesteps, expert_path))
    return recording, saved, seconds


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
        raise ValueError(f"unknown tier(s) {sorted(unknown)}; expected some of {list(TIERS)}")
    gym.spec(cfg.env_id)  # fail now on an unknown env id, not after training
    existing = [cfg.dataset_id(t) for t in cfg.tiers if minari_dataset_exists(cfg.dataset_id(t))]
    if existing and not cfg.force:
        raise FileExistsError(f"Minari dataset(s) {existing} already exist; pass --force to replace them")
    t_start = time.perf_counter()
    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    report = {"env_id": cfg.env_id, "config": asdict(cfg), "status": "running"}

    # 1. the learner
    recording, checkpoints, train_seconds = train_learner(cfg, folder / "policies")
    report["train_seconds"] = train_seconds
    report["trained_steps"] = checkpoints[-1][0]  # SB3 rounds up to whole rollouts
    policy = lambda path: load_policy(path, cfg.algorithm, cfg.env_id, cfg.deterministic)
    expert_step, expert_path = checkpoints[-1]

    # 2. references
    ref_min_eps = _evaluate(cfg, random_policy(cfg.env_id, cfg.seed + SEED_OFFSETS["ref_min"]),
                            cfg.ref_episodes, cfg.seed + SEED_OFFSETS["ref_min"], "ref_min (random)")
    ref_max_eps = _evaluate(cfg, policy(expert_path), cfg.ref_episodes,
                            cfg.seed + SEED_OFFSETS["ref_max"], "ref_max (expert)")
    ref_min = _stats(ref_min_eps)["return_mean"]
    ref_max = _stats(ref_max_eps)["return_mean"]
    report.update(ref_min_score=ref_min, ref_max_score=ref_max, ref_episodes=cfg.ref_episodes)

    # 3. the medium checkpoint
    target = ref_min + cfg.medium_fraction * (ref_max - ref_min)
    evals = []
    for step, path in tqdm(checkpoints[:-1], desc=f"{cfg.name}: evaluate checkpoints", leave=False):
        eps = _evaluate(cfg, policy(path), cfg.checkpoint_eval_episodes,
                        cfg.seed + SEED_OFFSETS["checkpoints"])
        evals.append({"step": step, "path": str(path), **_stats(eps)})
    report["checkpoints"] = evals
    medium = min(evals, key=lambda e: abs(e["return_mean"] - target)) if evals else \
        {"step": expert_step, "path": str(expert_path), "return_mean": ref_max}
    shutil.copy(medium["path"], folder / "policies" / "medium.zip")
    if cfg.normalize:
        shutil.copy(_vecnormalize_path(Path(medium["path"])),
                    _vecnormalize_path(folder / "policies" / "medium.zip"))
    report["medium"] = {"rule": f"checkpoint whose mean return is closest to ref_min + "
                                f"{cfg.medium_fraction:.3g} * (ref_max - ref_min)",
                        "target_return": target, "step": medium["step"],
                        "eval_return_mean": medium["return_mean"]}

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
                       ("medium", lambda: policy(folder / "policies" / "medium.zip")),
                       ("expert", lambda: policy(expert_path))):
        if name in needed:
            t = time.perf_counter()
            data[name] = roll(name, make())
            tier_seconds[name] = time.perf_counter() - t
    if "medium-replay" in cfg.tiers:
        data["medium-replay"] = recording.episodes_until(medium["step"])
    if "medium-expert" in cfg.tiers:
        data["medium-expert"] = data["medium"] + data["expert"]

    # 5. write
    env = gym.make(cfg.env_id)
    low = getattr(env.action_space, "low", None)
    high = getattr(env.action_space, "high", None)
    env.close()
    report["tiers"] = {}
    for tier in cfg.tiers:
        episodes = data[tier]
        dataset_id = cfg.dataset_id(tier)
        write_minari(dataset_id, episodes, cfg.env_id, ref_min_score=ref_min, ref_max_score=ref_max,
                     algorithm_name=f"{cfg.algorithm.upper()} (stable-baselines3), {tier} tier",
                     description=f"aaren-rl {tier} tier of {cfg.env_id}", force=cfg.force)
        entry = {"dataset_id": dataset_id, **_stats(episodes)}
        if tier in tier_seconds:
            entry["rollout_seconds"] = tier_seconds[tier]
        if cfg.hdf5:
            entry["hdf5"] = str(write_hdf5(folder / f"{tier}.hdf5", episodes, cfg.env_id,
                                           ref_min_score=ref_min, ref_max_score=ref_max,
                                           action_low=low, action_high=high, tier=tier))
        report["tiers"][tier] = entry
    report["total_seconds"] = time.perf_counter() - t_start
    report["status"] = "complete"
    write_json(folder / "report.json", report)
    return report


def markdown_table(reports: list[dict]) -> str:
    """The tiers of one or more collection reports as a markdown table."""
    lines = ["| env | tier | episodes | steps | return (mean ± std) | ref_min | ref_max |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        for tier, t in r["tiers"].items():
            lines.append(f"| {r['env_id']} | {tier} | {t['episodes']} | {t['steps']} | "
                         f"{t['return_mean']:.1f} ± {t['return_std']:.1f} | "
                         f"{r['ref_min_score']:.1f} | {r['ref_max_score']:.1f} |")
    return "\n".join(lines)
