"""Training: one run, top to bottom (data, model, optimizer, loop, evaluation, checkpoints).

Decision Transformer's recipe: AdamW with linear warm-up, gradient clipping, dropout, MSE on
actions (cross-entropy for discrete actions). ``context="window"`` samples K-step windows as DT
does; ``context="segment"`` samples K-step segments the same way, each starting from the state of
its episode's earlier steps (folded without gradient, with the current weights: the context the
streaming policy acts in); ``context="episode"`` samples whole episodes from t = 0 and trains every prefix in one
parallel pass (the Aaren scan), which is what the recurrent policy sees when it acts.

Speed (``TrainConfig.compile``): at DT's size a step is a few hundred small kernels, so on a GPU
the host's launching, not the GPU, bounds it. ``"cudagraph"`` captures the whole update
(sampling, forward, backward, clip, AdamW) once in a CUDA graph and replays it; ``UpdateStep``
says what that requires. The default on CUDA adds torch.compile, which fuses the small
elementwise kernels the graph still holds (~430 per update eagerly). Nothing in the loop reads
the GPU back except the log lines, every ``log_every`` updates. Measurements: docs/train_speed.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import (
    load_trainer_state, read_weights, remove_stale_temporaries, resolve_checkpoint, save_checkpoint,
    update_checkpoint_info,
)
from . import distributed
from .data import TrajectoryDataset
from .data.sampling import packing_candidates
from .model import DecisionModel, ModelConfig

# how the update runs: "none" eagerly; "cudagraph" captured once in a CUDA graph and replayed;
# "torch.compile" with the forward and loss compiled; "torch.compile+cudagraph" both;
# "auto": "torch.compile+cudagraph" on CUDA (the fastest measured on the H200, 1.8-2.2x
# "cudagraph", docs/train_speed.md; compiling adds ~20 s at the start), else "none"
COMPILE_MODES = ("auto", "none", "cudagraph", "torch.compile", "torch.compile+cudagraph")


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
    compile: str = "auto"  # one of COMPILE_MODES; the same losses, fewer host launches on CUDA
    max_episode_len: int | None = None  # episode context: crop episodes to their first N steps
    # episode context: pack whole episodes one after another into rows of max_episode_len steps (the
    # dataset's longest by default), each attending only to itself (data.sample_packed); batch_size
    # counts rows. A row of short episodes then trains on all of them instead of one and padding.
    pack_episodes: bool = False
    log_every: int = 100
    eval_every: int = 10_000  # 0: evaluate only at the end
    eval_episodes: int = 10
    checkpoint_every: int = 10_000
    env_id: str | None = None  # evaluation environment (default: the dataset's)
    target_return: float | None = None  # evaluation conditioning (default: default_target_return(dataset))

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
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train config: compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if not isinstance(self.pack_episodes, bool):
            raise ValueError(f"train config: pack_episodes must be true or false, got {self.pack_episodes!r}")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU")
    return torch.device(name)


def default_target_return(dataset: TrajectoryDataset) -> float:
    """The return to condition on when none is given: the dataset's ``ref_max_score`` (its expert's
    return, as D4RL's normalization defines 100) where it has one, else its best episode's return."""
    return dataset.ref_max_score if dataset.ref_max_score is not None else dataset.return_max


# What a resumed run must share with the run it continues (the rest, e.g. ``updates``, the device,
# evaluation and checkpoint intervals, may change): the optimizer state and the sampler's position
# only mean something for the same model, data and optimization settings.
RESUME_FIXED_TRAIN = ("batch_size", "learning_rate", "weight_decay", "warmup_steps", "grad_clip", "seed",
                      "max_episode_len", "pack_episodes")
RESUME_FIXED_DATASET = ("episodes", "steps", "return_mean", "return_max")  # its content, not its path


def resume_differences(saved: dict, model_config: ModelConfig, config: TrainConfig,
                       dataset: TrajectoryDataset) -> list[str]:
    """``"section.key saved -> given"`` for each setting a resumed run may not change."""
    now = {"model": model_config.to_dict(), "train": asdict(config), "dataset": dataset.summary()}
    keys = {"model": list(now["model"]), "train": RESUME_FIXED_TRAIN, "dataset": RESUME_FIXED_DATASET}
    return [f"{section}.{k} {saved.get(section, {}).get(k)!r} -> {now[section].get(k)!r}"
            for section, names in keys.items() for k in names
            if saved.get(section, {}).get(k) != now[section].get(k)]


def model_config_for(dataset: TrajectoryDataset, **overrides) -> ModelConfig:
    """A model config whose data-dependent fields come from the dataset."""
    c = ModelConfig(**overrides)
    c.observation_dim, c.action_dim, c.discrete = dataset.observation_dim, dataset.action_dim, dataset.discrete
    if not c.discrete:
        if dataset.action_low is None:
            raise ValueError(f"dataset {dataset.name!r} has no action bounds; pass env_id to load_dataset")
        c.action_low, c.action_high = dataset.action_low.tolist(), dataset.action_high.tolist()
    return c.validate()


# ----------------------------------------------------------------------------------------------
# One update, eager or replayed from a CUDA graph


def resolve_compile(mode: str, device: torch.device) -> str:
    """The compile mode to use on ``device`` ("auto" resolved; CUDA graphs need a CUDA device)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "auto":
        return "torch.compile+cudagraph" if device.type == "cuda" else "none"
    if "cudagraph" in mode and device.type != "cuda":
        raise ValueError(f"compile={mode!r} needs a CUDA device, but training runs on {device}; "
                         f"use 'none' or 'torch.compile'")
    return mode


