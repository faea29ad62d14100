"""Per-step cost of the Python paths around the kernels, for comparing two checkouts of minaction.

A 784-64-64-10 EnergyLinear step (batch 128) and a two-layer EnergyConv2d step ([32, 3, 16, 16]), both
``CE + 0.01 * total_energy``, and a forward + ``total_energy``: medians in microseconds, one thread. Run it
alternately with PYTHONPATH at each checkout (a `git worktree` of the older commit), several times:

    PYTHONPATH=/path/to/old python bench/checkout_overhead.py old
    PYTHONPATH=. python bench/checkout_overhead.py new
"""
import sys
import timeit

import torch
import torch.nn.functional as F
from torch import nn

import minaction
from minaction.nn import EnergyConv2d, EnergyLinear

torch.set_num_threads(1)
torch.manual_seed(0)
mlp = nn.Sequential(EnergyLinear(784, 64), EnergyLinear(64, 64), EnergyLinear(64, 10, energy=None))
cnn = nn.Sequential(EnergyConv2d(3, 8, 3, padding=1), EnergyConv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8*16*16, 10))
x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
xc, yc = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
def step(m, a, b):
    loss = F.cross_entropy(m(a), b) + 0.01 * minaction.total_energy(m)
    loss.backward()
def te():
    minaction.total_energy(mlp)
mlp(x)
res = {}
for name, f, n in (("mlp step", lambda: step(mlp, x, y), 300), ("cnn step", lambda: step(cnn, xc, yc), 200)):
    f()
    res[name] = sorted(timeit.repeat(f, number=1, repeat=n))[n // 2] * 1e6
mlp(x)
res["total_energy (2 layers)"] = sorted(timeit.repeat(lambda: (mlp(x), te()), number=1, repeat=400))[200] * 1e6
print(sys.argv[1], {k: round(v, 1) for k, v in res.items()})
