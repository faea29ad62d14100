"""Third-party tools that wrap, hook, quantize or shard layers. Two would make the energy wrong
without a word, and are refused: peft's adapters (LoRA) around a layer that is already an energy
layer, and Opacus's per-sample gradients with the energy in the loss. Two work: a weight of a tensor
subclass (torchao's quantization), and tensor parallelism (DTensor, ``parallelize_module``). Neither library is a dependency: stand-ins with their
structure (a class of a ``peft.`` module holding ``base_layer``; a forward hook bound to an object
of an ``opacus.`` module) stand for them, and the per-sample gradients are computed the way
Opacus's functorch path computes them (the real libraries were tried by hand: docs/core.md)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
    def tape():
        with minaction.record_energy(wrong) as t:
            wrong(x)
        return t.total()

    for call in (lambda: minaction.total_energy(wrong), lambda: minaction.set_penalty(wrong, LAM),
                 lambda: minaction.convert(wrong), lambda: minaction.energy_report(wrong, x), tape):
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


class TPMLP(nn.Module):
    """A transformer's MLP: the hidden layer sharded by columns, the next by rows."""

    def __init__(self):
        super().__init__()
        self.w1, self.act, self.w2, self.head = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.w2(self.act(self.w1(x))))


_TP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    import minaction
    rank, init, mode, out, tests = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    sys.path.insert(0, tests)
    from nn.test_wrappers import TPMLP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = minaction.convert(TPMLP())
    if mode == "penalty":
        minaction.set_penalty(model, 0.1)
    parallelize_module(model, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        if mode == "loss":
            e = minaction.total_energy(model)
            assert type(e) is torch.Tensor, type(e)  # the ranks' parts summed, not a DTensor
            loss = loss + 0.1 * e
        opt.zero_grad()
        loss.backward()
        opt.step()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("mode", ["loss", "penalty"])
def test_tensor_parallel_layers_train_as_one_process(mode, tmp_path):
    """``parallelize_module`` shards an ``EnergyLinear``'s weight as an ``nn.Linear``'s (a DTensor): the layer
    runs the reference path on it, each rank holds its shard's part of the energy, ``total_energy`` sums
    them into a plain tensor, and the penalty form adds the whole layer's penalty. Two gloo ranks train three
    SGD steps to the parameters of one process training the unsharded model."""
    init = "file://" + str(tmp_path / "rendezvous")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tests = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", _TP_WORKER, str(r), init, mode, str(tmp_path / "rank0.pt"), tests],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = torch.load(tmp_path / "rank0.pt")
    torch.manual_seed(0)
    plain = TPMLP()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    for _ in range(3):
        h = F.relu(plain.w1(x))
        loss = F.cross_entropy(plain.head(plain.w2(h)), y) + 0.1 * h.square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(got) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(got[k], v, msg=k)
