"""The statistics a reviewer expects (issue 14 item 4): plain and partial eta squared side by
side (hand computation, pingouin, the bootstrap's fast path), the TOST equivalence test of
Finding 2 (hand computation and statsmodels), and "not comparable" for every missing design."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from minaction.report import build_report, check_traceable
from minaction.report.anova import (FastAnova, anova_table, bootstrap_partial_eta, eta_reading, factorial_analysis,
                                    factorial_design_gaps)
from minaction.report.sweep import sweep_design_gaps, tost_equivalence
from doubles.stores import factorial_frame, make_synthetic_store

pg = pytest.importorskip("pingouin", reason="pingouin is a test dependency (the reference ANOVA)")


# --- plain and partial eta squared ---------------------------------------------------------

def _hand_balanced(df):
    """Textbook two-way sums of squares of a balanced design (no library)."""
    y = df["accuracy"].to_numpy(float)
    mu = y.mean()
    ss_tot = ((y - mu) ** 2).sum()
    ss = {}
    for f in ("arch", "dataset"):
        g = df.groupby(f)["accuracy"]
        ss[f] = float((g.count() * (g.mean() - mu) ** 2).sum())
    cell = df.groupby(["arch", "dataset"])["accuracy"]
    ss_cells = float((cell.count() * (cell.mean() - mu) ** 2).sum())
    ss["arch:dataset"] = ss_cells - ss["arch"] - ss["dataset"]
    ss_res = float(((y - cell.transform("mean").to_numpy()) ** 2).sum())
    return ss, ss_res, ss_tot


@pytest.mark.parametrize("typ", [2, 3])
def test_plain_and_partial_eta_by_hand_balanced(typ):
    df = factorial_frame(levels_a=3, levels_b=4, n_per_cell=5, a_effect=0.01, seed=11)
    ss, ss_res, ss_tot = _hand_balanced(df)
    tab = anova_table(df, "accuracy", ["arch", "dataset"], typ)
    fa_partial, fa_plain = FastAnova(df, "accuracy", ["arch", "dataset"]).eta(typ)
    for term, v in ss.items():
        assert tab.loc[term, "np2"] == pytest.approx(v / (v + ss_res), abs=1e-12)
        assert tab.loc[term, "eta2"] == pytest.approx(v / ss_tot, abs=1e-12)
        assert fa_partial[term] == pytest.approx(v / (v + ss_res), abs=1e-10)
        assert fa_plain[term] == pytest.approx(v / ss_tot, abs=1e-10)
    # balanced: the effects and the residual share add up to the whole variance
    assert tab["eta2"].sum() == pytest.approx(1.0, abs=1e-12)
    # plain eta^2 is never above partial eta^2
    assert (tab["eta2"].iloc[:-1] <= tab["np2"].iloc[:-1] + 1e-15).all()


@pytest.mark.parametrize("levels", [dict(extra_null_factor=0), dict(extra_null_factor=3)])
def test_plain_eta_matches_pingouin_n2_balanced(levels):
    df = factorial_frame(seed=5, a_effect=0.02, **levels)
    factors = ["arch", "dataset"] + (["lam"] if "lam" in df.columns else [])
    for typ in (2, 3):
        ours = anova_table(df, "accuracy", factors, typ)
        ref = pg.anova(data=df, dv="accuracy", between=factors, ss_type=typ, effsize="n2")
        np.testing.assert_allclose(ours["eta2"].to_numpy(float)[:-1], ref["n2"].to_numpy(float)[:-1],
                                   rtol=0, atol=1e-10)
        refp = pg.anova(data=df, dv="accuracy", between=factors, ss_type=typ, effsize="np2")
        np.testing.assert_allclose(ours["np2"].to_numpy(float)[:-1], refp["np2"].to_numpy(float)[:-1],
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("typ", [2, 3])
def test_plain_eta_unbalanced_is_over_the_corrected_total(typ):
    """Unbalanced: Type II/III SS no longer add up to SS_total; ours divides by SS_total (the
    textbook definition), pingouin's n2 by the sum of its table's rows - documented, not hidden."""
    df = factorial_frame(seed=7, drop_frac=0.35, a_effect=0.02)
    assert df.groupby(["arch", "dataset"]).size().nunique() > 1
    y = df["accuracy"].to_numpy(float)
    ss_tot = ((y - y.mean()) ** 2).sum()
    ours = anova_table(df, "accuracy", ["arch", "dataset"], typ)
    np.testing.assert_allclose(ours["eta2"], ours["sum_sq"] / ss_tot, rtol=1e-12)
    ref = pg.anova(data=df, dv="accuracy", between=["arch", "dataset"], ss_type=typ, effsize="n2")
    np.testing.assert_allclose(ref["n2"].to_numpy(float)[:-1],
                               (ref["SS"] / ref["SS"].sum()).to_numpy(float)[:-1], rtol=1e-10)
    fast = FastAnova(df, "accuracy", ["arch", "dataset"]).plain_eta(typ)
    np.testing.assert_allclose([fast[t] for t in ours.index[:-1]], ours["eta2"].to_numpy(float)[:-1], atol=1e-10)


def test_fast_plain_eta_on_a_resample_matches_statsmodels():
    df = factorial_frame(seed=2, drop_frac=0.2, a_effect=0.01)
    fa = FastAnova(df, "accuracy", ["arch", "dataset"])
    rows = fa.resample_rows(np.random.default_rng(4))
    boot = fa.data.iloc[rows].reset_index(drop=True)
    for typ in (2, 3):
        ref = anova_table(boot, "accuracy", ["arch", "dataset"], typ)
        got = fa.plain_eta(typ, rows)
        for term in ("arch", "dataset", "arch:dataset"):
            assert got[term] == pytest.approx(ref.loc[term, "eta2"], abs=1e-9)


def test_bootstrap_gives_both_intervals():
    df = factorial_frame(seed=3, a_effect=0.0, b_effect=0.1, interaction=0.03)
    tab = factorial_analysis(df, "accuracy", ["arch", "dataset"], n_boot=200, seed=1)
    assert {"eta2", "eta2_lo", "eta2_hi", "np2_lo", "np2_hi"} <= set(tab.columns)
    t = tab[(tab["typ"] == 3) & (tab["term"] != "Residual")]
    assert ((t["eta2_lo"] >= 0) & (t["eta2_hi"] <= 1) & (t["eta2_lo"] <= t["eta2_hi"])).all()
    big = t.set_index("term").loc["dataset"]
    assert big["eta2_lo"] <= big["eta2"] <= big["eta2_hi"]
    b = bootstrap_partial_eta(df, "accuracy", ["arch", "dataset"], n_boot=20)
    assert {"eta2_lo", "eta2_hi"} <= set(b.columns)


def test_eta_reading_prefers_plain_when_datasets_dominate():
    # datasets differ a lot, the architecture barely, seeds hardly: partial eta^2 of everything
    # is near 1 while plain eta^2 of the architecture stays tiny - the paper's pattern
    df = factorial_frame(seed=9, a_effect=0.002, b_effect=0.1, interaction=0.05, noise=0.002)
    tab = factorial_analysis(df, "accuracy", ["arch", "dataset"], n_boot=0)
    r = eta_reading(tab, 3).set_index("reading")
    assert r.iloc[0]["ss_int_over_ss_res"] == pytest.approx(0.44 / 0.56)
    assert r.loc["ours, plain η²", "log_distance"] < r.loc["ours, partial η²", "log_distance"]
    t3 = tab[tab["typ"] == 3].set_index("term")
    assert r.loc["ours, plain η²", "arch"] == pytest.approx(t3.loc["arch", "eta2"])
    assert r.loc["ours, partial η²", "residual_share"] == pytest.approx(t3.loc["Residual", "eta2"])


# --- TOST ------------------------------------------------------------------------------

def _runs(acc0, acc1, seeds0=None, seeds1=None, lam=1e-3):
    seeds0 = list(range(len(acc0))) if seeds0 is None else seeds0
    seeds1 = list(range(len(acc1))) if seeds1 is None else seeds1
    return pd.DataFrame({"dataset": "mnist", "arch": "mlp", "lam": [0.0] * len(acc0) + [lam] * len(acc1),
                         "seed": seeds0 + seeds1, "test_acc": list(acc0) + list(acc1)})


def test_tost_paired_by_hand():
    acc0 = [0.900, 0.905, 0.910, 0.902]
    acc1 = [0.899, 0.903, 0.911, 0.900]  # per seed: -0.1, -0.2, +0.1, -0.2 pp
    r = tost_equivalence(_runs(acc0, acc1), margin_pp=0.5, alpha=0.05).iloc[0]
    assert r["test"] == "paired t" and r["n"] == 4 and r["df"] == 3
    # by hand: mean -0.1, sd sqrt(0.06 / 3), se = sd / 2
    se = np.sqrt(0.06 / 3) / 2
    assert r["d_acc_pp"] == pytest.approx(-0.1, abs=1e-12) and r["se_pp"] == pytest.approx(se, rel=1e-9)
    assert r["t_lower"] == pytest.approx(0.4 / se, rel=1e-9) and r["t_upper"] == pytest.approx(-0.6 / se, rel=1e-9)
    assert r["t_lower"] == pytest.approx(5.656854, rel=1e-6) and r["t_upper"] == pytest.approx(-8.485281, rel=1e-6)
    p_lo, p_hi = stats.t.sf(0.4 / se, 3), stats.t.cdf(-0.6 / se, 3)
    assert r["p_lower"] == pytest.approx(p_lo, rel=1e-9) and r["p_upper"] == pytest.approx(p_hi, rel=1e-9)
    assert r["p_tost"] == pytest.approx(max(p_lo, p_hi)) and bool(r["equivalent"])
    h = stats.t.ppf(0.95, 3) * se
    assert r["ci_lo"] == pytest.approx(-0.1 - h) and r["ci_hi"] == pytest.approx(-0.1 + h)
    assert (r["ci_lo"] > -0.5 and r["ci_hi"] < 0.5) == bool(r["equivalent"])
    # statsmodels' paired TOST gives the same p-value
    from statsmodels.stats.weightstats import ttost_paired

    p_sm = ttost_paired(100 * np.array(acc1), 100 * np.array(acc0), -0.5, 0.5)[0]
    assert r["p_tost"] == pytest.approx(p_sm, rel=1e-9)


def test_tost_welch_when_seeds_do_not_pair():
    acc0 = [0.900, 0.905, 0.910, 0.902, 0.907]
    acc1 = [0.901, 0.899, 0.912]
    r = tost_equivalence(_runs(acc0, acc1, seeds1=[10, 11, 12]), margin_pp=0.5).iloc[0]
    assert r["test"] == "Welch t" and r["n"] == 3 and r["n0"] == 5
    a0, a1 = 100 * np.array(acc0), 100 * np.array(acc1)
    v0, v1 = a0.var(ddof=1) / 5, a1.var(ddof=1) / 3
    se = np.sqrt(v0 + v1)
    df = (v0 + v1) ** 2 / (v0 ** 2 / 4 + v1 ** 2 / 2)
    m = a1.mean() - a0.mean()
    assert r["d_acc_pp"] == pytest.approx(m) and r["se_pp"] == pytest.approx(se) and r["df"] == pytest.approx(df)
    p = max(stats.t.sf((m + 0.5) / se, df), stats.t.cdf((m - 0.5) / se, df))
    assert r["p_tost"] == pytest.approx(p, rel=1e-9)
    from statsmodels.stats.weightstats import ttost_ind

    assert r["p_tost"] == pytest.approx(ttost_ind(a1, a0, -0.5, 0.5, usevar="unequal")[0], rel=1e-9)


def test_tost_not_shown_when_noisy_and_none_without_replicates():
    noisy = tost_equivalence(_runs([0.90, 0.92, 0.88, 0.91], [0.905, 0.89, 0.90, 0.925])).iloc[0]
    assert abs(noisy["d_acc_pp"]) < 0.5 and not noisy["equivalent"]  # a small mean is not equivalence
    one = tost_equivalence(_runs([0.90], [0.90])).iloc[0]
    assert one["test"] == "none" and pd.isna(one["equivalent"]) and "fewer than 2 seeds" in one["note"]
    # no spread (se = 0): t is undefined; no test rather than "equivalent" with a zero-width CI (a
    # statistician's review: two collapsed models at chance were called equivalent with certainty)
    exact = tost_equivalence(_runs([0.9, 0.8], [0.9, 0.8])).iloc[0]  # identical pairs
    assert pd.isna(exact["p_tost"]) and pd.isna(exact["equivalent"]) and pd.isna(exact["ci_lo"])
    assert "no spread" in exact["note"] and "+0 pp" in exact["note"] and "pair" in exact["note"]
    off = tost_equivalence(_runs([0.9, 0.8], [0.91, 0.81])).iloc[0]  # exactly +1 pp every seed
    assert pd.isna(off["equivalent"]) and "+1 pp" in off["note"]
    flat = tost_equivalence(_runs([0.9, 0.9], [0.9, 0.9], seeds1=[5, 6])).iloc[0]  # Welch, no spread either side
    assert flat["test"] == "Welch t" and pd.isna(flat["equivalent"]) and "no spread" in flat["note"]


# --- "not comparable" for each missing design ---------------------------------------------

def test_factorial_design_gaps_name_what_is_missing():
    full = pd.DataFrame({"arch": ["a", "a", "b", "b"] * 2, "dataset": ["x"] * 4 + ["y"] * 4, "test_acc": 0.5})
    assert factorial_design_gaps(full) == []
    g = factorial_design_gaps(full[full["arch"] == "a"])
    assert g == ["1 arch level(s) (a); at least 2 are needed"]
    g = factorial_design_gaps(full.drop_duplicates(["arch", "dataset"]))
    assert len(g) == 1 and "4 of 4 cell(s) with fewer than 2 runs" in g[0] and "a/x (n = 1)" in g[0]
    one_thin = full.drop(index=0)  # a/x keeps 1 run: one cell of four without a replicate
    assert factorial_design_gaps(one_thin, max_thin_frac=0.25) == []
    assert factorial_design_gaps(one_thin) == ["1 of 4 cell(s) with fewer than 2 runs (no replicate seeds): a/x (n = 1)"]
    g = factorial_design_gaps(full[~((full["arch"] == "b") & (full["dataset"] == "y"))])
    assert g == ["1 empty cell(s) of the arch x dataset design: b/y"]


def test_sweep_design_gaps_name_what_is_missing():
    base = _runs([0.9, 0.91], [0.9, 0.9])
    fm = base.assign(dataset="fashion_mnist")
    assert sweep_design_gaps(pd.concat([base, fm])) == []
    assert sweep_design_gaps(base) == ["no finished runs on fashion_mnist"]
    g = sweep_design_gaps(pd.concat([base, fm[fm["lam"] > 0]]))
    assert g == ["fashion_mnist has no architecture with at least 2 seeds at λ = 0 and at a λ > 0 "
                 "(mlp: no λ = 0 runs)"]
    g = sweep_design_gaps(pd.concat([base, fm[fm["lam"] == 0]]))
    assert "mlp: no λ > 0 runs" in g[0]
    g = sweep_design_gaps(pd.concat([base, fm[fm["seed"] == 0]]))
    assert "mlp: 1 seed(s) at λ = 0, at most 1 at a λ > 0" in g[0]


STORE = dict(archs=("mlp", "bimodal_true"), datasets={"mnist": "vision", "fashion_mnist": "vision", "sst2": "text"},
             lams=(0.0, 1e-3), unbalanced=False, n_failed=0)


@pytest.mark.parametrize("case, kwargs, finding, words", [
    ("one architecture", dict(archs=("mlp",)), 1, ["1 arch level(s) (mlp)"]),
    ("one dataset", dict(datasets={"mnist": "vision"}), 1, ["1 dataset level(s) (mnist)"]),
    ("no replicates", dict(seeds=1), 1, ["fewer than 2 runs (no replicate seeds)", "mlp/mnist (n = 1)"]),
    ("no replicates", dict(seeds=1), 2, ["mnist has no architecture with at least 2 seeds",
                                         "1 seed(s) at λ = 0"]),
    ("no fashion_mnist", dict(datasets={"mnist": "vision", "sst2": "text"}), 2,
     ["no finished runs on fashion_mnist"]),
    ("no lambda = 0", dict(lams=(1e-4, 1e-3), main_lam=1e-3), 2, ["mnist", "mlp: no λ = 0 runs"]),
])
def test_not_comparable_for_each_missing_design(tmp_path, case, kwargs, finding, words):
    db = make_synthetic_store(tmp_path / "s.sqlite", seed=4, **{**STORE, "seeds": 3, **kwargs})
    res = build_report(db, tmp_path / "o", n_boot=5)
    assert res["verdicts"][finding] == "not comparable", case
    why = pd.read_csv(tmp_path / "o" / "tables" / "paper_comparison.csv").set_index("finding").loc[finding, "why"]
    assert "lacks" in why
    for w in words:
        assert w in why, (case, why)
    assert check_traceable(tmp_path / "o") == []


def test_finding1_needs_the_papers_design_for_a_verdict(tmp_path):
    """A factorial of two vision datasets and three architectures (the λ-sweep's store) is analysed, but
    Finding 1 (architectures across modalities) gets no verdict: it names the missing architecture and
    the single modality."""
    db = make_synthetic_store(tmp_path / "s.sqlite", seed=4, seeds=3, archs=("mlp", "bimodal_true",
                              "physics_lagrangian"), datasets={"mnist": "vision", "fashion_mnist": "vision"},
                              lams=(0.0, 1e-3), unbalanced=False, n_failed=0)
    res = build_report(db, tmp_path / "o", n_boot=20)
    assert res["verdicts"][1] == "not comparable"
    comp = pd.read_csv(tmp_path / "o" / "tables" / "paper_comparison.csv").set_index("finding")
    why = comp.loc[1, "why"]
    assert "no finished runs of cnn" in why and "1 modality (vision)" in why
    assert (tmp_path / "o" / "tables" / "anova.csv").is_file()  # the ANOVA is still shown


def test_complete_design_gets_verdicts_and_both_etas(tmp_path):
    db = make_synthetic_store(tmp_path / "s.sqlite", seed=4, seeds=3, **STORE)
    # the two architectures stand for the paper's two kinds here (Finding 1 needs every architecture of both)
    res = build_report(db, tmp_path / "o", n_boot=20, conventional=("mlp",), energy_first=("bimodal_true",))
    assert res["verdicts"][1] != "not comparable" and res["verdicts"][2] != "not comparable"
    md = (tmp_path / "o" / "report.md").read_text()
    assert "plain η² [95% CI, bootstrap]" in md and "partial η² [95% CI, exact]" in md
    assert "Which η² the paper reports" in md
    # a reading is named only when the paper's pair is at least eta_reading_margin (1) closer to it
    r = pd.read_csv(tmp_path / "o" / "tables" / "eta_reading.csv").set_index("reading")["log_distance"]
    apart = abs(r["ours, plain η²"] - r["ours, partial η²"]) >= 1.0
    assert ("most plausibly" in md) == apart and ("do not tell which η²" in md) == (not apart)
    assert "Under either reading the claim is" in md or "The readings disagree" in md
    tost = pd.read_csv(tmp_path / "o" / "tables" / "lambda_sweep_tost.csv")
    assert set(tost["test"]) == {"paired t"} and len(tost) == 2 * 2  # 2 datasets x 2 archs x one λ > 0
    assert check_traceable(tmp_path / "o") == []
