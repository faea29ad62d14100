"""The report on stores the real study runner wrote: `minaction replicate` on the runner's
test-only synthetic stand-ins (fast, always runs), and the `smoke` preset on the real datasets
and architectures (skipped with a reason where those are not available)."""
import json

import pandas as pd
import pytest

study = pytest.importorskip("minaction.study", reason="the study runner (minaction.study) is not available")

import doubles.study  # noqa: E402,F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.report import build_report, check_traceable  # noqa: E402


def _toml(spec):
    lines = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def test_replicate_cli_on_runner_store(tmp_path, capsys):
    from minaction.cli import main

    spec = {"name": "report-synth", "archs": ["tiny_mlp", "tiny_fail"], "datasets": ["synthetic"],
            "lams": [0.0, 1e-3], "seeds": [0, 1], "group_by": "seed", "max_group": 10,
            "budget": {"epochs": 2, "batch_size": 32, "width": 16, "eval_batch_size": 64}}
    preset = tmp_path / "synth.toml"
    preset.write_text(_toml(spec))
    db, out = tmp_path / "r.sqlite", tmp_path / "rep"
    rc = main(["replicate", "--preset", str(preset), "--db", str(db), "--out", str(out), "--n-boot", "10",
               "--workers", "1", "--no-progress", "--max-group", "2"])  # as the README advises
    assert rc == 0, capsys.readouterr().err
    cap = capsys.readouterr()
    assert "estimated wall time" in cap.out + cap.err  # as `study run` does, before training
    assert (out / "report.html").is_file()
    st = pd.read_csv(out / "tables" / "runs_by_status.csv").set_index("status")["runs"]
    assert st["done"] == 4 and st["failed"] == 4
    sw = pd.read_csv(out / "tables" / "lambda_sweep.csv")
    assert set(sw["lam"]) == {0.0, 1e-3} and (sw["n"] == 2).all()
    assert check_traceable(out) == []
    # a registered architecture in neither group of Finding 3 is named as not compared, and the flags assign it
    assert "Not compared (neither energy-first nor conventional): tiny_mlp" in (out / "report.md").read_text()
    out2 = tmp_path / "rep2"
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--out", str(out2), "--n-boot", "10", "--conventional", "tiny_mlp",
                 "--energy-first", "bimodal_true"]) == 0
    assert "Not compared" not in (out2 / "report.md").read_text()
    # a name no finished run has (a typo) is said beside the verdicts
    assert "note: --energy-first names 'bimodal_true', of which no run has finished" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--out", str(out2), "--conventional", " , "]) == 2
    # report options are checked before the study trains: a bad --ci, or a λ the preset does not train
    db3 = tmp_path / "never.sqlite"
    for bad, says in ((["--ci", "1.5"], "ci must be a number in (0, 1)"), (["--lam", "-1"], "lam must be a number"),
                      (["--lam", "0.5"], "--lam 0.5: preset"), (["--n-boot", "0"], "n_boot must be an integer")):
        capsys.readouterr()
        assert main(["replicate", "--preset", str(preset), "--db", str(db3), "--out", str(tmp_path / "rep3"),
                     "--workers", "1", "--no-progress", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("minaction replicate: error:") and says in err, err
        assert not db3.exists()
    # one architecture and one dataset: the factorial analysis is honestly not comparable
    comp = pd.read_csv(out / "tables" / "paper_comparison.csv")
    assert comp.loc[0, "verdict"] == "not comparable"


def _require_real_stack():
    try:
        import minaction.models  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"minaction.models is not available: {exc}")
    from minaction import data

    spec = study.load_preset("smoke")
    for name in spec["datasets"]:
        try:
            data.load(name, "test")
        except data.DataError as exc:
            pytest.skip(f"smoke dataset {name!r} is not reachable on this machine: {exc}")
    return spec


def test_report_from_smoke_preset(tmp_path):
    spec = _require_real_stack()
    db = tmp_path / "smoke.sqlite"
    summary = study.run_study("smoke", db, workers=2, progress=False)
    assert summary["recorded"] == len(study.expand(spec))
    res = build_report(db, tmp_path / "rep", n_boot=50)
    out = tmp_path / "rep"
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert check_traceable(out) == []
    assert set(res["verdicts"].values()) <= {"reproduced", "not reproduced", "not comparable"}
    a = pd.read_csv(out / "tables" / "anova.csv")
    assert {"arch", "dataset", "arch:dataset"} <= set(a["term"])
    prov = pd.read_csv(out / "tables" / "provenance.csv")  # one code version, thread count and ISA: one row
    assert len(prov) == 1 and prov["runs"].sum() == summary["recorded"] and prov["threads"].tolist() == [1]
    assert "Where the runs came from" in (out / "report.md").read_text()
