"""``minaction.convert`` on modules that apply their children in ``forward()`` (read with torch.fx):
nanoGPT's MLP, a loop over an ``nn.ModuleList``, pytorch/examples' functional MNIST net, a ResNet
block whose ReLU module is shared. Each conversion keeps the model's output and its Parameter
objects, and trains as plain PyTorch with the hand-written penalty."""
from __future__ import annotations

import copy
import functools
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from doubles.lockstep import keep_outputs, train_in_lockstep
from minaction.nn import EnergyActivation, EnergyConv2d, EnergyLayer, EnergyLinear

torch.set_num_threads(1)
LAM = 0.05


class NanoMLP(nn.Module):
    """nanoGPT's MLP, verbatim in structure."""

    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        return self.dropout(x)


class NanoBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = NanoMLP(d)

    def forward(self, x):
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Tied embedding and head; a forward that asserts on a size (not traceable as a whole)."""

    def __init__(self, vocab=13, d=8, block_size=6):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([NanoBlock(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.block_size, f"sequence of {t} > block size {self.block_size}"
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def _hand_penalty(model: nn.Module, act_type):
    """Plain PyTorch: record every output of the activation modules of ``act_type``; the energy is
    sum over units of y^2, mean over rows (every leading dimension a row)."""
    return keep_outputs(m for m in model.modules() if isinstance(m, act_type))


def _energy(outs):
    return sum(o.pow(2).sum(-1).mean() if o.dim() <= 2 else o.pow(2).flatten(0, -2).sum(-1).mean()
               for o in outs)


def _unconverted(model: nn.Module, **kw) -> dict:
    """``convert`` on a model where nothing can be fused: it warns so, and the report's reasons by path."""
    with pytest.warns(UserWarning, match="converted nothing"):
        _, rep = minaction.convert(model, return_report=True, **kw)
    return dict(rep.skipped)


def test_nanogpt_mlp_converts_and_trains_as_plain_pytorch():
    torch.manual_seed(0)
    model = NanoGPT().double()
    plain = copy.deepcopy(model)
    idx = torch.randint(0, 13, (3, 5))
    targets = torch.randint(0, 13, (3, 5))
    before, _ = model(idx)
    fc_weight = model.h[0].mlp.c_fc.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converting something must not warn
        same, rep = minaction.convert(model, return_report=True)
    assert same is model
    assert [n for n, _ in rep.converted] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    assert "NanoMLP.forward()" in rep.converted[0][1] and "h.0.mlp.gelu is now nn.Identity" in rep.converted[0][1]
    skipped = dict(rep.skipped)
    assert set(skipped) == {"h.0.mlp.c_proj", "h.1.mlp.c_proj", "lm_head"}
    assert "returned" in skipped["h.0.mlp.c_proj"]
    assert "could not be traced by torch.fx" in skipped["lm_head"]
    for blk in model.h:
        assert isinstance(blk.mlp.c_fc, EnergyLinear) and blk.mlp.c_fc.activation == "gelu"
        assert type(blk.mlp.gelu) is nn.Identity and type(blk.mlp.c_proj) is nn.Linear
    assert model.h[0].mlp.c_fc.weight is fc_weight  # the same Parameter objects
    assert model.wte.weight is model.lm_head.weight  # the tie holds
    torch.testing.assert_close(model(idx)[0], before)

    # training: the converted model's loss + lam*E equals plain PyTorch's hand-written penalty
    outs, hooks = _hand_penalty(plain, nn.GELU)

    def plain_loss():
        outs.clear()
        return plain(idx, targets)[1] + LAM * _energy(outs)

    train_in_lockstep(plain, model, plain_loss, lambda: model(idx, targets)[1] + LAM * minaction.total_energy(model),
                      torch.optim.AdamW, lr=1e-2)
    for hook in hooks:
        hook.remove()


class Loop(nn.Module):
    """One tanh module after every layer of a ModuleList, then Linear-Dropout-ReLU, then logits."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.act = nn.Tanh()
        self.fin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.relu = nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return self.out(self.relu(self.drop(self.fin(x))))


def test_a_shared_activation_over_a_module_list_and_dropout_relu():
    torch.manual_seed(0)
    model = Loop()
    x = torch.randn(7, 8)
    torch.manual_seed(1)
    before = model(x)  # training mode: dropout draws from the global generator
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["layers.0", "layers.1", "layers.2", "fin"]
    assert all(model.layers[i].activation == "tanh" for i in range(3))
    assert model.fin.activation == "relu" and "dropout commutes" in rep.converted[3][1]
    assert type(model.act) is nn.Identity and type(model.relu) is nn.Identity
    assert [n for n, _ in rep.skipped] == ["out"]
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), before)  # the same dropout mask, after the fused relu
    assert minaction.total_energy(model).shape == ()


class MnistNet(nn.Module):
    """pytorch/examples' MNIST net, shrunk: functional activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.fc1 = nn.Linear(4 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = self.fc1(x).relu()
        return F.log_softmax(self.fc2(x), dim=1)


