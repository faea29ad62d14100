"""Activation *calls* that no module conversion can replace — ``F.relu(self.bn1(self.conv1(x)))`` in
kuangliu's CIFAR ResNets, torchvision's GoogLeNet/Inception ``BasicConv2d`` (in place), a block
returning ``F.relu(out)`` after its residual add, ``torch.tanh(self.fc(x))`` — get an
``ActivationObserver``: a forward hook that counts the activation's energy and leaves the model's
values and gradients as they were."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from doubles.lockstep import train_in_lockstep
from minaction.nn import ActivationObserver, EnergyActivation, EnergyLinear

torch.set_num_threads(1)
LAM = 0.05


class KBlock(nn.Module):
    """kuangliu/pytorch-cifar's BasicBlock, verbatim in structure."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class KResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(KBlock(4, 4), KBlock(4, 6, 2))
        self.linear = nn.Linear(6, 5)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = F.adaptive_avg_pool2d(out, 1).view(out.size(0), -1)
        return self.linear(out)


class BasicConv2d(nn.Module):
    """torchvision's GoogLeNet / Inception unit: an in-place relu call after the norm."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inceptionish(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = BasicConv2d(3, 4)
        self.b = BasicConv2d(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.b(self.a(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _relu_outputs(monkeypatch):
    """Plain PyTorch's hand-written penalty needs every relu call's output: record them."""
    outs, relu = [], F.relu

    def recording(t, inplace=False):
        r = relu(t, inplace=inplace)
        outs.append(r.clone() if inplace else r)  # an in-place result may be overwritten later
        return r

    monkeypatch.setattr(F, "relu", recording)
    return outs


def _hand_energy(outs):
    return sum(o.flatten(1).square().sum(1).mean() for o in outs)


@pytest.mark.parametrize("make", [KResNet, Inceptionish], ids=["kuangliu", "inception"])
def test_relu_calls_after_norms_and_residual_adds_are_counted_and_train_as_plain_pytorch(make, monkeypatch):
    torch.manual_seed(0)
    model = make().double()
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5 if make is KResNet else 3, (4,))
    keys = list(model.state_dict())
    _, rep = minaction.convert(model, return_report=True)
    observers = {n: m for n, m in model.named_modules() if isinstance(m, ActivationObserver)}
    if make is KResNet:  # the stem's relu, and each block's two: after bn1, and the returned value
        assert set(observers) == {"bn1.activation_energy", "layer1.0.bn1.activation_energy",
                                  "layer1.0.activation_energy", "layer1.1.bn1.activation_energy",
                                  "layer1.1.activation_energy"}
        assert not any(o.copy for o in observers.values())
        assert "returns" in dict(rep.converted)["layer1.0.activation_energy"]
    else:
        assert set(observers) == {"a.bn.activation_energy", "b.bn.activation_energy"}
        assert all(o.copy for o in observers.values()) and "in place" in dict(rep.converted)["a.bn.activation_energy"]
    assert all(o.rows == "batch" and o.activation == "relu" for o in observers.values())
    assert list(model.state_dict()) == keys  # observers hold nothing
    model.load_state_dict(plain.state_dict())
    outs = _relu_outputs(monkeypatch)

    def plain_loss():
        outs.clear()
        ce = F.cross_entropy(plain(x), y)
        return ce + LAM * _hand_energy(outs)

    train_in_lockstep(plain, model, plain_loss,
                      lambda: F.cross_entropy(model(x), y) + LAM * minaction.total_energy(model), lr=0.1)


def test_the_in_layer_penalty_trains_as_the_explicit_loss():
    torch.manual_seed(0)
    a = minaction.convert(KResNet().double())
    b = copy.deepcopy(a)
    minaction.set_penalty(b, LAM)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    train_in_lockstep(a, b, lambda: F.cross_entropy(a(x), y) + LAM * minaction.total_energy(a),
                      lambda: F.cross_entropy(b(x), y) + LAM * minaction.total_energy(b).detach(), lr=0.1)


def test_copies_pickles_a_second_convert_and_compile():
    torch.manual_seed(0)
    model = minaction.convert(KResNet())
    n = sum(isinstance(m, ActivationObserver) for m in model.modules())
    assert n == 5
    minaction.convert(model)
    assert sum(isinstance(m, ActivationObserver) for m in model.modules()) == n  # not observed twice
    x = torch.randn(3, 3, 8, 8)
    model.eval()
    model(x)
    want = minaction.total_energy(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.bn1.activation_energy.last_energy = None
        clone(x)
        torch.testing.assert_close(minaction.total_energy(clone), want)
        assert clone.bn1.activation_energy is not model.bn1.activation_energy
    report = minaction.energy_report(model, x)  # a row per observer: the activation of what it observes
    assert list(report.layer[:-1]) == [n for n, m in model.named_modules() if isinstance(m, ActivationObserver)]
    assert report.units.iloc[0] == 4 * 8 * 8 and 0 < report.active_fraction.iloc[0] < 1
    torch.testing.assert_close(float(report.energy.iloc[-1]), want.detach().item(), rtol=1e-5, atol=0)
    model.train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x).square().mean() + LAM * minaction.total_energy(model)
    loss_r = ref(x).square().mean() + LAM * minaction.total_energy(ref)
    torch.testing.assert_close(loss_c, loss_r)
    loss_c.backward()
    loss_r.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_a_layer_followed_by_a_tanh_call_stays_plain_and_its_energy_is_counted_per_token():
    torch.manual_seed(0)
    model = TanhMLP().double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)  # tokens: every leading dim is a row
    _, rep = minaction.convert(model, return_report=True)
    assert type(model.fc1) is nn.Linear
    assert "counted by an observer: fc1.activation_energy" in dict(rep.skipped)["fc1"]
    obs = model.fc1.activation_energy
    assert obs.activation == "tanh" and obs.rows == "leading"
    model(x)
    h = torch.tanh(model.fc1(x))
    torch.testing.assert_close(minaction.total_energy(model), h.flatten(0, 1).square().sum(1).mean())


class Chain(nn.Module):
    """A forward that applies every child: an observer child would be applied too."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.BatchNorm1d(4)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


class UsesChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.chain = Chain()
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.chain(x))
        z = F.relu(self.mid(h) + h)  # a computed value, not a module's output, and no module takes it
        return self.out(z * 2)


@pytest.mark.parametrize("via", ["linear", "dropout", "sequential dropout"])
def test_an_observer_reads_token_rows_past_a_dropout(via):
    """F.gelu(self.ln(x) + self.fc(x)) on token features [B, T, H] that goes into a Linear is counted per token;
    through an nn.Dropout first it was counted per sample (the dropout said nothing about rows): 38.19 against
    6.366, T times too large (session 23). The module after the dropout decides."""
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
            self.drop, self.out = nn.Dropout(0.0), nn.Linear(8, 3)
            self.tail = nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 3))

        def forward(self, x):
            h = F.gelu(self.ln(x) + self.fc(x))
            if via == "linear":
                return self.out(h).mean(1)
            if via == "dropout":
                return self.out(self.drop(h)).mean(1)
            return self.tail(h).mean(1)

    torch.manual_seed(0)
    model = Blk().double()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    a = F.gelu(model.ln(x) + model.fc(x))
    _, rep = minaction.convert(model, return_report=True)
    assert "rows='leading'" in rep.converted[0][1]
    model(x)
    torch.testing.assert_close(minaction.total_energy(model), a.square().sum(-1).mean())


