"""Certified radii from margins and Lipschitz bounds (paper Prop. 1 and Prop. 2).

A certified radius r for input x with label t guarantees ``argmax F(x + e) = t`` for every
``||e||_2 < r``. It is a guaranteed LOWER bound of the true robust radius provided the bound it
uses is guaranteed (``CertifiedBound.guaranteed``) — up to the floating-point slack documented
in ``certify``.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._device import DeviceContext

from .bounds import CertifiedBound, LipschitzBound
from .bounds.checks import (
    check_gradients,
    check_operations,
    eval_mode,
    full_precision,
    recorded_forward,
    traceable,
)
from .bounds.graph import model_dtype
from .errors import CertificationError, InputError

#: Relative slack subtracted from each logit difference: covers float32 rounding of the forward
#: pass (and float64 rounding of the division). See ``certify``.
MARGIN_RTOL = 1e-5
#: Points per checked batch whose input-gradient norms are checked against the bound before
#: radii are returned (``bounds.checks.check_gradients``).
SELF_CHECK_POINTS = 2
#: The first ``SELF_CHECK_FIRST`` batches certified with one ``CertifiedBound`` are all checked,
#: then every ``SELF_CHECK_EVERY``-th; the checked rows move through the batch. Right after a
#: 1000-image Wong-Kolter forward pass a check costs about 15% of it (a forward and backward
#: pass on two points and ~30 small operations on cold caches): every 4th batch held
#: certification at 0.93x inference, every 8th at ~0.95x (issue 16).
SELF_CHECK_FIRST = 8
SELF_CHECK_EVERY = 8


def _scheduled(cert: CertifiedBound) -> bool:
    """Whether the next batch certified with ``cert`` is one the self-checks look at."""
    count = cert.certified_batches
    return cert.guaranteed and (count < SELF_CHECK_FIRST or count % SELF_CHECK_EVERY == 0)


def _forward(model: nn.Module, x: torch.Tensor, cert: CertifiedBound) -> torch.Tensor:
    """The logits (no gradients); on the batches the self-checks look at, with the operations
    the eager run calls compared with the traced graph's (``checks.check_operations``: a branch
    that only eager code takes, e.g. on the batch size, shows up where it acts). A forward that
    fails on inputs of another dtype than the model's gets a clear error."""
    try:
        return _checked_forward(model, x, cert)
    except RuntimeError as exc:
        dtype = model_dtype(model)
        if dtype is None or dtype == x.dtype or "dtype" not in str(exc).lower():
            raise
        raise InputError(
            f"inputs are {x.dtype} but the model is {dtype}: convert them with x.to({dtype})"
        ) from exc


def _checked_forward(model: nn.Module, x: torch.Tensor, cert: CertifiedBound) -> torch.Tensor:
    with torch.no_grad():
        if cert.operations is None or not _scheduled(cert):
            return model(x)
        inner = traceable(model)
        if inner is model:
            logits, ops = recorded_forward(model, x)
        else:  # torch.compile / DataParallel: the module the trace follows, and the same values
            logits = model(x)
            inner_logits, ops = recorded_forward(inner, x)
            same = logits.shape == inner_logits.shape
            if same and logits.numel():
                tol = 1e-4 * (1.0 + float(inner_logits.abs().max()))
                same = float((logits - inner_logits).abs().max()) <= tol
            if not same:
                raise CertificationError(
                    "the wrapped model (torch.compile / DataParallel) computes other logits on "
                    "this batch than the module it wraps, which the bound covers"
                )
    check_operations(ops, cert.operations)
    return logits


def _self_check(model: nn.Module, x: torch.Tensor, cert: CertifiedBound, logits) -> None:
    """Gradient self-check of one batch on the schedule above (``check_gradients``)."""
    scheduled = _scheduled(cert)
    count = cert.certified_batches
    cert.certified_batches = count + 1
    if not scheduled:
        return
    n = x.shape[0]
    start = 0 if n <= SELF_CHECK_POINTS else (count * 7919) % (n - SELF_CHECK_POINTS + 1)
    end = start + SELF_CHECK_POINTS
    check_gradients(
        model, x[start:end], cert, points=SELF_CHECK_POINTS, logits=logits[start:end], seed=count
    )


