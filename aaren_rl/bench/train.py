"""Training throughput: updates per second of the whole training step, eager vs fast paths.

How long a 100k-update run takes at batch 64, K = 20, and how the Aaren stack's forward+backward
compares with the Transformer stack's. Two measurements:

* **update**: ``train.UpdateStep`` exactly as ``train()`` runs it (sample a batch on the GPU by
  tensor indexing, forward in bf16 autocast, loss, backward, clip, AdamW, schedule), for
  Decision Aaren with episode context (1000-step episodes: 3000 tokens) and window context
  (K = 20: 60 tokens) and for the Decision Transformer (K = 20), DT's sizes (3 layers, width
  128, 1 head, dropout 0.1), obs dim 17 / act dim 6 (HalfCheetah's), synthetic 1000-step
  episodes built in memory. Each compile mode (``TrainConfig.compile``) runs the same seeded
  updates: the first few losses are read one by one and compared with eager mode's (the
  correctness check), then ``rounds`` rounds of ``updates`` updates are timed with one sync at
  the end of each round (host overhead included: this is the real throughput). Peak memory is
  ``max_memory_allocated`` minus what the dataset held before the model was built.
* **stack**: ``Backbone`` fwd+bwd (as ``bench layer``: dropout 0, random input and output
  gradient) at 60 and 3000 tokens, eager and replayed from a CUDA graph, in float32 and in bf16
  autocast; median of CUDA-event timings.
* **profile** (``--profile-lengths``): the compiled bf16 stacks' kernel times from
  ``torch.profiler``, grouped into the mixer, matrix products and the rest: what a faster mixer
  can and cannot change.
"""

from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..blocks import Backbone
from ..output import cell, markdown_table, write_json
from . import common
from .layer import DT_DEFAULTS, _scan_backend

AGENTS = {  # name: model overrides, batch size
    "decision_aaren/episode": (dict(backbone="aaren", context="episode"), 64),
    "decision_aaren/window": (dict(backbone="aaren", context="window", context_len=20), 64),
    "decision_transformer/window": (dict(backbone="transformer", context="window", context_len=20), 64),
    "decision_aaren/episode-b16": (dict(backbone="aaren", context="episode"), 16),  # the preset's batch
}


