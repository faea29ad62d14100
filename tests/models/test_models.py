"""Architectures x dataset layouts: shapes, loss, gradients, energy, batched members,
parameter matching, activation statistics. Random tensors only (no data needed)."""
import math

import pytest
import torch
import torch.nn.functional as F

import minaction
from minaction import models
from minaction.data import DataMeta
from minaction.errors import InputTypeError
from minaction.models.cnn import LoopEnsemble

# one DataMeta per input layout of the data package (text vocabularies kept small here)
LAYOUTS = {
    "mnist": DataMeta("mnist", "vision", 10, (1, 28, 28), torch.float32),
    "sst2": DataMeta("sst2", "text", 2, (64,), torch.int64, vocab_size=300),
    "nmnist": DataMeta("nmnist", "neuromorphic", 10, (8, 2, 34, 34), torch.float32),
    "mnist_spikes": DataMeta("mnist_spikes", "neuromorphic", 10, (8, 1, 28, 28), torch.float32,
                             spike_encoded=True),
    "ecg5000": DataMeta("ecg5000", "physiological", 5, (1, 140), torch.float32),
}
# the real shapes of every dataset, for the parameter-count table
REAL = dict(LAYOUTS, **{
    "fashion_mnist": DataMeta("fashion_mnist", "vision", 10, (1, 28, 28), torch.float32),
    "sst2": DataMeta("sst2", "text", 2, (64,), torch.int64, vocab_size=20000),
    "20newsgroups": DataMeta("20newsgroups", "text", 20, (256,), torch.int64, vocab_size=20000),
    "ecg200": DataMeta("ecg200", "physiological", 2, (1, 96), torch.float32),
    "eog_horizontal": DataMeta("eog_horizontal", "physiological", 12, (1, 1250), torch.float32),
})


