"""``LipschitzBound``: trace a plain ``nn.Module`` with torch.fx and bound its Lipschitz constant.

The bound is built node by node in topological order (paper §5): each node's constant is the
Lipschitz constant of the map from the network input to that node, obtained by one rule per
operator family (see ``rules.py``). The same walk runs in three modes:

* ``init``: creates one persistent power-iteration vector per linear map (a buffer ``u_<node>``
  shaped like the map's actual input, batch 1), like ``torch.nn.utils.parametrizations
  .spectral_norm`` keeps ``_u``;
* ``train`` (``forward`` in training mode): ONE power-iteration step per linear map, then the
  differentiable estimate ``||A u||`` with ``u`` held constant (paper Alg. 1 / Thm. 1);
* ``certify`` (``certified()``): float64, no grad, deterministic GUARANTEED upper bounds (exact
  SVD for dense layers, the FFT bound for convolutions), cached until a weight changes.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import numbers
import operator
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_flatten

from ..errors import InputError, LipmarginError, UnsupportedOperationError
from ..layers import LipmarginTracer
from . import checks, norms, operators, power
from .registry import (
    FUNCTION_RULES,
    METHOD_RULES,
    check_unpatched_functions,
    find_module_rule,
    snapshot_namespaces,
)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

CONV_METHODS = ("fft", "closed_form", "power")
#: what the training calls between lazy bounds use (``lazy_gradient``)
LAZY_GRADIENTS = ("held", "scaled")
#: how the power-iteration vectors move (``power_method``)
POWER_METHODS = ("power", "lanczos")
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ipow", "imatmul", "iand", "ior"}


@dataclass
class LayerRow:
    """One row of the per-layer breakdown.

    ``bound`` is a guaranteed upper bound of the layer's own Lipschitz constant (or, for
    ``method="power"``, an estimate); ``estimate`` is a power-iteration value (a lower estimate)
    where the layer is a linear map, else ``None``.
    """

    name: str
    kind: str
    bound: float
    estimate: float | None = None


@dataclass
class CertifiedBound:
    """Result of ``LipschitzBound.certified()``.

    ``value``: upper bound of the Lipschitz constant (L2 -> L2) of the whole logit map
    (use with paper Prop. 1). ``pairwise``: K x K float64 tensor, ``pairwise[t, i]`` an upper
    bound of the Lipschitz constant of ``F_t - F_i`` (paper Prop. 2 / release), zero diagonal;
    ``None`` when the network does not end with an ``nn.Linear``. ``guaranteed`` is False only
    for the comparison method ``conv_method="power"``, whose numbers are estimates.
    """

    value: float
    pairwise: torch.Tensor | None
    layers: list[LayerRow] = field(default_factory=list)
    conv_method: str = "fft"
    guaranteed: bool = True
    #: the input shape (without batch) the bound was computed for; ``certify`` refuses others
    input_shape: tuple[int, ...] | None = None
    #: batches ``certify``/``evaluate`` have certified with this bound (schedules the gradient
    #: self-check, ``lipmargin.certify.SELF_CHECK_FIRST`` / ``SELF_CHECK_EVERY``)
    certified_batches: int = field(default=0, compare=False, repr=False)
    #: the traced graph's torch operations on input-dependent tensors (``checks.check_trace``):
    #: ``certify`` runs the batches it self-checks with them recorded and compares
    operations: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once on an example input and records every node's output kind and shape."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.meta: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.meta[n.name] = out
        return out


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[1:])
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return tuple(tuple(v.shape[1:]) for v in value)
    return None


def _reads_shape(node: torch.fx.Node) -> bool:
    """True for operations that read only metadata of a tensor (shape, device, dtype)."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim", "device", "dtype", "is_cuda")
    return False


_INTERNAL_PATHS = (Path(torch.__file__).resolve().parent, Path(__file__).resolve().parents[1])


def _user_frame(stack_trace: str | None) -> str | None:
    """``file:line: code`` of the innermost frame of a recorded stack trace that lies outside
    torch and lipmargin (the user's own model code)."""
    if not stack_trace:
        return None
    found = None
    lines = stack_trace.splitlines()
    for i, text in enumerate(lines):
        m = re.match(r'\s*File "(.+)", line (\d+), in (.+)', text)
        if not m:
            continue
        path = Path(m.group(1))
        if any(path.is_relative_to(p) for p in _INTERNAL_PATHS if path.is_absolute()):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        found = f"{path.name}:{m.group(2)}: {code}"
    return found


def _trace_failure(exc: Exception) -> str:
    """A refusal message for a failed trace that says what the model did."""
    text = str(exc)
    if "Proxy" in text and isinstance(exc, TypeError):
        return (
            f"could not trace the model with torch.fx ({text}): forward converts a traced size "
            "or value to a Python number (e.g. int(x.size(1) * ratio)). Compute such sizes in "
            "__init__, or with integer arithmetic on sizes (x.size(1) // 2)."
        )
    if "control flow" in text:
        return (
            f"could not trace the model with torch.fx ({text}): forward branches on tensor "
            "values (data-dependent Python control flow), which no static bound can cover."
        )
    return f"could not trace the model with torch.fx: {type(exc).__name__}: {text}"


