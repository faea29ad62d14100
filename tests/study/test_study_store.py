"""The study store: schema, one transaction per run, replacement, NULL for non-finite values."""
import math
import os
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


def test_uri_characters_in_names(tmp_path):
    """'#', '?', '%41' and spaces reach the named file, for the writer and the read-only reader."""
    names = ("res#1.sqlite", "a%41b.sqlite", "q?x.sqlite", "s p.sqlite")
    for name in names:
        con = store.connect(tmp_path / name)
        store.record_run(con, {"run_id": name, "status": "done"})
        con.close()
        ro = store.connect(tmp_path / name, readonly=True)
        assert store.finished_ids(ro) == {name}
        ro.close()
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(names)} == set()  # no 'res', 'aAb.sqlite'


def test_full_disk_error_is_not_hidden_by_rollback(tmp_path):
    """A commit that fails with SQLITE_FULL (simulated with ``PRAGMA max_page_count``: SQLite
    itself returns "database or disk is full") is reported as such, not as "cannot rollback -
    no transaction is active"; the runs before it are intact and the connection stays usable."""
    con = store.connect(tmp_path / "r.sqlite")
    store.record_run(con, {"run_id": "a", "status": "done"}, [{"epoch": 1}])
    n = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count = {n}")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        store.record_run(con, {"run_id": "b", "status": "done", "error": "x" * 20000},
                         [{"epoch": e} for e in range(1, 300)])
    assert store.status_counts(con) == {"done": 1} and store.integrity_ok(con)
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 1
    store.record_run(con, {"run_id": "c", "status": "done"})
    assert store.status_counts(con) == {"done": 2}


def test_not_a_store_is_refused_untouched(tmp_path):
    bad = tmp_path / "notes.sqlite"
    text = b"these are my notes, not a database\n" * 10
    bad.write_bytes(text)
    for ro in (False, True):
        with pytest.raises(store.StoreError, match="not an SQLite database"):
            store.connect(bad, readonly=ro)
    assert bad.read_bytes() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")  # an empty file is a new database
    store.connect(empty).close()
    other = tmp_path / "other.sqlite"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(store.StoreError, match="not a study store"):
        store.connect(other)


def test_writer_lock(tmp_path):
    db = tmp_path / "r.sqlite"
    assert store.writer(db) is None
    f = store.acquire_writer_lock(db)
    try:
        assert f"pid {os.getpid()}" in store.writer(db)
        with pytest.raises(store.StoreBusyError, match=f"pid {os.getpid()}"):
            store.acquire_writer_lock(db)  # another open file description: refused even in-process
    finally:
        store.release_writer_lock(f)
    assert store.writer(db) is None
    store.release_writer_lock(store.acquire_writer_lock(db))


def test_writer_lock_follows_links(tmp_path):
    """A symlink to the store (or another path to it) finds the same lock and checkpoint folder: two drivers,
    one given the link, trained the same runs at once before."""
    from minaction.study import checkpoint

    db = tmp_path / "r.sqlite"
    store.connect(db).close()
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.sqlite"
    link.symlink_to(db)
    other = tmp_path / "sub" / ".." / "r.sqlite"
    assert store.lock_path(link) == store.lock_path(other) == store.lock_path(db)
    assert checkpoint.directory(link) == checkpoint.directory(db)
    f = store.acquire_writer_lock(db)
    try:
        with pytest.raises(store.StoreBusyError):
            store.acquire_writer_lock(link)
        assert store.writer(link) is not None
    finally:
        store.release_writer_lock(f)


def test_writer_lock_follows_hard_links(tmp_path):
    """A hard link is another name for the same file, with its own ``<db>.lock`` beside it: the lock
    named by the file's inode stops a second driver given it (an operations trial trained into one
    store from two drivers this way), and `writer` sees the driver under either name."""
    db = tmp_path / "r.sqlite"
    store.connect(db).close()
    (tmp_path / "other").mkdir()
    link = tmp_path / "other" / "hard.sqlite"
    os.link(db, link)
    assert store.lock_path(link) != store.lock_path(db)
    f = store.acquire_writer_lock(db)
    try:
        with pytest.raises(store.StoreBusyError, match="hard link"):
            store.acquire_writer_lock(link)
        assert f"pid {os.getpid()}" in store.writer(link)
    finally:
        store.release_writer_lock(f)
    assert store.writer(link) is None and store.writer(db) is None
    g = store.acquire_writer_lock(link)  # released: either name can take it, and the refusal left nothing held
    try:
        with pytest.raises(store.StoreBusyError):
            store.acquire_writer_lock(db)
    finally:
        store.release_writer_lock(g)
    store.release_writer_lock(store.acquire_writer_lock(db))


