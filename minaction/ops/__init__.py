"""Fused energy operators (registered with ``torch.library`` under ``minaction::``)."""
from .energy import activation_energy, energy_linear, validate_energy  # noqa: F401
