"""The public functions :func:`energy_linear` and :func:`activation_energy`, and the Python
implementations and autograd formulas of the routed ops ``minaction::energy_linear`` and
``minaction::activation_energy`` (schemas and fakes: ``minaction/backends/library.py``).

The path of a call, top-down (docs/kernels.md draws it file by file):

1. :func:`energy_linear` checks the options and tensors, applies autocast, and asks
   ``backends.select`` which backend runs for the input's device;
2. it runs exactly one of three paths:
   ``reference`` -> :func:`_reference_linear` (plain PyTorch autograd);
   ``cpu``       -> ``backends.cpu.layer`` -> the C++ op ``minaction::layer`` (C++ autograd);
   (:func:`activation_energy`: ``backends.cpu.epilogue`` -> ``minaction::epilogue``, likewise)
   any other     -> :func:`_routed_linear` -> the routed op ``minaction::energy_linear``, whose
   implementation calls the backend's primitives (``backends.select.module(name)``).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import ACTIVATIONS, NEEDS_Z, composite, energy_dtype, library, select as _select
from ..backends import cpu as _cpu  # importing builds nothing: the C++ extension is built on first use
from ..errors import InputShapeError, InputTypeError

ENERGIES = {"l2": 2, "l1": 1, None: 0, "none": 0}
REDUCTIONS = ("sum", "mean")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def validate_penalty(penalty, p: int) -> float:
    """``penalty`` as a float: finite, >= 0, and only on a layer that has an energy (``p != 0``)."""
    if isinstance(penalty, Tensor):
        raise TypeError("penalty must be a Python number (it is a constant of the backward kernel), got a tensor; "
                        "for a learned or scheduled coefficient add lam * E to the loss instead")
    if not isinstance(penalty, numbers.Real) or isinstance(penalty, bool):
        raise TypeError(f"penalty must be a number, got {type(penalty).__name__}")
    value = float(penalty)
    if not 0.0 <= value < math.inf:  # also NaN; comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"penalty must be a finite number >= 0 (the energy's coefficient lam), got {penalty!r}")
    if value and not p:
        raise ValueError("penalty needs an energy: this layer was built with energy=None, so it has none to penalise")
    return value


class _Penalty(torch.autograd.Function):
    """``y`` unchanged; its first backward also sends ``penalty`` to ``e``, as ``penalty * e`` in the loss
    would (a later backward through the same node, after ``retain_graph`` or in a double backward's
    second pass, adds nothing: the term is in the objective once)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y, e, penalty):
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, e, penalty = inputs
        ctx.penalty = penalty
        ctx.e_meta = (e.shape, e.dtype, e.device)

    @staticmethod
    def backward(ctx, gy):
        shape, dtype, device = ctx.e_meta
        penalty, ctx.penalty = ctx.penalty, 0.0  # once per forward, as a term of the loss (see the C++ layer)
        if not penalty:
            return gy, None, None
        return gy, torch.full(shape, penalty, dtype=dtype, device=device), None

    @staticmethod
    def jvp(ctx, ty, te, tp):  # forward mode: y passes through (the penalty acts on the backward only)
        return ty.view_as(ty) if ty is not None else None


def with_penalty(y: Tensor, e: Tensor, penalty: float) -> Tensor:
    """``y``, whose backward also gives ``e`` the gradient ``penalty``: the generic form of a
    layer's ``penalty`` (the ``cpu`` backend's ops, ``minaction::layer`` and ``::epilogue``, have
    it inside their C++ backward instead). The result is a view of ``y``; modifying it in place
    is refused by autograd."""
    if not penalty or not e.requires_grad:
        return y
    return _Penalty.apply(y, full_energy(e), penalty)


def full_energy(e: Tensor) -> Tensor:
    """A layer's energy as a plain tensor: a tensor-parallel layer's (DTensor weights sharded by
    ``parallelize_module``) is a DTensor holding each rank's part; its differentiable ``full_tensor()``
    sums them, so a plain loss or penalty mixes no DTensor in."""
    return e.full_tensor() if type(e) is not Tensor and hasattr(e, "full_tensor") else e