def test_a_module_that_cannot_hold_the_observer_is_observed_from_its_owner_and_the_rest_is_named():
    torch.manual_seed(0)
    model = UsesChain()
    x = torch.randn(5, 4)
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    # Chain applies every child, so the observer lives in UsesChain, whose forward names its children
    assert "activation_energy" not in model.chain._modules
    assert isinstance(model.activation_energy_chain, ActivationObserver)
    assert "activation_energy_chain" in dict(rep.converted)
    assert any("computed value" in why and "not counted" in why for _, why in rep.skipped)
    torch.testing.assert_close(model(x), before)
    h = F.relu(model.chain(x))
    torch.testing.assert_close(minaction.total_energy(model), h.square().sum(1).mean())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the hook finds the copy's observer
        clone.activation_energy_chain.last_energy = None
        clone(x)
        torch.testing.assert_close(clone.activation_energy_chain.last_energy, model.activation_energy_chain.last_energy)
        assert model.activation_energy_chain.last_energy is not clone.activation_energy_chain.last_energy

    class Generic(nn.Module):  # applies its children generically too: no home for the observers
        def __init__(self):
            super().__init__()
            self.chain = Chain()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            for m in self.children():
                x = F.relu(m(x))
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = Generic()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.g(x))

    outer = Outer()
    before = outer(x)
    _, rep = minaction.convert(outer, return_report=True)
    skipped = dict(rep.skipped)
    assert "apply their children generically" in skipped["g.chain"] or "and so does Generic" in skipped["g.chain"]
    assert not any(isinstance(m, ActivationObserver) for m in outer.modules())
    assert isinstance(outer.g.lin, EnergyLinear)  # the layer before a relu call still fuses
    torch.testing.assert_close(outer(x), before)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class ReluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(self.fc(x)) + x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ReluBlock()

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("make", [Head, Wrapper])
def test_the_models_output_is_not_observed(make):
    with pytest.warns(UserWarning, match="converted nothing"):
        model = minaction.convert(make())
    assert not any(isinstance(m, ActivationObserver) for m in model.modules())


def test_wrap_activations_false_adds_no_observer_and_observer_errors():
    with pytest.warns(UserWarning, match="converted nothing"):
        model = minaction.convert(KResNet(), wrap_activations=False)
    assert not any(isinstance(m, (ActivationObserver, EnergyActivation)) for m in model.modules())
    assert ActivationObserver(nn.ReLU()).activation == "relu"  # torch's module of a fused activation: accepted
    with pytest.raises(ValueError, match="nor one of the fused activations"):
        ActivationObserver(nn.Softmax(-1))
    with pytest.raises(ValueError, match="activation name"):
        ActivationObserver(F.relu)
    obs = ActivationObserver("gelu")
    lin = nn.Linear(3, 3)
    obs.attach(lin)
    with pytest.raises(ValueError, match="already has a submodule"):
        ActivationObserver("gelu").attach(lin)
    x = torch.randn(2, 3)
    y = lin(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))  # the output is left as it is
    torch.testing.assert_close(obs.last_energy, F.gelu(y).square().sum(1).mean())

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    p = Pair()
    ActivationObserver("relu").attach(p)
    with pytest.raises(TypeError, match="observes a tensor output"):
        p(x)


def test_a_relu_call_after_a_fused_layer_is_not_counted_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 5)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    model = minaction.convert(Net())
    assert isinstance(model.fc1, EnergyLinear)
    assert not any(isinstance(m, ActivationObserver) for m in model.modules())


