"""Triton kernels of the fused energy operators, and their plain-Python launchers.

Three kernels, all over "grouped" tensors (``G`` independent models; program-id axis 1
or 2 walks the groups, so the batched N-models form is native):

``linear_fwd_kernel``
    ``z = x[g] @ w[g]^T + b[g]`` as a tiled ``tl.dot`` matmul whose epilogue applies the
    activation, stores ``y`` (and ``z`` only when ``KEEP_Z``: gelu/silu/gelu_tanh need it for the
    backward) and writes the tile's partial sum of ``|y|^p`` to ``part[g, tile]``. The
    launcher sums ``part`` over tiles in a fixed order (``torch.sum`` over a fixed-shape
    buffer), so the energy is bitwise deterministic run to run.
``act_fwd_kernel``
    The same epilogue over an existing pre-activation (conv outputs): 1-D blocks over the
    ``M * N`` values of each group.
``act_bwd_kernel``
    The fused backward elementwise pass ``gz = (gy + ge[g] * scale * d|y|^p/dy) * act'``,
    optionally writing per-row-tile column sums of ``gz`` (the bias gradient) to a
    ``[G, tiles_m, N]`` buffer that the launcher sums in a fixed order.

The backward matrix products (``gx = gz @ w``, ``gw = gz^T @ x``) are ``torch.bmm``
(cuBLAS on a GPU), see ``docs/kernels.md``.

Activation codes (constexpr ``ACT``, ``minaction.backends.ACT_CODES``): 0 identity, 1 relu,
2 gelu (erf), 3 silu, 4 tanh, 5 sigmoid, 6 gelu_tanh (gelu's tanh approximation). NaN and Inf
behave exactly as in torch, forward and backward (``relu(nan) = nan``; relu's backward is a
select on the output like torch's ``threshold_backward``; see ``_act_bwd`` and
``tests/backends/test_gpu_nan.py``). ``P``: 0 no energy, 1 L1, 2 L2. Arithmetic is float32 (float64 for float64
inputs); outputs are rounded to the input dtype and the energy is computed from the
rounded ``y`` like the reference backend does.

On a GPU the matmul tile sizes are autotuned (``triton.autotune``; set
``MINACTION_TRITON_AUTOTUNE=0`` for a size heuristic instead, e.g. in tests); under
``TRITON_INTERPRET=1`` exactly one configuration runs (``INTERPRET_BLOCKS``, large tiles
so the interpreter stays fast; tests may change it to exercise multi-tile masking).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the activation codes and the energy dtype have one home, shared with the C++ and CUDA kernels
from minaction.backends import ACT_CODES, energy_dtype as _energy_dtype  # noqa: F401

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# tile sizes used under the interpreter (one configuration; no autotuning there)
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_EW_M": 64, "BLOCK_EW_N": 64,
                    "BLOCK_1D": 4096}


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) for a float32/float64 block; NaN propagates as in torch (relu(nan) = nan)."""
    if ACT == 1:
        # not `z > 0 ? z : 0`, which maps NaN to 0 and hides a diverged model
        y = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = z * tl.sigmoid(z)
    elif ACT == 4:
        # tanh via exp(-2|z|): exact sign, no overflow; below |z| = 1/16, where 1 - exp(-2|z|) cancels (all of
        # tanh(1e-8) in float32), its odd Taylor series to z^11 (relative error < 1e-17 there; keeps -0.0)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        z2 = z * z
        s = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
            -0.05396825396825397 + z2 * (0.021869488536155203 + z2 * -0.008863235529902197)))))
        y = tl.where(tl.abs(z) < 0.0625, s, tl.where(z < 0, -t, t))
    elif ACT == 5:
        y = tl.sigmoid(z)
    elif ACT == 6:
        # gelu(z, approximate="tanh") = z/2 (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        y = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        y = z
    return y


@triton.jit
def _act_grad(y, z, ACT: tl.constexpr):
    """d act / d z from the output y (gelu and silu read z); relu and identity: see _act_bwd."""
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = cdf + z * pdf
    elif ACT == 3:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        d = 1.0 - y * y
    elif ACT == 6:
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        d = s + z * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    else:
        d = y * (1.0 - y)
    return d


@triton.jit
def _act_bwd(g, y, z, ACT: tl.constexpr):
    """gz from the gradient g of the output, with torch's NaN/Inf semantics.

    relu is torch's threshold_backward, a select on the output: ``y <= 0 -> 0`` else ``g``
    (a NaN output passes g through; a NaN g where y <= 0 gives 0). identity passes g
    unchanged (``g * (y * 0 + 1)`` would be NaN where y is +-inf). The others multiply by
    the derivative like torch's formulas (NaN at gelu/silu's +-inf, as in torch).
    """
    if ACT == 1:
        gz = tl.where(y <= 0, 0.0, g)
    elif ACT == 0:
        gz = g
    else:
        gz = g * _act_grad(y, z, ACT)
    return gz


