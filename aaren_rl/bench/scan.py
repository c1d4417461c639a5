"""The Aaren scan alone: the fused Triton kernel vs the plain scan (``layer.prefix_scan`` + readout).

Two measurements per shape, every time a CUDA-graph replay (device time, as in training, where
the whole update runs as a graph; the host's launch gaps left out alike):

* **the layer's scan**, as ``Aaren.forward`` runs it: from the packed projection sv (B, T, F) =
  (values | one score per head | zero columns) to o, forward and forward+backward (autograd),
  with the fused kernel (``kernels.aaren_scan_packed``) and with the plain scan. Like for like.
* **the kernels alone** (``triton_scan.scan_forward`` / ``scan_backward`` on s (B, H, T),
  v (B, H, T, Dh)), turned into achieved memory bandwidth, compared with a device-to-device copy
  measured in the same run. Bytes counted are those the kernels must move at least once:

* forward: read s, v; write o, and r, u (two float32 per token and head, kept for the backward);
* backward: read s, v, o, g, r, u; write dv and ds (the shares of ds per Dh block, summed after
  the kernel, are left out: 4 bytes per token and Dh block).

``--tune`` also tries kernel settings and uses the fastest (the kernel's defaults in
``kernels/triton_scan.py`` come from such a run).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from ..output import cell, markdown_table, write_json
from . import common

SHAPES = [  # (B, H, T, Dh, dtype): the layer bench's shapes at 3000 tokens (float32, and bf16 as
    # GPU training runs it), a longer one, and a large one for bandwidth
    (64, 1, 3000, 128, "float32"),
    (64, 1, 3000, 128, "bfloat16"),
    (64, 1, 12000, 128, "float32"),
    (512, 1, 4096, 128, "float32"),
]
TUNE_SHAPES = [SHAPES[1], SHAPES[3]]  # the model's shape as trained, and the bandwidth one


def _inputs(B, H, T, D, device, n_sets, dtype="float32"):
    # several input sets, rotated, so that repeated calls do not run out of the L2 cache
    gen = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)
    return [((torch.randn(B, H, T, generator=gen, device=device) * 3).to(dt),
             torch.randn(B, H, T, D, generator=gen, device=device).to(dt),
             torch.randn(B, H, T, D, generator=gen, device=device).to(dt)) for _ in range(n_sets)]


def _packed(s, v):
    """sv (B, T, F) as the layer packs it: values, one score per head, zero columns up to a multiple of 8."""
    B, H, T, D = v.shape
    pad = -(H * D + H) % 8
    return torch.cat([v.transpose(1, 2).reshape(B, T, H * D), s.transpose(1, 2),
                      s.new_zeros(B, T, pad)], -1).contiguous()


def _plain_packed(sv, num_heads, head_dim):
    """The plain path of ``Aaren.forward`` on a packed projection (no padding)."""
    from ..layer import _readout, prefix_scan

    B, T, _ = sv.shape
    v = sv[..., :num_heads * head_dim].view(B, T, num_heads, head_dim).transpose(1, 2)
    s = sv[..., num_heads * head_dim:num_heads * (head_dim + 1)].transpose(1, 2)
    _, u, w = prefix_scan(s, torch.ones_like(s), v)
    return _readout(u, w)


def launch_overhead_us(device: str, n: int = 200) -> dict:
    """Host time per call of the kernel wrappers on a tiny input (no sync): launch cost."""
    import time

    from ..kernels import triton_scan as ts

    s, v, g = _inputs(1, 1, 8, 16, device, 1)[0]
    o, r, u = ts.scan_forward(s, v)
    ts.scan_backward(s, v, o, r, u, g)
    common.sync(device)
    out = {}
    for name, fn in (("fwd", lambda: ts.scan_forward(s, v)), ("bwd", lambda: ts.scan_backward(s, v, o, r, u, g))):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6
        common.sync(device)
    return out


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    x = torch.randn(int(gib * 2**30 / 4), device=device)
    y = torch.empty_like(x)
    ms = common.median(common.time_ms(lambda: y.copy_(x), device, warmup=3, repeats=20))
    return 2 * x.numel() * 4 / (ms / 1e3) / 1e9


def graphed_ms(calls, repeats: int) -> list[float]:
    """Device ms per call of ``calls`` (one per input set), run back to back as one CUDA graph:
    kernel time without the host's launch gaps, which at the model's shape (~0.2 ms) would
    otherwise be a large part of what CUDA events measure around a single call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = common.time_ms(graph.replay, "cuda", 3, repeats)
    del graph
    return [t / len(calls) for t in times]