def validate_energy(activation: str, energy, reduction: str) -> int:
    """Check the layer options; return the energy exponent p (0 = no energy)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if energy not in ENERGIES:
        raise ValueError(f"energy must be 'l2', 'l1' or None, got {energy!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"energy_reduction must be 'sum' (over units) or 'mean' (over units), got {reduction!r}")
    return ENERGIES[energy]


def _scale(rows: int, cols: int, mean: bool) -> float:
    # E = mean over rows (samples) of sum (or mean) over units of |y|^p. No int(): under torch.export
    # with a dynamic batch the sizes are SymInts, which int() would specialise
    if isinstance(rows, Tensor) or isinstance(cols, Tensor):
        # torch.jit.trace: the sizes are traced 0-dim int64 tensors. max() would freeze the traced batch's
        # choice (an empty batch then divides by 0), and 1.0 / rows would be a float32 reciprocal (3e-8 off in
        # a float64 energy): clamp in the graph, in float64 (a 0-dim factor keeps the energy's dtype)
        def count(n):
            return n.to(torch.float64).clamp(min=1) if isinstance(n, Tensor) else float(max(n, 1))

        return 1.0 / (count(rows) * count(cols) if mean else count(rows))
    return 1.0 / (max(rows, 1) * (max(cols, 1) if mean else 1))  # zero units: no energy to scale (p = 0)


# ----------------------------------------------------------------------------- minaction::energy_linear
def _energy_linear_impl(x, weight, bias, act, p, mean, backend):
    scale = _scale(x.shape[1], weight.shape[1], mean)
    y, z, e = _select.module(backend).linear_forward(x, weight, bias, act, p, scale, act in NEEDS_Z)
    return y, e, z


def _energy_linear_backward_impl(gy, ge, x, weight, y, z, act, p, mean, need_x, need_w, need_b, backend):
    scale = _scale(x.shape[1], weight.shape[1], mean)
    out = _select.module(backend).linear_backward(gy, ge, x, weight, y, z, act, p, scale, need_x, need_w, need_b)
    # an op's outputs may not alias each other or an input: unneeded grads are fresh empties
    return tuple(t if want else gy.new_empty(0) for t, want in zip(out, (need_x, need_w, need_b)))


library.lib.impl("energy_linear", _energy_linear_impl, "CompositeExplicitAutograd")
library.lib.impl("energy_linear_backward", _energy_linear_backward_impl, "CompositeExplicitAutograd")
_energy_linear = torch.ops.minaction.energy_linear.default
_energy_linear_backward = torch.ops.minaction.energy_linear_backward.default


def _el_setup(ctx, inputs, output):
    x, weight, bias, act, p, mean, backend = inputs
    y, _, z = output
    ctx.save_for_backward(x, weight, y, z, bias)  # bias: only read by a create_graph backward
    ctx.set_materialize_grads(False)  # an unused energy output arrives as None, not zeros (0 * inf = NaN)
    ctx.cfg = (act, p, mean, backend, bias is not None)


def _grad_of_recomputed(inputs, needs, forward, gy, ge, p):
    """backward(create_graph=True): recompute with differentiable ops and return autograd.grad of
    ``<y, gy> + <e, ge>``, so the gradients carry a graph (gradient penalties, gradgradcheck)."""
    y, e = forward()
    # gy, ge enter as grad_outputs, not as factors of a scalar: autograd must not differentiate
    # through their own graph (it leads back into this very node)
    outs, seeds = [], []
    if gy is not None and y.requires_grad:
        outs.append(y)
        seeds.append(gy)
    if ge is not None and p and e.requires_grad:
        outs.append(e)
        seeds.append(ge.to(e.dtype))
    want = [t for t, n in zip(inputs, needs) if n]
    got = iter(torch.autograd.grad(outs, want, seeds, create_graph=True, allow_unused=True)
               if want and outs else [None] * len(want))
    out = []
    for t, n in zip(inputs, needs):
        g = next(got) if n else None
        out.append(torch.zeros_like(t) if (n and g is None) else g)
    return out


def _el_backward(ctx, gy, ge, _gz):
    x, weight, y, z, bias = ctx.saved_tensors
    act, p, mean, backend, has_bias = ctx.cfg
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and has_bias
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None, None
    if ge is None:
        p = 0  # the energy did not reach the loss: no 0 * d|y|^p term (NaN at y = inf)
    if torch.is_grad_enabled():
        scale = _scale(x.shape[1], weight.shape[1], mean)

        def forward():  # the executable spec is made of differentiable ops
            yy, _, ee = composite.linear_forward(x, weight, bias, act, p, scale, False)
            return yy, ee

        gx, gw, gb = _grad_of_recomputed((x, weight, bias), (need_x, need_w, need_b), forward, gy, ge, p)
        return gx, gw, gb, None, None, None, None
    if gy is None:
        gy = torch.zeros_like(y)
    if ge is None:
        ge = torch.zeros(y.shape[0], dtype=energy_dtype(y.dtype), device=y.device)
    gx, gw, gb = _energy_linear_backward(gy.contiguous(), ge.contiguous(), x, weight, y, z, act, p, mean,
                                         bool(need_x), bool(need_w), bool(need_b and has_bias), backend)
    return (gx if need_x else None, gw if need_w else None, gb if (need_b and has_bias) else None,
            None, None, None, None)


torch.library.register_autograd("minaction::energy_linear", _el_backward, setup_context=_el_setup, lib=library.lib)


# ----------------------------------------------------------------------------- minaction::activation_energy
def _activation_energy_impl(z, act, p, mean, backend):
    # no copy of z is kept (zs empty): the autograd formula saves the input z itself where the derivative needs it
    scale = _scale(z.shape[1], z.shape[2], mean)
    y, zs, e = _select.module(backend).act_forward(z, act, p, scale, False)
    return y, e, zs


def _activation_energy_backward_impl(gy, ge, y, z, act, p, mean, backend):
    scale = _scale(y.shape[1], y.shape[2], mean)
    return _select.module(backend).act_backward(gy, ge, y, z, act, p, scale)


library.lib.impl("activation_energy", _activation_energy_impl, "CompositeExplicitAutograd")
library.lib.impl("activation_energy_backward", _activation_energy_backward_impl, "CompositeExplicitAutograd")
_activation_energy = torch.ops.minaction.activation_energy.default
_activation_energy_backward = torch.ops.minaction.activation_energy_backward.default


def _ae_setup(ctx, inputs, output):
    z, act, p, mean, backend = inputs
    y, _, zs = output
    # z (the input): read by the gelu/silu derivative and their create_graph backward; relu, tanh, sigmoid and
    # identity take both from y (a create_graph backward through y's own node), so y alone is kept
    ctx.save_for_backward(y, zs, z if act in NEEDS_Z else None)
    ctx.set_materialize_grads(False)  # an unused energy output arrives as None, not zeros (0 * inf = NaN)
    ctx.cfg = (act, p, mean, backend)


def _ae_backward(ctx, gy, ge, _gz):
    y, zs, z = ctx.saved_tensors
    act, p, mean, backend = ctx.cfg
    if ge is None:
        p = 0  # the energy did not reach the loss: no 0 * d|y|^p term (NaN at y = inf)
    if torch.is_grad_enabled() and z is None:  # create_graph: differentiable in gy, ge and y (y's node is this op)
        scale = _scale(y.shape[1], y.shape[2], mean)
        g = gy if gy is not None else torch.zeros_like(y)
        e = ge if ge is not None else torch.zeros(y.shape[0], dtype=energy_dtype(y.dtype), device=y.device)
        return composite.act_backward(g, e, y, y.new_empty(0), act, p, scale), None, None, None, None
    if torch.is_grad_enabled():
        scale = _scale(z.shape[1], z.shape[2], mean)

        def forward():
            yy, _, ee = composite.act_forward(z, act, p, scale, False)
            return yy, ee

        gz, = _grad_of_recomputed((z,), (True,), forward, gy, ge, p)
        return gz, None, None, None, None
    if gy is None:
        gy = torch.zeros_like(y)
    if ge is None:
        ge = torch.zeros(y.shape[0], dtype=energy_dtype(y.dtype), device=y.device)
    return _activation_energy_backward(gy.contiguous(), ge.contiguous(), y, z if z is not None else zs, act, p, mean,
                                       backend), None, None, None, None


torch.library.register_autograd("minaction::activation_energy", _ae_backward, setup_context=_ae_setup,
                                lib=library.lib)


# ----------------------------------------------------------------------------- public functions
def _check_tensor(name, t, like=None):
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(f"{name} has dtype {t.dtype}; minaction supports float32, float64, bfloat16, float16")
    if like is not None:
        if t.dtype != like.dtype:
            raise InputTypeError(f"{name} has dtype {t.dtype} but the input has {like.dtype}; cast one of them")
        if t.device != like.device:
            raise InputShapeError(f"{name} is on {t.device} but the input is on {like.device}")


# every valid combination, filled once: a dict that never changes keeps torch.compile's guard on it
# true (one filled on first use made the second call recompile)
_P_CACHE = {(a, en, r): validate_energy(a, en, r) for a in ACTIVATIONS for en in ENERGIES for r in REDUCTIONS}


def _exponent(activation, energy, reduction) -> int:
    p = _P_CACHE.get((activation, energy, reduction))
    return validate_energy(activation, energy, reduction) if p is None else p  # not in the table: raises


def _unit_scale(weight: Tensor, mean: bool) -> float:
    """``minaction::layer``'s ``unit_scale``: 1, or 1/N for the mean over units (the op divides by the rows)."""
    return 1.0 / max(weight.shape[-2], 1) if mean else 1.0  # no units: no energy to scale (see energy_linear)


