"""Run every benchmark and rewrite the README's performance section from their results.

Usage: python benchmarks/run_all.py [--run runs/mnist-lmt]   (or `make bench`)
Each script writes benchmarks/results/<name>.json and .md; the README section between the
`<!-- bench:start -->` and `<!-- bench:end -->` markers is replaced by those tables.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = {
    "certify_throughput": ["bench_certify.py"],
    "train_step": ["bench_train_step.py"],
    "bounds": ["bench_bounds.py"],
}
TITLES = {
    "certify_throughput": "Certification throughput / plain inference (goal >= 0.95)",
    "train_step": "LMT training step / unregularised step (goals <= 1.15 and <= 1.10)",
    "bounds": "Bound tightness per convolution and certified() time per network",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a trained run folder for bench_bounds.py")
    args = ap.parse_args()
    for name, cmd in SCRIPTS.items():
        extra = ["--run", str(Path(args.run).resolve())] if name == "bounds" and args.run else []
        subprocess.run([sys.executable, str(HERE / cmd[0]), *extra], check=True, cwd=HERE)
    parts = [
        "<!-- bench:start -->",
        "",
        "Produced by `make bench` (`python benchmarks/run_all.py"
        + (f" --run {args.run}" if args.run else "")
        + "`).",
        "",
    ]
    for name, title in TITLES.items():
        parts += [f"### {title}", "", (HERE / "results" / f"{name}.md").read_text().strip(), ""]
    parts.append("<!-- bench:end -->")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index("<!-- bench:start -->"), text.index("<!-- bench:end -->")
    readme.write_text(text[:start] + "\n".join(parts) + text[end + len("<!-- bench:end -->") :])
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
