"""Resumable training groups (minaction.study.checkpoint), on the test-only synthetic task.

A group killed after a checkpoint (an injected exception, or a real SIGKILL of the process
triggered by the save itself: events, never deadlines) resumes and records exactly what an
uninterrupted run records (float64; timings aside); bad checkpoints are ignored with one
warning line; the driver deletes a group's checkpoint once its runs are recorded; early
stopping state (best weights, stopped members) survives the resume.
"""
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minaction.study import checkpoint, presets, run_study, trainer

import doubles.study  # noqa: F401,E402  (registers the dataset "synthetic" and the tiny_* architectures)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))  # never write the user's cost table
    monkeypatch.setattr(checkpoint, "after_save", None)
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", "0")  # these tests kill at epoch-end saves: save at each


def spec(**budget):
    # lr 0.05 and patience 1 epoch: members stop early at different epochs, their best
    # validation accuracy well before their last step (see test_early_stopping_state_survives)
    b = {"name": "test", "epochs": 6, "batch_size": 16, "width": 16, "eval_batch_size": 64, "eval_every": 3,
         "dtype": "float64", "patience_epochs": 1, "lr": 0.05}
    b.update(budget)
    return presets.load_preset({"name": "ckpt-test", "archs": ["tiny_mlp"], "datasets": ["synthetic"],
                                "lams": [0.0, 1e-2], "seeds": [0, 1], "group_by": "seed+lam", "max_group": 10,
                                "budget": b, "data_opts": {"synthetic": {"n": 64}}})


group, strip = doubles.study.one_group, doubles.study.without_timings


class Killed(Exception):
    pass


def kill_at_save(monkeypatch, n):
    """The n-th checkpoint save raises Killed (after the file is in place)."""
    saves = []

    def hook(path, loop):
        saves.append(dict(epoch=loop["epoch"], batch=loop["next_batch"], step=loop["step"]))
        if len(saves) == n:
            raise Killed

    monkeypatch.setattr(checkpoint, "after_save", hook)
    return saves


@pytest.fixture(scope="module")
def reference():
    return strip(trainer.train_group(group(spec())))


@pytest.mark.parametrize("k", [1, 2])
def test_resume_after_epoch_k_equals_uninterrupted(tmp_path, monkeypatch, reference, k):
    runs = group(spec())
    saves = kill_at_save(monkeypatch, k)
    with pytest.raises(Killed):
        trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert saves[-1] == {"epoch": k + 1, "batch": 0, "step": 4 * k}  # 64 samples / 16 = 4 steps per epoch
    assert checkpoint.path_for(tmp_path, runs).is_file()
    monkeypatch.setattr(checkpoint, "after_save", None)
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert out[0]["resumed_from"] == {"epoch": k + 1, "batch": 0, "step": 4 * k}
    assert strip(out) == reference  # bit-identical in float64


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, reference):
    """With every_s = 0 each mid-epoch evaluation (every 3 steps) also saves."""
    runs = group(spec())
    saves = kill_at_save(monkeypatch, 1)
    with pytest.raises(Killed):
        trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs, every_s=0))
    assert saves == [{"epoch": 1, "batch": 3, "step": 3}]  # the first evaluation, inside epoch 1
    monkeypatch.setattr(checkpoint, "after_save", None)
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs, every_s=0))
    assert out[0]["resumed_from"] == {"epoch": 1, "batch": 3, "step": 3}
    assert strip(out) == reference


def test_no_mid_epoch_save_before_the_interval(tmp_path, monkeypatch):
    runs = group(spec(epochs=2))
    saves = kill_at_save(monkeypatch, 99)
    trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs, every_s=1e9))
    assert [s["batch"] for s in saves] == [0]  # only the end of epoch 1 (not after the last epoch)


