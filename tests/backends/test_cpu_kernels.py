"""The C++ (`cpu`) kernels: NaN/Inf exactly as torch, every ISA build this CPU can run, double backward.

The ISA build loaded in this process is the widest one the CPU supports (or MINACTION_CPU_ISA);
the other runnable builds are exercised in subprocesses, since one process holds one build.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import minaction
from minaction.backends import ACTIVATIONS
from minaction.backends import cpu as cpu_backend
from minaction.ops import activation_energy, energy_linear

ENERGIES = [("l2", "sum"), ("l1", "sum"), ("l2", "mean"), (None, "sum")]
SPECIAL = [float("nan"), float("inf"), -float("inf")]


def _cpu_ok():
    ok, why = minaction.backends.select.available("cpu", "cpu")
    return ok, why


pytestmark = pytest.mark.usefixtures("aten_reference")  # tests/backends/conftest.py


def setup_module(module):
    ok, why = _cpu_ok()
    if not ok:
        pytest.fail(f"the cpu backend must build on this machine: {why}")


def _with_specials(t, seed):
    """t with NaN, +Inf, -Inf at a few positions (and one whole row of NaN)."""
    t = t.clone()
    g = torch.Generator().manual_seed(seed)
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:9]
    for i, k in enumerate(idx.tolist()):
        flat[k] = SPECIAL[i % 3]
    return t


def _run(fn, leaves, gy, ge_w):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    y, e = fn(*leaves)
    loss = (y * gy).sum() + (ge_w * e).sum() if ge_w is not None else (y * gy).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return y.detach(), e.detach(), grads


def _same(a, b, what, **tol):
    assert a.shape == b.shape, what
    # identical NaN positions, identical infinities, the rest close
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ\n{a}\n{b}"
    torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{what}: {m}")


def test_issue_repro_nan_input_gives_nan_output():
    x = torch.randn(3, 8)
    x[0, 0] = float("nan")
    layer = minaction.nn.EnergyLinear(8, 4, backend="cpu")
    y = layer(x)
    assert y.isnan().any()
    assert y[0].isnan().all() and not y[1:].isnan().any()  # relu(NaN) = NaN, as torch.relu
    assert layer.last_energy.isnan()


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("energy,reduction", ENERGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("use_energy", [True, False])
@pytest.mark.parametrize("where", ["bias", "input"])
def test_nan_inf_match_reference(act, energy, reduction, dtype, batched, use_energy, where):
    """NaN/+Inf/-Inf reach the pre-activation through the bias (every gradient compared) or the
    input (the weight gradient then holds 0 * Inf products inside the GEMM, whose result is the BLAS
    library's choice, not the kernel's, so it is left out)."""
    g = torch.Generator().manual_seed(3)
    G, M, K, N = 3, 37, 11, 45  # odd sizes: partial vectors in every row
    lead = (G,) if batched else ()
    x = torch.randn(lead + (M, K), generator=g, dtype=dtype)
    w = torch.randn(lead + (N, K), generator=g, dtype=dtype) / K ** 0.5
    b = torch.randn(lead + (N,), generator=g, dtype=dtype)
    if where == "bias":
        b = _with_specials(b, 2)
    else:
        x = _with_specials(x, 1)
    gy = torch.randn(lead + (M, N), generator=g, dtype=dtype)
    ge = (torch.rand(G if batched else (), generator=g, dtype=dtype) + 0.5) if use_energy else None
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    out = {}
    for be in ("reference", "cpu"):
        out[be] = _run(lambda x, w, b: energy_linear(x, w, b, act, energy, reduction, backend=be), (x, w, b), gy, ge)
    (y0, e0, g0), (y1, e1, g1) = out["reference"], out["cpu"]
    assert y0.isnan().any()
    _same(y1, y0, "y", **tol)
    _same(e1.to(e0.dtype), e0, "energy", **tol)
    for name, a, c in zip("xwb", g1, g0):
        if name == "w" and where == "input":
            continue
        _same(a, c, f"grad {name}", **tol)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("energy", ["l2", "l1", None])
@pytest.mark.parametrize("groups", [0, 2])
def test_activation_energy_nan_inf_match_reference(act, energy, groups):
    g = torch.Generator().manual_seed(5)
    shape = (groups, 5, 3, 7) if groups else (5, 3, 7)
    z = _with_specials(torch.randn(shape, generator=g, dtype=torch.float64), 4)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    ge = torch.rand(groups if groups else (), generator=g, dtype=torch.float64) + 0.5
    res = {}
    for be in ("reference", "cpu"):
        zz = z.clone().requires_grad_(True)
        y, e = activation_energy(zz, act, energy, groups=groups, backend=be)
        gz, = torch.autograd.grad((y * gy).sum() + (ge * e).sum(), zz)
        res[be] = (y.detach(), e.detach(), gz)
    for what, a, c in zip(("y", "energy", "grad z"), res["cpu"], res["reference"]):
        _same(a, c, what, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_propagates_in_low_precision(dtype):
    x = torch.randn(4, 9, dtype=dtype)
    x[1, 2] = float("nan")
    for act in ACTIVATIONS:
        w = torch.randn(6, 9, dtype=dtype)
        y, e = energy_linear(x, w, None, act, "l2", backend="cpu")
        assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any(), act
        assert e.isnan(), act


def test_loaded_build_is_the_chosen_isa():
    ops = cpu_backend.load()
    assert cpu_backend.loaded_isa() == cpu_backend.chosen_isa()
    assert ops is torch.ops.minaction and hasattr(ops, "layer")
    assert cpu_backend.loaded_isa() == cpu_backend._state["spec"]["isa"]
    assert cpu_backend._state["spec"]["name"].startswith(f"minaction_cpu_{cpu_backend.chosen_isa()}_")


def test_build_key_depends_on_isa_flags_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    names = {isa: cpu_backend.build_spec(isa)["name"] for isa in cpu_backend.ISAS}
    assert len(set(names.values())) == 3 and all(names[i].startswith(f"minaction_cpu_{i}_") for i in names)
    assert all("-march=native" not in cpu_backend.build_spec(i)["flags"] for i in cpu_backend.ISAS)
    assert "-mavx2" in cpu_backend.build_spec("avx2")["flags"]
    assert "-DCPU_CAPABILITY_AVX512" in cpu_backend.build_spec("avx512")["flags"]
    monkeypatch.setenv("MINACTION_CPU_CFLAGS", "-O2")
    assert cpu_backend.build_spec("avx2")["name"] != names["avx2"]
    monkeypatch.delenv("MINACTION_CPU_CFLAGS")
    # a different source gets a different name (and folder): an old build is never reused for it
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "energy_cpu.cpp").write_text(cpu_backend.build_spec("avx2")["source"].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_backend, "source_dir", lambda: src)
    assert cpu_backend.build_spec("avx2")["name"] != names["avx2"]


def test_forcing_an_isa_this_cpu_lacks_is_refused(monkeypatch):
    best = cpu_backend.cpu_isa()
    monkeypatch.setenv("MINACTION_CPU_ISA", "default")
    assert cpu_backend.chosen_isa() == "default"
    monkeypatch.setenv("MINACTION_CPU_ISA", "bogus")
    with pytest.raises(ValueError, match="MINACTION_CPU_ISA"):
        cpu_backend.chosen_isa()
    if best != "avx512":
        monkeypatch.setenv("MINACTION_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="supports at most"):
            cpu_backend.chosen_isa()


# every runnable ISA build against the reference, in a fresh process each
_ISA_CHECK = textwrap.dedent("""
    import itertools, torch, minaction
    from minaction.backends import ACTIVATIONS, cpu
    torch.backends.mkldnn.enabled = False  # ATen's formulas as the reference (see tests/backends/conftest.py)
    from minaction.ops import energy_linear, activation_energy
    assert minaction.backends.select.available("cpu", "cpu")[0], minaction.backends.select.available("cpu", "cpu")
    print("ISA", cpu.loaded_isa())
    g = torch.Generator().manual_seed(0)
    for act, (energy, red), dtype, (G, M, K, N) in itertools.product(
            ACTIVATIONS, [("l2", "sum"), ("l1", "mean"), (None, "sum")],
            [torch.float32, torch.float64, torch.bfloat16],
            [(0, 1, 3, 1), (0, 129, 17, 263), (2, 5, 7, 19)]):
        lead = (G,) if G else ()
        x = torch.randn(lead + (M, K), generator=g).to(dtype)
        x.view(-1)[3 % x.numel()] = float("nan")
        w = (torch.randn(lead + (N, K), generator=g) / K ** 0.5).to(dtype)
        b = torch.randn(lead + (N,), generator=g).to(dtype)
        gy = torch.randn(lead + (M, N), generator=g).to(dtype)
        res = []
        for be in ("reference", "cpu"):
            xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
            y, e = energy_linear(xx, ww, bb, act, energy, red, backend=be)
            grads = torch.autograd.grad((y.float() * gy.float()).sum() + 0.7 * e.float().sum(), (xx, ww, bb))
            res.append((y, e) + grads)
        tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
        for a, c in zip(*res):
            assert torch.equal(a.isnan(), c.isnan()), (act, energy, dtype, G, M, K, N)
            torch.testing.assert_close(a.float(), c.float(), rtol=tol, atol=tol, equal_nan=True)
    # the inline float exp/erf (gelu, silu, sigmoid, gelu_tanh) over their whole range, torch's own as the reference
    import torch.nn.functional as F
    z = torch.cat([torch.linspace(-110, 110, 40001), torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0,
                                                                  -0.0, 88.37, 88.38, -86.49, -86.51, 1e-30])])
    for act, f in (("gelu", F.gelu), ("silu", F.silu), ("sigmoid", torch.sigmoid),
                   ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        zz = z.clone().requires_grad_(True)
        y, e = activation_energy(zz.view(1, -1), act, "l2", backend="cpu")
        gz, = torch.autograd.grad(y.sum(), zz)
        zr = z.clone().requires_grad_(True)
        yr = f(zr)
        gr, = torch.autograd.grad(yr.sum(), zr)
        torch.testing.assert_close(y.view(-1), yr, rtol=2e-6, atol=1e-6, equal_nan=True)
        fin = torch.isfinite(z)
        torch.testing.assert_close(gz[fin], gr[fin], rtol=2e-6, atol=2e-6, equal_nan=True)
    # max_pool2 (vector path on float/double, per ISA) against torch's pooling
    from minaction.ops import max_pool2
    for shape, dims in (((2, 3, 29, 30), 2), ((3, 4, 35), 1)):
        for dtype in (torch.float32, torch.float64):
            xp = torch.relu(torch.randn(shape, generator=g)).to(dtype)
            xp.view(-1)[5] = float("nan")
            xa, xb = xp.clone().requires_grad_(), xp.clone().requires_grad_()
            ya = max_pool2(xa, dims)
            yb = (torch.nn.functional.max_pool2d if dims == 2 else torch.nn.functional.max_pool1d)(xb, 2)
            assert torch.equal(ya.nan_to_num(), yb.nan_to_num()) and torch.equal(ya.isnan(), yb.isnan())
            gp = torch.randn(ya.shape, generator=g).to(dtype)
            assert torch.equal(torch.autograd.grad(ya, xa, gp)[0], torch.autograd.grad(yb, xb, gp)[0])
    # the fused epilogue + max_pool2 (minaction::epilogue_pool2) against the two ops, per ISA
    from minaction.ops import activation_energy_max_pool2
    for shape, dims, groups in (((2, 3, 29, 30), 2, 0), ((3, 4, 35), 1, 3), ((2, 2, 14, 14), 2, 2)):
        for dtype in (torch.float32, torch.float64):
            zp = torch.randn(shape, generator=g).to(dtype)
            zp.view(-1)[5] = float("nan")
            za, zb = zp.clone().requires_grad_(), zp.clone().requires_grad_()
            ya, ea = activation_energy_max_pool2(za, "relu", "l2", groups=groups, dims=dims, penalty=0.5)
            yr, eb = activation_energy(zb, "relu", "l2", groups=groups, penalty=0.5)
            yb = max_pool2(yr, dims)
            assert torch.equal(ya.nan_to_num(), yb.nan_to_num()) and torch.equal(ya.isnan(), yb.isnan())
            assert torch.equal(ea.isnan(), eb.isnan())
            gp = torch.randn(ya.shape, generator=g).to(dtype)
            assert torch.equal(torch.autograd.grad(ya, za, gp)[0].nan_to_num(), torch.autograd.grad(yb, zb, gp)[0].nan_to_num())
    # unit_stats (vector planes and vector rows, per ISA) against torch's reductions
    for shape, ud in (((2, 3, 5, 9, 7), 2), ((2, 33, 4, 3), 2), ((3, 70, 37), 2), ((2, 5, 6, 19), 3)):
        for dtype in (torch.float32, torch.float64):
            y = torch.relu(torch.randn(shape, generator=g)).to(dtype)
            y.view(-1)[7] = float("nan")
            y.view(-1)[8] = -0.0
            for p in (1, 2):
                s, nz = torch.ops.minaction.unit_stats(y, p, ud)
                dims = tuple(d for d in range(1, y.dim()) if d != ud)
                ref = (y.double().abs() ** p).sum(dims)
                torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-9, equal_nan=True)
                assert nz.tolist() == ((y != 0) | y.isnan()).flatten(1).sum(1).double().tolist()
    print("OK")
