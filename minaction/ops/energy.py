"""The fused operators ``minaction::energy_linear`` and ``minaction::activation_energy``.

Each is a ``torch.library`` custom op with a fake (meta) kernel and a registered
autograd formula, so ``torch.library.opcheck`` and ``torch.compile`` understand it.
The op receives the backend name as an argument and hands the work to that
backend's primitives (``minaction.backends``); the ``reference`` backend never
reaches these ops: it is plain PyTorch autograd, see :func:`energy_linear`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..backends import ACTIVATIONS, NEEDS_Z, composite, energy_dtype
from ..backends import cpu as _cpu  # importing builds nothing: the C++ extension is built on first use

ENERGIES = {"l2": 2, "l1": 1, None: 0, "none": 0}
REDUCTIONS = ("sum", "mean")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
    # E = mean over rows (samples) of sum (or mean) over units of |y|^p
    return 1.0 / (max(rows, 1) * (cols if mean else 1))


# ----------------------------------------------------------------------------- energy_linear
@torch.library.custom_op("minaction::energy_linear", mutates_args=())
def _energy_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, p: int, mean: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    scale = _scale(x.shape[1], weight.shape[1], mean)
    y, z, e = _backend.module(backend).linear_forward(x, weight, bias, act, p, scale, act in NEEDS_Z)
    return y, e, z


@_energy_linear.register_fake
def _(x, weight, bias, act, p, mean, backend):
    G, M, _ = x.shape
    N = weight.shape[1]
    y = x.new_empty((G, M, N))
    z = x.new_empty((G, M, N)) if act in NEEDS_Z else x.new_empty(0)
    return y, x.new_empty((G,), dtype=energy_dtype(x.dtype)), z


@torch.library.custom_op("minaction::energy_linear_backward", mutates_args=())
def _energy_linear_backward(gy: Tensor, ge: Tensor, x: Tensor, weight: Tensor, y: Tensor, z: Tensor, act: str,
                            p: int, mean: bool, need_x: bool, need_w: bool, need_b: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    scale = _scale(x.shape[1], weight.shape[1], mean)
    out = _backend.module(backend).linear_backward(gy, ge, x, weight, y, z, act, p, scale, need_x, need_w, need_b)
    # a custom op's outputs may not alias each other or an input: unneeded grads are fresh empties
    return tuple(t if (want and t.numel()) else gy.new_empty(0) for t, want in zip(out, (need_x, need_w, need_b)))


@_energy_linear_backward.register_fake
def _(gy, ge, x, weight, y, z, act, p, mean, need_x, need_w, need_b, backend):
    G, N = weight.shape[0], weight.shape[1]
    e = gy.new_empty(0)
    return (x.new_empty(x.shape) if need_x else e, weight.new_empty(weight.shape) if need_w else e,
            gy.new_empty((G, N)) if need_b else e)


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


_energy_linear.register_autograd(_el_backward, setup_context=_el_setup)


# ----------------------------------------------------------------------------- activation_energy
@torch.library.custom_op("minaction::activation_energy", mutates_args=())
def _activation_energy(z: Tensor, act: str, p: int, mean: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    scale = _scale(z.shape[1], z.shape[2], mean)
    y, zs, e = _backend.module(backend).act_forward(z, act, p, scale, act in NEEDS_Z)
    if zs.numel() and zs.data_ptr() == z.data_ptr():
        zs = zs.clone()  # a custom op may not return an alias of its input
    return y, e, zs


@_activation_energy.register_fake
def _(z, act, p, mean, backend):
    G = z.shape[0]
    zs = z.new_empty(z.shape) if act in NEEDS_Z else z.new_empty(0)
    return z.new_empty(z.shape), z.new_empty((G,), dtype=energy_dtype(z.dtype)), zs


@torch.library.custom_op("minaction::activation_energy_backward", mutates_args=())
def _activation_energy_backward(gy: Tensor, ge: Tensor, y: Tensor, z: Tensor, act: str, p: int, mean: bool,
                                backend: str) -> Tensor:
    scale = _scale(y.shape[1], y.shape[2], mean)
    return _backend.module(backend).act_backward(gy, ge, y, z, act, p, scale)


@_activation_energy_backward.register_fake
def _(gy, ge, y, z, act, p, mean, backend):
    return gy.new_empty(gy.shape)


def _ae_setup(ctx, inputs, output):
    z, act, p, mean, backend = inputs
    y, _, zs = output
    ctx.save_for_backward(y, zs, z)  # z: only read by a create_graph backward
    ctx.set_materialize_grads(False)  # an unused energy output arrives as None, not zeros (0 * inf = NaN)
    ctx.cfg = (act, p, mean, backend)


def _ae_backward(ctx, gy, ge, _gz):
    y, zs, z = ctx.saved_tensors
    act, p, mean, backend = ctx.cfg
    if ge is None:
        p = 0  # the energy did not reach the loss: no 0 * d|y|^p term (NaN at y = inf)
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
    return _activation_energy_backward(gy.contiguous(), ge.contiguous(), y, zs, act, p, mean, backend), \
        None, None, None, None


_activation_energy.register_autograd(_ae_backward, setup_context=_ae_setup)


# ----------------------------------------------------------------------------- public functions
def _check_tensor(name, t, like=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; minaction supports float32, float64, bfloat16, float16")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input has {like.dtype}; cast one of them")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


_P_CACHE: dict = {}


def _exponent(activation, energy, reduction) -> int:
    key = (activation, energy, reduction)
    p = _P_CACHE.get(key)
    if p is None:
        p = _P_CACHE[key] = validate_energy(activation, energy, reduction)
    return p


def _validate_linear(x, weight, bias):
    _check_tensor("input", x)
    _check_tensor("weight", weight, x)
    if bias is not None:
        _check_tensor("bias", bias, x)
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be [out, in] or [models, out, in], got shape {tuple(weight.shape)}")
    K = weight.shape[-1]
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"input has shape {tuple(x.shape)} but the layer expects {K} input features (last dim)")
    if weight.dim() == 3:
        G, N = weight.shape[0], weight.shape[1]
        if bias is not None and tuple(bias.shape) != (G, N):
            raise ValueError(f"bias must have shape {(G, N)} for weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
        if not (x.dim() == 2 or (x.dim() == 3 and x.shape[0] == G)):
            raise ValueError(f"batched layer with {G} models expects input [{G}, M, {K}] or [M, {K}], "
                             f"got {tuple(x.shape)}")
    elif bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


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

    - inside a ``torch.func`` transform (grad, jacrev, jvp, vmap, ...): the fused ops carry
      no vmap batching rule and no forward-mode formula, and their C++ autograd formula
      cannot run under a transform; the reference path is plain PyTorch and composes with
      every transform;
    - while ``torch.export`` (or ``torch.onnx.export(..., dynamo=True)``) traces: the exported
      graph then holds standard aten ops that any runtime executes, not minaction's custom ops.

    ``torch.compile`` keeps the fused ops (they have fake kernels).
    """
    if _is_exporting():
        return True
    if _interpreter_stack() is None:  # no torch.func transform: the eager fast exit
        return False
    return not torch.compiler.is_compiling()


