"""The ``minaction::`` operator namespace: every schema, declared once, with its fake kernel.

Implementations are registered per dispatch key elsewhere (see docs/kernels.md, "Adding an op
or a backend"):

====================================  ===============================================================
op                                    implementations
====================================  ===============================================================
``linear_fwd`` ``linear_bwd``         the backend primitives on grouped 3-D tensors (contract in
``act_fwd`` ``act_bwd``               ``minaction/backends/__init__.py``): ``CPU`` in
                                      ``csrc/energy_cpu.cpp`` (whose linear ones also take the
                                      plain 2-D layer, G omitted), ``CUDA`` in ``csrc/energy_cuda.cpp``
``layer``                             the whole layer, plain ``[M,K]`` or grouped ``[G,M,K]``: one
                                      call per direction. ``Autograd`` (a C++ autograd formula) and
                                      ``CompositeExplicitAutograd`` in ``csrc/energy_cpu.cpp``; the
                                      ``cpu`` backend's path from ``EnergyLinear.forward``
``epilogue``                          ``activation_energy``'s ``cpu`` path (the epilogue after a
                                      convolution), ``z [B, ...]`` or, with ``groups=G``,
                                      ``[G, B, ...]``: one call per direction; ``Autograd`` and
                                      ``CompositeExplicitAutograd`` in ``csrc/energy_cpu.cpp``
``maxpool2_fwd`` ``maxpool2_bwd``     max-pool by 2 over the last 1 or 2 dims (``F.max_pool1d/2d(x, 2)``
``max_pool2``                         exactly) with uint8 window positions: ``CPU`` primitives, and the
                                      op with ``Autograd`` / ``CompositeExplicitAutograd`` in
                                      ``csrc/energy_cpu.cpp`` (``minaction.ops.max_pool2``)
``act_pool2_fwd`` ``act_pool2_bwd``   the epilogue and ``max_pool2`` in one pass (float32/float64): the
``epilogue_pool2``                    ``CPU`` primitives, and the op with ``Autograd`` /
                                      ``CompositeExplicitAutograd`` in ``csrc/energy_cpu.cpp``
                                      (``minaction.ops.activation_energy_max_pool2``)
``conv_pool2_fwd`` ``conv_pool2_bwd``  the first block on images in one pass: conv2d of one input channel
``conv_pool2``                        (k x k, k <= 7, padding k // 2) + act + energy + max-pool by 2, float32/64:
                                      ``CPU`` primitives, ``Autograd`` / ``CompositeExplicitAutograd`` in
                                      ``csrc/energy_cpu.cpp`` (``EnergyConv2d.forward_max_pool2``)
``rate_spikes``                       rate-coded spikes equal to ``torch.rand(...) < p`` drawn from a CPU
                                      generator seeded with ``seed``: ``CPU`` in ``csrc/energy_cpu.cpp``
                                      (``minaction.data``'s spike datasets); ``rate_spike_counts``: the
                                      same spikes summed over time (their time mean, times T)
``unit_stats``                        activation statistics of ``y [G, ...]`` in one pass: per unit
                                      (``unit_dim``) the sum of ``|y|^p``, per member the non-zeros
                                      (float64): ``CPU`` in ``csrc/energy_cpu.cpp``
                                      (``minaction.models.stats``)
``energy_linear`` (+``_backward``)    the layer / epilogue routed by a ``backend`` name to that
``activation_energy`` (+``_backward``)  backend's Python primitives (``triton``, ``cuda``,
                                      ``composite``; ``cpu`` for the epilogue):
                                      ``CompositeExplicitAutograd`` and autograd formulas in
                                      ``minaction/ops/energy.py``
====================================  ===============================================================

Integer codes: ``act`` is :data:`minaction.backends.ACT_CODES`; ``p`` is 0 (no energy), 1 or 2.
The fakes below are the only statement of each op's output shapes (``torch.compile`` and
``torch.library.opcheck`` trace with them).
"""
from __future__ import annotations

import torch

from . import NEEDS_Z, energy_dtype

