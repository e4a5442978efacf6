"""Defences in depth for certificates: checks that catch what no rule knows about.

The bound is computed on a ``torch.fx`` trace of the model, read functionally (each node's value
is a pure function of its arguments). Three ways a plain PyTorch model can differ from that
reading, and the checks that catch them (docs/SOUNDNESS.md):

* **Trace equivalence** (:func:`check_trace`): the eager model and the traced graph, run node by
  node on private copies of every argument (so an in-place write cannot reach another node)
  and without module hooks, must give the same logits on random inputs of the bound's shape.
  This catches in-place writes through aliases (``out = h; out += x``), Python state baked into
  the trace, hooks that change outputs, and models replaced after tracing. The same run checks
  that the model is deterministic in evaluation mode (``F.dropout`` left active) and that each
  example's output does not depend on the rest of the batch.
* **Operation check** (:func:`check_operations`, inside :func:`check_trace` and, through
  :func:`recorded_forward`, on the batches ``certify`` / ``evaluate`` self-check): the eager
  call and the graph's run must call the same torch operations on tensors that depend on the
  input, in the same order (metadata queries, copies, operations on constants and the
  in-place / out-of-place spelling aside). A value-changing branch that only eager code takes
  (``if not is_fx_tracing()``, ``isinstance(x, Tensor)``, a ``try`` around data-dependent
  control flow, a test of the batch size, an overridden ``__call__``) runs operations the
  trace lacks even where it leaves the values unchanged, i.e. at the random inputs above.
* **Mutation check** (inside :func:`check_trace`): running the graph with ordinary semantics,
  a node's output must not change after it was computed (an in-place operation on a tensor
  that is used again); the error names the node.
* **Gradient self-check**: at random points of the bound's shape, the full Jacobian of the
  logits must respect every constant of the certificate (:func:`check_jacobians`, in
  ``certified()``); at the points being certified, the input-gradient norm of ``F_t - F_i``
  must not exceed ``pairwise[t, i]`` (:func:`check_gradients`, in ``certify``/``evaluate``).
  Any local Jacobian norm is a LOWER bound of the true Lipschitz constant, so a violation
  proves the bound wrong, whatever the cause.

Every forward pass these checks and ``certify`` make runs in full float32 precision
(:func:`full_precision`: no TF32, which cuDNN convolutions use by default on recent GPUs).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..errors import CertificationError

if TYPE_CHECKING:  # pragma: no cover
    from .graph import CertifiedBound

#: Relative tolerance of the gradient self-check: float32 gradients are accurate to about 1e-6
#: relative; a wrong rule is off by far more.
GRADIENT_RTOL = 1e-4


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in evaluation mode for the duration, then each restored as it was."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m in training:  # not m.train(): that would recurse into the children again
            m.training = True


def traceable(model: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile``d model or an ``nn.DataParallel`` /
    ``DistributedDataParallel`` wrapper (they compute the same function, which
    :func:`check_trace` verifies against the wrapper's call); the model itself otherwise."""
    kind = type(model)
    orig = getattr(model, "_orig_mod", None)
    compiled = kind.__name__ == "OptimizedModule" and kind.__module__.startswith("torch._dynamo")
    if compiled and isinstance(orig, nn.Module):
        return orig
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if kind in parallel and isinstance(model.module, nn.Module):  # torch's own classes only
        return model.module  # splits the batch across devices: the same per-example function
    return model


def version_of(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place write); None for inference-mode
    tensors, which have none."""
    return None if t.is_inference() else t._version


def _clone(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


class _FunctionalRun(torch.fx.Interpreter):
    """Runs the graph as the bound reads it: every argument is a private copy (in-place writes
    stay local to their node) and modules run ``forward`` without hooks."""

    def run_node(self, n: torch.fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = tree_map(_clone, (args, kwargs))
            return getattr(self, n.op)(n.target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(str(target))
        # the class's forward: a forward patched onto the instance must show up as a difference
        return type(module).forward(module, *args, **kwargs)


class _MutationRun(torch.fx.Interpreter):
    """Runs the graph with ordinary semantics and keeps a copy of every node's output, to find
    outputs that a later in-place operation changed."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.snapshots: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        # A tensor read by one node only may be overwritten by it (``relu(inplace=True)`` on a
        # fresh tensor): nobody sees the old value. Shared ones must stay as computed.
        if isinstance(out, torch.Tensor) and n.op != "output" and len(n.users) > 1:
            self.snapshots.append((n.name, out, out.clone()))
        return out

    def mutated(self) -> list[str]:
        return [
            name
            for name, ref, copy in self.snapshots
            if ref.shape != copy.shape or not _same(ref, copy, 0.0)
        ]


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Equal (equal infinities and both-NaN included) or within ``tol`` elementwise."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype and a.dtype.is_floating_point and math.isfinite(tol):  # hot path
        return bool(torch.isclose(a, b, rtol=0.0, atol=tol, equal_nan=True).all())
    equal = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities, both NaN
    diff = (a - b).abs().masked_fill(equal, 0.0)
    return bool((diff <= tol).all())


