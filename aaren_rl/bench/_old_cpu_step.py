"""A Decision Aaren environment step on the CPU as one compiled C call (``cpu_step.c``).

Calling the model's ~100 small operators from Python costs ~1-2 ms per environment step at
batch 1, whatever the formulation; the arithmetic is ~30 us. So the whole step (three token
embeddings, embed_ln, every layer with its state fold, ln_f, action head) is one C function over
weights packed once into a contiguous buffer, and Python only hands it pointers.

- ``FastAarenStep.for_model(model)``: the packed model, or None when the fast path does not
  apply (``unsupported_reason`` says why): not an Aaren backbone, not CPU float32, width not a
  multiple of 16, or no C compiler. ``step_torch`` is the contract of
  ``StreamingPolicy._step_recurrent`` (same inputs, same outputs, new state tensors);
  ``StreamingPolicy`` uses it by default where it applies (``fast=None``).
- ``FastAarenPolicy(model, target_return, n_envs)``: a lean policy that keeps its own state in
  preallocated NumPy buffers and does ``predict``'s bookkeeping in C too (episode starts,
  returns to go, timesteps, a_{t-1}); a call costs the C step plus a few microseconds.
- ``precision="bfloat16"`` (both classes; CPUs with AVX512_BF16): the layers' matrices in bf16,
  products summed in float32 (``vdpbf16ps``): ~1.7x faster at batch 1, but not exact (actions
  within ~1e-4 of float32 for a GPT-2-initialized model, ~5e-2 for the tests' perturbed one).
  float32 is the default and the reference.

The library is built at first use with the system C compiler (``$CC``, else ``cc``/``gcc``),
``-O3 -march=native -ffast-math -fno-finite-math-only``, into a per-user cache directory
(``$AAREN_RL_CACHE``, else ``$XDG_CACHE_HOME/aaren_rl``, else ``~/.cache/aaren_rl``) under a name
keyed by the source, the flags, the compiler and the CPU's flags; it is written to a temporary
file and renamed into place, so concurrent first uses are safe. ``AAREN_RL_NO_CPU_KERNEL=1``
turns the fast path off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("_old_cpu_step.c")
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-std=gnu11", "-fPIC", "-shared", "-Wno-psabi"]

# the order of ``meta`` in cpu_step.c: dims, global tensors, layer layout, per-layer tensors
DIMS = ["E", "H", "L", "OBS", "ACT", "DISCRETE", "TMAX", "APAD", "BF16"]
GLOBAL = ["temb", "ret_w", "ret_b", "state_w", "state_b", "act_w", "act_b", "eln_w", "eln_b",
          "lnf_w", "lnf_b", "head_w", "head_b", "obs_mean", "obs_std", "act_low", "act_high", "ret_scale"]
LAYER = ["ln1_w", "ln1_b", "sv_w", "sv_b", "out_w", "out_b", "ln2_w", "ln2_b",
         "fc_w", "fc_b", "proj_w", "proj_b"]
META_LEN = len(DIMS) + len(GLOBAL) + 2 + len(LAYER)
ALIGN = 16  # floats: every tensor starts on a 64-byte boundary


# ----------------------------------------------------------------------------------------------
# Build and load


def _cache_dir() -> Path:
    root = os.environ.get("AAREN_RL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aaren_rl")
    return Path(root) / "cpu_step"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _IO(ctypes.Structure):
    """``io_t`` of cpu_step.c: every pointer one call reads or writes."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("params", "meta")] + [("n", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("obs", "reward", "start", "rtg", "timestep", "prev_action",
                                             "prev_index", "m", "u", "w", "out", "action", "scratch")
    ] + [("target_return", ctypes.c_float), ("normalize_obs", ctypes.c_int32)]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled step (built on first use, then cached on disk), or None with a warning."""
    if os.environ.get("AAREN_RL_NO_CPU_KERNEL"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(b"\0".join([source, " ".join(CFLAGS).encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"old_cpu_step-{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out_dir = path.parent
        except OSError:
            out_dir = Path(tempfile.gettempdir())
            path = out_dir / path.name
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=out_dir)
        os.close(fd)
        try:
            res = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                warnings.warn(f"aaren_rl: building the CPU step kernel failed; using the torch path.\n{res.stderr[-2000:]}",
                              RuntimeWarning, stacklevel=2)
                return None
            os.replace(tmp, path)  # atomic: a concurrent loader sees the old name absent or complete
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"aaren_rl: building the CPU step kernel failed ({e}); using the torch path.",
                          RuntimeWarning, stacklevel=2)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"aaren_rl: loading the CPU step kernel failed ({e}); using the torch path.",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.aaren_meta_len.restype = ctypes.c_int64
    if lib.aaren_meta_len() != META_LEN:
        raise RuntimeError("cpu_step.c and cpu_step.py disagree on the parameter layout")
    lib.aaren_panel_width.restype = ctypes.c_int64
    lib.aaren_has_bf16.restype = ctypes.c_int64
    lib.aaren_scratch_floats.restype = ctypes.c_int64
    lib.aaren_scratch_floats.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    for fn in (lib.aaren_step, lib.aaren_policy_step):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    """Whether the compiled step can be used here (a C compiler, or an already built library)."""
    return load_library() is not None


# ----------------------------------------------------------------------------------------------
# Packing


def _aligned_empty(n_floats: int) -> np.ndarray:
    raw = np.empty(n_floats + ALIGN, dtype=np.float32)
    skip = (-raw.ctypes.data % (4 * ALIGN)) // 4
    return raw[skip:skip + n_floats]


def _np(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot use the compiled step (None: it can, given a compiler)."""
    c = model.config
    if c.backbone != "aaren":
        return f"backbone is {c.backbone!r}, not 'aaren'"
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"parameters are {p.dtype} on {p.device}, not float32 on the CPU"
    if c.embed_dim % 16:
        return f"embed_dim {c.embed_dim} is not a multiple of 16"
    if not available():
        return "no C compiler (or the build failed)"
    return None


