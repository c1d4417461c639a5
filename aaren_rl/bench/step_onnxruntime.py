"""Acting cost of every policy in one engine, ONNX Runtime (``aaren-rl bench step --engine onnxruntime``).

Each policy is exported (``aaren_rl.export``, opset 17, float32) and acts through
``runtime.OnnxPolicy.predict`` (the same input checks and episode bookkeeping as every
``StreamingPolicy``): one ONNX Runtime call per environment step. Every session has one intra-op
and one inter-op thread, the CPU provider and ORT's default graph optimizations; nothing differs
between the policies but the graph.

* ``aaren``: Decision Aaren, its constant-size state (m, u, w) in and out.
* ``dt_window``: the Decision Transformer as DT evaluates it: the last K = 20 timesteps' values
  in, the model rerun over their 60 tokens.
* ``dt_kvcache``: the Decision Transformer with a key/value cache of the whole episode: the
  cache in, the cache 3 tokens longer out (it grows by ~9.2 KB a step).
* ``dt_sliding``: the Decision Transformer with a key/value cache of the last K timesteps in every
  layer (``KVCache(window=3K - 1)``): constant size, the rival with a constant memory.

The models have DT's MuJoCo setting (3 layers, width 128, 1 head, K = 20) and HalfCheetah's
shapes (``bench.step``). For each batch size, all policies advance side by side through the
steps seen ``--points``; at each point every policy that reached it is timed in interleaved
rounds, each call from a copy of the state at that point (the copy is not timed), so that a
change in the machine's load hits all of them alike. A policy stops before a point it could not
reach within its time budget (``--budget-s``, estimated from its current step time; for the
growing cache, with the cost growing linearly in t) or beyond its limit (``--kvcache-steps``).
As in the torch engine, glibc serves large blocks from its heap (``--malloc heap``): the growing
cache's new arrays then do not fault in fresh pages at every step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..export import export_policy
from ..output import markdown_table, write_json
from ..runtime import OnnxPolicy
from . import common
from .step import TARGET_RETURN, Inputs, heap_allocations, make_model, time_interleaved

POLICIES = {  # name: backbone, policy mode, label
    "aaren": ("aaren", "recurrent", "Decision Aaren, streaming state"),
    "dt_window": ("transformer", "window", "Decision Transformer, window recompute (K = 20)"),
    "dt_kvcache": ("transformer", "recurrent", "Decision Transformer, key/value cache (grows)"),
    "dt_sliding": ("transformer", "sliding", "Decision Transformer, sliding key/value cache (K = 20)"),
}
GOAL_T = 1000


class TimedSession:
    """An ``InferenceSession`` that remembers how long its last ``run`` took (us)."""

    def __init__(self, session):
        self.session, self.last_us = session, 0.0

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.last_us = (time.perf_counter() - t0) * 1e6
        return out


class Stream:
    """One policy acting in ``n`` environments, one episode each, advanced step by step."""

    def __init__(self, name: str, folder: Path, n: int):
        self.name, self.n = name, n
        self.policy = OnnxPolicy(folder, TARGET_RETURN, threads=1)
        self.session = self.policy.backend.session = TimedSession(self.policy.backend.session)
        self.grows = self.policy.spec["state_bytes_per_env"] is None
        self.inputs, self.state, self.t = Inputs(n), None, 0
        self.advance_s, self.us_per_step, self.stopped = 0.0, None, None

    def advance(self, to: int) -> None:
        steps, t0 = to - self.t, time.perf_counter()
        while self.t < to:
            o, r = self.inputs.next()
            _, self.state = self.policy.predict(o, self.state, reward=None if self.t == 0 else r)
            self.t += 1
        spent = time.perf_counter() - t0
        self.advance_s += spent
        if steps:
            self.us_per_step = spent / steps * 1e6

    def estimate_s(self, to: int) -> float:
        """Seconds to advance to ``to``, from the step time measured last."""
        if self.us_per_step is None:
            return 0.0
        per_step = self.us_per_step * ((self.t + to) / (2 * self.t) if self.grows and self.t else 1.0)
        return (to - self.t) * per_step / 1e6

    def stepper(self):
        """One timed environment step from the state at ``self.t``; ``prepare`` copies it (untimed)."""
        fixed, current, onnx_us = self.state, [None], []

        def step():
            o, r = self.inputs.next()
            self.policy.predict(o, current[0], reward=r)
            onnx_us.append(self.session.last_us)

        step.prepare = lambda: current.__setitem__(0, fixed.copy())
        step.onnx_us = onnx_us
        return step


def export_all(folder: Path) -> dict[str, Path]:
    models = {"aaren": make_model("aaren"), "transformer": make_model("transformer")}
    return {name: export_policy(models[backbone], folder / name, target_return=TARGET_RETURN, mode=mode)
            for name, (backbone, mode, _) in POLICIES.items()}


def run_batch(n: int, folders: dict, points: list[int], budget_s: float, kvcache_steps: int, rounds: int,
              block_s: float) -> list[dict]:
    streams = {name: Stream(name, folders[name], n) for name in POLICIES}
    rows = []
    for point in points:
        active = []
        for s in streams.values():
            if s.stopped:
                continue
            if s.grows and point > kvcache_steps:
                s.stopped = f"--kvcache-steps {kvcache_steps}"
            elif s.advance_s + s.estimate_s(point) > budget_s:
                s.stopped = f"budget: reaching t = {point:,} would take ~{s.advance_s + s.estimate_s(point):.0f} s"
            else:
                active.append(s)
        if not active:
            break
        for s in active:
            s.advance(point)
        steppers = {s.name: s.stepper() for s in active}
        samples = time_interleaved(steppers, rounds, block_s)
        ref = None
        for s in active:
            xs, q = samples[s.name], np.percentile(samples[s.name], [10, 50, 90])
            row = {"method": s.name, "batch": n, "t": point, "us_per_call": float(q[1]), "us_per_env_step": float(q[1]) / n,
                   "p10": float(q[0]), "p90": float(q[2]), "samples": len(xs),
                   "onnx_us_per_call": float(np.median(steppers[s.name].onnx_us)),
                   "state_bytes": int(s.policy.state_nbytes(s.state)), "advance_s": s.advance_s}
            rows.append(row)
            ref = row if s.name == "aaren" else ref
        if ref is not None:
            for row in rows[-len(active):]:
                row["x_aaren"] = row["us_per_call"] / ref["us_per_call"]
                row["state_x_aaren"] = row["state_bytes"] / ref["state_bytes"]
        line = ", ".join(f"{r['method']} {r['us_per_call']:.0f} us" for r in rows[-len(active):])
        print(f"  batch {n}, t = {point:,}: {line}", flush=True)
    for s in streams.values():
        if s.stopped:
            print(f"  batch {n}: {s.name} stopped at t = {s.t:,} ({s.stopped})", flush=True)
    return rows


def goals(rows: list[dict]) -> dict:
    """The issue's goals, at t = 1000, per batch size: the ratios and whether each is met."""
    out = {}
    for n in sorted({r["batch"] for r in rows}):
        at = {r["method"]: r for r in rows if r["batch"] == n and r["t"] == GOAL_T}
        if "aaren" not in at:
            continue
        a, g = at["aaren"], {}
        if "dt_window" in at:
            x = at["dt_window"]["us_per_call"] / a["us_per_call"]
            g["dt_window_over_aaren"] = {"ratio": x, "goal": ">= 10", "met": x >= 10}
        if "dt_kvcache" in at:
            x = at["dt_kvcache"]["us_per_call"] / a["us_per_call"]
            g["dt_kvcache_over_aaren"] = {"ratio": x, "goal": ">= 3", "met": x >= 3}
        if "dt_sliding" in at:
            x = at["dt_sliding"]["us_per_call"] / a["us_per_call"]
            sx = at["dt_sliding"]["state_bytes"] / a["state_bytes"]
            g["dt_sliding_over_aaren"] = {"ratio": x, "state_ratio": sx, "goal": "time >= 1, state >= 100",
                                          "met": x >= 1 and sx >= 100}
        out[str(n)] = g
    return out


