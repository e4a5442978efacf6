"""Gradient-norm-preserving activations and the ``torch.fx`` tracer that keeps them as leaves.

``MaxMin`` and ``GroupSort`` (Anil, Lucas, Grosse, "Sorting out Lipschitz function
approximation", ICML 2019) only permute their input values per sample, so they are 1-Lipschitz
in the L2 norm and their Jacobian is a permutation matrix wherever it exists: backpropagated
gradient norms are preserved exactly.

The Lipschitz-bound engine traces models with :class:`LipmarginTracer`, which keeps every class in
:data:`LEAF_MODULES` as a single ``call_module`` node (plain ``torch.fx.symbolic_trace`` would
inline their ``forward``; the forwards are written so that inlining also works).
"""

from __future__ import annotations

import re

import torch
import torch.fx
from torch import Tensor, nn

from lipmargin.errors import ConfigError, InputError

__all__ = [
    "ACTIVATIONS",
    "LEAF_MODULES",
    "GroupSort",
    "LipmarginTracer",
    "MaxMin",
    "activation",
    "symbolic_trace",
]


def _channels(x: Tensor, dim: int) -> int | None:
    """The size of ``x`` along ``dim`` when it is a concrete tensor, ``None`` while tracing."""
    if isinstance(x, torch.fx.Proxy):
        return None
    if not -x.dim() <= dim < x.dim():
        raise InputError(
            f"channel dim {dim} is out of range for an input of shape {tuple(x.shape)}"
        )
    return int(x.shape[dim])


class MaxMin(nn.Module):
    """``cat(max(a, b), min(a, b))`` where ``a, b`` are the two halves of the channels.

    Works on ``(N, C)`` and ``(N, C, H, W)`` inputs (any shape with a channel axis ``dim``).
    The number of channels must be even.

    Args:
        dim: the channel axis (default 1).
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply MaxMin along ``self.dim``."""
        c = _channels(x, self.dim)
        if c is not None and c % 2 != 0:
            raise InputError(
                f"MaxMin needs an even number of channels along dim {self.dim}, got {c}"
            )
        halves = torch.chunk(x, 2, dim=self.dim)
        a = halves[0]
        b = halves[1]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GroupSort(nn.Module):
    """Sort the channels in ascending order inside consecutive groups of ``group_size``.

    ``GroupSort(2)`` equals ``MaxMin`` up to a fixed permutation of the channels (min first, and
    pairs of neighbouring channels instead of the two halves). The number of channels must be a
    multiple of ``group_size``.

    Args:
        group_size: channels per group (at least 1; 1 is the identity).
        dim: the channel axis (default 1).
    """

    def __init__(self, group_size: int, dim: int = 1) -> None:
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(
                f"GroupSort group_size must be a positive integer, got {group_size!r}"
            )
        self.group_size = group_size
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply GroupSort along ``self.dim``."""
        c = _channels(x, self.dim)
        if c is not None and c % self.group_size != 0:
            raise InputError(
                f"GroupSort(group_size={self.group_size}) needs a channel count divisible by "
                f"{self.group_size} along dim {self.dim}, got {c}"
            )
        g = self.group_size
        grouped = x.unflatten(self.dim, (-1, g))
        if self.dim >= 0:
            # The groups now sit at self.dim, their members at self.dim + 1.
            ordered = torch.sort(grouped, dim=self.dim + 1).values
            return ordered.flatten(self.dim, self.dim + 1)
        # Negative dims count from the end: the members are at self.dim, the groups just before.
        ordered = torch.sort(grouped, dim=self.dim).values
        return ordered.flatten(self.dim - 1, self.dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


#: Module classes outside ``torch.nn`` that tracing must keep as single ``call_module`` nodes.
LEAF_MODULES: tuple[type[nn.Module], ...] = (MaxMin, GroupSort)


class LipmarginTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that also treats the classes in :data:`LEAF_MODULES` as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """True for lipmargin's activation layers, otherwise the default ``torch.fx`` rule."""
        if isinstance(m, LEAF_MODULES):
            return True
        # A class the user registered a rule for (lipmargin.bounds.register_module) must stay one
        # node, or its rule would never be used.
        from lipmargin.bounds.registry import MODULE_RULES

        if type(m) in MODULE_RULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` with :class:`LipmarginTracer` and return the ``GraphModule``."""
    tracer = LipmarginTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


#: Activation names accepted by :func:`activation` (``groupsort<k>`` takes any k >= 1).
ACTIVATIONS: tuple[str, ...] = ("relu", "maxmin", "groupsort2", "groupsort4", "groupsort<k>")

_GROUPSORT = re.compile(r"groupsort(\d+)")


def activation(name: str) -> nn.Module:
    """A new activation module by name (case, spaces, ``_`` and ``-`` are ignored).

    ``"relu"`` -> :class:`torch.nn.ReLU`, ``"maxmin"`` -> :class:`MaxMin`, ``"groupsort<k>"``
    (for example ``"groupsort2"``, ``"groupsort4"``; ``"groupsort"`` alone means 2) ->
    :class:`GroupSort` with group size ``k``. Every call returns a fresh instance.

    Raises:
        ConfigError: for an unknown name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"activation name must be a string, got {type(name).__name__}")
    key = re.sub(r"[\s_-]", "", name.lower())
    if key == "relu":
        return nn.ReLU()
    if key == "maxmin":
        return MaxMin()
    if key == "groupsort":
        return GroupSort(2)
    match = _GROUPSORT.fullmatch(key)
    if match is not None:
        size = int(match.group(1))
        if size < 1:
            raise ConfigError(f"activation {name!r}: the group size must be at least 1")
        return GroupSort(size)
    raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