SCHEMAS = {
    # backend primitives (C++ per dispatch key)
    "linear_fwd": "linear_fwd(Tensor x, Tensor w, Tensor? b, int act, int p, float scale, bool keep_z) "
                  "-> (Tensor, Tensor, Tensor)",
    "linear_bwd": "linear_bwd(Tensor gy, Tensor ge, Tensor x, Tensor w, Tensor y, Tensor z, int act, int p, "
                  "float scale, bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)",
    "act_fwd": "act_fwd(Tensor z, int act, int p, float scale, bool keep_z) -> (Tensor, Tensor, Tensor)",
    "act_bwd": "act_bwd(Tensor gy, Tensor ge, Tensor y, Tensor z, int act, int p, float scale) -> Tensor",
    # the whole layer with a C++ autograd formula
    # (unit_scale: 1, or 1/N for energy_reduction "mean"; the op divides by its row count M itself)
    "layer": "layer(Tensor x, Tensor w, Tensor? b, int act, int p, float unit_scale, float penalty=0.) "
             "-> (Tensor, Tensor)",
    # activation_energy's epilogue with a C++ autograd formula: z [B, ...] (groups 0) or [G, B, ...]
    "epilogue": "epilogue(Tensor z, int act, int p, bool mean, int groups, float penalty=0.) -> (Tensor, Tensor)",
    # max-pool by 2 over the last 1 or 2 dims (the cnn's pooling), uint8 window positions
    "maxpool2_fwd": "maxpool2_fwd(Tensor x, int dims) -> (Tensor, Tensor)",
    "maxpool2_bwd": "maxpool2_bwd(Tensor gy, Tensor idx, SymInt[] in_size, int dims) -> Tensor",
    "max_pool2": "max_pool2(Tensor x, int dims) -> Tensor",
    # the epilogue and max_pool2 in one pass (the cnn's conv blocks): z as epilogue's, pooled over its last dims
    "act_pool2_fwd": "act_pool2_fwd(Tensor z, int act, int p, bool mean, int groups, int dims, bool keep_idx) "
                     "-> (Tensor, Tensor, Tensor)",
    "act_pool2_bwd": "act_pool2_bwd(Tensor gy, Tensor ge, Tensor z, int act, int p, bool mean, int groups, "
                     "int dims) -> Tensor",
    "epilogue_pool2": "epilogue_pool2(Tensor z, int act, int p, bool mean, int groups, int dims, "
                      "float penalty=0.) -> (Tensor, Tensor)",
    # the first image block (one input channel, k x k, padding k // 2): conv + act + energy + max-pool by 2
    "conv_pool2_fwd": "conv_pool2_fwd(Tensor x, Tensor w, Tensor? b, int act, int p, bool mean) -> (Tensor, Tensor)",
    "conv_pool2_bwd": "conv_pool2_bwd(Tensor gy, Tensor ge, Tensor x, Tensor w, Tensor? b, int act, int p, "
                      "bool mean) -> (Tensor, Tensor)",
    "conv_pool2": "conv_pool2(Tensor x, Tensor w, Tensor? b, int act, int p, bool mean, float penalty=0.) "
                  "-> (Tensor, Tensor)",
    # rate-coded spikes: torch.rand((B, T, ...), generator=manual_seed(seed)) < p, the same numbers, faster
    "rate_spikes": "rate_spikes(Tensor p, int seed, int T) -> Tensor",
    # the same spikes counted over time, [B, 1, ...]: rate_spikes(p, seed, T).sum(1, keepdim=True)
    "rate_spike_counts": "rate_spike_counts(Tensor p, int seed, int T) -> Tensor",
    # activation statistics of y [G, ...]: per unit (dim unit_dim) sum of |y|^p, per member the non-zeros (float64)
    "unit_stats": "unit_stats(Tensor y, int p, int unit_dim) -> (Tensor, Tensor)",
    # routed by backend name to Python primitives
    "energy_linear": "energy_linear(Tensor x, Tensor weight, Tensor? bias, str act, int p, bool mean, "
                     "str backend) -> (Tensor, Tensor, Tensor)",
    "energy_linear_backward": "energy_linear_backward(Tensor gy, Tensor ge, Tensor x, Tensor weight, Tensor y, "
                              "Tensor z, str act, int p, bool mean, bool need_x, bool need_w, bool need_b, "
                              "str backend) -> (Tensor, Tensor, Tensor)",
    "activation_energy": "activation_energy(Tensor z, str act, int p, bool mean, str backend) "
                         "-> (Tensor, Tensor, Tensor)",
    "activation_energy_backward": "activation_energy_backward(Tensor gy, Tensor ge, Tensor y, Tensor z, str act, "
                                  "int p, bool mean, str backend) -> Tensor",
}

lib = torch.library.Library("minaction", "DEF")  # "DEF": a second declaration of the namespace raises
for _schema in SCHEMAS.values():
    lib.define(_schema)


# ----------------------------------------------------------------------------- output shapes
def fwd_outputs(t, shape, keep_z):
    """Empty ``y`` of ``shape`` (``[G,M,N]``, or ``[M,N]`` for the plain layer), ``z`` (as ``y``
    if kept, else ``[0]``) and ``e`` (``[G]``, or 0-dim) like ``t``."""
    shape = tuple(shape)
    z = t.new_empty(shape) if keep_z else t.new_empty(0)
    return t.new_empty(shape), z, t.new_empty(shape[:-2], dtype=energy_dtype(t.dtype))


def linear_bwd_outputs(gy, x, w, need_x, need_w, need_b):
    """Empty ``gx`` (as ``x``), ``gw`` (as ``w``), ``gb`` (``[G,N]``, or ``[N]``); ``[0]`` for an unneeded one."""
    return (x.new_empty(x.shape) if need_x else gy.new_empty(0), w.new_empty(w.shape) if need_w else gy.new_empty(0),
            gy.new_empty(w.shape[:-1]) if need_b else gy.new_empty(0))


def _linear_shape(x, w):
    return tuple(x.shape[:-1]) + (w.shape[-2],)


# ----------------------------------------------------------------------------- fakes
@torch.library.register_fake("minaction::linear_fwd", lib=lib)
def _(x, w, b, act, p, scale, keep_z):
    return fwd_outputs(x, _linear_shape(x, w), keep_z)


