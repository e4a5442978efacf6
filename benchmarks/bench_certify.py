"""Certification throughput / plain inference throughput, same model and batch, one process.

The bound is computed once per model and cached, so certifying a batch costs one forward pass
plus the margin arithmetic. Goal (issue 4): ratio >= 0.95.
Usage: python benchmarks/bench_certify.py [--repeats N]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, write

from lipmargin import models
from lipmargin.bounds import LipschitzBound
from lipmargin.certify import certify


def measure(name: str, batch: int, shape: tuple[int, int, int], repeats: int) -> dict:
    torch.manual_seed(0)
    model = models.build(name, in_channels=shape[0], input_size=shape[1]).eval()
    bound = LipschitzBound(model, shape)
    bound.certified()  # computed once, cached
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def infer() -> None:
        with torch.no_grad():
            model(x).argmax(1)

    def cert() -> None:
        certify(model, x, y, bound)

    t = interleaved({"inference": infer, "certify": cert}, repeats)
    return {
        "model": name,
        "batch": batch,
        "inference_s": t["inference"],
        "certify_s": t["certify"],
        "throughput_ratio": t["inference"] / t["certify"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rows = [
        measure("wong_kolter", 1000, (1, 28, 28), args.repeats),
        measure("c6f2", 256, (3, 32, 32), max(5, args.repeats // 3)),
    ]
    lines = [
        "| model | batch | inference (img/s) | certification (img/s) | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['batch'] / r['inference_s']:.0f} | "
            f"{r['batch'] / r['certify_s']:.0f} | {r['throughput_ratio']:.3f} | >= 0.95 |"
        )
    write("certify_throughput", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
