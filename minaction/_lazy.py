"""Names of a package loaded from its submodules on first use (PEP 562 ``__getattr__``)."""
from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, where: dict) -> tuple:
    """``(__getattr__, __dir__)`` for ``package``, whose public names live in the submodules
    ``where`` gives (name -> submodule): a name is imported at its first use and then kept in
    the package, so importing the package imports none of them."""
    def __getattr__(name):
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sub}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
