"""Try to break certificates, and the paper's tightness analysis (paper Fig. 4).

``audit`` attacks every certified point INSIDE its certified radius (PGD with per-example
radius, and C&W minimal perturbations): any success is a broken certificate. It also compares
the largest input-gradient norm of each margin function found (a Lipschitz LOWER bound) with
the certified pairwise bound (an upper bound): a ratio above 1 would also prove the bound wrong.

``tightness`` computes, per test point, (A) the certified radius, (B) the margin over a global
Lipschitz ESTIMATE from input gradients over the data, (C) the margin over a local estimate from
gradients at random points near x, (D) the smallest adversarial perturbation found by attacks.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attacks import cw_l2, pgd_l2, smallest_adversarial
from .bounds import CertifiedBound, LipschitzBound
from .certify import radii_from_logits
from .errors import InputError

#: The paper's median ratios (Fig. 4; the LMT row from a secondary summary).
PAPER_RATIOS = {
    "unregularised": {"B/A": 39.9, "C/B": 1.13, "D/C": 1.82},
    "lmt": {"B/A": 1.42, "C/B": 1.02, "D/C": 1.15},
}


def _cert(bound: LipschitzBound | CertifiedBound) -> CertifiedBound:
    return bound.certified() if isinstance(bound, LipschitzBound) else bound


def _runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    masked = logits.detach().clone()
    masked.scatter_(1, y[:, None], float("-inf"))
    return masked.argmax(1)


def margin_gradient_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """``||grad_x (F_y - F_other)(x)||`` per example: a Lipschitz LOWER bound of that pair."""
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        z = model(xr)
        m = z.gather(1, y[:, None]) - z.gather(1, other[:, None])
        (g,) = torch.autograd.grad(m.sum(), xr)
    return g.flatten(1).norm(dim=1).detach()


def _pair_bound(cert: CertifiedBound, y: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if cert.pairwise is not None:
        return cert.pairwise[y.cpu(), other.cpu()]
    return torch.full((y.shape[0],), 2**0.5 * cert.value, dtype=torch.float64)


@dataclass
class AuditResult:
    """Outcome of ``audit``. ``broken`` lists every certificate an attack broke."""

    n: int
    n_certified: int
    broken: list[dict] = field(default_factory=list)
    gradient_ratio_max: float = 0.0
    gradient_ratio_median: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.broken and self.gradient_ratio_max <= 1.0

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "n_certified": self.n_certified,
            "broken": self.broken,
            "gradient_lower_over_certified_max": self.gradient_ratio_max,
            "gradient_lower_over_certified_median": self.gradient_ratio_median,
            "ok": self.ok,
        }


def audit(
    model: nn.Module,
    bound: LipschitzBound | CertifiedBound,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    pgd_steps: int = 50,
    pgd_restarts: int = 2,
    cw_steps: int = 100,
    cw_binary_steps: int = 5,
    use_cw: bool = True,
    seed: int = 0,
) -> AuditResult:
    """Attack every certified point within its certified radius; report broken certificates.

    The attacks' random starts come from a generator seeded with ``seed``: the same inputs
    give the same result.
    """
    cert = _cert(bound)
    gen: torch.Generator | None = None
    model.eval()
    result = AuditResult(n=0, n_certified=0)
    ratios: list[torch.Tensor] = []
    offset = 0
    for xb, yb in batches:
        if gen is None:
            gen = torch.Generator(device=xb.device).manual_seed(seed)
        with torch.no_grad():
            logits = model(xb)
        radii = radii_from_logits(logits, yb, cert)
        mask = radii > 0
        result.n += int(yb.shape[0])
        result.n_certified += int(mask.sum())
        idx = torch.nonzero(mask).flatten()
        if idx.numel():
            xc, yc, rc = xb[idx], yb[idx], radii[idx].to(xb.dtype)
            found = {
                "pgd": pgd_l2(
                    model, xc, yc, rc, steps=pgd_steps, restarts=pgd_restarts, generator=gen
                )
            }
            if use_cw:
                found["cw"] = cw_l2(model, xc, yc, steps=cw_steps, binary_steps=cw_binary_steps)
            for name, res in found.items():
                hit = (res.success & (res.norms.double() <= rc.double())).cpu()
                for j in torch.nonzero(hit).flatten().tolist():
                    result.broken.append(
                        {
                            "index": offset + int(idx[j]),
                            "attack": name,
                            "radius": float(rc[j]),
                            "perturbation_norm": float(res.norms[j]),
                        }
                    )
            other = _runner_up(logits[idx], yc)
            g = (
                torch.cat(
                    [
                        margin_gradient_norms(model, xc, yc, other),
                        margin_gradient_norms(model, found["pgd"].x_adv, yc, other),
                    ]
                )
                .double()
                .cpu()
            )
            k = _pair_bound(cert, yc, other).repeat(2)
            ratios.append(g / k)
        offset += int(yb.shape[0])
    if ratios:
        r = torch.cat(ratios)
        result.gradient_ratio_max = float(r.max())
        result.gradient_ratio_median = float(r.median())
    return result


@dataclass
class TightnessResult:
    """Per-point (A) certified radius, (B) global-gradient, (C) local-gradient estimates and
    (D) smallest adversarial perturbation; medians of B/A, C/B, D/C over points with A > 0."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    d: torch.Tensor

    def ratios(self) -> dict[str, float]:
        keep = (self.a > 0) & torch.isfinite(self.d) & (self.c > 0)
        if not keep.any():
            raise InputError("no certified point to analyse")
        a, b, c, d = (t[keep] for t in (self.a, self.b, self.c, self.d))
        return {
            "B/A": float(statistics.median((b / a).tolist())),
            "C/B": float(statistics.median((c / b).tolist())),
            "D/C": float(statistics.median((d / c).tolist())),
            "points": int(keep.sum()),
        }

    def medians(self) -> dict[str, float]:
        return {
            k: float(v.median())
            for k, v in zip("ABCD", (self.a, self.b, self.c, self.d), strict=True)
        }