class FunctionalDiscriminator(nn.Module):
    """A GAN discriminator written with functional leaky relus (one in place), and an ELU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 2, 1)
        self.conv2 = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.2, inplace=True)
        x = F.leaky_relu(self.bn2(self.conv2(x)), negative_slope=0.2)
        x = F.elu(self.fc(x.flatten(1)))
        return torch.sigmoid(self.out(x))


def test_activations_the_kernels_do_not_have_are_observed_unfused():
    torch.manual_seed(0)
    model = FunctionalDiscriminator().double()
    plain = copy.deepcopy(model)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    _, rep = minaction.convert(model, return_report=True)
    obs = {n: m for n, m in model.named_modules() if isinstance(m, ActivationObserver)}
    assert set(obs) == {"conv1.activation_energy", "bn2.activation_energy", "fc.activation_energy"}
    assert obs["conv1.activation_energy"].copy and "LeakyReLU(negative_slope=0.2)" in obs["bn2.activation_energy"].activation
    assert "ELU" in obs["fc.activation_energy"].activation and obs["fc.activation_energy"].rows == "leading"
    assert not hasattr(model.out, "activation_energy")  # the sigmoid gives the output

    def hand(m):
        h1 = F.leaky_relu(m.conv1(x), 0.2)
        h2 = F.leaky_relu(m.bn2(m.conv2(h1)), 0.2)
        h3 = F.elu(m.fc(h2.flatten(1)))
        return torch.sigmoid(m.out(h3)).mean() + LAM * sum(h.flatten(1).square().sum(1).mean() for h in (h1, h2, h3))

    train_in_lockstep(plain, model, lambda: hand(plain),
                      lambda: model(x).mean() + LAM * minaction.total_energy(model), lr=0.1)


def test_export_and_torch_func_see_the_observers():
    torch.manual_seed(0)
    model = minaction.convert(KResNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep = torch.export.export(model, (x,))
    assert not [str(w.message) for w in caught if "assigned during export" in str(w.message)]
    torch.testing.assert_close(ep.module()(x), model(x))
    params, bufs = dict(model.named_parameters()), dict(model.named_buffers())

    def loss(p):
        return torch.func.functional_call(model, (p, bufs), (x,)).square().mean() + LAM * minaction.total_energy(model)

    got = torch.func.grad(loss)(params)
    (model(x).square().mean() + LAM * minaction.total_energy(model)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


class SeqStem(nn.Module):
    def __init__(self, squash=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.squash = squash

    def forward(self, x):
        return torch.sigmoid(self.body(x)) if self.squash else F.relu(self.body(x))


class SeqNet(nn.Module):
    def __init__(self, squash=False):
        super().__init__()
        self.stem = SeqStem(squash)
        self.head = nn.Linear(4, 2)
        self.squash = squash

    def forward(self, x):
        if self.squash:
            return self.stem(x)
        return self.head(F.adaptive_avg_pool2d(self.stem(x), 1).flatten(1))


def test_a_sequentials_output_is_observed_at_its_last_module_unless_it_is_the_models_output():
    torch.manual_seed(0)
    model = minaction.convert(SeqNet())
    assert isinstance(model.stem.body[1].activation_energy, ActivationObserver)
    assert len(model.stem.body) == 2  # nothing added to the Sequential itself
    x = torch.randn(2, 3, 6, 6)
    model(x)
    h = F.relu(model.stem.body(x))
    torch.testing.assert_close(minaction.total_energy(model), h.flatten(1).square().sum(1).mean())
    with pytest.warns(UserWarning, match="converted nothing"):
        out = minaction.convert(SeqNet(squash=True))
    assert not any(isinstance(m, ActivationObserver) for m in out.modules())


class GraphAttention(nn.Module):
    """pytorch/examples' GAT layer, shrunk: a LeakyReLU on the attention logits, then a softmax."""

    def __init__(self, fin, fout):
        super().__init__()
        self.W = nn.Parameter(torch.randn(fin, fout) * 0.3)
        self.a = nn.Parameter(torch.randn(2 * fout, 1) * 0.3)
        self.leakyrelu = nn.LeakyReLU(0.2)

    def _scores(self, h):
        n = h.shape[-1]
        e = h @ self.a[:n] + (h @ self.a[n:]).transpose(-1, -2)
        return self.leakyrelu(e)

    def forward(self, x, adj):
        h = x @ self.W
        e = torch.where(adj > 0, self._scores(h), -9e15 * torch.ones_like(adj))
        return F.softmax(e, dim=-1) @ h


class GAT(nn.Module):
    def __init__(self):
        super().__init__()
        self.gat1 = GraphAttention(5, 6)
        self.gat2 = GraphAttention(6, 3)

    def forward(self, x, adj):
        return self.gat2(F.elu(self.gat1(x, adj)), adj)


