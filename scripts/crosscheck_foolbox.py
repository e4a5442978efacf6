#!/usr/bin/env python
"""Cross-check lipmargin's DeepFool and C&W L2 attacks against foolbox 3.

Trains a tiny MNIST-sized CNN (on real MNIST / Fashion-MNIST if ``--data-dir`` holds it,
else on synthetic MNIST-like data), then runs, on the same correctly classified test points
and with the same hyper-parameters,

* ``lipmargin.attacks.deepfool`` and ``foolbox.attacks.L2DeepFoolAttack``,
* ``lipmargin.attacks.cw_l2`` and ``foolbox.attacks.L2CarliniWagnerAttack``,

and prints, per attack, the success rates, the median smallest perturbation norm of both
implementations and the median per-point ratio ``ours / foolbox`` (over points where both
succeeded). Ratios near 1 mean the two implementations agree.

foolbox is not a dependency of lipmargin; install it with ``pip install foolbox==3.3.4``.

Usage::

    python scripts/crosscheck_foolbox.py                       # synthetic data
    python scripts/crosscheck_foolbox.py --data-dir data       # real MNIST test split
    python scripts/crosscheck_foolbox.py --data-dir data --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipmargin.attacks import AttackResult, cw_l2, deepfool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (optional)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--n", type=int, default=100, help="number of points to attack")
    p.add_argument("--train-size", type=int, default=6000, help="training examples")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepfool-steps", type=int, default=50)
    p.add_argument("--overshoot", type=float, default=0.02)
    p.add_argument("--cw-steps", type=int, default=100, help="Adam steps per constant")
    p.add_argument("--cw-binary-steps", type=int, default=9)
    p.add_argument("--cw-initial-const", type=float, default=1e-3)
    p.add_argument("--cw-lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ data


def synthetic_mnist(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """MNIST-like data: 10 classes of smooth random strokes on a black 28x28 canvas.

    Each class has a fixed template (a few Gaussian blobs along a random path); examples
    are the template shifted by up to 3 pixels, with random stroke intensity and noise,
    clamped to [0, 1]. Many pixels sit exactly at 0, as in MNIST.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(
        torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"), dim=0
    )  # (2, 28, 28)
    templates = []
    for _ in range(10):
        centres = 6.0 + 16.0 * torch.rand(6, 2, generator=gen)
        img = torch.zeros(28, 28)
        for c in centres:
            d2 = ((grid - c[:, None, None]) ** 2).sum(dim=0)
            img = torch.maximum(img, torch.exp(-d2 / 6.0))
        templates.append(img)
    t = torch.stack(templates)  # (10, 28, 28)
    y = torch.randint(0, 10, (n,), generator=gen)
    shifts = torch.randint(-3, 4, (n, 2), generator=gen)
    x = torch.empty(n, 1, 28, 28)
    for i in range(n):
        img = torch.roll(t[y[i]], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(0, 1))
        x[i, 0] = img
    x = x * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.35 * torch.randn(x.shape, generator=gen)
    x = (x - 0.1).clamp(0.0, 1.0)
    return x, y


def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor, str]:
    """Return (x, y, description); real data when available, synthetic otherwise."""
    if args.data_dir is not None:
        try:
            from lipmargin.data import load_dataset

            x, y = load_dataset(args.dataset, "test", args.data_dir)
            return x, y, f"{args.dataset} test split from {args.data_dir}"
        except Exception as exc:  # noqa: BLE001 - any failure means: fall back
            print(f"note: could not load {args.dataset} ({exc}); using synthetic data")
    x, y = synthetic_mnist(args.train_size + 4 * args.n + 1000, args.seed)
    return x, y, "synthetic MNIST-like data"


# ----------------------------------------------------------------------------- model


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}: train loss {total / len(y):.4f}")
    model.eval()


# ------------------------------------------------------------------------- comparison


def foolbox_norms(
    attack: object, fmodel: object, x: Tensor, y: Tensor, zero_placeholder: bool = False
) -> tuple[Tensor, Tensor]:
    """Run a foolbox minimum-norm attack; return (norms with inf on failure, success).

    With ``zero_placeholder``, outputs that are exactly the all-zeros input count as
    failures: foolbox's C&W starts from ``best_advs = zeros_like(x)`` and returns that
    placeholder where it found nothing; if the model misclassifies a black image, foolbox
    then reports "success" with norm ``||x||``.
    """
    _, clipped, success = attack(fmodel, x, y, epsilons=None)  # type: ignore[operator]
    if zero_placeholder:
        placeholder = clipped.flatten(1).abs().amax(dim=1) == 0
        n_fake = int((placeholder & success).sum())
        if n_fake:
            print(
                f"  note: foolbox returned its all-zeros placeholder as 'success' on {n_fake} "
                "point(s); counted as failures"
            )
        success = success & ~placeholder
    norms = (clipped - x).flatten(1).norm(dim=1)
    norms = torch.where(success, norms, torch.full_like(norms, math.inf))
    return norms, success


