"""The study report: the paper's three findings, reproduced or not, side by side.

``build_report(db, out_dir)`` reads a study store and writes ``report.md``, a
self-contained ``report.html``, ``figures/*.png`` and ``tables/*.csv``. The analysis
functions are usable on their own: :mod:`.anova` (Type II/III ANOVA, partial eta squared,
bootstrap CIs), :mod:`.sweep` (the lambda-sweep), :mod:`.efficiency` (training efficiency).
"""
from .._lazy import lazy_names

# name -> submodule; loaded on first use (PEP 562), so that `minaction study run` and every
# other subcommand do not import scipy.stats and statsmodels (about a second) to build the parser
_WHERE = {
    "FastAnova": "anova", "anova_table": "anova", "bootstrap_partial_eta": "anova", "cell_counts": "anova",
    "eta_reading": "anova", "factorial_analysis": "anova", "factorial_design_gaps": "anova",
    "ReportOptions": "build", "build_report": "build", "choose_main_lam": "build",
    "arch_summary": "efficiency", "efficiency_gains": "efficiency", "per_run_efficiency": "efficiency",
    "check_traceable": "render",
    "MixedBudgetError": "store", "Store": "store", "load_store": "store", "select_budget": "store",
    "lambda_sweep": "sweep", "sweep_design_gaps": "sweep", "sweep_verdicts": "sweep", "tost_equivalence": "sweep",
}


__getattr__, __dir__ = lazy_names(__name__, _WHERE)


__all__ = ["build_report", "ReportOptions", "choose_main_lam", "load_store", "Store", "anova_table", "FastAnova",
           "bootstrap_partial_eta", "cell_counts", "factorial_analysis", "factorial_design_gaps", "eta_reading",
           "lambda_sweep", "sweep_verdicts", "tost_equivalence", "sweep_design_gaps", "select_budget",
           "MixedBudgetError",
           "per_run_efficiency", "arch_summary", "efficiency_gains", "check_traceable"]
