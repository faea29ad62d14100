"""Runs of different training budgets are never pooled (issue 10 item 4, issue 14 item 4).

A store holding smoke-sized runs (256 training samples) and lambda-sweep runs (4,000) of the
same dataset used to be reported as one cell. Now the report refuses such a store, naming
each budget (id, preset, runs, the fields that differ), and ``--preset`` / ``--budget``
pick one; a report of a quick budget says at the top that it cannot test the paper."""
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from minaction.report import build_report, check_traceable, load_store
from minaction.report.store import MixedBudgetError, budget_table, select_budget
from doubles.stores import make_synthetic_store

SMOKE = {"train_subset": 256, "val_subset": 128, "test_subset": 128, "epochs": 2}
SWEEP = {"train_subset": 4000, "val_subset": 1000, "test_subset": 2000, "epochs": 3}
SMALL = dict(archs=("mlp", "bimodal_true"), datasets={"mnist": "vision", "sst2": "text"}, seeds=3,
             lams=(0.0, 1e-3), unbalanced=False, n_failed=0)


@pytest.fixture()
def mixed_db(tmp_path):
    db = tmp_path / "mixed.sqlite"
    make_synthetic_store(db, preset="smoke", budget=SMOKE, seed=1, **SMALL)
    make_synthetic_store(db, preset="lambda-sweep", budget=SWEEP, seed=2, append=True,
                         **{**SMALL, "datasets": {"mnist": "vision"}})
    return db


def test_mixed_store_is_refused_and_names_the_budgets(mixed_db, tmp_path):
    store = load_store(mixed_db)
    assert store.runs_all["budget_id"].nunique() == 2
    with pytest.raises(MixedBudgetError) as ei:
        build_report(mixed_db, tmp_path / "out", n_boot=5)
    msg = str(ei.value)
    # which dataset, which presets, how many runs, what differs, and how to pick one
    assert "mnist" in msg and "sst2" not in msg.split("Report one budget")[0]
    assert "preset smoke" in msg and "preset lambda-sweep" in msg
    assert "train_subset=256" in msg and "train_subset=4000" in msg and "epochs=2" in msg
    assert "--preset" in msg and "--budget" in msg
    for bid in store.runs_all["budget_id"].unique():
        assert bid in msg
    assert not (tmp_path / "out" / "report.md").exists()


def test_preset_flag_picks_one_budget(mixed_db, tmp_path):
    res = build_report(mixed_db, tmp_path / "sweep", n_boot=5, preset="lambda-sweep")
    b = pd.read_csv(tmp_path / "sweep" / "tables" / "budgets.csv")
    assert list(b["presets"]) == ["lambda-sweep"] and list(b["datasets"]) == ["mnist"]
    assert b["runs"].sum() == 2 * 2 * 3
    assert "train_subset=4000" in b.loc[0, "budget"]
    assert check_traceable(tmp_path / "sweep") == []
    assert res["verdicts"][1] == "not comparable"  # one dataset only
    res = build_report(mixed_db, tmp_path / "smoke", n_boot=5, preset="smoke")
    b = pd.read_csv(tmp_path / "smoke" / "tables" / "budgets.csv")
    assert list(b["datasets"]) == ["mnist, sst2"] and list(b["presets"]) == ["smoke"] and b["runs"].sum() == 12 + 6
    with pytest.raises(ValueError, match=r"no runs of preset 'full' \(presets in the store: lambda-sweep, smoke\)"):
        build_report(mixed_db, tmp_path / "x", n_boot=5, preset="full")


def test_budget_flag_picks_by_id(mixed_db, tmp_path):
    store = load_store(mixed_db)
    bt = budget_table(store.runs_all, store.budgets)
    sweep_id = bt.loc[bt["presets"] == "lambda-sweep", "budget_id"].iloc[0]
    sel = select_budget(store, budget=[sweep_id[:5]])
    assert set(sel.runs_all["preset"]) == {"lambda-sweep"}
    assert set(sel.epochs["run_id"]) <= set(sel.runs_all["run_id"]) and len(sel.epochs)
    with pytest.raises(ValueError, match="matches 0 budgets"):
        select_budget(store, budget=["zzzz"])


def test_cli_refuses_then_selects(mixed_db, tmp_path, capsys):
    from minaction.cli import main

    assert main(["report", "--db", str(mixed_db), "--out", str(tmp_path / "o"), "--n-boot", "5"]) == 2
    err = capsys.readouterr().err
    assert "different training budgets" in err and "smoke" in err and "lambda-sweep" in err
    assert main(["report", "--db", str(mixed_db), "--out", str(tmp_path / "o"), "--n-boot", "5",
                 "--preset", "smoke"]) == 0


