"""The study driver: expand a preset, skip finished runs, train the rest, record each result.

The driver is the only process that writes the database. Groups of runs (see
:mod:`minaction.study.trainer`) go to an executor; as each group comes back, all of its
runs are committed in one transaction, with Ctrl-C held until it is done. Killing the
driver at any moment loses only the work of the groups in flight since their last
checkpoint (``<db>.ckpt/``, written by the workers at every epoch end and every few minutes,
:mod:`minaction.study.checkpoint`); the next call with the same preset and database trains
exactly those groups, resuming each from its checkpoint, and deletes a group's checkpoint
once its runs are recorded.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
import traceback
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import checkpoint, recount, schedule, store
from .executors import check_executor, check_workers, make_executor
from .plugins import plugins_for
from .presets import expand, load_preset, make_groups, with_max_group
from .trainer import failed_records

STARTING = "training the first groups (a rate and an ETA once one is recorded)"


class StudyConfigError(ValueError):
    """The environment or the preset cannot run the study (a bad MINACTION_BACKEND, an
    unknown architecture or dataset, a dataset that cannot be had). Raised by the driver
    before anything is scheduled or recorded, so the store is never filled with failures
    that only say the configuration was wrong."""


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _process_start() -> "float | None":
    """When this process started (seconds since the epoch; Linux), or None."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def check_main_guard(executor) -> None:
    """Refuse a script that calls :func:`run_study` outside ``if __name__ == "__main__":``.

    The local executor's worker processes import the main script again (``forkserver`` /
    ``spawn``); without the guard each of them started the study too, died on it, and every
    run of the call was recorded as failed by a lost worker. The call's line in the main
    script is found from the stack and looked up in the script's syntax tree; anything that is
    not a plain script (an interactive session, a notebook, ``python -c``, code built by
    ``exec``) is let through, since no worker can import it again."""
    if executor != "local":
        return
    import ast
    import sys
    import tokenize

    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if spec_name == "__main__" or spec_name.endswith(".__main__"):
        return  # `python -m package`: multiprocessing does not import a package's __main__ again
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return
    path = os.path.abspath(path)
    frame, line = sys._getframe(1), None
    while frame is not None:
        code = frame.f_code
        if os.path.abspath(code.co_filename) == path:
            if code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
                line = frame.f_lineno
            elif "__name__" in code.co_names:
                return  # a function of the script on the way that tests __name__ itself (`if __name__ != ...: return`)
        frame = frame.f_back
    if line is None:
        return
    started = _process_start()
    try:
        if started is None or os.stat(path).st_mtime > started + 1:  # (btime is whole seconds)
            return  # the script may have been edited since it started: its lines may not be the ones running
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return
    # the module-level statement running the call: refused only when it is a plain statement that does not
    # read __name__ (`main()`, `summary = run_study(...)`); an if/match/try/with/loop around the call, or any
    # test of __name__ (a conditional expression, `__name__ == "__main__" and main()`), is let through.
    # False refusals are worse than misses: the workers' own check still catches what this lets through
    stmt = next((n for n in tree.body if n.lineno <= line <= (n.end_lineno or n.lineno)), None)
    if stmt is None or not isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign, ast.AugAssign)) \
            or any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(stmt)):
        return
    raise StudyConfigError(
        f"{path}, line {line}: run_study is called outside `if __name__ == \"__main__\":`; the local "
        "executor's worker processes import the main script again and each would start the study too. "
        "Put the call under the guard (docs/study.md)")