def test_relu_calls_fuse_and_stay_and_other_functions_are_named_with_the_fix():
    torch.manual_seed(0)
    model = MnistNet()
    x = torch.randn(3, 1, 12, 12)
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["conv1", "fc1"]
    assert isinstance(model.conv1, EnergyConv2d) and model.fc1.activation == "relu"
    assert "F.relu call stays" in rep.converted[0][1] and ".relu() call stays" in rep.converted[1][1]
    assert "F.log_softmax" in dict(rep.skipped)["fc2"]
    torch.testing.assert_close(model(x), before)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = torch.tanh(self.a(x))  # not idempotent: the call would apply tanh twice
            x = F.relu(self.b(x), inplace=True)  # in place on the output the energy layer keeps
            return F.gelu(self.c(x), approximate="tanh")

    other = Other()
    x = torch.randn(3, 4)
    before = other(x)
    _, rep = minaction.convert(other, return_report=True)
    skipped = dict(rep.skipped)
    assert "torch.tanh" in skipped["a"] and "activation='tanh'" in skipped["a"]
    assert "in-place relu" in skipped["b"]
    assert "gives Other's output" in skipped["c"] and "F.gelu" in skipped["c"]
    # the layers stay plain; observers count the tanh and the in-place relu (the gelu gives the output)
    assert "counted by an observer: a.activation_energy" in skipped["a"] and "b.activation_energy" in skipped["b"]
    assert other.a.activation_energy.activation == "tanh" and other.b.activation_energy.copy
    assert not hasattr(other.c, "activation_energy")
    torch.testing.assert_close(other(x), before)
    ha = torch.tanh(other.a(x))
    hb = F.relu(other.b(ha))
    torch.testing.assert_close(minaction.total_energy(other), ha.square().sum(1).mean() + hb.square().sum(1).mean())


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + x)


def test_a_relu_module_also_applied_after_a_residual_add_stays():
    torch.manual_seed(0)
    model = ResBlock()
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    skipped = _unconverted(model)
    assert "also applied to other values" in skipped["conv1"]
    assert "operator.add" in skipped["conv2"]
    torch.testing.assert_close(model(x), before)


class Pair(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


def test_an_activation_module_registered_twice_stays_and_a_single_one_converts_a_conv():
    torch.manual_seed(0)
    shared = nn.SiLU()
    model = nn.ModuleDict({"a": Pair(shared), "b": Pair(shared)})
    skipped = _unconverted(model)
    assert all("shared" in why for why in skipped.values()) and len(skipped) == 2
    relu = nn.ReLU()  # a shared ReLU stays where it is (relu is idempotent), and both convs convert
    model = nn.ModuleDict({"a": Pair(relu), "b": Pair(relu)})
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["a.conv", "b.conv"] and "shared with another part" in rep.converted[0][1]
    assert model["a"].act is relu and model["b"].act is relu

    one = Pair(nn.SiLU())
    x = torch.randn(2, 2, 6, 6)
    before = one(x)
    minaction.convert(one, include_output=True)  # the pair gives the model's output
    assert isinstance(one.conv, EnergyConv2d) and one.conv.activation == "silu"
    torch.testing.assert_close(one(x), before)


class Caching(nn.Module):
    """A forward that stores an intermediate on the module (tracing must not leave a proxy there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Sigmoid()
        self.seen = None

    def forward(self, x, scale: float = 1.0):
        self.seen = x
        return self.act(self.fc(x)) * scale


def test_tracing_leaves_the_module_state_as_it_was_and_an_earlier_optimizer_still_trains():
    model = Caching()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before convert: holds the same Parameters
    minaction.convert(model)
    assert model.seen is None
    assert isinstance(model.fc, EnergyLinear) and model.fc.activation == "sigmoid"
    w0 = model.fc.weight.detach().clone()
    model(torch.randn(3, 4))
    (minaction.total_energy(model)).backward()
    opt.step()
    assert not torch.equal(model.fc.weight, w0)


class Annealing(nn.Module):
    """A forward that updates buffers and a tensor attribute (a step counter, an annealed factor), as timm's
    BatchNormAct2d counts num_batches_tracked: tracing runs such updates for real."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.out = nn.Linear(8, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("decay", torch.ones(()))
        self.register_buffer("ema", torch.zeros(3))
        self.plain = torch.zeros(3)
        self.bn = nn.BatchNorm1d(8, momentum=None)  # cumulative averaging reads num_batches_tracked

    def forward(self, x):
        self.steps = self.steps + 1
        self.ema = 0.9 * self.ema + 0.1  # a rebinding of a multi-element buffer (compared by identity, not ==)
        self.decay.mul_(0.5)
        self.plain.add_(1)
        self.bn.num_batches_tracked.add_(1)
        return self.out(self.act(self.fc(x)) * self.decay)


def test_convert_leaves_buffers_and_tensor_attributes_as_they_were():
    """convert reads each forward twice (train and eval) and runs its Python code: updates of buffers and
    tensor attributes made then are undone (timm's BatchNormAct2d models gained one num_batches_tracked per
    convert, and with momentum=None their running statistics differed from the plain model's, session 24)."""
    model = Annealing()
    steps = model.steps
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, rep = minaction.convert(model, return_report=True)
    assert [p for p, _ in rep.converted] == ["fc"]
    assert model.steps is steps and model.steps.item() == 0 and model.decay.item() == 1.0
    assert model.plain.tolist() == [0.0, 0.0, 0.0] and model.bn.num_batches_tracked.item() == 0
    assert model.ema.tolist() == [0.0, 0.0, 0.0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)


def test_a_large_buffer_updated_while_tracing_is_named_not_copied(monkeypatch):
    """Copies are bounded (SNAPSHOT_COPY_BYTES each): a larger buffer updated in place while tracing is named in a
    warning instead of being copied before every trace (4 x 64 MiB buffers cost 1.4 s and 257 MiB per convert)."""
    from minaction import _fx_pairs

    monkeypatch.setattr(_fx_pairs, "SNAPSHOT_COPY_BYTES", 4)  # one float: the 3-element ones are "large"
    model = Annealing()
    with pytest.warns(UserWarning, match=r"updated Annealing's tensor 'plain' in place, which was not copied"):
        minaction.convert(model)
    assert model.steps.item() == 0 and model.decay.item() == 1.0  # the small ones were undone


class Unreadable(nn.Module):
    """transformers' AlbertModel in structure: a pooler Linear + Tanh applied inline in a forward that fx cannot
    read (it raises on its optional arguments' defaults), beside a readable block that converts."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.pooler = nn.Linear(8, 8)
        self.pooler_activation = nn.Tanh()

    def forward(self, x=None, embeds=None):
        if (x is None) == (embeds is None):
            raise ValueError("You must specify exactly one of x or embeds")
        return self.pooler_activation(self.pooler(self.block(x if x is not None else embeds)))


class Classifier(nn.Module):  # AlbertForSequenceClassification in structure
    def __init__(self):
        super().__init__()
        self.albert = Unreadable()
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.albert(x))


class UnreadableAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU())

    def forward(self, x, mask=None):
        if mask is None:
            raise ValueError("a mask is needed")
        return self.mlp(self.q(x) * mask)

    def __call__(self, x, mask=None):
        return super().__call__(x, torch.ones(4) if mask is None else mask)


def test_layers_left_plain_by_an_unreadable_forward_that_holds_an_activation_are_warned_about():
    """Something converted, so no 'converted nothing' warning: the pooler of a forward fx cannot read, which
    holds an activation module, is named in a warning (ALBERT's pooler + tanh went uncounted with no word,
    session 24); projections of an unreadable forward without one (attention's query) are not."""
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) plain because the forward that applies them could "
                                         r"not be read by torch.fx: albert.pooler \(.*exactly one of x or embeds"):
        minaction.convert(Classifier())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = minaction.convert(Classifier(), return_report=True)  # the report lists it instead
        assert any(n == "albert.pooler" and "could not be traced" in d for n, d in rep.skipped)
        minaction.convert(nn.Sequential(UnreadableAttention(), nn.Linear(8, 2)))


