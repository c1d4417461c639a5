"""How a streaming policy's step is computed: one small interface, the backends behind it.

A backend computes the model's part of one environment step; the policy (``policy.py``) does
the episode bookkeeping around it. The interface, for n environments:

    init_memory(n) -> memory                      the recurrent state before any token
    step(obs, prev_action, returns_to_go, timestep, start, memory) -> (out, memory)
    memory_nbytes(memory) -> int

``step`` takes one environment step's token values as NumPy arrays: obs (n, obs_dim) in env
units (the backend applies the model's normalization), prev_action (n, act) in model units
(discrete: (n,) indices; padding where ``start``), returns_to_go (n,), timestep (n,) of this
observation, start (n,) bool (rows that begin an episode: their memory is emptied first). It
returns the action head's output (n, act): tanh'd actions in [-1, 1], or logits, and the new
memory (which may be the given one, updated in place). An exported step (a graph with the token
values and the state as inputs, the output and the new state as outputs) fits the same shape.

Backends:
- ``TorchStep``: the model itself (``DecisionModel.act``, or ``act_window``: the window
  recompute), any backbone, any device. An Aaren backbone's memory is an ``AarenMemory`` of
  NumPy arrays, the same as the compiled step's; a Transformer's is its list of key/value caches
  (growing, or sliding windows of constant size); window mode's is the last K timesteps.
- ``CompiledStep``: the compiled C step (``kernels/cpu_step``) for an Aaren model, float32 on the
  CPU: the model exports its weights once (``export_step_weights``) and they are packed again
  whenever a parameter or buffer changed in place since (an optimizer step, ``load_state_dict``).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from .model import DecisionModel, sliding_window
from .policy import AarenMemory

BACKENDS = ("auto", "compiled", "torch")


def compiled_unsupported_reason(model: DecisionModel, mode: str = "recurrent") -> str | None:
    """Why the compiled step cannot run ``model`` (None: it can)."""
    from .kernels import cpu_step

    c = model.config
    if mode != "recurrent":
        return f"mode is {mode!r}"
    if c.backbone != "aaren":
        return f"backbone is {c.backbone!r}, not 'aaren'"
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"parameters are {p.dtype} on {p.device}, not float32 on the CPU"
    if c.embed_dim % 16:
        return f"embed_dim {c.embed_dim} is not a multiple of 16"
    if not cpu_step.available():
        return "no C compiler (or the build failed)"
    return None


def make_backend(model: DecisionModel, mode: str, backend="auto"):
    """The backend a policy uses: a name from ``BACKENDS``, or a backend object as it is."""
    if not isinstance(backend, str):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a backend object, got {backend!r}")
    if backend in ("auto", "compiled"):
        reason = compiled_unsupported_reason(model, mode)
        if reason is None:
            return CompiledStep(model)
        if backend == "compiled":
            raise ValueError(f"the compiled CPU step does not apply: {reason}")
    return TorchStep(model, mode)


# ----------------------------------------------------------------------------------------------
# PyTorch


class TorchStep:
    """The model's own step in PyTorch (any backbone and device)."""

    name = "torch"

    def __init__(self, model: DecisionModel, mode: str = "recurrent"):
        self.model, self.mode = model, mode
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.aaren = c.backbone == "aaren" and mode == "recurrent"
        self.window = sliding_window(c, mode)

    def _tensor(self, x, dtype=None):
        return torch.as_tensor(x, device=self.device, dtype=dtype or self.dtype)

    def init_memory(self, n: int):
        m = self.model
        if self.mode == "window":
            return m.init_window(n)
        if self.aaren:  # the blocks' own empty states, stacked (L, n, H[, Dh]) into NumPy
            states = m.init_state(n)
            return AarenMemory(*(np.ascontiguousarray(torch.stack([getattr(s, k) for s in states]).cpu().numpy())
                                 for k in ("m", "u", "w")))
        return m.init_state(n, window=self.window)

    def memory_nbytes(self, memory) -> int:
        if isinstance(memory, AarenMemory):
            return memory.nbytes
        if isinstance(memory, dict):
            return sum(t.numel() * t.element_size() for t in memory.values())
        return sum(s.nbytes() for s in memory)

    @torch.no_grad()
    def step(self, obs, prev_action, returns_to_go, timestep, start, memory):
        m = self.model
        args = (self._tensor(obs), self._tensor(prev_action, torch.long if m.config.discrete else None),
                self._tensor(returns_to_go), self._tensor(timestep, torch.long), self._tensor(start, torch.bool))
        if self.mode == "window":
            out, memory = m.act_window(*args, memory)
        elif self.aaren:
            from .layer import AarenState

            states = [AarenState(*(self._tensor(getattr(memory, k)[i]) for k in ("m", "u", "w")))
                      for i in range(memory.m.shape[0])]
            out, states = m.act(*args, states)
            for k in ("m", "u", "w"):
                getattr(memory, k)[...] = torch.stack([getattr(s, k) for s in states]).cpu().numpy()
        else:
            out, memory = m.act(*args, memory)
        return out.to("cpu", torch.float32).numpy(), memory


# ----------------------------------------------------------------------------------------------
# The compiled C step

_VERSION = operator.attrgetter("_version")


class CompiledStep:
    """The compiled CPU step for an Aaren model (float32, or ``precision="bfloat16"``)."""

    name = "compiled"

    def __init__(self, model: DecisionModel, precision: str = "float32"):
        reason = compiled_unsupported_reason(model)
        if reason:
            raise ValueError(f"the compiled CPU step does not apply: {reason}")
        self.model, self.precision = model, precision
        self._tensors = list(model.state_dict(keep_vars=True).values())
        self.repack()

    def repack(self) -> None:
        """Export and pack the model's current weights (in-place changes bump a tensor's version)."""
        from .kernels.cpu_step import CpuStep

        self._versions = sum(map(_VERSION, self._tensors))
        self.kernel = CpuStep(*self.model.export_step_weights(), precision=self.precision)

    def init_memory(self, n: int) -> AarenMemory:
        return AarenMemory(*self.kernel.empty_state(n))

    def memory_nbytes(self, memory: AarenMemory) -> int:
        return memory.nbytes

    def step(self, obs, prev_action, returns_to_go, timestep, start, memory):
        if sum(map(_VERSION, self._tensors)) != self._versions:  # versions only grow: a changed sum is a change
            self.repack()
        return self.kernel.step(obs, prev_action, returns_to_go, timestep, start, memory.m, memory.u, memory.w), memory
