"""Export a streaming policy's step as an ONNX model, to act with no PyTorch (``aaren_rl.runtime``).

One call of the exported graph is one environment step of a Decision Aaren model:

    inputs   obs (n, obs_dim) float32 in env units, prev_action (n, act) float32 in model units
             (discrete: (n,) int64), returns_to_go (n,) float32, timestep (n,) int64, start (n,)
             bool, m (L, n, H), u (L, n, H), w (L, n, H, Dh) float32: the state
    outputs  out (n, act): tanh'd action in [-1, 1] (discrete: logits), m_out, u_out, w_out

the same contract as a backend's ``step`` (``aaren_rl.backends``); the graph normalizes the
observation and empties the state of rows that begin an episode, and is pure arithmetic (no
loop, no cache that grows). The folder also holds ``spec.json``: the state's layout, the
observation and action spaces, the normalization constants, the return scale, the default target
return, the model config, and the ``.onnx`` file's SHA-256.

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

from .layer import AarenState
from .model import A, R, S, DecisionModel
from .output import write_json

from .runtime import FORMAT, INPUTS, OUTPUTS, SPEC_FILE

OPSET = 17
ONNX_FILE = "step.onnx"


def _isneginf(g, x):  # the scan's combine tests for an empty state with isneginf: ONNX's IsInf
    return g.op("IsInf", x, detect_negative_i=1, detect_positive_i=0)


class AarenStepModule(nn.Module):
    """One environment step of an Aaren ``DecisionModel`` from explicit state tensors (what is exported)."""

    def __init__(self, model: DecisionModel):
        super().__init__()
        if model.config.backbone != "aaren":
            raise ValueError(f"only an Aaren model exports its streaming step, not backbone {model.config.backbone!r}")
        self.model = model.eval()

    def forward(self, obs, prev_action, returns_to_go, timestep, start, m, u, w):
        mdl = self.model
        keep = (~start).to(m.dtype)  # rows that begin an episode: an empty state (-inf, 0, 0)
        states = [AarenState(torch.where(start[:, None], torch.full_like(m[i], float("-inf")), m[i]),
                             u[i] * keep[:, None], w[i] * keep[:, None, None]) for i in range(m.shape[0])]
        obs = mdl.normalize_obs(obs)
        t = timestep
        tokens = torch.stack([
            mdl.embed(A, prev_action, (t - 1).clamp(min=0)),
            mdl.embed(R, returns_to_go, t),
            mdl.embed(S, obs, t),
        ], dim=1)  # (n, 3, E): a_{t-1}, R_t, s_t
        pad = torch.stack([start, torch.zeros_like(start), torch.zeros_like(start)], dim=1)
        for k in range(3):  # one token at a time: a fold per token, no scan (cummax has no ONNX op)
            h, states = mdl.step(tokens[:, k], states, padding_mask=pad[:, k])
        out = mdl.action_output(h)
        return (out, torch.stack([s.m for s in states]), torch.stack([s.u for s in states]),
                torch.stack([s.w for s in states]))


def example_inputs(model: DecisionModel, n: int = 2) -> tuple:
    c = model.config
    H, Dh = c.n_head, c.embed_dim // c.n_head
    prev = torch.zeros(n, dtype=torch.long) if c.discrete else torch.zeros(n, c.action_dim)
    return (torch.zeros(n, c.observation_dim), prev, torch.zeros(n), torch.zeros(n, dtype=torch.long),
            torch.ones(n, dtype=torch.bool), torch.full((c.n_layer, n, H), float("-inf")),
            torch.zeros(c.n_layer, n, H), torch.zeros(c.n_layer, n, H, Dh))


def spec_for(model: DecisionModel, target_return: float | None, env_id: str | None) -> dict:
    c = model.config
    H, Dh, L = c.n_head, c.embed_dim // c.n_head, c.n_layer
    if c.discrete:
        action_space = {"type": "Discrete", "n": c.action_dim}
    else:
        action_space = {"type": "Box", "shape": [c.action_dim], "low": list(c.action_low), "high": list(c.action_high)}
    return {
        "format": FORMAT,
        "backbone": c.backbone,
        "onnx": ONNX_FILE,
        "opset": OPSET,
        "inputs": list(INPUTS),
        "outputs": list(OUTPUTS),
        "state": {  # n: the number of environments
            "m": {"shape": [L, "n", H], "dtype": "float32", "empty": "-inf"},
            "u": {"shape": [L, "n", H], "dtype": "float32", "empty": 0.0},
            "w": {"shape": [L, "n", H, Dh], "dtype": "float32", "empty": 0.0},
            "bytes_per_env": 4 * L * H * (Dh + 2),
        },
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
                  env_id: str | None = None) -> Path:
    """Write ``step.onnx`` and ``spec.json`` into ``out_dir``; the folder appears complete or not at all
    (written next to it, then renamed; an existing folder is replaced only if it holds an export)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / SPEC_FILE).exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ValueError(f"--out {out_dir} exists and is not an exported policy folder; choose another")
    step = AarenStepModule(model.to("cpu", torch.float32).eval())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        axes = {name: {0: "n"} for name in INPUTS[:5]}
        axes.update({name: {1: "n"} for name in ("m", "u", "w", "m_out", "u_out", "w_out")})
        axes["out"] = {0: "n"}
        torch.onnx.register_custom_op_symbolic("aten::isneginf", _isneginf, OPSET)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings: the input checks read values while tracing
            torch.onnx.export(step, example_inputs(model), str(tmp / ONNX_FILE), input_names=list(INPUTS),
                              output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        spec = spec_for(model, target_return, env_id)
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
