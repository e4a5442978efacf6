"""The model registry: names -> factories, aliases, default input shapes, user factories."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from lipmargin.errors import ConfigError

__all__ = [
    "MODEL_INPUT",
    "aliases",
    "build",
    "canonical_name",
    "default_input_shape",
    "load_factory",
    "names",
    "register",
]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_FACTORIES: dict[str, Factory] = {}
_ALIASES: dict[str, str] = {}

#: Default ``(channels, height, width)`` input of every registered model, by canonical name.
MODEL_INPUT: dict[str, tuple[int, int, int]] = {}


def register(
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    input_shape: tuple[int, int, int] | None = None,
) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name`` (and optional aliases).

    The factory takes keyword arguments (conventionally ``in_channels``, ``input_size``,
    ``num_classes``, ``activation``) and returns an ``nn.Module`` whose last operation is the
    ``nn.Linear`` producing the logits. ``input_shape`` is the default ``(C, H, W)`` input; when
    omitted it is read from the factory's ``in_channels`` and ``input_size`` defaults.

    Raises:
        ConfigError: if the name or an alias is already taken.
    """

    def decorator(factory: F) -> F:
        key = name.lower()
        for taken in (key, *(a.lower() for a in aliases)):
            if taken in _FACTORIES or taken in _ALIASES:
                raise ConfigError(f"model name {taken!r} is already registered")
        shape = input_shape if input_shape is not None else _shape_from_defaults(factory)
        _FACTORIES[key] = factory
        channels, height, width = shape
        MODEL_INPUT[key] = (int(channels), int(height), int(width))
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return factory

    return decorator


def _shape_from_defaults(factory: Factory) -> tuple[int, int, int]:
    params = inspect.signature(factory).parameters
    try:
        channels = params["in_channels"].default
        size = params["input_size"].default
    except KeyError as exc:
        raise ConfigError(
            f"register {factory.__name__}: pass input_shape= or give the factory "
            "in_channels and input_size defaults"
        ) from exc
    if not isinstance(channels, int) or not isinstance(size, int):
        raise ConfigError(f"register {factory.__name__}: in_channels/input_size need int defaults")
    return (channels, size, size)


def names() -> list[str]:
    """The canonical names of the registered models, sorted (aliases not included)."""
    return sorted(_FACTORIES)


def aliases() -> dict[str, str]:
    """A copy of the alias table: alias -> canonical name."""
    return dict(_ALIASES)


def _known() -> str:
    parts = []
    for key in names():
        extra = sorted(a for a, target in _ALIASES.items() if target == key)
        parts.append(f"{key} (alias {', '.join(extra)})" if extra else key)
    return ", ".join(parts)


def _is_spec(name: str) -> bool:
    return ":" in name and name.rsplit(":", 1)[0].endswith(".py")


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive).

    Raises:
        ConfigError: for an unknown name; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise ConfigError(
            f"unknown model {name!r}; known models: {_known()}; "
            "or give a user model as path/to/file.py:factory"
        )
    return key


def build(name: str, **kwargs: object) -> nn.Module:
    """Build a model by registered name or alias, or from a ``path/to/file.py:factory`` spec.

    Keyword arguments go to the factory (``in_channels``, ``input_size``, ``num_classes``,
    ``activation``, and model-specific ones).

    Raises:
        ConfigError: unknown name, a keyword argument the factory does not take, an invalid value,
            or a factory that does not return an ``nn.Module``.
    """
    if isinstance(name, str) and _is_spec(name):
        factory = load_factory(name)
        label = name
    else:
        label = canonical_name(name)
        factory = _FACTORIES[label]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {label!r}: bad arguments {sorted(kwargs)}: {exc}") from exc
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {label!r} returned {type(model).__name__}, not nn.Module")
    return model


def default_input_shape(name: str, **kwargs: object) -> tuple[int, int, int]:
    """The ``(C, H, W)`` input of a registered model; ``in_channels``/``input_size`` override it.

    Other keyword arguments are ignored, so the keyword arguments given to :func:`build` can be
    passed unchanged.

    Raises:
        ConfigError: for an unknown name (user ``file.py:factory`` models have no registered shape).
    """
    channels, height, width = MODEL_INPUT[canonical_name(name)]
    if kwargs.get("in_channels") is not None:
        channels = int(kwargs["in_channels"])  # type: ignore[call-overload]
    if kwargs.get("input_size") is not None:
        height = width = int(kwargs["input_size"])  # type: ignore[call-overload]
    return (channels, height, width)


def load_factory(spec: str) -> Factory:
    """Load a user model factory given as ``path/to/file.py:factory``.

    The file is imported by path (it need not be on ``sys.path``) under a private module name
    derived from its resolved path, so loading the same file twice gives the same module.

    Raises:
        ConfigError: malformed spec, missing file, an error while importing the file, or a missing
            or non-callable factory.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"user model must be given as path/to/file.py:factory, got {spec!r}")
    file_part, factory_name = spec.rsplit(":", 1)
    if not file_part or not factory_name.isidentifier():
        raise ConfigError(f"user model must be given as path/to/file.py:factory, got {spec!r}")
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise ConfigError(f"user model file not found: {path}")
    path = path.resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"_lipmargin_user_model_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot import user model file {path} (is it a .py file?)")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ConfigError(
                f"importing user model file {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    factory = getattr(module, factory_name, None)
    if factory is None:
        available = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise ConfigError(
            f"user model file {path} has no {factory_name!r}; callables there: "
            f"{', '.join(available) or '(none)'}"
        )
    if not callable(factory):
        raise ConfigError(f"{factory_name!r} in {path} is not callable")
    return factory
