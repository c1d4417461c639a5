"""Acting with an exported policy (``aaren-rl export``) in ONNX Runtime: NumPy in and out, no PyTorch.

    from aaren_rl.runtime import OnnxPolicy
    policy = OnnxPolicy("exported/")               # target_return: the spec's default
    action, state = policy.predict(obs, state, episode_start=starts, reward=reward)

``OnnxPolicy`` is a ``StreamingPolicy`` (the same episode bookkeeping, the same ``PolicyState``)
whose backend is the exported step (``OnnxStep``): one ONNX Runtime call per environment step.
The state is what the spec lists: for Decision Aaren an ``AarenMemory`` of constant size, for
the Decision Transformer's forms a ``GraphMemory`` (the key/value cache, growing or sliding, or
the last K timesteps). Needs ``aaren-rl[onnx]`` (onnxruntime) and NumPy; this module imports
nothing that imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .policy import MODES, AarenMemory, StreamingPolicy

FORMAT = "aaren-rl-step/2"  # as aaren_rl.export writes; /2: any mode, the state tensors listed in the spec
SPEC_FILE = "spec.json"
TOKEN_INPUTS = ("obs", "prev_action", "returns_to_go", "timestep", "start")
DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


class GraphMemory(dict):
    """An exported graph's state: its named input arrays (``spec["state"]``), NumPy."""

    def copy(self) -> "GraphMemory":
        return GraphMemory({k: v.copy() for k, v in self.items()})

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values())


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
        hint = " (written by an older aaren-rl: export the checkpoint again)" if str(got).startswith("aaren-rl-step/") else ""
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}{hint}")
    try:
        c = spec["model_config"]
        for key in ("observation_dim", "action_dim", "discrete", "n_layer", "n_head", "embed_dim"):
            c[key]
        if not c["discrete"] and not (len(c["action_low"]) == len(c["action_high"]) == c["action_dim"]):
            raise ValueError("action_low and action_high need action_dim entries each")
        if spec["mode"] not in MODES:
            raise ValueError(f"mode {spec['mode']!r} is not one of {MODES}")
        if not spec["state"] or not isinstance(spec["state"], dict):
            raise ValueError("state lists no tensors")
        for name, t in spec["state"].items():
            if t["dtype"] not in DTYPES or not isinstance(t["shape"], list):
                raise ValueError(f"state {name}: dtype {t['dtype']!r} (expected one of {sorted(DTYPES)}) and a shape list")
            t["empty"]
        spec["onnx"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the spec lacks {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
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
        if threads:  # the graph is one chain of small operators: inter-op threads would have nothing to run
            opts.intra_op_num_threads = opts.inter_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self._check_against_spec(path)
        self.discrete = bool(spec["model_config"]["discrete"])
        self.state = spec["state"]
        self.aaren = list(self.state) == ["m", "u", "w"]  # Decision Aaren's (m, u, w): an AarenMemory
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _check_against_spec(self, path: Path) -> None:
        """The graph's inputs and outputs against what the spec says (names, fixed dims)."""
        spec, c = self.spec, self.spec["model_config"]
        got = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        inputs, outputs = [*TOKEN_INPUTS, *spec["state"]], ["out", *(f"{k}_out" for k in spec["state"])]
        if list(got) != inputs or outs != outputs:
            raise ValueError(f"{path} does not match its spec: inputs {list(got)}, outputs {outs}; expected "
                             f"{inputs} and {outputs}")
        want = {"obs": ["n", c["observation_dim"]], "prev_action": ["n"] if c["discrete"] else ["n", c["action_dim"]],
                **{k: t["shape"] for k, t in spec["state"].items()}}
        for name, shape in want.items():
            have = got[name].shape
            if len(have) != len(shape) or any(isinstance(s, int) and h != s for h, s in zip(have, shape)):
                raise ValueError(f"{path} does not match its spec: input {name} has shape {have}, the spec "
                                 f"says {shape}")

    def init_memory(self, n: int):
        arrays = {}
        for name, t in self.state.items():  # "n": environments; any other name (the cache's "T"): none yet
            shape = [n if d == "n" else 0 if isinstance(d, str) else d for d in t["shape"]]
            arrays[name] = np.full(shape, float(t["empty"]), DTYPES[t["dtype"]])
        return AarenMemory(**arrays) if self.aaren else GraphMemory(arrays)

    def memory_nbytes(self, memory) -> int:
        return memory.nbytes

    def step(self, obs, prev_action, returns_to_go, timestep, start, memory):
        feed = {
            "obs": np.ascontiguousarray(obs, np.float32),
            "prev_action": np.ascontiguousarray(prev_action, np.int64 if self.discrete else np.float32),
            "returns_to_go": np.ascontiguousarray(returns_to_go, np.float32),
            "timestep": np.ascontiguousarray(timestep, np.int64),
            "start": np.ascontiguousarray(start, bool),
        }
        feed.update({k: getattr(memory, k) for k in self.state} if self.aaren else memory)
        out, *state = self.session.run(self.outputs, feed)
        arrays = dict(zip(self.state, state))
        return out, (AarenMemory(**arrays) if self.aaren else GraphMemory(arrays))


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
        self._bind(self.config, target_return, self.spec["mode"], OnnxStep(folder, self.spec, threads=threads))
