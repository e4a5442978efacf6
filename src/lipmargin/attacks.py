"""Batched L2 adversarial attacks: upper bounds to check certified radii against.

A certificate says that no perturbation with L2 norm under the certified radius changes the
prediction. An attack gives the other side: a perturbation that *does* change it, so the
smallest one found is an upper bound on the true minimal adversarial distance. Comparing the
two shows how tight the certificate is.

All attacks here are white-box and batched, and they run on whatever device the model is on.
They share these conventions:

* ``model`` is an :class:`torch.nn.Module` in eval mode (every submodule); it maps a batch
  ``x`` of shape ``(N, ...)`` to logits of shape ``(N, K)``. The attacks never change
  ``model.training`` or the parameters (nor their ``requires_grad``); gradients are taken
  with respect to the input only, with :func:`torch.autograd.grad`.
* ``x`` is a floating point tensor ``(N, C, H, W)`` or ``(N, D)``, ``y`` an int64 tensor
  ``(N,)`` of labels.
* ``clip=(lo, hi)`` keeps every adversarial input inside the box (``x`` itself must lie in
  it); ``clip=None`` means unbounded inputs.
* An example the model already gets wrong is returned unchanged: ``success`` True, norm 0.
* ``success`` always comes from a final forward pass on ``x_adv`` (prediction != label).
* They work when called under :func:`torch.no_grad` or :func:`torch.inference_mode`.

:func:`pgd_l2` is a fixed-budget attack: it returns a perturbation inside the given radius
whether or not it succeeds, and ``norms`` is its actual norm. :func:`cw_l2`,
:func:`deepfool` and :func:`smallest_adversarial` are minimum-norm attacks: where they find
no adversarial example, ``x_adv`` is ``x``, ``success`` is False and ``norms`` is ``inf``,
so that ``norms`` reads as "smallest adversarial distance found".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lipmargin.errors import InputError

__all__ = [
    "AttackResult",
    "cw_l2",
    "deepfool",
    "margin",
    "pgd_l2",
    "smallest_adversarial",
]

Clip = tuple[float, float] | None

_METHODS = ("deepfool", "cw")


@dataclass
class AttackResult:
    """Outcome of an attack on a batch.

    Attributes:
        x_adv: Adversarial inputs, same shape and dtype as ``x``.
        delta: ``x_adv - x``.
        norms: ``(N,)`` L2 norm of ``delta`` per example. Minimum-norm attacks report
            ``inf`` where they failed (their ``delta`` is zero there).
        success: ``(N,)`` bool, True where the model's prediction on ``x_adv`` differs from
            the label (checked with a final forward pass).
    """

    x_adv: Tensor
    delta: Tensor
    norms: Tensor
    success: Tensor

    def __len__(self) -> int:
        return int(self.success.shape[0])


# --------------------------------------------------------------------------- helpers


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Return ``max_{i != y} z_i - z_y`` per row: positive iff some other class beats ``y``.

    Args:
        logits: ``(N, K)`` logits, ``K >= 2``.
        y: ``(N,)`` int64 labels.

    Returns:
        ``(N,)`` margins, same dtype as ``logits``.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(_one_hot_mask(logits, y), float("-inf"))
    return others.amax(dim=1) - true


def _one_hot_mask(logits: Tensor, y: Tensor) -> Tensor:
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask.scatter_(1, y[:, None], True)
    return mask


def _row_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _per_row(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(N,)`` tensor so that it broadcasts against ``like`` of shape ``(N, ...)``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value: object, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        rel = ">" if strict else ">="
        raise InputError(f"{name} must be finite and {rel} {minimum}, got {value}")
    return v


def _check_clip(clip: object) -> Clip:
    if clip is None:
        return None
    if not isinstance(clip, Sequence) or isinstance(clip, str) or len(clip) != 2:
        raise InputError(f"clip must be None or a pair (lo, hi), got {clip!r}")
    lo = _check_float("clip[0]", clip[0], -math.inf)
    hi = _check_float("clip[1]", clip[1], -math.inf)
    if not lo < hi:
        raise InputError(f"clip must have lo < hi, got {clip!r}")
    return (lo, hi)


def _validate(model: nn.Module, x: Tensor, y: Tensor, clip: object) -> Clip:
    """Check the arguments every attack shares; return the normalised clip bounds."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(m.training for m in model.modules()):
        raise InputError("model must be in eval mode (call model.eval() first)")
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise InputError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not x.is_floating_point():
        raise InputError(f"x must have a floating point dtype, got {x.dtype}")
    if y.dtype != torch.int64:
        raise InputError(f"y must have dtype torch.int64, got {y.dtype}")
    if x.dim() < 2:
        raise InputError(f"x must have shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(
            f"y must have shape (N,) matching x's batch size {x.shape[0]}, got {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise InputError(f"x and y are on different devices ({x.device} vs {y.device})")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or infinite values")
    bounds = _check_clip(clip)
    if bounds is not None and x.numel() > 0:
        lo, hi = bounds
        if float(x.min()) < lo or float(x.max()) > hi:
            raise InputError(
                f"x has values in [{float(x.min()):.6g}, {float(x.max()):.6g}], outside "
                f"clip=({lo}, {hi}); pass clip=None for unbounded inputs"
            )
    return bounds


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InputError(f"model must return logits of shape (N, K); got {shape}")
    if logits.shape[1] < 2:
        raise InputError(f"model must return at least 2 logits per example, got {logits.shape[1]}")
    return logits


