"""The LMT loss (paper Alg. 1), its c schedule, and the paper's baseline regularisers."""

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
    target = F.one_hot(y, k).to(logits.dtype)
    if bound.dim() == 2:
        add = c * bound[y]  # (N, K): c K[t, i]
    else:
        add = (math.sqrt(2.0) * c * bound).expand(n, k)
    add = add * (1.0 - target)
    if release_factor:
        with torch.no_grad():
            zt = logits.gather(1, y[:, None])
            ratio = (zt - logits) / add.clamp_min(1e-12)
            ratio = ratio.clamp(0.0, 1.0).masked_fill(target.bool(), 1.0)
            factor = ratio.min(dim=1, keepdim=True).values
        add = add * factor
    return logits + add


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
