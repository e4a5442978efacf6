"""Run every benchmark and rewrite the README's performance section from their results.

Usage: python benchmarks/run_all.py [--run runs/mnist-lmt] [--threads 1 2] [--quick]
(or `make bench`, `make bench-quick`). Each script runs once per thread count in its own
process with ``OMP_NUM_THREADS`` set to that count and writes
``benchmarks/results/<name>_<N>t.json`` and ``.md``; the README section between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers is replaced by those tables.
``--quick`` (a smoke run of well under a minute, one thread) writes to ``results/quick/`` and
leaves the README alone; the test suite runs neither.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = {
    "certify_throughput": "bench_certify.py",
    "train_step": "bench_train_step.py",
    "bounds": "bench_bounds.py",
    "allocator": "bench_allocator.py",
}
TITLES = {
    "certify_throughput": "Certification throughput / plain inference (goal >= 0.95)",
    "train_step": "LMT training step / unregularised step (goal <= 1.10)",
    "bounds": "Bound tightness per convolution and certified() time per network "
    "(goal: WRN-16-4 within 1 s)",
    "allocator": "Training step with glibc's default allocator / with "
    "lipmargin.runtime.steady_allocator (separate processes)",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a trained run folder for bench_bounds.py")
    ap.add_argument("--threads", type=int, nargs="+", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--readme-only", action="store_true", help="rebuild the README section from results/"
    )
    args = ap.parse_args()
    threads = args.threads or ([1] if args.quick else [1, 2])
    for t in [] if args.readme_only else threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        for name, script in SCRIPTS.items():
            extra = []
            if name == "bounds" and args.run:
                extra = ["--run", str(Path(args.run).resolve())]
            extra += ["--quick"] if args.quick else []
            cmd = [sys.executable, str(HERE / script), "--threads", str(t), *extra]
            subprocess.run(cmd, check=True, cwd=HERE, env=env)
    if args.quick:
        print(f"quick results in {HERE / 'results' / 'quick'} (README not touched)")
        return
    parts = [
        "<!-- bench:start -->",
        "",
        "Produced by `make bench` (`python benchmarks/run_all.py"
        + (f" --run {args.run}" if args.run else "")
        + "`): every ratio is the median (min-max) of per-round ratios over interleaved "
        "repeats in one process (each repeat the mean of a block of consecutive calls where "
        "calls take milliseconds); each thread count in its own process with `OMP_NUM_THREADS` "
        "set to it, and glibc's allocator told to keep freed memory "
        "(`lipmargin.runtime.steady_allocator`, as the command line does: with glibc's "
        "defaults a 1000-image Wong-Kolter forward pass takes 12 or 23 ms depending on page "
        "faults, decided per process; the last table measures the difference).",
        "",
    ]
    for name, title in TITLES.items():
        parts += [f"### {title}", ""]
        for t in threads:
            table = (HERE / "results" / f"{name}_{t}t.md").read_text().strip()
            parts += [f"**{t} thread{'s' if t > 1 else ''}.** " + table, ""]
    parts.append("<!-- bench:end -->")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index("<!-- bench:start -->"), text.index("<!-- bench:end -->")
    readme.write_text(text[:start] + "\n".join(parts) + text[end + len("<!-- bench:end -->") :])
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
