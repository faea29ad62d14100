"""EnergyActivation (an activation module with its output's energy) and convert's use of it for the
activations that follow a norm (Conv → BatchNorm → ReLU, Linear → LayerNorm → GELU) or a residual
add, as in a ResNet block."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

import minaction
from doubles.lockstep import keep_outputs, train_in_lockstep
from minaction.nn import EnergyActivation, EnergyConv2d, EnergyLinear

torch.set_num_threads(1)
LAM = 0.05
ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda z: z}


def _energy(y, rows):
    return (y.reshape(-1, y.shape[-1]) if rows == "leading" else y.reshape(y.shape[0], -1)).square().sum(1).mean()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("rows,shape", [("batch", (3, 4, 5, 2)), ("leading", (3, 5, 7)), ("batch", (4, 7)),
                                        ("leading", (4, 7)), ("batch", (6,))])
def test_values_energy_and_every_gradient_match_plain_pytorch(act, rows, shape):
    torch.manual_seed(0)
    m = EnergyActivation(act, rows=rows)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    want = ACTS[act](x)
    e_want = _energy(want if len(shape) > 1 else want.unsqueeze(0), rows)  # 1-D: one unbatched sample
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m.last_energy, e_want)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum() + LAM * m.last_energy, x)[0]
    ref = torch.autograd.grad((want * g).sum() + LAM * e_want, x)[0]
    torch.testing.assert_close(got, ref)
    assert gradcheck(lambda t: (m(t), m.last_energy), (torch.randn(*shape, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("act", ["relu", nn.LeakyReLU(0.1)], ids=["fused", "unfused"])
@pytest.mark.parametrize("rows", ["batch", "leading"])
def test_a_1d_input_is_one_sample_as_the_layers_count_it(act, rows):
    """An unbatched input (an RL policy's state vector) is one sample, as EnergyLinear counts it: under
    rows="batch" each unit was read as a sample, an energy N units times too small (0.0578 against 1.851 in a
    trial's actor-critic, session 23). The same vector as a [1, N] batch gives the same energy."""
    x = torch.randn(7, dtype=torch.float64)
    m = EnergyActivation(act, rows=rows)
    m(x)
    e1 = m.last_energy
    m(x.unsqueeze(0))
    torch.testing.assert_close(e1, m.last_energy)
    lin = EnergyLinear(3, 7, activation="relu", dtype=torch.float64)
    z = torch.randn(3, dtype=torch.float64)
    lin(z)
    torch.testing.assert_close(EnergyActivation("relu", rows=rows)(F.linear(z, lin.weight, lin.bias)).square().sum(),
                               lin.last_energy)


def test_float32_channels_last_non_contiguous_penalty_l1_and_errors():
    torch.manual_seed(0)
    m = EnergyActivation("relu")
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.relu(x))
    torch.testing.assert_close(m.last_energy, _energy(F.relu(x), "batch"))
    xt = torch.randn(5, 3).t()  # not contiguous
    torch.testing.assert_close(m(xt), F.relu(xt))
    l1 = EnergyActivation("tanh", energy="l1", energy_reduction="mean")
    z = torch.randn(4, 6)
    l1(z)
    torch.testing.assert_close(l1.last_energy, torch.tanh(z).abs().mean(1).mean())
    pen = EnergyActivation("silu", penalty=LAM)  # the in-layer penalty: the gradient of y + LAM * E
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(pen(z).sum(), z)[0]
    ref = torch.autograd.grad(F.silu(z).sum() + LAM * _energy(F.silu(z), "batch"), z)[0]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="rows must be one of"):
        EnergyActivation(rows="tokens")
    with pytest.raises(ValueError, match="batch dimension"):
        m(torch.tensor(1.0))
    with pytest.raises(ValueError, match="activation"):
        EnergyActivation("leaky_relu")


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
def test_rows_leading_on_a_non_contiguous_input_gives_a_contiguous_output(layout):
    """rows='leading' on a non-contiguous input: the pass reads each row's units as one block, so the input is
    copied and the output is contiguous (giving it the input's strides, as F.gelu does, cost a second copy: +50-70%
    of the forward, session 24's review); values, energy and gradient as plain."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = {"channels_last": base.to(memory_format=torch.channels_last),
         "permuted": base.permute(0, 2, 3, 1), "sliced": base[:, :, :, ::2]}[layout].requires_grad_(True)
    m = EnergyActivation("gelu", rows="leading")
    y = m(x)
    ref = F.gelu(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(m.last_energy, ref.square().sum(-1).mean())
    g, = torch.autograd.grad((y * y.detach()).sum() + m.last_energy, x)
    gr, = torch.autograd.grad((ref * ref.detach()).sum() + ref.square().sum(-1).mean(), x)
    torch.testing.assert_close(g, gr)


class Block(nn.Module):
    """torchvision's ResNet BasicBlock, shrunk: one ReLU module after bn1 and after the residual add."""

    def __init__(self, c=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Block(), Block())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