def measure(B, H, T, D, dtype, device, fwd_cfg=None, bwd_cfg=None, plain=True, repeats=20):
    from ..kernels import triton_scan as ts

    n_sets = 1 if B * H * T * D * 4 > 2**30 else 3
    sets = _inputs(B, H, T, D, device, n_sets, dtype)
    size = sets[0][1].element_size()
    fwd_cfg, bwd_cfg = fwd_cfg or ts.DEFAULTS["fwd"], bwd_cfg or ts.DEFAULTS["bwd"]
    saved = [ts.scan_forward(s, v, **fwd_cfg) for s, v, _ in sets]
    fwd = [functools.partial(ts.scan_forward, s, v, **fwd_cfg) for s, v, _ in sets]
    bwd = [functools.partial(ts.scan_backward, s, v, *saved[i], g, **bwd_cfg) for i, (s, v, g) in enumerate(sets)]

    n = B * H * T
    tensor_bytes = n * D * size
    row = dict(B=B, H=H, T=T, Dh=D, dtype=dtype, fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg)
    row["triton_fwd_ms"] = common.median(graphed_ms(fwd, repeats))
    row["triton_bwd_ms"] = common.median(graphed_ms(bwd, repeats))
    row["fwd_bytes"] = 2 * tensor_bytes + n * (size + 8)  # v, o; s; r, u (float32)
    row["bwd_bytes"] = 4 * tensor_bytes + n * (2 * size + 8)  # g, o, v, dv; s, ds; r, u
    row["triton_fwd_GBps"] = row["fwd_bytes"] / (row["triton_fwd_ms"] / 1e3) / 1e9
    row["triton_bwd_GBps"] = row["bwd_bytes"] / (row["triton_bwd_ms"] / 1e3) / 1e9
    if plain:  # the layer's scan from its packed projection, fused and plain, both graphed
        from ..kernels import aaren_scan_packed

        s0, v0, g0 = sets[0]
        sv = _packed(s0, v0).requires_grad_()
        for name, scan in (("triton", aaren_scan_packed), ("plain", _plain_packed)):
            try:
                row[f"{name}_layer_fwd_ms"] = common.median(graphed_ms([lambda: scan(sv.detach(), H, D)], repeats))
                row[f"{name}_layer_fwd_bwd_ms"] = common.median(graphed_ms(
                    [lambda: torch.autograd.grad(scan(sv, H, D), sv, g0)], repeats))
            except torch.OutOfMemoryError:
                row[f"{name}_layer_fwd_ms"] = row[f"{name}_layer_fwd_bwd_ms"] = "oom"
                torch.cuda.empty_cache()
    del sets, saved
    torch.cuda.empty_cache()
    return row


