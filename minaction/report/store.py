"""Read a study store (SQLite, the schema of ``minaction.study.store``) into data frames.

The report only reads: it opens the database read-only (``mode=ro`` URI), so it can run
while the study is still writing (WAL mode lets readers see the last committed runs).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

RUN_COLUMNS = ("run_id", "preset", "arch", "dataset", "modality", "lam", "seed", "status", "epochs", "val_acc",
               "test_acc", "test_energy", "test_active_frac", "test_energy_rescaled", "wall_time_s")
ENERGY_FIRST = ("bimodal_true", "physics_lagrangian")
CONVENTIONAL = ("mlp", "cnn")


@dataclass
class Store:
    """The contents of a study store: every run, the finished ones, the epochs, the meta table."""

    path: str
    runs_all: pd.DataFrame
    epochs: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def runs(self) -> pd.DataFrame:
        """Runs with status ``done`` (failed and diverged runs are counted, never analysed)."""
        return self.runs_all[self.runs_all["status"] == "done"].reset_index(drop=True)


def _open_readonly(path: Path) -> sqlite3.Connection:
    """``mode=ro``; in a folder this process cannot write (SQLite cannot create the WAL index
    ``-shm`` there) ``immutable=1``, unless a ``-wal`` file holds changes that would be missed."""
    base = path.resolve().as_uri()  # as_uri: quotes ?, #, %
    con = None
    try:
        con = sqlite3.connect(f"{base}?mode=ro", uri=True)
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return con
    except sqlite3.DatabaseError as exc:
        if con is not None:
            con.close()
        if "readonly" not in str(exc) and "unable to open" not in str(exc):
            return sqlite3.connect(f"{base}?mode=ro", uri=True)  # the caller names what is wrong
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise ValueError(f"cannot read {path}: its folder is not writable and {wal} holds changes not yet "
                             f"merged into it; make the folder writable (or copy the store with its -wal file "
                             f"to a writable folder)") from exc
        return sqlite3.connect(f"{base}?mode=ro&immutable=1", uri=True)


def load_store(db) -> Store:
    """Load ``db`` (a path to a study store). Raises ``FileNotFoundError`` / ``ValueError``
    with the problem named when the file is missing or is not a study store."""
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"study store not found: {path}")
    try:
        con = _open_readonly(path)
    except sqlite3.Error as exc:  # pragma: no cover - depends on the filesystem
        raise ValueError(f"cannot open {path} as SQLite: {exc}") from exc
    try:
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path} is not an SQLite database: {exc}") from exc
        if "runs" not in tables:
            raise ValueError(f"{path} is not a study store: it has no 'runs' table (tables: {sorted(tables)})")
        runs = pd.read_sql_query("SELECT * FROM runs", con)
        missing = [c for c in RUN_COLUMNS if c not in runs.columns]
        if missing:
            raise ValueError(f"{path}: the runs table lacks the columns {missing}")
        epochs = (pd.read_sql_query("SELECT * FROM epochs", con) if "epochs" in tables
                  else pd.DataFrame(columns=["run_id", "epoch", "val_acc", "wall_time_s"]))
        meta = (dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {})
    finally:
        con.close()
    runs["lam"] = runs["lam"].astype(float)
    return Store(path=str(path), runs_all=runs, epochs=epochs, meta=meta)