def _validate_linear(x, weight, bias):
    _check_tensor("input", x)
    _check_tensor("weight", weight, x)
    if bias is not None:
        _check_tensor("bias", bias, x)
    if weight.dim() not in (2, 3):
        raise InputShapeError(f"weight must be [out, in] or [models, out, in], got shape {tuple(weight.shape)}")
    if torch.jit.is_tracing():  # the sizes are traced tensors: comparing them warns and freezes the traced batch's
        return  # answer into the trace (nn.Linear checks nothing in Python either; the matmul still does)
    K = weight.shape[-1]
    if x.dim() == 0 or x.shape[-1] != K:
        raise InputShapeError(f"input has shape {tuple(x.shape)} but the layer expects {K} input features (last dim)")
    if weight.dim() == 3:
        G, N = weight.shape[0], weight.shape[1]
        if bias is not None and tuple(bias.shape) != (G, N):
            raise InputShapeError(f"bias must have shape {(G, N)} for weight {tuple(weight.shape)}, "
                                  f"got {tuple(bias.shape)}")
        if not (x.dim() == 2 or (x.dim() == 3 and x.shape[0] == G)):
            raise InputShapeError(f"batched layer with {G} models expects input [{G}, M, {K}] or [M, {K}], "
                                  f"got {tuple(x.shape)}")
    elif bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputShapeError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # a cheap first test (private API)


