"""NaN and Inf through the GPU backends (issue 10, item 1): exactly what torch does.

torch's semantics, the oracle here (measured on torch 2.13, the same on CPU and CUDA):

* forward: ``relu(nan) = nan``, ``relu(-inf) = 0``; ``gelu(-inf) = silu(-inf) = nan``
  (``-inf * 0``); ``tanh(+-inf) = +-1``; the energy of a NaN activation is NaN (l1 and l2).
* backward: relu's is ``threshold_backward(grad, y, 0)``, a *select* on the saved output:
  ``y <= 0 -> 0`` else ``grad``. So a NaN output passes the incoming gradient through
  unchanged, and a NaN incoming gradient where ``y <= 0`` becomes 0 (not ``nan * 0``).
  The l1 energy's gradient uses ``sign(nan) = 0``. identity passes ``grad`` untouched
  (``y * 0 + 1`` would turn an Inf output's gradient into NaN). gelu/silu have NaN
  derivatives at ``+-inf`` (``inf * 0``).

The ``triton`` backend (CPU tensors under ``TRITON_INTERPRET=1``, or a GPU) and, on a GPU,
the ``cuda`` backend are compared with the ``reference`` backend (plain torch autograd)
through the public operators: NaN positions must be equal and finite values close. The CUDA kernels' element math is
checked on the host: a small harness that includes ``csrc/energy_cuda.cu`` (whose scalar
functions are ``__host__ __device__``) is compiled with nvcc and run on the CPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import minaction
from minaction.backends import select as mb
from minaction.backends import ACT_CODES, ACTIVATIONS, composite, source_dir

# the interpreter's numpy matmul warns about inf - inf; that NaN is the point of these tests
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.usefixtures("aten_reference")]  # tests/backends/conftest.py

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEV.type == "cuda"


def _backend_params():
    """triton (the interpreter on CPU, compiled on a GPU) and cuda (GPU only), skipped with the reason."""
    out = []
    for name in ("triton", "cuda"):
        ok, why = mb.available(name, DEV)
        skip = pytest.mark.skipif(not ok, reason=f"{name} unavailable on {DEV.type}: {why}")
        out.append(pytest.param(name, marks=skip))
    return out


BACKENDS = _backend_params()
# float64 under the interpreter (tight comparisons); float32 on a GPU (the triton backend hands
# float64 to the plain-PyTorch specification there)
DTYPE = torch.float32 if GPU else torch.float64
ENERGIES = ["l2", "l1", None]
NAN, INF = float("nan"), float("inf")
SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 3.0, -3.0, 0.5]


def _same(a, b, what, tol=None):
    """Equal NaN positions, equal infinities, finite values close."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    na, nb = a.isnan(), b.isnan()
    assert torch.equal(na, nb), (f"{what}: NaN at {na.nonzero().tolist()} but the reference has NaN at "
                                 f"{nb.nonzero().tolist()}\n got {a}\n ref {b}")
    if tol is None:
        tol = 1e-5 if DTYPE == torch.float32 else 1e-10
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _backward(outs, grads):
    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


