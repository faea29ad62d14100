"""Finding 3: training efficiency (optimizer steps, samples and FLOPs to a target accuracy),
the energy-first architectures against the best conventional baseline. The numbers come
from :mod:`.efficiency`; this module writes the section."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .efficiency import (HEADLINE, NAMES, arch_summary, dataset_gains, efficiency_gains, first_eval_datasets,
                         per_run_efficiency, verdict)
from .context import sentence
from .paper import PAPER
from .store import old_flops_rule
from .render import ci as _ci
from .render import fmt


#: metrics of the Finding 3 tables: the headline ones, then the secondary ones (wall time on a shared machine)
SECONDARY = ("epochs", "time", "acc_per_s")


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
        f"Training time and accuracy per training second (final test accuracy / training time, the optimizer "
        f"steps only) are secondary columns, counted as steps × the run's median seconds per step over its "
        f"evaluation intervals (time to target: steps to target × that median; the clock's own values are in the "
        f"`*_clock_s` columns): the machine was shared, and one stall of it in a minority of a run's intervals "
        f"does not move the median. They get no CI: the seeds of one batched group share one clock (a batched "
        f"step's time is split equally among its members), so they are not independent replicates of a time. "
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
        "time (s)": s["time_to_target_s"].map(fmt), "acc / s": s["acc_per_s"].map(fmt)})
    d.table(disp, rel_s, f"Per architecture at λ = {fmt(lam)}: means to target (runs that reached it); time: "
                         f"training time to target (steps to target × the run's median seconds per step; a run's "
                         f"optimizer steps only, its equal share of its batched group's step time, so the runs of one "
                         f"group share one clock); acc / s: mean final test accuracy per training second (all runs)")
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
    early = first_eval_datasets(eff, lam)
    if early:
        d.p(f"**Reached at the first evaluation:** on {', '.join(early)} every run that reached the target did so "
            f"at its first evaluation, so its count to target is one evaluation interval for every architecture: a "
            f"gain there compares the architectures' cost per interval (FLOPs per step), not how fast they learn. "
            f"Read those rows as uninformative; a higher `target_frac` or a smaller `eval_every` would separate "
            f"them (column `at_first_eval` in `{rel_runs}`).")
    gains = pd.concat([efficiency_gains(eff, lam, m, **kw) for m in HEADLINE + SECONDARY], ignore_index=True)
    rel_g = rep.csv("efficiency_gains", gains)
    disp = pd.DataFrame({"modality": gains["modality"], "arch": gains["arch"],
                         "metric": gains["metric"].map(NAMES),
                         f"gain % [{fmt(100 * opt.ci)}% CI]": [_ci(m, lo, hi, 3) if np.isfinite(m) else "—"
                                                               for m, lo, hi in zip(gains["gain_pct"],
                                                                                    gains["gain_pct_lo"],
                                                                                    gains["gain_pct_hi"])]})
    d.table(disp, rel_g, "Gain per modality (mean over the compared datasets); training time and accuracy per "
                         "training second are secondary (for accuracy per second a gain is a higher value) and have "
                         "no CI (one clock per batched group)")
    from . import figures as _fig

    plot = gains[gains["metric"].isin([metric, "time"]) & gains["gain_pct"].notna()]
    if not plot.empty:
        d.figure(_fig.efficiency_plot(plot, rep.fig_dir / "efficiency.png"),
                 "Gain of the energy-first architectures over the best conventional baseline per modality "
                 "(bars: ours with CI; band: the paper's 5–33%).")
    d.figure(_fig.curves_plot(runs, rep.store.epochs, lam, rep.fig_dir / "learning_curves.png"),
             f"Mean validation accuracy against cumulative training time, λ = {fmt(lam)}: the wall clock of each "
             f"batched group as recorded, stalls of the machine included (the tables' times use the median "
             f"seconds per step instead).")
    at_lam = runs[runs["lam"] == lam]  # the design at the λ read
    rep.finding3_read = True
    v, why = verdict(gains[gains["metric"] == metric], at_lam, opt.energy_first, opt.conventional)
    adj = gains[(gains["metric"] == metric) & gains["m_adj"].notna()]
    if v != "not comparable" and len(adj) > 1:
        v_adj, _ = verdict(adj.assign(gain_pct_lo=adj["gain_pct_lo_adj"], gain_pct_hi=adj["gain_pct_hi_adj"]),
                           at_lam, opt.energy_first, opt.conventional)
        best = adj.loc[adj.groupby("modality")["gain_pct"].idxmax()]
        per = "; ".join(f"{r.modality}: {_ci(r.gain_pct, r.gain_pct_lo_adj, r.gain_pct_hi_adj, 3)}%"
                        for r in best.itertuples())
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