def _autocast_dtype(device_type: str):
    """The autocast dtype if autocast is on for ``device_type``, else None."""
    if _any_autocast is not None and not _any_autocast():
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know
        return None
    return None


def _autocast_cast(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    # autocast's own rule ("eligible" tensors): floating point and not float64 are cast
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _plain_path(backend: Optional[str]) -> bool:
    """Whether to run plain PyTorch ops (the ``reference`` path) instead of a fused op.

    - inside a ``torch.func`` transform (grad, jacrev, jvp, vmap, ...) or a forward-mode AD
      level (``torch.autograd.forward_ad.dual_level``): the fused ops carry no vmap batching
      rule and no forward-mode formula, and their C++ autograd formula cannot run under a
      transform; the reference path is plain PyTorch and composes with every transform;
    - while ``torch.export`` (or ``torch.onnx.export(..., dynamo=True)``) or ``torch.jit.trace``
      traces: the exported graph then holds standard aten ops that any runtime executes (a
      traced module loads and runs without minaction), not minaction's custom ops.

    ``torch.compile`` keeps the fused ops (they have fake kernels).
    """
    if _is_exporting() or _jit_tracing() is not None:
        return True
    if _interpreter_stack() is None and _fwad._current_level < 0:  # no transform: the eager fast exit
        return False
    return not torch.compiler.is_compiling()


_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_fwad = torch.autograd.forward_ad  # its _current_level is >= 0 inside a dual_level (dual tensors exist only there)


def _transformed() -> bool:
    """A ``torch.func`` transform or a forward-mode AD level is active (see :func:`_plain_path`)."""
    return _interpreter_stack() is not None or _fwad._current_level >= 0
_is_exporting = torch.compiler.is_exporting
_jit_tracing = torch._C._get_tracing_state  # None unless torch.jit.trace is recording


def energy_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "relu",
                  energy: Optional[str] = "l2", reduction: str = "sum", backend: Optional[str] = None,
                  penalty: float = 0.0):
    """``y = act(x @ weight.T + bias)`` and its activation energy ``E`` in one fused pass.

    Shapes: ``weight [N, K]`` with ``x [..., K]`` -> ``y [..., N]``, ``E`` 0-dim; or the
    batched form for G independent models, ``weight [G, N, K]``, ``bias [G, N]`` with
    ``x [G, M, K]`` (or a shared ``x [M, K]``) -> ``y [G, M, N]``, ``E [G]``.
    ``E = mean over rows of sum (reduction="sum") or mean ("mean") over units of |y|^p``.

    Under ``torch.autocast`` it follows ``F.linear``'s rule: input, weight and bias are cast
    to the autocast dtype (float64 tensors are left alone, as autocast does), ``y`` comes out
    in that dtype and ``E`` in float32. Inside a ``torch.func`` transform, or while
    ``torch.export`` traces, the ``reference`` path (plain PyTorch ops) runs.

    ``penalty=lam`` (see :func:`validate_penalty`): the backward adds ``lam * dE/d(inputs)``
    itself, as if ``lam * E`` were part of the loss; ``E`` is still returned (and may still be
    added to the loss, which then counts twice). On the ``cpu`` path this costs nothing: the
    energy's gradient is the backward kernel's coefficient.
    """
    p = _exponent(activation, energy, reduction)
    if penalty:
        penalty = validate_penalty(penalty, p)
    if (_any_autocast is None or _any_autocast()) and isinstance(x, Tensor):  # x.device costs ~1 us: only here
        ac = _autocast_dtype(x.device.type)
        if ac is not None:
            x, weight, bias = _autocast_cast(x, ac), _autocast_cast(weight, ac), _autocast_cast(bias, ac)
            with torch.autocast(x.device.type, enabled=False):
                return energy_linear(x, weight, bias, activation, energy, reduction, backend, penalty)
    _validate_linear(x, weight, bias)
    if p and reduction == "mean" and not torch.jit.is_tracing() and weight.shape[-2] == 0:  # (traced sizes warn)
        raise InputShapeError(f"energy_reduction='mean' averages over a layer's output units, and this weight of "
                              f"shape {tuple(weight.shape)} has none: the mean is undefined (use "
                              f"energy_reduction='sum', which is 0 here)")
    name = "reference" if _subclass(x, weight, bias) else _route(x, backend)
    mean = reduction == "mean"
    if name == "cpu":
        return _cpu_linear(x, weight, bias, activation, p, mean, penalty)
    if name == "reference":
        y, e = _reference_linear(x, weight, bias, activation, p, mean)
    else:
        y, e = _routed_linear(x, weight, bias, activation, p, mean, name)
    return (with_penalty(y, e, penalty), e) if penalty else (y, e)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _subclass(*ts) -> bool:
    """Whether a tensor is of a subclass that implements torch's ops but not minaction's (torchao's
    quantized weights, DTensor): such calls run the ``reference`` path, ``F.linear`` and plain ops."""
    return any(t is not None and type(t) not in _PLAIN_TYPES for t in ts)


