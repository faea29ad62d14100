"""The study driver on the test-only synthetic dataset/model (tests/doubles/study.py):
resume after SIGKILL, failures, divergence, grouping invariance, dask == local, the CLI."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.study import checkpoint, run_study, study_status
from minaction.study.presets import expand

#: The start of a driver run in a fresh process (python -c): like any user script it registers the
#: test doubles by importing their module, from this folder.
DRIVER_PRELUDE = (f"import sys; sys.path.insert(0, {str(doubles.TESTS_DIR)!r}); "
                  "import doubles.study; ")

RESULT_COLS = "run_id, status, epochs, train_loss, val_acc, test_acc, test_loss, test_energy, test_active_frac, " \
              "test_energy_rescaled, n_params"


def synth(**over):
    spec = {"name": "synth", "archs": ["tiny_mlp"], "datasets": ["synthetic"], "lams": [0.0, 1e-3],
            "seeds": [0, 1, 2], "group_by": "seed", "max_group": 10,
            "budget": {"epochs": 2, "batch_size": 32, "width": 16, "eval_batch_size": 64}}
    spec.update(over)
    return spec


def toml_text(spec):
    lines = []
    for k, v in spec.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


HANG_GUARD = 900  # seconds: only a guard against a hang, never a speed requirement


def _grandchildren(pid):
    """Processes whose parent is a child of ``pid`` (the pool workers under the forkserver), via /proc."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    kids = {p for p, pp in parent.items() if pp == pid}
    return [p for p, pp in parent.items() if pp in kids]


def results(db):
    con = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in con.execute(f"SELECT {RESULT_COLS} FROM runs")}
    finally:
        con.close()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2], k
        for x, y in zip(a[k][2:], b[k][2:]):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6, abs=1e-7), (k, a[k], b[k])


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory):
    """The uninterrupted synthetic study (one process pool, 2 workers)."""
    db = tmp_path_factory.mktemp("ref") / "ref.sqlite"
    s = run_study(synth(), db, workers=2, progress=False)
    assert s["done"] == 6 and s["failed"] == 0
    # the kernels' first build is setup: it is in wall_s, not in the rate (a first study reported 316 runs/h for
    # three seconds of training after a six-minute build)
    assert 0 <= s["build_s"] < s["wall_s"]
    assert s["runs_per_hour"] == pytest.approx(3600 * 6 / (s["wall_s"] - s["build_s"]))
    return db


def test_rows_and_epochs(reference_db):
    con = sqlite3.connect(reference_db)
    rows = con.execute("SELECT status, epochs, group_size, modality, backend, preset, test_acc, wall_time_s "
                       "FROM runs").fetchall()
    assert len(rows) == 6
    for st, ep, gs, mod, be, preset, acc, wall in rows:
        assert (st, ep, gs, mod, preset) == ("done", 2, 3, "synthetic", "synth")
        assert be and 0 <= acc <= 1 and wall > 0
    ep = con.execute("SELECT epoch, wall_time_s FROM epochs ORDER BY run_id, epoch").fetchall()
    assert len(ep) == 12 and [e for e, _ in ep[:2]] == [1, 2]
    assert ep[1][1] >= ep[0][1]  # cumulative training time
    cfg = json.loads(con.execute("SELECT config_json FROM runs LIMIT 1").fetchone()[0])
    assert cfg["budget"]["epochs"] == 2 and cfg["dataset"] == "synthetic"


def test_rerun_skips_finished(reference_db):
    s = run_study(synth(), reference_db, workers=1, progress=False)
    assert s["already_finished"] == 6 and s["recorded"] == 0


def test_grouping_does_not_change_results(reference_db, tmp_path):
    """A run trained alone equals the same run trained as a member of a batched group."""
    db = tmp_path / "alone.sqlite"
    run_study(synth(group_by="none"), db, workers=1, progress=False)
    assert_same(results(reference_db), results(db))
    assert {r[0] for r in sqlite3.connect(db).execute("SELECT group_size FROM runs")} == {1}


