"""Ordinary PyTorch habits that used to yield false certificates or unclear errors (session 7's
red team). Each false-certificate case is a model whose eager run differs from what the bound
reads only away from the random points the value checks use (an outlier guard that acts above
|x| = 5): before the defences, certify() returned radius 4.45 at x = (4.5, 0, 0, 0) while the
prediction flipped 0.5-1.05 away."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lipmargin import LipschitzBound, certify
from lipmargin.bounds import observer
from lipmargin.bounds.checks import full_precision
from lipmargin.certify import evaluate
from lipmargin.errors import CertificationError, InputError, UnsupportedOperationError

REFUSED = (CertificationError, UnsupportedOperationError, InputError)
X = torch.tensor([[4.5, 0.0, 0.0, 0.0]])
Y = torch.tensor([0])


def head() -> nn.Linear:
    """Logits (x0, -x0 + 0.1): class 0 at X with margin 8.9, K[0, 1] = 2."""
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0], lin.weight[1, 0] = 1.0, -1.0
        lin.bias.copy_(torch.tensor([0.0, 0.1]))
    return lin


def guard(x: torch.Tensor) -> torch.Tensor:
    """An outlier guard: zero inputs beyond 5 (inactive at the random check points)."""
    return x * (x.abs() <= 5)


def assert_refused(model: nn.Module, match: str) -> None:
    with pytest.raises(REFUSED, match=match):
        certify(model, X, Y, LipschitzBound(model, (4,)))


def test_class_level_forward_patch_is_refused() -> None:
    original = nn.Linear.forward

    def patched(self, x):
        return original(self, x) + 10.0 * F.relu(x[:, :1] - 5.0) * torch.tensor([-1.0, 1.0])

    nn.Linear.forward = patched
    try:
        assert_refused(nn.Sequential(head()), "monkey-patch")
    finally:
        nn.Linear.forward = original
    LipschitzBound(nn.Sequential(head()), (4,)).certified()  # undone: certifies again


def test_functional_patch_is_refused() -> None:
    original = F.linear
    F.linear = lambda x, w, b=None: original(guard(x), w, b)
    try:
        assert_refused(nn.Sequential(head()), "monkey-patch")
    finally:
        F.linear = original


class FxTracingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = head()

    def forward(self, x):
        if not torch.fx._symbolic_trace.is_fx_tracing():
            x = guard(x)
        return self.fc(x)


class IsinstanceBranch(FxTracingBranch):
    def forward(self, x):
        if isinstance(x, torch.Tensor):  # a Proxy while tracing
            x = guard(x)
        return self.fc(x)


class SwallowedTraceError(FxTracingBranch):
    def forward(self, x):
        try:
            if bool((x.abs() > 5).any()):
                x = guard(x)
        except Exception:  # fx's TraceError: the trace skips the branch
            pass
        return self.fc(x)


class CallOverride(FxTracingBranch):
    def forward(self, x):
        return self.fc(x)

    def __call__(self, x):
        return super().__call__(guard(x))


@pytest.mark.parametrize(
    "model_cls", [FxTracingBranch, IsinstanceBranch, SwallowedTraceError, CallOverride]
)
def test_eager_only_branches_are_refused(model_cls) -> None:
    model = model_cls()
    with torch.no_grad():  # the false certificate these used to get: the guard flips X
        assert model(X + torch.tensor([[0.6, 0, 0, 0]])).argmax(1).item() == 1
    assert_refused(model, "other operations than its traced graph|overrides __call__")


def test_eager_only_shape_checks_and_constant_slices_are_accepted() -> None:
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = head()
            self.register_buffer("scale", torch.full((1, 8), 0.5))

        def forward(self, x):
            if not torch.fx._symbolic_trace.is_fx_tracing():
                assert x.dim() == 2 and x.shape[1] == 4  # metadata only
            return self.fc(x * self.scale[:, :4])  # a constant slice, computed once by fx

    model = Checked()
    radius = certify(model, X, Y, LipschitzBound(model, (4,)))
    assert float(radius[0]) == pytest.approx(4.4, rel=1e-4)  # margin 2.25 + 2.15, K[0, 1] = 1


def test_tensor_subclass_weight_is_refused() -> None:
    class FakeQuant(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                args = (torch.round(args[0]), *args[1:])
            return super().__torch_function__(func, types, args, kwargs)

    model = nn.Sequential(head())
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(FakeQuant))
    with pytest.raises(UnsupportedOperationError, match="tensor subclass"):
        LipschitzBound(model, (4,))


def test_hook_named_like_torchs_weight_norm_is_refused() -> None:
    class WeightNorm:  # a user's own class, named like torch's legacy hook
        def __call__(self, module, inputs, output):
            return output * 10

    model = nn.Sequential(head())
    model[0].register_forward_hook(WeightNorm())
    with pytest.raises(UnsupportedOperationError, match="forward hook"):
        LipschitzBound(model, (4,))


def test_observer_that_writes_in_place_is_refused() -> None:
    model = nn.Sequential(head())

    def clip(module, inputs, output):
        output.sub_(F.relu(output - 5.0))

    model[0].register_forward_hook(observer(clip))
    with pytest.raises(UnsupportedOperationError, match="in place"):
        LipschitzBound(model, (4,))


def test_observer_that_only_reads_is_accepted() -> None:
    seen = []
    model = nn.Sequential(head())
    model[0].register_forward_hook(observer(lambda m, i, o: seen.append(float(o.abs().sum()))))
    certify(model, X, Y, LipschitzBound(model, (4,)))
    assert seen


@pytest.mark.parametrize("op", ["relu_", "clamp_", "sigmoid_"])
def test_forward_writing_its_input_gets_a_clear_error(op) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = head()

        def forward(self, x):
            return self.fc(getattr(x, op)(*([-1.0] if op == "clamp_" else [])))

    with pytest.raises(CertificationError, match="modifies its input in place"):
        LipschitzBound(InPlace(), (4,))


def test_model_and_input_dtypes_must_match() -> None:
    model = nn.Sequential(head()).double()
    bound = LipschitzBound(model, (4,))
    with pytest.raises(InputError, match="convert them"):
        certify(model, X, Y, bound)  # float32 inputs, float64 model
    assert certify(model, X.double(), Y, bound)[0] > 0


def test_lazy_module_gets_a_clear_error() -> None:
    model = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(InputError, match="not initialised"):
        LipschitzBound(model, (4,))


def test_data_parallel_wrapper_certifies_its_module() -> None:
    inner = nn.Sequential(head())
    wrapped = nn.DataParallel(inner)
    r_inner = certify(inner, X, Y, LipschitzBound(inner, (4,)))
    bound = LipschitzBound(wrapped, (4,))
    assert certify(wrapped, X[:0], Y[:0], bound).numel() == 0  # an empty batch, checked
    r_wrapped = certify(wrapped, X, Y, bound)
    torch.testing.assert_close(r_inner, r_wrapped)


def test_final_softmax_is_refused_with_the_reason() -> None:
    with pytest.raises(UnsupportedOperationError, match="remove the final softmax"):
        LipschitzBound(nn.Sequential(head(), nn.Softmax(dim=1)), (4,))


def test_certify_refuses_inputs_that_are_subclasses_and_function_modes() -> None:
    model = nn.Sequential(head())
    bound = LipschitzBound(model, (4,))

    class Sub(torch.Tensor):  # its own operations
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs)

    with pytest.raises(InputError, match="tensor subclass"):
        certify(model, X.as_subclass(Sub), Y, bound)

    class Rounding(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Rounding(), pytest.raises(InputError, match="function mode"):
        certify(model, X, Y, bound)
    with torch.device("cpu"):  # a device context is a function mode too, and harmless
        assert certify(model, X, Y, bound)[0] > 0


def _precision_flags() -> dict[str, object]:
    b = torch.backends
    flags = {"matmul": torch.get_float32_matmul_precision()}
    for owner in ("cuda", "cudnn", "mkldnn"):
        for part in ("matmul", "conv", "rnn"):
            obj = getattr(getattr(b, owner, None), part, None)
            if hasattr(obj, "fp32_precision"):
                flags[f"{owner}.{part}"] = obj.fp32_precision
    return flags


def test_full_precision_turns_tf32_off_and_restores_the_flags() -> None:
    before = _precision_flags()
    assert before.get("cudnn.conv") in (None, "tf32", "ieee", "none")
    torch.set_float32_matmul_precision("high")
    try:
        changed = _precision_flags()
        with full_precision():
            inside = _precision_flags()
            with full_precision():  # nested: no error, still full precision
                assert _precision_flags() == inside
        assert _precision_flags() == changed
    finally:  # back to this process's settings (setting the precision also sets flags)
        torch.set_float32_matmul_precision(before["matmul"])
        for key, value in before.items():
            if key != "matmul":
                owner, part = key.split(".")
                getattr(getattr(torch.backends, owner), part).fp32_precision = value
    assert inside["matmul"] == "highest"
    # "none" is the default (full precision); cuDNN convolutions default to TF32
    assert all(v in ("ieee", "none") for k, v in inside.items() if k != "matmul")
    assert inside.get("cudnn.conv", "ieee") == "ieee"
    assert _precision_flags() == before
    if "cudnn.conv" in before:
        with full_precision("cpu"):  # CPU forward passes: the oneDNN flags only
            assert _precision_flags()["cudnn.conv"] == before["cudnn.conv"]


class BatchSizeBranch(FxTracingBranch):
    def forward(self, x):
        if not torch.fx._symbolic_trace.is_fx_tracing() and x.shape[0] >= 16:
            x = guard(x)  # only on large batches: not at the trace check's 3 examples
        return self.fc(x)


def test_branch_on_the_batch_size_is_caught_where_it_acts() -> None:
    model = BatchSizeBranch()
    bound = LipschitzBound(model, (4,))  # the trace check's 3 examples do not take the branch
    assert float(certify(model, X, Y, bound)[0]) > 4  # batch of 1: the function the bound covers
    xs, ys = X.repeat(32, 1), Y.repeat(32)
    with pytest.raises(CertificationError, match="other operations than its traced graph"):
        certify(model, xs, ys, bound)
    with pytest.raises(CertificationError, match="other operations than its traced graph"):
        evaluate(model, LipschitzBound(model, (4,)), [(xs, ys)], [1.0])


# -- red-team round 3: ways around the defences above -----------------------------------------
def test_augmented_assignment_in_a_residual_block_is_accepted() -> None:
    class Block(nn.Module):  # torchvision's BasicBlock ends with `out += identity`
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.fc = head()

        def forward(self, x):
            out = self.lin(x)
            out += x
            out *= 0.5
            return self.fc(out)

    model = Block()
    assert float(certify(model, X, Y, LipschitzBound(model, (4,)))[0]) >= 0


@pytest.mark.parametrize("wrap", ["data_parallel", "compile"])
def test_wrapped_batch_size_branch_is_caught(wrap) -> None:
    model = BatchSizeBranch()
    if wrap == "compile":
        model = torch.compile(model, backend="eager")
    else:
        model = nn.DataParallel(model)
    bound = LipschitzBound(model, (4,))
    with pytest.raises(CertificationError, match="other operations than its traced graph"):
        certify(model, X.repeat(32, 1), Y.repeat(32), bound)


def test_lookalike_wrappers_are_traced_as_themselves() -> None:
    class Wrapper(nn.Module):  # stores its model where torch.compile would
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = nn.Sequential(head())

        def forward(self, x):
            return self._orig_mod(guard(x))

    with pytest.raises(REFUSED):
        LipschitzBound(Wrapper(), (4,))


def _refused_while(patch, undo) -> None:
    patch()
    try:
        assert_refused(nn.Sequential(head()), "monkey-patch")
    finally:
        undo()


def test_shadowing_a_tensor_method_is_refused() -> None:
    assert "relu" not in vars(torch.Tensor)
    _refused_while(
        lambda: setattr(torch.Tensor, "relu", lambda self: torch._C.TensorBase.relu(self) * 3),
        lambda: delattr(torch.Tensor, "relu"),
    )


def test_replacing_the_functional_module_a_layer_reads_is_refused() -> None:
    import types

    linear_module = __import__("torch.nn.modules.linear", fromlist=["F"])
    shim = types.SimpleNamespace(linear=lambda x, w, b=None: F.linear(guard(x), w, b))
    _refused_while(
        lambda: setattr(linear_module, "F", shim), lambda: setattr(linear_module, "F", F)
    )


def test_swapping_a_forwards_code_is_refused() -> None:
    code = nn.Linear.forward.__code__

    def evil(self, input):
        return F.linear(input * 2, self.weight, self.bias)

    _refused_while(
        lambda: setattr(nn.Linear.forward, "__code__", evil.__code__),
        lambda: setattr(nn.Linear.forward, "__code__", code),
    )


def test_partial_claiming_to_wrap_the_original_is_refused() -> None:
    import functools

    original = F.linear
    fake = functools.partial(lambda x, w, b=None: original(guard(x), w, b))
    fake.__wrapped__ = original
    _refused_while(lambda: setattr(F, "linear", fake), lambda: setattr(F, "linear", original))


def test_forged_observer_flag_is_refused() -> None:
    def scale(module, inputs, output):
        return output * 10

    scale._lipmargin_observer = True
    model = nn.Sequential(head())
    model[0].register_forward_hook(scale)
    with pytest.raises(UnsupportedOperationError, match="forward hook"):
        LipschitzBound(model, (4,))


def test_observer_that_flips_weights_or_sets_state_is_refused() -> None:
    model = nn.Sequential(head())

    def flip(module, inputs):
        with torch.no_grad():
            module.weight.mul_(-1)
            module.weight.mul_(-1)

    model[0].register_forward_pre_hook(observer(flip))
    with pytest.raises(UnsupportedOperationError, match="in place"):
        LipschitzBound(model, (4,))

    class Net(nn.Module):  # the hook is a method of the model and counts calls on it
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.fc, self.calls = nn.Identity(), head(), 0
            self.inp.register_forward_hook(observer(self._watch))

        def _watch(self, module, inputs, output):
            self.calls += 1

        def forward(self, x):
            x = self.inp(x)
            return self.fc(x * 0.0 if self.calls > 100 else x)

    with pytest.raises(UnsupportedOperationError, match="changed an attribute"):
        LipschitzBound(Net(), (4,))


# -- false refusals the defences above must not make (session 7's third check) ----------------
def test_ordinary_models_and_usages_still_certify() -> None:
    class Typed(nn.Module):  # a __call__ that only passes through (for type hints)
        def __init__(self) -> None:
            super().__init__()
            self.fc = head()

        def forward(self, x):
            return self.fc(x)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return super().__call__(x)

    class Casts(Typed):  # float64 data from numpy, a float32 model that casts it
        def forward(self, x):
            return self.fc(x.float())

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.fc = head()

        def forward(self, x):
            return self.fc(self.inner(x) + x)

    log = []
    observed = Block()
    observed.inner.register_forward_hook(observer(lambda m, i, o: log.append(o.detach().norm())))
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), head()))
    for model, x in [
        (Typed(), X),
        (Casts(), X.double()),
        (observed, X),  # an observer on a module fx traces through
        (traced, X),  # a GraphModule: its class's own __call__
        (nn.Sequential(head()), nn.Parameter(X)),
    ]:
        assert certify(model, x, Y, LipschitzBound(model, (4,)))[0] >= 0
    assert log


def test_patching_torch_load_does_not_block_certificates() -> None:
    import functools

    original = torch.load
    torch.load = functools.partial(original, map_location="cpu")  # a user's wrapper
    try:
        model = nn.Sequential(head())
        assert certify(model, X, Y, LipschitzBound(model, (4,)))[0] > 0
    finally:
        torch.load = original


def test_inference_mode_gets_a_clear_error() -> None:
    model = nn.Sequential(head())
    with torch.inference_mode(), pytest.raises(REFUSED):
        LipschitzBound(model, (4,)).certified()
