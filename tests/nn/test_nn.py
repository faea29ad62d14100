"""EnergyLinear as a drop-in layer: state_dict, convert, total_energy, energy_report, errors, backends."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from minaction.backends import select as mbackend
from minaction.nn import EnergyActivation, EnergyLinear


def test_state_dict_round_trip_with_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7)
    el = EnergyLinear(13, 7, activation="gelu")
    el.load_state_dict(lin.state_dict())
    x = torch.randn(5, 13)
    torch.testing.assert_close(el(x), F.gelu(lin(x)))
    lin2 = nn.Linear(13, 7)
    lin2.load_state_dict(el.state_dict())
    torch.testing.assert_close(lin2.weight, lin.weight)
    # same default initialisation distribution as nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert float(EnergyLinear(400, 300).weight.detach().abs().max()) <= 1 / 20 + 1e-7


def test_last_energy_and_total_energy_train_the_objective():
    torch.manual_seed(0)
    model = nn.Sequential(EnergyLinear(6, 8), EnergyLinear(8, 8, energy="l1"),
                          EnergyLinear(8, 3, activation="identity", energy=None))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with pytest.raises(RuntimeError, match="forward"):
        minaction.total_energy(model)
    out = model(x)
    h1 = torch.relu(F.linear(x, model[0].weight, model[0].bias))
    h2 = torch.relu(F.linear(h1, model[1].weight, model[1].bias))
    expected = (h1 ** 2).sum(1).mean() + h2.abs().sum(1).mean()
    e = minaction.total_energy(model)
    assert e.dim() == 0 and e.requires_grad
    torch.testing.assert_close(e, expected)
    loss = F.cross_entropy(out, y) + 1e-2 * e
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="no energy layers"):
        minaction.total_energy(nn.Sequential(nn.Linear(2, 2)))


def test_energy_reduction_mean_is_per_unit():
    torch.manual_seed(0)
    a, b = EnergyLinear(4, 6), EnergyLinear(4, 6, energy_reduction="mean")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4)
    a(x), b(x)
    torch.testing.assert_close(b.last_energy, a.last_energy / 6)


def test_convert_keeps_outputs_and_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(),
                          nn.Sequential(nn.Linear(9, 4), nn.SiLU()), nn.Linear(4, 2))
    x = torch.randn(7, 5)
    before = model(x)
    w0 = model[0].weight.detach().clone()
    minaction.convert(model, energy="l2")
    assert isinstance(model[0], EnergyLinear) and model[0].activation == "relu"
    assert isinstance(model[2], EnergyLinear) and model[2].activation == "tanh"
    assert isinstance(model[4][0], EnergyLinear) and model[4][0].activation == "silu"
    assert isinstance(model[5], nn.Linear)  # a Linear with no activation after it stays
    torch.testing.assert_close(model[0].weight, w0)
    torch.testing.assert_close(model(x), before)
    assert minaction.total_energy(model).item() > 0


def test_energy_report_columns_and_values():
    torch.manual_seed(0)
    model = nn.Sequential(EnergyLinear(6, 8), EnergyLinear(8, 3, activation="identity", energy=None))
    with torch.no_grad():
        model[0].weight[0].zero_()
    x = torch.randn(11, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it builds no graph: float() of an energy that requires grad warned
        df = minaction.energy_report(model, x)
    assert model[0].last_energy.grad_fn is None
    assert list(df.layer) == ["0", "1", "total"]
    assert {"energy", "units", "active_fraction", "weight_density", "flops", "counted"} <= set(df.columns)
    assert df.loc[0, "flops"] == 2 * 11 * 6 * 8 + 11 * 8
    assert df.loc[0, "weight_density"] == pytest.approx(7 / 8)
    h = torch.relu(F.linear(x, model[0].weight, model[0].bias))
    assert df.loc[0, "energy"] == pytest.approx(float((h.detach() ** 2).sum(1).mean()), rel=1e-5)
    assert df.loc[2, "energy"] == pytest.approx(df.loc[0, "energy"])  # the logits layer is not counted
    assert df.loc[0, "active_fraction"] == pytest.approx(float((h != 0).float().mean()))
    assert df.loc[0, "units"] == 8


def test_energy_report_units_are_what_one_row_of_the_energy_sums_over():
    """A Linear's units are its outputs per token, whatever the context length (a GPT's c_fc read 4096 units at
    T = 32 and 2048 at T = 16, session 24); a conv's are C·H·W of one sample, one member's for num_models."""
    from minaction.nn import EnergyConv2d

    gpt = nn.Sequential(EnergyLinear(32, 128, activation="gelu", energy_reduction="mean"),
                        EnergyActivation("gelu", rows="leading"))
    for T in (32, 16):
        df = minaction.energy_report(gpt, torch.randn(8, T, 32))
        assert df.loc[0, "units"] == 128 and df.loc[1, "units"] == 128
    conv = nn.Sequential(EnergyConv2d(1, 4, 3, padding=1))
    assert minaction.energy_report(conv, torch.randn(2, 1, 5, 6)).loc[0, "units"] == 4 * 5 * 6
    batched = nn.Sequential(EnergyConv2d(1, 4, 3, padding=1, num_models=3))
    assert minaction.energy_report(batched, torch.randn(2, 1, 5, 6)).loc[0, "units"] == 4 * 5 * 6
    per_sample = nn.Sequential(EnergyActivation("relu"))
    assert minaction.energy_report(per_sample, torch.randn(2, 3, 4)).loc[0, "units"] == 12


def test_energy_report_of_a_model_with_several_inputs_and_its_argument_checks():
    """A Siamese net's forward takes two inputs: the report passes every input on (it took one tensor, so such
    models could not be reported), one row per call; rel_tol is keyword-only and checked."""
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = nn.Sequential(EnergyLinear(4, 8), nn.Linear(8, 2))

        def forward(self, a, b, scale=1.0):
            return scale * (self.tower(a) - self.tower(b))

    torch.manual_seed(0)
    model, a, b = Siamese(), torch.randn(3, 4), torch.randn(3, 4)
    df = minaction.energy_report(model, a, b, scale=2.0)
    assert list(df.layer) == ["tower.0", "tower.0", "total"]
    for i, x in enumerate((a, b)):
        h = torch.relu(F.linear(x, model.tower[0].weight, model.tower[0].bias))
        assert df.loc[i, "energy"] == pytest.approx(float(h.detach().square().sum(1).mean()), rel=1e-5)
    for old_rel_tol in (1e-2, 0, np.float32(1e-2), torch.tensor(1e-2)):  # the old positional rel_tol
        with pytest.raises(TypeError, match="rel_tol is keyword-only"):
            minaction.energy_report(nn.Sequential(EnergyLinear(4, 8)), a, old_rel_tol)

    class Scaled(nn.Module):  # a number that the model does take as its second input is an input
        def __init__(self):
            super().__init__()
            self.lin = EnergyLinear(4, 8)

        def forward(self, x, scale):
            return self.lin(x) * scale

    assert list(minaction.energy_report(Scaled(), a, 2.0).layer) == ["lin", "total"]
    for bad, err in (("x", TypeError), (True, TypeError), (-1, ValueError), (5, ValueError)):
        with pytest.raises(err, match="rel_tol must be a number"):
            minaction.energy_report(model, a, b, rel_tol=bad)


def test_penalty_and_size_arguments_are_checked_not_read_loosely():
    """A falsy None / '' / [] penalty was read as 0 and a 1-D tensor raised torch's "Boolean value of Tensor
    ... ambiguous"; EnergyLinear(None, 4) raised "'<' not supported"; a dtype given as a string read as if
    float32 were refused. Each now names the argument."""
    model = nn.Sequential(EnergyLinear(2, 3))
    for bad in (None, "", [], torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match="penalty must be a"):
            EnergyLinear(2, 3, penalty=bad)
        with pytest.raises(TypeError, match="penalty must be a"):
            model[0].penalty = bad
        with pytest.raises(TypeError, match="penalty must be a"):
            minaction.set_penalty(model, bad)
    for ok in (0, 0.0, 1e-3):
        assert minaction.set_penalty(model, ok) == 1 and model[0].penalty == float(ok)
    with pytest.raises(TypeError, match="in_features must be an int, got None"):
        EnergyLinear(None, 4)
    with pytest.raises(TypeError, match="a string: pass torch.float32"):
        EnergyLinear(2, 4, dtype="float32")


def test_batched_layer_shapes_and_reset():
    el = EnergyLinear(4, 3, num_models=5)
    assert el.weight.shape == (5, 3, 4) and el.bias.shape == (5, 3)
    y = el(torch.randn(7, 4))
    assert y.shape == (5, 7, 3) and el.last_energy.shape == (5,)
    g = torch.Generator().manual_seed(3)
    el.reset_parameters(generator=g, model=2)
    ref = EnergyLinear(4, 3)
    ref.reset_parameters(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(el.weight[2], ref.weight)
    torch.testing.assert_close(el.bias[2], ref.bias)


@pytest.mark.parametrize("bad", [
    dict(x=torch.randn(3, 5), match="expects 4 input features"),
    dict(x=torch.randn(3, 4, dtype=torch.float64), match="dtype"),
    dict(x=torch.randint(0, 3, (3, 4)), match="dtype"),
    dict(x="not a tensor", match="torch.Tensor"),
])
def test_bad_input_errors_name_the_problem(bad):
    el = EnergyLinear(4, 2)
    with pytest.raises((ValueError, TypeError), match=bad["match"]):
        el(bad["x"])


def test_bad_options():
    with pytest.raises(ValueError, match="activation"):
        EnergyLinear(2, 2, activation="swish")
    with pytest.raises(ValueError, match="energy"):
        EnergyLinear(2, 2, energy="l3")
    with pytest.raises(ValueError, match="energy_reduction"):
        EnergyLinear(2, 2, energy_reduction="max")
    with pytest.raises(ValueError, match=">= 0"):
        EnergyLinear(-1, 2)
    el = EnergyLinear(3, 2, num_models=4)
    with pytest.raises(ValueError, match="4 models"):
        el(torch.randn(3, 5, 3))


@pytest.mark.parametrize("k, n", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("G", [None, 2])
def test_zero_features_as_nn_linear(k, n, G):
    """nn.Linear(0, N) and nn.Linear(K, 0) are legal; EnergyLinear raised on them. With no inputs the output
    is act(bias), and nn.Linear's bias bound is then 0."""
    layer = EnergyLinear(k, n, num_models=G)
    x = torch.randn(3, k, requires_grad=True)
    y = layer(x)
    assert y.shape == ((3, n) if G is None else (G, 3, n))
    (y.sum() + layer.last_energy.sum()).backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
    if k == 0:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)) and not y.any()


