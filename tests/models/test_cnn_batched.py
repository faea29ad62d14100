"""The batched cnn (G members as one module: grouped convolutions on member-major channels)
against G members built one by one, in float64, for every modality stem the cnn has.
Random tensors only (no data needed)."""
import pytest
import torch
import torch.nn.functional as F

import minaction
from minaction import models
from minaction.data import DataMeta
from minaction.models.common import TokenEmbedding
from minaction.nn.conv import EnergyConv1d, EnergyConv2d

# every stem of the cnn: 2-D (vision; neuromorphic events and spikes, averaged over T) and
# 1-D (physiological (C, L) and bare (L,) series; text as embedding channels)
STEMS = {
    "vision": DataMeta("img", "vision", 4, (1, 12, 10), torch.float32),
    "vision_rgb": DataMeta("rgb", "vision", 3, (3, 8, 8), torch.float32),
    "events": DataMeta("ev", "neuromorphic", 4, (3, 2, 9, 9), torch.float32),
    "spikes": DataMeta("sp_spikes", "neuromorphic", 3, (4, 1, 10, 10), torch.float32, spike_encoded=True),
    "series": DataMeta("ecg", "physiological", 5, (1, 40), torch.float32),
    "bare_series": DataMeta("bare", "physiological", 2, (33,), torch.float32),
    "text": DataMeta("txt", "text", 3, (20,), torch.int64, vocab_size=50),
}


def batch(meta, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) + tuple(meta.input_shape)
    if meta.modality == "text":
        x = torch.randint(2, meta.vocab_size, shape, generator=g)
        x[:, -4:] = 0
        x[1, 2] = 1
    elif meta.modality == "neuromorphic":
        x = (torch.rand(shape, generator=g, dtype=torch.float64) < 0.3).double()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, meta.num_classes, (B,), generator=g)


def _build(meta, seeds, **kw):
    kw = dict(dict(width=8, depth=2, channels=[3, 4], dtype=torch.float64), **kw)
    group = models.build("cnn", meta, num_models=len(seeds), seeds=seeds, batched=True, **kw)
    singles = [models.build("cnn", meta, seeds=[s], **kw) for s in seeds]
    return group, singles


def _member_params(group, g):
    return [p[g] for p in group.parameters()]


@pytest.mark.parametrize("stem", list(STEMS))
@pytest.mark.parametrize("opts", [dict(), dict(activation="gelu", energy="l1", energy_reduction="mean", depth=3,
                                              channels=[2, 3, 2])])
