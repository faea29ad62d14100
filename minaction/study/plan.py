"""What a study will cost before it runs: ``minaction study plan --preset NAME``.

For every (architecture, dataset) of a preset the plan counts runs and batched groups,
reads the training split's size (so steps per epoch and evaluations per epoch are exact),
and measures on *this* machine, with the trainer's own code, the seconds of

* one optimizer step of a batched group of the preset's size (data gather, forward,
  backward, optimizer step), and
* one validation evaluation (the whole validation split),

by training a few steps of the real model on the real data (``calibrate_steps`` timed
steps after one warm-up step; the fastest of the timed steps is used, which is least
disturbed by other load). The estimate of one group is

    epochs x (steps_per_epoch x t_step + evals_per_epoch x t_eval) + t_test

at the epoch cap (an **upper bound** when the budget stops early: early stopping ends runs
sooner, by an amount no plan can know). The study's estimate is the sum over its pending
groups divided by the number of workers (groups are independent; one torch thread each).

Measured costs are kept in a JSON table (``$MINACTION_CACHE/study_plan_costs.json``,
default ``~/.cache/minaction``), keyed by the machine (hostname, CPU count, torch version),
architecture, dataset, group size and budget, so a second plan or a study start reads them
instead of measuring again (``refresh=True`` measures again).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as _checkpoint
from . import optim as _optim
from . import presets as _presets
from . import trainer as _trainer


def cost_table_path() -> Path:
    """In the data's cache folder (``$MINACTION_CACHE``, else ``$XDG_CACHE_HOME/minaction``, else
    ``~/.cache/minaction``)."""
    env, xdg = os.environ.get("MINACTION_CACHE"), os.environ.get("XDG_CACHE_HOME")
    root = Path(env).expanduser() if env else (Path(xdg) if xdg else Path.home() / ".cache") / "minaction"
    return root / "study_plan_costs.json"


#: measure() times with this many torch threads, as the study's workers train (one thread each)
MEASURE_THREADS = 1


def _machine() -> str:
    # keyed by the threads the costs were measured with, not by the calling process's current
    # count (measure() changes it, so a key read from the process changed after the first block)
    return f"{platform.node()}|cpus={os.cpu_count()}|torch={torch.__version__}|threads={MEASURE_THREADS}"


@functools.lru_cache(maxsize=1)
def _perf_version() -> str:
    """A hash of the sources a step's cost depends on beyond the trainer: the models, the layers,
    the ops and the C++ kernels (a faster kernel or a model run as a loop of members changes the
    cost table; the checkpoint's code_version rightly ignores them)."""
    from ..backends import source_dir

    pkg = Path(__file__).resolve().parents[1]
    files = sorted(f for d in ("models", "nn", "ops") for f in (pkg / d).glob("*.py"))
    try:
        files.append(source_dir() / "energy_cpu.cpp")
    except Exception:  # pragma: no cover - an install without the sources: the Python files alone
        pass
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f.name.encode() + f.read_bytes())
        except OSError:  # pragma: no cover - a zipped install
            h.update(f.name.encode())
    return h.hexdigest()[:16]