class SharedDepth(nn.Module):
    """ALBERT in structure: one block (Linear + GELU) applied at every depth by its owner's forward."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.GELU())])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for _ in range(3):
            x = self.groups[0](x)
        return self.head(x)


def test_a_layer_its_owner_applies_several_times_says_what_total_energy_counts():
    """convert saw the three calls but its report said nothing (session 24): the converted layer's line says that
    total_energy counts its last call and names the forms that count every call."""
    _, rep = minaction.convert(SharedDepth(), return_report=True)
    (path, desc), = rep.converted
    assert path == "groups.0.0"
    assert "SharedDepth.forward() applies groups.0 3 times, and total_energy counts each energy layer's last call" \
        in desc and "record_energy(model)" in desc
    _, rep = minaction.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), return_report=True)
    assert all("times" not in d for _, d in rep.converted)


def test_a_wrapper_module_does_not_hide_the_model_inside():
    """A module whose forward fx cannot read (here torch.compile's OptimizedModule, never run) reports
    nothing for the layers of the model it wraps: that model's own forward decides them."""
    torch.manual_seed(0)
    model = Loop().eval()
    x = torch.randn(3, 8)
    before = model(x)
    _, rep = minaction.convert(torch.compile(model), return_report=True)
    assert [n for n, _ in rep.converted] == ["_orig_mod.layers.0", "_orig_mod.layers.1", "_orig_mod.layers.2",
                                             "_orig_mod.fin"]
    assert [n for n, _ in rep.skipped] == ["_orig_mod.out"]
    torch.testing.assert_close(model(x), before)


class TanhGeluMLP(nn.Module):
    """GPT-2's MLP: the tanh approximation of GELU, as a module and as a function."""

    def __init__(self, d=6):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU(approximate="tanh")
        self.c_mid = nn.Linear(4 * d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = self.act(self.c_fc(x))
        x = F.gelu(self.c_mid(x), approximate="tanh")
        return self.c_proj(x)


def test_tanh_gelu_module_converts_and_the_function_is_named():
    torch.manual_seed(0)
    model = TanhGeluMLP().double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["c_fc", "c_mid.activation_energy"]
    assert model.c_fc.activation == "gelu_tanh" and model.c_mid.activation_energy.activation == "gelu_tanh"
    assert "activation='gelu_tanh'" in dict(rep.skipped)["c_mid"]  # the fused form, for speed
    torch.testing.assert_close(model(x), before)
    hidden = F.gelu(F.linear(x, model.c_fc.weight, model.c_fc.bias), approximate="tanh")
    mid = F.gelu(model.c_mid(hidden), approximate="tanh")
    torch.testing.assert_close(minaction.total_energy(model),
                               hidden.pow(2).sum(-1).mean() + mid.pow(2).sum(-1).mean())


class SharedWithUnconvertible(nn.Module):
    """One activation module after a Linear and after a transposed conv (which has no energy twin)."""

    def __init__(self, act=None):
        super().__init__()
        self.conv = nn.ConvTranspose2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.relu = act if act is not None else nn.ReLU()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.relu(self.fc(self.relu(self.conv(x)).flatten(1))))


def test_an_activation_shared_with_an_unconvertible_layer_stays():
    """The activation after fc also follows a conv that stays plain, so it cannot become nn.Identity:
    a SiLU keeps fc plain; a ReLU (idempotent) stays in place and fc converts with a fused relu."""
    torch.manual_seed(0)
    model = SharedWithUnconvertible(nn.SiLU())
    x = torch.randn(2, 1, 4, 4)
    before = model(x)
    skipped = _unconverted(model, wrap_activations=False)
    assert "ConvTranspose2d has no energy counterpart" in skipped["conv"]
    assert "also follows conv, which cannot be converted" in skipped["fc"]
    assert type(model.relu) is nn.SiLU and type(model.fc) is nn.Linear
    torch.testing.assert_close(model(x), before)

    model = SharedWithUnconvertible()
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["fc"]
    assert "relu stays, since it also follows conv, which stays plain" in rep.converted[0][1]
    assert type(model.relu) is nn.ReLU and isinstance(model.fc, EnergyLinear) and model.fc.activation == "relu"
    torch.testing.assert_close(model(x), before)


class TwoLayersOneTanh(nn.Module):
    def __init__(self, shared_fc):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = shared_fc
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


def test_an_activation_that_also_follows_a_shared_layer_stays():
    """``b`` is registered twice in the model (so it stays plain); the tanh after ``a`` is the same
    module, so ``a`` must stay plain too."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 4)
    model = nn.ModuleDict({"net": TwoLayersOneTanh(fc), "other": fc})
    x = torch.randn(3, 4)
    before = model["net"](x)
    skipped = _unconverted(model, wrap_activations=False)
    assert "shared" in skipped["net.b"] and "also follows b, which cannot be converted" in skipped["net.a"]
    torch.testing.assert_close(model["net"](x), before)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Outer(nn.Module):
    """Applies the inner module's activation to its own projection too (parents are read first)."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(self.inner.act(self.proj(x)))


def test_an_activation_a_parent_forward_also_applies_stays():
    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(3, 4)
    before = model(x)
    skipped = _unconverted(model)
    assert "shared" in skipped["inner.fc"]
    torch.testing.assert_close(model(x), before)


class Placeholders(nn.Module):
    """timm-style slots: an nn.Identity where a drop-path or a norm could be."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.drop_path = nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.proj(x))


def test_an_identity_placeholder_in_forward_is_not_an_activation():
    skipped = _unconverted(Placeholders())
    assert "placeholder" in skipped["proj"]


class NewGELU(nn.Module):
    """minGPT's GELU: the tanh approximation written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MinGPTBlock(nn.Module):
    """minGPT's current Block layout: the MLP's modules in an nn.ModuleDict, applied by a lambda."""

    def __init__(self, act, d=8):
        super().__init__()
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d), c_proj=nn.Linear(4 * d, d), act=act,
                                      dropout=nn.Dropout(0.0)))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x):
        return x + self.mlpf(self.ln_2(x))