def summarise(name: str, ours: AttackResult, fb_norms: Tensor, fb_success: Tensor) -> None:
    both = ours.success & fb_success
    ratio = ours.norms[both] / fb_norms[both]
    print(f"\n{name}")
    print(
        f"  success rate        ours {ours.success.float().mean():.3f}   "
        f"foolbox {fb_success.float().mean():.3f}"
    )
    if int(both.sum()) == 0:
        print("  no point where both succeeded")
        return
    print(
        f"  median norm (both)  ours {ours.norms[both].median():.4f}   "
        f"foolbox {fb_norms[both].median():.4f}"
    )
    q = torch.quantile(ratio.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    print(
        f"  ratio ours/foolbox  median {q[1]:.4f}   10%-90% [{q[0]:.4f}, {q[2]:.4f}]   "
        f"min {ratio.min():.4f}   max {ratio.max():.4f}"
    )
    print(f"  max |ratio - 1|     {float((ratio.double() - 1).abs().max()):.3e}")
    print(
        f"  ours smaller (<0.99x) on {int((ratio < 0.99).sum())}, foolbox smaller on "
        f"{int((ratio > 1.01).sum())}, within 1% on {int(((ratio - 1).abs() <= 0.01).sum())} "
        f"of {int(both.sum())} points"
    )


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import foolbox as fb
    except ImportError:
        print("foolbox is not installed: pip install foolbox==3.3.4", file=sys.stderr)
        return 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, foolbox {fb.__version__}, threads {torch.get_num_threads()}")

    x, y, desc = load_data(args)
    n_train = min(args.train_size, len(y) - 2 * args.n)
    print(f"data: {desc}; training on {n_train} examples, attacking {args.n} held-out points")
    model = small_cnn()
    train(model, x[:n_train], y[:n_train], args.epochs, args.seed)

    x_test, y_test = x[n_train:], y[n_train:]
    with torch.no_grad():
        correct = model(x_test).argmax(dim=1) == y_test
    print(f"held-out accuracy {correct.float().mean():.4f}")
    idx = torch.nonzero(correct).flatten()[: args.n]
    xs, ys = x_test[idx].contiguous(), y_test[idx].contiguous()

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))

    # DeepFool: same steps and overshoot; all classes as candidates in both.
    ours_df, t_ours = timed(
        lambda: deepfool(model, xs, ys, steps=args.deepfool_steps, overshoot=args.overshoot)
    )
    fb_df = fb.attacks.L2DeepFoolAttack(
        steps=args.deepfool_steps, candidates=None, overshoot=args.overshoot, loss="logits"
    )
    (fb_n, fb_s), t_fb = timed(lambda: foolbox_norms(fb_df, fmodel, xs, ys))
    summarise("DeepFool (L2)", ours_df, fb_n, fb_s)  # type: ignore[arg-type]
    print(f"  time                ours {t_ours:.1f}s   foolbox {t_fb:.1f}s")

    # Carlini-Wagner: same constants, steps, step size, abort-early rule.
    ours_cw, t_ours = timed(
        lambda: cw_l2(
            model,
            xs,
            ys,
            steps=args.cw_steps,
            binary_steps=args.cw_binary_steps,
            initial_const=args.cw_initial_const,
            lr=args.cw_lr,
        )
    )
    fb_cw = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=args.cw_binary_steps,
        steps=args.cw_steps,
        stepsize=args.cw_lr,
        confidence=0.0,
        initial_const=args.cw_initial_const,
        abort_early=True,
    )
    (fb_n, fb_s), t_fb = timed(lambda: foolbox_norms(fb_cw, fmodel, xs, ys, zero_placeholder=True))
    summarise("Carlini-Wagner (L2)", ours_cw, fb_n, fb_s)  # type: ignore[arg-type]
    print(f"  time                ours {t_ours:.1f}s   foolbox {t_fb:.1f}s")
    print(
        f"\nsettings: deepfool steps={args.deepfool_steps} overshoot={args.overshoot}; "
        f"cw steps={args.cw_steps} binary_steps={args.cw_binary_steps} "
        f"initial_const={args.cw_initial_const} lr={args.cw_lr}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
