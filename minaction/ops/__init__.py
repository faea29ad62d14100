"""Fused energy operators (registered with ``torch.library`` under ``minaction::``)."""
from .energy import activation_energy, energy_linear, validate_energy, validate_penalty, with_penalty  # noqa: F401
from .pool import activation_energy_max_pool2, conv2d_act_energy_max_pool2, max_pool2  # noqa: F401

__all__ = ["energy_linear", "activation_energy", "activation_energy_max_pool2", "conv2d_act_energy_max_pool2",
           "max_pool2", "with_penalty", "validate_energy", "validate_penalty"]
