"""The faithful ``full`` study's wall time with early stopping, from a plan and finished runs (a bench).

``minaction study plan`` prices every (architecture, dataset) block at its epoch cap: an upper
bound. Early stopping ends most runs well before the cap, and how it does so matters for a
grouped trainer: a group used to compute every member until its last one stopped, and now
sheds stopped members (docs/study.md, "A stopped member costs nothing"). This weights the
plan's measured seconds per member-epoch by the epochs that finished runs of a store really
trained, per (architecture, dataset)::

    python bench/full_estimate.py --plan-json bench/data/plans_full_avx512_2026-12-06.json \\
        --store docs/replication/factorial/runs.jsonl.gz

``--plan-json``: ``minaction study plan --preset full --json`` output (or a file of the same
rows; or ``{"plans": [...]}``, several), repeatable: with several plans (``--refresh`` runs), each
block's median cost is used; ``--store``: a study store (``.sqlite``) or an archive (``.jsonl.gz``,
``minaction study export``). A block without finished runs borrows the epochs of a stand-in,
named in the output: a spike-encoded dataset its source dataset's, a missing architecture the
mean over the architectures that have that dataset. Per block and in total it prints the wall
time (divided by the plan's workers) at the caps, with every member computed until its group's
last one stopped ("before"), and with stopped members shed ("now"). An estimate, not a run: it
assumes the stopping epochs of the store's λ values hold for every λ of ``full``.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import sqlite3
import statistics
from pathlib import Path

SPIKE_SOURCE = {"mnist_spikes": "mnist", "fashion_mnist_spikes": "fashion_mnist"}


def finished_runs(path):
    """[(arch, dataset, lam, group key, epochs)] of the store's done runs (ecg200's fixed epochs included)."""
    path = Path(path)
    if path.suffix == ".sqlite":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("select arch, dataset, lam, epochs from runs where status = 'done'").fetchall()
        finally:
            con.close()
    else:
        rows = []
        with gzip.open(path, "rt") as f:
            for line in f:
                rec = json.loads(line)
                run = rec.get("run", rec)
                if run.get("status") == "done":
                    rows.append((run["arch"], run["dataset"], run["lam"], run["epochs"]))
    return [(arch, dataset, float(lam), int(epochs)) for arch, dataset, lam, epochs in rows]


def stopping_stats(runs):
    """Per (arch, dataset): mean epochs per run, and mean over groups (arch, dataset, lam) of the
    group's max epochs — the groups of ``full`` are the seeds of one λ."""
    per_group = collections.defaultdict(list)
    for arch, dataset, lam, epochs in runs:
        per_group[(arch, dataset, lam)].append(epochs)
    stats = collections.defaultdict(lambda: {"epochs": [], "group_max": []})
    for (arch, dataset, _), eps in per_group.items():
        stats[(arch, dataset)]["epochs"].extend(eps)
        stats[(arch, dataset)]["group_max"].append(max(eps))
    return {k: (statistics.mean(v["epochs"]), statistics.mean(v["group_max"]), len(v["epochs"]))
            for k, v in stats.items()}


