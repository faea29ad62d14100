"""The study driver and store under faults (issue 10): a bad environment, a second driver,
kill -9 of the driver, odd file names, read-only folders, files that are not stores, a full
disk, bad arguments. Each error must be one line naming the file and the cause, exit 2, and
leave the store as it was.

Every wait here is on an event (a process appearing or vanishing, a lock being held) with a
generous timeout that only guards against a hang; no test depends on the machine's speed.

Permissions: the tests run as root, for whom permission bits do not apply. Where a test needs
a read-only folder it runs the command in a child process whose capability bounding set lacks
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``prctl(PR_CAPBSET_DROP)`` before ``exec``): root then
obeys the mode bits like any user, so the folder really is read-only for the command under
test (checked by the child failing to create a file there). As a non-root user the mode bits
apply anyway and the command runs unchanged.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from minaction.cli import main
from minaction.study import run_study, store, study_status
from minaction.study.runner import STARTING, StudyConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_study_runner import DRIVER_PRELUDE, synth, toml_text  # noqa: E402  (also registers the doubles)

HANG_GUARD = 900  # seconds; only a guard against a hang (a first start may build the C++ kernels)


def _one_line_error(err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _snapshot(folder):
    """Names and contents of every file in ``folder`` (to show that nothing was touched)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[name] = f.read()
        else:
            out[name] = None
    return out


def _preset(tmp_path, **over):
    p = tmp_path / "synth.toml"
    p.write_text(toml_text(synth(**over)))
    return p


def _wait_for(cond, what, guard=HANG_GUARD, proc=None):
    t_end = time.monotonic() + guard
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > t_end:
            raise AssertionError(f"hang guard: {what} did not happen in {guard} s")
        time.sleep(0.05)


def _driver(preset, db, workers=1):
    code = (DRIVER_PRELUDE + "from minaction.study import run_study; "
            "run_study(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False)")
    return subprocess.Popen([sys.executable, "-c", code, str(preset), str(db), str(workers)],
                            start_new_session=True, stderr=subprocess.PIPE)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


