"""Issue 14 measures: how tight the engine is on modern Lipschitz architectures.

1. Fused linear residual blocks (LiResNet ``x + conv(x)``): guaranteed bound / exact norm of the
   block's dense matrix, over random blocks on 1x8x8 .. 4x16x16 grids; both the bound the engine
   returns (the FFT bound, and on maps of <= 1024 entries also the dense exact norm) and the FFT
   bound alone (what larger maps get).
2. Whole networks: the certified largest pairwise constant ``max K[t, i]`` over the best
   gradient lower bound found (largest ``||grad (F_t - F_i)||`` for that pair over random points
   and test images: a LOWER bound of the true constant), at random init and after a short LMT
   training on MNIST, with the time of ``certified()``.
3. LiResNet depth 4 / 8 / 16: the fused bound against the product bound ``prod (1 + ||C||)``.

Usage: python benchmarks/bench_architectures.py --data-dir data [--steps 150]
Writes benchmarks/results/architectures.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write

from lipmargin import models
from lipmargin.bounds import LipschitzBound, norms, operators
from lipmargin.data import load_dataset
from lipmargin.layers import LinearResidualConv
from lipmargin.losses import lmt_loss


def fused_block_ratios(repeats: int) -> dict:
    rows = {"engine": [], "fft_only": []}
    shapes = [(1, 8, 8), (2, 8, 8), (2, 12, 12), (4, 16, 16)]
    for seed in range(repeats):
        for c, h, w in shapes:
            torch.manual_seed(seed)
            block = LinearResidualConv(c).double().eval()
            block.conv.weight.data.normal_(0, 0.5 / (9 * c) ** 0.5)
            net = torch.nn.Sequential(block, torch.nn.Flatten()).double()
            exact = float(
                norms.dense_operator_norm(
                    lambda u, b=block: u + F.conv2d(u, b.conv.weight, padding=1), (c, h, w)
                )
            )
            rows["engine"].append(LipschitzBound(net, (c, h, w)).certified().value / exact)
            limit = operators.DENSE_LIMIT
            operators.DENSE_LIMIT = 0
            try:
                rows["fft_only"].append(LipschitzBound(net, (c, h, w)).certified().value / exact)
            finally:
                operators.DENSE_LIMIT = limit
    return {
        k: {"median": statistics.median(v), "max": max(v), "min": min(v), "n": len(v)}
        for k, v in rows.items()
    }


NETS = {
    "wong_kolter": {"activation": "maxmin"},
    "c4f3": {"activation": "maxmin"},
    "liresnet": {"depth": 8, "width": 16},
    "sll_net": {},
    "aol_net": {},
}


def gradient_lower_bound(model, t: int, i: int, points: torch.Tensor) -> float:
    """Largest ||grad_x (F_t - F_i)|| over ``points`` (batched; each row's gradient is its
    own in evaluation mode)."""
    x = points.clone().requires_grad_(True)
    z = model(x)
    (g,) = torch.autograd.grad((z[:, t] - z[:, i]).sum(), x)
    return float(g.flatten(1).norm(dim=1).max())


def network_row(name: str, kwargs: dict, shape, train_x, train_y, test_x, steps: int) -> dict:
    torch.manual_seed(0)
    model = models.build(name, **kwargs)
    bound = LipschitzBound(model, shape, power_steps=5)
    out = {"net": name, "params": sum(p.numel() for p in model.parameters())}
    for stage in ("init", "trained"):
        if stage == "trained":
            if steps == 0:
                break
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            model.train()
            bound.train()
            t0 = time.perf_counter()
            for _ in range(steps):
                idx = torch.randint(0, train_x.shape[0], (50,))
                logits = model(train_x[idx])
                loss = lmt_loss(logits, train_y[idx], bound(), 2.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
            out["train_s_per_step"] = (time.perf_counter() - t0) / steps
        model.eval()
        t0 = time.perf_counter()
        cert = bound.certified()
        out[f"{stage}_certified_s"] = time.perf_counter() - t0
        pw = cert.pairwise
        t, i = divmod(int(pw.argmax()), pw.shape[1])
        g = torch.Generator().manual_seed(1)
        noise = torch.rand((256, *shape), generator=g)
        gauss = 0.5 + torch.randn((256, *shape), generator=g)
        pts = torch.cat([test_x[:256], noise, gauss])
        lower = gradient_lower_bound(model, t, i, pts)
        out[f"{stage}_bound"] = float(pw[t, i])
        out[f"{stage}_lower"] = lower
        out[f"{stage}_ratio"] = float(pw[t, i]) / lower
    return out


def wrn_row() -> dict:
    torch.manual_seed(0)
    model = models.build("wrn16_4", in_channels=3, input_size=32).eval()
    bound = LipschitzBound(model, (3, 32, 32))
    t0 = time.perf_counter()
    cert = bound.certified()
    secs = time.perf_counter() - t0
    pw = cert.pairwise
    t, i = divmod(int(pw.argmax()), pw.shape[1])
    pts = torch.rand((64, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    lower = gradient_lower_bound(model, t, i, pts)
    return {
        "net": "wrn16_4 (3x32x32)",
        "init_bound": float(pw[t, i]),
        "init_lower": lower,
        "init_ratio": float(pw[t, i]) / lower,
        "init_certified_s": secs,
    }


def depth_rows() -> list[dict]:
    rows = []
    for depth in (4, 8, 16):
        torch.manual_seed(0)
        net = models.build("liresnet", depth=depth, width=16)
        fused = LipschitzBound(net, (1, 28, 28)).certified()
        product = 1.0
        for m in net.modules():
            if isinstance(m, LinearResidualConv):
                product *= 1.0 + float(norms.conv_fft_bound(m.conv.weight, (14, 14), 1, 1))
        blocks = [r.bound for r in fused.layers if r.kind == "residual"]
        rows.append(
            {
                "depth": depth,
                "fused_blocks_product": float(torch.tensor(blocks).prod()),
                "product_bound_blocks": product,
                "network_bound": fused.value,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="(accepted for run_all; unused)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = load_dataset("mnist", "train", args.data_dir)
    test = load_dataset("mnist", "test", args.data_dir)
    train_x, train_y = train[0], train[1]
    test_x = test[0]
    fused = fused_block_ratios(args.repeats)
    nets = [
        network_row(n, kw, (1, 28, 28), train_x, train_y, test_x, args.steps)
        for n, kw in NETS.items()
    ]
    nets.append(wrn_row())
    depths = depth_rows()
    lines = [
        "Fused LiResNet block bound / exact dense norm "
        f"({fused['engine']['n']} random blocks, 1x8x8 to 4x16x16):",
        "",
        "| bound | median | max | min |",
        "|---|---|---|---|",
    ]
    for k, label in (
        ("engine", "engine (FFT, dense exact when <= 1024 entries)"),
        ("fft_only", "FFT bound alone (larger maps)"),
    ):
        r = fused[k]
        lines.append(f"| {label} | {r['median']:.4f} | {r['max']:.4f} | {r['min']:.4f} |")
    lines += [
        "",
        f"Whole networks: certified max K[t, i] / best gradient lower bound for that pair "
        f"(768 points); trained = {args.steps} LMT steps (c = 2, batch 50, Adam 1e-3) on MNIST:",
        "",
        "| net | params | init bound | init ratio | trained bound | trained ratio "
        "| certified() s | train step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in nets:
        lines.append(
            f"| {r['net']} | {r.get('params', '')} | {r['init_bound']:.4g} | "
            f"{r['init_ratio']:.3f} | {r.get('trained_bound', float('nan')):.4g} | "
            f"{r.get('trained_ratio', float('nan')):.3f} | "
            f"{r.get('trained_certified_s', r['init_certified_s']):.2f} | "
            f"{r.get('train_s_per_step', float('nan')):.3f} |"
        )
    lines += [
        "",
        "LiResNet (width 16, random init): product over blocks of the fused ||I + C|| against "
        "the product bound prod (1 + ||C||):",
        "",
        "| depth | fused blocks | product bound | network bound |",
        "|---|---|---|---|",
    ]
    for r in depths:
        lines.append(
            f"| {r['depth']} | {r['fused_blocks_product']:.4g} | "
            f"{r['product_bound_blocks']:.4g} | {r['network_bound']:.4g} |"
        )
    write("architectures", {"fused": fused, "nets": nets, "depths": depths}, "\n".join(lines), args)


if __name__ == "__main__":
    main()