""")


@pytest.mark.parametrize("isa", cpu_backend.ISAS)
def test_every_isa_build_matches_reference(isa):
    best = cpu_backend.cpu_isa()
    if cpu_backend.ISAS.index(isa) > cpu_backend.ISAS.index(best):
        pytest.skip(f"this CPU supports at most the {best} build; a {isa} build cannot run here")
    env = dict(os.environ, MINACTION_CPU_ISA=isa, OMP_NUM_THREADS="1")
    # hang guard only (a first build of this ISA takes 1-3 min on a loaded 2-core machine)
    r = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"ISA {isa}" in r.stdout and "OK" in r.stdout


# ----------------------------------------------------------------------------- double backward
GG_CASES = [("relu", "l2", False), ("gelu", "l1", False), ("tanh", "l2", True), ("sigmoid", None, False),
            ("silu", "l2", True), ("identity", "l1", True), ("gelu_tanh", "l2", True)]


@pytest.mark.parametrize("backend", ["cpu", "composite"])
@pytest.mark.parametrize("act,energy,batched", GG_CASES)
def test_gradgradcheck_float64(backend, act, energy, batched):
    g = torch.Generator().manual_seed(7)
    lead = (2,) if batched else ()
    x = torch.randn(lead + (4, 3), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(lead + (5, 3), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(lead + (5,), generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return energy_linear(x, w, b, act, energy, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "composite"])
def test_activation_energy_gradgradcheck(backend):
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z: activation_energy(z, "gelu", "l2", backend=backend), (z,))


@pytest.mark.parametrize("backend", ["cpu", "composite"])
@pytest.mark.parametrize("num_models", [None, 3])
def test_gradient_penalty_step_matches_reference(backend, num_models):
    """A WGAN-GP style step: loss + ||d loss / d x||^2; the weight gradient must equal the reference
    (it was silently zero on `cpu`)."""
    results = {}
    for be in ("reference", backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            minaction.nn.EnergyLinear(6, 8, activation="tanh", energy="l2", num_models=num_models, backend=be,
                                      dtype=torch.float64),
            minaction.nn.EnergyLinear(8, 4, activation="relu", energy="l1", num_models=num_models, backend=be,
                                      dtype=torch.float64))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 6, dtype=torch.float64)
        for _ in range(2):
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            loss = out.pow(2).mean() + 0.1 * minaction.total_energy(model).sum()  # [G] when batched
            gx, = torch.autograd.grad(loss, xi, create_graph=True)
            total = loss + gx.pow(2).sum()
            opt.zero_grad()
            total.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
        results[be] = grads + [p.detach().clone() for p in model.parameters()]
    for a, c in zip(results[backend], results["reference"]):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in results[backend][:4])


def test_first_order_backward_still_uses_the_kernels():
    """Without create_graph the gradients carry no graph (the kernel path, not the recomputation)."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y, e = energy_linear(x, w, None, "relu", "l2", backend="cpu")
    gx, gw = torch.autograd.grad((y.sum() + e), (x, w))
    assert gx.grad_fn is None and gw.grad_fn is None
    y, e = energy_linear(x, w, None, "relu", "l2", backend="cpu")
    gx, gw = torch.autograd.grad((y.sum() + e), (x, w), create_graph=True)
    assert gx.grad_fn is not None and gw.grad_fn is not None


