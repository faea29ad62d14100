"""Test doubles: stand-ins the tests use in place of real datasets, models and study stores.

Not part of the shipped package. ``doubles.study`` registers a fake dataset and fake
architectures (through the public hooks ``minaction.data.register_dataset`` and
``minaction.models.register_architecture``) when it is imported; ``doubles.stores`` writes
synthetic study stores with known effects for the report's tests.
"""
from pathlib import Path

#: the tests/ folder (on sys.path under pytest, see tests/conftest.py) and the repository root
TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
