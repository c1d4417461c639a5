"""Acting: a streaming policy that drives (vector) gymnasium environments one step at a time.

Stable-Baselines3's convention: ``action, state = policy.predict(obs, state, episode_start, ...)``,
where ``state`` is carried by the caller and ``episode_start`` (the previous step's
``terminated | truncated``) marks rows that begin a new episode. A return-conditioned agent also
needs the reward just received (to lower the return still to go), hence ``reward``.

The policy keeps the episode bookkeeping (returns to go, timesteps, the previous action, episode
starts) here and nowhere else; the model's computation of one step is a *backend*
(``aaren_rl.backends``): PyTorch, or the compiled C step for an Aaren model on the CPU. A
backend takes one step's token values and the recurrent memory and returns the action head's
output; which one runs is chosen when the policy is made, and the state is the same
``PolicyState`` on every machine. This module itself needs NumPy only.

Three modes:
- ``"recurrent"`` (the default for Aaren): every environment step feeds (a_{t-1}, R_t, s_t) as one
  3-token chunk into the backbone's recurrent state. For Aaren the state has a constant size,
  whatever t is; for the Transformer it is a key/value cache that grows (for a model trained on
  K-step windows: the sliding cache of ``"sliding"``). The actions equal the parallel forward pass
  over the whole trajectory so far. An Aaren model trained on K-step windows thus conditions on
  the whole episode when it acts.
- ``"window"``: Decision Transformer's evaluation: keep the last K timesteps and recompute them all
  at every step.
- ``"sliding"`` (Transformer only): a key/value cache of the last K timesteps in every layer, of
  constant size: each token attends to itself and the 3K - 2 tokens before it. Its actions equal
  ``"window"``'s for the first K steps of an episode, and always for a one-layer model; later, in
  a deeper model they differ by construction: a cached key of layer 2 or above was computed when
  its token was new, from the window of *that* step, so the s_t token's output still depends on
  timesteps before t - K + 1 (up to about n_layer * K back), where the window recompute sees the
  last K timesteps alone. It is exactly banded attention over the whole episode, the parallel form
  of a sliding window (``tests/test_blocks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("recurrent", "window", "sliding")
# float32 arithmetic squares its inputs in the LayerNorms: values beyond this (about the square
# root of float32's largest number, 3.4e38) overflow there, and a step would return garbage
MAX_INPUT = 1e15


def default_mode(config) -> str:
    """The mode a policy acts in unless told: Aaren always streams; a Transformer trained on
    windows recomputes them, one trained on whole episodes keeps a growing cache."""
    return "recurrent" if (config.backbone == "aaren" or config.context != "window") else "window"


@dataclass
class AarenMemory:
    """An Aaren backbone's recurrent state for n environments, every layer stacked:
    m, u (layers, n, heads) and w (layers, n, heads, head_dim). Its size never depends on t."""

    m: np.ndarray
    u: np.ndarray
    w: np.ndarray

    def copy(self) -> "AarenMemory":
        return AarenMemory(self.m.copy(), self.u.copy(), self.w.copy())

    @property
    def nbytes(self) -> int:
        return self.m.nbytes + self.u.nbytes + self.w.nbytes


@dataclass
class PolicyState:
    """What the policy carries between steps, for n environments (one row each). ``predict``
    updates it in place and returns it; ``copy()`` keeps a branch."""

    returns_to_go: np.ndarray  # (n,) float32: R_t of the next observation
    timestep: np.ndarray  # (n,) int64: t of the next observation in its episode (0: it begins one)
    prev_action: np.ndarray  # (n, act) float32 in model units (discrete: (n,) int64): a_{t-1}
    memory: object = field(repr=False)  # the backbone's recurrent state, as the backend keeps it

    @property
    def n_envs(self) -> int:
        return self.timestep.shape[0]

    def copy(self) -> "PolicyState":
        return PolicyState(self.returns_to_go.copy(), self.timestep.copy(), self.prev_action.copy(),
                           self.memory.copy())


class StreamingPolicy:
    """Acts with a trained ``DecisionModel``, conditioned on ``target_return``."""

    def __init__(self, model, target_return: float, mode: str | None = None, backend="auto"):
        """``backend``: ``"auto"`` (the compiled C step where it applies: an Aaren model in
        recurrent mode, float32 on the CPU, a C compiler; else PyTorch), ``"compiled"`` (required:
        an error says why it does not apply), ``"torch"``, or a backend object
        (``aaren_rl.backends``)."""
        from .backends import make_backend

        if mode is None:
            mode = default_mode(model.config)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sliding" and model.config.backbone != "transformer":
            raise ValueError(f"mode 'sliding' is a Transformer's key/value cache; a {model.config.backbone!r} "
                             f"model's state has a constant size already (mode 'recurrent')")
        self.model = model.eval()
        self._bind(model.config, target_return, mode, make_backend(model, mode, backend))

    def _bind(self, config, target_return: float, mode: str, backend) -> None:
        """What acting needs besides the backend: the config's dims and action range (a
        ``ModelConfig``, or anything with its fields: an exported policy's spec)."""
        self.target_return = float(target_return)
        self.mode = mode
        self.backend = backend
        c = config
        self.observation_dim, self.action_dim, self.discrete = c.observation_dim, c.action_dim, c.discrete
        if not c.discrete:  # env units <-> the model's [-1, 1]
            low, high = np.asarray(c.action_low, np.float32), np.asarray(c.action_high, np.float32)
            self._action_low, self._action_span = low, high - low
            self._action_half, self._action_mid = (high - low) / 2, (high + low) / 2

    # -- state ------------------------------------------------------------------------------
    def reset(self, n_envs: int = 1) -> PolicyState:
        """The state before the first step of ``n_envs`` environments."""
        if n_envs <= 0:
            raise ValueError(f"n_envs must be positive, got {n_envs}")
        prev = np.zeros(n_envs, np.int64) if self.discrete else np.zeros((n_envs, self.action_dim), np.float32)
        return PolicyState(returns_to_go=np.full(n_envs, self.target_return, np.float32),
                           timestep=np.zeros(n_envs, np.int64), prev_action=prev,
                           memory=self.backend.init_memory(n_envs))

    def state_nbytes(self, state: PolicyState) -> int:
        """Bytes of the recurrent state that grows (Transformer) or does not (Aaren)."""
        return self.backend.memory_nbytes(state.memory)

    # -- acting -----------------------------------------------------------------------------
    def predict(self, observation, state: PolicyState | None = None, episode_start=None,
                deterministic: bool = True, reward=None) -> tuple[np.ndarray, PolicyState]:
        """Actions for a batch of observations (n_envs, obs_dim) (or one, (obs_dim,)).

        ``episode_start`` (n_envs,) bool: rows that begin an episode (all rows when ``state`` is
        None, and rows fresh from ``reset``). ``reward`` (n_envs,): the reward each environment
        just returned for the previous action; needed for every row that goes on with its
        episode. Returns the actions in env units and ``state``, updated in place.
        """
        D = self.observation_dim
        obs = _array("observation", observation, np.float32)
        single = obs.ndim == 1
        if single:
            obs = obs.reshape(1, -1)
        if obs.ndim != 2 or obs.shape[1] != D:
            raise ValueError(f"observation must have shape (n_envs, {D}) or ({D},), got {np.shape(observation)}")
        _check_finite("observation", obs)
        n = obs.shape[0]
        if state is None:
            state = self.reset(n)
        elif not isinstance(state, PolicyState) or state.n_envs != n:
            got = type(state).__name__ + (f" for {state.n_envs}" if isinstance(state, PolicyState) else "")
            raise ValueError(f"state must be a PolicyState for {n} environments (from reset or predict), got {got}")
        starts = state.timestep == 0  # rows fresh from reset() begin here too
        if episode_start is not None:
            given = _array("episode_start", episode_start, bool).reshape(-1)
            if given.shape != (n,):
                raise ValueError(f"episode_start must have shape ({n},), got {np.shape(episode_start)}")
            starts |= given
        if reward is not None:
            rew = _array("reward", reward, np.float32).reshape(-1)
            if rew.shape != (n,):
                raise ValueError(f"reward must have shape ({n},), got {np.shape(reward)}")
            _check_finite("reward", rew)
            state.returns_to_go -= rew  # rows that begin an episode are set to the target below
        elif not starts.all():
            raise ValueError("reward is required for environments that go on with their episode")
        state.returns_to_go[starts] = self.target_return
        state.timestep[starts] = 0

        out, state.memory = self.backend.step(obs, state.prev_action, state.returns_to_go, state.timestep,
                                              starts, state.memory)
        if self.discrete:  # out: logits
            action = out.argmax(-1) if deterministic else _sample(out)
            state.prev_action[...] = action
        else:  # out: action in [-1, 1]
            state.prev_action[...] = out
            action = out * self._action_half + self._action_mid
        state.timestep += 1
        return (action[0] if single else action), state

    def record_action(self, state: PolicyState, action) -> PolicyState:
        """Set the remembered a_t to the action actually executed (env units: exploration noise,
        clipping, a logged trajectory). ``predict`` records its own action; call this after it
        to override."""
        a = _array("action", action, np.int64 if self.discrete else np.float32)
        if a.size != state.prev_action.size:
            raise ValueError(f"action must have {state.prev_action.shape} entries in all, got {a.shape}")
        a = a.reshape(state.prev_action.shape)
        if not self.discrete:
            a = np.clip(2 * (a - self._action_low) / self._action_span - 1, -1, 1)
        state.prev_action[...] = a
        return state


# -- input checks ----------------------------------------------------------------------------


def _array(name: str, value, dtype) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be array-like, got {type(value).__name__}: {e}") from None


def _check_finite(name: str, x: np.ndarray) -> None:
    """NaN, inf or a value too large for the model's float32 arithmetic: the same error whatever
    backend would compute the step. One sum of squares, in float64 (which cannot overflow here):
    a NaN or inf anywhere makes it NaN or inf."""
    flat = x.reshape(-1)
    if not float(np.dot(flat, flat.astype(np.float64))) <= MAX_INPUT * MAX_INPUT:
        raise ValueError(f"{name} contains NaN or inf, or a value beyond {MAX_INPUT:g} in size (the model "
                         f"computes in float32)")


def _sample(logits: np.ndarray) -> np.ndarray:
    try:
        import torch  # PyTorch's generator, so that torch.manual_seed makes runs repeatable
    except ImportError:  # acting without PyTorch (an exported policy): NumPy's generator, Gumbel-max
        g = -np.log(-np.log(np.random.default_rng().random(np.shape(logits))))
        return (np.asarray(logits) + g).argmax(-1)
    return torch.distributions.Categorical(logits=torch.from_numpy(np.array(logits))).sample().numpy()