# ----------------------------------------------------------------------------- activation_energy: one C++ op
def _profiled_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [ev.name for ev in prof.events()]


@pytest.mark.parametrize("backend", ["cpu", None])
@pytest.mark.parametrize("act,groups", [("relu", 0), ("gelu", 3)])
def test_activation_energy_cpu_is_one_op_per_direction(backend, act, groups):
    """The cpu path is one call of minaction::epilogue forward (C++ autograd), one act_bwd backward;
    the Python custom op minaction::activation_energy is not involved."""
    shape = (groups, 4, 3, 5) if groups else (4, 3, 5)
    z = torch.randn(shape, requires_grad=True)
    out = {}
    fwd = _profiled_ops(lambda: out.update(ye=activation_energy(z, act, "l2", groups=groups, backend=backend)))
    y, e = out["ye"]
    bwd = _profiled_ops(lambda: (y.sum() + e.sum()).backward())
    mine = [n for n in fwd + bwd if n.startswith("minaction::")]
    assert fwd.count("minaction::epilogue") == 1, fwd
    assert mine.count("minaction::act_fwd") == 1 and mine.count("minaction::act_bwd") == 1, mine
    assert not any("activation_energy" in n for n in mine), mine
    assert any("ActEnergyFn" in n for n in bwd), bwd  # the C++ autograd node ran the backward
    assert z.grad is not None and z.grad.shape == z.shape