def _tolerance(ref: torch.Tensor, rel: float) -> float:
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return rel * (1.0 + scale)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


#: torch functions that only read metadata (shape, dtype, ...) or copy values (``clone``): the
#: operation check ignores them (shape checks run in eager code only are common and harmless)
_IGNORED_OPS = {
    getattr(torch.Tensor, name)
    for name in (
        "size",
        "dim",
        "numel",
        "stride",
        "is_contiguous",
        "__len__",
        "is_floating_point",
        "is_complex",
        "element_size",
        "clone",
        "nelement",
        "ndimension",
        "data_ptr",
    )
    if hasattr(torch.Tensor, name)
} | {
    getattr(torch.Tensor, name).__get__
    for name in (
        "shape",
        "dtype",
        "device",
        "ndim",
        "requires_grad",
        "is_cuda",
        "layout",
        "grad_fn",
        "is_leaf",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "names",
    )
    if hasattr(torch.Tensor, name) and hasattr(getattr(torch.Tensor, name), "__get__")
}


def _op_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    return f"{owner.__name__}.{name}" if owner is not None and "." not in name else str(name)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (a plain loop: ``tree_flatten`` costs
    more than the operations of a small model)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _OpRecorder(TorchFunctionMode):
    """The torch functions a run calls on tensors that depend on its input, outermost calls
    only (inside ``__torch_function__`` the mode is off), metadata queries and copies aside.
    Operations on constants alone (a buffer sliced in ``forward``, which the trace computes once
    and keeps) do not count."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.ops: list[Any] = []
        self.paused = 0
        # weak references: a large batch's intermediate results are freed as in a plain
        # forward pass (a dead reference never matches a new tensor that reuses its id)
        self._tainted: dict[int, weakref.ref] = {id(x): weakref.ref(x)}

    def _is_tainted(self, v: Any) -> bool:
        ref = self._tainted.get(id(v)) if isinstance(v, torch.Tensor) else None
        return ref is not None and ref() is v

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(self._is_tainted(v) for v in _tensors((args, kwargs))):
            for v in _tensors(out):
                self._tainted[id(v)] = weakref.ref(v)
            if not self.paused and func not in _IGNORED_OPS:
                self.ops.append(func)
        return out


@contextlib.contextmanager
def _hooks_paused(model: nn.Module, recorder: _OpRecorder) -> Iterator[None]:
    """Module hooks (the observers and weight-recomputing pre-hooks the bound allows; others are
    refused before this runs) do not count as operations of the forward: the graph's run calls
    modules without them."""
    saved: list[tuple[dict, Any, Any]] = []

    def paused(hook: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            recorder.paused += 1
            try:
                return hook(*args, **kwargs)
            finally:
                recorder.paused -= 1

        return run

    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                saved.append((hooks, key, hook))
                hooks[key] = paused(hook)
    try:
        yield
    finally:
        for hooks, key, hook in saved:
            hooks[key] = hook


def _first_difference(eager: list[Any], graph: list[Any]) -> str:
    for i, (a, b) in enumerate(zip(eager, graph, strict=False)):
        if _op_key(a) != _op_key(b):
            return f"operation {i + 1}: the model calls {_op_name(a)}, the graph {_op_name(b)}"
    if len(eager) > len(graph):
        return f"after {len(graph)} operations the model goes on with {_op_name(eager[len(graph)])}"
    return f"after {len(eager)} operations the graph goes on with {_op_name(graph[len(eager)])}"


def _precision_flags(owners: tuple[str, ...]) -> list[Any]:
    """The ``fp32_precision`` flag holders of these backends (torch >= 2.9's API), or []."""
    out = []
    for owner in owners:
        base = getattr(torch.backends, owner, None)
        for part in ("matmul", "conv", "rnn"):
            obj = getattr(base, part, None)
            if hasattr(obj, "fp32_precision"):
                out.append(obj)
    return out


_FLAGS: dict[str, list[Any]] = {}


@contextlib.contextmanager
def full_precision(device_type: str | None = None) -> Iterator[None]:
    """float32 matrix products and convolutions in full IEEE precision for the duration: no
    TF32 (cuDNN convolutions default to it on Ampere and later GPUs, ~1e-3 relative error, far
    above the margin slack radii allow for rounding) and no reduced-precision oneDNN paths.
    Restored afterwards. ``device_type="cpu"`` touches the CPU (oneDNN) settings only."""
    key = "cpu" if device_type == "cpu" else "all"
    if key not in _FLAGS:
        _FLAGS[key] = _precision_flags(("mkldnn",) if key == "cpu" else ("cuda", "cudnn", "mkldnn"))
    saved = []
    for obj in _FLAGS[key]:
        old = obj.fp32_precision
        if old not in ("ieee", "none"):  # "none": the default, full precision here
            saved.append((obj, old))
            obj.fp32_precision = "ieee"
    legacy = []
    if key == "all" and not _FLAGS[key]:  # older torch: the legacy flags (never mix the two)
        for obj in (torch.backends.cuda.matmul, torch.backends.cudnn):
            if getattr(obj, "allow_tf32", False):
                legacy.append(obj)
                obj.allow_tf32 = False
    precision = torch.get_float32_matmul_precision()
    try:
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
        yield
    finally:  # the precision first: setting it also sets some flags, which are restored last
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)
        for obj, old in reversed(saved):
            obj.fp32_precision = old
        for obj in legacy:
            obj.allow_tf32 = True