def table(rows: list[dict], sizes: dict) -> str:
    header = ["agent", "batch", "steps seen", "us per call", "us per env step", "p10-p90 (per call)",
              "us in ONNX Runtime", "x Aaren", "state bytes", "state x Aaren", "step.onnx MB"]
    return markdown_table(header, [
        [POLICIES[r["method"]][2], r["batch"], f"{r['t']:,}", f"{r['us_per_call']:.1f}", f"{r['us_per_env_step']:.1f}",
         f"{r['p10']:.0f}-{r['p90']:.0f}", f"{r['onnx_us_per_call']:.1f}",
         f"{r['x_aaren']:.1f}" if "x_aaren" in r else "-", f"{r['state_bytes']:,}",
         f"{r['state_x_aaren']:,.0f}" if "state_x_aaren" in r else "-", f"{sizes[r['method']] / 1e6:.2f}"]
        for r in rows])


def growth_table(rows: list[dict]) -> str:
    """us per call and state bytes by steps seen, one column pair per policy and batch size."""
    keys = [(n, m) for n in sorted({r["batch"] for r in rows}) for m in POLICIES if any(
        r["batch"] == n and r["method"] == m for r in rows)]
    by = {(r["batch"], r["method"], r["t"]): r for r in rows}
    header = ["steps seen"] + [f"{m} b{n} us / bytes" for n, m in keys]
    body = []
    for t in sorted({r["t"] for r in rows}):
        body.append([f"{t:,}"] + [f"{by[(n, m, t)]['us_per_call']:.0f} / {by[(n, m, t)]['state_bytes']:,}"
                                  if (n, m, t) in by else "-" for n, m in keys])
    return markdown_table(header, body)


