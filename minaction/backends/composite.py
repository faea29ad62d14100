"""The backend primitives written in plain PyTorch ops: the executable specification.

Used as the fallback inside the fused operators when no compiled backend is present
for a device, and by the kernel tests as a second oracle. See ``__init__`` for the
contract.
"""
from __future__ import annotations

import math

import torch

from . import energy_dtype

_LOW = (torch.float16, torch.bfloat16)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _up(t):
    """half/bfloat16 -> float32: the spec computes in float32, as the kernels' accumulators do."""
    return t.float() if t is not None and t.dtype in _LOW else t


def apply_act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.relu(z)
    if act == "gelu":
        return torch.nn.functional.gelu(z)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if act == "silu":
        return torch.nn.functional.silu(z)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "identity":
        return z
    raise ValueError(f"unknown activation {act!r}")


def act_grad(y: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """d act / d z, from the output y (or z where the derivative needs it)."""
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "identity":
        return torch.ones_like(y)
    if act == "tanh":
        return 1 - y * y
    if act == "sigmoid":
        return y * (1 - y)
    if act == "gelu":
        zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        cdf = 0.5 * (1 + torch.erf(zf * _INV_SQRT2))
        pdf = torch.exp(-0.5 * zf * zf) * _INV_SQRT2PI
        return (cdf + zf * pdf).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu_tanh":  # torch's gelu_backward(approximate="tanh") formula
        zf = _up(z)
        t = torch.tanh(_SQRT_2_OVER_PI * (zf + 0.044715 * zf * zf * zf))
        d = 0.5 * (1 + t) + 0.5 * zf * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * zf * zf)
        return d.to(z.dtype)
    raise ValueError(f"unknown activation {act!r}")


def energy_of(y: torch.Tensor, p: int, scale: float) -> torch.Tensor:
    G = y.shape[0]
    edt = energy_dtype(y.dtype)
    if p == 0:
        return torch.zeros(G, dtype=edt, device=y.device)
    yf = y.to(edt).reshape(G, math.prod(y.shape[1:]))  # not -1: an empty batch has no size to infer
    if p == 2:
        return (yf * yf).sum(1) * scale
    return yf.abs().sum(1) * scale


def energy_grad_term(y: torch.Tensor, ge: torch.Tensor, p: int, scale: float) -> torch.Tensor:
    """ge[g] * scale * d|y|^p / dy, broadcast over [G, M, N]."""
    c = (ge.to(y.dtype) * scale).view(-1, 1, 1)
    if p == 2:
        return 2 * c * y
    return c * torch.sign(y)


def act_forward(z, act, p, scale, keep_z):
    y = apply_act(_up(z), act).to(z.dtype)
    e = energy_of(y, p, scale)
    return y, (z if keep_z else z.new_empty(0)), e


def act_backward(gy, ge, y, z, act, p, scale):
    yu = _up(y)
    g = _up(gy) if p == 0 else _up(gy) + energy_grad_term(yu, ge, p, scale)
    if act == "relu":  # a select, as torch's threshold_backward: NaN outputs pass g, NaN g at y <= 0 gives 0
        return torch.where(yu <= 0, torch.zeros_like(g), g).to(gy.dtype)
    return (g * act_grad(yu, _up(z) if z.numel() else z, act)).to(gy.dtype)


def linear_forward(x, w, b, act, p, scale, keep_z):
    # half/bfloat16: the maths runs in float32 (as the kernels' accumulators do); outputs are cast back
    z = torch.bmm(_up(x), _up(w).transpose(1, 2))
    if b is not None:
        z = z + _up(b).unsqueeze(1)
    z = z.to(x.dtype)
    return act_forward(z, act, p, scale, keep_z)


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    dt = gy.dtype
    gz = _up(act_backward(gy, ge, y, z, act, p, scale))
    empty = gy.new_empty(0)
    gx = torch.bmm(gz, _up(w)).to(dt) if need_x else empty
    gw = torch.bmm(gz.transpose(1, 2), _up(x)).to(dt) if need_w else empty
    gb = gz.sum(1).to(dt) if need_b else empty
    return gx, gw, gb


def available(device: torch.device):
    return True, "plain PyTorch ops run on every device"