def _clean_pass(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Forward ``x`` once, check the labels' range, return the mask of misclassified points."""
    with torch.no_grad():
        logits = _forward(model, x)
    k = logits.shape[1]
    if y.numel() > 0 and (int(y.min()) < 0 or int(y.max()) >= k):
        raise InputError(f"labels must lie in [0, {k - 1}], got [{int(y.min())}, {int(y.max())}]")
    return logits.argmax(dim=1) != y


def _clamp(x: Tensor, clip: Clip) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def _finish(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, minimum_norm: bool
) -> AttackResult:
    """Check ``x_adv`` with a final forward pass and package the result."""
    x_adv = x_adv.detach()
    with torch.no_grad():
        success = _forward(model, x_adv).argmax(dim=1) != y
    if minimum_norm:
        x_adv = torch.where(_per_row(success, x), x_adv, x)
    delta = x_adv - x
    norms = _row_norms(delta)
    if minimum_norm:
        norms = torch.where(success, norms, torch.full_like(norms, math.inf))
    return AttackResult(x_adv=x_adv, delta=delta, norms=norms, success=success)


class _GradMode:
    """Enable autograd even inside ``torch.no_grad()`` or ``torch.inference_mode()``."""

    def __enter__(self) -> None:
        self._inference = torch.inference_mode(False)
        self._grad = torch.enable_grad()
        self._inference.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._grad.__exit__(*exc)
        self._inference.__exit__(*exc)


def _run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Callable[[Tensor, Tensor, Tensor], Tensor],
    minimum_norm: bool,
) -> AttackResult:
    """Skip misclassified points, run ``attack`` on the rest and finish.

    The caller has validated the arguments already.

    ``attack(x_sub, y_sub, idx)`` gets the correctly classified examples (``idx`` are their
    positions in the batch) and returns adversarial inputs for them.
    """
    with _GradMode():
        x = x.detach().clone()
        y = y.detach().clone()
        wrong = _clean_pass(model, x, y)
        x_adv = x.clone()
        idx = torch.nonzero(~wrong).flatten()
        if idx.numel() > 0:
            x_adv[idx] = attack(x[idx], y[idx], idx).detach().to(x.dtype)
        return _finish(model, x, y, x_adv, minimum_norm)


def _input_grad(loss: Tensor, x: Tensor, retain_graph: bool = False) -> Tensor:
    (g,) = torch.autograd.grad(loss, x, retain_graph=retain_graph)
    return g


