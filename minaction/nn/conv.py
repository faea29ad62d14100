"""``EnergyConv1d`` / ``EnergyConv2d``: a convolution followed by the fused activation + energy epilogue.

The convolution itself is PyTorch's (``F.conv1d`` / ``F.conv2d``, i.e. oneDNN on CPU,
cuDNN on GPU); the activation and the layer's activation energy are computed in one
pass over the conv output by :func:`minaction.ops.activation_energy`, on whichever
backend is selected (``reference``, ``cpu``, ``triton``, ...).

Energy follows the project definition: ``E_l`` = mean over the samples of the sum (or,
with ``energy_reduction="mean"``, the mean) over every output unit — channels times
positions — of ``|y|^p``. So a conv layer's energy is comparable with an
``EnergyLinear``'s of the same number of output units.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import activation_energy
from .layers import EnergyLayer

_IntOrTuple = Union[int, Tuple[int, ...]]


def _tuple(v, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        out = (v,) * n
    else:
        out = tuple(int(a) for a in v)
        if len(out) != n:
            raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
    return out


class _EnergyConvNd(EnergyLayer):
    _dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrTuple, stride: _IntOrTuple = 1,
                 padding: Union[_IntOrTuple, str] = 0, dilation: _IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 activation: str = "relu", energy: Optional[str] = "l2", energy_reduction: str = "sum",
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        n = self._dims
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self._init_energy(activation, energy, energy_reduction)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.dilation = _tuple(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            self.padding = padding
        else:
            self.padding = _tuple(padding, n, "padding")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise ValueError("kernel_size, stride and dilation must be positive")
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels // groups) + self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, model: Optional[int] = None) -> None:
        """``nn.ConvNd``'s initialisation: weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

        ``model`` exists for signature compatibility with batched layers and must be None.
        """
        if model is not None:
            raise ValueError("EnergyConv layers hold one model; reset_parameters(model=...) must be None")
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight.uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self._dims + 2:
            raise ValueError(f"{type(self).__name__} expects input [batch, channels, {'x'.join('*' * self._dims)}]"
                             f" ({self._dims + 2}-D), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        z = self._conv(x)
        y, e = activation_energy(z, self.activation, self.energy, self.energy_reduction, backend=self.backend)
        self.last_energy = e
        return y

    def forward_flops(self, x_shape, y_shape) -> int:
        out = math.prod(y_shape)
        return 2 * out * self.fan_in + (out if self.bias is not None else 0)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if max(self.dilation) != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += f", activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        return s


class EnergyConv1d(_EnergyConvNd):
    """``act(conv1d(x))`` with its activation energy; parameters as ``nn.Conv1d``.

    Input ``[B, C_in, L]`` -> output ``[B, C_out, L_out]``; ``last_energy`` is 0-dim.
    """

    _dims = 1

    def _conv(self, x):
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class EnergyConv2d(_EnergyConvNd):
    """``act(conv2d(x))`` with its activation energy; parameters as ``nn.Conv2d``.

    Input ``[B, C_in, H, W]`` -> output ``[B, C_out, H_out, W_out]``; ``last_energy`` is 0-dim.
    """

    _dims = 2

    def _conv(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


__all__ = ["EnergyConv1d", "EnergyConv2d"]
