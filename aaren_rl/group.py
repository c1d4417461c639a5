"""Many runs at once: runs that share an architecture trained as one batched computation.

A group stacks R runs (seeds, datasets of one environment, optimizer variants) along a new
leading dimension: ``torch.func.stack_module_state`` turns R ``DecisionModel``s into one set of
(R, ...) tensors, and ``vmap(functional_call(...))`` runs the model's own ``forward`` and
``loss`` over them, so the group computes exactly what R separate runs compute, as one set of
batched kernels. On a GPU, where launches rather than FLOPs bind a run at DT's size, one group
update costs about what one run's update costs (docs/sweep.md).

Each run keeps what makes it a run of its own:
- its sampling stream (its own ``torch.Generator``, seeded as ``train()`` seeds it);
- its dropout masks, drawn from its own generator in the order and shapes ``train()`` draws
  them. On the CPU that generator starts where ``train()``'s global generator stands after
  building the model, so a run's masks are the same alone or in a group (the equality test
  covers dropout on). On CUDA a run's masks come from its own generator too, but the solo run's
  fused dropout kernel draws its numbers differently: equal in distribution, not bit for bit;
- its AdamW moments, learning rate, weight decay and warm-up (per-run tensors of shape (R,));
- its gradient-norm clip, computed on its own gradients only;
- its run folder: checkpoints, TensorBoard events and the final evaluation, exactly as
  ``train()`` writes them, so ``load_checkpoint``, ``aaren-rl evaluate`` and ``--resume`` (alone
  or in a group) work on it unchanged.

Why vmap and not weights kept batched and multiplied with ``bmm``: both lower a linear layer
of R runs to one batched matrix product, so on a GPU, where the number of launches sets the
time at this size, they launch the same kernels, and under a CUDA graph (and torch.compile)
vmap's Python-level cost is paid once, at capture. vmap keeps one model definition, so a group
cannot drift from ``DecisionModel``. On the CPU the two measured within a few percent of each
other (``aaren-rl bench sweep``, formulation rows; docs/sweep.md); there the FLOPs bind, and
grouping itself does not pay at DT's size.

The whole update (sampling, masks, forward, backward, per-run clip, AdamW, schedule) touches only
device tensors: the learning rates come from a step counter on the device, so the update can be
captured once in a CUDA graph and replayed, as ``train.UpdateStep`` does for one run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from . import kernels
from .blocks import CausalSelfAttention, mask_of
from .checkpoint import (
    load_trainer_state, read_weights, remove_stale_temporaries, resolve_checkpoint, save_checkpoint,
    update_checkpoint_info,
)
from .data import FlatEpisodes, TrajectoryDataset
from .data.sampling import _randint, pack_rows, packing_candidates
from .model import DecisionModel, ModelConfig
from .train import (
    TrainConfig, check_packing, default_target_return, make_optimizer, portable_state, resolve_compile,
    resolve_device, resume_differences,
)

# what may differ between the runs of one group (everything else must be equal)
PER_RUN_TRAIN = ("seed", "learning_rate", "weight_decay", "warmup_steps", "grad_clip", "env_id",
                 "target_return", "eval_episodes")
PER_RUN_MODEL = ("action_low", "action_high")
BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's defaults, as make_optimizer uses them


@dataclass
class Run:
    """One run: its configs, its data and its folder."""

    model_config: ModelConfig
    config: TrainConfig
    dataset: TrajectoryDataset
    logdir: Path
    name: str = ""

    def __post_init__(self):
        self.logdir = Path(self.logdir)
        self.name = self.name or self.logdir.name


def group_key(run: Run) -> str:
    """Runs with equal keys can train as one group: same architecture, batch shape and schedule of
    logs, checkpoints and evaluations; seeds, data, optimizer settings and targets may differ."""
    m = {k: v for k, v in run.model_config.to_dict().items() if k not in PER_RUN_MODEL}
    t = {k: v for k, v in asdict(run.config).items() if k not in PER_RUN_TRAIN}
    return json.dumps({"model": m, "train": t}, sort_keys=True)


def check_group(runs: list[Run]) -> None:
    if not runs:
        raise ValueError("a group needs at least one run")
    check_packing(runs[0].model_config, runs[0].config)  # the group key holds both for every run
    if runs[0].model_config.context == "segment":
        raise ValueError(f"run {runs[0].name!r}: context 'segment' (segments from prefix states) does not train in "
                         "groups yet; train its seeds one at a time (aaren-rl train --seed N)")
    keys = [group_key(r) for r in runs]
    for r, k in zip(runs, keys):
        if k != keys[0]:
            a, b = json.loads(keys[0]), json.loads(k)
            diff = sorted(f"{s}.{f}" for s in a for f in a[s] if a[s][f] != b[s].get(f))
            raise ValueError(f"run {r.name!r} cannot train in one group with {runs[0].name!r}: "
                             f"they differ in {', '.join(diff)}")
    dirs = [r.logdir.resolve() for r in runs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two runs of the group share a run folder")


# ----------------------------------------------------------------------------------------------
# Dropout with masks from outside: each run's masks drawn from its own generator


class _MaskedDropout(nn.Module):
    """Stands in for an ``nn.Dropout`` in the group's template: multiplies by a mask that
    ``functional_call`` supplies as the buffer ``mask`` (already scaled by 1 / (1 - p))."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)


