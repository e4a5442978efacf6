"""The LMT loss (paper Alg. 1), its c schedule, the paper's baseline regularisers, and three later
Lipschitz-margin losses beside LMT (issue 15): GloRo, EMMA and CLL.

All margin losses take the same bound as ``lmt_loss``: the K x K pairwise matrix ``K[t, i]`` of
``LipschitzBound`` (Prop. 2: ``K[t, i]`` bounds the Lipschitz constant of ``z_t - z_i``) or a
scalar ``L`` of the whole logit map (Prop. 1), which stands for ``K[t, i] = sqrt(2) L`` for every
``i != t``. ``eps`` is the training radius (the config's ``c``, with its warm-up schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def lmt_logits(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    c: float,
    *,
    release_factor: bool = True,
) -> torch.Tensor:
    """Logits with the Lipschitz margin added to every non-target class (paper Alg. 1).

    ``bound`` is either the K x K pairwise matrix ``K[t, i]`` (Prop. 2: add ``c K[t, i]``) or a
    scalar ``L`` of the whole logit map (Prop. 1: add ``sqrt(2) c L``). With
    ``release_factor`` (the authors' release, our default) the addition is scaled per sample by
    ``f = min_{i != t} clip((z_t - z_i) / (c K[t, i]), 0, 1)``, held constant in backward
    (``f = 0`` for a misclassified sample: plain cross-entropy). ``c = 0`` returns ``logits``.
    """
    if c < 0 or not math.isfinite(c):
        raise ConfigError(f"c must be a finite non-negative number, got {c}")
    if c == 0:
        return logits
    n, k = logits.shape
    target = y[:, None]
    if bound.dim() == 2:
        add = c * bound[y]  # (N, K): c K[t, i]
    else:
        add = (math.sqrt(2.0) * c * bound).expand(n, k).contiguous()
    add = add.scatter(1, target, 0.0)  # nothing added to the target logit
    if not release_factor:
        return logits + add
    with torch.no_grad():
        zt = logits.gather(1, target)
        ratio = (zt - logits).div_(add.clamp_min(1e-12)).clamp_(0.0, 1.0)
        factor = ratio.scatter_(1, target, 1.0).amin(dim=1, keepdim=True)
    return torch.addcmul(logits, add, factor)


def lmt_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    c: float,
    *,
    release_factor: bool = True,
) -> torch.Tensor:
    """Softmax cross-entropy of ``lmt_logits`` (paper Alg. 1). Equals cross-entropy at c = 0."""
    return F.cross_entropy(lmt_logits(logits, y, bound, c, release_factor=release_factor), y)


def pair_bounds(bound: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample rows ``K[y_n, i]`` (N x K) with 0 at the label, from the pairwise K x K matrix
    (Prop. 2) or a scalar ``L`` of the whole logit map (Prop. 1: ``sqrt(2) L`` off the label)."""
    target = F.one_hot(y, k).bool()
    if bound.dim() == 2:
        if bound.shape != (k, k):
            raise ValueError(f"pairwise bound must be {k} x {k}, got {tuple(bound.shape)}")
        rows = bound[y]
    elif bound.dim() == 0:
        rows = (math.sqrt(2.0) * bound).expand(y.shape[0], k)
    else:
        raise ValueError(
            f"bound must be a K x K matrix or a scalar, got shape {tuple(bound.shape)}"
        )
    return rows.masked_fill(target, 0.0)


def _check_eps(eps: float) -> None:
    if eps < 0 or not math.isfinite(eps):
        raise ConfigError(f"eps must be a finite non-negative number, got {eps}")


def gloro_logits(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    anchor: str = "label",
) -> torch.Tensor:
    """Logits with GloRo's bottom class appended: N x (K+1).

    Leino, Wang, Fredrikson, "Globally-Robust Neural Networks", ICML 2021 (the bottom logit
    of a GloRo net; authors' code ``gloro/layers/margin_layers.py``, ``LipschitzMargin.call``):
    ``z_bot = max_{i != j} (z_i + eps K[j, i])``. ``anchor="label"`` (our default, as in this
    project's issue 15) takes ``j = y``, the true class; ``anchor="prediction"`` takes
    ``j = argmax z`` as the authors' ``LipschitzMargin`` layer does. The two agree on every
    correctly classified point. The network is eps-robust at ``x`` (certificate of Prop. 2) iff
    ``z_j > z_bot``, i.e. iff argmax of the K+1 logits is not the bottom class.
    """
    _check_eps(eps)
    if anchor not in ("label", "prediction"):
        raise ConfigError(f"anchor must be 'label' or 'prediction', got {anchor!r}")
    n, k = logits.shape
    if k < 2:
        raise ValueError("GloRo needs at least two classes")
    j = y if anchor == "label" else logits.detach().argmax(1)
    rows = pair_bounds(bound, j, k).to(logits.dtype)
    shifted = (logits + eps * rows).masked_fill(F.one_hot(j, k).bool(), -math.inf)
    bottom = shifted.max(dim=1, keepdim=True).values
    return torch.cat([logits, bottom], dim=1)


def gloro_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    trades_lambda: float = 0.0,
    anchor: str = "label",
) -> torch.Tensor:
    """GloRo training loss (Leino et al., ICML 2021).

    ``trades_lambda = 0``: softmax cross-entropy of the K+1 logits of ``gloro_logits`` with the
    true class (the bottom class is never a label), i.e.
    ``-z_y + log(sum_i exp z_i + exp z_bot)``.

    ``trades_lambda > 0`` (GloRo's TRADES variant, ``Trades`` in the authors'
    ``gloro/training/losses.py``, KL form):
    ``CE(z, y) + lambda * KL(p || q)`` with ``p`` = softmax of the clean logits with a zero
    appended for the bottom class and ``q`` = softmax of the K+1 logits. Because ``q_i`` is
    ``p_i`` scaled by one common factor, the KL term equals
    ``log(sum_i exp z_i + exp z_bot) - log(sum_i exp z_i) = softplus(z_bot - logsumexp(z))``,
    which is what we compute (gradients flow through both sides, as in the authors' code).

    Neither form is plain cross-entropy at ``eps = 0``: the bottom logit is then the runner-up
    logit, counted a second time.
    """
    if trades_lambda < 0 or not math.isfinite(trades_lambda):
        raise ConfigError(
            f"trades_lambda must be a finite non-negative number, got {trades_lambda}"
        )
    ext = gloro_logits(logits, y, bound, eps, anchor=anchor)
    if trades_lambda == 0:
        return F.cross_entropy(ext, y)
    kl = torch.logsumexp(ext, dim=1) - torch.logsumexp(logits, dim=1)
    return F.cross_entropy(logits, y) + trades_lambda * kl.mean()


