"""Data-parallel training speed: updates/s of one run on 1 vs N processes (GPUs), torchrun-started.

For each process count N in ``--nprocs`` the benchmark starts ``torchrun --standalone
--nproc_per_node=N`` on its own worker (N = 1: a plain single process, no DDP), which builds the
update exactly as ``train()`` does (``train.make_update_step``; under torchrun DDP, NCCL with
``NCCL_NVLS_ENABLE=0`` on CUDA, gloo on the CPU) for a wider model than DT's (default width 512,
6 layers, 8 heads, whole 1000-step episodes: 3000 tokens) on synthetic HalfCheetah-shaped data,
with the same global batch for every N (strong scaling: each rank does 1/N of it). Eager updates
(compile "none": what data-parallel training runs), bf16 autocast on CUDA. After ``--warmup``
updates, ``--rounds`` rounds of ``--updates`` updates are timed with one sync at the end of each
(the logged loss's all-reduce); the median round is reported, and peak GPU memory of rank 0.

    aaren-rl bench ddp --device cuda --nprocs 1 2       # on a machine with 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..output import markdown_table, write_json
from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cuda: one GPU per process (NCCL); "
                                                                              "cpu: gloo (default: cuda)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to time (default: 1 2)")
    p.add_argument("--backbone", choices=["aaren", "transformer"], default="aaren", help="sequence mixer")
    p.add_argument("--context", choices=["episode", "window"], default="episode",
                   help="whole episodes or K-step windows (--context-len)")
    p.add_argument("--context-len", type=int, default=20, help="K of window context")
    p.add_argument("--embed-dim", type=int, default=512, help="model width")
    p.add_argument("--n-layer", type=int, default=6, help="layers")
    p.add_argument("--n-head", type=int, default=8, help="heads")
    p.add_argument("--batch", type=int, default=64, help="global batch (the same for every process count)")
    p.add_argument("--episodes", type=int, default=200, help="synthetic episodes")
    p.add_argument("--episode-len", type=int, default=1000, help="steps per synthetic episode")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--updates", type=int, default=10, help="updates per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/ddp_DEVICE_MACHINE.json)")
    p.add_argument("--worker", default=None, metavar="FILE",
                   help="internal: run as one of torchrun's workers and write the row to FILE (the benchmark "
                        "passes it to its workers)")


def worker(args: argparse.Namespace) -> None:
    import torch

    from .. import distributed
    from ..train import TrainConfig, make_update_step, model_config_for
    from .train import synthetic_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    ranks, device = (distributed.init_from_env(args.device) if distributed.launched_by_torchrun()
                     else (distributed.Ranks(), torch.device(args.device)))
    try:
        ds = synthetic_dataset(args.episodes, args.episode_len)
        mc = model_config_for(ds, backbone=args.backbone, context=args.context, context_len=args.context_len,
                              embed_dim=args.embed_dim, n_layer=args.n_layer, n_head=args.n_head, dropout=0.1)
        tc = TrainConfig(batch_size=args.batch, compile="none", amp=True)
        update = make_update_step(mc, tc, ds, device, ranks=ranks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            update()
        first_loss = update.pop_mean_loss()
        rates = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.updates):
                update()
            update.pop_mean_loss()  # a sync (and the loss's all-reduce), as a log line
            rates.append(args.updates / (time.perf_counter() - t))
        if ranks.is_main:
            rate = common.median(rates)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            Path(args.worker).write_text(json.dumps(dict(
                nprocs=ranks.world_size, batch_per_rank=args.batch // ranks.world_size, updates_per_s=rate,
                sequences_per_s=rate * args.batch, rounds_updates_per_s=rates, warmup_mean_loss=first_loss,
                peak_mem_mb_rank0=peak, tokens=3 * (args.context_len if args.context == "window" else args.episode_len),
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))))
    finally:
        distributed.destroy()


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0
    import torch

    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < max(args.nprocs)):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise SystemExit(f"error: --device cuda with --nprocs up to {max(args.nprocs)} needs as many GPUs; "
                         f"torch sees {n}")
    info = common.machine_info(args.device)
    if args.device == "cuda":
        info["gpus"] = torch.cuda.device_count()
    path = args.json or common.RESULTS_DIR / f"ddp_{args.device}_{common.machine_slug(info)}.json"
    options = ["--device", args.device, "--backbone", args.backbone, "--context", args.context,
               "--context-len", str(args.context_len), "--embed-dim", str(args.embed_dim), "--n-layer",
               str(args.n_layer), "--n-head", str(args.n_head), "--batch", str(args.batch), "--episodes",
               str(args.episodes), "--episode-len", str(args.episode_len), "--warmup", str(args.warmup),
               "--updates", str(args.updates), "--rounds", str(args.rounds)]
    if args.threads:
        options += ["--threads", str(args.threads)]
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    rows = []
    for n in args.nprocs:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "aaren_rl.bench.ddp", *options, "--worker", str(part)]
            print(f"  {n} process(es): {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, env=env)
            if done.returncode != 0 or not part.is_file():
                rows.append(dict(nprocs=n, status=f"error: exit {done.returncode}"))
            else:
                rows.append(dict(json.loads(part.read_text()), status="ok"))
        write_json(path, dict(benchmark="ddp", machine=info, options={k: v for k, v in vars(args).items()
                                                                      if k not in ("worker", "json") and not callable(v)},
                              method=("eager updates (compile 'none'), the same global batch for every process "
                                      "count; median over rounds of N updates with one sync per round"), rows=rows))
    base = next((r for r in rows if r["status"] == "ok" and r["nprocs"] == min(args.nprocs)), None)
    table = [[r["nprocs"], r.get("batch_per_rank", ""), r["status"] if r["status"] != "ok" else f"{r['updates_per_s']:.2f}",
              f"{r['sequences_per_s']:.0f}" if r["status"] == "ok" else "",
              f"{r['updates_per_s'] / base['updates_per_s']:.2f}x" if base and r["status"] == "ok" else "",
              f"{r['peak_mem_mb_rank0']:.0f}" if r.get("peak_mem_mb_rank0") else ""] for r in rows]
    print(f"\n{info.get('gpu') or info['cpu']} ({args.device}), torch {info['torch']}; {args.backbone}, "
          f"{args.context} context, width {args.embed_dim}, {args.n_layer} layers, global batch {args.batch}\n")
    print(markdown_table(["processes", "batch per rank", "updates/s", "sequences/s", "vs fewest", "peak MB (rank 0)"],
                         table, "rrrrrr"))
    print(f"\nwrote {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
