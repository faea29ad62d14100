"""torch.utils.flop_counter.FlopCounterMode counts the fused ops as it counts the plain layers
(minaction/backends/flops.py): without formulas it skipped them and an energy MLP read as ~10x
cheaper than the same nn.Linear MLP."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import minaction
from minaction.nn import EnergyConv2d, EnergyLinear

torch.set_num_threads(1)


def _flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _pair(build):
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    return plain, minaction.convert(build())


def _step(model, x, y, backward):
    def run():
        out = model(x).flatten(1)[:, :3]
        if backward:
            F.cross_entropy(out, y).backward()
    return run


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("backend", [None, "composite", "reference"])
def test_mlp_counts_as_the_plain_mlp(backward, input_grad, backend):
    plain, energy = _pair(lambda: nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                                nn.Linear(16, 3)))
    for m in energy.modules():
        if isinstance(m, EnergyLinear):
            m.backend = backend
    x, y = torch.randn(9, 20, requires_grad=input_grad), torch.arange(9) % 3
    want = _flops(_step(plain, x, y, backward))
    assert want > 0
    assert _flops(_step(energy, x, y, backward)) == want


@pytest.mark.parametrize("backward", [False, True])
def test_conv_net_counts_as_the_plain_net(backward):
    plain, energy = _pair(lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                                nn.Flatten(), nn.Linear(4 * 5 * 5, 3)))
    x, y = torch.randn(6, 2, 11, 11), torch.arange(6) % 3
    assert _flops(_step(energy, x, y, backward)) == _flops(_step(plain, x, y, backward)) > 0


@pytest.mark.parametrize("backward", [False, True])
def test_fused_first_image_block_counts_its_convolution(backward):
    """minaction::conv_pool2 (conv + act + energy + pool of a one-channel first block) counts as the
    convolution it contains. Called directly: under FlopCounterMode the layer itself takes the
    unfused path, because the mode's module tracker registers global hooks (see
    EnergyConv2d.forward_max_pool2), and counts torch's convolution."""
    from minaction.backends import ACT_CODES, cpu

    cpu.load()
    torch.manual_seed(0)
    layer = EnergyConv2d(1, 4, 5, padding=2)
    x = torch.randn(3, 1, 12, 12)

    def fused():
        y, e = torch.ops.minaction.conv_pool2(x, layer.weight, layer.bias, ACT_CODES["relu"], 2, False, 0.0)
        if backward:
            (y.sum() + e).backward()

    def plain():
        y = F.max_pool2d(F.relu(F.conv2d(x, layer.weight, layer.bias, padding=2)), 2)
        if backward:
            y.sum().backward()

    with FlopCounterMode(display=False) as fc:
        fused()
    assert any("conv_pool2" in str(op) for op in fc.get_flop_counts()["Global"]), fc.get_flop_counts()
    assert fc.get_total_flops() == _flops(plain) > 0
    assert _flops(lambda: layer.forward_max_pool2(x)) == _flops(lambda: F.conv2d(x, layer.weight, padding=2))


def test_batched_layer_counts_g_members():
    G = 3
    torch.manual_seed(0)
    layer = EnergyLinear(20, 16, num_models=G)
    x = torch.randn(G, 9, 20)
    single = _flops(lambda: F.relu(F.linear(x[0], layer.weight[0], layer.bias[0])).sum().backward())
    assert _flops(lambda: (layer(x).sum() + layer.last_energy.sum()).backward()) == G * single > 0


def test_formulas_register_when_flop_counter_is_imported_later():
    """minaction does not import torch.utils.flop_counter (it pulls triton, ~0.2 s); importing it
    afterwards still registers the formulas."""
    code = ("import sys, torch, minaction\n"
            "from minaction.nn import EnergyLinear\n"
            "layer = EnergyLinear(8, 4); layer(torch.randn(2, 8))\n"
            "assert 'torch.utils.flop_counter' not in sys.modules\n"
            "from torch.utils.flop_counter import FlopCounterMode\n"
            "with FlopCounterMode(display=False) as fc:\n"
            "    layer(torch.randn(5, 8))\n"
            "assert fc.get_total_flops() == 2 * 5 * 8 * 4, fc.get_total_flops()\n"
            "import importlib, torch.utils.flop_counter as m\n"
            "assert not any(type(f).__name__ == '_AfterImport' for f in sys.meta_path)\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