CASES_AE = [(a, en, red, grp) for a in ACTIVATIONS for en, red in [("l2", "sum"), ("l1", "mean"), (None, "sum")]
            for grp in (0, 2)]


@pytest.mark.parametrize("act,energy,reduction,groups", CASES_AE)
def test_activation_energy_cpu_gradcheck_gradgradcheck(act, energy, reduction, groups):
    g = torch.Generator().manual_seed(11)
    shape = (groups, 3, 2, 3) if groups else (3, 2, 3)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    z = (z + 0.1 * z.sign()).requires_grad_(True)  # away from relu's kink

    def fn(t):
        return activation_energy(t, act, energy, reduction, groups=groups, backend="cpu")

    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))
    # and the op itself, called directly
    code = minaction.backends.ACT_CODES[act]
    p = {"l2": 2, "l1": 1, None: 0}[energy]
    op = torch.ops.minaction.epilogue.default
    assert torch.autograd.gradcheck(lambda t: op(t, code, p, reduction == "mean", groups), (z,))


def test_activation_energy_cpu_matches_reference_noncontiguous_and_unused_outputs():
    g = torch.Generator().manual_seed(3)
    base = _with_specials(torch.randn(6, 4, 5, generator=g, dtype=torch.float64), 2)
    z = base.transpose(1, 2)  # not contiguous
    for act in ACTIVATIONS:
        for uses in ("y", "e", "both"):
            res = {}
            for be in ("reference", "cpu"):
                zz = z.detach().clone().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
                assert not zz.is_contiguous()
                y, e = activation_energy(zz, act, "l2", "mean", backend=be)
                loss = {"y": y.sum(), "e": e, "both": (y * 0.3).sum() + 2 * e}[uses]
                if not loss.requires_grad:
                    continue
                gz, = torch.autograd.grad(loss, zz)
                res[be] = (y.detach(), e.detach(), gz)
            for what, a, c in zip(("y", "energy", "grad z"), res["cpu"], res["reference"]):
                _same(a, c, f"{act} {uses} {what}", rtol=1e-10, atol=1e-10)