def test_an_activation_feeding_a_softmax_is_an_attention_score_and_not_counted():
    torch.manual_seed(0)
    model = GAT().double()
    x, adj = torch.randn(7, 5, dtype=torch.float64), (torch.rand(7, 7) > 0.4).double()
    before = model(x, adj)
    _, rep = minaction.convert(model, return_report=True)
    skipped = dict(rep.skipped)
    for name in ("gat1.leakyrelu", "gat2.leakyrelu"):
        assert "attention score" in skipped[name] and type(model.get_submodule(name)) is nn.LeakyReLU
    assert [n for n, _ in rep.converted] == ["gat1.activation_energy"]  # the hidden node features' ELU
    torch.testing.assert_close(model(x, adj), before)
    h = F.elu(model.gat1(x, adj))
    torch.testing.assert_close(minaction.total_energy(model), h.square().sum(1).mean())


def test_recurrent_modules_are_reported_as_not_counted():
    class Net(nn.Module):  # pytorch/examples' mnist_rnn, shrunk
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(input_size=4, hidden_size=6, batch_first=True)
            self.fc1 = nn.Linear(6, 5)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return F.log_softmax(self.fc2(F.relu(self.fc1(out[:, -1, :]))), dim=1)

    model, rep = minaction.convert(Net(), return_report=True)
    assert isinstance(model.fc1, EnergyLinear)
    assert "recurrent kernel" in dict(rep.skipped)["rnn"]


class InPlaceAfterNorm(nn.Module):
    """conv -> BatchNorm -> an in-place activation call ``apply`` -> mean -> fc."""

    def __init__(self, apply):
        super().__init__()
        self.apply_ = apply
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.apply_(self.bn(self.conv(x))).mean((2, 3)))


def _hand_in_place_loss(net, act, x):
    """The plain net's loss with the penalty by hand, the activation applied out of place."""
    h = act(net.bn(net.conv(x)))
    return net.fc(h.mean((2, 3))).square().mean() + LAM * h.flatten(1).square().sum(1).mean()


@pytest.mark.parametrize("call", ["F.relu_", "method"])
def test_in_place_relu_spellings_are_observed(call):
    torch.manual_seed(0)
    model = InPlaceAfterNorm(F.relu_ if call == "F.relu_" else lambda h: h.relu_()).double()
    plain = copy.deepcopy(model)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    minaction.convert(model)
    obs = model.bn.activation_energy
    assert obs.copy and obs.activation == "relu"
    train_in_lockstep(plain, model, lambda: _hand_in_place_loss(plain, F.relu, x),
                      lambda: model(x).square().mean() + LAM * minaction.total_energy(model), lr=0.1)


