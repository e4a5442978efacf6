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

import functools
import inspect
import os
import site
import sys
import sysconfig
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
#: per class, its methods when registered (with their code objects) and whether they were
#: torch's own (torch classes)
_CLASS_SNAPSHOTS: dict[type, dict[str, tuple[Any, Any, bool]]] = {}
#: per namespace (torch.nn.functional, torch, torch.Tensor, the modules of the classes rules
#: cover): its functions, classes and modules when remembered, with their code objects
_NAMESPACES: dict[Any, list[tuple[str, Any, Any]]] = {}
#: per namespace, the names it had (a new name on torch.Tensor shadows TensorBase's method)
_NAMES: dict[Any, frozenset[str]] = {}
#: entries that were not torch's own when remembered (patched before lipmargin was imported)
_FOREIGN: list[str] = []


def _in_torch(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_TORCH_DIR + os.sep)


def _from_torch(fn: Any) -> bool:
    """Implemented by torch: a native function or descriptor of a torch module, a Python
    function in a file of torch's package (a wrapper applied with ``functools.wraps`` keeps the
    wrapped function's ``__module__``, not its file), or an instance of a torch class."""
    if isinstance(fn, (staticmethod, classmethod)):
        return _from_torch(fn.__func__)
    if isinstance(fn, types.FunctionType):
        return _in_torch(fn.__code__.co_filename)
    if isinstance(fn, types.BuiltinFunctionType):
        return str(getattr(fn, "__module__", None) or "torch").startswith("torch")
    if isinstance(fn, _NATIVE):
        owner = getattr(fn, "__objclass__", None)
        return owner is None or str(owner.__module__).startswith("torch")
    kind = type(fn)  # a callable object (functools.partial, ...): its class must be torch's
    if not kind.__module__.startswith("torch"):
        return False
    code = getattr(getattr(kind, "__call__", None), "__code__", None)  # noqa: B004
    return code is None or _in_torch(code.co_filename)


#: where installed libraries live (the standard library, site-packages): code elsewhere is the
#: user's own
_LIBRARY_DIRS = tuple(
    os.path.abspath(p) + os.sep
    for p in (
        *(sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")),
        *(site.getsitepackages() if hasattr(site, "getsitepackages") else ()),
        site.getusersitepackages() if hasattr(site, "getusersitepackages") else None,
        *(e for e in sys.path if e.rstrip(os.sep).endswith(("site-packages", "dist-packages"))),
    )
    if p
)


def _user_code(value: Any) -> bool:
    """A Python function (or a partial of one) defined outside torch and outside installed
    libraries, after unwrapping decorators (``typing_extensions.deprecated`` wraps some of
    torch's own functions)."""
    fn = value.func if isinstance(value, functools.partial) else value
    if isinstance(fn, types.FunctionType):
        fn = inspect.unwrap(fn)
    if not isinstance(fn, types.FunctionType) or _from_torch(fn):
        return isinstance(value, functools.partial) and not _from_torch(value)
    return not os.path.abspath(fn.__code__.co_filename).startswith(_LIBRARY_DIRS)


def _native_name(name: str) -> bool:
    """The name of one of torch's own operations (a native function or a function of
    ``torch.functional``): a user function under such a name in a torch namespace replaced it
    (a patch made before lipmargin was imported); other names are the user's own helpers."""
    natives = (_torch._C._VariableFunctions, _torch._C._nn, _torch._C.TensorBase)
    return any(hasattr(ns, name) for ns in natives) or name in _torch.functional.__all__


def _compute_entry(ns: Any, value: Any) -> bool:
    """What ``check_unpatched_functions`` watches: in the ``torch`` namespace its operations
    only (native functions and ``torch.functional``; ``torch.load`` or ``torch.manual_seed``
    compute nothing a model's forward returns, and users patch them); elsewhere every function,
    class and module."""
    if ns is not _torch:
        return callable(value) or isinstance(value, types.ModuleType)
    return isinstance(value, types.BuiltinFunctionType) or (
        isinstance(value, types.FunctionType) and value.__module__ == "torch.functional"
    )


def _snapshot_class(cls: type) -> None:
    for c in cls.__mro__:
        if c is object or c in _CLASS_SNAPSHOTS:
            continue
        torch_class = c.__module__.startswith("torch")
        _CLASS_SNAPSHOTS[c] = {
            k: (v, getattr(v, "__code__", None), not torch_class or _from_torch(v))
            for k, v in vars(c).items()
            if callable(v)
        }
        module = sys.modules.get(c.__module__)
        if torch_class and module is not None:  # the globals its methods read (F, torch, ...)
            snapshot_namespaces(module)


def _unchanged(now: Any, then: Any) -> bool:
    """``now`` is torch's own wrapper of the remembered ``then`` (torch wraps some of its
    functions on first use, e.g. ``torch.manual_seed`` when dynamo loads)."""
    return isinstance(now, types.FunctionType) and _from_torch(now) and now.__wrapped__ is then


def check_unpatched_class(kind: type, registered: type) -> None:
    """Raise ``UnsupportedOperationError`` if a method of ``kind``'s classes down to
    ``registered`` (whose rule applies) differs from its snapshot (object or code)."""
    from ..errors import UnsupportedOperationError

    for c in kind.__mro__:
        snap = _CLASS_SNAPSHOTS.get(c)
        for name, (fn, code, from_torch) in (snap or {}).items():
            now = vars(c).get(name)
            if now is not fn or getattr(now, "__code__", None) is not code or not from_torch:
                raise UnsupportedOperationError(
                    f"{c.__module__}.{c.__qualname__}.{name} has been replaced (a monkey-patch): "
                    f"the rule for {registered.__name__} covers its original implementation; "
                    "undo the patch to certify"
                )
        if c is registered:
            return


def snapshot_namespaces(*namespaces: Any) -> None:
    """Remember the functions, classes and modules of ``namespaces``."""
    for ns in namespaces:
        if ns in _NAMESPACES:
            continue
        entries = []
        for name, value in list(vars(ns).items()):
            if _user_code(value) and _native_name(name):
                _FOREIGN.append(f"{getattr(ns, '__name__', ns)}.{name}")
            if name.startswith("__") or not _compute_entry(ns, value):
                continue
            entries.append((name, value, getattr(value, "__code__", None)))
        _NAMESPACES[ns] = entries
        _NAMES[ns] = frozenset(vars(ns))


def check_unpatched_functions() -> None:
    """Raise ``UnsupportedOperationError`` if a remembered entry was replaced since (object or
    code), was not torch's own when remembered, or a new name on ``torch.Tensor`` shadows a
    method of its base class."""
    from ..errors import UnsupportedOperationError

    def refuse(what: str) -> None:
        raise UnsupportedOperationError(
            f"{what} has been replaced (a monkey-patch): the rules cover torch's own "
            "implementation; undo the patch to certify"
        )

    if _FOREIGN:
        refuse(_FOREIGN[0])
    for ns, entries in _NAMESPACES.items():  # the fast path: identities only
        table = vars(ns)
        get = table.get
        for name, value, code in entries:
            now = get(name)
            if now is not value:
                if not _unchanged(now, value):
                    refuse(f"{getattr(ns, '__name__', ns)}.{name}")
            elif code is not None and now.__code__ is not code:
                refuse(f"{getattr(ns, '__name__', ns)}.{name}")
        if len(table) != len(_NAMES[ns]) and ns is _torch.Tensor:
            base = _torch._C.TensorBase
            for name in set(table) - _NAMES[ns]:
                if hasattr(base, name):
                    refuse(f"torch.Tensor.{name} (shadowing torch._C.TensorBase.{name})")
