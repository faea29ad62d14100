"""Drop-in layers that account their activation energy (see ``minaction.ops``)."""
from .layers import EnergyLayer, EnergyLinear  # noqa: F401
from .conv import EnergyConv1d, EnergyConv2d  # noqa: F401
from .activation import ActivationObserver, EnergyActivation  # noqa: F401

__all__ = ["EnergyLayer", "EnergyLinear", "EnergyConv1d", "EnergyConv2d", "EnergyActivation", "ActivationObserver"]