class TakenBy(nn.Module):
    """Activations of computed values that a module takes: a residual relu into the next conv, a tanh of a
    sum into a Sequential, a LayerNorm'd GELU into a Linear (tokens)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x) + x))
        h = self.seq(torch.tanh(h * 0.5))
        t = h.flatten(2).transpose(1, 2)  # [B, HW, C] tokens
        t = self.fc(F.gelu(self.ln(t) + t))
        return self.head(t.mean(1))


def test_an_activation_of_a_computed_value_is_observed_at_the_module_that_takes_it():
    torch.manual_seed(0)
    model = TakenBy().double()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _, rep = minaction.convert(model, return_report=True)
    obs = {n: m for n, m in model.named_modules() if isinstance(m, ActivationObserver)}
    assert set(obs) == {"conv2.activation_energy", "seq.0.activation_energy", "fc.activation_energy"}
    assert all(o.activation == "identity" for o in obs.values())
    assert obs["fc.activation_energy"].rows == "leading" and obs["conv2.activation_energy"].rows == "batch"
    assert "goes into Conv2d (conv2)" in dict(rep.converted)["conv2.activation_energy"]

    def hand():
        a = F.relu(plain.conv1(x) + x)
        b = torch.tanh(plain.conv2(a) * 0.5)
        h = plain.seq(b)
        t = h.flatten(2).transpose(1, 2)
        c = F.gelu(plain.ln(t) + t)
        out = plain.head(plain.fc(c).mean(1))
        e = a.flatten(1).square().sum(1).mean() + b.flatten(1).square().sum(1).mean()
        return out.square().mean() + LAM * (e + c.flatten(0, 1).square().sum(1).mean())

    train_in_lockstep(plain, model, hand, lambda: model(x).square().mean() + LAM * minaction.total_energy(model),
                      lr=0.1)
    minaction.set_penalty(model, LAM)  # the penalty form adds the same gradient through the input's view
    model.zero_grad()
    plain.zero_grad()
    model(x).square().mean().backward()
    hand().backward()
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


FLATTENS = {"flatten(1)": lambda h: h.flatten(1), "torch.flatten(h, 1)": lambda h: torch.flatten(h, 1),
            "view(size(0), -1)": lambda h: h.view(h.size(0), -1),
            "reshape(shape[0], -1)": lambda h: h.reshape(h.shape[0], -1),
            "torch.flatten(h)": lambda h: torch.flatten(h).view(-1, 36),
            "view(-1, 36)": lambda h: h.view(-1, 36),
            # more than [B, units]: a Linear over the last dim reads rows per position, not per sample
            "flatten(2)": lambda h: h.flatten(2).flatten(1), "view(size(0), -1, 6)": lambda h: h.view(h.size(0), -1, 6)
            .flatten(1)}


class FlatHead(nn.Module):
    """A residual relu that reaches the classifier through a flatten (a hand-written ResNet's last block)."""

    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(36, 2)
        self.how = FLATTENS[how]

    def forward(self, x):
        return self.fc(self.how(F.relu(self.conv(x) + x)))


@pytest.mark.parametrize("how", list(FLATTENS))
def test_an_activation_reaching_a_module_through_a_per_sample_flatten_is_observed_there(how):
    """flatten(1), view(x.size(0), -1), reshape(x.shape[0], ...) keep each sample's units: the module that
    takes the flattened value is observed and counts the activation's energy. A flatten over the samples, or
    a view whose rows cannot be read (-1 first), is not: it stays named as not counted."""
    torch.manual_seed(0)
    model = FlatHead(how).double()
    plain = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, rep = minaction.convert(model, return_report=True)
    obs = [n for n, m in model.named_modules() if isinstance(m, ActivationObserver)]
    if how in ("torch.flatten(h)", "view(-1, 36)", "flatten(2)", "view(size(0), -1, 6)"):
        assert obs == []
        assert any("computed value" in why and "not counted" in why for _, why in rep.skipped)
        assert any("converted nothing" in str(w.message) for w in seen)
        return
    assert not seen
    assert obs == ["fc.activation_energy"]
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)

    def hand():
        a = F.relu(plain.conv(x) + x)
        return plain.fc(a.flatten(1)).square().mean() + LAM * a.flatten(1).square().sum(1).mean()

    train_in_lockstep(plain, model, hand, lambda: model(x).square().mean() + LAM * minaction.total_energy(model),
                      lr=0.1)


def test_a_module_swap_after_convert_is_named_and_a_second_convert_hooks_the_observers_again(monkeypatch):
    """Module swaps build new modules: ``nn.SyncBatchNorm.convert_sync_batchnorm`` copies each BatchNorm's
    children (the observer) but not its forward hooks, so the observer stops running and its energy would be
    missing or stale. ``total_energy`` and ``energy_report`` name it; a second ``convert`` hooks it again."""
    torch.manual_seed(0)
    model = minaction.convert(KResNet().double())
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    model(x)  # an energy from before the swap: it must not be summed afterwards
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # without a process group it trains as BatchNorm
    assert isinstance(model.bn1, nn.SyncBatchNorm) and isinstance(model.bn1.activation_energy, ActivationObserver)
    model(x)
    with pytest.raises(RuntimeError, match=r"'bn1.activation_energy' no longer runs: it was attached in a "
                                           r"BatchNorm2d.*SyncBatchNorm.*convert\(model\) again"):
        minaction.total_energy(model)
    with pytest.raises(RuntimeError, match="no longer runs"):
        minaction.energy_report(model, x)
    _, rep = minaction.convert(model, return_report=True)
    hooked = {p for p, why in rep.converted if "hooked again on the SyncBatchNorm" in why}
    assert hooked == {"bn1.activation_energy", "layer1.0.bn1.activation_energy", "layer1.1.bn1.activation_energy"}
    assert sum(isinstance(m, ActivationObserver) for m in model.modules()) == 5  # none added, none lost
    plain = KResNet().double()
    plain.load_state_dict(model.state_dict())
    outs = _relu_outputs(monkeypatch)

    def plain_loss():
        outs.clear()
        return F.cross_entropy(plain(x), y) + LAM * _hand_energy(outs)

    train_in_lockstep(plain, model, plain_loss,
                      lambda: F.cross_entropy(model(x), y) + LAM * minaction.total_energy(model), lr=0.1)


