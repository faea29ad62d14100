"""What a training step keeps for its backward: plain models against the same models converted.

The bytes of every distinct storage that autograd saves during the forward (``saved_tensors_hooks``),
loss included, that is neither a parameter nor the input batch (those are alive anyway), for plain PyTorch
models and the same models after ``minaction.convert`` (energy term in the loss): the activation memory a
step holds until its backward. Deterministic (no timing): the numbers are the same on every machine.

    python bench/saved_memory.py [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minaction  # noqa: E402


class FunctionalBlock(nn.Module):
    """kuangliu's CIFAR BasicBlock: relu *calls* (each gets an ActivationObserver)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ModuleBlock(FunctionalBlock):
    """torchvision's BasicBlock: one nn.ReLU module applied twice (it becomes an EnergyActivation)."""

    def __init__(self, c):
        super().__init__(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    def __init__(self, block, c=32, blocks=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.Sequential(*[block(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def models(batch):
    img = torch.randn(batch, 3, 32, 32)
    vec = torch.randn(batch * 8, 784)
    yield "ResNet, relu calls (observers)", lambda: ResNet(FunctionalBlock), img
    yield "ResNet, relu modules (EnergyActivation)", lambda: ResNet(ModuleBlock), img
    yield "conv+relu stack (EnergyConv2d)", lambda: nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 32 * 32, 10)), img
    yield "MLP relu (EnergyLinear)", lambda: nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)), vec
    yield "MLP gelu (EnergyLinear)", lambda: nn.Sequential(
        nn.Linear(784, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)), vec


def saved_mib(model, x, energy):
    seen = {}
    alive = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in alive:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = out.float().logsumexp(-1).mean()
        if energy:
            loss = loss + 1e-3 * minaction.total_energy(model)
    return sum(seen.values()) / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    print("| model | plain MiB | converted MiB | ratio | converted to |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, make, x in models(args.batch):
        plain = saved_mib(make(), x, False)
        conv = minaction.convert(make())
        kinds = sorted({type(m).__name__ for m in conv.modules() if isinstance(m, minaction.nn.EnergyLayer)})
        ours = saved_mib(conv, x, True)
        print(f"| {name} | {plain:.2f} | {ours:.2f} | {ours / plain:.3f} | {', '.join(kinds)} |")


if __name__ == "__main__":
    main()
