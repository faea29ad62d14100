"""The study store: schema, one transaction per run, replacement, NULL for non-finite values."""
import math
import sqlite3

import pytest

from minaction.study import store


def _cols(con, table):
    return [r[1] for r in con.execute(f"PRAGMA table_info({table})")]


def test_schema_and_wal(tmp_path):
    con = store.connect(tmp_path / "r.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert tuple(_cols(con, "runs")) == store.RUN_COLUMNS
    assert tuple(_cols(con, "epochs")) == store.EPOCH_COLUMNS
    assert _cols(con, "meta") == ["key", "value"]
    assert store.integrity_ok(con)


def test_record_run_and_replace(tmp_path):
    path = tmp_path / "r.sqlite"
    con = store.connect(path)
    run = {"run_id": "a", "preset": "p", "arch": "mlp", "dataset": "mnist", "lam": 0.0, "seed": 1,
           "status": "failed", "error": "boom", "test_acc": float("nan")}
    store.record_run(con, run, [{"epoch": 1, "train_loss": 1.0, "wall_time_s": 0.5}])
    assert store.finished_ids(con) == {"a"}
    row = con.execute("SELECT status, error, test_acc, finished_at FROM runs").fetchone()
    assert row[:3] == ("failed", "boom", None) and row[3]
    # retried: replaced with its epochs, never duplicated
    store.record_run(con, dict(run, status="done", error=None, test_acc=0.9),
                     [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4, "energy": math.inf}])
    assert con.execute("SELECT COUNT(*), status FROM runs").fetchone() == (1, "done")
    assert con.execute("SELECT epoch, train_loss, energy FROM epochs ORDER BY epoch").fetchall() == [
        (1, 0.5, None), (2, 0.4, None)]
    con.close()
    # a second connection (another process) sees the committed run
    ro = store.connect(path, readonly=True)
    assert store.status_counts(ro) == {"done": 1}
    assert store.status_counts(ro, ["a", "zz"]) == {"done": 1}


def test_bad_input_is_named(tmp_path):
    con = store.connect(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="status"):
        store.record_run(con, {"run_id": "a", "status": "ok"})
    with pytest.raises(ValueError, match="unknown runs columns"):
        store.record_run(con, {"run_id": "a", "status": "done", "acc": 1})
    with pytest.raises(ValueError, match="unknown epochs columns"):
        store.record_run(con, {"run_id": "a", "status": "done"}, [{"epoch": 1, "loss": 2}])
    # a failed transaction leaves nothing behind
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.connect(tmp_path / "nope.sqlite", readonly=True)
    # a missing parent folder is created (`--db results/study.sqlite` on a fresh checkout)
    store.connect(tmp_path / "no" / "dir.sqlite").close()
    assert (tmp_path / "no" / "dir.sqlite").exists()


def test_meta(tmp_path):
    con = store.connect(tmp_path / "r.sqlite")
    store.set_meta(con, "k", "v")
    store.set_meta(con, "k", "w")
    assert store.get_meta(con, "k") == "w" and store.get_meta(con, "x", "d") == "d"
    assert isinstance(con, sqlite3.Connection)