def check_backend(build: bool = True) -> str:
    """The kernel backend the workers will use on CPU, checked in the driver: an unknown or
    unusable ``MINACTION_BACKEND`` raises :class:`StudyConfigError`. Returns its name, or
    ``"auto"`` (the workers choose, falling back to ``reference`` with a warning). ``build=False``
    checks the forced name only and leaves the automatic choice's build (minutes on first use) for
    later: the driver builds after it has checked that the datasets can be had."""
    from ..backends import select as _backend

    env = os.environ.get("MINACTION_BACKEND")
    try:
        forced = _backend.forced()
    except ValueError as exc:
        raise StudyConfigError(f"MINACTION_BACKEND={env!r}: {_first_line(exc)} (or unset it for the automatic "
                               f"choice)") from None
    if not build and forced in (None, "cpu"):
        return forced or "auto"  # (the cpu backend's availability is its build: checked with build=True)
    if forced is None:
        # the driver loads (on first use: builds) the CPU kernels itself, before any worker starts: the build
        # message shows here, the workers load the finished build, and a build that fails is said once. The
        # workers keep quiet about the fallback, so without this a study trained every run on the slow
        # reference backend with nothing on screen (an installation without a compiler or ninja)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = _backend.select("cpu")
        if name == "reference":
            ok, why = _backend.available("cpu", "cpu")
            checkpoint.warn(f"the CPU kernels cannot be used ({_first_line(why) if why else 'unavailable'}): every "
                            f"run will train on the slow 'reference' backend (the same results to rounding, not bit "
                            f"for bit, several times slower; the store's backend column says which). Fix the build "
                            f"(`minaction info` says why) or set MINACTION_BACKEND=reference to train that way "
                            f"without this warning")
        return "auto"
    ok, why = _backend.available(forced, "cpu")
    if not ok:
        where = f"MINACTION_BACKEND={env!r}" if env else f"the forced backend {forced!r}"
        raise StudyConfigError(f"{where}: the study trains on CPU and backend {forced!r} cannot run there: "
                               f"{_first_line(why)} (unset MINACTION_BACKEND or choose another)")
    return forced


def check_config(runs, spec=None) -> dict:
    """Every architecture and dataset of ``runs`` exists and every budget's model options
    (``activation``, ``energy``, ``energy_reduction``) are ones the layers take: a typo is one clear
    error before anything runs, not a failed run per configuration in the store. With ``spec`` (the
    preset), the datasets named in its ``[budget_by_dataset.*]`` and ``[data_opts.*]`` tables are known
    ones too (a misspelt name there would be ignored silently, and its runs train with the default
    budget). Returns the real (not registered) datasets with their data options."""
    if spec is not None:
        _check_dataset_tables(spec)
    archs = sorted({r["config"]["arch"] for r in runs})
    datasets = {}
    for r in runs:
        datasets.setdefault(r["config"]["dataset"], r["config"].get("data_opts") or {})
    options = {(b["activation"], b["energy"], b["energy_reduction"]) for b in (r["config"]["budget"] for r in runs)}
    if options:
        from ..ops.energy import validate_energy

        for act, energy, reduction in sorted(options, key=str):  # energy may be None (a dict preset)
            try:
                validate_energy(act, energy, reduction)
            except ValueError as exc:
                text = str(exc).replace("'l1' or None", "'l1' or \"none\" (no energy; a preset's TOML has no None)")
                raise StudyConfigError(f"budget: {text}") from None
    if archs:
        try:
            from .. import models
        except ImportError as exc:
            raise StudyConfigError(f"architectures {archs} need minaction.models, which cannot be imported: "
                                   f"{_first_line(exc)}") from None
        unknown = [a for a in archs if a not in models.architecture_names()]
        if unknown:
            raise StudyConfigError(f"unknown architecture(s) {unknown}; choose from {list(models.architecture_names())} "
                                   f"(or register one with minaction.models.register_architecture in a module that "
                                   f"`study run` / `replicate` imports with --plugin MODULE)")
    if not datasets:
        return {}
    try:
        from ..data import catalogue
    except ImportError as exc:
        raise StudyConfigError(f"datasets {sorted(datasets)} need minaction.data, which cannot be imported: "
                               f"{_first_line(exc)}") from None
    real = {d: o for d, o in datasets.items() if d not in catalogue.REGISTERED}  # registered ones own their data
    unknown = [d for d in real if d not in catalogue.SPECS]
    if unknown:
        raise StudyConfigError(f"unknown dataset(s) {unknown}; choose from "
                               f"{catalogue.known_names()} "
                               f"(or register one with minaction.data.register_dataset in a module that "
                               f"`study run` / `replicate` imports with --plugin MODULE)")
    for name, opts in real.items():
        _check_data_opts(name, opts)
    return real


def _check_data_opts(name, opts) -> None:
    """A real dataset's ``[data_opts.NAME]``: options it takes, of their types (an unknown key or a string
    for a number failed every run of the dataset, each with the loader's error)."""
    from ..data.splits import check_options

    try:  # data_dir and seed are load()'s own arguments
        check_options(name, {k: v for k, v in opts.items() if k not in ("data_dir", "seed")}, opts.get("seed", 0))
    except (TypeError, ValueError) as exc:
        also = " (and data_dir)" if "takes no option" in str(exc) else ""
        raise StudyConfigError(f"[data_opts.{name}]: {exc}{also}") from None


