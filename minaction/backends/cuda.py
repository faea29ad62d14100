"""The ``cuda`` backend: CUDA C++ kernels in ``csrc/energy_cuda.cu`` with torch glue in
``csrc/energy_cuda.cpp``, built on first use with ``torch.utils.cpp_extension.load``.

The matrix products run in cuBLAS (``at::baddbmm`` with the bias folded in, ``at::bmm``);
the activation + energy epilogue (in place over the matmul output unless gelu/silu need
``z``) and the backward elementwise pass with the fused bias column sums are the CUDA
kernels. Energies are reduced in two fixed-order stages (per-block partials, then a sum):
deterministic. Needs a CUDA build of torch and nvcc; ``available`` says which is missing.
``MINACTION_CUDA_ARCH`` overrides ``TORCH_CUDA_ARCH_LIST`` for the build (default: the
visible GPU's).
"""
from __future__ import annotations

import os

import torch

from . import ACT_CODES, composite, source_dir  # noqa: F401  (source_dir is part of this module's API)
from .loader import Once, load_extension

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_once = Once()


def _load():
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support (torch.version.cuda is None)")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc / CUDA_HOME not found: install the CUDA toolkit or set CUDA_HOME")
    home = cpp_extension.CUDA_HOME
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        # torch takes the folder above nvcc's bin/ when CUDA_HOME is unset: a wrapper script such as
        # /usr/local/bin/nvcc makes that /usr/local, and the build then fails on a missing cuda_runtime.h
        raise RuntimeError(f"the CUDA toolkit folder {home!r} has no include/cuda_runtime_api.h (torch takes the folder "
                           "above the nvcc on PATH when CUDA_HOME is unset, and that nvcc may be a wrapper): set "
                           "CUDA_HOME to the toolkit, e.g. /usr/local/cuda")
    src = source_dir()
    sources = [src / "energy_cuda.cpp", src / "energy_cuda.cu"]
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"CUDA source not found: {s}")
    if os.environ.get("MINACTION_CUDA_ARCH"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["MINACTION_CUDA_ARCH"]
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return load_extension("minaction_cuda_ext", sources, extra_include_paths=[str(src)], extra_cflags=["-O3"],
                          extra_cuda_cflags=["-O3", "-lineinfo"])


def load():
    """Build (once per process, cached on disk by torch) and load the extension; return
    ``torch.ops.minaction`` (whose CUDA kernels it holds). A failure is remembered."""
    return _once(_load)


def available(device: torch.device):
    """(ok, why): a CUDA device, a CUDA build of torch, nvcc, and a successful build."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the CUDA backend runs on CUDA tensors only, not {device.type}"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    try:
        load()
    except Exception as exc:
        return False, f"the CUDA extension could not be built or loaded ({type(exc).__name__}: {exc})"
    return True, "CUDA extension built and loaded"


def _native(t):
    return t.is_cuda and t.dtype in _DTYPES


# ----------------------------------------------------------------------------- backend primitives
def linear_forward(x, w, b, act, p, scale, keep_z):
    if not _native(x):
        return composite.linear_forward(x, w, b, act, p, scale, keep_z)
    return load().linear_fwd(x.contiguous(), w.contiguous(), None if b is None else b.contiguous(),
                             ACT_CODES[act], p, scale, keep_z)


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    if not _native(y):
        return composite.linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b)
    return load().linear_bwd(gy, ge, x.contiguous(), w.contiguous(), y, z, ACT_CODES[act], p, scale,
                             need_x, need_w, need_b)


def act_forward(z, act, p, scale, keep_z):
    if not _native(z):
        return composite.act_forward(z, act, p, scale, keep_z)
    return load().act_fwd(z, ACT_CODES[act], p, scale, keep_z)


def act_backward(gy, ge, y, z, act, p, scale):
    if not _native(y):
        return composite.act_backward(gy, ge, y, z, act, p, scale)
    return load().act_bwd(gy, ge, y, z, ACT_CODES[act], p, scale)
