"""``EnergyLinear``: ``nn.Linear`` + activation, with the layer's activation energy.

After each forward, ``layer.last_energy`` holds ``E_l`` (a 0-dim tensor, or ``[G]`` for a
batched layer of G models) on the autograd graph, so ``loss + lam * E`` trains with the
energy term and its gradient flows through the fused backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import energy_linear, validate_energy


class EnergyLayer(nn.Module):
    """Base of every layer whose activation energy ``minaction.total_energy`` sums.

    Subclasses set ``self.last_energy`` in ``forward``; ``counts_energy`` is False when
    the layer was built with ``energy=None``.
    """

    last_energy: Optional[torch.Tensor]

    def _init_energy(self, activation, energy, energy_reduction):
        self.p = validate_energy(activation, energy, energy_reduction)
        self.activation = activation
        self.energy = energy
        self.energy_reduction = energy_reduction
        self.last_energy = None

    @property
    def counts_energy(self) -> bool:
        return self.p != 0

    def forward_flops(self, x_shape, y_shape) -> int:  # pragma: no cover - overridden
        return 0


class EnergyLinear(EnergyLayer):
    """``act(x @ W.T + b)`` with its activation energy computed in the same pass.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (same parameter names and
            shapes, so ``state_dict`` moves freely between the two).
        activation: one of "relu", "gelu", "silu", "tanh", "sigmoid", "identity".
        energy: "l2" (sum of y^2, default), "l1" (sum of |y|) or None (no energy).
        energy_reduction: "sum" over units (default) or "mean" over units; always a
            mean over the samples (rows) of the batch.
        num_models: if set, G independent models in one layer: weight ``[G, out, in]``,
            input ``[G, B, in]`` or a shared ``[B, in]``, output ``[G, B, out]``,
            ``last_energy`` ``[G]``.
        backend: force a kernel backend for this layer (default: automatic, see
            ``minaction.backend_info()``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 energy: Optional[str] = "l2", energy_reduction: str = "sum", num_models: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if num_models is not None and num_models <= 0:
            raise ValueError(f"num_models must be positive, got {num_models}")
        self._init_energy(activation, energy, energy_reduction)
        self.in_features, self.out_features, self.num_models = in_features, out_features, num_models
        self.backend = backend
        lead = () if num_models is None else (num_models,)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(lead + (out_features, in_features), **kw))
        self.bias = nn.Parameter(torch.empty(lead + (out_features,), **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, model: Optional[int] = None) -> None:
        """``nn.Linear``'s initialisation; for a batched layer, each model (or only ``model``) in turn."""
        bound = 1.0 / math.sqrt(self.in_features)
        models = [None] if self.num_models is None else ([model] if model is not None else range(self.num_models))
        for g in models:
            w = self.weight if g is None else self.weight[g]
            # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
            w.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                (self.bias if g is None else self.bias[g]).uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, e = energy_linear(x, self.weight, self.bias, self.activation, self.energy, self.energy_reduction,
                             backend=self.backend)
        self.__dict__["last_energy"] = e  # a plain attribute: skips nn.Module.__setattr__'s bookkeeping
        return y

    def forward_flops(self, x_shape, y_shape) -> int:
        rows = math.prod(y_shape[:-1])
        return 2 * rows * self.in_features * self.out_features + (rows * self.out_features if self.bias is not None
                                                                 else 0)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
            f"activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        if self.num_models is not None:
            s += f", num_models={self.num_models}"
        return s
