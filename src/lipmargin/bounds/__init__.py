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