def batch(meta, B=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if meta.modality == "text":
        x = torch.randint(2, meta.vocab_size, (B,) + tuple(meta.input_shape), generator=g)
        x[:, -5:] = 0  # padding
        x[0, 3] = 1  # an unknown token
    elif meta.name.endswith("_spikes"):
        x = (torch.rand((B,) + tuple(meta.input_shape), generator=g) < 0.3).to(dtype)
    elif meta.modality == "neuromorphic":
        x = torch.poisson(torch.full((B,) + tuple(meta.input_shape), 0.5), generator=g).to(dtype)
    elif meta.modality == "vision":
        x = torch.rand((B,) + tuple(meta.input_shape), generator=g, dtype=dtype)
    else:
        x = torch.randn((B,) + tuple(meta.input_shape), generator=g, dtype=dtype)
    y = torch.randint(0, meta.num_classes, (B,), generator=g)
    return x, y


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_forward_loss_gradients_energy(arch, layout):
    meta = LAYOUTS[layout]
    torch.manual_seed(0)
    model = models.build(arch, meta)
    assert model.num_models == 1 and model.arch == arch
    x, y = batch(meta)
    logits = model(x)
    assert logits.shape == (len(y), meta.num_classes)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    E = minaction.total_energy(model)
    assert E.dim() == 0 and float(E.detach()) > 0 and E.requires_grad
    # non-zero gradient on every parameter from the regularised objective
    (loss + 1e-3 * E).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{arch}/{layout}: no gradient on {name}"
    # the energy alone is differentiable and moves the hidden layers
    model.zero_grad()
    model(x)
    minaction.total_energy(model).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("layout", list(REAL))
def test_parameter_counts_within_2x(layout):
    meta = REAL[layout]
    counts = {a: models.count_parameters(models.build(a, meta)) for a in models.ARCHITECTURES}
    assert max(counts.values()) <= 2 * min(counts.values()), counts
    # the matching itself (stem excluded) is much tighter than 2x
    inner = {a: models.count_parameters(models.build(a, meta), exclude_stem=True) for a in models.ARCHITECTURES}
    assert max(inner.values()) <= 1.25 * min(inner.values()), inner


def test_default_widths_and_meta_count():
    meta = LAYOUTS["mnist"]
    assert models.default_width("mlp", meta) == 256
    for arch in models.ARCHITECTURES:
        w = models.default_width(arch, meta)
        assert w % 8 == 0 and 8 <= w <= 8192
        m = models.build(arch, meta, width=w)
        assert m.width == w
    # knobs move the matched width (a wider potential branch -> a narrower state)
    assert models.default_width("physics_lagrangian", meta, potential_ratio=2.0) < \
        models.default_width("physics_lagrangian", meta)


ALL_FAMILY = ["mlp", "bimodal_true", "physics_lagrangian", "cnn"]


@pytest.mark.parametrize("layout", ["mnist", "sst2", "ecg5000"])
@pytest.mark.parametrize("arch,batched", [(a, None) for a in ALL_FAMILY] + [("cnn", True)])
def test_batched_matches_separate_float64(arch, batched, layout):
    """G members built at once == G models built one by one with the same seeds (float64):
    outputs, energies, gradients, and parameters after 5 Adam steps of sum_g CE + lam_g E_g."""
    meta = LAYOUTS[layout]
    seeds, lams = [7, 3, 11], [0.0, 1e-3, 1e-2]
    G = len(seeds)
    width = 24 if arch != "cnn" else 16
    kw = dict(width=width, depth=2, dtype=torch.float64)
    if arch == "cnn":
        kw["channels"] = [4, 6]
    group = models.build(arch, meta, num_models=G, seeds=seeds, batched=batched, **kw)
    assert group.num_models == G
    assert group.batched == (arch != "cnn" or bool(batched))  # the cnn runs as a loop on a CPU by default
    singles = [models.build(arch, meta, seeds=[s], **kw) for s in seeds]
    x, y = batch(meta, B=5, dtype=torch.float64)
    lam = torch.tensor(lams, dtype=torch.float64)
    opt_g = torch.optim.Adam(group.parameters(), lr=1e-2)
    opt_s = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in singles]

    def group_step():
        out = group(x)
        assert out.shape == (G, len(y), meta.num_classes)
        e = minaction.total_energy(group)
        assert e.shape == (G,)
        ce = torch.stack([F.cross_entropy(out[g], y) for g in range(G)])
        opt_g.zero_grad()
        (ce + lam * e).sum().backward()
        return out.detach(), e.detach()

    def single_step(g):
        m = singles[g]
        out = m(x)
        e = minaction.total_energy(m)
        opt_s[g].zero_grad()
        (F.cross_entropy(out, y) + lams[g] * e).backward()
        return out.detach(), e.detach()

    def member_params(g):
        if isinstance(group, LoopEnsemble):
            return [p for p in group.members[g].parameters()]
        return [p[g] for p in group.parameters()]

    def member_grads(g):
        if isinstance(group, LoopEnsemble):
            return [p.grad for p in group.members[g].parameters()]
        return [p.grad[g] for p in group.parameters()]

    for step in range(6):
        og, eg = group_step()
        for g in range(G):
            os_, es = single_step(g)
            torch.testing.assert_close(og[g], os_, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(eg[g], es, rtol=1e-9, atol=1e-11)
            for a, b in zip(member_grads(g), [p.grad for p in singles[g].parameters()]):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
            for a, b in zip(member_params(g), singles[g].parameters()):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-11)
        if step < 5:  # 5 Adam steps, parameters compared after each
            opt_g.step()
            for o in opt_s:
                o.step()


def test_seeds_default_and_distinct_members():
    meta = LAYOUTS["mnist"]
    a = models.build("mlp", meta, width=16, num_models=2)
    b = models.build("mlp", meta, width=16, seeds=[1])
    torch.testing.assert_close(a.layers[0].weight[1], b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight[0], a.layers[0].weight[1])


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_activation_stats(arch):
    meta = LAYOUTS["mnist"]
    x, _ = batch(meta, B=8)
    m = models.build(arch, meta, num_models=2, width=32)
    st = models.activation_stats(m, x)
    assert set(st) == {"energy", "active_frac", "energy_rescaled"}
    for v in st.values():
        assert v.shape == (2,) and torch.isfinite(v).all() and not v.requires_grad
    m(x)
    torch.testing.assert_close(st["energy"], minaction.total_energy(m).detach())
    assert ((st["active_frac"] > 0) & (st["active_frac"] <= 1)).all()
    assert (st["energy_rescaled"] > 0).all()
    one = models.build(arch, meta, width=32)
    st1 = models.activation_stats(one, x)
    assert all(v.dim() == 0 for v in st1.values())
    assert m.training  # mode restored


def test_stats_relu_units_only_active_frac_matches_mlp():
    meta = LAYOUTS["ecg5000"]
    x, _ = batch(meta, B=16)
    m = models.build("mlp", meta, width=20)
    st = models.activation_stats(m, x)
    with torch.no_grad():
        h1 = m.layers[0](x.reshape(16, -1))
        h2 = m.layers[1](h1)
    frac = ((h1 != 0).sum() + (h2 != 0).sum()).double() / (h1.numel() + h2.numel())
    assert float(st["active_frac"]) == pytest.approx(float(frac))
    # energy_rescaled by hand
    n1 = m.layers[1].weight.detach().norm(dim=0)
    n2 = m.out.weight.detach().norm(dim=0)
    er = ((h1 * n1) ** 2).sum(1).mean() + ((h2 * n2) ** 2).sum(1).mean()
    assert float(st["energy_rescaled"]) == pytest.approx(float(er), rel=1e-5)


