"""Export a policy's step as an ONNX model, to act with no PyTorch (``aaren_rl.runtime``).

One call of the exported graph is one environment step, for any of the policy's modes
(``aaren_rl.policy``):

    inputs   obs (n, obs_dim) float32 in env units, prev_action (n, act) float32 in model units
             (discrete: (n,) int64), returns_to_go (n,) float32, timestep (n,) int64, start (n,)
             bool, then the state tensors
    outputs  out (n, act): tanh'd action in [-1, 1] (discrete: logits), then the new state, each
             tensor named as its input with ``_out``

the same contract as a backend's ``step`` (``aaren_rl.backends``); the graph normalizes the
observation and empties the state of rows that begin an episode. The state, by mode:

- Decision Aaren, ``"recurrent"``: m, u (L, n, H), w (L, n, H, Dh): constant size.
- Decision Transformer, ``"recurrent"`` (a model trained on whole episodes): the key/value cache,
  k_i, v_i (n, H, T, Dh) for every layer i and valid (n, T), T = the tokens so far; the graph
  returns it 3 tokens longer. ``"sliding"``: the same tensors with T = 3K - 2 fixed
  (``KVCache``'s sliding window).
- ``"window"``: the last K timesteps' values (window_returns_to_go, ...); the graph reruns the
  model over them (``DecisionModel.act_window``).

The graphs run the model's own code (``DecisionModel.act`` / ``act_window``) on explicit state
tensors. The folder also holds ``spec.json``: the state's layout, the observation and action
spaces, the normalization constants, the return scale, the default target return, the model
config, and the ``.onnx`` file's SHA-256.

The graph is written with PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): the dynamo exporter needs ``onnxscript``, which the ``onnx`` extra does not pull.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .blocks import KVCache
from .layer import AarenState
from .model import DecisionModel, sliding_window
from .output import write_json
from .policy import MODES, default_mode

from .runtime import FORMAT, SPEC_FILE, TOKEN_INPUTS

OPSET = 17
ONNX_FILE = "step.onnx"
WINDOW_KEYS = ("returns_to_go", "observations", "actions", "timesteps", "padding_mask")  # DecisionModel.init_window


def _isneginf(g, x):  # the scan's combine tests for an empty state with isneginf: ONNX's IsInf
    return g.op("IsInf", x, detect_negative_i=1, detect_positive_i=0)


class StepModule(nn.Module):
    """One environment step of a ``DecisionModel`` in one mode, from explicit state tensors (what is exported)."""

    def __init__(self, model: DecisionModel, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sliding" and model.config.backbone != "transformer":
            raise ValueError(f"mode 'sliding' is a Transformer's; export the {model.config.backbone!r} model in "
                             f"mode 'recurrent'")
        self.model, self.mode = model.eval(), mode
        self.window = sliding_window(model.config, mode)

    def forward(self, obs, prev_action, returns_to_go, timestep, start, *state):
        mdl, tokens = self.model, (obs, prev_action, returns_to_go, timestep, start)
        if self.mode == "window":
            out, w = mdl.act_window(*tokens, dict(zip(WINDOW_KEYS, state)))
            return (out, *(w[k] for k in WINDOW_KEYS))
        if mdl.config.backbone == "aaren":
            m, u, w = state
            out, states = mdl.act(*tokens, [AarenState(m[i], u[i], w[i]) for i in range(m.shape[0])])
            return (out, *(torch.stack([getattr(s, k) for s in states]) for k in ("m", "u", "w")))
        *kv, valid = state  # k_0, v_0, k_1, v_1, ...: one tensor each, so that a long cache is not copied into a stack
        out, states = mdl.act(*tokens, [KVCache(k, v, valid, self.window) for k, v in zip(kv[::2], kv[1::2])])
        return (out, *(t for s in states for t in (s.k, s.v)), states[0].valid)


def state_spec(model: DecisionModel, mode: str) -> dict:
    """The state tensors of ``mode``'s graph, in input order: shape ("n": environments, "T": cache
    tokens so far), dtype, and the value of an empty state."""
    c = model.config
    H, Dh, L, K = c.n_head, c.embed_dim // c.n_head, c.n_layer, c.context_len
    if mode == "window":
        act = {"shape": ["n", K], "dtype": "int64"} if c.discrete else {"shape": ["n", K, c.action_dim], "dtype": "float32"}
        return {"window_returns_to_go": {"shape": ["n", K], "dtype": "float32", "empty": 0.0},
                "window_observations": {"shape": ["n", K, c.observation_dim], "dtype": "float32", "empty": 0.0},
                "window_actions": {**act, "empty": 0},
                "window_timesteps": {"shape": ["n", K], "dtype": "int64", "empty": 0},
                "window_padding_mask": {"shape": ["n", K], "dtype": "bool", "empty": True}}
    if c.backbone == "aaren":
        return {"m": {"shape": [L, "n", H], "dtype": "float32", "empty": "-inf"},
                "u": {"shape": [L, "n", H], "dtype": "float32", "empty": 0.0},
                "w": {"shape": [L, "n", H, Dh], "dtype": "float32", "empty": 0.0}}
    window = sliding_window(c, mode)
    T = "T" if window is None else window - 1
    kv = {f"{name}_{i}": {"shape": ["n", H, T, Dh], "dtype": "float32", "empty": 0.0}
          for i in range(L) for name in ("k", "v")}
    return {**kv, "valid": {"shape": ["n", T], "dtype": "bool", "empty": False}}


_ITEMSIZE = {"float32": 4, "int64": 8, "bool": 1}


def _bytes_per_env(state: dict, tokens: int) -> int:
    total = 0
    for t in state.values():
        size = _ITEMSIZE[t["dtype"]]
        for d in t["shape"]:
            size *= tokens if d == "T" else 1 if d == "n" else d
        total += size
    return total


def example_inputs(model: DecisionModel, mode: str, n: int = 2, tokens: int = 6) -> tuple:
    c = model.config
    prev = torch.zeros(n, dtype=torch.long) if c.discrete else torch.zeros(n, c.action_dim)
    state = []
    for t in state_spec(model, mode).values():
        shape = [n if d == "n" else tokens if d == "T" else d for d in t["shape"]]
        dtype = {"float32": torch.float32, "int64": torch.long, "bool": torch.bool}[t["dtype"]]
        state.append(torch.full(shape, float(t["empty"]), dtype=dtype))
    return (torch.zeros(n, c.observation_dim), prev, torch.zeros(n), torch.zeros(n, dtype=torch.long),
            torch.ones(n, dtype=torch.bool), *state)


def spec_for(model: DecisionModel, mode: str, target_return: float | None, env_id: str | None) -> dict:
    c = model.config
    state = state_spec(model, mode)
    grows = any("T" in t["shape"] for t in state.values())
    if c.discrete:
        action_space = {"type": "Discrete", "n": c.action_dim}
    else:
        action_space = {"type": "Box", "shape": [c.action_dim], "low": list(c.action_low), "high": list(c.action_high)}
    return {
        "format": FORMAT,
        "backbone": c.backbone,
        "mode": mode,
        "onnx": ONNX_FILE,
        "opset": OPSET,
        "inputs": [*TOKEN_INPUTS, *state],
        "outputs": ["out", *(f"{k}_out" for k in state)],
        "state": state,  # "n": the number of environments; "T": key/value cache tokens so far
        "state_bytes_per_env": None if grows else _bytes_per_env(state, 0),
        "state_bytes_per_env_per_step": _bytes_per_env(state, 3) if grows else 0,  # 3 tokens a step
        "observation_space": {"type": "Box", "shape": [c.observation_dim], "dtype": "float32"},
        "action_space": action_space,
        "normalization": {"obs_mean": model.obs_mean.tolist(), "obs_std": model.obs_std.tolist(),
                          "note": "applied inside the graph; actions: [-1, 1] <-> [low, high]"},
        "return_scale": c.return_scale,
        "target_return": target_return,
        "env_id": env_id,
        "model_config": c.to_dict(),
    }


def export_policy(model: DecisionModel, out_dir: str | os.PathLike, target_return: float | None = None,
                  env_id: str | None = None, mode: str | None = None) -> Path:
    """Write ``step.onnx`` and ``spec.json`` into ``out_dir``; the folder appears complete or not at all
    (written next to it, then renamed; an existing folder is replaced only if it holds an export).
    ``mode``: the policy mode whose step is exported (default: ``StreamingPolicy``'s for the model)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / SPEC_FILE).exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ValueError(f"--out {out_dir} exists and is not an exported policy folder; choose another")
    mode = mode or default_mode(model.config)
    step = StepModule(model.to("cpu", torch.float32).eval(), mode)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        spec = spec_for(model, mode, target_return, env_id)
        axes = {name: {0: "n"} for name in TOKEN_INPUTS}
        axes["out"] = {0: "n"}
        for name, t in spec["state"].items():
            dims = {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
            axes[name] = dims
            axes[f"{name}_out"] = {i: ("T_next" if d == "T" else d) for i, d in dims.items()}
        torch.onnx.register_custom_op_symbolic("aten::isneginf", _isneginf, OPSET)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings: shape checks read sizes while tracing
            torch.onnx.export(step, example_inputs(model, mode), str(tmp / ONNX_FILE), input_names=spec["inputs"],
                              output_names=spec["outputs"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        spec["onnx_sha256"] = hashlib.sha256((tmp / ONNX_FILE).read_bytes()).hexdigest()
        write_json(tmp / SPEC_FILE, spec)
        os.chmod(tmp, 0o755 & ~_umask())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