def _call_arg(node: torch.fx.Node, index: int, name: str) -> Any:
    """Argument ``index`` of a call node, positional or by keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


_ADD_TARGETS = {operator.add, operator.sub, torch.add, torch.sub}


def _is_add_or_sub(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target in ("add", "sub")


def _node_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


class WalkContext:
    """What a rule sees: the bound of each argument, modules, shapes and the linear-map hook."""

    def __init__(self, owner: LipschitzBound, mode: str):
        self.owner = owner
        self.mode = mode
        #: power-iteration steps per training call, extra estimate steps, conv bound method
        self.power_steps = owner.power_steps
        self.power_method = owner.power_method
        self.estimate_steps = owner.estimate_steps
        self.conv_method = owner.conv_method
        #: whether this training call moves the power-iteration vectors (every
        #: ``power_every``-th call in training mode; sigma is recomputed on every call)
        self.update = (
            mode == "train"
            and owner.training
            and (owner._calls // owner.bound_every) % owner.power_every == 0
        )
        self.bounds: dict[str, torch.Tensor | None] = {}
        self.rows: list[LayerRow] = []
        self.sigmas: dict[str, torch.Tensor] = {}
        self.consts: dict[str, Any] = {}
        #: the bound of the final linear layer's input (set by the pairwise output)
        self.head_input: torch.Tensor | None = None
        #: whether a BatchNorm scale used the batch's variance (a gradient path into the
        #: activations that the lazy bound's first-order model does not hold)
        self.batch_statistics = False
        self.dtype = torch.float64 if mode == "certify" else torch.float32

    # -- reading the graph -------------------------------------------------------------
    def L(self, arg: Any) -> torch.Tensor | None:  # noqa: N802 (the paper's symbol)
        """Lipschitz bound of an argument w.r.t. the network input; None for constants."""
        if isinstance(arg, torch.fx.Node):
            return self.bounds[arg.name]
        if isinstance(arg, (list, tuple)):
            raise UnsupportedOperationError("internal: L() of a list; use L_all()")
        return None

    def L_all(self, args: Sequence[Any]) -> list[torch.Tensor]:  # noqa: N802
        """Non-constant bounds among ``args`` (a flat sequence, e.g. the list of torch.cat)."""
        return [b for b in (self.L(a) for a in args) if b is not None]

    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.owner._modules_by_node[node.name]

    def shape(self, arg: Any) -> tuple[int, ...]:
        """Shape without the batch dimension of a node's output (from the example run)."""
        return self.owner._shapes[arg.name]

    def in_shape(self, node: torch.fx.Node, i: int = 0) -> tuple[int, ...]:
        return self.shape(node.args[i])

    def value(self, arg: Any) -> Any:
        """Value of a constant argument (a Python value or a tensor not depending on the input)."""
        if not isinstance(arg, torch.fx.Node):
            return arg
        return self.consts[arg.name]

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A weight as the mode needs it: live (differentiable) in training, float64 detached
        when certifying."""
        if self.mode == "certify":
            return t.detach().to(torch.float64)
        return t

    def const(self, x: float) -> torch.Tensor:
        return torch.tensor(float(x), dtype=self.dtype, device=self.owner._device())

    def fused_bn(self, conv_node: torch.fx.Node) -> torch.fx.Node | None:
        """The BatchNorm node that consumes this convolution and is folded into it, if any."""
        return self.owner._fused.get(conv_node.name)

    def bn_scale(self, bn_node: torch.fx.Node) -> torch.Tensor:
        """Per-channel BN scale ``gamma / sqrt(var + eps)``: batch variance while training
        (gradients flow into it, paper's choice), running variance otherwise."""
        bn = self.module(bn_node)
        var = None
        if self.mode == "train" and bn.training:
            var = self.owner._batch_var.pop(bn_node.name, None)
            self.batch_statistics = self.batch_statistics or var is not None
        if var is None:
            if bn.running_var is None:
                raise UnsupportedOperationError(
                    f"node {bn_node.name!r}: BatchNorm without running statistics "
                    "(track_running_stats=False) cannot be certified"
                )
            var = bn.running_var.detach()
        var = self.tensor(var) if self.mode == "certify" else var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
        return self.tensor(gamma) / torch.sqrt(var + bn.eps)

    # -- linear maps -------------------------------------------------------------------
    def linear(self, node: torch.fx.Node, op: operators.LinearOperator) -> torch.Tensor:
        """Operator norm of the linear map ``op`` at ``node``, as the mode needs it: ``init``
        creates the persistent power-iteration vector ``u_<node>``; ``train`` returns the
        differentiable estimate (``power.training_estimate``, ``power_steps`` steps while the
        bound is in training mode); ``certify`` returns ``op.guaranteed()`` (a float64 upper
        bound) and records it with a power-iteration estimate for the report."""
        key = "u_" + node.name
        if self.mode == "init":
            self.owner._ensure_vector(key, (1, *op.input_shape))
            return self.const(1.0)
        u = getattr(self.owner, key)
        if self.mode == "train":
            held = self.owner._held_grads
            g = held.get(node.name)
            if (
                not self.update
                and g is not None
                and op.weight is not None
                and g.shape == op.weight.shape
                and g.dtype == op.weight.dtype
                and g.device == op.weight.device
            ):
                # between power-iteration updates: sigma = <W, d sigma/dW> with the gradient of
                # the last update (u and v held: the bilinear estimate v^T A u)
                sigma = (op.weight * g).sum()
            else:
                keep = held if self.owner.power_every > 1 else None
                sigma = power.training_estimate(
                    op,
                    u,
                    steps=self.power_steps,
                    update=self.update,
                    keep=keep,
                    key=node.name,
                    method=self.power_method,
                )
            self.sigmas[node.name] = sigma
            return sigma
        est = power.report_estimate(op, u, self.estimate_steps)
        bound = est if op.estimate_only else op.guaranteed()
        self.rows.append(LayerRow(node.name, op.kind, float(bound), float(est)))
        return bound

    def cached(self, node: torch.fx.Node, compute: Callable[[], Any]) -> float:
        """A constant factor of ``node`` that depends only on shapes and module attributes
        (e.g. a pooling map's Schur bound), computed once per model state."""
        cache = self.owner._factor_cache
        if node.name not in cache:
            cache[node.name] = float(compute())
        return cache[node.name]

    def float_output(self, node: torch.fx.Node) -> bool:
        """Whether ``node``'s output (in the example run) is a floating-point tensor."""
        return self.owner._float_output[node.name]

    def record(self, node: torch.fx.Node, kind: str, factor: torch.Tensor | float) -> None:
        """Add a non-linear-map layer to the per-layer breakdown (certify mode only)."""
        if self.mode == "certify":
            self.rows.append(LayerRow(node.name, kind, float(factor), None))


def _getattr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class LipschitzBound(nn.Module):
    """Upper bound of the L2 Lipschitz constant of a plain PyTorch classifier (paper §5).

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx`` mapping ``(N, *input_shape)`` inputs
            to ``(N, K)`` logits. It is NOT registered as a submodule: this module's
            ``state_dict`` holds only the power-iteration vectors.
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
            Convolution bounds are for this actual input size (paper Thm. 1).
        conv_method: ``"fft"`` (default; guaranteed, the minimum of the FFT bound and paper
            Cor. 1), ``"closed_form"`` (paper Cor. 1 only, guaranteed but loose) or ``"power"``
            (power-iteration ESTIMATE, for comparison only: it can under-estimate, so the result
            is flagged ``guaranteed=False`` and ``certify`` refuses it).
        estimate_steps: extra power-iteration steps (float64) for the estimates shown beside
            guaranteed bounds; 0 (default) shows ``||A u||`` with the persistent vector ``u``,
            the value training uses.
        power_every: move the power-iteration vectors only every ``power_every``-th training
            call (default 1, paper Alg. 1); the estimate ``||A u||`` is recomputed from the held
            vectors on every call, so it follows the weights, at a fraction of the cost.
        bound_every: lazy bound (issue 16): in training mode only every ``bound_every``-th call
            walks the graph and moves the power-iteration vectors; the calls between reuse what
            that call found, as ``lazy_gradient`` says. Default 1: every call (paper Alg. 1).
        lazy_gradient: what the calls ``bound_every`` skips return. ``"held"`` (default): a
            first-order model of the body's factor held from the last computed call,
            ``L(W) ~ L_h exp(<W - W_h, dL/dW(W_h)> / L_h)`` (the bound of the head's input with
            a final linear layer, of the whole map otherwise), times the exact pairwise row
            distances of the head's CURRENT weights (Prop. 2): every step gets a bound gradient,
            equal to the computed one at the computed steps (``_FirstOrder``). ``"scaled"``: the
            held bound, detached (no gradient), and the computed calls' gradient scaled by
            ``bound_every`` so the pull is the same on average: the "lazy regularization" of
            Karras et al. (2020, StyleGAN2 §3.1); cheaper per skipped call, but on MNIST
            (docs/ABLATION.md) it certified 1.7-2 points less than ``"held"`` (4C3F at
            ``bound_every = 4``: 55.93% vs 57.60%; Wong-Kolter at 8 with 8 products: 53.87% vs
            55.84%): under Adam a gradient k times larger every k-th step pulls less.
            The per-layer ``last_sigmas`` (the SNR baseline) are lazy as in ``"scaled"``.
        power_steps: power-iteration steps per linear map per training call (paper Alg. 1: 1).
            Deep nets with wide layers (e.g. 4C3F) need more: with one step the product of
            the per-layer estimates can trail the true bound by tens of percent, and training
            then enlarges margins against a Lipschitz constant that is too small.
        power_method: how the first ``power_steps - 1`` products move each vector:
            ``"power"`` (default, paper Alg. 1: power-iteration steps) or ``"lanczos"`` (the top
            Ritz vector of the Krylov space they span, ``power.training_estimate``: the same
            cost, closer to the top singular vector where top singular values are close, as in
            convolutions). From a cold start it wins from about 6 products; with 3 or fewer power
            steps can be closer, so use it with ``power_steps`` >= 6.

    Calling the module returns a differentiable tensor: a K x K pairwise bound when the network
    ends with ``nn.Linear`` (or with ``pairwise=False``, a scalar bound of the whole logit map).
    In training mode each call first makes ``power_steps`` (default ONE) power-iteration steps
    per linear map. These are estimates used for training (never certificates: ``power_steps``
    does not enter ``certified()``, which gives the guaranteed numbers).

    Unknown operations raise ``UnsupportedOperationError`` naming the node: nothing is ever
    assumed to be 1-Lipschitz.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        conv_method: str = "fft",
        estimate_steps: int = 0,
        power_steps: int = 1,
        power_method: str = "power",
        power_every: int = 1,
        bound_every: int = 1,
        lazy_gradient: str = "held",
        seed: int = 0,
    ):
        super().__init__()
        if conv_method not in CONV_METHODS:
            raise InputError(f"conv_method must be one of {CONV_METHODS}, got {conv_method!r}")
        from . import rules  # noqa: F401  (registers the built-in rules)

        object.__setattr__(self, "model", model)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.conv_method = conv_method
        self.estimate_steps = int(estimate_steps)
        if isinstance(power_steps, bool) or not isinstance(power_steps, int) or power_steps < 1:
            raise InputError(f"power_steps must be an integer >= 1, got {power_steps!r}")
        self.power_steps = power_steps
        if power_method not in POWER_METHODS:
            raise InputError(f"power_method must be one of {POWER_METHODS}, got {power_method!r}")
        self.power_method = power_method
        if isinstance(power_every, bool) or not isinstance(power_every, int) or power_every < 1:
            raise InputError(f"power_every must be an integer >= 1, got {power_every!r}")
        self.power_every = power_every
        if isinstance(bound_every, bool) or not isinstance(bound_every, int) or bound_every < 1:
            raise InputError(f"bound_every must be an integer >= 1, got {bound_every!r}")
        self.bound_every = bound_every
        if lazy_gradient not in LAZY_GRADIENTS:
            raise InputError(
                f"lazy_gradient must be one of {LAZY_GRADIENTS}, got {lazy_gradient!r}"
            )
        self.lazy_gradient = lazy_gradient
        self._calls = 0
        self.seed = int(seed)
        self._vector_names: list[str] = []
        self._batch_var: dict[str, torch.Tensor] = {}
        self._cache: tuple[Any, CertifiedBound] | None = None
        self._structure: tuple[Any, ...] | None = None
        #: (graph, dtype, device, digest) of the last passed trace check: certified() skips
        #: the check for exactly the same graph and tensors (``_trace_check_key``)
        self._trace_checked: tuple[Any, ...] | None = None
        self._operations: tuple[Any, ...] | None = None
        _check_tensors(model, certify=False)
        self._build(*self._trace())
        weakref.finalize(self, _unwatch_dead)
        if _dtype_of(model) in (torch.float32, torch.float64):
            # Defence in depth (docs/SOUNDNESS.md): refuse at once a model whose trace does not
            # compute what it computes; certified() checks again for the model as it is then.
            self._operations = checks.check_trace(
                model,
                self._graph_module,
                self.input_shape,
                dtype=_dtype_of(model),
                device=self._device(),
            )
            self._trace_checked = self._trace_check_key()

    # -- set-up ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            return t.device
        return torch.device("cpu")

    def _trace(self) -> tuple[torch.fx.Graph, tuple[Any, ...]]:
        """A fresh trace of the model in evaluation mode (the function certificates cover) and
        its structural signature: the generated code (Python constants read in ``forward`` are
        literals there), the identity of every submodule, of its hooks and of every tensor the
        graph reads."""
        with checks.eval_mode(self.model):
            try:
                graph = LipmarginTracer().trace(checks.traceable(self.model))
            except Exception as exc:  # torch.fx raises many types
                raise UnsupportedOperationError(_trace_failure(exc)) from exc
        _check_hooks(self.model)
        check_unpatched_functions()
        modules = tuple(
            (name, id(m), type(m), id(vars(m).get("forward")))
            + tuple(map(id, m._forward_hooks.values()))
            + tuple(map(id, m._forward_pre_hooks.values()))
            for name, m in self.model.named_modules()
        )
        modules += (tuple(map(id, _global_hooks())),)
        root = checks.traceable(self.model)
        attrs = tuple(
            id(_getattr_path(root, str(n.target))) for n in graph.nodes if n.op == "get_attr"
        )
        return graph, (graph.python_code("self").src, modules, attrs)

    def _build(self, graph: torch.fx.Graph, structure: tuple[Any, ...]) -> None:
        """(Re)build everything derived from the trace; power-iteration vectors of unchanged
        linear maps are kept."""
        # Not a registered submodule: the model's weights stay out of our state_dict.
        gm = torch.fx.GraphModule(checks.traceable(self.model), graph)
        object.__setattr__(self, "_graph_module", gm)
        self._structure = structure
        self._cache = None
        self._trace_checked = None  # a new graph: checked again before it certifies
        self._operations = None
        self._record_example()
        graph = gm.graph
        self._modules_by_node = {
            n.name: gm.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"
        }
        object.__setattr__(self, "_rules", {})
        self._factor_cache: dict[str, float] = {}
        #: per linear map, the gradient d sigma / dW of the last power-iteration update, held
        #: while ``power_every`` > 1 skips updates (``power.training_estimate``)
        self._held_grads: dict[str, torch.Tensor] = {}
        #: what the last computed training call left for the calls ``bound_every`` > 1 skips,
        #: per ``pairwise`` flag (``_Held``)
        self._held_bounds: dict[bool, _Held] = {}
        self._find_head()
        self._find_fusions()
        self._find_segments()
        _watch(self, {bn.name: self.module_of(bn.name) for bn in self._fused.values()})
        self._walk("init")

    def _sync(self) -> None:
        """Re-trace; rebuild when the model's structure changed since the last trace (a submodule
        replaced, a Python attribute read in ``forward`` changed, ...)."""
        graph, structure = self._trace()
        if structure != self._structure:
            self._build(graph, structure)

    def _ensure_vector(self, key: str, shape: tuple[int, ...]) -> None:
        """The persistent power-iteration vector ``key`` (a buffer, like ``spectral_norm``'s
        ``_u``), created on the model's device; kept when it exists with this shape."""
        old = self._buffers.get(key)
        if old is None or tuple(old.shape) != shape:
            seed = self.seed + len(self._vector_names)
            self.register_buffer(key, power.new_vector(shape, seed, self._device()))
        if key not in self._vector_names:
            self._vector_names.append(key)

    def _check_vectors_device(self) -> None:
        """The power-iteration vectors must live where the model does (they are buffers of this
        module, which is not the model's parent: moving the model does not move them)."""
        device = self._device()
        for key in self._vector_names:
            u = self._buffers.get(key)
            if u is not None and u.device != device:
                raise InputError(
                    f"the bound's power-iteration vectors are on {u.device} but the model is on "
                    f"{device}: call bound.to({str(device)!r}) after moving the model"
                )

    def module_of(self, node_name: str) -> nn.Module:
        node = self._nodes[node_name]
        return self._graph_module.get_submodule(str(node.target))

    def _record_example(self) -> None:
        gm = self._graph_module
        self._nodes = {n.name: n for n in gm.graph.nodes}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOperationError(
                f"the model's forward must take exactly one input, got {len(placeholders)}"
            )
        dtype = _dtype_of(self.model)
        example = torch.zeros((1, *self.input_shape), device=self._device(), dtype=dtype)
        try:
            rec = _Recorder(gm)
            with checks.eval_mode(self.model), torch.no_grad():
                out = rec.run(example)
        except Exception as exc:
            cause = exc
            while not isinstance(cause, LipmarginError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, LipmarginError):  # an observer hook's refusal, ...
                raise cause from None
            raise InputError(
                f"running the model on an input of shape {tuple(example.shape)} failed: {exc}"
            ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError("the model must return one (N, K) tensor of logits")
        self.num_classes = int(out.shape[1])
        self._shapes: dict[str, Any] = {}
        self._constants: dict[str, Any] = {}
        self._depends: dict[str, bool] = {}
        shape_nodes: set[str] = set()
        # Only nodes the logits depend on matter (``v, _ = pool(x)`` leaves a dead node).
        self._live: set[str] = set()
        stack = [n for n in gm.graph.nodes if n.op == "output"]
        while stack:
            n = stack.pop()
            if n.name not in self._live:
                self._live.add(n.name)
                stack.extend(_node_args(n))
        self._float_output: dict[str, bool] = {}
        for n in gm.graph.nodes:
            v = rec.meta.get(n.name)
            self._shapes[n.name] = _shape_of(v)
            self._float_output[n.name] = isinstance(v, torch.Tensor) and v.is_floating_point()
            dep_args = [a for a in _node_args(n) if self._depends[a.name]]
            dep = n.op == "placeholder" or bool(dep_args)
            # Shape metadata (x.size(0), x.shape[1:], arithmetic on them) carries no input
            # values: a constant. Any other value read out of the input (x.item(), x.tolist())
            # stays input-dependent and meets "no rule".
            if dep and n.op != "output" and _shape_of(v) is None:
                if _reads_shape(n) or all(a.name in shape_nodes for a in dep_args):
                    shape_nodes.add(n.name)
                    dep = False
            self._depends[n.name] = dep
            if not dep:
                self._constants[n.name] = v

    def _find_head(self) -> None:
        out = next(n for n in self._graph_module.graph.nodes if n.op == "output")
        arg = out.args[0]
        self._head: torch.fx.Node | None = None
        self._head_weight_nodes: list[torch.fx.Node] = []
        if not isinstance(arg, torch.fx.Node) or len(arg.users) != 1:
            return
        if (
            arg.op == "call_module"
            and type(self._graph_module.get_submodule(str(arg.target))) is nn.Linear
        ):
            self._head = arg
        elif arg.op == "call_function" and arg.target is F.linear:
            # F.linear with a weight that does not depend on the input (e.g. the row-normalised
            # weight of lipmargin.layers.NormalizedLinear): Prop. 2 applies to it too
            weight = _call_arg(arg, 1, "weight")
            inp = _call_arg(arg, 0, "input")
            bias = _call_arg(arg, 2, "bias")
            if (
                isinstance(weight, torch.fx.Node)
                and not self._depends[weight.name]
                and isinstance(inp, torch.fx.Node)
                and self._depends[inp.name]
                and not (isinstance(bias, torch.fx.Node) and self._depends[bias.name])
            ):
                self._head = arg
                # the constant nodes that compute its weight, in graph order (lazy bound)
                ancestors: set[str] = set()
                stack = [weight]
                while stack:
                    n = stack.pop()
                    if n.name not in ancestors:
                        ancestors.add(n.name)
                        stack.extend(_node_args(n))
                self._head_weight_nodes = [
                    n for n in self._graph_module.graph.nodes if n.name in ancestors
                ]

    def _head_parts(self, ctx: WalkContext) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(bound of the head's input, head weight as the mode needs it)."""
        head = self._head
        if head.op == "call_module":
            lin = self._graph_module.get_submodule(str(head.target))
            return ctx.L(head.args[0]), ctx.tensor(lin.weight)
        weight = ctx.value(_call_arg(head, 1, "weight"))
        return ctx.L(_call_arg(head, 0, "input")), ctx.tensor(weight)

    def _find_fusions(self) -> None:
        self._fused: dict[str, torch.fx.Node] = {}
        for n in self._graph_module.graph.nodes:
            if n.op != "call_module":
                continue
            m = self._graph_module.get_submodule(str(n.target))
            if type(m) not in _BN_TYPES:
                continue
            src = n.args[0]
            if (
                isinstance(src, torch.fx.Node)
                and src.op == "call_module"
                and type(self._graph_module.get_submodule(str(src.target))) in _CONV_TYPES
                and len(src.users) == 1
            ):
                self._fused[src.name] = n

    def _find_segments(self) -> None:
        """Residual sums of linear maps of one input, bounded as ONE operator (LiResNet):
        ``x + conv(x)``, ``x + BN(conv(x))``, ``x + W x``, ``conv_a(x) + conv_b(x)``, with
        subtraction and ``alpha``. The summands' own nodes are absorbed (not walked)."""
        self._segments: dict[str, tuple[torch.fx.Node, list[tuple[float, Any]]]] = {}
        self._absorbed: set[str] = set()
        for n in self._graph_module.graph.nodes:
            found = self._segment_of(n)
            if found is not None:
                source, terms = found
                self._segments[n.name] = (source, terms)
                for _, t in terms:
                    self._absorbed.update(x.name for x in t[1:] if x is not None)

    def _segment_of(self, n: torch.fx.Node) -> tuple[torch.fx.Node, list] | None:
        if not _is_add_or_sub(n) or not self._depends.get(n.name, False):
            return None
        a, b = _call_arg(n, 0, "input"), _call_arg(n, 1, "other")
        if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            return None
        alpha = n.kwargs.get("alpha", 1)
        if isinstance(alpha, torch.fx.Node) or not isinstance(alpha, (int, float)):
            return None
        sign = -1.0 if getattr(n.target, "__name__", str(n.target)) in ("sub", "sub_") else 1.0
        shape = self._shapes.get(n.name)
        if shape is None or self._shapes.get(a.name) != shape or self._shapes.get(b.name) != shape:
            return None  # broadcasting: not a plain sum
        for ta in self._linear_terms(a):
            for tb in self._linear_terms(b):
                if ta[0] is tb[0] and not (ta[1] is None and tb[1] is None):
                    source = ta[0]
                    if self._shapes.get(source.name) is None:
                        continue
                    if (ta[1] is None or tb[1] is None) and self._shapes[source.name] != shape:
                        continue  # an identity summand needs output shape == input shape
                    kinds = {self._term_kind(t) for t in (ta, tb) if t[1] is not None}
                    if len(kinds) != 1:
                        continue
                    return source, [(1.0, ta), (sign * float(alpha), tb)]
        return None

    def _term_kind(self, term: tuple) -> str:
        m = self._graph_module.get_submodule(str(term[1].target))
        return "linear" if type(m) is nn.Linear else "conv"

    def _linear_terms(self, node: torch.fx.Node) -> list[tuple]:
        """Ways to read ``node`` as a linear map of another node: (source, map node, BN node)
        for a single-use stride-1 zero-padded convolution (optionally with its folded
        BatchNorm) or dense layer, and (node, None, None) for the identity."""
        terms: list[tuple] = []
        get = self._graph_module.get_submodule
        bn = None
        lin = node
        if node.op == "call_module" and type(get(str(node.target))) in _BN_TYPES:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and self._fused.get(src.name) is node:
                bn, lin = node, src
        if lin.op == "call_module" and len(node.users) == 1 and (bn is None or len(lin.users) == 1):
            m = get(str(lin.target))
            ok_conv = (
                type(m) in _CONV_TYPES
                and getattr(m, "padding_mode", "zeros") == "zeros"
                and all(s == 1 for s in m.stride)
                and (bn is not None or lin.name not in self._fused)
            )
            if (ok_conv or type(m) is nn.Linear and bn is None) and isinstance(
                lin.args[0], torch.fx.Node
            ):
                if lin is not self._head:
                    terms.append((lin.args[0], lin, bn))
        terms.append((node, None, None))
        return terms

    def _segment_bound(self, ctx: WalkContext, node: torch.fx.Node) -> torch.Tensor:
        """``L(source) * ||sum_j coef_j A_j||`` with the fused operator (see ``operators``)."""
        source, raw = self._segments[node.name]
        terms: list[operators.Term] = []
        for coef, (_, lin, bn) in raw:
            if lin is None:
                terms.append(operators.Term("identity", coef))
                continue
            m = self._graph_module.get_submodule(str(lin.target))
            w = ctx.tensor(m.weight)
            if type(m) is nn.Linear:
                terms.append(operators.Term("linear", coef, w))
                continue
            if bn is not None:
                w = w * ctx.bn_scale(bn).reshape(-1, *([1] * (w.dim() - 1)))
            terms.append(operators.Term("conv", coef, w, m.padding, m.dilation, m.groups))
        shape = self._shapes[source.name]
        nsp = len(shape) - 1
        apply = operators.apply_sum(terms, nsp)
        bound = operators.guaranteed_norm(terms, shape)
        op = operators.LinearOperator("residual", shape, apply, bound)
        norm = ctx.linear(node, op)
        return ctx.L(source) * norm

    # -- the walk ----------------------------------------------------------------------
    def _walk(self, mode: str, pairwise: bool = True) -> tuple[WalkContext, Any]:
        ctx = WalkContext(self, mode)
        result: Any = None
        for node in self._graph_module.graph.nodes:
            if node.op == "output":
                result = self._output(ctx, node, pairwise)
                break
            if node.name not in self._live:
                continue
            if not self._depends[node.name]:
                ctx.bounds[node.name] = None
                ctx.consts[node.name] = self._constant_value(ctx, node)
                continue
            if node.op == "placeholder":
                ctx.bounds[node.name] = ctx.const(1.0)
                continue
            if node is self._head and pairwise and mode == "train":
                ctx.bounds[node.name] = None  # handled per class pair at the output
                continue
            if node.name in self._absorbed:
                continue  # a summand of a linear segment, bounded at the sum
            if node.name in self._segments:
                ctx.bounds[node.name] = self._segment_bound(ctx, node)
                continue
            try:
                rule = self._rules.get(node.name)
                if rule is None:
                    rule = self._rules[node.name] = self._rule_for(node)
                ctx.bounds[node.name] = rule(ctx, node)
            except UnsupportedOperationError as exc:
                if getattr(exc, "located", False):
                    raise
                located = UnsupportedOperationError(f"{exc} [{self._where(node)}]")
                located.located = True
                raise located from exc
        return ctx, result

    def _constant_value(self, ctx: WalkContext, node: torch.fx.Node) -> Any:
        """Value of a node that does not depend on the input's values, computed afresh from the
        current weights (never a stale copy); shape-derived values come from the example run."""
        if node.op == "get_attr":
            return _getattr_path(self._graph_module, str(node.target))
        args = _node_args(node)
        if any(self._depends[a.name] for a in args) or node.op == "placeholder":
            return self._constants[node.name]
        a, kw = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: ctx.consts[n.name])
        if node.op == "call_function":
            return node.target(*a, **kw)
        if node.op == "call_method":
            return getattr(a[0], str(node.target))(*a[1:], **kw)
        if node.op == "call_module":
            return self._graph_module.get_submodule(str(node.target))(*a, **kw)
        return self._constants[node.name]

    def _rule_for(self, node: torch.fx.Node) -> Callable[[WalkContext, torch.fx.Node], Any]:
        src = node.args[0] if node.args else None
        if self._writes_in_place(node) and isinstance(src, torch.fx.Node) and len(src.users) > 1:
            raise UnsupportedOperationError(
                f"graph node {node.name!r} modifies {src.name!r} in place, and {src.name!r} is "
                "used again elsewhere: the traced graph would not compute what the model "
                "computes. Use the out-of-place form (inplace=False)."
            )
        rule = None
        what = ""
        if node.op == "call_module":
            m = self._graph_module.get_submodule(str(node.target))
            if "forward" in vars(m):
                raise UnsupportedOperationError(
                    f"graph node {node.name!r}: module {node.target!r} has a forward patched onto "
                    f"the instance; the rule of {type(m).__name__} does not describe it"
                )
            rule = find_module_rule(m)
            what = f"module {type(m).__module__}.{type(m).__qualname__}"
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
            what = f"function {getattr(node.target, '__name__', node.target)}"
        elif node.op == "call_method":
            rule = METHOD_RULES.get(str(node.target))
            what = f"method .{node.target}()"
        if rule is None:
            raise UnsupportedOperationError(
                f"no Lipschitz rule for graph node {node.name!r} ({node.op}: {what}). "
                "lipmargin never assumes an unknown operation is 1-Lipschitz. If the operation "
                "is globally Lipschitz, register a rule with lipmargin.bounds.register_module / "
                "register_function / register_method; see README 'Supported operations'."
            )
        return rule

    def _where(self, node: torch.fx.Node) -> str:
        """Where a node comes from, for refusals: its module path (``layer3.1.conv2``) and the
        line of the user's source that created it (from a second trace that records stack
        traces; tracing does not record them otherwise, to stay cheap)."""
        if node.op == "call_module":
            module = str(node.target)
        else:
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else ""
        parts = [f"in module {module!r}" if module else "in the top-level forward"]
        try:
            tracer = LipmarginTracer()
            tracer.record_stack_traces = True
            with checks.eval_mode(self.model):
                graph = tracer.trace(checks.traceable(self.model))
            traced = next((n for n in graph.nodes if n.name == node.name), None)
            line = _user_frame(traced.stack_trace if traced is not None else None)
        except Exception:  # noqa: BLE001 - a location is a nicety; never mask the refusal
            line = None
        if line:
            parts.append(line)
        return ", ".join(parts)

    def _writes_in_place(self, node: torch.fx.Node) -> bool:
        """True for an operation that overwrites its first argument."""
        if node.op == "call_module":
            return getattr(self._graph_module.get_submodule(str(node.target)), "inplace", False)
        if node.kwargs.get("inplace", False) is True:
            return True
        if node.op == "call_method":
            name = str(node.target)
            return name.endswith("_") and not name.endswith("__")
        return getattr(node.target, "__name__", "") in _INPLACE_OPERATORS

    def _output(self, ctx: WalkContext, node: torch.fx.Node, pairwise: bool) -> Any:
        arg = node.args[0]
        head = self._head
        if pairwise and head is not None and arg is head:
            l_in, w = self._head_parts(ctx)
            if l_in is None:
                raise UnsupportedOperationError("the logits do not depend on the input")
            ctx.head_input = l_in
            if ctx.mode == "certify":
                dist = _safe_norm(w[:, None, :] - w[None, :, :]) * (1.0 + norms.FLOAT64_SLACK)
            else:
                dist = _row_distances(w)
            return l_in * dist, ctx.L(arg)
        return ctx.L(arg), None

    # -- public API --------------------------------------------------------------------
    @property
    def has_pairwise(self) -> bool:
        """True when the network ends with ``nn.Linear`` (paper Prop. 2 applies)."""
        return self._head is not None

    def forward(self, pairwise: bool | None = None) -> torch.Tensor:
        """Differentiable bound ESTIMATE for training (paper Alg. 1).

        Returns K x K ``K[t, i]`` (Prop. 2) when the net ends with ``nn.Linear`` and
        ``pairwise`` is not False, else a scalar bound of the whole logit map (Prop. 1).
        In training mode, first makes one power-iteration step per linear map.
        """
        use_pairwise = self.has_pairwise if pairwise is None else bool(pairwise)
        lazy = self.training and self.bound_every > 1
        if lazy and self._calls % self.bound_every:
            # a call the lazy bound skips: as few operations as possible (issue 16)
            held = self._held_bounds.get(use_pairwise)
            if held is not None and held.holds(self.model):
                self._calls += 1
                self.last_sigmas = held.sigmas
                if self.lazy_gradient == "scaled":
                    return held.value
                first = self._held_call(held, use_pairwise)
                self.last_estimate = first.detach()
                return first
        self._check_vectors_device()
        if use_pairwise and not self.has_pairwise:
            raise InputError("pairwise bounds need a network whose last layer is nn.Linear")
        ctx, (first, _) = self._walk("train", pairwise=use_pairwise)
        if self.training:
            self._calls += 1
        #: the differentiable per-layer power-iteration sigmas of this call (for baselines)
        self.last_sigmas = ctx.sigmas
        #: the estimate this call returned, detached (training logs compare it with the
        #: guaranteed bound to show when power iteration stops tracking the weights)
        self.last_estimate = first.detach()
        if lazy:
            scale = float(self.bound_every)
            factor = ctx.head_input if use_pairwise else first
            held = _Held.at(self.last_estimate, factor, self.model, self.lazy_gradient == "held")
            held.sigmas = {k: v.detach() for k, v in ctx.sigmas.items()}
            self._held_bounds = {use_pairwise: held}
            if self.lazy_gradient == "scaled":
                # value unchanged, gradient x bound_every (lazy regularization)
                first = _ScaleGrad.apply(first, scale)
            elif not ctx.batch_statistics:
                # the factor depends on the parameters only: its first-order model has the same
                # value and gradient here, and the loss's backward skips the walk's graph
                first = self._held_call(self._held_bounds[use_pairwise], use_pairwise)
            # the per-layer sigmas that baselines (SNR) penalise: lazy regularization
            self.last_sigmas = {k: _ScaleGrad.apply(v, scale) for k, v in ctx.sigmas.items()}
        return first

    def _held_call(self, held: _Held, pairwise: bool) -> torch.Tensor:
        """A call ``bound_every`` skips, ``lazy_gradient="held"``: the held first-order model
        of the body's factor, times the pairwise row distances of the head's current weights."""
        factor = _FirstOrder.apply(held, *held.params)
        if not pairwise:
            return factor
        return factor * _row_distances(self._head_weight())

    def _head_weight(self) -> torch.Tensor:
        """The final linear layer's weight as it is now, differentiable."""
        head = self._head
        if head.op == "call_module":
            return self._graph_module.get_submodule(str(head.target)).weight
        ctx = WalkContext(self, "train")
        for node in self._head_weight_nodes:
            ctx.consts[node.name] = self._constant_value(ctx, node)
        return ctx.value(_call_arg(head, 1, "weight"))

    def _digest(self) -> bytes:
        """Content digest of every tensor the model holds (parameters, buffers and plain tensor
        attributes such as the ``weight`` legacy ``weight_norm`` recomputes) and of every simple
        Python attribute of its modules (strides, slopes, eps, ...). A write through ``p.data``
        that keeps the sum, a changed ``eps``: all change the digest."""
        h = hashlib.blake2b(digest_size=20)
        seen: set[int] = set()
        for name, mod in self.model.named_modules():
            h.update(f"<{name}:{type(mod).__qualname__}>".encode())
            tensors = itertools.chain(
                mod._parameters.items(),
                mod._buffers.items(),
                ((k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor)),
            )
            for key, t in tensors:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                t = t.detach()
                h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            simple = sorted(
                (k, repr(v))
                for k, v in vars(mod).items()
                if k != "training" and not k.startswith("_") and _is_simple(v)
            )
            h.update(repr(simple).encode())
        return h.digest()

    def _trace_check_key(self, digest: bytes | None = None) -> tuple[Any, ...]:
        """What a passed trace check covers: this graph object, the model's dtype and device
        and the digest of its tensors and attributes AFTER the check's eager forward (which
        refreshes weights that forward pre-hooks compute)."""
        digest = self._digest() if digest is None else digest
        return (id(self._graph_module), _dtype_of(self.model), self._device(), digest)

    def certified(self) -> CertifiedBound:
        """GUARANTEED upper bounds (float64, no grad, deterministic) for the model AS IT IS NOW.

        Every call re-traces the model (milliseconds) and rebuilds when its structure changed;
        the result is cached under a content digest of all the model's tensors and simple
        attributes, so an unchanged model costs a trace and a hash. When computing, three
        defences run (docs/SOUNDNESS.md): the model's tensors must be finite float32/float64
        values on a real device; the traced graph must compute what the eager model computes
        (``checks.check_trace``); and input-gradient norms at random points must not exceed the
        result (``checks.check_gradients``). Failures raise ``CertificationError``.

        The model is bounded as it computes in evaluation mode (running BatchNorm statistics,
        dropout as identity). Every operator norm is a guaranteed bound inflated by
        ``FLOAT64_SLACK`` for float64 rounding, except with ``conv_method="power"``.
        """
        _check_tensors(self.model, certify=False)
        self._check_vectors_device()
        self._sync()
        digest = self._digest()
        if self._cache is not None and self._cache[0] == (self.conv_method, digest):
            return self._cache[1]  # computed (and checked) for exactly these tensors
        _check_tensors(self.model, certify=True)
        dtype, device = _dtype_of(self.model), self._device()
        if self._trace_checked != self._trace_check_key(digest):
            self._operations = checks.check_trace(
                self.model, self._graph_module, self.input_shape, dtype=dtype, device=device
            )
            # after the eager forward of the check: forward pre-hooks (legacy weight_norm) have
            # refreshed the weights the walk reads
            digest = self._digest()
            self._trace_checked = self._trace_check_key(digest)
        key = (self.conv_method, digest)
        self._factor_cache.clear()  # pooling factors of the attributes as they are
        with torch.no_grad():
            ctx, (pair, value) = self._walk("certify", pairwise=True)
        if self._head is None:
            value, pair = pair, None
        if value is None or not torch.isfinite(value):
            raise UnsupportedOperationError("the bound is not finite")
        if pair is not None:
            pair = pair.detach().to(torch.float64).cpu()
            pair.fill_diagonal_(0.0)
        result = CertifiedBound(
            value=float(value),
            pairwise=pair,
            layers=ctx.rows,
            conv_method=self.conv_method,
            guaranteed=self.conv_method != "power",
            input_shape=self.input_shape,
            operations=self._operations,
        )
        if result.guaranteed:
            g = torch.Generator().manual_seed(self.seed)
            x = torch.randn((4, *self.input_shape), generator=g, dtype=torch.float64)
            checks.check_jacobians(self.model, x.to(device=device, dtype=dtype), result)
        self._cache = (key, result)
        return result

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, linear_maps={len(self._vector_names)}, "
            f"pairwise={self.has_pairwise}, conv_method={self.conv_method!r}"
        )


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward, gradient times ``scale`` in backward (the lazy bound)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@dataclass(eq=False)
class _Held:
    """What a computed training call leaves for the calls ``bound_every`` skips: its bound
    (detached) and, for ``lazy_gradient="held"``, the factor ``L_h`` (the bound of the head's
    input, or of the whole map) with its gradient ``g_p = dL/dp`` for every trainable parameter
    ``p`` it depends on, and ``offset = sum_p <p_h, g_p>`` at the parameters of that call."""

    value: torch.Tensor
    factor: torch.Tensor
    params: tuple[torch.Tensor, ...] = ()
    grads: tuple[torch.Tensor, ...] = ()
    offset: torch.Tensor | float = 0.0
    zero: torch.Tensor | float = 0.0
    #: the computed call's per-layer sigmas, detached (``last_sigmas`` of the skipped calls)
    sigmas: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def at(cls, value: torch.Tensor, factor: torch.Tensor, model: nn.Module, grads: bool) -> _Held:
        params = [p for p in model.parameters() if p.requires_grad]
        if not grads or not factor.requires_grad or not params:
            return cls(value, factor.detach())
        found = torch.autograd.grad(factor, params, retain_graph=True, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, found, strict=True) if g is not None]
        zero = factor.new_zeros(())
        with torch.no_grad():
            offset = sum((_dot(p, g) for p, g in pairs), zero)
        return cls(
            value,
            factor.detach(),
            tuple(p for p, _ in pairs),
            tuple(g for _, g in pairs),
            offset,
            zero,
        )

    def holds(self, model: nn.Module) -> bool:
        """Whether this still fits the model: same device and dtype (not converted since) and
        the same parameter shapes."""
        for p in model.parameters():
            if p.device != self.value.device or p.dtype != self.value.dtype:
                return False
            break
        return all(p.shape == g.shape for p, g in zip(self.params, self.grads, strict=True))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