@pytest.mark.parametrize("arch,first,second", [
    ("mlp", "layers.0", "layers.1"),
    ("bimodal_true", "neurons.0", ("neurons.1", "glia.1")),
    ("cnn", "convs.0", "convs.1"),
])
def test_energy_rescaled_invariant_to_relu_rescaling(arch, first, second):
    """Scaling a ReLU layer's weights and bias by a and the weights reading it by 1/a leaves
    the function and energy_rescaled unchanged while the raw energy changes."""
    meta = LAYOUTS["mnist"]
    x, _ = batch(meta, B=8)
    m = models.build(arch, meta, width=32, dtype=torch.float64)
    x = x.double()
    before = models.activation_stats(m, x)
    out0 = m(x).detach()
    a = 3.0
    mods = dict(m.named_modules())
    seconds = second if isinstance(second, tuple) else (second,)
    with torch.no_grad():
        mods[first].weight.mul_(a)
        mods[first].bias.mul_(a)
        for s in seconds:
            mods[s].weight.div_(a)
    after = models.activation_stats(m, x)
    torch.testing.assert_close(m(x).detach(), out0)
    torch.testing.assert_close(after["energy_rescaled"], before["energy_rescaled"])
    assert float(after["energy"]) > 1.5 * float(before["energy"])


def test_bimodal_knobs():
    meta = LAYOUTS["ecg5000"]
    x, _ = batch(meta)
    m = models.build("bimodal_true", meta, width=20, glia_domain=4, coupling=0.0)
    assert m.glia_width == 5
    mlp = models.build("mlp", meta, width=20)
    # coupling 0: the neuronal pathway alone decides the output
    with torch.no_grad():
        for i in range(2):
            m.neurons[i].weight.copy_(mlp.layers[i].weight)
            m.neurons[i].bias.copy_(mlp.layers[i].bias)
        m.out.weight.copy_(mlp.out.weight)
        m.out.bias.copy_(mlp.out.bias)
    torch.testing.assert_close(m(x), mlp(x))
    with pytest.raises(ValueError, match="coupling"):
        models.build("bimodal_true", meta, coupling=2.0)
    with pytest.raises(ValueError, match="glia_domain"):
        models.build("bimodal_true", meta, glia_domain=0)


def test_physics_lagrangian_knobs_and_energy_identity():
    meta = LAYOUTS["ecg5000"]
    x, _ = batch(meta)
    m = models.build("physics_lagrangian", meta, width=16, potential_ratio=0.5, constraint=False, step=0.5)
    assert len(m.constraints) == 0 and m.potential_width == 8
    m(x)
    # the V pathway's energy is twice the potential V(q) = 1/2 |relu(W_V q + b_V)|^2 (batch mean)
    with torch.no_grad():
        q = m.encoder(x.reshape(len(x), -1))
        r = torch.relu(q @ m.potential[0].weight.T + m.potential[0].bias)
        torch.testing.assert_close(m.potential[0].last_energy, (r ** 2).sum(1).mean())
        # update q <- q + tau (v + tau F), F = -W_V^T r
        v = torch.tanh(q @ m.kinetic[0].weight.T + m.kinetic[0].bias)
        q1 = q + 0.5 * (v - 0.5 * r @ m.potential[0].weight)
        r1 = torch.relu(q1 @ m.potential[1].weight.T + m.potential[1].bias)
        torch.testing.assert_close(m.potential[1].last_energy, (r1 ** 2).sum(1).mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="step"):
        models.build("physics_lagrangian", meta, step=0)