def _op_key(func: Any) -> str:
    """What the operation check compares: the function's name, in-place and out-of-place forms
    alike (fx traces ``out += x`` as ``out + x``; the mutation and value checks cover aliasing)."""
    name = str(getattr(func, "__name__", None) or func)
    if name.startswith("__i") and name.endswith("__") and len(name) > 5:
        return name[3:-2]  # __iadd__ -> add
    if name.startswith("__") and name.endswith("__"):
        return name[2:-2]
    return name[:-1] if name.endswith("_") else name


def check_operations(eager: Sequence[Any], graph: Sequence[Any]) -> None:
    """Raise ``CertificationError`` unless an eager run called the graph's operations."""
    if [_op_key(f) for f in eager] != [_op_key(f) for f in graph]:
        raise CertificationError(
            "the model runs other operations than its traced graph ("
            + _first_difference(list(eager), list(graph))
            + "): a branch taken only outside tracing (torch.fx's is_fx_tracing(), an "
            "isinstance(x, torch.Tensor) test, a try/except around data-dependent control "
            "flow, a test of the batch size, an overridden __call__) computes something the "
            "bound does not see. Write forward so that tracing and running take the same path."
        )


def recorded_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """``model(x)`` and the operations it called on tensors that depend on ``x`` (hooks
    aside), as :func:`check_trace` records them."""
    ops = _OpRecorder(x)
    with _hooks_paused(model, ops), ops:
        out = model(x)
    return out, ops.ops