_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_is_exporting = torch.compiler.is_exporting


def energy_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "relu",
                  energy: Optional[str] = "l2", reduction: str = "sum", backend: Optional[str] = None):
    """``y = act(x @ weight.T + bias)`` and its activation energy ``E`` in one fused pass.

    Shapes: ``weight [N, K]`` with ``x [..., K]`` -> ``y [..., N]``, ``E`` 0-dim; or the
    batched form for G independent models, ``weight [G, N, K]``, ``bias [G, N]`` with
    ``x [G, M, K]`` (or a shared ``x [M, K]``) -> ``y [G, M, N]``, ``E [G]``.
    ``E = mean over rows of sum (reduction="sum") or mean ("mean") over units of |y|^p``.

    Under ``torch.autocast`` it follows ``F.linear``'s rule: input, weight and bias are cast
    to the autocast dtype (float64 tensors are left alone, as autocast does), ``y`` comes out
    in that dtype and ``E`` in float32. Inside a ``torch.func`` transform, or while
    ``torch.export`` traces, the ``reference`` path (plain PyTorch ops) runs.
    """
    p = _exponent(activation, energy, reduction)
    if (_any_autocast is None or _any_autocast()) and isinstance(x, Tensor):  # x.device costs ~1 us: only here
        ac = _autocast_dtype(x.device.type)
        if ac is not None:
            x, weight, bias = _autocast_cast(x, ac), _autocast_cast(weight, ac), _autocast_cast(bias, ac)
            with torch.autocast(x.device.type, enabled=False):
                return energy_linear(x, weight, bias, activation, energy, reduction, backend)
    _validate_linear(x, weight, bias)
    batched = weight.dim() == 3
    name = "reference" if _plain_path(backend) else (backend if backend is not None else _backend.select(x.device))
    mean = reduction == "mean"
    if name == "cpu" and (x.dim() == 2 or batched):
        # eager hot path: one C++ op with its own autograd formula (a few us per call instead
        # of the ~50 us of a Python custom op); it takes the 2-D and the grouped shapes as is
        if batched and x.dim() == 2:
            x = x.unsqueeze(0).expand(weight.shape[0], -1, -1)
        return _cpu.energy_linear(x, weight, bias, activation, p, _scale(x.shape[-2], weight.shape[-2], mean))
    if batched:
        G = weight.shape[0]
        x3 = x.unsqueeze(0).expand(G, -1, -1) if x.dim() == 2 else x
        w3, b2, out_shape = weight, bias, None
    else:
        x3 = x.reshape(1, -1, weight.shape[1])
        w3 = weight.unsqueeze(0)
        b2 = bias.unsqueeze(0) if bias is not None else None
        out_shape = x.shape[:-1] + (weight.shape[0],)
    if name == "reference":
        z = torch.baddbmm(b2.unsqueeze(1), x3, w3.transpose(1, 2)) if b2 is not None else torch.bmm(
            x3, w3.transpose(1, 2))
        y = composite.apply_act(z, activation)
        e = composite.energy_of(y, p, _scale(y.shape[1], y.shape[2], mean))
    else:
        if name != "triton":  # the Triton kernels read x through its strides: no copy of a shared input
            x3 = x3.contiguous()
        y, e, _ = _energy_linear(x3, w3.contiguous(), None if b2 is None else b2.contiguous(),
                                 activation, p, mean, name)
    if out_shape is not None:
        return y.reshape(out_shape), e.reshape(())
    return y, e