def test_cnn_loop_ensemble_energy_vector():
    """LoopEnsemble (``build``'s cnn on a CPU) spreads each member's energy into a length-G vector."""
    meta = LAYOUTS["ecg5000"]
    x, _ = batch(meta)
    singles = [models.build("cnn", meta, width=16, seeds=[g]) for g in range(3)]
    m = LoopEnsemble([models.build("cnn", meta, width=16, seeds=[g]) for g in range(3)])
    assert not m.batched and models.build("cnn", meta, num_models=3, width=16, batched=True).batched
    # the default on a CPU is the loop; for another device, batched; either can be asked for
    assert not models.build("cnn", meta, num_models=3, width=16).batched
    assert models.build("cnn", meta, num_models=3, width=16, device="meta").batched
    assert isinstance(models.build("cnn", meta, num_models=3, width=16, batched=False), LoopEnsemble)
    out = m(x)
    assert out.shape == (3, len(x), 5)
    e = minaction.total_energy(m)
    assert e.shape == (3,)
    for g in range(3):
        singles[g](x)
        torch.testing.assert_close(e[g], minaction.total_energy(singles[g]), rtol=1e-5, atol=1e-6)


def test_energy_options_and_no_energy():
    meta = LAYOUTS["mnist"]
    x, _ = batch(meta)
    m = models.build("mlp", meta, width=16, energy="l1", energy_reduction="mean", activation="gelu")
    m(x)
    assert float(minaction.total_energy(m).detach()) > 0
    m0 = models.build("bimodal_true", meta, width=16, energy=None)
    st = models.activation_stats(m0, x)
    assert float(st["energy"]) == 0 and float(st["energy_rescaled"]) > 0
    assert models.build("mlp", meta, width=16, dtype=torch.float64)(x.double()).dtype == torch.float64


def test_bad_arguments():
    meta = LAYOUTS["mnist"]
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("resnet", meta)
    with pytest.raises(TypeError, match="no option"):
        models.build("mlp", meta, glia_domain=3)
    with pytest.raises(ValueError, match="seeds"):
        models.build("mlp", meta, num_models=2, seeds=[1])
    with pytest.raises(ValueError, match="num_models"):
        models.build("mlp", meta, num_models=0)
    with pytest.raises(ValueError, match="depth"):
        models.build("mlp", meta, depth=0)
    with pytest.raises(TypeError, match="DataMeta"):
        models.build("mlp", object())
    with pytest.raises(ValueError, match="vocab_size"):
        models.build("mlp", DataMeta("t", "text", 2, (8,), torch.int64))
    # int() truncated or read these silently (num_models=2.5 built 2 members, seeds=[0.5, 1.9] became [0, 1])
    for arch, kw, says in (("mlp", {"num_models": 2.5}, "num_models must be an integer"),
                           ("mlp", {"num_models": "2"}, "num_models must be an integer"),
                           ("mlp", {"width": 64.5}, "width must be an integer"),
                           ("mlp", {"width": True}, "width must be an integer"),
                           ("mlp", {"depth": 2.7}, "depth must be an integer"),
                           ("mlp", {"num_models": 2, "seeds": [0.5, 1.9]}, "seeds must be an integer"),
                           ("physics_lagrangian", {"step": "0.5"}, "step must be a number"),
                           ("bimodal_true", {"glia_domain": 2.5}, "glia_domain must be an integer"),
                           ("cnn", {"kernel_size": "3"}, "kernel_size must be an integer"),
                           ("cnn", {"channels": [8.5, 16]}, "channels must be an integer")):
        with pytest.raises(TypeError, match=says):
            models.build(arch, meta, **kw)
    with pytest.raises(ValueError, match="torch.manual_seed's range"):
        models.build("mlp", meta, num_models=2, seeds=[0, 2 ** 70])
    import numpy as np
    assert models.build("mlp", meta, num_models=np.int64(2), width=np.int64(8), seeds=np.array([3, 4])).num_models == 2
    m = models.build("mlp", meta, width=8)
    for err in (ValueError, RuntimeError):  # as the layers: a RuntimeError too, as nn.Linear raises
        with pytest.raises(err, match="expected input"):
            m(torch.randn(2, 784))
    for arch in models.ARCHITECTURES:  # a uint8 image would be 255x the scale the model was built for
        with pytest.raises(InputTypeError, match="floating point"):
            models.build(arch, meta, width=8)(torch.randint(0, 255, (2,) + tuple(meta.input_shape), dtype=torch.uint8))
    t = models.build("cnn", LAYOUTS["sst2"], width=8)
    with pytest.raises(ValueError, match="token ids"):
        t(torch.full((2, 64), 10 ** 6))
    with pytest.raises(TypeError, match="integer"):
        t(torch.rand(2, 64))
    with pytest.raises(ValueError, match="channels"):
        models.build("cnn", meta, channels=[4])