def _resolve(bound: LipschitzBound | CertifiedBound, allow_estimate: bool) -> CertifiedBound:
    cert = bound.certified() if isinstance(bound, LipschitzBound) else bound
    if not isinstance(cert, CertifiedBound):
        raise InputError("bound must be a LipschitzBound or the result of its .certified()")
    if not cert.guaranteed and not allow_estimate:
        raise InputError(
            "this bound is a power-iteration estimate (conv_method='power'), not a guaranteed "
            "upper bound: its radii would not be certificates. Pass allow_estimate=True to "
            "compute them anyway as estimates."
        )
    return cert


def _check_same_model(model: nn.Module, bound: LipschitzBound | CertifiedBound) -> None:
    """A ``LipschitzBound`` certifies the model it was built for, not another one."""
    if isinstance(bound, LipschitzBound) and bound.model is not model:
        raise InputError(
            "the bound was built for another model: pass LipschitzBound(model, shape) of the "
            "model you certify"
        )


def _plain(x: torch.Tensor) -> bool:
    """A tensor whose operations are torch's own: ``torch.Tensor``, ``nn.Parameter``, or a
    subclass that overrides neither ``__torch_function__`` nor ``__torch_dispatch__``."""
    kind = type(x)
    if kind in (torch.Tensor, nn.Parameter):
        return True
    plain = (torch.Tensor.__torch_function__, torch._C._disabled_torch_function_impl)
    function = getattr(kind.__torch_function__, "__func__", kind.__torch_function__)
    plain_functions = [getattr(f, "__func__", f) for f in plain]
    dispatch = getattr(kind, "__torch_dispatch__", None)
    return function in plain_functions and dispatch in (None, torch.Tensor.__torch_dispatch__)


def _function_modes() -> list:
    get = getattr(torch.overrides, "_get_current_function_mode_stack", None)
    return list(get()) if get is not None else []