def _hand_penalty(model):
    """Forward hooks on every ReLU module of the plain model: the outputs the energy is taken on."""
    return keep_outputs((m for m in model.modules() if isinstance(m, nn.ReLU)), clone=True)


def test_a_resnet_converts_its_activations_and_trains_as_plain_pytorch():
    """Conv-BatchNorm-ReLU everywhere, and a block's self.relu applied twice: no layer can fuse, so
    every ReLU becomes an EnergyActivation; the block's sums both of its calls. The energy is the
    hand-written penalty over every ReLU output, and three SGD steps (BatchNorm in training mode)
    give the same parameters as plain PyTorch with that penalty."""
    torch.manual_seed(0)
    model = ResNetish().double()
    plain = copy.deepcopy(model)
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["stem.2", "layer1.0.relu", "layer1.1.relu"]
    assert "applied 2 times in Block.forward(), every call counted" in dict(rep.converted)["layer1.0.relu"]
    assert all(type(m) is not nn.ReLU for m in model.modules())
    assert model.layer1[0].relu.accumulate and model.layer1[0].relu.rows == "batch"
    outs, hooks = _hand_penalty(plain)
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])

    def plain_loss():
        outs.clear()
        loss = F.cross_entropy(plain(x), y) + LAM * sum(_energy(o, "batch") for o in outs)
        assert len(outs) == 5
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no call's energy is lost
        train_in_lockstep(plain, model, plain_loss,
                          lambda: F.cross_entropy(model(x), y) + LAM * minaction.total_energy(model), lr=0.1)
    for hook in hooks:
        hook.remove()
    # copies (EMA, best-model) reset their own sums, evaluation counts every call too
    model.eval()
    plain.eval()
    outs, hooks = _hand_penalty(plain)
    with torch.no_grad():
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), model):
            outs.clear()
            torch.testing.assert_close(copied(x), plain(x))
            torch.testing.assert_close(minaction.total_energy(copied), sum(_energy(o, "batch") for o in outs))
    for hook in hooks:
        hook.remove()
    with minaction.record_energy(model) as tape:  # a tape sees each call once
        model(x)
    assert len(tape) == 5
    torch.testing.assert_close(tape.total(), minaction.total_energy(model))