def test_an_observed_module_replaced_or_unhooked_is_named_and_convert_restores_it():
    torch.manual_seed(0)
    model = minaction.convert(UsesChain())  # the observer lives in UsesChain, hooked on chain
    x = torch.randn(5, 4)
    model.chain = Chain()  # a new module at the observed place: no hook
    model(x)
    with pytest.raises(RuntimeError, match=r"'activation_energy_chain' no longer runs: the Chain it observed "
                                           r"\(chain\) was replaced by Chain"):
        minaction.total_energy(model)
    _, rep = minaction.convert(model, return_report=True)
    assert "hooked again on the Chain now at chain" in dict(rep.converted)["activation_energy_chain"]
    model(x)
    torch.testing.assert_close(minaction.total_energy(model), F.relu(model.chain(x)).square().sum(1).mean())

    copied = copy.deepcopy(model)  # a deep copy keeps its observers running (hooks and homes map to the copy's)
    copied(x)
    torch.testing.assert_close(minaction.total_energy(copied), minaction.total_energy(model))
    copied.chain._forward_hooks.clear()  # a tool that drops hooks
    with pytest.raises(RuntimeError, match="its hook on the Chain it observes was removed"):
        minaction.total_energy(copied)
    minaction.convert(copied)
    copied(x)
    torch.testing.assert_close(minaction.total_energy(copied), minaction.total_energy(model))

    taken = minaction.convert(TakenBy())  # an input observer's module replaced by a fresh one: a new observer
    taken.conv2 = nn.Conv2d(3, 4, 3, padding=1)
    _, rep = minaction.convert(taken, return_report=True)
    assert "conv2.activation_energy" in dict(rep.converted)
    xi = torch.randn(2, 3, 5, 5)
    taken(xi)
    torch.testing.assert_close(taken.conv2.activation_energy.last_energy,
                               F.relu(taken.conv1(xi) + xi).flatten(1).square().sum(1).mean())


@pytest.mark.parametrize("call", ["relu", "tanh", "silu"])
def test_in_place_calls_train_as_plain_in_the_loss_and_the_penalty_form(call):
    """An in-place call after a norm: relu and tanh keep their own output for the energy's backward, so the call
    overwrites the module's output itself (no copy); silu keeps its input, so the call gets a copy; the penalty
    form's view always gets one. Both forms train as plain PyTorch with the penalty by hand."""
    apply = {"relu": lambda h: F.relu(h, inplace=True), "tanh": lambda h: h.tanh_(),
             "silu": lambda h: F.silu(h, inplace=True)}[call]
    plain_act = {"relu": F.relu, "tanh": torch.tanh, "silu": F.silu}[call]
    torch.manual_seed(0)
    plain = InPlaceAfterNorm(apply).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    model = minaction.convert(copy.deepcopy(plain))
    obs = model.bn.activation_energy
    assert obs.copy and obs.activation == call
    # relu / tanh: the hook passes the BatchNorm's output itself on (None), for the call to overwrite as in the
    # plain model; silu: a copy
    probe = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True) * 1.0
    assert (obs(probe) is None) == (call != "silu")

    pen, ref = copy.deepcopy(model), copy.deepcopy(plain)
    train_in_lockstep(plain, model, lambda: _hand_in_place_loss(plain, plain_act, x),
                      lambda: model(x).square().mean() + LAM * minaction.total_energy(model), lr=0.1)
    minaction.set_penalty(pen, LAM)
    train_in_lockstep(ref, pen, lambda: _hand_in_place_loss(ref, plain_act, x),
                      lambda: pen(x).square().mean() + LAM * minaction.total_energy(pen).detach(), lr=0.1)