def test_limit_then_resume_in_process(reference_db, tmp_path):
    db = tmp_path / "part.sqlite"
    s = run_study(synth(), db, workers=1, progress=False, limit=2)
    assert s["recorded"] == 2 and s["remaining"] == 4
    st = study_status(db, synth())
    assert (st["planned"], st["done"], st["pending"]) == (6, 2, 4)
    st = study_status(db)  # the preset's plan is kept in the store: pending is known without --preset
    assert (st["planned"], st["done"], st["pending"]) == (6, 2, 4)
    run_study(synth(), db, workers=1, progress=False)
    assert_same(results(reference_db), results(db))


def test_sigkill_resume(reference_db, tmp_path):
    """SIGKILL the driver partway; rerun; every run exactly once, same results, integrity ok."""
    spec = synth(seeds=list(range(3)), lams=[0.0, 1e-3, 1e-2, 1e-1], group_by="none")
    preset = tmp_path / "synth.toml"
    preset.write_text(toml_text(spec))
    db = tmp_path / "killed.sqlite"
    code = (DRIVER_PRELUDE + "from minaction.study import run_study; "
            "run_study(sys.argv[1], sys.argv[2], workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(preset), str(db)], start_new_session=True)
    try:
        # wait for an event (3 runs in the store), not a deadline: the guard only catches a hang
        # (a first start may build the C++ kernels, and a loaded machine may be slow)
        guard = time.monotonic() + HANG_GUARD
        n = 0
        while proc.poll() is None:
            assert time.monotonic() < guard, f"hang guard: fewer than 3 runs recorded in {HANG_GUARD} s"
            time.sleep(0.05)
            if db.exists():
                try:
                    con = sqlite3.connect(db, timeout=1)
                    n = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    n = 0
                if n >= 3:
                    break
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned pool workers, if any
        except ProcessLookupError:
            pass
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    partial = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    con.close()
    assert 3 <= partial < 12
    s = run_study(preset, db, workers=2, progress=False)
    assert s["already_finished"] == partial and s["recorded"] == 12 - partial
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (12, 12)
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 24
    con.close()
    full = tmp_path / "uninterrupted.sqlite"
    run_study(preset, full, workers=2, progress=False)
    assert_same(results(full), results(db))
    # the first two lambdas are the reference study's runs: same configuration, same id, same result
    ref = results(reference_db)
    got = results(db)
    assert_same(ref, {k: got[k] for k in ref})


def test_ctrl_c_stops_promptly(tmp_path):
    """SIGINT (Ctrl-C) stops the driver without waiting for the groups in flight."""
    spec = synth(lams=[0.0], seeds=[0, 1], group_by="none", budget={"epochs": 5000, "batch_size": 32, "width": 16})
    preset = tmp_path / "slow.toml"
    preset.write_text(toml_text(spec))
    db = tmp_path / "int.sqlite"
    # Python's own Ctrl-C handling, as in a terminal: a test run started in the background by a
    # non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and Python then keeps it ignored
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " + DRIVER_PRELUDE +
            "from minaction.study import run_study; "
            "run_study(sys.argv[1], sys.argv[2], workers=2, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(preset), str(db)], start_new_session=True,
                            stderr=subprocess.PIPE)
    try:
        # wait until both pool workers exist (they are training: each run takes far longer than
        # the test), an event rather than a fixed sleep; the guard only catches a hang
        guard = time.monotonic() + HANG_GUARD
        while len(_grandchildren(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < guard, f"hang guard: the workers did not start in {HANG_GUARD} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(HANG_GUARD)
        assert b"KeyboardInterrupt" in proc.stderr.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_stops_with_one_line(tmp_path, sig):
    """`kill` (a scheduler's time limit, a closed terminal) stops the `minaction` command as Ctrl-C
    does, with one line naming the signal and rc 128 + signal, rather than a silent death; the
    store stays whole."""
    spec = synth(lams=[0.0], seeds=[0, 1], group_by="none", budget={"epochs": 5000, "batch_size": 32, "width": 16})
    preset = tmp_path / "slow.toml"
    preset.write_text(toml_text(spec))
    db = tmp_path / "term.sqlite"
    # the default disposition, as in a terminal: a CI started under nohup hands SIGHUP down ignored, and an
    # ignored signal is left as it is (the run then simply finished)
    code = (f"import signal; signal.signal(signal.{sig}, signal.SIG_DFL); " + DRIVER_PRELUDE +
            "from minaction.cli import console_main; "
            "sys.argv = ['minaction', 'study', 'run', '--preset', sys.argv[1], '--db', sys.argv[2], "
            "'--workers', '2', '--no-progress']; sys.exit(console_main())")
    # each group saves a checkpoint at every epoch end: both files there are the event "both workers are
    # training" (two worker processes alone were not: one still unpickling its start-up state when the driver died
    # printed multiprocessing's traceback)
    env = dict(os.environ, MINACTION_CHECKPOINT_EPOCH_S="0")
    saved = checkpoint.directory(db)
    proc = subprocess.Popen([sys.executable, "-c", code, str(preset), str(db)], start_new_session=True,
                            stderr=subprocess.PIPE, env=env)
    signum = getattr(signal, sig)
    try:
        guard = time.monotonic() + HANG_GUARD
        while len(list(saved.glob("*.pt"))) < 2:  # an event: both workers are training
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < guard, f"hang guard: the workers did not start in {HANG_GUARD} s"
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        rc = proc.wait(HANG_GUARD)
        err = proc.stderr.read().decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == 128 + signum, err[-2000:]
    assert f"minaction: stopped by {sig}" in err and "resumes" in err and "Traceback" not in err, err[-2000:]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_failure_is_recorded_and_study_continues(tmp_path):
    spec = synth(archs=["tiny_fail", "tiny_mlp"], lams=[0.0], seeds=[0, 1])
    db = tmp_path / "f.sqlite"
    s = run_study(spec, db, workers=1, progress=False)
    assert s["failed"] == 2 and s["done"] == 2
    con = sqlite3.connect(db)
    rows = con.execute("SELECT arch, status, error FROM runs WHERE status = 'failed'").fetchall()
    assert {r[0] for r in rows} == {"tiny_fail"}
    assert all("Traceback" in r[2] and "tiny_fail: this architecture always raises" in r[2] for r in rows)
    # failed runs count as finished unless asked to retry them
    assert run_study(spec, db, workers=1, progress=False)["recorded"] == 0
    assert run_study(spec, db, workers=1, progress=False, retry_failed=True)["recorded"] == 2


def test_lost_worker_is_retried_then_recorded(tmp_path, capfd):
    """A group that kills its worker process is retried alone, then recorded as failed;
    the groups that shared the broken pool are rerun, not blamed. Each loss is one line on
    stderr (a long run with --no-progress otherwise showed no trace of it)."""
    spec = synth(archs=["tiny_crash", "tiny_mlp"], lams=[0.0, 1e-3], seeds=[0])
    db = tmp_path / "c.sqlite"
    s = run_study(spec, db, workers=2, progress=False, max_attempts=2)
    assert s["failed"] == 2 and s["done"] == 2
    err = capfd.readouterr().err
    assert "the worker training tiny_crash x synthetic" in err and "runs again, alone (attempt" in err
    assert "was lost in 2 attempts alone" in err and "recorded as failed" in err
    # a group that only shared the broken pool (maybe queued, never started) is not said to have lost its worker
    assert "the worker pool was lost while" in err and "(attempt 1 of 2 alone)" in err
    # each group is named apart (arch x dataset alone read as one loss repeated)
    assert "tiny_crash x synthetic, λ 0, seed 0 (1 run)" in err and "tiny_crash x synthetic, λ 0.001, seed 0" in err
    con = sqlite3.connect(db)
    rows = con.execute("SELECT arch, status, error FROM runs").fetchall()
    assert {(a, st) for a, st, _ in rows} == {("tiny_crash", "failed"), ("tiny_mlp", "done")}
    assert all("worker lost in 2 attempts" in e for a, _, e in rows if a == "tiny_crash")


def test_divergence_freezes_one_member(tmp_path):
    """lam = 1e39 overflows the objective of one member; the others train on unaffected."""
    spec = synth(lams=[0.0, 1e39], seeds=[0], group_by="seed+lam")
    db = tmp_path / "d.sqlite"
    s = run_study(spec, db, workers=1, progress=False)
    assert s["diverged"] == 1 and s["done"] == 1
    con = sqlite3.connect(db)
    st = dict(con.execute("SELECT lam, status FROM runs").fetchall())
    assert st == {0.0: "done", 1e39: "diverged"}
    err = con.execute("SELECT error, test_acc FROM runs WHERE status='diverged'").fetchone()
    assert "non-finite" in err[0] and err[1] is None
    # the surviving member matches the same run trained alone
    alone = tmp_path / "alone.sqlite"
    run_study(synth(lams=[0.0], seeds=[0]), alone, workers=1, progress=False)
    a, b = results(alone), results(db)
    assert_same(a, {k: b[k] for k in a})


def test_adam_overflow_is_diverged_not_done(tmp_path):
    """lam = 1e30 keeps the objective finite but overflows Adam's second moment to inf, so the
    member's updates are exactly 0: it must be recorded ``diverged``, alone or inside a group,
    and the other member of its group trains on unaffected."""
    spec = synth(lams=[0.0, 1e30], seeds=[0], group_by="seed+lam")
    db = tmp_path / "o.sqlite"
    s = run_study(spec, db, workers=1, progress=False)
    assert s["diverged"] == 1 and s["done"] == 1, s
    con = sqlite3.connect(db)
    assert dict(con.execute("SELECT lam, status FROM runs").fetchall()) == {0.0: "done", 1e30: "diverged"}
    err, acc = con.execute("SELECT error, test_acc FROM runs WHERE status = 'diverged'").fetchone()
    assert "optimizer state" in err and acc is None
    alone = tmp_path / "alone.sqlite"
    s = run_study(synth(lams=[0.0, 1e30], seeds=[0], group_by="none"), alone, workers=1, progress=False)
    assert s["diverged"] == 1 and s["done"] == 1, s
    a, b = results(alone), results(db)
    assert_same({k: v for k, v in a.items() if v[0] == "done"}, {k: v for k, v in b.items() if v[0] == "done"})


def test_finite_members_per_member():
    """The per-member check, for both model layouts: batched tensors (leading dim G) and a loop
    ensemble (``model.members``); a shared tensor counts against every member."""
    import torch
    from torch import nn

    from minaction.study.trainer import finite_members

    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4, 2))
            self.shared = nn.Parameter(torch.zeros(5))

    m = Batched()
    opt = torch.optim.Adam(m.parameters())
    m.w.grad, m.shared.grad = torch.ones_like(m.w), torch.ones_like(m.shared)
    opt.step()
    assert finite_members(m, opt, 3).tolist() == [True, True, True]
    opt.state[m.w]["exp_avg_sq"][1, 2, 0] = float("inf")
    assert finite_members(m, opt, 3).tolist() == [True, False, True]
    with torch.no_grad():
        m.w[2, 0, 0] = float("nan")
    assert finite_members(m, opt, 3).tolist() == [True, False, False]
    with torch.no_grad():
        m.shared[0] = float("inf")
    assert finite_members(m, opt, 3).tolist() == [False, False, False]

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # weight [2, 2]: not per member

    m = Loop()
    opt = torch.optim.Adam(m.parameters())
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[m.members[1].weight]["exp_avg_sq"][0, 0] = float("inf")
    assert finite_members(m, opt, 2).tolist() == [True, False]


