"""The replication study runner: presets of thousands of runs, resumable, on one machine or a cluster.

Public API::

    from minaction.study import run_study, study_status, load_preset, expand
    summary = run_study("smoke", "results.sqlite", executor="local", workers=2)

See ``docs/study.md`` for the presets, the store's schema and the executors.
"""
from .presets import available_presets, expand, load_preset, make_groups, run_id  # noqa: F401
from .runner import run_study, study_status  # noqa: F401

__all__ = ["run_study", "study_status", "load_preset", "expand", "make_groups", "run_id", "available_presets"]
