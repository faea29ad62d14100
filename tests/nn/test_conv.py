"""EnergyConv1d / EnergyConv2d against plain PyTorch (conv + activation + energy)."""
import math

import pytest
import torch
import torch.nn.functional as F

import minaction
from minaction.nn.conv import EnergyConv1d, EnergyConv2d

BACKENDS = ["reference", "cpu"]


def _ref(layer, x):
    conv = F.conv1d if isinstance(layer, EnergyConv1d) else F.conv2d
    z = conv(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda t: t,
           "gelu": F.gelu, "silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[layer.activation]
    y = act(z)
    p = {"l2": 2, "l1": 1}[layer.energy]
    per = (y.abs() ** p).reshape(y.shape[0], -1)
    e = per.sum(1).mean() if layer.energy_reduction == "sum" else per.mean(1).mean()
    return y, e


CASES = [
    (EnergyConv1d, dict(in_channels=3, out_channels=5, kernel_size=5, padding=2), (4, 3, 17)),
    (EnergyConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2), (3, 4, 11)),
    (EnergyConv2d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1), (3, 2, 9, 7)),
    (EnergyConv2d, dict(in_channels=3, out_channels=3, kernel_size=(3, 1), dilation=2, bias=False), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw,shape", CASES)
@pytest.mark.parametrize("activation,energy,reduction", [("relu", "l2", "sum"), ("tanh", "l1", "mean"),
                                                          ("gelu", "l2", "mean"), ("gelu_tanh", "l2", "sum")])
def test_matches_reference_float64(backend, cls, kw, shape, activation, energy, reduction):
    torch.manual_seed(0)
    layer = cls(**kw, activation=activation, energy=energy, energy_reduction=reduction, backend=backend).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    e = layer.last_energy
    assert e.dim() == 0
    gy = torch.randn_like(y)
    (y * gy).sum().backward(retain_graph=True)
    g1 = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    e.backward()
    g1e = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    x2 = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y2, e2 = _ref(layer, x2)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e, e2, rtol=1e-10, atol=1e-12)
    (y2 * gy).sum().backward(retain_graph=True)
    g2 = [x2.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x2.grad = None
    layer.zero_grad()
    e2.backward()
    g2e = [x2.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(g1 + g1e, g2 + g2e):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls,shape", [(EnergyConv1d, (2, 3, 10)), (EnergyConv2d, (2, 3, 6, 6))])
def test_float32_default_backend_and_total_energy(cls, shape):
    torch.manual_seed(1)
    layer = cls(3, 4, 3, padding=1)
    x = torch.randn(shape)
    y = layer(x)
    y2, e2 = _ref(layer, x)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(minaction.total_energy(torch.nn.Sequential(layer)), e2, rtol=1e-5, atol=1e-5)


def test_energy_none_counts_nothing():
    layer = EnergyConv2d(1, 2, 3, energy=None)
    assert not layer.counts_energy
    y = layer(torch.randn(2, 1, 5, 5))
    assert y.shape == (2, 2, 3, 3)


def test_init_like_torch_conv():
    gen = torch.Generator().manual_seed(3)
    layer = EnergyConv2d(4, 8, 3)
    layer.reset_parameters(generator=gen)
    bound = 1 / math.sqrt(4 * 9)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.abs().max() > 0.8 * bound
    gen2 = torch.Generator().manual_seed(3)
    w = torch.empty(8, 4, 3, 3).uniform_(-bound, bound, generator=gen2)
    torch.testing.assert_close(layer.weight.data, w)
    with pytest.raises(ValueError, match="model"):
        layer.reset_parameters(model=0)


def test_flops_and_repr():
    layer = EnergyConv1d(3, 4, 5, padding=2)
    y = layer(torch.randn(2, 3, 10))
    assert layer.forward_flops((2, 3, 10), tuple(y.shape)) == 2 * y.numel() * 15 + y.numel()
    assert "activation='relu'" in repr(layer)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="input channels"):
        EnergyConv2d(3, 4, 3)(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"4-D\) or \[channels, height, width\] \(3-D\)"):
        EnergyConv2d(3, 4, 3)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="input channels"):  # unbatched [C, H, W] with the wrong C
        EnergyConv2d(3, 4, 3)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="needs the batch dimension"):
        EnergyConv2d(3, 4, 3, num_models=2)(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match=r"member-major along the channels, \[batch, 2x3, height, width\]"):
        EnergyConv2d(3, 4, 3, num_models=2)(torch.randn(2, 4, 3, 5, 5))  # a [G, B, C, H, W] stack
    # a dtype the layer does not compute in, or another than its weight's: named as EnergyLinear names it (torch's
    # conv said "Input type (long int) and bias type (float) should be the same"); both TypeError and RuntimeError
    for dtype, says in ((torch.int64, "minaction supports float32"), (torch.bool, "minaction supports float32"),
                        (torch.float64, "weight has dtype torch.float32 but the input has torch.float64")):
        for err in (TypeError, RuntimeError):
            with pytest.raises(err, match=says):
                EnergyConv2d(3, 4, 3)(torch.ones(2, 3, 5, 5, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them: no error
        assert EnergyConv2d(3, 4, 3)(torch.ones(2, 3, 5, 5)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="groups"):
        EnergyConv1d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size"):
        EnergyConv2d(3, 4, (3, 3, 3))
    # nn.Conv2d refuses non-integers; int() used to truncate 2.7 to 2 and read '3' as 3 without a word
    for kw in ({"kernel_size": (2.7, 3)}, {"kernel_size": 3, "stride": 1.5}, {"kernel_size": ("3", "3")},
               {"kernel_size": 3, "padding": (0.9, 0.9)}, {"kernel_size": 3, "dilation": (1.99, 1)}):
        with pytest.raises(TypeError, match="ints"):
            EnergyConv2d(3, 4, **kw)
    with pytest.raises(ValueError, match="activation"):
        EnergyConv1d(3, 4, 3, activation="softmax")


@pytest.mark.parametrize("cls,kw,shape", [CASES[0], CASES[2]])
def test_triton_backend_when_available(cls, kw, shape):
    """The Triton epilogue (interpreted on CPU without a GPU) on two small cases."""
    ok, why = minaction.backends.select.available("triton", "cpu")
    if not ok:
        pytest.skip(f"triton backend not available: {why}")
    torch.manual_seed(0)
    layer = cls(**kw, backend="triton")
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    (y.sum() + layer.last_energy).backward()
    gx = x.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    y2, e2 = _ref(layer, x2)
    (y2.sum() + e2).backward()
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.last_energy, e2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw,shape", [CASES[0], CASES[2]])
def test_unbatched_input_as_nn_conv(backend, cls, kw, shape):
    """``[C, *spatial]`` works as in nn.Conv1d/2d: the output drops the batch dim again and the energy
    is that of the one sample; the fused conv + pool block takes it too."""
    torch.manual_seed(0)
    layer = cls(**kw, backend=backend).double()
    x = torch.randn(shape[1:], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref, e_ref = _ref(layer, x.unsqueeze(0))
    assert y.shape == y_ref.shape[1:]
    torch.testing.assert_close(y, y_ref.squeeze(0))
    torch.testing.assert_close(layer.last_energy, e_ref)
    (y.sum() + layer.last_energy).backward()
    g = x.grad.clone()
    x.grad = None
    (y_ref.sum() + e_ref).backward()
    torch.testing.assert_close(g, x.grad)
    pooled = layer.forward_max_pool2(x.detach())
    dims = 1 if cls is EnergyConv1d else 2
    torch.testing.assert_close(pooled, minaction.ops.max_pool2(y_ref, dims).squeeze(0))
    torch.testing.assert_close(layer.last_energy, e_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("penalty", [0.0, 0.3])
def test_channels_last_stays_channels_last(backend, penalty):
    """A channels-last input gives a channels-last output, as nn.Conv2d + ReLU (+ max_pool2d) does,
    with the same values, energy and gradients (input, weight, bias), the penalty form included."""
    torch.manual_seed(0)
    layer = EnergyConv2d(3, 5, 3, padding=1, activation="silu", backend=backend, penalty=penalty).double()
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    gy = torch.randn_like(y)
    ((y * gy).sum() + 0.7 * layer.last_energy).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    x2 = x.detach().contiguous().requires_grad_(True)
    layer.zero_grad()
    y2, e2 = _ref(layer, x2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(layer.last_energy, e2)
    ((y2 * gy).sum() + (0.7 + penalty) * e2).backward()
    for a, b in zip(got, [x2.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)

    # the fused conv + max-pool block too (max_pool2d keeps the format as well)
    layer.zero_grad()
    x3 = x.detach().clone().requires_grad_(True)
    pooled = layer.forward_max_pool2(x3)
    assert pooled.is_contiguous(memory_format=torch.channels_last) and not pooled.is_contiguous()
    gp = torch.randn_like(pooled)
    ((pooled * gp).sum() + 0.7 * layer.last_energy).backward()
    got = [x3.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x4 = x.detach().contiguous().requires_grad_(True)
    y4, e4 = _ref(layer, x4)
    ref_pooled = F.max_pool2d(y4, 2)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(layer.last_energy, e4)
    ((ref_pooled * gp).sum() + (0.7 + penalty) * e4).backward()
    for a, b in zip(got, [x4.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)


PAD_CASES = [
    (EnergyConv1d, torch.nn.Conv1d, dict(kernel_size=3, padding=2), (2, 3, 9)),
    (EnergyConv1d, torch.nn.Conv1d, dict(kernel_size=4, padding="same", dilation=2), (2, 3, 10)),
    (EnergyConv2d, torch.nn.Conv2d, dict(kernel_size=3, padding=(1, 2), stride=(2, 1)), (2, 3, 9, 8)),
    (EnergyConv2d, torch.nn.Conv2d, dict(kernel_size=(4, 3), padding="same"), (2, 3, 7, 6)),
    (EnergyConv2d, torch.nn.Conv2d, dict(kernel_size=3, padding="valid"), (2, 3, 7, 6)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for zeros
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("cls,plain,kw,shape", PAD_CASES)
def test_padding_mode_as_nn_conv(backend, mode, cls, plain, kw, shape):
    """padding_mode pads as nn.Conv*d does: values, energy and every gradient equal nn.Conv*d + ReLU in float64."""
    torch.manual_seed(0)
    ref = plain(3, 4, **kw, padding_mode=mode).double()
    layer = cls(3, 4, **kw, padding_mode=mode, backend=backend).double()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y2 = torch.relu(ref(x2))
    e2 = y2.pow(2).reshape(shape[0], -1).sum(1).mean()
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.last_energy, e2, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    ((y * gy).sum() + 0.3 * layer.last_energy).backward()
    ((y2 * gy).sum() + 0.3 * e2).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-12)
    if mode != "zeros":
        assert f"padding_mode={mode!r}" in repr(layer)


def test_padding_mode_gradcheck_and_batched_members():
    torch.manual_seed(1)
    layer = EnergyConv2d(2, 3, 3, padding=1, padding_mode="reflect", activation="tanh").double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: layer._conv(x, w, b, 1), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: (layer(x), layer.last_energy), (x,))
    # num_models=G with a padding mode: member g is the single layer built with member g's weights
    G = 3
    bat = EnergyConv1d(2, 4, 3, padding=1, padding_mode="circular", num_models=G).double()
    xs = torch.randn(5, 2, 7, dtype=torch.float64)
    y = bat.member_view(bat(xs))
    for g in range(G):
        one = EnergyConv1d(2, 4, 3, padding=1, padding_mode="circular").double()
        one.load_state_dict({"weight": bat.weight[g].detach(), "bias": bat.bias[g].detach()})
        torch.testing.assert_close(y[g], one(xs), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bat.last_energy[g], one.last_energy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", [False, True])
def test_batched_members_keep_channels_last(pool):
    """num_models=G on a channels-last input (shared or member-major): the output is channels-last too, as
    nn.Conv2d + ReLU (+ max_pool2d) keep it, with each member's values and energy those of the member alone."""
    torch.manual_seed(2)
    G = 2
    bat = EnergyConv2d(3, 4, 3, padding=1, activation="relu", num_models=G).double()
    for C in (3, G * 3):
        x = torch.randn(2, C, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
        y = bat.forward_max_pool2(x) if pool else bat(x)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        yc = bat.forward_max_pool2(x.contiguous()) if pool else bat(x.contiguous())
        torch.testing.assert_close(y, yc)
        for g in range(G):
            one = EnergyConv2d(3, 4, 3, padding=1, activation="relu").double()
            one.load_state_dict({"weight": bat.weight[g].detach(), "bias": bat.bias[g].detach()})
            xg = x if C == 3 else x[:, 3 * g:3 * g + 3]
            yg = one.forward_max_pool2(xg) if pool else one(xg)
            torch.testing.assert_close(bat.member_view(y)[g], yg)
            torch.testing.assert_close(bat.last_energy[g], one.last_energy)


def test_padding_mode_bad_values():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        EnergyConv2d(2, 3, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        EnergyConv1d(2, 3, 3, padding="same", stride=2)


def test_energy_convs_are_nn_convs():
    """EnergyConv1d/2d subclass nn.Conv1d/2d as EnergyLinear subclasses nn.Linear: an init loop over
    ``isinstance(m, nn.Conv2d)`` (torchvision's ResNet, most training scripts) reaches them, and nn.Conv's
    attributes and ``_conv_forward`` (the convolution alone) read as for nn.Conv."""
    model = torch.nn.Sequential(EnergyConv2d(3, 8, 3, padding=1), EnergyConv1d(8, 4, 1))
    assert isinstance(model[0], torch.nn.Conv2d) and isinstance(model[1], torch.nn.Conv1d)
    assert not isinstance(model[0], torch.nn.Conv1d)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            torch.nn.init.constant_(m.weight, 0.5)
            torch.nn.init.zeros_(m.bias)
    assert bool((model[0].weight == 0.5).all()) and bool((model[1].weight == 0.5).all())
    plain = torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
    layer = EnergyConv2d(3, 8, 3, padding=1, padding_mode="reflect")
    layer.load_state_dict(plain.state_dict())
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
        a, b = getattr(layer, attr), getattr(plain, attr)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), attr
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(layer._conv_forward(x, layer.weight, layer.bias), plain(x))
    torch.testing.assert_close(layer(x), torch.relu(plain(x)))
    plain.load_state_dict(layer.state_dict())
