"""Model-level helpers: ``total_energy``, ``convert`` and ``energy_report``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .nn.layers import EnergyLayer, EnergyLinear

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def energy_layers(model: nn.Module):
    """(name, layer) for every energy layer in ``model`` that counts energy."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EnergyLayer) and m.counts_energy]


def total_energy(model: nn.Module) -> torch.Tensor:
    """``E = sum_l E_l`` over the energy layers of ``model`` from its last forward.

    0-dim for ordinary models; ``[G]`` for batched models of G members. Layers built
    with ``energy=None`` (by default the logits layer) are not counted.
    """
    total = None
    layers = energy_layers(model)
    if not layers:
        raise ValueError("model has no energy layers (use minaction.convert or minaction.nn layers)")
    for name, m in layers:
        if m.last_energy is None:
            raise RuntimeError(f"energy layer {name or type(m).__name__!r} has no energy yet: run a forward first")
        total = m.last_energy if total is None else total + m.last_energy
    return total


def _act_name(mod: nn.Module):
    if isinstance(mod, nn.GELU):
        return "gelu" if mod.approximate == "none" else None
    for cls, name in _ACT_MODULES.items():
        if type(mod) is cls:
            return name
    return None


def convert(model: nn.Module, energy="l2", energy_reduction: str = "sum", backend=None) -> nn.Module:
    """Replace every ``nn.Linear`` followed by an activation module inside ``nn.Sequential``
    containers with an :class:`~minaction.nn.EnergyLinear` carrying the same weights
    (the activation becomes ``nn.Identity``). Works in place and returns ``model``.

    A ``Linear`` with no activation after it (e.g. the logits layer) is left alone.
    """
    for child in list(model.children()):
        convert(child, energy=energy, energy_reduction=energy_reduction, backend=backend)
    if isinstance(model, nn.Sequential):
        keys = list(model._modules.keys())
        for k, nxt in zip(keys[:-1], keys[1:]):
            lin, act_mod = model._modules[k], model._modules[nxt]
            act = _act_name(act_mod)
            if type(lin) is nn.Linear and act is not None:
                new = EnergyLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, activation=act,
                                   energy=energy, energy_reduction=energy_reduction, backend=backend,
                                   device=lin.weight.device, dtype=lin.weight.dtype)
                new.load_state_dict(lin.state_dict())
                new.train(lin.training)
                model._modules[k] = new
                model._modules[nxt] = nn.Identity()
    return model


def weight_density(w: torch.Tensor, rel_tol: float = 1e-3) -> float:
    """Fraction of weights with ``|w| > rel_tol * max|w|`` (non-negligible weights)."""
    a = w.detach().abs()
    m = a.max()
    if m == 0:
        return 0.0
    return float((a > rel_tol * m).float().mean())


@torch.no_grad()
def energy_report(model: nn.Module, x: torch.Tensor, rel_tol: float = 1e-3):
    """Per energy layer: E, units, active-unit fraction, weight density and forward FLOPs.

    Runs one forward of ``model`` on ``x`` (in eval mode, restored afterwards) and returns
    a pandas DataFrame with one row per energy layer and a final ``total`` row. The joules
    measured over that forward (RAPL / NVML where the hardware exposes them, see
    :class:`minaction.energy_meter.EnergyMeter`) are in ``df.attrs["measured_joules"]``, with
    ``df.attrs["measured_reasons"]`` saying why a source gave no number.
    """
    from .energy_meter import EnergyMeter

    import pandas as pd

    rows, hooks = [], []

    def hook(name):
        def fn(mod, inp, out):
            y = out[0] if isinstance(out, tuple) else out
            xs = inp[0].shape if inp else ()
            weights = [
                p for n, p in mod.named_parameters(recurse=False) if n.endswith("weight")]
            e = mod.last_energy
            rows.append({
                "layer": name, "type": type(mod).__name__, "activation": getattr(mod, "activation", None),
                "energy": float(e.sum()) if e is not None else float("nan"),
                "units": int(math.prod(y.shape[1:])) if y.dim() > 1 else 1,
                "active_fraction": float((y != 0).float().mean()),
                "weight_density": weight_density(weights[0], rel_tol) if weights else float("nan"),
                "flops": int(mod.forward_flops(xs, tuple(y.shape))),
            })
        return fn

    for name, m in model.named_modules():
        if isinstance(m, EnergyLayer):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with EnergyMeter() as meter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not rows:
        raise ValueError("model has no energy layers (use minaction.convert or minaction.nn layers)")
    df = pd.DataFrame(rows)
    counted = {n for n, _ in energy_layers(model)}
    df["counted"] = df["layer"].isin(counted)
    total = {"layer": "total", "type": "", "activation": None,
             "energy": float(df.loc[df.counted, "energy"].sum()), "units": int(df.units.sum()),
             "active_fraction": float("nan"), "weight_density": float("nan"), "flops": int(df.flops.sum()),
             "counted": True}
    out = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    out.attrs["measured_joules"] = dict(meter.joules)
    out.attrs["measured_reasons"] = dict(meter.reasons)
    out.attrs["seconds"] = meter.seconds
    return out