def tightness(
    model: nn.Module,
    bound: LipschitzBound | CertifiedBound,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    local_samples: int = 16,
    batch_size: int = 200,
    seed: int = 0,
) -> TightnessResult:
    """The paper's tightness analysis (Fig. 4) on correctly classified points of ``(x, y)``.

    Runs on the device of ``x`` (the model's); the random points come from a CPU generator
    seeded with ``seed``; the per-point results are returned on the CPU."""
    cert = _cert(bound)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    keep = logits.argmax(1) == y
    x, y, logits = x[keep], y[keep], logits[keep]
    other = _runner_up(logits, y)
    margin = (logits.gather(1, y[:, None]) - logits.gather(1, other[:, None])).flatten().double()
    a = radii_from_logits(logits, y, cert)
    grads = torch.cat(
        [
            margin_gradient_norms(
                model, x[i : i + batch_size], y[i : i + batch_size], other[i : i + batch_size]
            )
            for i in range(0, len(x), batch_size)
        ]
    ).double()
    b = margin / grads.max()
    c_est = grads.clone()
    for _ in range(local_samples):
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        rand = torch.rand(x.shape[0], generator=gen).to(x.device)
        scale = (rand ** (1.0 / x[0].numel())) * b.float()
        xn = (x + noise * scale.view(-1, *[1] * (x.dim() - 1))).clamp(0, 1)
        g = torch.cat(
            [
                margin_gradient_norms(
                    model, xn[i : i + batch_size], y[i : i + batch_size], other[i : i + batch_size]
                )
                for i in range(0, len(x), batch_size)
            ]
        ).double()
        c_est = torch.maximum(c_est, g)
    c = margin / c_est
    d = torch.cat(
        [
            smallest_adversarial(model, x[i : i + batch_size], y[i : i + batch_size]).norms
            for i in range(0, len(x), batch_size)
        ]
    ).double()
    return TightnessResult(a=a.cpu(), b=b.cpu(), c=c.cpu(), d=d.cpu())
