"""The report's definitions: every choice this project makes where the paper is silent."""
from __future__ import annotations

from .context import P_FLOOR
from .render import fmt
from .store import _flat


def _energy_text(energy, reduction, activation) -> str:
    if energy in (None, "none"):
        return f"none (energy = none: no energy term; {activation} units)"
    p = {"l2": 2, "l1": 1}.get(energy, energy)
    over = "mean" if reduction == "mean" else "sum"
    return (f"sum over hidden layers of mean over samples of {over} over units of |a|^p, p = {p}"
            + ("" if activation == "relu" else f"; {activation} units"))


def energy_definition(rep) -> str:
    """E as the analysed runs' budgets define it (``energy``, ``energy_reduction``, ``activation``): the
    project's default is p = 2, summed over units, ReLU; a custom preset's runs are described as trained."""
    runs, budgets = rep.store.runs, rep.store.budgets
    per = {}
    for bid, g in runs.groupby("budget_id", sort=True) if "budget_id" in runs else ():
        b = _flat(budgets.get(bid))
        text = _energy_text(b.get("energy", "l2"), b.get("energy_reduction", "sum"), b.get("activation", "relu"))
        per.setdefault(text, set()).update(str(d) for d in g["dataset"].unique())
    if not per:
        return _energy_text("l2", "sum", "relu")
    if len(per) == 1:
        return next(iter(per))
    return "; ".join(f"{', '.join(sorted(ds))}: {text}" for text, ds in sorted(per.items(), key=lambda kv: sorted(kv[1])))


