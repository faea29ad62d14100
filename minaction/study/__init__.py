"""The replication study runner: presets of thousands of runs, resumable, on one machine or a cluster.

Public API::

    from minaction.study import run_study, study_status, load_preset, expand
    summary = run_study("smoke", "results.sqlite", executor="local", workers=2)

See ``docs/study.md`` for the presets, the store's schema and the executors, and
``docs/guarantees.md`` for what holds under faults. The errors a study stops on before (or
instead of) training are ``ValueError`` subclasses with a one-line message: ``StudyConfigError``
(environment, preset), ``StoreError`` (the store's file), ``StoreBusyError`` (another driver).
"""
from .presets import available_presets, expand, load_preset, make_groups, run_id  # noqa: F401
from .runner import StudyConfigError, run_study, study_status  # noqa: F401
from .store import StoreBusyError, StoreError  # noqa: F401

__all__ = ["run_study", "study_status", "load_preset", "expand", "make_groups", "run_id", "available_presets",
           "StudyConfigError", "StoreError", "StoreBusyError"]
