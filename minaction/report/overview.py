"""The report's first section: the store (budgets, runs by status, the design)."""
from __future__ import annotations

import json

import pandas as pd

from .store import budget_table


def quick_reasons(rep, budgets: pd.DataFrame) -> list:
    """Why this store's budget cannot test the paper's claims (empty: it can)."""
    reasons = []
    every = ", ".join(sorted(str(d) for d in rep.store.runs_all["dataset"].unique()))
    for r in budgets.itertuples():
        f = json.loads(r.all_fields)
        where = "every dataset" if r.datasets == every else r.datasets
        if r.budget.startswith("unknown"):
            reasons.append(f"{where}: the training budget is not recorded")
            continue
        small = []
        if f.get("train_subset", 0):
            small.append(f"train_subset={f['train_subset']} training samples, not the full training split")
        if f.get("test_subset", 0):
            small.append(f"test_subset={f['test_subset']} test samples, not the full official test split")
        if small:
            reasons.append(f"{where}: " + " and ".join(small))
    for p in sorted({str(x) for x in rep.store.runs_all["preset"].dropna()}):
        if any(w in p.lower() for w in rep.opt.quick_preset_words):
            reasons.append(f"preset `{p}` is a quick-look preset")
    return list(dict.fromkeys(reasons))


def section(rep) -> None:
    """Write the store overview (budgets, runs by status, the design) and, for a quick budget, the
    banner that says its verdicts do not test the paper."""
    ra = rep.store.runs_all
    runs = rep.store.runs
    budgets = budget_table(ra, rep.store.budgets)
    rel_b = rep.csv("budgets", budgets)
    quick = quick_reasons(rep, budgets)
    if quick:
        rep.doc.p("**This report's training budget is too small to test the paper's claims** ("
                   + "; ".join(quick) + "). Its verdicts describe this budget only: undertrained models can "
                   "gain accuracy with λ and reach the target in fewer epochs for the wrong reasons. Use a "
                   "faithful preset (full training split, full official test split, trained to convergence) "
                   "before comparing with the paper.")
    st = ra.groupby("status").size().rename("runs").reset_index()
    rel = rep.csv("runs_by_status", st)
    rep.doc.h(1, "The store")
    presets = ", ".join(sorted(str(p) for p in ra["preset"].dropna().unique())) or "n/a"
    sel = f" (selected: `{rep.store.selection}`)" if rep.store.selection else ""
    rep.doc.p(f"Store `{rep.store.path}`, preset(s) `{presets}`{sel}. Only finished runs (status `done`) are "
               "analysed; failed and diverged runs are counted here and nowhere else. Every dataset's runs "
               "share one training budget (runs of different budgets are never pooled; a store that mixes "
               "them is refused unless `--preset` or `--budget` picks one).")
    rep.doc.table(budgets.drop(columns="all_fields"), rel_b,
                   "Training budgets: one per dataset, never pooled (every field in the CSV's all_fields column)")
    rep.doc.table(st, rel, "Runs by status")
    design = (runs.groupby(["modality", "dataset"])
              .agg(archs=("arch", "nunique"), lambdas=("lam", "nunique"), seeds=("seed", "nunique"),
                   runs=("run_id", "size")).reset_index())
    rel = rep.csv("design", design)
    rep.doc.table(design, rel, "Design: finished runs per dataset")
    rep.doc.p("Numbers from the paper are labelled *paper*; every other number is ours, measured on this "
               "store. The paper's methods, code and tables are not public: where it is silent, the "
               "definitions this project adopts are listed under *Definitions* and named beside the numbers.")
