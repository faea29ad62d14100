"""The checks shared by the registration hooks (``minaction.models.register_architecture``,
``minaction.data.register_dataset``): one place, so both refuse bad input alike."""
from __future__ import annotations

from typing import Callable, Container, Dict, Optional


def check_registration(kind: str, name, builtins: Container[str], required: Dict[str, Callable],
                       optional: Optional[Dict[str, Callable]] = None) -> None:
    """Raise a clear error unless ``name`` is a non-empty string that is not a built-in ``kind``,
    every ``required`` value is callable and every ``optional`` one is callable or None."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} name must be a non-empty string, got {name!r}")
    if name in builtins:
        raise ValueError(f"{name!r} is a built-in {kind} and cannot be registered again; choose another name")
    for label, fn in {**required, **{k: v for k, v in (optional or {}).items() if v is not None}}.items():
        if not callable(fn):
            raise TypeError(f"{label} must be callable{' or None' if label in (optional or {}) else ''}, "
                            f"got {type(fn).__name__}")
