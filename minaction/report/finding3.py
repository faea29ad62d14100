"""Finding 3: training efficiency (optimizer steps, samples and FLOPs to a target accuracy),
the energy-first architectures against the best conventional baseline. The numbers come
from :mod:`.efficiency`; this module writes the section."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .efficiency import (HEADLINE, NAMES, TIME_METRICS, TIME_WHAT, arch_summary, dataset_gains, efficiency_gains,
                         first_eval_datasets, per_run_efficiency, time_gains_side_by_side, verdict, verdict_table)
from .context import sentence
from .paper import PAPER
from .store import old_flops_rule
from .render import ci as _ci
from .render import fmt


#: metrics of the Finding 3 tables: the headline ones, then the secondary ones (wall time on a shared machine, each
#: stall-robust and on the raw clock)
SECONDARY = ("epochs", "time", "time_clock", "acc_per_s", "acc_per_s_clock")


def target_text(opt) -> str:
    """The target accuracy as the report names it beside every Finding 3 number."""
    whose = ("on the dataset (any architecture)" if opt.target_by == "dataset"
             else "of the same architecture on the dataset")
    return f"{fmt(100 * opt.target_frac)}% of the best final validation accuracy {whose} at the same λ"


def eval_interval_text(rep) -> str:
    """'100 on fashion_mnist, mnist; 2 on nmnist': the runs' ``eval_every`` (optimizer steps between
    validation evaluations) per dataset, from their budgets; empty when a budget does not record it."""
    from .store import _flat

    runs, budgets = rep.store.runs, rep.store.budgets
    per = {}
    for bid, g in runs.groupby("budget_id", sort=True) if "budget_id" in runs else ():
        ev = _flat(budgets.get(bid)).get("eval_every")
        if ev is None:
            return ""
        per.setdefault(int(ev), set()).update(str(d) for d in g["dataset"].unique())
    if not per:
        return ""
    parts = [f"{ev} on {', '.join(sorted(ds))}" for ev, ds in sorted(per.items(), reverse=True)]
    return "; ".join(parts)


def section(rep) -> None:
    """Write Finding 3 (steps, samples, FLOPs to target: energy-first against conventional) into ``rep``."""
    opt, d = rep.opt, rep.doc
    d.h(1, "Finding 3: training efficiency, energy-first against the best conventional baseline")
    claim = (f"5–33% within-modality training-efficiency gains ({', '.join(opt.energy_first)} vs "
             f"{', '.join(opt.conventional)})")
    paper = f"{PAPER['gain_lo_pct']}–{PAPER['gain_hi_pct']}%"
    runs = rep.store.runs
    evals = getattr(rep.store, "evals", None)
    eff = per_run_efficiency(runs, rep.store.epochs, opt.target_frac, evals=evals, target_by=opt.target_by)
    if eff.empty:
        d.p(rep.verdict(3, claim, paper, "n/a", "not comparable", "the store has no learning curves (evals or "
                                                                "epochs rows)."))
        return
    lam = rep.main_lam
    metric = opt.efficiency_metric if opt.efficiency_metric in HEADLINE else "flops"
    rel_runs = rep.csv("efficiency_runs", eff)
    summ = arch_summary(eff)
    rel_s = rep.csv("efficiency_by_arch", summ)
    has_steps = eff["steps_to_target"].notna().any()
    interval = eval_interval_text(rep)
    when = (f"evaluated every `eval_every` optimizer steps ({interval}) and at each epoch end" if interval
            else "evaluated at each epoch end")
    d.p(f"Target accuracy: {target_text(opt)} (option `target_by` = {opt.target_by}). Per run: optimizer steps, "
        f"training samples and training FLOPs (per sample, measured on one training step: every matrix product "
        f"and convolution of the forward and backward, elementwise work not counted) until "
        f"the validation accuracy, {when}, first reaches the target (per-run table `{rel_runs}`). A count to the "
        f"target is a multiple of the evaluation interval, so where runs reach it within a few evaluations one "
        f"seed needing one evaluation more moves an architecture's mean by the interval / the number of seeds. "
        f"Training time to target and accuracy per training second (final test accuracy / training time, the "
        f"optimizer steps only) are secondary, each shown twice, side by side: stall-robust and on the raw clock "
        f"(the machine was shared). {TIME_WHAT} They get no CI: the seeds of one batched group share one clock (a "
        f"batched step's time is split equally among its members), so they are not independent replicates of a "
        f"time. "
        f"An architecture's value is the "
        f"mean over its runs that reached the target, none when fewer than half did. Gain on a dataset: "
        f"(baseline − energy-first) / baseline against the conventional architecture ({', '.join(opt.conventional)})"
        f" with the lowest value there, only where both reached the target; a modality's gain is the mean over "
        f"its compared datasets; {fmt(100 * opt.ci)}% percentile bootstrap CI over seeds ({opt.n_boot} resamples). "
        f"λ = {fmt(lam)}. Headline metric: {NAMES[metric]}.")
    if old_flops_rule(rep.store):
        d.p(f"**These FLOPs are counted by an older rule** (3 × the forward FLOPs of the energy layers, before "
            f"minaction counted a training step): it missed physics_lagrangian's force product and charged first "
            f"layers an input gradient they do not compute, which favours physics_lagrangian against the MLP "
            f"(bench/RESULTS.md, 'Training FLOPs'). `minaction study recount-flops --db STORE` recounts them "
            f"without retraining.")
    other = sorted(set(runs["arch"]) - set(opt.energy_first) - set(opt.conventional)) if "arch" in runs else []
    if other:
        d.p(f"Not compared (neither energy-first nor conventional): {', '.join(other)}. `--energy-first` / "
            f"`--conventional` (ReportOptions.energy_first / conventional) assign an architecture to a group.")
    if not has_steps:
        d.p("This store has no evals table (written before the trainer recorded evaluations every N steps): "
            "steps, samples and FLOPs to target are unknown; only epochs and time are shown.")
    blind = eff[(eff["lam"] == lam) & eff["final_val"].isna()]
    if len(blind):  # named, not silently "did not reach" (a statistician's review)
        where = ", ".join(f"{a} on {ds} ({n})" for (a, ds), n in blind.groupby(["arch", "dataset"]).size().items())
        d.p(f"**{len(blind)} finished run(s) have no finite validation accuracy on their learning curve** ({where}): "
            f"they count as not reaching the target in the `reached` column below.")
    s = summ[summ["lam"] == lam]
    disp = pd.DataFrame({"dataset": s["dataset"], "arch": s["arch"], "reached": [f"{a}/{n}" for a, n in zip(
        s["n_reached"], s["n"])], "target": s["target"].map(fmt), "steps": s["steps_to_target"].map(fmt),
        "samples": s["samples_to_target"].map(fmt), "FLOPs": s["flops_to_target"].map(fmt),
        "time (s), robust": s["time_to_target_s"].map(fmt), "time (s), clock": s["time_to_target_clock_s"].map(fmt),
        "acc / s, robust": s["acc_per_s"].map(fmt), "acc / s, clock": s["acc_per_s_clock"].map(fmt)})
    d.table(disp, rel_s, f"Per architecture at λ = {fmt(lam)}: means to target (runs that reached it); time: "
                         f"training time to target, stall-robust (steps to target × the run's median seconds per "
                         f"step) and on the raw clock (as recorded); acc / s: mean final test accuracy per training "
                         f"second (all runs), stall-robust and raw clock. A run's time is its optimizer steps only, "
                         f"its equal share of its batched group's step time, so the runs of one group share one "
                         f"clock")
    kw = dict(n_boot=opt.n_boot, seed=opt.seed, ci=opt.ci, energy_first=opt.energy_first,
              conventional=opt.conventional)
    per_ds = pd.concat([dataset_gains(eff, lam, m, **kw) for m in HEADLINE + SECONDARY], ignore_index=True)
    rel_d = rep.csv("efficiency_gains_by_dataset", per_ds)
    h = per_ds[per_ds["metric"] == metric]
    disp = pd.DataFrame({"dataset": h["dataset"], "arch": h["arch"], "baseline": h["baseline"].fillna("—"),
                         f"gain % [{fmt(100 * opt.ci)}% CI]": [
                             _ci(m, lo, hi, 3) if np.isfinite(m) else "—" for m, lo, hi in zip(
                                 h["gain_pct"], h["gain_pct_lo"], h["gain_pct_hi"])],
                         **({"why none": h["reason"].fillna("")} if h["reason"].fillna("").ne("").any() else {})})
    d.table(disp, rel_d, f"Gain per dataset ({NAMES[metric]}; all metrics in the CSV, the time-based ones without "
                         f"CI)")
    ds_time = time_gains_side_by_side(per_ds)
    rel_dt = rep.csv("efficiency_time_gains_by_dataset", ds_time)
    early = first_eval_datasets(eff, lam)
    if early:
        d.p(f"**Reached at the first evaluation:** on {', '.join(early)} every run that reached the target did so "
            f"at its first evaluation, so its count to target is one evaluation interval for every architecture: a "
            f"gain there compares the architectures' cost per interval (FLOPs per step), not how fast they learn. "
            f"Read those rows as uninformative; a higher `target_frac` or a smaller `eval_every` would separate "
            f"them (column `at_first_eval` in `{rel_runs}`).")
    gains = pd.concat([efficiency_gains(eff, lam, m, **kw) for m in HEADLINE + SECONDARY], ignore_index=True)
    rel_g = rep.csv("efficiency_gains", gains)
    ci_rows = gains[~gains["metric"].isin(TIME_METRICS)]
    disp = pd.DataFrame({"modality": ci_rows["modality"], "arch": ci_rows["arch"],
                         "metric": ci_rows["metric"].map(NAMES),
                         f"gain % [{fmt(100 * opt.ci)}% CI]": [_ci(m, lo, hi, 3) if np.isfinite(m) else "—"
                                                               for m, lo, hi in zip(ci_rows["gain_pct"],
                                                                                    ci_rows["gain_pct_lo"],
                                                                                    ci_rows["gain_pct_hi"])]})
    d.table(disp, rel_g, "Gain per modality (mean over the compared datasets) in model terms, with CI; the "
                         "time-based gains follow in their own table")
    tg = time_gains_side_by_side(gains)
    rel_t = rep.csv("efficiency_time_gains", tg)
    pct = lambda v: fmt(v, 3, zeros=True) if np.isfinite(v) else "—"  # noqa: E731
    if len(tg):
        quants = list(dict.fromkeys(tg["quantity"]))
        keys = list(dict.fromkeys(zip(tg["modality"], tg["arch"])))
        at = tg.set_index(["modality", "arch", "quantity"])
        cols = {"modality": [k[0] for k in keys], "arch": [k[1] for k in keys]}
        for q in quants:
            cell = [at.loc[(m, a, q)] if (m, a, q) in at.index else None for m, a in keys]
            cols[f"{q}: stall-robust %"] = [pct(c["stall_robust_pct"]) if c is not None else "—" for c in cell]
            cols[f"{q}: raw clock %"] = [(pct(c["raw_clock_pct"]) + (" ⚠" if c["signs_disagree"] else ""))
                                         if c is not None else "—" for c in cell]
        d.table(pd.DataFrame(cols), rel_t,
                "Time-based gain per modality, stall-robust beside raw clock (no CI: one clock per batched group; "
                "for accuracy per second a gain is a higher value); ⚠: the two disagree in sign")
        flips = tg[tg["signs_disagree"]]
        flips_ds = ds_time[ds_time["signs_disagree"]]
        n_ds = int((ds_time["stall_robust_pct"].notna() & ds_time["raw_clock_pct"].notna()).sum())
        n_mod = int((tg["stall_robust_pct"].notna() & tg["raw_clock_pct"].notna()).sum())
        rel_f = rep.csv("efficiency_time_sign_flips", pd.DataFrame(
            {"level": ["modality", "dataset"], "cells_with_both": [n_mod, n_ds],
             "signs_disagree": [len(flips), len(flips_ds)], "table": [rel_t, rel_dt]}))
        listed = "; ".join(f"{r.modality} {r.arch}, {r.quantity}: {pct(r.stall_robust_pct)}% stall-robust against "
                           f"{pct(r.raw_clock_pct)}% raw" for r in flips.itertuples())
        d.p(f"**The two times.** {TIME_WHAT} Where they disagree in sign, the run's speed was not steady (a stall, "
            f"or a lasting change of speed as the shared machine's load changed), and neither time tells which "
            f"architecture trains faster in seconds. They disagree in sign in {len(flips)} of {n_mod} modality cells"
            + (f" ({listed})" if len(flips) else "") + f", and in {len(flips_ds)} of {n_ds} dataset cells "
            f"(`{rel_dt}`, column `signs_disagree`; the counts: `{rel_f}`). The headline metric and the verdict do "
            f"not use either.")
    from . import figures as _fig

    plot_metrics = [metric, "time", "time_clock"]
    plot = gains[gains["metric"].isin(plot_metrics) & gains["gain_pct"].notna()]
    plot = plot.assign(_o=plot["metric"].map(plot_metrics.index)).sort_values("_o", kind="stable").drop(columns="_o")
    if not plot.empty:
        d.figure(_fig.efficiency_plot(plot, rep.fig_dir / "efficiency.png", names=NAMES),
                 f"Gain of the energy-first architectures over the best conventional baseline per modality (bars: "
                 f"ours; whiskers: the {fmt(100 * opt.ci)}% CI, drawn for {NAMES[metric]} only, since the time-based "
                 f"gains have none; band: the paper's 5–33%). Training time to target is shown stall-robust and on "
                 f"the raw clock.")
    d.figure(_fig.curves_plot(runs, rep.store.epochs, lam, rep.fig_dir / "learning_curves.png", evals=evals),
             f"Mean validation accuracy against the stall-robust training time (each evaluation's optimizer steps × "
             f"the run's median seconds per step, the time of the tables' stall-robust columns; per epoch where a store "
             f"has no steps), λ = {fmt(lam)}. Each point averages the runs still training there, and a curve ends where "
             f"fewer than half of its runs still train (its tail would rest on the seeds that stopped last).")
    at_lam = runs[runs["lam"] == lam]  # the design at the λ read
    rep.finding3_read = True
    band = (float(PAPER["gain_lo_pct"]), float(PAPER["gain_hi_pct"]))
    vkw = dict(energy_first=opt.energy_first, conventional=opt.conventional, band=band)
    hg = gains[gains["metric"] == metric]
    v, why = verdict(hg, at_lam, reading=opt.finding3_reading, **vkw)
    vt = verdict_table(hg, opt.energy_first, band)
    rel_v = rep.csv("finding3_verdict_by_arch", vt)
    if v != "not comparable" or opt.finding3_reading != "each":
        other = "best" if opt.finding3_reading == "each" else "each"
        v_o, _ = verdict(hg, at_lam, reading=other, **vkw)
        what = ("as the report read it before session 26, per modality only the energy-first architecture with "
                "the larger gain" if other == "best" else "with every energy-first architecture in every modality")
        why += (f" Each architecture's status per modality is in `{rel_v}`. Read {what} (option `finding3_reading` "
                f"= {other}), the verdict would be {'the same, ' if v_o == v else ''}{v_o}.")
    adj = gains[(gains["metric"] == metric) & gains["m_adj"].notna()]
    if v != "not comparable" and len(adj) > 1:
        v_adj, _ = verdict(adj.assign(gain_pct_lo=adj["gain_pct_lo_adj"], gain_pct_hi=adj["gain_pct_hi_adj"]),
                           at_lam, reading=opt.finding3_reading, **vkw)
        shown = (adj.loc[adj.groupby("modality")["gain_pct"].idxmax()] if opt.finding3_reading == "best" else adj)
        per = "; ".join(f"{r.modality}{'' if opt.finding3_reading == 'best' else ' ' + r.arch}: "
                        f"{_ci(r.gain_pct, r.gain_pct_lo_adj, r.gain_pct_hi_adj, 3)}%" for r in shown.itertuples())
        why += (f" Sensitivity: with Bonferroni-adjusted CIs over the {int(adj['m_adj'].iloc[0])} modality CIs of "
                f"this metric shown (each at {fmt(adj['ci_adj_pct'].iloc[0])}%, columns `*_adj` of "
                f"`{rel_g}`), the verdict would be {'the same, ' if v_adj == v else ''}{v_adj} ({per}).")
    head = gains[(gains["metric"] == metric) & gains["gain_pct"].notna()]
    ours = ("; ".join(f"{r.modality}: {r.arch} {_ci(r.gain_pct, r.gain_pct_lo, r.gain_pct_hi, 3)}%"
                      for r in head.itertuples()) or "n/a")
    defn = f"{NAMES[metric]}, target {target_text(opt)}"
    stale = (" The FLOPs are counted by an older rule (see above): recount them (`minaction study recount-flops`) "
             "before citing this verdict." if metric == "flops" and old_flops_rule(rep.store) else "")
    d.p(rep.verdict(3, claim, paper, f"{defn}: {ours}", v, f"Headline: {defn}. {sentence(why)}{stale}"))