def test_cli_study_run_starts_the_forkserver_before_importing_torch(tmp_path):
    """`minaction study run` (local executor) starts its workers' forkserver before the driver imports
    torch, so the two imports overlap; the study then runs as before. With another executor, or torch
    already imported (minaction.cli.main called from a script), nothing starts early."""
    preset = tmp_path / "synth.toml"
    preset.write_text(toml_text(synth(lams=[0.0], seeds=[0])))
    code = textwrap.dedent(f"""
        import sys
        import minaction.study.executors as ex
        assert "torch" not in sys.modules, "importing the executors loaded torch"
        seen, real = [], ex.start_forkserver

        def spy():
            seen.append("torch" in sys.modules)
            return real()

        ex.start_forkserver = spy
        from minaction.cli import _start_study_workers_early, main
        _start_study_workers_early(["study", "run", "--executor", "dask"])
        _start_study_workers_early(["study", "run", "--executor=ray"])
        assert seen == []
        rc = main(["study", "run", "--preset", {str(preset)!r}, "--db", {str(tmp_path / "s.sqlite")!r},
                   "--workers", "1", "--no-progress", "--plugin", "doubles.study"])
        # later calls (the plan timing the model in a child when its cost table lacks it, the pool) come
        # after torch and reuse the one server
        assert rc == 0 and seen[0] is False and seen[1:] and all(seen[1:]), (rc, seen)
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(doubles.TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               MINACTION_CACHE=str(tmp_path / "cache"))  # an empty cost table, whatever the user's cache holds
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "s.sqlite")
    assert con.execute("select count(*) from runs where status = 'done'").fetchone()[0] == 1
    con.close()


def test_finite_rows_is_exact_where_a_sum_overflows():
    """The fast check sums each row first; a finite row whose sum overflows is still finite, and a
    +inf/-inf pair (sum NaN) or a lone NaN is not."""
    import torch

    from minaction.study.trainer import _finite_rows

    big = torch.finfo(torch.float32).max
    t = torch.tensor([[big, big, 1.0], [1.0, 2.0, 3.0], [float("inf"), -float("inf"), 0.0], [0.0, float("nan"), 1.0],
                      [-big, -big, 0.0]])
    assert _finite_rows(t).tolist() == [True, True, False, False, True]
    h = torch.full((2, 3), 60000.0, dtype=torch.float16)  # a half row's sum overflows too
    h[1, 1] = float("inf")
    assert _finite_rows(h).tolist() == [True, False]


def test_dask_matches_local(reference_db, tmp_path):
    pytest.importorskip("dask.distributed")
    db = tmp_path / "dask.sqlite"
    s = run_study(synth(), db, executor="dask", workers=2, progress=False)
    assert s["done"] == 6
    assert_same(results(reference_db), results(db))


def test_ray_missing_is_a_clear_error(tmp_path):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install 'minaction\\[ray\\]'"):
        run_study(synth(), tmp_path / "r.sqlite", executor="ray", progress=False)
    assert not (tmp_path / "r.sqlite").exists()  # refused before the store was made (it held 32 pending runs)


def test_bad_executor(tmp_path):
    with pytest.raises(ValueError, match="unknown executor"):
        run_study(synth(), tmp_path / "r.sqlite", executor="slurm", progress=False)


def test_cli(reference_db, tmp_path, capsys):
    from minaction.study import cli
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    preset = tmp_path / "synth.toml"
    preset.write_text(toml_text(synth()))
    args = parser.parse_args(["study", "status", "--db", str(reference_db), "--preset", str(preset)])
    assert args.func(args) == 0
    st = json.loads(capsys.readouterr().out)
    assert {k: st[k] for k in ("planned", "done", "failed", "diverged", "pending")} == {
        "planned": 6, "done": 6, "failed": 0, "diverged": 0, "pending": 0}
    assert st["running"] is None
    # without --preset: planned over every preset run into the store (kept in its meta table)
    args = parser.parse_args(["study", "status", "--db", str(reference_db)])
    assert args.func(args) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["planned"], st["done"], st["pending"]) == (6, 6, 0) and st["presets"]["synth"]["planned"] == 6
    args = parser.parse_args(["study", "run", "--preset", "no-such", "--db", str(tmp_path / "x.sqlite")])
    assert args.func(args) == 2
    assert "unknown preset" in capsys.readouterr().err
    args = parser.parse_args(["study", "run", "--preset", str(preset), "--db", str(tmp_path / "y.sqlite"),
                              "--workers", "1", "--no-progress", "--limit", "1"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["recorded"] == 1
    assert len(expand(synth())) == 6


def test_cli_plugin_registers_user_architectures_in_a_fresh_process(tmp_path):
    """``study run --plugin MODULE`` imports a user's module that registers its own
    architecture and dataset, in the driver and (through the task) in the workers; a module
    that cannot be imported is one error line, rc 2, and nothing recorded."""
    preset = tmp_path / "synth.toml"
    preset.write_text(toml_text(synth(lams=[0.0], seeds=[0])))
    db = tmp_path / "plugin.sqlite"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(doubles.TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "minaction.cli", "study", "run", "--preset", str(preset), "--db", str(db),
            "--workers", "1", "--no-progress"]
    bad = subprocess.run(base + ["--plugin", "no_such_plugin_module"], env=env, capture_output=True, text=True,
                         timeout=HANG_GUARD)
    assert bad.returncode == 2, bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--plugin 'no_such_plugin_module' could not be imported" in lines[0]
    assert not db.exists()
    without = subprocess.run(base, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert without.returncode == 2 and "tiny_mlp" in without.stderr  # unknown without the plugin
    assert "--plugin MODULE" in without.stderr  # the way to register one from the command line
    ok = subprocess.run(base + ["--plugin", "doubles.study"], env=env, capture_output=True, text=True,
                        timeout=HANG_GUARD)
    assert ok.returncode == 0, ok.stderr[-2000:]
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from runs where status = 'done'").fetchone()[0] == 1
    con.close()
    # a .py path works too (its folder goes on the path), and replicate takes --plugin as study run does
    plug = tmp_path / "myplug.py"
    plug.write_text("from doubles.study import *  # noqa: F401,F403  (registers tiny_mlp and synthetic)\n")
    rep = subprocess.run([sys.executable, "-m", "minaction.cli", "replicate", "--preset", str(preset), "--db",
                          str(tmp_path / "rep.sqlite"), "--out", str(tmp_path / "rep"), "--workers", "1",
                          "--no-progress", "--n-boot", "10", "--plugin", str(plug)],
                         env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "rep" / "report.md").is_file()
    missing = subprocess.run(base + ["--plugin", str(tmp_path / "nope.py")], env=env, capture_output=True,
                             text=True, timeout=HANG_GUARD)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_the_console_command_freezes_the_collector_only_on_its_way_out(tmp_path):
    """`minaction` (console_main) returns main's exit code and freezes the garbage collector for
    a quick interpreter exit; main() called from a script leaves the collector alone."""
    code = textwrap.dedent("""
        import gc, sys
        from minaction import cli
        sys.argv = ["minaction", "info"]
        assert cli.main(["info"]) == 0 and gc.get_freeze_count() == 0
        assert cli.console_main() == 0 and gc.get_freeze_count() > 0
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "status", "--db", str(tmp_path / "none.sqlite")],
                       capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 2 and "minaction study status: error" in r.stderr, (r.returncode, r.stderr[-2000:])


