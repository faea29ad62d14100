"""Libraries' own activation classes (timm's ``GELU``, transformers' ``GELUActivation`` /
``NewGELUActivation`` / ``FastGELUActivation`` / ``QuickGELUActivation``, minGPT's ``NewGELU``):
``convert`` reads what they compute from their ``forward()`` (torch.fx, then float64 values) and
fuses them like torch's own modules; other elementwise ones become an unfused
``EnergyActivation``; anything with state, randomness, shapes or in-place writes is left alone.
The classes below copy those libraries' forwards in structure (the tests do not import them)."""
from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from doubles.lockstep import keep_outputs, train_in_lockstep
from minaction._custom_act import read_activation
from minaction.nn import EnergyActivation, EnergyConv2d, EnergyLinear

torch.set_num_threads(1)
LAM = 0.05


class TimmGELU(nn.Module):  # timm.layers.activations.GELU
    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input):
        return F.gelu(input)


class HFGELUActivation(nn.Module):  # transformers' GELUActivation: the function kept as an attribute
    def __init__(self):
        super().__init__()
        self.act = nn.functional.gelu

    def forward(self, input):
        return self.act(input)


class HFGELUTanh(nn.Module):  # transformers' GELUTanh: a functools.partial
    def __init__(self):
        super().__init__()
        self.act = functools.partial(nn.functional.gelu, approximate="tanh")

    def forward(self, input):
        return self.act(input)


class NewGELU(nn.Module):  # minGPT / transformers' NewGELUActivation
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELU(nn.Module):  # transformers' FastGELUActivation: a truncated constant
    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class HFSiLU(nn.Module):
    def forward(self, input):
        return nn.functional.silu(input)


class WrapsReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x)


class TanhMethod(nn.Module):
    def forward(self, x):
        return x.tanh()


class QuickGELU(nn.Module):  # transformers' QuickGELUActivation (CLIP): not a fused activation
    def forward(self, input):
        return input * torch.sigmoid(1.702 * input)


class GELUActivation(nn.Module):  # transformers' GELUActivation
    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, input):
        return self.act(input)


gelu = GELUActivation()  # a module-level instance, as transformers.activations' `gelu = get_activation("gelu")`


class ClippedGELU(nn.Module):  # transformers' ClippedGELUActivation: gelu, clipped at +-10
    def __init__(self, lo=-10.0, hi=10.0):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return torch.clip(gelu(x), self.lo, self.hi)  # (a module it calls but does not hold: read inline)


class ReLUSquared(nn.Module):
    def forward(self, x):
        return torch.square(F.relu(x))


# not elementwise functions of the input alone
class RandomDrop(nn.Module):
    def forward(self, x):
        return x * (torch.rand_like(x) > 0.1)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return F.gelu(x) * self.scale


class WithParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.25))

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * x)


class Reshaping(nn.Module):
    def forward(self, x):
        return x.reshape(-1).relu().reshape(x.shape)


class InPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2.0).tanh()


class ModeDependent(nn.Module):
    def forward(self, x):
        return F.gelu(x) if self.training else F.relu(x)


class RowSoftmax(nn.Module):
    def forward(self, x):
        return x.softmax(-1)


class Centring(nn.Module):
    def forward(self, x):
        return x - x.mean(-1, keepdim=True)


class Passthrough(nn.Module):  # a placeholder (timm's drop-path in eval): not an activation
    def forward(self, x):
        return x


class Branching(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.sum() > 0 else torch.tanh(x)


class TwoOutputs(nn.Module):
    def forward(self, x):
        return F.relu(x), x


READS = [(TimmGELU, "gelu"), (HFGELUActivation, "gelu"), (HFGELUTanh, "gelu_tanh"), (NewGELU, "gelu_tanh"),
         (FastGELU, "gelu_tanh"), (Swish, "silu"), (HFSiLU, "silu"), (WrapsReLU, "relu"), (TanhMethod, "tanh"),
         (QuickGELU, "elementwise"), (ClippedGELU, "elementwise"), (ReLUSquared, "elementwise"),
         (RandomDrop, None), (WithBuffer, None), (WithParameter, None), (Reshaping, None), (InPlace, None),
         (ModeDependent, None), (RowSoftmax, None), (Centring, None), (Passthrough, None), (Branching, None),
         (TwoOutputs, None)]
REFS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu, "relu": F.relu,
        "tanh": torch.tanh}


@pytest.mark.parametrize("cls,want", READS, ids=[c.__name__ for c, _ in READS])
def test_what_a_custom_module_computes_is_read_from_its_forward(cls, want):
    mod = cls()
    assert read_activation(mod) == want
    assert mod.training and (not isinstance(mod, ClippedGELU) or mod.hi == 10.0)  # the module is as it was
    # torch's own classes are known by type, never read
    assert read_activation(nn.GELU()) is None and read_activation(nn.LeakyReLU()) is None


