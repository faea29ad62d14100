"""The report's verdicts follow the evidence's uncertainty: a CI that straddles a threshold gives
"inconclusive", a degenerate ANOVA (no variance, no residual) gives no numbers, and NaN accuracies
are left out and named."""
import numpy as np
import pandas as pd
import pytest

from minaction.report import anova
from minaction.report.build import ReportOptions
from minaction.report.efficiency import verdict
from minaction.report.finding1 import _judge


def _row(v, lo, hi, p=1e-9):
    return pd.Series({"np2": v, "np2_lo": lo, "np2_hi": hi, "eta2": v, "eta2_lo": lo, "eta2_hi": hi, "p": p})


@pytest.mark.parametrize("arch, inter, want", [
    (_row(0.004, 0.002, 0.008), _row(0.5, 0.3, 0.7), "reproduced"),
    (_row(0.05, 0.03, 0.12), _row(0.5, 0.3, 0.7), "not reproduced"),     # arch CI wholly above 0.01
    (_row(0.004, 0.002, 0.008), _row(0.1, 0.05, 0.12), "not reproduced"),  # interaction CI wholly below 0.14
    (_row(0.004, 0.002, 0.008), _row(0.5, 0.3, 0.7, p=0.2), "not reproduced"),  # not significant
    (_row(0.008, 0.003, 0.02), _row(0.5, 0.3, 0.7), "inconclusive"),      # arch CI spans 0.01
    (_row(0.004, 0.002, 0.008), _row(0.11, 0.05, 0.82), "inconclusive"),  # interaction CI spans 0.14
    (_row(0.03, 0.02, 0.04), _row(0.11, 0.05, 0.82), "not reproduced"),   # one half fails: the claim fails
])
def test_finding1_is_judged_on_its_cis(arch, inter, want):
    v, parts = _judge(arch, inter, "partial", ReportOptions())
    assert v == want and len(parts) == 2
    if want == "inconclusive":
        assert any("undecided" in p for p in parts)


def _design(acc):
    rows = [{"arch": a, "dataset": d, "test_acc": acc(a, d, s)} for a in ("x", "y") for d in ("p", "q")
            for s in range(3)]
    return pd.DataFrame(rows)


def test_anova_refuses_degenerate_designs():
    with pytest.raises(ValueError, match="same test_acc"):
        anova.factorial_analysis(_design(lambda a, d, s: 0.9), "test_acc", ["arch", "dataset"], n_boot=0)
    with pytest.raises(ValueError, match="no seed-to-seed variance"):
        anova.factorial_analysis(_design(lambda a, d, s: 0.5 + 0.1 * (a == "x") + 0.2 * (d == "p")), "test_acc",
                                 ["arch", "dataset"], n_boot=0)
    ok = anova.factorial_analysis(_design(lambda a, d, s: 0.5 + 0.1 * (a == "x") + 0.01 * s), "test_acc",
                                  ["arch", "dataset"], n_boot=0)
    assert np.isfinite(ok["np2"]).any()


def _gains(rows):
    return pd.DataFrame([{"modality": m, "arch": a, "metric": "flops", "gain_pct": g, "gain_pct_lo": lo,
                          "gain_pct_hi": hi, "datasets": "d", "not_compared": ""} for m, a, g, lo, hi in rows])


RUNS = pd.DataFrame({"modality": ["vision", "vision", "text", "text"], "arch": ["mlp", "bimodal_true"] * 2})


@pytest.mark.parametrize("rows, want", [
    ([("vision", "bimodal_true", 12, 4, 20), ("text", "bimodal_true", 30, 20, 40)], "reproduced"),
    ([("vision", "bimodal_true", 3, -4, 10), ("text", "bimodal_true", 30, 20, 40)], "inconclusive"),
    ([("vision", "bimodal_true", -3, -10, 2), ("text", "bimodal_true", 30, 20, 40)], "not reproduced"),
])
def test_finding3_verdict_reads_the_cis(rows, want):
    v, why = verdict(_gains(rows), RUNS, modalities=("vision", "text"))
    assert v == want
    if want == "inconclusive":
        assert "neither show the gain nor rule it out" in why


def test_left_out_runs_are_named(tmp_path):
    """Failed or diverged runs are named per architecture (an architecture that loses more of them is
    compared on its survivors), and a finished run without a finite test accuracy is left out of
    Finding 1 by name, not silently dropped by the fit."""
    import sqlite3

    from doubles.stores import make_synthetic_store
    from minaction.report import build_report

    db = make_synthetic_store(tmp_path / "s.sqlite", n_failed=2, seed=3)
    con = sqlite3.connect(db)
    rid, arch, ds = con.execute("SELECT run_id, arch, dataset FROM runs WHERE status = 'done' ORDER BY run_id "
                                "LIMIT 1").fetchone()
    con.execute("UPDATE runs SET test_acc = NULL WHERE run_id = ?", (rid,))
    con.commit()
    con.close()
    build_report(db, tmp_path / "r", n_boot=10)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Runs left out of every analysis, by architecture:** diverged mlp: 1; failed mlp: 1." in md
    assert f"Left out: 1 finished run(s) without a finite test accuracy ({arch} × {ds})" in md


def test_runs_without_a_finite_learning_curve_are_named_in_finding3(tmp_path):
    """A finished run whose every validation accuracy is NaN counted silently as 'did not reach the target';
    Finding 3 now names such runs (a statistician's review)."""
    import sqlite3

    from doubles.stores import make_synthetic_store
    from minaction.report import build_report

    db = make_synthetic_store(tmp_path / "s.sqlite", n_failed=0, seed=3, main_lam=0.0)
    con = sqlite3.connect(db)
    rid, arch, ds = con.execute("SELECT run_id, arch, dataset FROM runs WHERE status = 'done' AND lam = 0 "
                                "ORDER BY run_id LIMIT 1").fetchone()
    con.execute("UPDATE runs SET val_acc = NULL WHERE run_id = ?", (rid,))
    con.execute("UPDATE epochs SET val_acc = NULL WHERE run_id = ?", (rid,))
    for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'evals'").fetchall():
        con.execute("UPDATE evals SET val_acc = NULL WHERE run_id = ?", (rid,))
    con.commit()
    con.close()
    build_report(db, tmp_path / "r", n_boot=10)
    md = (tmp_path / "r" / "report.md").read_text()
    assert (f"**1 finished run(s) have no finite validation accuracy on their learning curve** ({arch} on {ds} (1))"
            in md.split("# Finding 3")[1])