def _check_dataset_tables(spec) -> None:
    named = {f"{table}.{ds}": ds for table in ("budget_by_dataset", "data_opts") for ds in spec.get(table, {})}
    if not named:
        return
    try:
        from ..data import catalogue
    except ImportError:  # pragma: no cover - minaction.data is part of minaction
        return
    known = catalogue.known_names()
    bad = sorted(t for t, ds in named.items() if ds not in known)
    if bad:
        raise StudyConfigError(f"preset {spec.get('name')!r}: {', '.join('[' + t + ']' for t in bad)} "
                               f"name{'s' if len(bad) == 1 else ''} no known dataset, so "
                               f"{'it' if len(bad) == 1 else 'they'} would be ignored; datasets: {known} "
                               f"(a dataset registered by a plugin needs --plugin MODULE)")


def check_inputs(runs) -> None:
    """:func:`check_config`, and every real dataset's files can be had on this machine (found in
    the decoded cache, or fetched and decoded once now)."""
    real = check_config(runs)
    if not real:
        return
    from .. import data
    from ..data import cache, catalogue

    missing = {}  # every dataset that cannot be had, not the first only (a user fixed one per try)
    for name, opts in real.items():
        family = catalogue.SPECS[name].family
        if any(c.cache_path(family).is_file() for c in catalogue.FAMILIES[family].candidates):
            continue  # decoded arrays are in the cache: a worker loads them in milliseconds
        try:
            cache.family_arrays(family, data_dir=opts.get("data_dir"))
        except data.DataError as exc:  # (DataUnavailableError.tried: each source and why, for one line)
            tried = getattr(exc, "tried", None)
            missing[name] = "; ".join(tried) if tried else " ".join(str(exc).split())
        finally:
            data.clear_memo()  # the driver does not keep the arrays
    if missing:
        names = " ".join(missing)
        what = "; ".join(f"{n!r} (tried: {why})" for n, why in missing.items())
        raise StudyConfigError(
            f"{len(missing)} dataset{'s' if len(missing) > 1 else ''} cannot be had on this machine: {what}. Put "
            f"the files in a folder and set MINACTION_DATA to it, or set MINACTION_SHARED_DATA to a shared data "
            f"folder (docs/data.md, 'Sources', lists each dataset's files); `minaction data fetch {names}` lists "
            f"the sources one per line")