class OpaqueGELU(nn.Module):
    """A GELU-named module whose forward torch.fx cannot read as elementwise ops (it reads a shape)."""

    def forward(self, x):
        return NewGELU()(x.reshape(-1)).reshape(x.shape)


@pytest.mark.parametrize("act", ["newgelu", "tanh_gelu"])
def test_mingpt_block_newgelu_and_tanh_gelu_convert(act):
    skipped = _unconverted(MinGPTBlock(OpaqueGELU()))
    assert "nn.GELU(approximate='tanh')" in skipped["mlp.c_fc"] and "gelu_tanh" in skipped["mlp.c_fc"]
    assert "operator.add" in skipped["mlp.c_proj"] and "projection" in skipped["mlp.c_proj"]

    make = NewGELU if act == "newgelu" else functools.partial(nn.GELU, approximate="tanh")
    torch.manual_seed(0)
    block = MinGPTBlock(make()).double()
    torch.manual_seed(0)
    plain = MinGPTBlock(make()).double()  # not deepcopy: mlpf's closure would be shared
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _, rep = minaction.convert(block, return_report=True)
    assert [n for n, _ in rep.converted] == ["mlp.c_fc"] and block.mlp.c_fc.activation == "gelu_tanh"
    outs, hooks = _hand_penalty(plain, (nn.GELU, NewGELU))
    loss_p = plain(x).square().mean() + LAM * _energy(outs)
    loss_m = block(x).square().mean() + LAM * minaction.total_energy(block)
    torch.testing.assert_close(loss_m, loss_p)
    loss_p.backward()
    loss_m.backward()
    for (n, p), q in zip(plain.named_parameters(), block.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)
    for hook in hooks:
        hook.remove()


class Mixed(nn.Module):
    """A forward-applied pair before a Sequential one: the report lists both in module order."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        return self.seq(self.act(self.fc(x)))


def test_the_report_is_in_module_order():
    _, rep = minaction.convert(Mixed(), include_output=True, return_report=True)
    assert [n for n, _ in rep.converted] == ["fc", "seq.0"]


class Recording(nn.Module):
    """A forward that keeps intermediates on itself and on a child (attention-map style)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.inner = nn.Module()
        self.inner.last = None
        self.maps = []
        self.seen = {"calls": 0}

    def forward(self, x):
        h = self.act(self.fc(x))
        self.maps.append(h)
        self.inner.last = h
        return h


def test_tracing_leaves_no_proxy_in_lists_or_child_attributes():
    model = Recording()
    maps = model.maps
    model(torch.randn(2, 4))
    first = model.maps[0]
    minaction.convert(model, include_output=True)
    assert isinstance(model.fc, EnergyLinear)
    assert model.maps is maps and len(maps) == 1 and maps[0] is first  # the same list, unchanged
    assert model.inner.last is not None and type(model.inner.last) is torch.Tensor


