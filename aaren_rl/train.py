"""Training: one run, top to bottom (data, model, optimizer, loop, evaluation, checkpoints).

Decision Transformer's recipe: AdamW with linear warm-up, gradient clipping, dropout, MSE on
actions (cross-entropy for discrete actions). ``context="window"`` samples K-step windows as DT
does; ``context="episode"`` samples whole episodes from t = 0 and trains every prefix in one
parallel pass (the Aaren scan), which is what the recurrent policy sees when it acts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint
from .data import TrajectoryDataset
from .evaluate import evaluate_policy
from .model import DecisionModel, ModelConfig
from .policy import StreamingPolicy


@dataclass
class TrainConfig:
    """Optimization and logging. Defaults: Decision Transformer's reference setting."""

    updates: int = 100_000
    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10_000
    grad_clip: float = 0.25
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    max_episode_len: int | None = None  # episode context: crop episodes to their first N steps
    log_every: int = 100
    eval_every: int = 10_000  # 0: evaluate only at the end
    eval_episodes: int = 10
    checkpoint_every: int = 10_000
    env_id: str | None = None  # evaluation environment (default: the dataset's)
    target_return: float | None = None  # evaluation conditioning (default: the dataset's best return)

    def validate(self) -> "TrainConfig":
        for name in ("updates", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train config: {name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train config: {name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "warmup_steps", "eval_every", "eval_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"train config: {name} must be >= 0, got {getattr(self, name)}")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU")
    return torch.device(name)


def model_config_for(dataset: TrajectoryDataset, **overrides) -> ModelConfig:
    """A model config whose data-dependent fields come from the dataset."""
    c = ModelConfig(**overrides)
    c.observation_dim, c.action_dim, c.discrete = dataset.observation_dim, dataset.action_dim, dataset.discrete
    if not c.discrete:
        if dataset.action_low is None:
            raise ValueError(f"dataset {dataset.name!r} has no action bounds; pass env_id to load_dataset")
        c.action_low, c.action_high = dataset.action_low.tolist(), dataset.action_high.tolist()
    return c.validate()


def train(model_config: ModelConfig, config: TrainConfig, dataset: TrajectoryDataset, logdir: str | Path,
          resume: bool = False, progress: bool = True) -> DecisionModel:
    """Train and return the model; logs, checkpoints and the final evaluation go under ``logdir``."""
    config.validate()
    logdir = Path(logdir)
    ckpt_dir = logdir / "checkpoints"
    device = resolve_device(config.device)
    env_id = config.env_id or dataset.env_id
    target_return = config.target_return if config.target_return is not None else dataset.return_max
    info = {"train": asdict(config), "dataset": dataset.summary(), "env_id": env_id, "target_return": target_return}

    # -- data: all of it on the device, batches by tensor indexing
    dataset.to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)

    def sample_batch():
        if model_config.context == "window":
            return dataset.sample_windows(config.batch_size, model_config.context_len, gen)
        return dataset.sample_episodes(config.batch_size, gen, max_len=config.max_episode_len)

    # -- model and optimizer
    torch.manual_seed(config.seed)
    model = DecisionModel(model_config, dataset.obs_mean, dataset.obs_std).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    amp = config.amp and device.type == "cuda"

    start = 0
    if resume and (ckpt_dir / "latest").is_file():
        folder = resolve_checkpoint(ckpt_dir)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(folder / "model.safetensors"))
        state = load_trainer_state(folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        gen.set_state(state["sampler_rng"].to(gen.get_state().device))
        start = int(state["step"])

    def trainer_state(step):
        s = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "torch_rng": torch.get_rng_state(), "sampler_rng": gen.get_state().cpu()}
        if device.type == "cuda":
            s["cuda_rng"] = torch.cuda.get_rng_state()
        return s

    # -- logging
    writer = SummaryWriter(str(logdir), purge_step=start + 1 if start else None)
    if start == 0:
        writer.add_text("config", "```\n" + json.dumps({"model": model_config.to_dict(), **info}, indent=2) + "\n```")

    def run_eval(step):
        if not env_id or config.eval_episodes == 0:
            return None
        model.eval()
        policy = StreamingPolicy(model, target_return)
        res = evaluate_policy(policy, env_id, config.eval_episodes, seed=config.seed + step,
                              ref_min_score=dataset.ref_min_score, ref_max_score=dataset.ref_max_score)
        model.train()
        writer.add_scalar("eval/return_mean", res["return_mean"], step)
        writer.add_scalar("eval/return_std", res["return_std"], step)
        writer.add_scalar("eval/episode_length", res["length_mean"], step)
        writer.add_scalar("eval/policy_ms_per_step", res["policy_ms_per_step"], step)
        if "normalized_score_mean" in res:
            writer.add_scalar("eval/normalized_score", res["normalized_score_mean"], step)
        return res

    # -- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=config.updates, initial=start, desc="train", unit="upd", disable=not progress, dynamic_ncols=True)
    model.train()
    last_eval, last_loss, t_log, loss_sum, n_sum = None, float("nan"), time.perf_counter(), torch.zeros((), device=device), 0
    for step in range(start + 1, config.updates + 1):
        batch = sample_batch()
        actions = model.normalize_action(batch.actions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(batch.returns_to_go, batch.observations, actions, batch.timesteps, batch.padding_mask)
        loss = model.loss(pred.float(), actions, batch.padding_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        n_sum += 1

        if step % config.log_every == 0 or step == config.updates:
            now = time.perf_counter()
            last_loss = (loss_sum / n_sum).item()  # one device sync per log interval
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss became {last_loss} at update {step}")
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            writer.add_scalar("train/updates_per_s", n_sum / (now - t_log), step)
            bar.set_postfix(loss=f"{last_loss:.4f}", **({"eval": f"{last_eval:.1f}"} if last_eval is not None else {}))
            t_log, loss_sum, n_sum = now, torch.zeros((), device=device), 0
        if (config.eval_every and step % config.eval_every == 0) or step == config.updates:
            res = run_eval(step)
            if res is not None:
                last_eval = res.get("normalized_score_mean", res["return_mean"])
                bar.set_postfix(loss=f"{last_loss:.4f}", eval=f"{last_eval:.1f}")
                info["last_eval"] = {k: v for k, v in res.items() if k not in ("returns", "lengths")}
        if step % config.checkpoint_every == 0 or step == config.updates:
            save_checkpoint(ckpt_dir, step, model, info, trainer_state(step))
        bar.update(1)
    bar.close()
    if "last_eval" in info:
        writer.add_hparams(
            {k: v for k, v in {**model_config.to_dict(), **asdict(config)}.items() if isinstance(v, (int, float, str, bool))},
            {"hparam/return_mean": info["last_eval"]["return_mean"]}, run_name=".",
        )
    writer.close()
    model.eval()
    return model
