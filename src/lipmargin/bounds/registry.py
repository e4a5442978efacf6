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

import os
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch as _torch

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
            _snapshot_class(t)
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
            check_unpatched_class(kind, cls)
            return MODULE_RULES[cls]
    return None


# -- monkey-patches ---------------------------------------------------------------------------
# A rule covers the implementation the class (or function) had when it was registered. Patching
# ``nn.Linear.forward`` or ``F.linear`` changes what every instance computes, in eager runs and
# in the graph's run alike, so no comparison of the two sees it: the implementations are
# compared with snapshots taken at import instead (and torch's own classes and functions must
# come from torch's modules, which catches most patches made before lipmargin was imported).
_TORCH_DIR = os.path.dirname(os.path.abspath(_torch.__file__))
_NATIVE = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
#: per class, its methods when registered and whether they were torch's own (torch classes)
_CLASS_SNAPSHOTS: dict[type, dict[str, tuple[Any, bool]]] = {}
_FUNCTIONS_BY_NAMESPACE: dict[Any, list[tuple[str, Any]]] = {}


def _snapshot_class(cls: type) -> None:
    for c in cls.__mro__:
        if c is object or c in _CLASS_SNAPSHOTS:
            continue
        torch_class = c.__module__.startswith("torch")
        _CLASS_SNAPSHOTS[c] = {
            k: (v, not torch_class or _from_torch(v)) for k, v in vars(c).items() if callable(v)
        }


def _from_torch(fn: Any) -> bool:
    """Implemented by torch: native code, or Python code in a file of torch's package (a
    wrapper applied with ``functools.wraps`` keeps the wrapped function's ``__module__``, not
    its file)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        if isinstance(fn, (staticmethod, classmethod)):
            return _from_torch(fn.__func__)
        call = getattr(type(fn), "__call__", None)  # noqa: B004
        if isinstance(fn, _NATIVE) or call is None or isinstance(call, _NATIVE):
            return True  # native (C++) functions and descriptors
        code = getattr(call, "__code__", None)
        if code is None:
            return True
    return os.path.abspath(code.co_filename).startswith(_TORCH_DIR)


def _unchanged(now: Any, then: Any) -> bool:
    """``now`` is the remembered implementation, or torch's own wrapper of it (torch wraps some
    of its functions on first use, e.g. ``torch.manual_seed`` when dynamo loads)."""
    if now is then:  # checked when remembered
        return True
    return _from_torch(now) and getattr(now, "__wrapped__", None) is then


def check_unpatched_class(kind: type, registered: type) -> None:
    """Raise ``UnsupportedOperationError`` if a method of ``kind``'s classes down to
    ``registered`` (whose rule applies) differs from its snapshot."""
    from ..errors import UnsupportedOperationError

    for c in kind.__mro__:
        snap = _CLASS_SNAPSHOTS.get(c)
        for name, (fn, from_torch) in (snap or {}).items():
            if vars(c).get(name) is not fn or not from_torch:
                raise UnsupportedOperationError(
                    f"{c.__module__}.{c.__qualname__}.{name} has been replaced (a monkey-patch): "
                    f"the rule for {registered.__name__} covers its original implementation; "
                    "undo the patch to certify"
                )
        if c is registered:
            return


def snapshot_functions(*namespaces: Any) -> None:
    """Remember the public functions of ``namespaces`` (``torch.nn.functional``, ...)."""
    for ns in namespaces:
        for name, fn in list(vars(ns).items()):
            if (
                callable(fn)
                and not isinstance(fn, type)
                and not name.startswith("__")
                and _from_torch(fn)
            ):
                _FUNCTIONS_BY_NAMESPACE.setdefault(ns, []).append((name, fn))


def check_unpatched_functions() -> None:
    """Raise ``UnsupportedOperationError`` if a remembered function was replaced since, or a
    torch function comes from outside torch."""
    from ..errors import UnsupportedOperationError

    changed = []  # the fast path: identity only
    for ns, entries in _FUNCTIONS_BY_NAMESPACE.items():
        get = vars(ns).get
        changed += [(ns, name, fn) for name, fn in entries if get(name) is not fn]
    for ns, name, fn in changed:
        if not _unchanged(getattr(ns, name, None), fn):
            raise UnsupportedOperationError(
                f"{ns.__name__}.{name} has been replaced (a monkey-patch): the rules cover "
                "torch's own implementation; undo the patch to certify"
            )
