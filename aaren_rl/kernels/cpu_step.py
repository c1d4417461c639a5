"""A Decision Aaren step on the CPU as one compiled C call (``cpu_step.c``): arrays in, arrays out.

Calling the model's ~100 small operators from Python costs ~1-2 ms per environment step at
batch 1, whatever the formulation; the arithmetic is ~30 us. So the whole step (three token
embeddings, embed_ln, every layer with its state fold, ln_f, action head) is one C function over
weights packed once into a contiguous buffer, and Python only hands it buffers.

This module knows NumPy and the C file, nothing of the package above it. ``CpuStep(dims,
tensors, layers)`` takes the weights as named float32 arrays, matrices as (in, out) (the layout
``DecisionModel.export_step_weights`` writes); ``CpuStep.step`` takes one environment step's
inputs and the (m, u, w) state, which it updates in place, and returns the action head's output.

- ``precision="bfloat16"`` (CPUs with AVX512_BF16): the layers' matrices in bf16, products
  summed in float32 (``vdpbf16ps``): ~1.7x faster at batch 1, but not exact (actions within
  ~1e-4 of float32 for a GPT-2-initialized model, ~5e-2 for the tests' perturbed one). float32
  is the default and the reference.
- The C side names its parameter layout (``aaren_meta_names``) and its I/O block
  (``aaren_io_names``, ``aaren_io_size``); this side fills both by name and refuses to run
  when the names differ.

The library is built at first use with the system C compiler (``$CC``, else ``cc``/``gcc``),
``CFLAGS`` below, into a per-user cache folder (``$AAREN_RL_CACHE``, else
``$XDG_CACHE_HOME/aaren_rl``, else ``~/.cache/aaren_rl``; its ``cpu_step`` folder is created
with mode 0700 and must be owned by the user and writable by nobody else, or the step is not
used), under a name keyed by the source, the flags, the compiler and the CPU's flags; it is
written to a temporary file and renamed into place, so concurrent first uses are safe.
``AAREN_RL_NO_CPU_KERNEL=1`` turns the compiled step off.

Why not ``-ffast-math``: with gcc 12, a shared library built with it sets the CPU's
flush-to-zero and denormals-are-zero modes for the whole process when it loads (crtfastmath),
which changes every later float computation of NumPy and PyTorch in that process. The flags
below keep what the step needs from it (sums the compiler may vectorize, no errno from libm).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cpu_step.c")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-std=gnu11", "-fPIC", "-shared", "-Wno-psabi"]

DIMS = ("E", "H", "L", "OBS", "ACT", "DISCRETE", "TMAX")  # what the caller gives; APAD, BF16 come from here
GLOBAL = ("temb", "ret_w", "ret_b", "state_w", "state_b", "act_w", "act_b", "eln_w", "eln_b",
          "lnf_w", "lnf_b", "head_w", "head_b", "obs_mean", "obs_std", "ret_scale")
LAYER = ("ln1_w", "ln1_b", "sv_w", "sv_b", "out_w", "out_b", "ln2_w", "ln2_b", "fc_w", "fc_b", "proj_w", "proj_b",
         "decay")
PANELED = ("state_w", "act_w", "head_w", "sv_w", "out_w", "fc_w", "proj_w")  # (in, out) matrices, cut into panels
BF16_MATRICES = ("sv_w", "out_w", "fc_w", "proj_w")  # the layers' products; embeddings and head stay float32
ALIGN = 16  # floats: every tensor starts on a 64-byte boundary

# io_t of cpu_step.c, by name (checked against aaren_io_names() when the library loads)
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
IO_FIELDS = [("params", _POINTER), ("meta", _POINTER), ("n", _INT64), ("obs", _POINTER), ("start", _POINTER),
             ("rtg", _POINTER), ("timestep", _POINTER), ("prev_action", _POINTER), ("prev_index", _POINTER),
             ("m", _POINTER), ("u", _POINTER), ("w", _POINTER), ("out", _POINTER), ("scratch", _POINTER)]


class _IO(ctypes.Structure):
    _fields_ = IO_FIELDS


# ----------------------------------------------------------------------------------------------
# Build and load


def cache_dir() -> Path:
    """The folder the library is built into: per user, created 0700."""
    root = os.environ.get("AAREN_RL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aaren_rl")
    return Path(root) / "cpu_step"


def _private_dir(path: Path) -> str | None:
    """Create ``path`` (mode 0700) if needed; None if it is safe to build into and load from,
    else why not: it must be a real folder owned by this user that no one else can write."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        return f"cannot create {path}: {e}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} can be written by other users"
    return None


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