# ------------------------------------------------------------------------------- PGD


def _as_per_example(name: str, value: float | Tensor, x: Tensor) -> Tensor:
    """Turn a float or a scalar / ``(N,)`` tensor into a finite, non-negative ``(N,)`` tensor."""
    n = x.shape[0]
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if value.dim() != 1 or value.shape[0] != n:
            raise InputError(
                f"{name} must be a float or a tensor of shape ({n},), got "
                f"shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise InputError(f"{name} must be a real tensor, got dtype {value.dtype}")
        t = value.detach().to(device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise InputError(f"{name} must be finite and >= 0")
        return t.clone()
    v = _check_float(name, value, 0.0)
    return torch.full((n,), v, dtype=x.dtype, device=x.device)


def _random_ball(
    shape: torch.Size, radius: Tensor, x: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Uniform samples from L2 balls of per-example ``radius`` (volume-uniform)."""
    d = int(math.prod(shape[1:]))
    g = torch.randn(shape, dtype=x.dtype, device=x.device, generator=generator)
    g = g / _per_row(_row_norms(g).clamp_min(1e-12), g)
    u = torch.rand(shape[0], dtype=x.dtype, device=x.device, generator=generator)
    return g * _per_row(radius * u.pow(1.0 / d), g)


def _project(delta: Tensor, eps: Tensor) -> Tensor:
    """Scale each row of ``delta`` into the ball of its radius."""
    n = _row_norms(delta)
    factor = torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
    return delta * _per_row(factor, delta)


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int = 50,
    step_size: float | Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
    clip: Clip = (0.0, 1.0),
    loss: Literal["margin", "ce"] = "margin",
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Projected gradient ascent in the L2 ball of radius ``eps`` (Madry et al. 2018).

    Each step moves along the L2-normalised input gradient of the loss, then projects onto
    the ball (by rescaling) and onto the box ``clip`` (by clamping; since ``x`` lies in the
    box, clamping never increases the norm). Every iterate of every restart is scored by its
    margin ``max_{i != y} z_i - z_y`` and each example keeps its best one, so a perturbation
    that succeeds at any point is kept.

    Args:
        model: Classifier in eval mode returning logits ``(N, K)``.
        x: Inputs ``(N, ...)``.
        y: int64 labels ``(N,)``.
        eps: Radius, a float or a ``(N,)`` tensor of per-example radii (e.g. each point's
            certified radius). Zero radius means no perturbation.
        steps: Gradient steps per restart (0 evaluates only the starting point).
        step_size: Step length (float or ``(N,)``); default ``2.5 * eps / steps``.
        restarts: Independent runs; the best perturbation per example is kept.
        random_start: Start each run from a uniform random point of the ball (else from x).
        clip: Box ``(lo, hi)`` for the inputs, or None for unbounded inputs.
        loss: ``"margin"`` maximises ``max_{i != y} z_i - z_y``; ``"ce"`` the cross entropy.
        generator: Optional random generator for the random starts.

    Returns:
        :class:`AttackResult`; ``norms <= eps`` (up to float rounding) for every example.

    Raises:
        InputError: On invalid inputs or parameters.
    """
    bounds = _validate(model, x, y, clip)
    steps = _check_int("steps", steps, 0)
    restarts = _check_int("restarts", restarts, 1)
    if loss not in ("margin", "ce"):
        raise InputError(f"loss must be 'margin' or 'ce', got {loss!r}")
    eps_all = _as_per_example("eps", eps, x)
    if step_size is None:
        alpha_all = 2.5 * eps_all / max(steps, 1)
    else:
        alpha_all = _as_per_example("step_size", step_size, x)

    def attack(xs: Tensor, ys: Tensor, idx: Tensor) -> Tensor:
        eps_s = eps_all[idx]
        alpha = _per_row(alpha_all[idx], xs)
        best = xs.clone()
        best_margin = torch.full((xs.shape[0],), -math.inf, dtype=xs.dtype, device=xs.device)
        for _ in range(restarts):
            if random_start:
                delta = _random_ball(xs.shape, eps_s, xs, generator)
            else:
                delta = torch.zeros_like(xs)
            x_adv = _clamp(xs + delta, bounds)
            for t in range(steps + 1):
                x_var = x_adv.detach().requires_grad_(True)
                logits = model(x_var)
                m = margin(logits, ys)
                better = m.detach() > best_margin
                best_margin = torch.where(better, m.detach(), best_margin)
                best = torch.where(_per_row(better, xs), x_adv.detach(), best)
                if t == steps:
                    break
                if loss == "margin":
                    objective = m.sum()
                else:
                    objective = nn.functional.cross_entropy(logits, ys, reduction="sum")
                g = _input_grad(objective, x_var)
                g = g / _per_row(_row_norms(g).clamp_min(1e-30), g)
                delta = _project(x_adv.detach() - xs + alpha * g, eps_s)
                x_adv = _clamp(xs + delta, bounds)
        return best

    return _run(model, x, y, attack, minimum_norm=False)


# ------------------------------------------------------------------------ Carlini-Wagner


class _Adam:
    """Adam (Kingma & Ba 2015) on one tensor, elementwise, as in ``torch.optim.Adam``.

    Elementwise updates keep the examples of a batch independent of each other.
    """

    def __init__(self, like: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = 1e-8
        self.t = 0
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)

    def step(self, w: Tensor, g: Tensor) -> Tensor:
        """Return the updated parameter (``w`` itself is not modified)."""
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1.0 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
        step = self.lr / (1.0 - self.b1**self.t)
        denom = (self.v / (1.0 - self.b2**self.t)).sqrt_().add_(self.eps)
        return w - step * self.m / denom


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 100,
    binary_steps: int = 9,
    initial_const: float = 1e-3,
    lr: float = 1e-2,
    confidence: float = 0.0,
    clip: Clip = (0.0, 1.0),
    abort_early: bool = True,
) -> AttackResult:
    """Carlini–Wagner L2 attack (Carlini & Wagner 2017), untargeted.

    Minimises ``||x' - x||^2 + c * max(z_y - max_{i != y} z_i, -confidence)`` with Adam.
    With ``clip=(lo, hi)`` the variable is ``w`` with ``x' = lo + (hi - lo)(tanh(w) + 1)/2``,
    which keeps ``x'`` in the box; with ``clip=None`` it is ``x'`` itself. The constant
    ``c`` starts at ``initial_const`` and is found per example by binary search (times 10
    until a first success). Adam is restarted for each constant, as in the original. The
    defaults are those used in the LMT paper.

    Args:
        model: Classifier in eval mode returning logits ``(N, K)``.
        x: Inputs ``(N, ...)``.
        y: int64 labels ``(N,)``.
        steps: Adam steps per constant.
        binary_steps: Number of constants tried per example.
        initial_const: First constant.
        lr: Adam learning rate.
        confidence: Required logit margin ``kappa >= 0`` for an iterate to count.
        clip: Box ``(lo, hi)``, or None for unbounded inputs.
        abort_early: Stop a constant's optimisation once the total loss stops improving
            (checked every ``steps // 10`` steps), as in the reference implementation.

    Returns:
        :class:`AttackResult` with the smallest successful perturbation per example; where
        none was found, ``x_adv = x``, ``success`` False and ``norms`` inf.

    Raises:
        InputError: On invalid inputs or parameters.
    """
    bounds = _validate(model, x, y, clip)
    steps = _check_int("steps", steps, 1)
    binary_steps = _check_int("binary_steps", binary_steps, 1)
    c0 = _check_float("initial_const", initial_const, 0.0, strict=True)
    lr_f = _check_float("lr", lr, 0.0, strict=True)
    kappa = _check_float("confidence", confidence, 0.0)

    def attack(xs: Tensor, ys: Tensor, idx: Tensor) -> Tensor:
        n = xs.shape[0]
        if bounds is not None:
            lo, hi = bounds
            scaled = ((xs - lo) / (hi - lo) * 2.0 - 1.0) * (1.0 - 1e-6)
            w0 = torch.atanh(scaled)

            def to_input(w: Tensor) -> Tensor:
                return lo + (hi - lo) * (torch.tanh(w) + 1.0) / 2.0
        else:
            w0 = xs.clone()

            def to_input(w: Tensor) -> Tensor:
                return w

        const = torch.full((n,), c0, dtype=xs.dtype, device=xs.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, 1e10)
        best_l2 = torch.full_like(const, math.inf)
        best = xs.clone()
        check_every = max(steps // 10, 1)

        for _ in range(binary_steps):
            w = w0.clone()
            adam = _Adam(w, lr_f)
            found = torch.zeros(n, dtype=torch.bool, device=xs.device)
            prev = math.inf
            for t in range(steps):
                w.requires_grad_(True)
                x_adv = to_input(w)
                logits = model(x_adv)
                l2sq = (x_adv - xs).flatten(1).pow(2).sum(dim=1)
                m = margin(logits, ys)
                total = (l2sq + const * torch.clamp(-m, min=-kappa)).sum()
                (g,) = torch.autograd.grad(total, w)
                with torch.no_grad():
                    if kappa == 0.0:
                        ok = logits.argmax(dim=1) != ys
                    else:
                        ok = m > kappa
                    l2 = l2sq.sqrt()
                    improved = ok & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2, best_l2)
                    best = torch.where(_per_row(improved, xs), x_adv, best)
                    found |= ok
                    if abort_early and t % check_every == 0:
                        current = float(total)
                        if current > prev * 0.9999:
                            break
                        prev = current
                    w = adam.step(w.detach(), g)
            with torch.no_grad():
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                bisect = upper < 1e9
                const = torch.where(bisect, (lower + upper) / 2.0, const * 10.0)
        return best

    return _run(model, x, y, attack, minimum_norm=True)


# -------------------------------------------------------------------------- DeepFool


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    clip: Clip = (0.0, 1.0),
) -> AttackResult:
    """Multiclass DeepFool, L2 version (Moosavi-Dezfooli, Fawzi, Frossard 2016).

    At each step the model is linearised at the current point ``x_i``: for every class
    ``k != y`` with ``f_k = z_k - z_y`` and ``w_k = grad f_k``, the closest linearised
    boundary is ``l = argmin |f_k| / ||w_k||``; the step is
    ``r_i = (|f_l| / ||w_l|| + 1e-4) * w_l / ||w_l||``. The total ``r = sum r_i`` is applied
    with the overshoot, ``x_{i+1} = clip(x + (1 + overshoot) * r)``, until the prediction
    changes. Per-class gradients come from one backward pass per class.

    For a linear (affine) classifier without box this finds the exact minimal perturbation
    in one step, up to the factor ``1 + overshoot`` and the ``1e-4``.

    Args:
        model: Classifier in eval mode returning logits ``(N, K)``.
        x: Inputs ``(N, ...)``.
        y: int64 labels ``(N,)``.
        steps: Maximum number of linearisation steps.
        overshoot: Relative overshoot applied to the total perturbation.
        clip: Box ``(lo, hi)``, or None for unbounded inputs.

    Returns:
        :class:`AttackResult`; where the attack failed, ``x_adv = x``, ``success`` False and
        ``norms`` inf.

    Raises:
        InputError: On invalid inputs or parameters.
    """
    bounds = _validate(model, x, y, clip)
    steps = _check_int("steps", steps, 1)
    os_f = _check_float("overshoot", overshoot, 0.0)

    def attack(xs: Tensor, ys: Tensor, idx: Tensor) -> Tensor:
        r_tot = torch.zeros_like(xs)
        active = torch.arange(xs.shape[0], device=xs.device)
        for _ in range(steps):
            xa = xs[active]
            ya = ys[active]
            x_var = _clamp(xa + (1.0 + os_f) * r_tot[active], bounds).requires_grad_(True)
            logits = model(x_var)
            still = logits.argmax(dim=1) == ya
            if not bool(still.any()):
                break
            keep = torch.nonzero(still).flatten()
            active = active[keep]
            ya = ya[keep]
            k = logits.shape[1]
            grads = []
            for c in range(k):
                g = _input_grad(logits[:, c].sum(), x_var, retain_graph=c < k - 1)
                grads.append(g[keep].flatten(1))
            jac = torch.stack(grads, dim=1)  # (n, K, D)
            z = logits.detach()[keep]
            rows = torch.arange(keep.shape[0], device=xs.device)
            f = z - z[rows, ya][:, None]
            w = jac - jac[rows, ya][:, None, :]
            w_norm = w.norm(dim=2)
            pert = f.abs() / w_norm.clamp_min(1e-30)
            pert = pert.masked_fill(_one_hot_mask(f, ya) | (w_norm == 0), math.inf)
            best_pert, l = pert.min(dim=1)
            movable = torch.isfinite(best_pert)
            if not bool(movable.any()):
                break
            w_l = w[rows, l]
            scale = (best_pert + 1e-4) / w_norm[rows, l].clamp_min(1e-30)
            step = (scale[:, None] * w_l).reshape(len(keep), *xs.shape[1:])
            step = step * _per_row(movable.to(step.dtype), step)
            r_tot[active] = r_tot[active] + step
            active = active[movable]
            if active.numel() == 0:
                break
        return _clamp(xs + (1.0 + os_f) * r_tot, bounds)

    return _run(model, x, y, attack, minimum_norm=True)


# ------------------------------------------------------------------------ combination


def smallest_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    methods: Sequence[str] = ("deepfool", "cw"),
    clip: Clip = (0.0, 1.0),
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> AttackResult:
    """Run several minimum-norm attacks and keep, per example, the smallest success.

    The resulting norms are upper bounds on each example's true minimal adversarial
    distance; a tightness analysis compares them with the certified radii (lower bounds).

    Args:
        model: Classifier in eval mode returning logits ``(N, K)``.
        x: Inputs ``(N, ...)``.
        y: int64 labels ``(N,)``.
        methods: Names among ``"deepfool"`` and ``"cw"``.
        clip: Box ``(lo, hi)`` passed to every attack, or None.
        method_kwargs: Extra keyword arguments per method, e.g. ``{"cw": {"steps": 1000}}``.

    Returns:
        :class:`AttackResult`; ``norms`` inf and ``success`` False where every method failed.

    Raises:
        InputError: On invalid inputs, unknown or no methods.
    """
    bounds = _validate(model, x, y, clip)
    if isinstance(methods, str) or not isinstance(methods, Sequence) or len(methods) == 0:
        raise InputError(f"methods must be a non-empty sequence of names, got {methods!r}")
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise InputError(f"unknown attack method(s) {unknown}; choose from {list(_METHODS)}")
    kwargs = dict(method_kwargs or {})
    extra = [m for m in kwargs if m not in methods]
    if extra:
        raise InputError(f"method_kwargs names method(s) {extra} not in methods {list(methods)}")
    funcs: dict[str, Callable[..., AttackResult]] = {"deepfool": deepfool, "cw": cw_l2}

    x_best = x.detach().clone()
    best_norm = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    for name in dict.fromkeys(methods):
        res = funcs[name](model, x, y, clip=bounds, **dict(kwargs.get(name, {})))
        better = res.success & (res.norms < best_norm)
        best_norm = torch.where(better, res.norms, best_norm)
        x_best = torch.where(_per_row(better, x), res.x_adv, x_best)
    with _GradMode():
        return _finish(model, x.detach(), y, x_best, minimum_norm=True)