@pytest.mark.parametrize("cls,want", [r for r in READS if r[1] in REFS], ids=lambda v: getattr(v, "__name__", v))
def test_a_layer_before_a_custom_activation_converts_and_trains_as_plain_pytorch(cls, want):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), cls(), nn.Linear(9, 3)).double()
    plain = copy.deepcopy(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert isinstance(model[0], EnergyLinear) and model[0].activation == want and type(model[1]) is nn.Identity
    desc = dict(rep.converted)["0"]
    assert f"{cls.__name__} computes {want}" in desc and "read with torch.fx" in desc
    torch.testing.assert_close(model(x), before)
    outs, hooks = keep_outputs([plain[1]])

    def plain_loss():  # the forward first, then the penalty on what the hook kept
        outs.clear()
        ce = F.cross_entropy(plain(x), y)
        return ce + LAM * outs[0].square().sum(1).mean()

    train_in_lockstep(plain, model, plain_loss, lambda: F.cross_entropy(model(x), y)
                      + LAM * minaction.total_energy(model), torch.optim.Adam, lr=1e-2)
    for h in hooks:
        h.remove()


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: a linear layer with its weight stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, d=8, act=None):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.act = act if act is not None else NewGELU()
        self.dropout = nn.Dropout(0.0)

    def forward(self, hidden_states):
        h = self.act(self.c_fc(hidden_states))
        return self.dropout(self.c_proj(h))


class GPT2ish(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.mlps = nn.ModuleList([GPT2MLP(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        for mlp in self.mlps:
            x = x + mlp(self.ln(x))
        return self.head(x)


def test_gpt2s_mlp_behind_its_own_linear_class_counts_its_gelu_per_token():
    torch.manual_seed(0)
    model = GPT2ish().double()
    plain = copy.deepcopy(model)
    idx, tgt = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    before = model(idx)
    _, rep = minaction.convert(model, return_report=True)
    for mlp in model.mlps:
        act = mlp.act
        assert isinstance(act, EnergyActivation) and act.activation == "gelu_tanh" and act.rows == "leading"
        assert type(mlp.c_fc) is Conv1D  # a class convert does not know stays as it is
    assert "NewGELU computes gelu_tanh" in dict(rep.converted)["mlps.0.act"]
    torch.testing.assert_close(model(idx), before)
    outs, hooks = keep_outputs([m.act for m in plain.mlps])

    def plain_loss():
        outs.clear()
        ce = F.cross_entropy(plain(idx).flatten(0, 1), tgt.flatten())
        return ce + LAM * sum(o.flatten(0, 1).square().sum(1).mean() for o in outs)  # a token is a row

    train_in_lockstep(plain, model, plain_loss, lambda: F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
                      + LAM * minaction.total_energy(model), torch.optim.AdamW, lr=1e-2)
    for h in hooks:
        h.remove()
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(idx), model(idx))


def test_elementwise_custom_activations_run_unfused_and_others_stay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), QuickGELU(), nn.Conv2d(4, 4, 3), RandomDrop(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5), ReLUSquared(), nn.Linear(5, 2)).double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert isinstance(model[2], EnergyActivation) and "QuickGELU" in model[2].activation
    assert isinstance(model[7], EnergyActivation) and type(model[6]) is nn.Linear  # the layer stays plain
    assert type(model[4]) is RandomDrop and type(model[3]) is nn.Conv2d
    skipped = dict(rep.skipped)
    assert "elementwise function of its input" in skipped["6"] and "EnergyActivation" in skipped["6"]
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), before)
    h = model[:3](x)
    torch.testing.assert_close(model[2].last_energy, h.flatten(1).square().sum(1).mean())
    r = model[:8](x)
    torch.testing.assert_close(model[7].last_energy, r.square().sum(1).mean())


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen = []

    def forward(self, x):
        self.calls += 1
        self.seen.append(x)
        return F.gelu(x)


def test_reading_leaves_no_trace_on_the_module_and_runs_none_of_its_hooks():
    mod = Counting()
    fired = []
    mod.register_forward_hook(lambda *a: fired.append(1))
    assert read_activation(mod) == "gelu"
    assert mod.calls == 0 and mod.seen == [] and fired == []


def test_energy_activation_takes_a_custom_module():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    fused = EnergyActivation(NewGELU(), rows="leading")
    assert fused.activation == "gelu_tanh"  # read: the fused pass
    torch.testing.assert_close(fused(x), NewGELU()(x))
    quick = EnergyActivation(QuickGELU())
    torch.testing.assert_close(quick(x), QuickGELU()(x))
    torch.testing.assert_close(quick.last_energy, QuickGELU()(x).square().sum(1).mean())
    for bad in (RandomDrop(), WithParameter(), Centring()):
        with pytest.raises(ValueError, match="custom module whose forward"):
            EnergyActivation(bad)


class ConvNeXtMlp(nn.Module):
    """timm's ConvNeXt Mlp with its own GELU class; and a LayerNorm then GELU."""

    def __init__(self, d=6):
        super().__init__()
        self.fc1 = nn.Conv2d(d, 2 * d, 1)
        self.act = TimmGELU()
        self.norm = nn.Identity()
        self.fc2 = nn.Conv2d(2 * d, d, 1)
        self.ln = nn.LayerNorm(d)
        self.act2 = TimmGELU()

    def forward(self, x):
        y = self.fc2(self.norm(self.act(self.fc1(x))))
        return self.act2(self.ln(y.permute(0, 2, 3, 1))).mean((1, 2)) + 0.0 * y.sum()


def test_timm_convnext_mlp_with_timms_gelu_converts():
    torch.manual_seed(0)
    m = ConvNeXtMlp().double()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    before = m(x)
    _, rep = minaction.convert(m, return_report=True)
    assert isinstance(m.fc1, EnergyConv2d) and m.fc1.activation == "gelu" and type(m.act) is nn.Identity
    assert isinstance(m.act2, EnergyActivation) and m.act2.activation == "gelu" and m.act2.rows == "leading"
    torch.testing.assert_close(m(x), before)
