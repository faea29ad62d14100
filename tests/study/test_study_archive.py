"""study export / import: finished runs move between stores, and a study resumes after them."""
import gzip
import json
import sqlite3
import subprocess
import sys

import pytest
import torch

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.study import run_study, store
from minaction.study.archive import export_runs, import_runs, read_archive

from test_study_runner import assert_same, results, synth


def _all_rows(db):
    con = sqlite3.connect(db)
    try:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in ("runs", "epochs", "evals")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def source_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("src") / "src.sqlite"
    s = run_study(synth(), db, workers=1, progress=False)
    assert s["done"] == 6
    con = store.connect(db)
    try:  # one failed run beside the finished ones: export leaves it out
        store.record_run(con, {"run_id": "f" * 20, "preset": "synth", "status": "failed", "error": "boom"})
    finally:
        con.close()
    return db


def test_round_trip_keeps_every_row(source_db, tmp_path):
    arc = tmp_path / "runs.jsonl.gz"
    out = export_runs(source_db, arc)
    assert out["runs"] == 6 and out["not_exported"] == {"failed": 1}  # said, not dropped silently
    header, recs = read_archive(arc)
    recs = list(recs)
    assert header["runs"] == 6 and "preset:synth" in header["meta"]
    assert all(r["run"]["status"] == "done" and r["epochs"] and r["evals"] for r in recs)
    db = tmp_path / "copy.sqlite"
    got = import_runs(db, arc)
    assert (got["imported"], got["kept"], got["replaced_failed"]) == (6, 0, 0)
    src, dst = _all_rows(source_db), _all_rows(db)
    assert dst["runs"] == [r for r in src["runs"] if r[8] == "done"]  # column 9: status
    assert dst["epochs"] == src["epochs"] and dst["evals"] == src["evals"]
    # where each run came from travels with it: the code, torch, ISA, threads and host of the driver
    prov = store.provenance_of(sqlite3.connect(source_db))
    assert len(prov) == 7 - 1  # the hand-recorded failed run has none
    p = next(iter(prov.values()))
    assert p["threads"] == 1 and len(p["code"]) == 16 and p["torch"] == torch.__version__ and p["isa"]
    assert "cpu" in p and "host" in p  # the worker's machine (the driver's, with the local pool)
    assert all(r["provenance"] == prov[r["run"]["run_id"]] for r in recs)
    assert store.provenance_of(sqlite3.connect(db)) == prov
    # the importing store knows the preset, so status counts pending runs without --preset
    from minaction.study import study_status
    assert study_status(db)["pending"] == 0