def test_the_console_command_says_how_to_resume_when_interrupted():
    """Ctrl-C on `minaction study run` printed a KeyboardInterrupt traceback; it is one line saying how to resume."""
    code = textwrap.dedent("""
        import sys
        from minaction import cli

        def interrupted():
            raise KeyboardInterrupt

        cli.main = interrupted
        sys.exit(cli.console_main())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the same command resumes" in r.stderr


def test_the_console_command_exits_quietly_when_its_reader_leaves():
    """`minaction study status --db X | head -2` ended in a BrokenPipeError traceback: the reader had closed the
    pipe. The command now exits with status 1 and nothing on stderr (a pipe whose read end is closed, in a child)."""
    code = textwrap.dedent("""
        import os, sys
        from minaction import cli
        r, w = os.pipe()
        os.close(r)  # the reader is gone: every write to w fails with EPIPE
        sys.stdout = os.fdopen(w, "w")
        sys.argv = ["minaction", "info"]
        rc = cli.console_main()
        sys.stderr.write(f"rc={rc}\\n")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.stderr.strip() == "rc=1", r.stderr[-2000:]


def test_a_model_that_ends_its_process_while_timed_does_not_end_the_driver(tmp_path):
    """`study run` times each block before it schedules (its estimate, and the balancing of groups): that timing
    trained the model in the driver, so a plugin model that ends its process (os._exit here) ended the driver with
    its exit code, no word and no run recorded, every time. It runs in a child now: the row says so, the study
    runs, and the worker retries record the crashing runs as failed."""
    import os

    from test_study_faults import _preset

    preset = _preset(tmp_path, archs=["tiny_crash", "tiny_mlp"], lams=[0.0], seeds=[0])
    db = tmp_path / "c.sqlite"
    env = dict(os.environ, MINACTION_CACHE=str(tmp_path / "cache"))  # an empty cost table: everything is timed
    tests = __import__("pathlib").Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "run", "--preset", str(preset), "--db", str(db),
                        "--workers", "1", "--no-progress", "--plugin", "doubles.study"],
                       cwd=tests, env=env, capture_output=True, text=True)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # (1: some runs failed)
    assert "not measured: tiny_crash x synthetic (RuntimeError: the process that timed tiny_crash x synthetic " \
           "ended while training it" in r.stderr
    con = sqlite3.connect(db)
    rows = dict(con.execute("SELECT arch, status FROM runs").fetchall())
    con.close()
    assert rows == {"tiny_crash": "failed", "tiny_mlp": "done"}


