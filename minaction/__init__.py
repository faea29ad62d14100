"""minaction: fused kernels for energy-regularized neural networks, and the replication study of
Frasch, "minAction.net" (arXiv 2604.24805).

``import minaction`` loads the core (``minaction.nn``, ``minaction.ops``, the helpers below);
the other submodules (``data``, ``models``, ``study``, ``report``, ...) load on first access,
as torch's do: ``minaction.data`` works after a plain ``import minaction``.
"""
from __future__ import annotations

import importlib as _importlib

from .backends.select import backend_info, set_backend, use_backend  # noqa: F401
from .model_api import convert, energy_report, total_energy  # noqa: F401
from . import nn  # noqa: F401

__version__ = "0.1.0"
__all__ = ["nn", "total_energy", "convert", "energy_report", "backend_info", "set_backend", "use_backend"]

# submodules imported on first attribute access (they pull pandas, statsmodels, matplotlib, ...)
_LAZY_SUBMODULES = frozenset({"backends", "cli", "data", "energy_meter", "models", "model_api", "ops", "report",
                              "study"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'minaction' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES)
