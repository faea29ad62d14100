"""Which kernel backend runs, and why: the one place that selects and loads a backend.

Backends (``BACKENDS``):

``reference``  plain PyTorch autograd, no custom op (the oracle; always available; what
               ``torch.func`` transforms and ``torch.export`` run)
``composite``  the executable specification (``backends/composite.py``, plain PyTorch ops)
               run *through* the fused ``minaction::`` ops: every device, slow; a test oracle
               of the op plumbing, never chosen automatically
``cpu``        C++ in ``csrc/energy_cpu.cpp``, JIT-built with ninja on first use and cached
``triton``     ``kernels/``; CUDA GPUs, or CPU tensors under ``TRITON_INTERPRET=1``
``cuda``       CUDA C++ in ``csrc/energy_cuda.{cpp,cu}``, built on first use when torch has CUDA

Selection: ``MINACTION_BACKEND`` (or :func:`set_backend` / :func:`use_backend`) forces
one; a forced backend that cannot run on the tensor's device raises. Otherwise the
best available backend for the device is chosen (CPU: ``cpu``; CUDA: ``triton`` then
``cuda``), falling back to ``reference`` with a single warning that says why.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

import torch

BACKENDS = ("reference", "composite", "cpu", "triton", "cuda")
# the module implementing each backend's primitives (``reference`` has none: it is plain autograd)
_MODULES = {name: f"minaction.backends.{name}" for name in BACKENDS if name != "reference"}
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}

_ENV = "MINACTION_BACKEND"
# os.environ.get costs ~0.5 us (it encodes the key each time); its backing dict with the key
# encoded once is read on every call of the hot path instead (falls back where it is absent)
_env_data = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(_ENV) if _env_data is not None and hasattr(os.environ, "encodekey") else None


def env_backend():
    """The raw ``MINACTION_BACKEND`` value (None when unset), read cheaply."""
    if _env_key is None:
        return os.environ.get(_ENV)
    v = _env_data.get(_env_key)
    return None if v is None else os.environ.decodevalue(v)


_lock = threading.Lock()
_avail_cache: dict = {}
_forced: str | None = None
_warned: set = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown minaction backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_loaded: dict = {}


def module(name: str):
    """The Python module implementing backend ``name``'s primitives (see ``minaction.backends``).

    This is the one function that loads a backend by name; it imports the module only (a
    compiled backend builds its extension on first use of a primitive or of ``available``)."""
    mod = _loaded.get(name)
    if mod is None:
        if name not in _MODULES:
            _check_name(name)
            raise ValueError(f"backend {name!r} has no primitives: it is plain PyTorch autograd")
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod


def available(name: str, device="cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and a sentence saying why (not)."""
    _check_name(name)
    dev = torch.device(device)
    if name == "reference":
        return True, "plain PyTorch autograd runs everywhere"
    if name == "composite":
        return True, "the plain-op specification runs on every device (slow: a test oracle of the fused ops)"
    key = (name, dev.type)
    hit = _avail_cache.get(key)  # answered before: no lock (a layer's own backend= asks on every call)
    if hit is not None:
        return hit
    with _lock:
        if key not in _avail_cache:
            try:
                ok, why = module(name).available(dev)
            except Exception as exc:  # an import or build failure is a reason, not a crash
                ok, why = False, f"{type(exc).__name__}: {exc}"
            _avail_cache[key] = (bool(ok), str(why))
        return _avail_cache[key]


def forced() -> str | None:
    if _forced is not None:
        return _forced
    env = (env_backend() or "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env)


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` or ``"auto"`` restores automatic choice)."""
    global _forced
    _forced = None if name in (None, "auto") else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of :func:`set_backend`."""
    global _forced
    old = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = old


_select_cache: dict = {}


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``.

    The decorator only marks the function (``fn._dynamo_marked_constant = True``, the way
    torch marks its own ``justknobs_check``), but importing it loads ``torch._dynamo``:
    a second of every ``import minaction`` and of every study worker's start. Where dynamo
    is loaded already the official decorator runs; ``tests/test_import.py`` checks that it
    sets exactly this mark.
    """
    import sys

    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def select(device) -> str:
    """The backend that will run for tensors on ``device`` (cached until the forcing changes)."""
    key = (device.type if isinstance(device, torch.device) else str(device), _forced, env_backend())
    hit = _select_cache.get(key)
    if hit is None:
        hit = _select_cache[key] = _select(torch.device(key[0]))
    return hit


def _select(dev: torch.device) -> str:
    f = forced()
    if f is not None:
        ok, why = available(f, dev)
        if not ok:
            raise RuntimeError(f"minaction backend {f!r} was forced but cannot run on {dev.type}: {why}")
        return f
    for name in _AUTO_ORDER.get(dev.type, ()):
        if available(name, dev)[0]:
            return name
    if dev.type not in _warned and dev.type != "meta":  # meta tensors compute shapes only: no speed to lose
        _warned.add(dev.type)
        warnings.warn(f"minaction: using the slow 'reference' backend on {dev.type} ({_why_no_fused(dev)})",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def _why_no_fused(dev: torch.device) -> str:
    """Why no fused backend runs on ``dev`` (each one's reason; ``available`` answers from its cache)."""
    return "; ".join(f"{n}: {available(n, dev)[1]}" for n in _AUTO_ORDER.get(dev.type, ())) or \
        f"no fused backend exists for device type {dev.type!r}"


def backend_info(device=None) -> dict:
    """Which backend is active for ``device`` (default: CPU, and CUDA if present) and why."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    out = {"forced": forced(), "devices": {}}
    for dev in devices:
        # the choice is made here without select's cache and without using up its one fallback warning: a
        # backend_info() before the first forward left the forward's fallback to the reference path unsaid
        warned = dev.type in _warned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                active = _select(dev)
                err = None
            except RuntimeError as exc:
                active, err = None, str(exc)
        if not warned:
            _warned.discard(dev.type)
        out["devices"][dev.type] = {
            "active": active,
            "error": err,
            "fallback": _why_no_fused(dev) if active == "reference" and forced() is None else None,
            "available": {n: dict(zip(("ok", "why"), available(n, dev))) for n in BACKENDS},
        }
    return out
