"""The report's first section: the store (budgets, runs by status, the design)."""
from __future__ import annotations

import json

import pandas as pd

from .render import fmt
from .store import DESIGN_KEYS, budget_of, budget_table, old_flops_rule


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


def _preset_design(rep, preset):
    """``(label, [spec])`` of the preset ``--preset`` names: its specification kept in the store, else its
    file; None where neither can be read."""
    raw = rep.store.meta.get(f"preset:{preset}")
    try:
        if raw is not None:
            return f"{preset} (the preset specification kept in the store)", [json.loads(raw)]
        from ..study.presets import load_preset

        return str(preset), [load_preset(preset)]
    except ValueError:
        return None


def stored_design(rep):
    """``(label, [spec, ...])``: without ``--design``, the specifications the store keeps of the presets its
    (selected) runs were recorded under, so a store that is still being filled says PARTIAL on its own;
    None where some preset's specification is not in the store."""
    names = sorted({str(p) for p in rep.store.runs_all["preset"].dropna()})
    specs = []
    for n in names:
        raw = rep.store.meta.get(f"preset:{n}")
        if raw is None:
            return None
        try:
            specs.append(json.loads(raw))
        except ValueError:
            return None
    if not specs:
        return None
    return ", ".join(names) + " (the preset specification" + ("s" if len(names) > 1 else "") + \
        " kept in the store)", specs


def _code_names(label: str) -> str:
    """A design label as shown: its preset names as code, its parenthetical note as prose."""
    names, sep, note = label.partition(" (the preset specification")  # (a --design path may hold commas)
    return f"`{names}`" + (f"{sep}{note}" if sep else "")


def _budget_key(budget):
    return None if budget is None else json.dumps(budget, sort_keys=True, separators=(",", ":"))


def coverage(rep, specs=None):
    """Against ``rep.opt.design`` (a preset name or path), or the preset specifications ``specs``: the
    design's runs per dataset x arch, how many of them finished, and the total (planned, done); None
    without a design."""
    if not rep.opt.design and not specs:
        return None
    from ..study.presets import expand

    try:
        runs = expand(rep.opt.design) if rep.opt.design else [r for sp in specs for r in expand(sp)]
    except ValueError:  # a stored specification of another version of the runner
        if rep.opt.design:
            raise
        return None
    keys = ["arch", "dataset", "lam", "seed"]
    # a design run is finished when a run of the same cell *and the same training budget* is (a smoke store
    # measured against `full` counted its runs as the design's); a run without a recorded budget (an old
    # archive) matches on its cell alone
    planned = pd.DataFrame([{**{k: r["config"][k] for k in keys},
                             "budget": _budget_key({k: v for k, v in r["config"].items() if k not in DESIGN_KEYS})}
                            for r in runs]).drop_duplicates()
    planned["lam"] = planned["lam"].astype(float).round(12)
    st = rep.store.runs
    done = st[keys].copy()
    done["lam"] = done["lam"].astype(float).round(12)
    done["budget"] = [_budget_key(budget_of(c)) for c in (st["config_json"] if "config_json" in st
                                                          else [None] * len(st))]
    exact = done[done["budget"].notna()].drop_duplicates().assign(done=1)
    loose = done[done["budget"].isna()][keys].drop_duplicates().assign(loose=1)
    cells = (planned.merge(exact, on=keys + ["budget"], how="left").merge(loose, on=keys, how="left")
             .fillna({"done": 0, "loose": 0}))
    cells["done"] = ((cells["done"] > 0) | (cells["loose"] > 0)).astype(int)
    table = (cells.groupby(["dataset", "arch"], sort=False)
             .agg(planned=("seed", "size"), done=("done", "sum")).reset_index())
    table["done"] = table["done"].astype(int)
    table["missing"] = table["planned"] - table["done"]
    return table


def _with_totals(table: pd.DataFrame) -> pd.DataFrame:
    """The coverage table with a per-dataset row (arch "all") after each dataset and the grand total."""
    rows = []
    for ds, sub in table.groupby("dataset", sort=False):
        rows += sub.to_dict("records")
        rows.append({"dataset": ds, "arch": "all", **sub[["planned", "done", "missing"]].sum().to_dict()})
    rows.append({"dataset": "all", "arch": "all", **table[["planned", "done", "missing"]].sum().to_dict()})
    return pd.DataFrame(rows)