def test_a_model_that_hangs_while_timed_is_stopped_and_the_driver_goes_on(tmp_path, monkeypatch):
    """A plugin model that hangs while the plan times it (its forward waits on an event never set) hung the driver
    of `study run` before it scheduled anything. After MINACTION_PLAN_MEASURE_TIMEOUT_S the child is killed, and the
    start-up line names the block as not measured and why; the next block is timed in a new child."""
    import io

    from minaction.study import plan as _plan
    from test_study_faults import _preset

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))  # an empty cost table: everything is timed
    monkeypatch.setenv(_plan.MEASURE_TIMEOUT_ENV, "1")
    killed = []
    real_close = _plan._IsolatedMeasure.close

    def close(self, kill=False):
        if kill:
            killed.extend(self._pool._processes.values())
        real_close(self, kill)

    monkeypatch.setattr(_plan._IsolatedMeasure, "close", close)
    out = io.StringIO()
    preset = _preset(tmp_path, archs=["tiny_hang"], lams=[0.0], seeds=[0])
    from minaction.study.executors import start_forkserver

    start_forkserver()  # from the main thread, as the driver does (a thread's exit would end the server it started)
    t = threading.Thread(target=_plan.announce, args=(preset,), kwargs=dict(workers=1, file=out), daemon=True)
    t.start()
    t.join(HANG_GUARD)  # (a guard only: without the timeout, the driver waited here for ever)
    assert not t.is_alive(), "the driver hangs on the model's timing"
    assert "not measured: tiny_hang x synthetic (RuntimeError: timing tiny_hang x synthetic did not finish in 1 s" \
           in out.getvalue(), out.getvalue()
    assert "set MINACTION_PLAN_MEASURE_TIMEOUT_S to more seconds" in out.getvalue()
    # The child waits on an event never set, so only the kill ends it; it is gone (reaped by the forkserver). Its
    # exitcode is not read: the pool's manager thread and close() both read the forkserver's one status word from
    # the same pipe, and whichever reads second gets EOF, which multiprocessing reports as 255 (a race in CPython)
    assert len(killed) == 1
    killed[0].join(HANG_GUARD)
    assert not killed[0].is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0].pid, 0)
    monkeypatch.setenv(_plan.MEASURE_TIMEOUT_ENV, "inf")  # (a model that is timed in time is measured as before)
    p = _plan.plan(_preset(tmp_path, archs=["tiny_mlp"], lams=[0.0], seeds=[0]), workers=1)
    assert "error" not in p["rows"][0], p["rows"][0].get("error")
    assert p["rows"][0]["t_step_s"] > 0