class _FirstOrder(torch.autograd.Function):
    """The held factor at the current parameters, to first order in log space:
    ``L_h exp((sum_p <p, g_p> - offset) / L_h)``. Its value and gradient equal those of the
    computed factor at the parameters of the computed call; it stays positive (log-linear, as
    the factor is a product of per-layer norms along a chain), and costs one dot product per
    parameter forward and one scaled copy of ``g_p`` backward."""

    @staticmethod
    def forward(ctx: Any, held: _Held, *params: torch.Tensor) -> torch.Tensor:
        scale = held.factor.clamp_min(torch.finfo(held.factor.dtype).tiny)
        # summed in the order ``offset`` was: exactly 0 at the parameters of the computed call
        shift = sum((_dot(p, g) for p, g in zip(params, held.grads, strict=True)), held.zero)
        shift = shift - held.offset
        out = held.factor * torch.exp(shift / scale)
        ctx.held = held
        ctx.save_for_backward(out / scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ratio,) = ctx.saved_tensors
        k = grad * ratio
        return (None, *(k * g for g in ctx.held.grads))


def _safe_norm(diff: torch.Tensor) -> torch.Tensor:
    """Row-pair distances ``||w_t - w_i||`` with a zero (not NaN) gradient where rows coincide;
    scaled by the largest entry so that tiny weights do not underflow to 0 when squared."""
    scale = diff.detach().abs().max().clamp_min(torch.finfo(diff.dtype).tiny)
    diff = diff / scale  # scale is held constant: value and gradient unchanged
    sq = (diff * diff).sum(-1)
    zero = torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device) | (sq <= 0)
    safe = torch.where(zero, torch.ones_like(sq), sq)
    return torch.where(zero, torch.zeros_like(sq), torch.sqrt(safe)) * scale