def make_optimizer(model: DecisionModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on embeddings, biases, norms): DT's recipe."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let a CUDA graph replay ``optimizer.step()``: the fused kernel, step counts and learning
    rate as device tensors (a float learning rate would be frozen into the graph; the schedule
    fills the tensor in place between replays)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group.update(capturable=True, fused=True, foreach=None)
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def portable_state(optimizer: torch.optim.Optimizer, scheduler) -> tuple[dict, dict]:
    """Optimizer and schedule state as the eager optimizer keeps it (float learning rates, not
    fused or capturable), so that a checkpoint resumes in any compile mode."""
    opt = optimizer.state_dict()  # fresh group dicts; the tensors are the live ones
    for group in opt["param_groups"]:
        group.update(lr=float(group["lr"]), capturable=False, fused=None, foreach=None)
    sched = scheduler.state_dict()
    sched["_last_lr"] = [float(x) for x in sched.get("_last_lr", [])]
    return opt, sched


class UpdateStep:
    """One training update: sample a batch on the device, forward (bf16 autocast on CUDA), loss,
    backward, gradient clip, AdamW step, learning-rate schedule.

    A call never waits for the GPU: the loss is added to ``loss_sum`` and the gradient norm kept
    in ``grad_norm`` (device tensors; ``pop_mean_loss`` reads them, one sync per log interval).

    ``mode`` "cudagraph": the first ``warmup`` calls run eagerly on a side stream (real updates,
    which also compile the Triton kernels and create the optimizer's state), the next call
    captures one update in a CUDA graph, and every call from then on replays it: one launch
    instead of several hundred, so the host no longer bounds small models. A graph replays fixed
    shapes and addresses: batches must have one length (episode context: pad to a fixed
    ``max_len``), the optimizer must be capturable (``make_capturable``), the sampler's generator
    is registered with the graph (each replay draws new batches), and nothing inside may read a
    value back to the host (the layers skip their input checks while capturing).
    ``"torch.compile"`` compiles the forward and loss (fixed shapes too).
    """

    def __init__(self, model: DecisionModel, optimizer, scheduler, sample_batch, *, mode: str = "none",
                 amp: bool = False, grad_clip: float = 0.25, generators=(), warmup: int = 3,
                 forward_module: torch.nn.Module | None = None, world_size: int = 1):
        self.model, self.optimizer, self.scheduler, self.sample_batch = model, optimizer, scheduler, sample_batch
        # data parallel: the forward runs through DDP(model), which averages the gradients over ranks
        self.forward_module, self.world_size = forward_module or model, world_size
        self.device = next(model.parameters()).device
        self.mode, self.amp, self.grad_clip = mode, amp, grad_clip
        self.graphed = "cudagraph" in mode
        self.generators, self.warmup = list(generators), warmup
        forward_loss = self._forward_loss
        self.forward_loss = torch.compile(forward_loss, dynamic=False) if "torch.compile" in mode else forward_loss
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.updates_since_pop = 0
        self.graph = None
        self._warmed = 0
        self._side_stream = None

    def _forward_loss(self, batch, prefix=None):
        model = self.model
        actions = model.normalize_action(batch.actions)
        # autocast's cache of cast weights would live outside the graph's memory: off when graphed
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.graphed):
            state = None
            if prefix is not None:  # segment context: the exact state of the steps before, without gradient
                with torch.no_grad():
                    state = model.prefix_state(prefix.returns_to_go, prefix.observations,
                                               model.normalize_action(prefix.actions), prefix.timesteps,
                                               prefix.padding_mask)
            pred = self.forward_module(batch.returns_to_go, batch.observations, actions, batch.timesteps,
                                       batch.padding_mask, state=state, episode_ids=batch.episode_ids)
        return model.loss(pred.float(), actions, batch.padding_mask)

    def _update(self):
        batch = self.sample_batch()
        batch, prefix = batch if isinstance(batch, tuple) else (batch, None)  # segments come with prefixes
        loss = self.forward_loss(batch, prefix)
        if self.world_size > 1:  # the global batch's mean loss, whatever each rank's padding
            loss = loss * distributed.rank_loss_weight(batch.padding_mask, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_norm.copy_(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def _eager_on_side_stream(self):
        main = torch.cuda.current_stream(self.device)
        self._side_stream = self._side_stream or torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            self._update()
        main.wait_stream(self._side_stream)

    def _capture(self):
        # capturing runs nothing; keep every generator exactly where the eager updates left it
        states = [(g, g.get_state()) for g in self.generators]
        cuda_rng = torch.cuda.get_rng_state(self.device)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the grads it writes
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            self._update()
        for g, state in states:
            g.set_state(state)
        torch.cuda.set_rng_state(cuda_rng, self.device)
        self.graph = graph

    def __call__(self) -> None:
        if not self.graphed:
            self._update()
        elif self.graph is not None:
            self.graph.replay()
        elif self._warmed < self.warmup:
            self._eager_on_side_stream()
            self._warmed += 1
        else:
            self._capture()
            self.graph.replay()
        self.scheduler.step()
        self.updates_since_pop += 1

    def pop_mean_loss(self) -> float:
        """Mean loss of the updates since the last call (a device sync; data parallel: of the global
        batches, the same on every rank)."""
        if self.world_size > 1:
            distributed.mean_over_ranks(self.loss_sum)
        loss = (self.loss_sum / max(self.updates_since_pop, 1)).item()
        self.loss_sum.zero_()  # in place: a graph holds its address
        self.updates_since_pop = 0
        return loss


def resolve_compile_data_parallel(mode: str) -> str:
    """Data parallel runs eagerly: "auto" is "none"; CUDA graphs and torch.compile under DDP are not
    supported here (a graph would have to capture DDP's gradient all-reduce)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode not in ("auto", "none"):
        raise ValueError(f"compile={mode!r} is not supported in data-parallel training (several ranks); "
                         f"use 'none' or 'auto' (which runs eagerly there)")
    return "none"


def check_packing(model_config: ModelConfig, config: TrainConfig) -> None:
    if config.pack_episodes and model_config.context != "episode":
        raise ValueError(f"train.pack_episodes packs whole episodes: it needs model.context = 'episode', "
                         f"not {model_config.context!r}")


def make_update_step(model_config: ModelConfig, config: TrainConfig, dataset: TrajectoryDataset,
                     device: torch.device | str = "cpu", weights: dict | None = None,
                     trainer_state: dict | None = None, ranks: distributed.Ranks | None = None) -> UpdateStep:
    """The model, its optimizer, warm-up schedule and batch sampler, and the ``UpdateStep`` that
    runs them: the one setup of training, its benchmark and its tests.

    Moves the dataset to ``device``; the compile mode is ``config.compile`` resolved for it.
    ``weights`` (a state dict) and ``trainer_state`` (from a checkpoint's trainer.pt: optimizer,
    schedule, RNG states) make it go on from a checkpoint. The model is ``update.model``, in
    training mode.

    ``ranks`` (default: the initialized process group, if any): with several ranks the model is
    wrapped in DDP, ``config.batch_size`` is the global batch (each rank samples its share from
    its own stream, ``distributed.rank_seed``), and a trainer state restores this rank's streams
    where it holds them (``rank_rngs``, saved by as many ranks), else re-derives them from the seed,
    the rank and the step.
    """
    device = torch.device(device)
    ranks = ranks or distributed.current()
    world = ranks.world_size
    mode = resolve_compile_data_parallel(config.compile) if ranks.active else resolve_compile(config.compile, device)
    if config.batch_size % world:
        raise ValueError(f"train.batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"{world} ranks")
    batch_size = config.batch_size // world
    dataset.to(device)
    seed = distributed.rank_seed(config.seed, ranks.rank, world)
    gen = torch.Generator(device=device).manual_seed(seed)
    check_packing(model_config, config)
    max_len = config.max_episode_len
    if (mode != "none" or config.pack_episodes) and max_len is None:
        max_len = dataset.max_episode_length  # a graph (or compiled code) runs one batch shape
    candidates = packing_candidates(max_len, dataset.min_episode_length) if config.pack_episodes else None

    def sample_batch():
        if model_config.context == "window":
            return dataset.sample_windows(batch_size, model_config.context_len, gen)
        if model_config.context == "segment":  # (segments, prefixes)
            prefix = None if max_len is None else max(max_len - 1, 1)
            return dataset.sample_segments(batch_size, model_config.context_len, gen, max_prefix=prefix)
        if config.pack_episodes:
            return dataset.sample_packed(batch_size, max_len, gen, candidates)
        return dataset.sample_episodes(batch_size, gen, max_len=max_len)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = DecisionModel(model_config, dataset.obs_mean, dataset.obs_std).to(device)
    if ranks.active:
        torch.manual_seed(seed)  # dropout masks of this rank's own
    optimizer = make_optimizer(model, config)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    if weights is not None:
        model.load_state_dict(weights)
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        rngs = trainer_state.get("rank_rngs") or [{k: trainer_state[k] for k in ("torch_rng", "sampler_rng", "cuda_rng")
                                                   if k in trainer_state}]
        if len(rngs) == world:  # the streams this rank had when the checkpoint was saved
            mine = rngs[ranks.rank]
            torch.set_rng_state(mine["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in mine:
                torch.cuda.set_rng_state(mine["cuda_rng"], device)
            gen.set_state(mine["sampler_rng"].to(gen.get_state().device))
        else:  # saved by another number of ranks: new streams, the same on every resume
            again = distributed.rank_seed(config.seed, ranks.rank, world, step=int(trainer_state["step"]))
            torch.manual_seed(again)
            gen.manual_seed(again)
    if "cudagraph" in mode:
        make_capturable(optimizer)  # after the scheduler is built, which keeps float base rates
    forward_module = None
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        # buffers (normalization statistics, action bounds) are constants: no broadcast per forward
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        forward_module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                 **no_sync)
    amp = config.amp and device.type == "cuda"
    return UpdateStep(model.train(), optimizer, scheduler, sample_batch, mode=mode, amp=amp,
                      grad_clip=config.grad_clip, generators=[gen], forward_module=forward_module, world_size=world)


def train(model_config: ModelConfig, config: TrainConfig, dataset: TrajectoryDataset, logdir: str | Path,
          resume: bool = False, progress: bool = True) -> DecisionModel:
    """Train and return the model; logs, checkpoints and the final evaluation go under ``logdir``.

    In an initialized process group (torchrun, ``distributed.init_from_env``) every rank calls this
    and trains the same model data parallel; rank 0 alone writes under ``logdir`` and evaluates,
    the others wait at barriers (docs/distributed.md)."""
    config.validate()
    logdir = Path(logdir)
    ckpt_dir = logdir / "checkpoints"
    ranks = distributed.current()
    main = ranks.is_main
    if ranks.active:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
        device = distributed.device_for(config.device, ranks.local_rank, local_world)
    else:
        device = resolve_device(config.device)
    env_id = config.env_id or dataset.env_id
    target_return = config.target_return if config.target_return is not None else default_target_return(dataset)
    info = {"train": asdict(config), "dataset": dataset.summary(), "env_id": env_id, "target_return": target_return}
    if ranks.active:
        info["data_parallel"] = {"world_size": ranks.world_size, "batch_per_rank": config.batch_size // ranks.world_size}
    distributed.barrier()  # every rank has checked the run folder before rank 0 writes to it
    if main:
        remove_stale_temporaries(ckpt_dir)  # what a run killed while saving left behind
    if env_id and config.eval_episodes > 0:  # a mismatch found now, not after all the updates
        from .evaluate import check_env_matches

        check_env_matches(env_id, dataset.observation_dim, dataset.action_dim, dataset.discrete,
                          f"the dataset {dataset.name!r}")

    # -- data, model, optimizer: all of it on the device, batches by tensor indexing
    start, weights, state = 0, None, None
    if resume and (ckpt_dir / "latest").is_file():
        folder = resolve_checkpoint(ckpt_dir)
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot resume: checkpoint {folder}/config.json is unreadable: {e}") from None
        changed = resume_differences(saved, model_config, config, dataset)
        if changed:
            raise ValueError(f"cannot resume {logdir}: settings differ from the saved run's (saved -> given): "
                             f"{'; '.join(changed)}. Give the saved settings, or a new --logdir")
        weights, state = read_weights(folder), load_trainer_state(folder)
        start = int(state["step"])
    try:
        update = make_update_step(model_config, config, dataset, device, weights, state, ranks)
    except (ValueError, KeyError, RuntimeError) as e:
        if state is None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint {resolve_checkpoint(ckpt_dir)} does not match the model or its optimizer: {first}") from None
    model, optimizer, scheduler, gen = update.model, update.optimizer, update.scheduler, update.generators[0]
    distributed.barrier()  # every rank has read the checkpoint it resumes from

    def trainer_state(step):
        """rank 0's state (the others': None); every rank's random streams under ``rank_rngs``."""
        rngs = {"torch_rng": torch.get_rng_state(), "sampler_rng": gen.get_state().cpu()}
        if device.type == "cuda":
            rngs["cuda_rng"] = torch.cuda.get_rng_state(device)
        all_rngs = distributed.gather_to_main(rngs) if ranks.active else [rngs]
        if not main:
            return None
        opt, sched = portable_state(optimizer, scheduler)
        s = {"optimizer": opt, "scheduler": sched, "step": step, **rngs}
        if ranks.active:
            s["rank_rngs"] = all_rngs
        return s

    # -- logging (rank 0)
    writer = SummaryWriter(str(logdir), purge_step=start + 1 if start else None) if main else _NoWriter()
    if start == 0:
        writer.add_text("config", "```\n" + json.dumps({"model": model_config.to_dict(), **info}, indent=2) + "\n```")

    def run_eval(step):
        if not env_id or config.eval_episodes == 0 or not main:
            return None
        from .evaluate import evaluate_policy  # gymnasium only where an evaluation runs
        from .policy import StreamingPolicy

        # act with a CPU copy: policies run at batch sizes where the CPU (and its compiled
        # step) beats a GPU round trip, and the training model keeps its mode and graphs
        policy = StreamingPolicy(copy.deepcopy(model).to("cpu").eval(), target_return)
        res = evaluate_policy(policy, env_id, config.eval_episodes, seed=config.seed + step,
                              ref_min_score=dataset.ref_min_score, ref_max_score=dataset.ref_max_score)
        writer.add_scalar("eval/return_mean", res["return_mean"], step)
        writer.add_scalar("eval/return_std", res["return_std"], step)
        writer.add_scalar("eval/episode_length", res["length_mean"], step)
        writer.add_scalar("eval/policy_ms_per_step", res["policy_ms_per_step"], step)
        if "normalized_score_mean" in res:
            writer.add_scalar("eval/normalized_score", res["normalized_score_mean"], step)
        return res

    # -- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=config.updates, initial=start, desc="train", unit="upd", disable=not (progress and main),
               dynamic_ncols=True)
    last_eval, last_loss, t_log, n_log = None, float("nan"), time.perf_counter(), 0
    for step in range(start + 1, config.updates + 1):
        update()  # no host sync: the loss stays on the device until the next log line
        n_log += 1

        if step % config.log_every == 0 or step == config.updates:
            last_loss = update.pop_mean_loss()  # one device sync per log interval
            now = time.perf_counter()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss became {last_loss} at update {step}")
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/learning_rate", float(scheduler.get_last_lr()[0]), step)
            writer.add_scalar("train/grad_norm", update.grad_norm.item(), step)
            writer.add_scalar("train/updates_per_s", n_log / (now - t_log), step)
            bar.set_postfix(loss=f"{last_loss:.4f}", **({"eval": f"{last_eval:.1f}"} if last_eval is not None else {}))
            t_log, n_log = now, 0
        saved = None
        checkpoint = step % config.checkpoint_every == 0 or step == config.updates
        evaluation = (config.eval_every and step % config.eval_every == 0) or step == config.updates
        if checkpoint:  # before evaluating: an error keeps the weights
            state_now = trainer_state(step)  # a collective: every rank takes part
            if main:
                saved = save_checkpoint(ckpt_dir, step, model, info, state_now)
        if evaluation:
            res = run_eval(step)
            if res is not None:
                last_eval = res.get("normalized_score_mean", res["return_mean"])
                bar.set_postfix(loss=f"{last_loss:.4f}", eval=f"{last_eval:.1f}")
                info["last_eval"] = {"step": step, **{k: v for k, v in res.items() if k not in ("returns", "lengths")}}
                if saved is not None:
                    update_checkpoint_info(saved, {"last_eval": info["last_eval"]})
        if checkpoint or evaluation:
            distributed.barrier()  # the others wait while rank 0 saves and evaluates
        bar.update(1)
    bar.close()
    if "last_eval" in info:
        writer.add_hparams(
            {k: v for k, v in {**model_config.to_dict(), **asdict(config)}.items() if isinstance(v, (int, float, str, bool))},
            {"hparam/return_mean": info["last_eval"]["return_mean"]}, run_name=".",
        )
    writer.close()
    distributed.barrier()  # rank 0 has written everything
    model.eval()
    return model


class _NoWriter:
    """The TensorBoard writer of ranks other than 0: writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