def emma_logits(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    floor: float = 0.01,
) -> torch.Tensor:
    """EMMA logits: LMT with a per-sample, per-class adaptive radius.

    Hu, Leino, Wang, Fredrikson, "Unlocking Deterministic Robustness Certification on ImageNet",
    NeurIPS 2023 (Efficient Margin MAximization; the authors' reference ``emma_loss``):
    for every ``i != y``
    ``eps_i = eps * clip((z_y - z_i) / (eps K[y, i]), floor, 1)``, held constant in backward,
    and ``z'_i = z_i + eps_i K[y, i]`` (``z'_y = z_y``). So ``eps_i`` is the current pairwise
    certified radius ``(z_y - z_i) / K[y, i]`` clipped to ``[floor eps, eps]``: a class already
    certified beyond ``eps`` gets the full LMT margin, a class close to (or across) the boundary
    only a small one, instead of LMT's single margin per sample. ``floor = 0.01`` as in the
    authors' code. The gradient reaches the bound through ``K[y, i]``. ``eps = 0`` returns
    ``logits`` (plain cross-entropy).
    """
    _check_eps(eps)
    if not 0.0 <= floor <= 1.0:
        raise ConfigError(f"floor must lie in [0, 1], got {floor}")
    if eps == 0:
        return logits
    n, k = logits.shape
    rows = pair_bounds(bound, y, k).to(logits.dtype)
    with torch.no_grad():
        gap = logits.gather(1, y[:, None]) - logits  # z_y - z_i
        ratio = (gap / (eps * rows).clamp_min(1e-12)).clamp(floor, 1.0)
    return logits + ratio * eps * rows


def emma_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    floor: float = 0.01,
) -> torch.Tensor:
    """Softmax cross-entropy of ``emma_logits`` (Hu et al., NeurIPS 2023). Cross-entropy at 0."""
    return F.cross_entropy(emma_logits(logits, y, bound, eps, floor=floor), y)


def cll_temperature(eps: float, p: float) -> float:
    """CLL's temperature ``sigma = 2 eps / Q(p)``, ``Q(p) = logit(1 - p/2) - logit(p/2)``
    ``= 2 log((2 - p) / p)``: the scale of a logistic distribution that puts a share ``1 - p``
    of its mass inside a band of width ``2 eps`` (Losch et al., GCPR 2023; the authors'
    ``err_quantile = p`` with ``dist_type = "logistic"``)."""
    return 2.0 * eps / (2.0 * math.log((2.0 - p) / p))


def cll_logits(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    p: float = 0.3,
    detach_bound: bool = True,
) -> torch.Tensor:
    """Calibrated logits of the CLL loss: ``u_y = -eps / sigma`` and, for ``i != y``,
    ``u_i = ((z_i - z_y) / K[y, i] + eps) / sigma`` with ``sigma = cll_temperature(eps, p)``.

    Losch, Stutz, Schiele, Fritz, "Certified Robust Models with Slack Control and Large
    Lipschitz Constants", GCPR 2023 (the calibrated Lipschitz-margin loss, as the authors'
    ``unconstrained/model/losses.py`` class ``CLL`` computes it with ``dist_type =
    "logistic"``, ``min_class_distance = 2 eps``, ``add_epsilon = eps``, two-sided offset).
    ``detach_bound`` (their default): the bound enters as a constant; the Lipschitz constant is
    then kept in check only by the separate decay term of ``cll_loss``.
    """
    _check_eps(eps)
    if eps == 0:
        raise ConfigError("CLL needs eps > 0 (its temperature is 2 eps / Q(p))")
    if not 0.0 < p < 1.0:
        raise ConfigError(f"CLL p must lie in (0, 1), got {p}")
    n, k = logits.shape
    target = F.one_hot(y, k).bool()
    rows = pair_bounds(bound, y, k).to(logits.dtype)
    if detach_bound:
        rows = rows.detach()
    sigma = cll_temperature(eps, p)
    scaled = (logits - logits.gather(1, y[:, None])) / rows.masked_fill(target, 1.0).clamp_min(
        1e-12
    )
    offset = torch.full_like(logits, eps).masked_fill(target, -eps)
    return (scaled + offset) / sigma


