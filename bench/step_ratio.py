"""Interleaved timing of one MLP training step: fused energy layers vs plain layers.

Variants (same weights, same data, same optimizer):
  plain      nn.Linear + ReLU, loss = CE               (the baseline: no energy term)
  naive      nn.Linear + ReLU, loss = CE + lam * sum_l mean_b sum_u a^2   (PyTorch penalty)
  compiled   torch.compile of `naive`
  fused      minaction.nn.EnergyLinear (backend auto), loss = CE + lam * total_energy
  penalty    the same layers with the penalty inside them (minaction.set_penalty(model, lam)),
             loss = CE: the same gradients (bitwise), no loss arithmetic per step
  glue       nn.Linear + ReLU, loss = CE + lam * (e_1 + ... + e_L) on constant leaves: the loss
             arithmetic alone, the floor under `fused` that no kernel can remove

Each round runs every variant once in a shuffled order; reported numbers are medians over
rounds of per-variant times and of per-round ratios to `plain` (interleaving cancels the
drift of a shared, noisy machine). Phases: forward (loss), backward, full step (incl. Adam).

    python bench/step_ratio.py --rounds 200 [--json out.json] [--no-compile]
    python bench/step_ratio.py --batched 10 --sizes 784,256,256,10 --batch 128   # G models at once
    python bench/step_ratio.py --epilogue [--threads 1]    # activation+energy pass vs torch's activation

``--batched G``: the study's batched MLP, ``EnergyLinear(num_models=G)`` layers against the same
network written with ``torch.baddbmm`` + ReLU (weights ``[G, out, in]``, plain has no energy).
``--epilogue``: the C++ activation+energy pass (``act_fwd`` on a ``[1, 2048, 512]`` tensor) against
torch's activation alone on the same tensor, per activation/energy, interleaved.
Every result line carries the CPU model, the ISA of the loaded build and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
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
        if kind in ("fused", "penalty") and not last:
            layers.append(minaction.nn.EnergyLinear(a, b, activation="relu", energy="l2"))
        else:
            layers.append(nn.Linear(a, b))
            if not last:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BmmMLP(nn.Module):
    """G independent MLPs as one network of batched matmuls (the plain baseline of --batched)."""

    def __init__(self, G, sizes, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.ws = nn.ParameterList()
        self.bs = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1 / a ** 0.5
            self.ws.append(nn.Parameter(torch.empty(G, a, b).uniform_(-bound, bound)))
            self.bs.append(nn.Parameter(torch.empty(G, 1, b).uniform_(-bound, bound)))

    def forward(self, x):  # x [G, B, in]
        h = x
        for i, (w, b) in enumerate(zip(self.ws, self.bs)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.ws) - 1:
                h = torch.relu(h)
        return h


def build_batched(kind, G, sizes, seed=0):
    if kind == "plain":
        return BmmMLP(G, sizes, seed)
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(minaction.nn.EnergyLinear(a, b, activation="identity" if last else "relu",
                                                energy=None if last else "l2", num_models=G))
    return nn.Sequential(*layers)


def timed_step(loss_fn, opt):
    """One training step returning (forward, backward, whole step) seconds."""
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


def make_batched_step(kind, model, lam):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def loss_fn(x, y):  # x [G, B, in], y [B]
        out = model(x)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(out.shape[0]), reduction="sum") / y.shape[0]
        return ce + lam * minaction.total_energy(model).sum() if kind == "fused" else ce

    return timed_step(loss_fn, opt)


def machine_info():
    """CPU model (and vendor/family/model: "AMD EPYC" was a Zen 3, 4 or 5), ISA of the loaded C++ build, threads,
    load average: printed with every result."""
    from minaction.backends import cpu as cpu_backend

    try:
        cpu_backend.load()
        isa = cpu_backend.loaded_isa()
    except Exception as exc:  # noqa: BLE001
        isa = f"none ({type(exc).__name__})"
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    from minaction.study.provenance import _cpu_id, _cpu_model

    return {"cpu": _cpu_model() or platform.machine(), "cpu_id": _cpu_id(), "isa": isa,
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "loadavg_before": load}


def pin_allocator() -> bool:
    """Keep freed memory in glibc's heap (no mmap per large block, no trimming), so that a fresh
    4 MB output is not 1,024 page faults. Unpinned, the faults cost 2-4x the kernel itself and
    land on whichever variant's allocation the shuffled order made fresh: the ratio then measured
    the allocator (1.04x-1.25x for the same build from run to run). Returns False off glibc."""
    from minaction._alloc import keep_freed_memory

    return keep_freed_memory()


def epilogue_bench(rounds, shape=(1, 2048, 512)):
    """Median time of the C++ activation+energy pass vs torch's activation alone, interleaved
    (allocator pinned, see :func:`pin_allocator`)."""
    from minaction.backends import ACT_CODES
    from minaction.backends import cpu as cpu_backend

    ops = cpu_backend.load()
    z = torch.randn(shape)
    scale = 1.0 / shape[1]
    torch_act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    cases = [("relu", 2), ("relu", 1), ("gelu", 2), ("silu", 2), ("tanh", 2), ("sigmoid", 2), ("gelu_tanh", 2)]
    out = {}
    for act, p in cases:
        fns = {"torch": lambda: torch_act[act](z),
               "fused": lambda: ops.act_fwd(z, ACT_CODES[act], p, scale, False)}
        naive = (lambda: torch_act[act](z).pow(2).sum()) if p == 2 else (lambda: torch_act[act](z).abs().sum())
        for f in list(fns.values()) + [naive]:
            for _ in range(20):
                f()
        # the two compared variants alone in the rounds: the naive penalty's two extra 4 MB
        # temporaries evicted z from the cache before whichever variant ran next
        t = {k: [] for k in fns}
        rng = random.Random(0)
        for _ in range(rounds):
            order = list(fns)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                t[k].append(time.perf_counter() - t0)
        t_naive = []
        for _ in range(max(5, rounds // 4)):
            t0 = time.perf_counter()
            naive()
            t_naive.append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        ratio = statistics.median(a / b for a, b in zip(t["fused"], t["torch"]))
        out[f"{act}+l{p}"] = {"fused_us": med["fused"], "torch_act_us": med["torch"],
                              "torch_act_plus_energy_us": statistics.median(t_naive) * 1e6, "ratio": ratio}
    return out


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
    elif kind == "penalty":
        minaction.set_penalty(model, lam)

        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)
    elif kind == "glue":
        # the floor of any energy term: plain layers, and the loss arithmetic of `ce + lam * total_energy`
        # (one add per extra energy layer, the mul, the add) on constant leaves: what no kernel can remove
        n = sum(isinstance(m, nn.ReLU) for m in model)
        leaves = [torch.zeros((), requires_grad=True) for _ in range(n)]

        def loss_fn(x, y):
            total = leaves[0]
            for e in leaves[1:]:
                total = total + e
            for e in leaves:
                e.grad = None
            return F.cross_entropy(model(x), y) + lam * total
    else:
        raise ValueError(kind)

    return timed_step(loss_fn, opt)


def peak_memory(kind, sizes, batch, lam):
    """Peak bytes of tensor memory created during one step and live at once (CPU), from torch's own
    memory timeline (the profiler's ``_memory_profile``: every allocation created and destroyed, once).

    Until session 22 this summed ``FunctionEvent.cpu_memory_usage``, which includes nested ops'
    allocations (``aten::linear`` and its ``aten::addmm`` both counted the same buffer): 3-5x too high,
    and ranking fused below naive when its real peak is higher."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    model = build(kind, sizes)
    step = make_step(kind, model, lam)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    step(x, y)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step(x, y)
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
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
    ap.add_argument("--variants", default="",
                    help="comma-separated variants to interleave with plain (default: all). Each variant's "
                         "model, gradients and Adam state take cache too: at 784-64 on a Zen 5 (1 MiB L2) the "
                         "penalty form measured 1.033-1.046 against plain alone and 1.052-1.090 in the full "
                         "rotation (bench/RESULTS.md, session 27)")
    ap.add_argument("--json")
    ap.add_argument("--batched", type=int, default=0, metavar="G",
                    help="G models at once: EnergyLinear(num_models=G) vs torch.baddbmm + ReLU")
    ap.add_argument("--epilogue", action="store_true",
                    help="activation+energy pass vs torch's activation alone ([1, 2048, 512])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.epilogue:
        info = machine_info()
        info["allocator_pinned"] = pin_allocator()
        res = {"machine": info, "torch": torch.__version__, "rounds": args.rounds,
               "epilogue": epilogue_bench(args.rounds)}
        res["machine"]["loadavg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(json.dumps(res["machine"]))
        print(f"{'case':12s} {'fused us':>9s} {'torch act us':>13s} {'act+energy us':>14s} {'ratio':>6s}")
        for k, r in res["epilogue"].items():
            print(f"{k:12s} {r['fused_us']:9.1f} {r['torch_act_us']:13.1f} {r['torch_act_plus_energy_us']:14.1f} "
                  f"{r['ratio']:6.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return res
    if args.batched:
        G = args.batched
        kinds = ["plain", "fused"]
        steps = {k: make_batched_step(k, build_batched(k, G, sizes), args.lam) for k in kinds}
        x = torch.randn(G, args.batch, sizes[0])
        y = torch.randint(0, sizes[-1], (args.batch,))
        return _interleave(args, kinds, steps, x, y, sizes, batched=True)
    kinds = ["plain", "naive", "fused", "penalty", "glue"] + ([] if args.no_compile else ["compiled"])
    if args.variants:
        want = [k.strip() for k in args.variants.split(",") if k.strip()]
        bad = [k for k in want if k not in kinds]
        if bad:
            ap.error(f"--variants: {', '.join(bad)} not among {', '.join(kinds)}")
        kinds = ["plain"] + [k for k in want if k != "plain"]
    steps = {k: make_step(k, build("plain" if k == "glue" else k, sizes), args.lam) for k in kinds}
    x, y = torch.randn(args.batch, sizes[0]), torch.randint(0, sizes[-1], (args.batch,))
    return _interleave(args, kinds, steps, x, y, sizes, batched=False)


def _interleave(args, kinds, steps, x, y, sizes, batched):
    info = machine_info()
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
    info["loadavg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res = {"machine": info, "torch": torch.__version__,
           "backend": minaction.backend_info("cpu")["devices"]["cpu"]["active"],
           "sizes": sizes, "batch": args.batch, "models": args.batched or 1, "rounds": args.rounds, "variants": {}}
    for k in kinds:
        row = {}
        for i, phase in enumerate(("forward", "backward", "step")):
            med = statistics.median(t[i] for t in times[k])
            ratio = statistics.median(a[i] / b[i] for a, b in zip(times[k], times["plain"]))
            row[phase] = {"median_ms": med * 1e3, "ratio_to_plain": ratio}
        row["peak_mem_mb"] = (peak_memory(k, sizes, args.batch, args.lam) / 2**20
                              if k not in ("compiled", "glue") and not batched else None)
        res["variants"][k] = row
    print(json.dumps(info))
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