def _check_batch(x: torch.Tensor, y: torch.Tensor, cert: CertifiedBound) -> None:
    """Refuse inputs the certificate does not cover: another shape than the bound's (convolution
    and pooling norms depend on the input size), half precision (the margin slack covers
    float32/float64 rounding only), a forward pass under autocast."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError("x and y must be tensors")
    if y.dim() != 1 or x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise InputError(f"x has shape {tuple(x.shape)} but y has shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"labels must be integers, got dtype {y.dtype}")
    if cert.input_shape is not None and tuple(x.shape[1:]) != tuple(cert.input_shape):
        raise InputError(
            f"inputs have shape {tuple(x.shape[1:])} (without batch) but the bound was computed "
            f"for {tuple(cert.input_shape)}: build LipschitzBound(model, input_shape="
            f"{tuple(x.shape[1:])}) to certify them"
        )
    if not _plain(x):
        raise InputError(
            f"x is a {type(x).__name__}, a tensor subclass: its own operations are not what the "
            "bound covers; pass a plain tensor (x.as_subclass(torch.Tensor))"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise InputError(
            f"inputs are {x.dtype}: certificates cover float32/float64 forward passes only "
            "(the margin slack covers their rounding); convert with x.float()"
        )
    modes = [m for m in _function_modes() if not isinstance(m, DeviceContext)]
    if modes:
        raise InputError(
            f"certification inside a torch function mode ({type(modes[0]).__name__}): it "
            "changes what the model's operations compute; certify outside it"
        )
    if torch.is_autocast_enabled(x.device.type):
        raise InputError(
            "certification under torch.autocast: the forward pass would run in low precision, "
            "which the margin slack does not cover; certify outside autocast"
        )


def _check_labels(y: torch.Tensor, k: int) -> None:
    low, high = (int(v) for v in torch.aminmax(y))
    if low < 0 or high >= k:
        raise InputError(f"labels must lie in [0, {k}), got range [{low}, {high}]")


def radii_from_logits(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: CertifiedBound,
    rtol: float = MARGIN_RTOL,
) -> torch.Tensor:
    """Certified radii (float64) from logits, without running the model.

    Prop. 2 when ``bound.pairwise`` is set: ``min_{i != t} max(0, z_t - z_i) / K[t, i]``.
    Prop. 1 otherwise: ``max(0, z_t - max_{i != t} z_i) / (sqrt(2) L)``. Each difference is first
    reduced by ``rtol * (|z_t| + |z_i|)``. Misclassified points (or ties) get radius 0.
    """
    if not (isinstance(rtol, numbers.Real) and math.isfinite(rtol) and rtol >= 0):
        raise InputError(f"rtol must be a finite number >= 0, got {rtol!r}")
    z = logits.detach().to(torch.float64)
    if z.dim() != 2 or y.dim() != 1 or z.shape[0] != y.shape[0]:
        raise InputError(f"logits {tuple(z.shape)} and labels {tuple(y.shape)} do not match")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"labels must be integers, got dtype {y.dtype}")
    # NaN/inf in the inputs the prediction depends on propagate into the logits; checking the
    # (N, K) logits is cheap and is exactly the condition under which a radius is meaningful.
    # A finite sum proves every logit finite (one reduction); only a non-finite sum (NaN/inf,
    # or finite float64 logits near the overflow limit) needs the elementwise test.
    if not math.isfinite(float(z.sum())) and not bool(torch.isfinite(z).all()):
        raise InputError("the logits are not finite: x contains NaN or infinite values")
    n, k = z.shape
    if k < 2:
        raise InputError(
            "certificates need at least two logits (one per class); a single-logit binary "
            "model can be certified as two logits (-z, z)"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    y = y.long().to(z.device)
    target = y[:, None]
    if z.device.type != "cpu":  # an out-of-range gather is a device-side assert there
        _check_labels(y, k)
    try:  # on the CPU, gather refuses any label outside [0, k): no separate range test
        zt = z.gather(1, target)
    except (RuntimeError, IndexError):
        _check_labels(y, k)
        raise
    # z_t - z_i - rtol (|z_t| + |z_i|); a misclassified point (or a tie) has some i != t with
    # a difference <= 0, so its radius is 0 below without a separate argmax test
    diff = (zt - z).sub_(z.abs().add_(zt.abs()), alpha=rtol)
    if bound.pairwise is not None:
        # diff / K[t, i] where the reduced margin is positive (+inf where K[t, i] = 0: F_t - F_i
        # is constant), else 0; the target's own column never binds
        pairwise = bound.pairwise
        if pairwise.device != z.device:
            pairwise = pairwise.to(z.device)
        per_pair = torch.where(diff > 0, diff / pairwise[y], 0.0)
        return per_pair.scatter_(1, target, math.inf).min(dim=1).values
    margin = diff.scatter_(1, target, math.inf).min(dim=1).values
    # NaN only from inf - inf (float64 logits near the overflow limit): no certificate, 0
    margin = margin.nan_to_num_(nan=0.0, posinf=math.inf)
    return margin.clamp_min(0.0) / (math.sqrt(2.0) * bound.value)


def certify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    bound: LipschitzBound | CertifiedBound,
    *,
    rtol: float = MARGIN_RTOL,
    allow_estimate: bool = False,
) -> torch.Tensor:
    """Per-example certified L2 radii (float64), 0 where the prediction is wrong.

    Uses paper Prop. 2 (per class pair, no sqrt(2)) when the bound has a pairwise matrix, else
    Prop. 1 (``margin / (sqrt(2) L)``). The bound is the guaranteed one from
    ``LipschitzBound.certified()`` (computed once and cached, so this costs one forward pass).

    Before returning radii, input-gradient norms at ``SELF_CHECK_POINTS`` examples are
    checked against the bound (``bounds.checks.check_gradients``; ``CertificationError`` if one
    exceeds it): on each of the first ``SELF_CHECK_FIRST`` batches certified with this bound,
    then on every ``SELF_CHECK_EVERY``-th. ``x`` must have the bound's input shape and be
    float32/float64.

    Floating point: the forward pass runs in the model's dtype; logits are converted to float64
    and every difference ``z_t - z_i`` is reduced by ``rtol * (|z_t| + |z_i|)`` (default 1e-5,
    about 100 float32 ulps) before division, to cover rounding in the forward pass. The model is
    evaluated in evaluation mode, which is the function the bound covers.
    """
    _check_same_model(model, bound)
    cert = _resolve(bound, allow_estimate)
    _check_batch(x, y, cert)
    with eval_mode(model), full_precision(x.device.type):
        logits = _forward(model, x, cert)
        # first the radii (they refuse non-finite logits, bad labels and rtol with InputError),
        # then the self-check: no radii are returned unless it passes
        radii = radii_from_logits(logits, y, cert, rtol=rtol)
        if cert.guaranteed:
            _self_check(model, x, cert, logits)
    return radii


def certified_accuracy(radii: torch.Tensor, eps: float) -> float:
    """Share of points that are correct AND certified at radius ``eps`` (radius >= eps > 0)."""
    if radii.numel() == 0:
        return float("nan")
    if eps <= 0:
        raise InputError("eps must be positive (use clean accuracy for eps = 0)")
    return float((radii >= eps).double().mean())


@dataclass
class CertificationReport:
    """Dataset-level figures: clean accuracy, certified accuracy at each eps, median radius
    (zeros counted: the paper's statistic) and the certified-accuracy curve."""

    n: int
    clean_accuracy: float
    certified_accuracy: dict[float, float]
    median_radius: float
    lipschitz: float
    radii: torch.Tensor = field(repr=False)
    correct: torch.Tensor = field(repr=False)

    def curve(
        self, points: int = 200, max_radius: float | None = None
    ) -> list[tuple[float, float]]:
        """Certified accuracy against radius, from 0 (clean accuracy) to ``max_radius``."""
        top = max_radius if max_radius is not None else float(self.radii.max()) * 1.05 or 1.0
        grid = torch.linspace(0.0, top, points, dtype=torch.float64)
        acc = [
            self.clean_accuracy if r == 0 else float((self.radii >= r).double().mean())
            for r in grid.tolist()
        ]
        return list(zip(grid.tolist(), acc, strict=True))

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {str(k): v for k, v in self.certified_accuracy.items()},
            "median_radius": self.median_radius,
            "lipschitz_bound": self.lipschitz,
            "curve": self.curve(),
        }


