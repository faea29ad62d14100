"""Finding 1's statistics: Type II/III ANOVA, partial eta squared against pingouin, the
fast bootstrap path against statsmodels, and the known effects of synthetic designs."""
import numpy as np
import pandas as pd
import pytest

from minaction.report.anova import (FastAnova, anova_table, bootstrap_partial_eta, cell_counts,
                                    factorial_analysis)
from doubles.stores import factorial_frame

pg = pytest.importorskip("pingouin", reason="pingouin is a test dependency (the reference ANOVA)")

DESIGNS = {
    "balanced-2way": dict(drop_frac=0.0, extra_null_factor=0),
    "unbalanced-2way": dict(drop_frac=0.35, extra_null_factor=0),
    "balanced-3way": dict(drop_frac=0.0, extra_null_factor=3),
    "unbalanced-3way": dict(drop_frac=0.35, extra_null_factor=3),
}


def _factors(df):
    return ["arch", "dataset"] + (["lam"] if "lam" in df.columns else [])


@pytest.mark.parametrize("typ", [2, 3])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_partial_eta_matches_pingouin(design, typ):
    df = factorial_frame(seed=3, **DESIGNS[design])
    factors = _factors(df)
    if "unbalanced" in design:
        assert df.groupby(factors).size().nunique() > 1  # really unbalanced
    ours = anova_table(df, "accuracy", factors, typ)
    ref = pg.anova(data=df, dv="accuracy", between=factors, ss_type=typ, effsize="np2")
    ref_np2 = ref["np2"].to_numpy(float)[:-1]
    assert len(ref_np2) == len(ours) - 1
    np.testing.assert_allclose(ours["np2"].to_numpy(float)[:-1], ref_np2, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours["sum_sq"].to_numpy(float), ref["SS"].to_numpy(float), rtol=1e-10, atol=1e-12)
    fast = FastAnova(df, "accuracy", factors).partial_eta(typ)
    np.testing.assert_allclose([fast[t] for t in ours.index[:-1]], ref_np2, rtol=0, atol=1e-10)


def test_type2_and_type3_differ_when_unbalanced():
    df = factorial_frame(seed=3, drop_frac=0.35, a_effect=0.03)
    t2 = anova_table(df, "accuracy", ["arch", "dataset"], 2)
    t3 = anova_table(df, "accuracy", ["arch", "dataset"], 3)
    assert abs(t2.loc["arch", "sum_sq"] - t3.loc["arch", "sum_sq"]) > 1e-8
    # the highest-order term is the same under both types
    assert t2.loc["arch:dataset", "sum_sq"] == pytest.approx(t3.loc["arch:dataset", "sum_sq"], rel=1e-9)


def test_known_effects_found():
    df = factorial_frame(seed=0, n_per_cell=8, a_effect=0.0, interaction=0.05, noise=0.01, drop_frac=0.2)
    tab = factorial_analysis(df, "accuracy", ["arch", "dataset"], n_boot=100, seed=1)
    for typ in (2, 3):
        t = tab[tab["typ"] == typ].set_index("term")
        assert t.loc["arch:dataset", "np2"] > 0.8 and t.loc["arch:dataset", "p"] < 1e-10
        assert t.loc["arch", "np2"] < 0.1  # the null factor: near zero
        for term in ("arch", "dataset", "arch:dataset"):
            lo, hi, est = t.loc[term, ["np2_lo", "np2_hi", "np2"]]
            assert 0 <= lo <= hi <= 1
            assert lo - 0.02 <= est <= hi + 0.02


def test_null_third_factor_near_zero():
    df = factorial_frame(seed=5, n_per_cell=5, extra_null_factor=3)
    t = anova_table(df, "accuracy", ["arch", "dataset", "lam"], 3)
    assert t.loc["lam", "np2"] < 0.1 and t.loc["lam", "p"] > 1e-3
    assert t.loc["arch:dataset", "np2"] > 0.8


def test_bootstrap_reproducible_and_configurable():
    df = factorial_frame(seed=2, drop_frac=0.3)
    a = bootstrap_partial_eta(df, "accuracy", ["arch", "dataset"], n_boot=30, seed=7)
    b = bootstrap_partial_eta(df, "accuracy", ["arch", "dataset"], n_boot=30, seed=7)
    c = bootstrap_partial_eta(df, "accuracy", ["arch", "dataset"], n_boot=30, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert set(a["n_boot"]) == {30}


def test_bootstrap_resamples_within_cells():
    df = factorial_frame(seed=2, drop_frac=0.3)
    fa = FastAnova(df, "accuracy", ["arch", "dataset"])
    rows = fa.resample_rows(np.random.default_rng(0))
    drawn = fa.data.iloc[rows].groupby(["arch", "dataset"]).size()
    orig = fa.data.groupby(["arch", "dataset"]).size()
    pd.testing.assert_series_equal(drawn.sort_index(), orig.sort_index())
    # a resample given as row weights equals refitting statsmodels on the resampled rows
    ref = anova_table(fa.data.iloc[rows].reset_index(drop=True), "accuracy", ["arch", "dataset"], 3)
    fast = fa.partial_eta(3, rows)
    for term in ("arch", "dataset", "arch:dataset"):
        assert fast[term] == pytest.approx(ref.loc[term, "np2"], abs=1e-10)


def test_cell_counts_and_errors():
    df = factorial_frame(seed=1, drop_frac=0.3)
    counts = cell_counts(df, ["arch", "dataset"])
    assert counts["n"].sum() == len(df)
    with pytest.raises(ValueError, match="typ must be 2 or 3"):
        anova_table(df, "accuracy", ["arch", "dataset"], 1)
    holed = df[~((df["arch"] == "a0") & (df["dataset"] == "d0"))]
    with pytest.raises(ValueError, match="empty cells"):
        anova_table(holed, "accuracy", ["arch", "dataset"], 2)
    with pytest.raises(ValueError, match="fewer than 2 levels"):
        anova_table(df[df["arch"] == "a0"], "accuracy", ["arch", "dataset"], 2)
    with pytest.raises(ValueError, match="missing"):
        anova_table(df, "nope", ["arch", "dataset"], 2)
