"""Bound tightness and time per convolution and per network.

Per convolution of the paper's MNIST net (random and, if given, trained weights): the
guaranteed FFT bound, power iteration (an estimate from below), the paper's closed-form Cor. 1
bound, the paper-style long power iteration, and the exact norm from the dense matrix (full run
only); then the time of ``certified()`` for whole networks (goal, issue 16: WRN-16-4 at 32x32
within 1 s), median (min-max) over repeats, each on a fresh ``LipschitzBound`` (the result is
cached per weights). The full run also times ``certified()`` with the plain all-frequency FFT
bound (``norms._conv_fft_bound_reference``, the pre-issue-16 computation) in the same process,
interleaved, and compares the two values.
Usage: python benchmarks/bench_bounds.py [--threads N] [--quick] [--run runs/mnist-lmt]
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import parser, setup, summary, write
from torch import nn

from lipmargin import models
from lipmargin.bounds import LipschitzBound, checks, norms


def conv_rows(model: nn.Module, shape: tuple[int, ...], label: str) -> list[dict]:
    rows = []
    x = torch.zeros(1, *shape)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            in_shape = tuple(x.shape[1:]) if not rows else rows[-1]["out_shape"]
            w = m.weight.detach().double()

            def apply(u, w=w, m=m):
                return F.conv2d(u, w, None, m.stride, m.padding, m.dilation, m.groups)

            t_all = []
            for _ in range(3):  # median of 3 (the first call of a process imports SciPy)
                t = time.perf_counter()
                fft = float(
                    norms.conv_fft_bound(w, in_shape[1:], m.stride, m.padding, m.dilation, m.groups)
                )
                t_all.append(time.perf_counter() - t)
            t_fft = sorted(t_all)[1]
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


@contextlib.contextmanager
def reference_fft():
    """``conv_fft_bound`` replaced by the plain all-frequency computation."""
    fast = norms.conv_fft_bound
    norms.conv_fft_bound = norms._conv_fft_bound_reference
    try:
        yield
    finally:
        norms.conv_fft_bound = fast


#: seconds spent in the Jacobian self-check during the last ``time_certified``
SELF_CHECK = [0.0]


@contextlib.contextmanager
def timed_self_check():
    """Time ``checks.check_jacobians`` (part of every ``certified()`` that computes)."""
    original = checks.check_jacobians

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SELF_CHECK[0] += time.perf_counter() - t

    checks.check_jacobians = timed
    try:
        yield
    finally:
        checks.check_jacobians = original


def time_certified(model: nn.Module, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """(trace + init seconds, certified() seconds, its CPU seconds, value) on a fresh bound;
    ``SELF_CHECK[0]``: the seconds of that call's Jacobian self-check. CPU time
    (``time.process_time``, all threads) is less sensitive to other jobs on the machine than
    wall time."""
    t = time.perf_counter()
    bound = LipschitzBound(model, shape)
    t_init = time.perf_counter() - t
    SELF_CHECK[0] = 0.0
    with timed_self_check():
        t, c = time.perf_counter(), time.process_time()
        cert = bound.certified()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    return t_init, wall, cpu, float(cert.value)


NETS = [
    ("wong_kolter", (1, 28, 28), {}),
    ("c4f3", (1, 28, 28), {"activation": "maxmin"}),
    ("c6f2", (3, 32, 32), {}),
    ("resnet_small", (3, 32, 32), {}),
    ("wrn16_4", (3, 32, 32), {}),
]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", help="a trained run folder to include")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    setup(args)
    torch.manual_seed(0)
    rows = []
    if not args.quick:
        rows = conv_rows(models.build("wong_kolter"), (1, 28, 28), "wong_kolter (random init)")
        if args.run:
            from lipmargin.runs import load_run

            model, _, _, _, _ = load_run(args.run)
            rows += conv_rows(model, (1, 28, 28), f"wong_kolter ({Path(args.run).name})")
    reps = args.repeats or (1 if args.quick else 5)
    ref_reps = 0 if args.quick else 2
    nets = []
    for name, shape, kw in NETS:
        torch.manual_seed(0)
        model = models.build(name, in_channels=shape[0], input_size=shape[1], **kw).eval()
        time_certified(model, shape)  # warm-up
        inits, fast, ref, fast_cpu, ref_cpu, check = [], [], [], [], [], []
        value = ref_value = None
        for r in range(reps):
            t_init, t_cert, c_cert, value = time_certified(model, shape)
            inits.append(t_init)
            fast.append(t_cert)
            fast_cpu.append(c_cert)
            check.append(SELF_CHECK[0])
            if r < ref_reps:
                with reference_fft():
                    _, t_ref, c_ref, ref_value = time_certified(model, shape)
                ref.append(t_ref)
                ref_cpu.append(c_ref)
        label = name + "".join(f" {k}={v}" for k, v in kw.items())
        row = {
            "net": label,
            "init_s": summary(inits),
            "certified_s": summary(fast),
            "certified_cpu_s": summary(fast_cpu),
            "self_check_s": summary(check),
            "value": value,
        }
        if ref:
            row |= {
                "reference_certified_s": summary(ref),
                "reference_certified_cpu_s": summary(ref_cpu),
                "reference_value": ref_value,
                "value_rel_diff": (value - ref_value) / ref_value,
                "speedup": summary([a / b for a, b in zip(ref, fast, strict=False)]),
            }
        nets.append(row)
    lines = []
    if rows:
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
        lines.append("")
    lines += [
        "| net | trace + init (s) | certified() (s), median (min-max) | CPU (s) | of which the "
        "Jacobian self-check (s) | bound | certified() with the plain FFT bound (s) | CPU (s) "
        "| speed-up | value difference (rel.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in nets:
        c = n["certified_s"]
        ref_cell = ref_cpu_cell = speed_cell = diff_cell = "-"
        if "reference_certified_s" in n:
            rc = n["reference_certified_s"]
            ref_cell = f"{rc['median']:.2f} ({rc['min']:.2f}-{rc['max']:.2f})"
            ref_cpu_cell = f"{n['reference_certified_cpu_s']['median']:.2f}"
            sp = n["speedup"]
            speed_cell = f"{sp['median']:.1f} ({sp['min']:.1f}-{sp['max']:.1f})"
            diff_cell = f"{n['value_rel_diff']:.1e}"
        lines.append(
            f"| {n['net']} | {n['init_s']['median']:.2f} | "
            f"{c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) | "
            f"{n['certified_cpu_s']['median']:.3f} | {n['self_check_s']['median']:.3f} | "
            f"{n['value']:.10g} | "
            f"{ref_cell} | {ref_cpu_cell} | {speed_cell} | {diff_cell} |"
        )
    write("bounds", {"convolutions": rows, "networks": nets}, "\n".join(lines), args)


if __name__ == "__main__":
    main()