def evaluate(
    model: nn.Module,
    bound: LipschitzBound | CertifiedBound,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: Sequence[float],
    *,
    rtol: float = MARGIN_RTOL,
) -> CertificationReport:
    """Certify every batch and summarise (clean and certified accuracy, median radius)."""
    _check_same_model(model, bound)
    cert = _resolve(bound, allow_estimate=False)
    radii, correct = [], []
    with eval_mode(model), full_precision():  # the batches' device is not known yet
        for xb, yb in batches:
            _check_batch(xb, yb, cert)
            logits = _forward(model, xb, cert)
            batch_radii = radii_from_logits(logits, yb, cert, rtol=rtol)  # InputError first
            _self_check(model, xb, cert, logits)
            radii.append(batch_radii.cpu())
            correct.append((logits.argmax(1) == yb.to(logits.device)).cpu())
    if not radii:
        raise InputError("no data to certify")
    r = torch.cat(radii)
    c = torch.cat(correct)
    return CertificationReport(
        n=int(r.numel()),
        clean_accuracy=float(c.double().mean()),
        certified_accuracy={float(e): certified_accuracy(r, float(e)) for e in eps},
        median_radius=float(statistics.median(r.tolist())),
        lipschitz=cert.value,
        radii=r,
        correct=c,
    )


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (x, y) batches moved to ``device``."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