def test_epoch_end_saves_wait_for_their_interval(tmp_path, monkeypatch):
    """A group whose epochs take milliseconds does not write a checkpoint after each of them:
    an epoch end saves only once ``epoch_every_s`` passed since the last save."""
    runs = group(spec(epochs=3))
    saves = kill_at_save(monkeypatch, 99)
    trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs, epoch_every_s=1e9))
    assert saves == []
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", "1e9")
    assert checkpoint.GroupCheckpoint(tmp_path, runs).epoch_every_s == 1e9
    monkeypatch.delenv("MINACTION_CHECKPOINT_EPOCH_S")
    assert checkpoint.GroupCheckpoint(tmp_path, runs).epoch_every_s == checkpoint.DEFAULT_EPOCH_EVERY_S == 30.0
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", "soon")
    with pytest.raises(ValueError, match="MINACTION_CHECKPOINT_EPOCH_S must be a number"):
        checkpoint.GroupCheckpoint(tmp_path, runs)
    # the shorter of the two intervals counts: a mid-epoch interval of 0 saves at every epoch end too
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", "1e9")
    ck = checkpoint.GroupCheckpoint(tmp_path, runs, every_s=0)
    assert ck.due_at_epoch_end()


def _killed_in_subprocess(tmp_path, ckpt_dir, at_save):
    """Train the group in a child process that SIGKILLs itself right after its ``at_save``-th
    checkpoint save (an event, not a deadline)."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(doubles.TESTS_DIR)!r})
import doubles.study
from minaction.study import checkpoint, presets, trainer
sp = presets.load_preset({spec()!r})
(runs,) = presets.make_groups(presets.expand(sp), sp["group_by"], sp["max_group"])
n = [0]
def hook(path, loop):
    n[0] += 1
    if n[0] == {at_save}:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.after_save = hook
trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint({str(ckpt_dir)!r}, runs))
raise SystemExit("not killed")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MINACTION_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    ckpt_dir = tmp_path / "ck"
    _killed_in_subprocess(tmp_path, ckpt_dir, at_save=2)
    runs = group(spec())
    assert [p.name for p in ckpt_dir.iterdir()] == [checkpoint.group_name(runs)]  # no temporary file left
    res = trainer.run_group({"group_id": 0, "runs": runs, "threads": 1, "checkpoint_dir": str(ckpt_dir)})
    assert res["records"][0]["resumed_from"]["epoch"] == 3
    assert strip(res["records"]) == reference


def _one_warning(capfd):
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "checkpoint" in ln]
    assert len(lines) == 1 and lines[0].startswith("minaction: warning: ignoring"), err
    return lines[0]


def _saved_after_epoch_1(tmp_path, monkeypatch, runs):
    checkpoint.path_for(tmp_path, runs).unlink(missing_ok=True)  # train_group itself never deletes it
    kill_at_save(monkeypatch, 1)
    with pytest.raises(Killed):
        trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    monkeypatch.setattr(checkpoint, "after_save", None)
    return checkpoint.path_for(tmp_path, runs)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint_is_ignored_with_one_warning(tmp_path, monkeypatch, capfd, reference, damage):
    runs = group(spec())
    p = _saved_after_epoch_1(tmp_path, monkeypatch, runs)
    data = p.read_bytes()
    p.write_bytes({"garbage": b"not a checkpoint" * 10, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    capfd.readouterr()
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert "unreadable" in _one_warning(capfd)
    assert out[0]["resumed_from"] is None and strip(out) == reference


def test_checkpoint_of_another_configuration_or_code_is_ignored(tmp_path, monkeypatch, capfd, reference):
    runs = group(spec())
    _saved_after_epoch_1(tmp_path, monkeypatch, runs)
    # same run ids (so the same file), another budget: the key differs
    other = [dict(r, config=dict(r["config"], budget=dict(r["config"]["budget"], lr=0.01))) for r in runs]
    capfd.readouterr()
    out = trainer.train_group(other, ckpt=checkpoint.GroupCheckpoint(tmp_path, other))
    assert "another configuration or code version" in _one_warning(capfd)
    assert out[0]["resumed_from"] is None
    assert strip(out) == strip(trainer.train_group(other))
    # another code version of the trainer
    _saved_after_epoch_1(tmp_path, monkeypatch, runs)
    monkeypatch.setattr(checkpoint, "code_version", lambda: "0123456789abcdef")
    capfd.readouterr()
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert "another configuration or code version" in _one_warning(capfd)
    assert out[0]["resumed_from"] is None and strip(out) == reference


def test_checkpoint_whose_tensors_do_not_fit_is_ignored(tmp_path, monkeypatch, capfd, reference):
    """The key matches but the model changed shape (e.g. models/ was edited): the fresh
    model and optimizer are kept intact and the group starts over."""
    runs = group(spec())
    p = _saved_after_epoch_1(tmp_path, monkeypatch, runs)
    payload = torch.load(p, weights_only=True)
    name = sorted(payload["model"])[-1]
    payload["model"][name] = torch.zeros(3, dtype=torch.float64)
    torch.save(payload, p)
    capfd.readouterr()
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert "do not fit" in _one_warning(capfd)
    assert out[0]["resumed_from"] is None and strip(out) == reference


def test_early_stopping_state_survives_the_resume(tmp_path, monkeypatch, reference):
    """Killed after epoch 2: a member whose best validation accuracy came before the kill and
    which trains on after it must end with those best weights, restored from the checkpoint."""
    runs = group(spec())
    kill_at_save(monkeypatch, 2)
    with pytest.raises(Killed):
        trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    loop = torch.load(checkpoint.path_for(tmp_path, runs), weights_only=True)["loop"]
    monkeypatch.setattr(checkpoint, "after_save", None)
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    kill_step = loop["step"]
    carried = [g for g, rec in enumerate(out)
               if rec["evals"][-1]["step"] > kill_step  # trained on after the kill ...
               and [e["step"] for e in rec["evals"] if e["best"]] == [loop["best_step"][g]]  # ... best before it
               and loop["best_step"][g] <= kill_step and loop["best_w"][g] is not None]
    assert carried, "the test task no longer has a member whose best weights predate the kill"
    assert strip(out) == reference  # test accuracy measured on the restored best weights
    # every member early-stopped before the epoch cap, some of them after the resume
    assert all(rec["run"]["epochs"] < 6 for rec in out)
    assert any(not loop["stopped"][g] for g in range(len(out)))
    # the test accuracy really is that of the best weights: without them it differs
    monkeypatch.setattr(checkpoint, "after_save", None)
    p = _saved_after_epoch_1(tmp_path, monkeypatch, runs)  # overwrite with a fresh epoch-1 checkpoint
    payload = torch.load(p, weights_only=True)
    payload["loop"]["best_w"] = [None] * len(out)
    payload["loop"]["best_acc"] = [float("inf")] * len(out)  # nothing later counts as better
    torch.save(payload, p)
    lost = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs))
    assert [r["run"]["test_loss"] for r in lost] != [r["run"]["test_loss"] for r in out]


# ----------------------------------------------------------------------------- the driver
def toml_text(sp):
    import json

    lines = [f"{k} = {json.dumps(v)}" for k, v in sp.items() if not isinstance(v, dict)]
    for k, v in sp.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items() if not isinstance(vv, dict)]
    for k, v in sp.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    lines.append(f"[{k}.{kk}]")
                    lines += [f"{a} = {json.dumps(b)}" for a, b in vv.items()]
    return "\n".join(lines) + "\n"


def table(db, name, skip=("wall_time_s", "finished_at", "preset")):
    con = sqlite3.connect(db)
    try:
        cur = con.execute(f"SELECT * FROM {name}")
        cols = [d[0] for d in cur.description]
        keep = [i for i, c in enumerate(cols) if c not in skip]
        return sorted(tuple(r[i] for i in keep) for r in cur.fetchall())
    finally:
        con.close()


def _preset(tmp_path):
    raw = {"name": "ckpt-test", "archs": ["tiny_mlp"], "datasets": ["synthetic"], "lams": [0.0, 1e-2],
           "seeds": [0, 1], "group_by": "seed+lam", "max_group": 10, "budget": spec()["budget"],
           "data_opts": {"synthetic": {"n": 64}}}
    p = tmp_path / "ckpt-test.toml"
    p.write_text(toml_text(raw))
    assert presets.expand(presets.load_preset(p)) == presets.expand(spec())
    return p


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory):
    d = tmp_path_factory.mktemp("refdb")
    db = d / "ref.sqlite"
    s = run_study(_preset(d), db, workers=1, progress=False, executor="local")
    assert s["done"] == 4
    return db


@pytest.mark.parametrize("executor", ["local", "dask", "ray"])
def test_driver_resumes_from_checkpoint_and_deletes_it(tmp_path, reference_db, executor, capfd):
    if executor != "local":
        pytest.importorskip({"dask": "dask.distributed", "ray": "ray"}[executor])
    preset = _preset(tmp_path)
    db = tmp_path / "study.sqlite"
    ckpt_dir = checkpoint.directory(db)
    _killed_in_subprocess(tmp_path, ckpt_dir, at_save=2)
    (p,) = ckpt_dir.iterdir()
    # mark the checkpoint, so that the recorded rows show the worker really resumed from it
    payload = torch.load(p, weights_only=True)
    payload["loop"]["epoch_rows"][0][0]["train_loss"] = 123.0
    torch.save(payload, p)
    (ckpt_dir / (p.name + ".tmp999")).write_bytes(b"half a file from a killed writer")
    capfd.readouterr()
    s = run_study(preset, db, workers=1, progress=False, executor=executor)
    assert s["done"] == 4 and s["resumed_groups"] == 1
    said = [ln for ln in capfd.readouterr().err.splitlines() if "resume from the checkpoints" in ln]
    assert len(said) == 1 and said[0].startswith(f"minaction: 1 group(s) resume from the checkpoints in {ckpt_dir}")
    assert not ckpt_dir.exists()  # deleted once the group was recorded (and the temporary file at start)
    got, ref = table(db, "epochs"), table(reference_db, "epochs")
    marked = [i for i, r in enumerate(got) if r[2] == 123.0]
    assert len(marked) == 1  # the worker resumed from the (marked) checkpoint
    got[marked[0]] = ref[marked[0]]
    assert got == ref
    assert table(db, "runs") == table(reference_db, "runs")
    assert table(db, "evals") == table(reference_db, "evals")


def test_driver_announces_only_the_checkpoints_it_will_resume_from(tmp_path, capfd):
    """A checkpoint file the group cannot take (garbage here) was announced as a resume, and then ignored by the
    worker: the driver says the group starts over."""
    preset = _preset(tmp_path)
    db = tmp_path / "study.sqlite"
    runs = group(spec())
    ckpt_dir = checkpoint.directory(db)
    ckpt_dir.mkdir()
    checkpoint.path_for(ckpt_dir, runs).write_bytes(b"not a checkpoint")
    capfd.readouterr()
    s = run_study(preset, db, workers=1, progress=False)
    err = capfd.readouterr().err
    assert s["done"] == 4 and s["resumed_groups"] == 0
    assert "resume from the checkpoints" not in err
    assert "1 group(s) have a checkpoint in" in err and "start over" in err


def test_driver_cleans_stale_checkpoints(tmp_path, monkeypatch, reference_db):
    """A driver killed between recording a group and deleting its checkpoint leaves a file whose
    runs are all recorded: the next start deletes it; a checkpoint of unrecorded runs is kept."""
    import shutil

    db = tmp_path / "study.sqlite"
    shutil.copy(reference_db, db)
    ckpt_dir = checkpoint.directory(db)
    runs = group(spec())
    _saved_after_epoch_1(ckpt_dir, monkeypatch, runs)
    others = [dict(r, run_id=r["run_id"] + "-other") for r in runs]
    _saved_after_epoch_1(ckpt_dir, monkeypatch, others)
    s = run_study(_preset(tmp_path), db, workers=1, progress=False)
    assert s["recorded"] == 0
    assert [p.name for p in ckpt_dir.iterdir()] == [checkpoint.group_name(others)]


def test_no_checkpoints_option(tmp_path, monkeypatch):
    db = tmp_path / "study.sqlite"
    s = run_study(_preset(tmp_path), db, workers=1, progress=False, checkpoints=False)
    assert s["done"] == 4 and not checkpoint.directory(db).exists()


def test_save_failure_warns_once_and_training_goes_on(tmp_path, capfd, reference):
    runs = group(spec())
    blocker = tmp_path / "file"
    blocker.write_text("a file where the checkpoint folder should be")
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(blocker / "ck", runs))
    err = [ln for ln in capfd.readouterr().err.splitlines() if "checkpoint" in ln]
    assert len(err) == 1 and "cannot write the checkpoint" in err[0]
    assert strip(out) == reference


def test_a_write_error_torch_reports_as_runtimeerror_is_a_failed_save(tmp_path, capfd, monkeypatch, reference):
    """torch's zip writer reports a failed write (a full disk, `ulimit -f`) as RuntimeError ("unexpected pos"),
    not OSError: that escaped the save's handler and recorded the whole trained group as failed."""
    runs = group(spec())

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path / "ck", runs, every_s=0))
    err = [ln for ln in capfd.readouterr().err.splitlines() if "checkpoint" in ln]
    assert len(err) == 1 and "cannot write the checkpoint" in err[0] and "unexpected pos" in err[0]
    assert strip(out) == reference
    assert not any((tmp_path / "ck").glob("*tmp*"))  # the partial file is removed


