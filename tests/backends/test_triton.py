"""Triton backend against the plain-PyTorch specification.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors:
float64 (tight, plus gradcheck), float32 and float16. With a GPU the same tests run on
CUDA tensors and add bfloat16. The ahead-of-time compile test checks that every kernel
also builds for sm_90 and sm_80 with Triton's own compiler (no GPU needed).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import minaction
from minaction.backends import select as mb
from minaction.backends import ACTIVATIONS, NEEDS_Z, composite

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = mb.available("triton", DEV)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable on {DEV.type}: {_WHY}")

if _OK:
    from minaction.backends import triton as tb
    from minaction.kernels import energy_linear as K

GPU = DEV.type == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [torch.float64])
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (5e-2, 5e-2)}


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    a, b = a.double().cpu(), b.double().cpu()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert err <= atol * scale + rtol * scale, f"{what}: max error {err:.3e} (scale {scale:.3g}) for {dtype}"


def _inputs(G, M, K, N, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, M, K, generator=g, dtype=torch.float64)
    w = torch.randn(G, N, K, generator=g, dtype=torch.float64) / max(K, 1) ** 0.5
    b = torch.randn(G, N, generator=g, dtype=torch.float64) * 0.5 if bias else None
    gy = torch.randn(G, M, N, generator=g, dtype=torch.float64)
    ge = torch.randn(G, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(DEV, dtype)  # noqa: E731
    edt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return cast(x), cast(w), cast(b), cast(gy), ge.to(DEV, edt)


def _reference(x, w, b, gy, ge, act, p, scale):
    """The composite spec in float64 (the oracle for low-precision runs)."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    y, z, e = composite.linear_forward(up(x), up(w), up(b), act, p, scale, True)
    gx, gw, gb = composite.linear_backward(up(gy), up(ge), up(x), up(w), y, z, act, p, scale, True, True, b is not None)
    return y, z, e, gx, gw, gb


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0, 1, 2])
def test_primitives_float64_all_activations(act, p):
    dtype = torch.float32 if GPU else torch.float64
    x, w, b, gy, ge = _inputs(3, 70, 37, 67, dtype, seed=p)
    scale = 1.0 / 70
    keep = act in NEEDS_Z
    y, z, e = tb.linear_forward(x, w, b, act, p, scale, keep)
    ry, rz, re, rgx, rgw, rgb = _reference(x, w, b, gy, ge, act, p, scale)
    _close(y, ry, dtype, "y")
    _close(e, re, dtype, "energy")
    assert e.shape == (3,)
    if keep:
        _close(z, rz, dtype, "z")
    else:
        assert z.numel() == 0, "z must only be kept for gelu/silu"
    gx, gw, gb = tb.linear_backward(gy, ge, x, w, y, z, act, p, scale, True, True, True)
    _close(gx, rgx, dtype, "grad x")
    _close(gw, rgw, dtype, "grad w")
    _close(gb, rgb, dtype, "grad b")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 127, 5), (3, 127, 3, 1), (3, 33, 65, 127)])
def test_primitives_odd_shapes_and_dtypes(dtype, shape):
    G, M, K, N = shape
    x, w, b, gy, ge = _inputs(G, M, K, N, dtype, seed=M + N)
    scale = 1.0 / M
    for act, p in (("relu", 2), ("gelu", 1), ("tanh", 2)):
        keep = act in NEEDS_Z
        y, z, e = tb.linear_forward(x, w, b, act, p, scale, keep)
        assert y.dtype == dtype and e.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        ry, rz, re, rgx, rgw, rgb = _reference(x, w, b, gy, ge, act, p, scale)
        _close(y, ry, dtype, f"{act} y")
        _close(e, re, dtype, f"{act} energy")
        gx, gw, gb = tb.linear_backward(gy, ge, x, w, y, z, act, p, scale, True, True, True)
        _close(gx, rgx, dtype, f"{act} grad x")
        _close(gw, rgw, dtype, f"{act} grad w")
        _close(gb, rgb, dtype, f"{act} grad b")


def test_multi_tile_masking(monkeypatch):
    """Small tiles so that odd shapes span many partial tiles in every kernel."""
    if GPU:
        pytest.skip("tile sizes are autotuned on the GPU")
    for k_ in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_EW_M", "BLOCK_EW_N"):
        monkeypatch.setitem(K.INTERPRET_BLOCKS, k_, 16)
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "BLOCK_1D", 64)
    dtype = torch.float64
    x, w, b, gy, ge = _inputs(2, 37, 35, 33, dtype, seed=5)
    for act, p in (("silu", 2), ("relu", 1)):
        y, z, e = tb.linear_forward(x, w, b, act, p, 0.25, act in NEEDS_Z)
        ry, rz, re, rgx, rgw, rgb = _reference(x, w, b, gy, ge, act, p, 0.25)
        _close(y, ry, dtype, "y")
        _close(e, re, dtype, "energy")
        gx, gw, gb = tb.linear_backward(gy, ge, x, w, y, z, act, p, 0.25, True, True, True)
        _close(gb, rgb, dtype, "grad b")
        _close(gw, rgw, dtype, "grad w")
        ya, _, ea = tb.act_forward(rz.to(dtype), act, p, 0.25, False)
        _close(ya, ry, dtype, "act_forward y")
        _close(ea, re, dtype, "act_forward energy")