# ----------------------------------------------------------------------------- processes (/proc)
def _proc_table():
    """{pid: (ppid, starttime, state)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(rest[1]), rest[19], rest[0])
    return out


def _descendants(pid):
    table = _proc_table()
    kids = {}
    for p, (pp, start, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out[c] = (table[c][0], table[c][1])
            todo.append(c)
    return out


def _alive(pid, start):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return rest[19] == start and rest[0] not in ("Z", "X")  # a zombie has exited


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


# ----------------------------------------------------------------------------- item 6: orphans
@needs_proc
def test_kill9_driver_leaves_no_workers(tmp_path):
    """kill -9 of the driver: its forkserver and pool workers exit too (parent-death signal and
    a pidfd watch on the driver), instead of living on re-parented to PID 1."""
    preset = _preset(tmp_path, lams=[0.0], seeds=[0, 1], group_by="none",
                     budget={"epochs": 100000, "batch_size": 32, "width": 16})
    proc = _driver(preset, tmp_path / "k.sqlite", workers=2)
    seen = {}
    try:
        def workers_up():
            d = _descendants(proc.pid)
            seen.update(d)
            grandchildren = [p for p, (pp, _) in d.items() if pp != proc.pid]
            return len(grandchildren) >= 2  # the pool's workers, forked by the forkserver
        _wait_for(workers_up, "two pool workers started", proc=proc)
        seen.update(_descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        _wait_for(lambda: not any(_alive(p, s) for p, (_, s) in seen.items()),
                  "every process of the killed driver exited", guard=120)
    finally:
        for p, (_, s) in seen.items():
            if _alive(p, s):
                os.kill(p, signal.SIGKILL)
        _kill_group(proc)


def test_worker_protection_primitives():
    """``die_with_parent`` works on Linux; ``watch_driver`` ends a process when the watched one exits."""
    from minaction.study import executors

    if sys.platform.startswith("linux"):
        code = ("import ctypes, signal; from minaction.study.executors import die_with_parent; "
                "assert die_with_parent(); libc = ctypes.CDLL(None); s = ctypes.c_int(); "
                "libc.prctl(2, ctypes.byref(s), 0, 0, 0); assert s.value == signal.SIGKILL, s.value")
        subprocess.run([sys.executable, "-c", code], check=True)  # 2 = PR_GET_PDEATHSIG
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    code = ("import sys, time; from minaction.study.executors import watch_driver; "
            "watch_driver(int(sys.argv[1])); print('watching', flush=True); time.sleep(3600)")
    watcher = subprocess.Popen([sys.executable, "-c", code, str(sleeper.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        sleeper.stdin.close()  # the watched process exits
        sleeper.wait(60)
        assert watcher.wait(120) == executors._ORPHAN_EXIT
    finally:
        for p in (sleeper, watcher):
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------- item 9: two drivers
def test_second_driver_on_same_store_is_refused(tmp_path, capsys):
    preset = _preset(tmp_path, lams=[0.0], seeds=[0], group_by="none",
                     budget={"epochs": 100000, "batch_size": 32, "width": 16})
    db = tmp_path / "two.sqlite"
    first = _driver(preset, db)
    try:
        def held():
            try:
                return study_status(db)["running"]
            except (FileNotFoundError, ValueError):  # not created yet, or its schema not yet written
                return None
        who = _wait_for(held, "the first driver holds the store", proc=first)
        assert f"pid {first.pid}" in who
        with pytest.raises(store.StoreBusyError, match=f"pid {first.pid}"):
            run_study(preset, db, workers=1, progress=False)
        rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress"])
        assert rc == 2
        _one_line_error(capsys.readouterr().err, str(db), "being written by another", f"pid {first.pid}")
        assert study_status(db)["done"] == 0  # the second driver trained nothing
    finally:
        _kill_group(first)
    # the lock died with the first driver (kill -9): no stale lock to delete
    assert study_status(db)["running"] is None
    quick = synth(lams=[0.0], seeds=[0], group_by="none")
    assert run_study(quick, db, workers=1, progress=False)["recorded"] == 1


# ----------------------------------------------------------------------------- item 5: environment
def test_bad_backend_is_refused_before_anything_is_recorded(tmp_path, monkeypatch, capsys):
    """`MINACTION_BACKEND=bogus` used to record every run as failed, and the rerun then skipped them all."""
    preset = _preset(tmp_path)
    db = tmp_path / "b.sqlite"
    for value, needle in (("bogus", "unknown minaction backend 'bogus'"), ("cuda", "cannot run there")):
        monkeypatch.setenv("MINACTION_BACKEND", value)
        rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"])
        assert rc == 2
        _one_line_error(capsys.readouterr().err, f"MINACTION_BACKEND='{value}'", needle)
        assert not db.exists()
    monkeypatch.delenv("MINACTION_BACKEND")
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["done"] == 6


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_bad_checkpoint_interval_is_refused_before_anything_is_recorded(tmp_path, monkeypatch, capsys, value):
    """MINACTION_CHECKPOINT_EPOCH_S (docs/study.md) was read in the workers only: a bad value failed every run,
    recorded as failed (a guarantees trial), and NaN was taken silently."""
    preset = _preset(tmp_path)
    db = tmp_path / "c.sqlite"
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", value)
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "MINACTION_CHECKPOINT_EPOCH_S", repr(value))
    assert not db.exists()


def test_unknown_or_unavailable_dataset_is_refused(tmp_path, monkeypatch, capsys):
    pytest.importorskip("minaction.data")
    from minaction.data import DataUnavailableError, cache

    db = tmp_path / "d.sqlite"
    preset = _preset(tmp_path, datasets=["no_such_dataset"])
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "unknown dataset(s) ['no_such_dataset']")
    # a real dataset whose files no source can give (simulated: an empty cache, every source failing)
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "empty-cache"))

    def unavailable(family, data_dir=None, **kw):
        raise DataUnavailableError(f"dataset {family!r}: no source could provide its files. Tried, in order:\n"
                                   f"  - somewhere: absent", tried=[f"somewhere for {family}: absent"])

    monkeypatch.setattr(cache, "family_arrays", unavailable)
    # every dataset that cannot be had is named at once (the first alone was: a user fixed one per try)
    preset = _preset(tmp_path, datasets=["ecg200", "eog_horizontal"], archs=["tiny_mlp"])
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "2 datasets cannot be had", "'ecg200' (tried: somewhere for ecg200: "
                    "absent)", "'eog_horizontal' (tried:", "MINACTION_DATA", "minaction data fetch ecg200 eog_horizontal")
    assert not db.exists() and not (tmp_path / "d.sqlite.lock").exists()  # refused before the store was created


@pytest.mark.parametrize("over, needle", [
    ({"archs": ["tiny_mlp", "mlpp"]}, "unknown architecture(s) ['mlpp']"),
    ({"budget": {"epochs": 1, "width": 16, "activation": "swish"}}, "budget: activation must be one of"),
    ({"budget": {"epochs": 1, "width": 16, "energy": "l3"}}, "budget: energy must be 'l2', 'l1' or \"none\" (no energy"),
    ({"budget": {"epochs": 1, "width": 16, "energy_reduction": "max"}}, "budget: energy_reduction must be"),
])
def test_misspelt_model_options_and_names_are_refused_by_run_and_plan(tmp_path, capsys, over, needle):
    """A typo in the preset is one error (exit 2) from `study run` and `study plan`, before anything is
    measured or recorded; it used to record every run as failed (run) or print a table of errors (plan)."""
    db = tmp_path / "d.sqlite"
    preset = _preset(tmp_path, **over)
    assert main(["study", "plan", "--preset", str(preset)]) == 2
    _one_line_error(capsys.readouterr().err, "minaction study plan: error:", needle)
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "minaction study run: error:", needle)
    assert not db.exists() and not (tmp_path / "d.sqlite.lock").exists()  # refused before the store was created


def test_a_preset_that_is_not_utf8_and_a_negative_limit_are_refused(tmp_path, capsys):
    """A preset file in another encoding said only "'utf-8' codec can't decode ...", naming no file; --limit -1
    scheduled nothing and exited 0; --max-group 0 advised on --workers."""
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(_preset(tmp_path).read_bytes() + b'\n# caf\xe9\n')
    assert main(["study", "plan", "--preset", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "minaction study plan: error:", f"preset {bad}: not UTF-8 text")
    db = tmp_path / "l.sqlite"
    for flag, value, says in (("--limit", "-1", "must be at least 0, got -1"),
                              ("--max-group", "0", "must be at least 1, got 0")):
        with pytest.raises(SystemExit) as exit_:
            main(["study", "run", "--preset", str(_preset(tmp_path)), "--db", str(db), flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and "--workers for one" not in err
    assert not db.exists()


def test_resume_reports_failed_runs_and_retry_failed(tmp_path, capsys):
    preset = _preset(tmp_path, archs=["tiny_fail", "tiny_mlp"], lams=[0.0], seeds=[0, 1])
    db = tmp_path / "f.sqlite"
    args = ["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]
    assert main(args) == 1  # runs of this call failed
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["failed_skipped"] == 2
    assert "2 run(s)" in err and "--retry-failed" in err
    assert main(["study", "status", "--db", str(db), "--preset", str(preset)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert {k: st[k] for k in ("planned", "done", "failed", "diverged", "pending")} == {
        "planned": 4, "done": 2, "failed": 2, "diverged": 0, "pending": 0}
    assert main(args + ["--retry-failed"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["recorded"] == 2 and s["failed"] == 2 and s["failed_skipped"] == 0


# ----------------------------------------------------------------------------- item 13: arguments
def test_workers_zero_and_bogus_backend_info(tmp_path, monkeypatch, capsys):
    preset = _preset(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["study", "run", "--preset", str(preset), "--db", str(tmp_path / "w.sqlite"), "--workers", "0"])
    assert e.value.code == 2
    assert "--workers" in capsys.readouterr().err
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            run_study(synth(), tmp_path / "w.sqlite", workers=bad, progress=False)
    assert not (tmp_path / "w.sqlite").exists()
    monkeypatch.setenv("MINACTION_BACKEND", "bogus")
    assert main(["info"]) == 2
    _one_line_error(capsys.readouterr().err, "MINACTION_BACKEND='bogus'", "unknown minaction backend")


# ----------------------------------------------------------------------------- item 10: file names
@pytest.mark.parametrize("name", ["res#1.sqlite", "a%41b.sqlite", "q?x=1.sqlite", "with space.sqlite"])
def test_store_names_that_a_uri_would_mangle(tmp_path, capsys, name):
    folder = tmp_path / "d"
    folder.mkdir()
    db = folder / name
    con = store.connect(db)
    store.record_run(con, {"run_id": "r1", "status": "done", "preset": "p"})
    con.close()
    assert main(["study", "status", "--db", str(db)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["done"] == 1 and st["planned"] == 1
    ro = store.connect(db, readonly=True)
    assert store.status_counts(ro) == {"done": 1}
    ro.close()
    assert {n for n in os.listdir(folder) if not n.startswith(name)} == set()  # no 'res', 'aAb.sqlite', 'q'


def test_study_run_into_a_hash_name(tmp_path, capsys):
    db = tmp_path / "res#1.sqlite"
    preset = _preset(tmp_path, lams=[0.0], seeds=[0, 1])
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["study", "status", "--db", str(db), "--preset", str(preset)]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2
    assert not (tmp_path / "res").exists()


# ----------------------------------------------------------------------------- items 11, 12: read-only
def _drop_dac():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _unprivileged(args, **kw):
    """Run ``args`` so that permission bits apply to it (see the module docstring)."""
    pre = _drop_dac if os.geteuid() == 0 else None
    return subprocess.run(args, preexec_fn=pre, capture_output=True, text=True, **kw)


@pytest.fixture
def readonly_folder(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux")
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    code = f"open({str(folder / 'probe')!r}, 'x')"  # create a new file in the folder
    os.chmod(folder, 0o555)
    try:
        probe = _unprivileged([sys.executable, "-c", code])
    except (OSError, subprocess.SubprocessError) as exc:
        os.chmod(folder, 0o755)
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {exc}")
    if probe.returncode == 0 or "Permission denied" not in probe.stderr:
        os.chmod(folder, 0o755)
        pytest.skip(f"could not make a folder read-only for a child process here: {probe.stderr[-300:]}")
    os.chmod(folder, 0o755)
    yield folder
    os.chmod(folder, 0o755)


def _cli(*args):
    return [sys.executable, "-m", "minaction.cli", *args]


def test_wal_store_in_readonly_folder_is_readable(readonly_folder, tmp_path):
    """`study status` and the report's loader read a WAL store in a folder they cannot write
    (SQLite's plain mode=ro open needs to create the -shm file there and fails)."""
    db = readonly_folder / "s.sqlite"
    con = store.connect(db)
    for i in range(3):
        store.record_run(con, {"run_id": f"r{i}", "status": "done", "preset": "p", "lam": 0.0})
    con.close()  # the last connection merges the WAL into the file and removes -wal/-shm
    assert sorted(os.listdir(readonly_folder)) == ["s.sqlite"]
    before = _snapshot(readonly_folder)
    os.chmod(readonly_folder, 0o555)
    r = _unprivileged(_cli("study", "status", "--db", str(db)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["done"] == 3
    code = "import sys; from minaction.report.store import load_store; print(len(load_store(sys.argv[1]).runs_all))"
    r = _unprivileged([sys.executable, "-c", code, str(db)])
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    os.chmod(readonly_folder, 0o755)
    assert _snapshot(readonly_folder) == before


def test_wal_with_unmerged_changes_in_readonly_folder_says_make_it_writable(readonly_folder, tmp_path):
    """With changes still in the -wal file, a snapshot read would silently miss them: say so instead."""
    import shutil

    src = tmp_path / "live.sqlite"
    con = store.connect(src)
    for i in range(5):
        store.record_run(con, {"run_id": f"r{i}", "status": "done"})
    db = readonly_folder / "s.sqlite"
    shutil.copy(src, db)
    shutil.copy(str(src) + "-wal", str(db) + "-wal")  # copied while the writer is open: not yet merged
    con.close()
    before = _snapshot(readonly_folder)
    os.chmod(readonly_folder, 0o555)
    r = _unprivileged(_cli("study", "status", "--db", str(db)))
    assert r.returncode == 2
    _one_line_error(r.stderr, str(db), "-wal", "writable")
    os.chmod(readonly_folder, 0o755)
    assert _snapshot(readonly_folder) == before


def test_db_in_readonly_folder_is_refused(readonly_folder, tmp_path):
    # built-in names (the subprocess does not import the test doubles): the preset passes its checks, the store
    # is then refused (the data are looked for only after that)
    preset = _preset(tmp_path, archs=["mlp"], datasets=["mnist"])
    os.chmod(readonly_folder, 0o555)
    r = _unprivileged(_cli("study", "run", "--preset", str(preset), "--db", str(readonly_folder / "new.sqlite"),
                           "--no-progress"))
    assert r.returncode == 2
    _one_line_error(r.stderr, str(readonly_folder / "new.sqlite"), "not writable")
    assert os.listdir(readonly_folder) == []


def test_store_left_read_only_by_status_names_its_files_and_the_fix(readonly_folder, tmp_path):
    """A store of mode 444 read by `study status` gets -wal/-shm files of mode 444 (SQLite gives them the store's
    mode); after the store itself is made writable again, `study run` failed at its first write with "attempt to
    write a readonly database", naming no file. It now names the read-only files and the chmod that fixes them,
    before anything is scheduled."""
    db = readonly_folder / "s.sqlite"
    con = store.connect(db)
    store.record_run(con, {"run_id": "r0", "status": "done", "preset": "p", "lam": 0.0})
    con.close()
    os.chmod(db, 0o444)
    r = _unprivileged(_cli("study", "status", "--db", str(db)))
    assert r.returncode == 0, r.stderr
    shm = str(db) + "-shm"
    assert os.path.exists(shm) and not os.stat(shm).st_mode & 0o222  # what SQLite did
    preset = _preset(tmp_path, archs=["mlp"], datasets=["mnist"])  # built-in names: the child needs no doubles
    run = _cli("study", "run", "--preset", str(preset), "--db", str(db), "--no-progress")
    r = _unprivileged(run)
    assert r.returncode == 2
    _one_line_error(r.stderr, repr(str(db)), repr(shm), "chmod u+w", "read-only")
    os.chmod(db, 0o644)
    r = _unprivileged(run)
    assert r.returncode == 2
    line = _one_line_error(r.stderr, repr(shm), "chmod u+w", "study status")
    left = " ".join(p for p in (str(db) + "-wal", shm) if os.path.exists(p))
    assert f"chmod u+w {left};" in line  # the db itself is writable now: not named


def test_diagnose_names_the_read_only_wal_and_shm_files(tmp_path, monkeypatch):
    """The same diagnosis without permissions (root writes any file): which of the store's files are read-only is
    what the error names, with the chmod that fixes them."""
    db = tmp_path / "s.sqlite"
    for p in (db, tmp_path / "s.sqlite-wal", tmp_path / "s.sqlite-shm"):
        p.write_bytes(b"")
    monkeypatch.setattr(store, "_writable", lambda p: p.is_dir() or p == db)
    err = str(store.diagnose(db, sqlite3.OperationalError("attempt to write a readonly database"), "write to"))
    wal, shm = str(db) + "-wal", str(db) + "-shm"
    assert err.startswith(f"cannot write to the study store {str(db)!r}: {wal!r} and {shm!r} are read-only "
                          f"(attempt to write a readonly database)"), err
    assert err.endswith(f"Make them writable (as their owner): chmod u+w {wal} {shm}; then run the same command "
                        f"again"), err
    monkeypatch.setattr(store, "_writable", lambda p: p.is_dir())
    err = str(store.diagnose(db, sqlite3.OperationalError("attempt to write a readonly database"), "write to"))
    assert f"chmod u+w {db} {wal} {shm};" in err
    monkeypatch.setattr(store, "_writable", lambda p: p.is_dir() or p != db)
    err = str(store.diagnose(db, sqlite3.OperationalError("attempt to write a readonly database"), "write to"))
    assert f"{str(db)!r} is read-only" in err and f"chmod u+w {db};" in err and "-shm" not in err


def test_writer_refuses_a_store_whose_shm_file_is_read_only(tmp_path, monkeypatch):
    """SQLite opens such a store for writing without a word and fails at the first write: the writer's connect
    refuses it at once, naming the file (before the study schedules anything)."""
    db = tmp_path / "s.sqlite"
    con = store.connect(db)
    store.record_run(con, {"run_id": "r0", "status": "done"})
    side = store.connect(db, readonly=True)  # an open reader keeps the -wal and -shm files
    con.close()
    shm = tmp_path / "s.sqlite-shm"
    assert shm.exists()
    monkeypatch.setattr(store, "_writable", lambda p: p != shm)
    with pytest.raises(store.StoreError, match=r"/s\.sqlite-shm' is read-only.*chmod u\+w .*s\.sqlite-shm;"):
        store.connect(db)
    side.close()


def test_db_under_a_file_is_refused(tmp_path, capsys):
    """Needs no privileges: the store's folder is a regular file."""
    (tmp_path / "plain").write_text("x")
    db = tmp_path / "plain" / "s.sqlite"
    assert main(["study", "run", "--preset", str(_preset(tmp_path)), "--db", str(db), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, str(tmp_path / "plain"))


# ----------------------------------------------------------------------------- item 12: not a store
def _store_with_runs(path, n=60):
    con = store.connect(path)
    for i in range(n):
        store.record_run(con, {"run_id": f"r{i}", "status": "done", "error": "x" * 500},
                         [{"epoch": e, "train_loss": 1.0} for e in range(1, 21)])
    con.close()


@pytest.mark.parametrize("kind", ["text", "truncated", "other-sqlite", "other-runs-table", "folder"])
def test_files_that_are_not_stores(tmp_path, capsys, kind):
    folder = tmp_path / "d"
    folder.mkdir()
    db = folder / "s.sqlite"
    if kind == "text":
        db.write_bytes(b"run_id,status\n" * 300)
        needle = "not an SQLite database"
    elif kind == "truncated":
        _store_with_runs(tmp_path / "full.sqlite")
        data = (tmp_path / "full.sqlite").read_bytes()
        db.write_bytes(data[:len(data) // 2])
        needle = "damaged"
    elif kind == "other-sqlite":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE photos (id INTEGER)")
        con.commit()
        con.close()
        needle = "not a study store"
    elif kind == "other-runs-table":  # another program's `runs`: it was put in WAL mode and given our tables
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE runs (id INTEGER, name TEXT)")
        con.commit()
        con.close()
        needle = "its 'runs' table lacks"
    else:
        db.mkdir()
        needle = "is a folder"
    before = _snapshot(folder)
    preset = _preset(tmp_path)
    for args in (["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress"],
                 ["study", "status", "--db", str(db)], ["study", "export", "--db", str(db), "--out",
                                                         str(tmp_path / "x.jsonl.gz")]):
        assert main(args) == 2, args
        _one_line_error(capsys.readouterr().err, str(db), needle)
        assert _snapshot(folder) == before  # no byte changed, no -wal, -shm or lock file made


def test_status_of_an_empty_file_says_no_study_is_planned_there(tmp_path, capsys):
    """`study run` takes a 0-byte --db as a new store; `study status` called it "not a study store". It now says
    that nothing is planned there yet and how to start, without touching the file; and `run` still takes it."""
    folder = tmp_path / "d"
    folder.mkdir()
    db = folder / "s.sqlite"
    db.write_bytes(b"")
    preset = _preset(tmp_path, lams=[0.0], seeds=[0, 1])
    for args, planned in ((["--db", str(db)], 0), (["--db", str(db), "--preset", str(preset)], 2)):
        assert main(["study", "status", *args]) == 0
        out, err = capsys.readouterr()
        st = json.loads(out)
        assert (st["planned"], st["pending"], st["done"]) == (planned, planned, 0)
        assert "not a study store" not in err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"minaction study status: note: no study has been planned in {db} yet (the file is "
                               f"empty); `minaction study run --preset ")
        assert line.endswith(f" --db {db}` starts one") and st["note"] in line
        assert str(preset) in line if planned else "--preset NAME" in line
    assert os.listdir(folder) == ["s.sqlite"] and db.stat().st_size == 0  # read without a byte written
    assert main(["study", "export", "--db", str(db), "--out", str(tmp_path / "x.jsonl.gz")]) == 2
    _one_line_error(capsys.readouterr().err, "no study has been written to", "study run --preset NAME")
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["study", "status", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["done"] == 2 and "note" not in json.loads(out) and err == ""


def test_status_of_a_store_stopped_before_it_planned_says_so(tmp_path, monkeypatch, capsys):
    """A driver killed before it planned its preset (while the kernels were built, on first use minutes) left a
    store with no runs and no plan: `status` showed planned 0, pending 0, as a finished study does."""
    from minaction.study import runner

    def build(build=True):
        if build:
            raise KeyboardInterrupt  # Ctrl-C during the kernels' build
        return "auto"

    monkeypatch.setattr(runner, "check_backend", build)
    db = tmp_path / "s.sqlite"
    preset = _preset(tmp_path, lams=[0.0], seeds=[0, 1])
    with pytest.raises(KeyboardInterrupt):
        run_study(preset, db, workers=1, progress=False)
    st = study_status(db)
    assert (st["planned"], st["pending"]) == (0, 0)
    assert st["note"].startswith(f"no study has been planned in {db} yet (it holds no runs and no preset")
    assert st["note"].endswith(f"`minaction study run --preset NAME --db {db}` starts one")
    lock = store.acquire_writer_lock(db)  # a driver that is still starting: not "stopped"
    try:
        note = study_status(db)["note"]
        assert f"the `study run` writing it (pid {os.getpid()} " in note and "is starting" in note
    finally:
        store.release_writer_lock(lock)
    monkeypatch.undo()
    assert run_study(preset, db, workers=1, progress=False)["done"] == 2
    assert "note" not in study_status(db)


# ----------------------------------------------------------------------------- item 12: full disk
def test_full_disk_stops_with_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    """A full disk, simulated with SQLite's own size limit (``PRAGMA max_page_count``), which
    fails the commit with the very error a full disk gives (SQLITE_FULL)."""
    real_connect = store.connect

    def limited(path, readonly=False):
        con = real_connect(path, readonly)
        if not readonly:
            n = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count = {n}")
        return con

    preset = _preset(tmp_path, lams=[0.0, 1e-3, 1e-2, 1e-1], seeds=[0, 1, 2])
    db = tmp_path / "full.sqlite"
    store.connect(db).close()  # the schema exists: the limit leaves no room for the runs
    monkeypatch.setattr(store, "connect", limited)
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    # the study had started (its run count and time estimate come first); the failure is one line, the last
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert sum("error" in ln for ln in lines) == 1 and "error" in lines[-1], err
    _one_line_error(lines[-1], str(db), "database or disk is full", "Free some space")
    monkeypatch.setattr(store, "connect", real_connect)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    k = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert k < 12 and con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 2 * k  # whole runs only
    con.close()
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["already_finished"] == k and s["recorded"] == 12 - k
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (12, 12)
    con.close()


def test_full_disk_at_the_flops_marker_and_at_the_lock_note(tmp_path, monkeypatch, capsys):
    """Two writes a full disk reached outside the guarded ones (a trial on real tmpfs filesystems): the new
    store's FLOPs-rule marker gave a traceback, and closing the lock file, which flushed again a note that
    could not be written, raised ENOSPC and hid the one-line error naming the store."""
    from minaction.study import recount

    real = store.set_meta

    def full(con, key, value):
        if key == recount.FLOPS_META:
            raise sqlite3.OperationalError("database or disk is full")
        return real(con, key, value)

    preset = _preset(tmp_path, lams=[0.0], seeds=[0])
    db = tmp_path / "m.sqlite"
    monkeypatch.setattr(store, "set_meta", full)
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]) == 2
    _one_line_error(capsys.readouterr().err, str(db), "database or disk is full")

    class NoteThatCannotBeFlushed:  # what the lock file's close() did with an unwritten note on a full disk
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

        def close(self):
            os.close(self.fd)
            raise OSError(28, "No space left on device")

    fd = os.open(tmp_path / "x.lock", os.O_RDWR | os.O_CREAT)
    store.release_writer_lock(NoteThatCannotBeFlushed(fd))  # no error: the lock ends with the file


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_while_running_stops_the_study(tmp_path, monkeypatch, capsys, how):
    """SQLite writes on into an open file that was deleted (every later run lost, rc 0) or leaves a WAL that
    the next process applies to a file moved over it (an operations trial lost a whole other store)."""
    preset = _preset(tmp_path, lams=[0.0, 1e-3, 1e-2, 1e-1], seeds=[0, 1, 2])
    db = tmp_path / "s.sqlite"
    real = store.record_runs  # (the driver records a group's runs in one call)
    done = []

    def record_then_lose(con, records):
        real(con, records)
        if not done:
            done.append(records[0][0]["run_id"])
            os.unlink(db)
            if how == "replaced":
                store.connect(tmp_path / "other.sqlite").close()
                os.replace(tmp_path / "other.sqlite", db)

    monkeypatch.setattr(store, "record_runs", record_then_lose)
    rc = main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"])
    assert rc == 2 and done
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"was {'deleted or moved away' if how == 'deleted' else 'replaced by another file'} while this study ran" in err, err


# ----------------------------------------------------------------------------- papercut: progress
def test_progress_says_what_happens_before_the_first_group(tmp_path, capsys):
    run_study(synth(lams=[0.0], seeds=[0, 1, 2]), tmp_path / "p.sqlite", workers=1, progress=True)
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").splitlines() if f.strip()]
    start = [f for f in frames if STARTING in f]
    assert start, err
    assert all("<" not in f and "run/s" not in f and "s/run" not in f for f in start)  # no rate, no ETA
    assert any(f.startswith("training") and "3/3" in f for f in frames), err


def test_out_pointing_at_a_file(tmp_path, capsys):
    """`--out` naming a file: one line, rc 2, and for `replicate` before any training."""
    pytest.importorskip("minaction.report")
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    db = tmp_path / "never.sqlite"
    rc = main(["replicate", "--preset", str(_preset(tmp_path)), "--db", str(db), "--out", str(out), "--no-progress",
               "--retry-failed"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, str(out), "is a file")
    assert not db.exists() and out.read_text() == "keep me"
    rc = main(["report", "--db", str(db), "--out", str(out / "sub")])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, str(out), "is a file")


def test_a_study_says_when_its_runs_fall_back_to_reference(monkeypatch, capsys):
    """Workers keep quiet about the reference fallback; with no compiler (or no ninja on PATH) a whole study
    trained on the slow backend with nothing on screen. The driver loads the kernels first and says so."""
    from minaction.backends import select as _backend
    from minaction.study import runner

    monkeypatch.delenv("MINACTION_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "select", lambda device: "reference")
    monkeypatch.setattr(_backend, "available", lambda name, device="cpu": (False, "RuntimeError: no C++ compiler"))
    assert runner.check_backend() == "auto"
    err = capsys.readouterr().err
    assert "every run will train on the slow 'reference' backend" in err and "no C++ compiler" in err
    monkeypatch.setattr(_backend, "select", lambda device: "cpu")
    runner.check_backend()
    assert capsys.readouterr().err == ""


def test_the_data_is_checked_before_the_kernels_are_built(tmp_path, monkeypatch):
    """On a fresh machine the driver built the C++ kernels (~10 minutes on 2 loaded cores) and only then found
    that a dataset could not be had (a fresh-clone trial, session 23). The build now waits for the data check."""
    from minaction.study import runner

    calls = []
    monkeypatch.setattr(runner, "check_backend", lambda build=True: calls.append(("backend", build)) or "auto")

    def no_data(runs):
        calls.append(("inputs", len(runs)))
        raise runner.StudyConfigError("dataset 'synthetic' is not available on this machine")

    monkeypatch.setattr(runner, "check_inputs", no_data)
    with pytest.raises(runner.StudyConfigError, match="not available"):
        runner.run_study(_preset(tmp_path), tmp_path / "d.sqlite", workers=1, progress=False)
    assert calls[0] == ("backend", False) and calls[1][0] == "inputs" and len(calls) == 2


def _script_run(tmp_path, body, *args, module=None):
    """Run ``body`` as a main script (or, with ``module``, as ``python -m module`` from tmp_path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
    if module is None:
        script = tmp_path / "script.py"
        script.write_text(body)
        cmd = [sys.executable, str(script), *args]
    else:
        pkg = tmp_path / module.split(".")[0]
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (tmp_path / (module.replace(".", "/") + ".py")).write_text(body)
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD)


def test_run_study_outside_the_main_guard_is_refused_before_the_store_exists(tmp_path):
    """A script calling run_study at its top level: its workers import it again and each started the
    study too, so every run was recorded failed by a lost worker. Now refused before any store exists."""
    preset = _preset(tmp_path, lams=[0.0], seeds=[0])
    body = (DRIVER_PRELUDE.replace("; ", "\n") + "from minaction.study import run_study\n"
            "run_study(sys.argv[1], sys.argv[2], workers=1, progress=False)\n")
    for module in (None, "mypkg.run"):  # a script, and `python -m package.module` (imported again by name)
        db = tmp_path / f"{module}.sqlite"
        r = _script_run(tmp_path, body, str(preset), str(db), module=module)
        assert r.returncode != 0
        assert "StudyConfigError" in r.stderr and 'outside `if __name__ == "__main__":`' in r.stderr, r.stderr
        assert "line " in r.stderr and "lost" not in r.stderr
        assert not db.exists() and not os.path.exists(str(db) + ".lock")


_GUARDED = {  # the call's statement, after `def main(): check_main_guard('local'); print('passed')`
    "if": 'if __name__ == "__main__":\n    main()\n',
    "reversed": "if '__main__' == __name__ and True:\n    main()\n",
    "constant": 'MAIN = "__main__"\nif __name__ == MAIN:\n    main()\n',
    "match": 'match __name__:\n    case "__main__":\n        main()\n',
    "conditional": 'main() if __name__ == "__main__" else None\n',
    "and": '__name__ == "__main__" and main()\n',
    "in the function": 'def run():\n    if __name__ != "__main__":\n        return\n    main()\nrun()\n',
}


@pytest.mark.parametrize("guard", sorted(_GUARDED))
def test_run_study_under_the_main_guard_passes_the_check(tmp_path, guard):
    """The check reads the module-level statement running the call: any compound statement around it or any
    test of __name__ in it passes (a review found false refusals of match, a conditional expression, `and`,
    and a guard through a constant); only a plain statement without one (`main()`) is refused. python -m on a
    package's __main__ is never imported again."""
    body = ("from minaction.study.runner import check_main_guard\n"
            "def main():\n    check_main_guard('local')\n    print('passed')\n" + _GUARDED[guard])
    r = _script_run(tmp_path, body)
    assert r.returncode == 0 and r.stdout.strip() == "passed", r.stderr
    if guard == "if":
        r = _script_run(tmp_path, body.replace(_GUARDED[guard], "main()\n"))
        assert r.returncode != 0 and "StudyConfigError" in r.stderr
    r = _script_run(tmp_path, "from minaction.study.runner import check_main_guard\n"
                    "check_main_guard('local')\nprint('passed')\n", module="tool.__main__")
    assert r.returncode == 0 and r.stdout.strip() == "passed", r.stderr


def test_a_checkpoint_path_that_is_a_file_is_one_warning(tmp_path, capsys):
    """<db>.ckpt existing as a file: every group warned twice (cannot write, then cannot delete) and trained
    without a checkpoint. Now one warning at the start, and the study runs without checkpoints."""
    preset = _preset(tmp_path)
    db = tmp_path / "f.sqlite"
    (tmp_path / "f.sqlite.ckpt").write_text("not a folder")
    assert main(["study", "run", "--preset", str(preset), "--db", str(db), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "is not a folder, so this study runs without checkpoints" in warned[0], err


def test_an_empty_db_name_is_named(tmp_path, capsys, monkeypatch):
    """`--db ''` said "the study store '.' is a folder"."""
    monkeypatch.chdir(tmp_path)
    preset = _preset(tmp_path)
    for args in (["study", "run", "--preset", str(preset), "--db", "", "--no-progress"], ["study", "status", "--db", ""],
                 ["report", "--db", "", "--out", str(tmp_path / "r")]):
        assert main(args) == 2, args
        _one_line_error(capsys.readouterr().err, "name is empty (--db '')")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth.toml"]


def test_a_data_option_of_an_impossible_value_is_refused_before_the_store_exists():
    """[data_opts.nmnist] T = -1 (the right type) failed every run of the dataset in its worker (a guarantees
    trial): the option's value is checked with its type, before anything is scheduled."""
    from minaction.study.runner import _check_data_opts

    with pytest.raises(StudyConfigError, match=r"\[data_opts.nmnist\]: dataset 'nmnist': option T must be >= 1"):
        _check_data_opts("nmnist", {"T": -1})
    _check_data_opts("nmnist", {"T": 4, "seed": 1})


def test_ctrl_c_while_the_forkserver_preloads_prints_no_traceback(tmp_path):
    """Ctrl-C reaches the whole process group; while the forkserver imported torch (seconds) it printed a
    KeyboardInterrupt traceback beside the driver's one line. The preload ignores SIGINT while it imports
    (checked here on an event: SIGINT is sent from inside the preload's own import of the trainer) and
    restores the handler after, for the workers."""
    script = tmp_path / "preload_sigint.py"
    script.write_text(
        "import importlib.abc, os, signal, sys\n"
        # as in a terminal (a shell's background job starts with SIGINT ignored, and Python then keeps it so)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "seen = []\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'minaction.study.trainer' and not seen:\n"
        "            seen.append(signal.getsignal(signal.SIGINT))\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "import minaction.study._preload\n"
        "assert seen == [signal.SIG_IGN], seen\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "MINACTION_STUDY_DRIVER"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "KeyboardInterrupt" not in r.stderr
