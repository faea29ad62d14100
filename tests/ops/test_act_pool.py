"""minaction.ops.activation_energy_max_pool2 (C++ op ``minaction::epilogue_pool2``): the epilogue
and the max-pool by 2 in one pass equal ``max_pool2(activation_energy(z))`` -- values and gradients
exactly for ReLU/identity, to rounding for the smooth activations; the energy to rounding (another
summation order); NaN/inf, ties, odd sizes, both layouts (groups); gradcheck/gradgradcheck in
float64; the fallbacks; and the conv layers / cnn that use it."""
import pytest
import torch
import torch.nn.functional as F

from minaction import models, total_energy
from minaction.backends import ACTIVATIONS, select
from minaction.data.core import DataMeta
from minaction.nn import EnergyConv1d, EnergyConv2d
from minaction.ops import activation_energy, activation_energy_max_pool2, max_pool2

pytestmark = pytest.mark.skipif(not select.available("cpu", "cpu")[0], reason="the cpu backend does not build here")

CASES = [((3, 5, 28, 28), 2, 0), ((2, 3, 7, 9), 2, 0), ((4, 3, 5, 13), 2, 4), ((2, 1, 3, 2), 2, 0),
         ((4, 6, 13), 1, 0), ((3, 2, 2, 33), 1, 3), ((2, 70), 1, 0), ((6, 2, 40, 37), 2, 0)]
ENERGIES = [("l2", "sum"), ("l1", "mean"), (None, "sum")]