def _missing_text(table: pd.DataFrame) -> str:
    """'mnist (all 4 architectures, 40 runs); ecg200: cnn (3 runs)' for the cells with missing runs."""
    parts = []
    for ds, sub in table.groupby("dataset", sort=False):
        miss = sub[sub["missing"] > 0]
        if miss.empty:
            continue
        if len(miss) == len(sub) and (miss["done"] == 0).all():
            parts.append(f"{ds} (all {len(sub)} architectures, {int(miss['missing'].sum())} runs)")
        else:
            parts.append(f"{ds}: " + ", ".join(f"{r.arch} ({r.missing} runs)" for r in miss.itertuples()))
    return "; ".join(parts)


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
    cov, label = coverage(rep), rep.opt.design
    if cov is None and not rep.opt.design:
        # --preset P: P's own design, not every preset's; else the presets the store keeps for its runs
        stored = _preset_design(rep, rep.opt.preset) if rep.opt.preset else stored_design(rep)
        if stored is not None:
            label, specs = stored
            cov = coverage(rep, specs)
            if cov is not None and int(cov["done"].sum()) >= int(cov["planned"].sum()):
                cov = None  # complete: a report without --design says nothing more than before
    rep.coverage = cov
    if cov is not None:
        planned, done = int(cov["planned"].sum()), int(cov["done"].sum())
        rel_cov = rep.csv("coverage", _with_totals(cov))
        if done < planned:
            moving = ("" if rep.opt.lam is not None else
                      f" The main λ (the λ with the most finished runs, which Finding 3 reads, and Finding 1 where λ "
                      f"is not a factor) is λ = {fmt(rep.main_lam)} now; it may change as the study fills in "
                      f"(`--lam` fixes it).")
            rep.doc.p(f"**PARTIAL: {done} of the {planned} runs of the design {_code_names(label)} have finished.** "
                      f"Missing: {_missing_text(cov)}. Every verdict below reads the finished runs only; a "
                      f"finding whose design lacks a cell says *not comparable* and names it (table: `{rel_cov}`)."
                      + moving)
            rep.notices.append(f"PARTIAL: {done} of the {planned} runs of the design have finished; see the report's "
                               f"first paragraph")
        else:
            rep.doc.p(f"Complete: all {planned} runs of the design {_code_names(label)} have finished (table: "
                      f"`{rel_cov}`).")
    if old_flops_rule(rep.store):
        rep.doc.p("**This store's FLOPs are counted by an older rule**, which favours physics_lagrangian against the "
                  "MLP; every FLOPs figure below (Finding 3, the summary, the efficiency figure) uses it. "
                  "`minaction study recount-flops --db STORE` recounts them without retraining.")
        rep.notices.append("FLOPs counted by an older rule: run `minaction study recount-flops --db STORE` "
                           "before reading Finding 3")
    st = ra.groupby("status").size().rename("runs").reset_index()
    rel = rep.csv("runs_by_status", st)
    rep.doc.h(1, "The store")
    presets = ", ".join(sorted(str(p) for p in ra["preset"].dropna().unique())) or "n/a"
    sel = f" (selected: `{rep.store.selection}`)" if rep.store.selection else ""
    source = (f"Source `{rep.opt.source}`" if rep.opt.source else f"Store `{rep.store.path}`")
    rep.doc.p(f"{source}, preset(s) `{presets}`{sel}. Only finished runs (status `done`) are "
               "analysed; failed and diverged runs are counted here and nowhere else. Every dataset's runs "
               "share one training budget (runs of different budgets are never pooled; a store that mixes "
               "them is refused unless `--preset` or `--budget` picks one).")
    rep.doc.table(budgets.drop(columns="all_fields"), rel_b,
                   "Training budgets: one per dataset, never pooled (every field in the CSV's all_fields column)")
    rep.doc.table(st, rel, "Runs by status")
    _provenance(rep, ra)
    bad = ra[ra["status"].isin(["diverged", "failed"])]
    if len(bad):  # excluded runs could bias a comparison if one architecture loses more of them
        per = bad.groupby(["status", "arch"]).size()
        rep.doc.p("**Runs left out of every analysis, by architecture:** "
                  + "; ".join(f"{st} {a}: {n}" for (st, a), n in per.items())
                  + ". An architecture that diverges or fails more often than the others is compared on its "
                    "surviving runs only, which flatters it; read its numbers with that in mind.")
    design = (runs.groupby(["modality", "dataset"])
              .agg(archs=("arch", "nunique"), lambdas=("lam", "nunique"), seeds=("seed", "nunique"),
                   runs=("run_id", "size")).reset_index())
    rel = rep.csv("design", design)
    rep.doc.table(design, rel, "Design: finished runs per dataset")
    rep.doc.p("Numbers from the paper are labelled *paper*; every other number is ours, measured on this "
               "store. The paper's methods, code and tables are not public: where it is silent, the "
               "definitions this project adopts are listed under *Definitions* and named beside the numbers.")


def _provenance(rep, ra) -> None:
    """Where the runs came from: per code version, torch, ISA and thread count (runs are reproducible bit for bit
    only within one), and how many runs were recorded before the store kept it."""
    prov = rep.store.provenance
    rows = []
    for rid in ra["run_id"]:
        p = prov.get(rid)
        rows.append({k: (p or {}).get(k) for k in ("commit", "code", "torch", "isa", "cpu", "cpu_id", "threads")}
                    | {"known": p is not None})
    df = pd.DataFrame(rows)
    known = df[df["known"]]
    missing = int((~df["known"]).sum())
    if known.empty:
        rep.doc.p(f"**Provenance:** none of these {len(df)} runs records the code, torch build, kernel ISA or thread "
                  "count that trained it (stores written by earlier versions of minaction keep none; a run is "
                  "reproducible bit for bit only with all of them the same, docs/study.md).")
        return
    cols = ["commit", "code", "torch", "isa", "cpu", "cpu_id", "threads"]
    tab = known.fillna("n/a").astype(str).groupby(cols).size().rename("runs").reset_index()
    rel = rep.csv("provenance", tab)
    more = (" Runs recorded before the store kept it (by earlier versions of minaction, or imported from their "
            "archives) are not in the table." if missing else "")
    rep.doc.table(tab, rel, "Where the runs came from: code (commit, and a hash of the sources that define a run's "
                            "numbers), torch build, kernel ISA, CPU (model name, and vendor/family/model where "
                            "recorded: `n/a` for runs of earlier versions) and torch threads. Runs are reproducible bit for "
                            "bit only within one row of the same code, torch, ISA and threads." + more)
