"""Many runs at once: aggregate updates/s of a group of R runs against one run alone.

* **group**: ``group.RunGroup`` exactly as ``train_group`` runs it (each run samples its own
  batch on the device, draws its own dropout masks, per-run clip, per-run AdamW), for R runs of
  one agent at DT's size (3 layers, width 128, 1 head, dropout 0.1, batch 64, K = 20), synthetic
  HalfCheetah-shaped data. ``aggregate_updates_per_s`` = R x group updates/s: run-updates per
  second. ``vs_solo`` divides it by one run's rate through ``train.UpdateStep`` in the same
  compile mode (``solo`` rows), which is what running the R runs one after another gives. Timing:
  a few untimed updates (warm-up, graph capture, compilation), then rounds of N updates with one
  sync per round (as a log line); the median round.
* **formulation**: the choice between ``torch.func.vmap`` over ``functional_call`` and weights
  kept batched and multiplied with ``torch.baddbmm``: fwd+bwd of R stacked 3-layer MLP blocks
  (128 -> 512 -> 128, GELU, residual) on (R, 64 x 60, 128) tokens, both ways and as a loop of R
  separate modules.

Memory: on CUDA the peak allocated during the timed updates minus what was allocated before the
group was built; on the CPU the group's weights, gradients and AdamW moments (``state_mb``) and
the process's peak RSS growth (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..output import cell, markdown_table, write_json
from . import common

AGENTS = {  # name: model overrides, batch size
    "decision_aaren/window": (dict(backbone="aaren", context="window", context_len=20), 64),
    "decision_transformer/window": (dict(backbone="transformer", context="window", context_len=20), 64),
    "decision_aaren/episode": (dict(backbone="aaren", context="episode"), 16),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class GroupResult:
    agent: str
    mode: str
    runs_per_group: int
    batch: int
    status: str = "ok"
    group_updates_per_s: float | None = None
    aggregate_updates_per_s: float | None = None
    rounds_updates_per_s: list | None = None
    vs_solo: float | None = None
    setup_s: float | None = None
    state_mb: float | None = None
    peak_mem_mb: float | None = None  # CUDA: max allocated; CPU: peak RSS growth
    first_losses: list | None = None


def measure_group(agent: str, mode: str, R: int, dataset, device: torch.device, updates: int, rounds: int,
                  warmup: int = 5, batch: int | None = None, model: dict | None = None) -> GroupResult:
    from ..group import Run, RunGroup
    from ..train import TrainConfig, model_config_for

    overrides, default_batch = AGENTS[agent]
    batch = batch or default_batch
    res = GroupResult(agent, mode, R, batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base, rss0 = (torch.cuda.memory_allocated() if cuda else 0), _rss_mb()
    t0 = time.perf_counter()
    mc = model_config_for(dataset, **{**overrides, **(model or {})})
    runs = [Run(mc, TrainConfig(batch_size=batch, seed=s, compile=mode, device=str(device)), dataset, f"r{s}")
            for s in range(R)]
    group = RunGroup(runs, device, mode=mode, amp=cuda)
    for _ in range(warmup):
        group()
    res.first_losses = group.pop_mean_loss()[:4]
    res.setup_s = time.perf_counter() - t0
    rates = timed_rounds(group, device, updates, rounds)
    res.rounds_updates_per_s = rates
    res.group_updates_per_s = common.median(rates)
    res.aggregate_updates_per_s = R * res.group_updates_per_s
    res.state_mb = group.state_nbytes() / 2**20
    res.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb() - rss0
    return res


def timed_rounds(step, device: torch.device, updates: int, rounds: int) -> list[float]:
    """Updates/s of ``rounds`` rounds of ``updates`` calls of ``step`` (a group or a solo update
    step); each round ends with its loss read back, so the device has finished it."""
    rates = []
    for _ in range(rounds):
        common.sync(device.type)
        t = time.perf_counter()
        for _ in range(updates):
            step()
        step.pop_mean_loss()
        rates.append(updates / (time.perf_counter() - t))
    return rates


def measure_solo(agent: str, mode: str, dataset, device: torch.device, updates: int, rounds: int,
                 batch: int | None = None, model: dict | None = None) -> GroupResult:
    from .train import AGENTS as TRAIN_AGENTS, build_update

    if agent not in TRAIN_AGENTS:
        return GroupResult(agent + " (solo)", mode, 1, AGENTS[agent][1], status="no solo agent in bench train")
    batch = batch or AGENTS[agent][1]
    res = GroupResult(agent + " (solo)", mode, 1, batch)
    t0 = time.perf_counter()
    saved = TRAIN_AGENTS[agent]
    TRAIN_AGENTS[agent] = ({**saved[0], **(model or {})}, saved[1])  # the same overrides as the group's
    try:
        _, update, _ = build_update(agent, mode, dataset, device, batch)
    finally:
        TRAIN_AGENTS[agent] = saved
    for _ in range(5):
        update()
    update.pop_mean_loss()
    res.setup_s = time.perf_counter() - t0
    rates = timed_rounds(update, device, updates, rounds)
    res.rounds_updates_per_s = rates
    res.group_updates_per_s = res.aggregate_updates_per_s = common.median(rates)
    res.vs_solo = 1.0
    return res


def _kernel_part(name: str) -> str:
    n = name.lower()
    if "bernoulli" in n:
        return "dropout masks"
    if any(k in n for k in ("gemm", "cutlass", "sm90_", "cublas", "xmma", "bmm", "nvjet")):
        return "matrix products"
    if n.startswith("triton_"):
        return "compiled fused"
    if any(k in n for k in ("index", "gather", "scatter", "randint", "random", "distribution")):
        return "sampling / indexing"
    if "reduce" in n or "norm" in n:
        return "reductions"
    return "other elementwise"


def profile_group(agent: str, R: int, dataset, device: torch.device, updates: int = 10,
                  mode: str = "torch.compile", batch: int | None = None, model: dict | None = None) -> dict:
    """Kernel time per group update (``torch.profiler``), grouped by part: where a group's time goes.
    ``mode`` has no CUDA graph, so the profiler sees every kernel; a graph replays the same ones."""
    from torch.profiler import ProfilerActivity, profile

    from ..group import Run, RunGroup
    from ..train import TrainConfig, model_config_for

    overrides, default_batch = AGENTS[agent]
    batch = batch or default_batch
    mc = model_config_for(dataset, **{**overrides, **(model or {})})
    group = RunGroup([Run(mc, TrainConfig(batch_size=batch, seed=s, compile=mode, device=str(device)), dataset,
                          f"r{s}") for s in range(R)], device, mode=mode, amp=device.type == "cuda")
    for _ in range(5):
        group()
    group.pop_mean_loss()
    common.sync(device.type)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(updates):
            group()
        group.pop_mean_loss()
    parts, kernels, launches = {}, {}, 0
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or 0
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            ms = us / updates / 1e3
            part = _kernel_part(e.key)
            parts[part] = parts.get(part, 0.0) + ms
            kernels[e.key[:90]] = kernels.get(e.key[:90], 0.0) + ms
            launches += e.count
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    return dict(agent=agent, runs=R, mode=mode, kernel_ms_per_update=sum(parts.values()), parts=parts,
                kernel_launches_per_update=launches / updates, top_kernels=top)


def table_profile(rows: list[dict]) -> str:
    parts = sorted({k for r in rows for k in r["parts"]})
    header = ["agent", "runs", "mode", "kernel ms / update", "launches / update"] + [f"{p} ms" for p in parts]
    return markdown_table(header, [[r["agent"], r["runs"], r["mode"], f"{r['kernel_ms_per_update']:.2f}",
                                    f"{r['kernel_launches_per_update']:.0f}"]
                                   + [cell(r["parts"].get(p), nd=2) for p in parts] for r in rows], "llr" + "r" * (len(header) - 3))


# ----------------------------------------------------------------------------------------------
# vmap vs batched matrix products


def measure_formulation(R: int, device: torch.device, tokens: int = 64 * 60, width: int = 128, repeats: int = 5):
    """ms per fwd+bwd of R stacked MLP blocks, three ways (same math, same weights)."""
    from torch import nn
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.fc = nn.Linear(width, 4 * width)
            self.proj = nn.Linear(4 * width, width)

        def forward(self, x):
            for _ in range(3):
                x = x + self.proj(torch.nn.functional.gelu(self.fc(self.ln(x))))
            return x

    mods = [MLP().to(device) for _ in range(R)]
    params, buffers = stack_module_state(mods)
    template = MLP().to("meta")
    x = torch.randn(R, tokens, width, device=device)
    f = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)))
    w1, b1 = params["fc.weight"].transpose(1, 2).detach().requires_grad_(), params["fc.bias"].detach().requires_grad_()
    w2, b2 = params["proj.weight"].transpose(1, 2).detach().requires_grad_(), params["proj.bias"].detach().requires_grad_()
    g, b = params["ln.weight"].detach().requires_grad_(), params["ln.bias"].detach().requires_grad_()

    def bmm_form():
        _bmm_out(x, g, b, w1, b1, w2, b2, width).sum().backward()

    ways = {
        "vmap(functional_call)": lambda: f(params, buffers, x).sum().backward(),
        "baddbmm, weights (R, in, out)": bmm_form,
        f"loop of {R} modules": lambda: sum(m(x[i]).sum() for i, m in enumerate(mods)).backward(),
    }
    with torch.no_grad():  # the two batched forms compute the same outputs
        diff = (f(params, buffers, x) - _bmm_out(x, g, b, w1, b1, w2, b2, width)).abs().max().item()
    rows = []
    for name, fn in ways.items():
        times = common.time_ms(fn, device.type, warmup=1, repeats=repeats)
        rows.append(dict(formulation=name, runs=R, tokens_per_run=tokens, ms_median=common.median(times), ms=times,
                         max_abs_diff_vmap_vs_bmm=diff))
    return rows


def _bmm_out(x, g, b, w1, b1, w2, b2, width):
    h = x
    for _ in range(3):
        n = torch.nn.functional.layer_norm(h, (width,)) * g[:, None] + b[:, None]
        h = h + torch.baddbmm(b2[:, None], torch.nn.functional.gelu(torch.baddbmm(b1[:, None], n, w1)), w2)
    return h


# ----------------------------------------------------------------------------------------------
# the final evaluation of many runs


def measure_evaluation(n_runs: int, episodes: int, workers: list[int], env_id: str = "Pendulum-v1") -> list[dict]:
    """Wall time of ``group.evaluate_many`` over ``n_runs`` checkpoints (Decision Aaren at DT's
    size, untrained: acting costs the same) with ``episodes`` each, by number of processes."""
    import tempfile
    from pathlib import Path

    from ..checkpoint import save_checkpoint
    from ..group import evaluate_many
    from ..model import DecisionModel, ModelConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i in range(n_runs):
            torch.manual_seed(i)
            mc = ModelConfig(observation_dim=3, action_dim=1, action_low=[-2.0], action_high=[2.0])
            folder = save_checkpoint(Path(tmp) / f"r{i}", 1, DecisionModel(mc), {"env_id": env_id})
            jobs.append(dict(folder=str(folder), env_id=env_id, episodes=episodes, seed=i, target_return=-150.0,
                             ref_min_score=None, ref_max_score=None))
        for w in workers:
            t = time.perf_counter()
            res = evaluate_many(jobs, workers=w)
            wall = time.perf_counter() - t
            rows.append(dict(env_id=env_id, runs=n_runs, episodes_per_run=episodes, workers=w, wall_s=wall,
                             episodes_total=sum(r["episodes"] for r in res),
                             policy_ms_per_step_mean=sum(r["policy_ms_per_step"] for r in res) / len(res)))
            print(f"evaluation: {n_runs} runs x {episodes} episodes, {w} process(es): {wall:.1f} s", flush=True)
    return rows


def table_evaluation(rows: list[dict]) -> str:
    header = ["env", "runs", "episodes per run", "processes", "wall s", "runs per minute"]
    return markdown_table(header, [[r["env_id"], r["runs"], r["episodes_per_run"], r["workers"], f"{r['wall_s']:.1f}",
                                    f"{60 * r['runs'] / r['wall_s']:.1f}"] for r in rows])


# ----------------------------------------------------------------------------------------------
# tables and the command


def table_groups(rows: list[dict]) -> str:
    header = ["agent", "mode", "runs per group", "group updates/s", "aggregate run-updates/s", "vs one run", "setup s",
              "state MB", "peak MB"]
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["agent"], r["mode"], r["runs_per_group"], r["status"][:60]] + [""] * 5)
            continue
        out.append([r["agent"], r["mode"], r["runs_per_group"], f"{r['group_updates_per_s']:.1f}",
                    f"{r['aggregate_updates_per_s']:.1f}", cell(r["vs_solo"], "x", 1), cell(r["setup_s"], nd=1),
                    cell(r["state_mb"], nd=1), cell(r["peak_mem_mb"], nd=0)])
    return markdown_table(header, out, "ll" + "r" * 7)


def table_formulation(rows: list[dict]) -> str:
    header = ["formulation", "runs", "tokens per run", "ms per fwd+bwd (median)"]
    return markdown_table(header, [[r["formulation"], r["runs"], r["tokens_per_run"], f"{r['ms_median']:.1f}"]
                                   for r in rows])


def print_tables(res: dict) -> None:
    """The tables of a result (a fresh run's, or a saved JSON's with --table-from)."""
    info, size = res["machine"], res["model"]
    label = info.get("gpu") or f"{info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} threads"
    print(f"\nmany runs as one group, {label} (torch {info['torch']}), model {size}:\n")
    print(table_groups(res["groups"]))
    ok = [r for r in res["groups"] if r["status"] == "ok" and "(solo)" not in r["agent"]]
    if ok:
        best = max(ok, key=lambda r: r["aggregate_updates_per_s"])
        print(f"\nbest: {best['aggregate_updates_per_s']:.0f} aggregate run-updates/s ({best['agent']}, {best['mode']}, "
              f"{best['runs_per_group']} runs)")
    if res.get("profiles"):
        print("\nwhere a group update's kernel time goes (torch.profiler):\n")
        print(table_profile(res["profiles"]))
        for r in res["profiles"]:
            print(f"\n{r['agent']} x{r['runs']}, largest kernels (ms per update):")
            for k, v in r["top_kernels"].items():
                print(f"  {v:8.3f}  {k}")
    if res.get("formulation"):
        print("\nvmap vs batched matrix products (3 MLP blocks, width 128, fwd+bwd):\n")
        print(table_formulation(res["formulation"]))
    if res.get("evaluation"):
        print("\nfinal evaluation of many runs, spread over processes:\n")
        print(table_evaluation(res["evaluation"]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu", help="default: cuda if available")
    p.add_argument("--agents", nargs="+", choices=list(AGENTS), default=None,
                   help="default: the two window agents (and decision_aaren/episode on CUDA)")
    p.add_argument("--runs", type=int, nargs="*", default=None,
                   help="runs per group to time (default: CPU 1 2 4 8; CUDA 1 4 16 36 64 108; none: skip)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="compile modes (default: CPU none; CUDA cudagraph torch.compile+cudagraph)")
    p.add_argument("--updates", type=int, default=None, help="updates per timed round (default: CPU 5, CUDA 200)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--formulation-runs", type=int, default=8, help="R for the vmap vs bmm comparison (0: skip; default 8)")
    p.add_argument("--formulation-tokens", type=int, default=64 * 60,
                   help="tokens per run in that comparison (default: 3840, batch 64 x 60 tokens)")
    p.add_argument("--batch", type=int, default=None, help="batch per run (default: 64 for windows, 16 for episodes)")
    p.add_argument("--embed-dim", type=int, default=None, help="model width (default: DT's 128)")
    p.add_argument("--n-layer", type=int, default=None, help="layers (default: DT's 3)")
    p.add_argument("--eval-runs", type=int, default=0,
                   help="also time the final evaluation of this many runs (Pendulum-v1; default 0: skip)")
    p.add_argument("--eval-episodes", type=int, default=20, help="episodes per run in that evaluation (default 20)")
    p.add_argument("--profile-runs", type=int, nargs="*", default=[],
                   help="also profile a group of each of these sizes (torch.compile, no graph): kernel time per "
                        "update by part (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/sweep_MACHINE.json)")
    p.add_argument("--table-from", default=None, metavar="JSON",
                   help="print the tables of a saved result file and stop (default: measure)")


def run(args: argparse.Namespace) -> int:
    from .train import synthetic_dataset

    if args.table_from:
        try:
            print_tables(json.loads(Path(args.table_from).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: cannot read bench sweep result {args.table_from}: {e}") from None
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    agents = args.agents or (list(AGENTS) if cuda else ["decision_aaren/window", "decision_transformer/window"])
    runs = args.runs if args.runs is not None else ([1, 4, 16, 36, 64, 108] if cuda else [1, 2, 4, 8])
    modes = args.modes or (["cudagraph", "torch.compile+cudagraph"] if cuda else ["none"])
    updates = args.updates or (200 if cuda else 5)
    info = common.machine_info(device.type)
    path = args.json or common.RESULTS_DIR / f"sweep_{common.machine_slug(info)}.json"
    t_start = time.perf_counter()
    dataset = synthetic_dataset(200 if cuda else 50, 1000).to(device)
    groups, formulation, evaluation, profiles = [], [], [], []
    model_kw = {k: v for k, v in (("embed_dim", args.embed_dim), ("n_layer", args.n_layer)) if v is not None}
    size = {**dict(n_layer=3, embed_dim=128, n_head=1, dropout=0.1, obs_dim=17, act_dim=6), **model_kw}
    if args.batch:
        size["batch"] = args.batch

    def save():
        write_json(path, dict(
            benchmark="sweep", machine=info, model=size,
            method=("aggregate_updates_per_s = runs per group x group updates/s (median round of N updates, one "
                    "sync per round); vs_solo: over one run through train.UpdateStep in the same mode; memory: "
                    "CUDA max_memory_allocated minus before, CPU peak RSS growth (upper bound) and the group's "
                    "weights + grads + AdamW moments (state_mb)"),
            groups=groups, formulation=formulation,
            evaluation=evaluation, profiles=profiles))

    for agent in agents if runs else []:
        for mode in modes:
            n = updates if AGENTS[agent][0]["context"] == "window" or not cuda else max(updates // 10, 5)
            solo = None
            for R in runs:
                if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                    groups.append(asdict(GroupResult(agent, mode, R, AGENTS[agent][1], status="skipped: time budget")))
                    continue
                try:
                    if solo is None:
                        solo = measure_solo(agent, mode, dataset, device, n, args.rounds, args.batch, model_kw)
                        groups.append(asdict(solo))
                        print(f"{agent} {mode} solo: {solo.group_updates_per_s or 0:.1f} updates/s", flush=True)
                    r = measure_group(agent, mode, R, dataset, device, n, args.rounds, batch=args.batch,
                                      model=model_kw)
                    if solo.status == "ok":
                        r.vs_solo = r.aggregate_updates_per_s / solo.aggregate_updates_per_s
                except Exception as e:  # noqa: BLE001 -- one failing size must not lose the others
                    traceback.print_exc()
                    oom = "out of memory" in str(e).lower()
                    r = GroupResult(agent, mode, R, AGENTS[agent][1], status="oom" if oom else f"error: {type(e).__name__}: {e}"[:300])
                    if cuda:
                        torch.cuda.empty_cache()
                groups.append(asdict(r))
                if r.status == "ok":
                    print(f"{agent} {mode} R={R}: {r.aggregate_updates_per_s:.1f} run-updates/s "
                          f"({cell(r.vs_solo, 'x', 1)} one run)", flush=True)
                save()
    for R in args.profile_runs:
        for agent in agents:
            try:
                profiles.append(profile_group(agent, R, dataset, device, mode="torch.compile" if cuda else "none",
                                              batch=args.batch, model=model_kw))
                print(f"profile {agent} R={R}: {profiles[-1]['kernel_ms_per_update']:.2f} kernel ms per update",
                      flush=True)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        save()
    if args.formulation_runs:
        formulation.extend(measure_formulation(args.formulation_runs, device, tokens=args.formulation_tokens))
    if args.eval_runs:
        import os

        evaluation.extend(measure_evaluation(args.eval_runs, args.eval_episodes, sorted({1, os.cpu_count() or 1})))
    save()
    print_tables(json.loads(Path(path).read_text()))
    print(f"\nwrote {path}")
    return 0
