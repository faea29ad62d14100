"""Does ``minaction study plan`` predict the wall time of a real slice? (a bench, not a test)

Measures, in one process and under the same conditions: the plan's estimate for a slice
(one architecture x dataset group, a small train subset, a fixed number of epochs, no early
stopping) and the actual time of training that group with the trainer. Prints both and
their ratio; the issue's acceptance is |ratio - 1| <= 0.3. Timing depends on machine load,
so this is never asserted in the test suite (tests/study/test_study_faithful.py checks the
plan's step and evaluation counts exactly instead)::

    python bench/bench_plan.py --arch mlp --dataset mnist --members 10 --train-subset 4000 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    a = ap.parse_args(argv)
    os.environ.setdefault("MINACTION_CACHE", tempfile.mkdtemp())  # measure afresh
    from minaction.study import plan, presets, trainer

    trainer.init_worker(1)
    spec = presets.load_preset({"name": "plan-bench", "archs": [a.arch], "datasets": [a.dataset], "lams": [0.0],
                                "seeds": list(range(a.members)), "group_by": "seed", "max_group": a.members,
                                "budget": {"name": "bench", "epochs": a.epochs, "batch_size": 128,
                                           "train_subset": a.train_subset, "val_subset": 1000, "test_subset": 1000,
                                           "eval_every": a.eval_every, "patience_epochs": 0,
                                           "eval_batch_size": 1000}})
    trainer.load_splits(a.dataset, spec["budget"], {})  # data in memory for both (the plan loads it too)
    p = plan.plan(spec, workers=1, refresh=True)
    t = time.perf_counter()
    trainer.train_group(presets.expand(spec))
    measured = time.perf_counter() - t
    est = p["est_serial_s"]
    print(json.dumps({"arch": a.arch, "dataset": a.dataset, "members": a.members, "train_subset": a.train_subset,
                      "epochs": a.epochs, "estimate_s": round(est, 2), "measured_s": round(measured, 2),
                      "ratio": round(est / measured, 3), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
