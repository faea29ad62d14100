"""The in-layer penalty (``EnergyLinear(..., penalty=lam)``, ``minaction.set_penalty``): ``loss.backward()``
gives the gradients of ``loss + lam * E`` without ``E`` in the loss, on every backend and layer kind."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from minaction.backends import select as mbackend
from minaction.nn import EnergyConv1d, EnergyConv2d, EnergyLinear

LAM = 0.37
needs_cpu = pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")
BACKENDS = [pytest.param("cpu", marks=needs_cpu), "reference"]


def _models(backend, dtype):
    return {
        "linear": (lambda: nn.Sequential(EnergyLinear(13, 7, backend=backend),
                                         EnergyLinear(7, 5, activation="gelu", energy="l1", backend=backend),
                                         nn.Linear(5, 3)), (9, 13)),
        "linear-mean": (lambda: nn.Sequential(EnergyLinear(13, 6, activation="silu", energy_reduction="mean",
                                                           backend=backend)), (4, 2, 13)),
        "batched": (lambda: nn.Sequential(EnergyLinear(13, 7, num_models=3, backend=backend),
                                          EnergyLinear(7, 5, num_models=3, activation="tanh", backend=backend)),
                    (9, 13)),
        "conv2d": (lambda: nn.Sequential(EnergyConv2d(2, 4, 3, backend=backend),
                                         EnergyConv2d(4, 3, 3, activation="sigmoid", backend=backend)), (5, 2, 8, 8)),
        "conv-batched": (lambda: nn.Sequential(EnergyConv1d(2, 4, 3, num_models=2, backend=backend),
                                               EnergyConv1d(4, 3, 3, num_models=2, backend=backend)), (5, 2, 11)),
    }


def _explicit_and_penalised(make, shape, dtype, steps=1):
    """Gradients of ``f(y) + LAM * E`` (explicit) and of ``f(y)`` with the penalty in the layers, from
    the same weights; ``steps`` forwards (the second one takes the layer's cached plan)."""
    torch.manual_seed(0)
    m1 = make().to(dtype)
    m2 = copy.deepcopy(m1)
    assert minaction.set_penalty(m2, LAM) >= 1
    x = torch.randn(shape, dtype=dtype)
    for _ in range(steps):
        for m in (m1, m2):
            for p in m.parameters():
                p.grad = None
        out1 = m1(x)
        (out1.sin().sum() + LAM * minaction.total_energy(m1).sum()).backward()
        m2(x).sin().sum().backward()
    return list(m1.parameters()), list(m2.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "linear-mean", "batched", "conv2d", "conv-batched"])
def test_penalty_gives_the_gradients_of_the_explicit_loss(backend, kind):
    make, shape = _models(backend, torch.float64)[kind]
    for steps in (1, 2):  # the second forward runs the cached plan (the C++ fast path)
        p1, p2 = _explicit_and_penalised(make, shape, torch.float64, steps)
        for a, b in zip(p1, p2):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


@needs_cpu
def test_cpu_linear_penalty_is_bitwise_the_explicit_gradient_in_float32():
    make, shape = _models("cpu", torch.float32)["linear"]
    p1, p2 = _explicit_and_penalised(make, shape, torch.float32, steps=2)
    for a, b in zip(p1, p2):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_adds_to_an_energy_that_is_also_in_the_loss(backend):
    """``penalty = a`` plus ``b * E`` in the loss trains ``(a + b) * E``."""
    torch.manual_seed(0)
    m1 = nn.Sequential(EnergyLinear(6, 5, backend=backend)).double()
    m2 = copy.deepcopy(m1)
    m2[0].penalty = 0.25
    x = torch.randn(4, 6, dtype=torch.float64)
    (m1(x).sum() + 0.75 * minaction.total_energy(m1)).backward()
    (m2(x).sum() + 0.5 * minaction.total_energy(m2)).backward()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_in_a_double_backward(backend):
    """``create_graph=True`` (gradient penalties): first and second derivatives as with the explicit loss."""
    torch.manual_seed(0)
    m1 = nn.Sequential(EnergyLinear(6, 5, activation="gelu", backend=backend)).double()
    m2 = copy.deepcopy(m1)
    minaction.set_penalty(m2, LAM)
    x1 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g1, = torch.autograd.grad(m1(x1).sin().sum() + LAM * minaction.total_energy(m1), x1, create_graph=True)
    g2, = torch.autograd.grad(m2(x2).sin().sum(), x2, create_graph=True)
    torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-12)
    g1.pow(2).sum().backward()
    g2.pow(2).sum().backward()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_the_penalty_matches_the_explicit_loss(backend):
    torch.manual_seed(0)
    m1 = nn.Sequential(EnergyLinear(10, 16, backend=backend), EnergyLinear(16, 16, backend=backend),
                       EnergyLinear(16, 4, activation="identity", energy=None, backend=backend)).double()
    m2 = copy.deepcopy(m1)
    minaction.set_penalty(m2, 1e-2)
    o1, o2 = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (m1, m2))
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 4, (32,))
    for _ in range(15):
        o1.zero_grad()
        o2.zero_grad()
        (F.cross_entropy(m1(x), y) + 1e-2 * minaction.total_energy(m1)).backward()
        F.cross_entropy(m2(x), y).backward()
        o1.step()
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    # the energy is still reported, and the penalty lowered it against lam = 0
    assert minaction.total_energy(m2).item() > 0


