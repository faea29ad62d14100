"""Finding 1: architecture, dataset and their interaction (a factorial ANOVA of test accuracy)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import anova as _anova
from . import figures as _fig
from .context import fmt_p, span
from .paper import PAPER
from .render import ci, fmt


def complete_design(df: pd.DataFrame, factors):
    """Drop datasets that lack a cell of the design (so the interaction is estimable)."""
    dropped = []
    while True:
        levels = [df[f].unique() for f in factors if f != "dataset"]
        need = int(np.prod([len(l) for l in levels])) if levels else 1
        have = df.groupby("dataset")[[f for f in factors if f != "dataset"]].apply(
            lambda g: len(g.drop_duplicates())) if levels else None
        bad = [] if have is None else list(have[have < need].index)
        if not bad:
            return df, dropped
        dropped += bad
        df = df[~df["dataset"].isin(bad)]


def cell_stats(df: pd.DataFrame, ci_level: float) -> pd.DataFrame:
    from scipy import stats

    rows = []
    for (arch, ds), g in df.groupby(["arch", "dataset"]):
        x = g["test_acc"].to_numpy(float)
        n, m = len(x), float(x.mean())
        sd = float(x.std(ddof=1)) if n > 1 else np.nan
        h = float(stats.t.ppf(0.5 + ci_level / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"arch": arch, "dataset": ds, "n": n, "mean": m, "sd": sd, "ci_lo": m - h, "ci_hi": m + h})
    return pd.DataFrame(rows)


def paper_design_gaps(data, opt) -> list:
    """What ``data`` lacks of the paper's Finding 1 design beyond a bare factorial: the claim is about
    conventional and energy-first architectures across modalities, so every architecture of both
    kinds and datasets of ``opt.finding1_min_modalities`` modalities (a sweep of two MNIST variants
    and three architectures does not test it)."""
    gaps = []
    needed = list(opt.conventional) + list(opt.energy_first)
    missing = [a for a in needed if a not in set(data["arch"])]
    if missing:
        gaps.append(f"no finished runs of {', '.join(missing)} (the claim compares {', '.join(needed)})")
    mods = sorted(str(m) for m in data["modality"].dropna().unique()) if "modality" in data.columns else []
    if len(mods) < opt.finding1_min_modalities:
        gaps.append(f"datasets of {len(mods)} modality ({', '.join(mods) or 'none'}); the claim is about datasets "
                    f"across modalities: at least {opt.finding1_min_modalities} are needed")
    return gaps


def _judge(a, i, kind: str, opt) -> tuple:
    """``(verdict, [reasons])`` of Finding 1 on ``kind`` ("partial" or "plain") η² of the architecture
    row ``a`` and the interaction row ``i`` of the ANOVA table. Each half of the claim is decided by
    its CI, not by the point estimate: "reproduced" when both CIs lie on the paper's side of their
    thresholds (and the interaction's p < alpha), "not reproduced" when either lies wholly on the
    other side (or p >= alpha), "inconclusive" when a CI straddles its threshold and neither fails."""
    k, name = ("np2" if kind == "partial" else "eta2"), f"{kind} η²"
    neg, large = opt.negligible_np2, opt.large_np2
    a_lo, a_hi, i_lo, i_hi = a[k + "_lo"], a[k + "_hi"], i[k + "_lo"], i[k + "_hi"]
    a_ci = f"CI {fmt(a_lo)} to {fmt(a_hi)}"
    i_ci = f"CI {fmt(i_lo)} to {fmt(i_hi)}"
    no_ci = not (np.isfinite(a_lo) and np.isfinite(a_hi) and np.isfinite(i_lo) and np.isfinite(i_hi))
    if no_ci:  # no bootstrap (n_boot = 0): the point estimates decide
        a_lo = a_hi = a[k]
        i_lo = i_hi = i[k]
    parts, states = [], []
    if a_hi < neg:
        states.append("yes")
        parts.append(f"architecture alone explains a negligible share ({name} = {fmt(a[k])}, {a_ci}, below "
                     f"{fmt(neg)}; paper {PAPER['np2_arch']})")
    elif a_lo >= neg:
        states.append("no")
        parts.append(f"architecture alone is not negligible ({name} = {fmt(a[k])}, {a_ci}, at or above "
                     f"{fmt(neg)}; paper {PAPER['np2_arch']})")
    else:
        states.append("open")
        parts.append(f"whether architecture alone is negligible is undecided ({name} = {fmt(a[k])}, {a_ci} "
                     f"spans {fmt(neg)}; paper {PAPER['np2_arch']})")
    if i["p"] >= opt.alpha or i_hi < large:
        states.append("no")
        parts.append(f"the arch × dataset interaction is not large and significant ({name} = {fmt(i[k])}, {i_ci}, "
                     f"p {fmt_p(i['p'], True)}; large means ≥ {fmt(large)}; paper {PAPER['np2_interaction']})")
    elif i_lo >= large:
        states.append("yes")
        parts.append(f"the arch × dataset interaction is large ({name} = {fmt(i[k])}, {i_ci}, p "
                     f"{fmt_p(i['p'], True)}; paper {PAPER['np2_interaction']}, p < {fmt(opt.alpha)})")
    else:
        states.append("open")
        parts.append(f"whether the arch × dataset interaction is large is undecided ({name} = {fmt(i[k])}, "
                     f"{i_ci} spans {fmt(large)}, p {fmt_p(i['p'], True)}; paper {PAPER['np2_interaction']})")
    v = ("not reproduced" if "no" in states else "inconclusive" if "open" in states else "reproduced")
    return v, parts


def section(rep) -> None:
    """Write Finding 1 (factorial ANOVA of test accuracy) into ``rep``."""
    opt, runs = rep.opt, rep.store.runs
    d = rep.doc
    d.h(1, "Finding 1: architecture, dataset and their interaction (factorial ANOVA)")
    claim = "arch η² negligible; arch × dataset interaction η² large (p < 0.001)"
    paper = (f"arch {PAPER['np2_arch']}; arch × dataset {PAPER['np2_interaction']} "
             f"({PAPER['n_experiments']} experiments, {PAPER['seeds']} seeds; the abstract says partial η²)")
    lam_levels = sorted(runs["lam"].unique())
    factors = ["arch", "dataset"]
    data = runs
    lam_note = ""
    if len(lam_levels) > 1:
        full = runs.groupby(["arch", "dataset", "lam"]).ngroups
        if full == runs["arch"].nunique() * runs["dataset"].nunique() * len(lam_levels):
            factors = ["arch", "dataset", "lam"]
            lam_note = "λ varies over a fully crossed design, so it is a further factor."
        else:
            data = runs[runs["lam"] == rep.main_lam]
            why = ("set with the `lam` option" if opt.lam is not None
                   else "the λ with the most finished runs; ties: the smallest")
            lam_note = (f"λ is not crossed with every arch and dataset, so the analysis uses the runs at "
                        f"λ = {fmt(rep.main_lam)} ({why}).")
    bad = data[~np.isfinite(data["test_acc"].to_numpy(float))]
    if len(bad):
        data = data[np.isfinite(data["test_acc"].to_numpy(float))]
        lam_note += (f" Left out: {len(bad)} finished run(s) without a finite test accuracy ("
                     + ", ".join(f"{a} × {ds}" for a, ds in sorted(set(zip(bad['arch'], bad['dataset'])))) + ").")
    data, dropped = complete_design(data, [f for f in factors])
    if dropped:
        lam_note += f" Datasets left out because an architecture has no finished run there: {', '.join(dropped)}."
    lams_used = sorted(data["lam"].unique())
    rep.finding1_lam = ("a factor: " + ", ".join(fmt(v) for v in lams_used) if "lam" in factors
                        else ", ".join(fmt(v) for v in lams_used))
    data = data.assign(lam=data["lam"].map(lambda v: f"{v:g}"))
    formula = "test_acc ~ " + " * ".join(f"C({f}, Sum)" for f in factors)
    d.p(f"Model: OLS `{formula}` (sum-to-zero contrasts), Type II and Type III sums of squares; "
        f"partial η² = SS_effect / (SS_effect + SS_residual) and plain η² = SS_effect / SS_total (SS_total = "
        f"the corrected total sum of squares). Partial η²'s {fmt(100 * opt.ci)}% CI is exact (Steiger 2004: the "
        f"noncentral F distribution inverted at the observed F for its noncentrality λ_nc, and partial η² = "
        f"λ_nc / (λ_nc + df_effect + df_residual + 1)); it can reach 0, and the verdict reads it. A percentile "
        f"bootstrap ({opt.n_boot} resamples of the runs within each cell, each resampled cell's deviations from its "
        f"mean stretched by √(n/(n−1)), since a resample of n runs keeps on average (n−1)/n of the cell's residual sum "
        f"of squares) gives partial η² a robustness column and plain η² its only CI. The bootstrap intervals lean "
        f"upwards and exclude 0 even for a null effect: η² cannot be negative and resampling adds noise to every "
        f"effect. {lam_note}")
    counts = _anova.cell_counts(data, factors)
    rel_counts = rep.csv("anova_cell_counts", counts)
    if not counts.empty:  # datasets down, architectures across (the CSV has every cell, long form)
        rng = counts.groupby(["dataset", "arch"])["n"].agg(["min", "max"])
        rng["n"] = [str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in zip(rng["min"], rng["max"])]
        wide = rng["n"].unstack("arch").reset_index()
        wide.columns = [str(c) for c in wide.columns]
        over = (f"; with λ a factor, each entry is the range over the {data['lam'].nunique()} λ values"
                if "lam" in factors else "")
        d.table(wide, rel_counts, f"Runs per cell (n; rows: datasets, columns: architectures{over}; the design "
                                  "may be unbalanced)")
    gaps = _anova.factorial_design_gaps(data, factors, min_levels=2, min_reps=opt.min_replicates,
                                        max_thin_frac=opt.max_thin_frac)
    if gaps and dropped:
        gaps.append(f"left out because an architecture has no finished run there: {', '.join(dropped)}")
    if gaps:
        d.p(rep.verdict(1, claim, paper, "n/a", "not comparable",
                         "the store lacks the factorial design (at least 2 architectures × 2 datasets, no empty "
                         f"cell, at least {opt.min_replicates} seeds in all but {fmt(100 * opt.max_thin_frac)}% of "
                         "the cells): " + "; ".join(gaps) + "."))
        return
    # a factorial that can be fitted but is not the paper's design: the tables, without a verdict
    paper_gaps = paper_design_gaps(data, opt)
    try:
        tab = _anova.factorial_analysis(data, "test_acc", factors, n_boot=opt.n_boot, seed=opt.seed, ci=opt.ci)
    except ValueError as exc:
        d.p(rep.verdict(1, claim, paper, "n/a", "not comparable", f"the ANOVA cannot be fitted on this store: {exc}."))
        return
    rel = rep.csv("anova", tab)
    for typ in (2, 3):
        t = tab[tab["typ"] == typ]
        disp = pd.DataFrame({
            "term": t["term"], "SS": t["sum_sq"].map(fmt), "df": t["df"].map(fmt), "F": t["F"].map(fmt),
            "p": t["p"].map(fmt_p),
            f"partial η² [{fmt(100 * opt.ci)}% CI, exact]": [ci(m, lo, hi) for m, lo, hi in
                                                              zip(t["np2"], t["np2_lo"], t["np2_hi"])],
            "partial η² bootstrap CI": ["n/a" if not (np.isfinite(lo) and np.isfinite(hi)) else
                                        f"[{fmt(lo, zeros=True)}, {fmt(hi, zeros=True)}]"
                                        for lo, hi in zip(t["np2_boot_lo"], t["np2_boot_hi"])],
            f"plain η² [{fmt(100 * opt.ci)}% CI, bootstrap]": [ci(m, lo, hi) for m, lo, hi in
                                                                zip(t["eta2"], t["eta2_lo"], t["eta2_hi"])]})
        same = (" In a balanced design such as this one, Type II and Type III coincide." if typ == 3
                and not counts.empty and counts["n"].nunique() == 1 else "")
        d.table(disp, rel, f"Type {'II' if typ == 2 else 'III'} ANOVA (plain η² of the residual row: its share "
                           f"of the total variance).{same}")
    reading = _anova.eta_reading(tab, opt.anova_type)
    rel_r = rep.csv("eta_reading", reading)
    d.table(pd.DataFrame({"reading": reading["reading"], "arch": reading["arch"].map(fmt),
                          "arch × dataset": reading["arch_dataset"].map(fmt),
                          "log10 distance to the paper": reading["log_distance"].map(fmt),
                          "SS_int / SS_res": reading["ss_int_over_ss_res"].map(fmt)}), rel_r,
            "Which η² are the paper's numbers? The paper's pair beside ours, both ways")
    r = reading.set_index("reading")
    plain_d, part_d = r.loc["ours, plain η²", "log_distance"], r.loc["ours, partial η²", "log_distance"]
    t = tab[tab["typ"] == opt.anova_type].set_index("term")
    a, i = t.loc["arch"], t.loc["arch:dataset"]
    judged = {kind: _judge(a, i, kind, opt) for kind in ("partial", "plain")}
    text = (f"**Which η² the paper reports.** Its abstract calls both numbers partial η². Read that way, its "
            f"interaction {PAPER['np2_interaction']} fixes SS_interaction / SS_residual = "
            f"{fmt(r.iloc[0]['ss_int_over_ss_res'])}: the seed-to-seed variance would exceed the whole "
            f"architecture × dataset interaction. In this store SS_interaction / SS_residual = "
            f"{fmt(r.loc['ours, partial η²', 'ss_int_over_ss_res'])} and the residual is "
            f"{fmt(r.loc['ours, partial η²', 'residual_share'])} of the total variance: the smaller that share, the "
            f"closer to 1 every real effect's partial η² is, while plain η² keeps each effect's share of all the "
            f"variance. ")
    if paper_gaps:
        text += ("This store lacks the paper's design (see the verdict below), so it is not used to infer which "
                 "η² the paper reports; the table only sets the numbers side by side.")
    elif abs(plain_d - part_d) < opt.eta_reading_margin:
        text += (f"The paper's pair is about as far from our plain η² (log10 distance {fmt(plain_d)}) as from our "
                 f"partial η² ({fmt(part_d)}): closer than `eta_reading_margin` = {fmt(opt.eta_reading_margin)} "
                 f"apart, so the distances do not tell which η² the paper reports.")
    else:
        likely = "plain" if plain_d < part_d else "partial"
        text += (f"The paper's pair is closer to our **{likely} η²** (log10 distance {fmt(plain_d)} for plain, "
                 f"{fmt(part_d)} for partial, at least `eta_reading_margin` = {fmt(opt.eta_reading_margin)} "
                 f"apart), so its numbers are most plausibly {likely} η²"
                 f"{'' if likely == 'partial' else ' despite the label'}.")
    if not paper_gaps:
        res = {kind: judged[kind][0] for kind in judged}
        text += (f" Under either reading the claim is {res['partial']}" if res["partial"] == res["plain"] else
                 f" The readings disagree: {res['partial']} on partial η², {res['plain']} on plain η²")
        text += " (the verdict below gives the reasons for both)."
    d.p(text + f" The verdict below reads {opt.eta_kind} η² (option `eta_kind`); both are shown.")
    cells = cell_stats(data, opt.ci)
    rel_cells = rep.csv("accuracy_by_cell", cells)
    pooled = (f"; with λ a factor, each mean pools the runs of all {data['lam'].nunique()} λ values"
              if "lam" in factors else "")
    d.figure(_fig.interaction_plot(cells, rep.fig_dir / "interaction.png"),
             f"Interaction plot: mean test accuracy per dataset and architecture (table {rel_cells}{pooled}).")
    rep.finding1_diag = _diagnostics(rep, data, factors)
    d.p(_null_bound(rep, t))
    sample_text, sample = _datasets_as_a_sample(rep, t, counts, data, factors)
    d.p(sample_text)
    typ_name = "II" if opt.anova_type == 2 else "III"
    name = f"{opt.eta_kind} η²"
    ours = (f"partial: arch {fmt(a['np2'])}, arch × dataset {fmt(i['np2'])}; plain: arch {fmt(a['eta2'])}, "
            f"arch × dataset {fmt(i['eta2'])} (interaction p {fmt_p(i['p'], True)})")
    ok, parts = judged[opt.eta_kind]
    n_cells = counts["n"]
    why = (f"Type {typ_name}, {name}: " + "; ".join(parts) + f". Ours from {int(n_cells.sum())} runs, "
           f"{span(n_cells)} per cell (paper: {PAPER['n_experiments']} "
           f"experiments, {PAPER['seeds']} seeds per configuration).")
    thin = [g for g in _anova.factorial_design_gaps(data, factors, 2, opt.min_replicates) if "fewer than" in g]
    other = "plain" if opt.eta_kind == "partial" else "partial"
    o_ok, o_parts = judged[other]
    why += (f" Under {other} η² the claim is {'also ' if o_ok == ok else ''}{o_ok}: " + "; ".join(o_parts) + ".")
    if thin:
        why += " Allowed but noted: " + "; ".join(thin) + "."
    why += (f" With datasets a random factor (a sample of datasets), the architecture effect is "
            f"{'not ' if sample['p'] >= 0.05 else ''}significant: F({fmt(sample['df_num'])}, {fmt(sample['df_den'])}) = "
            f"{fmt(sample['F'])}, p = {fmt_p(sample['p'])}; the verdict describes these datasets.")
    bound = rep.finding1_bound
    if opt.eta_kind == "partial" and bound["np2_hi_at_F1"] >= opt.negligible_np2:
        why += (f" At df ({fmt(bound['df1'])}, {fmt(bound['df2'])}) the rule cannot return reproduced for a null "
                f"architecture effect: at F = 1 the exact CI reaches {fmt(bound['np2_hi_at_F1'], 3)} ≥ "
                f"{fmt(opt.negligible_np2)}.")
    if paper_gaps:
        d.p(rep.verdict(1, claim, paper, ours, "not comparable",
                         "the ANOVA (Finding 1 section) describes this store, but the store lacks the paper's design (every "
                         f"conventional and energy-first architecture × datasets of at least "
                         f"{opt.finding1_min_modalities} modalities): " + "; ".join(paper_gaps) + "."))
        return
    d.p(rep.verdict(1, claim, paper, ours, ok, why))


def _random_f(data: pd.DataFrame, factors, typ: int) -> dict:
    """F(df_arch, df_int) = MS_arch / MS_(arch x dataset) of the Type ``typ`` table of ``data``."""
    from scipy import stats

    t = _anova.anova_table(data, "test_acc", factors, typ)
    a, i = t.loc["arch"], t.loc["arch:dataset"]
    f = float((a["sum_sq"] / a["df"]) / (i["sum_sq"] / i["df"]))
    return {"F": f, "df_num": float(a["df"]), "df_den": float(i["df"]), "p": float(stats.f.sf(f, a["df"], i["df"]))}


def derived_datasets(datasets) -> dict:
    """``{derived: source}`` for the datasets among ``datasets`` that are another encoding of one also among
    them (the catalogue's family: mnist_spikes and fashion_mnist_spikes re-encode mnist and fashion_mnist)."""
    from ..data.catalogue import SPECS

    have = set(datasets)
    return {ds: SPECS[ds].family for ds in sorted(have)
            if ds in SPECS and SPECS[ds].family != ds and SPECS[ds].family in have}


def _datasets_as_a_sample(rep, t: pd.DataFrame, counts: pd.DataFrame, data: pd.DataFrame, factors) -> tuple:
    """The architecture effect with the datasets read as a sample of datasets (a random factor): tested against
    the architecture x dataset interaction, F(df_arch, df_int) = MS_arch / MS_int (a reviewer's reading that the
    seed-resampling CIs above do not give); again without the datasets that re-encode another one of the panel
    (they are not independent draws of a dataset). Returns ``(text, the full panel's row)``."""
    from scipy import stats

    a, i = t.loc["arch"], t.loc["arch:dataset"]
    f = (a["sum_sq"] / a["df"]) / (i["sum_sq"] / i["df"])
    p = float(stats.f.sf(f, a["df"], i["df"]))
    balanced = counts["n"].nunique() == 1 if not counts.empty else False
    rows = [{"panel": "all datasets", "left_out": "", "term": "arch", "F": f, "df_num": a["df"], "df_den": i["df"],
             "p": p, "balanced": balanced, "profile_r": np.nan}]
    derived = derived_datasets(data["dataset"].unique())
    dup_text = ""
    if derived:
        means = data.groupby(["dataset", "arch"])["test_acc"].mean().unstack("arch")
        r = {ds: float(np.corrcoef(means.loc[ds], means.loc[src])[0, 1]) for ds, src in derived.items()}
        rest = data[~data["dataset"].isin(list(derived))]
        if rest["dataset"].nunique() >= 2:
            s = _random_f(rest, factors, rep.opt.anova_type)
            rows.append({"panel": "without re-encoded datasets", "left_out": ", ".join(derived), "term": "arch",
                         **s, "balanced": balanced, "profile_r": min(r.values())})
            pairs = ", ".join(f"{ds} of {src} (r = {fmt(r[ds], 3)})" for ds, src in derived.items())
            rows[-1].update({f"profile_r_{ds}": r[ds] for ds in derived})
            rep.finding1_derived = {**s, "text": f"{', '.join(derived)} re-encode {', '.join(derived.values())} "
                                                 f"(the same images as spikes), and their architecture profiles "
                                                 f"(mean test accuracy per architecture) correlate with their "
                                                 f"sources' at r = " + ", ".join(fmt(r[ds], 3) for ds in derived)
                                                 + "."}
            dup_text = (f" Not every dataset is an independent draw: {pairs} are other encodings of datasets in the "
                        f"panel, whose architecture profiles (mean test accuracy per architecture) they repeat (r: "
                        f"the profiles' correlation). Without them: F({fmt(s['df_num'])}, {fmt(s['df_den'])}) = "
                        f"{fmt(s['F'], 3)}, p = {fmt_p(s['p'])}.")
    rep.csv("anova_datasets_random", pd.DataFrame(rows))
    text = (f"**Datasets as a sample.** The intervals above treat these datasets as fixed (the exact CI by its model, "
            f"the bootstrap by resampling seeds within cells): they hold for these "
            f"datasets. Read as a sample of datasets (dataset a random factor), the architecture effect is tested "
            f"against the architecture × dataset interaction instead of the residual: F({fmt(a['df'])}, "
            f"{fmt(i['df'])}) = {fmt(f)}, p = {fmt_p(p)} (Type {'II' if rep.opt.anova_type == 2 else 'III'} mean "
            f"squares; {'exact, the design being balanced' if balanced else 'approximate, the design being unbalanced'}"
            f"). Whether architecture matters *in general* rests on this test, which has {fmt(i['df'])} "
            f"denominator degrees of freedom, not on the residual's.{dup_text}")
    return text, rows[0]


def _null_bound(rep, t: pd.DataFrame) -> str:
    """What the exact CI of the architecture's partial eta squared can show at this design's df: its upper bound
    when the architecture does nothing (F = 1), the F below which it would fall under ``negligible_np2``, and how
    often a null effect gets such an F (``finding1_null_bound.csv``)."""
    from scipy import stats

    opt = rep.opt
    a = t.loc["arch"]
    df1, df2 = float(a["df"]), float(t.loc["Residual", "df"])
    hi1 = _anova.null_upper_bound(df1, df2, opt.ci)
    f_need = _anova.f_for_upper_bound(opt.negligible_np2, df1, df2, opt.ci)
    p_null = float(stats.f.cdf(f_need, df1, df2))
    row = {"term": "arch", "df1": df1, "df2": df2, "F_observed": float(a["F"]), "F_null": 1.0, "np2_hi_at_F1": hi1,
           "negligible": opt.negligible_np2, "F_for_negligible_ci": f_need, "p_negligible_if_null": p_null,
           "p_negligible_if_null_pct": 100 * p_null}
    rep.finding1_bound = row
    rep.csv("finding1_null_bound", pd.DataFrame([row]))
    can = hi1 < opt.negligible_np2
    return (f"**What the architecture's CI can show at this N.** With df ({fmt(df1)}, {fmt(df2)}), an F of 1 (what "
            f"an architecture effect of nothing gives on average) has an exact {fmt(100 * opt.ci)}% CI of partial η² "
            f"reaching {fmt(hi1, 3)}, " + ("below" if can else "above") + f" the {fmt(opt.negligible_np2)} that "
            f"\"negligible\" needs. The upper bound falls below {fmt(opt.negligible_np2)} only when F < "
            f"{fmt(f_need, 3)}, which a truly null effect gives in {fmt(100 * p_null, 3)}% of studies"
            + ("" if can else ": the rule that the whole CI must lie below it cannot, in practice, return "
               "\"reproduced\" at this number of runs") + " (`finding1_null_bound.csv`).")


def _diagnostics(rep, data: pd.DataFrame, factors) -> dict:
    """The ANOVA's residual checks (``anova_diagnostics.csv``): Shapiro-Wilk on the residuals (deviations from the
    cell means, the full factorial's residuals) and Levene's test (median-centred, Brown-Forsythe) of equal
    variances over the cells, with the smallest and largest cell SD."""
    from scipy import stats

    g = data.groupby(list(factors))["test_acc"]
    res = (data["test_acc"] - g.transform("mean")).to_numpy(float)
    groups = [v.to_numpy(float) for _, v in g if len(v) > 1]
    sd = g.std(ddof=1).dropna()
    w, p_w = (stats.shapiro(res) if 3 <= len(res) else (np.nan, np.nan))
    p_lev = (float(stats.levene(*groups, center="median").pvalue) if len(groups) > 1 and
             any(np.ptp(x) > 0 for x in groups) else np.nan)
    name = lambda k: "/".join(str(x) for x in (k if isinstance(k, tuple) else (k,)))  # noqa: E731
    row = {"n_residuals": len(res), "shapiro_w": float(w), "shapiro_p": float(p_w), "levene_p": p_lev,
           "cells": len(sd), "cell_sd_min": float(sd.min()) if len(sd) else np.nan,
           "cell_sd_min_cell": name(sd.idxmin()) if len(sd) else "",
           "cell_sd_max": float(sd.max()) if len(sd) else np.nan,
           "cell_sd_max_cell": name(sd.idxmax()) if len(sd) else ""}
    rep.csv("anova_diagnostics", pd.DataFrame([row]))
    return row