class ModeBranch(nn.Module):
    """A forward whose activation depends on the mode: relu in training, tanh in evaluation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.act_eval = nn.Tanh()
        self.same = nn.Linear(4, 4)
        self.silu = nn.SiLU()

    def forward(self, x):
        h = self.fc(x)
        h = self.act(h) if self.training else self.act_eval(h)
        return self.silu(self.same(h))


@pytest.mark.parametrize("train", [True, False])
def test_a_layer_whose_activation_depends_on_the_mode_stays(train):
    torch.manual_seed(0)
    model = ModeBranch().train(train)
    x = torch.randn(3, 4)
    before = {mode: model.train(mode)(x) for mode in (True, False)}
    model.train(train)
    _, rep = minaction.convert(model, include_output=True, return_report=True)
    assert [n for n, _ in rep.converted] == ["same"]  # the same pairing in both modes
    assert "train and in eval mode" in dict(rep.skipped)["fc"]
    assert model.training is train and all(m.training is train for m in model.modules())
    for mode in (True, False):
        torch.testing.assert_close(model.train(mode)(x), before[mode])


def test_converted_modules_keep_the_models_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Inner()).eval()
    minaction.convert(model, include_output=True)
    assert isinstance(model[0], EnergyLinear) and isinstance(model[2].fc, EnergyLinear)
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------- the output layer
class Discriminator(nn.Module):
    """DCGAN's discriminator shape (pytorch/examples): an nn.Sequential ending in Conv2d + Sigmoid, whose
    output the forward returns reshaped."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(1, 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 4, 1, 0), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


class Decoder(nn.Module):
    """An autoencoder: a hidden relu call, an output relu call, and a head returned in a tuple with a
    hidden activation (which, used by the next layer too, is hidden)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 6)
        self.sig = nn.Sigmoid()
        self.drop = nn.Dropout(0.0)

    def forward(self, z):
        h = F.relu(self.fc1(z))
        g = F.relu(self.fc2(h))
        return self.drop(self.sig(self.fc3(g))), h


def test_the_layer_that_gives_the_models_output_stays_plain_unless_asked():
    """The energy is that of the hidden layers: a layer whose activation gives the model's output (a
    sigmoid head, a GAN discriminator's last conv, a decoder's last layer) stays plain, as the logits
    layer does, and the report says why and what converts it; include_output=True converts it."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid(), nn.Flatten(0))
    _, rep = minaction.convert(head, return_report=True)
    assert [n for n, _ in rep.converted] == ["0"]
    why = dict(rep.skipped)["2"]
    assert "Sigmoid gives Sequential's output" in why and "include_output=True" in why
    assert type(head[2]) is nn.Linear and type(head[3]) is nn.Sigmoid

    disc = Discriminator()
    x = torch.randn(3, 1, 8, 8)
    before = disc(x)
    _, rep = minaction.convert(disc, return_report=True)
    assert [n for n, _ in rep.converted] == ["main.0"]
    assert "Sigmoid gives Discriminator's output" in dict(rep.skipped)["main.2"]
    torch.testing.assert_close(disc(x), before)

    dec = Decoder()
    z = torch.randn(2, 3)
    before = dec(z)
    _, rep = minaction.convert(dec, return_report=True)
    assert [n for n, _ in rep.converted] == ["fc1", "fc2"]  # fc1's output is returned, but fc2 uses it too
    assert "Sigmoid gives Decoder's output" in dict(rep.skipped)["fc3"]
    for a, b in zip(dec(z), before):
        torch.testing.assert_close(a, b)

    relu_out = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Inner())  # Inner: fc + SiLU, returned
    _, rep = minaction.convert(relu_out, return_report=True)
    assert [n for n, _ in rep.converted] == ["0"] and "SiLU gives Sequential's output" in dict(rep.skipped)["2.fc"]

    for model in (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid()), Discriminator(),
                  Decoder()):
        _, rep = minaction.convert(model, include_output=True, return_report=True)
        assert not rep.skipped and len(rep.converted) in (2, 3)


# ----------------------------------------------------------------------------- torch's transformer layers
@pytest.mark.parametrize("activation,name", [("relu", "relu"), ("gelu", "gelu"), (nn.GELU(approximate="tanh"),
                                                                                 "gelu_tanh")])
def test_torch_transformer_layers_feed_forward_converts_and_trains_as_plain_pytorch(activation, name):
    """nn.TransformerEncoderLayer / DecoderLayer (word_language_model's TransformerModel): fx cannot read
    their forward, but their feed-forward block is linear2(dropout(activation(linear1(x)))), so linear1
    converts. The outputs stay the same in training and in evaluation (torch's fused inference path,
    which would compute no energy, is off for converted layers) and in deep copies and pickles, the
    energy is the hand-computed one,
    and three steps train as plain PyTorch with the penalty written by hand."""
    def build():
        torch.manual_seed(0)
        act = copy.deepcopy(activation)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, activation=act,
                                                               batch_first=True), 2, enable_nested_tensor=False)
        dec = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, activation=act, batch_first=True)
        return nn.ModuleDict({"enc": enc, "dec": dec}).double()

    def run(m, x):
        return m["dec"](x, m["enc"](x))

    # built twice, not deep-copied: torch's TransformerDecoderLayer.__setstate__ turns an activation *module*
    # into F.relu on a copy (its state has no "activation" key: the module is in _modules)
    model, plain = build(), build()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    before_eval = run(model.eval(), x).detach()  # with autograd on: torch's own (not the fused inference) path,
    model.train()  # which for GELU(approximate="tanh") computes exact gelu
    _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["enc.layers.0.linear1", "enc.layers.1.linear1", "dec.linear1"]
    skipped = dict(rep.skipped)
    assert "feed-forward block" in skipped["dec.linear2"] and "output projection" in skipped["enc.layers.0.linear2"]
    assert "MultiheadAttention applies it itself" in skipped["dec.multihead_attn.out_proj"]
    blocks = [model["enc"].layers[0], model["enc"].layers[1], model["dec"]]
    for blk in blocks:
        assert isinstance(blk.linear1, EnergyLinear) and blk.linear1.activation == name
        assert blk.activation(x) is x and blk.activation_relu_or_gelu == 0
    with torch.no_grad():
        torch.testing.assert_close(run(model.eval(), x), before_eval)
        assert minaction.total_energy(model).item() > 0  # evaluation computes the energy too
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # EMA / best-model copies
            torch.testing.assert_close(run(copied, x), before_eval)
    model.train()

    act_fn = plain["dec"].activation  # the same activation in every block
    pre, hooks = keep_outputs(blk.linear1 for blk in (plain["enc"].layers[0], plain["enc"].layers[1], plain["dec"]))

    def plain_loss():
        pre.clear()
        out_p = run(plain, x)
        return out_p.square().mean() + LAM * sum(act_fn(z).square().sum(-1).mean() for z in pre)

    train_in_lockstep(plain, model, plain_loss,
                      lambda: run(model, x).square().mean() + LAM * minaction.total_energy(model), lr=0.1)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("activation", [nn.LeakyReLU(0.1), nn.Mish()], ids=["leaky_relu", "mish"])
