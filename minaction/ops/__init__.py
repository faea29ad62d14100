"""Fused energy operators (registered with ``torch.library`` under ``minaction::``)."""
from .energy import activation_energy, energy_linear, validate_energy, validate_penalty, with_penalty  # noqa: F401
from .pool import max_pool2  # noqa: F401
