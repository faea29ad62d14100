"""Where a training step's time goes, phase by phase, fused energy layers vs plain layers.

Variants (same weights, same data, Adam(fused=True)), interleaved in shuffled order each round:
  plain      nn.Linear + ReLU, loss = CE
  fused      EnergyLinear, loss = CE + lam * total_energy(model)
  fused_noE  EnergyLinear, loss = CE (the layers' own cost, no energy term)
  penalty    EnergyLinear(penalty=lam), loss = CE: the layers apply the energy term in their backward
  glue       nn.Linear + ReLU, loss = CE + lam * (sum of constant leaves): the energy term's arithmetic alone

Phases: model (forward through the layers), ce, energy (total_energy or the leaf sum), combine (ce + lam * E),
backward, optimizer step, zero_grad, total. Medians over rounds; ratio = median of per-round total ratios.

    python bench/step_phases.py [--sizes 784,64,64,10] [--batch 128] [--rounds 600] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import minaction
from step_ratio import build, machine_info

PHASES = ("model", "ce", "energy", "combine", "backward", "opt_step", "zero_grad", "total")


def make(model, kind, lam, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    leaves = [torch.zeros((), requires_grad=True) for m in model if isinstance(m, nn.ReLU)] if kind == "glue" else []
    pc = time.perf_counter

    def step():
        t0 = pc()
        out = model(x)
        t1 = pc()
        ce = F.cross_entropy(out, y)
        t2 = pc()
        if kind == "fused":
            e = minaction.total_energy(model)
        elif kind == "glue":
            e = leaves[0]
            for leaf in leaves[1:]:
                e = e + leaf
            for leaf in leaves:
                leaf.grad = None
        t3 = pc()
        loss = ce + lam * e if kind in ("fused", "glue") else ce
        t4 = pc()
        loss.backward()
        t5 = pc()
        opt.step()
        t6 = pc()
        opt.zero_grad(set_to_none=True)
        t7 = pc()
        return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t7 - t0)

    return step


def with_penalty(model, lam):
    minaction.set_penalty(model, lam)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,64,64,10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    x, y = torch.randn(args.batch, sizes[0]), torch.randint(0, sizes[-1], (args.batch,))
    fused = build("fused", sizes)
    steps = {"plain": make(build("plain", sizes), "plain", args.lam, x, y),
             "fused": make(fused, "fused", args.lam, x, y),
             "fused_noE": make(copy.deepcopy(fused), "fused_noE", args.lam, x, y),
             "penalty": make(with_penalty(copy.deepcopy(fused), args.lam), "penalty", args.lam, x, y),
             "glue": make(build("plain", sizes), "glue", args.lam, x, y)}
    info = machine_info()
    for _ in range(args.warmup):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(steps)
        rng.shuffle(order)
        for k in order:
            times[k].append(steps[k]())
    print(info)
    print(f"{'variant':10s} " + " ".join(f"{p:>9s}" for p in PHASES) + "  ratio (us)")
    res = {}
    for k, ts in times.items():
        med = [statistics.median(t[i] for t in ts) * 1e6 for i in range(len(PHASES))]
        ratio = statistics.median(a[-1] / b[-1] for a, b in zip(ts, times["plain"]))
        res[k] = {"phases_us": dict(zip(PHASES, med)), "ratio": ratio}
        print(f"{k:10s} " + " ".join(f"{v:9.1f}" for v in med) + f"  {ratio:.3f}")
    return res


if __name__ == "__main__":
    main()