def test_hard_link_lock_ignores_tmpdir(tmp_path, monkeypatch):
    """Batch schedulers give each job its own TMPDIR: two jobs given two names of one store kept their inode
    locks in two folders and both trained into it (a guarantees trial). The lock folder is /tmp itself."""
    import tempfile

    db = tmp_path / "r.sqlite"
    store.connect(db).close()
    link = tmp_path / "hard.sqlite"
    os.link(db, link)
    (tmp_path / "job1").mkdir()
    (tmp_path / "job2").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "job1"))
    f = store.acquire_writer_lock(db)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "job2"))
        with pytest.raises(store.StoreBusyError, match="hard link"):
            store.acquire_writer_lock(link)
    finally:
        store.release_writer_lock(f)


def _other_process_reads(db, key):
    """A separate process opens the store with plain sqlite3, reads one meta value, closes (as
    `study status`, a report or the sqlite3 shell do while a study runs)."""
    import subprocess
    import sys

    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "r = c.execute('SELECT value FROM meta WHERE key = ?', (sys.argv[2],)).fetchone(); c.close(); "
            "print(r[0] if r else '<none>')")
    out = subprocess.run([sys.executable, "-c", code, str(db), key], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("opened_check", [True, False])
def test_a_side_open_keeps_the_writers_locks(tmp_path, monkeypatch, opened_check):
    """The driver opens a read-only connection on its own store while writing (announcing the plan).
    That must not drop the writer's POSIX locks: with them dropped, another process's close deleted
    the live -wal file and every later commit of the writer was invisible (and lost on a kill)."""
    if not opened_check:  # the old behaviour: header read and side connection on the open file
        import sys

        if not sys.platform.startswith("linux"):
            pytest.skip("demonstrates Linux's POSIX lock semantics")
        monkeypatch.setattr(store, "_opened_here", lambda path: False)
    db = tmp_path / "s.sqlite"
    writer = store.connect(db)
    try:
        store.set_meta(writer, "k", "one")
        side = store.connect(db, readonly=True)  # header check + read-only connection, then closed
        assert store.get_meta(side, "k") == "one"
        side.close()
        assert _other_process_reads(db, "k") == "one"
        store.set_meta(writer, "k", "two")  # a commit after the other process's open and close
        seen = _other_process_reads(db, "k")
        wal_exists = (tmp_path / "s.sqlite-wal").exists()
    finally:
        writer.close()
    if opened_check:
        assert wal_exists and seen == "two"
    else:  # documents the failure the check prevents (POSIX lock semantics, Linux)
        assert not wal_exists or seen == "one"


def test_hard_link_lock_folder_of_another_owner_or_a_planted_link_is_not_used(tmp_path, monkeypatch):
    """The inode locks live in a shared folder (/tmp): a folder someone else made there, or one open to others,
    is not used, and a lock file planted there as a link is never opened through it (the lock's note would have
    overwritten the link's target; a review showed it with another user's file)."""
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(store, "LOCK_BASE", str(base))
    db = tmp_path / "r.sqlite"
    store.connect(db).close()
    folder = base / f"minaction-store-locks-{os.getuid()}"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)  # open to others (as another user's planted folder would be to us)
    assert store._inode_lock_path(db) is None
    os.chmod(folder, 0o700)
    ip = store._inode_lock_path(db)
    assert ip is not None and ip.parent == folder
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.symlink(precious, ip)
    f = store.acquire_writer_lock(db)  # the lock beside the store still holds
    try:
        assert precious.read_text() == "keep me"
    finally:
        store.release_writer_lock(f)