# ----------------------------------------------------------------------------- activation_energy (conv epilogue)
def _special_z(G=2, B=3):
    vals = torch.tensor(SPECIAL, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(G, B, 2, len(SPECIAL), generator=g, dtype=torch.float64)
    z[0, 0, 0] = vals          # every special value in model 0, first sample
    z[1, 2, 1] = vals.flip(0)  # and in model 1, another sample and order
    return z


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("energy", ENERGIES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_energy_special_values(be, act, energy):
    z0 = _special_z().to(DEV, DTYPE)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(z0.shape, generator=g, dtype=torch.float64).to(DEV, DTYPE)
    ge = torch.tensor([0.7, -1.3], dtype=DTYPE, device=DEV)
    res = {}
    for name in ("reference", be):
        z = z0.clone().requires_grad_()
        y, e = minaction.ops.activation_energy(z, act, energy, "sum", groups=2, backend=name)
        _backward((y, e), (gy, ge))
        res[name] = (y, e, z.grad)
    for name, a, r in zip(("y", "energy", "grad z"), res[be], res["reference"]):
        _same(a, r, f"{act}/{energy} {name}")
    if act == "relu":  # the bug this file guards against: NaN must not become 0
        assert res[be][0][0, 0, 0, 0].isnan()
        if energy is not None:
            assert res[be][1].isnan().all()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_energy_nonfinite_upstream_gradient(be, act):
    """A NaN/Inf incoming gradient: relu zeroes it where y <= 0 (a select), others multiply."""
    z0 = _special_z().to(DEV, DTYPE)
    gy = torch.ones_like(z0)
    gy[0, 1, 0, :4] = torch.tensor([NAN, INF, -INF, NAN])
    gy[1, 0, 1, :] = NAN
    ge = torch.tensor([NAN, 2.0], dtype=DTYPE, device=DEV)  # a NaN energy weight for model 0
    res = {}
    for name in ("reference", be):
        z = z0.clone().requires_grad_()
        y, e = minaction.ops.activation_energy(z, act, "l2", "mean", groups=2, backend=name)
        _backward((y, e), (gy, ge))
        res[name] = z.grad
    _same(res[be], res["reference"], f"{act} grad z")


# ----------------------------------------------------------------------------- energy_linear (matmul epilogue)
CASES = {
    "x_nan": ("x", (1, 2), NAN),
    "x_posinf": ("x", (2, 0), INF),
    "x_neginf": ("x", (0, 3), -INF),
    "w_nan": ("w", (4, 1), NAN),
    "w_inf": ("w", (0, 5), INF),
    "w_neginf": ("w", (2, 2), -INF),
    "b_nan": ("b", (3,), NAN),
    "b_neginf": ("b", (1,), -INF),
}


def _linear_inputs(case):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=g, dtype=torch.float64)
    t = {"x": x, "w": w, "b": b}
    which, idx, val = CASES[case]
    t[which][idx] = val
    gy = torch.randn(5, 6, generator=g, dtype=torch.float64)
    return [t[k].to(DEV, DTYPE) for k in ("x", "w", "b")] + [gy.to(DEV, DTYPE)]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("energy", ENERGIES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_energy_linear_nonfinite_inputs(be, case, act, energy):
    x0, w0, b0, gy = _linear_inputs(case)
    ge = torch.tensor(0.9, dtype=DTYPE, device=DEV)
    res = {}
    for name in ("reference", be):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y, e = minaction.ops.energy_linear(x, w, b, activation=act, energy=energy, backend=name)
        _backward((y, e), (gy, ge))
        res[name] = (y, e, x.grad, w.grad, b.grad)
    for name, a, r in zip(("y", "energy", "grad x", "grad w", "grad b"), res[be], res["reference"]):
        _same(a, r, f"{case} {act}/{energy} {name}")


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "identity", "gelu"])
def test_energy_linear_batched_nan_stays_in_its_model(be, act):
    """G = 2 models, NaN in model 1's weight: model 0's outputs, energy and gradients stay finite."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 5, generator=g, dtype=torch.float64).to(DEV, DTYPE)
    w0 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(DEV, DTYPE)
    w0[1, 2, 0] = NAN
    b0 = torch.zeros(2, 3, dtype=DTYPE, device=DEV)
    gy = torch.ones(2, 4, 3, dtype=DTYPE, device=DEV)
    ge = torch.ones(2, dtype=DTYPE, device=DEV)
    res = {}
    for name in ("reference", be):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y, e = minaction.ops.energy_linear(x0, w, b, activation=act, energy="l2", backend=name)
        _backward((y, e), (gy, ge))
        res[name] = (y, e, w.grad, b.grad)
    for name, a, r in zip(("y", "energy", "grad w", "grad b"), res[be], res["reference"]):
        _same(a, r, f"{act} {name}")
    y, e, gw, gb = res[be]
    assert torch.isfinite(y[0]).all() and torch.isfinite(e[0]) and torch.isfinite(gw[0]).all()
    assert e[1].isnan()


@pytest.mark.parametrize("be", BACKENDS)
def test_layer_nan_input_reaches_the_loss(be):
    """The issue's repro on the GPU backends: a NaN input must give a NaN output and energy."""
    from minaction.nn import EnergyLinear

    torch.manual_seed(0)
    layer = EnergyLinear(8, 4, backend=be, dtype=DTYPE).to(DEV)
    x = torch.randn(3, 8, dtype=DTYPE, device=DEV)
    x[0, 0] = NAN
    y = layer(x)
    assert y[0].isnan().any() and not y[1:].isnan().any()
    assert layer.last_energy.isnan()