def _attention_with_mask(self: CausalSelfAttention, x: Tensor, padding_mask: Tensor | None = None,
                         episode_ids: Tensor | None = None) -> Tensor:
    """``CausalSelfAttention.forward`` written out (PyTorch's math path for SDPA on the CPU, which
    the solo run takes with dropout on), with the attention-weight dropout mask from the buffer
    ``dropout_mask`` (B, H, T, T)."""
    q, k, v = self._heads(x)
    allowed = mask_of(x, padding_mask, episode_ids)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    weights = weights * self.dropout_mask.to(weights.dtype)
    return self._merge(weights @ v)


@dataclass
class _Site:
    """One place where a training forward draws dropout noise, in call order."""

    name: str  # module name in the model
    shape: tuple  # the noise's shape for one run
    p: float
    attention: bool  # a CausalSelfAttention's attention weights (else an nn.Dropout's input)


def _dropout_sites(model: DecisionModel, batch) -> list[_Site]:
    """The dropout draws of one training forward, in the order the model makes them (found by
    running it once with hooks, its RNG untouched)."""
    sites, seen = [], set()
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        if module in seen:
            raise ValueError(f"module {names[module]} draws dropout twice per forward; a group cannot mirror it")
        seen.add(module)
        if isinstance(module, CausalSelfAttention):
            B, T, _ = x.shape
            sites.append(_Site(names[module], (B, module.num_heads, T, T), module.attn_dropout, True))
        else:
            sites.append(_Site(names[module], tuple(x.shape), module.p, False))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if (isinstance(m, nn.Dropout) and m.p > 0)
               or (isinstance(m, CausalSelfAttention) and m.attn_dropout > 0)]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            actions = model.normalize_action(batch.actions)
            model(batch.returns_to_go, batch.observations, actions, batch.timesteps, batch.padding_mask,
                  episode_ids=batch.episode_ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sites


class _Objective(nn.Module):
    """The loss of one run, as ``train.UpdateStep`` computes it (called through vmap)."""

    def __init__(self, model: DecisionModel, amp: bool, graphed: bool):
        super().__init__()
        self.model, self.amp, self.graphed = model, amp, graphed

    def forward(self, returns_to_go, observations, actions, timesteps, padding_mask, episode_ids=None):
        model = self.model
        actions = model.normalize_action(actions)
        device_type = returns_to_go.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.graphed):
            pred = model(returns_to_go, observations, actions, timesteps, padding_mask, episode_ids=episode_ids)
        return model.loss(pred.float(), actions, padding_mask)


# ----------------------------------------------------------------------------------------------
# The group: stacked weights, per-run streams, one update