def test_same_preset_name_two_budgets_is_refused(tmp_path):
    """A preset edited between two runs of one database: same name, two budgets."""
    db = tmp_path / "edited.sqlite"
    make_synthetic_store(db, preset="lambda-sweep", budget=SWEEP, seed=1, **SMALL)
    make_synthetic_store(db, preset="lambda-sweep", budget={**SWEEP, "lr": 3e-3}, seed=2, append=True,
                         **{**SMALL, "archs": ("mlp",)})
    with pytest.raises(MixedBudgetError, match=r"lr=0\.001.* vs .*lr=0\.003|lr=0\.003.* vs .*lr=0\.001") as ei:
        build_report(db, tmp_path / "o", n_boot=5, preset="lambda-sweep")
    assert "--budget" in str(ei.value)


def test_runs_without_recorded_budget_fall_back_to_preset_name(tmp_path):
    db = tmp_path / "old.sqlite"
    make_synthetic_store(db, preset="smoke", seed=1, **SMALL)
    make_synthetic_store(db, preset="lambda-sweep", seed=2, append=True, **SMALL)
    con = sqlite3.connect(db)
    for rid, cfg in con.execute("SELECT run_id, config_json FROM runs").fetchall():
        c = json.loads(cfg)
        c.pop("budget")
        con.execute("UPDATE runs SET config_json = ? WHERE run_id = ?", (json.dumps(c), rid))
    con.commit()
    con.close()
    with pytest.raises(MixedBudgetError, match="budget preset:smoke .*budget not recorded"):
        build_report(db, tmp_path / "o", n_boot=5)


def test_quick_budget_is_flagged_at_the_top(tmp_path):
    db = tmp_path / "smoke.sqlite"
    make_synthetic_store(db, preset="smoke", budget=SMOKE, seed=1, **SMALL)
    build_report(db, tmp_path / "o", n_boot=5)
    md = (tmp_path / "o" / "report.md").read_text()
    first = md.split("\n## ", 1)[0]  # before the first section
    assert "too small to test the paper's claims" in first
    assert "train_subset=256" in first and "test_subset=128" in first and "preset `smoke`" in first
    assert check_traceable(tmp_path / "o") == []
    html = (tmp_path / "o" / "report.html").read_text()
    assert html.index("too small to test") < html.index("The store")


def test_full_budget_is_not_flagged(tmp_path):
    db = tmp_path / "full.sqlite"
    make_synthetic_store(db, preset="full", seed=1, **SMALL)
    build_report(db, tmp_path / "o", n_boot=5)
    assert "too small to test" not in (tmp_path / "o" / "report.md").read_text()


def test_design_flag_names_the_missing_runs(tmp_path):
    """``--design PRESET``: a store that holds part of a preset's runs is reported as PARTIAL, with the
    missing dataset x architecture cells named (issue 14 item 6)."""
    from minaction.study.presets import load_preset

    spec = load_preset("factorial")
    db = tmp_path / "slice.sqlite"
    # the factorial's design on two of its datasets, one run short on one cell
    make_synthetic_store(db, archs=tuple(spec["archs"]), datasets={"ecg200": "physiological", "nmnist": "neuromorphic"},
                         seeds=len(spec["seeds"]), lams=tuple(spec["lams"]), main_lam=spec["lams"][0],
                         sweep_datasets=(), unbalanced=False, n_failed=0, design="factorial")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM runs WHERE arch = 'cnn' AND dataset = 'nmnist' AND seed = 3")
    build_report(db, tmp_path / "out", n_boot=5, design="factorial")
    md = (tmp_path / "out" / "report.md").read_text()
    n_design = len(spec["archs"]) * len(spec["datasets"]) * len(spec["seeds"])
    head = md.split("# The store")[0]
    assert f"**PARTIAL: 79 of the {n_design} runs of the design `factorial` have finished.**" in head
    assert "mnist (all 4 architectures, 40 runs)" in head and "nmnist: cnn (1 runs)" in head
    assert "ecg200" not in head.split("Missing:")[1].split(".")[0]
    cov = pd.read_csv(tmp_path / "out" / "tables" / "coverage.csv")
    total = cov[(cov["dataset"] == "all") & (cov["arch"] == "all")].iloc[0]
    assert (total["planned"], total["done"], total["missing"]) == (n_design, 79, n_design - 79)
    cells = cov[cov["arch"] != "all"]
    assert len(cells) == len(spec["archs"]) * len(spec["datasets"]) and cells["planned"].sum() == n_design
    assert check_traceable(tmp_path / "out") == []
    # the whole design finished: it says so, and there is no banner
    make_synthetic_store(db, archs=("mlp", "cnn"), datasets={"ecg200": "physiological"}, seeds=2, lams=(1e-4,),
                         main_lam=1e-4, sweep_datasets=(), unbalanced=False, n_failed=0, design="factorial")
    small = tmp_path / "small.toml"
    text = (Path(load_preset.__globals__["preset_path"]("factorial")).read_text()
            .replace('name = "factorial"', 'name = "small"'))
    import re
    text = re.sub(r"archs = \[.*?\]", 'archs = ["mlp", "cnn"]', text, count=1)
    text = re.sub(r"datasets = \[.*?\]", 'datasets = ["ecg200"]', text, count=1, flags=re.S)
    text = re.sub(r"seeds = \[.*?\]", "seeds = [0, 1]", text, count=1)
    small.write_text(text)
    build_report(db, tmp_path / "out2", n_boot=5, design=str(small))
    md = (tmp_path / "out2" / "report.md").read_text()
    assert "PARTIAL" not in md and f"Complete: all 4 runs of the design `{small}` have finished" in md


