"""The cnn's cost per member: G members batched in one module against a loop of G separate members.

One training step as the study's trainer takes it (forward of a 128-sample batch, per-member
cross-entropy + lam * E summed, backward, fused Adam step), at the study's default
(parameter-matched) widths, on random tensors of each modality's real shape:

* image  (1, 28, 28), 10 classes (MNIST; 2-D stem)
* series (1, 140), 5 classes (ECG5000; 1-D stem)
* text   (64,) ids, vocabulary 13,395, 2 classes (SST-2; embedding channels, 1-D stem)

``batched``: ``models.build("cnn", meta, num_models=G, batched=True)`` and one optimizer; ``loop``: G
one-member models, each with its own optimizer, stepped one after another. The two are
interleaved (alternating which goes first) for ``--rounds`` rounds of ``--steps`` steps;
the table gives medians per step and per member, and the member-epoch cost on the full
training split (MNIST 60,000, ECG5000 500, SST-2 67,349 samples). ``--layout`` also times
the batched 2-D conv part (conv, activation, energy, max-pool; forward and backward) in the
contiguous (NCHW) layout against channels-last. ``--profile`` prints where a batched step's
time goes. ``uptime`` is recorded before and after: other jobs load the shared machine.

    python bench/cnn_batched.py --threads 1 --rounds 5 --steps 3 --layout --profile
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

MODALITIES = {
    "image": dict(name="mnist", modality="vision", num_classes=10, input_shape=(1, 28, 28), train=60000),
    "series": dict(name="ecg5000", modality="physiological", num_classes=5, input_shape=(1, 140), train=500),
    "text": dict(name="sst2", modality="text", num_classes=2, input_shape=(64,), vocab_size=13395, train=67349),
}


class Meta:
    def __init__(self, **kw):
        kw.pop("train", None)
        self.vocab_size = None
        self.__dict__.update(kw)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def make_batch(meta, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) + tuple(meta.input_shape)
    if meta.modality == "text":
        x = torch.randint(2, meta.vocab_size, shape, generator=g)
        x[:, 40:] = 0  # padded tail, as short sentences are
    else:
        x = torch.rand(shape, generator=g)
    return x, torch.randint(0, meta.num_classes, (B,), generator=g)


def batched_stepper(meta, G, lam=1e-4):
    import minaction
    from minaction import models

    model = models.build("cnn", meta, num_models=G, seeds=range(G), batched=True)
    assert model.batched
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    lam_t = torch.full((G,), lam)

    def step(x, y):
        logits = model(x)
        B, C = y.shape[0], logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, C), y.repeat(G), reduction="none").view(G, B).mean(1)
        loss = (ce + lam_t * minaction.total_energy(model)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, model


def loop_stepper(meta, G, lam=1e-4):
    import minaction
    from minaction import models

    members = [models.build("cnn", meta, seeds=[g]) for g in range(G)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in members]

    def step(x, y):
        for m, o in zip(members, opts):
            loss = F.cross_entropy(m(x), y) + lam * minaction.total_energy(m)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
    return step


def time_steps(step, x, y, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(x, y)
        out.append(time.perf_counter() - t0)
    return out


def conv_part(G, B, channels_last):
    """The batched image model's conv part in plain torch ops (conv, relu, energy, pool x2),
    forward + backward, in one memory layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(B, 1, 28, 28).contiguous(memory_format=fmt)
    w1 = (torch.randn(G * 16, 1, 3, 3) / 3).contiguous(memory_format=fmt).requires_grad_()
    w2 = (torch.randn(G * 32, 16, 3, 3) / 12).contiguous(memory_format=fmt).requires_grad_()
    b1, b2 = torch.zeros(G * 16, requires_grad=True), torch.zeros(G * 32, requires_grad=True)

    def step():
        h = torch.relu(F.conv2d(x, w1, b1, padding=1))
        e = h.square().sum()
        h = torch.relu(F.conv2d(F.max_pool2d(h, 2), w2, b2, padding=1, groups=G))
        e = e + h.square().sum()
        (e + F.max_pool2d(h, 2).sum()).backward()
    return step