def test_no_bias_and_needs_input_grad():
    dtype = torch.float32
    x, w, _, gy, ge = _inputs(2, 20, 9, 11, dtype, bias=False)
    y, z, e = tb.linear_forward(x, w, None, "relu", 2, 0.5, False)
    ry, _, re, rgx, rgw, _ = _reference(x, w, None, gy, ge, "relu", 2, 0.5)
    _close(y, ry, dtype, "y")
    gx, gw, gb = tb.linear_backward(gy, ge, x, w, y, z, "relu", 2, 0.5, False, True, False)
    assert gx.numel() == 0 and gb.numel() == 0, "unneeded gradients must not be computed"
    _close(gw, rgw, dtype, "grad w")


@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_activation_primitives(act):
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    zin = torch.randn(3, 5, 41, generator=g).to(DEV, dtype)
    gy = torch.randn(3, 5, 41, generator=g).to(DEV, dtype)
    ge = torch.randn(3, generator=g).to(DEV, dtype)
    for p in (0, 1, 2):
        keep = act in NEEDS_Z
        y, zs, e = tb.act_forward(zin, act, p, 0.2, keep)
        ry, rzs, re = composite.act_forward(zin, act, p, 0.2, keep)
        _close(y, ry, dtype, "y")
        _close(e, re, dtype, "energy")
        assert zs.numel() == rzs.numel()
        gz = tb.act_backward(gy, ge, y, zs, act, p, 0.2)
        _close(gz, composite.act_backward(gy, ge, ry, rzs, act, p, 0.2), dtype, "grad z")


def test_energy_is_deterministic():
    x, w, b, _, _ = _inputs(2, 130, 70, 129, torch.float32, seed=3)
    e1 = tb.linear_forward(x, w, b, "relu", 2, 1.0, False)[2]
    e2 = tb.linear_forward(x, w, b, "relu", 2, 1.0, False)[2]
    assert torch.equal(e1, e2), "the two-stage energy reduction must be bitwise reproducible"


# ----------------------------------------------------------------------------- through the fused operator
@pytest.mark.parametrize("energy,reduction", [("l2", "sum"), ("l1", "mean"), (None, "sum")])
@pytest.mark.parametrize("act", ["relu", "silu", "tanh"])
def test_energy_linear_op_matches_reference(act, energy, reduction):
    dtype = torch.float32 if GPU else torch.float64
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(6, 4, 13, generator=g, dtype=dtype)
    w0 = torch.randn(9, 13, generator=g, dtype=dtype) * 0.3
    b0 = torch.randn(9, generator=g, dtype=dtype)
    outs = {}
    for be in ("reference", "triton"):
        x, w, b = (t.clone().to(DEV).requires_grad_() for t in (x0, w0, b0))
        y, e = minaction.ops.energy_linear(x, w, b, activation=act, energy=energy, reduction=reduction, backend=be)
        assert y.shape == (6, 4, 9) and e.shape == ()
        loss = (y * y.detach().cos()).sum() + 0.7 * e
        loss.backward()
        outs[be] = (y.detach(), e.detach(), x.grad, w.grad, b.grad)
    for name, a, r in zip(("y", "E", "grad x", "grad w", "grad b"), outs["triton"], outs["reference"]):
        _close(a, r, dtype, name)


def test_energy_linear_batched_models_op():
    """The batched N-models form: weight [G, N, K], per-model λ through a per-model loss weight."""
    dtype = torch.float32
    G = 3
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(17, 12, generator=g)
    w0 = torch.randn(G, 10, 12, generator=g) * 0.3
    b0 = torch.randn(G, 10, generator=g)
    lam = torch.tensor([0.0, 0.1, 1.0])
    outs = {}
    for be in ("reference", "triton"):
        x, w, b = (t.clone().to(DEV).requires_grad_() for t in (x0, w0, b0))
        y, e = minaction.ops.energy_linear(x, w, b, activation="relu", energy="l2", backend=be)
        assert y.shape == (G, 17, 10) and e.shape == (G,)
        (y.square().mean((1, 2)) + lam.to(DEV) * e).sum().backward()
        outs[be] = (y.detach(), e.detach(), x.grad, w.grad, b.grad)
    for name, a, r in zip(("y", "E", "grad x", "grad w", "grad b"), outs["triton"], outs["reference"]):
        _close(a, r, dtype, name)


