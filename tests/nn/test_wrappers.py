"""Third-party tools that wrap or hook layers, which would make the energy wrong without a word:
peft's adapters (LoRA) around a layer that is already an energy layer, and Opacus's per-sample
gradients with the energy in the loss. Neither library is a dependency: stand-ins with their
structure (a class of a ``peft.`` module holding ``base_layer``; a forward hook bound to an object
of an ``opacus.`` module) stand for them, and the per-sample gradients are computed the way
Opacus's functorch path computes them (the real libraries were tried by hand: docs/core.md)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import minaction
from minaction.nn import EnergyActivation, EnergyLinear

torch.set_num_threads(1)
LAM = 0.1


class LoraLinear(nn.Module):
    """peft's ``lora.Linear`` in structure: the wrapped layer as ``base_layer``, and the adapter's
    low-rank term added to that layer's output."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


LoraLinear.__module__ = "peft.tuners.lora.layer"


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_an_energy_layer_inside_a_peft_adapter_is_refused_and_the_order_that_works_is_exact():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    wrong = minaction.convert(_mlp())
    wrong[0] = LoraLinear(wrong[0])  # get_peft_model after convert: relu(W x + b) + B A x
    wrong(x)
    for call in (lambda: minaction.total_energy(wrong), lambda: minaction.set_penalty(wrong, LAM),
                 lambda: minaction.convert(wrong), lambda: minaction.energy_report(wrong, x)):
        with pytest.raises(RuntimeError, match=r"EnergyLinear '0.base_layer' is the base_layer of peft's LoraLinear"
                                               r".*Apply peft \(get_peft_model\) to the plain model first"):
            call()

    plain = _mlp()
    plain[0] = LoraLinear(plain[0])  # the adapter first, then convert
    model = copy.deepcopy(plain)
    before = model(x)
    minaction.convert(model)
    assert isinstance(model[0].base_layer, nn.Linear) and not isinstance(model[0].base_layer, EnergyLinear)
    assert isinstance(model[1], EnergyActivation)  # the relu after the adapted layer counts its output
    torch.testing.assert_close(model(x), before)
    h = F.relu(plain[0](x))
    torch.testing.assert_close(minaction.total_energy(model), h.square().sum(1).mean())


class GradSampleHooks:
    """Opacus's ``GradSampleModule`` in what matters here: it hooks each trainable layer's forward
    with a bound method, to capture the layer's input for its per-sample gradients."""

    def capture(self, module, args, output):
        module.__dict__.setdefault("captured", []).append(args[0].detach())


GradSampleHooks.__module__ = "opacus.grad_sample.grad_sample_module"


def _per_sample_grads(layer, x, backprops):
    """Opacus's functorch path: per sample, the gradient of (layer output * its output gradient).sum()
    with respect to the layer's parameters."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def one(p, a, b):
        return (functional_call(layer, p, (a.unsqueeze(0),)) * b.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, backprops)


def test_opacus_hooks_refuse_the_loss_form_and_the_penalty_form_gives_per_sample_gradients_with_the_energy():
    torch.manual_seed(0)
    model = minaction.convert(_mlp())
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    handle = model[0].register_forward_hook(GradSampleHooks().capture)
    model(x)
    with pytest.raises(RuntimeError, match=r"EnergyLinear '0' has Opacus's per-sample gradient hooks.*"
                                           r"minaction.set_penalty\(model, lam\)"):
        minaction.total_energy(model)
    with torch.no_grad():  # logging is fine
        minaction.total_energy(model)
    minaction.set_penalty(model, LAM)
    minaction.total_energy(model)  # the penalty form: total_energy is for logging, nothing is dropped

    # the penalty form's per-sample gradients, computed from the output gradient as Opacus does (its hooks
    # off meanwhile), hold the energy's: each equals the gradient of (ce_i + LAM * E of sample i alone)
    handle.remove()
    layer = model[0]
    hidden = layer(x).detach().requires_grad_()
    ce = F.cross_entropy(model[2](hidden), y, reduction="sum")
    backprops, = torch.autograd.grad(ce, hidden)
    got = _per_sample_grads(layer, x, backprops)
    ref = copy.deepcopy(model)
    minaction.set_penalty(ref, 0.0)
    for i in range(len(x)):
        ref.zero_grad()
        (F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]) + LAM * minaction.total_energy(ref)).backward()
        torch.testing.assert_close(got["weight"][i], ref[0].weight.grad)
        torch.testing.assert_close(got["bias"][i], ref[0].bias.grad)


class OwnOpsOnly(torch.Tensor):
    """A tensor subclass that implements torch's ops and not minaction's, as torchao's quantized weights
    (``quantize_(model, Int8WeightOnlyConfig())``) and DTensor do."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if "minaction" in str(getattr(func, "namespace", "")) or "minaction" in repr(func):
            raise NotImplementedError(f"{cls.__name__} does not implement {func}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_weight_of_a_tensor_subclass_runs_torchs_own_ops():
    """torchao's ``quantize_`` swaps an ``nn.Linear``'s weight (so an ``EnergyLinear``'s) for a tensor subclass
    that implements ``F.linear`` but not minaction's ops: the layer runs the reference path, ``F.linear`` and
    plain ops, and equals the same layer with that weight in plain PyTorch (tried by hand with torchao 0.18's
    int8 weight-only quantization: outputs equal to the quantized plain model's, difference 0.0)."""
    torch.manual_seed(0)
    layer = EnergyLinear(6, 5, activation="gelu")
    x = torch.randn(4, 6, requires_grad=True)
    layer(x)  # a fast-path plan made for the plain weight must not be used for the new one
    layer.weight = nn.Parameter(layer.weight.detach().clone().as_subclass(OwnOpsOnly))
    assert type(layer.weight) is OwnOpsOnly
    for _ in range(2):
        y = layer(x)
        ref = F.gelu(F.linear(x, layer.weight.as_subclass(torch.Tensor), layer.bias))
        torch.testing.assert_close(y.as_subclass(torch.Tensor), ref)
        torch.testing.assert_close(layer.last_energy.as_subclass(torch.Tensor), ref.square().sum(1).mean())
    gx, = torch.autograd.grad((y.sum() + layer.last_energy).as_subclass(torch.Tensor), x)
    gref, = torch.autograd.grad(ref.sum() + ref.square().sum(1).mean(), x)
    torch.testing.assert_close(gx, gref)