#: the signals the driver stops on by raising in its main thread (Ctrl-C; SIGTERM and SIGHUP under the
#: `minaction` command), held while a group is being recorded
_HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C (and SIGTERM / SIGHUP where a Python handler stops the process) until the block is done,
    then act on it as it would have: a group's recording is short, and an interrupt inside it would roll
    back the group's finished runs (they train again from the last checkpoint). A second signal while held acts at once (the
    transaction then rolls back whole: the group trains again from its checkpoint). A signal left to the
    OS's default (a plain SIGTERM outside the `minaction` command) is not held: it ends the process, and the
    open transaction is lost whole, as after ``kill -9``. Outside the main thread nothing is held (Python
    delivers signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {}

    def hold(signum, frame):
        if pending:  # asked twice: stop now
            for sig, h in old.items():
                signal.signal(sig, h)
            old[signum](signum, frame)
            return
        pending.append(signum)

    for sig in _HELD_SIGNALS:
        h = signal.getsignal(sig)
        if callable(h):  # a Python handler (default_int_handler, the command's SIGTERM one); not SIG_DFL/SIG_IGN
            old[sig] = h
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if pending and pending[0] in old:
        old[pending[0]](pending[0], None)  # as the signal would have: raises KeyboardInterrupt (or the like)


def _planned(spec) -> list:
    return [r["run_id"] for r in expand(spec)]


def _counts(con, ids) -> dict:
    c = store.status_counts(con, ids)
    out = {"planned": len(ids)}
    out.update({s: c.get(s, 0) for s in store.STATUSES})
    out["pending"] = len(ids) - sum(c.values())
    return out


def study_status(db, preset=None) -> dict:
    """Where a store stands: ``planned``, ``done``, ``failed``, ``diverged``, ``pending`` runs.

    With ``preset``, over that preset's runs; without, over every preset run into ``db``
    (their specs are kept in the ``meta`` table) plus any other recorded run, with a
    breakdown per preset. ``running`` names the driver writing the store now, if any.
    Opens the store read-only (it works while a study is writing, and in a read-only folder).
    """
    if _empty_file(db):  # (an SQLite reader would call it "not a study store"; `study run` takes it as new)
        return _nothing_planned(db, preset, "the file is empty")
    con = store.connect(db, readonly=True)
    try:
        out = {"db": str(db)}
        recorded = {r[0] for r in con.execute("SELECT run_id FROM runs")}
        if not recorded and con.execute("SELECT 1 FROM meta WHERE key LIKE 'preset:%' LIMIT 1").fetchone() is None:
            # a driver stopped before it planned its preset (e.g. killed while the kernels were built): its planned
            # 0 and pending 0 read as a finished study
            return _nothing_planned(db, preset, "it holds no runs and no preset: e.g. a `study run` stopped before "
                                                "it planned one, while the kernels were built")
        specs = {}
        if preset is not None:
            spec = load_preset(preset)
            specs[spec["name"]] = spec
        else:
            for key, val in con.execute("SELECT key, value FROM meta WHERE key LIKE 'preset:%' ORDER BY key"):
                try:
                    specs[key[len("preset:"):]] = json.loads(val)
                except ValueError:
                    pass
        per, planned = {}, set()
        for name, spec in specs.items():
            try:
                ids = _planned(spec)
            except ValueError:  # a preset stored by another version of the runner
                continue
            per[name] = _counts(con, ids)
            planned.update(ids)
        if preset is not None:
            out["preset"] = next(iter(specs))
            out.update(per[out["preset"]])
        else:
            counts = store.status_counts(con)
            out["planned"] = len(planned | recorded)
            out.update({s: counts.get(s, 0) for s in store.STATUSES})
            out["pending"] = len(planned - recorded)
            out["presets"] = per
        if preset is not None:  # the preset's runs only (the whole store's sum sat beside the preset's counts)
            walls = con.execute("SELECT run_id, wall_time_s * 1.0 FROM runs WHERE status = 'done'").fetchall()
            out["done_wall_time_s"] = float(sum(w or 0.0 for r, w in walls if r in planned))
        else:
            row = con.execute("SELECT SUM(wall_time_s * 1.0) FROM runs WHERE status = 'done'").fetchone()
            out["done_wall_time_s"] = row[0] or 0.0
        out["failures"] = _failures(con, planned if preset is not None else None)  # why, without SQLite
        out["running"] = store.writer(db)
        return out
    except sqlite3.Error as exc:
        raise store.diagnose(db, exc, "read") from None
    finally:
        con.close()


def _empty_file(db) -> bool:
    """``db`` is a 0-byte file (and no ``-wal`` beside it holds anything): a store no study has written yet."""
    if os.fspath(db) == "":
        return False  # (--db '': store.check_name names it)
    p = Path(db)
    try:
        if not p.is_file() or p.stat().st_size:
            return False
        wal = p.with_name(p.name + "-wal")
        return not (wal.is_file() and wal.stat().st_size > 0)
    except OSError:
        return False


def _nothing_planned(db, preset, why: str) -> dict:
    """:func:`study_status` of a store into which no study has been planned: every count 0 (``preset``'s runs
    pending), and a ``note`` that says so and how to start one."""
    out = {"db": str(db)}
    per = {}
    if preset is not None:
        spec = load_preset(preset)
        out["preset"] = spec["name"]
        ids = _planned(spec)
        per = {"planned": len(ids), **{s: 0 for s in store.STATUSES}, "pending": len(ids)}
        out.update(per)
    else:
        out.update({"planned": 0, **{s: 0 for s in store.STATUSES}, "pending": 0, "presets": {}})
    import shlex

    name = shlex.quote(os.fspath(preset)) if isinstance(preset, (str, os.PathLike)) else out.get("preset", "NAME")
    running = store.writer(db)
    out.update(done_wall_time_s=0.0, failures=[], running=running)
    if running:
        out["note"] = (f"no study has been planned in {db} yet: the `study run` writing it ({running}) is starting "
                       f"(it plans its preset once the data are checked and the kernels built)")
    else:
        out["note"] = (f"no study has been planned in {db} yet ({why}); `minaction study run --preset {name} --db "
                       f"{shlex.quote(os.fspath(db))}` starts one")
    return out


def _failures(con, only=None, most: int = 10) -> list:
    """Why runs failed, without opening SQLite: the last line of each failed run's recorded error (the
    exception), counted per (arch, dataset, reason), most frequent first (at most ``most`` rows)."""
    counts = collections.Counter()
    for run_id, arch, ds, err in con.execute("SELECT run_id, arch, dataset, error FROM runs WHERE status = 'failed'"):
        if only is None or run_id in only:
            lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
            counts[(arch, ds, lines[-1][:300] if lines else "(no error recorded)")] += 1
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:most]
    return [{"arch": a, "dataset": d, "runs": n, "error": e} for (a, d, e), n in rows]


