"""What a review of the published reports (docs/replication/) found, pinned: the tables do not
depend on the order a store holds its rows in; Finding 3's target is a named option whose
default is the mission's ("95% of the best final accuracy on that dataset"); the report names
the source it was given; a Limitations section from the data; the λ definitions say what
each finding used; a verdict's reason starts a sentence."""
import json
import re
import sqlite3

import numpy as np
import pandas as pd
import pytest

from minaction.report import build_report, check_traceable
from minaction.report.efficiency import per_run_efficiency
from minaction.report.limitations import dataset_table, inferred_test_size
from doubles.stores import make_synthetic_store

SMALL = dict(archs=("mlp", "cnn", "bimodal_true", "physics_lagrangian"),
             datasets={"mnist": "vision", "fashion_mnist": "vision", "sst2": "text", "ecg5000": "physiological"},
             seeds=4, n_failed=1)


def _copy_reversed(src, dst):
    """``src`` rewritten into ``dst`` with every table's rows inserted in reverse order (as a store imported
    from its archive holds them in another order than the store the study wrote)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    for name, sql in a.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall():
        b.execute(sql)
        rows = a.execute(f"SELECT * FROM {name}").fetchall()
        if rows:
            b.executemany(f"INSERT INTO {name} VALUES ({','.join('?' * len(rows[0]))})", rows[::-1])
    b.commit()
    a.close()
    b.close()
    return dst


def test_row_order_of_the_store_changes_no_table(tmp_path):
    """The bootstraps draw runs by position: loaded in SQLite's insertion order, the same runs in another
    order gave other CIs (the committed reports could not be rebuilt from their archives)."""
    db = make_synthetic_store(tmp_path / "a.sqlite", seed=7, **SMALL)
    rev = _copy_reversed(db, tmp_path / "b.sqlite")
    first = [sqlite3.connect(p).execute("SELECT * FROM runs LIMIT 1").fetchone()[0] for p in (db, rev)]
    assert first[0] != first[1]  # SQLite returns them in another order
    for d, store in (("a", db), ("b", rev)):
        build_report(store, tmp_path / d, n_boot=40, source="the same runs")
    tables = sorted(p.name for p in (tmp_path / "a" / "tables").iterdir())
    assert tables == sorted(p.name for p in (tmp_path / "b" / "tables").iterdir())
    for name in tables:
        assert (tmp_path / "a" / "tables" / name).read_bytes() == (tmp_path / "b" / "tables" / name).read_bytes(), name
    gains = pd.read_csv(tmp_path / "a" / "tables" / "efficiency_gains.csv")
    anova = pd.read_csv(tmp_path / "a" / "tables" / "anova.csv")
    assert gains["gain_pct_lo"].notna().any() and anova["np2_lo"].notna().any()  # CIs were compared
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()


def test_target_by_dataset_or_arch():
    curves = {"a": ("mlp", [0.5, 0.86, 0.9]), "b": ("bimodal_true", [0.7, 0.78, 0.8])}  # validation per epoch
    runs = pd.DataFrame([{"run_id": r, "dataset": "d", "modality": "m", "arch": arch, "lam": 0.0, "seed": 0,
                          "val_acc": max(c), "test_acc": max(c), "wall_time_s": 10.0}
                         for r, (arch, c) in curves.items()])
    epochs = pd.DataFrame([{"run_id": r, "epoch": e + 1, "val_acc": v, "wall_time_s": e + 1.0}
                           for r, (_, c) in curves.items() for e, v in enumerate(c)])
    ds = per_run_efficiency(runs, epochs, 0.95, target_by="dataset").set_index("run_id")
    assert ds["target"].tolist() == pytest.approx([0.855, 0.855])  # 0.95 x the best of any arch (0.9)
    assert ds.loc["a", "epochs_to_target"] == 2 and not ds.loc["b", "reached"]
    arch = per_run_efficiency(runs, epochs, 0.95, target_by="arch").set_index("run_id")
    assert arch["target"].tolist() == pytest.approx([0.855, 0.76])  # each arch's own best
    assert arch.loc["b", "reached"] and arch.loc["b", "epochs_to_target"] == 2
    with pytest.raises(ValueError, match="target_by"):
        per_run_efficiency(runs, epochs, 0.95, target_by="seed")


def test_target_by_is_a_report_option_named_beside_the_headline(tmp_path):
    db = make_synthetic_store(tmp_path / "s.sqlite", seed=8, **SMALL)
    build_report(db, tmp_path / "ds", n_boot=20)  # the default: the mission's definition
    build_report(db, tmp_path / "arch", n_boot=20, target_by="arch")
    for d, whose, per_cell in (("ds", "on the dataset (any architecture)", ["dataset", "lam"]),
                               ("arch", "of the run's own architecture", ["dataset", "lam", "arch"])):
        out = tmp_path / d
        defs = pd.read_csv(out / "tables" / "definitions.csv").set_index("name")
        assert defs.loc["target accuracy", "value"] == f"95% of the best final validation accuracy {whose}"
        assert json.loads((out / "tables" / "options.json").read_text())["target_by"] == ("dataset" if d == "ds"
                                                                                           else "arch")
        eff = pd.read_csv(out / "tables" / "efficiency_runs.csv")
        best = eff.groupby(per_cell)["final_val"].transform("max")
        np.testing.assert_allclose(eff["target"], 0.95 * best)
        comp = pd.read_csv(out / "tables" / "paper_comparison.csv").set_index("finding")
        assert "target 95% of the best final validation accuracy" in comp.loc[3, "ours"]
        assert comp.loc[3, "why"].startswith("Headline: training FLOPs to target, target 95%")
        assert check_traceable(out) == []
    e_ds = pd.read_csv(tmp_path / "ds" / "tables" / "efficiency_runs.csv")
    assert (e_ds.groupby(["dataset", "lam"])["target"].nunique() == 1).all()
    e_arch = pd.read_csv(tmp_path / "arch" / "tables" / "efficiency_runs.csv")
    assert (e_arch.groupby(["dataset", "lam"])["target"].nunique() > 1).any()
    with pytest.raises(ValueError, match="target_by"):
        build_report(db, tmp_path / "bad", target_by="seed")


def test_cli_target_by_and_source(tmp_path, capsys):
    from minaction.cli import main

    db = make_synthetic_store(tmp_path / "s.sqlite", seed=9, **SMALL)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "o"), "--n-boot", "10",
                 "--target-by", "arch", "--source", "docs/replication/x/runs.jsonl.gz"]) == 0
    opts = json.loads((tmp_path / "o" / "tables" / "options.json").read_text())
    assert opts["target_by"] == "arch" and opts["source"] == "docs/replication/x/runs.jsonl.gz"
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Source `docs/replication/x/runs.jsonl.gz`" in md and str(db) not in md
    assert "(option `target_by` = arch)" in md
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "p"), "--n-boot", "10"]) == 0
    md = (tmp_path / "p" / "report.md").read_text()
    assert f"Store `{db}`" in md and "(option `target_by` = dataset)" in md  # the path as given
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["report", "--db", str(db), "--out", str(tmp_path / "q"), "--target-by", "seed"])


def test_test_size_is_inferred_from_the_accuracies():
    rng = np.random.default_rng(0)
    for n in (100, 362, 1821, 7528, 10000):
        k = rng.integers(int(0.5 * n), n, 40)
        assert inferred_test_size(k / n) == n
    assert inferred_test_size([0.5, 0.25, 0.75]) == 4
    assert inferred_test_size(rng.random(40)) is None  # a continuous value (a mean, a synthetic store): not a count
    assert inferred_test_size([]) is None


def test_limitations_from_the_data(tmp_path):
    db = make_synthetic_store(tmp_path / "s.sqlite", seed=10, **SMALL)
    con = sqlite3.connect(db)
    # ecg5000 tests on 100 samples here, mnist on 10,000: accuracies are whole counts
    for ds, n in (("ecg5000", 100), ("mnist", 10000)):
        for rid, acc in con.execute("SELECT run_id, test_acc FROM runs WHERE dataset = ?", (ds,)).fetchall():
            con.execute("UPDATE runs SET test_acc = ? WHERE run_id = ?", (round(acc * n) / n, rid))
    con.commit()
    con.close()
    build_report(db, tmp_path / "o", n_boot=10)
    md = (tmp_path / "o" / "report.md").read_text()
    lim = md.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    t = pd.read_csv(tmp_path / "o" / "tables" / "limitations.csv").set_index("dataset")
    assert t.loc["ecg5000", "test_n"] == 100 and t.loc["mnist", "test_n"] == 10000
    assert np.isnan(t.loc["sst2", "test_n"]) and np.isnan(t.loc["sst2", "binomial_se_pp"])
    p = t.loc["ecg5000", "mean_test_acc"]
    assert t.loc["ecg5000", "binomial_se_pp"] == pytest.approx(100 * np.sqrt(p * (1 - p) / 100))
    assert "Small test sets: ecg5000 (100 test samples" in lim and "mnist (10000" not in lim
    sd = t["within_cell_sd"]  # pooled per dataset, beside the range of single cells (the audit: label them)
    assert f"pooled per dataset, from {sd.min():.3g} ({sd.idxmin()}) to {sd.max():.3g} ({sd.idxmax()})" in lim
    lo, hi = t["cell_sd_min"].idxmin(), t["cell_sd_max"].idxmax()
    assert (f"in one cell (architecture × dataset × λ) ranges from {t.loc[lo, 'cell_sd_min']:.3g} "
            f"({t.loc[lo, 'cell_sd_min_cell']}) to {t.loc[hi, 'cell_sd_max']:.3g} ({t.loc[hi, 'cell_sd_max_cell']})"
            in lim)
    assert "pools one residual variance" in lim and "reconstructions of the paper's Figure 1" in lim
    n_runs = int(pd.read_csv(tmp_path / "o" / "tables" / "runs_by_status.csv").set_index("status").loc["done", "runs"])
    assert f"Scale: {n_runs} finished runs" in lim and "2203" in lim
    assert check_traceable(tmp_path / "o") == []
    # one pooled SD per dataset over its (arch, λ) cells
    runs = pd.DataFrame({"dataset": "d", "modality": "m", "arch": ["a", "a", "b", "b"], "lam": 0.0,
                         "test_acc": [0.5, 0.7, 0.6, 0.6]})
    assert dataset_table(runs).loc[0, "within_cell_sd"] == pytest.approx(np.sqrt((0.02 + 0.0) / 2))


def test_lambda_definitions_and_sentences(tmp_path):
    """A store whose λ is crossed with every arch and dataset: Finding 1 takes λ as a factor while Finding 3
    reads one λ; the definitions said 'λ of Findings 1 and 3 | 0'. And no verdict's reason starts in
    lower case after its bold verdict."""
    ds = {"mnist": "vision", "fashion_mnist": "vision"}
    db = make_synthetic_store(tmp_path / "s.sqlite", archs=("mlp", "bimodal_true"), datasets=ds,
                              sweep_datasets=tuple(ds), lams=(0.0, 1e-3), seeds=3, seed=11, n_failed=0,
                              unbalanced=False)
    build_report(db, tmp_path / "o", n_boot=10)
    defs = pd.read_csv(tmp_path / "o" / "tables" / "definitions.csv").set_index("name")["value"]
    assert defs["λ of Finding 1"] == "a factor: 0, 0.001" and defs["λ of Finding 3"] == "0"
    assert "λ of Findings 1 and 3" not in defs.index
    md = (tmp_path / "o" / "report.md").read_text()
    assert re.findall(r"\*\*Finding \d: [a-z ]+\.\*\* [a-z]", md) == []
    assert "not comparable.** The ANOVA" in md  # one vision modality, no cnn: no verdict, capitalised
    # the store lacks the paper's design: no inference about which η² the paper reports
    assert "so it is not used to infer which η² the paper reports" in md and "most plausibly" not in md
    s = pd.read_csv(tmp_path / "o" / "tables" / "lambda_sweep_summary.csv").iloc[0]
    assert s["min_rescaling_share"] <= s["median_rescaling_share"] <= s["max_rescaling_share"]
    mod = pd.read_csv(tmp_path / "o" / "tables" / "lambda_sweep_moderate.csv")  # v1's 6%, per combination
    assert re.search(rf"E falls to 6% of λ = 0 or below in {int(mod['E_at_or_below_v1'].sum())} of {len(mod)}", md)
    assert re.search(r"the accuracy is TOST-equivalent to λ = 0 in \d of \d", md)
    # the interaction plot's means pool the λ values when λ is a factor (the audit: say so)
    assert "with λ a factor, each mean pools the runs of all 2 λ values" in md
    # a store with one λ: one row for both findings
    db1 = make_synthetic_store(tmp_path / "one.sqlite", seed=12, sweep_datasets=(), **SMALL)
    build_report(db1, tmp_path / "o1", n_boot=10)
    defs = pd.read_csv(tmp_path / "o1" / "tables" / "definitions.csv").set_index("name")["value"]
    assert defs["λ of Findings 1 and 3"] == "0"
    assert "Every run is at λ = 0: Findings 1 and 3 describe that λ only" in (tmp_path / "o1" / "report.md").read_text()


def test_datasets_reached_at_the_first_evaluation_are_flagged():
    """A reviewer's store: every ECG run reached the target at its first evaluation, and Finding 3 printed
    the ratio of the two architectures' FLOPs per step as a 'gain' with a zero-width CI. Such datasets are
    named (and their runs marked at_first_eval)."""
    import pandas as pd

    from minaction.report.efficiency import first_eval_datasets, per_run_efficiency

    runs, evals = [], []
    for ds, early in (("easy", True), ("hard", False)):
        for arch in ("mlp", "bimodal_true"):
            for seed in range(2):
                rid = f"{ds}-{arch}-{seed}"
                runs.append(dict(run_id=rid, dataset=ds, modality="physiological", arch=arch, lam=0.0, seed=seed,
                                 val_acc=0.9, test_acc=0.9, wall_time_s=1.0))
                accs = [0.9, 0.9, 0.9] if early else [0.3, 0.6, 0.9]
                for k, a in enumerate(accs, 1):
                    evals.append(dict(run_id=rid, step=5 * k, samples=320 * k, flops=1e6 * k, epoch=k / 3,
                                      val_acc=a, wall_time_s=0.1 * k))
    eff = per_run_efficiency(pd.DataFrame(runs), None, 0.95, evals=pd.DataFrame(evals), target_by="dataset")
    assert first_eval_datasets(eff, 0.0) == ["easy"]
    assert eff.set_index("run_id")["at_first_eval"].to_dict() == {r["run_id"]: r["dataset"] == "easy" for r in runs}
