"""Bound tightness and time per convolution and per network.

Per convolution of the paper's MNIST net (random and, if given, trained weights): the
guaranteed FFT bound, power iteration (an estimate from below), the paper's closed-form Cor. 1
bound, the paper-style long power iteration, and the exact norm from the dense matrix; then
the time of ``certified()`` for whole networks (goal: WRN-16-4 at 32x32 within 5 s).
Usage: python benchmarks/bench_bounds.py [--run runs/mnist-lmt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write
from torch import nn

from lipmargin import models
from lipmargin.bounds import LipschitzBound, norms


def conv_rows(model: nn.Module, shape: tuple[int, ...], label: str) -> list[dict]:
    rows = []
    x = torch.zeros(1, *shape)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            in_shape = tuple(x.shape[1:]) if not rows else rows[-1]["out_shape"]
            w = m.weight.detach().double()

            def apply(u, w=w, m=m):
                return F.conv2d(u, w, None, m.stride, m.padding, m.dilation, m.groups)

            t = time.perf_counter()
            fft = float(
                norms.conv_fft_bound(w, in_shape[1:], m.stride, m.padding, m.dilation, m.groups)
            )
            t_fft = time.perf_counter() - t
            closed = float(norms.conv_closed_form_bound(w, m.stride, m.dilation, m.groups))
            u0 = torch.randn(1, *in_shape, dtype=torch.float64)
            _, pi1 = norms.power_iteration(apply, u0, steps=1)
            t = time.perf_counter()
            _, pi_long = norms.power_iteration(apply, u0, steps=500)
            t_pi = time.perf_counter() - t
            exact = float(norms.dense_operator_norm(apply, in_shape))
            out_shape = tuple(apply(u0).shape[1:])
            rows.append(
                {
                    "net": label,
                    "layer": name,
                    "in_shape": in_shape,
                    "out_shape": out_shape,
                    "exact": exact,
                    "fft": fft,
                    "fft_over_exact": fft / exact,
                    "cor1": closed,
                    "cor1_over_exact": closed / exact,
                    "power_1_step": float(pi1),
                    "power_500_steps": float(pi_long),
                    "fft_ms": 1e3 * t_fft,
                    "power_500_ms": 1e3 * t_pi,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a trained run folder to include")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = conv_rows(models.build("wong_kolter"), (1, 28, 28), "wong_kolter (random init)")
    if args.run:
        from lipmargin.runs import load_run

        model, _, _, _, _ = load_run(args.run)
        rows += conv_rows(model, (1, 28, 28), f"wong_kolter ({Path(args.run).name})")
    nets = []
    for name, shape in [
        ("wong_kolter", (1, 28, 28)),
        ("c6f2", (3, 32, 32)),
        ("wrn16_4", (3, 32, 32)),
        ("resnet_small", (3, 32, 32)),
    ]:
        model = models.build(name, in_channels=shape[0], input_size=shape[1]).eval()
        t = time.perf_counter()
        bound = LipschitzBound(model, shape)
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        cert = bound.certified()
        t_cert = time.perf_counter() - t
        nets.append({"net": name, "init_s": t_init, "certified_s": t_cert, "value": cert.value})
    lines = [
        "| net | layer | input | exact | FFT bound (ratio) | Cor. 1 (ratio) | power 1 step | "
        "power 500 | FFT ms | power-500 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['layer']} | {r['in_shape']} | {r['exact']:.4f} | "
            f"{r['fft']:.4f} ({r['fft_over_exact']:.4f}) | {r['cor1']:.4f} "
            f"({r['cor1_over_exact']:.3f}) | {r['power_1_step']:.4f} | "
            f"{r['power_500_steps']:.4f} | {r['fft_ms']:.1f} | {r['power_500_ms']:.0f} |"
        )
    lines += ["", "| net | trace + init (s) | certified() (s) | bound |", "|---|---|---|---|"]
    for n in nets:
        lines.append(
            f"| {n['net']} | {n['init_s']:.2f} | {n['certified_s']:.2f} | {n['value']:.4g} |"
        )
    write("bounds", {"convolutions": rows, "networks": nets}, "\n".join(lines))


if __name__ == "__main__":
    main()