def section(rep) -> None:
    """Write every definition this project adopts where the paper is silent (with the options)."""
    opt = rep.opt
    rep.define("paper", "Frasch, minAction.net, arXiv 2604.24805",
                "only its abstract (v1 and v2) is public; its numbers are labelled paper")
    rep.define("energy E", energy_definition(rep),
                "measured on the test split after training; the logits layer is not counted")
    rep.define("rescaled energy", "each hidden unit's activation times the L2 norm of the weights reading it",
                "invariant to the ReLU rescaling symmetry in mlp, cnn and bimodal_true; not in physics_lagrangian, "
                "whose residual state update breaks the symmetry (docs/models.md, per architecture)")
    rep.define("p-values", f"shown with 3 significant digits; below {fmt(P_FLOOR)} as < {fmt(P_FLOOR)}",
                "smaller values depend on the model's assumed tails more than on the data (and statsmodels reports "
                "some as 0)")
    rep.define("confidence level", f"{fmt(100 * opt.ci)}%", "all intervals")
    rep.define("bootstrap", f"{opt.n_boot} resamples, seed {opt.seed}",
                "runs resampled within cells; for η², each resampled cell's deviations from its mean stretched by "
                "√(n/(n−1))")
    rep.define("CI of partial η²", "exact, noncentral F (Steiger 2004)",
                "the noncentrality λ_nc that puts the observed F at the interval's quantiles, as λ_nc / (λ_nc + "
                "df_effect + df_residual + 1); the verdict reads it; the bootstrap CI is a robustness column")
    rep.define("ANOVA", f"OLS, sum-to-zero contrasts, Type II and III; verdict on Type "
                         f"{'II' if opt.anova_type == 2 else 'III'}",
                "partial η² = SS_effect / (SS_effect + SS_residual)")
    rep.define("η² of the Finding 1 verdict", f"{opt.eta_kind} η²",
                "plain η² = SS_effect / SS_total (corrected total), with a bootstrap CI; both are shown, and the "
                "verdict under the other reading is given too")
    rep.define("which η² the paper reports", f"the closer reading, when the two log10 distances differ by ≥ {fmt(opt.eta_reading_margin)}",
                "summed |log10(ours / paper)| over the two terms (option `eta_reading_margin`); closer than that, "
                "or on a store without the paper's design, no reading is inferred")
    rep.define("negligible / large η²", f"< {fmt(opt.negligible_np2)} / ≥ {fmt(opt.large_np2)}",
                "Cohen's small and large effects; interaction p threshold " + fmt(opt.alpha))
    rep.define("design needed for a verdict", f"≥ {opt.min_replicates} seeds per cell",
                f"Finding 1: every conventional and energy-first architecture × datasets of ≥ "
                f"{opt.finding1_min_modalities} modalities, no empty cell, at most "
                f"{fmt(100 * opt.max_thin_frac)}% of cells with fewer; Finding 2: on each sweep dataset an "
                "architecture with seeds at λ = 0 and at a λ > 0; otherwise the finding is not comparable")
    rep.define("TOST equivalence", f"margin ±{fmt(opt.sweep_max_acc_pp)} pp, α = {fmt(opt.tost_alpha)} per side "
                f"({fmt(100 * (1 - 2 * opt.tost_alpha))}% CI)",
                "paired t on per-seed differences when every λ run has its λ = 0 seed, else Welch t; Welch's "
                "unpaired TOST beside it as a sensitivity column; unadjusted for multiplicity (Holm and "
                "fixed-sequence shown)")
    rep.define("training budget", "the run configuration without arch, dataset, λ and seed",
                "runs of one dataset under different budgets are never pooled (tables/budgets.csv)")
    f1 = getattr(rep, "finding1_lam", None)
    if f1 is None or f1 == fmt(rep.main_lam):
        rep.define("λ of Findings 1 and 3", fmt(rep.main_lam),
                    "the λ with the most finished runs (ties: the smallest) unless set (option `lam`)")
    else:
        rep.define("λ of Finding 1", f1, "λ is a further factor of the ANOVA when it is fully crossed with "
                                        "architecture and dataset; otherwise the runs at the λ of Finding 3")
        rep.define("λ of Finding 3", fmt(rep.main_lam), "the λ with the most finished runs (ties: the smallest) unless set (option `lam`)")
    rep.define("about three orders of magnitude", f"≥ {fmt(opt.sweep_min_orders)} orders",
                f"at a λ whose accuracy is TOST-equivalent within ±{fmt(opt.sweep_max_acc_pp)} pp on "
                f"{', '.join(opt.sweep_datasets)}; "
                "reproduced when more than half the (dataset, arch) combinations meet it")
    rep.define("moderate λ", fmt(opt.sweep_moderate_lam), "where v1's 'to 6% of baseline' is compared")
    whose = "on the dataset (any architecture)" if opt.target_by == "dataset" else "of the run's own architecture"
    rep.define("target accuracy", f"{fmt(100 * opt.target_frac)}% of the best final validation accuracy {whose}",
                f"per dataset and λ; option `target_by` = {opt.target_by} (`dataset`: the best of any architecture "
                "there, the mission's default; `arch`: of the same architecture)")
    rep.define("headline efficiency metric", opt.efficiency_metric,
                "steps, samples or FLOPs to the first evaluation at the target; wall time to the target and "
                "accuracy per training second are secondary")
    rep.define("training time", "shown twice: stall-robust (steps × the run's median seconds per step over its "
                "evaluation intervals) and raw clock (as recorded)",
                "the first ignores a stall of the shared machine but also any lasting change of speed within a run; "
                "the second carries both; where they disagree in sign the report flags it; no CI, since the seeds "
                "of one batched group share one clock")
    if opt.finding3_reading == "each":
        rep.define("Finding 3 verdict", "every energy-first architecture, in every modality, against the paper's "
                   "5–33% (option `finding3_reading` = each)",
                   "an architecture: not reproduced when some modality's CI lies wholly below 5% or wholly above "
                   "33%; reproduced when every modality's CI lies above 0 and none outside; else inconclusive. The "
                   "claim: reproduced when every architecture is, not reproduced when some architecture is not")
    else:
        rep.define("Finding 3 verdict", "per modality, the energy-first architecture with the larger gain (option "
                   "`finding3_reading` = best)",
                   "not reproduced when some modality's CI lies wholly below the paper's 5% or wholly above its 33%; "
                   "reproduced when every modality's CI lies above 0 and none outside; else inconclusive")
    rep.define("energy-first / conventional", f"{', '.join(opt.energy_first)} / {', '.join(opt.conventional)}",
                "the paper's Figure 1 names; the architectures are this project's reconstructions from its "
                "caption (docs/models.md)")
    rep.define("small test set", f"binomial SE of one run's accuracy ≥ {fmt(opt.noisy_test_se_pp)} pp",
                "named under Limitations (option `noisy_test_se_pp`); test sizes inferred from the accuracies")
    rep.define("λ-sweep pairing", "same seed at λ = 0", "the λ = 0 mean when that seed is missing")
