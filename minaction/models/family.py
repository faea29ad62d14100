"""The batched "MLP family": ``mlp`` (baseline), ``bimodal_true`` and ``physics_lagrangian``.

Each class builds G members at once from :class:`~minaction.nn.EnergyLinear` layers with
``num_models=G`` (or ordinary layers when G == 1). Equations and the reasoning behind the
two energy-first designs are in ``docs/models.md``; the docstrings below restate them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import validate_energy
from .common import EnergyNet, FeatureStem, as_int, as_number, column_norms


def _check_act(name, act):
    try:
        validate_energy(act, "l2", "sum")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class MLP(EnergyNet):
    """Baseline: ``h_0 = stem(x)``, ``h_l = act(W_l h_{l-1} + b_l)`` (l = 1..depth), logits ``W_o h_depth + b_o``.

    Every hidden layer is an energy layer; the logits layer is not counted.
    """

    arch = "mlp"
    reads_time_mean = True  # its input reaches the layers only through FeatureStem (time mean)
    KNOBS = {"embed_dim": 64, "embed_init_std": 0.1}

    def __init__(self, meta, width: int, depth: int, energy="l2", activation="relu", energy_reduction="sum",
                 num_models: int = 1, embed_dim: int = 64, embed_init_std: float = 0.1):
        super().__init__(meta, num_models)
        _check_act("activation", activation)
        self.width, self.depth = as_int("width", width), as_int("depth", depth)
        self.stem = FeatureStem(meta, embed_dim, self._G, embed_init_std)
        d = self.stem.out_features
        self.layers = nn.ModuleList()
        for _ in range(self.depth):
            self.layers.append(self.linear(d, self.width, activation, energy, energy_reduction))
            d = self.width
        self.out = self.logits_layer(d)

    def forward(self, x):
        h = self.stem(x, self.param_dtype())
        for lay in self.layers:
            h = lay(h)
        return self.out(h)

    def rescale_factors(self):
        readers = list(self.layers[1:]) + [self.out]
        return [(lay, column_norms(nxt.weight)) for lay, nxt in zip(self.layers, readers)]


class BimodalTrue(EnergyNet):
    """Dual-pathway blocks after neuron–glia metabolic specialisation (this project's design).

    Block l, input ``h`` (``h_0 = stem(x)``):

    * neuronal pathway (fast, wide, sparse): ``n = act(W_n h + b_n)``, ``width`` units;
    * glial pathway (narrow, dense, saturating): ``g = sigma(W_g h + b_g)``,
      ``ceil(width / glia_domain)`` units; glial unit k supplies the "domain" of neurons
      ``j`` with ``j // glia_domain == k`` (astrocytic domains);
    * coupling (metabolic supply): ``h' = n * ((1 - coupling) + 2 * coupling * expand(g))``
      — the supply scales each neuron's output between 0 and 2x (1x at sigma = 1/2);
      ``coupling = 0`` leaves a plain MLP beside an unused glial pathway.

    Both pathways are energy layers, so the energy term prices the supply as well as the
    signalling. Knobs: ``glia_domain`` (8), ``coupling`` (1.0), ``glia_activation``
    ("sigmoid"), ``embed_dim`` (64, text stem).
    """

    arch = "bimodal_true"
    reads_time_mean = True  # its input reaches the layers only through FeatureStem (time mean)
    KNOBS = {"embed_dim": 64, "embed_init_std": 0.1, "glia_domain": 8, "coupling": 1.0, "glia_activation": "sigmoid"}

    def __init__(self, meta, width: int, depth: int, energy="l2", activation="relu", energy_reduction="sum",
                 num_models: int = 1, embed_dim: int = 64, embed_init_std: float = 0.1, glia_domain: int = 8,
                 coupling: float = 1.0,
                 glia_activation: str = "sigmoid"):
        super().__init__(meta, num_models)
        _check_act("activation", activation)
        _check_act("glia_activation", glia_activation)
        if as_int("glia_domain", glia_domain) < 1:
            raise ValueError(f"glia_domain must be >= 1 neurons per glial unit, got {glia_domain}")
        if not 0.0 <= as_number("coupling", coupling) <= 1.0:
            raise ValueError(f"coupling must lie in [0, 1], got {coupling}")
        self.width, self.depth = as_int("width", width), as_int("depth", depth)
        self.glia_domain, self.coupling = as_int("glia_domain", glia_domain), float(coupling)
        self.glia_width = math.ceil(self.width / self.glia_domain)
        self.stem = FeatureStem(meta, embed_dim, self._G, embed_init_std)
        d = self.stem.out_features
        self.neurons, self.glia = nn.ModuleList(), nn.ModuleList()
        for _ in range(self.depth):
            self.neurons.append(self.linear(d, self.width, activation, energy, energy_reduction))
            self.glia.append(self.linear(d, self.glia_width, glia_activation, energy, energy_reduction))
            d = self.width
        self.out = self.logits_layer(d)

    def supply(self, g: torch.Tensor) -> torch.Tensor:
        """Per-neuron multiplier from the glial state: ``(1 - c) + 2 c * expand(g)``."""
        m = g.repeat_interleave(self.glia_domain, dim=-1)[..., : self.width]
        return (1.0 - self.coupling) + (2.0 * self.coupling) * m

    def forward(self, x):
        h = self.stem(x, self.param_dtype())
        for neu, gli in zip(self.neurons, self.glia):
            n = neu(h)
            g = gli(h)
            h = n * self.supply(g)
        return self.out(h)

    def rescale_factors(self):
        out = []
        for i, neu in enumerate(self.neurons):
            if i + 1 < self.depth:
                f = column_norms(self.neurons[i + 1].weight, self.glia[i + 1].weight)
            else:
                f = column_norms(self.out.weight)
            out.append((neu, f))
            out.append((self.glia[i], None))  # sigmoid: no rescaling symmetry, factor 1
        return out


class PhysicsLagrangian(EnergyNet):
    """Depth as time: a few steps of damped-free Lagrangian dynamics of a hidden state ``q``
    (this project's design), with kinetic (T), potential (V) and constraint (C) pathways.

    ``q_0 = act(W_0 stem(x) + b_0)``; for each step l = 1..depth (step size ``tau``):

    * T (kinetic): ``v = tanh(W_T q + b_T)`` — the free velocity; its energy ``|v|^2 = 2T``;
    * V (potential): ``r = act(W_V q + b_V)`` (``m = potential_ratio * width`` units) with
      ``V(q) = 1/2 |r|^2`` and force ``F = -grad V = -W_V^T r`` (weights tied, exact for
      ReLU); its energy ``|r|^2 = 2V``;
    * C (constraint): ``c = sigma(W_C q + b_C)`` — soft constraint multipliers admitting a
      fraction of each coordinate's motion (ideal constraint forces remove the rest);
    * update (one semi-implicit Euler step of ``q'' = F`` from velocity ``v``):
      ``q <- q + tau * c * (v + tau * F)``.

    Logits ``W_o q_depth + b_o``. With energy "l2", the T and V pathways' activation energy
    is twice the mechanical energy ``T + V`` along the trajectory, so ``lambda * E`` prices
    motion and potential alike. Knobs: ``step`` (tau, 1.0), ``potential_ratio`` (0.5),
    ``constraint`` (True; False drops C, i.e. c = 1), ``kinetic_activation`` ("tanh"),
    ``constraint_activation`` ("sigmoid"), ``embed_dim`` (64).
    """

    arch = "physics_lagrangian"
    reads_time_mean = True  # its input reaches the layers only through FeatureStem (time mean)
    KNOBS = {"embed_dim": 64, "embed_init_std": 0.1, "step": 1.0, "potential_ratio": 0.5, "constraint": True,
             "kinetic_activation": "tanh", "constraint_activation": "sigmoid"}

    def __init__(self, meta, width: int, depth: int, energy="l2", activation="relu", energy_reduction="sum",
                 num_models: int = 1, embed_dim: int = 64, embed_init_std: float = 0.1, step: float = 1.0,
                 potential_ratio: float = 0.5,
                 constraint: bool = True, kinetic_activation: str = "tanh", constraint_activation: str = "sigmoid"):
        super().__init__(meta, num_models)
        for n, a in (("activation", activation), ("kinetic_activation", kinetic_activation),
                     ("constraint_activation", constraint_activation)):
            _check_act(n, a)
        if not as_number("step", step) > 0:
            raise ValueError(f"step must be positive, got {step}")
        if not as_number("potential_ratio", potential_ratio) > 0:
            raise ValueError(f"potential_ratio must be positive, got {potential_ratio}")
        self.width, self.depth = as_int("width", width), as_int("depth", depth)
        self.step, self.constraint = float(step), bool(constraint)
        self.potential_width = max(1, round(float(potential_ratio) * self.width))
        self.stem = FeatureStem(meta, embed_dim, self._G, embed_init_std)
        w = self.width
        self.encoder = self.linear(self.stem.out_features, w, activation, energy, energy_reduction)
        self.kinetic, self.potential, self.constraints = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for _ in range(self.depth):
            self.kinetic.append(self.linear(w, w, kinetic_activation, energy, energy_reduction))
            self.potential.append(self.linear(w, self.potential_width, activation, energy, energy_reduction))
            if self.constraint:
                self.constraints.append(self.linear(w, w, constraint_activation, energy, energy_reduction))
        self.out = self.logits_layer(w)

    def weight_products(self):
        """Layers whose weight also enters a matrix product outside the layer, of the layer's own size: the
        force ``-W_V^T r`` (read by the study's FLOP count, minaction.study.trainer.training_flops_per_sample)."""
        return list(self.potential)

    def forward(self, x):
        q = self.encoder(self.stem(x, self.param_dtype()))
        tau = self.step
        for i in range(self.depth):
            v = self.kinetic[i](q)
            r = self.potential[i](q)
            force = -torch.matmul(r, self.potential[i].weight)  # -W_V^T r, per member
            dq = v + tau * force
            if self.constraint:
                dq = self.constraints[i](q) * dq
            q = q + tau * dq
        return self.out(q)

    def rescale_factors(self):
        if self.depth:
            readers = [self.kinetic[0].weight, self.potential[0].weight]
            if self.constraint:
                readers.append(self.constraints[0].weight)
        else:
            readers = [self.out.weight]
        out = [(self.encoder, column_norms(*readers))]
        for i in range(self.depth):
            out.append((self.kinetic[i], None))  # tanh: factor 1
            # r is read by the tied W_V^T: its reader for unit j is row j of W_V
            out.append((self.potential[i], torch.sqrt((self.potential[i].weight.detach() ** 2).sum(-1))))
            if self.constraint:
                out.append((self.constraints[i], None))  # sigmoid: factor 1
        return out