def synthetic_dataset(episodes: int = 200, episode_len: int = 1000, obs_dim: int = 17, act_dim: int = 6,
                      seed: int = 0):
    """HalfCheetah-shaped random episodes (no simulator needed): only shapes matter for speed."""
    from ..data import Episode, TrajectoryDataset

    rng = np.random.default_rng(seed)
    eps = [Episode(observations=rng.normal(size=(episode_len, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(episode_len, act_dim)).astype(np.float32),
                   rewards=rng.normal(1.0, 1.0, size=episode_len).astype(np.float32), truncated=True)
           for _ in range(episodes)]
    return TrajectoryDataset(eps, action_low=-np.ones(act_dim), action_high=np.ones(act_dim), name="synthetic")


def build_update(agent: str, mode: str, dataset, device: torch.device, batch: int | None = None, seed: int = 0,
                 amp: bool = True):
    """The model and an ``UpdateStep`` as ``train()`` sets them up (``train.make_update_step``)."""
    from ..train import TrainConfig, make_update_step, model_config_for

    overrides, default_batch = AGENTS[agent]
    mc = model_config_for(dataset, **overrides)
    tc = TrainConfig(batch_size=batch or default_batch, compile=mode, seed=seed, amp=amp)
    update = make_update_step(mc, tc, dataset, device)
    return update.model, update, tc.batch_size


@dataclass
class UpdateResult:
    agent: str
    mode: str
    batch: int
    tokens: int
    amp: bool = True  # bf16 autocast (False: float32 throughout)
    status: str = "ok"
    updates_per_s: float | None = None
    ms_per_update: float | None = None
    rounds_updates_per_s: list | None = None
    first_losses: list | None = None
    max_rel_loss_diff_vs_eager: float | None = None
    setup_s: float | None = None  # the checked updates: warm-up, capture, compilation
    peak_mem_mb: float | None = None
    kernels_per_update: int | None = None


def count_kernels(update) -> int:
    """CUDA kernels launched by one (eager) update, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        update._update()  # the update itself, not the graph replay: what a graph holds
        torch.cuda.synchronize()
    return len([e for e in prof.events() if e.device_type.name == "CUDA"])


def measure_update(agent: str, mode: str, dataset, device: torch.device, updates: int, rounds: int,
                   check: int = 6, batch: int | None = None, kernels: bool = False, amp: bool = True) -> UpdateResult:
    overrides, _ = AGENTS[agent]
    steps = overrides.get("context_len", dataset.max_episode_length) if overrides["context"] == "window" \
        else dataset.max_episode_length
    res = UpdateResult(agent, mode, batch or AGENTS[agent][1], 3 * steps, amp)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    model, update, res.batch = build_update(agent, mode, dataset, device, batch, amp=amp)
    losses = []
    for _ in range(check):  # the correctness check: one sync per update, not timed
        update()
        losses.append(update.pop_mean_loss())
    res.setup_s = time.perf_counter() - t0
    res.first_losses = losses
    rates = []
    for _ in range(rounds):
        common.sync(str(device.type))
        t = time.perf_counter()
        for _ in range(updates):
            update()
        update.pop_mean_loss()  # the sync that ends the round, as a log line would
        rates.append(updates / (time.perf_counter() - t))
    res.rounds_updates_per_s = rates
    res.updates_per_s = common.median(rates)
    res.ms_per_update = 1e3 / res.updates_per_s
    if cuda:
        torch.cuda.synchronize()
        res.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        if kernels and mode == "none" and amp:
            res.kernels_per_update = count_kernels(update)
    del model, update
    return res


# ----------------------------------------------------------------------------------------------
# the stack alone


@dataclass
class StackResult:
    kind: str
    seq_len: int
    batch: int
    graphed: bool
    dtype: str
    compiled: bool = False  # torch.compile(model) before the graph is captured
    status: str = "ok"
    ms_median: float | None = None
    ms: list | None = None
    peak_mem_mb: float | None = None


def measure_stack(kind: str, seq_len: int, batch: int, graphed: bool, amp: bool, repeats: int = 20,
                  compiled: bool = False) -> StackResult:
    """fwd+bwd of ``Backbone(kind, 3, 128, 1)`` on CUDA, eager or replayed from a CUDA graph
    (``compiled``: of the torch.compile'd stack)."""
    res = StackResult(kind, seq_len, batch, graphed, "bf16 autocast" if amp else "float32", compiled)
    device = "cuda"
    torch.manual_seed(0)
    module = Backbone(kind, dropout=0.0, **DT_DEFAULTS).to(device)
    model = torch.compile(module, dynamic=False) if compiled else module
    x = torch.randn(batch, seq_len, DT_DEFAULTS["embed_dim"], device=device)
    grad_y = torch.randn_like(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=not graphed):
            y = model(x)
        y.backward(grad_y)

    with _scan_backend("triton" if kind == "aaren" else "sdpa"):
        fwd_bwd()  # first call: kernels compiled, library workspaces allocated; not counted
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        res.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        if graphed:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fwd_bwd()
            torch.cuda.current_stream().wait_stream(side)
            module.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                    y = model(x)
                y.backward(grad_y)
            times = common.time_ms(graph.replay, device, warmup=3, repeats=repeats)
        else:
            times = common.time_ms(fwd_bwd, device, warmup=3, repeats=repeats)
    res.ms, res.ms_median = times, common.median(times)
    return res


def _kernel_group(name: str) -> str:
    n = name.lower()
    if "_scan_" in n or "_totals_kernel" in n:
        return "mixer"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "mixer"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv", "splitkreduce")):
        return "matrix products"
    return "rest"


def profile_stack(kind: str, seq_len: int, batch: int = 64, calls: int = 5) -> dict:
    """Kernel time (ms per fwd+bwd, from ``torch.profiler``) of the compiled bf16 stack, grouped
    into the mixer (Aaren's scan kernels / attention), matrix products and the rest (Inductor's
    fused elementwise kernels: norms, GELU, residuals, casts; Aaren's ds share sum is one of them),
    with the ten largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = Backbone(kind, dropout=0.0, **DT_DEFAULTS).to("cuda")
    model = torch.compile(module, dynamic=False)
    x = torch.randn(batch, seq_len, DT_DEFAULTS["embed_dim"], device="cuda")
    grad_y = torch.randn_like(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = model(x)
        y.backward(grad_y)

    with _scan_backend("triton" if kind == "aaren" else "sdpa"):
        for _ in range(3):
            fwd_bwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fwd_bwd()
            torch.cuda.synchronize()
    groups, kernels = {"mixer": 0.0, "matrix products": 0.0, "rest": 0.0}, {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or 0
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            ms = us / calls / 1e3
            groups[_kernel_group(e.key)] += ms
            kernels[e.key[:100]] = kernels.get(e.key[:100], 0.0) + ms
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:10])
    return dict(kind=kind, seq_len=seq_len, batch=batch, dtype="bf16 autocast", launch="torch.compile",
                total_ms=sum(groups.values()), groups=groups, top_kernels=top)


# ----------------------------------------------------------------------------------------------
# tables


def table_updates(rows: list[dict]) -> str:
    eager = {r["agent"]: r for r in rows if r["mode"] == "none" and r["amp"] and r["status"] == "ok"}
    header = ["agent", "batch", "tokens", "mode", "updates/s", "ms/update", "vs eager", "100k updates",
              "max rel. loss diff vs eager", "peak MB"]
    out = []
    for r in rows:
        mode = r["mode"] + ("" if r["amp"] else " (float32)")
        if r["status"] != "ok":
            out.append([r["agent"], r["batch"], r["tokens"], mode, r["status"][:60]] + [""] * 5)
            continue
        e = eager.get(r["agent"])
        speedup = f"{r['updates_per_s'] / e['updates_per_s']:.1f}x" if e else "-"
        out.append([r["agent"], r["batch"], r["tokens"], mode, f"{r['updates_per_s']:.0f}", f"{r['ms_per_update']:.2f}",
                    speedup, f"{1e5 / r['updates_per_s'] / 60:.1f} min", cell(r["max_rel_loss_diff_vs_eager"], nd=4),
                    cell(r["peak_mem_mb"], nd=0)])
    return markdown_table(header, out, "lrrl" + "r" * 6)


def _launch(r: dict) -> str:
    if r.get("compiled"):
        return "torch.compile + CUDA graph" if r["graphed"] else "torch.compile"
    return "CUDA graph" if r["graphed"] else "eager"


def table_stack(rows: list[dict]) -> str:
    by = {(r["kind"], r["seq_len"], _launch(r), r["dtype"]): r for r in rows}
    header = ["tokens", "dtype", "launch", "Aaren ms", "Transformer ms", "Aaren / Transformer", "Aaren MB",
              "Transformer MB"]
    out = []
    for (kind, T, launch, dtype), a in by.items():
        if kind != "aaren":
            continue
        t = by.get(("transformer", T, launch, dtype))
        ok = a["status"] == "ok" and t is not None and t["status"] == "ok"
        out.append([T, dtype, launch, cell(a["ms_median"] if a["status"] == "ok" else a["status"][:40]),
                    cell(t["ms_median"] if t and t["status"] == "ok" else (t or {}).get("status", "-")[:40]),
                    f"{a['ms_median'] / t['ms_median']:.2f}" if ok else "-", cell(a["peak_mem_mb"], nd=0),
                    cell((t or {}).get("peak_mem_mb"), nd=0)])
    return markdown_table(header, out, "rll" + "r" * 5)


def table_profile(rows: list[dict]) -> str:
    header = ["tokens", "stack", "mixer ms", "matrix products ms", "rest ms", "total kernel ms"]
    return markdown_table(header, [[r["seq_len"], r["kind"], f"{r['groups']['mixer']:.3f}",
                                    f"{r['groups']['matrix products']:.3f}", f"{r['groups']['rest']:.3f}",
                                    f"{r['total_ms']:.3f}"] for r in rows], "rl" + "r" * 4)


# ----------------------------------------------------------------------------------------------
# the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train (default: cuda if available, else cpu)")
    p.add_argument("--agents", nargs="+", choices=list(AGENTS), default=list(AGENTS), help="agents to time")
    p.add_argument("--modes", nargs="+", default=None,
                   help="compile modes (default on CUDA: none cudagraph torch.compile torch.compile+cudagraph; "
                        "on CPU: none)")
    p.add_argument("--compile-agents", nargs="*", choices=list(AGENTS),
                   default=["decision_aaren/window", "decision_transformer/window"],
                   help="agents timed with the torch.compile modes (compiling takes a minute or more each)")
    p.add_argument("--batch", type=int, default=None, help="override every agent's batch size")
    p.add_argument("--updates", type=int, default=300, help="updates per timed round (window context)")
    p.add_argument("--episode-updates", type=int, default=20, help="updates per timed round (episode context)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting")
    p.add_argument("--episodes", type=int, default=200, help="synthetic episodes")
    p.add_argument("--episode-len", type=int, default=1000, help="steps per synthetic episode")
    p.add_argument("--stack-lengths", type=int, nargs="*", default=[60, 3000],
                   help="CUDA: stack fwd+bwd lengths (none: skip)")
    p.add_argument("--stack-modes", nargs="*", default=["eager", "cudagraph"],
                   choices=["eager", "cudagraph", "torch.compile+cudagraph"], help="CUDA: how the stacks run")
    p.add_argument("--stack-dtypes", nargs="*", default=["float32", "bf16"], choices=["float32", "bf16"],
                   help="CUDA: the stacks' precisions")
    p.add_argument("--fp32-graph", action="store_true", help="also time the CUDA-graph update in float32")
    p.add_argument("--profile-lengths", type=int, nargs="*", default=[],
                   help="also profile the compiled bf16 stacks' kernels at these token counts "
                        "(time by group: mixer, matrix products, the rest)")
    p.add_argument("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/train_DEVICE_MACHINE.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    modes = args.modes or (["none", "cudagraph", "torch.compile", "torch.compile+cudagraph"]
                           if device.type == "cuda" else ["none"])
    info = common.machine_info(device.type)
    path = args.json or common.RESULTS_DIR / f"train_{device.type}_{common.machine_slug(info)}.json"
    t_start = time.perf_counter()
    dataset = synthetic_dataset(args.episodes, args.episode_len).to(device)
    updates, stack, profiles = [], [], []

    def out_of_time() -> bool:
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    def save():
        write_json(path, dict(
            benchmark="train", machine=info, model=dict(DT_DEFAULTS, dropout=0.1, obs_dim=17, act_dim=6),
            dataset=dict(episodes=args.episodes, episode_len=args.episode_len, synthetic=True),
            method=("updates/s: median over rounds of N updates, one sync per round (a log line); first "
                    "losses read one per update and compared with mode 'none'. stack: median of CUDA-event "
                    "times of one fwd+bwd; peak memory: max_memory_allocated minus allocated before"),
            updates=updates, stack=stack, profile=profiles))

    def one_update(agent, mode, amp=True):
        if out_of_time():
            r = UpdateResult(agent, mode, args.batch or AGENTS[agent][1], 0, amp, status="skipped: time budget")
        else:
            n = args.updates if AGENTS[agent][0]["context"] == "window" else args.episode_updates
            try:
                r = measure_update(agent, mode, dataset, device, n, args.rounds, batch=args.batch,
                                   kernels=device.type == "cuda", amp=amp)
            except Exception as e:  # noqa: BLE001 -- one failing mode must not lose the others
                traceback.print_exc()
                r = UpdateResult(agent, mode, args.batch or AGENTS[agent][1], 0, amp,
                                 status=f"error: {type(e).__name__}: {e}"[:300])
        eager = next((u for u in updates if u["agent"] == agent and u["mode"] == "none" and u["amp"]
                      and u["status"] == "ok"), None)
        if r.status == "ok" and eager and (mode != "none" or not amp):
            a, b = np.array(r.first_losses), np.array(eager["first_losses"])
            r.max_rel_loss_diff_vs_eager = float(np.max(np.abs(a - b) / np.abs(b)))
        updates.append(asdict(r))
        rate = r.status if r.status != "ok" else f"{r.updates_per_s:8.1f} updates/s"
        print(f"  {agent:30s} {mode:24s} {'bf16' if amp else 'fp32'} {rate}  "
              f"losses {['%.4f' % x for x in (r.first_losses or [])]}", flush=True)
        save()

    first, rest = [m for m in modes if "torch.compile" not in m], [m for m in modes if "torch.compile" in m]
    for mode in first:
        for agent in args.agents:
            one_update(agent, mode)
    if device.type == "cuda" and "cudagraph" in first and args.fp32_graph:  # does bf16 pay here? (casts)
        for agent in args.agents:
            if AGENTS[agent][0]["context"] == "window":
                one_update(agent, "cudagraph", amp=False)
    if device.type == "cuda":
        launches = {"eager": (False, False), "cudagraph": (True, False), "torch.compile+cudagraph": (True, True)}
        for T in args.stack_lengths or []:
            for amp in [d == "bf16" for d in args.stack_dtypes]:
                for graphed, compiled in [launches[m] for m in args.stack_modes]:
                    for kind in ("aaren", "transformer"):
                        dtype = "bf16 autocast" if amp else "float32"
                        if out_of_time():
                            r = StackResult(kind, T, 64, graphed, dtype, compiled, status="skipped: time budget")
                        else:
                            try:
                                r = measure_stack(kind, T, 64, graphed, amp, compiled=compiled)
                            except Exception as e:  # noqa: BLE001
                                traceback.print_exc()
                                r = StackResult(kind, T, 64, graphed, dtype, compiled,
                                                status=f"error: {type(e).__name__}: {e}"[:300])
                        stack.append(asdict(r))
                        print(f"  stack {kind:11s} T={T:5d} {r.dtype:13s} {_launch(asdict(r))}: "
                              f"{cell(r.ms_median if r.status == 'ok' else r.status)} ms", flush=True)
                        save()
    for mode in rest:
        for agent in args.compile_agents or []:
            one_update(agent, mode)
    if device.type == "cuda":
        for T in args.profile_lengths:
            for kind in ("aaren", "transformer"):
                if not out_of_time():
                    profiles.append(profile_stack(kind, T))
                    print(f"  profile {kind:11s} T={T:5d}: {profiles[-1]['total_ms']:.3f} kernel ms", flush=True)
                    save()
    save()
    print(f"\n{info.get('gpu') or info['cpu']} ({device.type}), torch {info['torch']}, triton {info.get('triton')}\n")
    print(table_updates(updates))
    if stack:
        print()
        print(table_stack(stack))
    if profiles:
        print()
        print(table_profile(profiles))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
