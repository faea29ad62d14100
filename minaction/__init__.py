"""minaction: fused kernels for energy-regularized neural networks, and the
replication study of Frasch, "minAction.net" (arXiv 2604.24805)."""
from .backend import backend_info, set_backend, use_backend  # noqa: F401
from .utils import convert, energy_report, total_energy  # noqa: F401
from . import nn  # noqa: F401

__version__ = "0.1.0"
__all__ = ["nn", "total_energy", "convert", "energy_report", "backend_info", "set_backend", "use_backend"]