def _row_distances(w: torch.Tensor) -> torch.Tensor:
    """Training-time ``||w_t - w_i||`` for all row pairs: ``torch.cdist`` (3x faster than
    ``_safe_norm`` with its gradient; 0, not NaN, where rows coincide) on rows scaled by their
    largest entry (held constant) so that tiny weights do not underflow when squared. Other
    dtypes than float32/64 (cdist has no half-precision kernels) use ``_safe_norm``."""
    if w.dtype not in (torch.float32, torch.float64):
        return _safe_norm(w[:, None, :] - w[None, :, :])
    scale = w.detach().abs().max().clamp_min(torch.finfo(w.dtype).tiny)
    rows = w / scale
    return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist") * scale


def _is_simple(v: Any, depth: int = 0) -> bool:
    """Plain data whose ``repr`` shows its value: numbers (numpy scalars too), strings, None,
    and lists / tuples / dicts of them (a pooling size list edited in place changes it)."""
    if isinstance(v, (numbers.Number, str, type(None), torch.dtype)):
        return True
    if depth > 3:
        return False
    if isinstance(v, (tuple, list)):
        return all(_is_simple(a, depth + 1) for a in v)
    if isinstance(v, dict):
        return all(_is_simple(k, depth + 1) and _is_simple(a, depth + 1) for k, a in v.items())
    return False