# ----------------------------------------------------------------------------- an interrupt while a group is recorded
@pytest.fixture
def sigint_raises():
    """Python's own Ctrl-C handling, as in a terminal (a test run started in the background by a
    non-interactive shell inherits SIGINT ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _on_insert(monkeypatch, n, act):
    """``act()`` runs just before the ``n``-th run's rows are written inside a group's transaction."""
    from minaction.study import store

    real, calls = store._insert_run, []

    def insert(*a, **k):
        calls.append(a[1])
        if len(calls) == n:
            act()
        return real(*a, **k)

    monkeypatch.setattr(store, "_insert_run", insert)
    return calls


def test_ctrl_c_while_a_group_is_recorded_records_the_whole_group(tmp_path, monkeypatch, reference_db, sigint_raises):
    """Ctrl-C between two members' records left the first recorded and the others not; the next start grouped
    those anew (another checkpoint name) and trained them again from their start. The group is one transaction
    now, and the interrupt waits for it: every run is in the store, and the next start trains nothing."""
    db = tmp_path / "study.sqlite"
    calls = _on_insert(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))  # (os.kill runs the handler)
    with pytest.raises(KeyboardInterrupt):
        run_study(_preset(tmp_path), db, workers=1, progress=False)
    assert len(calls) == 4  # the interrupt came after the first member and was acted on after the last
    assert not checkpoint.directory(db).exists()  # the group's checkpoint was deleted before it too
    monkeypatch.undo()
    s = run_study(_preset(tmp_path), db, workers=1, progress=False)
    assert s["scheduled"] == 0 and s["recorded"] == 0  # nothing trained again
    for t in ("runs", "epochs", "evals"):
        assert table(db, t) == table(reference_db, t)


def test_a_group_whose_recording_fails_half_way_is_not_recorded_at_all(tmp_path, monkeypatch, reference_db):
    """An interrupt that is not held (a second Ctrl-C, or an error) inside the group's transaction rolls all of it
    back: no run of the group is recorded, its checkpoint stays, and the next start resumes the same group from it
    and records what an uninterrupted study records."""
    db = tmp_path / "study.sqlite"

    def stop():
        raise KeyboardInterrupt

    _on_insert(monkeypatch, 2, stop)
    with pytest.raises(KeyboardInterrupt):  # (checkpoint_every_s: the workers' forkserver may predate the env var)
        run_study(_preset(tmp_path), db, workers=1, progress=False, checkpoint_every_s=0)
    assert table(db, "runs") == [] and table(db, "epochs") == []
    assert [p.name for p in checkpoint.directory(db).iterdir()] == [checkpoint.group_name(group(spec()))]
    monkeypatch.undo()
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))
    s = run_study(_preset(tmp_path), db, workers=1, progress=False)
    assert s["done"] == 4 and s["resumed_groups"] == 1
    for t in ("runs", "epochs", "evals"):
        assert table(db, t) == table(reference_db, t)


def test_signals_held_act_after_the_block_and_a_second_one_at_once(sigint_raises):
    from minaction.study.runner import _signals_held

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(1)  # not interrupted: held
    assert done == [1]
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # asked twice: stops now
            done.append(2)
    assert done == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