def test_text_embedding_init_and_padding():
    meta = LAYOUTS["sst2"]
    m = models.build("mlp", meta, width=8, embed_init_std=0.05, num_models=2)
    w = m.stem.embedding.weight.detach()
    assert w.shape == (2, meta.vocab_size, 64)
    assert torch.all(w[:, 0] == 0)
    assert 0.04 < float(w[:, 1:].std()) < 0.06
    # padding does not change the bag; unknown tokens do
    x = torch.tensor([[5, 6, 0, 0], [5, 6, 1, 0]])
    meta4 = DataMeta("t", "text", 2, (4,), torch.int64, vocab_size=300)
    m4 = models.build("bimodal_true", meta4, width=8)
    bag = m4.stem.embedding.bag(x)
    torch.testing.assert_close(bag[0], m4.stem.embedding.weight[[5, 6]].mean(0))
    torch.testing.assert_close(bag[1], m4.stem.embedding.weight[[5, 6, 1]].mean(0))
    with pytest.raises(ValueError, match="embed_init_std"):
        models.build("mlp", meta, embed_init_std=0.0)


def test_knobs_listing():
    assert set(models.knobs("bimodal_true")) >= {"glia_domain", "coupling"}
    assert set(models.knobs("physics_lagrangian")) >= {"step", "potential_ratio", "constraint"}
    assert models.ARCHITECTURES == ("mlp", "cnn", "bimodal_true", "physics_lagrangian")
    assert math.isclose(models.count_parameters(models.build("mlp", LAYOUTS["ecg5000"], width=10)),
                        140 * 10 + 10 + 10 * 10 + 10 + 10 * 5 + 5)


# ----------------------------------------------------------------------------- register_architecture
@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(models, "_REGISTERED", {})


def _tiny(arch, meta, width=None, depth=None, energy="l2", activation="relu", energy_reduction="sum",
          num_models=1, seeds=None, **options):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), minaction.nn.EnergyLinear(28 * 28, meta.num_classes,
                                                                             activation="identity", energy=None))


def test_register_architecture_builds_and_names(clean_registry):
    models.register_architecture("my_net", _tiny)
    assert models.architecture_names() == models.ARCHITECTURES + ("my_net",)
    assert models.ARCHITECTURES == ("mlp", "cnn", "bimodal_true", "physics_lagrangian")  # the built-ins stay
    m = models.build("my_net", LAYOUTS["mnist"], dtype=torch.float64)
    assert m(torch.rand(3, 1, 28, 28, dtype=torch.float64)).shape == (3, 10)
    a = models.architecture("my_net")
    assert a.build is _tiny and a.activation_stats is models.activation_stats and a.module == __name__
    assert models.architecture("mlp").build is models.build and models.architecture("mlp").module is None


def test_register_architecture_bad_input(clean_registry):
    with pytest.raises(ValueError, match="non-empty string"):
        models.register_architecture("", _tiny)
    with pytest.raises(ValueError, match="built-in"):
        models.register_architecture("mlp", _tiny)
    with pytest.raises(TypeError, match="build must be callable"):
        models.register_architecture("x", "not a function")
    with pytest.raises(TypeError, match="activation_stats must be callable or None"):
        models.register_architecture("x", _tiny, activation_stats=3)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        models.architecture("nope")
    models.register_architecture("x", _tiny)
    with pytest.raises(ValueError, match="registered"):
        models.knobs("x")  # no knobs or matched widths for a registered architecture


@pytest.mark.parametrize("arch", ["mlp", "bimodal_true", "physics_lagrangian"])
def test_member_dim_keeps_one_member_batched_and_equal(arch):
    """member_dim=True: one member keeps [1, ...] weights and runs the batched kernels (the study trains a lone
    run this way, so it computes as inside a group); its values equal the ordinary one-member model's."""
    meta = LAYOUTS["ecg5000"]
    m1 = models.build(arch, meta, width=8, seeds=[4], member_dim=True)
    m0 = models.build(arch, meta, width=8, seeds=[4])
    assert m1.member_dim and not m0.member_dim
    assert all(p.shape[0] == 1 and p.dim() == q.dim() + 1 for p, q in zip(m1.parameters(), m0.parameters()))
    x = torch.rand((3,) + tuple(meta.input_shape))
    y1, y0 = m1(x.unsqueeze(0)), m0(x)
    assert y1.shape == (1,) + tuple(y0.shape)
    torch.testing.assert_close(y1[0], y0)
    torch.testing.assert_close(minaction.total_energy(m1)[0], minaction.total_energy(m0))
    st = models.activation_stats(m1, x.unsqueeze(0))
    st0 = models.activation_stats(m0, x)
    torch.testing.assert_close(st["energy_rescaled"], st0["energy_rescaled"])
