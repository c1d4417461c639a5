"""What the benchmarks share: describe the machine, time a callable (results are written with
``aaren_rl.output``)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks") / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Who measured: CPU model and cores, torch (and triton) versions, GPU name where used."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def machine_slug(info: dict) -> str:
    """A short file-name part naming the machine: the GPU on CUDA, else the CPU model and cores."""
    name = info.get("gpu") if info["device"] == "cuda" else f"{info['cpu']}-{info['cpu_count']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int = 2, repeats: int = 10, budget_s: float = 30.0) -> list[float]:
    """Times of ``fn()`` in ms: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    Stops early (after at least one timed call) once ``budget_s`` seconds of timed calls have
    passed, so that a slow configuration on a shared CPU ends in bounded time. On CUDA each call
    is timed with events around it (device time, launch gaps included).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - t_start < budget_s):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
