"""Aaren stack vs Transformer stack: training time, peak memory, and per-token acting cost.

Two measurements:

* **fwd+bwd**: a ``Backbone`` of 3 blocks, width 128, 1 head (Decision Transformer's defaults,
  dropout 0 so that only the mixers differ), one forward and one backward of a random batch,
  at sequence lengths 60, 600, 3000, 12000. Aaren runs with each scan backend that exists on the
  device: ``plain`` (the chunked scan of ``aaren_rl.layer``) and, on CUDA, ``triton`` (the fused
  kernel of ``aaren_rl.kernels``). The Transformer uses PyTorch's ``scaled_dot_product_attention``.
* **step** (batch 1, eval mode, no grad): the cost of acting one token at a time. Aaren's
  recurrent step (constant state); the Transformer's step with a key/value cache that already
  holds ``--history`` tokens; and the Transformer recomputing a window of 60 tokens each step
  (what Decision Transformer's evaluation does).

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one fwd+bwd, minus what was
allocated before it (model, optimizer-free grads of the last call, input): activations, saved
tensors and temporaries. On CPU there is no allocator counter, so every configuration runs in a
fresh subprocess and reports its peak resident set (``getrusage`` max RSS) minus its resident set
just before the first forward; that counts everything the process touched (allocator caching
and fragmentation included), so it is an upper bound of the same quantity, comparable between
configurations of one run but not to the CUDA numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..blocks import Backbone
from ..output import cell, markdown_table, write_json
from . import common

DT_DEFAULTS = dict(n_layer=3, embed_dim=128, num_heads=1)  # Decision Transformer (Chen et al., 2021)
LENGTHS = (60, 600, 3000, 12000)
GPU_BATCH = 64  # DT's batch size
CPU_TOKENS = 64 * 60  # on CPU the batch shrinks with length so each step holds about as many tokens


@dataclass
class Config:
    """One fwd+bwd measurement: which mixer and scan backend, which shape, on which device."""

    kind: str  # "aaren" or "transformer"
    backend: str  # "plain" / "triton" for aaren, "sdpa" for the transformer
    seq_len: int
    batch: int
    device: str
    n_layer: int = 3
    embed_dim: int = 128
    num_heads: int = 1
    warmup: int = 2
    repeats: int = 10
    budget_s: float = 30.0
    threads: int | None = None  # CPU: torch intra-op threads (None: torch's default)
    layer_checks: bool = True  # False: diagnostic, Aaren.forward skips its input check (a host sync)


@dataclass
class Result:
    config: dict
    status: str  # "ok", "oom", "timeout", "error: ..."
    ms: list[float] = field(default_factory=list)
    ms_median: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None


# ----------------------------------------------------------------------------------------------
# fwd+bwd


def _scan_backend(backend: str):
    """A context in which Aaren uses the named scan backend."""
    from .. import kernels

    return kernels.use_triton(backend == "triton")


@contextlib.contextmanager
def _layer_input_checks(on: bool):
    """Diagnostic switch: ``Aaren.forward`` checks its input for NaN/inf, which reads a flag back
    from the GPU (a host sync) in every layer; turning it off here measures what that costs.
    The backbone keeps its own check of the input (one sync per forward, in both stacks)."""
    from .. import layer

    original = layer.check_tokens
    if not on:
        layer.check_tokens = lambda *args, **kwargs: None
    try:
        yield
    finally:
        layer.check_tokens = original


def measure_fwd_bwd(cfg: Config) -> Result:
    """Time and peak memory of one forward + backward of the stack (in this process)."""
    device = cfg.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = Backbone(cfg.kind, cfg.n_layer, cfg.embed_dim, cfg.num_heads, dropout=0.0).to(device)
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.embed_dim, device=device)
    grad_y = torch.randn_like(x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x).backward(grad_y)

    with _scan_backend(cfg.backend), _layer_input_checks(cfg.layer_checks):
        try:
            times = common.time_ms(fwd_bwd, device, cfg.warmup, cfg.repeats, cfg.budget_s)
            peak = None
            if device == "cuda":
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        except torch.OutOfMemoryError:
            del model, x, grad_y
            torch.cuda.empty_cache()
            return Result(asdict(cfg), "oom")
    med = common.median(times)
    return Result(asdict(cfg), "ok", times, med, cfg.batch * cfg.seq_len / (med / 1e3), peak)


def count_launches(cfg: Config) -> dict:
    """Operators and device kernels in one fwd+bwd (torch.profiler): where launch overhead is the
    bottleneck (short sequences on a GPU), time follows these counts, not the arithmetic."""
    from torch.profiler import ProfilerActivity, profile

    device = cfg.device
    model = Backbone(cfg.kind, cfg.n_layer, cfg.embed_dim, cfg.num_heads, dropout=0.0).to(device)
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.embed_dim, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with _scan_backend(cfg.backend):
        for _ in range(3):
            model(x).sum().backward()
        common.sync(device)
        with profile(activities=activities) as prof:
            model(x).sum().backward()
            common.sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    aten = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    return dict(kind=cfg.kind, backend=cfg.backend, seq_len=cfg.seq_len, batch=cfg.batch,
                cuda_kernels=len(kernels), aten_ops=len(aten),
                top_level_aten_ops=len([e for e in aten if e.cpu_parent is None]))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _worker(cfg_json: str) -> None:
    """Subprocess entry (CPU): time one config and report peak RSS growth, as one JSON line."""
    cfg = Config(**json.loads(cfg_json))
    # a tiny run first, so that the code pages of the libraries it touches (oneDNN, ...) are
    # already resident and not counted as the configuration's memory
    measure_fwd_bwd(Config(cfg.kind, cfg.backend, 8, 1, "cpu", warmup=1, repeats=1))
    before = _rss_mb()
    res = measure_fwd_bwd(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # the model (0.6M parameters and their grads, ~5 MB) and the input are built after
    # ``before``, so they are counted in; small against the activations at long lengths
    res.peak_mem_mb = peak - before
    print("RESULT " + json.dumps(asdict(res)))


def measure_in_subprocess(cfg: Config, timeout_s: float) -> Result:
    cmd = [sys.executable, "-m", "aaren_rl.bench.layer", "--worker", json.dumps(asdict(cfg))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(asdict(cfg), f"timeout (>{timeout_s:.0f} s)")
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT "):]))
    if out.returncode < 0:  # killed, most likely by the kernel's out-of-memory killer
        return Result(asdict(cfg), f"oom (killed by signal {-out.returncode})")
    return Result(asdict(cfg), "error: " + (out.stderr.strip().splitlines() or ["?"])[-1][:200])


# ----------------------------------------------------------------------------------------------
# step, batch 1


@torch.inference_mode()
def measure_step(device: str = "cpu", history: int = 1000, window: int = 60, n_steps: int = 200) -> list[dict]:
    """Per-token acting cost at batch 1 (median over ``n_steps`` single steps, each timed)."""
    torch.manual_seed(0)
    E = DT_DEFAULTS["embed_dim"]
    tokens = torch.randn(1, history + n_steps, E, device=device)
    rows = []

    def timed(step_fn, label, state_bytes):
        times = []
        for i in range(n_steps + 10):
            common.sync(device)
            t0 = time.perf_counter()
            step_fn(i)
            common.sync(device)
            if i >= 10:  # the first steps warm up
                times.append((time.perf_counter() - t0) * 1e6)
        rows.append(dict(mode=label, us_median=common.median(times), us_min=min(times),
                         state_bytes=state_bytes(), n_steps=n_steps))

    for kind in ("aaren", "transformer"):
        model = Backbone(kind, dropout=0.0, **DT_DEFAULTS).to(device).eval()
        box = {"state": model.step(tokens[:, :history], model.init_state(1))[1]}  # prefill

        def one(i, model=model, box=box):
            _, box["state"] = model.step(tokens[:, history + i % n_steps], box["state"])

        label = "aaren recurrent step" if kind == "aaren" else f"transformer kv-cache step ({history}+ tokens)"
        timed(one, label, lambda box=box: sum(s.nbytes() for s in box["state"]))
        if kind == "transformer":
            def recompute(i, model=model):
                model(tokens[:, i: i + window])[:, -1]

            timed(recompute, f"transformer recompute {window}-token window",
                  lambda: window * E * tokens.element_size())
    return rows


# ----------------------------------------------------------------------------------------------
# the command


def configs(device: str, lengths, backends, batch: int | None, diag_no_layer_check=False, **kw):
    for T in lengths:
        B = batch or (GPU_BATCH if device == "cuda" else max(1, CPU_TOKENS // T))
        for kind, backend in [("aaren", b) for b in backends] + [("transformer", "sdpa")]:
            yield Config(kind, backend, T, B, device, **kw, **DT_DEFAULTS)
        if diag_no_layer_check:
            for backend in backends:
                yield Config("aaren", backend, T, B, device, layer_checks=False, **kw, **DT_DEFAULTS)


def available_backends(device: str) -> list[str]:
    from .. import kernels

    return ["plain", "triton"] if device == "cuda" and kernels.triton_available() else ["plain"]


def table_fwd_bwd(results: list[dict]) -> str:
    rows = []
    for r in results:
        c = r["config"]
        mixer = f"{c['kind']} ({c['backend']}{'' if c.get('layer_checks', True) else ', no layer check'})"
        ok = r["status"] == "ok"
        rows.append([c["seq_len"], c["batch"], mixer, cell(r["ms_median"] if ok else r["status"]),
                     cell(r["tokens_per_s"], nd=0), cell(r["peak_mem_mb"], nd=1)])
    return markdown_table(["tokens", "batch", "mixer", "fwd+bwd ms", "tokens/s", "peak MB"], rows, "rrlrrr")


def table_step(rows: list[dict]) -> str:
    return markdown_table(["mode (batch 1)", "µs per token (median)", "state bytes"],
                          [[r["mode"], f"{r['us_median']:.0f}", r["state_bytes"]] for r in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to time the stacks (default: cuda if available, else cpu)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths in tokens")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default: {GPU_BATCH} on CUDA; {CPU_TOKENS} tokens / length on CPU)")
    p.add_argument("--backend", choices=["all", "plain", "triton"], default="all",
                   help="Aaren scan backend(s) to time (default: every one available on the device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a config after this long")
    p.add_argument("--timeout-s", type=float, default=240.0, help="CPU: give up on a config after this long")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on CPU: the machine is shared, and one thread per "
                        "process gives steadier numbers than two threads fighting another job for two cores)")
    p.add_argument("--tune-scan", action="store_true",
                   help="CUDA: first try the Triton kernel's block shapes at (64, 1, 3000, 128), use the fastest")
    p.add_argument("--scan-config", default=None,
                   help="CUDA: use the kernel block shapes under 'tuned' in this JSON (from 'bench scan --tune')")
    p.add_argument("--diag-no-layer-check", action="store_true",
                   help="diagnostic: also time Aaren without its per-layer input check (a host sync)")
    p.add_argument("--count-launches", action="store_true",
                   help="also count operators and CUDA kernels in one fwd+bwd at the shortest length")
    p.add_argument("--no-step", action="store_true", help="skip the batch-1 step measurement")
    p.add_argument("--history", type=int, default=1000, help="tokens in the KV cache before timing steps")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/layer_DEVICE_MACHINE.json)")


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    backends = available_backends(device) if args.backend == "all" else [args.backend]
    repeats = args.repeats or (20 if device == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    info = common.machine_info(device)
    tuned = None
    if args.tune_scan and "triton" in backends:
        from ..kernels import triton_scan
        from .scan import tune

        tuned = tune([(GPU_BATCH, DT_DEFAULTS["num_heads"], 3000, DT_DEFAULTS["embed_dim"] // DT_DEFAULTS["num_heads"])],
                     device)
        triton_scan.DEFAULTS.update(tuned)
    if args.scan_config and "triton" in backends:
        from ..kernels import triton_scan

        tuned = json.load(open(args.scan_config)).get("tuned")
        triton_scan.DEFAULTS.update(tuned or {})
    if "triton" in backends:
        from ..kernels import triton_scan

        info["scan_kernel_config"] = triton_scan.DEFAULTS
    results = []
    for cfg in configs(device, args.lengths, backends, args.batch, warmup=warmup, repeats=repeats,
                       budget_s=args.budget_s, threads=threads, diag_no_layer_check=args.diag_no_layer_check):
        if device == "cpu":
            res = measure_in_subprocess(cfg, args.timeout_s)
        else:
            res = measure_fwd_bwd(cfg)
        results.append(asdict(res))
        print(f"  {cfg.kind:11s} {cfg.backend:6s} T={cfg.seq_len:6d} B={cfg.batch:3d}: "
              f"{cell(res.ms_median if res.status == 'ok' else res.status)} ms, "
              f"peak {cell(res.peak_mem_mb, nd=1)} MB", flush=True)
    launches = []
    if args.count_launches:
        T = min(args.lengths)
        B = args.batch or (GPU_BATCH if device == "cuda" else max(1, CPU_TOKENS // T))
        for kind, backend in [("aaren", b) for b in backends] + [("transformer", "sdpa")]:
            launches.append(count_launches(Config(kind, backend, T, B, device, **DT_DEFAULTS)))
            print(f"  launches {launches[-1]}", flush=True)
    steps = [] if args.no_step else measure_step(device, history=args.history)
    payload = dict(
        benchmark="layer", machine=info, model=DT_DEFAULTS, dropout=0.0,
        peak_memory_method=("torch.cuda.max_memory_allocated during one fwd+bwd, minus allocated before"
                            if device == "cuda" else
                            "subprocess per config: getrusage max RSS minus RSS after a tiny warm-up run, before building the model"),
        fwd_bwd=results, step=steps, launches=launches,
    )
    path = args.json or common.RESULTS_DIR / f"layer_{device}_{common.machine_slug(info)}.json"
    write_json(path, payload)
    print(f"\n{info.get('gpu') or info['cpu']} ({device}), torch {info['torch']}\n")
    print(table_fwd_bwd(results))
    if steps:
        print()
        print(table_step(steps))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(parser)
        sys.exit(run(parser.parse_args()))