#: forward pre-hooks that only recompute a weight from parameters before the forward (legacy
#: ``torch.nn.utils.weight_norm`` / ``spectral_norm``); the bound reads the recomputed weight.
#: torch's own classes, not any class of that name (a user's ``SpectralNorm`` hook is refused)
_WEIGHT_HOOKS = tuple(
    cls
    for cls in (
        getattr(importlib.import_module("torch.nn.utils.weight_norm"), "WeightNorm", None),
        getattr(importlib.import_module("torch.nn.utils.spectral_norm"), "SpectralNorm", None),
    )
    if isinstance(cls, type)
)


#: the wrappers ``observer`` made (an attribute could be set on any hook by hand)
_OBSERVERS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def observer(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a forward (pre-)hook that only observes (logs, records activations) so that a model
    carrying it can be certified: the wrapper refuses, at run time, any return value (a value
    would replace the module's input or output), any in-place write to the module's input,
    output, parameters or buffers, and any change of the module's attributes (state its
    forward could read). Hooks that modify tensors or the module are not observers."""

    def wrapped(module: nn.Module, *args: Any) -> None:
        if torch.fx._symbolic_trace.is_fx_tracing():  # a hook on a module fx traces through
            return  # would put the hook's operations into the graph
        tensors = [
            *(t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)),
            *module.parameters(recurse=False),
            *module.buffers(recurse=False),
        ]
        versions = [checks.version_of(t) for t in tensors]
        extra = [owner] if isinstance(owner, nn.Module) and owner is not module else []
        owners = [module, *extra]
        states = [dict(vars(m)) for m in owners]
        if hook(module, *args) is not None:
            raise UnsupportedOperationError(
                "a hook wrapped in lipmargin.bounds.observer returned a value: it changes what "
                "the module computes"
            )
        if any(checks.version_of(t) != v for t, v in zip(tensors, versions, strict=True)):
            raise UnsupportedOperationError(
                "a hook wrapped in lipmargin.bounds.observer modified a module's input, output "
                "or weights in place: it changes what the module computes"
            )
        for m, state in zip(owners, states, strict=True):
            now = vars(m)
            if now.keys() != state.keys() or any(now[k] is not v for k, v in state.items()):
                raise UnsupportedOperationError(
                    "a hook wrapped in lipmargin.bounds.observer changed an attribute of a "
                    "module (state a forward may read): keep what it records outside the model"
                )

    #: a hook that is a method of a module (``self._watch``) may write to that module too
    owner = getattr(hook, "__self__", None)
    _OBSERVERS.add(wrapped)
    return wrapped


def _is_observer(hook: Any) -> bool:
    try:
        return hook in _OBSERVERS
    except TypeError:  # not hashable or not weakly referenceable: not one of ours
        return False


def _global_hooks() -> list[Any]:
    mod = torch.nn.modules.module
    hooks = [*mod._global_forward_hooks.values(), *mod._global_forward_pre_hooks.values()]
    return [h for h in hooks if h is not _batch_variance_hook]


def _check_hooks(model: nn.Module) -> None:
    """Forward hooks change what a module computes in ways no rule sees (a hook may act only
    on some inputs, where no check looks): refused, except the weight-recomputing pre-hooks of
    legacy weight_norm / spectral_norm."""
    if _global_hooks():
        raise UnsupportedOperationError(
            "a global module forward hook is registered (torch.nn.modules.module."
            "register_module_forward_hook): it changes what every module computes; remove it "
            "to certify"
        )
    for name, m in model.named_modules():
        weight_hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, _WEIGHT_HOOKS)]
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        for h in hooks:
            if not any(h is w for w in weight_hooks) and not _is_observer(h):
                raise UnsupportedOperationError(
                    f"module {name or 'model'!r} has a forward hook ({getattr(h, '__name__', h)}): "
                    "hooks change what the module computes and no rule covers them; remove it, "
                    "or wrap a hook that only observes in lipmargin.bounds.observer"
                )


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point tensor (None if it has none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _dtype_of(model: nn.Module) -> torch.dtype:
    return model_dtype(model) or torch.float32


def _check_tensors(model: nn.Module, *, certify: bool) -> None:
    """Clear errors instead of raw ones deep in the walk: meta tensors always; when certifying
    also half precision (the margin slack covers float32/float64 rounding only) and NaN/Inf."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, t in named:
        if is_lazy(t):
            raise InputError(
                f"model tensor {name!r} is not initialised yet (a lazy module such as "
                "nn.LazyLinear): run one forward pass on an input of the bound's shape first"
            )
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise UnsupportedOperationError(
                f"model tensor {name!r} is a {type(t).__name__}, a tensor subclass: its own "
                "operations (__torch_function__ / __torch_dispatch__, e.g. fake quantisation) "
                "are not what the bound covers; certify a model with plain tensors"
            )
        if t.is_meta:
            raise InputError(
                f"model tensor {name!r} is on the meta device (not materialised): load real "
                "weights first (e.g. model.to_empty(device='cpu') then load_state_dict)"
            )
        if not certify or not t.is_floating_point():
            continue
        if t.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"model tensor {name!r} is {t.dtype}: certificates cover float32/float64 "
                "forward passes only (their rounding slack); call model.float() to certify"
            )
        if not bool(torch.isfinite(t.detach()).all()):
            raise InputError(f"model tensor {name!r} contains NaN or infinite values")


