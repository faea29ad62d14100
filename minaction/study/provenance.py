"""Where a recorded run came from: the code, the libraries and the machine that trained it.

Runs are reproducible bit for bit only with the same code, torch build, kernel ISA and thread count
(docs/study.md, "Determinism"). A store used to keep none of these, so a reviewer could not tell which
code version produced a run, and a store mixing imported archives with new runs of other code could
not be split (a reproduction trial, session 24). The driver now writes one ``provenance`` row per run
it records (:func:`collect`, once per ``run_study`` call), and export/import carry it.

``code`` is a hash of every file that can change a run's numbers: the package's Python sources except
the report and command-line modules, and the C++/CUDA sources of the kernels. ``commit`` is the git
commit of the checkout the package was imported from, when it is one (with ``+dirty`` when its files
differ from that commit), else None.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

#: package folders whose files never change a run's numbers
_NOT_RESULTS = {"report"}
_NOT_RESULTS_FILES = {"cli.py", "__main__.py"}


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 (first 16 hex digits) of the sources that define a run's numbers."""
    import minaction
    from ..backends import source_dir

    pkg = Path(minaction.__file__).resolve().parent
    files = sorted(p for p in pkg.rglob("*.py")
                   if p.relative_to(pkg).parts[0] not in _NOT_RESULTS and p.name not in _NOT_RESULTS_FILES)
    try:
        src = Path(source_dir())
        files += sorted(p for p in src.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
    except Exception:  # noqa: BLE001 - no kernel sources beside this install: the Python sources alone
        pass
    h = hashlib.sha256()
    for p in files:
        try:
            h.update(str(p.name).encode() + b"\0" + p.read_bytes())
        except OSError:
            h.update(str(p.name).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The git commit of the checkout the package lives in (``+dirty`` when files differ), or None."""
    import minaction

    root = Path(minaction.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "minaction", "csrc", "kernels"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none), read once per process."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                k, _, v = line.partition(":")
                fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return fields


def _cpu_model() -> Optional[str]:
    return _cpuinfo().get("model name") or platform.processor() or None


def _cpu_id() -> Optional[str]:
    """Vendor, family, model and stepping from ``/proc/cpuinfo`` ("AuthenticAMD family 25 model 1 stepping 1"):
    a cloud VM's model name ("AMD EPYC") is one string for CPUs of 2-3x different speed (Zen 3, Zen 4 and Zen 5
    all trained this study's runs), and its training times are only comparable within one of them."""
    info = _cpuinfo()
    vendor, family, model, stepping = (info.get(k) for k in ("vendor_id", "cpu family", "model", "stepping"))
    if vendor is None or family is None or model is None:
        return None
    return f"{vendor} family {family} model {model}" + (f" stepping {stepping}" if stepping is not None else "")


def _isa() -> Optional[str]:
    try:
        from ..backends import cpu

        return cpu.chosen_isa()
    except Exception:  # noqa: BLE001 - a bad MINACTION_CPU_ISA is the backend check's to report
        return None


def machine() -> dict:
    """What the worker process that trained a group ran on (with ``--executor dask`` or ``ray`` it may not be the
    driver's machine): its kernel ISA, CPU (model name, and vendor/family/model: :func:`_cpu_id`), host, torch build
    and torch threads."""
    import torch

    return {"isa": _isa(), "cpu": _cpu_model(), "cpu_id": _cpu_id(), "host": platform.node() or None,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_group(task: dict) -> dict:
    """:func:`minaction.study.trainer.run_group` with the worker's :func:`machine` added to its result
    (``"machine"``), which the driver writes into the group's provenance rows."""
    from .trainer import run_group as _run_group

    res = _run_group(task)
    try:
        res["machine"] = machine()
    except Exception:  # noqa: BLE001 - provenance never fails a trained group
        pass
    return res


def collect(threads: int) -> dict:
    """The provenance of the runs a ``run_study`` call records."""
    import minaction

    return {
        **machine(),  # the driver's: each group's worker replaces these with its own (run_group)
        "minaction": getattr(minaction, "__version__", None),
        "commit": git_commit(),
        "code": code_hash(),
        "python": platform.python_version(),
        "threads": int(threads),
        "platform": f"{sys.platform}-{platform.machine()}",
        "pid": os.getpid(),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