def test_a_transformer_layer_with_an_unfused_activation_module_counts_it(activation):
    """An activation module the kernels do not have (LeakyReLU, Mish) leaves linear1 plain; the block's
    activation module becomes an EnergyActivation per token, as the report always said (it stayed as it was,
    convert warned that it converted nothing, and total_energy raised: session 23). Three steps train as
    plain PyTorch with the penalty written by hand."""
    def build():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, activation=copy.deepcopy(
            activation), batch_first=True), 2, enable_nested_tensor=False).double()

    model, plain = build(), build()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = minaction.convert(model, return_report=True)
    assert [n for n, _ in rep.converted] == ["layers.0.activation", "layers.1.activation"]
    for blk in model.layers:
        assert isinstance(blk.activation, EnergyActivation) and blk.activation.rows == "leading"
        assert type(blk.linear1) is nn.Linear and blk.activation_relu_or_gelu == 0
    assert "becomes an EnergyActivation" in dict(rep.skipped)["layers.0.linear1"]
    pre, hooks = keep_outputs(blk.linear1 for blk in plain.layers)

    def plain_loss():
        pre.clear()
        return plain(x).square().mean() + LAM * sum(activation(z).square().sum(-1).mean() for z in pre)

    train_in_lockstep(plain, model, plain_loss, lambda: model(x).square().mean() + LAM * minaction.total_energy(model),
                      lr=0.1)
    for hook in hooks:
        hook.remove()
    # a decoder layer too, and its copies: torch's TransformerDecoderLayer.__setstate__ put F.relu over the wrapped
    # module on a deepcopy or pickle (the copy computed relu and had no energy)
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, activation=copy.deepcopy(activation),
                                     batch_first=True).double()
    mem = torch.randn(3, 4, 8, dtype=torch.float64)
    want = dec(x, mem)
    minaction.convert(dec)
    assert isinstance(dec.activation, EnergyActivation)
    torch.testing.assert_close(dec(x, mem), want)
    e = minaction.total_energy(dec)
    for copied in (copy.deepcopy(dec), pickle.loads(pickle.dumps(dec))):
        assert isinstance(copied.activation, EnergyActivation)
        assert copied.activation is copied._modules["activation"]
        torch.testing.assert_close(copied(x, mem), want)
        torch.testing.assert_close(minaction.total_energy(copied), e)


def test_a_converted_encoder_runs_a_padded_batch_in_evaluation():
    """A batch_first TransformerEncoder (enable_nested_tensor defaults to True) in evaluation with a
    src_key_padding_mask packed the batch into a nested tensor, which the energy layers cannot take:
    "NestedTensorImpl doesn't support sizes" (session 23). convert turns the packing off; the valid
    positions equal the plain model's."""
    torch.manual_seed(0)
    plain = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), 2).eval()
    model = copy.deepcopy(plain)
    x = torch.randn(3, 6, 8)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:], pad[1, 2:] = True, True
    with torch.no_grad():
        want = plain(x, src_key_padding_mask=pad)
        _, rep = minaction.convert(model, return_report=True)
        assert model.use_nested_tensor is False and "use_nested_tensor is now False" in dict(rep.converted)[
            "layers.0.linear1"] and [n for n, _ in rep.converted] == ["layers.0.linear1", "layers.1.linear1"]
        got = model(x, src_key_padding_mask=pad)
        assert minaction.total_energy(model).item() > 0
    torch.testing.assert_close(got[~pad], want[~pad])


