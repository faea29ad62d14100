"""The study report: the paper's three findings, reproduced or not, side by side.

``build_report(db, out_dir)`` reads a study store and writes ``report.md``, a
self-contained ``report.html``, ``figures/*.png`` and ``tables/*.csv``. The analysis
functions are usable on their own: :mod:`.anova` (Type II/III ANOVA, partial eta squared,
bootstrap CIs), :mod:`.sweep` (the lambda-sweep), :mod:`.efficiency` (training efficiency).
"""
from .anova import FastAnova, anova_table, bootstrap_partial_eta, cell_counts, factorial_analysis  # noqa: F401
from .build import ReportOptions, build_report, choose_main_lam  # noqa: F401
from .efficiency import arch_summary, efficiency_gains, per_run_efficiency  # noqa: F401
from .render import check_traceable  # noqa: F401
from .store import Store, load_store  # noqa: F401
from .sweep import lambda_sweep, sweep_verdicts  # noqa: F401

__all__ = ["build_report", "ReportOptions", "choose_main_lam", "load_store", "Store", "anova_table", "FastAnova",
           "bootstrap_partial_eta", "cell_counts", "factorial_analysis", "lambda_sweep", "sweep_verdicts",
           "per_run_efficiency", "arch_summary", "efficiency_gains", "check_traceable"]
