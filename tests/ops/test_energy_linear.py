"""EnergyLinear's fused operator against the plain-PyTorch reference: values, energy, every gradient."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import minaction
from minaction.backends import select as mbackend
from minaction.backends import ACTIVATIONS
from minaction.nn import EnergyLinear
from minaction.ops import activation_energy, energy_linear

# backends that go through the fused operators on CPU tensors in CI
# ("composite" is the plain-op specification run through the torch.library op)
FUSED = ["cpu", "composite"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def ref_layer(x, w, b, act, energy, reduction):
    """The oracle written from the definition, independent of minaction's code paths."""
    z = F.linear(x, w, b)
    y = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "identity": lambda t: t, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](z)
    if energy is None:
        return y, torch.zeros((), dtype=y.dtype)
    yf = y.float() if y.dtype == torch.bfloat16 else y
    per_unit = yf * yf if energy == "l2" else yf.abs()
    per_row = per_unit.reshape(-1, y.shape[-1]).sum(1)
    if reduction == "mean":
        per_row = per_row / y.shape[-1]
    return y, per_row.mean()


def make(M, K, N, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


def grads_of(fn, x, w, b, seed=1):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y, e = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ((y * gy).sum() + 0.37 * e).backward()
    return y.detach(), e.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("energy,reduction", [("l2", "sum"), ("l1", "sum"), ("l2", "mean"), (None, "sum")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(backend, act, energy, reduction, dtype):
    for (M, K, N) in [(1, 5, 3), (3, 33, 17), (127, 64, 127), (1000, 7, 65)]:
        x, w, b = make(M, K, N, dtype)
        # bfloat16: the oracle is the float64 computation on the same bf16 inputs (two bf16
        # computations with different rounding orders can disagree by more than either's error)
        ox, ow, ob = (t.double() for t in (x, w, b)) if dtype == torch.bfloat16 else (x, w, b)
        y0, e0, g0 = grads_of(lambda x, w, b: ref_layer(x, w, b, act, energy, reduction), ox, ow, ob)
        y0, g0 = y0.to(dtype), [g.to(dtype) for g in g0]
        y1, e1, g1 = grads_of(lambda x, w, b: energy_linear(x, w, b, act, energy, reduction, backend=backend),
                              x, w, b)
        tol = TOL[dtype]
        assert y1.dtype == dtype and y1.shape == (M, N)
        torch.testing.assert_close(y1, y0, **tol)
        assert e1.shape == ()
        torch.testing.assert_close(e1.to(torch.float64), e0.to(torch.float64), **(
            tol if dtype != torch.bfloat16 else dict(rtol=3e-2, atol=3e-2)))
        for name, a, c in zip("xwb", g1, g0):
            if dtype == torch.bfloat16:
                # relative RMS error: a bf16 pre-activation that rounds across a kink (relu, |y|)
                # legitimately flips a few elements, so elementwise bounds do not fit bf16
                err = float((a.double() - c.double()).norm() / c.double().norm().clamp_min(1e-12))
                assert err < 2e-2, f"grad {name} ({M},{K},{N}): relative RMS error {err:.3g}"
                continue
            scale = max(1.0, float(c.abs().max()))
            torch.testing.assert_close(a / scale, c / scale, **tol, msg=lambda m: f"grad {name} ({M},{K},{N}): {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act,energy", list(itertools.product(ACTIVATIONS, ["l2", "l1", None])))
def test_gradcheck_float64(backend, act, energy):
    x, w, b = make(4, 5, 3, torch.float64, seed=3)
    if energy == "l1" or act == "relu":
        # keep away from the kinks of |y| and relu, where finite differences are meaningless
        b = b + torch.where(b >= 0, 0.5, -0.5).to(b.dtype)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: energy_linear(x, w, b, act, energy, backend=backend), inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_needs_input_grad_subsets(backend):
    x, w, b = make(9, 6, 4, torch.float64)
    for mask in itertools.product([False, True], repeat=3):
        leaves = [t.clone().requires_grad_(m) for t, m in zip((x, w, b), mask)]
        y, e = energy_linear(*leaves, "gelu", "l2", backend=backend)
        ref_leaves = [t.clone().requires_grad_(m) for t, m in zip((x, w, b), mask)]
        yr, er = ref_layer(*ref_leaves, "gelu", "l2", "sum")
        if not any(mask):
            assert not y.requires_grad
            continue
        (y.sum() + e).backward()
        (yr.sum() + er).backward()
        for t, r, m in zip(leaves, ref_leaves, mask):
            if m:
                torch.testing.assert_close(t.grad, r.grad, rtol=1e-10, atol=1e-10)
            else:
                assert t.grad is None


@pytest.mark.parametrize("backend", FUSED)
def test_no_bias_and_noncontiguous(backend):
    x, w, _ = make(8, 12, 6, torch.float64)
    xt = torch.randn(12, 8, dtype=torch.float64).t()  # non-contiguous view
    wt = torch.randn(12, 6, dtype=torch.float64).t()
    for xx, ww in [(x, w), (xt, w), (x[:, :12], wt), (xt, wt)]:
        y0, e0, g0 = grads_of(lambda x, w, b: ref_layer(x, w, None, "tanh", "l2", "sum"), xx, ww, None)
        y1, e1, g1 = grads_of(lambda x, w, b: energy_linear(x, w, None, "tanh", "l2", backend=backend), xx, ww, None)
        torch.testing.assert_close(y1, y0)
        torch.testing.assert_close(e1, e0)
        for a, c in zip(g1[:2], g0[:2]):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_leading_dims_are_rows(backend):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    w = torch.randn(4, 7, dtype=torch.float64)
    y, e = energy_linear(x, w, None, "relu", "l2", backend=backend)
    y2, e2 = ref_layer(x.reshape(-1, 7), w, None, "relu", "l2", "sum")
    assert y.shape == (2, 3, 5, 4)
    torch.testing.assert_close(y.reshape(-1, 4), y2)
    torch.testing.assert_close(e, e2)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_batched_models_match_separate(backend):
    G, M, K, N = 3, 11, 9, 5
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(G, N, K, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(G, N, generator=gen, dtype=torch.float64, requires_grad=True)
    for shared in (True, False):
        X = torch.randn(M, K, generator=gen, dtype=torch.float64) if shared else torch.randn(
            G, M, K, generator=gen, dtype=torch.float64)
        X.requires_grad_(True)
        lam = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
        y, e = energy_linear(X, W, B, "silu", "l2", backend=backend)
        assert y.shape == (G, M, N) and e.shape == (G,)
        gW, gB, gX = torch.autograd.grad(y.sum() + (lam * e).sum(), (W, B, X))
        for g in range(G):
            xg = X if shared else X[g]
            yr, er = ref_layer(xg, W[g], B[g], "silu", "l2", "sum")
            torch.testing.assert_close(y[g], yr)
            torch.testing.assert_close(e[g], er)
            rW, rB = torch.autograd.grad(yr.sum() + lam[g] * er, (W, B))
            torch.testing.assert_close(gW[g], rW[g])
            torch.testing.assert_close(gB[g], rB[g])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_activation_energy_op(backend, act):
    z = torch.randn(6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y, e = activation_energy(z, act, "l2", backend=backend)
    yr = {"relu": torch.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid}[act](z)
    er = (yr * yr).reshape(6, -1).sum(1).mean()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(e, er)
    g = torch.randn_like(y)
    ga, = torch.autograd.grad((y * g).sum() + 2 * e, z)
    gr, = torch.autograd.grad((yr * g).sum() + 2 * er, z)
    torch.testing.assert_close(ga, gr)
    zz = z.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: activation_energy(t, act, "l2", backend=backend), (zz,))
    # grouped: G models in dim 0
    yg, eg = activation_energy(z, act, "l1", groups=6, backend=backend)
    assert eg.shape == (6,)
    torch.testing.assert_close(eg, yr.abs().reshape(6, 3, -1).sum(2).mean(1))


def test_opcheck_library_ops():
    from torch.library import opcheck

    x, w, b = make(5, 7, 3, torch.float64)
    x3, w3, b2 = x.unsqueeze(0), w.unsqueeze(0).requires_grad_(True), b.unsqueeze(0).requires_grad_(True)
    for backend in FUSED:
        for act in ("relu", "gelu"):
            opcheck(torch.ops.minaction.energy_linear.default, (x3, w3, b2, act, 2, False, backend))
            opcheck(torch.ops.minaction.activation_energy.default,
                    (x3.clone().requires_grad_(True), act, 1, True, backend))
    from minaction.backends import cpu

    ops = cpu.load()
    # the layer op carries a C++ autograd formula; the primitives below it have none by design
    opcheck(ops.layer.default, (x.clone().requires_grad_(True), w.clone().requires_grad_(True), b, 1, 2, 0.2))
    opcheck(ops.layer.default, (x3, w3, b2, 2, 2, 0.2))
    opcheck(ops.linear_fwd.default, (x3, w3.detach(), b2.detach(), 3, 2, 0.2, True))
    opcheck(ops.act_fwd.default, (x3, 4, 1, 0.2, False))
    y, z, _ = ops.linear_fwd(x3, w3.detach(), b2.detach(), 3, 2, 0.2, True)
    opcheck(ops.linear_bwd.default, (torch.randn_like(y), torch.ones(1, dtype=y.dtype), x3, w3.detach(), y, z, 3, 2,
                                     0.2, True, True, True))


def test_one_namespace_each_schema_declared_once():
    """Every op is minaction::<name>, declared in backends/library.py only; the C++ sources
    register implementations (TORCH_LIBRARY_IMPL) and never declare a namespace themselves."""
    import pathlib
    import re

    from minaction.backends import library, source_dir

    for name in library.SCHEMAS:
        assert hasattr(torch.ops.minaction, name), name
    with pytest.raises(RuntimeError, match="minaction"):  # a second declaration of the namespace is refused
        torch.library.Library("minaction", "DEF")
    for src in pathlib.Path(source_dir()).glob("*.cpp"):
        text = src.read_text()
        assert not re.search(r"TORCH_LIBRARY(_FRAGMENT)?\s*\(", text), f"{src.name} declares schemas"
        assert set(re.findall(r"TORCH_LIBRARY_IMPL\s*\(\s*(\w+)", text)) == {"minaction"}, src.name
    pkg = pathlib.Path(minaction.__file__).parent
    defs = [f for f in pkg.rglob("*.py") if re.search(r"Library\(\"minaction\", \"DEF\"\)|custom_op\(",
                                                       f.read_text())]
    assert [f.name for f in defs] == ["library.py"], defs


def test_composite_is_a_listed_selectable_backend():
    assert "composite" in mbackend.BACKENDS and mbackend.available("composite", "cpu")[0]
    x, w, b = make(6, 5, 4, torch.float64)
    with minaction.use_backend("composite"):
        assert mbackend.select(torch.device("cpu")) == "composite"
        y, e = energy_linear(x, w, b, "gelu", "l2")
    yr, er = ref_layer(x, w, b, "gelu", "l2", "sum")
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(e, er)
    assert mbackend.module("composite").available(torch.device("cpu"))[0]
    with pytest.raises(ValueError, match="no primitives"):
        mbackend.module("reference")


def test_torch_compile_over_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(minaction.nn.EnergyLinear(7, 16, activation="gelu"), minaction.nn.EnergyLinear(16, 8),
                                torch.nn.Linear(8, 3))
    x = torch.randn(10, 7)
    ref = model(x)
    e_ref = minaction.total_energy(model).detach()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    e = minaction.total_energy(model)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(e, e_ref)
    (out.sum() + e).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", ["reference", None])
def test_mean_energy_over_zero_units_is_a_clear_error(backend):
    """A mean over a sample's units is undefined when there are none: the same clear error on
    every path (the cpu path returned 0 and the reference path raised ZeroDivisionError)."""
    z = torch.randn(4, 0)
    with pytest.raises(ValueError, match="mean is undefined"):
        activation_energy(z, "relu", "l2", "mean", backend=backend)
    with pytest.raises(ValueError, match="mean is undefined"):
        activation_energy(torch.randn(2, 4, 0, 3), "relu", "l2", "mean", groups=2, backend=backend)
    y, e = activation_energy(z, "relu", "l2", "sum", backend=backend)  # a sum over no units is 0
    assert y.shape == (4, 0) and float(e) == 0.0
    y, e = activation_energy(z, "relu", None, "mean", backend=backend)  # no energy asked: nothing to average
    assert y.shape == (4, 0)
    # a layer of no output units, as EnergyLinear(4, 0, energy_reduction="mean") makes (a ZeroDivisionError, session 24)
    for w in (torch.randn(0, 4), torch.randn(2, 0, 4)):
        with pytest.raises(ValueError, match="mean is undefined"):
            energy_linear(torch.randn(3, 4), w, None, "tanh", "l2", "mean", backend=backend)
        y, e = energy_linear(torch.randn(3, 4), w, None, "tanh", "l2", "sum", backend=backend)
        assert y.shape[-1] == 0 and not e.any()
        y, e = energy_linear(torch.randn(3, 4), w, None, "tanh", None, "mean", backend=backend)
        assert y.shape[-1] == 0
    with pytest.raises(ValueError, match="mean is undefined"):
        EnergyLinear(4, 0, energy_reduction="mean", backend=backend)(torch.randn(3, 4))
