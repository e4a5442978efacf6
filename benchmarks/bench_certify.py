"""Certification throughput / plain inference throughput, same model and batch, one process.

Two ways to certify a batch, both with the gradient self-check on 2 points on the batches
``certify.SELF_CHECK_FIRST`` / ``SELF_CHECK_EVERY`` select (a block of 8 Wong-Kolter calls
holds exactly one):
``certify(model, x, y, cert)`` with a ``CertifiedBound`` computed once (what ``evaluate`` and
the CLI do per batch: the bound is verified once per dataset), and
``certify(model, x, y, bound)`` with the ``LipschitzBound`` (verifies the model on every call:
a fresh trace and a content digest of the weights). Goal (issue 4): ratio >= 0.95 for the
first. Each ratio: median (min-max) of the per-round ratios of interleaved repeats.
Usage: python benchmarks/bench_certify.py [--threads N] [--quick] [--repeats N]
"""

from __future__ import annotations

import torch
from _common import fmt, interleaved, parser, ratio, setup, summary, write

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
        {"inference": infer, "certify": cert_reused, "verified": cert_verified},
        repeats,
        block=8 if batch * shape[-1] * shape[-2] < 10**6 else 1,  # ~10 ms calls: blocks of 8
    )
    return {
        "model": name,
        "batch": batch,
        "inference_s": summary(t["inference"]),
        "certify_s": summary(t["certify"]),
        "throughput_ratio": ratio(t["inference"], t["certify"]),
        "verified_s": summary(t["verified"]),
        "verified_ratio": ratio(t["inference"], t["verified"]),
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    setup(args)
    reps = args.repeats or (6 if args.quick else 30)
    rows = [measure("wong_kolter", 1000, (1, 28, 28), reps)]
    rows.append(measure("c6f2", 64 if args.quick else 256, (3, 32, 32), max(3, reps // 3)))
    lines = [
        "| model | batch | inference (img/s) | certification, bound reused (img/s) "
        "| ratio, median (min-max) | goal | verifying the model per call (img/s) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["batch"]
        lines.append(
            f"| {r['model']} | {b} | {b / r['inference_s']['median']:.0f} | "
            f"{b / r['certify_s']['median']:.0f} | {fmt(r['throughput_ratio'])} | >= 0.95 | "
            f"{b / r['verified_s']['median']:.0f} | {fmt(r['verified_ratio'])} |"
        )
    write("certify_throughput", {"rows": rows}, "\n".join(lines), args)


if __name__ == "__main__":
    main()