def run(args: argparse.Namespace) -> int:
    try:
        import onnxruntime as ort
    except ImportError:
        print("--engine onnxruntime needs onnxruntime and onnx: pip install 'aaren-rl[onnx]'")
        return 1
    points, budgets, kv_steps = sorted(set(args.points)), list(args.budget_s), args.kvcache_steps
    if args.quick:
        points, budgets, kv_steps, args.rounds, args.block_s = [10, 100], [10.0], 100, 2, 0.02
    budgets += budgets[-1:] * (len(args.batch) - len(budgets))  # one per batch size; the last one repeats
    heap = heap_allocations() if args.malloc == "heap" else False  # as the torch engine: the growing cache's way
    info = common.machine_info("cpu")
    info.update(onnxruntime=ort.__version__, engine="onnxruntime", intra_op_threads=1, inter_op_threads=1,
                affinity=sorted(os.sched_getaffinity(0)), glibc_large_blocks_from_heap=heap)
    load_before = os.getloadavg()
    print(f"{info['cpu']}, {info['cpu_count']} cores, onnxruntime {ort.__version__}, 1 intra-op thread, "
          f"load {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aaren-rl-bench-onnx-") as tmp:
        folders = export_all(Path(tmp))
        sizes = {name: (f / "step.onnx").stat().st_size for name, f in folders.items()}
        rows = []
        for n, budget in zip(args.batch, budgets):
            print(f"batch {n}: points {', '.join(f'{p:,}' for p in points)}, budget {budget:.0f} s per policy", flush=True)
            rows += run_batch(n, folders, points, budget, kv_steps, args.rounds, args.block_s)
    result = goals(rows)
    payload = {
        "benchmark": "step", "engine": "onnxruntime", "machine": info, "load_before": load_before,
        "load_after": os.getloadavg(), "seconds": time.perf_counter() - t_start,
        "model": {"n_layer": 3, "embed_dim": 128, "n_head": 1, "context_len": 20, "observation_dim": 17,
                  "action_dim": 6, "precision": "float32", "opset": 17},
        "onnx_bytes": sizes, "goals_at_t": GOAL_T, "goals": result, "timing": rows,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool, type(None)))},
    }
    path = Path(args.json) if args.json else common.RESULTS_DIR / f"step_onnxruntime_{common.machine_slug(info)}.json"
    write_json(path, payload)
    print()
    print(table([r for r in rows if r["t"] == GOAL_T] or rows, sizes))
    print()
    print(growth_table(rows))
    for n, g in result.items():
        parts = [f"{k.replace('_over_aaren', '')} / Aaren {v['ratio']:.1f}x (goal {v['goal']}"
                 + (f"; state {v['state_ratio']:.0f}x" if "state_ratio" in v else "") + f": {'met' if v['met'] else 'NOT met'})"
                 for k, v in g.items()]
        print(f"\nbatch {n}, t = {GOAL_T:,}: " + "; ".join(parts))
    print(f"load before {load_before[0]:.2f}, after {payload['load_after'][0]:.2f}; {payload['seconds']:.0f} s in all")
    print(f"wrote {path}")
    return 0