class ResidualNoNorm(nn.Module):
    """A residual block without normalisation: one ReLU module after conv1 and after the residual add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        return self.head(self.relu(out + x).flatten(1))


class ReluAtBothEnds(nn.Module):
    """One ReLU module after a hidden layer and after the output layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_a_relu_module_that_cannot_become_identity_stays_and_its_layer_converts():
    """relu is idempotent, so a ReLU module that must keep working (applied after a residual add too,
    or after the output layer) stays where it is, and the layer before it
    converts with a fused relu: the same outputs, the energy of that layer. The output layer's own
    pair is decided by its call, not by the module it shares."""
    torch.manual_seed(0)
    for model, x, converted, kept, reason in (
            (ResidualNoNorm(), torch.randn(2, 2, 4, 4), ["conv1"], "relu", "also applied to other values"),
            (ReluAtBothEnds(), torch.randn(2, 3), ["fc1"], "act", "also follows fc2, which stays plain")):
        before = model(x)
        _, rep = minaction.convert(model, return_report=True)
        assert [n for n, _ in rep.converted] == converted
        desc = rep.converted[0][1]
        assert f"{kept} stays, since" in desc and reason in desc and "already rectified" in desc
        assert type(getattr(model, kept)) is nn.ReLU
        layer = getattr(model, converted[0])
        assert isinstance(layer, EnergyLayer) and layer.activation == "relu"
        torch.testing.assert_close(model(x), before)
    model = ReluAtBothEnds()
    x = torch.randn(5, 3)
    minaction.convert(model)
    model(x)
    torch.testing.assert_close(minaction.total_energy(model), F.relu(x @ model.fc1.weight.T + model.fc1.bias)
                               .square().sum(1).mean())
    assert "fc2" in dict(minaction.convert(ReluAtBothEnds(), return_report=True)[1].skipped)


class CheckpointingLayer(nn.Module):
    """transformers 5's ``GradientCheckpointingLayer``: every subclass's ``forward`` is wrapped, through
    ``functools.wraps``, by ``forward_with_checkpointing(self, *args, **kwargs)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.forward

        @functools.wraps(forward)
        def forward_with_checkpointing(self, *args, **kw):
            return forward(self, *args, **kw)

        cls.forward = forward_with_checkpointing


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, h, mask=None, **kwargs):
        q, k, v = self.qkv(h).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class OPTStyleLayer(CheckpointingLayer):
    """OPT's / BART's layers: the feed-forward inline, **kwargs passed on to the attention, and (BART's
    encoder) a test of the value's dtype, which fx cannot branch on: values read as the weights' dtype."""

    def __init__(self, d):
        super().__init__()
        self.self_attn = Attention(d)
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, hidden_states, attention_mask=None, *, use_cache=False, **kwargs):
        hidden_states = hidden_states + self.self_attn(hidden_states, mask=attention_mask, **kwargs)
        hidden_states = hidden_states + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if hidden_states.dtype == torch.float16:  # BART's encoder layer: a clamp in half precision
            hidden_states = hidden_states.clamp(-1e4, 1e4)
        return hidden_states


class OPTStyle(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList(OPTStyleLayer(d) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, attention_mask=None)
        return self.head(x)


def test_a_wrapped_forward_taking_kwargs_is_read_and_its_feed_forward_converts():
    """transformers 5 wraps each layer's forward (``*args, **kwargs``) and its layers pass ``**kwargs`` on:
    fx could read neither, so OPT's and BART's decoder layers converted nothing. The function the wrapper
    wraps is read, with its named arguments only, and a value's dtype as the weights'; the model trains as
    plain PyTorch with the penalty."""
    torch.manual_seed(0)
    model = OPTStyle().double()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    before = model(x)
    _, rep = minaction.convert(model, return_report=True)
    assert all(isinstance(layer.fc1, EnergyLinear) and layer.fc1.activation == "gelu" for layer in model.layers)
    assert all(isinstance(layer.activation_fn, nn.Identity) for layer in model.layers)
    assert type(model.layers[0]) is OPTStyleLayer  # the class is the model's own again after reading
    assert "layers.0.self_attn.qkv" not in dict(rep.converted)
    torch.testing.assert_close(model(x), before)
    outs, _ = keep_outputs([layer.activation_fn for layer in plain.layers])

    def plain_loss():
        outs.clear()
        out = plain(x)
        return out.square().mean() + LAM * sum(o.flatten(0, 1).square().sum(1).mean() for o in outs)

    train_in_lockstep(plain, model, plain_loss, lambda: model(x).square().mean() + LAM * minaction.total_energy(model),
                      lr=0.1)


# ----------------------------------------------------------------------------- pytorch/examples (session 18)
def _dcgan_main():
    return nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(),
                         nn.Conv2d(4, 1, 4, 1, 0), nn.Sigmoid())


class _DcganD(nn.Module):
    """pytorch/examples dcgan's Discriminator forward: a branch on input.is_cuda, which fx could not read."""

    def __init__(self):
        super().__init__()
        self.ngpu, self.main = 1, _dcgan_main()

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output.view(-1, 1).squeeze(1)


class _ValueBranch(nn.Module):
    """A forward fx cannot read at all (a branch on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.main = _dcgan_main()

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.main(x).view(-1, 1).squeeze(1)


@pytest.mark.parametrize("cls", [_DcganD, _ValueBranch])
def test_output_layer_of_a_forward_fx_reads_badly_stays_plain(cls):
    """DCGAN's `if input.is_cuda and ...` made fx give up on the forward; the output walk then stopped, and the
    discriminator's Conv2d+Sigmoid output (and the generator's Tanh image) were counted as hidden energy. A value's
    is_cuda / is_cpu now read as its parameters' device; a forward fx cannot read at all takes its last submodule as
    the output and says so in the report's notes (and in a warning without return_report)."""
    torch.manual_seed(0)
    model, rep = minaction.convert(cls(), return_report=True)
    reason = dict(rep.skipped)["main.4"]
    assert type(model.main[4]) is nn.Conv2d
    assert [n for n, _ in rep.converted] == ["main.1", "main.2"]
    if cls is _ValueBranch:
        assert "its Sigmoid is taken to give _ValueBranch's output" in reason and "a guess" in reason
        note = dict(rep.notes)["_ValueBranch"]
        assert "could not be read with torch.fx" in note and "'main' is taken as the output" in note
        with pytest.warns(UserWarning, match="'main' is taken as the output"):
            minaction.convert(cls())
    else:
        assert "its Sigmoid gives" in reason and rep.notes == []
    x = torch.randn(2, 3, 8, 8)
    h = F.leaky_relu(model.main[0](x), 0.2)
    want = h.square().sum((1, 2, 3)).mean() + F.relu(model.main[2](h)).square().sum((1, 2, 3)).mean()
    model(x)
    torch.testing.assert_close(minaction.total_energy(model), want)