def _names(fn) -> list[str]:
    fn.restype = ctypes.c_char_p
    return [x for x in fn().decode().split(",") if x]


def _warn(message: str) -> None:
    warnings.warn(f"aaren_rl: {message}; using the PyTorch step.", RuntimeWarning, stacklevel=3)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled step (built on first use, then cached on disk), or None (with a warning
    when a build or load failed)."""
    if os.environ.get("AAREN_RL_NO_CPU_KERNEL"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(CFLAGS).encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    problem = _private_dir(folder)
    if problem:  # never fall back to a shared folder such as /tmp: a library there could be planted
        _warn(f"the compiled CPU step needs a private cache folder ({problem}; set AAREN_RL_CACHE)")
        return None
    path = folder / f"cpu_step-{key}.so"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=folder)
        os.close(fd)
        try:
            res = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                _warn(f"building the CPU step kernel failed\n{res.stderr[-2000:]}")
                return None
            os.replace(tmp, path)  # atomic: a concurrent loader sees the name absent or complete
        except (OSError, subprocess.SubprocessError) as e:
            _warn(f"building the CPU step kernel failed ({e})")
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _warn(f"loading the CPU step kernel failed ({e})")
        return None
    io_names = _names(lib.aaren_io_names)
    lib.aaren_io_size.restype = ctypes.c_int64
    if io_names != [name for name, _ in IO_FIELDS] or lib.aaren_io_size() != ctypes.sizeof(_IO):
        raise RuntimeError(f"cpu_step.c's io_t ({io_names}, {lib.aaren_io_size()} bytes) differs from "
                           f"cpu_step.py's ({[name for name, _ in IO_FIELDS]}, {ctypes.sizeof(_IO)} bytes)")
    lib.meta_names = _names(lib.aaren_meta_names)
    lib.aaren_panel_width.restype = ctypes.c_int64
    lib.aaren_has_bf16.restype = ctypes.c_int64
    lib.aaren_scratch_floats.restype = ctypes.c_int64
    lib.aaren_scratch_floats.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.aaren_step.restype = ctypes.c_int
    lib.aaren_step.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    """Whether the compiled step can be used here (a C compiler, or an already built library)."""
    return load_library() is not None


def has_bf16() -> bool:
    lib = load_library()
    return lib is not None and bool(lib.aaren_has_bf16())


# ----------------------------------------------------------------------------------------------
# Packing


def _aligned_empty(n: int, dtype=np.float32) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + 64 // itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % 64) // itemsize
    return raw[skip:skip + n]


def _pad_cols(x: np.ndarray, cols: int) -> np.ndarray:
    out = np.zeros((x.shape[0], cols), np.float32)
    out[:, :x.shape[1]] = x
    return out


def _panels(wt: np.ndarray, width: int) -> np.ndarray:
    """(K, N) -> its column panels (K, width) one after the other, flat."""
    return np.concatenate([wt[:, j:j + width].reshape(-1) for j in range(0, wt.shape[1], width)])


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch's .to(bfloat16))."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_panels(wt: np.ndarray, width: int = 64) -> np.ndarray:
    """(K, N) float32 -> bf16, panels of 64 columns, each holding for every input pair (k, k+1)
    its columns as interleaved pairs; returned as float32 slots (2 bf16 each)."""
    if wt.shape[0] % 2:
        wt = np.concatenate([wt, np.zeros((1, wt.shape[1]), np.float32)])
    bits = _to_bf16_bits(wt)
    panels = [bits[:, j:j + width].reshape(-1, 2, min(width, wt.shape[1] - j)).transpose(0, 2, 1).reshape(-1)
              for j in range(0, wt.shape[1], width)]
    return np.concatenate(panels).view(np.float32)


def pack(dims: dict, tensors: dict, layers: list[dict], meta_names: list[str], panel_width: int,
         bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(params, meta): every tensor in one aligned buffer, matrices cut into column panels of
    ``panel_width`` (bf16: the layers' matrices in bfloat16 pairs), and ``meta`` filled in the
    C side's order of ``meta_names``. Raises if the names on the two sides differ."""
    E, H, A = int(dims["E"]), int(dims["H"]), int(dims["ACT"])
    discrete = bool(dims["DISCRETE"])
    apad, sv = -(-A // 16) * 16, -(-(E + H) // 16) * 16
    f32 = lambda x: np.ascontiguousarray(x, np.float32)  # noqa: E731
    g = {name: f32(tensors[name]) for name in GLOBAL}
    g["head_w"], g["head_b"] = _pad_cols(g["head_w"], apad), _pad_cols(g["head_b"][None], apad)[0]
    g["ret_w"] = g["ret_w"].reshape(-1)
    g["ret_scale"] = g["ret_scale"].reshape(1)
    ls = []
    for layer in layers:
        t = {name: f32(layer[name]) for name in LAYER}
        t["sv_w"], t["sv_b"] = _pad_cols(t["sv_w"], sv), _pad_cols(t["sv_b"][None], sv)[0]
        ls.append(t)
    for t in [g, *ls]:
        for name in PANELED:
            if name not in t or (name == "act_w" and discrete):  # an embedding table: rows, as is
                continue
            t[name] = _bf16_panels(t[name]) if bf16 and name in BF16_MATRICES else _panels(t[name], panel_width)

    def layout(t, names, start=0):
        offsets, pos = {}, start
        for name in names:
            offsets[name] = pos
            pos += -(-t[name].size // ALIGN) * ALIGN
        return offsets, pos

    g_off, layer0 = layout(g, GLOBAL)
    l_off, stride = layout(ls[0], LAYER)
    params = _aligned_empty(layer0 + len(ls) * stride)
    params[:] = 0
    for name, off in g_off.items():
        params[off:off + g[name].size] = g[name].reshape(-1)
    for i, t in enumerate(ls):
        base = layer0 + i * stride
        for name, off in l_off.items():
            params[base + off:base + off + t[name].size] = t[name].reshape(-1)
    values = {**{k: int(dims[k]) for k in DIMS}, "APAD": apad, "BF16": int(bf16), **g_off, **l_off,
              "layer0": layer0, "layer_stride": stride}
    missing, unread = sorted(set(meta_names) - set(values)), sorted(set(values) - set(meta_names))
    if missing or unread:
        raise RuntimeError(f"cpu_step.c and cpu_step.py disagree on the parameter layout: the C step reads "
                           f"{missing} that Python does not pack, and not {unread}")
    meta = np.array([values[name] for name in meta_names], np.int64)
    return params, meta


# ----------------------------------------------------------------------------------------------
# The step


class CpuStep:
    """The compiled step over one set of weights (see the module docstring)."""

    def __init__(self, dims: dict, tensors: dict, layers: list[dict], precision: str = "float32"):
        """``dims``: E, H, L, OBS, ACT, DISCRETE, TMAX. ``tensors``: the names in ``GLOBAL``;
        ``layers``: one dict per layer with the names in ``LAYER``."""
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        lib = load_library()
        if lib is None:
            raise RuntimeError("the compiled CPU step is not available (no C compiler, a failed build, or "
                               "AAREN_RL_NO_CPU_KERNEL set)")
        if precision == "bfloat16" and not lib.aaren_has_bf16():
            raise ValueError("precision='bfloat16' needs a CPU with AVX512_BF16")
        if int(dims["E"]) % 16:
            raise ValueError(f"the compiled step needs a width that is a multiple of 16, got {dims['E']}")
        self.lib, self.precision = lib, precision
        self.dims = {k: int(dims[k]) for k in DIMS}
        E, H = self.dims["E"], self.dims["H"]
        self.state_shapes = ((self.dims["L"], H), (self.dims["L"], H), (self.dims["L"], H, E // H))
        self.params, self.meta = pack(dims, tensors, layers, lib.meta_names, lib.aaren_panel_width(),
                                      bf16=precision == "bfloat16")
        self._io = _IO(params=self.params.ctypes.data, meta=self.meta.ctypes.data)
        self._io_ptr = ctypes.addressof(self._io)
        self._n = None
        self._state = None

    def _buffers(self, n: int) -> None:
        """The step's own input and output buffers for n rows, bound once per batch size."""
        d, io = self.dims, self._io
        self.b_obs = np.zeros((n, d["OBS"]), np.float32)
        self.b_start = np.zeros(n, np.uint8)
        self.b_rtg = np.zeros(n, np.float32)
        self.b_timestep = np.zeros(n, np.int64)
        self.b_prev = np.zeros((n, d["ACT"]), np.float32)
        self.b_index = np.zeros(n, np.int64)
        self.b_out = np.zeros((n, d["ACT"]), np.float32)
        self.b_scratch = _aligned_empty(self.lib.aaren_scratch_floats(self.meta.ctypes.data, n))
        io.n = n
        io.obs, io.start, io.rtg = self.b_obs.ctypes.data, self.b_start.ctypes.data, self.b_rtg.ctypes.data
        io.timestep, io.prev_action = self.b_timestep.ctypes.data, self.b_prev.ctypes.data
        io.prev_index, io.out, io.scratch = self.b_index.ctypes.data, self.b_out.ctypes.data, self.b_scratch.ctypes.data
        self._n, self._state = n, None

    def empty_state(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(m, u, w) for n rows, empty: (L, n, H) = -inf, (L, n, H) = 0, (L, n, H, Dh) = 0."""
        (L, H), _, (_, _, Dh) = self.state_shapes
        return (np.full((L, n, H), -np.inf, np.float32), np.zeros((L, n, H), np.float32),
                np.zeros((L, n, H, Dh), np.float32))

    def step(self, obs, prev_action, returns_to_go, timestep, start, m, u, w) -> np.ndarray:
        """One environment step for n rows: obs (n, obs_dim) in env units, prev_action (n, act)
        in model units (discrete: (n,) indices), returns_to_go (n,), timestep (n,), start (n,)
        bool (rows that begin an episode: their state is emptied first and a_{t-1} is padding).
        m, u, w (float32, C-contiguous, from ``empty_state``) are updated in place. Returns the
        action head's output (n, act), tanh'd or logits, in a buffer the next call reuses."""
        n = obs.shape[0]
        if n != self._n:
            self._buffers(n)
        if self._state is None or m is not self._state[0] or u is not self._state[1] or w is not self._state[2]:
            # bind the state's buffers (held here, so that their addresses stay valid) until another comes
            for x, shape in zip((m, u, w), self.state_shapes):
                if x.dtype != np.float32 or not x.flags.c_contiguous or x.shape != (shape[0], n, *shape[1:]):
                    raise ValueError(f"the state must be float32, C-contiguous and of shape "
                                     f"{(shape[0], n, *shape[1:])}, got {x.dtype} {x.shape}")
            self._io.m, self._io.u, self._io.w = m.ctypes.data, u.ctypes.data, w.ctypes.data
            self._state = (m, u, w)
        self.b_obs[...] = obs
        self.b_start[...] = start
        self.b_rtg[...] = returns_to_go
        self.b_timestep[...] = timestep
        if self.dims["DISCRETE"]:
            self.b_index[...] = prev_action
        else:
            self.b_prev[...] = prev_action
        self.lib.aaren_step(self._io_ptr)
        return self.b_out