def tune(shapes, device) -> dict:
    """Fastest kernel settings judged over all ``shapes`` (sum of times relative to each shape's
    best): first programs per multiprocessor with the Dh block (together they set how finely Dh
    and then T are split), then tokens per block and warps."""
    from ..kernels import triton_scan as ts

    best = {}
    for direction in ("fwd", "bwd"):
        key = f"triton_{direction}_ms"

        def time_cfg(shape, cfg):
            try:
                return measure(*shape, device, **{f"{direction}_cfg": cfg}, plain=False, repeats=10)[key]
            except Exception as e:  # e.g. out of registers / shared memory for a large tile
                print(f"  {direction} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                return float("inf")

        def pick(trials: dict, label: str) -> dict:
            floor = [min(col) for col in zip(*(t for _, t in trials.values()))]
            score = {k: sum(t / f for t, f in zip(times, floor)) for k, (_, times) in trials.items()}
            for k in sorted(score, key=score.get)[:4]:
                print(f"  {direction} {label} = {k}: " + ", ".join(f"{t:.3f}" for t in trials[k][1]) + " ms")
            return trials[min(score, key=score.get)][0]

        base = dict(ts.DEFAULTS[direction])
        trials = {}
        for pps, block_d in itertools.product((2, 4, 8, 16, 32), (None, 32, 64)):
            cfg = dict(base, programs_per_sm=pps, block_d=block_d)
            trials[pps, block_d] = (cfg, [time_cfg(shape, cfg) for shape in shapes])
        base = pick(trials, "programs_per_sm, block_d")
        trials = {}
        for block_t, warps in [(32, 2), (32, 4), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8)]:
            cfg = dict(base, block_t=block_t, num_warps=warps)
            trials[block_t, warps] = (cfg, [time_cfg(shape, cfg) for shape in shapes])
        best[direction] = pick(trials, "block_t, warps")
    return best


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tune", action="store_true", help="try kernel settings first, use the fastest")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/scan_cuda_MACHINE.json)")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("the scan benchmark times the Triton kernel, which needs a CUDA device")
    from ..kernels import triton_scan as ts

    device = "cuda"
    info = common.machine_info(device)
    copy = copy_bandwidth(device)
    overhead = launch_overhead_us(device)
    tuned = None
    if args.tune:
        tuned = tune(TUNE_SHAPES, device)
        ts.DEFAULTS.update(tuned)
        print(f"tuned: {tuned}")
    rows = [measure(*shape, device) for shape in SHAPES]
    path = args.json or common.RESULTS_DIR / f"scan_cuda_{common.machine_slug(info)}.json"
    write_json(path, dict(benchmark="scan", machine=info, copy_GBps=copy, tuned=tuned, config=ts.DEFAULTS,
                          launch_overhead_us=overhead, timing="every time a CUDA-graph replay", rows=rows))
    print(f"\n{info['gpu']}: device copy {copy:.0f} GB/s (read + write); host time per call "
          f"fwd {overhead['fwd']:.0f} µs, bwd {overhead['bwd']:.0f} µs; kernel settings {ts.DEFAULTS}")
    print("\nThe layer's scan from its packed projection (CUDA-graph replays, ms):\n")
    print(markdown_table(["B, H, T, Dh, dtype", "triton fwd", "plain fwd", "triton fwd+bwd", "plain fwd+bwd"], [
        [f"{r['B']}, {r['H']}, {r['T']}, {r['Dh']}, {r['dtype']}", cell(r.get("triton_layer_fwd_ms"), nd=3),
         cell(r.get("plain_layer_fwd_ms"), nd=3), cell(r.get("triton_layer_fwd_bwd_ms"), nd=3),
         cell(r.get("plain_layer_fwd_bwd_ms"), nd=3)] for r in rows]))
    print("\nThe Triton kernels alone (CUDA-graph replays):\n")
    print(markdown_table(["B, H, T, Dh, dtype", "fwd ms", "GB/s", "% copy", "bwd ms", "GB/s", "% copy"], [
        [f"{r['B']}, {r['H']}, {r['T']}, {r['Dh']}, {r['dtype']}", f"{r['triton_fwd_ms']:.3f}",
         f"{r['triton_fwd_GBps']:.0f}", f"{100 * r['triton_fwd_GBps'] / copy:.0f}%", f"{r['triton_bwd_ms']:.3f}",
         f"{r['triton_bwd_GBps']:.0f}", f"{100 * r['triton_bwd_GBps'] / copy:.0f}%"] for r in rows]))
    print(f"\nwrote {path}")
    return 0
