"""CUDA backend: compile checks that need no GPU, and numerics that do.

Without a GPU: every ``csrc/*.cu`` compiles alone with ``nvcc -c -arch=sm_90`` (skipped
with the reason where nvcc is absent), includes no torch header, and the backend reports
why it is unavailable. With a GPU: the primitives and the fused op against the
plain-PyTorch specification in float32, float16 and bfloat16, G = 1 and G > 1.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import minaction
from minaction.backends import ACTIVATIONS, NEEDS_Z, composite
from minaction.backends import cuda as cb

CSRC = Path(cb.source_dir())
CU_FILES = sorted(CSRC.glob("*.cu"))


def _nvcc():
    for cand in (os.environ.get("NVCC"), "/usr/local/bin/nvcc", shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC}"
    assert (CSRC / "energy_cuda.cpp").exists()


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_include_no_torch_headers(cu):
    text = cu.read_text()
    bad = re.findall(r'#include\s*[<"]((?:torch|ATen|c10)/[^>"]+)', text)
    assert not bad, f"{cu.name} includes torch headers {bad}: keep kernels torch-free, glue in energy_cuda.cpp"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_compile_for_sm90(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (looked at $NVCC, /usr/local/bin/nvcc, PATH, /usr/local/cuda/bin)")
    res = subprocess.run([nvcc, "-c", "-arch=sm_90", "-O3", "-I", str(CSRC), str(cu), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed on {cu.name}:\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0


def test_available_says_why_not_on_cpu():
    ok, why = cb.available(torch.device("cpu"))
    assert not ok and "CUDA" in why
    if not torch.cuda.is_available():
        ok, why = cb.available(torch.device("cuda"))
        assert not ok and why


# ----------------------------------------------------------------------------- GPU numerics
GPU_OK, GPU_WHY = (cb.available(torch.device("cuda")) if torch.cuda.is_available()
                   else (False, "no CUDA device"))
gpu = pytest.mark.skipif(not GPU_OK, reason=f"cuda backend unavailable: {GPU_WHY}")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def _close(a, b, dtype, what):
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not a.numel():
        return
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= 2 * TOL[dtype] * scale, f"{what}: max error {err:.3e} (scale {scale:.3g}) for {dtype}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 127, 33, 65), (10, 128, 784, 256)])
def test_primitives_match_spec(dtype, act, shape):
    G, M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(G, M, K, generator=g, dtype=torch.float64)
    w = torch.randn(G, N, K, generator=g, dtype=torch.float64) / K ** 0.5
    b = torch.randn(G, N, generator=g, dtype=torch.float64)
    gy = torch.randn(G, M, N, generator=g, dtype=torch.float64)
    ge = torch.randn(G, generator=g, dtype=torch.float64)
    dev = lambda t: t.to("cuda", dtype)  # noqa: E731
    edt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    keep = act in NEEDS_Z
    for p in (0, 1, 2):
        y, z, e = cb.linear_forward(dev(x), dev(w), dev(b), act, p, 1.0 / M, keep)
        ry, rz, re = composite.linear_forward(x, w, b, act, p, 1.0 / M, True)
        _close(y, ry, dtype, "y")
        _close(e, re, dtype, "energy")
        assert e.dtype == edt and (z.numel() > 0) == keep
        gx, gw, gb = cb.linear_backward(dev(gy), ge.to("cuda", edt), dev(x), dev(w), y, z, act, p, 1.0 / M,
                                        True, True, True)
        rgx, rgw, rgb = composite.linear_backward(gy, ge, x, w, ry, rz, act, p, 1.0 / M, True, True, True)
        _close(gx, rgx, dtype, "grad x")
        _close(gw, rgw, dtype, "grad w")
        _close(gb, rgb, dtype, "grad b")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_energy_linear_op_batched(dtype):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 40, generator=g)
    w0 = torch.randn(10, 30, 40, generator=g) * 0.2
    b0 = torch.randn(10, 30, generator=g)
    outs = {}
    for be in ("reference", "cuda"):
        x, w, b = (t.clone().to("cuda", dtype).requires_grad_() for t in (x0, w0, b0))
        y, e = minaction.ops.energy_linear(x, w, b, activation="gelu", energy="l2", backend=be)
        (y.float().square().mean() + e.sum()).backward()
        outs[be] = (y.detach(), e.detach(), x.grad, w.grad, b.grad)
    for name, a, r in zip(("y", "E", "grad x", "grad w", "grad b"), outs["cuda"], outs["reference"]):
        _close(a, r, dtype, name)


@gpu
def test_activation_energy_op():
    z0 = torch.randn(2, 8, 4, 6, 6, device="cuda")
    outs = {}
    for be in ("reference", "cuda"):
        z = z0.clone().requires_grad_()
        y, e = minaction.ops.activation_energy(z, "silu", "l1", "mean", groups=2, backend=be)
        (y.sum() + e.sum()).backward()
        outs[be] = (y.detach(), e.detach(), z.grad)
    for name, a, r in zip(("y", "E", "grad z"), outs["cuda"], outs["reference"]):
        _close(a, r, torch.float32, name)


@gpu
def test_energy_deterministic():
    x = torch.randn(1, 512, 512, device="cuda")
    w = torch.randn(1, 512, 512, device="cuda")
    e1 = cb.linear_forward(x, w, None, "relu", 2, 1.0, False)[2]
    e2 = cb.linear_forward(x, w, None, "relu", 2, 1.0, False)[2]
    assert torch.equal(e1, e2)


@gpu
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_empty_batch_on_the_gpu(be):
    """Zero rows on the GPU backends: the plain layers' shapes, energies 0, zero weight gradients
    (the CPU backends' twin is tests/nn/test_nn.py::test_an_empty_batch_works_...)."""
    ok, why = minaction.backends.select.available(be, "cuda")
    if not ok:
        pytest.skip(why)
    from minaction.nn import EnergyConv2d, EnergyLinear

    for layer, x_shape, y_shape in ((EnergyLinear(5, 3, backend=be), (0, 5), (0, 3)),
                                    (EnergyLinear(5, 3, num_models=2, backend=be), (0, 5), (2, 0, 3)),
                                    (EnergyConv2d(2, 3, 3, backend=be), (0, 2, 6, 6), (0, 3, 4, 4)),
                                    (EnergyConv2d(2, 3, 3, num_models=2, backend=be), (0, 2, 6, 6), (0, 6, 4, 4))):
        layer = layer.cuda()
        x = torch.randn(x_shape, device="cuda", requires_grad=True)
        y = layer(x)
        assert tuple(y.shape) == y_shape and not layer.last_energy.any()
        (y.sum() + layer.last_energy.sum()).backward()
        assert tuple(x.grad.shape) == x_shape and not layer.weight.grad.any()
