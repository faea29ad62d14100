"""The cnn's conv blocks with the fused activation + energy + max-pool op against the two-op
epilogue then ``max_pool2`` (a bench, not a test).

``EnergyConv1d/2d.forward_max_pool2`` runs ``minaction::epilogue_pool2`` on the cpu backend: one
pass writes the pooled activation and uint8 window positions (never the full-size activation),
and one backward pass writes the conv output's gradient. This times one cnn member (the study
runs the cnn's members one by one on a CPU) at the study's shapes, both ways, interleaved in one
process set up as a study worker (``trainer.init_worker(1)``: one thread, deterministic
algorithms, the pinned allocator): a training step (batch 128, cross-entropy + lambda * E,
Adam) and an evaluation forward (``eval_rows`` rows, no grad). The unfused variant is the same
model with fusion refused (as when a forward hook is registered). Prints medians and ratios::

    python bench/cnn_fused_pool.py --rounds 60
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

SHAPES = {  # dataset: (modality, input_shape, classes, vocab)
    "mnist": ("vision", (1, 28, 28), 10, None),
    "mnist_spikes": ("neuromorphic", (8, 1, 28, 28), 10, None),
    "nmnist": ("neuromorphic", (1, 6, 34, 34), 10, None),
    "ecg5000": ("physiological", (1, 140), 5, None),
    "sst2": ("text", (64,), 2, 20000),
    "20newsgroups": ("text", (256,), 20, 20000),
}


def _inputs(torch, dataset, batch, gen):
    modality, shape, classes, vocab = SHAPES[dataset]
    if vocab:
        x = torch.randint(2, vocab, (batch,) + shape, generator=gen)
    elif modality == "neuromorphic":
        x = (torch.rand((batch,) + shape, generator=gen) < 0.2).float()
    else:
        x = torch.rand((batch,) + shape, generator=gen)
    return x, torch.randint(0, classes, (batch,), generator=gen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lam", type=float, default=1e-3)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    import minaction
    from minaction import models
    from minaction.data.core import DataMeta
    from minaction.study import trainer

    trainer.init_worker(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dataset in args.datasets.split(","):
        modality, shape, classes, vocab = SHAPES[dataset]
        meta = DataMeta(dataset, modality, classes, shape, torch.int64 if vocab else torch.float32, vocab_size=vocab)
        variants = {}
        for name in ("fused", "two ops"):
            m = models.build("cnn", meta, num_models=1, seeds=[0])
            if name == "two ops":
                for conv in m.convs:
                    conv._hooks_allow_fusion = lambda: False  # as with a forward hook: self(x), then max_pool2
            variants[name] = (m, torch.optim.Adam(m.parameters(), 1e-3))
        x, y = _inputs(torch, dataset, args.batch, gen)
        xe, _ = _inputs(torch, dataset, getattr(variants["fused"][0], "eval_rows", 64), gen)

        def step(m, opt):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y) + args.lam * minaction.total_energy(m)
            loss.backward()
            opt.step()

        def evaluate(m, opt):
            with torch.no_grad():
                m(xe)

        jobs = {(v, kind): (fn, *variants[v]) for v in variants for kind, fn in (("step", step), ("eval", evaluate))}
        for fn, m, opt in jobs.values():
            for _ in range(3):
                fn(m, opt)
        times = {k: [] for k in jobs}
        for _ in range(args.rounds):
            keys = list(jobs)
            random.shuffle(keys)
            for k in keys:
                fn, m, opt = jobs[k]
                t0 = time.perf_counter()
                fn(m, opt)
                times[k].append(time.perf_counter() - t0)
        for kind in ("step", "eval"):
            a = statistics.median(times[("fused", kind)]) * 1e3
            b = statistics.median(times[("two ops", kind)]) * 1e3
            rows.append((dataset, kind, a, b, a / b))
    print("| dataset | pass | fused ms | two ops ms | fused / two ops |")
    print("| --- | --- | ---: | ---: | ---: |")
    for d, k, a, b, r in rows:
        print(f"| {d} | {k} | {a:.2f} | {b:.2f} | {r:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
