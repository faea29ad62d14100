"""The study's result store: one SQLite file in WAL mode.

The driver (the process running :func:`minaction.study.run_study`) is the only writer.
Each finished run is written in one transaction (its ``runs`` row and all its ``epochs``
rows together), so a ``kill -9`` at any moment leaves every committed run whole and the
file consistent; a run that was in flight is simply absent and is trained again on resume.

Schema (fixed by the project's cross-module contract)::

    runs   (run_id PK, preset, arch, dataset, modality, lam, seed, config_json, status, error,
            epochs, train_loss, val_acc, test_acc, test_loss, test_energy, test_active_frac,
            test_energy_rescaled, n_params, wall_time_s, backend, group_size, finished_at)
    epochs (run_id, epoch, train_loss, train_acc, val_loss, val_acc, energy, val_energy,
            wall_time_s, PK (run_id, epoch))
    meta   (key PK, value)

``status`` is one of ``done``, ``failed``, ``diverged``.
"""
from __future__ import annotations

import datetime as _dt
import math
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

STATUSES = ("done", "failed", "diverged")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, preset TEXT, arch TEXT, dataset TEXT, modality TEXT,
  lam REAL, seed INTEGER, config_json TEXT, status TEXT, error TEXT, epochs INTEGER, train_loss REAL,
  val_acc REAL, test_acc REAL, test_loss REAL, test_energy REAL, test_active_frac REAL,
  test_energy_rescaled REAL, n_params INTEGER, wall_time_s REAL, backend TEXT, group_size INTEGER,
  finished_at TEXT);
CREATE TABLE IF NOT EXISTS epochs (run_id TEXT, epoch INTEGER, train_loss REAL, train_acc REAL, val_loss REAL,
  val_acc REAL, energy REAL, val_energy REAL, wall_time_s REAL, PRIMARY KEY (run_id, epoch));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS evals (run_id TEXT, step INTEGER, epoch REAL, samples INTEGER, flops REAL,
  train_loss REAL, val_loss REAL, val_acc REAL, val_energy REAL, wall_time_s REAL, best INTEGER,
  PRIMARY KEY (run_id, step));
"""

RUN_COLUMNS = ("run_id", "preset", "arch", "dataset", "modality", "lam", "seed", "config_json", "status", "error",
               "epochs", "train_loss", "val_acc", "test_acc", "test_loss", "test_energy", "test_active_frac",
               "test_energy_rescaled", "n_params", "wall_time_s", "backend", "group_size", "finished_at")
EPOCH_COLUMNS = ("run_id", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "energy", "val_energy",
                 "wall_time_s")
#: One row per validation evaluation of a run (every ``eval_every`` optimizer steps and at epoch ends).
EVAL_COLUMNS = ("run_id", "step", "epoch", "samples", "flops", "train_loss", "val_loss", "val_acc", "val_energy",
                "wall_time_s", "best")


def connect(path, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the study database at ``path`` in WAL mode with the schema.

    The connection is in autocommit mode; writers use :func:`record_run`, which wraps each
    run in its own ``BEGIN IMMEDIATE ... COMMIT``. ``readonly=True`` opens an existing file
    without creating or altering anything (for ``study status`` and reports).
    """
    path = Path(path)
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"study database {str(path)!r} does not exist")
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)
        return con
    path.parent.mkdir(parents=True, exist_ok=True)  # `--db results/study.sqlite` works on a fresh checkout
    con = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        con.close()
        raise RuntimeError(f"could not put {str(path)!r} in WAL mode (got {mode!r}); is it on a network filesystem?")
    # WAL + NORMAL: a committed transaction survives a crash or SIGKILL of the process.
    con.execute("PRAGMA synchronous=NORMAL")
    con.executescript(SCHEMA)
    return con


def _clean(v):
    """SQLite-friendly value: non-finite floats become NULL."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def record_run(con: sqlite3.Connection, run: dict, epochs: Iterable[dict] = (), evals: Iterable[dict] = ()) -> None:
    """Write one finished run (its ``runs`` row and its ``epochs`` rows) in one transaction.

    ``run`` maps column names of ``runs`` to values (missing ones are NULL); ``status``
    must be one of :data:`STATUSES`. A previous record of the same ``run_id`` (e.g. a
    failed run retried) is replaced together with its epochs.
    """
    if run.get("status") not in STATUSES:
        raise ValueError(f"run status must be one of {STATUSES}, got {run.get('status')!r}")
    unknown = set(run) - set(RUN_COLUMNS)
    if unknown:
        raise ValueError(f"unknown runs columns: {sorted(unknown)}")
    row = dict(run)
    row.setdefault("finished_at", now_utc())
    vals = [_clean(row.get(c)) for c in RUN_COLUMNS]
    erows = []
    for e in epochs:
        bad = set(e) - set(EPOCH_COLUMNS)
        if bad:
            raise ValueError(f"unknown epochs columns: {sorted(bad)}")
        erows.append([_clean(row["run_id"] if c == "run_id" else e.get(c)) for c in EPOCH_COLUMNS])
    vrows = []
    for e in evals:
        bad = set(e) - set(EVAL_COLUMNS)
        if bad:
            raise ValueError(f"unknown evals columns: {sorted(bad)}")
        vrows.append([_clean(row["run_id"] if c == "run_id" else e.get(c)) for c in EVAL_COLUMNS])
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute("DELETE FROM epochs WHERE run_id = ?", (row["run_id"],))
        con.execute("DELETE FROM evals WHERE run_id = ?", (row["run_id"],))
        if vrows:
            con.executemany(f"INSERT INTO evals ({', '.join(EVAL_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(EVAL_COLUMNS))})", vrows)
        con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(RUN_COLUMNS))})", vals)
        if erows:
            con.executemany(f"INSERT INTO epochs ({', '.join(EPOCH_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(EPOCH_COLUMNS))})", erows)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def finished_ids(con: sqlite3.Connection, statuses=STATUSES) -> set:
    """run_ids recorded with one of ``statuses``."""
    q = f"SELECT run_id FROM runs WHERE status IN ({', '.join('?' * len(statuses))})"
    return {r[0] for r in con.execute(q, tuple(statuses))}


def set_meta(con: sqlite3.Connection, key: str, value: str) -> None:
    con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def get_meta(con: sqlite3.Connection, key: str, default: Optional[str] = None) -> Optional[str]:
    r = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if r is None else r[0]


def status_counts(con: sqlite3.Connection, run_ids: Optional[Iterable[str]] = None) -> dict:
    """``{status: count}`` over all runs, or over ``run_ids`` only."""
    if run_ids is None:
        return dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    ids = list(run_ids)
    out: dict = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for s, n in con.execute(f"SELECT status, COUNT(*) FROM runs WHERE run_id IN ({', '.join('?' * len(chunk))}) "
                                f"GROUP BY status", chunk):
            out[s] = out.get(s, 0) + n
    return out


def integrity_ok(con: sqlite3.Connection) -> bool:
    """``PRAGMA integrity_check`` says ok."""
    return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