def check_trace(
    model: nn.Module,
    gm: torch.fx.GraphModule,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    examples: int = 3,
    seed: int = 0,
) -> tuple[Any, ...]:
    """Raise ``CertificationError`` unless the traced graph, read functionally, computes what the
    eager model computes in evaluation mode (see the module docstring). Returns the graph's
    operations (``certify`` compares the eager runs of the batches it checks with them).

    Runs on ``examples`` standard-normal inputs of shape ``input_shape`` (a fixed seed), in
    evaluation mode, without gradients. Tolerances: 1e-5 relative to the logit scale in float32
    (the same kernels run in the same order, so results agree to rounding), 1e-4 for the batch
    independence check (batch-1 kernels may differ), 1e-12 / 1e-10 in float64.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((examples, *input_shape), generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    graph_ops = _OpRecorder(x)
    version = version_of(x)
    inner = traceable(model)
    with eval_mode(model), torch.no_grad(), full_precision(x.device.type):
        first, eager_ops = recorded_forward(model, x)
        if inner is not model:  # torch.compile / DataParallel: the module the trace follows
            _, eager_ops = recorded_forward(inner, x)
        if version_of(x) != version:
            raise CertificationError(
                "the model's forward modifies its input in place (e.g. x.relu_(), x.clamp_(), "
                "x += ... on the input): it would overwrite the data being certified; use the "
                "out-of-place form"
            )
        if not isinstance(first, torch.Tensor) or first.shape[:1] != (examples,):
            raise CertificationError(
                "the model must return one (N, K) tensor of logits for an (N, ...) input"
            )
        second = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(examples)])
        mutation = _MutationRun(gm)
        mutation.run(x)
        with graph_ops:
            functional = _FunctionalRun(gm).run(x)
    tol = _tolerance(first, rel)
    if not _same(first, second, tol):
        raise CertificationError(
            "the model is not deterministic in evaluation mode: two forward passes on the same "
            f"input differ by {_max_diff(first, second):.3g}. Typical causes: F.dropout(x, p) "
            "without training=self.training, random noise in forward. A certificate needs a "
            "deterministic function."
        )
    if not _same(first, singles, _tolerance(first, rel * 10)):
        raise CertificationError(
            "the output for one example depends on the other examples of the batch (max "
            f"difference {_max_diff(first, singles):.3g} between batched and one-by-one "
            "evaluation); per-example certificates need independent examples."
        )
    changed = mutation.mutated()
    if changed:
        raise CertificationError(
            f"graph node {changed[0]!r} is modified in place after it was computed (an in-place "
            "operation such as `+=`, `.add_()` or `inplace=True` on a tensor that is used "
            "again); the bound would describe a different function. Use the out-of-place form."
        )
    check_operations(eager_ops, graph_ops.ops)
    if not isinstance(functional, torch.Tensor) or not _same(first, functional, tol):
        diff = _max_diff(first, functional) if isinstance(functional, torch.Tensor) else math.inf
        raise CertificationError(
            "the traced graph does not compute what the model computes (max logit difference "
            f"{diff:.3g} on random inputs). Typical causes: an in-place operation on a tensor "
            "used again (`out = h; out += x`), a forward hook or a monkey-patched forward, "
            "Python state read in forward. The bound would describe a different function."
        )
    return tuple(graph_ops.ops)


def check_jacobians(
    model: nn.Module, x: torch.Tensor, cert: CertifiedBound, *, rtol: float = GRADIENT_RTOL
) -> None:
    """The strong form of the self-check, run by ``certified()`` at random points: the full
    Jacobian ``J`` (K x D) of the logits at each row of ``x`` (K backward passes), then
    ``||J_t - J_i|| <= pairwise[t, i]`` for EVERY class pair and ``||J||_2 <= value`` (exact
    spectral norm of the K x K Gram matrix, float64). Each is a local Lipschitz constant, a
    lower bound of the true one, so a violation proves the bound wrong."""
    model = traceable(model)
    xs = x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad(), full_precision(xs.device.type):
        z = model(xs)
        if not z.requires_grad:
            raise CertificationError(
                "the model's forward returns logits without gradients (torch.no_grad or "
                "detach inside forward?): the Jacobian self-check cannot run, no certificate"
            )
        n, k = z.shape
        rows = []
        for c in range(k):
            (g,) = torch.autograd.grad(z[:, c].sum(), xs, retain_graph=c < k - 1)
            rows.append(g.detach().flatten(1).to(torch.float64))
    jac = torch.stack(rows, dim=1).cpu()  # (N, K, D)
    gram = jac @ jac.transpose(1, 2)
    spectral = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0.0).sqrt()
    worst = int(spectral.argmax())
    if float(spectral[worst]) > cert.value * (1.0 + rtol):
        raise CertificationError(
            f"self-check failed: at a random point the logits' Jacobian has spectral norm "
            f"{float(spectral[worst]):.6g}, above the certified global bound {cert.value:.6g}. "
            "The bound is wrong for this model (an operation whose rule does not match what it "
            "computes); no certificate is returned."
        )
    if cert.pairwise is None:
        return
    diffs = (jac[:, :, None, :] - jac[:, None, :, :]).norm(dim=-1)  # (N, K, K)
    over = diffs > cert.pairwise[None] * (1.0 + rtol)
    if bool(over.any()):
        r, t, i = (int(v) for v in over.nonzero()[0])
        raise CertificationError(
            f"self-check failed: at a random point the gradient of F_{t} - F_{i} has norm "
            f"{float(diffs[r, t, i]):.6g}, above the certified pairwise bound "
            f"{float(cert.pairwise[t, i]):.6g}. The bound is wrong for this model; no "
            "certificate is returned."
        )


def check_gradients(
    model: nn.Module,
    x: torch.Tensor,
    cert: CertifiedBound,
    *,
    points: int = 4,
    rtol: float = GRADIENT_RTOL,
    seed: int = 0,
    logits: torch.Tensor | None = None,
) -> None:
    """Raise ``CertificationError`` if an input-gradient norm at one of the first ``points``
    rows of ``x`` exceeds the certified constant it must respect.

    With ``logits`` (the model's output on the whole batch ``x``), the first rows recomputed
    alone must equal them: an output that depends on the batch size is refused. A forward that
    disables gradients (``torch.no_grad`` inside) is refused: the check could not run.

    With a pairwise bound (the constants radii use, paper Prop. 2): at each point the gradient
    of ``F_t - F_i`` for the top class ``t`` against the runner-up (even rows) or against the
    class with the smallest ``pairwise[t, i]`` (odd rows: the pair most likely to be violated)
    must not exceed ``pairwise[t, i]``. Without one (Prop. 1): ``||J^T v|| <= value`` for a
    random unit ``v``. Each row's gradient depends on that row only (evaluation mode; batch
    independence is checked with the trace), so one backward pass covers all rows. Norms are
    taken in float64 of the model's own-dtype gradient, with relative tolerance ``rtol``.
    """
    if points <= 0 or x.shape[0] == 0:
        return
    model = traceable(model)
    xs = x[:points].detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad(), full_precision(xs.device.type):
        z = model(xs)
        if logits is not None:
            ref = logits[: xs.shape[0]].detach().to(z.dtype)
            if not _same(z.detach(), ref, _tolerance(ref, 1e-4)):
                raise CertificationError(
                    "the logits of the first examples change with the batch they are computed "
                    f"in (max difference {_max_diff(z.detach(), ref):.3g}): per-example "
                    "certificates need a per-example function"
                )
        if not z.requires_grad:
            raise CertificationError(
                "the model's forward returns logits without gradients (torch.no_grad or "
                "detach inside forward?): the gradient self-check cannot run, no certificate"
            )
        n, k = z.shape
        if cert.pairwise is not None and k >= 2:
            pw = cert.pairwise.to(z.device)
            top2 = z.detach().topk(2, dim=1).indices
            t = top2[:, 0]
            masked = pw[t].masked_fill(torch.nn.functional.one_hot(t, k).bool(), math.inf)
            odd = torch.arange(n, device=z.device) % 2 == 1
            i = torch.where(odd, masked.argmin(dim=1), top2[:, 1])
            s = (z.gather(1, t[:, None]) - z.gather(1, i[:, None])).sum()
            allowed, kind = pw[t, i].to(torch.float64), "F_t - F_i against pairwise[t, i]"
        else:
            g = torch.Generator().manual_seed(seed)
            v = torch.randn((n, k), generator=g, dtype=torch.float64)
            v = (v / v.norm(dim=1, keepdim=True)).to(device=z.device, dtype=z.dtype)
            s = (z * v).sum()
            allowed = torch.full((n,), cert.value, dtype=torch.float64, device=z.device)
            kind = "v^T F for a unit v, against the global bound"
        (grad,) = torch.autograd.grad(s, xs)
    norms = grad.detach().flatten(1).to(torch.float64).norm(dim=1)
    over = norms > allowed * (1.0 + rtol)
    if bool(over.any()):
        r = int(over.nonzero()[0, 0])
        raise CertificationError(
            f"self-check failed: at example {r} the input-gradient norm of {kind} is "
            f"{float(norms[r]):.6g}, above the certified bound {float(allowed[r]):.6g}. The bound "
            "is wrong for this model (an operation whose rule does not match what it computes); "
            "no radii are returned."
        )
