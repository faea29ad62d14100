"""FLOP formulas of the ``minaction::`` ops for ``torch.utils.flop_counter.FlopCounterMode``.

Without them FlopCounterMode counts nothing for a fused layer (it skips ops it has no formula
for), so a model of energy layers would read as ~10x cheaper than the same ``nn.Linear`` /
``nn.Conv2d`` model. The formulas count what torch's own count for the plain layers: the
matrix products and convolutions, ``2 * multiply-adds``, not the bias, the activation or the
energy's reduction; a backward counts the input and weight gradients it computes.

``torch.utils.flop_counter`` imports triton (~0.2 s), so importing minaction does not import it:
the formulas are registered at once when it is already loaded, and otherwise right after its
import (a one-shot import hook).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys

import torch

_MODULE = "torch.utils.flop_counter"


def _linear(x_shape, w_shape):
    """``x [..., K] @ w[..., N, K]^T``: every row of x times N columns (a grouped x holds G*M rows)."""
    return 2 * math.prod(x_shape) * w_shape[-2]


def _fwd(x_shape, w_shape, *args, out_shape=None, **kwargs):
    return _linear(x_shape, w_shape)


def _bwd_plain(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b, out_shape=None, **kwargs):
    return _linear(x, w) * (bool(need_x) + bool(need_w))


def _bwd_routed(gy, ge, x, w, y, z, act, p, mean, need_x, need_w, need_b, backend, out_shape=None, **kwargs):
    return _linear(x, w) * (bool(need_x) + bool(need_w))


def _conv_pool2(x_shape, w_shape, *args, out_shape=None, **kwargs):
    """One input channel, k x k, padding k // 2, stride 1: the convolution's output is H x W."""
    return 2 * x_shape[0] * math.prod(x_shape[2:]) * math.prod(w_shape)


def _conv_pool2_bwd(gy_shape, ge_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    return _conv_pool2(x_shape, w_shape)  # the weight gradient only: x never requires one on this path


def register(fc) -> None:
    """Register the formulas with the module ``fc`` (``torch.utils.flop_counter``); idempotent."""
    ops = torch.ops.minaction
    if ops.layer in fc.flop_registry:
        return
    fc.register_flop_formula([ops.layer, ops.linear_fwd, ops.energy_linear])(_fwd)
    fc.register_flop_formula([ops.linear_bwd])(_bwd_plain)
    fc.register_flop_formula([ops.energy_linear_backward])(_bwd_routed)
    fc.register_flop_formula([ops.conv_pool2, ops.conv_pool2_fwd])(_conv_pool2)
    fc.register_flop_formula([ops.conv_pool2_bwd])(_conv_pool2_bwd)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register`` once ``torch.utils.flop_counter`` has been executed, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register(module)
        except Exception:  # never break torch's import over a FLOP count
            pass


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


def install() -> None:
    """Register now if ``torch.utils.flop_counter`` is loaded, else when it is imported."""
    fc = sys.modules.get(_MODULE)
    if fc is not None:
        register(fc)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