def test_export_is_deterministic(source_db, tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    export_runs(source_db, a)
    export_runs(source_db, b)
    la = gzip.open(a, "rt").read().splitlines()
    lb = gzip.open(b, "rt").read().splitlines()
    assert la[1:] == lb[1:]  # only the header's exported_at may differ
    ha, hb = json.loads(la[0]), json.loads(lb[0])
    ha.pop("exported_at"), hb.pop("exported_at")
    assert ha == hb


def test_study_resumes_after_an_import(source_db, tmp_path):
    """Half the runs come from an archive; `study run` trains only the rest; results equal one uninterrupted run."""
    part = tmp_path / "part.sqlite"
    run_study(synth(), part, workers=1, progress=False, limit=3)
    arc = tmp_path / "part.jsonl.gz"
    assert export_runs(part, arc)["runs"] == 3
    db = tmp_path / "resumed.sqlite"
    import_runs(db, arc)
    (tmp_path / "other").mkdir()  # a second archive of the same name elsewhere keeps its own import record
    same_name = tmp_path / "other" / "part.jsonl.gz"
    export_runs(part, same_name)
    import_runs(db, same_name)
    con = sqlite3.connect(db)
    keys = {k for (k,) in con.execute("SELECT key FROM meta WHERE key LIKE 'imported:%'")}
    con.close()
    assert keys == {f"imported:{arc.resolve()}", f"imported:{same_name.resolve()}"}
    s = run_study(synth(), db, workers=1, progress=False)
    assert s["already_finished"] == 3 and s["recorded"] == 3
    ref = {k: v for k, v in results(source_db).items() if v[0] == "done"}
    assert_same(ref, results(db))


def test_done_kept_failed_replaced(source_db, tmp_path):
    arc = tmp_path / "runs.jsonl.gz"
    export_runs(source_db, arc)
    _, recs = read_archive(arc)
    ids = [r["run"]["run_id"] for r in recs]
    db = tmp_path / "mixed.sqlite"
    con = store.connect(db)
    try:
        store.record_run(con, {"run_id": ids[0], "preset": "synth", "status": "failed", "error": "lost worker"})
        store.record_run(con, {"run_id": ids[1], "preset": "synth", "status": "done", "test_acc": 0.123})
    finally:
        con.close()
    got = import_runs(db, arc)
    assert (got["imported"], got["kept"], got["replaced_failed"]) == (4, 1, 1)
    assert got["kept_differ"] == 1  # the store's test_acc 0.123 is not the archive's: said, and the store's kept
    con = sqlite3.connect(db)
    st = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    acc = con.execute("SELECT test_acc FROM runs WHERE run_id = ?", (ids[1],)).fetchone()[0]
    con.close()
    assert st[ids[0]] == "done" and acc == 0.123  # the store's own finished record wins
    again = import_runs(db, arc)  # idempotent
    assert (again["imported"], again["kept"], again["kept_differ"]) == (0, 6, 1)


def test_bad_archives_are_named(tmp_path, source_db):
    with pytest.raises(FileNotFoundError, match="no run archive"):
        import_runs(tmp_path / "db.sqlite", tmp_path / "missing.jsonl.gz")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n")
    with pytest.raises(ValueError, match="not a minaction run archive"):
        import_runs(tmp_path / "db.sqlite", plain)
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"format": "something-else"}) + "\n")
    with pytest.raises(ValueError, match="format"):
        import_runs(tmp_path / "db.sqlite", other)
    # truncated: the header says 6 runs, 2 follow; the two are kept, the error says so
    arc = tmp_path / "runs.jsonl.gz"
    export_runs(source_db, arc)
    lines = gzip.open(arc, "rt").read().splitlines()
    cut = tmp_path / "cut.jsonl.gz"
    with gzip.open(cut, "wt") as f:
        f.write("\n".join(lines[:3]) + "\n")
    db = tmp_path / "cut.sqlite"
    with pytest.raises(ValueError, match="holds 2 run records but its header says 6"):
        import_runs(db, cut)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    # the gzip stream itself cut (an interrupted copy): an EOFError traceback before (a guarantees trial); or a
    # bit flipped inside it, which may still decode to valid JSON: the stream's CRC is checked before any run is
    # written (a review: the runs read before the check failed were kept, altered, and kept over a good copy)
    data = arc.read_bytes()
    flips = []
    # past the gzip header (its stored file name is not covered by the CRC): the first deflate block, where
    # read_archive's header line failed with zlib.error, to the trailer's CRC
    for at in (60, 100, len(data) // 3, len(data) // 2, len(data) - 6):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        flips.append(bytes(flipped))
    for k, bad in enumerate((data[:-1], data[:-10], data[:len(data) // 2], *flips)):
        cut = tmp_path / f"bytes{k}.jsonl.gz"
        cut.write_bytes(bad)
        with pytest.raises(ValueError, match=r"is truncated or damaged .*nothing was imported"):
            import_runs(tmp_path / f"bytes{k}.sqlite", cut)
        assert not (tmp_path / f"bytes{k}.sqlite").exists()
    with pytest.raises(FileNotFoundError, match="no study store"):
        export_runs(tmp_path / "nothing.sqlite", tmp_path / "x.jsonl.gz")


def test_import_refused_while_a_driver_writes(source_db, tmp_path):
    arc = tmp_path / "runs.jsonl.gz"
    export_runs(source_db, arc)
    db = tmp_path / "busy.sqlite"
    store.connect(db).close()
    lock = store.acquire_writer_lock(db)
    try:
        with pytest.raises(store.StoreBusyError):
            import_runs(db, arc)
    finally:
        store.release_writer_lock(lock)


def test_cli_export_import_and_max_group(source_db, tmp_path):
    arc = tmp_path / "cli.jsonl.gz"
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "export", "--db", str(source_db),
                        "--out", str(arc)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"] == 6
    db = tmp_path / "cli.sqlite"
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "import", "--db", str(db), str(arc)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["imported"] == 6
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "import", "--db", str(db),
                        str(tmp_path / "none.gz")], capture_output=True, text=True)
    assert r.returncode == 2 and "no run archive" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_max_group_makes_smaller_groups_same_results(source_db, tmp_path):
    db = tmp_path / "small.sqlite"
    run_study(synth(), db, workers=1, progress=False, max_group=2)
    con = sqlite3.connect(db)
    assert {r[0] for r in con.execute("SELECT group_size FROM runs")} == {1, 2}  # 3 seeds per lambda: 2 + 1
    con.close()
    ref = {k: v for k, v in results(source_db).items() if v[0] == "done"}
    assert_same(ref, results(db))
    with pytest.raises(ValueError, match="exceeds the preset's max_group"):
        run_study(synth(), tmp_path / "x.sqlite", workers=1, progress=False, max_group=11)
    with pytest.raises(ValueError, match="positive integer"):
        run_study(synth(), tmp_path / "y.sqlite", workers=1, progress=False, max_group=0)


def test_plan_counts_max_group(tmp_path, monkeypatch):
    from minaction.study.plan import plan

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path))
    def fake(group, steps):
        return {"n_train": 10, "steps_per_epoch": 1, "t_step": 0.01, "t_eval": 0.01}

    p = plan(synth(), workers=1, measure_fn=fake, max_group=2)
    assert p["groups"] == 4  # two lambdas x (2 + 1) seeds
    assert plan(synth(), workers=1, measure_fn=fake)["groups"] == 2


