"""Kernel backends of the fused energy operators, and the one home of what they share.

Here: the primitives' contract (below), the activation names and integer codes, the energy
dtype. Beside it: ``select.py`` (which backend runs, and loading one by name),
``library.py`` (every ``minaction::`` op schema, declared once, with its fake), ``loader.py``
(building/loading a C++ extension), and one module per backend (``composite``, ``cpu``,
``triton``, ``cuda``). ``kernels/`` (the Triton kernels) imports its constants from here.

Every backend implements the same four primitives on 3-D "grouped" tensors
(``G`` independent models, ``M`` rows each, ``K`` inputs, ``N`` outputs); the
un-batched layer is simply ``G == 1``. ``composite.py`` is the executable
specification in plain PyTorch ops; the compiled backends (``cpu`` = C++ in
``csrc/``, ``triton`` = ``kernels/``, ``cuda`` = ``csrc/*.cu``) must match it.

    linear_forward(x[G,M,K], w[G,N,K], b[G,N]|None, act, p, scale, keep_z)
        -> y[G,M,N], z[G,M,N] (or an empty tensor when not kept), e[G]
    linear_backward(gy[G,M,N], ge[G], x, w, y, z, act, p, scale,
                    need_x, need_w, need_b)
        -> gx[G,M,K]|empty, gw[G,N,K]|empty, gb[G,N]|empty
    act_forward(z[G,M,N], act, p, scale, keep_z) -> y, z|empty, e[G]
    act_backward(gy, ge, y, z, act, p, scale) -> gz[G,M,N]

with ``y = act(z)``, ``z = x @ w^T + b``, ``e[g] = scale * sum |y[g]|^p`` (``p`` in
{1, 2}; ``p == 0`` means no energy and ``e`` is zeros), and the backward
``gz = (gy + ge[g] * scale * d|y|^p/dy) * act'(z)``. ``e`` is float32 for
half/bfloat16 inputs and the input dtype otherwise. ``keep_z`` is true only for
activations whose derivative needs ``z`` (gelu, silu). The CPU kernels of ``linear_fwd`` /
``linear_bwd`` also take the plain layer with ``G`` omitted (``x [M,K]``, ``w [N,K]``, ``b [N]``
-> ``y [M,N]``, ``e`` 0-dim, ``gb [N]``): the ``layer`` op passes it so, without views.
"""

import torch

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity", "gelu_tanh")
# activations whose derivative cannot be written in terms of the output y alone
NEEDS_Z = frozenset({"gelu", "silu", "gelu_tanh"})
# the integer codes the compiled kernels (csrc/) use for the activations
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5, "gelu_tanh": 6}


def source_dir():
    """The directory holding the C++/CUDA sources (a checkout's csrc/ or the installed package data)."""
    from pathlib import Path

    import minaction._csrc as csrc

    return Path(csrc.__file__).parent


def energy_dtype(dtype):
    """The dtype of the energy for inputs of ``dtype``: float32 for half/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
