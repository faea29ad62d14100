"""Interleaved timing of one MLP training step: fused energy layers vs plain layers.

Variants (same weights, same data, same optimizer):
  plain      nn.Linear + ReLU, loss = CE               (the baseline: no energy term)
  naive      nn.Linear + ReLU, loss = CE + lam * sum_l mean_b sum_u a^2   (PyTorch penalty)
  compiled   torch.compile of `naive`
  fused      minaction.nn.EnergyLinear (backend auto), loss = CE + lam * total_energy

Each round runs every variant once in a shuffled order; reported numbers are medians over
rounds of per-variant times and of per-round ratios to `plain` (interleaving cancels the
drift of a shared, noisy machine). Phases: forward (loss), backward, full step (incl. Adam).

    python bench/step_ratio.py --rounds 200 [--json out.json] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import minaction


def build(kind, sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        if kind == "fused" and not last:
            layers.append(minaction.nn.EnergyLinear(a, b, activation="relu", energy="l2"))
        else:
            layers.append(nn.Linear(a, b))
            if not last:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def naive_loss(model, x, y, lam):
    h, energy = x, 0.0
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU):
            energy = energy + h.pow(2).sum(1).mean()
    return F.cross_entropy(h, y) + lam * energy


def make_step(kind, model, lam):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    if kind == "plain":
        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)
    elif kind == "naive":
        def loss_fn(x, y):
            return naive_loss(model, x, y, lam)
    elif kind == "compiled":
        loss_fn = torch.compile(lambda x, y: naive_loss(model, x, y, lam))
    elif kind == "fused":
        def loss_fn(x, y):
            return F.cross_entropy(model(x), y) + lam * minaction.total_energy(model)
    else:
        raise ValueError(kind)

    def step(x, y):
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t0
    return step


def peak_memory(kind, sizes, batch, lam):
    """Peak bytes allocated during one step (CPU: torch profiler memory accounting)."""
    from torch.profiler import ProfilerActivity, profile

    model = build(kind, sizes)
    step = make_step(kind, model, lam)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    step(x, y)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y)
    cur = peak = 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,512,512,10")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = ["plain", "naive", "fused"] + ([] if args.no_compile else ["compiled"])
    steps = {k: make_step(k, build(k, sizes), args.lam) for k in kinds}
    x, y = torch.randn(args.batch, sizes[0]), torch.randint(0, sizes[-1], (args.batch,))
    for _ in range(args.warmup):
        for k in kinds:
            steps[k](x, y)
    times = {k: [] for k in kinds}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = kinds[:]
        rng.shuffle(order)
        for k in order:
            times[k].append(steps[k](x, y))
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "backend": minaction.backend_info("cpu")["devices"]["cpu"]["active"],
           "sizes": sizes, "batch": args.batch, "rounds": args.rounds, "variants": {}}
    for k in kinds:
        row = {}
        for i, phase in enumerate(("forward", "backward", "step")):
            med = statistics.median(t[i] for t in times[k])
            ratio = statistics.median(a[i] / b[i] for a, b in zip(times[k], times["plain"]))
            row[phase] = {"median_ms": med * 1e3, "ratio_to_plain": ratio}
        row["peak_mem_mb"] = peak_memory(k, sizes, args.batch, args.lam) / 2**20 if k != "compiled" else None
        res["variants"][k] = row
    print(f"{'variant':10s} {'fwd ms':>8s} {'bwd ms':>8s} {'step ms':>8s} {'fwd x':>6s} {'bwd x':>6s} "
          f"{'step x':>6s} {'peak MB':>8s}")
    for k, r in res["variants"].items():
        mem = f"{r['peak_mem_mb']:8.1f}" if r["peak_mem_mb"] is not None else f"{'-':>8s}"
        print(f"{k:10s} {r['forward']['median_ms']:8.3f} {r['backward']['median_ms']:8.3f} "
              f"{r['step']['median_ms']:8.3f} {r['forward']['ratio_to_plain']:6.3f} "
              f"{r['backward']['ratio_to_plain']:6.3f} {r['step']['ratio_to_plain']:6.3f} {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
