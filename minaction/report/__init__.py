"""The study report: the paper's three findings, reproduced or not, side by side.

``build_report(db, out_dir)`` reads a study store and writes ``report.md``, a
self-contained ``report.html``, ``figures/*.png`` and ``tables/*.csv``. The analysis
functions are usable on their own: :mod:`.anova` (Type II/III ANOVA, partial eta squared,
bootstrap CIs), :mod:`.sweep` (the lambda-sweep), :mod:`.efficiency` (training efficiency).
"""
from .anova import (FastAnova, anova_table, bootstrap_partial_eta, cell_counts, eta_reading,  # noqa: F401
                    factorial_analysis, factorial_design_gaps)
from .build import ReportOptions, build_report, choose_main_lam  # noqa: F401
from .efficiency import arch_summary, efficiency_gains, per_run_efficiency  # noqa: F401
from .render import check_traceable  # noqa: F401
from .store import MixedBudgetError, Store, load_store, select_budget  # noqa: F401
from .sweep import lambda_sweep, sweep_design_gaps, sweep_verdicts, tost_equivalence  # noqa: F401

__all__ = ["build_report", "ReportOptions", "choose_main_lam", "load_store", "Store", "anova_table", "FastAnova",
           "bootstrap_partial_eta", "cell_counts", "factorial_analysis", "factorial_design_gaps", "eta_reading",
           "lambda_sweep", "sweep_verdicts", "tost_equivalence", "sweep_design_gaps", "select_budget",
           "MixedBudgetError",
           "per_run_efficiency", "arch_summary", "efficiency_gains", "check_traceable"]
