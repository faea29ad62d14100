"""``activation_stats``: energy, active fraction and rescaling-invariant energy of a model."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

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
def activation_stats(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
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
        model(x)
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
            batched = g is None and G > 1  # [G, B, ...]
            yg = (getattr(lay, "member_view", None) or (lambda t: t))(y) if batched else y.unsqueeze(0)  # [G', B..]
            B = yg.shape[1]
            units = yg[0, 0].numel()
            sl = slice(None) if g is None else slice(g, g + 1)
            nnz[sl] += (yg != 0).reshape(yg.shape[0], -1).sum(1).double()
            tot[sl] += float(yg[0].numel())
            p = ENERGIES[lay.energy] or 2
            f = factors.get(id(lay))
            if f is not None:
                f = f.to(yg.dtype)
                if isinstance(lay, EnergyLayer) and yg.dim() > 3:  # conv: per channel [.., C] -> [G', 1, C, 1...]
                    f = f.reshape(-1 if f.dim() == 2 else 1, 1, f.shape[-1], *([1] * (yg.dim() - 3)))
                else:  # linear: [N] or [G, N] -> [G', 1, N]
                    f = f.reshape(-1 if f.dim() == 2 else 1, 1, f.shape[-1])
                yr = yg * f
            else:
                yr = yg
            e = (yr.abs() ** p).reshape(yg.shape[0], -1).sum(1).double() / B
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
    return out