class NormMLP(nn.Module):
    """A token MLP with a norm before its activation, an activation applied in train mode only, and a
    sigmoid head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.gelu = nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU()
        self.fc2, self.drop_act = nn.Linear(6, 6), nn.Tanh()
        self.head, self.sig = nn.Linear(6, 1), nn.Sigmoid()

    def forward(self, x):
        h = self.gelu(self.ln(self.fc1(x)))
        h = self.fc2(h)
        if self.training:
            h = self.drop_act(h)
        return self.sig(self.head(h))


def test_norm_then_activation_rows_modes_and_what_stays_plain():
    torch.manual_seed(0)
    model = NormMLP()
    x = torch.randn(2, 5, 4)  # [B, T, C] tokens
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["gelu"]
    gelu = model.gelu
    assert isinstance(gelu, EnergyActivation) and gelu.rows == "leading" and gelu.activation == "gelu"
    skipped = dict(rep.skipped)
    assert "train and eval mode only" in skipped["drop_act"] and type(model.drop_act) is nn.Tanh
    assert "Sigmoid gives NormMLP's output" in skipped["head"] and type(model.sig) is nn.Sigmoid
    torch.testing.assert_close(model(x), before)
    h = F.gelu(model.ln(model.fc1(x)))
    torch.testing.assert_close(minaction.total_energy(model), h.square().sum(-1).mean())  # per token

    plain = NormMLP()
    with pytest.warns(UserWarning, match="converted nothing"):
        _, rep = minaction.convert(plain, wrap_activations=False, return_report=True)
    assert rep.converted == [] and type(plain.gelu) is nn.GELU
    why = dict(rep.skipped)["fc1"]
    assert "followed by LayerNorm (ln)" in why and "a norm, not an activation" in why and "EnergyActivation" in why


def test_an_activation_after_an_energy_layer_stays_and_sequential_norms_convert():
    torch.manual_seed(0)
    seq = nn.Sequential(EnergyLinear(4, 5, activation="identity"), nn.ReLU(),  # its energy counts that output
                        nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Dropout(0.0), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    before = seq(x)
    _, rep = minaction.convert(seq, return_report=True)
    assert [n for n, _ in rep.converted] == ["5"]
    assert type(seq[1]) is nn.ReLU and isinstance(seq[5], EnergyActivation) and seq[5].rows == "batch"
    assert "ReLU after BatchNorm1d" in dict(rep.converted)["5"]
    torch.testing.assert_close(seq(x), before)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    minaction.convert(conv)
    assert isinstance(conv[2], EnergyActivation) and type(conv[0]) is nn.Conv2d
    assert not isinstance(conv[0], EnergyConv2d)


@pytest.mark.parametrize("backend", ["cpu", "composite", "reference"])
@pytest.mark.parametrize("act", ["relu", "gelu_tanh", "sigmoid"])
def test_every_cpu_backend_gives_the_same_module(backend, act):
    torch.manual_seed(0)
    m = EnergyActivation(act, rows="leading", backend=backend)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    want = ACTS[act](x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m.last_energy, _energy(want, "leading"))
    got = torch.autograd.grad(y.sum() + LAM * m.last_energy, x)[0]
    ref = torch.autograd.grad(want.sum() + LAM * _energy(want, "leading"), x)[0]
    torch.testing.assert_close(got, ref)


def test_a_converted_resnet_under_torch_compile_fullgraph():
    """The accumulating activation (a forward pre-hook and per-call state) compiles in one graph and
    gives eager's loss and gradients."""
    torch.manual_seed(0)
    model = ResNetish()
    minaction.convert(model)
    eager = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 1])

    def step(m, x, y):
        return F.cross_entropy(m(x), y) + LAM * minaction.total_energy(m)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got, want = compiled(model, x, y), step(eager, x, y)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("module", [nn.LeakyReLU(0.2), nn.ReLU6(), nn.ELU(), nn.SELU(), nn.CELU(0.5), nn.Hardswish(),
                                    nn.Hardsigmoid(), nn.Hardtanh(-2, 2), nn.Mish(), nn.Softplus(beta=2),
                                    nn.Softsign(), nn.Softshrink(), nn.Hardshrink(), nn.Tanhshrink(), nn.LogSigmoid(),
                                    nn.Threshold(0.1, -1.0)], ids=lambda m: type(m).__name__)
def test_activations_the_kernels_do_not_have_run_unfused_with_the_same_energy(module):
    """Any elementwise activation module without parameters: applied as it is, the energy from plain ops
    (the same definition), every gradient as plain PyTorch's, no state_dict entry."""
    torch.manual_seed(0)
    for rows, shape in (("batch", (3, 2, 4, 4)), ("leading", (3, 5, 6))):
        m = EnergyActivation(module, rows=rows)
        assert m.state_dict() == {} and m.activation == repr(module)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = m(x)
        want = module(x)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(m.last_energy, _energy(want, rows))
        got = torch.autograd.grad(y.sum() + LAM * m.last_energy, x)[0]
        ref = torch.autograd.grad(want.sum() + LAM * _energy(want, rows), x)[0]
        torch.testing.assert_close(got, ref)
    for rows, shape in (("batch", (0, 3, 4)), ("batch", (0, 3)), ("leading", (0, 3)), ("leading", (2, 0, 3))):
        y = EnergyActivation(module, rows=rows)(torch.randn(shape))  # an empty batch: energy 0, as fused ones give
        assert y.shape == shape
    pen = EnergyActivation(module, energy="l1", penalty=LAM)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(pen(x).sum(), x)[0]
    ref = torch.autograd.grad(module(x).sum() + LAM * module(x).abs().sum(1).mean(), x)[0]
    torch.testing.assert_close(got, ref)


