"""Resumable training groups: an atomic checkpoint file per group, next to the study store.

A batched group of the faithful presets trains for hours; the driver records its runs only
when the whole group is done. So that a killed session loses at most a few minutes of a
group, the trainer (:func:`minaction.study.trainer.train_group`) saves the group's whole
training state

* at the end of an epoch once :data:`DEFAULT_EPOCH_EVERY_S` seconds (30) have passed since the
  last save (every epoch of a long epoch; a group whose epochs take milliseconds — ecg5000,
  nmnist — saved a ~0.1–1 s file after each one, which cost as much as its training), and
* mid-epoch, at the first validation evaluation after :data:`DEFAULT_EVERY_S` seconds
  (5 minutes) of wall time since the last save (an MNIST epoch of a G = 50 group takes
  longer than that on a 2-core machine),

into ``<db>.ckpt/<name>.pt`` (``name``: a hash of the group's run ids). The file holds the
model's and the optimizer's state (every member), each member's early-stopping state (best
validation accuracy and step, best weights, stopped/diverged flags), the epoch and evals rows
already measured, the step/sample/epoch counters and the position in the epoch, the torch
RNG state, the running sums of the epoch and the time accumulated so far. Data order needs
no state: a member's order in epoch ``e`` is drawn from ``(seed, e)`` alone, so the position
``(epoch, next batch)`` fixes it. A resumed group is bit-identical to an uninterrupted one
(its recorded results, timings aside).

Writes are atomic: a temporary file in the same folder, ``fsync``, ``os.replace``, then an
``fsync`` of the folder. A checkpoint carries its *key*: the group's run ids and
configurations in member order (budget included), the checkpoint format and a hash of the
code that defines the training state (``trainer.py`` and this module) and the torch version.
On start a group loads its file only if the key matches and every tensor fits the freshly
built model and optimizer; a mismatched, unreadable or truncated file is ignored with one
warning line on stderr, and the group starts from scratch (it is then overwritten).

The driver deletes a group's checkpoint once the group's runs are recorded, removes
temporary files a killed writer left, and, at the start of a study, deletes checkpoints
whose runs are all recorded already (a driver killed between recording and deleting).
Because the files live next to the store and the path travels in the task, this works for
every executor whose workers see the store's folder (local, dask, ray on one machine; a
cluster needs the store on a shared file system).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1
#: Seconds of wall time after which a mid-epoch evaluation also saves the checkpoint.
DEFAULT_EVERY_S = 300.0
#: Seconds of wall time after which an epoch end saves the checkpoint
#: (``MINACTION_CHECKPOINT_EPOCH_S`` overrides it; 0 saves at every epoch end).
DEFAULT_EPOCH_EVERY_S = 30.0
SUFFIX = ".pt"
_TMP = ".tmp"


def _epoch_every_default() -> float:
    v = os.environ.get("MINACTION_CHECKPOINT_EPOCH_S")
    if v is None or v.strip() == "":
        return DEFAULT_EPOCH_EVERY_S
    try:
        out = float(v)
    except ValueError:
        raise ValueError(f"MINACTION_CHECKPOINT_EPOCH_S must be a number of seconds, got {v!r}") from None
    if not out >= 0 or out == float("inf"):  # NaN compares false
        raise ValueError(f"MINACTION_CHECKPOINT_EPOCH_S must be a finite number of seconds >= 0, got {v!r}")
    return out


def check_env() -> None:
    """The checkpoint settings the workers read, checked by the driver before anything is scheduled (a bad
    value failed every run inside its worker, recorded as failed)."""
    _epoch_every_default()


#: Test hook: called as ``after_save(path, loop_state)`` after every successful save.
after_save = None


def directory(db) -> Path:
    """The folder holding the checkpoints of the groups trained into store ``db``."""
    return Path(os.path.realpath(os.fspath(db)) + ".ckpt")  # (every path to the store: the same folder)


def group_name(runs) -> str:
    """File name of a group's checkpoint: a hash of its run ids (member order ignored)."""
    ids = "\n".join(sorted(str(r["run_id"]) for r in runs))
    return hashlib.sha256(ids.encode()).hexdigest()[:32] + SUFFIX