def test_batched_equals_separate_through_adam_steps(stem, opts):
    """Outputs, per-layer energies [G], gradients and parameters after each of 4 Adam steps of
    sum_g (CE_g + lam_g E_g): the batched module equals G separately built members."""
    meta = STEMS[stem]
    seeds, lams = [5, 0, 9], [1e-2, 0.0, 1e-1]
    G = len(seeds)
    group, singles = _build(meta, seeds, **opts)
    assert group.batched and group.num_models == G
    assert all(c.weight.shape[0] == G for c in group.convs)  # one module, not a loop
    for g in range(G):  # initialisation: member g == a one-member model with seeds[g]
        for a, b in zip(_member_params(group, g), singles[g].parameters()):
            assert torch.equal(a, b)
    x, y = batch(meta)
    lam = torch.tensor(lams, dtype=torch.float64)
    opt_g = torch.optim.Adam(group.parameters(), lr=1e-2)
    opt_s = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in singles]
    for step in range(5):
        out = group(x)
        assert out.shape == (G, len(y), meta.num_classes)
        layer_e = [lay.last_energy for lay in group.convs] + [group.dense.last_energy]
        assert all(e.shape == (G,) for e in layer_e)
        e = minaction.total_energy(group)
        assert e.shape == (G,)
        ce = torch.stack([F.cross_entropy(out[g], y) for g in range(G)])
        opt_g.zero_grad()
        (ce + lam * e).sum().backward()
        for g, m in enumerate(singles):
            o = m(x)
            es = minaction.total_energy(m)
            torch.testing.assert_close(out[g].detach(), o.detach(), rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(e[g].detach(), es.detach(), rtol=1e-9, atol=1e-11)
            for lg, ls in zip(layer_e, [lay.last_energy for lay in m.convs] + [m.dense.last_energy]):
                assert ls.dim() == 0
                torch.testing.assert_close(lg[g].detach(), ls.detach(), rtol=1e-9, atol=1e-11)
            opt_s[g].zero_grad()
            (F.cross_entropy(o, y) + lams[g] * es).backward()
            for pg, ps in zip(group.parameters(), m.parameters()):
                torch.testing.assert_close(pg.grad[g], ps.grad, rtol=1e-8, atol=1e-11)
                torch.testing.assert_close(pg[g].detach(), ps.detach(), rtol=1e-9, atol=1e-11)
        if step < 4:
            opt_g.step()
            for o in opt_s:
                o.step()


@pytest.mark.parametrize("stem", ["vision", "series", "text"])
def test_nonfinite_member_does_not_touch_the_others(stem):
    """The trainer freezes a diverged member by masking its loss term and zeroing its
    non-finite gradients; that only works if no member's outputs, energies or gradients depend
    on another's parameters. Member 1 is poisoned with NaN; members 0 and 2 stay exact."""
    meta = STEMS[stem]
    seeds = [1, 2, 3]
    group, singles = _build(meta, seeds)
    with torch.no_grad():
        group.convs[0].weight[1].fill_(float("nan"))
        group.dense.bias[1].fill_(float("inf"))
    x, y = batch(meta)
    out = group(x)
    e = minaction.total_energy(group)
    ce = torch.stack([F.cross_entropy(out[g], y) for g in range(3)])
    obj = ce + 1e-2 * e
    alive = torch.isfinite(obj.detach())
    assert alive.tolist() == [True, False, True]
    torch.where(alive, obj, torch.zeros_like(obj)).sum().backward()
    for g in (0, 2):
        m = singles[g]
        o = m(x)
        es = minaction.total_energy(m)
        (F.cross_entropy(o, y) + 1e-2 * es).backward()
        torch.testing.assert_close(out[g].detach(), o.detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(e[g].detach(), es.detach(), rtol=1e-9, atol=1e-11)
        for pg, ps in zip(group.parameters(), m.parameters()):
            assert torch.isfinite(pg.grad[g]).all()
            torch.testing.assert_close(pg.grad[g], ps.grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("stem", ["vision", "events", "series", "text"])
def test_activation_stats_per_member(stem):
    """energy, active_frac and energy_rescaled of the batched cnn are the members' own."""
    meta = STEMS[stem]
    group, singles = _build(meta, [4, 8])
    x, _ = batch(meta, B=6)
    st = models.activation_stats(group, x)
    for g, m in enumerate(singles):
        s1 = models.activation_stats(m, x)
        for k in ("energy", "active_frac", "energy_rescaled"):
            assert st[k].shape == (2,)
            torch.testing.assert_close(st[k][g], s1[k], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cls,kw,shape", [
    (EnergyConv1d, dict(in_channels=3, out_channels=4, kernel_size=5, padding=2), (4, 3, 13)),
    (EnergyConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2), (3, 4, 11)),
    (EnergyConv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (3, 2, 7, 6)),
    (EnergyConv2d, dict(in_channels=4, out_channels=2, kernel_size=(3, 1), groups=2, bias=False), (2, 4, 6, 5)),
])
@pytest.mark.parametrize("shared", [True, False])
def test_layer_num_models_equals_separate_layers(backend, cls, kw, shape, shared):
    """EnergyConv(num_models=G) on a shared input [B, in, ...] or a member-major one
    [B, G*in, ...] == G one-model layers (outputs, energies [G], gradients of both)."""
    G = 3
    layer = cls(**kw, num_models=G, backend=backend, activation="tanh", energy="l2").double()
    singles = []
    for g in range(G):
        s = cls(**kw, backend=backend, activation="tanh", energy="l2").double()
        with torch.no_grad():
            s.weight.copy_(layer.weight[g])
            if s.bias is not None:
                s.bias.copy_(layer.bias[g])
        singles.append(s)
    torch.manual_seed(0)
    B, cin = shape[0], shape[1]
    xs = [torch.randn(shape, dtype=torch.float64) for _ in range(G)]
    if shared:
        xs = [xs[0]] * G
    x = (xs[0] if shared else torch.cat(xs, 1)).clone().requires_grad_(True)
    y = layer(x)
    assert y.shape[1] == G * kw["out_channels"] and layer.last_energy.shape == (G,)
    gy = torch.randn_like(y)
    ge = torch.randn(G, dtype=torch.float64)
    ((y * gy).sum() + (layer.last_energy * ge).sum()).backward()
    yv, gyv = layer.member_view(y), layer.member_view(gy)
    gx = x.grad if shared else x.grad.view(B, G, cin, *shape[2:])
    gx_sum = torch.zeros_like(xs[0])
    for g, s in enumerate(singles):
        xg = xs[g].clone().requires_grad_(True)
        yg = s(xg)
        torch.testing.assert_close(yv[g], yg, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.last_energy[g], s.last_energy, rtol=1e-10, atol=1e-12)
        ((yg * gyv[g]).sum() + s.last_energy * ge[g]).backward()
        torch.testing.assert_close(layer.weight.grad[g], s.weight.grad, rtol=1e-9, atol=1e-11)
        if s.bias is not None:
            torch.testing.assert_close(layer.bias.grad[g], s.bias.grad, rtol=1e-9, atol=1e-11)
        if shared:
            gx_sum += xg.grad
        else:
            torch.testing.assert_close(gx[:, g], xg.grad, rtol=1e-9, atol=1e-11)
    if shared:
        torch.testing.assert_close(gx, gx_sum, rtol=1e-9, atol=1e-11)


def test_layer_num_models_init_and_errors():
    a = EnergyConv2d(2, 3, 3, num_models=2)
    gen = torch.Generator().manual_seed(3)
    a.reset_parameters(generator=gen, model=1)
    b = EnergyConv2d(2, 3, 3)
    b.reset_parameters(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight[1], b.weight) and torch.equal(a.bias[1], b.bias)
    assert "num_models=2" in repr(a)
    with pytest.raises(ValueError, match=r"expects 2 input channels \(shared by all models\) or 2x2=4"):
        a(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="outside"):
        a.reset_parameters(model=2)
    with pytest.raises(ValueError, match="must be None"):
        b.reset_parameters(model=0)
    with pytest.raises(ValueError, match="num_models must be a positive int"):
        EnergyConv1d(1, 1, 1, num_models=0)


def test_text_channels_member_major():
    emb = TokenEmbedding(30, 4, num_models=3)
    ids = torch.randint(0, 30, (5, 7))
    ids[:, -2:] = 0
    out = emb.channels(ids)
    assert out.shape == (5, 12, 7)
    for g in range(3):
        one = TokenEmbedding(30, 4)
        with torch.no_grad():
            one.weight.copy_(emb.weight[g])
        torch.testing.assert_close(out[:, 4 * g:4 * (g + 1)], one.channels(ids))
    assert (out[:, :, -2:] == 0).all()


class _InOrder:
    """The evaluation's dataset interface over tensors: unshuffled batches of (x, y)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def batches(self, batch_size, shuffle=False):
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


def test_evaluation_in_chunks_equals_whole_batches():
    """The cnn asks the trainer to evaluate in pieces of ``eval_rows`` rows (memory-bound
    feature maps); per-sample results do not depend on the piece size."""
    from minaction.study.trainer import evaluate

    meta = STEMS["vision"]
    G, n = 3, 23
    torch.manual_seed(0)
    x = torch.randn(n, *meta.input_shape, dtype=torch.float64)
    y = torch.randint(0, meta.num_classes, (n,))

    model = models.build("cnn", meta, num_models=G, seeds=[0, 1, 2], dtype=torch.float64, batched=True)
    assert model.eval_rows > 0
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    with torch.no_grad():
        model.eval_rows = 4
        pieces = evaluate(model, _InOrder(x, y), G, batch_size=10)
        cut = list(seen)
        seen.clear()
        model.eval_rows = 0
        whole = evaluate(model, _InOrder(x, y), G, batch_size=10)
    h.remove()
    assert max(cut) == 4 and sum(cut) == n and seen == [10, 10, 3]
    torch.testing.assert_close(pieces["acc"], whole["acc"], rtol=0, atol=0)
    # called with gradients on (as the training loop does), evaluation builds no graph
    out = evaluate(model, _InOrder(x, y), G, batch_size=10)
    assert not any(v.requires_grad for v in out.values())
    assert all(m.last_energy.grad_fn is None for m in model.modules()
               if getattr(m, "counts_energy", False) and m.last_energy is not None)
    for k in ("loss", "energy"):  # evaluate's cross-entropy runs in float32: summation order only
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-6, atol=1e-9)


def test_evaluation_with_stats_runs_the_model_once_per_piece():
    """The test evaluation takes its logits from activation_stats' own forward (output=True): one
    forward per piece, and the same accuracy, loss and statistics as a separate forward and stats call."""
    from minaction.study.trainer import evaluate

    meta = STEMS["vision"]
    G, n = 3, 11
    torch.manual_seed(1)
    x = torch.randn(n, *meta.input_shape, dtype=torch.float64)
    y = torch.randint(0, meta.num_classes, (n,))

    def separate(model, xb):  # the same statistics without gives_output: the trainer runs model(x) too
        return models.activation_stats(model, xb)

    model = models.build("cnn", meta, num_models=G, seeds=[0, 1, 2], dtype=torch.float64)
    model.eval_rows = 0
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    one = evaluate(model, _InOrder(x, y), G, batch_size=4, stats_fn=models.activation_stats)
    assert seen == [4, 4, 3]
    seen.clear()
    two = evaluate(model, _InOrder(x, y), G, batch_size=4, stats_fn=separate)
    assert seen == [4, 4, 4, 4, 3, 3]
    h.remove()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-12, atol=1e-12)
    assert models.activation_stats(model, x[:2], output=True)["output"].shape == (G, 2, meta.num_classes)


# --- a loop of members (the CPU's cnn layout) as a user's own module -----------------------------

def _loop(meta, seeds, **kw):
    kw = dict(dict(width=8, depth=2, channels=[3, 4]), **kw)
    return models.build("cnn", meta, num_models=len(seeds), seeds=seeds, batched=False, **kw)


@pytest.mark.parametrize("stem", ["vision", "series", "text"])
def test_loop_member_taken_out_is_a_lone_model_and_pickles(stem, tmp_path):
    """A member of a loop ensemble called on its own is a one-member model (its energy was [0, E, 0]
    from the ensemble's hooks, so `ce + lam * E` became a vector), and the ensemble pickles (the hooks
    were closures: torch.save of a CPU cnn group failed)."""
    import copy
    import pickle

    from minaction.models.stats import activation_stats

    meta = STEMS[stem]
    x, _ = batch(meta, B=4)
    x = x if meta.modality == "text" else x.float()
    grp = _loop(meta, [3, 4, 5])
    lone = models.build("cnn", meta, seeds=[4], width=8, depth=2, channels=[3, 4])
    out = grp(x)
    e_grp = minaction.total_energy(grp)
    assert out.shape[:2] == (3, 4) and e_grp.shape == (3,)
    m1 = grp.members[1]
    for m in (m1, copy.deepcopy(m1)):
        assert torch.equal(m(x), lone(x))
        e = minaction.total_energy(m)
        assert e.dim() == 0 and torch.equal(e, minaction.total_energy(lone)) and torch.equal(e, e_grp[1])
        assert activation_stats(m, x)["energy"].dim() == 0
    path = tmp_path / "grp.pt"
    torch.save(grp, path)
    back = torch.load(path, weights_only=False)
    assert torch.equal(back(x), grp(x)) and torch.equal(minaction.total_energy(back), minaction.total_energy(grp))
    assert torch.equal(pickle.loads(pickle.dumps(grp))(x), out)


@pytest.mark.parametrize("stem", ["vision", "events", "series", "bare_series", "text"])
@pytest.mark.parametrize("kind", ["lone", "member_dim", "batched", "loop"])
def test_empty_batch(stem, kind):
    """An empty batch gives empty logits and E = 0, as nn.Linear / nn.Conv2d do (the flatten's
    reshape(B, -1) raised torch's 'cannot reshape tensor of 0 elements')."""
    meta = STEMS[stem]
    kw = dict(width=8, depth=2)
    for arch in ("cnn", "mlp", "physics_lagrangian", "bimodal_true"):
        if kind == "lone":
            m = models.build(arch, meta, **kw)
        elif kind == "member_dim":
            m = models.build(arch, meta, member_dim=True, **kw)
        elif kind == "loop":
            if arch != "cnn":
                continue
            m = models.build(arch, meta, num_models=2, batched=False, **kw)
        else:
            m = models.build(arch, meta, num_models=2, **kw)
        x = batch(meta, B=2)[0][:0]
        x = x if meta.modality == "text" else x.float()
        out = m(x)
        G = getattr(m, "num_models", 1) if kind != "lone" else None
        assert out.shape == ((G,) if G else ()) + (0, meta.num_classes), (arch, out.shape)
        e = minaction.total_energy(m)
        assert torch.all(e == 0), (arch, e)
        st = models.activation_stats(m, x)  # it indexed row 0 (IndexError)
        assert all(torch.all(v == 0) for v in st.values()), (arch, st)


def test_member_dim_one_member_loop_layout():
    """member_dim=True with one member of a loop layout (cnn on a CPU) keeps the documented shapes
    ([1, B, C] logits, [1] energy; it was silently ignored) and computes as the lone member."""
    meta = STEMS["vision"]
    x, _ = batch(meta, B=3)
    x = x.float()
    m = models.build("cnn", meta, member_dim=True, seeds=[7], width=8, depth=2)
    lone = models.build("cnn", meta, seeds=[7], width=8, depth=2)
    assert m.member_dim and not m.batched and m.num_models == 1
    out, e = m(x), None
    e = minaction.total_energy(m)
    assert out.shape == (1, 3, 4) and e.shape == (1,)
    assert torch.equal(out[0], lone(x)) and torch.equal(e[0], minaction.total_energy(lone))
    assert torch.equal(m(x.unsqueeze(0)), out)  # the per-member form [1, B, ...] too
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        m(x.tolist())  # as every other model says (an AttributeError on .dim() before)


# --- one member in and out, and the two layouts of a group ---------------------------------------

@pytest.mark.parametrize("arch", ["cnn", "mlp", "physics_lagrangian", "bimodal_true"])
@pytest.mark.parametrize("stem", ["vision", "text"])
def test_member_state_in_and_out(arch, stem):
    """member_state_dict(g) is what a lone model of seed g holds, load_member puts one back into member
    g only, and a cnn group's state loads into the other layout (a GPU-trained batched cnn evaluated
    on a CPU, where build makes a loop: load_state_dict raised on every key)."""
    meta = STEMS[stem]
    kw = dict(width=8, depth=2)
    seeds = [3, 4, 5]
    lone = [models.build(arch, meta, seeds=[s], **kw) for s in seeds]
    layouts = [dict(batched=True)] + ([dict(batched=False)] if arch == "cnn" else [])
    x = batch(meta, B=4)[0]
    x = x if meta.modality == "text" else x.float()
    for lay in layouts:
        grp = models.build(arch, meta, num_models=3, seeds=seeds, **kw, **lay)
        for g in range(3):
            st = models.member_state_dict(grp, g)
            assert st.keys() == lone[g].state_dict().keys()
            assert all(torch.equal(st[k], v) for k, v in lone[g].state_dict().items())
        new = models.build(arch, meta, seeds=[9], **kw)
        before = [models.member_state_dict(grp, g) for g in range(3)]
        models.load_member(grp, 1, new.state_dict())
        after = [models.member_state_dict(grp, g) for g in range(3)]
        assert all(torch.equal(after[1][k], v) for k, v in new.state_dict().items())
        for g in (0, 2):
            assert all(torch.equal(after[g][k], before[g][k]) for k in before[g])
        with pytest.raises(IndexError, match="out of range"):
            models.member_state_dict(grp, 3)
        with pytest.raises(ValueError, match="does not fit|shape"):
            models.load_member(grp, 0, {k: v[..., :1] for k, v in new.state_dict().items()})
    if arch == "cnn":
        b = models.build(arch, meta, num_models=3, seeds=seeds, batched=True, **kw)
        loop = models.build(arch, meta, num_models=3, seeds=[0, 1, 2], batched=False, **kw)
        loop.load_state_dict(b.state_dict())
        assert all(torch.equal(loop.members[g].state_dict()[k], v)
                   for g in range(3) for k, v in lone[g].state_dict().items())
        b2 = models.build(arch, meta, num_models=3, seeds=[0, 1, 2], batched=True, **kw)
        b2.load_state_dict(loop.state_dict())
        assert all(torch.equal(b2.state_dict()[k], v) for k, v in b.state_dict().items())
        torch.testing.assert_close(b2(x), loop(x), rtol=1e-5, atol=1e-6)
        one = models.build(arch, meta, seeds=[0], **kw)
        one.load_state_dict(models.build(arch, meta, num_models=1, member_dim=True, seeds=[4], batched=False,
                                         **kw).state_dict())  # a loop of one: members.0.*
        assert all(torch.equal(one.state_dict()[k], v) for k, v in lone[1].state_dict().items())
        with pytest.raises(ValueError, match="members"):
            models.build(arch, meta, num_models=2, batched=False, **kw).load_state_dict(b.state_dict())


@pytest.mark.parametrize("arch", ["mlp", "bimodal_true", "physics_lagrangian", "cnn"])
def test_text_models_trace(arch):
    """torch.jit.trace with its default check: the text stem took one path with grad enabled and another
    without, and the trace checker (which reruns without grad) failed with 'Graphs differed'."""
    import warnings

    meta = STEMS["text"]
    for G in (1, 3):
        m = models.build(arch, meta, num_models=G, width=8, depth=2)
        x = batch(meta, B=4)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            t = torch.jit.trace(m, (x,))
        torch.testing.assert_close(t(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stem", ["vision", "events", "series", "text"])
def test_batched_cnn_outside_the_fused_cpu_op(stem):
    """The batched cnn pools [B*G, 1, C, *spatial]: only the fused CPU op took that shape, so the model
    failed traced, compiled, under autocast, and (suspected by a trial, from the meta device) on a GPU,
    the layout the GPU study uses. torch's pooling path now takes any leading shape, empty included."""
    import warnings

    from minaction.ops.pool import _torch_pool2, max_pool2

    meta = STEMS[stem]
    m = models.build("cnn", meta, num_models=3, batched=True, width=8, depth=2)
    x = batch(meta, B=5)[0]
    x = x if meta.modality == "text" else x.float()
    ref = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        t = torch.jit.trace(m, (x,))
    torch.testing.assert_close(t(x), ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).shape == ref.shape
    dims = 1 if meta.modality in ("physiological", "text") else 2
    z = torch.randn((15, 1, 3) + ((6, 4) if dims == 2 else (9,)), requires_grad=True)
    assert torch.equal(_torch_pool2(z, dims), max_pool2(z, dims))  # torch's path equals the fused op
    assert max_pool2(z.detach().to("meta"), dims).shape == max_pool2(z, dims).shape  # a non-CPU tensor
    empty = _torch_pool2(z[:0], dims)
    assert empty.shape == (0,) + max_pool2(z, dims).shape[1:]
    empty.sum().backward()  # still on the graph


def test_group_of_one_takes_a_lone_state_and_indices_of_any_integer_type():
    """The study's one-member models (member_dim=True: a batched model with [1, ...] tensors, or a loop of one)
    take a lone model's state, load_member takes a member_dim model's state, and a numpy or tensor member index
    works (they were refused as 'not a batched state' / 'out of range'; a trial)."""
    import numpy as np

    meta = STEMS["vision"]
    kw = dict(width=8, depth=2)
    for arch, lay in (("cnn", dict(batched=False)), ("cnn", dict(batched=True)), ("mlp", {})):
        lone = models.build(arch, meta, seeds=[5], **kw)
        one = models.build(arch, meta, seeds=[0], member_dim=True, **kw, **lay)
        one.load_state_dict(lone.state_dict())
        assert all(torch.equal(models.member_state_dict(one, 0)[k], v) for k, v in lone.state_dict().items())
        grp = models.build(arch, meta, num_models=3, **kw, **lay)
        models.load_member(grp, np.int64(2), one.state_dict())  # a member_dim state: [1, ...]
        assert all(torch.equal(models.member_state_dict(grp, torch.tensor(2))[k], v)
                   for k, v in lone.state_dict().items())
    with pytest.raises(TypeError, match="integer"):
        models.member_state_dict(grp, 1.0)


def test_loop_ensemble_tape_and_unread_warning_as_the_other_layouts():
    """record_energy on a loop ensemble gives [G] (its tape summed the members' 0-dim energies into one), and a
    loop ensemble called twice with only the second energy read warns as the batched and lone models do (it
    never warned; a trial)."""
    import warnings

    meta = STEMS["vision"]
    kw = dict(width=8, depth=2)
    xa, xb = batch(meta, B=4, seed=1)[0].float(), batch(meta, B=4, seed=2)[0].float()
    loop = models.build("cnn", meta, num_models=3, seeds=[1, 2, 3], batched=False, **kw)
    with minaction.record_energy(loop) as tape:
        loop(xa)
    torch.testing.assert_close(tape.total(), minaction.total_energy(loop))
    assert tape.total().shape == (3,)
    counts = {}
    for name, lay in (("loop", dict(batched=False)), ("batched", dict(batched=True))):
        m = models.build("cnn", meta, num_models=3, seeds=[1, 2, 3], **kw, **lay)
        m(xa)
        minaction.total_energy(m).sum().backward()  # read once: the layers' energies count
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            (m(xa).sum() + m(xb).sum() + minaction.total_energy(m).sum()).backward()
        counts[name] = sum("counted nowhere" in str(x.message) for x in w)
    assert counts["loop"] > 0 and counts["batched"] > 0