def test_unfused_activation_leaves_its_input_alone_and_refuses_what_it_cannot_apply():
    m = EnergyActivation(nn.LeakyReLU(0.1, inplace=True))
    x = torch.randn(4, 5)
    keep = x.clone()
    m(x)
    torch.testing.assert_close(x, keep)  # in place in the original module, not here: the energy reads the output
    for bad in (nn.PReLU(), nn.Softmax(dim=1), nn.RReLU(), nn.GLU()):
        with pytest.raises(ValueError, match="is not one EnergyActivation applies"):
            EnergyActivation(bad)
    for copied in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(copied(keep), F.leaky_relu(keep, 0.1))


def test_a_dcgan_discriminator_converts_its_leaky_relus_and_trains_as_plain_pytorch():
    """pytorch/examples' DCGAN discriminator, shrunk: Conv + LeakyReLU(0.2) and Conv + BatchNorm + LeakyReLU,
    ending in Conv + Sigmoid. The LeakyReLUs become unfused EnergyActivations, the output stays plain, and
    three Adam steps equal plain PyTorch with the penalty written by hand."""
    torch.manual_seed(0)

    def disc():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 2, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(2, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(4, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0)).double()

    model, plain = disc(), disc()
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["1", "4"] and type(model[6]) is nn.Sigmoid
    for i in (1, 4):
        plain[i].inplace = False
    outs, _ = keep_outputs((plain[1], plain[4]))
    x, y = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    def plain_loss():
        outs.clear()
        return F.binary_cross_entropy(plain(x), y) + LAM * sum(_energy(o, "batch") for o in outs)

    train_in_lockstep(plain, model, plain_loss,
                      lambda: F.binary_cross_entropy(model(x), y) + LAM * minaction.total_energy(model),
                      torch.optim.Adam, lr=1e-2)


@pytest.mark.parametrize("activation", ["relu", nn.LeakyReLU(0.2)], ids=["fused", "unfused"])
def test_an_activation_module_called_twice_warns_unless_it_accumulates(activation):
    """As for layers: total_energy holds the last call, and the backward through the first one says so;
    a module set to accumulate in its owner counts both calls and says nothing."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = EnergyActivation(activation)

        def forward(self, x):
            return self.act(x) - self.act(2 * x)

    model = Twice()
    x = torch.randn(3, 4, requires_grad=True)

    def step():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (model(x).sum() + minaction.total_energy(model)).backward()
        return [w for w in caught if "counted nowhere" in str(w.message)]

    assert len(step()) == 1
    model.act.accumulate_in(model, "act")
    assert step() == []
    act = activation if isinstance(activation, nn.Module) else F.relu
    model(x)
    torch.testing.assert_close(minaction.total_energy(model), _energy(act(x), "batch") + _energy(act(2 * x), "batch"))


def test_a_tower_of_accumulating_modules_run_twice_warns_once_per_module():
    """A Siamese tower of ResNet-style blocks (each applies its relu twice: converted, the module accumulates
    in its block) run on two inputs: total_energy holds the second input's calls only. The first input's
    energy is a sum of the module's two calls, whose own autograd node no backward reaches; each call is
    watched, and the backward warns once per module (it said nothing: a converted resnet18 tower lost half
    its energy silently, session 23)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
            self.bn1, self.bn2, self.relu = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)

    torch.manual_seed(0)
    tower = minaction.convert(nn.Sequential(Block(), Block(), nn.Flatten(), nn.Linear(50, 3)))
    acts = [m for m in tower.modules() if isinstance(m, EnergyActivation)]
    assert len(acts) == 2 and all(m.accumulate for m in acts)
    a, b = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)

    def step(total):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if total:
                d = tower(a) - tower(b)
                (d.square().mean() + 0.1 * minaction.total_energy(tower)).backward()
            else:
                with minaction.record_energy(tower) as tape:
                    d = tower(a) - tower(b)
                (d.square().mean() + 0.1 * tape.total()).backward()
        return [str(w.message) for w in caught if "counted nowhere" in str(w.message)]

    lost = step(True)
    assert len(lost) == 2 and all("accumulate=True" in w for w in lost), lost
    # named by where convert found them: the two look alike otherwise
    assert sorted("at '0.relu'" in w for w in lost) == [False, True] and any("at '1.relu'" in w for w in lost)
    assert step(False) == []