def test_energy_definition_and_budget_text_follow_the_runs_model_options(tmp_path):
    """A custom preset's energy options (energy="l1", energy_reduction="mean", activation="tanh") are what the
    report's definition of E and its budget table say; the report said p = 2 and ReLU whatever the runs used."""
    db = tmp_path / "l1.sqlite"
    make_synthetic_store(db, preset="mine", budget={**SWEEP, "energy": "l1", "energy_reduction": "mean",
                                                    "activation": "tanh"}, seed=1, **SMALL)
    build_report(db, tmp_path / "o", n_boot=5)
    md = (tmp_path / "o" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| energy E |"))
    assert "mean over units of \\|a\\|^p, p = 1; tanh units" in row
    budgets = pd.read_csv(tmp_path / "o" / "tables" / "budgets.csv")
    assert "activation=tanh, energy=l1, energy_reduction=mean" in budgets["budget"][0]

    db = tmp_path / "default.sqlite"
    make_synthetic_store(db, preset="lambda-sweep", budget=SWEEP, seed=1, **SMALL)
    build_report(db, tmp_path / "d", n_boot=5)
    md = (tmp_path / "d" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| energy E |"))
    assert "sum over units of \\|a\\|^p, p = 2 |" in row
    assert "activation=" not in pd.read_csv(tmp_path / "d" / "tables" / "budgets.csv")["budget"][0]


def test_a_partial_store_says_so_without_design(tmp_path):
    """A store whose preset specification is in its meta table (every `study run` keeps it) and that holds part
    of that preset's runs is reported PARTIAL without --design; a reviewer's report of a store filled with
    `--limit` printed Finding 3's numbers with no word that 20 of 32 runs were missing."""
    from minaction.study.presets import load_preset

    spec = load_preset("factorial")
    spec = {**spec, "datasets": ["ecg200", "nmnist"]}
    db = tmp_path / "slice.sqlite"
    make_synthetic_store(db, archs=tuple(spec["archs"]), datasets={"ecg200": "physiological", "nmnist": "neuromorphic"},
                         seeds=len(spec["seeds"]), lams=tuple(spec["lams"]), main_lam=spec["lams"][0],
                         sweep_datasets=(), unbalanced=False, n_failed=0, design=spec)
    with sqlite3.connect(db) as con:
        (name,), = con.execute("SELECT DISTINCT preset FROM runs").fetchall()
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"preset:{name}", json.dumps({**spec, "name": name})))
    build_report(db, tmp_path / "complete", n_boot=5)
    assert "PARTIAL" not in (tmp_path / "complete" / "report.md").read_text()  # complete: nothing added
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM runs WHERE arch = 'cnn' AND dataset = 'nmnist' AND seed = 3")
    build_report(db, tmp_path / "out", n_boot=5)
    head = (tmp_path / "out" / "report.md").read_text().split("# The store")[0]
    n = len(spec["archs"]) * 2 * len(spec["seeds"])
    assert f"**PARTIAL: {n - 1} of the {n} runs of the design `{name}` (the preset specification kept in the store)" \
           in head and "nmnist: cnn (1 runs)" in head


