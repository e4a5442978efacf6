"""Helpers shared by the rule files: argument parsing, the scaled-input rule, a factor cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch.fx import Node

from ...errors import UnsupportedOperationError

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext

#: numpy-style keyword spellings torch accepts (``x.mean(axis=1)``, ``keepdims=True``)
_KEYWORD_ALIASES = {"axis": "dim", "keepdims": "keepdim"}


def _args(
    ctx: WalkContext, node: Node, names: Sequence[str], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Positional and keyword arguments of a call node, by parameter name. Arguments computed
    from constants (e.g. ``x.shape[2:]``) are replaced by their values; an unexpected extra
    positional argument is refused rather than ignored."""
    if len(node.args) > len(names):
        raise UnsupportedOperationError(
            f"node {node.name!r}: {len(node.args)} positional arguments, the rule knows {names}"
        )
    out = dict(defaults)
    for name, value in zip(names, node.args, strict=False):
        out[name] = value
    for key, value in node.kwargs.items():
        key = _KEYWORD_ALIASES.get(key, key)
        if key not in names and key not in defaults:
            # An argument the rule does not read could change what the node computes (e.g. a
            # reduction's ``axis``): refuse rather than guess.
            raise UnsupportedOperationError(
                f"node {node.name!r}: keyword argument {key!r} has no rule (known: {names})"
            )
        out[key] = value

    def resolve(a: Node) -> Any:
        return a if ctx.L(a) is not None else ctx.value(a)

    return {k: torch.fx.node.map_arg(v, resolve) for k, v in out.items()}


def _first(ctx: WalkContext, node: Node) -> torch.Tensor:
    bound = ctx.L(node.args[0] if node.args else next(iter(node.kwargs.values())))
    if bound is None:  # pragma: no cover - constant nodes never reach a rule
        raise UnsupportedOperationError(f"node {node.name!r}: input is constant")
    return bound


def _scaled(factor: float, kind: str):
    def rule(ctx: WalkContext, node: Node) -> torch.Tensor:
        if factor == 1.0:
            return _first(ctx, node)
        ctx.record(node, kind, factor)
        return _first(ctx, node) * factor

    return rule


def sqrt_up(n: float) -> float:
    """``sqrt(n)`` rounded UP (a relative 1e-12): factors built from square roots of window or
    copy counts stay upper bounds in floating point."""
    return math.sqrt(n) * (1.0 + 1e-12)


def _cached(ctx: WalkContext, node: Node, compute) -> float:
    """A shape-only constant of ``node``, computed once per model state (``ctx.cached``)."""
    return ctx.cached(node, compute)


identity = _scaled(1.0, "identity")