def test_backend_selection_and_info(monkeypatch):
    info = minaction.backend_info("cpu")
    cpu = info["devices"]["cpu"]
    assert cpu["active"] in mbackend.BACKENDS
    assert cpu["available"]["reference"]["ok"]
    monkeypatch.setenv("MINACTION_BACKEND", "reference")
    assert mbackend.select(torch.device("cpu")) == "reference"
    monkeypatch.setenv("MINACTION_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="forced"):
        mbackend.select(torch.device("cpu"))
    monkeypatch.setenv("MINACTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown minaction backend"):
        mbackend.select(torch.device("cpu"))
    monkeypatch.delenv("MINACTION_BACKEND")
    with minaction.use_backend("reference"):
        assert mbackend.select(torch.device("cpu")) == "reference"
    assert mbackend.select(torch.device("cpu")) == ("cpu" if mbackend.available("cpu")[0] else "reference")


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(mbackend, "_AUTO_ORDER", {"cpu": ("cuda",)})
    monkeypatch.setattr(mbackend, "_select_cache", {})
    monkeypatch.setattr(mbackend, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert mbackend.select(torch.device("cpu")) == "reference"
        monkeypatch.setattr(mbackend, "_select_cache", {})
        assert mbackend.select(torch.device("cpu")) == "reference"
    msgs = [str(w.message) for w in rec if "reference" in str(w.message)]
    assert len(msgs) == 1 and "cuda" in msgs[0]


def test_backend_info_first_leaves_the_fallback_warning_to_the_forward(monkeypatch):
    """backend_info() before the first forward used up the one fallback warning and cached the choice: the
    forward then ran on the reference path without a word. It now says why itself ("fallback") and the
    forward still warns once."""
    monkeypatch.setattr(mbackend, "_AUTO_ORDER", {"cpu": ("cuda",)})
    monkeypatch.setattr(mbackend, "_select_cache", {})
    monkeypatch.setattr(mbackend, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        info = minaction.backend_info("cpu")["devices"]["cpu"]
        assert rec == []
        assert info["active"] == "reference" and info["fallback"].startswith("cuda: ")
        EnergyLinear(3, 2)(torch.randn(4, 3))
        assert minaction.backend_info("cpu")["devices"]["cpu"]["fallback"] == info["fallback"]  # after the warning too
        EnergyLinear(3, 2)(torch.randn(4, 3))
    msgs = [str(w.message) for w in rec if "slow 'reference' backend" in str(w.message)]
    assert len(msgs) == 1 and "cuda" in msgs[0]


def test_meta_device_computes_shapes_without_a_speed_warning(monkeypatch):
    """Meta tensors (shape inference, ``torch.device("meta")`` construction) take the reference
    path silently: the slow-backend warning is about speed, and meta tensors compute nothing."""
    monkeypatch.setattr(mbackend, "_select_cache", {})
    monkeypatch.setattr(mbackend, "_warned", set())
    model = nn.Sequential(EnergyLinear(20, 16), EnergyLinear(16, 8, activation="tanh")).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(torch.empty(32, 20, device="meta"))
        e = minaction.total_energy(model)
    assert out.shape == (32, 8) and out.is_meta and e.shape == () and e.is_meta


@pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_training_run_matches_reference(dtype, tol):
    """200 Adam steps of a small MLP on fixed data: the fused loss curve follows the reference's."""
    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(EnergyLinear(20, 32, backend=backend), EnergyLinear(32, 32, activation="tanh",
                                                                                  backend=backend),
                              nn.Linear(32, 4)).to(dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(64, 20, generator=gen).to(dtype)
        y = (x[:, :4].argmax(1))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(200):
            loss = F.cross_entropy(model(x), y) + 1e-3 * minaction.total_energy(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    ref, fused = run("reference"), run("cpu")
    assert ref[-1] < 0.5 * ref[0]  # it actually trains
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the cached fast path
@pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")
def test_forward_reuses_its_plan_and_drops_it_when_a_fact_changes(monkeypatch):
    from minaction.nn import layers as layers_mod

    calls = []
    full = layers_mod.energy_linear

    def counting(*a, **k):
        calls.append(1)
        return full(*a, **k)

    monkeypatch.setattr(layers_mod, "energy_linear", counting)
    torch.manual_seed(0)
    el = minaction.nn.EnergyLinear(5, 4)
    x = torch.randn(6, 5)
    y0 = el(x)
    y1 = el(x)
    assert len(calls) == 1  # the second call ran the plan: one C++ op, no re-validation
    torch.testing.assert_close(y0, y1)
    ref = torch.relu(F.linear(x, el.weight, el.bias))
    torch.testing.assert_close(y1, ref)
    torch.testing.assert_close(el.last_energy, ref.pow(2).sum(1).mean())
    el(torch.randn(9, 5))  # another batch size: still the plan (the scale follows the rows)
    assert len(calls) == 1
    # bad input after a good one: the full path, with its clear errors
    with pytest.raises(ValueError, match="expects 5 input features"):
        el(torch.randn(6, 4))
    with pytest.raises(TypeError, match="dtype"):
        el(torch.randn(6, 5, dtype=torch.float64))
    n = len(calls)
    el.double()  # same Parameter objects, new dtype
    assert el(x.double()).dtype == torch.float64 and len(calls) == n + 1
    el(x.double())
    assert len(calls) == n + 1
    el.activation = "tanh"  # an option changed on the module
    y = el(x.double())
    assert len(calls) == n + 2
    torch.testing.assert_close(y, torch.tanh(F.linear(x.double(), el.weight, el.bias)))
    with minaction.use_backend("reference"):  # forcing changed
        el(x.double())
    assert len(calls) == n + 3
    monkeypatch.setenv("MINACTION_BACKEND", "reference")
    el(x.double())
    assert len(calls) == n + 4
    monkeypatch.delenv("MINACTION_BACKEND")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert el(x.double()).dtype == torch.float64  # autocast leaves float64 alone, via the full path
    assert len(calls) == n + 5
    el.weight = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))  # a new weight object
    torch.testing.assert_close(el(x.double()), torch.tanh(F.linear(x.double(), el.weight, el.bias)))
    assert len(calls) == n + 6


@pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")
def test_plan_falls_back_to_the_full_path_when_the_op_rejects_a_call():
    """The fast path leaves shape and dtype checks to the C++ op; whatever it rejects must
    reach the full path, which either handles the call or raises its clear error."""
    torch.manual_seed(0)
    el = minaction.nn.EnergyLinear(5, 4)
    x = torch.randn(6, 5)
    el(x)
    assert el.__dict__.get("_plan") is not None
    x3 = torch.randn(2, 3, 5)  # [B, T, K]: the op takes 2-D only, the full path flattens the rows
    y3 = el(x3)
    ref3 = torch.relu(F.linear(x3, el.weight, el.bias))
    torch.testing.assert_close(y3, ref3)
    torch.testing.assert_close(el.last_energy, ref3.pow(2).sum(-1).mean())
    x1 = torch.randn(5)  # one sample, as nn.Linear takes it
    torch.testing.assert_close(el(x1), torch.relu(F.linear(x1, el.weight, el.bias)))
    el(x)
    with torch.no_grad():
        el.weight.data = el.weight.data.double()  # same Parameter object, another dtype: no plan drop
    with pytest.raises(TypeError, match="dtype"):
        el(x)
    el.bias.data = el.bias.data.double()
    y = el(x.double())
    torch.testing.assert_close(y, torch.relu(F.linear(x.double(), el.weight, el.bias)))
    with torch.no_grad():
        el.bias.data = torch.zeros(1, dtype=torch.float64)  # a bias addmm would broadcast
    with pytest.raises(ValueError, match="bias must have shape"):
        el(x.double())


@pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")
def test_plan_is_not_copied_and_batched_layers_use_it(monkeypatch):
    import copy

    el = minaction.nn.EnergyLinear(3, 2, num_models=4)
    x = torch.randn(4, 5, 3)
    el(x)
    assert el.__dict__.get("_plan") is not None
    twin = copy.deepcopy(el)
    assert twin.__dict__.get("_plan") is None
    y = el(x)
    ref = torch.relu(torch.baddbmm(el.bias.unsqueeze(1), x, el.weight.transpose(1, 2)))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(el.last_energy, ref.pow(2).sum(2).mean(1))
    with pytest.raises(ValueError, match="batched layer with 4 models"):
        el(torch.randn(3, 5, 3))


@pytest.mark.parametrize("backend", ["cpu", "reference", "composite", "triton"])
def test_an_empty_batch_works_as_in_nn_linear_and_nn_conv(backend):
    """Zero rows (a mask that selects nothing, an expert that gets no tokens): outputs and gradients
    have the plain layers' shapes, every energy is 0 and the weight gradients are 0, on every
    backend, for plain and batched linear and conv layers and the fused conv + pool block."""
    ok, why = mbackend.available(backend, "cpu")
    if not ok:
        pytest.skip(why)
    from minaction.nn import EnergyConv2d

    torch.manual_seed(0)
    layers = [(EnergyLinear(5, 3, backend=backend), (0, 5), (0, 3), ()),
              (EnergyLinear(5, 3, num_models=2, backend=backend), (0, 5), (2, 0, 3), (2,)),
              (EnergyConv2d(2, 3, 3, backend=backend), (0, 2, 6, 6), (0, 3, 4, 4), ()),
              (EnergyConv2d(2, 3, 3, num_models=2, backend=backend), (0, 2, 6, 6), (0, 6, 4, 4), (2,))]
    for layer, x_shape, y_shape, e_shape in layers:
        x = torch.randn(x_shape, requires_grad=True)
        y = layer(x)
        e = layer.last_energy
        assert tuple(y.shape) == y_shape and tuple(e.shape) == e_shape and not e.any()
        (y.sum() + e.sum()).backward()
        assert tuple(x.grad.shape) == x_shape
        assert layer.weight.grad is not None and not layer.weight.grad.any()
        if isinstance(layer, EnergyConv2d):
            pooled = layer.forward_max_pool2(x.detach())
            assert tuple(pooled.shape) == y_shape[:2] + (2, 2) and not layer.last_energy.any()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_layers_refuse_a_dtype_the_kernels_do_not_compute_in_at_construction(dtype):
    """EnergyLinear(..., dtype=torch.complex64) was built and refused only at its first forward."""
    for build in (lambda: minaction.nn.EnergyLinear(3, 4, dtype=dtype),
                  lambda: minaction.nn.EnergyConv2d(3, 4, 3, dtype=dtype),
                  lambda: minaction.nn.EnergyConv1d(3, 4, 3, dtype=dtype)):
        with pytest.raises(TypeError, match=r"computes in float32, float64, bfloat16 or float16; got dtype=torch\."):
            build()
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert minaction.nn.EnergyLinear(3, 4, dtype=dt).weight.dtype == dt


@pytest.mark.parametrize("change", ["data", "set_"])
def test_mean_energy_follows_a_weight_whose_shape_changed_in_place(change):
    """energy_reduction='mean' divides by the unit count; the layer's cached call plan kept the first N while
    the same weight object changed shape (pruning units by `.data` slicing gave 3/8 of the energy, silently)."""
    torch.manual_seed(0)
    lay = EnergyLinear(5, 8, activation="tanh", energy_reduction="mean", dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    lay(x)
    assert lay.__dict__.get("_plan") is not None or not minaction.backends.select.available("cpu")[0]  # cached
    new_w, new_b = lay.weight.detach()[:3].clone(), lay.bias.detach()[:3].clone()
    if change == "data":
        lay.weight.data, lay.bias.data = new_w, new_b
    else:
        with torch.no_grad():
            lay.weight.set_(new_w)
            lay.bias.set_(new_b)
    y = lay(x)
    ref = torch.tanh(F.linear(x, new_w, new_b))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(lay.last_energy, (ref ** 2).sum(1).mean() / 3)
