"""Finished runs as a portable text archive: ``study export`` and ``study import``.

A study store is one SQLite file on one machine. A long study (the faithful λ-sweep: ~20 hours
of a 2-core machine) can outlive that machine, or the session that holds it, and a store is
not something to commit to a repository. An archive carries exactly the finished runs (their
``runs`` row, their per-epoch and per-evaluation rows) and the presets' specifications, as
gzip-compressed JSON lines:

* line 1: ``{"format": "minaction-runs/1", "exported_at": ..., "meta": {key: value}, "runs": N}``
  (``meta``: the presets' specifications, ``preset:NAME``, and how the runs' FLOPs were counted,
  ``flops_count``, see :mod:`minaction.study.recount`)
* then one line per run: ``{"run": {...}, "epochs": [...], "evals": [...]}``, with ``"provenance": {...}``
  (the code, torch, ISA, threads and host that trained it, :mod:`minaction.study.provenance`) where the store
  has it

``study import`` writes an archive's runs into a store (created if missing) under the store's
writer lock, so ``study run`` on that store resumes after them: a run's identity is the hash
of its configuration (:func:`minaction.study.presets.run_id`), the same on every machine and
commit that shares the trainer version. A run already recorded as done or diverged in the
store is kept as it is; one recorded as failed is replaced by the archive's finished record.
Rows are sorted (runs by ``run_id``, children by step), so exporting the same store twice gives
the same bytes apart from ``exported_at``, and a committed archive diffs by run.
"""
from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path

from . import store
from .recount import FLOPS_META

FORMAT = "minaction-runs/1"


def _value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _rows(con, sql, args=()):
    cur = con.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [{k: _value(v) for k, v in zip(names, r)} for r in cur.fetchall()]


def export_runs(db, out, statuses=("done", "diverged"), skip=()) -> dict:
    """Write the runs of ``db`` with one of ``statuses`` to the archive ``out`` (``.jsonl.gz``).

    ``skip``: archives whose runs are left out (by run id): a store that imported published archives
    exports only what it trained since, and the next store imports all of them.

    Reads the store read-only (safe while a ``study run`` writes it: only committed runs are
    seen). The file is written to a temporary name and renamed, so an interrupted export never
    leaves a truncated archive in place of a good one. Returns ``{"runs": n, "path": out,
    "not_exported": {status: n}, "skipped": n}`` (the runs of other statuses, e.g. failed ones, which an
    import's store then plans again; the runs left out because a ``skip`` archive holds them)."""
    store.check_name(db)
    if str(out) == "" or Path(out).name == "":
        raise store.StoreError(f"the archive's name is empty or a folder (--out {str(out)!r}): give a file name, "
                               f"e.g. runs.jsonl.gz")
    db, out = Path(db), Path(out)
    if not db.exists():
        raise FileNotFoundError(f"no study store at {str(db)!r}")
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise store.StoreError(f"cannot write the run archive {str(out)!r}: {str(parent)!r} is a file, "
                                       f"not a folder")
            break
    bad = set(statuses) - set(store.STATUSES)
    if bad:
        raise ValueError(f"unknown run statuses {sorted(bad)}; choose from {store.STATUSES}")
    if Path(out).resolve() in {Path(a).resolve() for a in skip}:
        raise ValueError(f"the archive to write, {str(out)!r}, is also one whose runs are skipped: export to "
                         f"another file")
    skipped_ids = set()
    for a in skip:
        _check_stream(a)
        _, recs = read_archive(a)
        skipped_ids.update(rec["run"]["run_id"] for rec in recs)
    con = store.connect(db, readonly=True)
    try:
        con.execute("BEGIN")  # one snapshot: a run committed meanwhile is either wholly in or out
        marks = ", ".join("?" * len(statuses))
        runs = _rows(con, f"SELECT {', '.join(store.RUN_COLUMNS)} FROM runs WHERE status IN ({marks}) "
                          f"ORDER BY run_id", tuple(statuses))
        left = dict(con.execute(f"SELECT status, COUNT(*) FROM runs WHERE status NOT IN ({marks}) GROUP BY status "
                                f"ORDER BY status", tuple(statuses)).fetchall())
        meta = {k: v for k, v in con.execute("SELECT key, value FROM meta ORDER BY key")
                if k.startswith("preset:") or k == FLOPS_META}
        epochs: dict = {}
        for e in _rows(con, f"SELECT {', '.join(store.EPOCH_COLUMNS)} FROM epochs ORDER BY run_id, epoch"):
            epochs.setdefault(e.pop("run_id"), []).append(e)
        evals: dict = {}
        for e in _rows(con, f"SELECT {', '.join(store.EVAL_COLUMNS)} FROM evals ORDER BY run_id, step"):
            evals.setdefault(e.pop("run_id"), []).append(e)
        prov = store.provenance_of(con)
        con.execute("COMMIT")
    finally:
        con.close()
    n_all = len(runs)
    runs = [r for r in runs if r["run_id"] not in skipped_ids]
    tmp = out.with_name(out.name + ".partial")
    header = {"format": FORMAT, "exported_at": store.now_utc(), "runs": len(runs), "meta": meta}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the gzip header carries no timestamp, so equal contents give equal bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write((json.dumps(header, sort_keys=True) + "\n").encode())
            for r in runs:
                rid = r["run_id"]
                line = {"run": r, "epochs": epochs.get(rid, []), "evals": evals.get(rid, [])}
                if rid in prov:  # (runs recorded before provenance existed export as they always did)
                    line["provenance"] = prov[rid]
                f.write((json.dumps(line, sort_keys=True, allow_nan=False) + "\n").encode())
        tmp.replace(out)
    except OSError as exc:  # a full disk, a folder that cannot be written: say which file, leave no .partial
        try:
            tmp.unlink()
        except OSError:
            pass
        raise store.StoreError(f"cannot write the run archive {str(out)!r}: {exc.strerror or exc}; nothing was "
                               f"written (the store is unchanged)") from None
    return {"runs": len(runs), "path": str(out), "not_exported": left, "skipped": n_all - len(runs)}


