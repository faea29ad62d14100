"""The ``cpu`` backend: C++ kernels in ``csrc/energy_cpu.cpp``, JIT-built on first use.

Built with ``torch.utils.cpp_extension.load`` (ninja) into ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``); a rebuild happens only when the source or the
flags change. ``MINACTION_CPU_CFLAGS`` replaces the default optimisation flags
(``-O3 -march=native``: the build is for this machine only, and the extension name
carries a fingerprint of the CPU so a shared cache never serves another CPU's binary).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch


from . import ACT_CODES, source_dir  # noqa: F401  (source_dir is part of this module's API)

_lock = threading.Lock()
_state: dict = {}
OPS = None  # torch.ops.minaction_cpu once loaded (read without the lock, so torch.compile can trace it)


def _cpu_fingerprint() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                model += line
    except OSError:
        pass
    return hashlib.sha1(model.encode()).hexdigest()[:8]


def _flags():
    env = os.environ.get("MINACTION_CPU_CFLAGS")
    opt = env.split() if env else ["-O3", "-march=native"]
    return opt + ["-fopenmp"]


def load():
    """Build (once) and load the C++ extension; return ``torch.ops.minaction_cpu``."""
    global OPS
    if OPS is not None:
        return OPS
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if "error" in _state:
            raise _state["error"]
        try:
            from torch.utils import cpp_extension

            src = source_dir() / "energy_cpu.cpp"
            if not src.exists():
                raise FileNotFoundError(f"C++ source not found: {src}")
            verbose = os.environ.get("MINACTION_VERBOSE_BUILD", "") not in ("", "0")
            cpp_extension.load(name=f"minaction_cpu_{_cpu_fingerprint()}", sources=[str(src)],
                               extra_cflags=_flags(), is_python_module=False, verbose=verbose)
            _register_fakes()
            _state["ops"] = OPS = torch.ops.minaction_cpu
        except Exception as exc:  # remembered: one failed build is not retried in this process
            _state["error"] = exc
            raise
        return _state["ops"]


def _register_fakes():
    from . import register_primitive_fakes

    register_primitive_fakes("minaction_cpu")


def available(device: torch.device):
    if device.type != "cpu":
        return False, f"the C++ backend runs on CPU tensors only, not {device.type}"
    try:
        load()
    except Exception as exc:
        return False, f"the C++ extension could not be built or loaded ({type(exc).__name__}: {exc})"
    return True, "C++ extension built and loaded"


# ----------------------------------------------------------------------------- backend primitives
def linear_forward(x, w, b, act, p, scale, keep_z):
    y, z, e = load().linear_fwd(x, w, b, ACT_CODES[act], p, scale, keep_z)
    return y, z, e


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    return load().linear_bwd(gy, ge, x, w, y, z, ACT_CODES[act], p, scale, need_x, need_w, need_b)


def act_forward(z, act, p, scale, keep_z):
    return load().act_fwd(z, ACT_CODES[act], p, scale, keep_z)


def act_backward(gy, ge, y, z, act, p, scale):
    return load().act_bwd(gy, ge, y, z, ACT_CODES[act], p, scale)


def energy_linear(x, w, b, act, p, scale):
    """The whole layer with its C++ autograd formula (the eager fast path)."""
    return (OPS if OPS is not None else load()).energy_linear(x, w, b, ACT_CODES[act], p, scale)