@triton.jit
def _energy_partial(ye, mask, P: tl.constexpr):
    """sum of |y|^p over the valid entries of a block (ye already in the energy dtype)."""
    ye = tl.where(mask, ye, 0.0)
    if P == 2:
        s = tl.sum(ye * ye)
    else:
        s = tl.sum(tl.abs(ye))
    return s


# ----------------------------------------------------------------------------- forward: matmul + epilogue
@triton.jit
def linear_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, part_ptr,
                      M, N, K,
                      stride_xg, stride_xm, stride_xk,
                      stride_wg, stride_wn, stride_wk,
                      stride_bg,
                      stride_yg, stride_ym, M_BUCKET,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, P: tl.constexpr, KEEP_Z: tl.constexpr,
                      ALLOW_TF32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y[g] = act(x[g] @ w[g]^T + b[g]) plus its energy partial.

    Grid: (tiles_m * tiles_n, G). Tiles are visited in GROUP_M-row super-groups so that
    neighbouring programs share rows of x and columns of w in L2. ``part`` is
    [G, tiles_m * tiles_n], contiguous, in the energy dtype. y and z share strides. ``M_BUCKET``
    (M rounded up to a power of two) is read only by the autotuner's key.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    grp = pid // per_group
    first_m = grp * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)  # 64-bit row offsets: [M, N] or [M, K] may exceed 2**31 elements
    x_base = x_ptr + g * stride_xg + rm64[:, None] * stride_xm
    w_base = w_ptr + g * stride_wg + rn.to(tl.int64)[None, :] * stride_wn
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = x_base + rk[None, :] * stride_xk
    b_ptrs = w_base + rk[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        bt = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk
        if ALLOW_TF32:
            acc = tl.dot(a, bt, acc, input_precision="tf32", out_dtype=acc.dtype)
        else:
            acc = tl.dot(a, bt, acc, input_precision="ieee", out_dtype=acc.dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + g * stride_bg + rn, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    out_off = g * stride_yg + rm64[:, None] * stride_ym + rn[None, :]
    y = _act(acc, ACT)
    yo = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + out_off, yo, mask=mask)
    if KEEP_Z:
        tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if P != 0:
        s = _energy_partial(yo.to(part_ptr.dtype.element_ty), mask, P)
        tl.store(part_ptr + g * (num_m * num_n) + pid, s)


# ----------------------------------------------------------------------------- forward: activation + energy only
@triton.jit
def act_fwd_kernel(z_ptr, y_ptr, part_ptr, L,
                   ACT: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(z) over the L = M*N contiguous values of group g, and per-block energy partials.

    Grid: (cdiv(L, BLOCK), G); ``part`` is [G, cdiv(L, BLOCK)].
    """
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    # 64-bit offsets: one group's L = M*N may pass 2**31 values (a large conv output)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    base = g * L
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0)
    if z_ptr.dtype.element_ty == tl.float64:
        zf = z.to(tl.float64)
    else:
        zf = z.to(tl.float32)
    yo = _act(zf, ACT).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + base + offs, yo, mask=mask)
    if P != 0:
        s = _energy_partial(yo.to(part_ptr.dtype.element_ty), mask, P)
        tl.store(part_ptr + g * tl.num_programs(0) + pid, s)


# ----------------------------------------------------------------------------- backward elementwise pass
@triton.jit
def act_bwd_kernel(gy_ptr, ge_ptr, y_ptr, z_ptr, gz_ptr, gb_ptr, scale,
                   M, N,
                   ACT: tl.constexpr, P: tl.constexpr, NEED_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """gz = (gy + ge[g]*scale*d|y|^p/dy) * act'(y, z) on a [BLOCK_M, BLOCK_N] tile of [G, M, N].

    All of gy, y, z, gz are contiguous [G, M, N] (z is read only for gelu/silu/gelu_tanh). With
    NEED_B the tile's column sums of gz go to gb[g, pid_m, :] ([G, tiles_m, N]).
    Grid: (tiles_m, tiles_n, G): the row tiles on axis 0, the only one a GPU lets pass 65535
    programs (flattened [B, T, K] inputs reach millions of rows).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    mask = (rm[:, None] < M) & mask_n[None, :]
    off = g * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    y_raw = tl.load(y_ptr + off, mask=mask, other=0.0)
    if y_ptr.dtype.element_ty == tl.float64:
        cdt = tl.float64
    else:
        cdt = tl.float32
    y = y_raw.to(cdt)
    g_out = tl.load(gy_ptr + off, mask=mask, other=0.0).to(cdt)
    if P != 0:
        c = tl.load(ge_ptr + g).to(cdt) * scale
        if P == 2:
            g_out += 2.0 * c * y
        else:
            # torch.sign(nan) == 0: the l1 term adds nothing at a NaN output (torch's abs backward)
            sgn = tl.where(y > 0, 1.0, tl.where(y < 0, -1.0, 0.0)).to(cdt)
            g_out += c * sgn
    if ACT == 2 or ACT == 3 or ACT == 6:
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(cdt)
    else:
        z = y
    gz = _act_bwd(g_out, y, z, ACT)
    gz = tl.where(mask, gz, 0.0)
    gzo = gz.to(gz_ptr.dtype.element_ty)
    tl.store(gz_ptr + off, gzo, mask=mask)
    if NEED_B:
        # column sums of the rounded gz, like the reference's gz.sum(1)
        col = tl.sum(gzo.to(gb_ptr.dtype.element_ty), axis=0)
        tl.store(gb_ptr + (g * tl.num_programs(0) + pid_m) * N + rn, col, mask=mask_n)


# ----------------------------------------------------------------------------- autotuning (GPU only)
def _mm_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 64, 4, 4),
        (32, 32, 64, 4, 3), (128, 128, 32, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def autotune_enabled() -> bool:
    """``MINACTION_TRITON_AUTOTUNE=0`` replaces autotuning by a size heuristic (fast first calls)."""
    return os.environ.get("MINACTION_TRITON_AUTOTUNE", "1") not in ("0", "false", "no")


def heuristic_blocks(M, N, K, dtype):
    """One reasonable GPU tile configuration without tuning: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm = 128 if M >= 128 else max(32, triton.next_power_of_2(M))
    bn = 128 if N >= 128 else max(32, triton.next_power_of_2(N))
    bk = 32 if dtype == torch.float32 else 64
    warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, warps, 3


if not INTERPRET:
    _linear_fwd_tuned = triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K", "ACT", "P", "KEEP_Z"])(
        linear_fwd_kernel)
else:  # pragma: no cover - autotuning needs a GPU driver
    _linear_fwd_tuned = None


# ----------------------------------------------------------------------------- launchers
def m_bucket(M: int) -> int:
    """The autotuner's key for the row count: M rounded up to a power of two, so that a new batch
    size, the last partial batch or an evaluation batch reuses a tuned configuration instead of
    benchmarking all of them again (~1-2 s per layer and size)."""
    return triton.next_power_of_2(max(int(M), 1))


def tf32_matmul() -> bool:
    """Whether float32 matmuls may use TF32, as cuBLAS decides it. Read through torch's newer
    ``fp32_precision`` (which also reflects the legacy setters): reading the legacy
    ``matmul.allow_tf32`` raises once a program has set the new one (torch >= 2.9)."""
    m = torch.backends.cuda.matmul
    try:
        prec = getattr(m, "fp32_precision", None)
        if prec is not None:
            return prec == "tf32"
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


def _finish_energy(part, p, scale, G, device, edt):
    if p == 0:
        return torch.zeros(G, dtype=edt, device=device)
    return part.sum(1) * scale  # fixed-order reduction over a fixed-shape buffer: deterministic


def linear_forward(x, w, b, act, p, scale, keep_z):
    """Grouped fused forward. x [G,M,K], w [G,N,K], b [G,N] or None -> y, z|empty, e [G]."""
    G, M, K = x.shape
    N = w.shape[1]
    edt = _energy_dtype(x.dtype)
    y = torch.empty((G, M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((G, M, N), dtype=x.dtype, device=x.device) if keep_z else x.new_empty(0)
    if y.numel() == 0:
        return y, z, torch.zeros(G, dtype=edt, device=x.device)
    allow_tf32 = bool(x.dtype == torch.float32 and x.is_cuda and tf32_matmul())
    common = dict(HAS_BIAS=b is not None, ACT=ACT_CODES[act], P=p, KEEP_Z=keep_z, ALLOW_TF32=allow_tf32)
    args = [x, w, b if b is not None else y, y, z if keep_z else y]
    strides = [M, N, K, x.stride(0), x.stride(1), x.stride(2), w.stride(0), w.stride(1), w.stride(2),
               b.stride(0) if b is not None else 0, y.stride(0), y.stride(1), m_bucket(M)]
    if INTERPRET or _linear_fwd_tuned is None:
        bm, bn, bk = INTERPRET_BLOCKS["BLOCK_M"], INTERPRET_BLOCKS["BLOCK_N"], INTERPRET_BLOCKS["BLOCK_K"]
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        part = torch.empty((G, tiles), dtype=edt, device=x.device)
        linear_fwd_kernel[(tiles, G)](*args, part, *strides, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                      GROUP_M=8)
    elif not autotune_enabled():
        bm, bn, bk, warps, stages = heuristic_blocks(M, N, K, x.dtype)
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        part = torch.empty((G, tiles), dtype=edt, device=x.device)
        linear_fwd_kernel[(tiles, G)](*args, part, *strides, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                      GROUP_M=8, num_warps=warps, num_stages=stages)
    else:
        # the partial buffer is sized for the smallest tile of any config, then trimmed to the
        # tuned config's tile count (unused tail entries stay zero)
        holder = {}

        def grid(meta):
            t = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
            holder["tiles"] = t
            return (t, G)

        max_tiles = triton.cdiv(M, 32) * triton.cdiv(N, 32)
        part = torch.zeros((G, max_tiles), dtype=edt, device=x.device)
        _linear_fwd_tuned[grid](*args, part, *strides, **common)
        # the kernel indexes part as [G, tiles] contiguous: view that prefix
        part = part.view(-1)[: G * holder["tiles"]].view(G, holder["tiles"])
    return y, z, _finish_energy(part, p, scale, G, x.device, edt)


def act_forward(z, act, p, scale, keep_z):
    """Grouped activation + energy. z [G,M,N] contiguous -> y, z|empty, e [G]."""
    z = z.contiguous()
    G = z.shape[0]
    L = z[0].numel() if G else 0
    edt = _energy_dtype(z.dtype)
    y = torch.empty_like(z)
    zs = z if keep_z else z.new_empty(0)
    if y.numel() == 0:
        return y, zs, torch.zeros(G, dtype=edt, device=z.device)
    block = INTERPRET_BLOCKS["BLOCK_1D"] if INTERPRET else 2048
    nb = triton.cdiv(L, block)
    part = torch.empty((G, nb), dtype=edt, device=z.device)
    act_fwd_kernel[(nb, G)](z, y, part, L, ACT=ACT_CODES[act], P=p, BLOCK=block)
    return y, zs, _finish_energy(part, p, scale, G, z.device, edt)


def _ew_blocks(M, N):
    if INTERPRET:
        return INTERPRET_BLOCKS["BLOCK_EW_M"], INTERPRET_BLOCKS["BLOCK_EW_N"]
    bn = min(128, triton.next_power_of_2(max(N, 16)))
    return 64, bn


def act_backward(gy, ge, y, z, act, p, scale, need_b=False):
    """gz = (gy + ge*scale*d|y|^p/dy) * act'; with need_b also the bias gradient gz.sum(1).

    Returns gz (and gb [G, N] when need_b).
    """
    gy = gy.contiguous()
    y = y.contiguous()
    G, M, N = y.shape
    gz = torch.empty_like(y)
    edt = _energy_dtype(y.dtype)
    zz = z.contiguous() if z.numel() else y
    if gz.numel() == 0:
        gb = torch.zeros((G, N), dtype=y.dtype, device=y.device)
        return (gz, gb) if need_b else gz
    bm, bn = _ew_blocks(M, N)
    tm, tn = triton.cdiv(M, bm), triton.cdiv(N, bn)
    gbp = torch.empty((G, tm, N), dtype=edt, device=y.device) if need_b else y
    ge_t = ge.contiguous() if ge.numel() else torch.zeros(G, dtype=edt, device=y.device)
    act_bwd_kernel[(tm, tn, G)](gy, ge_t, y, zz, gz, gbp, float(scale), M, N,
                                ACT=ACT_CODES[act], P=p, NEED_B=need_b, BLOCK_M=bm, BLOCK_N=bn)
    if need_b:
        return gz, gbp.sum(1).to(y.dtype)
    return gz


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    """Fused elementwise pass (+ bias column sums), then the two matrix products (torch.bmm)."""
    empty = gy.new_empty(0)
    if need_b:
        gz, gb = act_backward(gy, ge, y, z, act, p, scale, need_b=True)
    else:
        gz, gb = act_backward(gy, ge, y, z, act, p, scale), empty
    gx = torch.bmm(gz, w) if need_x else empty
    gw = torch.bmm(gz.transpose(1, 2), x) if need_w else empty
    return gx, gw, gb
