"""Acting with an exported policy (``aaren-rl export``) in ONNX Runtime: NumPy in and out, no PyTorch.

    from aaren_rl.runtime import OnnxPolicy
    policy = OnnxPolicy("exported/")               # target_return: the spec's default
    action, state = policy.predict(obs, state, episode_start=starts, reward=reward)

``OnnxPolicy`` is a ``StreamingPolicy`` (the same episode bookkeeping, the same ``PolicyState``)
whose backend is the exported step (``OnnxStep``): one ONNX Runtime call per environment step,
the state an ``AarenMemory`` of constant size. Needs ``aaren-rl[onnx]`` (onnxruntime) and
NumPy; this module imports nothing that imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .policy import AarenMemory, StreamingPolicy

FORMAT = "aaren-rl-step/1"  # as aaren_rl.export writes
SPEC_FILE = "spec.json"
INPUTS = ("obs", "prev_action", "returns_to_go", "timestep", "start", "m", "u", "w")
OUTPUTS = ("out", "m_out", "u_out", "w_out")


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``aaren-rl export``."""
    return (Path(path) / SPEC_FILE).is_file()


def read_spec(folder: str | os.PathLike) -> dict:
    """The spec of an exported folder, checked for the fields acting reads (ValueError if not)."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SPEC_FILE} (not a folder written by aaren-rl export)")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON spec ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
    try:
        c = spec["model_config"]
        for key in ("observation_dim", "action_dim", "discrete", "n_layer", "n_head", "embed_dim"):
            c[key]
        if not c["discrete"] and not (len(c["action_low"]) == len(c["action_high"]) == c["action_dim"]):
            raise ValueError("action_low and action_high need action_dim entries each")
        spec["state"]["m"]["shape"], spec["state"]["w"]["shape"], spec["onnx"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the spec lacks {e}") from None
    return spec


class OnnxStep:
    """The exported step as a backend (``aaren_rl.backends``'s interface) in ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, folder: str | os.PathLike, spec: dict | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("acting with an exported policy needs onnxruntime: pip install 'aaren-rl[onnx]'") from None
        folder = Path(folder)
        self.spec = spec = spec if spec is not None else read_spec(folder)
        path = folder / spec["onnx"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the exported model is missing")
        data = path.read_bytes()
        digest = spec.get("onnx_sha256")
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{path} does not match its spec (SHA-256 differs): corrupt, or from another export")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self._check_against_spec(path)
        c = spec["model_config"]
        self.discrete = bool(c["discrete"])
        L, _, H = spec["state"]["m"]["shape"]
        self.state_shape = (int(L), int(H), int(spec["state"]["w"]["shape"][3]))

    def _check_against_spec(self, path: Path) -> None:
        """The graph's inputs and outputs against what the spec says (names, fixed dims)."""
        spec, c = self.spec, self.spec["model_config"]
        got = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        if list(got) != list(INPUTS) or outs != list(OUTPUTS):
            raise ValueError(f"{path} does not match its spec: inputs {list(got)}, outputs {outs}; expected "
                             f"{list(INPUTS)} and {list(OUTPUTS)}")
        want = {"obs": ["n", c["observation_dim"]], "prev_action": ["n"] if c["discrete"] else ["n", c["action_dim"]],
                "m": spec["state"]["m"]["shape"], "u": spec["state"]["u"]["shape"], "w": spec["state"]["w"]["shape"]}
        for name, shape in want.items():
            have = got[name].shape
            if len(have) != len(shape) or any(isinstance(s, int) and h != s for h, s in zip(have, shape)):
                raise ValueError(f"{path} does not match its spec: input {name} has shape {have}, the spec "
                                 f"says {shape}")

    def init_memory(self, n: int) -> AarenMemory:
        L, H, Dh = self.state_shape
        return AarenMemory(np.full((L, n, H), -np.inf, np.float32), np.zeros((L, n, H), np.float32),
                           np.zeros((L, n, H, Dh), np.float32))

    def memory_nbytes(self, memory: AarenMemory) -> int:
        return memory.nbytes

    def step(self, obs, prev_action, returns_to_go, timestep, start, memory):
        feed = {
            "obs": np.ascontiguousarray(obs, np.float32),
            "prev_action": np.ascontiguousarray(prev_action, np.int64 if self.discrete else np.float32),
            "returns_to_go": np.ascontiguousarray(returns_to_go, np.float32),
            "timestep": np.ascontiguousarray(timestep, np.int64),
            "start": np.ascontiguousarray(start, bool),
            "m": memory.m, "u": memory.u, "w": memory.w,
        }
        out, m, u, w = self.session.run(None, feed)
        return out, AarenMemory(m, u, w)


class OnnxPolicy(StreamingPolicy):
    """``StreamingPolicy``'s interface over an exported folder: ``predict(obs, state,
    episode_start=None, deterministic=True, reward=None) -> (action, state)``, NumPy in and out.
    ``target_return``: None takes the spec's."""

    def __init__(self, folder: str | os.PathLike, target_return: float | None = None, threads: int | None = None):
        self.folder = Path(folder)
        self.spec = read_spec(folder)
        if target_return is None:
            target_return = self.spec.get("target_return")
            if target_return is None:
                raise ValueError(f"{folder}: the spec records no target return; pass target_return")
        self.model = None  # no PyTorch model: the exported graph is the backend
        c = self.spec["model_config"]
        self.config = SimpleNamespace(**c)
        self._bind(self.config, target_return, "recurrent", OnnxStep(folder, self.spec, threads=threads))
