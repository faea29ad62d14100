"""The ``triton`` backend: the Triton kernels in ``kernels/`` (package ``minaction.kernels``).

Runs on CUDA tensors (float32, float16, bfloat16; float64 is handed to the plain-PyTorch
specification on a GPU because tensor cores have no float64 ``tl.dot`` path worth
tuning), and on CPU tensors only under ``TRITON_INTERPRET=1`` (the CI mode: float32,
float64 and float16; the interpreter's bfloat16 ``tl.dot`` is broken upstream, so
bfloat16 CPU tensors also go to the specification). See ``minaction.backends`` for the
contract and ``docs/kernels.md`` for the design.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import composite

_DTYPES_GPU = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES_INTERP = (torch.float32, torch.float64, torch.float16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    from minaction.kernels import energy_linear as k

    return k


def available(device: torch.device):
    """(ok, why): CUDA with a working Triton, or CPU under TRITON_INTERPRET=1."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "torch reports no CUDA device"
        if _interpret():
            return False, "TRITON_INTERPRET=1 is set: Triton would interpret instead of compiling for the GPU"
        try:
            _kernels()
        except Exception as exc:
            return False, f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
        return True, f"Triton {triton.__version__} compiles for CUDA"
    if device.type == "cpu":
        if not _interpret():
            return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (the slow test interpreter)"
        try:
            _kernels()
        except Exception as exc:
            return False, f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
        return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, meant for tests"
    return False, f"Triton has no target for device type {device.type!r}"


def _native(t: torch.Tensor) -> bool:
    return t.dtype in (_DTYPES_GPU if t.is_cuda else _DTYPES_INTERP)


def _on(t: torch.Tensor):
    """Launch on ``t``'s GPU. Triton launches on torch's *current* device and its stream, so a
    model on ``cuda:1`` while the current device is 0 ran in GPU 0's context on GPU 1's memory;
    the CUDA backend takes the same guard (``CUDAGuard``)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------- backend primitives
def linear_forward(x, w, b, act, p, scale, keep_z):
    if not _native(x):
        return composite.linear_forward(x, w, b, act, p, scale, keep_z)
    # the matmul kernel reads x and w through their strides: a shared input expanded over the
    # G models (stride 0) or a transposed weight needs no copy
    with _on(x):
        return _kernels().linear_forward(x, w, None if b is None else b.contiguous(), act, p, scale, keep_z)


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    if not _native(y):
        return composite.linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b)
    with _on(y):
        return _kernels().linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b)


def act_forward(z, act, p, scale, keep_z):
    if not _native(z):
        return composite.act_forward(z, act, p, scale, keep_z)
    with _on(z):
        return _kernels().act_forward(z, act, p, scale, keep_z)


def act_backward(gy, ge, y, z, act, p, scale):
    if not _native(y):
        return composite.act_backward(gy, ge, y, z, act, p, scale)
    with _on(y):
        return _kernels().act_backward(gy, ge, y, z, act, p, scale)
