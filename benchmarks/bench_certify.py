"""Certification throughput / plain inference throughput, same model and batch, one process.

Two ways to certify a batch, both with the gradient self-check on 2 points per batch:
``certify(model, x, y, cert)`` with a ``CertifiedBound`` computed once (what ``evaluate`` and
the CLI do per batch: the bound is verified once per dataset), and
``certify(model, x, y, bound)`` with the ``LipschitzBound`` (verifies the model on every call:
a fresh trace and a content digest of the weights). Goal (issue 4): ratio >= 0.95 for the
first.
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
    cert = bound.certified()  # computed once, cached
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def infer() -> None:
        with torch.no_grad():
            model(x).argmax(1)

    def cert_reused() -> None:
        certify(model, x, y, cert)

    def cert_verified() -> None:
        certify(model, x, y, bound)

    t = interleaved(
        {"inference": infer, "certify": cert_reused, "verified": cert_verified}, repeats
    )
    return {
        "model": name,
        "batch": batch,
        "inference_s": t["inference"],
        "certify_s": t["certify"],
        "throughput_ratio": t["inference"] / t["certify"],
        "verified_s": t["verified"],
        "verified_ratio": t["inference"] / t["verified"],
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
        "| model | batch | inference (img/s) | certification (img/s) | ratio | goal "
        "| verifying the model per call (img/s) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['batch'] / r['inference_s']:.0f} | "
            f"{r['batch'] / r['certify_s']:.0f} | {r['throughput_ratio']:.3f} | >= 0.95 | "
            f"{r['batch'] / r['verified_s']:.0f} | {r['verified_ratio']:.3f} |"
        )
    write("certify_throughput", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
