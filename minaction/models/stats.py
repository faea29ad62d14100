"""``activation_stats``: energy, active fraction and rescaling-invariant energy of a model."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from ..nn.conv import _EnergyConvNd
from ..nn.layers import EnergyLayer
from ..ops.energy import ENERGIES
from ..model_api import total_energy


def _members(model):
    """(member module, member index or None) pairs: one for batched/single models, G for loop ensembles."""
    members = getattr(model, "members", None)
    if members is not None:
        return [(m, g) for g, m in enumerate(members)]
    return [(model, None)]


def _hidden_layers(module):
    return [m for m in module.modules() if isinstance(m, EnergyLayer) and not getattr(m, "is_logits", False)]


@torch.no_grad()
def activation_stats(model: nn.Module, x: torch.Tensor, output: bool = False) -> Dict[str, torch.Tensor]:
    """One forward of ``model`` on ``x`` (eval mode, no grad; the mode is restored) and:

    * ``energy``: :func:`minaction.total_energy` (E as trained against);
    * ``active_frac``: over all hidden energy layers together, the fraction of non-zero
      outputs (units x positions x samples);
    * ``energy_rescaled``: E recomputed with every hidden unit's output multiplied by the
      L2 norm of the weights that read it (each architecture's ``rescale_factors`` says
      which; units with no positively-homogeneous symmetry, e.g. sigmoid/tanh gates, keep
      factor 1), with the layer's own p and reduction. Invariant to the ReLU rescaling
      ``W_l -> a W_l, b_l -> a b_l, W_{l+1} -> W_{l+1} / a``.

    Each value is 0-dim for a one-member model, ``[G]`` for G members. For a model built
    with ``energy=None`` ``energy`` is zeros and ``energy_rescaled`` uses p = 2.
    ``output=True`` adds ``"output"``: the model's output on ``x`` from that same forward (an
    evaluation loop need not run the model a second time for its logits).
    """
    G = int(getattr(model, "num_models", 1))
    captured = {}
    hooks = []
    members = _members(model)
    for mod, g in members:
        for lay in _hidden_layers(mod):
            def hook(m, inp, out, key=id(lay)):
                captured[key] = out
            hooks.append(lay.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        y_out = model(x)
        try:
            energy = total_energy(model)
        except ValueError:  # energy=None: no counting layers
            energy = None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()

    dev = next(model.parameters()).device
    nnz = torch.zeros(G, dtype=torch.float64, device=dev)
    tot = torch.zeros(G, dtype=torch.float64, device=dev)
    resc = None
    for mod, g in members:
        factors = {id(lay): f for lay, f in mod.rescale_factors()} if hasattr(mod, "rescale_factors") else {}
        for lay in _hidden_layers(mod):
            y = captured.get(id(lay))
            if y is None:
                continue
            batched = g is None and (G > 1 or getattr(mod, "member_dim", False))  # [G, B, ...]
            yg = (getattr(lay, "member_view", None) or (lambda t: t))(y) if batched else y.unsqueeze(0)  # [G', B..]
            Gp, B = yg.shape[0], yg.shape[1]
            units = math.prod(yg.shape[2:])  # not yg[0, 0]: an empty batch has no row 0
            sl = slice(None) if g is None else slice(g, g + 1)
            tot[sl] += float(yg[0].numel())
            p = ENERGIES[lay.energy] or 2
            # sum of |y|^p per unit (linear: the last dim) or per channel (conv: dim 2), then weighted
            # by f^p: sum |y f|^p = sum_c f_c^p sum |y_c|^p, as f >= 0 (a norm); one pass and one
            # temporary, where |y * f| ** p made four (the cnn's test evaluation spent 2.2 of 11.7 s here)
            conv = isinstance(lay, _EnergyConvNd)  # [G', B, C, *spatial]; a linear layer: [G', B, ..., N]
            per, nz = _unit_stats(yg, p, 2 if conv else yg.dim() - 1)  # [G', C or N], [G']
            nnz[sl] += nz
            f = factors.get(id(lay))
            if f is not None:
                f = f.to(yg.dtype)
                per = per * f.reshape(-1 if f.dim() == 2 else 1, f.shape[-1]).pow(p)
            e = per.sum(1).double() / max(B, 1)  # an empty batch: 0, as its energy
            if lay.energy_reduction == "mean":
                e = e / units
            if resc is None:
                resc = torch.zeros(G, dtype=torch.float64, device=dev)
            resc[sl] += e
    if resc is None:
        resc = torch.zeros(G, dtype=torch.float64, device=dev)
    dt = energy.dtype if energy is not None else torch.float32
    out = {
        "energy": energy.detach() if energy is not None else torch.zeros(G, dtype=dt, device=dev),
        "active_frac": (nnz / tot.clamp_min(1)).to(dt),
        "energy_rescaled": resc.to(dt),
    }
    if G == 1:
        out = {k: v.reshape(()) for k, v in out.items()}
    if output:
        out["output"] = y_out
    return out


activation_stats.gives_output = True  # takes output=True (read by the study's evaluation loop)


def _unit_stats(y: torch.Tensor, p, unit_dim: int):
    """(sum of |y|^p per unit of dim ``unit_dim`` [G', U], non-zeros per member [G'] float64) of
    ``y [G', ...]``: the C++ kernels' one pass (``minaction::unit_stats``, float64 sums) where they
    are loaded and y is a CPU float32/float64 tensor (test evaluation of a 5-member cnn group on
    2000 MNIST images: 26 ms where the torch ops took ~420 ms), else torch ops."""
    from ..backends import cpu

    if (cpu.OPS is not None and p in (1, 2) and type(y) is torch.Tensor and y.device.type == "cpu"
            and y.dtype in (torch.float32, torch.float64) and y.dim() >= 2):
        return cpu.OPS.unit_stats(y, int(p), int(unit_dim))
    dims = tuple(d for d in range(1, y.dim()) if d != unit_dim)
    return _abs_pow_sum(y, p, dims), _nonzeros(y.reshape(y.shape[0], -1))


def _nonzeros(t: torch.Tensor) -> torch.Tensor:
    """[rows] float64: the non-zero values of each row of ``t`` (a NaN counts). |sign(t)| summed in
    float64: ~8x faster on the CPU than ``(t != 0).sum(1)``, whose bool-to-int64 sum is scalar."""
    s = t.sign().abs_()
    if s.is_floating_point():
        s = torch.nan_to_num_(s, nan=1.0)
    return s.sum(1, dtype=torch.float64)


def _abs_pow_sum(y: torch.Tensor, p, dims) -> torch.Tensor:
    """sum of |y|^p over ``dims`` (p = 2: y * y; p = 1: |y|)."""
    if p == 2:
        return (y * y).sum(dims)
    if p == 1:
        return y.abs().sum(dims)
    return y.abs().pow(p).sum(dims)

