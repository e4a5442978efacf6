"""Guaranteed Lipschitz upper bounds of plain PyTorch models (paper §5)."""

from .graph import (
    CertifiedBound,
    LayerRow,
    LipmarginTracer,
    LipschitzBound,
    WalkContext,
    observer,
)
from .registry import register_function, register_method, register_module

# the built-in rules, registered at import: the registry remembers the implementations of the
# classes they cover as they are now (monkey-patches made later are refused)
from . import rules  # noqa: E402, F401  # isort: skip

__all__ = [
    "CertifiedBound",
    "LayerRow",
    "LipmarginTracer",
    "LipschitzBound",
    "WalkContext",
    "observer",
    "register_function",
    "register_method",
    "register_module",
]
