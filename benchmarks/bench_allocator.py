"""Training step time with glibc's default allocator settings / with ``steady_allocator``.

``lipmargin.runtime.steady_allocator`` (called by the command line at start) keeps freed memory
in the process, so that the tensors every step allocates anew are not page-faulted in afresh.
``mallopt`` is process-wide and glibc's defaults cannot be restored once changed, so the two
sides run in separate worker processes (``LIPMARGIN_ALLOCATOR=default`` for the first), started
alternately, each timing blocks of plain and LMT steps after a warm-up; every row gives the
median (min-max) over the rounds of the per-round ratio default / steady (> 1: the steady
allocator is faster). The settings are docs/ABLATION.md's: Wong-Kolter (1 power step, every
step) and 4C3F MaxMin (10 products per computed bound, ``bound_every = 8``, held, Lanczos).
Usage: python benchmarks/bench_allocator.py [--threads N] [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import fmt, parser, summary, write

from lipmargin import models
from lipmargin.bounds import LipschitzBound
from lipmargin.losses import lmt_loss
from lipmargin.runtime import steady_allocator

CASES = {
    "wong_kolter": ({}, {"power_steps": 1}, 40),
    "c4f3": (
        {"activation": "maxmin"},
        {"power_steps": 10, "bound_every": 8, "lazy_gradient": "held", "power_method": "lanczos"},
        8,
    ),
}


def worker(case: str, steady: bool, blocks: int) -> dict:
    """Median seconds per plain and per LMT step of one process (blocks of steps)."""
    if steady:
        steady_allocator()
    model_kw, bound_kw, block = CASES[case]
    torch.manual_seed(0)
    model = models.build(case, in_channels=1, input_size=28, **model_kw)
    bound = LipschitzBound(model, (1, 28, 28), **bound_kw)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))
    model.train()
    bound.train()

    def step(lmt: bool) -> None:
        logits = model(x)
        loss = lmt_loss(logits, y, bound(), 1.0) if lmt else F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out: dict[str, list[float]] = {"plain": [], "lmt": []}
    for i in range(blocks + 1):  # the first block warms up
        for kind in ("plain", "lmt"):
            t = time.perf_counter()
            for _ in range(block):
                step(kind == "lmt")
            if i:
                out[kind].append((time.perf_counter() - t) / block)
    return {k: statistics.median(v) for k, v in out.items()}


def run_worker(case: str, steady: bool, blocks: int) -> dict:
    env = dict(os.environ)
    if not steady:
        env["LIPMARGIN_ALLOCATOR"] = "default"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--blocks", str(blocks)]
    cmd += ["--threads", str(torch.get_num_threads())] + (["--steady"] if steady else [])
    done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=None, help="rounds (pairs of processes)")
    ap.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--steady", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # no steady_allocator here unless asked: this is what is measured
        print(json.dumps(worker(args.worker, args.steady, args.blocks)))
        return
    rounds = args.repeats or (1 if args.quick else 5)
    cases = ["wong_kolter"] if args.quick else list(CASES)
    rows = []
    for case in cases:
        blocks = 2 if args.quick else 5
        per: dict[str, list[dict]] = {"default": [], "steady": []}
        for r in range(rounds):
            for side in ("default", "steady") if r % 2 == 0 else ("steady", "default"):
                per[side].append(run_worker(case, side == "steady", blocks))
        row = {"model": case, "rounds": rounds}
        for kind in ("plain", "lmt"):
            d = [p[kind] for p in per["default"]]
            s = [p[kind] for p in per["steady"]]
            row[f"{kind}_default_s"] = summary(d)
            row[f"{kind}_steady_s"] = summary(s)
            row[f"{kind}_speedup"] = summary([a / b for a, b in zip(d, s, strict=True)])
        rows.append(row)
    lines = [
        "| model | step | glibc defaults (ms) | steady_allocator (ms) "
        "| default / steady, median (min-max) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for kind in ("plain", "lmt"):
            lines.append(
                f"| {r['model']} | {kind} | {1e3 * r[f'{kind}_default_s']['median']:.2f} | "
                f"{1e3 * r[f'{kind}_steady_s']['median']:.2f} | {fmt(r[f'{kind}_speedup'])} |"
            )
    write("allocator", {"rows": rows}, "\n".join(lines), args)


if __name__ == "__main__":
    main()
