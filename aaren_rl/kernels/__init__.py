"""Compute kernels: fast paths with the same contract as the plain code. They take tensors or
arrays and import nothing of the package above them.

- ``aaren_scan_packed(sv, num_heads, head_dim, padding_mask)`` -> ``o``: from the layer's packed
  projection sv (B, T, F) (values, one score per head, zero columns) the prefix
  softmax-weighted averages o (B, H, T, Dh) (zero where the prefix holds only padding), exactly
  what ``layer.prefix_scan`` followed by the readout gives (with ``recency``, of the scores plus
  recency * i, summed in float32). A fused Triton kernel
  (``triton_scan``) that runs on CUDA when Triton imports; ``Aaren.forward`` uses it there and
  keeps the plain scan everywhere else. ``use_triton(False)`` turns it off (benchmarks compare both).
- ``cpu_step``: one acting step of a Decision Aaren model as one compiled C call, over weights
  given as named NumPy arrays.
"""

from __future__ import annotations

import contextlib
import functools

_enabled = True


@functools.cache
def triton_available() -> bool:
    """True if Triton imports (the kernel itself still needs a CUDA tensor, or TRITON_INTERPRET=1)."""
    try:
        from . import triton_scan  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused_scan(x) -> bool:
    """Whether ``Aaren.forward`` should hand this input's scan to the fused kernel."""
    return _enabled and x.is_cuda and triton_available()


@contextlib.contextmanager
def use_triton(flag: bool = True):
    """Within the block, let (True) or stop (False) Aaren using the Triton scan."""
    global _enabled
    old, _enabled = _enabled, flag
    try:
        yield
    finally:
        _enabled = old


def aaren_scan_packed(sv, num_heads, head_dim, padding_mask=None, recency=0.0, offset=None):
    """The same scan over a packed projection sv (B, T, F): values, one score per head, padding;
    ``recency`` > 0 adds recency * i to token i's score, ``offset`` (B or 1, T) adds its values to
    the scores of those tokens (both in float32) before the scan."""
    from .triton_scan import aaren_scan_packed as _scan

    return _scan(sv, num_heads, head_dim, padding_mask, recency=recency, offset=offset)


__all__ = ["aaren_scan_packed", "triton_available", "use_fused_scan", "use_triton"]