def test_partial_sweep_gives_finding2_no_verdict_and_the_command_prints_the_notices(tmp_path, capsys):
    """The PARTIAL banner promised that a finding whose design is not finished says *not comparable*; Finding 2
    gave 'not reproduced, 0 of 6' on a live full study whose cnn sweep had not run (a trial). The command also
    printed only the verdicts, without the PARTIAL line or the older-FLOPs-rule warning."""
    from minaction.cli import main as minaction_main
    from minaction.study.presets import load_preset

    spec = load_preset("lambda-sweep")
    db = tmp_path / "sweep.sqlite"
    make_synthetic_store(db, archs=tuple(spec["archs"]), datasets={"mnist": "vision", "fashion_mnist": "vision"},
                         seeds=len(spec["seeds"]), lams=tuple(spec["lams"]), main_lam=0.0,
                         sweep_datasets=("mnist", "fashion_mnist"), unbalanced=False, n_failed=0, design=spec)
    with sqlite3.connect(db) as con:
        (name,), = con.execute("SELECT DISTINCT preset FROM runs").fetchall()
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"preset:{name}", json.dumps({**spec, "name": name})))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('flops_count', 'step')")
    res = build_report(db, tmp_path / "complete", n_boot=5)
    assert res["verdicts"][2] != "not comparable" and res["notices"] == []
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM runs WHERE arch = 'mlp' AND dataset = 'mnist' AND lam > 0.005 AND seed = 3")
        con.execute("DELETE FROM meta WHERE key = 'flops_count'")
    res = build_report(db, tmp_path / "partial", n_boot=5)
    md = (tmp_path / "partial" / "report.md").read_text()
    assert res["verdicts"][2] == "not comparable"
    assert "have not all finished (mnist: mlp (1 runs)); on the finished runs so far:" in md
    assert "the main λ" in md.split("# The store")[0].lower()
    assert len(res["notices"]) == 1 and res["notices"][0].startswith("PARTIAL")
    assert minaction_main(["report", "--db", str(db), "--out", str(tmp_path / "cli"), "--n-boot", "5"]) == 0
    out = capsys.readouterr().out
    assert "note: PARTIAL" in out
    assert check_traceable(tmp_path / "partial") == []


def test_lam_without_runs_is_refused(tmp_path):
    """`--lam 0.5` where no run has λ = 0.5 wrote a report (rc 0) whose reasons were empty ('neuromorphic: ;
    physiological: ; ...'); it is one error naming the λ values the store has."""
    db = tmp_path / "s.sqlite"
    make_synthetic_store(db, seed=1, **SMALL)
    with pytest.raises(ValueError, match=r"--lam 0.5: no finished run at that λ .*\{0, 0.001\}"):
        build_report(db, tmp_path / "o", n_boot=5, lam=0.5)


def test_design_counts_only_runs_of_its_budget(tmp_path):
    """A design's run is finished only where a run of its cell *and its budget* is: a smoke-budget store
    measured with `--design factorial` said '79 of the 400 runs have finished' (a trial)."""
    db = tmp_path / "other_budget.sqlite"
    make_synthetic_store(db, archs=("mlp", "cnn", "bimodal_true", "physics_lagrangian"),
                         datasets={"ecg200": "physiological"}, seeds=10, lams=(1e-4,), main_lam=1e-4,
                         sweep_datasets=(), unbalanced=False, n_failed=0)  # the synthetic budget
    build_report(db, tmp_path / "o", n_boot=5, design="factorial")
    head = (tmp_path / "o" / "report.md").read_text().split("# The store")[0]
    assert "**PARTIAL: 0 of the 400 runs of the design `factorial` have finished.**" in head


def test_preset_flag_measures_against_that_preset_only(tmp_path):
    """`report --preset A` on a store holding presets A and B: the design is A's, not A's and B's (the
    trial's `--preset lambda-sweep` on the full store listed 60 runs of another preset as missing)."""
    from minaction.study.presets import load_preset

    spec = load_preset("lambda-sweep")
    db = tmp_path / "two.sqlite"
    make_synthetic_store(db, archs=tuple(spec["archs"]), datasets={"mnist": "vision", "fashion_mnist": "vision"},
                         seeds=len(spec["seeds"]), lams=tuple(spec["lams"]), main_lam=0.0, preset="lambda-sweep",
                         sweep_datasets=("mnist", "fashion_mnist"), unbalanced=False, n_failed=0, design=spec)
    make_synthetic_store(db, archs=("mlp",), datasets={"ecg200": "physiological"}, seeds=2, lams=(1e-4,),
                         main_lam=1e-4, sweep_datasets=(), unbalanced=False, n_failed=0, preset="other", append=True)
    other = {**spec, "name": "other", "archs": ["mlp", "cnn"], "datasets": ["ecg200"], "lams": [1e-4],
             "seeds": [0, 1]}
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("preset:lambda-sweep", json.dumps(spec)))
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("preset:other", json.dumps(other)))
    build_report(db, tmp_path / "a", n_boot=5, preset="lambda-sweep")
    assert "PARTIAL" not in (tmp_path / "a" / "report.md").read_text()
    build_report(db, tmp_path / "b", n_boot=5)  # every preset of the store: other's cnn runs are missing
    assert "PARTIAL" in (tmp_path / "b" / "report.md").read_text()