def estimate(plan_rows, stats, workers):
    lines, tot = [], collections.Counter()
    caps = {(r["arch"], r["dataset"]): r["epochs_cap"] for r in plan_rows}
    for r in plan_rows:
        arch, ds = r["arch"], r["dataset"]
        src, note = (arch, ds), ""
        if src not in stats and SPIKE_SOURCE.get(ds):
            src, note = (arch, SPIKE_SOURCE[ds]), f"epochs of {arch} x {SPIKE_SOURCE[ds]}"
        if src in stats:
            mean_ep, max_ep, n = stats[src]
        else:
            base = SPIKE_SOURCE.get(ds, ds)
            # the other architectures' epochs on this dataset, as fractions of their caps
            others = [(stats[k], caps[k]) for k in stats if k[1] == base and caps.get(k)]
            if not others:
                mean_ep = max_ep = float(r["epochs_cap"])
                n, note = 0, "no finished runs: at the cap"
            else:
                fm = statistics.mean(s[0] / c for s, c in others)
                fx = statistics.mean(s[1] / c for s, c in others)
                mean_ep, max_ep, n = fm * r["epochs_cap"], fx * r["epochs_cap"], 0
                note = f"the other architectures' epochs on {base}, as fractions of the cap"
        runs, me = int(r["runs"]), float(r["member_epoch_s"])
        row = {"arch": arch, "dataset": ds, "cap_h": runs * me * r["epochs_cap"] / 3600 / workers,
               "before_h": runs * me * max_ep / 3600 / workers, "now_h": runs * me * mean_ep / 3600 / workers,
               "mean_epochs": round(mean_ep, 1), "group_max_epochs": round(max_ep, 1), "cap": r["epochs_cap"],
               "from_runs": n, "stand_in": note}
        for k in ("cap_h", "before_h", "now_h"):
            tot[k] += row[k]
        lines.append(row)
    return lines, dict(tot)


def median_rows(plans):
    """One plan's rows with each block's ``member_epoch_s`` the median over ``plans`` (repeated
    ``study plan --refresh`` runs: a block is timed from a few steps, so single plans vary by
    5-10% per block)."""
    rows = [dict(r) for r in plans[0]["rows"]]
    for i, r in enumerate(rows):
        vals = []
        for p in plans:
            q = p["rows"][i]
            if (q["arch"], q["dataset"]) != (r["arch"], r["dataset"]):
                raise ValueError("the plans list different blocks: give plans of the same preset")
            vals.append(float(q["member_epoch_s"]))
        r["member_epoch_s"] = statistics.median(vals)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-json", required=True, action="append",
                    help="a plan (repeatable: each block's median cost over the plans is used)")
    ap.add_argument("--store", required=True, action="append", help="a .sqlite store or .jsonl.gz archive (repeatable)")
    ap.add_argument("--workers", type=int, default=None, help="default: the plan's")
    a = ap.parse_args(argv)
    plans = []
    for f in a.plan_json:  # a plan, or a file of several ({"plans": [...]}: bench/data's repeated plans)
        d = json.loads(Path(f).read_text())
        plans.extend([dict(d, **p) for p in d["plans"]] if "plans" in d else [d])
    plan = plans[0]
    workers = a.workers or int(plan.get("workers") or 1)
    runs = [r for s in a.store for r in finished_runs(s)]
    stats = stopping_stats(runs)
    lines, tot = estimate(median_rows(plans), stats, workers)
    print(f"plan: {', '.join(a.plan_json)} ({plan.get('machine', '?')}, {plan.get('measured', '?')}); "
          f"stores: {', '.join(a.store)} ({len(runs)} finished runs); {workers} workers")
    if len(plans) > 1:
        each = [estimate(p["rows"], stats, workers)[1] for p in plans]
        print("each plan alone (at caps / before / now h): "
              + "; ".join(f"{t['cap_h']:.2f} / {t['before_h']:.2f} / {t['now_h']:.2f}" for t in each)
              + "; below, each block's median")
    print("| arch × dataset | cap | group max epochs | mean epochs | at caps h | before h | now h | stand-in |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in lines:
        print(f"| {r['arch']} × {r['dataset']} | {r['cap']} | {r['group_max_epochs']} | {r['mean_epochs']} | "
              f"{r['cap_h']:.2f} | {r['before_h']:.2f} | {r['now_h']:.2f} | {r['stand_in']} |")
    print(f"| **total (wall, {workers} workers)** | | | | **{tot['cap_h']:.2f}** | **{tot['before_h']:.2f}** | "
          f"**{tot['now_h']:.2f}** | |")
    return {"rows": lines, "total": tot, "workers": workers}


if __name__ == "__main__":
    main()