def _key(arch, dataset, G, budget, data_opts) -> str:
    # "code": a hash of the trainer's source, so that a change to the training loop (which changes
    # what a step or an evaluation costs) is measured afresh instead of read from an old entry;
    # "perf": likewise for the models, layers, ops and kernels
    blob = json.dumps({"m": _machine(), "arch": arch, "dataset": dataset, "G": G, "budget": budget,
                       "data_opts": data_opts, "v": _presets.TRAINER_VERSION, "code": _checkpoint.code_version(),
                       "perf": _perf_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_table(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_table(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the plan still works, it just measures again next time


def measure(group_runs: list, calibrate_steps: int = 3) -> dict:
    """Time one group of the preset on this machine, with the trainer's code.

    Returns ``{"t_step", "t_eval", "t_test", "t_setup", "n_train", "n_val", "steps_per_epoch"}``
    (seconds; ``t_step`` is one optimizer step of the whole group).
    """
    _trainer.init_worker(MEASURE_THREADS)
    try:  # how busy the machine was: a cost measured under load is high, and it is kept in the table
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        load = None
    runs = group_runs
    cfg0 = runs[0]["config"]
    budget = dict(cfg0["budget"])
    G = len(runs)
    t0 = time.perf_counter()
    train, val, test = _trainer.load_splits(cfg0["dataset"], budget, cfg0["data_opts"], subset_train=False)
    seeds = [int(r["config"]["seed"]) for r in runs]
    mm = _trainer._model_module(cfg0["arch"])
    dtype = torch.float64 if budget.get("dtype") == "float64" else None
    model = mm.build(cfg0["arch"], train.meta, width=budget.get("width") or None, depth=budget.get("depth") or None,
                     energy=budget["energy"], activation=budget["activation"],
                     energy_reduction=budget["energy_reduction"], num_models=G, seeds=seeds)
    if dtype is not None:
        model = model.to(dtype)
    train, val, test = _trainer.inputs_for(model, train, val, test)  # as the trainer feeds them
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optim.make(budget["optimizer"], params, lr=budget["lr"], weight_decay=budget.get("weight_decay", 0.0))
    t_setup = time.perf_counter() - t0
    shared = budget.get("data_order", "seed") == "shared" or G == 1
    indices = [_trainer.member_train_indices(len(train), budget, s) for s in seeds]
    n_train = len(indices[0])
    bs = int(budget["batch_size"])
    steps_per_epoch = -(-n_train // bs)
    orders = [_trainer.member_epoch_order(ix, budget, s, 1) for ix, s in zip(indices, seeds)]
    lam = torch.tensor([float(r["config"]["lam"]) for r in runs], dtype=dtype or torch.float32)
    times = []
    model.train()
    for b in range(calibrate_steps + 1):
        bb = b % steps_per_epoch
        t = time.perf_counter()
        x, y = _trainer._gather(train, orders, slice(bb * bs, (bb + 1) * bs), budget, seeds, 1, bb, shared)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        logits = _trainer._as_group(model(x), G)
        C = logits.shape[-1]
        yy = y.repeat(G) if y.dim() == 1 else y.reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, C), yy, reduction="none").view(G, -1).mean(1)
        e = _trainer._energy(model, G)
        loss = (ce + lam.to(e.dtype) * e).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if b:  # the first step warms up (allocations, kernel selection)
            times.append(time.perf_counter() - t)
    ebs = int(budget.get("eval_batch_size") or 512)
    t = time.perf_counter()
    _trainer.evaluate(model, val, G, ebs, dtype=dtype)
    t_eval = time.perf_counter() - t
    stats_fn = getattr(mm, "activation_stats", None)
    t = time.perf_counter()
    _trainer.evaluate(model, test, G, ebs, stats_fn=stats_fn, dtype=dtype)
    t_test = time.perf_counter() - t
    return {"t_step": min(times), "t_eval": t_eval, "t_test": t_test, "t_setup": t_setup, "n_train": n_train,
            "n_val": len(val), "steps_per_epoch": steps_per_epoch, "load": load, "cpus": os.cpu_count()}


def _measure_task(plugins, group_runs, calibrate_steps):
    from .plugins import import_plugins

    import_plugins(plugins)
    return measure(group_runs, calibrate_steps)


#: seconds one block's timing (its data loaded, its model built, a few steps, an evaluation) may take in its child
#: process before the child is stopped and the block is left unmeasured (``MINACTION_PLAN_MEASURE_TIMEOUT_S``)
DEFAULT_MEASURE_TIMEOUT_S = 600.0
MEASURE_TIMEOUT_ENV = "MINACTION_PLAN_MEASURE_TIMEOUT_S"


def measure_timeout_s() -> float:
    """``MINACTION_PLAN_MEASURE_TIMEOUT_S`` (seconds > 0; ``inf`` waits for ever), else
    :data:`DEFAULT_MEASURE_TIMEOUT_S`."""
    v = os.environ.get(MEASURE_TIMEOUT_ENV)
    if v is None or v.strip() == "":
        return DEFAULT_MEASURE_TIMEOUT_S
    try:
        out = float(v)
    except ValueError:
        out = float("nan")
    if not out > 0:  # (NaN compares false)
        raise ValueError(f"{MEASURE_TIMEOUT_ENV} must be a number of seconds > 0 (or inf), got {v!r}")
    return out


class _IsolatedMeasure:
    """:func:`measure` in a child process of the study's forkserver. A model that ends its process (a
    plugin's ``os._exit``, a crash, the OOM killer) while it was timed ended the driver of ``study run``
    with its exit code and no word, before any run was scheduled (the workers' retries never came); now
    that block's row says so, the rest of the plan goes on, and the study schedules its runs as usual.
    A model that hangs while it is timed (a plugin waiting on something that never comes) hung the driver
    before it scheduled anything: after ``timeout_s`` (:func:`measure_timeout_s`) the child is killed and
    the block is left unmeasured, named in its row."""

    def __init__(self, timeout_s=None):
        self._pool = None
        self.timeout_s = measure_timeout_s() if timeout_s is None else float(timeout_s)

    def __call__(self, group_runs, calibrate_steps):
        import concurrent.futures as cf
        from concurrent.futures.process import BrokenProcessPool

        from .executors import _init_local_worker, start_forkserver
        from .plugins import plugins_for, registering_modules

        if "__main__" in registering_modules(group_runs[:1]):  # a child cannot import what the running script
            # registered under its __main__ guard: timed here, as before
            return measure(group_runs, calibrate_steps)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(1, mp_context=start_forkserver(), initializer=_init_local_worker,
                                                initargs=(MEASURE_THREADS, os.getpid()))
        c = group_runs[0]["config"]
        fut = self._pool.submit(_measure_task, plugins_for(group_runs), group_runs, calibrate_steps)
        try:
            return fut.result(timeout=None if math.isinf(self.timeout_s) else self.timeout_s)
        except BrokenProcessPool:
            self.close()
            raise RuntimeError(f"the process that timed {c['arch']} x {c['dataset']} ended while training it "
                               f"(a crash, os._exit or the OOM killer); its runs are scheduled without an "
                               f"estimate") from None
        except cf.TimeoutError:
            self.close(kill=True)
            raise RuntimeError(f"timing {c['arch']} x {c['dataset']} did not finish in {self.timeout_s:g} s (its "
                               f"data loaded, its model built, a few steps and an evaluation), so its process was "
                               f"stopped and its runs are scheduled without an estimate; if the model is just slow, "
                               f"set {MEASURE_TIMEOUT_ENV} to more seconds") from None

    def close(self, kill: bool = False):
        """Shut the child down; ``kill=True`` kills it first (it is stuck in the timing)."""
        if self._pool is None:
            return
        procs = list((getattr(self._pool, "_processes", None) or {}).values()) if kill else []
        for p in procs:
            if p.is_alive():
                p.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(5)  # (a guard only: a killed process is gone at once)
        self._pool = None


def _group_seconds(m: dict, budget: dict) -> float:
    """A group's time at the epoch cap from its measured costs ``m``."""
    epe = evals_per_epoch(m["steps_per_epoch"], int(budget.get("eval_every") or 0))
    return (m["t_setup"] + int(budget["epochs"]) * (m["steps_per_epoch"] * m["t_step"] + epe * m["t_eval"])
            + m["t_test"])


def cost_lookup():
    """``cost(group) -> seconds or None`` from the measured cost table alone (nothing is measured:
    None for a group whose arch x dataset x size x budget was never timed on this machine)."""
    table = _load_table(cost_table_path())

    def cost(group):
        cfg = group[0]["config"]
        m = table.get(_key(cfg["arch"], cfg["dataset"], len(group), cfg["budget"], cfg["data_opts"]))
        return None if m is None else _group_seconds(m, cfg["budget"])

    return cost


def evals_per_epoch(steps_per_epoch: int, eval_every: int) -> float:
    """Validation evaluations per epoch: every ``eval_every`` steps, plus the epoch end when it
    does not coincide (averaged over epochs, since the step count runs on across epochs)."""
    if not eval_every:
        return 1.0
    # over L = lcm epochs the pattern repeats; count exactly over a long horizon
    E = 50
    total, n = 0, 0
    for ep in range(E):
        lo, hi = ep * steps_per_epoch, (ep + 1) * steps_per_epoch
        k = hi // eval_every - lo // eval_every
        total += k + (0 if hi % eval_every == 0 else 1)
        n += 1
    return total / n


def plan(preset, db=None, workers=None, calibrate_steps: int = 3, refresh: bool = False, measure_fn=None,
         max_group=None, retry_failed: bool = False) -> dict:
    """The plan of ``preset``: runs, groups and the estimated wall time on this machine.

    ``db``: count only runs not yet recorded there (a resumed study). ``workers``: parallel
    worker processes (default: the CPUs this process may use). ``max_group``: as ``study run
    --max-group`` (smaller groups than the preset's). ``retry_failed``: as ``study run --retry-failed``
    (runs recorded as failed are pending again). Returns ``{"preset", "runs",
    "pending", "groups", "workers", "est_wall_s", "rows": [...]}`` with one row per
    (arch, dataset): ``runs, groups, group_size, n_train, steps_per_epoch, epochs_cap,
    evals_per_epoch, t_step_s, t_eval_s, member_epoch_s, est_s`` (``est_s``: that block's
    groups one after another) or ``error`` when its data or model could not be measured.
    """
    spec = _presets.with_max_group(_presets.load_preset(preset), max_group)
    runs = _presets.expand(spec)
    done = set()
    if db is not None and Path(db).exists():
        from . import store

        con = store.connect(db, readonly=True)
        try:
            done = store.finished_ids(con, tuple(s for s in store.STATUSES if not (retry_failed and s == "failed")))
            from .runner import _warn_renamed_budget

            _warn_renamed_budget(con, spec)  # as `study run` will say it
        finally:
            con.close()
    todo = [r for r in runs if r["run_id"] not in done]
    from .runner import check_config

    check_config(todo, spec)  # a misspelt architecture, dataset or activation: one error (exit 2), not a table of them
    groups = _presets.make_groups(todo, spec["group_by"], spec["max_group"])
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(workers)
    path = cost_table_path()
    table = {} if refresh else _load_table(path)
    isolated = _IsolatedMeasure() if measure_fn is None else None
    measure_fn = measure_fn or isolated
    blocks: dict = {}
    for g in groups:
        c = g[0]["config"]
        blocks.setdefault((c["arch"], c["dataset"]), []).append(g)
    rows = []
    total = 0.0
    busiest = 0.0  # the highest load average per CPU any cost used here was measured under
    for (arch, ds), gs in blocks.items():
        row = {"arch": arch, "dataset": ds, "runs": sum(len(g) for g in gs), "groups": len(gs),
               "group_size": max(len(g) for g in gs)}
        try:
            est = 0.0
            for g in gs:
                cfg = g[0]["config"]
                budget = cfg["budget"]
                k = _key(arch, ds, len(g), budget, cfg["data_opts"])
                m = table.get(k)
                if m is None:
                    m = measure_fn(g, calibrate_steps)
                    table[k] = m
                    _save_table(path, table)  # each as it is measured: a plan stopped midway keeps the rest
                if m.get("load") is not None and m.get("cpus"):
                    busiest = max(busiest, float(m["load"]) / float(m["cpus"]))
                epochs = int(budget["epochs"])
                epe = evals_per_epoch(m["steps_per_epoch"], int(budget.get("eval_every") or 0))
                est += _group_seconds(m, budget)
            row.update(n_train=m["n_train"], steps_per_epoch=m["steps_per_epoch"], epochs_cap=epochs,
                       evals_per_epoch=epe, t_step_s=m["t_step"], t_eval_s=m["t_eval"],
                       member_epoch_s=(m["steps_per_epoch"] * m["t_step"] + epe * m["t_eval"]) / len(gs[0]),
                       est_s=est)
            total += est
        except Exception as exc:  # missing data, a model that cannot be built: say which, keep going
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
    if isolated is not None:
        isolated.close()
    return {"preset": spec["name"], "budget": spec["budget"].get("name"), "runs": len(runs), "pending": len(todo),
            "groups": len(groups), "workers": workers, "est_wall_s": total / max(workers, 1),
            "est_serial_s": total, "rows": rows, "upper_bound": any(float(r["config"]["budget"].get(
                "patience_epochs") or 0) > 0 for r in todo), "machine": _machine(), "measured_load_per_cpu": busiest}


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_plan(p: dict, per_block: bool = True) -> str:
    """The plan as text (a table per architecture x dataset, then the total)."""
    lines = [f"preset {p['preset']} (budget {p['budget']}): {p['runs']} runs, {p['pending']} pending in "
             f"{p['groups']} groups" + (" (`study run` may split a large one between idle workers)"
                                        if p.get("workers", 1) > 1 and p["groups"] > 0 else "")]
    if per_block and p["rows"]:
        hdr = (f"{'arch':<19} {'dataset':<21} {'runs':>5} {'grp':>4} {'G':>3} {'n_train':>7} {'steps/ep':>8} "
               f"{'ep cap':>6} {'evals/ep':>8} {'s/step':>8} {'s/eval':>8} {'s/member-ep':>11} {'time':>8}")
        lines.append(hdr)
        for r in p["rows"]:
            if "error" in r:
                lines.append(f"{r['arch']:<19} {r['dataset']:<21} {r['runs']:>5} {r['groups']:>4} "
                             f"{r['group_size']:>3}  not measured: {r['error']}")
                continue
            lines.append(f"{r['arch']:<19} {r['dataset']:<21} {r['runs']:>5} {r['groups']:>4} {r['group_size']:>3} "
                         f"{r['n_train']:>7} {r['steps_per_epoch']:>8} {r['epochs_cap']:>6} "
                         f"{r['evals_per_epoch']:>8.2f} {r['t_step_s']:>8.4f} {r['t_eval_s']:>8.3f} "
                         f"{r['member_epoch_s']:>11.3f} {_hms(r['est_s']):>8}")
    missing = [r for r in p["rows"] if "error" in r]
    bound = "at most " if p.get("upper_bound") else ""
    lines.append(f"estimated wall time on this machine with {p['workers']} worker(s): {bound}"
                 f"{_hms(p['est_wall_s'])} ({_hms(p['est_serial_s'])} of single-worker time"
                 + (", at the epoch caps; early stopping ends runs sooner" if p.get("upper_bound") else "")
                 + (f"; {len(missing)} block(s) not measured, not included" if missing else "") + ")")
    if missing and not per_block:  # the table that names them is not shown: say which, and why
        first = missing[0]
        lines.append(f"not measured: {first['arch']} x {first['dataset']} ({first['error']})"
                     + (f", and {len(missing) - 1} more (`study plan` lists them)" if len(missing) > 1 else ""))
    if p.get("measured_load_per_cpu", 0.0) > BUSY_LOAD_PER_CPU:
        lines.append(f"note: some of these costs were measured while the machine was busy (load average up to "
                     f"{p['measured_load_per_cpu']:.1f} per CPU), so the estimate may be high; `study plan --refresh` "
                     f"measures them again")
    return "\n".join(lines)


#: a load average per CPU above this when a cost was measured makes the plan say its estimate may be high
BUSY_LOAD_PER_CPU = 0.75


#: said at the start of a study on a machine with a CUDA GPU (the trainer has no device option yet)
GPU_NOTE = ("minaction study: note: a CUDA GPU is visible, but the study trains on the CPU (its worker "
            "processes); the GPU kernels serve the layers in your own training code")


def announce(preset, db=None, workers=None, file=None, max_group=None, retry_failed: bool = False) -> None:
    """Print the number of runs and the estimated wall time before a study starts (never raises:
    a plan that cannot be made is reported, and the study goes on)."""
    file = file or sys.stderr
    try:
        p = plan(preset, db=db, workers=workers, max_group=max_group, retry_failed=retry_failed)
        print(format_plan(p, per_block=False), file=file, flush=True)
    except Exception as exc:  # the study itself reports bad presets; the estimate is a courtesy
        print(f"minaction study: no time estimate ({type(exc).__name__}: {exc})", file=file, flush=True)
    if _gpu_visible():
        print(GPU_NOTE, file=file, flush=True)


def _gpu_visible() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken CUDA install: nothing to say
        return False


def _cli(args) -> int:
    from .cli import load_plugins
    from .presets import PresetError

    try:
        load_plugins(getattr(args, "plugin", None))
        p = plan(args.preset, db=getattr(args, "db", None), workers=args.workers, refresh=args.refresh,
                 max_group=args.max_group)
    except (PresetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"minaction study plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return 0


def register(sub) -> None:
    """Add ``study plan`` to the ``minaction study`` subcommands."""
    from .presets import available_presets

    q = sub.add_parser("plan", help="print runs and the estimated wall time of a preset on this machine, "
                                     "per architecture x dataset, without running it")
    q.add_argument("--preset", required=True,
                   help=f"preset name ({', '.join(available_presets())}) or path of a .toml file")
    q.add_argument("--db", default=None, help="count only the runs not yet recorded in this database")
    q.add_argument("--workers", type=int, default=None, help="worker processes (default: available CPUs)")
    q.add_argument("--max-group", type=int, default=None, metavar="N",
                   help="as `study run --max-group`: at most N runs per batched group")
    q.add_argument("--refresh", action="store_true", help="measure again instead of reading the cost table")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (repeatable): it registers your own architectures/datasets")
    q.set_defaults(func=_cli)