def cll_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    *,
    p: float = 0.3,
    lip_decay: float = 0.0,
    detach_bound: bool = True,
) -> torch.Tensor:
    """Calibrated Lipschitz-margin loss (Losch et al., GCPR 2023) plus Lipschitz decay.

    With ``r_i = (z_y - z_i) / K[y, i]`` the pairwise certified radius (Prop. 2),
    ``CLL = log(1 + sum_{i != y} exp((2 eps - r_i) / sigma))``, the cross-entropy of
    ``cll_logits``: a logistic loss on each radius with margin ``2 eps`` and temperature
    ``sigma = 2 eps / Q(p)``. It is invariant to a rescaling of the logits, so the paper adds a
    Lipschitz decay ``lambda K^2`` (their ``GlobalLipschitzDecay``, pow 2); we take
    ``K = max_{t, i} K[t, i]`` of the bound passed in (with gradient), our adaptation, since the
    loss only sees the pairwise bound. ``lip_decay = 0`` leaves the calibrated term alone.
    """
    if lip_decay < 0 or not math.isfinite(lip_decay):
        raise ConfigError(f"lip_decay must be a finite non-negative number, got {lip_decay}")
    u = cll_logits(logits, y, bound, eps, p=p, detach_bound=detach_bound)
    loss = F.cross_entropy(u, y)
    if lip_decay > 0:
        top = bound.max() if bound.dim() == 2 else math.sqrt(2.0) * bound
        loss = loss + lip_decay * top.to(loss.dtype) ** 2
    return loss


LOSSES = ("lmt", "gloro", "emma", "cll")


def margin_loss(
    name: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    bound: torch.Tensor,
    eps: float,
    **kwargs,
) -> torch.Tensor:
    """Dispatch by name: ``"lmt"`` (``lmt_loss``, kwarg ``release_factor``), ``"gloro"``
    (``trades_lambda``, ``anchor``), ``"emma"`` (``floor``), ``"cll"`` (``p``, ``lip_decay``,
    ``detach_bound``). ``eps`` is LMT's ``c``."""
    fns = {"lmt": lmt_loss, "gloro": gloro_loss, "emma": emma_loss, "cll": cll_loss}
    if name not in fns:
        raise ConfigError(f"loss must be one of {LOSSES}, got {name!r}")
    return fns[name](logits, y, bound, eps, **kwargs)


@dataclass
class CSchedule:
    """The LMT constant c: constant (MNIST set-up) or a linear warm-up per iteration from ``c0``
    to ``c`` over ``warmup_epochs`` epochs (SVHN set-up: 1e-5 -> 1e-2 over 5 epochs)."""

    c: float
    c0: float | None = None
    warmup_epochs: float = 0.0
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if self.c < 0 or (self.c0 is not None and self.c0 < 0):
            raise ConfigError("c and c0 must be non-negative")
        if self.warmup_epochs < 0 or self.steps_per_epoch < 1:
            raise ConfigError("warmup_epochs must be >= 0 and steps_per_epoch >= 1")

    def __call__(self, step: int) -> float:
        if self.c0 is None or self.warmup_epochs == 0:
            return self.c
        total = self.warmup_epochs * self.steps_per_epoch
        t = min(1.0, step / total)
        return self.c0 + t * (self.c - self.c0)


def spectral_norm_penalty(sigmas: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """Spectral norm regularisation (Yoshida & Miyato 2017): ``lam / 2 * sum_l sigma_l^2``, with
    the true (power-iteration) sigma, not 1/sigma as in the authors' release."""
    total = sum(s * s for s in sigmas.values())
    return 0.5 * lam * total


@torch.no_grad()
def parseval_retraction(model: nn.Module, beta: float = 1e-4) -> None:
    """Parseval networks (Cisse et al. 2017): after each step, ``W <- (1+b) W - b W W^T W`` for
    every linear and convolution weight (kernels reshaped to ``C_out x (C_in k k)``)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight.reshape(m.weight.shape[0], -1)
            transpose = w.shape[0] > w.shape[1]
            if transpose:
                w = w.T
            w_new = (1 + beta) * w - beta * (w @ w.T @ w)
            if transpose:
                w_new = w_new.T
            m.weight.copy_(w_new.reshape(m.weight.shape))