def test_plan_with_retry_failed_counts_the_failed_runs_as_pending(tmp_path, monkeypatch):
    """`study run --retry-failed` printed '0 pending in 0 groups' and a 0 s estimate, then trained the failed
    runs: its header's plan counted them as finished. plan(..., retry_failed=True) counts them as pending."""
    from minaction.study.plan import plan

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path))

    def fake(group, steps):
        return {"n_train": 10, "steps_per_epoch": 1, "t_step": 0.01, "t_eval": 0.01}

    spec = synth(archs=["tiny_fail"])
    db = tmp_path / "f.sqlite"
    run_study(spec, db, workers=1, progress=False)
    con = sqlite3.connect(db)
    failed = con.execute("SELECT count(*) FROM runs WHERE status = 'failed'").fetchone()[0]
    con.close()
    assert failed > 0
    assert plan(spec, db=db, workers=1, measure_fn=fake)["pending"] == 0
    p = plan(spec, db=db, workers=1, measure_fn=fake, retry_failed=True)
    assert p["pending"] == failed and p["groups"] > 0


def test_status_says_why_runs_failed(tmp_path):
    """The reasons of failed runs were in SQLite only: `study status` lists them, per (arch, dataset, exception),
    with and without --preset."""
    from minaction.study.runner import study_status

    spec = synth(archs=["tiny_fail", "tiny_mlp"])
    db = tmp_path / "f.sqlite"
    run_study(spec, db, workers=1, progress=False)
    for st in (study_status(db), study_status(db, spec)):
        (row,) = st["failures"]
        assert row["arch"] == "tiny_fail" and row["dataset"] == "synthetic" and row["runs"] == st["failed"] == 6
        assert row["error"] and "Traceback" not in row["error"]
    assert study_status(db, synth())["failures"] == []  # tiny_mlp's runs: none failed


def test_export_that_cannot_be_written_names_the_file_and_leaves_no_partial(source_db, tmp_path, monkeypatch):
    """A full disk during an export gave `[Errno 28] No space left on device` naming no file, and left the
    .partial file behind (a guarantees trial on a tmpfs)."""
    real_open = gzip.GzipFile.write

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", full)
    out = tmp_path / "o" / "runs.jsonl.gz"
    with pytest.raises(store.StoreError, match=r"cannot write the run archive .*runs\.jsonl\.gz.*No space left"):
        export_runs(source_db, out)
    monkeypatch.setattr(gzip.GzipFile, "write", real_open)
    assert not out.exists() and not list(out.parent.iterdir())


def test_export_names_empty_and_file_parent_outputs(source_db, tmp_path):
    """`study export --db ''` said the store '.' is a folder; `--out ''` gave a raw PosixPath error; an --out under
    a file said "File exists" without naming it (a review)."""
    with pytest.raises(store.StoreError, match=r"name is empty \(--db ''\)"):
        export_runs("", tmp_path / "x.jsonl.gz")
    with pytest.raises(store.StoreError, match=r"archive's name is empty or a folder"):
        export_runs(source_db, "")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(store.StoreError, match=r"'.*afile' is a file, not a folder"):
        export_runs(source_db, tmp_path / "afile" / "sub" / "x.jsonl.gz")


def test_export_skip_leaves_out_the_runs_of_given_archives(source_db, tmp_path):
    """A store that imported published archives exports only what it trained since (the in-progress archive a
    reset machine's next session imports beside them); importing both gives back every run."""
    part = tmp_path / "part.sqlite"
    run_study(synth(), part, workers=1, progress=False, limit=2)
    first = tmp_path / "first.jsonl.gz"
    assert export_runs(part, first)["runs"] == 2
    rest = tmp_path / "rest.jsonl.gz"
    out = export_runs(source_db, rest, skip=[first])
    assert (out["runs"], out["skipped"]) == (4, 2)
    ids = {r["run"]["run_id"] for r in read_archive(rest)[1]}
    assert not ids & {r["run"]["run_id"] for r in read_archive(first)[1]}
    db = tmp_path / "both.sqlite"
    import_runs(db, first)
    import_runs(db, rest)
    # every finished run once (the two trained by `part` with its own wall times)
    assert sorted(r[0] for r in _all_rows(db)["runs"]) == sorted(r[0] for r in _all_rows(source_db)["runs"]
                                                                  if r[8] == "done")
    with pytest.raises(ValueError, match="also one whose runs are skipped"):
        export_runs(source_db, first, skip=[first])
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "export", "--db", str(source_db),
                        "--out", str(tmp_path / "cli.jsonl.gz"), "--skip", str(first)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2