def test_activation_energy_op_matches_reference():
    dtype = torch.float32
    z0 = torch.randn(3, 4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    outs = {}
    for be in ("reference", "triton"):
        z = z0.clone().to(DEV).requires_grad_()
        y, e = minaction.ops.activation_energy(z, "gelu", "l2", "mean", groups=3, backend=be)
        (y.sum() + e.sum()).backward()
        outs[be] = (y.detach(), e.detach(), z.grad)
    for name, a, r in zip(("y", "E", "grad z"), outs["triton"], outs["reference"]):
        _close(a, r, dtype, name)


def test_gradcheck_float64():
    if GPU:
        pytest.skip("float64 on the GPU is served by the composite specification")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    for act in ("silu", "tanh"):
        fn = lambda x, w, b: minaction.ops.energy_linear(x, w, b, activation=act, energy="l2",  # noqa: E731
                                                         backend="triton")
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


def test_empty_batch():
    x = torch.zeros(1, 0, 4, device=DEV)
    w = torch.randn(1, 3, 4, device=DEV)
    y, z, e = tb.linear_forward(x, w, None, "relu", 2, 1.0, False)
    assert y.shape == (1, 0, 3) and e.shape == (1,) and e.item() == 0


def test_available_reports_reasons():
    ok, why = tb.available(torch.device("cpu"))
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert ok == interp and isinstance(why, str) and why
    ok, why = tb.available(torch.device("meta"))
    assert not ok and "meta" in why


# ----------------------------------------------------------------------------- ahead-of-time GPU compile
def test_every_kernel_compiles_for_sm90_and_sm80():
    """Compile the covering set of kernel variants with Triton's GPU compiler (no GPU needed).

    One subprocess per target (the interpreter must be off for compilation), run in parallel.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, "-m", "minaction.kernels.aot", str(cc)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cc in (90, 80)}
    for cc, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{cc} ahead-of-time compile failed:\n{out[-6000:]}"
        for kernel in ("linear_fwd_kernel", "act_fwd_kernel", "act_bwd_kernel"):
            assert f"ok   sm_{cc} {kernel}" in out, f"{kernel} was not compiled for sm_{cc}:\n{out[-3000:]}"


def test_energy_linear_layer_batched_trains_like_reference():
    """nn.EnergyLinear(num_models=3) on the triton backend: a few SGD steps match the reference."""
    from minaction.nn import EnergyLinear

    dtype = torch.float64 if not GPU else torch.float32
    torch.manual_seed(0)
    x = torch.randn(16, 12, dtype=dtype).to(DEV)
    target = torch.randn(3, 16, 7, dtype=dtype).to(DEV)
    layers = {}
    for be in ("reference", "triton"):
        torch.manual_seed(1)
        layer = EnergyLinear(12, 7, activation="silu", energy="l2", num_models=3, backend=be, dtype=dtype).to(DEV)
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            y = layer(x)
            ((y - target).square().mean() + 0.01 * layer.last_energy.sum()).backward()
            opt.step()
        layers[be] = layer
    for (n, a), (_, r) in zip(layers["triton"].named_parameters(), layers["reference"].named_parameters()):
        _close(a.detach(), r.detach(), dtype, f"parameter {n} after 3 steps")


def test_gpu_launch_paths_under_interpreter(monkeypatch):
    """The GPU-only launcher branches (autotuned grid with a trimmed partial buffer, the
    untuned size heuristic, GPU elementwise block sizes) run here with a one-config
    autotuner, which the interpreter supports."""
    if GPU:
        pytest.skip("exercised for real on the GPU")
    import triton

    tuned = triton.autotune(configs=[triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})],
                            key=["M_BUCKET", "N", "K", "ACT", "P", "KEEP_Z"])(K.linear_fwd_kernel)
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "_linear_fwd_tuned", tuned)
    dtype = torch.float64
    x, w, b, gy, ge = _inputs(2, 70, 40, 50, dtype, seed=9)
    ry, rz, re, rgx, rgw, rgb = _reference(x, w, b, gy, ge, "gelu", 2, 0.1)
    for autotune in ("1", "0"):
        monkeypatch.setenv("MINACTION_TRITON_AUTOTUNE", autotune)
        y, z, e = K.linear_forward(x, w, b, "gelu", 2, 0.1, True)
        _close(y, ry, dtype, f"y (autotune={autotune})")
        _close(e, re, dtype, f"energy (autotune={autotune})")
    gx, gw, gb = K.linear_backward(gy, ge, x, w, y, z, "gelu", 2, 0.1, True, True, True)
    _close(gb, rgb, dtype, "grad b")
    _close(gx, rgx, dtype, "grad x")
    za = torch.randn(2, 5, 3000, dtype=dtype)
    ya, _, ea = K.act_forward(za, "relu", 1, 0.5, False)
    rya, _, rea = composite.act_forward(za, "relu", 1, 0.5, False)
    _close(ya, rya, dtype, "act y")
    _close(ea, rea, dtype, "act energy")


def test_opcheck_with_triton_backend():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch)."""
    from minaction.ops import energy as ops_energy

    x = torch.randn(1, 6, 5, device=DEV, requires_grad=True)
    w = torch.randn(1, 4, 5, device=DEV, requires_grad=True)
    b = torch.randn(1, 4, device=DEV, requires_grad=True)
    for act in ("relu", "gelu"):
        torch.library.opcheck(ops_energy._energy_linear, (x, w, b, act, 2, False, "triton"))
    z = torch.randn(2, 3, 4, device=DEV, requires_grad=True)
    torch.library.opcheck(ops_energy._activation_energy, (z, "silu", 1, True, "triton"))


def test_strided_inputs_need_no_copy():
    """A shared input expanded over G (stride 0) and a transposed weight view give the spec's values."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(12)
    x2 = torch.randn(19, 10, generator=g).to(DEV)
    x = x2.unsqueeze(0).expand(3, -1, -1)
    w = torch.randn(3, 10, 14, generator=g).to(DEV).transpose(1, 2)  # [3, 14, 10], non-contiguous
    y, _, e = tb.linear_forward(x, w, None, "relu", 2, 0.5, False)
    ry, _, re = composite.linear_forward(x.contiguous(), w.contiguous(), None, "relu", 2, 0.5, False)
    _close(y, ry, dtype, "y")
    _close(e, re, dtype, "energy")


@pytest.mark.parametrize("dtype", [torch.float32] + ([] if GPU else [torch.float64]))
def test_tanh_is_accurate_near_zero(dtype):
    """tanh from exp(-2|z|) cancelled for small |z| (tanh(1e-8) came out 0 in float32, and the l1 energy's
    gradient, sign(y), vanished with it); the series branch keeps the relative error at rounding level."""
    z = torch.tensor([[0.3, 0.0625, 0.06, 1e-2, 1e-4, 1e-6, 1e-7, 2e-8, 1e-9, 1e-17, 1e-30, 0.0]], dtype=dtype)
    z = torch.cat([z, -z]).unsqueeze(0).to(DEV)  # [G=1, M=2, N]
    y, _, _ = tb.act_forward(z, "tanh", 1, 1.0, False)
    ref = torch.tanh(z.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
    # on a GPU, float32 tl.exp and / compile to approximate PTX (ex2.approx, div.full: up to ~2 ulp), which
    # (1 - e) / (1 + e) amplifies ~7.5x just above |z| = 1/16; the interpreter computes them exactly
    tol = 1e-15 if dtype == torch.float64 else (2e-6 if GPU else 4e-7)
    assert rel < tol, rel
    assert torch.equal(torch.signbit(y), torch.signbit(ref.to(dtype)))  # -0.0 stays -0.0
    gz = tb.act_backward(torch.zeros_like(z), torch.ones(1, device=DEV, dtype=dtype), y,
                         torch.empty(0, device=DEV, dtype=dtype), "tanh", 1, 1.0)
    nz = z != 0
    assert torch.all(gz[nz].abs() > 0.5)  # d|tanh z|/dz = sign(z)(1 - tanh^2) ~ +-1


def test_autotune_key_buckets_the_row_count():
    """The autotuner keys on M rounded up to a power of two: a new batch size, the last partial batch or
    an evaluation batch reuses a tuned configuration instead of benchmarking all twelve again."""
    assert [K.m_bucket(m) for m in (0, 1, 2, 3, 64, 65, 100, 128, 129, 4097)] == \
        [1, 1, 2, 4, 64, 128, 128, 128, 256, 8192]
    assert "M_BUCKET" in K.linear_fwd_kernel.arg_names


def test_tf32_flag_read_through_torchs_new_api():
    """Reading torch.backends.cuda.matmul.allow_tf32 raises once a program has set TF32 by torch's newer
    fp32_precision API (torch >= 2.9): every float32 GPU call then failed. The flag is read through the
    new API, which also reflects the legacy setters."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            m.allow_tf32  # what the launcher used to read
        assert K.tf32_matmul() is True
        m.fp32_precision = "ieee"
        assert K.tf32_matmul() is False
    finally:
        m.fp32_precision = before
