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

from .energy import _any_autocast, _interpreter_stack, _is_exporting

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
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
    torch_pool = F.max_pool2d if dims == 2 else F.max_pool1d
    if (type(x) is not Tensor or not x.is_cpu or x.dtype not in _FLOATS or x.dim() < dims + 1
            or min(x.shape[-dims:]) < 2 or torch.compiler.is_compiling() or _is_exporting()
            or _interpreter_stack() is not None or (_any_autocast is not None and _any_autocast())):
        return torch_pool(x, 2)
    op = _fused_op()
    return torch_pool(x, 2) if op is None else op(x, dims)