def test_penalty_under_torch_func_grad():
    torch.manual_seed(0)
    m = nn.Sequential(EnergyLinear(6, 5), EnergyLinear(5, 3, activation="identity", energy=None)).double()
    params = dict(m.named_parameters())
    x = torch.randn(4, 6, dtype=torch.float64)

    def explicit(p):
        out = torch.func.functional_call(m, p, (x,))
        return out.sum() + LAM * minaction.total_energy(m)

    g1 = torch.func.grad(explicit)(params)
    m[0].penalty = LAM
    g2 = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).sum())(params)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-12, atol=1e-12)


@needs_cpu
def test_assigning_penalty_drops_the_cached_plan():
    torch.manual_seed(0)
    layer = EnergyLinear(6, 5).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).sum().backward()  # builds the plan with penalty 0
    g0 = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.penalty = LAM
    layer(x).sum().backward()
    layer.weight.grad, g1 = None, layer.weight.grad
    (layer(x).sum() + 0 * layer.last_energy).backward()
    ref = copy.deepcopy(layer)
    ref.penalty = 0
    (ref(x).sum() + LAM * ref.last_energy).backward()
    torch.testing.assert_close(g1, ref.weight.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g0, g1)
    layer.penalty = 0
    layer.weight.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, g0, rtol=0, atol=0)


def test_penalty_survives_copies_and_shows_in_repr():
    layer = EnergyLinear(3, 4, penalty=1e-3)
    assert "penalty=0.001" in repr(layer)
    assert copy.deepcopy(layer).penalty == 1e-3
    assert pickle.loads(pickle.dumps(layer)).penalty == 1e-3
    state = layer.__getstate__()
    del state["penalty"]  # a pickle from before the penalty existed
    old = EnergyLinear.__new__(EnergyLinear)
    old.__setstate__(state)
    assert old.penalty == 0.0


@pytest.mark.parametrize("bad,err,match", [
    (-1.0, ValueError, ">= 0"), (float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"),
    (torch.tensor(0.1), TypeError, "Python number"), ("0.1", TypeError, "number"), (True, TypeError, "number"),
])
def test_bad_penalty_is_refused_with_its_reason(bad, err, match):
    with pytest.raises(err, match=match):
        EnergyLinear(3, 4, penalty=bad)
    layer = EnergyLinear(3, 4)
    with pytest.raises(err, match=match):
        layer.penalty = bad
    with pytest.raises(err, match=match):
        minaction.set_penalty(nn.Sequential(layer), bad)
    with pytest.raises(err, match=match):
        minaction.ops.energy_linear(torch.randn(2, 3), layer.weight, layer.bias, penalty=bad)


def test_penalty_needs_an_energy():
    with pytest.raises(ValueError, match="energy=None"):
        EnergyLinear(3, 4, energy=None, penalty=0.1)
    with pytest.raises(ValueError, match="energy=None"):
        EnergyConv2d(1, 2, 3, energy=None, penalty=0.1)
    with pytest.raises(ValueError, match="no energy layers"):
        minaction.set_penalty(nn.Sequential(nn.Linear(3, 4)), 0.1)
    # set_penalty skips the uncounted logits layer
    model = nn.Sequential(EnergyLinear(3, 4), EnergyLinear(4, 2, activation="identity", energy=None))
    assert minaction.set_penalty(model, 0.1) == 1
    assert model[0].penalty == 0.1 and model[1].penalty == 0.0
    assert minaction.set_penalty(model, 0) == 1 and model[0].penalty == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_counts_once_per_forward(backend):
    """Two backwards through one forward (retain_graph) add the penalty once, as ``lam * E`` in the
    first loss would."""
    torch.manual_seed(0)
    m1 = nn.Sequential(EnergyLinear(6, 5, backend=backend)).double()
    m2 = copy.deepcopy(m1)
    m2[0].penalty = LAM
    x = torch.randn(4, 6, dtype=torch.float64)
    out1, out2 = m1(x), m2(x)
    (out1.sum() + LAM * m1[0].last_energy).backward(retain_graph=True)
    out1.pow(3).sum().backward()
    out2.sum().backward(retain_graph=True)
    out2.pow(3).sum().backward()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


@needs_cpu
def test_penalty_ops_pass_opcheck():
    """The C++ ops with their penalty argument: schema, fake (compile), autograd registration, AOT dispatch."""
    from torch.library import opcheck

    from minaction.backends import cpu

    cpu.load()
    ops = torch.ops.minaction
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opcheck(ops.layer.default, (x, w, b, 1, 2, 0.2, 0.3))
    opcheck(ops.epilogue.default, (torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True), 1, 2, False, 0, 0.3))
    opcheck(ops.epilogue.default, (torch.randn(2, 4, 6, requires_grad=True), 2, 1, True, 2, 0.5))



@needs_cpu
def test_penalty_under_torch_compile():
    """A compiled model with the penalty (the backward is traced once) trains the explicit objective, step after step."""
    torch.manual_seed(0)
    m1 = nn.Sequential(EnergyLinear(8, 6), EnergyLinear(6, 6), nn.Linear(6, 3))
    m2 = copy.deepcopy(m1)
    minaction.set_penalty(m2, LAM)
    c2 = torch.compile(m2)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    for _ in range(2):
        for m in (m1, m2):
            for p in m.parameters():
                p.grad = None
        (F.cross_entropy(m1(x), y) + LAM * minaction.total_energy(m1)).backward()
        F.cross_entropy(c2(x), y).backward()
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
