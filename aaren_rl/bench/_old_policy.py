"""Acting: a streaming policy that drives (vector) gymnasium environments one step at a time.

Stable-Baselines3's convention: ``action, state = policy.predict(obs, state, episode_start, ...)``,
where ``state`` is carried by the caller and ``episode_start`` (the previous step's
``terminated | truncated``) marks rows that begin a new episode. A return-conditioned agent also
needs the reward just received (to lower the return still to go), hence ``reward``.

Two modes:
- ``"recurrent"`` (the default for Aaren): every environment step feeds (a_{t-1}, R_t, s_t) as one
  3-token chunk into the backbone's recurrent state. For Aaren the state has a constant size,
  whatever t is; for the Transformer it is a key/value cache that grows (kept to the last K
  timesteps for a model trained on K-step windows). The actions equal the parallel forward pass
  over the whole trajectory so far. An Aaren model trained on K-step windows thus conditions on
  the whole episode when it acts (measured: it scores as well or better than recomputing windows).
- ``"window"``: Decision Transformer's evaluation: keep the last K timesteps and recompute them all
  at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..model import A, R, S, DecisionModel

MODES = ("recurrent", "window")


@dataclass
class PolicyState:
    """What the policy carries between steps, for n environments (one row each)."""

    returns_to_go: Tensor  # (n,) R_t for the next observation
    timestep: Tensor  # (n,) long, t of the next observation in its episode
    prev_action: Tensor  # (n, act) in model units (discrete: (n,) long): a_{t-1}
    backbone: list | None = None  # recurrent mode: per-layer states
    window: dict | None = None  # window mode: the last K timesteps, left-padded

    @property
    def n_envs(self) -> int:
        return self.timestep.shape[0]


class StreamingPolicy:
    """Acts with a trained ``DecisionModel``, conditioned on ``target_return``."""

    def __init__(self, model: DecisionModel, target_return: float, mode: str | None = None,
                 fast: bool | None = None):
        """``fast``: the compiled CPU step for an Aaren backbone in recurrent mode
        (``aaren_rl.kernels.cpu_step``, same actions): None uses it where it applies, True requires
        it, False never uses it. With it, ``reset``/``predict`` return its preallocated buffers as
        the state, updated in place by each call."""
        if mode is None:  # Aaren always streams; a Transformer trained on windows recomputes them
            c = model.config
            mode = "recurrent" if (c.backbone == "aaren" or c.context == "episode") else "window"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        self.target_return = float(target_return)
        self.mode = mode
        c = model.config
        self.device = next(model.parameters()).device
        self.K = c.context_len
        # a Transformer trained on K-step windows keeps only that much cache when streaming
        self.max_cache_tokens = 3 * c.context_len if (c.backbone == "transformer" and c.context == "window") else None
        self.fast_step = None
        if fast or (fast is None and mode == "recurrent"):
            from . import _old_cpu_step as cpu_step

            reason = "mode is 'window'" if mode != "recurrent" else cpu_step.unsupported_reason(model)
            if reason and fast:
                raise ValueError(f"fast=True, but the compiled CPU step does not apply: {reason}")
            self.fast_step = None if reason else cpu_step.FastAarenStep(model)

    # -- state ------------------------------------------------------------------------------
    def reset(self, n_envs: int = 1) -> PolicyState:
        """The state before the first step of ``n_envs`` environments."""
        if n_envs <= 0:
            raise ValueError(f"n_envs must be positive, got {n_envs}")
        if self.fast_step is not None:  # the compiled step's preallocated buffers
            from ._old_cpu_step import FastAarenPolicy

            return FastAarenPolicy(self.model, self.target_return, n_envs, step=self.fast_step)
        c, dev = self.model.config, self.device
        prev = torch.zeros(n_envs, dtype=torch.long, device=dev) if c.discrete else torch.zeros(n_envs, c.action_dim, device=dev)
        state = PolicyState(
            returns_to_go=torch.full((n_envs,), self.target_return, device=dev),
            timestep=torch.zeros(n_envs, dtype=torch.long, device=dev),
            prev_action=prev,
        )
        if self.mode == "recurrent":
            state.backbone = self.model.init_state(n_envs)
        else:
            K = self.K
            state.window = {
                "returns_to_go": torch.zeros(n_envs, K, device=dev),
                "observations": torch.zeros(n_envs, K, c.observation_dim, device=dev),
                "actions": torch.zeros(n_envs, K, dtype=torch.long, device=dev) if c.discrete else torch.zeros(n_envs, K, c.action_dim, device=dev),
                "timesteps": torch.zeros(n_envs, K, dtype=torch.long, device=dev),
                "padding_mask": torch.ones(n_envs, K, dtype=torch.bool, device=dev),
            }
        return state

    def _start_rows(self, state: PolicyState, rows: Tensor) -> PolicyState:
        state = replace(
            state,
            returns_to_go=torch.where(rows, self.target_return, state.returns_to_go),
            timestep=state.timestep.masked_fill(rows, 0),
        )
        if state.backbone is not None:
            state.backbone = self.model.backbone.reset_state(state.backbone, rows)
        if state.window is not None:
            state.window = {**state.window, "padding_mask": state.window["padding_mask"] | rows.unsqueeze(-1)}
        return state

    # -- acting -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, observation, state: PolicyState | None = None, episode_start=None,
                deterministic: bool = True, reward=None) -> tuple[np.ndarray, PolicyState]:
        """Actions for a batch of observations (n_envs, obs_dim) (or one, (obs_dim,)).

        ``episode_start`` (n_envs,) bool: rows that begin an episode (all rows when ``state`` is
        None). ``reward`` (n_envs,): the reward each environment just returned for the previous
        action; needed for every row that goes on with its episode.

        With the compiled CPU step the state is a set of preallocated buffers that each call
        updates in place (and returns): the whole step is one C call.
        """
        if self.fast_step is not None:
            return self._predict_compiled(observation, state, episode_start, reward, deterministic)
        obs = self._as_tensor("observation", observation, torch.float32)
        single = obs.dim() == 1
        obs = obs.unsqueeze(0) if single else obs
        c = self.model.config
        if obs.dim() != 2 or obs.shape[1] != c.observation_dim:
            raise ValueError(f"observation must have shape (n_envs, {c.observation_dim}) or "
                             f"({c.observation_dim},), got {tuple(np.shape(observation))}")
        n = obs.shape[0]
        if state is None:
            state = self.reset(n)
            starts = torch.ones(n, dtype=torch.bool, device=self.device)
        else:
            if not isinstance(state, PolicyState) or state.n_envs != n:
                raise ValueError(f"state must be a PolicyState for {n} environments (from reset), got "
                                 f"{type(state).__name__}" + (f" for {state.n_envs}" if isinstance(state, PolicyState) else ""))
            starts = (torch.zeros(n, dtype=torch.bool, device=self.device) if episode_start is None
                      else self._as_tensor("episode_start", episode_start, torch.bool).reshape(-1))
            if starts.shape != (n,):
                raise ValueError(f"episode_start must have shape ({n},), got {tuple(np.shape(episode_start))}")
            starts = starts | (state.timestep == 0)  # rows fresh from reset() begin here too
        if not bool(starts.all()):
            if reward is None:
                raise ValueError("reward is required for environments that go on with their episode")
            rew = self._as_tensor("reward", reward, torch.float32).reshape(-1)
            if rew.shape != (n,):
                raise ValueError(f"reward must have shape ({n},), got {tuple(np.shape(reward))}")
            state = replace(state, returns_to_go=state.returns_to_go - torch.where(starts, 0.0, rew))
        state = self._start_rows(state, starts)

        obs = self.model.normalize_obs(obs)
        if self.mode == "recurrent":
            out, state = self._step_recurrent(obs, state, starts)
        else:
            out, state = self._step_window(obs, state)
        if c.discrete:  # out: logits
            chosen = out.argmax(-1) if deterministic else torch.distributions.Categorical(logits=out).sample()
            action = chosen.cpu().numpy()
        else:  # out: action in [-1, 1]
            chosen = out
            action = self.model.unnormalize_action(out).cpu().numpy()
        state = self.record_action(replace(state, timestep=state.timestep + 1), chosen, model_units=True)
        return (action[0] if single else action), state

    def _predict_compiled(self, observation, state, episode_start, reward, deterministic):
        from ._old_cpu_step import FastAarenPolicy

        D = self.model.config.observation_dim
        obs = np.asarray(observation, dtype=np.float32)
        if obs.ndim not in (1, 2) or obs.shape[-1] != D:
            raise ValueError(f"observation must have shape (n_envs, {D}) or ({D},), got {obs.shape}")
        single = obs.ndim == 1
        obs = obs.reshape(-1, D)
        if not np.isfinite(obs).all():
            raise ValueError("observation contains NaN or inf")
        n = obs.shape[0]
        if state is None:
            state = self.reset(n)
        elif not isinstance(state, FastAarenPolicy) or state.n_envs != n:
            raise ValueError(f"state must be the state this policy returned for {n} environments (from reset or "
                             f"predict), got {type(state).__name__}")
        if episode_start is not None:
            episode_start = np.asarray(episode_start, dtype=bool).reshape(-1)
            if episode_start.shape != (n,):
                raise ValueError(f"episode_start must have shape ({n},), got {episode_start.shape}")
        if reward is None:
            if not (state.start.all() or (episode_start is not None and episode_start.all())):
                raise ValueError("reward is required for environments that go on with their episode")
        else:
            reward = np.asarray(reward, dtype=np.float32).reshape(-1)
            if reward.shape != (n,):
                raise ValueError(f"reward must have shape ({n},), got {reward.shape}")
            if not np.isfinite(reward).all():
                raise ValueError("reward contains NaN or inf")
        self.fast_step.ensure_packed()
        action = state.predict(obs, episode_start, reward).copy()
        if self.model.config.discrete and not deterministic:  # sample from the logits the step left in .out
            action = torch.distributions.Categorical(logits=torch.from_numpy(state.out)).sample().numpy()
            state.record_action(action)
        return (action[0] if single else action), state

    def state_nbytes(self, state) -> int:
        """Bytes of the recurrent state that grows (Transformer) or does not (Aaren)."""
        if hasattr(state, "state_nbytes"):
            return state.state_nbytes()
        return sum(s.nbytes() for s in state.backbone) if state.backbone is not None else 0

    def record_action(self, state: PolicyState, action, model_units: bool = False) -> PolicyState:
        """Set the remembered a_t to the action actually executed (exploration noise, clipping, a
        logged trajectory). ``predict`` records its own action; call this after it to override."""
        if hasattr(state, "record_action"):  # the compiled step's buffers
            state.record_action(action)
            return state
        if not model_units:
            a = self._as_tensor("action", action, torch.long if self.model.config.discrete else torch.float32)
            if a.numel() != state.prev_action.numel():
                raise ValueError(f"action must have {tuple(state.prev_action.shape)} entries in all, got {tuple(a.shape)}")
            action = self.model.normalize_action(a.reshape(state.prev_action.shape))
        a = action
        if state.window is not None:
            state.window = {**state.window, "actions": torch.cat([state.window["actions"][:, :-1], a.unsqueeze(1)], 1)}
        return replace(state, prev_action=a)

    def _step_recurrent(self, obs: Tensor, state: PolicyState, starts: Tensor):
        m, t = self.model, state.timestep
        tokens = torch.stack([
            m.embed(A, state.prev_action, (t - 1).clamp(min=0)),
            m.embed(R, state.returns_to_go, t),
            m.embed(S, obs, t),
        ], dim=1)  # (n, 3, E): a_{t-1}, R_t, s_t
        pad = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=self.device)
        pad[:, 0] = starts  # at t = 0 there is no previous action
        h, backbone = m.step(tokens, state.backbone, padding_mask=pad)
        if self.max_cache_tokens is not None:
            backbone = [s.trim(self.max_cache_tokens) for s in backbone]
        return m.action_output(h[:, 2]), replace(state, backbone=backbone)

    def _step_window(self, obs: Tensor, state: PolicyState):
        w = state.window
        placeholder = torch.zeros_like(w["actions"][:, :1])
        w = {  # drop the oldest timestep, append R_t, s_t (a_t is unknown yet; causality hides it)
            "returns_to_go": torch.cat([w["returns_to_go"][:, 1:], state.returns_to_go[:, None]], 1),
            "observations": torch.cat([w["observations"][:, 1:], obs[:, None]], 1),
            "actions": torch.cat([w["actions"][:, 1:], placeholder], 1),
            "timesteps": torch.cat([w["timesteps"][:, 1:], state.timestep[:, None]], 1),
            "padding_mask": torch.cat([w["padding_mask"][:, 1:], torch.zeros_like(w["padding_mask"][:, :1])], 1),
        }
        pred = self.model(w["returns_to_go"], w["observations"], w["actions"], w["timesteps"], w["padding_mask"])
        return pred[:, -1], replace(state, window=w)  # the chosen a_t is written in by record_action

    # -- input checks ------------------------------------------------------------------------
    def _as_tensor(self, name: str, value, dtype) -> Tensor:
        try:
            t = torch.as_tensor(np.asarray(value), device=self.device).to(dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be array-like, got {type(value).__name__}: {e}") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        return t