def _route(t: Tensor, backend: Optional[str]) -> str:
    """The backend that runs for ``t``: ``reference`` under a transform or export, else the
    layer's forced one, else ``backends.select``'s choice for the device."""
    if _plain_path(backend):
        return "reference"
    if backend is None:
        return _select.select(t.device)
    if not torch.compiler.is_compiling():  # (available() may take a lock, which dynamo cannot trace)
        ok, why = _select.available(backend, t.device)  # a layer's own backend= against the device
        if not ok:
            raise RuntimeError(f"this layer's backend={backend!r} cannot run on {t.device.type}: {why} "
                               f"(backend=None lets minaction choose)")
    return backend


def _cpu_linear(x, weight, bias, act, p, mean, penalty=0.0):
    """The ``cpu`` path: one call of the C++ op ``minaction::layer`` per direction (its autograd
    formula is C++ too, and applies ``penalty``); it takes the plain ``[M, K]`` and the grouped
    ``[G, M, K]`` shapes."""
    unit_scale = _unit_scale(weight, mean)
    if weight.dim() == 3:
        if x.dim() == 2:  # a shared input: a stride-0 view, no copy
            x = x.unsqueeze(0).expand(weight.shape[0], -1, -1)
        return _cpu.layer(x, weight, bias, act, p, unit_scale, penalty)
    if x.dim() == 2:
        return _cpu.layer(x, weight, bias, act, p, unit_scale, penalty)
    rows = math.prod(x.shape[:-1])  # x [..., K]: the leading dims are the rows
    y, e = _cpu.layer(x.reshape(rows, x.shape[-1]), weight, bias, act, p, unit_scale, penalty)
    return y.view(x.shape[:-1] + (weight.shape[0],)), e