def path_for(ckpt_dir, runs) -> Path:
    return Path(ckpt_dir) / group_name(runs)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the code that defines what a checkpoint means (the trainer, its optimizers and this
    module) and of the torch version."""
    h = hashlib.sha256(torch.__version__.encode())
    here = Path(__file__).resolve().parent
    for name in ("trainer.py", "checkpoint.py", "optim.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:  # pragma: no cover - a zipped install: fall back to the format alone
            h.update(name.encode())
    return h.hexdigest()[:16]


def plugin_version(runs) -> str:
    """A hash of the source files of the modules that registered the architectures and datasets of
    ``runs`` ('' when every name is built in): a checkpoint written before a plugin was edited
    is not resumed with the edited code."""
    from .plugins import plugins_for

    h = hashlib.sha256()
    mods = plugins_for(runs)
    for module, _root in mods:
        f = getattr(sys.modules.get(module), "__file__", None)
        try:
            h.update(module.encode() + b"\0" + Path(f).read_bytes())
        except (OSError, TypeError):
            h.update(module.encode())  # no readable source: the module's name alone
    return h.hexdigest()[:16] if mods else ""


def group_key(runs) -> str:
    """What must match for a checkpoint to be resumed: runs and configurations in member
    order, the checkpoint format and the code version (with the plugins' sources)."""
    body = json.dumps({"format": FORMAT, "code": code_version(), "plugins": plugin_version(runs),
                       "runs": [[str(r["run_id"]), r["config"]] for r in runs]}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def warn(msg: str) -> None:
    """One line on stderr (workers share the driver's stderr)."""
    sys.stderr.write(f"minaction: warning: {msg}\n")
    sys.stderr.flush()


def note(msg: str) -> None:
    """One informational line on stderr."""
    sys.stderr.write(f"minaction: {msg}\n")
    sys.stderr.flush()


def _first_line(exc) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tensors_fit(saved, fresh) -> bool:
    """``saved`` (a state_dict-like nest) has the structure, shapes and dtypes of ``fresh``."""
    if torch.is_tensor(fresh):
        return torch.is_tensor(saved) and saved.shape == fresh.shape and saved.dtype == fresh.dtype
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and set(saved) == set(fresh) and all(
            _tensors_fit(saved[k], fresh[k]) for k in fresh)
    return True


class GroupCheckpoint:
    """The checkpoint of one group: :meth:`load` on start, :meth:`save` at safe points."""

    def __init__(self, ckpt_dir, runs, every_s: Optional[float] = None, epoch_every_s: Optional[float] = None):
        self.dir = Path(ckpt_dir)
        self.path = path_for(self.dir, runs)
        self.key = group_key(runs)
        self.run_ids = [str(r["run_id"]) for r in runs]
        self.every_s = DEFAULT_EVERY_S if every_s is None else float(every_s)
        self.epoch_every_s = _epoch_every_default() if epoch_every_s is None else float(epoch_every_s)
        self._last = time.monotonic()
        self._save_failed = False

    def matches(self) -> bool:
        """Whether there is a checkpoint that :meth:`load` will take (its tensors' shapes aside): readable,
        of this format and of this group's key (read through a memory map: cheap)."""
        if not self.path.exists():
            return False
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # load() says what is wrong with the file
            return False
        return isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("key") == self.key

    def due(self) -> bool:
        """Whether a mid-epoch save is due (``every_s`` elapsed since the start or the last save)."""
        return time.monotonic() - self._last >= self.every_s

    def due_at_epoch_end(self) -> bool:
        """Whether an epoch end saves (``epoch_every_s`` elapsed, or ``every_s`` if shorter)."""
        return time.monotonic() - self._last >= min(self.epoch_every_s, self.every_s)

    def peek_live(self) -> Optional[list]:
        """The members the checkpointed model held (run indices, ``loop["live"]``) when the
        group had shrunk since its start (its stopped members left the model), else None;
        the trainer builds a model of those members before :meth:`load`."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            live = payload["loop"].get("live") if payload.get("key") == self.key else None
        except Exception:  # load() says what is wrong with the file
            return None
        if live is None or len(live) == len(self.run_ids):
            return None
        return [int(g) for g in live]

    def load(self, model, opt) -> Optional[dict]:
        """The saved loop state, after loading the model's and optimizer's state into
        ``model`` and ``opt``; None (with one warning line if a file was there) when there
        is no usable checkpoint. Never raises for a bad file."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, unreadable
            warn(f"ignoring the unreadable checkpoint {self.path} ({_first_line(exc)}); the group starts over")
            return None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != self.key:
            warn(f"ignoring the checkpoint {self.path}: it was written for another configuration or code "
                 f"version of this group; the group starts over")
            return None
        fresh_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fresh_opt = copy.deepcopy(opt.state_dict())
        try:
            loop = payload["loop"]
            if not isinstance(loop, dict) or not _tensors_fit(payload["model"], model.state_dict()):
                raise ValueError("its tensors do not fit the model built for this group")
            params = [p for grp in opt.param_groups for p in grp["params"]]
            for i, st in payload["optimizer"]["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape != params[int(i)].shape:
                        raise ValueError(f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}")
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload["optimizer"])
        except Exception as exc:  # put back the fresh state: the group starts over
            model.load_state_dict(fresh_model)
            opt.load_state_dict(fresh_opt)
            warn(f"ignoring the checkpoint {self.path} ({_first_line(exc)}); the group starts over")
            return None
        self._last = time.monotonic()
        return loop

    def save(self, model, opt, loop: dict) -> bool:
        """Write the checkpoint atomically; False (one warning, training goes on) when the
        file cannot be written, e.g. a full disk."""
        payload = {"format": FORMAT, "key": self.key, "run_ids": self.run_ids, "model": model.state_dict(),
                   "optimizer": opt.state_dict(), "loop": loop}
        tmp = self.path.with_name(f"{self.path.name}{_TMP}{os.getpid()}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write (a full disk, a file
            try:                                  # size limit) as RuntimeError "unexpected pos", not as OSError
                tmp.unlink()
            except OSError:
                pass
            if not self._save_failed:
                warn(f"cannot write the checkpoint {self.path} ({_first_line(exc)}); training goes on without it")
            self._save_failed = True
            return False
        self._last = time.monotonic()
        if after_save is not None:
            after_save(self.path, loop)
        return True


def remove(ckpt_dir, runs) -> None:
    """Delete a group's checkpoint (after its runs are recorded); then the folder if empty."""
    p = path_for(ckpt_dir, runs)
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        warn(f"cannot delete the checkpoint {p} ({_first_line(exc)})")
    try:
        Path(ckpt_dir).rmdir()
    except OSError:
        pass  # not empty (other groups in flight), or gone


def clean(ckpt_dir, recorded_ids) -> int:
    """At the start of a study (writer lock held): delete temporary files a killed writer
    left and checkpoints whose runs are all in ``recorded_ids``. Returns files deleted."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return 0
    n = 0
    recorded_ids = set(recorded_ids)
    for p in sorted(d.iterdir()):
        stale = _TMP in p.name
        if not stale and p.name.endswith(SUFFIX):
            try:  # mmap: reads the small run id list, not the tensors
                ids = torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("run_ids")
                stale = bool(ids) and set(ids) <= recorded_ids
            except Exception:
                stale = False  # an unreadable file is reported (and replaced) by its group
        if stale:
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    try:
        d.rmdir()
    except OSError:
        pass
    return n
