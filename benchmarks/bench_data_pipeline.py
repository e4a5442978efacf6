"""In-memory indexing vs the DataLoader pipeline: LMT training time over a few hundred steps on
real MNIST (Wong-Kolter net, batch 50, one thread), and the data part alone (issue 17).

Each variant reads the same batches (``lipmargin.data.epoch_batches``) and runs the same LMT
step (as ``lipmargin.train``: copy to the device, optional augmentation, forward, bound, loss,
backward, Adam). Variants are timed in alternation; the median of ``--repeats`` is reported.
Usage: OMP_NUM_THREADS=1 python benchmarks/bench_data_pipeline.py --data-dir data [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import write

from lipmargin import models
from lipmargin.bounds import LipschitzBound
from lipmargin.data import (
    TensorPairDataset,
    augment_batch,
    epoch_batches,
    load_dataset,
    make_loader,
)
from lipmargin.losses import lmt_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_dataset("mnist", "train", args.data_dir)
    n = args.steps * args.batch
    ds = TensorPairDataset(x[:n], y[:n])
    torch.manual_seed(0)
    model = models.build("wong_kolter")
    bound = LipschitzBound(model, (1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    bound.train()

    def source(kind: str, epoch: int):
        batches = epoch_batches(n, args.batch, seed=0, epoch=epoch)
        if kind == "memory":
            return (ds[idx] for idx in batches)
        workers = int(kind.split("-")[1])
        return make_loader(ds, batches, num_workers=workers)

    def run(kind: str, epoch: int, step: bool, augment: str = "none") -> float:
        gen = torch.Generator().manual_seed(epoch)
        t = time.perf_counter()
        for xb, yb in source(kind, epoch):
            xb = augment_batch(xb.to("cpu"), augment, gen)
            if step:
                loss = lmt_loss(model(xb), yb.to("cpu"), bound(), 1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return time.perf_counter() - t

    variants = {
        "memory": ("memory", "none"),
        "dataloader, 0 workers": ("loader-0", "none"),
        "dataloader, 1 worker": ("loader-1", "none"),
        "memory + shift": ("memory", "shift"),
    }
    rows = []
    for step in (False, True):
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats + 1):
            for name, (kind, aug) in variants.items():
                s = run(kind, r, step, aug)
                if r:  # the first round is a warm-up
                    times[name].append(s)
        for name in variants:
            rows.append(
                (("training" if step else "data only"), name, statistics.median(times[name]))
            )
    base = {what: s for what, name, s in rows if name == "memory"}
    lines = [
        f"{args.steps} steps of batch {args.batch} on MNIST (Wong-Kolter, LMT), one thread",
        "",
        "| measured | pipeline | seconds | ms / step | vs memory |",
        "|---|---|---|---|---|",
    ]
    for what, name, s in rows:
        lines.append(
            f"| {what} | {name} | {s:.3f} | {1000 * s / args.steps:.2f} | {s / base[what]:.3f} |"
        )
    write(
        "data_pipeline",
        {"steps": args.steps, "batch": args.batch, "rows": rows},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
