"""minaction: fused kernels for energy-regularized neural networks, and the replication study of
Frasch, "minAction.net" (arXiv 2604.24805).

``import minaction`` loads the core (``minaction.nn``, ``minaction.ops``, the helpers below)
when torch is already imported, else on the first use of one of them; the other submodules
(``data``, ``models``, ``study``, ``report``, ...) load on first access, as torch's do:
``minaction.data`` works after a plain ``import minaction``.
"""
from __future__ import annotations

import importlib as _importlib


def _bind_checkout_sources() -> None:
    """Imported from a source checkout (``minaction/`` beside ``setup.py``, ``csrc/`` and
    ``kernels/``), ``minaction._csrc`` and ``minaction.kernels`` are that checkout's folders.
    Without this, an editable install of another checkout (its import hook maps those two
    names) made a second checkout run with ``PYTHONPATH`` build the first one's C++ sources."""
    import sys
    from importlib import util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").is_file():
        return
    for name, folder in (("minaction._csrc", "csrc"), ("minaction.kernels", "kernels")):
        init = root / folder / "__init__.py"
        if name in sys.modules or not init.is_file():
            continue
        spec = util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_bind_checkout_sources()

__version__ = "0.1.0"
__all__ = ["nn", "total_energy", "record_energy", "convert", "energy_report", "set_penalty", "backend_info", "set_backend",
           "use_backend", "keep_freed_memory", "ConversionReport", "EnergyTape"]

from ._alloc import keep_freed_memory  # noqa: E402,F401  (ctypes only: no torch)

# the core's names and where they live
_CORE = {"backend_info": "backends.select", "set_backend": "backends.select", "use_backend": "backends.select",
         "convert": "model_api", "energy_report": "model_api", "set_penalty": "model_api",
         "total_energy": "model_api", "record_energy": "model_api",
         "ConversionReport": "model_api", "EnergyTape": "model_api"}  # what convert / record_energy return


def _load_core() -> None:
    from .backends.select import backend_info, set_backend, use_backend  # noqa: F401
    from .model_api import (ConversionReport, EnergyTape, convert, energy_report, record_energy,  # noqa: F401
                            set_penalty, total_energy)
    from . import nn  # noqa: F401

    g = globals()
    g.update(backend_info=backend_info, set_backend=set_backend, use_backend=use_backend, convert=convert,
             energy_report=energy_report, set_penalty=set_penalty, total_energy=total_energy,
             record_energy=record_energy, nn=nn, ConversionReport=ConversionReport, EnergyTape=EnergyTape)


# With torch already imported (`import torch; import minaction`, any script or test) the core loads
# now, its ops registered with torch as before. Imported first, as the `minaction` command is, the
# core loads on first use: `minaction study run` then starts its workers' process before it spends
# a second importing torch itself (the two imports overlap).
if "torch" in __import__("sys").modules:
    _load_core()

# submodules imported on first attribute access (they pull pandas, statsmodels, matplotlib, ...)
_LAZY_SUBMODULES = frozenset({"backends", "cli", "data", "energy_meter", "errors", "models", "model_api", "ops",
                              "report", "study"})


def __getattr__(name: str):
    if name in _CORE or name == "nn":
        _load_core()
        return globals()[name]
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in ("kernels", "_csrc"):  # bound by _bind_checkout_sources or an install's import hook
        try:
            module = _importlib.import_module(f".{name}", __name__)
        except ImportError as exc:  # no triton: hasattr() and tools that walk attributes see a missing one
            raise AttributeError(f"module 'minaction' has no attribute {name!r} ({exc})") from exc
        globals()[name] = module
        return module
    raise AttributeError(f"module 'minaction' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_CORE) | {"nn"})