# ----------------------------------------------------------------------------- the layer's cached fast path
class LinearPlan:
    """What :func:`energy_linear` decided for one layer's call on the ``cpu`` path, reused by
    ``EnergyLinear.forward`` (the fast path, see there) while the facts it rests on still hold.

    The layer drops its plan when an option (``activation``, ``energy``, ``energy_reduction``,
    ``backend``) or a parameter is assigned, and when ``.to()``/``.double()``/... converts it.
    Each call checks the rest in Python (the same weight and bias objects, a plain CPU tensor,
    no autocast, no ``torch.func`` transform, no compile or export tracing, the same backend
    forcing); shape and dtype mismatches make the C++ op raise, and the layer then takes the
    full path, which validates and raises the clear error.
    """

    __slots__ = ("weight", "bias", "G", "units", "code", "p", "inv", "auto", "forced", "env", "op", "penalty")

    def __init__(self, x, weight, bias, act, p, mean, backend, penalty=0.0):
        self.weight, self.bias, self.penalty = weight, bias, float(penalty)
        self.G = weight.shape[0] if weight.dim() == 3 else 0
        self.code, self.p = _cpu.ACT_CODES[act], p
        self.inv = _unit_scale(weight, mean)
        # the unit count 1/N was taken from (-1: no mean, any shape will do). The same weight object can change
        # shape in place (`weight.data = ...`, `set_`, `swap_tensors`: pruning units by slicing): the call then
        # checks N again, or the mean's energy was the old N's (a trial's 8 -> 3 units gave 3/8 of it)
        self.units = weight.shape[-2] if mean else -1
        self.auto = backend is None  # chosen by backends.select: valid while the forcing is unchanged
        self.forced, self.env = _select._forced, _env_backend()
        self.op = _cpu.OPS.layer


_env_backend = _select.env_backend


def make_plan(x, weight, bias, activation, energy, reduction, backend, penalty=0.0) -> Optional[LinearPlan]:
    """A :class:`LinearPlan` when this call (already validated by :func:`energy_linear`) took
    the ``cpu`` path with a plain ``[M, K]`` or grouped ``[G, M, K]`` input, else None."""
    if not (type(x) is Tensor and x.is_cpu and _fast_world()) or _cpu.OPS is None or _subclass(weight, bias):
        return None
    if weight.dim() == 2 and x.dim() != 2 or weight.dim() == 3 and x.dim() != 3:
        return None
    try:
        if _route(x, backend) != "cpu":
            return None
    except RuntimeError:
        return None
    return LinearPlan(x, weight, bias, activation, _exponent(activation, energy, reduction), reduction == "mean",
                      backend, penalty)


def _fast_world() -> bool:
    """No autocast, no torch.func transform, not exporting (the caller, ``EnergyLinear.forward``,
    has checked that it is not being compiled)."""
    return not ((_any_autocast is None or _any_autocast()) or _transformed() or _is_exporting()
                or _jit_tracing() is not None)


def _grouped(x, weight, bias):
    """``x [G,M,K]``, ``w [G,N,K]``, ``b [G,N]`` views of the arguments, and the output shape
    of the plain layer (None for the batched one)."""
    if weight.dim() == 3:
        x3 = x.unsqueeze(0).expand(weight.shape[0], -1, -1) if x.dim() == 2 else x
        return x3, weight, bias, None
    b2 = bias.unsqueeze(0) if bias is not None else None
    return x.reshape(1, -1, weight.shape[1]), weight.unsqueeze(0), b2, x.shape[:-1] + (weight.shape[0],)


def _ungrouped(y, e, out_shape):
    return (y, e) if out_shape is None else (y.reshape(out_shape), e.reshape(()))


def _reference_linear(x, weight, bias, act, p, mean):
    """The ``reference`` path: plain PyTorch ops under PyTorch's own autograd. The plain layer is
    ``F.linear``, as in ``nn.Linear``: graphs traced or exported from it hold ``aten::linear`` (an ONNX
    Gemm; what FLOP counters that read traces, such as fvcore's, count as a linear layer)."""
    if weight.dim() == 2:
        y = composite.apply_act(F.linear(x, weight, bias), act)
        n = weight.shape[0]
        rows = math.prod(y.shape[:-1])  # not -1: an empty batch has no size to infer
        e = composite.energy_of(y.reshape(1, rows, n), p, _scale(rows, n, mean))
        return y, e.reshape(())
    x3, w3, b2, out_shape = _grouped(x, weight, bias)
    z = torch.baddbmm(b2.unsqueeze(1), x3, w3.transpose(1, 2)) if b2 is not None else torch.bmm(
        x3, w3.transpose(1, 2))
    y = composite.apply_act(z, act)
    e = composite.energy_of(y, p, _scale(y.shape[1], y.shape[2], mean))
    return _ungrouped(y, e, out_shape)