def _group_attention_backends(device: torch.device):
    """The SDPA backends a vmapped group may use. On CUDA the memory-efficient kernel (float32's
    default) has no vmap batching rule: PyTorch runs it run by run, and its backward then fails with
    "LSE is not correctly aligned (strideH)" (H200, torch 2.11). Flash attention (bf16) and the math
    form (float32) batch."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH])


class RunGroup:
    """R runs of one architecture as one set of stacked tensors, and one update for all of them.

    ``models`` are R ordinary ``DecisionModel``s on the CPU, built as ``train()`` builds them
    (``torch.manual_seed(seed)`` first); the group trains stacked copies of their weights on
    ``device`` and writes them back with ``sync_models`` (checkpoints, evaluation).
    """

    def __init__(self, runs: list[Run], device: torch.device, mode: str = "none", amp: bool = False):
        check_group(runs)
        self.runs, self.R, self.device, self.mode = runs, len(runs), device, mode
        self.amp, self.graphed = amp, "cudagraph" in mode
        mc, tc = runs[0].model_config, runs[0].config
        self.context, self.K, self.batch_size = mc.context, mc.context_len, tc.batch_size
        self.max_len = tc.max_episode_len
        if mc.context == "episode" and self.max_len is None:  # one batch shape for all runs
            self.max_len = max(r.dataset.max_episode_length for r in runs)
        self.pack = tc.pack_episodes  # packed rows of max_len steps, the same draws per row for every run
        self.candidates = (packing_candidates(self.max_len, min(r.dataset.min_episode_length for r in runs))
                           if self.pack else None)

        # -- R models exactly as train() builds them; each run's dropout stream starts where the
        # solo run's global generator stands after building its model
        self.models, self.dropout_gens, self.sample_gens = [], [], []
        for run in runs:
            torch.manual_seed(run.config.seed)
            self.models.append(DecisionModel(run.model_config, run.dataset.obs_mean, run.dataset.obs_std))
            if device.type == "cuda":
                g = torch.Generator(device=device).manual_seed(run.config.seed)
            else:
                g = torch.Generator()
                g.set_state(torch.get_rng_state())
            self.dropout_gens.append(g)
            self.sample_gens.append(torch.Generator(device=device).manual_seed(run.config.seed))
        self.datasets = []
        for run in runs:
            if not any(run.dataset is d for d in self.datasets):
                self.datasets.append(run.dataset.to(device))

        self._concatenate_datasets()

        # -- the template: one model on the meta device whose dropout reads masks given to it
        probe = self._sample_one(runs[0].dataset, torch.Generator(device=device).manual_seed(0))
        self.sites = _dropout_sites(copy.deepcopy(self.models[0]).to(device), probe)
        template = copy.deepcopy(self.models[0])
        for site in self.sites:
            module = template.get_submodule(site.name)
            if site.attention:
                module.register_buffer("dropout_mask", torch.empty(0), persistent=False)
                module.forward = types.MethodType(_attention_with_mask, module)
            else:
                parent, _, child = site.name.rpartition(".")
                setattr(template.get_submodule(parent) if parent else template, child, _MaskedDropout())
        self.objective = _Objective(template.to("meta").train(), amp, self.graphed)
        self._mask_keys = [f"model.{s.name}.{'dropout_mask' if s.attention else 'mask'}" for s in self.sites]

        # -- stacked weights on the device, AdamW state, per-run hyperparameters
        params, buffers = stack_module_state([m.to(device) for m in self.models])
        for m in self.models:
            m.to("cpu")
        self.names = list(params)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        self.decay = [p.dim() >= 3 and "embed" not in k for k, p in self.params.items()]  # make_optimizer's rule, +1 dim
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        f32 = dict(dtype=torch.float32, device=device)
        col = lambda name: torch.tensor([float(getattr(r.config, name)) for r in runs], **f32)
        self.base_lr, self.weight_decay, self.grad_clip = col("learning_rate"), col("weight_decay"), col("grad_clip")
        self.warmup = torch.tensor([float(max(r.config.warmup_steps, 1)) for r in runs], **f32)
        self.step = torch.zeros((), **f32)  # updates done (all runs of a group move together)
        self.loss_sum = torch.zeros(self.R, **f32)
        self.grad_norm = torch.zeros(self.R, **f32)
        self.updates_since_pop = 0

        def loss_of(p, b, masks, *batch):  # the objective's weights live under "model."
            weights = {f"model.{k}": v for k, v in p.items()}
            return functional_call(self.objective, ({**weights, **masks}, {f"model.{k}": v for k, v in b.items()}), batch)

        self.losses = vmap(loss_of, in_dims=0)  # (R,) losses from (R, ...) weights and batches
        if "torch.compile" in mode:
            self.losses = torch.compile(self.losses, dynamic=False)
            self._optimizer_step = torch.compile(self._optimizer_step, dynamic=False)
        self.graph, self._warmed, self._side_stream = None, 0, None

    # -- one step's inputs -----------------------------------------------------------------
    def _sample_one(self, dataset, gen):
        if self.context == "window":
            return dataset.sample_windows(self.batch_size, self.K, gen)
        if self.pack:
            return dataset.sample_packed(self.batch_size, self.max_len, gen, self.candidates)
        return dataset.sample_episodes(self.batch_size, gen, max_len=self.max_len)

    def sample(self) -> list[Tensor]:
        """One batch per run from its own generator, (R, B, L, ...) per field: each run draws its
        start indices as ``sample_windows`` / ``sample_episodes`` do, then one gather builds all
        R batches from the group's datasets concatenated (R + a dozen kernels, not R dozen)."""
        flat, B = self.flat, self.batch_size
        if self.context == "window":
            i = torch.stack([_randint(n, B, g, self.device) for n, g in zip(self.run_steps, self.sample_gens)])
            i = (i + self.step_offset[:, None]).reshape(-1)  # (R * B,) rows of the concatenation
            episode = flat.step_episode[i]
            end = flat.episode_start[episode] + flat.episode_length[episode]
            valid = (i[:, None] + torch.arange(self.K, device=self.device)) < end[:, None]
            batch = flat.gather(i, valid)
        elif self.pack:  # B x candidates draws per run, as sample_packed draws them
            M = self.candidates
            e = torch.stack([_randint(n, B * M, g, self.device) for n, g in zip(self.run_episodes, self.sample_gens)])
            e = (e + self.episode_offset[:, None]).reshape(self.R * B, M)
            batch = pack_rows(flat, e, self.max_len)
        else:
            e = torch.stack([_randint(n, B, g, self.device) for n, g in zip(self.run_episodes, self.sample_gens)])
            e = (e + self.episode_offset[:, None]).reshape(-1)
            valid = torch.arange(self.max_len, device=self.device) < flat.episode_length[e][:, None]
            batch = flat.gather(flat.episode_start[e], valid)
        names = ("returns_to_go", "observations", "actions", "timesteps", "padding_mask") + (("episode_ids",) if self.pack else ())
        return [getattr(batch, f).reshape(self.R, B, *getattr(batch, f).shape[1:]) for f in names]

    def _concatenate_datasets(self) -> None:
        """The group's datasets as one ``FlatEpisodes`` (observations normalized per dataset, as
        each run's batches are) and each run's offsets into it."""
        parts, offsets = [], {}
        steps = episodes = 0
        for d in self.datasets:
            f = d.flat
            offsets[id(d)] = (steps, episodes)
            parts.append(FlatEpisodes(
                observations=(f.observations - f.obs_mean) / f.obs_std, actions=f.actions, rewards=f.rewards,
                returns_to_go=f.returns_to_go, timesteps=f.timesteps, step_episode=f.step_episode + episodes,
                episode_start=f.episode_start + steps, episode_length=f.episode_length, obs_mean=f.obs_mean,
                obs_std=f.obs_std))
            steps, episodes = steps + f.num_steps, episodes + f.num_episodes
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        dim = parts[0].observations.shape[1]
        self.flat = FlatEpisodes(
            observations=cat("observations"), actions=cat("actions"), rewards=cat("rewards"),
            returns_to_go=cat("returns_to_go"), timesteps=cat("timesteps"), step_episode=cat("step_episode"),
            episode_start=cat("episode_start"), episode_length=cat("episode_length"),
            obs_mean=torch.zeros(dim, device=self.device), obs_std=torch.ones(dim, device=self.device))
        long = dict(dtype=torch.long, device=self.device)
        self.step_offset = torch.tensor([offsets[id(r.dataset)][0] for r in self.runs], **long)
        self.episode_offset = torch.tensor([offsets[id(r.dataset)][1] for r in self.runs], **long)
        self.run_steps = [r.dataset.flat.num_steps for r in self.runs]
        self.run_episodes = [r.dataset.flat.num_episodes for r in self.runs]

    def draw_masks(self) -> dict[str, Tensor]:
        """Each run's dropout masks from its own generator.

        On the CPU site by site in the model's order, so that a run draws the masks it draws alone.
        On CUDA a solo run's masks come from the device's generator anyway, so each run draws all
        its sites in one call: R kernels instead of R x sites (the launches dominated the masks'
        time in a profile of 64 runs)."""
        if self.device.type == "cuda" and self.sites:
            sizes = [math.prod(site.shape) for site in self.sites]
            flat = torch.empty((self.R, sum(sizes)), device=self.device)
            keep = 1.0 - self.sites[0].p if len({site.p for site in self.sites}) == 1 else None
            if keep is not None:
                for r, g in enumerate(self.dropout_gens):
                    flat[r].bernoulli_(keep, generator=g)
                flat.div_(keep)
                parts = flat.split(sizes, dim=1)
                return {key: part.view(self.R, *site.shape)
                        for key, site, part in zip(self._mask_keys, self.sites, parts)}
        masks = {}
        for key, site in zip(self._mask_keys, self.sites):
            keep = 1.0 - site.p
            mask = torch.empty((self.R, *site.shape), device=self.device)
            for r, g in enumerate(self.dropout_gens):
                mask[r].bernoulli_(keep, generator=g)  # in place: no stacking copy
            masks[key] = mask.div_(keep)
        return masks

    # -- the update ------------------------------------------------------------------------
    def _update(self) -> None:
        batch = self.sample()
        masks = self.draw_masks()
        for p in self.params.values():
            p.grad = None
        with _group_attention_backends(self.device):
            loss = self.losses(self.params, self.buffers, masks, *batch)  # (R,)
            loss.sum().backward()  # run r's weights see only loss r: per-run gradients
        with torch.no_grad():
            self._optimizer_step([p.grad for p in self.params.values()])
            self.loss_sum += loss.detach()

    def _optimizer_step(self, grads: list[Tensor]) -> None:
        """Per-run gradient clipping and AdamW over the stacked weights (compiled in the
        torch.compile modes: a few fused kernels instead of ~10 per weight tensor)."""
        params = list(self.params.values())
        # clip_grad_norm_ per run: the norm over that run's gradients only
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(self.R, -1), dim=1) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)  # (R,)
        coef = (self.grad_clip / (total + 1e-6)).clamp(max=1.0)
        self.grad_norm.copy_(total)
        # AdamW (torch's single-tensor algorithm) with per-run learning rate and decay
        self.step += 1
        lr = self.base_lr * torch.clamp(self.step / self.warmup, max=1.0)  # the LambdaLR warm-up
        bc1 = 1 - BETAS[0] ** self.step
        bc2_sqrt = (1 - BETAS[1] ** self.step).sqrt()
        for p, g, m, v, decay in zip(params, grads, self.exp_avg.values(), self.exp_avg_sq.values(), self.decay):
            view = (self.R,) + (1,) * (p.dim() - 1)
            g.mul_(coef.view(view))
            lr_p = lr.view(view)
            if decay:
                p.mul_(1 - lr_p * self.weight_decay.view(view))
            m.lerp_(g, 1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            p.sub_(m / (v.sqrt() / bc2_sqrt).add_(EPS) * (lr_p / bc1))

    def _eager_on_side_stream(self):
        main = torch.cuda.current_stream(self.device)
        self._side_stream = self._side_stream or torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            self._update()
        main.wait_stream(self._side_stream)

    def _capture(self):
        gens = self.sample_gens + self.dropout_gens
        states = [(g, g.get_state()) for g in gens]
        for p in self.params.values():
            p.grad = None  # the graph allocates the grads it writes
        graph = torch.cuda.CUDAGraph()
        for g in gens:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            self._update()
        for g, state in states:  # capturing runs nothing: keep every stream where it stood
            g.set_state(state)
        self.graph = graph

    def __call__(self) -> None:
        """One update of every run: no host sync (losses stay on the device until ``pop_mean_loss``).

        "cudagraph" modes: a few eager updates on a side stream, then one captured, then replays
        (see ``train.UpdateStep``: fixed shapes, generators registered with the graph)."""
        with kernels.use_triton(False):  # the fused scan has no vmap rule; the plain scan batches
            if not self.graphed:
                self._update()
            elif self.graph is not None:
                self.graph.replay()
            elif self._warmed < 3:
                self._eager_on_side_stream()
                self._warmed += 1
            else:
                self._capture()
                self.graph.replay()
        self.updates_since_pop += 1

    def pop_mean_loss(self) -> list[float]:
        """Each run's mean loss over the updates since the last call (one device sync)."""
        loss = (self.loss_sum / max(self.updates_since_pop, 1)).tolist()
        self.loss_sum.zero_()
        self.updates_since_pop = 0
        return loss

    def learning_rates(self) -> list[float]:
        """The learning rate of each run's next update (what LambdaLR's get_last_lr gives)."""
        return (self.base_lr * torch.clamp((self.step + 1) / self.warmup, max=1.0)).tolist()

    # -- to and from ordinary runs ---------------------------------------------------------
    @torch.no_grad()
    def sync_models(self) -> list[DecisionModel]:
        """Write the stacked weights back into the R CPU models and return them."""
        for r, model in enumerate(self.models):
            state = {k: v[r] for k, v in self.params.items()}
            state.update({k: v[r] for k, v in self.buffers.items()})
            model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        return self.models

    def trainer_state(self, r: int) -> dict:
        """Run r's optimizer, schedule and RNG state in ``train()``'s format (its --resume reads it)."""
        run, model = self.runs[r], self.models[r]
        opt = make_optimizer(model, run.config)
        named = dict(model.named_parameters())
        step = int(self.step.item())
        for k in self.names:
            opt.state[named[k]] = {"step": torch.tensor(float(step)), "exp_avg": self.exp_avg[k][r].detach().cpu().clone(),
                                   "exp_avg_sq": self.exp_avg_sq[k][r].detach().cpu().clone()}
        warmup = max(run.config.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0))
        lr = run.config.learning_rate * min((step + 1) / warmup, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        sched.last_epoch, sched._step_count, sched._last_lr = step, step + 1, [lr] * len(opt.param_groups)
        opt_state, sched_state = portable_state(opt, sched)
        state = {"optimizer": opt_state, "scheduler": sched_state, "step": step,
                 "sampler_rng": self.sample_gens[r].get_state().cpu()}
        if self.device.type == "cuda":
            state["torch_rng"] = torch.get_rng_state()
            state["cuda_rng"] = self.dropout_gens[r].get_state()
        else:
            state["torch_rng"] = self.dropout_gens[r].get_state()
        return state

    @torch.no_grad()
    def load_run(self, r: int, folder: Path) -> int:
        """Run r from a checkpoint written by ``train()`` or by a group; returns its step."""
        model = self.models[r]
        model.load_state_dict(read_weights(folder))
        state = load_trainer_state(folder)
        opt = make_optimizer(model, self.runs[r].config)
        opt.load_state_dict(state["optimizer"])
        named = dict(model.named_parameters())
        for k in self.names:
            self.params[k][r].copy_(named[k].detach().to(self.device))
            s = opt.state.get(named[k], {})
            if "exp_avg" in s:
                self.exp_avg[k][r].copy_(s["exp_avg"].to(self.device))
                self.exp_avg_sq[k][r].copy_(s["exp_avg_sq"].to(self.device))
        for k, v in self.buffers.items():
            v[r].copy_(model.state_dict()[k].to(self.device))
        self.sample_gens[r].set_state(state["sampler_rng"].to(self.sample_gens[r].get_state().device))
        rng = state.get("cuda_rng") if self.device.type == "cuda" else state.get("torch_rng")
        if rng is not None:
            self.dropout_gens[r].set_state(rng)
        return int(state["step"])

    def state_nbytes(self) -> int:
        """Bytes of weights, gradients and AdamW moments of the whole group."""
        return 4 * sum(p.numel() for p in self.params.values()) * 4


# ----------------------------------------------------------------------------------------------
# Training a group: the loop, logs, checkpoints, evaluation


def _run_info(run: Run) -> dict:
    env_id = run.config.env_id or run.dataset.env_id
    target = run.config.target_return if run.config.target_return is not None else default_target_return(run.dataset)
    return {"train": asdict(run.config), "dataset": run.dataset.summary(), "env_id": env_id, "target_return": target}


def _eval_job(run: Run, folder: Path, step: int) -> dict | None:
    info = _run_info(run)
    if not info["env_id"] or run.config.eval_episodes == 0:
        return None
    return dict(folder=str(folder), env_id=info["env_id"], episodes=run.config.eval_episodes,
                seed=run.config.seed + step, target_return=info["target_return"],
                ref_min_score=run.dataset.ref_min_score, ref_max_score=run.dataset.ref_max_score)


def evaluate_job(job: dict) -> dict:
    """One run's evaluation from its checkpoint (what ``train()``'s evaluation computes); the
    job's ``mode`` (``StreamingPolicy``'s, default: the model's own) lets a sweep also evaluate a
    window-trained Aaren run by window recompute."""
    torch.set_num_threads(1)
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate_policy
    from .policy import StreamingPolicy

    model, _ = load_checkpoint(job["folder"])
    t0 = time.perf_counter()
    policy = StreamingPolicy(model, job["target_return"], mode=job.get("mode"))
    res = evaluate_policy(policy, job["env_id"], job["episodes"],
                          seed=job["seed"], ref_min_score=job["ref_min_score"], ref_max_score=job["ref_max_score"])
    res["eval_seconds"] = time.perf_counter() - t0
    res["mode"] = policy.mode
    return res


def evaluate_many(jobs: list[dict], workers: int | None = None, progress: bool = False) -> list[dict]:
    """Evaluate many checkpoints, spread over ``workers`` processes (default: one per CPU core)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="evaluate", unit="run", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        if workers == 1:
            out = []
            for job in jobs:
                out.append(evaluate_job(job))
                bar.update(1)
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child of a process that ran torch's thread pool can hang
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(evaluate_job, job) for job in jobs]
            out = []
            for job, f in zip(jobs, futures):
                out.append(evaluation_result(f, job["folder"], "`aaren-rl evaluate RUN_FOLDER` evaluates each run"))
                bar.update(1)
            return out
    finally:
        bar.close()


def evaluation_result(future, folder, again: str = "run the same command again to evaluate them") -> dict:
    """A finished evaluation's result; a worker process that died (killed, out of memory, or unable
    to import the package) is a clear error that says how to go on: the trained runs are saved, and
    ``again`` says what evaluates them."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as e:
        raise SystemExit(f"error: an evaluation worker process died while evaluating {folder} ({e}); the trained "
                         f"checkpoints are saved: {again}") from None


