"""``EnergyActivation``: an activation module that also computes its output's activation energy.

For the activations that do not follow a linear or convolution layer directly: Conv → BatchNorm →
ReLU, Linear → LayerNorm → GELU. ``minaction.convert`` puts it in place of such activation
modules; ``EnergyLinear`` / ``EnergyConv`` remain the choice where the activation follows the
layer (their kernels fuse the layer's epilogue too). The pass is the fused activation + energy
epilogue (:func:`minaction.ops.activation_energy`), so it costs about what the activation alone
costs.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..ops import activation_energy
from . import layers as _layers
from .layers import EnergyLayer

_ROWS = ("batch", "leading")


class EnergyActivation(EnergyLayer):
    """``act(x)``, with ``last_energy`` the energy of its output.

    Args:
        activation: "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid" or "identity".
        energy, energy_reduction, backend, penalty: as :class:`~minaction.nn.EnergyLinear`.
        rows: what a sample is. ``"batch"`` (default): dim 0, every other dim a unit, as
            ``EnergyConv`` counts a feature map ``[B, C, *spatial]`` (after a ``BatchNorm2d``);
            ``"leading"``: every dim but the last, which holds the units, as ``EnergyLinear``
            counts ``[B, T, C]`` token features (after a ``LayerNorm``). The two agree on ``[B, C]``.

    A module applied more than once in one forward (a ResNet block's ``self.relu``, after the first
    norm and after the residual add) can count every call: :meth:`accumulate_in` registers a
    forward pre-hook on the module whose forward applies it, and ``last_energy`` is then the sum
    over the calls made since that module's forward began.
    """

    def __init__(self, activation: str = "relu", energy: Optional[str] = "l2", energy_reduction: str = "sum",
                 rows: str = "batch", backend: Optional[str] = None, penalty: float = 0.0):
        super().__init__()
        if rows not in _ROWS:
            raise ValueError(f"rows must be one of {_ROWS}, got {rows!r}")
        self._init_energy(activation, energy, energy_reduction, penalty)
        self.rows = rows
        self.backend = backend
        self.accumulate = False

    def accumulate_in(self, owner: nn.Module, path: str):
        """Sum the energies of every call made during each forward of ``owner``, which applies this
        module (at ``path``, relative to ``owner``) several times. Returns the hook's handle."""
        if owner.get_submodule(path) is not self:
            raise ValueError(f"{path!r} of {type(owner).__name__} is not this module")
        self.accumulate = True
        # a module-level function and a path, not a closure: copies of owner reset their own module
        return owner.register_forward_pre_hook(functools.partial(_start_accumulating, path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"{type(self).__name__} expects a tensor with a batch dimension, got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-dim tensor'}")
        old = None if _layers._compiling() else self.__dict__.get("_last_energy")
        kw = dict(backend=self.backend, penalty=self.penalty)
        if self.rows == "leading" and x.dim() > 2:
            y, e = activation_energy(x.reshape(-1, x.shape[-1]), self.activation, self.energy, self.energy_reduction,
                                     **kw)
            y = y.view(x.shape)
        elif x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # channels-last (after a conv + BatchNorm2d in that format): the sample's units are one block of the
            # [B, H, W, C] view, and the output keeps the format, as nn.ReLU's does
            y, e = activation_energy(x.permute(0, 2, 3, 1), self.activation, self.energy, self.energy_reduction, **kw)
            y = y.permute(0, 3, 1, 2)
        else:
            y, e = activation_energy(x if x.dim() > 1 else x.unsqueeze(1), self.activation, self.energy,
                                     self.energy_reduction, **kw)
            y = y.view(x.shape)
        d = self.__dict__
        d["_call_energy"] = e  # this call's own (energy_report's rows)
        if self.accumulate and not d.get("_fresh", True) and d.get("_last_energy") is not None:
            # a later call in the same forward of the owner: every call counts (the first one set the sum in this
            # forward, so reading it is safe under torch.compile too)
            self.last_energy = d["_last_energy"] + e
            if _layers._TAPES:
                _layers._record(self, e)
            return y
        if self.accumulate:
            d["_fresh"] = False
        self.last_energy = e
        if _layers._TAPES:
            _layers._record(self, e)
        elif _layers._grad_enabled() and not _layers._compiling() and _layers._interpreter_stack() is None:
            _layers._count_call(self, old)
        return y

    def extra_repr(self) -> str:
        s = f"activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        if self.rows != "batch":
            s += f", rows={self.rows!r}"
        if self.penalty:
            s += f", penalty={self.penalty:g}"
        if self.accumulate:
            s += ", accumulate=True"
        return s


def _start_accumulating(path: str, owner: nn.Module, args) -> None:
    """Forward pre-hook of the module that applies an accumulating EnergyActivation: a new forward
    starts a new sum."""
    owner.get_submodule(path).__dict__["_fresh"] = True