def test_activation_energy_cpu_opcheck_and_modes():
    from torch.library import opcheck

    ops = torch.ops.minaction
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    opcheck(ops.epilogue.default, (z, 1, 2, False, 0))
    opcheck(ops.epilogue.default, (torch.randn(2, 4, 6), 2, 1, True, 2))
    ref = activation_energy(z.detach(), "silu", "l2", groups=4, backend="reference")
    with torch.inference_mode():  # below autograd: the CompositeExplicitAutograd kernel
        y, e = activation_energy(z.detach(), "silu", "l2", groups=4, backend="cpu")
    torch.testing.assert_close((y, e), ref)
    with torch.no_grad():
        y, e = activation_energy(z, "silu", "l2", groups=4, backend="cpu")
    assert not y.requires_grad and e.shape == (4,)
    y, e = activation_energy(torch.randn(0, 3), "relu", "l2", "mean", backend="cpu")  # empty batch
    assert y.shape == (0, 3) and e.item() == 0.0
    for dtype in (torch.bfloat16, torch.float16):
        zl = torch.randn(5, 7).to(dtype)
        y, e = activation_energy(zl, "gelu", "l2", backend="cpu")
        yr, er = activation_energy(zl, "gelu", "l2", backend="reference")
        assert y.dtype == dtype and e.dtype == torch.float32
        torch.testing.assert_close((y.float(), e), (yr.float(), er), rtol=2e-2, atol=2e-2)


