"""Shared helpers of the benchmark scripts: thread setup, interleaved timing, result files.

Every script takes ``--threads N`` (torch intra-op threads; ``run_all.py`` also sets
``OMP_NUM_THREADS=N`` in its environment) and ``--quick`` (few repeats, small cases: a smoke
run for developers, ``make bench-quick``, whose results go to ``results/quick/`` and never to
the README). Ratios are computed per interleaved repeat (both sides measured back to back under
the same conditions) and reported as median with min and max over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lipmargin.runtime import allocator, steady_allocator

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    ap.add_argument("--quick", action="store_true", help="few repeats, results/quick/")
    return ap


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    steady_allocator()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable} usable), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
        f"allocator: {allocator()}"
    )


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, block: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternation (same conditions): one list
    of ``repeats`` times per function, index ``i`` of every list from the same round. Each
    time is the mean over ``block`` consecutive calls (steps of a few milliseconds are too
    short to time one by one on a shared machine); the order alternates between rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(repeats):
        for k, f in items if r % 2 == 0 else items[::-1]:
            t = time.perf_counter()
            for _ in range(block):
                f()
            times[k].append((time.perf_counter() - t) / block)
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median / min / max of the per-round ratios ``num[i] / den[i]``."""
    return summary([a / b for a, b in zip(num, den, strict=True)])


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def out_dir(args: argparse.Namespace) -> Path:
    return RESULTS / "quick" if args.quick else RESULTS


def write(name: str, data: dict, table: str, args: argparse.Namespace) -> None:
    """``<name>_<threads>t.json`` and ``.md`` in the results folder."""
    folder = out_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{torch.get_num_threads()}t"
    data = {"machine": machine(), "quick": bool(args.quick), **data}
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (folder / f"{stem}.md").write_text(f"Machine: {machine()}\n\n{table}\n")
    print(f"Machine: {machine()}\n\n{table}\n")