class ArchiveDamaged(ValueError):
    """An archive's gzip stream ends early or is damaged (read up to there)."""


def read_archive(path):
    """``(header, iterator of run records)`` of an archive; a file that is not one raises
    ``ValueError`` naming it and the cause."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run archive at {str(path)!r}")
    try:
        f = gzip.open(path, "rt", encoding="utf-8")
        first = f.readline()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{str(path)!r} is not a minaction run archive (gzip JSON lines): {exc}") from None
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        f.close()
        raise ValueError(f"{str(path)!r} is not a minaction run archive: its first line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        f.close()
        raise ValueError(f"{str(path)!r} is not a minaction run archive of format {FORMAT!r} "
                         f"(first line: {first[:80]!r})")

    def records():
        with f:
            n = 1
            while True:
                n += 1
                try:
                    line = f.readline()
                except (EOFError, OSError, zlib.error) as exc:  # a cut or damaged gzip stream (an interrupted copy)
                    raise ArchiveDamaged(f"{str(path)!r} is truncated or damaged at line {n} "
                                         f"({type(exc).__name__}: {exc})") from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    run = rec["run"]
                    run["run_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{str(path)!r} line {n} is not a run record ({type(exc).__name__}: {exc}); "
                                     f"the archive is damaged") from None
                yield rec
    return header, records()


def _check_stream(archive) -> None:
    """Read the whole gzip stream once, so that its CRC is checked before a run is imported: a flipped bit
    can still decode to valid JSON (a review found one in a published archive that changed one training
    loss), and runs imported before the check failed were kept, then kept again over a good copy."""
    try:
        with open(archive, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return  # not gzip at all (or missing): read_archive names that
    except OSError:
        return
    try:
        with gzip.open(archive, "rb") as f:
            while f.read(1 << 20):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise ArchiveDamaged(f"{str(archive)!r} is truncated or damaged ({type(exc).__name__}: {exc}): nothing "
                             f"was imported; copy the archive again") from None


#: the results compared when an archive's run is already in the store (kept): a difference means another code
#: version, thread count or machine produced one of the two (their provenance may say which)
_COMPARED = ("status", "epochs", "test_acc", "test_loss", "test_energy")


def _import_one(con, rec: dict, recorded: dict, counts: dict) -> None:
    run = rec["run"]
    before = recorded.get(run["run_id"])
    if before in ("done", "diverged"):
        counts["kept"] += 1
        ours = con.execute(f"SELECT {', '.join(_COMPARED)} FROM runs WHERE run_id = ?", (run["run_id"],)).fetchone()
        if ours is not None and any(_value(a) != _value(run.get(c)) for a, c in zip(ours, _COMPARED)):
            counts["kept_differ"] += 1
        return
    store.record_run(con, run, rec.get("epochs", ()), rec.get("evals", ()), provenance=rec.get("provenance"))
    counts["replaced_failed" if before == "failed" else "imported"] += 1


def import_runs(db, archive) -> dict:
    """Write the runs of ``archive`` into the store ``db`` (see the module docstring).

    Takes the store's writer lock (a running ``study run`` on ``db`` makes this raise
    ``StoreBusyError`` at once). Each run is its own transaction, so an interrupted import keeps
    every run it wrote and a rerun finishes it. Returns counts: ``imported``, ``kept`` (already
    done or diverged in the store; ``kept_differ`` of them with other results in the archive: status, epochs,
    test accuracy, loss or energy, which another code version, thread count or machine gives; the store's are
    kept) and ``replaced_failed``. A record's ``provenance`` (where the run came from) is imported with it."""
    _check_stream(archive)  # before anything is written: a damaged stream can decode to altered runs
    header, records = read_archive(archive)
    expected = header.get("runs")
    con = store.connect(db)
    lock = None
    try:
        lock = store.acquire_writer_lock(db)
        recorded = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        for key, value in (header.get("meta") or {}).items():
            if key.startswith("preset:") and store.get_meta(con, key) is None:
                store.set_meta(con, key, value)
        counts = {"imported": 0, "kept": 0, "kept_differ": 0, "replaced_failed": 0}
        seen = 0
        for rec in records:  # (the stream was read whole by _check_stream: a damaged one never gets here)
            seen += 1
            _import_one(con, rec, recorded, counts)
        if expected is not None and seen != expected:
            raise ValueError(f"{str(archive)!r} holds {seen} run records but its header says {expected}: the archive "
                             f"is truncated or damaged ({counts['imported']} runs were imported; they are kept)")
        theirs = (header.get("meta") or {}).get(FLOPS_META)
        if counts["imported"] or counts["replaced_failed"]:  # how the store's FLOPs were counted, now
            if not any(st in ("done", "diverged") for st in recorded.values()) and theirs is not None:
                store.set_meta(con, FLOPS_META, theirs)
            elif store.get_meta(con, FLOPS_META) != theirs:
                store.delete_meta(con, FLOPS_META)
        # keyed by the archive's full path: two archives of one name (every published slice is runs.jsonl.gz)
        # overwrote each other's record
        store.set_meta(con, f"imported:{Path(archive).resolve()}", json.dumps(
            {"at": store.now_utc(), "exported_at": header.get("exported_at"), **counts}, sort_keys=True))
        return {**counts, "archive": str(archive), "db": str(db)}
    finally:
        con.close()
        store.release_writer_lock(lock)