def test_activation_energy_cpu_transforms_take_reference_path():
    z = torch.randn(3, 4, dtype=torch.float64)
    g_cpu = torch.func.grad(lambda t: activation_energy(t, "tanh", "l2", backend="cpu")[1])(z)
    zz = z.clone().requires_grad_(True)
    g_ref, = torch.autograd.grad(activation_energy(zz, "tanh", "l2", backend="reference")[1], zz)
    torch.testing.assert_close(g_cpu, g_ref)

    class M(torch.nn.Module):
        def forward(self, t):
            return activation_energy(t, "relu", "l1", backend="cpu")

    ep = torch.export.export(M(), (torch.randn(3, 4),))
    assert "minaction" not in str(ep.graph)


def test_activation_energy_cpu_clear_errors():
    z = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="expected 3 models"):
        activation_energy(z, groups=3, backend="cpu")
    with pytest.raises(ValueError, match="no batch dimension"):
        activation_energy(torch.randn(()), backend="cpu")
    with pytest.raises(ValueError, match="groups must be"):
        activation_energy(z, groups=-1, backend="cpu")
    with pytest.raises(ValueError, match="groups must be"):
        activation_energy(z, groups=2.0, backend="cpu")
    with pytest.raises(ValueError, match="groups must be"):
        activation_energy(z, groups=True, backend="cpu")
    import numpy as np

    y, e = activation_energy(z, groups=np.int64(2), backend="cpu")  # an integer-like is accepted
    assert e.shape == (2,)
    with pytest.raises(TypeError, match="dtype"):
        activation_energy(z.long(), backend="cpu")
    with pytest.raises(ValueError, match="activation must be"):
        activation_energy(z, "swish", backend="cpu")
    op = torch.ops.minaction.epilogue.default  # the op's own checks, without the Python front
    with pytest.raises(RuntimeError, match="expected 3 models"):
        op(z, 1, 2, False, 3)
    with pytest.raises(RuntimeError, match="no batch dimension"):
        op(torch.randn(4), 1, 2, False, 4)
    with pytest.raises(RuntimeError, match="energy exponent"):
        op(z, 1, 3, False, 0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(z, 9, 2, False, 0)


def test_activation_energy_cpu_under_compile():
    """torch.compile traces minaction::epilogue's C++ autograd with fake tensors (act_fwd/act_bwd fakes)."""
    def f(z):
        y, e = activation_energy(z, "gelu", "l2", groups=2, backend="cpu")
        return y.sum() + e.sum()

    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(z)
    g, = torch.autograd.grad(out, z)
    ref = f(z)
    g0, = torch.autograd.grad(ref, z)
    torch.testing.assert_close((out, g), (ref, g0))


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "identity", "gelu"])
@pytest.mark.parametrize("energy", ["l2", "l1"])
@pytest.mark.parametrize("groups", [0, 2])
def test_activation_energy_gradient_of_the_energy_alone(act, energy, groups):
    """The energy's gradient when the activation's output reaches no loss (an ActivationObserver's pass): relu,
    tanh, sigmoid and identity take it from y in two passes, with no zero gradient of y; equal to the reference
    backend's (float64, gradcheck) and to it within rounding in bfloat16."""
    g = torch.Generator().manual_seed(3)
    shape = (groups, 4, 3, 5) if groups else (4, 3, 5)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    z = (z + 0.1 * z.sign()).requires_grad_(True)  # away from relu's kink
    gs = []
    for backend in ("cpu", "reference"):
        e = activation_energy(z, act, energy, groups=groups, backend=backend)[1]
        w = torch.arange(1.0, e.numel() + 1, dtype=e.dtype).reshape(e.shape)
        gs.append(torch.autograd.grad((e * w).sum(), z)[0])
    torch.testing.assert_close(gs[0], gs[1], rtol=1e-12, atol=1e-14)
    e = activation_energy(z, act, energy, groups=groups, backend="cpu")[1]
    bwd = _profiled_ops(lambda: e.sum().backward())
    assert ("minaction::act_bwd" in bwd) == (act == "gelu"), bwd  # gelu reads z: the kernel
    assert torch.autograd.gradcheck(lambda t: activation_energy(t, act, energy, groups=groups, backend="cpu")[1], (z,))
    zb = z.detach().to(torch.bfloat16).requires_grad_(True)
    gb = torch.autograd.grad(activation_energy(zb, act, energy, groups=groups, backend="cpu")[1].sum(), zb)[0]
    zr = z.detach().to(torch.bfloat16).requires_grad_(True)
    gr = torch.autograd.grad(activation_energy(zr, act, energy, groups=groups, backend="reference")[1].sum(), zr)[0]
    torch.testing.assert_close(gb.float(), gr.float(), rtol=2e-2, atol=2e-2)