def profile_step(step, x, y, n=3):
    from torch.profiler import profile

    step(x, y)
    with profile() as p:
        for _ in range(n):
            step(x, y)
    rows = sorted(p.key_averages(), key=lambda r: -r.self_cpu_time_total)
    total = sum(r.self_cpu_time_total for r in rows)
    print(f"  {'op':<58} {'self ms/step':>12} {'share':>6}")
    for r in rows[:14]:
        print(f"  {r.key[:58]:<58} {r.self_cpu_time_total / 1e3 / n:12.1f} {r.self_cpu_time_total / total:6.1%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--G", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=list(MODALITIES))
    ap.add_argument("--layout", action="store_true", help="also compare NCHW and channels-last (2-D conv part)")
    ap.add_argument("--profile", action="store_true", help="print where a batched step's time goes")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory for reuse (no mmap per large tensor, no trimming)")
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 1 << 62) == 1  # M_MMAP_MAX=0, M_TRIM_THRESHOLD
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    G, B = args.G, args.batch
    print(f"# cnn batched (G={G}) vs loop of {G}; batch {B}, {args.threads} torch thread(s), torch {torch.__version__}")
    print(f"# keep freed memory: {args.keep_freed_memory}; load before: {uptime()}")
    rows = []
    for name in args.modalities:
        spec = MODALITIES[name]
        meta = Meta(**spec)
        x, y = make_batch(meta, B)
        bstep, model = batched_stepper(meta, G)
        lstep = loop_stepper(meta, G)
        bstep(x, y), lstep(x, y)  # warm-up (first-call allocations, extension load)
        tb, tl = [], []
        for r in range(args.rounds):
            order = [(bstep, tb), (lstep, tl)] if r % 2 == 0 else [(lstep, tl), (bstep, tb)]
            for step, acc in order:
                acc.extend(time_steps(step, x, y, args.steps))
        mb, ml = statistics.median(tb), statistics.median(tl)
        steps = math.ceil(spec["train"] / B)
        rows.append((name, meta, model, mb, ml, steps, spec["train"]))
        print(f"# {name}: batched steps {[round(t * 1e3) for t in tb]} ms; loop {[round(t * 1e3) for t in tl]} ms",
              flush=True)
        if args.profile:
            print(f"## where a batched {name} step goes (G={G}, torch.profiler, self CPU time):")
            profile_step(bstep, x, y)
    print()
    print(f"| modality (input) | width | batched step, G={G} | loop of {G} | per member-step batched / loop | "
          f"speed-up | member-epoch on full train (N) batched / loop |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, meta, model, mb, ml, steps, n in rows:
        print(f"| {name} {tuple(meta.input_shape)} | {model.width} | {mb * 1e3:.0f} ms | {ml * 1e3:.0f} ms | "
              f"{mb / G * 1e3:.1f} / {ml / G * 1e3:.1f} ms | {ml / mb:.2f}x | "
              f"{mb / G * steps:.1f} / {ml / G * steps:.1f} s ({n:,}) |")
    if args.layout:
        fns = {False: conv_part(G, B, False), True: conv_part(G, B, True)}
        for f in fns.values():
            f()
        acc = {False: [], True: []}
        for r in range(args.rounds):
            for cl in ((False, True) if r % 2 == 0 else (True, False)):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fns[cl]()
                    acc[cl].append(time.perf_counter() - t0)
        a, c = statistics.median(acc[False]), statistics.median(acc[True])
        print(f"\nlayout, batched 2-D conv part (G={G}, batch {B}, fwd+bwd): contiguous {a * 1e3:.0f} ms, "
              f"channels-last {c * 1e3:.0f} ms (channels-last / contiguous = {c / a:.2f})")
    print(f"# load after: {uptime()}")


if __name__ == "__main__":
    main()
