"""Registered architectures and datasets in the study's worker processes.

A name added with :func:`minaction.models.register_architecture` or
:func:`minaction.data.register_dataset` exists only in the process that registered it. The
driver finds, for the runs it schedules, the modules that registered their names
(:func:`plugins_for`); every task carries that list, and each worker imports those modules
before it trains (:func:`import_plugins`), whatever the executor (local process pool, dask,
ray). A module is sent with the folder it was imported from, so a worker whose ``sys.path``
lacks that folder (a dask or ray worker started elsewhere) still finds it.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple


def _root(module: str) -> Optional[str]:
    """The ``sys.path`` entry ``module`` was imported from (None when unknown)."""
    mod = sys.modules.get(module)
    f = getattr(mod, "__file__", None)
    if not f:
        return None
    p = Path(f).resolve()
    depth = module.count(".") + (1 if p.name == "__init__.py" else 0)
    return str(p.parents[depth])


def registering_modules(runs: Iterable[dict]) -> set:
    """The modules that registered the architectures and datasets of ``runs`` (``__main__`` included;
    built-in names need none)."""
    from .. import data, models

    mods = set()
    for r in runs:
        arch, ds = r["config"]["arch"], r["config"]["dataset"]
        reg = data.catalogue.REGISTERED.get(ds)
        for m in (models.architecture(arch).module if arch in models.architecture_names() else None,
                  reg.module if reg is not None else None):
            if m:
                mods.add(m)
    return mods


def plugins_for(runs: Iterable[dict]) -> List[Tuple[str, Optional[str]]]:
    """``[(module, sys.path root)]``: the modules that registered the architectures and
    datasets of ``runs`` (built-in names need none; ``__main__`` cannot be imported elsewhere)."""
    return [(m, _root(m)) for m in sorted(registering_modules(runs) - {"__main__"})]


def import_plugins(plugins: Iterable) -> None:
    """Import each ``(module, root)`` of :func:`plugins_for` (``root`` appended to ``sys.path``
    when missing); a module already imported is not imported again."""
    for module, root in plugins or ():
        if module in sys.modules:
            continue
        if root and root not in sys.path:
            sys.path.append(root)
        importlib.import_module(module)
