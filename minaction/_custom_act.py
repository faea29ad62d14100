"""What a custom activation module computes, read from its ``forward()`` (for ``convert`` and
``EnergyActivation``).

Libraries ship their own activation classes: timm's ``GELU`` (``F.gelu(x)``), transformers'
``GELUActivation`` / ``NewGELUActivation`` / ``FastGELUActivation`` / ``SiLUActivation``, minGPT's
``NewGELU`` (GELU's tanh approximation written out). They hold no parameters and compute an
elementwise function of their input, which is all the fused kernels need to know.

:func:`read_activation` decides that in two steps:

1. **Structure**: the module has no parameters or buffers, every submodule is a parameterless
   torch activation module, and its ``forward()``, traced with ``torch.fx`` in train and in eval
   mode, consists only of elementwise, deterministic, out-of-place ops (arithmetic, ``tanh``,
   ``erf``, ``sigmoid``, ``F.gelu``, ...) on its one input and Python numbers. Such a forward is a
   fixed function ``f`` applied to each element: no shapes, no state, no random numbers.
2. **Values**: ``f`` is evaluated in float64 on 8,007 points over [-20, 20] and at ±50, ±100,
   ±1e4, and compared with each fused activation (relu, gelu, gelu_tanh, silu, tanh, sigmoid).
   A match within ``rtol=1e-6`` (float32 rounding is ~6e-8) names that activation; a forward
   that is elementwise but matches none (``QuickGELU``'s ``x·σ(1.702x)``) is ``"elementwise"``:
   ``EnergyActivation`` applies such a module as it is and takes the energy with plain ops.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

FUSED = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
ELEMENTWISE = "elementwise"

# the elementwise, deterministic ops a custom activation's forward may consist of
_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos, operator.pow,
    operator.gt, operator.ge, operator.lt, operator.le,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.neg, torch.pow, torch.square,
    torch.reciprocal, torch.tanh, torch.erf, torch.erfc, torch.sigmoid, torch.exp, torch.expm1, torch.log1p,
    torch.sqrt, torch.rsqrt, torch.abs, torch.sign, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
    torch.minimum, torch.maximum, torch.where, torch.relu, torch.special.expit, torch.special.erf,
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.softplus, F.mish, F.elu, F.selu, F.celu, F.leaky_relu,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.relu6, F.softsign, F.logsigmoid, F.tanhshrink,
})
_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "square", "reciprocal", "tanh", "erf", "erfc", "sigmoid", "exp",
    "expm1", "log1p", "sqrt", "rsqrt", "abs", "sign", "clamp", "clip", "clamp_min", "clamp_max", "relu",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
    "__pow__",
})
# torch's activation modules that may sit inside a custom one (parameterless, elementwise, deterministic)
_SUBMODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU,
               nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
               nn.Tanhshrink, nn.LogSigmoid)
_REFERENCES = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid,
}
_CONSTANT_TYPES = (int, float, bool, str, type(None))


def _is_custom(mod: nn.Module) -> bool:
    top = type(mod).__module__.split(".")[0]
    return top not in ("torch", "minaction")


def _elementwise_graph(graph: fx.Graph, module: nn.Module) -> bool:
    """Whether ``graph`` applies only elementwise, deterministic, out-of-place ops to its first input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders or any(n.users for n in placeholders[1:]):
        return False
    ops = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            return False  # a tensor constant or buffer: not a function of the input alone
        if node.op == "call_function":
            if node.target not in _FUNCTIONS:
                return False
        elif node.op == "call_method":
            if node.target not in _METHODS:
                return False
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            if not isinstance(sub, _SUBMODULES) or getattr(sub, "inplace", False):
                return False
        else:
            return False
        if node.kwargs.get("inplace") or "out" in node.kwargs:
            return False
        if node.target in (F.relu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh,
                           F.relu6) and any(a is True for a in node.args[1:]):
            return False  # an inplace flag given by position
        flat: list = []
        fx.node.map_aggregate((node.args, tuple(node.kwargs.values())), flat.append)
        if any(not isinstance(a, (fx.Node,) + _CONSTANT_TYPES) for a in flat):
            return False
        ops += 1
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0] if out.args else None
    return ops > 0 and isinstance(result, fx.Node) and result.op != "placeholder"


def _points() -> torch.Tensor:
    return torch.cat([torch.linspace(-20.0, 20.0, 8001, dtype=torch.float64),
                      torch.tensor([-1e4, -100.0, -50.0, 50.0, 100.0, 1e4], dtype=torch.float64)])


def _probe(mod: nn.Module) -> Optional[torch.Tensor]:
    from ._fx_pairs import _restore, _snapshot

    x = _points()
    keep = x.clone()
    saved = _snapshot(mod)
    try:
        with torch.no_grad():
            y = mod.forward(x)  # not mod(x): the model's hooks are not the probe's business
    except Exception:  # noqa: BLE001 - a module that cannot run on a float64 vector is not read
        return None
    finally:
        _restore(saved)  # a forward that counts its calls or keeps its input counts nothing here
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != torch.float64 or not torch.equal(x, keep) \
            or not bool(torch.isfinite(y).all()):
        return None
    return y


def read_activation(mod: nn.Module) -> Optional[str]:
    """For a custom (not torch's, not minaction's) module: the fused activation it computes
    (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"tanh"``, ``"sigmoid"``), ``"elementwise"``
    for another elementwise function of its input, or None (not custom, or not such a function, or
    not readable). Within ``convert`` (``_fx_pairs.cached_traces``) each module is read once."""
    if not isinstance(mod, nn.Module) or not _is_custom(mod):
        return None
    from ._fx_pairs import _CACHES

    cache = _CACHES[-1] if _CACHES else None
    key = ("activation", id(mod))
    if cache is not None and key in cache and cache[key][0] is mod:
        return cache[key][1]
    result = _read(mod)
    if cache is not None:
        cache[key] = (mod, result)
    return result


def _read(mod: nn.Module) -> Optional[str]:
    from ._fx_pairs import _trace

    if next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
        return None
    if any(not isinstance(sub, _SUBMODULES) for sub in mod.children()):
        return None
    try:
        graphs = (_trace(mod), _trace(mod, flip=True))
    except Exception:  # noqa: BLE001 - a forward fx cannot read is not read
        return None
    if not all(_elementwise_graph(g, mod) for g in graphs):
        return None
    y = _probe(mod)
    modes = [(m, m.training) for m in mod.modules()]
    mod.train(not mod.training)
    try:
        y_other = _probe(mod)
    finally:
        for m, training in modes:  # each as it was (a child may be in another mode than its parent)
            m.training = training
    if y is None or y_other is None or not torch.equal(y, y_other):
        return None  # not the same function in train and in eval mode
    x = _points()
    for name, ref in _REFERENCES.items():
        if torch.allclose(y, ref(x), rtol=1e-6, atol=1e-9):
            return name
    return ELEMENTWISE


def describe(mod: nn.Module, act: str) -> str:
    """A report's words for a custom module read as ``act``."""
    if act == ELEMENTWISE:
        return (f"{type(mod).__name__}'s forward() is an elementwise function of its input (read with torch.fx) that "
                "the fused kernels do not have")
    return f"{type(mod).__name__} computes {act} (its forward() read with torch.fx, its values checked in float64)"
