"""LMT training step time / unregularised step time, same model and batch, one process.

Goals (issue 5): <= 1.15 for the Wong-Kolter net at batch 50, <= 1.10 for 6C2F at batch 128.
Usage: python benchmarks/bench_train_step.py [--repeats N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import interleaved, write

from lipmargin import models
from lipmargin.bounds import LipschitzBound
from lipmargin.losses import lmt_loss


def measure(name: str, batch: int, shape: tuple[int, int, int], repeats: int) -> dict:
    torch.manual_seed(0)
    model = models.build(name, in_channels=shape[0], input_size=shape[1])
    bound = LipschitzBound(model, shape)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    model.train()
    bound.train()

    def plain() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def lmt() -> None:
        loss = lmt_loss(model(x), y, bound(), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = interleaved({"plain": plain, "lmt": lmt}, repeats)
    return {
        "model": name,
        "batch": batch,
        "plain_s": t["plain"],
        "lmt_s": t["lmt"],
        "ratio": t["lmt"] / t["plain"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    rows = [
        measure("wong_kolter", 50, (1, 28, 28), args.repeats) | {"goal": 1.15},
        measure("c6f2", 128, (3, 32, 32), args.repeats // 2) | {"goal": 1.10},
    ]
    lines = [
        "| model | batch | plain step (ms) | LMT step (ms) | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {1e3 * r['plain_s']:.2f} | "
            f"{1e3 * r['lmt_s']:.2f} | {r['ratio']:.3f} | <= {r['goal']} |"
        )
    write("train_step", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