class _Progress:
    """The tqdm bar over runs. Until the first group comes back it says that the first groups
    are training and shows no rate or ETA: those would be computed
    from a start-up that can take minutes and then promise days. The bar with its ETA starts
    when the first group is recorded."""

    def __init__(self, total, initial, enabled):
        self.total, self.n, self.bar = total, initial, None
        self.enabled = enabled
        self.started = False
        self._tty = False
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.bar = tqdm(total=total, initial=initial, unit="run", dynamic_ncols=True, desc=STARTING,
                            bar_format="{desc}: {n_fmt}/{total_fmt} runs [{elapsed}]", leave=False)
            isatty = getattr(getattr(self.bar, "fp", None), "isatty", None)
            # a terminal, or a notebook's widget bar (tqdm.auto's choice there; its stream is no terminal)
            self._tty = bool(isatty and isatty()) or type(self.bar).__module__.startswith("tqdm.notebook")

    @property
    def waiting(self) -> bool:
        """The bar shows the start-up text (it is redrawn each second until the first group is in)."""
        return self.bar is not None and not self.started

    def tick(self):
        """Redraw while waiting (the elapsed time shows that training is under way); on a terminal only: into a
        log file each redraw was another line, every second, for the hours a first group can take."""
        if self.bar is not None and not self.started and self._tty:
            self.bar.refresh()

    def update(self, n, postfix):
        self.n += n
        if self.bar is None:
            return
        if not self.started:
            self.bar.close()
            self.started = True
            self.bar = self._tqdm(total=self.total, initial=self.n, unit="run", dynamic_ncols=True,
                                  smoothing=0.1, desc="training")
        else:
            self.bar.update(n)
        self.bar.set_postfix(postfix, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_study(preset, db, executor="local", workers=None, scheduler=None, progress=True, limit=None,
              retry_failed=False, max_attempts=2, threads=1, on_start=None, checkpoints=True,
              checkpoint_every_s=None, balance=None, max_group=None) -> dict:
    """Run (or resume) a study; returns a summary dict.

    Args:
        preset: a preset name (``minaction/study/presets/<name>.toml``), a path, or a dict.
        db: path of the SQLite store (created if missing).
        executor: ``"local"`` (process pool), ``"dask"`` or ``"ray"``.
        workers: parallel worker processes, a positive int (default: the CPUs this process may use).
        scheduler: dask/ray scheduler address for a real cluster.
        progress: show a tqdm bar over runs (starting at the finished count).
        limit: train at most this many of the pending runs in this call.
        retry_failed: also rerun runs recorded as ``failed`` (``done`` and ``diverged``
            runs are always skipped). Without it the summary's ``failed_skipped`` says how
            many failed runs of the preset were left alone.
        max_attempts: tries for a group whose worker process died (a lost process, not a
            Python exception: those are recorded as ``failed`` at once with their traceback).
            Groups that were in flight when a pool broke rerun one at a time, so only the group
            that really kills its worker is blamed.
        threads: torch threads per worker (1 is steadiest on small machines; another count rounds some
            reductions differently, so results are reproducible bit for bit at the same count).
        on_start: called with no arguments after every check below passed and before any
            training starts (the CLI prints the run count and time estimate there, so a
            refused study prints one error line and nothing else).
        checkpoints: let each group save its training state to ``<db>.ckpt/`` (at an epoch end once
            30 s have passed since the last save, :data:`minaction.study.checkpoint.DEFAULT_EPOCH_EVERY_S`,
            and mid-epoch every ``checkpoint_every_s`` seconds, default
            :data:`minaction.study.checkpoint.DEFAULT_EVERY_S`) and resume from it after a kill;
            a group's checkpoint is deleted once its runs are recorded
            (:mod:`minaction.study.checkpoint`).
        balance: None, or a callable returning ``cost(group) -> seconds or None``, called after
            ``on_start``: a group costing more than an even share of the work per worker is
            halved so that it does not run alone while the other workers idle, and the groups
            are submitted costliest first (:mod:`minaction.study.schedule`; the CLI passes
            ``plan.cost_lookup``, the costs ``study plan`` measured).
        max_group: at most this many runs per batched group (default: the preset's
            ``max_group``; a larger value than the preset's is refused). Smaller groups finish
            sooner, so a machine that is taken away mid-study loses less; the runs and their
            results do not depend on it (a run's identity is its configuration).

    Before anything is scheduled the driver checks the environment (``MINACTION_BACKEND``,
    the architectures and datasets, that every pending run's dataset can be had) and the store
    (an SQLite study store, not damaged, writable) and takes the store's writer lock, so a
    second driver on the same file stops at once. These raise :class:`StudyConfigError`,
    :class:`minaction.study.store.StoreError` or ``StoreBusyError`` (all ``ValueError``) with
    the cause in one line; a store write that fails later (a full disk) raises ``StoreError``
    after stopping the workers, and every run recorded before it is kept.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a worker process importing the user's script again (forkserver / spawn): without the guard every
        # worker started the study too, hit the writer lock, and its runs were recorded as lost workers
        raise RuntimeError("run_study was called while a worker process imported the main script: put the call "
                           "under `if __name__ == \"__main__\":` in your script (docs/study.md)")
    t0 = time.perf_counter()
    check_workers(workers)
    check_executor(executor, scheduler)  # before the store exists (a bad name left an empty store and its lock)
    check_main_guard(executor)  # before the store exists: workers would re-run an unguarded call
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    spec = with_max_group(load_preset(preset), max_group)
    runs = expand(spec)
    check_backend(build=False)  # the kernels are built once the data is known to be there (_run_locked)
    if checkpoints:
        try:
            checkpoint.check_env()
        except ValueError as exc:
            raise StudyConfigError(str(exc)) from None
    check_config(runs, spec)  # before the store exists: a refused preset leaves no empty store behind
    if not Path(db).exists() or _empty_file(db):  # every run is pending: a dataset that cannot be had leaves no
        # empty store either (and a 0-byte file stays 0 bytes, which `study status` reads as "nothing planned")
        check_inputs(runs if limit is None else runs[:max(0, int(limit))])
    con = store.connect(db)
    lock = None
    try:
        lock = store.acquire_writer_lock(db)
        recorded_status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    except BaseException:
        store.release_writer_lock(lock)
        con.close()
        raise
    try:
        cdir = checkpoint.directory(db)
        if checkpoints and (cdir.exists() or cdir.is_symlink()) and not cdir.is_dir():
            # every group warned twice (cannot write, cannot delete) and trained without one: say it once
            checkpoint.warn(f"{cdir} is not a folder, so this study runs without checkpoints (a killed group "
                            f"trains again from its start); remove or rename it to have them")
            checkpoints = False
        ckpt = {"checkpoint_dir": str(cdir), "checkpoint_every_s": checkpoint_every_s} if checkpoints else {}
        return _run_locked(spec, runs, db, con, recorded_status, t0, executor, workers, scheduler, progress,
                           limit, retry_failed, max_attempts, threads, on_start, ckpt, balance)
    finally:
        con.close()
        store.release_writer_lock(lock)


def _warn_renamed_budget(con, spec) -> None:
    """A preset of the same name but another budget already ran into this store (an edited preset, or
    another file with the same stem): its runs stay, recorded under the same name, and a report of
    the store will refuse to pool the two budgets. Say so now, and how to keep them apart."""
    row = con.execute("SELECT value FROM meta WHERE key = ?", (f"preset:{spec['name']}",)).fetchone()
    if row is None:
        return
    try:
        old = json.loads(row[0])
    except ValueError:
        return
    keys = ("budget", "budget_by_dataset", "data_opts")
    new = json.loads(json.dumps({k: spec.get(k, {}) for k in keys}, sort_keys=True, default=str))
    if {k: old.get(k, {}) for k in keys} != new:
        changed = [k for k in keys if old.get(k, {}) != new[k]]
        checkpoint.warn(f"this store already holds runs of a preset named {spec['name']!r} with another "
                        f"{' / '.join(changed)}; they stay recorded under that name, beside this preset's runs. "
                        f"A report of the store pools no two budgets: select with `report --preset FILE.toml` "
                        f"or `--budget ID`, or give this preset its own `name = ...`")


def _group_label(runs) -> str:
    """'arch x dataset, λ ..., seed(s) ... (n runs)' for a group's log lines: arch x dataset alone
    named ten groups alike, and two losses read as one repeated."""
    c = runs[0]["config"]

    def values(key):
        vs = sorted({r["config"].get(key) for r in runs}, key=lambda v: (v is None, v if v is not None else 0))
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in vs)

    n = len(runs)
    lams, seeds = values("lam"), values("seed")
    return (f"{c.get('arch')} x {c.get('dataset')}, λ {lams}, seed{'s' if ',' in seeds else ''} {seeds} "
            f"({n} run{'s' if n != 1 else ''})")


def _announce_resumes(groups, ckpt_dir) -> int:
    """Say which groups pick up from a checkpoint a killed driver left (one line on stderr), and which have
    one that does not fit and start over; the count of the first."""
    fits, stale = [], []
    for g in groups:
        if checkpoint.path_for(ckpt_dir, g).exists():
            (fits if checkpoint.GroupCheckpoint(ckpt_dir, g).matches() else stale).append(g)

    def names(gs):
        return "; ".join(_group_label(g) for g in gs[:3]) + (f"; and {len(gs) - 3} more" if len(gs) > 3 else "")

    if fits:
        checkpoint.note(f"{len(fits)} group(s) resume from the checkpoints in {ckpt_dir} where they were "
                        f"stopped: {names(fits)}")
    if stale:
        checkpoint.note(f"{len(stale)} group(s) have a checkpoint in {ckpt_dir} that is unreadable or from another "
                        f"code version or configuration, and start over: {names(stale)}")
    return len(fits)


def _run_locked(spec, runs, db, con, recorded_status, t0, executor, workers, scheduler, progress, limit,
                retry_failed, max_attempts, threads, on_start=None, ckpt=None, balance=None) -> dict:
    skip = ("done", "diverged") if retry_failed else store.STATUSES
    todo = [r for r in runs if recorded_status.get(r["run_id"]) not in skip]
    already = len(runs) - len(todo)
    failed_skipped = 0 if retry_failed else sum(recorded_status.get(r["run_id"]) == "failed" for r in runs)
    if limit is not None:
        todo = todo[:max(0, int(limit))]
    check_inputs(todo)
    build_s = 0.0
    if todo:  # after the data: a dataset that cannot be had failed after a first build of ~10 minutes
        tb = time.perf_counter()
        check_backend()
        build_s = time.perf_counter() - tb  # minutes on first use: not training, kept out of runs_per_hour
    from . import provenance as _provenance

    prov = _provenance.collect(threads) if todo else None  # (the code, torch, ISA, threads and host: docs/study.md)
    groups = make_groups(todo, spec["group_by"], spec["max_group"])
    _warn_renamed_budget(con, spec)
    ckpt = ckpt or {}
    if ckpt:  # stale files of a killed driver (the writer lock is held: no other driver writes here), removed
        # before the first write to the store: on a full disk they may be what fills it
        checkpoint.clean(ckpt["checkpoint_dir"], [i for i, st in recorded_status.items() if st in skip])
    finished_before = any(st in ("done", "diverged") for st in recorded_status.values())
    try:
        store.set_meta(con, f"preset:{spec['name']}", json.dumps(spec, sort_keys=True, default=str))
        if not finished_before:
            store.set_meta(con, recount.FLOPS_META, "step")  # a new store: every run's FLOPs counted on a step
    except sqlite3.Error as exc:  # a full disk
        raise store.diagnose(db, exc, "write to") from None
    if todo and finished_before and not recount.counted_by_step(con):
        checkpoint.warn(f"the runs already in {db} have FLOPs counted by an older rule (3 x the forward); the "
                        f"report's FLOPs mix the two until `minaction study recount-flops --db {db}` recounts them")
    if on_start is not None and todo:
        on_start()
    counts = {s: 0 for s in store.STATUSES}
    summary = {"preset": spec["name"], "db": str(db), "executor": executor, "total": len(runs),
               "already_finished": already, "failed_skipped": failed_skipped,
               "pending_before": len(runs) - already, "scheduled": len(todo), "groups": len(groups)}
    bar = _Progress(len(runs), already, progress and bool(todo))
    ex = None
    recorded = 0
    completed = False

    identity = store.file_identity(db)

    def record(records, group, machine=None):
        """A group's runs in one transaction, then its checkpoint deleted, with Ctrl-C / SIGTERM held until
        both are done: an interrupt between two members' records left the group half recorded, and the next
        start trained the rest again from their start (their group, and so their checkpoint, was another)."""
        nonlocal recorded
        store.check_same_file(db, identity)
        run_prov = dict(prov, **machine) if prov is not None and machine else prov  # the worker's machine wins
        rows = [dict(rec["run"], preset=spec["name"]) for rec in records]
        with _signals_held():
            try:
                store.record_runs(con, [(row, rec["epochs"], rec.get("evals", ()), run_prov)
                                        for row, rec in zip(rows, records)])
            except sqlite3.Error as exc:
                ids = ", ".join(r["run_id"] for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
                raise store.diagnose(db, exc, f"record the {len(rows)} run(s) of a group ({ids}) in") from None
            if ckpt:  # the group's runs are committed: its checkpoint is no longer needed
                checkpoint.remove(ckpt["checkpoint_dir"], group)
        for row in rows:
            counts[row["status"]] += 1
        recorded += len(rows)
        el = time.perf_counter() - t0 - build_s
        bar.update(len(records), {"runs/h": f"{3600 * recorded / max(el, 1e-9):.0f}", "failed": counts["failed"],
                                  "diverged": counts["diverged"]})

    try:
        if groups:
            ex = make_executor(executor, workers, scheduler, threads)
            summary["workers"] = ex.workers
            if balance is not None:
                groups = schedule.arrange(groups, ex.workers, balance(), ckpt.get("checkpoint_dir"))
                summary["groups"] = len(groups)
            if ckpt:
                summary["resumed_groups"] = _announce_resumes(groups, ckpt["checkpoint_dir"])
            window = 2 * ex.workers
            plugins = plugins_for(todo)  # the workers import the modules that registered these names
            queue = [dict(ckpt, group_id=i, runs=g, threads=threads, attempt=0, plugins=plugins)
                     for i, g in enumerate(groups)]
            queue.reverse()  # pop() from the end keeps the preset order
            inflight = {}
            generation = 0
            isolated = False  # a task suspected of killing its worker runs alone, so blame is certain
            while queue or inflight:
                while queue and not isolated and len(inflight) < window:
                    if queue[-1].get("suspect") and inflight:
                        break  # wait until the pool is empty, then run the suspect alone
                    task = queue.pop()
                    isolated = bool(task.get("suspect"))
                    inflight[ex.submit(_provenance.run_group, task)] = (task, generation)  # (+ its machine)
                done, _ = cf.wait(list(inflight), timeout=1.0 if bar.waiting else None,
                                  return_when=cf.FIRST_COMPLETED)
                if not done:
                    bar.tick()
                    continue
                for fut in done:
                    task, gen = inflight.pop(fut)
                    if task.get("suspect"):
                        isolated = False
                    try:
                        res = fut.result()
                    except Exception as exc:  # the worker died, or the executor lost the task
                        if isinstance(exc, BrokenProcessPool) and gen == generation:
                            ex.restart()
                            generation += 1
                        alone = bool(task.get("suspect")) or not isinstance(exc, BrokenProcessPool)
                        attempt = task["attempt"] + (1 if alone else 0)
                        what = _group_label(task["runs"])
                        why = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[0]
                        if attempt < max_attempts:
                            # a task that shared the pool when it broke is not blamed yet: it reruns alone
                            queue.append(dict(task, attempt=attempt, suspect=True))
                            # a group that shared the pool may only have been queued in it: it is not blamed, and
                            # that loss is not one of its attempts (which count its runs alone)
                            lost = (f"the worker training {what} was lost" if alone else
                                    f"the worker pool was lost while {what} was queued or training in it")
                            checkpoint.warn(f"{lost} ({why}); the group runs again, alone (attempt {attempt + 1} of "
                                            f"{max_attempts} alone)"
                                            + (", from its checkpoint if it wrote one" if ckpt else ""))
                        else:
                            checkpoint.warn(f"the worker training {what} was lost in {attempt} attempts alone ({why}); "
                                            f"its runs are recorded as failed")
                            err = (f"worker lost in {attempt} attempts (the process died: out of memory, "
                                   f"a crash in native code, or killed): "
                                   + "".join(traceback.format_exception_only(type(exc), exc)).strip())
                            record(failed_records(task["runs"], err), task["runs"])
                        continue
                    record(res["records"], task["runs"], res.get("machine"))
        completed = True
    finally:
        bar.close()
        if ex is not None:
            ex.close(abort=not completed)  # on Ctrl-C or a store error, do not wait for the groups in flight
    wall = time.perf_counter() - t0
    busy = wall - build_s  # the kernels' first build (build_s) is setup, not the study's rate
    summary.update(counts, recorded=recorded, wall_s=wall, build_s=build_s,
                   runs_per_hour=3600 * recorded / busy if busy > 0 else 0.0, remaining=len(runs) - already - recorded)
    return summary
