"""Rate-coded spikes from the C++ generator against ``torch.rand`` (a bench, not a test).

``SpikeDataset.encode`` draws the spikes of every batch of ``mnist_spikes`` /
``fashion_mnist_spikes``. ``torch.rand`` on a CPU generator is a serial, locked, per-element
kernel (~3 ns a number); once the C++ kernels are loaded the dataset draws the same numbers with
``minaction::rate_spikes`` (equal bit for bit: tests/data). This times, in one process set up as a
study worker, both ways interleaved: one member's batch (128 x T = 8 x 784) drawn, and one
member-epoch of a G = 10 group of ``--arch`` on the real dataset (``bench/study_speedup.py``'s
profile, which needs the dataset; skipped with ``--no-epoch``)::

    python bench/spike_draw.py --rounds 40 --arch mlp,cnn
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--arch", default="mlp", help="comma-separated architectures for the member-epoch rows")
    ap.add_argument("--dataset", default="mnist_spikes")
    ap.add_argument("--no-epoch", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from minaction.backends import cpu
    from minaction.data import core
    from minaction.data.core import DataMeta, SpikeDataset
    from minaction.study import trainer

    trainer.init_worker(1)
    cpu.load()
    real = core._loaded_cpu_ops

    def use(fast: bool):
        core._loaded_cpu_ops = real if fast else (lambda: None)

    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    meta = DataMeta("s", "neuromorphic", 10, (8, 1, 28, 28), torch.float32, spike_encoded=True)
    ds = SpikeDataset(x, torch.zeros(128, dtype=torch.int64), meta, "train")
    times = {True: [], False: []}
    for r in range(args.rounds):
        for fast in random.sample([True, False], 2):
            use(fast)
            t = time.perf_counter()
            ds.encode(x, seed=r, batch_index=r)
            times[fast].append(time.perf_counter() - t)
    use(True)
    a, b = (statistics.median(times[k]) * 1e3 for k in (True, False))
    print("| what | C++ (rate_spikes) | torch.rand | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one member's batch [128, 8, 1, 28, 28] | {a:.3f} ms | {b:.3f} ms | {a / b:.3f} |")
    if not args.no_epoch:
        sys.path.insert(0, str(Path(__file__).parent))
        from study_speedup import profile_member_epoch

        for arch in args.arch.split(","):
            res = {}
            for fast in (True, False, True, False):
                use(fast)
                res.setdefault(fast, []).append(profile_member_epoch(arch, args.dataset, steps=32)["member_epoch_s"])
            use(True)
            a, b = min(res[True]), min(res[False])
            print(f"| {arch} x {args.dataset}: one member-epoch (G = 10, best of 2) | {a:.3f} s | {b:.3f} s | "
                  f"{a / b:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
