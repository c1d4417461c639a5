"""Acting cost of a whole agent, one environment step at a time, on the CPU.

``--engine onnxruntime`` runs every policy in ONNX Runtime instead (``bench/step_onnxruntime.py``);
what follows is the default engine, PyTorch with the compiled C step.

The agents have Decision Transformer's MuJoCo setting (3 layers, width 128, 1 head, K = 20) and
HalfCheetah's shapes (observation 17, action 6); ``--shape memory`` gives the memory task's agents
instead (``aaren_rl.memory``, docs/results.md: width 64, observation 3, 2 discrete actions). All of
them run in one process, one torch thread, eval mode, through ``StreamingPolicy.predict`` (input
checks and episode bookkeeping included). They are timed in interleaved rounds, so that a change
in the machine's load hits all of them alike:

* ``aaren_compiled``: Decision Aaren with the compiled C step as its backend (``backends.CompiledStep``,
  the default on a CPU with a C compiler).
* ``aaren_compiled_bf16``: the same with the layers' weights in bfloat16 (AVX512_BF16 CPUs only;
  not exact: the optional variant).
* ``aaren_torch``: Decision Aaren with the PyTorch backend, (a_{t-1}, R_t, s_t) as one 3-token
  chunk through ``Backbone.step``.
* ``dt_window``: the Decision Transformer baseline as DT evaluates it: recompute the last K = 20
  timesteps (60 tokens) at every step.
* ``dt_kvcache``: the Decision Transformer with a key/value cache that holds the whole episode,
  timed at t = ``--history`` (3 x history tokens in the cache).

Every policy is first run for ``--history`` steps. The DT cache is timed from that fixed state
(a copy, made before each timed call, so that the cache does not grow while it is timed); the
others run on (their cost does not depend on t). Each sample is one call; the table gives
medians. glibc is told to serve large blocks from its heap (``--malloc heap``, see
``heap_allocations``), which makes the DT cache step ~3x faster than with the default allocator
settings.

Memory: the Aaren policy runs for ``--aaren-steps`` environment steps (one episode; the
timestep embedding clamps after ``max_timestep``), recording its state bytes, the process's
resident set and the step time at log-spaced steps; the DT policy with a cache runs for up to
``--dt-steps`` steps (or ``--memory-budget-s``), recording its cache bytes the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..model import DecisionModel, ModelConfig
from ..policy import StreamingPolicy
from ..output import markdown_table, write_json
from . import common

# the agents' shapes: observation and action dims, width, whether actions are discrete, the target
# return they are conditioned on
SHAPES = {
    "halfcheetah": dict(obs_dim=17, act_dim=6, embed_dim=128, discrete=False, target_return=6000.0),  # DT's target
    "memory": dict(obs_dim=3, act_dim=2, embed_dim=64, discrete=True, target_return=1.0),  # bsuite memory_len
}
OBS_DIM, ACT_DIM = SHAPES["halfcheetah"]["obs_dim"], SHAPES["halfcheetah"]["act_dim"]
TARGET_RETURN = SHAPES["halfcheetah"]["target_return"]
METHODS = ("aaren_compiled", "aaren_compiled_bf16", "aaren_torch", "dt_window", "dt_kvcache")
LABELS = {
    "aaren_compiled": "Decision Aaren, compiled C step",
    "aaren_compiled_bf16": "Decision Aaren, compiled C step, bf16 weights (inexact)",
    "aaren_torch": "Decision Aaren, PyTorch step (eager)",
    "dt_window": "Decision Transformer, window recompute (K = 20, eager)",
    "dt_kvcache": "Decision Transformer, key/value cache (eager)",
}


def make_model(backbone: str, seed: int = 0, shape: str = "halfcheetah") -> DecisionModel:
    torch.manual_seed(seed)
    sh = SHAPES[shape]
    obs, act = sh["obs_dim"], sh["act_dim"]
    bounds = {} if sh["discrete"] else dict(action_low=[-1.0] * act, action_high=[1.0] * act)
    cfg = ModelConfig(backbone=backbone, context="episode", context_len=20, observation_dim=obs, action_dim=act,
                      embed_dim=sh["embed_dim"], discrete=sh["discrete"], **bounds)
    rng = np.random.default_rng(seed)
    model = DecisionModel(cfg, obs_mean=torch.as_tensor(rng.normal(size=obs), dtype=torch.float32),
                          obs_std=torch.as_tensor(rng.uniform(0.5, 2, obs), dtype=torch.float32))
    model.target_return = sh["target_return"]  # what the benchmark's policies are conditioned on
    return model.eval()


def heap_allocations() -> bool:
    """Make glibc serve large blocks from its heap instead of fresh mmaps (M_MMAP_THRESHOLD 32 MiB,
    M_TRIM_THRESHOLD 64 MiB). A KV cache grown by torch.cat asks for a slightly larger block at
    every step, which by default is always a new mmap whose pages fault in again: measured here,
    that tripled the Transformer's cached step at t = 1000 (11.5 vs 3.5-4 ms). The baselines get
    the faster setting. Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 64 << 20))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Inputs:
    """A small pool of observations and rewards, cycled (no random numbers drawn while timing)."""

    def __init__(self, n: int, seed: int = 0, obs_dim: int = OBS_DIM):
        rng = np.random.default_rng(seed)
        self.obs = rng.normal(size=(64, n, obs_dim)).astype(np.float32)
        self.rew = rng.normal(size=(64, n)).astype(np.float32)
        self.i = 0

    def next(self):
        self.i = (self.i + 1) & 63
        return self.obs[self.i], self.rew[self.i]