# ----------------------------------------------------------------------------- CUDA element math, on the host
CSRC = Path(source_dir())

_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include "energy_cuda.cu"

// argv: act p c. stdin: lines "z gy". stdout: "y gz" per line, for float and double.
template <typename C> void run(int act, int p, double c_in, const double* z, const double* gy, int n) {
  const C c = (C)c_in;
  for (int i = 0; i < n; ++i) {
    const C zv = (C)z[i];
    const C yv = act_fn<C>(zv, act);
    const C go = (C)gy[i] + energy_grad<C>(yv, c, p);
    const C gz = act_bwd_value<C>(go, yv, zv, act);
    std::printf("%.17g %.17g\n", (double)yv, (double)gz);
  }
}

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const int act = std::atoi(argv[1]), p = std::atoi(argv[2]);
  const double c = std::atof(argv[3]);
  static double z[4096], gy[4096];
  int n = 0;
  while (n < 4096 && std::scanf("%lf %lf", &z[n], &gy[n]) == 2) ++n;
  run<float>(act, p, c, z, gy, n);
  run<double>(act, p, c, z, gy, n);
  return 0;
}
"""


def _nvcc():
    for cand in (os.environ.get("NVCC"), "/usr/local/bin/nvcc", shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def cuda_host_harness(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (looked at $NVCC, /usr/local/bin/nvcc, PATH, /usr/local/cuda/bin)")
    d = tmp_path_factory.mktemp("cuda_host")
    (d / "harness.cu").write_text(_HARNESS)
    exe = d / "harness"
    res = subprocess.run([nvcc, "-arch=sm_90", "-O2", "-I", str(CSRC), str(d / "harness.cu"), "-o", str(exe)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed on the host harness:\n{res.stdout}\n{res.stderr}"
    return exe


def _fmt(v):
    return "nan" if v != v else ("inf" if v == INF else ("-inf" if v == -INF else repr(v)))


@pytest.mark.parametrize("energy", ENERGIES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cuda_element_math_matches_torch(cuda_host_harness, act, energy):
    """act(z) and the backward value gz of csrc/energy_cuda.cu, run on the host, against torch autograd."""
    p = {"l2": 2, "l1": 1, None: 0}[energy]
    c = 0.375  # ge * scale
    z_vals = SPECIAL + SPECIAL + [2.5, -0.25]
    gy_vals = [1.0] * len(SPECIAL) + [NAN, INF, -INF, NAN, NAN, NAN, NAN, INF, -INF, NAN, NAN, -INF] + [NAN, 0.5]
    stdin = "".join(f"{_fmt(a)} {_fmt(b)}\n" for a, b in zip(z_vals, gy_vals))
    res = subprocess.run([str(cuda_host_harness), str(ACT_CODES[act]), str(p), repr(c)], input=stdin,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [tuple(float(v) for v in line.split()) for line in res.stdout.split("\n") if line.strip()]
    n = len(z_vals)
    assert len(rows) == 2 * n, res.stdout
    for k, dtype in enumerate((torch.float32, torch.float64)):
        got = torch.tensor(rows[k * n:(k + 1) * n], dtype=torch.float64)
        z = torch.tensor(z_vals, dtype=dtype, requires_grad=True)
        y = composite.apply_act(z, act)
        if p:
            yy = y.unsqueeze(0)
            e = (yy * yy).sum() if p == 2 else yy.abs().sum()
            torch.autograd.backward([y, e], [torch.tensor(gy_vals, dtype=dtype), torch.tensor(c, dtype=dtype)])
        else:
            y.backward(torch.tensor(gy_vals, dtype=dtype))
        # host libm and torch's vectorised math may differ in the last bits
        _same(got[:, 0], y, f"cuda {act} y {dtype}", tol=1e-5)
        _same(got[:, 1], z.grad, f"cuda {act}/{energy} grad z {dtype}", tol=1e-5)