def _routed_linear(x, weight, bias, act, p, mean, name):
    """Every other backend: the routed op ``minaction::energy_linear``, which calls backend
    ``name``'s primitives (``backends.select.module(name).linear_forward``)."""
    x3, w3, b2, out_shape = _grouped(x, weight, bias)
    if name != "triton":  # the Triton kernels read x through its strides: no copy of a shared input
        x3 = x3.contiguous()
    y, e, _ = _energy_linear(x3, w3.contiguous(), None if b2 is None else b2.contiguous(), act, p, mean, name)
    return _ungrouped(y, e, out_shape)


def _groups_arg(groups) -> int:
    """``groups`` as a Python int (integer-likes such as numpy ints accepted; bool, float, negative rejected)."""
    try:
        g = None if isinstance(groups, bool) else operator.index(groups)
    except TypeError:
        g = None
    if g is None or g < 0:
        raise ValueError(f"groups must be 0 (one model) or the number of models (a positive int), got {groups!r}")
    return g


def activation_energy(z: Tensor, activation: str = "relu", energy: Optional[str] = "l2", reduction: str = "sum",
                      groups: int = 0, backend: Optional[str] = None, penalty: float = 0.0):
    """``y = act(z)`` and the energy of ``y`` in one pass (the epilogue used after convolutions).

    ``z`` is ``[B, ...]`` (one model: E is 0-dim, a mean over B of the sum/mean over all
    other dims) or, with ``groups=G``, ``[G, B, ...]`` (G models: E is ``[G]``).

    On the ``cpu`` backend this is one call of the C++ op ``minaction::epilogue`` per direction
    (its autograd formula is C++ too; ``backward(create_graph=True)`` recomputes with
    differentiable ops). Inside a ``torch.func`` transform, or while ``torch.export`` traces,
    the ``reference`` path (plain PyTorch ops) runs. ``penalty``: as :func:`energy_linear`'s,
    added to each of the ``G`` energies' gradients (in the C++ backward on the ``cpu`` path).
    """
    p = _exponent(activation, energy, reduction)
    if penalty:
        penalty = validate_penalty(penalty, p)
    if type(z) is not Tensor or z.dtype not in _FLOAT_DTYPES:
        _check_tensor("input", z)
    if type(groups) is not int or groups < 0:
        groups = _groups_arg(groups)
    if z.dim() < (2 if groups else 1):
        raise InputShapeError(f"input of shape {tuple(z.shape)} has no batch dimension")
    # (under torch.jit.trace the sizes are traced tensors: comparing them would warn and freeze the answer)
    if groups and not torch.jit.is_tracing() and z.shape[0] != groups:
        raise InputShapeError(f"expected {groups} models in dim 0, got shape {tuple(z.shape)}")
    if p and reduction == "mean" and not torch.jit.is_tracing() and math.prod(z.shape[(2 if groups else 1):]) == 0:
        raise InputShapeError(f"energy_reduction='mean' averages over a sample's units, and the input of shape "
                              f"{tuple(z.shape)} has none: the mean is undefined (use reduction='sum', which is 0 "
                              f"here)")
    name = _route(z, backend)
    if name == "cpu":
        return _cpu.epilogue(z, activation, p, reduction == "mean", groups, penalty)
    # explicit unit counts, not -1: an empty batch has no size to infer
    z3 = (z.reshape(groups, z.shape[1], math.prod(z.shape[2:])) if groups
          else z.reshape(1, z.shape[0], math.prod(z.shape[1:])))
    if name == "reference":
        y = composite.apply_act(z3, activation)
        e = composite.energy_of(y, p, _scale(y.shape[1], y.shape[2], reduction == "mean"))
    else:
        y, e, _ = _activation_energy(z3.contiguous(), activation, p, reduction == "mean", name)
    y = y.reshape(z.shape)
    if not groups:
        e = e.reshape(())
    return (with_penalty(y, e, penalty) if penalty else y), e