def test_the_plan_measure_timeout_setting(monkeypatch):
    from minaction.study import plan as _plan

    env = _plan.MEASURE_TIMEOUT_ENV
    monkeypatch.delenv(env, raising=False)
    assert _plan.measure_timeout_s() == _plan.DEFAULT_MEASURE_TIMEOUT_S == 600.0
    for value, want in (("", 600.0), ("2.5", 2.5), ("inf", float("inf"))):
        monkeypatch.setenv(env, value)
        assert _plan.measure_timeout_s() == want
    for bad in ("0", "-1", "nan", "soon"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=f"{env} must be a number of seconds > 0"):
            _plan.measure_timeout_s()


def test_study_run_refuses_a_bad_plan_measure_timeout_before_it_trains(tmp_path, monkeypatch, capsys):
    """A bad MINACTION_PLAN_MEASURE_TIMEOUT_S was read inside the courtesy estimate, which printed "no time
    estimate" and trained on; now `study run` refuses it, with the setting's name, before the store exists."""
    from minaction.cli import main
    from minaction.study import plan as _plan
    from test_study_faults import _preset

    monkeypatch.setenv(_plan.MEASURE_TIMEOUT_ENV, "soon")
    db = tmp_path / "s.sqlite"
    rc = main(["study", "run", "--preset", str(_preset(tmp_path, archs=["tiny_mlp"], lams=[0.0], seeds=[0])),
               "--db", str(db), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "MINACTION_PLAN_MEASURE_TIMEOUT_S must be a number of seconds > 0 (or inf), got 'soon'" in err
    assert not db.exists()


def test_plan_times_an_architecture_registered_by_the_running_script(tmp_path):
    """plan() times blocks in a child process, which cannot import what the running script (__main__)
    registered: those are timed in the script's own process, as before."""
    import os
    from pathlib import Path

    from test_study_faults import _preset

    preset = _preset(tmp_path, archs=["main_mlp"], lams=[0.0], seeds=[0])
    script = tmp_path / "my_script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import doubles.study\n"
        "from minaction import models\n"
        "def build(arch, meta, **kw):\n"
        "    return doubles.study.build('tiny_mlp', meta, **kw)\n"
        "if __name__ == '__main__':  # registered here, not at import: a child re-importing the script lacks it\n"
        "    models.register_architecture('main_mlp', build, activation_stats=doubles.study.activation_stats)\n"
        "    from minaction.study.plan import plan\n"
        f"    p = plan({str(preset)!r}, workers=1)\n"
        "    assert all('error' not in r for r in p['rows']), p['rows']\n"
        "    print('ok', p['est_serial_s'] > 0)\n")
    env = dict(os.environ, MINACTION_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok True", r.stderr[-2000:]
