"""``aaren-rl sweep``: agents x datasets x seeds, compatible runs trained together as groups.

    aaren-rl sweep sweep.toml                                  # a spec file (docs/sweep.md)
    aaren-rl sweep --agents decision_aaren decision_transformer --datasets hopper/medium \\
        hopper/medium-replay --seeds 0 1 2 --updates 100000 --out runs/suite
    aaren-rl sweep sweep.toml --dry-run                        # the plan only

Every run gets the folder OUT/AGENT/DATASET/sSEED, an ordinary run folder. Runs that can share
one batched computation (same architecture, batch shape and schedule; ``aaren_rl.group``) train
together, up to ``--max-group`` at a time. Running the same command again resumes: finished runs
are skipped, partial ones continue from their checkpoints. The final evaluations of a group run
on the CPU cores while the next group trains; OUT/sweep.json lists every run's state and score.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

from .presets import available, resolve_dataset, resolve_env

SPEC_KEYS = {"agents", "datasets", "seeds", "env", "updates", "out", "device", "set", "max_group", "eval_episodes",
             "eval_workers", "window_recompute"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="a TOML spec file with any of the keys below (options given here win)")
    p.add_argument("--agents", nargs="+", help=f"agent presets ({', '.join(available('agents'))}) or .toml paths")
    p.add_argument("--datasets", nargs="+", metavar="SOURCE",
                   help="dataset sources as `aaren-rl train --dataset` takes them (e.g. hopper/medium)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
    p.add_argument("--env", help="env preset or gymnasium id for every dataset (default: the PRESET of "
                                 "PRESET/TIER sources and of collect's DIR/PRESET/TIER.hdf5 files, else the "
                                 "dataset's environment); without it one sweep may mix environments")
    p.add_argument("--updates", type=int, help="gradient updates per run (default: each agent preset's)")
    p.add_argument("--eval-episodes", type=int, help="episodes of each run's final evaluation (default: 20)")
    p.add_argument("--set", nargs="+", metavar="SECTION.KEY=VALUE", help="override preset values of every agent")
    p.add_argument("--out", help="sweep folder (default: runs/sweep)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--max-group", type=int, help="most runs trained as one group (default: 64)")
    p.add_argument("--eval-workers", type=int, help="processes for evaluations (default: one per CPU core)")
    p.add_argument("--window-recompute", action="store_true", default=None,
                   help="also evaluate each window-trained Aaren run's final checkpoint by window recompute "
                        "(as DT acts), beside its streaming evaluation (default: off)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (groups, runs, what is done) and stop")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def dataset_label(source: str) -> str:
    """A folder name for a dataset source: hopper/medium -> hopper-medium, data/hopper/medium.hdf5 ->
    hopper-medium, aaren-rl/hopper/medium-v0 -> hopper-medium."""
    path = Path(source)
    if path.suffix == ".hdf5":
        return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem
    parts = source.split("/")
    if len(parts) == 3:  # a Minari id: namespace/env/name-vN
        parts = parts[1:]
    label = "-".join(parts)
    base, _, version = label.rpartition("-v")
    return base if base and version.isdigit() else label


def env_preset_of(source: str) -> str | None:
    """The env preset a dataset source names, if any: ``walker2d/medium`` (PRESET/TIER) or a file
    ``collect --hdf5`` wrote, ``.../walker2d/medium.hdf5`` (its folder is the preset's name)."""
    path = Path(source)
    name = path.parent.name if path.suffix == ".hdf5" else (source.split("/")[0] if "/" in source else "")
    return name if name and name in available("envs") else None


def load_runs(pairs, seeds, train_args: dict, env_name: str | None, folder_of, progress=True):
    """Run objects for (agent, source) x seeds; each dataset is loaded once."""
    from aaren_rl.data import load_dataset
    from aaren_rl.group import Run

    from .train import build_configs

    loaded, runs = {}, []
    for agent, source in pairs:
        env_for = env_name or env_preset_of(source)
        env = resolve_env(env_for) if env_for else None
        key = (source, env_for)
        if key not in loaded:
            loaded[key] = load_dataset(resolve_dataset(source), env_id=env["env_id"] if env else None,
                                       ref_min_score=env and env["ref_min"], ref_max_score=env and env["ref_max"])
        dataset = loaded[key]
        for seed in seeds:
            args = argparse.Namespace(**{**train_args, "agent": agent, "seed": seed})
            mc, tc = build_configs(args, dataset)
            if env:
                tc.env_id = env["env_id"]
                if tc.target_return is None and env["target_returns"]:
                    tc.target_return = float(env["target_returns"][0])
            runs.append(Run(mc, tc, dataset, folder_of(agent, source, seed)))
    return runs


def _train_args(args, **extra) -> dict:
    """The option values ``cli.train.build_configs`` reads."""
    base = dict(set=[], updates=None, batch_size=None, device="auto", eval_every=None, eval_episodes=None,
                checkpoint_every=None, target_return=None)
    base.update({k: getattr(args, k) for k in base if getattr(args, k, None) is not None})
    base.update({k: v for k, v in extra.items() if v is not None})
    return base


def needs_window_eval(run, spec: dict) -> bool:
    """A window-trained Aaren run acts as a stream; ``window_recompute`` also evaluates it as DT acts."""
    mc = run.model_config
    return bool(spec.get("window_recompute")) and mc.backbone == "aaren" and mc.context == "window"


def run_status(run, spec: dict | None = None) -> tuple[str, int]:
    """("done" | "trained" | "partial" | "new", step of its latest checkpoint)."""
    ckpt = run.logdir / "checkpoints"
    if not (ckpt / "latest").is_file():
        return "new", 0
    folder = ckpt / (ckpt / "latest").read_text().strip()
    info = json.loads((folder / "config.json").read_text())
    step = int(info.get("step", 0))
    no_env = not (run.config.env_id or run.dataset.env_id) or run.config.eval_episodes == 0
    evaluated = no_env or ("last_eval" in info and ("last_eval_window" in info or not needs_window_eval(run, spec or {})))
    if step >= run.config.updates:
        return ("done" if evaluated else "trained"), step
    return "partial", step


def plan_groups(runs, max_group: int):
    """Runs that still need training, grouped: same ``group_key`` and the same checkpoint step."""
    from aaren_rl.group import group_key

    buckets: dict = {}
    for run in runs:
        status, step = run_status(run)
        if status in ("new", "partial"):
            buckets.setdefault((group_key(run), step), []).append(run)
    groups = []
    for (_, step), members in buckets.items():
        for i in range(0, len(members), max_group):
            groups.append((step, members[i:i + max_group]))
    return groups


# ----------------------------------------------------------------------------------------------
# `aaren-rl train --seeds ...` / several --dataset values: one group


def run_train_group(args: argparse.Namespace) -> int:
    """``aaren-rl train`` with ``--seeds`` or several ``--dataset`` values: one group, folders
    LOGDIR/sSEED (one dataset) or LOGDIR/DATASET/sSEED (several)."""
    import torch

    from aaren_rl.group import train_group

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds has repeated values: {seeds}")
    sources = list(dict.fromkeys(args.dataset))
    name = Path(args.agent).stem
    base = Path(args.logdir or f"runs/{name}-{dataset_label(sources[0]) if len(sources) == 1 else 'group'}")

    def folder_of(agent, source, seed):
        return base / dataset_label(source) / f"s{seed}" if len(sources) > 1 else base / f"s{seed}"

    runs = load_runs([(args.agent, s) for s in sources], seeds, _train_args(args), args.env, folder_of)
    for run in runs:
        if run.logdir.exists() and any(run.logdir.iterdir()) and not args.resume:
            raise SystemExit(f"error: run folder {run.logdir} is not empty; pass --resume to continue it or choose --logdir")
    try:
        from aaren_rl.group import check_group

        check_group(runs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"agent {name}: {len(runs)} runs as one group ({', '.join(str(r.logdir) for r in runs)})")
    train_group(runs, resume=args.resume, progress=not args.no_progress)
    for run in runs:
        _print_result(run)
    print(f"curves: tensorboard --logdir {base}")
    return 0


def _print_result(run) -> None:
    folder = run.logdir / "checkpoints" / (run.logdir / "checkpoints" / "latest").read_text().strip()
    ev = json.loads((folder / "config.json").read_text()).get("last_eval")
    if ev:
        score = f", normalized score {ev['normalized_score_mean']:.1f}" if "normalized_score_mean" in ev else ""
        print(f"{run.logdir}: final evaluation ({ev['episodes']} episodes): return {ev['return_mean']:.1f} "
              f"± {ev['return_std']:.1f}{score}")
    else:
        print(f"{run.logdir}: trained, checkpoint {folder}")


# ----------------------------------------------------------------------------------------------
# `aaren-rl sweep`


def read_spec(args: argparse.Namespace) -> dict:
    spec = {}
    if args.spec:
        path = Path(args.spec)
        if not path.is_file():
            raise SystemExit(f"error: sweep spec {path} not found")
        try:
            spec = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"error: sweep spec {path} is not valid TOML: {e}") from None
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise SystemExit(f"error: sweep spec {path} has unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for key in SPEC_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            spec[key] = value
    spec.setdefault("seeds", [0])
    spec.setdefault("out", "runs/sweep")
    spec.setdefault("device", "auto")
    spec.setdefault("max_group", 64)
    spec.setdefault("eval_episodes", 20)
    spec.setdefault("set", [])
    for key in ("agents", "datasets"):
        if not spec.get(key):
            raise SystemExit(f"error: the sweep needs {key} (a list in the spec file, or --{key})")
    for key in ("agents", "datasets", "seeds", "set"):
        if not isinstance(spec[key], list):
            raise SystemExit(f"error: sweep spec: {key} must be a list, got {spec[key]!r}")
    if not (isinstance(spec["max_group"], int) and spec["max_group"] > 0):
        raise SystemExit(f"error: max_group must be a positive integer, got {spec['max_group']!r}")
    return spec


def run(args: argparse.Namespace) -> int:
    """One process, or (under torchrun) one process per GPU, each training every N-th group on its
    own GPU: ``torchrun --standalone --nproc_per_node=N -m aaren_rl sweep SPEC`` (docs/distributed.md)."""
    from aaren_rl import distributed

    spec = read_spec(args)
    if not distributed.launched_by_torchrun():
        return _run(args, spec)
    if str(spec["device"]) not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"error: device {spec['device']!r} under torchrun: each process takes the GPU of its local "
                         "rank; give auto, cuda or cpu (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    try:
        from datetime import timedelta

        # the processes only wait for each other at the end: gloo, and a timeout longer than any sweep
        ranks, device = distributed.init_from_env(str(spec["device"]), backend="gloo", timeout=timedelta(days=30))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return _run(args, spec, ranks, device)
    finally:
        distributed.destroy()


def _run(args: argparse.Namespace, spec: dict, ranks=None, device=None) -> int:
    import torch

    from aaren_rl import distributed
    from aaren_rl.output import write_json
    from aaren_rl.group import evaluate_job, evaluation_jobs, evaluation_result, record_evaluation, train_group

    ranks = ranks or distributed.Ranks()
    say = print if ranks.is_main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(spec["out"])
    train_args = _train_args(argparse.Namespace(), set=spec["set"], updates=spec.get("updates"), device=spec["device"],
                             eval_episodes=spec["eval_episodes"], eval_every=0)
    pairs = [(a, d) for a in spec["agents"] for d in spec["datasets"]]
    runs = load_runs(pairs, spec["seeds"], train_args, spec.get("env"),
                     lambda agent, source, seed: out / Path(agent).stem / dataset_label(source) / f"s{seed}")
    meta = {r.logdir: (Path(a).stem, dataset_label(d), s) for r, (a, d, s) in
            zip(runs, [(a, d, s) for a, d in pairs for s in spec["seeds"]])}
    groups = plan_groups(runs, spec["max_group"])
    status = {r.logdir: run_status(r, spec) for r in runs}
    say(f"sweep {out}: {len(runs)} runs; done {sum(s == 'done' for s, _ in status.values())}, "
          f"partial {sum(s == 'partial' for s, _ in status.values())}; {len(groups)} group(s) to train")
    for i, (step, members) in enumerate(groups):
        agents = sorted({meta[r.logdir][0] for r in members})
        say(f"  group {i + 1}: {len(members)} runs of {', '.join(agents)} from update {step} "
              f"({', '.join(str(r.logdir.relative_to(out)) for r in members[:4])}{' ...' if len(members) > 4 else ''})")
    if args.dry_run:
        return 0
    if ranks.active:  # every rank made the same plan: rank r trains groups r, r + N, ... on its own GPU
        if any(m.model_config.context == "segment" for _, ms in groups for m in ms):
            raise SystemExit("error: segment-context agents train one run at a time and do not run in a sweep under "
                             "torchrun yet; sweep them in one process")
        say(f"{ranks.world_size} processes: process r trains groups r, r + {ranks.world_size}, ... "
            f"(this one: {device})")
        mine = list(range(ranks.rank, len(groups), ranks.world_size))
    else:
        mine = list(range(len(groups)))

    def write_summary():
        rows = []
        for r in runs:
            state, step = run_status(r, spec)
            agent, dataset, seed = meta[r.logdir]
            row = {"agent": agent, "dataset": dataset, "seed": seed, "folder": str(r.logdir), "status": state,
                   "step": step, "updates": r.config.updates}
            if state == "done" and step:
                folder = r.logdir / "checkpoints" / (r.logdir / "checkpoints" / "latest").read_text().strip()
                info = json.loads((folder / "config.json").read_text())
                fields = ("episodes", "return_mean", "return_std", "normalized_score_mean", "normalized_score_std",
                          "policy_ms_per_step", "eval_seconds", "mode")
                if info.get("last_eval"):
                    row.update({k: info["last_eval"].get(k) for k in fields})
                if info.get("last_eval_window"):
                    row.update({f"window_{k}": info["last_eval_window"].get(k) for k in fields})
            rows.append(row)
        write_json(out / "sweep.json", {"spec": {k: v for k, v in spec.items()}, "runs": rows})

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # evaluations of a finished group run in other processes while the next group trains
    pending = []
    import os

    workers = spec.get("eval_workers") or max(1, (os.cpu_count() or 1) // ranks.world_size)  # the cores, shared
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        def submit(members):
            for run_ in members:
                for _, job in evaluation_jobs([run_], run_.config.updates):
                    info = json.loads((Path(job["folder"]) / "config.json").read_text())
                    todo = [("eval", None)] + ([("eval_window", "window")] if needs_window_eval(run_, spec) else [])
                    for key, mode in todo:
                        if f"last_{key}" not in info:
                            job_ = {**job, "mode": mode}
                            pending.append((run_, job_, key, pool.submit(evaluate_job, job_)))

        def collect(block: bool):
            for item in list(pending):
                run_, job, key, fut = item
                if block or fut.done():
                    result = evaluation_result(fut, job["folder"], "run the same sweep command again to evaluate them")
                    record_evaluation(run_, {**result, "folder": job["folder"]}, run_.config.updates, key=key)
                    pending.remove(item)

        trained = [r for r in runs if run_status(r, spec)[0] == "trained"]  # trained earlier, never evaluated
        submit(trained[ranks.rank::ranks.world_size])
        t0 = time.perf_counter()
        tag = f"[rank {ranks.rank}] " if ranks.active else ""
        for i in mine:
            step, members = groups[i]
            print(f"{tag}group {i + 1}/{len(groups)}: training {len(members)} runs", flush=True)
            t = time.perf_counter()
            if members[0].model_config.context == "segment":  # not batched in groups yet: one at a time
                from aaren_rl.train import train

                for run_ in members:  # train() evaluates at the end itself, with the same seed rule
                    train(run_.model_config, run_.config, run_.dataset, run_.logdir, resume=step > 0,
                          progress=not args.no_progress)
            else:
                train_group(members, resume=step > 0, progress=not args.no_progress and ranks.is_main,
                            final_eval=False, eval_workers=workers, device=str(device) if device else None)
            print(f"{tag}group {i + 1}/{len(groups)}: trained in {time.perf_counter() - t:.0f} s", flush=True)
            submit(members)
            collect(block=False)
            if not ranks.active:
                write_summary()
        print(f"{tag}waiting for {len(pending)} evaluation(s)", flush=True)
        collect(block=True)
    distributed.barrier()  # every rank's runs are on disk before rank 0 sums them up
    if ranks.is_main:
        write_summary()
        done = sum(run_status(r, spec)[0] == "done" for r in runs)
        print(f"sweep {out}: {done}/{len(runs)} runs done in {time.perf_counter() - t0:.0f} s; summary {out / 'sweep.json'}")
    return 0