def _z(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = z.view(-1)
    flat[::7] = 0.0  # ties at 0 after the activation
    flat[1::11] = -flat[1::11].abs()  # windows of negatives only: all zero after ReLU
    for i, v in ((3, float("nan")), (5, -float("inf")), (13, float("inf"))):
        flat[i % flat.numel()] = v
    return z.to(dtype)


def _both(z, act, energy, red, groups, dims, penalty, gy, ge):
    out = []
    for fused in (True, False):
        zz = z.clone().requires_grad_()
        if fused:
            y, e = activation_energy_max_pool2(zz, act, energy, red, groups=groups, dims=dims, penalty=penalty)
        else:
            y1, e = activation_energy(zz, act, energy, red, groups=groups, penalty=penalty)
            y = max_pool2(y1, dims)
        loss = (y * gy).nan_to_num().sum() + ((e * ge).sum() if ge is not None else 0)
        gz, = torch.autograd.grad(loss, zz)
        out.append((y, e, gz))
    return out


@pytest.mark.parametrize("shape,dims,groups", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("energy,red", ENERGIES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_equals_the_two_ops(shape, dims, groups, dtype, energy, red, act):
    z = _z(shape, dtype, seed=len(shape) * 97 + shape[-1])
    pooled = tuple(shape[:-dims]) + tuple(s // 2 for s in shape[-dims:])
    gy = torch.randn(pooled, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ge = torch.randn((groups,) if groups else (), dtype=dtype) if energy else None
    (ya, ea, ga), (yb, eb, gb) = _both(z, act, energy, red, groups, dims, 0.3 if energy else 0.0, gy, ge)
    assert ya.shape == yb.shape and ea.shape == eb.shape and ya.dtype == yb.dtype and ea.dtype == eb.dtype
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())  # same windows
    torch.testing.assert_close(ea, eb, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0, equal_nan=True)
    assert torch.equal(ga.isnan(), gb.isnan())
    if act in ("relu", "identity"):
        assert torch.equal(ga.nan_to_num(), gb.nan_to_num())  # the same per-element formula: bit for bit
    else:  # the compiler may contract the smooth derivatives' multiply-adds differently: rounding
        torch.testing.assert_close(ga, gb, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=1e-7 if dtype ==
                                   torch.float32 else 1e-15, equal_nan=True)


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("dims,groups,shape", [(2, 0, (2, 3, 5, 7)), (1, 2, (2, 3, 2, 9))])
def test_gradcheck_gradgradcheck_float64(act, dims, groups, shape):
    # distinct values: no exact ties between window elements, and no z == 0 kink for ReLU
    z = (torch.randperm(int(torch.tensor(shape).prod()), generator=torch.Generator().manual_seed(3))
         .to(torch.float64).view(shape) - 20.5) / 7
    z.requires_grad_()
    # both outputs (the energy's gradient through e itself: a penalty applies once per forward, and
    # gradcheck's repeated backwards would see it only in the first)
    f = lambda t: activation_energy_max_pool2(t, act, "l2", groups=groups, dims=dims)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))


def test_runs_one_op_per_direction_and_opcheck():
    from torch.library import opcheck

    z = torch.randn(4, 3, 8, 8, requires_grad=True)
    with torch.profiler.profile() as prof:
        y, e = activation_energy_max_pool2(z, penalty=0.1)
        (y.sum() + e).backward()
    names = [ev.name for ev in prof.events()]
    assert names.count("minaction::act_pool2_fwd") == 1 and names.count("minaction::act_pool2_bwd") == 1
    assert "minaction::max_pool2" not in names and "minaction::epilogue" not in names
    ops = torch.ops.minaction
    opcheck(ops.epilogue_pool2.default, (torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True),
                                         1, 2, False, 0, 2, 0.0))
    opcheck(ops.epilogue_pool2.default, (torch.randn(3, 2, 4, 9, requires_grad=True), 2, 1, True, 3, 1, 0.5))
    opcheck(ops.act_pool2_fwd.default, (torch.randn(2, 4, 5, 4), 1, 2, False, 0, 2, True))
    opcheck(ops.act_pool2_bwd.default, (torch.randn(2, 4, 2, 2), torch.tensor(0.5), torch.randn(2, 4, 5, 4),
                                        1, 2, False, 0, 2))


def test_penalty_once_per_forward():
    z = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    za, zb, zc = (z.clone().requires_grad_() for _ in range(3))
    ya, _ = activation_energy_max_pool2(za, penalty=0.7)
    ya.sum().backward(retain_graph=True)
    y1, eb = activation_energy(zb)
    (max_pool2(y1, 2).sum() + 0.7 * eb).backward()
    assert torch.equal(za.grad, zb.grad)  # the penalty as lam * E in the loss
    first = za.grad.clone()
    ya.sum().backward()  # a second backward through the same graph: the penalty is not added again
    max_pool2(activation_energy(zc)[0], 2).sum().backward()
    torch.testing.assert_close(za.grad, first + zc.grad, rtol=1e-15, atol=0)


def test_fallbacks_match_and_errors_are_clear():
    z = torch.randn(2, 3, 8, 8)
    for dtype in (torch.bfloat16, torch.float16):  # other dtypes: the two ops
        zz = z.to(dtype)
        ya, ea = activation_energy_max_pool2(zz)
        y1, eb = activation_energy(zz)
        assert torch.equal(ya, max_pool2(y1, 2)) and torch.equal(ea, eb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, ea = activation_energy_max_pool2(z)
    torch.testing.assert_close(ya.float(), max_pool2(torch.relu(z), 2).float())
    out = torch.func.vmap(lambda t: activation_energy_max_pool2(t.unsqueeze(0))[0])(z)  # a transform: two ops
    torch.testing.assert_close(out.squeeze(1), max_pool2(torch.relu(z), 2))
    with pytest.raises(ValueError, match="dims"):
        activation_energy_max_pool2(z, dims=3)
    with pytest.raises(RuntimeError, match="pooled dims"):
        torch.ops.minaction.epilogue_pool2(torch.randn(4, 5), 1, 2, False, 0, 2)


@pytest.mark.parametrize("Conv,shape", [(EnergyConv2d, (5, 3, 11, 12)), (EnergyConv1d, (5, 3, 17))])
@pytest.mark.parametrize("G", [None, 3])
def test_conv_forward_max_pool2_equals_pooling_its_forward(Conv, shape, G):
    torch.manual_seed(0)
    layer = Conv(3, 4, 3, padding=1, num_models=G, penalty=0.1).double()
    x = torch.randn(shape, dtype=torch.float64)
    if G:
        x = x.repeat(1, G, *([1] * (x.dim() - 2)))  # per-member input, member-major channels
    dims = x.dim() - 2
    outs = []
    for fused in (True, False):
        layer.zero_grad()
        y = layer.forward_max_pool2(x) if fused else max_pool2(layer(x), dims)
        e = layer.last_energy
        (y.square().sum() + e.sum()).backward()
        outs.append((y.detach(), e.detach(), [p.grad.clone() for p in layer.parameters()]))
    (ya, ea, ga), (yb, eb, gb) = outs
    assert torch.equal(ya, yb)
    torch.testing.assert_close(ea, eb, rtol=1e-12, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_forward_hook_sees_the_unpooled_output():
    layer = EnergyConv2d(2, 3, 3, padding=1)
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 2, 8, 8)
    with torch.profiler.profile() as prof:
        y = layer.forward_max_pool2(x)
    h.remove()
    assert seen == [(2, 3, 8, 8)] and tuple(y.shape) == (2, 3, 4, 4)
    assert "minaction::epilogue_pool2" not in {ev.name for ev in prof.events()}
    torch.testing.assert_close(y, max_pool2(layer(x), 2))


@pytest.mark.parametrize("modality,shape", [("vision", (1, 12, 12)), ("physiological", (1, 30))])
def test_cnn_training_equals_the_two_ops(modality, shape):
    """A loop-of-members cnn (the study's CPU layout) trained a few Adam steps in float64, fused
    against the two ops (fusion refused per conv): the same weights, losses and energies (to
    rounding: the images' first block is the fused conv)."""
    meta = DataMeta("t", modality, 3, shape, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((16,) + shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    runs = []
    for fused in (True, False):
        m = models.build("cnn", meta, num_models=2, seeds=[0, 1], width=8, dtype=torch.float64, batched=False)
        if not fused:
            for member in m.members:
                for conv in member.convs:
                    conv._hooks_allow_fusion = lambda: False
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        trace = []
        for _ in range(4):
            opt.zero_grad()
            out = m(x)
            loss = sum(F.cross_entropy(out[k], y) for k in range(2)) + 1e-2 * total_energy(m).sum()
            loss.backward()
            opt.step()
            trace.append(loss.detach())
        runs.append((trace, [p.detach().clone() for p in m.parameters()]))
    (ta, pa), (tb, pb) = runs  # the first image block's fused conv sums in another order than oneDNN: rounding
    torch.testing.assert_close(torch.stack(ta), torch.stack(tb), rtol=1e-11, atol=0)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the first image block, fused
from minaction.ops import conv2d_act_energy_max_pool2  # noqa: E402


def _block(x, w, b, act, energy, red, penalty, fused):
    if fused:
        return conv2d_act_energy_max_pool2(x, w, b, act, energy, red, penalty=penalty)
    return activation_energy_max_pool2(F.conv2d(x, w, b, padding=w.shape[-1] // 2), act, energy, red,
                                       penalty=penalty)


@pytest.mark.parametrize("B,C,H,W,k", [(5, 16, 28, 28, 3), (3, 4, 6, 10, 5), (2, 3, 2, 2, 1), (4, 2, 34, 18, 3),
                                       (2, 3, 8, 8, 7), (1, 40, 4, 36, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "gelu", "identity", "sigmoid"])
@pytest.mark.parametrize("energy,red", ENERGIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_block_equals_conv2d_then_the_epilogue_and_pool(B, C, H, W, k, dtype, act, energy, red, with_bias):
    g = torch.Generator().manual_seed(B * 100 + C + k)
    x = torch.rand(B, 1, H, W, generator=g, dtype=dtype)
    w0 = torch.randn(C, 1, k, k, generator=g, dtype=dtype)
    b0 = torch.randn(C, generator=g, dtype=dtype) if with_bias else None
    pen = 0.3 if energy else 0.0
    res = []
    for fused in (True, False):
        w = w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if with_bias else None
        y, e = _block(x, w, b, act, energy, red, pen, fused)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
        grads = torch.autograd.grad((y * gy).sum() + (0.7 * e if energy else 0), [w] + ([b] if with_bias else []))
        res.append((y, e) + tuple(grads))
    # float32: weight gradients are sums of thousands of products, oneDNN and the kernel both round
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for a, c in zip(*res):  # oneDNN sums in another order: equal to rounding
        torch.testing.assert_close(a, c, **tol)


def test_conv_block_is_one_op_and_gradchecks():
    from torch.library import opcheck

    x = torch.rand(2, 1, 6, 8, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with torch.profiler.profile() as prof:
        y, e = conv2d_act_energy_max_pool2(x, w, b, "gelu", penalty=0.1)
        (y.sum() + e).backward()
    names = [ev.name for ev in prof.events()]
    assert names.count("minaction::conv_pool2_fwd") == 1 and names.count("minaction::conv_pool2_bwd") == 1
    assert "aten::convolution" not in names
    f = lambda ww, bb: conv2d_act_energy_max_pool2(x, ww, bb, "gelu", "l2")  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, b))
    assert torch.autograd.gradgradcheck(f, (w, b))  # create_graph: the differentiable recomputation
    ops = torch.ops.minaction
    opcheck(ops.conv_pool2.default, (x, w, b, 1, 2, False, 0.0))
    opcheck(ops.conv_pool2.default, (x.float(), w.detach().float(), None, 2, 1, True, 0.5))
    opcheck(ops.conv_pool2_fwd.default, (x, w.detach(), b.detach(), 1, 2, False))
    # an input that needs a gradient: the Python side runs conv2d (the C++ op would recompute)
    xr = x.clone().requires_grad_()
    with torch.profiler.profile() as prof:
        y, e = conv2d_act_energy_max_pool2(xr, w, b)
    assert "minaction::conv_pool2" not in {ev.name for ev in prof.events()}
    yo, eo = torch.ops.minaction.conv_pool2(xr, w, b, 1, 2, False, 0.0)
    ga = torch.autograd.grad(yo.sum() + eo, (xr, w, b))
    gb = torch.autograd.grad(y.sum() + e, (xr, w, b))
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-12)


def test_conv_block_fallbacks_and_errors():
    x = torch.rand(2, 1, 7, 8)  # odd H: conv2d and the fused epilogue
    w = torch.randn(4, 1, 3, 3)
    y, e = conv2d_act_energy_max_pool2(x, w)
    yb, eb = activation_energy_max_pool2(F.conv2d(x, w, padding=1))
    assert torch.equal(y, yb) and torch.equal(e, eb)
    with pytest.raises(RuntimeError, match="even H and W"):
        torch.ops.minaction.conv_pool2(x, w, None, 1, 2, False, 0.0)
    with pytest.raises(RuntimeError, match="kernel sizes|k 1, 3, 5 or 7"):
        torch.ops.minaction.conv_pool2(torch.rand(2, 1, 8, 8), torch.randn(4, 1, 9, 9), None, 1, 2, False, 0.0)


def test_energy_conv2d_first_block_uses_the_fused_op():
    torch.manual_seed(0)
    layer = EnergyConv2d(1, 5, 3, padding=1, penalty=0.05).double()
    x = torch.rand(3, 1, 10, 12, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        y = layer.forward_max_pool2(x)
    assert "minaction::conv_pool2" in {ev.name for ev in prof.events()}
    e = layer.last_energy
    y2 = max_pool2(layer(x), 2)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(e, layer.last_energy, rtol=1e-12, atol=0)
