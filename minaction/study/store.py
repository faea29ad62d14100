"""The study's result store: one SQLite file in WAL mode.

The driver (the process running :func:`minaction.study.run_study`) is the only writer.
Each finished group of runs is written in one transaction (every member's ``runs`` row and
all its ``epochs`` rows together, :func:`record_runs`), so a ``kill -9`` at any moment leaves
every committed run whole and the file consistent; a group that was in flight is simply
absent and is trained again on resume (from its checkpoint).

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
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlencode

STATUSES = ("done", "failed", "diverged")
SQLITE_HEADER = b"SQLite format 3\x00"

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
CREATE TABLE IF NOT EXISTS provenance (run_id TEXT PRIMARY KEY, json TEXT);
"""

RUN_COLUMNS = ("run_id", "preset", "arch", "dataset", "modality", "lam", "seed", "config_json", "status", "error",
               "epochs", "train_loss", "val_acc", "test_acc", "test_loss", "test_energy", "test_active_frac",
               "test_energy_rescaled", "n_params", "wall_time_s", "backend", "group_size", "finished_at")
EPOCH_COLUMNS = ("run_id", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "energy", "val_energy",
                 "wall_time_s")
OUR_TABLES = {"runs", "epochs", "evals", "meta", "provenance"}


class StoreError(ValueError):
    """The study store cannot be opened, read or written. The message is one line that names
    the file and the cause (and what to do); nothing was changed by the failed attempt."""


def uri(path, **params) -> str:
    """The ``file:`` URI of ``path`` for ``sqlite3.connect(..., uri=True)``, quoted so that
    ``#``, ``?``, ``%`` and spaces in the name reach the right file."""
    u = Path(path).resolve().as_uri()  # as_uri percent-encodes every character a URI reserves
    return u + ("?" + urlencode(params) if params else "")


def _cause(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs
        return False


def _writable(p: Path) -> bool:
    return os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0))


def _siblings(path: Path) -> tuple:
    """The store and the ``-wal`` and ``-shm`` files SQLite keeps beside it in WAL mode."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _read_only_files(path: Path) -> list:
    """Those of the store and its ``-wal``/``-shm`` files that exist and that this process cannot write."""
    return [p for p in _siblings(path) if p.is_file() and not _writable(p)]


def _read_only_why(path: Path, files: list, msg: Optional[str] = None) -> str:
    """Which of the store's files are read-only, and the command that makes them writable."""
    import shlex

    names = " and ".join(repr(str(p)) for p in files)
    one = len(files) == 1
    why = f"{names} {'is' if one else 'are'} read-only" + (f" ({msg})" if msg else "")
    if any(p != path for p in files):
        # SQLite creates them with the store's own mode: a reader (`study status`, a report) of a store that
        # was read-only then left them so, and they stayed read-only after the store was made writable again
        why += (f"; SQLite gives the -wal and -shm files the mode the store had when they were made (a "
                f"`study status` or a report of a read-only store leaves them read-only)")
    return (why + f". Make {'it' if one else 'them'} writable (as {'its' if one else 'their'} owner): chmod u+w "
            f"{' '.join(shlex.quote(str(p)) for p in files)}; then run the same command again")


def diagnose(path, exc: BaseException, action: str = "open") -> StoreError:
    """A :class:`StoreError` naming ``path`` and the likely cause of the SQLite/OS error ``exc``."""
    path = Path(path)
    folder = path.parent
    msg = _cause(exc)
    low = msg.lower()
    if "full" in low or getattr(exc, "errno", None) == 28:
        why = (f"the disk (or the database's size limit) is full: {msg}. Free some space and run the same command "
               f"again; any runs it had recorded are kept")
    elif "not a database" in low:
        why = f"it is not an SQLite database ({msg}); give another --db"
    elif "malformed" in low or "corrupt" in low:
        why = f"the file is damaged, e.g. truncated ({msg}); restore it from a copy or give another --db"
    elif "readonly" in low or "read-only" in low or "unable to open" in low or isinstance(exc, PermissionError):
        if not folder.is_dir():
            why = f"its folder {str(folder)!r} does not exist ({msg})"
        elif _read_only_fs(folder):
            why = f"{str(folder)!r} is on a read-only file system ({msg}); copy the store to a writable place"
        elif ro := _read_only_files(path):
            why = _read_only_why(path, ro, msg)
        elif not _writable(folder):
            why = (f"its folder {str(folder)!r} is not writable ({msg}): SQLite's WAL mode creates "
                   f"{path.name}-wal and {path.name}-shm next to the file; use a writable folder")
        else:
            why = msg
    else:
        why = msg
    return StoreError(f"cannot {action} the study store {str(path)!r}: {why}")