def make_stepper(method: str, n: int, history: int, models: dict):
    """A callable doing one environment step of ``method`` for ``n`` envs, after ``history`` steps.
    Its ``prepare`` (if any) runs untimed before each timed call."""
    from ..backends import CompiledStep

    model = models["transformer" if method.startswith("dt") else "aaren"]
    inp = Inputs(n, obs_dim=model.config.observation_dim)
    mode = "window" if method == "dt_window" else "recurrent"
    backend = {"aaren_compiled": "compiled", "aaren_torch": "torch"}.get(method, "auto")
    if method == "aaren_compiled_bf16":
        backend = CompiledStep(model, precision="bfloat16")
    policy = StreamingPolicy(model, model.target_return, mode=mode, backend=backend)
    state = None
    warm = min(history, 3 * policy.model.config.context_len) if method == "dt_window" else history  # full after K
    for t in range(warm):
        o, r = inp.next()
        _, state = policy.predict(o, state, reward=None if t == 0 else r)
    fixed, current = state, [state]

    def step():
        o, r = inp.next()
        policy.predict(o, current[0], reward=r)

    if method == "dt_kvcache":  # time it at t = history: each call from a copy of that state
        step.prepare = lambda: current.__setitem__(0, fixed.copy())
    step.state_bytes = policy.state_nbytes(fixed)
    return step


def time_interleaved(steppers: dict, rounds: int, block_s: float) -> dict[str, list[float]]:
    """Per-call times in us: ``rounds`` rounds, each giving every stepper about ``block_s`` seconds."""
    samples = {k: [] for k in steppers}
    for fn in steppers.values():  # warm-up
        for _ in range(3):
            getattr(fn, "prepare", lambda: None)()
            fn()
    for _ in range(rounds):
        for key, fn in steppers.items():
            prepare = getattr(fn, "prepare", None)
            t_end = time.perf_counter() + block_s
            while True:
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                samples[key].append((t1 - t0) * 1e6)
                if t1 > t_end:
                    break
    return samples


def log_points(n: int, per_decade: int = 4) -> list[int]:
    pts = {int(round(10 ** (i / per_decade))) for i in range(int(per_decade * math.log10(max(n, 1))) + 1)}
    return sorted(p for p in pts | {n} if 1 <= p <= n)


def memory_aaren(model, steps: int, time_block: int = 200) -> dict:
    """Run the Aaren policy for ``steps`` steps; at log-spaced steps: state bytes, RSS, step time."""
    policy = StreamingPolicy(model, model.target_return)
    inp = Inputs(1, obs_dim=model.config.observation_dim)
    o, _ = inp.next()
    _, state = policy.predict(o)
    points = log_points(steps)
    rows, step, t_start = [], 0, time.perf_counter()
    rss0 = rss_bytes()
    for p in points:
        while step < p:
            o, r = inp.next()
            policy.predict(o, state, reward=r)
            step += 1
        times = []
        for _ in range(time_block if p < steps else 0):  # timed steps count as steps seen
            o, r = inp.next()
            t0 = time.perf_counter()
            policy.predict(o, state, reward=r)
            times.append((time.perf_counter() - t0) * 1e6)
            step += 1
        rows.append({"step": p, "state_bytes": policy.state_nbytes(state), "rss_bytes": rss_bytes(),
                     "us_per_step": statistics.median(times) if times else None})
    return {"steps": step, "seconds": time.perf_counter() - t_start, "rss_start_bytes": rss0, "points": rows}