# -- training-time BatchNorm batch variance -------------------------------------------------
# Paper §5 / release: while training, a convolution followed by BatchNorm is bounded with the
# batch variance, and gradients flow into it. One process-wide forward hook records it for the
# BatchNorm modules some live bound watches: nothing is attached to the user's modules, so
# ``torch.save(model)`` and ``torch.jit.script(model)`` work and hooks never accumulate.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[Any, str]]] = (
    weakref.WeakKeyDictionary()
)
_HOOK: Any = None


def _watch(bound: LipschitzBound, modules: dict[str, nn.Module]) -> None:
    global _HOOK
    for entries in list(_WATCHED.values()):
        entries.pop(id(bound), None)
    ref = weakref.ref(bound)
    for name, module in modules.items():
        _WATCHED.setdefault(module, {})[id(bound)] = (ref, name)
    _unwatch_dead()
    if _WATCHED and _HOOK is None:
        _HOOK = torch.nn.modules.module.register_module_forward_hook(_batch_variance_hook)


def _unwatch_dead() -> None:
    """Drop entries of bounds that no longer exist; remove the global hook when none is left."""
    global _HOOK
    for module, entries in list(_WATCHED.items()):
        for key, (ref, _) in list(entries.items()):
            if ref() is None:
                del entries[key]
        if not entries:
            del _WATCHED[module]
    if not _WATCHED and _HOOK is not None:
        _HOOK.remove()
        _HOOK = None


def _batch_variance_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    entries = _WATCHED.get(module)
    if not entries or not module.training or not torch.is_grad_enabled():
        return
    x = inputs[0]
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # the bound stays float32 under AMP
    var = x.var(dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
    owners = []
    for ref, name in list(entries.values()):
        bound = ref()
        if bound is not None:
            bound._batch_var[name] = var
            owners.append((weakref.ref(bound), name))
    if isinstance(output, torch.Tensor) and output.requires_grad:
        # Once backward has gone through this forward its graph is freed: forget the variance,
        # so a bound() called before the next model(x) falls back to the running variance
        # instead of failing with "backward through the graph a second time".
        def forget(_grad: torch.Tensor) -> None:
            for r, name in owners:
                b = r()
                if b is not None and b._batch_var.get(name) is var:
                    del b._batch_var[name]

        output.register_hook(forget)


# torch's functions as they are when lipmargin is imported (registry: monkey-patches)
snapshot_namespaces(F, torch, torch.Tensor)
