"""The replication study runner: presets of thousands of runs, resumable, on one machine or a cluster.

Public API::

    from minaction.study import run_study, study_status, load_preset, expand
    summary = run_study("smoke", "results.sqlite", executor="local", workers=2)

See ``docs/study.md`` for the presets, the store's schema and the executors, and
``docs/guarantees.md`` for what holds under faults. The errors a study stops on before (or
instead of) training are ``ValueError`` subclasses with a one-line message: ``StudyConfigError``
(environment, preset), ``PresetError`` (a preset file), ``StoreError`` (the store's file),
``StoreBusyError`` (another driver).
"""
from .._lazy import lazy_names

__all__ = ["run_study", "study_status", "load_preset", "expand", "make_groups", "run_id", "available_presets",
           "StudyConfigError", "StoreError", "StoreBusyError", "PresetError"]

# name -> submodule, loaded on first use (PEP 562): `minaction study run` imports this package to
# start its workers' process before anything imports torch (see minaction/cli.py)
_WHERE = {"available_presets": "presets", "expand": "presets", "load_preset": "presets", "make_groups": "presets",
          "run_id": "presets", "StudyConfigError": "runner", "run_study": "runner", "study_status": "runner",
          "StoreBusyError": "store", "StoreError": "store", "PresetError": "presets"}


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