def memory_transformer(model, steps: int, budget_s: float) -> dict:
    """The DT policy with a whole-episode cache: cache bytes, RSS and step time as it grows."""
    policy = StreamingPolicy(model, model.target_return, mode="recurrent")
    inp = Inputs(1, obs_dim=model.config.observation_dim)
    points = set(log_points(steps))
    rows, state, times, t_start = [], None, [], time.perf_counter()
    rss0 = rss_bytes()
    step = 0
    while step < steps:
        o, r = inp.next()
        t0 = time.perf_counter()
        _, state = policy.predict(o, state, reward=None if step == 0 else r)
        times.append((time.perf_counter() - t0) * 1e6)
        step += 1
        over = time.perf_counter() - t_start > budget_s
        if step in points or over:
            rows.append({"step": step, "cache_bytes": policy.state_nbytes(state), "rss_bytes": rss_bytes()})
        if over:
            break
    for row in rows:  # the step time around each point: the median over the next ~5% of steps (at least 9)
        p = row["step"]
        row["us_per_step"] = statistics.median(times[p - 1:p - 1 + max(9, p // 20)])
    return {"steps": step, "seconds": time.perf_counter() - t_start, "stopped_by_budget": step < steps,
            "rss_start_bytes": rss0, "points": rows}


def plot(payload: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m, ax_r) = plt.subplots(1, 3, figsize=(16, 6))
    ma, mt = payload["memory"]["aaren_compiled"], payload["memory"]["dt_kvcache"]
    pa = [p for p in ma["points"] if p["us_per_step"] is not None]
    ax_t.plot([p["step"] for p in pa], [p["us_per_step"] for p in pa], "o-", label=LABELS["aaren_compiled"])
    ax_t.plot([p["step"] for p in mt["points"]], [p["us_per_step"] for p in mt["points"]], "s-", label=LABELS["dt_kvcache"])
    b1 = {r["method"]: r for r in payload["timing"] if r["batch"] == 1}
    for key, style in (("dt_window", "--"), ("aaren_torch", ":")):
        if key in b1:
            ax_t.axhline(b1[key]["us_per_env_step"], ls=style, color="gray", label=LABELS[key] + " (flat in t)")
    ax_t.set(xscale="log", yscale="log", xlabel="environment steps seen", ylabel="us per environment step (batch 1, median)",
             title="time per environment step")
    ax_t.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    ax_m.plot([p["step"] for p in ma["points"]], [p["state_bytes"] for p in ma["points"]], "o-", label="Decision Aaren: state (m, u, w)")
    ax_m.plot([p["step"] for p in mt["points"]], [p["cache_bytes"] for p in mt["points"]], "s-",
              label="Decision Transformer: key/value cache")
    ax_m.set(xscale="log", yscale="log", xlabel="environment steps seen", ylabel="bytes", title="recurrent state")
    ax_m.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax_r.plot([p["step"] for p in ma["points"]], [p["rss_bytes"] / 2**20 for p in ma["points"]], "o-",
              label="Decision Aaren run (compiled step)")
    ax_r.plot([p["step"] for p in mt["points"]], [p["rss_bytes"] / 2**20 for p in mt["points"]], "s-",
              label="Decision Transformer run (KV cache)")
    ax_r.set(xscale="log", xlabel="environment steps seen", ylabel="MiB", title="process resident set (one process, runs in turn)")
    ax_r.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax_r.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    info = payload["machine"]
    fig.suptitle(f"{info['cpu']} ({info['cpu_count']} cores, pinned to {info['affinity']}, load average "
                 f"{payload['load_before'][0]:.1f} before / {payload['load_after'][0]:.1f} after), torch {info['torch']}, "
                 f"{info['date_utc']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict], ref_key: str = "aaren_compiled") -> str:
    ref = {r["batch"]: r["us_per_env_step"] for r in rows if r["method"] == ref_key}
    header = ["agent", "batch", "us per call", "us per env step", "p10-p90 (per call)", f"x {ref_key}", "state bytes"]
    return markdown_table(header, [
        [LABELS[r["method"]], r["batch"], f"{r['us_per_call']:.1f}", f"{r['us_per_env_step']:.1f}",
         f"{r['p10']:.0f}-{r['p90']:.0f}",
         f"{r['us_per_env_step'] / ref[r['batch']]:.1f}" if r["batch"] in ref else "-", f"{r['state_bytes']:,}"]
        for r in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                   help="torch: the PyTorch and compiled C backends side by side; onnxruntime: every policy exported "
                        "and run in ONNX Runtime, one thread (bench/step_onnxruntime.py)")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/step_cpu_<machine>.json; "
                                                "onnxruntime: step_onnxruntime_<machine>.json)")
    p.add_argument("--plot", default=None, help="PNG (default: next to the JSON, .png)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="numbers of environments")
    p.add_argument("--shape", choices=sorted(SHAPES), default="halfcheetah",
                   help="the agents' shapes: halfcheetah (DT's MuJoCo setting: width 128, observation 17, action 6) "
                        "or memory (the memory task's: width 64, observation 3, 2 discrete actions)")
    p.add_argument("--history", type=int, default=1000, help="t at which the torch policies are timed")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: 20; onnxruntime: "
                                                                 "10 at each point)")
    p.add_argument("--block-s", type=float, default=None, help="seconds per method per round (default: 0.1; "
                                                                "onnxruntime: 0.05)")
    p.add_argument("--aaren-steps", type=int, default=1_000_000, help="steps of the Aaren memory run")
    p.add_argument("--dt-steps", type=int, default=10_000, help="steps of the Transformer memory run")
    p.add_argument("--memory-budget-s", type=float, default=240.0, help="time limit of the Transformer memory run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--malloc", choices=["heap", "default"], default="heap",
                   help="heap: glibc serves large blocks from its heap (faster for a growing KV cache); default: as is")
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps and rounds (default: off)")
    g = p.add_argument_group("--engine onnxruntime")
    g.add_argument("--points", type=int, nargs="+", default=[10, 100, 1000, 10_000, 100_000, 1_000_000],
                   help="steps seen at which every policy is timed (one episode per environment)")
    g.add_argument("--budget-s", type=float, nargs="+", default=[200.0, 30.0],
                   help="seconds each policy may spend advancing to the points, one value per --batch (the last "
                        "repeats); a policy stops before a point it would reach too late")
    g.add_argument("--kvcache-steps", type=int, default=1000,
                   help="the growing key/value cache goes no further than this many steps")


def run(args: argparse.Namespace) -> int:
    from ..kernels import cpu_step

    if args.engine == "onnxruntime":
        from . import step_onnxruntime

        if args.shape != "halfcheetah":
            print(f"error: --engine onnxruntime times the halfcheetah shape only, not --shape {args.shape}")
            return 2

        args.rounds = 10 if args.rounds is None else args.rounds
        args.block_s = 0.05 if args.block_s is None else args.block_s
        return step_onnxruntime.run(args)
    args.rounds = 20 if args.rounds is None else args.rounds
    args.block_s = 0.1 if args.block_s is None else args.block_s
    if args.quick:
        args.history, args.rounds, args.block_s = 50, 2, 0.02
        args.aaren_steps, args.dt_steps, args.memory_budget_s = 2000, 200, 10.0
    torch.set_num_threads(args.threads)
    heap = heap_allocations() if args.malloc == "heap" else False
    if not cpu_step.available():
        print("no C compiler: the compiled step is unavailable; nothing to compare")
        return 1
    info = common.machine_info("cpu")
    info["affinity"] = sorted(os.sched_getaffinity(0))
    info["glibc_large_blocks_from_heap"] = heap
    load_before = os.getloadavg()
    models = {"aaren": make_model("aaren", shape=args.shape), "transformer": make_model("transformer", shape=args.shape)}
    sh = SHAPES[args.shape]
    print(f"{info['cpu']}, {info['cpu_count']} cores (pinned to {info['affinity']}), torch {info['torch']}, "
          f"load {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)

    timing = []
    for n in args.batch:
        print(f"batch {n}: preparing states at t = {args.history} ...", flush=True)
        methods = [m for m in METHODS if m != "aaren_compiled_bf16" or cpu_step.has_bf16()]
        steppers = {m: make_stepper(m, n, args.history, models) for m in methods}
        samples = time_interleaved(steppers, args.rounds, args.block_s)
        for m in methods:
            xs = samples[m]
            q = np.percentile(xs, [10, 50, 90])
            timing.append({"method": m, "batch": n, "us_per_call": float(q[1]), "us_per_env_step": float(q[1]) / n,
                           "p10": float(q[0]), "p90": float(q[2]), "min": float(min(xs)), "samples": len(xs),
                           "state_bytes": int(steppers[m].state_bytes)})
        print(table([r for r in timing if r["batch"] == n]), flush=True)
        del steppers

    print(f"memory: Aaren, {args.aaren_steps:,} steps ...", flush=True)
    mem_a = memory_aaren(models["aaren"], args.aaren_steps)
    print(f"  {mem_a['seconds']:.0f} s; state {mem_a['points'][0]['state_bytes']} -> {mem_a['points'][-1]['state_bytes']} B, "
          f"RSS {mem_a['points'][0]['rss_bytes'] / 2**20:.1f} -> {mem_a['points'][-1]['rss_bytes'] / 2**20:.1f} MiB", flush=True)
    print(f"memory: Transformer, up to {args.dt_steps:,} steps or {args.memory_budget_s:.0f} s ...", flush=True)
    mem_t = memory_transformer(models["transformer"], args.dt_steps, args.memory_budget_s)
    print(f"  {mem_t['steps']:,} steps in {mem_t['seconds']:.0f} s; cache {mem_t['points'][0]['cache_bytes']:,} -> "
          f"{mem_t['points'][-1]['cache_bytes']:,} B, RSS {mem_t['points'][0]['rss_bytes'] / 2**20:.1f} -> "
          f"{mem_t['points'][-1]['rss_bytes'] / 2**20:.1f} MiB", flush=True)

    b1 = {r["method"]: r["us_per_env_step"] for r in timing if r["batch"] == 1}
    headline = {}
    if b1:
        # the default policy (StreamingPolicy.predict, which runs the compiled step) is the headline
        headline = {
            "aaren_us_per_step": b1["aaren_compiled"],
            "aaren_bf16_us_per_step": b1.get("aaren_compiled_bf16"),
            "aaren_torch_us_per_step": b1["aaren_torch"],
            "dt_window_us_per_step": b1["dt_window"],
            "dt_kvcache_us_per_step": b1["dt_kvcache"],
            "dt_window_over_aaren": b1["dt_window"] / b1["aaren_compiled"],
            "dt_kvcache_over_aaren": b1["dt_kvcache"] / b1["aaren_compiled"],
            "dt_window_over_aaren_torch": b1["dt_window"] / b1["aaren_torch"],
        }
    payload = {
        "benchmark": "step", "machine": info, "load_before": load_before, "load_after": os.getloadavg(),
        "model": {"shape": args.shape, "n_layer": 3, "embed_dim": sh["embed_dim"], "n_head": 1, "context_len": 20,
                  "observation_dim": sh["obs_dim"], "action_dim": sh["act_dim"], "discrete": sh["discrete"],
                  "target_return": sh["target_return"], "history": args.history},
        **headline,
        "aaren_state_bytes": mem_a["points"][-1]["state_bytes"],
        "dt_kvcache_bytes_at_history": next((r["state_bytes"] for r in timing if r["method"] == "dt_kvcache"), None),
        "timing": timing,
        "memory": {"aaren_compiled": mem_a, "dt_kvcache": mem_t},
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool, type(None)))},
    }
    suffix = "" if args.shape == "halfcheetah" else f"_{args.shape}"
    path = Path(args.json) if args.json else common.RESULTS_DIR / f"step_cpu_{common.machine_slug(info)}{suffix}.json"
    write_json(path, payload)
    png = plot(payload, Path(args.plot) if args.plot else path.with_suffix(".png"))
    print()
    print(table(timing))
    if headline:
        print(f"\nbatch 1: Decision Aaren (compiled step) {headline['aaren_us_per_step']:.1f} us; DT window "
              f"recompute / it {headline['dt_window_over_aaren']:.1f}x (eager DT against compiled C; eager against "
              f"eager: {headline['dt_window_over_aaren_torch']:.1f}x); DT key/value cache at t = {args.history} / it "
              f"{headline['dt_kvcache_over_aaren']:.1f}x")
    print(f"load before {load_before[0]:.2f}, after {payload['load_after'][0]:.2f}")
    print(f"wrote {path} and {png}")
    return 0