def _saved(fn):
    """The distinct storages that autograd keeps for the backward of ``fn()``, by size."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(seen.values())


@pytest.mark.parametrize("backend", ["cpu", "composite"])
@pytest.mark.parametrize("act", list(ACTS))
def test_an_activation_module_keeps_what_the_plain_one_keeps(backend, act):
    """relu, tanh and sigmoid take their derivative from the output, so EnergyActivation keeps the output only,
    as nn.ReLU / nn.Tanh do: a converted ResNet kept one more activation-sized tensor per ReLU (+49% of the saved
    bytes on a CIFAR-style ResNet). gelu and silu keep their input, as torch's do, and the output (the energy's
    gradient reads it); identity keeps the output for the same reason. The double backward stays exact
    (gradgradcheck: from the output, or recomputed from the input for gelu and silu)."""
    x = torch.randn(8, 16, 4, 4, requires_grad=True)
    big = x.untyped_storage().nbytes()
    mod = EnergyActivation(act, backend=backend)
    ours = [n for n in _saved(lambda: mod(x * 1.0).sum() + mod.last_energy) if n >= big]
    plain = [n for n in _saved(lambda: ACTS[act](x * 1.0).sum()) if n >= big]
    assert len(ours) == len(plain) + (0 if act in ("relu", "tanh", "sigmoid") else 1), (ours, plain)
    z = torch.randn(3, 2, 5, dtype=torch.float64)
    z = (z + 0.1 * z.sign()).requires_grad_(True)  # away from relu's kink
    for energy in ("l2", "l1"):
        mod64 = EnergyActivation(act, energy=energy, backend=backend)
        assert torch.autograd.gradgradcheck(lambda t: (mod64(t), mod64.last_energy), (z,))


@pytest.mark.parametrize("backend", ["cpu", "composite"])
def test_a_gradient_penalty_through_converted_activations_matches_plain(backend):
    """WGAN-GP's double backward (the gradient of a gradient norm) through an EnergyActivation (relu, from its
    output) and an EnergyConv2d (tanh, from its output), energy in the loss: the parameter gradients are the
    plain model's with the energy written by hand."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(8 * 36, 1)).double()
    ours = minaction.convert(copy.deepcopy(plain), backend=backend)
    assert [type(m).__name__ for m in ours][2:4] == ["EnergyActivation", "EnergyConv2d"]
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)

    def grads(model, energy):
        xx = x.clone().requires_grad_()
        out = model(xx)
        g, = torch.autograd.grad(out.sum(), xx, create_graph=True)
        loss = out.mean() + 10 * (g.flatten(1).norm(dim=1) - 1).pow(2).mean() + 0.1 * energy(model, xx)
        return torch.autograd.grad(loss, list(model.parameters()))

    def by_hand(model, xx):
        h1 = F.relu(model[1](model[0](xx)))
        h2 = torch.tanh(model[3](h1))
        return h1.pow(2).flatten(1).sum(1).mean() + h2.pow(2).flatten(1).sum(1).mean()

    for a, b in zip(grads(plain, by_hand), grads(ours, lambda m, xx: minaction.total_energy(m))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act,energy,reduction,groups,penalty", [
    ("gelu", "l1", "mean", 0, 0.0), ("identity", "l2", "sum", 0, 0.0), ("sigmoid", None, "sum", 0, 0.0),
    ("relu", "l2", "mean", 2, 0.05)])
def test_epilogue_under_symbolic_sizes_equals_eager(act, energy, reduction, groups, penalty):
    """While torch.compile traces with every size symbolic, the epilogue's forward is ATen ops (y fresh, E in the
    energy dtype divided by the traced batch (and unit) count): y, E and the input's gradient, the penalty's
    included, equal the eager kernel's over sizes that share the one graph."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from minaction.ops import activation_energy

    def f(z):
        y, e = activation_energy(z, act, energy, reduction, groups=groups, penalty=penalty)
        return y, e

    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True)
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        for shape in ((3, 4, 5, 6), (5, 2, 7, 3)):
            lead = (groups,) if groups else ()
            z = torch.randn(lead + shape, dtype=torch.float64, requires_grad=True)
            out = {}
            for name, fn in (("compiled", compiled), ("eager", f)):
                y, e = fn(z)
                loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum() + 0.3 * e.sum()
                out[name] = (y, e, torch.autograd.grad(loss, z)[0])
            for a, b in zip(out["compiled"], out["eager"]):
                torch.testing.assert_close(a, b)