def record_evaluation(run: Run, result: dict, step: int, writer=None, key: str = "eval") -> dict:
    """What ``train()`` keeps of an evaluation: TensorBoard scalars ``KEY/...`` in the run folder,
    and ``last_KEY`` in the config.json of the checkpoint it evaluated (rewritten atomically).
    ``key="eval_window"``: a sweep's second evaluation of the same checkpoint by window recompute."""
    own = writer is None
    if own:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.logdir))
    writer.add_scalar(f"{key}/return_mean", result["return_mean"], step)
    writer.add_scalar(f"{key}/return_std", result["return_std"], step)
    writer.add_scalar(f"{key}/episode_length", result["length_mean"], step)
    writer.add_scalar(f"{key}/policy_ms_per_step", result["policy_ms_per_step"], step)
    if "normalized_score_mean" in result:
        writer.add_scalar(f"{key}/normalized_score", result["normalized_score_mean"], step)
    if own:
        writer.close()
    last = {"step": step, **{k: v for k, v in result.items() if k not in ("returns", "lengths", "folder")}}
    folder = Path(result["folder"]) if "folder" in result else resolve_checkpoint(run.logdir / "checkpoints")
    update_checkpoint_info(folder, {f"last_{key}": last})
    return last


def evaluation_jobs(runs: list[Run], step: int) -> list[tuple[int, dict]]:
    """(run index, job) for every run that has an environment to evaluate in, at its latest checkpoint."""
    jobs = [(r, _eval_job(run, resolve_checkpoint(run.logdir / "checkpoints"), step)) for r, run in enumerate(runs)]
    return [(r, j) for r, j in jobs if j is not None]