PANELED = ("state_w", "act_w", "head_w", "sv_w", "out_w", "fc_w", "proj_w")


def _panels(wt: np.ndarray, width: int = 64) -> np.ndarray:
    """(K, N) -> its column panels (K, 64) one after the other, flat."""
    return np.concatenate([wt[:, j:j + width].reshape(-1) for j in range(0, wt.shape[1], width)])


BF16_MATRICES = ("sv_w", "out_w", "fc_w", "proj_w")  # the layers' products; embeddings and head stay float32


def _bf16_panels(wt: np.ndarray, width: int = 64) -> np.ndarray:
    """(K, N) float32 -> bf16 (rounded to nearest even), panels of 64 columns, each holding for
    every input pair (k, k+1) its columns as interleaved pairs; returned as float32 slots (2 bf16 each)."""
    K = wt.shape[0]
    if K % 2:
        wt = np.concatenate([wt, np.zeros((1, wt.shape[1]), np.float32)])
    bits = torch.from_numpy(np.ascontiguousarray(wt)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    panels = [bits[:, j:j + width].reshape(-1, 2, min(width, wt.shape[1] - j)).transpose(0, 2, 1).reshape(-1)
              for j in range(0, wt.shape[1], width)]
    return np.concatenate(panels).view(np.float32)


def pack(model, panel_width: int = 64, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(params, meta): every tensor the step reads, Linears transposed to (in, out) and cut into
    column panels of ``panel_width`` (the library's ``aaren_panel_width()``), and its layout.
    ``bf16``: the layers' matrices in bfloat16 (the optional, inexact variant)."""
    c = model.config
    E, L, A = c.embed_dim, c.n_layer, c.action_dim
    apad = -(-A // 16) * 16
    zeros = np.zeros

    def pad_cols(x, cols):
        out = zeros((x.shape[0], cols), np.float32)
        out[:, :x.shape[1]] = x
        return out

    act_w = _np(model.embed_action.weight)  # discrete: Embedding rows (A, E); continuous: (E, A)
    g = {
        "temb": _np(model.embed_timestep.weight),
        "ret_w": _np(model.embed_return.weight[:, 0]), "ret_b": _np(model.embed_return.bias),
        "state_w": _np(model.embed_state.weight).T, "state_b": _np(model.embed_state.bias),
        "act_w": act_w if c.discrete else act_w.T,
        "act_b": zeros(E, np.float32) if c.discrete else _np(model.embed_action.bias),
        "eln_w": _np(model.embed_ln.weight), "eln_b": _np(model.embed_ln.bias),
        "lnf_w": _np(model.backbone.ln_f.weight), "lnf_b": _np(model.backbone.ln_f.bias),
        "head_w": pad_cols(_np(model.predict_action.weight).T, apad),
        "head_b": pad_cols(_np(model.predict_action.bias)[None], apad)[0],
        "obs_mean": _np(model.obs_mean), "obs_std": _np(model.obs_std),
        "act_low": zeros(A, np.float32) if c.discrete else _np(model.action_low),
        "act_high": zeros(A, np.float32) if c.discrete else _np(model.action_high),
        "ret_scale": np.array([c.return_scale], np.float32),
    }

    def bias(linear, n):
        return zeros(n, np.float32) if linear.bias is None else _np(linear.bias)

    def _score_value(mix):
        """The layer's values-and-scores product (``Aaren._score_value_projection``), (E, SV)
        with SV = E + H rounded up to 16 columns, as the C step reads it."""
        with torch.no_grad():
            w, b = mix._score_value_projection()
        sv = -(-(E + mix.num_heads) // 16) * 16
        b = torch.zeros(w.shape[0]) if b is None else b
        return {"sv_w": pad_cols(_np(w).T, sv), "sv_b": pad_cols(_np(b)[None], sv)[0]}

    layers = []
    for block in model.backbone.blocks:
        mix, mlp = block.mixer, block.mlp
        layers.append({
            "ln1_w": _np(block.ln_1.weight), "ln1_b": _np(block.ln_1.bias),
            **_score_value(mix),
            "out_w": _np(mix.out.weight).T, "out_b": bias(mix.out, E),
            "ln2_w": _np(block.ln_2.weight), "ln2_b": _np(block.ln_2.bias),
            "fc_w": _np(mlp.fc.weight).T, "fc_b": _np(mlp.fc.bias),
            "proj_w": _np(mlp.proj.weight).T, "proj_b": _np(mlp.proj.bias),
        })

    def layout(tensors, names, start=0):
        offsets, pos = {}, start
        for name in names:
            offsets[name] = pos
            pos += -(-tensors[name].size // ALIGN) * ALIGN
        return offsets, pos

    for tensors in [g, *layers]:  # (in, out) matrices as the C step reads them: column panels
        for name in PANELED:
            if name not in tensors:
                continue
            if bf16 and name in BF16_MATRICES:
                tensors[name] = _bf16_panels(tensors[name])
            elif not (name == "act_w" and c.discrete):
                tensors[name] = _panels(tensors[name], panel_width)
    g_off, layer0 = layout(g, GLOBAL)
    l_off, stride = layout(layers[0], LAYER)
    params = _aligned_empty(layer0 + L * stride)
    params[:] = 0
    for name, off in g_off.items():
        params[off:off + g[name].size] = g[name].reshape(-1)
    for i, tensors in enumerate(layers):
        base = layer0 + i * stride
        for name, off in l_off.items():
            params[base + off:base + off + tensors[name].size] = tensors[name].reshape(-1)
    dims = [E, c.n_head, L, c.observation_dim, A, int(c.discrete), c.max_timestep, apad, int(bf16)]
    meta = np.array(dims + [g_off[k] for k in GLOBAL] + [layer0, stride] + [l_off[k] for k in LAYER], np.int64)
    assert meta.size == META_LEN
    return params, meta


# ----------------------------------------------------------------------------------------------
# The step


def _versions(tensors) -> list[int]:
    """In-place changes (optimizer steps, load_state_dict) bump a tensor's version counter."""
    return list(map(_VERSION, tensors))


_VERSION = operator.attrgetter("_version")


def _c(x, dtype):
    """x as a contiguous CPU tensor of dtype (no copy when it already is one)."""
    if x.dtype == dtype and x.is_contiguous() and x.device.type == "cpu":
        return x
    return x.to("cpu", dtype).contiguous()


class FastAarenStep:
    """A ``DecisionModel`` with an Aaren backbone, packed for the compiled CPU step."""

    def __init__(self, model, precision: str = "float32"):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the compiled CPU step does not apply: {reason}")
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.model = model
        self.lib = load_library()
        if precision == "bfloat16" and not self.lib.aaren_has_bf16():
            raise ValueError("precision='bfloat16' needs a CPU with AVX512_BF16")
        self.precision = precision
        c = model.config
        self.n_layer, self.num_heads, self.embed_dim = c.n_layer, c.n_head, c.embed_dim
        self.head_dim = c.embed_dim // c.n_head
        self.action_dim, self.discrete = c.action_dim, c.discrete
        self._scratch: dict[int, np.ndarray] = {}
        self._io = _IO()
        self._io_ptr = ctypes.addressof(self._io)
        self.repack()

    @classmethod
    def for_model(cls, model) -> "FastAarenStep | None":
        return None if unsupported_reason(model) else cls(model)

    def repack(self) -> None:
        """Copy the model's current weights (done at construction; ``step_torch`` redoes it when
        any parameter or buffer changed in place since)."""
        self.params, self.meta = pack(self.model, self.lib.aaren_panel_width(), bf16=self.precision == "bfloat16")
        self._tensors = list(self.model.state_dict(keep_vars=True).values())
        self._packed_versions = _versions(self._tensors)
        self._io.params, self._io.meta = self.params.ctypes.data, self.meta.ctypes.data

    def ensure_packed(self) -> None:
        """Repack if any parameter or buffer changed in place since the last packing."""
        if _versions(self._tensors) != self._packed_versions:
            self.repack()

    def scratch(self, n: int) -> np.ndarray:
        if n not in self._scratch:
            self._scratch[n] = _aligned_empty(self.lib.aaren_scratch_floats(self.meta.ctypes.data, n))
        return self._scratch[n]

    def state_shapes(self, n: int) -> tuple[tuple, tuple, tuple]:
        """Shapes of m, u, w: (layers, n, heads), (layers, n, heads), (layers, n, heads, head_dim)."""
        L, H = self.n_layer, self.num_heads
        return (L, n, H), (L, n, H), (L, n, H, self.head_dim)

    @torch.no_grad()
    def step_torch(self, obs, prev_action, returns_to_go, timestep, starts, backbone):
        """``StreamingPolicy._step_recurrent``'s computation: obs (n, obs_dim) in model units,
        prev_action (n, act) (discrete: (n,) long), returns_to_go (n,), timestep (n,) long,
        starts (n,) bool, backbone the list of per-layer ``AarenState``.

        Returns the action-head output (n, act) (tanh, or logits) and a new list of states (the
        given ones are not modified).
        """
        from ..layer import AarenState

        self.ensure_packed()
        n = obs.shape[0]
        m = torch.stack([s.m for s in backbone])  # (L, n, H): fresh tensors the C step updates
        u = torch.stack([s.u for s in backbone])
        w = torch.stack([s.w for s in backbone])  # (L, n, H, Dh)
        if m.dtype != torch.float32 or m.device.type != "cpu":
            raise ValueError(f"state must be float32 on the CPU, got {m.dtype} on {m.device}")
        obs, rtg = _c(obs, torch.float32), _c(returns_to_go, torch.float32)
        t, start = _c(timestep, torch.int64), _c(starts, torch.bool)
        out = torch.empty(n, self.action_dim, dtype=torch.float32)
        io = self._io
        self._owner = None  # the I/O block now points at this call's tensors, not a policy's buffers
        io.n = n
        io.obs, io.rtg, io.timestep, io.start = obs.data_ptr(), rtg.data_ptr(), t.data_ptr(), start.data_ptr()
        if self.discrete:
            prev = _c(prev_action, torch.int64)
            io.prev_index, io.prev_action = prev.data_ptr(), None
        else:
            prev = _c(prev_action, torch.float32)
            io.prev_action, io.prev_index = prev.data_ptr(), None
        io.m, io.u, io.w, io.out = m.data_ptr(), u.data_ptr(), w.data_ptr(), out.data_ptr()
        io.scratch = self.scratch(n).ctypes.data
        io.normalize_obs = 0
        self.lib.aaren_step(self._io_ptr)
        return out, [AarenState(*s) for s in zip(m.unbind(), u.unbind(), w.unbind())]


class FastAarenPolicy:
    """A lean streaming policy for ``n_envs`` environments: state in preallocated buffers, one C
    call per environment step (``predict``'s bookkeeping included).

    ``predict(obs, episode_start, reward)`` has ``StreamingPolicy.predict``'s meaning (actions in
    env units; ``episode_start`` marks rows that begin an episode, all rows on the first call;
    ``reward`` is what each env returned for the previous action; None counts as 0).
    Deterministic only (a discrete model takes the argmax). For speed it checks only shapes (no
    NaN checks, unlike ``StreamingPolicy``). The returned array is reused by the next call: copy
    it to keep it. It packs the weights once: call ``fast.repack()`` after changing them.
    """

    def __init__(self, model, target_return: float, n_envs: int = 1, precision: str = "float32",
                 step: "FastAarenStep | None" = None):
        """``step``: an existing packed model to share (several policies may share one)."""
        if n_envs <= 0:
            raise ValueError(f"n_envs must be positive, got {n_envs}")
        self.fast = step if step is not None else FastAarenStep(model.eval(), precision)
        self.n_envs, self.target_return = n_envs, float(target_return)
        c = model.config
        n, A = n_envs, c.action_dim
        ms, us, ws = self.fast.state_shapes(n)
        self.m, self.u, self.w = np.empty(ms, np.float32), np.empty(us, np.float32), np.empty(ws, np.float32)
        self.obs = np.zeros((n, c.observation_dim), np.float32)
        self.reward = np.zeros(n, np.float32)
        self.start = np.ones(n, np.uint8)
        self.rtg = np.zeros(n, np.float32)
        self.timestep = np.zeros(n, np.int64)
        self.prev_action = np.zeros((n, A), np.float32)
        self.prev_index = np.zeros(n, np.int64)
        self.out = np.zeros((n, A), np.float32)
        self.action = np.zeros((n, A), np.float32)
        self._call, self._io_ptr = self.fast.lib.aaren_policy_step, self.fast._io_ptr
        self._bind()
        self.reset()

    def _bind(self) -> None:
        """Point the step's I/O block at this policy's buffers (once, unless another policy
        sharing the step used it since)."""
        io = self.fast._io
        io.n = self.n_envs
        for name in ("obs", "reward", "start", "rtg", "timestep", "prev_action", "prev_index", "m", "u", "w",
                     "out", "action"):
            setattr(io, name, getattr(self, name).ctypes.data)
        io.scratch = self.fast.scratch(self.n_envs).ctypes.data
        io.target_return, io.normalize_obs = self.target_return, 1
        self.fast._owner = self

    def reset(self) -> None:
        """Every environment begins a new episode at the next call."""
        self.m.fill(-np.inf)
        self.u.fill(0.0)
        self.w.fill(0.0)
        self.timestep.fill(0)
        self.start.fill(1)

    def predict(self, observation, episode_start=None, reward=None) -> np.ndarray:
        """Actions (n_envs, act) in env units (discrete: (n_envs,) indices)."""
        self.obs[...] = observation  # broadcasting checks the shape
        if episode_start is not None:
            self.start[...] = episode_start
        self.reward[...] = 0.0 if reward is None else reward
        if getattr(self.fast, "_owner", None) is not self:
            self._bind()
        self._call(self._io_ptr)
        self.start.fill(0)
        return self.action.reshape(-1)[:self.n_envs].astype(np.int64) if self.fast.discrete else self.action

    def record_action(self, action) -> None:
        """Override the remembered a_t (env units), as ``StreamingPolicy.record_action``."""
        if self.fast.discrete:
            self.prev_index[...] = np.asarray(action, np.int64).reshape(self.n_envs)
        else:
            a = torch.as_tensor(np.asarray(action, np.float32).reshape(self.n_envs, -1))
            self.prev_action[...] = self.fast.model.normalize_action(a).numpy()

    def state_nbytes(self) -> int:
        """Bytes of the recurrent state (m, u, w of every layer and head): constant."""
        return self.m.nbytes + self.u.nbytes + self.w.nbytes
