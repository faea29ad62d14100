"""Kernel backends of the fused energy operators.

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
activations whose derivative needs ``z`` (gelu, silu).
"""

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")
# activations whose derivative cannot be written in terms of the output y alone
NEEDS_Z = frozenset({"gelu", "silu"})
# the integer codes the compiled kernels (csrc/) use for the activations
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5}


def source_dir():
    """The directory holding the C++/CUDA sources (a checkout's csrc/ or the installed package data)."""
    from pathlib import Path

    import minaction._csrc as csrc

    return Path(csrc.__file__).parent


def energy_dtype(dtype):
    import torch

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def register_primitive_fakes(lib: str) -> None:
    """Fake (meta) kernels for a compiled backend's ``lib::{linear_fwd,linear_bwd,act_fwd,act_bwd}``
    ops, whose schemas follow the contract above, so ``torch.compile`` can trace them."""
    import torch

    @torch.library.register_fake(f"{lib}::linear_fwd")
    def _(x, w, b, act, p, scale, keep_z):
        G, M, _ = x.shape
        N = w.shape[1]
        z = x.new_empty((G, M, N)) if keep_z else x.new_empty(0)
        return x.new_empty((G, M, N)), z, x.new_empty((G,), dtype=energy_dtype(x.dtype))

    @torch.library.register_fake(f"{lib}::linear_bwd")
    def _(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
        return (x.new_empty(x.shape) if need_x else gy.new_empty(0), w.new_empty(w.shape) if need_w else gy.new_empty(0),
                gy.new_empty((w.shape[0], w.shape[1])) if need_b else gy.new_empty(0))

    @torch.library.register_fake(f"{lib}::act_fwd")
    def _(z, act, p, scale, keep_z):
        return (z.new_empty(z.shape), z.new_empty(z.shape) if keep_z else z.new_empty(0),
                z.new_empty((z.shape[0],), dtype=energy_dtype(z.dtype)))

    @torch.library.register_fake(f"{lib}::act_bwd")
    def _(gy, ge, y, z, act, p, scale):
        return gy.new_empty(gy.shape)