@torch.library.register_fake("minaction::linear_bwd", lib=lib)
def _(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    return linear_bwd_outputs(gy, x, w, need_x, need_w, need_b)


@torch.library.register_fake("minaction::act_fwd", lib=lib)
def _(z, act, p, scale, keep_z):
    return fwd_outputs(z, z.shape, keep_z)


@torch.library.register_fake("minaction::act_bwd", lib=lib)
def _(gy, ge, y, z, act, p, scale):
    return gy.new_empty(gy.shape)


@torch.library.register_fake("minaction::layer", lib=lib)
def _(x, w, b, act, p, unit_scale, penalty=0.0):
    y, _, e = fwd_outputs(x, _linear_shape(x, w), False)
    return y, e


@torch.library.register_fake("minaction::epilogue", lib=lib)
def _(z, act, p, mean, groups, penalty=0.0):
    return z.new_empty(z.shape), z.new_empty((groups,) if groups else (), dtype=energy_dtype(z.dtype))


def _pooled(x, dims):
    return tuple(x.shape[:-dims]) + tuple(s // 2 for s in x.shape[-dims:])


@torch.library.register_fake("minaction::maxpool2_fwd", lib=lib)
def _(x, dims):
    return x.new_empty(_pooled(x, dims)), x.new_empty(_pooled(x, dims), dtype=torch.uint8)


@torch.library.register_fake("minaction::maxpool2_bwd", lib=lib)
def _(gy, idx, in_size, dims):
    return gy.new_empty(in_size)


@torch.library.register_fake("minaction::max_pool2", lib=lib)
def _(x, dims):
    return x.new_empty(_pooled(x, dims))


@torch.library.register_fake("minaction::act_pool2_fwd", lib=lib)
def _(z, act, p, mean, groups, dims, keep_idx):
    return (z.new_empty(_pooled(z, dims)), z.new_empty(_pooled(z, dims) if keep_idx else (0,), dtype=torch.uint8),
            z.new_empty((groups,) if groups else ()))


@torch.library.register_fake("minaction::act_pool2_bwd", lib=lib)
def _(gy, ge, z, act, p, mean, groups, dims):
    return z.new_empty(z.shape)


@torch.library.register_fake("minaction::epilogue_pool2", lib=lib)
def _(z, act, p, mean, groups, dims, penalty=0.0):
    return z.new_empty(_pooled(z, dims)), z.new_empty((groups,) if groups else ())


@torch.library.register_fake("minaction::conv_pool2_fwd", lib=lib)
def _(x, w, b, act, p, mean):
    return x.new_empty((x.shape[0], w.shape[0], x.shape[2] // 2, x.shape[3] // 2)), x.new_empty(())


@torch.library.register_fake("minaction::conv_pool2_bwd", lib=lib)
def _(gy, ge, x, w, b, act, p, mean):
    return w.new_empty(w.shape), (b.new_empty(b.shape) if b is not None else w.new_empty((0,)))


@torch.library.register_fake("minaction::conv_pool2", lib=lib)
def _(x, w, b, act, p, mean, penalty=0.0):
    return x.new_empty((x.shape[0], w.shape[0], x.shape[2] // 2, x.shape[3] // 2)), x.new_empty(())


@torch.library.register_fake("minaction::rate_spikes", lib=lib)
def _(p, seed, T):
    return p.new_empty((p.shape[0], T) + tuple(p.shape[1:]))


@torch.library.register_fake("minaction::rate_spike_counts", lib=lib)
def _(p, seed, T):
    return p.new_empty((p.shape[0], 1) + tuple(p.shape[1:]))


@torch.library.register_fake("minaction::unit_stats", lib=lib)
def _(y, p, unit_dim):
    return (y.new_empty((y.shape[0], y.shape[unit_dim]), dtype=torch.float64),
            y.new_empty((y.shape[0],), dtype=torch.float64))


@torch.library.register_fake("minaction::energy_linear", lib=lib)
def _(x, weight, bias, act, p, mean, backend):
    y, z, e = fwd_outputs(x, _linear_shape(x, weight), act in NEEDS_Z)
    return y, e, z


@torch.library.register_fake("minaction::energy_linear_backward", lib=lib)
def _(gy, ge, x, weight, y, z, act, p, mean, need_x, need_w, need_b, backend):
    return linear_bwd_outputs(gy, x, weight, need_x, need_w, need_b)


@torch.library.register_fake("minaction::activation_energy", lib=lib)
def _(z, act, p, mean, backend):
    y, zs, e = fwd_outputs(z, z.shape, False)  # no copy of z: the autograd formula saves the input itself
    return y, e, zs


@torch.library.register_fake("minaction::activation_energy_backward", lib=lib)
def _(gy, ge, y, z, act, p, mean, backend):
    return gy.new_empty(gy.shape)


# ----------------------------------------------------------------------------- FLOP counts
from . import flops as _flops  # noqa: E402

_flops.install()  # formulas for torch.utils.flop_counter.FlopCounterMode (see flops.py)