def train_group(runs: list[Run], resume: bool = False, progress: bool = True, eval_workers: int | None = None,
                device: str | None = None, final_eval: bool = True) -> list[DecisionModel]:
    """Train the runs as one group; each run's folder ends as ``train()`` would leave it.

    ``resume``: runs with a checkpoint continue from it (all of the group's checkpoints must be at
    the same step; ``aaren-rl sweep`` groups runs by their step). Evaluations (every
    ``eval_every`` updates and at the end) run from the checkpoints, spread over ``eval_workers``
    processes; ``final_eval=False`` leaves the last one to the caller (a sweep overlaps it with
    the next group's training). Returns the R trained models.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    for run in runs:
        run.config.validate()
    check_group(runs)
    for run in runs:  # as train(): what a killed save left, and an environment that does not fit
        remove_stale_temporaries(run.logdir / "checkpoints")
        env_id = run.config.env_id or run.dataset.env_id
        if env_id and run.config.eval_episodes > 0:
            from .evaluate import check_env_matches

            check_env_matches(env_id, run.dataset.observation_dim, run.dataset.action_dim, run.dataset.discrete,
                              f"the dataset {run.dataset.name!r}")
    tc = runs[0].config
    dev = resolve_device(device or tc.device)
    mode = resolve_compile(tc.compile, dev)
    group = RunGroup(runs, dev, mode=mode, amp=tc.amp and dev.type == "cuda")
    ckpt_dirs = [r.logdir / "checkpoints" for r in runs]
    infos = [_run_info(r) for r in runs]
    for r, info in enumerate(infos):
        info["group"] = {"runs": group.R, "index": r, "members": [x.name for x in runs]}

    starts = [0] * group.R
    if resume:
        for r, d in enumerate(ckpt_dirs):
            if (d / "latest").is_file():
                folder = resolve_checkpoint(d)
                changed = resume_differences(json.loads((folder / "config.json").read_text()), runs[r].model_config,
                                             runs[r].config, runs[r].dataset)
                if changed:
                    raise ValueError(f"cannot resume {runs[r].logdir}: settings differ from the saved run's "
                                     f"(saved -> given): {'; '.join(changed)}")
                starts[r] = group.load_run(r, folder)
        if len(set(starts)) > 1:
            raise ValueError("runs of one group must resume from the same step, got "
                             f"{dict(zip([r.name for r in runs], starts))}")
    start = starts[0]
    group.step.fill_(float(start))

    writers = [SummaryWriter(str(r.logdir), purge_step=start + 1 if start else None) for r in runs]
    if start == 0:
        for w, run, info in zip(writers, runs, infos):
            w.add_text("config", "```\n" + json.dumps({"model": run.model_config.to_dict(), **info}, indent=2) + "\n```")

    def save(step):
        models = group.sync_models()
        for r in range(group.R):
            save_checkpoint(ckpt_dirs[r], step, models[r], infos[r], group.trainer_state(r))

    def evaluate(step):
        jobs = evaluation_jobs(runs, step)
        results = evaluate_many([j for _, j in jobs], eval_workers, progress=progress)
        for (r, job), res in zip(jobs, results):
            infos[r]["last_eval"] = record_evaluation(runs[r], {**res, "folder": job["folder"]}, step, writers[r])

    bar = tqdm(total=tc.updates, initial=start, desc=f"train x{group.R}", unit="upd", disable=not progress,
               dynamic_ncols=True)
    t_log, n_log = time.perf_counter(), 0
    try:
        for step in range(start + 1, tc.updates + 1):
            group()
            n_log += 1
            last = step == tc.updates
            if step % tc.log_every == 0 or last:
                losses = group.pop_mean_loss()
                now = time.perf_counter()
                bad = [runs[r].name for r, x in enumerate(losses) if not math.isfinite(x)]
                if bad:
                    raise FloatingPointError(f"training loss became non-finite at update {step} in run(s) {bad}")
                lrs, norms = group.learning_rates(), group.grad_norm.tolist()
                for w, loss, lr, gn in zip(writers, losses, lrs, norms):
                    w.add_scalar("train/loss", loss, step)
                    w.add_scalar("train/learning_rate", lr, step)
                    w.add_scalar("train/grad_norm", gn, step)
                    w.add_scalar("train/updates_per_s", n_log / (now - t_log), step)
                bar.set_postfix(loss=f"{min(losses):.4f}..{max(losses):.4f}")
                t_log, n_log = now, 0
            checkpoint = step % tc.checkpoint_every == 0 or last
            do_eval = bool(tc.eval_every and step % tc.eval_every == 0) or (last and final_eval)
            if checkpoint or do_eval:
                save(step)  # an evaluation reads the checkpoint it evaluates
            if do_eval:
                evaluate(step)
            bar.update(1)
    finally:
        bar.close()
    for w, run, info in zip(writers, runs, infos):
        if "last_eval" in info:
            w.add_hparams({k: v for k, v in {**run.model_config.to_dict(), **asdict(run.config)}.items()
                           if isinstance(v, (int, float, str, bool))},
                          {"hparam/return_mean": info["last_eval"]["return_mean"]}, run_name=".")
        w.close()
    return [m.eval() for m in group.sync_models()]


__all__ = ["Run", "RunGroup", "check_group", "evaluate_many", "evaluation_jobs", "group_key", "record_evaluation",
           "train_group"]
