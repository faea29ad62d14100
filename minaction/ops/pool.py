"""``max_pool2``: max-pool by 2 (``F.max_pool1d(x, 2)`` / ``F.max_pool2d(x, 2)`` exactly), faster
on the CPU.

torch's CPU max-pool on contiguous (NCHW) float tensors keeps int64 indices and zero-fills the
input gradient before scattering into it: in the study's batched cnn it was 22% of an image
step (bench/RESULTS.md). ``minaction::max_pool2`` (C++, ``csrc/energy_cpu.cpp``) keeps one uint8
window position per output and writes each input-gradient element once. It picks the same
element as torch (row-major scan; a later element replaces the max when greater or NaN), so
values and gradients equal ``F.max_pool*d``'s exactly.

Anything else (a non-CPU or non-float tensor, a tensor subclass, autocast, a ``torch.func``
transform, ``torch.export`` / ``torch.compile`` tracing, or the ``cpu`` backend not built)
runs ``F.max_pool1d/2d`` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .energy import (_any_autocast, _exponent, _groups_arg, _is_exporting, _jit_tracing,
                     _route, _transformed, activation_energy, validate_penalty)

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN = (Tensor, torch.nn.Parameter)  # a layer's weights are Parameters; any other subclass takes the two ops
_op = None


def _fused_op():
    """``torch.ops.minaction.max_pool2`` once the cpu backend's library is loaded, else None."""
    global _op
    if _op is None:
        from ..backends import select

        if not select.available("cpu", "cpu")[0]:
            return None
        from ..backends import cpu

        cpu.load()
        _op = torch.ops.minaction.max_pool2.default
    return _op


def max_pool2(x: Tensor, dims: int = 2) -> Tensor:
    """Max-pool the last ``dims`` (1 or 2) dimensions of ``x`` by windows of 2 (stride 2, no
    padding, floor): equal to ``F.max_pool1d(x, 2)`` (dims 1) or ``F.max_pool2d(x, 2)`` (dims 2)."""
    if dims not in (1, 2):
        raise ValueError(f"max_pool2 pools the last 1 or 2 dims, got dims={dims!r}")
    if (type(x) is not Tensor or not x.is_cpu or x.dtype not in _FLOATS or x.dim() < dims + 1
            or min(x.shape[-dims:]) < 2 or torch.compiler.is_compiling() or _is_exporting()
            or _jit_tracing() is not None
            or _transformed() or (_any_autocast is not None and _any_autocast())):
        return _torch_pool2(x, dims)
    op = _fused_op()
    return _torch_pool2(x, dims) if op is None else op(x, dims)


def _torch_pool2(x: Tensor, dims: int) -> Tensor:
    """torch's max-pool by 2 over the last ``dims`` dims of a tensor of any leading shape: torch's own takes
    only ``(N,) C, *spatial`` and no empty batch, and the batched conv blocks pool ``[B*G, 1, C, *spatial]``
    (outside the fused CPU op: on a GPU, traced, compiled or under autocast, they failed)."""
    torch_pool = F.max_pool2d if dims == 2 else F.max_pool1d
    if x.numel() == 0:  # the output's shape, still on the graph
        return x[(...,) + tuple(slice(0, 2 * (s // 2), 2) for s in x.shape[-dims:])]
    if x.dim() <= dims + 2:
        return torch_pool(x, 2)
    lead, sp = x.shape[:-dims], x.shape[-dims:]
    y = torch_pool(x.reshape((-1,) + tuple(sp)), 2)
    return y.reshape(tuple(lead) + tuple(y.shape[-dims:]))


def _fused_cpu_path(t: Tensor, backend) -> bool:
    """Whether a fused C++ op may run for ``t``: not compiling, no autocast, and the ``cpu`` backend
    routed (``_route``: not under a ``torch.func`` transform or an export, not another forced backend)."""
    return (not torch.compiler.is_compiling() and not (_any_autocast is not None and _any_autocast())
            and _route(t, backend) == "cpu")


def activation_energy_max_pool2(z: Tensor, activation: str = "relu", energy="l2", reduction: str = "sum",
                                groups: int = 0, dims: int = 2, backend=None, penalty: float = 0.0):
    """``max_pool2(y, dims)`` and ``E``, where ``y, E = activation_energy(z, activation, energy,
    reduction, groups, backend, penalty)``: the epilogue of a conv block and its max-pool by 2.

    On the ``cpu`` backend, for float32/float64, this is one C++ op per direction
    (``minaction::epilogue_pool2``): neither the full-size activation ``y`` nor the window
    positions are written; the backward finds each window's element again from ``z`` and writes
    the gradient of ``z`` in one pass. Values equal the two-op composition exactly (the same
    element chosen in each window); gradients too for ReLU and the identity (the same per-element
    formula), to rounding for the smooth activations; ``E`` to rounding (another summation
    order). Anything else runs the two ops.
    """
    if dims not in (1, 2):
        raise ValueError(f"max_pool2 pools the last 1 or 2 dims, got dims={dims!r}")
    lead = 2 if groups else 1
    if (type(z) is Tensor and z.dtype in (torch.float32, torch.float64) and z.is_cpu
            and z.dim() >= lead + dims and min(z.shape[-dims:]) >= 2
            and _fused_cpu_path(z, backend)):
        p = _exponent(activation, energy, reduction)
        if penalty:
            penalty = validate_penalty(penalty, p)
        g = groups if type(groups) is int else _groups_arg(groups)
        if not g or z.shape[0] == g:
            from ..backends import cpu

            return cpu.epilogue_pool2(z, activation, p, reduction == "mean", g, dims, penalty)
    y, e = activation_energy(z, activation, energy, reduction, groups=groups, backend=backend, penalty=penalty)
    return max_pool2(y, dims), e


def conv2d_act_energy_max_pool2(x: Tensor, weight: Tensor, bias=None, activation: str = "relu", energy="l2",
                                reduction: str = "sum", backend=None, penalty: float = 0.0):
    """``max_pool2(y, 2)`` and ``E`` of ``y, E = activation_energy(F.conv2d(x, weight, bias,
    padding=k // 2), ...)`` (one model, ``groups`` 0): a CNN's first block on images.

    For one input channel (``x [B, 1, H, W]``, ``H`` and ``W`` even, ``weight [C, 1, k, k]``, ``k``
    1, 3, 5 or 7), float32/float64, on the ``cpu`` backend, with ``x`` not requiring a gradient, this is one
    C++ op per direction (``minaction::conv_pool2``): the conv output is never stored (forward
    and backward compute each 2 x 2 window in registers from the image, the backward accumulates
    the weight and bias gradients directly). The values equal the unfused block to float
    rounding (another summation order than oneDNN's). Anything else runs ``F.conv2d`` then
    :func:`activation_energy_max_pool2`.
    """
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if (type(x) is Tensor and type(weight) in _PLAIN and x.dim() == 4 and x.shape[1] == 1 and weight.dim() == 4
            and weight.shape[1] == 1 and weight.shape[2] == k and k % 2 == 1 and k <= 7
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype))
            and not x.requires_grad and x.is_cpu and weight.is_cpu
            and _fused_cpu_path(x, backend)):
        p = _exponent(activation, energy, reduction)
        if penalty:
            penalty = validate_penalty(penalty, p)
        from ..backends import cpu

        return cpu.conv_pool2(x, weight, bias, activation, p, reduction == "mean", penalty)
    z = F.conv2d(x, weight, bias, padding=k // 2)
    return activation_energy_max_pool2(z, activation, energy, reduction, dims=2, backend=backend, penalty=penalty)