def test_a_forward_fx_cannot_read_takes_a_head_named_child_as_the_output():
    """A model whose head is registered before its body (word_language_model registers `decoder` before
    `input_emb`) and whose forward fx cannot read (`len(x)`): the last registered submodule was taken as
    the output, so the hidden body's last layer stayed plain with a reason stated as fact, and the real
    output head was converted (its sigmoid counted as hidden energy; session 23). A child named like a
    head is taken instead, and the report says the output was guessed."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(16, 1), nn.Sigmoid())
            self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x)) * (len(x) > 0)

    model, rep = minaction.convert(M(), return_report=True)
    assert [n for n, _ in rep.converted] == ["body.0", "body.2"] and type(model.head[0]) is nn.Linear
    assert "is taken to give M's output" in dict(rep.skipped)["head.0"]
    assert "submodule named like a head 'head' is taken as the output (a guess)" in dict(rep.notes)["M"]


class _Vae(nn.Module):
    """pytorch/examples vae: the decoder's sigmoid output, clamped (a later version of the example)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22, self.fc3, self.fc4 = (nn.Linear(12, 8), nn.Linear(8, 3), nn.Linear(8, 3),
                                                              nn.Linear(3, 8), nn.Linear(8, 12))

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.clamp(torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), 1e-6, 1 - 1e-6), mu, logvar


def test_a_clamped_sigmoid_output_is_the_models_output():
    """The VAE's clamp(sigmoid(fc4(h))) output got an observer, which counted the 784-unit reconstruction as hidden
    energy; clamp / clip now pass the output on, as views do."""
    model, rep = minaction.convert(_Vae(), return_report=True)
    assert sorted(n for n, _ in rep.converted) == ["fc1", "fc3"]
    assert "gives _Vae's output" in dict(rep.skipped)["fc4"]
    assert not any(type(m).__name__ == "ActivationObserver" for m in model.modules())


class _Reinforce(nn.Module):
    """pytorch/examples reinforcement_learning/reinforce.py's Policy."""

    def __init__(self):
        super().__init__()
        self.affine1, self.dropout, self.affine2 = nn.Linear(4, 16), nn.Dropout(p=0.6), nn.Linear(16, 2)

    def forward(self, x):
        x = self.affine1(x)
        x = self.dropout(x)
        x = F.relu(x)
        return F.softmax(self.affine2(x), dim=1)


def test_layer_dropout_module_relu_call_counts_once():
    """affine1 -> nn.Dropout -> F.relu: affine1 fuses with relu (which commutes with dropout) and counts it, and an
    observer on the dropout counted the same activation again (total_energy twice the true value in eval mode)."""
    torch.manual_seed(0)
    model, rep = minaction.convert(_Reinforce(), return_report=True)
    assert [n for n, _ in rep.converted] == ["affine1"]
    assert not any(type(m).__name__ == "ActivationObserver" for m in model.modules())
    s = torch.randn(8, 4)
    model.eval()
    model(s)
    torch.testing.assert_close(minaction.total_energy(model), F.relu(model.affine1(s)).square().sum(1).mean())


class _InplaceStatement(nn.Module):
    """An in-place activation written as a statement: `x = self.fc3(x); x.relu_()`."""

    def __init__(self):
        super().__init__()
        self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = self.fc3(x)
        x.relu_()
        return self.fc4(x)


def test_an_in_place_activation_statement_is_observed():
    """fc4 takes fc3's node directly (relu_ mutates it): the output walk took fc3's activation for the model's
    output, and nothing was counted (total_energy then raised). An observer counts it now, and the model computes
    exactly what the plain one does, gradients included (float64)."""
    torch.manual_seed(0)
    plain = _InplaceStatement().double()
    model, rep = minaction.convert(copy.deepcopy(plain), return_report=True)
    assert [n for n, _ in rep.converted] == ["fc3.activation_energy"]
    x = torch.randn(4, 8, dtype=torch.float64)
    y = model(x)
    e = minaction.total_energy(model)
    torch.testing.assert_close(y, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(e, F.relu(plain.fc3(x)).square().sum(1).mean())
    g = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    gp = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
    for a, b in zip(g, gp):
        torch.testing.assert_close(a, b)


def test_a_converted_model_is_freed_at_del_without_a_garbage_collection():
    """convert reads forward() with torch.fx, whose tracer stays in reference cycles holding the model: the
    model was freed only by the next full garbage collection, so `del model` (before torch.cuda.empty_cache)
    kept its memory (session 23). The tracer lets go of the model once read."""
    import gc
    import weakref

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))

    class Unreadable(Net):  # a forward fx cannot read: the remembered trace error held the model the same way
        def forward(self, x):
            return super().forward(x * 2 if x.sum() > 0 else x)

    gc.collect()
    gc.disable()
    try:
        for cls in (Net, Unreadable):
            model = minaction.convert(cls())
            assert isinstance(model.fc1, EnergyLinear) == (cls is Net)  # read with fx (not an nn.Sequential)
            ref = weakref.ref(model)
            del model
            assert ref() is None, cls.__name__
    finally:
        gc.enable()
