"""A converted model's training step against the same model in plain PyTorch, interleaved.

The model is a small CIFAR-style ResNet (a conv-BatchNorm-ReLU stem and BasicBlocks, each block's
``self.relu`` applied after ``bn1`` and after the residual add): nothing in it can fuse into a layer, so
``minaction.convert`` turns its ReLU modules into ``EnergyActivation`` (the block's sums both calls).

Variants, one SGD step each (forward, loss, backward, step):
- ``plain``: the model without energy (the baseline);
- ``hand``: plain PyTorch with the energy penalty written by hand (forward hooks keep every ReLU output,
  the loss adds ``lam * sum(mean_batch sum_units y^2)``), as a careful user would;
- ``converted``: ``minaction.convert(model)``, loss ``CE + lam * total_energy(model)``.

``--style functional``: the same network written as kuangliu/pytorch-cifar writes it, with relu
*calls* (``F.relu(self.bn1(self.conv1(x)))``, ``return F.relu(out + x)``): ``convert`` cannot replace a
call, so it attaches ``ActivationObserver`` hooks (the stem's norm, each block's ``bn1`` and each block's
returned value); the hand-written penalty keeps the relu calls' outputs.

    python bench/convert_step.py --rounds 40 --threads 1 [--style functional]

Prints the medians of interleaved rounds and the ratios to ``plain``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minaction  # noqa: E402
from step_ratio import machine_info  # noqa: E402

LAM = 1e-3


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SmallResNet(nn.Module):
    def __init__(self, width=16, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class FunctionalBlock(nn.Module):
    """kuangliu's BasicBlock: relu calls; ``keep`` (a list, for the hand-written penalty) gets their outputs."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.keep = None

    def _keep(self, t):
        if self.keep is not None:
            self.keep.append(t)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        self._keep(out)
        out = F.relu(self.bn2(self.conv2(out)) + x)
        self._keep(out)
        return out


class FunctionalResNet(nn.Module):
    def __init__(self, width=16, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(*[FunctionalBlock(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)
        self.keep = None

    def forward(self, x):
        out = F.relu(self.stem(x))
        if self.keep is not None:
            self.keep.append(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(out), 1), 1))


def make_steps(width=16, blocks=2, style="modules"):
    torch.manual_seed(0)
    base = (SmallResNet if style == "modules" else FunctionalResNet)(width, blocks)
    plain, hand, conv = base, copy.deepcopy(base), copy.deepcopy(base)
    outs = []
    for m in hand.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # the hook keeps the output, which the next in-place op must not overwrite
            m.register_forward_hook(lambda mod, i, o: outs.append(o))
        if hasattr(m, "keep"):
            m.keep = outs
    minaction.convert(conv)

    def stepper(model, energy):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(x, y):
            outs.clear()
            loss = F.cross_entropy(model(x), y) + (LAM * energy() if energy is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    return {"plain": stepper(plain, None),
            "hand": stepper(hand, lambda: sum(o.square().flatten(1).sum(1).mean() for o in outs)),
            "converted": stepper(conv, lambda: minaction.total_energy(conv))}


def run(rounds=40, batch=64, size=32, width=16, blocks=2, threads=1, warmup=3, style="modules"):
    torch.set_num_threads(threads)
    steps = make_steps(width, blocks, style)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    times = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            t = time.perf_counter()
            steps[k](x, y)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"ms": med[k] * 1e3, "ratio": med[k] / med["plain"]} for k in med}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--style", choices=("modules", "functional"), default="modules",
                    help="activation modules (EnergyActivation) or relu calls (ActivationObserver)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = machine_info()
    res = run(a.rounds, a.batch, a.size, a.width, a.blocks, a.threads, style=a.style)
    info.update(shape=[a.batch, 3, a.size, a.size], width=a.width, blocks=a.blocks, style=a.style,
                loadavg_after=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(json.dumps(info))
    print(f"{'variant':10} {'step ms':>9} {'x plain':>8}")
    for k, v in res.items():
        print(f"{k:10} {v['ms']:9.3f} {v['ratio']:8.3f}")
    return res


if __name__ == "__main__":
    main()