def activation_energy(z: Tensor, activation: str = "relu", energy: Optional[str] = "l2", reduction: str = "sum",
                      groups: int = 0, backend: Optional[str] = None):
    """``y = act(z)`` and the energy of ``y`` in one pass (the epilogue used after convolutions).

    ``z`` is ``[B, ...]`` (one model: E is 0-dim, a mean over B of the sum/mean over all
    other dims) or, with ``groups=G``, ``[G, B, ...]`` (G models: E is ``[G]``).
    """
    p = validate_energy(activation, energy, reduction)
    _check_tensor("input", z)
    if z.dim() < 1 + bool(groups):
        raise ValueError(f"input of shape {tuple(z.shape)} has no batch dimension")
    if groups:
        if z.shape[0] != groups:
            raise ValueError(f"expected {groups} models in dim 0, got shape {tuple(z.shape)}")
        z3 = z.reshape(groups, z.shape[1], -1)
    else:
        z3 = z.reshape(1, z.shape[0], -1)
    name = "reference" if _plain_path(backend) else (backend if backend is not None else _backend.select(z.device))
    if name == "reference":
        y = composite.apply_act(z3, activation)
        e = composite.energy_of(y, p, _scale(y.shape[1], y.shape[2], reduction == "mean"))
    else:
        y, e, _ = _activation_energy(z3.contiguous(), activation, p, reduction == "mean", name)
    y = y.reshape(z.shape)
    return (y, e) if groups else (y, e.reshape(()))
