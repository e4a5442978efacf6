"""Registry of Lipschitz rules, one per operator family (the auto_LiRPA idea, a few lines each).

A rule is ``rule(ctx, node) -> Tensor | None``: the Lipschitz constant (L2 -> L2) of the map from
the network input to ``node``'s output, built from ``ctx.L(arg)`` of the node's arguments
(``None`` means "does not depend on the input"). Composition multiplies, addition adds,
concatenation takes the root of the sum of squares (paper §5).

Register a rule for your own operation with one of the decorators::

    @register_module(MyLayer)
    def my_layer(ctx, node):
        return ctx.L(node.args[0]) * my_constant
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.fx import Node

    from .graph import WalkContext

Rule = Callable[["WalkContext", "Node"], "torch.Tensor | None"]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register_module(*types: type) -> Callable[[Rule], Rule]:
    """Register ``rule`` for ``call_module`` nodes whose module is an instance of ``types``."""

    def deco(rule: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return deco


def register_function(*fns: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for ``call_function`` nodes calling one of ``fns``."""

    def deco(rule: Rule) -> Rule:
        for f in fns:
            FUNCTION_RULES[f] = rule
        return rule

    return deco


def register_method(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` for ``call_method`` nodes (``x.view(...)`` and so on)."""

    def deco(rule: Rule) -> Rule:
        for n in names:
            METHOD_RULES[n] = rule
        return rule

    return deco


def find_module_rule(module: object) -> Rule | None:
    """The rule for the most specific registered class in ``type(module)``'s MRO.

    A subclass inherits its base's rule only when it does not override ``forward``: a
    ``class MyConv(nn.Conv2d)`` with its own ``forward`` computes something else, so it gets no
    rule (and is refused) rather than the convolution's."""
    kind = type(module)
    for cls in kind.__mro__:
        if cls in MODULE_RULES:
            if cls is not kind and getattr(kind, "forward", None) is not cls.forward:
                return None
            return MODULE_RULES[cls]
    return None