# Files this process has opened through SQLite, by (device, inode). POSIX drops *every* lock a
# process holds on a file when it closes *any* descriptor of that file. SQLite guards its own
# descriptors against this, but a plain open()/close() of the store in a process that has it
# open (the driver announcing its plan through a read-only connection while it writes) silently
# released the writer's locks: another process's sqlite3 (a `study status`, a report) then took
# itself for the last connection and deleted the -wal and -shm files on closing, and the driver
# went on committing runs into a deleted WAL, visible to nobody and lost when it was killed.
# So no header read and no side connection ever touch a file in this set.
_OPENED: set = set()


def _inode(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _remember(path: Path) -> None:
    key = _inode(path)
    if key is not None:
        _OPENED.add(key)


def _opened_here(path: Path) -> bool:
    """Whether this process has (or had) an SQLite connection on this very file: its header and
    contents were checked then, and a second descriptor's close could drop that connection's locks."""
    key = _inode(path)
    return key is not None and key in _OPENED


def _check_header(path: Path) -> None:
    """Refuse, before SQLite touches it, a file that is not an SQLite database."""
    if path.is_dir():
        raise StoreError(f"the study store {str(path)!r} is a folder; give the path of a .sqlite file")
    if _opened_here(path):
        return  # checked when this process first opened it; a read here would drop its locks
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise diagnose(path, exc, "read") from None
    if head and head != SQLITE_HEADER:
        raise StoreError(f"cannot open the study store {str(path)!r}: it is not an SQLite database (its first bytes "
                         f"are not the SQLite header); give another --db")


def check_name(path) -> None:
    """An empty store name (``--db ''``) is named as such: as a path it is '.', "a folder"."""
    if os.fspath(path) == "":
        raise StoreError("the study store's name is empty (--db ''): give its file name, e.g. results/study.sqlite")


#: columns every study store's ``runs`` table has had since the first one
_STORE_RUN_KEYS = frozenset({"run_id", "preset", "arch", "dataset", "lam", "seed", "config_json", "status"})


def _check_contents(con: sqlite3.Connection, path: Path, require_runs: bool) -> None:
    """A damaged (e.g. truncated) file, or an SQLite file that is not a study store, is refused."""
    rows = [r[0] for r in con.execute("PRAGMA quick_check(3)")]
    if rows != ["ok"]:
        raise StoreError(f"cannot open the study store {str(path)!r}: the file is damaged, e.g. truncated "
                         f"(SQLite quick_check: {'; '.join(map(str, rows))}); restore it from a copy or give "
                         f"another --db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if require_runs and not tables:  # a 0-byte file (which `study run` takes as a new store) or a bare database
        raise StoreError(f"no study has been written to {str(path)!r} yet (an empty database); `minaction study "
                         f"run --preset NAME --db {path}` starts one")
    if (require_runs or tables) and "runs" not in tables:
        raise StoreError(f"{str(path)!r} is an SQLite database but not a study store (no 'runs' table; tables: "
                         f"{sorted(tables)}); give another --db")
    if "runs" in tables:
        # another program's table of that name: refused before anything (WAL mode, our tables) is written into it
        cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        missing = sorted(_STORE_RUN_KEYS - cols)
        if missing:
            raise StoreError(f"{str(path)!r} is an SQLite database but not a study store (its 'runs' table lacks "
                             f"{', '.join(missing)}; columns: {sorted(cols)}); give another --db")


def _wal_has_changes(path: Path) -> bool:
    wal = path.with_name(path.name + "-wal")
    try:
        return wal.stat().st_size > 0
    except OSError:
        return False


def _precheck(path: Path, require_runs: bool) -> bool:
    """Check an existing file through an ``immutable`` read-only connection, which creates no
    ``-wal``/``-shm`` file, so that a damaged file or a foreign database is refused untouched.
    Returns False (not checked) when a ``-wal`` file holds changes: those must be read through
    the WAL, so the caller checks on its real connection (the WAL's files exist already), and
    when this process has the file open already (a side connection's close could drop the open
    one's locks, see ``_OPENED``)."""
    if _wal_has_changes(path) or _opened_here(path):
        return False
    con = None
    try:
        con = sqlite3.connect(uri(path, mode="ro", immutable=1), uri=True, isolation_level=None)
        _check_contents(con, path, require_runs)
    except sqlite3.Error as exc:
        raise diagnose(path, exc, "read") from None
    finally:
        if con is not None:
            con.close()
    return True
#: One row per validation evaluation of a run (every ``eval_every`` optimizer steps and at epoch ends).
EVAL_COLUMNS = ("run_id", "step", "epoch", "samples", "flops", "train_loss", "val_loss", "val_acc", "val_energy",
                "wall_time_s", "best")


def connect(path, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the study database at ``path`` in WAL mode with the schema.

    The connection is in autocommit mode; writers use :func:`record_run` /
    :func:`record_runs`, which wrap each run (each group) in one ``BEGIN IMMEDIATE ... COMMIT``. ``readonly=True`` opens an existing file
    without creating or altering anything (for ``study status`` and reports); in a folder
    that is not writable it falls back to SQLite's ``immutable`` mode (see :func:`open_readonly`).

    A file that is not SQLite, a damaged or truncated store, an SQLite file of something else,
    a folder that cannot be written: :class:`StoreError` naming the file and the cause, raised
    before anything in the file is changed.
    """
    check_name(path)
    path = Path(path)
    if readonly:
        return open_readonly(path)
    _check_header(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # `--db results/study.sqlite` works on a fresh checkout
    except OSError as exc:
        raise StoreError(f"cannot create the folder {str(folder)!r} of the study store {str(path)!r}: "
                         f"{exc.strerror or exc}") from None
    existed = path.exists() and path.stat().st_size > 0
    if not path.exists() and not _writable(folder):
        raise StoreError(f"cannot create the study store {str(path)!r}: its folder {str(folder)!r} is not writable")
    checked = _precheck(path, require_runs=False) if existed else True
    ro = _read_only_files(path) if path.exists() and not _read_only_fs(folder) else []
    if ro:  # SQLite opens such a store all the same and fails at the first write, naming no file
        raise StoreError(f"cannot write to the study store {str(path)!r}: {_read_only_why(path, ro)}")
    con = None
    try:
        con = sqlite3.connect(uri(path, mode="rwc"), uri=True, timeout=30, isolation_level=None)
        if not checked:
            _check_contents(con, path, require_runs=False)  # reads only: nothing changed yet
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"could not put the study store {str(path)!r} in WAL mode (got {mode!r}); "
                             f"is it on a network filesystem?")
        # WAL + NORMAL: a committed transaction survives a crash or SIGKILL of the process.
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(SCHEMA)
        _remember(path)
    except StoreError:
        if con is not None:
            con.close()
        raise
    except (sqlite3.Error, OSError) as exc:
        if con is not None:
            con.close()
        raise diagnose(path, exc) from None
    return con


def open_readonly(path) -> sqlite3.Connection:
    """Open an existing study store for reading only, never changing its data.

    SQLite reads a WAL database through its ``-shm`` index, which it must be able to create
    next to the file (with an empty ``-wal``: both may stay after the reader closes; they hold
    no runs). In a folder that is not writable this falls back to ``immutable=1``
    (the file is read as a snapshot, without locks) when no ``-wal`` file holds unmerged
    changes; otherwise it says that the folder must be writable.
    """
    check_name(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study database {str(path)!r} does not exist")
    _check_header(path)
    checked = _precheck(path, require_runs=True)
    con = None
    try:
        con = sqlite3.connect(uri(path, mode="ro"), uri=True, timeout=30, isolation_level=None)
        if checked:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the WAL index now
        else:
            _check_contents(con, path, require_runs=True)
        _remember(path)
        return con
    except StoreError:
        if con is not None:
            con.close()
        raise
    except sqlite3.Error as exc:
        if con is not None:
            con.close()
        low = _cause(exc).lower()
        if not ("readonly" in low or "read-only" in low or "unable to open" in low):
            raise diagnose(path, exc, "read") from None
        first = exc
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(f"cannot read the study store {str(path)!r}: SQLite cannot open it read-only here "
                         f"({_cause(first)}) and {str(wal)!r} holds changes not yet merged into it; make the folder "
                         f"{str(path.parent)!r} writable (or copy the .sqlite file with its -wal file to a writable "
                         f"folder) and try again") from None
    try:
        con = sqlite3.connect(uri(path, mode="ro", immutable=1), uri=True, isolation_level=None)
        _check_contents(con, path, require_runs=True)
        return con
    except StoreError:
        con.close()
        raise
    except sqlite3.Error as exc:
        raise diagnose(path, exc, "read") from None


class StoreBusyError(StoreError):
    """Another driver is running a study into the same store (it holds the writer lock)."""


def lock_path(path) -> Path:
    """The writer lock file next to the store: ``<db>.lock``, beside the file itself (a symlink to a store, or
    another path to it, finds the same lock: a driver given the link was not stopped by one given the file)."""
    path = Path(os.path.realpath(os.fspath(path)))
    return path.with_name(path.name + ".lock")


#: where the hard-link locks live (a folder per user inside it): /tmp itself, not $TMPDIR (see below)
LOCK_BASE = "/tmp"


def _inode_lock_path(path) -> Optional[Path]:
    """A second lock file for the store, named by the file's (device, inode) in the temporary folder:
    a hard link to a store is another name for the same file, with its own ``<db>.lock`` beside it, and
    a driver given the link was not stopped by one given the other name. None while the store does not
    exist yet, or where no such folder can be made."""
    ident = file_identity(path)
    if ident is None:
        return None
    import tempfile

    # /tmp itself, not $TMPDIR: batch schedulers give each job its own TMPDIR, and two jobs given two names of
    # one store never saw each other's lock (both trained and recorded the same runs)
    base = LOCK_BASE if os.path.isdir(LOCK_BASE) and os.access(LOCK_BASE, os.W_OK | os.X_OK) else tempfile.gettempdir()
    folder = Path(base) / f"minaction-store-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        # a folder another user made (or a link) in the shared /tmp: its files could be links that the lock's note
        # would overwrite. No inode lock then (the lock beside the store still holds for every name but a hard link)
        return None
    return folder / f"{ident[0]}-{ident[1]}.lock"


def _write_note(f, note: str) -> None:
    """Who holds a lock file, written into it for the next driver's refusal and `study status`."""
    try:
        f.seek(0)
        f.truncate()
        f.write(note)
        f.flush()
    except OSError:
        pass  # the lock holds even if its note cannot be written


def _lock_info(f) -> str:
    try:
        f.seek(0)
        return f.read().strip()
    except OSError:
        return ""


def file_identity(path):
    """``(device, inode)`` of the store file, or None where it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_same_file(path, identity) -> None:
    """Raise :class:`StoreError` when the file at ``path`` is no longer the one a driver opened (deleted,
    or another file moved over it): SQLite would go on writing into the open, unlinked file, whose runs
    are then lost, or leave a write-ahead log that the next process applies to the new file."""
    now = file_identity(path)
    if identity is not None and now != identity:
        what = "deleted or moved away" if now is None else "replaced by another file"
        raise StoreError(f"the study store {path} was {what} while this study ran; stopping before recording "
                         f"more runs into a file no one can open. The runs recorded before are in that file and "
                         f"in its write-ahead log {path}-wal, which SQLite merges into it only when the last "
                         f"connection closes: put the file back under its name beside that -wal file and run the "
                         f"same command (the runs in flight train again). To move a store, stop its driver first, "
                         f"or use `minaction study export`")


def acquire_writer_lock(path):
    """Take the store's writer lock (``fcntl.flock`` on ``<db>.lock``) without waiting.

    One driver at a time trains into a store: a second ``study run`` on the same file raises
    :class:`StoreBusyError` naming the first one's pid. The lock belongs to the open file, so
    it vanishes with the process (even after ``kill -9``): there is never a stale lock to delete.
    The lock file itself stays (deleting it would race with a driver that just opened it).
    Returns the open lock file; :func:`release_writer_lock` (or process exit) releases it.
    Where ``fcntl`` does not exist (Windows) there is no lock and this returns None.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    lp = lock_path(path)
    try:
        f = open(lp, "a+")
    except OSError as exc:
        raise diagnose(path, exc) from None
    try:
        for attempt in range(5):  # a `study status` probing the lock holds it for microseconds
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    raise
                time.sleep(0.05)
    except BlockingIOError:
        who = _lock_info(f) or "another process"
        f.close()
        raise StoreBusyError(f"the study store {str(path)!r} is being written by another `minaction study run` "
                             f"({who}); wait for it to finish or stop it, then run this again "
                             f"(lock: {str(lp)!r})") from None
    except OSError as exc:  # pragma: no cover - a filesystem without flock
        f.close()
        raise StoreError(f"cannot lock the study store {str(path)!r} ({str(lp)!r}): {exc}") from None
    note = f"pid {os.getpid()} on {os.uname().nodename}, since {now_utc()}\n"
    _write_note(f, note)
    ip = _inode_lock_path(path)
    if ip is not None:
        try:  # O_NOFOLLOW: never through a link planted in the folder
            g = os.fdopen(os.open(ip, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "a+")
        except OSError:
            g = None  # the lock beside the file still holds for every name but a hard link
        if g is not None:
            try:
                fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                who = _lock_info(g) or "another process"
                g.close()
                release_writer_lock(f)
                if isinstance(exc, BlockingIOError):
                    raise StoreBusyError(f"the study store {str(path)!r} is being written by another `minaction study "
                                         f"run` under another name of the same file (a hard link; {who}); wait for "
                                         f"it to finish or stop it, then run this again (lock: {str(ip)!r})") from None
            else:
                _write_note(g, note)
                f._minaction_inode_lock = g
    return f


def release_writer_lock(f) -> None:
    if f is None:
        return
    import fcntl

    g = getattr(f, "_minaction_inode_lock", None)
    try:
        fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        for h in (f, g):
            if h is None:
                continue
            try:
                h.close()  # closing drops its flock
            except OSError:
                # a note _write_note could not write (a full disk) is flushed again by close(), which raised and
                # hid the error that stopped the study; the file is closed all the same (io closes it in a finally)
                pass


def writer(path) -> Optional[str]:
    """Who holds the store's writer lock (its note: pid, host, since), or None when no driver runs."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    for lp in (lock_path(path), _inode_lock_path(path)):  # the second: a driver given a hard link's name
        if lp is None:
            continue
        try:
            f = open(lp, "r")
        except OSError:
            continue
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _lock_info(f) or "another process"
            except OSError:  # pragma: no cover
                continue
            fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()
    return None


def _clean(v):
    """SQLite-friendly value: non-finite floats become NULL."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _child_rows(run_id, items: Iterable[dict], columns: tuple, table: str) -> list:
    """The value lists of a run's ``epochs``/``evals`` rows, in ``columns`` order (unknown keys refused)."""
    rows = []
    for e in items:
        bad = set(e) - set(columns)
        if bad:
            raise ValueError(f"unknown {table} columns: {sorted(bad)}")
        rows.append([_clean(run_id if c == "run_id" else e.get(c)) for c in columns])
    return rows


def record_run(con: sqlite3.Connection, run: dict, epochs: Iterable[dict] = (), evals: Iterable[dict] = (),
               provenance: Optional[dict] = None) -> None:
    """Write one finished run (its ``runs`` row and its ``epochs`` rows) in one transaction.

    ``run`` maps column names of ``runs`` to values (missing ones are NULL); ``status``
    must be one of :data:`STATUSES`. A previous record of the same ``run_id`` (e.g. a
    failed run retried) is replaced together with its epochs. ``provenance``: where the run
    came from (:func:`minaction.study.provenance.collect`), kept as JSON in ``provenance``.
    """
    record_runs(con, [(run, epochs, evals, provenance)])


def record_runs(con: sqlite3.Connection, records: Iterable[tuple]) -> None:
    """Write several finished runs, each ``(run, epochs, evals, provenance)`` as for :func:`record_run`, in
    one transaction: all of them or none. The driver records a group's runs so: a group whose recording
    was interrupted half-way left its first runs recorded and the rest not, and the next start regrouped
    those (another group, so another checkpoint name) and trained them again from their start. Every
    record is checked before the transaction begins."""
    rows = [_run_rows(*rec) for rec in records]
    if not rows:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        for r in rows:
            _insert_run(con, *r)
        con.execute("COMMIT")
    except BaseException:
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR): rolling back
        # again would raise "cannot rollback - no transaction is active" and hide the real error.
        if con.in_transaction:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _run_rows(run: dict, epochs: Iterable[dict] = (), evals: Iterable[dict] = (),
              provenance: Optional[dict] = None) -> tuple:
    """One run's values for :func:`_insert_run`, checked (a bad status or column raises ValueError)."""
    if run.get("status") not in STATUSES:
        raise ValueError(f"run status must be one of {STATUSES}, got {run.get('status')!r}")
    unknown = set(run) - set(RUN_COLUMNS)
    if unknown:
        raise ValueError(f"unknown runs columns: {sorted(unknown)}")
    row = dict(run)
    row.setdefault("finished_at", now_utc())
    vals = [_clean(row.get(c)) for c in RUN_COLUMNS]
    erows = _child_rows(row["run_id"], epochs, EPOCH_COLUMNS, "epochs")
    vrows = _child_rows(row["run_id"], evals, EVAL_COLUMNS, "evals")
    return row["run_id"], vals, erows, vrows, provenance


def _insert_run(con: sqlite3.Connection, run_id, vals, erows, vrows, provenance) -> None:
    """One run's rows, inside the caller's transaction (a previous record of ``run_id`` replaced)."""
    con.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
    con.execute("DELETE FROM evals WHERE run_id = ?", (run_id,))
    con.execute("DELETE FROM provenance WHERE run_id = ?", (run_id,))
    if provenance is not None:
        con.execute("INSERT INTO provenance (run_id, json) VALUES (?, ?)",
                    (run_id, json.dumps(provenance, sort_keys=True)))
    if vrows:
        con.executemany(f"INSERT INTO evals ({', '.join(EVAL_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(EVAL_COLUMNS))})", vrows)
    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(RUN_COLUMNS))})", vals)
    if erows:
        con.executemany(f"INSERT INTO epochs ({', '.join(EPOCH_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(EPOCH_COLUMNS))})", erows)


def provenance_of(con: sqlite3.Connection) -> dict:
    """``{run_id: provenance dict}`` of the runs that have one (runs recorded before session 24 have none)."""
    try:
        rows = con.execute("SELECT run_id, json FROM provenance").fetchall()
    except sqlite3.OperationalError:  # a store opened read-only that predates the table
        return {}
    return {r: json.loads(j) for r, j in rows}


def finished_ids(con: sqlite3.Connection, statuses=STATUSES) -> set:
    """run_ids recorded with one of ``statuses``."""
    q = f"SELECT run_id FROM runs WHERE status IN ({', '.join('?' * len(statuses))})"
    return {r[0] for r in con.execute(q, tuple(statuses))}


def set_meta(con: sqlite3.Connection, key: str, value: str) -> None:
    con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def delete_meta(con: sqlite3.Connection, key: str) -> None:
    con.execute("DELETE FROM meta WHERE key = ?", (key,))


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
