"""LMT training step time / unregularised step time, same model and batch, one process.

Rows (issue 16, goal <= 1.10 each), the settings of docs/ABLATION.md's Wong-Kolter and 4C3F
runs: Wong-Kolter at batch 50 with power_steps 1 (the paper's Alg. 1), with the power iteration
every 4th step (``power_every = 4``: skipped steps reuse each map's held d sigma / dW), and with
the lazy bound (``bound_every = k``: the steps between reuse the last bound, detached, and the
computed steps scale its gradient by k, ``lazy_gradient = "scaled"``; or they use a held
first-order model, ``"held"``) at k = 4, 8, 16 with 1 to 16 products per computed bound moved by
power iteration or Lanczos (``power_method``); 4C3F MaxMin at batch 50 with power_steps 10 (the
setting its training needs), every step, every 2nd (the shipped recipe) and with
``bound_every = 4`` (scaled; held; held with Lanczos) and 6 and 8 (held with Lanczos); and,
in the full run, 6C2F at batch 128.
Each ratio: median (min-max) of the per-round ratios of interleaved repeats, each repeat the
mean of a block of consecutive steps.
Usage: python benchmarks/bench_train_step.py [--threads N] [--quick] [--repeats N]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import fmt, interleaved, parser, ratio, setup, summary, write

from lipmargin import models
from lipmargin.bounds import LipschitzBound
from lipmargin.losses import lmt_loss


def measure(
    name: str,
    batch: int,
    shape: tuple[int, int, int],
    repeats: int,
    power_steps: int = 1,
    power_every: int = 1,
    bound_every: int = 1,
    lazy_gradient: str = "held",
    power_method: str = "power",
    block: int = 1,
    **model_kw,
) -> dict:
    torch.manual_seed(0)
    model = models.build(name, in_channels=shape[0], input_size=shape[1], **model_kw)
    bound = LipschitzBound(
        model,
        shape,
        power_steps=power_steps,
        power_every=power_every,
        bound_every=bound_every,
        lazy_gradient=lazy_gradient,
        power_method=power_method,
    )
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

    t = interleaved({"plain": plain, "lmt": lmt}, repeats, block=block)
    label = name + "".join(f" {k}={v}" for k, v in model_kw.items())
    return {
        "model": label,
        "batch": batch,
        "power_steps": power_steps,
        "power_every": power_every,
        "bound_every": bound_every,
        "lazy_gradient": lazy_gradient if bound_every > 1 else "-",
        "power_method": power_method if power_steps > 2 else "-",
        "plain_s": summary(t["plain"]),
        "lmt_s": summary(t["lmt"]),
        "ratio": ratio(t["lmt"], t["plain"]),
    }


def _lazy(every: int, steps: int, gradient: str, method: str) -> dict:
    return {
        "bound_every": every,
        "power_steps": steps,
        "lazy_gradient": gradient,
        "power_method": method,
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    setup(args)
    reps = args.repeats or (6 if args.quick else 30)
    wk = ("wong_kolter", 50, (1, 28, 28))
    c4f3 = ("c4f3", 50, (1, 28, 28))
    few = max(4, reps // 2)
    rows = [
        measure(*wk, reps, block=10),
        measure(*wk, reps, power_every=4, block=10),
        measure(*wk, reps, **_lazy(4, 1, "scaled", "power"), block=12),
        measure(*wk, reps, **_lazy(4, 1, "held", "power"), block=12),
        measure(*wk, reps, **_lazy(4, 10, "scaled", "power"), block=12),
        measure(*wk, reps, **_lazy(4, 10, "scaled", "lanczos"), block=12),
        measure(*wk, reps, **_lazy(8, 8, "scaled", "power"), block=16),
        measure(*wk, reps, **_lazy(8, 8, "held", "power"), block=16),
        measure(*wk, reps, **_lazy(8, 8, "held", "lanczos"), block=16),
        measure(*wk, reps, **_lazy(16, 16, "scaled", "lanczos"), block=32),
        measure(*c4f3, few, power_steps=10, activation="maxmin"),
        measure(*c4f3, few, power_steps=10, power_every=2, block=2, activation="maxmin"),
        measure(*c4f3, few, **_lazy(4, 10, "scaled", "power"), block=4, activation="maxmin"),
        measure(*c4f3, few, **_lazy(4, 10, "held", "power"), block=4, activation="maxmin"),
        measure(*c4f3, few, **_lazy(4, 10, "held", "lanczos"), block=4, activation="maxmin"),
        measure(*c4f3, few, **_lazy(6, 10, "held", "lanczos"), block=6, activation="maxmin"),
        measure(*c4f3, few, **_lazy(8, 10, "held", "lanczos"), block=8, activation="maxmin"),
    ]
    if not args.quick:
        rows.append(measure("c6f2", 128, (3, 32, 32), max(5, reps // 3)))
    lines = [
        "| model | batch | power steps | method | power every | bound every | lazy gradient "
        "| plain step (ms) | LMT step (ms) | ratio, median (min-max) | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['power_steps']} | {r['power_method']} | "
            f"{r['power_every']} | "
            f"{r['bound_every']} | {r['lazy_gradient']} | {1e3 * r['plain_s']['median']:.2f} | "
            f"{1e3 * r['lmt_s']['median']:.2f} | {fmt(r['ratio'])} | <= 1.10 |"
        )
    write("train_step", {"rows": rows}, "\n".join(lines), args)


if __name__ == "__main__":
    main()
