"""What a group saves by dropping its early-stopped members (a bench, not a test).

A study group trains G seeds as one model. Before, a member that early-stopped was still
computed (its term masked out of the loss) until the group's last member stopped; now the
cnn's loop of members skips it and a batched model is rebuilt without it
(``minaction.study.trainer``: ``set_active_members`` / compaction). This trains one group of
the ``full`` preset's faithful budget (its per-dataset caps, eval cadence and patience) both
ways, interleaved in one process, and prints the wall time of each, their ratio, the members'
epochs, and whether the recorded results are the same (epochs and accuracies exactly; float32
test losses to rounding)::

    python bench/shed_stopped.py --arch cnn --dataset eog_horizontal --rounds 2
    python bench/shed_stopped.py --arch mlp --dataset nmnist --train-subset 0

The saving depends on how far apart the members stop, so it is a property of the cell, not
of the machine; ``group_max_epochs * G / sum(epochs)`` is the ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _spec(arch, dataset, members, lam, train_subset):
    import tomllib

    from minaction.study import presets

    raw = tomllib.loads(presets.preset_path("full").read_text())
    raw.update(name="shed-bench", archs=[arch], datasets=[dataset], lams=[lam], seeds=list(range(members)))
    raw.pop("extra", None)
    if train_subset:
        raw["budget"]["train_subset"] = train_subset
        raw.setdefault("budget_by_dataset", {}).setdefault(dataset, {})["train_subset"] = train_subset
    return presets.load_preset(raw)


def _key(records):
    return [(r["run"]["epochs"], r["run"].get("test_acc"), r["run"]["val_acc"], r["run"].get("test_loss"))
            for r in records]


def _loss_rel_diff(a, b):
    return max((abs(x[3] - y[3]) / abs(y[3]) if x[3] is not None and y[3] else 0.0) for x, y in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--dataset", default="eog_horizontal")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=0, help="0: the whole training split (faithful)")
    a = ap.parse_args(argv)
    from minaction.study import presets, trainer

    trainer.init_worker(1)
    spec = _spec(a.arch, a.dataset, a.members, a.lam, a.train_subset)
    runs = presets.expand(spec)
    real_set, real_compact = trainer._set_active, trainer._compactable

    def keep_all(on):
        trainer._set_active = (lambda model, active: None) if on else real_set
        trainer._compactable = (lambda model, G: False) if on else real_compact

    trainer.load_splits(a.dataset, runs[0]["config"]["budget"], runs[0]["config"]["data_opts"])  # cached for both
    times = {"shed": [], "keep": []}
    keys = {}
    for r in range(a.rounds):
        for variant in (("keep", "shed") if r % 2 == 0 else ("shed", "keep")):
            keep_all(variant == "keep")
            t = time.perf_counter()
            out = trainer.train_group(runs)
            times[variant].append(time.perf_counter() - t)
            keys.setdefault(variant, _key(out))
    keep_all(False)
    epochs = [k[0] for k in keys["shed"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "arch": a.arch, "dataset": a.dataset, "members": a.members, "lam": a.lam, "rounds": a.rounds,
        "keep_s": [round(t, 2) for t in times["keep"]], "shed_s": [round(t, 2) for t in times["shed"]],
        "speedup": round(med["keep"] / med["shed"], 3),
        "ceiling": round(max(epochs) * len(epochs) / sum(epochs), 3), "epochs": epochs,
        # epochs and accuracies identical; float32 test losses equal to rounding (a member that trained on
        # alone at the end ran one-member kernels; float64 is equal to 1e-12, tests/study/test_study_compaction.py)
        "same_results": [k[:3] for k in keys["shed"]] == [k[:3] for k in keys["keep"]],
        "test_loss_max_rel_diff": float(f"{_loss_rel_diff(keys['shed'], keys['keep']):.2g}"), "load": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
